//! Loading plugins: the compiled-component cache, and clear errors for
//! unknown plugins, missing files and bad settings; versioned rejection;
//! `replicator plugin inspect`.

use replicator::plugin::builtin;
use replicator::plugin::{
    ConfigCheck, LoadError, MetadataPlugin, PluginRuntime, PluginSource, Sandbox, StoragePlugin,
    WIT_VERSION,
};
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

/// Compiled code is loaded only from a cache no other user could have
/// written (loading it runs its machine code as it is), and the cache
/// keeps the most recently used entries only (it grew without bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compiled_cache_is_trusted_only_when_private_and_stays_bounded() {
    use std::os::unix::fs::PermissionsExt;
    let cache = tempfile::tempdir().expect("tempdir");
    let wasm = builtin::storage("memory").expect("built-in");
    let load = || {
        let runtime = PluginRuntime::new(Some(cache.path().to_path_buf())).expect("runtime");
        StoragePlugin::from_bytes(runtime, "memory", wasm, Sandbox::default()).expect("load")
    };
    // Twenty older entries (other builds, other wasmtime versions).
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
    for i in 0..20 {
        let f =
            std::fs::File::create(cache.path().join(format!("old{i:02}-0.cwasm"))).expect("create");
        f.set_modified(old + std::time::Duration::from_secs(i))
            .expect("mtime");
    }
    drop(load());
    let names: Vec<String> = std::fs::read_dir(cache.path())
        .expect("cache dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), replicator::plugin::CACHE_KEEP, "{names:?}");
    let fresh: Vec<_> = names.iter().filter(|n| !n.starts_with("old")).collect();
    assert_eq!(fresh.len(), 1, "the new entry is kept: {names:?}");
    assert!(
        !names.contains(&"old00-0.cwasm".to_string()),
        "the oldest went: {names:?}"
    );
    let entry = cache.path().join(fresh[0]);

    // Writable by others: not loaded from (a damaged entry would be
    // noticed and rewritten if it were), and the plugin still loads.
    std::fs::write(&entry, b"planted").expect("plant");
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let plugin = load();
    assert_eq!(
        std::fs::read(&entry).expect("read"),
        b"planted",
        "left alone"
    );
    let log = plugin.open("t", 0, vec![], None).await.expect("open");
    assert_eq!(log.bounds().await.map(|b| b.log_end), Ok(0));
    log.close().await;
    // Private again: the damaged entry is replaced.
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    drop(load());
    assert_ne!(std::fs::read(&entry).expect("read"), b"planted");
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

/// A plugin built against another `replicator:plugin` version is refused
/// before linking, with a message naming both versions and the fix.
#[test]
fn plugin_built_for_another_wit_version_is_refused_by_version() {
    let runtime = PluginRuntime::new(None).expect("runtime");
    let err = StoragePlugin::from_bytes(
        runtime,
        "wrong",
        builtin::testing::WRONG_VERSION,
        Sandbox::default(),
    )
    .err()
    .expect("a 0.2.0 plugin must not load");
    assert!(matches!(err, LoadError::Version { .. }), "{err:?}");
    let msg = err.to_string();
    for says in [
        "replicator:plugin@0.2.0",
        &format!("this host speaks replicator:plugin@{WIT_VERSION}"),
        "rebuild it against this host's wit/",
        "replicator plugin inspect",
    ] {
        assert!(msg.contains(says), "missing `{says}` in: {msg}");
    }
}

/// The wrong kind of plugin, a component that is no plugin, and files that
/// are not components are named as such.
#[test]
fn non_plugins_are_named_clearly() {
    let runtime = PluginRuntime::new(None).expect("runtime");
    let memory = builtin::storage("memory").expect("built-in");
    let err = MetadataPlugin::from_bytes(runtime.clone(), "memory", memory, Sandbox::default())
        .err()
        .expect("a storage plugin is no metadata plugin");
    assert!(
        err.to_string()
            .contains("is a storage plugin, not a metadata plugin"),
        "{err}"
    );
    let text = StoragePlugin::from_bytes(runtime.clone(), "x", b"hello", Sandbox::default()).err();
    assert!(
        text.is_some_and(|e| e.to_string().contains("not a wasm file")),
        "plain text"
    );
    let core =
        StoragePlugin::from_bytes(runtime, "core", b"\0asm\x01\0\0\0", Sandbox::default()).err();
    assert!(
        core.is_some_and(|e| e.to_string().contains("core wasm module, not a component")),
        "core module"
    );
}

fn replicator_cli(args: &[&str]) -> (bool, String) {
    let cache = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_replicator"))
        .args(args)
        .env("REPLICATOR_CACHE_DIR", cache.path())
        .output()
        .expect("run replicator");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn plugin_inspect_reports_world_version_and_acceptance() {
    let (ok, out) = replicator_cli(&["plugin", "inspect", "file"]);
    assert!(ok, "{out}");
    for says in [
        "world     storage-plugin",
        "wit       replicator:plugin@0.1.0",
        "accepted  yes",
        "replicator:plugin/storage@0.1.0",
        "wasi:filesystem/types@0.2",
    ] {
        assert!(out.contains(says), "missing `{says}` in:\n{out}");
    }

    let (ok, out) = replicator_cli(&["plugin", "inspect", "--metadata", "etcd", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["world"], "metadata-plugin");
    assert_eq!(v["accepted"], true);
    let imports = v["imports"].as_array().expect("imports");
    assert!(
        imports.iter().any(|i| i
            .as_str()
            .is_some_and(|i| i.starts_with("wasi:http/outgoing-handler@0.2"))),
        "{imports:?}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = dir.path().join("wrong.wasm");
    std::fs::write(&wrong, builtin::testing::WRONG_VERSION).expect("write");
    let wrong = wrong.to_str().expect("utf-8 path");
    let (ok, out) = replicator_cli(&["plugin", "inspect", wrong, "--json"]);
    assert!(!ok, "a refused plugin exits non-zero:\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["world"], "storage-plugin");
    assert_eq!(v["wit_version"], "0.2.0");
    assert_eq!(v["host_wit_version"], WIT_VERSION);
    assert_eq!(v["accepted"], false);
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("replicator:plugin@0.2.0")),
        "{v}"
    );
    let (ok, out) = replicator_cli(&["plugin", "inspect", wrong]);
    assert!(!ok);
    assert!(out.contains("accepted  no: "), "{out}");

    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "not wasm").expect("write");
    let (ok, out) = replicator_cli(&["plugin", "inspect", text.to_str().expect("utf-8")]);
    assert!(!ok);
    assert!(out.contains("not a wasm file"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    let (ok, out) = replicator_cli(&["plugin", "inspect", "/nonexistent/p.wasm"]);
    assert!(!ok);
    assert!(
        out.contains("cannot read plugin /nonexistent/p.wasm"),
        "{out}"
    );
}

/// Names of this process's threads whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// Stores are tasks on the caller's runtime, the file plugin's too (their
/// writes and cached reads run inline there: `plugin/wasi_file_io.rs`),
/// unless the sandbox gives each a thread. Thread names are cut to 15
/// bytes, so topics differ in their first letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_are_tasks_unless_the_sandbox_gives_them_a_thread() {
    let data = tempfile::tempdir().expect("tempdir");
    let load = |name: &str, own_thread| {
        StoragePlugin::load(
            &PluginSource::Builtin(name.into()),
            Sandbox {
                own_thread,
                ..Sandbox::default()
            },
        )
        .expect("load")
    };
    let cases = [
        ("file", false, "x"),
        ("file", true, "y"),
        ("memory", false, "z"),
        ("memory", true, "w"),
    ];
    let mut open = Vec::new();
    for (plugin, own_thread, topic) in cases {
        let log = load(plugin, own_thread)
            .open(topic, 0, vec![], Some(&data.path().join(topic)))
            .await
            .expect("open");
        assert_eq!(log.bounds().await.map(|b| b.log_end), Ok(0));
        let prefix = format!("storage {plugin} {topic}");
        let prefix = &prefix[..prefix.len().min(15)];
        assert_eq!(
            threads_named(prefix),
            usize::from(own_thread),
            "{plugin} with own_thread {own_thread}"
        );
        open.push(log);
    }
    // Closing a threaded store ends its thread.
    for log in open {
        log.close().await;
    }
    let gone = std::time::Instant::now();
    while threads_named("storage ") > 0 {
        assert!(
            gone.elapsed() < std::time::Duration::from_secs(10),
            "store threads outlived their logs"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A node asks its storage plugin about its settings at startup: a
/// throwaway partition in a temporary directory under the data directory,
/// removed afterwards. A refusal carries the plugin's reason; a plugin
/// that reaches a remote store is not asked (its open would write there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_settings_are_checked_in_a_throwaway_partition() {
    let data = tempfile::tempdir().expect("tempdir");
    let scratch = data.path().join("node-1");
    let kv = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let load = |name: &str, sandbox| {
        StoragePlugin::load(&PluginSource::Builtin(name.into()), sandbox).expect("load")
    };
    let file = load("file", Sandbox::default());
    assert_eq!(
        file.check_config(vec![], &scratch).await,
        ConfigCheck::Accepted
    );
    assert_eq!(
        file.check_config(kv("fsync", "always"), &scratch).await,
        ConfigCheck::Accepted
    );
    match file.check_config(kv("fsync", "sometimes"), &scratch).await {
        ConfigCheck::Refused(why) => assert!(why.contains("fsync = `sometimes`"), "{why}"),
        other => panic!("fsync = sometimes: {other:?}"),
    }
    match file
        .check_config(kv("segment.bytes", "lots"), &scratch)
        .await
    {
        ConfigCheck::Refused(why) => assert!(why.contains("segment.bytes"), "{why}"),
        other => panic!("segment.bytes = lots: {other:?}"),
    }
    let memory = load("memory", Sandbox::default());
    assert_eq!(
        memory.check_config(vec![], &scratch).await,
        ConfigCheck::Accepted
    );
    assert!(matches!(
        memory.check_config(kv("colour", "blue"), &scratch).await,
        ConfigCheck::Refused(why) if why.contains("colour")
    ));
    // Nothing is left behind: the data directory is as empty as it began,
    // and a check killed halfway is cleaned up by the next.
    std::fs::create_dir_all(scratch.join(".config-check+killed/t-0")).expect("leftover");
    assert_eq!(
        file.check_config(vec![], &scratch).await,
        ConfigCheck::Accepted
    );
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .expect("scratch")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "the checks left {left:?}");
    // With an HTTP allow-list the plugin is not asked, even with a
    // setting it would refuse.
    let remote = load(
        "memory",
        Sandbox::default().allow_http(["127.0.0.1:9".to_string()]),
    );
    assert!(matches!(
        remote.check_config(kv("colour", "blue"), &scratch).await,
        ConfigCheck::Skipped(why) if why.contains("remote store")
    ));
}
