//! A real etcd server for tests: Debian's `etcd-server` (`scripts/setup`
//! installs it), on free loopback ports with its own temporary data
//! directory. It can be stopped (killed) and restarted on the same ports
//! and data, and is killed when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Etcd {
    child: Option<Child>,
    /// The data directory and the log; removed on drop.
    dir: tempfile::TempDir,
    pub client_port: u16,
    pub peer_port: u16,
}

/// The etcd binary: `$ETCD_BIN`, else `etcd` on PATH.
fn binary() -> PathBuf {
    if let Some(b) = std::env::var_os("ETCD_BIN") {
        return PathBuf::from(b);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("etcd"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the etcd tests need an `etcd` binary on PATH (or ETCD_BIN): run scripts/setup, \
             which installs Debian's etcd-server"
        )
    })
}

/// A port that refuses connections and stays so while the returned socket
/// lives: bound, never listening, so no other test can take it.
pub fn closed_port() -> (socket2::Socket, u16) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
    socket.bind(&any.into()).expect("bind");
    let port = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.port())
        .expect("bound port");
    (socket, port)
}

/// Two different free ports: both are held while the second is picked.
fn two_free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("local addr").port();
    (port(&a), port(&b))
}

impl Etcd {
    /// Start a one-member cluster and wait until it serves. Ports are
    /// picked free but released before etcd binds them, so another test
    /// may take one meanwhile: then etcd exits and is started again on
    /// new ports.
    pub fn start() -> Etcd {
        // On tmpfs when there is one: etcd syncs its WAL on every write.
        let dir = match Path::new("/dev/shm").is_dir() {
            true => tempfile::tempdir_in("/dev/shm"),
            false => tempfile::tempdir(),
        }
        .expect("etcd temp dir");
        let (client_port, peer_port) = two_free_ports();
        let mut etcd = Etcd {
            child: None,
            dir,
            client_port,
            peer_port,
        };
        for attempt in 1.. {
            match etcd.spawn() {
                Ok(()) => break,
                Err(log) if attempt < 5 && log.contains("address already in use") => {
                    (etcd.client_port, etcd.peer_port) = two_free_ports();
                    let _ = std::fs::remove_dir_all(etcd.dir.path().join("data"));
                }
                Err(log) => panic!("etcd did not start:\n{log}"),
            }
        }
        etcd
    }

    /// `http://127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// `127.0.0.1:<client port>`, as a sandbox allow-list wants it.
    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Start the process and wait until it is healthy; `Err` with its
    /// log if it exited.
    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let err = log.try_clone().expect("etcd log file");
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(binary())
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd (run scripts/setup if it is missing): {e}"));
        self.child = Some(child);
        self.wait_healthy()
    }

    /// Poll `/health` until etcd reports itself healthy (it has a leader
    /// and serves); `Err` with its log if it exits, a panic if it takes
    /// too long.
    pub fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("etcd exited with {status}:\n{}", self.log()));
            }
            if self.healthy() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "etcd was not healthy within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One `GET /health`: true if it says `"health":"true"`.
    pub fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!(
            "GET /health HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n",
            self.client_port
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    /// Kill the server (SIGKILL, as a crash) and wait for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freeze the server (SIGSTOP): connections are taken, nothing is
    /// answered, as when its packets are dropped.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaw it (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let _ = std::process::Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status();
        }
    }

    /// Start again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(log) = self.spawn() {
            panic!("etcd did not restart:\n{log}");
        }
    }

    /// Stop, delete every key (the whole data directory) and start again
    /// empty on the same ports: a store lost, or wiped by mistake.
    #[allow(dead_code)] // not every test binary wipes its etcd
    pub fn wipe(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path().join("data"));
        if let Err(log) = self.spawn() {
            panic!("etcd did not start again empty:\n{log}");
        }
    }

    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
