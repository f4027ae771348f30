//! Heartbeats and failover, the driver half: one heartbeat task per other
//! node (the reference API's `HeartbeatClient`) feeding the shared
//! [`FailureDetector`], and the coordinator task that runs the sans-IO
//! [`FailoverCoordinator`] over every partition's last-read state and
//! carries its decisions out as compare-and-sets on the metadata store.
//! Several nodes may decide the same election at once; the store lets
//! exactly one compare-and-set through and the others re-read.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::core::{DecisionKind, FailoverCoordinator, ReplicaId, TopicPartition};
use crate::metadata::{MetadataError, PartitionState};
use crate::transport::TransportError;
use crate::transport::{Peer, Transport};
use crate::wire::rpc::{Request, Response, RpcError};

use super::partition::{Event, PartitionHandle};
use super::server::NodeServer;
use super::shared::Shared;
use super::unclean_survey::{Answers, Outcome, Surveys, survey};

/// Start the heartbeat senders (one per known node, started as nodes
/// appear) and the coordinator. Both end when `stop` turns true.
pub(super) fn spawn(
    shared: Arc<Shared>,
    transport: Transport,
    server: Arc<NodeServer>,
    stop: watch::Receiver<bool>,
) {
    if shared.failover.unclean_leader_election {
        warn!(
            "UNCLEAN LEADER ELECTION IS ON: when no in-sync replica is alive, a replica outside the ISR may be elected and acknowledged writes it lacks are LOST for good. Turn `[failover] unclean_leader_election` off unless availability matters more than data."
        );
    }
    tokio::spawn(supervise_heartbeats(
        shared.clone(),
        transport.clone(),
        stop.clone(),
    ));
    tokio::spawn(coordinate(shared, Some(server), Some(transport), stop));
}

fn interval(shared: &Shared) -> Duration {
    Duration::from_millis(shared.failover.heartbeat_interval_ms)
}

/// Keep one heartbeat task per other registered node.
async fn supervise_heartbeats(
    shared: Arc<Shared>,
    transport: Transport,
    mut stop: watch::Receiver<bool>,
) {
    let mut running: HashSet<ReplicaId> = HashSet::new();
    loop {
        let ids = shared.broker_ids();
        for id in ids {
            if id != shared.node_id && running.insert(id) {
                tokio::spawn(heartbeat(
                    shared.clone(),
                    transport.clone(),
                    id,
                    stop.clone(),
                ));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval(&shared)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Send a heartbeat to `node` every interval (at once when this node has
/// just changed metadata), one at a time; an answer within the failure
/// timeout is evidence that the node is alive.
async fn heartbeat(
    shared: Arc<Shared>,
    transport: Transport,
    node: ReplicaId,
    mut stop: watch::Receiver<bool>,
) {
    let every = interval(&shared);
    let limit = Duration::from_millis(shared.failover.failure_timeout_ms);
    let mut changed = shared.changed.subscribe();
    let mut suspicions = shared.suspicions.subscribe();
    // With the node's broker epoch when it was dialled.
    let mut peer: Option<(Peer, Option<u64>)> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut announce = false;
    // The stale broker epoch last warned of (see below), once each.
    let mut stale_said = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = changed.changed() => {
                if r.is_err() {
                    return;
                }
                announce = true;
            }
            // Who this node counts as failed changed: the peer's failover
            // waits for a majority to agree, so tell it now.
            r = suspicions.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = stop.changed() => return,
        }
        if let Some((p, at_dial)) = &peer
            && (p.close_reason().is_some() || shared.dialled_before_restart(node, *at_dial))
        {
            p.close();
            peer = None;
        }
        if peer.is_none() {
            // The epoch before the address (see the watcher).
            let at_dial = shared.broker_epoch_of(node);
            let Some(addr) = shared.broker_addr(node) else {
                continue;
            };
            match tokio::time::timeout(limit, transport.connect(addr, node)).await {
                Ok(Ok(p)) => peer = Some((p, at_dial)),
                Ok(Err(e)) => {
                    debug!("heartbeat: cannot reach node {node} at {addr}: {e}");
                    continue;
                }
                Err(_) => {
                    debug!("heartbeat: connecting to node {node} at {addr} timed out");
                    continue;
                }
            }
        }
        let Some((p, _)) = peer.as_ref() else {
            continue;
        };
        // A node from before views refuses the field: it gets none.
        let legacy = shared.detector.lock().is_ok_and(|fd| fd.is_legacy(node));
        let changed_now = std::mem::take(&mut announce);
        let req = Request::Heartbeat {
            broker_epoch: shared.heartbeat_epoch(),
            changed: changed_now,
            suspects: (!legacy).then(|| shared.told_suspects()),
        };
        let sent_at = shared.now_ms();
        match p.request_within(&req, bytes::Bytes::new(), limit).await {
            Ok((
                Response::Heartbeat {
                    node: n,
                    broker_epoch,
                    ..
                },
                _,
            )) if n == node && shared.superseded(node, broker_epoch) => {
                // Not counted: a stale process kept its place in ISRs,
                // and was elected with an older log, after the one that
                // took its id died.
                if stale_said != Some(broker_epoch) {
                    warn!(
                        "heartbeat: node {node} answered from broker epoch {broker_epoch}, older than its registration: another process registered under its id; not counted as alive"
                    );
                    stale_said = Some(broker_epoch);
                }
                p.close();
                peer = None;
            }
            Ok((
                Response::Heartbeat {
                    node: n,
                    broker_epoch,
                    suspects,
                },
                _,
            )) if n == node => shared.heard(node, broker_epoch, suspects, sent_at),
            Err(TransportError::Rejected(RpcError::Invalid(why))) if !legacy => {
                // It does not know the field: a version from before views.
                // Counted as alive (it answered), and asked without it.
                info!(
                    "heartbeat: node {node} runs a version without failure views ({why}); its heartbeats count as agreeing, as before views"
                );
                shared.heard(
                    node,
                    shared.broker_epoch_of(node).unwrap_or(0),
                    None,
                    sent_at,
                );
                if let Ok(mut fd) = shared.detector.lock() {
                    fd.mark_legacy(node);
                }
                announce = changed_now;
            }
            Ok((other, _)) => {
                warn!("heartbeat: node {node} answered {other:?}");
            }
            Err(e) => {
                debug!("heartbeat to node {node} failed: {e}");
                // A fresh connection next time: the old one may be to a
                // dead incarnation that quinn has not given up on yet.
                p.close();
                peer = None;
            }
        }
    }
}

/// Longest pause between failover writes while the metadata store is
/// down: the most a failover waits after the store is back.
const STORE_RETRY_MAX_MS: u64 = 1_000;

/// Every heartbeat interval, decide every partition this node replicates
/// and carry the decisions out.
/// `server` reaches this node's partitions (the leader rebalance asks a
/// partition whether its preferred replica could lead) and `transport` the
/// other nodes (an unclean election asks the candidates for their logs:
/// `unclean_survey.rs`); `None` in tests without partitions.
async fn coordinate(
    shared: Arc<Shared>,
    server: Option<Arc<NodeServer>>,
    transport: Option<Transport>,
    mut stop: watch::Receiver<bool>,
) {
    let mut coordinator = FailoverCoordinator::new(
        shared.node_id,
        shared.failover.unclean_leader_election,
        shared.replication.min_insync_replicas,
    );
    // Versions whose compare-and-set lost: not tried again until the
    // watcher reads a newer version.
    let mut lost: HashMap<TopicPartition, u64> = HashMap::new();
    // Versions already reported as failed failovers (retried every tick,
    // counted and logged once).
    let mut reported: HashMap<TopicPartition, u64> = HashMap::new();
    let mut surveys = Surveys::default();
    // While the store is down (a write failed with it unavailable): the
    // time the next pass may write, and the pause after it. One write a
    // pass, then a pause doubling up to `STORE_RETRY_MAX`: trying every
    // partition a failed node led every heartbeat made thousands of
    // connection attempts a second to a stopped etcd.
    let mut store_down: Option<(u64, u64)> = None;
    let mut had_quorum = true;
    // A node just started has heard nobody yet, and a quorum counts only
    // brokers heard: no warning about it until a failure timeout has
    // passed without one.
    let started = shared.now_ms();
    let rebalance_every = shared.failover.leader_imbalance_check_interval_ms;
    let mut next_rebalance = shared.now_ms().saturating_add(rebalance_every);
    loop {
        // Only the sleep counts towards pause detection: a slow pass
        // (metadata calls) is not this process being stopped.
        if let Ok(mut fd) = shared.detector.lock() {
            fd.resting(shared.now_ms());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval(&shared)) => {}
            // A peer now counts another node as failed (or no longer
            // does): a failure may be confirmed now, not a tick later.
            () = shared.views_changed.notified() => {}
            _ = stop.changed() => return,
        }
        let now = shared.now_ms();
        let brokers = shared.broker_ids();
        coordinator.set_brokers(&brokers);
        let (paused, quorum, suspects) = match shared.detector.lock() {
            Ok(mut fd) => {
                let paused = fd.tick(now);
                (
                    paused,
                    coordinator.has_quorum(&brokers, &fd, now),
                    coordinator.suspects(&fd, now),
                )
            }
            Err(_) => return,
        };
        // Told to the peers: nobody after a pause or without a majority;
        // a change at once (see `heartbeat`).
        let told = if paused || !quorum {
            Vec::new()
        } else {
            suspects
        };
        if let Ok(mut t) = shared.told_suspects.lock()
            && *t != told
        {
            *t = told;
            shared.suspicions.send_modify(|n| *n = n.wrapping_add(1));
        }
        if paused {
            // This process did not run for a while (SIGSTOP, a VM pause):
            // what it believes may be stale. Re-read before acting.
            warn!(
                "node {} was not running for a while; re-reading metadata before any failover decision",
                shared.node_id
            );
            shared.refresh.notify_one();
            surveys.forget();
            continue;
        }
        let settling = now.saturating_sub(started) <= shared.failover.failure_timeout_ms;
        if quorum != had_quorum && (quorum || !settling) {
            if quorum {
                info!("node {} sees a majority of nodes again", shared.node_id);
            } else {
                // Which nodes it misses, so an operator sees at once a
                // node that is gone for good but still registered.
                let (all, unheard) = shared.unheard_nodes(now);
                warn!(
                    "node {} cannot reach a majority of nodes (not heard within the failure timeout: {unheard:?} of the registered {all:?}): it makes no failover decisions until it can",
                    shared.node_id
                );
            }
            had_quorum = quorum;
        }
        if !quorum {
            surveys.forget();
            continue;
        }
        if store_down.is_some_and(|(retry_at, _)| now < retry_at) {
            continue;
        }
        let rebalance = shared.failover.auto_leader_rebalance && now >= next_rebalance;
        if rebalance {
            next_rebalance = now.saturating_add(rebalance_every);
        }
        let states: Vec<_> = shared
            .states
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        // The nodes' logs, if an unclean election asks: once a tick.
        let mut answers = Answers::default();
        for state in states {
            let tp = TopicPartition::new(&state.topic, state.partition);
            if lost.get(&tp) == Some(&state.version) {
                continue;
            }
            // Its claims from before this node's restart are being given
            // up (`handoff`); deciding on them now would be stale.
            if shared.handoff_pending(&tp) {
                continue;
            }
            let decision = match shared.detector.lock() {
                Ok(fd) => coordinator
                    .decide(&state, &fd, now)
                    .or_else(|| {
                        rebalance
                            .then(|| coordinator.prefer(&state, &fd, now))
                            .flatten()
                    })
                    .map(|d| {
                        let since = match &d.kind {
                            DecisionKind::Elect {
                                failed: Some(f), ..
                            } => fd.last_heard(*f),
                            _ => None,
                        };
                        let candidates = if d.is_unclean() {
                            coordinator.unclean_candidates(&state, &fd, now)
                        } else {
                            Vec::new()
                        };
                        (d, since, candidates)
                    }),
                Err(_) => return,
            };
            let Some((d, last_heard, candidates)) = decision else {
                continue;
            };
            // What each candidate's log holds, for the UNCLEAN message.
            let mut surveyed = None;
            // The newest epoch a surveyed log holds: the new one goes above.
            let mut surveyed_epoch = None;
            let mut d = if d.is_unclean() {
                let logs = survey(
                    &tp,
                    &candidates,
                    &mut answers,
                    &shared,
                    server.as_ref(),
                    transport.as_ref(),
                )
                .await;
                surveyed_epoch = logs.iter().filter_map(|(_, epoch, _)| *epoch).max();
                match surveys.choose(&tp, d, &logs, now) {
                    Outcome::Wait => continue,
                    Outcome::Elect { decision, logs } => {
                        surveyed = Some(logs);
                        decision
                    }
                }
            } else {
                d
            };
            // A new epoch above any this node's log (and any surveyed log)
            // holds: see `Shared::epoch_above_log`.
            shared.lift_new_epoch(&tp, state.leader_epoch, &mut d.next, surveyed.is_some());
            if let Some(e) = surveyed_epoch.filter(|e| *e >= d.next.leader_epoch) {
                d.next.leader_epoch = super::shared::past_regression(e);
            }
            if let DecisionKind::Prefer { preferred } = d.kind {
                // The store's ISR can still list a replica that restarted
                // (its hand-off pending) or whose storage is recovering; it
                // would refuse to lead, and the partition would have no
                // leader until it is done. Only one this node's partition
                // saw fetching, caught up, in its registered incarnation.
                let ready = match &server {
                    Some(s) => s.follower_ready(&tp, preferred).await,
                    None => false,
                };
                if !ready {
                    debug!(
                        "{}/{}: preferred replica {preferred} is in the ISR but not fetching caught up; no rebalance",
                        tp.topic, tp.partition
                    );
                    continue;
                }
            }
            let name = format!("{}/{}", tp.topic, tp.partition);
            let first_report = reported.get(&tp) != Some(&state.version);
            if let DecisionKind::NoCandidate { failed } = &d.kind {
                if !first_report {
                    continue;
                }
                reported.insert(tp, state.version);
                if state.isr.is_empty() && state.elr.is_empty() {
                    error!(
                        "{name}: no replica is known to hold every committed write (ISR and ELR are empty: the last in-sync replica restarted without its log intact); the partition stays unavailable until an operator runs `replicator partition elect --unclean` (or turns on [failover] unclean_leader_election), which elects a live replica and loses the writes it lacks"
                    );
                } else {
                    error!(
                        "{name}: leader {failed:?} has failed and no in-sync or eligible replica is alive (ISR {:?}, ELR {:?}); the partition stays unavailable until one returns{}",
                        state.isr,
                        state.elr,
                        if shared.failover.unclean_leader_election {
                            ""
                        } else {
                            " (unclean election is off)"
                        }
                    );
                }
                if let Ok(mut m) = shared.failover_metrics.lock() {
                    m.record_failure();
                }
                continue;
            }
            if *stop.borrow() {
                // The node is shutting down: a pass that was already
                // running writes no decision (see `node::run`).
                return;
            }
            match shared
                .metadata
                .compare_and_set(d.next.clone(), d.expected_version)
                .await
            {
                Ok(version) => {
                    if store_down.take().is_some() {
                        info!("failover decisions are written again");
                    }
                    let done = shared.now_ms();
                    match &d.kind {
                        DecisionKind::Elect {
                            failed,
                            unclean,
                            eligible,
                        } => {
                            // Timed from the failed leader's last heartbeat;
                            // a leader never heard (or no leader) has no
                            // meaningful duration and is counted without one.
                            let took = last_heard.map(|h| done.saturating_sub(h));
                            if let Ok(mut m) = shared.failover_metrics.lock() {
                                m.record_success(took, done);
                            }
                            let took = took.map_or("?".to_string(), |t| t.to_string());
                            let how = if *unclean {
                                "UNCLEAN election (writes it lacks are lost)"
                            } else if *eligible {
                                "no in-sync replica was alive: elected from the ELR, which holds every committed write"
                            } else {
                                "elected from the ISR"
                            };
                            let logs = surveyed
                                .as_ref()
                                .map(|l| format!("; replica log ends were {l}"))
                                .unwrap_or_default();
                            let msg = format!(
                                "{name}: leader {failed:?} failed; node {} leads epoch {} ({how}; ISR {:?}; {took} ms after it was last heard{logs})",
                                d.next.leader.unwrap_or_default(),
                                d.next.leader_epoch,
                                d.next.isr
                            );
                            if *unclean {
                                error!("{msg}");
                            } else {
                                info!("{msg}");
                            }
                        }
                        DecisionKind::ShrinkIsr { removed } => info!(
                            "{name}: failed replicas {removed:?} leave the ISR (now {:?})",
                            d.next.isr
                        ),
                        DecisionKind::Prefer { preferred } => {
                            if let Ok(mut m) = shared.failover_metrics.lock() {
                                m.preferred_elections += 1;
                            }
                            info!(
                                "{name}: preferred replica {preferred} is in sync; it leads epoch {} (leader rebalance)",
                                d.next.leader_epoch
                            );
                        }
                        DecisionKind::NoCandidate { .. } | DecisionKind::StepDown { .. } => {}
                    }
                    shared.wrote_state(
                        tp,
                        crate::metadata::PartitionState {
                            version,
                            ..d.next.clone()
                        },
                    );
                }
                Err(MetadataError::Conflict(_)) => {
                    // Another node decided first (or the leader changed
                    // the ISR): re-read and decide again on fresh state.
                    debug!("{name}: lost the compare-and-set; re-reading");
                    lost.insert(tp, state.version);
                    shared.refresh.notify_one();
                }
                Err(e) => {
                    if matches!(
                        e,
                        MetadataError::Unavailable(_)
                            | MetadataError::Io(_)
                            | MetadataError::Fault(_)
                    ) {
                        // The store, not this record: the other decisions
                        // would fail too. Try one again after a pause.
                        let pause = store_down
                            .map_or(interval(&shared).as_millis() as u64, |(_, p)| p * 2)
                            .min(STORE_RETRY_MAX_MS);
                        if store_down.is_none() {
                            warn!(
                                "failover decisions cannot be written: {e}; trying one again every {STORE_RETRY_MAX_MS} ms at most until the store answers"
                            );
                        }
                        store_down = Some((shared.now_ms().saturating_add(pause), pause));
                        break;
                    }
                    if matches!(d.kind, DecisionKind::Prefer { .. }) {
                        // Not worth a retry every tick: the next check.
                        warn!(
                            "{name}: leader rebalance could not be written: {e} (tried again at the next check, in {rebalance_every} ms)"
                        );
                    } else if first_report {
                        warn!("{name}: failover decision could not be written: {e} (retrying)");
                        if matches!(d.kind, DecisionKind::Elect { .. })
                            && let Ok(mut m) = shared.failover_metrics.lock()
                        {
                            m.record_failure();
                        }
                        reported.insert(tp, state.version);
                    }
                }
            }
        }
        surveys.end_pass();
    }
}

/// Controlled shutdown: before a stopping node closes its partitions, it
/// hands the leadership of each it leads to a live in-sync replica and
/// leaves every ISR it is in ([`FailoverCoordinator::step_down`]), then
/// tells its peers, so that producers and followers move on at once
/// instead of a failure timeout later. Bounded by `limit` as a whole;
/// whatever it could not write is left to the others' failure detection,
/// as before. The caller has stopped this node's failover decisions and
/// fetches.
///
/// First it registers again (`advertised` is its address), which gives it
/// a new broker epoch: a fetch of this incarnation that reaches a leader
/// late (sent before fetching stopped, or retransmitted) then cannot let
/// it back into an ISR it left, since a leader admits a member only under
/// its registered broker epoch (KIP-903), as Kafka's controller refuses
/// brokers in controlled shutdown (KIP-841).
pub(super) async fn step_down(
    shared: &Shared,
    partitions: &HashMap<TopicPartition, PartitionHandle>,
    transport: &Transport,
    advertised: String,
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    let fenced = tokio::time::timeout_at(
        deadline,
        shared.metadata.register_broker(shared.node_id, advertised),
    )
    .await;
    let why = match fenced {
        Ok(Ok(epoch)) => {
            // Answered from now on, so peers that read the new
            // registration do not take this node for a stale process.
            shared
                .answering_epoch
                .store(epoch, std::sync::atomic::Ordering::Relaxed);
            None
        }
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("timed out".to_string()),
    };
    if let Some(why) = why {
        warn!(
            "controlled shutdown: cannot renew this node's registration ({why}); a late fetch of it could let it back into an ISR until failure detection removes it"
        );
    }
    // First out of the ISRs it follows in: it fetches no more, and their
    // leaders' acks=all produces (a node stopping at the same time
    // draining its own) would wait for it.
    let followed =
        tokio::time::timeout_at(deadline, step_down_all(shared, partitions, false)).await;
    // The produces already taken get their answers before the partitions
    // it leads are handed on (within half the time left): handed on
    // mid-way, each would fail ambiguously ("after the append"), and a
    // client without idempotence cannot retry it. New ones are refused
    // before appending, so they retry at the next leader.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if !left.is_zero() {
        let drained = partitions.values().filter_map(|p| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            p.send(Event::Drain { reply: tx }).then_some(rx)
        });
        let drained: Vec<_> = drained.collect();
        if tokio::time::timeout(left / 2, futures_util::future::join_all(drained))
            .await
            .is_err()
        {
            warn!(
                "controlled shutdown: produces still waiting after {:?} are handed on with the partitions (their producers hear an ambiguous error)",
                left / 2
            );
        }
    }
    let led = tokio::time::timeout_at(deadline, step_down_all(shared, partitions, true)).await;
    match (followed, led) {
        (Ok(0), Ok(0)) => return,
        (Ok(_), Ok(_)) => {}
        _ => warn!(
            "controlled shutdown: not done within {limit:?}; the rest is left to failure detection"
        ),
    }
    // Peers re-read the metadata at once on a heartbeat that says so (as
    // after an election), instead of at their next poll. Only those heard
    // recently: dialling one that is down would only wait.
    let now = shared.now_ms();
    // The ids first: no other lock is taken while the detector is held.
    let ids = shared.broker_ids();
    let heard: Vec<ReplicaId> = match shared.detector.lock() {
        Ok(fd) => ids
            .into_iter()
            .filter(|id| *id != shared.node_id && fd.heard_recently(*id, now))
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut told = tokio::task::JoinSet::new();
    for id in heard {
        let Some(addr) = shared.broker_addr(id) else {
            continue;
        };
        let (transport, epoch) = (transport.clone(), shared.heartbeat_epoch());
        told.spawn(async move {
            let peer = transport.connect(addr, id).await.ok()?;
            let req = Request::Heartbeat {
                broker_epoch: epoch,
                changed: true,
                suspects: None,
            };
            let answer = peer.request_within(&req, bytes::Bytes::new(), limit).await;
            answer.ok().map(|_| id)
        });
    }
    let _ = tokio::time::timeout_at(deadline, async {
        while let Some(r) = told.join_next().await {
            if let Ok(None) = r {
                debug!(
                    "controlled shutdown: a peer did not hear of it; it learns at its next poll"
                );
            }
        }
    })
    .await;
}

/// Write every step-down this node's last-read states call for, of the
/// partitions it leads (`leading`) or of the others; how many were
/// written.
async fn step_down_all(
    shared: &Shared,
    partitions: &HashMap<TopicPartition, PartitionHandle>,
    leading: bool,
) -> usize {
    let coordinator = FailoverCoordinator::new(
        shared.node_id,
        shared.failover.unclean_leader_election,
        shared.replication.min_insync_replicas,
    );
    let states: Vec<_> = shared
        .states
        .read()
        .map(|m| {
            m.values()
                .filter(|s| (s.leader == Some(shared.node_id)) == leading)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let mut written = 0;
    for mut state in states {
        let tp = TopicPartition::new(&state.topic, state.partition);
        // Claims from before a restart or a recovery not yet given up:
        // its log may lack what they promise, so it must not join the ELR
        // on its way out. Failure detection deals with it, as before.
        if shared.handoff_pending(&tp) {
            continue;
        }
        let name = format!("{}/{}", tp.topic, tp.partition);
        // A conflict means someone else wrote first (the leader's ISR
        // change, an election): decide again on what they wrote.
        for attempt in 1..=5 {
            let decision = match shared.detector.lock() {
                Ok(fd) => coordinator.step_down(&state, &fd, shared.now_ms()),
                Err(_) => return written,
            };
            let Some(mut d) = decision else { break };
            shared.lift_new_epoch(&tp, state.leader_epoch, &mut d.next, false);
            match shared
                .metadata
                .compare_and_set(d.next.clone(), d.expected_version)
                .await
            {
                Ok(version) => {
                    let next = PartitionState { version, ..d.next };
                    match d.kind {
                        DecisionKind::StepDown { successor: Some(l) } => info!(
                            "{name}: controlled shutdown: node {l} leads epoch {}, and this node leaves the ISR (now {:?})",
                            next.leader_epoch, next.isr
                        ),
                        _ => info!(
                            "{name}: controlled shutdown: this node leaves the ISR (now {:?}, ELR {:?})",
                            next.isr, next.elr
                        ),
                    }
                    // Its own partition stops leading (its producers get
                    // `NotLeader`) without waiting for the watcher, which
                    // has stopped.
                    if let Some(h) = partitions.get(&tp) {
                        h.send(Event::Metadata(next.clone()));
                    }
                    shared.wrote_state(tp.clone(), next);
                    written += 1;
                    break;
                }
                Err(MetadataError::Conflict(_)) if attempt == 5 => warn!(
                    "{name}: controlled shutdown: gave up after 5 conflicting writes; failure detection will do it"
                ),
                Err(MetadataError::Conflict(_)) => {
                    match shared.metadata.get_partition(&tp.topic, tp.partition).await {
                        Ok(fresh) => state = fresh,
                        Err(e) => {
                            warn!("{name}: controlled shutdown: cannot re-read the partition: {e}");
                            break;
                        }
                    }
                }
                Err(e) => {
                    // Not a refusal: the write may still land (a call that
                    // timed out is not withdrawn). Either way the rest is
                    // failure detection's, as without controlled shutdown.
                    warn!(
                        "{name}: controlled shutdown: the write failed or its outcome is unknown ({e}); failure detection will finish the job"
                    );
                    break;
                }
            }
        }
    }
    written
}

#[cfg(test)]
mod tests {
    //! The coordinator against a metadata store that records what it is
    //! asked to write: a node told to stop in the middle of a pass writes
    //! no further decision (its failure detector only goes stale from
    //! there on, as its heartbeats stop).

    use std::sync::Mutex;

    use super::*;
    use crate::metadata::{Broker, MetaFuture, MetadataStore, PartitionState};
    use crate::node::config::FailoverConfig;

    /// Accepts every compare-and-set and records which partition it was
    /// for; with `stop` set, the first one also tells the node to stop,
    /// as a shutdown arriving while that write is in flight would.
    struct RecordingStore {
        writes: Mutex<Vec<u32>>,
        stop: Option<watch::Sender<bool>>,
        /// While set, every compare-and-set fails with the store
        /// unavailable (counted in `attempts`).
        down: std::sync::atomic::AtomicBool,
        attempts: std::sync::atomic::AtomicUsize,
    }

    impl RecordingStore {
        fn new(stop: Option<watch::Sender<bool>>) -> Self {
            RecordingStore {
                writes: Mutex::new(Vec::new()),
                stop,
                down: false.into(),
                attempts: 0.into(),
            }
        }
    }

    impl MetadataStore for RecordingStore {
        fn get_partition<'a>(&'a self, _: &'a str, _: u32) -> MetaFuture<'a, PartitionState> {
            Box::pin(async { Err(MetadataError::Other("not used by the coordinator".into())) })
        }
        fn compare_and_set(&self, state: PartitionState, expected: u64) -> MetaFuture<'_, u64> {
            Box::pin(async move {
                use std::sync::atomic::Ordering::SeqCst;
                self.attempts.fetch_add(1, SeqCst);
                if self.down.load(SeqCst) {
                    return Err(MetadataError::Unavailable("connection refused".into()));
                }
                if let Ok(mut w) = self.writes.lock() {
                    w.push(state.partition);
                }
                if let Some(stop) = &self.stop {
                    let _ = stop.send(true);
                }
                Ok(expected + 1)
            })
        }
        fn list_partitions(&self) -> MetaFuture<'_, Vec<(String, u32)>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn register_broker(&self, _: ReplicaId, _: String) -> MetaFuture<'_, u64> {
            Box::pin(async { Ok(1) })
        }
        fn list_brokers(&self) -> MetaFuture<'_, Vec<Broker>> {
            Box::pin(async { Ok(Vec::new()) })
        }

        /// A fresh store's answer.
        fn claim_cluster_id(&self, id: String) -> MetaFuture<'_, String> {
            Box::pin(async { Ok(id) })
        }
    }

    /// Node 1's view of a cluster where node 3 leads `partitions`
    /// partitions of `t` and never answers heartbeats, while node 2 does
    /// and counts node 3 as failed too (the task returned beats for it).
    fn node_3_leads(
        store: Arc<RecordingStore>,
        partitions: u32,
    ) -> (
        Arc<Shared>,
        tokio::task::JoinHandle<()>,
        tokio::sync::mpsc::UnboundedReceiver<crate::node::fetch::FetchCmd>,
    ) {
        // Slow enough that a loaded machine's late timer is not taken
        // for this process having been paused (half the timeout).
        let failover = FailoverConfig {
            heartbeat_interval_ms: 50,
            failure_timeout_ms: 400,
            unclean_leader_election: false,
            ..FailoverConfig::default()
        };
        let (shared, fetch_rx) = Shared::for_tests(store, failover);
        if let Ok(mut s) = shared.states.write() {
            for partition in 0..partitions {
                let state = PartitionState {
                    topic: "t".into(),
                    partition,
                    leader: Some(3),
                    leader_epoch: 1,
                    isr: vec![1, 2, 3],
                    elr: vec![],
                    replicas: vec![1, 2, 3],
                    min_insync: 2,
                    version: 1,
                };
                s.insert(TopicPartition::new("t", partition), state);
            }
        }
        let beats = {
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    let now = shared.now_ms();
                    if let Ok(mut fd) = shared.detector.lock() {
                        fd.record_heartbeat(2, now);
                        // Node 2 has lost node 3 too: a majority agrees.
                        fd.record_view(2, vec![3], now);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        (shared, beats, fetch_rx)
    }

    /// Node 1 of three sees node 3, the leader of two partitions, fail
    /// while node 2 keeps answering; which partitions' elections it
    /// writes, when the first write stops the node (`stop_midway`) or not.
    async fn elections_written(stop_midway: bool) -> Vec<u32> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let store = Arc::new(RecordingStore::new(stop_midway.then_some(stop_tx.clone())));
        let (shared, beats, _fetch_rx) = node_3_leads(store.clone(), 2);
        let coordinator = tokio::spawn(coordinate(shared.clone(), None, None, stop_rx));
        if !stop_midway {
            // Both elections written, then stop the node.
            let mut changed = shared.changed.subscribe();
            while *changed.borrow_and_update() < 2 {
                let _ = changed.changed().await;
            }
            let _ = stop_tx.send(true);
        }
        let ended = tokio::time::timeout(Duration::from_secs(10), coordinator).await;
        beats.abort();
        assert!(
            matches!(ended, Ok(Ok(()))),
            "the coordinator did not end once the node was stopping"
        );
        let mut writes = store.writes.lock().map(|w| w.clone()).unwrap_or_default();
        writes.sort_unstable();
        writes
    }

    /// A heartbeat without a view (a node stopping sends one) counts its
    /// sender as alive and nothing more: only a refusal of the field marks
    /// a peer as one from before views, which counts as agreeing with
    /// every suspicion. A stopping node used to be marked so.
    #[tokio::test]
    async fn a_heartbeat_without_a_view_does_not_make_its_sender_agree() {
        let store = Arc::new(RecordingStore::new(None));
        let (shared, _fetch_rx) = Shared::for_tests(store, FailoverConfig::default());
        let now = shared.now_ms();
        shared.heard(2, 1, None, now);
        let fd = shared.detector.lock().expect("detector");
        assert!(fd.heard_recently(2, now));
        assert!(!fd.is_legacy(2));
        assert!(!fd.peer_suspects(2, 3, now));
    }

    #[tokio::test]
    async fn a_stopping_node_writes_no_further_failover_decision() {
        // The control: a running node writes both elections.
        assert_eq!(elections_written(false).await, vec![0, 1]);
        // Stopped while writing the first, it leaves the second alone.
        let writes = elections_written(true).await;
        assert_eq!(writes.len(), 1, "elections written: {writes:?}");
    }

    /// With the metadata store down, a node that sees a leader of 50
    /// partitions fail tries one write a pass and then pauses, doubling
    /// up to a second: it used to try all 50 every heartbeat. Once the
    /// store answers, every election is written within that second.
    #[tokio::test]
    async fn with_the_store_down_failover_writes_back_off() {
        use std::sync::atomic::Ordering::SeqCst;
        let (stop_tx, stop_rx) = watch::channel(false);
        let store = Arc::new(RecordingStore::new(None));
        store.down.store(true, SeqCst);
        let (shared, beats, _fetch_rx) = node_3_leads(store.clone(), 50);
        let coordinator = tokio::spawn(coordinate(shared.clone(), None, None, stop_rx));
        // Node 3 is found failed after 400 ms; then 3 s of the store down.
        let mut tried = 0;
        for _ in 0..100 {
            tried = store.attempts.load(SeqCst);
            if tried > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(tried > 0, "no failover was tried");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let tried = store.attempts.load(SeqCst) - tried;
        // 50 ms, 100, 200, 400, 800, then a second: about 7 in 3 s.
        assert!(
            (2..=12).contains(&tried),
            "{tried} writes tried in 3 s with the store down"
        );
        store.down.store(false, SeqCst);
        let mut changed = shared.changed.subscribe();
        let all = tokio::time::timeout(Duration::from_secs(5), async {
            while *changed.borrow_and_update() < 50 {
                let _ = changed.changed().await;
            }
        })
        .await;
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), coordinator).await;
        beats.abort();
        assert!(
            all.is_ok(),
            "not every election was written once the store answered"
        );
        let mut writes = store.writes.lock().map(|w| w.clone()).unwrap_or_default();
        writes.sort_unstable();
        assert_eq!(writes, (0..50).collect::<Vec<u32>>());
    }
}
