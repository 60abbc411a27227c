//! A server restart keeps queued and running tasks, their leases and the tokens.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{TestServer, id};

#[tokio::test]
async fn restart_keeps_tasks_leases_and_tokens() {
    let s = TestServer::start().await;
    let running = s
        .submit(json!({"agent": "claude", "prompt": "long job", "conversation": "c"}))
        .await;
    let queued = s
        .submit(json!({"agent": "claude", "prompt": "next", "conversation": "c"}))
        .await;
    let offer = s.claim("r1", &["claude"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    s.attempt_call(
        &offer,
        "events",
        json!({"events": [{"n": 1, "kind": "text", "data": {"text": "half"}}]}),
    )
    .await;

    let s = s.restart().await;

    // The running attempt carries on with the same lease token; nothing was re-queued.
    assert_eq!(s.task(&id(&running)).await["state"], "running");
    assert_eq!(s.task(&id(&queued)).await["state"], "queued");
    assert!(
        s.claim("r2", &["claude"], 0).await.is_none(),
        "no duplicate execution after restart"
    );
    let (st, _) = s.attempt_call(&offer, "heartbeat", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = s
        .attempt_call(&offer, "events", json!({"events": [{"n": 1, "kind": "text", "data": {}}, {"n": 2, "kind": "text", "data": {"text": "rest"}}]}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let done = s.run_to_success_after_restart(&offer).await;
    assert_eq!(done["state"], "succeeded");
    let next = s.claim("r1", &["claude"], 0).await.unwrap();
    assert_eq!(next["task"]["id"], queued["id"]);

    let (_, events) = s
        .get(
            &format!("/v1/tasks/{}/events?format=json", id(&running)),
            &s.client,
        )
        .await;
    let texts: Vec<_> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "text")
        .collect();
    assert_eq!(
        texts.len(),
        2,
        "the resent event n=1 was not stored twice: {events}"
    );
}

#[tokio::test]
async fn restart_keeps_the_lease_deadline() {
    let s = TestServer::start().await;
    let t = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let offer = s.claim("r1", &["claude"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    let s = s.restart().await;
    s.clock.advance(s.settings().lease_ms + 1);
    let (_, lost) = s
        .get(&format!("/v1/tasks/{}?wait=10", id(&t)), &s.client)
        .await;
    assert_eq!(
        lost["state"], "lost",
        "the new server's timer found the old lease"
    );
}

impl TestServer {
    async fn run_to_success_after_restart(&self, offer: &serde_json::Value) -> serde_json::Value {
        let (st, task) = self
            .attempt_call(offer, "finish", json!({"outcome": "succeeded"}))
            .await;
        assert_eq!(st, StatusCode::OK, "{task}");
        task
    }
}
