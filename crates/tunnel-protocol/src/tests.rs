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

#[test]
fn an_initialize_answer_is_kept_clean_and_bounded() {
    let init = serde_json::json!({
        "protocolVersion": 1,
        "agentCapabilities": {
            "loadSession": true,
            "promptCapabilities": {"image": true, "embeddedContext": false},
            "_meta": {"big": "x".repeat(10_000)},
            "sessionCapabilities": {"fork": {"_meta": 1}},
            "odd\u{1b}[2J": "a\u{7}b",
        },
        "agentInfo": {"name": "tiny\u{1b}]0;pwned\u{7}", "title": "", "version": "1.0"},
        "authMethods": [{"id": "login", "name": "Log in"}, {"name": "no id"}],
    });
    let c = AcpCapabilities::from_initialize(&init);
    assert_eq!(c.protocol_version, 1);
    assert!(c.flag(&["loadSession"]) && c.flag(&["promptCapabilities", "image"]));
    assert!(!c.flag(&["promptCapabilities", "embeddedContext"]));
    assert!(!c.flag(&["promptCapabilities", "audio"]));
    assert!(c.agent_capabilities.get("_meta").is_none());
    assert_eq!(
        c.agent_capabilities["sessionCapabilities"],
        serde_json::json!({"fork": {}})
    );
    assert_eq!(c.agent_capabilities["odd[2J"], "ab");
    let info = c.agent_info.as_ref().unwrap();
    assert_eq!(info.name, "tiny]0;pwned");
    assert_eq!(
        (info.title.as_deref(), info.version.as_deref()),
        (None, Some("1.0"))
    );
    assert_eq!(c.auth_methods.len(), 1);
    assert!(c.validate().is_ok());

    // A runner may only report its ACP agents, and not more than the bounds.
    let mut claim: ClaimRequest = serde_json::from_value(serde_json::json!({
        "runner": "r", "agents": ["tiny", "echo"], "acp_agents": ["tiny"]
    }))
    .unwrap();
    claim.acp_capabilities = Some([("tiny".to_owned(), c.clone())].into());
    assert!(claim.validate().is_ok());
    claim.acp_capabilities = Some([("echo".to_owned(), c.clone())].into());
    assert_eq!(claim.validate().unwrap_err().field, "acp_capabilities");
    let mut big = c.clone();
    big.agent_capabilities["x"] = serde_json::json!(vec!["y".repeat(150); 40]);
    let e = big.validate().unwrap_err();
    assert!(e.reason.contains("at most 4096"), "{e}");
    let mut bad = c.clone();
    bad.agent_capabilities["x"] = serde_json::json!("a\u{1b}b");
    assert!(bad.validate().unwrap_err().reason.contains("control"));
    let mut deep = serde_json::json!(true);
    for _ in 0..12 {
        deep = serde_json::json!({ "d": deep });
    }
    bad.agent_capabilities = deep;
    assert!(bad.validate().unwrap_err().reason.contains("nesting"));
    bad.agent_capabilities = serde_json::json!([1]);
    assert!(bad.validate().is_err());
    // Each agent within its bound, all of them not.
    let agents: Vec<String> = (0..8).map(|i| format!("a{i}")).collect();
    let mut each = c.clone();
    each.agent_capabilities["x"] = serde_json::json!(vec!["y".repeat(150); 20]);
    assert!(each.validate().is_ok());
    claim.agents = agents.clone();
    claim.acp_agents = agents.clone();
    claim.acp_capabilities = Some(agents.iter().map(|a| (a.clone(), each.clone())).collect());
    let e = claim.validate().unwrap_err();
    assert!(e.reason.contains("at most 16384"), "{e}");
}
