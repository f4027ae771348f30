//! Metadata plugin that keeps versioned partition state and broker
//! registrations in a directory several node processes share (each runs
//! its own instance with the same host directory preopened at `/data`).
//! See `store.rs` for the layout and how compare-and-set stays atomic
//! across processes.

mod store;

wit_bindgen::generate!({ world: "metadata-plugin", path: "../../wit" });

use exports::replicator::plugin::metadata::{
    Broker, Client, Guest, GuestClient, PartitionPage, PartitionRead, PartitionState,
    TopicPartition,
};
use replicator::plugin::types::PluginError;

struct Plugin;

impl Guest for Plugin {
    type Client = FileClient;
}

struct FileClient(store::Store);

fn map(e: store::Error) -> PluginError {
    match e {
        store::Error::NotFound(m) => PluginError::NotFound(m),
        store::Error::Conflict(m) => PluginError::Conflict(m),
        store::Error::Invalid(m) => PluginError::InvalidInput(m),
        store::Error::Io(m) => PluginError::Io(m),
        store::Error::Corrupt(m) => PluginError::Corrupt(m),
    }
}

fn to_wit(s: store::Partition) -> PartitionState {
    PartitionState {
        topic: s.topic,
        partition: s.partition,
        leader: s.leader,
        leader_epoch: s.leader_epoch,
        isr: s.isr,
        elr: s.elr,
        replicas: s.replicas,
        min_insync: s.min_insync,
        version: s.version,
    }
}

impl GuestClient for FileClient {
    fn connect(config: Vec<(String, String)>) -> Result<Client, PluginError> {
        let store = store::Store::connect(&config).map_err(map)?;
        Ok(Client::new(FileClient(store)))
    }

    fn get_partition(&self, topic: String, partition: u32) -> Result<PartitionState, PluginError> {
        self.0
            .get_partition(&topic, partition)
            .map(to_wit)
            .map_err(map)
    }

    fn compare_and_set(
        &self,
        state: PartitionState,
        expected_version: u64,
    ) -> Result<u64, PluginError> {
        let s = store::Partition {
            topic: state.topic,
            partition: state.partition,
            leader: state.leader,
            leader_epoch: state.leader_epoch,
            isr: state.isr,
            elr: state.elr,
            replicas: state.replicas,
            min_insync: state.min_insync,
            version: state.version,
        };
        self.0.compare_and_set(s, expected_version).map_err(map)
    }

    fn list_partitions(&self) -> Result<Vec<TopicPartition>, PluginError> {
        let list = self.0.list_partitions().map_err(map)?;
        Ok(list
            .into_iter()
            .map(|(topic, partition)| TopicPartition { topic, partition })
            .collect())
    }

    fn read_partitions(&self, after: Option<String>) -> Result<PartitionPage, PluginError> {
        let (list, next) = self.0.read_partitions(after.as_deref()).map_err(map)?;
        Ok(PartitionPage {
            reads: list
                .into_iter()
                .map(|(topic, partition, state)| PartitionRead {
                    topic,
                    partition,
                    state: state.map(to_wit).map_err(map),
                })
                .collect(),
            next,
        })
    }

    fn register_broker(&self, broker: Broker) -> Result<u64, PluginError> {
        self.0
            .register_broker(broker.id, &broker.address)
            .map_err(map)
    }

    fn claim_cluster_id(&self, id: String) -> Result<String, PluginError> {
        self.0.claim_cluster_id(&id).map_err(map)
    }

    fn list_brokers(&self) -> Result<Vec<Broker>, PluginError> {
        let list = self.0.list_brokers().map_err(map)?;
        Ok(list
            .into_iter()
            .map(|b| Broker {
                id: b.id,
                address: b.address,
                epoch: b.epoch,
            })
            .collect())
    }
}

export!(Plugin);
