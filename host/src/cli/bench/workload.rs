//! The produce workloads of `replicator bench` and what each measures:
//! acks=all throughput, per-request commit latency (hdrhistogram) and the
//! nodes' CPU time, over a timed window after an unmeasured warm-up. Also
//! the failover measurement: SIGKILL the leader, time the first acks=all
//! write its successor acknowledges.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use replicator::batch::Record;
use replicator::client::{Client, ClientError};
use replicator::core::Acks;
use replicator::producer::{Producer, ProducerConfig};
use serde::Serialize;

use super::payload;
use crate::cli::client_cmds;
use crate::cli::procs::{Nodes, cpu_seconds, machine_ticks};

/// One workload: how many producers, each with its own connection and
/// partition, keep how much in flight. A batching workload keeps
/// `in_flight` messages outstanding through a [`Producer`] (which sends
/// what waits as one request, 5 requests at most); otherwise it keeps
/// `in_flight` requests of `records_per_request` records each.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub key: &'static str,
    pub title: &'static str,
    pub producers: u32,
    pub in_flight: usize,
    pub records_per_request: usize,
    pub batching: bool,
}

/// The workloads, as the benchmark issue names them.
pub const WORKLOADS: [Workload; 4] = [
    Workload {
        key: "a",
        title: "1 in flight (commit-latency floor)",
        producers: 1,
        in_flight: 1,
        records_per_request: 1,
        batching: false,
    },
    Workload {
        key: "b",
        title: "1 producer, 256 msgs in flight",
        producers: 1,
        in_flight: 256,
        records_per_request: 1,
        batching: true,
    },
    Workload {
        key: "c",
        title: "4 producers, 64 msgs in flight each",
        producers: 4,
        in_flight: 64,
        records_per_request: 1,
        batching: true,
    },
    Workload {
        key: "d",
        title: "64 KiB batches, 32 in flight",
        producers: 1,
        in_flight: 32,
        records_per_request: 64,
        batching: false,
    },
];

/// Commit latency of acknowledged requests, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    /// The round (from 1) this was measured in: its raw-quinn run is the
    /// one that round started with.
    pub round: u32,
    pub storage: String,
    pub workload: String,
    pub title: String,
    /// Messages acknowledged (acks=all) inside the measured window.
    pub messages: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub msgs_per_s: f64,
    pub mb_per_s: f64,
    pub latency_ms: Latency,
    /// CPU seconds (user + system) of the three node processes per GB of
    /// payload committed; each byte is stored three times and crosses QUIC
    /// three times (client to leader, leader to each follower).
    pub node_cpu_s_per_gb: f64,
    /// The same for this process, the producers' side (the client shares
    /// the machine's cores with the nodes).
    pub client_cpu_s_per_gb: f64,
    /// Share of the machine's CPU time the hypervisor took during the
    /// window (steal), in percent: above a few percent, the figures say
    /// more about the neighbours than about Replicator.
    pub steal_pct: f64,
    /// Share of the machine's CPU time no thread wanted during the window,
    /// in percent: near 0, the cores were the limit.
    pub idle_pct: f64,
    /// CPU seconds per second of the busiest node in the window (the
    /// leader, as a rule): near its worker threads' count, that one
    /// node's runtime was the limit.
    pub busiest_node_cores: f64,
    /// Produce requests that failed inside the window, or were sent in it
    /// and failed after it (a healthy cluster has none).
    pub failed: u64,
    pub first_error: Option<String>,
    /// Nodes that logged a storage write slower than 10 ms in the kernel
    /// (from their start to the window's end): each sent its plugin writes
    /// to the blocking pool for a second, which costs more CPU per byte.
    pub nodes_with_slow_writes: u32,
}

const WARMUP: u8 = 0;
const MEASURING: u8 = 1;
const STOPPING: u8 = 2;

/// What one producer task saw in the measured window.
struct ProducerTally {
    acked_requests: u64,
    latency_us: Histogram<u64>,
    failed: u64,
    first_error: Option<String>,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 us to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).context("histogram bounds")
}

/// Create `topic` (RF 3, min.insync 2) and wait until every partition has
/// a leader and a full ISR, so no election lands in a measurement.
pub async fn create_topic(c: &Client, topic: &str, partitions: u32) -> anyhow::Result<()> {
    c.create_topic(topic, partitions, 3, Some(2))
        .await
        .with_context(|| format!("creating topic {topic}"))?;
    wait_full_isr(c, topic, partitions).await
}

/// Run workload `w` against the running cluster of `nodes`: warm up,
/// then measure for `window`.
pub async fn run(
    nodes: &Nodes,
    storage: &str,
    w: &Workload,
    size: usize,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<WorkloadResult> {
    let client_toml = nodes.dir().join("client.toml");
    let topic = format!("bench-{}", w.key);
    let setup = client_cmds::client(&client_toml)?;
    create_topic(&setup, &topic, w.producers).await?;
    setup.close().await;

    let phase = Arc::new(AtomicU8::new(WARMUP));
    // Answers (acknowledgements or failures) so far, across producers: if
    // the window adds none, the cluster is not answering at all.
    let answered = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for p in 0..w.producers {
        let client = Arc::new(client_cmds::client(&client_toml)?);
        let requests: Arc<Vec<Vec<Record>>> = Arc::new(payload::requests(
            16,
            w.records_per_request,
            size,
            u64::from(p) << 32,
        ));
        let (topic, phase, answered, w) = (topic.clone(), phase.clone(), answered.clone(), *w);
        tasks.push(tokio::spawn(async move {
            let r = produce_loop(&client, &topic, p, &w, &requests, &phase, &answered).await;
            client.close().await;
            r
        }));
    }
    tokio::time::sleep(warmup).await;
    let me = std::process::id();
    let cpu_before = nodes.cpu_seconds()?;
    let client_cpu_before = cpu_seconds(me)?;
    let machine_before = machine_ticks()?;
    let answered_before = answered.load(Ordering::SeqCst);
    let started = Instant::now();
    phase.store(MEASURING, Ordering::SeqCst);
    tokio::time::sleep(window).await;
    phase.store(STOPPING, Ordering::SeqCst);
    let seconds = started.elapsed().as_secs_f64();
    let node_cpu: Vec<f64> = nodes
        .cpu_seconds()?
        .iter()
        .zip(&cpu_before)
        .map(|(after, before)| after - before)
        .collect();
    let client_cpu = cpu_seconds(me)? - client_cpu_before;
    let (idle_pct, steal_pct) = machine_ticks()?.idle_and_steal_pct_since(&machine_before);
    let silent = |how: &str| {
        anyhow::anyhow!(
            "no request was acknowledged or failed in the {:.1} s window: the cluster did not answer{how}; {}",
            window.as_secs_f64(),
            nodes.log_tails()
        )
    };
    if answered.load(Ordering::SeqCst) == answered_before {
        // Say so now: the requests still out would only time out (30 s)
        // into a run that has already failed.
        for t in &tasks {
            t.abort();
        }
        return Err(silent(""));
    }

    let mut latency = histogram()?;
    let (mut requests, mut failed, mut first_error) = (0u64, 0u64, None);
    for t in tasks {
        let tally = t.await.context("producer task")??;
        latency
            .add(&tally.latency_us)
            .context("merging latency histograms")?;
        requests += tally.acked_requests;
        failed += tally.failed;
        first_error = first_error.or(tally.first_error);
    }
    if requests == 0 && failed == 0 {
        // The window's only answers came as it closed, too late to count.
        return Err(silent(" in time"));
    }
    let messages = requests * w.records_per_request as u64;
    let bytes = messages * size as u64;
    Ok(WorkloadResult {
        // Set by the caller, which knows the round.
        round: 0,
        storage: storage.to_string(),
        workload: w.key.to_string(),
        title: w.title.to_string(),
        messages,
        bytes,
        seconds,
        msgs_per_s: messages as f64 / seconds,
        mb_per_s: bytes as f64 / 1e6 / seconds,
        latency_ms: Latency::of(&latency),
        node_cpu_s_per_gb: per_gb(node_cpu.iter().sum(), bytes),
        client_cpu_s_per_gb: per_gb(client_cpu, bytes),
        steal_pct,
        idle_pct,
        busiest_node_cores: node_cpu.iter().copied().fold(0.0, f64::max) / seconds,
        failed,
        first_error,
        // Set by the caller, which has the nodes' logs.
        nodes_with_slow_writes: 0,
    })
}

/// A produce's answer: a request's base offset, or a message's offset.
type Answer<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, ClientError>> + Send + 'a>>;

/// CPU seconds per GB of `bytes` (0 when nothing moved).
pub(super) fn per_gb(cpu_seconds: f64, bytes: u64) -> f64 {
    if bytes > 0 {
        cpu_seconds / (bytes as f64 / 1e9)
    } else {
        0.0
    }
}

/// Keep `w.in_flight` produce requests outstanding on one partition until
/// told to stop, then let the outstanding ones finish. Only requests that
/// complete while the phase is MEASURING are counted.
async fn produce_loop(
    client: &Arc<Client>,
    topic: &str,
    partition: u32,
    w: &Workload,
    requests: &[Vec<Record>],
    phase: &AtomicU8,
    answered: &AtomicU64,
) -> anyhow::Result<ProducerTally> {
    let mut tally = ProducerTally {
        acked_requests: 0,
        latency_us: histogram()?,
        failed: 0,
        first_error: None,
    };
    let producer = w
        .batching
        .then(|| Producer::new(client.clone(), topic, partition, ProducerConfig::default()));
    let mut pending = FuturesUnordered::new();
    let mut next = 0usize;
    loop {
        while phase.load(Ordering::Relaxed) != STOPPING && pending.len() < w.in_flight {
            let records = &requests[next % requests.len()];
            next += 1;
            let sent = Instant::now();
            let sent_measuring = phase.load(Ordering::Relaxed) == MEASURING;
            let answer: Answer<'_> = match &producer {
                Some(p) => Box::pin(p.send(records.first().cloned().unwrap_or_default())),
                None => Box::pin(client.produce(
                    topic,
                    partition,
                    records,
                    Acks::All,
                    Duration::from_secs(30),
                )),
            };
            pending.push(async move {
                let r = answer.await;
                (sent.elapsed(), sent_measuring, r)
            });
        }
        let Some((took, sent_measuring, result)) = pending.next().await else {
            break;
        };
        answered.fetch_add(1, Ordering::SeqCst);
        let measuring = phase.load(Ordering::Relaxed) == MEASURING;
        match result {
            // Throughput and latency: what the window saw acknowledged.
            Ok(_) if measuring => {
                tally.acked_requests += 1;
                let us = (took.as_micros() as u64).clamp(1, 600_000_000);
                tally.latency_us.record(us).context("recording a latency")?;
            }
            Ok(_) => {}
            // A request the window sent fails the run even if its answer
            // comes after the window: a slow failure is still a failure.
            Err(e) if measuring || sent_measuring => {
                tally.failed += 1;
                tally.first_error.get_or_insert_with(|| e.to_string());
            }
            Err(_) => {}
        }
    }
    Ok(tally)
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverResult {
    pub storage: String,
    /// Per round: SIGKILL of the leader to the first acks=all write
    /// acknowledged by another node, in ms.
    pub rounds_ms: Vec<f64>,
    pub p50_ms: f64,
    pub max_ms: f64,
    /// Per round: SIGTERM of the leader (a graceful stop, which hands the
    /// partition over first: controlled shutdown) to the first acks=all
    /// write acknowledged by another node, in ms.
    pub handover_rounds_ms: Vec<f64>,
    pub handover_p50_ms: f64,
    pub handover_max_ms: f64,
}

/// `rounds` times: SIGKILL the leader of a 1-partition topic, produce
/// (acks=all, one at a time) until another node acknowledges, restart the
/// killed node and wait until it is back in the ISR; then the same with
/// SIGTERM (a graceful stop) in place of SIGKILL.
pub async fn failover(
    nodes: &mut Nodes,
    storage: &str,
    rounds: u32,
    size: usize,
) -> anyhow::Result<FailoverResult> {
    let c = client_cmds::client(&nodes.dir().join("client.toml"))?;
    let topic = "bench-failover";
    create_topic(&c, topic, 1).await?;
    let records = payload::requests(1, 1, size, 99).remove(0);
    let mut rounds_ms = Vec::new();
    let mut handover_rounds_ms = Vec::new();
    for graceful in [false, true] {
        for _ in 0..rounds {
            // A write before the stop, so the client knows the leader (as
            // a producer in steady state does).
            let (_, victim) = c
                .produce_at(topic, 0, &records, Acks::All, Duration::from_secs(30))
                .await
                .context("producing before the failover")?;
            if graceful {
                nodes.terminate(victim);
            } else {
                nodes.kill(victim);
            }
            let stopped = Instant::now();
            let how = if graceful { "stopping" } else { "killing" };
            loop {
                if stopped.elapsed() > Duration::from_secs(60) {
                    bail!("no node other than {victim} acknowledged within 60 s of {how} it");
                }
                // Errors are expected here (the write in flight at the kill
                // is ambiguous, and there is no leader for a moment): try
                // again.
                if let Ok((_, node)) = c
                    .produce_at(topic, 0, &records, Acks::All, Duration::from_secs(10))
                    .await
                    && node != victim
                {
                    break;
                }
            }
            let ms = stopped.elapsed().as_secs_f64() * 1e3;
            if graceful {
                handover_rounds_ms.push(ms);
                if !nodes.wait_stopped(victim) {
                    bail!(
                        "node {victim} did not stop cleanly on SIGTERM:\n{}",
                        nodes.log_tail(victim)
                    );
                }
            } else {
                rounds_ms.push(ms);
            }
            nodes.restart(victim)?;
            wait_full_isr(&c, topic, 1).await?;
            // Its peers may count the restarted node as failed for a while
            // yet (their heartbeats to its old incarnation time out first):
            // a round that began then would time what a new leader does
            // about that, not the handover or failover alone.
            wait_all_hear_all(&c).await?;
        }
    }
    c.close().await;
    let (p50_ms, max_ms) = p50_and_max(&rounds_ms);
    let (handover_p50_ms, handover_max_ms) = p50_and_max(&handover_rounds_ms);
    Ok(FailoverResult {
        storage: storage.to_string(),
        p50_ms,
        max_ms,
        rounds_ms,
        handover_p50_ms,
        handover_max_ms,
        handover_rounds_ms,
    })
}

fn p50_and_max(rounds: &[f64]) -> (f64, f64) {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(f64::total_cmp);
    (
        sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        sorted.last().copied().unwrap_or(0.0),
    )
}

/// Until no node counts another as failed.
async fn wait_all_hear_all(c: &Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let nodes = c.known_nodes().await;
    loop {
        let mut all = true;
        for &n in &nodes {
            all &= c.failed_seen_by(n).await.is_ok_and(|f| f.is_empty());
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("some node still counted another as failed 60 s after a restart");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Until all `partitions` of `topic` have a leader and all three replicas
/// in the ISR (the client has no metadata watch: poll).
async fn wait_full_isr(c: &Client, topic: &str, partitions: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((_, parts)) = c.metadata().await
            && parts
                .iter()
                .filter(|p| p.topic == topic && p.leader.is_some() && p.isr.len() == 3)
                .count()
                == partitions as usize
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{topic} did not have leaders and a full ISR within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
