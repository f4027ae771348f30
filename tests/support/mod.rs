//! Helpers for tests that run real node processes: a cluster directory
//! made by `replicator cluster init`, node processes, and CLI calls.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod etcd;
pub mod examples;
pub mod s3;
pub mod small_disk;

pub const BIN: &str = env!("CARGO_BIN_EXE_replicator");

/// Free UDP ports base..base+n and TCP ports base+50.. right now, outside
/// the kernel's ephemeral range: a node restarted on a port an outgoing
/// connection took meanwhile could not start. Each call in a process
/// starts from a different place, so tests running in parallel do not
/// pick the same range before either binds it.
pub fn free_ports(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let seed = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(call.wrapping_mul(104_729));
    replicator::ports::free_block(n, 50, seed).expect("no free ports")
}

/// The runtime tests drive a library client on: two workers, as the
/// machine has two cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

pub fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run replicator")
}

/// `cli`, for a command that must end by itself within `limit`: one that
/// does not is killed and fails the test (a node meant to refuse its
/// config would otherwise serve until the test run is killed). Its output
/// is read as it comes (a thread waits for it), so a command that prints
/// more than a pipe holds cannot block, and its exit is seen at once.
pub fn cli_within(args: &[&str], limit: std::time::Duration) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run replicator");
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            // Bounded too: should the kill have failed, the test fails
            // rather than hangs.
            let stderr = match rx.recv_timeout(std::time::Duration::from_secs(10)) {
                Ok(Ok(out)) => String::from_utf8_lossy(&out.stderr).to_string(),
                _ => format!("(no output: pid {pid} could not be killed or reaped)"),
            };
            panic!("replicator {args:?} still ran after {limit:?}; killed:\n{stderr}");
        }
    }
}

/// Waits (up to 60 s) until process `pid` has a handler for signal
/// `signal`, as its `SigCgt` mask in `/proc/PID/status` shows: a signal
/// sent before that would kill it instead of being handled.
pub fn wait_until_catches(pid: u32, signal: u32) {
    let bit = 1u64 << (signal - 1);
    let started = std::time::Instant::now();
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("process {pid}: {e}"));
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0);
        if caught & bit != 0 {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "process {pid} never caught signal {signal}: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

pub fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "replicator {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Option<Child>>,
    pub base_port: u16,
    /// Extra environment of every node process started from now on.
    pub env: Vec<(String, String)>,
}

impl Cluster {
    /// `cluster init` for `n` nodes; `edit` may change each node's TOML.
    pub fn init(n: u32, storage: &str, edit: impl Fn(String) -> String) -> Cluster {
        Cluster::init_with(n, storage, &[], edit)
    }

    /// [`Cluster::init`] with more `cluster init` arguments.
    pub fn init_with(
        n: u32,
        storage: &str,
        extra: &[&str],
        edit: impl Fn(String) -> String,
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let base_port = free_ports(n as u16);
        let n_text = n.to_string();
        let base_text = base_port.to_string();
        let metrics_text = (base_port + 50).to_string();
        let dir_text = dir.path().to_str().expect("utf-8 temp dir").to_string();
        let mut args = vec![
            "cluster",
            "init",
            "--dir",
            &dir_text,
            "--nodes",
            &n_text,
            "--base-port",
            &base_text,
            "--metrics-base-port",
            &metrics_text,
            "--storage",
            storage,
        ];
        args.extend_from_slice(extra);
        cli_ok(&args);
        for id in 1..=n {
            let p = dir.path().join(format!("node-{id}.toml"));
            let text = std::fs::read_to_string(&p).unwrap();
            std::fs::write(&p, edit(text)).unwrap();
        }
        Cluster {
            dir,
            nodes: (0..n).map(|_| None).collect(),
            base_port,
            env: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn client(&self) -> String {
        self.dir.path().join("client.toml").display().to_string()
    }

    /// A library client from the cluster's `client.toml`. Call it inside a
    /// runtime: its QUIC endpoint registers with the current one.
    pub fn library_client(&self) -> std::sync::Arc<replicator::client::Client> {
        let cfg = replicator::node::ClientConfig::load(std::path::Path::new(&self.client()))
            .expect("client.toml");
        std::sync::Arc::new(replicator::client::Client::new(&cfg).expect("client"))
    }

    pub fn start(&mut self, id: u32) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{id}.log")))
            .unwrap();
        let child = Command::new(BIN)
            .args(["node", "--config"])
            .arg(self.dir.path().join(format!("node-{id}.toml")))
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start node");
        self.nodes[(id - 1) as usize] = Some(child);
    }

    pub fn start_all(&mut self) {
        for id in 1..=self.nodes.len() as u32 {
            self.start(id);
        }
    }

    pub fn signal(&mut self, id: u32, sig: &str) {
        if let Some(c) = &self.nodes[(id - 1) as usize] {
            let _ = Command::new("kill")
                .arg(sig)
                .arg(c.id().to_string())
                .status();
        }
    }

    pub fn kill(&mut self, id: u32) {
        if let Some(mut c) = self.nodes[(id - 1) as usize].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; true if it exited successfully within 15 s.
    pub fn stop(&mut self, id: u32) -> bool {
        self.signal(id, "-TERM");
        let Some(mut c) = self.nodes[(id - 1) as usize].take() else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Until node `id`'s process exits on its own (bounded by `limit`):
    /// its exit status, or `None` if it was still running.
    pub fn wait_exit(&mut self, id: u32, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.nodes[(id - 1) as usize].as_mut()?;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.nodes[(id - 1) as usize] = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self, id: u32) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log"))).unwrap_or_default()
    }

    /// Poll the node logs until `logged` holds for them (bounded): a log
    /// line is the only sign of some steps (a hand-off given up, an error
    /// reported).
    pub fn wait_log(&self, what: &str, logged: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !logged(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; node logs:\n{}",
                    (1..=self.nodes.len() as u32)
                        .map(|i| format!("--- node {i}\n{}", self.log(i)))
                        .collect::<String>()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `status --json` once it answers with every node reachable.
    pub fn status(&self) -> serde_json::Value {
        let out = cli_ok(&["status", "--config", &self.client(), "--json"]);
        serde_json::from_str(&out).expect("status json")
    }

    /// Poll `check` on `status --json` until it holds (bounded).
    pub fn wait_status(
        &self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = cli(&["status", "--config", &self.client(), "--json"]);
            if out.status.success()
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                && check(&v)
            {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; last status: {}\n{}\nnode logs:\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    (1..=self.nodes.len() as u32)
                        .map(|i| format!("--- node {i}\n{}", self.log(i)))
                        .collect::<String>()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Until every node answers status.
    /// (A node registers with the metadata store before it serves, so an
    /// answering node is also a registered one.)
    pub fn wait_up(&self) {
        self.wait_status("all nodes up", |v| {
            v["unreachable"].as_array().is_some_and(|u| u.is_empty())
        });
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=self.nodes.len() as u32 {
            self.kill(id);
        }
        // The temp dir goes with the cluster: a failing test leaves the end
        // of each node's log in its output, so a CI failure can be read.
        if std::thread::panicking() {
            for id in 1..=self.nodes.len() as u32 {
                let log = self.log(id);
                let lines: Vec<&str> = log.lines().collect();
                let from = lines.len().saturating_sub(LOG_TAIL_LINES);
                eprintln!(
                    "--- node {id} log, last {} of {} lines",
                    lines.len() - from,
                    lines.len()
                );
                for l in &lines[from..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Lines of each node's log a failing test prints.
const LOG_TAIL_LINES: usize = 120;

/// The partition report of `topic`/`partition` in a status JSON.
pub fn partition<'a>(
    v: &'a serde_json::Value,
    topic: &str,
    p: u64,
) -> Option<&'a serde_json::Value> {
    v["partitions"]
        .as_array()?
        .iter()
        .find(|x| x["topic"] == topic && x["partition"] == p)
}

/// True when every replica's log end equals the HW and the ISR is full.
pub fn converged(v: &serde_json::Value, topic: &str, p: u64, total: u64) -> bool {
    let Some(x) = partition(v, topic, p) else {
        return false;
    };
    let hw = x["high_watermark"].as_u64();
    hw == Some(total)
        && x["isr"].as_array().map(|a| a.len()) == x["replicas"].as_array().map(|a| a.len())
        && x["replica_log_ends"]
            .as_array()
            .is_some_and(|r| r.iter().all(|e| e[1].as_u64() == Some(total)))
}

/// `consume --replica` until that replica returns at least `count`
/// committed lines (a follower learns the HW on its next fetch), bounded
/// by 30 s.
pub fn consume_replica(c: &Cluster, topic: &str, replica: u32, count: u64) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cli(&[
            "consume",
            "--config",
            &c.client(),
            "--topic",
            topic,
            "--replica",
            &replica.to_string(),
        ]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if out.status.success() && lines.len() as u64 >= count {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "replica {replica} has {} of {count} committed: {}",
            lines.len(),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The whole answer (status line, headers, body) to `GET path` from the
/// HTTP server at `addr`, such as a node's `/metrics`.
pub fn http_get(addr: impl std::net::ToSocketAddrs, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP server");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("ask");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("answer");
    out
}

/// Every file under `dir`, recursively (nothing if it does not exist).
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Random operation sequences per conformance run:
/// `REPLICATOR_PROPTEST_CASES`, else 48.
pub fn proptest_cases() -> u32 {
    std::env::var("REPLICATOR_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

/// The storage conformance suite against `plugin` opened with `config`,
/// in a scratch directory, with [`proptest_cases`] random sequences.
pub async fn run_conformance(
    plugin: replicator::plugin::StoragePlugin,
    config: &[(&str, &str)],
    persistent: bool,
) -> replicator::conformance::Report {
    use replicator::conformance::{Options, Subject};
    let config = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let scratch = tempfile::tempdir().expect("tempdir");
    let options = Options {
        proptest_cases: proptest_cases(),
        filter: None,
    };
    let subject = Subject::new(plugin, config).persistent(persistent);
    replicator::conformance::run(&subject, scratch.path(), &options, |_| {}).await
}
