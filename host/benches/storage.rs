//! Storage micro-benchmark: append and read throughput of 1 KiB messages in
//! 64 KiB batches through the native in-process memory log, the wasm
//! memory plugin and the wasm file plugin (no fsync), with the wasm/native
//! ratio measured in the same run, so the cost of the plugin boundary is
//! always visible.
//!
//! `cargo bench --bench storage` (REPLICATOR_BENCH_MB sets the volume,
//! default 256 MB per backend; REPLICATOR_BENCH_ROUNDS the rounds, default
//! 3, best reported).

mod common;

use std::future::Future;
use std::time::Instant;

use bytes::Bytes;
use common::{MESSAGE, mbs, per_batch, template};
use replicator::batch;
use replicator::plugin::{PluginSource, Sandbox, StoragePlugin};
use replicator::storage::memory::MemoryLog;
use replicator::storage::{EpochEntry, LogState, OffsetBounds, PartitionLog, StorageResult};

const READ_MAX: u32 = 1 << 20;

/// Appends a producer keeps in flight in the pipelined run.
const WINDOW: usize = 8;

#[derive(Default)]
struct Figures {
    append_mbs: f64,
    pipelined_mbs: f64,
    read_mbs: f64,
}

impl Figures {
    fn best(self, other: Figures) -> Figures {
        Figures {
            append_mbs: self.append_mbs.max(other.append_mbs),
            pipelined_mbs: self.pipelined_mbs.max(other.pipelined_mbs),
            read_mbs: self.read_mbs.max(other.read_mbs),
        }
    }
}

/// Every batch prepared up front, so the timed loops measure storage alone.
fn prepare(batches: usize, first_offset: u64) -> Vec<Bytes> {
    let tpl = template();
    (0..batches)
        .map(|i| {
            let mut b = tpl.clone();
            batch::set_base_offset(&mut b, first_offset + (i * per_batch()) as u64);
            Bytes::from(b)
        })
        .collect()
}

async fn measure<L: PartitionLog>(log: &L, batches: usize) -> Figures {
    // One append in flight: every call pays the full round trip.
    let prepared = prepare(batches, 0);
    let bytes: usize = prepared.iter().map(Bytes::len).sum();
    let t = Instant::now();
    for b in prepared {
        log.append(b).await.expect("append");
    }
    // Appends without fsync: the sync that `flush` does is not timed.
    let append = t.elapsed();
    log.flush().await.expect("flush");

    // WINDOW appends in flight, as a pipelining producer or follower does.
    let prepared = prepare(batches, (batches * per_batch()) as u64);
    let t = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    for b in prepared {
        inflight.push_back(log.append(b));
        if inflight.len() == WINDOW
            && let Some(f) = inflight.pop_front()
        {
            f.await.expect("append");
        }
    }
    for f in inflight {
        f.await.expect("append");
    }
    let pipelined = t.elapsed();
    log.flush().await.expect("flush");

    let end = (2 * batches * per_batch()) as u64;
    let t = Instant::now();
    let mut at = 0u64;
    let mut read = 0usize;
    while at < end {
        let chunk = log.read(at, READ_MAX).await.expect("read");
        let last = replicator_plugin_sdk::batches(&chunk, false)
            .last()
            .and_then(Result::ok)
            .map(|(h, _)| h.next_offset())
            .expect("a read below the end returns a batch");
        read += chunk.len();
        at = last;
    }
    let read_time = t.elapsed();
    assert_eq!(read, 2 * bytes, "read back a different volume");
    Figures {
        append_mbs: mbs(bytes, append),
        pipelined_mbs: mbs(bytes, pipelined),
        read_mbs: mbs(2 * bytes, read_time),
    }
}

/// The native log made to copy every appended batch into memory of its
/// own, as the wasm memory plugin must: the fair baseline for the cost of
/// the boundary itself (the plain native log keeps the caller's buffer).
struct CopyingLog(MemoryLog);

impl PartitionLog for CopyingLog {
    fn append(&self, b: Bytes) -> impl Future<Output = StorageResult<u64>> + Send {
        self.0.append(Bytes::copy_from_slice(&b))
    }
    fn read(&self, o: u64, m: u32) -> impl Future<Output = StorageResult<Bytes>> + Send {
        self.0.read(o, m)
    }
    fn bounds(&self) -> impl Future<Output = StorageResult<OffsetBounds>> + Send {
        self.0.bounds()
    }
    fn truncate(&self, o: u64) -> impl Future<Output = StorageResult<u64>> + Send {
        self.0.truncate(o)
    }
    fn delete_prefix(&self, o: u64) -> impl Future<Output = StorageResult<()>> + Send {
        self.0.delete_prefix(o)
    }
    fn reset(&self, o: u64) -> impl Future<Output = StorageResult<()>> + Send {
        self.0.reset(o)
    }
    fn high_watermark(&self) -> impl Future<Output = StorageResult<u64>> + Send {
        self.0.high_watermark()
    }
    fn set_high_watermark(&self, o: u64) -> impl Future<Output = StorageResult<()>> + Send {
        self.0.set_high_watermark(o)
    }
    fn leader_epochs(&self) -> impl Future<Output = StorageResult<Vec<EpochEntry>>> + Send {
        self.0.leader_epochs()
    }
    fn set_leader_epochs(
        &self,
        e: Vec<EpochEntry>,
    ) -> impl Future<Output = StorageResult<()>> + Send {
        self.0.set_leader_epochs(e)
    }
    fn flush(&self) -> impl Future<Output = StorageResult<()>> + Send {
        self.0.flush()
    }
    fn recover(&self) -> impl Future<Output = StorageResult<LogState>> + Send {
        self.0.recover()
    }
}

async fn plugin(
    name: &str,
    config: &[(&str, &str)],
    dir: &std::path::Path,
    batches: usize,
) -> Figures {
    let plugin =
        StoragePlugin::load(&PluginSource::Builtin(name.into()), Sandbox::default()).expect("load");
    let config = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let log = plugin
        .open("bench", 0, config, Some(dir))
        .await
        .expect("open");
    let f = measure(&log, batches).await;
    log.close().await;
    f
}

fn main() {
    let mb: usize = std::env::var("REPLICATOR_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let rounds: usize = std::env::var("REPLICATOR_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let batch_bytes = template().len();
    let batches = (mb * 1_000_000 / batch_bytes).max(1);
    let rt = if std::env::var_os("REPLICATOR_BENCH_SINGLE_THREAD").is_some() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    }
    .expect("runtime");
    // Run inside a spawned task, as the node runtime does: the caller and
    // the plugin's task then hand off on one worker instead of waking a
    // thread per call (expensive on a VM).
    let run = rt.spawn(async move {
        let tmp = tempfile::tempdir().expect("tempdir");
        println!(
            "storage benchmark: {batches} batches of {} x {MESSAGE} B messages ({batch_bytes} B each), reads of up to {} KiB, best of {rounds} rounds",
            per_batch(),
            READ_MAX / 1024
        );
        // Best of a few rounds, each on a fresh log: on a shared 2-core VM
        // single runs swing by a third.
        let (mut native, mut copying, mut memory, mut file) =
            (Figures::default(), Figures::default(), Figures::default(), Figures::default());
        for round in 0..rounds {
            native = native.best(measure(&MemoryLog::new(), batches).await);
            copying = copying.best(measure(&CopyingLog(MemoryLog::new()), batches).await);
            memory = memory.best(plugin("memory", &[], &tmp.path().join(format!("memory-{round}")), batches).await);
            let dir = tmp.path().join(format!("file-{round}"));
            file = file.best(plugin("file", &[("fsync", "never")], &dir, batches).await);
            let _ = std::fs::remove_dir_all(&dir);
        }
        println!(
            "{:<20} {:>13} {:>15} {:>10}   {:>10} {:>10} {:>10}",
            "backend", "append MB/s", "append MB/s", "read MB/s", "ratio to", "native", ""
        );
        println!(
            "{:<20} {:>13} {:>15} {:>10}   {:>10} {:>10} {:>10}",
            "", "1 in flight", format!("{WINDOW} in flight"), "", "append", "pipelined", "read"
        );
        let rows = [
            ("native memory", &native),
            ("native, copying", &copying),
            ("wasm memory plugin", &memory),
            ("wasm file plugin", &file),
        ];
        for (name, f) in rows {
            println!(
                "{name:<20} {:>13.0} {:>15.0} {:>10.0}   {:>10.3} {:>10.3} {:>10.3}",
                f.append_mbs,
                f.pipelined_mbs,
                f.read_mbs,
                f.append_mbs / native.append_mbs,
                f.pipelined_mbs / native.pipelined_mbs,
                f.read_mbs / native.read_mbs
            );
        }
        println!(
            "boundary cost: wasm memory plugin / native copying log = {:.3} (appends, 1 in flight), {:.3} (reads)",
            memory.append_mbs / copying.append_mbs,
            memory.read_mbs / copying.read_mbs
        );
        let target = 500.0;
        let best = file.append_mbs.max(file.pipelined_mbs);
        println!(
            "file plugin appends without fsync: {:.0} MB/s one at a time, {:.0} MB/s pipelined (target >= {target:.0}): {}",
            file.append_mbs,
            file.pipelined_mbs,
            if best >= target { "met" } else { "NOT met" }
        );
    });
    rt.block_on(run).expect("benchmark task");
}
