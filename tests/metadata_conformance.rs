//! The metadata conformance suite against the `file` plugin and the `etcd`
//! plugin (on a real etcd this test starts), and what only a networked
//! store has: an unreachable endpoint, the sandbox's allow-list, fail-over
//! to a second endpoint, and etcd restarting under a live connection.

mod support;

use std::time::{Duration, Instant};

use replicator::conformance::metadata::{self, MetadataOptions, MetadataSubject};
use replicator::metadata::{MetadataError, MetadataStore, PartitionState};
use replicator::plugin::{MetadataPlugin, PluginMetadata, PluginSource, Sandbox};
use support::etcd::{Etcd, closed_port};

/// The plugin's per-request timeout in the tests of an unreachable etcd.
const TIMEOUT_MS: u64 = 1000;
/// The per-request timeout of the conformance run: generous, as racing
/// connections on a loaded 2-core machine can keep etcd from answering
/// within a second, and a timeout is not what that run tests.
const CONFORMANCE_TIMEOUT_MS: u64 = 5000;

fn load(name: &str, sandbox: Sandbox) -> MetadataPlugin {
    MetadataPlugin::load(&PluginSource::Builtin(name.into()), sandbox).expect("built-in loads")
}

fn etcd_config(endpoints: &[String], prefix: &str, timeout_ms: u64) -> Vec<(String, String)> {
    vec![
        ("endpoints".into(), endpoints.join(",")),
        ("prefix".into(), prefix.into()),
        ("timeout_ms".into(), timeout_ms.to_string()),
    ]
}

async fn check(subject: MetadataSubject) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let options = MetadataOptions {
        race_rounds: 50,
        ..MetadataOptions::default()
    };
    let report = metadata::run(&subject, scratch.path(), &options, |_| {}).await;
    let name = subject.plugin.name().to_string();
    println!("{name}:\n{report}");
    assert_eq!(report.failed(), 0, "{name} failed conformance:\n{report}");
    assert_eq!(report.skipped(), 0, "{name} skipped cases:\n{report}");
    assert_eq!(
        report.passed(),
        metadata::case_names().count(),
        "every case ran:\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_plugin_conforms() {
    check(MetadataSubject::new(
        load("file", Sandbox::default()),
        Vec::new(),
    ))
    .await;
}

/// `read-partitions` in pages of 3, so that its case spans several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_plugin_conforms_reading_in_small_pages() {
    check(MetadataSubject::new(
        load("file", Sandbox::default()),
        vec![("page_size".into(), "3".into())],
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_plugin_conforms() {
    let etcd = Etcd::start();
    let plugin = load("etcd", Sandbox::default().allow_http([etcd.authority()]));
    let config = etcd_config(&[etcd.endpoint()], "/conformance/", CONFORMANCE_TIMEOUT_MS);
    check(MetadataSubject::new(plugin.clone(), config)).await;
    // And reading in pages of 3 keys, so that `read-partitions` spans
    // several range requests.
    let mut config = etcd_config(&[etcd.endpoint()], "/paged/", CONFORMANCE_TIMEOUT_MS);
    config.push(("page_size".into(), "3".into()));
    check(MetadataSubject::new(plugin, config)).await;
}

fn state(topic: &str, leader: u32, leader_epoch: u32) -> PartitionState {
    PartitionState {
        topic: topic.into(),
        partition: 0,
        leader: Some(leader),
        leader_epoch,
        isr: vec![1, 2],
        elr: vec![],
        replicas: vec![1, 2],
        min_insync: 1,
        version: 0,
    }
}

async fn connect(plugin: &MetadataPlugin, config: Vec<(String, String)>) -> PluginMetadata {
    let dir = tempfile::tempdir().expect("tempdir");
    plugin.connect(dir.path(), config).await.expect("connect")
}

/// Every call of a connection to nothing comes back `unavailable`, within
/// a bound of a few request timeouts, and the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_is_unavailable_promptly() {
    let (_closed, port) = closed_port();
    let authority = format!("127.0.0.1:{port}");
    let plugin = load("etcd", Sandbox::default().allow_http([authority.clone()]));
    let m = connect(
        &plugin,
        etcd_config(&[format!("http://{authority}")], "/x/", TIMEOUT_MS),
    )
    .await;
    let bound = Duration::from_millis(3 * TIMEOUT_MS);
    for round in 0..3 {
        let started = Instant::now();
        let r = m.get_partition("t", 0).await;
        assert!(
            matches!(&r, Err(MetadataError::Unavailable(m)) if m.contains(&authority)),
            "round {round}: {r:?}"
        );
        let r = m.compare_and_set(state("t", 1, 0), 0).await;
        assert!(matches!(r, Err(MetadataError::Unavailable(_))), "{r:?}");
        let r = m.register_broker(1, "127.0.0.1:1".into()).await;
        assert!(matches!(r, Err(MetadataError::Unavailable(_))), "{r:?}");
        assert!(
            started.elapsed() < bound,
            "three calls took {:?}",
            started.elapsed()
        );
    }
}

/// A port that accepts connections but never answers (a hung etcd) runs
/// into the request timeout: `unavailable`, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_endpoint_times_out_as_unavailable() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let authority = silent.local_addr().expect("addr").to_string();
    let plugin = load("etcd", Sandbox::default().allow_http([authority.clone()]));
    let m = connect(
        &plugin,
        etcd_config(&[format!("http://{authority}")], "/x/", TIMEOUT_MS),
    )
    .await;
    let started = Instant::now();
    let r = m.list_partitions().await;
    let took = started.elapsed();
    assert!(matches!(r, Err(MetadataError::Unavailable(_))), "{r:?}");
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS / 2)
            && took < Duration::from_millis(5 * TIMEOUT_MS),
        "took {took:?} with a {TIMEOUT_MS} ms timeout"
    );
    // The host closed the connection it gave up on: the listener's end
    // is not left established (a hung server must not pin sockets).
    let port = silent.local_addr().expect("addr").port();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let open: Vec<_> = sockets_with(port)
            .into_iter()
            .filter(|(_, state)| state == "01")
            .collect();
        if open.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections still open after the timeout: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(silent);
}

/// An endpoint outside the sandbox's allow-list is refused by the host;
/// the plugin says so instead of hanging, and never reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_outside_the_allow_list_is_denied() {
    let etcd = Etcd::start();
    for sandbox in [
        Sandbox::default(),
        Sandbox::default().allow_http(["127.0.0.1:1".to_string()]),
    ] {
        let plugin = load("etcd", sandbox);
        let m = connect(
            &plugin,
            etcd_config(&[etcd.endpoint()], "/denied/", TIMEOUT_MS),
        )
        .await;
        let started = Instant::now();
        let r = m.compare_and_set(state("t", 1, 0), 0).await;
        assert!(
            matches!(&r, Err(MetadataError::Other(msg)) if msg.contains("allow-list")),
            "{r:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // Nothing was written: an allowed connection finds no partition.
    let plugin = load("etcd", Sandbox::default().allow_http([etcd.authority()]));
    let m = connect(
        &plugin,
        etcd_config(&[etcd.endpoint()], "/denied/", TIMEOUT_MS),
    )
    .await;
    let r = m.get_partition("t", 0).await;
    assert!(matches!(r, Err(MetadataError::NotFound(_))), "{r:?}");
}

/// The peer ports of TCP sockets (any state but LISTEN, TIME_WAIT
/// included) with `port` at one end, from `/proc/net/tcp{,6}`: one per
/// connection made to (or from) that port in the last minute or so.
fn connections_with(port: u16) -> std::collections::BTreeSet<u16> {
    sockets_with(port)
        .into_iter()
        .map(|(peer, _)| peer)
        .collect()
}

/// (peer port, state) of each non-listening TCP socket with `port` at one
/// end; states as the kernel numbers them (01 established, 06 time-wait,
/// 08 close-wait).
fn sockets_with(port: u16) -> Vec<(u16, String)> {
    let mut peers = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port_of = |a: &str| {
                a.rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            let (Some(local), Some(remote), Some(state)) = (
                f.get(1).and_then(|a| port_of(a)),
                f.get(2).and_then(|a| port_of(a)),
                f.get(3),
            ) else {
                continue;
            };
            if *state == "0A" {
                continue; // LISTEN
            }
            if local == port {
                peers.push((remote, state.to_string()));
            } else if remote == port {
                peers.push((local, state.to_string()));
            }
        }
    }
    peers
}

/// An etcd of its own, the connections to it before the test's, and the
/// etcd plugin allowed to reach it with its config under `prefix`.
struct Counted {
    etcd: Etcd,
    before: std::collections::BTreeSet<u16>,
    plugin: MetadataPlugin,
    config: Vec<(String, String)>,
}

/// [`Counted`], or `None` where connections cannot be counted.
fn counted_etcd(prefix: &str) -> Option<Counted> {
    if !std::path::Path::new("/proc/net/tcp").exists() {
        eprintln!("no /proc/net/tcp: cannot count connections here");
        return None;
    }
    let etcd = Etcd::start();
    let before = connections_with(etcd.client_port);
    let plugin = load("etcd", Sandbox::default().allow_http([etcd.authority()]));
    let config = etcd_config(&[etcd.endpoint()], prefix, CONFORMANCE_TIMEOUT_MS);
    Some(Counted {
        etcd,
        before,
        plugin,
        config,
    })
}

/// The host keeps a plugin's HTTP connections alive: 300 metadata calls
/// to one etcd use a few TCP connections, not one each (which left
/// thousands of ports in TIME_WAIT on a cluster, and a restarted node
/// could find its port taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_calls_reuse_http_connections() {
    let Some(Counted {
        etcd,
        before,
        plugin,
        config,
    }) = counted_etcd("/pool/")
    else {
        return;
    };
    let m = connect(&plugin, config).await;
    let v = m
        .compare_and_set(state("t", 1, 0), 0)
        .await
        .expect("create");
    let started = Instant::now();
    for i in 0..100u32 {
        let got = m.get_partition("t", 0).await.expect("get");
        assert_eq!(got.version, v);
        m.list_partitions().await.expect("list");
        m.register_broker(1 + i % 3, "127.0.0.1:1".into())
            .await
            .expect("register");
    }
    let new: Vec<u16> = connections_with(etcd.client_port)
        .difference(&before)
        .copied()
        .collect();
    println!(
        "300 calls in {:.0} ms over {} new connections",
        started.elapsed().as_secs_f64() * 1e3,
        new.len()
    );
    assert!(
        new.len() <= 4,
        "301 calls opened {} connections to etcd, from ports {:?}...",
        new.len(),
        &new[..new.len().min(8)]
    );
}

/// A pooled connection belongs to no store's runtime: one opened by a
/// store whose runtime has ended serves the next store, on another
/// runtime (a store on its own thread has a runtime that ends with it).
#[test]
fn pooled_connections_outlive_the_runtime_that_opened_them() {
    let Some(Counted {
        etcd,
        before,
        plugin,
        config,
    }) = counted_etcd("/outlive/")
    else {
        return;
    };
    for round in 0..3 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let m = connect(&plugin, config.clone()).await;
            m.list_partitions()
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        });
        drop(rt);
    }
    let new = connections_with(etcd.client_port)
        .difference(&before)
        .count();
    assert_eq!(new, 1, "three stores on three runtimes, one after another");
}

/// Bad settings are refused at connect with a message naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_etcd_settings_are_refused_at_connect() {
    let plugin = load("etcd", Sandbox::default());
    let dir = tempfile::tempdir().expect("tempdir");
    for (config, why) in [
        (vec![], "`endpoints` is required"),
        (vec![("endpoints", "https://127.0.0.1:2379")], "https"),
        (vec![("endpoints", "127.0.0.1:2379")], "http://host:port"),
        (vec![("endpoints", "http://127.0.0.1")], "port"),
        (
            vec![("endpoints", "http://127.0.0.1:2379"), ("timeout_ms", "0")],
            "timeout_ms",
        ),
        (
            vec![("endpoints", "http://127.0.0.1:2379"), ("colour", "red")],
            "unknown setting",
        ),
    ] {
        let config = config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match plugin.connect(dir.path(), config).await {
            Err(MetadataError::InvalidInput(m)) => assert!(m.contains(why), "{m}"),
            Err(e) => panic!("expected invalid-input naming {why}: {e}"),
            Ok(_) => panic!("expected invalid-input naming {why}, it connected"),
        }
    }
}

/// A dead first endpoint is skipped for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_falls_over_to_the_next() {
    let etcd = Etcd::start();
    let (_closed, port) = closed_port();
    let dead = format!("127.0.0.1:{port}");
    let plugin = load(
        "etcd",
        Sandbox::default().allow_http([dead.clone(), etcd.authority()]),
    );
    let m = connect(
        &plugin,
        etcd_config(
            &[format!("http://{dead}"), etcd.endpoint()],
            "/failover/",
            TIMEOUT_MS,
        ),
    )
    .await;
    assert_eq!(m.compare_and_set(state("t", 1, 0), 0).await, Ok(1));
    assert_eq!(m.compare_and_set(state("t", 2, 1), 1).await, Ok(2));
    assert_eq!(m.get_partition("t", 0).await.expect("get").leader, Some(2));
}

/// Endpoints of two different etcd clusters (a typo, an etcd kept for
/// something else). Both up at the first call: refused, naming both. The
/// other one down then: the first answers decide, and when they go away
/// the other one is not used, since it holds other records; when the first
/// is back, calls go on there. A node used to move to whichever answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_of_another_etcd_cluster_is_not_used() {
    let mut ours = Etcd::start();
    let mut other = Etcd::start();
    let plugin = load(
        "etcd",
        Sandbox::default().allow_http([ours.authority(), other.authority()]),
    );
    let config = |endpoints: &[String]| etcd_config(endpoints, "/clusters/", TIMEOUT_MS);
    let both = [ours.endpoint(), other.endpoint()];
    let mixed = connect(&plugin, config(&both)).await;
    let r = mixed.compare_and_set(state("t", 1, 0), 0).await;
    assert!(
        matches!(&r, Err(MetadataError::Other(m))
            if m.contains("members of different etcd clusters")
                && m.contains(&ours.authority()) && m.contains(&other.authority())),
        "{r:?}"
    );

    other.stop();
    let m = connect(&plugin, config(&both)).await;
    assert_eq!(m.compare_and_set(state("t", 1, 0), 0).await, Ok(1));
    other.restart();
    ours.stop();
    let r = m.compare_and_set(state("t", 2, 1), 1).await;
    assert!(
        matches!(&r, Err(MetadataError::Unavailable(m))
            if m.contains("every endpoint must be a member of the one etcd cluster")),
        "{r:?}"
    );
    let r = m.get_partition("t", 0).await;
    assert!(matches!(r, Err(MetadataError::Unavailable(_))), "{r:?}");
    // Nothing went to the other cluster.
    let theirs = connect(&plugin, config(&[other.endpoint()])).await;
    assert_eq!(theirs.list_partitions().await, Ok(vec![]));

    ours.restart();
    assert_eq!(m.compare_and_set(state("t", 2, 1), 1).await, Ok(2));
    assert_eq!(m.get_partition("t", 0).await.expect("get").leader, Some(2));
}

/// A TCP forwarder to `to` on a port of its own, cut (listener and every
/// connection) when dropped: a second endpoint of the same etcd member.
struct Forwarder {
    port: u16,
    cut: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Forwarder {
    fn to(to: String) -> Forwarder {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (cut2, stop2) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(inbound) = inbound else { continue };
                let Ok(outbound) = TcpStream::connect(&to) else {
                    continue;
                };
                let mut held = cut2.lock().expect("lock");
                for s in [&inbound, &outbound] {
                    if let Ok(c) = s.try_clone() {
                        held.push(c);
                    }
                }
                drop(held);
                for (mut from, mut into) in [
                    (
                        inbound.try_clone().expect("clone"),
                        outbound.try_clone().expect("clone"),
                    ),
                    (outbound, inbound),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Forwarder { port, cut, stop }
    }

    fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag, then cut everything.
        let _ = std::net::TcpStream::connect(self.authority());
        if let Ok(held) = self.cut.lock() {
            for s in held.iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Two endpoints of the same etcd cluster (here one member reached two
/// ways): when the one that answered goes away, calls go on through the
/// other, which the cluster check must not refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_endpoint_of_the_same_cluster_is_used() {
    let etcd = Etcd::start();
    let front = Forwarder::to(etcd.authority());
    let plugin = load(
        "etcd",
        Sandbox::default().allow_http([front.authority(), etcd.authority()]),
    );
    let m = connect(
        &plugin,
        etcd_config(
            &[format!("http://{}", front.authority()), etcd.endpoint()],
            "/same/",
            TIMEOUT_MS,
        ),
    )
    .await;
    assert_eq!(m.compare_and_set(state("t", 1, 0), 0).await, Ok(1));
    drop(front);
    assert_eq!(m.compare_and_set(state("t", 2, 1), 1).await, Ok(2));
    assert_eq!(m.get_partition("t", 0).await.expect("get").leader, Some(2));
}

/// etcd killed under a live connection: calls during the downtime are
/// `unavailable` promptly; after a restart on the same data the same
/// connection works again and sees everything written before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_under_a_live_connection() {
    let mut etcd = Etcd::start();
    let plugin = load("etcd", Sandbox::default().allow_http([etcd.authority()]));
    let m = connect(
        &plugin,
        etcd_config(&[etcd.endpoint()], "/restart/", TIMEOUT_MS),
    )
    .await;
    assert_eq!(m.compare_and_set(state("t", 1, 0), 0).await, Ok(1));
    assert_eq!(m.compare_and_set(state("t", 2, 1), 1).await, Ok(2));
    let epoch = m
        .register_broker(7, "127.0.0.1:7101".into())
        .await
        .expect("register");

    etcd.stop();
    let bound = Duration::from_millis(3 * TIMEOUT_MS);
    let started = Instant::now();
    let r = m.get_partition("t", 0).await;
    assert!(matches!(r, Err(MetadataError::Unavailable(_))), "{r:?}");
    let r = m.compare_and_set(state("t", 1, 2), 2).await;
    assert!(matches!(r, Err(MetadataError::Unavailable(_))), "{r:?}");
    let r = m.register_broker(7, "127.0.0.1:7101".into()).await;
    assert!(matches!(r, Err(MetadataError::Unavailable(_))), "{r:?}");
    let r = m.list_brokers().await;
    assert!(matches!(r, Err(MetadataError::Unavailable(_))), "{r:?}");
    assert!(
        started.elapsed() < bound,
        "calls during the downtime took {:?}",
        started.elapsed()
    );

    etcd.restart();
    let got = m.get_partition("t", 0).await.expect("get after restart");
    assert_eq!((got.version, got.leader), (2, Some(2)));
    assert_eq!(m.compare_and_set(state("t", 1, 2), 2).await, Ok(3));
    let again = m
        .register_broker(7, "127.0.0.1:7101".into())
        .await
        .expect("register after restart");
    assert!(again > epoch, "epoch {again} after restart, {epoch} before");
    let brokers = m.list_brokers().await.expect("list brokers");
    assert_eq!(brokers.len(), 1);
    assert_eq!((brokers[0].id, brokers[0].epoch), (7, again));
    assert_eq!(
        m.list_partitions().await.expect("list"),
        vec![("t".to_string(), 0)]
    );
}

/// The command line: `plugin list` shows the metadata built-ins, `plugin
/// check --metadata` runs the suite against a live etcd (its endpoint
/// allowed), and `cluster init` refuses an etcd cluster without usable
/// endpoints before writing anything.
#[test]
fn the_cli_checks_metadata_plugins_and_etcd_endpoints() {
    let list = support::cli_ok(&["plugin", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("etcd") && l.contains("metadata")),
        "{list}"
    );
    let etcd = Etcd::start();
    let config = format!("endpoints={}", etcd.endpoint());
    let out = support::cli_ok(&[
        "plugin",
        "check",
        "--metadata",
        "etcd",
        "--config",
        &config,
        "--rounds",
        "5",
    ]);
    let all = format!("{} passed, 0 failed", metadata::case_names().count());
    assert!(out.contains(&all), "{out}");
    assert!(out.contains("prefix=/replicator-check/"), "{out}");

    // Said once, before any case (each of them failed alike).
    let no_endpoints = support::cli(&["plugin", "check", "--metadata", "etcd"]);
    let stderr = String::from_utf8_lossy(&no_endpoints.stderr);
    assert!(!no_endpoints.status.success());
    assert!(
        stderr.contains("add --config endpoints=http://HOST:PORT"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&no_endpoints.stdout).contains("FAIL"));

    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = dir.path().join("c");
    for (extra, why) in [
        (vec![], "needs `endpoints"),
        (
            vec!["--metadata-endpoint", "https://127.0.0.1:2379"],
            "https is not supported",
        ),
        (
            vec!["--metadata-endpoint", "127.0.0.1:2379"],
            "http://host:port",
        ),
    ] {
        let mut args = vec![
            "cluster",
            "init",
            "--dir",
            cluster.to_str().expect("utf-8 path"),
            "--nodes",
            "1",
            "--metadata",
            "etcd",
        ];
        args.extend(extra);
        let out = support::cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{args:?}: {err}"
        );
        assert!(!cluster.join("node-1.toml").exists());
    }
}
