//! The node runtime (tokio): loads the storage and metadata plugins named
//! in the node's config, registers with the metadata store, serves QUIC
//! (fetches and the client API), runs one partition actor per assigned
//! partition, the fetch manager, a metadata watcher, and `/metrics`; it
//! stops ahead of its certificate's expiry (`cert_expiry.rs`).
//! Shutdown stops failover decisions and fetching, hands over what the
//! node leads and leaves every ISR (controlled shutdown, `failover.rs`),
//! stops serving, then flushes and closes every partition's log and closes
//! the metadata plugin (their destructors run before the node reports it
//! stopped).

mod cert_expiry;
mod clean_shutdown;
pub mod config;
mod data_dir_lock;
mod failover;
mod fault_backoff;
mod fetch;
mod identity;
pub mod metrics;
mod partition;
mod server;
mod shared;
pub mod storage;
mod store_wait;
mod tail_cache;
mod unclean_survey;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::core::TopicPartition;
use crate::metadata::{MetadataError, MetadataStore, PartitionState};
use crate::plugin::{ConfigCheck, LoadError, MetadataPlugin, PluginMetadata, StoragePlugin};
use crate::transport::{Identity, TlsError, TlsMaterial, Transport, TransportError};

pub use config::{ClientConfig, ConfigError, NodeConfig};
use partition::Event;
pub use server::MAX_PARTITIONS;
use server::NodeServer;
use shared::Shared;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A config built in code that [`NodeConfig::validate`] refuses.
    #[error("node config: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The node stopped ahead of its certificate's expiry.
    #[error("{0}")]
    CertificateExpiring(String),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("storage plugin: {0}")]
    Storage(LoadError),
    #[error("storage plugin `{plugin}` refuses the node's [storage.config] settings: {why}")]
    StorageConfig { plugin: String, why: String },
    #[error("metadata plugin: {0}")]
    MetadataLoad(LoadError),
    /// Not a `#[source]`: the message holds it already, and `{:#}` would
    /// print it twice.
    #[error("metadata store: {0}")]
    Metadata(MetadataError),
    #[error(
        "the metadata store ({store}) did not answer within `[metadata] start_wait_ms` ({waited_ms} ms): {why}. Start it (or check the endpoints in the node's config), then start the node again"
    )]
    StoreNeverAnswered {
        store: String,
        waited_ms: u64,
        why: String,
    },
    #[error(
        "the metadata store ({store}) has no registration of node {id}, nor of any node, but this node's data directory ({data_dir}) ran in cluster {cluster} before: is `[metadata]` pointing at the wrong store (`dir` is relative to the config file; etcd's `prefix`)? On an empty store the node would claim it for the cluster, register alone and give up every claim its logs have. If this cluster's store was lost and the cluster is to start over on an empty one, delete {data_dir}/identity.toml and start the node again"
    )]
    StoreDoesNotKnowNode {
        store: String,
        id: crate::core::ReplicaId,
        cluster: String,
        data_dir: String,
    },
    #[error(transparent)]
    DataDir(#[from] data_dir_lock::LockError),
    #[error(transparent)]
    CleanShutdown(#[from] clean_shutdown::RecordError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(
        "the metadata store ({store}) belongs to cluster {stored}, but {named_by} names cluster {configured}: two clusters must not share a metadata store, or each would overwrite the other's leaders and ISRs. Give each cluster its own store: with etcd its own key prefix (`prefix` under [metadata.config], or `cluster init --metadata-config prefix=/NAME/`), with the file plugin its own [metadata] dir"
    )]
    OtherCluster {
        store: String,
        stored: String,
        configured: String,
        /// "this node's config", or its data directory's identity when the
        /// config names no cluster.
        named_by: String,
    },
    #[error(
        "node {id} is already running: the node registered as {id} at {addr} answered as node {id}. Two processes must not share a node id (each would count as the other's replica, and one with an older log could be elected). Stop that one first, or give this one its own id"
    )]
    AlreadyRunning {
        id: crate::core::ReplicaId,
        addr: String,
    },
    #[error(
        "another process registered as node {id} (broker epoch {theirs}, at {addr}) after this one (broker epoch {ours}): this one stops, as Kafka fences a broker whose id another took. Two processes must not share a node id"
    )]
    Fenced {
        id: crate::core::ReplicaId,
        ours: u64,
        theirs: u64,
        addr: String,
    },
    #[error("cannot bind the metrics endpoint {addr}: {error}{}", crate::ports::in_use_hint(*.addr, .error))]
    Metrics {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

impl From<MetadataError> for NodeError {
    fn from(e: MetadataError) -> Self {
        NodeError::Metadata(e)
    }
}

/// Run a node until `shutdown` completes. `ready` gets the QUIC address
/// once the node serves (useful when the config asks for port 0).
///
/// `config` is checked first ([`NodeConfig::validate`]). Stop a node by
/// completing `shutdown`: it hands its leaderships over (a controlled
/// shutdown), flushes and closes its logs, and records a clean shutdown.
/// Dropping the future instead (aborting its task, losing a `select!`)
/// stops it as a crash would, and its next start trusts none of its logs
/// (unless the drop came after the shutdown had closed them all). Its UDP
/// port is free once its tasks have wound down, which can take a second
/// or two: a restart in the same process right after should retry a bind
/// error. As with crashes of every replica, dropping every node of a
/// cluster leaves a partition whose replicas all crashed without a
/// leader until `partition elect --unclean` (or `[failover]
/// unclean_leader_election`) picks one: use `shutdown`.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()>,
    ready: Option<oneshot::Sender<SocketAddr>>,
) -> Result<(), NodeError> {
    // What `NodeConfig::load` checks, for a config built in code.
    config.validate().map_err(NodeError::InvalidConfig)?;
    let id = config.node_id;
    let mut shutdown = std::pin::pin!(shutdown);
    // Then: a second node on this directory stops here, before it binds
    // or registers anything.
    let _data_dir = data_dir_lock::lock(&config.data_dir)?;
    // Then what the last stop vouched for. It is deleted only once this
    // start can no longer fail before opening logs (below): a start that
    // fails (a port in use, the metadata store not up yet) must not cost
    // the next try its record.
    let mut clean = clean_shutdown::CleanShutdown::read(&config.data_dir)?;
    // Then whose data the directory holds: another node's or another
    // cluster's stops the node before it registers or opens a log.
    let found_identity = identity::DirIdentity::read(&config.data_dir)?;
    identity::DirIdentity::check(
        found_identity.as_ref(),
        &config.data_dir,
        id,
        config.cluster_id.as_deref(),
        &config.storage.plugin,
    )?;
    // A directory it cannot write stops it before it registers (see
    // check_writable for why then).
    data_dir_lock::check_writable(&config.data_dir)?;
    let tls = TlsMaterial::load(&config.tls)?;
    let transport = Transport::bind(config.listen, &tls, Identity::Node(id), true)?;
    // Bind checked the certificate is valid now; this, that it is not
    // about to expire (the node would stop again at once).
    let expiry = cert_expiry::CertExpiry::new(tls.cert_path(), tls.not_after()?);
    expiry
        .check_at_start(std::time::SystemTime::now())
        .map_err(|why| tls.own_error(why))?;
    let local = transport
        .local_addr()
        .map_err(|error| TransportError::Bind {
            addr: config.listen,
            error,
        })?;
    let advertised = match config.advertise {
        Some(a) => a,
        None if config.listen.port() == 0 => local,
        None => config.listen,
    };
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|error| NodeError::Metrics { addr, error })?,
        ),
        None => None,
    };

    let base = std::path::Path::new(".");
    let storage = if config.storage.plugin == storage::NATIVE {
        warn!(
            "storage `{}`: the native in-process memory log, a benchmark baseline; it keeps nothing across a restart",
            storage::NATIVE
        );
        storage::NodeStorage::Native
    } else {
        storage::NodeStorage::Plugin(
            StoragePlugin::load(&config.storage.source(base), config.storage.sandbox())
                .map_err(NodeError::Storage)?,
        )
    };
    // A setting the plugin refuses stops the node here, not at the first
    // partition it opens (see plugin/config_check.rs).
    if let storage::NodeStorage::Plugin(p) = &storage {
        match p
            .check_config(config.storage.pairs(), &config.data_dir)
            .await
        {
            ConfigCheck::Accepted => {}
            ConfigCheck::Refused(why) => {
                return Err(NodeError::StorageConfig {
                    plugin: p.name().to_string(),
                    why,
                });
            }
            ConfigCheck::Skipped(why) => {
                info!("storage settings not checked at startup: {why}");
            }
            // The partitions' opens are likely to fail the same way.
            ConfigCheck::Unchecked(why) => {
                warn!("storage settings could not be checked at startup: {why}");
            }
        }
    }
    let meta_plugin =
        MetadataPlugin::load(&config.metadata.source(base), config.metadata.sandbox())
            .map_err(NodeError::MetadataLoad)?;
    // The store may not be up yet (nodes and etcd started together, or by
    // a service manager in any order): wait for it, saying so, instead of
    // exiting at once. Only "unavailable" is waited out; a store that
    // answers "no" (another cluster's, a refused setting) stops the start.
    let store = config.metadata.describe();
    let mut waiting =
        store_wait::StoreWait::new(Duration::from_millis(config.metadata.start_wait_ms));
    // This node's registration as the first list of brokers found it,
    // before any attempt registered: a retry after a registration whose
    // answer was lost would otherwise find this start's own.
    let mut before_start: Option<Option<u64>> = None;
    let joined = async {
        loop {
            match join_store(
                &config,
                &meta_plugin,
                found_identity.as_ref(),
                &transport,
                advertised,
                &mut before_start,
            )
            .await
            {
                Err(NodeError::Metadata(MetadataError::Unavailable(why))) => {
                    let Some(pause) = waiting.next_pause() else {
                        break Err(NodeError::StoreNeverAnswered {
                            store: store.clone(),
                            waited_ms: config.metadata.start_wait_ms,
                            why,
                        });
                    };
                    warn!(
                        "metadata store ({store}) unavailable: {why}; trying again in {} ms (for up to {} s more, `[metadata] start_wait_ms`)",
                        pause.as_millis(),
                        waiting.left().as_secs()
                    );
                    tokio::time::sleep(pause).await;
                }
                other => break other,
            }
        }
    };
    // Raced with the stop as a whole: a store that takes connections but
    // never answers holds an attempt for its timeouts, and the pauses
    // between attempts grow to seconds.
    let (metadata, broker_epoch, cluster_id, registered) = tokio::select! {
        joined = joined => joined?,
        _ = &mut shutdown => {
            info!("node {id} shutting down before the metadata store answered");
            return Ok(());
        }
    };
    if let Some(recorded) = clean.check_run(registered) {
        warn!(
            "{}/clean-shutdown.toml is from this node's run with broker epoch {recorded}, but the metadata store registered it since with broker epoch {}: the data directory is older than this node's last run (restored from a backup, or copied?), or that run's last registration was applied but its answer lost. No log counts as intact: each leaves the ELR, and a sole in-sync replica does not lead, until it has caught up",
            config.data_dir.display(),
            registered.unwrap_or_default()
        );
    }
    // Until the record is consumed (below, before any log opens), it must
    // match this registration: a start that fails in between keeps it for
    // the next, which compares it with this epoch.
    if let Err(e) = clean.renew(&config.data_dir, broker_epoch) {
        warn!("{e}: the next start treats every log as possibly incomplete");
    }
    info!(
        "node {id} of cluster {} registered at {advertised} with broker epoch {broker_epoch}; storage `{}`, metadata `{}`",
        cluster_id.as_deref().unwrap_or("(unnamed)"),
        storage.name(),
        meta_plugin.name()
    );
    // Kept to close the plugin at shutdown (see the end of this function).
    let metadata_plugin = metadata.clone();
    let metadata: Arc<dyn MetadataStore> = Arc::new(metadata);

    let (fetch_tx, fetch_rx) = mpsc::unbounded_channel();
    let shared = Shared::new(
        id,
        broker_epoch,
        config.data_dir.clone(),
        storage,
        config.storage.pairs(),
        metadata,
        config.replication.clone(),
        config.failover.clone(),
        fetch_tx.clone(),
        clean,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    fetch::spawn(
        shared.clone(),
        transport.clone(),
        fetch_tx,
        fetch_rx,
        stop_rx.clone(),
    );
    let server = Arc::new(NodeServer {
        shared: shared.clone(),
        partitions: RwLock::new(HashMap::new()),
        not_open: Default::default(),
        store_failing: Default::default(),
        registration_problem: Default::default(),
        fenced: Default::default(),
    });
    // From here on, a drop of this future (an abort, a lost `select!`, a
    // timeout around it) stops the node as a crash would; see StopOnDrop.
    let mut on_drop = StopOnDrop {
        id,
        stop: stop_tx,
        tasks: Vec::new(),
        transport: transport.clone(),
        server: server.clone(),
        armed: true,
    };
    // This node's log may have lost what it had acknowledged before the
    // restart (unflushed writes; an in-memory log is empty). So, like
    // Kafka's controller on a broker's re-registration, it must not lead
    // its old epochs again nor count as in sync until it has caught up:
    // every partition goes through `handoff` (which reads the current
    // state itself) before this node serves it. Whether the log is intact
    // is known once it is open (the clean-shutdown record).
    for (topic, partition) in shared.metadata.list_partitions().await? {
        shared.request_handoff(TopicPartition::new(&topic, partition), None);
    }
    // From here on logs open and are written: a crash of this run must
    // find no record.
    clean_shutdown::CleanShutdown::consume(&config.data_dir)?;
    failover::spawn(
        shared.clone(),
        transport.clone(),
        server.clone(),
        stop_rx.clone(),
    );
    let serving = {
        let (t, s) = (transport.clone(), server.clone());
        tokio::spawn(async move { t.serve(id, s).await })
    };
    let metrics_task = metrics_listener.map(|l| {
        let (sh, t, srv) = (shared.clone(), transport.clone(), server.clone());
        let cert_not_after = expiry.not_after_unix();
        tokio::spawn(metrics::serve(
            l,
            Arc::new(move || {
                metrics::render(
                    id,
                    &sh.metrics,
                    &sh.failover_view(),
                    &sh.fetch_sessions,
                    t.accepted(),
                    srv.not_open.lock().map_or(0, |n| n.len()),
                    cert_not_after,
                )
            }),
        ))
    });
    on_drop.tasks.push(serving.abort_handle());
    if let Some(t) = &metrics_task {
        on_drop.tasks.push(t.abort_handle());
    }
    if let Some(r) = ready {
        let _ = r.send(local);
    }
    info!("node {id} serving QUIC on {local}");

    let (fenced, expiring) = tokio::select! {
        f = watch(&server, Duration::from_millis(config.metadata_poll_ms)) => (Some(f), None),
        why = expiry.watch() => (None, Some(NodeError::CertificateExpiring(why))),
        _ = &mut shutdown => {
            info!("node {id} shutting down");
            (None, None)
        }
    };
    if let Some(e) = fenced.as_ref().or(expiring.as_ref()) {
        error!("{e}");
    }

    // A node on its way out makes no more failover decisions (a pass
    // already running writes none), and fetches nothing more: its
    // heartbeats and fetches stop with the transport, so what it believes
    // of the others only goes stale from here. (It went on deciding until
    // its partitions were closed, which after a failover test took ~1.4 s,
    // the transport's close waiting for connections to killed peers to
    // drain: in six bench runs here nodes elected a leader four times
    // while shutting down, 542-559 ms after they last heard from the old
    // one.)
    let _ = on_drop.stop.send(true);
    // Fenced: the id is another process's now, and a controlled shutdown
    // would register it back and write its hand-offs. Nor into a store
    // that lost this node's registration (wiped, or gone back to a
    // backup): registered there again, the nodes made their next start
    // take it for their cluster's store, and the check that refuses an
    // empty store never ran (exploratory run).
    let lost = server
        .registration_problem
        .lock()
        .ok()
        .and_then(|p| p.clone());
    if let Some(why) = &lost {
        warn!(
            "controlled shutdown skipped: {why}; registering again would write into a store that lost this cluster's records"
        );
    }
    if config.failover.controlled_shutdown && fenced.is_none() && lost.is_none() {
        let partitions = server
            .partitions
            .read()
            .map(|m| m.clone())
            .unwrap_or_default();
        let mut limit = Duration::from_millis(config.failover.failure_timeout_ms);
        // Ahead of the expiry, the hand-over must be done while peers still
        // accept this node's certificate.
        if expiring.is_some() {
            limit = limit.min(expiry.left().saturating_sub(Duration::from_secs(5)));
        }
        failover::step_down(
            &shared,
            &partitions,
            &transport,
            advertised.to_string(),
            limit,
        )
        .await;
    }
    // Stop serving, so nothing new is acknowledged; then flush.
    transport.close().await;
    serving.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    // Each partition answers with its log end once flushed and closed;
    // the clean-shutdown record lists those that did, except any whose
    // claims from an earlier incarnation were never given up (its log may
    // be short of what those claims promise).
    let mut ends = Vec::new();
    for (tp, rx) in tell_partitions_to_shut_down(&server) {
        if let Some(rx) = rx
            && let Ok(Some(end)) = rx.await
            // Read after it answered: a recovery up to then has asked for
            // its hand-off, and none can after.
            && shared
                .handoffs
                .lock()
                .is_ok_and(|hs| hs.get(&tp).is_none_or(|intact| *intact == Some(true)))
        {
            ends.push((tp, end));
        }
    }
    // Fenced, another process acknowledged writes as this node since it
    // was paused: a clean stop vouches only for what this one did, so its
    // next start must not count these logs as whole.
    let vouched: &[_] = if fenced.is_some() { &[] } else { &ends };
    // The epoch of its last registration: a controlled shutdown registers
    // again (a renewal lost on its way back leaves the store one ahead,
    // and the next start trusts no log: the safe side).
    let last_epoch = shared
        .answering_epoch
        .load(std::sync::atomic::Ordering::Relaxed);
    if let Err(e) = clean_shutdown::CleanShutdown::write(&config.data_dir, last_epoch, vouched) {
        warn!("{e}: the next start treats every log as possibly incomplete");
    }
    // Every log is closed and the record written: nothing is left for
    // StopOnDrop but the metadata plugin's close.
    on_drop.armed = false;
    // The metadata plugin too, after whatever call it is in (a poll, a
    // failover decision): left to the drop, that call could still be
    // running when the runtime shut down, as the storage plugins' closes
    // were, and a file call of it would find its job cancelled.
    // Bounded: a call it is stuck in (an unreachable etcd) may take its
    // deadlines, and the node should stop anyway.
    if tokio::time::timeout(partition::CLOSE_WAIT, metadata_plugin.close())
        .await
        .is_err()
    {
        let wait = partition::CLOSE_WAIT;
        warn!("the metadata plugin did not close within {wait:?}; leaving it");
    }
    info!("node {id} stopped");
    match fenced.or(expiring) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Stops what [`run`] started if its future is dropped before it returns,
/// or it returns an error after starting them.
/// Its tasks are spawned, so they would outlive the future: an embedder
/// that aborted the task running a node (or lost it in a `select!`) had a
/// node that went on leading and acknowledging writes, its UDP port bound
/// (embedder run). Dropped, it stops like a crash: nothing more is
/// served or fetched, the endpoint closes, each partition is told to shut
/// down (its log flushed and closed), and no clean-shutdown record is
/// written, so the next start trusts no log. Only `shutdown` stops a node
/// gracefully (a controlled shutdown hands its leaderships over first).
struct StopOnDrop {
    id: crate::core::ReplicaId,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::AbortHandle>,
    transport: Transport,
    server: Arc<NodeServer>,
    /// Cleared once `run`'s own shutdown has closed every log.
    armed: bool,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        warn!(
            "node {}: stopping without a controlled shutdown (its start failed, or its run was dropped): as after a crash, its next start trusts none of its logs",
            self.id
        );
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        self.transport.close_now();
        // Nobody waits for the answers: the partitions close on their own.
        drop(tell_partitions_to_shut_down(&self.server));
    }
}

/// Take every partition out of `server` and tell each to shut down (flush
/// and close its log); the answers (its log end once closed, `None` for one
/// that could not be told) come in the receivers. All are told before any
/// is waited for: they close at once, and a drop while waiting leaves
/// none running.
fn tell_partitions_to_shut_down(
    server: &NodeServer,
) -> Vec<(TopicPartition, Option<oneshot::Receiver<Option<u64>>>)> {
    let handles: Vec<_> = server
        .partitions
        .write()
        .map(|mut m| m.drain().collect())
        .unwrap_or_default();
    handles
        .into_iter()
        .map(|(tp, h)| {
            let (tx, rx) = oneshot::channel();
            (tp, h.send(Event::Shutdown { reply: tx }).then_some(rx))
        })
        .collect()
}

/// How long a starting node waits for an answer from the address its id
/// is registered at, when that is not its own.
const ALREADY_RUNNING_WAIT: Duration = Duration::from_secs(2);

/// Connect to the metadata store, check it is this cluster's, register,
/// and record the cluster in the data directory: everything a start does
/// in the store, from the beginning each time (each step is idempotent).
/// Answers the store, the broker epoch, the cluster id, and this node's
/// broker epoch in the store before this start (read at the first attempt
/// that could list the brokers, kept in `before_start`).
async fn join_store(
    config: &NodeConfig,
    meta_plugin: &MetadataPlugin,
    found_identity: Option<&identity::DirIdentity>,
    transport: &Transport,
    advertised: SocketAddr,
    before_start: &mut Option<Option<u64>>,
) -> Result<(PluginMetadata, u64, Option<String>, Option<u64>), NodeError> {
    let id = config.node_id;
    let metadata = meta_plugin
        .connect(&config.metadata.dir, config.metadata.plugin_config())
        .await?;
    // This node's registration before this start's: what the clean-stop
    // record is compared with (clean_shutdown.rs), and where a live
    // process under this id would be.
    let brokers = match metadata.list_brokers().await {
        Ok(b) => Some(b),
        Err(MetadataError::Unavailable(why)) => return Err(MetadataError::Unavailable(why).into()),
        Err(e) => {
            warn!(
                "cannot read the brokers' registrations ({e}): this node's clean-stop record is not compared with its last registration, nor is another process under its id looked for"
            );
            None
        }
    };
    let registered = brokers.iter().flatten().find(|b| b.id == id).cloned();
    if brokers.is_some() && before_start.is_none() {
        *before_start = Some(registered.as_ref().map(|b| b.epoch));
    }
    // An empty store, though this node's data directory ran in a cluster
    // before, is most likely the wrong one (a `dir` resolved from a moved
    // config file, a mistyped etcd prefix): checked before the claim below
    // would make it this cluster's. A node started on one registered alone
    // and gave up every claim its logs had (exploratory run). A store
    // holding other nodes goes on to the claim, which names another
    // cluster's.
    if brokers.as_ref().is_some_and(Vec::is_empty)
        && let Some(found) = found_identity.filter(|f| f.node_id == id)
        && let Some(cluster) = &found.cluster_id
    {
        return Err(NodeError::StoreDoesNotKnowNode {
            store: config.metadata.describe(),
            id,
            cluster: cluster.clone(),
            data_dir: config.data_dir.display().to_string(),
        });
    }
    // The store must be this cluster's before this node registers in it
    // (a registration would overwrite another cluster's broker address).
    let cluster_id = config
        .cluster_id
        .clone()
        .or_else(|| found_identity.and_then(|found| found.cluster_id.clone()));
    match &cluster_id {
        Some(configured) => {
            let stored = metadata.claim_cluster_id(configured.clone()).await?;
            if stored != *configured {
                return Err(NodeError::OtherCluster {
                    store: config.metadata.describe(),
                    stored,
                    configured: configured.clone(),
                    named_by: if config.cluster_id.is_some() {
                        "this node's config".to_string()
                    } else {
                        format!(
                            "this node's data directory ({}/identity.toml; the config names none)",
                            config.data_dir.display()
                        )
                    },
                });
            }
        }
        None => warn!(
            "no cluster_id in the config: this node cannot tell a metadata store or data directory of another cluster from its own (`cluster init` writes one; any 1-64 characters of A-Z, a-z, 0-9, `_`, `-` that no other cluster uses will do)"
        ),
    }
    // A live process registered under this id elsewhere stops this start
    // before it takes the id over (Kafka refuses a duplicate broker.id).
    already_running(registered.as_ref(), transport, id, advertised).await?;
    let broker_epoch = metadata.register_broker(id, advertised.to_string()).await?;
    // Written once registered: a directory with an identity has been
    // registered in its cluster's store (the check above relies on it).
    let identity = identity::DirIdentity {
        node_id: id,
        cluster_id: cluster_id.clone(),
        storage: Some(identity::storage_kind(&config.storage.plugin)),
    };
    if found_identity != Some(&identity) {
        identity.write(&config.data_dir)?;
    }
    Ok((metadata, broker_epoch, cluster_id, before_start.flatten()))
}

/// Refuse to start when the store registers `id` at another address and
/// a node answers there as `id` (its certificate and hello say so). At
/// this node's own address nothing else can be listening: it bound it.
async fn already_running(
    registered: Option<&crate::metadata::Broker>,
    transport: &Transport,
    id: crate::core::ReplicaId,
    advertised: SocketAddr,
) -> Result<(), NodeError> {
    let Some(addr) = registered
        .filter(|b| b.address != advertised.to_string())
        .and_then(|b| b.address.parse::<SocketAddr>().ok())
    else {
        return Ok(());
    };
    match tokio::time::timeout(ALREADY_RUNNING_WAIT, transport.connect(addr, id)).await {
        Ok(Ok(peer)) => {
            peer.close();
            Err(NodeError::AlreadyRunning {
                id,
                addr: addr.to_string(),
            })
        }
        _ => Ok(()),
    }
}

/// Follow the metadata store: learn brokers' addresses, open the
/// partitions assigned here, and pass every partition's new state to it.
/// Ends only when another process registered under this node's id
/// (see [`check_own_registration`]).
async fn watch(server: &Arc<NodeServer>, every: Duration) -> NodeError {
    let mut seen: HashMap<TopicPartition, u64> = HashMap::new();
    let mut open_failures: HashMap<TopicPartition, OpenFailure> = HashMap::new();
    let mut unreadable: HashMap<TopicPartition, String> = HashMap::new();
    let mut failing = false;
    loop {
        let outcome = refresh(server, &mut seen, &mut open_failures, &mut unreadable).await;
        if let Some(f) = server.fenced.lock().ok().and_then(|mut f| f.take()) {
            return f;
        }
        // Cleared by `refresh` at its first read the store answers.
        if let (Err(e), Ok(mut f)) = (&outcome, server.store_failing.lock()) {
            *f = Some(e.to_string());
        }
        match outcome {
            Ok(()) => {
                if failing {
                    info!("metadata store reachable again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    warn!("metadata refresh failed (will keep trying): {e}");
                }
                failing = true;
            }
        }
        // For `status`: why a replica of this node is missing there.
        let mut not_open: Vec<crate::wire::rpc::NotOpen> = open_failures
            .iter()
            .map(|(tp, f)| crate::wire::rpc::NotOpen {
                topic: tp.topic.clone(),
                partition: tp.partition,
                error: f.last_error.clone(),
                attempts: f.attempts,
            })
            .collect();
        not_open.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        if let Ok(mut n) = server.not_open.lock() {
            *n = not_open;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = server.shared.refresh.notified() => {}
        }
    }
}

/// Say so, once per change, when this node's registration is gone from the
/// store, or older than this run's: the store was wiped or restored from
/// an older backup under a running cluster, which otherwise showed only as
/// "metadata store reachable again" and an empty topic list. A newer one
/// is another process that registered under this id: this one is fenced
/// and stops ([`NodeServer::fenced`]).
fn check_own_registration(server: &NodeServer, brokers: &[crate::metadata::Broker]) {
    let shared = &server.shared;
    let me = shared.node_id;
    let found = brokers.iter().find(|b| b.id == me);
    if let Some(b) = found.filter(|b| b.epoch > shared.broker_epoch) {
        if let Ok(mut f) = server.fenced.lock() {
            *f = Some(NodeError::Fenced {
                id: me,
                ours: shared.broker_epoch,
                theirs: b.epoch,
                addr: b.address.clone(),
            });
        }
        return;
    }
    let problem = match found.map(|b| b.epoch) {
        Some(epoch) if epoch >= shared.broker_epoch => None,
        Some(epoch) => Some(format!(
            "this node's registration in the metadata store has broker epoch {epoch}, older than the {} it registered with at start",
            shared.broker_epoch
        )),
        None => Some("this node's registration is gone from the metadata store".to_string()),
    };
    let Ok(mut said) = server.registration_problem.lock() else {
        return;
    };
    if *said == problem {
        return;
    }
    match &problem {
        Some(p) => error!(
            "{p}: was the store wiped, or restored from an older backup, under the running cluster? Its records of the topics may be gone with it; restart the nodes once it is restored (they register again at start; to start over on an empty store, delete `identity.toml` in each node's data directory first)"
        ),
        None => info!("this node's registration in the metadata store reads again"),
    }
    *said = problem;
}

/// A partition whose log would not open: retried with backoff (up to
/// [`OPEN_RETRY_MAX`]), logged as an error when the reason changes.
struct OpenFailure {
    attempts: u32,
    next_try: std::time::Instant,
    last_error: String,
}

/// Longest wait between attempts to open a failing partition's log.
const OPEN_RETRY_MAX: Duration = Duration::from_secs(10);

/// Read the store and pass every partition's state on. `unreadable`: the
/// partitions whose record could not be read, with the error last logged;
/// they are skipped, not the pass: one corrupt record used to stop every
/// refresh there, so partitions listed after it no longer followed
/// elections, nor did new topics open.
async fn refresh(
    server: &Arc<NodeServer>,
    seen: &mut HashMap<TopicPartition, u64>,
    open_failures: &mut HashMap<TopicPartition, OpenFailure>,
    unreadable: &mut HashMap<TopicPartition, String>,
) -> Result<(), MetadataError> {
    let shared = &server.shared;
    let meta = &shared.metadata;
    // Hand-offs whose log was judged (a log recovered after a fault, or
    // one that would not open); the others wait for their log to open
    // below.
    let judged: Vec<(TopicPartition, bool)> = shared
        .handoffs
        .lock()
        .map(|h| {
            h.iter()
                .filter_map(|(tp, intact)| Some((tp.clone(), (*intact)?)))
                .collect()
        })
        .unwrap_or_default();
    for (tp, intact) in judged {
        if settle_handoff(shared, &tp, intact).await {
            // Whatever it wrote (or not), the partition gets the state
            // again: it may have refused leadership meanwhile.
            seen.remove(&tp);
        }
    }
    let brokers = meta.list_brokers().await?;
    // The store answers again: metadata requests try it from now on,
    // not at the end of this pass.
    if let Ok(mut f) = server.store_failing.lock() {
        *f = None;
    }
    check_own_registration(server, &brokers);
    shared.record_brokers(&brokers);
    // The partitions listed and (as far as their record says) still
    // assigned here: a failure to open any other is no longer news.
    let mut listed = std::collections::HashSet::new();
    // Every partition whose record the store holds, assigned here or not.
    let mut present = std::collections::HashSet::new();
    // One call for every record (one range request on etcd), where a call
    // per partition cost 300 plugin calls (or HTTP requests) a pass.
    for read in meta.read_partitions().await? {
        let (topic, partition) = (read.topic, read.partition);
        let tp = TopicPartition::new(&topic, partition);
        present.insert(tp.clone());
        listed.insert(tp.clone());
        let state = match read.state {
            Ok(s) => {
                if unreadable.remove(&tp).is_some() {
                    info!("{topic}/{partition}: its record in the metadata store reads again");
                    // Repaired in place, it may carry the version seen.
                    seen.remove(&tp);
                }
                s
            }
            Err(MetadataError::NotFound(_)) => continue,
            // That record (corrupt, or one the store could not read): the
            // other partitions go on. A store that is down fails the whole
            // call, and the next pass tries again.
            Err(e) => {
                let why = match e {
                    MetadataError::Corrupt(why) => why,
                    other => other.to_string(),
                };
                if unreadable.get(&tp) != Some(&why) {
                    error!(
                        "{topic}/{partition}: its record in the metadata store cannot be read, so this node keeps its last view of the partition until it reads again; the other partitions go on. If it is corrupt, restore the record (with a version and leader epoch at least those last seen) or remove it: {why}"
                    );
                    unreadable.insert(tp, why);
                }
                continue;
            }
        };
        if let Ok(mut m) = shared.states.write() {
            // A newer version (this node's own election) is never
            // replaced by an older read.
            if m.get(&tp).is_none_or(|s| s.version <= state.version) {
                m.insert(tp.clone(), state.clone());
            }
        }
        // A record below this node's log (the store went back), or one
        // its partition asked to move above its log: re-stamped first.
        let below_log = shared
            .log_epoch(&tp)
            .filter(|held| state.leader_epoch < *held);
        let asked = shared.restamp_wanted(&tp);
        let above = match asked {
            Some(a) if state.leader_epoch <= a => below_log.max(Some(a)),
            _ => {
                if asked.is_some() {
                    shared.restamp_done(&tp); // someone moved it above already
                }
                below_log
            }
        };
        let state = match above {
            Some(above) if state.replicas.contains(&shared.node_id) => {
                match restamp(shared, &tp, &state, above).await {
                    Some(written) => {
                        shared.restamp_done(&tp);
                        written
                    }
                    // Not passed on: its partition would refuse it. The
                    // next pass reads what was written instead.
                    None => continue,
                }
            }
            _ => state,
        };
        let pending = shared
            .handoffs
            .lock()
            .ok()
            .and_then(|h| h.get(&tp).copied());
        if !state.replicas.contains(&shared.node_id) {
            listed.remove(&tp);
            if pending.is_some() {
                // Not a replica: it holds no claim to give up.
                if let Ok(mut h) = shared.handoffs.lock() {
                    h.remove(&tp);
                }
            }
            continue;
        }
        match pending {
            Some(Some(_)) => continue, // not until its claims are given up
            Some(None) => {}           // judged once its log is open, below
            None if seen.get(&tp) == Some(&state.version) => continue,
            None => {}
        }
        let existing = server
            .partitions
            .read()
            .ok()
            .and_then(|m| m.get(&tp).cloned());
        let handle = match existing {
            Some(_) if pending.is_some() => continue,
            Some(h) => h,
            None => {
                let now = std::time::Instant::now();
                if open_failures.get(&tp).is_some_and(|f| now < f.next_try) {
                    continue;
                }
                match partition::start(shared.clone(), tp.clone()).await {
                    Ok((h, opened_end)) => {
                        if let Some(f) = open_failures.remove(&tp) {
                            info!(
                                "opened {topic}/{partition} after {} failed attempts",
                                f.attempts
                            );
                        }
                        if let Ok(mut m) = server.partitions.write() {
                            m.insert(tp.clone(), h.clone());
                        }
                        if pending.is_some() {
                            // Its old claims go first; it is served from
                            // the next pass, with the state that wrote.
                            // A recovery since the open may have judged
                            // it already: "not intact" wins.
                            let intact = shared
                                .request_handoff(
                                    tp.clone(),
                                    Some(shared.clean.intact(&tp, opened_end)),
                                )
                                .unwrap_or(false);
                            settle_handoff(shared, &tp, intact).await;
                            continue;
                        }
                        h
                    }
                    Err(e) => {
                        let why = e.to_string();
                        let f = open_failures.entry(tp.clone()).or_insert(OpenFailure {
                            attempts: 0,
                            next_try: now,
                            last_error: String::new(),
                        });
                        f.attempts += 1;
                        // 200 ms, 400 ms, ... up to 10 s between attempts.
                        let wait = Duration::from_millis(100)
                            .saturating_mul(1 << f.attempts.min(7))
                            .min(OPEN_RETRY_MAX);
                        f.next_try = now + wait;
                        if why != f.last_error {
                            error!(
                                "cannot open {topic}/{partition}: {why} (will retry, backing off up to {OPEN_RETRY_MAX:?})"
                            );
                            f.last_error = why;
                        } else {
                            tracing::debug!(
                                "cannot open {topic}/{partition} (attempt {}): {why}",
                                f.attempts
                            );
                        }
                        if pending.is_some() {
                            // Its claims must not wait for the log: a
                            // leader that cannot serve would hold the
                            // partition. Unjudged, the log counts as lost.
                            shared.request_handoff(tp.clone(), Some(false));
                            settle_handoff(shared, &tp, false).await;
                        }
                        continue;
                    }
                }
            }
        };
        seen.insert(tp, state.version);
        handle.send(Event::Metadata(state));
    }
    open_failures.retain(|tp, _| listed.contains(tp));
    // A record gone from the store (deleted by hand, or a store restored
    // from a backup older than the topic) made its partition vanish without
    // a word: clients are told it does not exist. The replica's log and its
    // last view stay; say so once, and again when the record is back
    // (`unreadable` logs that, and the state is handed on again).
    const GONE: &str = "its record is gone from the metadata store";
    let gone: Vec<TopicPartition> = seen
        .keys()
        .filter(|tp| !present.contains(*tp))
        .cloned()
        .collect();
    // (Out of `seen` from here on, each is said once: it enters `seen`
    // again only once its record reads again.)
    for tp in gone {
        seen.remove(&tp);
        error!(
            "{}/{}: {GONE}, so clients cannot find the partition; this node keeps its replica's log and last view. Restore the record (with a version and leader epoch at least those last seen)",
            tp.topic, tp.partition
        );
        unreadable.insert(tp, GONE.to_string());
    }
    Ok(())
}

/// Give up `tp`'s old claims ([`handoff`]); whether that settled them.
/// Once done, the partition leaves the pending set (unless a recovery
/// judged its log again meanwhile: then the next pass gives up what that
/// verdict asks) and the watcher runs again at once, so that it gets the
/// state the hand-off wrote; until then it is retried each pass.
async fn settle_handoff(shared: &Shared, tp: &TopicPartition, intact: bool) -> bool {
    match handoff(shared, tp, intact).await {
        Ok(()) => {
            let settled = shared.handoffs.lock().is_ok_and(|mut h| {
                let same = h.get(tp) == Some(&Some(intact));
                if same {
                    h.remove(tp);
                }
                same
            });
            shared.refresh.notify_one();
            settled
        }
        // That partition waits (and is retried); the others go on.
        Err(e) => {
            warn!(
                "{}/{}: cannot give up this node's old claim yet: {e}",
                tp.topic, tp.partition
            );
            false
        }
    }
}

/// `state`, whose leader epoch is not above `held`, an epoch this node's
/// log of `tp` holds, written again under epoch
/// [`shared::past_regression`]`(held)`; what was written, or `None` if
/// nothing was (the next pass tries again on what it reads then).
///
/// Why: a leader of an epoch some log already holds from another leader
/// would hide their divergence from KIP-101 truncation. And a record not
/// above a log (below it, or naming this node leader of an epoch its log
/// holds, which a restart or recovery always leaves) means the store went
/// back (restored from an older backup, or wiped and the topic created
/// again): epochs enter a log only after the store named them. Its leader,
/// ISR and ELR are then from before writes some log holds, so none of
/// them is known to hold every acknowledged write: the record is written
/// with no leader, ISR or ELR, and an unclean election (the operator's,
/// or automatic with `unclean_leader_election`) elects the replica whose
/// log is most up to date. Keeping the record's leader lost the writes
/// acknowledged after the backup where it named a replica that lacked
/// them, and a topic created again over its old logs truncated them all
/// to its first replica's (exploratory run).
async fn restamp(
    shared: &Shared,
    tp: &TopicPartition,
    state: &PartitionState,
    held: u32,
) -> Option<PartitionState> {
    let mut next = PartitionState {
        leader_epoch: shared::past_regression(held),
        ..state.clone()
    };
    next.forget_holders();
    let name = format!("{}/{}", tp.topic, tp.partition);
    match shared
        .metadata
        .compare_and_set(next.clone(), state.version)
        .await
    {
        Ok(version) => {
            error!(
                "{name}: the metadata store names leader epoch {} (version {}, leader {:?}, ISR {:?}), but this node's log already holds epoch {held}: the store went back (restored from an older backup, or wiped and the topic created again). No replica is known to hold every acknowledged write, so the record is re-stamped as epoch {} with no leader. Once the replicas are up, `replicator partition elect --topic {} --partition {} --unclean` elects the one whose log is most up to date (so does `[failover] unclean_leader_election = true`)",
                state.leader_epoch,
                state.version,
                state.leader,
                state.isr,
                next.leader_epoch,
                tp.topic,
                tp.partition,
            );
            let written = PartitionState { version, ..next };
            shared.wrote_state(tp.clone(), written.clone());
            Some(written)
        }
        // Someone wrote first (also when the log took a newer epoch after
        // this pass read the record): the next pass reads what they wrote.
        Err(MetadataError::Conflict(_)) => {
            shared.refresh.notify_one();
            None
        }
        Err(e) => {
            warn!("{name}: cannot re-stamp a record below this node's log yet: {e}");
            None
        }
    }
}

/// Drop this node's old incarnation's claims on `tp`
/// ([`PartitionState::after_restart`]).
/// A compare-and-set, retried on conflict.
async fn handoff(shared: &Shared, tp: &TopicPartition, intact: bool) -> Result<(), MetadataError> {
    let me = shared.node_id;
    for _ in 0..10 {
        let st = match shared.metadata.get_partition(&tp.topic, tp.partition).await {
            Err(MetadataError::NotFound(_)) => return Ok(()),
            other => other?,
        };
        let Some(mut next) = st.after_restart(me, intact, shared.replication.min_insync_replicas)
        else {
            return Ok(());
        };
        shared.lift_new_epoch(tp, st.leader_epoch, &mut next, false);
        match shared
            .metadata
            .compare_and_set(next.clone(), st.version)
            .await
        {
            Ok(_) => {
                let name = format!("{}/{}", tp.topic, tp.partition);
                let lossy = if intact {
                    ""
                } else {
                    " (its log may lack records it held: no clean shutdown recorded them, or its recovery found fewer)"
                };
                match next.leader {
                    Some(l) if st.leader == Some(me) => info!(
                        "{name}: this node led epoch {} before its restart or log recovery{lossy}; leadership moves to node {l} in epoch {}",
                        st.leader_epoch, next.leader_epoch
                    ),
                    None if st.leader == Some(me) || st.isr.contains(&me) => error!(
                        "{name}: this node was the only in-sync replica and restarted or recovered its log{lossy}; it may not lead, so the partition has no leader until an eligible replica (ELR {:?}) is alive{}",
                        next.elr,
                        if next.elr.is_empty() {
                            ": there is none, so only an unclean election (`replicator partition elect --unclean`) can make it available, losing the writes its leader lacks"
                        } else {
                            ""
                        }
                    ),
                    _ if st.isr.contains(&me) => info!(
                        "{name}: left the ISR after its restart or log recovery{lossy} (now {:?}, ELR {:?}); rejoins once caught up",
                        next.isr, next.elr
                    ),
                    _ => info!("{name}: left the ELR after its restart or log recovery{lossy}"),
                }
                return Ok(());
            }
            Err(MetadataError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(MetadataError::Conflict(format!(
        "{}/{}: kept losing compare-and-set races",
        tp.topic, tp.partition
    )))
}

#[cfg(test)]
mod handoff_tests {
    use std::sync::{Arc, Mutex};

    use super::{restamp, settle_handoff};
    use crate::core::{ReplicaId, TopicPartition};
    use crate::metadata::{Broker, MetaFuture, MetadataError, MetadataStore, PartitionState};
    use crate::node::config::FailoverConfig;
    use crate::node::shared::Shared;

    type Hook = Box<dyn FnOnce() + Send>;

    /// One partition's state with compare-and-set; `during_write` runs
    /// inside the next write, as a recovery racing it would.
    struct OneState {
        state: Mutex<PartitionState>,
        during_write: Mutex<Option<Hook>>,
    }

    impl MetadataStore for OneState {
        fn get_partition<'a>(&'a self, _: &'a str, _: u32) -> MetaFuture<'a, PartitionState> {
            let s = match self.state.lock() {
                Ok(s) => Ok(s.clone()),
                Err(_) => Err(MetadataError::Other("poisoned".into())),
            };
            Box::pin(async move { s })
        }
        fn compare_and_set(&self, state: PartitionState, expected: u64) -> MetaFuture<'_, u64> {
            if let Some(hook) = self.during_write.lock().ok().and_then(|mut h| h.take()) {
                hook();
            }
            let r = match self.state.lock() {
                Ok(mut s) if s.version == expected => {
                    *s = PartitionState {
                        version: expected + 1,
                        ..state
                    };
                    Ok(expected + 1)
                }
                _ => Err(MetadataError::Conflict("stale".into())),
            };
            Box::pin(async move { r })
        }
        fn list_partitions(&self) -> MetaFuture<'_, Vec<(String, u32)>> {
            Box::pin(async { Ok(vec![("t".into(), 0)]) })
        }
        fn register_broker(&self, _: ReplicaId, _: String) -> MetaFuture<'_, u64> {
            Box::pin(async { Ok(1) })
        }
        fn list_brokers(&self) -> MetaFuture<'_, Vec<Broker>> {
            Box::pin(async { Ok(Vec::new()) })
        }

        /// A fresh store's answer.
        fn claim_cluster_id(&self, id: String) -> MetaFuture<'_, String> {
            Box::pin(async { Ok(id) })
        }
    }

    /// A fetch session's `wait_for` reads the broker epochs while it holds
    /// the `reregistered` watch; recording a restart must therefore never
    /// hold the epochs while it waits for that watch. It did, and a node
    /// whose two worker threads met there hung for good.
    #[test]
    fn recording_a_restart_never_holds_the_epochs_while_it_wakes_the_waiters() {
        let store = Arc::new(OneState {
            state: Mutex::new(state(Some(1), &[1], &[])),
            during_write: Mutex::new(None),
        });
        let (shared, _fetch) = Shared::for_tests(store, FailoverConfig::default());
        let broker = |epoch| Broker {
            id: 2,
            address: "127.0.0.1:7102".into(),
            epoch,
        };
        shared.record_brokers(&[broker(1)]);
        // What a waiting fetch session holds while its closure runs.
        let watch = shared.reregistered.borrow();
        let recorder = {
            let shared = shared.clone();
            std::thread::spawn(move || shared.record_brokers(&[broker(2)]))
        };
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let reader = shared.clone();
        std::thread::spawn(move || {
            while reader.broker_epoch_of(2) != Some(2) {
                std::thread::yield_now();
            }
            let _ = seen_tx.send(());
        });
        let seen = seen_rx.recv_timeout(std::time::Duration::from_secs(10));
        drop(watch);
        recorder.join().expect("recorder");
        assert!(
            seen.is_ok(),
            "the broker epochs stayed locked while the watcher waited for the watch"
        );
        assert_eq!(*shared.reregistered.borrow(), 1, "waiters were not woken");
    }

    #[tokio::test]
    async fn a_lossy_verdict_arriving_during_an_intact_hand_off_is_not_dropped() {
        // Node 1 was the only in-sync replica and its log opened intact:
        // it writes "lead again". Meanwhile its log faults and recovers
        // short. That verdict must still be carried out after the first.
        let store = Arc::new(OneState {
            state: Mutex::new(state(Some(1), &[1], &[2])),
            during_write: Mutex::new(None),
        });
        let (shared, _fetch) = Shared::for_tests(store.clone(), FailoverConfig::default());
        let tp = TopicPartition::new("t", 0);
        shared.request_handoff(tp.clone(), Some(true));
        let (racing, at) = (shared.clone(), tp.clone());
        if let Ok(mut h) = store.during_write.lock() {
            *h = Some(Box::new(move || {
                racing.request_handoff(at, Some(false));
            }));
        }
        assert!(
            !settle_handoff(&shared, &tp, true).await,
            "settled too early"
        );
        assert!(shared.handoff_pending(&tp), "the lossy verdict was dropped");
        let led_again = store.state.lock().unwrap().clone();
        assert_eq!((led_again.leader, led_again.leader_epoch), (Some(1), 5));
        // A later "intact" does not overwrite it either.
        shared.request_handoff(tp.clone(), Some(true));
        assert!(settle_handoff(&shared, &tp, false).await);
        assert!(!shared.handoff_pending(&tp));
        let last = store.state.lock().unwrap().clone();
        assert_eq!((last.leader, last.isr, last.elr), (None, vec![], vec![2]));
    }

    fn state(leader: Option<u32>, isr: &[u32], elr: &[u32]) -> PartitionState {
        PartitionState::sample(leader, isr, elr)
    }

    /// A store restored from an older backup names epoch 4 while this
    /// node's log holds epoch 6. The hand-off after a restart writes an
    /// epoch above the log's (it wrote 5, an epoch some log may hold from
    /// another leader), with no leader, ISR or ELR; so does the re-stamp
    /// of a record left older than the log.
    #[tokio::test]
    async fn epochs_this_node_writes_go_above_its_log_after_the_store_went_back() {
        let store = Arc::new(OneState {
            state: Mutex::new(state(Some(1), &[1, 2], &[])),
            during_write: Mutex::new(None),
        });
        let (shared, _fetch) = Shared::for_tests(store.clone(), FailoverConfig::default());
        let tp = TopicPartition::new("t", 0);
        shared.set_log_epoch(&tp, 6);
        // Far past it: other logs may hold epochs above this one's.
        assert_eq!(shared.epoch_above_log(&tp, 5), 1006);
        assert_eq!(shared.epoch_above_log(&tp, 6), 1006);
        assert_eq!(shared.epoch_above_log(&tp, 7), 7);
        shared.request_handoff(tp.clone(), Some(true));
        assert!(settle_handoff(&shared, &tp, true).await);
        // The record (epoch 4) is below the log: the hand-off names no
        // leader, ISR or ELR (`Shared::lift_new_epoch`).
        let handed = store.state.lock().unwrap().clone();
        assert_eq!(
            (handed.leader, handed.leader_epoch, handed.isr.clone()),
            (None, 1006, Vec::new())
        );

        // A record the hand-off does not touch: node 2 leads epoch 4.
        let old = PartitionState {
            version: 20,
            ..state(Some(2), &[1, 2], &[])
        };
        *store.state.lock().unwrap() = old.clone();
        // Re-stamped above the log with no leader, ISR or ELR: the store
        // went back, so none is known to hold every acknowledged write.
        let now = restamp(&shared, &tp, &old, 6).await.expect("written");
        assert_eq!(now, *store.state.lock().unwrap());
        assert_eq!(
            (now.leader, now.leader_epoch, now.isr.clone(), now.version),
            (None, 1006, Vec::new(), 21)
        );
        assert!(now.elr.is_empty() && now.replicas == old.replicas);
        // Someone wrote first: nothing is written.
        assert_eq!(restamp(&shared, &tp, &old, 6).await, None);
        assert_eq!(store.state.lock().unwrap().version, 21);
    }

    #[test]
    fn a_restarted_leader_hands_on_to_another_isr_member_eligible_only_if_intact() {
        for intact in [true, false] {
            let next = state(Some(1), &[1, 2], &[])
                .after_restart(1, intact, 2)
                .unwrap();
            assert_eq!((next.leader, next.leader_epoch), (Some(2), 5));
            assert_eq!(next.isr, vec![2]);
            assert_eq!(next.elr, if intact { vec![1] } else { vec![] });
        }
    }

    #[test]
    fn a_sole_isr_member_whose_log_lost_records_does_not_lead_again() {
        // KIP-966: 2 left the ISR below min.insync and holds everything
        // committed; 1's log may not.
        let next = state(Some(1), &[1], &[2])
            .after_restart(1, false, 2)
            .unwrap();
        assert_eq!(next.leader, None);
        assert_eq!(next.leader_epoch, 5);
        assert_eq!((next.isr, next.elr), (vec![], vec![2]));
        // With nothing eligible it still does not: only unclean election
        // may then pick a leader.
        let next = state(Some(1), &[1], &[])
            .after_restart(1, false, 2)
            .unwrap();
        assert_eq!((next.leader, next.isr, next.elr), (None, vec![], vec![]));
        // The only replica leads again whatever it lost: nobody has more.
        let mut alone = state(Some(1), &[1], &[]);
        alone.replicas = vec![1];
        let next = alone.after_restart(1, false, 2).unwrap();
        assert_eq!(
            (next.leader, next.leader_epoch, next.isr),
            (Some(1), 5, vec![1])
        );
        // Intact, it leads again under the next epoch.
        let next = state(Some(1), &[1], &[2])
            .after_restart(1, true, 2)
            .unwrap();
        assert_eq!((next.leader, next.leader_epoch), (Some(1), 5));
        assert_eq!((next.isr, next.elr), (vec![1], vec![2]));
    }

    #[test]
    fn a_restarted_replica_outside_the_isr_leaves_the_elr_unless_intact() {
        let s = state(None, &[], &[1, 3]);
        assert_eq!(s.after_restart(3, false, 2).unwrap().elr, vec![1]);
        assert_eq!(s.after_restart(3, true, 2), None);
        assert_eq!(
            state(Some(1), &[1, 2], &[]).after_restart(3, false, 2),
            None
        );
        // A follower in the ISR leaves it.
        let next = state(Some(1), &[1, 2, 3], &[])
            .after_restart(3, false, 2)
            .unwrap();
        assert_eq!(
            (next.leader, next.isr, next.elr),
            (Some(1), vec![1, 2], vec![])
        );
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    /// The CLI prints errors with their causes (`{:#}`): a variant whose
    /// message holds its cause must not name it as a source too, or the
    /// cause is printed twice ("metadata store: X: X").
    #[test]
    fn a_cause_in_the_message_is_not_also_a_source() {
        use std::error::Error;
        let e = NodeError::from(MetadataError::Io("create /m/partitions: read-only".into()));
        assert!(e.source().is_none());
        assert_eq!(
            e.to_string(),
            "metadata store: metadata store I/O error: create /m/partitions: read-only"
        );
        let frame = crate::transport::TransportError::from(crate::wire::FrameError::TooLarge {
            len: 9,
            max: 1,
        });
        assert!(frame.source().is_none());
    }
}
