//! Phase 6, the server's share of an approval round trip: the runner asks → a watcher (SSE, as
//! chat and `tunnel watch` follow a task) and a lister (`GET /v1/approvals`) see the question;
//! a person answers → the runner's held wait returns. One task, requests one at a time, fake
//! runner over HTTP; no agent and no chat in the loop, so the figures are tunnel's overhead.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use tokio::sync::mpsc;
use tunnel_client::{ApprovalQuery, Client};
use tunnel_protocol::{
    ApprovalAnswer, ApprovalOption, ApprovalOptionKind, ApprovalRequest, ApprovalState,
    ApprovalTool, ApprovalWait, AttemptRef, Decision, FinishRequest, Outcome, SubmitTask,
    TaskEvent, TaskResult,
};

use crate::phases::AGENT;
use crate::server::ServerProcess;
use crate::stats::Latency;

#[derive(Debug, Serialize)]
pub(crate) struct ApprovalReport {
    pub(crate) requests: usize,
    /// The runner's ask, sent → 201.
    pub(crate) ask_rtt: Latency,
    /// Ask sent → its `approval` event read on an open event stream (what chat follows).
    pub(crate) ask_to_event: Latency,
    /// Ask sent → listed by `GET /v1/approvals?state=pending` (ask, then one list).
    pub(crate) ask_to_listed: Latency,
    /// The answer, sent → 200.
    pub(crate) answer_rtt: Latency,
    /// Answer sent → the runner's held wait returned with it.
    pub(crate) answer_to_runner: Latency,
    /// Answer sent → its `approval` event read on the event stream.
    pub(crate) answer_to_event: Latency,
}

fn request(at: &AttemptRef, i: usize) -> ApprovalRequest {
    ApprovalRequest {
        attempt: at.attempt,
        lease_token: at.lease_token.clone(),
        key: format!("call_{i}"),
        tool: ApprovalTool {
            kind: "execute".into(),
            title: format!("Run step {i}"),
            command: Some(format!("make step-{i}")),
            ..Default::default()
        },
        options: vec![
            ApprovalOption {
                id: "allow".into(),
                name: "Allow".into(),
                kind: ApprovalOptionKind::AllowOnce,
            },
            ApprovalOption {
                id: "reject".into(),
                name: "Reject".into(),
                kind: ApprovalOptionKind::RejectOnce,
            },
        ],
        timeout_ms: None,
    }
}

/// The next `approval` event for `id` in state `state`, and when it was read.
async fn next_approval_event(
    events: &mut mpsc::UnboundedReceiver<(Instant, TaskEvent)>,
    id: &str,
    state: &str,
) -> Result<Instant> {
    loop {
        let (at, e) = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .context("no approval event within 10 s")?
            .context("the event stream ended")?;
        if e.kind == "approval" && e.data["id"] == id && e.data["state"] == state {
            return Ok(at);
        }
    }
}

pub(crate) async fn approval_round_trip(
    server: &ServerProcess,
    token: &str,
    n: usize,
) -> Result<ApprovalReport> {
    let runner = Client::new(&server.url, token)?;
    let person = Client::new(&server.url, token)?;
    let task = person
        .submit(&SubmitTask::new(AGENT, "approvals bench"), None)
        .await
        .context("submit")?;
    let claim: tunnel_protocol::ClaimRequest = serde_json::from_value(serde_json::json!({
        "runner": "bench-approvals", "agents": [AGENT], "capacity": 1, "wait_ms": 5_000,
    }))?;
    let offer = runner
        .claim(&claim)
        .await
        .context("claim")?
        .context("no offer for the approvals task")?;
    ensure!(offer.task.id == task.id, "offered another task");
    let at = AttemptRef {
        attempt: offer.attempt,
        lease_token: offer.lease_token.clone(),
    };
    runner.ack(&task.id, &at).await.context("ack")?;

    // The watcher: every event with the time it was read.
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut stream = person.event_stream(&task.id, 0).await.context("events")?;
    let watcher = tokio::spawn(async move {
        while let Some(Ok(e)) = stream.next().await {
            if tx.send((Instant::now(), e)).is_err() {
                return;
            }
        }
    });

    let mut r = ApprovalReport {
        requests: n,
        ask_rtt: Latency::of(&[]),
        ask_to_event: Latency::of(&[]),
        ask_to_listed: Latency::of(&[]),
        answer_rtt: Latency::of(&[]),
        answer_to_runner: Latency::of(&[]),
        answer_to_event: Latency::of(&[]),
    };
    let (mut ask_rtt, mut ask_event, mut ask_listed) = (vec![], vec![], vec![]);
    let (mut answer_rtt, mut answer_runner, mut answer_event) = (vec![], vec![], vec![]);
    let pending = ApprovalQuery {
        state: Some("pending".into()),
        task: Some(task.id.clone()),
        limit: Some(10),
    };
    for i in 0..n {
        let t0 = Instant::now();
        let a = runner
            .create_approval(&task.id, &request(&at, i))
            .await
            .context("ask")?;
        ask_rtt.push(t0.elapsed());
        let listed = person.list_approvals(&pending).await.context("list")?;
        ensure!(
            listed.iter().any(|x| x.id == a.id),
            "{} is not listed as pending right after the ask",
            a.id
        );
        ask_listed.push(t0.elapsed());
        ask_event.push(next_approval_event(&mut events, &a.id, "pending").await? - t0);

        // The runner waits (held), then the person answers.
        let wait = {
            let (runner, id, aid) = (runner.clone(), task.id.clone(), a.id.clone());
            let req = ApprovalWait {
                attempt: at.attempt,
                lease_token: at.lease_token.clone(),
                wait_ms: 10_000,
            };
            tokio::spawn(async move {
                let got = runner.wait_approval(&id, &aid, &req).await;
                (Instant::now(), got)
            })
        };
        // Let the wait reach the server and park (loopback; it answers at once if not yet).
        tokio::time::sleep(Duration::from_millis(5)).await;
        let t1 = Instant::now();
        let answer = ApprovalAnswer {
            decision: Decision::AllowOnce,
            message: None,
            by: Some("bench".into()),
        };
        person
            .answer_approval(&a.id, &answer)
            .await
            .context("answer")?;
        answer_rtt.push(t1.elapsed());
        let (t2, got) = wait.await?;
        let got = got.context("wait")?;
        if got.state != ApprovalState::Allowed {
            bail!(
                "the runner's wait returned {} instead of allowed",
                got.state
            );
        }
        answer_runner.push(t2 - t1);
        answer_event.push(next_approval_event(&mut events, &a.id, "allowed").await? - t1);
    }
    runner
        .finish(
            &task.id,
            &FinishRequest {
                attempt: at.attempt,
                lease_token: at.lease_token,
                outcome: Outcome::Succeeded,
                result: TaskResult {
                    text: Some("done".into()),
                    ..TaskResult::default()
                },
                not_before: None,
                events: vec![],
            },
        )
        .await
        .context("finish")?;
    watcher.abort();
    r.ask_rtt = Latency::of(&ask_rtt);
    r.ask_to_event = Latency::of(&ask_event);
    r.ask_to_listed = Latency::of(&ask_listed);
    r.answer_rtt = Latency::of(&answer_rtt);
    r.answer_to_runner = Latency::of(&answer_runner);
    r.answer_to_event = Latency::of(&answer_event);
    Ok(r)
}
