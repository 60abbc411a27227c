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

/// A raw HTTP/1.1 request on `c`; the answer's status line.
async fn raw_get(c: &mut tokio::net::TcpStream, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    // Enough of the answer for its status line and a short body.
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap()
        .to_owned()
}

/// Reads until the server closes `c`; how long that took.
async fn until_closed(c: &mut tokio::net::TcpStream) -> std::time::Duration {
    use tokio::io::AsyncReadExt;
    let t = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closed the connection");
    t.elapsed()
}

#[tokio::test]
async fn at_the_connection_cap_idle_connections_make_room_and_busy_ones_are_kept() {
    let s = TestServer::start_with(Options {
        connections: Some(tunnel_server::ConnectionLimits {
            max_connections: 4,
            header_timeout: std::time::Duration::from_secs(30),
            idle_timeout: std::time::Duration::from_secs(1),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let addr = s.url.trim_start_matches("http://").to_owned();
    let connect = || tokio::net::TcpStream::connect(addr.clone());

    // A keep-alive connection is closed once idle for the idle timeout.
    let mut kept = connect().await.unwrap();
    assert_eq!(raw_get(&mut kept, "/healthz").await, "HTTP/1.1 200 OK");
    let idle_for = until_closed(&mut kept).await;
    println!("an idle keep-alive connection was closed after {idle_for:?}");

    // Two parked polls (each on its own connection), the test's own keep-alive connection
    // (`parked` reads /metrics on it), and one connection that says nothing: the cap.
    let poll = |runner: &'static str| {
        let (url, token) = (s.url.clone(), s.runner.clone());
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{url}/v1/claim"))
                .bearer_auth(token)
                .json(&json!({"runner": runner, "agents": ["claude"], "wait_ms": 30_000}))
                .send()
                .await
                .map(|r| r.status())
        })
    };
    let a = poll("a");
    let b = poll("b");
    parked(&s, 2).await;
    let mut silent = connect().await.unwrap();
    // A new connection closes the silent one (not the keep-alive one) and is served.
    let mut fresh = connect().await.unwrap();
    until_closed(&mut silent).await;
    assert_eq!(raw_get(&mut fresh, "/healthz").await, "HTTP/1.1 200 OK");
    drop(fresh);
    parked(&s, 2).await;

    // Two event streams fill the places left (the second closes the idle keep-alive one):
    // every open connection has a request in flight, so a new one is answered 503.
    let t = s.submit(json!({"agent": "codex", "prompt": "p"})).await;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let resp = reqwest::Client::new()
            .get(format!("{}/v1/tasks/{}/events", s.url, id(&t)))
            .bearer_auth(&s.client)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        streams.push(resp);
    }
    let mut refused = connect().await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut refused, &mut answer),
    )
    .await
    .expect("the refused connection was closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too many open connections"), "{answer}");

    // A stream ends and frees a place: the next connection is served (polled: when the
    // server notices the closed socket is not observable), and the parked polls get work.
    drop(streams.pop());
    let mut submitted = 0;
    for _ in 0..400 {
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/tasks", s.url))
            .bearer_auth(&s.client)
            .json(&json!({"agent": "claude", "prompt": "q"}))
            .send()
            .await;
        match resp.map(|r| r.status()) {
            Ok(StatusCode::CREATED) => {
                submitted += 1;
                if submitted == 2 {
                    break;
                }
            }
            Ok(StatusCode::SERVICE_UNAVAILABLE) | Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(25)).await
            }
            Ok(other) => panic!("submit answered {other}"),
        }
    }
    assert_eq!(submitted, 2);
    for h in [a, b] {
        assert_eq!(h.await.unwrap().unwrap(), StatusCode::OK);
    }
}

#[tokio::test]
async fn a_request_head_sent_slowly_on_a_kept_alive_connection_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start_with(Options {
        connections: Some(tunnel_server::ConnectionLimits {
            header_timeout: std::time::Duration::from_secs(1),
            idle_timeout: std::time::Duration::from_secs(60),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let mut c = tokio::net::TcpStream::connect(s.url.trim_start_matches("http://"))
        .await
        .unwrap();
    assert_eq!(raw_get(&mut c, "/healthz").await, "HTTP/1.1 200 OK");
    // The next request's head starts and never ends: the header timeout applies, not the
    // (much longer) idle timeout.
    c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let took = until_closed(&mut c).await;
    println!("a half-sent head was cut off after {took:?}");
}
