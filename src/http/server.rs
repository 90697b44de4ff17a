//! Serving connections: accept, cap, time out, drain.
//!
//! `axum::serve` has no header-read timeout, no idle timeout and no connection cap, so a client
//! that opens connections and sends nothing (or one byte a minute) holds a task and a file
//! descriptor each, forever. Those are what a reverse proxy would otherwise provide; a relay
//! reachable by upstream callbacks cannot count on having one. Connections are therefore served
//! here with hyper directly, each watched by its own clock:
//!
//! - from accept, or from the first byte of a following request, the request's headers must
//!   arrive within `header_read_timeout`;
//! - between requests on a kept-alive connection, with nothing read, it may sit `idle_timeout`;
//! - while a request is in flight (its response body included: a live stream, a long-poll) neither
//!   applies; `server.request_timeout` and the stream's own keep-alives govern it.
//!
//! Over `max_connections`, a new connection is answered `503` with `Connection: close` at once.
//!
//! A connection is closed by lingering: the socket is shut for writing, then what the client still
//! sends is read and discarded for up to [`LINGER`] or [`LINGER_BYTES`]. Closing a socket with
//! unread bytes makes the kernel send a reset, and a client still writing a body we refused (a
//! `413` before its upload ends) would then see "broken pipe" instead of our answer.
//!
//! Longer than 400 lines: one connection's life (accept, cap, header-read and idle clocks,
//! draining, lingering close) is one state machine; split, the clocks would sit apart from the loop
//! that enforces them.

use axum::body::Body;
use axum::http::{header, HeaderValue};
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How many connections, and how long each may wait for the client.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// How long, and how much, a closing connection keeps reading what its client still sends.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 << 20;

const OVER_CAPACITY_BODY: &str = r#"{"type":"/problems/unavailable","title":"Service Unavailable","status":503,"detail":"too many connections: try again shortly"}"#;

/// Serves `router` on `listener` until `shutdown` fires, then lets every open connection finish its
/// request in flight and returns once all are closed. Dropping the future closes them all at once.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most often: wait for some to close rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            ::metrics::counter!("klr_http_connections_refused_total").increment(1);
            connections.spawn(refuse(stream));
            continue;
        };
        let router = router.clone();
        let stop = shutdown.clone();
        connections.spawn(async move {
            ::metrics::gauge!("klr_http_connections_open").increment(1.0);
            serve_connection(stream, slot, router, limits, stop).await;
            ::metrics::gauge!("klr_http_connections_open").decrement(1.0);
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Tells a client over the cap why, without reading anything it sent.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
             retry-after: 1\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\
             content-length: {}\r\n\r\n{OVER_CAPACITY_BODY}",
            OVER_CAPACITY_BODY.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
    })
    .await;
    linger(stream, None).await;
}

/// Closes `stream` without a reset: see the module header. The connection's slot (if any) is
/// held until the socket is really closed, so lingering sockets count against the cap.
async fn linger(mut stream: TcpStream, slot: Option<OwnedSemaphorePermit>) {
    let _ = tokio::time::timeout(LINGER, async {
        let _ = stream.shutdown().await;
        let mut buf = [0u8; 8192];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    drop(slot);
}

async fn serve_connection(
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let clock = Arc::new(Clock::new());
    let io = TokioIo::new(Watched {
        inner: Some(stream),
        slot: Some(slot),
        clock: clock.clone(),
    });
    let service_clock = clock.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let in_flight = InFlight::start(service_clock.clone());
        let (req, read_to_end) = ReadToEnd::wrap(req);
        let call = router.clone().oneshot(req);
        async move {
            let mut response = match call.await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            if !read_to_end.load(Ordering::Acquire) {
                // Answered before its body was read (a 413, a 401): hyper will close rather than
                // read the rest, and a client not told so may send its next request into the
                // closing socket.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response.map(|body| Guarded {
                body,
                _in_flight: in_flight,
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The header-read clock is ours (below): hyper's also runs between requests, which would make
    // the idle timeout the shorter of the two.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        let deadline = clock.deadline(&limits);
        let changed = clock.changed.notified();
        tokio::select! {
            r = connection.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = changed => {}
            _ = sleep_until(deadline) => {
                if clock.expired(&limits) {
                    // Nothing is in flight: no answer is cut short by closing now.
                    ::metrics::counter!("klr_http_connections_timed_out_total").increment(1);
                    return;
                }
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What a connection is doing, as far as its timeouts care.
struct Clock {
    state: Mutex<ClockState>,
    /// Woken when a deadline may have moved (a request ended, a first byte arrived).
    changed: Notify,
}

struct ClockState {
    in_flight: usize,
    /// Set while headers are awaited: from accept, and from the first byte after a response.
    header_since: Option<Instant>,
    /// When the connection last became idle (its last response ended).
    idle_since: Instant,
}

impl Clock {
    fn new() -> Clock {
        let now = Instant::now();
        Clock {
            state: Mutex::new(ClockState {
                in_flight: 0,
                header_since: Some(now),
                idle_since: now,
            }),
            changed: Notify::new(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ClockState) -> T) -> T {
        // A poisoned lock only means another holder panicked mid-update of plain numbers.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state)
    }

    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        self.with(|s| {
            if s.in_flight > 0 {
                None
            } else if let Some(since) = s.header_since {
                Some(since + limits.header_read_timeout)
            } else {
                Some(s.idle_since + limits.idle_timeout)
            }
        })
    }

    fn expired(&self, limits: &ConnectionLimits) -> bool {
        self.deadline(limits).is_some_and(|d| d <= Instant::now())
    }

    fn bytes_read(&self) {
        let started = self.with(|s| {
            let start = s.in_flight == 0 && s.header_since.is_none();
            if start {
                s.header_since = Some(Instant::now());
            }
            start
        });
        if started {
            self.changed.notify_one();
        }
    }
}

/// Counts a request as in flight from its head until its response body is dropped.
struct InFlight(Arc<Clock>);

impl InFlight {
    fn start(clock: Arc<Clock>) -> InFlight {
        clock.with(|s| {
            s.in_flight += 1;
            s.header_since = None;
        });
        clock.changed.notify_one();
        InFlight(clock)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.with(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.idle_since = Instant::now();
            }
        });
        self.0.changed.notify_one();
    }
}

/// A response body that keeps its request in flight until hyper has sent (or dropped) it.
struct Guarded {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A request body that records whether it was read to its end.
struct ReadToEnd {
    body: Incoming,
    done: Arc<AtomicBool>,
}

impl ReadToEnd {
    fn wrap(req: hyper::Request<Incoming>) -> (axum::extract::Request, Arc<AtomicBool>) {
        let (parts, body) = req.into_parts();
        let done = Arc::new(AtomicBool::new(http_body::Body::is_end_stream(&body)));
        let body = Body::new(ReadToEnd {
            body,
            done: done.clone(),
        });
        (axum::extract::Request::from_parts(parts, body), done)
    }
}

impl http_body::Body for ReadToEnd {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.body.is_end_stream() {
            self.done.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The socket, telling the clock when bytes arrive. Dropped (hyper is done with it), it hands the
/// socket to a task that closes it by lingering.
struct Watched {
    /// `None` only once dropped.
    inner: Option<TcpStream>,
    slot: Option<OwnedSemaphorePermit>,
    clock: Arc<Clock>,
}

impl Watched {
    fn stream(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        match self.inner.as_mut() {
            Some(s) => Ok(Pin::new(s)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let Some(stream) = self.inner.take() else {
            return;
        };
        let slot = self.slot.take();
        // Outside a runtime (never, in the service) the socket just closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(linger(stream, slot));
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = match self.stream() {
            Ok(s) => s.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        };
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(s) => s.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(s) => s.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}
