use super::*;

#[test]
fn names_never_look_like_options() {
    assert!(validate_name("agent", "claude").is_ok());
    assert!(validate_name("agent", "my-agent_2.0").is_ok());
    for bad in ["", "-p", "--model", "a b", "a/b", "ü", &"x".repeat(65)] {
        let err = validate_name("agent", bad).unwrap_err();
        assert_eq!(err.field, "agent", "{bad:?}");
    }
}

#[test]
fn session_mode_wire_format() {
    assert_eq!(
        serde_json::to_string(&SessionMode::New).unwrap(),
        r#""new""#
    );
    assert_eq!(
        serde_json::to_string(&SessionMode::Resume("abc".into())).unwrap(),
        r#"{"resume":"abc"}"#
    );
    let t: SubmitTask = serde_json::from_str(r#"{"agent":"claude","prompt":"hi"}"#).unwrap();
    assert_eq!(t.session, SessionMode::Continue);
    let t: SubmitTask =
        serde_json::from_str(r#"{"agent":"claude","prompt":"hi","session":{"resume":"s-1"}}"#)
            .unwrap();
    assert_eq!(t.session, SessionMode::Resume("s-1".into()));
}

#[test]
fn submit_rejects_unknown_fields_and_bad_values() {
    assert!(serde_json::from_str::<SubmitTask>(r#"{"agent":"a","prompt":"p","x":1}"#).is_err());
    let mut t = SubmitTask::new("claude", "  ");
    assert_eq!(t.validate().unwrap_err().field, "prompt");
    t.prompt = "do it".into();
    assert!(t.validate().is_ok());
    t.timeout_ms = Some(5);
    assert_eq!(t.validate().unwrap_err().field, "timeout_ms");
    t.timeout_ms = None;
    t.session = SessionMode::Resume("--resume".into());
    assert_eq!(t.validate().unwrap_err().field, "session.resume");
    t.session = SessionMode::New;
    t.reply_to = Some(ReplyTo {
        platform: Platform::Discord,
        channel: "../../users/@me".into(),
        thread: None,
        message: None,
    });
    assert_eq!(t.validate().unwrap_err().field, "reply_to.channel");
}

#[test]
fn finish_requires_not_before_exactly_when_parked() {
    let mut f = FinishRequest {
        attempt: 1,
        lease_token: "t".into(),
        outcome: Outcome::Parked,
        result: TaskResult::default(),
        not_before: None,
        events: vec![],
    };
    assert_eq!(f.validate().unwrap_err().field, "not_before");
    f.not_before = Some(10);
    assert!(f.validate().is_ok());
    f.outcome = Outcome::Succeeded;
    assert_eq!(f.validate().unwrap_err().field, "not_before");
}

#[test]
fn states_round_trip() {
    for s in TaskState::ALL {
        assert_eq!(TaskState::parse(s.as_str()), Some(s));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, format!("\"{}\"", s.as_str()));
    }
    assert_eq!(TaskState::parse("done"), None);
}

#[test]
fn meta_must_be_a_small_object() {
    let mut t = SubmitTask::new("claude", "p");
    t.meta = Some(serde_json::json!({"origin": "x"}));
    assert!(t.validate().is_ok());
    t.meta = Some(serde_json::json!("text"));
    assert_eq!(t.validate().unwrap_err().field, "meta");
    t.meta = Some(serde_json::json!({"big": "x".repeat(limits::META_MAX)}));
    assert_eq!(t.validate().unwrap_err().field, "meta");
}

/// Found by the `requests` fuzz target (fuzz/regressions/requests/): without serde_json's
/// `float_roundtrip`, this number parsed 1 ulp off, so an event's data changed between the
/// runner's request and what the server stored and served.
#[test]
fn numbers_in_event_data_round_trip_exactly() {
    let body = r#"{"attempt":9,"lease_token":"t","events":[{"n":8,"kind":".","data":[[9000000000000000000000000000000000000000000000000000143676128,"",[]]]}]}"#;
    let first: AppendEvents = serde_json::from_str(body).unwrap();
    let again: AppendEvents =
        serde_json::from_str(&serde_json::to_string(&first).unwrap()).unwrap();
    assert_eq!(first, again);
}

#[test]
fn a_claims_acp_agents_are_among_its_agents() {
    let mut c: ClaimRequest = serde_json::from_value(serde_json::json!({
        "runner": "r", "agents": ["claude", "tiny"], "acp_agents": ["tiny"]
    }))
    .unwrap();
    assert!(c.validate().is_ok());
    c.acp_agents = vec!["codex".into()];
    assert_eq!(c.validate().unwrap_err().field, "acp_agents");
    c.acp_agents = vec!["-x".into()];
    assert!(c.validate().is_err());
}

#[test]
fn one_line_flattens_whitespace_and_cuts_on_characters() {
    assert_eq!(one_line("fix\n  the\ttests ", 20), "fix the tests");
    assert_eq!(one_line("fix the tests", 13), "fix the tests");
    assert_eq!(one_line("fix the tests", 7), "fix th…");
    // Cut on characters, never inside one: 'é' is two bytes.
    assert_eq!(one_line("ééééé", 3), "éé…");
    assert_eq!(one_line("", 5), "");
}
