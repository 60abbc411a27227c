//! Approvals over real HTTP: a fake runner (plain HTTP calls with its attempt) asks, a client
//! answers, the runner's wait returns; expiry by the manual clock; cancel and the end of the
//! attempt; a restart while pending; and every refusal.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::TestServer;

/// A running attempt: submitted, claimed and acked.
async fn running(s: &TestServer) -> Value {
    running_with(s, json!({"agent": "claude", "prompt": "clean up"})).await
}

async fn running_with(s: &TestServer, submit: Value) -> Value {
    s.submit(submit).await;
    let offer = s.claim("r1", &["claude"], 0).await.expect("an offer");
    let (st, b) = s.attempt_call(&offer, "ack", json!({})).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    offer
}

fn request(key: &str) -> Value {
    json!({
        "key": key,
        "tool": {"kind": "execute", "title": "Run rm -rf build", "command": "rm -rf build"},
        "options": [
            {"id": "allow", "name": "Allow", "kind": "allow_once"},
            {"id": "always", "name": "Always allow", "kind": "allow_always"},
            {"id": "reject", "name": "Reject", "kind": "reject_once"}
        ]
    })
}

/// Asks as the offer's runner; returns the status and the approval.
async fn ask(s: &TestServer, offer: &Value, body: Value) -> (StatusCode, Value) {
    s.attempt_call(offer, "approvals", body).await
}

async fn ask_ok(s: &TestServer, offer: &Value, key: &str) -> Value {
    let (st, a) = ask(s, offer, request(key)).await;
    assert_eq!(st, StatusCode::CREATED, "{a}");
    a
}

async fn wait(s: &TestServer, offer: &Value, aid: &str, wait_ms: u64) -> (StatusCode, Value) {
    s.attempt_call(
        offer,
        &format!("approvals/{aid}/wait"),
        json!({"wait_ms": wait_ms}),
    )
    .await
}

async fn answer(s: &TestServer, token: &str, aid: &str, body: Value) -> (StatusCode, Value) {
    s.post(&format!("/v1/approvals/{aid}"), token, body).await
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn ask_list_answer_and_the_wait_returns() {
    let s = TestServer::start().await;
    let offer = running(&s).await;
    let task_id = offer["task"]["id"].as_str().unwrap().to_owned();
    let a = ask_ok(&s, &offer, "call_1").await;
    assert_eq!(a["state"], "pending");
    assert_eq!(a["agent"], "claude");
    assert_eq!(a["runner"], "r1");
    assert_eq!(a["task_id"], task_id.as_str());
    assert_eq!(
        a["expires_at"].as_i64().unwrap() - a["asked_at"].as_i64().unwrap(),
        600_000
    );
    let aid = id(&a);
    assert!(aid.starts_with("apr_"), "{aid}");

    // The task shows that it waits, and the client sees the request.
    let task = s.task(&task_id).await;
    assert_eq!(task["waiting_for_approval"], aid.as_str());
    let (st, list) = s.get("/v1/approvals?state=pending", &s.client).await;
    assert_eq!(st, StatusCode::OK, "{list}");
    assert_eq!(list["approvals"][0]["id"], aid.as_str());
    let (st, one) = s.get(&format!("/v1/approvals/{aid}"), &s.client).await;
    assert_eq!(
        (st, one["id"].as_str()),
        (StatusCode::OK, Some(aid.as_str()))
    );

    // A wait with no answer yet comes back pending when its time runs out.
    let (st, w) = wait(&s, &offer, &aid, 50).await;
    assert_eq!((st, w["state"].as_str()), (StatusCode::OK, Some("pending")));

    // A held wait ends on the answer, well before its own time.
    let waiter = {
        let (url, token) = (s.url.clone(), s.runner.clone());
        let body = json!({"attempt": offer["attempt"], "lease_token": offer["lease_token"], "wait_ms": 20_000});
        let path = format!("{url}/v1/tasks/{task_id}/approvals/{aid}/wait");
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(path)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let done = Instant::now();
            (r.status(), r.json::<Value>().await.unwrap(), done)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answered = Instant::now();
    let (st, settled) = answer(
        &s,
        &s.client,
        &aid,
        json!({"decision": "allow_once", "by": "chat:alice"}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{settled}");
    assert_eq!(settled["state"], "allowed");
    assert_eq!(settled["outcome"]["decision"], "allow_once");
    assert_eq!(settled["outcome"]["option_id"], "allow");
    assert_eq!(settled["outcome"]["by"], "chat:alice via token it-client");
    let (st, w, done) = waiter.await.unwrap();
    assert_eq!((st, w["state"].as_str()), (StatusCode::OK, Some("allowed")));
    assert_eq!(w["outcome"]["option_id"], "allow");
    let lag = done.saturating_duration_since(answered);
    eprintln!("answer sent -> the runner's held wait returned: {lag:?}");
    assert!(
        lag < Duration::from_secs(5),
        "the wait ended {lag:?} after the answer"
    );

    // Settled: the task no longer waits; the event log has the question and the answer.
    let task = s.task(&task_id).await;
    assert!(task.get("waiting_for_approval").is_none(), "{task}");
    let (_, events) = s
        .get(
            &format!("/v1/tasks/{task_id}/events?format=json"),
            &s.client,
        )
        .await;
    let states: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "approval")
        .map(|e| e["data"]["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "allowed"]);
    // A wait after the answer returns at once.
    let (st, w) = wait(&s, &offer, &aid, 20_000).await;
    assert_eq!((st, w["state"].as_str()), (StatusCode::OK, Some("allowed")));
    s.stop().await;
}

#[tokio::test]
async fn session_and_deny_map_to_the_agents_options() {
    let s = TestServer::start().await;
    let offer = running(&s).await;
    let a = ask_ok(&s, &offer, "k1").await;
    let (st, b) = answer(&s, &s.client, &id(&a), json!({"decision": "allow_session"})).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["outcome"]["option_id"], "always");
    assert_eq!(b["outcome"]["by"], "token it-client");

    let a = ask_ok(&s, &offer, "k2").await;
    let (st, b) = answer(
        &s,
        &s.admin,
        &id(&a),
        json!({"decision": "deny", "message": "not that folder"}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["state"], "denied");
    assert_eq!(b["outcome"]["option_id"], "reject");
    assert_eq!(b["outcome"]["message"], "not that folder");
    let (_, w) = wait(&s, &offer, &id(&a), 0).await;
    assert_eq!(w["outcome"]["message"], "not that folder");

    // An agent that offers only allow-always and reject-always: allow once has no option
    // (the runner cancels: no), allow for the session takes "always", deny takes reject-always.
    let mut only_always = request("k3");
    only_always["options"] = json!([
        {"id": "aa", "name": "Always", "kind": "allow_always"},
        {"id": "ra", "name": "Never", "kind": "reject_always"}
    ]);
    let (_, a) = ask(&s, &offer, only_always).await;
    let (_, b) = answer(&s, &s.client, &id(&a), json!({"decision": "allow_once"})).await;
    assert_eq!(b["state"], "allowed");
    assert!(b["outcome"].get("option_id").is_none(), "{b}");
    s.stop().await;
}

#[tokio::test]
async fn the_same_key_is_the_same_request() {
    let s = TestServer::start().await;
    let offer = running(&s).await;
    let a = ask_ok(&s, &offer, "call_9").await;
    let (st, again) = ask(&s, &offer, request("call_9")).await;
    assert_eq!(st, StatusCode::OK, "{again}");
    assert_eq!(again["id"], a["id"]);
    let (_, list) = s.get("/v1/approvals", &s.client).await;
    assert_eq!(list["approvals"].as_array().unwrap().len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn unanswered_requests_expire_as_denied() {
    let s = TestServer::start().await;
    let offer = running(&s).await;
    let mut body = request("slow");
    body["timeout_ms"] = json!(1_000);
    let (st, a) = ask(&s, &offer, body).await;
    assert_eq!(st, StatusCode::CREATED, "{a}");
    let aid = id(&a);
    s.clock.advance(1_001);
    // The deadline timer expires it; the wait sees it without an answer.
    let (st, w) = wait(&s, &offer, &aid, 10_000).await;
    assert_eq!(st, StatusCode::OK, "{w}");
    assert_eq!(w["state"], "expired");
    assert_eq!(w["outcome"]["by"], "timeout");
    assert_eq!(w["outcome"]["option_id"], "reject");
    // A late answer is told so.
    let (st, e) = answer(&s, &s.client, &aid, json!({"decision": "allow_once"})).await;
    assert_eq!(st, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["code"], "approval_expired");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("expired at") && msg.contains("answered deny"),
        "{msg}"
    );
    s.stop().await;
}

#[tokio::test]
async fn cancel_and_the_end_of_the_attempt_cancel_pending_requests() {
    let s = TestServer::start().await;
    let offer = running(&s).await;
    let task_id = offer["task"]["id"].as_str().unwrap().to_owned();
    let a = ask_ok(&s, &offer, "c1").await;
    let (st, _) = s
        .post(&format!("/v1/tasks/{task_id}/cancel"), &s.client, json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, w) = wait(&s, &offer, &id(&a), 10_000).await;
    assert_eq!(
        (st, w["state"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    assert!(w["outcome"].get("option_id").is_none(), "{w}");
    // No new questions while it is being cancelled.
    let (st, e) = ask(&s, &offer, request("c2")).await;
    assert_eq!(st, StatusCode::CONFLICT, "{e}");
    let (st, e) = answer(&s, &s.client, &id(&a), json!({"decision": "deny"})).await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("already_decided"))
    );

    // The attempt finishing settles what is still pending.
    let offer = running(&s).await;
    let a = ask_ok(&s, &offer, "f1").await;
    let (st, t) = s
        .attempt_call(
            &offer,
            "finish",
            json!({"outcome": "succeeded", "result": {"text": "ok"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{t}");
    let (_, got) = s.get(&format!("/v1/approvals/{}", id(&a)), &s.client).await;
    assert_eq!(got["state"], "cancelled");
    assert_eq!(got["outcome"]["by"], "cancel");
    // And a lost lease too.
    let offer = running(&s).await;
    let a = ask_ok(&s, &offer, "l1").await;
    s.clock.advance(s.settings().lease_ms + 1);
    let mut got = Value::Null;
    for _ in 0..200 {
        got = s
            .get(&format!("/v1/approvals/{}", id(&a)), &s.client)
            .await
            .1;
        if got["state"] != "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(got["state"], "cancelled", "{got}");
    // The runner of the lost attempt, if it is still there, learns the request is off (its
    // heartbeat tells it the attempt is over).
    let (st, w) = wait(&s, &offer, &id(&a), 0).await;
    assert_eq!(
        (st, w["state"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    let (st, _) = s.attempt_call(&offer, "heartbeat", json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT);
    s.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_the_question_and_the_wait_gets_the_answer() {
    let s = TestServer::start().await;
    let offer = running(&s).await;
    let a = ask_ok(&s, &offer, "r1").await;
    let s = s.restart().await;
    let (_, got) = s.get(&format!("/v1/approvals/{}", id(&a)), &s.client).await;
    assert_eq!(got["state"], "pending");
    let waiter = {
        let (url, token) = (s.url.clone(), s.runner.clone());
        let task_id = offer["task"]["id"].as_str().unwrap().to_owned();
        let body = json!({"attempt": offer["attempt"], "lease_token": offer["lease_token"], "wait_ms": 10_000});
        let path = format!("{url}/v1/tasks/{task_id}/approvals/{}/wait", id(&a));
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(path)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (st, b) = answer(&s, &s.client, &id(&a), json!({"decision": "allow_once"})).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let (st, w) = waiter.await.unwrap();
    assert_eq!((st, w["state"].as_str()), (StatusCode::OK, Some("allowed")));
    s.stop().await;
}

#[tokio::test]
async fn refusals() {
    let s = TestServer::start().await;
    let offer = running(&s).await;
    let task_id = offer["task"]["id"].as_str().unwrap().to_owned();
    let a = ask_ok(&s, &offer, "x").await;
    let aid = id(&a);
    let other = s.create_token("client").await;

    // Another client: not found, not listed, cannot answer.
    let (st, _) = s.get(&format!("/v1/approvals/{aid}"), &other).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, list) = s.get("/v1/approvals", &other).await;
    assert_eq!(list["approvals"], json!([]));
    let (st, _) = answer(&s, &other, &aid, json!({"decision": "allow_once"})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // A runner token may not answer.
    let (st, _) = answer(&s, &s.runner, &aid, json!({"decision": "allow_once"})).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // Unknown and malformed ids.
    let unknown = "apr_0190b2d4-0000-7000-8000-000000000001";
    let (st, _) = answer(&s, &s.client, unknown, json!({"decision": "allow_once"})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = s.get("/v1/approvals/nope", &s.client).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    // Invalid bodies and queries.
    for bad in [
        json!({"decision": "maybe"}),
        json!({"decision": "deny", "message": ""}),
        json!({"decision": "deny", "extra": 1}),
        json!({"decision": "deny", "by": "a\u{1b}b"}),
    ] {
        let (st, e) = answer(&s, &s.client, &aid, bad.clone()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {e}");
    }
    let (st, _) = s.get("/v1/approvals?state=maybe", &s.client).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = s.get("/v1/approvals?limit=0", &s.client).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let mut no_allow = request("y");
    no_allow["options"] = json!([{"id": "r", "name": "Reject", "kind": "reject_once"}]);
    let (st, _) = ask(&s, &offer, no_allow).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let mut short = request("y");
    short["timeout_ms"] = json!(5);
    let (st, _) = ask(&s, &offer, short).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    // A wait with a bad body, and runner paths that are not ids.
    let (st, _) = s
        .attempt_call(
            &offer,
            &format!("approvals/{aid}/wait"),
            json!({"wait_ms": "soon"}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = s
        .post(
            &format!("/v1/tasks/{task_id}/approvals/nope/wait"),
            &s.runner,
            json!({"attempt": 1, "lease_token": "x"}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = s
        .post("/v1/tasks/nope/approvals", &s.runner, request("k"))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    // Another task's request is not found through that task's (valid) attempt.
    let other = running_with(&s, json!({"agent": "claude", "prompt": "other"})).await;
    let (st, _) = wait(&s, &other, &aid, 0).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // Stale attempt: a wrong lease token, for the ask and the wait.
    let mut stale = offer.clone();
    stale["lease_token"] = json!("0123456789abcdef0123456789abcdef");
    let (st, e) = ask(&s, &stale, request("z")).await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("stale_attempt"))
    );
    let (st, e) = wait(&s, &stale, &aid, 0).await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("stale_attempt"))
    );
    // A client token may not ask or wait.
    let (st, _) = s
        .post(
            &format!("/v1/tasks/{task_id}/approvals"),
            &s.client,
            json!({"attempt": 1, "lease_token": "x", "key": "k", "tool": {"kind": "execute", "title": "t"}, "options": []}),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // Already decided: who and how.
    let (st, _) = answer(
        &s,
        &s.client,
        &aid,
        json!({"decision": "deny", "by": "bob"}),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, e) = answer(&s, &s.client, &aid, json!({"decision": "allow_once"})).await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(e["error"]["code"], "already_decided");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("already denied by bob via token it-client at "),
        "{msg}"
    );
    // Nothing changed by the refusals.
    let (_, got) = s.get(&format!("/v1/approvals/{aid}"), &s.client).await;
    assert_eq!(got["state"], "denied");
    s.stop().await;
}
