//! Node and client configuration files (TOML), as `replicator cluster
//! init` writes them. Unknown fields are errors naming their line; relative
//! paths are relative to the file's own directory, so a config directory
//! can be moved as a whole.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::{Config as ReplicationConfig, ReplicaId};
use crate::plugin::PluginSource;
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
    /// Settings handed to the plugin as they are.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

impl PluginSection {
    /// The plugin source; a relative path is resolved against `base`.
    pub fn source(&self, base: &Path) -> PluginSource {
        match self.plugin.parse::<PluginSource>() {
            Ok(PluginSource::Path(p)) if p.is_relative() => PluginSource::Path(base.join(p)),
            Ok(s) => s,
            Err(never) => match never {},
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
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// `node-<id>.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: ReplicaId,
    /// UDP address the QUIC endpoint binds.
    pub listen: SocketAddr,
    /// Address other nodes and clients dial; defaults to `listen`.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// TCP address of the Prometheus `/metrics` endpoint; none disables it.
    #[serde(default)]
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
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            heartbeat_interval_ms: 100,
            failure_timeout_ms: 500,
            unclean_leader_election: false,
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
        if self.failure_timeout_ms < 2 * self.heartbeat_interval_ms {
            return Err(format!(
                "failure_timeout_ms = {} must be at least twice heartbeat_interval_ms ({}): one late heartbeat must not fail a node",
                self.failure_timeout_ms, self.heartbeat_interval_ms
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

fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<(T, PathBuf), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let value = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        // toml's message names the line and column and quotes the line.
        detail: e.to_string(),
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
        c.tls = c.tls.resolved(&base);
        c.data_dir = base.join(&c.data_dir);
        c.metadata.dir = base.join(&c.metadata.dir);
        if let PluginSource::Path(p) = c.storage.source(&base) {
            c.storage.plugin = p.display().to_string();
        }
        let meta_source = PluginSection {
            plugin: c.metadata.plugin.clone(),
            config: BTreeMap::new(),
        }
        .source(&base);
        if let PluginSource::Path(p) = meta_source {
            c.metadata.plugin = p.display().to_string();
        }
        let invalid = |detail: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            detail,
        };
        c.replication
            .validate()
            .map_err(|e| invalid(format!("[replication]: {e}")))?;
        c.failover
            .validate()
            .map_err(|e| invalid(format!("[failover]: {e}")))?;
        if c.metadata_poll_ms == 0 {
            return Err(invalid("metadata_poll_ms must be at least 1".into()));
        }
        Ok(c)
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
