//! Node processes for the commands that run a whole cluster on this
//! machine (`demo`, `bench`): start, kill, restart and stop them, find
//! free ports, wait until they registered, and read their CPU time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use replicator::client::Client;

/// Start `replicator node` for node `id`, logging to `node-<id>.log`
/// (appended to on a restart).
fn spawn_node(dir: &Path, id: u32, append: bool) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("locating the replicator binary")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(log_path(dir, id))?;
    Command::new(&exe)
        .arg("node")
        .arg("--config")
        .arg(dir.join(format!("node-{id}.toml")))
        .arg("--worker-threads")
        .arg(worker_threads().to_string())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting node {id}"))
}

/// Where node `id` of the cluster in `dir` logs (its stderr).
fn log_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("node-{id}.log"))
}

/// Worker threads for each node when all of them share this machine: a
/// share of the cores (at least one), so the nodes do not each run a
/// thread per core and hand work between more threads than there are
/// cores. `bench` gives its own runtime (the producers, the raw-quinn
/// sender) and the raw-quinn sink as many.
pub(crate) fn worker_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 3).max(1)
}

/// Three node processes; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Nodes {
    children: Vec<(u32, Child)>,
    /// Where their configs and logs are.
    dir: PathBuf,
}

/// Lines of a node's log quoted in an error about it.
const LOG_TAIL_LINES: usize = 8;

impl Nodes {
    pub fn start(dir: &Path, count: u32) -> anyhow::Result<Nodes> {
        let mut children = Vec::new();
        for id in 1..=count {
            children.push((id, spawn_node(dir, id, false)?));
        }
        Ok(Nodes {
            children,
            dir: dir.to_path_buf(),
        })
    }

    /// What node `id`'s log says went wrong, for an error about it: its
    /// last error and warning lines, or its last lines if it has none.
    /// Quoted, because the directory holding the log may be a temporary
    /// one that is gone by the time anyone reads the error.
    pub fn log_tail(&self, id: u32) -> String {
        let path = log_path(&self.dir, id);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                // A panic first (what went wrong), then the usual tail
                // (what may explain it).
                let panic = first_panic(&text)
                    .map(|p| format!("a panic in {}:\n  {p}\n", path.display()))
                    .unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let bad: Vec<&str> = lines
                    .iter()
                    .copied()
                    .filter(|l| {
                        let l = l.to_ascii_lowercase();
                        l.contains("error") || l.contains("warn")
                    })
                    .collect();
                let (what, pick) = if bad.is_empty() {
                    ("the end of", lines)
                } else {
                    ("errors and warnings in", bad)
                };
                let tail = &pick[pick.len().saturating_sub(LOG_TAIL_LINES)..];
                format!(
                    "{panic}{what} {}:\n  {}",
                    path.display(),
                    if tail.is_empty() {
                        "(empty)".to_string()
                    } else {
                        tail.join("\n  ")
                    }
                )
            }
            Err(e) => format!("cannot read {}: {e}", path.display()),
        }
    }

    /// [`Nodes::log_tail`] of every running node, one after the other.
    pub fn log_tails(&self) -> String {
        let tails: Vec<String> = self
            .children
            .iter()
            .map(|(id, _)| self.log_tail(*id))
            .collect();
        tails.join("\n")
    }

    /// SIGKILL node `id` (no shutdown, no flush: a crash).
    pub fn kill(&mut self, id: u32) {
        if let Some(pos) = self.children.iter().position(|(i, _)| *i == id) {
            let (_, mut c) = self.children.remove(pos);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM node `id` (a graceful stop, with controlled shutdown) and
    /// return at once; [`Nodes::wait_stopped`] waits for it to exit.
    pub fn terminate(&self, id: u32) {
        if let Some((_, c)) = self.children.iter().find(|(i, _)| *i == id) {
            sigterm(c);
        }
    }

    /// Wait up to 10 s for node `id` to exit (SIGKILL after that) and
    /// forget it; whether it exited successfully without a panic.
    pub fn wait_stopped(&mut self, id: u32) -> bool {
        let Some(pos) = self.children.iter().position(|(i, _)| *i == id) else {
            return false;
        };
        let (_, mut c) = self.children.remove(pos);
        exited_within_10_s(&mut c) && !self.panicked(id)
    }

    /// SIGKILL node `id` if it runs, then start it again on its config,
    /// appending to its log.
    pub fn restart(&mut self, id: u32) -> anyhow::Result<()> {
        self.kill(id);
        self.children.push((id, spawn_node(&self.dir, id, true)?));
        Ok(())
    }

    /// The cluster directory: configs, data and `node-N.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// CPU seconds (user + system) each running node has used so far, in
    /// node order.
    pub fn cpu_seconds(&self) -> anyhow::Result<Vec<f64>> {
        self.children
            .iter()
            .map(|(id, c)| cpu_seconds(c.id()).with_context(|| format!("CPU time of node {id}")))
            .collect()
    }

    /// Any node that already exited: (id, status).
    pub fn exited(&mut self) -> Option<(u32, std::process::ExitStatus)> {
        self.children
            .iter_mut()
            .find_map(|(id, c)| c.try_wait().ok().flatten().map(|s| (*id, s)))
    }

    /// Whether node `id`'s log reports a panic.
    fn panicked(&self, id: u32) -> bool {
        std::fs::read(log_path(&self.dir, id))
            .is_ok_and(|b| first_panic(&String::from_utf8_lossy(&b)).is_some())
    }

    /// SIGTERM everyone, wait up to 10 s each, then SIGKILL. A node is
    /// clean if it exited successfully and its log reports no panic: a
    /// panic in a task, or while the runtime shuts down, leaves the exit
    /// status at 0.
    pub fn stop(&mut self) -> Vec<(u32, bool)> {
        for (_, c) in &self.children {
            sigterm(c);
        }
        let mut clean = Vec::new();
        for (id, c) in &mut self.children {
            clean.push((*id, exited_within_10_s(c)));
        }
        for (id, ok) in &mut clean {
            *ok = *ok && !self.panicked(*id);
        }
        self.children.clear();
        clean
    }
}

/// Ask `c` to stop gracefully (SIGTERM); std's `Child::kill` only sends
/// SIGKILL.
fn sigterm(c: &Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(c.id().to_string())
        .status();
}

/// Wait up to 10 s for `c` to exit, SIGKILL it after that; whether it
/// exited successfully by itself.
fn exited_within_10_s(c: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.try_wait() {
            Ok(Some(s)) => return s.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `cluster init` in `dir` for three nodes on 127.0.0.1 with `storage`
/// and its `storage_config` settings, file metadata, min.insync 2 and
/// `retention_mb` (`None` keeps everything), on ports free right now.
/// Returns the client config's path and the UDP and metrics base ports.
/// Callers check the storage plugin first (`cluster::check_storage`), once.
pub fn init_local_cluster(
    dir: &Path,
    storage: &str,
    storage_config: &[(String, String)],
    retention_mb: Option<u64>,
) -> anyhow::Result<(PathBuf, u16, u16)> {
    let (base_port, metrics_port) = free_ports(3)?;
    let args = super::cluster::InitArgs {
        dir: dir.to_path_buf(),
        nodes: 3,
        base_port,
        metrics_base_port: metrics_port,
        host: "127.0.0.1".parse()?,
        storage: storage.to_string(),
        metadata: "file".into(),
        metadata_endpoint: Vec::new(),
        metadata_config: Vec::new(),
        min_insync: Some(2),
        retention_mb,
        storage_config: storage_config.to_vec(),
        ca_key_out: None,
    };
    let (client, _) = super::cluster::init(&args)?;
    Ok((client, base_port, metrics_port))
}

/// A UDP and a TCP port range of `n` ports each that are free right now
/// and outside the kernel's ephemeral range (see `replicator::ports`): the
/// demo and the bench restart killed nodes on the same ports.
fn free_ports(n: u16) -> anyhow::Result<(u16, u16)> {
    match replicator::ports::free_block(n, 50, std::process::id()) {
        Some(base) => Ok((base, base + 50)),
        None => bail!("no free ports on 127.0.0.1 outside the ephemeral port range"),
    }
}

pub async fn wait_for_cluster(c: &Client, nodes: &mut Nodes, want: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((id, s)) = nodes.exited() {
            bail!(
                "node {id} exited during startup ({s}); {}",
                nodes.log_tail(id)
            );
        }
        if let Ok((brokers, _)) = c.metadata().await
            && brokers.len() >= want
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the nodes did not all register within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// User plus system CPU seconds process `pid` has used, from
/// `/proc/<pid>/stat` (fields 14 and 15, in clock ticks).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields from the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no ')' in /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field N is at index N - 3.
    let ticks = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .context("short /proc/PID/stat")?
            .parse::<u64>()
            .context("non-numeric CPU time in /proc/PID/stat")
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok((ticks(14)? + ticks(15)?) as f64 / hz)
}

/// The machine's CPU time so far from `/proc/stat`, in clock ticks. Its
/// growth over a measurement says how much of the machine sat idle and how
/// much the benchmark did not get.
pub fn machine_ticks() -> anyhow::Result<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    // user nice system idle iowait irq softirq steal [guest guest_nice],
    // where guest time is already counted in user.
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse::<u64>().context("non-numeric /proc/stat field"))
        .collect::<anyhow::Result<_>>()?;
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    Ok(MachineTicks {
        idle: field(3) + field(4),
        steal: field(7),
        all: fields.iter().sum(),
    })
}

/// The machine's CPU time so far, in clock ticks, from `/proc/stat`.
#[derive(Debug, Clone, Copy)]
pub struct MachineTicks {
    /// Idle, including waiting for I/O: no thread wanted the CPU.
    pub idle: u64,
    /// Taken by the hypervisor for other guests.
    pub steal: u64,
    pub all: u64,
}

impl MachineTicks {
    /// Idle and steal as percentages of the time from `before` to `self`.
    pub fn idle_and_steal_pct_since(&self, before: &MachineTicks) -> (f64, f64) {
        let all = self.all.saturating_sub(before.all);
        if all == 0 {
            return (0.0, 0.0);
        }
        let pct = |now: u64, then: u64| now.saturating_sub(then) as f64 * 100.0 / all as f64;
        (pct(self.idle, before.idle), pct(self.steal, before.steal))
    }
}

/// The first panic a node's log reports: Rust's "thread '...' (id) panicked at
/// FILE:LINE:COL:" line and the message line after it.
fn first_panic(log: &str) -> Option<String> {
    let mut lines = log.lines();
    let at = lines.find(|l| l.starts_with("thread '") && l.contains(" panicked at "))?;
    Some(match lines.next() {
        Some(message) => format!("{at}\n  {message}"),
        None => at.to_string(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_is_found_with_its_message_and_only_a_panic() {
        let log = "INFO node 1 stopped\n\nthread 'tokio-rt-worker' (7353) panicked at src/runtime.rs:81:45:\nchild task panicked: JoinError::Cancelled(Id(8895))\nstack backtrace:\n";
        assert_eq!(
            super::first_panic(log).as_deref(),
            Some(
                "thread 'tokio-rt-worker' (7353) panicked at src/runtime.rs:81:45:\n  child task panicked: JoinError::Cancelled(Id(8895))"
            )
        );
        // A log line that merely mentions a panic is not one.
        let quiet =
            "WARN closing the log trapped: the guest panicked at guest.rs:1\nINFO node 1 stopped\n";
        assert_eq!(super::first_panic(quiet), None);
    }

    #[test]
    fn own_cpu_time_grows_with_work() {
        let me = std::process::id();
        let before = super::cpu_seconds(me).expect("own stat");
        // Spin until the kernel has counted 0.1 s of it: on a loaded
        // machine that takes longer than 0.1 s of wall time.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after - before < 0.1 && started.elapsed() < std::time::Duration::from_secs(30) {
            for _ in 0..1_000_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            after = super::cpu_seconds(me).expect("own stat");
        }
        std::hint::black_box(x);
        assert!(after - before >= 0.1, "{before} -> {after}");
        let t = super::machine_ticks().expect("/proc/stat");
        assert!(t.steal + t.idle <= t.all && t.all > 0, "{t:?}");
    }

    #[test]
    fn idle_and_steal_are_shares_of_the_window_not_of_all_time() {
        use super::MachineTicks;
        let before = MachineTicks {
            idle: 900,
            steal: 50,
            all: 1000,
        };
        let after = MachineTicks {
            idle: 930,
            steal: 60,
            all: 1200,
        };
        assert_eq!(after.idle_and_steal_pct_since(&before), (15.0, 5.0));
        // No time passed (or counters went backwards): no share at all.
        assert_eq!(before.idle_and_steal_pct_since(&after), (0.0, 0.0));
    }
}
