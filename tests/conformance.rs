//! The storage conformance suite against every built-in storage plugin.

mod support;

use replicator::conformance::{self, Options, Subject};
use replicator::plugin::{PluginSource, Sandbox, StoragePlugin};

/// Run the suite; a persistent plugin must pass every case, skipping none.
async fn check(name: &str, config: &[(&str, &str)], persistent: bool) {
    let plugin = StoragePlugin::load(&PluginSource::Builtin(name.into()), Sandbox::default())
        .expect("built-in plugin loads");
    let config = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let scratch = tempfile::tempdir().expect("tempdir");
    let options = Options {
        proptest_cases: support::proptest_cases(),
        filter: None,
    };
    let subject = Subject::new(plugin, config).persistent(persistent);
    let report = conformance::run(&subject, scratch.path(), &options, |_| {}).await;
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
