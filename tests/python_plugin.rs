//! The storage plugin written in Python (examples/storage-python, built with
//! componentize-py by scripts/build-examples): the whole storage
//! conformance suite, persistence included, and a 3-node cluster on it.

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bytes::Bytes;
use replicator::batch::{self, Record};
use replicator::plugin::{PluginLog, PluginSource, Sandbox, StoragePlugin};
use replicator::storage::{OffsetBounds, PartitionLog};

/// `<target>/examples/storage-python.wasm` (see `support::examples`).
fn python_wasm() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        support::examples::built("storage-python", &["app.py", "storage.py", "build.sh"])
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_plugin_conforms_persistently() {
    support::examples::conforms("storage-python", python_wasm(), &[]).await;
}

/// `compact.bytes = 0` rewrites the log file on nearly every prefix delete,
/// so the random sequences exercise compaction (and reopening after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_plugin_conforms_while_compacting_eagerly() {
    support::examples::conforms(
        "storage-python",
        python_wasm(),
        &[("compact.bytes", "0"), ("fsync", "never")],
    )
    .await;
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
    support::examples::three_nodes_replicate_on(python_wasm(), "py");
}
