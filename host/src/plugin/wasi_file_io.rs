//! The storage linker's own `wasi:filesystem` `descriptor.write` and
//! `descriptor.read`, in place of wasmtime-wasi's: they work on the page
//! cache inline, on whatever thread runs the store, and leave the disk to
//! tokio's blocking pool.
//!
//! Why: a store on the node's runtime (the default, `Sandbox::own_thread`
//! off) must not block a worker that also serves the network and the
//! other partitions, so wasmtime-wasi sends every file call to the
//! blocking pool: a copy of the buffer, a thread hop and a wake-up per
//! call. The calls that wait for the disk (opens, syncs, truncations) are
//! worth that; a buffered write or a read of cached data is a copy to or
//! from the page cache and is not. Each append of a file-backed plugin is
//! such a write, on every node. Giving each store a thread of its own,
//! with all of its I/O inline, saved the hops but cost one per call to
//! reach that thread, and a second thread on every partition competing for
//! the cores. With writes inline on the runtime and everything else as
//! wasmtime-wasi does it, workload d on the file plugin went from 142-178
//! to 154-194 MB/s in six interleaved pairs (docs/performance.md).
//!
//! - **write** goes from the guest's memory straight to `pwrite`, with no
//!   copy (nothing else runs on the store while its guest waits in this
//!   call, so the memory cannot change or move under it). At most
//!   [`INLINE_WRITE_MAX`] bytes go per call, a millisecond or two of
//!   copying; a longer buffer gets a short write, which WASI allows and
//!   guests loop over (yielding at epoch ticks in between). A buffered
//!   write can still wait in the kernel: when it throttles writers because
//!   too much of the machine's memory is dirty (global: any process can
//!   cause it), on a journal commit, near a full disk, on a network file
//!   system. Such a wait holds the worker, so after any inline write that
//!   took over [`SLOW_WRITE`], every store in the process writes on the
//!   blocking pool (a copy and a hop, as wasmtime-wasi does) for
//!   [`POOL_AFTER_SLOW_WRITE`], then tries inline again: a disk that
//!   keeps stalling costs a worker one slow write a second at most.
//! - **read** asks the kernel for what is cached without waiting
//!   (`preadv2` with `RWF_NOWAIT`), and sends the read to the blocking
//!   pool only when the data is not in memory. It returns up to
//!   [`READ_MAX`] bytes per call, where wasmtime-wasi returns 64 KiB.
//!
//! - **sync** and **sync-data** run as wasmtime-wasi's do (on the blocking
//!   pool, or inline on a store's own thread); they are the host's so
//!   that a test can make them fail ([`fail_syncs_under`]): no file system
//!   here reports a failed writeback on demand, and a plugin's handling of
//!   one is where data is lost or kept.
//!
//! On a store with its own thread both simply run inline. Everything else
//! wasmtime-wasi checks or returns is kept: the descriptor must be a file
//! (`bad-descriptor` otherwise), a write needs a preopen that allows
//! writes (`not-permitted`), OS errors map to the same error codes
//! (`insufficient-space` for ENOSPC), a read returns end-of-file with an
//! empty list, and a handle the guest does not own traps.

use std::future::Future;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, LinkerInstance, Resource, WasmList};
use wasmtime_wasi::filesystem::Descriptor;
use wasmtime_wasi::p2::bindings::filesystem::types::ErrorCode;

use super::sandbox::PluginState;

/// The interface wasmtime-wasi defines the descriptor methods in. A guest
/// built against any 0.2.x imports it through semver matching.
const INTERFACE: &str = "wasi:filesystem/types@0.2.12";
const WRITE: &str = "[method]descriptor.write";
const READ: &str = "[method]descriptor.read";
const SYNC: &str = "[method]descriptor.sync";
const SYNC_DATA: &str = "[method]descriptor.sync-data";

/// Most bytes one `write` call copies into the page cache (a millisecond
/// or two of a worker's time here); the guest writes the rest in further
/// calls. As much as a partition's storage lane joins into one append
/// (`COALESCE_BYTES` in `node/partition.rs`), so appends take one call.
pub const INLINE_WRITE_MAX: usize = 4 << 20;

/// An inline write that took longer than this waited for something other
/// than a copy into the page cache (see the module's docs).
const SLOW_WRITE: Duration = Duration::from_millis(10);

/// How long writes go to the blocking pool after a slow inline one.
const POOL_AFTER_SLOW_WRITE: Duration = Duration::from_secs(1);

/// Whether writes may run inline, for every store in the process: a slow
/// inline write closes it for [`POOL_AFTER_SLOW_WRITE`]. The kernel's
/// reasons for a slow write (dirty throttling, the journal, a full disk)
/// are not one partition's, so neither is the gate.
struct WriteGate {
    /// Before this (on the [`ms_at`] clock), writes go to the pool.
    pool_until_ms: AtomicU64,
    /// Inline writes that took over [`SLOW_WRITE`], for the node's metrics.
    slow_writes: AtomicU64,
    /// When a slow write was last logged at warn level (plus one, so 0 is
    /// never): later ones within a minute go to debug.
    warned_ms: AtomicU64,
}

/// How the warning about a slow write begins (the bench looks for it in
/// its nodes' logs).
pub const SLOW_WRITE_LOG: &str = "a storage plugin's write took";

/// How often a slow write is logged at warn level at most.
const WARN_EVERY_MS: u64 = 60_000;

impl WriteGate {
    const fn new() -> Self {
        WriteGate {
            pool_until_ms: AtomicU64::new(0),
            slow_writes: AtomicU64::new(0),
            warned_ms: AtomicU64::new(0),
        }
    }

    /// Inline writes so far that took over [`SLOW_WRITE`].
    fn slow_writes(&self) -> u64 {
        self.slow_writes.load(Ordering::Relaxed)
    }

    /// May a write at `now_ms` (on the [`ms_at`] clock) run inline?
    fn inline(&self, now_ms: u64) -> bool {
        now_ms >= self.pool_until_ms.load(Ordering::Relaxed)
    }

    /// An inline write finished at `now_ms` after taking `took`.
    fn finished(&self, now_ms: u64, took: Duration) {
        if took > SLOW_WRITE {
            self.close_for(now_ms, POOL_AFTER_SLOW_WRITE);
            let slow = self.slow_writes.fetch_add(1, Ordering::Relaxed) + 1;
            let last = self.warned_ms.load(Ordering::Relaxed);
            let due = last == 0 || now_ms.saturating_sub(last - 1) >= WARN_EVERY_MS;
            // Of writes that find a warning due at once, one warns.
            let warn = due
                && self
                    .warned_ms
                    .compare_exchange(last, now_ms + 1, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok();
            if warn {
                tracing::warn!(
                    "{SLOW_WRITE_LOG} {took:?} in the kernel (the disk is behind, \
                     or the machine has too much dirty memory): plugin writes go to the blocking \
                     pool for {POOL_AFTER_SLOW_WRITE:?}; {slow} such writes so far (at most one \
                     warning a minute; `replicator_storage_slow_writes_total` counts them)"
                );
            } else {
                tracing::debug!(
                    "an inline plugin write took {took:?}: writes go to the blocking pool for \
                     {POOL_AFTER_SLOW_WRITE:?}"
                );
            }
        }
    }

    /// Send writes to the pool from `now_ms` for `period`.
    fn close_for(&self, now_ms: u64, period: Duration) {
        let until = now_ms.saturating_add(u64::try_from(period.as_millis()).unwrap_or(u64::MAX));
        self.pool_until_ms.fetch_max(until, Ordering::Relaxed);
    }
}

/// The gate every store's writes go through.
static WRITE_GATE: WriteGate = WriteGate::new();

/// The gate's clock: milliseconds from the first reading to `t`.
fn ms_at(t: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let since = t.saturating_duration_since(*START.get_or_init(|| t));
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Writes by storage plugins in this process that waited in the kernel for
/// over 10 ms, each of which sent writes to the blocking pool for a second.
pub fn slow_plugin_writes() -> u64 {
    WRITE_GATE.slow_writes()
}

/// Test hook: send every store's writes to the blocking pool for `period`,
/// as a slow write would.
#[doc(hidden)]
pub fn write_on_the_pool_for(period: Duration) {
    WRITE_GATE.close_for(ms_at(Instant::now()), period);
}

/// Most bytes one `read` call returns: what the host allocates for it.
const READ_MAX: usize = 1 << 20;

type Written = Result<u64, ErrorCode>;
type Read = Result<(Vec<u8>, bool), ErrorCode>;
type HostFuture<'a, T> = Box<dyn Future<Output = wasmtime::Result<(T,)>> + Send + 'a>;

/// Replace wasmtime-wasi's `descriptor.write` and `descriptor.read` in
/// `linker` (which must already hold wasmtime-wasi's p2 interfaces).
pub(crate) fn shadow(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    shadow_one(linker, WRITE, |types| types.func_wrap_async(WRITE, write))?;
    shadow_one(linker, READ, |types| types.func_wrap_async(READ, read))?;
    shadow_one(linker, SYNC, |types| {
        types.func_wrap_async(SYNC, |store, fd| sync(store, fd, false))
    })?;
    shadow_one(linker, SYNC_DATA, |types| {
        types.func_wrap_async(SYNC_DATA, |store, fd| sync(store, fd, true))
    })
}

/// Syncs to fail, per plugin data directory (see [`fail_syncs_under`]).
static SYNC_FAULTS: std::sync::Mutex<Vec<(std::path::PathBuf, u64)>> =
    std::sync::Mutex::new(Vec::new());

/// Whether [`SYNC_FAULTS`] holds any: every sync reads this, only a test
/// ever sets it.
static SYNC_FAULTS_ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Test hook: the next `count` syncs (of a file or of the directory) by
/// storage plugins whose data directory is `dir` fail with `io`, as an
/// fsync does after a failed writeback (EIO). The data stays written and
/// readable, as on Linux, where the failed pages stay cached.
#[doc(hidden)]
pub fn fail_syncs_under(dir: &std::path::Path, count: u64) {
    let mut faults = SYNC_FAULTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    faults.retain(|(d, _)| d != dir);
    if count > 0 {
        faults.push((dir.to_path_buf(), count));
    }
    SYNC_FAULTS_ARMED.store(!faults.is_empty(), Ordering::Release);
}

/// Whether this sync is one a test asked to fail (counting it).
fn injected_sync_fault(state: &PluginState) -> bool {
    if !SYNC_FAULTS_ARMED.load(Ordering::Acquire) {
        return false;
    }
    let Some(dir) = state.data_dir() else {
        return false;
    };
    let mut faults = SYNC_FAULTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(left) = faults.iter_mut().find(|(d, _)| d == dir).map(|(_, n)| n) else {
        return false;
    };
    *left -= 1;
    if *left == 0 {
        faults.retain(|(_, n)| *n > 0);
        SYNC_FAULTS_ARMED.store(!faults.is_empty(), Ordering::Release);
    }
    true
}

/// `descriptor.sync()` (fsync) and `descriptor.sync-data()` (fdatasync
/// of a file), as wasmtime-wasi runs them. A directory gets an fsync
/// either way, through a descriptor opened anew ([`sync_dir`]), as
/// wasmtime-wasi does.
fn sync(
    store: StoreContextMut<'_, PluginState>,
    (fd,): (Resource<Descriptor>,),
    data_only: bool,
) -> HostFuture<'_, Result<(), ErrorCode>> {
    let state = store.data();
    let (file, dir) = match state.table().get(&fd) {
        Ok(Descriptor::File(f)) => (f.file.clone(), false),
        Ok(Descriptor::Dir(d)) => (d.dir.clone(), true),
        Err(e) => return Box::new(std::future::ready(Err(e.into()))),
    };
    if injected_sync_fault(state) {
        return ready(Err(ErrorCode::Io));
    }
    let run = move || {
        if dir {
            sync_dir(&file)
        } else if data_only {
            file.sync_data()
        } else {
            file.sync_all()
        }
    };
    if state.inline_io() {
        return ready(run().map_err(ErrorCode::from));
    }
    Box::new(async move {
        let r = tokio::task::spawn_blocking(run).await?;
        Ok((r.map_err(ErrorCode::from),))
    })
}

fn shadow_one(
    linker: &mut Linker<PluginState>,
    name: &str,
    define: impl Fn(&mut LinkerInstance<'_, PluginState>) -> wasmtime::Result<()>,
) -> wasmtime::Result<()> {
    // First without shadowing, which must fail: wasmtime-wasi defined the
    // function already. If it does not, INTERFACE names a version
    // wasmtime-wasi no longer links (after an upgrade), and guests would
    // quietly get its function, or an instance holding nothing but ours.
    // Every plugin load fails instead, until INTERFACE is fixed.
    linker.allow_shadowing(false);
    if linker
        .instance(INTERFACE)
        .and_then(|mut types| define(&mut types))
        .is_ok()
    {
        wasmtime::bail!(
            "{INTERFACE} {name} was not defined by wasmtime-wasi: set INTERFACE in \
             host/src/plugin/wasi_file_io.rs to the wasi:filesystem version it links"
        );
    }
    linker.allow_shadowing(true);
    let defined = linker
        .instance(INTERFACE)
        .and_then(|mut types| define(&mut types));
    // Back to the default, so nothing else replaces a definition unawares.
    linker.allow_shadowing(false);
    defined
}

/// The file behind `fd`, or what the guest gets instead: an error code
/// for a directory, a trap for a handle it does not own.
fn file<'a>(
    state: &'a PluginState,
    fd: &Resource<Descriptor>,
) -> Result<Result<&'a wasmtime_wasi::filesystem::File, ErrorCode>, wasmtime::Error> {
    match state.table().get(fd) {
        Ok(Descriptor::File(f)) => Ok(Ok(f)),
        Ok(Descriptor::Dir(_)) => Ok(Err(ErrorCode::BadDescriptor)),
        Err(e) => Err(e.into()),
    }
}

/// `descriptor.write(buffer, offset)`.
fn write(
    store: StoreContextMut<'_, PluginState>,
    (fd, buffer, offset): (Resource<Descriptor>, WasmList<u8>, u64),
) -> HostFuture<'_, Written> {
    let file = match file(store.data(), &fd) {
        Ok(Ok(f)) => f,
        Ok(Err(code)) => return ready(Err(code)),
        Err(trap) => return Box::new(std::future::ready(Err(trap))),
    };
    if file.perms.write_not_permitted() {
        return ready(Err(ErrorCode::NotPermitted));
    }
    let bytes = buffer.as_le_slice(&store);
    let bytes = &bytes[..bytes.len().min(INLINE_WRITE_MAX)];
    // A store with its own thread may block; on the runtime, only while
    // the gate is open (see the module's docs).
    if store.data().inline_io() {
        return ready(written(file.file.write_at(bytes, offset)));
    }
    let started = Instant::now();
    if WRITE_GATE.inline(ms_at(started)) {
        let r = file.file.write_at(bytes, offset);
        let ended = Instant::now();
        WRITE_GATE.finished(ms_at(ended), ended - started);
        return ready(written(r));
    }
    let bytes = bytes.to_vec();
    let file = file.file.clone();
    Box::new(async move {
        let r = tokio::task::spawn_blocking(move || file.write_at(&bytes, offset)).await?;
        Ok((written(r),))
    })
}

/// What a write returns: the bytes written.
fn written(r: std::io::Result<usize>) -> Written {
    r.map(|n| n as u64).map_err(ErrorCode::from)
}

/// `descriptor.read(length, offset)`: up to `length` bytes (at most
/// [`READ_MAX`]) and whether the read found the end of the file.
fn read(
    store: StoreContextMut<'_, PluginState>,
    (fd, length, offset): (Resource<Descriptor>, u64, u64),
) -> HostFuture<'_, Read> {
    let state = store.data();
    let file = match file(state, &fd) {
        Ok(Ok(f)) => f,
        Ok(Err(code)) => return ready(Err(code)),
        Err(trap) => return Box::new(std::future::ready(Err(trap))),
    };
    let mut buffer = vec![0u8; usize::try_from(length).unwrap_or(usize::MAX).min(READ_MAX)];
    if state.inline_io() {
        let r = file.file.read_at(&mut buffer, offset);
        return ready(finish(buffer, r));
    }
    match read_cached(&file.file, &mut buffer, offset) {
        Some(r) => ready(finish(buffer, r)),
        None => {
            let file = file.file.clone();
            Box::new(async move {
                let (buffer, r) = tokio::task::spawn_blocking(move || {
                    let r = file.read_at(&mut buffer, offset);
                    (buffer, r)
                })
                .await?;
                Ok((finish(buffer, r),))
            })
        }
    }
}

/// fsync a directory. Its descriptor may be an `O_PATH` one, which fsync
/// refuses (EBADF): open the directory itself through it, for reading, as
/// wasmtime-wasi does.
fn sync_dir(dir: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: `openat` gets a live directory fd (open while `dir` is) and
    // a NUL-terminated path; a non-negative result is a new fd nothing
    // else owns, which the `File` takes over and closes.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c".".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above.
    let opened = unsafe { std::fs::File::from_raw_fd(fd) };
    opened.sync_all()
}

/// What a read returns: the bytes read, and end-of-file when there were
/// none (as wasmtime-wasi reports it).
fn finish(mut buffer: Vec<u8>, read: std::io::Result<usize>) -> Read {
    let n = read.map_err(ErrorCode::from)?;
    buffer.truncate(n);
    Ok((buffer, n == 0))
}

/// Read what the page cache holds at `offset` without waiting for the
/// disk: `None` when that would mean waiting (or the kernel cannot say),
/// so the read must go where it may block.
#[cfg(target_os = "linux")]
fn read_cached(
    file: &std::fs::File,
    buffer: &mut [u8],
    offset: u64,
) -> Option<std::io::Result<usize>> {
    use std::os::fd::AsRawFd;
    // An offset past i64::MAX is the kernel's EINVAL either way; let the
    // blocking read report it as wasmtime-wasi would.
    let offset = i64::try_from(offset).ok()?;
    let iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: the iovec points into `buffer`, which is live and
    // exclusively borrowed for the call; the fd is open while `file` is.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    if n >= 0 {
        return Some(Ok(n as usize));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // Not cached (EAGAIN), or a file system or kernel without
        // RWF_NOWAIT for this file.
        Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => None,
        _ => Some(Err(e)),
    }
}

#[cfg(not(target_os = "linux"))]
fn read_cached(_: &std::fs::File, _: &mut [u8], _: u64) -> Option<std::io::Result<usize>> {
    None
}

fn ready<T: Send + 'static>(r: T) -> HostFuture<'static, T> {
    Box::new(std::future::ready(Ok((r,))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_write_sends_writes_to_the_pool_for_a_while() {
        let gate = WriteGate::new();
        assert!(gate.inline(0), "open at first");
        gate.finished(5, Duration::from_millis(2));
        assert!(gate.inline(5), "a fast write keeps it open");
        assert_eq!(gate.slow_writes(), 0);
        gate.finished(100, SLOW_WRITE + Duration::from_millis(1));
        assert!(!gate.inline(100), "closed by a slow write");
        assert_eq!(gate.slow_writes(), 1, "and counted");
        assert!(!gate.inline(1_099));
        assert!(gate.inline(1_100), "open again a period later");
        // A later closing never shortens an earlier one.
        gate.close_for(200, Duration::from_secs(5));
        gate.finished(300, SLOW_WRITE * 2);
        assert!(!gate.inline(5_199));
        assert!(gate.inline(5_200));
        assert_eq!(gate.slow_writes(), 2);
    }
}
