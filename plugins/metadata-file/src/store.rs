//! The on-disk store. Layout under the configured directory (default
//! `/data`):
//!
//! ```text
//! partitions/<topic>/<partition>/<version:020>.json   one file per accepted version
//! brokers/<id>/<epoch:020>.json                       one file per registration
//! cluster/<1:020>.json                                the cluster id, written once
//! .../.tmp-<random>                                   a write in progress
//! ```
//!
//! Topic names are restricted to Kafka's `[A-Za-z0-9._-]` (without `.` and
//! `..`), so they are used as directory names unescaped. The current state
//! of a partition is its highest-numbered version file; the current
//! registration of a broker is its highest-numbered epoch file.
//!
//! A new version is published by writing the whole content to a temporary
//! file with a unique name, syncing it, then hard-linking it to its final
//! name. `link` never replaces an existing name, so of several writers
//! (instances in other processes included) racing for the same version
//! exactly one succeeds and the others see `AlreadyExists`. A version file
//! therefore appears complete or not at all, even across a crash; a crash
//! can only leave a temporary file behind, which is removed once it is old.
//!
//! Only the newest [`KEEP`] versions are kept. Pruning frees a name, so a
//! writer that stalled between reading the latest version and linking its
//! successor while [`KEEP`] newer versions were written could re-create a
//! pruned name: after linking, every writer re-lists and treats its
//! version as stale (`conflict`, file removed) if the newest one is already
//! [`KEEP`] or more ahead of it.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use replicator_plugin_sdk::cluster_id::check_cluster_id;
use serde::{Deserialize, Serialize};

/// Versions (and broker epochs) kept per partition (per broker).
pub const KEEP: u64 = 10;
/// Partitions per page of `read-partitions` by default: a few file calls
/// each, well within a call's deadline even from a cold disk.
const PAGE: usize = 256;
/// Most partitions a page may be set to.
const MAX_PAGE: usize = 10_000;
/// A temporary file older than this belongs to a crashed writer.
const STALE_TMP: Duration = Duration::from_secs(600);
const TMP_PREFIX: &str = ".tmp-";
/// Longest topic name, as in Kafka.
const MAX_TOPIC: usize = 249;
const MAX_ADDRESS: usize = 1024;
/// Attempts at reading the newest file when pruning races with the read,
/// and at registering a broker when other registrations race with it.
const ATTEMPTS: usize = 32;

#[derive(Debug)]
pub enum Error {
    NotFound(String),
    Conflict(String),
    Invalid(String),
    Io(String),
    Corrupt(String),
}

type Result<T> = std::result::Result<T, Error>;

/// A page of `read-partitions`: each partition's state or why it cannot be
/// read, and where the next page starts (none after the last).
pub type Page = (Vec<(String, u32, Result<Partition>)>, Option<String>);

/// The stored cluster id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ClusterId {
    cluster_id: String,
}

/// The replicated state of one partition, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub topic: String,
    pub partition: u32,
    pub leader: Option<u32>,
    pub leader_epoch: u32,
    pub isr: Vec<u32>,
    /// Eligible leader replicas (KIP-966). Absent in data from before
    /// the field.
    #[serde(default)]
    pub elr: Vec<u32>,
    pub replicas: Vec<u32>,
    /// 0: the broker's default. Absent in files from before the field.
    #[serde(default)]
    pub min_insync: u32,
    pub version: u64,
}

/// One broker registration, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broker {
    pub id: u32,
    pub address: String,
    pub epoch: u64,
}

pub struct Store {
    cluster: PathBuf,
    partitions: PathBuf,
    brokers: PathBuf,
    /// Partitions per page of `read-partitions`.
    page: usize,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Io(format!("{what} {}: {e}", path.display()))
}

fn version_name(v: u64) -> String {
    format!("{v:020}.json")
}

/// The version a file name stands for: exactly 20 digits then `.json`.
fn parse_version(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".json")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A number used as a directory name, in its one canonical spelling (no
/// sign, no leading zeros), so `7` and `07` cannot both exist.
fn parse_id(name: &str) -> Option<u32> {
    let n: u32 = name.parse().ok()?;
    (n.to_string() == name).then_some(n)
}

pub fn check_topic(topic: &str) -> std::result::Result<(), String> {
    if topic.is_empty() {
        return Err("topic name is empty".into());
    }
    if topic.len() > MAX_TOPIC {
        return Err(format!(
            "topic name is {} characters long, at most {MAX_TOPIC} are allowed",
            topic.len()
        ));
    }
    if topic == "." || topic == ".." {
        return Err(format!("topic name `{topic}` is not allowed"));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name `{}` has `{}`; allowed are ASCII letters, digits, `.`, `_` and `-`",
            topic.escape_debug(),
            c.escape_debug()
        ));
    }
    Ok(())
}

fn duplicate(list: &[u32]) -> Option<u32> {
    list.iter()
        .enumerate()
        .find(|(i, x)| list[..*i].contains(x))
        .map(|(_, x)| *x)
}

/// The invariants of a partition state (the version aside).
pub fn check_state(s: &Partition) -> std::result::Result<(), String> {
    check_topic(&s.topic)?;
    let tp = format!("{}/{}", s.topic, s.partition);
    if s.replicas.is_empty() {
        return Err(format!("{tp}: replicas are empty"));
    }
    if let Some(d) = duplicate(&s.replicas) {
        return Err(format!("{tp}: replica {d} is listed twice in replicas"));
    }
    if let Some(d) = duplicate(&s.isr) {
        return Err(format!("{tp}: replica {d} is listed twice in the isr"));
    }
    if let Some(r) = s.isr.iter().find(|r| !s.replicas.contains(r)) {
        return Err(format!(
            "{tp}: isr member {r} is not one of the replicas {:?}",
            s.replicas
        ));
    }
    if let Some(l) = s.leader
        && !s.replicas.contains(&l)
    {
        return Err(format!(
            "{tp}: leader {l} is not one of the replicas {:?}",
            s.replicas
        ));
    }
    Ok(())
}

fn check_address(address: &str) -> std::result::Result<(), String> {
    if address.is_empty() {
        return Err("broker address is empty".into());
    }
    if address.len() > MAX_ADDRESS {
        return Err(format!(
            "broker address is {} bytes long, at most {MAX_ADDRESS} are allowed",
            address.len()
        ));
    }
    if address.chars().any(char::is_control) {
        return Err(format!(
            "broker address `{}` has control characters",
            address.escape_debug()
        ));
    }
    Ok(())
}

/// What a version directory holds.
struct Scan {
    /// Ascending.
    versions: Vec<u64>,
    temps: Vec<PathBuf>,
}

impl Scan {
    fn latest(&self) -> u64 {
        self.versions.last().copied().unwrap_or(0)
    }
}

/// The entries of `dir` as (name, is a directory); `None` if `dir` does
/// not exist. wasmtime lists a directory by reading every entry's
/// metadata up front, so an entry removed meanwhile (a version pruned, a
/// temporary file cleaned up by another writer) fails the listing with
/// `NotFound`; the listing is then taken again rather than trusted to be
/// complete.
fn list_dir(dir: &Path) -> Result<Option<Vec<(String, bool)>>> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        match try_list_dir(dir) {
            Ok(entries) => return Ok(Some(entries)),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if matches!(fs::metadata(dir), Err(e) if e.kind() == ErrorKind::NotFound) {
                    return Ok(None);
                }
                last = Some(e);
            }
            Err(e) => return Err(io_error("list", dir, e)),
        }
    }
    let e = last.unwrap_or_else(|| std::io::Error::other("listing kept failing"));
    Err(io_error("list", dir, e))
}

fn try_list_dir(dir: &Path) -> std::io::Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let is_dir = entry.file_type()?.is_dir();
        if let Ok(name) = entry.file_name().into_string() {
            out.push((name, is_dir));
        }
    }
    Ok(out)
}

/// The version files (and temporary files) of `dir`; a missing directory
/// holds none. Other names are ignored.
fn scan(dir: &Path) -> Result<Scan> {
    let mut s = Scan {
        versions: Vec::new(),
        temps: Vec::new(),
    };
    for (name, _) in list_dir(dir)?.unwrap_or_default() {
        if let Some(v) = parse_version(&name) {
            s.versions.push(v);
        } else if name.starts_with(TMP_PREFIX) {
            s.temps.push(dir.join(name));
        }
    }
    s.versions.sort_unstable();
    Ok(s)
}

fn random_u64() -> u64 {
    wasip2::random::random::get_random_u64()
}

/// Create `path`, write `bytes` to it and sync it, through
/// `wasi:filesystem` directly rather than std: std writes a file through a
/// stream, whose errors carry no code, so a full disk came back as
/// "I/O error (os error 29)"; the descriptor's own `write` says
/// `insufficient-space`.
fn write_new_file(path: &Path, bytes: &[u8]) -> std::result::Result<(), String> {
    use wasip2::filesystem::types::{DescriptorFlags, OpenFlags, PathFlags};
    let fail = |what: &str, e: wasip2::filesystem::types::ErrorCode| {
        // The message without its ", similar to `ENOSPC` in POSIX." tail.
        let message = e.message();
        let message = message.split(", similar to").next().unwrap_or(message);
        format!("{what} {}: {message}", path.display())
    };
    let (dir, name) = wasip2::filesystem::preopens::get_directories()
        .into_iter()
        .find_map(|(d, root)| {
            let rel = path.strip_prefix(&root).ok()?.to_str()?.to_string();
            Some((d, rel))
        })
        .ok_or_else(|| {
            format!(
                "create {}: not inside a preopened directory",
                path.display()
            )
        })?;
    let file = dir
        .open_at(
            PathFlags::empty(),
            &name,
            OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
            DescriptorFlags::WRITE,
        )
        .map_err(|e| fail("create", e))?;
    let mut done = 0usize;
    while done < bytes.len() {
        let n = file
            .write(&bytes[done..], done as u64)
            .map_err(|e| fail("write", e))?;
        if n == 0 {
            return Err(format!("write {}: no progress", path.display()));
        }
        done += (n as usize).min(bytes.len() - done);
    }
    file.sync().map_err(|e| fail("sync", e))
}

/// Make creations and removals in `dir` durable. Not every file system
/// supports syncing a directory; the link itself is atomic either way, so
/// a refusal only weakens durability and is ignored.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Publish `bytes` as version `version` of `dir`: write and sync a
/// temporary file, then link it to the final name. `Ok(false)` if that
/// version exists already (another writer won).
fn publish(dir: &Path, version: u64, bytes: &[u8]) -> Result<bool> {
    let tmp = dir.join(format!("{TMP_PREFIX}{:016x}", random_u64()));
    if let Err(e) = write_new_file(&tmp, bytes) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io(e));
    }
    let target = dir.join(version_name(version));
    let linked = fs::hard_link(&tmp, &target);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(dir);
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_error("link", &target, e)),
    }
}

/// Remove versions more than [`KEEP`] behind the newest (oldest first, so
/// a removed version never has a surviving predecessor) and the temporary
/// files of crashed writers.
fn prune(dir: &Path, scan: &Scan) {
    let latest = scan.latest();
    for &v in &scan.versions {
        if v.saturating_add(KEEP) > latest {
            break;
        }
        match fs::remove_file(dir.join(version_name(v))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(_) => break,
        }
    }
    let now = SystemTime::now();
    for t in &scan.temps {
        let old = fs::metadata(t)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > STALE_TMP);
        if old {
            let _ = fs::remove_file(t);
        }
    }
}

/// The newest version file of `dir`, parsed, with its version; `None` if
/// there is none. Retries when pruning removes the file between listing
/// and reading (only possible after [`KEEP`] newer versions appeared).
fn read_latest<T: for<'de> Deserialize<'de>>(dir: &Path) -> Result<Option<(u64, T, PathBuf)>> {
    for _ in 0..ATTEMPTS {
        let s = scan(dir)?;
        let Some(&v) = s.versions.last() else {
            return Ok(None);
        };
        let path = dir.join(version_name(v));
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("read", &path, e)),
        };
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?;
        return Ok(Some((v, value, path)));
    }
    Err(Error::Io(format!(
        "{}: the newest version kept disappearing while being read",
        dir.display()
    )))
}

/// The entries of `dir` that are directories, by name; a missing `dir`
/// has none.
fn subdirs(dir: &Path) -> Result<Vec<String>> {
    Ok(list_dir(dir)?
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, is_dir)| is_dir.then_some(name))
        .collect())
}

impl Store {
    /// Settings: `dir`, the store's directory inside the preopen (default
    /// `/data`).
    pub fn connect(config: &[(String, String)]) -> Result<Store> {
        let mut root = PathBuf::from("/data");
        let mut page = PAGE;
        for (k, v) in config {
            match k.as_str() {
                "page_size" => {
                    page = match v.parse::<usize>() {
                        Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
                        _ => {
                            return Err(Error::Invalid(format!(
                                "page_size = `{v}`: want a number of partitions from 1 to {MAX_PAGE}"
                            )));
                        }
                    }
                }
                "dir" => {
                    if !v.starts_with('/') {
                        return Err(Error::Invalid(format!(
                            "dir = `{v}`: want an absolute path inside the /data directory"
                        )));
                    }
                    root = PathBuf::from(v);
                }
                _ => {
                    return Err(Error::Invalid(format!(
                        "unknown setting `{k}`; metadata-file takes: dir, page_size"
                    )));
                }
            }
        }
        let store = Store {
            cluster: root.join("cluster"),
            partitions: root.join("partitions"),
            brokers: root.join("brokers"),
            page,
        };
        for d in [&store.partitions, &store.brokers] {
            fs::create_dir_all(d).map_err(|e| io_error("create", d, e))?;
        }
        Ok(store)
    }

    fn partition_dir(&self, topic: &str, partition: u32) -> PathBuf {
        self.partitions.join(topic).join(partition.to_string())
    }

    pub fn get_partition(&self, topic: &str, partition: u32) -> Result<Partition> {
        check_topic(topic).map_err(Error::Invalid)?;
        let dir = self.partition_dir(topic, partition);
        let Some((v, state, path)) = read_latest::<Partition>(&dir)? else {
            return Err(Error::NotFound(format!("partition {topic}/{partition}")));
        };
        if state.topic != topic || state.partition != partition || state.version != v {
            return Err(Error::Corrupt(format!(
                "{}: holds {}/{} version {}",
                path.display(),
                state.topic,
                state.partition,
                state.version
            )));
        }
        check_state(&state).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?;
        Ok(state)
    }

    pub fn compare_and_set(&self, mut state: Partition, expected: u64) -> Result<u64> {
        check_state(&state).map_err(Error::Invalid)?;
        let tp = format!("{}/{}", state.topic, state.partition);
        let new = expected.checked_add(1).ok_or_else(|| {
            Error::Invalid(format!(
                "{tp}: expected version {expected} has no successor"
            ))
        })?;
        let dir = self.partition_dir(&state.topic, state.partition);
        let stored = scan(&dir)?.latest();
        if stored != expected {
            return Err(Error::Conflict(if stored == 0 {
                format!("{tp}: expected version {expected}, but the partition does not exist")
            } else {
                format!("{tp}: expected version {expected}, but the stored version is {stored}")
            }));
        }
        fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
        state.version = new;
        let bytes = serde_json::to_vec(&state)
            .map_err(|e| Error::Io(format!("{tp}: encoding the state: {e}")))?;
        if !publish(&dir, new, &bytes)? {
            return Err(Error::Conflict(format!(
                "{tp}: expected version {expected}, but another writer stored version {new} first"
            )));
        }
        let after = scan(&dir)?;
        if after.latest() >= new.saturating_add(KEEP) {
            // Our name had been pruned: the version we read was long gone.
            let _ = fs::remove_file(dir.join(version_name(new)));
            return Err(Error::Conflict(format!(
                "{tp}: expected version {expected}, but the stored version is {}",
                after.latest()
            )));
        }
        prune(&dir, &after);
        Ok(new)
    }

    pub fn list_partitions(&self) -> Result<Vec<(String, u32)>> {
        let mut out = Vec::new();
        for topic in subdirs(&self.partitions)? {
            if check_topic(&topic).is_err() {
                continue;
            }
            let tdir = self.partitions.join(&topic);
            for p in subdirs(&tdir)? {
                let Some(partition) = parse_id(&p) else {
                    continue;
                };
                if !scan(&tdir.join(&p))?.versions.is_empty() {
                    out.push((topic.clone(), partition));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// A page of every partition's state (or why its record cannot be
    /// read), by topic then partition: up to `page_size` partitions after
    /// `after` (`<topic>/<partition>`, the last of the previous page), one
    /// listing and one read of the newest version each. The next page's
    /// `after`, unless this was the last.
    pub fn read_partitions(&self, after: Option<&str>) -> Result<Page> {
        let after = match after {
            None => None,
            Some(cursor) => {
                let parsed = cursor
                    .rsplit_once('/')
                    .and_then(|(t, p)| Some((t.to_string(), parse_id(p)?)));
                Some(
                    parsed
                        .ok_or_else(|| Error::Invalid(format!("not a page cursor: {cursor:?}")))?,
                )
            }
        };
        let mut topics: Vec<String> = subdirs(&self.partitions)?
            .into_iter()
            .filter(|t| check_topic(t).is_ok())
            .filter(|t| after.as_ref().is_none_or(|(a, _)| t >= a))
            .collect();
        topics.sort();
        let mut out = Vec::new();
        let mut examined = 0;
        let mut last = String::new();
        for topic in topics {
            let tdir = self.partitions.join(&topic);
            let mut partitions: Vec<u32> = subdirs(&tdir)?
                .iter()
                .filter_map(|p| parse_id(p))
                .filter(|p| match &after {
                    Some((t, last)) if *t == topic => p > last,
                    _ => true,
                })
                .collect();
            partitions.sort_unstable();
            for partition in partitions {
                if examined == self.page {
                    // After the last partition looked at (read or not).
                    return Ok((out, Some(last)));
                }
                examined += 1;
                last = format!("{topic}/{partition}");
                match self.get_partition(&topic, partition) {
                    // No version yet (being created) or gone meanwhile.
                    Err(Error::NotFound(_)) => {}
                    read => out.push((topic.clone(), partition, read)),
                }
            }
        }
        Ok((out, None))
    }

    /// Register `id` at `address` under a new epoch, greater than every
    /// earlier one of `id`.
    pub fn register_broker(&self, id: u32, address: &str) -> Result<u64> {
        check_address(address).map_err(Error::Invalid)?;
        let dir = self.brokers.join(id.to_string());
        fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
        for _ in 0..ATTEMPTS {
            let epoch = scan(&dir)?.latest().checked_add(1).ok_or_else(|| {
                Error::Corrupt(format!("{}: broker epochs are exhausted", dir.display()))
            })?;
            let b = Broker {
                id,
                address: address.to_string(),
                epoch,
            };
            let bytes = serde_json::to_vec(&b)
                .map_err(|e| Error::Io(format!("broker {id}: encoding: {e}")))?;
            if !publish(&dir, epoch, &bytes)? {
                continue;
            }
            let after = scan(&dir)?;
            if after.latest() >= epoch.saturating_add(KEEP) {
                let _ = fs::remove_file(dir.join(version_name(epoch)));
                continue;
            }
            prune(&dir, &after);
            return Ok(epoch);
        }
        Err(Error::Conflict(format!(
            "broker {id}: {ATTEMPTS} concurrent registrations won the race for every epoch tried"
        )))
    }

    /// Store `id` as the cluster's if none is stored yet (version 1 of
    /// `cluster/`, published by link, so one of racing claimants wins);
    /// return the stored one.
    pub fn claim_cluster_id(&self, id: &str) -> Result<String> {
        check_cluster_id(id).map_err(Error::Invalid)?;
        let dir = &self.cluster;
        fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
        if scan(dir)?.versions.is_empty() {
            let bytes = serde_json::to_vec(&ClusterId {
                cluster_id: id.to_string(),
            })
            .map_err(|e| Error::Io(format!("cluster id: encoding: {e}")))?;
            // `false`: another claimant linked first; read theirs.
            publish(dir, 1, &bytes)?;
        }
        let Some((_, stored, path)) = read_latest::<ClusterId>(dir)? else {
            return Err(Error::Corrupt(format!(
                "{}: the cluster id vanished after it was written",
                dir.display()
            )));
        };
        check_cluster_id(&stored.cluster_id)
            .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?;
        Ok(stored.cluster_id)
    }

    pub fn list_brokers(&self) -> Result<Vec<Broker>> {
        let mut ids: Vec<u32> = subdirs(&self.brokers)?
            .iter()
            .filter_map(|n| parse_id(n))
            .collect();
        ids.sort_unstable();
        let mut out = Vec::new();
        for id in ids {
            let dir = self.brokers.join(id.to_string());
            let Some((epoch, b, path)) = read_latest::<Broker>(&dir)? else {
                continue;
            };
            if b.id != id || b.epoch != epoch {
                return Err(Error::Corrupt(format!(
                    "{}: holds broker {} epoch {}",
                    path.display(),
                    b.id,
                    b.epoch
                )));
            }
            check_address(&b.address)
                .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?;
            out.push(b);
        }
        Ok(out)
    }
}
