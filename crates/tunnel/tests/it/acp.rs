//! `tunnel acp`: an ACP client (this test, speaking JSON-RPC on the child's stdio, and the real
//! `acpx` from npm) drives a remote agent through a real `tunnel serve` and `tunnel runner`.
//! The tiny ACP agent of the runner's fixtures always; the real Claude adapter, offline against
//! the model-API stand-in, when CLAUDE_ACP_BIN and ACPX_BIN are set (install-real-clis.sh).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::BIN;
use super::chaos::{Server, TOKEN, World};

#[path = "../../../tunnel-runner/tests/fixtures/model_api.rs"]
mod model_api;
use model_api::{ModelApi, real_env};

/// Wall-clock microseconds (the server's `created_at` is wall-clock milliseconds).
fn micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn runner_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tunnel-runner/tests/fixtures")
}

/// A `tunnel runner` child with the given agents section, offering project `web`.
struct AgentRunner {
    child: Child,
}

impl AgentRunner {
    fn start(world: &World, server: &Server, name: &str, agents: &str) -> AgentRunner {
        let dir = world.path(&format!("runner-{name}"));
        // Outside the runner's own directories, which the agent sandbox closes.
        let web = world.path("web");
        std::fs::create_dir_all(&web).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = format!(
            "[runner]\nname = \"{name}\"\nspool_dir = \"{spool}\"\nwork_dir = \"{work}\"\n\
             [runner.projects]\nweb = \"{web}\"\n{agents}",
            spool = dir.join("spool").display(),
            work = dir.join("work").display(),
            web = web.display(),
        );
        std::fs::write(dir.join("runner.toml"), cfg).unwrap();
        let log = std::fs::File::create(dir.join("runner.log")).unwrap();
        let child = Command::new(BIN)
            .args(["runner", "--config"])
            .arg(dir.join("runner.toml"))
            .args(["--server", &server.url(), "--token", TOKEN])
            .env("XDG_DATA_HOME", &dir)
            .env("XDG_CONFIG_HOME", &dir)
            .env_remove("WORKER_TOKEN")
            .env_remove("WORKER_URL")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // Its first claim registers it (with its projects): wait for that.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, list) = get(server, "/v1/runners");
            if list["runners"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["name"] == name))
            {
                break;
            }
            assert!(Instant::now() < deadline, "runner {name} never registered");
            std::thread::sleep(Duration::from_millis(50));
        }
        AgentRunner { child }
    }
}

impl Drop for AgentRunner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(server: &Server, path: &str) -> (u16, Value) {
    super::curl(&[
        &format!("{}{path}", server.url()),
        "-H",
        &format!("authorization: Bearer {TOKEN}"),
    ])
}

/// How the test reaches the bridge.
enum Link {
    /// `tunnel acp` as a child, JSON-RPC lines on its stdio.
    Stdio { child: Child, stdin: ChildStdin },
    /// The server's `/acp`, on a WebSocket or over HTTP (POST + SSE); `None` drops the socket
    /// or the streams without a goodbye.
    Net {
        tx: tokio::sync::mpsc::UnboundedSender<Option<String>>,
    },
}

/// The bridge (`tunnel acp`, or the server's `/acp`), and this test as its ACP client.
struct Acp {
    link: Link,
    rx: mpsc::Receiver<Value>,
    next: u64,
    /// Messages from the agent not yet taken by a wait.
    backlog: Vec<Value>,
}

/// A message as received, with when it arrived (for the overhead figure) beside it.
fn received(text: &str) -> Value {
    let at = micros();
    let mut v: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("the bridge sent something that is not JSON ({e}): {text}"));
    if let Some(o) = v.as_object_mut() {
        o.insert("_rx_us".into(), json!(at));
    }
    v
}

impl Acp {
    fn start_with(server: &Server, token: &str, args: &[&str]) -> Acp {
        let mut child = Command::new(BIN)
            .arg("acp")
            .args(args)
            .env("TUNNEL_URL", server.url())
            .env("TUNNEL_TOKEN", token)
            .env_remove("WORKER_TOKEN")
            .env_remove("WORKER_URL")
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(received(&line)).is_err() {
                    return;
                }
            }
        });
        Acp {
            link: Link::Stdio { child, stdin },
            rx,
            next: 1,
            backlog: vec![],
        }
    }

    /// A real WebSocket client (tokio-tungstenite) on the server's `/acp{query}`.
    fn websocket(server: &Server, token: &str, query: &str) -> Acp {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("{}/acp{query}", server.url().replace("http://", "ws://"));
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (tx, rx) = mpsc::channel();
        let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut ws = match tokio_tungstenite::connect_async(req).await {
                    Ok((ws, _)) => ws,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    tokio::select! {
                        m = ws.next() => match m {
                            Some(Ok(Message::Text(t))) => {
                                if tx.send(received(t.as_str())).is_err() {
                                    return;
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => return,
                        },
                        out = out_rx.recv() => match out {
                            Some(Some(text)) => {
                                if ws.send(Message::Text(text.into())).await.is_err() {
                                    return;
                                }
                            }
                            // Gone without a goodbye, like a client that lost its network.
                            Some(None) | None => return,
                        },
                    }
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap_or_else(|e| panic!("cannot connect to /acp: {e}"));
        Acp {
            link: Link::Net { tx: out_tx },
            rx,
            next: 1,
            backlog: vec![],
        }
    }

    /// The server's `/acp` over HTTP (POST + SSE), with a client that does on the wire what
    /// the ACP SDK's `HttpClient` (agent-client-protocol-http 5.0) does over `http://`:
    /// `initialize` POSTed alone (its answer in the body, the connection in
    /// `Acp-Connection-Id`), then the connection's SSE stream opened before anything else is
    /// sent; a session's stream opened before the first message naming the session is POSTed,
    /// and when `session/new` answers with a new one; every later message POSTed with
    /// `Acp-Connection-Id` (and `Acp-Session-Id` when it names a session, `$/…` excepted),
    /// expecting 202; any stream ending ends the client. (Not the crate itself: it turns on
    /// serde_json's `preserve_order` and rustls' aws-lc for every crate in a test build.)
    fn http(server: &Server, token: &str, query: &str) -> Acp {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let endpoint = format!("{}/acp{query}", server.url());
        let mut auth = reqwest::header::HeaderMap::new();
        auth.insert("authorization", format!("Bearer {token}").parse().unwrap());
        let http = reqwest::Client::builder()
            .default_headers(auth)
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let (out_tx, out_rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            if let Err(e) = rt.block_on(http_client(http, endpoint, out_rx, tx)) {
                eprintln!("the /acp HTTP client ended: {e}");
            }
        });
        Acp {
            link: Link::Net { tx: out_tx },
            rx,
            next: 1,
            backlog: vec![],
        }
    }

    fn send(&mut self, v: Value) {
        match &mut self.link {
            Link::Stdio { stdin, .. } => {
                writeln!(stdin, "{v}").unwrap();
                stdin.flush().unwrap();
            }
            Link::Net { tx } => tx.send(Some(v.to_string())).unwrap(),
        }
    }

    fn request(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next;
        self.next += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        id
    }

    /// The next message matching `f`; the others are kept in order in the backlog.
    fn until(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&f) {
            return self.backlog.remove(i);
        }
        loop {
            // A safety net against a hang, not a timing assertion.
            let v = self
                .rx
                .recv_timeout(Duration::from_secs(180))
                .unwrap_or_else(|_| panic!("no {what} from tunnel acp; got {:?}", self.backlog));
            if f(&v) {
                return v;
            }
            self.backlog.push(v);
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.request(method, params);
        self.until(&format!("answer to {method}"), |v| {
            v["id"] == id && v.get("method").is_none()
        })
    }

    /// The `session/update`s received so far (taken from the backlog).
    fn updates(&mut self) -> Vec<Value> {
        let (u, rest): (Vec<Value>, Vec<Value>) = std::mem::take(&mut self.backlog)
            .into_iter()
            .partition(|v| v["method"] == "session/update");
        self.backlog = rest;
        u.into_iter()
            .map(|v| v["params"]["update"].clone())
            .collect()
    }

    /// Waits until `n` updates arrived; returns them (from the backlog).
    fn collect_updates(&mut self, n: usize) -> Vec<Value> {
        while self
            .backlog
            .iter()
            .filter(|v| v["method"] == "session/update")
            .count()
            < n
        {
            let v = self
                .rx
                .recv_timeout(Duration::from_secs(180))
                .unwrap_or_else(|_| panic!("only {:?} from tunnel acp", self.backlog));
            self.backlog.push(v);
        }
        self.updates()
    }

    fn kill(self) {}
}

impl Drop for Acp {
    fn drop(&mut self) {
        match &mut self.link {
            Link::Stdio { child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Link::Net { tx } => {
                let _ = tx.send(None);
            }
        }
    }
}

/// The methods the SDK's HTTP client refuses to send without a session.
fn needs_session(method: &str) -> bool {
    matches!(
        method,
        "session/prompt"
            | "session/cancel"
            | "session/close"
            | "session/delete"
            | "session/fork"
            | "session/load"
            | "session/resume"
            | "session/set_config_option"
            | "session/set_mode"
            | "session/set_model"
    )
}

/// The HTTP client of [`Acp::http`]: the test's messages from `out`, the server's to `to_test`.
async fn http_client(
    http: reqwest::Client,
    endpoint: String,
    mut out: tokio::sync::mpsc::UnboundedReceiver<Option<String>>,
    to_test: mpsc::Sender<Value>,
) -> Result<(), String> {
    // What the SSE streams read; an `Err` is a stream that ended.
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<Result<String, String>>();
    let mut conn: Option<String> = None;
    let mut streams = std::collections::HashSet::<String>::new();
    // Requests sent and not answered: their method, by JSON id.
    let mut sent = HashMap::<String, String>::new();
    loop {
        tokio::select! {
            m = out.recv() => {
                // `None`: gone without a goodbye (no DELETE), like a client whose network went.
                let Some(Some(text)) = m else { return Ok(()) };
                let v: Value = serde_json::from_str(&text).unwrap();
                let Some(id) = conn.clone() else {
                    assert_eq!(v["method"], "initialize", "the first message must be initialize");
                    let resp = http
                        .post(&endpoint)
                        .header("content-type", "application/json")
                        .header("accept", "application/json")
                        .body(text)
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    let id = resp
                        .headers()
                        .get("acp-connection-id")
                        .map(|v| v.to_str().unwrap().to_owned());
                    if !resp.status().is_success() {
                        return Err(format!("initialize: HTTP {}", resp.status()));
                    }
                    let answer = resp.text().await.map_err(|e| e.to_string())?;
                    let rejected = serde_json::from_str::<Value>(&answer)
                        .map_err(|e| format!("initialize answer: {e}"))?
                        .get("error")
                        .is_some();
                    if to_test.send(received(&answer)).is_err() {
                        return Ok(());
                    }
                    if !rejected {
                        let id = id.ok_or("no Acp-Connection-Id")?;
                        open_sse(&http, &endpoint, &id, None, &ev_tx).await?;
                        conn = Some(id);
                    }
                    continue;
                };
                let method = v["method"].as_str().map(str::to_owned);
                let sid = method
                    .as_deref()
                    .filter(|m| !m.starts_with("$/"))
                    .and_then(|_| v["params"]["sessionId"].as_str())
                    .map(str::to_owned);
                if let Some(m) = &method {
                    assert!(
                        !needs_session(m) || sid.is_some(),
                        "method `{m}` requires sessionId in params"
                    );
                }
                if let Some(sid) = &sid
                    && streams.insert(sid.clone())
                {
                    open_sse(&http, &endpoint, &id, Some(sid), &ev_tx).await?;
                }
                if let (Some(m), Some(rid)) = (&method, v.get("id")) {
                    sent.insert(rid.to_string(), m.clone());
                }
                let mut req = http
                    .post(&endpoint)
                    .header("accept", "application/json")
                    .header("content-type", "application/json")
                    .header("acp-connection-id", &id);
                if let Some(sid) = &sid {
                    req = req.header("acp-session-id", sid);
                }
                let resp = req.body(text).send().await.map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(format!(
                        "POST: HTTP {}: {}",
                        resp.status(),
                        resp.text().await.unwrap_or_default()
                    ));
                }
            }
            ev = ev_rx.recv() => {
                let text = ev.expect("the sender is held here")?;
                let v = received(&text);
                let opens = v.get("method").is_none()
                    && v.get("id").and_then(|id| sent.remove(&id.to_string())).is_some_and(|m| {
                        matches!(m.as_str(), "session/new" | "session/fork")
                    });
                let new_sid = v["result"]["sessionId"].as_str().map(str::to_owned);
                if to_test.send(v).is_err() {
                    return Ok(());
                }
                if opens
                    && let (Some(sid), Some(id)) = (new_sid, &conn)
                    && streams.insert(sid.clone())
                {
                    open_sse(&http, &endpoint, id, Some(&sid), &ev_tx).await?;
                }
            }
        }
    }
}

/// Opens an SSE stream of `/acp` and returns once the server answered it; its messages go to
/// `ev` (then an `Err` when it ends).
async fn open_sse(
    http: &reqwest::Client,
    endpoint: &str,
    conn: &str,
    sid: Option<&str>,
    ev: &tokio::sync::mpsc::UnboundedSender<Result<String, String>>,
) -> Result<(), String> {
    let mut req = http
        .get(endpoint)
        .header("accept", "text/event-stream")
        .header("acp-connection-id", conn);
    if let Some(sid) = sid {
        req = req.header("acp-session-id", sid);
    }
    let mut resp = req.send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("SSE: HTTP {}", resp.status()));
    }
    let ev = ev.clone();
    tokio::spawn(async move {
        let mut buf = String::new();
        loop {
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if !data.is_empty() && ev.send(Ok(data.join("\n"))).is_err() {
                    return;
                }
            }
            match resp.chunk().await {
                Ok(Some(c)) => buf.push_str(&String::from_utf8_lossy(&c)),
                Ok(None) | Err(_) => {
                    let _ = ev.send(Err("SSE stream ended".to_owned()));
                    return;
                }
            }
        }
    });
    Ok(())
}

fn initialize(acp: &mut Acp) -> Value {
    acp.call(
        "initialize",
        json!({"protocolVersion": 1, "clientCapabilities": {"fs": {"readTextFile": true, "writeTextFile": true}, "terminal": true}, "clientInfo": {"name": "it", "version": "1"}}),
    )
}

/// One update as a comparable line: its kind, tool call id and text or status.
fn sig(u: &Value) -> String {
    format!(
        "{} {} {}",
        u["sessionUpdate"].as_str().unwrap_or_default(),
        u["toolCallId"].as_str().unwrap_or_default(),
        u["content"]["text"]
            .as_str()
            .or(u["status"].as_str())
            .unwrap_or_default()
    )
}

/// What the server's event log says the client must have seen for a task, in `seq` order.
fn expected(server: &Server, task: &str) -> Vec<String> {
    let (_, list) = get(server, &format!("/v1/tasks/{task}/events?format=json"));
    list["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let d = &e["data"];
            let s = match e["kind"].as_str().unwrap() {
                "text" => format!("agent_message_chunk  {}", d["text"].as_str().unwrap()),
                "thought" => format!("agent_thought_chunk  {}", d["text"].as_str().unwrap()),
                k @ ("tool_call" | "tool_call_update") => format!(
                    "{k} {} {}",
                    d["id"].as_str().unwrap(),
                    d["status"].as_str().unwrap_or_default()
                ),
                "plan" => "plan  ".to_owned(),
                _ => return None,
            };
            Some(s)
        })
        .collect()
}

/// What loading a session replays for its tasks: each one's prompt, then its updates.
fn replay_of(server: &Server, tasks: &[Value]) -> Vec<String> {
    let mut want = Vec::new();
    for t in tasks {
        want.push(format!(
            "user_message_chunk  {}",
            t["prompt"].as_str().unwrap()
        ));
        want.extend(expected(server, t["id"].as_str().unwrap()));
    }
    want
}

/// The conversation's tasks, oldest first.
fn tasks_of(server: &Server, sid: &str) -> Vec<Value> {
    let (_, list) = get(server, &format!("/v1/tasks?conversation={sid}&limit=100"));
    let mut t = list["tasks"].as_array().unwrap().clone();
    t.reverse();
    t
}

fn answer_text(updates: &[Value]) -> String {
    updates
        .iter()
        .filter(|u| u["sessionUpdate"] == "agent_message_chunk")
        .map(|u| u["content"]["text"].as_str().unwrap_or_default())
        .collect()
}

fn is_permission(v: &Value) -> bool {
    v["method"] == "session/request_permission"
}

fn allow_option(req: &Value) -> String {
    req["params"]["options"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "allow_once")
        .unwrap()["optionId"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn tiny_agents(world: &World) -> String {
    std::fs::create_dir_all(world.path("logs")).unwrap();
    format!(
        "[runner.agents.tiny]\nkind = \"acp\"\nprogram = \"python3\"\nargs = [\"{}\"]\nenv = {{ ACP_AGENT_LOG = \"{}\" }}\n\
         [runner.agents.claude]\nenabled = false\n[runner.agents.codex]\nenabled = false\n[runner.agents.gemini]\nenabled = false\n",
        runner_fixtures().join("acp-agent.py").display(),
        world.path("logs/agent.log").display()
    )
}

#[test]
fn acp_client_prompts_a_remote_agent_and_survives_disconnects_and_restarts() {
    let world = World::new();
    let mut server = Server::start(&world, &[], vec![]);
    let _runner = AgentRunner::start(&world, &server, "home", &tiny_agents(&world));
    let web = world.path("web");
    // The editor's directory is elsewhere; its name is the runner's project.
    let cwd = "/home/editor/src/web";

    // The runner says which agents it drives over ACP: the ACP agent, not `echo`.
    let (_, list) = get(&server, "/v1/runners");
    assert_eq!(list["runners"][0]["acp_agents"], json!(["tiny"]), "{list}");
    assert!(
        list["runners"][0]["agents"]
            .as_array()
            .unwrap()
            .contains(&json!("echo"))
    );
    let out = Command::new(BIN)
        .arg("runners")
        .env("TUNNEL_URL", server.url())
        .env("TUNNEL_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        super::stdout(&out).contains("over ACP (tunnel acp): tiny"),
        "{}",
        super::stdout(&out)
    );

    // The editor's own client token: its sessions are its own.
    let editor = token(&server, "editor");
    let mut acp = Acp::start_with(&server, &editor, &["--agent", "tiny"]);
    let init = initialize(&mut acp);
    let r = &init["result"];
    assert_eq!(r["protocolVersion"], 1, "{init}");
    assert_eq!(r["agentCapabilities"]["loadSession"], true, "{init}");
    assert!(r["agentCapabilities"].get("fs").is_none(), "{init}");

    // Refusals: clear errors, nothing made.
    let e = acp.call("session/set_mode", json!({"sessionId": "x", "modeId": "y"}));
    assert_eq!(e["error"]["code"], -32601, "{e}");
    let e = acp.call(
        "session/new",
        json!({"cwd": "/home/editor/src/elsewhere", "mcpServers": []}),
    );
    assert_eq!(e["error"]["code"], -32602, "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("cannot map /home/editor/src/elsewhere to a project")
            && msg.contains("projects: web")
            && msg.contains("--project"),
        "{msg}"
    );
    let e = acp.call("session/new", json!({"cwd": "relative/web"}));
    assert_eq!(e["error"]["code"], -32602, "{e}");
    let e = acp.call(
        "session/prompt",
        json!({"sessionId": "acp-nope", "prompt": [{"type": "text", "text": "hi"}]}),
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown session"),
        "{e}"
    );
    let e = acp.call("session/load", json!({"sessionId": "acp-0000", "cwd": cwd}));
    assert_eq!(e["error"]["code"], -32002, "{e}");
    acp.send(json!({"jsonrpc": "2.0", "id": 99, "method": 5}));
    acp.send(json!("not an object"));
    let e = acp.until("parse error", |v| v["error"]["code"] == -32700);
    assert!(e["id"].is_null(), "{e}");
    assert!(tasks_of(&server, "acp-nope").is_empty());

    let s = acp.call("session/new", json!({"cwd": cwd, "mcpServers": []}));
    let sid = s["result"]["sessionId"].as_str().unwrap().to_owned();
    assert!(sid.starts_with("acp-"), "{s}");

    // A prompt: its updates stream back, then the stop reason.
    let r = acp.call(
        "session/prompt",
        json!({"sessionId": sid, "prompt": [{"type": "text", "text": "hello there"}]}),
    );
    assert_eq!(r["result"]["stopReason"], "end_turn", "{r}");
    let u = acp.updates();
    assert_eq!(answer_text(&u), "echo: hello there", "{u:?}");
    let kinds: Vec<&str> = u
        .iter()
        .map(|u| u["sessionUpdate"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"agent_thought_chunk") && kinds.contains(&"plan"),
        "{kinds:?}"
    );
    let tasks = tasks_of(&server, &sid);
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0]["project"], "web");
    assert_eq!(tasks[0]["approvals"], "ask");
    assert_eq!(
        u.iter().map(sig).collect::<Vec<_>>(),
        expected(&server, tasks[0]["id"].as_str().unwrap())
    );

    // Another client's token cannot load (or prompt in) this session.
    let mut intruder = Acp::start_with(
        &server,
        &token(&server, "other-editor"),
        &["--agent", "tiny"],
    );
    initialize(&mut intruder);
    let e = intruder.call("session/load", json!({"sessionId": sid, "cwd": cwd}));
    assert_eq!(e["error"]["code"], -32002, "{e}");
    let e = intruder.call(
        "session/prompt",
        json!({"sessionId": sid, "prompt": [{"type": "text", "text": "hi"}]}),
    );
    assert!(e["error"].is_object(), "{e}");
    intruder.kill();
    assert_eq!(tasks_of(&server, &sid).len(), 1);

    // A permission request reaches the client; its answer goes to the server.
    let pid = acp.request(
        "session/prompt",
        json!({"sessionId": sid, "prompt": [{"type": "text", "text": "tool: echo one > one.txt"}]}),
    );
    let ask = acp.until("permission request", is_permission);
    assert_eq!(ask["params"]["sessionId"], sid.as_str());
    assert_eq!(
        ask["params"]["toolCall"]["rawInput"]["command"],
        "echo one > one.txt"
    );
    let option = allow_option(&ask);
    acp.send(json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"outcome": {"outcome": "selected", "optionId": option}}}));
    let r = acp.until("prompt answer", |v| {
        v["id"] == pid && v.get("method").is_none()
    });
    assert_eq!(r["result"]["stopReason"], "end_turn", "{r}");
    assert_eq!(
        std::fs::read_to_string(web.join("one.txt")).unwrap(),
        "one\n"
    );
    let aid = ask["params"]["toolCall"]["toolCallId"].as_str().unwrap();
    let (_, a) = get(&server, &format!("/v1/approvals/{aid}"));
    assert_eq!(a["state"], "allowed", "{a}");
    assert_eq!(a["outcome"]["by"], "acp:it via token editor", "{a}");
    acp.updates();

    // A cancel from the client cancels the task.
    let pid = acp.request(
        "session/prompt",
        json!({"sessionId": sid, "prompt": [{"type": "text", "text": "hang"}]}),
    );
    // Wait until the task runs (the agent got the prompt).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(world.path("logs/agent.log"))
        .unwrap_or_default()
        .contains("\"hang\"")
    {
        assert!(Instant::now() < deadline, "the agent never got the prompt");
        std::thread::sleep(Duration::from_millis(50));
    }
    acp.send(json!({"jsonrpc": "2.0", "method": "session/cancel", "params": {"sessionId": sid}}));
    let r = acp.until("prompt answer", |v| {
        v["id"] == pid && v.get("method").is_none()
    });
    assert_eq!(r["result"]["stopReason"], "cancelled", "{r}");
    assert_eq!(
        tasks_of(&server, &sid).last().unwrap()["state"],
        "cancelled"
    );
    acp.updates();

    // `tunnel acp` dies mid-prompt (the question is open); the task goes on. A new one loads
    // the session: every update once, in order, then the live question, and the end.
    acp.request(
        "session/prompt",
        json!({"sessionId": sid, "prompt": [{"type": "text", "text": "tool: echo two > two.txt"}]}),
    );
    let first_ask = acp.until("permission request", is_permission);
    acp.kill();
    let mut acp = Acp::start_with(&server, &editor, &["--agent", "tiny"]);
    initialize(&mut acp);
    let r = acp.call(
        "session/load",
        json!({"sessionId": sid, "cwd": cwd, "mcpServers": []}),
    );
    assert_eq!(r["result"], json!({}), "{r}");
    let ask = acp.until("the open question again", is_permission);
    assert_eq!(
        ask["params"]["toolCall"]["toolCallId"],
        first_ask["params"]["toolCall"]["toolCallId"]
    );
    // This time the CLI answers first: the client's question is withdrawn.
    let aid = ask["params"]["toolCall"]["toolCallId"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = Command::new(BIN)
        .args(["approve", &aid, "--by", "phone"])
        .env("TUNNEL_URL", server.url())
        .env("TUNNEL_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", super::stderr(&out));
    let withdrawn = acp.until("the question withdrawn", |v| {
        v["method"] == "$/cancel_request"
    });
    assert_eq!(withdrawn["params"]["requestId"], ask["id"]);
    // A late answer from the client changes nothing.
    acp.send(json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"outcome": {"outcome": "selected", "optionId": "reject"}}}));
    let tasks = tasks_of(&server, &sid);
    let last = tasks.last().unwrap()["id"].as_str().unwrap().to_owned();
    wait_ended(&server, &last);
    let (_, a) = get(&server, &format!("/v1/approvals/{aid}"));
    assert_eq!(a["state"], "allowed", "{a}");
    assert_eq!(a["outcome"]["by"], "phone via token worker-token", "{a}");
    assert_eq!(
        std::fs::read_to_string(web.join("two.txt")).unwrap(),
        "two\n"
    );
    // Replay and live part together: each task's prompt, then its events, once, in order,
    // through the final answer.
    let want = replay_of(&server, &tasks);
    assert_eq!(
        want.last().unwrap(),
        "agent_message_chunk  allowed:yes",
        "{want:?}"
    );
    let got = acp.collect_updates(want.len());
    assert_eq!(got.iter().map(sig).collect::<Vec<_>>(), want);

    // The server restarts mid-prompt: the prompt still ends, with every update once.
    let pid = acp.request(
        "session/prompt",
        json!({"sessionId": sid, "prompt": [{"type": "text", "text": "tool: echo three > three.txt"}]}),
    );
    let ask = acp.until("permission request", is_permission);
    server.kill9();
    server.spawn();
    let option = allow_option(&ask);
    acp.send(json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"outcome": {"outcome": "selected", "optionId": option}}}));
    let r = acp.until("prompt answer", |v| {
        v["id"] == pid && v.get("method").is_none()
    });
    assert_eq!(r["result"]["stopReason"], "end_turn", "{r}");
    assert_eq!(
        std::fs::read_to_string(web.join("three.txt")).unwrap(),
        "three\n"
    );
    let task = tasks_of(&server, &sid).last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let u = acp.updates();
    assert_eq!(
        u.iter().map(sig).collect::<Vec<_>>(),
        expected(&server, &task)
    );
    assert_eq!(answer_text(&u), "allowed:yes", "{u:?}");

    // A cancel from a client that loaded the session stops the prompt a dead process started.
    acp.request(
        "session/prompt",
        json!({"sessionId": sid, "prompt": [{"type": "text", "text": "hang"}]}),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(world.path("logs/agent.log"))
        .unwrap_or_default()
        .matches("\"hang\"")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "the agent never got the prompt");
        std::thread::sleep(Duration::from_millis(50));
    }
    acp.kill();
    let mut acp = Acp::start_with(&server, &editor, &["--agent", "tiny"]);
    initialize(&mut acp);
    let r = acp.call("session/load", json!({"sessionId": sid, "cwd": cwd}));
    assert_eq!(r["result"], json!({}), "{r}");
    acp.send(json!({"jsonrpc": "2.0", "method": "session/cancel", "params": {"sessionId": sid}}));
    let task = tasks_of(&server, &sid).last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(wait_ended(&server, &task)["state"], "cancelled");
}

/// The same agent over the server's `/acp` (ACP's WebSocket transport) with a real WebSocket
/// client: a prompt streams its updates and ends with the stop reason; a client that drops
/// the socket mid-prompt (a question open) reconnects, loads the session and gets every update
/// once, in order, the question again, and the end.
#[test]
fn acp_over_websocket_prompts_a_remote_agent_and_replays_after_a_disconnect() {
    over_the_network(Acp::websocket);
}

/// The same over `/acp`'s HTTP profile (POST + SSE), with a client that does what the SDK's
/// `HttpClient` does over `http://`: the permission request and its answer, the updates and
/// the answer on the session's stream; streams dropped mid-prompt (a question open), a new
/// connection's `session/load` replays every update once, in order.
#[test]
fn acp_over_http_prompts_a_remote_agent_and_replays_after_a_dropped_stream() {
    over_the_network(Acp::http);
}

fn over_the_network(connect: fn(&Server, &str, &str) -> Acp) {
    let world = World::new();
    let server = Server::start(&world, &[], vec![]);
    let _runner = AgentRunner::start(&world, &server, "home", &tiny_agents(&world));
    let web = world.path("web");
    let cwd = "/home/editor/src/web";
    let editor = token(&server, "editor");

    let mut acp = connect(&server, &editor, "?agent=tiny");
    let init = initialize(&mut acp);
    assert_eq!(init["result"]["protocolVersion"], 1, "{init}");
    assert_eq!(
        init["result"]["agentCapabilities"]["loadSession"], true,
        "{init}"
    );
    let s = acp.call("session/new", json!({"cwd": cwd, "mcpServers": []}));
    let sid = s["result"]["sessionId"].as_str().unwrap().to_owned();
    let r = acp.call(
        "session/prompt",
        json!({"sessionId": sid, "prompt": [{"type": "text", "text": "hello there"}]}),
    );
    assert_eq!(r["result"]["stopReason"], "end_turn", "{r}");
    let u = acp.updates();
    assert_eq!(answer_text(&u), "echo: hello there", "{u:?}");
    let tasks = tasks_of(&server, &sid);
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0]["project"], "web");
    assert_eq!(
        u.iter().map(sig).collect::<Vec<_>>(),
        expected(&server, tasks[0]["id"].as_str().unwrap())
    );

    // A question of the agent, answered by the client.
    let pid = acp.request(
        "session/prompt",
        json!({"sessionId": sid, "prompt": [{"type": "text", "text": "tool: echo one > one.txt"}]}),
    );
    let ask = acp.until("permission request", is_permission);
    let option = allow_option(&ask);
    acp.send(json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"outcome": {"outcome": "selected", "optionId": option}}}));
    let r = acp.until("prompt answer", |v| {
        v["id"] == pid && v.get("method").is_none()
    });
    assert_eq!(r["result"]["stopReason"], "end_turn", "{r}");
    assert!(answer_text(&acp.updates()).ends_with("allowed:yes"));
    assert_eq!(
        std::fs::read_to_string(web.join("one.txt")).unwrap(),
        "one\n"
    );

    // The socket (or the streams) drops mid-prompt, a question open; the task waits on the
    // runner.
    acp.request(
        "session/prompt",
        json!({"sessionId": sid, "prompt": [{"type": "text", "text": "tool: echo ws > ws.txt"}]}),
    );
    let first_ask = acp.until("permission request", is_permission);
    acp.kill();
    let mut acp = connect(&server, &editor, "?agent=tiny");
    initialize(&mut acp);
    let r = acp.call(
        "session/load",
        json!({"sessionId": sid, "cwd": cwd, "mcpServers": []}),
    );
    assert_eq!(r["result"], json!({}), "{r}");
    let ask = acp.until("the open question again", is_permission);
    assert_eq!(
        ask["params"]["toolCall"]["toolCallId"],
        first_ask["params"]["toolCall"]["toolCallId"]
    );
    let option = allow_option(&ask);
    acp.send(json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"outcome": {"outcome": "selected", "optionId": option}}}));
    let tasks = tasks_of(&server, &sid);
    let last = tasks.last().unwrap()["id"].as_str().unwrap().to_owned();
    wait_ended(&server, &last);
    assert_eq!(std::fs::read_to_string(web.join("ws.txt")).unwrap(), "ws\n");
    let aid = ask["params"]["toolCall"]["toolCallId"].as_str().unwrap();
    let (_, a) = get(&server, &format!("/v1/approvals/{aid}"));
    assert_eq!(a["outcome"]["by"], "acp:it via token editor", "{a}");
    let want = replay_of(&server, &tasks);
    assert_eq!(
        want.last().unwrap(),
        "agent_message_chunk  allowed:yes",
        "{want:?}"
    );
    let got = acp.collect_updates(want.len());
    assert_eq!(got.iter().map(sig).collect::<Vec<_>>(), want);
    // Nothing more (no update twice): a round trip later the backlog has no update.
    acp.call("session/new", json!({"cwd": cwd}));
    assert!(acp.updates().is_empty());
}

/// `tunnel acp --runner NAME`: a new session's first prompt (not only the later ones) runs on
/// that runner, though another runner offers the same agent and project and is as free.
#[test]
fn acp_runner_flag_pins_a_new_sessions_first_prompt() {
    let world = World::new();
    let server = Server::start(&world, &[], vec![]);
    let agents = tiny_agents(&world);
    let _home = AgentRunner::start(&world, &server, "home", &agents);
    let _away = AgentRunner::start(&world, &server, "away", &agents);
    let editor = token(&server, "editor");
    for (pinned, args) in [
        ("away", vec!["--agent", "tiny", "--runner", "away"]),
        ("home", vec!["--agent", "tiny", "--runner", "home"]),
    ] {
        let mut acp = Acp::start_with(&server, &editor, &args);
        initialize(&mut acp);
        // Several sessions: by chance alone, all first prompts on one runner is unlikely.
        for i in 0..4 {
            let s = acp.call("session/new", json!({"cwd": "/src/web"}));
            let sid = s["result"]["sessionId"].as_str().unwrap().to_owned();
            let r = acp.call(
                "session/prompt",
                json!({"sessionId": sid, "prompt": [{"type": "text", "text": format!("first {i}")}]}),
            );
            assert_eq!(r["result"]["stopReason"], "end_turn", "{r}");
            let tasks = tasks_of(&server, &sid);
            assert_eq!(tasks[0]["runner"], pinned, "{:?}", tasks[0]);
        }
    }
}

/// `GET /v1/runners`' entry for `runner` once it shows `agent`'s ACP capabilities (its runner
/// probes the agent at start, in the background).
fn wait_capabilities(server: &Server, runner: &str, agent: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, list) = get(server, "/v1/runners");
        if let Some(r) = list["runners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == runner && !r["acp_capabilities"][agent].is_null())
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "runner {runner} never reported {agent}'s capabilities: {list}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn post_claim(server: &Server, token: &str, body: &Value) -> (u16, Value) {
    super::curl(&[
        "-X",
        "POST",
        &format!("{}/v1/claim", server.url()),
        "-H",
        &format!("authorization: Bearer {token}"),
        "-H",
        "content-type: application/json",
        "-d",
        &body.to_string(),
    ])
}

/// `initialize`, over stdio and `/acp`, answers the remote agent's capabilities (as far as
/// tunnel carries them) once a runner has reported them, tunnel's baseline before; the report
/// is shown by `GET /v1/runners` and `tunnel runners`, kept across a server restart, refused
/// when too large or sent under another runner's name.
#[test]
fn acp_initialize_relays_the_remote_agents_capabilities() {
    let world = World::new();
    let mut server = Server::start(&world, &[], vec![]);
    let editor = token(&server, "editor");

    // No runner has reported the agent: tunnel's baseline.
    let mut acp = Acp::start_with(&server, &editor, &["--agent", "tiny"]);
    let base = initialize(&mut acp)["result"].clone();
    assert_eq!(base["agentInfo"]["name"], "tunnel", "{base}");
    assert_eq!(
        base["agentCapabilities"]["promptCapabilities"]["embeddedContext"], true,
        "{base}"
    );
    assert!(base["_meta"]["tunnel"]["reportedBy"].is_null(), "{base}");
    acp.kill();

    // An agent whose answer is larger than a runner reports, beside the tiny one.
    let agents = format!(
        "{}[runner.agents.big]\nkind = \"acp\"\nprogram = \"python3\"\nargs = [\"{}\"]\nenv = {{ ACP_AGENT_BIG_INIT = \"1\" }}\n",
        tiny_agents(&world),
        runner_fixtures().join("acp-agent.py").display(),
    );
    let runner = AgentRunner::start(&world, &server, "home", &agents);
    let r = wait_capabilities(&server, "home", "tiny");
    let caps = &r["acp_capabilities"]["tiny"];
    assert_eq!(caps["protocol_version"], 1, "{r}");
    assert_eq!(
        caps["agent_info"],
        json!({"name": "tiny-acp", "title": "Tiny[31m ACP", "version": "1.0"}),
        "the escape character is gone: {r}"
    );
    assert_eq!(
        caps["agent_capabilities"]["promptCapabilities"],
        json!({"image": true, "audio": false, "embeddedContext": false}),
        "{r}"
    );
    assert_eq!(
        caps["auth_methods"],
        json!([{"id": "tiny-login", "name": "Log in to tiny"}])
    );
    assert!(
        r["acp_agents"].as_array().unwrap().contains(&json!("big"))
            && r["acp_capabilities"].get("big").is_none(),
        "too large to report: {r}"
    );
    let log = std::fs::read_to_string(world.path("runner-home/runner.log")).unwrap();
    assert!(
        log.contains("initialize answer is not reported") && log.contains("at most 4096"),
        "{log}"
    );
    let out = Command::new(BIN)
        .arg("runners")
        .env("TUNNEL_URL", server.url())
        .env("TUNNEL_TOKEN", TOKEN)
        .output()
        .unwrap();
    let shown = super::stdout(&out);
    assert!(
        shown.contains(
            "tiny: Tiny[31m ACP 1.0; prompts: text+image; sessions: load+fork; mcp: http; login: tiny-login"
        ) && !shown.contains('\u{1b}'),
        "{shown}"
    );

    // `initialize` relays them, over stdio and the WebSocket, merged with what tunnel does.
    let want = |on: &str| {
        json!({
            "protocolVersion": 1,
            "agentCapabilities": {
                "loadSession": true,
                "promptCapabilities": {"image": false, "audio": false, "embeddedContext": false},
                "mcpCapabilities": {"http": false, "sse": false},
                "sessionCapabilities": {"list": {}, "resume": {}},
            },
            "authMethods": [],
            "agentInfo": {"name": "tiny-acp", "title": format!("Tiny[31m ACP via tunnel{on}"), "version": "1.0"},
            "_meta": {"tunnel": {"version": env!("CARGO_PKG_VERSION"), "agent": "tiny", "reportedBy": "home"}},
        })
    };
    for (mut acp, on) in [
        (Acp::start_with(&server, &editor, &["--agent", "tiny"]), ""),
        (
            Acp::start_with(&server, &editor, &["--agent", "tiny", "--runner", "home"]),
            " on home",
        ),
        (Acp::websocket(&server, &editor, "?agent=tiny"), ""),
    ] {
        let init = initialize(&mut acp);
        let mut got = init["result"].clone();
        got.as_object_mut().unwrap().remove("_rx_us");
        assert_eq!(got, want(on), "{init}");
        // The session still works as before.
        let s = acp.call("session/new", json!({"cwd": "/src/web"}));
        assert!(s["result"]["sessionId"].is_string(), "{s}");
    }
    // Pinned to a runner that has not reported the agent: the baseline.
    let mut acp = Acp::start_with(&server, &editor, &["--agent", "tiny", "--runner", "away"]);
    let init = initialize(&mut acp);
    assert_eq!(init["result"]["agentInfo"]["name"], "tunnel", "{init}");

    // Refused, and nothing changes: too large, or under another runner token's name.
    let mut claim = json!({
        "runner": "home", "agents": r["agents"], "acp_agents": r["acp_agents"], "wait_ms": 0,
        "acp_capabilities": {"tiny": {"protocol_version": 1, "agent_capabilities": {"padding": vec!["x".repeat(100); 100]}}},
    });
    let (code, e) = post_claim(&server, TOKEN, &claim);
    assert_eq!(code, 400, "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("acp_capabilities") && msg.contains("at most 4096"),
        "{msg}"
    );
    claim["acp_capabilities"]["tiny"]["agent_capabilities"] = json!({"loadSession": false});
    let intruder = token_of_role(&server, "intruder", "runner");
    let (code, e) = post_claim(&server, &intruder, &claim);
    assert_eq!(code, 409, "{e}");
    assert_eq!(
        wait_capabilities(&server, "home", "tiny")["acp_capabilities"]["tiny"],
        *caps
    );

    // The API's schema says what the report is (schemathesis checks the routes against it).
    let (_, doc) = get(&server, "/openapi.json");
    let schemas = &doc["components"]["schemas"];
    assert!(
        schemas["AcpCapabilities"]["properties"]["agent_capabilities"].is_object()
            && schemas["RunnerInfo"]["properties"]["acp_capabilities"].is_object()
            && schemas["ClaimRequest"]["properties"]["acp_capabilities"].is_object(),
        "{schemas}"
    );

    // Kept by the server: a restart (with the runner gone) still shows them.
    drop(runner);
    server.kill9();
    server.spawn();
    let (_, list) = get(&server, "/v1/runners");
    assert_eq!(
        list["runners"][0]["acp_capabilities"]["tiny"], *caps,
        "{list}"
    );
}

/// A new client token.
fn token(server: &Server, name: &str) -> String {
    token_of_role(server, name, "client")
}

/// A new token of `role` (`client`, `runner`, `admin`).
fn token_of_role(server: &Server, name: &str, role: &str) -> String {
    let (code, t) = super::curl(&[
        "-X",
        "POST",
        &format!("{}/v1/tokens", server.url()),
        "-H",
        &format!("authorization: Bearer {TOKEN}"),
        "-H",
        "content-type: application/json",
        "-d",
        &json!({"name": name, "role": role}).to_string(),
    ]);
    assert_eq!(code, 201, "{t}");
    t["token"].as_str().unwrap().to_owned()
}

fn wait_ended(server: &Server, id: &str) -> Value {
    let (_, t) = get(server, &format!("/v1/tasks/{id}?wait=30000"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut t = t;
    while !matches!(
        t["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled" | "timed_out" | "lost")
    ) {
        assert!(Instant::now() < deadline, "task {id} never ended: {t}");
        t = get(server, &format!("/v1/tasks/{id}?wait=30000")).1;
    }
    t
}

/// The real acpx, configured with `tunnel acp` as agent `home-claude`.
struct Acpx {
    bin: String,
    home: PathBuf,
    cwd: PathBuf,
    url: String,
    token: String,
}

impl Acpx {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .current_dir(&self.cwd)
            .env("HOME", &self.home)
            .env("TUNNEL_URL", &self.url)
            .env("TUNNEL_TOKEN", &self.token)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env_remove("WORKER_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().unwrap()
    }
}

impl Drop for Acpx {
    fn drop(&mut self) {
        // Ends acpx's queue owner and with it `tunnel acp`.
        let _ = self.run(&["home-claude", "sessions", "close"]);
    }
}

#[test]
fn acpx_talks_to_claude_on_a_remote_runner() {
    let (Some(acp_bin), Some(acpx)) = (
        std::env::var("CLAUDE_ACP_BIN")
            .ok()
            .filter(|p| Path::new(p).is_file()),
        std::env::var("ACPX_BIN")
            .ok()
            .filter(|p| Path::new(p).is_file()),
    ) else {
        assert!(
            std::env::var("TUNNEL_REAL_CLIS").as_deref() != Ok("1"),
            "TUNNEL_REAL_CLIS=1 but CLAUDE_ACP_BIN or ACPX_BIN is not installed"
        );
        eprintln!(
            "SKIPPED acpx_talks_to_claude_on_a_remote_runner: set CLAUDE_ACP_BIN and ACPX_BIN (install-real-clis.sh)"
        );
        return;
    };
    let world = World::new();
    let server = Server::start(&world, &[], vec![]);
    let api = ModelApi::start(&world.path("requests.jsonl"));
    let mut env = real_env("claude", &world.path("claude-home"), &api.url);
    env.insert("IS_SANDBOX".into(), "1".into());
    let env_toml: Vec<String> = env.iter().map(|(k, v)| format!("{k} = \"{v}\"")).collect();
    let agents = format!(
        "[runner.agents.claude]\nacp_program = \"{acp_bin}\"\nenv = {{ {} }}\n\
         [runner.agents.codex]\nenabled = false\n[runner.agents.gemini]\nenabled = false\n",
        env_toml.join(", ")
    );
    let _runner = AgentRunner::start(&world, &server, "home", &agents);
    let (_, list) = get(&server, "/v1/runners");
    assert_eq!(
        list["runners"][0]["acp_agents"],
        json!(["claude"]),
        "{list}"
    );
    // The real adapter's initialize answer, as the runner probed it at start.
    let r = wait_capabilities(&server, "home", "claude");
    let caps = &r["acp_capabilities"]["claude"];
    assert_eq!(
        caps["agent_info"]["name"], "@agentclientprotocol/claude-agent-acp",
        "{r}"
    );
    assert_eq!(caps["agent_capabilities"]["loadSession"], true, "{r}");
    let web = world.path("web");
    let home = world.path("acpx-home");
    let cwd = world.path("laptop/web");
    std::fs::create_dir_all(home.join(".acpx")).unwrap();
    std::fs::create_dir_all(&cwd).unwrap();
    // The README's acpx config.
    std::fs::write(
        home.join(".acpx/config.json"),
        json!({"agents": {"home-claude": {"argv": [BIN, "acp", "--agent", "claude"]}}}).to_string(),
    )
    .unwrap();
    let acpx = Acpx {
        bin: acpx,
        home,
        cwd,
        url: server.url(),
        // A client token, as a laptop has.
        token: token(&server, "laptop"),
    };
    let out = acpx.run(&["home-claude", "sessions", "new"]);
    assert!(out.status.success(), "{}", super::stderr(&out));

    let out = acpx.run(&["home-claude", "say hi"]);
    assert!(
        out.status.success(),
        "{}{}",
        super::stdout(&out),
        super::stderr(&out)
    );
    assert!(
        super::stdout(&out).contains("fake reply to: say hi"),
        "{}",
        super::stdout(&out)
    );
    let out = acpx.run(&["home-claude", "again"]);
    assert!(out.status.success(), "{}", super::stderr(&out));
    assert!(
        super::stdout(&out).contains("fake reply to: again"),
        "{}",
        super::stdout(&out)
    );
    let (_, list) = get(&server, "/v1/tasks?agent=claude&limit=10");
    let tasks = list["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{list}");
    let conv = tasks[0]["conversation"].as_str().unwrap();
    assert!(
        conv.starts_with("acp-") && tasks[1]["conversation"] == conv,
        "{list}"
    );
    assert_eq!(
        tasks[0]["result"]["session_id"], tasks[1]["result"]["session_id"],
        "the follow-up continued Claude's session: {list}"
    );

    // A permission request answered from acpx.
    api.scenario(json!({"scenario": "tool", "tool_command": "echo acpx > from-acpx.txt"}));
    let out = acpx.run(&["--approve-all", "home-claude", "write the file"]);
    assert!(out.status.success(), "{}", super::stderr(&out));
    assert_eq!(
        std::fs::read_to_string(web.join("from-acpx.txt")).unwrap(),
        "acpx\n"
    );
    let (_, list) = get(&server, "/v1/approvals?limit=10");
    let a = &list["approvals"][0];
    assert_eq!(list["approvals"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(a["state"], "allowed", "{list}");
    assert_eq!(a["outcome"]["by"], "acp:acpx via token laptop", "{list}");

    // And one answered by `tunnel approve` (this acpx cannot ask anyone: it leaves it open).
    api.scenario(json!({"scenario": "tool", "tool_command": "echo cli > from-cli.txt"}));
    let prompt = acpx
        .command(&[
            "--non-interactive-permissions",
            "fail",
            "home-claude",
            "write another",
        ])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let aid = loop {
        let (_, list) = get(&server, "/v1/approvals?state=pending");
        if let Some(id) = list["approvals"][0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(Instant::now() < deadline, "no approval asked");
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = Command::new(BIN)
        .args(["approve", &aid, "--by", "phone"])
        .env("TUNNEL_URL", server.url())
        .env("TUNNEL_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", super::stderr(&out));
    let out = prompt.wait_with_output().unwrap();
    assert!(
        super::stdout(&out).contains("done: "),
        "the answer reached acpx: {}{}",
        super::stdout(&out),
        super::stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(web.join("from-cli.txt")).unwrap(),
        "cli\n"
    );
    let (_, a) = get(&server, &format!("/v1/approvals/{aid}"));
    assert_eq!(a["outcome"]["by"], "phone via token worker-token", "{a}");
}

/// The bridge's overhead on loopback, printed for docs/BENCHMARKS.md (a figure, not an
/// assertion): run with `cargo test --release -p tunnel --test it acp::bridge_overhead --
/// --ignored --nocapture`.
/// - prompt: the client writes `session/prompt` → the server has stored the task
///   (`created_at`), against a direct `POST /v1/tasks` on a kept-alive connection;
/// - update: the same event received by the client from `tunnel acp` and, at the same time,
///   from the server's SSE stream read directly (curl -N).
#[test]
#[ignore = "a benchmark figure; run it by name"]
fn bridge_overhead() {
    overhead("tunnel acp");
}

/// The same figures through the server's `/acp` (a WebSocket client in this process instead of
/// a `tunnel acp` child): `acp::bridge_overhead_websocket`.
#[test]
#[ignore = "a benchmark figure; run it by name"]
fn bridge_overhead_websocket() {
    overhead("/acp (WebSocket)");
}

/// The same through `/acp`'s HTTP profile (POST + SSE): `acp::bridge_overhead_http`.
#[test]
#[ignore = "a benchmark figure; run it by name"]
fn bridge_overhead_http() {
    overhead("/acp (POST + SSE)");
}

fn overhead(via: &str) {
    let n: usize = std::env::var("ACP_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let world = World::new();
    let server = Server::start(&world, &[], vec![]);
    let _runner = AgentRunner::start(&world, &server, "home", &tiny_agents(&world));
    let editor = token(&server, "editor");
    let mut acp = match via {
        "/acp (WebSocket)" => Acp::websocket(&server, &editor, "?agent=tiny"),
        "/acp (POST + SSE)" => Acp::http(&server, &editor, "?agent=tiny"),
        _ => Acp::start_with(&server, &editor, &["--agent", "tiny"]),
    };
    initialize(&mut acp);
    let s = acp.call("session/new", json!({"cwd": "/x/web"}));
    let sid = s["result"]["sessionId"].as_str().unwrap().to_owned();
    let mut direct = std::net::TcpStream::connect(server.addr()).unwrap();
    direct.set_nodelay(true).unwrap();
    let mut direct_reader = BufReader::new(direct.try_clone().unwrap());
    let (mut via_bridge, mut via_http, mut update_added) = (vec![], vec![], vec![]);
    for i in 0..n {
        // Direct: one HTTP/1.1 request on a kept-alive connection.
        let body = json!({"agent": "tiny", "prompt": "direct", "conversation": format!("direct-{i}"), "project": "web"}).to_string();
        let t0 = micros();
        write!(direct, "POST /v1/tasks HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {editor}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut len = 0;
        loop {
            let mut line = String::new();
            direct_reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut buf = vec![0; len];
        std::io::Read::read_exact(&mut direct_reader, &mut buf).unwrap();
        let task: Value = serde_json::from_slice(&buf).unwrap();
        via_http.push(task["created_at"].as_i64().unwrap() as f64 - t0 as f64 / 1000.0);

        // Through the bridge.
        let before = tasks_of(&server, &sid).len();
        let t0 = micros();
        let pid = acp.request(
            "session/prompt",
            json!({"sessionId": sid, "prompt": [{"type": "text", "text": "tool: true"}]}),
        );
        let ask = acp.until("permission request", is_permission);
        let tasks = tasks_of(&server, &sid);
        assert_eq!(tasks.len(), before + 1);
        let task = tasks.last().unwrap();
        via_bridge.push(task["created_at"].as_i64().unwrap() as f64 - t0 as f64 / 1000.0);
        // The events after the answer, read directly and through the bridge at once.
        let id = task["id"].as_str().unwrap().to_owned();
        let (_, ev) = get(&server, &format!("/v1/tasks/{id}/events?format=json"));
        let after = ev["events"].as_array().unwrap().last().unwrap()["seq"]
            .as_u64()
            .unwrap();
        let mut curl = Command::new("curl")
            .args(["-sN", "-H", &format!("authorization: Bearer {editor}")])
            .arg(format!(
                "{}/v1/tasks/{id}/events?after={after}",
                server.url()
            ))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = curl.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = vec![];
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let at = micros();
                if let Some(d) = line.strip_prefix("data: ")
                    && let Ok(e) = serde_json::from_str::<Value>(d)
                {
                    got.push((at, e["kind"].as_str().unwrap_or_default().to_owned()));
                }
            }
            got
        });
        // The direct stream is open once the server answered curl's request: an SSE comment or
        // the first event; give it the moment a connect takes.
        std::thread::sleep(Duration::from_millis(100));
        let option = allow_option(&ask);
        acp.send(json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"outcome": {"outcome": "selected", "optionId": option}}}));
        acp.until("prompt answer", |v| {
            v["id"] == pid && v.get("method").is_none()
        });
        let updates: Vec<Value> = std::mem::take(&mut acp.backlog)
            .into_iter()
            .filter(|v| v["method"] == "session/update")
            .collect();
        wait_ended(&server, &id);
        let _ = curl.kill();
        let _ = curl.wait();
        let direct_events: Vec<u64> = reader
            .join()
            .unwrap()
            .into_iter()
            .filter(|(_, k)| {
                matches!(
                    k.as_str(),
                    "text" | "thought" | "tool_call" | "tool_call_update" | "plan"
                )
            })
            .map(|(at, _)| at)
            .collect();
        let bridged: Vec<u64> = updates
            .iter()
            .map(|u| u["_rx_us"].as_u64().unwrap())
            .collect();
        let k = direct_events.len().min(bridged.len());
        for j in 0..k {
            // The bridge's last `k` updates are the events after `after`.
            let b = bridged[bridged.len() - k + j];
            update_added.push((b as f64 - direct_events[j] as f64) / 1000.0);
        }
    }
    let p = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[((v.len() - 1) as f64 * q).round() as usize]
    };
    println!(
        "prompt -> task stored, ms: via {via} p50 {:.2} p90 {:.2}; direct POST p50 {:.2} p90 {:.2} ({n} prompts)",
        p(&mut via_bridge, 0.5),
        p(&mut via_bridge, 0.9),
        p(&mut via_http, 0.5),
        p(&mut via_http, 0.9)
    );
    println!(
        "update -> client, added by {via} over reading SSE directly, ms: p50 {:.2} p90 {:.2} max {:.2} ({} updates)",
        p(&mut update_added, 0.5),
        p(&mut update_added, 0.9),
        p(&mut update_added, 1.0),
        update_added.len()
    );
}
