//! The invariants, checked after every simulated step:
//! - an acks=all-acknowledged record stays at its offset on every leader;
//! - replicas agree (epoch and CRC) below the smaller of their HWs, and
//!   data below a high watermark that was ever seen never changes;
//! - a leader's HW never goes back, and a stale leader never advances it;
//! - at most one replica appends as leader in an epoch, epochs never
//!   decrease along a log, and each election raises the epoch;
//! - retention deletes only committed data (below the highest HW a
//!   leader reached); below a replica's log start nothing is compared.

use std::collections::BTreeMap;

use bytes::Bytes;
use replicator_plugin_sdk::batches;

use super::cluster::Sim;
use super::storage::SimLog;

#[derive(Default)]
pub struct Checker {
    /// offset -> (epoch, crc) of acks=all-acknowledged records.
    acked: BTreeMap<u64, (u32, u32)>,
    /// offset -> (epoch, crc) below the highest HW any leader reached.
    committed: BTreeMap<u64, (u32, u32)>,
    max_hw: u64,
    /// Per node: offsets already compared with `committed`.
    verified: BTreeMap<u32, u64>,
    appender: BTreeMap<u32, u32>,
    last_epoch: u32,
    checked_epoch: u32,
    leader_hw: BTreeMap<(u32, u32), u64>,
    violations: Vec<String>,
}

impl Checker {
    pub fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    pub fn on_elect(&mut self, leader: u32, epoch: u32) {
        if epoch <= self.last_epoch {
            self.violations.push(format!(
                "election of {leader} did not raise the epoch ({epoch} after {})",
                self.last_epoch
            ));
        }
        self.last_epoch = epoch;
    }

    /// An acks=all write was acknowledged by `leader`, whose HW is `hw`.
    pub fn on_ack(&mut self, leader: u32, offset: u64, hw: u64, entry: Option<(u32, u32)>) {
        if hw <= offset {
            self.violations.push(format!(
                "leader {leader} acknowledged offset {offset} with its HW at {hw}"
            ));
        }
        let Some(entry) = entry else {
            self.violations.push(format!(
                "leader {leader} acknowledged offset {offset} it does not hold"
            ));
            return;
        };
        if let Some(prev) = self.acked.insert(offset, entry)
            && prev != entry
        {
            self.violations.push(format!(
                "offset {offset} acknowledged twice with different records"
            ));
        }
    }

    pub fn on_truncate(&mut self, node: u32, new_end: u64) {
        if let Some(v) = self.verified.get_mut(&node) {
            *v = (*v).min(new_end);
        }
    }

    /// A replica's retention deleted everything below `offset`. `own_hw`
    /// is its HW if it is the acting leader: that HW may have moved in
    /// this very step, before `check` saw it.
    pub fn on_delete_prefix(&mut self, node: u32, offset: u64, own_hw: Option<u64>) {
        let committed = self.max_hw.max(own_hw.unwrap_or(0));
        if offset > committed {
            self.violations.push(format!(
                "node {node} deleted up to {offset}, past anything committed (highest HW {committed})"
            ));
        }
    }

    pub fn on_append(&mut self, node: u32, as_leader: bool, bytes: &Bytes, log: &SimLog) {
        let mut last = log.batches.last().map(|b| b.2);
        for b in batches(bytes, true) {
            let Ok((h, _)) = b else {
                self.violations
                    .push(format!("node {node} appended a malformed batch"));
                return;
            };
            if last.is_some_and(|e| h.leader_epoch < e) {
                self.violations.push(format!(
                    "node {node}: epoch {} after {:?} along its log",
                    h.leader_epoch, last
                ));
            }
            last = Some(h.leader_epoch);
            if as_leader {
                let who = *self.appender.entry(h.leader_epoch).or_insert(node);
                if who != node {
                    self.violations.push(format!(
                        "nodes {who} and {node} both appended as leader in epoch {}",
                        h.leader_epoch
                    ));
                }
            }
        }
    }

    pub fn check(sim: &mut Sim) -> Result<(), String> {
        let c = &mut sim.checker;
        if let Some(v) = c.violations.first() {
            return Err(v.clone());
        }
        let ctrl_epoch = sim.ctrl.epoch;
        // The acting leader (alive, leading, current epoch).
        let leader = sim.ctrl.leader.filter(|l| {
            let n = &sim.nodes[*l as usize];
            n.alive
                && n.rm
                    .as_ref()
                    .is_some_and(|rm| rm.is_leader() && rm.leader_epoch() == Some(ctrl_epoch))
        });
        for (i, node) in sim.nodes.iter().enumerate() {
            let Some(rm) = node.rm.as_ref().filter(|_| node.alive) else {
                continue;
            };
            if !rm.is_leader() {
                continue;
            }
            let epoch = rm.leader_epoch().unwrap_or(0);
            let hw = rm.high_watermark();
            let prev = c.leader_hw.insert((i as u32, epoch), hw).unwrap_or(hw);
            if hw < prev {
                return Err(format!(
                    "leader {i} HW went back from {prev} to {hw} in epoch {epoch}"
                ));
            }
            if epoch < ctrl_epoch && hw > prev {
                return Err(format!(
                    "stale leader {i} (epoch {epoch} < {ctrl_epoch}) advanced its HW to {hw}"
                ));
            }
        }
        let Some(l) = leader else { return Ok(()) };
        let lnode = &sim.nodes[l as usize];
        let Some(lrm) = lnode.rm.as_ref() else {
            return Ok(());
        };
        // Acknowledged records on the leader: fully after each election,
        // else the newest ones.
        let full = c.checked_epoch != ctrl_epoch;
        c.checked_epoch = ctrl_epoch;
        let acked: Box<dyn Iterator<Item = (&u64, &(u32, u32))>> = if full {
            Box::new(c.acked.iter())
        } else {
            Box::new(c.acked.iter().rev().take(3))
        };
        for (off, entry) in acked {
            if *off < lnode.log.log_start {
                continue; // retention's
            }
            match lnode.log.entry_at(*off) {
                Some(e) if e == *entry => {}
                other => {
                    return Err(format!(
                        "acknowledged offset {off} {entry:?} lost on leader {l} (epoch {ctrl_epoch}): it holds {other:?}, log end {}",
                        lnode.log.log_end()
                    ));
                }
            }
        }
        // Extend the committed prefix from the leader, checking overlap.
        let hw = lrm.high_watermark();
        for off in c.max_hw.min(hw).max(lnode.log.log_start)..hw {
            let Some(e) = lnode.log.entry_at(off) else {
                return Err(format!("leader {l} HW {hw} is past its data at {off}"));
            };
            if let Some(prev) = c.committed.insert(off, e)
                && prev != e
            {
                return Err(format!(
                    "committed offset {off} changed from {prev:?} to {e:?} on leader {l}"
                ));
            }
        }
        c.max_hw = c.max_hw.max(hw);
        // Every replica agrees with the committed prefix below its HW.
        for (i, node) in sim.nodes.iter().enumerate() {
            let Some(rm) = node.rm.as_ref().filter(|_| node.alive) else {
                continue;
            };
            let upto = rm.high_watermark().min(c.max_hw);
            let from = (*c.verified.get(&(i as u32)).unwrap_or(&0)).max(node.log.log_start);
            for off in from..upto {
                let mine = node.log.entry_at(off);
                if let Some(want) = c.committed.get(&off)
                    && mine.as_ref() != Some(want)
                {
                    return Err(format!(
                        "replica {i} holds {mine:?} at committed offset {off}, not {want:?}"
                    ));
                }
            }
            c.verified.insert(i as u32, upto.max(from));
        }
        Ok(())
    }
}
