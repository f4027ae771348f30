//! One partition replica on a node: the driver of its sans-IO
//! `ReplicationManager`. An actor task owns the state machine; events
//! (client produces and reads, fetches from followers, fetch responses
//! from the leader, storage completions, metadata changes, clock ticks)
//! come in on one channel, and the core's actions go out to the storage
//! plugin (through one ordered lane), the fetch manager, the metadata
//! store and the waiting callers.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::storage::NodeLog;
use super::tail_cache::{NODE_TAIL_CACHE_BYTES, TAIL_CACHE_BYTES, TailCache};
use crate::batch;
use crate::core::{
    Acks, Action, ErrorCode, FetchRequest, FetchResponse, PartitionMetrics, ReplicaId,
    ReplicationManager, Role, Sequence, Sequencer, TopicPartition,
};
use crate::metadata::{MetadataError, PartitionState};
use crate::storage::{FaultKind, LogState, PartitionLog, StorageError};
use crate::wire::rpc::{ReplicaStatus, RpcError};

use super::fault_backoff::{FIRST_RETRY_PAUSE, FaultBackoff};
use super::fetch::FetchCmd;
use super::shared::Shared;

/// Committed records read for a client.
pub struct ReadResult {
    pub high_watermark: u64,
    pub log_start: u64,
    pub log_end: u64,
    pub records: Bytes,
}

pub enum Event {
    Produce {
        /// Validated batches as the producer encoded them.
        batches: batch::Validated,
        acks: Acks,
        timeout_ms: u64,
        reply: oneshot::Sender<Result<u64, RpcError>>,
        /// Its place in its producer's order, if the producer keeps one
        /// (several requests in flight): see [`Sequencer`].
        sequence: Option<Sequence>,
    },
    Fetch {
        from: ReplicaId,
        request: FetchRequest,
        reply: oneshot::Sender<FetchResponse>,
    },
    FetchResponse {
        from: ReplicaId,
        response: FetchResponse,
    },
    FetchFailed {
        correlation_id: u64,
    },
    /// Answer this parked fetch now (its multi-partition fetch has data).
    ReleaseFetch {
        from: ReplicaId,
        correlation_id: u64,
    },
    Read {
        offset: u64,
        max_bytes: u32,
        /// With nothing committed from `offset` yet: wait up to this long
        /// for something to be (see [`crate::wire::rpc::Request::Read`]).
        max_wait_ms: u64,
        reply: oneshot::Sender<Result<ReadResult, RpcError>>,
    },
    Status {
        reply: oneshot::Sender<ReplicaStatus>,
    },
    /// Whether `replica`'s incarnation `broker_epoch` fetched from this
    /// leader within `within_ms`, caught up to the HW
    /// ([`crate::core::ReplicationManager::follower_ready`]).
    FollowerReady {
        replica: ReplicaId,
        broker_epoch: u64,
        within_ms: u64,
        reply: oneshot::Sender<bool>,
    },
    Metadata(PartitionState),
    Storage(StorageDone),
    IsrDone {
        expected_version: u64,
        result: Result<u64, ErrorCode>,
        current: Option<PartitionState>,
    },
    Recovered(Result<LogState, StorageError>),
    /// The pause before a recovery is over: queue it on the lane. The
    /// pause runs on a timer of its own, not on the lane, so a shutdown
    /// never waits behind it.
    Recover,
    /// A controlled shutdown is about to hand this partition on: refuse
    /// new produces (before appending, so they are retried elsewhere) and
    /// answer once every produce already taken has its answer, so that
    /// none is cut off by the hand-over with an ambiguous "after the
    /// append" error.
    Drain {
        reply: oneshot::Sender<()>,
    },
    /// Flush and close the log; the answer is its log end if both
    /// succeeded (for the clean-shutdown record).
    Shutdown {
        reply: oneshot::Sender<Option<u64>>,
    },
}

pub enum StorageDone {
    Appended(Result<u64, StorageError>),
    Truncated(Result<u64, StorageError>),
    Reset(u64, Result<(), StorageError>),
    Persisted(Result<(), StorageError>),
    PrefixDeleted(Result<(), StorageError>),
    ReadFailed(StorageError),
}

/// Longest a shutting-down node waits for a plugin to close (its
/// destructor to run): each partition's storage after its flush, then
/// the metadata plugin. Shutdown takes the partitions one by one, and a
/// process manager waits only so long.
pub(super) const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Most bytes the lane joins into one append.
const COALESCE_BYTES: usize = 4 << 20;

/// One storage operation for the lane. Appends are data, not futures, so
/// that the lane can join the ones that queued up behind a slow call.
enum LaneOp {
    Append(Bytes),
    Other(Pin<Box<dyn Future<Output = Option<Event>> + Send>>),
}

/// A handle to a running partition actor.
#[derive(Clone)]
pub struct PartitionHandle {
    tx: mpsc::UnboundedSender<Event>,
}

impl PartitionHandle {
    /// Send an event; false if the actor is gone.
    pub fn send(&self, e: Event) -> bool {
        self.tx.send(e).is_ok()
    }
}

/// Whether the core took a produce.
enum Taken {
    Yes,
    /// Refused and answered; `retriable`: the producer sends it again.
    No {
        retriable: bool,
    },
}

/// A read waiting for records to be committed from its offset (a
/// consumer's long poll).
struct ParkedRead {
    offset: u64,
    max_bytes: u32,
    /// On the node's clock ([`Shared::now_ms`]): answer empty then.
    due: u64,
    reply: oneshot::Sender<Result<ReadResult, RpcError>>,
}

/// Most reads one partition parks; more are answered at once (a reader
/// then polls). Bounds what a flood of long polls holds.
const MAX_PARKED_READS: usize = 1024;

/// A produce request the actor has not handed to the core yet.
struct Pending {
    batches: batch::Validated,
    acks: Acks,
    timeout_ms: u64,
    reply: oneshot::Sender<Result<u64, RpcError>>,
}

struct Actor {
    tp: TopicPartition,
    shared: Arc<Shared>,
    rm: ReplicationManager,
    log: Arc<NodeLog>,
    /// Recent appends: follower fetches for them skip the storage call.
    tail: TailCache,
    lane: mpsc::UnboundedSender<LaneOp>,
    events: mpsc::UnboundedSender<Event>,
    metrics: Arc<PartitionMetrics>,
    /// The newest metadata seen, and the version the core has adopted.
    meta: Option<PartitionState>,
    applied_version: u64,
    leader: Option<ReplicaId>,
    next_produce: u64,
    produces: HashMap<u64, oneshot::Sender<Result<u64, RpcError>>>,
    /// Produce requests that arrived ahead of their producer's turn.
    sequencer: Sequencer<Pending>,
    fetches: HashMap<(ReplicaId, u64), oneshot::Sender<FetchResponse>>,
    /// Storage failed: refuse work until the log is recovered.
    recovering: bool,
    /// A controlled shutdown asked to drain ([`Event::Drain`]): new
    /// produces are refused; these wait for `produces` to empty.
    draining: Option<Vec<oneshot::Sender<()>>>,
    /// Pauses before recoveries, longer while faults keep coming.
    backoff: FaultBackoff,
    /// After a recovery while leading epoch E: never lead E (or older)
    /// again; wait for the store to name a leader of a newer epoch.
    handoff_from: Option<u32>,
    /// The newest epoch of the log as last told to [`Shared::set_log_epoch`].
    published_epoch: Option<u32>,
    /// The version of the last record refused as older than the log (its
    /// error is logged once).
    stale_refused: Option<u64>,
    /// The last storage fault, for the producers it fails: "not
    /// acknowledged" alone did not say the disk was full.
    last_fault: Option<String>,
    /// Left the ISR at a fault still counted intact (it may be in the ELR,
    /// and elected there) until its recovery judges the log.
    unjudged: bool,
    /// Where the next recovery cuts the log: a read found it damaged from
    /// this offset (a batch failed its CRC or position check), and at that fault
    /// another live replica was known to hold everything committed (see
    /// the fault handler). The rest is fetched again from the leader; the
    /// shorter log makes this replica leave the ISR and the ELR until it
    /// has. Otherwise nothing is cut: the batches after the damage may be
    /// found nowhere else, and a damaged batch that fails every read loses
    /// less than a cut log.
    damaged_from: Option<u64>,
    /// Damage found while no other live replica was known to hold what
    /// this one committed (a follower just restarted, not yet answered by
    /// its leader): left uncut, and judged again at the leader's next
    /// answer instead of at the next read that faults, up to 30 s later
    /// (reads of the batch fail until then).
    uncut_damage: Option<u64>,
    /// Reads waiting for their offset to be committed, answered as the
    /// high watermark passes it or at their due time.
    parked_reads: Vec<ParkedRead>,
}

/// `state`, the log just recovered, cut at `cut` (where a read found it
/// damaged) if that is inside it: the batch holding `cut` and everything
/// after go, to be fetched again from the leader.
async fn cut_damage(
    log: &NodeLog,
    state: LogState,
    cut: Option<u64>,
    label: &str,
) -> Result<LogState, StorageError> {
    let Some(at) = cut.filter(|&at| at >= state.bounds.log_start && at < state.bounds.log_end)
    else {
        return Ok(state);
    };
    let end = log.truncate(at).await?;
    error!(
        "{label}: the stored log was damaged from offset {at} (a batch failed its CRC or position check); cut it to {end}, to fetch the rest again from the leader"
    );
    crate::storage::load_state(log).await
}

/// Open (or reopen) `tp`'s log and start its actor; also the log end it
/// opened with.
pub async fn start(
    shared: Arc<Shared>,
    tp: TopicPartition,
) -> Result<(PartitionHandle, u64), StorageError> {
    let dir = shared
        .data_dir
        .join(format!("{}-{}", tp.topic, tp.partition));
    let log = shared
        .storage
        .open(
            &tp.topic,
            tp.partition,
            shared.storage_config.clone(),
            Some(&dir),
        )
        .await?;
    let label = format!("{}/{}", tp.topic, tp.partition);
    let state = crate::storage::load_state(&log).await?;
    let state = crate::storage::with_checked_epochs(&log, state, &label).await?;
    info!(
        topic = %tp.topic,
        partition = tp.partition,
        "opened log: [{}, {}) hw {}",
        state.bounds.log_start,
        state.bounds.log_end,
        state.high_watermark
    );
    let (tx, rx) = mpsc::unbounded_channel();
    let (lane_tx, lane_rx) = mpsc::unbounded_channel::<LaneOp>();
    let log = Arc::new(log);
    tokio::spawn(run_lane(log.clone(), lane_rx, tx.clone()));
    let metrics = shared.metrics.register_partition(&tp.topic, tp.partition);
    let tail = TailCache::new(
        TAIL_CACHE_BYTES,
        shared.tail_cache_bytes.clone(),
        NODE_TAIL_CACHE_BYTES,
    );
    let mut actor = Actor {
        rm: new_manager(&shared, &state),
        tp: tp.clone(),
        shared,
        log,
        tail,
        lane: lane_tx,
        events: tx.clone(),
        metrics,
        meta: None,
        applied_version: 0,
        leader: None,
        next_produce: 0,
        produces: HashMap::new(),
        sequencer: Sequencer::default(),
        fetches: HashMap::new(),
        recovering: false,
        draining: None,
        backoff: FaultBackoff::default(),
        handoff_from: None,
        published_epoch: None,
        stale_refused: None,
        last_fault: None,
        unjudged: false,
        damaged_from: None,
        uncut_damage: None,
        parked_reads: Vec::new(),
    };
    actor.publish_log_epoch();
    tokio::spawn(actor.run(rx));
    Ok((PartitionHandle { tx }, state.bounds.log_end))
}

fn new_manager(shared: &Shared, state: &LogState) -> ReplicationManager {
    let mut rm = ReplicationManager::new(shared.replication.clone(), shared.node_id, state);
    rm.set_broker_epoch(shared.broker_epoch);
    // Unique across incarnations (broker epoch) and rebuilds in one.
    let builds = shared
        .builds
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    rm.seed_correlation((shared.broker_epoch << 40) | ((builds & 0xff) << 32));
    rm
}

/// Runs storage operations one after another, in the order issued, and
/// reports their completions back to the actor.
///
/// Group commit: appends that queued up while the storage was busy go to
/// it together (they are contiguous, and the contract takes several
/// batches at once), up to [`COALESCE_BYTES`]: as one call to a plugin,
/// part by part (no copy) to the native log; see [`NodeLog::append_all`].
/// Each still gets its own completion, so the core's
/// one-report-per-append bookkeeping is unchanged.
async fn run_lane(
    log: Arc<NodeLog>,
    mut ops: mpsc::UnboundedReceiver<LaneOp>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut next: Option<LaneOp> = None;
    // Where a plugin's group commit is joined; reused, so joining does not
    // fault in fresh pages for every commit.
    let mut scratch = BytesMut::new();
    loop {
        let op = match next.take() {
            Some(op) => op,
            None => match ops.recv().await {
                Some(op) => op,
                None => return,
            },
        };
        match op {
            LaneOp::Other(op) => {
                if let Some(e) = op.await
                    && events.send(e).is_err()
                {
                    return;
                }
            }
            LaneOp::Append(first) => {
                let mut parts = vec![first];
                let mut bytes = parts[0].len();
                loop {
                    match ops.try_recv() {
                        Ok(LaneOp::Append(b)) if bytes + b.len() <= COALESCE_BYTES => {
                            bytes += b.len();
                            parts.push(b);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                for r in log.append_all(parts, &mut scratch).await {
                    if events
                        .send(Event::Storage(StorageDone::Appended(r)))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    }
}

fn rpc_error(code: ErrorCode, what: &str) -> RpcError {
    RpcError::Replication {
        code,
        message: what.to_string(),
    }
}

/// What went wrong after the records were appended here.
fn after_append(code: ErrorCode, what: &str) -> RpcError {
    RpcError::AfterAppend {
        code,
        message: what.to_string(),
    }
}

impl Actor {
    fn now(&self) -> u64 {
        self.shared.now_ms()
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        // The core's clock-driven work (ISR checks, long-poll and produce
        // deadlines, checkpoints, follower fetch backoffs) runs when the
        // core says it is next due. A fixed 10 ms tick cost an idle node
        // with 300 partitions half a core in wake-ups.
        let timer = tokio::time::sleep_until(self.shared.instant_at(0));
        tokio::pin!(timer);
        let mut armed: Option<u64> = None;
        // What the core queued as it was built (its epoch cache cut to the
        // log, a stored HW lowered to the log end) goes out now, not at the
        // first event.
        self.drive();
        loop {
            let core_due = if self.recovering {
                None
            } else {
                self.rm.next_deadline()
            };
            // Produce requests waiting for their turn end by then too, and
            // parked reads.
            let reads_due = self.parked_reads.iter().map(|r| r.due).min();
            let due = [core_due, self.sequencer.next_deadline(), reads_due]
                .into_iter()
                .flatten()
                .min();
            if due != armed {
                if let Some(ms) = due {
                    timer.as_mut().reset(self.shared.instant_at(ms));
                }
                armed = due;
            }
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    if let Event::Shutdown { reply } = ev {
                        let _ = reply.send(self.shutdown().await);
                        return;
                    }
                    self.handle(ev);
                    // Take whatever else is queued before acting, so a burst
                    // of events becomes one round of actions.
                    while let Ok(ev) = rx.try_recv() {
                        if let Event::Shutdown { reply } = ev {
                            self.drive();
                            let _ = reply.send(self.shutdown().await);
                            return;
                        }
                        self.handle(ev);
                    }
                }
                _ = &mut timer, if armed.is_some() => {
                    armed = None;
                    let now = self.now();
                    if !self.recovering {
                        self.rm.tick(now);
                    }
                }
            }
            self.drive();
            self.settle_waiting(self.now());
            self.wake_reads(self.now());
            if let Some(waiting) = self.draining.as_mut()
                && self.produces.is_empty()
            {
                for w in waiting.drain(..) {
                    let _ = w.send(());
                }
            }
        }
    }

    /// Flush the log after everything issued so far (one lane); its end if
    /// that succeeded and no fault came meanwhile.
    async fn flush_for_shutdown(&mut self) -> Option<u64> {
        let log = self.log.clone();
        let (done, wait) = oneshot::channel();
        self.lane(async move {
            let r = match log.flush().await {
                Ok(()) => log.bounds().await.map(|b| b.log_end),
                Err(e) => Err(e),
            };
            let _ = done.send(r);
            None
        });
        match tokio::time::timeout(Duration::from_secs(30), wait).await {
            Ok(Ok(Ok(end))) => {
                debug!(topic = %self.tp.topic, partition = self.tp.partition, "flushed");
                (!self.recovering).then_some(end)
            }
            other => {
                warn!(topic = %self.tp.topic, partition = self.tp.partition, "flush at shutdown: {other:?}");
                None
            }
        }
    }

    /// Flush and close the log; its end if both succeeded and the log is
    /// not being recovered from a fault.
    async fn shutdown(&mut self) -> Option<u64> {
        // Before the flush and the close (up to 35 s): their callers'
        // waits would run out, and never-appended records would come back
        // ambiguous.
        for p in self.sequencer.drain() {
            let _ = p.reply.send(Err(RpcError::ShuttingDown));
        }
        // Their reader goes on at another replica.
        for r in self.parked_reads.drain(..) {
            let _ = r.reply.send(Err(RpcError::ShuttingDown));
        }
        // A log being recovered is not flushed: its end would vouch for
        // nothing, and a failing disk could hold the flush for the whole
        // wait.
        let mut end = if self.recovering {
            None
        } else {
            // Ahead of the flush on the ordered lane.
            self.rm.checkpoint_hw_now();
            self.drive();
            self.flush_for_shutdown().await
        };
        // Release the plugin (its destructor runs) before the node reports
        // it stopped. Left to the handles' drop, the destructor ran while
        // the process's runtime shut down: the file plugin's, freeing a
        // released segment on the blocking pool, found its job cancelled,
        // and wasmtime-wasi panicked in the middle of it (two of three
        // nodes after a bench cluster), leaving the segment behind.
        if tokio::time::timeout(CLOSE_WAIT, self.log.close())
            .await
            .is_err()
        {
            warn!(topic = %self.tp.topic, partition = self.tp.partition, "the storage plugin did not close within {CLOSE_WAIT:?}; leaving it");
            end = None;
        }
        for (_, reply) in self.produces.drain() {
            // Appended already: not the retriable "shutting down" refusal.
            let _ = reply.send(Err(after_append(
                ErrorCode::RequestTimedOut,
                "the node shut down after the append; it may or may not survive",
            )));
        }
        self.shared
            .metrics
            .unregister_partition(&self.tp.topic, self.tp.partition);
        end
    }

    fn lane(&self, op: impl Future<Output = Option<Event>> + Send + 'static) {
        let _ = self.lane.send(LaneOp::Other(Box::pin(op)));
    }

    /// The refusal of a request only a serving leader takes: retriable, at
    /// the successor once the store names one. A node named leader but not
    /// serving yet (just after an election) names no leader, not itself.
    fn not_leader(&self) -> RpcError {
        let me = self.shared.node_id;
        RpcError::NotLeader {
            node: me,
            leader: self.leader.filter(|l| *l != me),
        }
    }

    /// Whether produces may be taken here now (else they are refused as
    /// [`not_leader`](Self::not_leader)).
    fn takes_produces(&self) -> bool {
        self.rm.is_leader() && !self.recovering && self.draining.is_none()
    }

    /// Hand a produce to the core: taken (its offsets are assigned), or
    /// refused (answered already).
    fn produce(&mut self, p: Pending, now: u64) -> Taken {
        let Pending {
            batches,
            acks,
            timeout_ms,
            reply,
        } = p;
        let refusal = if self.recovering || self.draining.is_some() {
            self.not_leader()
        } else {
            self.next_produce += 1;
            let id = self.next_produce;
            match self
                .rm
                .produce_batches(id, batches, acks, now.saturating_add(timeout_ms))
            {
                Ok(()) => {
                    self.produces.insert(id, reply);
                    return Taken::Yes;
                }
                Err(ErrorCode::NotLeader) => self.not_leader(),
                // Say why, with what the producer cannot see.
                Err(code @ ErrorCode::NotEnoughReplicas) => rpc_error(
                    code,
                    &format!(
                        "produce refused: the ISR {:?} is smaller than min.insync.replicas ({})",
                        self.rm.isr(),
                        self.rm.min_insync_replicas()
                    ),
                ),
                Err(code) => rpc_error(code, "produce refused"),
            }
        };
        // Nothing was appended.
        let retriable = refusal.retriable();
        let _ = reply.send(Err(refusal));
        Taken::No { retriable }
    }

    /// Produce `go` in order, and each request of `producer` whose turn
    /// comes as one before it is taken.
    fn produce_in_order(&mut self, producer: u64, go: Vec<(u64, Pending)>, now: u64) {
        let mut queue: std::collections::VecDeque<(u64, Pending)> = go.into();
        while let Some((seq, p)) = queue.pop_front() {
            match self.produce(p, now) {
                // A refusal for good (a storage fault) is given up by its
                // producer: the ones after it need not wait to hear so.
                Taken::Yes | Taken::No { retriable: false } => {
                    queue.extend(self.sequencer.appended(producer, seq));
                }
                // Sent again, it keeps its place.
                Taken::No { retriable: true } => {}
            }
        }
    }

    /// Requests waiting for their turn when this replica can no longer
    /// take them (not leading, recovering, draining), or whose wait ran
    /// out: refused, nothing appended, so the producer may send them again.
    fn settle_waiting(&mut self, now: u64) {
        if !self.sequencer.is_waiting() {
            return;
        }
        for p in self.sequencer.take_displaced() {
            let _ = p.reply.send(Err(rpc_error(
                ErrorCode::OutOfOrderSequence,
                "a newer attempt of this request arrived; this one was not appended",
            )));
        }
        if !self.takes_produces() {
            for p in self.sequencer.drain() {
                let _ = p.reply.send(Err(self.not_leader()));
            }
        }
        for p in self.sequencer.expire(now) {
            let _ = p.reply.send(Err(rpc_error(
                ErrorCode::OutOfOrderSequence,
                "an earlier request of this producer has not arrived; nothing was appended",
            )));
        }
    }

    fn handle(&mut self, ev: Event) {
        let now = self.now();
        match ev {
            Event::Produce {
                batches,
                acks,
                timeout_ms,
                reply,
                sequence,
            } => {
                let p = Pending {
                    batches,
                    acks,
                    timeout_ms,
                    reply,
                };
                match sequence {
                    // Not leading: refused at once, whatever its turn.
                    Some(s) if self.takes_produces() => {
                        if self.sequencer.is_late(&s) {
                            let _ = p.reply.send(Err(RpcError::Invalid(format!(
                                "request {} of producer {:016x} came after later ones were appended (it was given up); not appended",
                                s.seq, s.producer
                            ))));
                            return;
                        }
                        // Half its time at most, so a refusal leaves time
                        // to send it again.
                        let wait = (timeout_ms / 2).clamp(1, crate::core::sequencer::MAX_WAIT_MS);
                        let go = self.sequencer.arrive(s, p, now.saturating_add(wait), now);
                        self.produce_in_order(s.producer, go, now);
                    }
                    _ => {
                        self.produce(p, now);
                    }
                }
            }
            Event::Fetch {
                from,
                request,
                reply,
            } => {
                if self.recovering {
                    drop(reply); // the server answers NotLeader
                    return;
                }
                self.fetches.insert((from, request.correlation_id), reply);
                self.rm.handle_fetch(from, request, now);
            }
            Event::FetchResponse { from, response } => {
                if !self.recovering {
                    self.rm.handle_fetch_response(from, response, now);
                    if let Some(at) = self.uncut_damage
                        && self.rm.another_holds_the_committed(now)
                    {
                        self.uncut_damage = None;
                        self.storage_done(StorageDone::ReadFailed(StorageError::Fault {
                            plugin: format!("{}/{}", self.tp.topic, self.tp.partition),
                            kind: FaultKind::Damaged { from: at },
                            detail: format!(
                                "the damage found at offset {at} earlier, judged again now that the leader answered"
                            ),
                        }));
                    }
                }
            }
            Event::FetchFailed { correlation_id } => {
                if !self.recovering {
                    self.rm.fetch_failed(correlation_id, now);
                }
            }
            Event::ReleaseFetch {
                from,
                correlation_id,
            } => self.rm.release_fetch(from, correlation_id),
            Event::Read {
                offset,
                max_bytes,
                max_wait_ms,
                reply,
            } => self.read(offset, max_bytes, max_wait_ms, reply),
            Event::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Event::FollowerReady {
                replica,
                broker_epoch,
                within_ms,
                reply,
            } => {
                let ready = !self.recovering
                    && self
                        .rm
                        .follower_ready(replica, broker_epoch, now, within_ms);
                let _ = reply.send(ready);
            }
            Event::Metadata(state) => self.apply_metadata(state, false),
            Event::Storage(done) => self.storage_done(done),
            Event::IsrDone {
                expected_version,
                result,
                current,
            } => {
                if let Ok(v) = result {
                    self.applied_version = self.applied_version.max(v);
                }
                self.rm.isr_update_done(expected_version, result, now);
                if let Some(state) = current {
                    self.apply_metadata(state, false);
                }
            }
            Event::Recovered(Ok(state)) => {
                info!(topic = %self.tp.topic, partition = self.tp.partition,
                    "storage recovered: [{}, {})", state.bounds.log_start, state.bounds.log_end);
                let lost_end = self.rm.log_end_offset();
                let lost_start = self.rm.log_start_offset();
                self.unjudged = false; // judged below
                self.rm = new_manager(&self.shared, &state);
                self.publish_log_epoch();
                self.tail.clear();
                self.recovering = false;
                self.metrics.recovered();
                self.backoff.recovered(Instant::now());
                self.leader = None;
                self.applied_version = 0;
                // Intact: it still holds everything it held. A log start
                // that moved up lost a prefix no retention deleted here.
                let intact =
                    state.bounds.log_end >= lost_end && state.bounds.log_start <= lost_start;
                // Leave the ISR (or hand leadership on) until caught up;
                // and the ELR too if records it held are gone. A log with
                // no metadata yet was opened at start and its hand-off is
                // not done: it needs telling only of a loss.
                if self.meta.is_some() || !intact {
                    self.shared.request_handoff(self.tp.clone(), Some(intact));
                }
                if let Some(meta) = self.meta.clone() {
                    if meta.leader == Some(self.shared.node_id) {
                        // The recovered log may lack what this leader had
                        // acknowledged (an in-memory log is empty now): do
                        // not lead this epoch again. Leadership moves to
                        // another in-sync replica under a new epoch.
                        self.handoff_from = Some(meta.leader_epoch);
                    } else {
                        self.apply_metadata(meta, true);
                    }
                }
            }
            Event::Recovered(Err(e)) => {
                if std::mem::take(&mut self.unjudged) {
                    // Counted intact at the fault, its log cannot be judged:
                    // no longer eligible. It may have been elected from the
                    // ELR meanwhile, and a dead disk would hold the
                    // partition leaderless while another eligible replica
                    // is alive; it gives the claim up, sole member or not.
                    self.shared.request_handoff(self.tp.clone(), Some(false));
                }
                let pause = if self.sole_member() {
                    FIRST_RETRY_PAUSE
                } else {
                    self.backoff.recovery_failed()
                };
                warn!(topic = %self.tp.topic, partition = self.tp.partition,
                    "storage recovery failed, retrying in {} ms: {e}", pause.as_millis());
                self.recover_after(pause);
            }
            Event::Recover => {
                let log = self.log.clone();
                let label = format!("{}/{}", self.tp.topic, self.tp.partition);
                let cut = self.damaged_from.take();
                self.lane(async move {
                    let state = async {
                        let state = log.recover().await?;
                        let state = cut_damage(&log, state, cut, &label).await?;
                        crate::storage::with_checked_epochs(&*log, state, &label).await
                    };
                    Some(Event::Recovered(state.await))
                });
            }
            Event::Drain { reply } => self.draining.get_or_insert_default().push(reply),
            Event::Shutdown { .. } => {}
        }
    }

    /// Answers the parked reads that can be: their offset is committed
    /// now, their time is up, their reader gave up, or the log is being
    /// recovered (they get its error).
    fn wake_reads(&mut self, now: u64) {
        if self.parked_reads.is_empty() {
            return;
        }
        let hw = self.rm.high_watermark();
        let (start, end) = (self.rm.log_start_offset(), self.rm.log_end_offset());
        let recovering = self.recovering;
        // Out of range now (the log was cut below the offset, or reset
        // past it): told at once, not at its due time.
        let (ready, parked): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked_reads)
            .into_iter()
            .filter(|r| !r.reply.is_closed())
            .partition(|r| {
                recovering || r.offset < hw || r.offset < start || r.offset > end || now >= r.due
            });
        self.parked_reads = parked;
        for r in ready {
            self.read(r.offset, r.max_bytes, 0, r.reply);
        }
    }

    fn read(
        &mut self,
        offset: u64,
        max_bytes: u32,
        max_wait_ms: u64,
        reply: oneshot::Sender<Result<ReadResult, RpcError>>,
    ) {
        if self.recovering {
            let _ = reply.send(Err(rpc_error(
                ErrorCode::StorageError,
                crate::wire::rpc::STORAGE_RECOVERING,
            )));
            return;
        }
        let hw = self.rm.high_watermark();
        let start = self.rm.log_start_offset();
        let end = self.rm.log_end_offset();
        // Kafka's rule (LocalLog.read): only an offset outside the log is
        // out of range. One past the HW but inside the log gets no records:
        // a new leader's (or a follower's) HW can lag one a reader already
        // saw, and those records are there, just not known to be committed
        // here yet. Calling them out of range would tell the reader its
        // position is gone.
        if offset < start || offset > end {
            let _ = reply.send(Err(RpcError::OffsetOutOfRange {
                offset,
                log_start: start,
                high_watermark: hw,
            }));
            return;
        }
        if offset >= hw {
            if max_wait_ms > 0 && self.parked_reads.len() < MAX_PARKED_READS {
                let due = self.now().saturating_add(max_wait_ms);
                self.parked_reads.push(ParkedRead {
                    offset,
                    max_bytes,
                    due,
                    reply,
                });
                return;
            }
            let _ = reply.send(Ok(ReadResult {
                high_watermark: hw,
                log_start: start,
                log_end: end,
                records: Bytes::new(),
            }));
            return;
        }
        let log = self.log.clone();
        self.lane(async move {
            match log.read(offset, max_bytes).await {
                Ok(b) => {
                    let _ = reply.send(Ok(ReadResult {
                        high_watermark: hw,
                        log_start: start,
                        log_end: end,
                        records: batch::before(&b, hw),
                    }));
                    None
                }
                Err(e) => {
                    let _ = reply.send(Err(rpc_error(ErrorCode::StorageError, &e.to_string())));
                    matches!(e, StorageError::Fault { .. })
                        .then_some(Event::Storage(StorageDone::ReadFailed(e)))
                }
            }
        });
    }

    fn status(&self) -> ReplicaStatus {
        let role = if self.recovering {
            crate::wire::rpc::ROLE_RECOVERING
        } else {
            match self.rm.role() {
                Role::Leader => "leader",
                Role::Follower => "follower",
                Role::Idle => "idle",
            }
        };
        let leader = self.rm.is_leader();
        ReplicaStatus {
            topic: self.tp.topic.clone(),
            partition: self.tp.partition,
            node: self.shared.node_id,
            role: role.to_string(),
            leader: self.leader,
            leader_epoch: self.rm.leader_epoch(),
            high_watermark: self.rm.high_watermark(),
            log_start: self.rm.log_start_offset(),
            log_end: self.rm.log_end_offset(),
            // The newest epoch that has batches: a leader enters its epoch
            // in the cache at the log end before it writes anything.
            last_epoch: self.rm.epochs().last_written(self.rm.log_end_offset()),
            isr: if leader { self.rm.isr() } else { Vec::new() },
            replicas: self
                .meta
                .as_ref()
                .map(|m| m.replicas.clone())
                .unwrap_or_default(),
            follower_log_ends: if leader {
                self.rm.follower_log_ends()
            } else {
                Vec::new()
            },
            storage_fault: self.recovering.then(|| self.last_fault.clone()).flatten(),
        }
    }

    /// Adopt the store's view: lead, follow, or take an ISR change. With
    /// `force`, re-enter the role even if it looks current (after storage
    /// recovery built a fresh state machine).
    fn apply_metadata(&mut self, st: PartitionState, force: bool) {
        if !force
            && let Some(cur) = &self.meta
            && cur.version > st.version
        {
            return; // older than what we have seen
        }
        if let Some(old) = self.handoff_from {
            if st.leader == Some(self.shared.node_id) && st.leader_epoch <= old {
                return; // the hand-off has not landed yet
            }
            self.handoff_from = None;
        }
        if st.leader == Some(self.shared.node_id) && self.shared.handoff_pending(&self.tp) {
            // Sent before a recovery asked to give up this replica's
            // claims: leading now could serve a log short of what it
            // acknowledged. The hand-off's own state comes next.
            self.meta = Some(st);
            return;
        }
        self.meta = Some(st.clone());
        if self.recovering {
            return;
        }
        let held = self.log_epoch();
        let me = self.shared.node_id;
        // Fenced or not: the next state of its own epoch lifts a fence.
        let leading_it =
            self.rm.role() == Role::Leader && self.rm.leader_epoch() == Some(st.leader_epoch);
        if st.leader_epoch < held
            || (st.leader == Some(me) && !leading_it && st.leader_epoch <= held)
        {
            // Epochs enter a log only after the store named them: a record
            // older than the log means the store went back (restored from
            // an older backup). Leading or following in that epoch would
            // append out of epoch order, and a later `epoch + 1` would name
            // two leaders. Nor does a replica start leading an epoch its
            // log already holds: that epoch had another leader (a restart
            // or a recovery always moves to a new one). The watcher
            // re-stamps the record above the log (`node::restamp`); until
            // then this replica serves in neither role.
            if self.stale_refused != Some(st.version) {
                self.stale_refused = Some(st.version);
                warn!(topic = %self.tp.topic, partition = self.tp.partition,
                    "the metadata store names leader epoch {} (version {}), and this log already holds epoch {held}: not serving until the record is re-stamped above it",
                    st.leader_epoch, st.version);
            }
            self.shared.request_restamp(&self.tp, held);
            self.stand_aside();
            return;
        }
        if self.stale_refused.take().is_some() {
            // Served: no re-stamp is wanted any more (one asked for an
            // epoch the log has since dropped would move a good record).
            self.shared.restamp_done(&self.tp);
        }
        if st.min_insync != 0 {
            self.rm.set_min_insync_replicas(st.min_insync);
        }
        let now = self.now();
        match st.leader {
            Some(l) if l == me => {
                let current =
                    self.rm.is_leader() && self.rm.leader_epoch() == Some(st.leader_epoch);
                if !current || force {
                    info!(topic = %self.tp.topic, partition = self.tp.partition,
                        "leading epoch {} with isr {:?}", st.leader_epoch, st.isr);
                    self.shared.fetch(FetchCmd::Remove {
                        tp: self.tp.clone(),
                    });
                    if let Err(e) = self.rm.become_leader(
                        st.leader_epoch,
                        st.replicas.clone(),
                        st.isr.clone(),
                        st.version,
                        now,
                    ) {
                        // The checks above keep this from happening (a
                        // mismatch between them and the core's is a bug:
                        // loud); the replica serves in neither role until
                        // the store says more.
                        error!(topic = %self.tp.topic, partition = self.tp.partition,
                            "not leading epoch {}: {e}", st.leader_epoch);
                        self.stand_aside();
                        return;
                    }
                    self.applied_version = st.version;
                } else if st.version > self.applied_version {
                    self.rm
                        .metadata_isr_changed(st.leader_epoch, st.isr.clone(), st.version, now);
                    self.applied_version = st.version;
                }
                self.leader = Some(me);
            }
            Some(l) => {
                let current = self.rm.role() == Role::Follower
                    && self.rm.leader_epoch() == Some(st.leader_epoch)
                    && self.leader == Some(l);
                if !current || force {
                    info!(topic = %self.tp.topic, partition = self.tp.partition,
                        "following node {l} in epoch {}", st.leader_epoch);
                    if let Err(e) = self.rm.become_follower(l, st.leader_epoch, now) {
                        // As for leading: checked above; neither role.
                        error!(topic = %self.tp.topic, partition = self.tp.partition,
                            "not following node {l} in epoch {}: {e}", st.leader_epoch);
                        self.stand_aside();
                        return;
                    }
                    self.leader = Some(l);
                }
                self.applied_version = st.version;
            }
            None => {
                // No replica may lead: stop serving in either role (the
                // log stays as it is) until the store names a leader.
                if self.rm.role() != Role::Idle {
                    info!(topic = %self.tp.topic, partition = self.tp.partition,
                        "no leader in epoch {}: stepping down", st.leader_epoch);
                }
                self.stand_aside();
            }
        }
    }

    /// Serve in neither role until the store says more: stop leading or
    /// following (waiting producers and parked fetches are answered) and
    /// fetching; the log stays as it is.
    fn stand_aside(&mut self) {
        if self.rm.role() != Role::Idle {
            self.rm.resign();
            self.shared.fetch(FetchCmd::Remove {
                tp: self.tp.clone(),
            });
        }
        self.leader = None;
    }

    fn storage_done(&mut self, done: StorageDone) {
        if self.recovering {
            // Issued by the state machine the recovery replaces, which
            // answered its waiters when it stepped down. Applied, a
            // completion could make it issue storage calls of its own (a
            // retention delete, an epoch write after a cut) that would run
            // on the recovered log and report to its successor. A failure
            // is no news either: later calls fail the same way.
            return;
        }
        let now = self.now();
        let failure = match done {
            StorageDone::Appended(Ok(leo)) => {
                self.rm.log_appended(leo, now);
                None
            }
            StorageDone::Truncated(Ok(leo)) => {
                self.rm.log_truncated(leo, now);
                None
            }
            StorageDone::Reset(offset, Ok(())) => {
                self.rm.log_reset(offset, now);
                None
            }
            StorageDone::PrefixDeleted(Ok(())) => {
                self.rm.log_prefix_deleted();
                None
            }
            StorageDone::Persisted(Ok(())) => None,
            StorageDone::Appended(Err(e))
            | StorageDone::Truncated(Err(e))
            | StorageDone::Reset(_, Err(e))
            | StorageDone::Persisted(Err(e))
            | StorageDone::PrefixDeleted(Err(e))
            | StorageDone::ReadFailed(e) => Some(e),
        };
        if let Some(e) = failure {
            // Nobody else can lead while the ISR's only member recovers:
            // its pauses stay short (a full disk looped it five times a
            // second, each loop a new epoch and a metadata write).
            let pause = if self.sole_member() {
                self.backoff.sole_member_fault(Instant::now())
            } else {
                self.backoff.fault(Instant::now())
            };
            warn!(topic = %self.tp.topic, partition = self.tp.partition,
                "storage failed, stepping down and recovering in {} ms: {e}", pause.as_millis());
            if let StorageError::Fault {
                kind: FaultKind::Damaged { from },
                ..
            } = &e
            {
                // Judged now, from this replica's live view (before the
                // fault ends its role), not at the recovery from the
                // store's record, which may name a member that is gone.
                if self.rm.another_holds_the_committed(self.shared.now_ms()) {
                    self.damaged_from = Some(self.damaged_from.map_or(*from, |d| d.min(*from)));
                    self.uncut_damage = None;
                } else {
                    self.uncut_damage = Some(self.uncut_damage.map_or(*from, |d| d.min(*from)));
                    error!(topic = %self.tp.topic, partition = self.tp.partition,
                        "the stored log is damaged from offset {from} (a batch failed its CRC or position check), and no other live replica is known to hold what it holds: not cutting it; reads of that batch will fail");
                }
            }
            self.last_fault = Some(e.to_string());
            self.metrics.record_storage_fault();
            self.rm.storage_failed();
            self.drive();
            self.recovering = true;
            // Leadership and ISR membership move off this replica now, as
            // Kafka's controller moves them off a failed log dir (KIP-112),
            // not once the log has recovered: a leader whose storage never
            // recovers (its disk gone) kept the partition unavailable, and
            // a follower held the leader's HW back until it was found
            // lagging. Not when it is the ISR's only member: nobody else
            // could lead, and a log that recovers whole may lead again.
            //
            // Judged intact for now: it stays eligible (the ELR) if the
            // ISR falls below min.insync, as KIP-966 keeps a member that
            // leaves. Judged lossy, every replica of a partition whose
            // disks all filled up left the ISR and the ELR in turn, and
            // losing the last one took an unclean election. The recovery
            // judges the log (a shorter log, or a recovery that fails,
            // takes the eligibility away), and the replica leads nothing
            // until then: it is recovering.
            let me = self.shared.node_id;
            if self
                .meta
                .as_ref()
                .is_some_and(|m| m.isr.contains(&me) && m.isr.len() > 1)
            {
                self.shared.request_handoff(self.tp.clone(), Some(true));
                self.unjudged = true;
            }
            // The recovered log may hold less than was issued.
            self.tail.clear();
            // Callers waiting on this incarnation get an answer now.
            for (_, reply) in self.fetches.drain() {
                drop(reply);
            }
            // A fault that repeats must not spin: pause first.
            self.recover_after(pause);
        }
    }

    /// Queue a recovery once `pause` is over ([`Event::Recover`]).
    fn recover_after(&self, pause: Duration) {
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            // The actor may have stopped meanwhile: nothing to recover.
            let _ = events.send(Event::Recover);
        });
    }

    /// This replica is the ISR's only member: nobody else could lead.
    fn sole_member(&self) -> bool {
        let me = self.shared.node_id;
        self.meta.as_ref().is_some_and(|m| m.isr == [me])
    }

    /// Carry out everything the core asked for.
    fn drive(&mut self) {
        for action in self.rm.drain() {
            self.execute(action);
        }
        self.metrics.update_from(&self.rm);
        self.publish_log_epoch();
    }

    /// The newest leader epoch in the log, 0 for none.
    fn log_epoch(&self) -> u32 {
        self.rm.epochs().latest().map_or(0, |e| e.epoch)
    }

    /// Tell the node the log's newest epoch when it changed: new epochs
    /// this node writes go above it ([`Shared::epoch_above_log`]).
    fn publish_log_epoch(&mut self) {
        let epoch = self.log_epoch();
        if self.published_epoch != Some(epoch) {
            self.shared.set_log_epoch(&self.tp, epoch);
            self.published_epoch = Some(epoch);
        }
    }

    fn execute(&mut self, action: Action) {
        let log = self.log.clone();
        match action {
            Action::Append { batches } => {
                // Only a leader answers fetches; a follower's appends are
                // slices of whole fetch-response frames, not kept.
                if self.rm.role() == Role::Leader {
                    self.tail.appended(&batches);
                } else {
                    self.tail.clear();
                }
                let _ = self.lane.send(LaneOp::Append(batches));
            }
            Action::Truncate { offset } => {
                self.tail.clear();
                self.lane(async move {
                    Some(Event::Storage(StorageDone::Truncated(
                        log.truncate(offset).await,
                    )))
                })
            }
            Action::ResetLog { offset } => {
                self.tail.clear();
                self.lane(async move {
                    Some(Event::Storage(StorageDone::Reset(
                        offset,
                        log.reset(offset).await,
                    )))
                })
            }
            Action::DeletePrefix { offset } => self.lane(async move {
                Some(Event::Storage(StorageDone::PrefixDeleted(
                    log.delete_prefix(offset).await,
                )))
            }),
            Action::PersistEpochs(entries) => self.lane(async move {
                Some(Event::Storage(StorageDone::Persisted(
                    log.set_leader_epochs(entries).await,
                )))
            }),
            Action::PersistHighWatermark(hw) => self.lane(async move {
                Some(Event::Storage(StorageDone::Persisted(
                    log.set_high_watermark(hw).await,
                )))
            }),
            Action::SendFetch { to, request } => self.shared.fetch(FetchCmd::Enqueue {
                tp: self.tp.clone(),
                leader: to,
                request,
                partition: PartitionHandle {
                    tx: self.events.clone(),
                },
            }),
            Action::RespondFetch {
                to,
                mut response,
                read,
            } => {
                let Some(reply) = self.fetches.remove(&(to, response.correlation_id)) else {
                    return;
                };
                match read {
                    None => {
                        let _ = reply.send(response);
                    }
                    Some(spec)
                        if let Some(records) =
                            self.tail.read(spec.offset, spec.max_bytes, spec.end) =>
                    {
                        response.records = records;
                        let _ = reply.send(response);
                    }
                    Some(spec) => self.lane(async move {
                        match log.read(spec.offset, spec.max_bytes).await {
                            Ok(b) => {
                                response.records = batch::before(&b, spec.end).into();
                                let _ = reply.send(response);
                                None
                            }
                            Err(e) => {
                                response.error = Some(ErrorCode::StorageError);
                                let _ = reply.send(response);
                                matches!(e, StorageError::Fault { .. })
                                    .then_some(Event::Storage(StorageDone::ReadFailed(e)))
                            }
                        }
                    }),
                }
            }
            Action::ProduceDone { id, result } => {
                if let Some(reply) = self.produces.remove(&id) {
                    // The batch was appended here: whatever went wrong
                    // afterwards, it may or may not survive, so this is
                    // never the retriable "not the leader" refusal.
                    let r = result.map_err(|code| {
                        let why = match (code, &self.last_fault) {
                            (ErrorCode::RequestTimedOut, _) => {
                                "appended, but not replicated to the ISR in time; it may or may not survive".to_string()
                            }
                            (ErrorCode::NotLeader, _) => {
                                "appended, but this node stopped leading before it was committed; it may or may not survive".to_string()
                            }
                            (ErrorCode::StorageError, Some(fault)) => format!(
                                "appended, but this node's storage failed ({fault}); it may or may not survive"
                            ),
                            _ => "appended, but not acknowledged; it may or may not survive"
                                .to_string(),
                        };
                        after_append(code, &why)
                    });
                    let _ = reply.send(r);
                }
            }
            Action::IsrWaitDone { .. } => {}
            Action::UpdateIsr {
                leader_epoch,
                isr,
                expected_version,
                added,
            } => {
                let shared = self.shared.clone();
                let tp = self.tp.clone();
                let events = self.events.clone();
                tokio::spawn(async move {
                    let gone = || events.is_closed();
                    let (result, current) = update_isr(
                        &shared,
                        &tp,
                        leader_epoch,
                        isr,
                        expected_version,
                        added,
                        gone,
                    )
                    .await;
                    if result.is_err()
                        && current
                            .as_ref()
                            .is_none_or(|c| c.version == expected_version)
                    {
                        // The store is down, refused a member, or did not
                        // take it: the core proposes again at once, so
                        // pace the retries.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    let _ = events.send(Event::IsrDone {
                        expected_version,
                        result,
                        current,
                    });
                });
            }
        }
    }
}

/// The leader's ISR change as a compare-and-set on the store, with the
/// controller's checks: still the leader of that epoch, version current,
/// added members' broker epochs current (KIP-903). Returns the outcome
/// and the store's view: the state written, or the one that refused it.
///
/// The state written goes to the actor at once (and to the node's other
/// readers, [`Shared::wrote_state`]) rather than with the watcher's next
/// poll: until then the actor would judge by the ISR before the change,
/// and a storage fault in that window would hand off a partition whose
/// ISR is now this replica alone (leaving it leaderless), or keep one
/// whose ISR just grew.
async fn update_isr(
    shared: &Shared,
    tp: &TopicPartition,
    leader_epoch: u32,
    isr: Vec<ReplicaId>,
    expected_version: u64,
    added: Vec<(ReplicaId, u64)>,
    gone: impl Fn() -> bool,
) -> (Result<u64, ErrorCode>, Option<PartitionState>) {
    let meta = &shared.metadata;
    let current = match meta.get_partition(&tp.topic, tp.partition).await {
        Ok(s) => s,
        Err(e) => {
            warn!(topic = %tp.topic, partition = tp.partition, "ISR update: cannot read metadata: {e}");
            return (Err(ErrorCode::IsrUpdateRejected), None);
        }
    };
    if current.leader != Some(shared.node_id) || current.leader_epoch != leader_epoch {
        return (Err(ErrorCode::FencedLeaderEpoch), Some(current));
    }
    if current.version != expected_version {
        return (Err(ErrorCode::IsrUpdateRejected), Some(current));
    }
    match reregistered(meta, &added).await {
        Ok(None) => {}
        Ok(Some((r, epoch))) => {
            info!(topic = %tp.topic, partition = tp.partition,
                "not admitting node {r} to the ISR: broker epoch {epoch} is not its registration");
            return (Err(ErrorCode::IsrUpdateRejected), None);
        }
        Err(e) => {
            warn!("ISR update: cannot list brokers: {e}");
            return (Err(ErrorCode::IsrUpdateRejected), None);
        }
    }
    // Members it drops were in sync, so they hold everything committed:
    // eligible if the ISR falls below min.insync.
    let mut proposal = current.with_isr(isr.clone(), shared.replication.min_insync_replicas, true);
    // Set when a retry writes the state as it was instead (below).
    let mut withdrawn = false;
    let mut pause = Duration::from_millis(50);
    let mut outcome = meta
        .compare_and_set(proposal.clone(), expected_version)
        .await;
    // Maybe written (a lost answer, a call that timed out): until the store
    // says which ISR it holds, the core keeps counting the proposal's
    // members for the HW. Dropping an expansion the store did take would
    // let the HW pass a member that may be elected (Kafka's AlterPartition
    // keeps its maximal ISR on such errors too). A read cannot tell: etcd
    // answers "request timed out" for a write it has not committed yet and
    // may still commit after a read that did not see it (review). The same
    // compare-and-set again can: its store orders it after the first, so
    // it is refused if the first was written and written if the first
    // never will be.
    while let Err(e) = &outcome
        && !matches!(
            e,
            MetadataError::Conflict(_) | MetadataError::InvalidInput(_)
        )
    {
        if gone() {
            // Nobody waits for the answer any more.
            return (Err(ErrorCode::IsrUpdateRejected), None);
        }
        // Once per change: with the store away, every led partition retries.
        if pause == Duration::from_millis(50) {
            warn!(topic = %tp.topic, partition = tp.partition,
                "ISR update's outcome unknown ({e}); making the same change again until the store answers");
        } else {
            debug!(topic = %tp.topic, partition = tp.partition, "ISR update's outcome still unknown: {e}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
        // A retry may come long after the check above: a member that
        // registered again since (a restart, a controlled shutdown) must
        // not be admitted on its last run's fetches (KIP-903, review). The
        // retry then writes the state as it was, which settles the first
        // write all the same.
        if !withdrawn {
            match reregistered(meta, &added).await {
                Ok(None) => {}
                Ok(Some((r, epoch))) => {
                    info!(topic = %tp.topic, partition = tp.partition,
                        "node {r} registered again since its broker epoch {epoch} fetched: the retry leaves the ISR as it was");
                    proposal = current.clone();
                    withdrawn = true;
                }
                // Cannot tell yet: nothing is written without knowing.
                Err(_) => continue,
            }
        }
        outcome = meta
            .compare_and_set(proposal.clone(), expected_version)
            .await;
    }
    match outcome {
        Ok(v) => {
            let written = PartitionState {
                version: v,
                ..proposal
            };
            shared.wrote_state(tp.clone(), written.clone());
            if withdrawn {
                // Not the change proposed: the core drops it and adopts
                // the state written.
                return (Err(ErrorCode::IsrUpdateRejected), Some(written));
            }
            info!(topic = %tp.topic, partition = tp.partition, "ISR is now {isr:?} (version {v})");
            (Ok(v), Some(written))
        }
        Err(e) => {
            // Refused: this attempt wrote nothing, but an earlier one whose
            // answer was lost may have. The store's state says which ISR
            // it holds, and the core adopts it with the refusal.
            debug!(topic = %tp.topic, partition = tp.partition, "ISR update refused: {e}");
            let fresh = read_back(shared, tp, gone).await;
            (Err(ErrorCode::IsrUpdateRejected), fresh)
        }
    }
}

/// The first of `added` (members joining the ISR, with the broker epoch
/// they fetched in) whose registration is no longer that broker epoch.
async fn reregistered(
    meta: &Arc<dyn crate::metadata::MetadataStore>,
    added: &[(ReplicaId, u64)],
) -> Result<Option<(ReplicaId, u64)>, MetadataError> {
    if added.is_empty() {
        return Ok(None);
    }
    let brokers = meta.list_brokers().await?;
    Ok(added
        .iter()
        .find(|(r, epoch)| !brokers.iter().any(|b| b.id == *r && b.epoch == *epoch))
        .copied())
}

/// The partition's state, re-read until the store answers (backing off
/// to 2 s) or `gone` says nobody is waiting any more. Read after a
/// refusal, it reflects whatever the refusal saw.
async fn read_back(
    shared: &Shared,
    tp: &TopicPartition,
    gone: impl Fn() -> bool,
) -> Option<PartitionState> {
    let mut wait = Duration::from_millis(50);
    loop {
        match shared.metadata.get_partition(&tp.topic, tp.partition).await {
            Ok(s) => return Some(s),
            Err(e) if gone() => {
                debug!(topic = %tp.topic, partition = tp.partition, "stopped reading back the ISR: {e}");
                return None;
            }
            Err(e) => {
                debug!(topic = %tp.topic, partition = tp.partition, "reading back the ISR: {e}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Record;
    use crate::storage::memory::MemoryLog;

    fn batch_at(base: u64) -> Bytes {
        let r = Record {
            value: Bytes::from(vec![base as u8; 100]),
            ..Default::default()
        };
        batch::encode(base, 1, &[r]).expect("encodes")
    }

    /// The wasm memory plugin's log, as a node opens it.
    async fn plugin_log() -> Arc<NodeLog> {
        use crate::plugin::{PluginSource, Sandbox, StoragePlugin};
        let plugin =
            StoragePlugin::load(&PluginSource::Builtin("memory".into()), Sandbox::default())
                .expect("built-in memory plugin");
        let log = plugin.open("t", 0, Vec::new(), None).await.expect("opens");
        Arc::new(NodeLog::Plugin(log))
    }

    /// Queue three appends, another operation, and a fourth append before
    /// the lane runs; what the lane reports, in order.
    async fn run_queued(log: Arc<NodeLog>) -> Vec<String> {
        let (ops, rx) = mpsc::unbounded_channel();
        let (events, mut done) = mpsc::unbounded_channel();
        // Queued before the lane runs: it finds them all waiting.
        for base in 0..3 {
            let _ = ops.send(LaneOp::Append(batch_at(base)));
        }
        let reader = log.clone();
        let _ = ops.send(LaneOp::Other(Box::pin(async move {
            let end = reader.bounds().await.map(|b| b.log_end);
            Some(Event::Storage(StorageDone::Truncated(end)))
        })));
        let _ = ops.send(LaneOp::Append(batch_at(3)));
        drop(ops);
        run_lane(log.clone(), rx, events).await;
        let mut got = Vec::new();
        while let Ok(e) = done.try_recv() {
            got.push(match e {
                Event::Storage(StorageDone::Appended(Ok(end))) => format!("appended {end}"),
                Event::Storage(StorageDone::Truncated(Ok(end))) => format!("other saw {end}"),
                _ => "unexpected".to_string(),
            });
        }
        let all = log.read(0, 1 << 20).await.expect("reads");
        let offsets: Vec<u64> = batch::decode(&all)
            .expect("whole batches")
            .iter()
            .map(|r| r.offset)
            .collect();
        assert_eq!(offsets, [0, 1, 2, 3]);
        got
    }

    /// Appends queued behind a busy lane go to a plugin as one call, and
    /// each gets its completion: the joined log end, in order. Other
    /// operations keep their place.
    #[tokio::test]
    async fn queued_appends_are_joined_and_each_is_reported() {
        // Three joined appends all report the end after the joined call
        // (one call at a time would report 1, 2, 3).
        assert_eq!(
            run_queued(plugin_log().await).await,
            [
                "appended 3",
                "appended 3",
                "appended 3",
                "other saw 3",
                "appended 4"
            ]
        );
    }

    /// The native log takes a group commit part by part (no join, no
    /// copy): each part reports its own log end, in order.
    #[tokio::test]
    async fn the_native_log_takes_a_group_commit_part_by_part() {
        let log = Arc::new(NodeLog::Native(MemoryLog::new()));
        assert_eq!(
            run_queued(log).await,
            [
                "appended 1",
                "appended 2",
                "appended 3",
                "other saw 3",
                "appended 4"
            ]
        );
    }

    /// A join stops before it would pass `COALESCE_BYTES`.
    #[tokio::test]
    async fn a_join_never_grows_past_its_bound() {
        let log = plugin_log().await;
        let (ops, rx) = mpsc::unbounded_channel();
        let (events, mut done) = mpsc::unbounded_channel();
        let big = |base: u64| {
            let r = Record {
                value: Bytes::from(vec![1u8; COALESCE_BYTES * 3 / 4]),
                ..Default::default()
            };
            batch::encode(base, 1, &[r]).expect("encodes")
        };
        for base in 0..3 {
            let _ = ops.send(LaneOp::Append(big(base)));
        }
        drop(ops);
        run_lane(log, rx, events).await;
        let mut ends = Vec::new();
        while let Ok(Event::Storage(StorageDone::Appended(Ok(end)))) = done.try_recv() {
            ends.push(end);
        }
        assert_eq!(ends, [1, 2, 3], "each went alone");
    }

    /// A partition with claims still to give up (a recovery lost records)
    /// does not lead on metadata sent before: its log may lack what it
    /// acknowledged. Once they are given up, the same state is obeyed.
    #[tokio::test]
    async fn a_pending_hand_off_keeps_a_replica_from_leading() {
        let store = LostAnswers::new(PartitionState::sample(Some(1), &[1], &[2]), 0, true);
        let (shared, _fetch_rx) = Shared::for_tests(store.clone(), Default::default());
        let tp = TopicPartition::new("t", 0);
        let (handle, _) = start(shared.clone(), tp.clone()).await.expect("start");
        let named_leader = store.state.lock().unwrap().clone();
        shared.request_handoff(tp.clone(), Some(false));
        handle.send(Event::Metadata(named_leader.clone()));
        assert_eq!(status(&handle).await.role, "idle");
        if let Ok(mut h) = shared.handoffs.lock() {
            h.remove(&tp);
        }
        // The watcher sends it again once the hand-off settled.
        handle.send(Event::Metadata(named_leader));
        assert_eq!(status(&handle).await.role, "leader");
    }

    /// A record whose epoch is older than the log's newest (the store was
    /// restored from an older backup) is obeyed in neither role: leading
    /// would append out of epoch order, following would fetch in an epoch
    /// the leader may share with another. Nor does a replica start leading
    /// an epoch its log holds already. Either asks for a re-stamp above
    /// the log; a record above the log is obeyed.
    #[tokio::test]
    async fn a_record_older_than_the_log_is_not_served() {
        let (_store, shared, tp, handle, _fetch_rx) = node_1_leading_with_2().await;
        assert_eq!(shared.log_epoch(&tp), Some(4), "published");
        let restored = |leader, epoch, version| PartitionState {
            leader_epoch: epoch,
            version,
            ..PartitionState::sample(Some(leader), &[1, 2], &[])
        };
        handle.send(Event::Metadata(restored(1, 2, 10)));
        assert_eq!(status(&handle).await.role, "idle", "led epoch 2");
        handle.send(Event::Metadata(restored(2, 3, 11)));
        assert_eq!(status(&handle).await.role, "idle", "followed in epoch 3");
        assert_eq!(shared.restamp_wanted(&tp), Some(4));
        shared.restamp_done(&tp);
        // Epoch 4 again, which it led and then left: not led a second time.
        handle.send(Event::Metadata(restored(1, 4, 12)));
        assert_eq!(status(&handle).await.role, "idle", "led epoch 4 again");
        assert_eq!(shared.restamp_wanted(&tp), Some(4));
        handle.send(Event::Metadata(restored(1, 5, 13)));
        assert_eq!(status(&handle).await.role, "leader");
        assert_eq!(
            shared.restamp_wanted(&tp),
            None,
            "served: no re-stamp wanted"
        );
        // Its ISR changes in the epoch it leads are obeyed as before.
        let shrunk = PartitionState {
            isr: vec![1],
            ..restored(1, 5, 14)
        };
        handle.send(Event::Metadata(shrunk));
        let now = status(&handle).await;
        assert_eq!((now.role.as_str(), now.isr), ("leader", vec![1]));
        handle.send(Event::Metadata(restored(2, 6, 15)));
        assert_eq!(status(&handle).await.role, "follower");
    }

    /// The partition's status, as `status` asks it.
    async fn status(h: &PartitionHandle) -> ReplicaStatus {
        let (reply, rx) = oneshot::channel();
        assert!(h.send(Event::Status { reply }));
        rx.await.expect("status")
    }

    /// A store that writes a compare-and-set and then fails to say so,
    /// and fails the next `blind_reads` reads too (a lost answer, then a
    /// store unavailable for a while); with `lose_answer` false, one that
    /// answers. Only the first write's answer is lost.
    struct LostAnswers {
        state: std::sync::Mutex<PartitionState>,
        /// Reads still to fail; set to `blind_after_write` by the write.
        blind_reads: std::sync::atomic::AtomicU32,
        blind_after_write: u32,
        /// Answers to writes still to lose.
        lose_answers: std::sync::atomic::AtomicU32,
        /// The write whose answer is lost lands only after the next call
        /// (etcd's "request timed out" for a write not committed yet).
        lands_late: bool,
        late: std::sync::Mutex<Option<(PartitionState, u64)>>,
        /// The write whose answer is lost never lands, and meanwhile node
        /// 3 registers again (broker epoch 1, then 2).
        restart_of_3: bool,
        brokers: std::sync::Mutex<Vec<crate::metadata::Broker>>,
    }

    impl LostAnswers {
        fn new(state: PartitionState, blind_after_write: u32, lose_answer: bool) -> Arc<Self> {
            Arc::new(LostAnswers {
                state: std::sync::Mutex::new(state),
                blind_reads: 0.into(),
                blind_after_write,
                lose_answers: u32::from(lose_answer).into(),
                lands_late: false,
                late: Default::default(),
                restart_of_3: false,
                brokers: Default::default(),
            })
        }

        /// Its first write's answer is lost and the write never lands;
        /// meanwhile node 3 (broker epoch 1) registers again.
        fn while_node_3_restarts(state: PartitionState) -> Arc<Self> {
            let broker = crate::metadata::Broker {
                id: 3,
                address: "127.0.0.1:1".into(),
                epoch: 1,
            };
            Arc::new(LostAnswers {
                restart_of_3: true,
                brokers: std::sync::Mutex::new(vec![broker]),
                ..Arc::into_inner(LostAnswers::new(state, 0, true)).expect("one owner")
            })
        }

        /// Its first write times out and lands after the next call.
        fn landing_late(state: PartitionState) -> Arc<Self> {
            Arc::new(LostAnswers {
                lands_late: true,
                ..Arc::into_inner(LostAnswers::new(state, 0, true)).expect("one owner")
            })
        }

        /// `next` if the stored version is `expected`.
        fn write(&self, next: PartitionState, expected: u64) -> Result<u64, MetadataError> {
            match self.state.lock() {
                Ok(mut s) if s.version == expected => {
                    *s = PartitionState {
                        version: expected + 1,
                        ..next
                    };
                    self.blind_reads
                        .store(self.blind_after_write, std::sync::atomic::Ordering::SeqCst);
                    Ok(expected + 1)
                }
                _ => Err(MetadataError::Conflict("another version".into())),
            }
        }

        /// The late write, if one waits.
        fn land(&self) {
            if let Some((next, expected)) = self.late.lock().ok().and_then(|mut l| l.take()) {
                let _ = self.write(next, expected);
            }
        }
    }

    impl crate::metadata::MetadataStore for LostAnswers {
        fn get_partition<'a>(
            &'a self,
            _: &'a str,
            _: u32,
        ) -> crate::metadata::MetaFuture<'a, PartitionState> {
            use std::sync::atomic::Ordering::SeqCst;
            let blind = self
                .blind_reads
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let state = self.state.lock().ok().map(|s| s.clone());
            // After the read: it did not see the late write.
            self.land();
            Box::pin(async move {
                match state {
                    Some(s) if !blind => Ok(s),
                    _ => Err(MetadataError::Unavailable("no answer".into())),
                }
            })
        }
        fn compare_and_set(
            &self,
            next: PartitionState,
            expected: u64,
        ) -> crate::metadata::MetaFuture<'_, u64> {
            use std::sync::atomic::Ordering::SeqCst;
            // A late write lands first: the store keeps the writes' order.
            self.land();
            let lose = self
                .lose_answers
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let written = if lose && self.lands_late {
                if let Ok(mut l) = self.late.lock() {
                    *l = Some((next, expected));
                }
                Err(MetadataError::Unavailable("request timed out".into()))
            } else if lose && self.restart_of_3 {
                if let Ok(mut b) = self.brokers.lock() {
                    b.iter_mut().for_each(|b| b.epoch += 1);
                }
                Err(MetadataError::Unavailable("request timed out".into()))
            } else {
                self.write(next, expected)
            };
            Box::pin(async move {
                if lose {
                    Err(MetadataError::Unavailable("answer lost".into()))
                } else {
                    written
                }
            })
        }
        fn list_partitions(&self) -> crate::metadata::MetaFuture<'_, Vec<(String, u32)>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn register_broker(&self, _: ReplicaId, _: String) -> crate::metadata::MetaFuture<'_, u64> {
            Box::pin(async { Ok(1) })
        }
        fn list_brokers(&self) -> crate::metadata::MetaFuture<'_, Vec<crate::metadata::Broker>> {
            let brokers = self.brokers.lock().map(|b| b.clone()).unwrap_or_default();
            Box::pin(async { Ok(brokers) })
        }

        /// A fresh store's answer.
        fn claim_cluster_id(&self, id: String) -> crate::metadata::MetaFuture<'_, String> {
            Box::pin(async { Ok(id) })
        }
    }

    /// Node 1 over a store that answers, its partition t/0 started and
    /// leading epoch 4 with ISR {1, 2} ([`leading_with_2`]).
    async fn node_1_leading_with_2() -> (
        Arc<LostAnswers>,
        Arc<Shared>,
        TopicPartition,
        PartitionHandle,
        mpsc::UnboundedReceiver<FetchCmd>,
    ) {
        let store = LostAnswers::new(PartitionState::sample(Some(1), &[1, 2], &[]), 0, false);
        let (shared, fetch_rx) = Shared::for_tests(store.clone(), Default::default());
        let tp = TopicPartition::new("t", 0);
        let handle = leading_with_2(&shared, &tp).await;
        (store, shared, tp, handle, fetch_rx)
    }

    /// The partition started, leading epoch 4 with ISR {1, 2}.
    async fn leading_with_2(shared: &Arc<Shared>, tp: &TopicPartition) -> PartitionHandle {
        let (handle, _) = start(shared.clone(), tp.clone()).await.expect("start");
        handle.send(Event::Metadata(PartitionState::sample(
            Some(1),
            &[1, 2],
            &[],
        )));
        assert_eq!(status(&handle).await.isr, vec![1, 2]);
        handle
    }

    /// A storage fault moves leadership off a replica only if the ISR has
    /// other members, judged by the ISR this replica itself just wrote,
    /// not by the one before: the watcher may not have passed it on yet.
    /// It used to keep the old view until the watcher's next poll, so a
    /// fault right after the leader shrank the ISR to itself handed the
    /// partition off, and the store's state, with this replica the ISR's
    /// only member and not intact, was left with no leader at all.
    // Paused time: the fault's recovery timer must not fire mid-test (see
    // the next test).
    #[tokio::test(start_paused = true)]
    async fn a_storage_fault_is_judged_by_the_isr_the_leader_just_wrote() {
        let (store, shared, tp, handle, _fetch_rx) = node_1_leading_with_2().await;

        // The leader's shrink to itself, as its core proposes it.
        let (result, current) = update_isr(&shared, &tp, 4, vec![1], 9, Vec::new(), || false).await;
        assert_eq!(result, Ok(10));
        let written = current.clone().expect("the state written");
        assert_eq!((written.isr.clone(), written.version), (vec![1], 10));
        handle.send(Event::IsrDone {
            expected_version: 9,
            result,
            current,
        });
        let fault = || {
            Event::Storage(StorageDone::Persisted(Err(StorageError::Io(
                "disk gone".into(),
            ))))
        };
        handle.send(fault());
        assert_eq!(status(&handle).await.role, "recovering");
        assert!(
            !shared.handoff_pending(&tp),
            "the ISR's only member handed the partition off"
        );

        // With another member in the ISR, a fault hands it off.
        let (shared, _fetch_rx) = Shared::for_tests(store.clone(), Default::default());
        let handle = leading_with_2(&shared, &tp).await;
        handle.send(fault());
        assert_eq!(status(&handle).await.role, "recovering");
        assert!(shared.handoff_pending(&tp));

        // An append the old state machine issued completes after the
        // fault: the recovery re-reads the log, and the old machine must
        // not act on it (it used to: its log end moved, and it could
        // issue a retention delete against the recovered log).
        handle.send(Event::Storage(StorageDone::Appended(Ok(50))));
        let s = status(&handle).await;
        assert_eq!((s.role.as_str(), s.log_end), ("recovering", 0));
    }

    /// A leader whose storage fails hands off and stays eligible (the
    /// ELR) when the ISR falls below min.insync: its log is judged by its
    /// recovery, not assumed lossy at the fault. Assumed lossy, every
    /// replica of a partition whose disks all filled up left the ISR and
    /// the ELR in turn, and losing the last one took an unclean election.
    /// A recovery that fails takes the eligibility away.
    ///
    /// Paused time: the fault schedules the real recovery 200 ms on, and
    /// the failed recovery below must come first. On the wall clock a
    /// stall of the test thread let the real one win; paused, the timer
    /// fires only when every task waits on time, which nothing here does.
    #[tokio::test(start_paused = true)]
    async fn a_storage_fault_keeps_the_replica_eligible_until_its_recovery_judges_it() {
        let (store, shared, tp, handle, _fetch_rx) = node_1_leading_with_2().await;
        handle.send(Event::Storage(StorageDone::Persisted(Err(
            StorageError::Io("No space left on device".into()),
        ))));
        assert_eq!(status(&handle).await.role, "recovering");
        assert!(crate::node::settle_handoff(&shared, &tp, true).await);
        let handed = store.state.lock().unwrap().clone();
        assert_eq!(
            (handed.leader, handed.isr, handed.elr),
            (Some(2), vec![2], vec![1]),
            "moved off, and eligible"
        );
        // Node 2 fails and the coordinator elects node 1 from the ELR
        // while its log is still recovering: it is now the ISR's only
        // member. Its recovery fails (a dead disk): it gives the claim up
        // all the same, so another eligible replica can be elected.
        let elected = {
            let mut s = store.state.lock().unwrap();
            *s = PartitionState {
                leader: Some(1),
                leader_epoch: s.leader_epoch + 1,
                isr: vec![1],
                elr: vec![],
                version: s.version + 1,
                ..s.clone()
            };
            s.clone()
        };
        handle.send(Event::Metadata(elected));
        handle.send(Event::Recovered(Err(StorageError::Io("still gone".into()))));
        let _ = status(&handle).await;
        let verdict = shared.handoffs.lock().unwrap().get(&tp).copied();
        assert_eq!(verdict, Some(Some(false)));
        assert!(crate::node::settle_handoff(&shared, &tp, false).await);
        let dropped = store.state.lock().unwrap().clone();
        assert_eq!(
            (dropped.leader, dropped.isr, dropped.elr),
            (None, vec![], vec![])
        );
        // Asked once: a second failed recovery asks nothing more.
        handle.send(Event::Recovered(Err(StorageError::Io("still gone".into()))));
        let _ = status(&handle).await;
        assert!(!shared.handoff_pending(&tp));
    }

    /// A produce waiting for the ISR when the leader's storage fails is
    /// told what failed: "not acknowledged" alone did not say the disk was
    /// full.
    #[tokio::test]
    async fn a_produce_failed_by_a_storage_fault_names_it() {
        let (_store, _shared, _tp, handle, _fetch_rx) = node_1_leading_with_2().await;
        let (reply, answer) = oneshot::channel();
        assert!(handle.send(Event::Produce {
            batches: batch::Validated::check(batch_at(0)).expect("valid"),
            acks: Acks::All,
            timeout_ms: 60_000,
            reply,
            sequence: None,
        }));
        // Taken (the actor handles events in order), waiting for node 2.
        assert_eq!(status(&handle).await.role, "leader");
        handle.send(Event::Storage(StorageDone::Persisted(Err(
            StorageError::Io("write 0.log: No space left on device".into()),
        ))));
        let e = answer.await.expect("answered").expect_err("failed");
        assert!(
            e.to_string().contains("storage failed") && e.to_string().contains("No space left"),
            "{e}"
        );
    }

    /// Leader 1 of epoch 4 proposes adding node 3 to the ISR; the store
    /// takes it but the answer and the next `blind_reads` reads are lost.
    async fn lost_expansion(
        blind_reads: u32,
        gone: impl Fn() -> bool,
    ) -> (Result<u64, ErrorCode>, Option<PartitionState>) {
        let store = LostAnswers::new(
            PartitionState::sample(Some(1), &[1, 2], &[]),
            blind_reads,
            true,
        );
        let (shared, _fetch_rx) = Shared::for_tests(store, Default::default());
        let tp = TopicPartition::new("t", 0);
        update_isr(&shared, &tp, 4, vec![1, 2, 3], 9, Vec::new(), gone).await
    }

    #[tokio::test]
    async fn an_isr_update_with_a_lost_answer_is_read_back_not_dropped() {
        // Reported as a plain refusal, the core would drop the expansion
        // and stop counting node 3 for the HW while the store lists it in
        // the ISR, where it may be elected.
        let (result, current) = lost_expansion(3, || false).await;
        assert_eq!(result, Err(ErrorCode::IsrUpdateRejected));
        let current = current.expect("the store's state, read back");
        assert_eq!((current.isr, current.version), (vec![1, 2, 3], 10));
        // Nobody waiting any more: it stops reading.
        let (_, current) = lost_expansion(u32::MAX, || true).await;
        assert!(current.is_none());
    }

    /// The store takes the expansion only after the read that follows its
    /// timed-out answer (etcd commits a write it answered "request timed
    /// out" for after a read that did not see it): what the driver
    /// reports must be what the store holds, or the core stops counting
    /// node 3 for the HW while the store lists it in the ISR (review).
    #[tokio::test]
    async fn an_isr_update_that_lands_after_its_read_back_is_not_dropped() {
        let store = LostAnswers::landing_late(PartitionState::sample(Some(1), &[1, 2], &[]));
        let (shared, _fetch_rx) = Shared::for_tests(store.clone(), Default::default());
        let tp = TopicPartition::new("t", 0);
        let (result, current) =
            update_isr(&shared, &tp, 4, vec![1, 2, 3], 9, Vec::new(), || false).await;
        let held = store.state.lock().unwrap().clone();
        assert_eq!((&held.isr, held.version), (&vec![1, 2, 3], 10));
        let current = current.expect("the store's state");
        assert_eq!((current.isr, current.version), (held.isr, held.version));
        // Its retry was refused (the late write landed first, as the
        // store keeps their order): the core adopts the state with it.
        assert_eq!(result, Err(ErrorCode::IsrUpdateRejected));
    }

    /// The expansion's answer is lost (the write never lands), and node 3
    /// registers again (a restart) before the store answers a retry: the
    /// retry does not admit node 3 on its last run's fetches (KIP-903); it
    /// writes the ISR as it was, and the driver reports a refusal with
    /// that state, which the core adopts (review).
    #[tokio::test(start_paused = true)]
    async fn a_retried_expansion_does_not_admit_a_member_that_registered_again() {
        let store =
            LostAnswers::while_node_3_restarts(PartitionState::sample(Some(1), &[1, 2], &[]));
        let (shared, _fetch_rx) = Shared::for_tests(store.clone(), Default::default());
        let tp = TopicPartition::new("t", 0);
        let (result, current) =
            update_isr(&shared, &tp, 4, vec![1, 2, 3], 9, vec![(3, 1)], || false).await;
        let held = store.state.lock().unwrap().clone();
        assert_eq!((&held.isr, held.version), (&vec![1, 2], 10));
        let current = current.expect("the state written");
        assert_eq!((current.isr, current.version), (held.isr, held.version));
        assert_eq!(result, Err(ErrorCode::IsrUpdateRejected));
    }
}
