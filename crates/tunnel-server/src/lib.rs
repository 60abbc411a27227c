//! The tunnel server: API v1 over HTTP, long-poll dispatch to runners, leases, event streams.
//!
//! [`Server::bind`] opens the store, binds the listener (port 0 works: tests use it) and
//! returns a server whose [`Server::run`] serves until the shutdown token is cancelled.
//!
//! **Architecture Invariant:** the server never spawns processes and holds no SQL; it talks to
//! [`tunnel_store::Store`] only.

mod acp;
mod api;
mod approvals;
mod auth;
mod compat;
mod delivery;
mod error;
mod hub;
mod metrics;
mod openapi;
mod serve;
mod web;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tunnel_store::{Clock, Database, QueueSettings, Store};

pub use acp::AcpLimits;
pub use auth::{WORKER_TOKEN_MIN_LEN, check_worker_token, mint_token};
pub use openapi::openapi_json;
pub use serve::ConnectionLimits;

/// Everything the server needs to start.
#[derive(Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub database: Database,
    /// The original project's shared token; works as an admin token.
    pub worker_token: Option<String>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Longest a long-poll or `?wait=` is held.
    pub max_wait_ms: u64,
    pub queue: QueueSettings,
    pub clock: Arc<dyn Clock>,
    /// Bot tokens and webhooks for delivering answers to `reply_to`.
    pub delivery: tunnel_delivery::PlatformsConfig,
    /// Finished tasks (with their events and deliveries) are removed this long after they
    /// finished; `None` keeps them forever.
    pub retain_finished_ms: Option<i64>,
    /// How often old finished tasks are looked for.
    pub prune_every: std::time::Duration,
    /// Open connections and how long an idle or stalled one may stay.
    pub connections: ConnectionLimits,
    /// Long-polls (claims) one token may have parked at once.
    pub max_polls_per_token: usize,
    /// What `/acp` (ACP over a WebSocket) connections may cost.
    pub acp: AcpLimits,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, database: Database) -> Self {
        ServerConfig {
            listen,
            database,
            worker_token: None,
            max_body_bytes: 4 << 20,
            max_wait_ms: tunnel_protocol::limits::WAIT_MAX_MS,
            queue: QueueSettings::default(),
            clock: Arc::new(tunnel_store::SystemClock),
            delivery: tunnel_delivery::PlatformsConfig::default(),
            retain_finished_ms: Some(DEFAULT_RETAIN_FINISHED_MS),
            prune_every: std::time::Duration::from_secs(600),
            connections: ConnectionLimits::default(),
            max_polls_per_token: DEFAULT_MAX_POLLS_PER_TOKEN,
            acp: AcpLimits::default(),
        }
    }
}

/// Finished tasks are kept a week by default: long enough to look back, short enough that
/// the database does not grow without bound.
pub const DEFAULT_RETAIN_FINISHED_MS: i64 = 7 * 24 * 3600 * 1000;

/// A runner holds one long-poll at a time; 64 leaves room for many runners sharing a token
/// while one token cannot hold a large share of the connection cap.
pub const DEFAULT_MAX_POLLS_PER_TOKEN: usize = 64;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] tunnel_store::StoreError),
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) hub: Arc<hub::Hub>,
    pub(crate) auth: auth::Authenticator,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) max_wait_ms: u64,
    /// The lease a heartbeat grants; runner waits are held at most half of it.
    pub(crate) lease_ms: i64,
    pub(crate) shutdown: CancellationToken,
    pub(crate) platforms: Arc<tunnel_delivery::Platforms>,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) web: web::WebState,
    pub(crate) connections: Arc<serve::ConnectionStats>,
    /// Long-polls parked per token id, bounded by `max_polls_per_token`.
    pub(crate) polls: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    pub(crate) max_polls_per_token: usize,
    pub(crate) acp: Arc<acp::AcpState>,
}

impl Inner {
    /// Counts a long-poll of `token_id` until the guard is dropped; `None` when the token
    /// already has the most allowed.
    pub(crate) fn poll_slot(self: &Arc<Self>, token_id: &str) -> Option<PollSlot> {
        let mut polls = self.polls.lock().unwrap_or_else(|p| p.into_inner());
        let n = polls.entry(token_id.to_owned()).or_default();
        if *n >= self.max_polls_per_token {
            return None;
        }
        *n += 1;
        Some(PollSlot {
            state: self.clone(),
            token_id: token_id.to_owned(),
        })
    }
}

/// One long-poll counted against its token.
pub(crate) struct PollSlot {
    state: AppState,
    token_id: String,
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        let mut polls = self.state.polls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = polls.get_mut(&self.token_id) {
            *n -= 1;
            if *n == 0 {
                polls.remove(&self.token_id);
            }
        }
    }
}

/// Shared by every handler.
pub(crate) type AppState = Arc<Inner>;

/// A bound, ready-to-run server.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    router: axum::Router,
    shutdown: CancellationToken,
    retention: Option<(i64, std::time::Duration)>,
    limits: ConnectionLimits,
}

impl Server {
    /// Opens the store, loads tokens and binds the listener.
    pub async fn bind(config: ServerConfig) -> Result<Server, StartError> {
        if let Some(t) = &config.worker_token {
            check_worker_token(t).map_err(StartError::Config)?;
        }
        let platforms = Arc::new(
            tunnel_delivery::Platforms::new(config.delivery.clone())
                .map_err(|e| StartError::Config(e.to_string()))?,
        );
        let hub = hub::Hub::new();
        let store = Store::open(
            &config.database,
            config.queue.clone(),
            config.clock.clone(),
            hub.clone(),
        )
        .await?;
        let auth = auth::Authenticator::load(&store, config.worker_token.as_deref()).await?;
        let shutdown = CancellationToken::new();
        let state = Arc::new(Inner {
            store,
            hub,
            auth,
            clock: config.clock.clone(),
            max_wait_ms: config.max_wait_ms,
            lease_ms: config.queue.lease_ms,
            shutdown: shutdown.clone(),
            platforms,
            metrics: metrics::Metrics::default(),
            web: web::WebState::default(),
            connections: Arc::default(),
            polls: Default::default(),
            max_polls_per_token: config.max_polls_per_token,
            acp: Arc::new(acp::AcpState::new(
                config.acp.clone(),
                config.max_body_bytes,
            )),
        });
        let router = api::router(state.clone(), config.max_body_bytes);
        let listener = listen(config.listen).map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        if config.connections.max_connections == 0 || config.max_polls_per_token == 0 {
            return Err(StartError::Config(
                "max_connections and max_polls_per_token must be at least 1".into(),
            ));
        }
        let a = &config.acp;
        if a.max_connections == 0
            || a.max_per_token == 0
            || a.max_pending == 0
            || a.max_sessions == 0
            || a.idle_timeout.is_zero()
            || a.max_buffered == 0
        {
            return Err(StartError::Config(
                "the /acp limits must all be at least 1".into(),
            ));
        }
        // `/acp` acts through this server's own API, on loopback.
        let bound = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let ip = match bound.ip() {
            std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        state
            .acp
            .set_api(&format!("http://{}", SocketAddr::new(ip, bound.port())))
            .map_err(StartError::Config)?;
        let retention = match config.retain_finished_ms {
            Some(ms) if ms <= 0 => {
                return Err(StartError::Config(
                    "the retention of finished tasks must be positive (or off)".into(),
                ));
            }
            Some(ms) => Some((
                ms,
                config.prune_every.max(std::time::Duration::from_millis(10)),
            )),
            None => None,
        };
        Ok(Server {
            listener,
            state,
            router,
            shutdown,
            retention,
            limits: config.connections,
        })
    }

    /// The address actually bound (the port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Cancel it to stop the server: long-polls and streams end at once, in-flight requests
    /// finish, then [`Server::run`] returns.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// On a fresh install with no `WORKER_TOKEN`, creates the first admin token and returns
    /// its secret (once); `None` when any token already exists.
    pub async fn bootstrap_admin_token(&self) -> Result<Option<String>, tunnel_store::StoreError> {
        if self.state.auth.has_credentials() || !self.state.store.tokens().await?.is_empty() {
            return Ok(None);
        }
        let created = self
            .state
            .auth
            .create(
                &self.state.store,
                "local-admin".into(),
                tunnel_protocol::Role::Admin,
            )
            .await?;
        Ok(Some(created.token))
    }

    /// A runner token that exists only in this process's memory, for a runner started in the
    /// same process (`tunnel up`). It never reaches the database.
    pub fn local_runner_token(&self) -> String {
        self.state
            .auth
            .ephemeral("local", tunnel_protocol::Role::Runner)
    }

    /// Serves until the shutdown token is cancelled.
    pub async fn run(self) -> std::io::Result<()> {
        let timer = tokio::spawn(deadline_timer(self.state.clone()));
        let sender = tokio::spawn(delivery::worker(
            self.state.clone(),
            self.state.platforms.clone(),
        ));
        let tokens = tokio::spawn(token_reloader(self.state.clone()));
        let returner = tokio::spawn(offer_returner(self.state.clone()));
        let pruner = self
            .retention
            .map(|(keep, every)| tokio::spawn(pruner(self.state.clone(), keep, every)));
        let result = serve::serve(
            self.listener,
            self.router,
            self.shutdown.clone(),
            self.limits,
            self.state.connections.clone(),
        )
        .await;
        self.shutdown.cancel();
        let _ = timer.await;
        let _ = sender.await;
        let _ = tokens.await;
        let _ = returner.await;
        if let Some(p) = pruner {
            let _ = p.await;
        }
        // Every connection has finished its request: nothing writes any more.
        self.state.store.close().await;
        result
    }
}

/// Re-reads the token table when another server (sharing a PostgreSQL store) changed it, so a
/// token created or revoked there works or stops working here too.
async fn token_reloader(state: AppState) {
    loop {
        tokio::select! {
            _ = state.hub.tokens_woken() => {
                if let Err(e) = state.auth.reload(&state.store).await {
                    tracing::error!(error = %e, "Reloading tokens failed.");
                }
            }
            _ = state.shutdown.cancelled() => return,
        }
    }
}

/// Gives back the offers (and confirmed starts) claimed for a long-poll that was gone when
/// they came (the store's writer claims for parked polls, `Signals::take_parked`), so each
/// task is offered again now rather than when its ack deadline or lease passes.
async fn offer_returner(state: AppState) {
    loop {
        let woken = state.hub.returned_woken();
        tokio::pin!(woken);
        woken.as_mut().enable();
        for r in state.hub.take_returned() {
            let given = if r.started {
                state.store.return_start(&r.task_id, &r.at).await
            } else {
                state.store.return_offer(&r.task_id, &r.at).await
            };
            // Else its ack deadline (an offer) or its lease (a start) still gives it back.
            if let Err(e) = given {
                tracing::warn!(task_id = %r.task_id, error = %e, "Giving back a task failed.");
            }
        }
        tokio::select! {
            _ = &mut woken => {}
            _ = state.shutdown.cancelled() => return,
        }
    }
}

/// Removes tasks finished more than `keep` ms ago, every `every`, in batches so the writer
/// is never held long.
async fn pruner(state: AppState, keep: i64, every: std::time::Duration) {
    const BATCH: u32 = 500;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = state.shutdown.cancelled() => return,
        }
        let before = state.clock.now_ms() - keep;
        let mut total = tunnel_store::Pruned::default();
        loop {
            match state.store.prune(before, BATCH).await {
                Ok(p) => {
                    total.tasks += p.tasks;
                    total.events += p.events;
                    total.deliveries += p.deliveries;
                    total.runners += p.runners;
                    if p.tasks < u64::from(BATCH) && p.deliveries < u64::from(BATCH) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Removing old finished tasks failed; will retry.");
                    break;
                }
            }
            if state.shutdown.is_cancelled() {
                return;
            }
        }
        state
            .metrics
            .pruned_tasks
            .fetch_add(total.tasks, std::sync::atomic::Ordering::Relaxed);
        if total != tunnel_store::Pruned::default() {
            tracing::info!(
                tasks = total.tasks,
                events = total.events,
                deliveries = total.deliveries,
                runners = total.runners,
                "Removed data older than the retention."
            );
        }
    }
}

/// Moves tasks whose deadline passed (offer not acked, lease expired, parked time reached)
/// and expires approval requests nobody answered in time.
/// Sleeps until the next deadline; woken early when an earlier one appears.
async fn deadline_timer(state: AppState) {
    loop {
        let woken = state.hub.timer_woken();
        tokio::pin!(woken);
        woken.as_mut().enable();
        // While recomputing, any new deadline must wake us.
        state.hub.set_timer_target(None);
        let next = match state.store.expire_due().await {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "Expiring deadlines failed; retrying in 1 s.");
                Some(state.clock.now_ms() + 1_000)
            }
        };
        state.hub.set_timer_target(next);
        let sleep = state.clock.sleep_until(next.unwrap_or(i64::MAX));
        tokio::select! {
            _ = sleep, if next.is_some() => {}
            _ = &mut woken => {}
            _ = state.shutdown.cancelled() => return,
        }
    }
}

/// Connections the kernel queues for `accept` (capped by `net.core.somaxconn`, 4,096 by
/// default). `TcpListener::bind` asks for 128, which overflows when many runners connect at
/// once (a restart, 10,000 parked polls opened in waves): each handshake the kernel drops costs
/// its client a retransmit 1, 3, 7 s later, and a client's connect timeout can run out first.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds and listens as `TcpListener::bind` does, with a longer accept queue.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind`: a restarted server can listen again at once.
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
