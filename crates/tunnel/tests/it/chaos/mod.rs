//! Reliability under failure, with real processes on loopback (issue 6, scenarios 1–5): the
//! real `tunnel serve` and `tunnel runner` binaries, fake agents that log every execution, chat
//! stand-ins that log every message, a TCP proxy that cuts the link. Servers and runners are
//! killed (`kill -9`), stopped (SIGTERM) and cut off mid-run; each test then checks that every
//! task ended exactly once, ran once, and was answered once, and prints its figures.
//!
//! `TUNNEL_CHAOS=1` runs the full sizes (minutes; the figures in docs/RELIABILITY.md); without
//! it each scenario runs a small size so `cargo test` exercises it in seconds.

mod chat;
mod proxy;
mod scenarios;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::BIN;

/// The admin token every chaos server is started with (`WORKER_TOKEN`), so restarts keep it.
pub(crate) const TOKEN: &str = "chaos-admin-token-0123456789abcdef";

/// Whether the full-size run was asked for.
pub(crate) fn full() -> bool {
    std::env::var("TUNNEL_CHAOS").is_ok_and(|v| v == "1")
}

/// `small` in a normal test run, `big` with `TUNNEL_CHAOS=1`.
pub(crate) fn size(small: usize, big: usize) -> usize {
    if full() { big } else { small }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The fake agent: logs `start`, `term` (on SIGTERM) and `end` lines with its task id, runner
/// and the time in ms to `$EXEC_LOG`, sleeps as long as the prompt says, and answers. Prompt:
/// `<quiet|chatty> <seconds>`; a chatty agent prints a line every 0.2 s while it works.
const FAKE_AGENT: &str = r#"#!/bin/sh
[ "$1" = -- ] && shift
id=$1
set -- $2
mode=$1; secs=$2
[ -n "$SLEEP_OVERRIDE" ] && secs=$SLEEP_OVERRIDE
echo "start $id $RUNNER $$ $(date +%s%3N)" >> "$EXEC_LOG"
trap 'echo "term $id $RUNNER $$ $(date +%s%3N)" >> "$EXEC_LOG"; exit 143' TERM
echo "working on $id"
if [ "$mode" = chatty ]; then
  end=$(( $(date +%s) + ${secs%.*} ))
  while [ "$(date +%s)" -lt "$end" ]; do echo "tick $id"; sleep 0.2 & wait $!; done
else
  sleep "$secs" & wait $!
fi
echo "end $id $RUNNER $$ $(date +%s%3N)" >> "$EXEC_LOG"
echo "answer $id"
"#;

/// One test's world: a temp dir with the fake agent, its execution log, server and runner dirs.
pub(crate) struct World {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) agent: PathBuf,
    pub(crate) exec_log: PathBuf,
}

impl World {
    pub(crate) fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("fake-agent");
        std::fs::write(&agent, FAKE_AGENT).unwrap();
        std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let exec_log = dir.path().join("exec.log");
        File::create(&exec_log).unwrap();
        World {
            dir,
            agent,
            exec_log,
        }
    }

    pub(crate) fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// The execution log: (what, task id, runner, pid, ms).
    pub(crate) fn execs(&self) -> Vec<Exec> {
        std::fs::read_to_string(&self.exec_log)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.len() == 5).then(|| Exec {
                    what: f[0].to_owned(),
                    task: f[1].to_owned(),
                    runner: f[2].to_owned(),
                    pid: f[3].parse().unwrap_or(0),
                    ms: f[4].parse().unwrap_or(0),
                })
            })
            .collect()
    }

    /// Task id → how many times the agent started for it.
    pub(crate) fn starts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for e in self.execs().into_iter().filter(|e| e.what == "start") {
            *m.entry(e.task).or_default() += 1;
        }
        m
    }

    pub(crate) fn ended(&self) -> usize {
        self.execs().iter().filter(|e| e.what == "end").count()
    }
}

/// Whatever else a test checks: no server or runner panicked (their logs are read when the
/// world goes, after the processes).
impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let mut logs = vec![self.path("server.log")];
        if let Ok(dir) = std::fs::read_dir(self.dir.path()) {
            logs.extend(dir.flatten().map(|e| e.path().join("runner.log")));
        }
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("panicked")) {
                panic!("{} has a panic: {line}", log.display());
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Exec {
    pub(crate) what: String,
    pub(crate) task: String,
    pub(crate) runner: String,
    pub(crate) pid: i32,
    pub(crate) ms: i64,
}

/// A `tunnel serve` child that can be killed and restarted on the same port and database.
pub(crate) struct Server {
    pub(crate) data: PathBuf,
    pub(crate) port: u16,
    child: Option<Child>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    pub(crate) starts: u32,
}

impl Server {
    pub(crate) fn start(world: &World, args: &[&str], env: Vec<(String, String)>) -> Server {
        let data = world.path("server");
        std::fs::create_dir_all(&data).unwrap();
        let mut s = Server {
            log: world.path("server.log"),
            data,
            port: 0,
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            env,
            starts: 0,
        };
        s.spawn();
        s
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// Starts (again) on the same port and database; waits until it listens.
    pub(crate) fn spawn(&mut self) {
        assert!(self.child.is_none());
        for _ in 0..50 {
            let mut cmd = Command::new(BIN);
            cmd.args([
                "serve",
                "--port",
                &self.port.to_string(),
                "--log-format",
                "json",
            ])
            .args(&self.args)
            .env("XDG_DATA_HOME", &self.data)
            .env("XDG_CONFIG_HOME", &self.data)
            .env("WORKER_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .env_remove("TUNNEL_TOKEN")
            .env_remove("PORT")
            .env_remove("DATABASE_URL")
            .current_dir(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
            for (k, v) in &self.env {
                cmd.env(k, v);
            }
            let mut child = cmd.spawn().unwrap();
            let stderr = child.stderr.take().unwrap();
            let mut log = File::options()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = writeln!(log, "{line}");
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && let Some(addr) = v["fields"]["address"].as_str()
                    {
                        let _ = tx.send(addr.to_owned());
                    }
                }
            });
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(addr) => {
                    self.port = addr.rsplit(':').next().unwrap().parse().unwrap();
                    self.child = Some(child);
                    self.starts += 1;
                    return;
                }
                Err(_) => {
                    // The port may still be held for a moment after a kill; try again.
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!("the server did not start; see {}", self.log.display());
    }

    /// SIGKILL: no chance to clean up.
    pub(crate) fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM; returns the exit status and how long the server took to exit.
    pub(crate) fn sigterm(&mut self) -> (ExitStatus, Duration) {
        let mut c = self.child.take().expect("running");
        sigterm(&mut c)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends SIGTERM and waits; returns the status and the time to exit.
pub(crate) fn sigterm(c: &mut Child) -> (ExitStatus, Duration) {
    let t = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = c.wait().unwrap();
    (status, t.elapsed())
}

/// How a runner is set up.
#[derive(Clone)]
pub(crate) struct RunnerSpec {
    pub(crate) name: String,
    pub(crate) server: String,
    pub(crate) max_concurrent: usize,
    pub(crate) shutdown_grace_secs: u64,
    /// Extra environment for the fake agent (e.g. SLEEP_OVERRIDE).
    pub(crate) agent_env: Vec<(String, String)>,
    /// `ack_in_claim` of the runner's config.
    pub(crate) ack_in_claim: bool,
}

impl RunnerSpec {
    pub(crate) fn new(name: &str, server: &str) -> RunnerSpec {
        RunnerSpec {
            name: name.into(),
            server: server.into(),
            max_concurrent: 8,
            shutdown_grace_secs: 60,
            agent_env: vec![],
            // The runner's default.
            ack_in_claim: true,
        }
    }
}

/// A `tunnel runner` child with its own data dir and spool, offering the fake agent.
pub(crate) struct Runner {
    pub(crate) spec: RunnerSpec,
    pub(crate) dir: PathBuf,
    child: Option<Child>,
}

impl Runner {
    pub(crate) fn start(world: &World, spec: RunnerSpec) -> Runner {
        let dir = world.path(&format!("runner-{}", spec.name));
        std::fs::create_dir_all(&dir).unwrap();
        let mut env = format!(
            "RUNNER = \"{}\", EXEC_LOG = \"{}\"",
            spec.name,
            world.exec_log.display()
        );
        for (k, v) in &spec.agent_env {
            env.push_str(&format!(", {k} = \"{v}\""));
        }
        let cfg = format!(
            "[runner]\nname = \"{name}\"\nmax_concurrent = {mc}\nlong_poll_wait_secs = 10\nack_in_claim = {aic}\n\
             shutdown_grace_secs = {grace}\nspool_dir = \"{spool}\"\nwork_dir = \"{work}\"\n\
             [runner.agents.fake]\nprogram = \"{agent}\"\ncommand = [\"--\", \"{{task_id}}\", \"{{prompt}}\"]\n\
             env = {{ {env} }}\n\
             [runner.agents.claude]\nenabled = false\n[runner.agents.codex]\nenabled = false\n\
             [runner.agents.gemini]\nenabled = false\n",
            name = spec.name,
            mc = spec.max_concurrent,
            aic = spec.ack_in_claim,
            grace = spec.shutdown_grace_secs,
            spool = dir.join("spool").display(),
            work = dir.join("work").display(),
            agent = world.agent.display(),
        );
        std::fs::write(dir.join("runner.toml"), cfg).unwrap();
        let mut r = Runner {
            spec,
            dir,
            child: None,
        };
        r.spawn();
        r
    }

    pub(crate) fn spawn(&mut self) {
        assert!(self.child.is_none());
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("runner.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["runner", "--config"])
            .arg(self.dir.join("runner.toml"))
            .args(["--server", &self.spec.server, "--token", TOKEN])
            .env("XDG_DATA_HOME", &self.dir)
            .env("XDG_CONFIG_HOME", &self.dir)
            .env("RUST_LOG", "info")
            .env_remove("WORKER_TOKEN")
            .env_remove("WORKER_URL")
            .env_remove("MAX_CONCURRENT")
            .env_remove("LONG_POLL_WAIT")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub(crate) fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    pub(crate) fn sigterm(&mut self) -> (ExitStatus, Duration) {
        let mut c = self.child.take().expect("running");
        sigterm(&mut c)
    }

    /// Attempts still in the spool (not yet acknowledged by the server).
    pub(crate) fn spooled(&self) -> usize {
        std::fs::read_dir(self.dir.join("spool"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count()
            })
            .unwrap_or(0)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("runner.log")).unwrap_or_default()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// HTTP to the server as the test's client (reqwest, admin token).
#[derive(Clone)]
pub(crate) struct Api {
    http: reqwest::Client,
    pub(crate) url: String,
}

impl Api {
    pub(crate) fn new(url: &str) -> Api {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            url: url.to_owned(),
        }
    }

    /// Submits, retrying with the same `Idempotency-Key` until the server answers (it may be
    /// down). Returns the task id.
    pub(crate) async fn submit(&self, key: &str, body: &Value) -> String {
        let t = Instant::now();
        loop {
            let r = self
                .http
                .post(format!("{}/v1/tasks", self.url))
                .bearer_auth(TOKEN)
                .header("idempotency-key", key)
                .json(body)
                .send()
                .await;
            if let Ok(r) = r {
                let status = r.status();
                if status.is_success() {
                    let v: Value = r.json().await.unwrap();
                    return v["id"].as_str().unwrap().to_owned();
                }
                assert!(
                    status.is_server_error(),
                    "submit refused: {status} {}",
                    r.text().await.unwrap_or_default()
                );
            }
            assert!(t.elapsed() < Duration::from_secs(120), "cannot submit");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The task, or None while the server cannot answer.
    pub(crate) async fn task(&self, id: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}/v1/tasks/{id}", self.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Option<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.json().await.unwrap_or(Value::Null)))
    }

    pub(crate) async fn metrics(&self) -> String {
        match self.http.get(format!("{}/metrics", self.url)).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits until every task is in a terminal state (or `limit` passes); returns them.
    pub(crate) async fn wait_all(
        &self,
        ids: &[String],
        limit: Duration,
    ) -> BTreeMap<String, Value> {
        let t = Instant::now();
        let mut done = BTreeMap::new();
        loop {
            for id in ids {
                if done.contains_key(id) {
                    continue;
                }
                if let Some(task) = self.task(id).await
                    && task["finished_at"].is_i64()
                {
                    done.insert(id.clone(), task);
                }
            }
            if done.len() == ids.len() || t.elapsed() > limit {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until the task is in `state`; returns it.
    pub(crate) async fn wait_state(&self, id: &str, state: &str, limit: Duration) -> Value {
        let t = Instant::now();
        loop {
            if let Some(task) = self.task(id).await
                && task["state"] == state
            {
                return task;
            }
            assert!(t.elapsed() < limit, "task {id} never {state}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A task body for the fake agent.
pub(crate) fn task_body(
    prompt: &str,
    conversation: Option<&str>,
    reply_to: Option<Value>,
) -> Value {
    let mut b = json!({"agent": "fake", "prompt": prompt});
    if let Some(c) = conversation {
        b["conversation"] = c.into();
    }
    if let Some(r) = reply_to {
        b["reply_to"] = r;
    }
    b
}

/// Checks the figures every scenario shares and returns them: each task ended in `expect`
/// state, no task started twice, each task answered exactly once in the chat, and for each
/// conversation the answers arrived in submission order.
pub(crate) struct Tally {
    pub(crate) tasks: usize,
    pub(crate) lost: usize,
    pub(crate) duplicates: usize,
    pub(crate) not_run: usize,
    pub(crate) answered_twice: usize,
    pub(crate) unanswered: usize,
    pub(crate) out_of_order: usize,
    /// Answers posted somewhere else than the task's `reply_to`.
    pub(crate) misdirected: usize,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tasks {} · lost (not succeeded) {} · run twice {} · never run {} · answered twice {} · unanswered {} · answers out of order {} · misdirected {}",
            self.tasks,
            self.lost,
            self.duplicates,
            self.not_run,
            self.answered_twice,
            self.unanswered,
            self.out_of_order,
            self.misdirected
        )
    }
}

/// `order`: task ids of each conversation in submission order.
pub(crate) fn tally(
    world: &World,
    ids: &[String],
    tasks: &BTreeMap<String, Value>,
    finals: &[(String, chat::Message)],
    order: &[Vec<String>],
) -> Tally {
    let starts = world.starts();
    let mut answers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, (id, _)) in finals.iter().enumerate() {
        answers.entry(id.as_str()).or_default().push(i);
    }
    let mut out_of_order = 0;
    for conv in order {
        let pos: Vec<usize> = conv
            .iter()
            .filter_map(|id| answers.get(id.as_str()).map(|v| v[0]))
            .collect();
        out_of_order += pos.windows(2).filter(|w| w[0] > w[1]).count();
    }
    for id in ids {
        match tasks.get(id) {
            Some(t) if t["state"] == "succeeded" => {}
            Some(t) => println!(
                "chaos: task {id} ended {} (attempt {}, runner {}): {} {}",
                t["state"], t["attempt"], t["runner"], t["reason"], t["result"]["error"]
            ),
            None => println!("chaos: task {id} never ended"),
        }
    }
    Tally {
        tasks: ids.len(),
        lost: ids
            .iter()
            .filter(|id| tasks.get(*id).is_none_or(|t| t["state"] != "succeeded"))
            .count(),
        duplicates: starts.values().filter(|n| **n > 1).count(),
        not_run: ids.iter().filter(|id| !starts.contains_key(*id)).count(),
        answered_twice: answers.values().filter(|v| v.len() > 1).count(),
        unanswered: ids
            .iter()
            .filter(|id| !answers.contains_key(id.as_str()))
            .count(),
        out_of_order,
        misdirected: finals
            .iter()
            .filter(|(id, m)| {
                tasks
                    .get(id)
                    .is_some_and(|t| t["reply_to"]["channel"].as_str() != Some(m.channel.as_str()))
            })
            .count(),
    }
}

pub(crate) fn assert_clean(t: &Tally, what: &str) {
    assert!(
        t.lost == 0
            && t.duplicates == 0
            && t.not_run == 0
            && t.answered_twice == 0
            && t.unanswered == 0
            && t.out_of_order == 0
            && t.misdirected == 0,
        "{what}: {t}"
    );
}

/// Waits until `f` holds (polling), or panics after `limit`.
pub(crate) async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.contains(") Z ") && !s.contains(") X "))
}
