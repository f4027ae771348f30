//! The simulated cluster: nodes running the real `ReplicationManager`, a
//! metadata store with compare-and-set that fences crashed brokers and
//! elects leaders from the live ISR (else the live ELR, KIP-966), and a
//! lossy, reordering network. The ISR and ELR change only through the
//! host's own rules (`PartitionState::with_isr`, `after_restart`).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use replicator::batch::Record;
use replicator::core::{
    Acks, Action, Config, DecisionKind, FailoverCoordinator, FailureDetector, Faults, FetchRequest,
    FetchResponse, ReplicationManager,
};
use replicator::metadata::PartitionState;

use super::checker::Checker;
use super::rng::Rng;
use super::storage::SimLog;

#[derive(Debug, Clone)]
pub struct Options {
    pub replicas: u32,
    pub min_insync: u32,
    pub steps: u32,
    /// Reference-package bugs switched back on (negative controls).
    pub faults: Faults,
    /// Negative control: the controller elects any live replica.
    pub elect_outside_isr: bool,
    /// KIP-966: elect from the ELR when no ISR member is alive, and give
    /// up a restarted replica's claims by `after_restart`. Off (negative
    /// control): a restarted sole ISR member leads with what its log kept.
    pub eligible_leaders: bool,
    pub drop_percent: u64,
    /// Chance per step (percent) of a crash, and of a link cut.
    pub crash_percent: u64,
    /// Of those crashes, the share (percent) that are graceful stops
    /// instead: the node hands over first (controlled shutdown, by the
    /// host's `FailoverCoordinator::step_down`), then stops with its log
    /// flushed and intact.
    pub stop_percent: u64,
    /// Negative control: a stopping leader hands over to any live replica,
    /// in the ISR or not.
    pub hand_over_outside_isr: bool,
    /// Faults overlap: a node may stop or crash while others are down, as
    /// long as one stays up and at most one of the down nodes lost
    /// unflushed data (a rolling restart meeting a crash). Off: at most
    /// `replicas - min_insync` nodes are down at once.
    pub overlap: bool,
    /// Chance per step (percent) that the leader runs the leader
    /// rebalance: it hands over to the preferred replica if that one is
    /// in the ISR and heard (the host's `FailoverCoordinator::prefer`).
    pub rebalance_percent: u64,
    /// Negative control: the rebalance hands over to the preferred replica
    /// whenever it is alive, in the ISR or not.
    pub prefer_outside_isr: bool,
    pub cut_percent: u64,
    pub max_delay_ms: u64,
    /// `Config::retention_bytes` of every replica.
    pub retention_bytes: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            replicas: 3,
            min_insync: 2,
            steps: 1500,
            faults: Faults::default(),
            elect_outside_isr: false,
            eligible_leaders: true,
            drop_percent: 3,
            crash_percent: 1,
            stop_percent: 0,
            hand_over_outside_isr: false,
            overlap: false,
            rebalance_percent: 0,
            prefer_outside_isr: false,
            cut_percent: 1,
            max_delay_ms: 20,
            retention_bytes: None,
        }
    }
}

enum Msg {
    Fetch(FetchRequest),
    Resp(FetchResponse),
}

struct Envelope {
    at: u64,
    seq: u64,
    from: u32,
    to: u32,
    msg: Msg,
}

pub struct Node {
    pub alive: bool,
    /// Its last crash lost unflushed batches: its log is not intact (what
    /// a clean-shutdown record tells a real node; a crashed real node
    /// counts as not intact even when it lost nothing, which is safer).
    pub lost: bool,
    /// Broker epoch: bumped at every start, registered with the store.
    pub broker_epoch: u64,
    pub rm: Option<ReplicationManager>,
    pub log: SimLog,
}

/// The metadata store's view of the partition.
#[derive(Debug, Clone)]
pub struct Controller {
    pub leader: Option<u32>,
    pub epoch: u32,
    pub isr: Vec<u32>,
    pub elr: Vec<u32>,
    pub version: u64,
    pub replicas: Vec<u32>,
}

pub struct Sim {
    pub rng: Rng,
    pub now: u64,
    pub opts: Options,
    pub config: Config,
    pub nodes: Vec<Node>,
    pub ctrl: Controller,
    net: Vec<Envelope>,
    seq: u64,
    cut: BTreeSet<(u32, u32)>,
    timeouts: Vec<(u64, u32, u64)>,
    next_produce: u64,
    pending: BTreeMap<u64, Bytes>,
    pub checker: Checker,
    pub trace: Vec<String>,
    pub acked_count: u64,
    /// Per node: storage operations issued and not yet done, in order,
    /// with the time each may complete (storage is asynchronous).
    storage_q: Vec<std::collections::VecDeque<(u64, StorageOp)>>,
    /// ISR changes on their way to the store and back.
    meta_q: Vec<(u64, u32, Action)>,
    /// No faults, no loss: the final phase that checks liveness.
    quiet: bool,
    /// No new writes either: replicas must converge.
    draining: bool,
}

enum StorageOp {
    Append { batches: Bytes, as_leader: bool },
    Truncate(u64),
    Reset(u64),
    DeletePrefix(u64),
}

impl Sim {
    pub fn new(seed: u64, opts: Options) -> Sim {
        let config = Config {
            min_insync_replicas: opts.min_insync,
            replica_lag_time_max_ms: 300,
            fetch_max_wait_ms: 50,
            fetch_backoff_ms: 20,
            fetch_max_bytes: 4096,
            high_watermark_checkpoint_interval_ms: 100,
            retention_bytes: opts.retention_bytes,
            ..Config::default()
        };
        let replicas: Vec<u32> = (0..opts.replicas).collect();
        let nodes = replicas
            .iter()
            .map(|_| Node {
                alive: true,
                lost: false,
                broker_epoch: 0,
                rm: None,
                log: SimLog::default(),
            })
            .collect();
        let mut sim = Sim {
            rng: Rng::new(seed),
            now: 0,
            config,
            nodes,
            ctrl: Controller {
                leader: None,
                epoch: 0,
                isr: replicas.clone(),
                elr: Vec::new(),
                version: 1,
                replicas,
            },
            net: Vec::new(),
            seq: 0,
            cut: BTreeSet::new(),
            timeouts: Vec::new(),
            next_produce: 0,
            pending: BTreeMap::new(),
            checker: Checker::default(),
            trace: Vec::new(),
            acked_count: 0,
            storage_q: (0..opts.replicas).map(|_| Default::default()).collect(),
            meta_q: Vec::new(),
            quiet: false,
            draining: false,
            opts,
        };
        for n in 0..sim.opts.replicas {
            sim.start_node(n);
        }
        sim.elect(None);
        sim.settle();
        sim
    }

    fn start_node(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        node.broker_epoch += 1;
        let mut rm = ReplicationManager::new(self.config.clone(), n, &node.log.state());
        rm.set_broker_epoch(node.broker_epoch);
        rm.set_faults(self.opts.faults);
        node.rm = Some(rm);
        node.alive = true;
    }

    fn partition_state(&self) -> PartitionState {
        PartitionState {
            topic: "t".into(),
            partition: 0,
            leader: self.ctrl.leader,
            leader_epoch: self.ctrl.epoch,
            isr: self.ctrl.isr.clone(),
            elr: self.ctrl.elr.clone(),
            replicas: self.ctrl.replicas.clone(),
            min_insync: self.opts.min_insync,
            version: self.ctrl.version,
        }
    }

    /// The ISR becomes `isr`; the ELR follows the host's rule. `eligible`:
    /// whether members leaving it held everything committed.
    fn set_isr(&mut self, isr: Vec<u32>, eligible: bool) {
        let next = self
            .partition_state()
            .with_isr(isr, self.opts.min_insync, eligible);
        self.ctrl.isr = next.isr;
        self.ctrl.elr = next.elr;
    }

    fn rm(&mut self, n: u32) -> Option<&mut ReplicationManager> {
        let node = &mut self.nodes[n as usize];
        if node.alive { node.rm.as_mut() } else { None }
    }

    /// Elect a leader: a live ISR member (or, as a negative control, any
    /// live replica), bumping the epoch through the store.
    fn elect(&mut self, dead: Option<u32>) {
        let alive: Vec<u32> = self
            .ctrl
            .replicas
            .iter()
            .copied()
            .filter(|r| self.nodes[*r as usize].alive && Some(*r) != dead)
            .collect();
        let among = |set: &[u32]| -> Vec<u32> {
            alive.iter().copied().filter(|r| set.contains(r)).collect()
        };
        let mut candidates: Vec<u32> = if self.opts.elect_outside_isr {
            alive.clone()
        } else {
            among(&self.ctrl.isr)
        };
        let mut eligible = false;
        if candidates.is_empty() && self.opts.eligible_leaders {
            candidates = among(&self.ctrl.elr);
            eligible = true;
        }
        if candidates.is_empty() {
            self.ctrl.leader = None;
            self.trace.push(format!(
                "t={} partition offline (isr {:?}, elr {:?})",
                self.now, self.ctrl.isr, self.ctrl.elr
            ));
            return;
        }
        let leader = candidates[self.rng.below(candidates.len() as u64) as usize];
        self.ctrl.epoch += 1;
        self.ctrl.version += 1;
        self.ctrl.leader = Some(leader);
        if eligible {
            self.trace.push(format!(
                "t={} elect from the elr {:?}",
                self.now, self.ctrl.elr
            ));
            self.set_isr(vec![leader], true);
        } else if !self.ctrl.isr.contains(&leader) {
            self.ctrl.isr = vec![leader];
            self.ctrl.elr.clear();
        }
        self.trace.push(format!(
            "t={} elect {leader} epoch {} isr {:?}",
            self.now, self.ctrl.epoch, self.ctrl.isr
        ));
        self.install_leader(leader);
    }

    /// The store names `leader` in its current epoch: it leads, and every
    /// other live replica follows it.
    fn install_leader(&mut self, leader: u32) {
        let (epoch, isr, version, replicas, now) = (
            self.ctrl.epoch,
            self.ctrl.isr.clone(),
            self.ctrl.version,
            self.ctrl.replicas.clone(),
            self.now,
        );
        self.checker.on_elect(leader, epoch);
        if let Some(rm) = self.rm(leader) {
            rm.become_leader(epoch, replicas, isr, version, now)
                .expect("role change");
        }
        for r in 0..self.opts.replicas {
            if r != leader
                && let Some(rm) = self.rm(r)
            {
                rm.become_follower(leader, epoch, now).expect("role change");
            }
        }
    }

    /// `leader` learns the ISR the store now holds (changed without it).
    fn tell_leader_isr(&mut self, leader: u32) {
        let (epoch, isr, version, now) = (
            self.ctrl.epoch,
            self.ctrl.isr.clone(),
            self.ctrl.version,
            self.now,
        );
        if let Some(rm) = self.rm(leader) {
            rm.metadata_isr_changed(epoch, isr, version, now);
        }
    }

    fn crash(&mut self, n: u32) {
        // A machine crash loses unflushed data. Never for the last replica
        // known to hold every committed record (the last ISR member, with
        // nobody eligible): no protocol keeps what every holder lost. The
        // last ISR member with an ELR is KIP-966's case.
        let last_holder = self.ctrl.isr == [n] && self.ctrl.elr.is_empty();
        let lossy = !last_holder && self.rng.chance(50);
        let lost = if lossy {
            self.nodes[n as usize].log.lose_unflushed()
        } else {
            0
        };
        self.trace.push(format!(
            "t={} crash {n} (lost {lost} unflushed batches)",
            self.now
        ));
        self.nodes[n as usize].alive = false;
        self.nodes[n as usize].lost = lost > 0;
        self.nodes[n as usize].rm = None;
        // Operations the storage had not done yet never happen.
        self.storage_q[n as usize].clear();
        self.checker
            .on_truncate(n, self.nodes[n as usize].log.log_end());
        self.fence(n);
    }

    /// A graceful stop with controlled shutdown, as `node::run` does it:
    /// the node (fetching no more, registered anew) writes what `step_down` decides, with
    /// the peers it heard recently as candidates; then its storage finishes
    /// what it was given and flushes, and it exits with its log intact.
    fn stop(&mut self, n: u32) {
        let now = self.now;
        // It registers again first: fetches of this incarnation still on
        // the way cannot let it back into the ISR (the store checks added
        // members' broker epochs).
        self.nodes[n as usize].broker_epoch += 1;
        let fd = self.heard_by(n);
        let state = self.partition_state();
        let mut decision =
            FailoverCoordinator::new(n, false, self.opts.min_insync).step_down(&state, &fd, now);
        if self.opts.hand_over_outside_isr
            && state.leader == Some(n)
            && let Some(d) = decision.as_mut()
            && let Some(r) = (0..self.opts.replicas)
                .find(|r| *r != n && self.nodes[*r as usize].alive && !state.isr.contains(r))
        {
            d.next.leader = Some(r);
            d.kind = DecisionKind::StepDown { successor: Some(r) };
        }
        if let Some(d) = decision {
            self.ctrl.version += 1;
            self.ctrl.isr = d.next.isr;
            self.ctrl.elr = d.next.elr;
            let (isr, elr) = (&self.ctrl.isr, &self.ctrl.elr);
            match d.kind {
                DecisionKind::StepDown { successor: Some(s) } => {
                    let epoch = d.next.leader_epoch;
                    self.trace.push(format!(
                        "t={now} {n} stops: hands over to {s} epoch {epoch} isr {isr:?} elr {elr:?}"
                    ));
                    self.ctrl.leader = Some(s);
                    self.ctrl.epoch = epoch;
                    self.install_leader(s);
                }
                _ => {
                    self.trace.push(format!(
                        "t={now} {n} stops: leaves the isr {isr:?} elr {elr:?}"
                    ));
                    if let Some(l) = self.ctrl.leader {
                        self.tell_leader_isr(l);
                    }
                }
            }
            self.settle();
        } else {
            self.trace.push(format!("t={now} {n} stops"));
        }
        // Shutdown waits for the storage lane, then flushes.
        for op in self.storage_q[n as usize].iter_mut() {
            op.0 = now;
        }
        self.complete_storage(n);
        self.settle();
        self.complete_storage(n);
        self.nodes[n as usize].log.flush();
        self.nodes[n as usize].alive = false;
        self.nodes[n as usize].lost = false;
        self.nodes[n as usize].rm = None;
        self.storage_q[n as usize].clear();
        // What it could not hand over, failure detection does, as for a
        // crash.
        self.fence(n);
    }

    /// The leader's rebalance pass, as the host's coordinator runs it: the
    /// preferred replica (the first in assignment order) leads the next
    /// epoch if it is in the ISR and the leader heard it recently.
    fn rebalance(&mut self) {
        let Some(l) = self.ctrl.leader else { return };
        let now = self.now;
        let fd = self.heard_by(l);
        let state = self.partition_state();
        let decision =
            FailoverCoordinator::new(l, false, self.opts.min_insync).prefer(&state, &fd, now);
        let preferred = match decision {
            Some(d) => Some((d.next.leader_epoch, d.kind)),
            None if self.opts.prefer_outside_isr => {
                let p = state.replicas[0];
                (p != l && fd.heard_recently(p, now)).then(|| {
                    (
                        state.leader_epoch + 1,
                        DecisionKind::Prefer { preferred: p },
                    )
                })
            }
            None => None,
        };
        let Some((epoch, DecisionKind::Prefer { preferred })) = preferred else {
            return;
        };
        // The host's partition must have seen the preferred replica's
        // current incarnation fetching, caught up, within a long poll plus
        // a failure timeout (here `replica_lag_time_max_ms`: see `heard_by`).
        let within = self.config.fetch_max_wait_ms + self.config.replica_lag_time_max_ms;
        let broker_epoch = self.nodes[preferred as usize].broker_epoch;
        let ready = self.nodes[l as usize]
            .rm
            .as_ref()
            .is_some_and(|rm| rm.follower_ready(preferred, broker_epoch, now, within));
        if !ready && !self.opts.prefer_outside_isr {
            return;
        }
        self.ctrl.version += 1;
        self.ctrl.leader = Some(preferred);
        self.ctrl.epoch = epoch;
        if !self.ctrl.isr.contains(&preferred) {
            // The control's store takes the leader into the ISR, as an
            // unclean election would.
            self.ctrl.isr.push(preferred);
        }
        self.trace.push(format!(
            "t={now} rebalance: {l} hands over to {preferred} epoch {epoch} isr {:?}",
            self.ctrl.isr
        ));
        self.install_leader(preferred);
        self.settle();
    }

    /// A failure detector of node `n`: it has heard every live node it
    /// has a link from.
    fn heard_by(&self, n: u32) -> FailureDetector {
        let mut fd = FailureDetector::new(self.config.replica_lag_time_max_ms, self.now);
        for r in 0..self.opts.replicas {
            if r != n && self.nodes[r as usize].alive && !self.cut.contains(&(r, n)) {
                fd.record_heartbeat(r, self.now);
            }
        }
        fd
    }

    /// What the store does once it finds `n` gone: out of the ISR (never
    /// emptying it), and a new leader if `n` led.
    fn fence(&mut self, n: u32) {
        // The store fences the broker: out of the ISR (never emptying it).
        if self.ctrl.isr.contains(&n) && self.ctrl.isr.len() > 1 {
            let isr = self.ctrl.isr.iter().copied().filter(|r| *r != n).collect();
            self.set_isr(isr, true);
            self.ctrl.version += 1;
            self.trace.push(format!(
                "t={} store fences {n}: isr {:?}, elr {:?}",
                self.now, self.ctrl.isr, self.ctrl.elr
            ));
        }
        if self.ctrl.leader == Some(n) || self.ctrl.leader.is_none() {
            self.elect(Some(n));
        } else if let Some(l) = self.ctrl.leader {
            self.tell_leader_isr(l);
        }
    }

    fn restart(&mut self, n: u32) {
        self.trace.push(format!("t={} restart {n}", self.now));
        self.start_node(n);
        let intact = !self.nodes[n as usize].lost;
        if self.opts.eligible_leaders
            && let Some(next) =
                self.partition_state()
                    .after_restart(n, intact, self.opts.min_insync)
        {
            // The store never names a crashed leader here (it elected
            // at the crash), so only the ISR and ELR change.
            self.trace.push(format!(
                "t={} {n} gives up its claims (intact {intact}): isr {:?}, elr {:?}",
                self.now, next.isr, next.elr
            ));
            self.ctrl.isr = next.isr;
            self.ctrl.elr = next.elr;
            self.ctrl.version += 1;
        }
        match self.ctrl.leader {
            Some(l) => {
                let (epoch, now) = (self.ctrl.epoch, self.now);
                if let Some(rm) = self.rm(n) {
                    rm.become_follower(l, epoch, now).expect("role change");
                }
            }
            None => self.elect(None),
        }
    }

    fn send(&mut self, from: u32, to: u32, msg: Msg) {
        if self.rng.chance(self.opts.drop_percent) {
            return;
        }
        let at = self.now + 1 + self.rng.below(self.opts.max_delay_ms);
        self.seq += 1;
        self.net.push(Envelope {
            at,
            seq: self.seq,
            from,
            to,
            msg,
        });
    }

    /// Carry out every queued action until the cluster is quiet.
    pub fn settle(&mut self) {
        loop {
            let mut any = false;
            for n in 0..self.opts.replicas {
                let actions = match self.rm(n) {
                    Some(rm) => rm.drain(),
                    None => continue,
                };
                for a in actions {
                    any = true;
                    self.execute(n, a);
                }
            }
            if !any {
                break;
            }
        }
    }

    fn execute(&mut self, n: u32, action: Action) {
        let now = self.now;
        match action {
            Action::Append { batches } => {
                let as_leader = self.rm(n).is_some_and(|rm| rm.is_leader());
                self.queue_storage(n, StorageOp::Append { batches, as_leader });
            }
            Action::Truncate { offset } => {
                let view = self
                    .rm(n)
                    .map(|rm| (rm.log_end_offset(), rm.epochs().entries().to_vec()));
                self.trace.push(format!(
                    "t={now} {n} truncates to {offset} (leo, epochs) {view:?}"
                ));
                self.queue_storage(n, StorageOp::Truncate(offset));
            }
            Action::ResetLog { offset } => {
                self.trace.push(format!("t={now} {n} resets to {offset}"));
                self.queue_storage(n, StorageOp::Reset(offset));
            }
            Action::DeletePrefix { offset } => {
                self.trace
                    .push(format!("t={now} {n} deletes below {offset} (retention)"));
                self.queue_storage(n, StorageOp::DeletePrefix(offset));
            }
            Action::PersistEpochs(e) => self.nodes[n as usize].log.epochs = e,
            Action::IsrWaitDone { .. } => {}
            Action::PersistHighWatermark(hw) => self.nodes[n as usize].log.hw_checkpoint = hw,
            Action::SendFetch { to, request } => {
                let wait = request.max_wait_ms + 2 * self.opts.max_delay_ms + 10;
                self.timeouts.push((now + wait, n, request.correlation_id));
                self.send(n, to, Msg::Fetch(request));
            }
            Action::RespondFetch {
                to,
                mut response,
                read,
            } => {
                if let Some(spec) = read {
                    response.records = self.nodes[n as usize].log.read(&spec).into();
                }
                if let Some(d) = response.diverging_epoch {
                    let mine = self.rm(n).map(|rm| rm.epochs().entries().to_vec());
                    self.trace.push(format!(
                        "t={now} {n} tells {to}: diverging {d:?}; leader epochs {mine:?}"
                    ));
                }
                self.send(n, to, Msg::Resp(response));
            }
            Action::ProduceDone { id, result } => {
                if let (Some(_), Ok(base)) = (self.pending.remove(&id), result) {
                    self.acked_count += 1;
                    let entry = self.nodes[n as usize].log.entry_at(base);
                    let hw = self.rm(n).map_or(0, |rm| rm.high_watermark());
                    self.checker.on_ack(n, base, hw, entry);
                }
            }
            a @ Action::UpdateIsr { .. } => {
                // The store answers after a while, as a real one does.
                let delay = if self.rng.chance(50) {
                    1 + self.rng.below(15)
                } else {
                    0
                };
                self.meta_q.push((now + delay, n, a));
                if delay == 0 {
                    self.answer_metadata();
                }
            }
        }
    }

    /// Apply storage operations that are due, in order, and report them.
    fn queue_storage(&mut self, n: u32, op: StorageOp) {
        let delay = if self.rng.chance(30) {
            1 + self.rng.below(8)
        } else {
            0
        };
        self.storage_q[n as usize].push_back((self.now + delay, op));
        self.complete_storage(n);
    }

    fn complete_storage(&mut self, n: u32) {
        let now = self.now;
        while let Some((due, _)) = self.storage_q[n as usize].front() {
            if *due > now {
                return;
            }
            let Some((_, op)) = self.storage_q[n as usize].pop_front() else {
                return;
            };
            match op {
                StorageOp::Append { batches, as_leader } => {
                    self.checker
                        .on_append(n, as_leader, &batches, &self.nodes[n as usize].log);
                    match self.nodes[n as usize].log.append(&batches) {
                        Ok(leo) => {
                            if let Some(rm) = self.rm(n) {
                                rm.log_appended(leo, now);
                            }
                        }
                        Err(e) => self.checker.violation(format!("node {n}: {e}")),
                    }
                }
                StorageOp::Truncate(offset) => {
                    let leo = self.nodes[n as usize].log.truncate(offset);
                    self.checker.on_truncate(n, leo);
                    if let Some(rm) = self.rm(n) {
                        rm.log_truncated(leo, now);
                    }
                }
                StorageOp::Reset(offset) => {
                    self.nodes[n as usize].log.reset(offset);
                    self.checker.on_truncate(n, offset);
                    if let Some(rm) = self.rm(n) {
                        rm.log_reset(offset, now);
                    }
                }
                StorageOp::DeletePrefix(offset) => {
                    let epoch = self.ctrl.epoch;
                    let own_hw = self
                        .rm(n)
                        .filter(|rm| rm.is_leader() && rm.leader_epoch() == Some(epoch))
                        .map(|rm| rm.high_watermark());
                    self.checker.on_delete_prefix(n, offset, own_hw);
                    self.nodes[n as usize].log.delete_prefix(offset);
                    if let Some(rm) = self.rm(n) {
                        rm.log_prefix_deleted();
                    }
                }
            }
        }
    }

    /// The store answers the ISR changes that are due.
    fn answer_metadata(&mut self) {
        let now = self.now;
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.meta_q)
            .into_iter()
            .partition(|(t, _, _)| *t <= now);
        self.meta_q = keep;
        for (_, n, a) in due {
            let Action::UpdateIsr {
                leader_epoch,
                isr,
                expected_version,
                added,
            } = a
            else {
                continue;
            };
            if !self.nodes[n as usize].alive {
                continue;
            }
            // The store's checks: current leader and epoch, expected
            // version, live members, and added members' broker epochs
            // current (KIP-903).
            let current_leader = self.ctrl.leader == Some(n) && leader_epoch == self.ctrl.epoch;
            if current_leader && !isr.contains(&n) {
                // Stores refuse such a state as corrupt (a leader outside
                // its ISR), so a leader must never propose one.
                self.checker.violation(format!(
                    "t={now} leader {n} proposed an ISR without itself: {isr:?}"
                ));
            }
            let admissible = isr.contains(&n)
                && isr.iter().all(|r| self.nodes[*r as usize].alive)
                && added
                    .iter()
                    .all(|(r, e)| self.nodes[*r as usize].broker_epoch == *e);
            let result = if !current_leader {
                Err(replicator::core::ErrorCode::FencedLeaderEpoch)
            } else if expected_version != self.ctrl.version || !admissible {
                Err(replicator::core::ErrorCode::IsrUpdateRejected)
            } else {
                self.set_isr(isr.clone(), true);
                self.ctrl.version += 1;
                Ok(self.ctrl.version)
            };
            let view = self.rm(n).map(|rm| {
                (
                    rm.high_watermark(),
                    rm.log_end_offset(),
                    rm.follower_log_ends(),
                )
            });
            self.trace.push(format!("t={now} {n} proposes isr {isr:?} at epoch {leader_epoch} version {expected_version} (hw, leo, followers) {view:?}: {result:?}"));
            if let Some(rm) = self.rm(n) {
                rm.isr_update_done(expected_version, result, now);
            }
            if current_leader && expected_version != self.ctrl.version {
                // The leader's view was stale: send it the current one.
                self.tell_leader_isr(n);
            }
        }
    }

    /// Tick `n` as a node does: when its core says something is due. One
    /// step in four it also ticks early, which must do nothing; and after a
    /// tick nothing may be due still (a node would spin).
    fn tick(&mut self, n: u32, now: u64) -> Result<(), String> {
        let early = self.rng.chance(25);
        if early {
            // So that the outbox holds only what the tick does.
            self.settle();
        }
        let Some(rm) = self.rm(n) else { return Ok(()) };
        let due = rm.next_deadline();
        if due.is_some_and(|d| d <= now) {
            rm.tick(now);
        } else if early {
            rm.tick(now);
            let acted = rm.drain();
            if !acted.is_empty() {
                return Err(format!(
                    "t={now} node {n}: a tick before the core's next deadline {due:?} acted: {acted:?}"
                ));
            }
        }
        match rm.next_deadline() {
            Some(d) if d <= now => Err(format!(
                "t={now} node {n}: still due at {d} after a tick (a node would spin)"
            )),
            _ => Ok(()),
        }
    }

    /// One step of simulated time with random events.
    pub fn step(&mut self) -> Result<(), String> {
        self.now += 1 + self.rng.below(5);
        let now = self.now;
        // Deliver what is due, in (time, send order).
        self.net.sort_by_key(|e| (e.at, e.seq));
        let due: Vec<Envelope> = {
            let split = self.net.partition_point(|e| e.at <= now);
            self.net.drain(..split).collect()
        };
        for e in due {
            if self.cut.contains(&(e.from, e.to)) {
                continue;
            }
            let Some(rm) = self.rm(e.to) else { continue };
            match e.msg {
                Msg::Fetch(req) => rm.handle_fetch(e.from, req, now),
                Msg::Resp(resp) => rm.handle_fetch_response(e.from, resp, now),
            }
            self.settle();
        }
        for n in 0..self.opts.replicas {
            self.complete_storage(n);
        }
        self.answer_metadata();
        self.settle();
        let fired: Vec<(u64, u32, u64)> = {
            let (due, keep): (Vec<_>, Vec<_>) = self.timeouts.iter().partition(|t| t.0 <= now);
            self.timeouts = keep;
            due
        };
        for (_, n, corr) in fired {
            if let Some(rm) = self.rm(n) {
                rm.fetch_failed(corr, now);
            }
        }
        for n in 0..self.opts.replicas {
            if self.nodes[n as usize].alive && self.rng.chance(10) {
                self.nodes[n as usize].log.flush();
            }
            self.tick(n, now)?;
        }
        self.settle();

        // Producers: acks=all, one record each, to whoever leads.
        if !self.draining
            && self.rng.chance(40)
            && let Some(l) = self.ctrl.leader
        {
            let id = self.next_produce;
            self.next_produce += 1;
            let value = Bytes::from(format!("p{id}"));
            let record = Record {
                value: value.clone(),
                timestamp: id as i64,
                ..Default::default()
            };
            if let Some(rm) = self.rm(l)
                && rm.produce(id, &[record], Acks::All, now + 5_000).is_ok()
            {
                self.pending.insert(id, value);
            }
            self.settle();
        }

        if self.quiet {
            self.settle();
            return Checker::check(self);
        }
        // Faults: crashes within RF - min.insync (with overlap: all but
        // one node, one of them lossy), restarts, link cuts.
        let down = self.nodes.iter().filter(|n| !n.alive).count() as u32;
        let lossy_down = self.nodes.iter().any(|n| !n.alive && n.lost);
        let budget = if self.opts.overlap {
            self.opts.replicas - 1
        } else {
            self.opts.replicas - self.opts.min_insync
        };
        if self.rng.chance(self.opts.crash_percent) && down < budget {
            let n = self.rng.below(u64::from(self.opts.replicas)) as u32;
            if self.nodes[n as usize].alive {
                if down > 0 {
                    self.trace
                        .push(format!("t={now} overlap: {down} down (lossy {lossy_down})"));
                }
                // No draw when off, so the other tests' seeds replay as before.
                if self.opts.stop_percent > 0 && self.rng.chance(self.opts.stop_percent) {
                    self.stop(n);
                } else if !lossy_down {
                    // Two nodes that each lost what they had not flushed
                    // can lose an acknowledged write with any protocol
                    // that acknowledges before flushing (Kafka's too).
                    self.crash(n);
                }
            }
        } else if self.rng.chance(3) && down > 0 {
            let dead: Vec<u32> = (0..self.opts.replicas)
                .filter(|n| !self.nodes[*n as usize].alive)
                .collect();
            let n = dead[self.rng.below(dead.len() as u64) as usize];
            self.restart(n);
        }
        // No draw when off, so the other tests' seeds replay as before.
        if self.opts.rebalance_percent > 0 && self.rng.chance(self.opts.rebalance_percent) {
            self.rebalance();
        }
        if self.rng.chance(self.opts.cut_percent) {
            let a = self.rng.below(u64::from(self.opts.replicas)) as u32;
            let b = self.rng.below(u64::from(self.opts.replicas)) as u32;
            if a != b {
                self.trace.push(format!("t={now} cut {a}->{b}"));
                self.cut.insert((a, b));
            }
        } else if self.rng.chance(2) && !self.cut.is_empty() {
            self.trace.push(format!("t={now} heal"));
            self.cut.clear();
        }
        self.settle();
        Checker::check(self)
    }

    /// Run every step; on a violation, the error names the step.
    pub fn run(&mut self) -> Result<(), String> {
        for i in 0..self.opts.steps {
            self.step()
                .map_err(|e| format!("step {i}, t={}: {e}", self.now))?;
        }
        self.check_liveness()
    }

    /// After the faults stop (links healed, every node back, no loss), the
    /// cluster must make progress again: a leader acknowledges acks=all
    /// writes and every replica converges on its log.
    fn check_liveness(&mut self) -> Result<(), String> {
        self.quiet = true;
        self.opts.drop_percent = 0;
        self.cut.clear();
        for n in 0..self.opts.replicas {
            if !self.nodes[n as usize].alive {
                self.restart(n);
            }
        }
        self.settle();
        let acked_before = self.acked_count;
        for i in 0..600 {
            self.step()
                .map_err(|e| format!("quiet step {i}, t={}: {e}", self.now))?;
        }
        if self.acked_count == acked_before {
            return Err(format!(
                "no acks=all write succeeded after the faults stopped (leader {:?}, isr {:?})",
                self.ctrl.leader, self.ctrl.isr
            ));
        }
        // Then no new writes: every replica must reach the leader's end and
        // the HW must cover it.
        self.draining = true;
        for i in 0..400 {
            self.step()
                .map_err(|e| format!("draining step {i}, t={}: {e}", self.now))?;
        }
        let views: Vec<(u64, u64)> = self
            .nodes
            .iter()
            .filter_map(|n| {
                n.rm.as_ref()
                    .map(|rm| (rm.log_end_offset(), rm.high_watermark()))
            })
            .collect();
        let leader_end = self
            .ctrl
            .leader
            .and_then(|l| self.nodes[l as usize].rm.as_ref())
            .map(|rm| rm.log_end_offset());
        if views
            .iter()
            .any(|(leo, hw)| Some(*leo) != leader_end || hw != leo)
        {
            return Err(format!(
                "replicas did not converge after the faults stopped: (leo, hw) {views:?}, leader end {leader_end:?}"
            ));
        }
        Ok(())
    }
}
