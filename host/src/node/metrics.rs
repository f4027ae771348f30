//! The Prometheus text endpoint (`GET /metrics`): per-partition and global
//! replication metrics from the node's [`MetricsCollector`], encoded with
//! prometheus-client at scrape time.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::debug;

use crate::core::{FailoverMetrics, MetricsCollector, ReplicaId};
use crate::transport::AcceptedConnections;

use super::shared::FetchSessionStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BrokerLabel {
    broker: u32,
}

/// What the node's failover side reports: [`FailoverMetrics`] and the
/// failure detector's verdict on each other node.
#[derive(Debug, Clone, Default)]
pub struct FailoverView {
    pub metrics: FailoverMetrics,
    /// (node, alive) for every other registered node.
    pub brokers: Vec<(ReplicaId, bool)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    message: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    topic: String,
    partition: u32,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The metrics of `collector` and `failover` in Prometheus text format.
pub fn render(
    node: u32,
    collector: &MetricsCollector,
    failover: &FailoverView,
    sessions: &FetchSessionStats,
    connections: AcceptedConnections,
    not_open: usize,
    cert_not_after: i64,
) -> String {
    let mut reg = Registry::with_prefix("replicator");
    let gauges = [
        (
            "partition_log_start_offset",
            "Log start offset (first offset still kept; moves with retention)",
        ),
        (
            "partition_log_end_offset",
            "Log end offset (next offset to write)",
        ),
        (
            "partition_high_watermark",
            "High watermark (committed up to, exclusive)",
        ),
        (
            "partition_isr_size",
            "In-sync replicas (leader's view; 0 on followers)",
        ),
        ("partition_replicas", "Assigned replicas"),
        (
            "partition_lag_messages",
            "Messages the slowest ISR follower is behind (leader) or this replica is behind (follower)",
        ),
        ("partition_is_leader", "1 if this node leads the partition"),
        (
            "partition_under_replicated",
            "1 if led here with an ISR smaller than the replica set",
        ),
        (
            "partition_recovering",
            "1 while this replica recovers its log after a storage fault (`status` says which fault)",
        ),
    ];
    let counters = [
        (
            "partition_fetch_requests",
            "Fetches sent (follower) or served (leader)",
        ),
        ("partition_fetch_bytes", "Record bytes fetched or served"),
        ("partition_fetch_errors", "Fetches that failed"),
        ("partition_isr_shrinks", "ISR shrinks"),
        ("partition_isr_expands", "ISR expansions"),
        (
            "partition_retention_deletions",
            "Log-start moves made by retention (retention_bytes)",
        ),
        (
            "partition_storage_faults",
            "Storage faults of this replica's log (full disk, I/O error, plugin trap), each followed by a recovery",
        ),
    ];
    let gfam: Vec<Family<Labels, Gauge>> = gauges.iter().map(|_| Family::default()).collect();
    let cfam: Vec<Family<Labels, Counter>> = counters.iter().map(|_| Family::default()).collect();
    for m in collector.all_partition_metrics() {
        let s = m.snapshot();
        let l = Labels {
            topic: s.topic.clone(),
            partition: s.partition,
        };
        let gv = [
            i(s.log_start_offset),
            i(s.log_end_offset),
            i(s.high_watermark),
            i64::from(s.isr_size),
            i64::from(s.replica_count),
            i(s.replication_lag_messages),
            i64::from(s.is_leader),
            i64::from(s.under_replicated),
            i64::from(s.recovering),
        ];
        for (f, v) in gfam.iter().zip(gv) {
            f.get_or_create(&l).set(v);
        }
        let cv = [
            s.fetch_request_count,
            s.fetch_bytes_total,
            s.fetch_error_count,
            s.isr_shrink_count,
            s.isr_expand_count,
            s.retention_deletions,
            s.storage_faults,
        ];
        for (f, v) in cfam.iter().zip(cv) {
            f.get_or_create(&l).inc_by(v);
        }
    }
    for ((name, help), f) in gauges.iter().zip(gfam) {
        reg.register(*name, *help, f);
    }
    for ((name, help), f) in counters.iter().zip(cfam) {
        reg.register(*name, *help, f);
    }
    let g = collector.global_snapshot();
    let global: [(&str, &str, u64); 6] = [
        (
            "partitions",
            "Partitions hosted on this node",
            u64::from(g.total_partitions),
        ),
        (
            "partitions_not_open",
            "Partitions assigned to this node whose log it cannot open (retried with backoff; `status` says why); they are missing from the per-partition metrics and from `partitions`",
            not_open as u64,
        ),
        (
            "leader_partitions",
            "Partitions this node leads",
            u64::from(g.leader_partitions),
        ),
        (
            "under_replicated_partitions",
            "Led partitions with an ISR smaller than their replica set",
            u64::from(g.partitions_under_replicated),
        ),
        (
            "max_lag_messages",
            "Largest replication lag over all partitions",
            g.max_replication_lag_messages,
        ),
        ("node_id", "This node's id", u64::from(node)),
    ];
    for (name, help, v) in global {
        let gauge: Gauge = Gauge::default();
        gauge.set(i(v));
        reg.register(name, help, gauge);
    }
    let f = &failover.metrics;
    let failover_counters: [(&str, &str, u64); 4] = [
        (
            "failovers",
            "Leader elections this node decided (successful + failed)",
            f.total_failovers,
        ),
        (
            "failovers_successful",
            "Leader elections this node decided and wrote",
            f.successful_failovers,
        ),
        (
            "failovers_failed",
            "Leader elections that could not be carried out (no live in-sync replica, metadata store errors)",
            f.failed_failovers,
        ),
        (
            "preferred_leader_elections",
            "Partitions this node led and handed back to their preferred replica (leader rebalance)",
            f.preferred_elections,
        ),
    ];
    for (name, help, v) in failover_counters {
        let c: Counter = Counter::default();
        c.inc_by(v);
        reg.register(name, help, c);
    }
    let secs = |ms: f64| ms / 1000.0;
    let avg: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    avg.set(secs(f.average_failover_ms));
    reg.register(
        "failover_average_seconds",
        "Mean time from a failed leader's last heartbeat to its successor's election",
        avg,
    );
    let last: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    last.set(secs(f.last_failover_ms.unwrap_or(0) as f64));
    reg.register(
        "failover_last_seconds",
        "Duration of the last election this node decided",
        last,
    );
    let alive: Family<BrokerLabel, Gauge> = Family::default();
    for (b, up) in &failover.brokers {
        alive
            .get_or_create(&BrokerLabel { broker: *b })
            .set(i64::from(*up));
    }
    reg.register(
        "broker_alive",
        "1 if the failure detector hears the node's heartbeats",
        alive,
    );
    let slow: Counter = Counter::default();
    slow.inc_by(crate::plugin::slow_plugin_writes());
    reg.register(
        "storage_slow_writes",
        "Storage plugin writes that waited in the kernel for over 10 ms (the disk behind, too much dirty memory); each sends plugin writes to the blocking pool for a second",
        slow,
    );
    let accepted: Family<PeerLabel, Counter> = Family::default();
    for (peer, v) in [("node", connections.nodes), ("client", connections.clients)] {
        accepted.get_or_create(&PeerLabel { peer }).inc_by(v);
    }
    reg.register(
        "connections_accepted",
        "QUIC connections this node accepted whose peer passed the hello, by kind of peer (a client makes one per node it talks to; one that climbs under steady traffic is reconnecting)",
        accepted,
    );
    let parts: Family<SessionLabels, Counter> = Family::default();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    for (message, kind, v) in [
        ("fetch", "sent", load(&sessions.fetch_sent)),
        ("fetch", "omitted", load(&sessions.fetch_omitted)),
        ("response", "sent", load(&sessions.response_sent)),
        ("response", "omitted", load(&sessions.response_omitted)),
    ] {
        parts
            .get_or_create(&SessionLabels { message, kind })
            .inc_by(v);
    }
    reg.register(
        "fetch_session_partitions",
        "Partitions this node's fetches (and the answers to them) carried in full (sent) or left out because the fetch session already held them (omitted)",
        parts,
    );
    let expiry: Gauge = Gauge::default();
    expiry.set(cert_not_after);
    reg.register(
        "certificate_expiry_timestamp_seconds",
        format!(
            "When this node's certificate expires (its notAfter, in seconds since 1970); the node stops {} s before it, as peers and clients refuse an expired certificate",
            super::cert_expiry::STOP_AHEAD.as_secs()
        ),
        expiry,
    );
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

/// Serve `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, collector: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let (mut sock, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                debug!("metrics accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let collector = collector.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            // Read the request head (bounded); the body, if any, is ignored.
            while n < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf[n..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(k)) => {
                        n += k;
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let line = head.lines().next().unwrap_or("");
            let (status, ctype, body) =
                if line.starts_with("GET /metrics ") || line == "GET /metrics" {
                    (
                        "200 OK",
                        "text/plain; version=0.0.4; charset=utf-8",
                        collector(),
                    )
                } else {
                    (
                        "404 Not Found",
                        "text/plain",
                        "try GET /metrics\n".to_string(),
                    )
                };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = sock.write_all(resp.as_bytes()).await {
                debug!(%peer, "metrics response: {e}");
            }
            let _ = sock.shutdown().await;
        });
    }
}
