//! The file metadata plugin through its host binding: several clients,
//! each its own instance (as several node processes would have), sharing
//! one directory. Compare-and-set must let exactly one of racing writers
//! win, broker epochs must increase, bad input and damaged files must come
//! back as errors, never as traps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use replicator::metadata::{Broker, MetadataError, MetadataStore, PartitionState};
use replicator::plugin::{MetadataPlugin, PluginMetadata, PluginSource, Sandbox};

#[path = "support/small_disk.rs"]
mod small_disk;
use small_disk::SmallDisk;

fn plugin() -> MetadataPlugin {
    MetadataPlugin::load(&PluginSource::Builtin("file".into()), Sandbox::default()).expect("load")
}

async fn connect(dir: &Path) -> PluginMetadata {
    plugin().connect(dir, Vec::new()).await.expect("connect")
}

/// Two clients, as two node processes would have, on one directory.
async fn two_clients(dir: &Path) -> (PluginMetadata, PluginMetadata) {
    (connect(dir).await, connect(dir).await)
}

fn state(topic: &str, partition: u32, leader: u32, leader_epoch: u32) -> PartitionState {
    PartitionState {
        topic: topic.into(),
        partition,
        leader: Some(leader),
        leader_epoch,
        isr: vec![1, 2, 3],
        elr: vec![],
        replicas: vec![1, 2, 3],
        min_insync: 2,
        version: 0,
    }
}

fn version_file(dir: &Path, topic: &str, partition: u32, version: u64) -> PathBuf {
    dir.join("partitions")
        .join(topic)
        .join(partition.to_string())
        .join(format!("{version:020}.json"))
}

fn version_files(dir: &Path, topic: &str, partition: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(
        dir.join("partitions")
            .join(topic)
            .join(partition.to_string()),
    )
    .expect("partition dir")
    .flatten()
    .map(|e| e.file_name().to_string_lossy().into_owned())
    .filter(|n| n.ends_with(".json"))
    .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_twice_lets_exactly_one_win() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_clients(dir.path()).await;

    assert_eq!(a.compare_and_set(state("t", 0, 1, 0), 0).await, Ok(1));
    let lost = b.compare_and_set(state("t", 0, 2, 0), 0).await;
    assert!(matches!(lost, Err(MetadataError::Conflict(_))), "{lost:?}");

    // At the same time, from both instances.
    let (ra, rb) = tokio::join!(
        a.compare_and_set(state("u", 0, 1, 0), 0),
        b.compare_and_set(state("u", 0, 2, 0), 0)
    );
    let wins = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "exactly one create wins: {ra:?} {rb:?}");
    for r in [&ra, &rb] {
        assert!(
            matches!(r, Ok(1) | Err(MetadataError::Conflict(_))),
            "{r:?}"
        );
    }
    let stored = b.get_partition("u", 0).await.expect("get");
    let winner = if ra.is_ok() { 1 } else { 2 };
    assert_eq!(stored.leader, Some(winner));
    assert_eq!(stored.version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_version_is_a_conflict_naming_both_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_clients(dir.path()).await;
    assert_eq!(a.compare_and_set(state("t", 0, 1, 0), 0).await, Ok(1));
    assert_eq!(b.compare_and_set(state("t", 0, 2, 1), 1).await, Ok(2));
    match a.compare_and_set(state("t", 0, 3, 2), 1).await {
        Err(MetadataError::Conflict(m)) => {
            assert!(
                m.contains('1') && m.contains('2'),
                "names both versions: {m}"
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Ahead of the store is a conflict too.
    let ahead = a.compare_and_set(state("t", 0, 3, 2), 7).await;
    assert!(
        matches!(ahead, Err(MetadataError::Conflict(_))),
        "{ahead:?}"
    );
    // Updating a partition that does not exist.
    let missing = a.compare_and_set(state("nope", 0, 1, 0), 3).await;
    assert!(
        matches!(missing, Err(MetadataError::Conflict(_))),
        "{missing:?}"
    );
    assert_eq!(a.get_partition("t", 0).await.expect("get").leader, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_get_exactly_one_winner_per_version() {
    const TASKS_PER_CLIENT: u32 = 4;
    // Four connections (four instances, each serving its calls one at a
    // time) and enough versions that the race is all but certain to happen
    // even on a busy machine; it is asserted below.
    const TARGET: u64 = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_clients(dir.path()).await;
    let (c2, d) = two_clients(dir.path()).await;
    assert_eq!(a.compare_and_set(state("race", 3, 1, 0), 0).await, Ok(1));

    let mut tasks = Vec::new();
    for (c, client) in [a.clone(), b.clone(), c2.clone(), d.clone()]
        .into_iter()
        .enumerate()
    {
        for t in 0..TASKS_PER_CLIENT {
            let client = client.clone();
            let tag = c as u32 * 100 + t;
            tasks.push(tokio::spawn(async move {
                let mut won = Vec::new();
                let mut conflicts = 0u32;
                loop {
                    let current = client.get_partition("race", 3).await.expect("get");
                    if current.version >= TARGET {
                        return (tag, won, conflicts);
                    }
                    // The leader epoch carries the version and the writer's
                    // tag, growing with the version as epochs must (the
                    // host refuses an epoch that goes back).
                    let mut next = current.clone();
                    next.leader_epoch = (current.version as u32 + 1) * 1000 + tag;
                    match client.compare_and_set(next, current.version).await {
                        Ok(v) => {
                            assert_eq!(v, current.version + 1);
                            won.push(v);
                        }
                        Err(MetadataError::Conflict(_)) => conflicts += 1,
                        Err(e) => panic!("writer {tag}: {e}"),
                    }
                }
            }));
        }
    }
    let mut winners: BTreeMap<u64, u32> = BTreeMap::new();
    let mut conflicts = 0;
    for t in tasks {
        let (tag, won, c) = t.await.expect("task");
        conflicts += c;
        for v in won {
            if let Some(other) = winners.insert(v, tag) {
                panic!("version {v} won by both writer {other} and writer {tag}");
            }
        }
    }
    let versions: Vec<u64> = winners.keys().copied().collect();
    assert_eq!(
        versions,
        (2..=TARGET).collect::<Vec<_>>(),
        "one winner for every version"
    );
    assert!(conflicts > 0, "the writers did race");
    for client in [&a, &b] {
        let last = client.get_partition("race", 3).await.expect("get");
        assert_eq!(last.version, TARGET);
        assert_eq!(last.leader_epoch, TARGET as u32 * 1000 + winners[&TARGET]);
    }
    // Old versions are pruned; the newest are kept.
    let files = version_files(dir.path(), "race", 3);
    assert!(files.len() < 20, "pruned: {files:?}");
    assert_eq!(
        files.last().map(String::as_str),
        Some(format!("{TARGET:020}.json").as_str())
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("partitions/race/3"))
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary files left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_returns_the_newest_version_in_the_documented_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_clients(dir.path()).await;
    let missing = a.get_partition("t", 0).await;
    assert!(
        matches!(missing, Err(MetadataError::NotFound(_))),
        "{missing:?}"
    );

    assert_eq!(a.compare_and_set(state("t", 0, 1, 0), 0).await, Ok(1));
    let mut s = state("t", 0, 2, 1);
    s.isr = vec![2, 3];
    s.version = 99; // ignored: the store sets it
    assert_eq!(b.compare_and_set(s.clone(), 1).await, Ok(2));
    let got = a.get_partition("t", 0).await.expect("get");
    assert_eq!(
        got,
        PartitionState {
            version: 2,
            ..s.clone()
        }
    );

    let mut none = got.clone();
    none.leader = None;
    none.isr = vec![];
    none.elr = vec![2, 3];
    assert_eq!(a.compare_and_set(none.clone(), 2).await, Ok(3));
    assert_eq!(
        b.get_partition("t", 0).await,
        Ok(PartitionState { version: 3, ..none })
    );

    // The on-disk format: one JSON file per version, named by it. (The
    // host has no JSON dev-dependency, so the fields are checked as text.)
    let file = version_file(dir.path(), "t", 0, 2);
    let json = std::fs::read_to_string(&file).expect("version 2 file");
    for field in [
        "\"topic\":\"t\"",
        "\"partition\":0",
        "\"leader\":2",
        "\"leader_epoch\":1",
        "\"isr\":[2,3]",
        "\"elr\":[]",
        "\"replicas\":[1,2,3]",
        "\"version\":2",
    ] {
        assert!(json.contains(field), "{field} in {json}");
    }
    let json = std::fs::read_to_string(version_file(dir.path(), "t", 0, 3)).expect("version 3");
    assert!(json.contains("\"elr\":[2,3]"), "{json}");

    // A file written before the ELR (and min.insync) fields existed reads
    // as having none.
    let old = r#"{"topic":"t","partition":0,"leader":3,"leader_epoch":2,"isr":[3],"replicas":[1,2,3],"version":4}"#;
    std::fs::write(version_file(dir.path(), "t", 0, 4), old).expect("write version 4");
    let got = a.get_partition("t", 0).await.expect("get version 4");
    assert_eq!((got.version, got.elr, got.min_insync), (4, vec![], 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_partitions_is_sorted_and_shared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_clients(dir.path()).await;
    assert_eq!(a.list_partitions().await, Ok(vec![]));
    a.compare_and_set(state("t1", 2, 1, 0), 0)
        .await
        .expect("t1/2");
    b.compare_and_set(state("t1", 0, 1, 0), 0)
        .await
        .expect("t1/0");
    a.compare_and_set(state("a-topic", 10, 1, 0), 0)
        .await
        .expect("a-topic/10");
    b.compare_and_set(state("t1", 9, 1, 0), 0)
        .await
        .expect("t1/9");
    // A partition directory left by a crashed create, and foreign entries.
    std::fs::create_dir_all(dir.path().join("partitions/t1/5")).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("partitions/t1/007")).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("partitions/bad topic/0")).expect("mkdir");
    std::fs::write(dir.path().join("partitions/README"), "hi").expect("write");
    let want = vec![
        ("a-topic".to_string(), 10),
        ("t1".to_string(), 0),
        ("t1".to_string(), 2),
        ("t1".to_string(), 9),
    ];
    assert_eq!(a.list_partitions().await, Ok(want.clone()));
    assert_eq!(b.list_partitions().await, Ok(want));
    // The crashed create does not block creating the partition.
    assert_eq!(b.compare_and_set(state("t1", 5, 1, 0), 0).await, Ok(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_epochs_increase_and_list_shows_the_latest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_clients(dir.path()).await;
    assert_eq!(a.list_brokers().await, Ok(vec![]));
    let e1 = a
        .register_broker(1, "127.0.0.1:9001".into())
        .await
        .expect("register");
    let e2 = b
        .register_broker(1, "127.0.0.1:9101".into())
        .await
        .expect("re-register");
    assert!(e2 > e1, "{e1} then {e2}");
    let e3 = b
        .register_broker(2, "127.0.0.1:9002".into())
        .await
        .expect("register 2");
    assert_eq!(
        a.list_brokers().await,
        Ok(vec![
            Broker {
                id: 1,
                address: "127.0.0.1:9101".into(),
                epoch: e2
            },
            Broker {
                id: 2,
                address: "127.0.0.1:9002".into(),
                epoch: e3
            },
        ])
    );

    // Concurrent registrations of one id (two incarnations): distinct
    // epochs, all above the earlier ones.
    let mut handles = Vec::new();
    for i in 0..8u32 {
        let c = if i % 2 == 0 { a.clone() } else { b.clone() };
        handles.push(tokio::spawn(async move {
            c.register_broker(1, format!("127.0.0.1:{}", 9200 + i))
                .await
        }));
    }
    let mut epochs = Vec::new();
    for h in handles {
        epochs.push(h.await.expect("task").expect("register"));
    }
    epochs.sort_unstable();
    let n = epochs.len();
    epochs.dedup();
    assert_eq!(epochs.len(), n, "distinct epochs: {epochs:?}");
    assert!(epochs[0] > e2);
    let listed = b.list_brokers().await.expect("list");
    assert_eq!(listed[0].epoch, *epochs.last().expect("some"));

    let bad = a.register_broker(3, String::new()).await;
    assert!(
        matches!(bad, Err(MetadataError::InvalidInput(_))),
        "{bad:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = connect(dir.path()).await;
    let long = "x".repeat(250);
    for topic in ["", "bad topic", "a/b", "..", ".", "ü", long.as_str()] {
        let r = a.compare_and_set(state(topic, 0, 1, 0), 0).await;
        assert!(
            matches!(r, Err(MetadataError::InvalidInput(_))),
            "{topic:?}: {r:?}"
        );
        let r = a.get_partition(topic, 0).await;
        assert!(
            matches!(r, Err(MetadataError::InvalidInput(_))),
            "{topic:?}: {r:?}"
        );
    }
    assert_eq!(
        a.compare_and_set(state(&"x".repeat(249), 0, 1, 0), 0).await,
        Ok(1)
    );
    assert_eq!(a.compare_and_set(state("Aa0._-", 0, 1, 0), 0).await, Ok(1));

    let mut no_replicas = state("t", 0, 1, 0);
    no_replicas.replicas.clear();
    no_replicas.isr.clear();
    no_replicas.leader = None;
    let mut duplicate = state("t", 0, 1, 0);
    duplicate.replicas = vec![1, 2, 1];
    let mut isr_outside = state("t", 0, 1, 0);
    isr_outside.isr = vec![1, 4];
    let mut leader_outside = state("t", 0, 1, 0);
    leader_outside.leader = Some(7);
    for (what, s) in [
        ("no replicas", no_replicas),
        ("duplicate replica", duplicate),
        ("isr outside replicas", isr_outside),
        ("leader outside replicas", leader_outside),
    ] {
        let r = a.compare_and_set(s, 0).await;
        assert!(
            matches!(r, Err(MetadataError::InvalidInput(_))),
            "{what}: {r:?}"
        );
    }
    let r = a.compare_and_set(state("t", 0, 1, 0), u64::MAX).await;
    assert!(matches!(r, Err(MetadataError::InvalidInput(_))), "{r:?}");
    // What no node would read back is not written: a version or an
    // epoch past the largest a partition can reach.
    let r = a.compare_and_set(state("t", 0, 1, 0), u64::MAX >> 1).await;
    assert!(matches!(r, Err(MetadataError::InvalidInput(_))), "{r:?}");
    let r = a
        .compare_and_set(
            state("huge", 0, 1, replicator::core::MAX_LEADER_EPOCH + 1),
            0,
        )
        .await;
    assert!(
        matches!(&r, Err(MetadataError::InvalidInput(m)) if m.contains("past the largest")),
        "{r:?}"
    );
    assert!(matches!(
        a.get_partition("huge", 0).await,
        Err(MetadataError::NotFound(_))
    ));
    a.compare_and_set(state("huge", 0, 1, replicator::core::MAX_LEADER_EPOCH), 0)
        .await
        .expect("the largest epoch itself is written");
    assert_eq!(a.list_partitions().await.expect("list").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_newest_version_is_reported_not_trapped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_clients(dir.path()).await;
    a.compare_and_set(state("t", 0, 1, 0), 0)
        .await
        .expect("create");
    a.compare_and_set(state("t", 0, 2, 1), 1)
        .await
        .expect("update");
    std::fs::write(
        version_file(dir.path(), "t", 0, 2),
        b"{\"topic\": \"t\", \"parti",
    )
    .expect("damage");
    for client in [&a, &b] {
        match client.get_partition("t", 0).await {
            Err(MetadataError::Corrupt(m)) => {
                assert!(
                    m.contains(&format!("{:020}.json", 2)),
                    "names the file: {m}"
                );
            }
            other => panic!("expected corrupt, got {other:?}"),
        }
    }
    // A well-formed file that holds another partition's state.
    std::fs::write(
        version_file(dir.path(), "t", 0, 2),
        br#"{"topic":"u","partition":0,"leader":1,"leader_epoch":0,"isr":[1],"replicas":[1],"version":2}"#,
    )
    .expect("damage");
    let r = b.get_partition("t", 0).await;
    assert!(matches!(r, Err(MetadataError::Corrupt(_))), "{r:?}");
    // A broken broker registration.
    b.register_broker(4, "h:1".into()).await.expect("register");
    std::fs::write(
        dir.path().join(format!("brokers/4/{:020}.json", 1)),
        b"\xff\xfe",
    )
    .expect("damage");
    let r = a.list_brokers().await;
    assert!(matches!(r, Err(MetadataError::Corrupt(_))), "{r:?}");
    // The instances are fine: other calls still work.
    assert_eq!(a.list_partitions().await, Ok(vec![("t".to_string(), 0)]));
    // The damage can be repaired by writing the next version.
    assert_eq!(b.compare_and_set(state("t", 0, 3, 2), 2).await, Ok(3));
    assert_eq!(a.get_partition("t", 0).await.expect("get").leader, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_is_checked_and_dir_is_honoured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = plugin()
        .connect(dir.path(), vec![("endpoints".into(), "x".into())])
        .await;
    match r {
        Err(MetadataError::InvalidInput(m)) => assert!(m.contains("endpoints"), "{m}"),
        Err(e) => panic!("expected invalid input, got {e:?}"),
        Ok(_) => panic!("expected invalid input, got a connection"),
    }
    let r = plugin()
        .connect(dir.path(), vec![("dir".into(), "relative".into())])
        .await;
    assert!(matches!(r, Err(MetadataError::InvalidInput(_))));

    let c = plugin()
        .connect(dir.path(), vec![("dir".into(), "/data/cluster-a".into())])
        .await
        .expect("connect");
    assert_eq!(c.compare_and_set(state("t", 0, 1, 0), 0).await, Ok(1));
    assert!(version_file(&dir.path().join("cluster-a"), "t", 0, 1).exists());
    assert!(dir.path().join("cluster-a/brokers").is_dir());
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_goes_back_in_time_is_a_fault_and_the_client_reconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_clients(dir.path()).await;
    a.compare_and_set(state("t", 0, 1, 0), 0)
        .await
        .expect("create");
    a.compare_and_set(state("t", 0, 1, 1), 1)
        .await
        .expect("update");
    a.register_broker(1, "h:1".into()).await.expect("register");
    // Lose the data behind the clients' backs.
    std::fs::remove_dir_all(dir.path().join("partitions/t")).expect("rm");
    std::fs::remove_dir_all(dir.path().join("brokers/1")).expect("rm");

    let r = a.get_partition("t", 0).await;
    assert!(matches!(r, Err(MetadataError::Fault(_))), "{r:?}");
    // The next call reconnects a fresh instance.
    assert_eq!(a.list_partitions().await, Ok(vec![]));
    // A client that saw nothing just finds nothing.
    let r = b.get_partition("t", 0).await;
    assert!(matches!(r, Err(MetadataError::NotFound(_))), "{r:?}");
    // Epoch 1 again, for a broker that had epoch 1 already.
    let r = a.register_broker(1, "h:1".into()).await;
    assert!(matches!(r, Err(MetadataError::Fault(_))), "{r:?}");
}

/// A full disk is named as one. The plugin wrote its files through std,
/// whose stream writes carry no error code, and said "I/O error (os error
/// 29)" for a full disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_as_one() {
    let Some(disk) = SmallDisk::mount(256 << 10) else {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root)");
        return;
    };
    let dir = disk.dir.path();
    let store = connect(dir).await;
    assert_eq!(store.compare_and_set(state("t", 0, 1, 0), 0).await, Ok(1));
    // Whatever is left, taken: the write stops at ENOSPC.
    let filled = std::fs::write(dir.join("fill"), vec![0u8; 1 << 20]);
    assert!(filled.is_err(), "the disk did not fill");
    let full = store.compare_and_set(state("t", 0, 2, 1), 1).await;
    match &full {
        Err(MetadataError::Io(e)) => assert!(e.ends_with("No space left on device"), "{e}"),
        other => panic!("{other:?}"),
    }
    // The half-written temporary file went with the failure.
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("partitions/t/0"))
        .expect("partition dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Room again: the write goes through, and nothing was lost meanwhile.
    std::fs::remove_file(dir.join("fill")).expect("room");
    assert_eq!(store.compare_and_set(state("t", 0, 2, 1), 1).await, Ok(2));
    assert_eq!(
        store.get_partition("t", 0).await.map(|s| s.leader),
        Ok(Some(2))
    );
}

#[test]
fn unknown_builtin_names_the_known_ones() {
    match MetadataPlugin::load(
        &PluginSource::Builtin("zookeeper".into()),
        Sandbox::default(),
    ) {
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("file") && e.contains("etcd"), "{e}");
        }
        Ok(_) => panic!("loaded a plugin that does not exist"),
    }
}

/// A connection does its file I/O on a thread of its own, not on tokio's
/// blocking pool: here the pool's one thread is taken for the whole test,
/// and the reads and writes still complete. On the pool, each file call
/// (five or more per partition read) cost two thread wake-ups, and a node
/// re-reading 300 partitions every 200 ms spent a third of a core on them.
#[test]
fn file_io_does_not_wait_for_the_blocking_pool() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (taken, release) = std::sync::mpsc::channel::<()>();
    runtime.block_on(async {
        let hold = tokio::task::spawn_blocking(move || {
            let _ = release.recv();
        });
        let work = async {
            let m = connect(tmp.path()).await;
            let v = m
                .compare_and_set(state("t", 0, 1, 1), 0)
                .await
                .expect("create");
            let read = m.get_partition("t", 0).await.expect("read");
            assert_eq!((read.version, read.leader), (v, Some(1)));
            m.close().await;
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), work)
            .await
            .expect("the metadata calls waited for the blocking pool");
        drop(taken);
        hold.await.expect("the blocking task");
    });
}
