//! The storage conformance suite against every built-in storage plugin.

mod support;

use replicator::conformance::{self, Options, Subject};
use replicator::plugin::{PluginSource, Sandbox, StoragePlugin};

/// Run the suite; a persistent plugin must pass every case, skipping none.
async fn check(name: &str, config: &[(&str, &str)], persistent: bool) {
    let plugin = StoragePlugin::load(&PluginSource::Builtin(name.into()), Sandbox::default())
        .expect("built-in plugin loads");
    let report = support::run_conformance(plugin, config, persistent).await;
    println!("{name}:\n{report}");
    assert_eq!(report.failed(), 0, "{name} failed conformance:\n{report}");
    if persistent {
        assert_eq!(report.skipped(), 0, "{name} skipped cases:\n{report}");
    }
    assert!(report.passed() >= 9, "too few cases ran:\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_plugin_conforms() {
    check("memory", &[], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_plugin_conforms_with_small_segments() {
    // Small segments so reads, truncation and prefix deletes cross them.
    check(
        "file",
        &[("segment.bytes", "8192"), ("fsync", "never")],
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_plugin_conforms_with_defaults() {
    check("file", &[], true).await;
}

/// A batch whose CRC fails (a caller's bug, not the plugin's) is refused
/// with `invalid-input` before anything is stored, by every log the host
/// offers: the wasm plugins used to store it, and the partition then
/// faulted at its first read (the memory plugin, reinstantiated, lost the
/// good batch before it too). The log is unchanged and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_crc_fails_is_refused_and_the_log_goes_on() {
    use bytes::Bytes;
    use replicator::batch::{Record, encode};
    use replicator::storage::{PartitionLog, StorageError};

    let batch = |base: u64| {
        let r = Record {
            value: Bytes::from(vec![7u8; 64]),
            ..Default::default()
        };
        encode(base, 1, &[r]).expect("encode")
    };
    let mut bad = batch(1).to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1; // a payload byte: the CRC no longer matches
    let bad = Bytes::from(bad);

    async fn exercise(name: &str, log: &impl PartitionLog, good: [Bytes; 2], bad: Bytes) {
        assert_eq!(log.append(good[0].clone()).await, Ok(1), "{name}");
        match log.append(bad).await {
            Err(StorageError::InvalidInput(m)) => assert!(m.contains("CRC"), "{name}: {m}"),
            other => panic!("{name}: a bad CRC gave {other:?}"),
        }
        assert_eq!(log.bounds().await.map(|b| b.log_end), Ok(1), "{name}");
        assert!(log.read(0, 1 << 20).await.is_ok(), "{name}: still readable");
        assert_eq!(log.append(good[1].clone()).await, Ok(2), "{name}: goes on");
    }

    let scratch = tempfile::tempdir().expect("tempdir");
    for name in ["memory", "file"] {
        let plugin = StoragePlugin::load(&PluginSource::Builtin(name.into()), Sandbox::default())
            .expect("built-in plugin loads");
        let dir = scratch.path().join(name);
        let log = plugin
            .open("t", 0, Vec::new(), Some(&dir))
            .await
            .expect("open");
        exercise(name, &log, [batch(0), batch(1)], bad.clone()).await;
        log.close().await;
    }
    let native = replicator::storage::memory::MemoryLog::new();
    exercise("native", &native, [batch(0), batch(1)], bad).await;
}

/// With `--persistent` (`Subject::persistent(true)`) a plugin that keeps
/// nothing fails the cases that reopen its log; `reopen-keeps-everything`
/// skipped instead, as if it had not been asked to keep anything
/// (exploratory run). (`torn-tail-recovery` skips for another reason: it
/// can only tear a plugin that stores batches as written, in files.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_must_persist_and_keeps_nothing_fails_every_persistence_case() {
    let plugin = StoragePlugin::load(&PluginSource::Builtin("memory".into()), Sandbox::default())
        .expect("built-in plugin loads");
    let scratch = tempfile::tempdir().expect("tempdir");
    let options = Options {
        proptest_cases: 4,
        filter: None,
    };
    let subject = Subject::new(plugin, Vec::new()).persistent(true);
    let report = conformance::run(&subject, scratch.path(), &options, |_| {}).await;
    let text = report.to_string();
    assert!(
        !text.contains("keeps nothing across instances"),
        "no case may skip for keeping nothing:\n{report}"
    );
    for case in ["reopen-keeps-everything", "model-based"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("FAIL") && l.contains(case)),
            "{case} must fail:\n{report}"
        );
    }
}
