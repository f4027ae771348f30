//! The S3 storage plugin against a real S3-compatible server (moto, with
//! signature checking on; tests/support/s3.rs), each test with its own:
//! the conformance suite, recovery from a damaged segment, fencing of a
//! second writer, clear errors for wrong credentials and a missing bucket,
//! the sandbox's endpoint allow-list, and a server that goes away and
//! comes back. The cluster test runs three node processes on it.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use replicator::batch::{self, Record};
use replicator::conformance::{self, Options, Subject};
use replicator::node::config::PluginSection;
use replicator::plugin::{PluginLog, PluginSource, Sandbox, StoragePlugin};
use replicator::storage::{OffsetBounds, PartitionLog, StorageError};
use support::s3::Moto;
use support::{Cluster, cli, cli_ok, converged};

/// The plugin's settings for `moto` under `prefix`.
fn config(moto: &Moto, prefix: &str) -> Vec<(String, String)> {
    vec![
        ("endpoint".into(), moto.endpoint()),
        ("bucket".into(), moto.bucket().into()),
        ("access_key_id".into(), moto.access_key_id().into()),
        ("secret_access_key".into(), moto.secret_access_key().into()),
        ("prefix".into(), prefix.into()),
        ("timeout.ms".into(), "1000".into()),
    ]
}

/// The plugin in the sandbox a node would give it for `config`: HTTP to
/// the `endpoint` setting only.
fn plugin(config: &[(String, String)]) -> StoragePlugin {
    let section = PluginSection {
        plugin: "s3".into(),
        config: config.iter().cloned().collect(),
        thread_per_partition: None,
        write_behind_ms: None,
    };
    section.validate().expect("valid storage section");
    StoragePlugin::load(&PluginSource::Builtin("s3".into()), section.sandbox()).expect("load s3")
}

async fn open(config: &[(String, String)]) -> Result<PluginLog, StorageError> {
    plugin(config).open("t", 0, config.to_vec(), None).await
}

fn batch_at(i: u64, size: usize) -> Bytes {
    let r = Record {
        value: Bytes::from(vec![i as u8; size]),
        ..Default::default()
    };
    batch::encode(i, 1, &[r]).expect("encode")
}

async fn fill(log: &PluginLog, from: u64, n: u64) -> Vec<Bytes> {
    let mut out = Vec::new();
    for i in from..from + n {
        let b = batch_at(i, 300);
        let end = log.append(b.clone()).await.expect("append");
        assert_eq!(end, i + 1);
        out.push(b);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_plugin_passes_the_storage_conformance_suite() {
    let moto = Moto::start();
    // Small segments, so reads, truncations and prefix deletes cross them.
    let mut config = config(&moto, "conformance/");
    config.push(("segment.bytes".into(), "8192".into()));
    let subject = Subject::new(plugin(&config), config).persistent(true);
    let scratch = tempfile::tempdir().expect("tempdir");
    let options = Options {
        proptest_cases: support::proptest_cases(),
        filter: None,
    };
    let report = conformance::run(&subject, scratch.path(), &options, |_| {}).await;
    println!("s3:\n{report}");
    assert_eq!(report.failed(), 0, "s3 failed conformance:\n{report}");
    // Objects are written whole, so no tail can be torn: that case (which
    // cuts files short) has nothing to cut. Damage is tested below.
    let skipped: Vec<_> = report
        .cases
        .iter()
        .filter(|c| matches!(c.outcome, conformance::Outcome::Skipped(_)))
        .map(|c| c.name)
        .collect();
    assert_eq!(skipped, ["torn-tail-recovery"], "{report}");
    let keys = moto.list_keys("conformance/");
    for kind in ["/gen/", "/seg/", "/chk/"] {
        assert!(
            keys.iter().any(|(k, _)| k.contains(kind)),
            "no {kind} object written: {keys:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_validates_segments_and_cuts_a_damaged_one() {
    let moto = Moto::start();
    let mut config = config(&moto, "damage/");
    config.push(("segment.bytes".into(), "2048".into()));
    let log = open(&config).await.expect("open");
    let batches = fill(&log, 0, 30).await;
    log.set_high_watermark(30).await.expect("hw");
    log.close().await;
    let mut segments: Vec<(String, u64)> = moto
        .list_keys("damage/t/0/seg/")
        .into_iter()
        .filter(|(_, size)| *size > 0)
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "segments: {segments:?}");
    // Every byte went up exactly once, in whole batches.
    let stored: u64 = segments.iter().map(|(_, s)| s).sum();
    let appended: u64 = batches.iter().map(|b| b.len() as u64).sum();
    assert_eq!(stored, appended);

    // Flip a byte in the middle segment's second batch.
    let (key, _) = &segments[1];
    let base: u64 = key
        .rsplit('/')
        .next()
        .and_then(|n| n.split('-').next())
        .and_then(|b| b.parse().ok())
        .expect("segment name <base>-<gen>");
    let mut bytes = moto.get(key);
    let second = batches[base as usize].len() + 60;
    bytes[second] ^= 0xff;
    moto.put(key, &bytes);

    let log = open(&config).await.expect("reopen a damaged log");
    let b = log.bounds().await.expect("bounds");
    assert_eq!(
        b,
        OffsetBounds {
            log_start: 0,
            log_end: base + 1
        },
        "the log must be cut back to the last whole batch before the damage"
    );
    let r = log.read(base, 1).await.expect("read the last good batch");
    assert_eq!(r, batches[base as usize]);
    // Appends go on from there, and survive another reopen.
    fill(&log, base + 1, 3).await;
    log.close().await;
    let log = open(&config).await.expect("reopen");
    assert_eq!(log.bounds().await.expect("bounds").log_end, base + 4);
    log.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_segment_is_refused_and_an_abandoned_fence_is_skipped() {
    let moto = Moto::start();
    let mut config = config(&moto, "missing/");
    config.push(("segment.bytes".into(), "2048".into()));
    let log = open(&config).await.expect("open");
    let batches = fill(&log, 0, 20).await;
    log.close().await;
    // An opener that died after taking its generation's fence, before
    // writing its manifest: the next open skips it and loses nothing.
    let fences = moto.list_keys("missing/t/0/gen/");
    let top: u64 = fences
        .iter()
        .filter_map(|(k, _)| k.rsplit('/').next()?.parse().ok())
        .max()
        .expect("a fence");
    moto.put(&format!("missing/t/0/gen/{:020}", top + 1), b"abandoned");
    let log = open(&config).await.expect("open past an abandoned fence");
    assert_eq!(log.bounds().await.expect("bounds").log_end, 20);
    assert_eq!(log.read(19, 1).await.expect("read"), batches[19]);
    log.close().await;

    // A segment deleted behind the plugin's back: refuse to open, and
    // touch nothing, rather than cut the log and collect the rest.
    let mut segments = moto.list_keys("missing/t/0/seg/");
    segments.sort();
    assert!(segments.len() >= 3, "{segments:?}");
    moto.delete(&segments[1].0);
    let before = moto.list_keys("missing/");
    let err = open(&config).await.err().expect("a hole in the log");
    assert!(
        matches!(&err, StorageError::Corrupt(m) if m.contains("missing")),
        "{err}"
    );
    let after: Vec<_> = moto
        .list_keys("missing/")
        .into_iter()
        .filter(|(k, _)| !k.contains("/gen/"))
        .collect();
    let before: Vec<_> = before
        .into_iter()
        .filter(|(k, _)| !k.contains("/gen/"))
        .collect();
    assert_eq!(after, before, "a refused open must not delete anything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_larger_than_a_segment_is_split_into_segments() {
    let moto = Moto::start();
    let mut config = config(&moto, "split/");
    config.push(("segment.bytes".into(), "65536".into()));
    let log = open(&config).await.expect("open");
    // One append of 40 batches of ~10 KB, as a follower appends a whole
    // fetch response: far more than one segment.
    let batches: Vec<Bytes> = (0..40).map(|i| batch_at(i, 10_000)).collect();
    let whole: Vec<u8> = batches.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(log.append(Bytes::from(whole)).await.expect("append"), 40);
    log.flush().await.expect("flush");
    log.close().await;
    let segments = moto.list_keys("split/t/0/seg/");
    let largest_batch = batches.iter().map(Bytes::len).max().unwrap_or(0) as u64;
    assert!(segments.len() >= 6, "{segments:?}");
    for (key, size) in &segments {
        assert!(
            *size <= 65536,
            "{key} holds {size} bytes, over segment.bytes"
        );
        assert!(*size >= largest_batch, "{key} holds {size} bytes");
    }
    let log = open(&config).await.expect("reopen");
    assert_eq!(log.bounds().await.expect("bounds").log_end, 40);
    assert_eq!(log.read(39, 1).await.expect("read"), batches[39]);
    log.close().await;
}

/// A store that loses what it held under a running writer (a bucket
/// emptied, an in-memory S3 server restarted): the writer's next upload
/// finds its own fence gone and fails as fenced, and the log is reopened
/// from what the store holds, which says what is missing. The writer used
/// to go on from memory, healthy in every status, until a restart found
/// segments no manifest named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_lost_its_data_is_noticed_at_the_next_upload() {
    let moto = Moto::start();
    let config = config(&moto, "lost/");
    let log = open(&config).await.expect("open");
    fill(&log, 0, 5).await;
    log.flush().await.expect("flush");
    for (key, _) in moto.list_keys("lost/") {
        moto.delete(&key);
    }
    fill(&log, 5, 2).await;
    let err = log
        .flush()
        .await
        .expect_err("an upload into the emptied store");
    assert!(
        matches!(&err, StorageError::Fault { detail, .. }
            if detail.contains("no longer holds this writer's fence")),
        "{err}"
    );
    log.close().await;
    // What the store holds now: the segment of the upload that noticed,
    // and no manifest naming it.
    let err = open(&config).await.err().expect("a log the store lost");
    assert!(
        matches!(&err, StorageError::Corrupt(m) if m.contains("no manifest")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_fences_the_first() {
    let moto = Moto::start();
    let config = config(&moto, "fence/");
    let first = open(&config).await.expect("open first");
    fill(&first, 0, 5).await;
    first.flush().await.expect("flush first");
    // A second instance opens the same partition prefix (a node restarted
    // while its old process still runs, or two nodes sharing a prefix).
    let second = open(&config).await.expect("open second");
    assert_eq!(second.bounds().await.expect("bounds").log_end, 5);
    // The first may still buffer, but cannot make anything durable.
    fill(&first, 5, 2).await;
    let err = first.flush().await.expect_err("a fenced writer's flush");
    assert!(
        matches!(&err, StorageError::Fault { detail, .. } if detail.contains("fenced")),
        "{err}"
    );
    fill(&second, 5, 3).await;
    second.flush().await.expect("flush second");
    second.close().await;
    first.close().await;
    // What counts is the second writer's log: 8 batches, its own.
    let third = open(&config).await.expect("open third");
    assert_eq!(third.bounds().await.expect("bounds").log_end, 8);
    let r = third.read(5, 1).await.expect("read");
    assert_eq!(r, batch_at(5, 300));
    third.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_a_missing_bucket_are_clear_errors() {
    let moto = Moto::start();
    let mut bad = config(&moto, "creds/");
    for (k, v) in bad.iter_mut() {
        if k == "secret_access_key" {
            *v = "not-the-secret".into();
        }
    }
    let err = open(&bad).await.err().expect("wrong secret refused");
    let text = err.to_string();
    assert!(matches!(err, StorageError::InvalidInput(_)), "{text}");
    assert!(
        text.contains("S3 refused the credentials") && text.contains("SignatureDoesNotMatch"),
        "{text}"
    );
    let mut no_bucket = config(&moto, "creds/");
    for (k, v) in no_bucket.iter_mut() {
        if k == "bucket" {
            *v = "no-such-bucket".into();
        }
    }
    let err = open(&no_bucket)
        .await
        .err()
        .expect("missing bucket refused");
    assert!(
        err.to_string()
            .contains("bucket `no-such-bucket` does not exist"),
        "{err}"
    );
    let missing = vec![("endpoint".into(), moto.endpoint())];
    let err = open(&missing).await.err().expect("no bucket setting");
    assert!(err.to_string().contains("needs `bucket`"), "{err}");
    // Nothing was written by the refused opens.
    assert!(moto.list_keys("creds/").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_reaches_only_its_configured_endpoint() {
    let moto = Moto::start();
    let config = config(&moto, "sandbox/");
    // The sandbox allows another authority than the plugin is told to use.
    let sandbox = Sandbox::default().allow_http(["127.0.0.1:1".to_string()]);
    let plugin =
        StoragePlugin::load(&PluginSource::Builtin("s3".into()), sandbox).expect("load s3");
    let err = plugin
        .open("t", 0, config.clone(), None)
        .await
        .err()
        .expect("request outside the allow-list");
    assert!(
        err.to_string().contains("not in the sandbox's allow-list"),
        "{err}"
    );
    // Other built-in storage plugins get nothing either: the default
    // sandbox allows no HTTP at all.
    assert!(Sandbox::default().http_allow.is_empty());
    assert!(moto.list_keys("sandbox/").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_is_a_contained_fault_and_nothing_is_lost() {
    let moto = Moto::start();
    let config = config(&moto, "pause/");
    let log = open(&config).await.expect("open");
    let batches = fill(&log, 0, 10).await;
    log.flush().await.expect("flush");
    fill(&log, 10, 5).await;
    moto.pause();
    let started = Instant::now();
    let err = log
        .flush()
        .await
        .expect_err("flush while the server is away");
    let took = started.elapsed();
    assert!(
        matches!(err, StorageError::Unavailable(_)),
        "want unavailable, got {err}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // Reads of what is in memory still work, and so does the log's state.
    assert_eq!(log.read(3, 1).await.expect("read"), batches[3]);
    moto.resume();
    // The same instance uploads the buffered batches once the store is back.
    log.flush().await.expect("flush after resume");
    log.close().await;
    let log = open(&config).await.expect("reopen");
    assert_eq!(log.bounds().await.expect("bounds").log_end, 15);
    assert_eq!(log.read(12, 1).await.expect("read"), batch_at(12, 300));
    log.close().await;
}

/// `produce --count n --size 64 --json` to `topic`; the JSON summary.
fn produce(client: &str, topic: &str, n: &str) -> serde_json::Value {
    let out = cli(&[
        "produce", "--config", client, "--topic", topic, "--count", n, "--size", "64", "--acks",
        "all", "--json",
    ]);
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())
        .unwrap_or(serde_json::Value::Null)
}

/// `cluster init` of `n` nodes on the s3 plugin against `moto`, with more
/// `key=value` storage settings and `env` for the nodes; the nodes started
/// and topic `t` created with replication factor `n`.
fn s3_cluster(moto: &Moto, n: u32, settings: &[&str], env: &[(&str, &str)]) -> Cluster {
    let mut pairs = vec![
        format!("endpoint={}", moto.endpoint()),
        format!("bucket={}", moto.bucket()),
    ];
    pairs.extend(settings.iter().map(|s| s.to_string()));
    let args: Vec<&str> = pairs
        .iter()
        .flat_map(|p| ["--storage-config", p.as_str()])
        .collect();
    let mut c = Cluster::init_with(n, "s3", &args, |t| t);
    c.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    c.start_all();
    c.wait_up();
    cli_ok(&[
        "topic",
        "create",
        "--config",
        &c.client(),
        "--topic",
        "t",
        "--replication-factor",
        &n.to_string(),
    ]);
    c
}

#[test]
fn three_nodes_on_s3_replicate_and_ride_out_the_store_going_away() {
    let moto = Moto::start();
    // Credentials from the environment, as an operator would pass them.
    let mut c = s3_cluster(
        &moto,
        3,
        &["segment.bytes=65536", "upload.interval.ms=200"],
        &[
            ("AWS_ACCESS_KEY_ID", moto.access_key_id()),
            ("AWS_SECRET_ACCESS_KEY", moto.secret_access_key()),
        ],
    );
    let node1 = std::fs::read_to_string(c.path().join("node-1.toml")).expect("node-1.toml");
    assert!(node1.contains("prefix = \"node-1/\""), "{node1}");
    assert!(!node1.contains(moto.secret_access_key()));
    let client = c.client();
    let s = produce(&client, "t", "3000");
    assert_eq!(s["failed"], 0, "{s}");
    c.wait_status("3000 everywhere", |v| converged(v, "t", 0, 3000));
    // Each node wrote its own objects.
    for id in 1..=3 {
        let keys = moto.list_keys(&format!("node-{id}/t/0/seg/"));
        assert!(!keys.is_empty(), "node {id} uploaded no segment");
    }

    // The store goes away for 3 s under load: writes may fail or wait,
    // but no node dies, and every acknowledged write stays.
    moto.pause();
    let during = std::thread::spawn({
        let client = client.clone();
        move || produce(&client, "t", "500")
    });
    std::thread::sleep(Duration::from_secs(3));
    moto.resume();
    let during = during.join().expect("producer thread");
    let acked_during = 500 - during["failed"].as_u64().unwrap_or(500);
    for id in 1..=3u32 {
        assert!(
            c.nodes[(id - 1) as usize].as_mut().is_some_and(|n| n
                .try_wait()
                .ok()
                .flatten()
                .is_none()),
            "node {id} exited while the store was away:\n{}",
            c.log(id)
        );
    }
    // Back: writes are acknowledged again.
    let after = Instant::now();
    let s = loop {
        let s = produce(&client, "t", "1000");
        if s["failed"] == 0 || after.elapsed() > Duration::from_secs(60) {
            break s;
        }
    };
    assert_eq!(s["failed"], 0, "writes after the store came back: {s}");
    println!(
        "store paused 3 s: {acked_during} of 500 writes acknowledged during the pause; 1000 more all acknowledged {:.1} s after it came back",
        after.elapsed().as_secs_f64()
    );
    let v = c.wait_status("the ISR full again", |v| {
        support::partition(v, "t", 0).is_some_and(|p| {
            p["isr"].as_array().map(|a| a.len()) == Some(3)
                && p["replica_log_ends"].as_array().is_some_and(|r| {
                    r.iter()
                        .all(|e| e[1].as_u64() == p["high_watermark"].as_u64())
                })
        })
    });
    let hw = support::partition(&v, "t", 0).expect("t/0")["high_watermark"]
        .as_u64()
        .expect("hw");
    assert!(
        hw >= 3000 + acked_during + 1000,
        "hw {hw}: acknowledged writes are missing ({acked_during} during the pause)"
    );

    // A node killed hard comes back from its objects alone: its data
    // directory holds nothing of the log.
    c.kill(2);
    c.start(2);
    c.wait_status("node 2 back in sync", |v| converged(v, "t", 0, hw));
    let log2 = c.log(2);
    let reopened = log2
        .lines()
        .rfind(|l| l.contains("opened log: [0, "))
        .expect("node 2 reopened its log");
    assert!(
        !reopened.contains("opened log: [0, 0)"),
        "node 2 came back empty: {reopened}"
    );
}

#[test]
fn a_node_with_wrong_credentials_says_so() {
    let moto = Moto::start();
    let key = format!("access_key_id={}", moto.access_key_id());
    let c = s3_cluster(&moto, 1, &[&key, "secret_access_key=wrong"], &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.log(1).contains("S3 refused the credentials") {
        assert!(
            Instant::now() < deadline,
            "no clear error in the node's log:\n{}",
            c.log(1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(c.log(1).contains("cannot open t/0"), "{}", c.log(1));
}
