//! Phase 8: claim and submit latency with a flood of unrelated queued tasks (issue #14), on a
//! fresh server: measured on the empty queue, then again after `flood` tasks were queued that
//! the bench's runners cannot take (three in four for an agent no runner offers, one in four
//! for the bench agent in a project no runner has).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use tokio::task::JoinSet;
use tunnel_client::Client;
use tunnel_protocol::{ClaimRequest, SubmitTask};

use crate::phases::{AGENT, FakeRun, run_fake_task};
use crate::server::ServerProcess;
use crate::stats::Latency;

/// Runners re-polling during the submit measurement (the setting).
const RUNNERS: usize = 8;
/// Concurrent submits while queuing the flood.
const SEEDERS: usize = 32;

#[derive(Debug, Serialize)]
pub(crate) struct FloodFigures {
    /// A claim that finds one ready task of the runner's among the queue: round trip.
    pub(crate) claim: Latency,
    /// A submit round trip while 8 runners claim, run and re-poll.
    pub(crate) submit: Latency,
}

#[derive(Debug, Serialize)]
pub(crate) struct FloodReport {
    pub(crate) flood: u64,
    pub(crate) seed_s: f64,
    pub(crate) empty: FloodFigures,
    pub(crate) flooded: FloodFigures,
}

fn claim_req(runner: &str, wait_ms: u64) -> ClaimRequest {
    serde_json::from_value(serde_json::json!({
        "runner": runner, "agents": [AGENT], "capacity": 1, "wait_ms": wait_ms,
    }))
    .expect("a valid claim request")
}

pub(crate) async fn flood(
    server: &ServerProcess,
    token: &str,
    flood: u64,
    n: usize,
) -> Result<FloodReport> {
    let client = Client::new(&server.url, token)?;
    let empty = measure(&client, n).await.context("on the empty queue")?;

    crate::progress(&format!("   queuing {flood} unrelated tasks"));
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut seeders = JoinSet::new();
    for _ in 0..SEEDERS {
        let (client, next) = (client.clone(), next.clone());
        seeders.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= flood {
                    return anyhow::Ok(());
                }
                let mut t = if i % 4 == 3 {
                    let mut t = SubmitTask::new(AGENT, format!("flood {i}: another project"));
                    t.project = Some("elsewhere".into());
                    t
                } else {
                    SubmitTask::new("nobody-runs-this", format!("flood {i}: another agent"))
                };
                // Each in its own conversation, as distinct chats would be.
                t.conversation = Some(format!("flood-{i}"));
                client.submit(&t, None).await.context("queue the flood")?;
            }
        });
    }
    while let Some(r) = seeders.join_next().await {
        r??;
    }
    let seed_s = t0.elapsed().as_secs_f64();
    let flooded = measure(&client, n).await.context("with the flood queued")?;
    Ok(FloodReport {
        flood,
        seed_s,
        empty,
        flooded,
    })
}

async fn measure(client: &Client, n: usize) -> Result<FloodFigures> {
    // Claim: one of the runner's tasks is ready; the claim must find it.
    let mut claim = Vec::with_capacity(n);
    for i in 0..n {
        let task = client
            .submit(&SubmitTask::new(AGENT, format!("claim {i}")), None)
            .await?;
        let t0 = Instant::now();
        let offer = client
            .claim(&claim_req("flood-claimer", 0))
            .await?
            .context("the claim found no task")?;
        claim.push(t0.elapsed());
        ensure!(offer.task.id == task.id, "the claim got another task");
        run_fake_task(client, &offer, FakeRun::plain(0)).await?;
    }

    // Submit, while runners claim, run and re-poll at once.
    let done = Arc::new(AtomicU64::new(0));
    let mut runners = JoinSet::new();
    for r in 0..RUNNERS {
        let (client, done) = (client.clone(), done.clone());
        runners.spawn(async move {
            let req = claim_req(&format!("flood-runner-{r}"), 30_000);
            loop {
                if let Some(offer) = client.claim(&req).await? {
                    run_fake_task(&client, &offer, FakeRun::plain(1)).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        });
    }
    let mut submit = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        client
            .submit(&SubmitTask::new(AGENT, format!("submit {i}")), None)
            .await?;
        submit.push(t0.elapsed());
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::Relaxed) < n as u64 {
        if let Some(Ok(Err(e))) = runners.try_join_next() {
            return Err(e.context("a runner failed"));
        }
        ensure!(
            Instant::now() < deadline,
            "the runners did not finish the submitted tasks within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runners.abort_all();
    Ok(FloodFigures {
        claim: Latency::of(&claim),
        submit: Latency::of(&submit),
    })
}
