//! Hostile load (issue #14): queue floods and the tenancy edges, through the real server.

use reqwest::StatusCode;
use serde_json::json;
use tunnel_store::QueueSettings;

use crate::common::{Options, TestServer, id};

#[tokio::test]
async fn a_token_beyond_its_queue_cap_gets_429_and_nothing_is_queued() {
    let s = TestServer::start_with(Options {
        queue: Some(QueueSettings {
            max_queued_per_token: Some(2),
            ..QueueSettings::default()
        }),
        ..Options::default()
    })
    .await;
    for i in 0..2 {
        s.submit(json!({"agent": "claude", "prompt": format!("p{i}")}))
            .await;
    }
    let (st, body) = s
        .post(
            "/v1/tasks",
            &s.client,
            json!({"agent": "claude", "prompt": "one too many"}),
        )
        .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "queue_full");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("2 tasks waiting"), "{msg}");
    let (_, list) = s.get("/v1/tasks?limit=10", &s.client).await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 2, "{list}");
    // Another token still submits; a claimed task frees a place.
    let other = s.create_token("client").await;
    let (st, _) = s
        .post(
            "/v1/tasks",
            &other,
            json!({"agent": "claude", "prompt": "x"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    s.claim("r", &["claude"], 0).await.unwrap();
    s.submit(json!({"agent": "claude", "prompt": "fits now"}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_no_runner_takes_ends_timed_out_after_the_maximum_time_in_queue() {
    let s = TestServer::start_with(Options {
        queue: Some(QueueSettings {
            max_queue_ms: Some(3_600_000),
            ..QueueSettings::default()
        }),
        ..Options::default()
    })
    .await;
    let old = id(&s
        .submit(json!({"agent": "gemini", "prompt": "no runner has gemini"}))
        .await);
    s.clock.advance(1_800_000);
    let young = id(&s
        .submit(json!({"agent": "gemini", "prompt": "younger"}))
        .await);
    s.clock.advance(1_800_000);
    let (_, t) = s.get(&format!("/v1/tasks/{old}?wait=10"), &s.client).await;
    assert_eq!(t["state"], "timed_out", "{t}");
    assert!(
        t["reason"]
            .as_str()
            .unwrap()
            .contains("no runner took it within the maximum time in queue (1 h)"),
        "{t}"
    );
    assert_eq!(s.task(&young).await["state"], "queued");
}

/// Conversation names are scoped by owner: two client tokens each use `discord:123` at the
/// same time and each gets its own conversation, its own agent session and runner affinity;
/// neither gets a 409 nor sees the other's tasks or bindings. (Before: the second got 409
/// "conversation belongs to another token", forever, which also told it the name existed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_client_tokens_each_have_their_own_conversation_of_one_name() {
    let s = TestServer::start().await;
    let (a, b) = (s.client.clone(), s.create_token("client").await);
    let conv = "discord:123";
    let submit = |token: String, prompt: &'static str| {
        let s = &s;
        async move {
            let (st, t) = s
                .post(
                    "/v1/tasks",
                    &token,
                    json!({"agent": "claude", "prompt": prompt, "conversation": conv}),
                )
                .await;
            assert_eq!(st, StatusCode::CREATED, "{prompt}: {t}");
            t
        }
    };
    // A's task is running in the conversation when B first uses the name.
    submit(a.clone(), "a1").await;
    let oa = s.claim("mac-a", &["claude"], 0).await.unwrap();
    s.attempt_call(&oa, "ack", json!({})).await;
    let b1 = submit(b.clone(), "b1").await;
    assert_eq!(b1["queue_position"], 0, "B waits behind A's task: {b1}");
    let ob = s.claim("mac-b", &["claude"], 0).await.unwrap();
    assert_eq!(ob["task"]["prompt"], "b1");
    s.attempt_call(&ob, "ack", json!({})).await;
    for (o, sid) in [(&oa, "sess-a"), (&ob, "sess-b")] {
        let (st, body) = s
            .attempt_call(
                o,
                "finish",
                json!({"outcome": "succeeded", "result": {"text": "ok", "session_id": sid}}),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }
    // Each one's next task resumes its own session, on the runner that has it.
    submit(a.clone(), "a2").await;
    submit(b.clone(), "b2").await;
    let o = s.claim("mac-b", &["claude"], 0).await.unwrap();
    assert_eq!(o["task"]["prompt"], "b2");
    assert_eq!(o["resume_session_id"], "sess-b");
    s.run_to_success(&o, "ok").await;
    let o = s.claim("mac-a", &["claude"], 0).await.unwrap();
    assert_eq!(o["task"]["prompt"], "a2");
    assert_eq!(o["resume_session_id"], "sess-a");
    s.run_to_success(&o, "ok").await;
    // B starts its conversation over: A's binding does not move.
    let (st, body) = s
        .post(
            "/v1/sessions/new",
            &b,
            json!({"conversation": conv, "agent": "claude"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");

    let q = format!("conversation={}", conv.replace(':', "%3A"));
    for (token, me, other, sid) in [(&a, "a", "b", Some("sess-a")), (&b, "b", "a", None)] {
        let (_, list) = s.get(&format!("/v1/tasks?{q}"), token).await;
        let prompts: Vec<&str> = list["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["prompt"].as_str().unwrap())
            .collect();
        assert_eq!(prompts, [format!("{me}2"), format!("{me}1")], "{list}");
        let (_, sessions) = s.get(&format!("/v1/sessions?{q}"), token).await;
        let text = sessions.to_string();
        assert_eq!(sessions["sessions"].as_array().unwrap().len(), 1, "{text}");
        assert_eq!(
            sessions["sessions"][0]["session_id"].as_str(),
            sid,
            "{text}"
        );
        assert!(sessions["sessions"][0].get("owner").is_none(), "{text}");
        assert!(
            !text.contains(&format!("sess-{other}")),
            "{me} sees {other}'s: {text}"
        );
    }
    // An admin sees both, with their owners, and its own name is a third, shared one.
    let (_, all) = s.get(&format!("/v1/sessions?{q}"), &s.admin).await;
    let mut owners: Vec<&str> = all["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["owner"].as_str().unwrap())
        .collect();
    owners.sort_unstable();
    // A token is `tnl_<id>_<secret>`; the owner shown is the id.
    let mut ids: Vec<&str> = [&a, &b]
        .iter()
        .map(|t| t.split('_').nth(1).unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(owners, ids, "{all}");
    let (st, _) = s
        .post(
            "/v1/tasks",
            &s.admin,
            json!({"agent": "claude", "prompt": "adm", "conversation": conv}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let o = s.claim("mac-a", &["claude"], 0).await.unwrap();
    assert_eq!(o["task"]["prompt"], "adm");
    assert!(
        o.get("resume_session_id").is_none_or(|v| v.is_null()),
        "{o}"
    );
}

/// An admin's conversation is shared among admin tokens: a client using the same name gets its
/// own conversation, so whatever it binds or resumes there never reaches the admin's session.
#[tokio::test]
async fn a_client_cannot_take_over_a_conversation_an_admin_uses() {
    let s = TestServer::start().await;
    let (st, _) = s
        .post(
            "/v1/tasks",
            &s.admin,
            json!({"agent": "claude", "prompt": "admin's work", "conversation": "ops:1"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    s.attempt_call(&o, "ack", json!({})).await;
    s.attempt_call(
        &o,
        "finish",
        json!({"outcome": "succeeded", "result": {"session_id": "admin-sess"}}),
    )
    .await;
    // The client's own session, made in its own conversation.
    s.submit(json!({"agent": "claude", "prompt": "mine", "conversation": "mine:1"}))
        .await;
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    s.attempt_call(&o, "ack", json!({})).await;
    s.attempt_call(
        &o,
        "finish",
        json!({"outcome": "succeeded", "result": {"session_id": "client-sess"}}),
    )
    .await;

    // Rebinding or switching "ops:1" is allowed: it is the client's own "ops:1".
    let (st, b) = s
        .post(
            "/v1/sessions/resume",
            &s.client,
            json!({"conversation": "ops:1", "agent": "claude", "session_id": "client-sess"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let (st, b) = s
        .post(
            "/v1/tasks",
            &s.client,
            json!({"agent": "claude", "prompt": "switch", "conversation": "ops:1",
                   "session": {"resume": "client-sess"}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    assert_eq!(o["resume_session_id"], "client-sess");
    s.run_to_success(&o, "ok").await;
    // Another client's "ops:1" is its own again, fresh.
    let other = s.create_token("client").await;
    let (st, b) = s
        .post(
            "/v1/tasks",
            &other,
            json!({"agent": "claude", "prompt": "me too", "conversation": "ops:1"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    assert!(
        o.get("resume_session_id").is_none_or(|v| v.is_null()),
        "{o}"
    );
    s.run_to_success(&o, "ok").await;
    // The admin's next task still runs in the admin's session.
    s.post(
        "/v1/tasks",
        &s.admin,
        json!({"agent": "claude", "prompt": "admin again", "conversation": "ops:1"}),
    )
    .await;
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    assert_eq!(o["resume_session_id"], "admin-sess");
}

/// A webhook receiver that echoes the request's path and query (and, as a stand-in for any
/// text that happens to hold one, the Discord bot token) in its 400 answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_url_secrets_and_configured_secrets_never_reach_delivery_errors() {
    use axum::Router;
    use axum::http::Uri;
    use tunnel_delivery::{DiscordConfig, PlatformsConfig, WebhookConfig};

    const DISCORD_TOKEN: &str = "discord-bot-token-MTIzNDU2Nzg5MA.GhIjKl";
    let app = Router::new().fallback(|uri: Uri| async move {
        let echoed = uri.to_string();
        (
            StatusCode::BAD_REQUEST,
            format!(
                "no such hook: {echoed} (path {}, decoded T0AAAA/B0BBBB/s3cr3t-path-part, \
                 query {}); bot {DISCORD_TOKEN}",
                uri.path(),
                uri.query().unwrap_or_default()
            ),
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut delivery = PlatformsConfig {
        discord: Some(DiscordConfig::new(DISCORD_TOKEN)),
        ..PlatformsConfig::default()
    };
    delivery.webhooks.insert(
        "ops".into(),
        WebhookConfig {
            url: format!("{base}/hooks/T0AAAA/B0BBBB/s3cr3t%2Dpath-part?token=q-secret-123&v=2"),
            secret: "hmac-key-xyz".into(),
        },
    );
    let s = TestServer::start_with(Options {
        delivery,
        ..Options::default()
    })
    .await;
    let task = s
        .submit(json!({"agent": "claude", "prompt": "p",
                       "reply_to": {"platform": "webhook", "channel": "ops"}}))
        .await;
    let o = s.claim("r", &["claude"], 0).await.unwrap();
    s.run_to_success(&o, "answer").await;
    let t = loop {
        let (_, t) = s
            .get(&format!("/v1/tasks/{}?wait=1", id(&task)), &s.client)
            .await;
        if t["delivery"]["state"] == "failed" {
            break t;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    let error = t["delivery"]["error"].as_str().unwrap();
    assert!(error.contains("HTTP 400"), "{error}");
    for secret in [
        "T0AAAA",
        "B0BBBB",
        "s3cr3t",
        "path-part",
        "q-secret-123",
        "token=",
        "hmac-key-xyz",
        DISCORD_TOKEN,
        "MTIzNDU2Nzg5MA",
    ] {
        assert!(!error.contains(secret), "{secret:?} in {error:?}");
    }
}

#[tokio::test]
async fn a_runner_name_belongs_to_the_token_that_registered_it() {
    let s = TestServer::start().await;
    s.submit(json!({"agent": "claude", "prompt": "first", "conversation": "c1"}))
        .await;
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    s.attempt_call(&o, "ack", json!({})).await;
    s.attempt_call(
        &o,
        "finish",
        json!({"outcome": "succeeded", "result": {"session_id": "sess-on-mac"}}),
    )
    .await;
    let next = s
        .submit(json!({"agent": "claude", "prompt": "second", "conversation": "c1"}))
        .await;

    let other = s.create_token("runner").await;
    let (st, b) = s
        .post(
            "/v1/claim",
            &other,
            json!({"runner": "mac", "agents": ["claude"], "wait_ms": 0}),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("belongs to another runner token"),
        "{b}"
    );
    assert_eq!(s.task(&id(&next)).await["state"], "queued");
    // Under its own name it claims, but not the task pinned to mac's session.
    let (st, _) = s
        .post(
            "/v1/claim",
            &other,
            json!({"runner": "mini", "agents": ["claude"], "wait_ms": 0}),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let o = s.claim("mac", &["claude"], 0).await.unwrap();
    assert_eq!(o["task"]["id"], next["id"]);
    assert_eq!(o["resume_session_id"], "sess-on-mac");
    // The compat API's names for original runners are not for API v1 runners to take.
    let (st, b) = s
        .post(
            "/v1/claim",
            &other,
            json!({"runner": "openclaw.worker-token", "agents": ["claude"], "wait_ms": 0}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{b}");
}
