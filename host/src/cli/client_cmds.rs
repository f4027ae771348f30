//! The client commands: `topic create`, `partition elect`, `produce`,
//! `consume`, `status`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use replicator::batch::Record;
use replicator::client::Client;
use replicator::core::{Acks, ReplicaId, ReplicaLog, describe_logs, most_up_to_date};
use replicator::node::ClientConfig;
use replicator::wire::rpc::{NotOpen, ReplicaStatus};
use tokio::io::AsyncBufReadExt;

#[derive(Subcommand)]
pub enum TopicCommand {
    /// Create a topic; partitions are spread round-robin over the nodes,
    /// each led first by its first replica.
    Create(TopicCreateArgs),
    /// Every topic with its partition count, replication factor and
    /// min.insync.replicas, and how many of its partitions are
    /// under-replicated (ISR smaller than the replicas), under min.insync
    /// (acks=all refused) or offline (no leader, or one that failed or
    /// that this client cannot reach), as the metadata store records them.
    List(TopicListArgs),
    /// One topic's partitions, as `status --topic` shows them.
    Describe(TopicDescribeArgs),
}

#[derive(Args)]
pub struct TopicDescribeArgs {
    /// `client.toml` from `replicator cluster init`.
    #[arg(long)]
    pub config: PathBuf,
    /// The topic.
    #[arg(long)]
    pub topic: String,
    /// Machine-readable output (as `status --json`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct TopicListArgs {
    /// `client.toml` from `replicator cluster init`.
    #[arg(long)]
    pub config: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// One topic as `topic list` reports it.
#[derive(serde::Serialize, Debug, PartialEq)]
pub struct TopicSummary {
    pub topic: String,
    pub partitions: u32,
    /// Replicas per partition: the fewest and the most over the topic's
    /// partitions (equal unless the store was edited by hand).
    pub replication_factor: (usize, usize),
    /// min.insync.replicas: the lowest and the highest over its
    /// partitions; 0 for a record from before partitions stored their own
    /// (the nodes' `[replication] min_insync_replicas` applies).
    pub min_insync: (u32, u32),
    pub under_replicated: u32,
    pub under_min_insync: u32,
    /// No leader, or one the cluster counts as failed or this client
    /// could not reach.
    pub offline: u32,
    /// Partitions whose record in the store is corrupt (counted in
    /// `partitions`, in none of the others).
    pub unreadable: u32,
}

/// Topics in name order, from the store's partition records, the nodes
/// the cluster counts as `failed`, and the records it could not read.
pub fn summarize(
    parts: &[replicator::metadata::PartitionState],
    failed: &[ReplicaId],
    unreadable: &[replicator::wire::rpc::UnreadablePartition],
) -> Vec<TopicSummary> {
    let mut topics: std::collections::BTreeMap<&str, TopicSummary> = Default::default();
    let empty = |topic: &str, rf: usize, min_insync: u32| TopicSummary {
        topic: topic.to_string(),
        partitions: 0,
        replication_factor: (rf, rf),
        min_insync: (min_insync, min_insync),
        under_replicated: 0,
        under_min_insync: 0,
        offline: 0,
        unreadable: 0,
    };
    for p in parts {
        let t = topics
            .entry(&p.topic)
            .or_insert_with(|| empty(&p.topic, p.replicas.len(), p.min_insync));
        t.partitions += 1;
        let rf = p.replicas.len();
        t.replication_factor = (
            t.replication_factor.0.min(rf),
            t.replication_factor.1.max(rf),
        );
        t.min_insync = (
            t.min_insync.0.min(p.min_insync),
            t.min_insync.1.max(p.min_insync),
        );
        t.under_replicated += u32::from(p.isr.len() < rf);
        // A record without its own counts as at least 1 (the nodes'
        // default is not known here; it is 1 or more).
        t.under_min_insync += u32::from(p.isr.len() < p.effective_min_insync(1));
        t.offline += u32::from(p.leader.is_none_or(|l| failed.contains(&l)));
    }
    for u in unreadable {
        // A topic with no readable record: its replication factor and
        // min.insync are unknown (shown as 0).
        let t = topics
            .entry(&u.topic)
            .or_insert_with(|| empty(&u.topic, 0, 0));
        t.partitions += 1;
        t.unreadable += 1;
    }
    topics.into_values().collect()
}

fn print_topics(topics: &[TopicSummary]) {
    println!(
        "{:<16} {:>10} {:>4} {:>10} {:>16} {:>16} {:>7}",
        "TOPIC",
        "PARTITIONS",
        "RF",
        "MIN-INSYNC",
        "UNDER-REPLICATED",
        "UNDER-MIN-INSYNC",
        "OFFLINE"
    );
    let range = |(lo, hi): (String, String)| if lo == hi { lo } else { format!("{lo}-{hi}") };
    let min_insync = |m: u32| {
        if m == 0 {
            "default".to_string()
        } else {
            m.to_string()
        }
    };
    for t in topics {
        let (rf, mi) = (t.replication_factor, t.min_insync);
        // Every record of it corrupt: neither is known.
        let unknown = rf.1 == 0;
        println!(
            "{:<16} {:>10} {:>4} {:>10} {:>16} {:>16} {:>7}",
            t.topic,
            t.partitions,
            if unknown {
                "?".to_string()
            } else {
                range((rf.0.to_string(), rf.1.to_string()))
            },
            if unknown {
                "?".to_string()
            } else {
                range((min_insync(mi.0), min_insync(mi.1)))
            },
            t.under_replicated,
            t.under_min_insync,
            t.offline
        );
    }
}

#[derive(Args)]
pub struct TopicCreateArgs {
    /// `client.toml` from `replicator cluster init`.
    #[arg(long)]
    pub config: PathBuf,
    /// The topic.
    #[arg(long)]
    pub topic: String,
    /// Number of partitions.
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// Replicas per partition (at most the number of nodes).
    #[arg(long, default_value_t = 3)]
    pub replication_factor: u32,
    /// min.insync.replicas: acks=all is refused while fewer replicas are
    /// in sync (default: the nodes' `[replication] min_insync_replicas`).
    #[arg(long)]
    pub min_insync: Option<u32>,
}

pub fn client(config: &std::path::Path) -> anyhow::Result<Client> {
    let cfg = ClientConfig::load(config)?;
    Ok(Client::new(&cfg)?)
}

pub async fn topic(cmd: TopicCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TopicCommand::Create(a) => {
            let c = client(&a.config)?;
            let parts = c
                .create_topic(&a.topic, a.partitions, a.replication_factor, a.min_insync)
                .await?;
            // The min.insync each partition got: without --min-insync it
            // is the answering node's default (written into the record so
            // every node counts the same), which nodes configured apart
            // may not share.
            for p in &parts {
                println!(
                    "created {}/{} leader {} replicas {:?} min.insync {}",
                    p.topic,
                    p.partition,
                    p.leader.map_or("none".into(), |l| l.to_string()),
                    p.replicas,
                    if p.min_insync == 0 {
                        "(the nodes' default)".to_string()
                    } else {
                        p.min_insync.to_string()
                    }
                );
            }
            c.close().await;
            Ok(ExitCode::SUCCESS)
        }
        TopicCommand::List(a) => {
            let c = client(&a.config)?;
            let answer = c.metadata().await;
            let unreadable = c.unreadable().await;
            let mut failed = c.counted_failed().await;
            // Every node asked, as `status` does: a leader this client
            // cannot reach is offline to it. The cluster confirms a
            // failure only with a majority, so with two of three nodes
            // down the survivor confirmed none, and every partition they
            // led showed OFFLINE 0 (exploratory run).
            let unreachable = match &answer {
                Ok((_, parts)) => {
                    let g = gather_with(&c, parts, &failed).await;
                    failed.extend(g.unreachable_ids);
                    g.unreachable
                }
                Err(_) => Vec::new(),
            };
            let stale = c.metadata_stale().await;
            c.close().await;
            let (brokers, parts) = answer?;
            let topics = summarize(&parts, &failed, &unreadable);
            if a.json {
                let v = serde_json::json!({
                    "topics": topics,
                    "unreadable": unreadable,
                    "unreachable": unreachable,
                    "stale": stale,
                });
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            print_stale(stale.as_deref());
            print_topics(&topics);
            print_unreadable(&unreadable);
            for p in &unreachable {
                println!("unreachable: {p}");
            }
            hint_if_no_topics(
                topics.is_empty() && unreadable.is_empty(),
                brokers.is_empty(),
            );
            Ok(ExitCode::SUCCESS)
        }
        TopicCommand::Describe(a) => {
            status(StatusArgs {
                config: a.config,
                topic: Some(a.topic),
                json: a.json,
            })
            .await
        }
    }
}

#[derive(Subcommand)]
pub enum PartitionCommand {
    /// Move a partition to its preferred replica now (`--preferred`), or
    /// elect a leader for one that cannot get one by itself (`--unclean`:
    /// acknowledged writes may be lost).
    ///
    /// `--preferred` does what the leader rebalance does every
    /// `leader_imbalance_check_interval_ms` (after a rolling restart, say).
    /// `--unclean` is for when no in-sync or eligible replica is alive, or
    /// none is left (every one restarted without its log intact, e.g.
    /// after the whole cluster lost power): the new leader may lack
    /// acknowledged writes, which are then lost. If a live in-sync or
    /// eligible replica is left but the failover does not elect it (it
    /// needs most of the nodes it counts to confirm the leader failed,
    /// which nodes gone for good prevent), `--unclean` elects that one
    /// cleanly, losing nothing. One of the two is required.
    Elect(PartitionElectArgs),
}

#[derive(Args)]
pub struct PartitionElectArgs {
    /// `client.toml` from `replicator cluster init`.
    #[arg(long)]
    pub config: PathBuf,
    /// The topic.
    #[arg(long)]
    pub topic: String,
    /// The partition.
    #[arg(long)]
    pub partition: u32,
    /// Confirm that acknowledged writes the new leader lacks may be lost.
    #[arg(long, conflicts_with = "preferred")]
    pub unclean: bool,
    /// Hand the partition to its preferred replica (the first in
    /// assignment order) now, as the leader rebalance does every
    /// `leader_imbalance_check_interval_ms`; refused unless that replica
    /// is in the ISR and fetching caught up. Loses nothing committed.
    #[arg(long, conflicts_with = "replica")]
    pub preferred: bool,
    /// The replica to elect (default: a live in-sync or eligible replica
    /// if one answers, else the live replica whose log is most
    /// up to date, as KIP-966's unclean recovery and Raft compare logs:
    /// the newest leader epoch among its batches first, then the longest
    /// log, then the first in assignment order. A longer log ending in an
    /// older epoch holds an uncommitted tail that a newer leader's
    /// writes replaced on the others).
    #[arg(long)]
    pub replica: Option<ReplicaId>,
}

pub async fn partition(cmd: PartitionCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PartitionCommand::Elect(a) => {
            if a.preferred {
                let c = client(&a.config)?;
                let state = c.elect_preferred(&a.topic, a.partition).await;
                c.close().await;
                let state = state?;
                println!(
                    "node {} leads {}/{} in epoch {} (its preferred replica; ISR {:?})",
                    state.leader.unwrap_or_default(),
                    a.topic,
                    a.partition,
                    state.leader_epoch,
                    state.isr
                );
                return Ok(ExitCode::SUCCESS);
            }
            let c = client(&a.config)?;
            if !a.unclean {
                // Say what this partition needs, not what partitions do.
                let (_, parts) = c.metadata().await?;
                let state = parts
                    .iter()
                    .find(|p| p.topic == a.topic && p.partition == a.partition);
                let unreadable = c.unreadable().await;
                print_stale(c.metadata_stale().await.as_deref());
                c.close().await;
                let name = format!("{}/{}", a.topic, a.partition);
                match state {
                    None => match unreadable
                        .iter()
                        .find(|u| u.topic == a.topic && u.partition == a.partition)
                    {
                        Some(u) => bail!(
                            "the metadata store's record of {name} is corrupt ({}): restore it or remove it first",
                            u.error
                        ),
                        None => bail!("no partition {name} in the metadata"),
                    },
                    Some(s) if s.leader.is_none() && s.isr.is_empty() && s.elr.is_empty() => bail!(
                        "{name} has no leader, and no replica is known to hold every committed write (ISR and ELR are empty), so it will not get one by itself (unless the nodes run with [failover] unclean_leader_election). Pass --unclean to elect the most up-to-date live replica; acknowledged writes it lacks are then lost"
                    ),
                    Some(s) => bail!(
                        "{name} {}. Pass --preferred to move it to its preferred replica now, or --unclean to elect a replica that may lack acknowledged writes (they are then lost)",
                        match s.leader {
                            Some(l) => format!("is led by node {l}"),
                            None => format!(
                                "has no leader but in-sync or eligible replicas (ISR {:?}, ELR {:?}): it gets a leader by itself within a few heartbeats of one of them being alive",
                                s.isr, s.elr
                            ),
                        }
                    ),
                }
            }
            let reports = gather(&c).await?.reports;
            print_stale(c.metadata_stale().await.as_deref());
            let Some(report) = reports
                .iter()
                .find(|r| r.topic == a.topic && r.partition == a.partition)
            else {
                bail!("no partition {}/{} in the metadata", a.topic, a.partition);
            };
            let logs = report.replica_logs();
            let ends = describe_logs(&logs);
            // A live in-sync or eligible replica holds every committed
            // write: the node elects it cleanly (the failover could not:
            // it needs a majority of the nodes it counts to confirm the
            // leader failed), so it is the one to pick when one answers.
            let keeps = |r: ReplicaId| report.isr.contains(&r) || report.elr.contains(&r);
            let keepers: Vec<_> = logs
                .iter()
                .copied()
                .filter(|(r, _, leo)| keeps(*r) && Some(*r) != report.leader && leo.is_some())
                .collect();
            let replica = match a.replica {
                Some(r) => r,
                None => most_up_to_date(if keepers.is_empty() { &logs } else { &keepers })
                    .with_context(|| {
                        format!(
                            "no replica of {}/{} answered with its log end; pass --replica",
                            a.topic, a.partition
                        )
                    })?,
            };
            let state = c.elect_unclean(&a.topic, a.partition, replica).await?;
            if keeps(replica) {
                println!(
                    "node {replica} leads {}/{} in epoch {} (an in-sync or eligible replica: nothing committed is lost); replica log ends were {}",
                    a.topic, a.partition, state.leader_epoch, ends
                );
            } else {
                println!(
                    "node {replica} leads {}/{} in epoch {} (UNCLEAN: acknowledged writes it lacks are lost); replica log ends were {}",
                    a.topic, a.partition, state.leader_epoch, ends
                );
                if let Some(lost) = discarded_by(&logs, replica) {
                    println!("discarded: {lost}");
                }
            }
            c.close().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum AcksArg {
    #[value(name = "0")]
    Zero,
    #[value(name = "1")]
    One,
    #[value(name = "all")]
    All,
}

impl From<AcksArg> for Acks {
    fn from(a: AcksArg) -> Acks {
        match a {
            AcksArg::Zero => Acks::None,
            AcksArg::One => Acks::Leader,
            AcksArg::All => Acks::All,
        }
    }
}

#[derive(Args)]
pub struct ProduceArgs {
    /// `client.toml` from `replicator cluster init`.
    #[arg(long)]
    pub config: PathBuf,
    /// The topic.
    #[arg(long)]
    pub topic: String,
    /// Partition to write (default: round-robin over the topic's
    /// partitions, one batch at a time).
    #[arg(long)]
    pub partition: Option<u32>,
    /// 0: the leader answers once it took the batch, before storing it;
    /// 1: once it stored it; all: once every in-sync replica has it.
    #[arg(long, value_enum, default_value = "all")]
    pub acks: AcksArg,
    /// Send N generated messages instead of reading stdin.
    #[arg(long)]
    pub count: Option<u64>,
    /// Bytes per generated message.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Most messages per produce request [default: 64; with --count, as
    /// many of --size bytes as fit one batch when fewer do].
    #[arg(long)]
    pub batch: Option<usize>,
    /// How long one request may keep retrying (leader moves, ISR catching
    /// up), in milliseconds.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
    /// Print one JSON summary instead of a line per message.
    #[arg(long)]
    pub json: bool,
}

/// Refuse, before anything is sent, generated messages of `size` bytes
/// that `batch` at a time would not fit one produce request (a batch),
/// naming the flags to change. Also bounds what `generated` allocates.
pub fn check_message_size(size: usize, batch: usize) -> anyhow::Result<()> {
    use replicator::batch::{HEADER_LEN, MAX_BATCH_LEN};
    let limit = MAX_BATCH_LEN as usize;
    if size > longest_message() {
        bail!(
            "--size {size}: a message must fit one batch, so at most {} bytes",
            longest_message()
        );
    }
    let one = record_framing().saturating_add(size);
    let all = HEADER_LEN.saturating_add(one.saturating_mul(batch));
    if all > limit {
        bail!(
            "--batch {batch} messages of --size {size} bytes make a {all}-byte request, over the {limit}-byte batch limit; lower --batch to at most {}",
            BATCH_ROOM / one
        );
    }
    Ok(())
}

/// The generated message `i` of `size` bytes: printable, and different for
/// every `i`, so consumers can verify what they read.
pub fn generated(i: u64, size: usize) -> Bytes {
    let head = format!("m{i:010}-");
    let mut v = Vec::with_capacity(size);
    v.extend(head.bytes().take(size));
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(b'a' + (x % 26) as u8);
    }
    Bytes::from(v)
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Bytes of records one batch holds after its header.
const BATCH_ROOM: usize = replicator::batch::MAX_BATCH_LEN as usize - replicator::batch::HEADER_LEN;

/// A `produce` record's bytes around its value (no key, no headers).
fn record_framing() -> usize {
    replicator::batch::record_len(&Record::default())
}

/// What `value` takes of a batch as one of `produce`'s records.
fn framed(value: &Bytes) -> usize {
    record_framing().saturating_add(value.len())
}

/// The longest message (`--size`, a stdin line) one batch holds alone.
fn longest_message() -> usize {
    BATCH_ROOM - record_framing()
}

/// `first` and what else is queued in `rx` now, at most `most` messages
/// and at most what one batch holds: 64 lines of 300 KB each would make a
/// 19 MB request that the leader must refuse, though each line fits
/// alone. The message that did not fit is left in `carried`.
fn next_batch(
    first: Bytes,
    rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
    most: usize,
    carried: &mut Option<Bytes>,
) -> Vec<Bytes> {
    let mut room = BATCH_ROOM.saturating_sub(framed(&first));
    let mut values = vec![first];
    while values.len() < most {
        match rx.try_recv() {
            Ok(v) if framed(&v) <= room => {
                room -= framed(&v);
                values.push(v);
            }
            Ok(v) => {
                *carried = Some(v);
                break;
            }
            Err(_) => break,
        }
    }
    values
}

pub async fn produce(a: ProduceArgs) -> anyhow::Result<ExitCode> {
    if a.batch == Some(0) {
        bail!("--batch must be at least 1");
    }
    // Generated messages too large for 64 to a batch go fewer to a batch,
    // as lines from stdin do: `--count 100 --size 1000000` was refused
    // with "lower --batch" (exploratory run). A --batch given is kept to.
    let batch = match (a.batch, a.count) {
        (Some(b), _) => b,
        (None, Some(_)) => (BATCH_ROOM / record_framing().saturating_add(a.size)).clamp(1, 64),
        (None, None) => 64,
    };
    if let Some(n) = a.count {
        // A batch holds at most --count messages, whatever --batch says.
        let batch = usize::try_from(n).unwrap_or(usize::MAX).clamp(1, batch);
        check_message_size(a.size, batch)?;
    }
    let c = client(&a.config)?;
    let timeout = Duration::from_millis(a.timeout_ms);
    // Finding the partitions counts against the first batch's
    // --timeout-ms, as Kafka's delivery timeout covers the metadata wait:
    // with no node up, a 2 s produce took 5.5 s. Only the lookup: time
    // spent waiting for the first stdin line is not the cluster's.
    let lookup_began = Instant::now();
    // Why no node told the partitions, when --partition went on without.
    let mut lookup_failed: Option<replicator::client::ClientError> = None;
    let partitions = 'chosen: {
        let ps = match (
            c.topic_partitions_within(&a.topic, timeout).await,
            a.partition,
        ) {
            (Ok(ps), _) => ps,
            // No metadata now (no node up): the produce itself retries
            // until --timeout-ms and reports what was not sent.
            (Err(e), Some(p)) => {
                lookup_failed = Some(e);
                break 'chosen vec![p];
            }
            (Err(e), None) => return Err(e.into()),
        };
        // Partitions whose record the nodes cannot read are not listed,
        // but exist: a produce to one says why it is refused.
        let unreadable: Vec<u32> = c
            .unreadable()
            .await
            .into_iter()
            .filter(|u| u.topic == a.topic)
            .map(|u| u.partition)
            .collect();
        let last = ps.iter().chain(&unreadable).max().copied();
        match (a.partition, last) {
            (_, None) => bail!(
                "topic {} does not exist (create it with `replicator topic create`)",
                a.topic
            ),
            // Refused here, once: each batch to it would be refused, and a
            // large --count printed thousands of the same error.
            (Some(p), Some(last)) if p > last => bail!(
                "topic {} has no partition {p} (its partitions are 0 to {last})",
                a.topic
            ),
            (Some(p), _) => vec![p],
            (None, _) if ps.is_empty() => bail!(
                "no partition of topic {} can take writes: the metadata store's record of each is unreadable (`replicator status` says why)",
                a.topic
            ),
            (None, _) => ps,
        }
    };
    let first_batch_within = timeout.saturating_sub(lookup_began.elapsed());
    // Messages come from a generator or from stdin lines, in batches of
    // whatever is available, up to --batch.
    // The queue holds a few batches; --batch is bounded by the batch limit
    // for generated messages, not for stdin lines, so bound it here too.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(batch.min(1 << 16) * 4);
    // What stopped the input early, if anything did.
    let input: tokio::task::JoinHandle<std::io::Result<()>> = match a.count {
        Some(n) => {
            let size = a.size;
            tokio::spawn(async move {
                for i in 0..n {
                    if tx.send(generated(i, size)).await.is_err() {
                        break;
                    }
                }
                Ok(())
            })
        }
        None => tokio::spawn(async move {
            // Lines as bytes: a message is whatever a line holds, UTF-8
            // or not (a Latin-1 line used to end the input silently).
            use tokio::io::AsyncReadExt;
            let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
            // A line longer than one batch holds as its only message could
            // never be sent: stop reading there rather than buffer an
            // endless one (`/dev/zero`), or send the lines before it and
            // fail on it.
            let longest = longest_message() as u64;
            loop {
                let mut line = Vec::new();
                let read = (&mut stdin)
                    .take(longest + 3)
                    .read_until(b'\n', &mut line)
                    .await?;
                if read == 0 {
                    return Ok(());
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                if line.len() as u64 > longest {
                    return Err(std::io::Error::other(format!(
                        "a line of over {longest} bytes, more than one message in a batch holds ({} bytes with its framing)",
                        replicator::batch::MAX_BATCH_LEN
                    )));
                }
                if tx.send(Bytes::from(line)).await.is_err() {
                    return Ok(());
                }
            }
        }),
    };
    let started = Instant::now();
    let (mut acked, mut failed, mut bytes) = (0u64, 0u64, 0u64);
    let mut round = 0usize;
    // Why the run stopped before its input ended, if it did.
    let mut stopped: Option<String> = None;
    let mut signal = std::pin::pin!(super::cluster::shutdown_signal());
    let mut out = std::io::stdout().lock();
    // A message that did not fit the last batch: it starts the next.
    let mut carried: Option<Bytes> = None;
    loop {
        let first = match carried.take() {
            Some(v) => v,
            None => tokio::select! {
                v = rx.recv() => match v {
                    Some(v) => v,
                    None => break,
                },
                () = &mut signal => {
                    stopped = Some("interrupted".into());
                    break;
                }
            },
        };
        let values = next_batch(first, &mut rx, batch, &mut carried);
        let partition = partitions[round % partitions.len()];
        round += 1;
        let ts = now_ns();
        let records: Vec<Record> = values
            .into_iter()
            .map(|value| Record {
                key: None,
                value,
                timestamp: ts,
                headers: Vec::new(),
            })
            .collect();
        let n = records.len() as u64;
        let size: u64 = records.iter().map(|r| r.value.len() as u64).sum();
        let within = match round {
            1 => first_batch_within,
            _ => timeout,
        };
        // The lookup took the first batch's whole time: its reasons are
        // the batch's (a produce with no time left would only say so).
        let timed_out = lookup_failed
            .take()
            .filter(|_| within < Duration::from_millis(50));
        let lookup_timed_out = timed_out.is_some();
        let sent = match timed_out {
            Some(e) => Err(replicator::client::ClientError::Timeout {
                waited: timeout,
                last: e.to_string(),
            }),
            None => tokio::select! {
                r = c.produce(&a.topic, partition, &records, a.acks.into(), within) => r,
                () = &mut signal => {
                    failed += n;
                    eprintln!(
                        "error: interrupted while {n} messages to {}/{partition} were in flight; they may or may not have been written",
                        a.topic
                    );
                    stopped = Some("interrupted".into());
                    break;
                }
            },
        };
        match sent {
            Ok(base) => {
                acked += n;
                bytes += size;
                if !a.json {
                    for i in 0..n {
                        let _ = writeln!(out, "{partition} {}", base + i);
                    }
                }
            }
            Err(e) => {
                failed += n;
                // The first batch's time began with the partition lookup:
                // say so, or "gave up after 11 s" reads as a limit of 15 s
                // not kept.
                let e = match e {
                    replicator::client::ClientError::Timeout { waited, last }
                        if round == 1 && !lookup_timed_out =>
                    {
                        replicator::client::ClientError::Timeout {
                            waited: waited + timeout.saturating_sub(first_batch_within),
                            last,
                        }
                    }
                    e => e,
                };
                eprintln!(
                    "error: {n} messages to {}/{partition} not acknowledged: {e}",
                    a.topic
                );
                // Retriable refusals for the whole --timeout-ms: the
                // partition (or the cluster) is not taking writes. Each
                // further batch would wait as long (a whole cluster down
                // made a large input take hours), so stop here, as a
                // Kafka producer fails what it buffered after its
                // delivery timeout.
                use replicator::client::ClientError;
                if matches!(e, ClientError::Timeout { .. }) {
                    stopped = Some(format!(
                        "{}/{partition} took no writes within --timeout-ms ({} ms)",
                        a.topic, a.timeout_ms
                    ));
                    break;
                }
                // Every further batch to it would be refused the same way.
                if matches!(
                    e,
                    ClientError::UnknownPartition(..) | ClientError::UnreadablePartition(..)
                ) {
                    stopped = Some(format!("{}/{partition} cannot take writes", a.topic));
                    break;
                }
            }
        }
    }
    // Lines read from stdin but never sent (queued, or carried over to
    // the next batch): counted, so the user can tell where to resume.
    let mut read_not_sent = u64::from(carried.is_some());
    if a.count.is_none() {
        while rx.try_recv().is_ok() {
            read_not_sent += 1;
        }
    }
    // Whatever was generated or read and not sent; stdin is not read on.
    drop(rx);
    let unsent = match (a.count, &stopped) {
        (Some(n), Some(_)) => n.saturating_sub(acked + failed),
        (None, Some(_)) => read_not_sent,
        _ => 0,
    };
    if let Some(why) = &stopped {
        eprintln!(
            "error: stopped: {why}; {acked} messages acknowledged, {failed} not{}",
            match a.count {
                Some(_) => format!(", {unsent} not sent"),
                None => format!(
                    ", {unsent} more lines read but not sent, and the rest of stdin not read"
                ),
            }
        );
    }
    // The reader ends once the channel is gone; stdin may be a terminal
    // waiting for a line nobody types, so a stopped run does not wait.
    let input_error = if stopped.is_some() {
        input.abort();
        None
    } else {
        match input.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("reading stdin: {e}")),
            Err(e) => Some(format!("reading the input: {e}")),
        }
    };
    if let Some(e) = &input_error {
        eprintln!("error: {e}; the messages before it were sent as reported, the rest were not");
    }
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let summary = serde_json::json!({
            "topic": a.topic,
            "acknowledged": acked,
            "failed": failed,
            "not_sent": unsent,
            "stopped": stopped,
            "bytes": bytes,
            "seconds": secs,
            "messages_per_second": acked as f64 / secs.max(1e-9),
            "megabytes_per_second": bytes as f64 / 1e6 / secs.max(1e-9),
        });
        let _ = writeln!(out, "{summary}");
    }
    drop(out);
    c.close().await;
    Ok(
        if failed == 0 && input_error.is_none() && stopped.is_none() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

#[derive(Args)]
pub struct ConsumeArgs {
    /// `client.toml` from `replicator cluster init`.
    #[arg(long)]
    pub config: PathBuf,
    /// The topic.
    #[arg(long)]
    pub topic: String,
    /// The partition to read.
    #[arg(long, default_value_t = 0)]
    pub partition: u32,
    /// Where to start: an offset, `start` (the log start, the default) or
    /// `end` (after the last committed message: only messages committed
    /// from now on, with --count or --follow).
    #[arg(long, value_name = "OFFSET|start|end", value_parser = parse_from, allow_hyphen_values = true)]
    pub from: Option<ConsumeFrom>,
    /// Stop after this many messages, waiting up to 30 s for ones not
    /// committed yet (default: everything committed when the command
    /// started, without waiting).
    #[arg(long, conflicts_with = "follow")]
    pub count: Option<u64>,
    /// Keep printing messages as they are committed until interrupted
    /// (Ctrl-C), as Kafka's console consumer does. Ends with an error
    /// only after 30 s in which no replica could be read.
    #[arg(long)]
    pub follow: bool,
    /// Read this replica's committed log instead of the leader's (to check
    /// that replicas agree).
    #[arg(long)]
    pub replica: Option<ReplicaId>,
    /// Print each value in base64, exact for any bytes (newlines
    /// included), instead of as it is.
    #[arg(long)]
    pub base64: bool,
}

/// Where `consume --from` starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumeFrom {
    /// The log start (what retention kept).
    Start,
    /// The high watermark when the command starts.
    End,
    Offset(u64),
}

fn parse_from(s: &str) -> Result<ConsumeFrom, String> {
    match s {
        "start" | "earliest" | "beginning" => Ok(ConsumeFrom::Start),
        "end" | "latest" => Ok(ConsumeFrom::End),
        _ => match s.parse::<u64>() {
            Ok(o) => Ok(ConsumeFrom::Offset(o)),
            // Kafka tools take -1 and -2 for latest and earliest; say the
            // words instead of guessing which the user meant.
            Err(_) if s.starts_with('-') => Err(format!(
                "offsets count up from 0; for the log start say `start`, for only \
                 messages committed from now on say `end` (not {s})"
            )),
            Err(_) => Err(format!(
                "expected an offset (0 or more), `start` or `end`, not `{s}`"
            )),
        },
    }
}

pub async fn consume(a: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let c = client(&a.config)?;
    let mut node = match a.replica {
        Some(r) => r,
        None => match c.leader_of(&a.topic, a.partition).await {
            Ok(l) => l,
            Err(e) => match missing(&c, &a.topic, a.partition, None).await {
                Some(why) => bail!("{why}"),
                None => return Err(e.into()),
            },
        },
    };
    // The first read follows a leader that moved, as the later ones do.
    let give_up = Instant::now() + Duration::from_secs(30);
    let asked = match a.from {
        Some(ConsumeFrom::Offset(o)) => Some(o),
        _ => None,
    };
    let first = loop {
        let r = c
            .read(node, &a.topic, a.partition, asked.unwrap_or(0), 1)
            .await;
        match r {
            Err(e) if a.replica.is_none() && read_again(&e) && Instant::now() < give_up => {
                node = leader_again(&c, &a, node, "", &e).await;
            }
            Err(e) if a.replica.is_none() && storage_failed(&e) && Instant::now() < give_up => {
                match leader_handed_on(&c, &a, node, "", &e).await {
                    Some(l) => node = l,
                    None => break Err(e),
                }
            }
            r => break r,
        }
    };
    // The log's bounds, to start where --from says (or tell why not).
    let (log_start, end) = match first {
        Ok(b) => (b.log_start, b.high_watermark),
        Err(replicator::client::ClientError::Refused(
            replicator::wire::rpc::RpcError::OffsetOutOfRange {
                log_start,
                high_watermark,
                ..
            },
        )) if asked.is_none() => (log_start, high_watermark),
        Err(e) => {
            if let Some(why) = missing(&c, &a.topic, a.partition, a.replica).await {
                bail!("{why}");
            }
            return Err(read_failed(e, &a, asked.unwrap_or(0), node));
        }
    };
    let mut offset = match a.from {
        Some(ConsumeFrom::Offset(o)) => o,
        Some(ConsumeFrom::End) => end,
        None | Some(ConsumeFrom::Start) => log_start,
    };
    let stop = match a.count {
        Some(n) => offset.saturating_add(n),
        None if a.follow => u64::MAX,
        None => end,
    };
    if a.from == Some(ConsumeFrom::End) && a.count.is_none() && !a.follow {
        eprintln!(
            "note: --from end prints only messages committed from now on; \
             add --count N to wait for the next N, or --follow"
        );
    }
    if a.follow {
        eprintln!(
            "following {}/{} from offset {offset} (Ctrl-C to stop)",
            a.topic, a.partition
        );
    }
    // --follow ends on Ctrl-C or SIGTERM, after what was read is out.
    let mut signal = std::pin::pin!(super::cluster::shutdown_signal());
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // 30 s without a new record, not 30 s in all: a long read that is
    // still catching up is not cut short.
    let mut deadline = Instant::now() + Duration::from_secs(30);
    // When the leader was last looked up while nothing new came.
    let mut leader_checked = Instant::now();
    while offset < stop {
        // Caught up, the node holds the read until something is committed
        // (up to 500 ms, Kafka's fetch.max.wait.ms), so a new message is
        // printed as soon as it is, without polling.
        let asked = Instant::now();
        let read = tokio::select! {
            r = c.read_waiting(node, &a.topic, a.partition, offset, 1 << 20, READ_WAIT) => r,
            () = &mut signal, if a.follow => break,
        };
        let b = match read {
            Ok(b) => b,
            // The leader died or moved (a failover, a rolling restart):
            // go on from the same offset on the new one, as a Kafka
            // consumer does, within the same 30 s without progress. Only
            // --replica pins the read to one node.
            Err(e) if a.replica.is_none() && read_again(&e) && Instant::now() < deadline => {
                if let Err(e) = out.flush() {
                    return stdout_failed(e, &c).await;
                }
                node = leader_again(&c, &a, node, &format!(" at {offset}"), &e).await;
                continue;
            }
            Err(e) if a.replica.is_none() && storage_failed(&e) && Instant::now() < deadline => {
                if let Err(e) = out.flush() {
                    return stdout_failed(e, &c).await;
                }
                if let Some(l) = leader_handed_on(&c, &a, node, &format!(" at {offset}"), &e).await
                {
                    node = l;
                    continue;
                }
                return Err(e).context(format!(
                    "reading {}/{} at {offset} on node {node}",
                    a.topic, a.partition
                ));
            }
            Err(e) => return Err(read_failed(e, &a, offset, node)),
        };
        if b.records.is_empty() {
            // --count past the committed end: wait for more, bounded.
            // What came so far is out already, not held back by the wait.
            if let Err(e) = out.flush() {
                return stdout_failed(e, &c).await;
            }
            // A node that answers but no longer leads (cut off from the
            // others, which elected a new leader) keeps answering with
            // nothing new: look the leader up now and then, as a Kafka
            // consumer refreshes its metadata, and follow it.
            if a.replica.is_none() && leader_checked.elapsed() >= LEADER_RECHECK {
                leader_checked = Instant::now();
                if let Ok(l) = c.leader_of(&a.topic, a.partition).await
                    && l != node
                {
                    eprintln!(
                        "note: nothing new from node {node} at {}/{} offset {offset}; node {l} leads it now, reading there",
                        a.topic, a.partition
                    );
                    node = l;
                    continue;
                }
            }
            if a.follow {
                // Waiting for new messages is what --follow does; only
                // 30 s without any answer ends it.
                deadline = Instant::now() + Duration::from_secs(30);
            } else if Instant::now() > deadline {
                bail!(
                    "offsets up to {} were asked for, but nothing from offset {offset} on was committed for 30 s",
                    stop - 1
                );
            }
            // The node held the read for its wait; one that came back
            // empty at once (records there but not returned) is not asked
            // again in a tight loop.
            if asked.elapsed() < READ_WAIT / 2 {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    () = &mut signal, if a.follow => break,
                }
            }
            continue;
        }
        deadline = Instant::now() + Duration::from_secs(30);
        leader_checked = Instant::now();
        for r in b.records {
            if r.offset >= stop {
                break;
            }
            let written = if a.base64 {
                use base64::Engine as _;
                let v = base64::engine::general_purpose::STANDARD.encode(&r.record.value);
                writeln!(out, "{} {v}", r.offset)
            } else {
                // The bytes as they are, as Kafka's console consumer
                // writes them: what `produce` read from a line comes
                // back the same, UTF-8 or not.
                write!(out, "{} ", r.offset)
                    .and_then(|()| out.write_all(&r.record.value))
                    .and_then(|()| out.write_all(b"\n"))
            };
            if let Err(e) = written {
                return stdout_failed(e, &c).await;
            }
            offset = r.offset + 1;
        }
    }
    if let Err(e) = out.flush() {
        return stdout_failed(e, &c).await;
    }
    drop(out);
    c.close().await;
    Ok(ExitCode::SUCCESS)
}

/// How long a caught-up consumer's read waits at the node for new records.
const READ_WAIT: Duration = Duration::from_millis(500);

/// How long a consumer reads nothing new from a node before it asks the
/// cluster whether that node still leads.
const LEADER_RECHECK: Duration = Duration::from_secs(2);

/// After a failed read from `node` (`at`: where, for the message): say
/// so, wait a moment (an election takes a few heartbeats) and return the
/// partition's leader as the cluster now names it, or `node` again.
async fn leader_again(
    c: &Client,
    a: &ConsumeArgs,
    node: ReplicaId,
    at: &str,
    e: &replicator::client::ClientError,
) -> ReplicaId {
    eprintln!(
        "note: reading {}/{}{at} on node {node} failed ({e}); finding its leader again",
        a.topic, a.partition
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.leader_of(&a.topic, a.partition).await.unwrap_or(node)
}

/// A failed read of `a`'s partition at `offset` on `node`, for the user:
/// below the log start, also why (retention removed the offset) and how
/// to go on, rather than only the range.
fn read_failed(
    e: replicator::client::ClientError,
    a: &ConsumeArgs,
    offset: u64,
    node: ReplicaId,
) -> anyhow::Error {
    let at = format!(
        "reading {}/{} at {offset} on node {node}",
        a.topic, a.partition
    );
    match &e {
        replicator::client::ClientError::Refused(
            replicator::wire::rpc::RpcError::OffsetOutOfRange { log_start, .. },
        ) if offset < *log_start => {
            let hint = format!(
                "offsets below {log_start} are no longer kept (retention deleted them); `--from start` reads from the oldest kept"
            );
            anyhow::Error::new(e).context(hint).context(at)
        }
        _ => anyhow::Error::new(e).context(at),
    }
}

/// After a read from `node` failed on its storage (a damaged batch):
/// the leader that finds damage steps down and hands the partition on,
/// which takes a metadata write. The new leader, if the cluster names
/// one within `HANDOFF_WAIT`, else `None` (the damage is in the only copy
/// left, say): then the error stands.
async fn leader_handed_on(
    c: &Client,
    a: &ConsumeArgs,
    node: ReplicaId,
    at: &str,
    e: &replicator::client::ClientError,
) -> Option<ReplicaId> {
    let until = Instant::now() + HANDOFF_WAIT;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(l) = c.leader_of(&a.topic, a.partition).await
            && l != node
        {
            eprintln!(
                "note: reading {}/{}{at} on node {node} failed on its storage ({e}); node {l} leads it now, reading there",
                a.topic, a.partition
            );
            return Some(l);
        }
    }
    None
}

/// How long a consumer whose read failed on the leader's storage waits
/// for the cluster to name another leader.
const HANDOFF_WAIT: Duration = Duration::from_secs(3);

/// A read refused by the node's storage for a reason that does not pass
/// there (a damaged batch), as opposed to one it is recovering from.
fn storage_failed(e: &replicator::client::ClientError) -> bool {
    matches!(
        e,
        replicator::client::ClientError::Refused(replicator::wire::rpc::RpcError::Replication {
            code: replicator::core::ErrorCode::StorageError,
            message,
        }) if message != replicator::wire::rpc::STORAGE_RECOVERING
    )
}

/// A read that may succeed on the partition's current leader: the node
/// was unreachable or its connection failed, or it no longer leads or
/// holds the partition. Not an offset out of range (retention or an
/// unclean election moved the log), nor a bad answer.
fn read_again(e: &replicator::client::ClientError) -> bool {
    use replicator::client::ClientError;
    use replicator::wire::rpc::RpcError;
    match e {
        ClientError::Transport(_) | ClientError::NoNode(_) | ClientError::NoLeader(..) => true,
        // A leader whose storage failed hands the partition on while it
        // recovers, and answers reads so meanwhile (not a damaged batch,
        // which stays an error).
        ClientError::Refused(RpcError::Replication {
            code: replicator::core::ErrorCode::StorageError,
            message,
        }) => message == replicator::wire::rpc::STORAGE_RECOVERING,
        ClientError::Refused(r) => r.retriable(),
        _ => false,
    }
}

/// A write to stdout failed (a full disk under `consume > file`): an
/// error, not a quiet success with the output cut short. A reader that
/// went away (`consume | head`) never gets here: `main` restores SIGPIPE's
/// default for `consume`, which ends it quietly.
async fn stdout_failed(e: std::io::Error, c: &Client) -> anyhow::Result<ExitCode> {
    c.close().await;
    Err(e).context("writing to stdout")
}

#[derive(Args)]
pub struct StatusArgs {
    /// `client.toml` from `replicator cluster init`.
    #[arg(long)]
    pub config: PathBuf,
    /// Only this topic's partitions (default: every topic's).
    #[arg(long)]
    pub topic: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// One partition as `status` reports it.
#[derive(serde::Serialize)]
pub struct PartitionReport {
    pub topic: String,
    pub partition: u32,
    pub leader: Option<ReplicaId>,
    pub epoch: u32,
    pub replicas: Vec<ReplicaId>,
    pub isr: Vec<ReplicaId>,
    /// Eligible leader replicas (KIP-966), as the store holds them.
    pub elr: Vec<ReplicaId>,
    pub high_watermark: Option<u64>,
    /// (replica, its log end, lag behind the leader's log end) as each
    /// replica reports itself; `None` where the replica did not answer.
    pub replica_log_ends: Vec<(ReplicaId, Option<u64>, Option<u64>)>,
    /// (replica, the leader epoch of the newest batch in its log), as each
    /// replica reports itself; `None` where it did not answer or its log
    /// is empty.
    pub replica_last_epochs: Vec<(ReplicaId, Option<u32>)>,
    /// (replica, its log start: the first offset it can still be read
    /// from, which retention moves), as each replica reports itself.
    pub replica_log_starts: Vec<(ReplicaId, Option<u64>)>,
}

impl PartitionReport {
    /// (replica, last epoch, log end) of every replica, in assignment
    /// order.
    fn replica_logs(&self) -> Vec<ReplicaLog> {
        self.replica_log_ends
            .iter()
            .map(|(r, leo, _)| {
                let epoch = self
                    .replica_last_epochs
                    .iter()
                    .find(|(e, _)| e == r)
                    .and_then(|(_, e)| *e);
                (*r, epoch, *leo)
            })
            .collect()
    }
}

/// Why `topic/partition` (on `replica`, if one is named) cannot be read
/// when the metadata says it does not exist: no such topic, a partition
/// past its last, or a node that holds no replica of it. `None` for any
/// other reason (or no metadata). The node only says "unknown topic or
/// partition", where `produce` named the partitions (exploratory run).
async fn missing(
    c: &Client,
    topic: &str,
    partition: u32,
    replica: Option<ReplicaId>,
) -> Option<String> {
    let (_, parts) = c.metadata().await.ok()?;
    let unreadable = c.unreadable().await;
    let last = parts
        .iter()
        .filter(|p| p.topic == topic)
        .map(|p| p.partition)
        .chain(
            unreadable
                .iter()
                .filter(|u| u.topic == topic)
                .map(|u| u.partition),
        )
        .max();
    match last {
        None => Some(format!(
            "topic {topic} does not exist (`replicator topic list` shows the topics)"
        )),
        Some(last) if partition > last => Some(format!(
            "topic {topic} has no partition {partition} (its partitions are 0 to {last})"
        )),
        Some(_) => {
            let p = parts
                .iter()
                .find(|p| p.topic == topic && p.partition == partition)?;
            let r = replica.filter(|r| !p.replicas.contains(r))?;
            Some(format!(
                "node {r} holds no replica of {topic}/{partition} (its replicas are {:?})",
                p.replicas
            ))
        }
    }
}

/// What electing `chosen` discards that the most up-to-date replica that
/// answered holds, in words; `None` if `chosen` is as up to date as any.
/// An operator who named a shorter replica with `--replica` was told only
/// that writes it lacks are lost, not which (exploratory run).
fn discarded_by(logs: &[ReplicaLog], chosen: ReplicaId) -> Option<String> {
    let best = most_up_to_date(logs)?;
    let find = |r: ReplicaId| logs.iter().find(|(x, _, _)| *x == r).copied();
    let (_, best_epoch, best_end) = find(best)?;
    let best_end = best_end?;
    let (_, epoch, end) = find(chosen).unwrap_or((chosen, None, None));
    if (epoch, end) == (best_epoch, Some(best_end)) {
        return None;
    }
    Some(match end {
        Some(end) if epoch == best_epoch && end < best_end => format!(
            "node {best} holds offsets {end}..{best_end} ({} records) that node {chosen} lacks; every replica drops them",
            best_end - end
        ),
        Some(end) => format!(
            "node {best}'s log (to offset {best_end}, epoch {}) is more up to date than node {chosen}'s (to {end}, epoch {}); every replica drops what it holds past where the two diverge",
            best_epoch.map_or("?".into(), |e| e.to_string()),
            epoch.map_or("?".into(), |e| e.to_string()),
        ),
        None => format!(
            "node {chosen} did not say where its log ends; node {best}'s reaches offset {best_end}, and what node {chosen} lacks of it is dropped"
        ),
    })
}

/// How long `gather` waits for a node the cluster counts as failed. One
/// that is up answers within milliseconds; one that is down would hold
/// every `status` for the whole handshake timeout (3 s), which operators
/// pay on each look during an incident.
const FAILED_NODE_WAIT: Duration = Duration::from_millis(500);

/// What `status` shows: the partitions, the nodes that did not answer
/// (and why), and the partitions nodes hold assigned but could not open.
pub struct Gathered {
    pub reports: Vec<PartitionReport>,
    pub unreachable: Vec<String>,
    /// The nodes of `unreachable`.
    pub unreachable_ids: Vec<ReplicaId>,
    pub not_open: Vec<(ReplicaId, NotOpen)>,
    /// Replicas recovering their log after a storage fault, with the fault.
    pub storage_faults: Vec<StorageFault>,
}

/// A replica recovering its log after a storage fault (a full disk).
#[derive(serde::Serialize)]
pub struct StorageFault {
    pub node: ReplicaId,
    pub topic: String,
    pub partition: u32,
    pub error: String,
}

pub async fn gather(c: &Client) -> anyhow::Result<Gathered> {
    let (_, parts) = c.metadata().await?;
    let failed = c.counted_failed().await;
    Ok(gather_with(c, &parts, &failed).await)
}

/// `gather` for partitions `parts` and the nodes `failed` the cluster
/// counts as failed, both already read by the caller (one snapshot, not
/// two requests each).
pub async fn gather_with(
    c: &Client,
    parts: &[replicator::metadata::PartitionState],
    failed: &[ReplicaId],
) -> Gathered {
    // Every node at once: a dead one costs its timeout once, not in turn.
    let asks = c.known_nodes().await.into_iter().map(|n| {
        let counted_failed = failed.contains(&n);
        async move {
            let answer = if counted_failed {
                match tokio::time::timeout(FAILED_NODE_WAIT, c.node_status(n)).await {
                    Ok(answer) => answer.map_err(|e| e.to_string()),
                    Err(_) => Err(format!(
                        "the cluster counts it as failed, and it did not answer within {} ms",
                        FAILED_NODE_WAIT.as_millis()
                    )),
                }
            } else {
                c.node_status(n).await.map_err(|e| e.to_string())
            };
            (n, answer)
        }
    });
    let mut views: std::collections::HashMap<ReplicaId, Vec<ReplicaStatus>> = Default::default();
    let mut unreachable = Vec::new();
    let mut unreachable_ids = Vec::new();
    let mut not_open = Vec::new();
    for (n, answer) in futures_util::future::join_all(asks).await {
        match answer {
            Ok((v, closed)) => {
                views.insert(n, v);
                not_open.extend(closed.into_iter().map(|p| (n, p)));
            }
            Err(e) => {
                unreachable.push(format!("node {n}: {e}"));
                unreachable_ids.push(n);
            }
        }
    }
    let mut storage_faults: Vec<StorageFault> = views
        .iter()
        .flat_map(|(n, v)| {
            v.iter().filter_map(|s| {
                Some(StorageFault {
                    node: *n,
                    topic: s.topic.clone(),
                    partition: s.partition,
                    error: s.storage_fault.clone()?,
                })
            })
        })
        .collect();
    storage_faults
        .sort_by(|a, b| (&a.topic, a.partition, a.node).cmp(&(&b.topic, b.partition, b.node)));
    let find = |n: ReplicaId, t: &str, p: u32| {
        views
            .get(&n)
            .and_then(|v| v.iter().find(|s| s.topic == t && s.partition == p))
    };
    let reports = parts
        .iter()
        .map(|p| report(p, |r| find(r, &p.topic, p.partition)))
        .collect();
    Gathered {
        reports,
        unreachable,
        unreachable_ids,
        not_open,
        storage_faults,
    }
}

/// One partition's row: the store's state `p`, with what each replica
/// said of it (`find`).
fn report<'a>(
    p: &replicator::metadata::PartitionState,
    find: impl Fn(ReplicaId) -> Option<&'a ReplicaStatus>,
) -> PartitionReport {
    let lead = p.leader.and_then(&find);
    // Its ISR, HW and log end only while it serves the store's epoch: a
    // named leader that is recovering its log (a full disk) reported an
    // empty ISR and HW 0, where the store lists the members.
    let serving = lead.filter(|s| s.role == "leader" && s.leader_epoch == Some(p.leader_epoch));
    let leader_leo = serving.map(|s| s.log_end);
    let replica_log_ends = p
        .replicas
        .iter()
        .map(|r| {
            let leo = find(*r).map(|s| s.log_end);
            let lag = match (leader_leo, leo) {
                (Some(l), Some(o)) => Some(l.saturating_sub(o)),
                _ => None,
            };
            (*r, leo, lag)
        })
        .collect();
    PartitionReport {
        topic: p.topic.clone(),
        partition: p.partition,
        leader: p.leader,
        epoch: p.leader_epoch,
        replicas: p.replicas.clone(),
        // The leader's live view, else the store's.
        isr: serving.map(|s| s.isr.clone()).unwrap_or(p.isr.clone()),
        elr: p.elr.clone(),
        high_watermark: serving.map(|s| s.high_watermark),
        replica_log_ends,
        replica_last_epochs: p
            .replicas
            .iter()
            .map(|r| (*r, find(*r).and_then(|s| s.last_epoch)))
            .collect(),
        replica_log_starts: p
            .replicas
            .iter()
            .map(|r| (*r, find(*r).map(|s| s.log_start)))
            .collect(),
    }
}

pub fn print_table(reports: &[PartitionReport]) {
    println!(
        "{:<16} {:>4} {:>6} {:>5} {:<10} {:<10} {:<6} {:>10}  replica:log-end(lag)",
        "TOPIC", "PART", "LEADER", "EPOCH", "REPLICAS", "ISR", "ELR", "HW"
    );
    for r in reports {
        let list = |v: &[ReplicaId]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let leos = r
            .replica_log_ends
            .iter()
            .map(|(id, leo, lag)| match (leo, lag) {
                (Some(l), Some(g)) => format!("{id}:{l}({g})"),
                (Some(l), None) => format!("{id}:{l}"),
                _ => format!("{id}:?"),
            })
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "{:<16} {:>4} {:>6} {:>5} {:<10} {:<10} {:<6} {:>10}  {}",
            r.topic,
            r.partition,
            r.leader.map_or("-".into(), |l| l.to_string()),
            r.epoch,
            list(&r.replicas),
            list(&r.isr),
            if r.elr.is_empty() {
                "-".to_string()
            } else {
                list(&r.elr)
            },
            r.high_watermark.map_or("?".into(), |h| h.to_string()),
            leos
        );
    }
}

pub async fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let c = client(&a.config)?;
    let gathered = gather(&c).await;
    let mut unreadable = c.unreadable().await;
    let stale = c.metadata_stale().await;
    // Nothing to show: whether the store lost its nodes too (wiped).
    let no_nodes = match &gathered {
        Ok(g) if g.reports.is_empty() => c
            .metadata()
            .await
            .is_ok_and(|(brokers, _)| brokers.is_empty()),
        _ => false,
    };
    c.close().await;
    let Gathered {
        mut reports,
        unreachable,
        unreachable_ids: _,
        mut not_open,
        mut storage_faults,
    } = gathered?;
    if let Some(t) = &a.topic {
        reports.retain(|r| &r.topic == t);
        unreadable.retain(|u| &u.topic == t);
        not_open.retain(|(_, p)| &p.topic == t);
        storage_faults.retain(|f| &f.topic == t);
        if reports.is_empty() && unreadable.is_empty() {
            bail!("topic {t} does not exist (`replicator topic list` lists the topics)");
        }
    }
    if a.json {
        /// A `not_open` entry with the node that reported it.
        #[derive(serde::Serialize)]
        struct OnNode<'a> {
            node: ReplicaId,
            #[serde(flatten)]
            not_open: &'a NotOpen,
        }
        let not_open: Vec<OnNode> = not_open
            .iter()
            .map(|(node, not_open)| OnNode {
                node: *node,
                not_open,
            })
            .collect();
        let v = serde_json::json!({
            "partitions": reports,
            "unreachable": unreachable,
            "unreadable": unreadable,
            "not_open": not_open,
            "storage_faults": storage_faults,
            "stale": stale,
        });
        println!("{v}");
    } else {
        print_stale(stale.as_deref());
        print_table(&reports);
        hint_if_no_topics(reports.is_empty() && unreadable.is_empty(), no_nodes);
        for p in &unreachable {
            println!("unreachable: {p}");
        }
        // Why a replica shows `?` on a node that answered.
        for (n, p) in &not_open {
            println!(
                "not open: node {n} cannot open its log of {}/{} ({} attempts so far, retrying): {}",
                p.topic, p.partition, p.attempts, p.error
            );
        }
        // Why a replica fell out of the ISR: a full disk used to show
        // only as lag, with the cause in that node's log alone.
        for f in &storage_faults {
            println!(
                "storage fault: node {}'s log of {}/{} failed and is recovering (retried with backoff): {}",
                f.node, f.topic, f.partition, f.error
            );
        }
        print_unreadable(&unreadable);
        hint_if_stuck(&reports, &a.config);
    }
    Ok(ExitCode::SUCCESS)
}

/// Partitions that will not get a leader by themselves: say what will
/// give them one, and what it costs. After a whole-cluster crash every
/// partition is so, and the command was named only in the nodes' logs.
fn hint_if_stuck(reports: &[PartitionReport], config: &std::path::Path) {
    let stuck: Vec<String> = reports
        .iter()
        .filter(|r| r.leader.is_none() && r.isr.is_empty() && r.elr.is_empty())
        .map(|r| format!("{}/{}", r.topic, r.partition))
        .collect();
    if stuck.is_empty() {
        return;
    }
    const SHOWN: usize = 10;
    let more = match stuck.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    println!(
        "no leader: {}{more}: no replica is known to hold every committed write (ISR and ELR are empty, as after a whole-cluster crash), so none gets a leader by itself. For each, `replicator partition elect --config {} --topic T --partition P --unclean` elects the most up-to-date live replica; acknowledged writes it lacks are lost",
        stuck[..stuck.len().min(SHOWN)].join(", "),
        config.display()
    );
}

/// An empty table on a cluster with no topics: say how to make one, or,
/// when the store holds no nodes either (`no_nodes`: the nodes answering
/// registered at their start), that it lost what it held.
fn hint_if_no_topics(none: bool, no_nodes: bool) {
    if !none {
        return;
    }
    if no_nodes {
        eprintln!(
            "the metadata store holds no topics and no nodes, though nodes answered: was it wiped or replaced under the running cluster? To start over on it, stop each node, delete `identity.toml` in its data directory (a node refuses an empty store its data directory does not know) and start it again to register anew (its logs are kept), then create the topics as they were"
        );
    } else {
        eprintln!("no topics yet: create one with `replicator topic create`");
    }
}

/// No node answered from the metadata store: say so above what it shows.
fn print_stale(stale: Option<&str>) {
    if let Some(why) = stale {
        println!("warning: no node answered from the metadata store; {why}");
    }
}

fn print_unreadable(unreadable: &[replicator::wire::rpc::UnreadablePartition]) {
    for u in unreadable {
        println!(
            "unreadable: {}/{}: the metadata store's record is corrupt: {}",
            u.topic, u.partition, u.error
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{
        ConsumeFrom, TopicSummary, check_message_size, discarded_by, longest_message, next_batch,
        report, summarize,
    };
    use bytes::Bytes;
    use clap::Parser as _;
    use replicator::wire::rpc::ReplicaStatus;

    /// `--from` takes an offset or a word; `-1` (Kafka tools' "latest")
    /// reaches the parser, which names the words, instead of clap taking
    /// it for a flag and suggesting `-- -1`.
    #[test]
    fn consume_from_takes_offsets_and_words_and_explains_negative_ones() {
        let consume = |more: &[&str]| {
            let base = [
                "replicator",
                "consume",
                "--config",
                "c.toml",
                "--topic",
                "t",
            ];
            crate::cli::Cli::try_parse_from(base.iter().chain(more))
        };
        let from = |v: &str| {
            consume(&["--from", v])
                .map(|cli| match cli.command {
                    crate::cli::Command::Consume(a) => a.from,
                    _ => None,
                })
                .map_err(|e| e.to_string())
        };
        assert_eq!(from("17"), Ok(Some(ConsumeFrom::Offset(17))));
        assert_eq!(from("start"), Ok(Some(ConsumeFrom::Start)));
        assert_eq!(from("end"), Ok(Some(ConsumeFrom::End)));
        assert_eq!(from("latest"), Ok(Some(ConsumeFrom::End)));
        let e = from("-1").expect_err("negative");
        assert!(e.contains("say `end`") && !e.contains("-- -1"), "{e}");
        let e = from("soon").expect_err("a word it does not know");
        assert!(e.contains("`start` or `end`"), "{e}");
        assert!(
            consume(&["--count", "3", "--follow"]).is_err(),
            "--count and --follow together"
        );
    }

    /// `partition elect --unclean --replica` names what it discards when
    /// the chosen replica is behind one that answered.
    #[test]
    fn an_unclean_election_names_what_a_shorter_replica_discards() {
        let logs = [
            (1, Some(1), Some(1500)),
            (2, Some(1), Some(1500)),
            (3, Some(1), Some(1000)),
        ];
        let lost = discarded_by(&logs, 3).expect("node 3 is behind");
        assert!(
            lost.contains("node 1 holds offsets 1000..1500 (500 records)"),
            "{lost}"
        );
        assert_eq!(discarded_by(&logs, 1), None);
        assert_eq!(discarded_by(&logs, 2), None, "as up to date as node 1");
        let newer = [(1, Some(1), Some(1500)), (2, Some(2), Some(1200))];
        let lost = discarded_by(&newer, 1).expect("an older epoch");
        assert!(
            lost.contains("node 2's log (to offset 1200, epoch 2)"),
            "{lost}"
        );
        let silent = [(1, Some(1), Some(10)), (2, None, None)];
        assert!(discarded_by(&silent, 2).is_some_and(|l| l.contains("did not say")));
    }

    /// A produce that may not retry at all would give up on the first
    /// leader move: `--timeout-ms 0` is refused, naming the range.
    #[test]
    fn produce_needs_a_timeout_of_at_least_one_ms() {
        let produce = |t: &str| {
            crate::cli::Cli::try_parse_from([
                "replicator",
                "produce",
                "--config",
                "c.toml",
                "--topic",
                "t",
                "--timeout-ms",
                t,
            ])
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert_eq!(produce("1"), Ok(()));
        let e = produce("0").expect_err("0 ms");
        assert!(e.contains("--timeout-ms") && e.contains("1.."), "{e}");
    }

    /// The named leader's own view of ISR and HW only while it leads the
    /// store's epoch: one recovering its log (a full disk) reported an
    /// empty ISR and HW 0 next to the store's ISR [3].
    #[test]
    fn a_named_leader_that_does_not_serve_leaves_the_store_s_isr() {
        let p = replicator::metadata::PartitionState {
            topic: "t".into(),
            partition: 0,
            leader: Some(3),
            leader_epoch: 7,
            isr: vec![3],
            elr: vec![2],
            replicas: vec![1, 2, 3],
            min_insync: 2,
            version: 9,
        };
        let said = |role: &str, epoch: Option<u32>| ReplicaStatus {
            topic: "t".into(),
            partition: 0,
            node: 3,
            role: role.into(),
            leader: Some(3),
            leader_epoch: epoch,
            high_watermark: 40,
            log_start: 0,
            log_end: 50,
            last_epoch: Some(7),
            isr: vec![3, 1],
            replicas: vec![1, 2, 3],
            follower_log_ends: Vec::new(),
            storage_fault: None,
        };
        for (role, epoch) in [("recovering", Some(7)), ("idle", None), ("leader", Some(6))] {
            let s = said(role, epoch);
            let r = report(&p, |n| (n == 3).then_some(&s));
            assert_eq!((r.isr, r.high_watermark), (vec![3], None), "{role}");
        }
        let s = said("leader", Some(7));
        let r = report(&p, |n| (n == 3).then_some(&s));
        assert_eq!((r.isr, r.high_watermark), (vec![3, 1], Some(40)));
    }

    /// Per topic, in name order: partitions, the range of replication
    /// factors and min.insync, and the partitions short of replicas, of
    /// min.insync and of a leader.
    #[test]
    fn topics_are_summarized_from_their_partitions() {
        let part = |topic: &str, partition, leader, isr: &[u32], replicas: &[u32], min_insync| {
            replicator::metadata::PartitionState {
                topic: topic.into(),
                partition,
                leader,
                leader_epoch: 1,
                isr: isr.to_vec(),
                elr: Vec::new(),
                replicas: replicas.to_vec(),
                min_insync,
                version: 1,
            }
        };
        let unreadable = |topic: &str| replicator::wire::rpc::UnreadablePartition {
            topic: topic.into(),
            partition: 9,
            error: "corrupt".into(),
        };
        let got = summarize(
            &[
                part("b", 0, Some(1), &[1, 2, 3], &[1, 2, 3], 2),
                part("a", 0, Some(2), &[2], &[2, 3], 2),
                part("b", 1, None, &[], &[2, 3, 1], 2),
                part("b", 2, Some(3), &[3, 1], &[3, 1, 2], 1),
                // From before partitions stored their own min.insync.
                part("c", 0, None, &[], &[1, 2, 3], 0),
                // Led by a node the cluster counts as failed.
                part("d", 0, Some(4), &[4], &[4], 1),
            ],
            &[4],
            &[unreadable("b"), unreadable("e")],
        );
        let want =
            |topic: &str, partitions, rf, mi, under, under_min, offline, unreadable| TopicSummary {
                topic: topic.into(),
                partitions,
                replication_factor: rf,
                min_insync: mi,
                under_replicated: under,
                under_min_insync: under_min,
                offline,
                unreadable,
            };
        assert_eq!(
            got,
            [
                want("a", 1, (2, 2), (2, 2), 1, 1, 0, 0),
                want("b", 4, (3, 3), (1, 2), 2, 1, 1, 1),
                want("c", 1, (3, 3), (0, 0), 1, 1, 1, 0),
                want("d", 1, (1, 1), (1, 1), 0, 0, 1, 0),
                want("e", 1, (0, 0), (0, 0), 0, 0, 0, 1),
            ]
        );
    }

    #[test]
    fn messages_that_cannot_make_a_batch_are_refused_up_front() {
        assert!(check_message_size(100, 64).is_ok());
        assert!(check_message_size(1 << 20, 15).is_ok());
        let e = check_message_size(20_000_000, 1).unwrap_err().to_string();
        assert!(
            e.starts_with("--size 20000000: a message must fit one batch"),
            "{e}"
        );
        let e = check_message_size(100_000_000_000, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must fit one batch"), "{e}");
        let e = check_message_size(1 << 20, 64).unwrap_err().to_string();
        assert!(e.contains("lower --batch to at most 15"), "{e}");
        let e = check_message_size(100, usize::MAX).unwrap_err().to_string();
        assert!(e.contains("lower --batch"), "{e}");
    }

    /// Stdin lines are batched by bytes as well as by count, and every
    /// batch `next_batch` makes encodes (it used to take 64 lines whatever
    /// their size, and a batch of 20 lines of 1 MiB failed whole).
    #[tokio::test]
    async fn stdin_batches_stay_within_the_batch_limit() {
        use replicator::batch::{Record, encode};
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let mib = |i: u8| Bytes::from(vec![i; 1 << 20]);
        for i in 1..20 {
            tx.send(mib(i)).await.unwrap();
        }
        drop(tx);
        let mut carried = None;
        let mut first = Some(mib(0));
        let mut sizes = Vec::new();
        let mut seen = Vec::new();
        while let Some(f) = first.take().or_else(|| carried.take()) {
            let values = next_batch(f, &mut rx, 64, &mut carried);
            let records: Vec<Record> = values
                .iter()
                .map(|v| Record {
                    value: v.clone(),
                    timestamp: 1,
                    ..Record::default()
                })
                .collect();
            encode(0, 1, &records).expect("a batch next_batch made encodes");
            sizes.push(values.len());
            seen.extend(values.iter().map(|v| v[0]));
            if carried.is_none() {
                first = rx.try_recv().ok();
            }
        }
        assert_eq!(sizes, vec![15, 5], "15 MiB lines fit a 16 MiB batch");
        assert_eq!(seen, (0..20).collect::<Vec<u8>>(), "in order, none lost");
        // --batch still bounds the count.
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        for _ in 0..5 {
            tx.send(Bytes::from_static(b"x")).await.unwrap();
        }
        let mut carried = None;
        let values = next_batch(Bytes::from_static(b"x"), &mut rx, 4, &mut carried);
        assert_eq!((values.len(), carried), (4, None));
        // A line of the longest length fits alone, and exactly fills one.
        let longest = Bytes::from(vec![b'x'; longest_message()]);
        let record = Record {
            value: longest,
            ..Record::default()
        };
        assert_eq!(
            encode(0, 1, std::slice::from_ref(&record)).map(|b| b.len()),
            Ok(replicator::batch::MAX_BATCH_LEN as usize)
        );
    }
}
