//! Node and client configuration files (TOML), as `replicator cluster
//! init` writes them. Unknown fields are errors naming their line; relative
//! paths are relative to the file's own directory, so a config directory
//! can be moved as a whole.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::{Config as ReplicationConfig, ReplicaId};
use crate::plugin::{PluginSource, Sandbox};
use crate::transport::TlsPaths;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("config {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

/// A plugin and its `key = value` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    /// A built-in name (`file`, `memory`) or a path to a `.wasm` component.
    pub plugin: String,
    /// Settings handed to the plugin as strings (strings, numbers and
    /// booleans as written; nested tables as dotted keys).
    #[serde(default, deserialize_with = "plugin_settings")]
    pub config: BTreeMap<String, String>,
    /// Storage only: run each partition's store on its own thread, with
    /// all its file I/O inline, rather than as a task on the node's
    /// runtime (the default), where file I/O that may wait for the disk
    /// goes to the blocking pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_per_partition: Option<bool>,
    /// Storage only: while a partition is appended to, sync the files its
    /// plugin changed this often (milliseconds) on a host thread, so the
    /// plugin's own fsync stays short; 0 turns it off. Unset, the plugin
    /// decides: 50 for the built-in `file` plugin, off for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_behind_ms: Option<u64>,
}

/// Longest `write_behind_ms`: past a minute the kernel's own writeback
/// (30 s by default) has long done the work.
const MAX_WRITE_BEHIND_MS: u64 = 60_000;

impl PluginSection {
    /// The plugin source; a relative path is resolved against `base`.
    pub fn source(&self, base: &Path) -> PluginSource {
        match self.plugin.parse::<PluginSource>() {
            Ok(PluginSource::Path(p)) if p.is_relative() => PluginSource::Path(base.join(p)),
            Ok(s) => s,
            Err(never) => match never {},
        }
    }
    /// Check the `endpoint` setting, if any, is a valid `http://host:port`,
    /// and `write_behind_ms` is within a minute.
    pub fn validate(&self) -> Result<(), String> {
        for e in self.endpoints() {
            endpoint_authority(e).map_err(|m| format!("[storage] config.endpoint: {m}"))?;
        }
        if let Some(ms) = self.write_behind_ms.filter(|ms| *ms > MAX_WRITE_BEHIND_MS) {
            return Err(format!(
                "[storage] write_behind_ms = {ms}: want 0 (off) to {MAX_WRITE_BEHIND_MS} milliseconds"
            ));
        }
        Ok(())
    }

    /// The comma-separated `endpoint` setting (object-store plugins).
    fn endpoints(&self) -> impl Iterator<Item = &str> {
        self.config
            .get("endpoint")
            .map(|v| v.split(',').map(str::trim).filter(|e| !e.is_empty()))
            .into_iter()
            .flatten()
    }

    /// The sandbox of the storage plugin: the defaults, with HTTP allowed
    /// to the authority of the `endpoint` setting and nowhere else. A
    /// plugin with an endpoint also sees the node's [`STORAGE_ENV`]
    /// variables, so object-store credentials need not sit in the config.
    pub fn sandbox(&self) -> Sandbox {
        let allow: Vec<String> = self
            .endpoints()
            .filter_map(|e| endpoint_authority(e).ok())
            .collect();
        let env: Vec<(String, String)> = if allow.is_empty() {
            Vec::new()
        } else {
            STORAGE_ENV
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
                .collect()
        };
        Sandbox {
            own_thread: self.thread_per_partition.unwrap_or(false),
            write_behind: self.write_behind_ms.map(Duration::from_millis),
            ..Sandbox::default().allow_http(allow).with_env(env)
        }
    }

    pub fn pairs(&self) -> Vec<(String, String)> {
        self.config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataSection {
    pub plugin: String,
    /// Host directory the metadata plugin sees as `/data`; for the `file`
    /// plugin the directory every node of the cluster shares.
    pub dir: PathBuf,
    /// Network endpoints of the store (`http://host:port`), e.g. etcd's
    /// client URLs. They are the only authorities the plugin's sandbox lets
    /// HTTP requests go to, and are handed to the plugin as its `endpoints`
    /// setting (comma-separated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    #[serde(default, deserialize_with = "plugin_settings")]
    pub config: BTreeMap<String, String>,
    /// How long a starting node waits for the store to answer, in ms,
    /// trying again with growing pauses and saying so in its log; then it
    /// exits with an error. 0 exits at the first failure.
    #[serde(default = "default_start_wait_ms")]
    pub start_wait_ms: u64,
}

pub fn default_start_wait_ms() -> u64 {
    60_000
}

/// Environment variables a storage plugin with an `endpoint` may read:
/// the standard AWS credential and region variables, nothing else.
pub const STORAGE_ENV: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
];

/// `http://host:port` (a trailing `/` allowed) as its authority
/// `host:port`; anything else is an error saying what is wrong. https is
/// refused: no plugin can do TLS to its store yet.
pub fn endpoint_authority(endpoint: &str) -> Result<String, String> {
    let e = endpoint.trim();
    if e.starts_with("https://") {
        return Err(format!(
            "endpoint `{e}`: https is not supported (plugins have no TLS yet); use http://"
        ));
    }
    let Some(rest) = e.strip_prefix("http://") else {
        return Err(format!("endpoint `{e}` must look like http://host:port"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let valid = match authority.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !authority.contains(['/', '?', '#', '@', ' ', ','])
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    };
    if valid {
        Ok(authority.to_string())
    } else {
        Err(format!(
            "endpoint `{e}` must look like http://host:port, with a port and no path"
        ))
    }
}

impl MetadataSection {
    /// The plugin source; a relative path is resolved against `base`.
    pub fn source(&self, base: &Path) -> PluginSource {
        PluginSection {
            plugin: self.plugin.clone(),
            config: Default::default(),
            thread_per_partition: None,
            write_behind_ms: None,
        }
        .source(base)
    }

    /// Where the store is, for messages: its endpoints and key prefix, or
    /// the directory the plugin keeps it in.
    pub fn describe(&self) -> String {
        if self.endpoints.is_empty() {
            format!("`{}` in {}", self.plugin, self.dir.display())
        } else {
            let prefix = match self.config.get("prefix") {
                Some(p) => format!("key prefix `{p}`"),
                None => "the plugin's default key prefix".to_string(),
            };
            format!(
                "`{}` at {}, {prefix}",
                self.plugin,
                self.endpoints.join(", ")
            )
        }
    }

    /// Check the endpoints: each is a valid `http://host:port`, the
    /// `etcd` plugin has at least one, and `endpoints` is not also set in
    /// `config`, where it would be ambiguous.
    pub fn validate(&self) -> Result<(), String> {
        for e in &self.endpoints {
            endpoint_authority(e).map_err(|m| format!("[metadata] {m}"))?;
        }
        if self.plugin == "etcd" && self.endpoints.is_empty() {
            return Err(
                "[metadata] the etcd plugin needs `endpoints = [\"http://host:port\", ...]`".into(),
            );
        }
        if !self.endpoints.is_empty() && self.config.contains_key("endpoints") {
            return Err(
                "[metadata] set the endpoints once, in `endpoints`, not also in `config`".into(),
            );
        }
        Ok(())
    }

    /// The sandbox of the metadata plugin: the defaults, with HTTP allowed
    /// to the endpoints' authorities and nowhere else.
    pub fn sandbox(&self) -> Sandbox {
        Sandbox::default().allow_http(
            self.endpoints
                .iter()
                .filter_map(|e| endpoint_authority(e).ok()),
        )
    }

    /// The settings handed to the plugin: `config`, plus `endpoints`.
    pub fn plugin_config(&self) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = self
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !self.endpoints.is_empty() {
            pairs.push(("endpoints".into(), self.endpoints.join(",")));
        }
        pairs
    }
}

/// A `[storage.config]` or `[metadata.config]` table as the plugin gets
/// it, a string per setting: strings as they are, numbers and booleans as
/// written (`"fsync.interval.ms" = 5`), and unquoted dotted keys
/// (`segment.bytes = "8192"`, which TOML reads as nested tables) joined
/// back with dots, so each way an operator may write a setting works.
/// An `IP:port`, with an error that says what is wrong with one that is
/// not: a host name (`localhost:7101`) is not resolved, so that a node's
/// address does not change with DNS, and serde's own error ("invalid
/// socket address syntax") did not say so.
fn parse_ip_port(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| match s.rsplit_once(':') {
        Some((host, port)) if host.contains(':') && port.parse::<u16>().is_ok() => format!(
            "`{s}` is not an IP:port: an IPv6 address goes in brackets, as in [{host}]:{port}"
        ),
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => format!(
            "`{s}` is not an IP:port: write an IP address, not a host name (e.g. 127.0.0.1:{port}, or [::1]:{port} for IPv6)"
        ),
        _ => format!("`{s}` is not an IP:port such as 127.0.0.1:7101 ([::1]:7101 for IPv6)"),
    })
}

fn ip_port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_ip_port(&s).map_err(serde::de::Error::custom)
}

fn some_ip_port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    ip_port(d).map(Some)
}

fn plugin_settings<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    fn flatten(
        prefix: &str,
        table: toml::Table,
        out: &mut BTreeMap<String, String>,
    ) -> Result<(), String> {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k
            } else {
                format!("{prefix}.{k}")
            };
            let value = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Table(t) => {
                    flatten(&key, t, out)?;
                    continue;
                }
                other => {
                    return Err(format!(
                        "plugin setting `{key}` is {} {other}; settings are strings, numbers or booleans",
                        other.type_str()
                    ));
                }
            };
            if out.insert(key.clone(), value).is_some() {
                return Err(format!("plugin setting `{key}` is given twice"));
            }
        }
        Ok(())
    }
    let table = toml::Table::deserialize(d)?;
    let mut out = BTreeMap::new();
    flatten("", table, &mut out).map_err(serde::de::Error::custom)?;
    Ok(out)
}

/// `node-<id>.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: ReplicaId,
    /// The cluster this node belongs to (`cluster init` generates one). At
    /// start the node claims it in the metadata store and records it in its
    /// data directory, and refuses to start if either names another
    /// cluster: a store or a data directory shared by mistake would mix two
    /// clusters' leaders, ISRs and logs. Unset (configs written before
    /// cluster ids), the id the data directory recorded counts; with
    /// neither, nothing is claimed or checked but the node id.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// UDP address the QUIC endpoint binds.
    #[serde(deserialize_with = "ip_port")]
    pub listen: SocketAddr,
    /// Address other nodes and clients dial; defaults to `listen`.
    #[serde(default, deserialize_with = "some_ip_port")]
    pub advertise: Option<SocketAddr>,
    /// TCP address of the Prometheus `/metrics` endpoint; none disables it.
    #[serde(default, deserialize_with = "some_ip_port")]
    pub metrics_listen: Option<SocketAddr>,
    /// Where partition logs live (one subdirectory per partition).
    pub data_dir: PathBuf,
    /// How often the node re-reads partition metadata, in ms.
    #[serde(default = "default_metadata_poll_ms")]
    pub metadata_poll_ms: u64,
    pub tls: TlsPaths,
    pub storage: PluginSection,
    pub metadata: MetadataSection,
    /// Replication settings (the reference API's `Config`), Kafka defaults.
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// Heartbeats, failure detection and leader election.
    #[serde(default)]
    pub failover: FailoverConfig,
}

/// `[failover]`: how fast a dead leader is replaced. With the defaults a
/// killed leader is detected within about half a second and replaced at
/// once; raise the timeout on a loaded or high-latency network, where a
/// slow answer would otherwise look like a failure (a spurious failover is
/// safe, but costs a leader epoch and a moment of unavailability).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// How often this node sends a heartbeat to every other node, in ms.
    pub heartbeat_interval_ms: u64,
    /// A node not heard from for this long counts as failed (so does one
    /// never heard from, once this long has passed since start), in ms.
    /// At least twice the heartbeat interval.
    pub failure_timeout_ms: u64,
    /// Elect a replica outside the ISR when no in-sync replica is alive.
    /// Off by default, as in Kafka (KIP-106): the new leader may lack
    /// acknowledged writes, which are then lost for good.
    pub unclean_leader_election: bool,
    /// On a graceful stop (SIGTERM, Ctrl-C), first hand every partition
    /// this node leads to a live in-sync replica and leave every ISR it is
    /// in, so producers and followers move on at once rather than a
    /// failure timeout later (Kafka's `controlled.shutdown.enable`, also
    /// on by default there). Bounded by the failure timeout.
    pub controlled_shutdown: bool,
    /// Every `leader_imbalance_check_interval_ms`, hand each partition this
    /// node leads back to its preferred replica (the first in assignment
    /// order) if that replica is in the ISR and alive (Kafka's
    /// `auto.leader.rebalance.enable`, on by default there too). Without
    /// it, leadership stays where failovers and stops left it: after a
    /// rolling restart one node can lead every partition. Producers with
    /// requests in flight at the change get an ambiguous answer for them,
    /// as at any change of leader.
    pub auto_leader_rebalance: bool,
    /// How often the leader rebalance runs, in ms (Kafka's
    /// `leader.imbalance.check.interval.seconds`, 300 s there too).
    pub leader_imbalance_check_interval_ms: u64,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            heartbeat_interval_ms: 100,
            failure_timeout_ms: 500,
            unclean_leader_election: false,
            controlled_shutdown: true,
            auto_leader_rebalance: true,
            leader_imbalance_check_interval_ms: 300_000,
        }
    }
}

impl FailoverConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval_ms < 10 {
            return Err(format!(
                "heartbeat_interval_ms = {} is below the minimum of 10",
                self.heartbeat_interval_ms
            ));
        }
        if self.failure_timeout_ms < self.heartbeat_interval_ms.saturating_mul(2) {
            return Err(format!(
                "failure_timeout_ms = {} must be at least twice heartbeat_interval_ms ({}): one late heartbeat must not fail a node",
                self.failure_timeout_ms, self.heartbeat_interval_ms
            ));
        }
        if self.auto_leader_rebalance
            && self.leader_imbalance_check_interval_ms < self.failure_timeout_ms
        {
            return Err(format!(
                "leader_imbalance_check_interval_ms = {} is below failure_timeout_ms ({}): each leader change costs producers an ambiguous answer for what they have in flight, and a replica that keeps failing would take leadership back faster than its failures are found (Kafka's default is 300000; turn the rebalance off with auto_leader_rebalance = false)",
                self.leader_imbalance_check_interval_ms, self.failure_timeout_ms
            ));
        }
        Ok(())
    }
}

fn default_metadata_poll_ms() -> u64 {
    200
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAddress {
    pub id: ReplicaId,
    #[serde(deserialize_with = "ip_port")]
    pub address: SocketAddr,
}

/// `client.toml`: how CLI commands reach the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub tls: TlsPaths,
    /// Nodes to contact; any one that answers is enough.
    pub nodes: Vec<NodeAddress>,
}

/// A hint when a config of one kind was given where the other goes: a
/// node's config to a client command said only "unknown field
/// cluster_id, expected tls or nodes".
fn other_kind(text: &str, wanted: &str) -> &'static str {
    let Ok(table) = text.parse::<toml::Table>() else {
        return "";
    };
    let node = table.contains_key("node_id") || table.contains_key("data_dir");
    let client = table.contains_key("nodes") && !node;
    if wanted.ends_with("ClientConfig") && node {
        "\nThis is a node's config (node-N.toml). Client commands take the client.toml that `cluster init` wrote next to it."
    } else if wanted.ends_with("NodeConfig") && client {
        "\nThis is a client config (client.toml). `replicator node` takes a node's config, such as the node-1.toml that `cluster init` wrote next to it."
    } else {
        ""
    }
}

fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<(T, PathBuf), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let value = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        // toml's message names the line and column and quotes the line.
        detail: format!("{e}{}", other_kind(&text, std::any::type_name::<T>())),
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    Ok((value, base))
}

impl NodeConfig {
    /// Read, resolve relative paths, and check.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut c, base): (NodeConfig, _) = load(path)?;
        // An empty path joined to the config's directory is that directory:
        // logs (or the shared metadata store) would land among the certs
        // and configs, where a later `cluster init --force` or a copied
        // config directory takes them along. Say so instead.
        if let Some(key) = c.empty_dir() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                detail: format!(
                    "{key} is empty: name a directory (relative paths are relative to this file's directory)"
                ),
            });
        }
        c.tls = c.tls.resolved(&base);
        c.data_dir = base.join(&c.data_dir);
        c.metadata.dir = base.join(&c.metadata.dir);
        if let PluginSource::Path(p) = c.storage.source(&base) {
            c.storage.plugin = p.display().to_string();
        }
        let meta_source = PluginSection {
            plugin: c.metadata.plugin.clone(),
            config: BTreeMap::new(),
            thread_per_partition: None,
            write_behind_ms: None,
        }
        .source(&base);
        if let PluginSource::Path(p) = meta_source {
            c.metadata.plugin = p.display().to_string();
        }
        c.validate().map_err(|detail| ConfigError::Invalid {
            path: path.to_path_buf(),
            detail,
        })?;
        Ok(c)
    }

    /// Check settings that parse but cannot work together or at all: what
    /// [`Self::load`] refuses, for a config built in code too ([`run`]
    /// calls it; a zero heartbeat interval used to panic its tasks).
    ///
    /// [`run`]: crate::node::run
    pub fn validate(&self) -> Result<(), String> {
        if let Some(key) = self.empty_dir() {
            return Err(format!("{key} is empty: name a directory"));
        }
        self.replication
            .validate()
            .map_err(|e| format!("[replication]: {e}"))?;
        self.failover
            .validate()
            .map_err(|e| format!("[failover]: {e}"))?;
        self.metadata.validate()?;
        self.storage.validate()?;
        if let Some(id) = &self.cluster_id {
            crate::metadata::check_cluster_id(id).map_err(|e| format!("cluster_id: {e}"))?;
        }
        if self.metadata_poll_ms == 0 {
            return Err("metadata_poll_ms must be at least 1".into());
        }
        if self.replication.unclean_leader_election && !self.failover.unclean_leader_election {
            // The core's copy mirrors the reference API; elections read
            // [failover]'s. Turned on only there it would do nothing.
            return Err(
                "[replication] unclean_leader_election = true but [failover] unclean_leader_election = false: a node elects by [failover]'s; set it there".into(),
            );
        }
        if self.listen.ip().is_unspecified() && self.advertise.is_none() {
            return Err(format!(
                "listen = \"{}\" is every interface, which other nodes cannot dial: set `advertise` to this node's reachable address",
                self.listen
            ));
        }
        Ok(())
    }

    /// The first of `data_dir` and `[metadata] dir` that is empty.
    fn empty_dir(&self) -> Option<&'static str> {
        [
            ("data_dir", &self.data_dir),
            ("[metadata] dir", &self.metadata.dir),
        ]
        .into_iter()
        .find(|(_, dir)| dir.as_os_str().is_empty())
        .map(|(key, _)| key)
    }

    pub fn advertised(&self) -> SocketAddr {
        self.advertise.unwrap_or(self.listen)
    }
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut c, base): (ClientConfig, _) = load(path)?;
        c.tls = c.tls.resolved(&base);
        if c.nodes.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                detail: "`nodes` is empty: list at least one node to contact".into(),
            });
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's config given to a client command, or a client's to
    /// `node`, says which file goes where.
    #[test]
    fn the_other_kind_of_config_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node-1.toml");
        std::fs::write(
            &node,
            "node_id = 1\ncluster_id = \"c\"\ndata_dir = \"d\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap();
        let e = ClientConfig::load(&node).unwrap_err().to_string();
        assert!(e.contains("This is a node's config"), "{e}");
        let client = dir.path().join("client.toml");
        std::fs::write(
            &client,
            "[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n[[nodes]]\nid = 1\naddress = \"127.0.0.1:7000\"\n",
        )
        .unwrap();
        let e = NodeConfig::load(&client).unwrap_err().to_string();
        assert!(e.contains("This is a client config"), "{e}");
    }

    #[test]
    fn unknown_fields_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("client.toml");
        std::fs::write(
            &p,
            "[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\ncolour = \"red\"\n",
        )
        .unwrap();
        let e = ClientConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("colour") && e.contains("line 5"), "{e}");
    }

    /// A `[storage]` section for the file plugin with `extra` lines.
    fn parse(extra: &str) -> PluginSection {
        toml::from_str(&format!("plugin = \"file\"\n{extra}")).expect("parse")
    }

    /// Why a node config with `top` among its top-level lines and `extra`
    /// after its sections does not load ("loaded" if it does).
    fn node_refused(top: &str, extra: &str) -> String {
        text_refused(&node_text(top, extra))
    }

    /// A node config with `top` among its top-level lines and `extra`
    /// after its sections.
    fn node_text(top: &str, extra: &str) -> String {
        format!(
            "node_id = 1\n{top}\ndata_dir = \"d\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             [storage]\nplugin = \"memory\"\n[metadata]\nplugin = \"file\"\ndir = \"m\"\n{extra}"
        )
    }

    /// Why a node config of `text` does not load ("loaded" if it does).
    fn text_refused(text: &str) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("node-1.toml");
        std::fs::write(&p, text).expect("write");
        match NodeConfig::load(&p) {
            Ok(_) => "loaded".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn settings_a_node_would_ignore_or_cannot_use_are_refused() {
        let ok = "listen = \"127.0.0.1:7101\"";
        assert_eq!(node_refused(ok, ""), "loaded");
        let e = node_refused(ok, "[replication]\nunclean_leader_election = true\n");
        assert!(e.contains("a node elects by [failover]'s"), "{e}");
        let both = "[replication]\nunclean_leader_election = true\n\
                    [failover]\nunclean_leader_election = true\n";
        assert_eq!(node_refused(ok, both), "loaded");
        // What `cluster init` writes, with [failover]'s turned on.
        let on = "[replication]\nunclean_leader_election = false\n\
                  [failover]\nunclean_leader_election = true\n";
        assert_eq!(node_refused(ok, on), "loaded");
        let any = "listen = \"0.0.0.0:7101\"";
        let e = node_refused(any, "");
        assert!(e.contains("set `advertise`"), "{e}");
        let advertised = format!("{any}\nadvertise = \"10.0.0.5:7101\"");
        assert_eq!(node_refused(&advertised, ""), "loaded");
        // A leader rebalance faster than failure detection would move
        // leadership back and forth.
        let e = node_refused(ok, "[failover]\nleader_imbalance_check_interval_ms = 100\n");
        assert!(e.contains("is below failure_timeout_ms (500)"), "{e}");
        let off =
            "[failover]\nauto_leader_rebalance = false\nleader_imbalance_check_interval_ms = 100\n";
        assert_eq!(node_refused(ok, off), "loaded");
    }

    /// An empty directory would be the config's own directory: refused.
    #[test]
    fn empty_directories_are_refused() {
        let ok = node_text("listen = \"127.0.0.1:7101\"", "");
        assert_eq!(text_refused(&ok), "loaded");
        let e = text_refused(&ok.replace("data_dir = \"d\"", "data_dir = \"\""));
        assert!(e.contains("data_dir is empty"), "{e}");
        let e = text_refused(&ok.replace("dir = \"m\"", "dir = \"\""));
        assert!(e.contains("[metadata] dir is empty"), "{e}");
    }

    /// Why a section for the file plugin with `line` does not parse.
    fn refused(line: &str) -> String {
        toml::from_str::<PluginSection>(&format!("plugin = \"file\"\n{line}"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn addresses_must_be_ip_ports_and_a_host_name_is_named_as_such() {
        assert_eq!(
            parse_ip_port("127.0.0.1:7101"),
            Ok("127.0.0.1:7101".parse().expect("addr"))
        );
        assert_eq!(
            parse_ip_port("[::1]:7101"),
            Ok("[::1]:7101".parse().expect("addr"))
        );
        let host = parse_ip_port("localhost:17103").expect_err("a host name");
        assert!(
            host.contains("not a host name (e.g. 127.0.0.1:17103"),
            "{host}"
        );
        let v6 = parse_ip_port("::1:7101").expect_err("no brackets");
        assert!(v6.contains("in brackets, as in [::1]:7101"), "{v6}");
        let junk = parse_ip_port("7101").expect_err("no host");
        assert!(junk.contains("such as 127.0.0.1:7101"), "{junk}");
        // Through the config: the field's error carries it.
        let e = toml::from_str::<NodeAddress>("id = 1\naddress = \"node-1:7101\"\n")
            .expect_err("a host name");
        assert!(e.to_string().contains("write an IP address"), "{e}");
    }

    #[test]
    fn plugin_settings_may_be_dotted_keys_numbers_or_booleans() {
        let section = parse(
            "[config]\nsegment.bytes = \"8192\"\n\"fsync.interval.ms\" = 5\nfsync = \"interval\"\nx = true\n",
        );
        let got: Vec<(&str, &str)> = section
            .config
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("fsync", "interval"),
                ("fsync.interval.ms", "5"),
                ("segment.bytes", "8192"),
                ("x", "true"),
            ]
        );
        let e = refused("[config]\nsizes = [1, 2]\n");
        assert!(e.contains("plugin setting `sizes` is array"), "{e}");
        let e = refused("[config]\n\"a.b\" = \"1\"\na.b = \"2\"\n");
        assert!(e.contains("`a.b` is given twice"), "{e}");
    }

    #[test]
    fn thread_per_partition_reaches_the_sandbox() {
        assert!(!parse("").sandbox().own_thread, "unset: a task");
        assert!(!parse("thread_per_partition = false").sandbox().own_thread);
        assert!(parse("thread_per_partition = true").sandbox().own_thread);
        let e = refused("thread_per_partition = 1");
        assert!(e.contains("thread_per_partition"), "{e}");
    }

    #[test]
    fn write_behind_ms_reaches_the_sandbox_and_is_bounded() {
        assert_eq!(
            parse("").sandbox().write_behind,
            None,
            "unset: the plugin decides"
        );
        assert_eq!(
            parse("write_behind_ms = 0").sandbox().write_behind,
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse("write_behind_ms = 200").sandbox().write_behind,
            Some(Duration::from_millis(200))
        );
        assert_eq!(parse("write_behind_ms = 60000").validate(), Ok(()));
        let e = parse("write_behind_ms = 60001").validate().unwrap_err();
        assert!(
            e.contains("write_behind_ms = 60001") && e.contains("60000"),
            "{e}"
        );
        let e = refused("write_behind_ms = -1");
        assert!(e.contains("write_behind_ms"), "{e}");
    }

    #[test]
    fn metadata_endpoints_are_checked_and_become_the_allow_list() {
        let section = |plugin: &str, endpoints: &[&str]| MetadataSection {
            plugin: plugin.into(),
            dir: "m".into(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            config: BTreeMap::new(),
            start_wait_ms: default_start_wait_ms(),
        };
        let ok = section("etcd", &["http://127.0.0.1:2379", "http://Etcd-2:2379/"]);
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.sandbox().http_allow, ["127.0.0.1:2379", "Etcd-2:2379"]);
        assert_eq!(
            ok.plugin_config(),
            [(
                "endpoints".to_string(),
                "http://127.0.0.1:2379,http://Etcd-2:2379/".to_string()
            )]
        );
        assert!(Sandbox::default().http_allow.is_empty());
        assert!(section("file", &[]).sandbox().http_allow.is_empty());
        for (bad, why) in [
            ("https://127.0.0.1:2379", "https is not supported"),
            ("127.0.0.1:2379", "http://host:port"),
            ("http://127.0.0.1", "with a port"),
            ("http://127.0.0.1:99999", "with a port"),
            ("http://127.0.0.1:2379/v3", "no path"),
            ("http://:2379", "with a port"),
        ] {
            let e = section("etcd", &[bad]).validate().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = section("etcd", &[]).validate().unwrap_err();
        assert!(e.contains("needs `endpoints"), "{e}");
        let mut both = section("etcd", &["http://127.0.0.1:2379"]);
        both.config.insert("endpoints".into(), "http://x:1".into());
        assert!(both.validate().unwrap_err().contains("once"));
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("client.toml");
        std::fs::write(
            &p,
            "nodes = [{ id = 1, address = \"127.0.0.1:7001\" }]\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap();
        let c = ClientConfig::load(&p).unwrap();
        assert_eq!(c.tls.ca, dir.path().join("ca.pem"));
    }
}
