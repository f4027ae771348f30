//! Loading plugins: the compiled-component cache, and clear errors for
//! unknown plugins, missing files and bad settings.

use replicator::plugin::builtin;
use replicator::plugin::{PluginRuntime, PluginSource, Sandbox, StoragePlugin};
use replicator::storage::{PartitionLog, StorageError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_components_are_cached_and_bad_entries_replaced() {
    let cache = tempfile::tempdir().expect("tempdir");
    let runtime = PluginRuntime::new(Some(cache.path().to_path_buf())).expect("runtime");
    let wasm = builtin::storage("memory").expect("built-in");
    StoragePlugin::from_bytes(runtime.clone(), "memory", wasm, Sandbox::default())
        .expect("first load");
    let entries: Vec<_> = std::fs::read_dir(cache.path())
        .expect("cache dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(entries.len(), 1, "one compiled entry: {entries:?}");
    let entry = &entries[0];
    assert!(entry.extension().is_some_and(|e| e == "cwasm"));
    let compiled = std::fs::read(entry).expect("read entry");

    // A second load uses the entry as is.
    StoragePlugin::from_bytes(runtime.clone(), "memory", wasm, Sandbox::default())
        .expect("cached load");
    assert_eq!(std::fs::read(entry).expect("read"), compiled);

    // A damaged entry is discarded and rewritten; the plugin still works.
    std::fs::write(entry, b"garbage").expect("damage");
    let plugin =
        StoragePlugin::from_bytes(runtime, "memory", wasm, Sandbox::default()).expect("reload");
    assert_ne!(std::fs::read(entry).expect("read"), b"garbage");
    let log = plugin.open("t", 0, vec![], None).await.expect("open");
    assert_eq!(log.bounds().await.map(|b| b.log_end), Ok(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plugin_settings_are_clear_errors() {
    let file = StoragePlugin::load(&PluginSource::Builtin("file".into()), Sandbox::default())
        .expect("load");
    let dir = tempfile::tempdir().expect("tempdir");
    for (k, v, says) in [
        ("segment.bytes", "lots", "segment.bytes"),
        ("segment.bytes", "10", "1024"),
        ("fsync", "sometimes", "always, interval or never"),
        ("colour", "blue", "unknown setting `colour`"),
    ] {
        let err = file
            .open("t", 0, vec![(k.into(), v.into())], Some(dir.path()))
            .await
            .err()
            .unwrap_or_else(|| panic!("{k}={v} accepted"));
        match &err {
            StorageError::InvalidInput(m) => assert!(m.contains(says), "{k}={v}: {m}"),
            other => panic!("{k}={v}: expected invalid-input, got {other}"),
        }
    }
    let memory = StoragePlugin::load(&PluginSource::Builtin("memory".into()), Sandbox::default())
        .expect("load");
    let err = memory
        .open("t", 0, vec![("x".into(), "1".into())], None)
        .await
        .err();
    assert!(
        matches!(err, Some(StorageError::InvalidInput(_))),
        "{err:?}"
    );
    let unknown =
        StoragePlugin::load(&PluginSource::Builtin("nope".into()), Sandbox::default()).err();
    assert!(unknown.is_some_and(|e| e.to_string().contains("built-ins: memory, file")));
    let missing = StoragePlugin::load(
        &PluginSource::Path("/nonexistent/x.wasm".into()),
        Sandbox::default(),
    )
    .err();
    assert!(missing.is_some_and(|e| e.to_string().contains("/nonexistent/x.wasm")));
}
