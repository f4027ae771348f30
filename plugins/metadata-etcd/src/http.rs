//! One HTTP/1.1 POST through wasi:http's outgoing handler, with the
//! per-request timeouts of the plugin's config. Owns the translation of
//! wasi:http failures into "the request never left" (safe to send to the
//! next endpoint) and "it may have been applied" (not safe to resend).

use std::time::Duration;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasip2::io::streams::StreamError;

/// Longest response body read; etcd answers for this store are small, so
/// anything larger is a broken or hostile endpoint, not data to buffer.
const MAX_RESPONSE: usize = 64 << 20;

/// Why a request failed.
#[derive(Debug)]
pub enum Failure {
    /// The request did not reach the server (refused, connect timeout,
    /// name not resolved): another endpoint may be tried.
    NotSent(String),
    /// The host refused the request: the authority is not in the
    /// sandbox's allow-list. Also not sent.
    Denied(String),
    /// The request may have reached the server but no complete answer came
    /// back (timeout after sending, connection reset): its outcome is
    /// unknown.
    Lost(String),
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether a wasi:http error code means the request never left.
fn classify(authority: &str, e: ErrorCode) -> Failure {
    match e {
        ErrorCode::HttpRequestDenied => Failure::Denied(format!(
            "the host denied the request to {authority}: it is not in the sandbox's allow-list of endpoints"
        )),
        ErrorCode::DnsTimeout
        | ErrorCode::DnsError(_)
        | ErrorCode::DestinationNotFound
        | ErrorCode::DestinationUnavailable
        | ErrorCode::DestinationIpProhibited
        | ErrorCode::DestinationIpUnroutable
        | ErrorCode::ConnectionRefused
        | ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionLimitReached => {
            Failure::NotSent(format!("{authority}: cannot connect: {e:?}"))
        }
        other => Failure::Lost(format!("{authority}: no complete answer: {other:?}")),
    }
}

/// POST `body` as JSON to `http://<authority><path>`.
pub fn post(
    authority: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<Response, Failure> {
    let local = |what: &str| Failure::NotSent(format!("{authority}: building the request: {what}"));
    let headers = Fields::from_list(&[
        ("content-type".to_string(), b"application/json".to_vec()),
        (
            "content-length".to_string(),
            body.len().to_string().into_bytes(),
        ),
    ])
    .map_err(|e| local(&format!("{e:?}")))?;
    let request = OutgoingRequest::new(headers);
    request
        .set_method(&Method::Post)
        .map_err(|()| local("method"))?;
    request
        .set_scheme(Some(&Scheme::Http))
        .map_err(|()| local("scheme"))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| local("authority"))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| local("path"))?;
    let outgoing = request.body().map_err(|()| local("body"))?;
    {
        // The whole body is written before the request is handed over, as
        // wasmtime's own wasi:http tests do; it is small.
        let stream = outgoing.write().map_err(|()| local("body stream"))?;
        let ready = stream.subscribe();
        let mut rest = body;
        while !rest.is_empty() {
            ready.block();
            let permit = stream
                .check_write()
                .map_err(|e| local(&format!("body stream: {e:?}")))?;
            let n = rest
                .len()
                .min(usize::try_from(permit).unwrap_or(usize::MAX));
            let (chunk, tail) = rest.split_at(n);
            stream
                .write(chunk)
                .map_err(|e| local(&format!("body stream: {e:?}")))?;
            rest = tail;
        }
        stream
            .flush()
            .map_err(|e| local(&format!("body stream: {e:?}")))?;
        ready.block();
        stream
            .check_write()
            .map_err(|e| local(&format!("body stream: {e:?}")))?;
    }
    let options = RequestOptions::new();
    // A host that does not support a timeout says so; the others still
    // apply and the host's own call deadline bounds the rest.
    let t = Some(nanos(timeout));
    let _ = options.set_connect_timeout(t);
    let _ = options.set_first_byte_timeout(t);
    let _ = options.set_between_bytes_timeout(t);
    let pending =
        outgoing_handler::handle(request, Some(options)).map_err(|e| classify(authority, e))?;
    OutgoingBody::finish(outgoing, None).map_err(|e| classify(authority, e))?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(e))) => return Err(classify(authority, e)),
        Some(Err(())) | None => {
            return Err(Failure::Lost(format!(
                "{authority}: the response future was not ready after blocking on it"
            )));
        }
    };
    let status = response.status();
    let incoming = response
        .consume()
        .map_err(|()| Failure::Lost(format!("{authority}: response body unavailable")))?;
    let body = read_all(authority, &incoming)?;
    drop(IncomingBody::finish(incoming));
    Ok(Response { status, body })
}

fn read_all(authority: &str, incoming: &IncomingBody) -> Result<Vec<u8>, Failure> {
    let stream = incoming
        .stream()
        .map_err(|()| Failure::Lost(format!("{authority}: response body stream unavailable")))?;
    let mut out = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => {
                out.extend_from_slice(&chunk);
                if out.len() > MAX_RESPONSE {
                    return Err(Failure::Lost(format!(
                        "{authority}: response larger than {MAX_RESPONSE} bytes"
                    )));
                }
            }
            Err(StreamError::Closed) => return Ok(out),
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(Failure::Lost(format!(
                    "{authority}: reading the response: {}",
                    e.to_debug_string()
                )));
            }
        }
    }
}
