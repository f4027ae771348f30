//! The clean-shutdown record, `<data_dir>/clean-shutdown.toml`: which
//! partitions a node flushed and closed at its last stop, and where each
//! log ended. KIP-966's unclean-shutdown detection, per partition.
//!
//! Why: a restarted replica may lead, or stay eligible to lead (the ELR),
//! only if its log still holds everything it held before. A node that
//! crashed cannot vouch for that (`fsync = interval` loses the last second
//! on a power cut), and neither can a log that now ends earlier than it did
//! (the memory plugin keeps nothing across a restart). So the record is
//! written only after every log was flushed and closed, and a node reads
//! it at start and deletes it before it opens any log: a crash of this run
//! then finds no record, however long the run was.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::TopicPartition;

const FILE: &str = "clean-shutdown.toml";

#[derive(Debug, thiserror::Error)]
#[error("clean-shutdown record {path}: {error}")]
pub struct RecordError {
    path: PathBuf,
    error: std::io::Error,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    topic: String,
    partition: u32,
    log_end: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct File {
    #[serde(default)]
    partition: Vec<Entry>,
}

/// What the last stop recorded; empty after a crash.
#[derive(Debug, Default, Clone)]
pub struct CleanShutdown {
    ends: HashMap<TopicPartition, u64>,
}

impl CleanShutdown {
    /// Read the record in `dir`. No record: the node did not stop cleanly,
    /// and nothing counts as intact. A record that does not parse counts as
    /// none (with a warning).
    pub fn read(dir: &Path) -> Result<CleanShutdown, RecordError> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(CleanShutdown::default());
            }
            Err(error) => return Err(RecordError { path, error }),
        };
        let file: File = match toml::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    "ignoring unreadable {} (every log counts as possibly incomplete): {e}",
                    path.display()
                );
                return Ok(CleanShutdown::default());
            }
        };
        let ends = file
            .partition
            .into_iter()
            .map(|e| (TopicPartition::new(&e.topic, e.partition), e.log_end))
            .collect();
        Ok(CleanShutdown { ends })
    }

    /// Delete the record in `dir`, durably, before this run opens a log. A
    /// record that cannot be deleted is an error: a crash later in this run
    /// would look like a clean stop.
    pub fn consume(dir: &Path) -> Result<(), RecordError> {
        let path = dir.join(FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(RecordError { path, error }),
        }
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|error| RecordError { path, error })
    }

    /// Whether `tp`'s log, which opened ending at `log_end`, holds all it
    /// held at the last clean stop.
    pub fn intact(&self, tp: &TopicPartition, log_end: u64) -> bool {
        self.ends.get(tp) == Some(&log_end)
    }

    /// Record `ends` in `dir`, durably and atomically (written aside, synced,
    /// renamed, the directory synced).
    pub fn write(dir: &Path, ends: &[(TopicPartition, u64)]) -> Result<(), RecordError> {
        let path = dir.join(FILE);
        let err = |error| RecordError {
            path: path.clone(),
            error,
        };
        let file = File {
            partition: ends
                .iter()
                .map(|(tp, end)| Entry {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    log_end: *end,
                })
                .collect(),
        };
        let text = toml::to_string(&file).map_err(|e| err(std::io::Error::other(e)))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
        tmp.write_all(text.as_bytes()).map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(&path).map_err(|e| err(e.error))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_vouches_only_for_the_same_log_end_until_consumed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (TopicPartition::new("a", 0), TopicPartition::new("b", 3));
        CleanShutdown::write(dir.path(), &[(a.clone(), 120), (b.clone(), 0)]).unwrap();
        let rec = CleanShutdown::read(dir.path()).unwrap();
        assert!(rec.intact(&a, 120));
        assert!(!rec.intact(&a, 0), "a log that lost its records");
        assert!(rec.intact(&b, 0));
        assert!(!rec.intact(&TopicPartition::new("a", 1), 0), "not recorded");
        // A start that fails before opening logs keeps it for the next.
        assert!(CleanShutdown::read(dir.path()).unwrap().intact(&a, 120));
        // Consumed: a crash of this run finds nothing.
        CleanShutdown::consume(dir.path()).unwrap();
        assert!(!dir.path().join(FILE).exists());
        assert!(!CleanShutdown::read(dir.path()).unwrap().intact(&a, 120));
        CleanShutdown::consume(dir.path()).unwrap();
    }

    #[test]
    fn an_unreadable_record_vouches_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "partition = 7").unwrap();
        let rec = CleanShutdown::read(dir.path()).unwrap();
        assert!(!rec.intact(&TopicPartition::new("a", 0), 0));
    }
}
