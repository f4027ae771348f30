//! Host-side bindings generated from `wit/`: the storage world here, the
//! metadata world in [`metadata`] (its own module, so the two generated
//! sets of names do not clash). Exports are async because the plugins
//! call async WASI host functions.

wasmtime::component::bindgen!({
    world: "storage-plugin",
    path: "../wit",
    exports: { default: async },
});

/// The metadata world. Its imports (`host`, `types`) are the storage
/// world's, so one `Host` implementation and one `PluginError` serve both.
pub mod metadata {
    wasmtime::component::bindgen!({
        world: "metadata-plugin",
        path: "../wit",
        exports: { default: async },
        with: {
            "replicator:plugin/host": crate::plugin::bindings::replicator::plugin::host,
            "replicator:plugin/types": crate::plugin::bindings::replicator::plugin::types,
        },
    });
}
