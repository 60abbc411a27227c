//! Every route in /openapi.json refuses a missing, wrong, revoked or wrong-role token, and
//! public routes need none. A new route is in the document by construction, so it is
//! checked here without anyone remembering to add it.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{TestServer, id};

const SOME_TASK: &str = "01900000-0000-7000-8000-000000000000";

struct Route {
    method: Method,
    path: String,
    /// The least role it needs; `None` for public routes.
    role: Option<String>,
}

async fn routes(s: &TestServer) -> Vec<Route> {
    let doc: Value = s
        .http
        .get(format!("{}/openapi.json", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let role = op["security"]
                .as_array()
                .and_then(|s| s.first())
                .map(|req| req["bearer"][0].as_str().expect("a role scope").to_owned());
            out.push(Route {
                method: method.to_uppercase().parse().unwrap(),
                path: path.replace("{id}", SOME_TASK),
                role,
            });
        }
    }
    assert!(out.len() >= 18, "found only {} operations", out.len());
    out
}

async fn call(s: &TestServer, r: &Route, token: Option<&str>) -> (StatusCode, Value) {
    let body = if r.method == Method::GET || r.method == Method::DELETE {
        None
    } else {
        Some(json!({}))
    };
    s.request(r.method.clone(), &r.path, token, body).await
}

#[tokio::test]
async fn every_route_checks_the_token_and_its_role() {
    let s = TestServer::start().await;
    let revoked = s.create_token("admin").await;
    let revoked_id = revoked.split('_').nth(1).unwrap().to_owned();
    let (st, _) = s
        .request(
            Method::DELETE,
            &format!("/v1/tokens/{revoked_id}"),
            Some(&s.admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);

    let mut checked = 0;
    for r in routes(&s).await {
        let Some(role) = &r.role else {
            let (st, body) = call(&s, &r, None).await;
            assert_eq!(
                st,
                StatusCode::OK,
                "{} {} is public: {body}",
                r.method,
                r.path
            );
            continue;
        };
        for (label, token) in [
            ("no token", None),
            ("wrong token", Some("tnl_000000000000_0000000000000000")),
            ("garbage", Some("not even a token")),
            ("revoked token", Some(revoked.as_str())),
        ] {
            let (st, body) = call(&s, &r, token).await;
            assert_eq!(
                st,
                StatusCode::UNAUTHORIZED,
                "{} {} with {label}: {body}",
                r.method,
                r.path
            );
            assert_eq!(body["error"]["code"], "unauthorized");
        }
        let wrong_roles: &[&str] = match role.as_str() {
            "client" => &["runner"],
            "runner" => &["client"],
            "admin" => &["client", "runner"],
            other => panic!("unknown role {other}"),
        };
        for wrong in wrong_roles {
            let token = if *wrong == "client" {
                &s.client
            } else {
                &s.runner
            };
            let (st, body) = call(&s, &r, Some(token)).await;
            assert_eq!(
                st,
                StatusCode::FORBIDDEN,
                "{} {} with a {wrong} token: {body}",
                r.method,
                r.path
            );
            assert_eq!(body["error"]["code"], "forbidden");
        }
        // The right role (and admin) get past auth: whatever comes back is not an auth error.
        let right = match role.as_str() {
            "client" => &s.client,
            "runner" => &s.runner,
            _ => &s.admin,
        };
        for token in [right, &s.admin] {
            let (st, body) = call(&s, &r, Some(token)).await;
            assert!(
                st != StatusCode::UNAUTHORIZED && st != StatusCode::FORBIDDEN,
                "{} {} refused its own role: {st} {body}",
                r.method,
                r.path
            );
        }
        checked += 1;
    }
    assert!(checked >= 16);
}

#[tokio::test]
async fn a_client_sees_only_its_own_tasks() {
    let s = TestServer::start().await;
    let mine = s.submit(json!({"agent": "claude", "prompt": "mine"})).await;
    let other = s.create_token("client").await;
    let (st, _) = s
        .get(
            &format!("/v1/tasks/{}", mine["id"].as_str().unwrap()),
            &other,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, list) = s.get("/v1/tasks", &other).await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 0);
    let (st, _) = s
        .post(
            &format!("/v1/tasks/{}/cancel", mine["id"].as_str().unwrap()),
            &other,
            json!({}),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // Admin sees everything.
    let (_, list) = s.get("/v1/tasks", &s.admin).await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_runner_token_cannot_read_tasks_or_forge_attempts() {
    let s = TestServer::start().await;
    let t = s
        .submit(json!({"agent": "claude", "prompt": "secret"}))
        .await;
    let id = t["id"].as_str().unwrap();
    let (st, _) = s.get(&format!("/v1/tasks/{id}"), &s.runner).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    let forged =
        json!({"task": offer["task"], "attempt": offer["attempt"], "lease_token": "0".repeat(32)});
    let (st, _) = s.attempt_call(&forged, "ack", json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT);
}

#[tokio::test]
async fn healthz_reveals_nothing_but_ok() {
    let s = TestServer::start().await;
    let (st, body) = s.request(Method::GET, "/healthz", None, None).await;
    assert_eq!((st, body), (StatusCode::OK, json!({"status": "ok"})));
    let (st, body) = s.request(Method::GET, "/readyz", None, None).await;
    assert_eq!((st, body), (StatusCode::OK, json!({"status": "ready"})));
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive_but_required() {
    let s = TestServer::start().await;
    for (header, want) in [
        (format!("bearer {}", s.client), StatusCode::OK),
        (format!("BEARER {}", s.client), StatusCode::OK),
        (format!("Token {}", s.client), StatusCode::UNAUTHORIZED),
        (s.client.clone(), StatusCode::UNAUTHORIZED),
    ] {
        let st = s
            .http
            .get(format!("{}/v1/tasks", s.url))
            .header("authorization", header.clone())
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(st, want, "{header}");
    }
}

#[tokio::test]
async fn metrics_count_what_happens() {
    let s = TestServer::start().await;
    let t = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    let (st, text) = s.request(Method::GET, "/metrics", None, None).await;
    assert_eq!(st, StatusCode::OK);
    let text = text.as_str().unwrap().to_owned();
    for line in [
        "tunnel_tasks{state=\"running\"} 1",
        "tunnel_tasks{state=\"queued\"} 0",
        "tunnel_tasks_submitted_total 1",
        "tunnel_tasks_offered_total 1",
        "tunnel_dispatch_latency_seconds_count 1",
        "tunnel_runners_online 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(
        !text.contains(t["id"].as_str().unwrap()),
        "no task ids in metrics"
    );
}

/// Every runner call with the lease token of an attempt that is over: finished, lost (its
/// lease ran out), or superseded by the next attempt. Refused with 409, and none changes the
/// task. (A finish repeated by the attempt that finished answers the task as it is: that is
/// how a runner whose first answer was lost retries; it changes nothing.)
#[tokio::test]
async fn lease_tokens_of_ended_attempts_are_refused() {
    let s = TestServer::start().await;
    let calls = || {
        [
            ("ack", json!({})),
            ("heartbeat", json!({})),
            (
                "events",
                json!({"events": [{"n": 99, "kind": "text", "data": {"text": "forged"}}]}),
            ),
            (
                "finish",
                json!({"outcome": "failed", "result": {"error": "forged"}}),
            ),
        ]
    };

    // Finished.
    let t = s.submit(json!({"agent": "claude", "prompt": "done"})).await;
    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    s.run_to_success(&offer, "answer").await;
    for (call, body) in calls() {
        let (st, b) = s.attempt_call(&offer, call, body).await;
        if call == "finish" {
            assert_eq!(st, StatusCode::OK, "{b}");
            assert_eq!(b["result"]["text"], "answer", "{b}");
        } else {
            assert_eq!(st, StatusCode::CONFLICT, "{call} after finish: {b}");
            assert_eq!(b["error"]["code"], "stale_attempt", "{b}");
        }
    }
    let after = s.task(t["id"].as_str().unwrap()).await;
    assert_eq!(after["state"], "succeeded");
    assert_eq!(after["result"], json!({"text": "answer"}));
    let (_, log) = s
        .get(
            &format!("/v1/tasks/{}/events?format=json", id(&t)),
            &s.client,
        )
        .await;
    assert!(!log.to_string().contains("forged"), "{log}");

    // Lost, then retried as attempt 2: attempt 1's token is dead, attempt 2's works.
    let t = s
        .submit(json!({"agent": "claude", "prompt": "lost", "max_attempts": 2}))
        .await;
    let first = s.claim("a", &["claude"], 0).await.unwrap();
    s.attempt_call(&first, "ack", json!({})).await;
    s.clock.advance(s.settings().lease_ms + 1);
    let second = s.claim("b", &["claude"], 10_000).await.expect("retried");
    assert_eq!(second["attempt"], 2);
    for (call, body) in calls() {
        let (st, b) = s.attempt_call(&first, call, body).await;
        assert_eq!(st, StatusCode::CONFLICT, "{call} with a lost lease: {b}");
    }
    // Attempt 2's token with attempt 1's number, and the reverse, are refused too.
    let mut mixed = second.clone();
    mixed["attempt"] = first["attempt"].clone();
    let (st, _) = s.attempt_call(&mixed, "ack", json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT);
    let mut mixed = first.clone();
    mixed["attempt"] = second["attempt"].clone();
    let (st, _) = s.attempt_call(&mixed, "ack", json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT);
    let done = s.run_to_success(&second, "second").await;
    assert_eq!(done["id"], t["id"]);
    assert_eq!(done["runner"], "b");
}

/// A runner token revoked while its task runs stops working at the next call.
#[tokio::test]
async fn a_revoked_runner_token_is_refused_at_once() {
    let s = TestServer::start().await;
    s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    let (st, _) = s.attempt_call(&offer, "ack", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let token_id = s.runner.split('_').nth(1).unwrap().to_owned();
    let (st, _) = s
        .request(
            Method::DELETE,
            &format!("/v1/tokens/{token_id}"),
            Some(&s.admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    for call in ["heartbeat", "finish"] {
        let (st, b) = s
            .attempt_call(
                &offer,
                call,
                json!({"outcome": "succeeded", "result": {}})
                    .as_object()
                    .filter(|_| call == "finish")
                    .map(|m| Value::Object(m.clone()))
                    .unwrap_or(json!({})),
            )
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{call}: {b}");
    }
    let (st, _) = s
        .post(
            "/v1/claim",
            &s.runner,
            json!({"runner": "r", "agents": ["claude"]}),
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

/// Another client's task is not there for a client: not its events (JSON or SSE), not a wait
/// on it, not a cancel; a runner token reads no task at all.
#[tokio::test]
async fn a_client_cannot_read_or_wait_on_another_clients_task() {
    let s = TestServer::start().await;
    let t = s
        .submit(json!({"agent": "claude", "prompt": "secret plan"}))
        .await;
    let id = t["id"].as_str().unwrap();
    let other = s.create_token("client").await;
    for path in [
        format!("/v1/tasks/{id}"),
        format!("/v1/tasks/{id}?wait=1"),
        format!("/v1/tasks/{id}/events?format=json"),
        format!("/v1/tasks/{id}/events"),
    ] {
        let (st, b) = s.get(&path, &other).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{path}: {b}");
        assert!(!b.to_string().contains("secret plan"), "{b}");
        let (st, _) = s.get(&path, &s.runner).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{path} with a runner token");
    }
    let (_, list) = s.get("/v1/tasks?limit=1000", &other).await;
    assert_eq!(list["tasks"], json!([]));
}

/// Session bindings belong to the client token whose task or call made them: another client
/// neither sees them nor rebinds them (the same name is its own conversation), nor resumes
/// that session; admin sees everything; sessions found on a runner's disk are shared.
#[tokio::test]
async fn sessions_belong_to_the_client_that_made_them() {
    let s = TestServer::start().await;
    let sid = "5f1c0000-0000-4000-8000-00000000a11a";
    s.submit(json!({"agent": "claude", "prompt": "p", "conversation": "mine"}))
        .await;
    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    let (st, _) = s
        .attempt_call(
            &offer,
            "finish",
            json!({"outcome": "succeeded", "result": {"text": "ok", "session_id": sid}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = s
        .post(
            "/v1/runners/r/sessions",
            &s.runner,
            json!({"sessions": [{"agent": "claude", "session_id": "on-disk-1", "last_used": 1}]}),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);

    let other = s.create_token("client").await;
    let (_, mine) = s.get("/v1/sessions", &s.client).await;
    assert_eq!(mine["sessions"][0]["session_id"], sid, "{mine}");
    let (_, theirs) = s.get("/v1/sessions", &other).await;
    assert_eq!(theirs["sessions"], json!([]), "{theirs}");
    let recent: Vec<&str> = theirs["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["session_id"].as_str())
        .collect();
    assert_eq!(recent, ["on-disk-1"], "{theirs}");

    // The same name is the other client's own conversation: binding it changes nothing here.
    let cmd = json!({"conversation": "mine", "agent": "claude"});
    let (st, b) = s.post("/v1/sessions/new", &other, cmd.clone()).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let (st, b) = s
        .post(
            "/v1/sessions/resume",
            &other,
            json!({"conversation": "elsewhere", "agent": "claude", "session_id": sid}),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{b}");
    let (st, b) = s
        .post(
            "/v1/tasks",
            &other,
            json!({"agent": "claude", "prompt": "x", "conversation": "mine"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let (st, b) = s
        .post(
            "/v1/tasks",
            &other,
            json!({"agent": "claude", "prompt": "x", "session": {"resume": sid}}),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{b}");
    // Nothing changed for the owner.
    let (_, mine) = s.get("/v1/sessions?conversation=mine", &s.client).await;
    assert_eq!(mine["sessions"][0]["session_id"], sid, "{mine}");

    // Other conversations, and sessions found on a runner's disk, are open to it.
    let (st, _) = s
        .post(
            "/v1/sessions/resume",
            &other,
            json!({"conversation": "theirs", "agent": "claude", "session_id": "on-disk-1"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, mine) = s.get("/v1/sessions", &s.client).await;
    assert!(
        !mine.to_string().contains("\"theirs\""),
        "a client sees another's binding: {mine}"
    );

    // The owner and admin can rebind; admin sees everything.
    let (st, _) = s.post("/v1/sessions/new", &s.client, cmd.clone()).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = s.post("/v1/sessions/new", &s.admin, cmd).await;
    assert_eq!(st, StatusCode::OK);
    // Admin sees every namespace's: the client's "mine", the other's "mine" and "theirs", and
    // its own (shared) "mine".
    let (_, all) = s.get("/v1/sessions", &s.admin).await;
    assert_eq!(all["sessions"].as_array().unwrap().len(), 4, "{all}");
    let shared = all["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b.get("owner").is_none())
        .count();
    assert_eq!(shared, 1, "{all}");
}
