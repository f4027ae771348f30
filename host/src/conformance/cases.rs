//! The conformance cases. Each gets a fresh directory and checks one part
//! of the contract in `wit/storage.wit`, including the exact error variant
//! for every kind of bad input.

use std::path::Path;

use bytes::Bytes;

use super::{CaseFn, CaseResult, Options, Subject};
use crate::batch::{self, Record};
use crate::plugin::PluginLog;
use crate::storage::{EpochEntry, OffsetBounds, PartitionLog, StorageError, StorageResult};

macro_rules! case {
    ($name:literal, $f:path) => {
        ($name, |s, d, o| Box::pin($f(s, d, o)) as _)
    };
}

pub(super) const ALL: &[(&str, CaseFn)] = &[
    case!("append-read-round-trip", round_trip),
    case!("multi-batch-append", multi_batch_append),
    case!("append-rejects-bad-input", bad_appends),
    case!("read-bounds-and-max-bytes", read_bounds),
    case!("many-batches-and-segments", many_batches),
    case!("truncate", truncate),
    case!("delete-prefix", delete_prefix),
    case!("reset-anywhere", reset),
    case!("checkpoints", checkpoints),
    case!("reopen-keeps-everything", reopen),
    case!("torn-tail-recovery", torn_tail),
    case!("model-based-sequences", super::model::run),
];

/// A test batch of `records` records of `size` bytes, content derived from
/// its base offset so any mix-up shows.
pub(super) fn batch(base: u64, records: u32, size: usize, epoch: u32) -> Bytes {
    let recs: Vec<Record> = (0..records)
        .map(|i| {
            let seed = base.wrapping_mul(31).wrapping_add(u64::from(i));
            Record {
                key: Some(Bytes::from(format!("k{seed}"))),
                value: Bytes::from(
                    (0..size)
                        .map(|j| (seed as usize + j) as u8)
                        .collect::<Vec<u8>>(),
                ),
                timestamp: seed as i64,
                headers: Vec::new(),
            }
        })
        .collect();
    // Sizes here stay far below the batch limit.
    batch::encode(base, epoch, &recs).unwrap_or_default()
}

fn ctx<T>(what: &str, r: StorageResult<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// `r` must be the error variant named `variant`.
pub(super) fn expect_err<T: std::fmt::Debug>(
    what: &str,
    r: StorageResult<T>,
    variant: &str,
) -> Result<(), String> {
    match r {
        Err(e) if e.variant() == variant => Ok(()),
        Err(e) => Err(format!(
            "{what}: expected a `{variant}` error, got `{}`: {e}",
            e.variant()
        )),
        Ok(v) => Err(format!(
            "{what}: expected a `{variant}` error, got success {v:?}"
        )),
    }
}

async fn fill(
    log: &PluginLog,
    from: u64,
    batches: u32,
    records: u32,
    size: usize,
) -> Result<Vec<Bytes>, String> {
    let mut out = Vec::new();
    let mut next = from;
    for _ in 0..batches {
        let b = batch(next, records, size, 1);
        next = ctx("append", log.append(b.clone()).await)?;
        out.push(b);
    }
    Ok(out)
}

async fn round_trip(s: &Subject, dir: &Path, _: &Options) -> CaseResult {
    let log = ctx("open", s.open(dir).await)?;
    let b0 = ctx("bounds", log.bounds().await)?;
    ensure!(
        b0 == OffsetBounds::default(),
        "a new log should be 0..0, is {b0:?}"
    );
    let batches = [
        batch(0, 3, 100, 1),
        batch(3, 1, 5000, 1),
        batch(4, 10, 10, 2),
    ];
    let mut end = 0;
    for b in &batches {
        end = ctx("append", log.append(b.clone()).await)?;
    }
    ensure!(end == 14, "log end after 14 records is {end}");
    for (offset, want) in [(0u64, 0usize), (2, 0), (3, 1), (4, 2), (13, 2)] {
        let got = ctx("read", log.read(offset, 1).await)?;
        ensure!(
            got == batches[want],
            "read at {offset} did not return batch {want} byte for byte"
        );
    }
    let all = ctx("read", log.read(0, 1 << 20).await)?;
    let want: Vec<u8> = batches.iter().flat_map(|b| b.iter().copied()).collect();
    ensure!(
        all[..] == want[..],
        "reading everything did not return the three batches in order"
    );
    let records = batch::decode(&all).map_err(|e| e.to_string())?;
    ensure!(
        records
            .iter()
            .enumerate()
            .all(|(i, r)| r.offset == i as u64),
        "record offsets are not 0..14"
    );
    log.close().await;
    Ok(None)
}

async fn multi_batch_append(s: &Subject, dir: &Path, _: &Options) -> CaseResult {
    let log = ctx("open", s.open(dir).await)?;
    let mut two = batch(0, 2, 50, 1).to_vec();
    two.extend_from_slice(&batch(2, 3, 50, 1));
    let end = ctx(
        "append of two batches",
        log.append(Bytes::from(two.clone())).await,
    )?;
    ensure!(end == 5, "two batches of 2 and 3 records end at {end}");
    let got = ctx("read", log.read(0, 1 << 20).await)?;
    ensure!(
        got[..] == two[..],
        "read back differs from the two batches appended together"
    );
    // All or nothing: a good batch followed by a gap must leave no trace.
    let mut mixed = batch(5, 1, 10, 1).to_vec();
    mixed.extend_from_slice(&batch(7, 1, 10, 1));
    expect_err(
        "append of a batch then a gap",
        log.append(Bytes::from(mixed)).await,
        "conflict",
    )?;
    let b = ctx("bounds", log.bounds().await)?;
    ensure!(
        b.log_end == 5,
        "a refused append moved the log end to {}",
        b.log_end
    );
    log.close().await;
    Ok(None)
}

async fn bad_appends(s: &Subject, dir: &Path, _: &Options) -> CaseResult {
    let log = ctx("open", s.open(dir).await)?;
    fill(&log, 0, 2, 2, 20).await?;
    // Past the host's own check (`append` refuses a batch whose CRC fails
    // before the plugin sees it): the plugin's checks are under test.
    expect_err(
        "append at an old offset",
        log.append_sealed(batch(0, 1, 10, 1)).await,
        "conflict",
    )?;
    expect_err(
        "append past the end",
        log.append_sealed(batch(9, 1, 10, 1)).await,
        "conflict",
    )?;
    expect_err(
        "append of nothing",
        log.append_sealed(Bytes::new()).await,
        "invalid-input",
    )?;
    expect_err(
        "append of garbage",
        log.append_sealed(Bytes::from_static(&[7u8; 100])).await,
        "invalid-input",
    )?;
    let good = batch(4, 1, 10, 1);
    expect_err(
        "append of a cut batch",
        log.append_sealed(good.slice(..good.len() - 3)).await,
        "invalid-input",
    )?;
    let mut no_records = good.to_vec();
    no_records[24..28].copy_from_slice(&0u32.to_le_bytes());
    expect_err(
        "append of a batch with no records",
        log.append_sealed(Bytes::from(no_records)).await,
        "invalid-input",
    )?;
    let end = ctx("append after refusals", log.append(good).await)?;
    ensure!(
        end == 5,
        "log end after refusals and one good batch is {end}"
    );
    log.close().await;
    Ok(None)
}

async fn read_bounds(s: &Subject, dir: &Path, _: &Options) -> CaseResult {
    let log = ctx("open", s.open(dir).await)?;
    let bs = fill(&log, 0, 4, 2, 1000).await?;
    let at_end = ctx("read at the log end", log.read(8, 1 << 20).await)?;
    ensure!(
        at_end.is_empty(),
        "a read at the log end returned {} bytes",
        at_end.len()
    );
    match log.read(9, 1 << 20).await {
        Err(StorageError::OffsetOutOfRange(b)) => {
            ensure!(
                b == OffsetBounds {
                    log_start: 0,
                    log_end: 8
                },
                "out-of-range error carries {b:?}"
            )
        }
        other => {
            return Err(format!(
                "read past the end: expected offset-out-of-range, got {other:?}"
            ));
        }
    }
    let one = ctx("read with max-bytes 1", log.read(2, 1).await)?;
    ensure!(
        one == bs[1],
        "a tiny max-bytes must still return exactly the first batch"
    );
    let two = ctx(
        "read with room for two",
        log.read(2, (bs[1].len() + bs[2].len()) as u32).await,
    )?;
    ensure!(
        two.len() == bs[1].len() + bs[2].len(),
        "max-bytes for two batches returned {} bytes",
        two.len()
    );
    let mid = ctx("read from mid-batch", log.read(5, 1).await)?;
    ensure!(
        mid == bs[2],
        "a read at offset 5 must start with the batch holding it (4..6)"
    );
    log.close().await;
    Ok(None)
}

async fn many_batches(s: &Subject, dir: &Path, _: &Options) -> CaseResult {
    let log = ctx("open", s.open(dir).await)?;
    // 300 batches of ~2 KiB: several segments for any segment size <= 512 KiB.
    let bs = fill(&log, 0, 300, 2, 1000).await?;
    let mut next = 0u64;
    let mut got = Vec::new();
    while next < 600 {
        let chunk = ctx("read", log.read(next, 64 * 1024).await)?;
        let recs = batch::decode(&chunk).map_err(|e| format!("read at {next}: {e}"))?;
        ensure!(
            recs.first().map(|r| r.offset) == Some(next),
            "read at {next} did not start there"
        );
        next = recs.last().map(|r| r.offset + 1).unwrap_or(next);
        got.extend_from_slice(&chunk);
    }
    let want: Vec<u8> = bs.iter().flat_map(|b| b.iter().copied()).collect();
    ensure!(
        got == want,
        "reading the whole log in 64 KiB steps did not return what was appended"
    );
    log.close().await;
    Ok(None)
}

async fn truncate(s: &Subject, dir: &Path, _: &Options) -> CaseResult {
    let log = ctx("open", s.open(dir).await)?;
    fill(&log, 0, 5, 2, 100).await?; // batches at 0,2,4,6,8
    let epochs = vec![
        EpochEntry {
            epoch: 1,
            start_offset: 0,
        },
        EpochEntry {
            epoch: 2,
            start_offset: 4,
        },
        EpochEntry {
            epoch: 3,
            start_offset: 7,
        },
    ];
    ctx("set epochs", log.set_leader_epochs(epochs.clone()).await)?;
    let end = ctx("truncate at the end", log.truncate(10).await)?;
    ensure!(end == 10, "truncating at the log end changed it to {end}");
    let end = ctx("truncate mid-batch", log.truncate(7).await)?;
    ensure!(
        end == 6,
        "truncate(7) must remove the whole batch 6..8, log end is {end}"
    );
    let e = ctx("epochs", log.leader_epochs().await)?;
    ensure!(
        e == epochs[..2],
        "epochs starting at or after the new end must go, got {e:?}"
    );
    let end = ctx("truncate at a boundary", log.truncate(4).await)?;
    ensure!(end == 4, "truncate(4) at a batch boundary left {end}");
    expect_err(
        "truncate past the end",
        log.truncate(9).await,
        "offset-out-of-range",
    )?;
    let end = ctx(
        "append after truncation",
        log.append(batch(4, 1, 10, 4)).await,
    )?;
    ensure!(end == 5, "append after truncation ended at {end}");
    let r = ctx("read", log.read(4, 1 << 20).await)?;
    ensure!(
        r == batch(4, 1, 10, 4),
        "read after truncation returned old data"
    );
    ctx("truncate to the start", log.truncate(0).await)?;
    let b = ctx("bounds", log.bounds().await)?;
    ensure!(b == OffsetBounds::default(), "truncate(0) left {b:?}");
    log.close().await;
    Ok(None)
}

async fn delete_prefix(s: &Subject, dir: &Path, _: &Options) -> CaseResult {
    let log = ctx("open", s.open(dir).await)?;
    let bs = fill(&log, 0, 50, 2, 500).await?;
    ctx("delete prefix", log.delete_prefix(41).await)?;
    let b = ctx("bounds", log.bounds().await)?;
    ensure!(
        b == OffsetBounds {
            log_start: 41,
            log_end: 100
        },
        "after delete-prefix(41): {b:?}"
    );
    expect_err(
        "read below the log start",
        log.read(39, 100).await,
        "offset-out-of-range",
    )?;
    let r = ctx("read at the log start", log.read(41, 1).await)?;
    ensure!(r == bs[20], "read at 41 must return the batch 40..42");
    ctx("delete below the start", log.delete_prefix(10).await)?;
    let b = ctx("bounds", log.bounds().await)?;
    ensure!(
        b.log_start == 41,
        "delete-prefix below the start moved it to {}",
        b.log_start
    );
    ctx("delete past the end", log.delete_prefix(500).await)?;
    let b = ctx("bounds", log.bounds().await)?;
    ensure!(
        b == OffsetBounds {
            log_start: 500,
            log_end: 500
        },
        "reset past the end: {b:?}"
    );
    let end = ctx(
        "append at the new start",
        log.append(batch(500, 2, 10, 1)).await,
    )?;
    ensure!(end == 502, "append after a reset ended at {end}");
    log.close().await;
    Ok(None)
}

/// `reset` empties the log at any offset (below the start: a follower
/// whose log lies wholly past its leader's end), durably.
async fn reset(s: &Subject, dir: &Path, _: &Options) -> CaseResult {
    let log = ctx("open", s.open(dir).await)?;
    fill(&log, 0, 50, 2, 500).await?;
    ctx("delete prefix", log.delete_prefix(60).await)?;
    let epochs = vec![EpochEntry {
        epoch: 3,
        start_offset: 0,
    }];
    ctx("set epochs", log.set_leader_epochs(epochs).await)?;
    ctx("set hw", log.set_high_watermark(80).await)?;
    let empty_at = |o| OffsetBounds {
        log_start: o,
        log_end: o,
    };
    // Below the start, inside the log, at and past the end.
    for at in [20, 70, 200, 300] {
        ctx(&format!("reset({at})"), log.reset(at).await)?;
        let b = ctx("bounds", log.bounds().await)?;
        ensure!(b == empty_at(at), "after reset({at}): {b:?}");
        ensure!(
            ctx("epochs", log.leader_epochs().await)?.is_empty(),
            "reset({at}) kept the epoch cache"
        );
        let r = ctx("read at the new end", log.read(at, 1000).await)?;
        ensure!(r.is_empty(), "reset({at}) left {} bytes to read", r.len());
        let end = ctx(
            "append at the new start",
            log.append(batch(at, 2, 10, 4)).await,
        )?;
        ensure!(end == at + 2, "append after reset({at}) ended at {end}");
    }
    // Back below everything written: nothing of it may come back.
    ctx("reset(5)", log.reset(5).await)?;
    let end = ctx("append at 5", log.append(batch(5, 3, 10, 6)).await)?;
    ensure!(end == 8, "append after reset(5) ended at {end}");
    log.close().await;
    let log = ctx("reopen", s.open(dir).await)?;
    let b = ctx("bounds", log.bounds().await)?;
    if b.log_end == 0 {
        log.close().await;
        return s.came_back_empty();
    }
    ensure!(
        b == OffsetBounds {
            log_start: 5,
            log_end: 8
        },
        "after reopen: {b:?}"
    );
    let r = ctx("read after reopen", log.read(5, 1000).await)?;
    ensure!(
        r == batch(5, 3, 10, 6),
        "after reopen the log holds other bytes than the batch appended after the reset"
    );
    log.close().await;
    Ok(None)
}

async fn checkpoints(s: &Subject, dir: &Path, _: &Options) -> CaseResult {
    let log = ctx("open", s.open(dir).await)?;
    ensure!(
        ctx("hw", log.high_watermark().await)? == 0,
        "a new log's high watermark is not 0"
    );
    ensure!(
        ctx("epochs", log.leader_epochs().await)?.is_empty(),
        "a new log has epochs"
    );
    fill(&log, 0, 3, 1, 10).await?;
    ctx("set hw", log.set_high_watermark(2).await)?;
    ensure!(
        ctx("hw", log.high_watermark().await)? == 2,
        "high watermark did not round-trip"
    );
    let e = vec![
        EpochEntry {
            epoch: 0,
            start_offset: 0,
        },
        EpochEntry {
            epoch: 5,
            start_offset: 2,
        },
    ];
    ctx("set epochs", log.set_leader_epochs(e.clone()).await)?;
    ensure!(
        ctx("epochs", log.leader_epochs().await)? == e,
        "epochs did not round-trip"
    );
    ctx("flush", log.flush().await)?;
    log.close().await;
    Ok(None)
}

async fn reopen(s: &Subject, dir: &Path, _: &Options) -> CaseResult {
    let log = ctx("open", s.open(dir).await)?;
    let bs = fill(&log, 0, 120, 3, 300).await?;
    ctx("delete prefix", log.delete_prefix(30).await)?;
    ctx("set hw", log.set_high_watermark(300).await)?;
    let e = vec![
        EpochEntry {
            epoch: 1,
            start_offset: 0,
        },
        EpochEntry {
            epoch: 4,
            start_offset: 200,
        },
    ];
    ctx("set epochs", log.set_leader_epochs(e.clone()).await)?;
    ctx("flush", log.flush().await)?;
    log.close().await;
    let log = ctx("reopen", s.open(dir).await)?;
    let b = ctx("bounds", log.bounds().await)?;
    if b.log_end == 0 {
        log.close().await;
        return s.came_back_empty();
    }
    ensure!(
        b == OffsetBounds {
            log_start: 30,
            log_end: 360
        },
        "bounds after reopen: {b:?}"
    );
    ensure!(
        ctx("hw", log.high_watermark().await)? == 300,
        "high watermark lost on reopen"
    );
    ensure!(
        ctx("epochs", log.leader_epochs().await)? == e,
        "epochs lost on reopen"
    );
    let r = ctx("read", log.read(360 - 3, 1).await)?;
    ensure!(r == bs[119], "last batch differs after reopen");
    let end = ctx(
        "append after reopen",
        log.append(batch(360, 1, 10, 4)).await,
    )?;
    ensure!(end == 361, "append after reopen ended at {end}");
    log.close().await;
    Ok(None)
}

/// Files under `dir` whose content ends with `tail`.
fn files_ending_with(dir: &Path, tail: &[u8]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|c| c.ends_with(tail)) {
                out.push(p);
            }
        }
    }
    out
}

async fn torn_tail(s: &Subject, dir: &Path, _: &Options) -> CaseResult {
    let log = ctx("open", s.open(dir).await)?;
    let bs = fill(&log, 0, 10, 2, 400).await?;
    ctx("flush", log.flush().await)?;
    log.close().await;
    let last = &bs[9];
    let files = files_ending_with(dir, last);
    let [file] = &files[..] else {
        return Ok(Some(format!(
            "{} files end with the last batch; the tail can only be torn where the plugin stores batches as written",
            files.len()
        )));
    };
    // A crash mid-write: the last batch is cut short.
    let len = std::fs::metadata(file).map_err(|e| e.to_string())?.len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .map_err(|e| e.to_string())?;
    f.set_len(len - 7).map_err(|e| e.to_string())?;
    drop(f);
    let log = ctx("reopen after a torn write", s.open(dir).await)?;
    let b = ctx("bounds", log.bounds().await)?;
    if b.log_end == 0 {
        log.close().await;
        return s.came_back_empty();
    }
    ensure!(
        b.log_end == 18,
        "a torn last batch must be cut back to 18, log end is {}",
        b.log_end
    );
    let end = ctx(
        "append after recovery",
        log.append(batch(18, 2, 400, 2)).await,
    )?;
    ensure!(end == 20, "append after recovery ended at {end}");
    log.close().await;

    // Garbage after the last whole batch (a torn header) is cut too.
    let mut content = std::fs::read(file).map_err(|e| e.to_string())?;
    content.extend_from_slice(&[0xAB; 30]);
    std::fs::write(file, &content).map_err(|e| e.to_string())?;
    let log = ctx("reopen after trailing garbage", s.open(dir).await)?;
    let b = ctx("bounds", log.bounds().await)?;
    ensure!(
        b.log_end == 20,
        "trailing garbage must be cut, log end is {}",
        b.log_end
    );
    let r = ctx("read", log.read(18, 1).await)?;
    ensure!(
        r == batch(18, 2, 400, 2),
        "the batch before the garbage changed"
    );
    log.close().await;
    Ok(None)
}
