//! Failover under fire, with real node processes: the leader of a
//! replicated partition is killed (SIGKILL), frozen (SIGSTOP past the
//! failure timeout) or cut off from the network (a private network
//! namespace with nftables drops) while producers write with acks=all and
//! a consumer reads. Afterwards every acknowledged write must be on every
//! replica at its offset, no offset may hold two values and reads must
//! never go backwards (the Jepsen-style checker in `replicator::history`).
//! Failover time (the fault to the first acks=all success on the new
//! leader) is printed, with p50/p99 over the rounds.
//!
//! `REPLICATOR_CHAOS_ROUNDS` sets the rounds of the kill test (default
//! 10); the README's long run uses more.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use replicator::batch::Record;
use replicator::client::{Client, ClientError};
use replicator::core::Acks;
use replicator::history::{Ack, Final, History, Read};
use support::Cluster;

const TOPIC: &str = "chaos";

/// One chaos test at a time: three clusters at once on two cores would
/// measure the machine, not the failover.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the load saw: acknowledged writes with the time they were
/// acknowledged, and the consumer's reads.
#[derive(Default)]
struct Observed {
    /// Each acknowledged write, when it was sent, when it was
    /// acknowledged, and which node acknowledged it.
    acks: Mutex<Vec<(Ack, Instant, Instant, u32)>>,
    reads: Mutex<Vec<Read>>,
    ambiguous: AtomicU64,
    refused: AtomicU64,
    read_error: Mutex<Option<String>>,
}

struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Observed>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(rt: &tokio::runtime::Runtime, client: Arc<Client>, producers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Observed::default());
        let mut tasks = Vec::new();
        for p in 0..producers {
            let (client, stop, seen) = (client.clone(), stop.clone(), seen.clone());
            tasks.push(rt.spawn(async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let value = Bytes::from(format!("p{p}-{seq}"));
                    let rec = Record {
                        key: None,
                        value: value.clone(),
                        timestamp: 0,
                        headers: Vec::new(),
                    };
                    let sent = Instant::now();
                    match client
                        .produce_at(TOPIC, 0, &[rec], Acks::All, Duration::from_secs(5))
                        .await
                    {
                        Ok((offset, node)) => seen.acks.lock().unwrap().push((
                            Ack {
                                partition: 0,
                                offset,
                                value,
                            },
                            sent,
                            Instant::now(),
                            node,
                        )),
                        Err(ClientError::Ambiguous { .. }) => {
                            seen.ambiguous.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            seen.refused.fetch_add(1, Ordering::Relaxed);
                            // Nothing was written; do not spin while the
                            // partition has no leader.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }));
        }
        // One consumer following the leader from where it left off.
        let (c, stop2, seen2) = (client.clone(), stop.clone(), seen.clone());
        tasks.push(rt.spawn(async move {
            let mut next = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                // A consumer gives up on a silent node quickly and asks
                // for the leader again.
                let got = tokio::time::timeout(Duration::from_secs(1), async {
                    let leader = c.leader_of(TOPIC, 0).await?;
                    c.read(leader, TOPIC, 0, next, 1 << 20).await
                })
                .await
                .unwrap_or_else(|_| Err(ClientError::NoNode("read timed out".into())));
                if let Err(e) = &got {
                    *seen2.read_error.lock().unwrap() = Some(e.to_string());
                }
                if let Ok(batch) = got {
                    let records: Vec<(u64, Bytes)> = batch
                        .records
                        .into_iter()
                        .filter(|r| r.offset >= next)
                        .map(|r| (r.offset, r.record.value))
                        .collect();
                    if let Some((last, _)) = records.last() {
                        next = last + 1;
                        seen2.reads.lock().unwrap().push(Read {
                            reader: "consumer".into(),
                            partition: 0,
                            records,
                        });
                    }
                }
                // A consumer's poll interval.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
        Load { stop, seen, tasks }
    }

    fn acked(&self) -> usize {
        self.seen.acks.lock().unwrap().len()
    }

    /// The first acknowledgement after `t` by another node than `old`
    /// (an answer already on its way from the old leader does not count).
    fn first_ack_after(&self, t: Instant, old: u32) -> Option<Instant> {
        self.seen
            .acks
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, at, node)| *at > t && *node != old)
            .map(|(_, _, at, _)| *at)
            .min()
    }

    /// [`Load::first_ack_after`], waiting for it (bounded).
    fn wait_first_ack_after(&self, t: Instant, old: u32, fault: &str) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(at) = self.first_ack_after(t, old) {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "no acks=all success within 10 s of {fault}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn wait_acks(&self, more_than: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.acked() <= more_than {
            assert!(Instant::now() < deadline, "no acknowledgements: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(self, rt: &tokio::runtime::Runtime) -> Arc<Observed> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = rt.block_on(t);
        }
        self.seen
    }
}

fn client(rt: &tokio::runtime::Runtime, c: &Cluster) -> Arc<Client> {
    let _in_runtime = rt.enter();
    c.library_client()
}

fn setup(rt: &tokio::runtime::Runtime, c: &mut Cluster) -> Arc<Client> {
    c.start_all();
    c.wait_up();
    let client = client(rt, c);
    rt.block_on(client.create_topic(TOPIC, 1, 3, Some(2)))
        .expect("create topic");
    wait_isr(rt, &client, 3);
    client
}

/// Until the partition's leader reports an ISR of `n`; returns the leader.
fn wait_isr(rt: &tokio::runtime::Runtime, client: &Client, n: usize) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::from("no answer");
    loop {
        let got = rt.block_on(async {
            let leader = match client.leader_of(TOPIC, 0).await {
                Ok(l) => l,
                Err(e) => {
                    last = format!("leader_of: {e}");
                    return None;
                }
            };
            let st = match client.status(leader).await {
                Ok(s) => s,
                Err(e) => {
                    last = format!("status of leader {leader}: {e}");
                    return None;
                }
            };
            let p = st.into_iter().find(|s| s.topic == TOPIC)?;
            last = format!("leader {leader} reports {p:?}");
            (p.role == "leader" && p.isr.len() == n).then_some(leader)
        });
        if let Some(l) = got {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "ISR never reached {n}; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The leader in metadata, once it is not `old` (and is alive).
fn wait_new_leader(rt: &tokio::runtime::Runtime, client: &Client, old: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(l) = rt.block_on(client.leader_of(TOPIC, 0))
            && l != old
        {
            return l;
        }
        assert!(Instant::now() < deadline, "no new leader replaced {old}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stop the load, wait until every replica holds the same committed log,
/// read each one whole and run the history checker. Returns the number of
/// acknowledged writes.
fn check_history(rt: &tokio::runtime::Runtime, c: &Cluster, client: &Client, load: Load) -> usize {
    let seen = load.finish(rt);
    let acks: Vec<Ack> = seen
        .acks
        .lock()
        .unwrap()
        .iter()
        .map(|(a, ..)| a.clone())
        .collect();
    // All replicas converge: same HW and log end everywhere.
    let leader = wait_isr(rt, client, 3);
    let deadline = Instant::now() + Duration::from_secs(60);
    let end = loop {
        let ends: Vec<(u64, u64)> = (1..=c.nodes.len() as u32)
            .filter_map(|n| {
                let st = rt.block_on(client.status(n)).ok()?;
                let p = st.into_iter().find(|s| s.topic == TOPIC)?;
                Some((p.high_watermark, p.log_end))
            })
            .collect();
        if ends.len() == c.nodes.len() && ends.iter().all(|e| *e == ends[0] && e.0 == e.1) {
            break ends[0].0;
        }
        assert!(
            Instant::now() < deadline,
            "replicas never converged: {ends:?} (leader {leader})"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let finals: Vec<Final> = (1..=c.nodes.len() as u32)
        .map(|n| {
            let mut records = Vec::new();
            let mut next = 0;
            while next < end {
                let b = rt
                    .block_on(client.read(n, TOPIC, 0, next, 4 << 20))
                    .unwrap_or_else(|e| panic!("read replica {n} at {next}: {e}"));
                let before = next;
                for r in b.records.into_iter().filter(|r| r.offset >= before) {
                    next = r.offset + 1;
                    records.push((r.offset, r.record.value));
                }
                assert!(next > before, "replica {n} returned nothing at {next}");
            }
            Final {
                replica: n,
                partition: 0,
                records,
            }
        })
        .collect();
    for f in &finals {
        assert_eq!(
            f.records.len() as u64,
            end,
            "replica {} has a gap in [0, {end})",
            f.replica
        );
    }
    let history = History {
        acks,
        reads: std::mem::take(&mut *seen.reads.lock().unwrap()),
        finals,
    };
    let report = history.check();
    println!(
        "history: {} acknowledged, {} ambiguous, {} refused before writing, {} records read, log end {end}",
        report.acknowledged,
        seen.ambiguous.load(Ordering::Relaxed),
        seen.refused.load(Ordering::Relaxed),
        report.read_records
    );
    if let Some(e) = seen.read_error.lock().unwrap().as_ref() {
        println!("the consumer's last failed read: {e}");
    }
    assert!(
        report.ok(),
        "anomalies: {:#?}",
        &report.anomalies[..report.anomalies.len().min(20)]
    );
    report.acknowledged
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Print the failover times and check them against the targets (p50 at
/// most 1 s, p99 at most 2 s with default settings on loopback). Under 20
/// rounds the "p99" is the slowest round, which one stall of a loaded
/// machine decides: there the slowest round may take up to 4 s.
fn report_failover(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let p50 = percentile(&times, 0.50);
    let p99 = percentile(&times, 0.99);
    println!(
        "failover time ({what}, {} rounds): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; all: {:?}",
        times.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        times.last().map_or(0.0, |t| t.as_secs_f64() * 1e3),
        times.iter().map(|t| t.as_millis()).collect::<Vec<_>>()
    );
    assert!(p50 <= Duration::from_secs(1), "{what}: p50 {p50:?} > 1 s");
    if times.len() >= 20 {
        assert!(p99 <= Duration::from_secs(2), "{what}: p99 {p99:?} > 2 s");
    } else {
        assert!(
            p99 <= Duration::from_secs(4),
            "{what}: the slowest of {} rounds took {p99:?} > 4 s",
            times.len()
        );
    }
}

/// One fault: wait for a full ISR and `warmup` more acknowledgements,
/// `inject` the fault into the leader, then wait for a new leader and the
/// first acks=all success it gives. Returns the old leader, when the fault
/// was injected, and the time from then to that success; prints the round.
#[allow(clippy::too_many_arguments)]
fn fault_round(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    load: &Load,
    c: &mut Cluster,
    round: usize,
    warmup: usize,
    fault: &str,
    inject: impl FnOnce(&mut Cluster, u32) -> String,
) -> (u32, Instant, Duration) {
    let leader = wait_isr(rt, client, 3);
    load.wait_acks(load.acked() + warmup, &format!("before {fault}"));
    let what = inject(c, leader);
    let t = Instant::now();
    let new = wait_new_leader(rt, client, leader);
    let took = load.wait_first_ack_after(t, leader, fault) - t;
    println!(
        "round {}: {what}; node {new} leads; first acks=all success after {:.0} ms",
        round + 1,
        took.as_secs_f64() * 1e3
    );
    (leader, t, took)
}

/// Kill -9 the leader, see a new one elected and acks=all go on, restart
/// the old one and see it rejoin the ISR; repeat. Nothing acknowledged
/// may be lost, on any replica.
fn kill_rounds(c: &mut Cluster, rounds: usize, mut between: impl FnMut(&mut Cluster, usize)) {
    let rt = support::runtime();
    let client = setup(&rt, c);
    let load = Load::start(&rt, client.clone(), 4);
    let mut times = Vec::new();
    for round in 0..rounds {
        let (leader, _, took) = fault_round(
            &rt,
            &client,
            &load,
            c,
            round,
            300,
            "the kill",
            |c, leader| {
                c.kill(leader);
                format!("killed leader {leader}")
            },
        );
        times.push(took);
        between(c, round);
        c.start(leader);
        // The old leader catches up and re-enters the ISR under load.
        wait_isr(&rt, &client, 3);
    }
    let acked = check_history(&rt, c, &client, load);
    assert!(acked > rounds * 300, "too few writes: {acked}");
    report_failover("kill -9 the leader", times);
}

fn rounds() -> usize {
    std::env::var("REPLICATOR_CHAOS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

#[test]
fn killing_the_leader_loses_nothing_acknowledged() {
    let _serial = serial();
    let mut c = Cluster::init(3, "file", |t| t);
    kill_rounds(&mut c, rounds(), |_, _| {});
}

/// The kill test with the metadata on a real etcd (Debian's etcd-server,
/// started here), which is itself killed and restarted mid-run.
#[test]
fn killing_the_leader_with_etcd_metadata_loses_nothing_acknowledged() {
    let _serial = serial();
    let mut etcd = support::etcd::Etcd::start();
    let endpoint = etcd.endpoint();
    let mut c = Cluster::init_with(
        3,
        "file",
        &["--metadata", "etcd", "--metadata-endpoint", &endpoint],
        |t| t,
    );
    let rounds = (rounds() / 2).max(3);
    kill_rounds(&mut c, rounds, |_, round| {
        if round == 1 {
            // etcd down and back while the load runs and a node is down:
            // the data path goes on; metadata calls fail, then recover.
            let t = Instant::now();
            etcd.restart();
            println!(
                "  restarted etcd in {:.0} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
    });
}

/// Produce one record straight to `node`, whatever the metadata says:
/// `Ok(offset)` if acknowledged, `Err(refusal)` if the node refused it.
/// Anything else (no answer) fails the test: the node must answer.
fn produce_to(rt: &tokio::runtime::Runtime, client: &Client, node: u32) -> Result<u64, String> {
    use replicator::transport::TransportError;
    use replicator::wire::rpc::{Request, Response};
    let rec = Record {
        key: None,
        value: Bytes::from_static(b"to-the-old-leader"),
        timestamp: 0,
        headers: Vec::new(),
    };
    let body = replicator::batch::encode(0, 0, &[rec]).map_err(|e| e.to_string())?;
    rt.block_on(async {
        let peer = client.peer(node).await.map_err(|e| e.to_string())?;
        let req = Request::Produce {
            topic: TOPIC.into(),
            partition: 0,
            acks: Acks::All,
            timeout_ms: 2000,
            sequence: None,
        };
        match peer
            .request_within(&req, body, Duration::from_secs(5))
            .await
        {
            Ok((Response::Produced { base_offset, .. }, _)) => Ok(base_offset),
            Err(TransportError::Rejected(refusal)) => Err(refusal.to_string()),
            Ok((other, _)) => panic!("node {node} answered a produce with {other:?}"),
            Err(e) => panic!("node {node} did not answer a produce: {e}"),
        }
    })
}

/// Freeze the leader (SIGSTOP) past the failure timeout: a new leader is
/// elected. Thaw it (SIGCONT): it must not acknowledge anything as the
/// leader it no longer is, must drop whatever it appended alone, and must
/// rejoin as a follower.
#[test]
fn a_frozen_leader_is_fenced_when_it_returns() {
    let _serial = serial();
    let mut c = Cluster::init(3, "file", |t| t);
    let rt = support::runtime();
    let client = setup(&rt, &mut c);
    let load = Load::start(&rt, client.clone(), 4);
    let mut times = Vec::new();
    for round in 0..3 {
        let (leader, _, took) = fault_round(
            &rt,
            &client,
            &load,
            &mut c,
            round,
            50,
            "the freeze",
            |c, leader| {
                c.signal(leader, "-STOP");
                format!("froze leader {leader}")
            },
        );
        times.push(took);
        c.signal(leader, "-CONT");
        // Straight at the thawed node: it must refuse, or fail to commit;
        // never acknowledge.
        let r = produce_to(&rt, &client, leader);
        assert!(
            r.is_err(),
            "the deposed leader {leader} acknowledged a write at {r:?}"
        );
        println!("  a write sent straight to the thawed node {leader}: {r:?}");
        wait_isr(&rt, &client, 3);
    }
    check_history(&rt, &c, &client, load);
    report_failover("SIGSTOP the leader", times);
}

/// Cut the leader off the network: the test runs in its own network
/// namespace (so the rules touch nothing else) and nftables drops every
/// packet to or from the leader's QUIC port. The others elect a new leader;
/// the cut-off one cannot acknowledge anything. When the cut heals it
/// rejoins as a follower.
#[test]
fn a_leader_cut_off_by_the_network_is_replaced_and_rejoins() {
    let _serial = serial();
    let (mut c, rt, client, load) = cluster_in_own_netns(4);
    let mut times = Vec::new();
    for round in 0..2 {
        let (leader, t, took) = fault_round(
            &rt,
            &client,
            &load,
            &mut c,
            round,
            50,
            "the cut",
            |c, leader| {
                let port = c.base_port + (leader as u16 - 1);
                nft(&[
                    "add table inet chaos",
                    "add chain inet chaos input { type filter hook input priority 0; }",
                    &format!("add rule inet chaos input udp dport {port} drop"),
                    &format!("add rule inet chaos input udp sport {port} drop"),
                ]);
                format!("cut off leader {leader} (udp port {port})")
            },
        );
        let elected = partition_leadership(&rt, &client);
        times.push(took);
        // Keep it cut off a while: it must not depose anyone from its side.
        load.wait_acks(load.acked() + 200, "while the old leader is cut off");
        // Nobody was deposed meanwhile: not by the cut-off node (no
        // majority), not by the others (the new leader is alive).
        assert_eq!(
            partition_leadership(&rt, &client),
            elected,
            "leadership changed during the cut"
        );
        // Nothing sent after the cut was acknowledged by the cut-off node
        // (an answer it sent just before the cut can be read after it).
        assert!(
            load.seen
                .acks
                .lock()
                .unwrap()
                .iter()
                .all(|(_, sent, _, node)| *sent <= t || *node != leader),
            "the cut-off node {leader} acknowledged a write sent after the cut"
        );
        nft(&["delete table inet chaos"]);
        wait_isr(&rt, &client, 3);
    }
    check_history(&rt, &c, &client, load);
    report_failover("network cut", times);
}

/// Cut the link between the leader and one follower only: the follower
/// counts the leader as failed, but the third node still hears it, so no
/// majority agrees and nobody is elected (the follower, with the third
/// node as its majority, used to depose the healthy leader). The leader
/// drops the follower from the ISR, writes go on, and after the cut heals
/// the follower rejoins, with every acknowledged write on every replica.
/// The same rule keeps a node that is losing the network, one peer a few
/// milliseconds after the other, from deposing leaders on its way out.
#[test]
fn a_node_cut_off_from_the_leader_alone_deposes_nobody() {
    let _serial = serial();
    let (c, rt, client, load) = cluster_in_own_netns(2);
    let leader = wait_isr(&rt, &client, 3);
    load.wait_acks(load.acked() + 50, "before the cut");
    let before = partition_leadership(&rt, &client);
    let follower = (1..=3u32).find(|n| *n != leader).expect("a follower");
    let port = |n: u32| c.base_port + (n as u16 - 1);
    let (l, f) = (port(leader), port(follower));
    nft(&[
        "add table inet chaos",
        "add chain inet chaos input { type filter hook input priority 0; }",
        &format!("add rule inet chaos input udp sport {l} udp dport {f} drop"),
        &format!("add rule inet chaos input udp sport {f} udp dport {l} drop"),
    ]);
    println!("cut the link between leader {leader} (udp {l}) and follower {follower} (udp {f})");
    // The leader no longer hears the follower either: it leaves the ISR
    // once the leader's own detector says so, a failure timeout in.
    wait_isr(&rt, &client, 2);
    let dropped = Instant::now();
    // Well past the follower's failure timeout (500 ms) and a few
    // heartbeat rounds: writes go on, and the leader is the same.
    load.wait_acks(load.acked() + 200, "with the follower cut off");
    while dropped.elapsed() < Duration::from_secs(2) {
        load.wait_acks(load.acked() + 20, "with the follower cut off");
    }
    assert_eq!(
        partition_leadership(&rt, &client),
        before,
        "the healthy leader was deposed"
    );
    nft(&["delete table inet chaos"]);
    wait_isr(&rt, &client, 3);
    assert_eq!(
        partition_leadership(&rt, &client),
        before,
        "the healed link deposed the leader"
    );
    let log = c.log(follower);
    assert!(
        !log.contains(" failed; node "),
        "the follower decided an election:\n{log}"
    );
    check_history(&rt, &c, &client, load);
}

/// Cut the leader off from the other nodes but not from clients: it goes
/// on answering reads, with nothing new, while the others elect a new
/// leader. `consume --follow` reading it used to print nothing more for
/// as long as the cut lasted (it looked for the leader only after a
/// failed read); it now asks the cluster after 2 s without anything new,
/// moves to the new leader, and prints every offset, none twice.
#[test]
fn a_following_consumer_moves_to_a_leader_elected_behind_its_back() {
    use std::io::BufRead;
    let _serial = serial();
    let (c, rt, client, load) = cluster_in_own_netns(2);
    let leader = wait_isr(&rt, &client, 3);
    load.wait_acks(load.acked() + 50, "before the consumer starts");
    let config = c.client();
    let mut consumer = std::process::Command::new(support::BIN)
        .args(["consume", "--config", &config, "--topic", TOPIC])
        .args(["--from", "end", "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start consume");
    // Its offsets as it prints them.
    let printed = Arc::new(Mutex::new(Vec::<u64>::new()));
    let reader = {
        let printed = printed.clone();
        let out = consumer.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(o) = line.split(' ').next().and_then(|o| o.parse().ok()) {
                    printed.lock().unwrap().push(o);
                }
            }
        })
    };
    let wait_printed = |at_least: u64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while printed.lock().unwrap().last().is_none_or(|o| *o < at_least) {
            assert!(
                Instant::now() < deadline,
                "the consumer printed nothing from offset {at_least} ({what}); it printed up to {:?}",
                printed.lock().unwrap().last()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let newest_acked = |by: Option<u32>| {
        load.seen
            .acks
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, _, node)| by.is_none_or(|b| *node == b))
            .map(|(ack, _, _, _)| ack.offset)
            .max()
            .unwrap_or(0)
    };
    load.wait_acks(load.acked() + 50, "with the consumer following");
    wait_printed(newest_acked(None), "before the cut");
    // Node to node only: the client still reaches every node.
    let port = |n: u32| c.base_port + (n as u16 - 1);
    let mut rules = vec![
        "add table inet chaos".to_string(),
        "add chain inet chaos input { type filter hook input priority 0; }".to_string(),
    ];
    for other in (1..=3u32).filter(|n| *n != leader) {
        let (l, o) = (port(leader), port(other));
        rules.push(format!(
            "add rule inet chaos input udp sport {l} udp dport {o} drop"
        ));
        rules.push(format!(
            "add rule inet chaos input udp sport {o} udp dport {l} drop"
        ));
    }
    nft(&rules.iter().map(String::as_str).collect::<Vec<_>>());
    let t = Instant::now();
    let new = wait_new_leader(&rt, &client, leader);
    load.wait_first_ack_after(t, leader, "the cut");
    load.wait_acks(load.acked() + 100, "on the new leader");
    println!("cut leader {leader} off from the other nodes; node {new} leads");
    wait_printed(newest_acked(Some(new)), "written on the new leader");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &consumer.id().to_string()])
        .status();
    let status = consumer.wait().expect("consume");
    let _ = reader.join();
    let mut stderr = String::new();
    if let Some(mut e) = consumer.stderr.take() {
        use std::io::Read as _;
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(
        stderr.contains(&format!("node {new} leads it now, reading there")),
        "{stderr}"
    );
    let printed = printed.lock().unwrap().clone();
    assert!(
        printed.windows(2).all(|w| w[1] == w[0] + 1),
        "offsets skipped or repeated: {:?}",
        printed.windows(2).find(|w| w[1] != w[0] + 1)
    );
    nft(&["delete table inet chaos"]);
    wait_isr(&rt, &client, 3);
    check_history(&rt, &c, &client, load);
}

/// (leader, leader epoch) of the test partition, from fresh metadata.
fn partition_leadership(rt: &tokio::runtime::Runtime, client: &Client) -> (Option<u32>, u32) {
    rt.block_on(client.metadata())
        .expect("metadata")
        .1
        .into_iter()
        .find(|p| p.topic == TOPIC)
        .map(|p| (p.leader, p.leader_epoch))
        .expect("the test partition")
}

/// Move into a network namespace of its own (see [`enter_private_netns`]),
/// start three nodes on the file plugin with the test partition, and put
/// `producers` producers and a consumer to work on it.
fn cluster_in_own_netns(producers: usize) -> (Cluster, tokio::runtime::Runtime, Arc<Client>, Load) {
    if let Err(e) = enter_private_netns() {
        panic!(
            "this test needs to create a network namespace and nftables rules (root, iproute2, nftables; scripts/setup installs nftables): {e}"
        );
    }
    let mut c = Cluster::init(3, "file", |t| t);
    let rt = support::runtime();
    let client = setup(&rt, &mut c);
    let load = Load::start(&rt, client.clone(), producers);
    (c, rt, client, load)
}

/// Move this test thread (and the processes and threads it starts) into a
/// new network namespace with its own loopback.
fn enter_private_netns() -> Result<(), String> {
    // SAFETY: unshare only changes this thread's namespaces; no memory is
    // touched.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        ));
    }
    let out = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip link set lo up: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let out = std::process::Command::new("nft")
        .arg("list ruleset")
        .output()
        .map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!("nft: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

fn nft(commands: &[&str]) {
    for cmd in commands {
        let out = std::process::Command::new("nft")
            .arg(cmd)
            .output()
            .expect("run nft");
        assert!(
            out.status.success(),
            "nft {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
