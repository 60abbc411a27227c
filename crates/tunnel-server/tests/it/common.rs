//! Starts servers and talks to them.

use std::path::PathBuf;
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tunnel_server::{Server, ServerConfig};
use tunnel_store::{Database, Durability, ManualClock, QueueSettings};

pub const WORKER_TOKEN: &str = "it-worker-token-3f9c1d7e8a2b";
pub const START_MS: i64 = 1_800_000_000_000;

/// A running server with one token of each role.
pub struct TestServer {
    pub url: String,
    pub clock: Arc<ManualClock>,
    pub admin: String,
    pub client: String,
    pub runner: String,
    pub http: reqwest::Client,
    pub db_path: PathBuf,
    pub delivery: tunnel_delivery::PlatformsConfig,
    shutdown: CancellationToken,
    handle: JoinHandle<std::io::Result<()>>,
    dir: Option<tempfile::TempDir>,
}

#[derive(Default)]
pub struct Options {
    pub max_body_bytes: Option<usize>,
    pub delivery: tunnel_delivery::PlatformsConfig,
    /// Retention of finished tasks (clock ms) and how often to prune; the server's default
    /// (a week) when `None`.
    pub retention: Option<(i64, std::time::Duration)>,
    /// The queue's settings; the defaults when `None`.
    pub queue: Option<QueueSettings>,
    pub connections: Option<tunnel_server::ConnectionLimits>,
    pub max_polls_per_token: Option<usize>,
    pub acp: Option<tunnel_server::AcpLimits>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("tunnel.db");
        let clock = Arc::new(ManualClock::new(START_MS));
        let delivery = opts.delivery.clone();
        let mut s = launch(db_path, clock, opts).await;
        s.delivery = delivery;
        s.client = s.create_token("client").await;
        s.runner = s.create_token("runner").await;
        s.dir = Some(dir);
        s
    }

    /// Stops this server and starts another on the same database (same tokens, same clock).
    pub async fn restart(mut self) -> TestServer {
        let dir = self.dir.take();
        let (db, clock, client, runner) = (
            self.db_path.clone(),
            self.clock.clone(),
            self.client.clone(),
            self.runner.clone(),
        );
        let delivery = self.delivery.clone();
        self.stop().await;
        let opts = Options {
            delivery: delivery.clone(),
            ..Options::default()
        };
        let mut s = launch(db, clock, opts).await;
        s.delivery = delivery;
        s.client = client;
        s.runner = runner;
        s.dir = dir;
        s
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub async fn create_token(&self, role: &str) -> String {
        let (status, body) = self
            .post(
                "/v1/tokens",
                &self.admin,
                json!({"name": format!("it-{role}"), "role": role}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    pub fn client_api(&self) -> tunnel_client::Client {
        tunnel_client::Client::new(&self.url, &self.client).unwrap()
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        // Only /metrics answers in text (Prometheus); everything else must be JSON.
        let resp_is_text = resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or_default().starts_with("text/plain"));
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else if resp_is_text {
            Value::String(text)
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
        };
        (status, value)
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, path, Some(token), Some(body))
            .await
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, path, Some(token), None)
            .await
    }

    /// Submits as the client token; returns the task JSON.
    pub async fn submit(&self, body: Value) -> Value {
        let (status, task) = self.post("/v1/tasks", &self.client, body).await;
        assert_eq!(status, StatusCode::CREATED, "{task}");
        task
    }

    pub async fn task(&self, id: &str) -> Value {
        let (status, task) = self.get(&format!("/v1/tasks/{id}"), &self.client).await;
        assert_eq!(status, StatusCode::OK, "{task}");
        task
    }

    /// Claims as `runner`, waiting up to `wait_ms`; `None` on 204.
    pub async fn claim(&self, runner: &str, agents: &[&str], wait_ms: u64) -> Option<Value> {
        let (status, body) = self
            .post(
                "/v1/claim",
                &self.runner,
                json!({"runner": runner, "agents": agents, "wait_ms": wait_ms}),
            )
            .await;
        match status {
            StatusCode::OK => Some(body),
            StatusCode::NO_CONTENT => None,
            s => panic!("claim answered {s}: {body}"),
        }
    }

    /// Posts a runner call for an offer (`ack`, `heartbeat`, `events`, `finish`).
    pub async fn attempt_call(
        &self,
        offer: &Value,
        call: &str,
        extra: Value,
    ) -> (StatusCode, Value) {
        let id = offer["task"]["id"].as_str().unwrap();
        let mut body = json!({"attempt": offer["attempt"], "lease_token": offer["lease_token"]});
        if let Value::Object(m) = extra {
            body.as_object_mut().unwrap().extend(m);
        }
        self.post(&format!("/v1/tasks/{id}/{call}"), &self.runner, body)
            .await
    }

    /// Acks and finishes with `succeeded` and the given text.
    pub async fn run_to_success(&self, offer: &Value, text: &str) -> Value {
        let (s, b) = self.attempt_call(offer, "ack", json!({})).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let (s, task) = self
            .attempt_call(
                offer,
                "finish",
                json!({"outcome": "succeeded", "result": {"text": text}}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{task}");
        task
    }

    /// The `tunnel_long_polls_parked` line of /metrics once it reads 0 (a closed poll's socket
    /// is noticed), or as it stands after 5 s.
    pub async fn parked_polls_line_once_settled(&self) -> String {
        let mut parked = String::new();
        for _ in 0..200 {
            let (_, m) = self
                .request(reqwest::Method::GET, "/metrics", None, None)
                .await;
            parked = m
                .as_str()
                .unwrap()
                .lines()
                .find(|l| l.starts_with("tunnel_long_polls_parked "))
                .unwrap()
                .to_owned();
            if parked == "tunnel_long_polls_parked 0" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        parked
    }

    pub fn settings(&self) -> QueueSettings {
        QueueSettings::default()
    }
}

async fn launch(db_path: PathBuf, clock: Arc<ManualClock>, opts: Options) -> TestServer {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let database = Database::Sqlite {
        path: db_path.clone(),
        durability: Durability::Normal,
    };
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), database);
    config.worker_token = Some(WORKER_TOKEN.into());
    config.clock = clock.clone();
    if let Some(b) = opts.max_body_bytes {
        config.max_body_bytes = b;
    }
    config.delivery = opts.delivery;
    if let Some(q) = opts.queue {
        config.queue = q;
    }
    if let Some((keep, every)) = opts.retention {
        config.retain_finished_ms = Some(keep);
        config.prune_every = every;
    }
    if let Some(c) = opts.connections {
        config.connections = c;
    }
    if let Some(n) = opts.max_polls_per_token {
        config.max_polls_per_token = n;
    }
    if let Some(a) = opts.acp {
        config.acp = a;
    }
    let server = Server::bind(config).await.unwrap();
    let url = format!("http://{}", server.local_addr());
    let shutdown = server.shutdown_token();
    let handle = tokio::spawn(server.run());
    TestServer {
        url,
        clock,
        admin: WORKER_TOKEN.into(),
        client: String::new(),
        runner: String::new(),
        http: reqwest::Client::new(),
        db_path,
        delivery: Default::default(),
        shutdown,
        handle,
        dir: None,
    }
}

pub fn id(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {v}"))
        .to_owned()
}
