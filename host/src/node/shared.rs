//! What every task of a node shares: identity, plugins, metadata store,
//! settings, metrics, the clock and the fetch manager's inbox.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::{Notify, mpsc};

use crate::core::{Config, MetricsCollector, ReplicaId, TopicPartition};
use crate::metadata::MetadataStore;
use crate::plugin::StoragePlugin;

use super::fetch::FetchCmd;

pub struct Shared {
    pub node_id: ReplicaId,
    /// This incarnation's broker epoch, from registration.
    pub broker_epoch: u64,
    pub data_dir: PathBuf,
    pub storage: StoragePlugin,
    pub storage_config: Vec<(String, String)>,
    pub metadata: Arc<dyn MetadataStore>,
    pub replication: Config,
    pub metrics: MetricsCollector,
    /// Broker addresses as registered, refreshed by the metadata watcher.
    pub brokers: RwLock<HashMap<ReplicaId, SocketAddr>>,
    pub(super) fetch_tx: mpsc::UnboundedSender<FetchCmd>,
    /// Partitions this node led when it (or their log) restarted: their
    /// leadership must move to a new epoch before anyone leads again.
    pub(super) handoffs: Mutex<HashSet<TopicPartition>>,
    /// Wakes the metadata watcher now (topic created, hand-off wanted).
    pub(super) refresh: Notify,
    /// State machines built on this node (seeds correlation ids).
    pub(super) builds: std::sync::atomic::AtomicU64,
    start: Instant,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        node_id: ReplicaId,
        broker_epoch: u64,
        data_dir: PathBuf,
        storage: StoragePlugin,
        storage_config: Vec<(String, String)>,
        metadata: Arc<dyn MetadataStore>,
        replication: Config,
        fetch_tx: mpsc::UnboundedSender<FetchCmd>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            node_id,
            broker_epoch,
            data_dir,
            storage,
            storage_config,
            metadata,
            replication,
            metrics: MetricsCollector::new(),
            brokers: RwLock::new(HashMap::new()),
            fetch_tx,
            handoffs: Mutex::new(HashSet::new()),
            refresh: Notify::new(),
            builds: Default::default(),
            start: Instant::now(),
        })
    }

    /// The core's clock: milliseconds since the node started (monotonic).
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn fetch(&self, cmd: FetchCmd) {
        let _ = self.fetch_tx.send(cmd);
    }

    /// Ask the watcher to move `tp`'s leadership away from this
    /// incarnation (see [`super::handoff`]).
    pub fn request_handoff(&self, tp: TopicPartition) {
        if let Ok(mut h) = self.handoffs.lock() {
            h.insert(tp);
        }
        self.refresh.notify_one();
    }

    pub fn broker_addr(&self, id: ReplicaId) -> Option<SocketAddr> {
        self.brokers.read().ok()?.get(&id).copied()
    }
}
