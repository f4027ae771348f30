//! The data directory's identity, `<data_dir>/identity.toml`: which node of
//! which cluster the directory's logs belong to (Kafka's `meta.properties`).
//! Written at a node's first start, checked at every later one before the
//! node registers or opens a log.
//!
//! Why: the ISR and the ELR vouch for *node N's* logs. A node started on
//! another node's directory (a config edited by hand, a restored backup
//! mounted in the wrong place) would answer for logs it does not hold, and
//! an election could then lose acknowledged writes. A directory that
//! belongs to another cluster holds offsets and leader epochs that mean
//! nothing here. Both are refused with the reason. So is a switch of
//! storage plugin: one plugin does not read another's logs, so the node
//! would start with its logs hidden and, switched back, bring old ones
//! back in place of writes acknowledged meanwhile (an exploratory run: a
//! partition with one replica lost five). The lock
//! (`data_dir_lock.rs`) keeps two live processes apart; this keeps one
//! process away from the wrong data.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::ReplicaId;

const FILE: &str = "identity.toml";

/// What a data directory says it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirIdentity {
    pub node_id: ReplicaId,
    /// Absent when the node ran without a cluster id in its config.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// The storage plugin whose logs the directory holds
    /// ([`storage_kind`]); absent in directories from before it was
    /// recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

/// What `[storage] plugin` names, as recorded: a built-in's name, or a
/// component's file name (a rebuilt or moved component keeps it).
pub fn storage_kind(plugin: &str) -> String {
    match plugin.parse::<crate::plugin::PluginSource>() {
        Ok(crate::plugin::PluginSource::Path(p)) => p
            .file_name()
            .map_or_else(|| plugin.to_string(), |n| n.to_string_lossy().into_owned()),
        _ => plugin.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot {what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{path} does not parse ({detail}); the node cannot tell whose logs this data directory holds. Restore the file, or, if you are sure the directory is this node's, delete it"
    )]
    Malformed { path: PathBuf, detail: String },
    #[error(
        "data directory {dir} belongs to node {found} ({dir}/{FILE}), but this config is node {configured}: a node must never start on another node's logs (the ISR counts them as node {found}'s, and an election could lose acknowledged writes); check `data_dir` and `node_id` in the config"
    )]
    OtherNode {
        dir: PathBuf,
        found: ReplicaId,
        configured: ReplicaId,
    },
    #[error(
        "data directory {dir} belongs to cluster {found} ({dir}/{FILE}), but this config names cluster {configured}: its logs are another cluster's; check `data_dir` and `cluster_id` in the config"
    )]
    OtherCluster {
        dir: PathBuf,
        found: String,
        configured: String,
    },
    #[error(
        "data directory {dir} holds the logs of storage plugin `{found}` ({dir}/{FILE}), but this config names `{configured}`: one plugin does not read another's logs, so the node would start without its logs and, switched back, bring back old ones in place of writes acknowledged meanwhile. To switch storage, give the node an empty data directory (its replicas fetch everything again from the others; a partition with one replica starts empty), or set `[storage] plugin` back"
    )]
    OtherStorage {
        dir: PathBuf,
        found: String,
        configured: String,
    },
}

impl DirIdentity {
    /// The identity recorded in `dir`, if any.
    pub fn read(dir: &Path) -> Result<Option<DirIdentity>, IdentityError> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(IdentityError::Io {
                    what: "read",
                    path,
                    error,
                });
            }
        };
        let id: DirIdentity = toml::from_str(&text).map_err(|e| IdentityError::Malformed {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if let Some(c) = &id.cluster_id
            && let Err(detail) = crate::metadata::check_cluster_id(c)
        {
            return Err(IdentityError::Malformed { path, detail });
        }
        Ok(Some(id))
    }

    /// Whether node `node_id` of `cluster_id` (if the config names one)
    /// may start on a directory that recorded `found`.
    pub fn check(
        found: Option<&DirIdentity>,
        dir: &Path,
        node_id: ReplicaId,
        cluster_id: Option<&str>,
        storage: &str,
    ) -> Result<(), IdentityError> {
        let Some(found) = found else {
            return Ok(());
        };
        if found.node_id != node_id {
            return Err(IdentityError::OtherNode {
                dir: dir.to_path_buf(),
                found: found.node_id,
                configured: node_id,
            });
        }
        if let (Some(found), Some(configured)) = (&found.cluster_id, cluster_id)
            && found != configured
        {
            return Err(IdentityError::OtherCluster {
                dir: dir.to_path_buf(),
                found: found.clone(),
                configured: configured.to_string(),
            });
        }
        if let Some(found) = &found.storage
            && *found != storage_kind(storage)
        {
            return Err(IdentityError::OtherStorage {
                dir: dir.to_path_buf(),
                found: found.clone(),
                configured: storage_kind(storage),
            });
        }
        Ok(())
    }

    /// Record `self` in `dir`, durably and atomically (written aside,
    /// synced, renamed, the directory synced).
    pub fn write(&self, dir: &Path) -> Result<(), IdentityError> {
        let path = dir.join(FILE);
        let io = |what, error| IdentityError::Io {
            what,
            path: path.clone(),
            error,
        };
        let text = toml::to_string(self).map_err(|e| io("encode", std::io::Error::other(e)))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| io("write", e))?;
        tmp.write_all(
            format!(
                "# Which node of which cluster this data directory belongs to; checked at every start.\n{text}"
            )
            .as_bytes(),
        )
        .map_err(|e| io("write", e))?;
        tmp.as_file().sync_all().map_err(|e| io("sync", e))?;
        tmp.persist(&path).map_err(|e| io("write", e.error))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync the directory of", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(node_id: ReplicaId, cluster: Option<&str>) -> DirIdentity {
        DirIdentity {
            node_id,
            cluster_id: cluster.map(str::to_string),
            storage: None,
        }
    }

    #[test]
    fn a_written_identity_reads_back_and_a_fresh_directory_has_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(DirIdentity::read(dir.path()).expect("read"), None);
        let id = ident(2, Some("c0ffee"));
        id.write(dir.path()).expect("write");
        assert_eq!(DirIdentity::read(dir.path()).expect("read"), Some(id));
        // Rewritten (a config that gained a cluster id), not appended.
        ident(2, Some("other")).write(dir.path()).expect("rewrite");
        assert_eq!(
            DirIdentity::read(dir.path()).expect("read"),
            Some(ident(2, Some("other")))
        );
    }

    #[test]
    fn another_nodes_or_another_clusters_directory_is_refused() {
        let dir = Path::new("/data/node-1");
        let check = |found: &DirIdentity, node, cluster| {
            DirIdentity::check(Some(found), dir, node, cluster, "file").map_err(|e| e.to_string())
        };
        let e = check(&ident(1, Some("a")), 2, Some("a")).expect_err("other node");
        assert!(
            e.contains("belongs to node 1") && e.contains("this config is node 2"),
            "{e}"
        );
        let e = check(&ident(1, Some("a")), 1, Some("b")).expect_err("other cluster");
        assert!(
            e.contains("belongs to cluster a") && e.contains("names cluster b"),
            "{e}"
        );
        check(&ident(1, Some("a")), 1, Some("a")).expect("its own");
        // A directory or a config without a cluster id cannot tell.
        check(&ident(1, None), 1, Some("a")).expect("directory without one");
        check(&ident(1, Some("a")), 1, None).expect("config without one");
        DirIdentity::check(None, dir, 1, Some("a"), "file").expect("fresh directory");
    }

    #[test]
    fn a_switch_of_storage_plugin_is_refused() {
        let dir = Path::new("/data/node-1");
        let on = |storage: &str| DirIdentity {
            storage: Some(storage.into()),
            ..ident(1, Some("a"))
        };
        let check = |found: &DirIdentity, storage| {
            DirIdentity::check(Some(found), dir, 1, Some("a"), storage).map_err(|e| e.to_string())
        };
        let e = check(&on("file"), "memory").expect_err("file to memory");
        assert!(
            e.contains("storage plugin `file`") && e.contains("names `memory`"),
            "{e}"
        );
        check(&on("file"), "file").expect("the same");
        // A component is known by its file name: rebuilt or moved, the same.
        check(&on("my.wasm"), "/opt/plugins/my.wasm").expect("moved");
        check(&on("my.wasm"), "./other.wasm").expect_err("another component");
        // Recorded from now on; a directory from before says nothing.
        check(&ident(1, Some("a")), "memory").expect("not recorded");
        // The record round-trips, and an old one (no field) still reads.
        let tmp = tempfile::tempdir().expect("tempdir");
        on("file").write(tmp.path()).expect("write");
        assert_eq!(
            DirIdentity::read(tmp.path()).expect("read"),
            Some(on("file"))
        );
        std::fs::write(tmp.path().join(FILE), "node_id = 1\ncluster_id = \"a\"\n").expect("old");
        assert_eq!(
            DirIdentity::read(tmp.path()).expect("read"),
            Some(ident(1, Some("a")))
        );
    }

    #[test]
    fn a_malformed_identity_is_refused_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        for text in [
            "node_id = \"one\"\n",
            "node_id = 1\ncluster_id = \"has space\"\n",
            "node_id = 1\nextra = 2\n",
        ] {
            std::fs::write(dir.path().join(FILE), text).expect("write");
            let e = DirIdentity::read(dir.path()).expect_err(text).to_string();
            assert!(e.contains("does not parse"), "{text}: {e}");
        }
    }
}
