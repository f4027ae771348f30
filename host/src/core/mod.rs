//! The replication core, sans-IO: state machines that take events and a
//! clock value and return actions (see [`ReplicationManager`]). Drivers
//! (the node runtime, the deterministic simulation) carry the actions
//! out. Nothing here does I/O or knows about tokio, quinn or wasmtime.

pub mod config;
pub mod epoch_cache;
pub mod failover;
pub mod fetcher;
pub mod metrics;
pub mod reconcile;
pub mod replica;
pub mod retention;
pub mod sequencer;
pub mod state;
pub mod types;

pub use config::{Config, ConfigError};
pub use epoch_cache::EpochCache;
pub use failover::{
    Decision, DecisionKind, FailoverCoordinator, FailoverMetrics, FailureDetector, ReplicaLog,
    describe_logs, most_up_to_date,
};
pub use fetcher::{Fetcher, MultiFetch, TopicPartition};
pub use metrics::{
    GlobalMetricsSnapshot, MetricsCollector, PartitionMetrics, PartitionMetricsSnapshot,
};
pub use replica::{Faults, ReplicaCounters, ReplicationManager, Role, RoleError};
pub use sequencer::{Sequence, Sequencer};
pub use state::{PartitionReplicationState, ReplicationState};
pub use types::{
    Acks, Action, DivergingEpoch, ErrorCode, FetchRequest, FetchResponse, MAX_LEADER_EPOCH,
    MAX_TOPIC_LEN, ProduceId, ReadSpec, Records, ReplicaId,
};
