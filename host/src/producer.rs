//! A batching producer for one partition, over [`Client`]: Kafka's record
//! accumulator with `linger.ms = 0`. A message sent while `max_in_flight`
//! requests are outstanding waits, and everything that waited goes in the
//! next request, so under load requests grow instead of multiplying and
//! per-request costs (a QUIC stream, a task, the leader's bookkeeping) are
//! paid per batch. With no load every message leaves at once, alone.
//!
//! Ordering: records land in the order sent. Each request travels on its
//! own QUIC stream and the leader reads and checks each on its own task,
//! so with several in flight a small request sent after a large one could
//! reach the partition first. So each request carries this producer's
//! random id and its number, and the leader appends them in that order
//! ([`crate::core::Sequencer`], Kafka's producer sequence numbers without
//! the deduplication): a request refused before the append and sent again
//! still lands before the ones sent after it. A request that fails for
//! good is given up, and the ones after it go on. There is no idempotent
//! producer: an ambiguous outcome is not retried, and a retry never writes
//! twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};

use crate::batch::{HEADER_LEN, MAX_BATCH_LEN, Record, record_len};
use crate::client::{Client, ClientError, ProduceOrder};
use crate::core::Acks;

/// How a [`Producer`] sends.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub acks: Acks,
    /// Requests outstanding at once (Kafka's
    /// `max.in.flight.requests.per.connection`, also 5 by default). Above
    /// 1, each carries its place in the order sent (see the module
    /// documentation).
    pub max_in_flight: usize,
    /// Most bytes of records in one request (Kafka's `batch.size`, but
    /// taken whole when messages are waiting).
    pub max_batch_bytes: usize,
    /// Deadline of each request, retries included.
    pub timeout: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::All,
            max_in_flight: 5,
            max_batch_bytes: 1 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

struct Pending {
    record: Record,
    reply: oneshot::Sender<Result<u64, ClientError>>,
}

/// Sends records to one partition, batching those that wait. Dropping it
/// lets every message already sent finish.
pub struct Producer {
    tx: mpsc::UnboundedSender<Pending>,
    requests: Arc<AtomicU64>,
}

impl Producer {
    pub fn new(client: Arc<Client>, topic: &str, partition: u32, config: ProducerConfig) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let requests = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(
            client,
            topic.to_string(),
            partition,
            config,
            rx,
            requests.clone(),
        ));
        Producer { tx, requests }
    }

    /// Produce requests sent so far (each carries every message that was
    /// waiting for it).
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Send `record`; resolves to its offset once acknowledged per the
    /// producer's acks, or to why not (every message of a failed request
    /// gets that request's error).
    pub fn send(
        &self,
        record: Record,
    ) -> impl std::future::Future<Output = Result<u64, ClientError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = self.tx.send(Pending { record, reply }).is_ok();
        async move {
            if !queued {
                return Err(ClientError::Protocol("the producer has stopped".into()));
            }
            answer
                .await
                .unwrap_or_else(|_| Err(ClientError::Protocol("the producer has stopped".into())))
        }
    }
}

/// A producer id for the leader's ordering: random, so two producers (in
/// two processes) do not share one.
fn random_id() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No randomness: the time and this producer's address, still
        // unlikely to meet another's.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        static MADE: AtomicU64 = AtomicU64::new(0);
        return t ^ (u64::from(std::process::id()) << 32) ^ MADE.fetch_add(1, Ordering::Relaxed);
    }
    u64::from_le_bytes(bytes)
}

/// A copy of `e` for every other message of the failed request.
fn duplicate(e: &ClientError) -> ClientError {
    match e {
        ClientError::Refused(r) => ClientError::Refused(r.clone()),
        ClientError::Ambiguous { node, detail } => ClientError::Ambiguous {
            node: *node,
            detail: detail.clone(),
        },
        ClientError::Timeout { waited, last } => ClientError::Timeout {
            waited: *waited,
            last: last.clone(),
        },
        ClientError::NoLeader(t, p) => ClientError::NoLeader(t.clone(), *p),
        ClientError::UnknownPartition(t, p) => ClientError::UnknownPartition(t.clone(), *p),
        other => ClientError::Protocol(other.to_string()),
    }
}

async fn run(
    client: Arc<Client>,
    topic: String,
    partition: u32,
    config: ProducerConfig,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    requests: Arc<AtomicU64>,
) {
    let max_in_flight = config.max_in_flight.max(1);
    // Whatever the setting, a request stays a valid batch.
    let max_bytes = config
        .max_batch_bytes
        .clamp(1, MAX_BATCH_LEN as usize - HEADER_LEN);
    // With several requests in flight, each carries its number, and the
    // leader appends them in that order (Kafka's sequence numbers): sent
    // on separate streams, they can reach it in any order.
    let producer_id = random_id();
    let mut next_seq = 0u64;
    let mut unacked = std::collections::BTreeSet::new();
    let first_unacked = Arc::new(AtomicU64::new(0));
    let mut waiting: std::collections::VecDeque<Pending> = Default::default();
    let mut inflight = FuturesUnordered::new();
    let mut open = true;
    loop {
        // Send what waits, as long as a request may go.
        while inflight.len() < max_in_flight && !waiting.is_empty() {
            let mut records = Vec::new();
            let mut replies = Vec::new();
            let mut bytes = 0usize;
            while let Some(p) = waiting.front() {
                let len = record_len(&p.record);
                if !records.is_empty() && bytes + len > max_bytes {
                    break;
                }
                bytes += len;
                let Some(p) = waiting.pop_front() else { break };
                records.push(p.record);
                replies.push(p.reply);
            }
            let (client, topic) = (client.clone(), topic.clone());
            let (acks, timeout) = (config.acks, config.timeout);
            let seq = next_seq;
            next_seq += 1;
            unacked.insert(seq);
            let first_unacked = first_unacked.clone();
            let ordered = max_in_flight > 1;
            requests.fetch_add(1, Ordering::Relaxed);
            inflight.push(async move {
                let order = ordered.then_some(ProduceOrder {
                    producer: producer_id,
                    seq,
                    first_unacked: &first_unacked,
                });
                let r = client
                    .produce_in_order(&topic, partition, &records, acks, timeout, order)
                    .await
                    .map(|(offset, _)| offset);
                match r {
                    Ok(base) => {
                        for (i, reply) in replies.into_iter().enumerate() {
                            let _ = reply.send(Ok(base + i as u64));
                        }
                    }
                    Err(e) => {
                        let mut replies = replies.into_iter();
                        let first = replies.next();
                        for reply in replies {
                            let _ = reply.send(Err(duplicate(&e)));
                        }
                        if let Some(first) = first {
                            let _ = first.send(Err(e));
                        }
                    }
                }
                seq
            });
        }
        if !open && waiting.is_empty() && inflight.is_empty() {
            return;
        }
        tokio::select! {
            p = rx.recv(), if open => match p {
                Some(p) => {
                    waiting.push_back(p);
                    while let Ok(p) = rx.try_recv() {
                        waiting.push_back(p);
                    }
                }
                None => open = false,
            },
            Some(seq) = inflight.next(), if !inflight.is_empty() => {
                // Answered or given up: the leader need not wait for it.
                unacked.remove(&seq);
                let lowest = unacked.first().copied().unwrap_or(next_seq);
                first_unacked.store(lowest, Ordering::Release);
            }
        }
    }
}
