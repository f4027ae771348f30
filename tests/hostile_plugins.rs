//! Plugins that loop, hog memory, trap, overflow the stack or lie: each is
//! contained within a bounded time, the process survives, the partition
//! refuses writes until recovered, and other partitions keep working.

use std::time::{Duration, Instant};

use replicator::batch::{self, Record};
use replicator::plugin::builtin::testing::HOSTILE;
use replicator::plugin::{EPOCH_TICK, PluginLog, PluginRuntime, Sandbox, StoragePlugin};
use replicator::storage::{FaultKind, PartitionLog, StorageError};

fn sandbox() -> Sandbox {
    Sandbox {
        call_deadline: Duration::from_millis(500),
        open_deadline: Duration::from_secs(5),
        memory_bytes: 64 << 20,
        ..Sandbox::default()
    }
}

fn one(base: u64) -> bytes::Bytes {
    let r = Record {
        value: bytes::Bytes::from_static(b"value"),
        ..Default::default()
    };
    batch::encode(base, 1, &[r]).expect("encode")
}

fn assert_fault(err: &StorageError, kind: FaultKind) {
    match err {
        StorageError::Fault { kind: k, .. } => assert_eq!(*k, kind, "{err}"),
        other => panic!("expected a {kind:?} fault, got {other}"),
    }
}

/// The hostile plugin, loaded under `sandbox`.
fn hostile(sandbox: Sandbox) -> StoragePlugin {
    let runtime = PluginRuntime::global().expect("runtime");
    StoragePlugin::from_bytes(runtime, "hostile", HOSTILE, sandbox).expect("load")
}

async fn open(mode: &str) -> (StoragePlugin, PluginLog) {
    let plugin = hostile(sandbox());
    let log = plugin
        .open("t", 0, vec![("mode".into(), mode.into())], None)
        .await
        .expect("open");
    (plugin, log)
}

/// Partition 0 of the hostile plugin in `mode` (seeing `data`, if any)
/// and a healthy partition 1, both under `sandbox`; and the plugin, to
/// open more.
async fn hostile_and_healthy(
    sandbox: Sandbox,
    mode: &str,
    data: Option<&std::path::Path>,
) -> (PluginLog, PluginLog, StoragePlugin) {
    let plugin = hostile(sandbox);
    let hostile = plugin
        .open("t", 0, vec![("mode".into(), mode.into())], data)
        .await
        .expect("open");
    let healthy = plugin
        .open("t", 1, vec![], None)
        .await
        .expect("open healthy");
    (hostile, healthy, plugin)
}

/// The first append faults with `kind` quickly, later calls refuse until
/// recover(), and a healthy partition of the same plugin is unaffected.
async fn contained(mode: &str, kind: FaultKind) {
    let (log, healthy, _plugin) = hostile_and_healthy(sandbox(), mode, None).await;
    let started = Instant::now();
    let err = log
        .append(one(0))
        .await
        .expect_err("a hostile append must fail");
    let took = started.elapsed();
    match &err {
        StorageError::Fault { kind: k, .. } => assert_eq!(*k, kind, "{mode}: {err}"),
        other => panic!("{mode}: expected a fault, got {other}"),
    }
    assert!(
        took < Duration::from_secs(5),
        "{mode}: containment took {took:?}"
    );
    // No write is acknowledged until the state was re-read. (A call that
    // overran its deadline in a host call is waited for one deadline more,
    // in case it is I/O that would land under a new instance: the next
    // call waits behind it, well within its own wait.)
    match log.append(one(0)).await {
        Err(StorageError::Fault {
            kind: FaultKind::NeedsRecovery,
            ..
        }) => {}
        other => panic!("{mode}: append after a fault must need recovery, got {other:?}"),
    }
    assert_eq!(
        healthy.append(one(0)).await,
        Ok(1),
        "{mode}: healthy partition broke"
    );
    let state = log.recover().await.expect("recover re-instantiates");
    assert_eq!(state.bounds.log_end, 0, "the hostile plugin keeps nothing");
    assert_eq!(healthy.append(one(1)).await, Ok(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_hits_the_epoch_deadline() {
    contained("loop", FaultKind::Deadline).await;
}

/// Stores are tasks on the caller's runtime: a guest stuck in a loop must
/// yield at every epoch tick, or one bad partition would stall a whole
/// node. One worker thread here, so without the yield the healthy
/// partition could not be served until the loop's deadline.
#[tokio::test(flavor = "current_thread")]
async fn a_looping_guest_does_not_hold_the_runtime() {
    served_meanwhile("loop", None, || {}).await;
}

/// The host writes a guest's file writes inline on the runtime (no copy,
/// no hop), 4 MiB per call at most, so a guest that writes without end
/// holds the node's only worker no longer than a plain loop does.
#[tokio::test(flavor = "current_thread")]
async fn a_guest_writing_without_end_does_not_hold_the_runtime() {
    let data = tempfile::tempdir().expect("tempdir");
    served_meanwhile("write-loop", Some(data.path()), || {
        // The guest writes 16 MiB at offset 0 each time, and ignores how
        // much was written: each call wrote only the first 4 MiB.
        let flood = std::fs::metadata(data.path().join("flood")).map_or(0, |m| m.len());
        let most = replicator::plugin::INLINE_WRITE_MAX as u64;
        assert_eq!(flood, most, "bytes the guest's writes left in its file");
    })
    .await;
}

/// Start `mode`'s first append, with a 2 s deadline, and serve a healthy
/// partition of the same plugin for 300 ms meanwhile. The hostile call
/// must still be running then (so it did not hold the runtime until its
/// deadline), no healthy append may have waited [`HELD_AT_MOST`] (so it
/// gave the runtime back every epoch tick, not now and then), `meanwhile`
/// runs, and the call ends in a deadline fault.
async fn served_meanwhile(mode: &str, data: Option<&std::path::Path>, meanwhile: impl FnOnce()) {
    let sandbox = Sandbox {
        call_deadline: Duration::from_secs(2),
        ..sandbox()
    };
    let (hostile, healthy, _plugin) = hostile_and_healthy(sandbox, mode, data).await;
    let hostile = tokio::spawn(async move { hostile.append(one(0)).await });
    // A task, as a node's connections are: on a current-thread runtime the
    // test's own future is polled only between batches of 61 tasks' turns,
    // each of them the hostile guest's 10 ms here.
    let (served, slowest) = tokio::spawn(async move {
        let started = Instant::now();
        let mut served = 0;
        let mut slowest = Duration::ZERO;
        while started.elapsed() < Duration::from_millis(300) {
            let asked = Instant::now();
            assert_eq!(healthy.append(one(served)).await, Ok(served + 1));
            slowest = slowest.max(asked.elapsed());
            served += 1;
        }
        (served, slowest)
    })
    .await
    .expect("the healthy partition's task");
    assert!(
        slowest < HELD_AT_MOST,
        "{mode}: a healthy append waited {slowest:?} behind the hostile call ({served} served \
         in 300 ms); it yields every {EPOCH_TICK:?}"
    );
    if hostile.is_finished() {
        panic!(
            "{mode}: the call ended within 300 ms ({served} healthy appends), before its 2 s \
             deadline: {:?}",
            hostile.await
        );
    }
    meanwhile();
    let err = hostile
        .await
        .expect("join")
        .expect_err("the hostile append must fail");
    assert_fault(&err, FaultKind::Deadline);
}

/// How long a healthy call may wait behind a hostile one on a runtime with
/// one worker: the guest yields at every epoch tick (10 ms), plus one
/// write of at most 4 MiB; the rest is room for a loaded CI machine.
const HELD_AT_MOST: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_host_call_hits_the_host_timeout() {
    contained("sleep", FaultKind::Deadline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_memory_growth_hits_the_limit() {
    contained("grow", FaultKind::Trap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_is_contained() {
    contained("trap", FaultKind::Trap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_overflow_is_contained() {
    contained("stack", FaultKind::Trap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_log_end_on_append_is_a_violation() {
    contained("lie-append", FaultKind::Violation).await;
}

/// An append that failed but was applied in part is never taken for the
/// log: the host asks for the bounds after a failed append (a plugin may
/// cut its log back to what is on disk then), finds a log end past its
/// own, and drops the instance; the recovery reads the log from a fresh
/// one. It used to be caught only at the next recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_applied_in_part_is_caught_at_once() {
    let (_plugin, log) = open("fail-after-append").await;
    let err = log.append(one(0)).await.expect_err("the append fails");
    assert_fault(&err, FaultKind::Violation);
    assert!(
        err.to_string()
            .contains("after a failed write it reported bounds")
            && err.to_string().contains("syncing the directory failed"),
        "{err}"
    );
    // The hostile plugin keeps nothing across instances.
    let state = log.recover().await.expect("recovered");
    assert_eq!(state.bounds.log_end, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_a_gap_is_a_violation() {
    let (_plugin, log) = open("accept-gaps").await;
    let err = log.append(one(5)).await.expect_err("gap accepted");
    assert_fault(&err, FaultKind::Violation);
}

/// A batch that fails its CRC is never served; the fault says where the
/// stored log is damaged, for the replica to cut it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_read_is_a_fault_that_names_the_damage() {
    let (_plugin, log) = open("lie-read").await;
    log.append(one(0)).await.expect("append works");
    let err = log.read(0, 1 << 20).await.expect_err("bad CRC accepted");
    assert_fault(&err, FaultKind::Damaged { from: 0 });
}

/// A read answered with another batch's bytes under the offset asked for
/// (its CRC intact: the CRC leaves the base offset out) is caught by the
/// batch's position check, as damage where it was asked. It was served:
/// a consumer from offset 4 read offsets 0 and 1's records as 4 and 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_served_under_another_offset_is_caught() {
    let (_plugin, log) = open("relabel-read").await;
    for base in 0..3 {
        log.append(one(base)).await.expect("append works");
    }
    assert_eq!(log.read(0, 1 << 20).await.map(|b| b.is_empty()), Ok(false));
    let err = log
        .read(2, 1 << 20)
        .await
        .expect_err("relabelled batch served");
    assert_fault(&err, FaultKind::Damaged { from: 2 });
    assert!(err.to_string().contains("moved or relabelled"), "{err}");
}

/// A plugin that finds its own stored log damaged where the host reads
/// (`corrupt`) raises the same fault as a batch that fails the host's CRC
/// check, naming where: the replica can cut its log there and fetch the
/// rest again. It was a plain error, and the log was served no further.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_answer_to_a_read_inside_the_log_names_the_damage() {
    let (_plugin, log) = open("corrupt-read").await;
    log.append(one(0)).await.expect("append works");
    log.append(one(1)).await.expect("append works");
    let err = log.read(1, 1 << 20).await.expect_err("a damaged log");
    assert_fault(&err, FaultKind::Damaged { from: 1 });
    assert!(err.to_string().contains("missing segment"), "{err}");
}

/// A truncation that cuts more than back to the batch holding the offset
/// is a violation (only `end <= offset` was checked, and the host took a
/// log cut to 0 for the truncation it asked for); one that cuts exactly
/// there passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncation_that_cuts_too_much_is_a_violation() {
    let (_plugin, log) = open("over-truncate").await;
    for base in 0..3 {
        log.append(one(base)).await.expect("append works");
    }
    let err = log.truncate(2).await.expect_err("cut to 0");
    assert_fault(&err, FaultKind::Violation);
    assert!(
        err.to_string().contains("the batch holding 2 starts at 2"),
        "{err}"
    );
    let (_plugin, honest) = open("").await;
    for base in 0..3 {
        honest.append(one(base)).await.expect("append works");
    }
    assert_eq!(honest.truncate(2).await, Ok(2));
    assert_eq!(honest.truncate(2).await, Ok(2), "at the log end: no read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inconsistent_bounds_are_a_violation() {
    // A start past the end, and a log near the top of u64, where a
    // leader's next offsets would wrap to 0.
    for mode in ["lie-bounds", "huge-bounds"] {
        let plugin = hostile(sandbox());
        let err = plugin
            .open("t", 0, vec![("mode".into(), mode.into())], None)
            .await
            .err()
            .unwrap_or_else(|| panic!("{mode}: opened"));
        assert_fault(&err, FaultKind::Violation);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_no_partition_can_reach_is_a_violation() {
    // Taken in, it would have put every epoch this node writes next at
    // u32::MAX, a record no node reads back: the partition stuck for good.
    let (_plugin, log) = open("huge-epoch").await;
    let err = log
        .leader_epochs()
        .await
        .expect_err("epoch u32::MAX taken from the cache");
    assert_fault(&err, FaultKind::Violation);
    assert!(
        err.to_string()
            .contains("past the largest a partition can reach"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_while_opening_is_a_fault_not_a_panic() {
    let plugin = hostile(sandbox());
    let err = plugin
        .open("t", 0, vec![("mode".into(), "trap-open".into())], None)
        .await
        .err()
        .expect("open must fail");
    assert!(err.is_fault(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_a_component_is_a_clear_load_error() {
    let runtime = PluginRuntime::global().expect("runtime");
    let err = StoragePlugin::from_bytes(runtime, "junk", b"\0asm junk", sandbox())
        .err()
        .expect("junk must not load");
    assert!(
        err.to_string().contains("not a valid wasm component"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_cannot_reach_the_network() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let (_plugin, log) = open(&format!("connect:{port}")).await;
    match log.append(one(0)).await {
        Err(StorageError::Io(m)) => assert!(m.contains("connect") || m.contains("socket"), "{m}"),
        other => panic!("the plugin reached the network or failed oddly: {other:?}"),
    }
    assert!(
        listener.accept().is_err(),
        "a connection arrived from the sandbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_only_their_partition_directory() {
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, b"not for plugins").expect("write");
    let data = tempfile::tempdir().expect("tempdir");
    let plugin = hostile(sandbox());
    for path in [
        secret.display().to_string(),
        "/data/../../etc/passwd".to_string(),
        "/etc/passwd".to_string(),
    ] {
        let log = plugin
            .open(
                "t",
                0,
                vec![("mode".into(), format!("read-file:{path}"))],
                Some(data.path()),
            )
            .await
            .expect("open");
        match log.append(one(0)).await {
            Err(StorageError::Io(_)) => {}
            other => panic!("reading {path} from the sandbox: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_call_blocked_in_the_kernel_is_contained() {
    // Both placements of a store: a task whose opens run on the blocking
    // pool, and a thread of its own that does them inline.
    for own_thread in [false, true] {
        blocked_in_the_kernel(own_thread).await;
    }
}

async fn blocked_in_the_kernel(own_thread: bool) {
    // Opening a FIFO blocks in open(2) until a writer comes: a host call
    // that neither epochs nor the store's own timers can stop.
    let sandbox = Sandbox {
        own_thread,
        // A stuck call is waited for twice this more before it is
        // dropped anyway: past the checks below.
        call_deadline: Duration::from_secs(2),
        ..sandbox()
    };
    let data = tempfile::tempdir().expect("tempdir");
    let fifo = data.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    // Whatever happens below, the stuck open(2) is released at the end:
    // a runtime does not shut down while a blocking task runs.
    struct Release(std::path::PathBuf);
    impl Drop for Release {
        fn drop(&mut self) {
            use std::os::unix::fs::OpenOptionsExt;
            // Non-blocking: fails (ENXIO) if no reader waits any more.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.0);
        }
    }
    let _release = Release(fifo.clone());
    let mode = "read-file:/data/fifo";
    let (stuck, healthy, plugin) = hostile_and_healthy(sandbox, mode, Some(data.path())).await;
    let mode = || vec![("mode".into(), mode.into())];
    let started = Instant::now();
    let err = stuck
        .append(one(0))
        .await
        .expect_err("the read cannot finish");
    assert_fault(&err, FaultKind::Deadline);
    assert!(
        // Twice the deadline and a second on a store's own thread.
        started.elapsed() < Duration::from_secs(7),
        "own thread {own_thread}: took {:?}",
        started.elapsed()
    );
    // Other partitions are served meanwhile.
    assert_eq!(healthy.append(one(0)).await, Ok(1));
    // No new instance works on the log's files while the stuck call may
    // still write to them: not a recovery of this log (it used to
    // re-instantiate at once on the runtime), nor a second log opened on
    // its directory.
    let held = Duration::from_secs(1);
    let again = tokio::time::timeout(held, stuck.recover()).await;
    assert!(
        again.is_err(),
        "own thread {own_thread}: recovered while its call is still stuck: {again:?}"
    );
    let second = tokio::time::timeout(held, plugin.open("t", 0, mode(), Some(data.path()))).await;
    match second {
        Err(_) => {}
        Ok(Err(StorageError::Unavailable(m))) if m.contains("still in use") => {}
        Ok(Err(e)) => panic!("own thread {own_thread}: {e}"),
        Ok(Ok(_)) => {
            panic!("own thread {own_thread}: a second instance opened on the same directory")
        }
    }
    // Release the stuck call: a writer comes and goes (the read then
    // ends at end-of-file).
    drop(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open fifo"),
    );
    // Once it returned, recovery gets a fresh instance; what was given up
    // meanwhile did not take effect.
    let state = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stuck.recover().await {
                Ok(state) => break state,
                Err(e) => {
                    assert!(matches!(e, StorageError::Fault { .. }), "{e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await
    .expect("recovered once the call returned");
    assert_eq!(state.bounds.log_end, 0, "own thread {own_thread}");
    drop(stuck);
    // And the directory is free again once that log is closed.
    let reopened = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match plugin.open("t", 0, vec![], Some(data.path())).await {
                Ok(log) => break log,
                Err(StorageError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("own thread {own_thread}: {e}"),
            }
        }
    })
    .await
    .expect("the directory is released");
    assert_eq!(reopened.append(one(0)).await, Ok(1));
}
