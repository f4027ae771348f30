//! Model-based case: random operation sequences (proptest) run against the
//! plugin and against a deliberately naive model written here, independent
//! of the index code the plugins share; every answer and every bound must
//! agree. A failure is shrunk to a minimal sequence and reported.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::cases::batch;
use super::{CaseResult, Options, Subject};
use crate::storage::{OffsetBounds, PartitionLog, StorageResult};

#[derive(Debug, Clone)]
enum Op {
    Append { records: u32, size: usize, skew: i8 },
    Read { pick: u16, max: u32 },
    Truncate { pick: u16 },
    DeletePrefix { pick: u16 },
    Reset { pick: u16 },
    SetHighWatermark(u16),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u32..5, 0usize..300, prop_oneof![8 => Just(0i8), 1 => -3i8..4])
            .prop_map(|(records, size, skew)| Op::Append { records, size, skew }),
        4 => (any::<u16>(), prop_oneof![Just(1u32), 1u32..4000, Just(1 << 20)])
            .prop_map(|(pick, max)| Op::Read { pick, max }),
        1 => any::<u16>().prop_map(|pick| Op::Truncate { pick }),
        1 => any::<u16>().prop_map(|pick| Op::DeletePrefix { pick }),
        1 => any::<u16>().prop_map(|pick| Op::Reset { pick }),
        1 => any::<u16>().prop_map(Op::SetHighWatermark),
        1 => Just(Op::Reopen),
    ]
}

/// The naive model: a list of batches and two offsets.
#[derive(Default)]
struct Model {
    batches: Vec<(u64, u64, Bytes)>,
    start: u64,
    end: u64,
    hw: u64,
}

type Answer<T> = Result<T, &'static str>;

impl Model {
    fn bounds(&self) -> OffsetBounds {
        OffsetBounds {
            log_start: self.start,
            log_end: self.end,
        }
    }
    /// An offset mostly inside the log, sometimes just outside.
    fn pick(&self, p: u16) -> u64 {
        let lo = self.start.saturating_sub(1);
        lo + u64::from(p) % (self.end + 3 - lo)
    }
    fn append(&mut self, base: u64, next: u64, b: Bytes) -> Answer<u64> {
        if base != self.end {
            return Err("conflict");
        }
        self.batches.push((base, next, b));
        self.end = next;
        Ok(self.end)
    }
    fn read(&self, offset: u64, max: u32) -> Answer<Bytes> {
        if offset < self.start || offset > self.end {
            return Err("offset-out-of-range");
        }
        // From the batch holding `offset`, while within `max` (always one).
        let mut out = BytesMut::new();
        for (_, _, b) in self
            .batches
            .iter()
            .skip_while(|(_, next, _)| *next <= offset)
        {
            if !out.is_empty() && out.len() + b.len() > max as usize {
                break;
            }
            out.extend_from_slice(b);
        }
        Ok(out.freeze())
    }
    fn truncate(&mut self, offset: u64) -> Answer<u64> {
        if offset < self.start || offset > self.end {
            return Err("offset-out-of-range");
        }
        if let Some(i) = self.batches.iter().position(|(_, next, _)| *next > offset) {
            self.end = self.batches[i].0;
            self.batches.truncate(i);
            self.start = self.start.min(self.end);
        }
        Ok(self.end)
    }
    fn delete_prefix(&mut self, offset: u64) {
        if offset <= self.start {
            return;
        }
        self.batches.retain(|(_, next, _)| *next > offset);
        self.start = offset;
        self.end = self.end.max(offset);
    }
    fn reset(&mut self, offset: u64) {
        self.batches.clear();
        self.start = offset;
        self.end = offset;
    }
}

fn same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    got: StorageResult<T>,
    want: Answer<T>,
) -> Result<(), TestCaseError> {
    match (&got, &want) {
        (Ok(g), Ok(w)) if g == w => Ok(()),
        (Err(g), Err(w)) if g.variant() == *w => Ok(()),
        _ => Err(TestCaseError::fail(format!(
            "{what}: plugin answered {got:?}, the model {want:?}"
        ))),
    }
}

pub(super) async fn run(subject: &Subject, dir: &Path, options: &Options) -> CaseResult {
    let persistent = {
        let probe = dir.join("probe");
        let log = subject
            .open(&probe)
            .await
            .map_err(|e| format!("open: {e}"))?;
        log.append(batch(0, 1, 1, 0))
            .await
            .map_err(|e| format!("append: {e}"))?;
        log.close().await;
        let log = subject
            .open(&probe)
            .await
            .map_err(|e| format!("reopen: {e}"))?;
        let kept = log.bounds().await.map(|b| b.log_end == 1).unwrap_or(false);
        log.close().await;
        if !kept && subject.persistent == Some(true) {
            return subject.came_back_empty();
        }
        kept
    };
    let handle = tokio::runtime::Handle::current();
    let subject = subject.clone();
    let dir = dir.to_path_buf();
    let cases = options.proptest_cases;
    let outcome = tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 200,
            ..Config::default()
        });
        let counter = AtomicU32::new(0);
        runner
            .run(&proptest::collection::vec(op(), 1..40), |ops| {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let case_dir = dir.join(format!("case-{n}"));
                handle.block_on(check_sequence(&subject, &case_dir, persistent, ops))
            })
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("model runner panicked: {e}"))?;
    outcome.map(|()| None)
}

async fn check_sequence(
    subject: &Subject,
    dir: &Path,
    persistent: bool,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let fail =
        |what: &str, e: crate::storage::StorageError| TestCaseError::fail(format!("{what}: {e}"));
    let mut log = subject.open(dir).await.map_err(|e| fail("open", e))?;
    let mut m = Model::default();
    let mut epoch = 0u32;
    for op in ops {
        match op {
            Op::Append {
                records,
                size,
                skew,
            } => {
                let base = m.end.saturating_add_signed(i64::from(skew));
                epoch += 1;
                let b = batch(base, records, size, epoch);
                let want = m.append(base, base + u64::from(records), b.clone());
                same("append", log.append(b).await, want)?;
            }
            Op::Read { pick, max } => {
                let at = m.pick(pick);
                same(
                    &format!("read({at}, {max})"),
                    log.read(at, max).await,
                    m.read(at, max),
                )?;
            }
            Op::Truncate { pick } => {
                let at = m.pick(pick);
                let want = m.truncate(at);
                same(&format!("truncate({at})"), log.truncate(at).await, want)?;
            }
            Op::DeletePrefix { pick } => {
                let at = m.pick(pick);
                m.delete_prefix(at);
                same(
                    &format!("delete-prefix({at})"),
                    log.delete_prefix(at).await,
                    Ok(()),
                )?;
            }
            Op::Reset { pick } => {
                // Below the start as often as anywhere else.
                let at = if pick % 2 == 0 {
                    m.pick(pick)
                } else {
                    u64::from(pick) % (m.start + 1)
                };
                m.reset(at);
                same(&format!("reset({at})"), log.reset(at).await, Ok(()))?;
            }
            Op::SetHighWatermark(hw) => {
                m.hw = u64::from(hw);
                same(
                    "set-high-watermark",
                    log.set_high_watermark(m.hw).await,
                    Ok(()),
                )?;
                same("high-watermark", log.high_watermark().await, Ok(m.hw))?;
            }
            Op::Reopen => {
                if persistent {
                    log.close().await;
                    log = subject.open(dir).await.map_err(|e| fail("reopen", e))?;
                    same(
                        "high-watermark after reopen",
                        log.high_watermark().await,
                        Ok(m.hw),
                    )?;
                }
            }
        }
        same("bounds", log.bounds().await, Ok(m.bounds()))?;
    }
    log.close().await;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
