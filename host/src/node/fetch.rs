//! The follower side of replication on one node: the core's [`Fetcher`]
//! groups the fetches of every followed partition into multi-partition
//! fetches per leader; one session task per leader sends them, one at a
//! time, on a long-lived QUIC stream, and hands each partition's answer
//! back to its actor. A failed session reconnects on the next fetch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::core::{FetchRequest, FetchResponse, Fetcher, MultiFetch, ReplicaId, TopicPartition};
use crate::transport::{FetchStream, Peer, Transport};

use super::partition::{Event, PartitionHandle};
use super::shared::Shared;

pub enum FetchCmd {
    /// A follower replica's `SendFetch`.
    Enqueue {
        tp: TopicPartition,
        leader: ReplicaId,
        request: FetchRequest,
        partition: PartitionHandle,
    },
    /// Stop fetching this partition (it leads now, or is gone).
    Remove { tp: TopicPartition },
    Done {
        id: u64,
        result: Result<Vec<(TopicPartition, FetchResponse)>, String>,
    },
}

struct Manager {
    shared: Arc<Shared>,
    transport: Transport,
    fetcher: Fetcher,
    leaders: HashMap<TopicPartition, ReplicaId>,
    partitions: HashMap<TopicPartition, PartitionHandle>,
    /// Fetch id -> (leader, (partition, correlation id) in it).
    inflight: HashMap<u64, (ReplicaId, Vec<(TopicPartition, u64)>)>,
    sessions: HashMap<ReplicaId, mpsc::UnboundedSender<MultiFetch>>,
    tx: mpsc::UnboundedSender<FetchCmd>,
}

pub(super) fn spawn(
    shared: Arc<Shared>,
    transport: Transport,
    tx: mpsc::UnboundedSender<FetchCmd>,
    rx: mpsc::UnboundedReceiver<FetchCmd>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let m = Manager {
        fetcher: Fetcher::new(shared.replication.clone()),
        shared,
        transport,
        leaders: HashMap::new(),
        partitions: HashMap::new(),
        inflight: HashMap::new(),
        sessions: HashMap::new(),
        tx,
    };
    tokio::spawn(m.run(rx, stop));
}

impl Manager {
    /// Runs until the node stops; dropping the sessions' inboxes then ends
    /// every session task too.
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<FetchCmd>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        // Backoffs and the wait for a response's partitions end with
        // time, not with a command: sleep until the fetcher's next
        // deadline. A 10 ms poll cost an idle node 100 wake-ups a second.
        let timer = tokio::time::sleep_until(self.shared.instant_at(0));
        tokio::pin!(timer);
        let mut armed: Option<u64> = None;
        loop {
            // One clock reading for the poll and the deadline after it: a
            // deadline read a millisecond later than the poll could be
            // passed already, dropped, and the fetch it held back would
            // wait for an unrelated command.
            let now = self.shared.now_ms();
            self.send_ready(now);
            let due = self.fetcher.next_deadline(now);
            if due != armed {
                if let Some(ms) = due {
                    timer.as_mut().reset(self.shared.instant_at(ms));
                }
                armed = due;
            }
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return };
                    self.handle(cmd);
                    while let Ok(cmd) = rx.try_recv() {
                        self.handle(cmd);
                    }
                }
                _ = &mut timer, if armed.is_some() => armed = None,
                _ = stop.changed() => return,
            }
        }
    }

    fn fail(&self, tp: &TopicPartition, request: FetchRequest) {
        if let Some(p) = self.partitions.get(tp) {
            p.send(Event::FetchFailed {
                correlation_id: request.correlation_id,
            });
        }
    }

    fn handle(&mut self, cmd: FetchCmd) {
        let now = self.shared.now_ms();
        match cmd {
            FetchCmd::Enqueue {
                tp,
                leader,
                request,
                partition,
            } => {
                self.partitions.insert(tp.clone(), partition);
                if self.leaders.get(&tp) != Some(&leader) {
                    self.leaders.insert(tp.clone(), leader);
                    if let Some(old) = self.fetcher.add_partition(tp.clone(), leader) {
                        self.fail(&tp, old);
                    }
                }
                if let Err(r) = self.fetcher.enqueue(&tp, request) {
                    self.fail(&tp, r);
                }
            }
            FetchCmd::Remove { tp } => {
                self.leaders.remove(&tp);
                if let Some(old) = self.fetcher.remove_partition(&tp) {
                    self.fail(&tp, old);
                }
                self.partitions.remove(&tp);
            }
            FetchCmd::Done { id, result } => {
                let Some((leader, parts)) = self.inflight.remove(&id) else {
                    return;
                };
                match result {
                    Ok(responses) => {
                        self.fetcher.completed(id, now);
                        let mut answered = std::collections::HashSet::new();
                        for (tp, response) in responses {
                            if let Some(p) = self.partitions.get(&tp) {
                                answered.insert((tp.clone(), response.correlation_id));
                                p.send(Event::FetchResponse {
                                    from: leader,
                                    response,
                                });
                            }
                        }
                        // A partition the leader left out of its answer.
                        for (tp, corr) in parts {
                            if !answered.contains(&(tp.clone(), corr))
                                && let Some(p) = self.partitions.get(&tp)
                            {
                                p.send(Event::FetchFailed {
                                    correlation_id: corr,
                                });
                            }
                        }
                    }
                    Err(e) => {
                        debug!("fetch from node {leader} failed: {e}");
                        self.fetcher.failed(id, now);
                        for (tp, corr) in parts {
                            if let Some(p) = self.partitions.get(&tp) {
                                p.send(Event::FetchFailed {
                                    correlation_id: corr,
                                });
                            }
                        }
                    }
                }
            }
        }
    }

    fn send_ready(&mut self, now: u64) {
        for mf in self.fetcher.poll(now) {
            let parts = mf
                .partitions
                .iter()
                .map(|(tp, r)| (tp.clone(), r.correlation_id))
                .collect();
            self.inflight.insert(mf.id, (mf.to, parts));
            let leader = mf.to;
            let session = self.sessions.entry(leader).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(session(
                    self.shared.clone(),
                    self.transport.clone(),
                    leader,
                    rx,
                    self.tx.clone(),
                ));
                tx
            });
            if let Err(mpsc::error::SendError(mf)) = session.send(mf) {
                self.sessions.remove(&leader);
                let _ = self.tx.send(FetchCmd::Done {
                    id: mf.id,
                    result: Err("fetch session ended".into()),
                });
            }
        }
    }
}

/// Sends fetches to one leader over one replication stream (one
/// incremental fetch session), reconnecting after a failure: a new stream
/// starts a new session.
async fn session(
    shared: Arc<Shared>,
    transport: Transport,
    leader: ReplicaId,
    mut rx: mpsc::UnboundedReceiver<MultiFetch>,
    done: mpsc::UnboundedSender<FetchCmd>,
) {
    // With the leader's broker epoch when it was dialled.
    let mut conn: Option<(Peer, FetchStream, Option<u64>)> = None;
    let limit = Duration::from_millis(
        shared
            .replication
            .fetch_max_wait_ms
            .saturating_add(shared.failover.failure_timeout_ms.saturating_mul(2)),
    );
    let mut reregistered = shared.reregistered.subscribe();
    // Since when the leader could not be reached, and when that was last
    // logged as a warning (see below).
    let mut unreachable: Option<(std::time::Instant, Option<std::time::Instant>)> = None;
    while let Some(mf) = rx.recv().await {
        if let Some((peer, _, at_dial)) = &conn
            && shared.dialled_before_restart(leader, *at_dial)
        {
            debug!("node {leader} restarted since its replication stream was opened: reconnecting");
            peer.close();
            conn = None;
        }
        if conn.is_none() {
            conn = match connect(&shared, &transport, leader).await {
                Ok(c) => {
                    if let Some((since, Some(_))) = unreachable.take() {
                        info!(
                            "reached leader node {leader} again after {:.1} s",
                            since.elapsed().as_secs_f64()
                        );
                    }
                    Some(c)
                }
                Err(e) => {
                    // A warning once it has lasted UNREACHABLE_WARN (a
                    // leader that died is replaced within about a second,
                    // and its followers need not say so), then every
                    // UNREACHABLE_REPEAT: a leader that others cannot dial
                    // (a wrong `advertise` address, a firewall) keeps its
                    // followers out of the ISR, and was logged at debug
                    // level only.
                    let now = std::time::Instant::now();
                    let (since, said) = unreachable.get_or_insert((now, None));
                    let due = match said {
                        None => now.duration_since(*since) >= UNREACHABLE_WARN,
                        Some(at) => now.duration_since(*at) >= UNREACHABLE_REPEAT,
                    };
                    if due {
                        *said = Some(now);
                        warn!(
                            "cannot reach leader node {leader} at {} for {:.0} s: {e}; the partitions it leads are not replicated here until this node can",
                            shared
                                .broker_addr(leader)
                                .map_or("no registered address".to_string(), |a| a.to_string()),
                            since.elapsed().as_secs_f64()
                        );
                    } else {
                        debug!("cannot reach leader node {leader}: {e}");
                    }
                    None
                }
            };
        }
        let result = match conn.as_mut() {
            None => Err(format!("node {leader} is unreachable")),
            // A leader that died mid-fetch never answers, and quinn would
            // only notice at its idle timeout: give up after the long poll
            // plus two failure timeouts, or as soon as it registered again
            // (it restarted: this stream is to the dead incarnation), and
            // reconnect.
            Some((_, stream, at_dial)) => {
                let at_dial = *at_dial;
                let restarted = async {
                    // The closure reads the broker epochs under the watch's
                    // lock; `Shared::record_brokers` releases the epochs
                    // before it takes that lock.
                    let gone = reregistered
                        .wait_for(|_| shared.dialled_before_restart(leader, at_dial))
                        .await
                        .is_err();
                    if gone {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    r = tokio::time::timeout(limit, stream.fetch(&mf.partitions)) => r
                        .map_err(|_| format!("no answer within {limit:?}"))
                        .and_then(|r| r.map_err(|e| e.to_string()))
                        .map(|(responses, counts)| {
                            shared.fetch_sessions.add(counts);
                            responses
                        }),
                    () = restarted => Err(format!("node {leader} registered again during the fetch")),
                }
            }
        };
        if result.is_err()
            && let Some((peer, _, _)) = conn.take()
        {
            peer.close();
        }
        if done.send(FetchCmd::Done { id: mf.id, result }).is_err() {
            return;
        }
    }
}

/// How long a leader is unreachable before it is warned of, and how often
/// again after.
const UNREACHABLE_WARN: Duration = Duration::from_secs(5);
const UNREACHABLE_REPEAT: Duration = Duration::from_secs(30);

async fn connect(
    shared: &Shared,
    transport: &Transport,
    leader: ReplicaId,
) -> Result<(Peer, FetchStream, Option<u64>), String> {
    let at_dial = shared.broker_epoch_of(leader);
    let addr = shared
        .broker_addr(leader)
        .ok_or_else(|| format!("node {leader} is not registered"))?;
    let peer = tokio::time::timeout(Duration::from_secs(5), transport.connect(addr, leader))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let stream = peer.fetch_stream().await.map_err(|e| e.to_string())?;
    info!("replication stream to node {leader} at {addr} open");
    Ok((peer, stream, at_dial))
}
