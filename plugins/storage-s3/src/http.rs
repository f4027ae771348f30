//! One HTTP/1.1 request through wasi:http's outgoing handler, with the
//! per-request timeouts of the plugin's config. Owns the translation of
//! wasi:http failures into "the server could not be reached" and "the
//! host refused the destination".

use std::time::Duration;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasip2::io::streams::StreamError;

/// Why a request got no answer.
#[derive(Debug)]
pub enum Failure {
    /// The host refused the request: the authority is not in the sandbox's
    /// allow-list. Retrying cannot help.
    Denied(String),
    /// No complete answer: refused, timed out, reset.
    Unreachable(String),
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn classify(authority: &str, e: ErrorCode) -> Failure {
    match e {
        ErrorCode::HttpRequestDenied => Failure::Denied(format!(
            "the host denied the request to {authority}: it is not in the sandbox's allow-list (the node allows only its [storage] endpoint)"
        )),
        other => Failure::Unreachable(format!("{authority}: {other:?}")),
    }
}

/// Send `method` `http://<authority><path_and_query>` with `headers` and
/// `body`; the whole answer is read.
pub fn request(
    method: &str,
    authority: &str,
    path_and_query: &str,
    headers: &[(String, String)],
    body: &[u8],
    timeout: Duration,
    max_response: usize,
) -> Result<Response, Failure> {
    let local =
        |what: &str| Failure::Unreachable(format!("{authority}: building the request: {what}"));
    let mut list: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
        .collect();
    if !body.is_empty() || method == "PUT" {
        list.push((
            "content-length".to_string(),
            body.len().to_string().into_bytes(),
        ));
    }
    let fields = Fields::from_list(&list).map_err(|e| local(&format!("{e:?}")))?;
    let request = OutgoingRequest::new(fields);
    let m = match method {
        "GET" => Method::Get,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "HEAD" => Method::Head,
        other => Method::Other(other.to_string()),
    };
    request.set_method(&m).map_err(|()| local("method"))?;
    request
        .set_scheme(Some(&Scheme::Http))
        .map_err(|()| local("scheme"))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| local("authority"))?;
    request
        .set_path_with_query(Some(path_and_query))
        .map_err(|()| local("path"))?;
    let outgoing = request.body().map_err(|()| local("body"))?;
    let options = RequestOptions::new();
    // A host that does not support a timeout says so; the others still
    // apply and the host's own call deadline bounds the rest.
    let t = Some(nanos(timeout));
    let _ = options.set_connect_timeout(t);
    let _ = options.set_first_byte_timeout(t);
    let _ = options.set_between_bytes_timeout(t);
    let pending =
        outgoing_handler::handle(request, Some(options)).map_err(|e| classify(authority, e))?;
    // Stream the body while the host sends the request: a segment can be
    // megabytes, more than the host buffers before sending. If the body
    // cannot be written, the request's own outcome says why (a denied
    // destination closes the body stream at once).
    let early = match write_body(authority, &outgoing, body) {
        Ok(()) => {
            OutgoingBody::finish(outgoing, None).map_err(|e| classify(authority, e))?;
            None
        }
        Err(e) => {
            // The server may have answered early (an error before reading
            // the whole body): that answer is the outcome.
            drop(outgoing);
            pending.subscribe().block();
            match pending.get() {
                Some(Ok(Err(code))) => return Err(classify(authority, code)),
                Some(Ok(Ok(r))) => Some(r),
                _ => return Err(e),
            }
        }
    };
    let response = match early {
        Some(r) => r,
        None => {
            pending.subscribe().block();
            match pending.get() {
                Some(Ok(Ok(r))) => r,
                Some(Ok(Err(e))) => return Err(classify(authority, e)),
                Some(Err(())) | None => {
                    return Err(Failure::Unreachable(format!(
                        "{authority}: the response future was not ready after blocking on it"
                    )));
                }
            }
        }
    };
    let status = response.status();
    let declared: Option<usize> = response
        .headers()
        .get("content-length")
        .first()
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok());
    let incoming = response
        .consume()
        .map_err(|()| Failure::Unreachable(format!("{authority}: response body unavailable")))?;
    let body = read_all(authority, &incoming, declared, max_response)?;
    // A body cut short must not pass for a short object (recovery would
    // take it for damage and cut the log).
    if let Some(n) = declared
        && n != body.len()
    {
        return Err(Failure::Unreachable(format!(
            "{authority}: the answer declared {n} bytes but {} arrived",
            body.len()
        )));
    }
    drop(IncomingBody::finish(incoming));
    Ok(Response { status, body })
}

fn write_body(authority: &str, outgoing: &OutgoingBody, body: &[u8]) -> Result<(), Failure> {
    if body.is_empty() {
        return Ok(());
    }
    let stream = outgoing.write().map_err(|()| {
        Failure::Unreachable(format!("{authority}: request body stream unavailable"))
    })?;
    let ready = stream.subscribe();
    let lost = |e: StreamError| {
        Failure::Unreachable(format!(
            "{authority}: writing the request body: {}",
            match e {
                StreamError::Closed => "closed".to_string(),
                StreamError::LastOperationFailed(e) => e.to_debug_string(),
            }
        ))
    };
    let mut rest = body;
    while !rest.is_empty() {
        ready.block();
        let permit = stream.check_write().map_err(lost)?;
        let n = rest
            .len()
            .min(usize::try_from(permit).unwrap_or(usize::MAX));
        let (chunk, tail) = rest.split_at(n);
        stream.write(chunk).map_err(lost)?;
        rest = tail;
    }
    stream.flush().map_err(lost)?;
    ready.block();
    stream.check_write().map_err(lost)?;
    Ok(())
}

/// The whole response body, refusing one over `max` bytes (a broken or
/// hostile server must not make the instance run out of memory).
fn read_all(
    authority: &str,
    incoming: &IncomingBody,
    declared: Option<usize>,
    max: usize,
) -> Result<Vec<u8>, Failure> {
    let stream = incoming.stream().map_err(|()| {
        Failure::Unreachable(format!("{authority}: response body stream unavailable"))
    })?;
    let mut out = Vec::with_capacity(declared.unwrap_or(0).min(max));
    loop {
        match stream.blocking_read(1 << 20) {
            Ok(chunk) => {
                out.extend_from_slice(&chunk);
                if out.len() > max {
                    return Err(Failure::Unreachable(format!(
                        "{authority}: response larger than {max} bytes"
                    )));
                }
            }
            Err(StreamError::Closed) => return Ok(out),
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(Failure::Unreachable(format!(
                    "{authority}: reading the response: {}",
                    e.to_debug_string()
                )));
            }
        }
    }
}
