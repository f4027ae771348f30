//! The plugins compiled into the binary by `host/build.rs`, by name.

/// (name, wasm component bytes) of every built-in storage plugin.
pub const STORAGE: &[(&str, &[u8])] = &[
    (
        "memory",
        include_bytes!(env!("REPLICATOR_WASM_STORAGE_MEMORY")),
    ),
    ("file", include_bytes!(env!("REPLICATOR_WASM_STORAGE_FILE"))),
    ("s3", include_bytes!(env!("REPLICATOR_WASM_STORAGE_S3"))),
];

/// Built-in storage plugins that keep their log in files, and how often
/// the host syncs what they changed unless the sandbox says otherwise
/// (see `Sandbox::write_behind`).
pub const STORAGE_WRITE_BEHIND: &[(&str, std::time::Duration)] =
    &[("file", std::time::Duration::from_millis(50))];

/// (name, wasm component bytes) of every built-in metadata plugin.
pub const METADATA: &[(&str, &[u8])] = &[
    (
        "file",
        include_bytes!(env!("REPLICATOR_WASM_METADATA_FILE")),
    ),
    (
        "etcd",
        include_bytes!(env!("REPLICATOR_WASM_METADATA_ETCD")),
    ),
];

/// Test-only plugins; not meant for users.
#[doc(hidden)]
pub mod testing {
    /// A storage plugin that misbehaves on purpose: see `plugins/test-hostile`.
    pub const HOSTILE: &[u8] = include_bytes!(env!("REPLICATOR_WASM_TEST_HOSTILE"));
    /// A storage plugin built against `replicator:plugin@0.2.0`, which this
    /// host does not speak: see `plugins/test-wrong-version`.
    pub const WRONG_VERSION: &[u8] = include_bytes!(env!("REPLICATOR_WASM_TEST_WRONG_VERSION"));
}

pub fn storage(name: &str) -> Option<&'static [u8]> {
    STORAGE.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

pub fn metadata(name: &str) -> Option<&'static [u8]> {
    METADATA.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}
