//! What approval messages say: the question an agent asks (with how to answer it in text),
//! and the same message once settled.

use tunnel_protocol::{Approval, ApprovalState, Decision};

use crate::split::{defuse_fences, head, text_len};

/// Longest command or diff shown in a question, before the platform limit is considered.
const CODE_MAX: usize = 1500;

/// The tool's action in words, for the first line.
fn action(kind: &str) -> &'static str {
    match kind {
        "execute" => "run a command",
        "edit" => "edit files",
        "delete" => "delete files",
        "move" => "move files",
        "read" => "read files",
        "fetch" => "fetch from the network",
        "search" => "search",
        "switch_mode" => "switch modes",
        _ => "act",
    }
}

/// The body of the question shared by the question and its settled form: the title, the
/// command or diff in a code block, the paths. Code is cut to fit in `room` units.
fn body(a: &Approval, room: usize) -> String {
    let mut out = head(&defuse_fences(a.tool.title.trim()), 300);
    let code_room = room.saturating_sub(text_len(&out) + 40).min(CODE_MAX);
    if let Some(c) = &a.tool.command {
        out.push_str(&format!(
            "\n```\n{}\n```",
            head(&defuse_fences(c.trim_end()), code_room)
        ));
    } else if let Some(d) = &a.tool.diff {
        out.push_str(&format!(
            "\n```diff\n{}\n```",
            head(&defuse_fences(d.trim_end()), code_room)
        ));
    }
    if !a.tool.paths.is_empty() {
        let paths: Vec<String> = a
            .tool
            .paths
            .iter()
            .take(5)
            .map(|p| format!("`{}`", p.replace('`', "'")))
            .collect();
        let more = a.tool.paths.len().saturating_sub(5);
        out.push_str(&format!("\n{}", paths.join(", ")));
        if more > 0 {
            out.push_str(&format!(" and {more} more"));
        }
    }
    out
}

fn minutes(ms: i64) -> String {
    let m = (ms.max(0) + 59_999) / 60_000;
    if m >= 120 {
        format!("{} h", m / 60)
    } else {
        format!("{m} min")
    }
}

/// The question as posted to chat, within `limit`: who asks to do what, the command or diff,
/// the request id and the text commands that answer it.
pub fn render_approval(a: &Approval, limit: usize) -> String {
    let header = format!("🔐 {} asks to {}:", a.agent, action(&a.tool.kind));
    let footer = format!(
        "Answer: `/cc -approve {id} once` · `/cc -approve {id} session` · `/cc -approve {id} deny`\n\
         (or `tunnel approve {id}`; denied automatically in {})",
        minutes(a.expires_at - a.asked_at),
        id = a.id,
    );
    let room = limit.saturating_sub(text_len(&header) + text_len(&footer) + 4);
    head(&format!("{header}\n{}\n\n{footer}", body(a, room)), limit)
}

/// The first line of a settled request: how it ended and who said so.
pub fn approval_outcome_line(a: &Approval) -> String {
    let Some(o) = &a.outcome else {
        return "⏳ waiting for an answer".into();
    };
    match a.state {
        ApprovalState::Pending => "⏳ waiting for an answer".into(),
        ApprovalState::Allowed if o.decision == Some(Decision::AllowSession) => {
            format!("✅ allowed for the session by {}", o.by)
        }
        ApprovalState::Allowed => format!("✅ allowed once by {}", o.by),
        ApprovalState::Denied => match o.message.as_deref() {
            Some(m) => format!("🚫 denied by {}: {}", o.by, head(m.trim(), 300)),
            None => format!("🚫 denied by {}", o.by),
        },
        ApprovalState::Expired => "⏰ expired — denied".into(),
        ApprovalState::Cancelled => format!(
            "⏹️ cancelled ({})",
            o.message.as_deref().unwrap_or("the task ended")
        ),
    }
}

/// The question edited to its outcome, within `limit` (no answer commands any more).
pub fn render_approval_settled(a: &Approval, limit: usize) -> String {
    let header = format!("{} — {}:", approval_outcome_line(a), a.agent);
    let room = limit.saturating_sub(text_len(&header) + 2);
    head(&format!("{header}\n{}", body(a, room)), limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel_protocol::{ApprovalOption, ApprovalOptionKind, ApprovalOutcome, ApprovalTool};

    fn approval() -> Approval {
        Approval {
            id: "apr_0190b2d4-0000-7000-8000-000000000001".into(),
            task_id: "t".into(),
            attempt: 1,
            agent: "claude".into(),
            runner: Some("r1".into()),
            state: ApprovalState::Pending,
            tool: ApprovalTool {
                kind: "execute".into(),
                title: "Run rm -rf build".into(),
                command: Some("rm -rf build ```".into()),
                ..Default::default()
            },
            options: vec![ApprovalOption {
                id: "a".into(),
                name: "Allow".into(),
                kind: ApprovalOptionKind::AllowOnce,
            }],
            asked_at: 0,
            expires_at: 600_000,
            outcome: None,
        }
    }

    #[test]
    fn question_shows_command_id_and_how_to_answer() {
        let a = approval();
        let q = render_approval(&a, 2000);
        assert!(q.starts_with("🔐 claude asks to run a command:"), "{q}");
        assert!(
            q.contains("```\nrm -rf build `\u{200b}`\u{200b}`\n```"),
            "{q}"
        );
        assert!(q.contains(&format!("/cc -approve {} once", a.id)), "{q}");
        assert!(q.contains("in 10 min"), "{q}");
        // A huge command still fits a small platform limit with the answer line kept.
        let mut big = approval();
        big.tool.command = Some("x".repeat(4000));
        let q = render_approval(&big, 1000);
        assert!(text_len(&q) <= 1000 && q.contains("/cc -approve"), "{q}");
    }

    #[test]
    fn settled_says_how_and_by_whom() {
        let mut a = approval();
        a.state = ApprovalState::Denied;
        a.outcome = Some(ApprovalOutcome {
            decision: Some(Decision::Deny),
            option_id: Some("r".into()),
            message: Some("not that folder".into()),
            by: "alice via token plugin".into(),
            at: 1,
        });
        let s = render_approval_settled(&a, 2000);
        assert!(
            s.starts_with("🚫 denied by alice via token plugin: not that folder — claude:"),
            "{s}"
        );
        assert!(!s.contains("/cc -approve"), "{s}");
        a.state = ApprovalState::Expired;
        assert_eq!(approval_outcome_line(&a), "⏰ expired — denied");
        a.state = ApprovalState::Allowed;
        a.outcome.as_mut().unwrap().decision = Some(Decision::AllowSession);
        assert_eq!(
            approval_outcome_line(&a),
            "✅ allowed for the session by alice via token plugin"
        );
    }
}
