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
        max_buffered: 4 << 10,
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
    // A GET that is neither a WebSocket nor an SSE stream: a clear error (the crate's 406),
    // not a hang.
    let (code, e) = s.get("/acp", &s.client).await;
    assert_eq!(code.as_u16(), 406, "{e}");
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

// ---- The HTTP profile: POST + SSE (hand-written requests, to see every status and header;
// the `tunnel` crate's tests drive it with the ACP SDK's own `HttpClient`).

/// A raw request to `/acp`: status, the `Acp-Connection-Id` answered, and the body.
async fn acp_http(
    s: &TestServer,
    method: reqwest::Method,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Option<String>, String) {
    let mut req = s
        .http
        .request(method, format!("{}/acp?agent=echo&project=web", s.url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b.to_owned());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let conn = resp
        .headers()
        .get("acp-connection-id")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, conn, resp.text().await.unwrap())
}

const JSON: (&str, &str) = ("content-type", "application/json");

/// POSTs one JSON-RPC message on connection `conn`.
async fn post_msg(s: &TestServer, token: &str, conn: &str, sid: Option<&str>, v: Value) -> u16 {
    let mut h = vec![JSON, ("acp-connection-id", conn)];
    if let Some(sid) = sid {
        h.push(("acp-session-id", sid));
    }
    acp_http(
        s,
        reqwest::Method::POST,
        Some(token),
        &h,
        Some(&v.to_string()),
    )
    .await
    .0
}

/// Starts a connection: its id and the answer to `initialize`.
async fn http_init(s: &TestServer, token: &str) -> (String, Value) {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": 1}});
    let (code, conn, body) = acp_http(
        s,
        reqwest::Method::POST,
        Some(token),
        &[JSON],
        Some(&init.to_string()),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    (
        conn.expect("no Acp-Connection-Id"),
        serde_json::from_str(&body).unwrap(),
    )
}

/// An open SSE stream of `/acp`.
struct Stream {
    resp: reqwest::Response,
    buf: String,
}

impl Stream {
    /// Opens the connection's stream, or a session's; the refusal's status otherwise.
    async fn open(
        s: &TestServer,
        token: &str,
        conn: &str,
        sid: Option<&str>,
    ) -> Result<Stream, u16> {
        let mut req = s
            .http
            .get(format!("{}/acp", s.url))
            .bearer_auth(token)
            .header("accept", "text/event-stream")
            .header("acp-connection-id", conn);
        if let Some(sid) = sid {
            req = req.header("acp-session-id", sid);
        }
        let resp = req.send().await.unwrap();
        if resp.status() != 200 {
            return Err(resp.status().as_u16());
        }
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Ok(Stream {
            resp,
            buf: String::new(),
        })
    }

    /// The next message; `None` when the stream ended. Panics after 30 s.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some(serde_json::from_str(&data).unwrap());
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.resp.chunk())
                .await
                .expect("nothing on the SSE stream in 30 s");
            match chunk {
                Ok(Some(c)) => self.buf.push_str(std::str::from_utf8(&c).unwrap()),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The answer to request `id` (other messages skipped).
    async fn answer(&mut self, id: u64) -> Value {
        loop {
            let v = self.next().await.expect("the stream ended");
            if v["id"] == id && v.get("method").is_none() {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn acp_http_refuses_strangers_and_other_tokens_connections() {
    let s = TestServer::start().await;
    let post = reqwest::Method::POST;
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": 1}}).to_string();
    // Who, before anything else (even a wrong content type).
    for (token, want) in [
        (None, 401),
        (Some("tnl_nope_nope"), 401),
        (Some(&*s.runner), 403),
    ] {
        for h in [vec![JSON], vec![]] {
            let (code, conn, body) = acp_http(&s, post.clone(), token, &h, Some(&init)).await;
            assert_eq!((code, conn), (want, None), "{body}");
        }
        let (code, _, _) = acp_http(
            &s,
            reqwest::Method::DELETE,
            token,
            &[("acp-connection-id", "x")],
            None,
        )
        .await;
        assert_eq!(code, want);
        let (code, _, _) = acp_http(
            &s,
            reqwest::Method::GET,
            token,
            &[("accept", "text/event-stream"), ("acp-connection-id", "x")],
            None,
        )
        .await;
        assert_eq!(code, want);
    }
    // The crate's answers to malformed requests.
    let (code, _, _) = acp_http(&s, post.clone(), Some(&s.client), &[], Some(&init)).await;
    assert_eq!(code, 415);
    let new =
        json!({"jsonrpc": "2.0", "id": 1, "method": "session/new", "params": {"cwd": "/src/web"}})
            .to_string();
    let (code, _, body) = acp_http(&s, post.clone(), Some(&s.client), &[JSON], Some(&new)).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("Acp-Connection-Id header required"), "{body}");
    let (code, _, body) = acp_http(
        &s,
        post.clone(),
        Some(&s.client),
        &[JSON],
        Some(&format!("[{init}]")),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (e["error"]["code"].clone(), e["id"].clone()),
        (json!(-32600), Value::Null),
        "{e}"
    );
    let (code, _, body) = acp_http(&s, reqwest::Method::GET, Some(&s.client), &[], None).await;
    assert_eq!(code, 406, "{body}");
    let (code, _, body) = acp_http(
        &s,
        post.clone(),
        Some(&s.client),
        &[JSON],
        Some(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"x": "a".repeat(5 << 20)}}).to_string()),
    )
    .await;
    assert_eq!(code, 413, "{body}");

    // A connection.
    let (conn, init_answer) = http_init(&s, &s.client).await;
    assert_eq!(init_answer["id"], 0);
    assert_eq!(init_answer["result"]["protocolVersion"], 1, "{init_answer}");
    assert!(conn.len() >= 32, "{conn}");

    // Another token's requests on it are refused exactly as for an id that does not exist.
    let other = s.create_token("client").await;
    for c in [conn.as_str(), "0123456789abcdef0123456789abcdef"] {
        let (code, _, body) = acp_http(
            &s,
            post.clone(),
            Some(&other),
            &[JSON, ("acp-connection-id", c)],
            Some(&new),
        )
        .await;
        assert_eq!(code, 404, "{body}");
        let e: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["error"]["code"], "not_found");
        assert!(!body.contains(c), "{body}");
        assert_eq!(Stream::open(&s, &other, c, None).await.err(), Some(404));
        assert_eq!(
            Stream::open(&s, &other, c, Some("acp-x")).await.err(),
            Some(404)
        );
        let (code, _, body2) = acp_http(
            &s,
            reqwest::Method::DELETE,
            Some(&other),
            &[("acp-connection-id", c)],
            None,
        )
        .await;
        assert_eq!((code, &body2), (404, &body));
    }
    // The owner's connection is untouched by all that.
    let mut events = Stream::open(&s, &s.client, &conn, None).await.unwrap();
    assert_eq!(
        Stream::open(&s, &s.client, &conn, None).await.err(),
        Some(409)
    );
    assert_eq!(
        post_msg(
            &s,
            &s.client,
            &conn,
            None,
            serde_json::from_str(&new).unwrap()
        )
        .await,
        202
    );
    let r = events.answer(1).await;
    assert!(
        r["result"]["sessionId"]
            .as_str()
            .unwrap()
            .starts_with("acp-"),
        "{r}"
    );
    // Session-scoped methods need their session, and a header that agrees with the params.
    let prompt =
        json!({"jsonrpc": "2.0", "id": 2, "method": "session/prompt", "params": {"prompt": []}});
    assert_eq!(
        post_msg(&s, &s.client, &conn, None, prompt.clone()).await,
        400
    );
    let mut wrong = prompt.clone();
    wrong["params"]["sessionId"] = json!("acp-a");
    assert_eq!(
        post_msg(&s, &s.client, &conn, Some("acp-b"), wrong).await,
        400
    );

    // DELETE ends it: its stream ends, its id is unknown from then on.
    let (code, _, _) = acp_http(
        &s,
        reqwest::Method::DELETE,
        Some(&s.client),
        &[("acp-connection-id", &conn)],
        None,
    )
    .await;
    assert_eq!(code, 202);
    assert_eq!(events.next().await, None);
    assert_eq!(
        post_msg(
            &s,
            &s.client,
            &conn,
            None,
            serde_json::from_str(&new).unwrap()
        )
        .await,
        404
    );
    s.stop().await;
}

#[tokio::test]
async fn acp_http_routes_answers_to_their_streams_and_keeps_them_until_opened() {
    let s = TestServer::start().await;
    let t = &s.client;
    let (conn, _) = http_init(&s, t).await;
    // Sent before the connection's stream is open: the answer waits for it.
    let new =
        json!({"jsonrpc": "2.0", "id": 1, "method": "session/new", "params": {"cwd": "/src/web"}});
    assert_eq!(post_msg(&s, t, &conn, None, new).await, 202);
    let mut events = Stream::open(&s, t, &conn, None).await.unwrap();
    let r = events.answer(1).await;
    let sid = r["result"]["sessionId"].as_str().unwrap().to_owned();
    // A session-scoped request (the header names the session): its answer goes to the
    // session's stream, kept until that stream opens, not to the connection's.
    let mode = json!({"jsonrpc": "2.0", "id": 2, "method": "session/set_mode", "params": {"modeId": "plan"}});
    assert_eq!(post_msg(&s, t, &conn, Some(&sid), mode).await, 202);
    let list = json!({"jsonrpc": "2.0", "id": 3, "method": "session/list", "params": {}});
    assert_eq!(post_msg(&s, t, &conn, None, list).await, 202);
    assert_eq!(
        events.next().await.unwrap()["id"],
        3,
        "answer 2 went to the connection's stream"
    );
    let mut session = Stream::open(&s, t, &conn, Some(&sid)).await.unwrap();
    let e = session.next().await.unwrap();
    assert_eq!(
        (e["id"].clone(), e["error"]["code"].clone()),
        (json!(2), json!(-32601)),
        "{e}"
    );
    assert_eq!(
        Stream::open(&s, t, &conn, Some(&sid)).await.err(),
        Some(409)
    );
    // A prompt (queued: no runner) and its cancel, scoped by params only.
    let prompt = json!({"jsonrpc": "2.0", "id": 4, "method": "session/prompt", "params": {"sessionId": sid, "prompt": [{"type": "text", "text": "hi"}]}});
    assert_eq!(post_msg(&s, t, &conn, None, prompt).await, 202);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while s.get(&format!("/v1/tasks?conversation={sid}"), t).await.1["tasks"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline, "no task");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancel = json!({"jsonrpc": "2.0", "method": "session/cancel", "params": {}});
    assert_eq!(post_msg(&s, t, &conn, Some(&sid), cancel).await, 202);
    let r = session.answer(4).await;
    assert_eq!(r["result"]["stopReason"], "cancelled", "{r}");
    // Streams for sessions not known yet (before a session/load): a few, then 404.
    let mut early = vec![];
    for i in 0..16 {
        early.push(
            Stream::open(&s, t, &conn, Some(&format!("acp-early-{i}")))
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        Stream::open(&s, t, &conn, Some("acp-early-16")).await.err(),
        Some(404)
    );
    // A reader gone frees its place.
    drop(early.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while Stream::open(&s, t, &conn, Some("acp-early-16"))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn acp_http_shares_the_caps_and_ends_what_it_cannot_keep() {
    let s = TestServer::start_with(Options {
        acp: Some(limits()),
        ..Options::default()
    })
    .await;
    let q = "?agent=echo&project=web";
    // Connections per token, WebSocket and HTTP together, then in total.
    let (a, _) = http_init(&s, &s.client).await;
    let _ws = connect(&s, q, Some(&s.client)).await.unwrap();
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": 1}}).to_string();
    let (code, conn, body) = acp_http(
        &s,
        reqwest::Method::POST,
        Some(&s.client),
        &[JSON],
        Some(&init),
    )
    .await;
    assert_eq!((code, conn), (429, None), "{body}");
    assert!(body.contains("too_many_connections"), "{body}");
    let (code, _) = connect(&s, q, Some(&s.client)).await.unwrap_err();
    assert_eq!(code, 429);
    let other = s.create_token("client").await;
    let (b, _) = http_init(&s, &other).await;
    let (code, _, _) = acp_http(
        &s,
        reqwest::Method::POST,
        Some(&s.admin),
        &[JSON],
        Some(&init),
    )
    .await;
    assert_eq!(code, 429);
    // DELETE frees its place.
    let (code, _, _) = acp_http(
        &s,
        reqwest::Method::DELETE,
        Some(&s.client),
        &[("acp-connection-id", &a)],
        None,
    )
    .await;
    assert_eq!(code, 202);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let c = loop {
        let (code, conn, _) = acp_http(
            &s,
            reqwest::Method::POST,
            Some(&s.client),
            &[JSON],
            Some(&init),
        )
        .await;
        if code == 200 {
            break conn.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // A client that never opens a session's stream: what waits for it is bounded (4 KiB
    // here); past that the connection ends, and its other streams with it.
    let mut events = Stream::open(&s, &other, &b, None).await.unwrap();
    let new =
        json!({"jsonrpc": "2.0", "id": 1, "method": "session/new", "params": {"cwd": "/src/web"}});
    assert_eq!(post_msg(&s, &other, &b, None, new).await, 202);
    let sid = events.answer(1).await["result"]["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut n = 1;
    let ended = loop {
        n += 1;
        let mode = json!({"jsonrpc": "2.0", "id": n, "method": "session/set_mode", "params": {"modeId": "x"}});
        let code = post_msg(&s, &other, &b, Some(&sid), mode).await;
        if code != 202 {
            break code;
        }
        assert!(n < 1000, "4 KiB of answers never ended the connection");
    };
    assert_eq!(ended, 404);
    assert!(n > 10, "{n}");
    assert_eq!(events.next().await, None);

    // A connection with no stream open for the idle timeout ends, a prompt in flight or not.
    let mut events = Stream::open(&s, &s.client, &c, None).await.unwrap();
    let new =
        json!({"jsonrpc": "2.0", "id": 1, "method": "session/new", "params": {"cwd": "/src/web"}});
    assert_eq!(post_msg(&s, &s.client, &c, None, new).await, 202);
    let sid = events.answer(1).await["result"]["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let prompt = json!({"jsonrpc": "2.0", "id": 2, "method": "session/prompt", "params": {"sessionId": sid, "prompt": [{"type": "text", "text": "wait"}]}});
    assert_eq!(post_msg(&s, &s.client, &c, None, prompt).await, 202);
    drop(events);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ping = json!({"jsonrpc": "2.0", "method": "$/ping", "params": {}});
        if post_msg(&s, &s.client, &c, None, ping).await == 404 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its task goes on (a later session/load picks it up).
    let (_, l) = s
        .get(&format!("/v1/tasks?conversation={sid}"), &s.client)
        .await;
    assert_eq!(l["tasks"][0]["state"], "queued", "{l}");
    s.stop().await;
}
