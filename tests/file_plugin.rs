//! File-plugin recovery cases that need its on-disk layout: interrupted
//! operations finish on open, damage it cannot repair is refused loudly
//! and leaves the files alone, foreign files are ignored.

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use replicator::batch::{self, Record};
use replicator::plugin::{PluginLog, PluginSource, Sandbox, StoragePlugin};
use replicator::storage::{OffsetBounds, PartitionLog, StorageError};

fn plugin() -> StoragePlugin {
    StoragePlugin::load(&PluginSource::Builtin("file".into()), Sandbox::default()).expect("load")
}

async fn open(dir: &Path) -> Result<PluginLog, StorageError> {
    plugin()
        .open(
            "t",
            0,
            vec![("segment.bytes".into(), "4096".into())],
            Some(dir),
        )
        .await
}

async fn fill(log: &PluginLog, batches: u64) {
    fill_from(log, 0, batches).await;
}

/// The files of `dir` named `*.<ext>`, sorted (by base offset, for the
/// plugin's zero-padded names).
fn files_ending(dir: &Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    files_ending(dir, "log")
}

/// Batch `i`: one record of `len` bytes, each `i as u8`.
fn batch_of(i: u64, len: usize) -> Bytes {
    let r = Record {
        value: Bytes::from(vec![i as u8; len]),
        ..Default::default()
    };
    batch::encode(i, 1, &[r]).expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_reset_is_finished_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path()).await.expect("open");
    fill(&log, 20).await;
    log.close().await;
    // delete-prefix(500) checkpoints the new start first; crash before the
    // old segments were removed.
    std::fs::write(dir.path().join("log-start"), "500\n").expect("write checkpoint");
    let log = open(dir.path()).await.expect("reopen");
    assert_eq!(
        log.bounds().await,
        Ok(OffsetBounds {
            log_start: 500,
            log_end: 500
        }),
        "the old offsets must not be handed out again"
    );
    assert_eq!(segments(dir.path()).len(), 1, "old segments removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_a_closed_segment_is_refused_not_cut() {
    let (dir, segs) = closed_log_of_30().await;
    // Flip a byte inside the first (closed, synced, indexed) segment and
    // damage its index too, so recovery has to scan it.
    let first = &segs[0];
    let mut bytes = std::fs::read(first).expect("read");
    bytes[700] ^= 0xff;
    std::fs::write(first, &bytes).expect("write");
    std::fs::write(first.with_extension("index"), b"RIX1 damaged").expect("damage index");
    let before: Vec<u64> = segs
        .iter()
        .map(|p| std::fs::metadata(p).expect("meta").len())
        .collect();

    refused_as_corrupt(dir.path(), "damaged").await;
    let after: Vec<u64> = segments(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).expect("meta").len())
        .collect();
    assert_eq!(before, after, "refusing must not delete or cut anything");
}

/// The HW and epoch checkpoints are summaries: damaged ones are set aside
/// (HW 0, an empty cache the host rebuilds from the batches) instead of
/// refusing the partition for good. The log start is not: it says which
/// offsets are gone, so a damaged one is refused, naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_summary_checkpoints_are_set_aside_and_a_damaged_log_start_is_refused() {
    let (dir, log, _) = log_of_30().await;
    log.set_high_watermark(25).await.expect("hw");
    let epochs = vec![replicator::storage::EpochEntry {
        epoch: 1,
        start_offset: 0,
    }];
    log.set_leader_epochs(epochs.clone()).await.expect("epochs");
    log.close().await;
    std::fs::write(dir.path().join("high-watermark"), "garbage\n").expect("write");
    std::fs::write(dir.path().join("leader-epochs"), "0\n7\n1 0\n").expect("write");
    let log = open(dir.path())
        .await
        .expect("opens with damaged checkpoints");
    assert_eq!(log.bounds().await.map(|b| b.log_end), Ok(30));
    assert_eq!(log.high_watermark().await, Ok(0));
    assert_eq!(log.leader_epochs().await, Ok(Vec::new()));
    // The host's check at open rebuilds the cache from the batches.
    let state = replicator::storage::load_state(&log).await.expect("state");
    let state = replicator::storage::with_checked_epochs(&log, state, "t/0")
        .await
        .expect("checked");
    assert_eq!(state.leader_epochs, epochs);
    assert_eq!(log.leader_epochs().await, Ok(epochs), "written back");
    log.close().await;
    std::fs::write(dir.path().join("log-start"), "twelve\n").expect("write");
    refused_as_corrupt(dir.path(), "move the partition directory aside").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_files_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path()).await.expect("open");
    fill(&log, 3).await;
    log.close().await;
    std::fs::write(dir.path().join("notes.log"), "operator notes").expect("write");
    let log = open(dir.path()).await.expect("reopen with a foreign file");
    assert_eq!(log.bounds().await.map(|b| b.log_end), Ok(3));
    assert!(dir.path().join("notes.log").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsynced_closed_segment_is_cut_like_a_torn_tail() {
    // With fsync = never a rolled segment is synced and indexed only at the
    // next flush; a power loss before it can tear it. Recovery cuts there.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = vec![
        ("segment.bytes".into(), "4096".into()),
        ("fsync".into(), "never".into()),
    ];
    let log = plugin()
        .open("t", 0, config.clone(), Some(dir.path()))
        .await
        .expect("open");
    fill(&log, 30).await;
    log.close().await;
    let segs = segments(dir.path());
    assert!(segs.len() >= 3, "small segments roll: {segs:?}");
    assert!(
        !segs[0].with_extension("index").exists(),
        "no index before a flush"
    );
    let second = &segs[1];
    let len = std::fs::metadata(second).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(second)
        .expect("open")
        .set_len(len - 100)
        .expect("tear");
    let first_len = std::fs::metadata(&segs[0]).expect("meta").len();
    let per_batch = first_len / 7; // 500-byte records: 7 batches per 4 KiB segment
    let log = plugin()
        .open("t", 0, config.clone(), Some(dir.path()))
        .await
        .expect("reopen");
    let b = log.bounds().await.expect("bounds");
    assert_eq!(
        segments(dir.path()).len(),
        2,
        "segments after the cut are dropped"
    );
    assert!(
        b.log_end < 14 && b.log_end > 7,
        "cut inside the second segment: {b:?} ({per_batch} B/batch)"
    );
    // After a flush the closed segments get their index.
    fill_from(&log, b.log_end, 20).await;
    log.flush().await.expect("flush");
    assert!(
        segments(dir.path())[0].with_extension("index").exists(),
        "flush indexes closed segments"
    );
}

async fn fill_from(log: &PluginLog, from: u64, batches: u64) {
    for i in from..from + batches {
        log.append(batch_of(i, 500)).await.expect("append");
    }
}

/// Pages of `path` that are dirty or being written back, by cachestat(2)
/// (Linux 6.5 and later); `None` where the kernel lacks it.
fn unwritten_pages(path: &Path) -> Option<u64> {
    page_cache(path).map(|p| p.unwritten)
}

/// Whether `path` is on tmpfs, whose pages never leave the page cache.
fn on_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path and a zeroed struct the call fills.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(c.as_ptr(), &mut fs) };
    r == 0 && fs.f_type == libc::TMPFS_MAGIC
}

/// What the page cache holds of a file.
struct PageCache {
    /// Pages cached.
    cached: u64,
    /// Pages dirty or being written back.
    unwritten: u64,
}

/// What the page cache holds of `path`, by cachestat(2) (Linux 6.5 and
/// later); `None` where the kernel lacks it.
fn page_cache(path: &Path) -> Option<PageCache> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    // Its number in the kernel's common syscall table, shared by x86_64
    // and aarch64; the libc crate does not name it for them.
    const SYS_CACHESTAT: libc::c_long = 451;
    let file = std::fs::File::open(path).ok()?;
    let range = Range { off: 0, len: 0 };
    let mut stat = Stat::default();
    // SAFETY: both pointers are to live `repr(C)` structs of the kernel's
    // layout; the fd is open for the call's duration.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0,
        )
    };
    (r == 0).then_some(PageCache {
        cached: stat.cache,
        unwritten: stat.dirty + stat.writeback,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_syncs_what_the_plugin_leaves_dirty() {
    // With `fsync = never` the plugin syncs nothing itself (until a roll
    // or flush, which these appends do not reach), so pages written to
    // disk can only be the host's write-behind's doing.
    const APPENDS: u64 = 200;
    for period in [Duration::ZERO, Duration::from_millis(20)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let sandbox = Sandbox {
            write_behind: Some(period),
            ..Sandbox::default()
        };
        let log = StoragePlugin::load(&PluginSource::Builtin("file".into()), sandbox)
            .expect("load")
            .open(
                "t",
                0,
                vec![("fsync".into(), "never".into())],
                Some(dir.path()),
            )
            .await
            .expect("open");
        fill(&log, APPENDS).await;
        let segment = &segments(dir.path())[0];
        let Some(dirty) = unwritten_pages(segment) else {
            eprintln!("skipped: this kernel has no cachestat(2) to observe dirty pages");
            return;
        };
        match log.write_behind_synced() {
            None => {
                assert!(period.is_zero(), "write-behind every {period:?} is missing");
                // Writeback of a page starts 30 s after it was dirtied (the
                // kernel's default), far after these appends.
                assert!(dirty > 0, "without write-behind the appends stay dirty");
            }
            Some(mut synced) => {
                tokio::time::timeout(Duration::from_secs(20), synced.wait_for(|n| *n >= APPENDS))
                    .await
                    .expect("a write-behind round covers every append")
                    .expect("the storage task is alive");
                assert_eq!(
                    unwritten_pages(segment),
                    Some(0),
                    "every append is on disk after the round that covers it"
                );
            }
        }
        log.close().await;
    }
}

#[test]
fn the_built_in_file_plugin_gets_write_behind_by_default() {
    let file = StoragePlugin::load(&PluginSource::Builtin("file".into()), Sandbox::default())
        .expect("load");
    assert_eq!(file.sandbox().write_behind, Some(Duration::from_millis(50)));
    let memory = StoragePlugin::load(&PluginSource::Builtin("memory".into()), Sandbox::default())
        .expect("load");
    assert_eq!(memory.sandbox().write_behind, Some(Duration::ZERO));
}

/// An open log of 30 batches over at least four small segments.
async fn log_of_30() -> (tempfile::TempDir, PluginLog, Vec<std::path::PathBuf>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path()).await.expect("open");
    fill(&log, 30).await;
    let segs = segments(dir.path());
    assert!(segs.len() >= 4, "small segments roll: {segs:?}");
    (dir, log, segs)
}

/// [`log_of_30`], closed.
async fn closed_log_of_30() -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
    let (dir, log, segs) = log_of_30().await;
    log.close().await;
    (dir, segs)
}

/// Opening `dir` fails with a `corrupt` error that mentions `why`.
async fn refused_as_corrupt(dir: &Path, why: &str) {
    match open(dir).await {
        Err(StorageError::Corrupt(m)) => assert!(m.contains(why), "{m}"),
        Err(other) => panic!("expected corrupt, got {other}"),
        Ok(_) => panic!("opened a log that should be refused as corrupt ({why})"),
    }
}

fn base_of(segment: &Path) -> u64 {
    segment
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("segment name")
}

/// The files of `dir` as a crash would leave them (the plugin keeps no
/// buffer of its own, so what is in the files is all there is).
fn snapshot(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        std::fs::copy(e.path(), copy.path().join(e.file_name())).expect("copy");
    }
    copy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_move_is_checkpointed_at_flush_and_a_crash_before_keeps_every_batch() {
    let (dir, log, segs) = log_of_30().await;
    let (second, third) = (base_of(&segs[1]), base_of(&segs[2]));
    let to = second + 1;
    assert!(to < third, "the new start falls inside the second segment");
    log.delete_prefix(to).await.expect("delete prefix");
    assert_eq!(
        base_of(&segments(dir.path())[0]),
        second,
        "first segment removed"
    );

    let crashed = snapshot(dir.path());
    log.flush().await.expect("flush");
    let flushed = snapshot(dir.path());
    log.close().await;

    // A crash before the flush: the start comes back at the first remaining
    // segment's base, lower than asked but never higher, and every batch
    // from there on reads back whole.
    let log = open(crashed.path()).await.expect("reopen after a crash");
    assert_eq!(
        log.bounds().await,
        Ok(OffsetBounds {
            log_start: second,
            log_end: 30
        })
    );
    let r = log.read(second, 1).await.expect("read at the start");
    let want = batch_of(second, 500);
    assert_eq!(r, want, "the batch at the recovered start is intact");
    log.close().await;

    // After a flush, and after a clean close, the start is exact.
    for (what, d) in [("flush", flushed.path()), ("clean close", dir.path())] {
        let log = open(d).await.expect("reopen");
        assert_eq!(
            log.bounds().await.map(|b| b.log_start),
            Ok(to),
            "log start after a {what}"
        );
        log.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_segments_lowest_first_because_a_gap_is_refused() {
    // Retention removes whole segments from the start. A crash midway
    // through removing two must leave a log that opens: lowest first leaves
    // a shorter log; highest first would leave a gap, which is corruption.
    let (dir, segs) = closed_log_of_30().await;
    let gap = snapshot(dir.path());
    std::fs::remove_file(gap.path().join(segs[1].file_name().expect("name"))).expect("rm");
    refused_as_corrupt(gap.path(), "starts at").await;

    std::fs::remove_file(&segs[0]).expect("rm");
    let log = open(dir.path())
        .await
        .expect("reopen without the lowest segment");
    assert_eq!(
        log.bounds().await,
        Ok(OffsetBounds {
            log_start: base_of(&segs[1]),
            log_end: 30
        })
    );
    // And the plugin's own removal of two segments at once leaves the same.
    log.delete_prefix(base_of(&segs[3]))
        .await
        .expect("delete prefix");
    assert_eq!(segments(dir.path())[0], segs[3]);
    log.close().await;
}

fn retired(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    files_ending(dir, "deleted")
        .into_iter()
        .map(|p| {
            let len = std::fs::metadata(&p).expect("meta").len();
            (p, len)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_retention_released_is_freed_a_piece_per_call_and_a_crash_leaves_no_trace() {
    // Removing a big segment in one call stalls the partition's store for
    // tens of milliseconds; retention instead shrinks it over its next
    // calls, each freeing at least what it released (1 MiB at the least).
    // The first one released is kept whole for the next roll instead.
    let dir = tempfile::tempdir().expect("tempdir");
    let eight_mib = vec![("segment.bytes".into(), (8u64 << 20).to_string())];
    let log = plugin()
        .open("t", 0, eight_mib.clone(), Some(dir.path()))
        .await
        .expect("open");
    let big = |i: u64| batch_of(i, 64 * 1024);
    for i in 0..300 {
        log.append(big(i)).await.expect("append");
    }
    let segs = segments(dir.path());
    assert_eq!(segs.len(), 3, "8 MiB segments roll: {segs:?}");
    let (second, third) = (base_of(&segs[1]), base_of(&segs[2]));
    let first_len = std::fs::metadata(&segs[0]).expect("meta").len();

    // Half-MiB retention steps up to the second segment: nothing retired.
    let mut start = 0;
    while start + 8 < second {
        start += 8;
        log.delete_prefix(start).await.expect("delete prefix");
    }
    assert!(retired(dir.path()).is_empty());
    assert!(files_ending(dir.path(), "spare").is_empty());
    // The step past the first segment's end retires it, as the spare.
    log.delete_prefix(second + 1).await.expect("delete prefix");
    let spare = files_ending(dir.path(), "spare");
    assert_eq!(spare.len(), 1, "{spare:?}");
    assert_eq!(std::fs::metadata(&spare[0]).expect("meta").len(), first_len);
    assert!(retired(dir.path()).is_empty());
    // With a spare kept, the next one released is freed, a piece first.
    start = second + 1;
    while start + 8 < third {
        start += 8;
        log.delete_prefix(start).await.expect("delete prefix");
    }
    assert!(retired(dir.path()).is_empty());
    log.delete_prefix(third + 1).await.expect("delete prefix");
    let r = retired(dir.path());
    assert_eq!(r.len(), 1, "{r:?}");
    let (path, mut size) = r[0].clone();
    assert!(
        size > 0 && size <= (7u64 << 20),
        "freed a piece, not all at once: {size}"
    );
    assert_eq!(base_of(&segments(dir.path())[0]), third);

    // A crash now: open removes the retired file and the spare, and the
    // log is whole.
    let crashed = snapshot(dir.path());
    let copy = plugin()
        .open("t", 0, eight_mib.clone(), Some(crashed.path()))
        .await
        .expect("reopen after a crash");
    assert!(
        retired(crashed.path()).is_empty() && files_ending(crashed.path(), "spare").is_empty(),
        "leftovers removed on open"
    );
    let b = copy.bounds().await.expect("bounds");
    assert_eq!((b.log_start, b.log_end), (third, 300));
    assert_eq!(copy.read(third, 1).await.expect("read"), big(third));
    copy.close().await;

    // Each further step frees at least 1 MiB more, until it is gone.
    let mut step = third + 1;
    while path.exists() {
        step += 1;
        log.delete_prefix(step).await.expect("delete prefix");
        let now = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(now + (1 << 20) <= size || now == 0, "{size} -> {now}");
        size = now;
        assert!(step < third + 10, "an 8 MiB segment took too many calls");
    }
    assert!(retired(dir.path()).is_empty());
    assert_eq!(files_ending(dir.path(), "spare").len(), 1, "still kept");

    // A reset frees what is retired and starts its new segment in the
    // spare's file; a clean close cuts the old bytes.
    log.delete_prefix(1_000).await.expect("reset past the end");
    assert!(retired(dir.path()).is_empty() && files_ending(dir.path(), "spare").is_empty());
    let segs = segments(dir.path());
    assert_eq!(segs.len(), 1);
    assert_eq!(base_of(&segs[0]), 1_000);
    log.close().await;
    assert_eq!(std::fs::metadata(&segs[0]).expect("meta").len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_roll_overwrites_a_released_segment_and_its_old_batches_never_come_back() {
    use std::os::unix::fs::MetadataExt;
    let meta = |p: &Path| std::fs::metadata(p).expect("meta");
    // 30 batches of 500-byte records, 7 to a 4 KiB segment.
    let (dir, log, segs) = log_of_30().await;
    let (first_len, first_inode) = (meta(&segs[0]).len(), meta(&segs[0]).ino());
    let second = base_of(&segs[1]);
    let mut sent: Vec<Bytes> = (0..30).map(|i| batch_of(i, 500)).collect();

    // Retention releases the first segment: it is kept whole, not freed.
    log.delete_prefix(second).await.expect("delete prefix");
    let spare = files_ending(dir.path(), "spare");
    assert_eq!(spare.len(), 1, "one spare: {spare:?}");
    assert_eq!(meta(&spare[0]).len(), first_len, "kept whole");
    assert!(retired(dir.path()).is_empty());

    // The next roll takes its file over. Batches the size of its old ones
    // line up with them: its second old batch, whole and with a valid CRC,
    // sits right after the new segment's first.
    let before = segments(dir.path());
    let rolled = loop {
        let i = sent.len() as u64;
        log.append(batch_of(i, 500)).await.expect("append");
        sent.push(batch_of(i, 500));
        let now = segments(dir.path());
        if now.len() > before.len() {
            break now.last().cloned().expect("a segment");
        }
        assert!(i < 60, "no roll after {i} batches");
    };
    assert_eq!(
        meta(&rolled).ino(),
        first_inode,
        "the spare's file, renamed"
    );
    assert_eq!(
        meta(&rolled).len(),
        first_len,
        "overwritten in place, not cut"
    );
    assert!(files_ending(dir.path(), "spare").is_empty());
    let end = sent.len() as u64;
    assert_eq!(base_of(&rolled), end - 1);

    // A crash now: recovery finds one new batch, then an old batch whose
    // offset does not follow it, and cuts there.
    let crashed = snapshot(dir.path());
    let copy = open(crashed.path()).await.expect("reopen after a crash");
    let b = copy.bounds().await.expect("bounds");
    assert_eq!((b.log_start, b.log_end), (second, end));
    assert_eq!(
        copy.read(end - 1, 1).await.expect("read"),
        sent[end as usize - 1]
    );
    assert_eq!(
        std::fs::metadata(crashed.path().join(rolled.file_name().expect("name")))
            .expect("meta")
            .len(),
        sent[end as usize - 1].len() as u64,
        "the old bytes are cut"
    );
    copy.close().await;

    // Larger batches now, so the recycled segment closes short of its old
    // length: its file is cut to its data, which its index covers.
    let mut in_rolled = sent[end as usize - 1].len() as u64;
    loop {
        let i = sent.len() as u64;
        let b = batch_of(i, 1000);
        log.append(b.clone()).await.expect("append");
        sent.push(b.clone());
        if segments(dir.path()).len() > before.len() + 1 {
            break;
        }
        in_rolled += b.len() as u64;
    }
    assert!(in_rolled < first_len, "{in_rolled} vs {first_len}");
    assert_eq!(
        meta(&rolled).len(),
        in_rolled,
        "closed at its data's length"
    );
    assert!(rolled.with_extension("index").exists());
    log.close().await;
    assert!(
        files_ending(dir.path(), "spare").is_empty(),
        "close removes it"
    );

    // Every batch reads back as sent after a clean reopen.
    let log = open(dir.path()).await.expect("reopen");
    let b = log.bounds().await.expect("bounds");
    assert_eq!((b.log_start, b.log_end), (second, sent.len() as u64));
    let kept = (second..).zip(&sent[second as usize..]);
    assert_eq!(unread(&log, kept).await, None);
    log.close().await;
}

/// One step of [`random_steps_and_crashes_lose_nothing_and_bring_back_nothing_stale`].
#[derive(Debug, Clone)]
enum Step {
    /// A batch of one record of this many bytes.
    Append(usize),
    /// Move the log start to an offset picked from the log (or past it).
    DeletePrefix(u16),
    Truncate(u16),
    Flush,
    /// Reopen a copy of the files as they are: a crash of the process.
    Crash,
    /// Close and reopen.
    Reopen,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        // Mostly one size, so a new batch often lines up with an old one
        // in a segment that is overwritten.
        8 => prop_oneof![4 => Just(500usize), 1 => 1usize..1500].prop_map(Step::Append),
        2 => any::<u16>().prop_map(Step::DeletePrefix),
        1 => any::<u16>().prop_map(Step::Truncate),
        1 => Just(Step::Flush),
        2 => Just(Step::Crash),
        1 => Just(Step::Reopen),
    ]
}

/// What the log must hold: its batches by base offset, and the batches
/// retention released, which a crash may bring back (the log start is
/// checkpointed lazily) but only as they were written.
#[derive(Default)]
struct Expected {
    batches: std::collections::BTreeMap<u64, Bytes>,
    released: std::collections::BTreeMap<u64, Bytes>,
    start: u64,
    end: u64,
}

impl Expected {
    fn pick(&self, p: u16) -> u64 {
        self.start + u64::from(p) % (self.end - self.start + 3)
    }
}

async fn check_steps(steps: Vec<Step>) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::{prop_assert, prop_assert_eq};
    let mut dirs = vec![tempfile::tempdir().expect("tempdir")];
    let mut log = open(dirs[0].path()).await.expect("open");
    let mut x = Expected::default();
    for s in steps {
        let crash = matches!(s, Step::Crash);
        match s {
            Step::Append(len) => {
                let b = batch_of(x.end, len);
                prop_assert_eq!(log.append(b.clone()).await, Ok(x.end + 1));
                x.batches.insert(x.end, b);
                x.end += 1;
            }
            Step::DeletePrefix(p) => {
                let at = x.pick(p);
                prop_assert_eq!(log.delete_prefix(at).await, Ok(()));
                if at > x.start {
                    // One record a batch: the batch holding `at` starts there.
                    let kept = x.batches.split_off(&at);
                    x.released.extend(std::mem::replace(&mut x.batches, kept));
                    x.start = at;
                    x.end = x.end.max(at);
                }
            }
            Step::Truncate(p) => {
                let at = x.pick(p);
                if at > x.end {
                    let bounds = OffsetBounds {
                        log_start: x.start,
                        log_end: x.end,
                    };
                    prop_assert_eq!(
                        log.truncate(at).await,
                        Err(StorageError::OffsetOutOfRange(bounds))
                    );
                } else {
                    prop_assert_eq!(log.truncate(at).await, Ok(at));
                    // Divergent from here: never to be seen again.
                    x.batches.split_off(&at);
                    x.end = at;
                }
            }
            Step::Flush => prop_assert_eq!(log.flush().await, Ok(())),
            Step::Crash => {
                let copy = snapshot(dirs.last().expect("a dir").path());
                log.close().await;
                log = open(copy.path()).await.expect("reopen after a crash");
                dirs.push(copy);
            }
            Step::Reopen => {
                log.close().await;
                log = open(dirs.last().expect("a dir").path())
                    .await
                    .expect("reopen");
            }
        }
        let b = log.bounds().await.expect("bounds");
        prop_assert_eq!(b.log_end, x.end, "nothing lost, nothing stale past the end");
        if !crash {
            prop_assert_eq!(b.log_start, x.start);
            continue;
        }
        // A crash may bring back what retention released, as written.
        prop_assert!(b.log_start <= x.start, "{b:?}, start {}", x.start);
        for o in b.log_start..x.start {
            let back = x.released.remove(&o);
            prop_assert!(
                back.is_some(),
                "offset {o} came back but was never released"
            );
            x.batches.extend(back.map(|b| (o, b)));
        }
        x.start = b.log_start;
        check_batches(&log, &x).await?;
    }
    check_batches(&log, &x).await?;
    log.close().await;
    Ok(())
}

/// The first of `batches` (offset, bytes as written) that does not read
/// back as written, with what was read instead.
async fn unread<'a>(
    log: &PluginLog,
    batches: impl IntoIterator<Item = (u64, &'a Bytes)>,
) -> Option<(u64, Bytes)> {
    for (o, want) in batches {
        let got = log.read(o, 1).await.expect("read");
        if got != *want {
            return Some((o, got));
        }
    }
    None
}

/// Every batch of the log reads back as written.
async fn check_batches(
    log: &PluginLog,
    x: &Expected,
) -> Result<(), proptest::test_runner::TestCaseError> {
    let batches = x.batches.range(x.start..).map(|(&o, b)| (o, b));
    proptest::prop_assert_eq!(unread(log, batches).await, None);
    Ok(())
}

#[test]
fn random_steps_and_crashes_lose_nothing_and_bring_back_nothing_stale() {
    // Small segments, so retention releases them and new ones are written
    // over them often; crashes between steps reopen the files as they are.
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = TestRunner::new(Config {
        cases: support::proptest_cases(),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(step(), 1..80), |steps| {
            rt.block_on(check_steps(steps))
        })
        .expect("every sequence holds");
}

/// Append batches of `len` bytes until one is refused; the refusal.
async fn fill_until_refused(log: &PluginLog, sent: &mut Vec<Bytes>, len: usize) -> StorageError {
    loop {
        let b = batch_of(sent.len() as u64, len);
        match log.append(b.clone()).await {
            Ok(e) => {
                sent.push(b);
                assert_eq!(e, sent.len() as u64);
            }
            Err(e) => return e,
        }
        assert!(sent.len() < 1000, "the disk took {} batches", sent.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_an_append_whole_and_retention_makes_room_again() {
    const SEGMENT: u64 = 256 << 10;
    let Some(disk) = support::small_disk::SmallDisk::mount(1152 << 10) else {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root)");
        return;
    };
    let dir = disk.dir.path();
    let config = vec![("segment.bytes".into(), SEGMENT.to_string())];
    let log = plugin()
        .open("t", 0, config.clone(), Some(dir))
        .await
        .expect("open");
    // Fill the disk with 16 KiB batches, then to the last page with small
    // ones.
    let mut sent: Vec<Bytes> = Vec::new();
    fill_until_refused(&log, &mut sent, 16 * 1024).await;
    match fill_until_refused(&log, &mut sent, 100).await {
        StorageError::Io(m) => assert!(m.contains("No space left on device"), "{m}"),
        other => panic!("expected an i/o error, got {other}"),
    }
    // Refused whole: nothing of it is in the log or its files.
    let end = sent.len() as u64;
    assert_eq!(log.bounds().await.map(|b| b.log_end), Ok(end));
    let on_disk: u64 = segments(dir)
        .iter()
        .map(|p| std::fs::metadata(p).expect("meta").len())
        .sum();
    let total: u64 = sent.iter().map(|b| b.len() as u64).sum();
    assert_eq!(on_disk, total, "no partial batch left behind");

    // Retention releases the first segment, which the plugin would keep as
    // its spare; with the disk full, the next append frees it instead.
    let second = base_of(&segments(dir)[1]);
    log.delete_prefix(second).await.expect("delete prefix");
    let b = batch_of(end, 16 * 1024);
    assert_eq!(log.append(b.clone()).await, Ok(end + 1), "room again");
    sent.push(b);
    assert!(files_ending(dir, "spare").is_empty() && retired(dir).is_empty());

    // Full again, one more segment released, and an append too big for
    // the active segment: its roll takes the spare's file, whose blocks
    // are already allocated, so it needs no new space for its data.
    fill_until_refused(&log, &mut sent, 16 * 1024).await;
    fill_until_refused(&log, &mut sent, 100).await;
    let third = base_of(&segments(dir)[1]);
    log.delete_prefix(third).await.expect("delete prefix");
    let active = std::fs::metadata(segments(dir).last().expect("active"))
        .expect("meta")
        .len();
    let end = sent.len() as u64;
    let b = batch_of(end, (SEGMENT - active) as usize);
    assert_eq!(log.append(b.clone()).await, Ok(end + 1), "rolled");
    sent.push(b);
    assert_eq!(base_of(segments(dir).last().expect("active")), end);
    assert!(files_ending(dir, "spare").is_empty() && retired(dir).is_empty());

    let kept = (third..).zip(&sent[third as usize..]);
    assert_eq!(unread(&log, kept).await, None);
    log.close().await;
    let log = plugin()
        .open("t", 0, config, Some(dir))
        .await
        .expect("reopen");
    let b = log.bounds().await.expect("bounds");
    assert_eq!((b.log_start, b.log_end), (third, end + 1));
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roll_the_full_disk_refuses_frees_the_spare_and_is_tried_again() {
    // Everything in whole pages, so the disk fills exactly: batches of
    // one 4 KiB page, 16 to a segment, and an index of one page per
    // closed segment.
    const PAGE: u64 = 4096;
    let page_batch = |i: u64| batch_of(i, PAGE as usize - 68);
    assert_eq!(page_batch(0).len() as u64, PAGE);
    // Four full segments and the indexes of the first three.
    let Some(disk) = support::small_disk::SmallDisk::mount((4 * 16 + 3) * PAGE) else {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root)");
        return;
    };
    let dir = disk.dir.path();
    let config = vec![("segment.bytes".into(), (16 * PAGE).to_string())];
    let log = plugin()
        .open("t", 0, config.clone(), Some(dir))
        .await
        .expect("open");
    for i in 0..64 {
        assert_eq!(log.append(page_batch(i)).await, Ok(i + 1));
    }
    // The 65th needs a roll, whose index finds no page.
    match log.append(page_batch(64)).await {
        Err(StorageError::Io(m)) => assert!(m.contains("No space left on device"), "{m}"),
        other => panic!("expected a full disk, got {other:?}"),
    }
    // Retention releases the first segment (kept as the spare) and its
    // index's page; the flush's log-start checkpoint takes that page.
    log.delete_prefix(16).await.expect("delete prefix");
    log.flush().await.expect("flush");
    let spares = files_ending(dir, "spare");
    assert_eq!(spares.len(), 1);
    // So the roll fails again, until the spare is freed for it. Freed
    // even while another descriptor holds it open (the host's
    // write-behind may be syncing it): unlinking alone would keep its
    // pages taken until that one closed.
    let held = std::fs::File::open(&spares[0]).expect("hold the spare open");
    assert_eq!(log.append(page_batch(64)).await, Ok(65), "rolled");
    drop(held);
    assert!(files_ending(dir, "spare").is_empty());
    assert_eq!(base_of(segments(dir).last().expect("active")), 64);
    let sent: Vec<Bytes> = (16..65).map(page_batch).collect();
    assert_eq!(unread(&log, (16..).zip(&sent)).await, None);
    log.close().await;
}

/// The host does a plugin's `wasi:filesystem` writes and reads itself
/// (`plugin/wasi_file_io.rs`): writes from the guest's memory in place, at
/// most 4 MiB a call, or from a copy on the blocking pool for a while after
/// a slow one; reads from the page cache without waiting on the node's
/// runtime, or on the blocking pool when the data is not cached, and
/// inline on a store's own thread. Every way the segment files hold
/// exactly the batches appended, back to back, whatever their sizes and
/// however many one append carries, and a log written one way reads back
/// the other way, from the page cache and from the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_hold_exactly_the_appended_bytes_on_a_thread_or_a_task() {
    let load = |own_thread| {
        StoragePlugin::load(
            &PluginSource::Builtin("file".into()),
            Sandbox {
                own_thread,
                ..Sandbox::default()
            },
        )
        .expect("load")
    };
    let config = vec![("segment.bytes".into(), (1u64 << 20).to_string())];
    // One byte of value up to many host reads, and a batch the host
    // writes in two calls.
    let lens = [
        1,
        100,
        4096 - 68,
        65_536,
        70_001,
        300_000,
        5,
        1 << 20,
        5 << 20,
    ];
    // Last, the way writes go after a slow one: it changes how the other
    // tests in this process write for a while, not what they get.
    for (own_thread, pool_writes) in [(true, false), (false, false), (false, true)] {
        if pool_writes {
            replicator::plugin::write_on_the_pool_for(Duration::from_secs(30));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let log = load(own_thread)
            .open("t", 0, config.clone(), Some(dir.path()))
            .await
            .expect("open");
        let mut sent = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            let b = batch_of(i as u64, len);
            assert_eq!(log.append(b.clone()).await, Ok(i as u64 + 1));
            sent.push(b);
        }
        // Three batches in one call, as a group commit or a fetch sends.
        let from = sent.len() as u64;
        let three: Vec<Bytes> = (from..from + 3).map(|i| batch_of(i, 3000)).collect();
        assert_eq!(log.append(Bytes::from(three.concat())).await, Ok(from + 3));
        sent.extend(three);
        log.close().await;

        let on_disk: Vec<u8> = segments(dir.path())
            .iter()
            .flat_map(|s| std::fs::read(s).expect("read segment"))
            .collect();
        assert!(
            on_disk == sent.concat(),
            "own thread {own_thread}, writes on the pool {pool_writes}: the segments hold {} \
             bytes, not the {} appended",
            on_disk.len(),
            sent.iter().map(Bytes::len).sum::<usize>()
        );
        let log = load(!own_thread)
            .open("t", 0, config.clone(), Some(dir.path()))
            .await
            .expect("reopen");
        assert_eq!(unread(&log, (0..).zip(&sent)).await, None);
        if on_tmpfs(dir.path()) {
            eprintln!("skipped the uncached reads: tmpfs has no disk to read back from");
            log.close().await;
            continue;
        }
        // Again with the segments out of the page cache, so every read
        // must wait for the disk.
        for s in segments(dir.path()) {
            let f = std::fs::File::open(&s).expect("open segment");
            f.sync_all().expect("sync");
            // SAFETY: a valid fd for the call's duration.
            let r = unsafe {
                use std::os::fd::AsRawFd;
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
            };
            assert_eq!(r, 0, "fadvise {}", s.display());
            if let Some(pages) = page_cache(&s) {
                assert_eq!(pages.cached, 0, "{} is still cached", s.display());
            }
        }
        assert_eq!(unread(&log, (0..).zip(&sent)).await, None);
        log.close().await;
    }
}

/// Opens `dir` with `fsync` settings (`always`, or `interval` with an
/// interval no test reaches, so only flushes and rolls sync) and segments
/// of `segment_bytes`.
async fn open_syncing(dir: &Path, fsync: &str, segment_bytes: u64) -> PluginLog {
    plugin()
        .open(
            "t",
            0,
            vec![
                ("segment.bytes".into(), segment_bytes.to_string()),
                ("fsync".into(), fsync.into()),
                ("fsync.interval.ms".into(), "86400000".into()),
            ],
            Some(dir),
        )
        .await
        .expect("open")
}

/// Every batch of `log` from `from` to `end` reads back, whole and in
/// order.
async fn reads_back_whole(log: &PluginLog, from: u64, end: u64) {
    let mut at = from;
    while at < end {
        let bytes = log.read(at, 1 << 20).await.expect("read");
        for r in batch::decode(&bytes).expect("whole batches") {
            assert_eq!(r.offset, at);
            assert_eq!(r.record.value, Bytes::from(vec![at as u8; 500]));
            at += 1;
        }
    }
}

/// A failed fsync may leave what it covered off the disk for good: Linux
/// reports a failed writeback once, keeps the pages cached and marked
/// clean, so a second fsync succeeds and reads still show the data until
/// the pages go. So the plugin cuts the log back to the last end known to
/// be on disk, and the host, finding the end lower, makes it a fault: the
/// replica holds less than it was counted for, and is reopened from disk.
/// The flush used to fail with the batches kept, and the next one to
/// succeed without them being on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_cuts_the_log_back_to_what_is_on_disk() {
    use replicator::storage::FaultKind;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_syncing(dir.path(), "interval", 1 << 20).await;
    fill(&log, 5).await;
    log.flush().await.expect("flush");
    fill_from(&log, 5, 3).await;
    replicator::plugin::fail_syncs_under(dir.path(), 1);
    let e = log.flush().await.expect_err("the flush's fsync fails");
    assert!(
        matches!(&e, StorageError::Fault { kind: FaultKind::FailedMutation, detail, .. }
            if detail.contains("cut the log back from offset 8 to 5")),
        "{e}"
    );
    let state = log.recover().await.expect("recover");
    assert_eq!(
        state.bounds,
        OffsetBounds {
            log_start: 0,
            log_end: 5
        }
    );
    reads_back_whole(&log, 0, 5).await;
    // What is on disk is the same: the cut reached the file.
    log.close().await;
    let log = open_syncing(dir.path(), "interval", 1 << 20).await;
    assert_eq!(log.bounds().await.map(|b| b.log_end), Ok(5));
    // And it goes on from there.
    fill_from(&log, 5, 2).await;
    log.flush().await.expect("flush");
    reads_back_whole(&log, 0, 7).await;
    log.close().await;
}

/// A segment roll syncs the segment it closes before indexing it: when
/// that fsync fails, the roll is not tried again (a second fsync would
/// succeed, and an index would vouch for data that may not be on disk);
/// the log is cut back to the end of the last roll, and no index is
/// written for the segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roll_whose_fsync_fails_cuts_back_and_indexes_nothing() {
    use replicator::storage::FaultKind;
    let dir = tempfile::tempdir().expect("tempdir");
    // About 7 batches of 500 bytes per 4 KiB segment.
    let log = open_syncing(dir.path(), "interval", 4096).await;
    fill(&log, 10).await;
    assert_eq!(segments(dir.path()).len(), 2, "one roll so far");
    let rolled_at = base_of(&segments(dir.path())[1]);
    // Retention releases the first segment, kept as a spare: a failed roll
    // could free it and be tried again, which a failed fsync must not be.
    log.delete_prefix(rolled_at).await.expect("retention");
    assert_eq!(files_ending(dir.path(), "spare").len(), 1, "a spare");
    // The second segment holds as many batches as the first: fill it,
    // then fail the sync of the roll the next append makes.
    let next_roll = 2 * rolled_at;
    fill_from(&log, 10, next_roll - 10).await;
    assert_eq!(segments(dir.path()).len(), 1, "no second roll yet");
    replicator::plugin::fail_syncs_under(dir.path(), 1);
    let e = log
        .append(batch_of(next_roll, 500))
        .await
        .expect_err("the roll's fsync fails");
    assert!(
        matches!(&e, StorageError::Fault { kind: FaultKind::FailedMutation, detail, .. }
            if detail.contains(&format!("cut the log back from offset {next_roll} to {rolled_at}"))),
        "{e}"
    );
    let state = log.recover().await.expect("recover");
    assert_eq!(state.bounds.log_end, rolled_at);
    assert_eq!(segments(dir.path()).len(), 1);
    assert!(
        !segments(dir.path())[0].with_extension("index").exists(),
        "the segment whose sync failed was indexed"
    );
    log.close().await;
}

/// With `fsync = always` every earlier batch is on disk: a failed fsync
/// fails its own append, whole (a plain error, nothing cut), and the next
/// append of the same batch succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fsync_always_a_failed_fsync_fails_only_its_append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_syncing(dir.path(), "always", 1 << 20).await;
    fill(&log, 3).await;
    replicator::plugin::fail_syncs_under(dir.path(), 1);
    let e = log
        .append(batch_of(3, 500))
        .await
        .expect_err("the fsync fails");
    assert!(
        matches!(&e, StorageError::Io(m) if m.contains("sync")),
        "{e}"
    );
    assert_eq!(log.bounds().await.map(|b| b.log_end), Ok(3));
    assert_eq!(log.append(batch_of(3, 500)).await, Ok(4));
    reads_back_whole(&log, 0, 4).await;
    log.close().await;
}

/// When even the cut back after a failed fsync fails, the plugin notes
/// where it must end (`cut-to`) and traps; the next open finishes it.
/// Without that, the reopened log, read from a page cache that still
/// shows the suspect batches whole, was taken as intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_back_left_for_the_next_open_is_finished_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_syncing(dir.path(), "interval", 4096).await;
    fill(&log, 20).await;
    log.close().await;
    // As a trap in the middle of cutting back to offset 5 leaves it.
    std::fs::write(dir.path().join("cut-to"), "5\n").expect("write the note");
    let log = open_syncing(dir.path(), "interval", 4096).await;
    assert_eq!(log.bounds().await.map(|b| b.log_end), Ok(5));
    assert!(!dir.path().join("cut-to").exists(), "the note stays");
    reads_back_whole(&log, 0, 5).await;
    fill_from(&log, 5, 3).await;
    log.close().await;
    // Done once: the next open keeps what came after.
    let log = open_syncing(dir.path(), "interval", 4096).await;
    assert_eq!(log.bounds().await.map(|b| b.log_end), Ok(8));
    log.close().await;
}
