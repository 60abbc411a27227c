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

/// Waits until `n` long-polls are parked (the `/metrics` line), at most 5 s.
async fn parked(s: &TestServer, n: usize) {
    let want = format!("tunnel_long_polls_parked {n}");
    for _ in 0..200 {
        let (_, m) = s
            .request(reqwest::Method::GET, "/metrics", None, None)
            .await;
        if m.as_str().unwrap().lines().any(|l| l == want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_parked_claims_for_different_agents_each_get_theirs() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let poll = |runner: &'static str, agent: &'static str| {
        let s = s.clone();
        tokio::spawn(async move { s.claim(runner, &[agent], 30_000).await })
    };
    let claude = poll("claude-box", "claude");
    parked(&s, 1).await;
    let codex = poll("codex-box", "codex");
    parked(&s, 2).await;
    // The second in line first: the first must not take it, nor be woken for nothing.
    let tc = s.submit(json!({"agent": "codex", "prompt": "c"})).await;
    let tl = s.submit(json!({"agent": "claude", "prompt": "l"})).await;
    let oc = codex.await.unwrap().expect("an offer");
    let ol = claude.await.unwrap().expect("an offer");
    assert_eq!(oc["task"]["id"], tc["id"]);
    assert_eq!(oc["task"]["runner"], "codex-box");
    assert_eq!(ol["task"]["id"], tl["id"]);
    assert_eq!(ol["task"]["runner"], "claude-box");
    for o in [&oc, &ol] {
        assert_eq!(o["attempt"], 1);
        s.run_to_success(o, "done").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_task_goes_to_its_runner_not_to_another_parked_first() {
    let s = std::sync::Arc::new(TestServer::start().await);
    // Conversation c's session lives on "home".
    s.submit(json!({"agent": "claude", "prompt": "a", "conversation": "c"}))
        .await;
    let a = s.claim("home", &["claude"], 0).await.unwrap();
    s.attempt_call(&a, "ack", json!({})).await;
    let (st, _) = s
        .attempt_call(
            &a,
            "finish",
            json!({"outcome": "succeeded", "result": {"text": "ok", "session_id": "s-1"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let other = {
        let s = s.clone();
        tokio::spawn(async move { s.claim("other", &["claude"], 1_500).await })
    };
    parked(&s, 1).await;
    let home = {
        let s = s.clone();
        tokio::spawn(async move { s.claim("home", &["claude"], 30_000).await })
    };
    parked(&s, 2).await;
    let b = s
        .submit(json!({"agent": "claude", "prompt": "b", "conversation": "c"}))
        .await;
    let ob = home.await.unwrap().expect("its home gets it");
    assert_eq!(ob["task"]["id"], b["id"]);
    assert_eq!(ob["resume_session_id"], "s-1");
    assert!(
        other.await.unwrap().is_none(),
        "the other runner gets nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_claimed_for_a_poll_that_hangs_up_is_offered_again() {
    let s = TestServer::start().await;
    // Runners whose connection dies about when the task comes. Whether the server claimed for
    // the poll or not, and whether the poll had gone before its answer left the server (the
    // offer is given back at once) or its answer was lost on the wire (its ack deadline gives
    // it back), the task is offered again and never lost.
    for i in 0..10u64 {
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(150 + 10 * i))
            .build()
            .unwrap();
        let url = format!("{}/v1/claim", s.url);
        let token = s.runner.clone();
        let gone = tokio::spawn(async move {
            impatient
                .post(url)
                .bearer_auth(token)
                .json(&json!({"runner": "dead", "agents": ["claude"], "wait_ms": 30_000}))
                .send()
                .await
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        let task = s
            .submit(json!({"agent": "claude", "prompt": format!("t{i}")}))
            .await;
        let answered = match gone.await.unwrap() {
            // Its time may run out while it reads the body, too.
            Ok(r) => r.json::<serde_json::Value>().await.ok(),
            Err(_) => None,
        };
        if let Some(offer) = answered {
            // It got the offer before it gave up: nothing was lost this round.
            assert_eq!(offer["task"]["id"], task["id"]);
            s.run_to_success(&offer, "done").await;
            continue;
        }
        let offer = match s.claim("alive", &["claude"], 1_000).await {
            Some(o) => o,
            None => {
                // Lost on the wire: the test clock stands still until moved.
                s.clock.advance(s.settings().ack_timeout_ms + 1);
                s.claim("alive", &["claude"], 5_000)
                    .await
                    .expect("the task is offered again")
            }
        };
        assert_eq!(offer["task"]["id"], task["id"]);
        s.run_to_success(&offer, "done").await;
    }
}

/// One HTTP/1.1 answer read off a raw connection: its head (status line and headers, as
/// sent) and body. `leftover` keeps what came after it.
async fn raw_answer(c: &mut tokio::net::TcpStream, leftover: &mut Vec<u8>) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = leftover.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(20), c.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed before answering");
        leftover.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(leftover[..head_end].to_vec()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    while leftover.len() < head_end + length {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed in the body");
        leftover.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8(leftover[head_end..head_end + length].to_vec()).unwrap();
    leftover.drain(..head_end + length);
    (head, body)
}

fn raw_claim(token: &str, runner: &str, wait_ms: u64, extra_headers: &str) -> Vec<u8> {
    let body = json!({"runner": runner, "agents": ["claude"], "wait_ms": wait_ms}).to_string();
    format!(
        "POST /v1/claim HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\n{extra_headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The parked long-polls wait outside hyper (`serve.rs`, the front): on one kept-alive
/// connection, pipelined requests around claims are each answered in order, a parked claim is
/// woken with its offer, and the answers are hyper's (status line, `date`, lengths).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_other_requests_share_a_kept_alive_connection_pipelined() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start().await;
    let mut c = tokio::net::TcpStream::connect(s.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let mut rest = Vec::new();
    // Three requests in one write: a claim that waits 200 ms, a health check behind it, and a
    // claim with a bad token.
    let mut burst = raw_claim(&s.runner, "raw", 200, "");
    burst.extend_from_slice(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
    burst.extend_from_slice(&raw_claim("nope", "raw", 0, ""));
    c.write_all(&burst).await.unwrap();
    let (head, body) = raw_answer(&mut c, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 204 No Content\r\n"), "{head}");
    assert!(head.contains("\r\ndate: "), "{head}");
    assert_eq!(body, "");
    let (head, _) = raw_answer(&mut c, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let (head, body) = raw_answer(&mut c, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
    assert!(
        head.contains("\r\ncontent-type: application/json\r\n"),
        "{head}"
    );
    assert!(body.contains("\"error\""), "{body}");

    // Parked on the same connection, woken by a submit.
    c.write_all(&raw_claim(&s.runner, "raw", 30_000, ""))
        .await
        .unwrap();
    parked(&s, 1).await;
    let task = s.submit(json!({"agent": "claude", "prompt": "raw"})).await;
    let (head, body) = raw_answer(&mut c, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let offer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(offer["task"]["id"], task["id"]);
    // And its ack on the same connection, through hyper again.
    let ack = json!({"attempt": offer["attempt"], "lease_token": offer["lease_token"]}).to_string();
    c.write_all(
        format!(
            "POST /v1/tasks/{}/ack HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ack}",
            offer["task"]["id"].as_str().unwrap(),
            s.runner,
            ack.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (head, body) = raw_answer(&mut c, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head} {body}");
    assert!(rest.is_empty());
}

/// Ordinary requests one after another on a kept-alive connection (one hyper connection
/// serves the run of them, `Front::next_for_hyper`), a request in flight at shutdown answered,
/// and then the connection closed at once: not left open until its idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_a_kept_alive_connection_answers_what_it_has_then_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start().await;
    let task = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let mut c = tokio::net::TcpStream::connect(s.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let mut rest = Vec::new();
    for _ in 0..3 {
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = raw_answer(&mut c, &mut rest).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    }
    // A wait in flight (served by hyper, not parked by the front) when the shutdown comes.
    c.write_all(
        format!(
            "GET /v1/tasks/{}?wait=60 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\r\n",
            task["id"].as_str().unwrap(),
            s.client
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let token = s.shutdown_token();
    let stopping = tokio::spawn(s.stop());
    token.cancel();
    let (head, body) = raw_answer(&mut c, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(body.contains(task["id"].as_str().unwrap()), "{body}");
    // Then the connection ends (no further answer), well before any idle timeout.
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("closed at shutdown, not left open")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing after the answer: {:?}", &buf[..n]);
    stopping.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// A parked claim that asked for `connection: close` is answered, then the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_claim_with_connection_close_is_answered_then_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start().await;
    let mut c = tokio::net::TcpStream::connect(s.url.trim_start_matches("http://"))
        .await
        .unwrap();
    c.write_all(&raw_claim(&s.runner, "raw", 100, "connection: close\r\n"))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let (head, _) = raw_answer(&mut c, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 204 No Content\r\n"), "{head}");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed after the answer");
}

/// A claim whose head arrived but whose body never does is cut off by the header timeout;
/// a half-closed socket while parked is a client gone (its poll is dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_body_that_never_comes_is_cut_off_and_a_half_close_ends_a_parked_claim() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start_with(crate::common::Options {
        connections: Some(tunnel_server::ConnectionLimits {
            header_timeout: Duration::from_secs(1),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let addr = s.url.trim_start_matches("http://").to_owned();
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let whole = raw_claim(&s.runner, "slow", 30_000, "");
    c.write_all(&whole[..whole.len() - 5]).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
        .await
        .expect("closed by the header timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        s.parked_polls_line_once_settled().await,
        "tunnel_long_polls_parked 0"
    );

    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    c.write_all(&whole).await.unwrap();
    parked(&s, 1).await;
    c.shutdown().await.unwrap();
    parked(&s, 0).await;
}
