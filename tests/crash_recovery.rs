//! A real process killed with SIGKILL while it appends through the file
//! plugin: on reopen the log must be whole batches with valid CRCs and
//! contiguous offsets, every message intact, and appending must continue.
//! Repeated over several kills of the same directory.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use replicator::batch;
use replicator::plugin::{PluginSource, Sandbox, StoragePlugin};
use replicator::storage::PartitionLog;

/// The demo's payload for `offset` (see `host/src/cli/demo.rs`).
fn payload(offset: u64, size: usize) -> Vec<u8> {
    let seed = offset.to_le_bytes();
    (0..size).map(|i| seed[i % 8] ^ (i as u8)).collect()
}

fn segment_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_appends_recovers_every_whole_batch() {
    let root = tempfile::tempdir().expect("tempdir");
    let part = root.path().join("demo-0");
    let plugin = StoragePlugin::load(&PluginSource::Builtin("file".into()), Sandbox::default())
        .expect("load");
    let mut previous_end = 0u64;
    for round in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_replicator"))
            .args([
                "storage-demo",
                "--messages",
                "100000000",
                "--size",
                "700",
                "--batch",
                "7",
            ])
            .args([
                "--config",
                "fsync=never",
                "--config",
                "segment.bytes=1048576",
            ])
            .arg("--dir")
            .arg(root.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the demo");
        // The demo names its data directory once the log is open.
        let stdout = child.stdout.take().expect("stdout");
        let mut first = String::new();
        BufReader::new(stdout).read_line(&mut first).expect("read");
        assert!(first.contains("data in"), "unexpected first line: {first}");
        // Kill once it has written a few more MB than the last round left.
        let target = segment_bytes(&part) + 3 * 1024 * 1024;
        let deadline = Instant::now() + Duration::from_secs(60);
        while segment_bytes(&part) < target {
            assert!(
                Instant::now() < deadline,
                "the demo wrote too little in 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");

        let log = plugin
            .open(
                "storage-demo",
                0,
                vec![("segment.bytes".into(), "1048576".into())],
                Some(&part),
            )
            .await
            .expect("reopen after SIGKILL");
        let bounds = log.bounds().await.expect("bounds");
        assert!(
            bounds.log_end > previous_end,
            "round {round}: the log did not grow ({bounds:?})"
        );
        // The host checks CRCs and contiguity of every read; decode checks records.
        let mut at = 0u64;
        while at < bounds.log_end {
            let chunk = log.read(at, 1 << 20).await.expect("read");
            for r in batch::decode(&chunk).expect("decode") {
                if r.offset < at {
                    continue;
                }
                assert_eq!(r.offset, at, "round {round}: offsets skip");
                assert_eq!(
                    &r.record.value[..],
                    &payload(at, 700)[..],
                    "round {round}: message {at} changed"
                );
                at += 1;
            }
        }
        assert_eq!(at, bounds.log_end);
        previous_end = bounds.log_end;
        log.close().await;
    }
}
