//! A small client for etcd v3's JSON gateway (grpc-gateway): range, and a
//! transaction that puts a key if its create or mod revision is as
//! expected. Owns endpoint fail-over and the decoding of what etcd sends:
//! keys and values are base64, int64 fields are JSON strings, and fields
//! holding their default value (0, false, empty) are left out.

use std::cell::Cell;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::json;

use crate::http::{self, Failure};

/// gRPC status codes that mean "try again later".
const GRPC_UNAVAILABLE: i64 = 14;
const GRPC_DEADLINE_EXCEEDED: i64 = 4;
const GRPC_ABORTED: i64 = 10;
const GRPC_RESOURCE_EXHAUSTED: i64 = 8;

#[derive(Debug)]
pub enum Error {
    /// No endpoint answered, or etcd said it cannot serve now.
    Unavailable(String),
    /// Every endpoint was refused by the host's allow-list.
    Denied(String),
    /// etcd answered with an error that retrying will not fix.
    Etcd(String),
    /// etcd's answer could not be decoded.
    Malformed(String),
    /// The configured endpoints are members of different etcd clusters.
    Endpoints(String),
}

/// One key-value as etcd reports it.
#[derive(Debug)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// The condition of a conditional put.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// The key must not exist (create revision 0).
    Absent,
    /// The key's last modification must be this revision.
    ModRevision(i64),
}

pub struct Gateway {
    /// `host:port` of each endpoint, in the configured order.
    endpoints: Vec<String>,
    timeout: Duration,
    /// The endpoint that answered last: tried first, so a dead first
    /// endpoint does not cost every call a failed connect.
    preferred: Cell<usize>,
    /// The etcd cluster the answers came from (its `header.cluster_id`),
    /// and the endpoint that last answered for it. An endpoint of another
    /// cluster (a typo, a second etcd for something else) would hold
    /// other records: a node that moved there would lead from a store the
    /// rest of the cluster does not read.
    cluster: Cell<Option<(usize, u64)>>,
}

/// The cluster id of the etcd at `authority`, from its status; `None` if
/// it did not answer with one.
fn status_cluster(authority: &str, timeout: Duration) -> Result<Option<u64>, Failure> {
    let r = http::post(authority, "/v3/maintenance/status", b"{}", timeout)?;
    match check_answer(authority, &r) {
        Ok(()) => Ok(cluster_id(&r.body)),
        Err(
            Error::Unavailable(m)
            | Error::Etcd(m)
            | Error::Malformed(m)
            | Error::Denied(m)
            | Error::Endpoints(m),
        ) => Err(Failure::NotSent(m)),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Header {
    cluster_id: Option<Int<u64>>,
}

/// Any answer's `header`, the part this client reads.
#[derive(Deserialize, Default)]
#[serde(default)]
struct WithHeader {
    header: Header,
}

/// The cluster id in an answer's header, if it has one.
fn cluster_id(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<WithHeader>(body)
        .ok()?
        .header
        .cluster_id
        .map(|c| c.0)
}

/// An int64 or uint64 as the gateway spells it: a JSON string, or a
/// number.
#[derive(Debug, Default, Clone, Copy)]
struct Int<T>(T);

impl<'de, T: Deserialize<'de> + std::str::FromStr> Deserialize<'de> for Int<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw<T> {
            S(String),
            N(T),
        }
        match Raw::<T>::deserialize(d)? {
            Raw::N(n) => Ok(Int(n)),
            Raw::S(s) => s.parse().map(Int).map_err(|_| {
                serde::de::Error::custom(format!("`{s}` is not an {}", std::any::type_name::<T>()))
            }),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawKv {
    key: String,
    value: String,
    mod_revision: Int<i64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RangeResponse {
    kvs: Vec<RawKv>,
    more: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TxnResponse {
    succeeded: bool,
}

/// The gateway's error body (grpc-gateway v1): `{"error", "message", "code"}`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct ErrorBody {
    error: Option<String>,
    message: Option<String>,
    code: Option<i64>,
}

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

pub fn unb64(what: &str, s: &str) -> Result<Vec<u8>, Error> {
    B64.decode(s)
        .map_err(|e| Error::Malformed(format!("{what} is not base64: {e}")))
}

/// The smallest key greater than every key starting with `prefix`: the
/// prefix with its last byte that is not 0xff incremented (etcd's
/// `clientv3.GetPrefixRangeEnd`). "\0" (every key) if there is none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// What the endpoint said, as an error unless it is a 2xx with no error
/// body.
fn check_answer(authority: &str, r: &http::Response) -> Result<(), Error> {
    let err: Option<ErrorBody> = serde_json::from_slice(&r.body).ok();
    let (code, msg) = match &err {
        Some(e) if e.code.is_some() || e.error.is_some() => (
            e.code,
            e.message
                .clone()
                .or_else(|| e.error.clone())
                .unwrap_or_default(),
        ),
        _ => (None, String::new()),
    };
    let ok_status = (200..300).contains(&r.status);
    if ok_status && code.is_none() {
        return Ok(());
    }
    let detail = if msg.is_empty() {
        let text = String::from_utf8_lossy(&r.body);
        let text: String = text.chars().take(200).collect();
        format!("{authority}: HTTP {}: {text}", r.status)
    } else {
        format!(
            "{authority}: HTTP {}: {msg} (gRPC code {})",
            r.status,
            code.unwrap_or(-1)
        )
    };
    let retryable = r.status >= 500
        || matches!(
            code,
            Some(
                GRPC_UNAVAILABLE | GRPC_DEADLINE_EXCEEDED | GRPC_ABORTED | GRPC_RESOURCE_EXHAUSTED
            )
        );
    Err(if retryable {
        Error::Unavailable(detail)
    } else {
        Error::Etcd(detail)
    })
}

impl Gateway {
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Self {
        Gateway {
            endpoints,
            timeout,
            preferred: Cell::new(0),
            cluster: Cell::new(None),
        }
    }

    /// Why the endpoint at `at` must not be used, if it is a member of
    /// another etcd cluster than the one the answers came from so far.
    /// Asked (an idempotent status call) only of an endpoint other than
    /// the one that last answered, before a request goes there: a
    /// transaction it applied could not be taken back.
    fn other_cluster(&self, at: usize, authority: &str) -> Result<Option<String>, Failure> {
        let Some((known_at, known)) = self.cluster.get() else {
            return Ok(None);
        };
        if known_at == at {
            return Ok(None);
        }
        // An endpoint that cannot say which cluster it is a member of is
        // not used while one is known.
        Ok(match status_cluster(authority, self.timeout)? {
            None => Some(format!(
                "{authority} did not say which etcd cluster it is a member of; not used"
            )),
            Some(id) if id != known => Some(format!(
                "{authority} is a member of etcd cluster {id:x}, but {} answered for cluster {known:x}: \
                 every endpoint must be a member of the one etcd cluster (fix `--metadata-endpoint` \
                 or `endpoints`); not used",
                self.endpoints
                    .get(known_at)
                    .map_or("another endpoint", String::as_str)
            )),
            Some(_) => None,
        })
    }

    /// Before the first request with several endpoints: ask each that
    /// answers which cluster it is a member of, and refuse endpoints of
    /// different clusters (the first answer would otherwise decide which
    /// cluster is the store, and two nodes could decide differently). The
    /// answers' cluster is remembered. Endpoints down now are checked when
    /// a request first goes to them.
    fn check_endpoints(&self) -> Result<(), Error> {
        if self.cluster.get().is_some() || self.endpoints.len() < 2 {
            return Ok(());
        }
        let mut seen: Vec<(usize, u64)> = Vec::new();
        for (at, authority) in self.endpoints.iter().enumerate() {
            if let Ok(Some(id)) = status_cluster(authority, self.timeout) {
                seen.push((at, id));
            }
        }
        let Some(&(first_at, first)) = seen.first() else {
            return Ok(());
        };
        if let Some(&(other_at, other)) = seen.iter().find(|(_, id)| *id != first) {
            return Err(Error::Endpoints(format!(
                "the etcd endpoints are members of different etcd clusters: {} of cluster {first:x}, {} of cluster {other:x}; every endpoint must be a member of the one etcd cluster (fix `--metadata-endpoint` or `endpoints`)",
                self.endpoints[first_at], self.endpoints[other_at]
            )));
        }
        self.cluster.set(Some((first_at, first)));
        Ok(())
    }

    /// POST `body` to `path`, trying the endpoints from the preferred one
    /// on. A request that may have been applied is not resent when
    /// `idempotent` is false: its outcome is unknown, which is reported as
    /// unavailable.
    fn call(
        &self,
        path: &str,
        body: &serde_json::Value,
        idempotent: bool,
    ) -> Result<Vec<u8>, Error> {
        self.check_endpoints()?;
        let bytes = body.to_string().into_bytes();
        let n = self.endpoints.len();
        let mut failures = Vec::new();
        let mut all_denied = true;
        for i in 0..n {
            let at = (self.preferred.get() + i) % n;
            let Some(authority) = self.endpoints.get(at) else {
                continue;
            };
            match self.other_cluster(at, authority) {
                Ok(None) => {}
                Ok(Some(why)) => {
                    all_denied = false;
                    failures.push(why);
                    continue;
                }
                Err(Failure::Denied(m)) => {
                    failures.push(m);
                    continue;
                }
                Err(Failure::NotSent(m) | Failure::Lost(m)) => {
                    all_denied = false;
                    failures.push(m);
                    continue;
                }
            }
            match http::post(authority, path, &bytes, self.timeout) {
                Ok(r) => {
                    match check_answer(authority, &r) {
                        Ok(()) => {
                            self.preferred.set(at);
                            // The cluster this endpoint answered for; one
                            // that was made anew under it (same endpoint,
                            // new id) is the one from now. An answer
                            // without an id moves the endpoint that
                            // answers for the known one (its probe passed).
                            match (cluster_id(&r.body), self.cluster.get()) {
                                (Some(id), _) | (None, Some((_, id))) => {
                                    self.cluster.set(Some((at, id)));
                                }
                                (None, None) => {}
                            }
                            return Ok(r.body);
                        }
                        // This member cannot serve (no leader, stopping):
                        // another one may.
                        Err(Error::Unavailable(m)) if idempotent => {
                            all_denied = false;
                            failures.push(m);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(Failure::Denied(m)) => failures.push(m),
                Err(Failure::NotSent(m)) => {
                    all_denied = false;
                    failures.push(m);
                }
                Err(Failure::Lost(m)) if idempotent => {
                    all_denied = false;
                    failures.push(m);
                }
                Err(Failure::Lost(m)) => {
                    return Err(Error::Unavailable(format!(
                        "{m}; the update's outcome is unknown"
                    )));
                }
            }
        }
        let all = failures.join("; ");
        Err(if all_denied && !failures.is_empty() {
            Error::Denied(all)
        } else {
            Error::Unavailable(format!("no etcd endpoint answered: {all}"))
        })
    }

    /// The key `key`, if it exists.
    pub fn get(&self, key: &[u8]) -> Result<Option<Kv>, Error> {
        let mut kvs = self.range(key, None, false)?;
        if kvs.len() > 1 {
            return Err(Error::Malformed(format!(
                "a range of one key returned {} keys",
                kvs.len()
            )));
        }
        let kv = kvs.pop();
        if let Some(kv) = &kv
            && kv.key != key
        {
            return Err(Error::Malformed(format!(
                "asked for key {:?}, etcd returned {:?}",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(&kv.key)
            )));
        }
        Ok(kv)
    }

    /// Every key starting with `prefix`, with values unless `keys_only`.
    pub fn list(&self, prefix: &[u8], keys_only: bool) -> Result<Vec<Kv>, Error> {
        let end = prefix_end(prefix);
        let kvs = self.range(prefix, Some(&end), keys_only)?;
        if let Some(kv) = kvs.iter().find(|kv| !kv.key.starts_with(prefix)) {
            return Err(Error::Malformed(format!(
                "a prefix range returned key {:?} outside the prefix",
                String::from_utf8_lossy(&kv.key)
            )));
        }
        Ok(kvs)
    }

    /// Up to `limit` keys with values from `from` (inclusive) to the end
    /// of `prefix`, in key order, and whether more follow.
    pub fn list_page(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: u32,
    ) -> Result<(Vec<Kv>, bool), Error> {
        if !from.starts_with(prefix) {
            return Err(Error::Malformed(format!(
                "a page of {:?} cannot start at {:?}",
                String::from_utf8_lossy(prefix),
                String::from_utf8_lossy(from)
            )));
        }
        let end = prefix_end(prefix);
        let (kvs, more) = self.range_limited(from, Some(&end), false, limit)?;
        if let Some(kv) = kvs
            .iter()
            .find(|kv| !kv.key.starts_with(prefix) || kv.key.as_slice() < from)
        {
            return Err(Error::Malformed(format!(
                "a range from {:?} returned key {:?} outside it",
                String::from_utf8_lossy(from),
                String::from_utf8_lossy(&kv.key)
            )));
        }
        if more && kvs.is_empty() {
            return Err(Error::Malformed(
                "a range reported more keys but returned none".into(),
            ));
        }
        Ok((kvs, more))
    }

    fn range(&self, key: &[u8], end: Option<&[u8]>, keys_only: bool) -> Result<Vec<Kv>, Error> {
        let (kvs, more) = self.range_limited(key, end, keys_only, 0)?;
        if more {
            return Err(Error::Malformed(
                "a range without a limit reported more keys".into(),
            ));
        }
        Ok(kvs)
    }

    /// A range read; `limit` 0 means all.
    fn range_limited(
        &self,
        key: &[u8],
        end: Option<&[u8]>,
        keys_only: bool,
        limit: u32,
    ) -> Result<(Vec<Kv>, bool), Error> {
        let mut req = json!({ "key": b64(key) });
        if let Some(end) = end {
            req["range_end"] = b64(end).into();
        }
        if keys_only {
            req["keys_only"] = true.into();
        }
        if limit > 0 {
            // int64 fields go as strings in etcd's JSON.
            req["limit"] = limit.to_string().into();
        }
        let body = self.call("/v3/kv/range", &req, true)?;
        let r: RangeResponse = serde_json::from_slice(&body)
            .map_err(|e| Error::Malformed(format!("range response: {e}")))?;
        let more = r.more;
        if limit > 0 && r.kvs.len() > limit as usize {
            return Err(Error::Malformed(format!(
                "a range limited to {limit} keys returned {}",
                r.kvs.len()
            )));
        }
        let kvs = r
            .kvs
            .into_iter()
            .map(|kv| {
                Ok(Kv {
                    key: unb64("a key", &kv.key)?,
                    value: unb64("a value", &kv.value)?,
                    mod_revision: kv.mod_revision.0,
                })
            })
            .collect::<Result<Vec<Kv>, Error>>()?;
        Ok((kvs, more))
    }

    /// Put `value` at `key` if `expect` holds, atomically. `Ok(false)`:
    /// the condition did not hold, nothing was written.
    pub fn put_if(&self, key: &[u8], expect: Expect, value: &[u8]) -> Result<bool, Error> {
        let compare = match expect {
            Expect::Absent => json!({
                "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"
            }),
            Expect::ModRevision(rev) => json!({
                "key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string()
            }),
        };
        let req = json!({
            "compare": [compare],
            "success": [{ "request_put": { "key": b64(key), "value": b64(value) } }],
        });
        let body = self.call("/v3/kv/txn", &req, false)?;
        let r: TxnResponse = serde_json::from_slice(&body)
            .map_err(|e| Error::Malformed(format!("txn response: {e}")))?;
        Ok(r.succeeded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/r/partitions/"), b"/r/partitions0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
