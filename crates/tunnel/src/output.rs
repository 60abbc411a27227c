//! What the CLI prints: short tables for people, JSON for scripts.

// The CLI's job is printing.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::Serialize;
use tunnel_protocol::{RunnerInfo, SessionList, Task, TaskEvent, TaskState, TokenInfo};

pub(crate) fn json<T: Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// "3s ago", "5m ago", "2h ago", "4d ago".
pub(crate) fn ago(ms: i64) -> String {
    let s = ((now_ms() - ms) / 1000).max(0);
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

pub(crate) fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// "queued, 2 ahead", "running on r1", "succeeded".
pub(crate) fn state_phrase(t: &Task) -> String {
    if t.state == TaskState::Running && t.waiting_for_approval.is_some() {
        return "waiting for approval".into();
    }
    match (t.state, &t.runner, t.queue_position) {
        (TaskState::Queued, _, Some(0)) => "queued, next".into(),
        (TaskState::Queued, _, Some(n)) => format!("queued, {n} ahead"),
        (TaskState::Offered | TaskState::Running | TaskState::Cancelling, Some(r), _) => {
            format!("{} on {r}", t.state)
        }
        (s, _, _) => s.to_string(),
    }
}

pub(crate) fn task_table(tasks: &[Task]) {
    if tasks.is_empty() {
        println!("no tasks");
        return;
    }
    println!(
        "{:<36}  {:<18}  {:<8}  {:<8}  PROMPT",
        "ID", "STATE", "AGENT", "AGE"
    );
    for t in tasks {
        println!(
            "{:<36}  {:<18}  {:<8}  {:<8}  {}",
            t.id,
            one_line(&state_phrase(t), 18),
            one_line(&t.agent, 8),
            ago(t.created_at),
            one_line(&t.prompt, 60)
        );
    }
}

pub(crate) fn task_detail(t: &Task) {
    println!("id:           {}", t.id);
    println!("state:        {}", state_phrase(t));
    println!("agent:        {}", t.agent);
    if let Some(c) = &t.conversation {
        println!("conversation: {c}");
    }
    if let Some(p) = &t.project {
        println!("project:      {p}");
    }
    if let Some(m) = &t.model {
        println!("model:        {m}");
    }
    println!(
        "attempt:      {} (of at most {})",
        t.attempt, t.max_attempts
    );
    println!("created:      {}", ago(t.created_at));
    if let Some(f) = t.finished_at {
        println!("finished:     {}", ago(f));
    }
    if let Some(r) = &t.reason {
        println!("reason:       {r}");
    }
    if let Some(a) = &t.approvals {
        println!("approvals:    {}", a.as_str());
    }
    if let Some(id) = &t.waiting_for_approval {
        println!("waiting for:  approval {id} (`tunnel approvals`, `tunnel approve {id}`)");
    }
    if let Some(d) = &t.delivery {
        let error = d
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        println!(
            "delivery:     {} after {} attempt(s){error}",
            d.state, d.attempts
        );
    }
    println!("prompt:       {}", one_line(&t.prompt, 200));
    if let Some(res) = &t.result {
        if let Some(sid) = &res.session_id {
            println!("session:      {sid}");
        }
        if let Some(e) = &res.error {
            println!("error:        {e}");
        }
        if let Some(text) = &res.text {
            println!("\n{text}");
        }
    }
}

pub(crate) fn sessions(list: &SessionList) {
    if list.sessions.is_empty() {
        println!("no conversations bound to a session");
    } else {
        println!(
            "{:<32}  {:<8}  {:<38}  RUNNER",
            "CONVERSATION", "AGENT", "SESSION"
        );
        for s in &list.sessions {
            println!(
                "{:<32}  {:<8}  {:<38}  {}",
                one_line(&s.conversation, 32),
                s.agent,
                s.session_id.as_deref().unwrap_or("(new)"),
                s.runner.as_deref().unwrap_or("-")
            );
        }
    }
    if !list.recent.is_empty() {
        println!("\nrecent sessions:");
        for r in &list.recent {
            println!(
                "  {:<8}  {:<38}  {:<12}  {}",
                r.agent,
                r.session_id,
                r.runner.as_deref().unwrap_or("-"),
                ago(r.last_used)
            );
        }
    }
}

pub(crate) fn runners(runners: &[RunnerInfo]) {
    if runners.is_empty() {
        println!("no runners have connected yet");
        return;
    }
    println!(
        "{:<20}  {:<7}  {:<6}  {:<10}  {:<24}  PROJECTS",
        "RUNNER", "STATUS", "TASKS", "SEEN", "AGENTS"
    );
    for r in runners {
        println!(
            "{:<20}  {:<7}  {:<6}  {:<10}  {:<24}  {}",
            r.name,
            if r.online { "online" } else { "offline" },
            format!("{}/{}", r.active_tasks, r.capacity),
            ago(r.last_seen),
            r.agents.join(","),
            r.projects.join(",")
        );
        for (agent, version) in &r.agent_versions {
            println!("{:<20}    {agent}: {version}", "");
        }
        if !r.acp_agents.is_empty() {
            println!(
                "{:<20}    over ACP (tunnel acp): {}",
                "",
                r.acp_agents.join(", ")
            );
        }
    }
}

pub(crate) fn tokens(tokens: &[TokenInfo]) {
    println!(
        "{:<14}  {:<7}  {:<10}  {:<10}  NAME",
        "ID", "ROLE", "CREATED", "STATUS"
    );
    for t in tokens {
        println!(
            "{:<14}  {:<7}  {:<10}  {:<10}  {}",
            t.id,
            // Role's Display ignores the width.
            t.role.to_string(),
            ago(t.created_at),
            if t.revoked_at.is_some() {
                "revoked"
            } else {
                "active"
            },
            t.name
        );
    }
}

/// Prints a task's events as they arrive: the agent's text on stdout, the rest on stderr.
pub(crate) struct EventPrinter {
    json: bool,
    saw_text: bool,
}

impl EventPrinter {
    pub(crate) fn new(json: bool) -> Self {
        EventPrinter {
            json,
            saw_text: false,
        }
    }

    pub(crate) fn print(&mut self, e: &TaskEvent) -> Result<()> {
        if self.json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, e)?;
            writeln!(out)?;
            return Ok(());
        }
        match e.kind.as_str() {
            "state" => {
                let state = e.data.get("state").and_then(|s| s.as_str()).unwrap_or("?");
                let extra = e
                    .data
                    .get("reason")
                    .or_else(|| e.data.get("runner"))
                    .and_then(|s| s.as_str())
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                eprintln!("[{state}{extra}]");
            }
            "text" => {
                let text = e
                    .data
                    .get("text")
                    .and_then(|t| t.as_str())
                    .unwrap_or_default();
                println!("{text}");
                self.saw_text = true;
            }
            "tool_use" => {
                let name = e
                    .data
                    .get("name")
                    .and_then(|t| t.as_str())
                    .unwrap_or("tool");
                eprintln!("→ {name}");
            }
            "approval" => crate::approvals::print_event(&e.data),
            other => eprintln!("[{other}] {}", one_line(&e.data.to_string(), 200)),
        }
        Ok(())
    }

    /// After the last event: the final answer if it was not streamed, and how it ended.
    pub(crate) fn finish(&mut self, t: &Task) -> Result<()> {
        if self.json {
            return Ok(());
        }
        if let Some(res) = &t.result {
            if !self.saw_text
                && let Some(text) = &res.text
            {
                println!("{text}");
            }
            if let Some(err) = &res.error {
                eprintln!("error: {err}");
            }
            if let Some(sid) = &res.session_id {
                eprintln!("session: {sid}");
            }
        }
        eprintln!("task {} {}", t.id, t.state);
        Ok(())
    }
}
