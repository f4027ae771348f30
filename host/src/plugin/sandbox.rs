//! Limits every plugin store runs under, and the store data they guard:
//! WASI state, memory limits, and the wasi:http state with its allow-list
//! of authorities.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::{FsPerms, ResourceTable, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

use super::bindings::replicator::plugin::{host, types};

/// Where a plugin sees the one directory it may use.
pub(crate) const GUEST_DIR: &str = "/data";

/// Resource limits for plugin instances. The defaults suit a partition
/// replica; raise them for plugins that legitimately need more.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// Wall-clock budget of one call (append, read, ...). Enforced by epoch
    /// interruption inside wasm, by a timeout around async host calls, and
    /// by the caller, who stops waiting after twice this (queueing
    /// included) even if a host call is blocked in the kernel.
    pub call_deadline: Duration,
    /// Budget of `open`, which may recover a large log.
    pub open_deadline: Duration,
    /// Linear memory one instance may grow to.
    pub memory_bytes: usize,
    /// Most tables and table elements an instance may create.
    pub table_elements: usize,
    /// `host:port` authorities the plugin may send HTTP requests to.
    /// Empty, the default, allows nothing.
    pub http_allow: Vec<String>,
    /// Environment variables the plugin sees (none by default), e.g. an
    /// object store's credentials.
    pub env: Vec<(String, String)>,
    /// Give each partition's store its own OS thread, where
    /// all of its WASI file I/O runs inline, instead of a task on the
    /// node's runtime (the default). On the runtime, writes and reads the
    /// page cache can answer run inline too, and what may wait for the disk
    /// (opens, syncs, truncations, uncached reads) goes to tokio's blocking
    /// pool, as do writes for a second after a slow one, so the disk does
    /// not hold a worker (see `wasi_file_io.rs`). A thread
    /// saves those hops, for a thread per partition and a hop to it per
    /// call. Metadata connections always get a thread of their own (see
    /// `MetadataPlugin::connect`): there are few, and each reads many small
    /// files.
    pub own_thread: bool,
    /// Storage only: while a partition is appended to, sync the files its
    /// plugin changed under its data directory this often, on a host
    /// thread, so that the plugin's own fsync finds little left to write
    /// (see `write_behind.rs`). `Duration::ZERO` turns it off; `None` lets
    /// the plugin decide: 50 ms for the built-in `file` plugin, off for
    /// the others.
    pub write_behind: Option<Duration>,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            call_deadline: Duration::from_secs(10),
            open_deadline: Duration::from_secs(120),
            memory_bytes: 1 << 30,
            table_elements: 100_000,
            http_allow: Vec::new(),
            env: Vec::new(),
            own_thread: false,
            write_behind: None,
        }
    }
}

/// Run `serve` (a store's task) on an OS thread of its own named `name`,
/// on a current-thread runtime, where the store's WASI file I/O runs
/// inline. The runtime is built on the thread: one dropped in the caller's
/// async context, had the spawn failed, would panic. A runtime that cannot
/// be built is logged and drops `serve`, which its caller sees as the task
/// ending.
pub(crate) fn spawn_own_thread(
    name: String,
    label: Arc<str>,
    serve: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(serve),
                Err(e) => tracing::error!(plugin = %label, "starting the thread's runtime: {e}"),
            }
        })
        .map(|_| ())
}

/// How often the ticker thread bumps the engine's epoch: the longest a
/// guest runs before it yields to the runtime (and before an expired
/// deadline is noticed).
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

impl Sandbox {
    /// This sandbox, also allowing HTTP requests to `authorities`
    /// (`host:port`).
    pub fn allow_http(mut self, authorities: impl IntoIterator<Item = String>) -> Self {
        self.http_allow.extend(authorities);
        self
    }

    /// This sandbox, also passing `vars` to the plugin's environment.
    pub fn with_env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env.extend(vars);
        self
    }

    pub(crate) fn limits(&self) -> StoreLimits {
        StoreLimitsBuilder::new()
            .memory_size(self.memory_bytes)
            .table_elements(self.table_elements)
            .instances(16)
            .tables(64)
            .memories(16)
            .trap_on_grow_failure(true)
            .build()
    }
}

/// Data of one plugin store: WASI state (only the partition's directory,
/// no sockets, only the sandbox's environment variables), wasi:http state (used only where the
/// linker provides wasi:http) and the limits.
pub(crate) struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    http_guard: HttpGuard,
    pub(crate) limits: StoreLimits,
    /// "plugin topic/partition", for logs.
    label: Arc<str>,
    /// When the current call's budget runs out (see [`PluginState::arm`]).
    call_ends: Instant,
    /// The store has a thread of its own, so any file I/O may block it
    /// (see `Sandbox::own_thread` and `wasi_file_io.rs`).
    inline_io: bool,
    /// The host directory the plugin sees as its own, if any.
    data_dir: Option<PathBuf>,
}

impl PluginState {
    /// A store for one plugin instance under `sandbox`: its memory limits
    /// and a call budget of `deadline` (callers re-arm it per call).
    ///
    /// Stores run as tasks on the node's runtime (unless on their own
    /// thread), so a guest must not keep a worker: at every epoch tick a
    /// running guest yields to the runtime (other partitions and the
    /// network go on) and resumes, until its call's wall-clock budget is
    /// spent, when it traps with `Trap::Interrupt`. The callback runs once
    /// per tick a call spans, so a short call costs nothing extra.
    pub(crate) fn store(
        engine: &wasmtime::Engine,
        sandbox: &Sandbox,
        data_dir: Option<&PathBuf>,
        label: Arc<str>,
        deadline: Duration,
    ) -> wasmtime::Result<wasmtime::Store<PluginState>> {
        let state = PluginState::new(sandbox, data_dir, label)?;
        let mut store = wasmtime::Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|ctx| {
            Ok(if Instant::now() >= ctx.data().call_ends {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        Self::arm(&mut store, deadline);
        Ok(store)
    }

    /// Give the next call on `store` a fresh budget of `deadline`.
    pub(crate) fn arm(store: &mut wasmtime::Store<PluginState>, deadline: Duration) {
        store.data_mut().call_ends = Instant::now() + deadline;
        store.set_epoch_deadline(1);
    }

    pub(crate) fn new(
        sandbox: &Sandbox,
        data_dir: Option<&PathBuf>,
        label: Arc<str>,
    ) -> wasmtime::Result<Self> {
        let mut b = WasiCtxBuilder::new();
        // Panic messages reach the operator; stdout stays closed.
        b.inherit_stderr();
        // A store that is a task on the node's runtime sends file I/O that
        // may wait for the disk to tokio's blocking pool, so an fsync or a
        // slow disk does not hold a worker that serves the network and the
        // other partitions (writes and cached reads stay inline, and
        // writes leave for the pool after a slow one: see
        // `wasi_file_io.rs`). A store on its own thread does it all
        // inline: only that partition waits, and no call pays a hop.
        let inline_io = sandbox.own_thread;
        b.allow_blocking_current_thread(inline_io);
        // No sockets: these are wasmtime-wasi's defaults, stated here so a
        // change of defaults cannot open them. Backends that need an
        // endpoint (etcd, S3) get wasi:http through the allow-list.
        b.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (k, v) in &sandbox.env {
            b.env(k, v);
        }
        if let Some(dir) = data_dir {
            b.preopened_dir(dir, GUEST_DIR, FsPerms::ReadWrite)?;
        }
        Ok(PluginState {
            wasi: b.build(),
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            http_guard: HttpGuard {
                allow: sandbox
                    .http_allow
                    .iter()
                    .map(|a| a.to_ascii_lowercase())
                    .collect(),
                label: label.clone(),
            },
            limits: sandbox.limits(),
            label,
            call_ends: Instant::now(),
            inline_io,
            data_dir: data_dir.cloned(),
        })
    }

    /// The host directory the plugin sees as its own, if any.
    pub(crate) fn data_dir(&self) -> Option<&std::path::Path> {
        self.data_dir.as_deref()
    }

    /// The store's resources (WASI descriptors among them).
    pub(crate) fn table(&self) -> &ResourceTable {
        &self.table
    }

    /// Whether file I/O runs inline on the store's own thread.
    pub(crate) fn inline_io(&self) -> bool {
        self.inline_io
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for PluginState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_guard,
        }
    }
}

/// Lets a request through to the pooled sender ([`super::http_pool`])
/// only if its authority is in the sandbox's allow-list. Sockets stay
/// closed (see `PluginState::new`), so this is a plugin's only way out.
struct HttpGuard {
    /// Lower-cased `host:port`s.
    allow: Arc<[String]>,
    label: Arc<str>,
}

type SendFuture = Box<dyn Future<Output = Result<super::http_pool::Sent, HttpError>> + Send>;

impl WasiHttpHooks for HttpGuard {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        // The authority as the guest set it; a missing port is not filled
        // in, so `host` alone never matches an allowed `host:port`.
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        if !self.allow.contains(&authority) {
            tracing::warn!(
                plugin = %self.label,
                "denied an HTTP request to `{authority}`: not in the sandbox's allow-list ({})",
                if self.allow.is_empty() {
                    "empty".to_string()
                } else {
                    self.allow.join(", ")
                }
            );
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        // `fut` reports errors in sending the request body; this sender
        // reports them through its own result, as wasmtime's does.
        let _ = fut;
        Box::new(super::http_pool::HttpPool::global().send(request, options))
    }
}

/// Longest plugin log line kept; the rest is cut.
const MAX_LOG_LINE: usize = 4096;

impl host::Host for PluginState {
    fn log(&mut self, level: host::LogLevel, message: String) {
        let mut m = message;
        if m.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            m.truncate(cut);
            m.push_str(" [cut]");
        }
        let plugin = &*self.label;
        match level {
            host::LogLevel::Trace => tracing::trace!(plugin, "{m}"),
            host::LogLevel::Debug => tracing::debug!(plugin, "{m}"),
            host::LogLevel::Info => tracing::info!(plugin, "{m}"),
            host::LogLevel::Warn => tracing::warn!(plugin, "{m}"),
            host::LogLevel::Error => tracing::error!(plugin, "{m}"),
        }
    }
}

impl types::Host for PluginState {}
