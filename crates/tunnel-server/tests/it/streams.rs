//! The event stream (SSE) and `?wait=`.

use std::time::Duration;

use serde_json::json;

use crate::common::{TestServer, id};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_live_and_resumes_after_last_event_id() {
    let s = TestServer::start().await;
    let t = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let api = s.client_api();
    let mut stream = api.event_stream(&id(&t), 0).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!((first.seq, first.kind.as_str()), (1, "state"));

    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    s.attempt_call(
        &offer,
        "events",
        json!({"events": [{"n": 1, "kind": "text", "data": {"text": "live"}}]}),
    )
    .await;
    let mut seen = Vec::new();
    while seen
        .last()
        .map(|e: &tunnel_protocol::TaskEvent| e.kind.as_str())
        != Some("text")
    {
        seen.push(
            tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(seen.last().unwrap().data["text"], "live");
    let last_seq = seen.last().unwrap().seq;
    drop(stream);

    // Reconnect after the last seen event: only what came later, then the stream ends with the task.
    s.attempt_call(
        &offer,
        "events",
        json!({"events": [{"n": 2, "kind": "text", "data": {"text": "after"}}]}),
    )
    .await;
    s.attempt_call(&offer, "finish", json!({"outcome": "succeeded"}))
        .await;
    let mut stream = api.event_stream(&id(&t), last_seq).await.unwrap();
    let mut rest = Vec::new();
    while let Some(e) = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
    {
        rest.push(e.unwrap());
    }
    let kinds: Vec<_> = rest.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["text", "state"]);
    assert_eq!(rest[0].seq, last_seq + 1);
    assert_eq!(rest[1].data["state"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_with_wait_returns_when_the_task_ends() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let t = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let waiter = {
        let (s, tid) = (s.clone(), id(&t));
        tokio::spawn(async move { s.get(&format!("/v1/tasks/{tid}?wait=30"), &s.client).await })
    };
    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    s.run_to_success(&offer, "done").await;
    let (_, task) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(task["state"], "succeeded");
    assert_eq!(task["result"]["text"], "done");
}

#[tokio::test]
async fn wait_runs_out_with_the_current_state() {
    let s = TestServer::start().await;
    let t = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let (_, task) = s
        .get(&format!("/v1/tasks/{}?wait=0.2", id(&t)), &s.client)
        .await;
    assert_eq!(task["state"], "queued");
}
