//! Object-store benchmark: 1 KiB messages, 64 per batch, appended one at a
//! time through the S3 storage plugin into a real S3-compatible server
//! started for the run (moto, signatures checked; tests/support/s3.rs).
//! Reports append MB/s (uploads included, the final flush too), the
//! objects written (count and sizes by kind), the time to reopen (list and
//! CRC-check every segment) and read everything back, and, measured in the
//! same run, the server's own PUT rate for segment-sized objects through
//! an independent client (boto3), so the plugin's figure has a ceiling to
//! be read against.
//!
//! `cargo bench --bench s3` (REPLICATOR_BENCH_MB sets the volume, default
//! 128 MB; needs moto: `scripts/setup` installs it).

#[path = "../../tests/support/s3.rs"]
#[allow(dead_code)]
mod s3;

mod common;

use std::time::Instant;

use bytes::Bytes;
use common::{MESSAGE, mbs, per_batch, template};
use replicator::batch;
use replicator::node::config::PluginSection;
use replicator::plugin::{PluginSource, StoragePlugin};
use replicator::storage::PartitionLog;

const SEGMENT: usize = 8 << 20;

fn main() {
    let mb: usize = std::env::var("REPLICATOR_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let tpl = template();
    let batches = (mb * 1_000_000 / tpl.len()).max(1);
    let moto = s3::Moto::start();
    let config: Vec<(String, String)> = vec![
        ("endpoint".into(), moto.endpoint()),
        ("bucket".into(), moto.bucket().into()),
        ("access_key_id".into(), moto.access_key_id().into()),
        ("secret_access_key".into(), moto.secret_access_key().into()),
        ("prefix".into(), "bench/".into()),
        ("segment.bytes".into(), SEGMENT.to_string()),
        ("timeout.ms".into(), "10000".into()),
    ];
    let section = PluginSection {
        plugin: "s3".into(),
        config: config.iter().cloned().collect(),
        thread_per_partition: None,
        write_behind_ms: None,
    };
    let plugin = StoragePlugin::load(&PluginSource::Builtin("s3".into()), section.sandbox())
        .expect("load the s3 plugin");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "s3 storage benchmark: {batches} batches of {} x {MESSAGE} B messages ({} B each), segment.bytes {} MiB, moto at {}",
        per_batch(),
        tpl.len(),
        SEGMENT >> 20,
        moto.endpoint()
    );

    // The server's own rate for segment-sized PUTs, via boto3.
    let object = vec![7u8; SEGMENT];
    let puts = 4;
    let t = Instant::now();
    for i in 0..puts {
        moto.put(&format!("baseline/{i}"), &object);
    }
    let raw = mbs(puts * SEGMENT, t.elapsed());

    let (append, reopen, read, total) = rt.block_on(async {
        let log = plugin
            .open("bench", 0, config.clone(), None)
            .await
            .expect("open");
        let prepared: Vec<Bytes> = (0..batches)
            .map(|i| {
                let mut b = tpl.clone();
                batch::set_base_offset(&mut b, (i * per_batch()) as u64);
                Bytes::from(b)
            })
            .collect();
        let total: usize = prepared.iter().map(Bytes::len).sum();
        let t = Instant::now();
        for b in prepared {
            log.append(b).await.expect("append");
        }
        log.flush().await.expect("flush");
        let append = t.elapsed();
        log.close().await;

        let t = Instant::now();
        let log = plugin
            .open("bench", 0, config.clone(), None)
            .await
            .expect("reopen");
        let reopen = t.elapsed();
        let end = log.bounds().await.expect("bounds").log_end;
        assert_eq!(end, (batches * per_batch()) as u64, "reopened short");
        let t = Instant::now();
        let mut at = 0;
        let mut read = 0usize;
        while at < end {
            let chunk = log.read(at, 1 << 20).await.expect("read");
            read += chunk.len();
            at = replicator_plugin_sdk::batches(&chunk, false)
                .last()
                .and_then(Result::ok)
                .map(|(h, _)| h.next_offset())
                .expect("a batch");
        }
        assert_eq!(read, total, "read back a different volume");
        let read_time = t.elapsed();
        log.close().await;
        (append, reopen, read_time, total)
    });

    let keys = moto.list_keys("bench/");
    let of = |kind: &str| -> Vec<u64> {
        keys.iter()
            .filter(|(k, _)| k.contains(kind))
            .map(|(_, s)| *s)
            .collect()
    };
    let segs = of("/seg/");
    let seg_bytes: u64 = segs.iter().sum();
    println!(
        "{:<44} {:>10.1} MB/s  ({:.2} s for {:.0} MB)",
        "append, 1 in flight, uploads and flush incl.",
        mbs(total, append),
        append.as_secs_f64(),
        total as f64 / 1e6
    );
    println!(
        "{:<44} {:>10.1} MB/s  (4 x {} MiB through boto3)",
        "server's raw PUT rate (same run)",
        raw,
        SEGMENT >> 20
    );
    println!(
        "{:<44} {:>10.3}",
        "plugin append / raw PUT",
        mbs(total, append) / raw
    );
    println!(
        "{:<44} {:>10.1} MB/s  ({:.2} s: list, fetch and CRC-check every segment)",
        "reopen (recovery)",
        mbs(total, reopen),
        reopen.as_secs_f64()
    );
    println!(
        "{:<44} {:>10.1} MB/s",
        "read back after reopen",
        mbs(total, read)
    );
    println!(
        "objects written: {} segments, {:.1} MB (min {} B, mean {} B, max {} B); {} manifests, {} fences, {} checkpoints left after the reopen's garbage collection",
        segs.len(),
        seg_bytes as f64 / 1e6,
        segs.iter().min().copied().unwrap_or(0),
        seg_bytes / (segs.len() as u64).max(1),
        segs.iter().max().copied().unwrap_or(0),
        of("/man/").len(),
        of("/gen/").len(),
        of("/chk/").len()
    );
    assert_eq!(
        seg_bytes as usize, total,
        "every appended byte is in exactly one segment"
    );
}
