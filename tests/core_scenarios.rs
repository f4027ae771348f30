//! Scripted scenarios for the replication core: the KIP-101, KIP-279 and
//! KIP-320 cases, the data-loss scenarios of the reference doc, and a
//! regression test for each known bug of the reference package.

#[allow(dead_code)]
#[path = "sim/storage.rs"]
mod storage;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use replicator::batch::Record;
use replicator::core::{
    Acks, Action, Config, ErrorCode, Faults, FetchRequest, FetchResponse, Records, ReplicaId,
    ReplicationManager, Role,
};

use storage::SimLog;

enum Msg {
    Fetch(FetchRequest),
    Resp(FetchResponse),
}

struct Node {
    rm: Option<ReplicationManager>,
    log: SimLog,
    broker_epoch: u64,
}

/// A tiny deterministic cluster: instant storage, a FIFO network with
/// blockable links, and a metadata store with compare-and-set.
struct Cluster {
    config: Config,
    nodes: Vec<Node>,
    queue: VecDeque<(ReplicaId, ReplicaId, Msg)>,
    blocked: BTreeSet<(ReplicaId, ReplicaId)>,
    now: u64,
    epoch: u32,
    isr: Vec<ReplicaId>,
    version: u64,
    produced: BTreeMap<u64, Result<u64, ErrorCode>>,
    waits: BTreeMap<u64, Result<(), ErrorCode>>,
    isr_updates: u32,
    faults: Faults,
    /// Retention deletions carried out.
    deletions: u32,
}

fn record(i: u64) -> Vec<Record> {
    vec![Record {
        value: Bytes::from(format!("m{i}")),
        timestamp: i as i64,
        ..Default::default()
    }]
}

impl Cluster {
    fn new(n: u32, config: Config) -> Cluster {
        let mut c = Cluster {
            config,
            nodes: (0..n)
                .map(|_| Node {
                    rm: None,
                    log: SimLog::default(),
                    broker_epoch: 0,
                })
                .collect(),
            queue: VecDeque::new(),
            blocked: BTreeSet::new(),
            now: 0,
            epoch: 0,
            isr: Vec::new(),
            version: 0,
            produced: BTreeMap::new(),
            waits: BTreeMap::new(),
            isr_updates: 0,
            faults: Faults::default(),
            deletions: 0,
        };
        for i in 0..n {
            c.start(i);
        }
        c
    }

    fn start(&mut self, n: ReplicaId) {
        let node = &mut self.nodes[n as usize];
        node.broker_epoch += 1;
        let mut rm = ReplicationManager::new(self.config.clone(), n, &node.log.state());
        rm.set_broker_epoch(node.broker_epoch);
        rm.set_faults(self.faults);
        node.rm = Some(rm);
    }

    fn rm(&mut self, n: ReplicaId) -> &mut ReplicationManager {
        self.nodes[n as usize].rm.as_mut().expect("node is up")
    }

    fn replicas(&self) -> Vec<ReplicaId> {
        (0..self.nodes.len() as u32).collect()
    }

    /// Make `leader` lead a new epoch with `isr`; every other live node follows.
    fn elect(&mut self, leader: ReplicaId, isr: &[ReplicaId]) {
        self.epoch += 1;
        self.version += 1;
        self.isr = isr.to_vec();
        let (epoch, version, now, replicas) = (self.epoch, self.version, self.now, self.replicas());
        self.rm(leader)
            .become_leader(epoch, replicas.clone(), isr.to_vec(), version, now)
            .expect("role change");
        for r in replicas {
            if r != leader && self.nodes[r as usize].rm.is_some() {
                self.rm(r)
                    .become_follower(leader, epoch, now)
                    .expect("role change");
            }
        }
        self.pump();
    }

    fn crash(&mut self, n: ReplicaId, lossy: bool) {
        self.nodes[n as usize].rm = None;
        if lossy {
            self.nodes[n as usize].log.lose_unflushed();
        }
        self.queue.retain(|(f, t, _)| *f != n && *t != n);
    }

    fn produce(&mut self, leader: ReplicaId, id: u64, acks: Acks) -> Result<(), ErrorCode> {
        let now = self.now;
        let r = self.rm(leader).produce(id, &record(id), acks, now + 60_000);
        self.pump();
        r
    }

    fn advance(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.now += 10;
            let now = self.now;
            for n in 0..self.nodes.len() as u32 {
                if let Some(rm) = self.nodes[n as usize].rm.as_mut() {
                    rm.tick(now);
                }
            }
            self.pump();
        }
    }

    /// Carry out actions and deliver messages until nothing moves.
    fn pump(&mut self) {
        for _ in 0..100_000 {
            let mut moved = false;
            for n in 0..self.nodes.len() as u32 {
                let actions = match self.nodes[n as usize].rm.as_mut() {
                    Some(rm) => rm.drain(),
                    None => continue,
                };
                for a in actions {
                    moved = true;
                    self.execute(n, a);
                }
            }
            if let Some((from, to, msg)) = self.queue.pop_front() {
                moved = true;
                let now = self.now;
                if !self.blocked.contains(&(from, to))
                    && let Some(rm) = self.nodes[to as usize].rm.as_mut()
                {
                    match msg {
                        Msg::Fetch(r) => rm.handle_fetch(from, r, now),
                        Msg::Resp(r) => rm.handle_fetch_response(from, r, now),
                    }
                } else {
                    // A lost message: the follower's fetch times out.
                    let (follower, corr) = match &msg {
                        Msg::Fetch(r) => (from, r.correlation_id),
                        Msg::Resp(r) => (to, r.correlation_id),
                    };
                    if let Some(rm) = self.nodes[follower as usize].rm.as_mut() {
                        rm.fetch_failed(corr, now);
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the cluster never went quiet");
    }

    fn execute(&mut self, n: ReplicaId, a: Action) {
        let now = self.now;
        let node = &mut self.nodes[n as usize];
        match a {
            Action::Append { batches } => {
                let leo = node
                    .log
                    .append(&batches)
                    .expect("the core appends in order");
                if let Some(rm) = node.rm.as_mut() {
                    rm.log_appended(leo, now);
                }
            }
            Action::Truncate { offset } => {
                let leo = node.log.truncate(offset);
                if let Some(rm) = node.rm.as_mut() {
                    rm.log_truncated(leo, now);
                }
            }
            Action::ResetLog { offset } => {
                node.log.reset(offset);
                if let Some(rm) = node.rm.as_mut() {
                    rm.log_reset(offset, now);
                }
            }
            Action::DeletePrefix { offset } => {
                let hw = node.rm.as_ref().map_or(0, |rm| rm.high_watermark());
                assert!(
                    offset <= hw,
                    "node {n} deletes below {offset} past its HW {hw}"
                );
                node.log.delete_prefix(offset);
                self.deletions += 1;
                if let Some(rm) = node.rm.as_mut() {
                    rm.log_prefix_deleted();
                }
            }
            Action::PersistEpochs(e) => node.log.epochs = e,
            Action::PersistHighWatermark(hw) => node.log.hw_checkpoint = hw,
            Action::SendFetch { to, request } => self.queue.push_back((n, to, Msg::Fetch(request))),
            Action::RespondFetch {
                to,
                mut response,
                read,
            } => {
                if let Some(spec) = read {
                    response.records = node.log.read(&spec).into();
                }
                self.queue.push_back((n, to, Msg::Resp(response)));
            }
            Action::ProduceDone { id, result } => {
                self.produced.insert(id, result);
            }
            Action::IsrWaitDone { id, result } => {
                self.waits.insert(id, result);
            }
            Action::UpdateIsr {
                leader_epoch,
                isr,
                expected_version,
                ..
            } => {
                let result = if leader_epoch != self.epoch {
                    Err(ErrorCode::FencedLeaderEpoch)
                } else if expected_version != self.version {
                    Err(ErrorCode::IsrUpdateRejected)
                } else {
                    self.isr = isr;
                    self.version += 1;
                    self.isr_updates += 1;
                    Ok(self.version)
                };
                if let Some(rm) = self.nodes[n as usize].rm.as_mut() {
                    rm.isr_update_done(expected_version, result, now);
                }
            }
        }
    }

    fn values(&self, n: ReplicaId) -> Vec<(u64, u32, Bytes)> {
        let log = &self.nodes[n as usize].log;
        log.batches
            .iter()
            .flat_map(|(_, _, epoch, b)| {
                replicator::batch::decode(b)
                    .expect("valid")
                    .into_iter()
                    .map(move |r| (r.offset, *epoch, r.record.value))
            })
            .collect()
    }
}

/// Make `n` (a follower of `leader`) issue a fresh fetch and return it,
/// so a test can answer it with a crafted response.
fn outstanding_fetch(c: &mut Cluster, n: ReplicaId, leader: ReplicaId) -> FetchRequest {
    let (epoch, now) = (c.epoch, c.now);
    c.rm(n)
        .become_follower(leader, epoch, now)
        .expect("role change");
    sent_fetch(c.rm(n))
}

/// The fetch `rm` just issued (it became a follower), of what it drains.
fn sent_fetch(rm: &mut ReplicationManager) -> FetchRequest {
    rm.drain()
        .into_iter()
        .find_map(|a| match a {
            Action::SendFetch { request, .. } => Some(request),
            _ => None,
        })
        .expect("a follower fetches on becoming follower")
}

/// `config()` with min.insync.replicas = 1.
/// `leader`'s answer to `request` from `follower`, asked to answer at once
/// (not parked to wait for data).
fn answered_at_once(
    c: &mut Cluster,
    leader: ReplicaId,
    follower: ReplicaId,
    mut request: FetchRequest,
) -> FetchResponse {
    request.max_wait_ms = 0;
    let now = c.now;
    c.rm(leader).handle_fetch(follower, request, now);
    c.rm(leader)
        .drain()
        .into_iter()
        .find_map(|a| match a {
            Action::RespondFetch { response, .. } => Some(response),
            _ => None,
        })
        .expect("an answer")
}

fn relaxed() -> Config {
    Config {
        min_insync_replicas: 1,
        ..config()
    }
}

fn config() -> Config {
    Config {
        min_insync_replicas: 2,
        replica_lag_time_max_ms: 1000,
        fetch_max_wait_ms: 100,
        fetch_backoff_ms: 50,
        ..Config::default()
    }
}

fn acked(c: &Cluster) -> Vec<u64> {
    c.produced.values().filter_map(|r| r.ok()).collect()
}

#[test]
fn acks_all_completes_as_followers_fetch_without_any_timer() {
    // Reference bugs: HW on a 5 s timer; acks waited up to ~10 s.
    let mut c = Cluster::new(3, config());
    c.elect(0, &[0, 1, 2]);
    for i in 0..5 {
        c.produce(0, i, Acks::All).unwrap();
    }
    // No `advance`: only message delivery happened.
    assert_eq!(acked(&c), vec![0, 1, 2, 3, 4]);
    assert_eq!(c.rm(0).high_watermark(), 5);
}

#[test]
fn kip320_fetches_with_an_older_or_newer_epoch_are_refused() {
    let mut c = Cluster::new(2, config());
    c.elect(0, &[0, 1]);
    c.elect(0, &[0, 1]); // epoch 2
    for (epoch, want) in [
        (1, ErrorCode::FencedLeaderEpoch),
        (3, ErrorCode::UnknownLeaderEpoch),
    ] {
        let req = FetchRequest {
            replica_id: 1,
            replica_epoch: 1,
            correlation_id: 99,
            current_leader_epoch: epoch,
            fetch_offset: 0,
            last_fetched_epoch: None,
            max_bytes: 1024,
            min_bytes: 0,
            max_wait_ms: 0,
        };
        let now = c.now;
        c.rm(0).handle_fetch(1, req, now);
        let resp = c.rm(0).drain().into_iter().find_map(|a| match a {
            Action::RespondFetch { response, .. } => Some(response),
            _ => None,
        });
        assert_eq!(resp.and_then(|r| r.error), Some(want), "epoch {epoch}");
    }
}

#[test]
fn scenario1_isr_of_the_leader_alone_refuses_acks_all_and_commits_nothing() {
    let mut c = Cluster::new(3, config());
    c.elect(0, &[0, 1, 2]);
    c.produce(0, 0, Acks::All).unwrap();
    c.blocked.extend([(1, 0), (2, 0), (0, 1), (0, 2)]);
    c.advance(1500);
    assert_eq!(
        c.isr,
        vec![0],
        "the ISR shrank to the leader through the store"
    );
    assert_eq!(
        c.produce(0, 1, Acks::All),
        Err(ErrorCode::NotEnoughReplicas)
    );
    c.produce(0, 2, Acks::Leader).unwrap();
    assert_eq!(
        c.rm(0).high_watermark(),
        1,
        "below min.insync the HW must not move"
    );
}

#[test]
fn kip101_restarted_follower_keeps_its_log_and_can_lead_without_loss() {
    let mut c = Cluster::new(3, config());
    c.elect(0, &[0, 1, 2]);
    for i in 0..10 {
        c.produce(0, i, Acks::All).unwrap();
    }
    // The follower's HW checkpoint is stale (it never checkpointed).
    assert_eq!(c.nodes[1].log.hw_checkpoint, 0);
    c.crash(1, false);
    c.start(1);
    let (epoch, now) = (c.epoch, c.now);
    c.rm(1).become_follower(0, epoch, now).expect("role change");
    c.pump();
    c.crash(0, false);
    c.elect(1, &[1, 2]);
    let held: Vec<u64> = c.values(1).iter().map(|v| v.0).collect();
    assert_eq!(
        held,
        (0..10).collect::<Vec<_>>(),
        "every acked record on the new leader"
    );
}

#[test]
fn kip101_the_reference_behaviour_loses_acked_data() {
    // The same script with the follower truncating to its HW.
    let mut c = Cluster::new(3, config());
    c.faults = Faults {
        follower_truncates_to_hw: true,
        ..Faults::default()
    };
    c.elect(0, &[0, 1, 2]);
    for i in 0..10 {
        c.produce(0, i, Acks::All).unwrap();
    }
    c.crash(1, false);
    c.start(1);
    c.blocked.insert((0, 1)); // the leader dies before it can refill it
    let (epoch, now) = (c.epoch, c.now);
    c.rm(1).become_follower(0, epoch, now).expect("role change");
    c.pump();
    assert!(
        c.values(1).len() < 10,
        "the bug cut acked records from the future leader"
    );
}

#[test]
fn kip101_divergent_records_at_one_offset_are_reconciled_by_epoch() {
    let mut c = Cluster::new(2, relaxed());
    c.elect(0, &[0, 1]);
    for i in 0..5 {
        c.produce(0, i, Acks::All).unwrap();
    }
    // Node 0 writes offset 5 that never reaches node 1, then dies.
    c.blocked.insert((0, 1));
    c.produce(0, 5, Acks::Leader).unwrap();
    c.crash(0, false);
    c.blocked.clear();
    // Node 1 leads epoch 2 and writes a different record at offset 5.
    c.elect(1, &[1]);
    c.produce(1, 105, Acks::Leader).unwrap();
    // Node 0 returns with its own offset 5 (epoch 1) and must drop it.
    c.start(0);
    let (epoch, now) = (c.epoch, c.now);
    c.rm(0).become_follower(1, epoch, now).expect("role change");
    c.pump();
    assert_eq!(
        c.values(0),
        c.values(1),
        "logs identical after reconciliation"
    );
    assert_eq!(c.values(0)[5].2, Bytes::from("m105"));
}

/// A leader whose epoch cache lost its early entries (the checkpoint file
/// gone, the batches still there; the host rebuilds such a cache at open,
/// this is the core alone) must not tell a follower whose last epoch is
/// one of them to truncate. It used to answer "diverge from my log start",
/// and every follower cut its whole log, committed records included, while
/// staying in the ISR: killing the leader then lost them. It cannot tell
/// whether the follower's records below its oldest epoch match its own
/// either, so it refuses the fetch (retried) rather than accept them.
#[test]
fn a_leader_that_lost_its_early_epochs_does_not_make_followers_truncate() {
    let mut c = Cluster::new(3, config());
    c.elect(0, &[0, 1, 2]);
    for i in 0..10 {
        c.produce(0, i, Acks::All).unwrap();
    }
    c.crash(0, false);
    c.nodes[0].log.epochs.clear();
    c.start(0);
    c.epoch += 1;
    c.version += 1;
    let (epoch, version, now, replicas) = (c.epoch, c.version, c.now, c.replicas());
    c.rm(0)
        .become_leader(epoch, replicas, vec![0, 1, 2], version, now)
        .expect("role change");
    c.pump();
    let request = outstanding_fetch(&mut c, 1, 0);
    assert_eq!(
        (request.last_fetched_epoch, request.fetch_offset),
        (Some(1), 10)
    );
    let answer = answered_at_once(&mut c, 0, 1, request);
    assert_eq!(
        (answer.error, answer.diverging_epoch),
        (Some(ErrorCode::NotLeader), None),
        "the leader knows nothing of epoch 1: neither cut nor accepted"
    );
    // With the cache whole again (the host's rebuild), Kafka's answer for
    // an epoch older than the oldest known: it ends where that one starts.
    // Epoch 1 is the oldest here, so the follower is simply in sync.
    let mut led = Cluster::new(3, config());
    led.elect(0, &[0, 1, 2]);
    led.produce(0, 0, Acks::All).unwrap();
    let mut request = outstanding_fetch(&mut led, 1, 0);
    request.last_fetched_epoch = Some(0); // older than epoch 1, the oldest
    request.fetch_offset = 0;
    let answer = answered_at_once(&mut led, 0, 1, request);
    assert_eq!(answer.error, None);
    assert_eq!(
        answer.diverging_epoch, None,
        "epoch 0 ends at 0, where it fetches"
    );
    // The whole way round: every follower keeps all ten, and with the
    // leader gone again, one of them leads with all ten.
    let (epoch, now) = (c.epoch, c.now);
    c.rm(2).become_follower(0, epoch, now).expect("role change");
    c.pump();
    c.crash(0, false);
    c.elect(1, &[1, 2]);
    for n in [1, 2] {
        let held: Vec<u64> = c.values(n).iter().map(|v| v.0).collect();
        assert_eq!(held, (0..10).collect::<Vec<_>>(), "node {n}");
    }
}

#[test]
fn kip279_back_to_back_leader_changes_converge() {
    let mut c = Cluster::new(2, relaxed());
    c.elect(0, &[0, 1]);
    c.produce(0, 0, Acks::All).unwrap();
    // A writes offset 1 alone; then B leads epoch 2 and writes its own
    // offset 1; then A leads epoch 3 (B down) and writes offset 2.
    c.blocked.extend([(0, 1), (1, 0)]);
    c.produce(0, 1, Acks::Leader).unwrap();
    c.crash(0, false);
    c.elect(1, &[1]);
    c.produce(1, 11, Acks::Leader).unwrap();
    c.crash(1, false);
    c.start(0);
    c.elect(0, &[0]);
    c.produce(0, 2, Acks::Leader).unwrap();
    c.blocked.clear();
    c.start(1);
    let (epoch, now) = (c.epoch, c.now);
    c.rm(1).become_follower(0, epoch, now).expect("role change");
    c.pump();
    assert_eq!(
        c.values(1),
        c.values(0),
        "B dropped its epoch-2 record and converged"
    );
    let offsets: Vec<u64> = c.values(0).iter().map(|v| v.0).collect();
    assert_eq!(offsets, vec![0, 1, 2]);
}

#[test]
fn a_new_leader_never_truncates_its_uncommitted_suffix() {
    // Reference bug: ReconcileAsNewLeader truncated to the HW.
    let mut c = Cluster::new(3, config());
    c.elect(0, &[0, 1, 2]);
    c.blocked.extend([(0, 1), (0, 2)]);
    c.produce(0, 0, Acks::Leader).unwrap();
    c.produce(0, 1, Acks::Leader).unwrap();
    assert_eq!(c.rm(0).high_watermark(), 0);
    let (now, replicas) = (c.now, c.replicas());
    c.rm(0)
        .become_leader(9, replicas, vec![0, 1, 2], 99, now)
        .expect("role change");
    let truncated = c
        .rm(0)
        .drain()
        .iter()
        .any(|a| matches!(a, Action::Truncate { .. }));
    assert!(!truncated);
    assert_eq!(c.rm(0).log_end_offset(), 2);
}

#[test]
fn isr_expansion_waits_for_the_epoch_start_not_just_the_hw() {
    // Scenario 6: a follower at the new leader's lagging HW but short of
    // the epoch start must not join.
    let mut c = Cluster::new(4, relaxed());
    c.elect(0, &[0, 1, 2, 3]);
    for i in 0..9 {
        c.produce(0, i, Acks::All).unwrap();
    }
    // Record 9 misses node 2, so the HW stays at 9 everywhere.
    c.blocked.extend([(0, 2), (2, 0)]);
    c.produce(0, 9, Acks::Leader).unwrap();
    assert_eq!(c.rm(1).log_end_offset(), 10);
    assert_eq!(c.rm(2).log_end_offset(), 9);
    // Node 1 leads a new epoch starting at 10 with ISR {1, 3}; node 3 is
    // unreachable, so node 1's HW cannot move past 9 yet. Node 2's fetches
    // arrive, the answers are held back.
    c.crash(0, false);
    c.blocked.clear();
    c.blocked.extend([(1, 2), (1, 3), (3, 1)]);
    c.elect(1, &[1, 3]);
    c.advance(100);
    assert!(c.rm(1).high_watermark() <= 9);
    assert!(
        !c.isr.contains(&2),
        "node 2 at 9 >= HW but < epoch start 10 must not join"
    );
    c.blocked.remove(&(1, 2));
    c.advance(300);
    assert!(
        c.isr.contains(&2),
        "after catching up to the epoch start it joins: {:?}",
        c.isr
    );
}

#[test]
fn isr_shrinks_by_time_since_caught_up_even_while_the_follower_fetches() {
    // Reference bug: lag measured from the last fetch, so a fetching but
    // never-caught-up follower stayed in the ISR forever.
    let mut c = Cluster::new(3, relaxed());
    c.elect(0, &[0, 1, 2]);
    c.blocked.insert((0, 2)); // node 2's fetches arrive, answers never do
    for i in 0..30 {
        c.produce(0, i, Acks::Leader).unwrap();
        c.advance(100);
    }
    assert!(!c.isr.contains(&2), "isr {:?}", c.isr);
    assert!(c.isr.contains(&1));
}

#[test]
fn many_isr_changes_all_go_through_the_store() {
    // Reference bug: changes went to a 10-slot channel nobody read.
    let mut c = Cluster::new(3, relaxed());
    c.elect(0, &[0, 1, 2]);
    for round in 0..12 {
        c.blocked.extend([(0, 2), (2, 0)]);
        c.produce(0, round, Acks::Leader).unwrap();
        c.advance(1500);
        assert_eq!(c.isr, vec![0, 1], "round {round}");
        c.blocked.clear();
        c.advance(300);
        assert_eq!(c.isr, vec![0, 1, 2], "round {round}");
    }
    assert!(c.isr_updates >= 24);
    assert_eq!(c.rm(0).isr(), c.isr, "the leader's ISR is the store's");
}

#[test]
fn long_poll_waits_for_data_or_max_wait() {
    let mut c = Cluster::new(2, relaxed());
    c.elect(0, &[0, 1]);
    c.produce(0, 0, Acks::All).unwrap();
    // Caught up: the follower's fetch is parked at the leader.
    let before = c.rm(1).counters().fetch_bytes;
    c.produce(0, 1, Acks::All).unwrap();
    assert!(
        c.rm(1).counters().fetch_bytes > before,
        "new data answered the parked fetch at once"
    );
    assert_eq!(c.rm(1).log_end_offset(), 2);
    let fetches = c.rm(0).counters().fetch_requests;
    c.advance(50);
    assert_eq!(
        c.rm(0).counters().fetch_requests,
        fetches,
        "no polling before max wait"
    );
    c.advance(100);
    assert!(
        c.rm(0).counters().fetch_requests > fetches,
        "max wait answered the empty fetch"
    );
}

#[test]
fn follower_hw_never_exceeds_its_own_log_end() {
    // Reference bug: a follower set its HW above its own LEO.
    let mut c = Cluster::new(2, config());
    c.elect(0, &[0, 1]);
    for i in 0..3 {
        c.produce(0, i, Acks::All).unwrap();
    }
    let req = outstanding_fetch(&mut c, 1, 0);
    let resp = FetchResponse {
        correlation_id: req.correlation_id,
        leader_epoch: c.epoch,
        error: None,
        high_watermark: 1000,
        log_start_offset: 0,
        log_end_offset: 1000,
        diverging_epoch: None,
        records: Records::default(),
    };
    let now = c.now;
    c.rm(1).handle_fetch_response(0, resp, now);
    assert_eq!(c.rm(1).log_end_offset(), 3);
    assert_eq!(c.rm(1).high_watermark(), 3, "capped at its own log end");
}

#[test]
fn out_of_range_resets_to_the_leaders_log_start_not_zero() {
    let mut c = Cluster::new(2, relaxed());
    c.elect(0, &[0]);
    c.crash(1, false);
    for i in 0..20 {
        c.produce(0, i, Acks::All).unwrap();
    }
    // The leader's log now starts at 15 (retention).
    c.nodes[0].log.batches.retain(|b| b.0 >= 15);
    c.nodes[0].log.log_start = 15;
    let state = c.nodes[0].log.state();
    let mut rm = ReplicationManager::new(c.config.clone(), 0, &state);
    rm.set_broker_epoch(9);
    c.nodes[0].rm = Some(rm);
    c.elect(0, &[0]);
    c.start(1);
    let (epoch, now) = (c.epoch, c.now);
    c.rm(1).become_follower(0, epoch, now).expect("role change");
    c.pump();
    assert_eq!(c.nodes[1].log.log_start, 15);
    assert_eq!(c.rm(1).log_end_offset(), 20);
}

#[test]
fn retention_deletes_committed_segments_and_a_follower_behind_restarts_at_the_leaders_start() {
    let mut c = Cluster::new(
        3,
        Config {
            fetch_max_bytes: 1024,
            retention_bytes: Some(1024),
            ..relaxed()
        },
    );
    c.elect(0, &[0, 1, 2]);
    c.crash(2, false);
    c.elect(0, &[0, 1]);
    for i in 0..200 {
        c.produce(0, i, Acks::All).unwrap();
    }
    assert!(c.produced.values().all(|r| r.is_ok()));
    assert!(c.deletions > 20, "only {} deletions", c.deletions);
    // Both live replicas keep at least the limit and at most a segment
    // (a sixteenth) more; the execute() above checked every deletion was
    // below the deleting replica's HW.
    for n in [0, 1] {
        let log = c.nodes[n as usize].log.clone();
        let kept: usize = log.batches.iter().map(|b| b.3.len()).sum();
        assert!(log.log_start > 0, "node {n} deleted nothing");
        assert!(
            (1024..=1024 + 64 + 100).contains(&kept),
            "node {n} keeps {kept} B"
        );
        assert_eq!(c.rm(n).log_start_offset(), log.log_start);
    }
    // A fetch below the log start is out of range, with the log start.
    let start = c.rm(0).log_start_offset();
    let req = outstanding_fetch(&mut c, 1, 0);
    let now = c.now;
    c.rm(0).handle_fetch(
        1,
        FetchRequest {
            fetch_offset: start - 1,
            last_fetched_epoch: None,
            ..req
        },
        now,
    );
    let answer = c.rm(0).drain().into_iter().find_map(|a| match a {
        Action::RespondFetch { response, .. } => Some(response),
        _ => None,
    });
    let answer = answer.expect("answered at once");
    assert_eq!(answer.error, Some(ErrorCode::OffsetOutOfRange));
    assert_eq!(answer.log_start_offset, start);
    c.pump();
    // Node 2 comes back with nothing past offset 0: it restarts its log at
    // the leader's start and then holds exactly what the leader holds.
    c.start(2);
    let (epoch, now) = (c.epoch, c.now);
    c.rm(2).become_follower(0, epoch, now).expect("role change");
    c.pump();
    let leader_start = c.nodes[0].log.log_start;
    assert!(c.nodes[2].log.log_start >= leader_start);
    assert_eq!(c.rm(2).log_end_offset(), 200);
    let tail = |c: &Cluster, n: ReplicaId, from: u64| {
        c.values(n)
            .into_iter()
            .filter(|v| v.0 >= from)
            .collect::<Vec<_>>()
    };
    let from = c.nodes[2].log.log_start;
    assert_eq!(tail(&c, 2, from), tail(&c, 0, from));
}

#[test]
fn a_follower_whose_log_lies_past_an_unclean_leaders_end_starts_over_there() {
    let mut c = Cluster::new(
        3,
        Config {
            fetch_max_bytes: 1024,
            retention_bytes: Some(1024),
            ..relaxed()
        },
    );
    c.elect(0, &[0, 1, 2]);
    for i in 0..5 {
        c.produce(0, i, Acks::All).unwrap();
    }
    c.crash(2, false);
    c.elect(0, &[0, 1]);
    for i in 5..200 {
        c.produce(0, i, Acks::All).unwrap();
    }
    // Retention moved node 1's start past everything node 2 holds.
    let behind = c.rm(1).log_start_offset();
    assert!(behind > 5, "node 1 starts at {behind}");
    // Node 0 is lost; an unclean election makes node 2, 5 records long,
    // the leader, and it takes new writes.
    c.crash(0, false);
    c.start(2);
    c.elect(2, &[2]);
    for i in 200..210 {
        c.produce(2, i, Acks::All).unwrap();
    }
    // Node 1 cannot cut its log back below its start: it starts over at
    // the leader's start and then holds all the leader holds.
    let (epoch, now) = (c.epoch, c.now);
    c.rm(1).become_follower(2, epoch, now).expect("role change");
    c.pump();
    assert_eq!(c.rm(1).log_end_offset(), 15);
    assert_eq!(c.nodes[1].log.log_start, 0);
    assert_eq!(c.values(1), c.values(2));
    assert_eq!(c.values(1).len(), 15);
    // And counts in the ISR again.
    c.advance(500);
    assert!(c.rm(2).isr().contains(&1), "ISR {:?}", c.rm(2).isr());
}

#[test]
fn follower_ignores_batches_that_do_not_start_at_its_log_end() {
    // Reference bug: appended batches were not checked to start at the LEO.
    let mut c = Cluster::new(2, config());
    c.elect(0, &[0, 1]);
    let req = outstanding_fetch(&mut c, 1, 0);
    let answer = |records| FetchResponse {
        correlation_id: req.correlation_id,
        leader_epoch: 1,
        error: None,
        high_watermark: 0,
        log_start_offset: 0,
        log_end_offset: 8,
        diverging_epoch: None,
        records: Records::from(records),
    };
    let now = c.now;
    let stray = replicator::batch::encode(7, 1, &record(7)).unwrap();
    c.rm(1).handle_fetch_response(0, answer(stray), now);
    assert!(
        !c.rm(1)
            .drain()
            .iter()
            .any(|a| matches!(a, Action::Append { .. })),
        "a batch at 7 for a log ending at 0"
    );
    // The same check passes a batch that does start at the log end.
    let req = outstanding_fetch(&mut c, 1, 0);
    let good = replicator::batch::encode(0, 1, &record(0)).unwrap();
    let mut resp = answer(good);
    resp.correlation_id = req.correlation_id;
    c.rm(1).handle_fetch_response(0, resp, now);
    assert!(
        c.rm(1)
            .drain()
            .iter()
            .any(|a| matches!(a, Action::Append { .. }))
    );
}

#[test]
fn follower_ignores_batches_whose_epochs_go_back() {
    // A log's epochs never decrease: appending epoch 1 after epoch 2 would
    // leave an epoch cache that no longer describes the log.
    let mut c = Cluster::new(2, config());
    c.elect(0, &[0, 1]);
    c.elect(0, &[0, 1]);
    let appends = |c: &mut Cluster, epochs: [u32; 2]| {
        let req = outstanding_fetch(c, 1, 0);
        let mut records = replicator::batch::encode(0, epochs[0], &record(0))
            .unwrap()
            .to_vec();
        records.extend_from_slice(&replicator::batch::encode(1, epochs[1], &record(1)).unwrap());
        let resp = FetchResponse {
            correlation_id: req.correlation_id,
            leader_epoch: 2,
            error: None,
            high_watermark: 0,
            log_start_offset: 0,
            log_end_offset: 2,
            diverging_epoch: None,
            records: Records::from(Bytes::from(records)),
        };
        let now = c.now;
        c.rm(1).handle_fetch_response(0, resp, now);
        c.rm(1)
            .drain()
            .iter()
            .any(|a| matches!(a, Action::Append { .. }))
    };
    assert!(!appends(&mut c, [2, 1]), "epoch 1 appended after epoch 2");
    assert!(appends(&mut c, [1, 2]), "epochs 1 then 2 refused");
}

/// What an empty follower (log at `at`, `epochs` remembered, epoch 5
/// led first if `led_5`) does with its epoch 6 leader's epoch 4 batch at
/// `at`: whether it appends it, and its epoch cache after.
fn empty_follower_takes(at: u64, epochs: &[(u32, u64)], led_5: bool) -> Vec<(u32, u64)> {
    use replicator::storage::{EpochEntry, LogState, OffsetBounds};
    let state = LogState {
        bounds: OffsetBounds {
            log_start: at,
            log_end: at,
        },
        high_watermark: at,
        leader_epochs: epochs
            .iter()
            .map(|&(epoch, start_offset)| EpochEntry {
                epoch,
                start_offset,
            })
            .collect(),
    };
    let mut rm = ReplicationManager::new(config(), 1, &state);
    if led_5 {
        rm.become_leader(5, vec![1, 2], vec![1, 2], 1, 0)
            .expect("role change");
    }
    rm.become_follower(2, 6, 0).expect("role change");
    let request = sent_fetch(&mut rm);
    assert_eq!(request.last_fetched_epoch, None, "an empty log");
    let records = replicator::batch::encode(at, 4, &record(at)).unwrap();
    let resp = FetchResponse {
        correlation_id: request.correlation_id,
        leader_epoch: 6,
        error: None,
        high_watermark: at,
        log_start_offset: 0,
        log_end_offset: at + 1,
        diverging_epoch: None,
        records: Records::from(records),
    };
    rm.handle_fetch_response(2, resp, 0);
    let actions = rm.drain();
    assert!(
        actions.iter().any(|a| matches!(a, Action::Append { .. })),
        "the epoch 4 batch at {at} was refused (remembered {epochs:?}, led 5: {led_5})"
    );
    let epochs = actions.iter().rev().find_map(|a| match a {
        Action::PersistEpochs(e) => Some(e.clone()),
        _ => None,
    });
    epochs
        .expect("the cache changed")
        .iter()
        .map(|e| (e.epoch, e.start_offset))
        .collect()
}

#[test]
fn an_empty_follower_takes_older_epochs_than_it_remembers() {
    // An empty log sends no last epoch, so no divergence answer cuts away
    // what its cache remembers first: a newer leader's batches of an older
    // epoch must still be taken, and the cache must give way.
    // It led epoch 5 at 100 and wrote nothing.
    assert_eq!(empty_follower_takes(100, &[], true), [(4, 100)]);
    // Retention emptied it at 7; it remembers epochs 3 and 5 of what it
    // deleted (an unclean election put an epoch 4 log in charge).
    assert_eq!(
        empty_follower_takes(7, &[(3, 0), (5, 6)], false),
        [(3, 0), (4, 7)]
    );
}

#[test]
fn a_truncation_before_a_log_start_inside_a_batch_empties_the_log_there() {
    // Retention put the log start at 7, inside the batch at 6..9; cutting
    // to 7 takes the whole batch, so the log ends at 6. The start follows,
    // or reads would find a log whose start is past its end.
    use replicator::storage::{LogState, OffsetBounds};
    let state = LogState {
        bounds: OffsetBounds {
            log_start: 7,
            log_end: 9,
        },
        high_watermark: 7,
        leader_epochs: Vec::new(),
    };
    let mut rm = ReplicationManager::new(config(), 1, &state);
    rm.log_truncated(6, 0);
    assert_eq!(
        (
            rm.log_start_offset(),
            rm.log_end_offset(),
            rm.high_watermark()
        ),
        (6, 6, 6)
    );
}

#[test]
fn a_leader_turned_follower_keeps_its_hw_when_its_last_append_lands() {
    use replicator::storage::{LogState, OffsetBounds};
    let state = LogState {
        bounds: OffsetBounds {
            log_start: 0,
            log_end: 5,
        },
        high_watermark: 5,
        leader_epochs: Vec::new(),
    };
    let mut rm = ReplicationManager::new(relaxed(), 1, &state);
    rm.become_leader(1, vec![1, 2], vec![1], 1, 0)
        .expect("role change");
    rm.produce(1, &record(5), Acks::Leader, 60_000)
        .expect("acks=1 with the leader alone in the ISR");
    assert!(
        rm.drain()
            .iter()
            .any(|a| matches!(a, Action::Append { .. }))
    );
    // Deposed while that append is in flight; it lands before the new
    // leader's first answer.
    rm.become_follower(2, 2, 0).expect("role change");
    rm.log_appended(6, 0);
    assert_eq!(rm.high_watermark(), 5, "the HW fell back");
}

#[test]
fn any_number_of_waiters_complete_when_the_hw_passes() {
    let mut c = Cluster::new(3, config());
    c.elect(0, &[0, 1, 2]);
    c.blocked.extend([(1, 0), (2, 0)]);
    c.produce(0, 0, Acks::Leader).unwrap();
    c.produce(0, 1, Acks::Leader).unwrap();
    let now = c.now;
    for id in 0..5 {
        c.rm(0).wait_for_isr(id, 1, now + 60_000);
    }
    c.rm(0).wait_for_isr(9, 0, now + 60_000);
    c.pump();
    assert!(c.waits.is_empty(), "nothing committed yet");
    c.blocked.clear();
    c.advance(200);
    assert_eq!(c.waits.len(), 6);
    assert!(c.waits.values().all(|r| r.is_ok()));
}

#[test]
fn under_replicated_follows_the_replica_count() {
    let mut two = Cluster::new(2, relaxed());
    two.elect(0, &[0, 1]);
    assert!(!two.rm(0).is_under_replicated());
    let mut five = Cluster::new(5, relaxed());
    five.crash(3, false);
    five.crash(4, false);
    five.elect(0, &[0, 1, 2]);
    assert!(five.rm(0).is_under_replicated());
    assert!(five.rm(0).state().is_under_replicated());
    assert_eq!(five.rm(0).role(), Role::Leader);
}

#[test]
fn acks_all_fails_fast_when_the_isr_drops_below_min_after_the_append() {
    let mut c = Cluster::new(3, config());
    c.elect(0, &[0, 1, 2]);
    c.blocked.extend([(1, 0), (2, 0), (0, 1), (0, 2)]);
    c.produce(0, 0, Acks::All).unwrap();
    assert!(c.produced.is_empty());
    c.advance(1500); // both followers drop out
    assert_eq!(
        c.produced.get(&0),
        Some(&Err(ErrorCode::NotEnoughReplicasAfterAppend))
    );
}

#[test]
fn a_late_answer_to_an_old_isr_change_is_ignored() {
    let mut c = Cluster::new(3, relaxed());
    c.elect(0, &[0, 1, 2]);
    let now = c.now;
    // An answer for a version the leader never proposed against.
    c.rm(0).isr_update_done(12345, Ok(99), now);
    assert_eq!(c.rm(0).isr(), vec![0, 1, 2]);
    // A refusal that is not about the epoch does not fence the leader.
    c.blocked.extend([(0, 2), (2, 0)]);
    c.advance(1500);
    assert_eq!(c.isr, vec![0, 1]);
    assert!(c.rm(0).is_leader());
    assert!(c.produce(0, 1, Acks::All).is_ok());
}

/// A leader elected while its last appends as a follower were still being
/// stored starts its epoch after them. A follower that holds those
/// records too and fetches from there passes the epoch check (KIP-595),
/// and is then told to retry until the leader has stored them. It used to
/// be told its offset was out of range, with the leader's stored log end,
/// and truncated records both replicas hold, to fetch them again.
#[test]
fn a_fetch_past_a_new_leaders_stored_end_waits_for_its_storage() {
    let state = replicator::storage::LogState {
        bounds: Default::default(),
        high_watermark: 0,
        leader_epochs: Vec::new(),
    };
    let mut rm = ReplicationManager::new(relaxed(), 1, &state);
    rm.become_follower(0, 1, 0).expect("role change");
    let fetch = sent_fetch(&mut rm);
    let records = (0..10).flat_map(record).collect::<Vec<_>>();
    let batch = replicator::batch::encode(0, 1, &records).expect("encodes");
    rm.handle_fetch_response(
        0,
        FetchResponse {
            correlation_id: fetch.correlation_id,
            leader_epoch: 1,
            error: None,
            high_watermark: 0,
            log_start_offset: 0,
            log_end_offset: 10,
            diverging_epoch: None,
            records: batch.into(),
        },
        1,
    );
    assert!(
        rm.drain()
            .iter()
            .any(|a| matches!(a, Action::Append { .. })),
        "the follower appends what it fetched"
    );
    // Elected before that append is stored.
    rm.become_leader(2, vec![0, 1, 2], vec![1, 2], 5, 2)
        .expect("role change");
    rm.drain();
    let from_10 = |correlation_id| FetchRequest {
        replica_id: 2,
        replica_epoch: 0,
        correlation_id,
        current_leader_epoch: 2,
        fetch_offset: 10,
        last_fetched_epoch: Some(1),
        max_bytes: 1 << 20,
        min_bytes: 1,
        max_wait_ms: 0,
    };
    let answer = |rm: &mut ReplicationManager| {
        rm.drain()
            .into_iter()
            .find_map(|a| match a {
                Action::RespondFetch { response, .. } => Some(response),
                _ => None,
            })
            .expect("answered at once")
    };
    rm.handle_fetch(2, from_10(7), 3);
    let early = answer(&mut rm);
    assert_eq!(early.error, Some(ErrorCode::StorageBacklog), "{early:?}");
    assert_eq!(early.diverging_epoch, None);
    // Stored: the same fetch is in range, and nothing diverges.
    rm.log_appended(10, 4);
    rm.drain();
    rm.handle_fetch(2, from_10(8), 5);
    let stored = answer(&mut rm);
    assert_eq!(
        (stored.error, stored.diverging_epoch, stored.log_end_offset),
        (None, None, 10)
    );
}

fn lone_leader() -> ReplicationManager {
    let state = replicator::storage::LogState {
        bounds: Default::default(),
        high_watermark: 0,
        leader_epochs: Vec::new(),
    };
    let mut rm = ReplicationManager::new(relaxed(), 0, &state);
    rm.become_leader(1, vec![0, 1], vec![0, 1], 1, 0)
        .expect("role change");
    rm.drain();
    rm
}

fn parked_fetch(correlation_id: u64) -> FetchRequest {
    FetchRequest {
        replica_id: 1,
        replica_epoch: 1,
        correlation_id,
        current_leader_epoch: 1,
        fetch_offset: 0,
        last_fetched_epoch: None,
        max_bytes: 1 << 20,
        min_bytes: 1,
        max_wait_ms: 500,
    }
}

#[test]
fn a_parked_fetch_can_be_released_early() {
    // The node answers a multi-partition fetch as soon as one part has
    // data; the other parts' long polls are released, not waited out.
    let mut rm = lone_leader();
    rm.handle_fetch(1, parked_fetch(7), 10);
    assert!(
        rm.drain()
            .iter()
            .all(|a| !matches!(a, Action::RespondFetch { .. })),
        "an empty log parks the fetch"
    );
    rm.release_fetch(1, 8); // not parked: nothing happens
    assert!(rm.drain().is_empty());
    rm.release_fetch(1, 7);
    let answered: Vec<u64> = rm
        .drain()
        .into_iter()
        .filter_map(|a| match a {
            Action::RespondFetch {
                to: 1, response, ..
            } => Some(response.correlation_id),
            _ => None,
        })
        .collect();
    assert_eq!(answered, vec![7]);
    rm.release_fetch(1, 7); // answered once only
    assert!(rm.drain().is_empty());
}

#[test]
fn resigning_fails_waiters_and_stops_acknowledging() {
    let mut rm = lone_leader();
    rm.produce(1, &record(0), Acks::All, 1000).unwrap();
    rm.handle_fetch(1, parked_fetch(3), 1);
    rm.resign();
    let actions = rm.drain();
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::ProduceDone {
            id: 1,
            result: Err(ErrorCode::NotLeader)
        }
    )));
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::RespondFetch { to: 1, response, .. } if response.error == Some(ErrorCode::NotLeader)
    )));
    assert_eq!(rm.role(), Role::Idle);
    assert_eq!(
        rm.produce(2, &record(1), Acks::All, 1000),
        Err(ErrorCode::NotLeader)
    );
}

#[test]
fn followers_learn_a_new_hw_without_waiting_out_their_long_poll() {
    // The HW moves when the last ISR follower's fetch shows it has the
    // data; the other follower's fetch is parked by then. It is answered
    // at once (the HW moved), so every replica's committed log covers the
    // write without any time passing.
    let mut c = Cluster::new(3, relaxed());
    c.elect(0, &[0, 1, 2]);
    c.produce(0, 0, Acks::All).unwrap();
    assert_eq!(c.rm(0).high_watermark(), 1);
    assert_eq!(c.rm(1).high_watermark(), 1);
    assert_eq!(c.rm(2).high_watermark(), 1);
}
