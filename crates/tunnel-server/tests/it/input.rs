//! Bad input gets a JSON error with a fitting 4xx and changes nothing.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{Options, TestServer};

async fn task_count(s: &TestServer) -> usize {
    let (_, list) = s.get("/v1/tasks?limit=1000", &s.admin).await;
    list["tasks"].as_array().unwrap().len()
}

async fn raw(
    s: &TestServer,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut r = s
        .http
        .request(method, format!("{}{path}", s.url))
        .bearer_auth(&s.admin)
        .body(body);
    if let Some(ct) = content_type {
        r = r.header("content-type", ct);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{status}: not a JSON error: {text:?}")),
    )
}

#[tokio::test]
async fn malformed_submits_are_refused_with_json_errors() {
    let s = TestServer::start_with(Options {
        max_body_bytes: Some(64 * 1024),
        ..Default::default()
    })
    .await;
    let cases: Vec<(&str, Option<&str>, Vec<u8>, StatusCode)> = vec![
        ("not json", Some("application/json"), b"{\"agent\":".to_vec(), StatusCode::BAD_REQUEST),
        ("not an object", Some("application/json"), b"[1,2]".to_vec(), StatusCode::BAD_REQUEST),
        ("wrong type", Some("application/json"), br#"{"agent":"claude","prompt":5}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("unknown field", Some("application/json"), br#"{"agent":"claude","prompt":"p","command":"rm -rf /"}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("missing prompt", Some("application/json"), br#"{"agent":"claude"}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("blank prompt", Some("application/json"), br#"{"agent":"claude","prompt":"   "}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("agent as option", Some("application/json"), br#"{"agent":"--help","prompt":"p"}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("resume id as option", Some("application/json"), br#"{"agent":"claude","prompt":"p","session":{"resume":"--dangerously-skip-permissions"}}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("model as option", Some("application/json"), br#"{"agent":"codex","prompt":"p","model":"-c foo"}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("NUL in prompt", Some("application/json"), br#"{"agent":"claude","prompt":"a\u0000b"}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("tiny timeout", Some("application/json"), br#"{"agent":"claude","prompt":"p","timeout_ms":5}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("negative timeout", Some("application/json"), br#"{"agent":"claude","prompt":"p","timeout_ms":-1}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("bad platform", Some("application/json"), br#"{"agent":"claude","prompt":"p","reply_to":{"platform":"irc","channel":"1"}}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("path in channel", Some("application/json"), br#"{"agent":"claude","prompt":"p","reply_to":{"platform":"discord","channel":"1/../../x"}}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("invalid utf-8", Some("application/json"), vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'], StatusCode::BAD_REQUEST),
        ("text/plain", Some("text/plain"), br#"{"agent":"claude","prompt":"p"}"#.to_vec(), StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("no content type", None, br#"{"agent":"claude","prompt":"p"}"#.to_vec(), StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("oversized", Some("application/json"), format!(r#"{{"agent":"claude","prompt":"{}"}}"#, "x".repeat(100 * 1024)).into_bytes(), StatusCode::PAYLOAD_TOO_LARGE),
    ];
    for (label, ct, body, want) in cases {
        let (st, err) = raw(&s, Method::POST, "/v1/tasks", ct, body).await;
        assert_eq!(st, want, "{label}: {err}");
        assert!(
            err["error"]["code"].is_string() && err["error"]["message"].is_string(),
            "{label}: {err}"
        );
    }
    assert_eq!(task_count(&s).await, 0, "nothing was created");

    // Just under the limit is fine, and a prompt full of shell metacharacters is only text.
    let prompt = format!(
        "$(rm -rf /); `id`; --model x | cat /etc/passwd > /dev/null & {}",
        "y".repeat(60 * 1024)
    );
    let t = s.submit(json!({"agent": "claude", "prompt": prompt})).await;
    assert_eq!(t["prompt"].as_str().unwrap(), prompt);
}

#[tokio::test]
async fn bad_ids_queries_and_headers() {
    let s = TestServer::start().await;
    let unknown = "01900000-0000-7000-8000-000000000000";
    for (path, want) in [
        ("/v1/tasks/not-a-task".to_owned(), StatusCode::BAD_REQUEST),
        (
            "/v1/tasks/..%2F..%2Fetc".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (format!("/v1/tasks/{unknown}"), StatusCode::NOT_FOUND),
        (format!("/v1/tasks/{unknown}/events"), StatusCode::NOT_FOUND),
        (
            format!("/v1/tasks/{unknown}?wait=abc"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("/v1/tasks/{unknown}?wait=-1"),
            StatusCode::BAD_REQUEST,
        ),
        ("/v1/tasks?state=done".to_owned(), StatusCode::BAD_REQUEST),
        ("/v1/tasks?limit=0".to_owned(), StatusCode::BAD_REQUEST),
        (
            "/v1/tasks?limit=99999999999".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        ("/v1/tasks?bogus=1".to_owned(), StatusCode::BAD_REQUEST),
        ("/v1/nope".to_owned(), StatusCode::NOT_FOUND),
    ] {
        let (st, body) = s.get(&path, &s.admin).await;
        assert_eq!(st, want, "{path}: {body}");
        assert!(body["error"]["message"].is_string(), "{path}: {body}");
    }
    let (st, body) = s
        .request(Method::PUT, "/v1/tasks", Some(&s.admin), None)
        .await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );

    let r = s
        .http
        .post(format!("{}/v1/tasks", s.url))
        .bearer_auth(&s.client)
        .header("Idempotency-Key", "x".repeat(300))
        .json(&json!({"agent": "claude", "prompt": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(task_count(&s).await, 0);
}

#[tokio::test]
async fn bad_runner_calls_change_nothing() {
    let s = TestServer::start().await;
    let t = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    for (body, label) in [
        (
            json!({"runner": "-x", "agents": ["claude"]}),
            "runner as option",
        ),
        (json!({"runner": "r", "agents": []}), "no agents"),
        (
            json!({"runner": "r", "agents": ["claude"], "wait_ms": 3_600_000}),
            "wait too long",
        ),
        (
            json!({"runner": "r", "agents": "claude"}),
            "agents not a list",
        ),
    ] {
        let (st, body) = s.post("/v1/claim", &s.runner, body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{label}: {body}");
    }
    assert_eq!(s.task(t["id"].as_str().unwrap()).await["state"], "queued");
    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    for (call, extra, label) in [
        (
            "events",
            json!({"events": [{"n": 0, "kind": "text"}]}),
            "n = 0",
        ),
        (
            "events",
            json!({"events": [{"n": 1, "kind": "state", "data": {}}]}),
            "reserved kind",
        ),
        (
            "events",
            json!({"events": [{"n": 1, "kind": "Bad Kind", "data": {}}]}),
            "bad kind",
        ),
        (
            "finish",
            json!({"outcome": "parked"}),
            "parked without time",
        ),
        ("finish", json!({"outcome": "exploded"}), "unknown outcome"),
        (
            "finish",
            json!({"outcome": "succeeded", "result": {"session_id": "--resume"}}),
            "session id as option",
        ),
    ] {
        let (st, body) = s.attempt_call(&offer, call, extra).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{label}: {body}");
    }
    assert_eq!(s.task(t["id"].as_str().unwrap()).await["state"], "running");
}
