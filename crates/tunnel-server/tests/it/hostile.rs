//! Issue #14: what a token holder can make the server hold. The event log of a task is
//! capped, reads of it are complete however long it is, and one token can park only so many
//! long-polls. (Connections without a token: `crates/tunnel/tests/it/hostile.rs`, against a
//! `tunnel serve` child with a small open-file limit.)

use reqwest::StatusCode;
use serde_json::{Value, json};
use tunnel_store::QueueSettings;

use crate::common::{Options, TestServer, id};

/// Appends `count` events of about `size` bytes each, numbered from `first`, in requests of
/// 1,000.
async fn append(s: &TestServer, offer: &Value, first: u64, count: u64, size: usize) -> Vec<Value> {
    let mut acks = Vec::new();
    let text = "x".repeat(size);
    let mut n = first;
    while n < first + count {
        let batch: Vec<Value> = (n..(first + count).min(n + 1000))
            .map(|n| json!({"n": n, "kind": "text", "data": {"text": text}}))
            .collect();
        n += batch.len() as u64;
        let (st, ack) = s
            .attempt_call(offer, "events", json!({ "events": batch }))
            .await;
        assert_eq!(st, StatusCode::OK, "{ack}");
        acks.push(ack);
    }
    acks
}

async fn json_log(s: &TestServer, task: &str) -> Value {
    let (st, log) = s
        .get(&format!("/v1/tasks/{task}/events?format=json"), &s.client)
        .await;
    assert_eq!(st, StatusCode::OK, "{log}");
    log
}

#[tokio::test]
async fn a_task_log_stops_at_its_cap_with_a_truncated_event_and_keeps_the_answer() {
    let s = TestServer::start_with(Options {
        queue: Some(QueueSettings {
            max_task_events: 500,
            max_task_event_bytes: 200_000,
            ..QueueSettings::default()
        }),
        ..Options::default()
    })
    .await;
    let t = s
        .submit(json!({"agent": "claude", "prompt": "talk a lot"}))
        .await;
    let offer = s.claim("r1", &["claude"], 0).await.unwrap();
    let (st, b) = s.attempt_call(&offer, "ack", json!({})).await;
    assert_eq!(st, StatusCode::OK, "{b}");

    // 3,000 events of ~1 KB: 3 MB attempted against a cap of 200 KB.
    let acks = append(&s, &offer, 1, 3000, 1000).await;
    // Every event is acknowledged (the runner must not resend what was dropped).
    let accepted: u64 = acks.iter().map(|a| a["accepted"].as_u64().unwrap()).sum();
    assert_eq!(accepted, 3000);
    // A runner cannot write the server's marker itself.
    let (st, b) = s
        .attempt_call(
            &offer,
            "events",
            json!({"events": [{"n": 5000, "kind": "truncated", "data": {}}]}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{b}");

    let task = s.run_to_success(&offer, "the final answer").await;
    assert_eq!(task["state"], "succeeded");
    assert_eq!(task["result"]["text"], "the final answer");
    let task = s.task(&id(&t)).await;
    assert_eq!(task["result"]["text"], "the final answer");

    let log = json_log(&s, &id(&t)).await;
    let events = log["events"].as_array().unwrap();
    let bytes: usize = events
        .iter()
        .map(|e| e["kind"].as_str().unwrap().len() + e["data"].to_string().len())
        .sum();
    assert!(bytes <= 200_000 + 1_000, "{bytes} bytes stored");
    let texts = events.iter().filter(|e| e["kind"] == "text").count();
    assert!((150..=200).contains(&texts), "{texts} text events kept");
    let marks: Vec<&Value> = events.iter().filter(|e| e["kind"] == "truncated").collect();
    assert_eq!(marks.len(), 1, "one truncated event: {marks:?}");
    assert!(
        marks[0]["data"]["message"]
            .as_str()
            .unwrap()
            .contains("log truncated"),
        "{}",
        marks[0]
    );
    // The server's own events still come after it: the log ends with the final state.
    let last = events.last().unwrap();
    assert_eq!(last["kind"], "state");
    assert_eq!(last["data"]["state"], "succeeded", "{last}");
    assert_eq!(log["state"], "succeeded");
}

#[tokio::test]
async fn a_json_read_returns_the_whole_log_however_long() {
    let s = TestServer::start().await;
    let t = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let offer = s.claim("r1", &["claude"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    // More than the 10,000 one read used to stop at, in pages of ~256 KB.
    append(&s, &offer, 1, 12_000, 100).await;
    s.run_to_success(&offer, "done").await;

    let log = json_log(&s, &id(&t)).await;
    let events = log["events"].as_array().unwrap();
    let texts = events.iter().filter(|e| e["kind"] == "text").count();
    assert_eq!(texts, 12_000);
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "seqs in order, none missing"
    );
    assert_eq!(log["state"], "succeeded");
    // With `after`, the rest of it.
    let (st, rest) = s
        .get(
            &format!(
                "/v1/tasks/{}/events?format=json&after={}",
                id(&t),
                seqs[11_000]
            ),
            &s.client,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(rest["events"][0]["seq"].as_u64().unwrap(), seqs[11_001]);
    assert_eq!(
        rest["events"].as_array().unwrap().len(),
        seqs.len() - 11_001
    );
}

/// Waits (polling /metrics) until `n` long-polls are parked.
async fn parked(s: &TestServer, n: usize) {
    let want = format!("tunnel_long_polls_parked {n}");
    for _ in 0..400 {
        let text = s
            .http
            .get(format!("{}/metrics", s.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.lines().any(|l| l == want) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("{n} long-polls never parked");
}

#[tokio::test]
async fn one_token_parks_only_so_many_long_polls() {
    let s = TestServer::start_with(Options {
        max_polls_per_token: Some(2),
        ..Options::default()
    })
    .await;
    let poll = |token: String, runner: &'static str| {
        let (http, url) = (s.http.clone(), s.url.clone());
        tokio::spawn(async move {
            http.post(format!("{url}/v1/claim"))
                .bearer_auth(token)
                .json(&json!({"runner": runner, "agents": ["claude"], "wait_ms": 30_000}))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let a = poll(s.runner.clone(), "a");
    let b = poll(s.runner.clone(), "b");
    parked(&s, 2).await;

    let (st, body) = s
        .post(
            "/v1/claim",
            &s.runner,
            json!({"runner": "c", "agents": ["claude"], "wait_ms": 30_000}),
        )
        .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "too_many_polls");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_polls_per_token"),
        "{body}"
    );
    // The original runner's poll with the same token is refused too (as a 401, which it
    // waits 10 s after).
    let resp = s
        .http
        .get(format!("{}/worker/poll?wait=1000", s.url))
        .bearer_auth(&s.runner)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Another token is not affected, and the parked ones still get work.
    let other = s.create_token("runner").await;
    let c = poll(other, "c");
    parked(&s, 3).await;
    for _ in 0..3 {
        s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    }
    for h in [a, b, c] {
        assert_eq!(h.await.unwrap(), StatusCode::OK);
    }
    // Their slots are free again.
    parked(&s, 0).await;
    assert!(s.claim("d", &["claude"], 0).await.is_none());
}
