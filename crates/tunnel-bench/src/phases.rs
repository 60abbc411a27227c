//! The measurements. Each talks to the server over HTTP only, counts what actually happened
//! and fails loudly when the server did something else.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tunnel_client::Client;
use tunnel_protocol::{
    AppendEvents, AttemptRef, ClaimRequest, FinishRequest, NewEvent, Offer, Outcome, SubmitTask,
    TaskResult, TaskState,
};

use crate::server::{ServerProcess, cpu_of};
use crate::stats::Latency;

/// The agent every bench task asks for; the fake runners declare it.
pub(crate) const AGENT: &str = "bench";

/// Built from JSON, as a runner sends it, so optional fields the protocol grows keep their
/// defaults.
fn claim_request(runner: &str, wait_ms: u64, version: Option<String>) -> ClaimRequest {
    serde_json::from_value(serde_json::json!({
        "runner": runner,
        "agents": [AGENT],
        "capacity": 1,
        "wait_ms": wait_ms,
        "version": version,
    }))
    .expect("a valid claim request")
}

fn attempt(offer: &Offer) -> AttemptRef {
    AttemptRef {
        attempt: offer.attempt,
        lease_token: offer.lease_token.clone(),
    }
}

/// How a fake runner runs a task it was offered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FakeRun {
    /// Events posted, `per_post` per request.
    pub(crate) events: u32,
    pub(crate) per_post: u32,
    /// The offer came from a claim with `ack` (already started): no ack request.
    pub(crate) acked: bool,
    /// The last this many of `events` ride in the finish (`FinishRequest::events`), as the
    /// real runner sends what its agent wrote last.
    pub(crate) in_finish: u32,
}

impl FakeRun {
    /// Ack apart, `events` events one per post, nothing in the finish.
    pub(crate) fn plain(events: u32) -> Self {
        FakeRun {
            events,
            per_post: 1,
            acked: false,
            in_finish: 0,
        }
    }
}

fn bench_event(k: u64) -> NewEvent {
    NewEvent {
        n: k,
        kind: "text".into(),
        data: serde_json::json!({"text": format!("line {k} of the agent's answer")}),
    }
}

/// Acks the offer (unless its claim did), posts the events, finishes it `succeeded` (with the
/// last events when asked), and checks the server says so.
pub(crate) async fn run_fake_task(client: &Client, offer: &Offer, run: FakeRun) -> Result<()> {
    let id = &offer.task.id;
    let at = attempt(offer);
    if run.acked {
        ensure!(
            offer.lease.is_some(),
            "a claim with ack answered an offer of task {id} without a lease"
        );
    } else {
        client.ack(id, &at).await.context("ack")?;
    }
    let (events, per_post) = (u64::from(run.events), run.per_post);
    let posted = events - u64::from(run.in_finish).min(events);
    let mut n = 0u64;
    while n < posted {
        let batch: Vec<NewEvent> = (0..u64::from(per_post.max(1)))
            .map(|i| n + i + 1)
            .take_while(|k| *k <= posted)
            .map(bench_event)
            .collect();
        let sent = batch.len() as u64;
        let ack = client
            .append_events(
                id,
                &AppendEvents {
                    attempt: at.attempt,
                    lease_token: at.lease_token.clone(),
                    events: batch,
                },
            )
            .await
            .context("append events")?;
        ensure!(
            u64::from(ack.accepted) == sent,
            "the server accepted {} of {sent} events of task {id}",
            ack.accepted
        );
        n += sent;
    }
    let task = client
        .finish(
            id,
            &FinishRequest {
                attempt: at.attempt,
                lease_token: at.lease_token,
                outcome: Outcome::Succeeded,
                result: TaskResult {
                    text: Some("done".into()),
                    exit_code: Some(0),
                    ..TaskResult::default()
                },
                not_before: None,
                events: (posted + 1..=events).map(bench_event).collect(),
            },
        )
        .await
        .context("finish")?;
    ensure!(
        task.state == TaskState::Succeeded,
        "task {id} finished as {} instead of succeeded",
        task.state
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Dispatch latency

#[derive(Debug, Serialize)]
pub(crate) struct DispatchReport {
    /// Idle time before each submit (0: hot, the bench polls every 200 µs until then).
    pub(crate) gap_ms: u64,
    /// Submit sent → the parked poll's response read.
    pub(crate) dispatch: Latency,
    /// The server's own share, from its log: the submit handler's start → the claim's
    /// "Task offered." line (the submit's `took_us` plus the time between the two lines).
    pub(crate) server: Latency,
    /// Submit round trip (201 received).
    pub(crate) submit_rtt: Latency,
    /// `GET /health` round trip after the same idle gap (only with a gap).
    pub(crate) health: Option<Latency>,
    /// With several servers: the dispatches whose submit went to another server than the one
    /// holding the poll (the offer crosses NOTIFY), and those on the same server.
    pub(crate) across: Option<Latency>,
    pub(crate) same: Option<Latency>,
}

/// One poller parked at a time: it is known to be parked when the server has recorded its
/// claim (the runner's `version` carries a nonce, written in the same transaction that found
/// nothing to offer, after the poll registered its wake-up slot). Then one task is submitted.
/// With `gap`, the bench sleeps that long before each submit, and again before a `GET
/// /health` after each task, so both pay the same cost of a machine gone idle.
///
/// With several servers (one database), task `i` is polled for on server `i % n` and
/// submitted to that server for even `i`, to the next one for odd `i`.
pub(crate) async fn dispatch(
    servers: &[ServerProcess],
    token: &str,
    n: usize,
    gap: Duration,
) -> Result<DispatchReport> {
    let clients = servers
        .iter()
        .map(|s| Client::new(&s.url, token))
        .collect::<Result<Vec<_>, _>>()?;
    let runner_clients = servers
        .iter()
        .map(|s| Client::new(&s.url, token))
        .collect::<Result<Vec<_>, _>>()?;
    let runner = format!("bench-dispatch-{}", gap.as_millis());
    let runner = runner.as_str();
    let mut dispatch = Vec::with_capacity(n);
    let (mut across, mut same) = (Vec::new(), Vec::new());
    let mut submit_rtt = Vec::with_capacity(n);
    let mut health = Vec::new();
    let mut ids = Vec::with_capacity(n);
    for s in servers {
        *s.task_log.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
    }
    let k = servers.len();
    for i in 0..n {
        let polled = i % k;
        let submitted = if i % 2 == 0 { polled } else { (polled + 1) % k };
        let client = &clients[submitted];
        let nonce = format!("bench-{}-{i}", gap.as_millis());
        let rc = runner_clients[polled].clone();
        let req = claim_request(runner, 30_000, Some(nonce.clone()));
        let poll = tokio::spawn(async move {
            let offer = rc.claim(&req).await;
            (Instant::now(), offer)
        });
        wait_recorded(client, runner, &nonce, &poll).await?;
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        let t0 = Instant::now();
        let task = client
            .submit(&SubmitTask::new(AGENT, format!("dispatch {i}")), None)
            .await
            .context("submit")?;
        submit_rtt.push(t0.elapsed());
        let (t1, offer) = tokio::time::timeout(Duration::from_secs(10), poll)
            .await
            .context("the parked poll got nothing within 10 s of the submit")??;
        let offer = offer
            .context("claim")?
            .context("the parked poll ended without an offer")?;
        ensure!(
            offer.task.id == task.id,
            "the parked poll was offered {} instead of the task just submitted ({})",
            offer.task.id,
            task.id
        );
        dispatch.push(t1 - t0);
        if submitted == polled {
            same.push(t1 - t0);
        } else {
            across.push(t1 - t0);
        }
        ids.push(task.id.clone());
        run_fake_task(&runner_clients[polled], &offer, FakeRun::plain(0)).await?;
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
            let t0 = Instant::now();
            client.health().await.context("health")?;
            health.push(t0.elapsed());
        }
    }
    Ok(DispatchReport {
        gap_ms: gap.as_millis() as u64,
        dispatch: Latency::of(&dispatch),
        server: Latency::of(&server_share(servers, &ids).await?),
        submit_rtt: Latency::of(&submit_rtt),
        health: (!gap.is_zero()).then(|| Latency::of(&health)),
        across: (k > 1).then(|| Latency::of(&across)),
        same: (k > 1).then(|| Latency::of(&same)),
    })
}

/// For each task: the submit's `took_us` (handler start → committed) plus its "Task
/// submitted." line → its "Task offered." line, from the servers' JSON logs (one machine, one
/// clock: the two lines may come from two servers).
async fn server_share(servers: &[ServerProcess], ids: &[String]) -> Result<Vec<Duration>> {
    use std::collections::HashMap;
    // Every line was written before the server answered; the task draining stderr may lag.
    let deadline = Instant::now() + Duration::from_secs(10);
    let offers = || {
        servers
            .iter()
            .map(|s| {
                let log = s.task_log.lock().unwrap_or_else(|p| p.into_inner());
                log.as_ref().map_or(0, |l| {
                    l.iter().filter(|x| x.contains("\"Task offered.\"")).count()
                })
            })
            .sum::<usize>()
    };
    while offers() < ids.len() && Instant::now() <= deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut lines = Vec::new();
    for s in servers {
        let mut log = s.task_log.lock().unwrap_or_else(|p| p.into_inner());
        lines.extend(log.take().unwrap_or_default());
    }
    let mut submitted = HashMap::new();
    let mut offered = HashMap::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let id = v.pointer("/fields/task_id").and_then(|x| x.as_str());
        let ts = v
            .get("timestamp")
            .and_then(|x| x.as_str())
            .and_then(crate::runner::rfc3339_ns);
        let (Some(id), Some(ns)) = (id, ts) else {
            bail!("a task log line without task_id or timestamp: {line}");
        };
        match v.pointer("/fields/message").and_then(|x| x.as_str()) {
            Some("Task submitted.") => {
                let took = v
                    .pointer("/fields/took_us")
                    .and_then(|x| x.as_u64())
                    .context("a \"Task submitted.\" line without took_us (an older server?)")?;
                submitted.insert(id.to_owned(), (ns, took));
            }
            Some("Task offered.") => {
                offered.insert(id.to_owned(), ns);
            }
            _ => {}
        }
    }
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let (Some((s, took)), Some(o)) = (submitted.get(id), offered.get(id)) else {
            bail!("no submit or offer log line for task {id}");
        };
        let between = o.saturating_sub(*s) as u64;
        out.push(Duration::from_nanos(between) + Duration::from_micros(*took));
    }
    Ok(out)
}

/// Waits until the server has recorded the claim carrying `nonce` (so the poll is parked).
async fn wait_recorded<T>(
    client: &Client,
    runner: &str,
    nonce: &str,
    poll: &tokio::task::JoinHandle<T>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let runners = client.runners().await.context("list runners")?;
        if runners
            .runners
            .iter()
            .any(|r| r.name == runner && r.version.as_deref() == Some(nonce))
        {
            return Ok(());
        }
        if poll.is_finished() {
            bail!("the long-poll ended before anything was submitted");
        }
        if Instant::now() > deadline {
            bail!("the server did not record the long-poll within 10 s");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 2 + 3. Full-cycle throughput and memory under load

#[derive(Debug, Clone)]
pub(crate) struct CycleParams {
    pub(crate) tasks: u64,
    pub(crate) producers: u32,
    pub(crate) runners: u32,
    pub(crate) events: u32,
    pub(crate) events_per_post: u32,
    /// Claims with `ack` (the offer comes back started): no ack request.
    pub(crate) ack_in_claim: bool,
    /// The last this many events ride in the finish instead of an events post.
    pub(crate) events_in_finish: u32,
}

#[derive(Debug, Serialize)]
pub(crate) struct CycleReport {
    /// Servers on one database; producers and runners are spread over them round-robin.
    pub(crate) servers: usize,
    pub(crate) tasks: u64,
    pub(crate) producers: u32,
    pub(crate) runners: u32,
    pub(crate) events_per_task: u32,
    pub(crate) event_posts_per_task: u32,
    /// The claim came back acked (no ack request).
    pub(crate) ack_in_claim: bool,
    /// Events carried by the finish.
    pub(crate) events_in_finish: u32,
    pub(crate) http_requests_per_task: u32,
    pub(crate) wall_s: f64,
    pub(crate) tasks_per_s: f64,
    /// Server CPU (user + system) over the run, per task (all servers together).
    pub(crate) server_cpu_us_per_task: f64,
    /// The share of one core the servers used.
    pub(crate) server_cores: f64,
    /// Of the server's CPU per task, what its SQLite writer thread used (0 on PostgreSQL).
    pub(crate) writer_cpu_us_per_task: f64,
    /// The bench's own CPU (producers and runners), per task: it shares the machine.
    pub(crate) bench_cpu_us_per_task: f64,
    /// The first server's.
    pub(crate) rss_before: u64,
    /// Highest VmRSS sampled every 10 ms during the run.
    pub(crate) rss_peak: u64,
    /// VmHWM at the end of the run (peak since the server started).
    pub(crate) rss_hwm: u64,
    pub(crate) rss_after: u64,
    /// 2 s after the run.
    pub(crate) rss_after_2s: u64,
    /// Submit round trip while the queue was busy.
    pub(crate) submit_rtt: Latency,
    /// Claim round trip of claims that got an offer.
    pub(crate) claim_rtt: Latency,
}

pub(crate) async fn full_cycle(
    servers: &[ServerProcess],
    token: &str,
    p: &CycleParams,
) -> Result<CycleReport> {
    let server = &servers[0];
    // The SQLite writer thread of every server (none on PostgreSQL).
    let servers_writer_cpu = |name: &str| -> Result<Duration> {
        let mut sum = Duration::ZERO;
        for s in servers {
            sum += s.threads_cpu(name)?;
        }
        Ok(sum)
    };
    let servers_cpu = || -> Result<Duration> {
        let mut sum = Duration::ZERO;
        for s in servers {
            sum += s.cpu()?;
        }
        Ok(sum)
    };
    let to_submit = Arc::new(AtomicU64::new(p.tasks));
    let finished = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let rss_before = server.memory()?.rss;

    // Memory sampler.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let pid = server.pid;
        tokio::spawn(async move {
            let mut peak = 0u64;
            while sampling.load(Ordering::Relaxed) {
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    && let Some(kb) = s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                        l[6..]
                            .trim()
                            .trim_end_matches("kB")
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
                {
                    peak = peak.max(kb * 1024);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        })
    };

    let cpu0 = servers_cpu()?;
    let writer0 = servers_writer_cpu("tunnel-sqlite-w")?;
    let self0 = cpu_of("/proc/self/stat")?;
    let t0 = Instant::now();

    let mut producers = JoinSet::new();
    for j in 0..p.producers {
        let client = Client::new(&servers[j as usize % servers.len()].url, token)?;
        let to_submit = to_submit.clone();
        producers.spawn(async move {
            let mut rtt = Vec::new();
            loop {
                // Take one task to submit, if any are left.
                let left = to_submit
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                let Ok(left) = left else { break };
                let t = Instant::now();
                let task = client
                    .submit(&SubmitTask::new(AGENT, format!("cycle {left}")), None)
                    .await
                    .context("submit")?;
                rtt.push(t.elapsed());
                ensure!(
                    task.state == TaskState::Queued,
                    "a new task is {}",
                    task.state
                );
            }
            Ok::<_, anyhow::Error>(rtt)
        });
    }

    let mut runners = JoinSet::new();
    for r in 0..p.runners {
        let client = Client::new(&servers[r as usize % servers.len()].url, token)?;
        let finished = finished.clone();
        let stop = stop.clone();
        let total = p.tasks;
        let run = FakeRun {
            events: p.events,
            per_post: p.events_per_post,
            acked: p.ack_in_claim,
            in_finish: p.events_in_finish.min(p.events),
        };
        runners.spawn(async move {
            let name = format!("bench-runner-{r}");
            let mut req = claim_request(&name, 5_000, None);
            req.ack = run.acked;
            let mut rtt = Vec::new();
            let result = async {
                loop {
                    let t = Instant::now();
                    let offer = tokio::select! {
                        o = client.claim(&req) => o.context("claim")?,
                        _ = stop.cancelled() => return Ok(()),
                    };
                    let Some(offer) = offer else { continue };
                    rtt.push(t.elapsed());
                    run_fake_task(&client, &offer, run).await?;
                    let done = finished.fetch_add(1, Ordering::SeqCst) + 1;
                    ensure!(
                        done <= total,
                        "the runners finished more tasks than were submitted"
                    );
                    if done == total {
                        stop.cancel();
                    }
                }
            }
            .await;
            if result.is_err() {
                stop.cancel();
            }
            result.map(|()| rtt)
        });
    }

    let mut submit_rtt = Vec::new();
    while let Some(r) = producers.join_next().await {
        match r? {
            Ok(rtt) => submit_rtt.extend(rtt),
            Err(e) => {
                stop.cancel();
                return Err(e);
            }
        }
    }
    // At most 10 minutes; a healthy run takes seconds.
    tokio::time::timeout(Duration::from_secs(600), stop.cancelled())
        .await
        .context("the runners did not finish every task within 10 minutes")?;
    let wall = t0.elapsed();
    let cpu1 = servers_cpu()?;
    let writer1 = servers_writer_cpu("tunnel-sqlite-w")?;
    let self1 = cpu_of("/proc/self/stat")?;
    sampling.store(false, Ordering::Relaxed);
    let rss_peak = sampler.await?;
    let mem_end = server.memory()?;
    let mut claim_rtt = Vec::new();
    while let Some(r) = runners.join_next().await {
        claim_rtt.extend(r?.context("a fake runner failed")?);
    }
    let done = finished.load(Ordering::SeqCst);
    ensure!(
        done == p.tasks,
        "the runners finished {done} tasks, {} were submitted",
        p.tasks
    );
    let rss_after = server.memory()?.rss;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_2s = server.memory()?.rss;

    let in_finish = p.events_in_finish.min(p.events);
    let posts = (p.events - in_finish).div_ceil(p.events_per_post.max(1));
    let secs = wall.as_secs_f64();
    let server_cpu = (cpu1 - cpu0).as_secs_f64();
    Ok(CycleReport {
        servers: servers.len(),
        tasks: p.tasks,
        producers: p.producers,
        runners: p.runners,
        events_per_task: p.events,
        event_posts_per_task: posts,
        ack_in_claim: p.ack_in_claim,
        events_in_finish: in_finish,
        // Submit, claim, finish, the posts, and the ack unless the claim made it.
        http_requests_per_task: 3 + posts + u32::from(!p.ack_in_claim),
        wall_s: secs,
        tasks_per_s: p.tasks as f64 / secs,
        server_cpu_us_per_task: server_cpu * 1e6 / p.tasks as f64,
        server_cores: server_cpu / secs,
        writer_cpu_us_per_task: writer1.saturating_sub(writer0).as_secs_f64() * 1e6
            / p.tasks as f64,
        bench_cpu_us_per_task: (self1 - self0).as_secs_f64() * 1e6 / p.tasks as f64,
        rss_before,
        rss_peak: rss_peak.max(mem_end.rss),
        rss_hwm: mem_end.hwm,
        rss_after,
        rss_after_2s,
        submit_rtt: Latency::of(&submit_rtt),
        claim_rtt: Latency::of(&claim_rtt),
    })
}

// ---------------------------------------------------------------------------------------------
// 4. Many parked long-polls

#[derive(Debug, Serialize)]
pub(crate) struct ParkedReport {
    pub(crate) parked: usize,
    pub(crate) rss_idle: u64,
    /// With every poll parked.
    pub(crate) rss_parked: u64,
    /// After the wakes.
    pub(crate) rss_after_wakes: u64,
    pub(crate) rss_hwm: u64,
    /// Seconds to get every poll parked.
    pub(crate) park_s: f64,
    /// Server CPU to park them all, per poll.
    pub(crate) park_cpu_us_per_poll: f64,
    /// Submit sent → one of the parked polls has the offer, tasks one by one.
    pub(crate) wake: Latency,
}

pub(crate) async fn parked(
    server: &ServerProcess,
    token: &str,
    n: usize,
    wakes: usize,
) -> Result<ParkedReport> {
    let rss_idle = server.memory()?.rss;
    let client = Client::new(&server.url, token)?;
    // One shared connection pool: with every request in flight at once, each gets its own
    // connection, as n runners would.
    let polls_client = Client::new(&server.url, token)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Offer)>();
    let cpu0 = server.cpu()?;
    let t0 = Instant::now();
    let mut polls = JoinSet::new();
    for i in 0..n {
        let c = polls_client.clone();
        let stop = stop.clone();
        let tx = tx.clone();
        polls.spawn(async move {
            let req = claim_request(&format!("bench-parked-{i}"), 60_000, None);
            // A poll whose wait ran out (60 s) parks again; bounded by the stop flag and the
            // caller's own deadline.
            while !stop.load(Ordering::SeqCst) {
                match c.claim(&req).await {
                    Ok(Some(offer)) => {
                        let _ = tx.send((Instant::now(), offer));
                        return Ok(());
                    }
                    Ok(None) => continue,
                    Err(e) if stop.load(Ordering::SeqCst) => {
                        let _ = e;
                        return Ok(());
                    }
                    Err(e) => return Err(anyhow::Error::new(e).context(format!("parked poll {i}"))),
                }
            }
            Ok(())
        });
        // Open connections in waves, so the listen backlog does not overflow (a dropped SYN
        // costs a 1 s retransmit and measures the kernel, not the server).
        if i % 256 == 255 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    drop(tx);

    // Parked = the server recorded every runner's claim (each registered its wake-up slot
    // before its claim found nothing).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rss_parked;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(r) = polls.try_join_next() {
            r??;
            bail!("a parked poll ended before any task was submitted");
        }
        rss_parked = server.memory()?.rss;
        let seen = client
            .runners()
            .await
            .context("list runners")?
            .runners
            .len();
        if seen >= n {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {seen} of {n} long-polls reached the server within 60 s"
        );
    }
    let park_s = t0.elapsed().as_secs_f64();
    let park_cpu = (server.cpu()? - cpu0).as_secs_f64();
    // Memory once settled (and measured before listing the runners again).
    tokio::time::sleep(Duration::from_millis(500)).await;
    rss_parked = rss_parked.max(server.memory()?.rss);

    let mut wake = Vec::with_capacity(wakes);
    for i in 0..wakes.min(n) {
        let t0 = Instant::now();
        let task = client
            .submit(&SubmitTask::new(AGENT, format!("wake {i}")), None)
            .await
            .context("submit")?;
        let (t1, offer) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .context("no parked poll got the task within 10 s")?
            .context("every parked poll ended")?;
        ensure!(
            offer.task.id == task.id,
            "a parked poll was offered {} instead of the task just submitted ({})",
            offer.task.id,
            task.id
        );
        wake.push(t1 - t0);
        run_fake_task(&client, &offer, FakeRun::plain(0)).await?;
    }
    let mem = server.memory()?;
    stop.store(true, Ordering::SeqCst);
    // Polls that already answered must all have ended well.
    while let Some(r) = polls.try_join_next() {
        r??;
    }
    polls.abort_all();
    while polls.join_next().await.is_some() {}
    Ok(ParkedReport {
        parked: n,
        rss_idle,
        rss_parked,
        rss_after_wakes: mem.rss,
        rss_hwm: mem.hwm,
        park_s,
        park_cpu_us_per_poll: park_cpu * 1e6 / n as f64,
        wake: Latency::of(&wake),
    })
}

/// Reads the final task counts from the database itself, after the server stopped.
pub(crate) async fn check_database(db: &crate::db::BenchDb, expected: u64) -> Result<()> {
    struct Quiet;
    impl tunnel_store::Signals for Quiet {
        fn task_ready(&self, _: &tunnel_store::ReadyHint) {}
        fn task_changed(&self, _: &str) {}
        fn deadline(&self, _: i64) {}
    }
    let store = tunnel_store::Store::open(
        &db.store_database(),
        tunnel_store::QueueSettings::default(),
        Arc::new(tunnel_store::SystemClock),
        Arc::new(Quiet),
    )
    .await
    .context("cannot reopen the database to check it")?;
    let counts = store.counts().await?;
    let mut succeeded = 0;
    for (state, n) in &counts.by_state {
        if *state == TaskState::Succeeded {
            succeeded = *n;
        } else if *n > 0 {
            bail!(
                "{n} tasks ended {state} in {}; every task must end succeeded ({:?})",
                db.describe(),
                counts.by_state
            );
        }
    }
    ensure!(
        succeeded == expected,
        "{} holds {succeeded} succeeded tasks; the bench finished {expected}",
        db.describe()
    );
    Ok(())
}
