//! Keep-alive connections for plugins' plain-HTTP requests (etcd's JSON
//! gateway, an S3 endpoint): the sender behind the sandbox's allow-list.
//!
//! Why: wasmtime's default sender opens a TCP connection per request. A
//! node on etcd makes a few requests per partition every metadata poll, so
//! a 3-node cluster held about 6,000 sockets in TIME_WAIT, each pinning an
//! ephemeral port for 60 s, and every request paid a connect. Here idle
//! HTTP/1.1 connections are kept per authority and reused.
//!
//! Safety of reuse: a request goes to a pooled connection only if that
//! connection is ready, and it is retried on a fresh one only when hyper
//! hands it back unsent (the pooled connection had closed). A request that
//! may have reached the server is never resent here; the plugin sees the
//! error and treats the outcome as unknown, as it would on any connection.
//! HTTPS goes to wasmtime's default sender, unpooled.
//!
//! Connections live on a one-thread runtime of their own (`plugin-http`),
//! not on the runtime of the store that opened them, so they outlive it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};

/// Idle connections kept per authority; more are closed when they finish.
const MAX_IDLE_PER_AUTHORITY: usize = 32;
/// Timeouts when the guest sets none (wasmtime's default uses 600 s).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The response and the future wasi:http waits on for the connection's
/// outcome (always `Ok` here: a pooled connection outlives the request).
pub(crate) type Sent = (
    http::Response<WasiBody>,
    Box<dyn Future<Output = Result<(), HttpError>> + Send>,
);

/// Connections by `host:port`, shared by every store in the process, each
/// driven by a task on [`io_runtime`].
#[derive(Default)]
pub(crate) struct HttpPool {
    idle: Mutex<HashMap<String, Vec<Conn>>>,
}

/// One HTTP/1.1 connection: where requests go in, and the task driving it.
struct Conn {
    sender: SendRequest<WasiBody>,
    driver: tokio::task::AbortHandle,
}

impl Conn {
    /// Close it now: a request that failed or timed out may still be in
    /// flight, and a hung server would otherwise keep the socket forever.
    fn close(self) {
        self.driver.abort();
    }
}

impl HttpPool {
    pub(crate) fn global() -> &'static HttpPool {
        static POOL: OnceLock<HttpPool> = OnceLock::new();
        POOL.get_or_init(HttpPool::default)
    }

    /// A ready connection to `authority`, if one is idle. Closed ones are
    /// dropped; busy ones (a response body still being read) stay.
    fn take(&self, authority: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(authority)?;
        list.retain(|c| !c.sender.is_closed());
        let i = list.iter().position(|c| c.sender.is_ready())?;
        Some(list.swap_remove(i))
    }

    /// Keep `conn` for the next request once its response is read; past
    /// the cap it is dropped, and closes when its response is done.
    fn put(&self, authority: &str, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            let list = idle.entry(authority.to_string()).or_default();
            if list.len() < MAX_IDLE_PER_AUTHORITY {
                list.push(conn);
            }
        }
    }

    /// Send `request`: HTTPS through wasmtime's default sender, plain
    /// HTTP over a pooled connection (see the module docs).
    pub(crate) async fn send(
        &self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> Result<Sent, HttpError> {
        let uri = request.uri().clone();
        if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
            let (res, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            return Ok((res.map(BodyExt::boxed_unsync), Box::new(io)));
        }
        let authority = uri.authority().ok_or(HttpError::HttpRequestUriInvalid)?;
        let authority = match authority.port() {
            Some(_) => authority.to_string(),
            None => format!("{authority}:80"),
        };
        let timeout = |t: Option<Duration>| t.unwrap_or(DEFAULT_TIMEOUT);
        let connect_timeout = timeout(options.and_then(|o| o.connect_timeout));
        let first_byte_timeout = timeout(options.and_then(|o| o.first_byte_timeout));
        let between_bytes = timeout(options.and_then(|o| o.between_bytes_timeout))
            // Tokio's interval panics on zero.
            .max(Duration::from_nanos(1));
        // On the wire the request line carries only the path (no proxy).
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        *request.uri_mut() = http::Uri::builder()
            .path_and_query(path)
            .build()
            .map_err(|_| HttpError::HttpRequestUriInvalid)?;

        loop {
            let (mut conn, reused) = match self.take(&authority) {
                Some(c) => (c, true),
                None => (connect(&authority, connect_timeout).await?, false),
            };
            let sent =
                tokio::time::timeout(first_byte_timeout, conn.sender.try_send_request(request))
                    .await;
            match sent {
                Err(_) => {
                    conn.close();
                    return Err(HttpError::ConnectionReadTimeout);
                }
                Ok(Ok(response)) => {
                    self.put(&authority, conn);
                    let (parts, incoming) = response.into_parts();
                    let mut timer = tokio::time::interval(between_bytes);
                    timer.reset();
                    let body = TimedBody { incoming, timer };
                    let response = http::Response::from_parts(parts, body.boxed_unsync());
                    return Ok((response, Box::new(async { Ok(()) })));
                }
                Ok(Err(mut e)) => {
                    conn.close();
                    match e.take_message() {
                        // Never written: the pooled connection had gone.
                        // Safe to send on a fresh one (not retried again).
                        Some(unsent) if reused => request = unsent,
                        _ => return Err(HttpError::from(e.into_error())),
                    }
                }
            }
        }
    }
}

/// The runtime that owns every pooled connection: its socket and the task
/// driving it. Why not the caller's: a connection outlives the store that
/// opened it, and a store on its own thread has a runtime of its own that
/// ends with it; another store's request on a borrowed connection must
/// not fail because of that. `None` if its thread cannot be started (then
/// connections live on the caller's runtime).
fn io_runtime() -> Option<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("plugin-http")
            .enable_all()
            .build()
            .map_err(|e| tracing::warn!("no thread for plugin HTTP connections: {e}"))
            .ok()
    })
    .as_ref()
}

/// A new HTTP/1.1 connection to `authority`, opened and driven on
/// [`io_runtime`].
async fn connect(authority: &str, within: Duration) -> Result<Conn, HttpError> {
    let open = open(authority.to_string(), within);
    match io_runtime() {
        Some(rt) => rt.spawn(open).await.unwrap_or_else(|e| {
            Err(HttpError::Connect(std::io::Error::other(format!(
                "the connection task ended: {e}"
            ))))
        }),
        None => open.await,
    }
}

async fn open(authority: String, within: Duration) -> Result<Conn, HttpError> {
    let stream = match tokio::time::timeout(within, TcpStream::connect(&authority)).await {
        Ok(s) => s.map_err(HttpError::Connect)?,
        Err(_) => return Err(HttpError::ConnectionTimeout),
    };
    // Requests are small and answered at once: do not let Nagle hold the
    // body back waiting for the ack of the headers.
    let _ = stream.set_nodelay(true);
    let (sender, conn) = tokio::time::timeout(
        within,
        hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| HttpError::ConnectionTimeout)??;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("HTTP connection to {authority} ended: {e}");
        }
    })
    .abort_handle();
    Ok(Conn { sender, driver })
}

/// A response body that fails if no frame arrives within the guest's
/// between-bytes timeout.
struct TimedBody {
    incoming: hyper::body::Incoming,
    timer: tokio::time::Interval,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, HttpError>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(if e.is_timeout() {
                HttpError::HttpResponseTimeout
            } else {
                HttpError::from(e)
            }))),
            Poll::Ready(Some(Ok(frame))) => {
                self.timer.reset();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                ready!(self.timer.poll_tick(cx));
                Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.incoming.size_hint()
    }
}
