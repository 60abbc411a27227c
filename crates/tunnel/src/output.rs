//! What the CLI prints: short tables for people, JSON for scripts.
//!
//! Human output goes through [`out!`] and [`err!`], which make control characters visible:
//! prompts, agent output and names come from other people's input, and a raw escape
//! sequence could rewrite the terminal (title, clipboard via OSC 52, hidden text). `--json`
//! prints the data unchanged (JSON escapes control characters itself).

// The CLI's job is printing.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::borrow::Cow;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::Serialize;
pub(crate) use tunnel_protocol::one_line;
use tunnel_protocol::{RunnerInfo, SessionList, Task, TaskEvent, TaskState, TokenInfo};

/// `println!` for people: control characters made visible ([`visible`]).
macro_rules! out {
    ($($arg:tt)*) => {
        println!("{}", $crate::output::visible(&format!($($arg)*)))
    };
}

/// `eprintln!` for people: control characters made visible ([`visible`]).
macro_rules! err {
    ($($arg:tt)*) => {
        eprintln!("{}", $crate::output::visible(&format!($($arg)*)))
    };
}

pub(crate) use {err, out};

/// `s` with every control character that a terminal would act on shown as an escape
/// (`\x1b`, `\u{9b}`, `\u{202e}`): C0 except newline and tab, DEL, C1, and the bidirectional
/// overrides that reorder what is shown. A carriage return before a newline is dropped
/// (Windows line ends), any other is shown.
pub(crate) fn visible(s: &str) -> Cow<'_, str> {
    let bad = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\r' && chars.peek() == Some(&'\n') {
            continue;
        }
        if !bad(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    Cow::Owned(out)
}

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
        out!("no tasks");
        return;
    }
    out!(
        "{:<36}  {:<18}  {:<8}  {:<8}  PROMPT",
        "ID",
        "STATE",
        "AGENT",
        "AGE"
    );
    for t in tasks {
        out!(
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
    out!("id:           {}", t.id);
    out!("state:        {}", state_phrase(t));
    out!("agent:        {}", t.agent);
    if let Some(c) = &t.conversation {
        out!("conversation: {c}");
    }
    if let Some(p) = &t.project {
        out!("project:      {p}");
    }
    if let Some(m) = &t.model {
        out!("model:        {m}");
    }
    if let Some(r) = &t.runner {
        out!("runner:       {r}");
    }
    out!(
        "attempt:      {} (of at most {})",
        t.attempt,
        t.max_attempts
    );
    out!("created:      {}", ago(t.created_at));
    if let Some(f) = t.finished_at {
        out!("finished:     {}", ago(f));
    }
    let res = t.result.as_ref();
    let ms = res.and_then(|r| r.duration_ms).or_else(|| {
        let start = t.started_at?;
        u64::try_from(t.finished_at.unwrap_or_else(now_ms) - start).ok()
    });
    if let Some(ms) = ms {
        let so_far = if t.finished_at.is_none() {
            " so far"
        } else {
            ""
        };
        out!("duration:     {}{so_far}", duration(ms));
    }
    if let Some(usd) = res
        .and_then(|r| r.usage.as_ref())
        .and_then(|u| u["cost_usd"].as_f64())
    {
        out!("cost:         {}", cost(usd));
    }
    if let Some(r) = &t.reason {
        out!("reason:       {r}");
    }
    if let Some(a) = &t.approvals {
        out!("approvals:    {}", a.as_str());
    }
    if let Some(id) = &t.waiting_for_approval {
        out!("waiting for:  approval {id} (`tunnel approvals`, `tunnel approve {id}`)");
    }
    if let Some(d) = &t.delivery {
        let error = d
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        out!(
            "delivery:     {} after {} attempt(s){error}",
            d.state,
            d.attempts
        );
    }
    out!("prompt:       {}", one_line(&t.prompt, 200));
    if let Some(res) = &t.result {
        if let Some(sid) = &res.session_id {
            out!("session:      {sid}");
        }
        if let Some(e) = &res.error {
            out!("error:        {e}");
        }
        if let Some(text) = &res.text {
            out!("\n{text}");
        }
    }
}

pub(crate) fn sessions(list: &SessionList) {
    if list.sessions.is_empty() {
        out!("no conversations bound to a session");
    } else {
        // Conversation names are scoped by owner; only an admin's listing has other tokens'
        // conversations, and then says whose each is ("admins": the admin tokens' own).
        let owners = list.sessions.iter().any(|s| s.owner.is_some());
        out!(
            "{:<32}  {:<8}  {:<38}  {:<12}{}",
            "CONVERSATION",
            "AGENT",
            "SESSION",
            "RUNNER",
            if owners { "  OWNER" } else { "" }
        );
        for s in &list.sessions {
            let owner = match (&s.owner, owners) {
                (_, false) => String::new(),
                (Some(o), true) => format!("  token {o}"),
                (None, true) => "  admins".into(),
            };
            out!(
                "{:<32}  {:<8}  {:<38}  {:<12}{}",
                one_line(&s.conversation, 32),
                s.agent,
                s.session_id.as_deref().unwrap_or("(new)"),
                s.runner.as_deref().unwrap_or("-"),
                owner
            );
        }
    }
    if !list.recent.is_empty() {
        out!("\nrecent sessions:");
        for r in &list.recent {
            out!(
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
        out!("no runners have connected yet");
        return;
    }
    out!(
        "{:<20}  {:<7}  {:<6}  {:<10}  {:<24}  PROJECTS",
        "RUNNER",
        "STATUS",
        "TASKS",
        "SEEN",
        "AGENTS"
    );
    for r in runners {
        out!(
            "{:<20}  {:<7}  {:<6}  {:<10}  {:<24}  {}",
            r.name,
            if r.online { "online" } else { "offline" },
            format!("{}/{}", r.active_tasks, r.capacity),
            ago(r.last_seen),
            r.agents.join(","),
            r.projects.join(",")
        );
        for (agent, version) in &r.agent_versions {
            out!("{:<20}    {agent}: {version}", "");
        }
        if !r.acp_agents.is_empty() {
            out!(
                "{:<20}    over ACP (tunnel acp): {}",
                "",
                r.acp_agents.join(", ")
            );
        }
        for (agent, caps) in &r.acp_capabilities {
            out!("{:<20}      {agent}: {}", "", acp_summary(caps));
        }
    }
}

/// One line of what an ACP agent answered to `initialize`: who it is, what its prompts take,
/// what it can do with sessions and MCP servers, how it logs in (on the runner's machine).
pub(crate) fn acp_summary(c: &tunnel_protocol::AcpCapabilities) -> String {
    let mut parts = Vec::new();
    if let Some(i) = &c.agent_info {
        let mut who = i.title.clone().unwrap_or_else(|| i.name.clone());
        if let Some(v) = &i.version {
            who = format!("{who} {v}");
        }
        parts.push(who);
    }
    if c.protocol_version != 1 {
        parts.push(format!("ACP v{}", c.protocol_version));
    }
    let mut prompt = vec!["text"];
    for (key, name) in [
        ("image", "image"),
        ("audio", "audio"),
        ("embeddedContext", "context"),
    ] {
        if c.flag(&["promptCapabilities", key]) {
            prompt.push(name);
        }
    }
    parts.push(format!("prompts: {}", prompt.join("+")));
    let mut session = Vec::new();
    if c.flag(&["loadSession"]) {
        session.push("load".to_owned());
    }
    if let Some(o) = c.agent_capabilities["sessionCapabilities"].as_object() {
        session.extend(o.keys().cloned());
    }
    if !session.is_empty() {
        parts.push(format!("sessions: {}", session.join("+")));
    }
    let mcp: Vec<&str> = ["http", "sse"]
        .into_iter()
        .filter(|k| c.flag(&["mcpCapabilities", k]))
        .collect();
    if !mcp.is_empty() {
        parts.push(format!("mcp: {}", mcp.join("+")));
    }
    if !c.auth_methods.is_empty() {
        let ids: Vec<&str> = c.auth_methods.iter().map(|m| m.id.as_str()).collect();
        parts.push(format!("login: {}", ids.join(", ")));
    }
    parts.join("; ")
}

pub(crate) fn tokens(tokens: &[TokenInfo]) {
    out!(
        "{:<14}  {:<7}  {:<10}  {:<10}  NAME",
        "ID",
        "ROLE",
        "CREATED",
        "STATUS"
    );
    for t in tokens {
        out!(
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

/// How `watch` shows events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    /// For people: the agent's text, one line per step, one final line.
    Human,
    /// Every event as `[kind] data`, untruncated.
    Verbose,
    /// One JSON object per event on stdout, nothing else.
    Json,
}

/// "4s", "2m 05s", "1h 03m".
pub(crate) fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// "$0.0123", "$1.20".
pub(crate) fn cost(usd: f64) -> String {
    if usd >= 0.1 {
        format!("${usd:.2}")
    } else {
        format!("${usd:.4}")
    }
}

/// A tool use on one line: its name and what it works on (the command, path, pattern …).
pub(crate) fn tool_line(data: &serde_json::Value) -> String {
    use serde_json::Value;
    let name = data["name"].as_str().unwrap_or("tool");
    let input = &data["input"];
    let detail = match input {
        Value::String(s) => s.clone(),
        Value::Object(o) => [
            "command",
            "cmd",
            "file_path",
            "path",
            "absolute_path",
            "pattern",
            "query",
            "url",
            "description",
        ]
        .iter()
        .find_map(|k| match o.get(*k) {
            Some(Value::String(s)) => Some(s.clone()),
            // Codex and ACP give argv arrays.
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => None,
        })
        .unwrap_or_else(|| input.to_string()),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let detail = one_line(&detail, 160);
    if detail.is_empty() || detail == "{}" {
        name.to_owned()
    } else {
        format!("{name}: {detail}")
    }
}

/// Prints a task's events as they arrive: the agent's text on stdout, the rest on stderr.
pub(crate) struct EventPrinter {
    style: Style,
    /// The task as it was when watching began: agent and project for "waiting for …".
    agent: String,
    project: Option<String>,
    saw_text: bool,
    /// Streamed text (deltas) left the cursor mid-line on stdout.
    mid_line: bool,
    /// When the current attempt started running (the `running` event's time).
    started: Option<i64>,
    model: Option<String>,
    cost_usd: Option<f64>,
    /// Messages already shown, so the end does not repeat them.
    shown_errors: Vec<String>,
}

impl EventPrinter {
    pub(crate) fn new(style: Style, task: &Task) -> Self {
        EventPrinter {
            style,
            agent: task.agent.clone(),
            project: task.project.clone(),
            saw_text: false,
            mid_line: false,
            started: task.started_at,
            model: task.model.clone(),
            cost_usd: None,
            shown_errors: Vec::new(),
        }
    }

    /// What a queued task waits for, in words.
    pub(crate) fn waiting_for(&self) -> String {
        match &self.project {
            Some(p) => format!("a runner offering agent {} with project {p}", self.agent),
            None => format!("a runner offering agent {}", self.agent),
        }
    }

    /// A line on stderr, after ending a half-printed line of streamed text.
    fn note(&mut self, line: &str) {
        if self.mid_line {
            println!();
            self.mid_line = false;
        }
        err!("{line}");
    }

    fn elapsed(&self, at: i64) -> String {
        match self.started {
            Some(s) => format!("{:>6}", duration(u64::try_from(at - s).unwrap_or(0))),
            None => format!("{:>6}", ""),
        }
    }

    pub(crate) fn print(&mut self, e: &TaskEvent) -> Result<()> {
        match self.style {
            Style::Json => {
                let mut out = std::io::stdout().lock();
                serde_json::to_writer(&mut out, e)?;
                writeln!(out)?;
                return Ok(());
            }
            Style::Verbose => {
                if e.kind == "text" {
                    self.text(e);
                } else if e.kind == "approval" {
                    crate::approvals::print_event(&e.data);
                } else {
                    self.note(&format!("[{}] {}", e.kind, e.data));
                }
                return Ok(());
            }
            Style::Human => {}
        }
        let d = &e.data;
        let s = |k: &str| d.get(k).and_then(|v| v.as_str());
        match e.kind.as_str() {
            "state" => match s("state").unwrap_or("?") {
                "queued" => {
                    let again = s("reason")
                        .map(|r| format!("queued again ({r}): "))
                        .unwrap_or_else(|| "queued: ".into());
                    let line = format!("{again}waiting for {}", self.waiting_for());
                    self.note(&line);
                }
                "running" => {
                    self.started = Some(e.at);
                    let on = s("runner").map(|r| format!(" on {r}")).unwrap_or_default();
                    let line = format!("running{on}");
                    self.note(&line);
                }
                "cancelling" => self.note("cancelling…"),
                "parked" => self.note("parked: waiting to retry"),
                // Offered is a moment; the end is said once, by `finish`.
                _ => {}
            },
            "text" => self.text(e),
            "tool_use" => {
                let line = format!("{} › {}", self.elapsed(e.at), tool_line(d));
                self.note(&line);
            }
            "tool_result" => {
                let failed = d["is_error"] == true
                    || d["status"].as_str().is_some_and(|s| s == "error")
                    || d["exit_code"].as_i64().is_some_and(|c| c != 0);
                if failed {
                    let out = one_line(s("output").unwrap_or_default(), 160);
                    let line = format!("{}   ✗ {out}", self.elapsed(e.at));
                    self.note(&line);
                }
            }
            "session" => {
                if let Some(m) = s("model") {
                    self.model = Some(m.to_owned());
                }
            }
            "usage" => {
                if let Some(c) = d["cost_usd"].as_f64() {
                    self.cost_usd = Some(c);
                }
            }
            "fallback" => {
                if let Some(to) = s("to") {
                    self.model = Some(to.to_owned());
                    let line = format!("{} ↻ falling back to model {to}", self.elapsed(e.at));
                    self.note(&line);
                }
            }
            "rate_limit" if s("status") == Some("rejected") => {
                self.note("rate limited by the agent's provider");
            }
            "error" => {
                if let Some(m) = s("message") {
                    self.shown(m);
                    let line = format!("error: {m}");
                    self.note(&line);
                }
            }
            "log" => {
                if let Some(l) = s("line").filter(|l| !l.trim().is_empty()) {
                    self.shown(l);
                    let line = format!("{}   {}", self.elapsed(e.at), one_line(l, 200));
                    self.note(&line);
                }
            }
            "approval" => {
                if self.mid_line {
                    println!();
                    self.mid_line = false;
                }
                crate::approvals::print_event(d);
            }
            // The rest (raw agent records, rate-limit notices that let the call through) is
            // for --verbose.
            _ => {}
        }
        Ok(())
    }

    /// Remembers a message shown live (the latest few), so the end does not repeat it.
    fn shown(&mut self, m: &str) {
        if self.shown_errors.len() >= 32 {
            self.shown_errors.remove(0);
        }
        self.shown_errors.push(m.trim().to_owned());
    }

    fn text(&mut self, e: &TaskEvent) {
        let text = e.data["text"].as_str().unwrap_or_default();
        if e.data["delta"] == true {
            // Streamed in pieces (Gemini): keep them on one line.
            print!("{}", visible(text));
            let _ = std::io::stdout().flush();
            self.mid_line = !text.ends_with('\n');
        } else {
            if self.mid_line {
                println!();
            }
            out!("{text}");
            self.mid_line = false;
        }
        self.saw_text = true;
    }

    /// After the last event: the final answer if it was not streamed, then one line saying
    /// how it ended (state, duration, model, cost, session).
    pub(crate) fn finish(&mut self, t: &Task) -> Result<()> {
        if self.style == Style::Json {
            return Ok(());
        }
        if self.mid_line {
            println!();
            self.mid_line = false;
        }
        let res = t.result.as_ref();
        if let Some(text) = res.and_then(|r| r.text.as_deref())
            && !self.saw_text
            && !text.trim().is_empty()
        {
            out!("{text}");
        }
        if t.state != TaskState::Succeeded {
            // The error once: the result's, else the reason, each unless already shown.
            let mut said: Vec<&str> = Vec::new();
            for m in [res.and_then(|r| r.error.as_deref()), t.reason.as_deref()]
                .into_iter()
                .flatten()
                .map(str::trim)
            {
                if m.is_empty()
                    || said.iter().any(|s| s.contains(m))
                    || self.shown_errors.iter().any(|s| s == m)
                {
                    continue;
                }
                err!("error: {m}");
                said.push(m);
            }
            // A cancelled agent's stderr is its reaction to being stopped: not news.
            if let Some(tail) = res
                .filter(|_| t.state != TaskState::Cancelled)
                .and_then(|r| r.stderr_tail.as_deref())
                .map(str::trim)
                .filter(|s| !s.is_empty())
                && !said.iter().any(|s| s.contains(tail))
            {
                let lines: Vec<&str> = tail.lines().collect();
                err!("stderr (last lines):");
                for l in &lines[lines.len().saturating_sub(5)..] {
                    err!("  {l}");
                }
            }
        }
        let mut parts = vec![format!("task {} {}", t.id, t.state)];
        let ms = res.and_then(|r| r.duration_ms).or_else(|| {
            let (start, end) = (t.started_at?, t.finished_at?);
            u64::try_from(end - start).ok()
        });
        if let Some(ms) = ms {
            parts.push(format!("in {}", duration(ms)));
        }
        let model = self.model.clone().or_else(|| {
            res.and_then(|r| r.usage.as_ref())
                .and_then(|u| u["model"].as_str())
                .map(str::to_owned)
        });
        if let Some(m) = model {
            parts.push(m);
        }
        let usd = res
            .and_then(|r| r.usage.as_ref())
            .and_then(|u| u["cost_usd"].as_f64())
            .or(self.cost_usd);
        if let Some(c) = usd {
            parts.push(cost(c));
        }
        if let Some(sid) = res.and_then(|r| r.session_id.as_deref()) {
            parts.push(format!("session {sid}"));
        }
        err!("{}", parts.join(" · "));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{tool_line, visible};

    #[test]
    fn control_characters_become_visible() {
        assert_eq!(visible("plain\ttext\nnext"), "plain\ttext\nnext");
        assert_eq!(visible("a\r\nb"), "a\nb");
        assert_eq!(
            visible("\u{1b}]52;c;eA==\u{7}x\rover"),
            "\\x1b]52;c;eA==\\x07x\\x0dover"
        );
        assert_eq!(
            visible("\u{9b}2J \u{202e}txt.exe"),
            "\\u{9b}2J \\u{202e}txt.exe"
        );
        assert_eq!(visible("\u{7f}"), "\\x7f");
    }

    #[test]
    fn tool_lines_name_what_the_tool_works_on() {
        let t = |v| tool_line(&serde_json::json!(v));
        assert_eq!(
            t(serde_json::json!({"name": "Bash", "input": {"command": "ls  -la\n src"}})),
            "Bash: ls -la src"
        );
        assert_eq!(
            t(serde_json::json!({"name": "shell", "input": {"command": ["bash", "-lc", "make"]}})),
            "shell: bash -lc make"
        );
        assert_eq!(
            t(serde_json::json!({"name": "Edit", "input": {"file_path": "/a/b.rs", "old": "x"}})),
            "Edit: /a/b.rs"
        );
        assert_eq!(
            t(serde_json::json!({"name": "TodoWrite", "input": {}})),
            "TodoWrite"
        );
    }
}
