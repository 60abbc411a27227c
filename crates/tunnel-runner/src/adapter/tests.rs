//! Parsers against the output shapes each CLI really prints (agents-and-openclaw.md §3–5).

use std::path::Path;

use super::*;
use crate::config::AgentConfig;

fn run(kind: AgentKind, lines: &[&str], code: i32) -> (Vec<Ev>, Verdict) {
    let agent = AgentConfig::builtin(kind, "x");
    let mut p = parser(&agent);
    let mut events = Vec::new();
    for l in lines {
        events.extend(p.line(l));
    }
    let verdict = p.finish(&Exit {
        code: Some(code),
        signal: None,
        stderr_tail: String::new(),
    });
    (events, verdict)
}

fn kinds(events: &[Ev]) -> Vec<&str> {
    events.iter().map(|e| e.kind).collect()
}

#[test]
fn claude_success_with_a_tool_call() {
    let lines = [
        r#"{"type":"system","subtype":"init","session_id":"5f1c0000-0000-4000-8000-000000000001","cwd":"/repo","model":"claude-sonnet-4-6","tools":["Bash"]}"#,
        r#"{"type":"assistant","message":{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-6","content":[{"type":"text","text":"I'll run the tests."},{"type":"tool_use","id":"toolu_01","name":"Bash","input":{"command":"cargo test"}}],"stop_reason":null,"usage":{"input_tokens":10,"output_tokens":5}},"parent_tool_use_id":null,"session_id":"5f1c0000-0000-4000-8000-000000000001","uuid":"u1"}"#,
        r#"{"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_01","content":"test result: ok","is_error":false}]},"parent_tool_use_id":null,"session_id":"5f1c0000-0000-4000-8000-000000000001","uuid":"u2"}"#,
        "not json: a debug line",
        r#"{"type":"some_future_event","x":1}"#,
        r#"{"type":"result","subtype":"success","is_error":false,"duration_ms":41234,"duration_api_ms":30210,"num_turns":7,"result":"All tests pass now.","stop_reason":"end_turn","session_id":"5f1c0000-0000-4000-8000-000000000001","total_cost_usd":0.1832,"usage":{"input_tokens":10,"output_tokens":5}}"#,
    ];
    let (events, verdict) = run(AgentKind::Claude, &lines, 0);
    assert_eq!(
        kinds(&events),
        [
            "session",
            "text",
            "tool_use",
            "tool_result",
            "log",
            "agent",
            "usage"
        ]
    );
    assert_eq!(events[2].data["name"], "Bash");
    let Verdict::Succeeded(r) = verdict else {
        panic!("{verdict:?}")
    };
    assert_eq!(r.text.as_deref(), Some("All tests pass now."));
    assert_eq!(
        r.session_id.as_deref(),
        Some("5f1c0000-0000-4000-8000-000000000001")
    );
    assert_eq!(r.usage.unwrap()["cost_usd"], 0.1832);
}

#[test]
fn claude_api_errors_hide_behind_subtype_success() {
    let overloaded = r#"{"type":"result","subtype":"success","is_error":true,"duration_ms":10,"duration_api_ms":0,"num_turns":1,"result":"API Error: 529 Overloaded. This is a server-side issue, usually temporary — try again in a moment.","session_id":"s","api_error_status":529,"errors":[],"terminal_reason":"api_error"}"#;
    let (_, v) = run(AgentKind::Claude, &[overloaded], 1);
    assert!(
        matches!(v, Verdict::Failed(_, Failure::TryAnotherModel(_))),
        "{v:?}"
    );

    let limit = [
        r#"{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1900000000,"rateLimitType":"five_hour"},"uuid":"u","session_id":"s"}"#,
        r#"{"type":"result","subtype":"success","is_error":true,"duration_ms":10,"duration_api_ms":0,"num_turns":1,"result":"You've hit your limit · resets 1pm (Europe/Lisbon)","session_id":"s"}"#,
    ];
    let (_, v) = run(AgentKind::Claude, &limit, 1);
    assert_eq!(
        v,
        Verdict::Failed(
            TaskResult {
                error: Some("You've hit your limit · resets 1pm (Europe/Lisbon)".into()),
                exit_code: Some(1),
                session_id: Some("s".into()),
                ..Default::default()
            },
            Failure::UsageLimit {
                message: "You've hit your limit · resets 1pm (Europe/Lisbon)".into(),
                reset_at: Some(1_900_000_000_000)
            }
        )
    );

    let missing = r#"{"type":"result","subtype":"error_during_execution","is_error":true,"duration_ms":1,"duration_api_ms":0,"num_turns":0,"session_id":"s","errors":["No conversation found with session ID: abc"]}"#;
    let (_, v) = run(AgentKind::Claude, &[missing], 1);
    let Verdict::Failed(r, Failure::Other(_)) = v else {
        panic!("{v:?}")
    };
    assert_eq!(
        r.error.as_deref(),
        Some("No conversation found with session ID: abc")
    );
}

#[test]
fn claude_crash_without_result_is_a_failure_with_stderr() {
    let agent = AgentConfig::builtin(AgentKind::Claude, "x");
    let mut p = parser(&agent);
    p.line(r#"{"type":"system","subtype":"init","session_id":"s1"}"#);
    p.line(r#"{"type":"assist"#);
    let v = p.finish(&Exit {
        code: Some(2),
        signal: None,
        stderr_tail: "segfault".into(),
    });
    let Verdict::Failed(r, _) = v else { panic!() };
    assert!(r.error.unwrap().contains("exit code 2"));
    assert_eq!(r.stderr_tail.as_deref(), Some("segfault"));
    assert_eq!(r.session_id.as_deref(), Some("s1"));
}

#[test]
fn codex_success_and_usage_limit() {
    let lines = [
        r#"{"type":"thread.started","thread_id":"0199a213-81c0-7800-8aa1-bbab2a035a53"}"#,
        r#"{"type":"turn.started"}"#,
        r#"{"type":"item.completed","item":{"id":"item_0","type":"reasoning","text":"**Searching**"}}"#,
        r#"{"type":"item.started","item":{"id":"item_1","type":"command_execution","command":"bash -lc ls","aggregated_output":"","status":"in_progress"}}"#,
        r#"{"type":"item.completed","item":{"id":"item_1","type":"command_execution","command":"bash -lc ls","aggregated_output":"README.md\n","exit_code":0,"status":"completed"}}"#,
        r#"{"type":"item.completed","item":{"id":"item_2","type":"agent_message","text":"Yes — README.md is in the root."}}"#,
        r#"{"type":"turn.completed","usage":{"input_tokens":24763,"cached_input_tokens":24448,"output_tokens":122}}"#,
    ];
    let (events, v) = run(AgentKind::Codex, &lines, 0);
    assert_eq!(
        kinds(&events),
        ["session", "tool_use", "tool_result", "text", "usage"]
    );
    let Verdict::Succeeded(r) = v else {
        panic!("{v:?}")
    };
    assert_eq!(r.text.as_deref(), Some("Yes — README.md is in the root."));
    assert_eq!(
        r.session_id.as_deref(),
        Some("0199a213-81c0-7800-8aa1-bbab2a035a53")
    );

    let failed = [
        r#"{"type":"thread.started","thread_id":"t"}"#,
        r#"{"type":"error","message":"You've hit your usage limit. To get more access now, send a request to your admin or try again at 12:16 PM."}"#,
        r#"{"type":"turn.failed","error":{"message":"You've hit your usage limit. To get more access now, send a request to your admin or try again at 12:16 PM."}}"#,
    ];
    let (_, v) = run(AgentKind::Codex, &failed, 1);
    assert!(
        matches!(v, Verdict::Failed(_, Failure::UsageLimit { .. })),
        "{v:?}"
    );
}

#[test]
fn gemini_deltas_are_joined() {
    let lines = [
        r#"{"type":"init","timestamp":"2026-11-25T00:00:00Z","session_id":"g-1","model":"gemini-2.5-pro"}"#,
        r#"{"type":"message","timestamp":"t","role":"user","content":"hi"}"#,
        r#"{"type":"message","timestamp":"t","role":"assistant","content":"Hel","delta":true}"#,
        r#"{"type":"tool_use","timestamp":"t","tool_name":"run_shell_command","tool_id":"tool-1","parameters":{"command":"ls"}}"#,
        r#"{"type":"tool_result","timestamp":"t","tool_id":"tool-1","status":"success","output":"a\n"}"#,
        r#"{"type":"message","timestamp":"t","role":"assistant","content":"lo","delta":true}"#,
        r#"{"type":"result","timestamp":"t","status":"success","stats":{"total_tokens":5}}"#,
    ];
    let (events, v) = run(AgentKind::Gemini, &lines, 0);
    assert_eq!(
        kinds(&events),
        [
            "session",
            "text",
            "tool_use",
            "tool_result",
            "text",
            "usage"
        ]
    );
    let Verdict::Succeeded(r) = v else {
        panic!("{v:?}")
    };
    assert_eq!(r.text.as_deref(), Some("Hello"));

    let quota = [
        r#"{"type":"result","timestamp":"t","status":"error","error":{"type":"TerminalQuotaError","message":"[API Error: You exceeded your current quota, please check your plan and billing details. (Status: RESOURCE_EXHAUSTED)]"},"stats":{}}"#,
    ];
    let (_, v) = run(AgentKind::Gemini, &quota, 1);
    assert!(
        matches!(v, Verdict::Failed(_, Failure::UsageLimit { .. })),
        "{v:?}"
    );
}

#[test]
fn prompts_never_reach_argv_of_builtin_agents() {
    let input = InvocationInput {
        prompt: "--dangerously-skip-permissions; rm -rf /",
        model: Some("opus"),
        resume: Some("5f1c"),
        task_id: "t",
        project_dir: Path::new("/p"),
    };
    for kind in [AgentKind::Claude, AgentKind::Codex, AgentKind::Gemini] {
        let inv = invocation(&AgentConfig::builtin(kind, "bin"), &input);
        assert!(
            !inv.args.iter().any(|a| a.contains("rm -rf")),
            "{kind:?}: {:?}",
            inv.args
        );
        assert_eq!(inv.stdin.as_deref(), Some(input.prompt));
    }
    let codex = invocation(&AgentConfig::builtin(AgentKind::Codex, "codex"), &input);
    assert_eq!(
        codex.args,
        [
            "exec",
            "--json",
            "--skip-git-repo-check",
            "--sandbox",
            "workspace-write",
            "-m",
            "opus",
            "resume",
            "5f1c",
            "-"
        ]
    );
    let claude = invocation(&AgentConfig::builtin(AgentKind::Claude, "claude"), &input);
    assert_eq!(
        claude.args,
        [
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--model",
            "opus",
            "--resume",
            "5f1c",
            "--dangerously-skip-permissions"
        ]
    );
}

#[test]
fn custom_templates_substitute_whole_arguments() {
    let input = InvocationInput {
        prompt: "-n hi",
        model: None,
        resume: None,
        task_id: "t1",
        project_dir: Path::new("/p"),
    };
    let echo = invocation(&AgentConfig::echo(), &input);
    assert_eq!(echo.program, "printf");
    assert_eq!(
        echo.args,
        ["%s\\n", "-n hi"],
        "printf's format comes first, so the prompt is data"
    );
    assert_eq!(echo.stdin, None);

    let mut stdin_agent = AgentConfig::echo();
    stdin_agent.program = "cat".into();
    stdin_agent.command = vec![];
    let inv = invocation(&stdin_agent, &input);
    assert_eq!(inv.stdin.as_deref(), Some("-n hi"));
}

#[test]
fn custom_json_lines() {
    let mut agent = AgentConfig::echo();
    agent.output = OutputMode::JsonLines;
    let mut p = parser(&agent);
    let mut ev = Vec::new();
    for l in [
        r#"{"session_id":"c-1"}"#,
        r#"{"text":"step"}"#,
        r#"{"progress":50}"#,
        r#"{"result":"final"}"#,
    ] {
        ev.extend(p.line(l));
    }
    assert_eq!(kinds(&ev), ["session", "text", "agent"]);
    let v = p.finish(&Exit {
        code: Some(0),
        signal: None,
        stderr_tail: String::new(),
    });
    let Verdict::Succeeded(r) = v else { panic!() };
    assert_eq!(
        (r.text.as_deref(), r.session_id.as_deref()),
        (Some("final"), Some("c-1"))
    );
}

#[test]
fn classification() {
    assert!(matches!(
        classify("API Error: Rate limit reached", None),
        Failure::TryAnotherModel(_)
    ));
    assert!(matches!(
        classify("There's an issue with the selected model (x).", None),
        Failure::TryAnotherModel(_)
    ));
    assert!(matches!(
        classify("Quota exceeded. Check your plan and billing details.", None),
        Failure::UsageLimit { .. }
    ));
    assert!(matches!(
        classify("Invalid API key · Please run /login", None),
        Failure::Other(_)
    ));
}

#[test]
fn claude_as_root_explains_is_sandbox() {
    let agent = AgentConfig::builtin(AgentKind::Claude, "x");
    let mut p = parser(&agent);
    let stderr = "--dangerously-skip-permissions cannot be used with root/sudo privileges for security reasons";
    let v = p.finish(&Exit {
        code: Some(1),
        signal: None,
        stderr_tail: stderr.into(),
    });
    let Verdict::Failed(r, _) = v else { panic!() };
    assert!(r.error.unwrap().contains("IS_SANDBOX"));
}

/// Found by the `agent_output` fuzz target (fuzz/regressions/agent_output/): a session id the
/// server refuses (here with a U+FFFD from invalid UTF-8; an empty Codex `thread_id`) went
/// into the result, so the runner's finish was refused with 400 and retried forever, and the
/// task stayed running. Such ids are now ignored.
#[test]
fn session_ids_the_server_would_refuse_are_ignored() {
    let bad = "ea0682eb-8e4b-44ba-807d\u{fffd}-4f7c2677c601";
    let claude = [
        format!(r#"{{"type":"system","subtype":"init","session_id":"{bad}"}}"#),
        r#"{"type":"result","subtype":"success","is_error":false,"result":"ok"}"#.to_owned(),
    ];
    let codex = [
        r#"{"type":"thread.started"}"#.to_owned(),
        r#"{"type":"turn.completed","usage":{}}"#.to_owned(),
    ];
    let gemini = [
        r#"{"type":"init","session_id":"--help"}"#.to_owned(),
        r#"{"type":"result","status":"success"}"#.to_owned(),
    ];
    for (kind, lines) in [
        (AgentKind::Claude, &claude),
        (AgentKind::Codex, &codex),
        (AgentKind::Gemini, &gemini),
    ] {
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let (events, verdict) = run(kind, &lines, 0);
        assert!(!kinds(&events).contains(&"session"), "{kind:?}: {events:?}");
        let Verdict::Succeeded(r) = verdict else {
            panic!("{kind:?}: {verdict:?}")
        };
        assert_eq!(r.session_id, None, "{kind:?}");
    }
    let mut agent = AgentConfig::echo();
    agent.output = OutputMode::JsonLines;
    let mut p = parser(&agent);
    assert!(p.line(r#"{"session_id":"has space"}"#).is_empty());
    let v = p.finish(&Exit {
        code: Some(0),
        signal: None,
        stderr_tail: String::new(),
    });
    let Verdict::Succeeded(r) = v else { panic!() };
    assert_eq!(r.session_id, None);
}
