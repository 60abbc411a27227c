//! Wire types of the tunnel HTTP API (v1).
//!
//! Everything that crosses between the server, the runner, the CLI and the OpenClaw plugin is
//! defined here and nowhere else. The crate has no I/O: it is serde types, their validation,
//! and a few constants. Times are Unix milliseconds (`i64`), ids are strings.

use std::fmt;

use serde::{Deserialize, Serialize};

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

mod acp;
mod approval;
pub use acp::*;
pub use approval::*;

/// `s` on one line (runs of whitespace, newlines included, become one space) of at most `max`
/// characters, the last one an ellipsis when cut: for a prompt or an answer in a list or a title.
pub fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// `2026-11-25T15:50:09.000Z` from Unix milliseconds.
pub fn iso8601(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The path prefix of API v1.
pub const API_PREFIX: &str = "/v1";
/// Header that makes a submit idempotent (the plugin sends the chat message id).
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Limits on client-supplied fields. A value outside them is rejected, never truncated.
pub mod limits {
    /// Longest agent, project, runner or model name.
    pub const NAME_MAX: usize = 64;
    /// Longest conversation id (Discord/Telegram ids with thread suffixes fit easily).
    pub const CONVERSATION_MAX: usize = 256;
    /// Longest native session id an agent may report.
    pub const SESSION_ID_MAX: usize = 256;
    /// Longest idempotency key.
    pub const IDEMPOTENCY_KEY_MAX: usize = 256;
    /// Shortest and longest task timeout.
    pub const TIMEOUT_MIN_MS: u64 = 1_000;
    pub const TIMEOUT_MAX_MS: u64 = 7 * 24 * 3_600_000;
    /// Most attempts a task may ask for (retry after a lost lease).
    pub const MAX_ATTEMPTS_MAX: u32 = 10;
    /// Most events in one append request.
    pub const EVENTS_PER_APPEND_MAX: usize = 1_000;
    /// Longest event kind.
    pub const EVENT_KIND_MAX: usize = 64;
    /// Longest wait a long-poll or `?wait=` may ask for.
    pub const WAIT_MAX_MS: u64 = 60_000;
    /// Most agents or projects a runner may declare.
    pub const RUNNER_LIST_MAX: usize = 64;
    /// Most task ids a claim may list as running on its runner (`holding`).
    pub const HOLDING_MAX: usize = 1_024;
    /// Longest reply_to channel/thread/message id.
    pub const REPLY_ID_MAX: usize = 128;
    /// Largest `meta` object of a task, as JSON text.
    pub const META_MAX: usize = 4 * 1024;
}

// ---------------------------------------------------------------------------------------------
// Errors

/// The body of every error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A machine-readable code and a message for people.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ErrorDetail {
    /// One of: `bad_request`, `unauthorized`, `forbidden`, `not_found`, `method_not_allowed`,
    /// `conflict`, `stale_attempt`, `payload_too_large`, `unsupported_media_type`,
    /// `unavailable`, `internal`.
    pub code: String,
    pub message: String,
}

/// A field that failed validation: which one and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

impl Invalid {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Invalid {
            field,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for Invalid {}

// ---------------------------------------------------------------------------------------------
// Tasks

/// Where a task is in its life. See ARCHITECTURE.md for the transitions.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for a runner (and for earlier tasks of its session).
    Queued,
    /// Handed to a runner by a claim; goes back to `queued` unless acked before `ack_by`.
    Offered,
    /// Acked: an attempt is running under a lease that heartbeats renew.
    Running,
    /// Cancel was asked while running; the runner learns it on its next heartbeat.
    Cancelling,
    /// Waiting until `not_before` (e.g. an agent's usage limit resets), then queued again.
    Parked,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    /// The runner stopped heartbeating and no attempt is left.
    Lost,
}

impl TaskState {
    pub const ALL: [TaskState; 10] = [
        TaskState::Queued,
        TaskState::Offered,
        TaskState::Running,
        TaskState::Cancelling,
        TaskState::Parked,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::TimedOut,
        TaskState::Lost,
    ];

    /// A terminal state never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded
                | TaskState::Failed
                | TaskState::Cancelled
                | TaskState::TimedOut
                | TaskState::Lost
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Offered => "offered",
            TaskState::Running => "running",
            TaskState::Cancelling => "cancelling",
            TaskState::Parked => "parked",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::TimedOut => "timed_out",
            TaskState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a task treats the agent session of its conversation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SessionMode {
    /// Resume the conversation's current session, if it has one (the default).
    #[default]
    Continue,
    /// Start a fresh agent session; it becomes the conversation's session.
    New,
    /// Resume this native session id; it becomes the conversation's session.
    Resume(String),
}

/// A chat platform the server can deliver to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Discord,
    Telegram,
    Webhook,
}

/// Where the answer of a task goes. Credentials live in server config, never here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReplyTo {
    pub platform: Platform,
    /// Discord channel id, Telegram chat id, or the name of a configured webhook.
    pub channel: String,
    /// Discord thread id or Telegram topic (message_thread_id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
    /// The chat message to reply to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `POST /v1/tasks`: submit a task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SubmitTask {
    /// `claude`, `codex`, `gemini` or a custom agent's name.
    pub agent: String,
    pub prompt: String,
    /// The chat conversation (channel, thread, DM). Tasks of one conversation and agent run
    /// one at a time in submission order and share the agent's session. Names are scoped by
    /// owner: each client token's are its own, admin tokens share one namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    /// A project name a runner declared; never a path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub session: SessionMode,
    /// Attempts allowed when a runner is lost mid-task (default 1: report, don't re-run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyTo>,
    /// The client's own data about the task: a JSON object of at most 4 KiB, kept and
    /// returned as given. tunnel does not act on it (the openclaw-tunnel compatibility routes
    /// keep the original's task fields here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub meta: Option<serde_json::Value>,
    /// How the agent's permission requests are handled for this task; the stricter of this and
    /// the runner's configuration for the agent wins. None: the runner's configuration decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvals: Option<ApprovalPolicy>,
}

impl SubmitTask {
    /// A submit with only the required fields.
    pub fn new(agent: impl Into<String>, prompt: impl Into<String>) -> Self {
        SubmitTask {
            agent: agent.into(),
            prompt: prompt.into(),
            conversation: None,
            project: None,
            model: None,
            timeout_ms: None,
            session: SessionMode::Continue,
            max_attempts: None,
            reply_to: None,
            meta: None,
            approvals: None,
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_name("agent", &self.agent)?;
        if self.prompt.trim().is_empty() {
            return Err(Invalid::new("prompt", "must not be empty"));
        }
        if self.prompt.contains('\0') {
            return Err(Invalid::new("prompt", "must not contain NUL characters"));
        }
        if let Some(c) = &self.conversation {
            validate_text("conversation", c, limits::CONVERSATION_MAX)?;
        }
        if let Some(p) = &self.project {
            validate_name("project", p)?;
        }
        if let Some(m) = &self.model {
            validate_model(m)?;
        }
        if let Some(t) = self.timeout_ms
            && !(limits::TIMEOUT_MIN_MS..=limits::TIMEOUT_MAX_MS).contains(&t)
        {
            return Err(Invalid::new(
                "timeout_ms",
                format!(
                    "must be between {} and {}",
                    limits::TIMEOUT_MIN_MS,
                    limits::TIMEOUT_MAX_MS
                ),
            ));
        }
        if let SessionMode::Resume(id) = &self.session {
            validate_session_id("session.resume", id)?;
        }
        if let Some(n) = self.max_attempts
            && !(1..=limits::MAX_ATTEMPTS_MAX).contains(&n)
        {
            return Err(Invalid::new(
                "max_attempts",
                format!("must be between 1 and {}", limits::MAX_ATTEMPTS_MAX),
            ));
        }
        if let Some(r) = &self.reply_to {
            validate_reply_id("reply_to.channel", &r.channel)?;
            if let Some(t) = &r.thread {
                validate_reply_id("reply_to.thread", t)?;
            }
            if let Some(m) = &r.message {
                validate_reply_id("reply_to.message", m)?;
            }
        }
        if let Some(m) = &self.meta {
            if !m.is_object() {
                return Err(Invalid::new("meta", "must be a JSON object"));
            }
            if m.to_string().len() > limits::META_MAX {
                return Err(Invalid::new(
                    "meta",
                    format!("must be at most {} bytes of JSON", limits::META_MAX),
                ));
            }
        }
        Ok(())
    }
}

/// What the runner reports when an attempt ends.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskResult {
    /// The agent's final answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// What went wrong, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last lines the agent wrote to stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_tail: Option<String>,
    /// The agent's native session id (to resume the conversation later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Tokens, cost and similar figures, as the agent reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub usage: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Task {
    pub id: String,
    pub agent: String,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    pub session: SessionMode,
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyTo>,
    /// The client's data, as submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub meta: Option<serde_json::Value>,
    /// The task's approval policy, as submitted (None: the runner's configuration decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvals: Option<ApprovalPolicy>,
    pub state: TaskState,
    /// Number of attempts started so far (0 until the first offer).
    pub attempt: u32,
    /// The runner of the current or last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    pub cancel_requested: bool,
    /// Parked until this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
    /// Offer must be acked by this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_by: Option<i64>,
    /// The current attempt's lease ends at this time unless renewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<i64>,
    /// Why the task is in its state, when that is not obvious (lost lease, cancel, requeue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskResult>,
    /// While queued: unfinished tasks ahead of this one in its conversation (a running one
    /// counts), or, without a conversation, ready tasks of its agent submitted before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// Where the answer is, for tasks with `reply_to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryStatus>,
    /// While the agent waits for a person's answer: the id of the oldest pending approval
    /// request of the task (`GET /v1/approvals/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for_approval: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
}

/// The delivery of a task's answer to its `reply_to`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct DeliveryStatus {
    /// `pending`, `retrying`, `sent`, `failed`, or `working_message_sent` before the answer.
    pub state: String,
    pub attempts: u32,
    /// The last error (why it is retrying, or why it was given up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/tasks`: newest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TaskList {
    pub tasks: Vec<Task>,
}

// ---------------------------------------------------------------------------------------------
// Events

/// One entry of a task's append-only event log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TaskEvent {
    /// Monotonic per task, from 1. SSE uses it as the event id.
    pub seq: u64,
    /// The attempt that produced the event (0 for events before any attempt).
    pub attempt: u32,
    /// `state` (written by the server), or what the runner sent: `text`, `tool_use`,
    /// `usage`, `session`, `log`, ...
    pub kind: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub data: serde_json::Value,
    pub at: i64,
}

/// `GET /v1/tasks/{id}/events?format=json`: the log as one JSON document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct EventList {
    pub events: Vec<TaskEvent>,
    /// The task's state when the list was read.
    pub state: TaskState,
}

/// One event as the runner sends it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// The runner's own sequence number within the attempt, from 1; a resent event with the
    /// same number is ignored, so appends can be retried safely.
    pub n: u64,
    pub kind: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub data: serde_json::Value,
}

/// `POST /v1/tasks/{id}/events`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AppendEvents {
    pub attempt: u32,
    pub lease_token: String,
    pub events: Vec<NewEvent>,
}

impl AppendEvents {
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_new_events(&self.events)
    }
}

/// The runner's events of one request (an append, or those a finish carries).
fn validate_new_events(events: &[NewEvent]) -> Result<(), Invalid> {
    if events.len() > limits::EVENTS_PER_APPEND_MAX {
        return Err(Invalid::new(
            "events",
            format!(
                "at most {} events per request",
                limits::EVENTS_PER_APPEND_MAX
            ),
        ));
    }
    for e in events {
        if e.n == 0 {
            return Err(Invalid::new("events.n", "must start at 1"));
        }
        validate_kind(&e.kind)?;
        if e.kind == "state" || e.kind == "truncated" {
            return Err(Invalid::new(
                "events.kind",
                format!("`{}` is reserved for the server", e.kind),
            ));
        }
    }
    Ok(())
}

/// Answer to an append: how many were new, and whether cancel was asked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AppendAck {
    pub accepted: u32,
    pub cancel: bool,
    /// The task's event log reached its cap (`max_task_events` / `max_task_event_bytes`):
    /// later events are acknowledged and dropped, so the runner need not send them (its
    /// finish, with the answer, is always kept). Absent from servers before it: false.
    #[serde(default)]
    pub truncated: bool,
}

// ---------------------------------------------------------------------------------------------
// Runner protocol

/// `POST /v1/claim`: a long-poll for work.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// The runner's name, unique among runners.
    pub runner: String,
    /// Agents this runner can run.
    pub agents: Vec<String>,
    /// Projects this runner has (tasks naming another project are not offered to it).
    #[serde(default)]
    pub projects: Vec<String>,
    /// How many more tasks it could start now (shown in `GET /v1/runners`).
    #[serde(default = "one")]
    pub capacity: u32,
    /// How long to hold the request when no task is ready (capped by the server).
    #[serde(default)]
    pub wait_ms: u64,
    /// The runner's version, for `GET /v1/runners`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The version each agent CLI reported (`claude --version`, …), for `GET /v1/runners`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub agent_versions: std::collections::BTreeMap<String, String>,
    /// The agents of `agents` this runner drives over ACP (an ACP agent, or a built-in CLI
    /// whose ACP adapter is installed): what `tunnel acp` and approvals can use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acp_agents: Vec<String>,
    /// What each agent of `acp_agents` answered to ACP `initialize` (capabilities, name and
    /// version, login methods), for `tunnel acp` and `GET /v1/runners`. Sent when it changed:
    /// a claim without it keeps what the server has, one with it replaces it. (A server older
    /// than this field refuses the claim with 400; the runner then claims without it.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acp_capabilities: Option<std::collections::BTreeMap<String, AcpCapabilities>>,
    /// Ack the offer in the same request: the answer's `lease` says the attempt has started,
    /// which saves the ack's round trip. An offer the server could not ack comes without
    /// `lease`; ack it as usual. (A server older than this field refuses the claim with 400.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ack: bool,
    /// With `ack`: the ids of the tasks this runner is running now. An attempt acked by an
    /// earlier claim whose answer never reached the runner (the connection died) is offered
    /// again, started, to the runner's next claim with `ack`, unless listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holding: Vec<String>,
}

fn one() -> u32 {
    1
}

impl ClaimRequest {
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_name("runner", &self.runner)?;
        if self.agents.is_empty() {
            return Err(Invalid::new("agents", "must name at least one agent"));
        }
        if self.agents.len() > limits::RUNNER_LIST_MAX {
            return Err(Invalid::new("agents", "too many agents"));
        }
        if self.projects.len() > limits::RUNNER_LIST_MAX {
            return Err(Invalid::new("projects", "too many projects"));
        }
        for a in &self.agents {
            validate_name("agents", a)?;
        }
        for p in &self.projects {
            validate_name("projects", p)?;
        }
        if self.wait_ms > limits::WAIT_MAX_MS {
            return Err(Invalid::new(
                "wait_ms",
                format!("must be at most {}", limits::WAIT_MAX_MS),
            ));
        }
        if let Some(v) = &self.version {
            validate_text("version", v, limits::NAME_MAX)?;
        }
        if self.agent_versions.len() > limits::RUNNER_LIST_MAX {
            return Err(Invalid::new("agent_versions", "too many agents"));
        }
        if self.acp_agents.len() > limits::RUNNER_LIST_MAX {
            return Err(Invalid::new("acp_agents", "too many agents"));
        }
        for a in &self.acp_agents {
            validate_name("acp_agents", a)?;
            if !self.agents.contains(a) {
                return Err(Invalid::new("acp_agents", "must be agents of `agents`"));
            }
        }
        if let Some(caps) = &self.acp_capabilities {
            acp::validate_all(caps, &self.acp_agents)?;
        }
        for (agent, v) in &self.agent_versions {
            validate_name("agent_versions", agent)?;
            validate_text("agent_versions", v, 200)?;
        }
        if self.holding.len() > limits::HOLDING_MAX {
            return Err(Invalid::new(
                "holding",
                format!("at most {} task ids", limits::HOLDING_MAX),
            ));
        }
        for id in &self.holding {
            validate_text("holding", id, limits::NAME_MAX)?;
        }
        Ok(())
    }
}

/// A task offered to a runner. Ack it before `ack_by` or it goes back to the queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Offer {
    pub task: Task,
    pub attempt: u32,
    /// Carried by every later call of this attempt; a stale one gets 409.
    pub lease_token: String,
    pub ack_by: i64,
    /// The native session to resume, resolved when the task was offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_session_id: Option<String>,
    /// Present when the claim asked for `ack` and the server acked the offer: the attempt has
    /// started under this lease, and no ack is needed (a repeated one answers the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseStatus>,
}

/// Identifies an attempt in ack and heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AttemptRef {
    pub attempt: u32,
    pub lease_token: String,
}

/// Answer to ack and heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LeaseStatus {
    pub lease_until: i64,
    /// How long a lease lasts: heartbeat well within it.
    pub lease_ms: i64,
    /// Cancel was asked: stop the agent and finish with `cancelled`.
    pub cancel: bool,
}

/// `POST /v1/tasks/{id}/heartbeat`: renews the lease, then holds the answer up to `wait_ms`
/// (at most half a lease) unless cancel is asked, so a cancel reaches the runner at once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub attempt: u32,
    pub lease_token: String,
    #[serde(default)]
    pub wait_ms: u64,
}

impl Heartbeat {
    pub fn attempt_ref(&self) -> AttemptRef {
        AttemptRef {
            attempt: self.attempt,
            lease_token: self.lease_token.clone(),
        }
    }
}

/// How an attempt ended, as the runner reports it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    /// Not done: run it again after `not_before` (e.g. usage limit until a reset time).
    Parked,
}

impl Outcome {
    pub fn state(self) -> TaskState {
        match self {
            Outcome::Succeeded => TaskState::Succeeded,
            Outcome::Failed => TaskState::Failed,
            Outcome::Cancelled => TaskState::Cancelled,
            Outcome::TimedOut => TaskState::TimedOut,
            Outcome::Parked => TaskState::Parked,
        }
    }
}

/// `POST /v1/tasks/{id}/finish`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {
    pub attempt: u32,
    pub lease_token: String,
    pub outcome: Outcome,
    #[serde(default)]
    pub result: TaskResult,
    /// Required with `parked`: when to run it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
    /// The attempt's last events, stored before the finish as an append would store them (an
    /// event whose `n` the server has is ignored, so a repeated finish stores none twice):
    /// one request instead of an append and a finish. (A server older than this field
    /// refuses the finish with 400.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<NewEvent>,
}

impl FinishRequest {
    pub fn validate(&self) -> Result<(), Invalid> {
        match (self.outcome, self.not_before) {
            (Outcome::Parked, None) => {
                return Err(Invalid::new(
                    "not_before",
                    "is required when outcome is parked",
                ));
            }
            (Outcome::Parked, Some(_)) | (_, None) => {}
            (_, Some(_)) => {
                return Err(Invalid::new(
                    "not_before",
                    "is only allowed when outcome is parked",
                ));
            }
        }
        if let Some(id) = &self.result.session_id {
            validate_session_id("result.session_id", id)?;
        }
        validate_new_events(&self.events)
    }
}

/// A runner the server has seen.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RunnerInfo {
    pub name: String,
    pub agents: Vec<String>,
    pub projects: Vec<String>,
    pub capacity: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The version each agent CLI reported.
    #[serde(default)]
    pub agent_versions: std::collections::BTreeMap<String, String>,
    pub first_seen: i64,
    pub last_seen: i64,
    /// Seen recently enough to count as connected.
    pub online: bool,
    /// Tasks offered to or running on it now.
    pub active_tasks: u32,
    /// The agents it drives over ACP (`tunnel acp`).
    #[serde(default)]
    pub acp_agents: Vec<String>,
    /// What each of `acp_agents` answered to ACP `initialize`, as the runner last reported it
    /// (an agent missing here has not been reported yet).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub acp_capabilities: std::collections::BTreeMap<String, AcpCapabilities>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RunnerList {
    pub runners: Vec<RunnerInfo>,
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// The agent session a conversation is bound to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SessionBinding {
    pub conversation: String,
    pub agent: String,
    /// The native session id to resume; none = the next task starts fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The runner that holds the session on its disk; its tasks go there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    pub updated_at: i64,
    /// The client token (id) whose conversation this is, when it is not the caller's own:
    /// conversation names are scoped by owner, and only an admin's listing shows other
    /// tokens' conversations. Absent: the caller's own (for an admin, the shared namespace
    /// of admin tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// A native session seen on a runner, most recently used first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RecentSession {
    pub agent: String,
    pub session_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    pub last_used: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SessionList {
    pub sessions: Vec<SessionBinding>,
    pub recent: Vec<RecentSession>,
}

/// `POST /v1/runners/{name}/sessions`: the sessions a runner found in its agents' own session
/// stores (Claude's projects, Codex's rollouts, Gemini's chats), for `recent`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReportSessions {
    pub sessions: Vec<ReportedSession>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReportedSession {
    pub agent: String,
    pub session_id: String,
    pub last_used: i64,
}

impl ReportSessions {
    /// Most sessions in one report.
    pub const MAX: usize = 500;

    pub fn validate(&self) -> Result<(), Invalid> {
        if self.sessions.len() > Self::MAX {
            return Err(Invalid::new(
                "sessions",
                format!("at most {} per report", Self::MAX),
            ));
        }
        for s in &self.sessions {
            validate_name("sessions.agent", &s.agent)?;
            validate_session_id("sessions.session_id", &s.session_id)?;
        }
        Ok(())
    }
}

/// `POST /v1/sessions/new` and `/v1/sessions/resume`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SessionCommand {
    pub conversation: String,
    pub agent: String,
    /// Required for resume: the native session id to bind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// For resume: the runner that has the session (else the one that last reported it). For
    /// new: the runner the conversation's first task goes to (`tunnel acp --runner`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
}

impl SessionCommand {
    pub fn validate(&self, needs_id: bool) -> Result<(), Invalid> {
        validate_text("conversation", &self.conversation, limits::CONVERSATION_MAX)?;
        validate_name("agent", &self.agent)?;
        match (&self.session_id, needs_id) {
            (Some(id), true) => validate_session_id("session_id", id)?,
            (None, true) => return Err(Invalid::new("session_id", "is required")),
            (Some(_), false) => {
                return Err(Invalid::new("session_id", "is not allowed here"));
            }
            (None, false) => {}
        }
        if let Some(r) = &self.runner {
            validate_name("runner", r)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens

/// What a token may do. `admin` may do everything.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Submit tasks and read its own tasks, sessions and runners.
    Client,
    /// Claim and run tasks.
    Runner,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Runner => "runner",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Client, Role::Runner, Role::Admin]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    pub role: Role,
}

impl CreateToken {
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_text("name", &self.name, limits::NAME_MAX)
    }
}

/// A token as listed (the secret is never shown again after creation).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// Answer to a create: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

/// `GET /healthz` and `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Health {
    pub status: String,
}

// ---------------------------------------------------------------------------------------------
// Validation helpers

/// Names: agents, projects, runners. Letters, digits, `-`, `_`, `.`; must start with a letter
/// or digit so a name can never be read as a command-line option.
pub fn validate_name(field: &'static str, s: &str) -> Result<(), Invalid> {
    if s.is_empty() || s.len() > limits::NAME_MAX {
        return Err(Invalid::new(
            field,
            format!("must be 1 to {} characters", limits::NAME_MAX),
        ));
    }
    let mut chars = s.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(Invalid::new(
            field,
            format!(
                "{s:?} must be letters, digits, '-', '_' or '.', starting with a letter or digit"
            ),
        ));
    }
    Ok(())
}

fn validate_model(s: &str) -> Result<(), Invalid> {
    // Model names have slashes and colons (`openai/gpt-5:high`), but never start with '-'.
    if s.is_empty() || s.len() > 128 {
        return Err(Invalid::new("model", "must be 1 to 128 characters"));
    }
    let first_ok = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/@[]".contains(c))
    {
        return Err(Invalid::new(
            "model",
            format!(
                "{s:?} is not a model name (letters, digits and -_.:/@[], starting with a letter or digit)"
            ),
        ));
    }
    Ok(())
}

/// Native session ids: UUIDs for Claude, Codex and Gemini, but custom agents may use others.
pub fn validate_session_id(field: &'static str, s: &str) -> Result<(), Invalid> {
    if s.is_empty() || s.len() > limits::SESSION_ID_MAX {
        return Err(Invalid::new(
            field,
            format!("must be 1 to {} characters", limits::SESSION_ID_MAX),
        ));
    }
    let first_ok = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(Invalid::new(
            field,
            format!("{s:?} is not a session id (letters, digits and -_.:)"),
        ));
    }
    Ok(())
}

fn validate_reply_id(field: &'static str, s: &str) -> Result<(), Invalid> {
    // Discord snowflakes, Telegram chat ids (-100…), @channel names, webhook names. Nothing that
    // could change the path of a request built from it.
    if s.is_empty() || s.len() > limits::REPLY_ID_MAX {
        return Err(Invalid::new(
            field,
            format!("must be 1 to {} characters", limits::REPLY_ID_MAX),
        ));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_@.".contains(c))
        || s.contains("..")
    {
        return Err(Invalid::new(
            field,
            format!("{s:?} must be letters, digits, '-', '_', '@' or '.'"),
        ));
    }
    Ok(())
}

/// Free text with a length limit and no control characters.
pub fn validate_text(field: &'static str, s: &str, max: usize) -> Result<(), Invalid> {
    if s.is_empty() || s.len() > max {
        return Err(Invalid::new(field, format!("must be 1 to {max} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(Invalid::new(field, "must not contain control characters"));
    }
    Ok(())
}

fn validate_kind(s: &str) -> Result<(), Invalid> {
    if s.is_empty()
        || s.len() > limits::EVENT_KIND_MAX
        || !s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.".contains(c))
    {
        return Err(Invalid::new(
            "events.kind",
            format!(
                "{s:?} must be 1 to {} of a-z, 0-9, '_' and '.'",
                limits::EVENT_KIND_MAX
            ),
        ));
    }
    Ok(())
}

/// Lowercase hex of bytes (tokens, lease tokens, webhook signatures).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests;
