//! The storage plugin written in Python (examples/storage-python, built with
//! componentize-py by scripts/build-examples): the whole storage
//! conformance suite, persistence included, and a 3-node cluster on it.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use replicator::batch::{self, Record};
use replicator::conformance::{self, Options, Subject};
use replicator::plugin::{PluginLog, PluginSource, Sandbox, StoragePlugin};
use replicator::storage::{OffsetBounds, PartitionLog};
use support::{BIN, Cluster, cli_ok, consume_replica, converged};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// `<target>/examples/storage-python.wasm`, built by scripts/build-examples
/// when missing or older than its sources. A build makes a different
/// component each time (so a fresh ~20 s compile on first load): skip it
/// when nothing changed. Built (and compiled) once per test binary.
fn python_wasm() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        // The target directory the replicator binary was built in.
        let target = Path::new(BIN)
            .parent()
            .and_then(Path::parent)
            .expect("binary under <target>/<profile>/")
            .to_path_buf();
        let wasm = target.join("examples").join("storage-python.wasm");
        let src = repo_root().join("examples").join("storage-python");
        // Its sources, the contract it is built against, and the script
        // that pins the componentize-py version.
        let wit = repo_root().join("wit");
        let mut inputs: Vec<PathBuf> = ["app.py", "storage.py", "build.sh"]
            .iter()
            .map(|f| src.join(f))
            .collect();
        inputs.push(repo_root().join("scripts").join("build-examples"));
        if let Ok(entries) = std::fs::read_dir(&wit) {
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
        // Compile once here (the host caches the result on disk) so the
        // tests and the cluster's node processes do not all compile the
        // ~36 MB component at once on a small machine.
        let started = Instant::now();
        StoragePlugin::load(&PluginSource::Path(wasm.clone()), Sandbox::default())
            .expect("the Python plugin loads");
        println!(
            "first load of {} (compile, or the compile cache): {:?}",
            wasm.display(),
            started.elapsed()
        );
        wasm
    })
}

/// The whole suite with `config`; a persistent plugin skips no case.
async fn conforms(config: &[(&str, &str)]) {
    let wasm = python_wasm();
    let size = std::fs::metadata(wasm).expect("wasm").len();
    let started = Instant::now();
    let plugin = StoragePlugin::load(&PluginSource::Path(wasm.to_path_buf()), Sandbox::default())
        .expect("the Python plugin loads");
    println!(
        "storage-python.wasm: {size} bytes, loaded (compiled or from cache) in {:?}",
        started.elapsed()
    );
    let config = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let scratch = tempfile::tempdir().expect("tempdir");
    let options = Options {
        proptest_cases: support::proptest_cases(),
        filter: None,
    };
    let subject = Subject::new(plugin, config).persistent(true);
    let started = Instant::now();
    let report = conformance::run(&subject, scratch.path(), &options, |_| {}).await;
    println!("storage-python ({:?}):\n{report}", started.elapsed());
    assert_eq!(report.failed(), 0, "failed conformance:\n{report}");
    assert_eq!(report.skipped(), 0, "skipped cases:\n{report}");
    assert!(report.passed() >= 11, "too few cases ran:\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_plugin_conforms_persistently() {
    conforms(&[]).await;
}

/// `compact.bytes = 0` rewrites the log file on nearly every prefix delete,
/// so the random sequences exercise compaction (and reopening after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_plugin_conforms_while_compacting_eagerly() {
    conforms(&[("compact.bytes", "0"), ("fsync", "never")]).await;
}

async fn open(dir: &Path) -> PluginLog {
    StoragePlugin::load(
        &PluginSource::Path(python_wasm().to_path_buf()),
        Sandbox::default(),
    )
    .expect("load")
    .open("t", 0, Vec::new(), Some(dir))
    .await
    .expect("open")
}

/// Appends batches `0..n`, one 500-byte record each; returns them.
async fn fill(log: &PluginLog, n: u64) -> Vec<Bytes> {
    let mut out = Vec::new();
    for i in 0..n {
        let r = Record {
            value: Bytes::from(vec![i as u8; 500]),
            ..Default::default()
        };
        let b = batch::encode(i, 1, &[r]).expect("encode");
        log.append(b.clone()).await.expect("append");
        out.push(b);
    }
    out
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_reset_is_finished_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path()).await;
    fill(&log, 20).await;
    log.close().await;
    // delete-prefix(500) checkpoints the new start first; crash before the
    // old log file was replaced.
    std::fs::write(dir.path().join("log-start"), "500\n").expect("write checkpoint");
    let log = open(dir.path()).await;
    assert_eq!(
        log.bounds().await,
        Ok(OffsetBounds {
            log_start: 500,
            log_end: 500
        }),
        "the old offsets must not be handed out again"
    );
    let files = log_files(dir.path());
    assert_eq!(files.len(), 1, "old log removed: {files:?}");
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_compaction_keeps_the_new_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path()).await;
    let batches = fill(&log, 20).await;
    log.close().await;
    // Compaction after delete-prefix(10): the new file (named by its first
    // offset) was renamed in place, then the crash came before the old one
    // was removed.
    let tail: Vec<u8> = batches[10..].iter().flat_map(|b| b.to_vec()).collect();
    std::fs::write(dir.path().join(format!("{:020}.log", 10)), tail).expect("write");
    std::fs::write(dir.path().join("log-start"), "10\n").expect("write checkpoint");
    let log = open(dir.path()).await;
    assert_eq!(
        log.bounds().await,
        Ok(OffsetBounds {
            log_start: 10,
            log_end: 20
        })
    );
    let files = log_files(dir.path());
    assert_eq!(
        files,
        vec![dir.path().join(format!("{:020}.log", 10))],
        "the older file is a leftover"
    );
    let r = log.read(10, 1).await.expect("read");
    assert_eq!(r, batches[10], "the first batch after the cut");
    let r = log.read(19, 1 << 20).await.expect("read");
    assert_eq!(r, batches[19], "the last batch");
    log.close().await;
}

#[test]
fn three_nodes_replicate_on_the_python_plugin() {
    const N: usize = 1000;
    const SIZE: usize = 100;
    let wasm = python_wasm().to_str().expect("utf-8 path").to_string();
    let mut c = Cluster::init(3, &wasm, |t| t);
    c.start_all();
    c.wait_up();
    let out = cli_ok(&[
        "topic",
        "create",
        "--config",
        &c.client(),
        "--topic",
        "py",
        "--partitions",
        "1",
        "--replication-factor",
        "3",
    ]);
    assert!(out.contains("created py/0"), "{out}");
    let started = Instant::now();
    let acked = cli_ok(&[
        "produce",
        "--config",
        &c.client(),
        "--topic",
        "py",
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

    let status = c.wait_status("all replicas at N", |v| converged(v, "py", 0, N as u64));
    let p = support::partition(&status, "py", 0).expect("partition py/0");
    let leader = p["leader"].as_u64().expect("leader");
    let follower = (1..=3u32)
        .find(|&r| u64::from(r) != leader)
        .expect("a follower");
    let lines = consume_replica(&c, "py", follower, N as u64);
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
