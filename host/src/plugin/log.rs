//! [`PluginLog`]: one partition's log served by one plugin instance, owned
//! by one task. Owns fault containment (deadlines, traps, re-instantiation)
//! and the checks that no plugin answer is trusted blindly: offsets must be
//! in range and contiguous, the log end must move exactly as appends and
//! truncations say, batches read back must pass their CRC.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replicator_plugin_sdk::{MAX_BATCH_LEN, index};
use tokio::sync::{mpsc, oneshot};
use wasmtime::Store;
use wasmtime::component::ResourceAny;

use super::StoragePlugin;
use super::bindings::StoragePlugin as World;
use super::bindings::exports::replicator::plugin::storage as wit;
use super::bindings::replicator::plugin::types::PluginError;
use super::sandbox::{PluginState, Sandbox};
use super::write_behind::WriteBehind;
use crate::core::MAX_LEADER_EPOCH;
use crate::storage::{
    EpochEntry, FaultKind, LogState, OffsetBounds, PartitionLog, StorageError, StorageResult,
};

pub(crate) struct OpenSpec {
    pub topic: String,
    pub partition: u32,
    pub config: Vec<(String, String)>,
    pub data_dir: Option<PathBuf>,
}

enum Op {
    Append(Bytes),
    Read(u64, u32),
    Bounds,
    Truncate(u64),
    DeletePrefix(u64),
    Reset(u64),
    HighWatermark,
    SetHighWatermark(u64),
    LeaderEpochs,
    SetLeaderEpochs(Vec<EpochEntry>),
    Flush,
    Recover,
    Close,
}

enum Out {
    Offset(u64),
    Bytes(Bytes),
    Bounds(OffsetBounds),
    Unit,
    Epochs(Vec<EpochEntry>),
    State(LogState),
}

struct Call {
    op: Op,
    reply: oneshot::Sender<StorageResult<Out>>,
}

/// Handle to a partition log served by a plugin instance. Cheap to clone;
/// calls are served one at a time, in order. Dropping every handle closes
/// the log (the plugin's resource is dropped, then the instance).
#[derive(Clone)]
pub struct PluginLog {
    tx: mpsc::UnboundedSender<Call>,
    plugin: Arc<str>,
    sandbox: Arc<Sandbox>,
    write_behind_synced: Option<tokio::sync::watch::Receiver<u64>>,
}

struct Live {
    store: Store<PluginState>,
    world: World,
    log: ResourceAny,
}

struct Actor {
    plugin: StoragePlugin,
    spec: OpenSpec,
    label: Arc<str>,
    live: Option<Live>,
    fault: Option<(FaultKind, String)>,
    /// The bounds the log must have, tracked from every answered mutation.
    known: OffsetBounds,
    write_behind: Option<WriteBehind>,
    /// Where a read found the stored log damaged, and when the last
    /// `Damaged` fault for it was raised, while that offset is in the log:
    /// reads that reach it serve what comes before it, or fail with
    /// `corrupt`, and raise no fault until [`DAMAGE_REFAULT`] has passed.
    /// Why: a replica that may not cut its damaged log (no other live copy
    /// known) faulted, recovered and led a new epoch at every follower's
    /// fetch of the batch. A fault now and then still lets the partition
    /// ask again, and cut once another copy is live.
    damaged: Option<(u64, std::time::Instant)>,
    /// Whoever waits for the call being served (see [`guarded`]).
    waiter: Waiter,
    /// The partition directory, held while this task may still touch it.
    claim: Option<DirClaim>,
}

/// Partition directories a storage task works in, process-wide. A task
/// stuck in the kernel on its own thread (where no deadline reaches it)
/// keeps its directory until the call returns and the task ends; a second
/// instance of that log (the node opening the partition again after the
/// first open timed out) must not write there meanwhile.
static CLAIMED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<PathBuf>>> =
    std::sync::LazyLock::new(Default::default);

/// How long an open waits for an earlier instance to let its directory go
/// (one whose handles were just dropped closes a moment later). Short:
/// the node opens partitions one after another, and retries a failed open
/// with a backoff of its own.
const CLAIM_WAIT: Duration = Duration::from_secs(1);

/// Woken whenever a directory leaves [`CLAIMED`].
static RELEASED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// A directory in [`CLAIMED`], released when dropped.
struct DirClaim(PathBuf);

impl DirClaim {
    fn take(dir: &std::path::Path) -> Option<DirClaim> {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
        claimed
            .insert(dir.to_path_buf())
            .then(|| DirClaim(dir.to_path_buf()))
    }

    /// Claim `dir`, waiting up to `wait` for an earlier instance to let it
    /// go: one whose handles were just dropped closes a moment later.
    async fn wait_for(dir: &std::path::Path, wait: Duration) -> Option<DirClaim> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let released = RELEASED.notified();
            let mut released = std::pin::pin!(released);
            // Registered before the check, so a release in between counts.
            released.as_mut().enable();
            if let Some(claim) = DirClaim::take(dir) {
                return Some(claim);
            }
            tokio::time::timeout_at(until, released).await.ok()?;
        }
    }
}

impl Drop for DirClaim {
    fn drop(&mut self) {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
        claimed.remove(&self.0);
        drop(claimed);
        RELEASED.notify_waiters();
    }
}

type Fault = (FaultKind, String);

/// How long reads that reach a damaged batch already reported are refused
/// without a fault; the next one after faults again (see `Actor::damaged`).
const DAMAGE_REFAULT: Duration = Duration::from_secs(30);

/// Whoever waits for the call being served ([`guarded`] answers it early
/// when the call outlives its deadline).
type Waiter = Option<oneshot::Sender<StorageResult<Out>>>;

/// Run one guest call under the deadline: a trap or an expired deadline
/// becomes a fault; an expected error stays an error.
///
/// A call stuck in a host function (a write or truncation waiting in the
/// kernel on the blocking pool), where epochs do not reach, is answered
/// to `waiter` as a `Deadline` fault at the deadline, but awaited to its
/// end all the same (up to `drain`, twice the call deadline, more) before
/// the fault is returned and the instance dropped. Dropping it at the
/// deadline left the blocking I/O running: a
/// new instance could open the files, cut the torn tail and append, and
/// then the old `pwrite` or `ftruncate` landed on top, replacing or
/// cutting records appended since. The guest traps at its next epoch
/// check once the host call returns. A call that returns after its
/// caller gave up (a store on its own thread, whose timer cannot fire
/// while the thread is held in the kernel, is answered by
/// [`PluginLog::submit`]'s own deadline) is a fault too: the caller was
/// told it failed, and the instance overran its deadline.
async fn guarded<T>(
    deadline: Duration,
    drain: Duration,
    label: &str,
    waiter: &mut Waiter,
    fut: impl Future<Output = wasmtime::Result<Result<T, PluginError>>>,
) -> Result<Result<T, PluginError>, Fault> {
    let grace = deadline / 4 + Duration::from_millis(50);
    let started = std::time::Instant::now();
    let mut fut = std::pin::pin!(fut);
    let gave_up = |w: &Waiter| w.as_ref().is_some_and(oneshot::Sender::is_closed);
    match tokio::time::timeout(deadline + grace, &mut fut).await {
        Err(_) => {
            if let Some(w) = waiter.take() {
                let _ = w.send(Err(StorageError::Fault {
                    plugin: label.to_string(),
                    kind: FaultKind::Deadline,
                    detail: format!("call did not return within {deadline:?}"),
                }));
            }
            tracing::warn!(plugin = %label,
                "storage call did not return within {deadline:?}: waiting up to {drain:?} for it to end before the instance is dropped, so that no new instance works on its files meanwhile");
            if tokio::time::timeout(drain, fut).await.is_err() {
                // An async wait (a guest polling a timer) ends when
                // dropped; I/O stuck in the kernel runs on regardless.
                tracing::error!(plugin = %label,
                    "storage call still running after {:?}: dropped; if it was stuck in the kernel, writes it started may still land in files the next instance uses",
                    started.elapsed());
            }
            Err((
                FaultKind::Deadline,
                format!(
                    "call did not return within {deadline:?} (it returned after {:?})",
                    started.elapsed()
                ),
            ))
        }
        Ok(_) if gave_up(waiter) => Err((
            FaultKind::Deadline,
            format!(
                "call returned after {:?}, when its caller had given up waiting",
                started.elapsed()
            ),
        )),
        Ok(Err(e)) => Err(classify(&e)),
        Ok(Ok(r)) => Ok(r),
    }
}

/// Sleep until `at`; `None` never wakes (its `select!` arm is disabled).
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn classify(e: &wasmtime::Error) -> Fault {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => {
            (FaultKind::Deadline, "deadline reached in wasm code".into())
        }
        _ => (FaultKind::Trap, format!("{e:#}")),
    }
}

fn convert(e: PluginError) -> StorageError {
    match e {
        PluginError::NotFound(m) => StorageError::NotFound(m),
        PluginError::OffsetOutOfRange(b) => StorageError::OffsetOutOfRange(OffsetBounds {
            log_start: b.log_start,
            log_end: b.log_end,
        }),
        PluginError::Corrupt(m) => StorageError::Corrupt(m),
        PluginError::Io(m) => StorageError::Io(m),
        PluginError::Conflict(m) => StorageError::Conflict(m),
        PluginError::Unavailable(m) => StorageError::Unavailable(m),
        PluginError::InvalidInput(m) => StorageError::InvalidInput(m),
        PluginError::Other(m) => StorageError::Other(m),
    }
}

impl Actor {
    fn sandbox(&self) -> &Sandbox {
        &self.plugin.inner.sandbox
    }

    fn fault_error(&self, kind: FaultKind, detail: String) -> StorageError {
        StorageError::Fault {
            plugin: self.label.to_string(),
            kind,
            detail,
        }
    }

    /// Remember damage found at `at` (the lowest so far), reported now.
    fn note_damage(&mut self, at: u64) {
        let at = self.damaged.map_or(at, |(d, _)| d.min(at));
        self.damaged = Some((at, std::time::Instant::now()));
    }

    /// How long a call that overran its deadline is still awaited before
    /// its instance is dropped (see [`guarded`]).
    fn drain(&self) -> Duration {
        self.sandbox().call_deadline * 2
    }

    /// Record a fault: drop the instance, refuse calls until `recover`.
    fn set_fault(&mut self, (kind, detail): Fault) -> StorageError {
        tracing::error!(plugin = %self.label, ?kind, "storage plugin fault, instance dropped: {detail}");
        self.live = None;
        self.fault = Some((kind.clone(), detail.clone()));
        self.fault_error(kind, detail)
    }

    async fn instantiate(&mut self) -> StorageResult<()> {
        self.live = None;
        let sandbox = self.sandbox().clone();
        let deadline = sandbox.open_deadline;
        let drain = self.drain();
        let mut store = PluginState::store(
            self.plugin.inner.runtime.engine(),
            &sandbox,
            self.spec.data_dir.as_ref(),
            self.label.clone(),
            deadline,
        )
        .map_err(|e| self.fault_error(FaultKind::Instantiate, format!("{e:#}")))?;
        let world = match tokio::time::timeout(
            deadline,
            self.plugin.inner.pre.instantiate_async(&mut store),
        )
        .await
        {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                let (_, detail) = classify(&e);
                return Err(self.set_fault((FaultKind::Instantiate, detail)));
            }
            Err(_) => {
                return Err(self.set_fault((FaultKind::Deadline, "instantiation timed out".into())));
            }
        };
        let guest = world.replicator_plugin_storage().partition_log();
        let opened = guarded(
            deadline,
            drain,
            &self.label,
            &mut self.waiter,
            guest.call_open(
                &mut store,
                &self.spec.topic,
                self.spec.partition,
                &self.spec.config,
            ),
        )
        .await;
        let log = match opened {
            Ok(Ok(log)) => log,
            Ok(Err(e)) => return Err(convert(e)),
            Err(f) => return Err(self.set_fault(f)),
        };
        self.live = Some(Live { store, world, log });
        self.fault = None;
        // Learn the bounds; everything after is checked against them.
        let b = self.call_bounds().await?;
        if b.log_start > b.log_end || b.log_end > crate::batch::MAX_OFFSET {
            return Err(self.set_fault((
                FaultKind::Violation,
                format!(
                    "opened with log start {} and log end {}: the start must not pass the end, nor the end {}",
                    b.log_start,
                    b.log_end,
                    crate::batch::MAX_OFFSET
                ),
            )));
        }
        self.known = b;
        Ok(())
    }

    async fn call_bounds(&mut self) -> StorageResult<OffsetBounds> {
        let deadline = self.sandbox().call_deadline;
        let drain = self.drain();
        let Some(live) = self.live.as_mut() else {
            return Err(self.fault_error(FaultKind::NeedsRecovery, "no instance".into()));
        };
        PluginState::arm(&mut live.store, deadline);
        let guest = live.world.replicator_plugin_storage().partition_log();
        let r = guarded(deadline, drain, &self.label, &mut self.waiter, async {
            guest.call_bounds(&mut live.store, live.log).await.map(Ok)
        })
        .await;
        match r {
            Ok(Ok(b)) => Ok(OffsetBounds {
                log_start: b.log_start,
                log_end: b.log_end,
            }),
            Ok(Err(e)) => Err(convert(e)),
            Err(f) => Err(self.set_fault(f)),
        }
    }

    async fn serve(&mut self, op: Op) -> StorageResult<Out> {
        match op {
            Op::Recover => self.recover().await.map(Out::State),
            Op::Close => {
                self.close().await;
                Ok(Out::Unit)
            }
            Op::Truncate(offset) => self.truncate(offset).await,
            op @ (Op::Append(_) | Op::Flush) => {
                let r = self.handle(op).await;
                if let Err(StorageError::Io(why)) = &r {
                    return Err(self.after_failed_write(why.clone()).await);
                }
                r
            }
            op => self.handle(op).await,
        }
    }

    /// An append or flush failed with `io`. The contract lets a plugin
    /// cut its log back to what is on disk then (the file plugin does,
    /// after a failed fsync: what that fsync covered may never reach the
    /// disk, though reads still show it). Its bounds say whether it did.
    /// A lower log end is a lost tail: a fault, so the log is reopened and
    /// the replica, holding less than it did, leaves the ISR and fetches
    /// again. Unchanged bounds leave the instance be: an object-store
    /// plugin keeps what it has not uploaded in it (see [`Self::handle`]).
    async fn after_failed_write(&mut self, why: String) -> StorageError {
        let known = self.known;
        match self.call_bounds().await {
            Ok(b) if b == known => StorageError::Io(why),
            Ok(b) if b.log_start == known.log_start
                && (b.log_start..known.log_end).contains(&b.log_end) =>
            {
                self.set_fault((
                    FaultKind::FailedMutation,
                    format!(
                        "a failed write cut the log back from offset {} to {}: {why}",
                        known.log_end, b.log_end
                    ),
                ))
            }
            Ok(b) => self.set_fault((
                FaultKind::Violation,
                format!(
                    "after a failed write it reported bounds {b:?}, but its operations imply {known:?} (or a cut-back of the end alone): {why}"
                ),
            )),
            // A fault of its own (a trap, a deadline) is set already.
            Err(e) => e,
        }
    }

    /// A truncation, checked against where the batch holding `offset`
    /// starts: the contract cuts back to exactly there. Only `end <=
    /// offset` was checked, so a plugin that cut far more (to 0) had the
    /// host lower its log end, and HW, to whatever it said, and a replica
    /// in the ISR held less than it was counted for. One read of one batch
    /// per truncation (they are rare: a follower reconciling its log).
    async fn truncate(&mut self, offset: u64) -> StorageResult<Out> {
        let inside = (self.known.log_start..self.known.log_end).contains(&offset);
        let base = if inside {
            self.batch_start(offset).await
        } else {
            None
        };
        let r = self.handle(Op::Truncate(offset)).await;
        if let (Ok(Out::Offset(end)), Some(base)) = (&r, base)
            && *end != base
        {
            return Err(self.set_fault((
                FaultKind::Violation,
                format!(
                    "truncation to {offset} left the log end at {end}, but the batch holding {offset} starts at {base}"
                ),
            )));
        }
        r
    }

    /// Where the batch holding `offset` starts, from one read, or `None`
    /// when the read gives no clean answer (an error, a damaged batch:
    /// that truncation may be the one that cuts it away). Reads the guest
    /// directly, not through [`Self::handle`], whose checks would make a
    /// damaged batch a fault. A trap or deadline is a fault as anywhere.
    async fn batch_start(&mut self, offset: u64) -> Option<u64> {
        let deadline = self.sandbox().call_deadline;
        let drain = self.drain();
        let live = self.live.as_mut()?;
        PluginState::arm(&mut live.store, deadline);
        let guest = live.world.replicator_plugin_storage().partition_log();
        // Its caller waits for the truncation that follows; no early answer.
        let mut waiter = None;
        let r = guarded(
            deadline,
            drain,
            &self.label,
            &mut waiter,
            guest.call_read(&mut live.store, live.log, offset, 1),
        )
        .await;
        match r {
            Ok(Ok(bytes)) => replicator_plugin_sdk::BatchHeader::parse(&bytes)
                .ok()
                .filter(|h| h.base_offset <= offset && offset < h.next_offset())
                .map(|h| h.base_offset),
            Ok(Err(_)) => None,
            Err(fault) => {
                self.set_fault(fault);
                None
            }
        }
    }

    /// One guest call with its checks; `Recover` is served by [`Self::serve`].
    async fn handle(&mut self, op: Op) -> StorageResult<Out> {
        if let Some((kind, detail)) = &self.fault {
            return Err(self.fault_error(
                FaultKind::NeedsRecovery,
                format!("after an earlier {kind:?} fault ({detail}); call recover()"),
            ));
        }
        let deadline = self.sandbox().call_deadline;
        let drain = self.drain();
        let known = self.known;
        let Some(live) = self.live.as_mut() else {
            return Err(self.fault_error(FaultKind::NeedsRecovery, "no instance".into()));
        };
        PluginState::arm(&mut live.store, deadline);
        let guest = live.world.replicator_plugin_storage().partition_log();
        let (store, log) = (&mut live.store, live.log);
        let (label, waiter) = (&*self.label, &mut self.waiter);
        // One guest call under the deadline (see `guarded`).
        macro_rules! call {
            ($fut:expr) => {
                guarded(deadline, drain, label, waiter, $fut).await
            };
        }
        // What an error from this op may not claim, and whether a failure
        // leaves the plugin's state unknown.
        let in_range = match op {
            Op::Read(o, _) | Op::Truncate(o) => {
                Some(o).filter(|o| (known.log_start..=known.log_end).contains(o))
            }
            _ => None,
        };
        // A failed append or flush keeps the instance: an object-store
        // plugin holds what it has not uploaded yet in it, and an outage
        // that fails every replica's upload at once would otherwise drop
        // that tail everywhere. Its bounds are asked for after it
        // instead (`after_failed_write`): a cut back, or an append applied
        // in part, is a fault then.
        let mutation = matches!(op, Op::Truncate(_) | Op::DeletePrefix(_) | Op::Reset(_));
        // A read inside the log: a `corrupt` answer to it is damage there.
        let read_at = match op {
            Op::Read(o, _) => Some(o).filter(|o| (known.log_start..known.log_end).contains(o)),
            _ => None,
        };
        // Kept (a reference count, not a copy) to judge a `conflict` answer.
        let appended = match &op {
            Op::Append(bytes) => Some(bytes.clone()),
            _ => None,
        };
        // Where a read found the stored log damaged, if it did; where it
        // reached damage already reported, if it did.
        let mut damaged = None;
        let mut known_damage = None;
        let reported = self
            .damaged
            .filter(|(_, at)| at.elapsed() < DAMAGE_REFAULT)
            .map(|(d, _)| d);
        let answer = match op {
            Op::Append(bytes) => {
                let r = call!(guest.call_append(&mut *store, log, &bytes));
                r.map(|r| r.map(|end| check_append(known, &bytes, end)))
            }
            Op::Read(offset, max) => {
                // A read returns at least one batch anyway; asking for more
                // than the largest batch only risks the memory limit.
                let max = max.min(MAX_BATCH_LEN);
                let r = call!(guest.call_read(&mut *store, log, offset, max));
                r.map(|r| {
                    r.map(|b| {
                        let bytes = Bytes::from(b);
                        let checked = check_read(known, offset, max, bytes.clone());
                        if checked.is_err()
                            && let Some((at, pos)) = first_damaged_batch(offset, &bytes)
                        {
                            if reported.is_some_and(|d| at >= d) {
                                // Reported lately: what comes before it is
                                // served (checked like any answer), the
                                // rest is refused.
                                if pos > 0 {
                                    return check_read(known, offset, max, bytes.slice(..pos));
                                }
                                known_damage = Some(at);
                            } else {
                                damaged = Some(at);
                            }
                        }
                        checked
                    })
                })
            }
            Op::Bounds => {
                let r = call!(async { guest.call_bounds(&mut *store, log).await.map(Ok) });
                r.map(|r| {
                    r.map(|b| {
                        let b = OffsetBounds {
                            log_start: b.log_start,
                            log_end: b.log_end,
                        };
                        if b == known {
                            Ok((Out::Bounds(b), known))
                        } else {
                            Err(format!(
                                "reported bounds {b:?}, but its operations imply {known:?}"
                            ))
                        }
                    })
                })
            }
            Op::Truncate(offset) => {
                let r = call!(guest.call_truncate(&mut *store, log, offset));
                r.map(|r| r.map(|end| check_truncate(known, offset, end)))
            }
            Op::DeletePrefix(offset) => {
                let r = call!(guest.call_delete_prefix(&mut *store, log, offset));
                r.map(|r| {
                    r.map(|()| {
                        let mut k = known;
                        k.log_start = k.log_start.max(offset);
                        k.log_end = k.log_end.max(offset);
                        Ok((Out::Unit, k))
                    })
                })
            }
            Op::Reset(offset) => {
                let r = call!(guest.call_reset(&mut *store, log, offset));
                // What it now holds is checked at the next call that
                // reports bounds, or refused at the next append.
                r.map(|r| {
                    r.map(|()| {
                        let k = OffsetBounds {
                            log_start: offset,
                            log_end: offset,
                        };
                        Ok((Out::Unit, k))
                    })
                })
            }
            Op::HighWatermark => {
                let r = call!(guest.call_high_watermark(&mut *store, log));
                r.map(|r| r.map(|hw| Ok((Out::Offset(hw), known))))
            }
            Op::SetHighWatermark(hw) => {
                let r = call!(guest.call_set_high_watermark(&mut *store, log, hw));
                r.map(|r| r.map(|()| Ok((Out::Unit, known))))
            }
            Op::LeaderEpochs => {
                let r = call!(guest.call_leader_epochs(&mut *store, log));
                r.map(|r| r.map(|e| check_epochs(known, e)))
            }
            Op::SetLeaderEpochs(entries) => {
                if let Some(why) =
                    epochs_not_monotonic(entries.iter().map(|e| (e.epoch, e.start_offset)))
                {
                    return Err(StorageError::InvalidInput(why));
                }
                let wit_entries: Vec<wit::EpochEntry> = entries
                    .iter()
                    .map(|e| wit::EpochEntry {
                        epoch: e.epoch,
                        start_offset: e.start_offset,
                    })
                    .collect();
                let r = call!(guest.call_set_leader_epochs(&mut *store, log, &wit_entries));
                r.map(|r| r.map(|()| Ok((Out::Unit, known))))
            }
            Op::Flush => {
                let r = call!(guest.call_flush(&mut *store, log));
                r.map(|r| r.map(|()| Ok((Out::Unit, known))))
            }
            Op::Recover | Op::Close => {
                return Err(StorageError::Other("not a guest call".into()));
            }
        };
        match answer {
            Err(fault) => Err(self.set_fault(fault)),
            Ok(Err(e)) => {
                let e = convert(e);
                if let Some(why) = wrong_refusal(&e, known, in_range) {
                    return Err(self.set_fault((FaultKind::Violation, why)));
                }
                // The plugin found its stored log damaged where the host
                // reads (an index naming a missing segment, a checksum of
                // its own): handled as a batch that failed the host's CRC
                // check there, so the replica can cut its log and fetch
                // the rest again. As a plain error the leader went on
                // leading a log it could not serve, and its followers
                // retried the hole until they left the ISR.
                if let (StorageError::Corrupt(m), Some(at)) = (&e, read_at) {
                    if reported.is_some_and(|d| at >= d) {
                        return Err(e);
                    }
                    self.note_damage(at);
                    return Err(self.set_fault((
                        FaultKind::Damaged { from: at },
                        format!(
                            "reading offset {at}: the plugin found its stored log damaged: {m}"
                        ),
                    )));
                }
                // The contract has `conflict` only for an append that does
                // not start at the log end. Anywhere else it means the
                // plugin lost its right to write (a newer writer fenced it,
                // as the S3 plugin's generations do): only a fresh
                // instance, which re-reads the store, can go on.
                if let StorageError::Conflict(m) = &e
                    && appended
                        .as_ref()
                        .is_none_or(|b| index::check_append(b, known.log_end).is_ok())
                {
                    return Err(self.set_fault((
                        FaultKind::FailedMutation,
                        format!("conflict outside the append contract, reopening: {m}"),
                    )));
                }
                if mutation
                    && !matches!(
                        e,
                        StorageError::OffsetOutOfRange(_) | StorageError::InvalidInput(_)
                    )
                {
                    // A truncation or prefix delete that failed midway left
                    // state the host cannot know: re-read it from storage.
                    return Err(self.set_fault((FaultKind::FailedMutation, e.to_string())));
                }
                Err(e)
            }
            Ok(Ok(Err(violation))) => {
                if let Some(at) = known_damage {
                    return Err(StorageError::Corrupt(format!(
                        "the batch at offset {at} is damaged (it failed its CRC or position check when read back) and is not served: {violation}"
                    )));
                }
                if let Some(at) = damaged {
                    self.note_damage(at);
                }
                let kind = damaged.map_or(FaultKind::Violation, |from| FaultKind::Damaged { from });
                Err(self.set_fault((kind, violation)))
            }
            Ok(Ok(Ok((out, new_known)))) => {
                self.known = new_known;
                // Cut away, or deleted with the prefix: nothing to refuse.
                if self
                    .damaged
                    .is_some_and(|(d, _)| d < new_known.log_start || d >= new_known.log_end)
                {
                    self.damaged = None;
                }
                Ok(out)
            }
        }
    }

    async fn recover(&mut self) -> StorageResult<LogState> {
        if self.fault.is_some() || self.live.is_none() {
            tracing::info!(plugin = %self.label, "re-instantiating storage plugin");
            self.instantiate().await?;
        }
        let bounds = match self.handle(Op::Bounds).await? {
            Out::Bounds(b) => b,
            _ => unreachable!("Bounds answers Out::Bounds"),
        };
        let hw = match self.handle(Op::HighWatermark).await? {
            Out::Offset(o) => o,
            _ => unreachable!("HighWatermark answers Out::Offset"),
        };
        let leader_epochs = match self.handle(Op::LeaderEpochs).await? {
            Out::Epochs(e) => e,
            _ => unreachable!("LeaderEpochs answers Out::Epochs"),
        };
        Ok(LogState {
            bounds,
            high_watermark: hw,
            leader_epochs,
        })
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Call>) {
        loop {
            // Checked before every call too: under a steady stream of
            // calls the timer below would never be the ready branch.
            if let Some(w) = self.write_behind.as_mut()
                && w.due().is_some_and(|at| at <= std::time::Instant::now())
            {
                w.start();
            }
            let due = self.write_behind.as_ref().and_then(WriteBehind::due);
            let call = tokio::select! {
                call = rx.recv() => call,
                () = sleep_until(due), if due.is_some() => continue,
            };
            let Some(call) = call else { break };
            let closing = matches!(call.op, Op::Close);
            if call.reply.is_closed() && !closing {
                // Its caller gave up waiting (the storage task was stuck
                // past its deadline) and was told it failed: it must not
                // take effect now.
                continue;
            }
            let append = matches!(call.op, Op::Append(_));
            self.waiter = Some(call.reply);
            let r = self.serve(call.op).await;
            if append
                && r.is_ok()
                && let Some(w) = self.write_behind.as_mut()
            {
                w.appended();
            }
            if closing {
                // Closed: whoever waited may open the directory again.
                self.claim = None;
            }
            // Unless `guarded` answered already, at the deadline.
            if let Some(reply) = self.waiter.take() {
                let _ = reply.send(r);
            }
            if closing {
                return;
            }
        }
        self.close().await;
    }

    /// Let the plugin run its destructor, then drop the instance.
    async fn close(&mut self) {
        if let Some(mut live) = self.live.take() {
            PluginState::arm(&mut live.store, self.sandbox().call_deadline);
            let drop_it = live.log.resource_drop_async(&mut live.store);
            match tokio::time::timeout(self.sandbox().call_deadline, drop_it).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(plugin = %self.label, "closing the log trapped: {e:#}")
                }
                Err(_) => tracing::warn!(plugin = %self.label, "closing the log timed out"),
            }
        }
    }
}

type Checked = Result<(Out, OffsetBounds), String>;

fn check_append(known: OffsetBounds, bytes: &[u8], end: u64) -> Checked {
    let located = index::check_append(bytes, known.log_end)
        .map_err(|e| format!("accepted an append the contract forbids ({e})"))?;
    let expected = located
        .last()
        .map(|l| l.header.next_offset())
        .unwrap_or(known.log_end);
    if end != expected {
        return Err(format!(
            "append returned log end {end}, but the appended batches end at {expected}"
        ));
    }
    Ok((
        Out::Offset(end),
        OffsetBounds {
            log_start: known.log_start,
            log_end: end,
        },
    ))
}

fn check_read(known: OffsetBounds, offset: u64, max: u32, bytes: Bytes) -> Checked {
    if offset < known.log_start || offset > known.log_end {
        return Err(format!(
            "served a read at {offset}, outside the log {}..{}",
            known.log_start, known.log_end
        ));
    }
    if bytes.is_empty() {
        if offset < known.log_end {
            return Err(format!(
                "returned nothing for offset {offset} below the log end {}",
                known.log_end
            ));
        }
        return Ok((Out::Bytes(bytes), known));
    }
    let mut expected: Option<u64> = None;
    let mut count = 0usize;
    for b in replicator_plugin_sdk::batches(&bytes, true) {
        let (h, _) = b.map_err(|e| format!("read at {offset} returned a bad batch: {e}"))?;
        match expected {
            None if h.base_offset > offset || h.next_offset() <= offset => {
                return Err(format!(
                    "read at {offset} started with batch {}..{}",
                    h.base_offset,
                    h.next_offset()
                ));
            }
            Some(e) if h.base_offset != e => {
                return Err(format!(
                    "read returned batch at {} after one ending at {e}",
                    h.base_offset
                ));
            }
            _ => {}
        }
        if h.next_offset() > known.log_end {
            return Err(format!(
                "read returned offsets up to {} past the log end {}",
                h.next_offset(),
                known.log_end
            ));
        }
        expected = Some(h.next_offset());
        count += 1;
    }
    if count > 1 && bytes.len() > max as usize {
        return Err(format!(
            "read returned {} bytes in {count} batches, over max-bytes {max}",
            bytes.len()
        ));
    }
    Ok((Out::Bytes(bytes), known))
}

/// Where the batches a read at `offset` returned first fail their CRC,
/// position or framing check, or do not follow on: the failing batch's
/// start, or `offset` if it was the first (its
/// start is then unknown, but `offset` is inside it), and its byte
/// position. `None` if every batch is whole and in place (the read broke
/// another rule).
fn first_damaged_batch(offset: u64, bytes: &[u8]) -> Option<(u64, usize)> {
    let mut next: Option<u64> = None;
    let mut pos = 0usize;
    for b in replicator_plugin_sdk::batches(bytes, true) {
        let Ok((h, _)) = b else {
            return Some((next.unwrap_or(offset), pos));
        };
        let in_place = match next {
            None => h.base_offset <= offset && offset < h.next_offset(),
            Some(n) => h.base_offset == n,
        };
        if !in_place {
            return Some((next.unwrap_or(offset), pos));
        }
        next = Some(h.next_offset());
        pos += h.batch_len as usize;
    }
    None
}

fn check_truncate(known: OffsetBounds, offset: u64, end: u64) -> Checked {
    if offset < known.log_start || offset > known.log_end {
        return Err(format!(
            "accepted a truncation to {offset}, outside the log {}..{}",
            known.log_start, known.log_end
        ));
    }
    if end > offset {
        return Err(format!("truncation to {offset} left the log end at {end}"));
    }
    if offset == known.log_end && end != offset {
        return Err(format!(
            "truncation at the log end {offset} removed data, leaving {end}"
        ));
    }
    // A truncation cuts back to the start of the batch holding `offset`,
    // which may begin before a log start that retention put inside it
    // (the contract allows that; the conformance model does it).
    Ok((
        Out::Offset(end),
        OffsetBounds {
            log_start: known.log_start.min(end),
            log_end: end,
        },
    ))
}

fn check_epochs(known: OffsetBounds, entries: Vec<wit::EpochEntry>) -> Checked {
    if let Some(why) = epochs_not_monotonic(entries.iter().map(|e| (e.epoch, e.start_offset))) {
        return Err(why);
    }
    // Epochs come from partition records, which never go past this; one
    // above it would make every epoch this node writes next unreadable.
    if let Some(e) = entries.iter().find(|e| e.epoch > MAX_LEADER_EPOCH) {
        return Err(format!(
            "leader-epoch cache holds epoch {} (from {}), past the largest a partition can reach ({MAX_LEADER_EPOCH})",
            e.epoch, e.start_offset
        ));
    }
    let entries = entries
        .into_iter()
        .map(|e| EpochEntry {
            epoch: e.epoch,
            start_offset: e.start_offset,
        })
        .collect();
    Ok((Out::Epochs(entries), known))
}

/// An error the plugin had no grounds for, given what the host knows:
/// "out of range" for an offset inside the bounds, or with wrong bounds.
fn wrong_refusal(e: &StorageError, known: OffsetBounds, in_range: Option<u64>) -> Option<String> {
    match e {
        StorageError::OffsetOutOfRange(b) if *b != known => Some(format!(
            "reported bounds {b:?} in an out-of-range error, but its operations imply {known:?}"
        )),
        StorageError::OffsetOutOfRange(_) => in_range.map(|o| {
            format!(
                "refused offset {o} as out of range inside the log {}..{}",
                known.log_start, known.log_end
            )
        }),
        _ => None,
    }
}

/// Why an epoch cache is not strictly increasing in epoch with
/// non-decreasing start offsets, if it is not.
fn epochs_not_monotonic(entries: impl Iterator<Item = (u32, u64)>) -> Option<String> {
    let mut prev: Option<(u32, u64)> = None;
    for (e, s) in entries {
        if let Some((pe, ps)) = prev
            && (e <= pe || s < ps)
        {
            return Some(format!(
                "leader-epoch cache is not monotonic: ({pe}, {ps}) then ({e}, {s})"
            ));
        }
        prev = Some((e, s));
    }
    None
}

impl PluginLog {
    /// How many of this log's successful appends (counted from its
    /// opening) a finished write-behind round has synced to disk (see
    /// `Sandbox::write_behind`), or `None` when it has no write-behind.
    pub fn write_behind_synced(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.write_behind_synced.clone()
    }

    /// Close the log now and wait until the plugin has released it (its
    /// files closed), unlike dropping the handles, which closes it later.
    /// Other clones of this handle then get `Closed` faults.
    pub async fn close(self) {
        let _ = self.submit(Op::Close).await;
    }

    /// Start the log's task, instantiate the plugin and open the log there.
    /// The task owns the store and gets calls over a channel. It runs on
    /// the current runtime, with no thread hop per call, next to the
    /// partition actors and the network; WASI file I/O that may wait for
    /// the disk goes to the blocking pool (writes and cached reads stay
    /// inline). With `Sandbox::own_thread` it runs on a thread of its own
    /// instead, with all file I/O inline. Either way a guest yields at
    /// every epoch tick (see [`PluginState::store`]), and a call stuck in
    /// the kernel is reported by the caller-side deadline in
    /// [`Self::submit`]. Other partitions keep working meanwhile, unless
    /// the call is stuck in an inline write on the runtime (the first
    /// slow one sends every store's writes to the pool for a while: see
    /// `wasi_file_io.rs`). Must be called inside a tokio runtime.
    pub(crate) async fn spawn(plugin: StoragePlugin, spec: OpenSpec) -> StorageResult<PluginLog> {
        let label: Arc<str> = format!("{} {}/{}", plugin.name(), spec.topic, spec.partition).into();
        let sandbox = plugin.sandbox().clone();
        let write_behind = match (&spec.data_dir, sandbox.write_behind) {
            (Some(dir), Some(period)) if !period.is_zero() => {
                Some(WriteBehind::new(dir.clone(), period, label.clone()))
            }
            _ => None,
        };
        let write_behind_synced = write_behind.as_ref().map(WriteBehind::synced);
        let claim = match &spec.data_dir {
            Some(dir) => Some(
                DirClaim::wait_for(dir, CLAIM_WAIT).await.ok_or_else(|| {
                    StorageError::Unavailable(format!(
                        "{} is still in use by an earlier instance of this log (closing, or finishing a call that overran its deadline)",
                        dir.display()
                    ))
                })?,
            ),
            None => None,
        };
        let mut actor = Actor {
            plugin,
            spec,
            label: label.clone(),
            live: None,
            fault: None,
            known: OffsetBounds::default(),
            write_behind,
            damaged: None,
            waiter: None,
            claim,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (opened_tx, opened_rx) = oneshot::channel();
        let serve = async move {
            actor.waiter = Some(opened_tx);
            let opened = actor.instantiate().await;
            let ok = opened.is_ok();
            // Unless `guarded` answered already, at the deadline.
            let told = match actor.waiter.take() {
                Some(w) => w.send(opened.map(|()| Out::Unit)).is_ok(),
                None => false,
            };
            if !told || !ok {
                return;
            }
            actor.run(rx).await;
        };
        if sandbox.own_thread {
            super::sandbox::spawn_own_thread(format!("storage {label}"), label.clone(), serve)
                .map_err(|e| StorageError::Io(format!("starting the storage thread: {e}")))?;
        } else {
            tokio::spawn(serve);
        }
        let gone = || StorageError::Fault {
            plugin: label.to_string(),
            kind: FaultKind::Closed,
            detail: "the storage task ended while opening".into(),
        };
        let wait = sandbox.open_deadline * 2 + Duration::from_secs(1);
        match tokio::time::timeout(wait, opened_rx).await {
            Ok(Ok(Ok(_))) => Ok(PluginLog {
                tx,
                plugin: label,
                sandbox: Arc::new(sandbox),
                write_behind_synced,
            }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(StorageError::Fault {
                plugin: label.to_string(),
                kind: FaultKind::Deadline,
                detail: format!("opening did not finish within {wait:?}"),
            }),
        }
    }

    /// Queue `op` now, at call time, so calls are served in the order they
    /// were made even when the caller does not await one before making the
    /// next (pipelining); the returned future waits for the answer. The
    /// queue is unbounded: callers bound how many calls they keep in flight.
    ///
    /// The wait is bounded too: past twice the call deadline (queueing
    /// included) the caller gets a `Deadline` fault even if the storage
    /// task is stuck in a host call that no deadline can interrupt.
    fn submit(&self, op: Op) -> impl Future<Output = StorageResult<Out>> + Send + 'static {
        let plugin = self.plugin.clone();
        let fault = move |kind, detail: String| StorageError::Fault {
            plugin: plugin.to_string(),
            kind,
            detail,
        };
        let deadline = match op {
            Op::Recover => self.sandbox.open_deadline,
            _ => self.sandbox.call_deadline,
        };
        let wait = deadline * 2 + Duration::from_secs(1);
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Call { op, reply }).is_ok();
        async move {
            if !sent {
                return Err(fault(FaultKind::Closed, "the storage task is gone".into()));
            }
            match tokio::time::timeout(wait, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(fault(FaultKind::Closed, "the storage task is gone".into())),
                Err(_) => Err(fault(
                    FaultKind::Deadline,
                    format!("no answer within {wait:?}: the storage task is stuck"),
                )),
            }
        }
    }
}

macro_rules! expect_out {
    ($self:ident, $op:expr, $pat:pat => $v:expr) => {{
        let answer = $self.submit($op);
        async move {
            match answer.await? {
                $pat => Ok($v),
                _ => unreachable!("the actor answers each op with its own output kind"),
            }
        }
    }};
}

impl PluginLog {
    /// [`PartitionLog::append`] without its CRC pass, for batches the
    /// node sealed itself (a leader's restamp) or checked already (a
    /// follower's fetched batches, checked by the core): a second pass
    /// over every appended byte on every replica would buy nothing.
    pub(crate) fn append_sealed(
        &self,
        batches: Bytes,
    ) -> impl Future<Output = StorageResult<u64>> + Send {
        expect_out!(self, Op::Append(batches), Out::Offset(o) => o)
    }
}

impl PartitionLog for PluginLog {
    fn append(&self, batches: Bytes) -> impl Future<Output = StorageResult<u64>> + Send {
        // Refused here, on the caller's side, before the plugin sees it
        // (no fault); a refused append is never submitted, so the calls
        // made still take effect in order.
        let sent = crate::storage::check_sealed(&batches).map(|()| self.append_sealed(batches));
        async move { sent?.await }
    }
    fn read(
        &self,
        offset: u64,
        max_bytes: u32,
    ) -> impl Future<Output = StorageResult<Bytes>> + Send {
        expect_out!(self, Op::Read(offset, max_bytes), Out::Bytes(b) => b)
    }
    fn bounds(&self) -> impl Future<Output = StorageResult<OffsetBounds>> + Send {
        expect_out!(self, Op::Bounds, Out::Bounds(b) => b)
    }
    fn truncate(&self, offset: u64) -> impl Future<Output = StorageResult<u64>> + Send {
        expect_out!(self, Op::Truncate(offset), Out::Offset(o) => o)
    }
    fn delete_prefix(&self, offset: u64) -> impl Future<Output = StorageResult<()>> + Send {
        expect_out!(self, Op::DeletePrefix(offset), Out::Unit => ())
    }
    fn reset(&self, offset: u64) -> impl Future<Output = StorageResult<()>> + Send {
        expect_out!(self, Op::Reset(offset), Out::Unit => ())
    }
    fn high_watermark(&self) -> impl Future<Output = StorageResult<u64>> + Send {
        expect_out!(self, Op::HighWatermark, Out::Offset(o) => o)
    }
    fn set_high_watermark(&self, offset: u64) -> impl Future<Output = StorageResult<()>> + Send {
        expect_out!(self, Op::SetHighWatermark(offset), Out::Unit => ())
    }
    fn leader_epochs(&self) -> impl Future<Output = StorageResult<Vec<EpochEntry>>> + Send {
        expect_out!(self, Op::LeaderEpochs, Out::Epochs(e) => e)
    }
    fn set_leader_epochs(
        &self,
        entries: Vec<EpochEntry>,
    ) -> impl Future<Output = StorageResult<()>> + Send {
        expect_out!(self, Op::SetLeaderEpochs(entries), Out::Unit => ())
    }
    fn flush(&self) -> impl Future<Output = StorageResult<()>> + Send {
        expect_out!(self, Op::Flush, Out::Unit => ())
    }
    fn recover(&self) -> impl Future<Output = StorageResult<LogState>> + Send {
        expect_out!(self, Op::Recover, Out::State(s) => s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batches(bases: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        for &base in bases {
            let records: Vec<_> = (0..2)
                .map(|i| crate::batch::Record {
                    value: format!("m{}", base + i).into(),
                    ..Default::default()
                })
                .collect();
            out.extend_from_slice(&crate::batch::encode(base, 1, &records).expect("encode"));
        }
        out
    }

    #[test]
    fn the_first_damaged_batch_is_named_by_where_it_starts() {
        let whole = batches(&[10, 12, 14]);
        let one = whole.len() / 3;
        assert_eq!(first_damaged_batch(11, &whole), None);
        let mut second = whole.clone();
        second[2 * one - 3] ^= 1; // inside the second batch's records
        assert_eq!(first_damaged_batch(11, &second), Some((12, one)));
        let mut first = whole.clone();
        first[one - 3] ^= 1;
        // Its start is unknown; the read's offset is inside it.
        assert_eq!(first_damaged_batch(11, &first), Some((11, 0)));
        // A base offset changed (outside the CRC): the batch is out of place.
        let mut moved = whole.clone();
        moved[one] ^= 1; // the second batch's base offset
        assert_eq!(first_damaged_batch(11, &moved), Some((12, one)));
        assert_eq!(
            first_damaged_batch(9, &whole),
            Some((9, 0)),
            "the first does not hold 9"
        );
    }
}
