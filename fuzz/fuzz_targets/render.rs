//! The chat messages made from a task (`render_final`, `render_progress_at`) with an agent's
//! answer, error, stderr and events taken from the input. Properties: never panics; every
//! final part and the progress message are within the platform limit (2000 and 4096, the
//! Discord and Telegram limits, and a small one) and leave no code fence open (a fence too
//! long to close and reopen within the limit is plain text).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use tunnel_delivery::{render_final, render_progress_at, text_len};
use tunnel_protocol::{Task, TaskEvent, TaskState};

#[path = "fences.rs"]
mod fences;
use fences::{fences_at_line_starts, open_at_end};

fuzz_target!(|data: &[u8]| {
    let [state, limit, rest @ ..] = data else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    // Up to four fields, separated by NUL: answer, error, stderr, a tool input.
    let mut fields = text.split('\0');
    let answer = fields.next().unwrap_or_default();
    let error = fields.next();
    let stderr = fields.next();
    let tool = fields.next().unwrap_or("ls");
    let state = TaskState::ALL[usize::from(*state) % TaskState::ALL.len()];
    let limit = [2000, 4096, 64][usize::from(*limit) % 3];
    let task: Task = serde_json::from_value(json!({
        "id": "0193a0b0-0000-7000-8000-000000000000",
        "agent": "claude",
        "prompt": "p",
        "session": "continue",
        "max_attempts": 1,
        "state": state,
        "attempt": 1,
        "cancel_requested": false,
        "created_at": 0,
        "updated_at": 1,
        "started_at": 1,
        "finished_at": 90_000,
        "result": {
            "text": answer,
            "error": error,
            "stderr_tail": stderr,
            "session_id": "0193a0b0-1111-7000-8000-000000000000",
            "usage": {"cost_usd": 0.0123, "model": "sonnet"},
        },
    }))
    .expect("a valid task");
    let balanced = fences_at_line_starts(&text);
    for part in render_final(&task, limit) {
        assert!(
            text_len(&part) <= limit,
            "a final part over {limit}: {part:?}"
        );
        assert!(
            !balanced || !open_at_end(&part, limit),
            "a final part leaves a fence open: {part:?}"
        );
    }
    let events: Vec<TaskEvent> = [
        (
            "tool_use",
            json!({"name": "Bash", "input": {"command": tool}}),
        ),
        ("text", json!({"text": answer})),
        ("tool_use", json!({"name": tool, "input": answer})),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (kind, data))| TaskEvent {
        seq: i as u64 + 1,
        attempt: 1,
        kind: kind.into(),
        data,
        at: 1,
    })
    .collect();
    let progress = render_progress_at(&task, &events, limit, 60_000);
    assert!(
        text_len(&progress) <= limit,
        "progress over {limit}: {progress:?}"
    );
    assert!(
        !balanced || !open_at_end(&progress, limit),
        "progress leaves a fence open: {progress:?}"
    );
});
