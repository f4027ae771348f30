//! Point-in-time views of a partition replica: the reference API's
//! `PartitionReplicationState` and per-replica `ReplicationState`.

use std::collections::BTreeMap;

use super::replica::Role;
use super::types::ReplicaId;

/// What the leader knows of one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationState {
    pub replica_id: ReplicaId,
    /// As of its last fetch; `None` before its first fetch in this epoch.
    pub log_end_offset: Option<u64>,
    pub last_fetch_ms: u64,
    pub last_caught_up_ms: u64,
    /// Messages behind the leader's log end.
    pub fetch_lag: u64,
    pub in_sync: bool,
}

/// A partition as one replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionReplicationState {
    pub replica_id: ReplicaId,
    pub role: Role,
    pub leader: Option<ReplicaId>,
    pub leader_epoch: Option<u32>,
    /// Leader only: the replica set and ISR.
    pub replicas: Vec<ReplicaId>,
    pub isr: Vec<ReplicaId>,
    /// Leader only: every follower's state.
    pub replica_states: BTreeMap<ReplicaId, ReplicationState>,
    pub high_watermark: u64,
    pub log_end_offset: u64,
    pub log_start_offset: u64,
}

impl PartitionReplicationState {
    /// Under-replicated: the ISR is smaller than the replica set (leader's
    /// view; RF is the replica count, not a constant).
    pub fn is_under_replicated(&self) -> bool {
        self.role == Role::Leader && self.isr.len() < self.replicas.len()
    }
}
