//! The segmented log of one partition on disk, and its recovery.
//!
//! Layout of the partition directory:
//! - `<base:020>.log`: segments, batches back to back; the last one is active.
//! - `<base:020>.index`: offset index of a closed segment, written on roll.
//! - `high-watermark`, `leader-epochs`, `log-start`: checkpoints, each
//!   replaced atomically (temp file + rename).
//! - `<base:020>.deleted`: a segment retention released, freed a piece at
//!   a time (see `Retired`); removed on open if a crash left it.
//! - `<base:020>.spare`: a segment retention released, kept whole for the
//!   next roll to overwrite (see `FileLog::spare`); removed on open and on
//!   close.
//!
//! Recovery trusts a closed segment's index only when it is intact and
//! matches the segment's size; otherwise it scans the segment. The active
//! segment is always scanned with CRCs, and a torn or corrupt tail is cut
//! back to the last whole batch, dropping any later segment (its offsets
//! could no longer be contiguous).

use replicator_plugin_sdk::index::{self, AppendError, Entry, OffsetIndex};
use replicator_plugin_sdk::{
    BatchHeader, HEADER_LEN, HeaderError, crc32c, read_u32_le, read_u64_le, verify_crc,
};
use wasip2::filesystem::types::Descriptor;

use crate::config::{Config, Fsync};
use crate::fs::{self, FsResult};

pub enum Error {
    Conflict(String),
    Invalid(String),
    OutOfRange,
    Io(String),
    /// An fsync failed, and the log was cut back to what is known to be
    /// on disk (see `FileLog::sync_failed`): an `io` error to the host,
    /// but nothing a caller here may retry.
    SyncFailed(String),
    Corrupt(String),
}

impl Error {
    /// What went wrong, in words.
    pub fn message(&self) -> String {
        match self {
            Error::Conflict(m)
            | Error::Invalid(m)
            | Error::Io(m)
            | Error::SyncFailed(m)
            | Error::Corrupt(m) => m.clone(),
            Error::OutOfRange => "offset out of range".into(),
        }
    }
}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error::Io(s)
    }
}

impl From<AppendError> for Error {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::NotContiguous { .. } => Error::Conflict(e.to_string()),
            _ => Error::Invalid(e.to_string()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    pos: u64,
}

enum IndexFile {
    Missing,
    Damaged,
    Valid(Vec<Entry<Loc>>),
}

struct Segment {
    base: u64,
    name: String,
    file: Descriptor,
    size: u64,
    /// A spare's file: it may hold bytes past `size` from its former life,
    /// which are cut when the segment closes.
    recycled: bool,
}

impl Segment {
    /// Cut what a recycled segment holds past its end, so a closed
    /// segment's size is its data's (its index must cover it all).
    fn cut_stale_tail(&self) -> FsResult<()> {
        if self.recycled {
            self.file
                .set_size(self.size)
                .map_err(|e| fs::err("truncate", &self.name, e))?;
        }
        Ok(())
    }
}

/// A segment retention released, renamed out of the log and shrunk from
/// its end a piece per `delete_prefix` call until it is gone. Why: removing
/// a 64 MiB file at once held the partition's store for 10-38 ms (the
/// kernel frees every cached page and extent in that call), which
/// stalled every append behind it, as Kafka avoids by deleting segments
/// from a background thread. A guest has no thread of its own, so it pays
/// as it goes: each call frees at least as many bytes as it released.
struct Retired {
    name: String,
    file: Descriptor,
    size: u64,
}

/// The least a `delete_prefix` call frees of retired segments.
const FREE_AT_LEAST: u64 = 1024 * 1024;

const HW_FILE: &str = "high-watermark";
const EPOCH_FILE: &str = "leader-epochs";
const START_FILE: &str = "log-start";
/// Where a failed fsync's cut back must end, when the cut itself failed:
/// the next open finishes it.
const CUT_FILE: &str = "cut-to";
const RETIRED_SUFFIX: &str = ".deleted";
const SPARE_SUFFIX: &str = ".spare";
const INDEX_MAGIC: &[u8; 4] = b"RIX1";
const INDEX_ENTRY: usize = 32;
const SCAN_WINDOW: u64 = 1024 * 1024;

pub struct FileLog {
    dir: Descriptor,
    config: Config,
    segments: Vec<Segment>,
    index: OffsetIndex<Loc>,
    hw: u64,
    epochs: Vec<(u32, u64)>,
    last_sync_ns: u64,
    unsynced: bool,
    /// The log end when the log was last known to be on disk entirely:
    /// data synced and every segment's name in a synced directory. What
    /// lies past it may be lost by a power failure, and is cut if an
    /// fsync fails (see `sync_failed`).
    durable_end: u64,
    /// A segment was created (or a spare renamed to one) since the
    /// directory was last synced. Until it is, a power loss can drop the
    /// new file's name, and with it batches its own sync made durable:
    /// the next sync of data syncs the directory too.
    dir_unsynced: bool,
    /// Closed segments not yet synced and indexed (`fsync = never`).
    unindexed: Vec<u64>,
    /// The log start moved inside the log (retention) since the
    /// `log-start` checkpoint was last written; written at `sync` (flush)
    /// and on close. See `delete_prefix` for why that is enough.
    start_pending: bool,
    /// Released segments not yet freed, oldest first.
    retired: Vec<Retired>,
    /// One released segment kept whole, which the next new segment takes
    /// over (renamed) and overwrites from its start. Why: writing into a
    /// file's cached pages costs the kernel far less than a new file's
    /// (no page allocation, no delayed block allocation, nothing to free
    /// at retention), and retention releases a segment for every one a
    /// busy partition rolls. Safe to overwrite in place because every
    /// offset in it is below the log start, and so below every offset
    /// this log will write: recovery's scan, which wants each batch to
    /// start at the offset the previous one ended, stops at the first
    /// stale batch (and cuts it), as it does at a torn write.
    spare: Option<Retired>,
    /// What recovery did, for the host's log.
    pub recovery_notes: Vec<String>,
}

fn seg_name(base: u64) -> String {
    format!("{base:020}.log")
}

fn index_name(base: u64) -> String {
    format!("{base:020}.index")
}

fn now_ns() -> u64 {
    wasip2::clocks::monotonic_clock::now()
}

impl FileLog {
    pub fn open(config: Config) -> Result<FileLog, Error> {
        let dir = fs::data_dir()?;
        let mut bases = Vec::new();
        let mut stray = Vec::new();
        for name in fs::list(&dir)? {
            if name.ends_with(".tmp")
                || name.ends_with(RETIRED_SUFFIX)
                || name.ends_with(SPARE_SUFFIX)
            {
                // Half-written checkpoints, and segments retention released
                // before a crash: nothing in either belongs to the log.
                fs::remove(&dir, &name)?;
            } else if let Some(b) = name.strip_suffix(".log") {
                match b.parse::<u64>() {
                    Ok(base) if b.len() == 20 => bases.push(base),
                    _ => stray.push(name),
                }
            }
        }
        bases.sort_unstable();
        // Not one to set aside: it says which offsets are gone.
        let start_ckpt = match fs::read_small(&dir, START_FILE)? {
            Some(b) => Some(parse_u64(&b, START_FILE).map_err(|e| {
                Error::Corrupt(format!(
                    "{}; move the partition directory aside to let replication rebuild it",
                    e.message()
                ))
            })?),
            None => None,
        };
        let mut log = FileLog {
            dir,
            config,
            segments: Vec::new(),
            index: OffsetIndex::empty_at(bases.first().copied().or(start_ckpt).unwrap_or(0)),
            hw: 0,
            epochs: Vec::new(),
            last_sync_ns: now_ns(),
            // Nothing is known to be on disk yet: what recovery found may
            // be a killed process's writes still in the page cache. The
            // sync at the end of `open` settles all three.
            unsynced: true,
            durable_end: 0,
            dir_unsynced: true,
            unindexed: Vec::new(),
            start_pending: false,
            retired: Vec::new(),
            spare: None,
            recovery_notes: Vec::new(),
        };
        for name in stray {
            log.recovery_notes
                .push(format!("ignoring `{name}`: not a segment name"));
        }
        log.recover_segments(&bases)?;
        if let Some(start) = start_ckpt.filter(|&s| s > log.index.log_end()) {
            // A reset past the end (delete-prefix) was checkpointed but the
            // crash came before the old segments were gone: finish it.
            log.recovery_notes
                .push(format!("completing an interrupted reset to offset {start}"));
            let all: Vec<u64> = log.segments.iter().map(|s| s.base).collect();
            log.segments.clear();
            log.drop_files(&all)?;
            log.index = OffsetIndex::empty_at(start);
        }
        if log.segments.is_empty() {
            let at = start_ckpt.unwrap_or(0).max(log.index.log_end());
            log.index = OffsetIndex::empty_at(at);
            log.create_segment(at)?;
        }
        if let Some(start) = start_ckpt {
            log.index.set_log_start(start.max(log.index.log_start()));
        }
        // A cut back that a failed fsync asked for and could not finish
        // (see `sync_failed`): what lies past it may not be on disk,
        // though the page cache still shows it whole. Finish it first.
        if let Some(b) = fs::read_small(&log.dir, CUT_FILE)? {
            let to = parse_u64(&b, CUT_FILE)?;
            let (start, end) = log.bounds();
            if (start..end).contains(&to) {
                log.recovery_notes.push(format!(
                    "finishing the cut back to offset {to} that a failed fsync asked for"
                ));
                log.truncate(to)?;
            }
            fs::remove(&log.dir, CUT_FILE)?;
            fs::sync_dir_checked(&log.dir, CUT_FILE)?;
        }
        // Both checkpoints are summaries the replica can do without: a
        // damaged one (written atomically, so only the disk or a hand
        // could damage it) is noted and set aside, not a partition that
        // never opens again. The HW is then 0 until the leader says where
        // it is (a lower HW only holds back what readers see), and the
        // host rebuilds an empty epoch cache from the batches' epochs.
        if let Some(b) = fs::read_small(&log.dir, HW_FILE)? {
            match parse_u64(&b, HW_FILE) {
                Ok(hw) => log.hw = hw,
                Err(e) => log.recovery_notes.push(format!(
                    "{}; taking the high watermark as 0 until the leader's is known",
                    e.message()
                )),
            }
        }
        if let Some(b) = fs::read_small(&log.dir, EPOCH_FILE)? {
            match parse_epochs(&b) {
                Ok(epochs) => log.epochs = epochs,
                Err(e) => log.recovery_notes.push(format!(
                    "{}; leaving the leader-epoch cache empty, for the host to rebuild from the batches",
                    e.message()
                )),
            }
        }
        let before = log.epochs.len();
        index::truncate_epochs(&mut log.epochs, log.index.log_end(), |e| e.1);
        if log.epochs.len() != before {
            log.write_epochs()?;
        }
        // Make what recovery found durable before anything is built on it
        // (and index segments a crash left unindexed under `fsync =
        // never`). A failure fails the open, cutting nothing: the host
        // retries it.
        log.durable_end = log.index.log_end();
        log.sync().map_err(|e| match e {
            Error::SyncFailed(m) => Error::Io(m),
            e => e,
        })?;
        Ok(log)
    }

    fn recover_segments(&mut self, bases: &[u64]) -> Result<(), Error> {
        for (i, &base) in bases.iter().enumerate() {
            let name = seg_name(base);
            if base != self.index.log_end() {
                // Only corruption produces a gap (truncation removes later
                // segments last-first). Refuse rather than drop data.
                return Err(Error::Corrupt(format!(
                    "segment {name} starts at {base} but the segments before it end at {}; \
                     move the partition directory aside to let replication rebuild it",
                    self.index.log_end()
                )));
            }
            let file = fs::open(&self.dir, &name, false, false)?;
            let size = fs::size(&file, &name)?;
            let active = i + 1 == bases.len();
            // An index is written only after its segment was synced, so a
            // segment with one (even a damaged one) held durable data.
            let (indexed, durable) = if active {
                fs::remove(&self.dir, &index_name(base))?;
                (None, false)
            } else {
                match self.load_index(base, size)? {
                    IndexFile::Valid(entries) => (Some(entries), true),
                    IndexFile::Damaged => (None, true),
                    IndexFile::Missing => (None, false),
                }
            };
            let indexed_missing = indexed.is_none();
            let (entries, valid) = match indexed {
                Some(entries) => (entries, size),
                None => scan(&file, &name, base, size)?,
            };
            if valid < size && durable {
                // Damage in data that was on disk: corruption, not a torn
                // write. Cutting would drop every later segment; refuse.
                return Err(Error::Corrupt(format!(
                    "closed segment {name} is damaged at byte {valid} of {size}; \
                     move the partition directory aside to let replication rebuild it"
                )));
            }
            for e in entries {
                self.index.push(e);
            }
            self.segments.push(Segment {
                base,
                name: name.clone(),
                file,
                size: valid,
                recycled: false,
            });
            if !active && indexed_missing {
                // Index it at the next flush, once its data is synced.
                self.unindexed.push(base);
            }
            if valid < size {
                // A write that never reached the disk (torn tail, or a
                // segment closed without a sync under `fsync = never`).
                self.recovery_notes.push(format!(
                    "cut {} torn or corrupt bytes from {name} at position {valid}",
                    size - valid
                ));
                let seg = self.segments.last().ok_or(Error::Io("no segment".into()))?;
                seg.file
                    .set_size(valid)
                    .map_err(|e| fs::err("truncate", &name, e))?;
                fs::sync(&seg.file, &name)?;
                if !active {
                    self.recovery_notes.push(format!(
                        "{} later segment(s) dropped: they follow the cut",
                        bases.len() - i - 1
                    ));
                    self.drop_files(&bases[i + 1..])?;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Remove the segments at the end of the log (and their indexes),
    /// highest offset first, so a crash midway leaves a contiguous log;
    /// then sync the directory.
    fn drop_files(&self, bases: &[u64]) -> FsResult<()> {
        let mut sorted = bases.to_vec();
        sorted.sort_unstable();
        for &b in sorted.iter().rev() {
            fs::remove(&self.dir, &index_name(b))?;
            fs::remove(&self.dir, &seg_name(b))?;
        }
        if !sorted.is_empty() {
            fs::sync_dir(&self.dir);
        }
        Ok(())
    }

    /// Take the segments below `base` out of the log, lowest offset
    /// first: a crash midway must leave a contiguous suffix, where highest
    /// first would leave a gap that recovery refuses as corruption. Each
    /// loses its index and is renamed to `.deleted`, which open removes;
    /// its space is freed later by `free_retired`.
    fn retire_before(&mut self, base: u64) -> FsResult<()> {
        let n = self.segments.partition_point(|s| s.base < base);
        let gone: Vec<Segment> = self.segments.drain(..n).collect();
        for seg in gone {
            fs::remove(&self.dir, &index_name(seg.base))?;
            let keep = self.spare.is_none();
            let suffix = if keep { SPARE_SUFFIX } else { RETIRED_SUFFIX };
            let name = format!("{:020}{suffix}", seg.base);
            self.dir
                .rename_at(&seg.name, &self.dir, &name)
                .map_err(|e| fs::err("rename", &seg.name, e))?;
            let r = Retired {
                name,
                file: seg.file,
                size: seg.size,
            };
            if keep {
                self.spare = Some(r);
            } else {
                self.retired.push(r);
            }
        }
        if n > 0 {
            fs::sync_dir(&self.dir);
        }
        Ok(())
    }

    /// Free up to `budget` bytes of retired segments, oldest first, by
    /// shrinking them from the end; an emptied one is removed. Best effort:
    /// a failure leaves the file for the next call (or the next open).
    fn free_retired(&mut self, mut budget: u64) {
        while budget > 0 {
            let Some(r) = self.retired.first_mut() else {
                return;
            };
            let cut = budget.min(r.size);
            if r.file.set_size(r.size - cut).is_err() {
                return;
            }
            r.size -= cut;
            budget -= cut;
            if r.size == 0 {
                // Dropping the entry closes the file before its removal.
                let name = self.retired.remove(0).name;
                if fs::remove(&self.dir, &name).is_err() {
                    return;
                }
            }
        }
    }

    /// Checkpoint `start` as the log start, durably; nothing is pending
    /// after it.
    fn write_start(&mut self, start: u64) -> FsResult<()> {
        fs::write_atomic(&self.dir, START_FILE, format!("{start}\n").as_bytes())?;
        self.start_pending = false;
        Ok(())
    }

    /// The stored index of a closed segment, if intact and consistent.
    fn load_index(&mut self, base: u64, size: u64) -> FsResult<IndexFile> {
        let name = index_name(base);
        let Some(bytes) = fs::read_small(&self.dir, &name)? else {
            return Ok(IndexFile::Missing);
        };
        let crc_at = bytes.len().saturating_sub(4);
        let ok = bytes.len() >= 8
            && &bytes[..4] == INDEX_MAGIC
            && (crc_at - 4) % INDEX_ENTRY == 0
            && crc32c(&bytes[..crc_at]) == read_u32_le(&bytes, crc_at);
        if !ok {
            self.recovery_notes.push(format!(
                "index {name} is damaged: rebuilding from the segment"
            ));
            return Ok(IndexFile::Damaged);
        }
        let mut entries = Vec::new();
        let (mut next_base, mut next_pos) = (base, 0u64);
        for chunk in bytes[4..crc_at].chunks_exact(INDEX_ENTRY) {
            let e = Entry {
                base: read_u64_le(chunk, 0),
                next: read_u64_le(chunk, 8),
                loc: Loc {
                    segment: base,
                    pos: read_u64_le(chunk, 16),
                },
                len: read_u32_le(chunk, 24),
                leader_epoch: read_u32_le(chunk, 28),
            };
            if e.base != next_base || e.next <= e.base || e.loc.pos != next_pos {
                self.recovery_notes
                    .push(format!("index {name} is inconsistent: rebuilding"));
                return Ok(IndexFile::Damaged);
            }
            next_base = e.next;
            next_pos = e.loc.pos + u64::from(e.len);
            entries.push(e);
        }
        if next_pos != size {
            self.recovery_notes.push(format!(
                "index {name} covers {next_pos} bytes of {size}: rebuilding"
            ));
            return Ok(IndexFile::Damaged);
        }
        Ok(IndexFile::Valid(entries))
    }

    fn write_index(&self, seg: &Segment) -> FsResult<()> {
        let entries: Vec<_> = self
            .index
            .entries()
            .filter(|e| e.loc.segment == seg.base)
            .collect();
        let mut out = Vec::with_capacity(8 + entries.len() * INDEX_ENTRY);
        out.extend_from_slice(INDEX_MAGIC);
        for e in entries {
            out.extend_from_slice(&e.base.to_le_bytes());
            out.extend_from_slice(&e.next.to_le_bytes());
            out.extend_from_slice(&e.loc.pos.to_le_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
            out.extend_from_slice(&e.leader_epoch.to_le_bytes());
        }
        let crc = crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        fs::write_atomic(&self.dir, &index_name(seg.base), &out)
    }

    fn create_segment(&mut self, base: u64) -> FsResult<()> {
        let name = seg_name(base);
        self.dir_unsynced = true;
        if let Some(spare) = self.spare.take() {
            if self.dir.rename_at(&spare.name, &self.dir, &name).is_ok() {
                self.segments.push(Segment {
                    base,
                    name,
                    file: spare.file,
                    size: 0,
                    recycled: true,
                });
                return Ok(());
            }
            // Free it like any released segment; start a new file.
            self.retired.push(spare);
        }
        let file = fs::open(&self.dir, &name, true, true)?;
        self.segments.push(Segment {
            base,
            name,
            file,
            size: 0,
            recycled: false,
        });
        Ok(())
    }

    fn active(&self) -> Result<&Segment, Error> {
        self.segments
            .last()
            .ok_or_else(|| Error::Io("the log has no active segment".into()))
    }

    pub fn bounds(&self) -> (u64, u64) {
        (self.index.log_start(), self.index.log_end())
    }

    pub fn append(&mut self, bytes: &[u8]) -> Result<u64, Error> {
        let located = index::check_append(bytes, self.index.log_end())?;
        let needs_roll = {
            let a = self.active()?;
            a.size > 0 && a.size + bytes.len() as u64 > self.config.segment_bytes
        };
        if needs_roll && let Err(e) = self.roll() {
            // A roll writes the closed segment's index and may create a
            // file, which a full disk refuses while released segments hold
            // space (a roll can be retried: every step of it can be redone).
            // Not a failed fsync: a second one would succeed without the
            // data being on disk (see `sync_failed`).
            if matches!(e, Error::SyncFailed(_)) || !self.free_all_released() {
                return Err(e);
            }
            self.roll()?;
        }
        let (seg_base, start) = {
            let a = self.active()?;
            (a.base, a.size)
        };
        let now = now_ns();
        let sync_now = match self.config.fsync {
            Fsync::Always => true,
            Fsync::IntervalMs(ms) => {
                now.saturating_sub(self.last_sync_ns) >= ms.saturating_mul(1_000_000)
            }
            Fsync::Never => false,
        };
        let mut written = self.write_at(start, bytes);
        if written.as_ref().is_err_and(|e| e.out_of_space) && self.free_all_released() {
            // The space released segments held is worth more to a full
            // disk than a cheaper roll or a smoother retention.
            written = self.write_at(start, bytes);
        }
        written.map_err(|e| Error::Io(e.message))?;
        if sync_now {
            // The data, then the segment's name if it is new: both before
            // the batch counts as appended, so a failure leaves nothing of
            // it in memory.
            let synced = {
                let a = self.active()?;
                fs::sync(&a.file, &a.name)
            }
            .and_then(|()| self.sync_dir_if_changed());
            if let Err(m) = synced {
                self.cut_failed_write(start);
                return Err(self.sync_failed(m));
            }
        }
        for l in located {
            let h = l.header;
            self.index.push(Entry {
                base: h.base_offset,
                next: h.next_offset(),
                leader_epoch: h.leader_epoch,
                len: h.batch_len,
                loc: Loc {
                    segment: seg_base,
                    pos: start + l.start as u64,
                },
            });
        }
        if let Some(a) = self.segments.last_mut() {
            a.size = start + bytes.len() as u64;
        }
        if sync_now {
            self.last_sync_ns = now;
            self.unsynced = false;
            self.durable_end = self.index.log_end();
        } else {
            self.unsynced = true;
        }
        Ok(self.index.log_end())
    }

    /// Write `bytes` at `start` of the active segment, all or nothing: a
    /// failure leaves no partial batch behind.
    fn write_at(&mut self, start: u64, bytes: &[u8]) -> Result<(), fs::WriteFailed> {
        let a = self.active().map_err(|_| fs::WriteFailed {
            message: "the log has no active segment".into(),
            out_of_space: false,
        })?;
        let written = fs::write_all_at(&a.file, &a.name, start, bytes);
        if written.is_err() {
            self.cut_failed_write(start);
        }
        written
    }

    /// Cut what a failed append wrote past `start` of the active segment.
    /// If the cut fails too, the bytes stay past the segment's end: they
    /// are marked to be cut when it closes (as a recycled segment's
    /// are), or its index would cover less than its file, which the next
    /// open refuses as damage.
    fn cut_failed_write(&mut self, start: u64) {
        if let Some(a) = self.segments.last_mut()
            && a.file.set_size(start).is_err()
        {
            a.recycled = true;
        }
    }

    /// An fsync failed: what it was to make durable may not be on disk,
    /// and may never be. Linux reports a failed writeback once, marks the
    /// pages clean and keeps them cached, so a second fsync succeeds and
    /// reads still show the data, until the pages are evicted or the power
    /// fails (PostgreSQL's "fsyncgate"). So the log is cut back to the
    /// last end known to be on disk (the cut drops the suspect pages) and
    /// the cut made durable. The caller answers `io`; the host, finding
    /// the log end lower than it was, reopens the log and counts this
    /// replica as having lost records, which it fetches again from the
    /// leader. If the cut fails too, it is noted for the next open to
    /// finish (`CUT_FILE`), and the plugin traps: the host reopens the log,
    /// and that open cuts what the page cache still shows whole.
    fn sync_failed(&mut self, why: String) -> Error {
        let (start, end) = self.bounds();
        let to = self.durable_end;
        if to >= end {
            return Error::SyncFailed(why);
        }
        if self.config.fsync == Fsync::Never {
            // Nothing is promised on disk before a flush, and the last one
            // may be days old (the host flushes at shutdown): cutting back
            // to it would drop what replication, and the host's
            // write-behind, made safe meanwhile.
            return Error::SyncFailed(format!(
                "{why}; with fsync = never nothing past the last flush is known to be on disk"
            ));
        }
        if to < start {
            // Retention passed the last end known on disk: nothing left in
            // the log is known to be there, and nothing is cut.
            return Error::SyncFailed(format!(
                "{why}; nothing left in the log is known to be on disk"
            ));
        }
        match self.truncate(to) {
            // The cut synced the active segment: nothing is pending.
            Ok(now) => {
                self.unsynced = false;
                self.last_sync_ns = now_ns();
                Error::SyncFailed(format!(
                    "{why}; cut the log back from offset {end} to {now}, the last end known to be on disk"
                ))
            }
            Err(e) => {
                // The next open must finish the cut: the page cache it
                // reads still shows the suspect batches as whole.
                let marked = fs::write_atomic(&self.dir, CUT_FILE, format!("{to}\n").as_bytes());
                panic!(
                    "{why}; cutting the log back to offset {to}, the last end known to be on disk, failed too ({}); {}",
                    e.message(),
                    match marked {
                        Ok(()) => "the next open finishes the cut".to_string(),
                        Err(m) => format!("noting it for the next open failed as well ({m})"),
                    }
                )
            }
        }
    }

    /// Free the spare and every retired segment now. Whether there was
    /// any to free.
    fn free_all_released(&mut self) -> bool {
        let any = self.spare.is_some() || !self.retired.is_empty();
        // The spare goes the way of any released segment: emptied, then
        // removed. Emptying is what frees its blocks at once: an unlinked
        // file keeps them while any descriptor is open, and another may be
        // (the host's write-behind syncs changed files on its own thread).
        if let Some(spare) = self.spare.take() {
            self.retired.push(spare);
        }
        self.free_retired(u64::MAX);
        any
    }

    fn roll(&mut self) -> Result<(), Error> {
        let a = self.active()?;
        a.cut_stale_tail()?;
        let base = a.base;
        if self.config.fsync == Fsync::Never {
            // No sync now; the index waits for the next `flush`. Until then
            // recovery scans this segment and may cut it like a torn tail.
            self.unindexed.push(base);
        } else {
            // The closed segment was the active one: with its name in the
            // directory synced too, the whole log is on disk.
            self.close_segment(base)?;
            if let Err(m) = self.sync_dir_if_changed() {
                return Err(self.sync_failed(m));
            }
            self.unsynced = false;
            self.durable_end = self.index.log_end();
        }
        self.create_segment(self.index.log_end())?;
        Ok(())
    }

    /// Sync a closed segment, then write its index: recovery trusts an
    /// index only because the data was on disk before it.
    fn close_segment(&mut self, base: u64) -> Result<(), Error> {
        let synced = {
            let seg = self.segment(base)?;
            fs::sync(&seg.file, &seg.name)
        };
        if let Err(m) = synced {
            return Err(self.sync_failed(m));
        }
        self.write_index(self.segment(base)?)?;
        Ok(())
    }

    /// Sync the directory if a segment was created since it last was.
    fn sync_dir_if_changed(&mut self) -> FsResult<()> {
        if self.dir_unsynced {
            let name = self
                .segments
                .last()
                .map_or_else(|| "the log".to_string(), |a| a.name.clone());
            fs::sync_dir_checked(&self.dir, &name)?;
            self.dir_unsynced = false;
        }
        Ok(())
    }

    pub fn sync(&mut self) -> Result<(), Error> {
        self.free_retired(u64::MAX);
        if self.start_pending {
            self.write_start(self.index.log_start())?;
        }
        if self.unsynced {
            let synced = {
                let a = self.active()?;
                fs::sync(&a.file, &a.name)
            };
            if let Err(m) = synced {
                return Err(self.sync_failed(m));
            }
            self.unsynced = false;
        }
        if let Err(m) = self.sync_dir_if_changed() {
            return Err(self.sync_failed(m));
        }
        let active = self.active()?.base;
        // One by one, each off the list once indexed: a failure leaves
        // the rest for the next flush (a failed sync cuts them away).
        while let Some(&base) = self.unindexed.first() {
            // Segments truncated away or reopened as active need no index.
            if base < active && self.segments.iter().any(|s| s.base == base) {
                self.close_segment(base)?;
            }
            self.unindexed.retain(|&b| b != base);
        }
        self.durable_end = self.index.log_end();
        self.last_sync_ns = now_ns();
        Ok(())
    }

    pub fn read(&self, offset: u64, max_bytes: u32) -> Result<Vec<u8>, Error> {
        let range = self
            .index
            .read_range(offset, max_bytes)
            .map_err(|_: index::OutOfRange| Error::OutOfRange)?;
        let mut out = Vec::new();
        let mut i = range.start;
        while i < range.end {
            // Read every following batch of the same segment in one go.
            let first = self.index.get(i).ok_or(Error::OutOfRange)?;
            let (seg, pos) = (first.loc.segment, first.loc.pos);
            let mut len = 0u64;
            while i < range.end {
                match self.index.get(i) {
                    Some(e) if e.loc.segment == seg => {
                        len += u64::from(e.len);
                        i += 1;
                    }
                    _ => break,
                }
            }
            let s = self.segment(seg)?;
            fs::read_exact_at(&s.file, &s.name, pos, len, &mut out)?;
        }
        Ok(out)
    }

    fn segment(&self, base: u64) -> Result<&Segment, Error> {
        let i = self.segments.partition_point(|s| s.base < base);
        match self.segments.get(i) {
            Some(s) if s.base == base => Ok(s),
            _ => Err(Error::Corrupt(format!(
                "index points at missing segment {base}"
            ))),
        }
    }

    pub fn truncate(&mut self, offset: u64) -> Result<u64, Error> {
        let (start, end) = self.bounds();
        if offset < start || offset > end {
            return Err(Error::OutOfRange);
        }
        let removed = self.index.truncate(offset);
        if self.index.log_start() < start {
            // The batch straddling the log start went: the start follows the
            // end down, and the checkpoint must not resurrect the old one.
            self.write_start(self.index.log_start())?;
        }
        if let Some(first) = removed.first() {
            let cut = first.loc;
            let later: Vec<u64> = self
                .segments
                .iter()
                .map(|s| s.base)
                .filter(|&b| b > cut.segment)
                .collect();
            self.segments.retain(|s| s.base <= cut.segment);
            self.drop_files(&later)?;
            fs::remove(&self.dir, &index_name(cut.segment))?;
            let a = self.segments.last_mut().ok_or(Error::OutOfRange)?;
            a.file
                .set_size(cut.pos)
                .map_err(|e| fs::err("truncate", &a.name, e))?;
            a.size = cut.pos;
            // A truncation that a crash undid could resurrect divergent
            // batches: make it durable before answering.
            fs::sync(&a.file, &a.name)?;
            let name = a.name.clone();
            fs::sync_dir_checked(&self.dir, &name)?;
        }
        let end = self.index.log_end();
        self.durable_end = self.durable_end.min(end);
        let before = self.epochs.len();
        index::truncate_epochs(&mut self.epochs, end, |e| e.1);
        if self.epochs.len() != before {
            self.write_epochs()?;
        }
        Ok(end)
    }

    /// Move the log start to `offset`. Two cases, with different needs:
    ///
    /// - A reset (`offset` at or past the end: a follower restarting at its
    ///   leader's log start) empties the log. Its checkpoint is durable
    ///   before any file goes: a crash midway then finishes the job on open
    ///   instead of handing out the old offsets again.
    /// - Retention (`offset` inside the log) keeps every batch above it,
    ///   so a stale checkpoint can only make a crashed log start lower,
    ///   inside its first remaining segment (open takes the larger of the
    ///   checkpoint and that segment's base): committed batches retention
    ///   had released come back, and the next retention pass releases them
    ///   again. Nothing is lost or reordered, as in Kafka, whose retention
    ///   deletes whole segments and checkpoints the start every minute. So
    ///   the checkpoint waits for `sync` or close, instead of two syncs per
    ///   call: retention in steps of a sixteenth of its limit called this
    ///   ~27 times a second per partition at 100 MB/s.
    pub fn delete_prefix(&mut self, offset: u64) -> Result<(), Error> {
        if offset <= self.index.log_start() {
            return Ok(());
        }
        let resets = offset >= self.index.log_end();
        if resets {
            self.write_start(offset)?;
        }
        let released: u64 = self
            .index
            .delete_prefix(offset)
            .iter()
            .map(|e| u64::from(e.len))
            .sum();
        // Empty exactly when `resets`: a batch that ends past `offset` stays.
        if self.index.is_empty() {
            // Nothing left (or a reset past the end): start afresh at `offset`.
            let all: Vec<u64> = self.segments.iter().map(|s| s.base).collect();
            self.segments.clear();
            self.drop_files(&all)?;
            // A reset removes everything at once anyway (it is rare); no
            // retention call may follow soon to free what is retired.
            self.free_retired(u64::MAX);
            let at = self.index.log_end();
            self.index = OffsetIndex::empty_at(at);
            self.create_segment(at)?;
            // Nothing past the durable reset checkpoint.
            self.durable_end = at;
        } else {
            let keep_from = self
                .index
                .get(0)
                .map(|e| e.loc.segment)
                .ok_or(Error::OutOfRange)?;
            self.retire_before(keep_from)?;
            self.start_pending = true;
            self.free_retired(released.max(FREE_AT_LEAST));
        }
        self.index.set_log_start(offset);
        Ok(())
    }

    /// Empty the log and restart it at `offset`, below the start too (the
    /// WIT's `reset`).
    pub fn reset(&mut self, offset: u64) -> Result<(), Error> {
        // The cache describes batches that are about to go; emptied first,
        // so a crash part-way leaves no entry past what is left.
        self.set_epochs(Vec::new())?;
        if offset >= self.index.log_end() {
            // Past the end: delete-prefix's reset, its checkpoint first
            // (open completes it after a crash).
            return self.delete_prefix(offset);
        }
        // Below the end, the old batches go first (highest first, so a
        // crash part-way leaves a prefix of the old log), and then the new
        // start is checkpointed: a crash between leaves an empty log at
        // the old checkpoint, no higher than the old start, and never a
        // checkpoint below segments that are still there.
        let all: Vec<u64> = self.segments.iter().map(|s| s.base).collect();
        self.segments.clear();
        self.drop_files(&all)?;
        // The spare too: a spare is overwritten in place only because its
        // batches lie below every offset the log will write, which a start
        // moved back no longer promises (a crash could let recovery scan
        // stale batches that happen to follow the new ones).
        self.free_all_released();
        self.unindexed.clear();
        self.index = OffsetIndex::empty_at(offset);
        // Synced with the directory, which makes the removals durable too.
        self.write_start(offset)?;
        self.create_segment(offset)?;
        self.durable_end = offset;
        Ok(())
    }

    pub fn high_watermark(&self) -> u64 {
        self.hw
    }

    pub fn set_high_watermark(&mut self, hw: u64) -> Result<(), Error> {
        fs::write_atomic(&self.dir, HW_FILE, format!("{hw}\n").as_bytes())?;
        self.hw = hw;
        Ok(())
    }

    pub fn epochs(&self) -> &[(u32, u64)] {
        &self.epochs
    }

    /// Written, then taken: a failed write leaves the cache as stored.
    pub fn set_epochs(&mut self, epochs: Vec<(u32, u64)>) -> Result<(), Error> {
        write_epochs(&self.dir, &epochs)?;
        self.epochs = epochs;
        Ok(())
    }

    fn write_epochs(&self) -> Result<(), Error> {
        write_epochs(&self.dir, &self.epochs)
    }
}

impl Drop for FileLog {
    /// A clean close keeps the exact log start (best effort: if this fails,
    /// the start is the first segment's base on open, as after a crash)
    /// and leaves no retired segment behind.
    fn drop(&mut self) {
        self.free_all_released();
        if let Some(a) = self.segments.last() {
            let _ = a.cut_stale_tail();
        }
        if self.start_pending {
            let _ = self.write_start(self.index.log_start());
        }
    }
}

/// Walk a segment's batches from the start, checking framing and CRCs.
/// Returns the whole batches and the length of the valid prefix.
fn scan(file: &Descriptor, name: &str, base: u64, size: u64) -> FsResult<(Vec<Entry<Loc>>, u64)> {
    let mut entries = Vec::new();
    let mut pos = 0u64;
    let mut expected = base;
    let mut window = Vec::new();
    let mut window_start = 0u64;
    while pos < size {
        // Make sure the window holds the header at `pos`, then the batch.
        let mut need = HEADER_LEN as u64;
        let header = loop {
            let have = (window_start + window.len() as u64).saturating_sub(pos);
            if have < need {
                if size - pos < need {
                    return Ok((entries, pos));
                }
                window.clear();
                window_start = pos;
                let len = need.max(SCAN_WINDOW).min(size - pos);
                fs::read_exact_at(file, name, pos, len, &mut window)?;
                continue;
            }
            let at = (pos - window_start) as usize;
            match BatchHeader::parse(&window[at..]) {
                Ok(h) => break h,
                Err(HeaderError::Short { needed, .. }) if need < needed as u64 => {
                    need = needed as u64;
                }
                Err(_) => return Ok((entries, pos)),
            }
        };
        let at = (pos - window_start) as usize;
        let batch = &window[at..at + header.batch_len as usize];
        if header.base_offset != expected || verify_crc(&header, batch).is_err() {
            return Ok((entries, pos));
        }
        entries.push(Entry {
            base: header.base_offset,
            next: header.next_offset(),
            leader_epoch: header.leader_epoch,
            len: header.batch_len,
            loc: Loc { segment: base, pos },
        });
        expected = header.next_offset();
        pos += u64::from(header.batch_len);
    }
    Ok((entries, pos))
}

/// The leader-epoch checkpoint, replaced atomically.
fn write_epochs(dir: &Descriptor, epochs: &[(u32, u64)]) -> Result<(), Error> {
    let mut text = format!("0\n{}\n", epochs.len());
    for (e, s) in epochs {
        text.push_str(&format!("{e} {s}\n"));
    }
    Ok(fs::write_atomic(dir, EPOCH_FILE, text.as_bytes())?)
}

fn parse_u64(bytes: &[u8], what: &str) -> Result<u64, Error> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| Error::Corrupt(format!("checkpoint `{what}` is not a number")))
}

/// Kafka's leader-epoch checkpoint text: version, count, `epoch offset` lines.
fn parse_epochs(bytes: &[u8]) -> Result<Vec<(u32, u64)>, Error> {
    let bad = || Error::Corrupt("checkpoint `leader-epochs` is malformed".into());
    let text = std::str::from_utf8(bytes).map_err(|_| bad())?;
    let mut lines = text.lines();
    if lines.next() != Some("0") {
        return Err(bad());
    }
    let count: usize = lines.next().and_then(|l| l.parse().ok()).ok_or_else(bad)?;
    let mut out = Vec::with_capacity(count.min(1 << 16));
    for line in lines {
        let mut parts = line.split(' ');
        let e = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let s = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        out.push((e, s));
    }
    if out.len() != count {
        return Err(bad());
    }
    Ok(out)
}
