//! The automatic unclean election's survey (`[failover]
//! unclean_leader_election = true`; KIP-966's unclean recovery): before a
//! replica from outside the ISR and ELR is elected, every live candidate
//! is asked what its log holds, and the most up to date is elected
//! ([`most_up_to_date`]: the newest last epoch, then the longest log), not
//! the first in assignment order. The first could hold fewer acknowledged
//! writes than another live replica, or a tail of an older epoch that a
//! newer leader replaced; electing it would truncate the others to it.
//!
//! A candidate that has not answered (its process still starting, its log
//! still opening or being recovered) is waited for, up to [`SURVEY_WAIT`]
//! from the first time the election was proposed in an unbroken run of
//! the coordinator's passes; then the election goes ahead with the
//! candidates that answered, or, if none did, with the first live one, as
//! before. Candidates are asked at once, each within [`ask_limit`]: a dead
//! node that the failure detector still counts as alive costs every other
//! partition's failover that long per pass, not a failure timeout per
//! candidate.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use crate::core::{
    Decision, ReplicaId, ReplicaLog, TopicPartition, describe_logs, most_up_to_date,
};
use crate::transport::Transport;
use crate::wire::rpc::{ReplicaStatus, Request, Response};

use super::server::NodeServer;
use super::shared::Shared;

/// How long an unclean election waits for every live candidate's answer.
/// An operator turned unclean election on for availability; this bounds
/// what waiting for the best log costs it.
pub(super) const SURVEY_WAIT: Duration = Duration::from_secs(5);

/// What a survey concluded.
pub(super) enum Outcome {
    /// Write this election; `logs` says what each candidate reported.
    Elect { decision: Decision, logs: String },
    /// A live candidate has not answered yet: decide again next tick.
    Wait,
}

/// Per-partition survey state, kept across the coordinator's passes.
#[derive(Default)]
pub(super) struct Surveys {
    /// When the election of each partition's state version was first
    /// proposed (ms, the node's clock), in the current run of passes.
    since: HashMap<TopicPartition, (u64, u64)>,
    /// Partitions proposed for an unclean election in this pass.
    proposed: HashSet<TopicPartition>,
}

/// Every partition's status as each node reported it in this tick; `None`
/// for a node that did not answer. Asked once per node per tick, however
/// many partitions need an election.
#[derive(Default)]
pub(super) struct Answers(HashMap<ReplicaId, Option<Vec<ReplicaStatus>>>);

impl Answers {
    /// Ask every node of `nodes` not asked yet in this pass, all at once.
    async fn fill(
        &mut self,
        nodes: &[ReplicaId],
        shared: &Shared,
        server: Option<&Arc<NodeServer>>,
        transport: Option<&Transport>,
    ) {
        let asks = nodes
            .iter()
            .copied()
            .filter(|n| !self.0.contains_key(n))
            .map(|node| async move {
                let got = if node == shared.node_id {
                    match server {
                        Some(s) => Some(s.statuses().await),
                        None => None,
                    }
                } else {
                    let limit = ask_limit(shared);
                    // Connecting and asking each get `limit`; this bounds
                    // whatever else could wait (opening a stream).
                    tokio::time::timeout(limit * 2, ask(node, shared, transport, limit))
                        .await
                        .ok()
                        .flatten()
                };
                (node, got)
            });
        for (node, got) in futures_util::future::join_all(asks).await {
            self.0.insert(node, got);
        }
    }
}

/// How long a candidate gets to connect, and then to answer: a few
/// heartbeat intervals (a live node answers within milliseconds), within
/// 200 ms and the failure timeout.
fn ask_limit(shared: &Shared) -> Duration {
    let f = &shared.failover;
    Duration::from_millis(
        f.heartbeat_interval_ms
            .saturating_mul(4)
            .clamp(200, f.failure_timeout_ms.max(200)),
    )
}

/// `node`'s statuses over a connection of their own, each step within
/// `limit`.
async fn ask(
    node: ReplicaId,
    shared: &Shared,
    transport: Option<&Transport>,
    limit: Duration,
) -> Option<Vec<ReplicaStatus>> {
    let transport = transport?;
    let addr = shared.broker_addr(node)?;
    let peer = match tokio::time::timeout(limit, transport.connect(addr, node)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            debug!("unclean election: cannot reach node {node} at {addr}: {e}");
            return None;
        }
        Err(_) => {
            debug!("unclean election: connecting to node {node} at {addr} timed out");
            return None;
        }
    };
    let answer = peer
        .request_within(&Request::Status {}, bytes::Bytes::new(), limit)
        .await;
    peer.close();
    match answer {
        Ok((
            Response::Status {
                node: n,
                partitions,
                ..
            },
            _,
        )) if n == node => Some(partitions),
        Ok((other, _)) => {
            debug!("unclean election: node {node} answered {other:?}");
            None
        }
        Err(e) => {
            debug!("unclean election: node {node} did not answer: {e}");
            None
        }
    }
}

/// What each of `candidates` (in assignment order) holds of `tp`:
/// `(replica, last epoch, log end)`, `None`s for one that did not answer.
pub(super) async fn survey(
    tp: &TopicPartition,
    candidates: &[ReplicaId],
    answers: &mut Answers,
    shared: &Shared,
    server: Option<&Arc<NodeServer>>,
    transport: Option<&Transport>,
) -> Vec<ReplicaLog> {
    answers.fill(candidates, shared, server, transport).await;
    candidates
        .iter()
        .map(|&r| {
            let (epoch, end) = log_of(answers.0.get(&r).and_then(Option::as_ref), tp);
            (r, epoch, end)
        })
        .collect()
}

/// `tp`'s last epoch and log end in a node's statuses; `None`s if it did
/// not answer, does not hold `tp` open, or is recovering its log (it
/// cannot lead yet, and what it reports may be from before the fault).
fn log_of(
    statuses: Option<&Vec<ReplicaStatus>>,
    tp: &TopicPartition,
) -> (Option<u32>, Option<u64>) {
    statuses
        .and_then(|all| {
            all.iter()
                .find(|s| s.topic == tp.topic && s.partition == tp.partition)
        })
        .filter(|s| s.role != crate::wire::rpc::ROLE_RECOVERING)
        .map_or((None, None), |s| (s.last_epoch, Some(s.log_end)))
}

impl Surveys {
    /// A pass over the partitions ends: a partition not proposed for an
    /// unclean election in it (elected, no longer leaderless, skipped)
    /// starts its wait over when it is proposed again.
    pub(super) fn end_pass(&mut self) {
        let proposed = std::mem::take(&mut self.proposed);
        self.since.retain(|tp, _| proposed.contains(tp));
    }

    /// The coordinator skipped a pass (this node was paused, or hears no
    /// majority): what it waited for may be stale, so every wait starts
    /// over. Without this, a wait begun before a long pause would be
    /// counted as over at the first pass after it.
    pub(super) fn forget(&mut self) {
        self.since.clear();
    }

    /// Whom the unclean election `d` of `tp` elects, given what its live
    /// candidates said (`logs`, see [`survey`]) at `now` (when the pass
    /// began, so that a pass that ran long does not end a wait for a
    /// candidate asked at its start), or to wait for those that did not
    /// answer.
    pub(super) fn choose(
        &mut self,
        tp: &TopicPartition,
        d: Decision,
        logs: &[ReplicaLog],
        now: u64,
    ) -> Outcome {
        let version = d.expected_version;
        self.proposed.insert(tp.clone());
        let since = match self.since.get(tp) {
            Some((v, at)) if *v == version => *at,
            _ => {
                self.since.insert(tp.clone(), (version, now));
                now
            }
        };
        let silent: Vec<ReplicaId> = logs
            .iter()
            .filter(|(_, _, leo)| leo.is_none())
            .map(|(r, _, _)| *r)
            .collect();
        let waited = Duration::from_millis(now.saturating_sub(since));
        if !silent.is_empty() && waited < SURVEY_WAIT {
            debug!(
                "{}/{}: unclean election waits for the logs of {silent:?}",
                tp.topic, tp.partition
            );
            return Outcome::Wait;
        }
        self.since.remove(tp);
        self.proposed.remove(tp);
        let said = describe_logs(logs);
        let decision = most_up_to_date(logs)
            .and_then(|best| d.unclean_with_leader(best))
            .unwrap_or(d);
        let logs = if silent.is_empty() {
            said
        } else {
            format!(
                "{said}; {silent:?} did not answer (or were recovering) within {} s",
                SURVEY_WAIT.as_secs()
            )
        };
        Outcome::Elect { decision, logs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::DecisionKind;
    use crate::metadata::PartitionState;

    fn unclean() -> Decision {
        Decision {
            next: PartitionState {
                topic: "t".into(),
                partition: 0,
                leader: Some(2),
                leader_epoch: 3,
                replicas: vec![1, 2, 3],
                isr: vec![2],
                elr: Vec::new(),
                version: 7,
                min_insync: 0,
            },
            expected_version: 7,
            kind: DecisionKind::Elect {
                failed: Some(1),
                unclean: true,
                eligible: false,
            },
        }
    }

    fn status(node: ReplicaId, role: &str, last_epoch: u32, log_end: u64) -> ReplicaStatus {
        ReplicaStatus {
            topic: "t".into(),
            partition: 0,
            node,
            role: role.into(),
            leader: None,
            leader_epoch: None,
            high_watermark: 0,
            log_start: 0,
            log_end,
            last_epoch: Some(last_epoch),
            isr: Vec::new(),
            replicas: vec![1, 2, 3],
            follower_log_ends: Vec::new(),
            storage_fault: None,
        }
    }

    fn choose(s: &mut Surveys, logs: &[ReplicaLog], now: u64) -> Outcome {
        s.choose(&TopicPartition::new("t", 0), unclean(), logs, now)
    }

    /// What a node said of the partition: a recovering log, another
    /// partition and no answer all count as no answer.
    #[test]
    fn a_recovering_or_missing_log_is_no_answer() {
        let tp = TopicPartition::new("t", 0);
        let said = vec![status(3, "follower", 4, 3000)];
        assert_eq!(log_of(Some(&said), &tp), (Some(4), Some(3000)));
        let recovering = vec![status(3, "recovering", 4, 3000)];
        assert_eq!(log_of(Some(&recovering), &tp), (None, None));
        assert_eq!(
            log_of(Some(&said), &TopicPartition::new("t", 1)),
            (None, None)
        );
        assert_eq!(log_of(None, &tp), (None, None));
    }

    /// The most up-to-date live replica is elected, not the first; a
    /// silent or recovering one is waited for, then left out.
    #[test]
    fn the_most_up_to_date_live_replica_is_elected() {
        let mut s = Surveys::default();
        let both = [(2, Some(1), Some(2000)), (3, Some(1), Some(3000))];
        match choose(&mut s, &both, 1000) {
            Outcome::Elect { decision, logs } => {
                assert_eq!(decision.next.leader, Some(3));
                assert_eq!(decision.next.isr, vec![3]);
                assert_eq!(logs, "2:2000 (epoch 1) 3:3000 (epoch 1)");
            }
            Outcome::Wait => panic!("both answered"),
        }

        // 3 has not answered: wait for it, until SURVEY_WAIT has passed.
        let silent = [(2, Some(1), Some(2000)), (3, None, None)];
        assert!(matches!(choose(&mut s, &silent, 1000), Outcome::Wait));
        let later = 1000 + SURVEY_WAIT.as_millis() as u64 - 1;
        assert!(matches!(choose(&mut s, &silent, later), Outcome::Wait));
        match choose(&mut s, &silent, later + 1) {
            Outcome::Elect { decision, logs } => {
                assert_eq!(decision.next.leader, Some(2));
                assert!(
                    logs.contains("3:?") && logs.contains("[3] did not answer"),
                    "{logs}"
                );
            }
            Outcome::Wait => panic!("waited long enough"),
        }

        // Nobody answers: after the wait, the core's choice stands.
        let none = [(2, None, None), (3, None, None)];
        assert!(matches!(choose(&mut s, &none, 0), Outcome::Wait));
        s.end_pass();
        match choose(&mut s, &none, SURVEY_WAIT.as_millis() as u64) {
            Outcome::Elect { decision, .. } => assert_eq!(decision, unclean()),
            Outcome::Wait => panic!("waited long enough"),
        }
    }

    /// A wait is counted over an unbroken run of passes that proposed the
    /// election: a pass that did not (the leader came back), or a skipped
    /// pass (no majority, a pause), starts it over, so a long gap does not
    /// count as time waited.
    #[test]
    fn a_wait_starts_over_after_a_pass_without_the_proposal() {
        let silent = [(2, Some(1), Some(2000)), (3, None, None)];
        let wait = SURVEY_WAIT.as_millis() as u64;
        let mut s = Surveys::default();
        assert!(matches!(choose(&mut s, &silent, 0), Outcome::Wait));
        s.end_pass();
        // A pass without the proposal: its wait is forgotten.
        s.end_pass();
        assert!(matches!(choose(&mut s, &silent, 10 * wait), Outcome::Wait));
        s.end_pass();
        // A skipped pass: likewise.
        s.forget();
        assert!(matches!(choose(&mut s, &silent, 20 * wait), Outcome::Wait));
        s.end_pass();
        assert!(matches!(
            choose(&mut s, &silent, 21 * wait),
            Outcome::Elect { .. }
        ));
    }
}
