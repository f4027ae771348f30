//! The metadata contract as the node runtime uses it: versioned partition
//! state with compare-and-set (the way Kafka's controller updates leader
//! and ISR, KIP-497/841) and broker registration with broker epochs
//! (KIP-380/903). Implemented by metadata plugins (`wit/metadata.wit`)
//! through [`crate::plugin::MetadataPlugin`].

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::core::ReplicaId;

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
    /// Assigned replicas; their count is the replication factor.
    pub replicas: Vec<ReplicaId>,
    /// min.insync.replicas for acks=all on this partition (the topic's
    /// setting); 0 means the node's `[replication]` default.
    #[serde(default)]
    pub min_insync: u32,
    /// Bumped by every accepted update; 0 means "not created yet".
    pub version: u64,
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

    /// Register (or re-register after a restart) a broker. Returns the
    /// broker epoch the store assigned, greater than any earlier one for
    /// this id.
    fn register_broker(&self, id: ReplicaId, address: String) -> MetaFuture<'_, u64>;

    fn list_brokers(&self) -> MetaFuture<'_, Vec<Broker>>;
}
