//! What the messages say: the final answer and the "working…" progress message.

use serde_json::Value;
use tunnel_protocol::{Task, TaskEvent, TaskState};

use crate::split::{defuse_fences, head, open_fence_closer, split, tail, text_len};

/// Most of a failure's stderr shown (units), before the platform limit is considered.
const STDERR_MAX: usize = 1500;
/// Tool uses shown in a progress message.
const PROGRESS_TOOLS: usize = 5;
/// Longest tool-use line in a progress message.
const TOOL_LINE_MAX: usize = 100;

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn cost(usd: f64) -> String {
    if usd >= 0.1 {
        format!("${usd:.2}")
    } else {
        format!("${usd:.4}")
    }
}

fn model_of(task: &Task) -> Option<String> {
    task.model.clone().or_else(|| {
        task.result
            .as_ref()?
            .usage
            .as_ref()?
            .get("model")?
            .as_str()
            .map(str::to_owned)
    })
}

fn outcome(state: TaskState) -> (&'static str, &'static str) {
    match state {
        TaskState::Succeeded => ("✅", ""),
        TaskState::Failed => ("❌", "failed"),
        TaskState::TimedOut => ("⏱️", "timed out"),
        TaskState::Cancelled => ("🚫", "cancelled"),
        TaskState::Lost => ("⚠️", "lost (its runner stopped answering)"),
        TaskState::Queued => ("🕓", "queued"),
        TaskState::Offered | TaskState::Running | TaskState::Cancelling => ("⏳", "running"),
        TaskState::Parked => ("⏸️", "parked"),
    }
}

/// The final message(s) of a task, split at `limit` ([`split`]): a header (outcome, agent,
/// model when known, duration, cost when the agent reported `usage.cost_usd`), the answer —
/// or for a failure the error, the reason and the tail of stderr in a code block, then any
/// partial answer — and a footer with the task id and the session id to resume with
/// (`tunnel submit --resume <id>`).
pub fn render_final(task: &Task, limit: usize) -> Vec<String> {
    let result = task.result.as_ref();
    let (icon, word) = outcome(task.state);
    let mut header = format!("{icon} {}", task.agent);
    if let Some(m) = model_of(task) {
        header.push_str(&format!(" · {m}"));
    }
    if !word.is_empty() {
        header.push_str(&format!(" · {word}"));
    }
    let ms = result.and_then(|r| r.duration_ms).or_else(|| {
        let end = task.finished_at?;
        let start = task.started_at?;
        u64::try_from(end - start).ok()
    });
    if let Some(ms) = ms {
        header.push_str(&format!(" · {}", duration(ms)));
    }
    if let Some(usd) = result
        .and_then(|r| r.usage.as_ref())
        .and_then(|u| u.get("cost_usd"))
        .and_then(Value::as_f64)
    {
        header.push_str(&format!(" · {}", cost(usd)));
    }

    let answer = result
        .and_then(|r| r.text.as_deref())
        .map(str::trim)
        .filter(|t| !t.is_empty());
    if task.state == TaskState::Cancelled {
        return render_cancelled(task, answer, limit);
    }
    let mut body = String::new();
    if task.state == TaskState::Succeeded {
        body.push_str(answer.unwrap_or("(the agent finished without a text answer)"));
    } else {
        let error = result.and_then(|r| r.error.as_deref()).map(str::trim);
        let reason = task.reason.as_deref().map(str::trim);
        let mut said = false;
        if let Some(e) = error.filter(|e| !e.is_empty()) {
            body.push_str(e);
            said = true;
        }
        if let Some(r) = reason.filter(|r| !r.is_empty() && Some(*r) != error) {
            if said {
                body.push('\n');
            }
            body.push_str(r);
            said = true;
        }
        if let Some(code) = result.and_then(|r| r.exit_code) {
            body.push_str(&format!("{}exit code {code}", if said { "\n" } else { "" }));
            said = true;
        }
        let stderr = result
            .and_then(|r| r.stderr_tail.as_deref())
            .map(str::trim)
            .filter(|s| !s.is_empty());
        if let Some(s) = stderr {
            let max = STDERR_MAX.min(limit / 2).max(20);
            body.push_str(&format!(
                "{}stderr:\n```\n{}\n```",
                if said { "\n\n" } else { "" },
                defuse_fences(&tail(s, max))
            ));
            said = true;
        }
        if let Some(a) = answer {
            body.push_str(&format!(
                "{}Partial answer:\n{a}",
                if said { "\n\n" } else { "" }
            ));
            said = true;
        }
        if !said {
            body.push_str(&format!(
                "The task ended as {} with no error message, exit code or stderr captured.",
                task.state
            ));
        }
    }
    if let Some(closer) = open_fence_closer(&body) {
        body.push('\n');
        body.push_str(&closer);
    }

    let mut footer = format!("task {}", task.id);
    if let Some(sid) = result.and_then(|r| r.session_id.as_deref()) {
        footer.push_str(&format!(" · session {sid} (resume: --resume {sid})"));
    }
    split(&format!("{header}\n\n{body}\n\n{footer}"), limit)
}

/// How long the task ran: the agent's own figure, else start to finish.
fn ran_ms(task: &Task) -> Option<u64> {
    task.result
        .as_ref()
        .and_then(|r| r.duration_ms)
        .or_else(|| {
            let end = task.finished_at?;
            let start = task.started_at?;
            u64::try_from(end - start).ok()
        })
}

/// What the "working…" message becomes when the task ended: one line with the outcome, so no
/// chat keeps a stale "working…" above the answer.
fn ended_line(task: &Task) -> String {
    let after = ran_ms(task).map(|ms| format!(" after {}", duration(ms)));
    let after = after.as_deref().unwrap_or("");
    let agent = &task.agent;
    match task.state {
        TaskState::Succeeded => match ran_ms(task) {
            Some(ms) => format!("✅ {agent} · done in {} — the answer follows", duration(ms)),
            None => format!("✅ {agent} · done — the answer follows"),
        },
        TaskState::Failed => format!("❌ {agent} · failed{after}"),
        TaskState::TimedOut => format!("⏱️ {agent} · timed out{after}"),
        TaskState::Cancelled => format!("🛑 {agent} · cancelled{after}"),
        TaskState::Lost => format!("⚠️ {agent} · lost{after}: its runner stopped answering"),
        _ => format!("⏳ {agent}"),
    }
}

/// A cancelled task in one line (the runner's "cancelled; the agent was stopped", the
/// reason "cancelled" and the exit code of the signal all say the same), with what the reason
/// adds beyond "cancelled", any partial answer, and the footer.
fn render_cancelled(task: &Task, answer: Option<&str>, limit: usize) -> Vec<String> {
    let mut line = format!("🛑 {} · cancelled", task.agent);
    if let Some(ms) = ran_ms(task) {
        line.push_str(&format!(" after {}", duration(ms)));
    }
    let extra = task
        .reason
        .as_deref()
        .map(|r| {
            r.trim()
                .trim_start_matches("cancelled")
                .trim_start_matches([';', ',', ':', ' '])
        })
        .filter(|r| !r.is_empty());
    if let Some(r) = extra {
        line.push_str(&format!(" ({r})"));
    }
    let mut text = line;
    if let Some(a) = answer {
        text.push_str(&format!("\n\nPartial answer:\n{a}"));
        if let Some(closer) = open_fence_closer(&text) {
            text.push('\n');
            text.push_str(&closer);
        }
    }
    text.push_str(&format!("\n\ntask {}", task.id));
    if let Some(sid) = task.result.as_ref().and_then(|r| r.session_id.as_deref()) {
        text.push_str(&format!(" · session {sid} (resume: --resume {sid})"));
    }
    split(&text, limit)
}

/// The acknowledgement of a task that waits: the first message a chat gets about it (server
/// delivery posts it at submit, then edits it as the task runs).
fn waiting_line(task: &Task) -> String {
    let short: String = task.id.chars().take(8).collect();
    let mut line = match task.state {
        TaskState::Parked => format!("⏸️ {} · parked — task {short}", task.agent),
        // Offered to a runner, not started yet.
        TaskState::Offered => format!("⏳ {} · starting — task {short}", task.agent),
        _ => format!("🕓 {} · queued — task {short}", task.agent),
    };
    match task.queue_position {
        Some(0) => line.push_str(", next in line"),
        Some(n) => line.push_str(&format!(", {n} ahead of it")),
        None => {}
    }
    if task.state == TaskState::Parked
        && let Some(r) = task
            .reason
            .as_deref()
            .map(str::trim)
            .filter(|r| !r.is_empty())
    {
        line.push_str(&format!("\n{}", head(&defuse_fences(r), TOOL_LINE_MAX)));
    }
    line
}

/// [`render_progress_at`] now.
pub fn render_progress(task: &Task, recent: &[TaskEvent], limit: usize) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    render_progress_at(task, recent, limit, now)
}

/// One-line summary of a tool use's `data` (`{"name", "input"}` from the runner's adapters).
fn tool_line(data: &Value) -> String {
    let name = data["name"].as_str().unwrap_or("tool");
    let input = &data["input"];
    let detail = match input {
        Value::String(s) => s.clone(),
        Value::Object(o) => [
            "command",
            "file_path",
            "path",
            "pattern",
            "query",
            "url",
            "description",
            "prompt",
        ]
        .iter()
        .find_map(|k| o.get(*k).and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| input.to_string()),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let detail: String = detail.split_whitespace().collect::<Vec<_>>().join(" ");
    let line = if detail.is_empty() {
        format!("› {name}")
    } else {
        format!("› {name}: {detail}")
    };
    head(&defuse_fences(&line), TOOL_LINE_MAX)
}

/// The "working…" message: agent (and model once known), time since the task started, the
/// last few tool uses and the tail of the latest agent text, within `limit`. `recent` are the
/// task's latest events in order (the caller keeps a window); `now_ms` is Unix milliseconds.
/// Triple backticks in agent output are defused so a half-shown code block cannot swallow
/// the message.
pub fn render_progress_at(task: &Task, recent: &[TaskEvent], limit: usize, now_ms: i64) -> String {
    if task.state.is_terminal() {
        return head(&ended_line(task), limit);
    }
    if matches!(
        task.state,
        TaskState::Queued | TaskState::Parked | TaskState::Offered
    ) {
        return head(&waiting_line(task), limit);
    }
    let mut model = task.model.clone();
    let mut tools: Vec<String> = Vec::new();
    let mut text = String::new();
    let mut last_was_text = false;
    for e in recent {
        match e.kind.as_str() {
            "text" => {
                let t = e.data["text"].as_str().unwrap_or_default();
                if e.data["delta"] == true && last_was_text {
                    text.push_str(t);
                } else if !t.trim().is_empty() {
                    text = t.to_owned();
                }
                last_was_text = true;
                continue;
            }
            "tool_use" => tools.push(tool_line(&e.data)),
            "session" if model.is_none() => {
                model = e.data["model"].as_str().map(str::to_owned);
            }
            "fallback" => {
                if let Some(to) = e.data["to"].as_str() {
                    model = Some(to.to_owned());
                }
            }
            _ => {}
        }
        last_was_text = false;
    }
    let start = task.started_at.unwrap_or(task.created_at);
    let elapsed = u64::try_from(now_ms - start).unwrap_or(0);
    let mut msg = format!("⏳ {}", task.agent);
    if let Some(m) = model {
        msg.push_str(&format!(" · {m}"));
    }
    // The question the agent waits on, from its `approval` event (the newest one of that id).
    let question = task.waiting_for_approval.as_ref().and_then(|id| {
        recent
            .iter()
            .rev()
            .filter(|e| e.kind == "approval" && e.data["id"].as_str() == Some(id))
            .find_map(|e| serde_json::from_value::<tunnel_protocol::Approval>(e.data.clone()).ok())
    });
    let state = match task.state {
        TaskState::Cancelling => "cancelling…",
        TaskState::Queued | TaskState::Offered | TaskState::Parked => "starting…",
        _ if task.waiting_for_approval.is_some() => "waiting for approval",
        _ => "working…",
    };
    msg.push_str(&format!(" · {state} {}", duration(elapsed)));
    if let Some(id) = &task.waiting_for_approval {
        let what = question
            .as_ref()
            .map(|a| head(&defuse_fences(a.tool.title.trim()), TOOL_LINE_MAX))
            .unwrap_or_else(|| "an action".into());
        msg.push_str(&format!(
            "\n🔐 asks: {what}\nAnswer: `/cc -approve {id} once|session|deny`"
        ));
    }
    let skip = tools.len().saturating_sub(PROGRESS_TOOLS);
    for t in &tools[skip..] {
        msg.push('\n');
        msg.push_str(t);
    }
    let text = text.trim();
    if !text.is_empty() {
        let room = limit.saturating_sub(text_len(&msg) + 2);
        if room >= 20 {
            msg.push_str("\n\n");
            msg.push_str(&tail(&defuse_fences(text), room));
        }
    }
    head(&msg, limit)
}
