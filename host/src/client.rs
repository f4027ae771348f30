//! A cluster client over QUIC: what the CLI's `topic`, `produce`,
//! `consume` and `status` commands (and the tests) use. It finds
//! partition leaders from the metadata any node serves, and retries
//! retriable refusals (not the leader, not enough replicas yet) until the
//! request's deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared, WeakShared};
use tokio::sync::Mutex;

use crate::batch::{self, Record, StoredRecord};
use crate::core::{Acks, ReplicaId};
use crate::metadata::{Broker, PartitionState};
use crate::node::ClientConfig;
use crate::transport::{Identity, Peer, TlsMaterial, Transport, TransportError};
use crate::wire::rpc::{NotOpen, ReplicaStatus, Request, Response, RpcError, UnreadablePartition};

/// Longest wait a caller's timeout is taken as: ten years is forever to
/// a client, and deadlines are `now + timeout`, which a longer one
/// (`Duration::MAX` for "no limit") overflowed, panicking (embedder run).
pub const LONGEST_WAIT: Duration = Duration::from_secs(10 * 365 * 86_400);

/// How long a request other than produce may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Tls(#[from] crate::transport::TlsError),
    #[error("no node answered: {0}")]
    NoNode(String),
    #[error("unknown node {0}: not in client.toml and not registered")]
    UnknownNode(ReplicaId),
    #[error("unknown topic or partition {0}/{1}")]
    UnknownPartition(String, u32),
    #[error(
        "the metadata store's record of partition {0}/{1} is corrupt ({2}); the nodes serve the other partitions meanwhile. Restore it (with a version and leader epoch at least those last seen) or remove it"
    )]
    UnreadablePartition(String, u32, String),
    #[error("partition {0}/{1} has no leader (`replicator status` shows its ISR and ELR)")]
    NoLeader(String, u32),
    #[error("{0}")]
    Refused(RpcError),
    #[error(
        "gave up after {waited:.2?}, with too little of the time limit left for another attempt: {last}"
    )]
    Timeout { waited: Duration, last: String },
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// The request was sent, then the connection failed or timed out, or
    /// the leader appended the records and could not acknowledge them (a
    /// timeout waiting for the ISR, leadership lost): the records may or
    /// may not have been written. Not retried, to not write them twice.
    #[error(
        "node {node} did not acknowledge the records ({detail}); they may or may not have been written"
    )]
    Ambiguous { node: ReplicaId, detail: String },
    #[error("bad records from the node: {0}")]
    Records(String),
    /// The caller's records do not make a batch (too large, no records),
    /// or the request leaves no time to send them.
    #[error("the records cannot be sent: {0}")]
    Unsendable(String),
    /// A client config built in code that cannot work.
    #[error("client config: {0}")]
    Config(String),
}

/// A produce request's place in its producer's order (see
/// [`Client::produce_in_order`]).
#[derive(Debug, Clone, Copy)]
pub struct ProduceOrder<'a> {
    pub producer: u64,
    pub seq: u64,
    /// The lowest number the producer still waits for, kept current by
    /// the producer.
    pub first_unacked: &'a std::sync::atomic::AtomicU64,
}

/// One caller's copy of a failed [`Dial`]'s error (the error itself is
/// not `Clone`): the same variant where that matters to a caller
/// (a refusal, a timeout), the message otherwise.
fn shared_error(e: &TransportError, addr: SocketAddr) -> TransportError {
    match e {
        TransportError::Rejected(r) => TransportError::Rejected(r.clone()),
        TransportError::Timeout(what) => TransportError::Timeout(what),
        TransportError::Connect { addr, detail } => TransportError::Connect {
            addr: *addr,
            detail: detail.clone(),
        },
        other => TransportError::Connect {
            addr,
            detail: other.to_string(),
        },
    }
}

fn refused(e: TransportError) -> ClientError {
    match e {
        TransportError::Rejected(r) => ClientError::Refused(r),
        other => ClientError::Transport(other),
    }
}

/// Committed records read from one replica.
pub struct ReadBatch {
    pub high_watermark: u64,
    pub log_start: u64,
    pub log_end: u64,
    /// Records below the high watermark, from the requested offset.
    pub records: Vec<StoredRecord>,
}

/// A connection being made to one node. Every request that needs one while
/// it is made awaits this same attempt, so a burst of requests on a fresh
/// client (or after a failover) opens one connection, not one each.
type Dial = Shared<DialFuture>;
type DialFuture = BoxFuture<'static, Result<Peer, Arc<TransportError>>>;

/// How long making a connection (handshake and hello) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Client {
    transport: Transport,
    /// Each node's address: the one it registered, once metadata named
    /// it, else client.toml's.
    nodes: Mutex<HashMap<ReplicaId, SocketAddr>>,
    /// client.toml's addresses, kept: where a registered address differs
    /// (a node behind a NAT that advertises its private address, or one
    /// the client's socket family cannot reach), this one may still work.
    bootstrap: HashMap<ReplicaId, SocketAddr>,
    peers: Mutex<HashMap<ReplicaId, Peer>>,
    /// Connections being made, at most one per node. Weak: an attempt that
    /// every request waiting for it gave up on is dropped with the last of
    /// them, as each request's own attempt was. Kept, a dial to a dead node
    /// would hold the next requests after the node restarted until its
    /// handshake's retransmission found the new process (a QUIC dial to a
    /// closed port is never refused, only timed out). Never locked across
    /// an await.
    dials: std::sync::Mutex<HashMap<ReplicaId, WeakShared<DialFuture>>>,
    partitions: Mutex<HashMap<(String, u32), PartitionState>>,
    /// Partitions whose next produce asks the cluster for the leader
    /// first (a produce to them failed: the leader may have changed).
    stale: Mutex<std::collections::HashSet<(String, u32)>>,
    /// Brokers the last metadata answer's node counted as failed.
    failed: Mutex<Vec<ReplicaId>>,
    /// Partitions the last metadata answer's node could not read.
    unreadable: Mutex<Vec<UnreadablePartition>>,
    /// Why the last metadata answer was a node's last view rather than
    /// the store's (see [`Response::Metadata`]'s `stale`).
    last_view: Mutex<Option<String>>,
    /// Broker epochs as last seen in metadata.
    epochs: Mutex<HashMap<ReplicaId, u64>>,
}

/// How long a client waits for a node to answer metadata from the store
/// once another answered from its last view.
const FRESH_GRACE: Duration = Duration::from_millis(300);

/// Two nodes' last views of the store (metadata answers marked stale) as
/// one: the newest version of each partition, the newest epoch of each
/// broker, the failed nodes and the reason of `a` (`a` as it is if
/// either is another answer).
fn merge_views(mut a: Response, b: Response) -> Response {
    if let (
        Response::Metadata {
            brokers,
            partitions,
            ..
        },
        Response::Metadata {
            brokers: more_brokers,
            partitions: more_partitions,
            ..
        },
    ) = (&mut a, b)
    {
        let all = std::mem::take(partitions)
            .into_iter()
            .chain(more_partitions);
        *partitions = newest(all, |p| ((p.topic.clone(), p.partition), p.version));
        let all = std::mem::take(brokers).into_iter().chain(more_brokers);
        *brokers = newest(all, |b| (b.id, b.epoch));
    }
    a
}

/// Of the items with the same key, the one ranked highest; in key order.
fn newest<T, K: Ord, R: Ord>(
    items: impl IntoIterator<Item = T>,
    key_rank: impl Fn(&T) -> (K, R),
) -> Vec<T> {
    let mut kept: std::collections::BTreeMap<K, (R, T)> = Default::default();
    for item in items {
        let (k, r) = key_rank(&item);
        if kept.get(&k).is_none_or(|(held, _)| *held < r) {
            kept.insert(k, (r, item));
        }
    }
    kept.into_values().map(|(_, t)| t).collect()
}

/// While a produce waits longer than this, the client checks whether the
/// partition's leader failed or changed, instead of waiting out the
/// request's whole deadline on a dead node.
const LEADER_CHECK: Duration = Duration::from_millis(200);

impl Client {
    pub fn new(config: &ClientConfig) -> Result<Self, ClientError> {
        // As `ClientConfig::load` refuses it: every request would end in
        // "no node answered" with no node named.
        if config.nodes.is_empty() {
            return Err(ClientError::Config(
                "`nodes` is empty: list at least one node to contact".into(),
            ));
        }
        let tls = TlsMaterial::load(&config.tls)?;
        // Nodes warn of their own certificate's expiry; a client's ran out
        // with no word before the first refusal (operator run).
        if let Ok(t) = tls.not_after()
            && let Ok(left) = t.duration_since(std::time::SystemTime::now())
            && left < std::time::Duration::from_secs(30 * 86_400)
        {
            tracing::warn!(
                "the client certificate {} expires at {} (in {}): issue a new one with `replicator cluster cert --dir DIR --ca-key KEY --client --replace`",
                tls.cert_path().display(),
                crate::transport::tls::rfc3339(t),
                crate::transport::tls::duration_text(left)
            );
        }
        let bind: SocketAddr = match config.nodes.first().map(|n| n.address) {
            Some(SocketAddr::V6(_)) => "[::]:0",
            _ => "0.0.0.0:0",
        }
        .parse()
        .map_err(|_| ClientError::Protocol("bad bind address".into()))?;
        let transport = Transport::bind(bind, &tls, Identity::Client, false)?;
        let bootstrap: HashMap<ReplicaId, SocketAddr> =
            config.nodes.iter().map(|n| (n.id, n.address)).collect();
        Ok(Client {
            transport,
            nodes: Mutex::new(bootstrap.clone()),
            bootstrap,
            peers: Mutex::new(HashMap::new()),
            dials: std::sync::Mutex::new(HashMap::new()),
            partitions: Mutex::new(HashMap::new()),
            stale: Mutex::new(std::collections::HashSet::new()),
            failed: Mutex::new(Vec::new()),
            unreadable: Mutex::new(Vec::new()),
            last_view: Mutex::new(None),
            epochs: Mutex::new(HashMap::new()),
        })
    }

    /// A confirmed connection to `node`, reused while it lives.
    pub async fn peer(&self, node: ReplicaId) -> Result<Peer, ClientError> {
        if let Some(p) = self.peers.lock().await.get(&node)
            && p.close_reason().is_none()
        {
            return Ok(p.clone());
        }
        let addr = *self
            .nodes
            .lock()
            .await
            .get(&node)
            .ok_or(ClientError::UnknownNode(node))?;
        let fallback = self.bootstrap.get(&node).copied().filter(|b| *b != addr);
        // Connect without holding a lock: one slow node must not stall
        // requests to the others.
        let dial = {
            let mut dials = self.dials.lock().unwrap_or_else(PoisonError::into_inner);
            match dials.get(&node).and_then(WeakShared::upgrade) {
                Some(d) => d,
                None => {
                    let transport = self.transport.clone();
                    let d: Dial = async move {
                        let attempt = |a: SocketAddr| {
                            let t = transport.clone();
                            Box::pin(async move {
                                tokio::time::timeout(CONNECT_TIMEOUT, t.connect(a, node))
                                    .await
                                    .unwrap_or(Err(TransportError::Timeout("connect")))
                            })
                        };
                        let made = match fallback {
                            // Registered and client.toml addresses differ:
                            // race them. The registered one is right after
                            // a move, client.toml's behind a NAT; the TLS
                            // handshake proves the node either way.
                            Some(b) => futures_util::future::select_ok([attempt(addr), attempt(b)])
                                .await
                                .map(|(p, _)| p),
                            None => attempt(addr).await,
                        };
                        made.map_err(Arc::new)
                    }
                    .boxed()
                    .shared();
                    if let Some(w) = d.downgrade() {
                        dials.insert(node, w);
                    }
                    d
                }
            }
        };
        let made = dial.clone().await;
        if let Ok(p) = &made {
            // Cached before the attempt is cleared, so a request arriving
            // in between finds one or the other, and does not dial again.
            self.peers.lock().await.insert(node, p.clone());
        }
        {
            // The attempt is over for everyone: the next one after a
            // failure or a lost connection dials anew.
            let mut dials = self.dials.lock().unwrap_or_else(PoisonError::into_inner);
            let current = dials.get(&node).and_then(WeakShared::upgrade);
            if current.is_none_or(|d| d.ptr_eq(&dial)) {
                dials.remove(&node);
            }
        }
        made.map_err(|e| ClientError::Transport(shared_error(&e, addr)))
    }

    async fn node_ids(&self) -> Vec<ReplicaId> {
        let mut ids: Vec<_> = self.nodes.lock().await.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Send `req` to the first node that answers (connection failures move
    /// on to the next; a node's refusal is returned). A request that failed
    /// after it was sent is not sent again elsewhere.
    async fn any(&self, req: &Request) -> Result<(Response, Bytes), ClientError> {
        let mut errors = Vec::new();
        for id in self.node_ids().await {
            let peer = match self.peer(id).await {
                Ok(p) => p,
                Err(e) => {
                    errors.push(format!("node {id}: {e}"));
                    continue;
                }
            };
            match peer
                .request_within(req, Bytes::new(), REQUEST_TIMEOUT)
                .await
            {
                Ok(r) => return Ok(r),
                Err(TransportError::Rejected(e)) => return Err(ClientError::Refused(e)),
                Err(e @ TransportError::NotSent(_)) => {
                    self.peers.lock().await.remove(&id);
                    errors.push(format!("node {id}: {e}"));
                }
                // Sent, then lost: another node must not get it again (a
                // topic would be created twice, or half).
                Err(e) => {
                    self.peers.lock().await.remove(&id);
                    return Err(ClientError::Transport(e));
                }
            }
        }
        Err(ClientError::NoNode(errors.join("; ")))
    }

    /// Ask every known node at once; the first answer wins (every node
    /// reads the same store, so any answer will do, and a dead node must
    /// not delay it). A node's last view (a metadata answer marked stale)
    /// wins only if no node answers from the store within
    /// [`FRESH_GRACE`] of it (a dead node's handshake must not hold every
    /// call for seconds); several are merged, the newest version of each
    /// partition and broker kept.
    ///
    /// With a `deadline`, nodes that have not answered by then are named
    /// with where they were (dialling or asked), instead of the whole
    /// call being cut off without a reason per node.
    async fn fastest(
        &self,
        req: &Request,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(Response, Bytes), ClientError> {
        use futures_util::StreamExt;
        let ids = self.node_ids().await;
        if ids.is_empty() {
            return Err(ClientError::NoNode("no nodes configured".into()));
        }
        // Which nodes have a connection: a deadline names the others as
        // not having answered the handshake. Never locked across an await.
        let connected = std::sync::Mutex::new(std::collections::HashSet::new());
        let connected = &connected;
        let mut attempts: futures_util::stream::FuturesUnordered<_> = ids
            .iter()
            .map(|&id| async move {
                let peer = self
                    .peer(id)
                    .await
                    .map_err(|e| (id, format!("node {id}: {e}")))?;
                connected
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(id);
                match peer
                    .request_within(req, Bytes::new(), REQUEST_TIMEOUT)
                    .await
                {
                    Ok(r) => Ok(r),
                    Err(e) => {
                        self.peers.lock().await.remove(&id);
                        Err((id, format!("node {id}: {e}")))
                    }
                }
            })
            .collect();
        // Every node's reason, for when none answers: the last alone
        // named one node of several.
        let mut errors = Vec::new();
        let mut last_view: Option<(Response, Bytes)> = None;
        let mut grace_until: Option<tokio::time::Instant> = None;
        let started = tokio::time::Instant::now();
        loop {
            // None once the grace or the deadline is over.
            let next = match grace_until.into_iter().chain(deadline).min() {
                Some(t) => tokio::time::timeout_at(t, attempts.next())
                    .await
                    .unwrap_or_default(),
                None => attempts.next().await,
            };
            match next {
                Some(Ok(r @ (Response::Metadata { stale: Some(_), .. }, _))) => {
                    last_view = Some(match last_view.take() {
                        Some(held) => (merge_views(held.0, r.0), held.1),
                        None => r,
                    });
                    grace_until.get_or_insert(tokio::time::Instant::now() + FRESH_GRACE);
                }
                Some(Ok(r)) => return Ok(r),
                Some(Err(e)) => errors.push(e),
                None => break,
            }
        }
        if let Some(r) = last_view {
            return Ok(r);
        }
        // Cut off by the deadline: the nodes still pending say where.
        let ms = started.elapsed().as_millis();
        for id in ids {
            if errors.iter().any(|(e, _)| *e == id) {
                continue;
            }
            let asked = connected
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&id);
            errors.push((
                id,
                if asked {
                    format!("node {id}: connected, but no answer within {ms} ms")
                } else {
                    format!("node {id}: no answer to the QUIC handshake within {ms} ms (is it running, and is its address right?)")
                },
            ));
        }
        errors.sort();
        let said: Vec<String> = errors.into_iter().map(|(_, e)| e).collect();
        Err(ClientError::NoNode(said.join("; ")))
    }

    /// Brokers and partitions as the metadata store has them; refreshes
    /// the leader cache and the node address book.
    pub async fn metadata(&self) -> Result<(Vec<Broker>, Vec<PartitionState>), ClientError> {
        self.metadata_until(None).await
    }

    /// [`Client::metadata`], giving up at `deadline` with every node's
    /// reason.
    async fn metadata_until(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(Vec<Broker>, Vec<PartitionState>), ClientError> {
        match self.fastest(&Request::Metadata {}, deadline).await? {
            (
                Response::Metadata {
                    brokers,
                    partitions,
                    failed,
                    unreadable,
                    stale,
                },
                _,
            ) => {
                *self.failed.lock().await = failed;
                *self.unreadable.lock().await = unreadable;
                *self.last_view.lock().await = stale;
                // The store's address wins over client.toml's, which only
                // bootstraps (Kafka's clients use advertised addresses the
                // same way): a node moved to another address is reachable
                // once any node answers. A connection to the old one goes.
                let mut moved = Vec::new();
                {
                    let mut nodes = self.nodes.lock().await;
                    for b in &brokers {
                        if let Ok(a) = b.address.parse::<SocketAddr>()
                            && nodes.insert(b.id, a).is_some_and(|old| old != a)
                        {
                            moved.push(b.id);
                        }
                    }
                }
                if !moved.is_empty() {
                    let mut peers = self.peers.lock().await;
                    for id in moved {
                        peers.remove(&id);
                    }
                }
                {
                    // A node registered anew (restarted): a cached
                    // connection is to its dead incarnation.
                    let mut epochs = self.epochs.lock().await;
                    let mut peers = self.peers.lock().await;
                    for b in &brokers {
                        if epochs.insert(b.id, b.epoch).is_some_and(|e| e != b.epoch) {
                            peers.remove(&b.id);
                        }
                    }
                }
                let mut cache = self.partitions.lock().await;
                cache.clear();
                for p in &partitions {
                    cache.insert((p.topic.clone(), p.partition), p.clone());
                }
                Ok((brokers, partitions))
            }
            (other, _) => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn create_topic(
        &self,
        topic: &str,
        partitions: u32,
        replication_factor: u32,
        min_insync: Option<u32>,
    ) -> Result<Vec<PartitionState>, ClientError> {
        let req = Request::CreateTopic {
            topic: topic.to_string(),
            partitions,
            replication_factor,
            min_insync,
        };
        match self.any(&req).await? {
            (Response::Created { partitions }, _) => Ok(partitions),
            (other, _) => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// An unclean election of `replica` for `topic`/`partition` (see
    /// [`Request::ElectUnclean`]): the state it wrote.
    pub async fn elect_unclean(
        &self,
        topic: &str,
        partition: u32,
        replica: ReplicaId,
    ) -> Result<PartitionState, ClientError> {
        let req = Request::ElectUnclean {
            topic: topic.to_string(),
            partition,
            replica,
        };
        // Asked of the replica itself: it knows whether its log is ready
        // to lead (not recovering, its own hand-off done).
        match self.ask_node(replica, &req).await? {
            (Response::Elected { state }, _) => Ok(state),
            (other, _) => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Partitions the last metadata answer named as unreadable on the
    /// store (see [`Response::Metadata`]).
    pub async fn unreadable(&self) -> Vec<UnreadablePartition> {
        self.unreadable.lock().await.clone()
    }

    /// Set when the last metadata answer came from a node that could not
    /// read the store (and no node could): why.
    pub async fn metadata_stale(&self) -> Option<String> {
        self.last_view.lock().await.clone()
    }

    /// The error for a partition the metadata does not list: unreadable
    /// on the store, or unknown.
    async fn missing(&self, topic: &str, partition: u32) -> ClientError {
        match self
            .unreadable
            .lock()
            .await
            .iter()
            .find(|u| u.topic == topic && u.partition == partition)
        {
            Some(u) => {
                ClientError::UnreadablePartition(topic.to_string(), partition, u.error.clone())
            }
            None => ClientError::UnknownPartition(topic.to_string(), partition),
        }
    }

    /// A preferred leader election for `topic`/`partition` (see
    /// [`Request::ElectPreferred`]), asked of its leader per fresh
    /// metadata: the state it wrote.
    pub async fn elect_preferred(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<PartitionState, ClientError> {
        let (_, parts) = self.metadata().await?;
        let Some(p) = parts
            .iter()
            .find(|p| p.topic == topic && p.partition == partition)
        else {
            return Err(self.missing(topic, partition).await);
        };
        let leader = p
            .leader
            .ok_or_else(|| ClientError::NoLeader(topic.to_string(), partition))?;
        let req = Request::ElectPreferred {
            topic: topic.to_string(),
            partition,
        };
        match self.ask_node(leader, &req).await? {
            (Response::Elected { state }, _) => Ok(state),
            (other, _) => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Partitions of `topic`, from fresh metadata.
    pub async fn topic_partitions(&self, topic: &str) -> Result<Vec<u32>, ClientError> {
        self.topic_partitions_within(topic, REQUEST_TIMEOUT).await
    }

    /// [`Client::topic_partitions`], giving up after `limit` with every
    /// node's reason.
    pub async fn topic_partitions_within(
        &self,
        topic: &str,
        limit: Duration,
    ) -> Result<Vec<u32>, ClientError> {
        let deadline = tokio::time::Instant::now() + limit.min(LONGEST_WAIT);
        let (_, parts) = self.metadata_until(Some(deadline)).await?;
        let mut ps: Vec<u32> = parts
            .iter()
            .filter(|p| p.topic == topic)
            .map(|p| p.partition)
            .collect();
        ps.sort_unstable();
        Ok(ps)
    }

    async fn leader(
        &self,
        topic: &str,
        partition: u32,
        refresh: bool,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<ReplicaId, ClientError> {
        let key = (topic.to_string(), partition);
        let refresh = self.stale.lock().await.remove(&key) || refresh;
        let cached = self.partitions.lock().await.get(&key).cloned();
        let p = match cached {
            Some(p) if !refresh => p,
            _ => {
                self.metadata_until(deadline).await?;
                let found = self.partitions.lock().await.get(&key).cloned();
                match found {
                    Some(p) => p,
                    None => return Err(self.missing(topic, partition).await),
                }
            }
        };
        let no_leader = || ClientError::NoLeader(topic.to_string(), partition);
        let leader = p.leader.ok_or_else(no_leader)?;
        // A leader the cluster counts as failed is about to be replaced:
        // wait for the election rather than send into the void.
        if self.failed.lock().await.contains(&leader) {
            return Err(no_leader());
        }
        Ok(leader)
    }

    /// Resolves (with the reason) once fresh metadata shows that `leader`
    /// no longer leads `topic`/`partition` in `epoch`, or is counted as
    /// failed; never resolves while it still leads.
    async fn leader_lost(
        &self,
        topic: &str,
        partition: u32,
        leader: ReplicaId,
        epoch: Option<u32>,
    ) -> String {
        loop {
            tokio::time::sleep(LEADER_CHECK).await;
            if self.metadata().await.is_err() {
                continue;
            }
            if self.failed.lock().await.contains(&leader) {
                return format!("the cluster counts node {leader} as failed");
            }
            let now = self
                .partitions
                .lock()
                .await
                .get(&(topic.to_string(), partition))
                .map(|p| (p.leader, p.leader_epoch));
            // Only a newer epoch says leadership moved: an answer from a
            // node's stale view (the store down) may show an older epoch
            // and leader, and the produce would be given up as ambiguous
            // while the leader it went to commits it. Without a known
            // epoch, a different leader.
            let moved = |(l, e): (Option<ReplicaId>, u32)| match epoch {
                Some(epoch) => e > epoch,
                None => l != Some(leader),
            };
            if let Some((l, e)) = now
                && moved((l, e))
            {
                return match l {
                    Some(l) => format!("leadership moved to node {l} in epoch {e}"),
                    None => format!("node {leader} no longer leads (epoch {e} has no leader)"),
                };
            }
        }
    }

    /// Produce `records` as one batch to the partition's leader; returns
    /// the first record's offset. Retries retriable refusals until
    /// `timeout` has passed; finding and dialling the leader count against
    /// it too.
    pub async fn produce(
        &self,
        topic: &str,
        partition: u32,
        records: &[Record],
        acks: Acks,
        timeout: Duration,
    ) -> Result<u64, ClientError> {
        self.produce_at(topic, partition, records, acks, timeout)
            .await
            .map(|(offset, _)| offset)
    }

    /// [`Client::produce`], also saying which node acknowledged.
    pub async fn produce_at(
        &self,
        topic: &str,
        partition: u32,
        records: &[Record],
        acks: Acks,
        timeout: Duration,
    ) -> Result<(u64, ReplicaId), ClientError> {
        self.produce_in_order(topic, partition, records, acks, timeout, None)
            .await
    }

    /// [`Client::produce_at`] as request `seq` of a producer that keeps
    /// several requests in flight: the leader appends its requests in the
    /// order of their numbers (see [`crate::core::Sequencer`]). Each
    /// attempt tells the leader the lowest number the producer still
    /// waits for, read from `order` as it is sent.
    pub async fn produce_in_order(
        &self,
        topic: &str,
        partition: u32,
        records: &[Record],
        acks: Acks,
        timeout: Duration,
        order: Option<ProduceOrder<'_>>,
    ) -> Result<(u64, ReplicaId), ClientError> {
        // A zero timeout still sent the records once, then reported a
        // timeout for records that were committed (embedder run); the
        // request carries whole milliseconds.
        if timeout < Duration::from_millis(1) {
            return Err(ClientError::Unsendable(format!(
                "a timeout of {timeout:?} leaves no time to wait for the acknowledgement; give at least 1 ms"
            )));
        }
        let timeout = timeout.min(LONGEST_WAIT);
        let body =
            batch::encode(0, 0, records).map_err(|e| ClientError::Unsendable(e.to_string()))?;
        let started = Instant::now();
        let mut refresh = false;
        let mut backoff = Duration::from_millis(20);
        loop {
            // Each attempt gets what is left of the deadline, so retries
            // do not stretch it.
            let left = timeout.saturating_sub(started.elapsed());
            // Finding the leader and dialling it send nothing, and neither
            // may outlast the deadline: with the cluster down each dial
            // takes its handshake timeout, and a produce with a 500 ms
            // timeout gave up after 3 s.
            let in_time = |what: String| {
                ClientError::NoNode(format!(
                    "{what} within the {} ms left of the timeout",
                    left.as_millis()
                ))
            };
            let attempt = async {
                // The lookup itself gives up at the deadline with each
                // node's reason; the outer limit only backs it up.
                let by = tokio::time::Instant::now() + left;
                let leader = tokio::time::timeout(
                    left + Duration::from_millis(100),
                    self.leader(topic, partition, refresh, Some(by)),
                )
                .await
                .map_err(|_| in_time("none".into()))??;
                let epoch = self
                    .partitions
                    .lock()
                    .await
                    .get(&(topic.to_string(), partition))
                    .map(|p| p.leader_epoch);
                let sent = std::sync::atomic::AtomicBool::new(false);
                let exchange = async {
                    let peer = tokio::time::timeout(left, self.peer(leader))
                        .await
                        .map_err(|_| in_time(format!("node {leader} not")))??;
                    // What is left now that the leader was found and
                    // dialled: the leader waits for the commit that long,
                    // and the answer gets 5 s more to come back. Taking
                    // the attempt's start here let a 30 s produce run
                    // over 60 s.
                    let left = timeout.saturating_sub(started.elapsed());
                    let req = Request::Produce {
                        topic: topic.to_string(),
                        partition,
                        acks,
                        timeout_ms: left.as_millis().clamp(1, 300_000) as u64,
                        sequence: order.map(|o| crate::core::Sequence {
                            producer: o.producer,
                            seq: o.seq,
                            first_unacked: o
                                .first_unacked
                                .load(std::sync::atomic::Ordering::Acquire)
                                .min(o.seq),
                        }),
                    };
                    let limit = left + Duration::from_secs(5);
                    sent.store(true, std::sync::atomic::Ordering::Relaxed);
                    Ok::<_, ClientError>(peer.request_within(&req, body.clone(), limit).await)
                };
                // A dead leader never answers: stop waiting once the
                // cluster says it failed or was replaced. An answer that
                // came wins over a leader check that completed in the
                // same wake-up: that answer may be the acknowledgement.
                let answer = tokio::select! {
                    biased;
                    a = exchange => a?,
                    why = self.leader_lost(topic, partition, leader, epoch) => {
                        self.peers.lock().await.remove(&leader);
                        if !sent.load(std::sync::atomic::Ordering::Relaxed) {
                            return Err(ClientError::NoLeader(topic.to_string(), partition));
                        }
                        return Err(ClientError::Ambiguous { node: leader, detail: why });
                    }
                };
                match answer {
                    // The records are written; an answer that does not
                    // add up cannot say where.
                    Ok((Response::Produced { base_offset, count }, _)) => {
                        let n = records.len() as u64;
                        if u64::from(count) != n
                            || base_offset
                                .checked_add(n)
                                .is_none_or(|end| end > batch::MAX_OFFSET)
                        {
                            return Err(ClientError::Protocol(format!(
                                "node {leader} acknowledged {count} records at offset {base_offset} for {n} sent; they were written, but where is unknown"
                            )));
                        }
                        Ok((base_offset, leader))
                    }
                    Ok((other, _)) => Err(ClientError::Protocol(format!("{other:?}"))),
                    // Appended, then not acknowledged: not a refusal.
                    Err(TransportError::Rejected(r @ RpcError::AfterAppend { .. })) => {
                        Err(ClientError::Ambiguous {
                            node: leader,
                            detail: r.to_string(),
                        })
                    }
                    Err(TransportError::Rejected(r)) => Err(ClientError::Refused(r)),
                    Err(e @ TransportError::NotSent(_)) => {
                        self.peers.lock().await.remove(&leader);
                        Err(ClientError::Transport(e))
                    }
                    Err(e) => {
                        self.peers.lock().await.remove(&leader);
                        Err(ClientError::Ambiguous {
                            node: leader,
                            detail: e.to_string(),
                        })
                    }
                }
            };
            let err = match attempt.await {
                Ok(o) => return Ok(o),
                Err(e) => e,
            };
            let retriable = match &err {
                ClientError::Refused(r) => r.retriable(),
                // Nothing was sent yet: the leader is unknown or unreachable.
                ClientError::NoLeader(..)
                | ClientError::NoNode(_)
                | ClientError::Transport(_)
                | ClientError::Timeout { .. } => true,
                _ => false,
            };
            // A retry needs time left to commit in: one sent with a few
            // milliseconds would be appended, then time out waiting for the
            // ISR and come back ambiguous, where stopping here says
            // "nothing written".
            let least = (timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
            if !retriable || started.elapsed() + backoff + least > timeout {
                // The leader may have changed (an ambiguous answer is often
                // a leader that stepped down): the next produce asks the
                // cluster instead of sending to it again, which could be
                // a node on its way out, whose dial hangs until the leader
                // check gives up on it (Kafka's clients likewise refresh
                // metadata on such errors). Marked, not removed: a
                // concurrent produce still finds the entry.
                self.stale
                    .lock()
                    .await
                    .insert((topic.to_string(), partition));
                return Err(if retriable {
                    ClientError::Timeout {
                        waited: started.elapsed(),
                        last: err.to_string(),
                    }
                } else {
                    err
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
            refresh = true;
        }
    }

    /// Committed records of `topic`/`partition` on replica `node` from
    /// `offset`, whole batches within `max_bytes`.
    pub async fn read(
        &self,
        node: ReplicaId,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    ) -> Result<ReadBatch, ClientError> {
        self.read_waiting(node, topic, partition, offset, max_bytes, Duration::ZERO)
            .await
    }

    /// [`Client::read`], but with nothing committed from `offset` yet the
    /// node waits up to `max_wait` (at most 30 s) for something to be,
    /// and answers as soon as it is: a long poll, where polling again and
    /// again costs a round trip each and adds its interval to the latency.
    pub async fn read_waiting(
        &self,
        node: ReplicaId,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait: Duration,
    ) -> Result<ReadBatch, ClientError> {
        let max_wait_ms = u64::try_from(max_wait.as_millis())
            .unwrap_or(u64::MAX)
            .min(crate::wire::rpc::MAX_READ_WAIT_MS);
        let read = |max_wait_ms| Request::Read {
            topic: topic.to_string(),
            partition,
            offset,
            max_bytes,
            max_wait_ms,
        };
        let limit = REQUEST_TIMEOUT + Duration::from_millis(max_wait_ms);
        let answer = match self.ask_node_within(node, &read(max_wait_ms), limit).await {
            // A node from before long polls refuses the field: ask it
            // again without (it answers at once, and the caller polls).
            Err(ClientError::Refused(RpcError::Invalid(_))) if max_wait_ms > 0 => {
                self.ask_node(node, &read(0)).await?
            }
            r => r?,
        };
        match answer {
            (
                Response::Records {
                    high_watermark,
                    log_start,
                    log_end,
                },
                body,
            ) => {
                let records = batch::decode(&body)
                    .map_err(|e| ClientError::Records(e.to_string()))?
                    .into_iter()
                    .filter(|r| r.offset >= offset && r.offset < high_watermark)
                    .collect::<Vec<_>>();
                // Never trust a node: offsets must be contiguous from `offset`.
                for (i, r) in records.iter().enumerate() {
                    if r.offset != offset + i as u64 {
                        return Err(ClientError::Records(format!(
                            "expected offset {}, got {}",
                            offset + i as u64,
                            r.offset
                        )));
                    }
                }
                Ok(ReadBatch {
                    high_watermark,
                    log_start,
                    log_end,
                    records,
                })
            }
            (other, _) => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The leader of a partition, from fresh metadata.
    pub async fn leader_of(&self, topic: &str, partition: u32) -> Result<ReplicaId, ClientError> {
        self.leader(topic, partition, true, None).await
    }

    /// One node's view of its partitions.
    pub async fn status(&self, node: ReplicaId) -> Result<Vec<ReplicaStatus>, ClientError> {
        Ok(self.node_status(node).await?.0)
    }

    /// One node's view of its partitions, and those assigned to it whose
    /// log it could not open.
    pub async fn node_status(
        &self,
        node: ReplicaId,
    ) -> Result<(Vec<ReplicaStatus>, Vec<NotOpen>), ClientError> {
        match self.ask_node(node, &Request::Status {}).await? {
            (
                Response::Status {
                    partitions,
                    not_open,
                    ..
                },
                _,
            ) => Ok((partitions, not_open)),
            (other, _) => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The brokers `node`'s failure detector counts as failed (nothing
    /// while it cannot hear a majority; see [`Request::Metadata`]).
    pub async fn failed_seen_by(&self, node: ReplicaId) -> Result<Vec<ReplicaId>, ClientError> {
        match self.ask_node(node, &Request::Metadata {}).await? {
            (Response::Metadata { failed, .. }, _) => Ok(failed),
            (other, _) => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// `req` (without a body) to `node`, and its answer.
    async fn ask_node(
        &self,
        node: ReplicaId,
        req: &Request,
    ) -> Result<(Response, Bytes), ClientError> {
        self.ask_node_within(node, req, REQUEST_TIMEOUT).await
    }

    /// [`Client::ask_node`], waiting up to `limit` for the answer.
    async fn ask_node_within(
        &self,
        node: ReplicaId,
        req: &Request,
        limit: Duration,
    ) -> Result<(Response, Bytes), ClientError> {
        // Read before the dial: metadata fetched meanwhile by another
        // request may change it, and that is a reason to try again too.
        let before = self.nodes.lock().await.get(&node).copied();
        let peer = match self.peer(node).await {
            Ok(p) => p,
            Err(e) => {
                // The address may be client.toml's, and the node moved:
                // ask the cluster, and try again if it knows another.
                let _ = self.metadata().await;
                let after = self.nodes.lock().await.get(&node).copied();
                if after == before {
                    return Err(e);
                }
                self.peer(node).await?
            }
        };
        peer.request_within(req, Bytes::new(), limit)
            .await
            .map_err(refused)
    }

    /// The brokers the node that answered the last [`Client::metadata`]
    /// counted as failed (no heartbeat within its failure timeout).
    pub async fn counted_failed(&self) -> Vec<ReplicaId> {
        self.failed.lock().await.clone()
    }

    /// Every known node id (from client.toml and registrations).
    pub async fn known_nodes(&self) -> Vec<ReplicaId> {
        self.node_ids().await
    }

    pub async fn close(&self) {
        for (_, p) in self.peers.lock().await.drain() {
            p.close();
        }
        self.transport.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two nodes' last views: each partition and broker as the newer of
    /// the two has it, whichever view holds more.
    #[test]
    fn last_views_merge_to_the_newest_of_each() {
        let part = |p: u32, version: u64| PartitionState {
            partition: p,
            version,
            ..PartitionState::sample(Some(1), &[1], &[])
        };
        let broker = |id: ReplicaId, epoch: u64| Broker {
            id,
            address: format!("127.0.0.1:{id}"),
            epoch,
        };
        let view = |partitions, brokers| Response::Metadata {
            brokers,
            partitions,
            failed: Vec::new(),
            unreadable: Vec::new(),
            stale: Some("down".into()),
        };
        let a = view(
            vec![part(0, 9), part(1, 3), part(2, 1)],
            vec![broker(1, 5), broker(2, 2)],
        );
        let b = view(vec![part(1, 4)], vec![broker(2, 3), broker(3, 1)]);
        let Response::Metadata {
            brokers,
            partitions,
            stale,
            ..
        } = merge_views(a, b)
        else {
            panic!("not metadata");
        };
        let versions: Vec<(u32, u64)> = partitions
            .iter()
            .map(|p| (p.partition, p.version))
            .collect();
        assert_eq!(versions, [(0, 9), (1, 4), (2, 1)]);
        let epochs: Vec<(ReplicaId, u64)> = brokers.iter().map(|b| (b.id, b.epoch)).collect();
        assert_eq!(epochs, [(1, 5), (2, 3), (3, 1)]);
        assert_eq!(stale.as_deref(), Some("down"));
    }
}
