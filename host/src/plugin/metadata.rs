//! [`MetadataPlugin`]: a metadata backend loaded as a sandboxed component,
//! and [`PluginMetadata`], one connection to it that implements
//! [`MetadataStore`].
//!
//! A connection is one instance in one `Store`, owned by one task on a
//! thread of its own, where its WASI file I/O runs inline (the guest still
//! yields at every epoch tick). Calls queue over a channel and are served
//! one at a time. A call stuck in the kernel (a hung disk) cannot be
//! interrupted there: the caller's wait (`submit`) reports it as a fault,
//! and the calls queued behind it wait for it too. A trap, a blown deadline or an answer
//! that breaks the contract is a [`MetadataError::Fault`]: the instance is
//! dropped and the next call connects a fresh one. Answers are checked
//! against what this connection has seen: versions and broker epochs never
//! go backwards, a compare-and-set yields exactly `expected + 1`, a lookup
//! answers for what was asked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use wasmtime::Store;
use wasmtime::component::ResourceAny;

use super::bindings::metadata::exports::replicator::plugin::metadata as wit;
use super::bindings::metadata::{MetadataPlugin as World, MetadataPluginPre};
use super::bindings::replicator::plugin::types::PluginError;
use super::sandbox::{GUEST_DIR, PluginState, Sandbox};
use super::{LoadError, PluginRuntime, PluginSource, builtin, plugin_bytes, prepare};
use crate::core::{MAX_LEADER_EPOCH, ReplicaId};
use crate::metadata::{
    Broker, MetaFuture, MetadataError, MetadataStore, PartitionRead, PartitionState, valid_topic,
};

/// A compiled, linked metadata plugin, ready to connect.
#[derive(Clone)]
pub struct MetadataPlugin {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    runtime: Arc<PluginRuntime>,
    pre: MetadataPluginPre<PluginState>,
    sandbox: Sandbox,
}

impl MetadataPlugin {
    /// Load from a built-in name (see [`builtin::METADATA`]) or a path,
    /// with the shared runtime.
    pub fn load(source: &PluginSource, sandbox: Sandbox) -> Result<Self, LoadError> {
        Self::load_with(PluginRuntime::global()?, source, sandbox)
    }

    pub fn load_with(
        runtime: Arc<PluginRuntime>,
        source: &PluginSource,
        sandbox: Sandbox,
    ) -> Result<Self, LoadError> {
        let (name, wasm) = plugin_bytes(source, builtin::METADATA)?;
        Self::from_bytes(runtime, &name, &wasm, sandbox)
    }

    /// Load a component from its bytes under a display name.
    pub fn from_bytes(
        runtime: Arc<PluginRuntime>,
        name: &str,
        wasm: &[u8],
        sandbox: Sandbox,
    ) -> Result<Self, LoadError> {
        let pre = prepare(
            &runtime,
            name,
            wasm,
            "metadata-plugin",
            runtime.metadata_linker(),
            MetadataPluginPre::new,
        )?;
        Ok(MetadataPlugin {
            inner: Arc::new(Inner {
                name: name.to_string(),
                runtime,
                pre,
                // Each connection runs on a thread of its own, with its
                // WASI file I/O inline (see `connect`).
                sandbox: Sandbox {
                    own_thread: true,
                    ..sandbox
                },
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.inner.sandbox
    }

    /// Connect to the store with `config`, in a new instance that sees
    /// `data_dir` (created if missing) as `/data` and nothing else. The
    /// connection's task runs until every handle is dropped or
    /// [`PluginMetadata::close`] is called. Must be called inside a tokio
    /// runtime.
    pub async fn connect(
        &self,
        data_dir: &Path,
        config: Vec<(String, String)>,
    ) -> Result<PluginMetadata, MetadataError> {
        crate::durable_dir::create_dir_all(data_dir)
            .map_err(|e| MetadataError::Io(format!("create {}: {e}", data_dir.display())))?;
        let label: Arc<str> = format!("{} metadata", self.name()).into();
        let sandbox = self.sandbox().clone();
        let mut actor = Actor {
            plugin: self.clone(),
            data_dir: data_dir.to_path_buf(),
            config,
            label: label.clone(),
            live: None,
            seen: Seen::default(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (connected_tx, connected_rx) = oneshot::channel();
        let serve = async move {
            let connected = actor.connect().await;
            let ok = connected.is_ok();
            if connected_tx.send(connected).is_err() || !ok {
                return;
            }
            actor.run(rx).await;
        };
        // A thread of its own, where the plugin's file I/O runs inline:
        // on the node's runtime every WASI file call (an open, a directory
        // listing, a read, a sync) was a hop to tokio's blocking pool and
        // back, five or more per partition read, and a node re-reads every
        // partition each `metadata_poll_ms`. An idle node with 300
        // partitions spent a third of a core waking threads for it. A sync
        // now waits on this thread only, never on a worker.
        super::sandbox::spawn_own_thread("metadata".into(), label.clone(), serve)
            .map_err(|e| MetadataError::Io(format!("starting the metadata thread: {e}")))?;
        let wait = sandbox.open_deadline * 2 + Duration::from_secs(1);
        match tokio::time::timeout(wait, connected_rx).await {
            Ok(Ok(Ok(()))) => Ok(PluginMetadata {
                tx,
                label,
                sandbox: Arc::new(sandbox),
            }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(MetadataError::Fault(format!(
                "{label}: the metadata task ended while connecting"
            ))),
            Err(_) => Err(MetadataError::Fault(format!(
                "{label}: connecting did not finish within {wait:?}"
            ))),
        }
    }
}

enum Op {
    Get(String, u32),
    CompareAndSet(PartitionState, u64),
    ListPartitions,
    ReadPartitions(Option<String>),
    RegisterBroker(ReplicaId, String),
    ListBrokers,
    ClaimClusterId(String),
    Close,
}

enum Out {
    State(PartitionState),
    Version(u64),
    Partitions(Vec<(String, u32)>),
    /// A page of records, and the cursor of the next page.
    Page(Vec<PartitionRead>, Option<String>),
    Brokers(Vec<Broker>),
    ClusterId(String),
    Unit,
}

struct Call {
    op: Op,
    reply: oneshot::Sender<Result<Out, MetadataError>>,
}

/// A connection to a metadata store served by a plugin instance. Cheap to
/// clone; calls are served one at a time, in order. Dropping every handle
/// closes the connection.
#[derive(Clone)]
pub struct PluginMetadata {
    tx: mpsc::UnboundedSender<Call>,
    label: Arc<str>,
    sandbox: Arc<Sandbox>,
}

struct Live {
    store: Store<PluginState>,
    world: World,
    client: ResourceAny,
}

/// The newest versions and broker epochs this connection has seen; the
/// store may never answer with older ones.
#[derive(Default)]
struct Seen {
    /// Each partition's newest version seen, and the highest leader epoch.
    versions: HashMap<(String, u32), (u64, u32)>,
    epochs: HashMap<ReplicaId, u64>,
    /// The cluster id the store answered with: it may never change.
    cluster_id: Option<String>,
}

struct Actor {
    plugin: MetadataPlugin,
    data_dir: PathBuf,
    config: Vec<(String, String)>,
    label: Arc<str>,
    live: Option<Live>,
    seen: Seen,
}

/// Run one guest call under the deadline: a trap or an expired deadline
/// becomes a fault (its description); an expected error stays an error.
async fn guarded<T>(
    deadline: Duration,
    fut: impl Future<Output = wasmtime::Result<Result<T, PluginError>>>,
) -> Result<Result<T, PluginError>, String> {
    // Epoch interruption stops wasm code at the deadline; the timeout
    // catches a call stuck in a host function, where epochs do not reach.
    let grace = deadline / 4 + Duration::from_millis(50);
    match tokio::time::timeout(deadline + grace, fut).await {
        Err(_) => Err(format!("call did not return within {deadline:?}")),
        Ok(Err(e)) => Err(match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => "deadline reached in wasm code".into(),
            _ => format!("trapped: {e:#}"),
        }),
        Ok(Ok(r)) => Ok(r),
    }
}

/// `msg` from a guest that sees `dir` as [`GUEST_DIR`], with its paths as
/// the operator knows them (`/data/partitions/t/0/...` named the guest's
/// view, which is nowhere on the host): `/data/` where a path starts (the
/// message's start, or after a space, quote, colon or parenthesis).
fn host_paths_in(msg: String, dir: &Path) -> String {
    let guest = format!("{GUEST_DIR}/");
    let host = format!("{}/", dir.display().to_string().trim_end_matches('/'));
    // Judged by what is written so far: after a replaced path, `/data/`
    // continues that path and is left alone.
    let starts_path = |before: &str| {
        before
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || "'\"`:(".contains(c))
    };
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg.as_str();
    while let Some(i) = rest.find(&guest) {
        out.push_str(&rest[..i]);
        let with = if starts_path(&out) { &host } else { &guest };
        out.push_str(with);
        rest = &rest[i + guest.len()..];
    }
    out.push_str(rest);
    out
}

fn host_paths(e: MetadataError, dir: &Path) -> MetadataError {
    let fix = |m: String| host_paths_in(m, dir);
    match e {
        MetadataError::NotFound(m) => MetadataError::NotFound(fix(m)),
        MetadataError::Conflict(m) => MetadataError::Conflict(fix(m)),
        MetadataError::Unavailable(m) => MetadataError::Unavailable(fix(m)),
        MetadataError::InvalidInput(m) => MetadataError::InvalidInput(fix(m)),
        MetadataError::Io(m) => MetadataError::Io(fix(m)),
        MetadataError::Corrupt(m) => MetadataError::Corrupt(fix(m)),
        MetadataError::Other(m) => MetadataError::Other(fix(m)),
        MetadataError::Fault(m) => MetadataError::Fault(fix(m)),
    }
}

fn convert(e: PluginError) -> MetadataError {
    match e {
        PluginError::NotFound(m) => MetadataError::NotFound(m),
        PluginError::Corrupt(m) => MetadataError::Corrupt(m),
        PluginError::Io(m) => MetadataError::Io(m),
        PluginError::Conflict(m) => MetadataError::Conflict(m),
        PluginError::Unavailable(m) => MetadataError::Unavailable(m),
        PluginError::InvalidInput(m) => MetadataError::InvalidInput(m),
        PluginError::Other(m) => MetadataError::Other(m),
        PluginError::OffsetOutOfRange(b) => MetadataError::Other(format!(
            "offset out of range ({}..{})",
            b.log_start, b.log_end
        )),
    }
}

fn from_wit(s: wit::PartitionState) -> PartitionState {
    PartitionState {
        topic: s.topic,
        partition: s.partition,
        leader: s.leader,
        leader_epoch: s.leader_epoch,
        isr: s.isr,
        elr: s.elr,
        replicas: s.replicas,
        min_insync: s.min_insync,
        version: s.version,
    }
}

fn to_wit(s: &PartitionState) -> wit::PartitionState {
    wit::PartitionState {
        topic: s.topic.clone(),
        partition: s.partition,
        leader: s.leader,
        leader_epoch: s.leader_epoch,
        isr: s.isr.clone(),
        elr: s.elr.clone(),
        replicas: s.replicas.clone(),
        min_insync: s.min_insync,
        version: s.version,
    }
}

/// A guest answer: a fault, an expected error, or a value.
type Answer<T> = Result<Result<T, PluginError>, String>;

/// What the actor makes of an answer: a value, an error to hand on, or a
/// broken contract (which drops the instance).
enum Verdict {
    Ok(Out),
    Err(MetadataError),
    Violation(String),
}

impl Actor {
    /// `e` with the guest's paths as the host names them, for a plugin
    /// whose store is its directory (one that talks to a server, such as
    /// etcd, may name keys that look like paths).
    fn host_paths(&self, e: MetadataError) -> MetadataError {
        if self.sandbox().http_allow.is_empty() {
            host_paths(e, &self.data_dir)
        } else {
            e
        }
    }

    fn sandbox(&self) -> &Sandbox {
        &self.plugin.inner.sandbox
    }

    fn fault(&mut self, detail: String) -> MetadataError {
        tracing::error!(plugin = %self.label, "metadata plugin fault, instance dropped: {detail}");
        // A faulted instance is not called again, not even its destructor.
        self.live = None;
        MetadataError::Fault(format!("{}: {detail}", self.label))
    }

    /// Instantiate the plugin and connect its client.
    async fn connect(&mut self) -> Result<(), MetadataError> {
        self.live = None;
        let deadline = self.sandbox().open_deadline;
        let mut store = PluginState::store(
            self.plugin.inner.runtime.engine(),
            self.sandbox(),
            Some(&self.data_dir),
            self.label.clone(),
            deadline,
        )
        .map_err(|e| self.fault(format!("cannot set up the sandbox: {e:#}")))?;
        let world = match tokio::time::timeout(
            deadline,
            self.plugin.inner.pre.instantiate_async(&mut store),
        )
        .await
        {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => return Err(self.fault(format!("instantiation failed: {e:#}"))),
            Err(_) => return Err(self.fault("instantiation timed out".into())),
        };
        let guest = world.replicator_plugin_metadata().client();
        match guarded(deadline, guest.call_connect(&mut store, &self.config)).await {
            Ok(Ok(client)) => {
                self.live = Some(Live {
                    store,
                    world,
                    client,
                });
                Ok(())
            }
            Ok(Err(e)) => Err(self.host_paths(convert(e))),
            Err(f) => Err(self.fault(format!("connect: {f}"))),
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Call>) {
        while let Some(call) = rx.recv().await {
            if let Op::Close = call.op {
                self.close().await;
                let _ = call.reply.send(Ok(Out::Unit));
                return;
            }
            if call.reply.is_closed() {
                // Its caller timed out and was told so: a write it was
                // told failed must not happen after all.
                tracing::debug!(plugin = %self.label, "skipping a call its caller gave up on");
                continue;
            }
            let r = self.serve(call.op).await;
            let _ = call.reply.send(r);
        }
        self.close().await;
    }

    /// One guest call with its checks, reconnecting first if an earlier
    /// fault dropped the instance.
    async fn serve(&mut self, op: Op) -> Result<Out, MetadataError> {
        if let Op::CompareAndSet(state, expected) = &op {
            // A version or an epoch that `check_get` would refuse to read
            // back is not written: the partition would be unreadable for
            // good. (The membership rules are the plugin's to check on
            // write, as the conformance suite does.)
            if *expected >= MAX_VERSION {
                return Err(MetadataError::InvalidInput(format!(
                    "expected version {expected}: a partition's version stays below {MAX_VERSION}"
                )));
            }
            if state.leader_epoch > MAX_LEADER_EPOCH {
                return Err(MetadataError::InvalidInput(format!(
                    "leader epoch {} for {}/{}: past the largest a partition can reach ({MAX_LEADER_EPOCH})",
                    state.leader_epoch, state.topic, state.partition
                )));
            }
        }
        if self.live.is_none() {
            tracing::info!(plugin = %self.label, "reconnecting the metadata plugin");
            self.connect().await?;
        }
        let deadline = self.sandbox().call_deadline;
        let Some(live) = self.live.as_mut() else {
            return Err(MetadataError::Fault(format!("{}: no instance", self.label)));
        };
        PluginState::arm(&mut live.store, deadline);
        let guest = live.world.replicator_plugin_metadata().client();
        let (store, client) = (&mut live.store, live.client);
        let seen = &mut self.seen;
        let verdict = match op {
            Op::Get(topic, partition) => {
                let r = guarded(
                    deadline,
                    guest.call_get_partition(&mut *store, client, &topic, partition),
                )
                .await;
                let asked = format!("get-partition({topic}/{partition})");
                check_get(seen, asked, topic, partition, r)
            }
            Op::CompareAndSet(state, expected) => {
                let r = guarded(
                    deadline,
                    guest.call_compare_and_set(&mut *store, client, &to_wit(&state), expected),
                )
                .await;
                check_cas(seen, &state, expected, r)
            }
            Op::ListPartitions => {
                let r = guarded(deadline, guest.call_list_partitions(&mut *store, client)).await;
                check_list_partitions(r)
            }
            Op::ReadPartitions(after) => {
                let r = guarded(
                    deadline,
                    guest.call_read_partitions(&mut *store, client, after.as_deref()),
                )
                .await;
                check_read_partitions(seen, r)
            }
            Op::RegisterBroker(id, address) => {
                let broker = wit::Broker {
                    id,
                    address,
                    epoch: 0,
                };
                let r = guarded(
                    deadline,
                    guest.call_register_broker(&mut *store, client, &broker),
                )
                .await;
                check_register(seen, id, r)
            }
            Op::ListBrokers => {
                let r = guarded(deadline, guest.call_list_brokers(&mut *store, client)).await;
                check_list_brokers(seen, r)
            }
            Op::ClaimClusterId(id) => {
                if let Err(why) = crate::metadata::check_cluster_id(&id) {
                    return Err(MetadataError::InvalidInput(why));
                }
                let r = guarded(
                    deadline,
                    guest.call_claim_cluster_id(&mut *store, client, &id),
                )
                .await;
                check_claim(seen, r)
            }
            Op::Close => Verdict::Err(MetadataError::Other("not a guest call".into())),
        };
        match verdict {
            // Each record's error names paths as the host knows them too.
            Verdict::Ok(Out::Page(reads, next)) => Ok(Out::Page(
                reads
                    .into_iter()
                    .map(|r| PartitionRead {
                        state: r.state.map_err(|e| self.host_paths(e)),
                        ..r
                    })
                    .collect(),
                next,
            )),
            Verdict::Ok(out) => Ok(out),
            Verdict::Err(e) => Err(self.host_paths(e)),
            Verdict::Violation(why) => Err(self.fault(why)),
        }
    }

    /// Let the plugin run the client's destructor, then drop the instance.
    async fn close(&mut self) {
        let deadline = self.sandbox().call_deadline;
        if let Some(mut live) = self.live.take() {
            PluginState::arm(&mut live.store, deadline);
            let drop_it = live.client.resource_drop_async(&mut live.store);
            match tokio::time::timeout(deadline, drop_it).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(plugin = %self.label, "closing the client trapped: {e:#}")
                }
                Err(_) => tracing::warn!(plugin = %self.label, "closing the client timed out"),
            }
        }
    }
}

/// Sort out faults and expected errors; `ok` judges a value.
fn judge<T>(answer: Answer<T>, ok: impl FnOnce(T) -> Result<Out, String>) -> Verdict {
    match answer {
        Err(fault) => Verdict::Violation(fault),
        Ok(Err(e)) => Verdict::Err(convert(e)),
        Ok(Ok(v)) => match ok(v) {
            Ok(out) => Verdict::Ok(out),
            Err(why) => Verdict::Violation(why),
        },
    }
}

/// `asked` names the answer in messages: `get-partition(t/0)`, or
/// `read-partitions' record of t/0` for one of its records.
fn check_get(
    seen: &mut Seen,
    asked: String,
    topic: String,
    partition: u32,
    answer: Answer<wit::PartitionState>,
) -> Verdict {
    let key = (topic, partition);
    let (known, known_epoch) = seen.versions.get(&key).copied().unwrap_or((0, 0));
    if known > 0 && matches!(answer, Ok(Err(PluginError::NotFound(_)))) {
        return Verdict::Violation(format!(
            "{asked} answered not-found after version {known} was seen"
        ));
    }
    // Answers no store could give are the plugin's fault; a record that
    // breaks the rules is the store's content (a hand edit, a restored
    // backup): refused as corrupt, that partition alone, and the plugin
    // instance is kept.
    let s = match answer {
        Err(fault) => return Verdict::Violation(fault),
        Ok(Err(e)) => return Verdict::Err(convert(e)),
        Ok(Ok(s)) => from_wit(s),
    };
    if s.topic != key.0 || s.partition != key.1 {
        return Verdict::Violation(format!(
            "{asked} answered with the state of {}/{}",
            s.topic, s.partition
        ));
    }
    if s.version == 0 {
        return Verdict::Violation(format!(
            "{asked} answered with version 0, which means not created"
        ));
    }
    let corrupt = |why: String| {
        Verdict::Err(MetadataError::Corrupt(format!(
            "{asked} answered with {why}"
        )))
    };
    if s.version < known {
        return corrupt(format!(
            "version {} after version {known} was seen",
            s.version
        ));
    }
    if s.leader_epoch > MAX_LEADER_EPOCH {
        // Elections add 1 (and a restored store's epochs jump by
        // EPOCH_JUMP): no room left for them.
        return corrupt(format!(
            "leader epoch {}, past the largest a partition can reach ({MAX_LEADER_EPOCH})",
            s.leader_epoch
        ));
    }
    if s.version > MAX_VERSION {
        return corrupt(format!(
            "version {}, past the largest a partition can reach ({MAX_VERSION})",
            s.version
        ));
    }
    if let Some(why) = membership_error(&s) {
        // Elections trust these lists: a stranger in the ELR, or a
        // member counted twice, could lead without the committed writes.
        return corrupt(why);
    }
    if s.leader_epoch < known_epoch {
        // Leader epochs only grow: a node would lead, or follow, an
        // epoch whose place in its epoch cache is already taken.
        return corrupt(format!(
            "leader epoch {} after epoch {known_epoch} was seen",
            s.leader_epoch
        ));
    }
    seen.versions.insert(key, (s.version, s.leader_epoch));
    Verdict::Ok(Out::State(s))
}

/// The largest version a stored state may hold: far above what
/// elections reach, like `MAX_LEADER_EPOCH`.
const MAX_VERSION: u64 = u64::MAX >> 1;

/// What is wrong with a state's replicas, ISR, ELR and leader, if
/// anything: the replicas are a non-empty list without repeats; the ISR
/// and ELR hold assigned replicas only, once each, and no replica is in
/// both; a leader is in the ISR (every state a node writes keeps it so,
/// as Kafka does: a leader from outside it would lead without the
/// committed records, and followers would truncate theirs to its log).
fn membership_error(s: &PartitionState) -> Option<String> {
    if s.replicas.is_empty() {
        return Some("no replicas".into());
    }
    if let Some((_, r)) = s
        .replicas
        .iter()
        .enumerate()
        .find(|(i, r)| s.replicas[..*i].contains(r))
    {
        return Some(format!("replica {r} listed twice"));
    }
    if let Some(l) = s.leader.filter(|l| !s.isr.contains(l)) {
        return Some(format!("leader {l} outside the ISR {:?}", s.isr));
    }
    for (name, list) in [("ISR", &s.isr), ("ELR", &s.elr)] {
        if let Some(r) = list.iter().find(|r| !s.replicas.contains(r)) {
            return Some(format!(
                "{name} member {r} that is not a replica ({:?})",
                s.replicas
            ));
        }
        if let Some((_, r)) = list
            .iter()
            .enumerate()
            .find(|(i, r)| list[..*i].contains(r))
        {
            return Some(format!("{name} member {r} listed twice"));
        }
    }
    s.elr
        .iter()
        .find(|r| s.isr.contains(r))
        .map(|r| format!("replica {r} both in the ISR and the ELR"))
}

fn check_cas(
    seen: &mut Seen,
    state: &PartitionState,
    expected: u64,
    answer: Answer<u64>,
) -> Verdict {
    let key = (state.topic.clone(), state.partition);
    let (known, known_epoch) = seen.versions.get(&key).copied().unwrap_or((0, 0));
    judge(answer, |v| {
        let tp = format!("{}/{}", key.0, key.1);
        if v != expected + 1 {
            return Err(format!(
                "compare-and-set({tp}, expected {expected}) returned version {v}, not {}",
                expected + 1
            ));
        }
        if expected < known {
            return Err(format!(
                "compare-and-set({tp}) accepted expected version {expected} after version {known} was seen"
            ));
        }
        seen.versions
            .insert(key, (v, state.leader_epoch.max(known_epoch)));
        Ok(Out::Version(v))
    })
}

fn check_list_partitions(answer: Answer<Vec<wit::TopicPartition>>) -> Verdict {
    judge(answer, |list| {
        let mut list: Vec<(String, u32)> = list
            .into_iter()
            .map(|tp| (tp.topic, tp.partition))
            .collect();
        list.sort();
        if let Some(w) = list.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("list-partitions named {}/{} twice", w[0].0, w[0].1));
        }
        if let Some((t, _)) = list.iter().find(|(t, _)| !valid_topic(t)) {
            return Err(format!(
                "list-partitions named topic {t:?}, which is not a topic name"
            ));
        }
        Ok(Out::Partitions(list))
    })
}

/// Longest page cursor a plugin may hand back.
const MAX_CURSOR: usize = 4096;

/// Pages of one `read-partitions` pass, at most: a plugin whose cursors
/// never end would otherwise hold the connection for good.
const MAX_PAGES: usize = 100_000;

/// A page of `read-partitions`, each record judged as `get-partition`'s
/// answer for it would be: a record that breaks the rules (a version that
/// went back included) is that partition's `corrupt` error; an answer no
/// store could give (another partition's state, not-found after a version
/// was seen, a partition twice) is a fault of the whole call, and then
/// nothing of the page counts as seen.
fn check_read_partitions(seen: &mut Seen, answer: Answer<wit::PartitionPage>) -> Verdict {
    let page = match answer {
        Err(fault) => return Verdict::Violation(fault),
        Ok(Err(e)) => return Verdict::Err(convert(e)),
        Ok(Ok(page)) => page,
    };
    if page.next.as_ref().is_some_and(|n| n.len() > MAX_CURSOR) {
        return Verdict::Violation(format!(
            "read-partitions answered a page cursor over {MAX_CURSOR} bytes"
        ));
    }
    let mut names: Vec<(&str, u32)> = page
        .reads
        .iter()
        .map(|r| (r.topic.as_str(), r.partition))
        .collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Verdict::Violation(format!("read-partitions named {}/{} twice", w[0].0, w[0].1));
    }
    // Partition directories are named after topics: a name that is not
    // one (`../x`) must not get that far.
    if let Some(r) = page.reads.iter().find(|r| !valid_topic(&r.topic)) {
        return Verdict::Violation(format!(
            "read-partitions named topic {:?}, which is not a topic name",
            r.topic
        ));
    }
    // What this page changed in `seen`, to put back if the page is a
    // fault (each partition is on it once): copying all of `seen` for
    // every page cost a pass O(pages x partitions).
    let mut undo = Vec::with_capacity(page.reads.len());
    let mut out = Vec::with_capacity(page.reads.len());
    for r in page.reads {
        let key = (r.topic.clone(), r.partition);
        undo.push((key.clone(), seen.versions.get(&key).copied()));
        let asked = format!("read-partitions' record of {}/{}", key.0, key.1);
        let state = match check_get(seen, asked, key.0, key.1, Ok(r.state)) {
            Verdict::Ok(Out::State(s)) => Ok(s),
            // Created or gone meanwhile: not listed, as list-partitions
            // then get-partition would leave it out.
            Verdict::Err(MetadataError::NotFound(_)) => continue,
            Verdict::Err(e) => Err(e),
            Verdict::Violation(why) => {
                for (key, before) in undo {
                    match before {
                        Some(v) => seen.versions.insert(key, v),
                        None => seen.versions.remove(&key),
                    };
                }
                return Verdict::Violation(why);
            }
            Verdict::Ok(_) => unreachable!("check_get answers with a state"),
        };
        out.push(PartitionRead {
            topic: r.topic,
            partition: r.partition,
            state,
        });
    }
    Verdict::Ok(Out::Page(out, page.next))
}

fn check_register(seen: &mut Seen, id: ReplicaId, answer: Answer<u64>) -> Verdict {
    judge(answer, |epoch| {
        if let Some(&known) = seen.epochs.get(&id)
            && epoch <= known
        {
            return Err(format!(
                "register-broker({id}) assigned epoch {epoch}, not above the earlier {known}"
            ));
        }
        seen.epochs.insert(id, epoch);
        Ok(Out::Version(epoch))
    })
}

/// A claim's answer must be a well-formed id, and the same every time:
/// the store's cluster id never changes.
fn check_claim(seen: &mut Seen, answer: Answer<String>) -> Verdict {
    judge(answer, |id| {
        if let Err(why) = crate::metadata::check_cluster_id(&id) {
            return Err(format!("claim-cluster-id answered a malformed id: {why}"));
        }
        if let Some(known) = &seen.cluster_id
            && *known != id
        {
            return Err(format!(
                "claim-cluster-id answered `{id}` after answering `{known}`"
            ));
        }
        seen.cluster_id = Some(id.clone());
        Ok(Out::ClusterId(id))
    })
}

fn check_list_brokers(seen: &mut Seen, answer: Answer<Vec<wit::Broker>>) -> Verdict {
    judge(answer, |list| {
        let mut list: Vec<Broker> = list
            .into_iter()
            .map(|b| Broker {
                id: b.id,
                address: b.address,
                epoch: b.epoch,
            })
            .collect();
        list.sort_by_key(|b| b.id);
        if let Some(w) = list.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(format!("list-brokers named broker {} twice", w[0].id));
        }
        for b in &list {
            if let Some(&known) = seen.epochs.get(&b.id)
                && b.epoch < known
            {
                return Err(format!(
                    "list-brokers gave broker {} epoch {} after epoch {known} was seen",
                    b.id, b.epoch
                ));
            }
        }
        for b in &list {
            seen.epochs.insert(b.id, b.epoch);
        }
        Ok(Out::Brokers(list))
    })
}

impl PluginMetadata {
    /// Close the connection now and wait until the plugin has released
    /// it. Other clones of this handle then get faults.
    pub async fn close(self) {
        let _ = self.submit(Op::Close).await;
    }

    /// Queue `op` and wait for the answer, at most long enough for a
    /// reconnect plus twice the call deadline: past that the caller gets a
    /// fault even if the metadata task is stuck in a host call.
    fn submit(&self, op: Op) -> impl Future<Output = Result<Out, MetadataError>> + Send + 'static {
        let label = self.label.clone();
        let wait =
            self.sandbox.open_deadline + self.sandbox.call_deadline * 2 + Duration::from_secs(1);
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Call { op, reply }).is_ok();
        async move {
            let gone = || MetadataError::Fault(format!("{label}: the metadata task is gone"));
            if !sent {
                return Err(gone());
            }
            match tokio::time::timeout(wait, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(gone()),
                Err(_) => Err(MetadataError::Fault(format!(
                    "{label}: no answer within {wait:?}: the metadata task is stuck"
                ))),
            }
        }
    }
}

macro_rules! expect_out {
    ($self:ident, $op:expr, $pat:pat => $v:expr) => {{
        let answer = $self.submit($op);
        Box::pin(async move {
            match answer.await? {
                $pat => Ok($v),
                _ => unreachable!("the actor answers each op with its own output kind"),
            }
        })
    }};
}

impl MetadataStore for PluginMetadata {
    fn get_partition<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
    ) -> MetaFuture<'a, PartitionState> {
        expect_out!(self, Op::Get(topic.to_string(), partition), Out::State(s) => s)
    }

    fn compare_and_set(&self, state: PartitionState, expected_version: u64) -> MetaFuture<'_, u64> {
        expect_out!(self, Op::CompareAndSet(state, expected_version), Out::Version(v) => v)
    }

    fn list_partitions(&self) -> MetaFuture<'_, Vec<(String, u32)>> {
        expect_out!(self, Op::ListPartitions, Out::Partitions(l) => l)
    }

    /// Page after page until the plugin says it was the last; a partition
    /// on two pages, or a cursor handed back twice, is a fault.
    fn read_partitions(&self) -> MetaFuture<'_, Vec<PartitionRead>> {
        Box::pin(async move {
            let fault = |why: String| MetadataError::Fault(format!("{}: {why}", self.label));
            let mut all: Vec<PartitionRead> = Vec::new();
            let mut cursors = std::collections::HashSet::new();
            let mut after = None;
            for _ in 0..MAX_PAGES {
                let (page, next) = match self.submit(Op::ReadPartitions(after.take())).await? {
                    Out::Page(page, next) => (page, next),
                    _ => unreachable!("the actor answers each op with its own output kind"),
                };
                all.extend(page);
                match next {
                    None => {
                        all.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
                        if let Some(w) = all.windows(2).find(|w| {
                            (&w[0].topic, w[0].partition) == (&w[1].topic, w[1].partition)
                        }) {
                            return Err(fault(format!(
                                "read-partitions named {}/{} on two pages",
                                w[0].topic, w[0].partition
                            )));
                        }
                        return Ok(all);
                    }
                    Some(cursor) => {
                        if !cursors.insert(cursor.clone()) {
                            return Err(fault(format!(
                                "read-partitions handed back page cursor {cursor:?} twice"
                            )));
                        }
                        after = Some(cursor);
                    }
                }
            }
            Err(fault(format!(
                "read-partitions did not end within {MAX_PAGES} pages"
            )))
        })
    }

    fn register_broker(&self, id: ReplicaId, address: String) -> MetaFuture<'_, u64> {
        expect_out!(self, Op::RegisterBroker(id, address), Out::Version(e) => e)
    }

    fn list_brokers(&self) -> MetaFuture<'_, Vec<Broker>> {
        expect_out!(self, Op::ListBrokers, Out::Brokers(l) => l)
    }

    fn claim_cluster_id(&self, id: String) -> MetaFuture<'_, String> {
        expect_out!(self, Op::ClaimClusterId(id), Out::ClusterId(c) => c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(version: u64, leader_epoch: u32) -> Answer<wit::PartitionState> {
        Ok(Ok(wit::PartitionState {
            topic: "t".into(),
            partition: 0,
            leader: Some(1),
            leader_epoch,
            isr: vec![1, 2],
            elr: vec![],
            replicas: vec![1, 2, 3],
            min_insync: 2,
            version,
        }))
    }

    /// A state's version, or why it was refused as corrupt (a record
    /// that breaks the rules is the store's content, not a plugin fault).
    fn get(seen: &mut Seen, answer: Answer<wit::PartitionState>) -> Result<u64, String> {
        match check_get(seen, "get-partition(t/0)".into(), "t".into(), 0, answer) {
            Verdict::Ok(Out::State(s)) => Ok(s.version),
            Verdict::Err(MetadataError::Corrupt(why)) => Err(why),
            Verdict::Violation(why) => Err(format!("a plugin fault, not a corrupt record: {why}")),
            _ => Err("neither a state nor a corrupt record".into()),
        }
    }

    fn entry(partition: u32, version: u64) -> wit::PartitionRead {
        let Ok(Ok(mut s)) = state(version, 1) else {
            unreachable!("a state")
        };
        s.partition = partition;
        wit::PartitionRead {
            topic: "t".into(),
            partition,
            state: Ok(s),
        }
    }

    /// Each record of `read-partitions` is judged as `get-partition`'s
    /// answer for it would be: a corrupt one is that partition's error,
    /// an answer no store could give is a fault of the whole call.
    #[test]
    fn read_partitions_is_checked_record_by_record() {
        let read = |seen: &mut Seen, list: Vec<wit::PartitionRead>| {
            let page = wit::PartitionPage {
                reads: list,
                next: None,
            };
            match check_read_partitions(seen, Ok(Ok(page))) {
                Verdict::Ok(Out::Page(r, _)) => Ok(r
                    .into_iter()
                    .map(|r| (r.partition, r.state.map(|s| s.version)))
                    .collect::<Vec<_>>()),
                Verdict::Violation(why) => Err(why),
                _ => Err("neither reads nor a fault".into()),
            }
        };
        let mut seen = Seen::default();
        let mut corrupt = entry(2, 1);
        corrupt.state = Err(PluginError::Corrupt("bad json".into()));
        let mut gone = entry(3, 1);
        gone.state = Err(PluginError::NotFound("gone".into()));
        // One corrupt, one gone meanwhile (left out).
        let got = read(&mut seen, vec![entry(1, 4), corrupt, entry(0, 2), gone]);
        assert_eq!(
            got,
            Ok(vec![
                (1, Ok(4)),
                (2, Err(MetadataError::Corrupt("bad json".into()))),
                (0, Ok(2)),
            ])
        );
        // What was seen counts: a version that went back is that record's
        // error (the store went back); a partition named twice, or a record
        // of another partition, is a fault.
        let back = read(&mut seen, vec![entry(1, 3), entry(0, 2)]);
        assert!(
            matches!(&back, Ok(r) if r.len() == 2
                && matches!(&r[0], (1, Err(MetadataError::Corrupt(w)))
                    if w == "read-partitions' record of t/1 answered with version 3 after version 4 was seen")
                && r[1] == (0, Ok(2))),
            "{back:?}"
        );
        let twice = read(&mut Seen::default(), vec![entry(0, 1), entry(0, 1)]);
        assert!(twice.is_err_and(|w| w.contains("twice")));
        let mut other = entry(0, 1);
        other.partition = 5;
        let why = read(&mut Seen::default(), vec![other.clone()]);
        assert_eq!(
            why,
            Err("read-partitions' record of t/5 answered with the state of t/0".into())
        );
        // A page that is a fault leaves nothing of it seen: version 9
        // before the bad record does not make a later 5 look gone back.
        let mut seen = Seen::default();
        assert!(read(&mut seen, vec![entry(0, 9), other]).is_err());
        assert_eq!(read(&mut seen, vec![entry(0, 5)]), Ok(vec![(0, Ok(5))]));
        // A topic name that is not one would name a directory outside
        // the node's data directory.
        let mut escape = entry(0, 1);
        escape.topic = "../../x".into();
        if let Ok(s) = escape.state.as_mut() {
            s.topic = "../../x".into();
        }
        let why = read(&mut Seen::default(), vec![escape]);
        assert!(why.is_err_and(|w| w.contains("not a topic name")));
    }

    #[test]
    fn the_guests_paths_are_named_as_the_host_knows_them() {
        let dir = Path::new("/srv/c/metadata/");
        assert_eq!(
            host_paths_in("/data/partitions/t/0/1.json: bad".into(), dir),
            "/srv/c/metadata/partitions/t/0/1.json: bad"
        );
        assert_eq!(
            host_paths_in("create /data/partitions: (os error 30)".into(), dir),
            "create /srv/c/metadata/partitions: (os error 30)"
        );
        // Not at a path's start: left alone.
        assert_eq!(host_paths_in("key /x/data/y".into(), dir), "key /x/data/y");
    }

    #[test]
    fn a_partitions_versions_and_leader_epochs_never_go_back() {
        let mut seen = Seen::default();
        assert_eq!(get(&mut seen, state(6, 5)), Ok(6));
        // A new version of the same epoch (an ISR change) is fine.
        assert_eq!(get(&mut seen, state(7, 5)), Ok(7));
        let why = get(&mut seen, state(5, 5)).expect_err("version went back");
        assert!(why.contains("version 5 after version 7"), "{why}");
        let why = get(&mut seen, state(8, 3)).expect_err("epoch went back");
        assert!(why.contains("leader epoch 3 after epoch 5"), "{why}");
        assert_eq!(get(&mut seen, state(8, 6)), Ok(8));
    }

    #[test]
    fn a_stores_cluster_id_must_be_well_formed_and_never_change() {
        let mut seen = Seen::default();
        let claim = |seen: &mut Seen, id: &str| match check_claim(seen, Ok(Ok(id.to_string()))) {
            Verdict::Ok(Out::ClusterId(c)) => Ok(c),
            Verdict::Violation(why) => Err(why),
            _ => Err("neither an id nor a violation".into()),
        };
        assert_eq!(claim(&mut seen, "abc"), Ok("abc".to_string()));
        assert_eq!(claim(&mut seen, "abc"), Ok("abc".to_string()));
        let why = claim(&mut seen, "abd").expect_err("changed");
        assert!(why.contains("`abd` after answering `abc`"), "{why}");
        let why = claim(&mut Seen::default(), "").expect_err("empty");
        assert!(why.contains("malformed"), "{why}");
        let why = claim(&mut Seen::default(), "a b").expect_err("space");
        assert!(why.contains("malformed"), "{why}");
    }

    #[test]
    fn isr_and_elr_members_must_be_distinct_replicas() {
        let mut seen = Seen::default();
        let with = |isr: Vec<u32>, elr: Vec<u32>| {
            let mut a = state(3, 1);
            if let Ok(Ok(s)) = &mut a {
                s.isr = isr;
                s.elr = elr;
            }
            a
        };
        assert_eq!(get(&mut seen, with(vec![1], vec![2, 3])), Ok(3));
        for (isr, elr, expect) in [
            (vec![1], vec![4], "ELR member 4 that is not a replica"),
            (vec![1, 7], vec![], "ISR member 7 that is not a replica"),
            (vec![1], vec![2, 2], "ELR member 2 listed twice"),
            (vec![1, 2], vec![2], "replica 2 both in the ISR and the ELR"),
        ] {
            let why = get(&mut seen, with(isr, elr)).expect_err(expect);
            assert!(why.contains(expect), "{why}");
        }
    }

    /// A leader outside the ISR, or replicas listed twice or not at all,
    /// are refused like any record that breaks the rules; so are epochs
    /// and versions with no room left to grow (an election adds 1 to
    /// them, which overflowed).
    #[test]
    fn leaders_replicas_and_counters_must_be_possible() {
        let mut seen = Seen::default();
        let edited = |edit: &dyn Fn(&mut wit::PartitionState)| {
            let mut a = state(3, 1);
            if let Ok(Ok(s)) = &mut a {
                edit(s);
            }
            a
        };
        // Leaderless with an empty ISR is a state elections write.
        let leaderless = edited(&|s| {
            s.leader = None;
            s.isr = vec![];
            s.elr = vec![1, 2];
        });
        assert_eq!(get(&mut seen, leaderless), Ok(3));
        type Edit<'a> = &'a dyn Fn(&mut wit::PartitionState);
        let cases: [(Edit, &str); 6] = [
            (&|s| s.leader = Some(3), "leader 3 outside the ISR [1, 2]"),
            (&|s| s.leader = Some(9), "leader 9 outside the ISR"),
            (&|s| s.replicas = vec![1, 2, 2], "replica 2 listed twice"),
            (
                &|s| {
                    s.replicas = vec![];
                    s.isr = vec![];
                    s.leader = None;
                },
                "no replicas",
            ),
            (&|s| s.leader_epoch = u32::MAX, "past the largest"),
            (&|s| s.version = u64::MAX, "past the largest"),
        ];
        for (edit, expect) in cases {
            let why = get(&mut Seen::default(), edited(edit)).expect_err(expect);
            assert!(why.contains(expect), "{why}");
        }
    }
}
