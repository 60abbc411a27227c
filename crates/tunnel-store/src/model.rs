//! What both backends share: how a row becomes a [`Task`], an event or a session, and the
//! task model's decisions. Each decision takes what a backend read (under its lock) and the
//! time, and says what to do; the backend applies it with its own SQL. The SQL stays in the
//! backends; only dialect-free column lists live here, next to the mappings that read them.

use tunnel_protocol::{
    AcpCapabilities, Approval, ApprovalAnswer, ApprovalOption, ApprovalOutcome, ApprovalPolicy,
    ApprovalState, ApprovalTool, AttemptRef, DeliveryStatus, LeaseStatus, NewEvent, Outcome,
    Platform, RecentSession, ReplyTo, Role, RunnerInfo, SessionBinding, SessionMode, Task,
    TaskEvent, TaskResult, TaskState, TokenInfo,
};

use crate::{Delivery, DeliveryKind, DeliveryUpdate, Result, Scope, StoreError, StoredToken};

/// A result row, read by column index. Each backend implements it for its own row type with
/// its own integer widths (PostgreSQL stores counts as BIGINT).
pub(crate) trait Columns {
    fn text(&self, i: usize) -> Result<String>;
    fn opt_text(&self, i: usize) -> Result<Option<String>>;
    fn int(&self, i: usize) -> Result<i64>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>>;
    fn uint(&self, i: usize) -> Result<u32>;
    fn flag(&self, i: usize) -> Result<bool>;
    fn bytes(&self, i: usize) -> Result<Vec<u8>>;
}

// ---------------------------------------------------------------------------------------------
// Row mappings

/// [`TASK_COLUMNS`] as a literal, for `concat!`: the writer's statements are then constant
/// strings, not formatted anew for every use.
macro_rules! task_columns {
    () => {
        "seq, session_key, id, agent, prompt, conversation, project, model,
    timeout_ms, session_mode, resume_id, max_attempts, reply_to, state, attempt, runner,
    cancel_requested, not_before, ack_by, lease_until, reason, result, created_at, updated_at,
    started_at, finished_at, owner, meta, approvals"
    };
}
pub(crate) use task_columns;

/// [`OPEN_TASK_COLUMNS`] as a literal, for `concat!`.
macro_rules! open_task_columns {
    () => {
        "seq, id, agent, conversation, session_key, owner, state, attempt,
    runs, max_attempts, lease_token, runner, ack_by, lease_until, reply_to, not_before,
    conv_owner, unconfirmed, offer_resume"
    };
}
pub(crate) use open_task_columns;

/// The columns [`task_from_row`] reads, in its order.
pub(crate) const TASK_COLUMNS: &str = task_columns!();

/// How many columns a comma-separated list names, so a statement that selects more after a
/// list knows where they start without a count kept by hand beside it.
pub(crate) const fn column_count(list: &str) -> usize {
    let b = list.as_bytes();
    let (mut i, mut n) = (0, 1);
    while i < b.len() {
        if b[i] == b',' {
            n += 1;
        }
        i += 1;
    }
    n
}

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
        approvals: r.opt_text(28)?.as_deref().and_then(parse_policy),
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
        waiting_for_approval: None,
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

/// The columns [`binding_from_row`] reads from `sessions`, in its order.
pub(crate) const BINDING_COLUMNS: &str =
    "conversation, agent, session_id, runner, updated_at, owner";

/// A `sessions` row of [`BINDING_COLUMNS`], as `caller` (the caller's own namespace: a client
/// token's id, '' for an admin) sees it: `owner` is shown only for another namespace.
pub(crate) fn binding_from_row(r: &impl Columns, caller: &str) -> Result<SessionBinding> {
    let owner = r.text(5)?;
    Ok(SessionBinding {
        conversation: r.text(0)?,
        agent: r.text(1)?,
        session_id: r.opt_text(2)?,
        runner: r.opt_text(3)?,
        updated_at: r.int(4)?,
        owner: (owner != caller && !owner.is_empty()).then_some(owner),
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

/// A `runners` row selected as `name, agents, projects, capacity, version, first_seen,
/// last_seen, agent_versions, <active task count>, left_at, acp_agents, acp_capabilities`, as
/// seen at `now`. Capabilities of an agent the runner no longer drives over ACP are not shown.
/// Online: seen within `online_ms` and not seen off (a goodbye counts until the runner is seen
/// after it).
pub(crate) fn runner_from_row(r: &impl Columns, now: i64, online_ms: i64) -> Result<RunnerInfo> {
    let last_seen = r.int(6)?;
    let left = r.opt_int(9)?.is_some_and(|l| l >= last_seen);
    let acp_agents: Vec<String> = serde_json::from_str(&r.text(10)?).unwrap_or_default();
    let mut acp_capabilities: std::collections::BTreeMap<String, AcpCapabilities> = r
        .opt_text(11)?
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    acp_capabilities.retain(|agent, _| acp_agents.contains(agent));
    Ok(RunnerInfo {
        agent_versions: serde_json::from_str(&r.text(7)?).unwrap_or_default(),
        name: r.text(0)?,
        agents: serde_json::from_str(&r.text(1)?).unwrap_or_default(),
        projects: serde_json::from_str(&r.text(2)?).unwrap_or_default(),
        capacity: r.uint(3)?,
        version: r.opt_text(4)?,
        first_seen: r.int(5)?,
        last_seen,
        online: now - last_seen <= online_ms && !left,
        active_tasks: r.uint(8)?,
        acp_agents,
        acp_capabilities,
    })
}

/// A `tokens` row selected as `id, name, role, secret_sha256, created_at, revoked_at`.
pub(crate) fn token_from_row(r: &impl Columns) -> Result<StoredToken> {
    let id = r.text(0)?;
    let role = r.text(2)?;
    let role = Role::parse(&role)
        .ok_or_else(|| StoreError::Corrupt(format!("token {id} has role {role:?}")))?;
    let secret_sha256: [u8; 32] = r
        .bytes(3)?
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("token {id} has a bad hash")))?;
    Ok(StoredToken {
        info: TokenInfo {
            name: r.text(1)?,
            role,
            created_at: r.int(4)?,
            revoked_at: r.opt_int(5)?,
            id,
        },
        secret_sha256,
    })
}

/// An `outbox` row selected as `kind, state, attempts, last_error`: where the task's answer is.
pub(crate) fn delivery_status_from_row(r: &impl Columns) -> Result<DeliveryStatus> {
    let kind = r.text(0)?;
    let state = r.text(1)?;
    let attempts = r.uint(2)?;
    let error = r.opt_text(3)?;
    Ok(DeliveryStatus {
        state: match (kind.as_str(), state.as_str(), attempts) {
            ("progress", "sent", _) => "working_message_sent".into(),
            // A rate-limit wait counts no attempt but leaves its reason.
            (_, "pending", 0) if error.is_none() => "pending".into(),
            (_, "pending", _) => "retrying".into(),
            (_, s, _) => s.to_owned(),
        },
        attempts,
        error,
    })
}

/// An outbox row selected as `id, kind, target, body, attempts, done_parts, <task id>,
/// <progress message id>`: the delivery, its task still to be loaded (by the returned id).
pub(crate) fn delivery_from_row(r: &impl Columns) -> Result<(Delivery, Option<String>)> {
    let id = r.int(0)?;
    let kind = r.text(1)?;
    let kind = DeliveryKind::parse(&kind)
        .ok_or_else(|| StoreError::Corrupt(format!("outbox {id} has kind {kind:?}")))?;
    let target: ReplyTo = serde_json::from_str(&r.text(2)?)
        .map_err(|e| StoreError::Corrupt(format!("outbox {id} target: {e}")))?;
    let delivery = Delivery {
        id,
        kind,
        target,
        body: r.opt_text(3)?.and_then(|b| serde_json::from_str(&b).ok()),
        attempts: r.uint(4)?,
        done_parts: r.uint(5)?,
        task: None,
        progress_message: r.opt_text(7)?,
        approval: None,
        approval_message: None,
    };
    Ok((delivery, r.opt_text(6)?))
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
    /// The namespace of its conversation: its owner when a client's, '' (shared) when an
    /// admin's.
    pub conv_owner: String,
    /// Offered by a claim with `ack`, and its runner has not yet shown it has the offer.
    pub unconfirmed: bool,
    /// The session that offer resumes (kept to offer it again).
    pub offer_resume: Option<String>,
}

/// The columns [`open_task_from_row`] reads, in its order.
pub(crate) const OPEN_TASK_COLUMNS: &str = open_task_columns!();

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
        conv_owner: r.text(16)?,
        unconfirmed: r.flag(17)?,
        offer_resume: r.opt_text(18)?,
    })
}

// ---------------------------------------------------------------------------------------------
// Decisions

/// A task outside the caller's scope is answered as if it did not exist.
pub(crate) fn check_owner(scope: &Scope, owner: &str) -> Result<()> {
    match scope {
        Scope::Owner(o) if o != owner => Err(StoreError::NotFound("task")),
        _ => Ok(()),
    }
}

/// Fencing: only the current attempt, with its lease token, may act.
pub(crate) fn check_attempt(t: &OpenTask, attempt: u32, lease_token: &str) -> Result<()> {
    let at = AttemptRef {
        attempt,
        lease_token: lease_token.to_owned(),
    };
    crate::fence(&t.id, t.state, t.attempt, t.lease_token.as_deref(), &at)
}

/// What a cancel does to a task.
pub(crate) enum Cancel {
    /// It has not started: it ends now, cancelled with [`CANCELLED_BEFORE_RUN`].
    Now,
    /// It is running: it goes to `cancelling` and its runner learns it on the next heartbeat.
    Request,
    /// Cancel was already asked: nothing to do.
    AlreadyRequested,
}

pub(crate) const CANCELLED_BEFORE_RUN: &str = "cancelled before it ran";

/// The reason of a task that waited in the queue longer than the maximum: it ends
/// `timed_out` (the existing terminal state for "ran out of time"), and this says it never ran.
pub(crate) fn queue_expired_reason(max_queue_ms: i64) -> String {
    format!(
        "no runner took it within the maximum time in queue ({})",
        human_duration(max_queue_ms)
    )
}

fn human_duration(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{} d", s / 86_400),
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// A claim under a runner name another runner token registered first.
pub(crate) fn runner_name_taken(name: &str) -> StoreError {
    StoreError::Conflict(format!(
        "runner name {name:?} belongs to another runner token: pick another name (each runner \
         token owns the names it registered first)"
    ))
}

/// The refusal of a submit beyond the per-token cap on waiting tasks (HTTP 429).
pub(crate) fn queue_full(cap: u32) -> StoreError {
    StoreError::QueueFull(format!(
        "this token already has {cap} tasks waiting in the queue (the per-token cap, \
         max_queued_per_token); wait for some to start or cancel some, then submit again"
    ))
}

pub(crate) fn cancel(t: &OpenTask, scope: &Scope) -> Result<Cancel> {
    check_owner(scope, &t.owner)?;
    match t.state {
        TaskState::Queued | TaskState::Parked | TaskState::Offered => Ok(Cancel::Now),
        TaskState::Running => Ok(Cancel::Request),
        TaskState::Cancelling => Ok(Cancel::AlreadyRequested),
        s => Err(StoreError::Conflict(format!(
            "task has already ended ({s})"
        ))),
    }
}

/// What an ack of the (fenced) current attempt does.
pub(crate) enum Ack {
    /// Start the attempt, leased until then.
    Start { lease_until: i64 },
    /// A retried ack of the same attempt: answer as the first one did.
    Again(LeaseStatus),
    /// The offer ran out before the ack: queue the task again, then refuse with this error.
    Expired(StoreError),
}

pub(crate) fn ack(t: &OpenTask, at: &AttemptRef, now: i64, lease_ms: i64) -> Result<Ack> {
    match t.state {
        TaskState::Offered => {}
        TaskState::Running | TaskState::Cancelling => {
            return Ok(Ack::Again(LeaseStatus {
                lease_ms,
                lease_until: t.lease_until.unwrap_or(now),
                cancel: t.state == TaskState::Cancelling,
            }));
        }
        s => {
            return Err(StoreError::Stale(format!(
                "attempt {} can no longer start: task is {s}",
                at.attempt
            )));
        }
    }
    if t.ack_by.is_some_and(|d| d < now) {
        return Ok(Ack::Expired(StoreError::Stale(format!(
            "offer of attempt {} expired before it was acked",
            at.attempt
        ))));
    }
    Ok(Ack::Start {
        lease_until: now + lease_ms,
    })
}

/// What a claim with `ack` does with an attempt offered to its runner by an earlier claim with
/// `ack` that the runner has not confirmed (it made no call about it since: the answer that
/// brought it may have been lost, with the connection or with the server that sent it).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unconfirmed {
    /// Offer it again, as it is now: still to be acked (`None`), or running under this lease.
    Again(Option<LeaseStatus>),
    /// Never again: the claim lists it in `holding` (the runner has it), or it is not this
    /// runner's attempt to have again (ended, another's, or past its deadline, which the
    /// deadline timer settles). Clear its mark.
    Clear,
}

pub(crate) fn unconfirmed(
    t: &OpenTask,
    runner: &str,
    holding: &[String],
    now: i64,
    lease_ms: i64,
) -> Unconfirmed {
    if !t.unconfirmed
        || t.runner.as_deref() != Some(runner)
        || t.lease_token.is_none()
        || holding.iter().any(|h| h == &t.id)
    {
        return Unconfirmed::Clear;
    }
    match t.state {
        TaskState::Offered if t.ack_by.is_none_or(|d| d >= now) => Unconfirmed::Again(None),
        TaskState::Running | TaskState::Cancelling if t.lease_until.is_some_and(|l| l >= now) => {
            Unconfirmed::Again(Some(LeaseStatus {
                lease_until: t.lease_until.unwrap_or(now),
                lease_ms,
                cancel: t.state == TaskState::Cancelling,
            }))
        }
        _ => Unconfirmed::Clear,
    }
}

/// Whether a running attempt's lease still holds.
pub(crate) enum Lease {
    Live,
    /// It ran out: end the attempt now (as the deadline timer would), then refuse with this.
    Expired(StoreError),
}

pub(crate) fn check_lease(t: &OpenTask, now: i64) -> Result<Lease> {
    match t.state {
        TaskState::Running | TaskState::Cancelling => {}
        s => {
            return Err(StoreError::Stale(format!(
                "attempt {} is not running: task is {s}",
                t.attempt
            )));
        }
    }
    if t.lease_until.is_some_and(|l| l < now) {
        return Ok(Lease::Expired(StoreError::Stale(format!(
            "the lease of attempt {} expired before this call",
            t.attempt
        ))));
    }
    Ok(Lease::Live)
}

/// The lease after a heartbeat or events. Never shortens a lease: one granted longer at ack
/// (a runner that cannot heartbeat) keeps its length.
pub(crate) fn renewed_lease(t: &OpenTask, now: i64, lease_ms: i64) -> i64 {
    (now + lease_ms).max(t.lease_until.unwrap_or(0))
}

/// What a heartbeat answers once the lease is renewed.
pub(crate) fn heartbeat_status(t: &OpenTask, lease_until: i64, lease_ms: i64) -> LeaseStatus {
    LeaseStatus {
        lease_until,
        lease_ms,
        cancel: t.state == TaskState::Cancelling,
    }
}

/// Whether appended events renew the lease: a runner that comes back after its lease expired
/// may still deliver what the agent wrote (from its spool): the log keeps it, the task's fate
/// stays `lost`.
pub(crate) fn events_renew_lease(t: &OpenTask) -> bool {
    t.state != TaskState::Lost
}

/// A claim leaves its runner's row alone when nothing in it changed and it was written this
/// recently: `last_seen` lags by this much at most ("online" is a 90 s window). Both stores.
pub(crate) const RUNNER_TOUCH_EVERY_MS: i64 = 1_000;

/// How far short of a full lease one may be left by events (heartbeats always renew in full).
pub(crate) const EVENTS_RENEW_SLACK_MS: i64 = 1_000;

/// Whether events find the lease fresh enough to leave it as it is: renewing it would move
/// it by less than [`EVENTS_RENEW_SLACK_MS`]. A runner posts events many times a second
/// while its agent writes; each renewal is two row updates (the lease and the runner's last
/// seen) and an index entry moved.
pub(crate) fn events_lease_fresh(t: &OpenTask, now: i64, lease_ms: i64) -> bool {
    t.lease_until
        .is_some_and(|until| until >= now + lease_ms - EVENTS_RENEW_SLACK_MS)
}

/// The session id an appended event reports, if it is a valid one. A session id reported
/// mid-run binds the conversation at once, so a crash later still leaves it resumable.
pub(crate) fn reported_session(e: &NewEvent) -> Option<&str> {
    if e.kind != "session" {
        return None;
    }
    e.data
        .get("session_id")
        .and_then(|v| v.as_str())
        .filter(|sid| tunnel_protocol::validate_session_id("session_id", sid).is_ok())
}

/// Kind of the one event written when a task's log reaches its cap. Runners may not send it.
pub(crate) const TRUNCATED_KIND: &str = "truncated";

/// What a task's event log holds, for its cap.
pub(crate) struct EventLog {
    pub(crate) count: u64,
    pub(crate) bytes: u64,
    pub(crate) truncated: bool,
}

/// What happens to one more event from the runner.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    Store,
    /// The cap is reached: write the `truncated` event instead, and drop this one.
    Truncate,
    Drop,
}

/// Stores an event of `size` bytes if the log stays within both caps; the first one that does
/// not fit truncates the log, and everything after it is dropped.
pub(crate) fn admit_event(log: &mut EventLog, size: u64, max_events: u64, max_bytes: u64) -> Admit {
    if log.truncated {
        return Admit::Drop;
    }
    if log.count + 1 > max_events || log.bytes + size > max_bytes {
        log.truncated = true;
        return Admit::Truncate;
    }
    log.count += 1;
    log.bytes += size;
    Admit::Store
}

/// The data of the `truncated` event.
pub(crate) fn truncated_data(max_events: u64, max_bytes: u64) -> serde_json::Value {
    serde_json::json!({
        "message": format!(
            "log truncated: the task's event log reached its limit ({max_events} events or \
             {max_bytes} bytes); later output of the agent is not stored, its final answer is"
        ),
        "max_events": max_events,
        "max_bytes": max_bytes,
    })
}

/// The bytes an event counts against its task's cap.
pub(crate) fn event_size(kind: &str, data: &str) -> u64 {
    (kind.len() + data.len()) as u64
}

/// Whether accepted events should edit the "working…" message.
pub(crate) fn shows_progress(t: &OpenTask, events: &[NewEvent]) -> bool {
    events_renew_lease(t)
        && events
            .iter()
            .any(|e| e.kind == "text" || e.kind == "tool_use")
}

/// What a finish of the (fenced) current attempt does.
pub(crate) enum Finish {
    /// Record it; a running attempt's lease must still hold first.
    Record { check_lease: bool },
    /// The same attempt finishing again (its first answer was lost): answer as before.
    Again,
}

pub(crate) fn finish(t: &OpenTask, attempt: u32) -> Result<Finish> {
    match t.state {
        TaskState::Offered => Ok(Finish::Record { check_lease: false }),
        TaskState::Running | TaskState::Cancelling => Ok(Finish::Record { check_lease: true }),
        s if s.is_terminal() => Ok(Finish::Again),
        s => Err(StoreError::Stale(format!(
            "attempt {attempt} has already ended: task is {s}"
        ))),
    }
}

/// The reason a parked task shows.
pub(crate) fn parked_reason(result: &TaskResult) -> &str {
    result.error.as_deref().unwrap_or("parked by the runner")
}

/// The reason a task that finished with this (terminal) outcome shows.
pub(crate) fn finished_reason(outcome: Outcome, result: &TaskResult) -> Option<&str> {
    match outcome {
        Outcome::Failed => result.error.as_deref(),
        Outcome::TimedOut => Some("the agent ran past its timeout"),
        Outcome::Cancelled => Some("cancelled"),
        _ => None,
    }
}

/// The reason an offer that was not acked in time shows when it goes back to the queue.
pub(crate) fn offer_expired_reason(t: &OpenTask) -> String {
    format!(
        "offer to runner {} was not acked in time; queued again",
        t.runner.as_deref().unwrap_or("?")
    )
}

/// What happens to a task started for a long-poll that was gone before it was answered
/// (nobody has it): queued again with the start not counted, or cancelled if that was asked.
pub(crate) fn start_returned(t: &OpenTask) -> Expiry {
    let runner = t.runner.as_deref().unwrap_or("?");
    if t.state == TaskState::Cancelling {
        return Expiry::End(
            TaskState::Cancelled,
            format!("cancelled; runner {runner} had gone before it was handed the task"),
        );
    }
    Expiry::Retry(format!(
        "runner {runner} had gone before it was handed the task; queued again"
    ))
}

/// What happens to a task whose lease ran out (the runner is gone); each with its reason.
pub(crate) enum Expiry {
    /// Attempts are left: it is queued again.
    Retry(String),
    /// It ends in this state: cancelled if cancel was asked, else lost.
    End(TaskState, String),
}

pub(crate) fn lease_expiry(t: &OpenTask) -> Expiry {
    let runner = t.runner.as_deref().unwrap_or("?");
    if t.state == TaskState::Cancelling {
        return Expiry::End(
            TaskState::Cancelled,
            format!("cancelled; runner {runner} stopped responding before confirming"),
        );
    }
    if t.runs < t.max_attempts {
        return Expiry::Retry(format!(
            "runner {runner} stopped heartbeating (lease expired); retrying, {} of {} attempts used",
            t.runs, t.max_attempts
        ));
    }
    Expiry::End(
        TaskState::Lost,
        format!("runner {runner} stopped heartbeating; its lease expired"),
    )
}

/// The `state` event of a task that moved to a state other than a terminal one (see
/// [`finished_event`]): what watchers and `GET /events` see.
pub(crate) enum StateEvent<'a> {
    /// Queued (again), with why if it is again.
    Queued(Option<&'a str>),
    /// Offered to this runner.
    Offered(&'a str),
    /// Acked by its runner.
    Running(Option<&'a str>),
    /// Parked until then.
    Parked(i64),
    Cancelling,
}

impl StateEvent<'_> {
    pub(crate) fn data(&self) -> serde_json::Value {
        match self {
            StateEvent::Queued(None) => serde_json::json!({"state": "queued"}),
            StateEvent::Queued(Some(reason)) => {
                serde_json::json!({"state": "queued", "reason": reason})
            }
            StateEvent::Offered(runner) => {
                serde_json::json!({"state": "offered", "runner": runner})
            }
            StateEvent::Running(runner) => {
                serde_json::json!({"state": "running", "runner": runner})
            }
            StateEvent::Parked(not_before) => {
                serde_json::json!({"state": "parked", "not_before": not_before})
            }
            StateEvent::Cancelling => serde_json::json!({"state": "cancelling"}),
        }
    }
}

/// The `state` event of a task that reached a terminal state.
pub(crate) fn finished_event(
    state: TaskState,
    reason: Option<&str>,
    result: Option<&TaskResult>,
) -> serde_json::Value {
    let mut data = serde_json::json!({"state": state.as_str()});
    if let Some(r) = reason {
        data["reason"] = r.into();
    }
    if let Some(res) = result {
        data["result"] = serde_json::to_value(res).unwrap_or_default();
    }
    data
}

// ---------------------------------------------------------------------------------------------
// Sessions and deliveries

/// The key that orders the tasks of one conversation with one agent in one namespace
/// (`conv_owner`: a client token's id, '' for the shared one). Conversation names and agent
/// names hold no control character, so the parts cannot run into each other.
pub(crate) fn session_key(agent: &str, conversation: &str, conv_owner: &str) -> String {
    if conv_owner.is_empty() {
        format!("{agent}\u{1f}{conversation}")
    } else {
        format!("{agent}\u{1f}{conversation}\u{1f}{conv_owner}")
    }
}

/// A task's session mode as stored: `session_mode` and `resume_id`.
pub(crate) fn session_mode_columns(mode: &SessionMode) -> (&'static str, Option<String>) {
    match mode {
        SessionMode::Continue => ("continue", None),
        SessionMode::New => ("new", None),
        SessionMode::Resume(id) => ("resume", Some(id.clone())),
    }
}

/// Where a task's session lives, before any history lookup.
pub(crate) enum Home {
    /// Known: the session to resume (if any) and the runner it must run on (if any).
    Known(Option<String>, Option<String>),
    /// Resuming this session id: it runs where the session history says the session lives.
    History(String),
}

/// The session a task resumes and the runner it must run on ("home"), from its session mode
/// and its conversation's binding.
pub(crate) fn session_home(
    mode: &str,
    resume_id: Option<String>,
    bound_session: Option<String>,
    bound_runner: Option<String>,
) -> Home {
    match mode {
        "new" => Home::Known(None, None),
        "resume" => Home::History(resume_id.unwrap_or_default()),
        // A bound runner without a session yet: a conversation pinned to a runner before its
        // first task (`sessions/new` with a runner).
        _ => Home::Known(bound_session, bound_runner),
    }
}

/// Whether an offer in this session mode rebinds the conversation at once: `new` and
/// `resume` do, so tasks after it continue from there even if this one never reports a session
/// id.
pub(crate) fn rebinds_on_offer(mode: &str) -> bool {
    mode != "continue"
}

/// Whether a task waits in its session's queue (and so has a queue position, and takes its
/// turn when the task ahead of it ends).
pub(crate) fn waits_in_queue(state: TaskState) -> bool {
    matches!(state, TaskState::Queued | TaskState::Parked)
}

/// The body of a plain message (`POST /notify`) in the outbox.
pub(crate) fn notify_body(text: &str) -> serde_json::Value {
    serde_json::json!({"text": text})
}

/// How long progress edits of one task wait for more events (at most one edit per this).
pub(crate) const EDIT_EVERY_MS: i64 = 3_000;

/// Messages to one destination go out in order; this names it.
pub(crate) fn destination(t: &ReplyTo) -> String {
    let platform = serde_json::to_value(t.platform)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    format!(
        "{platform}:{}:{}",
        t.channel,
        t.thread.as_deref().unwrap_or("")
    )
}

/// A chat reply target (Discord or Telegram), if the task has one.
pub(crate) fn chat_target(t: &OpenTask) -> Option<&ReplyTo> {
    t.reply_to.as_ref().filter(|r| is_chat(r))
}

/// A chat (Discord, Telegram) rather than a webhook: it gets the progress message.
pub(crate) fn is_chat(r: &ReplyTo) -> bool {
    r.platform != Platform::Webhook
}

/// The outbox kind of a task's final answer to this target.
pub(crate) fn final_kind(target: &ReplyTo) -> &'static str {
    if target.platform == Platform::Webhook {
        "webhook"
    } else {
        "final"
    }
}

/// Whether a recorded delivery outcome may make the next message of its destination due.
pub(crate) fn frees_destination(update: &DeliveryUpdate) -> bool {
    matches!(
        update,
        DeliveryUpdate::Retry { .. }
            | DeliveryUpdate::Wait { .. }
            | DeliveryUpdate::Sent { .. }
            | DeliveryUpdate::Failed { .. }
    )
}

pub(crate) fn parse_state(s: &str) -> Result<TaskState> {
    TaskState::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown task state {s:?}")))
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

// ---------------------------------------------------------------------------------------------
// Approvals

pub(crate) fn parse_policy(s: &str) -> Option<ApprovalPolicy> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

/// The columns [`approval_from_row`] reads, in its order, over `approvals a JOIN tasks t ON
/// t.seq = a.task_seq`.
pub(crate) const APPROVAL_COLUMNS: &str = "a.id, t.id, a.attempt, a.agent, a.runner, a.state,
    a.tool, a.options, a.asked_at, a.expires_at, a.outcome, a.owner";

/// Index of `owner` in [`APPROVAL_COLUMNS`].
pub(crate) const APPROVAL_OWNER: usize = 11;

pub(crate) fn approval_from_row(r: &impl Columns) -> Result<Approval> {
    let id = r.text(0)?;
    let state = r.text(5)?;
    let corrupt = |what: &str, e: serde_json::Error| {
        StoreError::Corrupt(format!("approval {id} {what}: {e}"))
    };
    let tool: ApprovalTool = serde_json::from_str(&r.text(6)?).map_err(|e| corrupt("tool", e))?;
    let options: Vec<ApprovalOption> =
        serde_json::from_str(&r.text(7)?).map_err(|e| corrupt("options", e))?;
    let outcome: Option<ApprovalOutcome> = match r.opt_text(10)? {
        Some(o) => Some(serde_json::from_str(&o).map_err(|e| corrupt("outcome", e))?),
        None => None,
    };
    Ok(Approval {
        task_id: r.text(1)?,
        attempt: r.uint(2)?,
        agent: r.text(3)?,
        runner: r.opt_text(4)?,
        state: ApprovalState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("approval {id} has state {state:?}")))?,
        tool,
        options,
        asked_at: r.int(8)?,
        expires_at: r.int(9)?,
        outcome,
        id,
    })
}

/// An approval outside the caller's scope is answered as if it did not exist.
pub(crate) fn check_approval_owner(scope: &Scope, owner: &str) -> Result<()> {
    match scope {
        Scope::Owner(o) if o != owner => Err(StoreError::NotFound("approval")),
        _ => Ok(()),
    }
}

/// Most requests of one task that may wait at once, and most requests one attempt may make:
/// a runner cannot fill the database or a chat with questions.
pub(crate) const PENDING_PER_TASK_MAX: i64 = 32;
pub(crate) const APPROVALS_PER_ATTEMPT_MAX: i64 = 1_000;

/// A new approval id: `apr_` and a UUIDv7, so ids sort by creation time.
pub(crate) fn new_approval_id() -> String {
    format!("{}{}", tunnel_protocol::APPROVAL_ID_PREFIX, crate::new_id())
}

/// Whether the (fenced) attempt may ask now: only a running task's agent asks; a task being
/// cancelled does not start new questions.
pub(crate) fn check_can_ask(t: &OpenTask, pending: i64, asked: i64) -> Result<()> {
    match t.state {
        TaskState::Running => {}
        TaskState::Cancelling => {
            return Err(StoreError::Conflict(
                "the task is being cancelled; no new approval requests".into(),
            ));
        }
        s => {
            return Err(StoreError::Stale(format!(
                "attempt {} is not running: task is {s}",
                t.attempt
            )));
        }
    }
    if pending >= PENDING_PER_TASK_MAX {
        return Err(StoreError::Conflict(format!(
            "the task already has {pending} approval requests waiting (at most {PENDING_PER_TASK_MAX})"
        )));
    }
    if asked >= APPROVALS_PER_ATTEMPT_MAX {
        return Err(StoreError::Conflict(format!(
            "this attempt already asked {asked} approval requests (at most {APPROVALS_PER_ATTEMPT_MAX})"
        )));
    }
    Ok(())
}

/// When a request asked now runs out.
pub(crate) fn approval_expires(now: i64, timeout_ms: Option<u64>) -> i64 {
    let t = timeout_ms.unwrap_or(tunnel_protocol::approval_limits::TIMEOUT_DEFAULT_MS);
    now.saturating_add(t.min(i64::MAX as u64) as i64)
}

/// Who answered, as recorded: the client's name for the person, and the token's name.
pub(crate) fn answered_by(by: Option<&str>, token_name: &str) -> String {
    match by {
        Some(b) => format!("{b} via token {token_name}"),
        None => format!("token {token_name}"),
    }
}

pub(crate) const BY_TIMEOUT: &str = "timeout";
pub(crate) const BY_CANCEL: &str = "cancel";

/// The outcome of a request that ran out of time: no, with the reject option where there is one.
pub(crate) fn expired_outcome(a: &Approval, now: i64) -> ApprovalOutcome {
    ApprovalOutcome {
        decision: None,
        option_id: tunnel_protocol::Decision::Deny.option_for(&a.options),
        message: Some("nobody answered in time; the request was denied".into()),
        by: BY_TIMEOUT.into(),
        at: now,
    }
}

/// The outcome of a request whose task was cancelled or whose attempt ended first.
pub(crate) fn cancelled_outcome(now: i64, why: &str) -> ApprovalOutcome {
    ApprovalOutcome {
        decision: None,
        option_id: None,
        message: Some(why.to_owned()),
        by: BY_CANCEL.into(),
        at: now,
    }
}

/// What an answer does to a request.
pub(crate) enum Answer {
    /// Settle it in this state with this outcome.
    Settle(ApprovalState, ApprovalOutcome),
    /// It ran out before the answer: expire it now (as the timer would), then refuse.
    Expired(ApprovalOutcome, StoreError),
}

pub(crate) fn answer(a: &Approval, ans: &ApprovalAnswer, by: String, now: i64) -> Result<Answer> {
    if let Some(o) = &a.outcome {
        return Err(settled_error(a.state, o));
    }
    if a.expires_at <= now {
        let outcome = expired_outcome(a, now);
        let err = settled_error(ApprovalState::Expired, &outcome);
        return Ok(Answer::Expired(outcome, err));
    }
    let state = match ans.decision {
        tunnel_protocol::Decision::Deny => ApprovalState::Denied,
        _ => ApprovalState::Allowed,
    };
    Ok(Answer::Settle(
        state,
        ApprovalOutcome {
            decision: Some(ans.decision),
            option_id: ans.decision.option_for(&a.options),
            message: ans.message.clone(),
            by,
            at: now,
        },
    ))
}

/// The refusal of an answer to a settled request: how, by whom and when.
pub(crate) fn settled_error(state: ApprovalState, o: &ApprovalOutcome) -> StoreError {
    let at = tunnel_protocol::iso8601(o.at);
    match state {
        ApprovalState::Expired => StoreError::Settled {
            code: "approval_expired",
            message: format!("the approval request expired at {at} (answered deny)"),
        },
        ApprovalState::Cancelled => StoreError::Settled {
            code: "already_decided",
            message: format!(
                "the approval request was already cancelled at {at} ({})",
                o.message.as_deref().unwrap_or("the task ended")
            ),
        },
        s => {
            let how = match o.decision {
                Some(tunnel_protocol::Decision::AllowOnce) => "allowed once",
                Some(tunnel_protocol::Decision::AllowSession) => "allowed for the session",
                Some(tunnel_protocol::Decision::Deny) => "denied",
                None => s.as_str(),
            };
            StoreError::Settled {
                code: "already_decided",
                message: format!("the approval request was already {how} by {} at {at}", o.by),
            }
        }
    }
}

/// The `approval` event written when a request is made and when it is settled.
pub(crate) fn approval_event(a: &Approval) -> serde_json::Value {
    serde_json::to_value(a).unwrap_or_default()
}

/// The approval request an outbox row is about, if it is one.
pub(crate) fn delivery_approval(d: &Delivery) -> Option<String> {
    if !matches!(d.kind, DeliveryKind::Approval | DeliveryKind::ApprovalEdit) {
        return None;
    }
    d.body
        .as_ref()
        .and_then(|b| b.get("approval"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

/// The outbox body of a delivery about one approval request.
pub(crate) fn approval_body(id: &str) -> serde_json::Value {
    serde_json::json!({ "approval": id })
}
