//! Session bindings: the conversation continues its agent session, on the runner that has it.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::TestServer;

#[tokio::test]
async fn a_conversation_continues_its_session_on_the_same_runner() {
    let s = TestServer::start().await;
    s.submit(json!({"agent": "claude", "prompt": "first", "conversation": "discord:1"}))
        .await;
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    assert!(
        o["resume_session_id"].is_null(),
        "a new conversation starts fresh"
    );
    s.attempt_call(&o, "ack", json!({})).await;
    s.attempt_call(
        &o,
        "finish",
        json!({"outcome": "succeeded", "result": {"session_id": "5f1c-aaaa"}}),
    )
    .await;

    let second = s
        .submit(json!({"agent": "claude", "prompt": "second", "conversation": "discord:1"}))
        .await;
    assert!(
        s.claim("linux", &["claude"], 0).await.is_none(),
        "the session lives on mac"
    );
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    assert_eq!(o["task"]["id"], second["id"]);
    assert_eq!(o["resume_session_id"], "5f1c-aaaa");
    s.run_to_success(&o, "ok").await;

    let (st, list) = s
        .get("/v1/sessions?conversation=discord:1", &s.client)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["sessions"][0]["session_id"], "5f1c-aaaa");
    assert_eq!(list["sessions"][0]["runner"], "mac");
    assert_eq!(list["recent"][0]["session_id"], "5f1c-aaaa");

    // `new` (as a task option) starts fresh anywhere.
    s.submit(json!({"agent": "claude", "prompt": "fresh", "conversation": "discord:1", "session": "new"})).await;
    let o = s.claim("linux", &["claude"], 0).await.unwrap();
    assert!(o["resume_session_id"].is_null());
}

#[tokio::test]
async fn new_and_resume_commands_rebind_the_conversation() {
    let s = TestServer::start().await;
    let (st, b) = s
        .post(
            "/v1/sessions/resume",
            &s.client,
            json!({"conversation": "tg:42", "agent": "codex", "session_id": "019a-rollout"}),
        )
        .await;
    assert_eq!(
        (st, b["session_id"].as_str()),
        (StatusCode::OK, Some("019a-rollout"))
    );
    s.submit(json!({"agent": "codex", "prompt": "go on", "conversation": "tg:42"}))
        .await;
    let o = s.claim("any", &["codex"], 0).await.unwrap();
    assert_eq!(o["resume_session_id"], "019a-rollout");
    s.run_to_success(&o, "ok").await;

    let (st, b) = s
        .post(
            "/v1/sessions/new",
            &s.client,
            json!({"conversation": "tg:42", "agent": "codex"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert!(b["session_id"].is_null());
    s.submit(json!({"agent": "codex", "prompt": "fresh", "conversation": "tg:42"}))
        .await;
    let o = s.claim("any", &["codex"], 0).await.unwrap();
    assert!(o["resume_session_id"].is_null());

    let (st, _) = s
        .post(
            "/v1/sessions/resume",
            &s.client,
            json!({"conversation": "tg:42", "agent": "codex"}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "resume needs a session id");
    let (st, _) = s
        .post(
            "/v1/sessions/new",
            &s.client,
            json!({"conversation": "tg:42", "agent": "codex", "session_id": "x"}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "new takes no session id");
}

#[tokio::test]
async fn a_session_event_binds_before_the_task_ends() {
    let s = TestServer::start().await;
    s.submit(json!({"agent": "gemini", "prompt": "p", "conversation": "c"}))
        .await;
    let o = s.claim("r", &["gemini"], 0).await.unwrap();
    s.attempt_call(&o, "ack", json!({})).await;
    s.attempt_call(
        &o,
        "events",
        json!({"events": [{"n": 1, "kind": "session", "data": {"session_id": "g-123"}}]}),
    )
    .await;
    let (_, list) = s
        .get("/v1/sessions?conversation=c&agent=gemini", &s.client)
        .await;
    assert_eq!(list["sessions"][0]["session_id"], "g-123");
}

#[tokio::test]
async fn runners_are_listed_with_what_they_run() {
    let s = TestServer::start().await;
    s.post("/v1/claim", &s.runner, json!({"runner": "mac-mini", "agents": ["claude", "codex"], "projects": ["web"], "capacity": 3, "version": "0.1.0"}))
        .await;
    let (st, list) = s.get("/v1/runners", &s.client).await;
    assert_eq!(st, StatusCode::OK);
    let r = &list["runners"][0];
    assert_eq!(r["name"], "mac-mini");
    assert_eq!(r["agents"], json!(["claude", "codex"]));
    assert_eq!(r["projects"], json!(["web"]));
    assert_eq!(
        (r["capacity"].as_u64(), r["online"].as_bool()),
        (Some(3), Some(true))
    );
    s.clock.advance(10 * 60 * 1000);
    let (_, list) = s.get("/v1/runners", &s.client).await;
    assert_eq!(list["runners"][0]["online"], false);
}

#[tokio::test]
async fn tasks_for_a_project_go_to_runners_that_have_it() {
    let s = TestServer::start().await;
    s.submit(json!({"agent": "claude", "prompt": "p", "project": "api"}))
        .await;
    assert!(s.claim("r", &["claude"], 0).await.is_none());
    let (st, o) = s
        .post(
            "/v1/claim",
            &s.runner,
            json!({"runner": "r2", "agents": ["claude"], "projects": ["api"]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(o["task"]["project"], "api");
}
