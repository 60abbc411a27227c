//! What both backends share: how a row becomes a [`Task`], an event or a session, and the
//! task model's decisions. Each decision takes what a backend read (under its lock) and the
//! time, and says what to do; the backend applies it with its own SQL. The SQL stays in the
//! backends; only dialect-free column lists live here, next to the mappings that read them.

use tunnel_protocol::{
    RecentSession, ReplyTo, SessionBinding, SessionMode, Task, TaskEvent, TaskState,
};

use crate::Result;

/// A result row, read by column index. Each backend implements it for its own row type with
/// its own integer widths (PostgreSQL stores counts as BIGINT).
pub(crate) trait Columns {
    fn text(&self, i: usize) -> Result<String>;
    fn opt_text(&self, i: usize) -> Result<Option<String>>;
    fn int(&self, i: usize) -> Result<i64>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>>;
    fn uint(&self, i: usize) -> Result<u32>;
    fn flag(&self, i: usize) -> Result<bool>;
}

// ---------------------------------------------------------------------------------------------
// Row mappings

/// The columns [`task_from_row`] reads, in its order.
pub(crate) const TASK_COLUMNS: &str =
    "seq, session_key, id, agent, prompt, conversation, project, model,
    timeout_ms, session_mode, resume_id, max_attempts, reply_to, state, attempt, runner,
    cancel_requested, not_before, ack_by, lease_until, reason, result, created_at, updated_at,
    started_at, finished_at, owner, meta";

/// Index of `owner` in [`TASK_COLUMNS`].
pub(crate) const TASK_OWNER: usize = 26;

/// A row of [`TASK_COLUMNS`]: its seq, its session key and the task (without its queue
/// position and delivery, which take more queries).
pub(crate) fn task_from_row(r: &impl Columns) -> Result<(i64, Option<String>, Task)> {
    let state = r.text(13)?;
    let mode = r.text(9)?;
    let resume_id = r.opt_text(10)?;
    let session = match mode.as_str() {
        "new" => SessionMode::New,
        "resume" => SessionMode::Resume(resume_id.unwrap_or_default()),
        _ => SessionMode::Continue,
    };
    let task = Task {
        id: r.text(2)?,
        agent: r.text(3)?,
        prompt: r.text(4)?,
        conversation: r.opt_text(5)?,
        project: r.opt_text(6)?,
        model: r.opt_text(7)?,
        timeout_ms: r.opt_int(8)?.map(|t| t as u64),
        session,
        max_attempts: r.uint(11)?,
        reply_to: r
            .opt_text(12)?
            .and_then(|s| serde_json::from_str::<ReplyTo>(&s).ok()),
        meta: r.opt_text(27)?.and_then(|s| serde_json::from_str(&s).ok()),
        state: TaskState::parse(&state).unwrap_or(TaskState::Failed),
        attempt: r.uint(14)?,
        runner: r.opt_text(15)?,
        cancel_requested: r.flag(16)?,
        not_before: r.opt_int(17)?,
        ack_by: r.opt_int(18)?,
        lease_until: r.opt_int(19)?,
        reason: r.opt_text(20)?,
        result: r.opt_text(21)?.and_then(|s| serde_json::from_str(&s).ok()),
        queue_position: None,
        delivery: None,
        created_at: r.int(22)?,
        updated_at: r.int(23)?,
        started_at: r.opt_int(24)?,
        finished_at: r.opt_int(25)?,
    };
    Ok((r.int(0)?, r.opt_text(1)?, task))
}

/// A `task_events` row selected as `seq, attempt, kind, data, at`.
pub(crate) fn event_from_row(r: &impl Columns) -> Result<TaskEvent> {
    let data = r.text(3)?;
    Ok(TaskEvent {
        seq: r.int(0)? as u64,
        attempt: r.uint(1)?,
        kind: r.text(2)?,
        data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
        at: r.int(4)?,
    })
}

/// A `sessions` row selected as `conversation, agent, session_id, runner, updated_at`.
pub(crate) fn binding_from_row(r: &impl Columns) -> Result<SessionBinding> {
    Ok(SessionBinding {
        conversation: r.text(0)?,
        agent: r.text(1)?,
        session_id: r.opt_text(2)?,
        runner: r.opt_text(3)?,
        updated_at: r.int(4)?,
    })
}

/// A `session_history` row selected as `agent, session_id, runner, conversation, last_used`.
pub(crate) fn recent_from_row(r: &impl Columns) -> Result<RecentSession> {
    Ok(RecentSession {
        agent: r.text(0)?,
        session_id: r.text(1)?,
        runner: r.opt_text(2)?,
        conversation: r.opt_text(3)?,
        last_used: r.int(4)?,
    })
}

/// The columns of a task a write needs to decide a transition.
pub(crate) struct OpenTask {
    pub seq: i64,
    pub id: String,
    pub agent: String,
    pub conversation: Option<String>,
    pub session_key: Option<String>,
    pub owner: String,
    pub state: TaskState,
    pub attempt: u32,
    pub runs: u32,
    pub max_attempts: u32,
    pub lease_token: Option<String>,
    pub runner: Option<String>,
    pub ack_by: Option<i64>,
    pub lease_until: Option<i64>,
    pub not_before: Option<i64>,
    pub reply_to: Option<ReplyTo>,
}

/// The columns [`open_task_from_row`] reads, in its order.
pub(crate) const OPEN_TASK_COLUMNS: &str =
    "seq, id, agent, conversation, session_key, owner, state, attempt,
    runs, max_attempts, lease_token, runner, ack_by, lease_until, reply_to, not_before";

pub(crate) fn open_task_from_row(r: &impl Columns) -> Result<OpenTask> {
    let state = r.text(6)?;
    Ok(OpenTask {
        seq: r.int(0)?,
        id: r.text(1)?,
        agent: r.text(2)?,
        conversation: r.opt_text(3)?,
        session_key: r.opt_text(4)?,
        owner: r.text(5)?,
        state: TaskState::parse(&state).unwrap_or(TaskState::Failed),
        attempt: r.uint(7)?,
        runs: r.uint(8)?,
        max_attempts: r.uint(9)?,
        lease_token: r.opt_text(10)?,
        runner: r.opt_text(11)?,
        ack_by: r.opt_int(12)?,
        lease_until: r.opt_int(13)?,
        reply_to: r.opt_text(14)?.and_then(|s| serde_json::from_str(&s).ok()),
        not_before: r.opt_int(15)?,
    })
}
