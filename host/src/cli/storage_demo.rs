//! `replicator demo`: the storage path end to end on this machine. Writes a
//! partition through a storage plugin, closes it, reopens it (recovery),
//! reads every message back and checks it, and reports throughput. The
//! three-node QUIC cluster joins this demo when the cluster lands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use replicator::batch::{self, Record};
use replicator::plugin::{PluginSource, Sandbox, StoragePlugin};
use replicator::storage::PartitionLog;

#[derive(Args)]
pub struct DemoArgs {
    /// Storage backend: a built-in name (`file`, `memory`) or a .wasm path.
    #[arg(long, default_value = "file")]
    storage: PluginSource,
    /// Messages to write.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages per batch.
    #[arg(long, default_value_t = 64)]
    batch: u32,
    /// Data directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Plugin setting as key=value (repeatable), e.g. `--config fsync=always`.
    #[arg(long = "config", value_parser = super::parse_kv)]
    config: Vec<(String, String)>,
}

fn payload(offset: u64, size: usize) -> Bytes {
    let seed = offset.to_le_bytes();
    Bytes::from(
        (0..size)
            .map(|i| seed[i % 8] ^ (i as u8))
            .collect::<Vec<u8>>(),
    )
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.messages == 0 || args.batch == 0 {
        bail!("--messages and --batch must be at least 1");
    }
    let (dir, _guard) = super::work_dir(&args.dir)?;
    let part_dir = dir.join("demo-0");
    let plugin = StoragePlugin::load(&args.storage, Sandbox::default())
        .with_context(|| format!("loading storage plugin `{}`", args.storage))?;
    println!(
        "storage plugin `{}`, data in {}",
        plugin.name(),
        part_dir.display()
    );

    let log = plugin
        .open("demo", 0, args.config.clone(), Some(&part_dir))
        .await
        .context("opening the partition")?;
    let start = log.bounds().await?.log_end;
    let bar = ProgressBar::new(args.messages);
    bar.set_style(
        ProgressStyle::with_template("writing {bar:40} {pos}/{len} messages {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t = Instant::now();
    let mut next = start;
    let mut bytes = 0u64;
    while next < start + args.messages {
        let n = u64::from(args.batch).min(start + args.messages - next);
        let records: Vec<Record> = (next..next + n)
            .map(|o| Record {
                value: payload(o, args.size),
                timestamp: o as i64,
                ..Default::default()
            })
            .collect();
        let b = batch::encode(next, 1, &records)?;
        bytes += b.len() as u64;
        next = log.append(b).await.context("append")?;
        bar.set_position(next - start);
    }
    log.set_high_watermark(next).await?;
    log.flush().await?;
    let write_secs = t.elapsed().as_secs_f64();
    bar.finish_and_clear();
    log.close().await;

    println!("reopening (recovery runs here)");
    let log = plugin
        .open("demo", 0, args.config, Some(&part_dir))
        .await
        .context("reopening the partition")?;
    let bounds = log.bounds().await?;
    let persistent = bounds.log_end == next;
    if !persistent && bounds.log_end != 0 {
        bail!(
            "after reopening the log ends at {}, expected {next}",
            bounds.log_end
        );
    }
    let mut verified = 0u64;
    let t = Instant::now();
    if persistent {
        let mut at = start;
        while at < next {
            let chunk = log.read(at, 1 << 20).await?;
            for r in batch::decode(&chunk)? {
                if r.offset < at {
                    continue;
                }
                if r.offset != at || r.record.value != payload(r.offset, args.size) {
                    bail!(
                        "message at offset {} does not match what was written",
                        r.offset
                    );
                }
                at += 1;
                verified += 1;
            }
        }
    }
    let read_secs = t.elapsed().as_secs_f64();
    log.close().await;

    let mb = bytes as f64 / 1e6;
    println!(
        "wrote    {} messages, {mb:.1} MB in {write_secs:.2}s: {:.0} msg/s, {:.1} MB/s",
        args.messages,
        args.messages as f64 / write_secs,
        mb / write_secs
    );
    if persistent {
        println!(
            "verified {verified} messages after reopen in {read_secs:.2}s: {:.1} MB/s",
            mb / read_secs
        );
        println!("ok: every message read back intact");
    } else {
        println!(
            "`{}` keeps nothing across instances: nothing to verify after reopen",
            plugin.name()
        );
    }
    Ok(ExitCode::SUCCESS)
}
