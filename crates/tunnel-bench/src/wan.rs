//! Phase 9, over a slow link (issue 19 §2): a real `tunnel runner` process reaches the server
//! through a relay that delays every chunk by the one-way delay in each direction, and runs a
//! tiny agent (this binary) that prints a line, waits, and exits.
//!
//! The delay is made in userspace, not with `tc netem`: the machine the figures come from has
//! no `sch_netem` module. The relay reads each direction as fast as bytes come, stamps each
//! chunk with the time it was read, and writes it `one_way` later, in order (a FIFO per
//! direction), so the link has latency but no bandwidth limit. A new connection's first bytes
//! wait one round trip more (the TCP handshake a real link would cost before them). No TLS.
//!
//! Measured per task (one at a time), on one wall clock:
//! - submit → agent started: just before the submit is sent → the agent's first clock reading;
//! - agent line → SSE: the agent's clock reading printed in its output line → that line read by
//!   an event-stream watcher on the server's side of the link, and by one across it (through a
//!   second relay with the same delay);
//! - agent exit → finished: the agent's last clock reading → the server's "Task attempt
//!   finished." log line (after the finish committed).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tunnel_client::Client;
use tunnel_protocol::SubmitTask;

use crate::runner::{answer_number, now_ns, rfc3339_ns, succeeded};
use crate::server::ServerProcess;
use crate::stats::Latency;

/// The first argument that makes this binary the WAN phase's agent.
pub(crate) const WAN_AGENT: &str = "__tunnel-bench-wan-agent";
const AGENT: &str = "bench-wan";
const RUNNER: &str = "bench-wan-runner";
/// How long the agent waits before its line and again before it exits: long enough that the
/// line and the exit are each measured on a link that has gone quiet.
const AGENT_PAUSE: Duration = Duration::from_millis(300);

/// The agent: its clock at start, a line after a pause, its clock just before it exits.
pub(crate) fn wan_agent() {
    println!("start {}", now_ns());
    std::thread::sleep(AGENT_PAUSE);
    println!("line {}", now_ns());
    std::thread::sleep(AGENT_PAUSE);
    println!("end {}", now_ns());
}

#[derive(Debug, Serialize)]
pub(crate) struct WanReport {
    pub(crate) tasks: usize,
    pub(crate) one_way_ms: u64,
    /// Submit sent → the agent process running. Goal: one-way + 10 ms.
    pub(crate) submit_to_start: Latency,
    /// Of which: the server's "Task offered." line → the agent process running (the offer
    /// crossing the link, the ack unless the claim made it, the runner's start of the agent).
    pub(crate) offer_to_start: Latency,
    /// The agent's output line → read by an SSE watcher beside the server. Goal: one-way + 50.
    pub(crate) line_to_watcher: Latency,
    /// The same line → read by an SSE watcher across the link (one more one-way delay).
    pub(crate) line_to_remote_watcher: Latency,
    /// The agent's exit → the server recorded the finish. Goal: one-way + 10 ms.
    pub(crate) exit_to_finished: Latency,
    /// Submit → the task read back done (for context).
    pub(crate) submit_to_done: Latency,
}

// ---------------------------------------------------------------------------------------------
// The relay

/// A TCP relay on loopback that delays both directions by `one_way`.
pub(crate) struct Relay {
    pub(crate) addr: SocketAddr,
    stop: CancellationToken,
}

impl Relay {
    pub(crate) async fn start(upstream: SocketAddr, one_way: Duration) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    c = listener.accept() => c,
                    _ = until.cancelled() => return,
                };
                let Ok((client, _)) = conn else { continue };
                let until = until.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = relay(client, upstream, one_way) => {}
                        _ = until.cancelled() => {}
                    }
                });
            }
        });
        Ok(Relay { addr, stop })
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, one_way: Duration) {
    // The handshake a real link costs before the first request can leave: one round trip.
    // The client's first bytes wait in its socket meanwhile and are stamped once read, so
    // they arrive 1.5 round trips after the connect, as on a real link.
    tokio::time::sleep(one_way * 2).await;
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Either direction ending (EOF or error) ends the connection once its bytes are out.
    tokio::join!(pipe(cr, sw, one_way), pipe(sr, cw, one_way));
}

/// Copies `from` → `to`, each chunk `delay` after it was read, in order. `None` is the end.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Option<Vec<u8>>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let at = tokio::time::Instant::now() + delay;
            if n == 0 {
                let _ = tx.send((at, None));
                return;
            }
            if tx.send((at, Some(buf[..n].to_vec()))).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            match chunk {
                Some(c) => {
                    if to.write_all(&c).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = to.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

// ---------------------------------------------------------------------------------------------
// The runner process

/// A `tunnel runner` child with a config file of its own, reaching the server at `url`.
struct RunnerProcess {
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl RunnerProcess {
    fn start(tunnel: &Path, dir: &Path, url: &str, token: &str) -> Result<RunnerProcess> {
        let exe = std::env::current_exe().context("cannot find this binary for the agent")?;
        // `ack_in_claim` as the runner's default (on).
        let cfg = format!(
            "[runner]\nname = \"{RUNNER}\"\nmax_concurrent = 2\nlong_poll_wait_secs = 30\n\
             spool_dir = \"{spool}\"\nwork_dir = \"{work}\"\n\
             [runner.agents.{AGENT}]\nprogram = \"{agent}\"\ncommand = [\"{WAN_AGENT}\"]\n\
             [runner.agents.claude]\nenabled = false\n[runner.agents.codex]\nenabled = false\n\
             [runner.agents.gemini]\nenabled = false\n",
            spool = dir.join("spool").display(),
            work = dir.join("work").display(),
            agent = exe.display(),
        );
        let config = dir.join("runner.toml");
        std::fs::write(&config, cfg)?;
        let log = dir.join("runner.log");
        let child = tokio::process::Command::new(tunnel)
            .args(["runner", "--config"])
            .arg(&config)
            .args(["--server", url, "--token", token])
            .env("XDG_DATA_HOME", dir)
            .env("XDG_CONFIG_HOME", dir)
            .env("RUST_LOG", "info")
            .env_remove("WORKER_TOKEN")
            .env_remove("WORKER_URL")
            .env_remove("TUNNEL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} runner", tunnel.display()))?;
        Ok(RunnerProcess { child, log })
    }

    /// SIGTERM (the runner says goodbye and stops), then wait.
    async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(s) if s.as_ref().is_ok_and(|s| s.success()) => Ok(()),
            Ok(s) => bail!(
                "the runner exited with {s:?}; its log: {}",
                self.log.display()
            ),
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the runner did not stop within 30 s of SIGTERM")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The phase

pub(crate) async fn wan(
    tunnel: &Path,
    server: &ServerProcess,
    token: &str,
    n: usize,
    one_way: Duration,
) -> Result<WanReport> {
    let upstream: SocketAddr = server
        .url
        .trim_start_matches("http://")
        .parse()
        .context("the server's address")?;
    let runner_link = Relay::start(upstream, one_way).await?;
    let watcher_link = Relay::start(upstream, one_way).await?;
    let dir = tempfile::Builder::new()
        .prefix("tunnel-bench-wan-")
        .tempdir()?;
    let runner = RunnerProcess::start(tunnel, dir.path(), &runner_link.url(), token)?;
    let result = measure(server, &watcher_link, token, n, one_way).await;
    let stopped = runner.stop().await;
    let report = result.with_context(|| {
        format!(
            "the runner's log: {}",
            std::fs::read_to_string(dir.path().join("runner.log")).unwrap_or_default()
        )
    })?;
    stopped?;
    Ok(report)
}

struct Sample {
    submit_ns: u128,
    start_ns: u128,
    line_ns: u128,
    end_ns: u128,
    watcher_ns: u128,
    remote_watcher_ns: u128,
}

/// Follows a task's events until the agent's `line …` text event; answers when it was read.
async fn watch_line(client: Client, id: String) -> Result<u128> {
    let mut stream = client.event_stream(&id, 0).await?;
    while let Some(e) = stream.next().await {
        let e = e?;
        if e.kind == "text"
            && e.data
                .get("text")
                .and_then(|t| t.as_str())
                .is_some_and(|t| t.starts_with("line "))
        {
            return Ok(now_ns());
        }
    }
    bail!("the event stream of {id} ended without the agent's line")
}

async fn measure(
    server: &ServerProcess,
    watcher_link: &Relay,
    token: &str,
    n: usize,
    one_way: Duration,
) -> Result<WanReport> {
    let client = Client::new(&server.url, token)?;
    let remote = Client::new(&watcher_link.url(), token)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client
        .runners()
        .await?
        .runners
        .iter()
        .any(|r| r.name == RUNNER && r.online)
    {
        ensure!(
            Instant::now() < deadline,
            "the runner did not claim within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let its first claim park, then one more round trip for the link to go quiet.
    tokio::time::sleep(one_way * 4 + Duration::from_millis(200)).await;
    *server.task_log.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());

    let mut samples = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut submit_to_done = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        let submit_ns = now_ns();
        let task = client
            .submit(&SubmitTask::new(AGENT, format!("wan {i}")), None)
            .await
            .context("submit")?;
        let near = tokio::spawn(watch_line(client.clone(), task.id.clone()));
        let far = tokio::spawn(watch_line(remote.clone(), task.id.clone()));
        let text = succeeded(&client, &task.id, t0, Duration::from_secs(60)).await?;
        submit_to_done.push(t0.elapsed());
        let read = |key: &str| answer_number(&text, key);
        let watcher_ns = tokio::time::timeout(Duration::from_secs(10), near)
            .await
            .context("the watcher did not see the line")???;
        let remote_watcher_ns = tokio::time::timeout(Duration::from_secs(10), far)
            .await
            .context("the remote watcher did not see the line")???;
        samples.push(Sample {
            submit_ns,
            start_ns: read("start ")?,
            line_ns: read("line ")?,
            end_ns: read("end ")?,
            watcher_ns,
            remote_watcher_ns,
        });
        ids.push(task.id.clone());
        // The link goes quiet between tasks (the runner's next claim parks).
        tokio::time::sleep(one_way * 2 + Duration::from_millis(50)).await;
    }
    // The finish lines were written before the answers; the stderr reader may lag a little.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        {
            let mut log = server.task_log.lock().unwrap_or_else(|p| p.into_inner());
            let finished = |l: &Vec<String>| {
                // Two lines per task: offered and finished (submitted ones are not counted).
                l.iter()
                    .filter(|x| x.contains("\"Task attempt finished.\""))
                    .count()
            };
            if log.as_ref().is_some_and(|l| finished(l) >= n) || Instant::now() > deadline {
                break log.take().unwrap_or_default();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut finished = std::collections::HashMap::new();
    let mut offered = std::collections::HashMap::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let into = match v.pointer("/fields/message").and_then(|x| x.as_str()) {
            Some("Task attempt finished.") => &mut finished,
            Some("Task offered.") => &mut offered,
            _ => continue,
        };
        let id = v
            .pointer("/fields/task_id")
            .and_then(|x| x.as_str())
            .context("a task log line without task_id")?;
        let ts = v
            .get("timestamp")
            .and_then(|x| x.as_str())
            .context("a log line without timestamp")?;
        into.insert(
            id.to_owned(),
            rfc3339_ns(ts).with_context(|| format!("bad timestamp {ts:?}"))?,
        );
    }
    let span = |from: u128, to: u128| -> Result<Duration> {
        // Log timestamps are whole microseconds: allow that much rounding.
        ensure!(
            to + 1_000 >= from,
            "clock readings out of order ({from} > {to})"
        );
        Ok(Duration::from_nanos(to.saturating_sub(from) as u64))
    };
    let (mut to_start, mut offer_start, mut to_near, mut to_far, mut to_finish) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, s) in ids.iter().zip(&samples) {
        let (Some(o), Some(f)) = (offered.get(id), finished.get(id)) else {
            bail!("no offer or finish log line for task {id}");
        };
        to_start.push(span(s.submit_ns, s.start_ns)?);
        offer_start.push(span(*o, s.start_ns)?);
        to_near.push(span(s.line_ns, s.watcher_ns)?);
        to_far.push(span(s.line_ns, s.remote_watcher_ns)?);
        to_finish.push(span(s.end_ns, *f)?);
    }
    Ok(WanReport {
        tasks: n,
        one_way_ms: one_way.as_millis() as u64,
        submit_to_start: Latency::of(&to_start),
        offer_to_start: Latency::of(&offer_start),
        line_to_watcher: Latency::of(&to_near),
        line_to_remote_watcher: Latency::of(&to_far),
        exit_to_finished: Latency::of(&to_finish),
        submit_to_done: Latency::of(&submit_to_done),
    })
}
