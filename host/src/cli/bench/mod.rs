//! `replicator bench`: the cluster benchmark. It measures, in one run on
//! this machine, raw quinn throughput between two processes (the
//! baseline), then for each storage backend and each of the workloads in
//! [`workload::WORKLOADS`] a fresh 3-node cluster of real node processes
//! over QUIC (RF 3, min.insync 2, acks=all), and the failover time. It prints a
//! table (or JSON) with the ratios the benchmark issue sets targets for and
//! writes `results.json` and `chart.svg`.

mod fresh_memory;
mod payload;
pub mod raw_quinn;
mod report;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::procs::{Nodes, init_local_cluster, wait_for_cluster};
use report::{Report, Setup};
use workload::WORKLOADS;

#[derive(Args)]
pub struct BenchArgs {
    /// Storage backends to compare, each on a fresh cluster: `native`
    /// (in-process memory log, no wasm: the baseline), `memory`, `file`
    /// (its defaults: 64 MiB segments, fsync once a second and at each
    /// roll, write-behind on), or a .wasm path.
    #[arg(long, value_delimiter = ',', default_value = "native,memory,file")]
    storage: Vec<String>,
    /// A setting for the storage plugin, as key=value (repeatable), as in
    /// `cluster init`: `--storage file --storage-config fsync=always`, or
    /// `--storage s3 --storage-config endpoint=http://127.0.0.1:9000
    /// --storage-config bucket=bench` (an S3 server such as moto_server,
    /// and AWS_* credentials; see the README). Plugins refuse
    /// settings they do not know, so this needs exactly one plugin in
    /// --storage.
    #[arg(long = "storage-config", value_name = "KEY=VALUE", value_parser = crate::cli::parse_kv)]
    storage_config: Vec<(String, String)>,
    /// Workloads to run: a (1 in flight), b (1 producer, 256 in flight),
    /// c (4 producers, 64 in flight each), d (64 KiB batches, 32 in flight).
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,d")]
    workloads: Vec<String>,
    /// Measured seconds per workload.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Unmeasured warm-up seconds before each workload.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Bytes per message (incompressible).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// MB sent for the raw-quinn baseline.
    #[arg(long, default_value_t = 2000)]
    raw_mb: u64,
    /// Rounds of every (storage, workload) pair, interleaved, each round
    /// starting with its own raw-quinn run and the next backend: each row
    /// of the report is its best round (highest MB/s; lowest p99 for a),
    /// so a burst of hypervisor steal in one round does not decide a
    /// ratio, and each ratio is also shown round by round. Every round is
    /// kept in results.json.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// Failover rounds per storage backend (SIGKILL the leader, time the
    /// first acks=all write its successor acknowledges), then as many
    /// handover rounds (the same with SIGTERM, a graceful stop that hands
    /// the partition over first); 0 skips them.
    #[arg(long, default_value_t = 3)]
    failover_rounds: u32,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Directory for `results.json` and `chart.svg` (created).
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Exit non-zero when a target ratio is missed (requests that fail
    /// always make it exit non-zero).
    #[arg(long)]
    check: bool,
    /// Keep the clusters' directories and node logs here instead of a
    /// temporary directory. Each cluster's data is still deleted once it
    /// was measured (see --keep-data).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep each measured cluster's data (its nodes' data directories,
    /// the storage plugin's files among them) until the end, instead of
    /// deleting it as soon as the cluster stopped. Later
    /// clusters then run beside it: file-plugin rows of later rounds
    /// measured ~15% slower that way.
    #[arg(long)]
    keep_data: bool,
    /// MiB of each partition's log every node keeps (retention, as a
    /// long-running cluster would have); older committed batches are
    /// deleted and their memory reused. 0 keeps everything, so every byte
    /// written lands in memory the process never touched before.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    retention_mb: u64,
}

/// A running 3-node cluster (its directory is `nodes.dir()`).
struct Cluster {
    nodes: Nodes,
}

impl Cluster {
    async fn start(
        dir: &Path,
        storage: &str,
        storage_config: &[(String, String)],
        retention_mb: u64,
    ) -> anyhow::Result<Cluster> {
        let (client_path, _, _) = init_local_cluster(
            dir,
            storage,
            storage_config,
            (retention_mb > 0).then_some(retention_mb),
        )?;
        let mut nodes = Nodes::start(dir, 3)?;
        let c = super::client_cmds::client(&client_path)?;
        wait_for_cluster(&c, &mut nodes, 3).await?;
        c.close().await;
        Ok(Cluster { nodes })
    }

    /// Check no node died, then stop them all (SIGTERM, clean exits).
    fn stop(mut self) -> anyhow::Result<()> {
        if let Some((id, status)) = self.nodes.exited() {
            bail!(
                "node {id} exited during the benchmark ({status}); {}",
                self.nodes.log_tail(id)
            );
        }
        let stops = self.nodes.stop();
        if let Some((id, _)) = stops.iter().find(|(_, ok)| !ok) {
            bail!(
                "node {id} did not shut down cleanly; {}",
                self.nodes.log_tail(*id)
            );
        }
        Ok(())
    }
}

/// Delete the nodes' data directories (`node-<id>/`) of the stopped
/// cluster in `dir`, keeping its configs, certificates and node logs. A
/// cluster's data kept on disk slowed the clusters after it: with every
/// cluster's data kept until the end of a 3-round run, the file plugin's d
/// made 138 MB/s on average in rounds 2 and 3 against 162 with it deleted
/// (three runs each way).
fn discard_data(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_dir() && name.to_string_lossy().starts_with("node-") {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

/// How many of the node logs (`node-*.log`) in `dir` contain `needle`.
fn nodes_that_logged(dir: &Path, needle: &str) -> u32 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let logs = entries.flatten().filter(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.starts_with("node-") && name.ends_with(".log")
    });
    let hits = logs.filter(|e| {
        std::fs::read(e.path()).is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle))
    });
    u32::try_from(hits.count()).unwrap_or(u32::MAX)
}

/// Refuse a `--storage` entry no node could load, before minutes of
/// measuring: a name that is neither `native` nor a built-in plugin, a
/// .wasm path that is not a file, or the s3 plugin with no object store to
/// talk to. (Whether an endpoint is an S3 server is for the nodes to say;
/// their log is quoted if they refuse.)
fn check_storage(storage: &str, config: &[(String, String)]) -> anyhow::Result<()> {
    use replicator::node::storage::NATIVE;
    use replicator::plugin::{PluginSource, builtin};
    let Ok(source) = storage.parse::<PluginSource>();
    match source {
        PluginSource::Builtin(name) if name != NATIVE && builtin::storage(&name).is_none() => {
            let known: Vec<&str> = std::iter::once(NATIVE)
                .chain(builtin::STORAGE.iter().map(|(n, _)| *n))
                .collect();
            bail!(
                "unknown storage `{name}` in --storage; expected one of {} or a path to a .wasm component",
                known.join(", ")
            )
        }
        PluginSource::Path(path) if !path.is_file() => {
            bail!("--storage {}: no such file", path.display())
        }
        PluginSource::Builtin(name)
            if name == "s3" && !config.iter().any(|(k, _)| k == "endpoint") =>
        {
            bail!(
                "--storage s3 needs an object store: add --storage-config endpoint=http://HOST:PORT --storage-config bucket=NAME, with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set (a local store: `moto_server -H 127.0.0.1 -p PORT`; see Storage on an object store in the README)"
            )
        }
        _ => Ok(()),
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    // `contains` is false for NaN, which clap would otherwise accept.
    if !(f64::MIN_POSITIVE..=3600.0).contains(&args.seconds)
        || !(0.0..=600.0).contains(&args.warmup)
    {
        bail!("--seconds must be in (0, 3600] and --warmup in [0, 600]");
    }
    if args.size == 0 || args.size > 1 << 20 {
        bail!("--size must be 1..=1048576 bytes");
    }
    if args.raw_mb == 0 || args.storage.is_empty() {
        bail!("--raw-mb must be at least 1 and --storage must name a backend");
    }
    // Each (backend, workload) gets its own cluster directory, named for
    // them: a repeat ran a whole workload, then failed on the directory
    // the first one made (exploratory run).
    for (flag, list) in [
        ("--storage", &args.storage),
        ("--workloads", &args.workloads),
    ] {
        let mut seen = std::collections::BTreeSet::new();
        if let Some(twice) = list.iter().map(|v| v.trim()).find(|v| !seen.insert(*v)) {
            bail!("{flag} names `{twice}` twice: name each once");
        }
    }
    if !args.storage_config.is_empty()
        && (args.storage.len() != 1 || args.storage[0] == replicator::node::storage::NATIVE)
    {
        bail!(
            "--storage-config needs exactly one plugin in --storage (got {}): plugins refuse settings they do not know",
            args.storage.join(",")
        );
    }
    for storage in &args.storage {
        check_storage(storage, &args.storage_config)?;
        // The plugin loads and takes the settings, as a node will check.
        super::cluster::check_storage(storage, &args.storage_config).await?;
    }
    let workloads = args
        .workloads
        .iter()
        .map(|k| {
            WORKLOADS
                .iter()
                .find(|w| w.key == k.trim())
                .with_context(|| format!("unknown workload `{k}` (expected a, b, c or d)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // A request the client cannot even encode would fail every time, as
    // fast as it can be sent: say so before measuring anything.
    for w in &workloads {
        let one = payload::requests(1, w.records_per_request, args.size, 0);
        if let Some(request) = one.first()
            && let Err(e) = replicator::batch::encode(0, 0, request)
        {
            bail!(
                "--size {}: a request of workload {} ({} messages) cannot be sent: {e}",
                args.size,
                w.key,
                w.records_per_request
            );
        }
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!(
            "--out {} is a file; it must name a directory (created if missing)",
            args.out.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let (dir, _guard) = super::work_dir(&args.dir)?;
    let window = Duration::from_secs_f64(args.seconds);
    let warmup = Duration::from_secs_f64(args.warmup);
    let say = |line: String| {
        // Progress goes to stderr, so `--json` output stays clean.
        eprintln!("bench: {line}");
    };

    // The baseline on certificates of a cluster that never runs, before
    // each round; the best run counts.
    let certs = dir.join("baseline");
    init_local_cluster(&certs, "memory", &[], None)?;
    let mut raw_runs: Vec<raw_quinn::RawQuinn> = Vec::new();
    let mut fresh: Option<fresh_memory::FreshMemory> = None;
    // Every workload on a fresh cluster: no partitions, data or fetch
    // sessions left over from the one before.
    let mut results = Vec::new();
    for round in 1..=args.rounds {
        let of = if args.rounds > 1 {
            format!(" (round {round} of {})", args.rounds)
        } else {
            String::new()
        };
        say(format!(
            "raw quinn baseline{of}: {} MB on one connection between two processes",
            args.raw_mb
        ));
        let r = raw_quinn::measure(&certs, args.raw_mb * 1_000_000).await?;
        say(format!("raw quinn: {:.1} MB/s", r.mb_per_s));
        raw_runs.push(r);
        let f = fresh_memory::measure();
        say(format!(
            "fresh memory: {:.2} GB/s ({:.2} us per page)",
            f.gb_per_s, f.us_per_page
        ));
        if fresh.as_ref().is_none_or(|b| f.gb_per_s > b.gb_per_s) {
            fresh = Some(f);
        }
        // Each round starts with the next backend: whatever follows the
        // baseline's burst (this VM's steal often does) falls on each one
        // in turn.
        let n = args.storage.len();
        for k in 0..n {
            let i = (k + round as usize - 1) % n;
            let storage = &args.storage[i];
            for w in &workloads {
                say(format!(
                    "storage `{storage}`, workload {}{of}: {}",
                    w.key, w.title
                ));
                let cluster = Cluster::start(
                    &dir.join(format!("cluster-{round}-{i}-{}", w.key)),
                    storage,
                    &args.storage_config,
                    args.retention_mb,
                )
                .await?;
                let mut r = workload::run(&cluster.nodes, storage, w, args.size, warmup, window)
                    .await
                    .with_context(|| format!("workload {} on `{storage}`", w.key))?;
                r.round = round;
                r.nodes_with_slow_writes =
                    nodes_that_logged(cluster.nodes.dir(), replicator::plugin::SLOW_WRITE_LOG);
                say(format!(
                    "  {:.0} msg/s, {:.1} MB/s, p99 {:.2} ms, {} failed",
                    r.msgs_per_s, r.mb_per_s, r.latency_ms.p99, r.failed
                ));
                results.push(r);
                let cluster_dir = cluster.nodes.dir().to_path_buf();
                cluster.stop()?;
                if !args.keep_data
                    && let Err(e) = discard_data(&cluster_dir)
                {
                    say(format!(
                        "could not delete the data of {}: {e}",
                        cluster_dir.display()
                    ));
                }
            }
        }
    }
    let fresh = fresh.context("no round ran")?;
    let mut failovers = Vec::new();
    for (i, storage) in args.storage.iter().enumerate() {
        if args.failover_rounds > 0 {
            say(format!(
                "storage `{storage}`: {} failover rounds",
                args.failover_rounds
            ));
            let mut cluster = Cluster::start(
                &dir.join(format!("cluster-{i}-failover")),
                storage,
                &args.storage_config,
                args.retention_mb,
            )
            .await?;
            let f =
                workload::failover(&mut cluster.nodes, storage, args.failover_rounds, args.size)
                    .await
                    .with_context(|| format!("failover on `{storage}`"))?;
            say(format!(
                "  failover p50 {:.0} ms, max {:.0} ms; handover p50 {:.0} ms, max {:.0} ms",
                f.p50_ms, f.max_ms, f.handover_p50_ms, f.handover_max_ms
            ));
            failovers.push(f);
            cluster.stop()?;
        }
    }
    let report = Report::new(
        Setup {
            nodes: 3,
            replication_factor: 3,
            min_insync: 2,
            acks: "all",
            message_bytes: args.size,
            warmup_s: args.warmup,
            window_s: args.seconds,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            rounds: args.rounds,
            retention_mb: args.retention_mb,
            storage_config: args.storage_config.clone(),
            node_workers: super::procs::worker_threads(),
        },
        raw_runs,
        fresh,
        results,
        failovers,
    )?;
    let json = serde_json::to_string_pretty(&report)?;
    let results_path = args.out.join("results.json");
    let chart_path = args.out.join("chart.svg");
    std::fs::write(&results_path, &json)
        .with_context(|| format!("writing {}", results_path.display()))?;
    std::fs::write(&chart_path, report.svg())
        .with_context(|| format!("writing {}", chart_path.display()))?;
    if args.json {
        println!("{json}");
    } else {
        print!("{}", report.table());
        println!(
            "\nwrote {} and {}",
            results_path.display(),
            chart_path.display()
        );
    }
    if report.failed_requests() > 0 {
        bail!(
            "{} produce requests failed in a healthy cluster",
            report.failed_requests()
        );
    }
    if args.check && !report.all_met() {
        eprintln!("bench: some targets were missed (--check)");
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_that_logged_counts_node_logs_with_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text);
        write(
            "node-1.log",
            "start\nWARN a storage plugin's write took 12ms\n",
        )
        .expect("write");
        write("node-2.log", "start\nnothing here\n").expect("write");
        write("node-3.log", "a storage plugin's write took 30ms").expect("write");
        // Not a node log.
        write("client.log", "a storage plugin's write took 1s").expect("write");
        let needle = replicator::plugin::SLOW_WRITE_LOG;
        assert_eq!(nodes_that_logged(dir.path(), needle), 2);
        assert_eq!(nodes_that_logged(&dir.path().join("gone"), needle), 0);
    }
}
