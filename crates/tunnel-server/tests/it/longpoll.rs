//! Long-polls: woken by new work, ended by shutdown, harmless when their client leaves.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::common::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_claim_is_woken_by_a_submit() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let poller = {
        let s = s.clone();
        tokio::spawn(async move { s.claim("r1", &["claude"], 30_000).await })
    };
    // Let the poll park, then submit: the offer arrives long before the 30 s wait ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let task = s
        .submit(json!({"agent": "claude", "prompt": "wake up"}))
        .await;
    let offer = poller.await.unwrap().expect("woken with an offer");
    assert_eq!(offer["task"]["id"], task["id"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken by the submit, not by the timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_only_takes_agents_it_has() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let codex_poll = {
        let s = s.clone();
        tokio::spawn(async move { s.claim("codex-box", &["codex"], 2_000).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.submit(json!({"agent": "claude", "prompt": "not for codex"}))
        .await;
    assert!(codex_poll.await.unwrap().is_none());
    assert!(s.claim("claude-box", &["claude"], 0).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_whose_client_went_away_claims_nothing() {
    let s = TestServer::start().await;
    // A runner whose connection dies while parked (its HTTP client gives up after 300 ms).
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gone = impatient
        .post(format!("{}/v1/claim", s.url))
        .bearer_auth(&s.runner)
        .json(&json!({"runner": "dead", "agents": ["claude"], "wait_ms": 30_000}))
        .send()
        .await;
    assert!(gone.unwrap_err().is_timeout());
    // The server notices the closed socket and drops the parked poll (/metrics counts them).
    let parked = s.parked_polls_line_once_settled().await;
    assert_eq!(
        parked, "tunnel_long_polls_parked 0",
        "the dead poll was dropped"
    );

    let task = s
        .submit(json!({"agent": "claude", "prompt": "must not vanish"}))
        .await;
    let offer = s
        .claim("alive", &["claude"], 5_000)
        .await
        .expect("the task is still there");
    assert_eq!(offer["task"]["id"], task["id"]);
    assert_eq!(offer["attempt"], 1, "the dead poll never took it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_long_polls_and_waits_promptly() {
    let s = TestServer::start().await;
    let task = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let claim = s
        .http
        .post(format!("{}/v1/claim", s.url))
        .bearer_auth(&s.runner)
        .json(&json!({"runner": "r", "agents": ["codex"], "wait_ms": 60_000}))
        .send();
    let wait = s
        .http
        .get(format!(
            "{}/v1/tasks/{}?wait=60",
            s.url,
            task["id"].as_str().unwrap()
        ))
        .bearer_auth(&s.client)
        .send();
    let claim = tokio::spawn(claim);
    let wait = tokio::spawn(wait);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let token = s.shutdown_token();
    let stopping = tokio::spawn(s.stop());
    token.cancel();
    assert_eq!(
        claim.await.unwrap().unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(wait.await.unwrap().unwrap().status(), StatusCode::OK);
    stopping.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
