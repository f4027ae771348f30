//! The metadata conformance suite: what every metadata plugin must do
//! (`wit/metadata.wit`), run against real connections. Tests run it for
//! the `file` and `etcd` plugins; users run it as `replicator plugin check
//! --metadata <name|path.wasm>`.
//!
//! Each case gets its own directory (the `/data` of its connections) and
//! names its topics and brokers after a tag unique to the run, so the
//! suite also works in a namespace that already holds data, and checks of
//! listings only look at what the case itself created. Separate
//! `connect`s are separate plugin instances, as separate node processes
//! would have; races run between them.
//!
//! One case leaves a trace no tag can scope: `cluster-id-is-claimed-once`
//! claims the store's cluster id, which stays. Against a store that holds
//! none yet it stores one of the run's ids, and a cluster started there
//! afterwards would be refused. `replicator plugin check` therefore runs
//! networked stores under a fresh key prefix unless told otherwise.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{CaseResult, Report};
use crate::metadata::{MetadataError, MetadataStore, PartitionState};
use crate::plugin::{MetadataPlugin, PluginMetadata};

/// The plugin under test and the settings every connection gets.
#[derive(Clone)]
pub struct MetadataSubject {
    pub plugin: MetadataPlugin,
    pub config: Vec<(String, String)>,
}

impl MetadataSubject {
    pub fn new(plugin: MetadataPlugin, config: Vec<(String, String)>) -> Self {
        MetadataSubject { plugin, config }
    }

    /// A new connection (a new plugin instance) with `dir` as `/data`.
    pub async fn connect(&self, dir: &Path) -> Result<PluginMetadata, MetadataError> {
        self.plugin.connect(dir, self.config.clone()).await
    }
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct MetadataOptions {
    /// Rounds of the compare-and-set and registration races.
    pub race_rounds: u32,
    /// Connections racing in each round (at least 2).
    pub racers: u32,
    /// Only run cases whose name contains this.
    pub filter: Option<String>,
    /// Every case's store starts empty (a fresh directory, a fresh key
    /// prefix): the cluster-id case then also checks that the id stored
    /// is one of those claimed. Off when the store may hold an id already.
    pub fresh_store: bool,
}

impl Default for MetadataOptions {
    fn default() -> Self {
        MetadataOptions {
            race_rounds: 20,
            racers: 4,
            filter: None,
            fresh_store: true,
        }
    }
}

/// What one case works with: the subject, its directory, the options and
/// the run's tag.
struct Ctx<'a> {
    subject: &'a MetadataSubject,
    dir: &'a Path,
    options: &'a MetadataOptions,
    tag: String,
    /// First broker id of this case; ids from here on belong to it.
    broker_base: u32,
}

impl Ctx<'_> {
    async fn connect(&self) -> Result<PluginMetadata, String> {
        self.subject
            .connect(self.dir)
            .await
            .map_err(|e| format!("connect: {e}"))
    }

    async fn connections(&self, n: u32) -> Result<Vec<PluginMetadata>, String> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.connect().await?);
        }
        Ok(out)
    }

    /// A topic name unique to this run and case.
    fn topic(&self, what: &str) -> String {
        format!("{}-{what}", self.tag)
    }
}

type CaseFn = for<'a> fn(&'a Ctx<'a>) -> Pin<Box<dyn Future<Output = CaseResult> + Send + 'a>>;

macro_rules! case {
    ($name:literal, $f:path) => {
        ($name, |c| Box::pin($f(c)) as _)
    };
}

const ALL: &[(&str, CaseFn)] = &[
    case!("get-missing-is-not-found", get_missing),
    case!("create-with-expected-zero", create),
    case!("stale-version-is-a-conflict", stale_version),
    case!("versions-increase-by-one", versions_monotone),
    case!("cas-race-has-one-winner", cas_race),
    case!("list-partitions-is-exact", list_partitions),
    case!("read-partitions-is-list-then-get", read_partitions),
    case!("broker-epochs-increase", broker_epochs),
    case!("broker-registration-race", broker_race),
    case!("invalid-input-is-refused", invalid_input),
    case!("cluster-id-is-claimed-once", cluster_id),
];

/// The names of the cases, in the order they run.
pub fn case_names() -> impl Iterator<Item = &'static str> {
    ALL.iter().map(|(n, _)| *n)
}

/// Run every case against `subject`, each in a fresh directory under
/// `scratch`; `progress` is told each case's name before it runs.
pub async fn run(
    subject: &MetadataSubject,
    scratch: &Path,
    options: &MetadataOptions,
    mut progress: impl FnMut(&str),
) -> Report {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // Mixed with the process id so two runs started in the same
    // nanosecond do not share names.
    let seed = (nanos as u64) ^ (u64::from(std::process::id()) << 40);
    let mut report = Report::default();
    for (i, (name, case)) in ALL.iter().enumerate() {
        if options.filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        progress(name);
        let dir = scratch.join(name);
        let ctx = Ctx {
            subject,
            dir: &dir,
            options,
            tag: format!("mc{seed:016x}-{i}"),
            // 1000 ids per case, in a range picked by the seed.
            broker_base: 1_000_000 + ((seed % 1_000_000) as u32) * 1000 + i as u32 * 100,
        };
        report
            .cases
            .push(super::run_case(name, &dir, case(&ctx)).await);
    }
    report
}

fn state(topic: &str, partition: u32, leader: u32, leader_epoch: u32) -> PartitionState {
    // Odd epochs carry an ELR (KIP-966), so the cases that compare what
    // was stored with what comes back check that it round-trips too.
    let (isr, elr) = if leader_epoch % 2 == 1 {
        (vec![leader], (1..=3).filter(|r| *r != leader).collect())
    } else {
        (vec![1, 2, 3], vec![])
    };
    PartitionState {
        topic: topic.into(),
        partition,
        leader: Some(leader),
        leader_epoch,
        isr,
        elr,
        replicas: vec![1, 2, 3],
        min_insync: 2,
        version: 0,
    }
}

/// `s` as the store should hold it at `version`.
fn at(mut s: PartitionState, version: u64) -> PartitionState {
    s.version = version;
    s
}

async fn get_missing(c: &Ctx<'_>) -> CaseResult {
    let m = c.connect().await?;
    let r = m.get_partition(&c.topic("missing"), 0).await;
    ensure!(
        matches!(r, Err(MetadataError::NotFound(_))),
        "get of a partition never created: expected not-found, got {r:?}"
    );
    Ok(None)
}

async fn create(c: &Ctx<'_>) -> CaseResult {
    let (a, b) = (c.connect().await?, c.connect().await?);
    let t = c.topic("create");
    let s = state(&t, 0, 1, 0);
    let r = a.compare_and_set(s.clone(), 0).await;
    ensure!(
        r == Ok(1),
        "create with expected version 0: expected Ok(1), got {r:?}"
    );
    // Another connection sees exactly what was stored.
    let got = b.get_partition(&t, 0).await;
    ensure!(
        got.as_ref() == Ok(&at(s.clone(), 1)),
        "get after create: expected {:?}, got {got:?}",
        at(s, 1)
    );
    let again = b.compare_and_set(state(&t, 0, 2, 0), 0).await;
    ensure!(
        matches!(again, Err(MetadataError::Conflict(_))),
        "creating an existing partition: expected conflict, got {again:?}"
    );
    // A different partition of the same topic is a different key.
    let other = b.compare_and_set(state(&t, 1, 2, 0), 0).await;
    ensure!(
        other == Ok(1),
        "create of partition 1: expected Ok(1), got {other:?}"
    );
    Ok(None)
}

async fn stale_version(c: &Ctx<'_>) -> CaseResult {
    let (a, b) = (c.connect().await?, c.connect().await?);
    let t = c.topic("stale");
    ensure!(
        a.compare_and_set(state(&t, 0, 1, 0), 0).await == Ok(1),
        "create failed"
    );
    let v2 = state(&t, 0, 2, 1);
    let r = b.compare_and_set(v2.clone(), 1).await;
    ensure!(r == Ok(2), "update 1 -> 2: got {r:?}");
    for (expected, what) in [(1, "stale"), (0, "zero"), (7, "ahead of the store")] {
        let r = a.compare_and_set(state(&t, 0, 3, 2), expected).await;
        ensure!(
            matches!(r, Err(MetadataError::Conflict(_))),
            "expected version {expected} ({what}) with version 2 stored: expected conflict, got {r:?}"
        );
    }
    let got = a.get_partition(&t, 0).await;
    ensure!(
        got.as_ref() == Ok(&at(v2.clone(), 2)),
        "a refused update changed the state: expected {:?}, got {got:?}",
        at(v2, 2)
    );
    let missing = c.topic("stale-missing");
    let r = a.compare_and_set(state(&missing, 0, 1, 0), 3).await;
    ensure!(
        matches!(r, Err(MetadataError::Conflict(_))),
        "updating a partition that does not exist: expected conflict, got {r:?}"
    );
    let r = a.get_partition(&missing, 0).await;
    ensure!(
        matches!(r, Err(MetadataError::NotFound(_))),
        "a refused update created the partition: {r:?}"
    );
    Ok(None)
}

async fn versions_monotone(c: &Ctx<'_>) -> CaseResult {
    let conns = c.connections(2).await?;
    let t = c.topic("monotone");
    let mut expected = 0u64;
    for step in 0..12u32 {
        // Alternate connections: each must see the other's writes.
        let m = &conns[step as usize % 2];
        let s = state(&t, 5, 1 + step % 3, step);
        let r = m.compare_and_set(s.clone(), expected).await;
        ensure!(
            r == Ok(expected + 1),
            "step {step}: expected version {}, got {r:?}",
            expected + 1
        );
        expected += 1;
        let got = conns[(step as usize + 1) % 2].get_partition(&t, 5).await;
        ensure!(
            got.as_ref() == Ok(&at(s.clone(), expected)),
            "step {step}: the other connection read {got:?}"
        );
    }
    Ok(None)
}

async fn cas_race(c: &Ctx<'_>) -> CaseResult {
    let racers = c.options.racers.max(2);
    let conns = c.connections(racers).await?;
    let t = c.topic("race");
    ensure!(
        conns[0].compare_and_set(state(&t, 0, 1, 0), 0).await == Ok(1),
        "create failed"
    );
    let mut version = 1u64;
    for round in 0..c.options.race_rounds {
        // Every racer writes a state tagged with its index, expecting the
        // same version.
        let attempts = conns.iter().enumerate().map(|(i, m)| {
            let s = state(&t, 0, 1, round * 1000 + i as u32);
            async move { (i, m.compare_and_set(s, version).await) }
        });
        let results = futures_util::future::join_all(attempts).await;
        let winners: Vec<usize> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(i, _)| *i)
            .collect();
        ensure!(
            winners.len() == 1,
            "round {round}: {} of {racers} writers with expected version {version} won: {results:?}",
            winners.len()
        );
        for (i, r) in &results {
            ensure!(
                matches!(r, Ok(v) if *v == version + 1)
                    || matches!(r, Err(MetadataError::Conflict(_))),
                "round {round}: writer {i}: expected Ok({}) or conflict, got {r:?}",
                version + 1
            );
        }
        version += 1;
        let got = conns[0].get_partition(&t, 0).await;
        let want = at(state(&t, 0, 1, round * 1000 + winners[0] as u32), version);
        ensure!(
            got.as_ref() == Ok(&want),
            "round {round}: stored {got:?}, but the winner wrote {want:?}"
        );
    }
    Ok(None)
}

async fn list_partitions(c: &Ctx<'_>) -> CaseResult {
    let (a, b) = (c.connect().await?, c.connect().await?);
    let mut created = BTreeSet::new();
    for (topic, partitions) in [("list-a", 3u32), ("list-b", 1), ("list-b.c_d", 2)] {
        let t = c.topic(topic);
        for p in 0..partitions {
            let r = a.compare_and_set(state(&t, p * 7, 1, 0), 0).await;
            ensure!(r == Ok(1), "create {t}/{}: {r:?}", p * 7);
            created.insert((t.clone(), p * 7));
        }
    }
    // Updates and refused writes add nothing.
    let first = created.first().cloned().ok_or("nothing created")?;
    ensure!(
        a.compare_and_set(state(&first.0, first.1, 2, 1), 1).await == Ok(2),
        "update of {first:?} failed"
    );
    let refused = c.topic("list-refused");
    let _ = a.compare_and_set(state(&refused, 0, 1, 0), 9).await;
    let listed = b
        .list_partitions()
        .await
        .map_err(|e| format!("list-partitions: {e}"))?;
    let ours: Vec<(String, u32)> = listed
        .into_iter()
        .filter(|(t, _)| t.starts_with(&c.tag))
        .collect();
    let unique: BTreeSet<_> = ours.iter().cloned().collect();
    ensure!(
        unique.len() == ours.len(),
        "list-partitions repeats entries: {ours:?}"
    );
    ensure!(
        unique == created,
        "list-partitions: expected exactly {created:?}, got {unique:?}"
    );
    Ok(None)
}

/// `read-partitions` answers what `list-partitions` and then
/// `get-partition` on each answer, each partition once, newest versions
/// included, sorted; another connection sees the same.
async fn read_partitions(c: &Ctx<'_>) -> CaseResult {
    let (a, b) = (c.connect().await?, c.connect().await?);
    for (topic, partitions) in [("read-b", 2u32), ("read-a", 12)] {
        let t = c.topic(topic);
        for p in 0..partitions {
            let r = a.compare_and_set(state(&t, p, 1, 0), 0).await;
            ensure!(r == Ok(1), "create {t}/{p}: {r:?}");
        }
        // A newer version of one of them.
        let r = a.compare_and_set(state(&t, 1, 2, 1), 1).await;
        ensure!(r == Ok(2), "update {t}/1: {r:?}");
    }
    let ours = |t: &str| t.starts_with(&c.tag);
    let read: Vec<(String, u32, PartitionState)> = b
        .read_partitions()
        .await
        .map_err(|e| format!("read-partitions: {e}"))?
        .into_iter()
        .filter(|r| ours(&r.topic))
        .map(|r| match r.state {
            Ok(s) => Ok((r.topic, r.partition, s)),
            Err(e) => Err(format!("read-partitions: {}/{}: {e}", r.topic, r.partition)),
        })
        .collect::<Result<_, _>>()?;
    let mut want = Vec::new();
    for (t, p) in b
        .list_partitions()
        .await
        .map_err(|e| format!("list-partitions: {e}"))?
    {
        if ours(&t) {
            let s = b
                .get_partition(&t, p)
                .await
                .map_err(|e| format!("get-partition({t}/{p}): {e}"))?;
            want.push((t, p, s));
        }
    }
    ensure!(
        want.len() == 14,
        "list-partitions then get-partition found {} of the 14 partitions",
        want.len()
    );
    ensure!(
        read == want,
        "read-partitions answered {read:?}, where list-partitions then get-partition answer {want:?}"
    );
    Ok(None)
}

async fn broker_epochs(c: &Ctx<'_>) -> CaseResult {
    let (a, b) = (c.connect().await?, c.connect().await?);
    let id = c.broker_base;
    let other = c.broker_base + 1;
    let mut last = 0u64;
    for (i, m) in [&a, &b, &a, &b, &b].into_iter().enumerate() {
        let addr = format!("10.0.0.{i}:7101");
        let e = m
            .register_broker(id, addr)
            .await
            .map_err(|e| format!("register {id}: {e}"))?;
        ensure!(e > last, "registration {i}: epoch {e} is not above {last}");
        last = e;
    }
    let e_other = a
        .register_broker(other, "10.0.1.1:7101".into())
        .await
        .map_err(|e| format!("register {other}: {e}"))?;
    ensure!(e_other >= 1, "epoch of a new broker is {e_other}");
    let brokers = b
        .list_brokers()
        .await
        .map_err(|e| format!("list-brokers: {e}"))?;
    let mine: Vec<_> = brokers
        .iter()
        .filter(|x| x.id == id || x.id == other)
        .collect();
    ensure!(
        mine.len() == 2,
        "list-brokers: expected brokers {id} and {other} once each, got {mine:?}"
    );
    let latest = mine.iter().find(|x| x.id == id).ok_or("broker missing")?;
    ensure!(
        latest.epoch == last && latest.address == "10.0.0.4:7101",
        "list-brokers: expected broker {id} at 10.0.0.4:7101 epoch {last}, got {latest:?}"
    );
    let o = mine
        .iter()
        .find(|x| x.id == other)
        .ok_or("broker missing")?;
    ensure!(
        o.epoch == e_other && o.address == "10.0.1.1:7101",
        "list-brokers: expected broker {other} at 10.0.1.1:7101 epoch {e_other}, got {o:?}"
    );
    Ok(None)
}

async fn broker_race(c: &Ctx<'_>) -> CaseResult {
    let racers = c.options.racers.max(2);
    let conns = c.connections(racers).await?;
    let id = c.broker_base;
    let mut seen = BTreeSet::new();
    let mut last_per_conn = vec![0u64; conns.len()];
    for round in 0..c.options.race_rounds.div_ceil(2).max(1) {
        let attempts = conns.iter().enumerate().map(|(i, m)| {
            let addr = format!("10.1.{round}.{i}:7101");
            async move { (i, m.register_broker(id, addr).await) }
        });
        for (i, r) in futures_util::future::join_all(attempts).await {
            let e = r.map_err(|e| format!("round {round}: racer {i} failed to register: {e}"))?;
            ensure!(
                seen.insert(e),
                "round {round}: epoch {e} was handed out twice"
            );
            ensure!(
                e > last_per_conn[i],
                "round {round}: racer {i} got epoch {e} after {}",
                last_per_conn[i]
            );
            last_per_conn[i] = e;
        }
    }
    let max = seen.last().copied().unwrap_or(0);
    let listed = conns[0]
        .list_brokers()
        .await
        .map_err(|e| format!("list-brokers: {e}"))?;
    let b = listed
        .iter()
        .find(|b| b.id == id)
        .ok_or_else(|| format!("list-brokers lacks broker {id}"))?;
    ensure!(
        b.epoch == max,
        "list-brokers: broker {id} has epoch {}, the latest registration got {max}",
        b.epoch
    );
    // A registration after the race is above every epoch handed out.
    let after = conns[1]
        .register_broker(id, "10.2.0.1:7101".into())
        .await
        .map_err(|e| format!("register after the race: {e}"))?;
    ensure!(
        after > max,
        "epoch {after} after the race is not above {max}"
    );
    Ok(None)
}

async fn invalid_input(c: &Ctx<'_>) -> CaseResult {
    let m = c.connect().await?;
    let t = c.topic("invalid");
    let mut bad = Vec::new();
    bad.push(("an empty topic", state("", 0, 1, 0)));
    bad.push(("a topic with `/`", state(&format!("{t}/x"), 0, 1, 0)));
    bad.push((
        "a topic of 250 characters",
        state(&"x".repeat(250), 0, 1, 0),
    ));
    let mut s = state(&t, 0, 9, 0);
    s.isr = vec![1];
    bad.push(("a leader that is not a replica", s));
    let mut s = state(&t, 0, 1, 0);
    s.replicas = Vec::new();
    s.isr = Vec::new();
    s.leader = None;
    bad.push(("no replicas", s));
    let mut s = state(&t, 0, 1, 0);
    s.replicas = vec![1, 2, 2];
    bad.push(("a replica listed twice", s));
    let mut s = state(&t, 0, 1, 0);
    s.isr = vec![1, 4];
    bad.push(("an ISR member that is not a replica", s));
    for (what, s) in bad {
        let r = m.compare_and_set(s, 0).await;
        ensure!(
            matches!(r, Err(MetadataError::InvalidInput(_))),
            "compare-and-set of {what}: expected invalid-input, got {r:?}"
        );
    }
    let r = m.get_partition(&t, 0).await;
    ensure!(
        matches!(r, Err(MetadataError::NotFound(_))),
        "a refused state was stored: {r:?}"
    );
    let r = m.get_partition("", 0).await;
    ensure!(
        matches!(
            r,
            Err(MetadataError::InvalidInput(_) | MetadataError::NotFound(_))
        ),
        "get of an empty topic: expected invalid-input or not-found, got {r:?}"
    );
    for (what, addr) in [
        ("an empty address", String::new()),
        ("a newline", "a\nb:1".into()),
    ] {
        let r = m.register_broker(c.broker_base, addr).await;
        ensure!(
            matches!(r, Err(MetadataError::InvalidInput(_))),
            "register-broker with {what}: expected invalid-input, got {r:?}"
        );
    }
    let listed = m
        .list_brokers()
        .await
        .map_err(|e| format!("list-brokers: {e}"))?;
    ensure!(
        !listed.iter().any(|b| b.id == c.broker_base),
        "a refused registration was stored: {listed:?}"
    );
    Ok(None)
}

/// Racing first claims with different ids all get the same answer, one of
/// theirs unless the store already held an id; later claims, with any id,
/// get it too; malformed ids are refused.
async fn cluster_id(c: &Ctx<'_>) -> CaseResult {
    let racers = c.options.racers.max(2);
    let conns = c.connections(racers).await?;
    let ours: Vec<String> = (0..racers).map(|i| format!("{}-c{i}", c.tag)).collect();
    let claims = conns
        .iter()
        .zip(&ours)
        .map(|(m, id)| m.claim_cluster_id(id.clone()));
    let mut answers = Vec::new();
    for (i, r) in futures_util::future::join_all(claims)
        .await
        .into_iter()
        .enumerate()
    {
        answers.push(r.map_err(|e| format!("racer {i}'s claim failed: {e}"))?);
    }
    let stored = answers[0].clone();
    ensure!(
        answers.iter().all(|a| *a == stored),
        "racing claims got different cluster ids: {answers:?}"
    );
    ensure!(
        !c.options.fresh_store || ours.contains(&stored),
        "a store without a cluster id answered `{stored}`, which nobody claimed (claimed: {ours:?})"
    );
    for (i, m) in conns.iter().enumerate() {
        let again = m
            .claim_cluster_id(format!("{}-late{i}", c.tag))
            .await
            .map_err(|e| format!("a later claim failed: {e}"))?;
        ensure!(
            again == stored,
            "a later claim got `{again}`, the store answered `{stored}` before"
        );
    }
    let fresh = c.connect().await?;
    let again = fresh
        .claim_cluster_id(stored.clone())
        .await
        .map_err(|e| format!("the winner's claim on a new connection failed: {e}"))?;
    ensure!(
        again == stored,
        "a new connection got `{again}`, not `{stored}`"
    );
    for (what, id) in [
        ("an empty id", String::new()),
        ("an id with `/`", "a/b".to_string()),
        ("an id of 65 characters", "x".repeat(65)),
    ] {
        let r = fresh.claim_cluster_id(id).await;
        ensure!(
            matches!(r, Err(MetadataError::InvalidInput(_))),
            "claiming {what}: expected invalid-input, got {r:?}"
        );
    }
    Ok(None)
}
