//! Phase 5, runner overhead: the real runner (`tunnel-runner`, in this process) runs a trivial
//! agent (this binary in its agent mode), one task at a time.
//!
//! - offer → agent started: the server's "Task offered." log line (written after the claim
//!   committed, just before the offer is sent) → the agent's first act, its own clock reading;
//! - agent exit → finish acknowledged: the agent's last act, a clock reading just before it
//!   exits → the server's "Task attempt finished." log line (after the finish committed, just
//!   before the answer is sent).
//!
//! Server log timestamps have microseconds; both sides read the same wall clock.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use tunnel_client::Client;
use tunnel_protocol::{SubmitTask, TaskState};
use tunnel_runner::{AgentConfig, AgentKind, OutputMode, RunnerConfig, Shutdown};

use crate::server::ServerProcess;
use crate::stats::Latency;

/// The first argument that makes this binary the trivial agent.
pub(crate) const AGENT_PROBE: &str = "__tunnel-bench-agent";
const AGENT: &str = "bench-probe";
const RUNNER: &str = "bench-real-runner";

pub(crate) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The trivial agent: says when it started and when it is about to exit.
pub(crate) fn agent_probe() {
    let start = now_ns();
    println!("start {start}");
    println!("end {}", now_ns());
}

#[derive(Debug, Serialize)]
pub(crate) struct RunnerReport {
    pub(crate) tasks: usize,
    /// Offer sent by the server → the agent process running.
    pub(crate) offer_to_start: Latency,
    /// The agent about to exit → the server has the finish.
    pub(crate) exit_to_finish: Latency,
    /// Submit → the task read back as succeeded (the whole round, for context).
    pub(crate) submit_to_done: Latency,
}

pub(crate) async fn runner_overhead(
    server: &ServerProcess,
    token: &str,
    n: usize,
) -> Result<RunnerReport> {
    let exe = std::env::current_exe().context("cannot find this binary for the agent")?;
    let dir = tempfile::Builder::new()
        .prefix("tunnel-bench-runner-")
        .tempdir()?;
    let mut config = RunnerConfig::new(&server.url, token, dir.path().to_path_buf());
    config.name = RUNNER.into();
    config.max_concurrent = 2;
    config.agents = BTreeMap::from([(
        AGENT.to_owned(),
        AgentConfig {
            kind: AgentKind::Custom,
            program: exe.display().to_string(),
            command: vec![AGENT_PROBE.into()],
            args: vec![],
            models: vec![],
            output: OutputMode::Text,
            env: BTreeMap::new(),
            approvals: Default::default(),
            acp: None,
            acp_mode: None,
        },
    )]);
    let shutdown = Shutdown::default();
    let runner = tokio::spawn(tunnel_runner::run(config, shutdown.clone()));
    let result = measure(server, token, n).await;
    shutdown.stop.cancel();
    match tokio::time::timeout(Duration::from_secs(30), runner).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => bail!("the runner failed: {e}"),
        Ok(Err(e)) => bail!("the runner task failed: {e}"),
        Err(_) => bail!("the runner did not stop within 30 s"),
    }
    result
}

async fn measure(server: &ServerProcess, token: &str, n: usize) -> Result<RunnerReport> {
    let client = Client::new(&server.url, token)?;
    // The runner is there once its first claim is recorded.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !client
        .runners()
        .await?
        .runners
        .iter()
        .any(|r| r.name == RUNNER)
    {
        ensure!(
            std::time::Instant::now() < deadline,
            "the runner did not claim within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    *server.task_log.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());

    let mut agent_times = HashMap::new();
    let mut submit_to_done = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        let task = client
            .submit(&SubmitTask::new(AGENT, format!("runner {i}")), None)
            .await
            .context("submit")?;
        let text = succeeded(&client, &task.id, t0, Duration::from_secs(30)).await?;
        submit_to_done.push(t0.elapsed());
        let read = |key: &str| answer_number(&text, key);
        agent_times.insert(task.id.clone(), (read("start ")?, read("end ")?));
    }
    // The server wrote each line before answering, but the task draining its stderr may not
    // have read them all yet: two lines per task.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let lines = loop {
        {
            let mut log = server.task_log.lock().unwrap_or_else(|p| p.into_inner());
            let counted = |l: &Vec<String>| {
                l.iter()
                    .filter(|x| !x.contains("\"Task submitted.\""))
                    .count()
            };
            if log.as_ref().is_some_and(|l| counted(l) >= 2 * n)
                || std::time::Instant::now() > deadline
            {
                break log.take().unwrap_or_default();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut offered = HashMap::new();
    let mut finished = HashMap::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let id = v
            .pointer("/fields/task_id")
            .and_then(|x| x.as_str())
            .context("a task log line without task_id")?;
        let ts = v
            .get("timestamp")
            .and_then(|x| x.as_str())
            .context("a log line without timestamp")?;
        let ns = rfc3339_ns(ts).with_context(|| format!("bad timestamp {ts:?}"))?;
        match v.pointer("/fields/message").and_then(|x| x.as_str()) {
            Some("Task offered.") => offered.insert(id.to_owned(), ns),
            Some("Task attempt finished.") => finished.insert(id.to_owned(), ns),
            _ => None,
        };
    }
    let mut to_start = Vec::with_capacity(n);
    let mut to_finish = Vec::with_capacity(n);
    for (id, (start, end)) in &agent_times {
        let (Some(o), Some(f)) = (offered.get(id), finished.get(id)) else {
            bail!("no offer or finish log line for task {id}");
        };
        to_start.push(span(*o, *start)?);
        to_finish.push(span(*end, *f)?);
    }
    Ok(RunnerReport {
        tasks: n,
        offer_to_start: Latency::of(&to_start),
        exit_to_finish: Latency::of(&to_finish),
        submit_to_done: Latency::of(&submit_to_done),
    })
}

/// Waits (long-polling) until the task ends, at most `limit` after `since`, and checks that it
/// succeeded; returns its answer.
pub(crate) async fn succeeded(
    client: &Client,
    id: &str,
    since: Instant,
    limit: Duration,
) -> Result<String> {
    let done = loop {
        let t = client
            .task(id, Some(Duration::from_secs(10)))
            .await
            .context("wait for the task")?;
        if t.state.is_terminal() {
            break t;
        }
        ensure!(
            since.elapsed() < limit,
            "task {id} not done after {} s",
            limit.as_secs()
        );
    };
    ensure!(
        done.state == TaskState::Succeeded,
        "task {} ended {} ({:?})",
        done.id,
        done.state,
        done.result
    );
    Ok(done.result.and_then(|r| r.text).unwrap_or_default())
}

/// The number on the answer's line that starts with `key` (the probe agents print their clock).
pub(crate) fn answer_number(text: &str, key: &str) -> Result<u128> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .with_context(|| format!("the agent's answer has no {key:?} line: {text:?}"))
}

fn span(from_ns: u128, to_ns: u128) -> Result<Duration> {
    // Log timestamps are whole microseconds: allow that much rounding.
    ensure!(
        to_ns + 1_000 >= from_ns,
        "clock readings out of order ({from_ns} > {to_ns})"
    );
    Ok(Duration::from_nanos(to_ns.saturating_sub(from_ns) as u64))
}

/// `2026-11-25T16:38:24.467049Z` → nanoseconds since the epoch (UTC only, as the server logs).
pub(crate) fn rfc3339_ns(s: &str) -> Option<u128> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let frac_ns: u128 = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        digits.parse::<u128>().ok()? * 10u128.pow(9 - digits.len() as u32)
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3_600 + mm * 60 + ss;
    Some(u128::try_from(secs).ok()? * 1_000_000_000 + frac_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps() {
        assert_eq!(rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        // date -u -d 2026-11-25T16:38:24Z +%s = 1795624704
        assert_eq!(
            rfc3339_ns("2026-11-25T16:38:24.467049Z"),
            Some(1_795_624_704_467_049_000)
        );
        assert_eq!(rfc3339_ns("2026-11-25 16:38:24Z"), None);
    }
}
