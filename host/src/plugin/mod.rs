//! The wasm plugin host: loads storage backends as sandboxed components
//! and serves each partition's log from its own instance; loads metadata
//! backends the same way ([`MetadataPlugin`], one instance per connection).
//!
//! One `Store` per partition, owned by one task ([`PluginLog`]): on the
//! node's runtime, or on the partition's own thread where the sandbox
//! asks for one (`Sandbox::own_thread`). Every store runs under
//! the [`Sandbox`] limits, and a running guest yields to its runtime at
//! every epoch tick. A trap, blown deadline or
//! contract violation drops the instance: the partition answers
//! [`StorageError::Fault`](crate::storage::StorageError::Fault) until
//! `recover()` re-instantiates it and re-reads its state. Other partitions
//! are untouched.

mod bindings;
pub mod builtin;
mod config_check;
mod http_pool;
mod inspect;
mod log;
mod metadata;
mod runtime;
mod sandbox;
mod wasi_file_io;
mod write_behind;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use wasmtime::component::Component;

pub use config_check::ConfigCheck;
pub use inspect::{Inspection, PluginKind, inspect};
pub use log::PluginLog;
pub use metadata::{MetadataPlugin, PluginMetadata};
pub use runtime::{CACHE_KEEP, MAX_WASM_STACK, PluginRuntime, default_cache_dir};
pub use sandbox::{EPOCH_TICK, Sandbox};
pub use wasi_file_io::{INLINE_WRITE_MAX, SLOW_WRITE_LOG, slow_plugin_writes};
#[doc(hidden)]
pub use wasi_file_io::{fail_syncs_under, write_on_the_pool_for};

use bindings::StoragePluginPre;
use sandbox::PluginState;

/// The WIT package every plugin interface lives in (`wit/worlds.wit`).
pub const WIT_PACKAGE: &str = "replicator:plugin";
/// The version of [`WIT_PACKAGE`] this host speaks. Keep in step with the
/// `package` line of `wit/worlds.wit`.
pub const WIT_VERSION: &str = "0.1.0";

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "unknown built-in plugin `{name}`; built-ins: {known}; or give a path to a .wasm component"
    )]
    UnknownBuiltin { name: String, known: String },
    #[error("cannot read plugin {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("plugin `{plugin}` is not a valid wasm component for this host: {detail}")]
    Compile { plugin: String, detail: String },
    #[error(
        "plugin `{plugin}` was built for {WIT_PACKAGE}@{built_for}; this host speaks \
         {WIT_PACKAGE}@{WIT_VERSION} — rebuild it against this host's wit/ \
         (`replicator plugin inspect` on the file shows what it targets)"
    )]
    Version {
        plugin: String,
        /// The version of `replicator:plugin` the component names.
        built_for: String,
    },
    #[error(
        "plugin `{plugin}` is not a Replicator storage/metadata plugin: it exports {exports} \
         (a plugin exports {WIT_PACKAGE}/storage@{WIT_VERSION} or {WIT_PACKAGE}/metadata@{WIT_VERSION})"
    )]
    NotAPlugin {
        plugin: String,
        /// The component's exports, comma separated (or `nothing`).
        exports: String,
    },
    #[error("plugin `{plugin}` is a {found}, not a {expected}; load it as one")]
    WrongKind {
        plugin: String,
        /// `storage plugin` or `metadata plugin`: what was asked for.
        expected: &'static str,
        /// What the component exports.
        found: &'static str,
    },
    #[error(
        "plugin `{plugin}` does not fit the {world} world of wit/ ({WIT_PACKAGE}@{WIT_VERSION}): {detail}; a plugin built against an older wit/ lacks what was added since (e.g. storage's `reset`, metadata's `claim-cluster-id` or `read-partitions`): rebuild it against this host's wit/ (`replicator plugin inspect` lists what it exports)"
    )]
    Link {
        plugin: String,
        /// `storage-plugin` or `metadata-plugin`.
        world: &'static str,
        detail: String,
    },
    #[error("wasm engine: {0}")]
    Engine(String),
}

/// Where a plugin comes from: a built-in name or a `.wasm` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    Builtin(String),
    Path(PathBuf),
}

impl FromStr for PluginSource {
    type Err = std::convert::Infallible;

    /// A name with a path separator or a `.wasm` ending is a path;
    /// anything else names a built-in.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains('/') || s.ends_with(".wasm") {
            Ok(PluginSource::Path(PathBuf::from(s)))
        } else {
            Ok(PluginSource::Builtin(s.to_string()))
        }
    }
}

impl std::fmt::Display for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginSource::Builtin(n) => write!(f, "{n}"),
            PluginSource::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A compiled, linked storage plugin, ready to open partitions.
#[derive(Clone)]
pub struct StoragePlugin {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    runtime: Arc<PluginRuntime>,
    pre: StoragePluginPre<PluginState>,
    sandbox: Sandbox,
}

impl StoragePlugin {
    /// Load from a built-in name or a path, with the shared runtime.
    pub fn load(source: &PluginSource, sandbox: Sandbox) -> Result<Self, LoadError> {
        Self::load_with(PluginRuntime::global()?, source, sandbox)
    }

    pub fn load_with(
        runtime: Arc<PluginRuntime>,
        source: &PluginSource,
        mut sandbox: Sandbox,
    ) -> Result<Self, LoadError> {
        let (name, wasm) = plugin_bytes(source, builtin::STORAGE)?;
        if sandbox.write_behind.is_none() {
            let builtin_period = match source {
                PluginSource::Builtin(n) => builtin::STORAGE_WRITE_BEHIND
                    .iter()
                    .find(|(name, _)| name == n)
                    .map(|(_, period)| *period),
                PluginSource::Path(_) => None,
            };
            sandbox.write_behind = Some(builtin_period.unwrap_or_default());
        }
        Self::from_bytes(runtime, &name, &wasm, sandbox)
    }

    /// Load a component from its bytes under a display name.
    pub fn from_bytes(
        runtime: Arc<PluginRuntime>,
        name: &str,
        wasm: &[u8],
        sandbox: Sandbox,
    ) -> Result<Self, LoadError> {
        let pre = prepare(
            &runtime,
            name,
            wasm,
            "storage-plugin",
            runtime.storage_linker(),
            StoragePluginPre::new,
        )?;
        Ok(StoragePlugin {
            inner: Arc::new(Inner {
                name: name.to_string(),
                runtime,
                pre,
                sandbox,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.inner.sandbox
    }

    /// Open the log of `topic`/`partition` in its own instance, with
    /// `data_dir` (created if missing) as the only directory it can see.
    /// Must be called inside a tokio runtime.
    pub async fn open(
        &self,
        topic: &str,
        partition: u32,
        config: Vec<(String, String)>,
        data_dir: Option<&Path>,
    ) -> Result<PluginLog, crate::storage::StorageError> {
        if let Some(dir) = data_dir {
            crate::durable_dir::create_dir_all(dir).map_err(|e| {
                crate::storage::StorageError::Io(format!("create {}: {e}", dir.display()))
            })?;
        }
        PluginLog::spawn(
            self.clone(),
            log::OpenSpec {
                topic: topic.to_string(),
                partition,
                config,
                data_dir: data_dir.map(Path::to_path_buf),
            },
        )
        .await
    }
}

/// Compile `wasm` and pre-instantiate it against `linker`, which provides
/// the imports of `world`; `make` checks its exports.
fn prepare<P>(
    runtime: &PluginRuntime,
    name: &str,
    wasm: &[u8],
    world: &'static str,
    linker: &wasmtime::component::Linker<PluginState>,
    make: impl FnOnce(wasmtime::component::InstancePre<PluginState>) -> wasmtime::Result<P>,
) -> Result<P, LoadError> {
    let component: Component = runtime.compile(name, wasm)?;
    link(runtime, name, &component, world, linker, make)
}

/// Check that `component` targets `world` at this host's WIT version, then
/// pre-instantiate it against `linker`; `make` checks its exports.
fn link<P>(
    runtime: &PluginRuntime,
    name: &str,
    component: &Component,
    world: &'static str,
    linker: &wasmtime::component::Linker<PluginState>,
    make: impl FnOnce(wasmtime::component::InstancePre<PluginState>) -> wasmtime::Result<P>,
) -> Result<P, LoadError> {
    let targets = inspect::Targets::of(runtime.engine(), component);
    targets.check(name, world)?;
    let link = |e: wasmtime::Error| LoadError::Link {
        plugin: name.to_string(),
        world,
        detail: format!("{e:#}"),
    };
    let instance_pre = linker.instantiate_pre(component).map_err(link)?;
    make(instance_pre).map_err(link)
}

/// The display name and component bytes of `source`, a built-in from
/// `builtins` or a file.
fn plugin_bytes(
    source: &PluginSource,
    builtins: &'static [(&'static str, &'static [u8])],
) -> Result<(String, std::borrow::Cow<'static, [u8]>), LoadError> {
    match source {
        PluginSource::Builtin(name) => {
            let wasm = builtins
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| *b)
                .ok_or_else(|| LoadError::UnknownBuiltin {
                    name: name.clone(),
                    known: builtins
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            Ok((name.clone(), wasm.into()))
        }
        PluginSource::Path(path) => {
            let wasm = std::fs::read(path).map_err(|error| LoadError::Read {
                path: path.clone(),
                error,
            })?;
            Ok((plugin_name(path), wasm.into()))
        }
    }
}

fn plugin_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
