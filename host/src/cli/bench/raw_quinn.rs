//! The raw-QUIC baseline of `replicator bench`: bulk throughput of one quinn
//! connection between two processes on this machine, through endpoints
//! configured exactly as the nodes' (same TLS, ALPN, windows and socket
//! buffers), with no framing, storage or replication on top. Replicated
//! throughput is reported as a fraction of this.
//!
//! The receiving side is the hidden `replicator bench-sink` subcommand,
//! run as its own process so that sender and receiver compete for the two
//! cores as the nodes do. Both ends run on runtimes with a node's worker
//! threads (`procs::worker_threads`; `bench` runs on one too): on this
//! 2-core VM, runtimes with a worker per core at each end moved 712 MB/s
//! on average where one worker each moved 891 (six alternating runs of
//! each), so a baseline measured that way flattered every ratio by a
//! quarter.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use replicator::node::config::{ClientConfig, NodeConfig};
use replicator::transport::Transport;
use replicator::transport::tls::{Identity, TlsMaterial};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::workload::per_gb;
use crate::cli::procs::{cpu_seconds, worker_threads};

/// Bytes written per `write_chunk`: large, so the sender's per-call cost
/// does not limit the baseline.
const CHUNK: usize = 1 << 20;

#[derive(Args)]
pub struct SinkArgs {
    /// A node config whose certificate the sink presents.
    #[arg(long)]
    config: PathBuf,
    /// UDP address to listen on (port 0 picks one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Worker threads of the sink's async runtime (default: one per core),
    /// as `node --worker-threads`.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

/// `replicator bench-sink`: accept one connection, read every stream to
/// its end and answer with the byte count (8 bytes, big-endian). Prints
/// `listening <addr> workers <n>` once ready (`n`: its runtime's worker
/// threads, which the report shows); exits when the connection closes.
pub async fn sink(args: SinkArgs) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(&args.config)?;
    let tls = TlsMaterial::load(&config.tls)?;
    let transport = Transport::bind(args.listen, &tls, Identity::Node(config.node_id), true)?;
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    println!("listening {} workers {workers}", transport.local_addr()?);
    let incoming = tokio::time::timeout(Duration::from_secs(30), transport.endpoint().accept())
        .await
        .context("no connection within 30 s")?
        .context("endpoint closed")?;
    let conn = incoming.await.context("handshake")?;
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            // The sender closes the connection when it is done.
            Err(_) => break,
        };
        let mut total = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.context("reading")? {
            total += chunk.bytes.len() as u64;
        }
        send.write_all(&total.to_be_bytes()).await?;
        send.finish()?;
    }
    transport.close().await;
    Ok(ExitCode::SUCCESS)
}

/// What one baseline run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RawQuinn {
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    /// CPU seconds per GB of sender and receiver together: what one QUIC
    /// crossing of a byte costs this machine.
    pub cpu_s_per_gb: f64,
    /// Worker threads of the sender's and the sink's runtimes, as each
    /// reported them (a node's count, for a fair baseline).
    pub sender_workers: usize,
    pub sink_workers: usize,
}

/// Start a sink process with node 1's certificate, send `bytes` on one
/// stream as the client, and time it until the sink has counted them all.
/// The sink runs with a node's worker threads, as this process does.
pub async fn measure(cluster: &Path, bytes: u64) -> anyhow::Result<RawQuinn> {
    let exe = std::env::current_exe().context("locating the replicator binary")?;
    let mut child = tokio::process::Command::new(exe)
        .arg("bench-sink")
        .arg("--config")
        .arg(cluster.join("node-1.toml"))
        .arg("--worker-threads")
        .arg(worker_threads().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the raw-quinn sink")?;
    let stdout = child.stdout.take().context("sink stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the raw-quinn sink did not start within 30 s")??
        .context("the raw-quinn sink exited before listening")?;
    let (addr, sink_workers) = parse_listening(&first)
        .with_context(|| format!("unexpected first line from the sink: {first:?}"))?;

    let client = ClientConfig::load(&cluster.join("client.toml"))?;
    let tls = TlsMaterial::load(&client.tls)?;
    let transport = Transport::bind("127.0.0.1:0".parse()?, &tls, Identity::Client, false)?;
    let conn = transport
        .endpoint()
        .connect(addr, &Identity::Node(1).dns_name())?
        .await
        .context("connecting to the sink")?;
    // Warm up congestion control and the windows, untimed.
    send_bulk(&conn, 64 << 20).await?;
    let sink_pid = child.id().context("the raw-quinn sink exited")?;
    let cpu =
        || -> anyhow::Result<f64> { Ok(cpu_seconds(std::process::id())? + cpu_seconds(sink_pid)?) };
    let cpu_before = cpu()?;
    let started = Instant::now();
    let counted = send_bulk(&conn, bytes).await?;
    let seconds = started.elapsed().as_secs_f64();
    // This process only sends while it is timed.
    let cpu_used = cpu()? - cpu_before;
    if counted != bytes {
        bail!("the sink counted {counted} bytes, {bytes} were sent");
    }
    conn.close(0u32.into(), b"done");
    transport.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    Ok(RawQuinn {
        bytes,
        seconds,
        mb_per_s: bytes as f64 / 1e6 / seconds,
        cpu_s_per_gb: per_gb(cpu_used, bytes),
        sender_workers: tokio::runtime::Handle::current().metrics().num_workers(),
        sink_workers,
    })
}

/// The sink's `listening <addr> workers <n>`.
fn parse_listening(line: &str) -> Option<(SocketAddr, usize)> {
    let mut words = line.split_whitespace();
    if words.next()? != "listening" {
        return None;
    }
    let addr = words.next()?.parse().ok()?;
    if words.next()? != "workers" {
        return None;
    }
    let workers = words.next()?.parse().ok()?;
    words.next().is_none().then_some((addr, workers))
}

/// Write `bytes` on a new stream and return what the sink says it read.
async fn send_bulk(conn: &quinn::Connection, bytes: u64) -> anyhow::Result<u64> {
    // Incompressible content, shared by every chunk (Bytes clones are
    // reference counts, so the sender copies nothing).
    let chunk = Bytes::from(super::payload::random_bytes(CHUNK, 7));
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        send.write_chunk(chunk.slice(..n)).await?;
        left -= n as u64;
    }
    send.finish()?;
    let mut count = [0u8; 8];
    recv.read_exact(&mut count)
        .await
        .context("reading the sink's count")?;
    Ok(u64::from_be_bytes(count))
}

#[cfg(test)]
mod tests {
    use super::parse_listening;

    #[test]
    fn the_sinks_first_line_gives_its_address_and_workers() {
        assert_eq!(
            parse_listening("listening 127.0.0.1:4433 workers 1"),
            Some(("127.0.0.1:4433".parse().expect("addr"), 1))
        );
        for bad in [
            "listening 127.0.0.1:4433",
            "listening nowhere workers 1",
            "listening 127.0.0.1:4433 workers",
            "listening 127.0.0.1:4433 workers x",
            "listening 127.0.0.1:4433 workers 1 more",
            "error: no config",
        ] {
            assert_eq!(parse_listening(bad), None, "{bad}");
        }
    }
}
