//! Whether a storage plugin accepts the settings a node would hand every
//! partition it opens, asked once at startup (and by `cluster init`)
//! instead of at the first partition.
//!
//! Why: the WIT contract has no call for it, so a setting a plugin refuses
//! (`fsync = "sometimes"`) used to surface only when a topic was created,
//! as an error the node retried every 10 s for as long as it ran. Kafka
//! refuses a bad config before the broker starts; so does a node now.
//!
//! How: a throwaway partition is opened in a fresh, empty directory and
//! closed, with write-behind off. A plugin answers `invalid-input` at open
//! for a setting it refuses (the contract's variant for a bad config), and
//! an empty directory leaves it nothing else to refuse. Plugins with an
//! HTTP allow-list are not asked: their open talks to a remote store (the
//! S3 plugin writes a fence object there), which a check must not touch.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{Inner, StoragePlugin};
use crate::storage::StorageError;

/// The partition a check opens; a valid topic name no client can confuse
/// with its own (it never reaches the metadata store).
const TOPIC: &str = "replicator.config-check";

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigCheck {
    /// A partition opened with these settings.
    Accepted,
    /// The plugin refused them, saying why.
    Refused(String),
    /// Not asked, and why: the plugin reaches a remote store.
    Skipped(String),
    /// The check could not tell, and why: the throwaway open failed some
    /// other way (a trap, a timeout, a directory it could not make). The
    /// node goes on; the first real open will say more.
    Unchecked(String),
}

/// Longest a check waits for its open, past which it cannot tell: an empty
/// directory has nothing to recover, so this is instantiation and setup.
const OPEN_DEADLINE: Duration = Duration::from_secs(30);

/// Names of check directories start with this; any found at the next
/// check (a check killed halfway) are removed. A node's check runs in its
/// data directory, next to the partition directories (`<topic>-<n>`), so
/// the prefix holds a `+`, which no topic name may: with `-` here, a
/// topic named `.config-check-orders` had its log removed on every
/// restart (exploratory run).
const DIR_PREFIX: &str = ".config-check+";

impl StoragePlugin {
    /// Open and close a throwaway partition with `config`, in a temporary
    /// directory under `scratch` (removed afterwards). Must be called
    /// inside a tokio runtime.
    pub async fn check_config(&self, config: Vec<(String, String)>, scratch: &Path) -> ConfigCheck {
        if !self.inner.sandbox.http_allow.is_empty() {
            return ConfigCheck::Skipped(
                "it reaches a remote store, which a check would write to".into(),
            );
        }
        remove_leftovers(scratch);
        let made = std::fs::create_dir_all(scratch).and_then(|()| {
            tempfile::Builder::new()
                .prefix(DIR_PREFIX)
                .tempdir_in(scratch)
        });
        let dir = match made {
            Ok(d) => d,
            Err(e) => {
                return ConfigCheck::Unchecked(format!(
                    "cannot make a directory under {}: {e}",
                    scratch.display()
                ));
            }
        };
        let probe = StoragePlugin {
            inner: Arc::new(Inner {
                name: self.inner.name.clone(),
                runtime: self.inner.runtime.clone(),
                pre: self.inner.pre.clone(),
                sandbox: super::Sandbox {
                    write_behind: Some(Duration::ZERO),
                    open_deadline: self.inner.sandbox.open_deadline.min(OPEN_DEADLINE),
                    ..self.inner.sandbox.clone()
                },
            }),
        };
        let found = match probe.open(TOPIC, 0, config, Some(dir.path())).await {
            Ok(log) => {
                log.close().await;
                ConfigCheck::Accepted
            }
            Err(StorageError::InvalidInput(why)) => ConfigCheck::Refused(why),
            Err(e) => ConfigCheck::Unchecked(e.to_string()),
        };
        if let Err(e) = dir.close() {
            tracing::warn!("config check: removing its directory: {e}");
        }
        found
    }
}

/// Remove check directories a check that was killed left in `scratch`.
fn remove_leftovers(scratch: &Path) {
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return;
    };
    for e in entries.flatten() {
        let left = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(DIR_PREFIX))
            && e.file_type().is_ok_and(|t| t.is_dir());
        if left && let Err(err) = std::fs::remove_dir_all(e.path()) {
            tracing::warn!("config check: removing {}: {err}", e.path().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the check's own leftovers go: a partition directory whose
    /// topic starts like the old prefix stays, with its log.
    #[test]
    fn leftovers_are_removed_and_partitions_are_not() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let partition = scratch.path().join(".config-check-orders-0");
        std::fs::create_dir(&partition).expect("mkdir");
        std::fs::write(partition.join("00000000000000000000.log"), b"acked").expect("write");
        let left = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(scratch.path())
            .expect("leftover")
            .keep();
        remove_leftovers(scratch.path());
        assert!(!left.exists(), "a killed check's directory is removed");
        assert!(
            partition.join("00000000000000000000.log").exists(),
            "a partition's log is kept"
        );
        // Why that holds for every topic: no valid topic name starts with
        // the prefix, so no partition directory does.
        assert!(!crate::metadata::valid_topic(&format!(
            "{DIR_PREFIX}orders"
        )));
    }
}
