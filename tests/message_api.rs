//! The reference API's message-level storage traits (`StorageReader`,
//! `StorageWriter`, `StorageAdapter`) over the native log and over the
//! file plugin: the same behaviour through both.

use bytes::Bytes;
use replicator::plugin::{PluginSource, Sandbox, StoragePlugin};
use replicator::storage::memory::MemoryLog;
use replicator::storage::messages::{MessageLog, StorageAdapter, StorageMessage};
use replicator::storage::{PartitionLog, StorageError};

fn msg(offset: u64) -> StorageMessage {
    StorageMessage {
        offset,
        key: offset
            .is_multiple_of(2)
            .then(|| Bytes::from(format!("key-{offset}"))),
        value: Bytes::from(format!("value-{offset}")),
        timestamp: 1_700_000_000_000_000_000 + offset as i64,
        headers: vec![("h".into(), Bytes::from(vec![offset as u8]))],
    }
}

async fn exercise<A: StorageAdapter>(log: &A) {
    assert_eq!(log.log_end_offset().await, Ok(0));
    let first: Vec<_> = (0..5).map(msg).collect();
    log.append_messages(&first).await.expect("append 0..5");
    let second: Vec<_> = (5..8).map(msg).collect();
    log.append_messages(&second).await.expect("append 5..8");
    assert_eq!(log.log_end_offset().await, Ok(8));

    // Ranges that cut batches return exactly the asked-for messages.
    let got = log.read_range(3, 6).await.expect("read 3..6");
    assert_eq!(got, (3..6).map(msg).collect::<Vec<_>>());
    let all = log.read_range(0, 100).await.expect("read all");
    assert_eq!(
        all,
        (0..8).map(msg).collect::<Vec<_>>(),
        "end is capped at the log end"
    );

    // Offsets must continue the log.
    let gap = [msg(10)];
    assert!(matches!(
        log.append_messages(&gap).await,
        Err(StorageError::Conflict(_))
    ));
    let unordered = [msg(8), msg(10)];
    assert!(matches!(
        log.append_messages(&unordered).await,
        Err(StorageError::InvalidInput(_))
    ));

    log.set_high_watermark(6).await.expect("set hw");
    assert_eq!(log.high_watermark().await, Ok(6));
    // Truncation removes whole batches: 6 falls in 5..8, so the end is 5,
    // and the high watermark reads back capped at the end.
    assert_eq!(log.truncate(6).await, Ok(5));
    assert_eq!(log.high_watermark().await, Ok(5));
    assert_eq!(log.read_range(0, 100).await.expect("read").len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_api_over_the_native_log() {
    exercise(&MessageLog::new(MemoryLog::new(), 3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_api_over_the_file_plugin() {
    let plugin = StoragePlugin::load(&PluginSource::Builtin("file".into()), Sandbox::default())
        .expect("load");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = plugin
        .open("t", 0, vec![], Some(dir.path()))
        .await
        .expect("open");
    let messages = MessageLog::new(log, 3);
    exercise(&messages).await;
    // Batches carry the epoch they were written in.
    let bytes = messages.inner().read(0, 1 << 20).await.expect("read");
    let records = replicator::batch::decode(&bytes).expect("decode");
    assert!(records.iter().all(|r| r.leader_epoch == 3));
}
