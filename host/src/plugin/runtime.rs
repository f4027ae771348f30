//! The process-wide plugin runtime: one wasmtime `Engine` (component model,
//! epoch interruption, bounded wasm stack), the thread that ticks epochs,
//! and the on-disk cache of compiled components.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use super::LoadError;
use super::bindings::StoragePlugin as StorageWorld;
use super::bindings::metadata::MetadataPlugin as MetadataWorld;
use super::sandbox::{EPOCH_TICK, PluginState};

/// Wasm stack one call may use (default wasmtime: 512 KiB).
pub const MAX_WASM_STACK: usize = 1 << 20;

pub struct PluginRuntime {
    engine: Engine,
    cache_dir: Option<PathBuf>,
    storage_linker: Linker<PluginState>,
    metadata_linker: Linker<PluginState>,
}

impl PluginRuntime {
    /// A runtime whose compiled components are cached in `cache_dir`
    /// (`None`: compile every time).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Arc<Self>, LoadError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(MAX_WASM_STACK);
        config.async_stack_size(MAX_WASM_STACK + (1 << 20));
        let engine = Engine::new(&config).map_err(|e| LoadError::Engine(e.to_string()))?;
        spawn_epoch_ticker(&engine);
        let engine_error = |e: wasmtime::Error| LoadError::Engine(e.to_string());
        let mut storage_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut storage_linker).map_err(engine_error)?;
        super::wasi_file_io::shadow(&mut storage_linker).map_err(engine_error)?;
        // Storage and metadata backends may talk to a remote store (S3,
        // etcd) over HTTP, only through the sandbox's allow-list, which is
        // empty unless the node's config names an endpoint.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut storage_linker)
            .map_err(engine_error)?;
        StorageWorld::add_to_linker::<_, HasSelf<_>>(&mut storage_linker, |s| s)
            .map_err(engine_error)?;
        let mut metadata_linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut metadata_linker).map_err(engine_error)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut metadata_linker)
            .map_err(engine_error)?;
        MetadataWorld::add_to_linker::<_, HasSelf<_>>(&mut metadata_linker, |s| s)
            .map_err(engine_error)?;
        Ok(Arc::new(PluginRuntime {
            engine,
            cache_dir,
            storage_linker,
            metadata_linker,
        }))
    }

    /// The shared runtime, caching in [`default_cache_dir`].
    pub fn global() -> Result<Arc<Self>, LoadError> {
        static GLOBAL: OnceLock<Arc<PluginRuntime>> = OnceLock::new();
        if let Some(rt) = GLOBAL.get() {
            return Ok(rt.clone());
        }
        let rt = PluginRuntime::new(default_cache_dir())?;
        Ok(GLOBAL.get_or_init(|| rt).clone())
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn storage_linker(&self) -> &Linker<PluginState> {
        &self.storage_linker
    }

    pub(crate) fn metadata_linker(&self) -> &Linker<PluginState> {
        &self.metadata_linker
    }

    /// Compile `wasm` (a component), or load it from the cache. The cache
    /// key is the content hash plus wasmtime's compatibility hash, so a new
    /// wasmtime or different engine settings never load stale code.
    pub fn compile(&self, name: &str, wasm: &[u8]) -> Result<Component, LoadError> {
        check_component_header(name, wasm)?;
        let Some(path) = self.cache_path(wasm) else {
            return self.compile_fresh(name, wasm);
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        if let Some(why) = untrusted(dir).or_else(|| untrusted(&path)) {
            tracing::warn!(
                "not using the compiled-plugin cache ({why}): compiling `{name}` each time; \
                 set REPLICATOR_CACHE_DIR to a directory only this user can write"
            );
            return self.compile_fresh(name, wasm);
        }
        if path.exists() {
            // SAFETY: the file was written by `Component::serialize` of an
            // engine with the same compatibility hash (it is in the name),
            // in a directory, and as a file, that only this user can write
            // (`untrusted` above).
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(c) => {
                    // Its age is when it was last used, for `prune`.
                    let touched = std::fs::File::options()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                    if let Err(e) = touched {
                        tracing::debug!(path = %path.display(), "cache entry not touched: {e}");
                    }
                    return Ok(c);
                }
                Err(e) => tracing::warn!(path = %path.display(), "discarding bad cache entry: {e}"),
            }
        }
        let component = self.compile_fresh(name, wasm)?;
        if let Err(e) = store_cache_entry(&path, &component) {
            tracing::warn!(path = %path.display(), "could not cache compiled plugin: {e}");
        }
        prune(dir, CACHE_KEEP);
        Ok(component)
    }

    fn compile_fresh(&self, name: &str, wasm: &[u8]) -> Result<Component, LoadError> {
        Component::new(&self.engine, wasm).map_err(|e| LoadError::Compile {
            plugin: name.to_string(),
            detail: format!("{e:#}"),
        })
    }

    fn cache_path(&self, wasm: &[u8]) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let mut compat = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut compat);
        let content = Sha256::digest(wasm);
        let hex: String = content
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect();
        Some(dir.join(format!("{hex}-{:016x}.cwasm", compat.finish())))
    }
}

/// Name the usual mistakes before wasmtime does: a file that is not wasm
/// at all, and a core module where a component is needed.
fn check_component_header(name: &str, wasm: &[u8]) -> Result<(), LoadError> {
    let compile = |detail: &str| {
        Err(LoadError::Compile {
            plugin: name.to_string(),
            detail: detail.to_string(),
        })
    };
    if !wasm.starts_with(b"\0asm") || wasm.len() < 8 {
        return compile("not a wasm file (it does not start with the `\\0asm` magic)");
    }
    // Layer 0 with version 1 is a core module; components are layer 1.
    if wasm[4..8] == [1, 0, 0, 0] {
        return compile(
            "a core wasm module, not a component: build for wasm32-wasip2 (or wrap it \
             with `wasm-tools component new`)",
        );
    }
    Ok(())
}

fn store_cache_entry(path: &Path, component: &Component) -> std::io::Result<()> {
    let bytes = component
        .serialize()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, &bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Most compiled components a cache keeps (each 5-35 MB: one per plugin
/// build, engine setting and wasmtime version). Storing one more removes
/// the least recently used beyond this; nothing was ever removed, and a
/// development machine's cache had grown to 1.2 GB in 70 entries
/// (embedder run).
pub const CACHE_KEEP: usize = 16;

/// Why `path` (the cache directory or an entry) must not be loaded from,
/// if it must not. Loading a compiled component is `unsafe`: wasmtime runs
/// its machine code as it is. So only a file no other user could have
/// written counts: owned by this user, not writable by group or others,
/// in a directory that is the same. A path that does not exist yet is
/// fine (this process makes it).
#[cfg(unix)]
fn untrusted(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Some(format!(
            "{} is owned by uid {}, not this user (uid {me})",
            path.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Some(format!(
            "{} is writable by other users (mode {:o})",
            path.display(),
            m.mode() & 0o777
        ));
    }
    None
}

#[cfg(not(unix))]
fn untrusted(_: &Path) -> Option<String> {
    None
}

/// Remove the least recently used `*.cwasm` entries of `dir` beyond
/// `keep` (a hit touches its entry). Best effort: a failure is logged.
fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if found.len() <= keep {
        return;
    }
    found.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    for (_, old) in found.into_iter().skip(keep) {
        if let Err(e) = std::fs::remove_file(&old) {
            tracing::warn!(path = %old.display(), "could not remove an old cache entry: {e}");
        }
    }
}

/// `$REPLICATOR_CACHE_DIR`, else `$XDG_CACHE_HOME/replicator/components`,
/// else `~/.cache/replicator/components`; `None` if none is known. An
/// empty variable counts as unset (as the XDG spec says), not as the
/// current directory.
pub fn default_cache_dir() -> Option<PathBuf> {
    let set = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(d) = set("REPLICATOR_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    let base = set("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| set("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("replicator").join("components"))
}

/// Bump the engine's epoch every tick so deadlines fire; the thread ends
/// when the engine is gone.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("replicator-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        });
    if let Err(e) = spawned {
        tracing::error!("could not start the epoch ticker, plugin deadlines will not fire: {e}");
    }
}
