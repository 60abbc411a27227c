//! Accepting connections and serving HTTP/1.1 on them with hyper directly.
//!
//! `axum::serve` would do, but it serves every connection through hyper-util's HTTP/1-or-2
//! builder with hyper's default buffers. A parked long-poll is an idle connection that lives
//! for up to a minute, and 10,000 of them are a normal load, so what one connection costs
//! matters: here each is a plain HTTP/1 connection (tunnel speaks nothing else) and its
//! future stays small (docs/BENCHMARKS.md has the measurements).
//!
//! The server sits on the internet, so a connection must not cost anything for long unless it
//! is doing something (docs/RELIABILITY.md, "Hostile load"):
//! - a connection without a request in flight is closed after the header timeout (nothing
//!   or only part of a request head arrived: slowloris) or the idle timeout (keep-alive
//!   between requests);
//! - a write that makes no progress for the write timeout closes the connection (a reader
//!   that stopped reading an event stream);
//! - at most `max_connections` are open: at the cap, the connection idle the longest is closed
//!   to make room, and when every open connection has a request in flight (parked
//!   long-polls, streams) the new one gets a 503 and is closed.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long and how many connections may cost the server.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections open at once (parked long-polls and streams included).
    pub max_connections: usize,
    /// A new connection, or a request head once its first byte arrived, must be complete
    /// within this.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// A write (an answer, an event stream) that makes no progress for this ends the
    /// connection.
    pub write_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 16_384,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Counts of what the connection guard did, for `/metrics`.
#[derive(Default)]
pub(crate) struct ConnectionStats {
    pub(crate) open: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) evicted: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) write_timed_out: AtomicU64,
}

impl ConnectionStats {
    /// Appends the connection metrics to a `/metrics` exposition.
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let open = self.open.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP tunnel_connections_open HTTP connections open.\n# TYPE tunnel_connections_open gauge\ntunnel_connections_open {open}"
        );
        for (name, help, v) in [
            (
                "tunnel_connections_refused_total",
                "Connections answered 503 at the connection cap.",
                &self.refused,
            ),
            (
                "tunnel_connections_evicted_total",
                "Idle connections closed to make room at the connection cap.",
                &self.evicted,
            ),
            (
                "tunnel_connections_timed_out_total",
                "Connections closed by the header or idle timeout.",
                &self.timed_out,
            ),
            (
                "tunnel_connections_write_timeouts_total",
                "Connections closed because the peer stopped reading.",
                &self.write_timed_out,
            ),
        ] {
            let v = v.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
    }
}

/// The state of one open connection that the accept loop and its own task share.
struct Conn {
    epoch: Instant,
    /// Requests in flight (their answer not yet fully written).
    busy: AtomicU32,
    /// When it last became idle (or was accepted), in ms since `epoch`.
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived while idle, in ms since `epoch`
    /// plus one; 0 = none yet.
    head_started: AtomicU64,
    /// Has finished a request: idle time counts against the idle timeout from then on.
    served: AtomicBool,
    evicted: AtomicBool,
    /// Wakes the connection's task to look at the state again.
    wake: Notify,
}

impl Conn {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> tokio::time::Instant {
        (self.epoch + Duration::from_millis(ms)).into()
    }

    /// When the connection is to be closed for doing nothing; `None` while a request is in
    /// flight.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<tokio::time::Instant> {
        if self.busy.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = self.idle_since.load(Ordering::SeqCst);
        let header = limits.header_timeout.as_millis() as u64;
        if !self.served.load(Ordering::SeqCst) {
            return Some(self.at(since + header));
        }
        let idle = since + limits.idle_timeout.as_millis() as u64;
        let head = match self.head_started.load(Ordering::SeqCst) {
            0 => idle,
            started => started - 1 + header,
        };
        Some(self.at(idle.min(head)))
    }

    fn request_started(&self) {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.head_started.store(0, Ordering::SeqCst);
    }

    fn request_ended(&self) {
        self.idle_since.store(self.now_ms(), Ordering::SeqCst);
        self.served.store(true, Ordering::SeqCst);
        if self.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.wake.notify_one();
        }
    }

    /// Bytes arrived: if idle, a request head has started and the header timeout runs.
    fn bytes_read(&self) {
        if self.busy.load(Ordering::SeqCst) == 0
            && self.served.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::SeqCst) == 0
        {
            self.head_started.store(self.now_ms() + 1, Ordering::SeqCst);
            self.wake.notify_one();
        }
    }
}

/// Every open connection, so that one idle the longest can be closed at the cap.
struct Registry {
    epoch: Instant,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Signalled when a connection closes.
    freed: Notify,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn register(self: &Arc<Self>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            epoch: self.epoch,
            busy: AtomicU32::new(0),
            idle_since: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            head_started: AtomicU64::new(0),
            served: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            wake: Notify::new(),
        });
        self.lock().insert(id, conn.clone());
        Registered {
            registry: self.clone(),
            id,
            conn,
        }
    }

    /// Asks a connection with no request in flight to close: one that never finished a
    /// request (the shape of a flood) before a keep-alive one (whose client may be sending
    /// its next request right now), the one idle the longest first. False when every open
    /// connection is busy.
    fn evict_one(&self) -> bool {
        let conns = self.lock();
        let oldest = conns
            .values()
            .filter(|c| c.busy.load(Ordering::SeqCst) == 0 && !c.evicted.load(Ordering::SeqCst))
            .min_by_key(|c| {
                (
                    c.served.load(Ordering::SeqCst),
                    c.idle_since.load(Ordering::SeqCst),
                )
            });
        match oldest {
            Some(c) => {
                c.evicted.store(true, Ordering::SeqCst);
                c.wake.notify_one();
                true
            }
            None => false,
        }
    }
}

/// A connection's place in the registry; leaves it when dropped.
struct Registered {
    registry: Arc<Registry>,
    id: u64,
    conn: Arc<Conn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
        self.registry.freed.notify_one();
    }
}

/// Serves `router` until `shutdown` is cancelled, then lets every open connection finish its
/// request in flight (long-polls end at once: they watch the same token) and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
) -> io::Result<()> {
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // The timeouts are ours (below), covering idle keep-alive and writes too.
    http.header_read_timeout(None);
    let http = Arc::new(http);
    let limits = Arc::new(limits);
    let registry = Arc::new(Registry {
        epoch: Instant::now(),
        next_id: AtomicU64::new(0),
        conns: Mutex::new(HashMap::new()),
        freed: Notify::new(),
    });
    let mut last_warned: Option<Instant> = None;
    'accept: loop {
        // Connections asked to close for room still hold their sockets: accepting faster than
        // they close would run out of file descriptors.
        while registry.len() > limits.max_connections {
            tokio::select! {
                _ = registry.freed.notified() => {}
                _ = shutdown.cancelled() => break 'accept,
            }
        }
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: a busy loop would not help.
                    tracing::error!(error = %e, "Accepting a connection failed; retrying in 1 s.");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = shutdown.cancelled() => break,
        };
        if registry.len() >= limits.max_connections {
            if registry.evict_one() {
                stats.evicted.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                if last_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    last_warned = Some(Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "Refusing connections: every open connection has a request in flight."
                    );
                }
                refuse(stream);
                continue;
            }
        }
        // Answers go out whole at once: hyper writes each in as few writes as it can, and a
        // client's delayed ACK must never hold the rest of one back (Nagle's algorithm).
        let _ = stream.set_nodelay(true);
        let registered = registry.register();
        let (http, router, shutdown, limits, stats) = (
            http.clone(),
            router.clone(),
            shutdown.clone(),
            limits.clone(),
            stats.clone(),
        );
        connections.spawn(async move {
            stats.open.fetch_add(1, Ordering::Relaxed);
            let state = registered.conn.clone();
            let io = TokioIo::new(Guarded {
                inner: stream,
                conn: state.clone(),
                stats: stats.clone(),
                write_timeout: limits.write_timeout,
                stalled: None,
            });
            let service = Tracked {
                router,
                conn: state.clone(),
            };
            // Upgrades: `/acp`'s WebSocket. An upgraded connection leaves this loop (and the
            // cap) once its 101 is written; `/acp` bounds those itself.
            let conn = http.serve_connection(io, service).with_upgrades();
            tokio::pin!(conn);
            let mut graceful = false;
            // Boxed and only while idle: a parked long-poll holds no timer.
            let mut timer: Option<Pin<Box<Sleep>>> = None;
            loop {
                let woken = state.wake.notified();
                match (state.deadline(&limits), &mut timer) {
                    (Some(at), Some(t)) => t.as_mut().reset(at),
                    (Some(at), None) => timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    (None, _) => timer = None,
                }
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = shutdown.cancelled() => {
                        graceful = true;
                        break;
                    }
                    _ = woken => {
                        if state.evicted.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                    _ = idle_deadline(&mut timer) => {
                        // Still idle past its deadline (a request may have started meanwhile).
                        if state.deadline(&limits).is_some_and(|d| d <= tokio::time::Instant::now()) {
                            stats.timed_out.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
            if graceful {
                // Finish the request in flight, then close.
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            // Leaving the loop otherwise drops the connection: its socket closes.
            drop(registered);
            stats.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Resolves when the idle deadline passes; never without one.
async fn idle_deadline(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// A connection over the cap: a 503 if the socket takes it at once, then closed. Never
/// waits (the accept loop must not).
fn refuse(stream: TcpStream) {
    const BODY: &str = r#"{"error":{"code":"unavailable","message":"the server has too many open connections; try again"}}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

/// Errors of one incoming connection (the client gave up before it was accepted), not of the
/// listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The socket, with the write timeout and the start of request heads noted.
struct Guarded {
    inner: TcpStream,
    conn: Arc<Conn>,
    stats: Arc<ConnectionStats>,
    write_timeout: Duration,
    /// Armed while a write waits for the peer to read; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl Guarded {
    fn write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match op(Pin::new(&mut self.inner), cx) {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.write_timeout;
                let stall = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(stall.as_mut().poll(cx));
                self.stats.write_timed_out.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer stopped reading",
                )))
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.conn.bytes_read();
        }
        r
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_with(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().write_with(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().write_with(cx, |s, cx| s.poll_shutdown(cx))
    }
}

/// The router, with each request counted as in flight until its answer's body is written.
#[derive(Clone)]
struct Tracked {
    router: Router,
    conn: Arc<Conn>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = hyper::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        self.conn.request_started();
        let guard = InFlight(self.conn.clone());
        let mut router = self.router.clone();
        Box::pin(async move {
            let res = tower_service::Service::call(&mut router, req).await?;
            Ok(res.map(|body| Body::new(TrackedBody { body, guard })))
        })
    }
}

/// Ends the request's time in flight when dropped (hyper drops the body once written, or when
/// the connection ends).
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

struct TrackedBody {
    body: Body,
    #[allow(dead_code)] // held for its Drop
    guard: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
