//! Agent adapters: how to start each CLI and how to read what it prints.
//!
//! The argv is built without a shell. For the built-in CLIs the prompt goes to stdin, so it can
//! never be read as an option, whatever it starts with (and a 1 MB prompt does not hit the
//! argv size limit). Each parser turns output lines into events and, at exit, a verdict.

use std::path::Path;

use serde_json::{Value, json};
use tunnel_protocol::TaskResult;

use crate::config::{AgentConfig, AgentKind, OutputMode};

/// What to spawn.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Invocation {
    pub(crate) program: String,
    pub(crate) args: Vec<String>,
    /// Written to stdin, which is then closed. `None`: stdin is /dev/null (unless `keep_stdin`).
    pub(crate) stdin: Option<String>,
    /// Leave stdin open as a pipe for the caller (an ACP agent reads requests from it).
    pub(crate) keep_stdin: bool,
}

pub(crate) struct InvocationInput<'a> {
    pub(crate) prompt: &'a str,
    pub(crate) model: Option<&'a str>,
    pub(crate) resume: Option<&'a str>,
    pub(crate) task_id: &'a str,
    pub(crate) project_dir: &'a Path,
}

pub(crate) fn invocation(agent: &AgentConfig, input: &InvocationInput<'_>) -> Invocation {
    let mut args: Vec<String> = Vec::new();
    let prompt = Some(input.prompt.to_owned());
    match agent.kind {
        AgentKind::Claude => {
            args.extend(["-p", "--output-format", "stream-json", "--verbose"].map(String::from));
            if let Some(m) = input.model {
                args.extend(["--model".into(), m.into()]);
            }
            if let Some(r) = input.resume {
                args.extend(["--resume".into(), r.into()]);
            }
            args.extend(agent.args.iter().cloned());
        }
        AgentKind::Codex => {
            args.extend(["exec", "--json", "--skip-git-repo-check"].map(String::from));
            args.extend(agent.args.iter().cloned());
            if let Some(m) = input.model {
                args.extend(["-m".into(), m.into()]);
            }
            if let Some(r) = input.resume {
                args.extend(["resume".into(), r.into()]);
            }
            // `-` reads the prompt from stdin.
            args.push("-".into());
        }
        AgentKind::Gemini => {
            args.extend(["-o", "stream-json", "--skip-trust"].map(String::from));
            args.extend(agent.args.iter().cloned());
            if let Some(m) = input.model {
                args.extend(["-m".into(), m.into()]);
            }
            if let Some(r) = input.resume {
                args.extend(["--resume".into(), r.into()]);
            }
        }
        AgentKind::Shell => {
            return Invocation {
                program: agent.program.clone(),
                args: vec!["-c".into(), input.prompt.to_owned()],
                stdin: None,
                keep_stdin: false,
            };
        }
        AgentKind::Files => unreachable!("file tasks run inside the runner, see files.rs"),
        AgentKind::Acp => unreachable!("ACP agents are driven by acp.rs"),
        AgentKind::Custom => {
            let mut used_prompt = false;
            for a in &agent.command {
                let v = match a.as_str() {
                    "{prompt}" => {
                        used_prompt = true;
                        input.prompt.to_owned()
                    }
                    "{model}" => input.model.unwrap_or_default().to_owned(),
                    "{session_id}" => input.resume.unwrap_or_default().to_owned(),
                    "{task_id}" => input.task_id.to_owned(),
                    "{project_dir}" => input.project_dir.display().to_string(),
                    other => other.to_owned(),
                };
                args.push(v);
            }
            return Invocation {
                program: agent.program.clone(),
                args,
                stdin: if used_prompt { None } else { prompt },
                keep_stdin: false,
            };
        }
    }
    Invocation {
        program: agent.program.clone(),
        args,
        stdin: prompt,
        keep_stdin: false,
    }
}

/// An event for the task's log.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ev {
    pub(crate) kind: &'static str,
    pub(crate) data: Value,
}

pub(crate) fn ev(kind: &'static str, data: Value) -> Ev {
    Ev { kind, data }
}

/// Why an agent run failed, as far as its output tells.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Failure {
    /// Worth another model: overloaded, rate limited, model unavailable.
    TryAnotherModel(String),
    /// A plan's usage limit: run again at this time (Unix ms) if known.
    UsageLimit {
        message: String,
        reset_at: Option<i64>,
    },
    /// Anything else.
    Other(String),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    Succeeded(TaskResult),
    Failed(TaskResult, Failure),
}

/// How the process ended.
#[derive(Debug, Clone)]
pub(crate) struct Exit {
    pub(crate) code: Option<i32>,
    pub(crate) signal: Option<i32>,
    pub(crate) stderr_tail: String,
}

impl Exit {
    pub(crate) fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "unknown exit".into(),
        }
    }
}

/// Reads one agent's output.
pub(crate) trait Parser: Send {
    fn line(&mut self, line: &str) -> Vec<Ev>;
    fn finish(&mut self, exit: &Exit) -> Verdict;
}

pub(crate) fn parser(agent: &AgentConfig) -> Box<dyn Parser> {
    match agent.kind {
        AgentKind::Claude => Box::<Claude>::default(),
        AgentKind::Codex => Box::<Codex>::default(),
        AgentKind::Gemini => Box::<Gemini>::default(),
        AgentKind::Custom | AgentKind::Shell | AgentKind::Files | AgentKind::Acp => {
            Box::new(Custom {
                mode: agent.output,
                ..Default::default()
            })
        }
    }
}

/// Longest text kept from one tool input or output in an event.
const SNIPPET: usize = 2_000;

pub(crate) fn snippet(s: &str) -> String {
    if s.len() <= SNIPPET {
        return s.to_owned();
    }
    let mut end = SNIPPET;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

pub(crate) fn snippet_value(v: &Value) -> Value {
    let text = v.to_string();
    if text.len() <= SNIPPET {
        v.clone()
    } else {
        Value::String(snippet(&text))
    }
}

/// A session id the agent printed, if the server would take it (`validate_session_id`): an id
/// it refuses would make the attempt's result impossible to report.
pub(crate) fn session_id(sid: Option<&str>) -> Option<&str> {
    sid.filter(|s| tunnel_protocol::validate_session_id("session_id", s).is_ok())
}

/// Non-JSON output lines are kept as log events, never fatal.
fn log_line(line: &str) -> Vec<Ev> {
    if line.trim().is_empty() {
        vec![]
    } else {
        vec![ev("log", json!({"line": snippet(line)}))]
    }
}

pub(crate) fn failure_result(error: String, exit: &Exit, session_id: Option<String>) -> TaskResult {
    TaskResult {
        error: Some(error),
        exit_code: exit.code,
        stderr_tail: (!exit.stderr_tail.is_empty()).then(|| exit.stderr_tail.clone()),
        session_id,
        ..Default::default()
    }
}

/// Sorts an error message into what the runner should do about it.
pub(crate) fn classify(message: &str, reset_at: Option<i64>) -> Failure {
    // A rejected rate-limit event with a reset time (Claude) is a usage limit, whatever the
    // wording ("hit your limit", "hit your 5-hour limit", …).
    if reset_at.is_some() {
        return Failure::UsageLimit {
            message: message.to_owned(),
            reset_at,
        };
    }
    let m = message.to_lowercase().replace('’', "'");
    let usage = [
        "hit your limit",
        "limit · resets",
        "usage_limit_reached",
        "exhausted your daily quota",
        "usage limit",
        "quota exceeded",
        "exceeded your current quota",
        "resource_exhausted",
        "purchase more credits",
    ];
    if usage.iter().any(|k| m.contains(k)) {
        return Failure::UsageLimit {
            message: message.to_owned(),
            reset_at,
        };
    }
    let retry = [
        "overloaded",
        "529",
        "rate limit",
        "rate_limit",
        "429",
        "issue with the selected model",
        "high demand",
        "resource has been exhausted",
        "model not found",
        "does not exist",
        "not supported",
        "unavailable",
    ];
    if retry.iter().any(|k| m.contains(k)) {
        return Failure::TryAnotherModel(message.to_owned());
    }
    Failure::Other(message.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Claude Code: `-p --output-format stream-json --verbose`

#[derive(Default)]
struct Claude {
    session_id: Option<String>,
    result: Option<Value>,
    reset_at: Option<i64>,
}

impl Parser for Claude {
    fn line(&mut self, line: &str) -> Vec<Ev> {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return log_line(line);
        };
        let mut out = Vec::new();
        if let Some(sid) = session_id(v["session_id"].as_str())
            && self.session_id.as_deref() != Some(sid)
        {
            self.session_id = Some(sid.to_owned());
            out.push(ev(
                "session",
                json!({"session_id": sid, "model": v["model"]}),
            ));
        }
        match v["type"].as_str().unwrap_or_default() {
            "system" => {}
            "assistant" => {
                for block in v["message"]["content"].as_array().into_iter().flatten() {
                    match block["type"].as_str().unwrap_or_default() {
                        "text" => out.push(ev("text", json!({"text": block["text"]}))),
                        "tool_use" => out.push(ev(
                            "tool_use",
                            json!({"name": block["name"], "id": block["id"], "input": snippet_value(&block["input"])}),
                        )),
                        _ => {}
                    }
                }
            }
            "user" => {
                for block in v["message"]["content"].as_array().into_iter().flatten() {
                    if block["type"] == "tool_result" {
                        let content = match &block["content"] {
                            Value::String(s) => snippet(s),
                            other => snippet(&other.to_string()),
                        };
                        out.push(ev(
                            "tool_result",
                            json!({"id": block["tool_use_id"], "is_error": block["is_error"], "output": content}),
                        ));
                    }
                }
            }
            "rate_limit_event" => {
                let info = &v["rate_limit_info"];
                if info["status"] == "rejected" {
                    self.reset_at = info["resetsAt"].as_i64().map(|s| s * 1000);
                }
                out.push(ev("rate_limit", info.clone()));
            }
            "result" => {
                out.push(ev(
                    "usage",
                    json!({"cost_usd": v["total_cost_usd"], "usage": v["usage"], "num_turns": v["num_turns"], "duration_ms": v["duration_ms"]}),
                ));
                self.result = Some(v);
            }
            _ => out.push(ev("agent", snippet_value(&v))),
        }
        out
    }

    fn finish(&mut self, exit: &Exit) -> Verdict {
        let sid = self.session_id.clone();
        let Some(r) = self.result.take() else {
            let message = if exit.stderr_tail.contains("root/sudo privileges") {
                // Claude refuses to skip permissions as root unless IS_SANDBOX is exactly 1.
                "claude refuses --dangerously-skip-permissions as root: set IS_SANDBOX = \"1\" in \
                 [runner.agents.claude] env (inside a sandbox), or run the runner as a normal user"
                    .to_owned()
            } else {
                format!("claude ended without a result ({})", exit.describe())
            };
            return Verdict::Failed(
                failure_result(message, exit, sid),
                Failure::Other("no result".into()),
            );
        };
        let text = r["result"].as_str().map(str::to_owned);
        // API failures arrive as subtype "success" with is_error: true; check is_error.
        if r["is_error"] == false && exit.code == Some(0) {
            return Verdict::Succeeded(TaskResult {
                text,
                exit_code: exit.code,
                session_id: sid,
                usage: Some(
                    json!({"cost_usd": r["total_cost_usd"], "usage": r["usage"], "num_turns": r["num_turns"]}),
                ),
                duration_ms: r["duration_ms"].as_u64(),
                ..Default::default()
            });
        }
        let errors: Vec<&str> = r["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let message = match (text.as_deref(), errors.is_empty()) {
            (Some(t), true) if !t.is_empty() => t.to_owned(),
            (_, false) => errors.join("; "),
            _ => format!("claude failed ({}, {})", r["subtype"], exit.describe()),
        };
        let class = if r["api_error"] == "usage_limit_reached" {
            Failure::UsageLimit {
                message: message.clone(),
                reset_at: self.reset_at,
            }
        } else if r["api_error_status"] == 529 {
            Failure::TryAnotherModel(message.clone())
        } else {
            classify(&message, self.reset_at)
        };
        Verdict::Failed(failure_result(message, exit, sid), class)
    }
}

// ---------------------------------------------------------------------------------------------
// Codex: `exec --json`

#[derive(Default)]
struct Codex {
    session_id: Option<String>,
    last_message: Option<String>,
    completed: bool,
    error: Option<String>,
    usage: Option<Value>,
}

impl Parser for Codex {
    fn line(&mut self, line: &str) -> Vec<Ev> {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return log_line(line);
        };
        let item = &v["item"];
        match v["type"].as_str().unwrap_or_default() {
            "thread.started" => match session_id(v["thread_id"].as_str()) {
                Some(sid) => {
                    self.session_id = Some(sid.to_owned());
                    vec![ev("session", json!({"session_id": sid}))]
                }
                None => vec![ev("agent", snippet_value(&v))],
            },
            "turn.started" => vec![],
            "turn.completed" => {
                self.completed = true;
                self.usage = Some(v["usage"].clone());
                vec![ev("usage", json!({"usage": v["usage"]}))]
            }
            "turn.failed" => {
                self.error = v["error"]["message"]
                    .as_str()
                    .map(str::to_owned)
                    .or(self.error.take());
                vec![]
            }
            "error" => {
                self.error = v["message"].as_str().map(str::to_owned);
                vec![ev("error", json!({"message": v["message"]}))]
            }
            "item.started" if item["type"] == "command_execution" => {
                vec![ev(
                    "tool_use",
                    json!({"name": "shell", "id": item["id"], "input": {"command": item["command"]}}),
                )]
            }
            "item.completed" => match item["type"].as_str().unwrap_or_default() {
                "agent_message" => {
                    let text = item["text"].as_str().unwrap_or_default().to_owned();
                    self.last_message = Some(text.clone());
                    vec![ev("text", json!({"text": text}))]
                }
                "command_execution" => vec![ev(
                    "tool_result",
                    json!({"id": item["id"], "exit_code": item["exit_code"], "output": snippet(item["aggregated_output"].as_str().unwrap_or_default())}),
                )],
                "file_change" => {
                    vec![ev(
                        "tool_use",
                        json!({"name": "file_change", "id": item["id"], "input": snippet_value(&item["changes"])}),
                    )]
                }
                "reasoning" => vec![],
                "error" => vec![ev("log", json!({"line": item["message"]}))],
                _ => vec![ev("agent", snippet_value(&v))],
            },
            "item.started" | "item.updated" => vec![],
            _ => vec![ev("agent", snippet_value(&v))],
        }
    }

    fn finish(&mut self, exit: &Exit) -> Verdict {
        let sid = self.session_id.clone();
        if self.completed && self.error.is_none() && exit.code == Some(0) {
            return Verdict::Succeeded(TaskResult {
                text: self.last_message.take(),
                exit_code: exit.code,
                session_id: sid,
                usage: self.usage.take().map(|u| json!({"usage": u})),
                ..Default::default()
            });
        }
        let message = self.error.take().unwrap_or_else(|| {
            format!(
                "codex ended without completing its turn ({})",
                exit.describe()
            )
        });
        let class = classify(&message, None);
        Verdict::Failed(failure_result(message, exit, sid), class)
    }
}

// ---------------------------------------------------------------------------------------------
// Gemini: `-o stream-json`

#[derive(Default)]
struct Gemini {
    session_id: Option<String>,
    text: String,
    status: Option<String>,
    error: Option<String>,
    stats: Option<Value>,
}

impl Parser for Gemini {
    fn line(&mut self, line: &str) -> Vec<Ev> {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return log_line(line);
        };
        match v["type"].as_str().unwrap_or_default() {
            "init" => match session_id(v["session_id"].as_str()) {
                Some(sid) => {
                    self.session_id = Some(sid.to_owned());
                    vec![ev(
                        "session",
                        json!({"session_id": sid, "model": v["model"]}),
                    )]
                }
                None => vec![ev("agent", snippet_value(&v))],
            },
            "message" if v["role"] == "assistant" => {
                let chunk = v["content"].as_str().unwrap_or_default();
                self.text.push_str(chunk);
                vec![ev("text", json!({"text": chunk, "delta": v["delta"]}))]
            }
            "message" => vec![],
            "tool_use" => vec![ev(
                "tool_use",
                json!({"name": v["tool_name"], "id": v["tool_id"], "input": snippet_value(&v["parameters"])}),
            )],
            "tool_result" => vec![ev(
                "tool_result",
                json!({"id": v["tool_id"], "status": v["status"], "output": snippet(v["output"].as_str().unwrap_or_default())}),
            )],
            "error" => vec![ev(
                "log",
                json!({"line": v["message"], "severity": v["severity"]}),
            )],
            "result" => {
                self.status = v["status"].as_str().map(str::to_owned);
                self.error = v["error"]["message"].as_str().map(str::to_owned);
                self.stats = Some(v["stats"].clone());
                vec![ev("usage", json!({"usage": v["stats"]}))]
            }
            _ => vec![ev("agent", snippet_value(&v))],
        }
    }

    fn finish(&mut self, exit: &Exit) -> Verdict {
        let sid = self.session_id.clone();
        if self.status.as_deref() == Some("success") && exit.code == Some(0) {
            return Verdict::Succeeded(TaskResult {
                text: Some(std::mem::take(&mut self.text)),
                exit_code: exit.code,
                session_id: sid,
                usage: self.stats.take().map(|s| json!({"usage": s})),
                ..Default::default()
            });
        }
        let message = self.error.take().unwrap_or_else(|| match exit.code {
            Some(55) => "gemini refused to run in an untrusted directory (exit 55)".into(),
            Some(41) => {
                "gemini is not authenticated (exit 41): set GEMINI_API_KEY or log in".into()
            }
            _ if !exit.stderr_tail.is_empty() => exit
                .stderr_tail
                .lines()
                .last()
                .unwrap_or_default()
                .to_owned(),
            _ => format!("gemini failed ({})", exit.describe()),
        });
        let class = match classify(&format!("{message} {}", exit.stderr_tail), None) {
            // Gemini exits with the HTTP status mod 256: 429 → 173, 500 → 244, 503 → 247.
            Failure::Other(m) if matches!(exit.code, Some(173 | 244 | 247)) => {
                Failure::TryAnotherModel(m)
            }
            other => other,
        };
        Verdict::Failed(failure_result(message, exit, sid), class)
    }
}

// ---------------------------------------------------------------------------------------------
// Custom agents

#[derive(Default)]
struct Custom {
    mode: OutputMode,
    text: String,
    result: Option<String>,
    session_id: Option<String>,
}

impl Parser for Custom {
    fn line(&mut self, line: &str) -> Vec<Ev> {
        match self.mode {
            OutputMode::Text => {
                self.text.push_str(line);
                self.text.push('\n');
                vec![ev("text", json!({"text": line}))]
            }
            OutputMode::JsonLines => {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    return log_line(line);
                };
                let mut out = Vec::new();
                if let Some(sid) = session_id(v["session_id"].as_str()) {
                    self.session_id = Some(sid.to_owned());
                    out.push(ev("session", json!({"session_id": sid})));
                }
                if let Some(t) = v["text"].as_str() {
                    self.text.push_str(t);
                    out.push(ev("text", json!({"text": t})));
                } else if let Some(r) = v["result"].as_str() {
                    self.result = Some(r.to_owned());
                } else if v.get("session_id").is_none() {
                    out.push(ev("agent", snippet_value(&v)));
                }
                out
            }
        }
    }

    fn finish(&mut self, exit: &Exit) -> Verdict {
        let text = self
            .result
            .take()
            .unwrap_or_else(|| self.text.trim_end().to_owned());
        let sid = self.session_id.clone();
        if exit.code == Some(0) {
            Verdict::Succeeded(TaskResult {
                text: Some(text),
                exit_code: exit.code,
                session_id: sid,
                ..Default::default()
            })
        } else {
            let message = format!("the agent failed ({})", exit.describe());
            let mut r = failure_result(message.clone(), exit, sid);
            r.text = (!text.is_empty()).then_some(text);
            Verdict::Failed(r, Failure::Other(message))
        }
    }
}

#[cfg(test)]
mod tests;
