//! The metadata store on etcd: key layout, compare-and-set of partition
//! states and broker registration, and the checks of what is read back.
//!
//! ```text
//! <prefix>partitions/<topic>/<partition>   JSON partition state, with its version
//! <prefix>brokers/<id>                     JSON {id, address, epoch}
//! <prefix>cluster-id                       JSON {cluster_id}, written once
//! ```
//!
//! The contract's version is a counter inside the stored JSON (the host
//! requires exactly `expected + 1` back); etcd's revisions only make the
//! update atomic. A compare-and-set reads the key, checks the stored
//! version against the expected one, and writes the successor in a
//! transaction conditioned on the key being unchanged since the read (its
//! mod revision, or create revision 0 for a new partition). Of concurrent
//! writers that read the same revision, etcd applies exactly one
//! transaction; the others find the condition false and get `conflict`.
//! Broker registration is the same loop on the broker's key, retried on a
//! lost race, so every registration gets a distinct, larger epoch.

use replicator_plugin_sdk::cluster_id::check_cluster_id;
use serde::{Deserialize, Serialize};

use crate::etcd::{Error as EtcdError, Expect, Gateway, Kv};

/// Longest topic name, as in Kafka.
const MAX_TOPIC: usize = 249;
const MAX_ADDRESS: usize = 1024;
/// Attempts at registering a broker while other registrations of the same
/// id keep winning the race.
const ATTEMPTS: usize = 64;

#[derive(Debug)]
pub enum Error {
    NotFound(String),
    Conflict(String),
    Invalid(String),
    Unavailable(String),
    Corrupt(String),
    Other(String),
}

type Result<T> = std::result::Result<T, Error>;

/// A page of `read-partitions`: each partition's state or why it cannot be
/// read, and where the next page starts (none after the last).
pub type Page = (Vec<(String, u32, Result<Partition>)>, Option<String>);

/// Keys per page of `read-partitions` by default: one range request
/// each, some 300 KB of records, well within a call's deadline.
pub const PAGE: u32 = 1000;

impl From<EtcdError> for Error {
    fn from(e: EtcdError) -> Self {
        match e {
            EtcdError::Unavailable(m) => Error::Unavailable(m),
            EtcdError::Denied(m) | EtcdError::Endpoints(m) => Error::Other(m),
            EtcdError::Etcd(m) => Error::Other(format!("etcd refused the request: {m}")),
            EtcdError::Malformed(m) => Error::Other(format!("malformed answer from etcd: {m}")),
        }
    }
}

/// The replicated state of one partition, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub topic: String,
    pub partition: u32,
    pub leader: Option<u32>,
    pub leader_epoch: u32,
    pub isr: Vec<u32>,
    /// Eligible leader replicas (KIP-966). Absent in data from before
    /// the field.
    #[serde(default)]
    pub elr: Vec<u32>,
    pub replicas: Vec<u32>,
    #[serde(default)]
    pub min_insync: u32,
    pub version: u64,
}

/// One broker registration, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broker {
    pub id: u32,
    pub address: String,
    pub epoch: u64,
}

// The input rules are the file metadata plugin's (plugins/metadata-file),
// so both backends accept and refuse the same states.

/// The stored cluster id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ClusterId {
    cluster_id: String,
}

pub fn check_topic(topic: &str) -> std::result::Result<(), String> {
    if topic.is_empty() {
        return Err("topic name is empty".into());
    }
    if topic.len() > MAX_TOPIC {
        return Err(format!(
            "topic name is {} characters long, at most {MAX_TOPIC} are allowed",
            topic.len()
        ));
    }
    if topic == "." || topic == ".." {
        return Err(format!("topic name `{topic}` is not allowed"));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name `{}` has `{}`; allowed are ASCII letters, digits, `.`, `_` and `-`",
            topic.escape_debug(),
            c.escape_debug()
        ));
    }
    Ok(())
}

fn duplicate(list: &[u32]) -> Option<u32> {
    list.iter()
        .enumerate()
        .find(|(i, x)| list[..*i].contains(x))
        .map(|(_, x)| *x)
}

/// The invariants of a partition state (the version aside).
pub fn check_state(s: &Partition) -> std::result::Result<(), String> {
    check_topic(&s.topic)?;
    let tp = format!("{}/{}", s.topic, s.partition);
    if s.replicas.is_empty() {
        return Err(format!("{tp}: replicas are empty"));
    }
    if let Some(d) = duplicate(&s.replicas) {
        return Err(format!("{tp}: replica {d} is listed twice in replicas"));
    }
    if let Some(d) = duplicate(&s.isr) {
        return Err(format!("{tp}: replica {d} is listed twice in the isr"));
    }
    if let Some(r) = s.isr.iter().find(|r| !s.replicas.contains(r)) {
        return Err(format!(
            "{tp}: isr member {r} is not one of the replicas {:?}",
            s.replicas
        ));
    }
    if let Some(l) = s.leader
        && !s.replicas.contains(&l)
    {
        return Err(format!(
            "{tp}: leader {l} is not one of the replicas {:?}",
            s.replicas
        ));
    }
    Ok(())
}

fn check_address(address: &str) -> std::result::Result<(), String> {
    if address.is_empty() {
        return Err("broker address is empty".into());
    }
    if address.len() > MAX_ADDRESS {
        return Err(format!(
            "broker address is {} bytes long, at most {MAX_ADDRESS} are allowed",
            address.len()
        ));
    }
    if address.chars().any(char::is_control) {
        return Err(format!(
            "broker address `{}` has control characters",
            address.escape_debug()
        ));
    }
    Ok(())
}

/// A number used in a key, in its one canonical spelling (no sign, no
/// leading zeros), so `7` and `07` cannot both name it.
fn parse_id(name: &str) -> Option<u32> {
    let n: u32 = name.parse().ok()?;
    (n.to_string() == name).then_some(n)
}

pub struct Store {
    gateway: Gateway,
    prefix: String,
    /// Keys per page of `read-partitions`.
    page: u32,
}

impl Store {
    pub fn new(gateway: Gateway, prefix: String, page: u32) -> Self {
        Store {
            gateway,
            prefix,
            page,
        }
    }

    fn partitions_prefix(&self) -> String {
        format!("{}partitions/", self.prefix)
    }

    fn brokers_prefix(&self) -> String {
        format!("{}brokers/", self.prefix)
    }

    fn partition_key(&self, topic: &str, partition: u32) -> String {
        format!("{}{topic}/{partition}", self.partitions_prefix())
    }

    fn broker_key(&self, id: u32) -> String {
        format!("{}{id}", self.brokers_prefix())
    }

    /// Decode and check the stored state of `topic`/`partition`.
    fn decode_partition(&self, topic: &str, partition: u32, kv: &Kv) -> Result<Partition> {
        let key = self.partition_key(topic, partition);
        let state: Partition = serde_json::from_slice(&kv.value)
            .map_err(|e| Error::Corrupt(format!("{key}: not a partition state: {e}")))?;
        if state.topic != topic || state.partition != partition || state.version == 0 {
            return Err(Error::Corrupt(format!(
                "{key}: holds {}/{} version {}",
                state.topic, state.partition, state.version
            )));
        }
        check_state(&state).map_err(|e| Error::Corrupt(format!("{key}: {e}")))?;
        Ok(state)
    }

    pub fn get_partition(&self, topic: &str, partition: u32) -> Result<Partition> {
        check_topic(topic).map_err(Error::Invalid)?;
        let key = self.partition_key(topic, partition);
        match self.gateway.get(key.as_bytes())? {
            None => Err(Error::NotFound(format!("partition {topic}/{partition}"))),
            Some(kv) => self.decode_partition(topic, partition, &kv),
        }
    }

    pub fn compare_and_set(&self, mut state: Partition, expected: u64) -> Result<u64> {
        check_state(&state).map_err(Error::Invalid)?;
        let tp = format!("{}/{}", state.topic, state.partition);
        let new = expected.checked_add(1).ok_or_else(|| {
            Error::Invalid(format!(
                "{tp}: expected version {expected} has no successor"
            ))
        })?;
        let key = self.partition_key(&state.topic, state.partition);
        let condition = match self.gateway.get(key.as_bytes())? {
            None if expected == 0 => Expect::Absent,
            None => {
                return Err(Error::Conflict(format!(
                    "{tp}: expected version {expected}, but the partition does not exist"
                )));
            }
            Some(kv) => {
                let stored = self.decode_partition(&state.topic, state.partition, &kv)?;
                if stored.version != expected {
                    return Err(Error::Conflict(format!(
                        "{tp}: expected version {expected}, but the stored version is {}",
                        stored.version
                    )));
                }
                Expect::ModRevision(kv.mod_revision)
            }
        };
        state.version = new;
        let bytes = serde_json::to_vec(&state)
            .map_err(|e| Error::Other(format!("{tp}: encoding the state: {e}")))?;
        if self.gateway.put_if(key.as_bytes(), condition, &bytes)? {
            Ok(new)
        } else {
            Err(Error::Conflict(format!(
                "{tp}: expected version {expected}, but another writer stored version {new} first"
            )))
        }
    }

    /// The partition a key under `prefix` names. Keys that are not
    /// `<topic>/<partition>` are not this store's and are skipped, as the
    /// file plugin skips foreign files.
    fn partition_of(prefix: &str, key: &[u8]) -> Option<(String, u32)> {
        let rest = std::str::from_utf8(key.get(prefix.len()..)?).ok()?;
        let (topic, partition) = rest.rsplit_once('/')?;
        check_topic(topic).ok()?;
        Some((topic.to_string(), parse_id(partition)?))
    }

    pub fn list_partitions(&self) -> Result<Vec<(String, u32)>> {
        let prefix = self.partitions_prefix();
        let mut out: Vec<(String, u32)> = self
            .gateway
            .list(prefix.as_bytes(), true)?
            .iter()
            .filter_map(|kv| Self::partition_of(&prefix, &kv.key))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// A page of every partition's state (or why its record cannot be
    /// read), in key order: one range request of up to `page_size` keys and
    /// their values, from after `after` (the last key of the previous
    /// page, base64). The next page's `after`, unless this was the last.
    pub fn read_partitions(&self, after: Option<&str>) -> Result<Page> {
        let prefix = self.partitions_prefix();
        let from = match after {
            None => prefix.as_bytes().to_vec(),
            Some(cursor) => {
                let mut key = crate::etcd::unb64("the page cursor", cursor)
                    .map_err(|_| Error::Invalid(format!("not a page cursor: {cursor:?}")))?;
                if !key.starts_with(prefix.as_bytes()) {
                    return Err(Error::Invalid(format!("not a page cursor: {cursor:?}")));
                }
                // The smallest key after it.
                key.push(0);
                key
            }
        };
        let (kvs, more) = self
            .gateway
            .list_page(prefix.as_bytes(), &from, self.page)?;
        let next = if more {
            kvs.last().map(|kv| crate::etcd::b64(&kv.key))
        } else {
            None
        };
        let mut out = Vec::new();
        for kv in &kvs {
            if let Some((topic, partition)) = Self::partition_of(&prefix, &kv.key) {
                let state = self.decode_partition(&topic, partition, kv);
                out.push((topic, partition, state));
            }
        }
        Ok((out, next))
    }

    /// Register `id` at `address` under a new epoch, greater than every
    /// earlier one of `id`.
    pub fn register_broker(&self, id: u32, address: &str) -> Result<u64> {
        check_address(address).map_err(Error::Invalid)?;
        let key = self.broker_key(id);
        for _ in 0..ATTEMPTS {
            let (condition, epoch) = match self.gateway.get(key.as_bytes())? {
                None => (Expect::Absent, 1),
                Some(kv) => {
                    let b = self.decode_broker(id, &kv)?;
                    let next = b.epoch.checked_add(1).ok_or_else(|| {
                        Error::Corrupt(format!("{key}: broker epochs are exhausted"))
                    })?;
                    (Expect::ModRevision(kv.mod_revision), next)
                }
            };
            let b = Broker {
                id,
                address: address.to_string(),
                epoch,
            };
            let bytes = serde_json::to_vec(&b)
                .map_err(|e| Error::Other(format!("broker {id}: encoding: {e}")))?;
            if self.gateway.put_if(key.as_bytes(), condition, &bytes)? {
                return Ok(epoch);
            }
        }
        Err(Error::Conflict(format!(
            "broker {id}: {ATTEMPTS} concurrent registrations won the race for every epoch tried"
        )))
    }

    /// Store `id` as the cluster's unless the key holds one (a
    /// transaction on the key being absent, so one of racing claimants
    /// wins); return the stored one. A put whose answer was lost is found
    /// by the next read.
    pub fn claim_cluster_id(&self, id: &str) -> Result<String> {
        check_cluster_id(id).map_err(Error::Invalid)?;
        let key = format!("{}cluster-id", self.prefix);
        for _ in 0..ATTEMPTS {
            if let Some(kv) = self.gateway.get(key.as_bytes())? {
                let stored: ClusterId = serde_json::from_slice(&kv.value)
                    .map_err(|e| Error::Corrupt(format!("{key}: not a cluster id: {e}")))?;
                check_cluster_id(&stored.cluster_id)
                    .map_err(|e| Error::Corrupt(format!("{key}: {e}")))?;
                return Ok(stored.cluster_id);
            }
            let bytes = serde_json::to_vec(&ClusterId {
                cluster_id: id.to_string(),
            })
            .map_err(|e| Error::Other(format!("cluster id: encoding: {e}")))?;
            if self
                .gateway
                .put_if(key.as_bytes(), Expect::Absent, &bytes)?
            {
                return Ok(id.to_string());
            }
        }
        Err(Error::Conflict(format!(
            "{key}: written and removed again {ATTEMPTS} times while being claimed"
        )))
    }

    fn decode_broker(&self, id: u32, kv: &Kv) -> Result<Broker> {
        let key = self.broker_key(id);
        let b: Broker = serde_json::from_slice(&kv.value)
            .map_err(|e| Error::Corrupt(format!("{key}: not a broker registration: {e}")))?;
        if b.id != id || b.epoch == 0 {
            return Err(Error::Corrupt(format!(
                "{key}: holds broker {} epoch {}",
                b.id, b.epoch
            )));
        }
        check_address(&b.address).map_err(|e| Error::Corrupt(format!("{key}: {e}")))?;
        Ok(b)
    }

    pub fn list_brokers(&self) -> Result<Vec<Broker>> {
        let prefix = self.brokers_prefix();
        let mut out = Vec::new();
        for kv in self.gateway.list(prefix.as_bytes(), false)? {
            let id = kv
                .key
                .get(prefix.len()..)
                .and_then(|r| std::str::from_utf8(r).ok())
                .and_then(parse_id);
            if let Some(id) = id {
                out.push(self.decode_broker(id, &kv)?);
            }
        }
        out.sort_by_key(|b| b.id);
        Ok(out)
    }
}
