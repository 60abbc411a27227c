//! PostgreSQL backend: several servers share one queue.
//!
//! The semantics are those of the SQLite backend (`sqlite.rs`), transition for transition.
//! What differs is how writes are kept apart, since here several processes write at once:
//!
//! - Every write runs at READ COMMITTED, in a transaction of its own or in a group with the
//!   other writes of this server queued behind it (group commit, see [`Lane`]: one COMMIT and
//!   one WAL flush for the group, each write after the first in its own savepoint, every
//!   answer after the commit; the writes of a group run one after the other, so each decides
//!   as it would alone). A write that changes a task locks its
//!   row (`SELECT … FOR UPDATE`) and decides on what it read *after* the lock, so it always
//!   sees the latest committed state. Writes that can change which task of a session is first
//!   (submit, and every path to a terminal state) first take a transaction-scoped advisory
//!   lock on the session key, before any row lock: a submit racing the finish of the task
//!   ahead of it can then never leave the new task not ready. A deadlock or serialization
//!   failure (which PostgreSQL reports rather than hangs on) re-runs the whole write.
//! - A claim picks the oldest ready task it may take with `FOR UPDATE SKIP LOCKED` (claimers
//!   never queue on each other's rows) and re-checks the row after locking it.
//! - Background duties run on every instance: expiring a deadline re-checks the task under
//!   its lock, one task per transaction; due outbox rows are claimed with `FOR UPDATE SKIP
//!   LOCKED` and an in-flight lease (`claimed_until`), so two instances never send one row.
//! - After each commit the effects go to this instance's [`Signals`] directly and to the
//!   others through `NOTIFY tunnel`, sent just after the commit (several commits' effects
//!   merged into one statement when they come together), never inside the write: PostgreSQL
//!   holds a database-wide lock from a notifying transaction's commit through its WAL flush,
//!   so writes that NOTIFY commit one fsync at a time. Each instance `LISTEN`s and calls the
//!   same [`Signals`]. NOTIFY is a hint: the listener reconnects when its connection drops and
//!   then re-signals what changed while it was away, and a poll every second re-wakes ready
//!   tasks, deadlines and the outbox (so a note lost between a commit and its NOTIFY costs at
//!   most that second).
//! - Round trips are what a write costs here (each one a wake-up of this process and of a
//!   PostgreSQL backend): BEGIN goes out with the first statement, statements of a transition
//!   that do not depend on each other's answers are sent together (pipelined, in order), a
//!   task is read back in one statement, and an empty claim by a runner seen within the last
//!   second writes nothing (so its commit waits for no WAL flush). Every commit is still
//!   synchronous (`synchronous_commit` is the server's; nothing here relaxes it).
//!
//! Refusals (stale, conflict, not found) commit what the write did before refusing, as in
//! SQLite; database errors roll back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{AsyncMessage, NoTls, Row};
use tunnel_protocol::{
    AppendAck, AppendEvents, Approval, ApprovalAnswer, ApprovalOutcome, ApprovalRequest,
    ApprovalState, AttemptRef, ClaimRequest, FinishRequest, LeaseStatus, Offer, Outcome, ReplyTo,
    Role, RunnerInfo, SessionBinding, SessionCommand, SessionList, SubmitTask, Task, TaskEvent,
    TaskResult, TaskState, TokenInfo,
};

use crate::model::{
    self, APPROVAL_COLUMNS, APPROVAL_OWNER, Ack, Answer, BINDING_COLUMNS, CANCELLED_BEFORE_RUN,
    Cancel, Columns, EDIT_EVERY_MS, Expiry, Finish, Home, Lease, OPEN_TASK_COLUMNS, OpenTask,
    StateEvent, TASK_COLUMNS, TASK_OWNER, binding_from_row, delivery_from_row,
    delivery_status_from_row, destination, event_from_row, open_task_from_row, parse_state,
    recent_from_row, runner_from_row, session_key, task_from_row, to_json, token_from_row,
};
use crate::{
    ApprovalFilter, Clock, CurrentAttempt, Dialect, QueueCounts, QueueSettings, ReadyHint, Result,
    Scope, Signals, StoreError, StoredToken, TaskFilter, new_id, random_hex,
};

pub(crate) const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_init",
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (
        "0002_agent_versions",
        include_str!("../migrations/postgres/0002_agent_versions.sql"),
    ),
    (
        "0003_outbox",
        include_str!("../migrations/postgres/0003_outbox.sql"),
    ),
    (
        "0004_task_meta",
        include_str!("../migrations/postgres/0004_task_meta.sql"),
    ),
    (
        "0005_retention",
        include_str!("../migrations/postgres/0005_retention.sql"),
    ),
    (
        "0006_ready_by_agent",
        include_str!("../migrations/postgres/0006_ready_by_agent.sql"),
    ),
    (
        "0007_session_owner",
        include_str!("../migrations/postgres/0007_session_owner.sql"),
    ),
    (
        "0008_approvals",
        include_str!("../migrations/postgres/0008_approvals.sql"),
    ),
    (
        "0010_web_sessions",
        include_str!("../migrations/postgres/0010_web_sessions.sql"),
    ),
    (
        "0011_owner_state",
        include_str!("../migrations/postgres/0011_owner_state.sql"),
    ),
    (
        "0012_runner_left",
        include_str!("../migrations/postgres/0012_runner_left.sql"),
    ),
    (
        "0013_runner_acp_agents",
        include_str!("../migrations/postgres/0013_runner_acp_agents.sql"),
    ),
    (
        "0014_queue_floods",
        include_str!("../migrations/postgres/0014_queue_floods.sql"),
    ),
    (
        "0015_event_caps",
        include_str!("../migrations/postgres/0015_event_caps.sql"),
    ),
    (
        "0016_conversation_owner",
        include_str!("../migrations/postgres/0016_conversation_owner.sql"),
    ),
    (
        "0017_runner_acp_capabilities",
        include_str!("../migrations/postgres/0017_runner_acp_capabilities.sql"),
    ),
    (
        "0018_unconfirmed_offers",
        include_str!("../migrations/postgres/0018_unconfirmed_offers.sql"),
    ),
    (
        "0019_fewer_task_indexes",
        include_str!("../migrations/postgres/0019_fewer_task_indexes.sql"),
    ),
    (
        "0020_events_without_fk",
        include_str!("../migrations/postgres/0020_events_without_fk.sql"),
    ),
];

/// The NOTIFY channel every instance listens on.
const CHANNEL: &str = "tunnel";
/// Connections per instance (plus one for the listener).
const POOL_SIZE: usize = 16;
/// How often the fallback poll re-wakes ready tasks, deadlines and the outbox.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How long an instance holds an outbox row it is sending before another may take it.
/// Longer than one send can take (a 15 s request timeout plus a short rate-limit wait); each
/// part of a split message renews it.
const OUTBOX_CLAIM_MS: i64 = 60_000;
/// How a COMMIT whose outcome is unknown is reported.
const COMMIT_FAILED: &str = "the commit failed";
/// Re-runs of a write that hit a deadlock or serialization failure.
const MAX_TRIES: u32 = 10;
/// Candidates a claim reads per round (then locks the first it can).
const CLAIM_BATCH: i64 = 8;
/// (agent, project) pairs up to which a claim reads its candidates one statement per pair.
const CLAIM_PAIRS: usize = 6;
/// Ready tasks re-woken per poll.
const POLL_READY: i64 = 32;
/// A claim's record of its runner (see `W::touch_runner`).
const TOUCH_RUNNER: &str = "WITH fresh AS (
       SELECT 1 FROM runners
       WHERE name = $1 AND agents = $2 AND projects = $3 AND capacity = $4
         AND version IS NOT DISTINCT FROM $5 AND agent_versions = $6
         AND acp_agents = $9 AND left_at IS NULL AND $11::text IS NULL
         AND last_seen > $7::bigint - $10::bigint AND ($8::text IS NULL OR token = $8)),
    up AS (
       INSERT INTO runners (name, agents, projects, capacity, version, agent_versions,
           first_seen, last_seen, token, acp_agents, acp_capabilities)
       SELECT $1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $11
       WHERE NOT EXISTS (SELECT 1 FROM fresh)
       ON CONFLICT (name) DO UPDATE SET agents = EXCLUDED.agents,
          projects = EXCLUDED.projects, capacity = EXCLUDED.capacity,
          version = EXCLUDED.version, agent_versions = EXCLUDED.agent_versions,
          last_seen = GREATEST(runners.last_seen, EXCLUDED.last_seen), left_at = NULL,
          acp_agents = EXCLUDED.acp_agents,
          acp_capabilities = COALESCE(EXCLUDED.acp_capabilities, runners.acp_capabilities),
          token = COALESCE(runners.token, EXCLUDED.token)
       WHERE runners.token IS NULL OR EXCLUDED.token IS NULL
          OR runners.token = EXCLUDED.token
       RETURNING 1)
    SELECT (SELECT COUNT(*) FROM fresh) + (SELECT COUNT(*) FROM up)";
/// For a claim with `ack` by runner $1 (token $3): clears the marks of the attempts it lists in
/// `holding` ($2: it has them), if the name is the token's (the claim's other statements
/// refuse it otherwise), and lists the tasks whose current attempt is still marked, for
/// `W::unconfirmed_offer`: almost always none. One statement, sent with the claim's first.
const UNCONFIRMED: &str = "WITH held AS (
        UPDATE tasks SET unconfirmed = FALSE
        WHERE runner = $1 AND unconfirmed AND id = ANY($2)
          AND EXISTS (SELECT 1 FROM runners r WHERE r.name = $1
                      AND ($3::text IS NULL OR r.token = $3)))
    SELECT id FROM tasks WHERE runner = $1 AND unconfirmed AND id <> ALL($2) ORDER BY seq";
/// A lease renewal; the runner's row only when it was last seen over
/// [`model::RUNNER_TOUCH_EVERY_MS`] ago (as a claim does), so a stream of events does not
/// rewrite it each time.
const RENEW_LEASE: &str = "WITH r AS (UPDATE runners SET last_seen = $3
        WHERE name = $4 AND last_seen <= $3::bigint - $5::bigint)
    UPDATE tasks SET lease_until = $2 WHERE seq = $1";
/// An event and the task's counters, in one statement.
const INSERT_EVENT: &str = "WITH c AS (
        UPDATE tasks SET next_event_seq = next_event_seq + 1, event_bytes = event_bytes + $2
        WHERE seq = $1 RETURNING next_event_seq - 1 AS seq)
    INSERT INTO task_events (task_seq, seq, attempt, n, kind, data, at)
    SELECT $1, c.seq, $3::bigint, $4::bigint, $5::text, $6::text, $7::bigint FROM c
    RETURNING seq";
/// [`INSERT_EVENT`] for a runner's numbered event, skipped if the attempt has it already.
const INSERT_EVENT_ONCE: &str = "WITH c AS (
        UPDATE tasks SET next_event_seq = next_event_seq + 1, event_bytes = event_bytes + $2
        WHERE seq = $1 AND NOT EXISTS (SELECT 1 FROM task_events
            WHERE task_seq = $1 AND attempt = $3 AND n = $4)
        RETURNING next_event_seq - 1 AS seq)
    INSERT INTO task_events (task_seq, seq, attempt, n, kind, data, at)
    SELECT $1, c.seq, $3::bigint, $4::bigint, $5::text, $6::text, $7::bigint FROM c
    RETURNING seq";
/// How long a note without a ready task waits for others to share its NOTIFY
/// (see `notify_loop`): what another server's watchers of a task may see late.
const NOTE_WINDOW: Duration = Duration::from_millis(5);
/// NOTIFY payloads stay under PostgreSQL's 8000-byte limit.
const MAX_PAYLOAD: usize = 7000;

type P<'a> = &'a (dyn ToSql + Sync);

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            // An error the database reported that is not an outage: a bug, not a retry.
            Some(db) if !connection_lost(&e) => StoreError::Postgres {
                code: db.code().code().to_owned(),
                message: db.message().to_owned(),
            },
            Some(db) => StoreError::Unavailable(format!("PostgreSQL: {}", db.message())),
            None => StoreError::Unavailable(format!("PostgreSQL: {e}")),
        }
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(format!("no PostgreSQL connection: {e}"))
}

/// The connection failed or the server ended it (killed backend, restart, too many
/// connections): a transaction that had not reached COMMIT did not happen.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(db) => {
            e.is_closed()
                || ["08", "53", "57"]
                    .iter()
                    .any(|class| db.code().code().starts_with(class))
        }
    }
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            // A write after a group's first found a lock taken (see `GROUPED`).
            || *c == SqlState::LOCK_NOT_AVAILABLE
    })
}

fn get<'a, T: FromSql<'a>>(r: &'a Row, i: usize) -> Result<T> {
    Ok(r.try_get(i)?)
}

fn get_u32(r: &Row, i: usize) -> Result<u32> {
    Ok(r.try_get::<_, i64>(i)? as u32)
}

impl Columns for Row {
    fn text(&self, i: usize) -> Result<String> {
        get(self, i)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>> {
        get(self, i)
    }
    fn int(&self, i: usize) -> Result<i64> {
        get(self, i)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        get(self, i)
    }
    fn uint(&self, i: usize) -> Result<u32> {
        get_u32(self, i)
    }
    fn flag(&self, i: usize) -> Result<bool> {
        get(self, i)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>> {
        get(self, i)
    }
}

/// What a committed write changed, applied to [`Signals`] after the commit, here and (via
/// NOTIFY) on every other instance.
#[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
struct Effects {
    #[serde(default, rename = "c", skip_serializing_if = "Vec::is_empty")]
    changed: Vec<String>,
    #[serde(default, rename = "r", skip_serializing_if = "Vec::is_empty")]
    ready: Vec<WireHint>,
    #[serde(default, rename = "d", skip_serializing_if = "Vec::is_empty")]
    deadlines: Vec<i64>,
    #[serde(default, rename = "o", skip_serializing_if = "std::ops::Not::not")]
    delivery: bool,
    /// Tokens changed (applied on the other instances only: this one reloads itself).
    #[serde(default, rename = "k", skip_serializing_if = "std::ops::Not::not")]
    tokens: bool,
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct WireHint {
    t: String,
    a: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<String>,
}

impl From<ReadyHint> for WireHint {
    fn from(h: ReadyHint) -> Self {
        WireHint {
            t: h.task_id,
            a: h.agent,
            p: h.project,
            r: h.runner,
        }
    }
}

impl From<WireHint> for ReadyHint {
    fn from(h: WireHint) -> Self {
        ReadyHint {
            task_id: h.t,
            agent: h.a,
            project: h.p,
            runner: h.r,
        }
    }
}

/// One NOTIFY: who sent it, and what changed.
#[derive(serde::Serialize, serde::Deserialize)]
struct Note {
    i: String,
    #[serde(flatten)]
    fx: Effects,
}

impl Effects {
    fn is_empty(&self) -> bool {
        self.changed.is_empty()
            && self.ready.is_empty()
            && self.deadlines.is_empty()
            && !self.delivery
            && !self.tokens
    }

    /// Adds another commit's effects (sent as one note).
    fn merge(&mut self, other: Effects) {
        for id in other.changed {
            if !self.changed.contains(&id) {
                self.changed.push(id);
            }
        }
        self.ready.extend(other.ready);
        self.deadlines.extend(other.deadlines);
        self.delivery |= other.delivery;
        self.tokens |= other.tokens;
    }

    /// Applies effects another instance committed.
    fn apply_remote(&self, signals: &dyn Signals) {
        if self.tokens {
            signals.tokens_changed();
        }
        self.apply(signals);
    }

    fn apply(&self, signals: &dyn Signals) {
        for at in &self.deadlines {
            signals.deadline(*at);
        }
        for id in &self.changed {
            signals.task_changed(id);
        }
        for hint in &self.ready {
            signals.task_ready(&hint.clone().into());
        }
        if self.delivery {
            signals.delivery_ready();
        }
    }

    /// The NOTIFY payloads that carry these effects, each under the size limit.
    fn payloads(&self, instance: &str) -> Vec<String> {
        let note = Note {
            i: instance.to_owned(),
            fx: self.clone(),
        };
        let json = serde_json::to_string(&note).unwrap_or_default();
        let items = self.changed.len() + self.ready.len() + self.deadlines.len();
        if json.len() <= MAX_PAYLOAD || items <= 1 {
            return vec![json];
        }
        // Split in two halves (by list) until each fits.
        let mut a = Effects {
            delivery: self.delivery,
            tokens: self.tokens,
            ..Default::default()
        };
        let mut b = Effects::default();
        let hc = self.changed.len() / 2;
        a.changed = self.changed[..hc].to_vec();
        b.changed = self.changed[hc..].to_vec();
        let hr = self.ready.len() / 2;
        a.ready = self.ready[..hr].to_vec();
        b.ready = self.ready[hr..].to_vec();
        let hd = self.deadlines.len() / 2;
        a.deadlines = self.deadlines[..hd].to_vec();
        b.deadlines = self.deadlines[hd..].to_vec();
        let mut out = a.payloads(instance);
        out.extend(b.payloads(instance));
        out
    }
}

/// Aborts the background tasks when the store goes away.
struct Background(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Background {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

pub(crate) struct PgStore {
    pool: Pool,
    clock: Arc<dyn Clock>,
    settings: Arc<QueueSettings>,
    /// Where writes run (group commit).
    lanes: Vec<Arc<Lane>>,
    _background: Background,
}

/// A pooled connection and whether a transaction is open on it (BEGIN sent, no COMMIT or
/// ROLLBACK yet). Dropped while one is (the caller went away in the middle of a write, or a
/// group was abandoned), the connection leaves the pool and closes, so PostgreSQL rolls the
/// transaction back and no later write is handed a connection inside it.
struct TxConn {
    client: Option<deadpool_postgres::Client>,
    open: AtomicBool,
    /// What the current operation's first statement goes out with (BEGIN, or its savepoint
    /// in a group already open), until that statement is sent.
    prefix: std::sync::Mutex<Option<String>>,
}

impl TxConn {
    fn new(client: deadpool_postgres::Client) -> TxConn {
        TxConn {
            client: Some(client),
            open: AtomicBool::new(false),
            prefix: std::sync::Mutex::new(None),
        }
    }

    fn client(&self) -> &deadpool_postgres::Client {
        self.client
            .as_ref()
            .expect("the connection is only taken on drop")
    }

    fn set_prefix(&self, p: Option<String>) {
        *self.prefix.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    fn take_prefix(&self) -> Option<String> {
        self.prefix.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for TxConn {
    fn drop(&mut self) {
        if self.open.load(Ordering::SeqCst)
            && let Some(c) = self.client.take()
        {
            // A statement may still be running (waiting for a lock, say): the connection only
            // closes, and its transaction only rolls back and lets go of its locks, once that
            // statement ends. Cancelling it ends it now.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let cancel = c.cancel_token();
                rt.spawn(async move {
                    let _ = cancel.cancel_query(NoTls).await;
                });
            }
            drop(deadpool_postgres::Object::take(c));
        }
    }
}

/// Group commit. Each server runs its writes in a few lanes; a lane runs one operation at a
/// time, in one open transaction (a group) that the operations queued behind each other
/// share: each one after the first in its own savepoint (a database error rolls back that
/// operation only, and a refusal keeps what it did, as alone), and the group commits when
/// nobody is queued on the lane any more (or after [`MAX_GROUP`] operations). So one WAL
/// flush and one COMMIT round trip serve every operation of the group, while a lone write
/// costs what it did before (BEGIN with its first statement, COMMIT after its last). Every
/// answer waits for its group's commit. Operations of one group are serialized (they run one
/// after the other in one transaction, each seeing the ones before), so the locks, the
/// `SKIP LOCKED` claims and the fencing by attempt decide exactly as they would in
/// transactions of their own; a group that fails before its commit (connection lost, an
/// operation abandoned half-way) rolls back whole and each of its operations runs again.
struct Lane {
    slot: Arc<tokio::sync::Mutex<Option<Group>>>,
    /// Operations queued on this lane or running in it (the least loaded lane is picked).
    load: AtomicUsize,
    /// Operations queued for the lane's lock: while there are some, the group stays open.
    waiting: AtomicUsize,
    signals: Arc<dyn Signals>,
    notes: tokio::sync::mpsc::UnboundedSender<Effects>,
    counters: Arc<GroupCounters>,
}

/// What the lanes of one store did (read by the tests).
#[derive(Default)]
struct GroupCounters {
    /// Groups committed.
    commits: std::sync::atomic::AtomicU64,
    /// Operations that kept their writes, in groups committed or not.
    kept: std::sync::atomic::AtomicU64,
    /// Operations rolled back to their savepoint inside a group that went on.
    undone: std::sync::atomic::AtomicU64,
}

/// Lanes per server (operations in flight at once on this server's connections), unless
/// `TUNNEL_PG_LANES` says otherwise (1–8): fewer lanes make larger groups (fewer commits),
/// more lanes let more writes wait on PostgreSQL at once.
const LANES: usize = 2;

fn lanes() -> usize {
    std::env::var("TUNNEL_PG_LANES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(LANES, |n| n.clamp(1, 8))
}
/// What a write after a group's first goes out with: its savepoint, and no waiting for locks.
/// The writes of a group hold their locks together until the commit, taken in whatever order
/// they came, so two groups that each waited for the other's would deadlock (and PostgreSQL
/// takes a second to notice). Only a group's first write waits for a lock (it holds none of
/// another write's); any later one that finds a lock taken fails at once (`lock_timeout`),
/// rolls back to its savepoint, and runs again first in a new group.
const GROUPED: &str = "SET LOCAL lock_timeout = '5ms'; SAVEPOINT op";

/// Operations per group at most (each after the first is a subtransaction; PostgreSQL caches
/// 64 per transaction before other sessions' snapshots get slower).
const MAX_GROUP: usize = 16;

/// An open group transaction on one lane.
struct Group {
    conn: TxConn,
    /// Operations in it that keep their writes (and wait for the commit).
    ops: usize,
    fx: Effects,
    done: tokio::sync::watch::Sender<GroupEnd>,
}

/// What became of a group, as its operations see it.
#[derive(Clone, Debug)]
enum GroupEnd {
    Open,
    Committing,
    Committed,
    /// Rolled back before its commit: its operations run again.
    Retry,
    /// The commit failed or its outcome is unknown.
    Failed(String),
}

impl Group {
    fn new(client: deadpool_postgres::Client) -> Group {
        Group {
            conn: TxConn::new(client),
            ops: 0,
            fx: Effects::default(),
            done: tokio::sync::watch::Sender::new(GroupEnd::Open),
        }
    }

    /// Commits (spawned: it completes even when the operation that started it goes away).
    /// `SELECT 1` goes first in the same round trip: in a transaction that a statement
    /// aborted it fails, where COMMIT alone would roll back without an error.
    async fn commit(self, lane: Arc<Lane>) {
        let Group { conn, fx, done, .. } = self;
        done.send_replace(GroupEnd::Committing);
        let outcome = match conn.client().batch_execute("SELECT 1; COMMIT").await {
            Ok(()) => {
                conn.open.store(false, Ordering::SeqCst);
                lane.counters.commits.fetch_add(1, Ordering::Relaxed);
                fx.apply(&*lane.signals);
                if !fx.is_empty() {
                    // After the commit, not inside it: PostgreSQL serializes the commits of
                    // transactions that NOTIFY (a database-wide lock held through the WAL
                    // flush), which would leave one commit per fsync for every server.
                    let _ = lane.notes.send(fx);
                }
                GroupEnd::Committed
            }
            Err(e) if retryable(&e) => {
                // The transaction is over (rolled back); the connection is fine.
                conn.open.store(false, Ordering::SeqCst);
                GroupEnd::Retry
            }
            // Failed before the COMMIT ran (the connection stays marked open and closes).
            Err(e) if e.as_db_error().is_some() && !connection_lost(&e) => GroupEnd::Retry,
            Err(e) => GroupEnd::Failed(format!("{COMMIT_FAILED}: {e}")),
        };
        done.send_replace(outcome);
    }
}

/// Waits for a group's outcome.
async fn outcome(mut rx: tokio::sync::watch::Receiver<GroupEnd>) -> GroupEnd {
    loop {
        match &*rx.borrow_and_update() {
            GroupEnd::Open | GroupEnd::Committing => {}
            o => return o.clone(),
        }
        if rx.changed().await.is_err() {
            // The group went away without a final word.
            return match &*rx.borrow() {
                GroupEnd::Open => GroupEnd::Retry,
                GroupEnd::Committing => GroupEnd::Failed(format!("{COMMIT_FAILED}: abandoned")),
                o => o.clone(),
            };
        }
    }
}

impl Lane {
    /// Commits the lane's group if nobody is queued to continue it (after a queued operation
    /// gave up waiting).
    async fn flush(self: Arc<Lane>) {
        let mut slot = self.slot.lock().await;
        if self.waiting.load(Ordering::SeqCst) == 0
            && slot.as_ref().is_some_and(|g| g.ops > 0)
            && let Some(g) = slot.take()
        {
            drop(slot);
            g.commit(self.clone()).await;
        }
    }
}

/// One operation's turn on a lane: queued for its lock, then running in its group.
struct Turn {
    lane: Arc<Lane>,
    slot: Option<tokio::sync::OwnedMutexGuard<Option<Group>>>,
    waiting: bool,
}

impl Turn {
    /// A turn on the least loaded lane; `first`: as the first write of a new group (the lane's
    /// open group, if any, commits without it).
    async fn take(lanes: &[Arc<Lane>], pool: &Pool, first: bool) -> Result<Turn> {
        let lane = lanes
            .iter()
            .min_by_key(|l| l.load.load(Ordering::SeqCst))
            .expect("at least one lane")
            .clone();
        lane.load.fetch_add(1, Ordering::SeqCst);
        lane.waiting.fetch_add(1, Ordering::SeqCst);
        let mut turn = Turn {
            lane,
            slot: None,
            waiting: true,
        };
        let slot = turn.lane.slot.clone().lock_owned().await;
        turn.lane.waiting.fetch_sub(1, Ordering::SeqCst);
        turn.waiting = false;
        let slot = turn.slot.insert(slot);
        if first
            && slot.as_ref().is_some_and(|g| g.ops > 0)
            && let Some(g) = slot.take()
        {
            tokio::spawn(g.commit(turn.lane.clone()));
        }
        if slot.is_none() {
            // A pooled connection that died (server restart, killed backend) fails the first
            // statement, and the write is re-run on another.
            **slot = Some(Group::new(pool.get().await.map_err(pool_err)?));
        }
        let g = slot.as_ref().expect("just set");
        g.conn
            .set_prefix(Some(if !g.conn.open.load(Ordering::SeqCst) {
                "BEGIN".into()
            } else {
                format!("{GROUPED}{}", g.ops)
            }));
        Ok(turn)
    }

    fn group(&mut self) -> &mut Group {
        self.slot
            .as_mut()
            .and_then(|s| s.as_mut())
            .expect("a turn runs in a group")
    }

    fn conn(&self) -> &TxConn {
        &self
            .slot
            .as_ref()
            .and_then(|s| s.as_ref())
            .expect("a turn runs in a group")
            .conn
    }

    /// Ends the operation in its group: keeps or rolls back what it did, commits the group
    /// if nobody is queued behind, and waits for the commit.
    async fn settle<T>(mut self, result: Result<T>, retry: bool, fx: Effects) -> Concluded<T> {
        let keep = match &result {
            Ok(_) => true,
            Err(e) => matches!(
                e,
                StoreError::Stale(_)
                    | StoreError::Conflict(_)
                    | StoreError::NotFound(_)
                    | StoreError::Settled { .. }
            ),
        };
        let lane = self.lane.clone();
        let g = self.group();
        // Whether the operation sent anything (its prefix went out with its first statement).
        let started = g.conn.take_prefix().is_none();
        let mut waiter = None;
        let mut concluded = None;
        if !started {
            // Nothing was sent: nothing to keep or undo.
            fx.apply(&*lane.signals);
            if !fx.is_empty() {
                let _ = lane.notes.send(fx);
            }
            concluded = Some(Concluded::Done(result));
        } else if keep {
            g.ops += 1;
            g.fx.merge(fx);
            lane.counters.kept.fetch_add(1, Ordering::Relaxed);
            waiter = Some((g.done.subscribe(), result));
        } else {
            // Undo this operation only: the whole transaction when it was the group's first.
            let undo = if g.ops == 0 {
                "ROLLBACK".to_owned()
            } else {
                format!("ROLLBACK TO SAVEPOINT op{}", g.ops)
            };
            if g.conn.client().batch_execute(&undo).await.is_ok() {
                if g.ops == 0 {
                    g.conn.open.store(false, Ordering::SeqCst);
                } else {
                    lane.counters.undone.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                // The group cannot go on: dropped, it rolls back (its connection closes) and
                // the operations that ran in it run again.
                **self.slot.as_mut().expect("held") = None;
            }
            concluded = Some(if retry {
                Concluded::Retry
            } else {
                Concluded::Done(result)
            });
        }
        let slot = self.slot.as_mut().expect("held");
        match slot.as_ref() {
            Some(g)
                if g.ops > 0
                    && (self.lane.waiting.load(Ordering::SeqCst) == 0 || g.ops >= MAX_GROUP) =>
            {
                let g = slot.take().expect("just seen");
                tokio::spawn(g.commit(self.lane.clone()));
            }
            // An empty group holds no transaction: its connection goes back to the pool.
            Some(g) if g.ops == 0 && !g.conn.open.load(Ordering::SeqCst) => **slot = None,
            _ => {}
        }
        // The lane is free for the next operation.
        self.slot = None;
        drop(self);
        if let Some(c) = concluded {
            return c;
        }
        let (rx, result) = waiter.expect("kept");
        match outcome(rx).await {
            GroupEnd::Committed => Concluded::Done(result),
            GroupEnd::Retry | GroupEnd::Open | GroupEnd::Committing => Concluded::Retry,
            GroupEnd::Failed(m) => Concluded::Done(Err(StoreError::Unavailable(m))),
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.lane.load.fetch_sub(1, Ordering::SeqCst);
        if self.waiting {
            // Gave up while queued: whoever left the group open for it may be waiting for a
            // commit that nobody else will start.
            self.lane.waiting.fetch_sub(1, Ordering::SeqCst);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(self.lane.clone().flush());
            }
        } else if let Some(slot) = self.slot.as_mut() {
            // Abandoned half-way (the caller went away): what it sent is unknown, so the group
            // is dropped; it rolls back and its operations run again.
            **slot = None;
        }
    }
}

/// A write in progress: the transaction, the time it runs at, and what it changed.
struct W<'a> {
    conn: &'a TxConn,
    now: i64,
    fx: Effects,
    settings: &'a QueueSettings,
    /// A statement failed in a way that a re-run may fix (deadlock, serialization).
    retry: AtomicBool,
}

enum Concluded<T> {
    Done(Result<T>),
    Retry,
}

/// Helps type inference: the body of a write is a future of a store `Result`.
fn typed<T, F: std::future::Future<Output = Result<T>>>(f: F) -> F {
    f
}

/// Runs `$body` (with `$w: W`) as one operation of a group transaction (see [`Lane`]);
/// re-runs it when its group rolled back or it hit a deadlock, answers after the commit.
macro_rules! write {
    ($s:expr, |$w:ident| $body:expr) => {{
        let s: &PgStore = $s;
        let mut tries = 0;
        loop {
            tries += 1;
            // A write that runs again does so first in a new group (see `GROUPED`).
            let turn = Turn::take(&s.lanes, &s.pool, tries > 1).await?;
            let (result, retry, fx) = {
                #[allow(unused_mut)]
                let mut $w = W {
                    conn: turn.conn(),
                    now: s.clock.now_ms(),
                    fx: Effects::default(),
                    settings: &s.settings,
                    retry: AtomicBool::new(false),
                };
                let result = typed(async { $body }).await;
                let retry = $w.retry.load(Ordering::Relaxed);
                (result, retry, std::mem::take(&mut $w.fx))
            };
            match turn.settle(result, retry, fx).await {
                Concluded::Done(r) => break r,
                Concluded::Retry if tries < MAX_TRIES => {
                    tokio::time::sleep(Duration::from_millis(2 * tries as u64)).await;
                    continue;
                }
                Concluded::Retry => {
                    break Err(StoreError::Unavailable(
                        "too many conflicting writes; try again".into(),
                    ));
                }
            }
        }
    }};
}

impl PgStore {
    pub(crate) async fn open(
        url: &str,
        settings: QueueSettings,
        clock: Arc<dyn Clock>,
        signals: Arc<dyn Signals>,
    ) -> Result<PgStore> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("bad PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("tunnel");
        }
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot build the pool: {e}")))?;
        migrate(&pool).await?;
        let instance = random_hex(8);
        let (listening_tx, listening) = tokio::sync::oneshot::channel();
        let listener = tokio::spawn(listen_loop(
            config,
            pool.clone(),
            signals.clone(),
            instance.clone(),
            clock.clone(),
            listening_tx,
        ));
        // Open returns once this instance hears the others (or, if LISTEN is slow to come up,
        // after 5 s: the fallback poll covers the gap).
        if tokio::time::timeout(Duration::from_secs(5), listening)
            .await
            .is_err()
        {
            tracing::warn!("PostgreSQL LISTEN is not up yet; relying on the poll until it is.");
        }
        let poller = tokio::spawn(poll_loop(pool.clone(), signals.clone(), clock.clone()));
        let (notes, notes_rx) = tokio::sync::mpsc::unbounded_channel();
        let notifier = tokio::spawn(notify_loop(pool.clone(), notes_rx, instance.clone()));
        // Committed effects for the other instances go to `notify_loop`.
        let counters = Arc::new(GroupCounters::default());
        let lanes = (0..lanes())
            .map(|_| {
                Arc::new(Lane {
                    slot: Arc::new(tokio::sync::Mutex::new(None)),
                    load: AtomicUsize::new(0),
                    waiting: AtomicUsize::new(0),
                    signals: signals.clone(),
                    notes: notes.clone(),
                    counters: counters.clone(),
                })
            })
            .collect();
        Ok(PgStore {
            pool,
            clock,
            settings: Arc::new(settings),
            lanes,
            _background: Background(vec![listener, poller, notifier]),
        })
    }

    /// Groups committed, operations kept, operations rolled back inside a group, and
    /// operations queued on the lanes or running in them now.
    #[cfg(test)]
    pub(crate) fn group_counters(&self) -> [u64; 4] {
        let c = &self.lanes[0].counters;
        let queued = self
            .lanes
            .iter()
            .map(|l| l.load.load(Ordering::SeqCst))
            .sum::<usize>();
        [
            c.commits.load(Ordering::Relaxed),
            c.kept.load(Ordering::Relaxed),
            c.undone.load(Ordering::Relaxed),
            queued as u64,
        ]
    }

    async fn conn(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }

    pub(crate) async fn submit(
        &self,
        owner: String,
        key: Option<String>,
        req: SubmitTask,
    ) -> Result<(Task, bool)> {
        write!(self, |w| {
            let conv_owner = w.conv_owner_of(&owner).await?;
            let session_key = req
                .conversation
                .as_ref()
                .map(|c| session_key(&req.agent, c, &conv_owner));
            if let Some(k) = &key {
                w.lock_key(&format!("idem\u{1f}{owner}\u{1f}{k}")).await?;
                let existing = w
                    .opt(
                        "SELECT id FROM tasks WHERE owner = $1 AND idempotency_key = $2",
                        &[&owner, k],
                    )
                    .await?;
                if let Some(row) = existing {
                    let id: String = get(&row, 0)?;
                    return Ok((load_task(w.tx().await?, &id, &Scope::All).await?, false));
                }
            }
            if let Some(k) = &session_key {
                w.lock_key(k).await?;
            }
            w.check_session_owner(&owner, &req).await?;
            if let Some(cap) = w.settings.max_queued_per_token {
                // Counted in `tasks_owner_waiting`, and never past the cap. Not serialised per
                // token: concurrent submits of one token may pass it by the few in flight.
                let row = w
                    .one(
                        "SELECT COUNT(*) FROM (SELECT 1 FROM tasks
                         WHERE owner = $1 AND state IN ('queued', 'parked') LIMIT $2) w",
                        &[&owner, &i64::from(cap)],
                    )
                    .await?;
                if get::<i64>(&row, 0)? >= i64::from(cap) {
                    return Err(model::queue_full(cap));
                }
            }
            let id = new_id();
            let busy = match &session_key {
                Some(k) => w
                    .opt(
                        "SELECT 1 FROM tasks WHERE session_key = $1 AND finished_at IS NULL LIMIT 1",
                        &[k],
                    )
                    .await?
                    .is_some(),
                None => false,
            };
            let (mode, resume_id) = model::session_mode_columns(&req.session);
            let reply_to = req.reply_to.as_ref().map(to_json);
            // The task, its first event (seq 1: the counters start past it) and, for the
            // ready hint, the runner its session must run on: one statement.
            let queued = StateEvent::Queued(None).data().to_string();
            let queued_size = model::event_size("state", &queued) as i64;
            let sql = format!(
                "WITH t AS (
                    INSERT INTO tasks AS t (id, agent, prompt, conversation, session_key, project,
                        model, timeout_ms, session_mode, resume_id, max_attempts, reply_to, owner,
                        idempotency_key, state, ready, created_at, updated_at, meta, approvals,
                        next_event_seq, event_bytes, conv_owner)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                        'queued', $15, $16, $16, $17, $18, 2, $19, $21)
                    RETURNING t.seq, (SELECT {HOME_EXPR}
                        FROM (SELECT 1) one
                        LEFT JOIN sessions s ON s.owner = t.conv_owner AND s.agent = t.agent
                            AND s.conversation = t.conversation)),
                 e AS (
                    INSERT INTO task_events (task_seq, seq, attempt, n, kind, data, at)
                    SELECT t.seq, 1, 0, NULL, 'state', $20::text, $16 FROM t)
                 SELECT * FROM t"
            );
            let chat = req.reply_to.as_ref().filter(|r| model::is_chat(r));
            let load = task_by_id_sql();
            let params: &[P<'_>] = &[
                &id,
                &req.agent,
                &req.prompt,
                &req.conversation,
                &session_key,
                &req.project,
                &req.model,
                &req.timeout_ms.map(|t| t as i64),
                &mode,
                &resume_id,
                &(req.max_attempts.unwrap_or(1) as i64),
                &reply_to,
                &owner,
                &key,
                &!busy,
                &w.now,
                &req.meta.as_ref().map(to_json),
                &req.approvals.map(|p| p.as_str()),
                &queued_size,
                &queued,
                &conv_owner,
            ];
            // Without a chat acknowledgement to queue in between, the task is read back in
            // the same round trip as its insert.
            let (row, loaded) = if chat.is_none() {
                w.prepare(&[&sql, &load]).await?;
                let (row, task) = futures_util::future::join(
                    w.one(&sql, params),
                    load_task(w.conn.client(), &id, &Scope::All),
                )
                .await;
                (row?, Some(task?))
            } else {
                (w.one(&sql, params).await?, None)
            };
            let seq: i64 = get(&row, 0)?;
            let home: Option<String> = get(&row, 1)?;
            // The chat's acknowledgement is the task's first message there, so it can never
            // arrive after the answer (one destination goes in order); it becomes the
            // "working…" message.
            if let Some(chat) = chat {
                w.enqueue(Some(seq), "progress", chat, None, 0).await?;
            }
            w.fx.changed.push(id.clone());
            if let Some(max) = w.settings.max_queue_ms {
                w.fx.deadlines.push(w.now + max);
            }
            if !busy {
                w.fx.ready.push(
                    ReadyHint {
                        task_id: id.clone(),
                        agent: req.agent.clone(),
                        project: req.project.clone(),
                        runner: home,
                    }
                    .into(),
                );
            }
            let task = match loaded {
                Some(task) => task,
                None => load_task(w.tx().await?, &id, &Scope::All).await?,
            };
            Ok((task, true))
        })
    }

    pub(crate) async fn task(&self, id: String, scope: Scope) -> Result<Task> {
        let c = self.conn().await?;
        load_task(&c, &id, &scope).await
    }

    pub(crate) async fn tasks(&self, filter: TaskFilter, scope: Scope) -> Result<Vec<Task>> {
        let c = self.conn().await?;
        let (cond, args) = filter.where_clause(&scope, |i| format!("${i}"), Dialect::Postgres);
        let sql = full_task_sql(
            &format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE {cond} ORDER BY seq DESC LIMIT {}",
                filter.limit.clamp(1, 1000)
            ),
            "ORDER BY x.seq DESC",
        );
        let params: Vec<P<'_>> = args.iter().map(|a| a as P<'_>).collect();
        let rows = q_all(&c, &sql, &params).await?;
        rows.iter()
            .map(|row| full_task_from_row(row, &Scope::All))
            .collect()
    }

    pub(crate) async fn overview(&self, since: i64, scope: Scope) -> Result<crate::Overview> {
        let c = self.conn().await?;
        let owner = match scope {
            Scope::All => None,
            Scope::Owner(o) => Some(o),
        };
        let rows = q_all(
            &c,
            "SELECT agent, COUNT(*), MIN(created_at) FROM tasks
             WHERE state IN ('queued', 'parked') AND ($1::text IS NULL OR owner = $1)
             GROUP BY agent ORDER BY agent",
            &[&owner],
        )
        .await?;
        let mut queues = Vec::new();
        for r in &rows {
            queues.push(crate::AgentQueue {
                agent: get(r, 0)?,
                waiting: get::<i64>(r, 1)? as u64,
                oldest_created_at: get(r, 2)?,
            });
        }
        let rows = q_all(
            &c,
            "SELECT finished_at / 60000 * 60000,
                COUNT(*) FILTER (WHERE state = 'succeeded'),
                COUNT(*) FILTER (WHERE state <> 'succeeded')
             FROM tasks WHERE finished_at >= $1::bigint / 60000 * 60000 AND ($2::text IS NULL OR owner = $2)
             GROUP BY 1 ORDER BY 1",
            &[&since, &owner],
        )
        .await?;
        let mut finished_per_minute = Vec::new();
        for r in &rows {
            finished_per_minute.push((
                get(r, 0)?,
                get::<i64>(r, 1)? as u64,
                get::<i64>(r, 2)? as u64,
            ));
        }
        Ok(crate::Overview {
            queues,
            finished_per_minute,
        })
    }

    pub(crate) async fn put_web_session(
        &self,
        hash: [u8; 32],
        kind: crate::WebSessionKind,
        session: crate::WebSession,
    ) -> Result<()> {
        let c = self.conn().await?;
        let now = self.clock.now_ms();
        q_all(
            &c,
            "DELETE FROM web_sessions WHERE expires_at <= $1",
            &[&now],
        )
        .await?;
        q_all(
            &c,
            "INSERT INTO web_sessions (id_sha256, kind, token_id, role, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &&hash[..],
                &kind.as_str(),
                &session.token_id,
                &session.role.as_str(),
                &now,
                &session.expires_at,
            ],
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn web_session(
        &self,
        hash: [u8; 32],
        kind: crate::WebSessionKind,
        take: bool,
    ) -> Result<Option<crate::WebSession>> {
        let c = self.conn().await?;
        let now = self.clock.now_ms();
        // DELETE … RETURNING: of two servers taking the same code, one gets the row.
        let sql = if take {
            "DELETE FROM web_sessions WHERE id_sha256 = $1 AND kind = $2
             RETURNING token_id, role, expires_at"
        } else {
            "SELECT token_id, role, expires_at FROM web_sessions
             WHERE id_sha256 = $1 AND kind = $2"
        };
        let Some(r) = q_opt(&c, sql, &[&&hash[..], &kind.as_str()]).await? else {
            return Ok(None);
        };
        let role: String = get(&r, 1)?;
        let expires_at: i64 = get(&r, 2)?;
        Ok((expires_at > now)
            .then(|| {
                Some(crate::WebSession {
                    token_id: get(&r, 0).ok()?,
                    role: Role::parse(&role)?,
                    expires_at,
                })
            })
            .flatten())
    }

    pub(crate) async fn cancel(&self, id: String, scope: Scope) -> Result<Task> {
        write!(self, |w| {
            let t = w.open_task(&id).await?;
            match model::cancel(&t, &scope)? {
                Cancel::Now => {
                    w.finish_task(&t, TaskState::Cancelled, Some(CANCELLED_BEFORE_RUN), None)
                        .await?;
                }
                Cancel::Request => {
                    w.exec(
                        "UPDATE tasks SET state = 'cancelling', cancel_requested = TRUE,
                         reason = 'cancel requested', updated_at = $2 WHERE seq = $1",
                        &[&t.seq, &w.now],
                    )
                    .await?;
                    w.event(t.seq, t.attempt, "state", &StateEvent::Cancelling.data())
                        .await?;
                    w.fx.changed.push(t.id.clone());
                    w.settle_pending(&t, "the task was cancelled").await?;
                }
                Cancel::AlreadyRequested => {}
            }
            load_task(w.tx().await?, &id, &Scope::All).await
        })
    }

    pub(crate) async fn claim(
        &self,
        req: ClaimRequest,
        token: Option<String>,
    ) -> Result<Option<Offer>> {
        write!(self, |w| {
            // The oldest ready tasks this runner may take: one range of `tasks_ready_claim`
            // per (agent, project or none) it has, merged by seq, so tasks queued for agents
            // or projects it lacks cost nothing here. Then the first that can be locked
            // (others' claims are skipped, not waited for) and still qualifies.
            //
            // PostgreSQL plans the arrays' form anew at every call (a generic plan's estimate,
            // ten rows per unknown array, always loses to the custom one's), which cost more
            // than running it; one statement per (agent, project) with plain parameters gets
            // its generic plan cached after five calls. Up to `CLAIM_PAIRS` pairs (pipelined:
            // no extra round trip), the arrays' form beyond.
            let pair_sql = format!(
                "SELECT t.seq FROM tasks t
                 LEFT JOIN sessions s ON s.owner = t.conv_owner AND s.agent = t.agent AND s.conversation = t.conversation
                 WHERE t.ready AND t.agent = $2 AND COALESCE(t.project, '') = $3
                   AND (t.not_before IS NULL OR t.not_before <= $1)
                   AND COALESCE({HOME_EXPR}, $4) = $4
                   AND t.seq <> ALL($5)
                 ORDER BY t.seq LIMIT {CLAIM_BATCH}"
            );
            let sql = format!(
                "SELECT c.seq FROM unnest($2::text[]) AS a(agent)
                 CROSS JOIN (SELECT '' AS project UNION SELECT unnest($3::text[])) AS p
                 CROSS JOIN LATERAL (
                    SELECT t.seq FROM tasks t
                    LEFT JOIN sessions s ON s.owner = t.conv_owner AND s.agent = t.agent AND s.conversation = t.conversation
                    WHERE t.ready AND t.agent = a.agent AND COALESCE(t.project, '') = p.project
                      AND (t.not_before IS NULL OR t.not_before <= $1)
                      AND COALESCE({HOME_EXPR}, $4) = $4
                      AND t.seq <> ALL($5)
                    ORDER BY t.seq LIMIT {CLAIM_BATCH}
                 ) c
                 ORDER BY c.seq LIMIT {CLAIM_BATCH}"
            );
            let mut agents = req.agents.clone();
            agents.sort_unstable();
            agents.dedup();
            let mut projects = vec![String::new()];
            projects.extend(req.projects.iter().cloned());
            projects.sort_unstable();
            projects.dedup();
            let pairs: Vec<(&String, &String)> = agents
                .iter()
                .flat_map(|a| projects.iter().map(move |p| (a, p)))
                .collect();
            let query = if pairs.len() <= CLAIM_PAIRS {
                &pair_sql
            } else {
                &sql
            };
            let (pairs, query) = (&pairs[..], query.as_str());
            let mut skipped: Vec<i64> = Vec::new();
            let mut chosen = None;
            // The runner's row, the first candidates and (with `ack`) the attempts this runner
            // has not confirmed: one round trip (independent).
            if req.ack {
                w.prepare(&[TOUCH_RUNNER, query, UNCONFIRMED]).await?;
            } else {
                w.prepare(&[TOUCH_RUNNER, query]).await?;
            }
            let (touched, first, unconfirmed) = futures_util::future::join3(
                w.touch_runner(&req, token.as_deref()),
                w.claim_candidates(query, pairs, &agents, &req, &[]),
                async {
                    if req.ack {
                        w.all(UNCONFIRMED, &[&req.runner, &req.holding, &token])
                            .await
                    } else {
                        Ok(vec![])
                    }
                },
            )
            .await;
            touched?;
            let unconfirmed = unconfirmed?;
            // One an earlier claim with `ack` started whose answer this runner may never have
            // read comes first (see `model::Unconfirmed`).
            if !unconfirmed.is_empty()
                && let Some(offer) = w.unconfirmed_offer(&req, &unconfirmed).await?
            {
                return Ok(Some(offer));
            }
            let mut first = Some(first?);
            'rounds: for _ in 0..3 {
                let seqs = match first.take() {
                    Some(seqs) => seqs,
                    None => {
                        w.claim_candidates(query, pairs, &agents, &req, &skipped)
                            .await?
                    }
                };
                if seqs.is_empty() {
                    break;
                }
                for seq in seqs {
                    skipped.push(seq);
                    // Locked (or skipped) and re-checked in one statement: the row locked is
                    // what was last committed.
                    let Some(row) = w
                        .opt(
                            "SELECT t.ready, t.not_before, t.agent, t.session_mode, t.resume_id,
                                s.session_id, s.runner, t.attempt
                             FROM tasks t
                             LEFT JOIN sessions s ON s.owner = t.conv_owner AND s.agent = t.agent AND s.conversation = t.conversation
                             WHERE t.seq = $1
                             FOR UPDATE OF t SKIP LOCKED",
                            &[&seq],
                        )
                        .await?
                    else {
                        continue;
                    };
                    let ready: bool = get(&row, 0)?;
                    let not_before: Option<i64> = get(&row, 1)?;
                    let agent: String = get(&row, 2)?;
                    let mode: String = get(&row, 3)?;
                    if !ready || not_before.is_some_and(|nb| nb > w.now) {
                        continue;
                    }
                    let (resume, home) = resolve_session(
                        w.tx().await?,
                        &agent,
                        &mode,
                        get(&row, 4)?,
                        get(&row, 5)?,
                        get(&row, 6)?,
                    )
                    .await?;
                    if home.as_ref().is_some_and(|h| h != &req.runner) {
                        continue;
                    }
                    chosen = Some((seq, mode, resume, get_u32(&row, 7)? + 1));
                    break 'rounds;
                }
            }
            let Some((seq, mode, resume, attempt)) = chosen else {
                return Ok(None);
            };
            let lease_token = random_hex(16);
            let ack_by = w.now + w.settings.ack_timeout_ms;
            // The offer, its event and the task as offered: one round trip (in this order).
            const OFFER: &str = "UPDATE tasks SET state = 'offered', ready = FALSE,
                    attempt = attempt + 1, lease_token = $2, runner = $3, ack_by = $4,
                    lease_until = NULL, not_before = NULL, reason = NULL, updated_at = $5,
                    unconfirmed = $6, offer_resume = $7
                 WHERE seq = $1";
            let load = task_by_seq_sql();
            w.prepare(&[OFFER, INSERT_EVENT, &load]).await?;
            let offered = StateEvent::Offered(&req.runner).data();
            let (updated, evented, task) = futures_util::future::join3(
                w.exec(
                    OFFER,
                    &[
                        &seq,
                        &lease_token,
                        &req.runner,
                        &ack_by,
                        &w.now,
                        &req.ack,
                        &req.ack.then_some(resume.as_deref()).flatten(),
                    ],
                ),
                w.event(seq, attempt, "state", &offered),
                load_task_by_seq(w.conn.client(), seq),
            )
            .await;
            updated?;
            evented?;
            let task = task?;
            if let Some(conv) = &task.conversation
                && model::rebinds_on_offer(&mode)
            {
                let runner = if resume.is_some() {
                    history_runner(
                        w.tx().await?,
                        &task.agent,
                        resume.as_deref().unwrap_or_default(),
                    )
                    .await?
                } else {
                    None
                };
                let conv_owner: String = get(
                    &w.one("SELECT conv_owner FROM tasks WHERE seq = $1", &[&seq])
                        .await?,
                    0,
                )?;
                w.set_binding(
                    &task.agent,
                    conv,
                    &conv_owner,
                    resume.as_deref(),
                    runner.as_deref(),
                )
                .await?;
            }
            w.fx.changed.push(task.id.clone());
            w.fx.deadlines.push(ack_by);
            Ok(Some(Offer {
                attempt: task.attempt,
                lease_token,
                ack_by,
                resume_session_id: resume,
                lease: None,
                task,
            }))
        })
    }

    /// `confirm`: the runner itself acks (it has the offer); else the server acks for it in
    /// the claim that made the offer, and the attempt stays unconfirmed.
    pub(crate) async fn ack(
        &self,
        id: String,
        at: AttemptRef,
        lease_ms: Option<i64>,
        confirm: bool,
    ) -> Result<LeaseStatus> {
        write!(self, |w| {
            let lease_ms = lease_ms.unwrap_or(w.settings.lease_ms);
            let t = w.open_task(&id).await?;
            model::check_attempt(&t, at.attempt, &at.lease_token)?;
            if confirm {
                w.confirm(&t).await?;
            }
            let lease_until = match model::ack(&t, &at, w.now, lease_ms)? {
                Ack::Start { lease_until } => lease_until,
                Ack::Again(status) => return Ok(status),
                Ack::Expired(e) => {
                    w.requeue_offer(&t).await?;
                    return Err(e);
                }
            };
            // The start and its event: one round trip.
            const START: &str = "UPDATE tasks SET state = 'running', runs = runs + 1,
                    ack_by = NULL, lease_until = $2, started_at = COALESCE(started_at, $3),
                    updated_at = $3
                 WHERE seq = $1";
            w.prepare(&[START, INSERT_EVENT]).await?;
            let running = StateEvent::Running(t.runner.as_deref()).data();
            let (updated, evented) = futures_util::future::join(
                w.exec(START, &[&t.seq, &lease_until, &w.now]),
                w.event(t.seq, t.attempt, "state", &running),
            )
            .await;
            updated?;
            evented?;
            w.fx.changed.push(t.id.clone());
            w.fx.deadlines.push(lease_until);
            w.deliver_started(&t).await?;
            Ok(LeaseStatus {
                lease_until,
                lease_ms,
                cancel: false,
            })
        })
    }

    pub(crate) async fn return_offer(&self, id: String, at: AttemptRef) -> Result<bool> {
        write!(self, |w| {
            let t = w.open_task(&id).await?;
            if t.state != TaskState::Offered
                || model::check_attempt(&t, at.attempt, &at.lease_token).is_err()
            {
                return Ok(false);
            }
            w.requeue_offer(&t).await?;
            Ok(true)
        })
    }

    pub(crate) async fn return_start(&self, id: String, at: AttemptRef) -> Result<bool> {
        write!(self, |w| {
            let t = w.open_task(&id).await?;
            if !matches!(t.state, TaskState::Running | TaskState::Cancelling)
                || model::check_attempt(&t, at.attempt, &at.lease_token).is_err()
            {
                return Ok(false);
            }
            // The start is not counted: nobody ran it.
            w.end_or_queue_again(
                &t,
                model::start_returned(&t),
                "UPDATE tasks SET state = 'queued', ready = TRUE, lease_until = NULL,
                    lease_token = NULL, runs = runs - 1, reason = $2, updated_at = $3
                 WHERE seq = $1",
            )
            .await?;
            Ok(true)
        })
    }

    pub(crate) async fn may_resume(&self, id: String, session_id: String) -> Result<bool> {
        let c = self.conn().await?;
        let row = q_opt(
            &c,
            "SELECT t.owner, t.agent, EXISTS (SELECT 1 FROM tokens k
                WHERE k.id = t.owner AND k.role = 'client')
             FROM tasks t WHERE t.id = $1",
            &[&id],
        )
        .await?
        .ok_or(StoreError::NotFound("task"))?;
        let owner: String = get(&row, 0)?;
        let agent: String = get(&row, 1)?;
        if !get::<bool>(&row, 2)? {
            return Ok(true);
        }
        let made_by = q_opt(
            &c,
            "SELECT owner FROM session_history WHERE agent = $1 AND session_id = $2",
            &[&agent, &session_id],
        )
        .await?;
        Ok(match made_by {
            None => false,
            Some(r) => get::<Option<String>>(&r, 0)?.is_none_or(|o| o == owner),
        })
    }

    pub(crate) async fn conversation_owner(&self, id: String) -> Result<Option<String>> {
        let c = self.conn().await?;
        let row = q_opt(&c, "SELECT conv_owner FROM tasks WHERE id = $1", &[&id])
            .await?
            .ok_or(StoreError::NotFound("task"))?;
        Ok(Some(get::<String>(&row, 0)?).filter(|o| !o.is_empty()))
    }

    pub(crate) async fn current_attempt(&self, id: String) -> Result<Option<CurrentAttempt>> {
        let c = self.conn().await?;
        let row = q_opt(
            &c,
            "SELECT attempt, lease_token, runner, state FROM tasks WHERE id = $1",
            &[&id],
        )
        .await?
        .ok_or(StoreError::NotFound("task"))?;
        let lease_token: Option<String> = get(&row, 1)?;
        let state: String = get(&row, 3)?;
        Ok(match lease_token {
            None => None,
            Some(lease_token) => Some(CurrentAttempt {
                attempt: get_u32(&row, 0)?,
                lease_token,
                runner: get(&row, 2)?,
                state: TaskState::parse(&state).unwrap_or(TaskState::Failed),
            }),
        })
    }

    pub(crate) async fn heartbeat(&self, id: String, at: AttemptRef) -> Result<LeaseStatus> {
        write!(self, |w| {
            let t = w.open_task(&id).await?;
            model::check_attempt(&t, at.attempt, &at.lease_token)?;
            w.confirm(&t).await?;
            let lease_until = w.renew_lease(&t).await?;
            Ok(model::heartbeat_status(
                &t,
                lease_until,
                w.settings.lease_ms,
            ))
        })
    }

    pub(crate) async fn append_events(&self, id: String, req: AppendEvents) -> Result<AppendAck> {
        write!(self, |w| {
            // The task and its log's counters (one statement); then each event's duplicate
            // check and insert in one statement, the lease renewal sent with the first: for
            // a post of one event, one round trip between the lock and the commit.
            let (t, mut log) = w.open_task_counting(&id).await?;
            model::check_attempt(&t, req.attempt, &req.lease_token)?;
            w.confirm(&t).await?;
            let mut renewal = None;
            if model::events_renew_lease(&t) {
                w.check_lease(&t).await?;
                renewal = Some(model::renewed_lease(&t, w.now, w.settings.lease_ms));
                w.prepare(&[RENEW_LEASE, INSERT_EVENT_ONCE]).await?;
            }
            let (max_events, max_bytes) =
                (w.settings.max_task_events, w.settings.max_task_event_bytes);
            let mut accepted = 0;
            let mut newly_dropped = 0i64;
            for e in &req.events {
                let data = e.data.to_string();
                let size = model::event_size(&e.kind, &data);
                let before = (log.count, log.bytes, log.truncated);
                let admit = model::admit_event(&mut log, size, max_events, max_bytes);
                if let model::Admit::Store = admit {
                    let insert = w.insert_event_once(t.seq, t.attempt, e.n, &e.kind, &data);
                    let stored = match renewal.take() {
                        Some(until) => {
                            let (renewed, stored) =
                                futures_util::future::join(w.renew_to(&t, until), insert).await;
                            renewed?;
                            stored?
                        }
                        None => insert.await?,
                    };
                    if !stored {
                        // A duplicate: skipped, and not counted.
                        (log.count, log.bytes, log.truncated) = before;
                        continue;
                    }
                } else {
                    if let Some(until) = renewal.take() {
                        w.renew_to(&t, until).await?;
                    }
                    let dup = w
                        .opt(
                            "SELECT 1 FROM task_events WHERE task_seq = $1 AND attempt = $2 AND n = $3",
                            &[&t.seq, &(t.attempt as i64), &(e.n as i64)],
                        )
                        .await?
                        .is_some();
                    if dup {
                        (log.count, log.bytes, log.truncated) = before;
                        continue;
                    }
                    if let model::Admit::Truncate = admit {
                        w.event(
                            t.seq,
                            t.attempt,
                            model::TRUNCATED_KIND,
                            &model::truncated_data(max_events, max_bytes),
                        )
                        .await?;
                    }
                    newly_dropped += 1;
                }
                accepted += 1;
                // The session is recorded even when its event is not stored: affinity needs it.
                if let Some(sid) = model::reported_session(e) {
                    w.record_session(&t, sid).await?;
                }
            }
            if let Some(until) = renewal.take() {
                w.renew_to(&t, until).await?;
            }
            if newly_dropped > 0 {
                w.exec(
                    "UPDATE tasks SET events_dropped = events_dropped + $2 WHERE seq = $1",
                    &[&t.seq, &newly_dropped],
                )
                .await?;
            }
            if accepted > 0 {
                w.fx.changed.push(t.id.clone());
                if model::shows_progress(&t, &req.events) {
                    w.deliver_progress(&t).await?;
                }
            }
            Ok(AppendAck {
                accepted,
                cancel: t.state == TaskState::Cancelling,
                truncated: log.truncated,
            })
        })
    }

    pub(crate) async fn finish(&self, id: String, req: FinishRequest) -> Result<Task> {
        write!(self, |w| {
            let t = w.open_task(&id).await?;
            model::check_attempt(&t, req.attempt, &req.lease_token)?;
            w.confirm(&t).await?;
            match model::finish(&t, req.attempt)? {
                Finish::Record { check_lease } => {
                    if check_lease {
                        w.check_lease(&t).await?;
                    }
                }
                Finish::Again => return load_task_by_seq(w.tx().await?, t.seq).await,
            }
            if let Some(sid) = &req.result.session_id {
                w.record_session(&t, sid).await?;
            }
            // The result is written by the same UPDATE as the state (one row version, one
            // statement fewer).
            match req.outcome {
                Outcome::Parked => {
                    w.settle_pending(&t, "the attempt ended").await?;
                    let not_before = req.not_before.unwrap_or(w.now);
                    let reason = model::parked_reason(&req.result).to_owned();
                    w.exec(
                        "UPDATE tasks SET state = 'parked', ready = TRUE, not_before = $2,
                            lease_until = NULL, ack_by = NULL, lease_token = NULL,
                            reason = $3, updated_at = $4, result = $5
                         WHERE seq = $1",
                        &[&t.seq, &not_before, &reason, &w.now, &to_json(&req.result)],
                    )
                    .await?;
                    w.event(
                        t.seq,
                        t.attempt,
                        "state",
                        &StateEvent::Parked(not_before).data(),
                    )
                    .await?;
                    w.fx.changed.push(t.id.clone());
                    w.fx.deadlines.push(not_before);
                    if not_before <= w.now {
                        let hint = w.ready_hint(t.seq).await?;
                        w.fx.ready.push(hint.into());
                    }
                }
                outcome => {
                    let reason = model::finished_reason(outcome, &req.result);
                    w.finish_task(&t, outcome.state(), reason, Some(&req.result))
                        .await?;
                }
            }
            load_task_by_seq(w.tx().await?, t.seq).await
        })
    }

    pub(crate) async fn events(
        &self,
        id: String,
        scope: Scope,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<TaskEvent>, TaskState)> {
        let c = self.conn().await?;
        let row = q_opt(
            &c,
            "SELECT seq, owner, state FROM tasks WHERE id = $1",
            &[&id],
        )
        .await?
        .ok_or(StoreError::NotFound("task"))?;
        let seq: i64 = get(&row, 0)?;
        let owner: String = get(&row, 1)?;
        let state: String = get(&row, 2)?;
        model::check_owner(&scope, &owner)?;
        // A page ends at the event that fills EVENT_PAGE_BYTES (sizes summed in the database,
        // so the data of events past it is never sent here).
        let rows = q_all(
            &c,
            "WITH page AS (
                SELECT seq, sum(octet_length(kind) + octet_length(data)) OVER (ORDER BY seq)
                    - octet_length(kind) - octet_length(data) AS before
                FROM task_events WHERE task_seq = $1 AND seq > $2 ORDER BY seq LIMIT $3)
             SELECT e.seq, e.attempt, e.kind, e.data, e.at
             FROM page p JOIN task_events e ON e.task_seq = $1 AND e.seq = p.seq
             WHERE p.before < $4 ORDER BY e.seq",
            &[
                &seq,
                &(after as i64),
                &(limit.clamp(1, 10_000) as i64),
                &(crate::EVENT_PAGE_BYTES as i64),
            ],
        )
        .await?;
        let events = rows
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok((events, parse_state(&state)?))
    }

    pub(crate) async fn event_log_end(&self, id: String, scope: Scope) -> Result<(TaskState, u64)> {
        let c = self.conn().await?;
        let row = q_opt(
            &c,
            "SELECT owner, state, next_event_seq - 1 FROM tasks WHERE id = $1",
            &[&id],
        )
        .await?
        .ok_or(StoreError::NotFound("task"))?;
        let owner: String = get(&row, 0)?;
        let state: String = get(&row, 1)?;
        let last: i64 = get(&row, 2)?;
        model::check_owner(&scope, &owner)?;
        Ok((parse_state(&state)?, last.max(0) as u64))
    }

    pub(crate) async fn last_events(&self, id: String, n: u32) -> Result<Vec<TaskEvent>> {
        let c = self.conn().await?;
        // Bounded by EVENT_PAGE_BYTES like `events`, counted from the newest.
        let rows = q_all(
            &c,
            "WITH t AS (SELECT seq FROM tasks WHERE id = $1),
             page AS (
                SELECT e.seq, sum(octet_length(e.kind) + octet_length(e.data))
                    OVER (ORDER BY e.seq DESC)
                    - octet_length(e.kind) - octet_length(e.data) AS before
                FROM task_events e, t WHERE e.task_seq = t.seq ORDER BY e.seq DESC LIMIT $2)
             SELECT e.seq, e.attempt, e.kind, e.data, e.at
             FROM page p, t, task_events e
             WHERE e.task_seq = t.seq AND e.seq = p.seq AND p.before < $3
             ORDER BY e.seq DESC",
            &[&id, &(n as i64), &(crate::EVENT_PAGE_BYTES as i64)],
        )
        .await?;
        let mut events = rows
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>>>()?;
        events.reverse();
        Ok(events)
    }

    pub(crate) async fn expire_due(&self) -> Result<Option<i64>> {
        let now = self.clock.now_ms();
        let due = {
            let c = self.conn().await?;
            q_all(
                &c,
                "SELECT seq, 1 FROM tasks WHERE state = 'offered' AND ack_by <= $1
                 UNION ALL SELECT seq, 2 FROM tasks
                    WHERE state IN ('running', 'cancelling') AND lease_until <= $1
                 UNION ALL SELECT seq, 3 FROM tasks WHERE state = 'parked' AND not_before <= $1
                 UNION ALL SELECT task_seq, 4 FROM approvals
                    WHERE state = 'pending' AND expires_at <= $1
                 UNION ALL (SELECT seq, 5 FROM tasks
                    WHERE state = 'queued' AND created_at <= $1 - $2 ORDER BY created_at LIMIT 500)
                 ORDER BY 1 LIMIT 1000",
                &[&now, &self.settings.max_queue_ms.unwrap_or(i64::MAX / 2)],
            )
            .await?
        };
        // One transaction per task, each re-checking the deadline under the task's lock:
        // another instance may have handled it first.
        for row in &due {
            let seq: i64 = get(row, 0)?;
            let kind: i32 = get(row, 1)?;
            write!(self, |w| {
                let Some(t) = w.open_task_seq(seq).await? else {
                    return Ok(());
                };
                match kind {
                    1 if t.state == TaskState::Offered && t.ack_by.is_some_and(|d| d <= w.now) => {
                        w.requeue_offer(&t).await?;
                    }
                    2 if matches!(t.state, TaskState::Running | TaskState::Cancelling)
                        && t.lease_until.is_some_and(|l| l <= w.now) =>
                    {
                        w.expire_lease(&t).await?;
                    }
                    3 if t.state == TaskState::Parked
                        && t.not_before.is_some_and(|n| n <= w.now) =>
                    {
                        w.exec(
                            "UPDATE tasks SET state = 'queued', not_before = NULL, updated_at = $2
                             WHERE seq = $1",
                            &[&seq, &w.now],
                        )
                        .await?;
                        w.event(seq, t.attempt, "state", &StateEvent::Queued(None).data())
                            .await?;
                        w.fx.changed.push(t.id.clone());
                        let hint = w.ready_hint(seq).await?;
                        w.fx.ready.push(hint.into());
                    }
                    5 if t.state == TaskState::Queued => {
                        let Some(max) = w.settings.max_queue_ms else {
                            return Ok(());
                        };
                        let old = w
                            .opt(
                                "SELECT 1 FROM tasks WHERE seq = $1 AND created_at <= $2",
                                &[&seq, &(w.now - max)],
                            )
                            .await?;
                        if old.is_some() {
                            let reason = model::queue_expired_reason(max);
                            w.finish_task(&t, TaskState::TimedOut, Some(&reason), None)
                                .await?;
                        }
                    }
                    4 => {
                        // Under the task's lock: each request still pending and past its time.
                        let rows = w
                            .all(
                                "SELECT id FROM approvals WHERE task_seq = $1
                                    AND state = 'pending' AND expires_at <= $2
                                 ORDER BY id FOR UPDATE",
                                &[&seq, &w.now],
                            )
                            .await?;
                        for r in &rows {
                            let id: String = get(r, 0)?;
                            let a = load_approval(w.tx().await?, &id).await?.0;
                            let outcome = model::expired_outcome(&a, w.now);
                            w.settle_approval(&t, &a, ApprovalState::Expired, outcome)
                                .await?;
                        }
                    }
                    _ => {}
                }
                Ok(())
            })?;
        }
        let c = self.conn().await?;
        next_deadline(&c, self.settings.max_queue_ms).await
    }

    pub(crate) async fn runners(&self) -> Result<Vec<RunnerInfo>> {
        let online_ms = self.settings.runner_online_ms;
        let now = self.clock.now_ms();
        let c = self.conn().await?;
        let rows = q_all(
            &c,
            "SELECT r.name, r.agents, r.projects, r.capacity, r.version, r.first_seen, r.last_seen,
                r.agent_versions,
                (SELECT COUNT(*) FROM tasks t WHERE t.runner = r.name AND t.finished_at IS NULL
                    AND t.state IN ('offered', 'running', 'cancelling')),
                r.left_at, r.acp_agents, r.acp_capabilities
             FROM runners r ORDER BY r.name",
            &[],
        )
        .await?;
        rows.iter()
            .map(|r| runner_from_row(r, now, online_ms))
            .collect()
    }

    pub(crate) async fn sessions(
        &self,
        conversation: Option<String>,
        agent: Option<String>,
        limit: u32,
        scope: Scope,
    ) -> Result<SessionList> {
        let owner = match scope {
            Scope::All => None,
            Scope::Owner(o) => Some(o),
        };
        let c = self.conn().await?;
        let limit = limit.clamp(1, 1000) as i64;
        // A client sees the conversations of its own namespace only; an admin every one,
        // other tokens' with their owner.
        let ns = match &owner {
            Some(o) => conv_owner_of(&c, o).await?,
            None => String::new(),
        };
        let rows = q_all(
            &c,
            &format!(
                "SELECT {BINDING_COLUMNS} FROM sessions
                 WHERE ($1::text IS NULL OR conversation = $1) AND ($2::text IS NULL OR agent = $2)
                    AND ($4::text IS NULL OR owner = $5)
                 ORDER BY updated_at DESC LIMIT $3"
            ),
            &[&conversation, &agent, &limit, &owner, &ns],
        )
        .await?;
        let sessions = rows
            .iter()
            .map(|r| binding_from_row(r, &ns))
            .collect::<Result<Vec<_>>>()?;
        let rows = q_all(
            &c,
            "SELECT agent, session_id, runner, conversation, last_used FROM session_history
             WHERE ($1::text IS NULL OR conversation = $1) AND ($2::text IS NULL OR agent = $2)
                AND ($4::text IS NULL OR owner IS NULL OR owner = $4)
             ORDER BY last_used DESC LIMIT $3",
            &[&conversation, &agent, &limit, &owner],
        )
        .await?;
        let recent = rows
            .iter()
            .map(recent_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(SessionList { sessions, recent })
    }

    pub(crate) async fn bind_session(
        &self,
        cmd: SessionCommand,
        scope: Scope,
    ) -> Result<SessionBinding> {
        write!(self, |w| {
            let owner = match &scope {
                Scope::All => None,
                Scope::Owner(o) => Some(o.clone()),
            };
            // The conversation is the caller's own, in its namespace: nothing another token
            // bound under the same name is touched.
            let ns = match &owner {
                Some(o) => w.conv_owner_of(o).await?,
                None => String::new(),
            };
            w.lock_key(&session_key(&cmd.agent, &cmd.conversation, &ns))
                .await?;
            if let (Some(o), Some(id)) = (&owner, &cmd.session_id) {
                let made = w
                    .opt(
                        "SELECT owner FROM session_history WHERE agent = $1 AND session_id = $2",
                        &[&cmd.agent, id],
                    )
                    .await?;
                if let Some(row) = made
                    && get::<Option<String>>(&row, 0)?.is_some_and(|b| &b != o)
                {
                    return Err(StoreError::NotFound("session"));
                }
            }
            let runner = match (&cmd.session_id, &cmd.runner) {
                (_, Some(r)) => Some(r.clone()),
                (Some(id), None) => history_runner(w.tx().await?, &cmd.agent, id).await?,
                (None, None) => None,
            };
            w.set_binding(
                &cmd.agent,
                &cmd.conversation,
                &ns,
                cmd.session_id.as_deref(),
                runner.as_deref(),
            )
            .await?;
            if let Some(id) = &cmd.session_id {
                w.exec(
                    "INSERT INTO session_history (agent, session_id, runner, conversation, last_used, owner)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (agent, session_id) DO UPDATE SET
                        runner = COALESCE(EXCLUDED.runner, session_history.runner),
                        conversation = EXCLUDED.conversation, last_used = EXCLUDED.last_used,
                        owner = COALESCE(session_history.owner, EXCLUDED.owner)",
                    &[&cmd.agent, id, &runner, &cmd.conversation, &w.now, &owner],
                )
                .await?;
            }
            Ok(SessionBinding {
                conversation: cmd.conversation.clone(),
                agent: cmd.agent.clone(),
                session_id: cmd.session_id.clone(),
                runner,
                updated_at: w.now,
                owner: None,
            })
        })
    }

    pub(crate) async fn report_sessions(
        &self,
        runner: String,
        sessions: Vec<tunnel_protocol::ReportedSession>,
    ) -> Result<()> {
        write!(self, |w| {
            for s in &sessions {
                w.exec(
                    "INSERT INTO session_history (agent, session_id, runner, conversation, last_used)
                     VALUES ($1, $2, $3, NULL, $4)
                     ON CONFLICT (agent, session_id) DO UPDATE SET runner = EXCLUDED.runner,
                        last_used = GREATEST(session_history.last_used, EXCLUDED.last_used)",
                    &[&s.agent, &s.session_id, &runner, &s.last_used],
                )
                .await?;
            }
            Ok(())
        })
    }

    pub(crate) async fn runner_left(&self, name: String, token: String) -> Result<bool> {
        write!(self, |w| {
            let n = w
                .exec(
                    "UPDATE runners SET left_at = $2 WHERE name = $1 AND token = $3",
                    &[&name, &w.now, &token],
                )
                .await?;
            Ok(n > 0)
        })
    }

    pub(crate) async fn create_token(
        &self,
        id: String,
        name: String,
        role: Role,
        hash: [u8; 32],
    ) -> Result<TokenInfo> {
        write!(self, |w| {
            w.exec(
                "INSERT INTO tokens (id, name, role, secret_sha256, created_at)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&id, &name, &role.as_str(), &&hash[..], &w.now],
            )
            .await?;
            w.fx.tokens = true;
            Ok(TokenInfo {
                id: id.clone(),
                name: name.clone(),
                role,
                created_at: w.now,
                revoked_at: None,
            })
        })
    }

    pub(crate) async fn tokens(&self) -> Result<Vec<StoredToken>> {
        let c = self.conn().await?;
        let rows = q_all(
            &c,
            "SELECT id, name, role, secret_sha256, created_at, revoked_at FROM tokens
             ORDER BY created_at, id",
            &[],
        )
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    pub(crate) async fn revoke_token(&self, id: String) -> Result<TokenInfo> {
        write!(self, |w| {
            let row = w
                .opt(
                    "UPDATE tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1
                     RETURNING name, role, created_at, revoked_at",
                    &[&id, &w.now],
                )
                .await?
                .ok_or(StoreError::NotFound("token"))?;
            w.fx.tokens = true;
            let role: String = get(&row, 1)?;
            Ok(TokenInfo {
                id: id.clone(),
                name: get(&row, 0)?,
                role: Role::parse(&role).unwrap_or(Role::Client),
                created_at: get(&row, 2)?,
                revoked_at: get(&row, 3)?,
            })
        })
    }

    /// Due rows, at most one per destination (its oldest pending one), each claimed for this
    /// instance until it records the outcome (or `OUTBOX_CLAIM_MS` passes).
    pub(crate) async fn due_deliveries(
        &self,
        limit: u32,
    ) -> Result<(Vec<crate::Delivery>, Option<i64>)> {
        let claimed: Vec<i64> = write!(self, |w| {
            let rows = w
                .all(
                    "WITH due AS (
                        SELECT o.id FROM outbox o
                        WHERE o.state = 'pending' AND o.next_at <= $1
                          AND (o.claimed_until IS NULL OR o.claimed_until <= $1)
                          AND o.id = (SELECT MIN(p.id) FROM outbox p
                                      WHERE p.destination = o.destination AND p.state = 'pending')
                        ORDER BY o.id LIMIT $2
                        FOR UPDATE SKIP LOCKED)
                     UPDATE outbox SET claimed_until = $3 FROM due
                     WHERE outbox.id = due.id AND outbox.state = 'pending'
                       AND (outbox.claimed_until IS NULL OR outbox.claimed_until <= $1)
                     RETURNING outbox.id",
                    &[&w.now, &(limit as i64), &(w.now + OUTBOX_CLAIM_MS)],
                )
                .await?;
            rows.iter().map(|r| get::<i64>(r, 0)).collect()
        })?;
        let c = self.conn().await?;
        let mut out = Vec::new();
        let mut ids = claimed;
        ids.sort_unstable();
        for id in ids {
            let Some(r) = q_opt(
                &c,
                "SELECT o.id, o.kind, o.target, o.body, o.attempts, o.done_parts, t.id,
                    (SELECT p.message_id FROM outbox p WHERE p.task_seq = o.task_seq
                        AND p.kind = 'progress' AND p.state = 'sent' LIMIT 1)
                 FROM outbox o LEFT JOIN tasks t ON t.seq = o.task_seq WHERE o.id = $1",
                &[&id],
            )
            .await?
            else {
                continue;
            };
            let (mut delivery, task_id) = delivery_from_row(&r)?;
            if let Some(aid) = model::delivery_approval(&delivery) {
                delivery.approval = match load_approval(&c, &aid).await {
                    Ok((a, _)) => Some(a),
                    Err(StoreError::NotFound(_)) => None,
                    Err(e) => return Err(e),
                };
                if let Some(tid) = &task_id {
                    let body = model::approval_body(&aid).to_string();
                    delivery.approval_message = match q_opt(
                        &c,
                        "SELECT message_id FROM outbox
                         WHERE task_seq = (SELECT seq FROM tasks WHERE id = $1)
                           AND kind = 'approval' AND body = $2 AND message_id IS NOT NULL
                         LIMIT 1",
                        &[tid, &body],
                    )
                    .await?
                    {
                        Some(r) => get(&r, 0)?,
                        None => None,
                    };
                }
            }
            if let Some(tid) = task_id {
                delivery.task = Some(load_task(&c, &tid, &Scope::All).await?);
            }
            out.push(delivery);
        }
        let row = q_one(
            &c,
            // The next time a destination's first message is due: a row behind a
            // rate-limited one is not due before it (else the worker spins until then).
            "SELECT MIN(GREATEST(o.next_at, COALESCE(o.claimed_until, 0))) FROM outbox o
             WHERE o.state = 'pending'
               AND o.id = (SELECT MIN(p.id) FROM outbox p
                           WHERE p.destination = o.destination AND p.state = 'pending')",
            &[],
        )
        .await?;
        Ok((out, get(&row, 0)?))
    }

    pub(crate) async fn update_delivery(
        &self,
        id: i64,
        update: crate::DeliveryUpdate,
    ) -> Result<()> {
        // Recording an outcome twice is harmless (at most one attempt counted twice); not
        // recording it sends the message again once the claim runs out. So a COMMIT whose
        // outcome is unknown (the connection dropped during it) is simply done again.
        let mut tries = 0;
        loop {
            tries += 1;
            match self.record_delivery(id, &update).await {
                Err(StoreError::Unavailable(m)) if m.starts_with(COMMIT_FAILED) && tries < 5 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(StoreError::NotFound(_)) if tries > 1 => return Ok(()),
                other => return other,
            }
        }
    }

    async fn record_delivery(&self, id: i64, update: &crate::DeliveryUpdate) -> Result<()> {
        use crate::DeliveryUpdate as U;
        write!(self, |w| {
            let changed = match update {
                U::Parts {
                    done_parts,
                    message_id,
                } => {
                    w.exec(
                        "UPDATE outbox SET done_parts = $2, message_id = COALESCE(message_id, $3),
                            claimed_until = $5, updated_at = $4 WHERE id = $1",
                        &[
                            &id,
                            &(*done_parts as i64),
                            message_id,
                            &w.now,
                            &(w.now + OUTBOX_CLAIM_MS),
                        ],
                    )
                    .await?
                }
                U::Sent { message_id } => {
                    w.exec(
                        "UPDATE outbox SET state = 'sent', attempts = attempts + 1,
                            message_id = COALESCE(message_id, $2), last_error = NULL,
                            claimed_until = NULL, updated_at = $3
                         WHERE id = $1",
                        &[&id, message_id, &w.now],
                    )
                    .await?
                }
                U::Retry { at, error } => {
                    w.exec(
                        "UPDATE outbox SET attempts = attempts + 1, next_at = $2, last_error = $3,
                            claimed_until = NULL, updated_at = $4 WHERE id = $1",
                        &[&id, at, error, &w.now],
                    )
                    .await?
                }
                U::Wait { at, error } => {
                    w.exec(
                        "UPDATE outbox SET next_at = $2, last_error = $3,
                            claimed_until = NULL, updated_at = $4 WHERE id = $1",
                        &[&id, at, error, &w.now],
                    )
                    .await?
                }
                U::Failed { error } => {
                    w.exec(
                        "UPDATE outbox SET state = 'failed', attempts = attempts + 1,
                            last_error = $2, claimed_until = NULL, updated_at = $3 WHERE id = $1",
                        &[&id, error, &w.now],
                    )
                    .await?
                }
            };
            if changed == 0 {
                return Err(StoreError::NotFound("delivery"));
            }
            if let Some(row) = w
                .opt(
                    "SELECT t.id FROM outbox o JOIN tasks t ON t.seq = o.task_seq WHERE o.id = $1",
                    &[&id],
                )
                .await?
            {
                w.fx.changed.push(get(&row, 0)?);
            }
            if model::frees_destination(update) {
                w.fx.delivery = true;
            }
            Ok(())
        })
    }

    pub(crate) async fn notify(&self, target: ReplyTo, text: String) -> Result<i64> {
        write!(self, |w| {
            w.enqueue(None, "notify", &target, Some(&model::notify_body(&text)), 0)
                .await
        })
    }

    pub(crate) async fn prune(&self, before: i64, limit: u32) -> Result<crate::Pruned> {
        write!(self, |w| {
            // SKIP LOCKED: another server pruning at the same time takes other rows.
            let rows = w
                .all(
                    "SELECT seq FROM tasks t
                     WHERE finished_at IS NOT NULL AND finished_at < $1
                       AND NOT EXISTS (SELECT 1 FROM outbox o
                                       WHERE o.task_seq = t.seq AND o.state = 'pending')
                     ORDER BY finished_at LIMIT $2
                     FOR UPDATE OF t SKIP LOCKED",
                    &[&before, &i64::from(limit)],
                )
                .await?;
            let seqs = rows
                .iter()
                .map(|r| get::<i64>(r, 0))
                .collect::<Result<Vec<i64>>>()?;
            let mut out = crate::Pruned::default();
            if !seqs.is_empty() {
                out.events = w
                    .exec("DELETE FROM task_events WHERE task_seq = ANY($1)", &[&seqs])
                    .await?;
                out.deliveries = w
                    .exec("DELETE FROM outbox WHERE task_seq = ANY($1)", &[&seqs])
                    .await?;
                out.tasks = w
                    .exec("DELETE FROM tasks WHERE seq = ANY($1)", &[&seqs])
                    .await?;
            }
            out.deliveries += w
                .exec(
                    "DELETE FROM outbox WHERE id IN (
                        SELECT id FROM outbox WHERE task_seq IS NULL AND state <> 'pending'
                          AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    &[&before, &i64::from(limit)],
                )
                .await?;
            out.runners = w
                .exec(
                    "DELETE FROM runners WHERE last_seen < $1 AND NOT EXISTS (
                        SELECT 1 FROM tasks WHERE runner = runners.name AND finished_at IS NULL)",
                    &[&before],
                )
                .await?;
            Ok(out)
        })
    }

    pub(crate) async fn create_approval(
        &self,
        id: String,
        req: ApprovalRequest,
    ) -> Result<(Approval, bool)> {
        write!(self, |w| {
            let t = w.open_task(&id).await?;
            model::check_attempt(&t, req.attempt, &req.lease_token)?;
            let existing = w
                .opt(
                    "SELECT id FROM approvals WHERE task_seq = $1 AND attempt = $2 AND key = $3",
                    &[&t.seq, &(t.attempt as i64), &req.key],
                )
                .await?;
            if let Some(row) = existing {
                let aid: String = get(&row, 0)?;
                return Ok((load_approval(w.tx().await?, &aid).await?.0, false));
            }
            w.check_lease(&t).await?;
            let row = w
                .one(
                    "SELECT COUNT(*) FILTER (WHERE state = 'pending'),
                        COUNT(*) FILTER (WHERE attempt = $2)
                     FROM approvals WHERE task_seq = $1",
                    &[&t.seq, &(t.attempt as i64)],
                )
                .await?;
            model::check_can_ask(&t, get(&row, 0)?, get(&row, 1)?)?;
            w.renew_lease(&t).await?;
            let aid = model::new_approval_id();
            let expires_at = model::approval_expires(w.now, req.timeout_ms);
            w.exec(
                "INSERT INTO approvals (id, task_seq, attempt, key, agent, runner, owner, state,
                    tool, options, asked_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8, $9, $10, $11)",
                &[
                    &aid,
                    &t.seq,
                    &(t.attempt as i64),
                    &req.key,
                    &t.agent,
                    &t.runner,
                    &t.owner,
                    &to_json(&req.tool),
                    &to_json(&req.options),
                    &w.now,
                    &expires_at,
                ],
            )
            .await?;
            let a = load_approval(w.tx().await?, &aid).await?.0;
            w.event(t.seq, t.attempt, "approval", &model::approval_event(&a))
                .await?;
            w.fx.changed.push(t.id.clone());
            w.fx.deadlines.push(expires_at);
            w.deliver_question(&t, &aid).await?;
            Ok((a, true))
        })
    }

    pub(crate) async fn runner_approval(
        &self,
        task_id: String,
        id: String,
        at: AttemptRef,
    ) -> Result<Approval> {
        let c = self.conn().await?;
        let row = q_opt(
            &c,
            "SELECT attempt, lease_token, state FROM tasks WHERE id = $1",
            &[&task_id],
        )
        .await?
        .ok_or(StoreError::NotFound("task"))?;
        let attempt = get_u32(&row, 0)?;
        let lease_token: Option<String> = get(&row, 1)?;
        let state: String = get(&row, 2)?;
        crate::fence(
            &task_id,
            parse_state(&state)?,
            attempt,
            lease_token.as_deref(),
            &at,
        )?;
        let (a, _) = load_approval(&c, &id).await?;
        if a.task_id != task_id || a.attempt != at.attempt {
            return Err(StoreError::NotFound("approval"));
        }
        Ok(a)
    }

    pub(crate) async fn approval(&self, id: String, scope: Scope) -> Result<Approval> {
        let c = self.conn().await?;
        let (a, owner) = load_approval(&c, &id).await?;
        model::check_approval_owner(&scope, &owner)?;
        Ok(a)
    }

    pub(crate) async fn approvals(
        &self,
        filter: ApprovalFilter,
        scope: Scope,
    ) -> Result<Vec<Approval>> {
        let c = self.conn().await?;
        let owner = match &scope {
            Scope::All => None,
            Scope::Owner(o) => Some(o.clone()),
        };
        let sql = format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals a JOIN tasks t ON t.seq = a.task_seq
             WHERE ($1::text IS NULL OR a.state = $1) AND ($2::text IS NULL OR t.id = $2)
               AND ($3::text IS NULL OR a.owner = $3)
             ORDER BY a.id DESC LIMIT $4"
        );
        let rows = q_all(
            &c,
            &sql,
            &[
                &filter.state.map(|s| s.as_str()),
                &filter.task,
                &owner,
                &(filter.limit.clamp(1, 1000) as i64),
            ],
        )
        .await?;
        rows.iter().map(model::approval_from_row).collect()
    }

    pub(crate) async fn answer_approval(
        &self,
        id: String,
        scope: Scope,
        token_id: String,
        ans: ApprovalAnswer,
    ) -> Result<Approval> {
        write!(self, |w| {
            // The task first, then the request: the order every other write takes them in.
            let task_id: String = match w
                .opt(
                    "SELECT t.id FROM approvals a JOIN tasks t ON t.seq = a.task_seq
                     WHERE a.id = $1",
                    &[&id],
                )
                .await?
            {
                Some(r) => get(&r, 0)?,
                None => return Err(StoreError::NotFound("approval")),
            };
            let t = w.open_task(&task_id).await?;
            w.exec("SELECT 1 FROM approvals WHERE id = $1 FOR UPDATE", &[&id])
                .await?;
            let (a, owner) = load_approval(w.tx().await?, &id).await?;
            model::check_approval_owner(&scope, &owner)?;
            let name: String = match w
                .opt("SELECT name FROM tokens WHERE id = $1", &[&token_id])
                .await?
            {
                Some(r) => get(&r, 0)?,
                None => token_id.clone(),
            };
            let by = model::answered_by(ans.by.as_deref(), &name);
            match model::answer(&a, &ans, by, w.now)? {
                Answer::Settle(state, outcome) => w.settle_approval(&t, &a, state, outcome).await,
                Answer::Expired(outcome, err) => {
                    w.settle_approval(&t, &a, ApprovalState::Expired, outcome)
                        .await?;
                    Err(err)
                }
            }
        })
    }

    pub(crate) async fn counts(&self) -> Result<QueueCounts> {
        let c = self.conn().await?;
        let rows = q_all(&c, crate::COUNT_BY_STATE, &[]).await?;
        let mut by_state = Vec::new();
        for r in &rows {
            let s: String = get(r, 0)?;
            let n: i64 = get(r, 1)?;
            by_state.push((parse_state(&s)?, n as u64));
        }
        Ok(QueueCounts { by_state })
    }
}

// ---------------------------------------------------------------------------------------------
// Migrations

/// Applies the embedded migrations not yet applied, under an advisory lock so that several
/// servers starting together apply each exactly once.
async fn migrate(pool: &Pool) -> Result<()> {
    let mut c = pool.get().await.map_err(pool_err)?;
    let tx = c.transaction().await?;
    // Two-key form: a different key space from the one-key session locks.
    tx.execute("SELECT pg_advisory_xact_lock(1953396334, 1)", &[])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tunnel_migrations (
            version    BIGINT PRIMARY KEY,
            name       TEXT   NOT NULL,
            applied_at BIGINT NOT NULL
        )",
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM tunnel_migrations",
            &[],
        )
        .await?;
    let version: i64 = get(&row, 0)?;
    if version as usize > MIGRATIONS.len() {
        return Err(StoreError::Unavailable(format!(
            "the database is at schema version {version}, newer than this build knows ({}); upgrade tunnel",
            MIGRATIONS.len()
        )));
    }
    let now = crate::SystemClock.now_ms();
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO tunnel_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            &[&(i as i64 + 1), name, &now],
        )
        .await?;
        tracing::info!(version = i + 1, "Applied PostgreSQL migration.");
    }
    tx.commit().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Cross-instance wake-ups

/// Listens on the NOTIFY channel and applies other instances' effects to our [`Signals`].
/// Reconnects when the connection drops, then re-signals what changed meanwhile.
async fn listen_loop(
    config: tokio_postgres::Config,
    pool: Pool,
    signals: Arc<dyn Signals>,
    instance: String,
    clock: Arc<dyn Clock>,
    listening: tokio::sync::oneshot::Sender<()>,
) {
    let mut listening = Some(listening);
    let mut lost_since: Option<i64> = None;
    loop {
        let (client, mut connection) = match config.connect(NoTls).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "PostgreSQL listener cannot connect; retrying in 1 s.");
                lost_since.get_or_insert(clock.now_ms());
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "PostgreSQL listener connection lost.");
                        return;
                    }
                }
            }
        });
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
            tracing::warn!(error = %e, "PostgreSQL LISTEN failed; retrying in 1 s.");
            driver.abort();
            lost_since.get_or_insert(clock.now_ms());
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if let Some(tx) = listening.take() {
            let _ = tx.send(());
        }
        if let Some(since) = lost_since.take() {
            tracing::info!("PostgreSQL listener reconnected.");
            if let Err(e) = resync(&pool, &*signals, since - 5_000, clock.now_ms()).await {
                tracing::warn!(error = %e, "Re-signalling after a reconnect failed.");
            }
        }
        while let Some(payload) = rx.recv().await {
            match serde_json::from_str::<Note>(&payload) {
                Ok(note) if note.i == instance => {}
                Ok(note) => note.fx.apply_remote(&*signals),
                Err(e) => tracing::warn!(error = %e, "Unreadable notification ignored."),
            }
        }
        driver.abort();
        drop(client);
        lost_since = Some(clock.now_ms());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends the effects of this instance's commits to the others: whatever committed while the
/// previous NOTIFY was on its way goes out merged, in one statement (its own short
/// transaction, which writes no WAL and so waits for no flush). A note lost here (the
/// connection dropped, the process died after its commit) costs the others at most the
/// fallback poll's second, as a lost notification always did.
async fn notify_loop(
    pool: Pool,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Effects>,
    instance: String,
) {
    while let Some(first) = rx.recv().await {
        let mut fx = first;
        // Every NOTIFY wakes the listening backend of every server (PostgreSQL signals them
        // all) and each server's listener: per task, several commits' notes cost PostgreSQL
        // more than a transition's statements. Notes without a ready task wait up to
        // `NOTE_WINDOW` for others to go with them; one with a ready task (a dispatch waits
        // on it) or a token change goes at once, with whatever gathered before it.
        if fx.ready.is_empty() && !fx.tokens {
            let until = tokio::time::Instant::now() + NOTE_WINDOW;
            while fx.ready.is_empty() && !fx.tokens {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(more)) => fx.merge(more),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        // Bounded: a merged note is split into payloads under the size limit anyway.
        for _ in 0..256 {
            match rx.try_recv() {
                Ok(more) => fx.merge(more),
                Err(_) => break,
            }
        }
        let payloads = fx.payloads(&instance);
        let sent = async {
            let c = pool.get().await.map_err(pool_err)?;
            let st = c
                .prepare_cached("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                .await?;
            c.execute(&st, &[&CHANNEL, &payloads]).await?;
            Ok::<_, StoreError>(())
        };
        if let Err(e) = sent.await {
            tracing::debug!(error = %e, "A NOTIFY was lost; the others' poll covers it.");
        }
    }
}

/// After the listener was away: everything that may have been missed.
async fn resync(pool: &Pool, signals: &dyn Signals, since: i64, now: i64) -> Result<()> {
    let c = pool.get().await.map_err(pool_err)?;
    let rows = q_all(
        &c,
        "SELECT id FROM tasks WHERE updated_at >= $1
         UNION SELECT t.id FROM task_events e JOIN tasks t ON t.seq = e.task_seq WHERE e.at >= $1",
        &[&since],
    )
    .await?;
    for r in &rows {
        let id: String = get(r, 0)?;
        signals.task_changed(&id);
    }
    poll_once(&c, signals, now).await
}

/// The fallback poll: a lost notification costs at most `POLL_EVERY`.
async fn poll_loop(pool: Pool, signals: Arc<dyn Signals>, clock: Arc<dyn Clock>) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(c) = pool.get().await else { continue };
        if let Err(e) = poll_once(&c, &*signals, clock.now_ms()).await {
            tracing::debug!(error = %e, "The fallback poll failed.");
        }
    }
}

async fn poll_once<C: GenericClient>(c: &C, signals: &dyn Signals, now: i64) -> Result<()> {
    let sql = format!(
        "SELECT t.id, t.agent, t.project, {HOME_EXPR} FROM tasks t
         LEFT JOIN sessions s ON s.owner = t.conv_owner AND s.agent = t.agent AND s.conversation = t.conversation
         WHERE t.ready AND (t.not_before IS NULL OR t.not_before <= $1)
         ORDER BY t.seq LIMIT $2"
    );
    let hints = q_all(c, &sql, &[&now, &POLL_READY]).await?;
    if let Some(next) = next_deadline(c, None).await? {
        signals.deadline(next);
    }
    let row = q_one(
        c,
        "SELECT EXISTS (SELECT 1 FROM outbox WHERE state = 'pending' AND next_at <= $1
            AND (claimed_until IS NULL OR claimed_until <= $1))",
        &[&now],
    )
    .await?;
    if get::<bool>(&row, 0)? {
        signals.delivery_ready();
    }
    for r in &hints {
        signals.task_ready(&ReadyHint {
            task_id: get(r, 0)?,
            agent: get(r, 1)?,
            project: get(r, 2)?,
            runner: get(r, 3)?,
        });
    }
    Ok(())
}

/// The earliest deadline; `max_queue_ms` adds the maximum time in queue of the oldest queued
/// task (the fallback poll leaves it out: each server's own timer has it).
async fn next_deadline<C: GenericClient>(c: &C, max_queue_ms: Option<i64>) -> Result<Option<i64>> {
    let row = q_one(
        c,
        "SELECT LEAST(
            (SELECT MIN(ack_by) FROM tasks WHERE state = 'offered'),
            (SELECT MIN(lease_until) FROM tasks WHERE state IN ('running', 'cancelling')),
            (SELECT MIN(not_before) FROM tasks WHERE state = 'parked'),
            (SELECT MIN(expires_at) FROM approvals WHERE state = 'pending'),
            (SELECT MIN(created_at) + $1 FROM tasks WHERE state = 'queued'))",
        &[&max_queue_ms],
    )
    .await?;
    get(&row, 0)
}

// ---------------------------------------------------------------------------------------------
// Statements

async fn q_all<C: GenericClient>(c: &C, sql: &str, p: &[P<'_>]) -> Result<Vec<Row>> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query(&st, p).await?)
}

async fn q_opt<C: GenericClient>(c: &C, sql: &str, p: &[P<'_>]) -> Result<Option<Row>> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&st, p).await?)
}

async fn q_one<C: GenericClient>(c: &C, sql: &str, p: &[P<'_>]) -> Result<Row> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_one(&st, p).await?)
}

/// The runner a ready task must run on (its session's home), as SQL over `tasks t` left-joined
/// with `sessions s`; the same rule as [`resolve_session`].
const HOME_EXPR: &str = "CASE t.session_mode
        WHEN 'new' THEN NULL
        WHEN 'resume' THEN (SELECT h.runner FROM session_history h
            WHERE h.agent = t.agent AND h.session_id = COALESCE(t.resume_id, ''))
        ELSE CASE WHEN s.session_id IS NOT NULL THEN s.runner END
    END";

impl W<'_> {
    fn err(&self, e: tokio_postgres::Error) -> StoreError {
        // Before COMMIT, a lost connection means the transaction did not happen: re-run it on
        // another connection.
        if retryable(&e) || connection_lost(&e) {
            self.retry.store(true, Ordering::Relaxed);
        }
        e.into()
    }

    /// Runs `f` (statements on this connection) in the transaction. The operation's first
    /// statement carries its BEGIN (or its savepoint in a group): both are sent at once (tokio-postgres writes a request when its
    /// future is first polled, and `join` polls in order), so opening the transaction costs
    /// no round trip of its own.
    async fn run<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        let r = match self.conn.take_prefix() {
            None => f.await,
            Some(prefix) => {
                self.conn.open.store(true, Ordering::SeqCst);
                let (begun, r) =
                    futures_util::future::join(self.conn.client().batch_execute(&prefix), f).await;
                begun.and(r)
            }
        };
        r.map_err(|e| self.err(e))
    }

    /// Prepares the statements (or finds them cached), together: their executions, started
    /// together afterwards (`join`), then go out in order in one round trip, since a cached
    /// statement's request is written when its future is first polled.
    async fn prepare(&self, sqls: &[&str]) -> Result<()> {
        let c = self.conn.client();
        let prepared =
            futures_util::future::join_all(sqls.iter().map(|q| c.prepare_cached(q))).await;
        for p in prepared {
            p.map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// A claim's oldest `CLAIM_BATCH` candidates not in `skipped`, oldest first: `query` once
    /// per (agent, project) pair (pipelined), or once with the arrays when there are more
    /// pairs than `CLAIM_PAIRS` (see `PgStore::claim`).
    async fn claim_candidates(
        &self,
        query: &str,
        pairs: &[(&String, &String)],
        agents: &Vec<String>,
        req: &ClaimRequest,
        skipped: &[i64],
    ) -> Result<Vec<i64>> {
        let skipped = skipped.to_vec();
        let results = if pairs.len() <= CLAIM_PAIRS {
            let params: Vec<[P<'_>; 5]> = pairs
                .iter()
                .map(|(a, p)| -> [P<'_>; 5] { [&self.now, *a, *p, &req.runner, &skipped] })
                .collect();
            futures_util::future::join_all(params.iter().map(|p| self.all(query, p))).await
        } else {
            vec![
                self.all(
                    query,
                    &[&self.now, agents, &req.projects, &req.runner, &skipped],
                )
                .await,
            ]
        };
        let mut seqs = Vec::new();
        for rows in results {
            for row in rows? {
                seqs.push(get::<i64>(&row, 0)?);
            }
        }
        seqs.sort_unstable();
        seqs.truncate(CLAIM_BATCH as usize);
        Ok(seqs)
    }

    /// The connection, with the transaction open: for the readers shared with plain reads.
    async fn tx(&self) -> Result<&deadpool_postgres::Client> {
        self.run(async { Ok(()) }).await?;
        Ok(self.conn.client())
    }

    async fn exec(&self, sql: &str, p: &[P<'_>]) -> Result<u64> {
        let c = self.conn.client();
        self.run(async {
            let st = c.prepare_cached(sql).await?;
            c.execute(&st, p).await
        })
        .await
    }

    async fn all(&self, sql: &str, p: &[P<'_>]) -> Result<Vec<Row>> {
        let c = self.conn.client();
        self.run(async {
            let st = c.prepare_cached(sql).await?;
            c.query(&st, p).await
        })
        .await
    }

    async fn opt(&self, sql: &str, p: &[P<'_>]) -> Result<Option<Row>> {
        let c = self.conn.client();
        self.run(async {
            let st = c.prepare_cached(sql).await?;
            c.query_opt(&st, p).await
        })
        .await
    }

    async fn one(&self, sql: &str, p: &[P<'_>]) -> Result<Row> {
        let c = self.conn.client();
        self.run(async {
            let st = c.prepare_cached(sql).await?;
            c.query_one(&st, p).await
        })
        .await
    }

    /// Serializes this transaction with every other one that locks the same key (a session,
    /// an idempotency key) until commit.
    async fn lock_key(&self, key: &str) -> Result<()> {
        self.exec(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&key],
        )
        .await?;
        Ok(())
    }

    /// Locks a task for a transition: its session first (see the module docs), then its row,
    /// in one statement: the session's lock (the same key as [`W::lock_key`]) is an InitPlan,
    /// which PostgreSQL runs (a one-time filter) before it scans for the row and locks it.
    async fn open_task(&self, id: &str) -> Result<OpenTask> {
        open_task_from_row(&self.open_task_row(id, "").await?)
    }

    /// The task locked as [`W::open_task`] does, with its event log's counters (read in the
    /// same statement: the row is locked, so they stay true until the commit).
    async fn open_task_counting(&self, id: &str) -> Result<(OpenTask, model::EventLog)> {
        const COUNTERS: &str = ", next_event_seq - 1, event_bytes, events_dropped";
        let row = self.open_task_row(id, COUNTERS).await?;
        let at = OPEN_TASK_COLUMNS.split(',').count();
        let (count, bytes, dropped): (i64, i64, i64) =
            (get(&row, at)?, get(&row, at + 1)?, get(&row, at + 2)?);
        let log = model::EventLog {
            count: count as u64,
            bytes: bytes as u64,
            truncated: dropped > 0,
        };
        Ok((open_task_from_row(&row)?, log))
    }

    /// The task's row (`OPEN_TASK_COLUMNS`, then `extra`) locked, after its session's lock.
    async fn open_task_row(&self, id: &str, extra: &str) -> Result<Row> {
        let sql = format!(
            "SELECT {OPEN_TASK_COLUMNS}{extra} FROM tasks
             WHERE id = $1 AND (SELECT COUNT(pg_advisory_xact_lock(hashtextextended(k.session_key, 0)))
                                FROM tasks k WHERE k.id = $1 AND k.session_key IS NOT NULL) >= 0
             FOR UPDATE"
        );
        self.opt(&sql, &[&id])
            .await?
            .ok_or(StoreError::NotFound("task"))
    }

    async fn open_task_seq(&self, seq: i64) -> Result<Option<OpenTask>> {
        let Some(row) = self
            .opt("SELECT id FROM tasks WHERE seq = $1", &[&seq])
            .await?
        else {
            return Ok(None);
        };
        let id: String = get(&row, 0)?;
        match self.open_task(&id).await {
            Ok(t) => Ok(Some(t)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn check_lease(&mut self, t: &OpenTask) -> Result<()> {
        match model::check_lease(t, self.now)? {
            Lease::Live => Ok(()),
            Lease::Expired(e) => {
                self.expire_lease(t).await?;
                Err(e)
            }
        }
    }

    async fn renew_lease(&mut self, t: &OpenTask) -> Result<i64> {
        self.check_lease(t).await?;
        let lease_until = model::renewed_lease(t, self.now, self.settings.lease_ms);
        self.renew_to(t, lease_until).await?;
        Ok(lease_until)
    }

    /// The lease moved to `lease_until` (checked live by the caller: [`W::renew_lease`]).
    async fn renew_to(&self, t: &OpenTask, lease_until: i64) -> Result<()> {
        self.exec(
            RENEW_LEASE,
            &[
                &t.seq,
                &lease_until,
                &self.now,
                &t.runner,
                &model::RUNNER_TOUCH_EVERY_MS,
            ],
        )
        .await?;
        Ok(())
    }

    /// The runner made a call about this attempt, so it has the offer: it is never offered
    /// again (see [`model::Unconfirmed`]).
    async fn confirm(&self, t: &OpenTask) -> Result<()> {
        if t.unconfirmed {
            self.exec(
                "UPDATE tasks SET unconfirmed = FALSE WHERE seq = $1",
                &[&t.seq],
            )
            .await?;
        }
        Ok(())
    }

    /// The first of `rows` (ids from [`UNCONFIRMED`]) still an attempt of this runner that an
    /// earlier claim with `ack` started (or offered) and the runner has not confirmed, as an
    /// offer again; the ones it lists in `holding`, or that are no longer its to have, are
    /// cleared on the way. A row another write holds is skipped (that write is the runner's
    /// call about it, or ends it); none of this changes which task of a session is first, so
    /// no session lock is taken.
    async fn unconfirmed_offer(
        &mut self,
        req: &ClaimRequest,
        rows: &[Row],
    ) -> Result<Option<Offer>> {
        let sql =
            format!("SELECT {OPEN_TASK_COLUMNS} FROM tasks WHERE id = $1 FOR UPDATE SKIP LOCKED");
        for row in rows {
            let id: String = get(row, 0)?;
            let Some(row) = self.opt(&sql, &[&id]).await? else {
                continue;
            };
            let t = open_task_from_row(&row)?;
            let lease_ms = self.settings.lease_ms;
            match model::unconfirmed(&t, &req.runner, &req.holding, self.now, lease_ms) {
                model::Unconfirmed::Again(lease) => {
                    return Ok(Some(Offer {
                        task: load_task_by_seq(self.tx().await?, t.seq).await?,
                        attempt: t.attempt,
                        lease_token: t.lease_token.clone().unwrap_or_default(),
                        ack_by: t.ack_by.unwrap_or(self.now),
                        resume_session_id: t.offer_resume.clone(),
                        lease,
                    }));
                }
                model::Unconfirmed::Clear => self.confirm(&t).await?,
            }
        }
        Ok(None)
    }

    async fn requeue_offer(&mut self, t: &OpenTask) -> Result<()> {
        self.queue_again(
            t,
            "UPDATE tasks SET state = 'queued', ready = TRUE, ack_by = NULL, lease_token = NULL,
                reason = $2, updated_at = $3 WHERE seq = $1",
            &model::offer_expired_reason(t),
        )
        .await
    }

    /// Puts an attempt's task back in the queue (`sql` ends the attempt), with its reason.
    async fn queue_again(&mut self, t: &OpenTask, sql: &str, reason: &str) -> Result<()> {
        self.settle_pending(t, "the attempt ended").await?;
        self.exec(sql, &[&t.seq, &reason, &self.now]).await?;
        self.event(
            t.seq,
            t.attempt,
            "state",
            &StateEvent::Queued(Some(reason)).data(),
        )
        .await?;
        self.fx.changed.push(t.id.clone());
        let hint = self.ready_hint(t.seq).await?;
        self.fx.ready.push(hint.into());
        Ok(())
    }

    async fn expire_lease(&mut self, t: &OpenTask) -> Result<()> {
        self.end_or_queue_again(
            t,
            model::lease_expiry(t),
            "UPDATE tasks SET state = 'queued', ready = TRUE, lease_until = NULL,
                lease_token = NULL, reason = $2, updated_at = $3 WHERE seq = $1",
        )
        .await
    }

    /// Ends a running attempt as `expiry` says: the task ends, or is queued again (`sql`).
    async fn end_or_queue_again(&mut self, t: &OpenTask, expiry: Expiry, sql: &str) -> Result<()> {
        match expiry {
            Expiry::End(state, reason) => self.finish_task(t, state, Some(&reason), None).await,
            Expiry::Retry(reason) => self.queue_again(t, sql, &reason).await,
        }
    }

    /// Moves a task to a terminal state and lets the next task of its session go. The caller
    /// holds the session lock (`open_task`).
    async fn finish_task(
        &mut self,
        t: &OpenTask,
        state: TaskState,
        reason: Option<&str>,
        result: Option<&TaskResult>,
    ) -> Result<()> {
        debug_assert!(state.is_terminal());
        let why = if state == TaskState::Cancelled {
            "the task was cancelled"
        } else {
            "the attempt ended"
        };
        self.settle_pending(t, why).await?;
        // The end (with the runner's result, if it reported one) and its event: one round trip.
        const END: &str = "UPDATE tasks SET state = $2, ready = FALSE, ack_by = NULL,
                lease_until = NULL, not_before = NULL, reason = $3, finished_at = $4,
                updated_at = $4, result = COALESCE($5, result)
             WHERE seq = $1";
        self.prepare(&[END, INSERT_EVENT]).await?;
        let data = model::finished_event(state, reason, result);
        let result_json = result.map(to_json);
        let (ended, evented) = futures_util::future::join(
            self.exec(
                END,
                &[&t.seq, &state.as_str(), &reason, &self.now, &result_json],
            ),
            self.event(t.seq, t.attempt, "state", &data),
        )
        .await;
        ended?;
        evented?;
        self.fx.changed.push(t.id.clone());
        self.deliver_final(t).await?;
        if let Some(key) = &t.session_key {
            let next = self
                .opt(
                    "SELECT seq, state FROM tasks WHERE session_key = $1 AND finished_at IS NULL
                     ORDER BY seq LIMIT 1",
                    &[key],
                )
                .await?;
            if let Some(row) = next {
                let seq: i64 = get(&row, 0)?;
                let s: String = get(&row, 1)?;
                if model::parse_state(&s).is_ok_and(model::waits_in_queue) {
                    self.exec("UPDATE tasks SET ready = TRUE WHERE seq = $1", &[&seq])
                        .await?;
                    let hint = self.ready_hint(seq).await?;
                    self.fx.ready.push(hint.into());
                }
            }
        }
        Ok(())
    }

    async fn event(
        &self,
        task_seq: i64,
        attempt: u32,
        kind: &str,
        data: &serde_json::Value,
    ) -> Result<()> {
        self.insert_event(task_seq, attempt, None, kind, data).await
    }

    async fn insert_event(
        &self,
        task_seq: i64,
        attempt: u32,
        n: Option<u64>,
        kind: &str,
        data: &serde_json::Value,
    ) -> Result<()> {
        self.insert_event_text(task_seq, attempt, n, kind, &data.to_string())
            .await
    }

    async fn insert_event_text(
        &self,
        task_seq: i64,
        attempt: u32,
        n: Option<u64>,
        kind: &str,
        data: &str,
    ) -> Result<()> {
        let size = model::event_size(kind, data) as i64;
        // The task's counters and the event, in one statement.
        self.one(
            INSERT_EVENT,
            &[
                &task_seq,
                &size,
                &(attempt as i64),
                &n.map(|n| n as i64),
                &kind,
                &data,
                &self.now,
            ],
        )
        .await?;
        Ok(())
    }

    /// A runner's event numbered `n`, unless this attempt already has one numbered so (a
    /// retried post): `false` then, and nothing written. The check and the insert in one
    /// statement (the task's row is locked, so no other can insert it meanwhile; the unique
    /// index `task_events_dedup` stands behind it anyway).
    async fn insert_event_once(
        &self,
        task_seq: i64,
        attempt: u32,
        n: u64,
        kind: &str,
        data: &str,
    ) -> Result<bool> {
        let size = model::event_size(kind, data) as i64;
        Ok(self
            .opt(
                INSERT_EVENT_ONCE,
                &[
                    &task_seq,
                    &size,
                    &(attempt as i64),
                    &(n as i64),
                    &kind,
                    &data,
                    &self.now,
                ],
            )
            .await?
            .is_some())
    }

    async fn ready_hint(&self, seq: i64) -> Result<ReadyHint> {
        let sql = format!(
            "SELECT t.id, t.agent, t.project, {HOME_EXPR} FROM tasks t
             LEFT JOIN sessions s ON s.owner = t.conv_owner AND s.agent = t.agent AND s.conversation = t.conversation
             WHERE t.seq = $1"
        );
        let r = self.one(&sql, &[&seq]).await?;
        Ok(ReadyHint {
            task_id: get(&r, 0)?,
            agent: get(&r, 1)?,
            project: get(&r, 2)?,
            runner: get(&r, 3)?,
        })
    }

    /// Records the runner's claim; refused when its name belongs to another token. A row
    /// that already says all of it and was seen within [`model::RUNNER_TOUCH_EVERY_MS`] is
    /// left alone: a claim that then finds nothing to offer has written nothing, so its commit
    /// waits for no WAL flush (with several servers, each ready task wakes a poll on every one
    /// of them and all but one find nothing).
    async fn touch_runner(&self, req: &ClaimRequest, token: Option<&str>) -> Result<()> {
        let row = self
            .one(
                TOUCH_RUNNER,
                &[
                    &req.runner,
                    &to_json(&req.agents),
                    &to_json(&req.projects),
                    &(req.capacity as i64),
                    &req.version,
                    &to_json(&req.agent_versions),
                    &self.now,
                    &token,
                    &to_json(&req.acp_agents),
                    &model::RUNNER_TOUCH_EVERY_MS,
                    // Sent only when it changed; a claim without it keeps what the row has.
                    &req.acp_capabilities.as_ref().map(to_json),
                ],
            )
            .await?;
        if get::<i64>(&row, 0)? == 0 {
            return Err(model::runner_name_taken(&req.runner));
        }
        Ok(())
    }

    /// Binds a conversation of a namespace (`conv_owner`: a client token's id, '' for the
    /// shared one of admin tokens). Only that namespace's binding of the name changes.
    async fn set_binding(
        &self,
        agent: &str,
        conversation: &str,
        conv_owner: &str,
        session_id: Option<&str>,
        runner: Option<&str>,
    ) -> Result<()> {
        self.exec(
            "INSERT INTO sessions (owner, agent, conversation, session_id, runner, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (owner, agent, conversation) DO UPDATE SET
                session_id = EXCLUDED.session_id, runner = EXCLUDED.runner,
                updated_at = EXCLUDED.updated_at",
            &[
                &conv_owner,
                &agent,
                &conversation,
                &session_id,
                &runner,
                &self.now,
            ],
        )
        .await?;
        Ok(())
    }

    /// The namespace of a token's conversations: see [`conv_owner_of`].
    async fn conv_owner_of(&self, token: &str) -> Result<String> {
        conv_owner_of(self.tx().await?, token).await
    }

    /// A client may not resume another client's session (its task would run in that agent
    /// session, with what it holds). A client's conversation names are its own: no other
    /// token's binding is looked at.
    async fn check_session_owner(&self, owner: &str, req: &SubmitTask) -> Result<()> {
        if let tunnel_protocol::SessionMode::Resume(id) = &req.session {
            if self.conv_owner_of(owner).await?.is_empty() {
                return Ok(());
            }
            let row = self
                .opt(
                    "SELECT owner FROM session_history WHERE agent = $1 AND session_id = $2",
                    &[&req.agent, id],
                )
                .await?;
            if let Some(row) = row
                && get::<Option<String>>(&row, 0)?.is_some_and(|o| o != owner)
            {
                return Err(StoreError::NotFound("session"));
            }
        }
        Ok(())
    }

    async fn record_session(&self, t: &OpenTask, session_id: &str) -> Result<()> {
        self.exec(
            "INSERT INTO session_history (agent, session_id, runner, conversation, last_used, owner)
             VALUES ($1, $2, $3, $4, $5, (SELECT id FROM tokens WHERE id = $6 AND role = 'client'))
             ON CONFLICT (agent, session_id) DO UPDATE SET runner = EXCLUDED.runner,
                conversation = COALESCE(EXCLUDED.conversation, session_history.conversation),
                last_used = EXCLUDED.last_used,
                owner = COALESCE(session_history.owner, EXCLUDED.owner)",
            &[&t.agent, &session_id, &t.runner, &t.conversation, &self.now, &t.owner],
        )
        .await?;
        if let Some(conv) = &t.conversation {
            self.set_binding(
                &t.agent,
                conv,
                &t.conv_owner,
                Some(session_id),
                t.runner.as_deref(),
            )
            .await?;
        }
        Ok(())
    }

    async fn enqueue(
        &mut self,
        task_seq: Option<i64>,
        kind: &str,
        target: &ReplyTo,
        body: Option<&serde_json::Value>,
        delay_ms: i64,
    ) -> Result<i64> {
        let row = self
            .one(
                "INSERT INTO outbox (task_seq, destination, kind, target, body, state, next_at,
                    created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $7)
                 RETURNING id",
                &[
                    &task_seq,
                    &destination(target),
                    &kind,
                    &to_json(target),
                    &body.map(|b| b.to_string()),
                    &(self.now + delay_ms),
                    &self.now,
                ],
            )
            .await?;
        self.fx.delivery = true;
        get(&row, 0)
    }

    async fn deliver_started(&mut self, t: &OpenTask) -> Result<()> {
        if let Some(target) = model::chat_target(t).cloned() {
            let posted = self
                .opt(
                    "SELECT 1 FROM outbox WHERE task_seq = $1 AND kind = 'progress'",
                    &[&t.seq],
                )
                .await?
                .is_some();
            if !posted {
                self.enqueue(Some(t.seq), "progress", &target, None, 0)
                    .await?;
            } else {
                // The acknowledgement turns into "working…" at once.
                self.deliver_progress_in(t, 0).await?;
            }
        }
        Ok(())
    }

    async fn deliver_progress(&mut self, t: &OpenTask) -> Result<()> {
        self.deliver_progress_in(t, EDIT_EVERY_MS).await
    }

    /// An edit of the progress message due in `delay_ms`, unless one is pending already.
    async fn deliver_progress_in(&mut self, t: &OpenTask, delay_ms: i64) -> Result<()> {
        if let Some(target) = model::chat_target(t).cloned() {
            let pending = self
                .opt(
                    "SELECT 1 FROM outbox WHERE task_seq = $1 AND kind = 'edit' AND state = 'pending'",
                    &[&t.seq],
                )
                .await?
                .is_some();
            if !pending {
                self.enqueue(Some(t.seq), "edit", &target, None, delay_ms)
                    .await?;
            }
        }
        Ok(())
    }

    async fn deliver_final(&mut self, t: &OpenTask) -> Result<()> {
        let Some(target) = t.reply_to.clone() else {
            return Ok(());
        };
        self.exec(
            "UPDATE outbox SET state = 'skipped', updated_at = $2
             WHERE task_seq = $1 AND kind = 'edit' AND state = 'pending'",
            &[&t.seq, &self.now],
        )
        .await?;
        // The "working…" message ends in the outcome before the answer is posted (one
        // destination goes in order), so no chat keeps a stale "working…".
        let working = self
            .opt(
                "SELECT 1 FROM outbox WHERE task_seq = $1 AND kind = 'progress'",
                &[&t.seq],
            )
            .await?
            .is_some();
        if working && let Some(chat) = model::chat_target(t).cloned() {
            self.enqueue(Some(t.seq), "edit", &chat, None, 0).await?;
        }
        self.enqueue(Some(t.seq), model::final_kind(&target), &target, None, 0)
            .await?;
        Ok(())
    }
}

impl W<'_> {
    /// Settles every pending request of the task as cancelled (the task was cancelled, or the
    /// attempt ended). The caller holds the task's lock.
    async fn settle_pending(&mut self, t: &OpenTask, why: &str) -> Result<()> {
        let rows = self
            .all(
                "SELECT id FROM approvals WHERE task_seq = $1 AND state = 'pending'
                 ORDER BY id FOR UPDATE",
                &[&t.seq],
            )
            .await?;
        for r in &rows {
            let id: String = get(r, 0)?;
            let a = load_approval(self.tx().await?, &id).await?.0;
            let outcome = model::cancelled_outcome(self.now, why);
            self.settle_approval(t, &a, ApprovalState::Cancelled, outcome)
                .await?;
        }
        Ok(())
    }

    /// Records how a pending request was settled: its row, an `approval` event, the edit of
    /// the question in chat. The caller holds the task's lock.
    async fn settle_approval(
        &mut self,
        t: &OpenTask,
        a: &Approval,
        state: ApprovalState,
        outcome: ApprovalOutcome,
    ) -> Result<Approval> {
        self.exec(
            "UPDATE approvals SET state = $2, outcome = $3 WHERE id = $1 AND state = 'pending'",
            &[&a.id, &state.as_str(), &to_json(&outcome)],
        )
        .await?;
        let (settled, _) = load_approval(self.tx().await?, &a.id).await?;
        self.event(
            t.seq,
            a.attempt,
            "approval",
            &model::approval_event(&settled),
        )
        .await?;
        self.fx.changed.push(t.id.clone());
        if let Some(target) = model::chat_target(t).cloned() {
            // A progress edit waiting would hold the edit of the question behind it (one
            // destination, in order): send it now instead.
            self.exec(
                "UPDATE outbox SET next_at = LEAST(next_at, $2)
                 WHERE task_seq = $1 AND kind = 'edit' AND state = 'pending'",
                &[&t.seq, &self.now],
            )
            .await?;
            let body = model::approval_body(&a.id);
            let asked = self
                .opt(
                    "SELECT 1 FROM outbox WHERE task_seq = $1 AND kind = 'approval' AND body = $2",
                    &[&t.seq, &body.to_string()],
                )
                .await?
                .is_some();
            if asked {
                self.enqueue(Some(t.seq), "approval_edit", &target, Some(&body), 0)
                    .await?;
            }
            if !t.state.is_terminal() {
                self.deliver_progress(t).await?;
            }
        }
        Ok(settled)
    }

    async fn deliver_question(&mut self, t: &OpenTask, id: &str) -> Result<()> {
        if let Some(target) = model::chat_target(t).cloned() {
            let body = model::approval_body(id);
            self.enqueue(Some(t.seq), "approval", &target, Some(&body), 0)
                .await?;
            self.deliver_progress(t).await?;
        }
        Ok(())
    }
}

async fn resolve_session<C: GenericClient>(
    c: &C,
    agent: &str,
    mode: &str,
    resume_id: Option<String>,
    bound_session: Option<String>,
    bound_runner: Option<String>,
) -> Result<(Option<String>, Option<String>)> {
    Ok(
        match model::session_home(mode, resume_id, bound_session, bound_runner) {
            Home::Known(session, home) => (session, home),
            Home::History(id) => {
                let home = history_runner(c, agent, &id).await?;
                (Some(id), home)
            }
        },
    )
}

/// The conversation namespace of a token: its id when it is a client token, '' (shared by
/// admin tokens) otherwise.
async fn conv_owner_of<C: GenericClient>(c: &C, token: &str) -> Result<String> {
    let client = q_opt(
        c,
        "SELECT 1 FROM tokens WHERE id = $1 AND role = 'client'",
        &[&token],
    )
    .await?
    .is_some();
    Ok(if client {
        token.to_owned()
    } else {
        String::new()
    })
}

async fn history_runner<C: GenericClient>(
    c: &C,
    agent: &str,
    session_id: &str,
) -> Result<Option<String>> {
    match q_opt(
        c,
        "SELECT runner FROM session_history WHERE agent = $1 AND session_id = $2",
        &[&agent, &session_id],
    )
    .await?
    {
        Some(r) => get(&r, 0),
        None => Ok(None),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading tasks

async fn load_task<C: GenericClient>(c: &C, id: &str, scope: &Scope) -> Result<Task> {
    let row = q_opt(c, &task_by_id_sql(), &[&id])
        .await?
        .ok_or(StoreError::NotFound("task"))?;
    full_task_from_row(&row, scope)
}

/// Whole tasks in one statement (one round trip, not four): the rows `inner` selects (`SELECT
/// {TASK_COLUMNS} FROM tasks …`, aliased `x`), then their queue position (only while waiting:
/// `model::waits_in_queue`; capped as in SQLite), their delivery status and their oldest
/// pending approval request (only while running). Read by [`full_task_from_row`].
fn full_task_sql(inner: &str, order: &str) -> String {
    format!(
        "SELECT x.*,
            CASE WHEN x.state IN ('queued', 'parked') THEN
                CASE WHEN x.session_key IS NOT NULL THEN
                    (SELECT COUNT(*) FROM tasks q WHERE q.session_key = x.session_key
                        AND q.finished_at IS NULL AND q.seq < x.seq)
                ELSE (SELECT COUNT(*) FROM (SELECT 1 FROM tasks q
                        WHERE q.ready AND q.seq < x.seq AND q.agent = x.agent LIMIT 1000) w)
                END
            END,
            o.kind, o.state, o.attempts, o.last_error,
            CASE WHEN x.state IN ('running', 'cancelling') THEN
                (SELECT a.id FROM approvals a WHERE a.task_seq = x.seq AND a.state = 'pending'
                 ORDER BY a.id LIMIT 1)
            END
         FROM ({inner}) x
         LEFT JOIN LATERAL (SELECT kind, state, attempts, last_error FROM outbox
            WHERE task_seq = x.seq AND kind IN ('final', 'webhook', 'progress')
            ORDER BY kind = 'progress', id DESC LIMIT 1) o ON TRUE
         {order}"
    )
}

/// Columns of a row from `offset` on (a row of [`full_task_sql`] holds more than one record).
struct Offset<'a>(&'a Row, usize);

impl Columns for Offset<'_> {
    fn text(&self, i: usize) -> Result<String> {
        self.0.text(self.1 + i)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>> {
        self.0.opt_text(self.1 + i)
    }
    fn int(&self, i: usize) -> Result<i64> {
        self.0.int(self.1 + i)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        self.0.opt_int(self.1 + i)
    }
    fn uint(&self, i: usize) -> Result<u32> {
        self.0.uint(self.1 + i)
    }
    fn flag(&self, i: usize) -> Result<bool> {
        self.0.flag(self.1 + i)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>> {
        self.0.bytes(self.1 + i)
    }
}

/// A row of [`full_task_sql`] within `scope`.
fn full_task_from_row(row: &Row, scope: &Scope) -> Result<Task> {
    let (_, _, mut task) = task_from_row(row)?;
    model::check_owner(scope, &row.text(TASK_OWNER)?)?;
    let extra = Offset(row, TASK_COLUMNS.split(',').count());
    task.queue_position = match extra.opt_int(0)? {
        Some(n) if model::waits_in_queue(task.state) => Some(n as u32),
        _ => None,
    };
    let delivery = Offset(row, extra.1 + 1);
    task.delivery = match delivery.opt_text(0)? {
        Some(_) => Some(delivery_status_from_row(&delivery)?),
        None => None,
    };
    task.waiting_for_approval = extra.opt_text(5)?;
    Ok(task)
}

/// An approval request and its owner token.
async fn load_approval<C: GenericClient>(c: &C, id: &str) -> Result<(Approval, String)> {
    let sql = format!(
        "SELECT {APPROVAL_COLUMNS} FROM approvals a JOIN tasks t ON t.seq = a.task_seq
         WHERE a.id = $1"
    );
    let row = q_opt(c, &sql, &[&id])
        .await?
        .ok_or(StoreError::NotFound("approval"))?;
    Ok((model::approval_from_row(&row)?, row.text(APPROVAL_OWNER)?))
}

async fn load_task_by_seq<C: GenericClient>(c: &C, seq: i64) -> Result<Task> {
    full_task_from_row(&q_one(c, &task_by_seq_sql(), &[&seq]).await?, &Scope::All)
}

fn task_by_seq_sql() -> String {
    full_task_sql(
        &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE seq = $1"),
        "",
    )
}

fn task_by_id_sql() -> String {
    full_task_sql(
        &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"),
        "",
    )
}
