//! [`ReplicationManager`]: the state machine of one partition replica,
//! leader or follower. Sans-IO: every method takes the current time in
//! milliseconds and queues [`Action`]s that [`ReplicationManager::drain`]
//! hands to the driver; the driver reports storage and metadata results
//! back through `log_appended`, `log_truncated`, `log_reset` and
//! `isr_update_done`. No tokio, no quinn, no wasmtime.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::config::Config;
use super::epoch_cache::EpochCache;
use super::reconcile;
use super::retention::RetentionIndex;
use super::state::{PartitionReplicationState, ReplicationState};
use super::types::{
    Acks, Action, DivergingEpoch, ErrorCode, FetchRequest, FetchResponse, ProduceId, ReadSpec,
    Records, ReplicaId,
};
use crate::batch::{self, Record};
use crate::storage::LogState;

/// Batches whose sizes a leader keeps for fetch min-bytes: far more than
/// a follower lags by (it fetches again as soon as it has appended).
const SIZES_KEPT: usize = 4096;

/// Most bytes a leader accepts ahead of its storage. Produces beyond it
/// are refused with the retriable [`ErrorCode::StorageBacklog`] until the
/// storage catches up: without a bound, acks=0 producers (answered on
/// acceptance) could queue appends until the node ran out of memory.
pub const MAX_UNSTORED_BYTES: u64 = 64 << 20;

/// Most appends a leader accepts ahead of its storage (many tiny ones
/// cost memory beyond their bytes).
const MAX_UNSTORED_APPENDS: usize = 16_384;

/// A follower refused by a leader that has not yet learned the epoch it
/// leads fetches again after this fraction of `fetch_backoff_ms` (100 ms
/// of the default 1000), [`QUICK_RETRIES`] times per epoch at most: after an
/// election or a controlled shutdown a heartbeat tells the leader within
/// milliseconds, and a whole backoff would hold every acks=all write
/// behind it. (Otherwise it learns at its next metadata poll, and the
/// follower is back to whole backoffs by then.)
const LEADER_CATCHING_UP: u64 = 10;

/// Quick retries per epoch followed (see [`LEADER_CATCHING_UP`]).
const QUICK_RETRIES: u32 = 10;

/// Test-only switches that bring back the reference package's bugs, so the
/// simulation's checker can be shown to catch each one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// A new leader truncates its log to its high watermark.
    pub leader_truncates_to_hw: bool,
    /// The HW advances to the leader's LEO even with an empty ISR / below
    /// min.insync.
    pub hw_ignores_isr: bool,
    /// A follower truncates to its HW instead of asking by epoch.
    pub follower_truncates_to_hw: bool,
    /// Retention deletes up to the log end, committed or not.
    pub retention_ignores_hw: bool,
}

/// A role change [`ReplicationManager`] refuses: metadata that cannot
/// describe this replica's partition. The node checks it before it calls;
/// an embedder's driver may not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("replica {me} is not among the partition's replicas {replicas:?}")]
    NotAReplica {
        me: ReplicaId,
        replicas: Vec<ReplicaId>,
    },
    #[error("replica {me} cannot follow itself")]
    FollowsItself { me: ReplicaId },
    #[error(
        "leader epoch {epoch} is older than the newest this log holds ({held}): its batches would go out of epoch order"
    )]
    EpochBehindLog { epoch: u32, held: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Idle,
    Leader,
    Follower,
}

/// What the leader knows of one follower.
#[derive(Debug, Clone, Default)]
struct Progress {
    broker_epoch: u64,
    leo: Option<u64>,
    last_caught_up_ms: u64,
    last_fetch_ms: u64,
    leader_leo_at_last_fetch: u64,
}

#[derive(Debug)]
enum WaiterKind {
    /// A produce: answers `ProduceDone` with the batch's base offset.
    Produce(Acks),
    /// A `wait_for_isr`: answers `IsrWaitDone`.
    Wait,
}

#[derive(Debug)]
struct Waiter {
    id: ProduceId,
    base: u64,
    end: u64,
    kind: WaiterKind,
    deadline_ms: u64,
}

impl Waiter {
    fn done(&self, result: Result<(), ErrorCode>) -> Action {
        match self.kind {
            WaiterKind::Produce(_) => Action::ProduceDone {
                id: self.id,
                result: result.map(|()| self.base),
            },
            WaiterKind::Wait => Action::IsrWaitDone {
                id: self.id,
                result,
            },
        }
    }
}

#[derive(Debug)]
struct Parked {
    from: ReplicaId,
    request: FetchRequest,
    deadline_ms: u64,
    /// The HW when it was parked: a parked fetch is answered when the HW
    /// moves, so followers learn what is committed without waiting out
    /// their long poll (Kafka's DelayedFetch does the same).
    hw: u64,
}

#[derive(Debug)]
struct Leader {
    epoch: u32,
    replicas: Vec<ReplicaId>,
    isr: BTreeSet<ReplicaId>,
    /// An ISR change sent to the metadata store and not yet answered.
    /// With the version the change was proposed against, to match the
    /// store's answer to its request.
    pending_isr: Option<(BTreeSet<ReplicaId>, u64)>,
    version: u64,
    /// The log end when this epoch began.
    epoch_start: u64,
    progress: BTreeMap<ReplicaId, Progress>,
    waiters: Vec<Waiter>,
    parked: Vec<Parked>,
    /// The metadata store refused an ISR change: another controller view
    /// won. Stop acknowledging until new metadata arrives.
    fenced: bool,
    /// (next offset, cumulative bytes) of the last [`SIZES_KEPT`] batches
    /// appended in this epoch, for fetch min-bytes.
    sizes: VecDeque<(u64, u64)>,
    bytes_appended: u64,
    /// (log end after it, bytes) of each append handed to the storage and
    /// not yet stored, oldest first: what [`MAX_UNSTORED_BYTES`] bounds.
    unstored: VecDeque<(u64, u64)>,
    unstored_bytes: u64,
}

#[derive(Debug)]
struct Follower {
    leader: ReplicaId,
    epoch: u32,
    inflight: Option<u64>,
    next_fetch_ms: u64,
    leader_hw: u64,
    /// Quick retries left while the leader has not learned its epoch (see
    /// [`LEADER_CATCHING_UP`]).
    quick_retries: u32,
    /// When the leader last answered a fetch in this epoch, if it has.
    answered_ms: Option<u64>,
}

/// Per-replica counters, read by the metrics collector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaCounters {
    pub fetch_requests: u64,
    pub fetch_errors: u64,
    pub fetch_bytes: u64,
    pub isr_shrinks: u64,
    pub isr_expands: u64,
    /// Truncations and resets issued.
    pub truncations: u64,
    /// Log-start moves issued by retention.
    pub retention_deletions: u64,
}

/// The state machine of one partition replica (the reference API's
/// `ReplicationManager`, with `LeaderReplicator` and `FollowerReplicator`
/// as its two roles).
#[derive(Debug)]
pub struct ReplicationManager {
    config: Config,
    id: ReplicaId,
    /// This broker's incarnation, sent with every fetch.
    broker_epoch: u64,
    log_start: u64,
    /// Offset after the last batch the storage confirmed.
    leo: u64,
    /// Offset after the last batch handed to the storage.
    assigned: u64,
    /// Storage operations handed out and not yet confirmed.
    storage_inflight: u32,
    /// Of those, truncations and resets: while any is pending the log end
    /// is about to move down, so nothing is appended or acknowledged.
    truncating: u32,
    /// Where the pending truncation was asked to cut.
    truncate_target: Option<u64>,
    hw: u64,
    epochs: EpochCache,
    /// The log's segments, for `retention_bytes`.
    retention: RetentionIndex,
    /// A retention deletion is with the storage.
    deleting: bool,
    leader: Option<Leader>,
    follower: Option<Follower>,
    outbox: Vec<Action>,
    next_correlation: u64,
    last_hw_checkpoint_ms: u64,
    /// The HW and log end at the last checkpoint this state machine wrote
    /// (none yet: the first interval writes, since what storage holds may
    /// be above the log end it loaded with). An idle partition, whose
    /// checkpoint would be the same, is not written again: an idle node
    /// with 1000 partitions rewrote and synced 1000 files every interval.
    /// The log end counts because a checkpoint is also when some plugins
    /// push out buffered appends (the S3 plugin uploads first), and while
    /// the HW is stuck (an ISR below min.insync) appends still come.
    checkpointed: Option<(u64, u64)>,
    /// The HW storage holds (as loaded, then as last checkpointed): a cut
    /// below it checkpoints at once (see `cut_done`).
    stored_hw: u64,
    counters: ReplicaCounters,
    faults: Faults,
}

impl ReplicationManager {
    /// A replica of a partition whose log holds `state` (as read from
    /// storage on open or recovery).
    pub fn new(config: Config, id: ReplicaId, state: &LogState) -> Self {
        // The epoch cache may have been persisted ahead of appends a crash
        // undid: it describes the log, so cut it to the log's end (Kafka's
        // recovery does the same).
        let mut epochs = EpochCache::from_entries(state.leader_epochs.clone());
        let mut outbox = Vec::new();
        if epochs.truncate_to(state.bounds.log_end) {
            outbox.push(Action::PersistEpochs(epochs.entries().to_vec()));
        }
        // Capped at the log end, as Kafka does on restart. Nothing below
        // the log start can be read, so the HW is at least there (Kafka
        // clamps it the same way).
        let hw = state
            .high_watermark
            .min(state.bounds.log_end)
            .max(state.bounds.log_start);
        // A stored HW above the log (a crash undid appends it counted) is
        // lowered in storage first, for the reason `cut_done` gives.
        if hw < state.high_watermark {
            outbox.push(Action::PersistHighWatermark(hw));
        }
        ReplicationManager {
            config,
            id,
            broker_epoch: 0,
            log_start: state.bounds.log_start,
            leo: state.bounds.log_end,
            assigned: state.bounds.log_end,
            storage_inflight: 0,
            truncating: 0,
            truncate_target: None,
            hw,
            epochs,
            retention: RetentionIndex::new(state.bounds.log_start, state.bounds.log_end),
            deleting: false,
            leader: None,
            follower: None,
            outbox,
            next_correlation: 0,
            last_hw_checkpoint_ms: 0,
            checkpointed: None,
            stored_hw: hw,
            counters: ReplicaCounters::default(),
            faults: Faults::default(),
        }
    }

    /// Set this broker's epoch (its registration with the metadata store,
    /// new at every start), carried by every fetch it sends.
    pub fn set_broker_epoch(&mut self, epoch: u64) {
        self.broker_epoch = epoch;
    }

    /// Start this replica's fetch correlation ids above `base`, so ids of a
    /// new incarnation (a restart, a rebuilt state machine) do not repeat
    /// ids the leader may still hold parked from an old one.
    pub fn seed_correlation(&mut self, base: u64) {
        self.next_correlation = self.next_correlation.max(base);
    }

    /// Bring back reference-package bugs (negative controls for tests).
    #[doc(hidden)]
    pub fn set_faults(&mut self, faults: Faults) {
        self.faults = faults;
    }

    /// The actions queued since the last call.
    pub fn drain(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.outbox)
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }
    pub fn role(&self) -> Role {
        match (&self.leader, &self.follower) {
            (Some(_), _) => Role::Leader,
            (_, Some(_)) => Role::Follower,
            _ => Role::Idle,
        }
    }
    pub fn is_leader(&self) -> bool {
        self.leader.as_ref().is_some_and(|l| !l.fenced)
    }

    /// On a leader: whether `replica`'s incarnation `broker_epoch` fetched
    /// within `within_ms` of `now` from an offset at or past the HW, so it
    /// could lead at once. Preferred leader election asks this before it
    /// hands over: the store's ISR may still list a replica that restarted
    /// (with a log that may have lost records and a hand-off pending) or
    /// whose storage is recovering, and neither fetches until it is done.
    pub fn follower_ready(
        &self,
        replica: ReplicaId,
        broker_epoch: u64,
        now: u64,
        within_ms: u64,
    ) -> bool {
        self.caught_up(replica, now, within_ms)
            .is_some_and(|p| p.broker_epoch == broker_epoch)
    }

    /// On a leader: `replica`'s progress if it fetched within `within_ms`
    /// of `now` from an offset at or past the HW.
    fn caught_up(&self, replica: ReplicaId, now: u64, within_ms: u64) -> Option<&Progress> {
        self.leader
            .as_ref()
            .filter(|l| !l.fenced)
            .and_then(|l| l.progress.get(&replica))
            .filter(|p| {
                now.saturating_sub(p.last_fetch_ms) <= within_ms
                    && p.leo.is_some_and(|leo| leo >= self.hw)
            })
    }

    /// Whether another live replica is known, at `now`, to hold every
    /// committed record this one holds, so this one may cut its log and
    /// fetch again (a batch of it is damaged). On a leader: another ISR
    /// member that fetched within the lag time from at or past the HW. On
    /// a follower: its leader answered a fetch within the lag time (a
    /// leader holds everything committed). Asked of this replica's own
    /// live view, not of the metadata store's, which may list a member
    /// that is gone or far behind.
    pub fn another_holds_the_committed(&self, now: u64) -> bool {
        let within = self.config.replica_lag_time_max_ms;
        if let Some(l) = self.leader.as_ref().filter(|l| !l.fenced) {
            return l
                .isr
                .iter()
                .any(|&r| r != self.id && self.caught_up(r, now, within).is_some());
        }
        self.follower.as_ref().is_some_and(|f| {
            f.leader != self.id
                && f.answered_ms
                    .is_some_and(|at| now.saturating_sub(at) <= within)
        })
    }
    pub fn leader_epoch(&self) -> Option<u32> {
        self.leader
            .as_ref()
            .map(|l| l.epoch)
            .or(self.follower.as_ref().map(|f| f.epoch))
    }
    pub fn high_watermark(&self) -> u64 {
        self.hw
    }
    pub fn log_end_offset(&self) -> u64 {
        self.leo
    }
    pub fn log_start_offset(&self) -> u64 {
        self.log_start
    }
    pub fn epochs(&self) -> &EpochCache {
        &self.epochs
    }
    /// The ISR the leader counts (committed, not pending), sorted.
    pub fn isr(&self) -> Vec<ReplicaId> {
        self.leader
            .as_ref()
            .map(|l| l.isr.iter().copied().collect())
            .unwrap_or_default()
    }
    /// The replication factor's replicas, if leader.
    pub fn replicas(&self) -> Vec<ReplicaId> {
        self.leader
            .as_ref()
            .map(|l| l.replicas.clone())
            .unwrap_or_default()
    }
    /// Under-replicated: the ISR is smaller than the replica set.
    pub fn is_under_replicated(&self) -> bool {
        self.leader
            .as_ref()
            .is_some_and(|l| l.isr.len() < l.replicas.len())
    }
    /// Each follower's LEO as the leader last heard it.
    pub fn follower_log_ends(&self) -> Vec<(ReplicaId, Option<u64>)> {
        self.leader
            .as_ref()
            .map(|l| l.progress.iter().map(|(id, p)| (*id, p.leo)).collect())
            .unwrap_or_default()
    }
    pub fn counters(&self) -> &ReplicaCounters {
        &self.counters
    }

    /// A snapshot of this replica's view of the partition.
    pub fn state(&self) -> PartitionReplicationState {
        let mut replica_states = BTreeMap::new();
        let (leader, replicas, isr) = match (&self.leader, &self.follower) {
            (Some(l), _) => {
                for (id, p) in &l.progress {
                    replica_states.insert(
                        *id,
                        ReplicationState {
                            replica_id: *id,
                            log_end_offset: p.leo,
                            last_fetch_ms: p.last_fetch_ms,
                            last_caught_up_ms: p.last_caught_up_ms,
                            fetch_lag: self.leo.saturating_sub(p.leo.unwrap_or(0)),
                            in_sync: l.isr.contains(id),
                        },
                    );
                }
                (
                    Some(self.id),
                    l.replicas.clone(),
                    l.isr.iter().copied().collect(),
                )
            }
            (_, Some(f)) => (Some(f.leader), Vec::new(), Vec::new()),
            _ => (None, Vec::new(), Vec::new()),
        };
        PartitionReplicationState {
            replica_id: self.id,
            role: self.role(),
            leader,
            leader_epoch: self.leader_epoch(),
            replicas,
            isr,
            replica_states,
            high_watermark: self.hw,
            log_end_offset: self.leo,
            log_start_offset: self.log_start,
        }
    }

    /// The log end a leader may count on: confirmed by the storage and not
    /// being truncated away (a truncation still in flight makes `assigned`
    /// smaller than `leo`).
    fn stable_leo(&self) -> u64 {
        if self.truncating > 0 {
            self.leo.min(self.assigned)
        } else {
            self.leo
        }
    }

    // ---- role changes -------------------------------------------------

    /// The partition's min.insync.replicas as this replica applies it.
    pub fn min_insync_replicas(&self) -> u32 {
        self.config.min_insync_replicas
    }

    /// The partition's own min.insync.replicas (a topic setting), replacing
    /// the broker default this manager was built with. Takes effect for
    /// the next produce and HW decision.
    pub fn set_min_insync_replicas(&mut self, n: u32) {
        self.config.min_insync_replicas = n.max(1);
    }

    /// Become leader of `epoch` with `replicas` and the ISR the metadata
    /// store holds at `version`. The log is kept as it is (a new leader
    /// never truncates); the epoch starts at the log end. Refused, with
    /// nothing changed, if this replica is not among `replicas` or `epoch`
    /// is older than the newest its log holds (its batches would go out of
    /// epoch order); the node checks both before, an embedder may not.
    pub fn become_leader(
        &mut self,
        epoch: u32,
        replicas: Vec<ReplicaId>,
        isr: Vec<ReplicaId>,
        version: u64,
        now: u64,
    ) -> Result<(), RoleError> {
        if !replicas.contains(&self.id) {
            return Err(RoleError::NotAReplica {
                me: self.id,
                replicas,
            });
        }
        self.check_epoch(epoch)?;
        self.step_down(ErrorCode::NotLeader);
        if self.faults.leader_truncates_to_hw && self.hw < self.assigned {
            // Reference bug: "reconcile" by cutting everything above the HW.
            self.cut_log(self.hw, false);
        }
        let start = self.assigned;
        if self.epochs.assign(epoch, start) {
            self.persist_epochs();
        }
        let progress = replicas
            .iter()
            .filter(|r| **r != self.id)
            .map(|r| {
                (
                    *r,
                    Progress {
                        last_caught_up_ms: now,
                        ..Progress::default()
                    },
                )
            })
            .collect();
        self.leader = Some(Leader {
            epoch,
            replicas,
            isr: isr.into_iter().collect(),
            pending_isr: None,
            version,
            epoch_start: start,
            progress,
            waiters: Vec::new(),
            parked: Vec::new(),
            fenced: false,
            sizes: VecDeque::new(),
            bytes_appended: 0,
            unstored: VecDeque::new(),
            unstored_bytes: 0,
        });
        self.maybe_advance_hw();
        Ok(())
    }

    /// `epoch` is not older than the newest this log holds.
    fn check_epoch(&self, epoch: u32) -> Result<(), RoleError> {
        match self.epochs.latest() {
            Some(held) if held.epoch > epoch => Err(RoleError::EpochBehindLog {
                epoch,
                held: held.epoch,
            }),
            _ => Ok(()),
        }
    }

    /// Follow `leader` in `epoch`. Nothing is truncated here: the first
    /// fetch carries the last fetched epoch and the leader says where the
    /// logs diverge. Refused, with nothing changed, if `leader` is this
    /// replica or `epoch` is older than the newest its log holds.
    pub fn become_follower(
        &mut self,
        leader: ReplicaId,
        epoch: u32,
        now: u64,
    ) -> Result<(), RoleError> {
        if leader == self.id {
            return Err(RoleError::FollowsItself { me: self.id });
        }
        self.check_epoch(epoch)?;
        self.step_down(ErrorCode::NotLeader);
        self.follower = Some(Follower {
            leader,
            epoch,
            inflight: None,
            next_fetch_ms: now,
            // What it knew committed stays committed until the leader says
            // where its HW is; 0 would drop the HW to the log start if an
            // append from its leadership finished before the first answer.
            leader_hw: self.hw,
            quick_retries: QUICK_RETRIES,
            answered_ms: None,
        });
        if self.faults.follower_truncates_to_hw && self.hw < self.assigned {
            // Reference bug (pre-KIP-101): cut to the HW on every leader change.
            self.cut_log(self.hw, false);
        }
        self.maybe_fetch(now);
        Ok(())
    }

    /// Stop serving: fail waiting producers and parked fetches.
    /// The metadata store says no replica leads (or not this one, without
    /// naming another yet): stop serving as leader or follower until the
    /// next `become_*`. Waiting producers and parked fetches get
    /// `NotLeader`.
    pub fn resign(&mut self) {
        self.step_down(ErrorCode::NotLeader);
    }

    /// Answer the parked fetch `correlation_id` from `from` now, with
    /// whatever is available (a multi-partition fetch whose other parts
    /// already have data must not wait for this one's long poll).
    pub fn release_fetch(&mut self, from: ReplicaId, correlation_id: u64) {
        let Some(l) = self.leader.as_mut() else {
            return;
        };
        let Some(i) = l
            .parked
            .iter()
            .position(|p| p.from == from && p.request.correlation_id == correlation_id)
        else {
            return;
        };
        let p = l.parked.swap_remove(i);
        self.respond(p.from, &p.request);
    }

    fn step_down(&mut self, why: ErrorCode) {
        if let Some(l) = self.leader.take() {
            for w in l.waiters {
                self.outbox.push(w.done(Err(why)));
            }
            for p in l.parked {
                self.outbox.push(Action::RespondFetch {
                    to: p.from,
                    response: self.response(p.request.correlation_id, l.epoch, Some(why)),
                    read: None,
                });
            }
        }
        self.follower = None;
    }

    // ---- produce ------------------------------------------------------

    /// Append `records` as one batch of this leader's epoch. Errors come
    /// back at once; the outcome comes later as [`Action::ProduceDone`],
    /// at the latest at `deadline_ms` (`RequestTimedOut`).
    pub fn produce(
        &mut self,
        id: ProduceId,
        records: &[Record],
        acks: Acks,
        deadline_ms: u64,
    ) -> Result<(), ErrorCode> {
        let batch = batch::Validated::encode(records).map_err(|_| ErrorCode::StorageError)?;
        self.produce_batches(id, batch, acks, deadline_ms)
    }

    /// [`Self::produce`] for records a producer already encoded and the
    /// caller checked ([`batch::Validated::check`]). They are taken as
    /// they are, with this leader's offsets and epoch written into their
    /// headers (in place when the batches are the only handle on their
    /// buffer; no per-record work), as Kafka's leader does.
    pub fn produce_batches(
        &mut self,
        id: ProduceId,
        batches: batch::Validated,
        acks: Acks,
        deadline_ms: u64,
    ) -> Result<(), ErrorCode> {
        let min_isr = self.config.min_insync_replicas as usize;
        let truncating = self.truncating > 0;
        let Some(l) = self.leader.as_mut() else {
            return Err(ErrorCode::NotLeader);
        };
        if l.fenced || truncating {
            // Not serving yet: a truncation from before this leadership is
            // still in flight, or the store refused this leader's view.
            return Err(ErrorCode::NotLeader);
        }
        if acks == Acks::All && l.isr.len() < min_isr {
            return Err(ErrorCode::NotEnoughReplicas);
        }
        // One batch larger than the bound still goes when nothing waits.
        if !l.unstored.is_empty()
            && (l.unstored_bytes + batches.len() as u64 > MAX_UNSTORED_BYTES
                || l.unstored.len() >= MAX_UNSTORED_APPENDS)
        {
            return Err(ErrorCode::StorageBacklog);
        }
        let base = self.assigned;
        let (bytes, end) =
            batch::restamp(batches, base, l.epoch).map_err(|_| ErrorCode::StorageError)?;
        l.bytes_appended += bytes.len() as u64;
        l.unstored.push_back((end, bytes.len() as u64));
        l.unstored_bytes += bytes.len() as u64;
        l.sizes.push_back((end, l.bytes_appended));
        if l.sizes.len() > SIZES_KEPT {
            // Bounded, or a long-lived leader grows by an entry per
            // produce. A fetch from before the oldest entry counts all
            // bytes since this epoch began: it is far behind, so its
            // min-bytes is met anyway.
            l.sizes.pop_front();
        }
        self.retention
            .appended(end, bytes.len() as u64, self.config.retention_bytes);
        self.assigned = end;
        self.storage_inflight += 1;
        self.outbox.push(Action::Append { batches: bytes });
        match acks {
            Acks::None => self.outbox.push(Action::ProduceDone {
                id,
                result: Ok(base),
            }),
            _ => l.waiters.push(Waiter {
                id,
                base,
                end,
                kind: WaiterKind::Produce(acks),
                deadline_ms,
            }),
        }
        Ok(())
    }

    // ---- storage results ----------------------------------------------

    /// The storage appended up to `new_leo`.
    pub fn log_appended(&mut self, new_leo: u64, now: u64) {
        self.storage_inflight = self.storage_inflight.saturating_sub(1);
        self.leo = self.leo.max(new_leo);
        if let Some(l) = self.leader.as_mut() {
            while let Some(&(end, len)) = l.unstored.front()
                && end <= self.leo
            {
                l.unstored.pop_front();
                l.unstored_bytes -= len;
            }
            self.complete_leader_acks();
            self.maybe_advance_hw();
            self.serve_parked(now, false);
        } else if let Some(f) = &self.follower {
            // Never below the log start (Kafka clamps the same way): a new
            // leader's HW may briefly lag where retention got here.
            self.hw = f.leader_hw.min(self.leo).max(self.log_start);
            self.maybe_fetch(now);
        }
        self.maybe_retain();
    }

    /// The storage truncated; the log now ends at `new_leo`.
    pub fn log_truncated(&mut self, new_leo: u64, now: u64) {
        // The cache was cut when the truncation was issued (an epoch this
        // replica started meanwhile, as a new leader, must survive); cut it
        // again only if the storage removed more than asked.
        if new_leo < self.truncate_target.take().unwrap_or(u64::MAX) {
            self.epochs.truncate_to(new_leo);
            self.retention.truncated(new_leo);
            // A leader's epoch, entered at the target, went with it: its
            // batches start at the new end now (produces wait for the cut,
            // so none came before). Without the entry, followers' older
            // epochs would look as if they ran to its log end (review).
            if let Some(l) = self.leader.as_mut() {
                l.epoch_start = l.epoch_start.min(new_leo);
                self.epochs.assign(l.epoch, new_leo);
            }
        }
        self.cut_done(new_leo, now);
    }

    /// The storage emptied the log to restart at `offset`.
    pub fn log_reset(&mut self, offset: u64, now: u64) {
        self.log_start = offset;
        // The leader's log start, where this restarts, is at most its HW:
        // everything before it is committed.
        self.hw = offset;
        self.cut_done(offset, now);
    }

    /// The storage deleted the prefix retention asked for.
    pub fn log_prefix_deleted(&mut self) {
        self.deleting = false;
        self.maybe_retain();
    }

    /// Move the log start past whole segments that `retention_bytes` no
    /// longer needs, below the HW only. The start moves at once, so no
    /// fetch or read is served from what is about to go; the storage
    /// deletes behind it.
    fn maybe_retain(&mut self) {
        let Some(limit) = self.config.retention_bytes else {
            return;
        };
        if self.deleting || self.truncating > 0 {
            return;
        }
        let upto = if self.faults.retention_ignores_hw {
            self.leo
        } else {
            self.hw
        };
        let Some(offset) = self
            .retention
            .deletable(limit, upto)
            .filter(|o| *o > self.log_start)
        else {
            return;
        };
        self.retention.deleted(offset);
        self.log_start = offset;
        self.deleting = true;
        self.counters.retention_deletions += 1;
        self.outbox.push(Action::DeletePrefix { offset });
    }

    /// A truncation or reset landed: the log ends at `new_leo`, the epoch
    /// cache held back meanwhile can be persisted, fetching may go on.
    fn cut_done(&mut self, new_leo: u64, now: u64) {
        self.storage_inflight = self.storage_inflight.saturating_sub(1);
        self.truncating = self.truncating.saturating_sub(1);
        self.leo = new_leo;
        self.assigned = new_leo;
        self.hw = self.hw.min(new_leo);
        // Cut back to the start of a batch that began before a log start
        // retention put inside it: the log is empty there now.
        self.log_start = self.log_start.min(new_leo);
        // A cut below the stored HW (an unclean election's divergence, a
        // damaged batch) checkpoints the lower HW at once, ahead of any
        // append on the ordered lane: with the old checkpoint, a crash
        // after this replica refetched up to it would restart with those
        // offsets counted as committed, which from another leader they may
        // not be. The stored HW, not the one in memory: a follower's HW
        // also falls to a new leader's lagging one, with no cut.
        if self.hw < self.stored_hw {
            self.checkpoint_hw();
        }
        self.persist_epochs();
        self.maybe_fetch(now);
        self.maybe_retain();
    }

    /// Checkpoint the HW now unless storage holds this one already: a
    /// clean shutdown does, so that the next start (and any replica an
    /// unclean election picks) resumes from the HW it knew, as Kafka's
    /// does, not from one up to an interval old.
    pub fn checkpoint_hw_now(&mut self) {
        if self.checkpointed != Some((self.hw, self.leo)) {
            self.checkpoint_hw();
        }
    }

    fn checkpoint_hw(&mut self) {
        self.checkpointed = Some((self.hw, self.leo));
        self.stored_hw = self.hw;
        self.outbox.push(Action::PersistHighWatermark(self.hw));
    }

    /// The storage failed an operation (a plugin fault): stop serving. The
    /// driver recovers the log and builds a new `ReplicationManager` from
    /// the state it re-reads; nothing more is acknowledged meanwhile.
    pub fn storage_failed(&mut self) {
        self.step_down(ErrorCode::StorageError);
    }

    /// Persist the epoch cache, unless a truncation is pending: the stored
    /// cache may run ahead of the stored log (recovery trims it) but must
    /// never lack an epoch whose batches are still on disk, or a crash
    /// before the truncation lands would mislead the next divergence check.
    fn persist_epochs(&mut self) {
        if self.truncating == 0 {
            self.outbox
                .push(Action::PersistEpochs(self.epochs.entries().to_vec()));
        }
    }

    /// Issue a truncation (or, with `reset`, an emptying of the log that
    /// restarts it at `offset`). The cache follows the log at once in
    /// memory: whatever this replica does next (fetch, lead a new epoch)
    /// builds on the cut log. It is persisted once the cut is done.
    fn cut_log(&mut self, offset: u64, reset: bool) {
        self.counters.truncations += 1;
        self.storage_inflight += 1;
        self.truncating += 1;
        self.assigned = offset;
        if reset {
            self.epochs.clear();
            self.retention.reset(offset);
            self.outbox.push(Action::ResetLog { offset });
        } else {
            self.truncate_target = Some(offset);
            self.epochs.truncate_to(offset);
            self.retention.truncated(offset);
            self.outbox.push(Action::Truncate { offset });
        }
    }

    // ---- leader: fetch handling ----------------------------------------

    /// A fetch response carrying this replica's offsets and no records.
    fn response(&self, correlation_id: u64, epoch: u32, error: Option<ErrorCode>) -> FetchResponse {
        FetchResponse {
            correlation_id,
            leader_epoch: epoch,
            error,
            high_watermark: self.hw,
            log_start_offset: self.log_start,
            log_end_offset: self.stable_leo(),
            diverging_epoch: None,
            records: Records::default(),
        }
    }

    /// A follower's fetch arrived.
    pub fn handle_fetch(&mut self, from: ReplicaId, request: FetchRequest, now: u64) {
        self.counters.fetch_requests += 1;
        let reply_error = |me: &mut Self, epoch, e| {
            me.counters.fetch_errors += 1;
            let response = me.response(request.correlation_id, epoch, Some(e));
            me.outbox.push(Action::RespondFetch {
                to: from,
                response,
                read: None,
            });
        };
        let Some(l) = self.leader.as_ref() else {
            let epoch = self.leader_epoch().unwrap_or(0);
            return reply_error(self, epoch, ErrorCode::NotLeader);
        };
        let epoch = l.epoch;
        if request.current_leader_epoch < epoch {
            return reply_error(self, epoch, ErrorCode::FencedLeaderEpoch);
        }
        if request.current_leader_epoch > epoch {
            return reply_error(self, epoch, ErrorCode::UnknownLeaderEpoch);
        }
        if from != request.replica_id || !l.progress.contains_key(&from) {
            return reply_error(self, epoch, ErrorCode::UnknownReplica);
        }
        if l.progress
            .get(&from)
            .is_some_and(|p| request.replica_epoch < p.broker_epoch)
        {
            return reply_error(self, epoch, ErrorCode::StaleBrokerEpoch);
        }
        // KIP-595: does the follower's last epoch end where it thinks?
        if let Some(last) = request.last_fetched_epoch {
            // No answer this log can stand behind: no epoch at all (a
            // leader enters its own at `become_leader`), or one older than
            // the cache's oldest where that one starts inside the log (the
            // cache lost entries; the host rebuilds such a cache at open),
            // so the batches below it are of epochs it no longer knows.
            // Whether the follower's records there match cannot be told:
            // neither truncate them (they may be committed) nor send
            // records it cannot check. It retries.
            let Some((e, end)) = self
                .epochs
                .entries()
                .first()
                .filter(|first| last >= first.epoch || first.start_offset <= self.log_start)
                .and_then(|_| self.epochs.end_offset_for(last, self.stable_leo()))
            else {
                return reply_error(self, epoch, ErrorCode::NotLeader);
            };
            let diverging = (e != last || request.fetch_offset > end).then_some(DivergingEpoch {
                epoch: e,
                end_offset: end,
            });
            if let Some(d) = diverging {
                let mut response = self.response(request.correlation_id, epoch, None);
                response.diverging_epoch = Some(d);
                self.outbox.push(Action::RespondFetch {
                    to: from,
                    response,
                    read: None,
                });
                return;
            }
        }
        if request.fetch_offset > self.stable_leo() && request.fetch_offset <= self.assigned {
            // Records this leader took (its last appends as a follower,
            // still being stored when it was elected: its epoch starts
            // after them) and has not stored yet. The follower holds them
            // too; out of range would make it truncate them and fetch
            // them again. It retries once they are stored.
            return reply_error(self, epoch, ErrorCode::StorageBacklog);
        }
        if request.fetch_offset < self.log_start || request.fetch_offset > self.stable_leo() {
            return reply_error(self, epoch, ErrorCode::OffsetOutOfRange);
        }
        let hw_before = self.hw;
        self.update_follower(from, request.replica_epoch, request.fetch_offset, now);
        self.maybe_expand_isr(from);
        self.maybe_advance_hw();
        let available = self.bytes_after(request.fetch_offset);
        // Parked only if nothing new is to be said: no data, and the HW did
        // not just move (this very fetch may have moved it).
        if available < u64::from(request.min_bytes)
            && request.max_wait_ms > 0
            && self.hw == hw_before
        {
            let hw = self.hw;
            if let Some(l) = self.leader.as_mut() {
                l.parked.push(Parked {
                    from,
                    deadline_ms: now.saturating_add(request.max_wait_ms),
                    request,
                    hw,
                });
            }
            return;
        }
        self.respond(from, &request);
    }

    fn respond(&mut self, to: ReplicaId, request: &FetchRequest) {
        let Some(l) = self.leader.as_ref() else {
            return;
        };
        let leo = self.stable_leo();
        let read = (request.fetch_offset < leo).then_some(ReadSpec {
            offset: request.fetch_offset,
            max_bytes: request.max_bytes.min(self.config.fetch_max_bytes),
            end: leo,
        });
        let response = self.response(request.correlation_id, l.epoch, None);
        self.outbox
            .push(Action::RespondFetch { to, response, read });
    }

    /// Bytes appended in this epoch after `offset`; data from before this
    /// epoch counts as plenty.
    fn bytes_after(&self, offset: u64) -> u64 {
        let Some(l) = self.leader.as_ref() else {
            return 0;
        };
        if offset >= self.stable_leo() {
            return 0;
        }
        if offset < l.epoch_start {
            return u64::MAX;
        }
        let upto = |o: u64| {
            let i = l.sizes.partition_point(|(next, _)| *next <= o);
            if i == 0 { 0 } else { l.sizes[i - 1].1 }
        };
        upto(self.stable_leo()).saturating_sub(upto(offset))
    }

    /// Answer parked fetches whose data arrived or whose wait ran out.
    fn serve_parked(&mut self, now: u64, expired_only: bool) {
        let Some(l) = self.leader.as_mut() else {
            return;
        };
        let parked = std::mem::take(&mut l.parked);
        let mut keep = Vec::new();
        for p in parked {
            let enough = self.bytes_after(p.request.fetch_offset) >= u64::from(p.request.min_bytes);
            if now >= p.deadline_ms || (!expired_only && enough) {
                self.respond(p.from, &p.request);
            } else {
                keep.push(p);
            }
        }
        if let Some(l) = self.leader.as_mut() {
            l.parked.extend(keep);
        }
    }

    fn update_follower(&mut self, from: ReplicaId, broker_epoch: u64, fetch_offset: u64, now: u64) {
        let leo = self.stable_leo();
        let Some(l) = self.leader.as_mut() else {
            return;
        };
        let Some(p) = l.progress.get_mut(&from) else {
            return;
        };
        if broker_epoch > p.broker_epoch {
            // A new incarnation: nothing it said before counts.
            *p = Progress {
                broker_epoch,
                last_caught_up_ms: p.last_caught_up_ms,
                ..Progress::default()
            };
        }
        // Kafka's rule: caught up now if it reached our end; caught up at
        // its previous fetch if it reached what our end was then.
        if fetch_offset >= leo {
            p.last_caught_up_ms = now;
        } else if fetch_offset >= p.leader_leo_at_last_fetch {
            p.last_caught_up_ms = p.last_caught_up_ms.max(p.last_fetch_ms);
        }
        p.leo = Some(fetch_offset);
        p.last_fetch_ms = now;
        p.leader_leo_at_last_fetch = leo;
    }

    // ---- leader: ISR and HW --------------------------------------------

    /// Members counted for the HW: the ISR plus a member being added; a
    /// member being removed still counts until the removal is accepted.
    fn maximal_isr(l: &Leader) -> BTreeSet<ReplicaId> {
        match &l.pending_isr {
            Some((p, _)) => l.isr.union(p).copied().collect(),
            None => l.isr.clone(),
        }
    }

    fn maybe_expand_isr(&mut self, from: ReplicaId) {
        let hw = self.hw;
        let Some(l) = self.leader.as_mut() else {
            return;
        };
        if l.fenced || l.pending_isr.is_some() || l.isr.contains(&from) {
            return;
        }
        let Some(leo) = l.progress.get(&from).and_then(|p| p.leo) else {
            return;
        };
        // Only a follower holding everything committed and everything from
        // before this epoch may join (scenario 6 of the reference doc).
        if leo >= hw && leo >= l.epoch_start {
            let mut isr = l.isr.clone();
            isr.insert(from);
            self.propose_isr(isr);
        }
    }

    fn propose_isr(&mut self, isr: BTreeSet<ReplicaId>) {
        let Some(l) = self.leader.as_mut() else {
            return;
        };
        let added = isr
            .difference(&l.isr)
            .map(|r| (*r, l.progress.get(r).map_or(0, |p| p.broker_epoch)))
            .collect();
        self.outbox.push(Action::UpdateIsr {
            leader_epoch: l.epoch,
            isr: isr.iter().copied().collect(),
            expected_version: l.version,
            added,
        });
        l.pending_isr = Some((isr, l.version));
    }

    /// The metadata store answered the ISR change proposed against
    /// `expected_version`: the new version, or a refusal. A refusal for a
    /// stale leader epoch (`FencedLeaderEpoch`) fences this leader until new
    /// metadata arrives; any other refusal (stale version, a member the
    /// store will not admit) drops the proposal, to be retried. Answers to
    /// anything but the pending proposal are ignored. A driver reports a
    /// write whose outcome it does not know only once it knows (it makes
    /// the same compare-and-set again until the store answers), with the
    /// store's state after a refusal, so that until then the proposal's
    /// members keep counting for the HW (`maximal_isr`).
    pub fn isr_update_done(
        &mut self,
        expected_version: u64,
        result: Result<u64, ErrorCode>,
        now: u64,
    ) {
        let Some(l) = self.leader.as_mut() else {
            return;
        };
        if l.pending_isr
            .as_ref()
            .is_none_or(|(_, v)| *v != expected_version)
        {
            return;
        }
        let Some((proposed, _)) = l.pending_isr.take() else {
            return;
        };
        match result {
            Ok(version) => {
                if proposed.len() < l.isr.len() {
                    self.counters.isr_shrinks += 1;
                } else {
                    self.counters.isr_expands += 1;
                }
                l.isr = proposed;
                l.version = version;
                self.complete_leader_acks();
                self.maybe_advance_hw();
                self.tick(now);
            }
            Err(ErrorCode::FencedLeaderEpoch) => {
                // A newer leader epoch exists: stop acknowledging until the
                // new metadata makes this replica leader again or follower.
                l.fenced = true;
            }
            Err(_) => {}
        }
    }

    /// The metadata store changed the ISR itself (e.g. it fenced a dead
    /// broker) while this replica leads `epoch`: adopt it. This also lifts
    /// the fence of a refused ISR change, since the view is now current.
    pub fn metadata_isr_changed(
        &mut self,
        epoch: u32,
        isr: Vec<ReplicaId>,
        version: u64,
        now: u64,
    ) {
        let Some(l) = self.leader.as_mut() else {
            return;
        };
        if l.epoch != epoch || version <= l.version {
            return;
        }
        let isr: BTreeSet<ReplicaId> = isr.into_iter().collect();
        if isr.len() < l.isr.len() {
            self.counters.isr_shrinks += 1;
        }
        l.isr = isr;
        l.version = version;
        l.pending_isr = None;
        l.fenced = false;
        self.complete_leader_acks();
        self.maybe_advance_hw();
        self.tick(now);
    }

    fn maybe_advance_hw(&mut self) {
        let min_isr = self.config.min_insync_replicas as usize;
        let Some(l) = self.leader.as_ref() else {
            return;
        };
        if l.fenced {
            return;
        }
        let candidate = if self.faults.hw_ignores_isr {
            Some(self.stable_leo())
        } else {
            let members = Self::maximal_isr(l);
            if l.isr.len() < min_isr || !members.contains(&self.id) {
                None
            } else {
                members
                    .iter()
                    .map(|m| {
                        if *m == self.id {
                            Some(self.stable_leo())
                        } else {
                            l.progress.get(m).and_then(|p| p.leo)
                        }
                    })
                    .try_fold(u64::MAX, |acc, leo| leo.map(|v| acc.min(v)))
            }
        };
        if let Some(c) = candidate
            && c > self.hw
        {
            self.hw = c;
            self.complete_leader_acks();
            self.serve_parked_behind_hw();
            self.maybe_retain();
        }
    }

    /// Answer parked fetches parked before the HW last moved: their
    /// followers' HWs are behind.
    fn serve_parked_behind_hw(&mut self) {
        let hw = self.hw;
        let Some(l) = self.leader.as_mut() else {
            return;
        };
        let (behind, keep): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut l.parked)
            .into_iter()
            .partition(|p| p.hw < hw);
        l.parked = keep;
        for p in behind {
            self.respond(p.from, &p.request);
        }
    }

    /// Complete waiters the HW (acks=all, `wait_for_isr`) or the log end
    /// (acks=1) now covers; any number may wait on any offsets.
    fn complete_leader_acks(&mut self) {
        let min_isr = self.config.min_insync_replicas as usize;
        let (hw, leo) = (self.hw, self.stable_leo());
        let Some(l) = self.leader.as_mut() else {
            return;
        };
        let isr_len = l.isr.len();
        let mut done = Vec::new();
        l.waiters.retain(|w| {
            let outcome = match w.kind {
                WaiterKind::Produce(Acks::Leader) | WaiterKind::Produce(Acks::None) => {
                    (leo >= w.end).then_some(Ok(()))
                }
                // The ISR shrank below min.insync after the append: the HW
                // cannot reach it until the ISR grows back, so say so now.
                WaiterKind::Produce(Acks::All) if hw < w.end && isr_len < min_isr => {
                    Some(Err(ErrorCode::NotEnoughReplicasAfterAppend))
                }
                _ => (hw >= w.end).then_some(Ok(())),
            };
            match outcome {
                Some(result) => {
                    done.push(w.done(result));
                    false
                }
                None => true,
            }
        });
        self.outbox.extend(done);
    }

    /// Answer [`Action::IsrWaitDone`] for `id` once the high watermark
    /// passes `offset` (every ISR member holds it), or with
    /// `RequestTimedOut` at `deadline_ms`. The reference API's `WaitForISR`.
    pub fn wait_for_isr(&mut self, id: u64, offset: u64, deadline_ms: u64) {
        let Some(l) = self.leader.as_mut() else {
            self.outbox.push(Action::IsrWaitDone {
                id,
                result: Err(ErrorCode::NotLeader),
            });
            return;
        };
        l.waiters.push(Waiter {
            id,
            base: offset,
            end: offset + 1,
            kind: WaiterKind::Wait,
            deadline_ms,
        });
        self.complete_leader_acks();
    }

    /// Answer waiters whose deadline passed with `RequestTimedOut`.
    fn expire_waits(&mut self, now: u64) {
        let Some(l) = self.leader.as_mut() else {
            return;
        };
        let mut done = Vec::new();
        l.waiters.retain(|w| {
            if now >= w.deadline_ms {
                done.push(w.done(Err(ErrorCode::RequestTimedOut)));
                false
            } else {
                true
            }
        });
        self.outbox.extend(done);
    }

    // ---- time -----------------------------------------------------------

    /// Let time pass: ISR shrink, expired long polls, HW checkpoints,
    /// follower fetches.
    pub fn tick(&mut self, now: u64) {
        if now.saturating_sub(self.last_hw_checkpoint_ms)
            >= self.config.high_watermark_checkpoint_interval_ms
        {
            self.last_hw_checkpoint_ms = now;
            if self.checkpointed != Some((self.hw, self.leo)) {
                self.checkpoint_hw();
            }
        }
        if self.leader.is_some() {
            self.serve_parked(now, true);
            self.expire_waits(now);
            self.maybe_shrink_isr(now);
        }
        self.maybe_fetch(now);
    }

    /// When `tick` next has work, as things stand (quinn-proto's
    /// `poll_timeout`): a driver that ticks at this time and asks again
    /// after every event misses nothing, and a replica with nothing timed
    /// ahead costs no wake-ups. `None`: no clock-driven work until an
    /// event. Ticking earlier is harmless (it does nothing); each clause
    /// mirrors one thing `tick` does, and the simulation checks that a
    /// tick before this time never acts.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut at: Option<u64> = None;
        let mut by = |t: u64| at = Some(at.map_or(t, |a| a.min(t)));
        // An unchanged checkpoint is not rewritten (see `checkpointed`).
        if self.checkpointed != Some((self.hw, self.leo)) {
            by(self
                .last_hw_checkpoint_ms
                .saturating_add(self.config.high_watermark_checkpoint_interval_ms));
        }
        if let Some(l) = &self.leader {
            l.parked.iter().for_each(|p| by(p.deadline_ms));
            l.waiters.iter().for_each(|w| by(w.deadline_ms));
            // `maybe_shrink_isr`: a member is out once it has not caught
            // up for more than the lag time, or is too many messages behind
            // (which only an append changes: due at once).
            if !l.fenced && l.pending_isr.is_none() {
                let lag_ms = self.config.replica_lag_time_max_ms;
                let leo = self.stable_leo();
                for r in l.isr.iter().filter(|r| **r != self.id) {
                    match l.progress.get(r) {
                        None => by(0),
                        Some(p) => {
                            let behind = self
                                .config
                                .replica_lag_max_messages
                                .is_some_and(|m| leo.saturating_sub(p.leo.unwrap_or(0)) > m);
                            by(if behind {
                                0
                            } else {
                                p.last_caught_up_ms.saturating_add(lag_ms).saturating_add(1)
                            });
                        }
                    }
                }
            }
        }
        // `maybe_fetch`.
        if self.storage_inflight == 0
            && let Some(f) = &self.follower
            && f.inflight.is_none()
        {
            by(f.next_fetch_ms);
        }
        at
    }

    fn maybe_shrink_isr(&mut self, now: u64) {
        let lag_ms = self.config.replica_lag_time_max_ms;
        let lag_msgs = self.config.replica_lag_max_messages;
        let leo = self.stable_leo();
        let Some(l) = self.leader.as_ref() else {
            return;
        };
        if l.fenced || l.pending_isr.is_some() {
            return;
        }
        let out: Vec<ReplicaId> = l
            .isr
            .iter()
            .copied()
            .filter(|r| *r != self.id)
            .filter(|r| {
                l.progress.get(r).is_none_or(|p| {
                    let slow = now.saturating_sub(p.last_caught_up_ms) > lag_ms;
                    let behind =
                        lag_msgs.is_some_and(|m| leo.saturating_sub(p.leo.unwrap_or(0)) > m);
                    slow || behind
                })
            })
            .collect();
        if !out.is_empty() {
            let isr = l.isr.iter().copied().filter(|r| !out.contains(r)).collect();
            self.propose_isr(isr);
        }
    }

    // ---- follower -------------------------------------------------------

    fn maybe_fetch(&mut self, now: u64) {
        if self.storage_inflight > 0 {
            return;
        }
        let request = {
            let Some(f) = self.follower.as_mut() else {
                return;
            };
            if f.inflight.is_some() || now < f.next_fetch_ms {
                return;
            }
            self.next_correlation += 1;
            f.inflight = Some(self.next_correlation);
            FetchRequest {
                replica_id: self.id,
                replica_epoch: self.broker_epoch,
                correlation_id: self.next_correlation,
                current_leader_epoch: f.epoch,
                fetch_offset: self.leo,
                // An empty log (retention deleted all of it, or it was just
                // reset) has nothing to reconcile. Its cache's last epoch
                // could predate everything a leader that restarted its own
                // log still knows, and that leader would answer "diverging
                // at my log start" forever.
                last_fetched_epoch: (self.leo > self.log_start)
                    .then(|| self.epochs.latest().map(|e| e.epoch))
                    .flatten(),
                max_bytes: self.config.fetch_max_bytes,
                min_bytes: self.config.fetch_min_bytes,
                max_wait_ms: self.config.fetch_max_wait_ms,
            }
        };
        if let Some(f) = &self.follower {
            self.outbox.push(Action::SendFetch {
                to: f.leader,
                request,
            });
        }
    }

    /// A fetch we sent timed out or was lost: allow the next one.
    pub fn fetch_failed(&mut self, correlation_id: u64, now: u64) {
        let backoff = self.config.fetch_backoff_ms;
        if let Some(f) = self.follower.as_mut()
            && f.inflight == Some(correlation_id)
        {
            f.inflight = None;
            f.next_fetch_ms = now + backoff;
            self.counters.fetch_errors += 1;
        }
    }

    /// The leader answered a fetch.
    pub fn handle_fetch_response(&mut self, from: ReplicaId, response: FetchResponse, now: u64) {
        let backoff = self.config.fetch_backoff_ms;
        let interval = self.config.fetcher_interval_ms;
        let leo = self.leo;
        let Some(f) = self.follower.as_mut() else {
            return;
        };
        if from != f.leader || f.inflight != Some(response.correlation_id) {
            return; // stale or foreign
        }
        f.inflight = None;
        if let Some(e) = response.error {
            self.counters.fetch_errors += 1;
            f.next_fetch_ms = now + backoff;
            // The leader is in an older epoch than the one this replica
            // follows it in (0: it has no role there at all, which no
            // heartbeat is about to fix): it has not learned of the
            // election yet, and will in a moment. This replica often hears
            // first after a controlled shutdown.
            let catching_up = matches!(e, ErrorCode::NotLeader | ErrorCode::UnknownLeaderEpoch)
                && (1..f.epoch).contains(&response.leader_epoch);
            if catching_up && f.quick_retries > 0 {
                f.quick_retries -= 1;
                f.next_fetch_ms = now + (backoff / LEADER_CATCHING_UP).clamp(1, backoff.max(1));
            }
            if e == ErrorCode::OffsetOutOfRange && response.leader_epoch == f.epoch {
                // Not a failure of the leader: fix the log and fetch again.
                f.next_fetch_ms = now;
                if leo < response.log_start_offset {
                    // Behind the leader's log start: restart there.
                    self.cut_log(response.log_start_offset, true);
                    return;
                }
                if leo > response.log_end_offset {
                    let end = response.log_end_offset;
                    if end < self.log_start {
                        // Its whole log lies past the leader's end (an
                        // unclean election chose a shorter replica, and
                        // retention here had moved the start past that
                        // end), and no truncation goes below the log
                        // start: start over, empty. At the leader's start,
                        // not its end (where Kafka's truncate-fully-and-
                        // start-at goes): nothing here is worth keeping,
                        // and this way the replica holds all the leader
                        // holds, not only what it writes from now on.
                        self.cut_log(response.log_start_offset.min(end), true);
                    } else {
                        self.cut_log(end, false);
                    }
                    return;
                }
            }
            return;
        }
        if response.leader_epoch != f.epoch {
            return;
        }
        if let Some(d) = response.diverging_epoch {
            // Truncate exactly to the divergence point (KIP-101/279/595).
            let target = reconcile::divergence_point(&self.epochs, leo, self.log_start, d);
            f.next_fetch_ms = now;
            self.cut_log(target, false);
            return;
        }
        f.leader_hw = response.high_watermark;
        f.answered_ms = Some(now);
        self.counters.fetch_bytes += response.records.len() as u64;
        if response.records.is_empty() {
            self.hw = response.high_watermark.min(leo).max(self.log_start);
            f.next_fetch_ms = now + interval;
            self.maybe_fetch(now);
            self.maybe_retain();
            return;
        }
        // Check all the leader sent before any of it reaches storage or
        // the epoch cache.
        let mut next = leo;
        let mut starts = Vec::new();
        // Epochs never decrease along a log: not below the latest epoch
        // of this log's batches (a divergence answer cut any later one
        // away first), nor below the batch before. An epoch that starts at
        // the log end holds no batch (this replica led it and wrote
        // nothing), and an empty log holds none at all: it sent no last
        // epoch, so no divergence answer cut what its cache remembers of
        // deleted batches. Neither sets a floor; the cache gives way below.
        let empty = leo <= self.log_start;
        let mut floor = if empty {
            0
        } else {
            self.epochs
                .entries()
                .iter()
                .rev()
                .find(|e| e.start_offset < leo)
                .map_or(0, |e| e.epoch)
        };
        // From the wire this is one piece, so no copy.
        let records = response.records.into_contiguous();
        for b in replicator_plugin_sdk::batches(&records, true) {
            match b {
                Ok((h, _))
                    if h.base_offset == next && (floor..=f.epoch).contains(&h.leader_epoch) =>
                {
                    floor = h.leader_epoch;
                    starts.push((h.leader_epoch, h.base_offset));
                    next = h.next_offset();
                }
                _ => {
                    self.counters.fetch_errors += 1;
                    f.next_fetch_ms = now + backoff;
                    return;
                }
            }
        }
        let mut changed = self.epochs.truncate_to(leo);
        if empty && let Some(&(first, _)) = starts.first() {
            changed |= self.epochs.truncate_from_epoch(first);
        }
        for (epoch, start) in starts {
            changed |= self.epochs.assign(epoch, start);
        }
        f.next_fetch_ms = now + interval;
        self.retention
            .appended(next, records.len() as u64, self.config.retention_bytes);
        self.assigned = next;
        self.storage_inflight += 1;
        if changed {
            self.persist_epochs();
        }
        self.outbox.push(Action::Append { batches: records });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Record;
    use crate::storage::{LogState, OffsetBounds};

    /// Node 2 following node 1 in epoch 5; the correlation id of the fetch
    /// it sent.
    fn follower_of_epoch_5() -> (ReplicationManager, u64) {
        let state = LogState {
            bounds: OffsetBounds::default(),
            high_watermark: 0,
            leader_epochs: Vec::new(),
        };
        let mut rm = ReplicationManager::new(Config::default(), 2, &state);
        rm.become_follower(1, 5, 0).expect("role change");
        rm.tick(0);
        let sent = rm.drain().into_iter().find_map(|a| match a {
            Action::SendFetch { request, .. } => Some(request.correlation_id),
            _ => None,
        });
        (rm, sent.expect("a fetch"))
    }

    fn refusal(correlation_id: u64, leader_epoch: u32, error: ErrorCode) -> FetchResponse {
        FetchResponse {
            correlation_id,
            leader_epoch,
            error: Some(error),
            high_watermark: 0,
            log_start_offset: 0,
            log_end_offset: 0,
            diverging_epoch: None,
            records: Default::default(),
        }
    }

    /// The first fetch `rm` sends from `from` on, ticking every ms for a
    /// backoff: when, and its correlation id.
    fn next_fetch(rm: &mut ReplicationManager, from: u64) -> Option<(u64, u64)> {
        (from..=from + Config::default().fetch_backoff_ms).find_map(|t| {
            rm.tick(t);
            rm.drain().into_iter().find_map(|a| match a {
                Action::SendFetch { request, .. } => Some((t, request.correlation_id)),
                _ => None,
            })
        })
    }

    /// When the next fetch goes out after `response`, in ms after it.
    fn next_fetch_after(error: ErrorCode, leader_epoch: u32) -> u64 {
        let (mut rm, id) = follower_of_epoch_5();
        rm.handle_fetch_response(1, refusal(id, leader_epoch, error), 1000);
        next_fetch(&mut rm, 1000).map_or(u64::MAX, |(t, _)| t - 1000)
    }

    #[test]
    fn a_leader_that_has_not_learned_its_epoch_yet_is_asked_again_soon() {
        let backoff = Config::default().fetch_backoff_ms;
        let soon = backoff / LEADER_CATCHING_UP;
        // Refused by a node still in epoch 4: it is about to learn of 5.
        assert_eq!(next_fetch_after(ErrorCode::NotLeader, 4), soon);
        assert_eq!(next_fetch_after(ErrorCode::UnknownLeaderEpoch, 4), soon);
        // Refused in the epoch it was asked for, or by a newer one, or by
        // a node with no role there (epoch 0): the whole backoff.
        assert_eq!(next_fetch_after(ErrorCode::NotLeader, 5), backoff);
        assert_eq!(next_fetch_after(ErrorCode::FencedLeaderEpoch, 6), backoff);
        assert_eq!(next_fetch_after(ErrorCode::StorageError, 4), backoff);
        assert_eq!(next_fetch_after(ErrorCode::NotLeader, 0), backoff);
    }

    #[test]
    fn quick_retries_are_bounded_per_epoch() {
        let backoff = Config::default().fetch_backoff_ms;
        let (mut rm, mut id) = follower_of_epoch_5();
        let mut waits = Vec::new();
        let mut now = 1000;
        for _ in 0..QUICK_RETRIES + 2 {
            rm.handle_fetch_response(1, refusal(id, 4, ErrorCode::NotLeader), now);
            let (t, next) = next_fetch(&mut rm, now).expect("a fetch within the backoff");
            waits.push(t - now);
            (now, id) = (t, next);
        }
        let soon = backoff / LEADER_CATCHING_UP;
        assert!(
            waits[..QUICK_RETRIES as usize].iter().all(|w| *w == soon),
            "{waits:?}"
        );
        assert!(
            waits[QUICK_RETRIES as usize..]
                .iter()
                .all(|w| *w == backoff),
            "{waits:?}"
        );
    }

    /// Node 1 leading epoch 1 of an empty log, alone in its ISR.
    fn sole_leader() -> ReplicationManager {
        let state = LogState {
            bounds: OffsetBounds {
                log_start: 0,
                log_end: 0,
            },
            high_watermark: 0,
            leader_epochs: Vec::new(),
        };
        let mut rm = ReplicationManager::new(Config::default(), 1, &state);
        rm.become_leader(1, vec![1, 2], vec![1], 1, 0)
            .expect("role change");
        rm
    }

    /// A role the metadata cannot give this replica (not a replica, its
    /// own follower, an epoch older than its log's) is refused, and the
    /// replica goes on as it was: an embedder's driver gets an error, not
    /// a leader of someone else's partition or batches out of epoch order.
    #[test]
    fn a_role_the_metadata_cannot_give_is_refused_and_changes_nothing() {
        let mut rm = sole_leader_with(10);
        // A produce waiting for the ISR: a refusal must not fail it.
        let waiting = [Record::default()];
        assert!(rm.produce(10, &waiting, Acks::All, 60_000).is_ok());
        rm.drain();
        let before = (rm.role(), rm.leader_epoch(), rm.high_watermark());
        assert_eq!(
            rm.become_leader(2, vec![2, 3], vec![2, 3], 5, 0),
            Err(RoleError::NotAReplica {
                me: 1,
                replicas: vec![2, 3]
            })
        );
        assert_eq!(
            rm.become_follower(1, 2, 0),
            Err(RoleError::FollowsItself { me: 1 })
        );
        let behind = Err(RoleError::EpochBehindLog { epoch: 0, held: 1 });
        assert_eq!(rm.become_follower(2, 0, 0), behind);
        assert_eq!(rm.become_leader(0, vec![1, 2], vec![1], 5, 0), behind);
        assert_eq!((rm.role(), rm.leader_epoch(), rm.high_watermark()), before);
        assert!(rm.drain().is_empty(), "a refusal did something");
        assert!(rm.become_follower(2, 2, 0).is_ok());
        assert_eq!(rm.role(), Role::Follower);
    }

    /// [`sole_leader`] after `n` produces of one 10-byte record each, all
    /// appended.
    fn sole_leader_with(n: u64) -> ReplicationManager {
        let mut rm = sole_leader();
        let record = [Record {
            value: bytes::Bytes::from_static(b"0123456789"),
            ..Default::default()
        }];
        for id in 0..n {
            assert!(rm.produce(id, &record, Acks::Leader, 60_000).is_ok());
        }
        rm.log_appended(n, 0);
        rm
    }

    /// What `rm` does from `from` to `until` with nothing else happening,
    /// ticked every millisecond, or (`at_deadlines`) only when
    /// `next_deadline` says: each action with its time, and the ticks.
    fn timeline(
        mut rm: ReplicationManager,
        from: u64,
        until: u64,
        at_deadlines: bool,
    ) -> (Vec<(u64, String)>, usize) {
        let mut seen = Vec::new();
        let mut ticks = 0;
        let mut now = from;
        while now <= until {
            rm.tick(now);
            ticks += 1;
            seen.extend(rm.drain().iter().map(|a| (now, format!("{a:?}"))));
            now = if at_deadlines {
                match rm.next_deadline() {
                    Some(d) => {
                        assert!(d > now, "still due at {d} after a tick at {now}");
                        d
                    }
                    None => break,
                }
            } else {
                now + 1
            };
        }
        (seen, ticks)
    }

    /// A driver that ticks only when the core's next deadline says sees
    /// the same actions at the same times as one ticking every millisecond:
    /// a long poll's expiry, a produce's timeout, the first HW checkpoint,
    /// an ISR member dropped for lagging, a follower's fetch after a
    /// backoff. And it wakes a handful of times in 40 s, not 40,000.
    #[test]
    fn ticking_at_the_next_deadline_misses_nothing() {
        let leader = || {
            let state = LogState {
                bounds: OffsetBounds::default(),
                high_watermark: 0,
                leader_epochs: Vec::new(),
            };
            let mut rm = ReplicationManager::new(Config::default(), 1, &state);
            rm.become_leader(1, vec![1, 2, 3], vec![1, 2, 3], 1, 0)
                .expect("role change");
            // Node 2 long-polls for more than there will be; 3 is silent.
            let fetch = FetchRequest {
                replica_id: 2,
                replica_epoch: 1,
                correlation_id: 7,
                current_leader_epoch: 1,
                fetch_offset: 0,
                last_fetched_epoch: None,
                max_bytes: 1 << 20,
                min_bytes: 1 << 20,
                max_wait_ms: 500,
            };
            rm.handle_fetch(2, fetch, 10);
            let record = [Record {
                value: bytes::Bytes::from_static(b"v"),
                ..Default::default()
            }];
            assert!(rm.produce(1, &record, Acks::All, 1_000).is_ok());
            rm.log_appended(1, 20);
            rm.drain();
            rm
        };
        let (every_ms, ticks) = timeline(leader(), 20, 40_000, false);
        let (at_deadlines, woken) = timeline(leader(), 20, 40_000, true);
        assert_eq!(at_deadlines, every_ms);
        assert!(ticks > 39_000 && woken <= 6, "{woken} wake-ups");
        let when = |what: &str| {
            every_ms
                .iter()
                .find(|(_, a)| a.contains(what))
                .map(|(t, _)| *t)
        };
        assert_eq!(when("RespondFetch"), Some(510));
        assert_eq!(when("RequestTimedOut"), Some(1_000));
        assert_eq!(when("PersistHighWatermark"), Some(5_000));
        // 3 has not caught up since the election, 2 since its fetch at 10.
        assert_eq!(when("UpdateIsr"), Some(30_001));

        let follower = || {
            let (mut rm, id) = follower_of_epoch_5();
            rm.fetch_failed(id, 100);
            rm
        };
        let (every_ms, _) = timeline(follower(), 100, 3_000, false);
        let (at_deadlines, woken) = timeline(follower(), 100, 3_000, true);
        assert_eq!(at_deadlines, every_ms);
        assert!(woken <= 3, "{woken} wake-ups");
        let backoff = Config::default().fetch_backoff_ms;
        assert_eq!(
            every_ms
                .iter()
                .find(|(_, a)| a.contains("SendFetch"))
                .map(|(t, _)| *t),
            Some(100 + backoff)
        );
    }

    /// A cut below the stored HW checkpoints the lower HW at once, not at the
    /// next interval: a crash after refetching past the cut would otherwise
    /// restart with the old HW, counting another leader's offsets up to it as
    /// committed. So does opening a log that ends below its stored HW. A cut
    /// above it leaves the checkpoint to the interval.
    #[test]
    fn a_cut_below_the_hw_checkpoints_it_at_once() {
        let state = LogState {
            bounds: OffsetBounds {
                log_start: 0,
                log_end: 10,
            },
            high_watermark: 8,
            leader_epochs: Vec::new(),
        };
        let mut rm = ReplicationManager::new(Config::default(), 1, &state);
        assert_eq!(checkpoints(&mut rm), Vec::<u64>::new(), "opened as stored");
        rm.log_truncated(9, 0);
        assert_eq!(checkpoints(&mut rm), Vec::<u64>::new(), "above the HW");
        rm.log_truncated(4, 0);
        assert_eq!(checkpoints(&mut rm), [4], "below the HW");
        assert_eq!(rm.high_watermark(), 4);
        rm.log_reset(2, 0);
        assert_eq!(checkpoints(&mut rm), [2], "a reset below it");
        // A crash undid appends the stored HW counted.
        let undone = LogState {
            bounds: OffsetBounds {
                log_start: 0,
                log_end: 6,
            },
            ..state
        };
        let mut rm = ReplicationManager::new(Config::default(), 1, &undone);
        assert_eq!(checkpoints(&mut rm), [6], "opened below the stored HW");
        rm.log_truncated(5, 0);
        assert_eq!(checkpoints(&mut rm), [5]);
    }

    /// The storage cut further than asked while the replica became leader
    /// of a new epoch: the epoch's entry, which the cut took with it, is
    /// entered again at the new log end, where its batches will start.
    #[test]
    fn a_cut_past_its_target_keeps_a_new_leaders_epoch() {
        let state = LogState {
            bounds: OffsetBounds {
                log_start: 0,
                log_end: 10,
            },
            high_watermark: 4,
            leader_epochs: vec![crate::storage::EpochEntry {
                epoch: 1,
                start_offset: 0,
            }],
        };
        let mut rm = ReplicationManager::new(Config::default(), 1, &state);
        rm.cut_log(8, false);
        rm.become_leader(2, vec![1, 2], vec![1, 2], 1, 0)
            .expect("role change");
        rm.log_truncated(6, 0);
        let entries: Vec<(u32, u64)> = rm
            .epochs
            .entries()
            .iter()
            .map(|e| (e.epoch, e.start_offset))
            .collect();
        assert_eq!(entries, [(1, 0), (2, 6)]);
        assert_eq!(rm.leader.as_ref().map(|l| l.epoch_start), Some(6));
    }

    /// The HW checkpoints `rm` asked for since it was last drained.
    fn checkpoints(rm: &mut ReplicationManager) -> Vec<u64> {
        rm.drain()
            .into_iter()
            .filter_map(|a| match a {
                Action::PersistHighWatermark(hw) => Some(hw),
                _ => None,
            })
            .collect()
    }

    /// The HW is checkpointed at the first interval, then only when the
    /// HW or the log end moved since.
    #[test]
    fn an_unchanged_high_watermark_is_not_checkpointed_again() {
        let every = Config::default().high_watermark_checkpoint_interval_ms;
        let mut rm = sole_leader();
        rm.drain();
        // The first interval writes what it holds; then nothing changed.
        rm.tick(every);
        assert_eq!(checkpoints(&mut rm), vec![0]);
        rm.tick(2 * every);
        assert_eq!(checkpoints(&mut rm), Vec::<u64>::new());
        let mut rm = sole_leader_with(10);
        assert_eq!(rm.high_watermark(), 10);
        rm.drain();
        rm.tick(every);
        assert_eq!(checkpoints(&mut rm), vec![10]);
        rm.tick(2 * every);
        assert_eq!(checkpoints(&mut rm), Vec::<u64>::new());
        // Appends with the HW stuck (acks=1, the ISR below min.insync):
        // the log end moved, so the checkpoint is written again.
        let mut stuck = sole_leader();
        stuck
            .become_leader(1, vec![1, 2], vec![1], 1, 0)
            .expect("role change");
        stuck.set_min_insync_replicas(2);
        let record = [Record {
            value: bytes::Bytes::from_static(b"0123456789"),
            ..Default::default()
        }];
        stuck.tick(every);
        stuck.drain();
        assert!(stuck.produce(0, &record, Acks::Leader, 60_000).is_ok());
        stuck.log_appended(1, every);
        assert_eq!(stuck.high_watermark(), 0);
        stuck.drain();
        stuck.tick(2 * every);
        assert_eq!(checkpoints(&mut stuck), vec![0]);
    }

    /// A clean shutdown checkpoints the HW at once if it moved since the
    /// last interval, and writes nothing if it did not.
    #[test]
    fn a_shutdown_checkpoints_a_high_watermark_that_moved() {
        let every = Config::default().high_watermark_checkpoint_interval_ms;
        let mut rm = sole_leader_with(10);
        rm.drain();
        rm.checkpoint_hw_now();
        assert_eq!(checkpoints(&mut rm), vec![10]);
        rm.checkpoint_hw_now();
        assert_eq!(checkpoints(&mut rm), Vec::<u64>::new());
        let mut rm = sole_leader_with(10);
        rm.tick(every);
        rm.drain();
        rm.checkpoint_hw_now();
        assert_eq!(checkpoints(&mut rm), Vec::<u64>::new());
    }

    /// A replica with a damaged batch cuts its log only if another live
    /// replica is known to hold what it committed: never the ISR's only
    /// member, nor a follower its leader has not answered lately.
    #[test]
    fn only_a_live_other_copy_allows_cutting_a_damaged_log() {
        let rm = sole_leader_with(10);
        assert!(rm.high_watermark() > 0);
        assert!(!rm.another_holds_the_committed(0), "the ISR's only member");
        let (f, _) = follower_of_epoch_5();
        assert!(!f.another_holds_the_committed(0), "never answered");
    }

    #[test]
    fn a_follower_is_ready_to_lead_only_in_its_current_incarnation_fetching_and_caught_up() {
        let mut rm = sole_leader_with(10);
        let fetch = |rm: &mut ReplicationManager, broker_epoch, offset, now| {
            let request = FetchRequest {
                replica_id: 2,
                replica_epoch: broker_epoch,
                correlation_id: now,
                current_leader_epoch: 1,
                fetch_offset: offset,
                last_fetched_epoch: None,
                max_bytes: 1 << 20,
                min_bytes: 0,
                max_wait_ms: 0,
            };
            rm.handle_fetch(2, request, now);
            rm.drain();
        };
        // Never fetched: not ready.
        assert!(!rm.follower_ready(2, 7, 100, 500));
        fetch(&mut rm, 7, 10, 100);
        let hw = rm.high_watermark();
        assert!(hw > 0, "the sole in-sync leader committed what it appended");
        assert!(rm.follower_ready(2, 7, 100, 500));
        assert!(rm.follower_ready(2, 7, 600, 500));
        // Silent for longer than the bound, or another incarnation.
        assert!(!rm.follower_ready(2, 7, 601, 500));
        assert!(!rm.follower_ready(2, 8, 100, 500));
        // A new incarnation fetching from behind the HW (its log lost the
        // tail) is not ready, even in the ISR.
        fetch(&mut rm, 8, 3, 700);
        assert!(!rm.follower_ready(2, 8, 700, 500));
        assert!(!rm.follower_ready(2, 7, 700, 500));
        fetch(&mut rm, 8, 10, 800);
        assert!(rm.follower_ready(2, 8, 800, 500));
        // Only a leader answers.
        assert!(!rm.follower_ready(3, 8, 800, 500));
        rm.become_follower(2, 2, 900).expect("role change");
        assert!(!rm.follower_ready(2, 8, 900, 500));
    }

    #[test]
    fn a_long_lived_leader_keeps_a_bounded_size_history() {
        let n = 3 * SIZES_KEPT as u64;
        let rm = sole_leader_with(n);
        let l = rm.leader.as_ref().expect("leads");
        assert_eq!(l.sizes.len(), SIZES_KEPT);
        // Recent offsets still count exactly; one from before the kept
        // history counts as plenty.
        let one = l.sizes[1].1 - l.sizes[0].1;
        assert_eq!(rm.bytes_after(n - 1), one);
        assert_eq!(rm.bytes_after(n - 2), 2 * one);
        assert!(rm.bytes_after(1) >= one * SIZES_KEPT as u64);
    }

    #[test]
    fn a_leader_accepts_only_so_much_ahead_of_its_storage() {
        let mut rm = sole_leader();
        let mib = [Record {
            value: bytes::Bytes::from(vec![7u8; 1 << 20]),
            ..Default::default()
        }];
        // acks=0 is answered on acceptance: without the bound nothing
        // would stop a producer while the storage never answers.
        let mut accepted = 0u64;
        let refused = loop {
            match rm.produce(accepted, &mib, Acks::None, 60_000) {
                Ok(()) => accepted += 1,
                Err(e) => break e,
            }
            assert!(accepted <= 1000, "never refused");
        };
        assert_eq!(refused, ErrorCode::StorageBacklog);
        assert_eq!(accepted, MAX_UNSTORED_BYTES / (1 << 20) - 1);
        // The storage stores the first two: there is room again.
        rm.log_appended(2, 0);
        assert!(rm.produce(accepted, &mib, Acks::None, 60_000).is_ok());
    }
}
