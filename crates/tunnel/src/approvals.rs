//! `tunnel approvals`, `tunnel approve`, and the inline question `tunnel watch` asks on a
//! terminal when the agent waits for an approval.

// The CLI's job is printing.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Result, bail};
use tunnel_client::{ApprovalQuery, Client, ClientError};
use tunnel_protocol::{Approval, ApprovalAnswer, ApprovalState, Decision, TaskEvent};

use crate::cli::{ApprovalsArgs, ApproveArgs};
use crate::commands::explain;
use crate::output::{self, err, out};

pub(crate) async fn list(client: &Client, args: ApprovalsArgs) -> Result<ExitCode> {
    let q = ApprovalQuery {
        state: (!args.all).then(|| "pending".to_owned()),
        task: args.task,
        limit: Some(args.limit),
    };
    let approvals = client.list_approvals(&q).await.map_err(explain)?;
    if args.client.json {
        output::json(&approvals)?;
    } else if approvals.is_empty() {
        out!(
            "{}",
            if args.all {
                "no approval requests"
            } else {
                "nothing waits for your approval"
            }
        );
    } else {
        table(&approvals);
    }
    Ok(ExitCode::SUCCESS)
}

/// What the request is about, on one line: the command if there is one, else the title.
fn what(a: &Approval) -> String {
    let s = a.tool.command.as_deref().unwrap_or(&a.tool.title);
    output::one_line(s, 60)
}

fn expires(a: &Approval) -> String {
    if a.state != ApprovalState::Pending {
        return a.state.to_string();
    }
    let left = (a.expires_at - output::now_ms()).max(0) / 1000;
    match left {
        0..60 => format!("in {left}s"),
        60..3600 => format!("in {}m", left / 60),
        _ => format!("in {}h", left / 3600),
    }
}

fn table(list: &[Approval]) {
    out!(
        "{:<40}  {:<8}  {:<8}  {:<8}  {:<8}  {:<10}  WHAT",
        "ID",
        "TASK",
        "AGENT",
        "KIND",
        "ASKED",
        "EXPIRES"
    );
    for a in list {
        out!(
            "{:<40}  {:<8}  {:<8}  {:<8}  {:<8}  {:<10}  {}",
            a.id,
            a.task_id.chars().take(8).collect::<String>(),
            output::one_line(&a.agent, 8),
            output::one_line(&a.tool.kind, 8),
            output::ago(a.asked_at),
            expires(a),
            what(a)
        );
    }
}

/// The name recorded beside the token's: `--by`, else the login name.
fn by(flag: Option<String>) -> Option<String> {
    flag.or_else(|| {
        std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty() && u.len() <= 64)
            .map(|u| format!("cli:{u}"))
    })
}

pub(crate) async fn approve(client: &Client, args: ApproveArgs) -> Result<ExitCode> {
    let (decision, message) = match (args.session, args.deny) {
        (true, _) => (Decision::AllowSession, None),
        (false, Some(m)) => (Decision::Deny, Some(m).filter(|m| !m.trim().is_empty())),
        (false, None) => (Decision::AllowOnce, None),
    };
    let answer = ApprovalAnswer {
        decision,
        message,
        by: by(args.by),
    };
    answer
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid answer: {e}"))?;
    let a = match client.answer_approval(&args.id, &answer).await {
        Ok(a) => a,
        Err(e) => bail!(refusal(&args.id, e)),
    };
    if args.client.json {
        output::json(&a)?;
    } else {
        out!("{}: {}", a.id, tunnel_delivery::approval_outcome_line(&a));
    }
    Ok(ExitCode::SUCCESS)
}

/// The server's refusal in words a person acts on.
fn refusal(id: &str, e: ClientError) -> anyhow::Error {
    match &e {
        ClientError::Api { status: 404, .. } => anyhow::anyhow!(
            "no approval request {id} (or it belongs to another token's task); see `tunnel approvals --all`"
        ),
        ClientError::Api {
            status: 409,
            message,
            ..
        } => anyhow::anyhow!("{message}"),
        ClientError::Api {
            status: 400,
            message,
            ..
        } => anyhow::anyhow!("{message}"),
        _ => explain(e),
    }
}

/// One `approval` event, as `tunnel watch` prints it (on stderr, like other non-text events).
pub(crate) fn print_event(data: &serde_json::Value) {
    let Ok(a) = serde_json::from_value::<Approval>(data.clone()) else {
        err!("[approval] {}", output::one_line(&data.to_string(), 200));
        return;
    };
    if a.state == ApprovalState::Pending {
        err!(
            "🔐 {} asks: {}",
            a.agent,
            output::one_line(&a.tool.title, 200)
        );
        if let Some(c) = &a.tool.command {
            err!("    $ {}", output::one_line(c, 400));
        }
        if let Some(d) = &a.tool.diff {
            for line in d.lines().take(20) {
                err!("    {line}");
            }
        }
        if !a.tool.paths.is_empty() {
            err!("    files: {}", a.tool.paths.join(", "));
        }
        err!("    request {}", a.id);
    } else {
        err!("[{}]", tunnel_delivery::approval_outcome_line(&a));
    }
}

/// The inline question of `tunnel watch`: on a terminal it asks and answers; elsewhere it says
/// how to answer with `tunnel approve`.
pub(crate) struct Prompt {
    tty: bool,
    /// Pending requests to ask about, oldest first; the first is the one being asked (an agent
    /// may ask several at once: parallel tool calls).
    queue: std::collections::VecDeque<Approval>,
    lines: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
}

const QUESTION: &str = "Allow? [y]es once / [s]ession / [n]o (n MESSAGE tells the agent why): ";

impl Prompt {
    pub(crate) fn new() -> Prompt {
        Prompt {
            tty: std::io::stdin().is_terminal() && std::io::stderr().is_terminal(),
            queue: std::collections::VecDeque::new(),
            lines: None,
        }
    }

    pub(crate) fn asking(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Asks about the first request waiting (repeating its title when it is not the one just
    /// printed).
    fn ask_next(&self, repeat: bool) {
        if let Some(a) = self.queue.front() {
            if repeat {
                err!(
                    "🔐 {} still asks: {} ({})",
                    a.agent,
                    output::one_line(&a.tool.title, 200),
                    a.id
                );
            }
            eprint!("{QUESTION}");
        }
    }

    /// The next line typed (`None` when stdin closed).
    pub(crate) async fn line(&mut self) -> Option<String> {
        match &mut self.lines {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    pub(crate) fn on_event(&mut self, e: &TaskEvent) {
        if e.kind != "approval" {
            return;
        }
        let Ok(a) = serde_json::from_value::<Approval>(e.data.clone()) else {
            return;
        };
        if a.state.is_final() {
            let was_first = self.queue.front().is_some_and(|q| q.id == a.id);
            self.queue.retain(|q| q.id != a.id);
            if was_first {
                self.ask_next(true);
            }
            return;
        }
        if !self.tty {
            err!(
                "    answer with: tunnel approve {id}  |  tunnel approve {id} --session  |  tunnel approve {id} --deny [MESSAGE]",
                id = a.id
            );
            return;
        }
        if self.lines.is_none() {
            // A thread, because reading a terminal blocks; it lives as long as the process.
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                while matches!(std::io::stdin().read_line(&mut line), Ok(n) if n > 0) {
                    if tx.send(std::mem::take(&mut line)).is_err() {
                        return;
                    }
                }
            });
            self.lines = Some(rx);
        }
        if self.queue.iter().any(|q| q.id == a.id) {
            return;
        }
        self.queue.push_back(a);
        if self.queue.len() == 1 {
            self.ask_next(false);
        } else {
            err!("    (asked next, after the question above)");
        }
    }

    /// Answers the request being asked about with what was typed.
    pub(crate) async fn answer(&mut self, client: &Client, line: Option<String>) {
        let Some(id) = self.queue.front().map(|a| a.id.clone()) else {
            return;
        };
        let Some(line) = line else {
            // stdin closed: stop asking, say how to answer instead.
            self.tty = false;
            for a in self.queue.drain(..) {
                err!(
                    "\n    answer with: tunnel approve {} [--session | --deny [MESSAGE]]",
                    a.id
                );
            }
            return;
        };
        let line = line.trim();
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let (decision, message) = match word.to_ascii_lowercase().as_str() {
            "y" | "yes" => (Decision::AllowOnce, None),
            "s" | "session" => (Decision::AllowSession, None),
            "n" | "no" => (
                Decision::Deny,
                Some(rest.trim().to_owned()).filter(|m| !m.is_empty()),
            ),
            _ => {
                eprint!("{QUESTION}");
                return;
            }
        };
        let answer = ApprovalAnswer {
            decision,
            message,
            by: by(None),
        };
        if let Err(e) = answer.validate() {
            err!("invalid answer: {e}");
            eprint!("{QUESTION}");
            return;
        }
        // Whatever the server says, this one is no longer ours to ask about.
        self.queue.pop_front();
        if let Err(e) = client.answer_approval(&id, &answer).await {
            err!("{}", refusal(&id, e));
        }
        self.ask_next(true);
    }
}
