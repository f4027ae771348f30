//! Write-behind for storage plugins that keep their log in files: while a
//! partition is being appended to, a host thread syncs the files its
//! plugin changed under its data directory, every few tens of
//! milliseconds, off the plugin's call path.
//!
//! Why: a guest call is synchronous, so a plugin's own fsync stalls its
//! partition for as long as the kernel takes to write everything dirty.
//! The file plugin syncs once a second and at every segment roll, so at
//! 100 MB/s each of those syncs wrote ~100 MB and held appends (and with
//! them the HW) for ~100 ms. With the dirty data already on its way to
//! disk, the plugin's sync finds little left to do. This is Kafka's
//! background log flusher, minus the bookkeeping: syncing a file never
//! changes its content, so it cannot break a plugin's own ordering (an
//! index written only after its segment was synced, say); it only makes
//! the plugin's syncs short. The plugin's `fsync` policy still decides
//! what is durable when a call returns.
//!
//! A write error found here is logged. It is not lost to the plugin:
//! since Linux 4.13 every descriptor that was open when writeback failed
//! reports the error at its next fsync, and the plugin's were.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

/// Directory levels below the data directory that a round looks into.
const MAX_DEPTH: usize = 4;

/// How far before a round's start a file's modification time may lie and
/// still count as changed since that round: file systems stamp times with
/// a coarse clock.
const MTIME_SLACK: Duration = Duration::from_secs(1);

/// One partition's write-behind state, owned by its storage task.
pub(crate) struct WriteBehind {
    dir: PathBuf,
    period: Duration,
    label: Arc<str>,
    /// Successful appends so far.
    appends: u64,
    /// Appends a round has started for: the next round is wanted when
    /// `appends` is past it.
    started_for: u64,
    last_start: Instant,
    /// Files modified after this were not synced by a finished round.
    since: SystemTime,
    busy: Arc<AtomicBool>,
    /// A failure was logged at warn level; later ones go to debug, so a
    /// lasting one (a file the host may not open) does not flood the log.
    warned: Arc<AtomicBool>,
    /// Appends whose data a round that finished without a failure has
    /// synced.
    synced: Arc<watch::Sender<u64>>,
}

impl WriteBehind {
    pub(crate) fn new(dir: PathBuf, period: Duration, label: Arc<str>) -> Self {
        WriteBehind {
            dir,
            period,
            label,
            appends: 0,
            started_for: 0,
            last_start: Instant::now(),
            since: SystemTime::UNIX_EPOCH,
            busy: Arc::new(AtomicBool::new(false)),
            warned: Arc::new(AtomicBool::new(false)),
            synced: Arc::new(watch::channel(0).0),
        }
    }

    /// How many appends (counted from the log's opening) a finished round
    /// has synced, for callers that wait for one.
    pub(crate) fn synced(&self) -> watch::Receiver<u64> {
        self.synced.subscribe()
    }

    /// An append reached the plugin.
    pub(crate) fn appended(&mut self) {
        self.appends += 1;
    }

    /// When the next round should start, if one is wanted: a period after
    /// the last one started (so rounds run at most that often).
    pub(crate) fn due(&self) -> Option<Instant> {
        (self.appends > self.started_for).then(|| self.last_start + self.period)
    }

    /// Start a round on the blocking pool, unless the last one is still
    /// running (then the next `due` is a period later).
    pub(crate) fn start(&mut self) {
        self.last_start = Instant::now();
        if self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let covers = self.appends;
        self.started_for = covers;
        let started = SystemTime::now();
        let since = self.since;
        // The next round looks at what changed while this one ran.
        self.since = started.checked_sub(MTIME_SLACK).unwrap_or(started);
        let (dir, label) = (self.dir.clone(), self.label.clone());
        let (busy, synced) = (self.busy.clone(), self.synced.clone());
        let warned = self.warned.clone();
        tokio::task::spawn_blocking(move || {
            let failures = sync_changed(&dir, since);
            // Only a clean round vouches for the appends it covers.
            let clean = failures.is_empty();
            for (path, e) in failures {
                if warned.swap(true, Ordering::Relaxed) {
                    tracing::debug!(plugin = %label, "write-behind: syncing {}: {e}", path.display());
                } else {
                    tracing::warn!(
                        plugin = %label,
                        "write-behind: syncing {}: {e} (later failures are logged at debug level)",
                        path.display()
                    );
                }
            }
            busy.store(false, Ordering::Release);
            if clean {
                synced.send_replace(covers);
            }
        });
    }
}

/// Sync every regular file under `dir` (not following symbolic links)
/// modified at or after `since`. Files that vanish meanwhile are skipped;
/// other failures are returned.
fn sync_changed(dir: &Path, since: SystemTime) -> Vec<(PathBuf, std::io::Error)> {
    let (files, mut failures) = changed_files(dir, since);
    for path in files {
        match sync_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => failures.push((path, e)),
        }
    }
    failures
}

/// The regular files under `dir` (at most [`MAX_DEPTH`] levels down, not
/// through symbolic links) modified at or after `since`, and the
/// directories that could not be read.
fn changed_files(dir: &Path, since: SystemTime) -> (Vec<PathBuf>, Vec<(PathBuf, std::io::Error)>) {
    let (mut files, mut failures) = (Vec::new(), Vec::new());
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                failures.push((d, e));
                continue;
            }
        };
        for entry in entries.flatten() {
            // `DirEntry::metadata` does not follow a symbolic link, so a
            // plugin cannot point this at a file outside its directory.
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() && depth < MAX_DEPTH {
                stack.push((entry.path(), depth + 1));
            } else if meta.is_file() && meta.modified().is_ok_and(|m| m >= since) {
                files.push(entry.path());
            }
        }
    }
    (files, failures)
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // Read-only is enough to fsync on Linux; O_NOFOLLOW refuses a link
    // swapped in since the directory was read.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_files_are_found_links_are_not_followed_and_a_missing_directory_is_no_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.log"), b"x").expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/b.log"), b"y").expect("write");
        std::fs::write(outside.path().join("secret"), b"z").expect("write");
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link"))
            .expect("symlink");
        // Everything present syncs without failures, links skipped.
        assert!(sync_changed(dir.path(), SystemTime::UNIX_EPOCH).is_empty());
        let (mut files, failures) = changed_files(dir.path(), SystemTime::UNIX_EPOCH);
        files.sort();
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(
            files,
            [dir.path().join("a.log"), dir.path().join("sub/b.log")],
            "the files in the tree, not the link out of it"
        );
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert_eq!(
            changed_files(dir.path(), later).0,
            Vec::<PathBuf>::new(),
            "files unchanged since are left alone"
        );
        // A directory that is gone is nothing to do, not a failure.
        assert!(sync_changed(&dir.path().join("gone"), SystemTime::UNIX_EPOCH).is_empty());
    }
}
