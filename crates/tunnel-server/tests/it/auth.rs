//! Every route in /openapi.json refuses a missing, wrong, revoked or wrong-role token, and
//! public routes need none. A new route is in the document by construction, so it is
//! checked here without anyone remembering to add it.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::TestServer;

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
