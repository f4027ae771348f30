//! Replication metrics: per-partition counters and gauges the driver
//! refreshes from each replica, and the collector that sums them up (the
//! reference API's `MetricsCollector`, `PartitionMetrics`,
//! `GlobalReplicationMetrics` and their snapshots).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::replica::ReplicationManager;

/// Gauges and counters of one partition replica; lock-free to update.
#[derive(Debug, Default)]
pub struct PartitionMetrics {
    pub topic: String,
    pub partition: u32,
    pub is_leader: AtomicBool,
    pub log_start_offset: AtomicU64,
    pub log_end_offset: AtomicU64,
    pub high_watermark: AtomicU64,
    /// Leader: the largest follower lag; follower: not tracked here.
    pub replication_lag_messages: AtomicU64,
    pub fetch_request_count: AtomicU64,
    pub fetch_bytes_total: AtomicU64,
    pub fetch_error_count: AtomicU64,
    pub isr_size: AtomicU32,
    pub replica_count: AtomicU32,
    pub isr_shrink_count: AtomicU64,
    pub isr_expand_count: AtomicU64,
    /// Log-start moves made by retention (`retention_bytes`).
    pub retention_deletions: AtomicU64,
    pub failovers: AtomicU64,
    /// Storage faults of this replica's log (a full disk, an I/O error, a
    /// trapped plugin): each stepped it down to recover.
    pub storage_faults: AtomicU64,
    /// Recovering its log after a storage fault (not serving).
    pub recovering: AtomicBool,
}

/// A copy of [`PartitionMetrics`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionMetricsSnapshot {
    pub topic: String,
    pub partition: u32,
    pub is_leader: bool,
    pub log_start_offset: u64,
    pub log_end_offset: u64,
    pub high_watermark: u64,
    pub replication_lag_messages: u64,
    pub fetch_request_count: u64,
    pub fetch_bytes_total: u64,
    pub fetch_error_count: u64,
    pub isr_size: u32,
    pub replica_count: u32,
    pub isr_shrink_count: u64,
    pub isr_expand_count: u64,
    pub retention_deletions: u64,
    pub failovers: u64,
    pub under_replicated: bool,
    pub storage_faults: u64,
    pub recovering: bool,
}

impl PartitionMetrics {
    pub fn new(topic: &str, partition: u32) -> Self {
        PartitionMetrics {
            topic: topic.to_string(),
            partition,
            ..Default::default()
        }
    }

    /// Refresh from the replica's current state and counters.
    pub fn update_from(&self, rm: &ReplicationManager) {
        let state = rm.state();
        let c = rm.counters();
        self.is_leader.store(rm.is_leader(), Relaxed);
        self.log_start_offset.store(rm.log_start_offset(), Relaxed);
        self.log_end_offset.store(state.log_end_offset, Relaxed);
        self.high_watermark.store(state.high_watermark, Relaxed);
        let lag = state
            .replica_states
            .values()
            .map(|r| r.fetch_lag)
            .max()
            .unwrap_or(0);
        self.replication_lag_messages.store(lag, Relaxed);
        self.fetch_request_count.store(c.fetch_requests, Relaxed);
        self.fetch_bytes_total.store(c.fetch_bytes, Relaxed);
        self.fetch_error_count.store(c.fetch_errors, Relaxed);
        self.isr_size.store(state.isr.len() as u32, Relaxed);
        self.replica_count
            .store(state.replicas.len() as u32, Relaxed);
        self.isr_shrink_count.store(c.isr_shrinks, Relaxed);
        self.isr_expand_count.store(c.isr_expands, Relaxed);
        self.retention_deletions
            .store(c.retention_deletions, Relaxed);
    }

    /// Count a storage fault; the replica recovers until
    /// [`recovered`](Self::recovered).
    pub fn record_storage_fault(&self) {
        self.storage_faults.fetch_add(1, Relaxed);
        self.recovering.store(true, Relaxed);
    }

    pub fn recovered(&self) {
        self.recovering.store(false, Relaxed);
    }

    /// Count a leader change of this partition.
    pub fn record_failover(&self) {
        self.failovers.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> PartitionMetricsSnapshot {
        let is_leader = self.is_leader.load(Relaxed);
        let isr_size = self.isr_size.load(Relaxed);
        let replica_count = self.replica_count.load(Relaxed);
        PartitionMetricsSnapshot {
            topic: self.topic.clone(),
            partition: self.partition,
            is_leader,
            log_start_offset: self.log_start_offset.load(Relaxed),
            log_end_offset: self.log_end_offset.load(Relaxed),
            high_watermark: self.high_watermark.load(Relaxed),
            replication_lag_messages: self.replication_lag_messages.load(Relaxed),
            fetch_request_count: self.fetch_request_count.load(Relaxed),
            fetch_bytes_total: self.fetch_bytes_total.load(Relaxed),
            fetch_error_count: self.fetch_error_count.load(Relaxed),
            isr_size,
            replica_count,
            isr_shrink_count: self.isr_shrink_count.load(Relaxed),
            isr_expand_count: self.isr_expand_count.load(Relaxed),
            retention_deletions: self.retention_deletions.load(Relaxed),
            failovers: self.failovers.load(Relaxed),
            under_replicated: is_leader && isr_size < replica_count,
            storage_faults: self.storage_faults.load(Relaxed),
            recovering: self.recovering.load(Relaxed),
        }
    }
}

/// Totals over every partition of a broker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GlobalMetricsSnapshot {
    pub total_partitions: u32,
    pub leader_partitions: u32,
    pub follower_partitions: u32,
    pub max_replication_lag_messages: u64,
    pub avg_replication_lag_messages: u64,
    pub total_fetch_requests: u64,
    pub total_fetch_bytes: u64,
    pub total_fetch_errors: u64,
    pub total_isr_shrinks: u64,
    pub total_isr_expands: u64,
    /// Led partitions whose ISR is smaller than their replica set.
    pub partitions_under_replicated: u32,
    pub total_failovers: u64,
}

/// The registry of partition metrics on one broker.
#[derive(Debug, Default)]
pub struct MetricsCollector {
    partitions: Mutex<BTreeMap<(String, u32), Arc<PartitionMetrics>>>,
}

impl MetricsCollector {
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u32), Arc<PartitionMetrics>>> {
        // A panic elsewhere while holding the lock leaves plain counters
        // behind: still safe to read and update.
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The metrics of a partition, created on first registration.
    pub fn register_partition(&self, topic: &str, partition: u32) -> Arc<PartitionMetrics> {
        self.map()
            .entry((topic.to_string(), partition))
            .or_insert_with(|| Arc::new(PartitionMetrics::new(topic, partition)))
            .clone()
    }

    pub fn unregister_partition(&self, topic: &str, partition: u32) {
        self.map().remove(&(topic.to_string(), partition));
    }

    pub fn partition_metrics(&self, topic: &str, partition: u32) -> Option<Arc<PartitionMetrics>> {
        self.map().get(&(topic.to_string(), partition)).cloned()
    }

    pub fn all_partition_metrics(&self) -> Vec<Arc<PartitionMetrics>> {
        self.map().values().cloned().collect()
    }

    /// Sum every partition up now.
    pub fn global_snapshot(&self) -> GlobalMetricsSnapshot {
        let snaps: Vec<PartitionMetricsSnapshot> = self
            .all_partition_metrics()
            .iter()
            .map(|p| p.snapshot())
            .collect();
        let mut g = GlobalMetricsSnapshot {
            total_partitions: snaps.len() as u32,
            ..Default::default()
        };
        let mut lag_sum = 0u64;
        for s in &snaps {
            if s.is_leader {
                g.leader_partitions += 1;
            } else {
                g.follower_partitions += 1;
            }
            g.max_replication_lag_messages = g
                .max_replication_lag_messages
                .max(s.replication_lag_messages);
            lag_sum += s.replication_lag_messages;
            g.total_fetch_requests += s.fetch_request_count;
            g.total_fetch_bytes += s.fetch_bytes_total;
            g.total_fetch_errors += s.fetch_error_count;
            g.total_isr_shrinks += s.isr_shrink_count;
            g.total_isr_expands += s.isr_expand_count;
            g.partitions_under_replicated += u32::from(s.under_replicated);
            g.total_failovers += s.failovers;
        }
        if !snaps.is_empty() {
            g.avg_replication_lag_messages = lag_sum / snaps.len() as u64;
        }
        g
    }
}
