//! `replicator bench` end to end, short: real node processes, the raw
//! quinn baseline and the JSON report, checked for what a reader of the
//! figures relies on (the long run is `scripts/replicator bench`).

mod support;

use std::process::Command;

fn bench(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_replicator"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run replicator bench");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The shortest run that starts a cluster (workload a for 0.2 s, a tiny
/// raw-quinn run, no failover), writing to `out`, for tests of what
/// happens around a run rather than of its figures.
fn short_run(out: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let mut all = vec![
        "--workloads",
        "a",
        "--seconds",
        "0.2",
        "--warmup",
        "0",
        "--raw-mb",
        "10",
        "--failover-rounds",
        "0",
        "--out",
        out.to_str().expect("utf-8 path"),
    ];
    all.extend_from_slice(args);
    bench(&all)
}

#[test]
fn a_short_run_measures_everything_it_reports() {
    let out = tempfile::tempdir().expect("tempdir");
    let out_dir = out.path().to_str().expect("utf-8 path");
    let kept = tempfile::tempdir().expect("tempdir");
    let kept_dir = kept.path().to_str().expect("utf-8 path");
    let (ok, stdout, stderr) = bench(&[
        "--dir",
        kept_dir,
        "--storage",
        "native,memory",
        "--workloads",
        "a,d",
        "--seconds",
        "0.5",
        "--rounds",
        "2",
        "--warmup",
        "0.2",
        "--raw-mb",
        "100",
        "--failover-rounds",
        "2",
        "--json",
        "--out",
        out_dir,
    ]);
    assert!(ok, "bench failed:\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert!(
        report["raw_quinn"]["mb_per_s"]
            .as_f64()
            .is_some_and(|v| v > 1.0)
    );
    assert!(
        report["raw_quinn"]["cpu_s_per_gb"]
            .as_f64()
            .is_some_and(|v| v > 0.0),
        "{}",
        report["raw_quinn"]
    );
    // A fair baseline: both ends of the raw run had as many worker threads
    // as each node, as their runtimes reported them.
    let node_workers = report["setup"]["node_workers"].as_u64();
    assert!(node_workers.is_some_and(|n| n >= 1), "{}", report["setup"]);
    assert_eq!(report["raw_quinn"]["sender_workers"].as_u64(), node_workers);
    assert_eq!(report["raw_quinn"]["sink_workers"].as_u64(), node_workers);
    let workloads = report["workloads"].as_array().expect("workloads");
    assert_eq!(workloads.len(), 4, "2 storages x 2 workloads");
    // Two rounds of each, interleaved; each row is one of its rounds, and
    // the rows keep the first round's order.
    let all = report["all_rounds"].as_array().expect("all_rounds");
    assert_eq!(all.len(), 8, "2 rounds x 2 storages x 2 workloads");
    assert_eq!(all[0]["storage"], "native");
    assert_eq!(
        all[4]["storage"], "memory",
        "the second round starts with the next backend"
    );
    for w in workloads {
        assert!(all.contains(w), "{w} is not one of the rounds");
    }
    let rounds: Vec<u64> = all.iter().filter_map(|w| w["round"].as_u64()).collect();
    assert_eq!(
        rounds,
        [1, 1, 1, 1, 2, 2, 2, 2],
        "each result names its round"
    );
    // One raw-quinn run per round, the best of them the baseline.
    let raws = report["raw_quinn_rounds"]
        .as_array()
        .expect("raw_quinn_rounds");
    assert_eq!(raws.len(), 2, "{raws:?}");
    let best_raw = raws
        .iter()
        .filter_map(|r| r["mb_per_s"].as_f64())
        .fold(0.0, f64::max);
    assert_eq!(report["raw_quinn"]["mb_per_s"].as_f64(), Some(best_raw));
    assert_eq!(workloads[0]["storage"], "native");
    for w in workloads {
        let messages = w["messages"].as_u64().unwrap_or(0);
        assert!(messages > 0, "nothing acknowledged: {w}");
        assert_eq!(w["failed"].as_u64(), Some(0), "{w}");
        let lat = &w["latency_ms"];
        let (p50, p99, max) = (
            lat["p50"].as_f64().unwrap_or(-1.0),
            lat["p99"].as_f64().unwrap_or(-1.0),
            lat["max"].as_f64().unwrap_or(-1.0),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{lat}");
        assert!(
            w["node_cpu_s_per_gb"].as_f64().is_some_and(|c| c > 0.0),
            "{w}"
        );
        // The busiest node did work, and no more than the machine has
        // cores for (with a clock tick's slack over the window).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let busiest = w["busiest_node_cores"].as_f64().unwrap_or(-1.0);
        assert!(0.0 < busiest && busiest <= cores + 0.05, "{w}");
        let (idle, steal) = (
            w["idle_pct"].as_f64().unwrap_or(-1.0),
            w["steal_pct"].as_f64().unwrap_or(-1.0),
        );
        assert!(idle >= 0.0 && steal >= 0.0 && idle + steal <= 100.0, "{w}");
    }
    // Workload d sends 64 records per request.
    let d = workloads
        .iter()
        .find(|w| w["workload"] == "d")
        .expect("workload d");
    assert_eq!(d["messages"].as_u64().unwrap_or(1) % 64, 0, "{d}");
    let failover = report["failover"].as_array().expect("failover");
    assert_eq!(failover.len(), 2);
    for f in failover {
        let ms = |key: &str| -> Vec<f64> {
            f[key]
                .as_array()
                .map(|r| r.iter().filter_map(serde_json::Value::as_f64).collect())
                .unwrap_or_default()
        };
        let (killed, stopped) = (ms("rounds_ms"), ms("handover_rounds_ms"));
        assert!(killed.len() == 2 && stopped.len() == 2, "{f}");
        // Bounded below by the failure timeout (500 ms by default).
        assert!(
            killed.iter().all(|ms| (400.0..30_000.0).contains(ms)),
            "{f}"
        );
        // A graceful stop hands over first (controlled shutdown): no
        // failure timeout. 30-45 ms here; 340-360 ms every round when the
        // successor's followers still waited on connections to the
        // incarnation the SIGKILL round before had killed. The faster of
        // two rounds, so that one stall of a loaded machine does not
        // decide it; neither may wait out a failure timeout.
        let fastest = stopped.iter().copied().fold(f64::MAX, f64::min);
        assert!(fastest < 250.0, "{f}");
        assert!(stopped.iter().all(|&ms| ms < 400.0), "{f}");
    }
    let checks = report["checks"].as_array().expect("checks");
    let check = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {checks:?}"))
    };
    // Each ratio also says how it moved from round to round.
    for (name, says) in [
        (
            "wasm memory / native, workload d",
            "each against native in the same round: ",
        ),
        (
            "memory: replicated / raw quinn",
            "against the raw run each began with: ",
        ),
    ] {
        let detail = check(name)["detail"].as_str().unwrap_or("");
        let per_round = detail.split(says).nth(1).unwrap_or("");
        assert_eq!(per_round.split(", ").count(), 2, "{name}: {detail}");
        // And for machines, as numbers.
        let by_round = check(name)["by_round"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(by_round.len(), 2, "{name}: {by_round:?}");
        assert!(by_round.iter().all(|r| r.as_f64().is_some_and(|r| r > 0.0)));
    }
    let chart = std::fs::read_to_string(out.path().join("chart.svg")).expect("chart.svg");
    assert_eq!(
        chart.matches("</title></rect>").count(),
        4,
        "one bar per row"
    );
    assert_eq!(
        chart.matches(r#"class="rounds""#).count(),
        4,
        "and in each, the spread of its 2 rounds"
    );
    // The nodes' logs are kept with --dir, as plain text: no colour codes
    // in a file.
    let log = std::fs::read_to_string(kept.path().join("cluster-1-0-a").join("node-1.log"))
        .expect("node 1's log of round 1, native, workload a");
    assert!(log.contains(" INFO "), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{log}"
    );
    // Its data went once it was measured: the clusters after it do not run
    // beside it.
    for id in 1..=3 {
        let data = kept.path().join("cluster-1-0-a").join(format!("node-{id}"));
        assert!(!data.exists(), "{} was kept", data.display());
    }
    let saved = std::fs::read_to_string(out.path().join("results.json")).expect("results.json");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&saved).expect("JSON"),
        report
    );
}

#[test]
fn a_plugin_that_cannot_load_is_refused_before_any_node_starts() {
    // A file that exists but is no wasm component. The bench loads the
    // plugin and checks its settings as `cluster init` does, so it says
    // what is wrong in the loader's words before starting three nodes
    // that would each fail the same way into a log of their own.
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not a component").expect("write junk");
    let out = dir.path().join("out");
    let (ok, _, stderr) = short_run(&out, &["--storage", junk.to_str().expect("utf-8 path")]);
    assert!(
        !ok,
        "a cluster that cannot start was benchmarked:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("--storage {}", junk.display()))
            && stderr.contains("not a valid wasm component")
            && !stderr.contains("exited during startup"),
        "{stderr}"
    );
    // The same for settings the plugin refuses.
    let (ok, _, stderr) = short_run(
        &out,
        &["--storage", "file", "--storage-config", "fsync=sometimes"],
    );
    assert!(
        !ok && stderr.contains("storage plugin `file` refuses these settings"),
        "{stderr}"
    );
}

#[test]
fn storage_settings_reach_every_node_and_the_results() {
    let kept = tempfile::tempdir().expect("tempdir");
    let out = kept.path().join("out");
    let (ok, stdout, stderr) = short_run(
        &out,
        &[
            "--storage",
            "file",
            "--storage-config",
            "fsync=always",
            "--json",
            "--dir",
            kept.path().to_str().expect("utf-8 path"),
            "--keep-data",
        ],
    );
    assert!(ok, "{stderr}");
    for id in 1..=3 {
        // --keep-data kept what each node wrote: its log's segments.
        let data = kept.path().join("cluster-1-0-a").join(format!("node-{id}"));
        let files = support::files_under(&data);
        assert!(
            files
                .iter()
                .any(|f| f.extension().is_some_and(|e| e == "log")),
            "no segment under {}: {files:?}",
            data.display()
        );
        let config = std::fs::read_to_string(
            kept.path()
                .join("cluster-1-0-a")
                .join(format!("node-{id}.toml")),
        )
        .expect("node config");
        let parsed: toml::Table = config.parse().expect("node config is TOML");
        assert_eq!(
            parsed["storage"]["config"]["fsync"].as_str(),
            Some("always"),
            "{config}"
        );
    }
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(
        report["setup"]["storage_config"],
        serde_json::json!([["fsync", "always"]]),
        "{stdout}"
    );
}

#[test]
fn a_cluster_that_never_answers_fails_the_run_when_the_window_ends() {
    // The s3 plugin with no bucket: the nodes start and the topic is
    // created, but no partition's storage opens, so no produce is ever
    // answered. The run must fail, quoting the nodes, and must not wait
    // out the client's 30 s request timeout first.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let started = std::time::Instant::now();
    let (ok, stdout, stderr) = short_run(
        &out,
        &[
            "--storage",
            "s3",
            "--storage-config",
            "endpoint=http://127.0.0.1:9",
        ],
    );
    let took = started.elapsed();
    assert!(!ok, "a silent cluster was reported as measured:\n{stdout}");
    assert!(
        stderr.contains("the cluster did not answer")
            && stderr.contains("storage-s3 needs `bucket`"),
        "{stderr}"
    );
    assert!(
        took < std::time::Duration::from_secs(25),
        "took {took:?}: it waited for the requests to time out"
    );
    assert!(!stdout.contains("[met]"), "{stdout}");
}

#[test]
fn an_output_path_that_is_a_file_is_refused() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let path = file.path().to_str().expect("utf-8 path");
    let (ok, _, stderr) = bench(&["--out", path]);
    assert!(!ok, "--out {path} was accepted");
    assert!(
        stderr.contains(&format!("--out {path} is a file")),
        "{stderr}"
    );
}

#[test]
fn bad_arguments_are_refused_before_anything_starts() {
    for (args, says) in [
        (&["--workloads", "e"][..], "unknown workload `e`"),
        (&["--seconds", "0"][..], "--seconds"),
        (&["--seconds", "NaN"][..], "--seconds"),
        (&["--size", "0"][..], "--size"),
        (&["--rounds", "0"][..], "--rounds"),
        (&["--workloads", "a,a"][..], "--workloads names `a` twice"),
        (
            &["--storage", "memory,memory"][..],
            "--storage names `memory` twice",
        ),
        (
            &["--storage", "memory,nosuch"][..],
            "unknown storage `nosuch` in --storage; expected one of native, memory, file, s3",
        ),
        (
            &["--storage", "/nonexistent/plugin.wasm"][..],
            "--storage /nonexistent/plugin.wasm: no such file",
        ),
        (
            &["--size", "1048576", "--workloads", "a,d"][..],
            "--size 1048576: a request of workload d (64 messages) cannot be sent: batch would be",
        ),
        (
            &["--storage", "s3"][..],
            "--storage s3 needs an object store: add --storage-config endpoint=http://HOST:PORT --storage-config bucket=NAME",
        ),
        (
            &[
                "--storage",
                "native,file",
                "--storage-config",
                "fsync=always",
            ][..],
            "--storage-config needs exactly one plugin in --storage (got native,file)",
        ),
        (
            &["--storage", "native", "--storage-config", "fsync=always"][..],
            "--storage-config needs exactly one plugin in --storage (got native)",
        ),
        (
            &["--storage", "file", "--storage-config", "fsync"][..],
            "`fsync` is not key=value",
        ),
    ] {
        let (ok, _, stderr) = bench(args);
        assert!(!ok, "{args:?} was accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
