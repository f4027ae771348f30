//! The `key = value` settings the S3 plugin accepts, with their defaults.
//! Credentials and the region may also come from the environment the host
//! passes in (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION`/`AWS_DEFAULT_REGION`); the config wins.

use std::time::Duration;

use crate::sigv4::Credentials;

pub struct Config {
    /// `host:port` of the S3 endpoint.
    pub authority: String,
    pub bucket: String,
    pub region: String,
    /// Key prefix of this node's data, `""` or ending in `/`.
    pub prefix: String,
    pub creds: Credentials,
    /// Buffered bytes that trigger an upload (a new segment object).
    pub segment_bytes: u64,
    /// An append this long after the oldest buffered one uploads first; 0
    /// uploads on every append.
    pub upload_interval: Duration,
    pub timeout: Duration,
    /// Uploaded segments kept in memory for reads.
    pub cache_bytes: u64,
}

pub const KEYS: &str = "endpoint, bucket, region, prefix, access_key_id, secret_access_key, session_token, segment.bytes, upload.interval.ms, timeout.ms, cache.bytes";

fn number(key: &str, v: &str, range: std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    v.trim()
        .parse()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            format!(
                "{key} = `{v}`: want a number from {} to {}",
                range.start(),
                range.end()
            )
        })
}

/// `http://host:port` (a trailing `/` allowed) as `host:port`.
fn authority(endpoint: &str) -> Result<String, String> {
    let e = endpoint.trim();
    if e.starts_with("https://") {
        return Err(format!(
            "endpoint `{e}`: https is not supported yet (no TLS from plugins); use http://"
        ));
    }
    let rest = e
        .strip_prefix("http://")
        .ok_or_else(|| format!("endpoint `{e}` must look like http://host:port"))?;
    let a = rest.strip_suffix('/').unwrap_or(rest);
    match a.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !a.contains(['/', '?', '#', '@', ' '])
                && port.parse::<u16>().is_ok_and(|p| p != 0) =>
        {
            Ok(a.to_string())
        }
        _ => Err(format!(
            "endpoint `{e}` must look like http://host:port, with a port and no path"
        )),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Config {
    pub fn parse(pairs: &[(String, String)]) -> Result<Config, String> {
        let mut endpoint = None;
        let mut bucket = None;
        let mut region = None;
        let mut prefix = String::new();
        let mut key_id = None;
        let mut secret = None;
        let mut token = None;
        let mut segment_bytes = 8 << 20;
        let mut upload_ms = 1000;
        let mut timeout_ms = 2000;
        let mut cache_bytes = 64 << 20;
        for (k, v) in pairs {
            match k.as_str() {
                "endpoint" => endpoint = Some(authority(v)?),
                "bucket" => bucket = Some(v.trim().to_string()),
                "region" => region = Some(v.trim().to_string()),
                "prefix" => prefix = v.trim().to_string(),
                "access_key_id" => key_id = Some(v.trim().to_string()),
                "secret_access_key" => secret = Some(v.trim().to_string()),
                "session_token" => token = Some(v.trim().to_string()),
                // Bounded well below the instance's 1 GiB memory limit:
                // the buffer, a fetched segment and the cache share it.
                "segment.bytes" => segment_bytes = number(k, v, 1024..=256 << 20)?,
                "upload.interval.ms" => upload_ms = number(k, v, 0..=3_600_000)?,
                "timeout.ms" => timeout_ms = number(k, v, 10..=60_000)?,
                "cache.bytes" => cache_bytes = number(k, v, 0..=256 << 20)?,
                _ => return Err(format!("unknown setting `{k}`; storage-s3 takes {KEYS}")),
            }
        }
        let authority = endpoint.ok_or("storage-s3 needs `endpoint = http://host:port`")?;
        let bucket = bucket
            .filter(|b| !b.is_empty())
            .ok_or("storage-s3 needs `bucket`")?;
        // Path-style addressing puts the bucket in the path: S3's naming
        // rules keep it a single plain segment.
        if bucket.len() < 3
            || bucket.len() > 63
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(format!(
                "bucket `{bucket}`: want 3-63 lower-case letters, digits, `-` or `.`"
            ));
        }
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        if prefix.starts_with('/') || prefix.len() > 512 {
            return Err(format!(
                "prefix `{prefix}`: must not start with `/` and must be at most 512 bytes"
            ));
        }
        let region = region
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_string());
        let access_key_id = key_id.or_else(|| env("AWS_ACCESS_KEY_ID")).ok_or(
            "storage-s3 needs credentials: `access_key_id` (or AWS_ACCESS_KEY_ID in the node's environment)",
        )?;
        let secret_access_key = secret.or_else(|| env("AWS_SECRET_ACCESS_KEY")).ok_or(
            "storage-s3 needs credentials: `secret_access_key` (or AWS_SECRET_ACCESS_KEY in the node's environment)",
        )?;
        let session_token = token.or_else(|| env("AWS_SESSION_TOKEN"));
        Ok(Config {
            authority,
            bucket,
            region,
            prefix,
            creds: Credentials {
                access_key_id,
                secret_access_key,
                session_token,
            },
            segment_bytes,
            upload_interval: Duration::from_millis(upload_ms),
            timeout: Duration::from_millis(timeout_ms),
            cache_bytes,
        })
    }
}
