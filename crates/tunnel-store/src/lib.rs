//! The tunnel task store.
//!
//! One API, [`Store`], over the queue's durable state: tasks and their attempts, the event log,
//! runners, session bindings and tokens. The server calls it and never sees SQL.
//!
//! **Architecture Invariant:** this crate is the only one that contains SQL.
//!
//! Backends: SQLite (embedded, the default; see `sqlite.rs`) and PostgreSQL (several servers
//! on one database; see `postgres.rs`). Every method is async, takes protocol types, and
//! reports what changed through [`Signals`] after commit; with PostgreSQL, also what other
//! servers committed (LISTEN/NOTIFY, with a fallback poll).

mod clock;
mod model;
mod postgres;
mod sqlite;

use std::sync::Arc;

pub use clock::{Clock, ManualClock, Sleep, SystemClock};
use tunnel_protocol::{
    AppendAck, AppendEvents, Approval, ApprovalAnswer, ApprovalRequest, ApprovalState, AttemptRef,
    ClaimRequest, FinishRequest, LeaseStatus, Offer, ReportedSession, Role, RunnerInfo,
    SessionBinding, SessionCommand, SessionList, SubmitTask, Task, TaskEvent, TaskState, TokenInfo,
};

/// What can go wrong in the store. Each variant maps to one HTTP status in the server.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The caller's attempt is not the task's current one, or its lease/offer ran out.
    #[error("{0}")]
    Stale(String),
    /// The request is valid but the task's state does not allow it.
    #[error("{0}")]
    Conflict(String),
    /// An approval request was already settled (`already_decided`) or ran out of time
    /// (`approval_expired`); the message says how and by whom.
    #[error("{message}")]
    Settled { code: &'static str, message: String },
    /// The submitting token already has as many waiting tasks as it may (the per-token cap).
    #[error("{0}")]
    QueueFull(String),
    /// The database cannot be used right now.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// An error PostgreSQL reported that is not an outage (a constraint, a bad query).
    #[error("PostgreSQL error {code}: {message}")]
    Postgres { code: String, message: String },
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// About how many bytes of events one [`Store::events`] page holds.
pub const EVENT_PAGE_BYTES: usize = 256 << 10;

/// Timing of the task model.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// How long a runner has to ack an offer.
    pub ack_timeout_ms: i64,
    /// How long a lease lasts without a heartbeat.
    pub lease_ms: i64,
    /// A runner seen within this window counts as online.
    pub runner_online_ms: i64,
    /// A task still queued this long after its submission ends `timed_out`, with a reason
    /// that says so (no runner took it). `None`: no limit.
    pub max_queue_ms: Option<i64>,
    /// Most tasks one token may have waiting (queued or parked); a submit beyond it is
    /// refused. `None`: no cap.
    pub max_queued_per_token: Option<u32>,
    /// Events a runner may store per task; past it (or `max_task_event_bytes`) one
    /// `truncated` event is written and later ones are dropped. The server's own events
    /// (state changes, approvals) and the task's result are always kept.
    pub max_task_events: u64,
    /// Bytes (kind plus JSON data) of events stored per task.
    pub max_task_event_bytes: u64,
}

/// The default maximum time in queue: 7 days.
pub const DEFAULT_MAX_QUEUE_MS: i64 = 7 * 24 * 3600 * 1000;
/// The default cap on one token's waiting tasks.
pub const DEFAULT_MAX_QUEUED_PER_TOKEN: u32 = 10_000;

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            ack_timeout_ms: 15_000,
            lease_ms: 30_000,
            runner_online_ms: 90_000,
            max_queue_ms: Some(DEFAULT_MAX_QUEUE_MS),
            max_queued_per_token: Some(DEFAULT_MAX_QUEUED_PER_TOKEN),
            // A long Claude Code session is a few thousand events of at most a few KB (tool
            // output is cut to 2,000 characters): both limits leave ten times that.
            max_task_events: 100_000,
            max_task_event_bytes: 64 << 20,
        }
    }
}

/// How hard SQLite works to keep a commit across a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// WAL with `synchronous=NORMAL`: a commit survives the server process being killed, but
    /// the last commits may be lost if the machine loses power.
    #[default]
    Normal,
    /// WAL with `synchronous=FULL`: a commit is on disk before it is acknowledged.
    Full,
}

/// A task became ready to offer; the server wakes one runner that matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyHint {
    pub task_id: String,
    pub agent: String,
    pub project: Option<String>,
    /// The runner that holds the task's session, if it must run there.
    pub runner: Option<String>,
}

/// What a claim also does in its own write when the runner never acks (the original
/// openclaw-tunnel runner): it acks the offer at once, and says what the server needs to hand
/// the task on, so a dispatch is one committed write and no read after it.
#[derive(Clone, Copy)]
pub struct StartAtClaim {
    /// Why this runner cannot run the task, if it cannot: the task is finished `failed` with
    /// that error and the next one is claimed.
    pub refuse: fn(&Task) -> Option<String>,
    /// The attempt's lease, from the task; `None`: the configured lease.
    pub lease_ms: Option<fn(&Task) -> i64>,
    /// Whether the runner has the offer once it is answered (an original runner never says
    /// so) or the attempt stays unconfirmed until the runner makes a call about it, as an ack
    /// in a claim with `ack` does ([`Store::ack_for_claim`]).
    pub confirm: bool,
    /// The agent session the runner would be handed; [`Started::may_resume`] says whether
    /// the task's owner may resume it ([`Store::may_resume`]).
    pub wanted_session: fn(&Task) -> Option<String>,
}

/// A task claimed and acked in one write ([`Store::claim_and_start`]).
#[derive(Debug)]
pub struct Started {
    /// The offer, its `lease` set.
    pub offer: Offer,
    /// Whether the task's owner may resume [`StartAtClaim::wanted_session`] (false when none).
    pub may_resume: bool,
    /// [`Store::conversation_owner`] of the task (may be `None` when it has no conversation).
    pub conv_owner: Option<String>,
}

/// A parked long-poll as a write that makes a task ready finds it ([`Signals::take_parked`]):
/// what it would claim with, and where the claim's answer goes.
pub struct ParkedClaim {
    pub req: Arc<ClaimRequest>,
    /// The runner token it claims as ([`Store::claim_as`]).
    pub token: Arc<str>,
    /// Claim and ack ([`Store::claim_and_start`]) rather than only claim.
    pub start: Option<StartAtClaim>,
    pub answer: tokio::sync::oneshot::Sender<Handoff>,
}

/// What a parked long-poll is woken with.
#[derive(Debug)]
pub enum Handoff {
    /// A task it may take became ready: it claims for itself.
    Ready(ReadyHint),
    /// Claimed for it in the transaction that made the task ready, and committed.
    Offered(Box<Offer>),
    /// Claimed and acked for it ([`ParkedClaim::start`]), and committed.
    Started(Box<Started>),
    /// The claim made for it failed.
    Failed(StoreError),
}

/// Told, after each commit, what changed. The server implements it to wake long-polls,
/// watchers and its deadline timer. Implementations must not block.
pub trait Signals: Send + Sync + 'static {
    fn task_ready(&self, hint: &ReadyHint);
    /// Called before the commit of a write that made a task ready (SQLite's writer): the
    /// parked long-poll `task_ready` would wake for it, taken out of line, so the writer claims
    /// for it in the same transaction and hands it the answer ([`ParkedClaim::answer`]) after
    /// the commit. `None` (the default): `task_ready` after the commit, as before.
    fn take_parked(&self, _hint: &ReadyHint) -> Option<ParkedClaim> {
        None
    }
    /// A claim made for a parked long-poll that did not reach it (the poll was gone): an
    /// offer to give back ([`Store::return_offer`]).
    fn handoff_lost(&self, _lost: Handoff) {}
    fn task_changed(&self, task_id: &str);
    /// A deadline (offer ack, lease, parked time) now exists at this time.
    fn deadline(&self, at_ms: i64);
    /// Something was added to the outbox.
    fn delivery_ready(&self) {}
    /// A token was created or revoked by another server on the same database (PostgreSQL):
    /// re-read the tokens. Never called for this process's own writes.
    fn tokens_changed(&self) {}
}

/// Which tasks a caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    /// Only tasks submitted with this token.
    Owner(String),
}

/// Filters for listing approval requests.
#[derive(Debug, Clone, Default)]
pub struct ApprovalFilter {
    pub state: Option<ApprovalState>,
    /// Only this task's requests.
    pub task: Option<String>,
    pub limit: u32,
}

/// Filters for listing tasks.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub state: Option<TaskState>,
    pub conversation: Option<String>,
    pub agent: Option<String>,
    /// The runner it was last offered to.
    pub runner: Option<String>,
    /// Text the prompt contains (case-insensitive for ASCII).
    pub search: Option<String>,
    /// With `search`: only the newest this many tasks (of every owner, before the `before`
    /// cursor) are searched, so a search that matches nothing costs a bounded scan. 0: all.
    pub search_depth: u32,
    /// Keyset pagination: only tasks submitted before this task (by id).
    pub before: Option<String>,
    pub limit: u32,
}

impl TaskFilter {
    /// The `WHERE` clause (without the keyword, `TRUE` when empty) and its text parameters,
    /// numbered from 1 by `ph`. Only the filters given become conditions, so each query can
    /// use the index that fits (`state IS NULL OR …` would defeat it).
    pub(crate) fn where_clause(
        &self,
        scope: &Scope,
        ph: impl Fn(usize) -> String,
        dialect: Dialect,
    ) -> (String, Vec<String>) {
        let like = match dialect {
            Dialect::Sqlite => "LIKE",
            Dialect::Postgres => "ILIKE",
        };
        let mut conds: Vec<String> = Vec::new();
        let mut params: Vec<String> = Vec::new();
        // Conditions without a parameter.
        let mut unnumbered: Vec<String> = Vec::new();
        let mut add = |sql: &dyn Fn(&str) -> String, value: String| {
            params.push(value);
            conds.push(sql(&ph(params.len())));
        };
        // A state is written as a literal with the condition of the partial index that holds
        // the tasks in it (migration 0019): a planner proves a partial index usable from the
        // query's text, not from a bound value.
        if let Some(s) = self.state {
            unnumbered.push(state_condition(s));
        }
        // Offered and running tasks are few (at most what the runners can take), so their
        // state's index is always the one to read. SQLite plans without statistics and would
        // rather walk an owner's or a runner's every task in seq order (no sort): a unary `+`
        // keeps it off those indexes.
        let col = |c: &str| -> String {
            match (dialect, self.state) {
                (Dialect::Sqlite, Some(s)) if in_flight(s) => format!("+{c}"),
                _ => c.to_owned(),
            }
        };
        if let Some(c) = &self.conversation {
            let c_ = col("conversation");
            add(&|p| format!("{c_} = {p}"), c.clone());
        }
        if let Some(a) = &self.agent {
            add(&|p| format!("agent = {p}"), a.clone());
        }
        if let Some(r) = &self.runner {
            let c_ = col("runner");
            add(&|p| format!("{c_} = {p}"), r.clone());
        }
        if let Scope::Owner(o) = scope {
            let c_ = col("owner");
            add(&|p| format!("{c_} = {p}"), o.clone());
        }
        if let Some(q) = self.search.as_deref().filter(|q| !q.is_empty()) {
            if self.search_depth > 0 {
                let depth = self.search_depth;
                match &self.before {
                    Some(b) => add(
                        &|p| {
                            format!("seq >= (SELECT b.seq FROM tasks b WHERE b.id = {p}) - {depth}")
                        },
                        b.clone(),
                    ),
                    None => unnumbered.push(format!(
                        "seq > (SELECT COALESCE(MAX(m.seq), 0) FROM tasks m) - {depth}"
                    )),
                }
            }
            let escaped = q
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            add(
                &|p| format!("prompt {like} {p} ESCAPE '\\'"),
                format!("%{escaped}%"),
            );
        }
        if let Some(b) = &self.before {
            add(
                &|p| format!("seq < (SELECT b.seq FROM tasks b WHERE b.id = {p})"),
                b.clone(),
            );
        }
        conds.extend(unnumbered);
        if conds.is_empty() {
            ("TRUE".into(), params)
        } else {
            (conds.join(" AND "), params)
        }
    }
}

/// The SQL a store speaks, where [`TaskFilter::where_clause`] differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// Offered, running or cancelling: an attempt holds it.
fn in_flight(s: TaskState) -> bool {
    matches!(
        s,
        TaskState::Offered | TaskState::Running | TaskState::Cancelling
    )
}

/// Tasks in state `s`, as the condition of the partial index that holds them (migration
/// 0019) and the state itself, both literals.
pub(crate) fn state_condition(s: TaskState) -> String {
    let group = match s {
        TaskState::Queued | TaskState::Parked => "state IN ('queued', 'parked')",
        TaskState::Offered => "state = 'offered'",
        TaskState::Running | TaskState::Cancelling => "state IN ('running', 'cancelling')",
        // A finished task's `finished_at` is set in the same statement as its state.
        _ => "finished_at IS NOT NULL",
    };
    format!("{group} AND state = '{}'", s.as_str())
}

/// Tasks by state, each group counted in its own partial index (see [`state_condition`]):
/// no index over every task's state is kept up to date at each transition.
pub(crate) const COUNT_BY_STATE: &str =
    "SELECT state, COUNT(*) FROM tasks WHERE finished_at IS NOT NULL GROUP BY state
     UNION ALL SELECT state, COUNT(*) FROM tasks WHERE state IN ('queued', 'parked') GROUP BY state
     UNION ALL SELECT state, COUNT(*) FROM tasks WHERE state = 'offered' GROUP BY state
     UNION ALL SELECT state, COUNT(*) FROM tasks WHERE state IN ('running', 'cancelling')
        GROUP BY state
     ORDER BY 1";

/// What the dashboard's overview counts (see [`Store::overview`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overview {
    /// Per agent: tasks waiting (queued or parked) and when the oldest was submitted.
    pub queues: Vec<AgentQueue>,
    /// Per minute (start, ms), from the minute of the asked time on: tasks that succeeded,
    /// and that ended otherwise (failed, cancelled, timed out).
    pub finished_per_minute: Vec<(i64, u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentQueue {
    pub agent: String,
    pub waiting: u64,
    pub oldest_created_at: i64,
}

/// A dashboard sign-in kept in the store (only the SHA-256 of its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSession {
    pub token_id: String,
    pub role: Role,
    pub expires_at: i64,
}

/// What a [`WebSession`] row is: a session cookie, or a one-time sign-in code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebSessionKind {
    Session,
    Code,
}

impl WebSessionKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WebSessionKind::Session => "session",
            WebSessionKind::Code => "code",
        }
    }
}

/// A stored token (the secret itself is never stored, only its SHA-256).
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub info: TokenInfo,
    pub secret_sha256: [u8; 32],
}

/// What an outbox row is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryKind {
    /// Post the "working…" message.
    Progress,
    /// Edit the "working…" message with the latest progress.
    Edit,
    /// Post the final answer (possibly in several parts).
    Final,
    /// POST the final state to a webhook.
    Webhook,
    /// A plain message (`POST /notify`).
    Notify,
    /// Post an approval question (body `{"approval": id}`).
    Approval,
    /// Edit a posted approval question to its outcome (body `{"approval": id}`).
    ApprovalEdit,
}

impl DeliveryKind {
    fn parse(s: &str) -> Option<DeliveryKind> {
        Some(match s {
            "progress" => DeliveryKind::Progress,
            "edit" => DeliveryKind::Edit,
            "final" => DeliveryKind::Final,
            "webhook" => DeliveryKind::Webhook,
            "notify" => DeliveryKind::Notify,
            "approval" => DeliveryKind::Approval,
            "approval_edit" => DeliveryKind::ApprovalEdit,
            _ => return None,
        })
    }
}

/// A message due for delivery, with what is needed to render it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: i64,
    pub kind: DeliveryKind,
    pub target: tunnel_protocol::ReplyTo,
    /// For `Notify`: `{"text": …}`.
    pub body: Option<serde_json::Value>,
    pub attempts: u32,
    /// Parts of a split message already sent (resume after a crash or a retry).
    pub done_parts: u32,
    /// The task it is about, as it is now.
    pub task: Option<Task>,
    /// The "working…" message of the task, once posted (for `Edit`).
    pub progress_message: Option<String>,
    /// For `Approval` and `ApprovalEdit`: the request, as it is now.
    pub approval: Option<tunnel_protocol::Approval>,
    /// For `ApprovalEdit`: the message that asked the question, once posted.
    pub approval_message: Option<String>,
}

/// What happened to a delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryUpdate {
    /// Some parts of a split message went out.
    Parts {
        done_parts: u32,
        message_id: Option<String>,
    },
    Sent {
        message_id: Option<String>,
    },
    /// Try again at this time (a failed attempt: counts towards giving up).
    Retry {
        at: i64,
        error: String,
    },
    /// Try again at this time, as the platform asked (a rate limit's `retry_after`): not a
    /// failure, so not counted as an attempt. A long 429 storm must not use up the attempts
    /// that a 5xx or a network error is allowed afterwards.
    Wait {
        at: i64,
        error: String,
    },
    /// Given up.
    Failed {
        error: String,
    },
}

/// A task's current attempt and its lease token (see [`Store::current_attempt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentAttempt {
    pub attempt: u32,
    pub lease_token: String,
    /// The runner it was offered to.
    pub runner: Option<String>,
    pub state: TaskState,
}

impl CurrentAttempt {
    pub fn attempt_ref(&self) -> AttemptRef {
        AttemptRef {
            attempt: self.attempt,
            lease_token: self.lease_token.clone(),
        }
    }
}

/// Counts for readiness and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub by_state: Vec<(TaskState, u64)>,
}

/// What one [`Store::prune`] call removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub tasks: u64,
    pub events: u64,
    pub deliveries: u64,
    pub runners: u64,
}

/// The store. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct Store {
    backend: Arc<Backend>,
}

enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

/// Where to keep the data.
#[derive(Debug, Clone)]
pub enum Database {
    Sqlite {
        path: std::path::PathBuf,
        durability: Durability,
    },
    /// A PostgreSQL URL (`postgres://user@host:port/db`); several servers may share it.
    Postgres { url: String },
}

impl Database {
    /// Parses `postgres://…` / `postgresql://…` (PostgreSQL), or `sqlite:PATH`,
    /// `sqlite://PATH` or a bare path (SQLite).
    pub fn parse(s: &str) -> std::result::Result<Database, String> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            s.parse::<tokio_postgres::Config>()
                .map_err(|e| format!("bad PostgreSQL URL: {e}"))?;
            return Ok(Database::Postgres { url: s.to_owned() });
        }
        let path = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
            .unwrap_or(s);
        if path.is_empty() {
            return Err("the database path is empty".into());
        }
        Ok(Database::Sqlite {
            path: path.into(),
            durability: Durability::Normal,
        })
    }
}

impl Store {
    /// PostgreSQL's group commit: groups committed, operations kept, operations rolled back
    /// inside a group, operations queued or running (`None` on SQLite).
    #[cfg(test)]
    fn pg_group_counters(&self) -> Option<[u64; 4]> {
        match &*self.backend {
            Backend::Postgres(pg) => Some(pg.group_counters()),
            Backend::Sqlite(_) => None,
        }
    }

    /// Opens (creating if needed) and migrates the database.
    pub async fn open(
        db: &Database,
        settings: QueueSettings,
        clock: Arc<dyn Clock>,
        signals: Arc<dyn Signals>,
    ) -> Result<Store> {
        let backend = match db {
            Database::Sqlite { path, durability } => Backend::Sqlite(
                sqlite::SqliteStore::open(path, *durability, settings, clock, signals).await?,
            ),
            Database::Postgres { url } => {
                Backend::Postgres(postgres::PgStore::open(url, settings, clock, signals).await?)
            }
        };
        Ok(Store {
            backend: Arc::new(backend),
        })
    }

    /// Submits a task; with an idempotency key already used by `owner`, returns the first task
    /// and `false`.
    pub async fn submit(
        &self,
        owner: &str,
        idempotency_key: Option<String>,
        req: SubmitTask,
    ) -> Result<(Task, bool)> {
        match &*self.backend {
            Backend::Sqlite(s) => s.submit(owner.to_owned(), idempotency_key, req).await,
            Backend::Postgres(s) => s.submit(owner.to_owned(), idempotency_key, req).await,
        }
    }

    pub async fn task(&self, id: &str, scope: &Scope) -> Result<Task> {
        match &*self.backend {
            Backend::Sqlite(s) => s.task(id.to_owned(), scope.clone()).await,
            Backend::Postgres(s) => s.task(id.to_owned(), scope.clone()).await,
        }
    }

    pub async fn tasks(&self, filter: TaskFilter, scope: &Scope) -> Result<Vec<Task>> {
        match &*self.backend {
            Backend::Sqlite(s) => s.tasks(filter, scope.clone()).await,
            Backend::Postgres(s) => s.tasks(filter, scope.clone()).await,
        }
    }

    /// Cancels a queued, parked or offered task at once; a running one goes to `cancelling`
    /// and its runner learns it on the next heartbeat.
    pub async fn cancel(&self, id: &str, scope: &Scope) -> Result<Task> {
        match &*self.backend {
            Backend::Sqlite(s) => s.cancel(id.to_owned(), scope.clone()).await,
            Backend::Postgres(s) => s.cancel(id.to_owned(), scope.clone()).await,
        }
    }

    /// Offers the oldest ready task this runner can take, or `None`. Never waits.
    ///
    /// With `req.ack`, the offer is marked unconfirmed (see [`Store::ack_for_claim`]), and an
    /// attempt offered to this runner by an earlier such claim that it has not confirmed (and
    /// does not list in `holding`) comes first, offered again: with `lease` when it has
    /// started, without when it still waits for its ack.
    pub async fn claim(&self, req: &ClaimRequest) -> Result<Option<Offer>> {
        match &*self.backend {
            Backend::Sqlite(s) => s.claim(req.clone(), None).await,
            Backend::Postgres(s) => s.claim(req.clone(), None).await,
        }
    }

    /// [`Store::claim`] by a runner token: the runner's name belongs to the token that first
    /// claimed under it, and another token's claim under that name is refused (`Conflict`)
    /// without changing anything.
    pub async fn claim_as(&self, req: &ClaimRequest, token_id: &str) -> Result<Option<Offer>> {
        let token = Some(token_id.to_owned());
        match &*self.backend {
            Backend::Sqlite(s) => s.claim(req.clone(), token).await,
            Backend::Postgres(s) => s.claim(req.clone(), token).await,
        }
    }

    /// [`Store::claim_as`], and the offer acked in the same write with the lease `start` gives
    /// (a task `start` refuses is finished `failed` and the next one claimed). SQLite: one
    /// write; PostgreSQL: the claim, the reads and the ack one after the other.
    pub async fn claim_and_start(
        &self,
        req: &ClaimRequest,
        token_id: &str,
        start: StartAtClaim,
    ) -> Result<Option<Started>> {
        match &*self.backend {
            Backend::Sqlite(s) => {
                s.claim_and_start(req.clone(), token_id.to_owned(), start)
                    .await
            }
            Backend::Postgres(s) => loop {
                let token = Some(token_id.to_owned());
                let Some(mut offer) = s.claim(req.clone(), token).await? else {
                    return Ok(None);
                };
                let id = offer.task.id.clone();
                let at = AttemptRef {
                    attempt: offer.attempt,
                    lease_token: offer.lease_token.clone(),
                };
                if let Some(error) = (start.refuse)(&offer.task) {
                    s.finish(id, refused(&at, error)).await?;
                    continue;
                }
                let may_resume = match (start.wanted_session)(&offer.task) {
                    Some(w) => s.may_resume(id.clone(), w).await?,
                    None => false,
                };
                let conv_owner = match offer.task.conversation {
                    Some(_) => s.conversation_owner(id.clone()).await?,
                    None => None,
                };
                let lease_ms = start.lease_ms.map(|f| f(&offer.task).max(1));
                offer.lease = Some(s.ack(id, at, lease_ms, start.confirm).await?);
                return Ok(Some(Started {
                    offer,
                    may_resume,
                    conv_owner,
                }));
            },
        }
    }

    /// Gives back an offer its long-poll never answered with (the poll was gone when the
    /// claim made for it came): the task is queued again now, as its ack deadline would.
    /// `false` when the attempt is no longer that offer (acked, ended, or already requeued).
    pub async fn return_offer(&self, id: &str, at: &AttemptRef) -> Result<bool> {
        match &*self.backend {
            Backend::Sqlite(s) => s.return_offer(id.to_owned(), at.clone()).await,
            Backend::Postgres(s) => s.return_offer(id.to_owned(), at.clone()).await,
        }
    }

    /// Whether the owner of task `id` may resume the agent session `session_id` (the rule of
    /// `session: {resume}`): an admin's task may resume any; a client's only a session its own
    /// tasks made or a shared one (an admin's, or found on a runner's disk).
    pub async fn may_resume(&self, id: &str, session_id: &str) -> Result<bool> {
        match &*self.backend {
            Backend::Sqlite(s) => s.may_resume(id.to_owned(), session_id.to_owned()).await,
            Backend::Postgres(s) => s.may_resume(id.to_owned(), session_id.to_owned()).await,
        }
    }

    /// The namespace task `id`'s conversation is in: the client token that owns it, or `None`
    /// for the shared namespace of admin tokens. Conversation names are scoped by it.
    pub async fn conversation_owner(&self, id: &str) -> Result<Option<String>> {
        match &*self.backend {
            Backend::Sqlite(s) => s.conversation_owner(id.to_owned()).await,
            Backend::Postgres(s) => s.conversation_owner(id.to_owned()).await,
        }
    }

    /// The runner acks its offer: the attempt starts (a repeated ack answers the same).
    pub async fn ack(&self, id: &str, attempt: &AttemptRef) -> Result<LeaseStatus> {
        match &*self.backend {
            Backend::Sqlite(s) => s.ack(id.to_owned(), attempt.clone(), None, true).await,
            Backend::Postgres(s) => s.ack(id.to_owned(), attempt.clone(), None, true).await,
        }
    }

    /// The server acks an offer for its runner, in the claim (with `ack`) that made it: the
    /// attempt starts, and stays unconfirmed until the runner makes a call about it (ack,
    /// heartbeat, events, finish) or lists it in a claim's `holding`. Until then, that
    /// runner's claims with `ack` get the offer again, whichever server answers them and
    /// however many times it restarted (the answer that brought it may have been lost).
    pub async fn ack_for_claim(&self, id: &str, attempt: &AttemptRef) -> Result<LeaseStatus> {
        match &*self.backend {
            Backend::Sqlite(s) => s.ack(id.to_owned(), attempt.clone(), None, false).await,
            Backend::Postgres(s) => s.ack(id.to_owned(), attempt.clone(), None, false).await,
        }
    }

    /// Acks with a lease of `lease_ms` instead of the configured one, for a runner that never
    /// heartbeats (the original openclaw-tunnel runner): the lease covers the whole run.
    /// Heartbeats and events never shorten it.
    pub async fn ack_with_lease(
        &self,
        id: &str,
        attempt: &AttemptRef,
        lease_ms: i64,
    ) -> Result<LeaseStatus> {
        let lease_ms = Some(lease_ms.max(1));
        match &*self.backend {
            Backend::Sqlite(s) => s.ack(id.to_owned(), attempt.clone(), lease_ms, true).await,
            Backend::Postgres(s) => s.ack(id.to_owned(), attempt.clone(), lease_ms, true).await,
        }
    }

    /// The task's current attempt with its lease token, `None` when no attempt holds it (never
    /// offered, or queued again). For a server acting for a runner that does not carry its
    /// lease (the openclaw-tunnel compatibility routes); never sent over the wire.
    pub async fn current_attempt(&self, id: &str) -> Result<Option<CurrentAttempt>> {
        match &*self.backend {
            Backend::Sqlite(s) => s.current_attempt(id.to_owned()).await,
            Backend::Postgres(s) => s.current_attempt(id.to_owned()).await,
        }
    }

    pub async fn heartbeat(&self, id: &str, attempt: &AttemptRef) -> Result<LeaseStatus> {
        match &*self.backend {
            Backend::Sqlite(s) => s.heartbeat(id.to_owned(), attempt.clone()).await,
            Backend::Postgres(s) => s.heartbeat(id.to_owned(), attempt.clone()).await,
        }
    }

    pub async fn append_events(&self, id: &str, req: AppendEvents) -> Result<AppendAck> {
        match &*self.backend {
            Backend::Sqlite(s) => s.append_events(id.to_owned(), req).await,
            Backend::Postgres(s) => s.append_events(id.to_owned(), req).await,
        }
    }

    pub async fn finish(&self, id: &str, req: FinishRequest) -> Result<Task> {
        match &*self.backend {
            Backend::Sqlite(s) => s.finish(id.to_owned(), req).await,
            Backend::Postgres(s) => s.finish(id.to_owned(), req).await,
        }
    }

    /// The task's state and the seq of its last event, read together: a log read up to that
    /// seq is consistent with the state.
    pub async fn event_log_end(&self, id: &str, scope: &Scope) -> Result<(TaskState, u64)> {
        match &*self.backend {
            Backend::Sqlite(s) => s.event_log_end(id.to_owned(), scope.clone()).await,
            Backend::Postgres(s) => s.event_log_end(id.to_owned(), scope.clone()).await,
        }
    }

    /// Events with `seq > after`, oldest first, and the task's state when read: at most
    /// `limit` of them, and no more than about [`EVENT_PAGE_BYTES`] (at least one event), so a
    /// read of a large log holds one page at a time.
    pub async fn events(
        &self,
        id: &str,
        scope: &Scope,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<TaskEvent>, TaskState)> {
        match &*self.backend {
            Backend::Sqlite(s) => s.events(id.to_owned(), scope.clone(), after, limit).await,
            Backend::Postgres(s) => s.events(id.to_owned(), scope.clone(), after, limit).await,
        }
    }

    /// The last `n` events of a task, oldest first (for progress messages), and no more than
    /// about [`EVENT_PAGE_BYTES`] of them (at least one).
    pub async fn last_events(&self, id: &str, n: u32) -> Result<Vec<TaskEvent>> {
        match &*self.backend {
            Backend::Sqlite(s) => s.last_events(id.to_owned(), n).await,
            Backend::Postgres(s) => s.last_events(id.to_owned(), n).await,
        }
    }

    /// Moves every task whose deadline has passed (offer not acked, lease expired, parked
    /// time reached) and returns the next deadline, if any.
    pub async fn expire_due(&self) -> Result<Option<i64>> {
        match &*self.backend {
            Backend::Sqlite(s) => s.expire_due().await,
            Backend::Postgres(s) => s.expire_due().await,
        }
    }

    /// A runner stopped cleanly: offline from now until its next claim. Only the token the
    /// name belongs to (the one that first claimed under it) may say so: false, and nothing
    /// changed, for any other token or a name never seen.
    pub async fn runner_left(&self, name: &str, token_id: &str) -> Result<bool> {
        let (name, token_id) = (name.to_owned(), token_id.to_owned());
        match &*self.backend {
            Backend::Sqlite(s) => s.runner_left(name, token_id).await,
            Backend::Postgres(s) => s.runner_left(name, token_id).await,
        }
    }

    pub async fn runners(&self) -> Result<Vec<RunnerInfo>> {
        match &*self.backend {
            Backend::Sqlite(s) => s.runners().await,
            Backend::Postgres(s) => s.runners().await,
        }
    }

    /// Bindings and recent sessions. A client (`Scope::Owner`) sees its own and the shared
    /// ones (made by an admin, or found on a runner's disk), not other clients'.
    pub async fn sessions(
        &self,
        conversation: Option<String>,
        agent: Option<String>,
        limit: u32,
        scope: &Scope,
    ) -> Result<SessionList> {
        let scope = scope.clone();
        match &*self.backend {
            Backend::Sqlite(s) => s.sessions(conversation, agent, limit, scope).await,
            Backend::Postgres(s) => s.sessions(conversation, agent, limit, scope).await,
        }
    }

    /// Binds a conversation to a fresh session (`session_id` none) or to the given one. A
    /// client cannot rebind another client's conversation, nor bind another client's session
    /// (`NotFound`); the binding becomes the client's.
    pub async fn bind_session(&self, cmd: SessionCommand, scope: &Scope) -> Result<SessionBinding> {
        let scope = scope.clone();
        match &*self.backend {
            Backend::Sqlite(s) => s.bind_session(cmd, scope).await,
            Backend::Postgres(s) => s.bind_session(cmd, scope).await,
        }
    }

    /// Records the sessions a runner found on its disk (for `recent`).
    pub async fn report_sessions(
        &self,
        runner: &str,
        sessions: Vec<ReportedSession>,
    ) -> Result<()> {
        match &*self.backend {
            Backend::Sqlite(s) => s.report_sessions(runner.to_owned(), sessions).await,
            Backend::Postgres(s) => s.report_sessions(runner.to_owned(), sessions).await,
        }
    }

    pub async fn create_token(
        &self,
        id: String,
        name: String,
        role: Role,
        secret_sha256: [u8; 32],
    ) -> Result<TokenInfo> {
        match &*self.backend {
            Backend::Sqlite(s) => s.create_token(id, name, role, secret_sha256).await,
            Backend::Postgres(s) => s.create_token(id, name, role, secret_sha256).await,
        }
    }

    pub async fn tokens(&self) -> Result<Vec<StoredToken>> {
        match &*self.backend {
            Backend::Sqlite(s) => s.tokens().await,
            Backend::Postgres(s) => s.tokens().await,
        }
    }

    pub async fn revoke_token(&self, id: &str) -> Result<TokenInfo> {
        match &*self.backend {
            Backend::Sqlite(s) => s.revoke_token(id.to_owned()).await,
            Backend::Postgres(s) => s.revoke_token(id.to_owned()).await,
        }
    }

    /// Deliveries due now, at most one per destination (so each destination keeps its order),
    /// and when the next one is due.
    pub async fn due_deliveries(&self, limit: u32) -> Result<(Vec<Delivery>, Option<i64>)> {
        match &*self.backend {
            Backend::Sqlite(s) => s.due_deliveries(limit).await,
            Backend::Postgres(s) => s.due_deliveries(limit).await,
        }
    }

    pub async fn update_delivery(&self, id: i64, update: DeliveryUpdate) -> Result<()> {
        match &*self.backend {
            Backend::Sqlite(s) => s.update_delivery(id, update).await,
            Backend::Postgres(s) => s.update_delivery(id, update).await,
        }
    }

    /// Queues a plain message (the original's `POST /notify`).
    pub async fn notify(&self, target: tunnel_protocol::ReplyTo, text: String) -> Result<i64> {
        match &*self.backend {
            Backend::Sqlite(s) => s.notify(target, text).await,
            Backend::Postgres(s) => s.notify(target, text).await,
        }
    }

    /// Removes up to `limit` tasks that finished before `before` (ms) with their events and
    /// deliveries, plus finished plain notifications and runners unseen since then. A task that
    /// has not finished, or whose answer is still waiting to be delivered, is never removed.
    /// Call it again while it returns `limit` tasks.
    pub async fn prune(&self, before: i64, limit: u32) -> Result<Pruned> {
        match &*self.backend {
            Backend::Sqlite(s) => s.prune(before, limit).await,
            Backend::Postgres(s) => s.prune(before, limit).await,
        }
    }

    /// Waiting tasks per agent and finished tasks per minute since `since` (ms), within the
    /// scope: the dashboard's overview.
    pub async fn overview(&self, since: i64, scope: &Scope) -> Result<Overview> {
        let scope = scope.clone();
        match &*self.backend {
            Backend::Sqlite(s) => s.overview(since, scope).await,
            Backend::Postgres(s) => s.overview(since, scope).await,
        }
    }

    /// Stores a sign-in under the SHA-256 of its secret; expired ones are removed on the way.
    pub async fn put_web_session(
        &self,
        id_sha256: [u8; 32],
        kind: WebSessionKind,
        session: WebSession,
    ) -> Result<()> {
        match &*self.backend {
            Backend::Sqlite(s) => s.put_web_session(id_sha256, kind, session).await,
            Backend::Postgres(s) => s.put_web_session(id_sha256, kind, session).await,
        }
    }

    /// The unexpired sign-in with this hash; with `take`, it is also removed (one-time codes,
    /// signing out), so two servers cannot both use it.
    pub async fn web_session(
        &self,
        id_sha256: [u8; 32],
        kind: WebSessionKind,
        take: bool,
    ) -> Result<Option<WebSession>> {
        match &*self.backend {
            Backend::Sqlite(s) => s.web_session(id_sha256, kind, take).await,
            Backend::Postgres(s) => s.web_session(id_sha256, kind, take).await,
        }
    }

    /// A runner's agent asks (the attempt is fenced; the task must be running). The same key
    /// within the attempt returns the first request and `false`. Writes an `approval` event
    /// and, for a chat `reply_to`, the question to post.
    pub async fn create_approval(
        &self,
        task_id: &str,
        req: ApprovalRequest,
    ) -> Result<(Approval, bool)> {
        match &*self.backend {
            Backend::Sqlite(s) => s.create_approval(task_id.to_owned(), req).await,
            Backend::Postgres(s) => s.create_approval(task_id.to_owned(), req).await,
        }
    }

    /// A request of the caller's attempt, for its wait (fenced; another task's or attempt's
    /// request is `NotFound`).
    pub async fn runner_approval(
        &self,
        task_id: &str,
        id: &str,
        at: &AttemptRef,
    ) -> Result<Approval> {
        let (task_id, id, at) = (task_id.to_owned(), id.to_owned(), at.clone());
        match &*self.backend {
            Backend::Sqlite(s) => s.runner_approval(task_id, id, at).await,
            Backend::Postgres(s) => s.runner_approval(task_id, id, at).await,
        }
    }

    /// One request; another client's is `NotFound`.
    pub async fn approval(&self, id: &str, scope: &Scope) -> Result<Approval> {
        match &*self.backend {
            Backend::Sqlite(s) => s.approval(id.to_owned(), scope.clone()).await,
            Backend::Postgres(s) => s.approval(id.to_owned(), scope.clone()).await,
        }
    }

    /// Requests, newest first: a client sees its own tasks' requests, admin all.
    pub async fn approvals(&self, filter: ApprovalFilter, scope: &Scope) -> Result<Vec<Approval>> {
        match &*self.backend {
            Backend::Sqlite(s) => s.approvals(filter, scope.clone()).await,
            Backend::Postgres(s) => s.approvals(filter, scope.clone()).await,
        }
    }

    /// Answers a pending request for the caller (`token_id`: recorded by its name, beside the
    /// answer's `by`). A settled one is refused with [`StoreError::Settled`]; one past its time
    /// is expired now and refused the same way.
    pub async fn answer_approval(
        &self,
        id: &str,
        scope: &Scope,
        token_id: &str,
        answer: ApprovalAnswer,
    ) -> Result<Approval> {
        let (id, scope, token_id) = (id.to_owned(), scope.clone(), token_id.to_owned());
        match &*self.backend {
            Backend::Sqlite(s) => s.answer_approval(id, scope, token_id, answer).await,
            Backend::Postgres(s) => s.answer_approval(id, scope, token_id, answer).await,
        }
    }

    /// Closes the store for a clean shutdown; every later call fails with `Unavailable`.
    /// SQLite: waits for the writes already queued, checkpoints the WAL into the database,
    /// truncates it and closes every connection, so the next start has no log to replay.
    /// PostgreSQL: nothing to do (its connections end with the process).
    pub async fn close(&self) {
        match &*self.backend {
            Backend::Sqlite(s) => s.close().await,
            Backend::Postgres(_) => {}
        }
    }

    /// Task counts by state; also proves the database answers (readiness).
    pub async fn counts(&self) -> Result<QueueCounts> {
        match &*self.backend {
            Backend::Sqlite(s) => s.counts().await,
            Backend::Postgres(s) => s.counts().await,
        }
    }
}

/// Fencing, the same in every backend: only the task's current attempt, with its lease token,
/// may act; anything else is told it is stale.
/// The finish of an offer its runner cannot run ([`StartAtClaim::refuse`]).
pub(crate) fn refused(at: &AttemptRef, error: String) -> FinishRequest {
    FinishRequest {
        attempt: at.attempt,
        lease_token: at.lease_token.clone(),
        outcome: tunnel_protocol::Outcome::Failed,
        result: tunnel_protocol::TaskResult {
            error: Some(error),
            ..Default::default()
        },
        not_before: None,
        events: vec![],
    }
}

pub(crate) fn fence(
    task_id: &str,
    state: TaskState,
    current: u32,
    lease_token: Option<&str>,
    at: &AttemptRef,
) -> Result<()> {
    if at.attempt == current && lease_token.is_some_and(|lt| constant_time_eq(lt, &at.lease_token))
    {
        return Ok(());
    }
    Err(StoreError::Stale(if at.attempt == current {
        format!(
            "attempt {} of task {task_id} has ended (task is {state})",
            at.attempt
        )
    } else {
        format!(
            "attempt {} is not the current attempt of task {task_id} (current: {current}, {state})",
            at.attempt
        )
    }))
}

/// Constant-time string equality (lease tokens).
fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub use tunnel_protocol::hex;

/// A new random id: a UUIDv7, so ids sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).expect("the OS random source failed");
    hex(&buf)
}

#[cfg(test)]
mod tests;
