//! A minimal S3 client: PutObject (optionally `If-None-Match: *`),
//! GetObject, ListObjectsV2 and DeleteObject, path-style, SigV4-signed.
//! Owns the translation of S3's answers into the plugin's error kinds, so
//! a wrong key or a missing bucket reads as such, not as "HTTP 403".

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::http::{self, Failure};
use crate::sigv4::{self, Credentials};

/// Why an S3 request failed.
#[derive(Debug)]
pub enum Error {
    /// The store did not answer, or answered "try later" (5xx, SlowDown).
    Unavailable(String),
    /// The store refused us for a reason retrying will not fix: bad
    /// credentials, no such bucket, access denied, destination not allowed.
    Refused(String),
    /// `If-None-Match: *` failed: the object exists.
    Exists,
    /// Anything else the store said.
    Other(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unavailable(m) | Error::Refused(m) | Error::Other(m) => f.write_str(m),
            Error::Exists => f.write_str("the object already exists"),
        }
    }
}

pub struct Client {
    pub authority: String,
    pub bucket: String,
    pub region: String,
    pub creds: Credentials,
    pub timeout: Duration,
    /// Longest response body accepted: a segment and one batch.
    pub max_response: usize,
}

pub struct Listed {
    pub key: String,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The text of the first `<tag>...</tag>` in `xml`, entities decoded.
fn tag(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(unescape(&xml[start..end]))
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

impl Client {
    fn send(
        &self,
        method: &str,
        key: Option<&str>,
        query: &[(&str, &str)],
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> Result<http::Response, Error> {
        let path = match key {
            Some(k) => format!("/{}/{}", self.bucket, sigv4::uri_encode(k, true)),
            None => format!("/{}", self.bucket),
        };
        let payload = sigv4::sha256_hex(body);
        let headers = sigv4::sign(
            &self.creds,
            &self.region,
            method,
            &self.authority,
            &path,
            query,
            extra,
            &payload,
            now_secs(),
        );
        let qs = sigv4::query_string(query);
        let full = if qs.is_empty() {
            path
        } else {
            format!("{path}?{qs}")
        };
        http::request(
            method,
            &self.authority,
            &full,
            &headers,
            body,
            self.timeout,
            self.max_response,
        )
        .map_err(|f| match f {
            Failure::Denied(m) => Error::Refused(m),
            Failure::Unreachable(m) => Error::Unavailable(format!("S3 endpoint unreachable: {m}")),
        })
    }

    /// Turn a non-2xx answer into an error that says what to do.
    fn failed(&self, what: &str, r: &http::Response) -> Error {
        let text = String::from_utf8_lossy(&r.body);
        let code = tag(&text, "Code").unwrap_or_default();
        let message = tag(&text, "Message").unwrap_or_default();
        let said = if code.is_empty() {
            format!("HTTP {}", r.status)
        } else {
            format!("HTTP {} {code}: {message}", r.status)
        };
        match (r.status, code.as_str()) {
            (
                400 | 403,
                "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "InvalidToken"
                | "ExpiredToken"
                | "TokenRefreshRequired"
                | "InvalidClientTokenId",
            ) => Error::Refused(format!(
                "{what}: S3 refused the credentials ({said}); check access_key_id and secret_access_key in the plugin config, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )),
            (_, "AuthorizationHeaderMalformed" | "PermanentRedirect") => Error::Refused(format!(
                "{what}: the bucket is not in region `{}` ({said}); set `region`",
                self.region
            )),
            (_, "RequestTimeTooSkewed") => Error::Refused(format!(
                "{what}: S3 says this machine's clock is off ({said}); signatures carry the time, so fix the clock"
            )),
            (400 | 409, "ConditionalRequestConflict" | "OperationAborted" | "RequestTimeout") => {
                Error::Unavailable(format!("{what}: S3 asks to retry ({said})"))
            }
            (403, _) => Error::Refused(format!(
                "{what}: S3 denied access to bucket `{}` ({said})",
                self.bucket
            )),
            (404, "NoSuchBucket") => Error::Refused(format!(
                "{what}: bucket `{}` does not exist at {} ({said}); create it first",
                self.bucket, self.authority
            )),
            (412, _) => Error::Exists,
            (429 | 500..=599, _) | (_, "SlowDown") => {
                Error::Unavailable(format!("{what}: S3 is not serving now ({said})"))
            }
            _ => Error::Other(format!("{what}: {said}")),
        }
    }

    /// Store `body` as `key`; with `only_if_absent`, fail with
    /// [`Error::Exists`] if the key exists (`If-None-Match: *`), so of
    /// two writers of one key exactly one succeeds.
    pub fn put(&self, key: &str, body: &[u8], only_if_absent: bool) -> Result<(), Error> {
        let extra: &[(&str, &str)] = if only_if_absent {
            &[("if-none-match", "*")]
        } else {
            &[]
        };
        let r = self.send("PUT", Some(key), &[], extra, body)?;
        if (200..300).contains(&r.status) {
            Ok(())
        } else {
            Err(self.failed(&format!("put {key}"), &r))
        }
    }

    /// The object's bytes, or `None` if there is no such key.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let r = self.send("GET", Some(key), &[], &[], &[])?;
        match r.status {
            200 => Ok(Some(r.body)),
            404 if !String::from_utf8_lossy(&r.body).contains("NoSuchBucket") => Ok(None),
            _ => Err(self.failed(&format!("get {key}"), &r)),
        }
    }

    pub fn delete(&self, key: &str) -> Result<(), Error> {
        let r = self.send("DELETE", Some(key), &[], &[], &[])?;
        if (200..300).contains(&r.status) || r.status == 404 {
            Ok(())
        } else {
            Err(self.failed(&format!("delete {key}"), &r))
        }
    }

    /// Keys under `prefix` after `start_after`, in order; at most `limit`
    /// (all when `None`), following continuation tokens.
    pub fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<Listed>, Error> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let max = limit.map(|l| l.saturating_sub(out.len()).clamp(1, 1000).to_string());
            let mut query: Vec<(&str, &str)> = vec![("list-type", "2"), ("prefix", prefix)];
            if let Some(s) = start_after {
                query.push(("start-after", s));
            }
            if let Some(t) = &token {
                query.push(("continuation-token", t));
            }
            if let Some(m) = &max {
                query.push(("max-keys", m));
            }
            let r = self.send("GET", None, &query, &[], &[])?;
            if r.status != 200 {
                return Err(self.failed(&format!("list {prefix}"), &r));
            }
            let text = String::from_utf8_lossy(&r.body);
            let mut rest: &str = &text;
            while let Some(at) = rest.find("<Contents>") {
                let after = &rest[at + "<Contents>".len()..];
                let end = after.find("</Contents>").ok_or_else(|| {
                    Error::Other(format!(
                        "list {prefix}: unterminated <Contents> in the answer"
                    ))
                })?;
                let item = &after[..end];
                let key = tag(item, "Key").ok_or_else(|| {
                    Error::Other(format!("list {prefix}: an entry without <Key>"))
                })?;
                out.push(Listed { key });
                rest = &after[end..];
            }
            let truncated = tag(&text, "IsTruncated").is_some_and(|t| t.trim() == "true");
            if limit.is_some_and(|l| out.len() >= l) || !truncated {
                break;
            }
            match tag(&text, "NextContinuationToken") {
                Some(t) if Some(&t) != token.as_ref() => token = Some(t),
                _ => {
                    return Err(Error::Other(format!(
                        "list {prefix}: truncated answer without a new continuation token"
                    )));
                }
            }
        }
        Ok(out)
    }
}
