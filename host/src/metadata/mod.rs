//! The metadata contract as the node runtime uses it: versioned partition
//! state with compare-and-set (the way Kafka's controller updates leader
//! and ISR, KIP-497/841) and broker registration with broker epochs
//! (KIP-380/903). Implemented by metadata plugins (`wit/metadata.wit`)
//! through [`crate::plugin::MetadataPlugin`].

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::core::ReplicaId;

// The form of a cluster id (1 to 64 characters of `[A-Za-z0-9_-]`), shared
// with the metadata plugins.
pub use replicator_plugin_sdk::cluster_id::check_cluster_id;

/// The replicated state of one partition, as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    pub topic: String,
    pub partition: u32,
    /// Current leader; `None` while no replica may lead.
    pub leader: Option<ReplicaId>,
    pub leader_epoch: u32,
    /// In-sync replicas, leader included.
    pub isr: Vec<ReplicaId>,
    /// Eligible leader replicas (KIP-966): members that left the ISR while
    /// it had fewer than min.insync members. Each holds every committed
    /// record, since the HW cannot advance while the ISR is that small, so
    /// one may lead when no in-sync replica is left. See
    /// [`PartitionState::with_isr`].
    #[serde(default)]
    pub elr: Vec<ReplicaId>,
    /// Assigned replicas; their count is the replication factor.
    pub replicas: Vec<ReplicaId>,
    /// min.insync.replicas for acks=all on this partition (the topic's
    /// setting); 0 means the node's `[replication]` default.
    #[serde(default)]
    pub min_insync: u32,
    /// Bumped by every accepted update; 0 means "not created yet".
    pub version: u64,
}

impl PartitionState {
    /// Name no leader, ISR or ELR: none of them is known to hold every
    /// acknowledged write (the record is older than a log, so the store
    /// went back; see `node::restamp`). An unclean election that asks
    /// every live log which is most up to date picks the next leader.
    pub fn forget_holders(&mut self) {
        self.leader = None;
        self.isr.clear();
        self.elr.clear();
    }

    /// The partition's min.insync.replicas: its own, else the node's
    /// default (`default`), at least 1.
    pub fn effective_min_insync(&self, default: u32) -> usize {
        let n = if self.min_insync == 0 {
            default
        } else {
            self.min_insync
        };
        n.max(1) as usize
    }

    /// This state with its ISR changed to `isr`, and its ELR kept true
    /// (KIP-966). Every change of the ISR goes through here.
    ///
    /// - A member that leaves the ISR while the ISR ends up below
    ///   min.insync joins the ELR, if `leavers_eligible`: it held every
    ///   committed record, and the HW cannot advance again until the ISR
    ///   has min.insync members, so it still does. A member leaving because
    ///   its log may have lost records (a restart) is not eligible.
    /// - A replica back in the ISR leaves the ELR.
    /// - Once the ISR has min.insync members the ELR is emptied: the HW may
    ///   now advance past what its members hold.
    ///
    /// The ELR keeps assignment order, so deciders that start from the same
    /// state propose the same one.
    pub fn with_isr(
        &self,
        isr: Vec<ReplicaId>,
        default_min_insync: u32,
        leavers_eligible: bool,
    ) -> PartitionState {
        let min = self.effective_min_insync(default_min_insync);
        let elr = if isr.len() >= min {
            Vec::new()
        } else {
            self.replicas
                .iter()
                .copied()
                .filter(|r| {
                    !isr.contains(r)
                        && (self.elr.contains(r) || (leavers_eligible && self.isr.contains(r)))
                })
                .collect()
        };
        PartitionState {
            isr,
            elr,
            ..self.clone()
        }
    }

    /// What giving up a restarted replica's old claims on a partition writes,
    /// if anything: `me` restarted (or its log was recovered), and `intact`
    /// says whether its log still holds all it held before.
    ///
    /// - Leading, with other ISR members: leadership moves to the first of
    ///   them under the next epoch, and `me` leaves the ISR (it re-enters once
    ///   caught up, under its new broker epoch). Likewise a follower in the ISR
    ///   leaves it. Either way `me` joins the ELR when the ISR falls below
    ///   min.insync, but only if intact.
    /// - Leading as the only ISR member: if intact, it leads again under the
    ///   next epoch (nothing was lost). If not, it may not lead: its log may
    ///   lack acknowledged writes, which the ELR's members hold (KIP-966). The
    ///   partition is left without a leader, ISR or claim of `me`'s, and the
    ///   failover coordinator elects a live ELR member; with none, only unclean
    ///   election can make it available again, as in Kafka. (A partition
    ///   with no other replica leads again: nobody could hold more.)
    /// - A sole ISR member that does not lead (the leader field was cleared)
    ///   does the same, unless intact.
    /// - Outside the ISR: it leaves the ELR unless intact.
    pub fn after_restart(
        &self,
        me: ReplicaId,
        intact: bool,
        default_min_insync: u32,
    ) -> Option<PartitionState> {
        let others: Vec<ReplicaId> = self.isr.iter().copied().filter(|r| *r != me).collect();
        let in_isr = others.len() < self.isr.len();
        let leading = self.leader == Some(me);
        let next_epoch = self.leader_epoch + 1;
        if !in_isr && !leading {
            return (!intact && self.elr.contains(&me)).then(|| self.without_eligible(me));
        }
        if let Some(&l) = others.first() {
            let next = self.with_isr(others, default_min_insync, intact);
            return Some(if leading {
                PartitionState {
                    leader: Some(l),
                    leader_epoch: next_epoch,
                    ..next
                }
            } else {
                next
            });
        }
        // The only replica of the partition: nobody can hold more, and
        // waiting would only keep it unavailable.
        let alone = self.replicas == [me];
        match (intact || alone, leading) {
            (true, true) => Some(PartitionState {
                leader_epoch: next_epoch,
                ..self.clone()
            }),
            (true, false) => None,
            (false, _) => Some(PartitionState {
                leader: None,
                leader_epoch: next_epoch,
                ..self.with_isr(Vec::new(), default_min_insync, false)
            }),
        }
    }

    /// Partition t/0 on replicas 1-3, leader epoch 4, min.insync 2,
    /// version 9: the tests' common fixture.
    #[cfg(test)]
    pub(crate) fn sample(leader: Option<ReplicaId>, isr: &[ReplicaId], elr: &[ReplicaId]) -> Self {
        PartitionState {
            topic: "t".into(),
            partition: 0,
            leader,
            leader_epoch: 4,
            isr: isr.to_vec(),
            elr: elr.to_vec(),
            replicas: vec![1, 2, 3],
            min_insync: 2,
            version: 9,
        }
    }

    /// This state without `replica` in its ELR (its log may have lost
    /// records it held).
    pub fn without_eligible(&self, replica: ReplicaId) -> PartitionState {
        PartitionState {
            elr: self.elr.iter().copied().filter(|r| *r != replica).collect(),
            ..self.clone()
        }
    }
}

/// A registered broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broker {
    pub id: ReplicaId,
    /// `host:port` of the broker's QUIC endpoint.
    pub address: String,
    /// Assigned by the store at registration, increasing per broker: a
    /// restarted broker gets a new one, which fences its old incarnation.
    pub epoch: u64,
}

/// Expected failures of a metadata store, and plugin faults.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("not found: {0}")]
    NotFound(String),
    /// A compare-and-set lost: the stored version was not the expected one.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("metadata store I/O error: {0}")]
    Io(String),
    #[error("metadata store data is corrupt: {0}")]
    Corrupt(String),
    #[error("metadata store error: {0}")]
    Other(String),
    /// The plugin trapped, ran past its deadline or broke the contract.
    #[error("metadata plugin fault: {0}")]
    Fault(String),
}

/// Whether `t` is a topic name: Kafka's `[A-Za-z0-9._-]`, 1 to
/// `MAX_TOPIC_LEN` characters, not `.` or `..`. Partition directories are
/// named after topics, so a name from anywhere else (a metadata plugin
/// included) is checked against this before it is used.
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= crate::core::MAX_TOPIC_LEN
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One partition's record as [`MetadataStore::read_partitions`] found it:
/// its state, or why it cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRead {
    pub topic: String,
    pub partition: u32,
    pub state: Result<PartitionState, MetadataError>,
}

pub type MetaFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, MetadataError>> + Send + 'a>>;

/// A connection to the metadata store. Calls may be issued concurrently.
pub trait MetadataStore: Send + Sync {
    /// The state of one partition, or [`MetadataError::NotFound`].
    fn get_partition<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
    ) -> MetaFuture<'a, PartitionState>;

    /// Store `state` if the stored version is `expected_version` (0: the
    /// partition must not exist yet). Returns the new version. Exactly one
    /// of several concurrent writers with the same expected version wins;
    /// the others get [`MetadataError::Conflict`].
    fn compare_and_set(&self, state: PartitionState, expected_version: u64) -> MetaFuture<'_, u64>;

    /// Every partition the store knows, as (topic, partition).
    fn list_partitions(&self) -> MetaFuture<'_, Vec<(String, u32)>>;

    /// Every partition's record, sorted: what [`Self::list_partitions`]
    /// and then [`Self::get_partition`] on each would give (partitions gone
    /// meanwhile left out), which is what this default does. A record's
    /// own error is its entry's (one bad record hides no other); an error
    /// of the store (down, failing) fails the call. A store that can read
    /// them all in fewer calls does so: each node reads this every
    /// `metadata_poll_ms`.
    fn read_partitions(&self) -> MetaFuture<'_, Vec<PartitionRead>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for (topic, partition) in self.list_partitions().await? {
                let state = match self.get_partition(&topic, partition).await {
                    Err(MetadataError::NotFound(_)) => continue,
                    Err(e) if !matches!(e, MetadataError::Corrupt(_)) => return Err(e),
                    read => read,
                };
                out.push(PartitionRead {
                    topic,
                    partition,
                    state,
                });
            }
            Ok(out)
        })
    }

    /// Register (or re-register after a restart) a broker. Returns the
    /// broker epoch the store assigned, greater than any earlier one for
    /// this id.
    fn register_broker(&self, id: ReplicaId, address: String) -> MetaFuture<'_, u64>;

    fn list_brokers(&self) -> MetaFuture<'_, Vec<Broker>>;

    /// The cluster the store belongs to: stores `id` if it holds none yet,
    /// and returns the one it holds (the first claimant's, never changed
    /// afterwards). See [`check_cluster_id`] for the form of an id.
    fn claim_cluster_id(&self, id: String) -> MetaFuture<'_, String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a min.insync of its own: the node's default counts.
    fn state(isr: &[u32], elr: &[u32]) -> PartitionState {
        PartitionState {
            min_insync: 0,
            ..PartitionState::sample(Some(1), isr, elr)
        }
    }

    #[test]
    fn members_leaving_while_the_isr_is_at_min_insync_or_more_are_not_eligible() {
        // min.insync 2: {1, 2} is still enough, so the HW may go on
        // advancing without 3, and 3 would not hold what it commits.
        let s = state(&[1, 2, 3], &[]).with_isr(vec![1, 2], 2, true);
        assert_eq!((s.isr, s.elr), (vec![1, 2], vec![]));
    }

    #[test]
    fn members_leaving_an_isr_below_min_insync_become_eligible() {
        let s = state(&[1, 2], &[]).with_isr(vec![1], 2, true);
        assert_eq!(s.elr, vec![2]);
        // The last member going keeps both eligible, in assignment order.
        let s = state(&[2], &[3]).with_isr(vec![], 2, true);
        assert_eq!(s.elr, vec![2, 3]);
        // A partition's own min.insync wins over the node's default.
        let mut own = state(&[1, 2, 3], &[]);
        own.min_insync = 3;
        assert_eq!(own.with_isr(vec![1, 2], 2, true).elr, vec![3]);
    }

    #[test]
    fn a_member_whose_log_may_have_lost_records_is_not_eligible() {
        let s = state(&[1, 2], &[3]).with_isr(vec![1], 2, false);
        assert_eq!(s.elr, vec![3], "3 stays, 2 does not join");
        assert_eq!(state(&[1], &[2, 3]).without_eligible(2).elr, vec![3]);
    }

    #[test]
    fn rejoining_the_isr_leaves_the_elr_and_a_full_isr_empties_it() {
        let s = state(&[1], &[2, 3]).with_isr(vec![1, 2], 3, true);
        assert_eq!((s.isr, s.elr), (vec![1, 2], vec![3]));
        let s = state(&[1], &[2, 3]).with_isr(vec![1, 2], 2, true);
        assert_eq!(s.elr, Vec::<u32>::new());
    }
}
