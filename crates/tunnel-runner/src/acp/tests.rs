use super::*;

fn opts() -> Vec<ApprovalOption> {
    options_of(&json!([
        {"optionId": "allow-once", "name": "Yes", "kind": "allow_once"},
        {"optionId": "always", "name": "Yes, always", "kind": "allow_always"},
        {"optionId": "reject", "name": "No", "kind": "reject_once"},
    ]))
}

#[test]
fn a_claude_request_becomes_a_question() {
    let tc = json!({
        "toolCallId": "toolu_1", "title": "echo hi >> y.txt", "kind": "execute",
        "rawInput": {"command": "echo hi >> y.txt", "description": "fake"},
        "locations": [{"path": "/w/y.txt"}, {"path": "/w/y.txt"}],
    });
    let t = tool_of(&tc);
    assert_eq!(t.kind, "execute");
    assert_eq!(t.command.as_deref(), Some("echo hi >> y.txt"));
    assert_eq!(t.paths, vec!["/w/y.txt"]);
    assert!(t.validate().is_ok());
}

#[test]
fn gemini_has_no_raw_input_so_the_title_is_the_command() {
    let t = tool_of(&json!({"toolCallId": "x", "title": "rm -rf build", "kind": "execute"}));
    assert_eq!(t.command.as_deref(), Some("rm -rf build"));
    let t = tool_of(&json!({"toolCallId": "x", "title": "Read a.txt", "kind": "read"}));
    assert_eq!(t.command, None);
}

#[test]
fn an_edit_shows_a_short_diff_and_bad_input_is_cleaned() {
    let tc = json!({
        "toolCallId": "e", "title": "Edit\u{1b}[2J a.rs\nnow", "kind": "Edit!",
        "content": [{"type": "diff", "path": "/w/a.rs", "oldText": "a\nb", "newText": "a\nc\u{7}"}],
        "rawInput": {"command": "x".repeat(10_000)},
    });
    let t = tool_of(&tc);
    assert_eq!(t.kind, "other", "an unknown kind is `other`");
    assert!(!t.title.chars().any(char::is_control), "{:?}", t.title);
    assert_eq!(t.paths, vec!["/w/a.rs"]);
    assert_eq!(
        t.diff.as_deref(),
        Some("--- /w/a.rs\n+++ /w/a.rs\n-a\n-b\n+a\n+c\n")
    );
    assert!(t.command.as_ref().unwrap().len() <= al::COMMAND_MAX);
    assert!(t.validate().is_ok(), "{:?}", t.validate());
    // No title at all still makes a question a person can read.
    assert_eq!(tool_of(&json!({"kind": "fetch"})).title, "fetch tool call");
}

#[test]
fn options_keep_only_what_can_be_sent_back() {
    let o = options_of(&json!([
        {"optionId": "a", "name": "A", "kind": "allow_once"},
        {"optionId": "b", "name": "B", "kind": "something_new"},
        {"optionId": "x".repeat(200), "name": "C", "kind": "reject_once"},
        {"optionId": "d", "kind": "reject_always"},
    ]));
    let ids: Vec<_> = o.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(ids, vec!["a", "d"]);
    assert_eq!(o[1].name, "d", "a missing name shows the id");
}

fn settled(state: ApprovalState, option_id: Option<&str>) -> Settled {
    Settled {
        state,
        decision: None,
        option_id: option_id.map(str::to_owned),
        message: None,
        by: "t".into(),
        approval_id: None,
    }
}

#[test]
fn what_the_agent_is_told() {
    let o = opts();
    let sel = |v: Value| v["outcome"]["optionId"].as_str().map(str::to_owned);
    assert_eq!(
        sel(permission_result(
            &settled(ApprovalState::Allowed, Some("always")),
            &o
        ))
        .as_deref(),
        Some("always")
    );
    // Expired or denied without an option: the agent's own reject, so it can tell the model.
    assert_eq!(
        sel(permission_result(
            &settled(ApprovalState::Expired, None),
            &o
        ))
        .as_deref(),
        Some("reject")
    );
    // A cancelled question is `cancelled`, whatever option came with it.
    let c = permission_result(&settled(ApprovalState::Cancelled, Some("always")), &o);
    assert_eq!(c["outcome"]["outcome"], "cancelled");
    // No reject option offered: cancelled.
    let only_allow = &o[..1];
    let c = permission_result(&settled(ApprovalState::Denied, None), only_allow);
    assert_eq!(c["outcome"]["outcome"], "cancelled");
}

fn chunk(kind: &str, text: &str) -> Value {
    json!({"sessionUpdate": kind, "content": {"type": "text", "text": text}})
}

#[test]
fn updates_become_structured_events() {
    let mut m = Mapper::default();
    assert!(m.update(&chunk("agent_thought_chunk", "hmm ")).is_empty());
    assert!(m.update(&chunk("agent_thought_chunk", "ok")).is_empty());
    let e = m.update(&chunk("agent_message_chunk", "I will "));
    assert_eq!(e, vec![ev("thought", json!({"text": "hmm ok"}))]);
    m.update(&chunk("agent_message_chunk", "run it"));
    let e = m.update(
        &json!({"sessionUpdate": "tool_call", "toolCallId": "c1", "title": "ls",
        "kind": "execute", "status": "pending", "rawInput": {}, "locations": [{"path": "/w"}]}),
    );
    assert_eq!(e[0], ev("text", json!({"text": "I will run it"})));
    assert_eq!(
        e[1],
        ev(
            "tool_call",
            json!({"id": "c1", "title": "ls", "kind": "execute", "status": "pending", "locations": ["/w"]})
        )
    );
    // An update carrying only adapter metadata says nothing: dropped.
    assert!(
        m.update(
            &json!({"sessionUpdate": "tool_call_update", "toolCallId": "c1", "_meta": {"x": 1}})
        )
        .is_empty()
    );
    let e = m.update(
        &json!({"sessionUpdate": "tool_call_update", "toolCallId": "c1",
        "status": "completed", "rawOutput": "a\nb"}),
    );
    assert_eq!(
        e,
        vec![ev(
            "tool_call_update",
            json!({"id": "c1", "status": "completed", "output": "a\nb"})
        )]
    );
    m.update(&json!({"sessionUpdate": "usage_update", "used": 19, "size": 1000}));
    assert!(
        m.update(&json!({"sessionUpdate": "available_commands_update", "availableCommands": []}))
            .is_empty()
    );
    m.update(&chunk("agent_message_chunk", "done: a"));
    let notice = json!({"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": "Warning"},
        "_meta": {"claudeCode": {"kind": "informational"}}});
    let e = m.update(&notice);
    assert_eq!(e[1], ev("log", json!({"line": "Warning"})));
    assert_eq!(m.flush(), vec![]);
    // The answer is the text after the last tool call, without the adapter's notice.
    assert_eq!(m.answer().as_deref(), Some("done: a"));
    let exit = Exit {
        code: Some(0),
        signal: None,
        stderr_tail: String::new(),
    };
    let Verdict::Succeeded(r) = m.verdict("end_turn", Some("s1".into()), &exit) else {
        panic!("end_turn succeeds");
    };
    assert_eq!(r.text.as_deref(), Some("done: a"));
    assert_eq!(r.usage.unwrap()["context"]["used"], 19);
}

#[test]
fn a_replayed_history_is_not_recorded_and_a_denial_explains_a_stop() {
    let mut m = Mapper {
        replaying: true,
        ..Default::default()
    };
    assert!(m.update(&chunk("agent_message_chunk", "old")).is_empty());
    m.replaying = false;
    assert_eq!(m.answer(), None);
    m.denied = Some("rm -rf build".into());
    let exit = Exit {
        code: None,
        signal: None,
        stderr_tail: String::new(),
    };
    let Verdict::Failed(r, Failure::Other(why)) = m.verdict("cancelled", None, &exit) else {
        panic!("a stop after a denial fails");
    };
    assert!(why.contains("denied request (rm -rf build)"), "{why}");
    assert_eq!(r.error.as_deref(), Some(why.as_str()));
}

#[test]
fn long_text_is_flushed_in_pieces() {
    let mut m = Mapper::default();
    let big = "x".repeat(CHUNK_FLUSH / 2 + 1);
    assert!(m.update(&chunk("agent_message_chunk", &big)).is_empty());
    let e = m.update(&chunk("agent_message_chunk", &big));
    assert_eq!(e.len(), 1);
    assert_eq!(m.answer().map(|a| a.len()), Some(big.len() * 2));
}

#[test]
fn a_flood_of_text_keeps_memory_bounded() {
    let mut m = Mapper::default();
    let piece = "y".repeat(64 << 10);
    for _ in 0..100 {
        m.update(&chunk("agent_message_chunk", &piece));
    }
    assert!(m.all.len() <= ANSWER_MAX && m.answer.len() <= ANSWER_MAX);
    assert!(m.answer().unwrap().ends_with('y'));
}
