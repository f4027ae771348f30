//! Mutual TLS and hostile input against a real node (in this process):
//! certificates from another CA, no certificate, impostor identities,
//! fetches by non-nodes, junk datagrams, oversized and malformed frames.
//! Each is refused, the node keeps serving, and no state changes. Also
//! how many connections a client opens, as the node counts them.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replicator::batch::Record;
use replicator::client::Client;
use replicator::core::{Acks, FetchRequest, TopicPartition};
use replicator::node::{ClientConfig, NodeConfig};
use replicator::transport::{Identity, TlsMaterial, TlsPaths, Transport, TransportError};
use replicator::wire::rpc::{self, Claim, Request, Response, RpcError};
use tokio::sync::oneshot;

struct Node {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

fn init(dir: &Path, nodes: u32) {
    init_with(dir, nodes, &[]);
}

/// [`init`] with more `cluster init` arguments.
fn init_with(dir: &Path, nodes: u32, extra: &[&str]) {
    let base = support::free_ports(nodes as u16);
    let (nodes, base) = (nodes.to_string(), base.to_string());
    let mut args = vec![
        "cluster",
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--nodes",
        &nodes,
        "--base-port",
        &base,
        "--metrics-base-port",
        "0",
        "--min-insync",
        "1",
    ];
    args.extend_from_slice(extra);
    support::cli_ok(&args);
}

/// Node 1 of a 2-node cluster directory, running in this process.
async fn start() -> Node {
    start_with(|_| {}).await
}

async fn start_with(change: impl FnOnce(&mut NodeConfig)) -> Node {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), 2);
    run_in(dir, change).await
}

/// Node 1 of the cluster directory `dir` (made by [`init`]).
async fn run_in(dir: tempfile::TempDir, change: impl FnOnce(&mut NodeConfig)) -> Node {
    let mut config = NodeConfig::load(&dir.path().join("node-1.toml")).unwrap();
    change(&mut config);
    let (stop, stopped) = oneshot::channel::<()>();
    let (ready, addr) = oneshot::channel();
    let task = tokio::spawn(async move {
        replicator::node::run(
            config,
            async {
                let _ = stopped.await;
            },
            Some(ready),
        )
        .await
        .expect("node runs");
    });
    let addr = addr.await.expect("node ready");
    Node {
        dir,
        addr,
        stop: Some(stop),
        task,
    }
}

impl Node {
    fn client(&self) -> Client {
        let cfg = ClientConfig::load(&self.dir.path().join("client.toml")).unwrap();
        Client::new(&cfg).unwrap()
    }
    fn material(&self, who: &str) -> TlsMaterial {
        material(self.dir.path(), who)
    }
    async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("node stops")
            .expect("node task");
    }
}

fn material(dir: &Path, who: &str) -> TlsMaterial {
    TlsMaterial::load(&TlsPaths {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{who}.pem")),
        key: dir.join(format!("{who}-key.pem")),
    })
    .unwrap()
}

fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A topic with some data; returns a fingerprint of the node's state.
async fn seed(c: &Client) {
    c.create_topic("t", 1, 1, None).await.unwrap();
    let recs: Vec<Record> = (0..10)
        .map(|i| Record {
            key: None,
            value: Bytes::from(format!("v{i}")),
            timestamp: 0,
            headers: vec![],
        })
        .collect();
    c.produce("t", 0, &recs, Acks::All, Duration::from_secs(20))
        .await
        .unwrap();
}

async fn fingerprint(c: &Client) -> String {
    let (brokers, parts) = c.metadata().await.unwrap();
    let status = c.status(1).await.unwrap();
    format!("{:?} {:?} {:?}", brokers.len(), parts, status)
}

fn fetch_as(replica: u32) -> Vec<(TopicPartition, FetchRequest)> {
    vec![(
        TopicPartition::new("t", 0),
        FetchRequest {
            replica_id: replica,
            replica_epoch: 1,
            correlation_id: 1,
            current_leader_epoch: 1,
            fetch_offset: 0,
            last_fetched_epoch: None,
            max_bytes: 1 << 20,
            min_bytes: 1,
            max_wait_ms: 10,
        },
    )]
}

fn unauthorized(r: Result<impl std::fmt::Debug, TransportError>) {
    match r {
        Err(TransportError::Rejected(RpcError::Unauthorized(_))) => {}
        other => panic!("expected an Unauthorized refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_must_prove_who_they_are() {
    let node = start().await;
    let c = node.client();
    seed(&c).await;
    let before = fingerprint(&c).await;

    // A client and a node certificate from another cluster's CA.
    let other = tempfile::tempdir().unwrap();
    init(other.path(), 2);
    for who in ["client", "node-2"] {
        let id = if who == "client" {
            Identity::Client
        } else {
            Identity::Node(2)
        };
        let t = Transport::bind(any_addr(), &material(other.path(), who), id, false).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), t.connect(node.addr, 1)).await;
        match r {
            // It says why, not "connection lost".
            Ok(Err(e)) => assert!(
                e.to_string().contains("TLS handshake failed")
                    && e.to_string().contains("not this cluster's ca.pem"),
                "{who}: {e}"
            ),
            other => panic!(
                "{who} of another CA was let in: {:?}",
                other.map(|x| x.is_ok())
            ),
        }
    }
    // Our CA's certificate with another CA named as `ca` (a node config
    // pointing at the wrong file): refused at bind, before any handshake
    // could fail silently.
    let mixed = TlsMaterial::load(&TlsPaths {
        ca: node.dir.path().join("ca.pem"),
        cert: other.path().join("node-2.pem"),
        key: other.path().join("node-2-key.pem"),
    })
    .unwrap();
    match Transport::bind(any_addr(), &mixed, Identity::Node(2), true) {
        Err(e) => assert!(e.to_string().contains("does not chain to the CA"), "{e}"),
        Ok(_) => panic!("a certificate of another CA was accepted as this node's"),
    }

    // No client certificate at all (our CA trusted, so only that is missing).
    no_certificate_is_refused(node.dir.path(), node.addr).await;

    // A valid node-2 certificate claiming to be node 3, and a client
    // certificate claiming to be node 2.
    let n2 = Transport::bind(
        any_addr(),
        &node.material("node-2"),
        Identity::Node(2),
        false,
    )
    .unwrap();
    unauthorized(
        n2.connect_claiming(node.addr, 1, Claim::Node { id: 3 })
            .await
            .map(|_| ()),
    );
    let cl = Transport::bind(
        any_addr(),
        &node.material("client"),
        Identity::Client,
        false,
    )
    .unwrap();
    unauthorized(
        cl.connect_claiming(node.addr, 1, Claim::Node { id: 2 })
            .await
            .map(|_| ()),
    );

    // A client may not fetch; node 2 may not fetch as replica 3.
    let peer = cl.connect(node.addr, 1).await.unwrap();
    let mut s = peer.fetch_stream().await.unwrap();
    unauthorized(s.fetch(&fetch_as(2)).await);
    let peer2 = n2.connect(node.addr, 1).await.unwrap();
    let mut s = peer2.fetch_stream().await.unwrap();
    unauthorized(s.fetch(&fetch_as(3)).await);
    // A fetch that forgets a partition its (new, empty) session never held
    // is out of step with the leader: refused, not guessed at.
    let mut forget = vec![replicator::wire::VERSION, 1, 0, 0, 15, 0, 0, 0];
    forget.extend_from_slice(&0u32.to_le_bytes()); // no entries
    forget.extend_from_slice(&1u32.to_le_bytes()); // one forgotten
    forget.extend_from_slice(&[1, 0, b't', 0, 0, 0, 0]); // t/0
    match peer2.raw_exchange(&forget).await.unwrap() {
        Some((kind, payload)) if kind == rpc::kind::RESPONSE => {
            match rpc::decode::<Response>(payload).unwrap().0 {
                Response::Error {
                    error: RpcError::Invalid(why),
                } => assert!(why.contains("not in the session"), "{why}"),
                other => panic!("expected Invalid, got {other:?}"),
            }
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Dialling node 1 while expecting node 2: our side refuses its cert.
    assert!(cl.connect(node.addr, 2).await.is_err());

    assert_eq!(fingerprint(&c).await, before, "state changed");
    c.close().await;
    node.shutdown().await;
}

/// A client whose certificate expired after it started is told that its
/// own certificate expired, as the node's clock reads it: "an expired
/// certificate" did not say whose (operator run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_named_as_this_sides() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let ca_key = keys.path().join("ca-key.pem");
    init_with(dir.path(), 2, &["--ca-key-out", ca_key.to_str().unwrap()]);
    let node = run_in(dir, |_| {}).await;
    let ca = replicator::transport::tls::GeneratedCa::from_pem(
        &std::fs::read_to_string(node.dir.path().join("ca.pem")).unwrap(),
        &std::fs::read_to_string(&ca_key).unwrap(),
    )
    .unwrap();
    // Valid for two more seconds: accepted by bind, expired at the dial.
    let until = std::time::SystemTime::now() + Duration::from_secs(2);
    let (cert, key) = ca.issue_until(Identity::Client, Some(until)).unwrap();
    std::fs::write(node.dir.path().join("soon.pem"), cert).unwrap();
    std::fs::write(node.dir.path().join("soon-key.pem"), key).unwrap();
    let t = Transport::bind(any_addr(), &node.material("soon"), Identity::Client, false).unwrap();
    // Waiting on the wall clock itself: nothing else marks the expiry.
    while std::time::SystemTime::now() < until + Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = tokio::time::timeout(Duration::from_secs(10), t.connect(node.addr, 1))
        .await
        .expect("bounded")
        .err()
        .expect("refused");
    let e = e.to_string();
    assert!(
        e.contains("node 1 refused this side's certificate")
            && e.contains("this side's certificate has expired"),
        "{e}"
    );
    node.shutdown().await;
}

async fn no_certificate_is_refused(dir: &Path, addr: SocketAddr) {
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![replicator::transport::tls::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut ep = quinn::Endpoint::client(any_addr()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let attempt = async {
        let conn = ep
            .connect(addr, "node-1")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3: the refusal surfaces on first use, not at connect.
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let hello = rpc::encode(
            &Request::Hello {
                claim: Claim::Client,
            },
            &[],
        )
        .unwrap();
        replicator::transport::write_frame(&mut send, rpc::kind::REQUEST, hello)
            .await
            .map_err(|e| e.to_string())?;
        replicator::transport::read_frame(&mut recv, 1 << 20)
            .await
            .map_err(|e| e.to_string())
            .map(|f| format!("{f:?}"))
    };
    let r = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .expect("bounded");
    assert!(
        r.is_err(),
        "a peer without a certificate got an answer: {r:?}"
    );
    ep.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_and_oversized_input_is_refused_and_the_node_keeps_serving() {
    let node = start().await;
    let c = node.client();
    seed(&c).await;
    let before = fingerprint(&c).await;

    // Junk datagrams at the QUIC port.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for i in 0..2000usize {
        let len = 1 + (i * 37) % 1400;
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = udp.send_to(&junk, node.addr);
    }

    let t = Transport::bind(
        any_addr(),
        &node.material("client"),
        Identity::Client,
        false,
    )
    .unwrap();
    let peer = t.connect(node.addr, 1).await.unwrap();
    let refusal = |f: Option<(u8, Bytes)>| -> String {
        let (kind, payload) = f.expect("an answer");
        assert_eq!(kind, rpc::kind::RESPONSE);
        match rpc::decode::<Response>(payload).unwrap().0 {
            Response::Error {
                error: RpcError::Invalid(why),
            } => why,
            other => panic!("expected Invalid, got {other:?}"),
        }
    };
    // A header announcing 1 GiB: refused from the header alone.
    let mut huge = vec![replicator::wire::VERSION, rpc::kind::REQUEST, 0, 0];
    huge.extend_from_slice(&(1u32 << 30).to_le_bytes());
    let why = refusal(peer.raw_exchange(&huge).await.unwrap());
    assert!(why.contains("over the"), "{why}");
    // Wrong version, reserved flags, unknown kind, junk JSON, truncated.
    let why = refusal(peer.raw_exchange(&[9, 10, 0, 0, 0, 0, 0, 0]).await.unwrap());
    assert!(why.contains("version"), "{why}");
    let v = replicator::wire::VERSION;
    let why = refusal(peer.raw_exchange(&[v, 10, 1, 0, 0, 0, 0, 0]).await.unwrap());
    assert!(why.contains("flags"), "{why}");
    let why = refusal(peer.raw_exchange(&[v, 77, 0, 0, 0, 0, 0, 0]).await.unwrap());
    assert!(why.contains("kind"), "{why}");
    let mut bad_json = vec![v, 10, 0, 0, 9, 0, 0, 0, 5, 0, 0, 0];
    bad_json.extend_from_slice(b"{oops");
    let why = refusal(peer.raw_exchange(&bad_json).await.unwrap());
    assert!(why.contains("rpc header"), "{why}");
    let truncated = [v, 1, 0, 0, 100, 0, 0, 0, 1, 2, 3];
    let why = refusal(peer.raw_exchange(&truncated).await.unwrap());
    assert!(why.contains("stream read"), "{why}");
    let produce = Request::Produce {
        topic: "t".into(),
        partition: 0,
        acks: Acks::All,
        timeout_ms: 1000,
        sequence: None,
    };
    // A produce whose body is not a record batch.
    let r = peer
        .request(&produce, Bytes::from_static(b"not a batch"))
        .await;
    assert!(
        matches!(r, Err(TransportError::Rejected(RpcError::Invalid(_)))),
        "{r:?}"
    );

    // Valid batches, but more of them than one produce may carry: refused
    // whole, before anything is appended.
    let one = replicator::batch::encode(
        0,
        0,
        &[Record {
            value: Bytes::from(vec![9u8; 1 << 20]),
            ..Default::default()
        }],
    )
    .expect("a 1 MiB batch");
    let oversized = std::iter::repeat_n(&one[..], 17)
        .flatten()
        .copied()
        .collect::<Vec<u8>>();
    let r = peer.request(&produce, oversized.into()).await;
    assert!(
        matches!(&r, Err(TransportError::Rejected(RpcError::Invalid(m))) if m.contains("limit")),
        "{r:?}"
    );

    // Same connection still serves, and nothing changed.
    let r = peer.request(&Request::Status {}, Bytes::new()).await;
    assert!(matches!(r, Ok((Response::Status { .. }, _))), "{r:?}");
    assert_eq!(fingerprint(&c).await, before, "state changed");
    c.close().await;
    node.shutdown().await;
}

/// A burst of requests on a fresh client waits for one connection to the
/// node instead of each making its own (32 handshakes, before this was
/// fixed); the node's metrics count the connections it accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_on_a_fresh_client_opens_one_connection() {
    let metrics = {
        let l = std::net::TcpListener::bind(any_addr()).unwrap();
        l.local_addr().unwrap()
    };
    let node = start_with(|c| c.metrics_listen = Some(metrics)).await;
    let accepted = || async move {
        let text = tokio::task::spawn_blocking(move || support::http_get(metrics, "/metrics"))
            .await
            .expect("metrics");
        let count = |peer: &str| {
            let name = format!("replicator_connections_accepted_total{{peer=\"{peer}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&name)?.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
        };
        (count("client"), count("node"))
    };
    assert_eq!(accepted().await, (0, 0), "before any client");
    for round in 1..=2u64 {
        let client = node.client();
        let burst = (0..32).map(|_| client.status(1));
        for answer in futures_util::future::join_all(burst).await {
            answer.expect("status");
        }
        assert_eq!(
            accepted().await,
            (round, 0),
            "client connections after {round} fresh clients' bursts of 32 requests"
        );
    }
    node.shutdown().await;
}

/// A request that gave up on a node that was down leaves nothing behind: once
/// the node is up, the next request connects at once. (A dial kept for
/// later requests would still be retransmitting its first packet to the
/// dead port, and the next request would wait for that, about a second
/// after it started: QUIC over UDP is not refused, only timed out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_given_up_on_a_down_node_does_not_hold_up_the_next() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), 2);
    let cfg = ClientConfig::load(&dir.path().join("client.toml")).unwrap();
    let client = Client::new(&cfg).unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(100), client.status(1)).await;
    assert!(gave_up.is_err(), "node 1 is not running yet: {gave_up:?}");
    let node = run_in(dir, |_| {}).await;
    let asked = std::time::Instant::now();
    client.status(1).await.expect("status once node 1 is up");
    let took = asked.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "the first request to node 1 once it was up took {took:?}"
    );
    node.shutdown().await;
}

/// A client that closes while it is still dialling a peer that never
/// answers (a node that is down) does not wait out that handshake's drain,
/// which quinn times from its initial RTT estimate (about 3 s). Every CLI
/// command dials every node, so each took 2 s longer (the old bound on the
/// wait) while any node was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_does_not_wait_for_a_handshake_to_a_silent_peer() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), 1);
    let silent = std::net::UdpSocket::bind(any_addr()).unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let t = Transport::bind(
        any_addr(),
        &material(dir.path(), "client"),
        Identity::Client,
        false,
    )
    .unwrap();
    let dialling = {
        let t = t.clone();
        tokio::spawn(async move { t.connect(silent_addr, 1).await })
    };
    // The handshake is in flight once its first packet arrives.
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let got = tokio::task::spawn_blocking(move || silent.recv(&mut [0u8; 2048]))
        .await
        .unwrap();
    assert!(
        got.as_ref().is_ok_and(|n| *n > 0),
        "no handshake packet: {got:?}"
    );
    let started = std::time::Instant::now();
    t.close().await;
    let took = started.elapsed();
    assert!(
        took <= replicator::transport::CLOSE_WAIT + Duration::from_secs(1),
        "closing took {took:?}"
    );
    let dialled = dialling.await.unwrap();
    assert!(
        dialled.is_err(),
        "connected to a silent socket: {:?}",
        dialled.map(|p| p.node())
    );
}

/// A config built in code is checked as a loaded one is: a zero
/// heartbeat interval used to start a node whose heartbeat tasks
/// panicked over and over (embedder run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_config_built_in_code_is_checked_before_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), 2);
    let mut config = NodeConfig::load(&dir.path().join("node-1.toml")).unwrap();
    config.failover.heartbeat_interval_ms = 0;
    let ran = tokio::time::timeout(
        Duration::from_secs(10),
        replicator::node::run(config, std::future::pending(), None),
    )
    .await
    .expect("refused at once");
    let e = ran.expect_err("refused").to_string();
    assert!(e.contains("heartbeat_interval_ms = 0"), "{e}");
}

/// Dropping a node's `run` (an aborted task) stops the node as a crash
/// would: it used to go on leading and acknowledging writes with its port
/// bound, and a restart in the same process could not bind (embedder
/// run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_run_is_dropped_stops_serving_and_frees_its_port() {
    let node = start().await;
    let c = node.client();
    seed(&c).await;
    node.task.abort();
    let (addr, _keep) = (node.addr, (node.dir, node.stop));
    // Aborted once the task has ended (the drop has run by then).
    assert!(node.task.await.is_err_and(|e| e.is_cancelled()));
    let one = [Record {
        key: None,
        value: Bytes::from_static(b"after"),
        timestamp: 0,
        headers: vec![],
    }];
    let after = c
        .produce("t", 0, &one, Acks::All, Duration::from_secs(2))
        .await;
    assert!(after.is_err(), "a dropped node acknowledged {after:?}");
    // Its socket goes once its tasks have: poll for it, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::UdpSocket::bind(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} still bound 10 s after the node's run was dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Client arguments that cannot work are refused before anything is
/// sent: a zero produce timeout used to send the records, commit them and
/// report a timeout; an empty node list failed every request with "no
/// node answered: " and nothing after it (embedder run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_arguments_that_cannot_work_are_refused_before_sending() {
    let node = start().await;
    let c = node.client();
    seed(&c).await;
    let one = [Record {
        key: None,
        value: Bytes::from_static(b"zero"),
        timestamp: 0,
        headers: vec![],
    }];
    let e = c
        .produce("t", 0, &one, Acks::All, Duration::ZERO)
        .await
        .expect_err("no time to wait");
    assert!(e.to_string().contains("at least 1 ms"), "{e}");
    let e = c
        .produce("t", 0, &one, Acks::All, Duration::from_nanos(1))
        .await
        .expect_err("under a millisecond");
    assert!(e.to_string().contains("at least 1 ms"), "{e}");
    let at = c
        .produce("t", 0, &one, Acks::All, Duration::from_secs(20))
        .await
        .expect("produce");
    assert_eq!(at, 10, "the refused produces wrote nothing");
    // "No limit" is taken as a very long one; it used to overflow the
    // clock and panic.
    let at = c
        .produce("t", 0, &one, Acks::All, Duration::MAX)
        .await
        .expect("produce with no limit");
    assert_eq!(at, 11);
    assert_eq!(
        c.topic_partitions_within("t", Duration::MAX)
            .await
            .expect("partitions"),
        vec![0]
    );
    let mut cfg = ClientConfig::load(&node.dir.path().join("client.toml")).unwrap();
    cfg.nodes.clear();
    let e = Client::new(&cfg).err().expect("no nodes").to_string();
    assert!(e.contains("`nodes` is empty"), "{e}");
    node.shutdown().await;
}
