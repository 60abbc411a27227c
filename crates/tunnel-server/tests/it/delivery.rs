//! Answers reach Discord and Telegram stand-ins that speak their wire format: a "working…"
//! message, throttled edits, the final answer split at the platform limit, in order, through
//! rate limits, server errors and a server restart.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use serde_json::{Value, json};
use tunnel_delivery::{DiscordConfig, PlatformsConfig, TelegramConfig};

use crate::common::{Options, TestServer, id};

const DISCORD_TOKEN: &str = "discord-secret-MTIzNDU2Nzg5MA.GhIjKl";
const TELEGRAM_TOKEN: &str = "123456:telegram-secret-AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw";

/// One request the stand-in saw.
#[derive(Debug, Clone)]
struct Seen {
    method: &'static str,
    path: String,
    body: Value,
    auth: Option<String>,
}

/// A canned answer: status, JSON body, headers.
type Canned = (u16, Value, Vec<(&'static str, String)>);

#[derive(Default)]
struct Stand {
    seen: Mutex<Vec<Seen>>,
    /// Canned answers for the next requests (status, body, headers); then 200.
    script: Mutex<VecDeque<Canned>>,
    next_id: Mutex<u64>,
}

type Shared = Arc<Stand>;

impl Stand {
    fn answer(
        &self,
        method: &'static str,
        path: String,
        headers: &HeaderMap,
        body: Value,
        ok: impl FnOnce(u64) -> Value,
    ) -> Response {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.seen.lock().unwrap().push(Seen {
            method,
            path,
            body,
            auth,
        });
        if let Some((status, body, headers)) = self.script.lock().unwrap().pop_front() {
            let mut resp =
                (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
            for (k, v) in headers {
                resp.headers_mut().insert(k, v.parse().unwrap());
            }
            return resp;
        }
        let mut n = self.next_id.lock().unwrap();
        *n += 1;
        axum::Json(ok(*n)).into_response()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn then(&self, status: u16, body: Value, headers: Vec<(&'static str, String)>) {
        self.script
            .lock()
            .unwrap()
            .push_back((status, body, headers));
    }
}

/// Discord's API v10: create and edit messages.
async fn discord() -> (String, Shared) {
    let stand = Shared::default();
    let app = Router::new()
        .route(
            "/channels/{channel}/messages",
            post(|State(s): State<Shared>, Path(channel): Path<String>, h: HeaderMap, axum::Json(b): axum::Json<Value>| async move {
                s.answer("POST", format!("/channels/{channel}/messages"), &h, b.clone(), |n| {
                    json!({"id": format!("9000{n}"), "channel_id": channel, "content": b["content"], "type": 0})
                })
            }),
        )
        .route(
            "/channels/{channel}/messages/{message}",
            patch(|State(s): State<Shared>, Path((channel, message)): Path<(String, String)>, h: HeaderMap, axum::Json(b): axum::Json<Value>| async move {
                s.answer("PATCH", format!("/channels/{channel}/messages/{message}"), &h, b.clone(), |_| {
                    json!({"id": message, "channel_id": channel, "content": b["content"]})
                })
            }),
        )
        .with_state(stand.clone());
    (serve(app).await, stand)
}

/// The Telegram Bot API: sendMessage and editMessageText.
async fn telegram() -> (String, Shared) {
    let stand = Shared::default();
    let app = Router::new()
        .route(
            "/{bot}/{method}",
            post(|State(s): State<Shared>, Path((bot, method)): Path<(String, String)>, h: HeaderMap, axum::Json(b): axum::Json<Value>| async move {
                let path = format!("/{bot}/{method}");
                s.answer("POST", path, &h, b.clone(), |n| {
                    json!({"ok": true, "result": {"message_id": n, "chat": {"id": b["chat_id"]}, "date": 1, "text": b["text"]}})
                })
            }),
        )
        .with_state(stand.clone());
    (serve(app).await, stand)
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

async fn server(discord_url: Option<&str>, telegram_url: Option<&str>) -> TestServer {
    let mut delivery = PlatformsConfig::default();
    if let Some(u) = discord_url {
        let mut d = DiscordConfig::new(DISCORD_TOKEN);
        d.api_base = u.to_owned();
        delivery.discord = Some(d);
    }
    if let Some(u) = telegram_url {
        let mut t = TelegramConfig::new(TELEGRAM_TOKEN);
        t.api_base = u.to_owned();
        delivery.telegram = Some(t);
    }
    TestServer::start_with(Options {
        delivery,
        ..Default::default()
    })
    .await
}

/// Waits (polling the stand-in) until it has seen `n` requests.
async fn until_seen(stand: &Stand, n: usize) -> Vec<Seen> {
    for _ in 0..200 {
        let seen = stand.seen();
        if seen.len() >= n {
            return seen;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the stand-in saw only {:?}", stand.seen());
}

/// Runs a task as a runner would: ack, events, finish with `text`.
async fn run(s: &TestServer, task: &Value, events: &[&str], text: &str) -> Value {
    let offer = s.claim("r", &["claude"], 5_000).await.expect("an offer");
    assert_eq!(offer["task"]["id"], task["id"]);
    s.attempt_call(&offer, "ack", json!({})).await;
    if !events.is_empty() {
        let evs: Vec<Value> = events
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"n": i + 1, "kind": "text", "data": {"text": t}}))
            .collect();
        s.attempt_call(&offer, "events", json!({"events": evs}))
            .await;
    }
    let (st, done) = s
        .attempt_call(
            &offer,
            "finish",
            json!({"outcome": "succeeded", "result": {"text": text, "session_id": "sess-42"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{done}");
    done
}

fn long_answer() -> String {
    let mut a = String::from("Here is the fix.\n\n```rust\n");
    for i in 0..120 {
        a.push_str(&format!("let value_{i} = compute({i}); // step {i}\n"));
    }
    a.push_str("```\n\nThat's all: run `cargo test`.");
    assert!(a.chars().count() > 4000);
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_gets_a_working_message_and_a_split_answer_in_order() {
    let (url, stand) = discord().await;
    let s = server(Some(&url), None).await;
    let task = s
        .submit(json!({"agent": "claude", "prompt": "fix it", "reply_to": {"platform": "discord", "channel": "1234567890", "message": "555"}}))
        .await;
    let offer = s.claim("r", &["claude"], 5_000).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    let seen = until_seen(&stand, 1).await;
    assert_eq!(
        (seen[0].method, seen[0].path.as_str()),
        ("POST", "/channels/1234567890/messages")
    );
    assert!(
        seen[0].body["content"].as_str().unwrap().contains("claude"),
        "{:?}",
        seen[0].body
    );
    assert_eq!(
        seen[0].body["allowed_mentions"],
        json!({"parse": []}),
        "never pings"
    );
    assert_eq!(
        seen[0].auth.as_deref(),
        Some(format!("Bot {DISCORD_TOKEN}").as_str())
    );

    let answer = long_answer();
    let (st, _) = s
        .attempt_call(
            &offer,
            "finish",
            json!({"outcome": "succeeded", "result": {"text": answer, "session_id": "sess-42"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, done) = s.get(&format!("/v1/tasks/{}", id(&task)), &s.client).await;
    let seen = loop {
        // The state first: a snapshot taken before it could miss the last part.
        let (_, t) = s.get(&format!("/v1/tasks/{}", id(&task)), &s.client).await;
        if t["delivery"]["state"] == "sent" {
            break stand.seen();
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    let _ = done;
    // The acknowledgement is the working message (90001); it ends in its outcome before the
    // answer (issue #18): edits of 90001 (to "working…" at the start, maybe, and to the
    // outcome), then the parts.
    let first_part = seen
        .iter()
        .skip(1)
        .position(|r| r.method == "POST")
        .expect("the answer")
        + 1;
    let edits = &seen[1..first_part];
    assert!(
        !edits.is_empty()
            && edits
                .iter()
                .all(|r| (r.method, r.path.as_str())
                    == ("PATCH", "/channels/1234567890/messages/90001")),
        "{seen:?}"
    );
    let ended = edits.last().unwrap().body["content"].as_str().unwrap();
    assert!(
        ended.starts_with("✅ claude · done") && ended.ends_with("the answer follows"),
        "{ended}"
    );
    let n_edits = edits.len();
    let seen = [&seen[..1], &seen[first_part..]].concat();
    assert!(seen.iter().all(|r| r.method == "POST"), "{seen:?}");
    let seen = seen[1..].to_vec();
    let parts: Vec<&str> = seen
        .iter()
        .map(|r| r.body["content"].as_str().unwrap())
        .collect();
    assert!(parts.len() >= 3, "{} parts", parts.len());
    for p in &parts {
        assert!(
            p.chars().count() <= 2000,
            "a part over Discord's limit: {}",
            p.chars().count()
        );
        assert_eq!(
            p.matches("```").count() % 2,
            0,
            "fences balanced in every part: {p}"
        );
    }
    let joined = parts.join("\n");
    for i in [0, 57, 119] {
        assert!(
            joined.contains(&format!("let value_{i} = compute({i});")),
            "line {i} arrived"
        );
    }
    let first_line = joined.find("let value_0 ").unwrap();
    let last_line = joined.find("let value_119 ").unwrap();
    assert!(first_line < last_line, "in order");
    assert!(
        joined.contains("sess-42"),
        "the session id to resume with is shown"
    );
    assert_eq!(
        seen[0].body["message_reference"]["message_id"], "555",
        "a reply to the chat message"
    );
    // Every message carries its own nonce, enforced, so a repeated send is not posted twice.
    let nonces: std::collections::BTreeSet<&str> = seen
        .iter()
        .map(|r| {
            assert_eq!(r.body["enforce_nonce"], true, "{:?}", r.body);
            r.body["nonce"].as_str().unwrap()
        })
        .collect();
    assert_eq!(nonces.len(), seen.len());
    // Nothing about the task after its answer.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(stand.seen().len(), 1 + n_edits + seen.len());
    assert!(nonces.iter().all(|n| n.len() <= 25), "{nonces:?}");
}

/// Issue #18: a "working…" message held back by 429s until the task ended is never posted
/// (the answer replaces it), and nothing about the task comes after the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_message_held_by_429s_past_the_end_is_not_posted() {
    let (url, stand) = telegram().await;
    let s = server(None, Some(&url)).await;
    // The acknowledgement (posted at submit, the "working…" message to be) is refused.
    stand.then(
        429,
        json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 1", "parameters": {"retry_after": 1}}),
        vec![],
    );
    let task = s.submit(json!({"agent": "claude", "prompt": "p", "reply_to": {"platform": "telegram", "channel": "77"}})).await;
    // Refused with a 429 while the task is queued (the message says the state it is sent in).
    until_seen(&stand, 1).await;
    let offer = s.claim("r", &["claude"], 5_000).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    let (st, _) = s
        .attempt_call(
            &offer,
            "finish",
            json!({"outcome": "succeeded", "result": {"text": "the answer"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    // The server's clock passes retry_after; the Telegram client also holds the chat for it in
    // real time, so the server's clock is moved on while waiting.
    let seen = loop {
        s.clock.advance(500);
        let (_, t) = s.get(&format!("/v1/tasks/{}", id(&task)), &s.client).await;
        if t["delivery"]["state"] == "sent" {
            break stand.seen();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(stand.seen().len(), seen.len(), "nothing after the answer");
    let texts: Vec<(&str, &str)> = seen
        .iter()
        .map(|r| {
            (
                r.path.rsplit('/').next().unwrap(),
                r.body["text"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        texts.len(),
        2,
        "the refused working message, then the answer: {texts:?}"
    );
    assert!(texts[0].1.starts_with("🕓 claude · queued"), "{texts:?}");
    assert_eq!(texts[1].0, "sendMessage");
    assert!(
        texts[1].1.starts_with("✅ claude") && texts[1].1.contains("the answer"),
        "{texts:?}"
    );
}

/// Issue #18: a cancelled task's working message says so, and the answer is one clear line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_ends_the_working_message_and_says_it_once() {
    let (url, stand) = telegram().await;
    let s = server(None, Some(&url)).await;
    let task = s.submit(json!({"agent": "claude", "prompt": "p", "reply_to": {"platform": "telegram", "channel": "78"}})).await;
    let offer = s.claim("r", &["claude"], 5_000).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    until_seen(&stand, 1).await;
    let (st, _) = s
        .post(
            &format!("/v1/tasks/{}/cancel", id(&task)),
            &s.client,
            json!({}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    // What the runner reports for a cancel: its error, the signal's exit code, stderr.
    s.attempt_call(
        &offer,
        "finish",
        json!({"outcome": "cancelled", "result": {"error": "cancelled; the agent was stopped", "exit_code": 143, "stderr_tail": "Terminated"}}),
    )
    .await;
    let seen = loop {
        let seen = stand.seen();
        if seen.iter().any(|r| {
            r.path.ends_with("/sendMessage")
                && r.body["text"].as_str().is_some_and(|t| t.starts_with("🛑"))
        }) {
            break seen;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    let n = seen.len();
    // The last edit before the answer: the acknowledgement (message 1) shows the outcome.
    assert_eq!(seen[n - 2].path.rsplit('/').next(), Some("editMessageText"));
    assert_eq!(seen[n - 2].body["message_id"], 1);
    assert!(
        seen[n - 2].body["text"]
            .as_str()
            .unwrap()
            .starts_with("🛑 claude · cancelled"),
        "{:?}",
        seen[n - 2].body
    );
    let answer = seen[n - 1].body["text"].as_str().unwrap();
    let first = answer.lines().next().unwrap();
    assert!(first.starts_with("🛑 claude · cancelled"), "{answer}");
    assert_eq!(answer.matches("cancel").count(), 1, "said once: {answer}");
    assert!(
        !answer.contains("143") && !answer.contains("Terminated"),
        "{answer}"
    );
    assert!(answer.ends_with(&format!("task {}", id(&task))), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_edits_are_throttled_and_coalesced() {
    let (url, stand) = discord().await;
    let s = server(Some(&url), None).await;
    s.submit(json!({"agent": "claude", "prompt": "p", "reply_to": {"platform": "discord", "channel": "42"}})).await;
    let offer = s.claim("r", &["claude"], 5_000).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    // The acknowledgement, and its edit to "working…" at the start.
    let seen = until_seen(&stand, 2).await;
    assert_eq!(seen[1].method, "PATCH");
    // Fifty events in five batches, with no time passing: nothing is edited yet.
    for b in 0..5 {
        let evs: Vec<Value> = (0..10)
            .map(|i| json!({"n": b * 10 + i + 1, "kind": "text", "data": {"text": format!("step {}", b * 10 + i)}}))
            .collect();
        s.attempt_call(&offer, "events", json!({"events": evs}))
            .await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(stand.seen().len(), 2, "edits wait for the throttle window");
    s.clock.advance(3_000);
    let seen = until_seen(&stand, 3).await;
    assert_eq!(seen[2].method, "PATCH");
    assert_eq!(seen[2].path, "/channels/42/messages/90001");
    assert!(
        seen[2].body["content"]
            .as_str()
            .unwrap()
            .contains("step 49"),
        "one edit with the latest state"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(stand.seen().len(), 3, "fifty events made one edit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_honoured_and_500s_are_retried() {
    let (url, stand) = discord().await;
    let s = server(Some(&url), None).await;
    // The acknowledgement (posted at submit, the working message to be) is rate limited for
    // 0.5 s, then a 500, then all is well. Scripted before the submit, which posts it at once.
    stand.then(
        429,
        json!({"message": "You are being rate limited.", "retry_after": 0.5, "global": false}),
        vec![
            ("x-ratelimit-scope", "user".into()),
            ("retry-after", "1".into()),
        ],
    );
    stand.then(
        500,
        json!({"message": "Internal Server Error", "code": 0}),
        vec![],
    );
    let task = s.submit(json!({"agent": "claude", "prompt": "p", "reply_to": {"platform": "discord", "channel": "7"}})).await;
    let offer = s.claim("r", &["claude"], 5_000).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    until_seen(&stand, 1).await;
    // Both clocks must pass retry_after: the server's (manual here) and the client's bucket.
    s.clock.advance(200);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(stand.seen().len(), 1, "not retried before retry_after");
    let (_, t) = s.get(&format!("/v1/tasks/{}", id(&task)), &s.client).await;
    assert_eq!(t["delivery"]["state"], "retrying", "{t}");
    s.clock.advance(400);
    until_seen(&stand, 2).await; // the 500
    // Back-off after the first failed attempt: 1 s (the 429 was a wait, not a failure).
    s.clock.advance(1_100);
    let seen = until_seen(&stand, 3).await;
    assert_eq!(seen[2].path, "/channels/7/messages");
    s.attempt_call(
        &offer,
        "finish",
        json!({"outcome": "succeeded", "result": {"text": "ok"}}),
    )
    .await;
    until_seen(&stand, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_is_given_up_with_the_reason() {
    let (url, stand) = discord().await;
    let s = server(Some(&url), None).await;
    // Scripted before the submit, which posts the acknowledgement at once.
    stand.then(
        403,
        json!({"message": "Missing Access", "code": 50001}),
        vec![],
    );
    stand.then(
        403,
        json!({"message": "Missing Access", "code": 50001}),
        vec![],
    );
    let task = s.submit(json!({"agent": "claude", "prompt": "p", "reply_to": {"platform": "discord", "channel": "8"}})).await;
    run(&s, &task, &[], "answer").await;
    let t = loop {
        let (_, t) = s.get(&format!("/v1/tasks/{}", id(&task)), &s.client).await;
        if t["delivery"]["state"] == "failed" {
            break t;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    assert!(
        t["delivery"]["error"]
            .as_str()
            .unwrap()
            .contains("Missing Access"),
        "{t}"
    );
    assert_eq!(stand.seen().len(), 2, "no retries of a 403");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_replies_in_the_topic_and_splits_at_4096() {
    let (url, stand) = telegram().await;
    let s = server(None, Some(&url)).await;
    let task = s
        .submit(json!({"agent": "claude", "prompt": "p", "reply_to": {"platform": "telegram", "channel": "-1001234567890", "thread": "77", "message": "12"}}))
        .await;
    let answer = format!("{}\n\n{}", "word ".repeat(900), "end ".repeat(300));
    run(&s, &task, &["thinking"], &answer).await;
    let seen = loop {
        let (_, t) = s.get(&format!("/v1/tasks/{}", id(&task)), &s.client).await;
        if t["delivery"]["state"] == "sent" {
            break stand.seen();
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    assert!(
        seen.iter()
            .all(|r| r.path.starts_with("/bot") && r.auth.is_none())
    );
    let sends: Vec<&Seen> = seen
        .iter()
        .filter(|r| r.path.ends_with("/sendMessage"))
        .collect();
    assert!(
        sends.len() >= 3,
        "working message + at least two parts: {sends:?}"
    );
    for r in &sends {
        assert_eq!(
            r.body["chat_id"].to_string().trim_matches('"'),
            "-1001234567890"
        );
        assert_eq!(r.body["message_thread_id"], 77);
        assert!(r.body["text"].as_str().unwrap().encode_utf16().count() <= 4096);
    }
    let text: String = sends[1..]
        .iter()
        .map(|r| r.body["text"].as_str().unwrap())
        .collect();
    assert_eq!(text.matches("word").count(), 900);
    assert_eq!(text.matches("end").count(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_waiting_at_a_restart_is_delivered_once() {
    let (url, stand) = discord().await;
    let s = server(Some(&url), None).await;
    // Discord is down while the task finishes: the answer waits in the outbox. (Scripted before
    // the submit, which posts the acknowledgement at once.)
    stand.then(502, json!({"message": "Bad Gateway"}), vec![]);
    let task = s.submit(json!({"agent": "claude", "prompt": "p", "reply_to": {"platform": "discord", "channel": "9"}})).await;
    run(&s, &task, &[], "the answer").await;
    until_seen(&stand, 1).await;
    let s = s.restart().await;
    s.clock.advance(60_000);
    // The working message that failed is not posted after the end: the answer replaces it.
    let seen = until_seen(&stand, 2).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(stand.seen().len(), 2, "{:?}", stand.seen());
    let finals = stand
        .seen()
        .iter()
        .filter(|r| {
            r.body["content"]
                .as_str()
                .is_some_and(|c| c.contains("the answer"))
        })
        .count();
    assert_eq!(finals, 1, "delivered exactly once: {seen:?}");
}

#[tokio::test]
async fn tokens_never_appear_in_responses_and_unconfigured_platforms_are_refused() {
    let (url, _stand) = discord().await;
    let s = server(Some(&url), None).await;
    let task = s.submit(json!({"agent": "claude", "prompt": "p", "reply_to": {"platform": "discord", "channel": "1"}})).await;
    for path in [
        "/v1/tasks".to_owned(),
        format!("/v1/tasks/{}", id(&task)),
        "/v1/runners".into(),
        "/v1/sessions".into(),
    ] {
        let (_, body) = s.get(&path, &s.admin).await;
        assert!(!body.to_string().contains("discord-secret"), "{path}");
    }
    let openapi = s
        .http
        .get(format!("{}/openapi.json", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!openapi.contains("discord-secret"));
    let (st, body) = s
        .post("/v1/tasks", &s.client, json!({"agent": "claude", "prompt": "p", "reply_to": {"platform": "telegram", "channel": "1"}}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("TELEGRAM_BOT_TOKEN"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_sends_through_the_outbox() {
    let (url, stand) = discord().await;
    let s = server(Some(&url), None).await;
    let (st, body) = s
        .post(
            "/notify",
            &s.client,
            json!({"channel": "314", "message": "deploy done @everyone"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let seen = until_seen(&stand, 1).await;
    assert_eq!(seen[0].path, "/channels/314/messages");
    assert_eq!(seen[0].body["content"], "deploy done @everyone");
    assert_eq!(seen[0].body["allowed_mentions"], json!({"parse": []}));
    let (st, _) = s
        .post(
            "/notify",
            &s.client,
            json!({"channel": "../x", "message": "m"}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
}

/// A pending approval reaches the chat as a question with the command and the text commands
/// that answer it; the progress message shows it; the answer edits the question to the
/// outcome and the progress message goes back to working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_question_is_posted_and_edited_to_its_outcome() {
    let (url, stand) = telegram().await;
    let s = server(None, Some(&url)).await;
    s.submit(json!({"agent": "claude", "prompt": "clean", "reply_to": {"platform": "telegram", "channel": "-100123"}}))
        .await;
    let offer = s.claim("r", &["claude"], 5_000).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    // The acknowledgement (message_id 1), edited to "working…" when the task starts.
    let seen = until_seen(&stand, 2).await;
    assert!(seen[0].path.ends_with("/sendMessage"), "{:?}", seen[0]);
    assert!(seen[1].path.ends_with("/editMessageText"), "{:?}", seen[1]);
    assert!(
        seen[1].body["text"]
            .as_str()
            .unwrap()
            .starts_with("⏳ claude · working…"),
        "{:?}",
        seen[1]
    );
    let (st, a) = s
        .attempt_call(
            &offer,
            "approvals",
            json!({
                "key": "call_1",
                "tool": {"kind": "execute", "title": "Run rm -rf build", "command": "rm -rf build"},
                "options": [{"id": "y", "name": "Allow", "kind": "allow_once"},
                            {"id": "n", "name": "Reject", "kind": "reject_once"}]
            }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{a}");
    let aid = a["id"].as_str().unwrap().to_owned();
    let seen = until_seen(&stand, 3).await;
    assert!(seen[2].path.ends_with("/sendMessage"), "{:?}", seen[2]);
    let q = seen[2].body["text"].as_str().unwrap();
    assert!(q.contains("claude asks to run a command"), "{q}");
    assert!(q.contains("```\nrm -rf build\n```"), "{q}");
    assert!(q.contains(&format!("/cc -approve {aid} once")), "{q}");
    let question_id = 3; // the stand-in numbers its answers

    // The progress edit (due 3 s after the question) shows the question.
    s.clock.advance(3_000);
    let seen = until_seen(&stand, 4).await;
    assert!(seen[3].path.ends_with("/editMessageText"), "{:?}", seen[3]);
    assert_eq!(seen[3].body["message_id"], 1);
    let progress = seen[3].body["text"].as_str().unwrap();
    assert!(progress.contains("waiting for approval"), "{progress}");
    assert!(progress.contains("Run rm -rf build"), "{progress}");

    let (st, b) = s
        .post(
            &format!("/v1/approvals/{aid}"),
            &s.client,
            json!({"decision": "deny", "by": "alice", "message": "keep it"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let seen = until_seen(&stand, 5).await;
    let edit = seen
        .iter()
        .skip(4)
        .find(|r| r.body["message_id"] == question_id)
        .unwrap_or_else(|| panic!("no edit of the question: {seen:?}"));
    assert!(edit.path.ends_with("/editMessageText"));
    let text = edit.body["text"].as_str().unwrap();
    assert!(
        text.starts_with("🚫 denied by alice via token it-client: keep it"),
        "{text}"
    );
    assert!(!text.contains("/cc -approve"), "{text}");
    s.stop().await;
}

/// `GET /v1/tasks/{id}/progress` (issue #18): the progress text server delivery would post,
/// for front ends that deliver themselves (the OpenClaw plugin); only the owner's token reads
/// it, and a bad limit changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_progress_text_is_rendered_for_its_owner_only() {
    let s = TestServer::start().await;
    let task = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let path = format!("/v1/tasks/{}/progress", id(&task));
    let offer = s.claim("r", &["claude"], 5_000).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    s.attempt_call(
        &offer,
        "events",
        json!({"events": [{"n": 1, "kind": "tool_use", "data": {"name": "Bash", "input": {"command": "cargo test -p x"}}}]}),
    )
    .await;
    let (st, p) = s.get(&path, &s.client).await;
    assert_eq!(st, StatusCode::OK, "{p}");
    assert_eq!(p["state"], "running");
    let text = p["text"].as_str().unwrap();
    assert!(text.starts_with("⏳ claude · working…"), "{text}");
    assert!(text.contains("› Bash: cargo test -p x"), "{text}");

    // Another client's token: not found, as for the task itself.
    let other = s.create_token("client").await;
    let (st, _) = s.get(&path, &other).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = s.get(&path, &s.runner).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, body) = s.get(&format!("{path}?limit=99999"), &s.client).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");

    s.attempt_call(
        &offer,
        "finish",
        json!({"outcome": "succeeded", "result": {"text": "ok", "duration_ms": 12_000}}),
    )
    .await;
    let (_, p) = s.get(&format!("{path}?limit=300"), &s.client).await;
    assert_eq!(p["state"], "succeeded");
    assert_eq!(p["text"], "✅ claude · done in 12s — the answer follows");
}
