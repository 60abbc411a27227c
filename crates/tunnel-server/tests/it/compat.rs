//! The original openclaw-tunnel API, replayed with the exact requests its plugin and runner
//! send (shapes from shared/research/seed-spec.md §1.5, §2 and §3.4): both use the single
//! shared `WORKER_TOKEN`, the plugin submits to `/claude` and friends, the runner long-polls
//! `/worker/poll`, posts `/worker/event` and `/worker/result`, and never acks or heartbeats.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{patch, post};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tunnel_delivery::{DiscordConfig, PlatformsConfig};

use crate::common::{Options, TestServer, WORKER_TOKEN};

const BOT_TOKEN: &str = "plugin-bot-token-MTIzNDU2.Zz9-never-stored";
const CHANNEL: &str = "1234567890123456789";

/// What the plugin sends for `/cc <prompt>` in a Discord channel (§3.4), with the
/// `callbackBotToken` it sends when one is configured.
fn cc_body(prompt: &str, session: Option<&str>) -> Value {
    let mut b = json!({
        "prompt": prompt,
        "timeout": 1_200_000,
        "callbackChannel": CHANNEL,
        "origin": "openclaw-cli-bridge",
        "dispatchMode": "direct-command",
        "responseMode": "direct-callback",
        "entrypoint": "cc",
        "callbackBotToken": BOT_TOKEN,
    });
    if let Some(s) = session {
        b["sessionId"] = s.into();
    }
    b
}

/// A raw request as the original's clients make it: `Authorization: <auth>` verbatim.
async fn raw(
    s: &TestServer,
    method: Method,
    path: &str,
    auth: Option<&str>,
    content_type: Option<&str>,
    body: Option<String>,
) -> (StatusCode, String) {
    let mut r = s.http.request(method, format!("{}{path}", s.url));
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    if let Some(ct) = content_type {
        r = r.header("content-type", ct);
    }
    if let Some(b) = body {
        r = r.body(b);
    }
    let resp = r.send().await.unwrap();
    (resp.status(), resp.text().await.unwrap())
}

/// The original's calls with the shared token, as its plugin and runner send them.
async fn seed(
    s: &TestServer,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let (st, text) = raw(
        s,
        method,
        path,
        Some(&format!("Bearer {WORKER_TOKEN}")),
        body.as_ref().map(|_| "application/json"),
        body.map(|b| b.to_string()),
    )
    .await;
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({st}): {text}"));
    (st, v)
}

async fn poll(s: &TestServer, wait_ms: u64) -> Value {
    let (st, v) = seed(
        s,
        Method::GET,
        &format!("/worker/poll?wait={wait_ms}"),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(
        v.is_null() || (v["id"].is_string() && v["type"].is_string()),
        "not a task: {v}"
    );
    v
}

async fn submit_cc(s: &TestServer, prompt: &str, session: Option<&str>) -> Value {
    let (st, v) = seed(s, Method::POST, "/claude", Some(cc_body(prompt, session))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v
}

/// A task through API v1, as admin (the original's clients all use the admin `WORKER_TOKEN`).
async fn v1_task(s: &TestServer, id: &str) -> Value {
    let (st, t) = s.get(&format!("/v1/tasks/{id}"), &s.admin).await;
    assert_eq!(st, StatusCode::OK, "{t}");
    t
}

async fn post_result(s: &TestServer, body: Value) -> (StatusCode, Value) {
    seed(s, Method::POST, "/worker/result", Some(body)).await
}

/// The database files (with the WAL) as bytes, to look for things that must not be there.
fn db_bytes(s: &TestServer) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal"] {
        let p = format!("{}{suffix}", s.db_path.display());
        if let Ok(b) = std::fs::read(p) {
            all.extend(b);
        }
    }
    all
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_plugin_and_runner_go_round_and_results_read_twice() {
    let s = TestServer::start().await;
    // The plugin's /cc: the answer has the task id and a minted session id, nothing else.
    let created = submit_cc(&s, "what is in this directory?", None).await;
    assert_eq!(created["message"], "Claude CLI task created");
    let id = created["taskId"].as_str().unwrap().to_owned();
    let session = created["sessionId"].as_str().unwrap().to_owned();
    assert_eq!(session.len(), 36, "a UUID: {session}");

    // The runner's poll (lower-case `bearer` and padding, as the original accepts).
    let (st, text) = raw(
        &s,
        Method::GET,
        "/worker/poll?wait=5000",
        Some(&format!("bearer   {WORKER_TOKEN}  ")),
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{text}");
    assert!(
        !text.contains(BOT_TOKEN),
        "the bot token must never be handed out: {text}"
    );
    let task: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(task["id"], id.as_str());
    assert_eq!(task["type"], "claude-cli");
    assert_eq!(task["status"], "running");
    assert_eq!(task["prompt"], "what is in this directory?");
    assert_eq!(task["timeout"], 1_200_000);
    assert_eq!(task["sessionId"], session.as_str());
    // No Discord bot on this server: the runner posts the answer with its own bot token.
    assert_eq!(task["callbackChannel"], CHANNEL);
    assert_eq!(task["origin"], "openclaw-cli-bridge");
    assert_eq!(task["dispatchMode"], "direct-command");
    assert_eq!(task["responseMode"], "direct-callback");
    assert_eq!(task["entrypoint"], "cc");
    assert!(
        task["createdAt"].is_i64() && task["startedAt"].is_i64(),
        "{task}"
    );
    assert!(task["completedAt"].is_null());
    assert!(task.get("callbackBotToken").is_none());
    // (The check can see what was stored: the prompt is there.)
    assert!(contains(&db_bytes(&s), "what is in this directory?"));
    assert!(
        !contains(&db_bytes(&s), BOT_TOKEN),
        "the bot token reached the database"
    );

    // In tunnel's model it runs under a lease covering its timeout, and nobody heartbeats.
    let v1 = v1_task(&s, &id).await;
    assert_eq!(v1["state"], "running");
    assert_eq!(v1["runner"], "openclaw.worker-token");
    assert_eq!(v1["conversation"], session.as_str());
    assert_eq!(
        v1["lease_until"].as_i64().unwrap(),
        crate::common::START_MS + 1_200_000 + 120_000
    );
    s.clock.advance(600_000);
    assert_eq!(
        v1_task(&s, &id).await["state"],
        "running",
        "no sweep of running tasks"
    );

    // Before the result, the original's "not ready" answer.
    let (st, pending) = seed(&s, Method::GET, &format!("/tasks/{id}"), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        pending,
        json!({"status": "running", "message": "Result not ready yet"})
    );

    // An event while it runs is kept in the task's log.
    let (st, ev) = seed(
        &s,
        Method::POST,
        "/worker/event",
        Some(
            json!({"taskId": id, "type": "progress.note", "details": {"step": 1},
            "metadata": {"taskType": "claude-cli", "sessionId": session}}),
        ),
    )
    .await;
    assert_eq!(
        (st, ev["success"].clone(), ev["stored"].clone()),
        (StatusCode::OK, json!(true), json!(true)),
        "{ev}"
    );

    // The runner's result (§2.3: stdout, stderr, exitCode, error, duration, metadata).
    let result = json!({"taskId": id, "stdout": "src/ and Cargo.toml", "stderr": "", "exitCode": 0,
        "error": null, "duration": 4321, "metadata": {"sessionId": "9f1c2d3e-prov-sess"}});
    let (st, ok) = post_result(&s, result.clone()).await;
    assert_eq!((st, ok), (StatusCode::OK, json!({"success": true})));

    // Read it twice (the original deleted it on the first read): the same answer both times.
    let (st1, first) = seed(&s, Method::GET, &format!("/tasks/{id}?wait=1000"), None).await;
    let (st2, second) = seed(&s, Method::GET, &format!("/tasks/{id}"), None).await;
    assert_eq!((st1, st2), (StatusCode::OK, StatusCode::OK));
    assert_eq!(first, second);
    assert_eq!(first["taskId"], id.as_str());
    assert_eq!(first["stdout"], "src/ and Cargo.toml");
    assert_eq!(first["exitCode"], 0);
    assert_eq!(first["status"], "completed");
    assert!(first["error"].is_null());
    assert_eq!(first["metadata"]["sessionId"], "9f1c2d3e-prov-sess");
    assert_eq!(first["metadata"]["origin"], "openclaw-cli-bridge");
    assert_eq!(first["metadata"]["entrypoint"], "cc");
    let done = v1_task(&s, &id).await;
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["result"]["duration_ms"], 4321);

    // A retried post is a replay; a different one changes nothing and says so.
    let (st, dup) = post_result(&s, result).await;
    assert_eq!(
        (st, dup["success"].clone()),
        (StatusCode::OK, json!(true)),
        "{dup}"
    );
    let (st, other) =
        post_result(&s, json!({"taskId": id, "stdout": "other", "exitCode": 1})).await;
    assert_eq!(st, StatusCode::CONFLICT, "{other}");
    assert!(
        other["error"].as_str().unwrap().contains("not recorded"),
        "{other}"
    );
    assert_eq!(v1_task(&s, &id).await, done);

    // The runner's chat callback events come after the result: answered, logged, not stored.
    let (st, ev) = seed(&s, Method::POST, "/worker/event",
        Some(json!({"taskId": id, "type": "callback.sent", "details": {"attempts": 1, "status": 200}}))).await;
    assert_eq!(
        (st, ev["stored"].clone()),
        (StatusCode::OK, json!(false)),
        "{ev}"
    );

    // The conversation continues the provider's session, on this runner.
    let (_, sessions) = s.get("/v1/sessions?agent=claude", &s.admin).await;
    let b = &sessions["sessions"][0];
    assert_eq!(
        (
            b["conversation"].as_str(),
            b["session_id"].as_str(),
            b["runner"].as_str()
        ),
        (
            Some(session.as_str()),
            Some("9f1c2d3e-prov-sess"),
            Some("openclaw.worker-token")
        ),
        "{sessions}"
    );
    // The plugin sends the session id back with the next prompt; the runner sees the same one.
    let next = submit_cc(&s, "and the parent?", Some(&session)).await;
    assert_eq!(next["sessionId"], session.as_str());
    let t2 = poll(&s, 5_000).await;
    assert_eq!(
        (t2["id"].clone(), t2["sessionId"].clone()),
        (next["taskId"].clone(), json!(session))
    );

    // The event log in the original's shape, newest first.
    let (st, evs) = seed(
        &s,
        Method::GET,
        &format!("/events?taskId={id}&limit=500"),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let types: Vec<&str> = evs["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.first(), Some(&"task.completed"), "{types:?}");
    assert_eq!(types.last(), Some(&"task.created"), "{types:?}");
    for t in ["task.started", "progress.note"] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    assert_eq!(evs["events"][0]["taskType"], "claude-cli");
    assert_eq!(evs["events"][0]["sessionId"], session.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_one_session_run_one_at_a_time_in_order() {
    let s = TestServer::start().await;
    let a = submit_cc(&s, "first", Some("sess-a")).await;
    let b = submit_cc(&s, "second", Some("sess-a")).await;
    let x = submit_cc(&s, "other session", Some("sess-x")).await;
    let t1 = poll(&s, 1_000).await;
    let t2 = poll(&s, 1_000).await;
    assert_eq!(
        (t1["id"].clone(), t2["id"].clone()),
        (a["taskId"].clone(), x["taskId"].clone())
    );
    assert!(
        poll(&s, 1_000).await.is_null(),
        "second must wait for first"
    );
    let (st, _) = post_result(
        &s,
        json!({"taskId": a["taskId"], "stdout": "1", "exitCode": 0}),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let t3 = poll(&s, 5_000).await;
    assert_eq!(t3["id"], b["taskId"]);
    assert_eq!(t3["prompt"], "second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_whose_client_went_away_claims_nothing() {
    let s = TestServer::start().await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gone = impatient
        .get(format!("{}/worker/poll?wait=30000", s.url))
        .bearer_auth(WORKER_TOKEN)
        .send()
        .await;
    assert!(gone.unwrap_err().is_timeout());
    // The server notices the closed socket and drops the parked poll.
    let parked = s.parked_polls_line_once_settled().await;
    assert_eq!(
        parked, "tunnel_long_polls_parked 0",
        "the dead poll was dropped"
    );
    let created = submit_cc(&s, "must not vanish", None).await;
    let task = poll(&s, 5_000).await;
    assert_eq!(task["id"], created["taskId"]);
    let v1 = v1_task(&s, created["taskId"].as_str().unwrap()).await;
    assert_eq!(v1["attempt"], 1, "the dead poll never took it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_for_unknown_or_other_tasks_change_nothing() {
    let s = TestServer::start().await;
    let (st, v) = post_result(
        &s,
        json!({"taskId": "01900000-0000-7000-8000-000000000000", "stdout": "x", "exitCode": 0}),
    )
    .await;
    assert_eq!(
        (st, v),
        (StatusCode::NOT_FOUND, json!({"error": "Task not found"}))
    );
    let (st, v) = post_result(&s, json!({"taskId": "not-a-task", "exitCode": 0})).await;
    assert_eq!(
        (st, v),
        (StatusCode::NOT_FOUND, json!({"error": "Task not found"}))
    );

    // Never polled: the original would have completed it without running it.
    let queued = submit_cc(&s, "not yet", None).await;
    let qid = queued["taskId"].as_str().unwrap();
    let before = v1_task(&s, qid).await;
    let (st, v) = post_result(
        &s,
        json!({"taskId": qid, "stdout": "forged", "exitCode": 0}),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v1_task(&s, qid).await, before);

    // Running on a tunnel runner (API v1): the tokenless result cannot finish it.
    let (_, v1) = s
        .post(
            "/v1/tasks",
            &s.client,
            json!({"agent": "codex", "prompt": "v1 task"}),
        )
        .await;
    let offer = s.claim("tunnel-runner", &["codex"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    let v1_id = v1["id"].as_str().unwrap();
    let (st, v) = post_result(
        &s,
        json!({"taskId": v1_id, "stdout": "forged", "exitCode": 0}),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v1_task(&s, v1_id).await["state"], "running");

    // Held by another token's original runner: not this one's to finish.
    let t = poll(&s, 5_000).await;
    assert_eq!(t["id"], qid);
    let (st, v) = s
        .post(
            "/worker/result",
            &s.runner,
            json!({"taskId": qid, "stdout": "x", "exitCode": 0}),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v1_task(&s, qid).await["state"], "running");
    // A string "0" is a failure, strictly as in the original.
    let (st, _) = post_result(&s, json!({"taskId": qid, "stdout": "x", "exitCode": "0"})).await;
    assert_eq!(st, StatusCode::OK);
    let (_, r) = seed(&s, Method::GET, &format!("/tasks/{qid}"), None).await;
    assert_eq!(
        (r["status"].as_str(), r["exitCode"].as_i64()),
        (Some("failed"), Some(-1)),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_vanishes_leaves_a_lost_task_not_a_silent_one() {
    let s = TestServer::start().await;
    let created = submit_cc(&s, "long job", None).await;
    let id = created["taskId"].as_str().unwrap().to_owned();
    poll(&s, 5_000).await;
    s.clock.advance(1_200_000 + 120_000 + 1);
    let (_, lost) = s.get(&format!("/v1/tasks/{id}?wait=10"), &s.admin).await;
    assert_eq!(lost["state"], "lost", "{lost}");
    let (_, r) = seed(&s, Method::GET, &format!("/tasks/{id}"), None).await;
    assert_eq!(r["status"], "failed");
    assert!(
        r["error"].as_str().unwrap().contains("lease expired"),
        "{r}"
    );
    // Its late result changes nothing.
    let (st, v) = post_result(&s, json!({"taskId": id, "stdout": "late", "exitCode": 0})).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v1_task(&s, &id).await["state"], "lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_answers_only_a_task_null_or_401() {
    let s = TestServer::start().await;
    for auth in [
        None,
        Some("Bearer wrong-token-0000000000".to_owned()),
        Some(format!("Bearer {}", s.client)),
        Some(format!("Basic {WORKER_TOKEN}")),
    ] {
        let (st, text) = raw(
            &s,
            Method::GET,
            "/worker/poll?wait=1000",
            auth.as_deref(),
            None,
            None,
        )
        .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{auth:?}: {text}");
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"error": "Unauthorized"})
        );
    }
    // Any case and any whitespace, as the original's `^Bearer\s+(.+)$`.
    let (st, text) = raw(
        &s,
        Method::GET,
        "/worker/poll?wait=1000",
        Some(&format!("BEARER\t{WORKER_TOKEN} ")),
        None,
        None,
    )
    .await;
    assert_eq!((st, text.as_str()), (StatusCode::OK, "null"));
    // Odd queries are clamped, never refused.
    for q in ["wait=-5", "wait=1000&extra=1", "wait=1e3"] {
        let (st, v) = seed(&s, Method::GET, &format!("/worker/poll?{q}"), None).await;
        assert_eq!((st, v), (StatusCode::OK, Value::Null), "{q}");
    }
    // A custom agent's task is never handed to an original runner (it would run it as a shell
    // command); a file task it cannot read is failed, not handed over.
    s.submit(json!({"agent": "aider", "prompt": "rm -rf is not a prompt"}))
        .await;
    let bad = s
        .submit(json!({"agent": "files", "prompt": "not a request"}))
        .await;
    assert!(poll(&s, 1_000).await.is_null());
    let bad = v1_task(&s, bad["id"].as_str().unwrap()).await;
    assert_eq!(bad["state"], "failed", "{bad}");
    // Shutdown ends a parked poll with `null`.
    let url = format!("{}/worker/poll?wait=60000", s.url);
    let parked = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .get(url)
            .bearer_auth(WORKER_TOKEN)
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    });
    // Shut down only once the poll is parked: a fixed sleep lost the race on a loaded box
    // (the request then met a closed port).
    for _ in 0..400 {
        let (_, m) = s.request(Method::GET, "/metrics", None, None).await;
        if m.as_str()
            .unwrap()
            .lines()
            .any(|l| l == "tunnel_long_polls_parked 1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let token = s.shutdown_token();
    let stopping = tokio::spawn(s.stop());
    token.cancel();
    let (st, text) = tokio::time::timeout(Duration::from_secs(10), parked)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((st, text.as_str()), (StatusCode::OK, "null"));
    stopping.await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_the_originals_400s_and_changes_nothing() {
    let s = TestServer::start().await;
    let auth = format!("Bearer {WORKER_TOKEN}");
    let cases: Vec<(&str, Option<&str>, &str, &str)> = vec![
        (
            "/claude",
            Some("application/json"),
            r#"{"timeout": 5}"#,
            "prompt is required",
        ),
        (
            "/claude",
            Some("application/json"),
            r#"{"prompt": "   "}"#,
            "prompt is required",
        ),
        (
            "/codex",
            Some("text/plain"),
            r#"{"prompt": "hi"}"#,
            "prompt is required",
        ),
        (
            "/gemini",
            Some("application/json"),
            r#"{"prompt": "hi""#,
            "Invalid JSON body",
        ),
        (
            "/claude",
            Some("application/json"),
            r#"{"prompt": "hi", "callbackChannel": "../../guilds"}"#,
            "callbackChannel \"../../guilds\" is not a Discord channel id",
        ),
        (
            "/claude",
            Some("application/json"),
            r#"{"prompt": "hi", "sessionId": "--resume"}"#,
            "sessionId: \"--resume\" is not a session id (letters, digits and -_.:)",
        ),
        (
            "/tasks",
            Some("application/json"),
            r#"{"command": "  "}"#,
            "command is required",
        ),
        (
            "/files/write",
            Some("application/json"),
            r#"{"path": "a.txt"}"#,
            "path and content are required",
        ),
        (
            "/files/write",
            Some("application/json"),
            r#"{"path": "a", "content": "x", "encoding": "hex"}"#,
            "encoding must be utf8 or base64",
        ),
        (
            "/files/read",
            Some("application/json"),
            r#"{}"#,
            "path is required",
        ),
        (
            "/files/edit",
            Some("application/json"),
            r#"{"path": "a", "old_string": "x"}"#,
            "path, old_string, new_string are required",
        ),
        (
            "/worker/result",
            Some("application/json"),
            r#"{"stdout": "x"}"#,
            "taskId is required",
        ),
        (
            "/worker/event",
            Some("application/json"),
            r#"{"taskId": "x"}"#,
            "type is required",
        ),
        (
            "/worker/event",
            Some("application/json"),
            "{bad",
            "Invalid JSON body",
        ),
    ];
    for (path, ct, body, message) in cases {
        let (st, text) = raw(&s, Method::POST, path, Some(&auth), ct, Some(body.into())).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path} {body}: {text}");
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"error": message}),
            "{path} {body}"
        );
    }
    let (_, list) = s.get("/v1/tasks", &s.admin).await;
    assert_eq!(list["tasks"], json!([]), "nothing was submitted");
    let (st, v) = seed(
        &s,
        Method::GET,
        "/tasks/01900000-0000-7000-8000-000000000000",
        None,
    )
    .await;
    assert_eq!(
        (st, v),
        (StatusCode::NOT_FOUND, json!({"error": "Task not found"}))
    );
}

type Route = (Method, String);

#[tokio::test]
async fn every_route_checks_the_token_and_its_role() {
    let s = TestServer::start().await;
    const ID: &str = "01900000-0000-7000-8000-000000000000";
    let client_routes = [
        (Method::POST, "/claude".to_owned()),
        (Method::POST, "/codex".into()),
        (Method::POST, "/gemini".into()),
        (Method::POST, "/tasks".into()),
        (Method::POST, "/files/write".into()),
        (Method::POST, "/files/read".into()),
        (Method::POST, "/files/edit".into()),
        (Method::GET, format!("/tasks/{ID}")),
        (Method::GET, "/tasks/stats".into()),
        (Method::GET, "/claude/sessions".into()),
        (Method::GET, "/claude/recent".into()),
        (Method::GET, "/codex/recent".into()),
        (Method::GET, "/sessions/stats".into()),
        (Method::GET, "/sessions/state".into()),
        (Method::GET, "/events".into()),
        (Method::GET, "/events/stats".into()),
    ];
    let runner_routes = [
        (Method::GET, "/worker/poll?wait=1000".to_owned()),
        (Method::POST, "/worker/result".into()),
        (Method::POST, "/worker/event".into()),
    ];
    let admin_routes = [(Method::POST, "/events/maintenance".to_owned())];
    let call = |m: Method, p: String, auth: Option<String>| {
        let s = &s;
        async move {
            let body = (m == Method::POST).then(|| "{}".to_owned());
            let ct = body.as_ref().map(|_| "application/json");
            raw(s, m, &p, auth.as_deref(), ct, body).await
        }
    };
    let groups: [(&[Route], &[&str], &str); 3] = [
        (&client_routes, &["runner"], "client"),
        (&runner_routes, &["client"], "runner"),
        (&admin_routes, &["client", "runner"], "admin"),
    ];
    let mut checked = 0;
    for (routes, wrong, right) in groups {
        for (m, p) in routes {
            for auth in [
                None,
                Some("Bearer tnl_000000000000_0000000000000000".to_owned()),
                Some("Bearer garbage".into()),
            ] {
                let (st, text) = call(m.clone(), p.clone(), auth).await;
                assert_eq!(st, StatusCode::UNAUTHORIZED, "{m} {p}: {text}");
                assert_eq!(text, r#"{"error":"Unauthorized"}"#);
            }
            for w in wrong {
                let token = if *w == "client" { &s.client } else { &s.runner };
                let (st, text) = call(m.clone(), p.clone(), Some(format!("Bearer {token}"))).await;
                // The original runner would take any other error body for a task.
                let want = if p.starts_with("/worker/poll") {
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::FORBIDDEN
                };
                assert_eq!(st, want, "{m} {p} with a {w} token: {text}");
            }
            let own = match right {
                "client" => s.client.clone(),
                "runner" => s.runner.clone(),
                _ => WORKER_TOKEN.to_owned(),
            };
            for token in [own, WORKER_TOKEN.to_owned()] {
                let (st, text) = call(m.clone(), p.clone(), Some(format!("bearer {token}"))).await;
                assert!(
                    st != StatusCode::UNAUTHORIZED && st != StatusCode::FORBIDDEN,
                    "{m} {p} refused its role: {st} {text}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_and_file_tasks_in_the_originals_shape() {
    let s = TestServer::start().await;
    let cases = [
        (
            "/tasks",
            json!({"command": "  ls -la  ", "timeout": 5}),
            "Task created, waiting for reconciler",
            json!({"type": "command", "command": "ls -la", "timeout": 1000}),
        ),
        (
            "/files/write",
            json!({"path": " notes.txt ", "content": "aGk=", "encoding": "base64"}),
            "File write task created",
            json!({"type": "file-write", "path": "notes.txt", "content": "aGk=", "encoding": "base64"}),
        ),
        (
            "/files/read",
            json!({"path": "notes.txt"}),
            "File read task created",
            json!({"type": "file-read", "path": "notes.txt"}),
        ),
        (
            "/files/edit",
            json!({"path": "a.rs", "old_string": "$&", "new_string": "x", "replace_all": true}),
            "File edit task created",
            json!({"type": "file-edit", "path": "a.rs", "oldString": "$&", "newString": "x", "replaceAll": true}),
        ),
    ];
    for (path, body, message, want) in cases {
        let (st, created) = seed(&s, Method::POST, path, Some(body)).await;
        assert_eq!(
            (st, created["message"].as_str()),
            (StatusCode::OK, Some(message)),
            "{created}"
        );
        let task = poll(&s, 5_000).await;
        assert_eq!(task["id"], created["taskId"]);
        for (k, v) in want.as_object().unwrap() {
            assert_eq!(&task[k], v, "{path}: {k} in {task}");
        }
        assert_eq!(task["status"], "running");
        let (st, _) = post_result(&s, json!({"taskId": created["taskId"], "stdout": "", "stderr": "boom", "exitCode": 1, "error": "Exit code 1"})).await;
        assert_eq!(st, StatusCode::OK);
        let (_, r) = seed(
            &s,
            Method::GET,
            &format!("/tasks/{}", created["taskId"].as_str().unwrap()),
            None,
        )
        .await;
        assert_eq!(
            (
                r["status"].as_str(),
                r["exitCode"].as_i64(),
                r["stderr"].as_str(),
                r["error"].as_str()
            ),
            (Some("failed"), Some(1), Some("boom"), Some("Exit code 1")),
            "{r}"
        );
    }
    // The tunnel runner's own shapes: agent `shell` with the command, `files` with a request.
    let (_, list) = s.get("/v1/tasks", &s.admin).await;
    let agents: Vec<&str> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["agent"].as_str().unwrap())
        .collect();
    assert_eq!(agents, ["files", "files", "files", "shell"]);
    let edit: Value = serde_json::from_str(list["tasks"][0]["prompt"].as_str().unwrap()).unwrap();
    assert_eq!(
        edit,
        json!({"op": "edit", "path": "a.rs", "old_string": "$&", "new_string": "x", "replace_all": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_and_gemini_submits_and_the_read_routes() {
    let s = TestServer::start().await;
    let (st, c) = seed(&s, Method::POST, "/codex", Some(json!({"prompt": "p", "timeout": 300_000, "model": "gpt-5-codex",
        "callbackChannel": "channel:42", "origin": "openclaw-cli-bridge", "dispatchMode": "agent-tool",
        "responseMode": "direct-callback", "entrypoint": "codex_call"}))).await;
    assert_eq!(
        (st, c["message"].as_str()),
        (StatusCode::OK, Some("Codex CLI task created"))
    );
    let (st, g) = seed(
        &s,
        Method::POST,
        "/gemini",
        Some(json!({"prompt": "p", "sessionId": "g-1", "dispatchMode": "weird"})),
    )
    .await;
    assert_eq!((st, g["sessionId"].as_str()), (StatusCode::OK, Some("g-1")));
    let t = poll(&s, 5_000).await;
    assert_eq!(
        (
            t["type"].as_str(),
            t["model"].as_str(),
            t["callbackChannel"].as_str(),
            t["dispatchMode"].as_str(),
            t["entrypoint"].as_str()
        ),
        (
            Some("codex-cli"),
            Some("gpt-5-codex"),
            Some("42"),
            Some("agent-tool"),
            Some("codex_call")
        ),
        "{t}"
    );
    let t = poll(&s, 5_000).await;
    assert_eq!(
        (
            t["type"].as_str(),
            t["resumeLatest"].as_bool(),
            t["dispatchMode"].as_str(),
            t["origin"].as_str(),
            t["entrypoint"].as_str()
        ),
        (
            Some("gemini-cli"),
            Some(true),
            Some("unspecified"),
            Some("unknown"),
            Some("gemini")
        ),
        "{t}"
    );
    post_result(&s, json!({"taskId": t["id"], "stdout": "hi", "exitCode": 0, "metadata": {"sessionId": "gem-sess-7"}})).await;

    let (st, stats) = seed(&s, Method::GET, "/tasks/stats", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        (
            stats["queue"]["total"].as_u64(),
            stats["queue"]["byStatus"]["running"].as_u64(),
            stats["queue"]["byStatus"]["completed"].as_u64()
        ),
        (Some(2), Some(1), Some(1)),
        "{stats}"
    );
    let (_, state) = seed(&s, Method::GET, "/sessions/state?cliType=gemini", None).await;
    assert_eq!(
        (
            state["sessions"][0]["sessionId"].as_str(),
            state["sessions"][0]["cliType"].as_str(),
            state["sessions"][0]["providerSessionId"].as_str()
        ),
        (Some("g-1"), Some("gemini"), Some("gem-sess-7")),
        "{state}"
    );
    let (_, stats) = seed(&s, Method::GET, "/sessions/stats", None).await;
    assert_eq!(stats["sessions"]["active"], 1, "{stats}");
    let (_, recent) = seed(&s, Method::GET, "/codex/recent?limit=5", None).await;
    assert_eq!(recent, json!({"sessions": []}));
    let (st, recent) = seed(&s, Method::GET, "/claude/recent?limit=8", None).await;
    assert_eq!((st, recent), (StatusCode::OK, json!({"sessions": []})));
    let (st, m) = seed(
        &s,
        Method::POST,
        "/events/maintenance",
        Some(json!({"vacuum": true})),
    )
    .await;
    assert_eq!((st, m["vacuumed"].as_bool()), (StatusCode::OK, Some(false)));
    let (st, all) = seed(&s, Method::GET, "/events?limit=3", None).await;
    assert_eq!(
        (st, all["events"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(3)),
        "{all}"
    );
    let (_, only) = seed(&s, Method::GET, "/events?type=task.completed", None).await;
    assert_eq!(only["events"].as_array().unwrap().len(), 1, "{only}");
    // `/health` answers the Docker healthcheck and reveals nothing.
    let (st, text) = raw(&s, Method::GET, "/health", None, None, None).await;
    assert_eq!((st, text.as_str()), (StatusCode::OK, r#"{"status":"ok"}"#));
    // The original's Docker healthcheck is `wget -q --spider …/health`: a HEAD request.
    let (st, _) = raw(&s, Method::HEAD, "/health", None, None, None).await;
    assert_eq!(st, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// With a Discord bot on the server

type Seen = Arc<Mutex<Vec<(String, Value)>>>;

async fn discord_stand_in() -> (String, Seen) {
    let seen = Seen::default();
    let app = Router::new()
        .route(
            "/channels/{channel}/messages",
            post(
                |State(s): State<Seen>,
                 Path(ch): Path<String>,
                 axum::Json(b): axum::Json<Value>| async move {
                    s.lock().unwrap().push((format!("POST {ch}"), b.clone()));
                    axum::Json(json!({"id": "555", "channel_id": ch, "content": b["content"]}))
                },
            ),
        )
        .route(
            "/channels/{channel}/messages/{m}",
            patch(
                |State(s): State<Seen>,
                 Path((ch, m)): Path<(String, String)>,
                 axum::Json(b): axum::Json<Value>| async move {
                    s.lock().unwrap().push((format!("PATCH {ch}"), b.clone()));
                    axum::Json(json!({"id": m, "channel_id": ch, "content": b["content"]}))
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_discord_bot_the_server_posts_the_answer_and_the_runner_does_not() {
    let (url, seen) = discord_stand_in().await;
    let mut delivery = PlatformsConfig::default();
    let mut d = DiscordConfig::new("server-bot-token-MTIz.abc");
    d.api_base = url;
    delivery.discord = Some(d);
    let s = TestServer::start_with(Options {
        delivery,
        ..Default::default()
    })
    .await;
    let created = submit_cc(&s, "fix it", None).await;
    let task = poll(&s, 5_000).await;
    assert!(
        task.get("callbackChannel").is_none(),
        "the runner must not post it too: {task}"
    );
    let id = created["taskId"].as_str().unwrap();
    assert_eq!(
        v1_task(&s, id).await["reply_to"],
        json!({"platform": "discord", "channel": CHANNEL})
    );
    post_result(
        &s,
        json!({"taskId": id, "stdout": "Fixed the flaky test.", "exitCode": 0}),
    )
    .await;
    let mut answer = None;
    for _ in 0..200 {
        answer = seen
            .lock()
            .unwrap()
            .iter()
            .find(|(_, b)| {
                b["content"]
                    .as_str()
                    .is_some_and(|c| c.contains("Fixed the flaky test."))
            })
            .cloned();
        if answer.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (what, _) = answer.expect("the answer reached Discord");
    assert!(what.ends_with(CHANNEL), "{what}");
    // The original's `POST /notify {channel, message}` goes out through the same bot.
    let (st, n) = seed(
        &s,
        Method::POST,
        "/notify",
        Some(json!({"channel": "777", "message": "deploy done"})),
    )
    .await;
    assert_eq!((st, n["ok"].as_bool()), (StatusCode::OK, Some(true)), "{n}");
    let mut notified = false;
    for _ in 0..200 {
        notified = seen
            .lock()
            .unwrap()
            .iter()
            .any(|(w, b)| w == "POST 777" && b["content"] == "deploy done");
        if notified {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(notified, "{:?}", seen.lock().unwrap());
    let all = seen.lock().unwrap().clone();
    assert!(all.iter().all(|(_, b)| !b.to_string().contains(BOT_TOKEN)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_v1_tasks_reach_an_original_runner_safely() {
    let s = TestServer::start().await;
    // A v1 client's own meta cannot make the original runner post to an arbitrary path or put
    // an option on the agent's command line.
    let t = s
        .submit(
            json!({"agent": "claude", "prompt": "p", "conversation": "-rf",
            "meta": {"openclaw": {"callbackChannel": "../../guilds/1", "sessionId": "--help"}}}),
        )
        .await;
    let task = poll(&s, 5_000).await;
    assert_eq!(task["id"], t["id"]);
    assert!(task.get("callbackChannel").is_none(), "{task}");
    assert_eq!(task["sessionId"], t["id"], "{task}");
    // A plain v1 task in a conversation: the conversation stands behind a full-length name
    // derived from it (never the short name itself, which the runner would expand as a
    // prefix), the same for each of its tasks.
    let t = s
        .submit(
            json!({"agent": "codex", "prompt": "p", "conversation": "discord:42", "model": "o3"}),
        )
        .await;
    let task = poll(&s, 5_000).await;
    assert_eq!(
        (
            task["id"].clone(),
            task["type"].as_str(),
            task["model"].as_str()
        ),
        (t["id"].clone(), Some("codex-cli"), Some("o3"))
    );
    let derived = task["sessionId"].as_str().unwrap().to_owned();
    assert!(derived.len() == 36 && derived.contains('-'), "{task}");
    post_result(
        &s,
        json!({"taskId": t["id"], "stdout": "ok", "exitCode": 0}),
    )
    .await;
    s.submit(json!({"agent": "codex", "prompt": "again", "conversation": "discord:42"}))
        .await;
    assert_eq!(poll(&s, 5_000).await["sessionId"], derived.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_original_runners_take_each_task_once_in_session_order() {
    let s = Arc::new(TestServer::start().await);
    const SESSIONS: usize = 6;
    const PER_SESSION: usize = 10;
    let mut ids = Vec::new();
    for i in 0..PER_SESSION {
        for k in 0..SESSIONS {
            let c = submit_cc(&s, &format!("s{k}-{i}"), Some(&format!("sess-{k}"))).await;
            ids.push(c["taskId"].as_str().unwrap().to_owned());
        }
    }
    // Four runners polling at once, as four original runners (each answers with its prompt).
    let handed: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let mut runners = Vec::new();
    for _ in 0..4 {
        let (s, handed) = (s.clone(), handed.clone());
        runners.push(tokio::spawn(async move {
            loop {
                let t = poll(&s, 1_000).await;
                if t.is_null() {
                    if handed.lock().unwrap().len() == SESSIONS * PER_SESSION {
                        return;
                    }
                    continue;
                }
                let prompt = t["prompt"].as_str().unwrap().to_owned();
                handed
                    .lock()
                    .unwrap()
                    .push((t["id"].as_str().unwrap().to_owned(), prompt.clone()));
                let (st, v) = post_result(
                    &s,
                    json!({"taskId": t["id"], "stdout": prompt, "exitCode": 0}),
                )
                .await;
                assert_eq!(st, StatusCode::OK, "{v}");
            }
        }));
    }
    for r in runners {
        tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .unwrap()
            .unwrap();
    }
    let handed = handed.lock().unwrap().clone();
    let mut unique: Vec<&String> = handed.iter().map(|(id, _)| id).collect();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), handed.len(), "a task was handed out twice");
    assert_eq!(handed.len(), SESSIONS * PER_SESSION);
    for k in 0..SESSIONS {
        let order: Vec<&str> = handed
            .iter()
            .filter(|(_, p)| p.starts_with(&format!("s{k}-")))
            .map(|(_, p)| p.as_str())
            .collect();
        let want: Vec<String> = (0..PER_SESSION).map(|i| format!("s{k}-{i}")).collect();
        assert_eq!(order, want, "session {k} out of order");
    }
    for id in &ids {
        let t = v1_task(&s, id).await;
        assert_eq!(
            (t["state"].as_str(), t["attempt"].as_u64()),
            (Some("succeeded"), Some(1)),
            "{t}"
        );
        assert_eq!(t["result"]["text"], t["prompt"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_wait_answers_when_the_result_arrives() {
    let s = Arc::new(TestServer::start().await);
    let c = submit_cc(&s, "wait for me", None).await;
    let id = c["taskId"].as_str().unwrap().to_owned();
    poll(&s, 5_000).await;
    let waiter = {
        let (s, id) = (s.clone(), id.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = seed(&s, Method::GET, &format!("/tasks/{id}?wait=60000"), None).await;
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    post_result(&s, json!({"taskId": id, "stdout": "here", "exitCode": 0})).await;
    let ((st, r), took) = waiter.await.unwrap();
    assert_eq!(
        (st, r["stdout"].as_str()),
        (StatusCode::OK, Some("here")),
        "{r}"
    );
    assert!(
        took < Duration::from_secs(30),
        "woken by the result, not the 60 s wait: {took:?}"
    );
}

/// A client reaches only sessions it may resume: never another client's by naming it in
/// `meta.openclaw.sessionId`, never by a short prefix the original runner would expand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poll_hands_only_sessions_the_owner_may_resume_and_never_a_prefix() {
    let s = TestServer::start().await;
    const A_SESSION: &str = "aaaaaaaa-1111-2222-3333-444444444444";
    // Client A's task makes a session.
    let t = s
        .submit(json!({"agent": "claude", "prompt": "a's secret work", "conversation": "a:1"}))
        .await;
    let task = poll(&s, 5_000).await;
    assert_eq!(task["id"], t["id"]);
    let (st, v) = post_result(
        &s,
        json!({"taskId": t["id"], "stdout": "ok", "exitCode": 0,
               "metadata": {"sessionId": A_SESSION}}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");

    let b = s.create_token("client").await;
    for wanted in [A_SESSION, "aaaaaaaa", "aaaa"] {
        let (st, t) = s
            .post(
                "/v1/tasks",
                &b,
                json!({"agent": "claude", "prompt": "b", "conversation": format!("b:{wanted}"),
                       "meta": {"openclaw": {"sessionId": wanted}}}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{t}");
        let task = poll(&s, 5_000).await;
        assert_eq!(task["id"], t["id"]);
        let handed = task["sessionId"].as_str().unwrap();
        assert!(
            !handed.starts_with("aaaa") && handed.len() >= 32 && handed.contains('-'),
            "client B was handed {handed:?} for {wanted:?}"
        );
        post_result(
            &s,
            json!({"taskId": t["id"], "stdout": "ok", "exitCode": 0}),
        )
        .await;
    }
    // Its own session, client A may name.
    let (st, t) = s
        .post(
            "/v1/tasks",
            &s.client,
            json!({"agent": "claude", "prompt": "a again",
                   "meta": {"openclaw": {"sessionId": A_SESSION}}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{t}");
    let task = poll(&s, 5_000).await;
    assert_eq!(task["sessionId"], A_SESSION);
    post_result(
        &s,
        json!({"taskId": t["id"], "stdout": "ok", "exitCode": 0}),
    )
    .await;

    // Conversations are scoped by owner: A's and B's "room:7" are two conversations, so the
    // original runner gets two names (each the same for every task of its conversation).
    let mut handed = Vec::new();
    for token in [&s.client, &b, &s.client, &b] {
        let (st, t) = s
            .post(
                "/v1/tasks",
                token,
                json!({"agent": "claude", "prompt": "room", "conversation": "room:7"}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{t}");
        let task = poll(&s, 5_000).await;
        assert_eq!(task["id"], t["id"]);
        handed.push(task["sessionId"].as_str().unwrap().to_owned());
        post_result(
            &s,
            json!({"taskId": t["id"], "stdout": "ok", "exitCode": 0}),
        )
        .await;
    }
    assert_ne!(handed[0], handed[1], "two clients share one runner session");
    assert_eq!(handed[0], handed[2]);
    assert_eq!(handed[1], handed[3]);
}
