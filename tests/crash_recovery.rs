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

/// With `fsync=always` an append is acknowledged only once it would
/// survive a power loss, and for the first append into a new segment that
/// takes the directory holding the segment's name, too; a new partition
/// directory needs its parent's. Watched with strace: after the first
/// data sync of every new segment, the directory is synced before that
/// segment's next data sync (without it, a power loss could drop the
/// segment's name and every acknowledged batch in it), and the partition
/// directory's parent is synced before the first segment is made.
#[test]
fn new_segments_and_partition_directories_are_synced_into_their_parents() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // strace names descriptors by their resolved path.
    let root = std::fs::canonicalize(tmp.path()).expect("canonical temp dir");
    let dir = root.join("d");
    let part = dir.join("demo-0");
    let trace = root.join("trace");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-y", "-e"])
        .arg("trace=openat,openat2,fsync,fdatasync")
        .arg("-o")
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_replicator"))
        .args(["storage-demo", "--messages", "3000", "--size", "1024"])
        .args(["--batch", "10", "--config", "fsync=always"])
        .args(["--config", "segment.bytes=1048576", "--dir"])
        .arg(&dir)
        .output()
        .expect("strace is not installed: run scripts/setup (it installs strace)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace = std::fs::read_to_string(&trace).expect("trace");
    let lines: Vec<&str> = trace.lines().collect();
    // A call another thread's interrupts ends `<unfinished ...>`, not `)`:
    // match up to the path's end only.
    let dir_sync = |of: &std::path::Path, l: &str| {
        l.contains("fsync(") && l.contains(&format!("<{}>", of.display()))
    };
    // Segment creations: `openat...("…N.log", …O_CREAT…) = FD</…/N.log>`.
    let created: Vec<(usize, String)> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("O_CREAT") && l.contains(".log\""))
        .filter_map(|(i, l)| {
            let (_, ret) = l.rsplit_once(" = ")?;
            Some((i, format!("fdatasync({}", ret.trim_end())))
        })
        .collect();
    assert!(
        created.len() >= 3,
        "expected 3 MB in 1 MiB segments: {created:?}"
    );
    let parent_synced = lines[..created[0].0].iter().any(|l| dir_sync(&dir, l));
    assert!(
        parent_synced,
        "{} was not synced into its parent",
        part.display()
    );
    for (at, data_sync) in &created {
        let first = lines[*at..]
            .iter()
            .position(|l| l.contains(data_sync.as_str()))
            .map(|p| at + p)
            .unwrap_or_else(|| panic!("no data sync of a new segment: {data_sync}"));
        let next = lines[first + 1..]
            .iter()
            .find(|l| l.contains(data_sync.as_str()) || dir_sync(&part, l));
        assert!(
            next.is_some_and(|l| dir_sync(&part, l)),
            "after the first {data_sync}, the next sync was {next:?}, not the directory's"
        );
    }
}
