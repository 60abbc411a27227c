use serde_json::json;
use tunnel_delivery::{render_final, render_progress, render_progress_at, split, text_len};
use tunnel_protocol::{Task, TaskEvent, TaskResult, TaskState};

/// Built from JSON so new optional fields of `Task` need no change here.
fn task(state: TaskState, result: Option<TaskResult>) -> Task {
    let mut t: Task = serde_json::from_value(json!({
        "id": "0199aa00-task",
        "agent": "claude",
        "prompt": "fix it",
        "conversation": "discord:123",
        "session": "continue",
        "max_attempts": 1,
        "state": "running",
        "attempt": 1,
        "runner": "mac",
        "cancel_requested": false,
        "created_at": 1_000_000,
        "updated_at": 1_000_000,
        "started_at": 1_000_000,
        "finished_at": 1_065_000,
    }))
    .unwrap();
    t.state = state;
    t.result = result;
    t
}

fn ev(seq: u64, kind: &str, data: serde_json::Value) -> TaskEvent {
    TaskEvent {
        seq,
        attempt: 1,
        kind: kind.into(),
        data,
        at: 1_000_000 + seq as i64,
    }
}

fn fences_balanced(c: &str) -> bool {
    c.lines()
        .filter(|l| l.trim_start().starts_with("```"))
        .count()
        % 2
        == 0
}

#[test]
fn final_answer_has_header_footer_and_splits_at_the_limit() {
    let mut text = String::from("Done. Here is the code:\n\n```rust\n");
    for i in 0..150 {
        text.push_str(&format!("fn f{i}() -> u32 {{ {i} }}\n"));
    }
    text.push_str("```\n\nThat's all.");
    let mut t = task(
        TaskState::Succeeded,
        Some(TaskResult {
            text: Some(text),
            exit_code: Some(0),
            session_id: Some("sess-abc-123".into()),
            usage: Some(json!({"cost_usd": 0.0421, "num_turns": 3})),
            duration_ms: Some(65_000),
            ..Default::default()
        }),
    );
    t.model = Some("opus".into());
    let chunks = render_final(&t, 2000);
    assert!(chunks.len() >= 2, "{chunks:#?}");
    let first = chunks[0].lines().next().unwrap();
    assert_eq!(first, "✅ claude · opus · 1m 05s · $0.0421");
    let last = chunks.last().unwrap();
    assert!(
        last.ends_with("task 0199aa00-task · session sess-abc-123 (resume: --resume sess-abc-123)"),
        "{last}"
    );
    for c in &chunks {
        assert!(text_len(c) <= 2000);
        assert!(fences_balanced(c), "{c}");
    }
    assert!(chunks.concat().contains("fn f149() -> u32 { 149 }"));
    // Telegram's larger limit: fewer chunks.
    assert!(render_final(&t, 4096).len() < chunks.len());
}

#[test]
fn a_failure_shows_the_error_and_the_stderr_tail_never_just_no_output() {
    let stderr: String = (0..200)
        .map(|i| format!("stderr line {i}: something ``` happened\n"))
        .collect();
    let t = task(
        TaskState::Failed,
        Some(TaskResult {
            exit_code: Some(1),
            error: Some("claude exited with code 1: API Error 401".into()),
            stderr_tail: Some(stderr),
            session_id: Some("s1".into()),
            ..Default::default()
        }),
    );
    let chunks = render_final(&t, 2000);
    let all = chunks.concat();
    assert!(
        chunks[0].starts_with("❌ claude · failed · 1m 05s"),
        "{}",
        chunks[0]
    );
    assert!(all.contains("claude exited with code 1: API Error 401"));
    assert!(all.contains("exit code 1"));
    assert!(all.contains("stderr:\n```\n"), "{all}");
    assert!(all.contains("stderr line 199"), "the tail, not the head");
    assert!(!all.contains("stderr line 0:"));
    assert!(!all.contains("(no output)"));
    for c in &chunks {
        assert!(text_len(c) <= 2000 && fences_balanced(c), "{c}");
    }

    // Lost, with nothing from the runner: still says what happened.
    let mut t = task(TaskState::Lost, None);
    t.reason = Some("lease expired: runner mac stopped heartbeating".into());
    let all = render_final(&t, 2000).concat();
    assert!(all.starts_with("⚠️ claude · lost"), "{all}");
    assert!(all.contains("lease expired"), "{all}");

    let t = task(TaskState::TimedOut, Some(TaskResult::default()));
    let all = render_final(&t, 2000).concat();
    assert!(all.contains("timed_out with no error message"), "{all}");
}

#[test]
fn a_success_without_text_says_so() {
    let t = task(TaskState::Succeeded, Some(TaskResult::default()));
    let all = render_final(&t, 2000).concat();
    assert!(all.contains("without a text answer"), "{all}");
}

#[test]
fn an_answer_with_an_unclosed_fence_keeps_the_footer_outside_it() {
    let t = task(
        TaskState::Succeeded,
        Some(TaskResult {
            text: Some("```py\nprint(1)".into()),
            session_id: Some("s".into()),
            ..Default::default()
        }),
    );
    let chunks = render_final(&t, 2000);
    assert_eq!(chunks.len(), 1);
    assert!(
        chunks[0].ends_with("```\n\ntask 0199aa00-task · session s (resume: --resume s)"),
        "{}",
        chunks[0]
    );
}

#[test]
fn progress_shows_agent_elapsed_tools_and_latest_text_within_the_limit() {
    let mut t = task(TaskState::Running, None);
    t.finished_at = None;
    let mut events = vec![ev(
        1,
        "session",
        json!({"session_id": "s", "model": "claude-opus-4"}),
    )];
    for i in 0..8 {
        events.push(ev(
            2 + i,
            "tool_use",
            json!({"name": "Bash", "id": format!("t{i}"), "input": {"command": format!("cargo test --test t{i}")}}),
        ));
    }
    events.push(ev(
        20,
        "text",
        json!({"text": "Looking at the failing test now. ```rust"}),
    ));
    let msg = render_progress_at(&t, &events, 2000, 1_072_000);
    let mut lines = msg.lines();
    assert_eq!(
        lines.next(),
        Some("⏳ claude · claude-opus-4 · working… 1m 12s")
    );
    assert!(
        !msg.contains("t2`") && !msg.contains("--test t2"),
        "only the last 5 tools: {msg}"
    );
    assert!(msg.contains("› Bash: cargo test --test t7"));
    assert!(msg.contains("› Bash: cargo test --test t3"));
    assert!(msg.contains("Looking at the failing test now."));
    assert!(!msg.contains("```"), "fences defused: {msg}");

    // A huge latest text keeps its end and fits.
    let long: String = (0..3000).map(|i| format!("w{i} ")).collect();
    events.push(ev(21, "text", json!({"text": long})));
    for limit in [2000, 4096, 300] {
        let msg = render_progress_at(&t, &events, limit, 1_072_000);
        assert!(text_len(&msg) <= limit, "{limit}: {}", text_len(&msg));
        assert!(msg.starts_with("⏳ claude"));
        assert!(msg.contains("w2999"), "the latest words");
    }
    // Gemini-style deltas join into one text.
    let deltas = vec![
        ev(1, "text", json!({"text": "Hel", "delta": true})),
        ev(2, "text", json!({"text": "lo there", "delta": true})),
    ];
    let msg = render_progress(&t, &deltas, 2000);
    assert!(msg.ends_with("\n\nHello there"), "{msg}");
    assert_eq!(split(&msg, 2000), vec![msg.clone()]);
}

/// Found by the `render` fuzz target (fuzz/regressions/render/): an error made of long
/// backtick runs rendered a 64-unit message with more than 64 units (a fence too long to
/// close and reopen within the limit).
#[test]
fn an_error_of_backtick_runs_stays_within_a_small_limit() {
    let error = "!``````````` ```````\u{5}```````````` ```````\u{5}```` \
                 ````````````````````````````````\n\nz\n<S\nJJ\nez\n\u{5}";
    let result = TaskResult {
        text: Some(String::new()),
        error: Some(error.into()),
        stderr_tail: Some(String::new()),
        session_id: Some("0193a0b0-1111-7000-8000-000000000000".into()),
        ..Default::default()
    };
    for state in TaskState::ALL {
        let t = task(state, Some(result.clone()));
        for part in render_final(&t, 64) {
            assert!(
                text_len(&part) <= 64,
                "{state}: {} units: {part:?}",
                text_len(&part)
            );
        }
    }
}

/// While the agent waits for a person, the progress message says so and shows the question
/// and how to answer it, not a silent "working…".
#[test]
fn progress_shows_the_pending_question() {
    let mut t = task(TaskState::Running, None);
    let id = "apr_0199aa00-0000-7000-8000-000000000001";
    t.waiting_for_approval = Some(id.into());
    let question = json!({
        "id": id, "task_id": t.id, "attempt": 1, "agent": "claude", "state": "pending",
        "tool": {"kind": "execute", "title": "Run rm -rf build ```", "command": "rm -rf build"},
        "options": [{"id": "a", "name": "Allow", "kind": "allow_once"}],
        "asked_at": 1_010_000, "expires_at": 1_610_000
    });
    let events = vec![
        ev(
            1,
            "tool_use",
            json!({"name": "Bash", "input": {"command": "ls"}}),
        ),
        ev(2, "approval", question),
    ];
    let msg = render_progress_at(&t, &events, 2000, 1_072_000);
    let mut lines = msg.lines();
    assert_eq!(
        lines.next(),
        Some("⏳ claude · waiting for approval 1m 12s"),
        "{msg}"
    );
    assert!(msg.contains("🔐 asks: Run rm -rf build"), "{msg}");
    assert!(
        msg.contains(&format!("`/cc -approve {id} once|session|deny`")),
        "{msg}"
    );
    assert!(!msg.contains("```"), "fences defused: {msg}");
    // Answered: back to working.
    t.waiting_for_approval = None;
    let msg = render_progress_at(&t, &events, 2000, 1_072_000);
    assert!(
        msg.starts_with("⏳ claude · working…") && !msg.contains("🔐"),
        "{msg}"
    );
}

/// Issue #18: the working message ends in one line with the outcome, and a task that waits
/// shows its acknowledgement, never a stale "working…".
#[test]
fn progress_of_a_waiting_or_ended_task_is_one_line() {
    let events = [ev(
        1,
        "tool_use",
        json!({"name": "Bash", "input": {"command": "sleep 6"}}),
    )];
    let ended = |state, result| render_progress_at(&task(state, result), &events, 2000, 1_072_000);
    let took = Some(TaskResult {
        duration_ms: Some(12_000),
        ..Default::default()
    });
    assert_eq!(
        ended(TaskState::Succeeded, took.clone()),
        "✅ claude · done in 12s — the answer follows"
    );
    assert_eq!(
        ended(TaskState::Failed, None),
        "❌ claude · failed after 1m 05s"
    );
    assert_eq!(
        ended(TaskState::Cancelled, None),
        "🛑 claude · cancelled after 1m 05s"
    );
    assert_eq!(
        ended(TaskState::TimedOut, took),
        "⏱️ claude · timed out after 12s"
    );
    assert_eq!(
        ended(TaskState::Lost, None),
        "⚠️ claude · lost after 1m 05s: its runner stopped answering"
    );
    let mut queued = task(TaskState::Queued, None);
    queued.queue_position = Some(2);
    assert_eq!(
        render_progress_at(&queued, &[], 2000, 1_001_000),
        "🕓 claude · queued — task 0199aa00, 2 ahead of it"
    );
    assert_eq!(
        render_progress_at(&task(TaskState::Offered, None), &[], 2000, 1_001_000),
        "⏳ claude · starting — task 0199aa00"
    );
}

/// Issue #18: a cancel says so once ("cancelled⏎cancelled⏎exit code 143" before).
#[test]
fn a_cancel_is_one_line() {
    let mut t = task(
        TaskState::Cancelled,
        Some(TaskResult {
            error: Some("cancelled; the agent was stopped".into()),
            exit_code: Some(143),
            stderr_tail: Some("Terminated".into()),
            ..Default::default()
        }),
    );
    t.reason = Some("cancelled".into());
    assert_eq!(
        render_final(&t, 2000),
        ["🛑 claude · cancelled after 1m 05s\n\ntask 0199aa00-task"]
    );
    t.reason = Some("cancelled; runner mac stopped responding before confirming".into());
    assert_eq!(
        render_final(&t, 2000)[0].lines().next().unwrap(),
        "🛑 claude · cancelled after 1m 05s (runner mac stopped responding before confirming)"
    );
}
