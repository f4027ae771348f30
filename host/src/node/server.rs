//! The node's request handler: serves followers' fetches by handing each
//! partition's part to its actor, and the client API (create topic,
//! produce, read, status, metadata).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::oneshot;
use tracing::info;

use crate::batch::{self, MAX_BATCH_LEN};
use crate::core::{ErrorCode, FetchRequest, FetchResponse, Records, ReplicaId, TopicPartition};
use crate::metadata::{Broker, MetadataError, PartitionState, valid_topic};
use crate::transport::{Handler, Identity, Reply};
use crate::wire::rpc::{ReplicaStatus, Request, Response, RpcError, UnreadablePartition};

use super::partition::{Event, PartitionHandle};
use super::shared::Shared;

/// Most partitions one topic may have, and the longest produce timeout.
pub const MAX_PARTITIONS: u32 = 10_000;
const MAX_TIMEOUT_MS: u64 = 300_000;
/// Most bytes one client read returns.
const MAX_READ_BYTES: u32 = 16 << 20;

/// How long a client's metadata request waits for the store before the
/// node answers from its last view (or, without one, with an error the
/// client can take elsewhere).
const STORE_ANSWER_WAIT: Duration = Duration::from_secs(3);
/// Record bytes past which a fetch response's later parts go without
/// their records. One part carries at most 32 MiB (`fetch_max_bytes`'s
/// limit, and a batch is at most 16 MiB), so the total stays under the
/// 64 MiB frame cap.
const RESPONSE_BUDGET: u64 = 24 << 20;

pub struct NodeServer {
    pub(super) shared: Arc<Shared>,
    pub(super) partitions: RwLock<HashMap<TopicPartition, PartitionHandle>>,
    /// The partitions assigned here whose log would not open, as the
    /// metadata watcher last tried them.
    pub(super) not_open: std::sync::Mutex<Vec<crate::wire::rpc::NotOpen>>,
    /// Why the metadata watcher's last read of the store failed, while it
    /// does.
    pub(super) store_failing: std::sync::Mutex<Option<String>>,
    /// What the watcher last found wrong with this node's own
    /// registration in the store (logged once per change).
    pub(super) registration_problem: std::sync::Mutex<Option<String>>,
    /// Set when another process registered under this node's id: the
    /// node stops with it.
    pub(super) fenced: std::sync::Mutex<Option<super::NodeError>>,
}

impl NodeServer {
    /// An operator's unclean election of this node (see
    /// [`Request::ElectUnclean`]). Liveness is judged strictly: a broker
    /// counts as alive only if heard within the failure timeout, and this
    /// node must have run for a timeout and hear a majority (a node that
    /// just started has heard nobody, and would take everyone for alive).
    /// A compare-and-set: a state that changed meanwhile refuses.
    async fn elect_unclean(
        &self,
        topic: String,
        partition: u32,
        replica: ReplicaId,
    ) -> Result<Response, RpcError> {
        let shared = &self.shared;
        let me = shared.node_id;
        let tp = TopicPartition::new(&topic, partition);
        let name = format!("{topic}/{partition}");
        if replica != me {
            return Err(RpcError::Invalid(format!(
                "node {me} was asked to elect node {replica}: the request goes to the replica to elect"
            )));
        }
        let st = self.stored_state(&topic, partition).await?;
        if !st.replicas.contains(&me) {
            return Err(RpcError::Invalid(format!(
                "node {me} is not a replica of {name} (replicas {:?})",
                st.replicas
            )));
        }
        let p = self.partition(&topic, partition)?;
        let status = self.ask(&p, |reply| Event::Status { reply }).await?;
        if shared.handoff_pending(&tp) || status.role == crate::wire::rpc::ROLE_RECOVERING {
            return Err(RpcError::Invalid(format!(
                "node {me} is not ready to lead {name}: its log is being recovered or its claims from before a restart are still being given up; try again shortly"
            )));
        }
        let now = shared.now_ms();
        let brokers = shared.broker_ids();
        let heard: Vec<ReplicaId> = match shared.detector.lock() {
            Ok(fd) => brokers
                .iter()
                .copied()
                .filter(|b| *b == me || fd.heard_recently(*b, now))
                .collect(),
            Err(_) => Vec::new(),
        };
        if now <= shared.failover.failure_timeout_ms
            || brokers.is_empty()
            || heard.len() * 2 <= brokers.len()
        {
            return Err(RpcError::Invalid(format!(
                "node {me} does not yet hear a majority of the nodes (heard {heard:?} of {brokers:?}), so it cannot tell who is alive; try again shortly"
            )));
        }
        if let Some(l) = st.leader.filter(|l| heard.contains(l)) {
            return Err(RpcError::Invalid(format!(
                "{name} has a live leader, node {l}: there is nothing to elect"
            )));
        }
        // A record below this node's log (the store went back) names an
        // ISR and ELR from before writes the logs hold: not trusted, the
        // election below compares logs instead (see `node::restamp`).
        let stale = shared
            .log_epoch(&tp)
            .is_some_and(|held| held > st.leader_epoch);
        let keepers: Vec<ReplicaId> = st
            .isr
            .iter()
            .chain(&st.elr)
            .copied()
            .filter(|r| !stale && heard.contains(r))
            .collect();
        if !keepers.is_empty() && !keepers.contains(&me) {
            return Err(RpcError::Invalid(format!(
                "{name} has live in-sync or eligible replicas {keepers:?}, which hold every committed write: elect one of them (--replica {}), not node {me}",
                keepers[0]
            )));
        }
        let clean = keepers.contains(&me);
        let next = if clean {
            // A clean election, what the failover would decide, asked of
            // a replica that holds every committed write: the failover
            // cannot make it while a majority of every node it counts
            // (registered ones, and each replica of the partition) has
            // not confirmed the leader failed, which a node that is gone
            // for good keeps from happening (an exploratory run: a node
            // added then removed again).
            let isr = if st.isr.contains(&me) {
                st.isr
                    .iter()
                    .copied()
                    .filter(|r| heard.contains(r) && Some(*r) != st.leader)
                    .collect()
            } else {
                // From the ELR (KIP-966): the ISR's other members held
                // every committed write too, and stay eligible.
                vec![me]
            };
            st.with_isr(isr, shared.replication.min_insync_replicas, true)
        } else {
            PartitionState {
                isr: vec![replica],
                elr: Vec::new(),
                ..st.clone()
            }
        };
        let next = PartitionState {
            leader: Some(replica),
            // Above any epoch its log holds (`Shared::epoch_above_log`).
            leader_epoch: shared.epoch_above_log(&tp, st.leader_epoch + 1),
            ..next
        };
        let version = self.write_election(&name, &next, st.version).await?;
        if clean {
            tracing::warn!(
                "{name}: election of a live in-sync or eligible replica asked by an operator: node {replica} leads epoch {} (ISR was {:?}, ELR {:?}); nothing committed is lost",
                next.leader_epoch,
                st.isr,
                st.elr
            );
        } else {
            tracing::error!(
                "{name}: UNCLEAN election asked by an operator: node {replica} leads epoch {} (ISR was {:?}, ELR {:?}); acknowledged writes it lacks are lost",
                next.leader_epoch,
                st.isr,
                st.elr
            );
        }
        let state = PartitionState { version, ..next };
        shared.wrote_state(tp, state.clone());
        Ok(Response::Elected { state })
    }

    /// An operator's preferred leader election (see
    /// [`Request::ElectPreferred`]): what the leader rebalance does at its
    /// check ([`crate::core::FailoverCoordinator::prefer`] and the
    /// partition's [`NodeServer::follower_ready`]), now, with the reason
    /// when it will not.
    async fn elect_preferred(&self, topic: String, partition: u32) -> Result<Response, RpcError> {
        let shared = &self.shared;
        let me = shared.node_id;
        let tp = TopicPartition::new(&topic, partition);
        let name = format!("{topic}/{partition}");
        let st = self.stored_state(&topic, partition).await?;
        let Some(&preferred) = st.replicas.first() else {
            return Err(RpcError::Invalid(format!("{name} has no replicas")));
        };
        // Nothing to do is not an error (Kafka's leader-election tool
        // reports it as "valid replica already elected" and succeeds): a
        // loop over every partition should not stop at ones that are fine.
        if st.leader == Some(preferred) {
            return Ok(Response::Elected { state: st });
        }
        if st.leader != Some(me) {
            return Err(RpcError::Invalid(format!(
                "node {me} does not lead {name} (leader {:?}): the request goes to the leader",
                st.leader
            )));
        }
        if !st.isr.contains(&preferred) {
            return Err(RpcError::Invalid(format!(
                "{name}: its preferred replica, node {preferred}, is not in the ISR {:?}; it leads once it has caught up and rejoined",
                st.isr
            )));
        }
        let now = shared.now_ms();
        let decision = match shared.detector.lock() {
            Ok(fd) => crate::core::FailoverCoordinator::new(
                me,
                false,
                shared.replication.min_insync_replicas,
            )
            .prefer(&st, &fd, now),
            Err(_) => None,
        };
        let ready = self.follower_ready(&tp, preferred).await;
        let (Some(mut d), true) = (decision, ready) else {
            return Err(RpcError::Invalid(format!(
                "{name}: its preferred replica, node {preferred}, has not been heard, or seen fetching caught up, within {} ms (it may be restarting or recovering its log); try again shortly",
                self.ready_window_ms()
            )));
        };
        // It leads: its log holds the newest epoch it knows.
        d.next.leader_epoch = shared.epoch_above_log(&tp, d.next.leader_epoch);
        let version = self
            .write_election(&name, &d.next, d.expected_version)
            .await?;
        if let Ok(mut m) = shared.failover_metrics.lock() {
            m.preferred_elections += 1;
        }
        tracing::info!(
            "{name}: preferred leader election asked by an operator: node {preferred} leads epoch {}",
            d.next.leader_epoch
        );
        let state = PartitionState { version, ..d.next };
        shared.wrote_state(tp, state.clone());
        Ok(Response::Elected { state })
    }
}

fn meta_err(e: MetadataError) -> RpcError {
    RpcError::Metadata(e.to_string())
}

impl NodeServer {
    /// How recently a replica must have fetched, caught up, to take over
    /// as preferred leader: a long poll's wait plus a failure timeout, so a
    /// follower idling in a long poll still counts.
    fn ready_window_ms(&self) -> u64 {
        let shared = &self.shared;
        shared
            .replication
            .fetch_max_wait_ms
            .saturating_add(shared.failover.failure_timeout_ms)
    }

    /// Whether the replica `replica` of `tp`, in its registered
    /// incarnation, fetched from this node (its leader) within
    /// [`NodeServer::ready_window_ms`] and caught up: it could lead at
    /// once. `false` when unknown.
    pub(super) async fn follower_ready(&self, tp: &TopicPartition, replica: ReplicaId) -> bool {
        let within_ms = self.ready_window_ms();
        let Some(broker_epoch) = self.shared.broker_epoch_of(replica) else {
            return false;
        };
        let Ok(p) = self.partition(&tp.topic, tp.partition) else {
            return false;
        };
        self.ask(&p, |reply| Event::FollowerReady {
            replica,
            broker_epoch,
            within_ms,
            reply,
        })
        .await
        .unwrap_or(false)
    }

    /// Write an operator's election `next` by compare-and-set against
    /// `expected`; its version. A state that changed meanwhile refuses.
    async fn write_election(
        &self,
        name: &str,
        next: &PartitionState,
        expected: u64,
    ) -> Result<u64, RpcError> {
        match self
            .shared
            .metadata
            .compare_and_set(next.clone(), expected)
            .await
        {
            Err(MetadataError::Conflict(_)) => Err(RpcError::Metadata(format!(
                "{name} changed while electing; look at `status` and try again"
            ))),
            other => other.map_err(meta_err),
        }
    }

    /// Brokers, partitions, unreadable records and, for an answer from
    /// this node's last view of the store, why: the store's, unless the
    /// store cannot be read. Then its last view, while it hears a majority
    /// (one cut off from the store and the others may name itself leader
    /// of partitions they moved: acks=0/1 writes sent to it would be
    /// truncated), and at once while its watcher's last read failed (an
    /// unreachable etcd would hold every answer for the store's timeout).
    #[allow(clippy::type_complexity)]
    async fn metadata_answer(
        &self,
    ) -> Result<
        (
            Vec<Broker>,
            Vec<PartitionState>,
            Vec<UnreadablePartition>,
            Option<String>,
        ),
        RpcError,
    > {
        let view = || self.last_view().filter(|_| self.shared.heard_majority());
        let stale = |why: String| {
            format!(
                "node {} cannot read the metadata store ({why}), so this is its last view of it",
                self.shared.node_id
            )
        };
        let failing = self.store_failing.lock().ok().and_then(|f| f.clone());
        if let Some(why) = failing
            && let Some((b, p)) = view()
        {
            return Ok((b, p, Vec::new(), Some(stale(why))));
        }
        // Bounded: a store that hangs (packets dropped, etcd frozen) held
        // every client's metadata request for its 30 s and more, behind
        // the metadata plugin's queue and reconnects (141 s seen), before
        // anyone marked the store as failing.
        let asked = tokio::time::timeout(STORE_ANSWER_WAIT, self.metadata_from_store())
            .await
            .unwrap_or_else(|_| {
                Err(RpcError::Metadata(format!(
                    "the metadata store did not answer within {STORE_ANSWER_WAIT:?}"
                )))
            });
        match asked {
            Ok((b, p, u)) => Ok((b, p, u, None)),
            Err(e) => match view() {
                Some((b, p)) => Ok((b, p, Vec::new(), Some(stale(e.to_string())))),
                None => Err(e),
            },
        }
    }

    /// Brokers, partitions and the unreadable records, as the store has
    /// them now.
    async fn metadata_from_store(
        &self,
    ) -> Result<(Vec<Broker>, Vec<PartitionState>, Vec<UnreadablePartition>), RpcError> {
        let meta = &self.shared.metadata;
        let brokers = meta.list_brokers().await.map_err(meta_err)?;
        let mut partitions = Vec::new();
        let mut unreadable = Vec::new();
        for read in meta.read_partitions().await.map_err(meta_err)? {
            match read.state {
                Ok(s) => partitions.push(s),
                Err(MetadataError::NotFound(_)) => {}
                // That partition's record: the others still serve.
                Err(e) => unreadable.push(UnreadablePartition {
                    topic: read.topic,
                    partition: read.partition,
                    error: match e {
                        MetadataError::Corrupt(why) => why,
                        other => other.to_string(),
                    },
                }),
            }
        }
        Ok((brokers, partitions, unreadable))
    }

    /// Brokers and partitions as this node last read them (and wrote
    /// them), if it read any: the watcher's view.
    fn last_view(&self) -> Option<(Vec<Broker>, Vec<PartitionState>)> {
        let sh = &self.shared;
        let epochs = sh.broker_epochs.read().ok()?;
        let mut brokers: Vec<Broker> = sh
            .brokers
            .read()
            .ok()?
            .iter()
            .map(|(id, address)| Broker {
                id: *id,
                address: address.to_string(),
                epoch: epochs.get(id).copied().unwrap_or(0),
            })
            .collect();
        brokers.sort_by_key(|b| b.id);
        let mut partitions: Vec<PartitionState> =
            sh.states.read().ok()?.values().cloned().collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        (!brokers.is_empty() || !partitions.is_empty()).then_some((brokers, partitions))
    }

    /// `topic`/`partition` as the metadata store has it now.
    async fn stored_state(&self, topic: &str, partition: u32) -> Result<PartitionState, RpcError> {
        match self.shared.metadata.get_partition(topic, partition).await {
            Err(MetadataError::NotFound(_)) => Err(RpcError::UnknownPartition {
                node: self.shared.node_id,
                topic: topic.to_string(),
                partition,
                not_open: None,
            }),
            other => other.map_err(meta_err),
        }
    }

    fn partition(&self, topic: &str, partition: u32) -> Result<PartitionHandle, RpcError> {
        self.partitions
            .read()
            .ok()
            .and_then(|m| m.get(&TopicPartition::new(topic, partition)).cloned())
            .ok_or_else(|| RpcError::UnknownPartition {
                node: self.shared.node_id,
                topic: topic.to_string(),
                partition,
                // Assigned here but its log does not open: say so, not
                // "unknown" (a missing bucket read as a missing topic).
                not_open: self.not_open.lock().ok().and_then(|n| {
                    n.iter()
                        .find(|p| p.topic == topic && p.partition == partition)
                        .map(|p| p.error.clone())
                }),
            })
    }

    /// This node's view of each partition it holds open, sorted.
    pub(super) async fn statuses(&self) -> Vec<ReplicaStatus> {
        let handles: Vec<PartitionHandle> = self
            .partitions
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let mut partitions = Vec::new();
        for p in handles {
            if let Ok(s) = self.ask(&p, |reply| Event::Status { reply }).await {
                partitions.push(s);
            }
        }
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        partitions
    }

    async fn ask<T>(
        &self,
        p: &PartitionHandle,
        make: impl FnOnce(oneshot::Sender<T>) -> Event,
    ) -> Result<T, RpcError> {
        let (tx, rx) = oneshot::channel();
        if !p.send(make(tx)) {
            return Err(RpcError::ShuttingDown);
        }
        // The partition took the request and dropped it unanswered: what
        // it did is unknown, so this is not a retriable refusal.
        rx.await.map_err(|_| RpcError::AfterAppend {
            code: ErrorCode::RequestTimedOut,
            message: "the partition stopped before answering; the request may or may not have taken effect".into(),
        })
    }

    async fn create_topic(
        &self,
        topic: String,
        partitions: u32,
        replication_factor: u32,
        min_insync: Option<u32>,
    ) -> Result<Response, RpcError> {
        if !valid_topic(&topic) {
            // A long name is cut: a 5000-byte one made a 5000-byte error.
            let shown: String = topic.chars().take(64).collect();
            let cut = if shown.len() < topic.len() {
                format!("{shown:?}... ({} bytes)", topic.len())
            } else {
                format!("{shown:?}")
            };
            return Err(RpcError::Invalid(format!(
                "topic name {cut}: use 1 to 249 of [A-Za-z0-9._-]"
            )));
        }
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(RpcError::Invalid(format!(
                "partitions must be 1..={MAX_PARTITIONS}, not {partitions}"
            )));
        }
        if replication_factor == 0 {
            return Err(RpcError::Invalid(
                "replication factor must be at least 1 (3, with min.insync.replicas 2, is Kafka's usual choice)".into(),
            ));
        }
        let meta = &self.shared.metadata;
        let mut brokers: Vec<ReplicaId> = meta
            .list_brokers()
            .await
            .map_err(meta_err)?
            .into_iter()
            .map(|b| b.id)
            .collect();
        brokers.sort_unstable();
        if !brokers.contains(&self.shared.node_id) {
            // This node runs, so it registered at its start: the store
            // lost the registrations since (wiped, or replaced).
            return Err(RpcError::Invalid(format!(
                "the metadata store does not hold the registration of node {} (which is running and answered this), nor maybe the others': was it wiped or replaced under the running cluster? To start over on it, stop each node, delete `identity.toml` in its data directory (a node refuses an empty store its data directory does not know) and start it again to register anew (its logs are kept), then create the topics",
                self.shared.node_id
            )));
        }
        // Replicas go to live nodes only, as Kafka places them on unfenced
        // brokers: one on a node that is down leaves the partition short
        // (or, led by it, unavailable) from its first write. As this node
        // hears them: one cut off from the others refuses.
        let down = self.shared.failed_brokers();
        brokers.retain(|b| !down.contains(b));
        let rf = replication_factor as usize;
        if rf == 0 || rf > brokers.len() {
            return Err(RpcError::Invalid(format!(
                "replication factor {replication_factor} with {} live registered nodes ({brokers:?}){}",
                brokers.len(),
                if down.is_empty() {
                    String::new()
                } else {
                    format!("; nodes {down:?} are registered but down (their heartbeats stopped)")
                }
            )));
        }
        let min_isr = min_insync.unwrap_or(self.shared.replication.min_insync_replicas);
        if min_isr == 0 || min_isr as usize > rf {
            let whose = if min_insync.is_some() {
                "--min-insync"
            } else {
                "the nodes' default ([replication] min_insync_replicas)"
            };
            return Err(RpcError::Invalid(format!(
                "min.insync.replicas {min_isr} ({whose}) with replication factor {rf}: it must be 1..={rf}, or acks=all could never succeed; pass --min-insync 1..={rf}"
            )));
        }
        let existing = meta.list_partitions().await.map_err(meta_err)?;
        if existing.iter().any(|(t, _)| *t == topic) {
            return Err(RpcError::TopicExists(topic));
        }
        let mut created = Vec::new();
        for p in 0..partitions {
            // Spread leaders and replicas round-robin over the nodes.
            let replicas: Vec<ReplicaId> = (0..rf)
                .map(|i| brokers[(p as usize + i) % brokers.len()])
                .collect();
            let mut state = PartitionState {
                topic: topic.clone(),
                partition: p,
                leader: Some(replicas[0]),
                leader_epoch: 1,
                isr: replicas.clone(),
                elr: Vec::new(),
                replicas,
                // Resolved now: every node then counts the same
                // min.insync for this partition's HW and ELR, whatever
                // its own default (or a later change of it).
                min_insync: min_isr,
                version: 0,
            };
            match meta.compare_and_set(state.clone(), 0).await {
                Ok(v) => state.version = v,
                Err(MetadataError::Conflict(_)) => return Err(RpcError::TopicExists(topic)),
                Err(e) => return Err(meta_err(e)),
            }
            created.push(state);
        }
        info!("created topic {topic}: {partitions} partitions, replication factor {rf}");
        self.shared.refresh.notify_one();
        Ok(Response::Created {
            partitions: created,
        })
    }

    async fn produce(
        &self,
        topic: String,
        partition: u32,
        acks: crate::core::Acks,
        timeout_ms: u64,
        sequence: Option<crate::core::Sequence>,
        body: Bytes,
    ) -> Result<Response, RpcError> {
        if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
            return Err(RpcError::Invalid(format!(
                "timeout_ms must be 1..={MAX_TIMEOUT_MS}"
            )));
        }
        // One produce is at most one batch's worth, as a batch encoded from
        // its records would be (the storage takes it in one call).
        if body.len() > MAX_BATCH_LEN as usize {
            return Err(RpcError::Invalid(format!(
                "produce body of {} bytes is over the {MAX_BATCH_LEN}-byte limit",
                body.len()
            )));
        }
        // Checked here, off the partition's task; the leader then takes the
        // batches as they are and only restamps their headers.
        let body = batch::Validated::check(body).map_err(|e| match e {
            batch::BatchError::Empty => RpcError::Invalid("produce with no records".into()),
            e => RpcError::Invalid(format!("produce body is not a record batch: {e}")),
        })?;
        let count = body.records();
        let p = self.partition(&topic, partition)?;
        let base = self
            .ask(&p, |reply| Event::Produce {
                batches: body,
                acks,
                timeout_ms,
                reply,
                sequence,
            })
            .await??;
        Ok(Response::Produced {
            base_offset: base,
            count,
        })
    }
}

impl Handler for NodeServer {
    fn request(
        &self,
        peer: Identity,
        request: Request,
        body: Bytes,
    ) -> Reply<'_, (Response, Bytes)> {
        Box::pin(async move {
            match request {
                Request::Hello { .. } => Err(RpcError::Invalid("hello sent twice".into())),
                Request::CreateTopic {
                    topic,
                    partitions,
                    replication_factor,
                    min_insync,
                } => Ok((
                    self.create_topic(topic, partitions, replication_factor, min_insync)
                        .await?,
                    Bytes::new(),
                )),
                Request::Produce {
                    topic,
                    partition,
                    acks,
                    timeout_ms,
                    sequence,
                } => Ok((
                    self.produce(topic, partition, acks, timeout_ms, sequence, body)
                        .await?,
                    Bytes::new(),
                )),
                Request::Read {
                    topic,
                    partition,
                    offset,
                    max_bytes,
                    max_wait_ms,
                } => {
                    let p = self.partition(&topic, partition)?;
                    let r = self
                        .ask(&p, |reply| Event::Read {
                            offset,
                            max_bytes: max_bytes.clamp(1, MAX_READ_BYTES),
                            max_wait_ms: max_wait_ms.min(crate::wire::rpc::MAX_READ_WAIT_MS),
                            reply,
                        })
                        .await??;
                    Ok((
                        Response::Records {
                            high_watermark: r.high_watermark,
                            log_start: r.log_start,
                            log_end: r.log_end,
                        },
                        r.records,
                    ))
                }
                Request::ElectPreferred { topic, partition } => {
                    Ok((self.elect_preferred(topic, partition).await?, Bytes::new()))
                }
                Request::ElectUnclean {
                    topic,
                    partition,
                    replica,
                } => Ok((
                    self.elect_unclean(topic, partition, replica).await?,
                    Bytes::new(),
                )),
                Request::Status {} => Ok((
                    Response::Status {
                        node: self.shared.node_id,
                        partitions: self.statuses().await,
                        not_open: self.not_open.lock().map(|n| n.clone()).unwrap_or_default(),
                    },
                    Bytes::new(),
                )),
                Request::Metadata {} => {
                    let (brokers, partitions, unreadable, stale) = self.metadata_answer().await?;
                    Ok((
                        Response::Metadata {
                            brokers,
                            partitions,
                            failed: self.shared.failed_brokers_for_clients(),
                            unreadable,
                            stale,
                        },
                        Bytes::new(),
                    ))
                }
                Request::Heartbeat {
                    broker_epoch,
                    changed,
                    suspects,
                } => {
                    let Identity::Node(from) = peer else {
                        return Err(RpcError::Unauthorized(
                            "heartbeats are for nodes, not clients".into(),
                        ));
                    };
                    // Only to a node that sent its own: one from before
                    // views refuses the field in an answer too.
                    let answer = suspects.is_some().then(|| self.shared.told_suspects());
                    let now = self.shared.now_ms();
                    self.shared.heard(from, broker_epoch, suspects, now);
                    if changed {
                        self.shared.refresh.notify_one();
                    }
                    Ok((
                        Response::Heartbeat {
                            node: self.shared.node_id,
                            broker_epoch: self.shared.heartbeat_epoch(),
                            suspects: answer,
                        },
                        Bytes::new(),
                    ))
                }
            }
        })
    }

    fn fetch(
        &self,
        from: ReplicaId,
        parts: Vec<(TopicPartition, FetchRequest)>,
    ) -> Reply<'_, Vec<(TopicPartition, FetchResponse)>> {
        Box::pin(async move {
            let cfg = &self.shared.replication;
            let refuse = |r: &FetchRequest, code| FetchResponse {
                correlation_id: r.correlation_id,
                leader_epoch: r.current_leader_epoch,
                error: Some(code),
                high_watermark: 0,
                log_start_offset: 0,
                log_end_offset: 0,
                diverging_epoch: None,
                records: Records::default(),
            };
            // Every part goes to its partition (so each follower's
            // progress is seen). The answer must fit one frame: once the
            // record bytes gathered reach the budget, later parts are sent
            // without their records (and no error): the follower simply
            // fetches them again.
            let n = parts.len();
            let mut out: Vec<Option<(TopicPartition, FetchResponse)>> = vec![None; n];
            // The parts' answers, polled here as they come: no task or
            // channel per part (a session hands every partition in it to
            // its actor on each fetch).
            let mut answers = FuturesUnordered::new();
            let mut waiting: Vec<(usize, PartitionHandle, u64)> = Vec::new();
            for (i, (tp, mut request)) in parts.into_iter().enumerate() {
                // Never trust a follower's wait or size: the leader's own
                // settings bound how long a fetch is parked and how much
                // one part may carry.
                request.max_wait_ms = request.max_wait_ms.min(cfg.fetch_max_wait_ms);
                request.max_bytes = request.max_bytes.min(cfg.fetch_max_bytes);
                let handle = self
                    .partitions
                    .read()
                    .ok()
                    .and_then(|m| m.get(&tp).cloned());
                let Some(handle) = handle else {
                    out[i] = Some((tp, refuse(&request, ErrorCode::NotLeader)));
                    continue;
                };
                let (reply, answer) = oneshot::channel();
                let correlation_id = request.correlation_id;
                if !handle.send(Event::Fetch {
                    from,
                    request: request.clone(),
                    reply,
                }) {
                    out[i] = Some((tp, refuse(&request, ErrorCode::NotLeader)));
                    continue;
                }
                waiting.push((i, handle, correlation_id));
                out[i] = Some((tp, refuse(&request, ErrorCode::RequestTimedOut)));
                answers.push(async move { (i, answer.await.ok()) });
            }
            // Wait until one part has news (or every part answered), then
            // release the other parked parts so they answer with what they
            // have now instead of waiting out their long polls.
            let deadline = tokio::time::Instant::now()
                + Duration::from_millis(cfg.fetch_max_wait_ms)
                + Duration::from_secs(5);
            let mut pending = waiting.len();
            let mut released = false;
            let mut bytes = 0u64;
            while pending > 0 {
                let got = tokio::time::timeout_at(deadline, answers.next()).await;
                let Ok(Some((i, r))) = got else {
                    break; // out of time: the rest stay "try again"
                };
                pending -= 1;
                // A part that answers without an error before its long poll
                // ended has news (records, or a new HW the follower must
                // learn): the whole fetch goes back now.
                let has_news = match (r, out[i].as_mut()) {
                    (Some(mut resp), Some(slot)) => {
                        let len = resp.records.len() as u64;
                        if bytes + len > RESPONSE_BUDGET && bytes > 0 {
                            resp.records = Records::default();
                        } else {
                            bytes += len;
                        }
                        let news = resp.error.is_none();
                        slot.1 = resp;
                        news
                    }
                    (None, Some(slot)) => {
                        slot.1.error = Some(ErrorCode::NotLeader);
                        false
                    }
                    _ => false,
                };
                if has_news && !released {
                    released = true;
                    for (j, h, corr) in &waiting {
                        if *j != i {
                            h.send(Event::ReleaseFetch {
                                from,
                                correlation_id: *corr,
                            });
                        }
                    }
                }
            }
            Ok(out.into_iter().flatten().collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{MetaFuture, MetadataStore};

    /// A store that never answers: packets dropped, or etcd frozen.
    struct Hanging;

    impl MetadataStore for Hanging {
        fn get_partition<'a>(&'a self, _: &'a str, _: u32) -> MetaFuture<'a, PartitionState> {
            Box::pin(std::future::pending())
        }
        fn compare_and_set(&self, _: PartitionState, _: u64) -> MetaFuture<'_, u64> {
            Box::pin(std::future::pending())
        }
        fn list_partitions(&self) -> MetaFuture<'_, Vec<(String, u32)>> {
            Box::pin(std::future::pending())
        }
        fn register_broker(&self, _: ReplicaId, _: String) -> MetaFuture<'_, u64> {
            Box::pin(std::future::pending())
        }
        fn list_brokers(&self) -> MetaFuture<'_, Vec<Broker>> {
            Box::pin(std::future::pending())
        }
        fn claim_cluster_id(&self, _: String) -> MetaFuture<'_, String> {
            Box::pin(std::future::pending())
        }
    }

    /// A client's metadata request is answered within the store wait
    /// even when the store never answers (here with an error the client
    /// takes to another node: this node has no last view to offer). It
    /// used to wait as long as the store did.
    #[tokio::test]
    async fn a_store_that_never_answers_does_not_hold_a_metadata_request() {
        let (shared, _fetch) = Shared::for_tests(
            Arc::new(Hanging),
            crate::node::config::FailoverConfig::default(),
        );
        let server = NodeServer {
            shared,
            partitions: Default::default(),
            not_open: Default::default(),
            store_failing: Default::default(),
            registration_problem: Default::default(),
            fenced: Default::default(),
        };
        let began = std::time::Instant::now();
        let answer = tokio::time::timeout(
            STORE_ANSWER_WAIT + Duration::from_secs(5),
            server.metadata_answer(),
        )
        .await
        .expect("the metadata request waited on the store");
        assert!(began.elapsed() >= STORE_ANSWER_WAIT);
        match answer {
            Err(RpcError::Metadata(why)) => assert!(why.contains("did not answer within"), "{why}"),
            Ok((_, _, _, stale)) => assert!(stale.is_some(), "a fresh answer from no store"),
            Err(e) => panic!("{e}"),
        }
    }
}
