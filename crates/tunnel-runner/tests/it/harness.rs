//! A server and a runner in this process, talking HTTP on loopback.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tunnel_client::Client;
use tunnel_protocol::{Role, SubmitTask, Task, TaskState};
use tunnel_runner::{AgentConfig, AgentKind, OutputMode, RunnerConfig, RunnerError, Shutdown};
use tunnel_server::{Server, ServerConfig};
use tunnel_store::{Database, Durability};

const WORKER_TOKEN: &str = "runner-it-token-7c1e9a2b5d";

pub struct World {
    pub url: String,
    pub admin: Client,
    pub runner_token: String,
    pub dir: tempfile::TempDir,
    server_stop: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    addr: std::net::SocketAddr,
}

impl World {
    pub async fn start() -> World {
        World::start_with(|_| {}).await
    }

    /// A world whose server config `tune` changes first (e.g. a short lease).
    pub async fn start_with(tune: impl FnOnce(&mut ServerConfig)) -> World {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let db = Database::Sqlite {
            path: dir.path().join("t.db"),
            durability: Durability::Normal,
        };
        let mut cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap(), db);
        cfg.worker_token = Some(WORKER_TOKEN.into());
        tune(&mut cfg);
        let server = Server::bind(cfg).await.unwrap();
        let addr = server.local_addr();
        let url = format!("http://{addr}");
        let server_stop = server.shutdown_token();
        let server = tokio::spawn(server.run());
        let admin = Client::new(&url, WORKER_TOKEN).unwrap();
        let runner_token = admin
            .create_token("it-runner", Role::Runner)
            .await
            .unwrap()
            .token;
        World {
            url,
            admin,
            runner_token,
            dir,
            server_stop,
            server,
            addr,
        }
    }

    /// Stops the server and starts a new one on the same address and database (what a
    /// restart or crash of the server does to the runners and their waiting questions).
    pub async fn restart_server(&mut self) {
        self.stop_server().await;
        self.start_server_again().await;
    }

    /// Stops the server (its address stays this world's).
    pub async fn stop_server(&mut self) {
        self.server_stop.cancel();
        let _ = (&mut self.server).await;
    }

    /// The address the server listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Starts a server again on the address and database of the stopped one.
    pub async fn start_server_again(&mut self) {
        let db = Database::Sqlite {
            path: self.dir.path().join("t.db"),
            durability: Durability::Normal,
        };
        let mut cfg = ServerConfig::new(self.addr, db);
        cfg.worker_token = Some(WORKER_TOKEN.into());
        let mut tries = 0;
        let server = loop {
            match Server::bind(cfg.clone()).await {
                Ok(s) => break s,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the server did not restart: {e}"),
            }
        };
        self.server_stop = server.shutdown_token();
        self.server = tokio::spawn(server.run());
    }

    /// A runner config with no built-in agents, its dirs inside this world.
    pub fn config(&self, name: &str) -> RunnerConfig {
        let data = self.dir.path().join(format!("runner-{name}"));
        let mut c = RunnerConfig::new(&self.url, &self.runner_token, data);
        c.name = name.into();
        c.agents.clear();
        c.long_poll_wait = Duration::from_secs(5);
        c.kill_grace = Duration::from_millis(500);
        c.shutdown_grace = Duration::from_secs(5);
        c
    }

    /// Writes an executable script into the world and returns its path.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    pub async fn submit(&self, req: SubmitTask) -> Task {
        self.admin.submit(&req, None).await.unwrap()
    }

    /// An `echo` task claimed and acked under `runner` by hand, as a previous run of that
    /// runner would have left it; returns (task id, attempt, lease token).
    pub async fn acked_attempt(&self, runner: &str) -> (String, u32, String) {
        let api = Client::new(&self.url, &self.runner_token).unwrap();
        let t = self.submit(task("echo", "x")).await;
        let claim = tunnel_protocol::ClaimRequest {
            runner: runner.into(),
            agents: vec!["echo".into()],
            projects: vec![],
            capacity: 1,
            wait_ms: 0,
            version: None,
            agent_versions: Default::default(),
            acp_agents: vec![],
            acp_capabilities: None,
            ack: false,
            holding: vec![],
        };
        let offer = api.claim(&claim).await.unwrap().unwrap();
        let at = tunnel_protocol::AttemptRef {
            attempt: offer.attempt,
            lease_token: offer.lease_token.clone(),
        };
        api.ack(&t.id, &at).await.unwrap();
        (t.id, offer.attempt, offer.lease_token)
    }

    /// Waits (server-side) until the task ends.
    pub async fn ended(&self, id: &str) -> Task {
        for _ in 0..6 {
            let t = self
                .admin
                .task(id, Some(Duration::from_secs(10)))
                .await
                .unwrap();
            if t.state.is_terminal() {
                return t;
            }
        }
        panic!("task {id} did not end");
    }

    /// Waits until the task is in `state`.
    pub async fn reaches(&self, id: &str, state: TaskState) -> Task {
        for _ in 0..300 {
            let t = self.admin.task(id, None).await.unwrap();
            if t.state == state {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("task {id} never reached {state}");
    }

    pub async fn stop(self) {
        self.server_stop.cancel();
        let _ = self.server.await;
    }
}

/// A running runner.
pub struct RunnerHandle {
    pub shutdown: Shutdown,
    pub join: JoinHandle<Result<(), RunnerError>>,
}

impl RunnerHandle {
    pub fn spawn(config: RunnerConfig) -> RunnerHandle {
        let shutdown = Shutdown::default();
        let join = tokio::spawn(tunnel_runner::run(config, shutdown.clone()));
        RunnerHandle { shutdown, join }
    }

    pub async fn stop(self) -> Result<(), RunnerError> {
        self.shutdown.stop.cancel();
        self.join.await.unwrap()
    }
}

/// A custom agent running `program` with `command`.
pub fn custom(program: &Path, command: &[&str], output: OutputMode) -> AgentConfig {
    let mut a = AgentConfig::echo();
    a.kind = AgentKind::Custom;
    a.program = program.display().to_string();
    a.command = command.iter().map(|s| s.to_string()).collect();
    a.output = output;
    a
}

/// A built-in agent kind played by a script (the fake CLIs in tests/fixtures, or a test's own).
pub fn builtin(kind: AgentKind, program: &Path) -> AgentConfig {
    let mut a = AgentConfig::builtin(kind, program.display().to_string());
    a.env = BTreeMap::new();
    a
}

pub fn task(agent: &str, prompt: &str) -> SubmitTask {
    SubmitTask::new(agent, prompt)
}

/// True while a process with this pid exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"),
        Err(_) => false,
    }
}

pub fn read_pid(path: &Path) -> i32 {
    for _ in 0..100 {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(p) = s.trim().parse()
        {
            return p;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no pid in {}", path.display());
}
