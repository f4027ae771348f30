//! What every task of a node shares: identity, plugins, metadata store,
//! settings, metrics, the clock and the fetch manager's inbox.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use super::clean_shutdown::CleanShutdown;
use crate::core::{
    Config, FailoverMetrics, FailureDetector, MetricsCollector, ReplicaId, TopicPartition,
};
use crate::metadata::{MetadataStore, PartitionState};
use crate::transport::FetchCounts;

use super::config::FailoverConfig;
use super::fetch::FetchCmd;
use super::storage::NodeStorage;

pub struct Shared {
    pub node_id: ReplicaId,
    /// This incarnation's broker epoch, from registration.
    pub broker_epoch: u64,
    /// The epoch this node answers heartbeats with: `broker_epoch`, until
    /// a controlled shutdown registers again (peers that read the new
    /// registration would take the old epoch for another process's).
    pub answering_epoch: std::sync::atomic::AtomicU64,
    pub data_dir: PathBuf,
    pub storage: NodeStorage,
    pub storage_config: Vec<(String, String)>,
    pub metadata: Arc<dyn MetadataStore>,
    pub replication: Config,
    pub metrics: MetricsCollector,
    /// Broker addresses as registered, refreshed by the metadata watcher.
    pub brokers: RwLock<HashMap<ReplicaId, SocketAddr>>,
    /// Each broker's registered broker epoch, as the watcher last read it:
    /// a connection dialled before the latest one may be to a dead
    /// incarnation ([`Shared::dialled_before_restart`]).
    pub broker_epochs: RwLock<HashMap<ReplicaId, u64>>,
    pub(super) fetch_tx: mpsc::UnboundedSender<FetchCmd>,
    /// Partitions whose claims from before this node (or their log)
    /// restarted must be given up (see [`super::handoff`]) before this node
    /// serves them, with whether the log is intact (holds all it held
    /// before); `None` until the log is opened and can be compared with the
    /// clean-shutdown record.
    pub(super) handoffs: Mutex<HashMap<TopicPartition, Option<bool>>>,
    /// What this node's last clean stop recorded (empty after a crash).
    pub(super) clean: CleanShutdown,
    /// The newest leader epoch each open partition's log holds, as its
    /// actor last published it ([`Shared::epoch_above_log`]).
    log_epochs: Mutex<HashMap<TopicPartition, u32>>,
    /// Partitions whose record names this node leader of an epoch its log
    /// already holds: the epoch the record must be re-stamped above
    /// ([`Shared::request_restamp`]).
    restamps: Mutex<HashMap<TopicPartition, u32>>,
    /// Bytes held by all partitions' tail caches (bounded node-wide).
    pub(super) tail_cache_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// Wakes the metadata watcher now (topic created, hand-off wanted).
    pub(super) refresh: Notify,
    /// State machines built on this node (seeds correlation ids).
    pub(super) builds: std::sync::atomic::AtomicU64,
    pub failover: FailoverConfig,
    /// Which nodes answered heartbeats lately (clock: [`Shared::now_ms`]).
    pub detector: Mutex<FailureDetector>,
    pub failover_metrics: Mutex<FailoverMetrics>,
    /// Every partition's state as the watcher last read it: what the
    /// failover coordinator decides on.
    pub(super) states: RwLock<HashMap<TopicPartition, PartitionState>>,
    /// Bumped after this node changed partition metadata: heartbeat
    /// senders tell their peers at once.
    pub(super) changed: tokio::sync::watch::Sender<u64>,
    /// Bumped when the set of nodes this node counts as failed changes:
    /// heartbeat senders tell their peers at once, whose failover waits
    /// for a majority to agree.
    pub(super) suspicions: tokio::sync::watch::Sender<u64>,
    /// A peer's heartbeat brought a view (who it counts as failed) that
    /// differs from its last: the failover coordinator looks again now.
    pub(super) views_changed: Notify,
    /// Who this node tells its peers it counts as failed: what the
    /// failover coordinator found at its last pass, and nobody after a
    /// pause or while it hears no majority (a node thawed from SIGSTOP,
    /// or cut off, would otherwise vouch for stale silence).
    pub(super) told_suspects: Mutex<Vec<ReplicaId>>,
    /// Bumped when the watcher reads a broker epoch newer than the one
    /// it had (a node registered again: restarted, or stopping), so that
    /// fetches waiting on a restarted incarnation give up at once.
    pub(super) reregistered: tokio::sync::watch::Sender<u64>,
    /// What this node's fetch sessions sent and left out.
    pub fetch_sessions: FetchSessionStats,
    /// The core's clock starts here (tokio's clock: a test with a paused
    /// clock moves both it and the partition actors' timers).
    start: tokio::time::Instant,
}

/// How far past the newest epoch it knows a node moves a partition's epoch
/// once it finds the store's epoch not above its log's (the store went
/// back). Other replicas' logs can hold newer epochs than this node's,
/// from elections after it fell behind; moving one past them all would
/// take asking each, and a replica that is down cannot answer. One past
/// its own could land on theirs and name two leaders again, so it jumps
/// far past: that many elections missed by one replica is far beyond any
/// cluster's history between a backup and its restore. Epochs are u32.
pub const EPOCH_JUMP: u32 = 1000;

/// The epoch to move to after finding the store behind a log whose newest
/// epoch is `held` ([`EPOCH_JUMP`]).
pub fn past_regression(held: u32) -> u32 {
    held.saturating_add(EPOCH_JUMP)
}

/// Partitions this node's fetches and the answers to them carried in
/// full, and left out because the session already held them.
#[derive(Debug, Default)]
pub struct FetchSessionStats {
    pub fetch_sent: AtomicU64,
    pub fetch_omitted: AtomicU64,
    pub response_sent: AtomicU64,
    pub response_omitted: AtomicU64,
}

impl FetchSessionStats {
    pub fn add(&self, c: FetchCounts) {
        self.fetch_sent.fetch_add(c.request.sent, Ordering::Relaxed);
        self.fetch_omitted
            .fetch_add(c.request.omitted, Ordering::Relaxed);
        self.response_sent
            .fetch_add(c.response.sent, Ordering::Relaxed);
        self.response_omitted
            .fetch_add(c.response.omitted, Ordering::Relaxed);
    }
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        node_id: ReplicaId,
        broker_epoch: u64,
        data_dir: PathBuf,
        storage: NodeStorage,
        storage_config: Vec<(String, String)>,
        metadata: Arc<dyn MetadataStore>,
        replication: Config,
        failover: FailoverConfig,
        fetch_tx: mpsc::UnboundedSender<FetchCmd>,
        clean: CleanShutdown,
    ) -> Arc<Self> {
        let detector = Mutex::new(FailureDetector::new(failover.failure_timeout_ms, 0));
        Arc::new(Shared {
            node_id,
            broker_epoch,
            answering_epoch: std::sync::atomic::AtomicU64::new(broker_epoch),
            data_dir,
            storage,
            storage_config,
            metadata,
            replication,
            metrics: MetricsCollector::new(),
            brokers: RwLock::new(HashMap::new()),
            broker_epochs: RwLock::new(HashMap::new()),
            fetch_tx,
            handoffs: Mutex::new(HashMap::new()),
            clean,
            log_epochs: Mutex::new(HashMap::new()),
            restamps: Mutex::new(HashMap::new()),
            tail_cache_bytes: Default::default(),
            refresh: Notify::new(),
            builds: Default::default(),
            failover,
            detector,
            failover_metrics: Mutex::new(FailoverMetrics::default()),
            states: RwLock::new(HashMap::new()),
            changed: tokio::sync::watch::Sender::new(0),
            suspicions: tokio::sync::watch::Sender::new(0),
            views_changed: Notify::new(),
            told_suspects: Mutex::new(Vec::new()),
            reregistered: tokio::sync::watch::Sender::new(0),
            fetch_sessions: FetchSessionStats::default(),
            start: tokio::time::Instant::now(),
        })
    }

    /// Node 1 of brokers 1-3 on native storage over `metadata`, for the
    /// drivers' tests.
    #[cfg(test)]
    pub(super) fn for_tests(
        metadata: Arc<dyn MetadataStore>,
        failover: FailoverConfig,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<FetchCmd>) {
        let (fetch_tx, fetch_rx) = mpsc::unbounded_channel();
        let shared = Shared::new(
            1,
            1,
            std::env::temp_dir(),
            NodeStorage::Native,
            Vec::new(),
            metadata,
            Config::default(),
            failover,
            fetch_tx,
            CleanShutdown::default(),
        );
        if let Ok(mut b) = shared.brokers.write() {
            for id in 1..=3 {
                b.insert(id, ([127, 0, 0, 1], 9000 + id as u16).into());
            }
        }
        (shared, fetch_rx)
    }

    /// The core's clock: milliseconds since the node started (monotonic).
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The instant the core's clock reads `ms` (from then on `now_ms() >=
    /// ms`); a year from now for a time past what `Instant` holds (a
    /// client's deadline of `u64::MAX` ms).
    pub fn instant_at(&self, ms: u64) -> tokio::time::Instant {
        self.start
            .checked_add(Duration::from_millis(ms))
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(365 * 86_400))
    }

    pub fn fetch(&self, cmd: FetchCmd) {
        let _ = self.fetch_tx.send(cmd);
    }

    /// Ask the watcher to give up this incarnation's claims on `tp` (see
    /// [`super::handoff`]); `intact`: whether its log holds all it held
    /// (`None`: judge when the log is opened).
    ///
    /// A verdict of "not intact" is never overwritten by a later one before
    /// the hand-off is done: a second recovery compares with a log that
    /// already lost records. Returns the verdict the hand-off now carries.
    pub fn request_handoff(&self, tp: TopicPartition, intact: Option<bool>) -> Option<bool> {
        let merged = self.handoffs.lock().ok().and_then(|mut h| {
            let merged = match (h.get(&tp).copied(), intact) {
                (Some(Some(false)), _) | (_, Some(false)) => Some(false),
                (Some(old), None) => old,
                (_, new) => new,
            };
            h.insert(tp, merged);
            merged
        });
        self.refresh.notify_one();
        merged
    }

    /// Whether `tp` has claims from before a restart or a recovery still
    /// to give up: it must not lead until they are.
    pub fn handoff_pending(&self, tp: &TopicPartition) -> bool {
        self.handoffs.lock().map_or(true, |h| h.contains_key(tp))
    }

    /// `tp`'s log now holds leader epochs up to `epoch` (its actor says so
    /// whenever that changes).
    pub(super) fn set_log_epoch(&self, tp: &TopicPartition, epoch: u32) {
        if let Ok(mut m) = self.log_epochs.lock() {
            m.insert(tp.clone(), epoch);
        }
    }

    /// The newest leader epoch this node's log of `tp` holds, if it is open.
    pub fn log_epoch(&self, tp: &TopicPartition) -> Option<u32> {
        self.log_epochs.lock().ok()?.get(tp).copied()
    }

    /// `proposed`, a new leader epoch this node is about to write for
    /// `tp`, or [`past_regression`] of its log's newest epoch if that is
    /// not below it.
    ///
    /// Why: epochs only enter a log after the store named them, so the
    /// store's epoch is normally at least the log's. A store restored from
    /// an older backup is not, and `record + 1` would then hand a second
    /// leader an epoch some log already holds from the first: a follower's
    /// divergent records in that epoch would look like the new leader's,
    /// and KIP-101 truncation would keep them.
    pub fn epoch_above_log(&self, tp: &TopicPartition, proposed: u32) -> u32 {
        match self.log_epoch(tp) {
            Some(e) if e >= proposed => past_regression(e),
            _ => proposed,
        }
    }

    /// `next`, a state this node is about to write for `tp` over one of
    /// leader epoch `from`: if it moves to a new epoch, that epoch goes
    /// above this node's log ([`Shared::epoch_above_log`]). A write that
    /// keeps the epoch (an ISR change) keeps it.
    ///
    /// And if the record it read is below this node's log (the store went
    /// back: see `node::restamp`), its ISR and ELR are from before writes
    /// the log holds, so a leader chosen from them is not known to hold
    /// every acknowledged write: unless `surveyed` (an unclean election
    /// that asked every live log), `next` names no leader, ISR or ELR.
    pub fn lift_new_epoch(
        &self,
        tp: &TopicPartition,
        from: u32,
        next: &mut PartitionState,
        surveyed: bool,
    ) {
        if next.leader_epoch > from {
            next.leader_epoch = self.epoch_above_log(tp, next.leader_epoch);
            if !surveyed && self.log_epoch(tp).is_some_and(|held| held > from) {
                next.forget_holders();
            }
        }
    }

    /// Ask the watcher to write `tp`'s record again under an epoch above
    /// `above` (see `node::restamp`).
    pub(super) fn request_restamp(&self, tp: &TopicPartition, above: u32) {
        if let Ok(mut m) = self.restamps.lock() {
            let e = m.entry(tp.clone()).or_insert(above);
            *e = (*e).max(above);
        }
        self.refresh.notify_one();
    }

    /// The epoch `tp`'s record must go above, if a re-stamp was asked.
    pub(super) fn restamp_wanted(&self, tp: &TopicPartition) -> Option<u32> {
        self.restamps.lock().ok()?.get(tp).copied()
    }

    /// The re-stamp of `tp` is done (or no longer needed).
    pub(super) fn restamp_done(&self, tp: &TopicPartition) {
        if let Ok(mut m) = self.restamps.lock() {
            m.remove(tp);
        }
    }

    /// This node wrote `state` (version included) to the store: the
    /// coordinator decides on it from now, peers hear of it with the next
    /// heartbeat, and the watcher passes it on at once.
    pub(super) fn wrote_state(&self, tp: TopicPartition, state: PartitionState) {
        if let Ok(mut m) = self.states.write() {
            m.insert(tp, state);
        }
        self.changed.send_modify(|n| *n += 1);
        self.refresh.notify_one();
    }

    /// Every registered broker's id, as the watcher last read them.
    pub fn broker_ids(&self) -> Vec<ReplicaId> {
        self.brokers
            .read()
            .map(|b| b.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Failover metrics and every other node's liveness, for `/metrics`.
    pub fn failover_view(&self) -> super::metrics::FailoverView {
        let failed = self.failed_brokers();
        let mut brokers: Vec<(ReplicaId, bool)> = self
            .brokers
            .read()
            .map(|b| {
                b.keys()
                    .filter(|id| **id != self.node_id)
                    .map(|id| (*id, !failed.contains(id)))
                    .collect()
            })
            .unwrap_or_default();
        brokers.sort_unstable();
        super::metrics::FailoverView {
            metrics: self
                .failover_metrics
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default(),
            brokers,
        }
    }

    /// Brokers the failure detector counts as failed now (sorted).
    pub fn failed_brokers(&self) -> Vec<ReplicaId> {
        let now = self.now_ms();
        let coordinator = self.judge();
        self.detector
            .lock()
            .map(|fd| coordinator.suspects(&fd, now))
            .unwrap_or_default()
    }

    /// A failover coordinator over the registered brokers, to judge
    /// liveness with (its election settings are not used).
    fn judge(&self) -> crate::core::FailoverCoordinator {
        let mut coordinator = crate::core::FailoverCoordinator::new(self.node_id, false, 1);
        coordinator.set_brokers(&self.broker_ids());
        coordinator
    }

    /// [`Shared::failed_brokers`] as told to clients: nothing unless this
    /// node hears a majority. A node cut off from the others sees them all
    /// as failed, and a client believing it would stop writing to a
    /// healthy leader that nobody is going to replace.
    ///
    /// Only those a majority counts as failed, as for an election: a node
    /// cut off from the leader alone (or losing the network, one peer
    /// after another) told clients a healthy leader had failed.
    pub fn failed_brokers_for_clients(&self) -> Vec<ReplicaId> {
        let now = self.now_ms();
        let ids = self.broker_ids();
        let coordinator = self.judge();
        let Ok(fd) = self.detector.lock() else {
            return Vec::new();
        };
        if !coordinator.has_quorum(&ids, &fd, now) {
            return Vec::new();
        }
        coordinator
            .suspects(&fd, now)
            .into_iter()
            .filter(|b| coordinator.failure_confirmed(*b, &[], &fd, now))
            .collect()
    }

    /// Who this node tells its peers it counts as failed.
    pub(super) fn told_suspects(&self) -> Vec<ReplicaId> {
        self.told_suspects
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// `from`'s heartbeat (its broker epoch `broker_epoch`) said it
    /// counts `suspects` as failed, as of `view_at` (see
    /// [`FailureDetector::record_view`]): counted as alive now, and its
    /// view kept, unless an older incarnation sent it. `None`: a heartbeat
    /// without a view (a node stopping sends one). Only a refusal of the
    /// field marks a peer as one from before views (see `heartbeat`): a
    /// stopping node's view-less heartbeat marked it, and its peers then
    /// counted it as agreeing with every suspicion for a failure timeout.
    pub(super) fn heard(
        &self,
        from: ReplicaId,
        broker_epoch: u64,
        suspects: Option<Vec<ReplicaId>>,
        view_at: u64,
    ) {
        if self.superseded(from, broker_epoch) {
            return;
        }
        let now = self.now_ms();
        let changed = match self.detector.lock() {
            Ok(mut fd) => {
                fd.record_heartbeat(from, now);
                suspects.is_some_and(|s| fd.record_view(from, s, view_at))
            }
            Err(_) => false,
        };
        if changed {
            self.views_changed.notify_one();
        }
    }

    /// Whether this node heard a majority of the registered nodes (itself
    /// included) within the failure timeout. Stricter than the quorum of
    /// [`Self::failed_brokers_for_clients`], which gives a peer not heard
    /// yet the benefit of the doubt for a timeout after the detector starts
    /// (or after this process was paused): a node thawed from SIGSTOP must
    /// not take itself for connected.
    pub fn heard_majority(&self) -> bool {
        let (all, unheard) = self.unheard_nodes(self.now_ms());
        (all.len() - unheard.len()) * 2 > all.len()
    }

    /// The registered nodes with this one, in order, and those of them not
    /// heard within the failure timeout at `now` (all of them if the
    /// detector is unusable).
    pub fn unheard_nodes(&self, now: u64) -> (Vec<ReplicaId>, Vec<ReplicaId>) {
        let mut all = self.broker_ids();
        all.push(self.node_id);
        all.sort_unstable();
        all.dedup();
        let unheard = match self.detector.lock() {
            Ok(fd) => all
                .iter()
                .copied()
                .filter(|b| *b != self.node_id && !fd.heard_recently(*b, now))
                .collect(),
            Err(_) => all.clone(),
        };
        (all, unheard)
    }

    /// The brokers as the metadata store lists them: their addresses,
    /// then their epochs, and a wake-up for whoever waits on a restart
    /// (`reregistered`) when an epoch grew.
    ///
    /// Addresses first: a dialler reads the epoch before the address, so a
    /// connection recorded under a new epoch is to the new registration's
    /// address. The wake-up is sent after the epochs' lock is released: a
    /// fetch session's `wait_for` reads the epochs while it holds the
    /// watch's lock, so notifying under the epochs' lock took the two locks
    /// in the other order and could deadlock both worker threads (a node
    /// hung for good in a chaos test).
    pub(super) fn record_brokers(&self, brokers: &[crate::metadata::Broker]) {
        if let Ok(mut map) = self.brokers.write() {
            for b in brokers {
                match b.address.parse() {
                    Ok(a) => {
                        map.insert(b.id, a);
                    }
                    Err(_) => {
                        tracing::warn!("node {} registered a bad address {:?}", b.id, b.address)
                    }
                }
            }
        }
        let mut again = false;
        if let Ok(mut epochs) = self.broker_epochs.write() {
            // Every broker's epoch is recorded (no short cut on the first
            // that grew).
            for b in brokers {
                again |= epochs.insert(b.id, b.epoch).is_some_and(|e| e < b.epoch);
            }
        }
        if again {
            self.reregistered.send_modify(|n| *n += 1);
        }
    }

    /// `id`'s registered broker epoch, as last read.
    pub fn broker_epoch_of(&self, id: ReplicaId) -> Option<u64> {
        self.broker_epochs.read().ok()?.get(&id).copied()
    }

    /// Whether `id` registered again since a connection to it was dialled
    /// when its epoch read `at_dial`, so dial again: that connection may be
    /// to an incarnation that restarted, which will never answer (quinn
    /// would notice only at its idle timeout). A node also registers again
    /// as it stops gracefully (controlled shutdown); its connections are
    /// then redialled needlessly, once, on their way to closing anyway. An
    /// epoch unknown at dial time (`None`) counts as older than any.
    pub fn dialled_before_restart(&self, id: ReplicaId, at_dial: Option<u64>) -> bool {
        self.broker_epoch_of(id) > at_dial
    }

    /// Whether a heartbeat sent or answered by `id`'s incarnation `epoch`
    /// is from one the store no longer registers: another process took the
    /// id (a node stopping gracefully answers with the epoch it registered
    /// again with). Such a heartbeat is no sign that `id` lives.
    pub fn superseded(&self, id: ReplicaId, epoch: u64) -> bool {
        self.dialled_before_restart(id, Some(epoch))
    }

    /// The broker epoch this node's heartbeats carry ([`Self::answering_epoch`]).
    pub fn heartbeat_epoch(&self) -> u64 {
        self.answering_epoch
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn broker_addr(&self, id: ReplicaId) -> Option<SocketAddr> {
        self.brokers.read().ok()?.get(&id).copied()
    }
}
