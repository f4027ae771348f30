//! Host-side bindings generated from `wit/` for the storage world.
//! Exports are async because the plugins call async WASI host functions.

wasmtime::component::bindgen!({
    world: "storage-plugin",
    path: "../wit",
    exports: { default: async },
});
