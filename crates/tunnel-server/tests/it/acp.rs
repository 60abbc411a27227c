//! `/acp`: ACP over a WebSocket, driven by a real WebSocket client (tokio-tungstenite). Who may
//! connect, what a connection may cost, and that the bridge acts with the caller's own token.
//! The full prompt → runner → agent path is in the `tunnel` crate's tests (acp.rs).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::{Options, TestServer};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects to `/acp{query}` with `token`; the refusal's status and JSON body otherwise.
async fn connect(s: &TestServer, query: &str, token: Option<&str>) -> Result<Ws, (u16, Value)> {
    let url = format!("{}/acp{query}", s.url.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            Err((
                resp.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ))
        }
        Err(e) => panic!("connecting to /acp: {e}"),
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next JSON-RPC message; panics on a close or after 30 s.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("no message from /acp in 30 s")
            .expect("/acp closed")
            .expect("/acp failed");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Sends a request and returns its answer (notifications in between are skipped).
async fn call(ws: &mut Ws, id: u64, method: &str, params: Value) -> Value {
    send(
        ws,
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
    )
    .await;
    loop {
        let v = next(ws).await;
        if v["id"] == id && v.get("method").is_none() {
            return v;
        }
    }
}

/// How the server ended the connection: the close code, or none when it just went away.
async fn closed(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("/acp still open after 30 s")
        {
            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

fn limits() -> tunnel_server::AcpLimits {
    tunnel_server::AcpLimits {
        max_connections: 3,
        max_per_token: 2,
        max_pending: 2,
        max_sessions: 3,
        idle_timeout: Duration::from_millis(2000),
    }
}

#[tokio::test]
async fn acp_websocket_refuses_strangers_runners_and_plain_http() {
    let s = TestServer::start().await;
    let (code, e) = connect(&s, "", None).await.unwrap_err();
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{e}"
    );
    let (code, e) = connect(&s, "", Some("tnl_nope_nope")).await.unwrap_err();
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{e}"
    );
    let (code, e) = connect(&s, "", Some(&s.runner)).await.unwrap_err();
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{e}"
    );
    let (code, e) = connect(&s, "?agent=../x", Some(&s.client))
        .await
        .unwrap_err();
    assert_eq!(code, 400, "{e}");
    let (code, e) = connect(&s, "?colour=red", Some(&s.client))
        .await
        .unwrap_err();
    assert_eq!(code, 400, "{e}");
    // Plain HTTP (no upgrade): a clear error, not a hang.
    let (code, e) = s.get("/acp", &s.client).await;
    assert_eq!(code.as_u16(), 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("WebSocket"),
        "{e}"
    );
    // A client token connects; an admin token too.
    let mut ws = connect(&s, "", Some(&s.client)).await.unwrap();
    let init = call(&mut ws, 1, "initialize", json!({"protocolVersion": 1})).await;
    assert_eq!(init["result"]["protocolVersion"], 1, "{init}");
    assert!(init["result"]["agentCapabilities"].get("fs").is_none());
    connect(&s, "", Some(&s.admin)).await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn acp_websocket_acts_with_the_callers_token() {
    let s = TestServer::start().await;
    let mut ws = connect(&s, "?agent=echo&project=web", Some(&s.client))
        .await
        .unwrap();
    call(&mut ws, 1, "initialize", json!({"protocolVersion": 1})).await;
    let r = call(
        &mut ws,
        2,
        "session/new",
        json!({"cwd": "/src/web", "mcpServers": []}),
    )
    .await;
    let sid = r["result"]["sessionId"].as_str().unwrap().to_owned();
    // The conversation is the client token's: it sees it, another client token does not.
    let (_, mine) = s
        .get(&format!("/v1/sessions?conversation={sid}"), &s.client)
        .await;
    assert_eq!(mine["sessions"].as_array().unwrap().len(), 1, "{mine}");
    let other = s.create_token("client").await;
    let (_, theirs) = s
        .get(&format!("/v1/sessions?conversation={sid}"), &other)
        .await;
    assert!(
        theirs["sessions"].as_array().unwrap().is_empty(),
        "{theirs}"
    );
    // The other token's ACP connection cannot load it.
    let mut intruder = connect(&s, "?agent=echo&project=web", Some(&other))
        .await
        .unwrap();
    let e = call(
        &mut intruder,
        1,
        "session/load",
        json!({"sessionId": sid, "cwd": "/src/web"}),
    )
    .await;
    assert_eq!(e["error"]["code"], -32002, "{e}");
    // session/list: the caller's ACP sessions only.
    let l = call(&mut ws, 10, "session/list", json!({"cwd": "/src/web"})).await;
    let listed = l["result"]["sessions"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{l}");
    assert_eq!(listed[0]["sessionId"], sid.as_str());
    assert_eq!(listed[0]["cwd"], "/src/web");
    assert!(
        listed[0]["updatedAt"].as_str().unwrap().ends_with('Z'),
        "{l}"
    );
    let l = call(&mut intruder, 2, "session/list", json!({})).await;
    assert_eq!(l["result"]["sessions"], json!([]), "{l}");
    // Methods of the spec this agent does not advertise: a clear answer.
    let init = call(
        &mut intruder,
        3,
        "initialize",
        json!({"protocolVersion": 1}),
    )
    .await;
    assert_eq!(
        init["result"]["agentCapabilities"]["sessionCapabilities"]["list"],
        json!({})
    );
    let e = call(
        &mut ws,
        11,
        "session/set_mode",
        json!({"sessionId": sid, "modeId": "plan"}),
    )
    .await;
    assert_eq!(e["error"]["code"], -32601, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not offered"),
        "{e}"
    );
    // A prompt becomes a task of the caller's token in that conversation (queued: no runner).
    send(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": 3, "method": "session/prompt", "params": {"sessionId": sid, "prompt": [{"type": "text", "text": "hi"}]}}),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let task = loop {
        let (_, l) = s
            .get(&format!("/v1/tasks?conversation={sid}"), &s.client)
            .await;
        if let Some(t) = l["tasks"].as_array().and_then(|t| t.first()) {
            break t.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no task");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(task["prompt"], "hi");
    assert_eq!(task["project"], "web");
    let (_, l) = s
        .get(&format!("/v1/tasks?conversation={sid}"), &other)
        .await;
    assert!(l["tasks"].as_array().unwrap().is_empty(), "{l}");
    // session/cancel cancels it; the prompt answers `cancelled`.
    send(
        &mut ws,
        json!({"jsonrpc": "2.0", "method": "session/cancel", "params": {"sessionId": sid}}),
    )
    .await;
    loop {
        let v = next(&mut ws).await;
        if v["id"] == 3 {
            assert_eq!(v["result"]["stopReason"], "cancelled", "{v}");
            break;
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn acp_websocket_bounds_what_a_connection_costs() {
    let s = TestServer::start_with(Options {
        acp: Some(limits()),
        max_body_bytes: Some(64 << 10),
        ..Options::default()
    })
    .await;
    let q = "?agent=echo&project=web";

    // Connections per token, then in total.
    let mut a = connect(&s, q, Some(&s.client)).await.unwrap();
    let b = connect(&s, q, Some(&s.client)).await.unwrap();
    let (code, e) = connect(&s, q, Some(&s.client)).await.unwrap_err();
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (429, Some("too_many_connections")),
        "{e}"
    );
    let other = s.create_token("client").await;
    let c = connect(&s, q, Some(&other)).await.unwrap();
    let (code, e) = connect(&s, q, Some(&s.admin)).await.unwrap_err();
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (429, Some("too_many_connections")),
        "{e}"
    );
    // A closed one frees its place.
    drop(b);
    drop(c);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut b = loop {
        if let Ok(ws) = connect(&s, q, Some(&s.client)).await {
            break ws;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Sessions per connection.
    call(&mut a, 1, "initialize", json!({"protocolVersion": 1})).await;
    let mut sids = vec![];
    for id in 2..5 {
        let r = call(&mut a, id, "session/new", json!({"cwd": "/src/web"})).await;
        sids.push(r["result"]["sessionId"].as_str().unwrap().to_owned());
    }
    let e = call(&mut a, 5, "session/new", json!({"cwd": "/src/web"})).await;
    assert_eq!(e["error"]["code"], -32000, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too many sessions"),
        "{e}"
    );

    // Requests in flight per connection: two prompts wait (no runner), a third request is
    // refused at once; the connection stays open past the idle timeout while they wait.
    for (id, sid) in [(6, &sids[0]), (7, &sids[1])] {
        send(
            &mut a,
            json!({"jsonrpc": "2.0", "id": id, "method": "session/prompt", "params": {"sessionId": sid, "prompt": [{"type": "text", "text": "wait"}]}}),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let e = call(&mut a, 8, "session/new", json!({"cwd": "/src/web"})).await;
    assert_eq!(e["error"]["code"], -32000, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in flight"),
        "{e}"
    );

    // Idle: nothing pending and nothing said for the idle timeout closed the other one.
    assert_eq!(closed(&mut b).await, Some(1000));

    // A message over the body limit closes the connection (1009); the server goes on.
    let mut big = connect(&s, q, Some(&other)).await.unwrap();
    let huge = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"x":"{}"}}}}"#,
        "a".repeat(100 << 10)
    );
    let _ = big.send(Message::Text(huge.into())).await;
    assert_eq!(closed(&mut big).await, Some(1009));
    let mut again = connect(&s, q, Some(&other)).await.unwrap();
    let init = call(&mut again, 1, "initialize", json!({"protocolVersion": 1})).await;
    assert_eq!(init["result"]["protocolVersion"], 1);
    s.stop().await;
}
