//! A real S3-compatible server for tests: moto's server mode
//! (`moto_server`, PyPI `moto[server]`; `scripts/setup` installs it), on a
//! free loopback port, with SigV4 signature checking on.
//!
//! Start-up: moto is started with `INITIAL_NO_AUTH_ACTION_COUNT` set, so
//! the first requests need no credentials. Through them an IAM user with an
//! `s3:*` policy and an access key are created; then `POST
//! /moto-api/reset-auth 0` turns checking on for every later request, and
//! the bucket is created with the new key. From then on every S3 request
//! must be SigV4-signed with that key: a wrong secret gets 403
//! `SignatureDoesNotMatch`, an unknown key id 403 `InvalidAccessKeyId`.
//!
//! moto 5.2.1 recomputes the signature from werkzeug's `request.url`, an
//! IRI in which some percent-escapes are decoded (`%2F` in the query, `+`
//! `=` `:` `@` ... in the path), so correctly signed requests whose
//! canonical form contains those escapes (say `?prefix=a%2F`) are refused.
//! The server is therefore started with a `sitecustomize` on its
//! `PYTHONPATH` that makes the check use the request URI exactly as
//! received (werkzeug's `RAW_URI`), which is what the client signed; start
//! checks that it took effect.
//!
//! moto keeps everything in memory: a killed server loses all objects and
//! the IAM key, so there is no `restart`. "The server goes away and comes
//! back" is [`Moto::pause`] / [`Moto::resume`] (SIGSTOP / SIGCONT): while
//! paused, connections are accepted by the kernel but nothing is answered,
//! so requests time out; after resuming, everything is still there.
//!
//! The inspection helpers ([`Moto::list_keys`], [`Moto::get`], ...) use
//! independent tooling: boto3 in a python3 subprocess, signed with the
//! same IAM key, path-style addressing.
//!
//! Each `Moto` has its own port, temporary directory and server process,
//! so tests may run in parallel.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a start may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Connect and read timeout of the inspection helpers.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// Requests moto serves without credentials before setup turns checking
/// on (setup needs three; any number above that works).
const NO_AUTH_ACTIONS: &str = "100";

const BUCKET: &str = "replicator-test";
const REGION: &str = "us-east-1";

/// Where `scripts/setup` puts moto when it is not on PATH.
const VENV_BIN: &str = ".cache/replicator-venv/bin";

/// Loaded by moto's Python at start (it is on `PYTHONPATH`): the SigV4
/// check uses the raw request URI instead of werkzeug's IRI-decoded URL.
const SITECUSTOMIZE: &str = r#"
# Written by Replicator's tests/support/s3.rs: moto's SigV4 check
# recomputes the canonical request from werkzeug's IRI-decoded
# request.url; use the request URI as received instead.
import sys

def _apply():
    from moto.core import responses
    from moto.core.authorization import ActionAuthenticatorMixin

    setup_class = responses.BaseResponse.setup_class

    def patched_setup_class(self, request, full_url, headers, *args, **kwargs):
        setup_class(self, request, full_url, headers, *args, **kwargs)
        environ = getattr(request, "environ", None) or {}
        self._replicator_raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")

    responses.BaseResponse.setup_class = patched_setup_class

    check = ActionAuthenticatorMixin._authenticate_and_authorize_action

    def patched_check(self, *args, **kwargs):
        raw = getattr(self, "_replicator_raw_uri", None)
        if not raw:
            return check(self, *args, **kwargs)
        uri = self.uri
        self.uri = raw
        try:
            return check(self, *args, **kwargs)
        finally:
            self.uri = uri

    ActionAuthenticatorMixin._authenticate_and_authorize_action = patched_check

try:
    _apply()
    print("replicator: moto signature check patched to use the raw request URI", file=sys.stderr)
except Exception as e:
    print(f"replicator: could not patch moto's signature check: {e!r}", file=sys.stderr)
"#;

/// The inspection helper, one long-running `python3 helper.py` per server
/// (importing boto3 takes most of a second). Requests on stdin: a JSON
/// line `{"op", "args", "timeout", "body"}` and then `body` bytes. Answers
/// on stdout: a JSON line `{"status": "ok", "len"}` and then `len` bytes,
/// or `{"status": "error", "error": {status, code, message}}` (an S3 error;
/// status 0 for a timeout or refused connection), or `{"status": "fatal",
/// "message"}`.
const HELPER: &str = r#"
import json, sys, traceback, urllib.request

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

state = {}
clients = {}


def client(service, key_id, secret, timeout):
    k = (service, key_id, secret, timeout)
    if k not in clients:
        config = Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},
            connect_timeout=timeout,
            read_timeout=timeout,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        clients[k] = boto3.client(
            service,
            endpoint_url=state["endpoint"],
            region_name=state["region"],
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=config,
        )
    return clients[k]


def s3(timeout, secret=None):
    return client("s3", state["key_id"], secret or state["secret"], timeout)


def setup(timeout, endpoint, bucket, region):
    state.update(endpoint=endpoint, bucket=bucket, region=region)
    iam = client("iam", "bootstrap", "bootstrap", timeout)
    user = "replicator-test"
    iam.create_user(UserName=user)
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName=user, PolicyName="s3-all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    # From here on every request must be signed with a known key.
    request = urllib.request.Request(
        endpoint + "/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request, timeout=timeout).read()
    state.update(key_id=key["AccessKeyId"], secret=key["SecretAccessKey"])
    s3(timeout).create_bucket(Bucket=bucket)
    # Checking is on: an unknown key is refused.
    try:
        client("s3", "AKIAUNKNOWNUNKNOWN00", "x", timeout).list_objects_v2(Bucket=bucket)
        raise SystemExit("moto accepted an unknown access key: signature checking is off")
    except ClientError as e:
        if e.response["Error"]["Code"] != "InvalidAccessKeyId":
            raise
    # The sitecustomize fix took effect: `%2F` in a signed query.
    try:
        s3(timeout).list_objects_v2(Bucket=bucket, Prefix="self-check/")
    except ClientError as e:
        raise SystemExit(
            "moto refused a correctly signed listing with a '/' in its prefix "
            f"({e.response['Error']['Code']}): the signature-check fix did not load"
        )
    return json.dumps({"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}).encode()


def run(op, args, timeout, body):
    if op == "setup":
        return setup(timeout, *args)
    bucket = state["bucket"]
    if op == "list":
        prefix, start_after, page_size = args[0], args[1], int(args[2])
        pages = s3(timeout).get_paginator("list_objects_v2").paginate(
            Bucket=bucket,
            Prefix=prefix,
            StartAfter=start_after,
            PaginationConfig={"PageSize": page_size},
        )
        keys = [[o["Key"], o["Size"]] for page in pages for o in page.get("Contents", [])]
        return json.dumps(keys).encode()
    if op == "get":
        return s3(timeout).get_object(Bucket=bucket, Key=args[0])["Body"].read()
    if op == "put":
        s3(timeout).put_object(Bucket=bucket, Key=args[0], Body=body)
        return b""
    if op == "put-if-absent":
        s3(timeout).put_object(Bucket=bucket, Key=args[0], Body=body, IfNoneMatch="*")
        return b""
    if op == "delete":
        s3(timeout).delete_object(Bucket=bucket, Key=args[0])
        return b""
    if op == "wrong-secret":
        s3(timeout, secret="wrong" + state["secret"][5:]).list_objects_v2(Bucket=bucket)
        return b""
    raise SystemExit(f"unknown op {op}")


def answer(head, body=b""):
    sys.stdout.buffer.write(json.dumps(head).encode() + b"\n" + body)
    sys.stdout.buffer.flush()


while True:
    line = sys.stdin.buffer.readline()
    if not line:
        break
    request = json.loads(line)
    body = sys.stdin.buffer.read(request["body"])
    try:
        out = run(request["op"], request["args"], request["timeout"], body)
        answer({"status": "ok", "len": len(out)}, out)
    except ClientError as e:
        error = e.response.get("Error", {})
        answer({"status": "error", "error": {
            "status": e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0),
            "code": error.get("Code", ""),
            "message": error.get("Message", ""),
        }})
    except BotoCoreError as e:
        answer({"status": "error", "error": {"status": 0, "code": type(e).__name__, "message": str(e)}})
    except BaseException:
        answer({"status": "fatal", "message": traceback.format_exc()})
"#;

/// An error answer of S3 (or, with `status` 0, a transport failure such as
/// a timeout: `code` is then the exception's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Error {
    pub status: u16,
    pub code: String,
    pub message: String,
}

pub struct Moto {
    child: Option<Child>,
    /// The logs, the Python fix and the helper script; removed on drop.
    dir: tempfile::TempDir,
    helper: Mutex<Helper>,
    port: u16,
    access_key_id: String,
    secret_access_key: String,
}

/// The running helper process and its pipes.
struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// The moto server: `$MOTO_SERVER_BIN`, else `moto_server` on PATH, else
/// the one `scripts/setup` installs in `~/.cache/replicator-venv`.
fn binary() -> PathBuf {
    if let Some(b) = std::env::var_os("MOTO_SERVER_BIN") {
        return PathBuf::from(b);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("moto_server"))
            .find(|p| p.is_file())
    });
    let in_venv = || {
        std::env::var_os("HOME")
            .map(|h| Path::new(&h).join(VENV_BIN).join("moto_server"))
            .filter(|p| p.is_file())
    };
    on_path.or_else(in_venv).unwrap_or_else(|| {
        panic!(
            "the S3 tests need moto's S3-compatible server: no `moto_server` in MOTO_SERVER_BIN, \
             on PATH or in ~/{VENV_BIN}; run scripts/setup, which installs moto[server]"
        )
    })
}

/// The Python with boto3 that goes with `moto_server`: the `python3` next
/// to it (a venv's, pyenv's shims), else `python3` on PATH.
fn python_for(moto: &Path) -> PathBuf {
    let real = std::fs::canonicalize(moto).unwrap_or_else(|_| moto.to_path_buf());
    [moto, real.as_path()]
        .iter()
        .filter_map(|p| p.parent())
        .map(|d| d.join("python3"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// A TCP port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

impl Moto {
    /// Start moto on a free port, wait until it serves, create the IAM
    /// user, its access key and the bucket, and turn signature checking
    /// on. The port is picked free but released before moto binds it, so
    /// another test may take it meanwhile: then moto exits and is started
    /// again on a new port.
    pub fn start() -> Moto {
        let bin = binary();
        let dir = tempfile::tempdir().expect("moto temp dir");
        std::fs::create_dir(dir.path().join("python")).expect("moto python dir");
        std::fs::write(
            dir.path().join("python").join("sitecustomize.py"),
            SITECUSTOMIZE,
        )
        .expect("write sitecustomize.py");
        std::fs::write(dir.path().join("helper.py"), HELPER).expect("write helper.py");
        // The helper imports boto3 while the server starts.
        let helper = Helper::spawn(&python_for(&bin), dir.path());
        let mut moto = Moto {
            child: None,
            dir,
            helper: Mutex::new(helper),
            port: free_port(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
        };
        for attempt in 1.. {
            match moto.spawn(&bin) {
                Ok(()) => break,
                Err(log) if attempt < 5 && log.contains("Address already in use") => {
                    moto.port = free_port();
                }
                Err(log) => panic!("moto_server did not start:\n{log}"),
            }
        }
        let endpoint = moto.endpoint();
        let out = moto
            .helper("setup", &[&endpoint, BUCKET, REGION], None, HELPER_TIMEOUT)
            .unwrap_or_else(|e| panic!("moto setup failed: {e:?}\n{}", moto.log()));
        let creds: serde_json::Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "moto setup printed no credentials ({e}): {}",
                String::from_utf8_lossy(&out)
            )
        });
        let field = |name: &str| {
            creds[name]
                .as_str()
                .unwrap_or_else(|| panic!("moto setup output lacks {name}: {creds}"))
                .to_string()
        };
        moto.access_key_id = field("access_key_id");
        moto.secret_access_key = field("secret_access_key");
        moto
    }

    /// `http://127.0.0.1:<port>`; the bucket is addressed path-style
    /// (`<endpoint>/<bucket>/<key>`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<port>`, as a sandbox allow-list wants it.
    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn region(&self) -> &str {
        REGION
    }

    /// The IAM access key with `s3:*` on everything.
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("moto.log")
    }

    /// Start the process and wait until it answers; `Err` with its log if
    /// it exited.
    fn spawn(&mut self, bin: &Path) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("moto log file");
        let err = log.try_clone().expect("moto log file");
        let mut python_path = OsString::from(self.dir.path().join("python"));
        if let Some(old) = std::env::var_os("PYTHONPATH").filter(|p| !p.is_empty()) {
            python_path.push(":");
            python_path.push(old);
        }
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", NO_AUTH_ACTIONS)
            .env("PYTHONPATH", python_path)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {} (run scripts/setup if moto is missing): {e}",
                    bin.display()
                )
            });
        self.child = Some(child);
        self.wait_ready()
    }

    /// Poll `GET /moto-api/data.json` (moto's own API; it needs no
    /// credentials and does not count as an S3 action) until it answers
    /// 200; `Err` with the log if the process exits, a panic if it takes
    /// too long.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("moto_server exited with {status}:\n{}", self.log()));
            }
            if self.api_answers(Duration::from_secs(2)) {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One `GET /moto-api/data.json` (no credentials needed): true if it
    /// answers 200 within `timeout`.
    pub fn api_answers(&self, timeout: Duration) -> bool {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(timeout));
        let _ = s.set_write_timeout(Some(timeout));
        let req = format!(
            "GET /moto-api/data.json HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n",
            self.port
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut head = [0u8; 12];
        s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            let rc = unsafe { libc::kill(pid, signal) };
            assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
        }
    }

    /// SIGSTOP the server: it keeps its port and data but answers nothing
    /// (connections are accepted by the kernel and then hang), as a server
    /// that has gone away.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Moto::pause`]: it serves again, with all its data.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Kill the server (SIGKILL, as a crash) and wait for it to be gone.
    /// Its data is lost with it (moto keeps everything in memory), so the
    /// helpers fail afterwards.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of the server's log (it logs every request).
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// One helper request: `Ok(bytes)`, `Err` for an S3 error or a
    /// transport failure; a panic if the helper itself fails.
    fn helper(
        &self,
        op: &str,
        args: &[&str],
        input: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<u8>, S3Error> {
        let mut helper = self.helper.lock().unwrap_or_else(|e| e.into_inner());
        match helper.call(op, args, input.unwrap_or_default(), timeout) {
            Ok(answer) => answer,
            Err(why) => {
                let stderr =
                    std::fs::read_to_string(self.dir.path().join("helper.log")).unwrap_or_default();
                panic!(
                    "moto helper {op} {args:?} failed: {why}\nhelper stderr:\n{stderr}\n\
                     server log:\n{}",
                    self.log()
                )
            }
        }
    }

    fn expect_ok(&self, what: &str, r: Result<Vec<u8>, S3Error>) -> Vec<u8> {
        r.unwrap_or_else(|e| panic!("moto helper: {what}: {e:?}\nserver log:\n{}", self.log()))
    }

    /// Every object under `prefix` as (key, size), in key order (all
    /// pages of ListObjectsV2).
    pub fn list_keys(&self, prefix: &str) -> Vec<(String, u64)> {
        self.list_keys_from(prefix, "", 1000)
    }

    /// [`Moto::list_keys`] after `start_after`, fetched `page_size` keys
    /// per ListObjectsV2 call (so continuation tokens are used).
    pub fn list_keys_from(
        &self,
        prefix: &str,
        start_after: &str,
        page_size: u32,
    ) -> Vec<(String, u64)> {
        let page = page_size.to_string();
        let out = self.expect_ok(
            &format!("list {prefix:?}"),
            self.helper("list", &[prefix, start_after, &page], None, HELPER_TIMEOUT),
        );
        let keys: Vec<(String, u64)> = serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "moto helper list printed no key list ({e}): {}",
                String::from_utf8_lossy(&out)
            )
        });
        keys
    }

    /// The object's bytes; `Err` e.g. 404 `NoSuchKey`.
    pub fn try_get(&self, key: &str) -> Result<Vec<u8>, S3Error> {
        self.helper("get", &[key], None, HELPER_TIMEOUT)
    }

    /// The object's bytes; panics if it cannot be read.
    pub fn get(&self, key: &str) -> Vec<u8> {
        self.expect_ok(&format!("get {key:?}"), self.try_get(key))
    }

    /// Write (or overwrite) an object.
    pub fn put(&self, key: &str, bytes: &[u8]) {
        self.expect_ok(
            &format!("put {key:?}"),
            self.helper("put", &[key], Some(bytes), HELPER_TIMEOUT),
        );
    }

    /// PutObject with `If-None-Match: *`; `Err` 412 `PreconditionFailed`
    /// if the key exists.
    pub fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<(), S3Error> {
        self.helper("put-if-absent", &[key], Some(bytes), HELPER_TIMEOUT)
            .map(|_| ())
    }

    /// Delete an object (deleting a missing key succeeds, as in S3).
    pub fn delete(&self, key: &str) {
        self.expect_ok(
            &format!("delete {key:?}"),
            self.helper("delete", &[key], None, HELPER_TIMEOUT),
        );
    }

    /// A ListObjectsV2 signed with the right access key id and a wrong
    /// secret: the error it gets (403 `SignatureDoesNotMatch`). Panics if
    /// moto accepts it.
    pub fn request_with_wrong_secret(&self) -> S3Error {
        match self.helper("wrong-secret", &[], None, HELPER_TIMEOUT) {
            Ok(_) => panic!("moto accepted a request signed with a wrong secret"),
            Err(e) => e,
        }
    }

    /// True if a signed ListObjectsV2 succeeds within `timeout` (false
    /// while paused or stopped).
    pub fn responds_within(&self, timeout: Duration) -> bool {
        let page = "1".to_string();
        self.helper("list", &["", "", &page], None, timeout).is_ok()
    }
}

impl Helper {
    fn spawn(python: &Path, dir: &Path) -> Helper {
        let none = dir.join("no-aws-config");
        let log = std::fs::File::create(dir.join("helper.log")).expect("helper log file");
        let mut cmd = Command::new(python);
        cmd.arg(dir.join("helper.py"))
            // Nothing from the user's AWS setup or proxies applies.
            .env("AWS_CONFIG_FILE", &none)
            .env("AWS_SHARED_CREDENTIALS_FILE", &none)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        for var in [
            "AWS_PROFILE",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "AWS_ENDPOINT_URL_IAM",
            "AWS_CA_BUNDLE",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "running {} for the moto helper (run scripts/setup): {e}",
                python.display()
            )
        });
        let stdin = child.stdin.take().expect("helper stdin");
        let stdout = BufReader::new(child.stdout.take().expect("helper stdout"));
        Helper {
            child,
            stdin,
            stdout,
        }
    }

    /// Send one request and read its answer; `Err` if the helper broke.
    fn call(
        &mut self,
        op: &str,
        args: &[&str],
        body: &[u8],
        timeout: Duration,
    ) -> Result<Result<Vec<u8>, S3Error>, String> {
        let request = serde_json::json!({
            "op": op,
            "args": args,
            "timeout": timeout.as_secs_f64(),
            "body": body.len(),
        });
        let mut message = request.to_string().into_bytes();
        message.push(b'\n');
        message.extend_from_slice(body);
        self.stdin
            .write_all(&message)
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("writing to it: {e}"))?;
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => return Err("it exited".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading from it: {e}")),
        }
        let head: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("bad answer {line:?}: {e}"))?;
        match head["status"].as_str() {
            Some("ok") => {
                let len = head["len"]
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| format!("bad answer {line:?}"))?;
                let mut out = vec![0; len];
                self.stdout
                    .read_exact(&mut out)
                    .map_err(|e| format!("reading from it: {e}"))?;
                Ok(Ok(out))
            }
            Some("error") => {
                let e = &head["error"];
                Ok(Err(S3Error {
                    status: e["status"]
                        .as_u64()
                        .and_then(|s| u16::try_from(s).ok())
                        .unwrap_or(0),
                    code: e["code"].as_str().unwrap_or_default().to_string(),
                    message: e["message"].as_str().unwrap_or_default().to_string(),
                }))
            }
            _ => Err(head["message"]
                .as_str()
                .map_or_else(|| format!("bad answer {line:?}"), str::to_string)),
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}
