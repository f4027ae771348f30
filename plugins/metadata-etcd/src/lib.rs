//! Metadata plugin that keeps versioned partition state and broker
//! registrations in etcd v3, spoken to over its JSON gateway (`/v3/kv/...`)
//! with wasi:http outgoing requests. The host lets the requests through
//! only to the authorities in its sandbox's allow-list.
//!
//! Config (the WIT `config` list):
//! - `endpoints` (required): comma-separated `http://host:port`, tried in
//!   order; a connection error moves on to the next one.
//! - `prefix` (default `/replicator/`): prefix of every key, so several
//!   clusters can share one etcd.
//! - `timeout_ms` (default 2000): per HTTP request, for connecting, for
//!   the first byte of the answer and between its bytes. A down or
//!   unreachable etcd is reported as `unavailable` once it runs out.
//!
//! `connect` checks the config and does not touch the network, so a node
//! can start its connection while etcd is down; every call then reports
//! `unavailable` until etcd answers again, on the same connection.
//!
//! Leases are not used, on purpose: nothing in the metadata contract
//! expires. Broker registrations must outlive their broker, since the next
//! epoch of a restarted broker is computed from the stored one (a key
//! deleted by an expired lease would restart epochs at 1 and un-fence old
//! incarnations), and partition states live until deleted. Liveness is
//! the failover layer's business (heartbeats), and a plugin instance only
//! runs during calls, so it could not keep a lease alive anyway.
//!
//! See `store.rs` for the key layout and how compare-and-set is made
//! atomic, `etcd.rs` for the gateway client.

mod etcd;
mod http;
mod store;

use std::time::Duration;

wit_bindgen::generate!({ world: "metadata-plugin", path: "../../wit" });

use exports::replicator::plugin::metadata::{
    Broker, Client, Guest, GuestClient, PartitionPage, PartitionRead, PartitionState,
    TopicPartition,
};
use replicator::plugin::types::PluginError;

const DEFAULT_PREFIX: &str = "/replicator/";
const DEFAULT_TIMEOUT_MS: u64 = 2000;
/// Longest per-request timeout accepted: the host's call deadline is
/// seconds, a longer one could only end in a fault.
const MAX_TIMEOUT_MS: u64 = 60_000;
/// Most keys one page of `read-partitions` may ask etcd for.
const MAX_PAGE: u32 = 10_000;

struct Plugin;

impl Guest for Plugin {
    type Client = EtcdClient;
}

struct EtcdClient(store::Store);

fn map(e: store::Error) -> PluginError {
    match e {
        store::Error::NotFound(m) => PluginError::NotFound(m),
        store::Error::Conflict(m) => PluginError::Conflict(m),
        store::Error::Invalid(m) => PluginError::InvalidInput(m),
        store::Error::Unavailable(m) => PluginError::Unavailable(m),
        store::Error::Corrupt(m) => PluginError::Corrupt(m),
        store::Error::Other(m) => PluginError::Other(m),
    }
}

/// `http://host:port` (a trailing `/` allowed) as `host:port`.
fn parse_endpoint(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.starts_with("https://") {
        return Err(format!(
            "endpoint `{s}`: https is not supported (no TLS to etcd yet); use http://"
        ));
    }
    let Some(rest) = s.strip_prefix("http://") else {
        return Err(format!("endpoint `{s}` must look like http://host:port"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let port = authority
        .rsplit_once(':')
        .map(|(h, p)| (h, p.parse::<u16>()));
    match port {
        Some((host, Ok(p)))
            if p != 0 && !host.is_empty() && !authority.contains(['/', '?', '#', '@']) =>
        {
            Ok(authority.to_string())
        }
        _ => Err(format!(
            "endpoint `{s}` must look like http://host:port, with a port and no path"
        )),
    }
}

/// The store a `config` list describes.
fn open(config: &[(String, String)]) -> Result<store::Store, String> {
    let mut endpoints = None;
    let mut prefix = DEFAULT_PREFIX.to_string();
    let mut timeout_ms = DEFAULT_TIMEOUT_MS;
    let mut page = store::PAGE;
    for (k, v) in config {
        match k.as_str() {
            "endpoints" => {
                let list = v
                    .split(',')
                    .filter(|e| !e.trim().is_empty())
                    .map(parse_endpoint)
                    .collect::<Result<Vec<_>, _>>()?;
                endpoints = Some(list);
            }
            "prefix" => {
                if v.is_empty() || v.chars().any(char::is_control) {
                    return Err(format!(
                        "prefix `{}` must be non-empty, without control characters",
                        v.escape_debug()
                    ));
                }
                prefix = v.clone();
            }
            "timeout_ms" => {
                timeout_ms = match v.parse::<u64>() {
                    Ok(t) if (1..=MAX_TIMEOUT_MS).contains(&t) => t,
                    _ => {
                        return Err(format!(
                            "timeout_ms `{v}` must be a number of milliseconds from 1 to {MAX_TIMEOUT_MS}"
                        ));
                    }
                }
            }
            "page_size" => {
                page = match v.parse::<u32>() {
                    Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
                    _ => {
                        return Err(format!(
                            "page_size `{v}` must be a number of keys from 1 to {MAX_PAGE}"
                        ));
                    }
                }
            }
            other => {
                return Err(format!(
                    "unknown setting `{other}`; known: endpoints, prefix, timeout_ms, page_size"
                ));
            }
        }
    }
    let endpoints = match endpoints {
        Some(e) if !e.is_empty() => e,
        _ => {
            return Err("`endpoints` is required: comma-separated http://host:port of etcd".into());
        }
    };
    let gateway = etcd::Gateway::new(endpoints, Duration::from_millis(timeout_ms));
    Ok(store::Store::new(gateway, prefix, page))
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

impl GuestClient for EtcdClient {
    fn connect(config: Vec<(String, String)>) -> Result<Client, PluginError> {
        let store = open(&config).map_err(PluginError::InvalidInput)?;
        Ok(Client::new(EtcdClient(store)))
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
