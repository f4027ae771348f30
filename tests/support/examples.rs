//! The example plugins under `examples/` built by scripts/build-examples
//! (which installs their toolchains: componentize-py, componentize-js)
//! into `<target>/examples/`, once per test binary and only when a source
//! changed: a build makes a different component each time, so a fresh
//! ~20 s compile on its first load.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime};

use replicator::plugin::{PluginSource, Sandbox, StoragePlugin};

use super::{BIN, Cluster, cli_ok, consume_replica, converged};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// `<target>/examples/<name>.wasm`, built when missing or older than
/// `sources` (files of `examples/<name>/`), the contract it is built
/// against, or the script that pins its toolchain; then loaded once, so
/// the host's compile cache holds it before tests and node processes all
/// compile it at once on a small machine.
pub fn built(name: &str, sources: &[&str]) -> PathBuf {
    // The target directory the replicator binary was built in.
    let target = Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .expect("binary under <target>/<profile>/")
        .to_path_buf();
    let wasm = target.join("examples").join(format!("{name}.wasm"));
    let src = repo_root().join("examples").join(name);
    let mut inputs: Vec<PathBuf> = sources.iter().map(|f| src.join(f)).collect();
    inputs.push(repo_root().join("scripts").join("build-examples"));
    if let Ok(entries) = std::fs::read_dir(repo_root().join("wit")) {
        inputs.extend(entries.flatten().map(|e| e.path()));
    }
    let newest_src = inputs.iter().filter_map(|f| modified(f)).max();
    let stale = match (modified(&wasm), newest_src) {
        (Some(built), Some(src)) => built < src,
        (Some(_), None) => false,
        (None, _) => true,
    };
    if stale {
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(repo_root().join("scripts").join("build-examples"))
            .arg(name)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .expect("run scripts/build-examples");
        assert!(
            out.status.success(),
            "scripts/build-examples failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("built {} in {:?}", wasm.display(), started.elapsed());
    }
    assert!(wasm.is_file(), "{} was not built", wasm.display());
    let started = Instant::now();
    StoragePlugin::load(&PluginSource::Path(wasm.clone()), Sandbox::default())
        .unwrap_or_else(|e| panic!("{name} loads: {e}"));
    println!(
        "first load of {} (compile, or the compile cache): {:?}",
        wasm.display(),
        started.elapsed()
    );
    wasm
}
/// A 3-node cluster on the storage plugin at `wasm`: 1000 acks=all
/// messages to one partition of `topic`, every one acknowledged in order
/// and held, at its offset, by a follower.
pub fn three_nodes_replicate_on(wasm: &Path, topic: &str) {
    const N: usize = 1000;
    const SIZE: usize = 100;
    let wasm = wasm.to_str().expect("utf-8 path").to_string();
    let mut c = Cluster::init(3, &wasm, |t| t);
    c.start_all();
    c.wait_up();
    let out = cli_ok(&[
        "topic",
        "create",
        "--config",
        &c.client(),
        "--topic",
        topic,
        "--partitions",
        "1",
        "--replication-factor",
        "3",
    ]);
    assert!(out.contains(&format!("created {topic}/0")), "{out}");
    let started = Instant::now();
    let acked = cli_ok(&[
        "produce",
        "--config",
        &c.client(),
        "--topic",
        topic,
        "--acks",
        "all",
        "--count",
        &N.to_string(),
        "--size",
        &SIZE.to_string(),
    ]);
    let elapsed = started.elapsed();
    // One `<partition> <offset>` line per acknowledged message, in order.
    let offsets: Vec<u64> = acked
        .lines()
        .map(|l| {
            let (p, o) = l.split_once(' ').expect("`<partition> <offset>`");
            assert_eq!(p, "0", "{l}");
            o.parse().expect("offset")
        })
        .collect();
    assert_eq!(offsets, (0..N as u64).collect::<Vec<_>>(), "acks");
    println!(
        "produced {N} x {SIZE} B acks=all in {elapsed:?}: {:.0} msg/s",
        N as f64 / elapsed.as_secs_f64()
    );

    let status = c.wait_status("all replicas at N", |v| converged(v, topic, 0, N as u64));
    let p = super::partition(&status, topic, 0).expect("the partition");
    let leader = p["leader"].as_u64().expect("leader");
    let follower = (1..=3u32)
        .find(|&r| u64::from(r) != leader)
        .expect("a follower");
    let lines = consume_replica(&c, topic, follower, N as u64);
    assert_eq!(
        lines.len(),
        N,
        "follower {follower} holds more than was produced"
    );
    for (i, line) in lines.iter().enumerate() {
        let (offset, value) = line.split_once(' ').expect("`<offset> <value>`");
        assert_eq!(offset, i.to_string(), "{line:.40}");
        // `produce --count` values start with `m<i:010>-` (cli/client_cmds.rs).
        assert!(
            value.starts_with(&format!("m{i:010}-")),
            "follower {follower} offset {i}: {line:.40}"
        );
        assert_eq!(value.len(), SIZE, "{line:.40}");
    }
    for id in 1..=3 {
        assert!(c.stop(id), "node {id} did not stop cleanly:\n{}", c.log(id));
    }
}

/// The whole suite with `config`; a persistent plugin skips no case.
pub async fn conforms(name: &str, wasm: &Path, config: &[(&str, &str)]) {
    let size = std::fs::metadata(wasm).expect("wasm").len();
    let started = Instant::now();
    let plugin = StoragePlugin::load(&PluginSource::Path(wasm.to_path_buf()), Sandbox::default())
        .unwrap_or_else(|e| panic!("{name} loads: {e}"));
    println!(
        "{name}.wasm: {size} bytes, loaded (compiled or from cache) in {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let report = super::run_conformance(plugin, config, true).await;
    println!("{name} ({:?}):\n{report}", started.elapsed());
    assert_eq!(report.failed(), 0, "failed conformance:\n{report}");
    assert_eq!(report.skipped(), 0, "skipped cases:\n{report}");
    assert!(report.passed() >= 11, "too few cases ran:\n{report}");
}
