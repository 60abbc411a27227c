//! SQLite backend.
//!
//! One writer thread owns the only writing connection. Writes are closures sent to it; it runs
//! every closure waiting in its queue inside one transaction, commits once, then answers them
//! all (a write that fails with something to undo has the batch rolled back and run again
//! without it, each write in its own savepoint, so it fails alone). This group commit is
//! what lets one SQLite file take thousands of tasks a second while every answered write is
//! committed. Because there is exactly one writer, a claim can be ordinary Rust over indexed
//! reads with no race. Reads run on a small pool of read-only connections (WAL lets them
//! proceed while the writer works).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::oneshot;
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
    delivery_status_from_row, destination, event_from_row, open_task_columns, open_task_from_row,
    parse_state, recent_from_row, runner_from_row, session_key, task_columns, task_from_row,
    to_json, token_from_row,
};
use crate::{
    ApprovalFilter, Clock, CurrentAttempt, Dialect, Durability, Handoff, ParkedClaim, QueueCounts,
    QueueSettings, ReadyHint, Result, Scope, Signals, StartAtClaim, Started, StoreError,
    StoredToken, TaskFilter, new_id, random_hex,
};

pub(crate) const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_init.sql"),
    include_str!("../migrations/sqlite/0002_agent_versions.sql"),
    include_str!("../migrations/sqlite/0003_outbox.sql"),
    include_str!("../migrations/sqlite/0004_task_meta.sql"),
    include_str!("../migrations/sqlite/0005_retention.sql"),
    include_str!("../migrations/sqlite/0006_ready_by_agent.sql"),
    include_str!("../migrations/sqlite/0007_session_owner.sql"),
    include_str!("../migrations/sqlite/0008_approvals.sql"),
    include_str!("../migrations/sqlite/0010_web_sessions.sql"),
    include_str!("../migrations/sqlite/0011_finished_minutes.sql"),
    include_str!("../migrations/sqlite/0012_runner_left.sql"),
    include_str!("../migrations/sqlite/0013_runner_acp_agents.sql"),
    include_str!("../migrations/sqlite/0014_queue_floods.sql"),
    include_str!("../migrations/sqlite/0015_event_caps.sql"),
    include_str!("../migrations/sqlite/0016_conversation_owner.sql"),
    include_str!("../migrations/sqlite/0017_runner_acp_capabilities.sql"),
    include_str!("../migrations/sqlite/0018_unconfirmed_offers.sql"),
    include_str!("../migrations/sqlite/0019_fewer_task_indexes.sql"),
    include_str!("../migrations/sqlite/0020_events_without_fk.sql"),
];

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;
/// Read connections kept open for reuse.
const READ_POOL: usize = 4;

/// What a committed write changed, applied to [`Signals`] after the commit.
#[derive(Default)]
struct Effects {
    changed: Vec<String>,
    ready: Vec<ReadyHint>,
    deadlines: Vec<i64>,
    /// Something was added to the outbox.
    delivery: bool,
}

impl Effects {
    fn merge(&mut self, other: Effects) {
        self.changed.extend(other.changed);
        self.ready.extend(other.ready);
        self.deadlines.extend(other.deadlines);
        self.delivery |= other.delivery;
    }
}

/// A write in progress: the connection (inside the batch's transaction), the time it runs at,
/// and what it changed.
struct W<'a, 'c> {
    conn: &'c Connection,
    now: i64,
    fx: Effects,
    settings: &'a QueueSettings,
    stmts: &'a Stmts<'c>,
}

impl<'a, 'c> W<'a, 'c> {
    /// The statement `sql` (a constant: it is known by its address), from the batch's own
    /// ([`Stmts`]).
    fn prep(&self, sql: &'static str) -> rusqlite::Result<Held<'a, 'c>> {
        self.stmts.get(sql)
    }
}

/// The statements a batch's writes used, taken from rusqlite's cache at their first use in the
/// batch and given back to it when the batch ends. A write finds its statement here by the
/// address of its constant text, where rusqlite's cache hashes the whole text on every use and
/// every return (a twentieth of the writer's time in a profile).
struct Stmts<'c> {
    conn: &'c Connection,
    free: std::cell::RefCell<Vec<(usize, rusqlite::CachedStatement<'c>)>>,
}

impl<'c> Stmts<'c> {
    fn new(conn: &'c Connection) -> Stmts<'c> {
        Stmts {
            conn,
            free: std::cell::RefCell::new(Vec::new()),
        }
    }

    fn get<'a>(&'a self, sql: &'static str) -> rusqlite::Result<Held<'a, 'c>> {
        let key = sql.as_ptr() as usize;
        let found = {
            let mut free = self.free.borrow_mut();
            free.iter()
                .position(|(k, _)| *k == key)
                .map(|i| free.swap_remove(i).1)
        };
        // Not free: first use in the batch, or in use (a statement run while another copy
        // of it has rows open gets its own).
        let st = match found {
            Some(st) => st,
            None => self.conn.prepare_cached(sql)?,
        };
        Ok(Held {
            st: Some(st),
            key,
            home: self,
        })
    }
}

/// A statement of [`Stmts`] in use; back to it when dropped.
struct Held<'a, 'c> {
    st: Option<rusqlite::CachedStatement<'c>>,
    key: usize,
    home: &'a Stmts<'c>,
}

impl<'c> std::ops::Deref for Held<'_, 'c> {
    type Target = rusqlite::Statement<'c>;
    fn deref(&self) -> &Self::Target {
        self.st.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Held<'_, '_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.st.as_mut().expect("held until dropped")
    }
}

impl Drop for Held<'_, '_> {
    fn drop(&mut self) {
        if let Some(st) = self.st.take() {
            self.home.free.borrow_mut().push((self.key, st));
        }
    }
}

/// A write queued for the writer thread: run inside the batch's transaction (again, after a
/// rollback of the batch), then answered once the batch has committed or failed.
trait Write: Send {
    /// Runs the write; [`Ran::Dirty`] when it failed with an error that must undo it and it
    /// may have changed the database (then the batch is rolled back and run again).
    fn run(&mut self, stmts: &Stmts<'_>, effects: &mut Effects, mode: Mode) -> Ran;
    /// Answers the caller: its result if the batch committed, an error otherwise.
    fn answer(self: Box<Self>, committed: bool);
}

type Job = Box<dyn Write>;

/// How a batch's writes run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One after another in the transaction, no savepoint: the common case.
    Plain,
    /// Each in its own savepoint, so one failing write rolls back alone: the run again of a
    /// batch one of whose writes failed in [`Mode::Plain`].
    Savepoints,
}

/// How a write ran.
#[derive(PartialEq, Eq)]
enum Ran {
    /// Done, refused or failed with nothing to undo: it stays as it is.
    Clean,
    /// Failed, and what it did before failing must be undone.
    Dirty,
}

/// A write and, once run, its result.
struct Queued<T, F> {
    f: F,
    tx: oneshot::Sender<Result<T>>,
    clock: Arc<dyn Clock>,
    settings: Arc<QueueSettings>,
    /// The time it ran at first; a run again after a rollback keeps it.
    now: Option<i64>,
    result: Option<Result<T>>,
}

impl<T, F> Write for Queued<T, F>
where
    T: Send + 'static,
    F: FnMut(&mut W<'_, '_>) -> Result<T> + Send + 'static,
{
    fn run(&mut self, stmts: &Stmts<'_>, effects: &mut Effects, mode: Mode) -> Ran {
        // A caller that went away (a long-poll whose client disconnected) gets nothing
        // done on its behalf.
        if self.tx.is_closed() {
            self.result = None;
            return Ran::Clean;
        }
        let now = *self.now.get_or_insert_with(|| self.clock.now_ms());
        let (result, ran) = run_write(stmts, effects, &self.settings, now, mode, &mut self.f);
        self.result = Some(result);
        ran
    }

    fn answer(self: Box<Self>, committed: bool) {
        let Some(result) = self.result else {
            return;
        };
        let answer = if committed {
            result
        } else {
            Err(StoreError::Unavailable("the commit failed".into()))
        };
        let _ = self.tx.send(answer);
    }
}

/// What the writer thread is sent.
enum Msg {
    Job(Job),
    /// Checkpoint, truncate the WAL and close; answered once the connection is closed.
    Close(oneshot::Sender<()>),
}

pub(crate) struct SqliteStore {
    jobs: mpsc::Sender<Msg>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// Set by [`SqliteStore::close`]: reads are refused and no connection returns to the pool.
    closed: Arc<std::sync::atomic::AtomicBool>,
    path: PathBuf,
    clock: Arc<dyn Clock>,
    settings: Arc<QueueSettings>,
}

impl SqliteStore {
    pub(crate) async fn open(
        path: &Path,
        durability: Durability,
        settings: QueueSettings,
        clock: Arc<dyn Clock>,
        signals: Arc<dyn Signals>,
    ) -> Result<SqliteStore> {
        let path = path.to_path_buf();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (jobs, rx) = mpsc::channel::<Msg>();
        let thread_path = path.clone();
        let settings = Arc::new(settings);
        let handing = Handing {
            signals,
            clock: clock.clone(),
            settings: settings.clone(),
        };
        std::thread::Builder::new()
            .name("tunnel-sqlite-writer".into())
            .spawn(move || match open_writer(&thread_path, durability) {
                Ok(mut conn) => {
                    let wal = Wal::new(&mut conn);
                    let _ = ready_tx.send(Ok(()));
                    let checkpoints = Checkpointer::start(&thread_path);
                    writer_loop(conn, rx, handing, checkpoints, wal);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer thread: {e}")))?;
        ready_rx
            .await
            .map_err(|_| StoreError::Unavailable("the writer thread died".into()))??;
        Ok(SqliteStore {
            jobs,
            readers: Arc::new(Mutex::new(Vec::new())),
            closed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            path,
            clock,
            settings,
        })
    }

    /// Runs `f` on the writer thread inside the next group commit; answers after the commit.
    /// `f` may run twice: a batch in which another write failed is rolled back and run again.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut W<'_, '_>) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let job: Job = Box::new(Queued {
            f,
            tx,
            clock: self.clock.clone(),
            settings: self.settings.clone(),
            now: None,
            result: None,
        });
        self.jobs
            .send(Msg::Job(job))
            .map_err(|_| StoreError::Unavailable("the writer thread has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the writer thread has stopped".into()))?
    }

    /// Runs `f` on a pooled read-only connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, i64) -> Result<T> + Send + 'static,
    {
        let readers = self.readers.clone();
        let closed = self.closed.clone();
        let path = self.path.clone();
        let now = self.clock.now_ms();
        tokio::task::spawn_blocking(move || {
            use std::sync::atomic::Ordering;
            if closed.load(Ordering::Acquire) {
                return Err(StoreError::Unavailable("the store is closed".into()));
            }
            let pooled = readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match pooled {
                Some(c) => c,
                None => open_reader(&path)?,
            };
            let result = f(&conn, now);
            let mut pool = readers.lock().unwrap_or_else(|p| p.into_inner());
            // Checked under the lock `close` empties the pool with: a connection is either
            // closed there or here, never left open.
            if pool.len() < READ_POOL && !closed.load(Ordering::Acquire) {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }

    /// Closes every connection: the pooled readers, then the writer after the writes already
    /// queued, which checkpoints the WAL and truncates it first (so a restart does not replay
    /// it). Later calls fail with `Unavailable`.
    pub(crate) async fn close(&self) {
        {
            let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            self.closed
                .store(true, std::sync::atomic::Ordering::Release);
            pool.clear();
        }
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Msg::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    pub(crate) async fn submit(
        &self,
        owner: String,
        key: Option<String>,
        req: SubmitTask,
    ) -> Result<(Task, bool)> {
        self.write(move |w| {
            if let Some(k) = &key {
                let existing: Option<String> = w
                    .prep(
                        "SELECT id FROM tasks WHERE owner = ?1 AND idempotency_key = ?2",
                    )?
                    .query_row(params![owner, k], |r| r.get(0))
                    .optional()?;
                if let Some(id) = existing {
                    return Ok((load_task(w.conn, &id, &Scope::All)?, false));
                }
            }
            let conv_owner = w.check_session_owner(&owner, &req)?;
            if let Some(cap) = w.settings.max_queued_per_token {
                // Counted in `tasks_owner_waiting`, and never past the cap.
                let waiting: i64 = w
                    .prep(
                        "SELECT COUNT(*) FROM (SELECT 1 FROM tasks
                         WHERE owner = ?1 AND state IN ('queued', 'parked') LIMIT ?2)",
                    )?
                    .query_row(params![owner, cap], |r| r.get(0))?;
                if waiting >= i64::from(cap) {
                    return Err(model::queue_full(cap));
                }
            }
            let id = new_id();
            let session_key = req
                .conversation
                .as_ref()
                .map(|c| session_key(&req.agent, c, &conv_owner));
            let busy = match &session_key {
                Some(k) => w
                    .prep(
                        "SELECT 1 FROM tasks WHERE session_key = ?1 AND finished_at IS NULL LIMIT 1",
                    )?
                    .exists(params![k])?,
                None => false,
            };
            let (mode, resume_id) = model::session_mode_columns(&req.session);
            let reply_to = req.reply_to.as_ref().map(to_json);
            // The row comes back whole (no read after the write), with its first event
            // counted in it already.
            let queued = StateEvent::Queued(None).data().to_string();
            let row = w
                .prep(concat!(
                    "INSERT INTO tasks (id, agent, prompt, conversation, session_key, project, model,
                        timeout_ms, session_mode, resume_id, max_attempts, reply_to, owner,
                        idempotency_key, state, ready, created_at, updated_at, meta, approvals,
                        conv_owner, next_event_seq, event_bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14,
                        'queued', ?15, ?16, ?16, ?17, ?18, ?19, 2, ?20)
                     RETURNING ",
                    task_columns!()
                ))?
                .query_row(params![
                    id,
                    req.agent,
                    req.prompt,
                    req.conversation,
                    session_key,
                    req.project,
                    req.model,
                    req.timeout_ms.map(|t| t as i64),
                    mode,
                    resume_id,
                    req.max_attempts.unwrap_or(1),
                    reply_to,
                    owner,
                    key,
                    !busy,
                    w.now,
                    req.meta.as_ref().map(to_json),
                    req.approvals.map(|p| p.as_str()),
                    conv_owner,
                    model::event_size("state", &queued) as i64,
                ], task_row)??;
            let seq = row.0 .0;
            w.insert_event_at(seq, 1, 0, None, "state", &queued)?;
            // The chat's acknowledgement is the task's first message there, so it can never
            // arrive after the answer (one destination goes in order); it becomes the
            // "working…" message.
            if let Some(chat) = req.reply_to.as_ref().filter(|r| model::is_chat(r)) {
                w.enqueue(Some(seq), "progress", chat, None, 0)?;
            }
            w.fx.changed.push(id.clone());
            if let Some(max) = w.settings.max_queue_ms {
                w.fx.deadlines.push(w.now + max);
            }
            if !busy {
                let hint = match &req.conversation {
                    Some(_) => w.ready_hint(seq)?,
                    // No conversation, so no binding to look up.
                    None => ReadyHint {
                        task_id: id.clone(),
                        agent: req.agent.clone(),
                        project: req.project.clone(),
                        runner: resolve_session(
                            w.conn,
                            &req.agent,
                            mode,
                            resume_id.clone(),
                            None,
                            None,
                        )?
                        .1,
                    },
                };
                w.fx.ready.push(hint);
            }
            Ok((complete_task(w.conn, row, &Scope::All)?, true))
        })
        .await
    }

    pub(crate) async fn may_resume(&self, id: String, session_id: String) -> Result<bool> {
        self.read(move |c, _| may_resume_in(c, &id, &session_id))
            .await
    }

    pub(crate) async fn claim_and_start(
        &self,
        req: ClaimRequest,
        token: String,
        start: StartAtClaim,
    ) -> Result<Option<Started>> {
        self.write(move |w| claim_and_start_in(w, &req, &token, start))
            .await
    }

    pub(crate) async fn return_offer(&self, id: String, at: AttemptRef) -> Result<bool> {
        self.write(move |w| {
            let t = w.open_task(&id)?;
            if t.state != TaskState::Offered
                || model::check_attempt(&t, at.attempt, &at.lease_token).is_err()
            {
                return Ok(false);
            }
            w.requeue_offer(&t)?;
            Ok(true)
        })
        .await
    }

    pub(crate) async fn return_start(&self, id: String, at: AttemptRef) -> Result<bool> {
        self.write(move |w| {
            let t = w.open_task(&id)?;
            if !matches!(t.state, TaskState::Running | TaskState::Cancelling)
                || model::check_attempt(&t, at.attempt, &at.lease_token).is_err()
            {
                return Ok(false);
            }
            // The start is not counted: nobody ran it.
            w.end_or_queue_again(
                &t,
                model::start_returned(&t),
                "UPDATE tasks SET state = 'queued', ready = 1, lease_until = NULL,
                    lease_token = NULL, runs = runs - 1, reason = ?2, updated_at = ?3
                 WHERE seq = ?1",
            )?;
            Ok(true)
        })
        .await
    }

    pub(crate) async fn conversation_owner(&self, id: String) -> Result<Option<String>> {
        self.read(move |c, _| {
            let owner: String = c
                .prepare_cached("SELECT conv_owner FROM tasks WHERE id = ?1")?
                .query_row(params![id], |r| r.get(0))
                .optional()?
                .ok_or(StoreError::NotFound("task"))?;
            Ok(Some(owner).filter(|o| !o.is_empty()))
        })
        .await
    }

    pub(crate) async fn task(&self, id: String, scope: Scope) -> Result<Task> {
        self.read(move |c, _| load_task(c, &id, &scope)).await
    }

    pub(crate) async fn tasks(&self, filter: TaskFilter, scope: Scope) -> Result<Vec<Task>> {
        self.read(move |c, _| {
            let (cond, args) = filter.where_clause(&scope, |i| format!("?{i}"), Dialect::Sqlite);
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE {cond} ORDER BY seq DESC LIMIT {}",
                filter.limit.clamp(1, 1000)
            ))?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok(task_from_row(r))
            })?;
            let mut tasks = Vec::new();
            for row in rows {
                let (seq, session_key, mut task) = row??;
                task.queue_position = queue_position(c, seq, session_key.as_deref(), &task)?;
                task.delivery = delivery_status(c, seq)?;
                task.waiting_for_approval = waiting_for_approval(c, seq, &task)?;
                tasks.push(task);
            }
            Ok(tasks)
        })
        .await
    }

    pub(crate) async fn overview(&self, since: i64, scope: Scope) -> Result<crate::Overview> {
        let owner = match scope {
            Scope::All => None,
            Scope::Owner(o) => Some(o),
        };
        self.read(move |c, _| {
            let queues = all(
                c.prepare_cached(
                    "SELECT agent, COUNT(*), MIN(created_at) FROM tasks
                     WHERE state IN ('queued', 'parked') AND (?1 IS NULL OR owner = ?1)
                     GROUP BY agent ORDER BY agent",
                )?
                .query(params![owner])?,
                |r| {
                    Ok(crate::AgentQueue {
                        agent: r.get(0)?,
                        waiting: r.get::<_, i64>(1)? as u64,
                        oldest_created_at: r.get(2)?,
                    })
                },
            )?;
            let finished_per_minute = all(
                c.prepare_cached(
                    "SELECT minute, SUM(succeeded), SUM(other) FROM finished_minutes
                     WHERE minute >= ?1 / 60000 * 60000 AND (?2 IS NULL OR owner = ?2)
                     GROUP BY 1 ORDER BY 1",
                )?
                .query(params![since, owner])?,
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, i64>(2)? as u64,
                    ))
                },
            )?;
            Ok(crate::Overview {
                queues,
                finished_per_minute,
            })
        })
        .await
    }

    pub(crate) async fn put_web_session(
        &self,
        hash: [u8; 32],
        kind: crate::WebSessionKind,
        session: crate::WebSession,
    ) -> Result<()> {
        self.write(move |w| {
            w.prep("DELETE FROM web_sessions WHERE expires_at <= ?1")?
                .execute(params![w.now])?;
            w.prep(
                "INSERT INTO web_sessions (id_sha256, kind, token_id, role, created_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                &hash[..],
                kind.as_str(),
                session.token_id,
                session.role.as_str(),
                w.now,
                session.expires_at
            ])?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn web_session(
        &self,
        hash: [u8; 32],
        kind: crate::WebSessionKind,
        take: bool,
    ) -> Result<Option<crate::WebSession>> {
        let row = |r: &Row<'_>| -> rusqlite::Result<(String, String, i64)> {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        };
        let found = if take {
            self.write(move |w| {
                let found = w
                    .prep(
                        "DELETE FROM web_sessions WHERE id_sha256 = ?1 AND kind = ?2
                         RETURNING token_id, role, expires_at",
                    )?
                    .query_row(params![&hash[..], kind.as_str()], row)
                    .optional()?;
                Ok(found.map(|f| (f, w.now)))
            })
            .await?
        } else {
            self.read(move |c, now| {
                let found = c
                    .prepare_cached(
                        "SELECT token_id, role, expires_at FROM web_sessions
                         WHERE id_sha256 = ?1 AND kind = ?2",
                    )?
                    .query_row(params![&hash[..], kind.as_str()], row)
                    .optional()?;
                Ok(found.map(|f| (f, now)))
            })
            .await?
        };
        Ok(found.and_then(|((token_id, role, expires_at), now)| {
            (expires_at > now).then_some(crate::WebSession {
                token_id,
                role: Role::parse(&role)?,
                expires_at,
            })
        }))
    }

    pub(crate) async fn cancel(&self, id: String, scope: Scope) -> Result<Task> {
        self.write(move |w| {
            let t = w.open_task(&id)?;
            match model::cancel(&t, &scope)? {
                Cancel::Now => {
                    w.finish_task(&t, TaskState::Cancelled, Some(CANCELLED_BEFORE_RUN), None)?;
                }
                Cancel::Request => {
                    w.prep(
                        "UPDATE tasks SET state = 'cancelling', cancel_requested = 1,
                             reason = 'cancel requested', updated_at = ?2 WHERE seq = ?1",
                    )?
                    .execute(params![t.seq, w.now])?;
                    w.event(t.seq, t.attempt, "state", &StateEvent::Cancelling.data())?;
                    w.fx.changed.push(t.id.clone());
                    w.settle_pending(&t, "the task was cancelled")?;
                }
                Cancel::AlreadyRequested => {}
            }
            load_task(w.conn, &id, &Scope::All)
        })
        .await
    }

    pub(crate) async fn claim(
        &self,
        req: ClaimRequest,
        token: Option<String>,
    ) -> Result<Option<Offer>> {
        self.write(move |w| claim_in(w, &req, token.as_deref()))
            .await
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
        self.write(move |w| ack_in(w, &id, &at, lease_ms, confirm))
            .await
    }

    pub(crate) async fn current_attempt(&self, id: String) -> Result<Option<CurrentAttempt>> {
        self.read(move |c, _| {
            let (attempt, lease_token, runner, state): (
                u32,
                Option<String>,
                Option<String>,
                String,
            ) = c
                .prepare_cached(
                    "SELECT attempt, lease_token, runner, state FROM tasks WHERE id = ?1",
                )?
                .query_row(params![id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()?
                .ok_or(StoreError::NotFound("task"))?;
            Ok(lease_token.map(|lease_token| CurrentAttempt {
                attempt,
                lease_token,
                runner,
                state: TaskState::parse(&state).unwrap_or(TaskState::Failed),
            }))
        })
        .await
    }

    pub(crate) async fn heartbeat(&self, id: String, at: AttemptRef) -> Result<LeaseStatus> {
        self.write(move |w| {
            let t = w.open_task(&id)?;
            model::check_attempt(&t, at.attempt, &at.lease_token)?;
            w.confirm(&t)?;
            let lease_until = w.renew_lease(&t)?;
            Ok(model::heartbeat_status(
                &t,
                lease_until,
                w.settings.lease_ms,
            ))
        })
        .await
    }

    pub(crate) async fn append_events(&self, id: String, req: AppendEvents) -> Result<AppendAck> {
        self.write(move |w| {
            // The task and its log's counters in one read; the counters are written once,
            // after the events.
            let (t, (next_seq, bytes, dropped)) = w
                .prep(concat!(
                    "SELECT ",
                    open_task_columns!(),
                    ", next_event_seq, event_bytes, events_dropped
                     FROM tasks WHERE id = ?1"
                ))?
                .query_row(params![id], |r| {
                    Ok(open_task_from_row(r).and_then(|t| {
                        Ok((
                            t,
                            (
                                r.int(OPEN_TASK_LEN)?,
                                r.int(OPEN_TASK_LEN + 1)?,
                                r.int(OPEN_TASK_LEN + 2)?,
                            ),
                        ))
                    }))
                })
                .optional()?
                .ok_or(StoreError::NotFound("task"))??;
            model::check_attempt(&t, req.attempt, &req.lease_token)?;
            w.confirm(&t)?;
            if model::events_renew_lease(&t) {
                if model::events_lease_fresh(&t, w.now, w.settings.lease_ms) {
                    // Still checked: a lease that ran out ends the attempt here too.
                    w.check_lease(&t)?;
                } else {
                    w.renew_lease(&t)?;
                }
            }
            let mut log = model::EventLog {
                count: (next_seq - 1).max(0) as u64,
                bytes: bytes as u64,
                truncated: dropped > 0,
            };
            // The next event's number and the bytes added, written back after the loop.
            let mut next = next_seq;
            let mut added = 0i64;
            let (max_events, max_bytes) =
                (w.settings.max_task_events, w.settings.max_task_event_bytes);
            let mut accepted = 0;
            let mut newly_dropped = 0i64;
            for e in &req.events {
                let dup = w
                    .prep(
                        "SELECT 1 FROM task_events WHERE task_seq = ?1 AND attempt = ?2 AND n = ?3",
                    )?
                    .exists(params![t.seq, t.attempt, e.n as i64])?;
                if dup {
                    continue;
                }
                let data = e.data.to_string();
                let size = model::event_size(&e.kind, &data);
                match model::admit_event(&mut log, size, max_events, max_bytes) {
                    model::Admit::Store => {
                        w.insert_event_at(t.seq, next, t.attempt, Some(e.n), &e.kind, &data)?;
                        next += 1;
                        added += size as i64;
                    }
                    model::Admit::Truncate => {
                        let marker = model::truncated_data(max_events, max_bytes).to_string();
                        w.insert_event_at(
                            t.seq,
                            next,
                            t.attempt,
                            None,
                            model::TRUNCATED_KIND,
                            &marker,
                        )?;
                        next += 1;
                        added += model::event_size(model::TRUNCATED_KIND, &marker) as i64;
                        newly_dropped += 1;
                    }
                    model::Admit::Drop => newly_dropped += 1,
                }
                accepted += 1;
                // The session is recorded even when its event is not stored: affinity needs it.
                if let Some(sid) = model::reported_session(e) {
                    w.record_session(&t, sid)?;
                }
            }
            if next != next_seq || newly_dropped > 0 {
                w.prep(
                    "UPDATE tasks SET next_event_seq = ?2, event_bytes = event_bytes + ?3,
                            events_dropped = events_dropped + ?4 WHERE seq = ?1",
                )?
                .execute(params![t.seq, next, added, newly_dropped])?;
            }
            if accepted > 0 {
                w.fx.changed.push(t.id.clone());
                if model::shows_progress(&t, &req.events) {
                    w.deliver_progress(&t)?;
                }
            }
            Ok(AppendAck {
                accepted,
                cancel: t.state == TaskState::Cancelling,
                truncated: log.truncated,
            })
        })
        .await
    }

    pub(crate) async fn finish(&self, id: String, req: FinishRequest) -> Result<Task> {
        self.write(move |w| finish_in(w, &id, &req)).await
    }

    pub(crate) async fn events(
        &self,
        id: String,
        scope: Scope,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<TaskEvent>, TaskState)> {
        self.read(move |c, _| {
            let (seq, owner, state): (i64, String, String) = c
                .prepare_cached("SELECT seq, owner, state FROM tasks WHERE id = ?1")?
                .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?
                .ok_or(StoreError::NotFound("task"))?;
            model::check_owner(&scope, &owner)?;
            let mut stmt = c.prepare_cached(
                "SELECT seq, attempt, kind, data, at FROM task_events
                 WHERE task_seq = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query(params![seq, after as i64, limit.clamp(1, 10_000)])?;
            Ok((event_page(rows)?, parse_state(&state)?))
        })
        .await
    }

    pub(crate) async fn event_log_end(&self, id: String, scope: Scope) -> Result<(TaskState, u64)> {
        self.read(move |c, _| {
            let (owner, state, last): (String, String, i64) = c
                .prepare_cached("SELECT owner, state, next_event_seq - 1 FROM tasks WHERE id = ?1")?
                .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?
                .ok_or(StoreError::NotFound("task"))?;
            model::check_owner(&scope, &owner)?;
            Ok((parse_state(&state)?, last.max(0) as u64))
        })
        .await
    }

    pub(crate) async fn last_events(&self, id: String, n: u32) -> Result<Vec<TaskEvent>> {
        self.read(move |c, _| {
            let mut stmt = c.prepare_cached(
                "SELECT e.seq, e.attempt, e.kind, e.data, e.at FROM task_events e
                 JOIN tasks t ON t.seq = e.task_seq WHERE t.id = ?1
                 ORDER BY e.seq DESC LIMIT ?2",
            )?;
            // Bounded by EVENT_PAGE_BYTES like `events`, counted from the newest.
            let mut events = event_page(stmt.query(params![id, n])?)?;
            events.reverse();
            Ok(events)
        })
        .await
    }

    pub(crate) async fn expire_due(&self) -> Result<Option<i64>> {
        self.write(move |w| {
            let now = w.now;
            let offered = w.due("SELECT seq FROM tasks WHERE state = 'offered' AND ack_by <= ?1")?;
            for seq in offered {
                let t = w.task_by_seq(seq)?;
                w.requeue_offer(&t)?;
            }
            let leased = w.due(
                "SELECT seq FROM tasks WHERE state IN ('running', 'cancelling') AND lease_until <= ?1",
            )?;
            for seq in leased {
                let t = w.task_by_seq(seq)?;
                w.expire_lease(&t)?;
            }
            let parked = w.due("SELECT seq FROM tasks WHERE state = 'parked' AND not_before <= ?1")?;
            for seq in parked {
                let t = w.task_by_seq(seq)?;
                w.prep(
                        "UPDATE tasks SET state = 'queued', not_before = NULL, updated_at = ?2 WHERE seq = ?1",
                    )?
                    .execute(params![seq, now])?;
                w.event(seq, t.attempt, "state", &StateEvent::Queued(None).data())?;
                w.fx.changed.push(t.id.clone());
                let hint = w.ready_hint(seq)?;
                w.fx.ready.push(hint);
            }
            if let Some(max) = w.settings.max_queue_ms {
                // In batches, so a flood of old tasks does not make one huge transaction; the
                // next deadline below is then already due and the timer comes straight back.
                let old = {
                    let mut stmt = w.prep(
                        "SELECT seq FROM tasks INDEXED BY tasks_queued_age
                         WHERE state = 'queued' AND created_at <= ?1
                         ORDER BY created_at LIMIT 500",
                    )?;
                    stmt.query_map(params![now - max], |r| r.get::<_, i64>(0))?
                        .collect::<rusqlite::Result<Vec<i64>>>()?
                };
                let reason = model::queue_expired_reason(max);
                for seq in old {
                    let t = w.task_by_seq(seq)?;
                    w.finish_task(&t, TaskState::TimedOut, Some(&reason), None)?;
                }
            }
            let expired = {
                let mut stmt = w.prep(
                    "SELECT id FROM approvals WHERE state = 'pending' AND expires_at <= ?1",
                )?;
                stmt.query_map(params![now], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?
            };
            for id in expired {
                let a = load_approval(w.conn, &id)?.0;
                let outcome = model::expired_outcome(&a, now);
                w.settle_approval(&a, ApprovalState::Expired, outcome)?;
            }
            let next: Option<i64> = w.conn.query_row(
                "SELECT MIN(d) FROM (
                    SELECT MIN(ack_by) AS d FROM tasks WHERE state = 'offered'
                    UNION ALL SELECT MIN(lease_until) FROM tasks WHERE state IN ('running', 'cancelling')
                    UNION ALL SELECT MIN(not_before) FROM tasks WHERE state = 'parked'
                    UNION ALL SELECT MIN(expires_at) FROM approvals WHERE state = 'pending'
                    UNION ALL SELECT MIN(created_at) + ?1 FROM tasks INDEXED BY tasks_queued_age
                        WHERE state = 'queued' AND ?1 IS NOT NULL)",
                params![w.settings.max_queue_ms],
                |r| r.get(0),
            )?;
            Ok(next)
        })
        .await
    }

    pub(crate) async fn runners(&self) -> Result<Vec<RunnerInfo>> {
        let online_ms = self.settings.runner_online_ms;
        self.read(move |c, now| {
            let mut stmt = c.prepare_cached(
                "SELECT r.name, r.agents, r.projects, r.capacity, r.version, r.first_seen, r.last_seen,
                    r.agent_versions,
                    (SELECT COUNT(*) FROM tasks t WHERE t.runner = r.name AND t.finished_at IS NULL
                        AND t.state IN ('offered', 'running', 'cancelling')),
                    r.left_at, r.acp_agents, r.acp_capabilities
                 FROM runners r ORDER BY r.name",
            )?;
            all(stmt.query([])?, |r| runner_from_row(r, now, online_ms))
        })
        .await
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
        self.read(move |c, _| {
            let limit = limit.clamp(1, 1000);
            // A client sees the conversations of its own namespace only; an admin every one,
            // other tokens' with their owner.
            let ns = match &owner {
                Some(o) => conv_owner_of(c, o)?,
                None => String::new(),
            };
            let sessions = all(
                c.prepare_cached(&format!(
                    "SELECT {BINDING_COLUMNS} FROM sessions
                     WHERE (?1 IS NULL OR conversation = ?1) AND (?2 IS NULL OR agent = ?2)
                        AND (?4 IS NULL OR owner = ?5)
                     ORDER BY updated_at DESC LIMIT ?3"
                ))?
                .query(params![conversation, agent, limit, owner, ns])?,
                |r| binding_from_row(r, &ns),
            )?;
            let recent = all(
                c.prepare_cached(
                    "SELECT agent, session_id, runner, conversation, last_used FROM session_history
                     WHERE (?1 IS NULL OR conversation = ?1) AND (?2 IS NULL OR agent = ?2)
                        AND (?4 IS NULL OR owner IS NULL OR owner = ?4)
                     ORDER BY last_used DESC LIMIT ?3",
                )?
                .query(params![conversation, agent, limit, owner])?,
                |r| recent_from_row(r),
            )?;
            Ok(SessionList { sessions, recent })
        })
        .await
    }

    pub(crate) async fn bind_session(
        &self,
        cmd: SessionCommand,
        scope: Scope,
    ) -> Result<SessionBinding> {
        self.write(move |w| {
            let owner = match &scope {
                Scope::All => None,
                Scope::Owner(o) => Some(o.as_str()),
            };
            // The conversation is the caller's own, in its namespace: nothing another token
            // bound under the same name is touched.
            let ns = match owner {
                Some(o) => conv_owner_of(w.conn, o)?,
                None => String::new(),
            };
            if let (Some(o), Some(id)) = (owner, &cmd.session_id) {
                let made_by: Option<String> = w
                    .conn
                    .query_row(
                        "SELECT owner FROM session_history WHERE agent = ?1 AND session_id = ?2",
                        params![cmd.agent, id],
                        |r| r.get(0),
                    )
                    .optional()?
                    .flatten();
                if made_by.is_some_and(|b| b != o) {
                    return Err(StoreError::NotFound("session"));
                }
            }
            let runner = match (&cmd.session_id, &cmd.runner) {
                (_, Some(r)) => Some(r.clone()),
                (Some(id), None) => history_runner(w.conn, &cmd.agent, id)?,
                (None, None) => None,
            };
            w.set_binding(
                &cmd.agent,
                &cmd.conversation,
                &ns,
                cmd.session_id.as_deref(),
                runner.as_deref(),
            )?;
            if let Some(id) = &cmd.session_id {
                w.prep(
                        "INSERT INTO session_history (agent, session_id, runner, conversation, last_used, owner)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (agent, session_id) DO UPDATE SET
                            runner = COALESCE(excluded.runner, runner),
                            conversation = excluded.conversation, last_used = excluded.last_used,
                            owner = COALESCE(owner, excluded.owner)",
                    )?
                    .execute(params![cmd.agent, id, runner, cmd.conversation, w.now, owner])?;
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
        .await
    }

    pub(crate) async fn report_sessions(
        &self,
        runner: String,
        sessions: Vec<tunnel_protocol::ReportedSession>,
    ) -> Result<()> {
        self.write(move |w| {
            let mut stmt = w.prep(
                "INSERT INTO session_history (agent, session_id, runner, conversation, last_used)
                 VALUES (?1, ?2, ?3, NULL, ?4)
                 ON CONFLICT (agent, session_id) DO UPDATE SET runner = excluded.runner,
                    last_used = MAX(last_used, excluded.last_used)",
            )?;
            for s in &sessions {
                stmt.execute(params![s.agent, s.session_id, runner, s.last_used])?;
            }
            Ok(())
        })
        .await
    }

    pub(crate) async fn runner_left(&self, name: String, token: String) -> Result<bool> {
        self.write(move |w| {
            let n = w
                .prep("UPDATE runners SET left_at = ?2 WHERE name = ?1 AND token = ?3")?
                .execute(params![name, w.now, token])?;
            Ok(n > 0)
        })
        .await
    }

    pub(crate) async fn create_token(
        &self,
        id: String,
        name: String,
        role: Role,
        hash: [u8; 32],
    ) -> Result<TokenInfo> {
        self.write(move |w| {
            w.prep(
                    "INSERT INTO tokens (id, name, role, secret_sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![id, name, role.as_str(), &hash[..], w.now])?;
            Ok(TokenInfo { id: id.clone(), name: name.clone(), role, created_at: w.now, revoked_at: None })
        })
        .await
    }

    pub(crate) async fn tokens(&self) -> Result<Vec<StoredToken>> {
        self.read(|c, _| {
            let mut stmt = c.prepare_cached(
                "SELECT id, name, role, secret_sha256, created_at, revoked_at FROM tokens ORDER BY created_at, id",
            )?;
            all(stmt.query([])?, |r| token_from_row(r))
        })
        .await
    }

    pub(crate) async fn revoke_token(&self, id: String) -> Result<TokenInfo> {
        self.write(move |w| {
            let changed = w
                .prep("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1")?
                .execute(params![id, w.now])?;
            if changed == 0 {
                return Err(StoreError::NotFound("token"));
            }
            let info = w.conn.query_row(
                "SELECT name, role, created_at, revoked_at FROM tokens WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get(2)?,
                        r.get(3)?,
                    ))
                },
            )?;
            Ok(TokenInfo {
                id: id.clone(),
                name: info.0,
                role: Role::parse(&info.1).unwrap_or(Role::Client),
                created_at: info.2,
                revoked_at: info.3,
            })
        })
        .await
    }

    pub(crate) async fn due_deliveries(
        &self,
        limit: u32,
    ) -> Result<(Vec<crate::Delivery>, Option<i64>)> {
        self.read(move |c, now| {
            let mut stmt = c.prepare_cached(
                "SELECT o.id, o.kind, o.target, o.body, o.attempts, o.done_parts, t.id,
                    (SELECT p.message_id FROM outbox p WHERE p.task_seq = o.task_seq
                        AND p.kind = 'progress' AND p.state = 'sent')
                 FROM outbox o LEFT JOIN tasks t ON t.seq = o.task_seq
                 WHERE o.state = 'pending' AND o.next_at <= ?1
                   AND o.id = (SELECT MIN(p.id) FROM outbox p
                               WHERE p.destination = o.destination AND p.state = 'pending')
                 ORDER BY o.id LIMIT ?2",
            )?;
            let rows = all(stmt.query(params![now, limit])?, |r| delivery_from_row(r))?;
            let mut out = Vec::new();
            for (mut delivery, task_id) in rows {
                if let Some(aid) = model::delivery_approval(&delivery) {
                    delivery.approval = match load_approval(c, &aid) {
                        Ok((a, _)) => Some(a),
                        Err(StoreError::NotFound(_)) => None,
                        Err(e) => return Err(e),
                    };
                    if let Some(tid) = &task_id {
                        delivery.approval_message = c
                            .prepare_cached(
                                "SELECT message_id FROM outbox
                                 WHERE task_seq = (SELECT seq FROM tasks WHERE id = ?1)
                                   AND kind = 'approval' AND body = ?2 AND message_id IS NOT NULL",
                            )?
                            .query_row(params![tid, model::approval_body(&aid).to_string()], |r| {
                                r.get(0)
                            })
                            .optional()?;
                    }
                }
                if let Some(tid) = task_id {
                    delivery.task = Some(load_task(c, &tid, &Scope::All)?);
                }
                out.push(delivery);
            }
            let next: Option<i64> = c
                // The next time a destination's first message is due: a row behind a
                // rate-limited one is not due before it (else the worker spins until then).
                .prepare_cached(
                    "SELECT MIN(o.next_at) FROM outbox o WHERE o.state = 'pending'
                       AND o.id = (SELECT MIN(p.id) FROM outbox p
                                   WHERE p.destination = o.destination AND p.state = 'pending')",
                )?
                .query_row([], |r| r.get(0))?;
            Ok((out, next))
        })
        .await
    }

    pub(crate) async fn update_delivery(
        &self,
        id: i64,
        update: crate::DeliveryUpdate,
    ) -> Result<()> {
        use crate::DeliveryUpdate as U;
        self.write(move |w| {
            let changed = match &update {
                U::Parts { done_parts, message_id } => w
                    .prep(
                        "UPDATE outbox SET done_parts = ?2, message_id = COALESCE(message_id, ?3),
                            updated_at = ?4 WHERE id = ?1",
                    )?
                    .execute(params![id, done_parts, message_id, w.now])?,
                U::Sent { message_id } => w
                    .prep(
                        "UPDATE outbox SET state = 'sent', attempts = attempts + 1,
                            message_id = COALESCE(message_id, ?2), last_error = NULL, updated_at = ?3
                         WHERE id = ?1",
                    )?
                    .execute(params![id, message_id, w.now])?,
                U::Retry { at, error } => w
                    .prep(
                        "UPDATE outbox SET attempts = attempts + 1, next_at = ?2, last_error = ?3,
                            updated_at = ?4 WHERE id = ?1",
                    )?
                    .execute(params![id, at, error, w.now])?,
                U::Wait { at, error } => w
                    .prep(
                        "UPDATE outbox SET next_at = ?2, last_error = ?3, updated_at = ?4
                         WHERE id = ?1",
                    )?
                    .execute(params![id, at, error, w.now])?,
                U::Failed { error } => w
                    .prep(
                        "UPDATE outbox SET state = 'failed', attempts = attempts + 1, last_error = ?2,
                            updated_at = ?3 WHERE id = ?1",
                    )?
                    .execute(params![id, error, w.now])?,
            };
            if changed == 0 {
                return Err(StoreError::NotFound("delivery"));
            }
            // The task's delivery state is part of the task: tell its watchers.
            let task: Option<String> = w
                .prep("SELECT t.id FROM outbox o JOIN tasks t ON t.seq = o.task_seq WHERE o.id = ?1")?
                .query_row(params![id], |r| r.get(0))
                .optional()?;
            if let Some(t) = task {
                w.fx.changed.push(t);
            }
            if model::frees_destination(&update) {
                // The next message of this destination may now be due.
                w.fx.delivery = true;
            }
            Ok(())
        })
        .await
    }

    pub(crate) async fn notify(&self, target: ReplyTo, text: String) -> Result<i64> {
        self.write(move |w| w.enqueue(None, "notify", &target, Some(&model::notify_body(&text)), 0))
            .await
    }

    pub(crate) async fn prune(&self, before: i64, limit: u32) -> Result<crate::Pruned> {
        self.write(move |w| {
            let seqs = w
                .prep(
                    "SELECT seq FROM tasks t
                     WHERE finished_at IS NOT NULL AND finished_at < ?1
                       AND NOT EXISTS (SELECT 1 FROM outbox o
                                       WHERE o.task_seq = t.seq AND o.state = 'pending')
                     ORDER BY finished_at LIMIT ?2",
                )?
                .query_map(params![before, limit], |r| r.get::<_, i64>(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            let mut out = crate::Pruned::default();
            for seq in seqs {
                // One table at a time: SQLite does not count cascaded deletes.
                let delete = |sql: &str| -> Result<u64> {
                    Ok(w.conn.prepare_cached(sql)?.execute([seq])? as u64)
                };
                out.events += delete("DELETE FROM task_events WHERE task_seq = ?1")?;
                out.deliveries += delete("DELETE FROM outbox WHERE task_seq = ?1")?;
                out.tasks += delete("DELETE FROM tasks WHERE seq = ?1")?;
            }
            out.deliveries += w
                .prep(
                    "DELETE FROM outbox WHERE id IN (
                        SELECT id FROM outbox WHERE task_seq IS NULL AND state <> 'pending'
                          AND updated_at < ?1 LIMIT ?2)",
                )?
                .execute(params![before, limit])? as u64;
            // The chart's rollup: the same horizon as the tasks it counted.
            w.prep("DELETE FROM finished_minutes WHERE minute < ?1 / 60000 * 60000")?
                .execute([before])?;
            out.runners += w
                .prep(
                    "DELETE FROM runners WHERE last_seen < ?1 AND NOT EXISTS (
                        SELECT 1 FROM tasks WHERE runner = runners.name AND finished_at IS NULL)",
                )?
                .execute([before])? as u64;
            Ok(out)
        })
        .await
    }

    pub(crate) async fn create_approval(
        &self,
        id: String,
        req: ApprovalRequest,
    ) -> Result<(Approval, bool)> {
        self.write(move |w| {
            let t = w.open_task(&id)?;
            model::check_attempt(&t, req.attempt, &req.lease_token)?;
            let existing: Option<String> = w
                .prep("SELECT id FROM approvals WHERE task_seq = ?1 AND attempt = ?2 AND key = ?3")?
                .query_row(params![t.seq, t.attempt, req.key], |r| r.get(0))
                .optional()?;
            if let Some(aid) = existing {
                return Ok((load_approval(w.conn, &aid)?.0, false));
            }
            w.check_lease(&t)?;
            let (pending, asked): (i64, i64) = w
                .prep(
                    "SELECT COALESCE(SUM(state = 'pending'), 0), COALESCE(SUM(attempt = ?2), 0)
                     FROM approvals WHERE task_seq = ?1",
                )?
                .query_row(params![t.seq, t.attempt], |r| Ok((r.get(0)?, r.get(1)?)))?;
            model::check_can_ask(&t, pending, asked)?;
            w.renew_lease(&t)?;
            let aid = model::new_approval_id();
            let expires_at = model::approval_expires(w.now, req.timeout_ms);
            w.prep(
                "INSERT INTO approvals (id, task_seq, attempt, key, agent, runner, owner, state,
                        tool, options, asked_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                aid,
                t.seq,
                t.attempt,
                req.key,
                t.agent,
                t.runner,
                t.owner,
                to_json(&req.tool),
                to_json(&req.options),
                w.now,
                expires_at
            ])?;
            let a = load_approval(w.conn, &aid)?.0;
            w.event(t.seq, t.attempt, "approval", &model::approval_event(&a))?;
            w.fx.changed.push(t.id.clone());
            w.fx.deadlines.push(expires_at);
            w.deliver_question(&t, &aid)?;
            Ok((a, true))
        })
        .await
    }

    pub(crate) async fn runner_approval(
        &self,
        task_id: String,
        id: String,
        at: AttemptRef,
    ) -> Result<Approval> {
        self.read(move |c, _| {
            let (attempt, lease_token, state): (u32, Option<String>, String) = c
                .prepare_cached("SELECT attempt, lease_token, state FROM tasks WHERE id = ?1")?
                .query_row(params![task_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?
                .ok_or(StoreError::NotFound("task"))?;
            crate::fence(
                &task_id,
                parse_state(&state)?,
                attempt,
                lease_token.as_deref(),
                &at,
            )?;
            let (a, _) = load_approval(c, &id)?;
            if a.task_id != task_id || a.attempt != at.attempt {
                return Err(StoreError::NotFound("approval"));
            }
            Ok(a)
        })
        .await
    }

    pub(crate) async fn approval(&self, id: String, scope: Scope) -> Result<Approval> {
        self.read(move |c, _| {
            let (a, owner) = load_approval(c, &id)?;
            model::check_approval_owner(&scope, &owner)?;
            Ok(a)
        })
        .await
    }

    pub(crate) async fn approvals(
        &self,
        filter: ApprovalFilter,
        scope: Scope,
    ) -> Result<Vec<Approval>> {
        self.read(move |c, _| {
            let owner = match &scope {
                Scope::All => None,
                Scope::Owner(o) => Some(o.clone()),
            };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals a JOIN tasks t ON t.seq = a.task_seq
                 WHERE (?1 IS NULL OR a.state = ?1) AND (?2 IS NULL OR t.id = ?2)
                   AND (?3 IS NULL OR a.owner = ?3)
                 ORDER BY a.id DESC LIMIT ?4"
            ))?;
            all(
                stmt.query(params![
                    filter.state.map(|s| s.as_str()),
                    filter.task,
                    owner,
                    filter.limit.clamp(1, 1000)
                ])?,
                |r| model::approval_from_row(r),
            )
        })
        .await
    }

    pub(crate) async fn answer_approval(
        &self,
        id: String,
        scope: Scope,
        token_id: String,
        ans: ApprovalAnswer,
    ) -> Result<Approval> {
        self.write(move |w| {
            let (a, owner) = load_approval(w.conn, &id)?;
            model::check_approval_owner(&scope, &owner)?;
            let name: String = w
                .prep("SELECT name FROM tokens WHERE id = ?1")?
                .query_row(params![token_id], |r| r.get(0))
                .optional()?
                .unwrap_or_else(|| token_id.clone());
            let by = model::answered_by(ans.by.as_deref(), &name);
            match model::answer(&a, &ans, by, w.now)? {
                Answer::Settle(state, outcome) => w.settle_approval(&a, state, outcome),
                Answer::Expired(outcome, err) => {
                    w.settle_approval(&a, ApprovalState::Expired, outcome)?;
                    Err(err)
                }
            }
        })
        .await
    }

    pub(crate) async fn counts(&self) -> Result<QueueCounts> {
        self.read(|c, _| {
            let mut stmt = c.prepare_cached(crate::COUNT_BY_STATE)?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut by_state = Vec::new();
            for row in rows {
                let (s, n) = row?;
                by_state.push((parse_state(&s)?, n as u64));
            }
            Ok(QueueCounts { by_state })
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// The writer thread

fn open_writer(path: &Path, durability: Durability) -> Result<Connection> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
        })?;
    }
    let conn = Connection::open(path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "{} cannot use WAL mode (got {mode})",
            path.display()
        )));
    }
    let sync = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    // Checkpoints run on their own thread (see `checkpointer`): an automatic one would fsync
    // inside a commit of the writer and stall every write behind it.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;
         PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"
    ))?;
    conn.set_prepared_statement_cache_capacity(128);
    // Plans that do not depend on bound values: without this, SQLite marks some cached
    // statements (those whose terms it compared with a partial index's condition) to be
    // re-prepared whenever a parameter changes, i.e. on nearly every use (11% of the writer's
    // time in a profile). Every partial-index condition here is a literal in the SQL anyway.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    migrate(&conn)?;
    Ok(conn)
}

fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Applies the embedded migrations not yet applied (tracked in `PRAGMA user_version`).
fn migrate(conn: &Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version as usize > MIGRATIONS.len() {
        return Err(StoreError::Unavailable(format!(
            "the database is at schema version {version}, newer than this build knows ({}); upgrade tunnel",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {}; COMMIT;",
            i + 1
        ))
        .inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK");
        })?;
        tracing::info!(version = i + 1, "Applied database migration.");
    }
    Ok(())
}

/// WAL frames (pages) appended between two PASSIVE checkpoints on the checkpoint thread.
const CHECKPOINT_FRAMES: u32 = 1_000;
/// WAL frames past which the writer itself checkpoints with RESTART between two batches, so the
/// next commit writes the log from its start again (16 MiB with 4 KiB pages). The PASSIVE
/// checkpoints alone never let the log restart under sustained load: the writer appends while
/// they copy, so the log is never wholly copied when a transaction begins.
const RESTART_FRAMES: u32 = 4_096;
/// After a RESTART that could not finish (a reader held an old snapshot), frames to wait
/// before trying again.
const RESTART_RETRY_FRAMES: u32 = 1_024;
/// What the WAL file is cut back to when the log restarts (`journal_size_limit`).
const WAL_SIZE_LIMIT: i64 = 16 * 1024 * 1024;
/// Idle time after which the writer checkpoints and truncates the WAL to nothing.
const IDLE_TRUNCATE: std::time::Duration = std::time::Duration::from_secs(1);

/// The size of the write-ahead log as the writer's last commit left it (SQLite's WAL hook).
struct Wal {
    frames: Arc<std::sync::atomic::AtomicU32>,
}

impl Wal {
    fn new(conn: &mut Connection) -> Wal {
        let frames = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = frames.clone();
        // Replaces the automatic checkpoint's hook, which `wal_autocheckpoint = 0` turned off.
        let hooked = conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
            seen.store(pages.max(0) as u32, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }));
        if let Err(e) = hooked {
            tracing::warn!(error = %e, "Cannot watch the WAL size; it is truncated only when idle.");
        }
        Wal { frames }
    }

    fn frames(&self) -> u32 {
        self.frames.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn reset(&self) {
        self.frames.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A thread that checkpoints the WAL (PASSIVE) when the writer asks, with its own connection,
/// so the writer does not wait for the copying and its fsyncs in the common case.
struct Checkpointer {
    /// Held while a checkpoint runs. SQLite refuses a checkpoint at once (no busy handler)
    /// while another connection runs one, so the writer takes this first and waits for a
    /// PASSIVE in progress rather than having its RESTART refused under load.
    running: Arc<Mutex<()>>,
    tx: mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: &Path) -> Option<Checkpointer> {
        let conn = match Connection::open(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "Cannot open the checkpoint connection; the writer checkpoints alone.");
                return None;
            }
        };
        let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let running = Arc::new(Mutex::new(()));
        let held = running.clone();
        let thread = std::thread::Builder::new()
            .name("tunnel-sqlite-checkpoint".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let _running = held.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = checkpoint(&conn, "PASSIVE") {
                        tracing::warn!(error = %e, "WAL checkpoint failed.");
                    }
                }
                // Closed before the writer's connection, which is then the last and removes
                // the WAL.
                drop(conn);
            })
            .ok()?;
        Some(Checkpointer {
            running,
            tx,
            thread,
        })
    }

    fn request(&self) {
        // A full channel means a checkpoint is already pending: nothing to add.
        let _ = self.tx.try_send(());
    }

    fn stop(self) {
        drop(self.tx);
        let _ = self.thread.join();
    }
}

/// Runs a checkpoint on the writer's connection, after any the checkpoint thread is running.
fn writer_checkpoint(
    conn: &Connection,
    checkpoints: Option<&Checkpointer>,
    mode: &str,
) -> rusqlite::Result<bool> {
    let _other_done = checkpoints.map(|c| c.running.lock().unwrap_or_else(|p| p.into_inner()));
    checkpoint(conn, mode)
}

/// Runs `PRAGMA wal_checkpoint(mode)`; true when it finished (not blocked by a reader or
/// another checkpoint).
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<bool> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|busy| busy == 0)
}

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Msg>,
    handing: Handing,
    checkpoints: Option<Checkpointer>,
    wal: Wal,
) {
    // WAL frames at the last PASSIVE request, and the size at which to try a RESTART next.
    let mut asked_at = 0u32;
    let mut restart_at = RESTART_FRAMES;
    // Written since the WAL file was last truncated.
    let mut dirty = false;
    let mut close = None;
    loop {
        let first = if dirty {
            match rx.recv_timeout(IDLE_TRUNCATE) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    match writer_checkpoint(&conn, checkpoints.as_ref(), "TRUNCATE") {
                        Ok(true) => {
                            wal.reset();
                            asked_at = 0;
                            restart_at = RESTART_FRAMES;
                            dirty = false;
                            continue;
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed."),
                    }
                    // Busy or failed: tried again after the next write.
                    match rx.recv() {
                        Ok(m) => m,
                        Err(_) => break,
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            }
        };
        let mut batch = Vec::new();
        match first {
            Msg::Job(job) => batch.push(job),
            Msg::Close(done) => {
                close = Some(done);
            }
        }
        while close.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Close(done)) => close = Some(done),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            commit_batch(&mut conn, batch, &handing);
            dirty = true;
        }
        if close.is_some() {
            break;
        }
        let frames = wal.frames();
        if frames >= restart_at {
            // Between two batches, with nothing else writing: copy what the PASSIVE
            // checkpoints left and have the next commit write the log from its start.
            match writer_checkpoint(&conn, checkpoints.as_ref(), "RESTART") {
                Ok(true) => {
                    wal.reset();
                    asked_at = 0;
                    restart_at = RESTART_FRAMES;
                }
                Ok(false) => restart_at = frames + RESTART_RETRY_FRAMES,
                Err(e) => {
                    tracing::warn!(error = %e, "WAL checkpoint failed.");
                    restart_at = frames + RESTART_RETRY_FRAMES;
                }
            }
        } else if frames >= asked_at + CHECKPOINT_FRAMES
            && let Some(c) = &checkpoints
        {
            c.request();
            asked_at = frames;
        }
    }
    // Shutting down (closed, or every sender gone): no log left behind to replay at the next
    // start. The checkpoint connection closes first so this one is the last and SQLite
    // removes the WAL file as it closes.
    if let Some(c) = checkpoints {
        c.stop();
    }
    if let Err(e) = checkpoint(&conn, "TRUNCATE") {
        tracing::warn!(error = %e, "The final WAL checkpoint failed.");
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "Closing the database failed.");
    }
    if let Some(done) = close {
        let _ = done.send(());
    }
}

/// What the writer needs to claim for parked long-polls itself ([`hand_off`]).
struct Handing {
    signals: Arc<dyn Signals>,
    clock: Arc<dyn Clock>,
    settings: Arc<QueueSettings>,
}

/// A claim made for a parked long-poll, answered after the commit.
struct Handed {
    answer: oneshot::Sender<Handoff>,
    handoff: Handoff,
    /// The ready task it was taken out of line for.
    hint: ReadyHint,
}

/// Runs `batch` in one transaction, claims for the parked long-polls what it made ready
/// ([`hand_off`]), commits, tells the signals what changed and answers every job and every
/// poll claimed for.
///
/// The writes run one after another with no savepoint (a savepoint per write copied every
/// page each write touched into its sub-journal: a sixth of the writer's time). If one fails
/// in a way that must undo what it did, the transaction is rolled back and the batch run again
/// with each write in its own savepoint and without that write, which is answered with its
/// error: every write gets what it would have got alone, and only a batch with such a failure
/// runs twice.
fn commit_batch(conn: &mut Connection, mut batch: Vec<Job>, handing: &Handing) {
    let conn: &Connection = conn;
    let stmts = Stmts::new(conn);
    let signals = &*handing.signals;
    let mut effects = Effects::default();
    let mut handed = Vec::new();
    let mut mode = Mode::Plain;
    // The write that failed in the plain run: it keeps that result and is not run again.
    let mut failed = None;
    let committed = loop {
        if let Err(e) = cached(conn, "BEGIN IMMEDIATE") {
            tracing::error!(error = %e, "SQLite could not begin a transaction.");
            // The jobs' callers get an error.
            break false;
        }
        effects = Effects::default();
        let mut clean = true;
        for (i, job) in batch.iter_mut().enumerate() {
            if failed != Some(i) && job.run(&stmts, &mut effects, mode) == Ran::Dirty {
                failed = Some(i);
                clean = false;
                break;
            }
        }
        if clean && !effects.ready.is_empty() {
            clean = hand_off(&stmts, &mut effects, handing, mode, &mut handed);
        }
        if !clean {
            // Only a plain run is ever dirty: the run again has a savepoint per write.
            debug_assert!(mode == Mode::Plain);
            rollback(conn);
            mode = Mode::Savepoints;
            continue;
        }
        match cached(conn, "COMMIT") {
            Ok(()) => break true,
            Err(e) => {
                tracing::error!(error = %e, "SQLite commit failed.");
                rollback(conn);
                break false;
            }
        }
    };
    // The polls first: their answers are what a dispatch waits for.
    for Handed {
        answer, handoff, ..
    } in handed
    {
        let handoff = if committed {
            handoff
        } else {
            Handoff::Failed(StoreError::Unavailable("the commit failed".into()))
        };
        if let Err(lost) = answer.send(handoff)
            && committed
        {
            signals.handoff_lost(lost);
        }
    }
    if committed {
        for at in &effects.deadlines {
            signals.deadline(*at);
        }
        for id in &effects.changed {
            signals.task_changed(id);
        }
        for hint in &effects.ready {
            signals.task_ready(hint);
        }
        if effects.delivery {
            signals.delivery_ready();
        }
    }
    for job in batch {
        job.answer(committed);
    }
}

/// Runs a statement without parameters through the statement cache (`BEGIN`, `COMMIT`,
/// savepoints): parsed once, not for every batch or write.
fn cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Ends the open transaction undoing everything in it; errors are logged (the next `BEGIN`
/// fails, and its writes with it, if the transaction is still open).
fn rollback(conn: &Connection) {
    if !conn.is_autocommit()
        && let Err(e) = cached(conn, "ROLLBACK")
    {
        tracing::error!(error = %e, "SQLite rollback failed.");
    }
}

/// Claims each task the batch made ready for the parked long-poll it would wake
/// ([`Signals::take_parked`]), in the batch's own transaction: one commit and no thread
/// round trip for a dispatch, where waking the poll to claim was a second write after a hop
/// to its thread and back. The claim is the poll's own ([`claim_in`], [`claim_and_start_in`]:
/// same filters, same order, the oldest task it can take, which may be an older one than
/// hinted), so nothing about who gets what changes. The hints no parked poll took stay in
/// `effects.ready`, signalled after the commit as before.
///
/// False when a claim failed with something to undo ([`Ran::Dirty`], plain mode only): that
/// poll is answered with its error and every other poll taken in this run is woken to claim
/// for itself, as the batch is rolled back and run again.
fn hand_off(
    stmts: &Stmts<'_>,
    effects: &mut Effects,
    handing: &Handing,
    mode: Mode,
    handed: &mut Vec<Handed>,
) -> bool {
    let now = handing.clock.now_ms();
    let first = handed.len();
    let mut hints: std::collections::VecDeque<ReadyHint> =
        std::mem::take(&mut effects.ready).into();
    let mut left = Vec::new();
    while let Some(hint) = hints.pop_front() {
        loop {
            let Some(parked) = handing.signals.take_parked(&hint) else {
                left.push(hint);
                break;
            };
            let ParkedClaim {
                req,
                token,
                start,
                answer,
            } = parked;
            let mut fx = Effects::default();
            let (result, ran) =
                run_write(
                    stmts,
                    &mut fx,
                    &handing.settings,
                    now,
                    mode,
                    |w| match start {
                        None => {
                            Ok(claim_in(w, &req, Some(&token))?
                                .map(|o| Handoff::Offered(Box::new(o))))
                        }
                        Some(start) => Ok(claim_and_start_in(w, &req, &token, start)?
                            .map(|s| Handoff::Started(Box::new(s)))),
                    },
                );
            if ran == Ran::Dirty {
                for h in &mut handed[first..] {
                    h.handoff = Handoff::Ready(h.hint.clone());
                }
                let handoff = Handoff::Failed(match result {
                    Err(e) => e,
                    Ok(_) => StoreError::Unavailable("the claim failed".into()),
                });
                handed.push(Handed {
                    answer,
                    handoff,
                    hint,
                });
                return false;
            }
            // A refused task finished may have made its session's next one ready.
            hints.extend(std::mem::take(&mut fx.ready));
            effects.merge(fx);
            match result {
                Ok(Some(handoff)) => {
                    let took = match &handoff {
                        Handoff::Offered(o) => &o.task.id,
                        Handoff::Started(s) => &s.offer.task.id,
                        _ => "",
                    } == hint.task_id;
                    if took {
                        handed.push(Handed {
                            answer,
                            handoff,
                            hint,
                        });
                        break;
                    }
                    // It took an older task: the hinted one still waits for the next poll.
                    handed.push(Handed {
                        answer,
                        handoff,
                        hint: hint.clone(),
                    });
                }
                Ok(None) => {
                    // Nothing it can take after all: woken as before, it claims for itself.
                    handed.push(Handed {
                        answer,
                        handoff: Handoff::Ready(hint.clone()),
                        hint,
                    });
                    break;
                }
                Err(e) => {
                    handed.push(Handed {
                        answer,
                        handoff: Handoff::Failed(e),
                        hint: hint.clone(),
                    });
                    left.push(hint);
                    break;
                }
            }
        }
    }
    effects.ready = left;
    true
}

/// Runs one write and says whether it must be undone. Plain mode: straight in the
/// transaction; a failure that must undo the write (a database error, a full queue) is
/// [`Ran::Dirty`] only if the write changed a row or SQLite ended the transaction, else there
/// is nothing to undo and it fails alone. Savepoints mode: in its own savepoint, rolled back
/// alone; never dirty.
fn run_write<T>(
    stmts: &Stmts<'_>,
    effects: &mut Effects,
    settings: &QueueSettings,
    now: i64,
    mode: Mode,
    f: impl FnOnce(&mut W<'_, '_>) -> Result<T>,
) -> (Result<T>, Ran) {
    let conn = stmts.conn;
    let changes = conn.total_changes();
    if mode == Mode::Savepoints
        && let Err(e) = cached(conn, "SAVEPOINT job")
    {
        return (Err(e.into()), Ran::Clean);
    }
    let (result, fx) = {
        let mut w = W {
            conn,
            now,
            fx: Effects::default(),
            settings,
            stmts,
        };
        let r = f(&mut w);
        (r, w.fx)
    };
    // A refusal (stale attempt, conflict, not found) keeps what the write did before refusing:
    // that is deliberate, e.g. expiring the lease a late heartbeat found expired. Any other
    // error undoes the write.
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
    match mode {
        Mode::Plain => {
            if keep {
                effects.merge(fx);
                (result, Ran::Clean)
            } else if conn.total_changes() == changes && !conn.is_autocommit() {
                (result, Ran::Clean)
            } else {
                (result, Ran::Dirty)
            }
        }
        Mode::Savepoints => {
            if keep {
                if let Err(e) = cached(conn, "RELEASE job") {
                    return (Err(e.into()), Ran::Clean);
                }
                effects.merge(fx);
            } else {
                // As dropping a savepoint does: undo the write, errors ignored (a failed
                // rollback leaves the transaction to fail at commit).
                let _ = cached(conn, "ROLLBACK TO job");
                let _ = cached(conn, "RELEASE job");
            }
            (result, Ran::Clean)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writes on the writer thread

/// Whether the owner of task `id` may resume the agent session `session_id`.
fn may_resume_in(c: &Connection, id: &str, session_id: &str) -> Result<bool> {
    let (owner, agent, client): (String, String, bool) = c
        .prepare_cached(
            "SELECT t.owner, t.agent, EXISTS (SELECT 1 FROM tokens k
                WHERE k.id = t.owner AND k.role = 'client')
             FROM tasks t WHERE t.id = ?1",
        )?
        .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?
        .ok_or(StoreError::NotFound("task"))?;
    if !client {
        return Ok(true);
    }
    let made_by: Option<Option<String>> = c
        .prepare_cached("SELECT owner FROM session_history WHERE agent = ?1 AND session_id = ?2")?
        .query_row(params![agent, session_id], |r| r.get(0))
        .optional()?;
    Ok(made_by.is_some_and(|o| o.is_none_or(|o| o == owner)))
}

/// [`claim_in`], then the offer acked with `start`'s lease in the same write (a task `start`
/// refuses is finished `failed` and the next one claimed), with what the caller needs to hand
/// it on.
fn claim_and_start_in(
    w: &mut W<'_, '_>,
    req: &ClaimRequest,
    token: &str,
    start: StartAtClaim,
) -> Result<Option<Started>> {
    loop {
        let Some(mut offer) = claim_in(w, req, Some(token))? else {
            return Ok(None);
        };
        let at = AttemptRef {
            attempt: offer.attempt,
            lease_token: offer.lease_token.clone(),
        };
        let id = offer.task.id.clone();
        if let Some(error) = (start.refuse)(&offer.task) {
            finish_in(w, &id, &crate::refused(&at, error))?;
            continue;
        }
        let may_resume = match (start.wanted_session)(&offer.task) {
            Some(s) => may_resume_in(w.conn, &id, &s)?,
            None => false,
        };
        // Only a task in a conversation has a namespace to read (as on PostgreSQL): no read
        // for the rest, e.g. most v1 claims with `ack`, which do not use it.
        let conv_owner: Option<String> = match offer.task.conversation {
            Some(_) => w
                .prep("SELECT conv_owner FROM tasks WHERE id = ?1")?
                .query_row(params![id], |r| r.get(0))?,
            None => None,
        };
        let lease_ms = start.lease_ms.map(|f| f(&offer.task).max(1));
        offer.lease = Some(ack_in(w, &id, &at, lease_ms, start.confirm)?);
        return Ok(Some(Started {
            offer,
            may_resume,
            conv_owner: conv_owner.filter(|o| !o.is_empty()),
            confirmed: start.confirm,
        }));
    }
}

/// Offers `req`'s runner the oldest ready task it can take, or nothing.
fn claim_in(w: &mut W<'_, '_>, req: &ClaimRequest, token: Option<&str>) -> Result<Option<Offer>> {
    w.touch_runner(req, token)?;
    // An attempt an earlier claim with `ack` started whose answer this runner may never
    // have read comes first (see `model::Unconfirmed`).
    if req.ack
        && let Some(offer) = w.unconfirmed_offer(req)?
    {
        return Ok(Some(offer));
    }
    // Oldest ready task first, among those of the runner's agents and projects only:
    // one range of `tasks_ready_claim` per (agent, project or none), merged by seq,
    // so tasks queued for agents or projects this runner lacks cost nothing here.
    let mut streams: Vec<(&str, &str)> = Vec::new();
    for a in &req.agents {
        streams.push((a, ""));
        for p in &req.projects {
            streams.push((a, p));
        }
    }
    streams.sort_unstable();
    streams.dedup();
    let mut next = w.prep(
        "SELECT seq FROM tasks INDEXED BY tasks_ready_claim
         WHERE ready = 1 AND agent = ?1 AND coalesce(project, '') = ?2 AND seq > ?3
         ORDER BY seq LIMIT 1",
    )?;
    let mut heads = std::collections::BinaryHeap::new();
    for (i, (a, p)) in streams.iter().enumerate() {
        if let Some(seq) = next
            .query_row(params![a, p, 0], |r| r.get::<_, i64>(0))
            .optional()?
        {
            heads.push(std::cmp::Reverse((seq, i)));
        }
    }
    let mut candidate = w.prep(
        "SELECT t.agent, t.session_mode, t.resume_id, t.not_before, s.session_id, s.runner
         FROM tasks t
         LEFT JOIN sessions s ON s.owner = t.conv_owner AND s.agent = t.agent
            AND s.conversation = t.conversation
         WHERE t.seq = ?1",
    )?;
    let mut chosen = None;
    while let Some(std::cmp::Reverse((seq, i))) = heads.pop() {
        let (agent, mode, resume_id, not_before, bound_session, bound_runner) = candidate
            .query_row(params![seq], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })?;
        let takeable = if not_before.is_some_and(|nb| nb > w.now) {
            None
        } else {
            let (resume, home) = resolve_session(
                w.conn,
                &agent,
                &mode,
                resume_id,
                bound_session,
                bound_runner,
            )?;
            // A session lives on the disk of the runner that made it.
            home.as_ref()
                .is_none_or(|h| h == &req.runner)
                .then_some(resume)
        };
        if let Some(resume) = takeable {
            chosen = Some((seq, mode, resume));
            break;
        }
        let (a, p) = streams[i];
        if let Some(seq) = next
            .query_row(params![a, p, seq], |r| r.get::<_, i64>(0))
            .optional()?
        {
            heads.push(std::cmp::Reverse((seq, i)));
        }
    }
    drop(next);
    drop(candidate);
    let Some((seq, mode, resume)) = chosen else {
        return Ok(None);
    };
    let lease_token = random_hex(16);
    let ack_by = w.now + w.settings.ack_timeout_ms;
    // One statement moves the task, counts its `offered` event and gives back the row
    // (no read after the write).
    let offered = StateEvent::Offered(&req.runner).data().to_string();
    let (row, event_seq, conv_owner) = w
        .prep(concat!(
            "UPDATE tasks SET state = 'offered', ready = 0, attempt = attempt + 1,
                lease_token = ?2, runner = ?3, ack_by = ?4, lease_until = NULL,
                not_before = NULL, reason = NULL, updated_at = ?5,
                next_event_seq = next_event_seq + 1, event_bytes = event_bytes + ?6,
                unconfirmed = ?7, offer_resume = ?8
             WHERE seq = ?1
             RETURNING ",
            task_columns!(),
            ", next_event_seq - 1, conv_owner"
        ))?
        .query_row(
            params![
                seq,
                lease_token,
                req.runner,
                ack_by,
                w.now,
                model::event_size("state", &offered) as i64,
                req.ack,
                req.ack.then_some(resume.as_deref()).flatten()
            ],
            |r| {
                Ok(task_row(r)?.and_then(|row| {
                    Ok((row, r.int(TASK_COLUMNS_LEN)?, r.text(TASK_COLUMNS_LEN + 1)?))
                }))
            },
        )??;
    let task = complete_task(w.conn, row, &Scope::All)?;
    if let Some(conv) = &task.conversation
        && model::rebinds_on_offer(&mode)
    {
        let runner = if resume.is_some() {
            history_runner(w.conn, &task.agent, resume.as_deref().unwrap_or_default())?
        } else {
            None
        };
        w.set_binding(
            &task.agent,
            conv,
            &conv_owner,
            resume.as_deref(),
            runner.as_deref(),
        )?;
    }
    w.insert_event_at(seq, event_seq, task.attempt, None, "state", &offered)?;
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
}

/// Starts the attempt `at` of task `id` under a lease of `lease_ms` (else the configured one).
/// `confirm`: the runner itself acks (it has the offer); else the server acks for it in the
/// claim that made the offer, and the attempt stays unconfirmed.
fn ack_in(
    w: &mut W<'_, '_>,
    id: &str,
    at: &AttemptRef,
    lease_ms: Option<i64>,
    confirm: bool,
) -> Result<LeaseStatus> {
    let lease_ms = lease_ms.unwrap_or(w.settings.lease_ms);
    let t = w.open_task(id)?;
    model::check_attempt(&t, at.attempt, &at.lease_token)?;
    if confirm {
        w.confirm(&t)?;
    }
    let lease_until = match model::ack(&t, at, w.now, lease_ms)? {
        Ack::Start { lease_until } => lease_until,
        Ack::Again(status) => return Ok(status),
        Ack::Expired(e) => {
            w.requeue_offer(&t)?;
            return Err(e);
        }
    };
    let running = StateEvent::Running(t.runner.as_deref()).data().to_string();
    let event_seq: i64 = w
        .prep(
            "UPDATE tasks SET state = 'running', runs = runs + 1, ack_by = NULL,
                lease_until = ?2, started_at = COALESCE(started_at, ?3), updated_at = ?3,
                next_event_seq = next_event_seq + 1, event_bytes = event_bytes + ?4
             WHERE seq = ?1 RETURNING next_event_seq - 1",
        )?
        .query_row(
            params![
                t.seq,
                lease_until,
                w.now,
                model::event_size("state", &running) as i64
            ],
            |r| r.get(0),
        )?;
    w.insert_event_at(t.seq, event_seq, t.attempt, None, "state", &running)?;
    w.fx.changed.push(t.id.clone());
    w.fx.deadlines.push(lease_until);
    w.deliver_started(&t)?;
    Ok(LeaseStatus {
        lease_until,
        lease_ms,
        cancel: false,
    })
}

/// Ends (or parks) the attempt `req` names.
fn finish_in(w: &mut W<'_, '_>, id: &str, req: &FinishRequest) -> Result<Task> {
    let t = w.open_task(id)?;
    model::check_attempt(&t, req.attempt, &req.lease_token)?;
    w.confirm(&t)?;
    match model::finish(&t, req.attempt)? {
        Finish::Record { check_lease } => {
            if check_lease {
                w.check_lease(&t)?;
            }
        }
        Finish::Again => return load_task_by_seq(w.conn, t.seq),
    }
    if let Some(sid) = &req.result.session_id {
        w.record_session(&t, sid)?;
    }
    match req.outcome {
        Outcome::Parked => {
            w.settle_pending(&t, "the attempt ended")?;
            let not_before = req.not_before.unwrap_or(w.now);
            let parked = StateEvent::Parked(not_before).data().to_string();
            let event_seq: i64 = w
                .prep(
                    "UPDATE tasks SET state = 'parked', ready = 1, not_before = ?2,
                        lease_until = NULL, ack_by = NULL, lease_token = NULL,
                        reason = ?3, updated_at = ?4, result = ?5,
                        next_event_seq = next_event_seq + 1,
                        event_bytes = event_bytes + ?6
                     WHERE seq = ?1 RETURNING next_event_seq - 1",
                )?
                .query_row(
                    params![
                        t.seq,
                        not_before,
                        model::parked_reason(&req.result),
                        w.now,
                        to_json(&req.result),
                        model::event_size("state", &parked) as i64
                    ],
                    |r| r.get(0),
                )?;
            w.insert_event_at(t.seq, event_seq, t.attempt, None, "state", &parked)?;
            w.fx.changed.push(t.id.clone());
            w.fx.deadlines.push(not_before);
            if not_before <= w.now {
                let hint = w.ready_hint(t.seq)?;
                w.fx.ready.push(hint);
            }
        }
        outcome => {
            let reason = model::finished_reason(outcome, &req.result);
            let row = w.end_task(&t, outcome.state(), reason, Some(&req.result), true)?;
            if let Some(row) = row {
                return complete_task(w.conn, row, &Scope::All);
            }
        }
    }
    load_task_by_seq(w.conn, t.seq)
}

impl W<'_, '_> {
    fn open_task(&self, id: &str) -> Result<OpenTask> {
        self.prep(concat!(
            "SELECT ",
            open_task_columns!(),
            " FROM tasks WHERE id = ?1"
        ))?
        .query_row(params![id], |r| Ok(open_task_from_row(r)))
        .optional()?
        .ok_or(StoreError::NotFound("task"))?
    }

    fn task_by_seq(&self, seq: i64) -> Result<OpenTask> {
        self.prep(concat!(
            "SELECT ",
            open_task_columns!(),
            " FROM tasks WHERE seq = ?1"
        ))?
        .query_row(params![seq], |r| Ok(open_task_from_row(r)))?
    }

    fn due(&self, sql: &str) -> Result<Vec<i64>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let seqs = stmt
            .query_map(params![self.now], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()?;
        Ok(seqs)
    }

    /// The lease of a running attempt must not have run out; if it has, the attempt is ended
    /// now (as the deadline timer would) and the caller is told it is stale.
    fn check_lease(&mut self, t: &OpenTask) -> Result<()> {
        match model::check_lease(t, self.now)? {
            Lease::Live => Ok(()),
            Lease::Expired(e) => {
                self.expire_lease(t)?;
                Err(e)
            }
        }
    }

    fn renew_lease(&mut self, t: &OpenTask) -> Result<i64> {
        self.check_lease(t)?;
        let lease_until = model::renewed_lease(t, self.now, self.settings.lease_ms);
        self.prep("UPDATE tasks SET lease_until = ?2 WHERE seq = ?1")?
            .execute(params![t.seq, lease_until])?;
        if let Some(r) = &t.runner {
            self.prep("UPDATE runners SET last_seen = ?2 WHERE name = ?1")?
                .execute(params![r, self.now])?;
        }
        Ok(lease_until)
    }

    /// The runner made a call about this attempt, so it has the offer: it is never offered
    /// again (see [`model::Unconfirmed`]).
    fn confirm(&self, t: &OpenTask) -> Result<()> {
        if t.unconfirmed {
            self.prep("UPDATE tasks SET unconfirmed = 0 WHERE seq = ?1")?
                .execute(params![t.seq])?;
        }
        Ok(())
    }

    /// The first attempt of this runner that an earlier claim with `ack` started (or offered)
    /// and the runner has not confirmed, as an offer again; the ones it lists in `holding`, or
    /// that are no longer its to have, are cleared on the way.
    fn unconfirmed_offer(&mut self, req: &ClaimRequest) -> Result<Option<Offer>> {
        let seqs = self
            .prep(
                "SELECT seq FROM tasks INDEXED BY tasks_unconfirmed
                 WHERE runner = ?1 AND unconfirmed = 1 ORDER BY seq",
            )?
            .query_map(params![req.runner], |r| r.get::<_, i64>(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()?;
        for seq in seqs {
            let t = self.task_by_seq(seq)?;
            let lease_ms = self.settings.lease_ms;
            match model::unconfirmed(&t, &req.runner, &req.holding, self.now, lease_ms) {
                model::Unconfirmed::Again(lease) => {
                    return Ok(Some(Offer {
                        task: load_task_by_seq(self.conn, seq)?,
                        attempt: t.attempt,
                        lease_token: t.lease_token.clone().unwrap_or_default(),
                        ack_by: t.ack_by.unwrap_or(self.now),
                        resume_session_id: t.offer_resume.clone(),
                        lease,
                    }));
                }
                model::Unconfirmed::Clear => self.confirm(&t)?,
            }
        }
        Ok(None)
    }

    /// An offer that was not acked in time goes back to the head of its session.
    fn requeue_offer(&mut self, t: &OpenTask) -> Result<()> {
        self.queue_again(
            t,
            "UPDATE tasks SET state = 'queued', ready = 1, ack_by = NULL, lease_token = NULL,
                reason = ?2, updated_at = ?3 WHERE seq = ?1",
            &model::offer_expired_reason(t),
        )
    }

    /// Puts an attempt's task back in the queue (`sql` ends the attempt), with its reason.
    fn queue_again(&mut self, t: &OpenTask, sql: &str, reason: &str) -> Result<()> {
        self.settle_pending(t, "the attempt ended")?;
        self.conn
            .prepare_cached(sql)?
            .execute(params![t.seq, reason, self.now])?;
        self.event(
            t.seq,
            t.attempt,
            "state",
            &StateEvent::Queued(Some(reason)).data(),
        )?;
        self.fx.changed.push(t.id.clone());
        let hint = self.ready_hint(t.seq)?;
        self.fx.ready.push(hint);
        Ok(())
    }

    /// A lease ran out: the runner is gone. Cancel if cancel was asked, retry if attempts are
    /// left, else report the task lost.
    fn expire_lease(&mut self, t: &OpenTask) -> Result<()> {
        self.end_or_queue_again(
            t,
            model::lease_expiry(t),
            "UPDATE tasks SET state = 'queued', ready = 1, lease_until = NULL,
                lease_token = NULL, reason = ?2, updated_at = ?3 WHERE seq = ?1",
        )
    }

    /// Ends a running attempt as `expiry` says: the task ends, or is queued again (`sql`).
    fn end_or_queue_again(&mut self, t: &OpenTask, expiry: Expiry, sql: &str) -> Result<()> {
        match expiry {
            Expiry::End(state, reason) => self.finish_task(t, state, Some(&reason), None),
            Expiry::Retry(reason) => self.queue_again(t, sql, &reason),
        }
    }

    /// Moves a task to a terminal state and lets the next task of its session go.
    fn finish_task(
        &mut self,
        t: &OpenTask,
        state: TaskState,
        reason: Option<&str>,
        result: Option<&TaskResult>,
    ) -> Result<()> {
        self.end_task(t, state, reason, result, false).map(drop)
    }

    /// [`W::finish_task`]; with `want_row`, also the task's row as the write left it (read in
    /// the same statement). `result` is stored when given.
    fn end_task(
        &mut self,
        t: &OpenTask,
        state: TaskState,
        reason: Option<&str>,
        result: Option<&TaskResult>,
        want_row: bool,
    ) -> Result<Option<TaskRow>> {
        debug_assert!(state.is_terminal());
        let why = if state == TaskState::Cancelled {
            "the task was cancelled"
        } else {
            "the attempt ended"
        };
        self.settle_pending(t, why)?;
        // The state, the result and the counters of the `state` event in one statement.
        let data = model::finished_event(state, reason, result).to_string();
        macro_rules! end {
            () => {
                "UPDATE tasks SET state = ?2, ready = 0, ack_by = NULL, lease_until = NULL,
                    not_before = NULL, reason = ?3, finished_at = ?4, updated_at = ?4,
                    result = COALESCE(?5, result), next_event_seq = next_event_seq + 1,
                    event_bytes = event_bytes + ?6
                 WHERE seq = ?1 RETURNING "
            };
        }
        let args = params![
            t.seq,
            state.as_str(),
            reason,
            self.now,
            result.map(to_json),
            model::event_size("state", &data) as i64
        ];
        let (event_seq, row) = if want_row {
            let (row, event_seq) = self
                .prep(concat!(end!(), task_columns!(), ", next_event_seq - 1"))?
                .query_row(args, |r| {
                    Ok(task_row(r)?.and_then(|row| Ok((row, r.int(TASK_COLUMNS_LEN)?))))
                })??;
            (event_seq, Some(row))
        } else {
            let event_seq: i64 = self
                .prep(concat!(end!(), "next_event_seq - 1"))?
                .query_row(args, |r| r.get(0))?;
            (event_seq, None)
        };
        self.insert_event_at(t.seq, event_seq, t.attempt, None, "state", &data)?;
        self.fx.changed.push(t.id.clone());
        self.deliver_final(t)?;
        if let Some(key) = &t.session_key {
            let next: Option<(i64, String)> = self
                .prep(
                    "SELECT seq, state FROM tasks WHERE session_key = ?1 AND finished_at IS NULL
                     ORDER BY seq LIMIT 1",
                )?
                .query_row(params![key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((seq, s)) = next
                && model::parse_state(&s).is_ok_and(model::waits_in_queue)
            {
                self.prep("UPDATE tasks SET ready = 1 WHERE seq = ?1")?
                    .execute(params![seq])?;
                let hint = self.ready_hint(seq)?;
                self.fx.ready.push(hint);
            }
        }
        Ok(row)
    }

    fn event(
        &self,
        task_seq: i64,
        attempt: u32,
        kind: &str,
        data: &serde_json::Value,
    ) -> Result<()> {
        self.insert_event(task_seq, attempt, None, kind, data)
    }

    fn insert_event(
        &self,
        task_seq: i64,
        attempt: u32,
        n: Option<u64>,
        kind: &str,
        data: &serde_json::Value,
    ) -> Result<()> {
        self.insert_event_text(task_seq, attempt, n, kind, &data.to_string())
    }

    fn insert_event_text(
        &self,
        task_seq: i64,
        attempt: u32,
        n: Option<u64>,
        kind: &str,
        data: &str,
    ) -> Result<()> {
        let seq: i64 = self
            .prep(
                "UPDATE tasks SET next_event_seq = next_event_seq + 1, event_bytes = event_bytes + ?2
                 WHERE seq = ?1 RETURNING next_event_seq - 1",
            )?
            .query_row(
                params![task_seq, model::event_size(kind, data) as i64],
                |r| r.get(0),
            )?;
        self.insert_event_at(task_seq, seq, attempt, n, kind, data)
    }

    /// Inserts event `seq` of a task whose counters (`next_event_seq`, `event_bytes`) the
    /// caller has already moved past it, in the statement that changed its state.
    fn insert_event_at(
        &self,
        task_seq: i64,
        seq: i64,
        attempt: u32,
        n: Option<u64>,
        kind: &str,
        data: &str,
    ) -> Result<()> {
        self.prep(
            "INSERT INTO task_events (task_seq, seq, attempt, n, kind, data, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            task_seq,
            seq,
            attempt,
            n.map(|n| n as i64),
            kind,
            data,
            self.now
        ])?;
        Ok(())
    }

    /// Which runner should be woken for a task that just became ready.
    fn ready_hint(&self, seq: i64) -> Result<ReadyHint> {
        let mut hint = ReadyHint {
            task_id: String::new(),
            agent: String::new(),
            project: None,
            runner: None,
        };
        let (mode, resume_id, bound_session, bound_runner): SessionColumns = self
            .prep(
                "SELECT t.id, t.agent, t.project, t.session_mode, t.resume_id, s.session_id, s.runner
                 FROM tasks t LEFT JOIN sessions s ON s.owner = t.conv_owner AND s.agent = t.agent
                    AND s.conversation = t.conversation
                 WHERE t.seq = ?1",
            )?
            .query_row(params![seq], |r| {
                hint.task_id = r.get(0)?;
                hint.agent = r.get(1)?;
                hint.project = r.get(2)?;
                Ok((r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
            })?;
        hint.runner = resolve_session(
            self.conn,
            &hint.agent,
            &mode,
            resume_id,
            bound_session,
            bound_runner,
        )?
        .1;
        Ok(hint)
    }

    /// Records the runner's claim; refused when its name belongs to another token.
    fn touch_runner(&self, req: &ClaimRequest, token: Option<&str>) -> Result<()> {
        let (agents, projects, agent_versions, acp_agents) = (
            to_json(&req.agents),
            to_json(&req.projects),
            to_json(&req.agent_versions),
            to_json(&req.acp_agents),
        );
        // Sent only when it changed; a claim without it keeps what the row has.
        let acp_capabilities = req.acp_capabilities.as_ref().map(to_json);
        // A runner re-polling with nothing changed, seen within the last second: its row stays
        // as it is (a claim per task would otherwise rewrite it, and a page of the log with it).
        let unchanged = self
            .prep(
                "SELECT 1 FROM runners WHERE name = ?1 AND agents = ?2 AND projects = ?3
                    AND capacity = ?4 AND version IS ?5 AND agent_versions = ?6
                    AND acp_agents = ?7 AND token IS ?8 AND left_at IS NULL AND last_seen >= ?9
                    AND ?10 IS NULL",
            )?
            .exists(params![
                req.runner,
                agents,
                projects,
                req.capacity,
                req.version,
                agent_versions,
                acp_agents,
                token,
                self.now - model::RUNNER_TOUCH_EVERY_MS,
                acp_capabilities
            ])?;
        if unchanged {
            return Ok(());
        }
        let n = self
            .prep(
                "INSERT INTO runners (name, agents, projects, capacity, version, agent_versions,
                    first_seen, last_seen, token, acp_agents, acp_capabilities)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9, ?10)
                 ON CONFLICT (name) DO UPDATE SET agents = excluded.agents,
                    projects = excluded.projects, capacity = excluded.capacity,
                    version = excluded.version, agent_versions = excluded.agent_versions,
                    last_seen = excluded.last_seen, left_at = NULL, acp_agents = excluded.acp_agents,
                    acp_capabilities = COALESCE(excluded.acp_capabilities, runners.acp_capabilities),
                    token = COALESCE(runners.token, excluded.token)
                 WHERE runners.token IS NULL OR excluded.token IS NULL
                    OR runners.token = excluded.token",
            )?
            .execute(params![
                req.runner,
                agents,
                projects,
                req.capacity,
                req.version,
                agent_versions,
                self.now,
                token,
                acp_agents,
                acp_capabilities
            ])?;
        if n == 0 {
            return Err(model::runner_name_taken(&req.runner));
        }
        Ok(())
    }

    /// Binds a conversation of a namespace (`conv_owner`: a client token's id, '' for the
    /// shared one of admin tokens). Only that namespace's binding of the name changes.
    fn set_binding(
        &self,
        agent: &str,
        conversation: &str,
        conv_owner: &str,
        session_id: Option<&str>,
        runner: Option<&str>,
    ) -> Result<()> {
        self.prep(
            "INSERT INTO sessions (owner, agent, conversation, session_id, runner, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (owner, agent, conversation) DO UPDATE SET
                    session_id = excluded.session_id, runner = excluded.runner,
                    updated_at = excluded.updated_at",
        )?
        .execute(params![
            conv_owner,
            agent,
            conversation,
            session_id,
            runner,
            self.now
        ])?;
        Ok(())
    }

    /// The namespace of the submitting token's conversations (its id when it is a client's,
    /// '' for an admin's), after checking that a client does not resume another client's
    /// session (its task would run in that agent session, with what it holds). A client's
    /// conversation names are its own: no other token's binding is looked at.
    fn check_session_owner(&self, owner: &str, req: &SubmitTask) -> Result<String> {
        let ns = conv_owner_of(self.conn, owner)?;
        if ns.is_empty() {
            return Ok(ns);
        }
        if let tunnel_protocol::SessionMode::Resume(id) = &req.session {
            let made_by: Option<String> = self
                .conn
                .query_row(
                    "SELECT owner FROM session_history WHERE agent = ?1 AND session_id = ?2",
                    params![req.agent, id],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            if made_by.is_some_and(|o| o != owner) {
                return Err(StoreError::NotFound("session"));
            }
        }
        Ok(ns)
    }

    /// The agent reported its native session id: remember it and bind the conversation.
    fn record_session(&self, t: &OpenTask, session_id: &str) -> Result<()> {
        self.prep(
                "INSERT INTO session_history (agent, session_id, runner, conversation, last_used, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5, (SELECT id FROM tokens WHERE id = ?6 AND role = 'client'))
                 ON CONFLICT (agent, session_id) DO UPDATE SET runner = excluded.runner,
                    conversation = COALESCE(excluded.conversation, conversation),
                    last_used = excluded.last_used, owner = COALESCE(owner, excluded.owner)",
            )?
            .execute(params![
                t.agent,
                session_id,
                t.runner,
                t.conversation,
                self.now,
                t.owner
            ])?;
        if let Some(conv) = &t.conversation {
            self.set_binding(
                &t.agent,
                conv,
                &t.conv_owner,
                Some(session_id),
                t.runner.as_deref(),
            )?;
        }
        Ok(())
    }
}

impl W<'_, '_> {
    /// Settles every pending request of the task's current attempt as cancelled (the task was
    /// cancelled, or the attempt ended): the agent is not waiting any more.
    fn settle_pending(&mut self, t: &OpenTask, why: &str) -> Result<()> {
        let ids = {
            let mut stmt = self.prep(
                "SELECT id FROM approvals WHERE task_seq = ?1 AND state = 'pending' ORDER BY id",
            )?;
            stmt.query_map(params![t.seq], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?
        };
        for id in ids {
            let a = load_approval(self.conn, &id)?.0;
            let outcome = model::cancelled_outcome(self.now, why);
            self.settle_approval(&a, ApprovalState::Cancelled, outcome)?;
        }
        Ok(())
    }

    /// Records how a pending request was settled: its row, an `approval` event, the edit of
    /// the question in chat. Wakes the runner's wait (the task changed).
    fn settle_approval(
        &mut self,
        a: &Approval,
        state: ApprovalState,
        outcome: ApprovalOutcome,
    ) -> Result<Approval> {
        self.prep(
            "UPDATE approvals SET state = ?2, outcome = ?3 WHERE id = ?1 AND state = 'pending'",
        )?
        .execute(params![a.id, state.as_str(), to_json(&outcome)])?;
        let (settled, _) = load_approval(self.conn, &a.id)?;
        let t = self.open_task(&a.task_id)?;
        self.event(
            t.seq,
            a.attempt,
            "approval",
            &model::approval_event(&settled),
        )?;
        self.fx.changed.push(t.id.clone());
        if let Some(target) = model::chat_target(&t).cloned() {
            // A progress edit waiting would hold the edit of the question behind it (one
            // destination, in order): send it now instead.
            self.prep(
                "UPDATE outbox SET next_at = MIN(next_at, ?2)
                     WHERE task_seq = ?1 AND kind = 'edit' AND state = 'pending'",
            )?
            .execute(params![t.seq, self.now])?;
            let asked: bool = self
                .prep(
                    "SELECT 1 FROM outbox WHERE task_seq = ?1 AND kind = 'approval' AND body = ?2",
                )?
                .exists(params![t.seq, model::approval_body(&a.id).to_string()])?;
            if asked {
                let body = model::approval_body(&a.id);
                self.enqueue(Some(t.seq), "approval_edit", &target, Some(&body), 0)?;
            }
            if !t.state.is_terminal() {
                self.deliver_progress(&t)?;
            }
        }
        Ok(settled)
    }

    /// A new request: post the question to the task's chat, and show it in the progress
    /// message.
    fn deliver_question(&mut self, t: &OpenTask, id: &str) -> Result<()> {
        if let Some(target) = model::chat_target(t).cloned() {
            let body = model::approval_body(id);
            self.enqueue(Some(t.seq), "approval", &target, Some(&body), 0)?;
            self.deliver_progress(t)?;
        }
        Ok(())
    }
}

/// A task's session mode, resume id, and its conversation's bound session and runner.
type SessionColumns = (String, Option<String>, Option<String>, Option<String>);

impl W<'_, '_> {
    fn enqueue(
        &mut self,
        task_seq: Option<i64>,
        kind: &str,
        target: &ReplyTo,
        body: Option<&serde_json::Value>,
        delay_ms: i64,
    ) -> Result<i64> {
        self.prep(
            "INSERT INTO outbox (task_seq, destination, kind, target, body, state, next_at,
                    created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7, ?7)",
        )?
        .execute(params![
            task_seq,
            destination(target),
            kind,
            to_json(target),
            body.map(|b| b.to_string()),
            self.now + delay_ms,
            self.now
        ])?;
        self.fx.delivery = true;
        Ok(self.conn.last_insert_rowid())
    }

    /// The agent is working: post the "working…" message.
    fn deliver_started(&mut self, t: &OpenTask) -> Result<()> {
        if let Some(target) = model::chat_target(t).cloned() {
            let posted: bool = self
                .prep("SELECT 1 FROM outbox WHERE task_seq = ?1 AND kind = 'progress'")?
                .exists(params![t.seq])?;
            if !posted {
                self.enqueue(Some(t.seq), "progress", &target, None, 0)?;
            } else {
                // The acknowledgement turns into "working…" at once.
                self.deliver_progress_in(t, 0)?;
            }
        }
        Ok(())
    }

    /// New output: edit the "working…" message, coalescing everything within EDIT_EVERY_MS.
    fn deliver_progress(&mut self, t: &OpenTask) -> Result<()> {
        self.deliver_progress_in(t, EDIT_EVERY_MS)
    }

    /// An edit of the progress message due in `delay_ms`, unless one is pending already.
    fn deliver_progress_in(&mut self, t: &OpenTask, delay_ms: i64) -> Result<()> {
        if let Some(target) = model::chat_target(t).cloned() {
            let pending: bool = self
                .prep(
                    "SELECT 1 FROM outbox WHERE task_seq = ?1 AND kind = 'edit' AND state = 'pending'",
                )?
                .exists(params![t.seq])?;
            if !pending {
                self.enqueue(Some(t.seq), "edit", &target, None, delay_ms)?;
            }
        }
        Ok(())
    }

    /// The task ended: the final answer (or the webhook call); progress edits still waiting are
    /// no longer worth sending.
    fn deliver_final(&mut self, t: &OpenTask) -> Result<()> {
        let Some(target) = t.reply_to.clone() else {
            return Ok(());
        };
        self.prep(
            "UPDATE outbox SET state = 'skipped', updated_at = ?2
                 WHERE task_seq = ?1 AND kind = 'edit' AND state = 'pending'",
        )?
        .execute(params![t.seq, self.now])?;
        // The "working…" message ends in the outcome before the answer is posted (one
        // destination goes in order), so no chat keeps a stale "working…".
        let working: bool = self
            .prep("SELECT 1 FROM outbox WHERE task_seq = ?1 AND kind = 'progress'")?
            .exists(params![t.seq])?;
        if working && let Some(chat) = model::chat_target(t).cloned() {
            self.enqueue(Some(t.seq), "edit", &chat, None, 0)?;
        }
        self.enqueue(Some(t.seq), model::final_kind(&target), &target, None, 0)?;
        Ok(())
    }
}

/// Events from rows selected as `seq, attempt, kind, data, at`, up to the one that fills
/// [`crate::EVENT_PAGE_BYTES`] (the stored text's length, as counted against the task's cap).
fn event_page(mut rows: rusqlite::Rows<'_>) -> Result<Vec<TaskEvent>> {
    let mut events = Vec::new();
    let mut bytes = 0;
    while let Some(r) = rows.next()? {
        let e = event_from_row(r)?;
        let data: rusqlite::types::ValueRef<'_> = r.get_ref(3)?;
        bytes += e.kind.len() + data.as_bytes().map_or(0, <[u8]>::len);
        events.push(e);
        if bytes >= crate::EVENT_PAGE_BYTES {
            break;
        }
    }
    Ok(events)
}

/// The session a task resumes and the runner it must run on ("home"), from its session mode
/// and its conversation's binding.
fn resolve_session(
    conn: &Connection,
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
                let home = history_runner(conn, agent, &id)?;
                (Some(id), home)
            }
        },
    )
}

/// The conversation namespace of a token: its id when it is a client token, '' (shared by
/// admin tokens) otherwise.
fn conv_owner_of(conn: &Connection, token: &str) -> Result<String> {
    let client = conn
        .prepare_cached("SELECT 1 FROM tokens WHERE id = ?1 AND role = 'client'")?
        .exists(params![token])?;
    Ok(if client {
        token.to_owned()
    } else {
        String::new()
    })
}

fn history_runner(conn: &Connection, agent: &str, session_id: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT runner FROM session_history WHERE agent = ?1 AND session_id = ?2")?
        .query_row(params![agent, session_id], |r| {
            r.get::<_, Option<String>>(0)
        })
        .optional()?
        .flatten())
}

// ---------------------------------------------------------------------------------------------
// Reading tasks

/// Columns in [`TASK_COLUMNS`]: what a statement returns after them starts here.
const TASK_COLUMNS_LEN: usize = model::column_count(TASK_COLUMNS);
/// Columns in [`OPEN_TASK_COLUMNS`].
const OPEN_TASK_LEN: usize = model::column_count(OPEN_TASK_COLUMNS);

/// A row of [`TASK_COLUMNS`] and its owner, for [`complete_task`].
type TaskRow = ((i64, Option<String>, Task), String);

fn task_row(r: &Row<'_>) -> rusqlite::Result<Result<TaskRow>> {
    Ok(task_from_row(r).and_then(|t| Ok((t, r.text(TASK_OWNER)?))))
}

fn load_task(c: &Connection, id: &str, scope: &Scope) -> Result<Task> {
    let row = c
        .prepare_cached(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE id = ?1"
        ))?
        .query_row(params![id], task_row)
        .optional()?;
    complete_task(c, row.ok_or(StoreError::NotFound("task"))??, scope)
}

/// A task row made whole: its queue position, delivery and pending approval.
fn complete_task(
    c: &Connection,
    ((seq, session_key, mut task), owner): TaskRow,
    scope: &Scope,
) -> Result<Task> {
    model::check_owner(scope, &owner)?;
    task.queue_position = queue_position(c, seq, session_key.as_deref(), &task)?;
    // Every outbox row of a task goes to its `reply_to` (set at submit, never changed): without
    // one there is nothing to look up.
    if task.reply_to.is_some() {
        task.delivery = delivery_status(c, seq)?;
    }
    task.waiting_for_approval = waiting_for_approval(c, seq, &task)?;
    Ok(task)
}

/// The oldest pending approval request of a running task.
fn waiting_for_approval(c: &Connection, seq: i64, t: &Task) -> Result<Option<String>> {
    if !matches!(t.state, TaskState::Running | TaskState::Cancelling) {
        return Ok(None);
    }
    Ok(c.prepare_cached(
        "SELECT id FROM approvals WHERE task_seq = ?1 AND state = 'pending' ORDER BY id LIMIT 1",
    )?
    .query_row(params![seq], |r| r.get(0))
    .optional()?)
}

/// An approval request and its owner token.
fn load_approval(c: &Connection, id: &str) -> Result<(Approval, String)> {
    c.prepare_cached(&format!(
        "SELECT {APPROVAL_COLUMNS} FROM approvals a JOIN tasks t ON t.seq = a.task_seq
         WHERE a.id = ?1"
    ))?
    .query_row(params![id], |r| {
        Ok(model::approval_from_row(r).and_then(|a| Ok((a, r.text(APPROVAL_OWNER)?))))
    })
    .optional()?
    .ok_or(StoreError::NotFound("approval"))?
}

/// Where the task's answer is: the latest final/webhook delivery, else the progress message.
fn delivery_status(c: &Connection, seq: i64) -> Result<Option<tunnel_protocol::DeliveryStatus>> {
    c.prepare_cached(
        "SELECT kind, state, attempts, last_error FROM outbox
         WHERE task_seq = ?1 AND kind IN ('final', 'webhook', 'progress')
         ORDER BY kind = 'progress', id DESC LIMIT 1",
    )?
    .query_row(params![seq], |r| Ok(delivery_status_from_row(r)))
    .optional()?
    .transpose()
}

fn load_task_by_seq(c: &Connection, seq: i64) -> Result<Task> {
    // One read of the row by its key (not its id, then the row by id).
    let row = c
        .prepare_cached(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE seq = ?1"
        ))?
        .query_row(params![seq], task_row)?;
    complete_task(c, row?, &Scope::All)
}

/// Tasks ahead of a queued one: in its session if it has one, else ready tasks of its agent.
fn queue_position(
    c: &Connection,
    seq: i64,
    session_key: Option<&str>,
    t: &Task,
) -> Result<Option<u32>> {
    if !model::waits_in_queue(t.state) {
        return Ok(None);
    }
    let n: i64 = match session_key {
        Some(k) => c
            .prepare_cached(
                "SELECT COUNT(*) FROM tasks WHERE session_key = ?1 AND finished_at IS NULL AND seq < ?2",
            )?
            .query_row(params![k, seq], |r| r.get(0))?,
        None => c
            // Capped: with a deep backlog the exact figure is not worth a long scan per submit.
            .prepare_cached(
                "SELECT COUNT(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_ready_agent
                    WHERE ready = 1 AND agent = ?2 AND seq < ?1 LIMIT 1000)",
            )?
            .query_row(params![seq, t.agent], |r| r.get(0))?,
    };
    Ok(Some(n as u32))
}

impl Columns for Row<'_> {
    fn text(&self, i: usize) -> Result<String> {
        Ok(self.get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64> {
        Ok(self.get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        Ok(self.get(i)?)
    }
    fn uint(&self, i: usize) -> Result<u32> {
        Ok(self.get(i)?)
    }
    fn flag(&self, i: usize) -> Result<bool> {
        Ok(self.get(i)?)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>> {
        Ok(self.get(i)?)
    }
}

/// Every row of a query, mapped by one of the shared row mappings.
fn all<T>(mut rows: rusqlite::Rows<'_>, f: impl Fn(&Row<'_>) -> Result<T>) -> Result<Vec<T>> {
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(f(r)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::ManualClock;

    struct Quiet;

    impl Signals for Quiet {
        fn task_ready(&self, _: &ReadyHint) {}
        fn task_changed(&self, _: &str) {}
        fn deadline(&self, _: i64) {}
        fn delivery_ready(&self) {}
    }

    type Runs = Arc<AtomicUsize>;
    type TestWrite<T> = Box<dyn FnMut(&mut W<'_, '_>) -> Result<T> + Send>;

    async fn store() -> (Arc<SqliteStore>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &dir.path().join("t.db"),
            Durability::Normal,
            QueueSettings::default(),
            Arc::new(ManualClock::new(1_000_000)),
            Arc::new(Quiet),
        )
        .await
        .unwrap();
        store
            .write(|w| {
                Ok(w.conn
                    .execute_batch("CREATE TABLE scratch (n INTEGER PRIMARY KEY)")?)
            })
            .await
            .unwrap();
        (Arc::new(store), dir)
    }

    fn insert(w: &W<'_, '_>, n: i64) -> Result<()> {
        w.conn.execute("INSERT INTO scratch (n) VALUES (?1)", [n])?;
        Ok(())
    }

    fn rows(w: &W<'_, '_>) -> Result<Vec<i64>> {
        let mut st = w.conn.prepare("SELECT n FROM scratch ORDER BY n")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Queues the writes `make` starts behind one that holds the writer until they are all
    /// queued, so they run as one batch in that order; returns their answers.
    async fn one_batch<T: Send + 'static>(
        store: &Arc<SqliteStore>,
        writes: Vec<TestWrite<T>>,
    ) -> Vec<Result<T>> {
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let gate = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(move |_| {
                        // Only the first run waits (the sender is gone by a second).
                        let _ = wait.recv();
                        Ok(())
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        let handles: Vec<_> = writes
            .into_iter()
            .map(|f| {
                let store = store.clone();
                tokio::spawn(async move { store.write(f).await })
            })
            .collect();
        // The current-thread runtime runs each spawned write up to its send, in order.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        go.send(()).unwrap();
        drop(go);
        gate.await.unwrap().unwrap();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }

    fn counted<T>(
        runs: &Runs,
        mut f: impl FnMut(&mut W<'_, '_>) -> Result<T> + Send + 'static,
    ) -> TestWrite<T> {
        let runs = runs.clone();
        Box::new(move |w| {
            runs.fetch_add(1, Ordering::SeqCst);
            f(w)
        })
    }

    #[tokio::test]
    async fn a_failing_write_in_a_batch_fails_alone_and_the_others_commit() {
        let (store, _dir) = store().await;
        let runs: Vec<Runs> = (0..4).map(|_| Runs::default()).collect();
        let answers = one_batch(
            &store,
            vec![
                counted(&runs[0], |w| {
                    insert(w, 1)?;
                    rows(w)
                }),
                // Writes a row, then fails with a database error: both undone.
                counted(&runs[1], |w| {
                    insert(w, 2)?;
                    insert(w, 1)?;
                    rows(w)
                }),
                // Runs after it as if it had never run.
                counted(&runs[2], |w| {
                    insert(w, 3)?;
                    rows(w)
                }),
                // A refusal keeps what it did before refusing.
                counted(&runs[3], |w| {
                    insert(w, 4)?;
                    Err(StoreError::Conflict("refused".into()))
                }),
            ],
        )
        .await;
        assert_eq!(answers[0].as_ref().unwrap(), &[1]);
        assert!(
            matches!(answers[1], Err(StoreError::Database(_))),
            "{:?}",
            answers[1]
        );
        assert_eq!(answers[2].as_ref().unwrap(), &[1, 3]);
        assert!(matches!(answers[3], Err(StoreError::Conflict(_))));
        // The batch ran again from its start, without the failing write (the writes after it
        // ran only then).
        let runs: Vec<_> = runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
        assert_eq!(runs, [2, 1, 1, 1]);
        let committed = store.write(|w| rows(w)).await.unwrap();
        assert_eq!(committed, [1, 3, 4]);
    }

    #[tokio::test]
    async fn a_write_failing_before_it_changed_anything_fails_alone_without_a_second_run() {
        let (store, _dir) = store().await;
        let runs: Vec<Runs> = (0..3).map(|_| Runs::default()).collect();
        let answers = one_batch(
            &store,
            vec![
                counted(&runs[0], |w| insert(w, 1)),
                counted(&runs[1], |_| Err(model::queue_full(1))),
                counted(&runs[2], |w| insert(w, 2)),
            ],
        )
        .await;
        assert!(answers[0].is_ok() && answers[2].is_ok());
        assert!(matches!(answers[1], Err(StoreError::QueueFull(_))));
        let runs: Vec<_> = runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
        assert_eq!(runs, [1, 1, 1]);
        assert_eq!(store.write(|w| rows(w)).await.unwrap(), [1, 2]);
    }
}
