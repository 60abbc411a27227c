//! Accepting connections and serving HTTP/1.1 on them with hyper directly.
//!
//! `axum::serve` would do, but it serves every connection through hyper-util's HTTP/1-or-2
//! builder with hyper's default buffers. A parked long-poll is an idle connection that lives
//! for up to a minute, and 10,000 of them are a normal load, so what one connection costs
//! matters: here each is a plain HTTP/1 connection (tunnel speaks nothing else), and a parked
//! long-poll holds no hyper connection at all: the connection's task reads each request head
//! itself (`connection`, `classify`), parks the long-polls itself and gives every other
//! request, and every answer, to a hyper connection, one request's bytes at a time (`Front`),
//! which serves a run of ordinary requests until a long-poll comes.
//! docs/BENCHMARKS.md has the measurements.
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
use std::task::{Context, Poll, Waker, ready};
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
    /// hyper's read, waiting for its request's answer to be written (`Front::poll_read`).
    read_waker: Mutex<Option<Waker>>,
    /// hyper is waiting for the next request's head, nothing of it given yet: at shutdown
    /// the connection can close without cutting a request off (`drive`).
    between: AtomicBool,
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
            let waker = self
                .read_waker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    fn set_read_waker(&self, waker: &Waker) {
        let mut w = self.read_waker.lock().unwrap_or_else(|p| p.into_inner());
        if !w.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *w = Some(waker.clone());
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
            read_waker: Mutex::new(None),
            between: AtomicBool::new(false),
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
            let front = Front {
                inner: stream,
                conn: registered.conn.clone(),
                stats: stats.clone(),
                write_timeout: limits.write_timeout,
                stalled: None,
                buf: Vec::new(),
                framed: None,
                handed_back: false,
                shutdown: shutdown.clone(),
            };
            connection(front, &http, &router, &shutdown, &limits).await;
            // Its socket is closed (dropped) by now.
            drop(registered);
            stats.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// The largest request head the front reads itself; a longer one goes to hyper (which has
/// its own limits and answers).
const MAX_HEAD: usize = 16 * 1024;
/// The headers the front parses; a request with more goes to hyper.
const MAX_HEADERS: usize = 64;
/// The largest body of a long-poll the front parks itself (a claim's is a few hundred bytes).
const MAX_PARKED_BODY: usize = 64 * 1024;
/// The most the front reads from the socket at once.
const READ_CHUNK: usize = 4096;
/// Bytes the front keeps of what a client sends while its request is in flight (pipelined
/// requests); past this it stops reading until the answer is written.
const MAX_AHEAD: usize = 64 * 1024;

/// The request at the head of a connection's unread bytes, as the front sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// A long-poll whose wait needs no hyper connection: its head is the first `head` bytes,
    /// head and body the first `len`.
    Park {
        head: usize,
        len: usize,
        close: bool,
    },
    /// hyper serves it, and only it: its head and body are the next `len` bytes.
    Framed(usize),
    /// hyper serves the rest of the connection (a chunked body, an upgrade, `expect`, a head
    /// the front does not take apart itself: anything unusual).
    Opaque,
}

/// Whether the route parks: the two long-polls, answered once a task comes or the wait ends.
fn parks(method: &str, path: &str) -> bool {
    let is = |route: &str| {
        path.strip_prefix(route)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('?'))
    };
    (method == "POST" && is("/v1/claim")) || (method == "GET" && is("/worker/poll"))
}

/// What the next request is; `None` while its head is incomplete.
fn classify(buf: &[u8]) -> Option<Next> {
    if buf.is_empty() {
        return None;
    }
    // Uninitialized: this runs for every request, and 64 empty headers are 2 KiB to write.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return None,
        _ => return Some(Next::Opaque),
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Some(Next::Opaque);
    };
    if method == "CONNECT" {
        return Some(Next::Opaque);
    }
    let mut length: Option<usize> = None;
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return Some(Next::Opaque);
        }
        if name.eq_ignore_ascii_case("content-length") {
            let v = h.value.trim_ascii();
            if length.is_some() || v.is_empty() || !v.iter().all(u8::is_ascii_digit) || v.len() > 15
            {
                return Some(Next::Opaque);
            }
            length = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok());
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"upgrade") {
                    return Some(Next::Opaque);
                }
                close |= token.eq_ignore_ascii_case(b"close");
            }
        }
    }
    let body = length.unwrap_or(0);
    let Some(len) = head.checked_add(body) else {
        return Some(Next::Opaque);
    };
    if version == 1 && head <= MAX_HEAD && body <= MAX_PARKED_BODY && parks(method, path) {
        Some(Next::Park { head, len, close })
    } else {
        Some(Next::Framed(len))
    }
}

/// The request of a `Next::Park` (`buf` is its head and body), as hyper would have made it;
/// `None` if the front does not build it itself (hyper then serves it).
fn build_request(buf: &[u8], head: usize) -> Option<hyper::Request<Body>> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    if !matches!(
        req.parse_with_uninit_headers(&buf[..head], &mut headers),
        Ok(httparse::Status::Complete(_))
    ) {
        return None;
    }
    let method = axum::http::Method::from_bytes(req.method?.as_bytes()).ok()?;
    let uri: axum::http::Uri = req.path?.parse().ok()?;
    let mut map = axum::http::HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        map.append(
            axum::http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            axum::http::HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    let body = &buf[head..];
    let body = if body.is_empty() {
        Body::empty()
    } else {
        Body::from(axum::body::Bytes::copy_from_slice(body))
    };
    let mut request = hyper::Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = axum::http::Version::HTTP_11;
    *request.headers_mut() = map;
    Some(request)
}

/// What hyper reads in place of a parked long-poll's request to write its answer: any request
/// (the answer is made already), keeping the client's `connection: close`.
const REPLAY: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
const REPLAY_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n";

/// Serves one connection until it closes.
///
/// A request is read by the front (`next_request`) first. A long-poll (`Next::Park`) is
/// handed to the router by the front itself and waits holding only the socket and the
/// handler's future: a hyper connection costs two 8 KiB buffers, 10,000 parked polls 160 MiB
/// (docs/BENCHMARKS.md). Every answer, the long-poll's included, is written by hyper: a hyper
/// connection serves one request at a time (the front gives it exactly that request's bytes)
/// and gives the socket back after its answer (`Front::handed_back`).
async fn connection(
    mut front: Front,
    http: &hyper::server::conn::http1::Builder,
    router: &Router,
    shutdown: &CancellationToken,
    limits: &ConnectionLimits,
) {
    let state = front.conn.clone();
    // The idle or header deadline; boxed and only while idle: a parked poll holds no timer.
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    loop {
        let Some(next) = next_request(&mut front, &mut timer, shutdown, limits).await else {
            return;
        };
        let mut ready = None;
        match next {
            Next::Park { head, len, close } => {
                let Some(req) = build_request(&front.buf[..len], head) else {
                    front.framed = Some(len);
                    match session(front, &mut timer, http, router, None, shutdown, limits).await {
                        Some(f) => front = f,
                        None => return,
                    }
                    continue;
                };
                front.buf.drain(..len);
                // Nothing of the request is needed while it waits.
                front.buf.shrink_to_fit();
                state.request_started();
                let guard = InFlight(state.clone());
                let mut call: Pin<Box<dyn Future<Output = _> + Send>> =
                    Box::pin(tower_service::Service::call(&mut router.clone(), req));
                let res = tokio::select! {
                    res = &mut call => res,
                    () = client_left(&mut front) => {
                        // The handler's future is dropped: what it holds (an offer) goes back.
                        return;
                    }
                };
                drop(call);
                let res = match res {
                    Ok(res) => res,
                    Err(never) => match never {},
                };
                ready = Some(res.map(|body| Body::new(TrackedBody { body, guard })));
                let replay = if close { REPLAY_CLOSE } else { REPLAY };
                front.buf.splice(0..0, replay.iter().copied());
                front.framed = Some(replay.len());
            }
            Next::Framed(len) => front.framed = Some(len),
            Next::Opaque => front.framed = None,
        }
        match session(front, &mut timer, http, router, ready, shutdown, limits).await {
            Some(f) => front = f,
            None => return,
        }
    }
}

/// Reads until the next request's head (and a parked long-poll's body) is in `front.buf`;
/// `None` when the connection is to close: the client closed it, it stayed idle or sent its
/// head too slowly past a timeout, it was evicted for room, or the server shuts down.
async fn next_request(
    front: &mut Front,
    timer: &mut Option<Pin<Box<Sleep>>>,
    shutdown: &CancellationToken,
    limits: &ConnectionLimits,
) -> Option<Next> {
    let state = front.conn.clone();
    loop {
        if shutdown.is_cancelled() || state.evicted.load(Ordering::SeqCst) {
            return None;
        }
        match classify(&front.buf) {
            Some(Next::Park { len, .. }) if front.buf.len() < len => {}
            Some(next) => return Some(next),
            None => {}
        }
        let woken = state.wake.notified();
        arm(timer, state.deadline(limits));
        tokio::select! {
            read = std::future::poll_fn(|cx| front.fill(cx, MAX_HEAD + MAX_PARKED_BODY)) => {
                match read {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
            _ = shutdown.cancelled() => return None,
            _ = woken => {}
            _ = idle_deadline(timer) => {
                if timed_out(&state, limits, &front.stats) {
                    return None;
                }
            }
        }
    }
}

/// Resolves when the client closes its side of the connection (or it fails) while its
/// request waits: hyper notices the same (without `half_close`) and drops the handler.
/// What the client sends meanwhile is kept, up to `MAX_AHEAD`.
async fn client_left(front: &mut Front) {
    loop {
        if front.buf.len() >= MAX_AHEAD {
            return std::future::pending().await;
        }
        match std::future::poll_fn(|cx| front.fill(cx, MAX_AHEAD)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A hyper connection over `front` for the request at its head (`front.framed`), `ready`
/// being its answer when the front made it already. Gives the socket back once the answer is
/// written and the connection is to stay open; `None` when it closed.
async fn session(
    front: Front,
    timer: &mut Option<Pin<Box<Sleep>>>,
    http: &hyper::server::conn::http1::Builder,
    router: &Router,
    ready: Option<hyper::Response<Body>>,
    shutdown: &CancellationToken,
    limits: &ConnectionLimits,
) -> Option<Front> {
    let state = front.conn.clone();
    let stats = front.stats.clone();
    let service = Tracked {
        router: router.clone(),
        conn: state.clone(),
        ready: Mutex::new(ready),
    };
    if front.framed.is_none() {
        // Upgrades: `/acp`'s WebSocket. An upgraded connection leaves this loop (and the cap)
        // once its 101 is written; `/acp` bounds those itself.
        let mut conn = Box::pin(
            http.serve_connection(TokioIo::new(front), service)
                .with_upgrades(),
        );
        let graceful = |c: Pin<&mut _>| {
            hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(c)
        };
        drive(
            conn.as_mut(),
            timer,
            &state,
            &stats,
            shutdown,
            Some(graceful),
            limits,
        )
        .await;
        return None;
    }
    let mut conn = Box::pin(http.serve_connection(TokioIo::new(front), service));
    // Not asked to finish at shutdown (hyper would close one that has not read its request
    // yet without an answer): closed at once between requests, else the request in flight
    // is answered and the front then closes the connection (`Front::poll_read`).
    if !drive(conn.as_mut(), timer, &state, &stats, shutdown, None, limits).await {
        return None;
    }
    let parts = Pin::into_inner(conn).into_parts();
    let mut front = parts.io.into_inner();
    if !front.handed_back {
        return None;
    }
    front.handed_back = false;
    front.framed = None;
    if !parts.read_buf.is_empty() {
        // Never expected: hyper is only ever given one request's bytes.
        front.buf.splice(0..0, parts.read_buf.iter().copied());
    }
    Some(front)
}

/// Runs a hyper connection under the connection's limits; true when it ended by itself
/// (false: timed out, evicted, or closed for the server's shutdown). At shutdown one with
/// a `graceful` way to finish is asked to; another is closed only between requests.
async fn drive<C: Future>(
    mut conn: Pin<&mut C>,
    timer: &mut Option<Pin<Box<Sleep>>>,
    state: &Arc<Conn>,
    stats: &ConnectionStats,
    shutdown: &CancellationToken,
    graceful: Option<fn(Pin<&mut C>)>,
    limits: &ConnectionLimits,
) -> bool {
    let mut shutdown = Some(shutdown);
    loop {
        let woken = state.wake.notified();
        arm(timer, state.deadline(limits));
        tokio::select! {
            _ = conn.as_mut() => return true,
            () = cancelled(shutdown) => {
                if let Some(graceful) = graceful {
                    // Finish the request in flight, then close.
                    graceful(conn.as_mut());
                    let _ = conn.as_mut().await;
                    return false;
                }
                if state.between.load(Ordering::SeqCst) && state.busy.load(Ordering::SeqCst) == 0 {
                    return false;
                }
                // A request is being served: its answer is written, then the front closes.
                shutdown = None;
            }
            _ = woken => {
                if state.evicted.load(Ordering::SeqCst) {
                    return false;
                }
            }
            _ = idle_deadline(timer) => {
                if timed_out(state, limits, stats) {
                    return false;
                }
            }
        }
    }
}

/// Resolves when `shutdown` is cancelled; never without one.
async fn cancelled(shutdown: Option<&CancellationToken>) {
    match shutdown {
        Some(s) => s.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Arms `timer` for the connection's idle or header deadline `at`; no timer without one (a
/// request in flight).
fn arm(timer: &mut Option<Pin<Box<Sleep>>>, at: Option<tokio::time::Instant>) {
    match (at, timer.as_mut()) {
        (Some(at), Some(t)) => t.as_mut().reset(at),
        (Some(at), None) => *timer = Some(Box::pin(tokio::time::sleep_until(at))),
        (None, _) => *timer = None,
    }
}

/// Whether the connection is still idle past its deadline once the timer fired (a request
/// may have started meanwhile); counted when it is.
fn timed_out(state: &Conn, limits: &ConnectionLimits, stats: &ConnectionStats) -> bool {
    let past = state
        .deadline(limits)
        .is_some_and(|d| d <= tokio::time::Instant::now());
    if past {
        stats.timed_out.fetch_add(1, Ordering::Relaxed);
    }
    past
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

/// The socket and what was read from it ahead of a parser, with the write timeout and the
/// start of request heads noted. It is hyper's IO too: hyper reads only the bytes of the
/// request it serves (`framed`), and an end of file once that is answered, which ends the
/// hyper connection and gives the socket back (`handed_back`).
struct Front {
    inner: TcpStream,
    conn: Arc<Conn>,
    stats: Arc<ConnectionStats>,
    write_timeout: Duration,
    /// Armed while a write waits for the peer to read; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Read from the socket, not yet given to hyper or parsed.
    buf: Vec<u8>,
    /// Bytes of its one request hyper has still to read; `None`: hyper has the connection
    /// for good (`Next::Opaque`).
    framed: Option<usize>,
    /// hyper was told the connection ended after its answer; it is not to be shut down.
    handed_back: bool,
    /// The server's: at shutdown no next request goes to hyper.
    shutdown: CancellationToken,
}

impl Front {
    /// Reads what the socket has into `buf`, up to `cap` bytes in all; the count (0: the
    /// client closed).
    fn fill(&mut self, cx: &mut Context<'_>, cap: usize) -> Poll<io::Result<usize>> {
        use bytes::BufMut;
        let room = cap.saturating_sub(self.buf.len()).min(READ_CHUNK);
        if room == 0 {
            // Full: the caller is woken by other means (`Conn::read_waker`).
            return Poll::Pending;
        }
        loop {
            // Readiness first: a parked poll holds no buffer until its client sends something.
            ready!(self.inner.poll_read_ready(cx))?;
            self.buf.reserve(room);
            match self.inner.try_read_buf(&mut (&mut self.buf).limit(room)) {
                Ok(n) => {
                    if n > 0 {
                        self.conn.bytes_read();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.buf.is_empty() {
                        self.buf = Vec::new();
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

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

    /// hyper's request is answered and it reads again. The next request goes to the same
    /// hyper connection when it is one hyper serves alone (`Next::Framed`): a run of ordinary
    /// requests costs one hyper connection, not one each. Before a long-poll, one hyper must
    /// serve for good, the client's end of file or the server's shutdown, an end of file
    /// ends this hyper connection and the socket goes back to the front (`handed_back`).
    fn next_for_hyper(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let next = if self.shutdown.is_cancelled() {
                None
            } else {
                match classify(&self.buf) {
                    Some(Next::Framed(len)) => Some(len),
                    Some(_) => None,
                    None => {
                        self.conn.between.store(true, Ordering::SeqCst);
                        // A head shorter than `MAX_HEAD` is incomplete (`classify`): room left.
                        match ready!(self.fill(cx, MAX_HEAD)) {
                            Ok(0) => None,
                            Ok(_) => continue,
                            Err(e) => {
                                self.conn.between.store(false, Ordering::SeqCst);
                                return Poll::Ready(Err(e));
                            }
                        }
                    }
                }
            };
            self.conn.between.store(false, Ordering::SeqCst);
            match next {
                Some(len) => {
                    let n = self.give(out, len);
                    self.framed = Some(len - n);
                }
                None => self.handed_back = true,
            }
            return Poll::Ready(Ok(()));
        }
    }

    /// Gives hyper the front of `buf`, at most `max` bytes.
    fn give(&mut self, out: &mut ReadBuf<'_>, max: usize) -> usize {
        let n = self.buf.len().min(out.remaining()).min(max);
        out.put_slice(&self.buf[..n]);
        self.buf.drain(..n);
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = Vec::new();
        }
        n
    }
}

impl AsyncRead for Front {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.framed {
            None => {
                if !this.buf.is_empty() {
                    this.give(out, usize::MAX);
                    return Poll::Ready(Ok(()));
                }
                let before = out.filled().len();
                let r = Pin::new(&mut this.inner).poll_read(cx, out);
                if matches!(r, Poll::Ready(Ok(()))) && out.filled().len() > before {
                    this.conn.bytes_read();
                }
                r
            }
            Some(0) => {
                if this.conn.busy.load(Ordering::SeqCst) == 0 {
                    return this.next_for_hyper(cx, out);
                }
                // In flight (hyper looks for the client leaving): what comes is the next
                // request's, kept here; an end of file is the client leaving.
                this.conn.set_read_waker(cx.waker());
                loop {
                    match ready!(this.fill(cx, MAX_AHEAD)) {
                        Ok(0) => return Poll::Ready(Ok(())),
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
            Some(left) => {
                if this.buf.is_empty() {
                    match ready!(this.fill(cx, left.min(MAX_AHEAD))) {
                        Ok(0) => return Poll::Ready(Ok(())),
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                let n = this.give(out, left);
                this.framed = Some(left - n);
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for Front {
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
        let this = self.get_mut();
        if this.handed_back {
            // hyper flushed its answer (`Buffered::poll_shutdown` flushes first); the
            // connection stays open for the front.
            return Poll::Ready(Ok(()));
        }
        this.write_with(cx, |s, cx| s.poll_shutdown(cx))
    }
}

/// The router, with each request counted as in flight until its answer's body is written.
struct Tracked {
    router: Router,
    conn: Arc<Conn>,
    /// The answer to the first request, made already (a parked long-poll's; hyper reads
    /// `REPLAY` for its request).
    ready: Mutex<Option<hyper::Response<Body>>>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = hyper::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let ready = self.ready.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(res) = ready {
            // Counted in flight since the front took the request.
            return Box::pin(std::future::ready(Ok(res)));
        }
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
