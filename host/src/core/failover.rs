//! Failover decisions, sans-IO: the [`FailureDetector`] (which brokers
//! answered heartbeats recently) and the [`FailoverCoordinator`] (given a
//! partition's stored state and the detector's view, what compare-and-set
//! should be tried). The node runtime sends the heartbeats, feeds their
//! answers in with a clock value, and carries out the decisions; the
//! metadata store's compare-and-set makes exactly one of several
//! concurrent deciders win.
//!
//! One broker's silence may be a cut between it and this broker alone, or
//! this broker's own isolation setting in (its peers fall silent one after
//! another, a few milliseconds apart). So a leader is replaced only when
//! a majority of the brokers count it as failed: this one by its own
//! detector, each other by the view it sent with its last heartbeat
//! ([`FailureDetector::record_view`]). A node cut off from everyone, or
//! from the leader alone, then deposes nobody.
//!
//! Kafka's shape (KIP-631/841): a broker that misses its session timeout
//! is fenced; partitions it led elect the first live in-sync replica in
//! assignment order under the next leader epoch; it leaves every ISR. A
//! replica outside the ISR is elected only with unclean election on
//! (KIP-106: off by default, since it can lose acknowledged writes).

use std::collections::{BTreeSet, HashMap};

use crate::core::ReplicaId;
use crate::metadata::PartitionState;

/// Which brokers answered recently. Times are the caller's monotonic clock
/// in milliseconds.
#[derive(Debug, Clone)]
pub struct FailureDetector {
    timeout_ms: u64,
    /// When this detector began: a broker never heard from counts as
    /// failed once `timeout_ms` has passed since then.
    started_ms: u64,
    last_heard: HashMap<ReplicaId, u64>,
    last_tick_ms: u64,
    /// What each peer said it counts as failed, with the heartbeat it
    /// last sent or answered, and when that was.
    views: HashMap<ReplicaId, (u64, Vec<ReplicaId>)>,
    /// Peers running a version that sends no views: they count as
    /// agreeing (the rule before views), until one sends a view.
    legacy: BTreeSet<ReplicaId>,
}

impl FailureDetector {
    pub fn new(timeout_ms: u64, now: u64) -> Self {
        FailureDetector {
            timeout_ms: timeout_ms.max(1),
            started_ms: now,
            last_heard: HashMap::new(),
            last_tick_ms: now,
            views: HashMap::new(),
            legacy: BTreeSet::new(),
        }
    }

    /// `broker` runs a version whose heartbeats carry no view (see
    /// `legacy`); a view from it later undoes this.
    pub fn mark_legacy(&mut self, broker: ReplicaId) {
        self.legacy.insert(broker);
    }

    /// Whether `broker` was last seen running a version without views.
    pub fn is_legacy(&self, broker: ReplicaId) -> bool {
        self.legacy.contains(&broker)
    }

    /// `broker`'s heartbeat at `now` said it counts `suspects` as failed.
    /// Returns whether that differs from what it said before.
    ///
    /// `now` is when the view was current: for an answer to this broker's
    /// heartbeat, when the heartbeat was sent, so that an answer that
    /// arrives late never replaces a view sent after it.
    pub fn record_view(
        &mut self,
        broker: ReplicaId,
        mut suspects: Vec<ReplicaId>,
        now: u64,
    ) -> bool {
        self.legacy.remove(&broker);
        suspects.sort_unstable();
        suspects.dedup();
        match self.views.get_mut(&broker) {
            Some((at, old)) if *at <= now => {
                *at = now;
                let changed = *old != suspects;
                *old = suspects;
                changed
            }
            // A late answer never replaces a newer view.
            Some(_) => false,
            None => {
                let changed = !suspects.is_empty();
                self.views.insert(broker, (now, suspects));
                changed
            }
        }
    }

    /// Whether `peer`, heard within the timeout, said with that heartbeat
    /// that it counts `broker` as failed (a peer without views counts as
    /// saying so, as every node decided alone before views).
    pub fn peer_suspects(&self, peer: ReplicaId, broker: ReplicaId, now: u64) -> bool {
        self.heard_recently(peer, now)
            && (self.legacy.contains(&peer)
                || self.views.get(&peer).is_some_and(|(at, suspects)| {
                    now.saturating_sub(*at) <= self.timeout_ms
                        && suspects.binary_search(&broker).is_ok()
                }))
    }

    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    /// `broker` answered (or sent) a heartbeat at `now`.
    pub fn record_heartbeat(&mut self, broker: ReplicaId, now: u64) {
        let t = self.last_heard.entry(broker).or_insert(now);
        *t = (*t).max(now);
    }

    /// Whether `broker` has been silent for longer than the timeout (or
    /// was never heard and the detector is older than the timeout).
    pub fn has_failed(&self, broker: ReplicaId, now: u64) -> bool {
        let since = self
            .last_heard
            .get(&broker)
            .copied()
            .unwrap_or(self.started_ms);
        now.saturating_sub(since) > self.timeout_ms
    }

    /// Whether `broker` was heard from within the timeout: stricter than
    /// `!has_failed`, which gives a broker never heard the benefit of the
    /// doubt until the detector is a timeout old.
    pub fn heard_recently(&self, broker: ReplicaId, now: u64) -> bool {
        self.last_heard
            .get(&broker)
            .is_some_and(|t| now.saturating_sub(*t) <= self.timeout_ms)
    }

    /// When `broker` was last heard from, if ever.
    pub fn last_heard(&self, broker: ReplicaId) -> Option<u64> {
        self.last_heard.get(&broker).copied()
    }

    /// Note that this process is about to wait until its next [`tick`]
    /// (only the wait is measured, not the work done between ticks).
    ///
    /// [`tick`]: FailureDetector::tick
    pub fn resting(&mut self, now: u64) {
        self.last_tick_ms = now;
    }

    /// Call regularly (every heartbeat interval). If this process itself
    /// was not running for longer than half the timeout (SIGSTOP, a VM
    /// pause, a starved runtime), the silence it measured is its own, not
    /// the brokers': it starts over as if just started, so a resumed node
    /// does not depose a healthy leader on stale evidence. Returns whether
    /// that happened.
    pub fn tick(&mut self, now: u64) -> bool {
        let gap = now.saturating_sub(self.last_tick_ms);
        self.last_tick_ms = now;
        if gap > self.timeout_ms / 2 {
            // Everyone gets the benefit of the doubt again (not failed for
            // a timeout from now), but nobody counts as heard until heard:
            // stamping them all as heard now made a broker that died
            // during the pause count for a quorum and be electable.
            self.started_ms = now;
            self.last_heard.clear();
            return true;
        }
        false
    }
}

/// What the coordinator decided for one partition: the state to write
/// with compare-and-set against `expected_version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub next: PartitionState,
    pub expected_version: u64,
    pub kind: DecisionKind,
}

impl Decision {
    /// Whether this is an unclean election: the driver then surveys the
    /// candidates' logs ([`FailoverCoordinator::unclean_candidates`]) and
    /// picks the most up-to-date ([`most_up_to_date`]) before writing it.
    pub fn is_unclean(&self) -> bool {
        matches!(self.kind, DecisionKind::Elect { unclean: true, .. })
    }

    /// The same unclean election with `leader` elected instead, if this is
    /// one and `leader` is a replica; `None` otherwise (nothing changes).
    pub fn unclean_with_leader(&self, leader: ReplicaId) -> Option<Decision> {
        if !self.is_unclean() || !self.next.replicas.contains(&leader) {
            return None;
        }
        Some(Decision {
            next: PartitionState {
                leader: Some(leader),
                isr: vec![leader],
                ..self.next.clone()
            },
            ..self.clone()
        })
    }
}

/// What a replica said of its log: `(replica, last epoch, log end)`,
/// `None` for what it did not say (it did not answer, or its log is empty
/// and has no epoch).
pub type ReplicaLog = (ReplicaId, Option<u32>, Option<u64>);

/// The replica whose log is most up to date, of those that answered
/// (`logs` in assignment order): the newest last epoch, then the longest log,
/// then the first in assignment order (KIP-966's unclean recovery; Raft's
/// log comparison). A longer log that ends in an older epoch holds a
/// tail no newer leader kept: electing it would truncate the newer
/// epoch's writes everywhere.
///
/// A replica that reports a non-empty log but no epoch runs a version
/// that does not report epochs: then epochs cannot be compared, and the
/// longest log wins.
pub fn most_up_to_date(logs: &[ReplicaLog]) -> Option<ReplicaId> {
    let epochs_known = logs
        .iter()
        .all(|(_, epoch, leo)| epoch.is_some() || leo.is_none_or(|l| l == 0));
    // `max_by_key` keeps the last of equals: reversed, the first in
    // assignment order wins a tie.
    logs.iter()
        .rev()
        .filter_map(|(r, epoch, leo)| {
            let epoch = if epochs_known { *epoch } else { None };
            Some((*r, (epoch, (*leo)?)))
        })
        .max_by_key(|(_, key)| *key)
        .map(|(r, _)| r)
}

/// `2:2000 (epoch 1) 3:3000 (epoch 1) 4:?`: what each replica said of its
/// log, as [`most_up_to_date`] takes them, for operators.
pub fn describe_logs(logs: &[ReplicaLog]) -> String {
    let parts: Vec<String> = logs
        .iter()
        .map(|(r, epoch, leo)| match (epoch, leo) {
            (Some(e), Some(l)) => format!("{r}:{l} (epoch {e})"),
            (None, Some(l)) => format!("{r}:{l}"),
            _ => format!("{r}:?"),
        })
        .collect();
    parts.join(" ")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionKind {
    /// The leader failed (or there was none): `next.leader` leads the next
    /// epoch. `eligible` if it came from the ELR (no ISR member was
    /// alive), `unclean` if from neither.
    Elect {
        failed: Option<ReplicaId>,
        unclean: bool,
        eligible: bool,
    },
    /// The leader is alive; failed members leave the ISR so they stop
    /// holding back the high watermark (Kafka's controller does this for a
    /// fenced broker). The leader adopts it through its metadata.
    ShrinkIsr { removed: Vec<ReplicaId> },
    /// The leader failed and no replica may be elected (no live in-sync
    /// or eligible replica, unclean election off). Nothing is written; the partition
    /// stays unavailable until an in-sync replica returns.
    NoCandidate { failed: Option<ReplicaId> },
    /// This broker is stopping cleanly ([`FailoverCoordinator::step_down`]):
    /// it leaves the ISR, and if it led, `successor` leads the next epoch.
    StepDown { successor: Option<ReplicaId> },
    /// This broker leads, and the preferred replica (the first in
    /// assignment order) is back in the ISR: it leads the next epoch
    /// ([`FailoverCoordinator::prefer`]), and this broker follows.
    Prefer { preferred: ReplicaId },
}

/// Failover policy for the partitions of one broker. Any broker may decide
/// for any partition it replicates; the store's compare-and-set lets one
/// of concurrent deciders through (they propose the same state, but for an
/// unclean election, whose driver elects by the candidates' logs).
#[derive(Debug, Clone)]
pub struct FailoverCoordinator {
    me: ReplicaId,
    /// The registered brokers, as last told ([`Self::set_brokers`]): who
    /// votes on a leader's failure, with each partition's replicas.
    brokers: BTreeSet<ReplicaId>,
    unclean_election: bool,
    /// min.insync.replicas of partitions that have none of their own: it
    /// decides who joins the ELR.
    default_min_insync: u32,
}

impl FailoverCoordinator {
    pub fn new(me: ReplicaId, unclean_election: bool, default_min_insync: u32) -> Self {
        FailoverCoordinator {
            me,
            brokers: BTreeSet::new(),
            unclean_election,
            default_min_insync,
        }
    }

    /// The registered brokers now.
    pub fn set_brokers(&mut self, brokers: &[ReplicaId]) {
        self.brokers = brokers.iter().copied().collect();
    }

    /// The brokers (of those registered) this broker counts as failed: what
    /// its heartbeats tell its peers.
    pub fn suspects(&self, fd: &FailureDetector, now: u64) -> Vec<ReplicaId> {
        self.brokers
            .iter()
            .copied()
            .filter(|b| *b != self.me && fd.has_failed(*b, now))
            .collect()
    }

    /// Whether `broker`'s failure is confirmed: a strict majority of the
    /// brokers (the registered ones, `replicas`, this one) count it as
    /// failed, this broker by its detector and each other by the view it
    /// sent with its last heartbeat. One broker's silence alone may be a
    /// cut between the two of them, or this broker's own isolation
    /// beginning: a node losing the network lost its peers a few
    /// milliseconds apart, still counted a majority with the later one,
    /// and replaced leaders that everyone else could hear.
    pub fn failure_confirmed(
        &self,
        broker: ReplicaId,
        replicas: &[ReplicaId],
        fd: &FailureDetector,
        now: u64,
    ) -> bool {
        if broker == self.me || !fd.has_failed(broker, now) {
            return false;
        }
        let all: BTreeSet<ReplicaId> = self
            .brokers
            .iter()
            .chain(replicas)
            .copied()
            .chain([self.me, broker])
            .collect();
        let others = all
            .iter()
            .filter(|p| **p != self.me && **p != broker && fd.peer_suspects(**p, broker, now))
            .count();
        (1 + others) * 2 > all.len()
    }

    /// Whether this broker sees enough of the cluster to act: itself plus
    /// brokers heard within the timeout form a strict majority of
    /// `brokers`. A broker cut off from its peers sees them all as failed;
    /// without this rule it would elect itself (or shrink ISRs to itself)
    /// and the partition would flap between sides of the cut. Heard, not
    /// merely not failed yet: a node just started, hearing nobody, counted
    /// every peer as live for its first timeout, and elected a dead ELR
    /// member within 100 ms (exploratory run).
    pub fn has_quorum(&self, brokers: &[ReplicaId], fd: &FailureDetector, now: u64) -> bool {
        let all: BTreeSet<ReplicaId> = brokers.iter().copied().chain([self.me]).collect();
        let live = all.iter().filter(|b| self.heard(**b, fd, now)).count();
        live * 2 > all.len()
    }

    /// Not (yet) counted as failed: a broker never heard has the benefit
    /// of the doubt for a timeout, so it is neither deposed nor dropped
    /// from an ISR before it could be heard.
    fn alive(&self, b: ReplicaId, fd: &FailureDetector, now: u64) -> bool {
        b == self.me || !fd.has_failed(b, now)
    }

    /// Heard within the timeout: what electing a broker takes. The benefit
    /// of the doubt keeps a leader; it does not make one.
    fn heard(&self, b: ReplicaId, fd: &FailureDetector, now: u64) -> bool {
        b == self.me || fd.heard_recently(b, now)
    }

    /// Who an unclean election of `state` (see [`Self::decide`]) could
    /// elect: its live replicas other than the failed leader, in
    /// assignment order. [`Self::decide`] proposes the first; the driver
    /// asks them all for their logs and elects the most up to date.
    pub fn unclean_candidates(
        &self,
        state: &PartitionState,
        fd: &FailureDetector,
        now: u64,
    ) -> Vec<ReplicaId> {
        state
            .replicas
            .iter()
            .copied()
            .filter(|r| Some(*r) != state.leader && self.heard(*r, fd, now))
            .collect()
    }

    /// The change `state` needs, if any. `None`: leader alive and every
    /// ISR member alive, or nothing this broker should touch.
    ///
    /// Members that leave the ISR here (dead ones, a failed leader) held
    /// every committed record, so they join the ELR when the ISR is left
    /// below min.insync ([`PartitionState::with_isr`]). A failed leader's
    /// successor is the first live ISR member, else the first live ELR
    /// member (KIP-966: it holds everything committed, since the HW stopped
    /// when the ISR fell below min.insync), else, with unclean election on,
    /// any live replica.
    pub fn decide(
        &self,
        state: &PartitionState,
        fd: &FailureDetector,
        now: u64,
    ) -> Option<Decision> {
        if state.version == 0 || !state.replicas.contains(&self.me) {
            return None;
        }
        // Replaced only once a majority counts it as failed (see
        // `failure_confirmed`); until then only its own broker trims.
        let leader_ok = state.leader.is_some_and(|l| {
            self.alive(l, fd, now) || !self.failure_confirmed(l, &state.replicas, fd, now)
        });
        let live_isr: Vec<ReplicaId> = state
            .isr
            .iter()
            .copied()
            .filter(|r| self.alive(*r, fd, now))
            .collect();
        if leader_ok {
            let removed: Vec<ReplicaId> = state
                .isr
                .iter()
                .copied()
                .filter(|r| !live_isr.contains(r))
                .collect();
            // Only the leader's own broker trims its ISR: it is the one the
            // dead member holds back, and one writer keeps it quiet.
            if removed.is_empty() || state.leader != Some(self.me) {
                return None;
            }
            return Some(Decision {
                next: state.with_isr(live_isr, self.default_min_insync, true),
                expected_version: state.version,
                kind: DecisionKind::ShrinkIsr { removed },
            });
        }
        let failed = state.leader;
        // The first live member of `set` in assignment order (Kafka's
        // preferred order), so every decider proposes the same state (an
        // unclean election's driver may elect another candidate after
        // asking their logs; the compare-and-set still lets one through).
        let first_live = |set: &[ReplicaId]| {
            state
                .replicas
                .iter()
                .copied()
                .find(|r| set.contains(r) && Some(*r) != failed && self.heard(*r, fd, now))
        };
        // Members not failed yet but not heard either (a node just started
        // or just resumed): wait for them rather than pass over them to a
        // lower tier, where an unclean election could lose what only they
        // hold.
        let unheard = |set: &[ReplicaId]| {
            set.iter()
                .any(|r| Some(*r) != failed && self.alive(*r, fd, now) && !self.heard(*r, fd, now))
        };
        let min = self.default_min_insync;
        let (leader, next, from) = if let Some(l) = first_live(&live_isr) {
            let isr = live_isr.iter().copied().filter(|r| Some(*r) != failed);
            (
                l,
                state.with_isr(isr.collect(), min, true),
                Candidate::InSync,
            )
        } else if unheard(&live_isr) {
            return None;
        } else if let Some(l) = first_live(&state.elr) {
            // The ISR's remaining members (a dead leader among them) held
            // every committed record too: they stay eligible.
            (l, state.with_isr(vec![l], min, true), Candidate::Eligible)
        } else if unheard(&state.elr) {
            return None;
        } else if let Some(l) = first_live(&state.replicas).filter(|_| self.unclean_election) {
            // Nothing is known about what anyone holds any more.
            let next = PartitionState {
                isr: vec![l],
                elr: Vec::new(),
                ..state.clone()
            };
            (l, next, Candidate::Unclean)
        } else {
            return Some(Decision {
                next: state.clone(),
                expected_version: state.version,
                kind: DecisionKind::NoCandidate { failed },
            });
        };
        Some(Decision {
            next: PartitionState {
                leader: Some(leader),
                leader_epoch: state.leader_epoch + 1,
                ..next
            },
            expected_version: state.version,
            kind: DecisionKind::Elect {
                failed,
                unclean: from == Candidate::Unclean,
                eligible: from == Candidate::Eligible,
            },
        })
    }

    /// Controlled shutdown (Kafka's `controlled.shutdown.enable`, on by
    /// default there too): what this broker, about to stop cleanly, writes
    /// for `state`, so that nobody waits a failure timeout to find it gone.
    ///
    /// - Leading: the first ISR member in assignment order that was heard
    ///   within the timeout leads the next epoch, and this broker leaves the
    ///   ISR. Without one it keeps leading (`None`): the partition would
    ///   have no leader either way, and a clean stop lets it lead again at
    ///   restart.
    /// - A follower in the ISR leaves it, so the leader's high watermark
    ///   does not wait `replica_lag_time_max_ms` for a stopped replica. Not
    ///   the ISR's only member: that would leave nobody in it.
    ///
    /// Having been in sync, it holds every committed record, so it joins
    /// the ELR when the ISR falls below min.insync
    /// ([`PartitionState::with_isr`]), as any member leaving cleanly would
    /// (if its log then fails to flush, the node's clean-shutdown record
    /// leaves it out, and at restart it leaves the ELR again). The caller
    /// must first stop this broker's fetching and fence its late fetches
    /// (a new broker epoch): a follower still fetching could be let back
    /// into the ISR.
    pub fn step_down(
        &self,
        state: &PartitionState,
        fd: &FailureDetector,
        now: u64,
    ) -> Option<Decision> {
        let me = self.me;
        if state.version == 0 || !state.isr.contains(&me) {
            return None;
        }
        let others: Vec<ReplicaId> = state.isr.iter().copied().filter(|r| *r != me).collect();
        let min = self.default_min_insync;
        if state.leader != Some(me) {
            if others.is_empty() {
                return None;
            }
            return Some(Decision {
                next: state.with_isr(others, min, true),
                expected_version: state.version,
                kind: DecisionKind::StepDown { successor: None },
            });
        }
        let successor = state
            .replicas
            .iter()
            .copied()
            .find(|r| others.contains(r) && fd.heard_recently(*r, now))?;
        Some(Decision {
            next: PartitionState {
                leader: Some(successor),
                leader_epoch: state.leader_epoch + 1,
                ..state.with_isr(others, min, true)
            },
            expected_version: state.version,
            kind: DecisionKind::StepDown {
                successor: Some(successor),
            },
        })
    }

    /// Preferred leader election (Kafka's `auto.leader.rebalance.enable`):
    /// a partition this broker leads although it is not its preferred
    /// replica (the first in assignment order) goes back to that replica
    /// once it is in the ISR and heard within the failure timeout. Without
    /// it, leadership piles up on the nodes that restarted first: after a
    /// rolling restart one node can lead every partition and do all of the
    /// leaders' work.
    ///
    /// Only the leader's broker decides, as for [`DecisionKind::ShrinkIsr`]:
    /// it knows the ISR it admitted, and one writer keeps it quiet. The
    /// ISR is unchanged; the new leader holds every committed record
    /// because it is in it. Records this broker appended that the new
    /// leader lacks were never committed (the HW waits for every ISR
    /// member), so their producers get an ambiguous answer, as at any
    /// change of leader.
    pub fn prefer(
        &self,
        state: &PartitionState,
        fd: &FailureDetector,
        now: u64,
    ) -> Option<Decision> {
        let preferred = *state.replicas.first()?;
        if state.version == 0
            || state.leader != Some(self.me)
            || preferred == self.me
            || !state.isr.contains(&preferred)
            || !fd.heard_recently(preferred, now)
        {
            return None;
        }
        Some(Decision {
            next: PartitionState {
                leader: Some(preferred),
                leader_epoch: state.leader_epoch + 1,
                ..state.clone()
            },
            expected_version: state.version,
            kind: DecisionKind::Prefer { preferred },
        })
    }
}

/// Where an elected leader came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Candidate {
    InSync,
    Eligible,
    Unclean,
}

/// The reference API's `FailoverMetrics`: elections this broker won, the
/// ones it could not carry out, and how long they took (from the failed
/// leader's last heartbeat to the accepted compare-and-set).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FailoverMetrics {
    pub total_failovers: u64,
    pub successful_failovers: u64,
    pub failed_failovers: u64,
    /// Mean duration of the successful ones that had one (the failed
    /// leader had been heard from), in milliseconds.
    pub average_failover_ms: f64,
    /// How many successful ones the average covers.
    pub timed_failovers: u64,
    /// Duration of the last successful one, in milliseconds.
    pub last_failover_ms: Option<u64>,
    /// Clock value (ms) when the last successful one was accepted.
    pub last_failover_at_ms: Option<u64>,
    /// Partitions this broker handed back to their preferred replica
    /// ([`FailoverCoordinator::prefer`]); not failovers.
    pub preferred_elections: u64,
}

impl FailoverMetrics {
    pub fn record_success(&mut self, took_ms: Option<u64>, at_ms: u64) {
        self.total_failovers += 1;
        self.successful_failovers += 1;
        if let Some(took) = took_ms {
            self.timed_failovers += 1;
            let n = self.timed_failovers as f64;
            self.average_failover_ms += (took as f64 - self.average_failover_ms) / n;
            self.last_failover_ms = Some(took);
        }
        self.last_failover_at_ms = Some(at_ms);
    }

    pub fn record_failure(&mut self) {
        self.total_failovers += 1;
        self.failed_failovers += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(leader: Option<u32>, isr: &[u32]) -> PartitionState {
        PartitionState::sample(leader, isr, &[])
    }

    /// A detector that heard `alive` at `now`, each of them counting the
    /// others of 1 to 9 as failed (they agree on who is gone).
    fn detector(now: u64, alive: &[u32]) -> FailureDetector {
        let mut fd = FailureDetector::new(500, 0);
        for b in alive {
            fd.record_heartbeat(*b, now);
            let gone = (1..=9).filter(|x| x != b && !alive.contains(x)).collect();
            fd.record_view(*b, gone, now);
        }
        fd
    }

    /// Node 1 cannot hear the leader, 2, but 3 can: the link between 1 and
    /// 2 is cut, or 1 is losing the network and 3 is next. Nobody is
    /// elected until 3's heartbeat says 2 is gone too, and a view older
    /// than the timeout does not count.
    #[test]
    fn a_leader_one_broker_cannot_hear_is_replaced_only_once_a_majority_agrees() {
        let mut c = FailoverCoordinator::new(1, false, 2);
        c.set_brokers(&[1, 2, 3]);
        let s = state(Some(2), &[2, 1, 3]);
        let mut fd = FailureDetector::new(500, 0);
        fd.record_heartbeat(2, 0);
        fd.record_heartbeat(3, 900);
        fd.record_view(3, vec![], 900);
        assert!(c.has_quorum(&[1, 2, 3], &fd, 1000));
        assert!(fd.has_failed(2, 1000));
        assert_eq!(c.suspects(&fd, 1000), vec![2]);
        assert!(!c.failure_confirmed(2, &s.replicas, &fd, 1000));
        assert_eq!(c.decide(&s, &fd, 1000), None);
        // 3 loses 2 too.
        fd.record_heartbeat(3, 1000);
        assert!(fd.record_view(3, vec![2], 1000));
        let d = c.decide(&s, &fd, 1000).expect("an election");
        assert_eq!(d.next.leader, Some(1));
        // A view from before the timeout is no evidence.
        let mut fd = FailureDetector::new(500, 0);
        fd.record_view(3, vec![2], 100);
        fd.record_heartbeat(3, 900);
        assert!(!fd.peer_suspects(3, 2, 1000));
        assert_eq!(c.decide(&s, &fd, 1000), None);
        // Nor does a late answer replace a newer view.
        let mut fd = FailureDetector::new(500, 0);
        fd.record_heartbeat(3, 900);
        fd.record_view(3, vec![], 900);
        assert!(!fd.record_view(3, vec![2], 800));
        assert!(!fd.peer_suspects(3, 2, 1000));
    }

    /// A peer running a version without views counts as agreeing (every
    /// node decided alone before views), until it sends one: a cluster
    /// being upgraded still fails over.
    #[test]
    fn a_peer_without_views_counts_as_agreeing_until_it_sends_one() {
        let mut c = FailoverCoordinator::new(1, false, 2);
        c.set_brokers(&[1, 2, 3]);
        let s = state(Some(2), &[2, 1, 3]);
        let mut fd = FailureDetector::new(500, 0);
        fd.record_heartbeat(3, 900);
        fd.mark_legacy(3);
        assert!(c.decide(&s, &fd, 1000).is_some());
        // Upgraded: its view says it hears 2.
        fd.record_view(3, vec![], 950);
        assert!(!fd.is_legacy(3));
        assert_eq!(c.decide(&s, &fd, 1000), None);
    }

    /// Five brokers: this one and one other suspecting the leader is not a
    /// majority; a third is.
    #[test]
    fn with_five_brokers_three_must_count_the_leader_as_failed() {
        let mut c = FailoverCoordinator::new(1, false, 2);
        c.set_brokers(&[1, 2, 3, 4, 5]);
        let mut s = state(Some(2), &[2, 1, 3]);
        s.replicas = vec![2, 1, 3];
        let mut fd = FailureDetector::new(500, 0);
        for b in [3, 4, 5] {
            fd.record_heartbeat(b, 1000);
        }
        fd.record_view(3, vec![2], 1000);
        fd.record_view(4, vec![], 1000);
        fd.record_view(5, vec![], 1000);
        assert_eq!(c.decide(&s, &fd, 1000), None);
        fd.record_view(5, vec![2], 1000);
        assert!(c.decide(&s, &fd, 1000).is_some());
    }

    /// A node just started hears nobody yet: it has no quorum, and elects
    /// no one it has not heard, though nobody counts as failed before its
    /// first timeout is out. It named a dead ELR member leader within
    /// 100 ms of its start.
    #[test]
    fn a_node_just_started_elects_no_one_it_has_not_heard() {
        let mut c = FailoverCoordinator::new(1, false, 2);
        c.set_brokers(&[1, 2, 3]);
        let s = PartitionState::sample(None, &[3], &[2]);
        let mut fd = FailureDetector::new(500, 0);
        assert!(!fd.has_failed(2, 100));
        assert!(!c.has_quorum(&[1, 2, 3], &fd, 100));
        assert!(
            !matches!(
                c.decide(&s, &fd, 100).map(|d| d.kind),
                Some(DecisionKind::Elect { .. })
            ),
            "{:?}",
            c.decide(&s, &fd, 100)
        );
        assert_eq!(c.unclean_candidates(&s, &fd, 100), vec![1], "only itself");
        // With unclean election on and 3 heard, it still waits for 2, the
        // ELR member it has not heard, rather than elect uncleanly.
        let mut unclean = FailoverCoordinator::new(1, true, 2);
        unclean.set_brokers(&[1, 2, 3]);
        let elr_only = PartitionState::sample(None, &[], &[2]);
        let mut only_3 = FailureDetector::new(500, 0);
        only_3.record_heartbeat(3, 150);
        only_3.record_view(3, vec![], 150);
        assert!(unclean.has_quorum(&[1, 2, 3], &only_3, 200));
        assert_eq!(unclean.decide(&elr_only, &only_3, 200), None);
        // Once 2 has failed (a timeout without a word), it goes unclean.
        only_3.record_heartbeat(3, 600);
        assert!(matches!(
            unclean.decide(&elr_only, &only_3, 600).map(|d| d.kind),
            Some(DecisionKind::Elect { unclean: true, .. })
        ));
        // Once 2 is heard it has a majority; it still waits for 3, in the
        // ISR and not failed yet, over 2 in the ELR; once 3 has failed, 2
        // is elected.
        fd.record_heartbeat(2, 150);
        fd.record_view(2, vec![], 150);
        assert!(c.has_quorum(&[1, 2, 3], &fd, 200));
        assert_eq!(c.decide(&s, &fd, 200), None);
        fd.record_heartbeat(2, 600);
        fd.record_view(2, vec![3], 600);
        assert_eq!(c.decide(&s, &fd, 600).and_then(|d| d.next.leader), Some(2));
    }

    #[test]
    fn never_heard_brokers_fail_only_after_the_timeout_since_start() {
        let fd = FailureDetector::new(500, 1000);
        assert!(!fd.has_failed(7, 1500));
        assert!(fd.has_failed(7, 1501));
    }

    #[test]
    fn a_heartbeat_keeps_a_broker_alive_for_one_timeout() {
        let mut fd = FailureDetector::new(500, 0);
        fd.record_heartbeat(2, 1000);
        fd.record_heartbeat(2, 900); // late answers never move it back
        assert!(!fd.has_failed(2, 1500));
        assert!(fd.has_failed(2, 1501));
    }

    #[test]
    fn a_paused_detector_starts_over_instead_of_failing_everyone() {
        let mut fd = FailureDetector::new(500, 0);
        fd.record_heartbeat(2, 100);
        assert!(!fd.tick(200));
        // Stopped for 5 s: nobody was heard because this process slept.
        assert!(fd.tick(5200));
        assert!(!fd.has_failed(2, 5200));
        assert!(!fd.heard_recently(2, 5200), "not heard since the pause");
        assert!(!fd.has_failed(3, 5600));
        assert!(fd.has_failed(2, 5701));
    }

    #[test]
    fn a_dead_leader_is_replaced_by_the_first_live_isr_member_in_replica_order() {
        let c = FailoverCoordinator::new(3, false, 2);
        let fd = detector(1000, &[2, 3]);
        let d = c.decide(&state(Some(1), &[1, 3, 2]), &fd, 1000).unwrap();
        assert_eq!(
            d.kind,
            DecisionKind::Elect {
                failed: Some(1),
                unclean: false,
                eligible: false
            }
        );
        assert_eq!(d.next.leader, Some(2));
        assert_eq!(d.next.leader_epoch, 5);
        assert_eq!(d.next.isr, vec![3, 2]);
        assert_eq!(d.expected_version, 9);
        // Every live decider proposes the same state.
        let other = FailoverCoordinator::new(2, false, 2)
            .decide(&state(Some(1), &[1, 3, 2]), &fd, 1000)
            .unwrap();
        assert_eq!(other, d);
    }

    #[test]
    fn replicas_outside_the_isr_are_never_elected_cleanly() {
        let c = FailoverCoordinator::new(2, false, 2);
        let fd = detector(1000, &[2, 3]);
        let d = c.decide(&state(Some(1), &[1]), &fd, 1000).unwrap();
        assert_eq!(d.kind, DecisionKind::NoCandidate { failed: Some(1) });
        assert_eq!(d.next, state(Some(1), &[1]));
    }

    #[test]
    fn unclean_election_takes_a_live_replica_outside_the_isr() {
        let c = FailoverCoordinator::new(2, true, 2);
        let fd = detector(1000, &[2, 3]);
        let d = c.decide(&state(Some(1), &[1]), &fd, 1000).unwrap();
        assert_eq!(
            d.kind,
            DecisionKind::Elect {
                failed: Some(1),
                unclean: true,
                eligible: false
            }
        );
        assert_eq!(d.next.leader, Some(2));
        assert_eq!(d.next.isr, vec![2]);
        assert_eq!(
            c.unclean_candidates(&state(Some(1), &[1]), &fd, 1000),
            vec![2, 3]
        );
        // The driver found 3's log more up to date: 3 leads instead.
        let three = d.unclean_with_leader(3).unwrap();
        assert_eq!((three.next.leader, &three.next.isr), (Some(3), &vec![3]));
        assert_eq!(
            (three.kind, three.next.leader_epoch),
            (d.kind.clone(), d.next.leader_epoch)
        );
        // Not a replica; not an unclean election: nothing to change.
        assert_eq!(d.unclean_with_leader(9), None);
        let clean = FailoverCoordinator::new(2, true, 2)
            .decide(&state(Some(1), &[1, 2, 3]), &fd, 1000)
            .unwrap();
        assert!(!clean.is_unclean() && clean.unclean_with_leader(3).is_none());
    }

    #[test]
    fn the_unclean_choice_is_the_newest_epoch_then_the_longest_log() {
        // Replica 1 kept an uncommitted tail of epoch 3; replicas 2 and 3
        // went on in epoch 5, whose leader replaced that tail.
        let logs = [
            (1, Some(3), Some(1000)),
            (2, Some(5), Some(900)),
            (3, Some(5), Some(950)),
        ];
        assert_eq!(most_up_to_date(&logs), Some(3));
        // Equal logs: the first in assignment order.
        let tie = [(1, Some(5), Some(950)), (2, Some(5), Some(950))];
        assert_eq!(most_up_to_date(&tie), Some(1));
        // A replica that did not answer is not a candidate; an empty log
        // (no epoch) is the least up to date.
        let some = [(1, None, None), (2, None, Some(0)), (3, Some(1), Some(10))];
        assert_eq!(most_up_to_date(&some), Some(3));
        assert_eq!(most_up_to_date(&[(1, None, Some(0))]), Some(1));
        assert_eq!(most_up_to_date(&[(1, Some(2), None)]), None);
        // A node that does not report epochs (an older version) with a
        // non-empty log: nothing to compare epochs with, the longest wins.
        let mixed = [(1, Some(5), Some(900)), (2, None, Some(1000))];
        assert_eq!(most_up_to_date(&mixed), Some(2));
    }

    #[test]
    fn dead_members_leaving_an_isr_below_min_insync_become_eligible() {
        let fd = detector(1000, &[1]);
        let d = FailoverCoordinator::new(1, false, 2)
            .decide(&state(Some(1), &[1, 2]), &fd, 1000)
            .unwrap();
        assert_eq!((d.next.isr, d.next.elr), (vec![1], vec![2]));
        // With min.insync 1 the ISR {1} still commits on its own: 2 would
        // not hold what it commits, so 2 is not eligible.
        let d = FailoverCoordinator::new(1, false, 1)
            .decide(
                &PartitionState {
                    min_insync: 0,
                    ..state(Some(1), &[1, 2])
                },
                &fd,
                1000,
            )
            .unwrap();
        assert_eq!((d.next.isr, d.next.elr), (vec![1], vec![]));
    }

    #[test]
    fn with_no_live_isr_member_a_live_eligible_replica_leads() {
        // KIP-966's case: 2 left the ISR while it was below min.insync, so
        // it holds every committed record; then the last member, 1, died.
        let mut s = state(Some(1), &[1]);
        s.elr = vec![2];
        let fd = detector(1000, &[2, 3]);
        let d = FailoverCoordinator::new(3, false, 2)
            .decide(&s, &fd, 1000)
            .unwrap();
        assert_eq!(
            d.kind,
            DecisionKind::Elect {
                failed: Some(1),
                unclean: false,
                eligible: true
            }
        );
        assert_eq!(d.next.leader, Some(2));
        assert_eq!(d.next.leader_epoch, 5);
        assert_eq!(d.next.isr, vec![2]);
        assert_eq!(d.next.elr, vec![1], "the dead leader held it all too");
        // 2 dies too. 3 is alive but was never eligible: it is not elected
        // cleanly. (Five brokers, so that the three alive are a majority
        // that agrees 1 is gone.)
        let fd = detector(1000, &[3, 4, 5]);
        let mut c = FailoverCoordinator::new(3, false, 2);
        c.set_brokers(&[1, 2, 3, 4, 5]);
        let d = c.decide(&s, &fd, 1000).unwrap();
        assert_eq!(d.kind, DecisionKind::NoCandidate { failed: Some(1) });
        // Unclean election may take it, and then nothing is eligible.
        let mut c = FailoverCoordinator::new(3, true, 2);
        c.set_brokers(&[1, 2, 3, 4, 5]);
        let d = c.decide(&s, &fd, 1000).unwrap();
        assert_eq!((d.next.leader, d.next.elr), (Some(3), vec![]));
    }

    #[test]
    fn a_leaderless_partition_with_an_empty_isr_elects_an_eligible_replica() {
        let mut s = state(None, &[]);
        s.elr = vec![1, 3];
        let fd = detector(1000, &[2, 3]);
        let d = FailoverCoordinator::new(2, false, 2)
            .decide(&s, &fd, 1000)
            .unwrap();
        assert_eq!(
            (d.next.leader, d.next.isr, d.next.elr),
            (Some(3), vec![3], vec![1])
        );
    }

    #[test]
    fn a_leaderless_partition_elects_a_live_isr_member() {
        let c = FailoverCoordinator::new(2, false, 2);
        let fd = detector(1000, &[2, 3]);
        let d = c.decide(&state(None, &[3]), &fd, 1000).unwrap();
        assert_eq!(d.next.leader, Some(3));
        assert_eq!(
            d.kind,
            DecisionKind::Elect {
                failed: None,
                unclean: false,
                eligible: false
            }
        );
    }

    #[test]
    fn a_live_leader_trims_dead_members_and_nobody_else_does() {
        let fd = detector(1000, &[1, 2]);
        let s = state(Some(1), &[1, 2, 3]);
        let d = FailoverCoordinator::new(1, false, 2)
            .decide(&s, &fd, 1000)
            .unwrap();
        assert_eq!(d.kind, DecisionKind::ShrinkIsr { removed: vec![3] });
        assert_eq!(d.next.isr, vec![1, 2]);
        assert_eq!(d.next.leader_epoch, 4, "a shrink keeps the epoch");
        assert_eq!(
            FailoverCoordinator::new(2, false, 2).decide(&s, &fd, 1000),
            None
        );
    }

    #[test]
    fn healthy_partitions_and_foreign_ones_need_nothing() {
        let fd = detector(1000, &[1, 2, 3]);
        let c = FailoverCoordinator::new(2, false, 2);
        assert_eq!(c.decide(&state(Some(1), &[1, 2, 3]), &fd, 1000), None);
        let mut foreign = state(Some(9), &[9]);
        foreign.replicas = vec![9, 8];
        assert_eq!(c.decide(&foreign, &detector(1000, &[]), 1000), None);
    }

    #[test]
    fn a_broker_cut_off_from_its_peers_has_no_quorum() {
        let c = FailoverCoordinator::new(1, false, 2);
        assert!(!c.has_quorum(&[1, 2, 3], &detector(1000, &[]), 1000));
        assert!(c.has_quorum(&[1, 2, 3], &detector(1000, &[3]), 1000));
        assert!(c.has_quorum(&[1], &detector(1000, &[]), 1000));
    }

    #[test]
    fn a_stopping_leader_hands_over_to_the_first_in_sync_replica_it_heard() {
        let c = FailoverCoordinator::new(1, false, 2);
        let s = state(Some(1), &[1, 3, 2]);
        // Assignment order (2 before 3), among those heard recently.
        let d = c.step_down(&s, &detector(1000, &[2, 3]), 1000).unwrap();
        assert_eq!(d.kind, DecisionKind::StepDown { successor: Some(2) });
        assert_eq!(d.next.leader, Some(2));
        assert_eq!(d.next.leader_epoch, s.leader_epoch + 1);
        assert_eq!(d.next.isr, vec![3, 2]);
        assert!(d.next.elr.is_empty());
        assert_eq!(d.expected_version, s.version);
        // Both last heard 600 ms ago, past the 500 ms timeout: nobody.
        assert_eq!(c.step_down(&s, &detector(400, &[2, 3]), 1000), None);
        // Node 2 silent, node 3 heard: node 3.
        let mut fd = detector(400, &[2]);
        fd.record_heartbeat(3, 1000);
        let d = c.step_down(&s, &fd, 1000).unwrap();
        assert_eq!(d.next.leader, Some(3));
        // Never heard from (a detector younger than the timeout would
        // still give it the benefit of the doubt): not a successor.
        assert_eq!(c.step_down(&s, &FailureDetector::new(500, 900), 1000), None);
    }

    #[test]
    fn a_stopping_sole_in_sync_leader_keeps_leading() {
        let c = FailoverCoordinator::new(1, false, 2);
        let fd = detector(1000, &[2, 3]);
        assert_eq!(c.step_down(&state(Some(1), &[1]), &fd, 1000), None);
        // Its only in-sync peer is silent: the same.
        let mut fd = detector(1000, &[3]);
        fd.record_heartbeat(2, 100);
        assert_eq!(c.step_down(&state(Some(1), &[1, 2]), &fd, 1000), None);
    }

    #[test]
    fn a_stopping_follower_leaves_the_isr_and_stays_eligible_below_min_insync() {
        let c = FailoverCoordinator::new(3, false, 2);
        let fd = detector(1000, &[1, 2]);
        let d = c.step_down(&state(Some(1), &[1, 2, 3]), &fd, 1000).unwrap();
        assert_eq!(d.kind, DecisionKind::StepDown { successor: None });
        assert_eq!((d.next.leader, d.next.leader_epoch), (Some(1), 4));
        assert_eq!(d.next.isr, vec![1, 2]);
        assert!(d.next.elr.is_empty());
        // Below min.insync it holds every committed record: eligible.
        let d = c.step_down(&state(Some(1), &[1, 3]), &fd, 1000).unwrap();
        assert_eq!((d.next.isr.clone(), d.next.elr.clone()), (vec![1], vec![3]));
        // Not in the ISR, or its only member: nothing to write.
        assert_eq!(c.step_down(&state(Some(1), &[1, 2]), &fd, 1000), None);
        assert_eq!(c.step_down(&state(None, &[3]), &fd, 1000), None);
        let mut unknown = state(Some(1), &[1, 3]);
        unknown.version = 0;
        assert_eq!(c.step_down(&unknown, &fd, 1000), None);
    }

    #[test]
    fn a_leader_hands_back_to_the_preferred_replica_once_it_is_in_sync_and_heard() {
        // Replicas [1, 2, 3]: node 1 is preferred; node 2 leads.
        let c = FailoverCoordinator::new(2, false, 2);
        let s = state(Some(2), &[2, 3, 1]);
        let d = c.prefer(&s, &detector(1000, &[1, 3]), 1000).unwrap();
        assert_eq!(d.kind, DecisionKind::Prefer { preferred: 1 });
        assert_eq!(d.next.leader, Some(1));
        assert_eq!(d.next.leader_epoch, s.leader_epoch + 1);
        assert_eq!(
            (d.next.isr.clone(), d.next.elr.clone()),
            (s.isr.clone(), s.elr.clone())
        );
        assert_eq!(d.expected_version, s.version);
        // Not in the ISR yet (still catching up after its restart).
        assert_eq!(
            c.prefer(&state(Some(2), &[2, 3]), &detector(1000, &[1, 3]), 1000),
            None
        );
        // In the ISR but not heard within the timeout.
        let mut fd = detector(400, &[3]);
        fd.record_heartbeat(1, 100);
        assert_eq!(c.prefer(&s, &fd, 1000), None);
        // Nobody else decides it: not a follower, not the preferred itself.
        let fd = detector(1000, &[1, 2, 3]);
        assert_eq!(
            FailoverCoordinator::new(3, false, 2).prefer(&s, &fd, 1000),
            None
        );
        assert_eq!(
            FailoverCoordinator::new(1, false, 2).prefer(&s, &fd, 1000),
            None
        );
        // The preferred replica leading already: nothing to do.
        assert_eq!(
            FailoverCoordinator::new(1, false, 2).prefer(&state(Some(1), &[1, 2, 3]), &fd, 1000),
            None
        );
        let mut unknown = s.clone();
        unknown.version = 0;
        assert_eq!(c.prefer(&unknown, &fd, 1000), None);
    }

    #[test]
    fn failover_metrics_average_the_successful_ones() {
        let mut m = FailoverMetrics::default();
        m.record_success(Some(400), 10);
        m.record_success(Some(800), 20);
        m.record_success(None, 30); // no duration: not in the average
        m.record_failure();
        assert_eq!(m.total_failovers, 4);
        assert_eq!(m.successful_failovers, 3);
        assert_eq!(m.failed_failovers, 1);
        assert_eq!(m.average_failover_ms, 600.0);
        assert_eq!(m.last_failover_ms, Some(800));
    }
}
