//! Hostile load (issue #14): queue floods and the tenancy edges, through the real server.

use reqwest::StatusCode;
use serde_json::json;
use tunnel_store::QueueSettings;

use crate::common::{Options, TestServer, id};

#[tokio::test]
async fn a_token_beyond_its_queue_cap_gets_429_and_nothing_is_queued() {
    let s = TestServer::start_with(Options {
        queue: Some(QueueSettings {
            max_queued_per_token: Some(2),
            ..QueueSettings::default()
        }),
        ..Options::default()
    })
    .await;
    for i in 0..2 {
        s.submit(json!({"agent": "claude", "prompt": format!("p{i}")}))
            .await;
    }
    let (st, body) = s
        .post(
            "/v1/tasks",
            &s.client,
            json!({"agent": "claude", "prompt": "one too many"}),
        )
        .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "queue_full");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("2 tasks waiting"), "{msg}");
    let (_, list) = s.get("/v1/tasks?limit=10", &s.client).await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 2, "{list}");
    // Another token still submits; a claimed task frees a place.
    let other = s.create_token("client").await;
    let (st, _) = s
        .post("/v1/tasks", &other, json!({"agent": "claude", "prompt": "x"}))
        .await;
    assert_eq!(st, StatusCode::CREATED);
    s.claim("r", &["claude"], 0).await.unwrap();
    s.submit(json!({"agent": "claude", "prompt": "fits now"}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_no_runner_takes_ends_timed_out_after_the_maximum_time_in_queue() {
    let s = TestServer::start_with(Options {
        queue: Some(QueueSettings {
            max_queue_ms: Some(3_600_000),
            ..QueueSettings::default()
        }),
        ..Options::default()
    })
    .await;
    let old = id(&s
        .submit(json!({"agent": "gemini", "prompt": "no runner has gemini"}))
        .await);
    s.clock.advance(1_800_000);
    let young = id(&s
        .submit(json!({"agent": "gemini", "prompt": "younger"}))
        .await);
    s.clock.advance(1_800_000);
    let (_, t) = s.get(&format!("/v1/tasks/{old}?wait=10"), &s.client).await;
    assert_eq!(t["state"], "timed_out", "{t}");
    assert!(
        t["reason"]
            .as_str()
            .unwrap()
            .contains("no runner took it within the maximum time in queue (1 h)"),
        "{t}"
    );
    assert_eq!(s.task(&young).await["state"], "queued");
}

/// An admin's conversation is shared: a client may continue it, but not rebind it, move it to
/// another session, or come to own it.
#[tokio::test]
async fn a_client_cannot_take_over_a_conversation_an_admin_uses() {
    let s = TestServer::start().await;
    let (st, _) = s
        .post(
            "/v1/tasks",
            &s.admin,
            json!({"agent": "claude", "prompt": "admin's work", "conversation": "ops:1"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    s.attempt_call(&o, "ack", json!({})).await;
    s.attempt_call(
        &o,
        "finish",
        json!({"outcome": "succeeded", "result": {"session_id": "admin-sess"}}),
    )
    .await;
    // The client's own session, made in its own conversation.
    s.submit(json!({"agent": "claude", "prompt": "mine", "conversation": "mine:1"}))
        .await;
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    s.attempt_call(&o, "ack", json!({})).await;
    s.attempt_call(
        &o,
        "finish",
        json!({"outcome": "succeeded", "result": {"session_id": "client-sess"}}),
    )
    .await;

    let (st, b) = s
        .post(
            "/v1/sessions/resume",
            &s.client,
            json!({"conversation": "ops:1", "agent": "claude", "session_id": "client-sess"}),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{b}");
    let (st, b) = s
        .post(
            "/v1/sessions/new",
            &s.client,
            json!({"conversation": "ops:1", "agent": "claude"}),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{b}");
    let (st, b) = s
        .post(
            "/v1/tasks",
            &s.client,
            json!({"agent": "claude", "prompt": "switch", "conversation": "ops:1",
                   "session": {"resume": "client-sess"}}),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("shared"), "{b}");

    // Continuing it is fine, and leaves it shared.
    s.submit(json!({"agent": "claude", "prompt": "continue", "conversation": "ops:1"}))
        .await;
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    assert_eq!(o["resume_session_id"], "admin-sess");
    s.attempt_call(&o, "ack", json!({})).await;
    s.attempt_call(
        &o,
        "finish",
        json!({"outcome": "succeeded", "result": {"session_id": "admin-sess"}}),
    )
    .await;
    let (_, mine) = s
        .get("/v1/sessions?conversation=ops:1", &s.client)
        .await;
    assert!(
        mine["sessions"].as_array().unwrap().is_empty(),
        "the client came to own the admin's conversation: {mine}"
    );
    // The admin's next task still runs in the admin's session.
    s.post(
        "/v1/tasks",
        &s.admin,
        json!({"agent": "claude", "prompt": "admin again", "conversation": "ops:1"}),
    )
    .await;
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    assert_eq!(o["resume_session_id"], "admin-sess");
}
