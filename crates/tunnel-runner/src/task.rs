//! Running one offered task: ack, start the agent, stream its output, heartbeat, finish.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnel_client::Client;
use tunnel_protocol::{
    AcpCapabilities, AppendEvents, AttemptRef, FinishRequest, Heartbeat, NewEvent, Offer, Outcome,
    TaskResult,
};

use crate::adapter::{self, Ev, Exit, Failure, InvocationInput, Verdict};
use crate::approvals::{ApprovalApi, Gate};
use crate::config::{AgentKind, ApprovalPolicy, RunnerConfig};
use crate::contain::Leftover;
use crate::spool::{Spool, SpoolEntry};
use crate::supervisor;

/// What every task of a runner shares.
pub(crate) struct Ctx {
    pub(crate) client: Client,
    pub(crate) config: Arc<RunnerConfig>,
    pub(crate) spool: Spool,
    /// Agent name → the program found for it (`None`: not installed here).
    pub(crate) programs: BTreeMap<String, Option<PathBuf>>,
    /// Built-in agent name → its ACP adapter found here (used when a task must ask).
    pub(crate) acp_programs: BTreeMap<String, Option<PathBuf>>,
    /// The server's approval routes (`ask`).
    pub(crate) approvals: Option<Arc<dyn ApprovalApi>>,
    /// The runner is stopping now: stop agents and report.
    pub(crate) abort: CancellationToken,
    /// How agents' processes are contained here.
    pub(crate) containment: crate::contain::Mechanism,
    /// The tasks this runner holds (running, or being reported from the spool): a claim lists
    /// them (`holding`), and an offer of one of them again is not run twice.
    pub(crate) held: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Whether the server takes the last events in the finish (`FinishRequest::events`); off
    /// after a server refused one (older than the field).
    pub(crate) finish_carries_events: std::sync::atomic::AtomicBool,
    /// What each ACP agent answered to `initialize` (a probe at start, then each task that
    /// drives it): claims report it to the server when it changed.
    pub(crate) acp_caps: std::sync::Mutex<BTreeMap<String, AcpCapabilities>>,
    /// Held shared by tasks while they drive an agent over ACP, and alone by the start-up
    /// probe of an agent's `initialize`, so the two never start an adapter at the same time.
    pub(crate) acp_probing: tokio::sync::RwLock<()>,
    /// An agent process started ahead of the next task (see [`supervisor::Warm`]).
    pub(crate) warm: Arc<supervisor::WarmSlot>,
}

impl Ctx {
    pub(crate) fn held(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn acp_caps(&self) -> BTreeMap<String, AcpCapabilities> {
        self.acp_caps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps what `agent` answered to `initialize`, unless it is more than the server takes
    /// (then nothing is reported for it, and `tunnel acp` answers its baseline).
    pub(crate) fn learn_acp(&self, agent: &str, caps: AcpCapabilities) {
        let mut all = self.acp_caps.lock().unwrap_or_else(|p| p.into_inner());
        match caps.validate() {
            Ok(()) => {
                if all.get(agent) != Some(&caps) {
                    tracing::info!(
                        agent,
                        "ACP agent capabilities learned; reported with the next claim."
                    );
                    all.insert(agent.to_owned(), caps);
                }
            }
            Err(e) => {
                all.remove(agent);
                tracing::warn!(agent, error = %e, "The ACP agent's initialize answer is not reported: the server would refuse it.");
            }
        }
    }
}

pub(crate) async fn run_offer(ctx: Arc<Ctx>, offer: Offer) {
    let id = offer.task.id.clone();
    let at = AttemptRef {
        attempt: offer.attempt,
        lease_token: offer.lease_token.clone(),
    };
    // Acked by the claim (one round trip fewer), or ack it now.
    let lease = match offer.lease.clone() {
        Some(lease) => lease,
        None => match ack(&ctx, &id, &at).await {
            Some(lease) => lease,
            None => return,
        },
    };
    tracing::info!(task_id = %id, agent = %offer.task.agent, attempt = offer.attempt, "Task started.");
    let entry = SpoolEntry {
        task_id: id.clone(),
        attempt: offer.attempt,
        lease_token: offer.lease_token.clone(),
        pgid: None,
        pgid_start: None,
        cgroup: None,
        mark: None,
        pending: vec![],
        truncated: false,
        finish: None,
    };
    // In the spool before the agent starts: a runner that restarts lists the attempt as held,
    // so an offer of it again (its claim's answer unconfirmed) never runs it a second time.
    save(&ctx.spool, &entry);
    let reporter = Reporter::start(ctx.clone(), entry);
    let cancel = CancellationToken::new();
    let done = CancellationToken::new();
    let ending = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat_loop(
        ctx.client.clone(),
        id.clone(),
        at.clone(),
        lease.lease_ms,
        cancel.clone(),
        reporter.stale.clone(),
        Ending {
            finishing: ending.clone(),
            done: done.clone(),
        },
    ));

    let (outcome, mut result, not_before) = execute(&ctx, &offer, &reporter, &cancel).await;
    // From here the finish may end the attempt on the server before `done` stops the held
    // heartbeat: a 409 to that heartbeat is the finish itself, not a lost lease.
    ending.cancel();
    fit_result(&mut result);
    let stale = reporter.stale.is_cancelled();
    let finish = FinishRequest {
        attempt: offer.attempt,
        lease_token: offer.lease_token.clone(),
        outcome,
        result,
        not_before,
        events: vec![],
    };
    if stale {
        tracing::warn!(task_id = %id, "The server moved on from this attempt; its result is dropped.");
        reporter.close().await;
    } else {
        reporter.finish(finish).await;
        tracing::info!(task_id = %id, outcome = ?outcome, "Task finished.");
    }
    done.cancel();
    // Not waited for: it may still be reading its last answer (see `heartbeat_loop`).
    drop(heartbeat);
}

/// How long an ack whose outcome is unknown is retried. Longer than any lease, so that by
/// then the server has either started the attempt (a retry answers 200: acks are idempotent)
/// or taken the offer back (409).
const ACK_RETRY_FOR: Duration = Duration::from_secs(120);

/// Acks an offer. An ack that got no answer (connection lost, server restarting, 5xx) may
/// have started the attempt on the server anyway; giving up then would leave the task
/// "running" with nobody running it until its lease ran out (lost). So it is retried until
/// the server says yes (start) or no (409: expired or cancelled; the offer is the server's
/// again), or the runner is told to stop now.
async fn ack(ctx: &Ctx, id: &str, at: &AttemptRef) -> Option<tunnel_protocol::LeaseStatus> {
    let started = Instant::now();
    let mut failures = 0u32;
    loop {
        match ctx.client.ack(id, at).await {
            Ok(l) => return Some(l),
            Err(e) if e.is_stale() || e.status().is_some_and(|s| (400..500).contains(&s)) => {
                tracing::warn!(task_id = %id, error = %e, "The offer is gone; not starting it.");
                return None;
            }
            Err(e) => {
                failures += 1;
                if started.elapsed() > ACK_RETRY_FOR {
                    tracing::warn!(task_id = %id, error = %e, "Could not ack the offer; not starting it.");
                    return None;
                }
                tracing::warn!(task_id = %id, error = %e, "Ack got no answer; retrying.");
                tokio::select! {
                    _ = tokio::time::sleep(retry_wait(&e, failures).min(Duration::from_secs(5))) => {}
                    _ = ctx.abort.cancelled() => return None,
                }
            }
        }
    }
}

fn failed(message: impl Into<String>) -> (Outcome, TaskResult, Option<i64>) {
    (
        Outcome::Failed,
        TaskResult {
            error: Some(message.into()),
            ..Default::default()
        },
        None,
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) enum Stop {
    Cancelled,
    TimedOut,
    Shutdown,
    Stale,
}

async fn execute(
    ctx: &Ctx,
    offer: &Offer,
    reporter: &Reporter,
    cancel: &CancellationToken,
) -> (Outcome, TaskResult, Option<i64>) {
    let task = &offer.task;
    let cfg = &ctx.config;
    let runner = &cfg.name;
    let Some(agent) = cfg.agents.get(&task.agent) else {
        return failed(format!(
            "agent {:?} is not configured on runner {runner}",
            task.agent
        ));
    };
    // The stricter of the agent's and the task's policy; anything but `auto` needs an agent
    // that can ask (ACP), never an unattended print-mode run.
    let policy = agent.approvals.stricter(task_policy(task));
    let acp: Option<(PathBuf, Vec<String>)> = match (agent.kind, &agent.acp) {
        (AgentKind::Acp, _) => None,
        (_, launch) if policy == ApprovalPolicy::Auto => {
            match (
                ctx.programs.get(&task.agent),
                launch,
                ctx.acp_programs.get(&task.agent),
            ) {
                (Some(Some(_)), _, _) => None,
                // The print-mode CLI is missing but its ACP adapter is here (the Claude adapter
                // brings its own Claude Code): run through the adapter.
                (_, Some(l), Some(Some(p))) => Some((p.clone(), l.args.clone())),
                _ => None,
            }
        }
        (_, Some(launch)) => match ctx.acp_programs.get(&task.agent) {
            Some(Some(p)) => Some((p.clone(), launch.args.clone())),
            _ => {
                return failed(format!(
                    "approvals = \"{}\" needs the ACP adapter {} on runner {runner}: {}",
                    policy.as_str(),
                    launch.program,
                    agent.acp_install_hint().unwrap_or_default()
                ));
            }
        },
        (_, None) => {
            return failed(format!(
                "agent {:?} cannot ask before it acts, so it does not run with approvals = \"{}\"; \
                 use an ACP agent (kind = \"acp\") or a built-in one (claude, codex, gemini)",
                task.agent,
                policy.as_str()
            ));
        }
    };
    let program = match (ctx.programs.get(&task.agent), &acp) {
        (_, Some((p, _))) => p.clone(),
        (Some(Some(p)), None) => p.clone(),
        _ => {
            return failed(format!(
                "{} is not installed on runner {runner}: {}",
                agent.program,
                agent.install_hint()
            ));
        }
    };
    let acp = match agent.kind {
        AgentKind::Acp => Some((program.clone(), agent.args.clone())),
        _ => acp,
    };
    let dir = match &task.project {
        Some(p) => match cfg.projects.get(p) {
            Some(d) => d.clone(),
            None => return failed(format!("project {p:?} is not on runner {runner}")),
        },
        None => cfg.default_dir.clone(),
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return failed(format!("cannot use the directory {}: {e}", dir.display()));
    }
    if agent.kind == crate::config::AgentKind::Files {
        // Done here, not by a child process: nothing to supervise.
        // Off the async runtime and bounded in time: a file on a hung network mount must not
        // stall the runner.
        let opts = crate::files::Options {
            write_vcs: cfg.files_write_vcs,
        };
        let (project, prompt) = (dir.clone(), task.prompt.clone());
        let work = tokio::task::spawn_blocking(move || crate::files::run(&project, &prompt, opts));
        let done = match tokio::time::timeout(crate::files::TIMEOUT, work).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("the file task failed: {e}")),
            Err(_) => Err(format!(
                "the file task did not finish within {} s",
                crate::files::TIMEOUT.as_secs()
            )),
        };
        return match done {
            Ok(text) => (
                Outcome::Succeeded,
                TaskResult {
                    text: Some(text),
                    ..Default::default()
                },
                None,
            ),
            Err(e) => failed(e),
        };
    }
    let timeout = task
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(cfg.default_timeout);
    let deadline = Instant::now() + timeout;
    let models: Vec<Option<String>> = match (&task.model, agent.models.is_empty()) {
        (Some(m), _) => vec![Some(m.clone())],
        (None, true) => vec![None],
        (None, false) => agent.models.iter().cloned().map(Some).collect(),
    };
    let mut resolved = agent.clone();
    resolved.program = program.display().to_string();
    let gate_cancel = cancel.child_token();
    let gate = Arc::new(Gate::new(
        policy,
        ctx.approvals.clone(),
        task.id.clone(),
        offer.attempt,
        offer.lease_token.clone(),
        cfg.approval_timeout,
        gate_cancel.clone(),
    ));
    let _stop_gate = gate_cancel.drop_guard();

    for (i, model) in models.iter().enumerate() {
        let (stop, exit, verdict) = if let Some((acp_program, acp_args)) = &acp {
            let mut env = agent.env.clone();
            // Claude and Gemini read the model from their env; other agents get it through
            // their session `model` option.
            let model_env = match agent.kind {
                AgentKind::Claude => Some("ANTHROPIC_MODEL"),
                AgentKind::Gemini => Some("GEMINI_MODEL"),
                _ => None,
            };
            if let (Some(k), Some(m)) = (model_env, model) {
                env.insert(k.into(), m.clone());
            }
            let program = acp_program.display().to_string();
            let run = crate::acp::AcpRun {
                program: &program,
                args: acp_args,
                env: &env,
                dir: &dir,
                prompt: &task.prompt,
                model: if model_env.is_some() {
                    None
                } else {
                    model.as_deref()
                },
                resume: offer.resume_session_id.as_deref(),
                mode: agent.acp_mode.as_deref(),
                containment: &ctx.containment,
                confine: &cfg.confine,
                warm: Some(&ctx.warm),
            };
            let watch = crate::acp::Watch {
                cancel,
                abort: &ctx.abort,
                stale: &reporter.stale,
                deadline,
                kill_grace: cfg.kill_grace,
            };
            let _not_probing = ctx.acp_probing.read().await;
            let ended = crate::acp::run(&run, gate.clone(), reporter, &watch).await;
            if let Some(caps) = ended.learned {
                ctx.learn_acp(&task.agent, caps);
            }
            (ended.stop, ended.exit, Some(ended.verdict))
        } else {
            let inv = adapter::invocation(
                &resolved,
                &InvocationInput {
                    prompt: &task.prompt,
                    model: model.as_deref(),
                    resume: offer.resume_session_id.as_deref(),
                    task_id: &task.id,
                    project_dir: &dir,
                },
            );
            let started = supervisor::start(
                &inv,
                &dir,
                &agent.env,
                &cfg.confine,
                &ctx.containment,
                ctx.warm.take(),
            )
            .await;
            ctx.warm.fill(supervisor::REFILL_AFTER);
            let mut running = match started {
                Ok(r) => r,
                Err(e) => return failed(format!("cannot start {}: {e}", resolved.program)),
            };
            reporter.set_procs(Some(Leftover {
                pgid: Some(running.pgid),
                pgid_start: running.start_time,
                cgroup: running.cell.cgroup.clone(),
                mark: Some(running.cell.mark.clone()),
            }));
            reporter.event(Ev {
                kind: "log",
                data: json!({"line": running.cell.describe()}),
            });
            let mut parser = adapter::parser(agent);
            let mut stop = None;
            let mut stdout_open = true;
            let status = loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => {
                        stop = Some(Stop::Cancelled);
                        break running.terminate(cfg.kill_grace).await;
                    }
                    _ = ctx.abort.cancelled() => {
                        stop = Some(Stop::Shutdown);
                        break running.terminate(cfg.kill_grace).await;
                    }
                    _ = reporter.stale.cancelled() => {
                        stop = Some(Stop::Stale);
                        break running.terminate(cfg.kill_grace).await;
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        stop = Some(Stop::TimedOut);
                        break running.terminate(cfg.kill_grace).await;
                    }
                    line = running.lines.recv(), if stdout_open => match line {
                        Some(l) => parser.line(&l).into_iter().for_each(|e| reporter.event(e)),
                        None => stdout_open = false,
                    },
                    status = running.child.wait() => break status.ok(),
                }
            };
            running.reap_group().await;
            // What the agent printed just before it ended (bounded: a leftover grandchild may hold
            // the pipe open).
            while let Ok(Some(l)) =
                tokio::time::timeout(Duration::from_secs(2), running.lines.recv()).await
            {
                parser.line(&l).into_iter().for_each(|e| reporter.event(e));
            }
            reporter.set_procs(None);
            let exit = Exit {
                code: status.and_then(|s| s.code()),
                signal: status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
                stderr_tail: running.stderr_tail().await,
            };
            let verdict = match stop {
                None => Some(parser.finish(&exit)),
                Some(_) => None,
            };
            (stop, exit, verdict)
        };
        let partial = |error: String| TaskResult {
            error: Some(error),
            stderr_tail: (!exit.stderr_tail.is_empty()).then(|| exit.stderr_tail.clone()),
            exit_code: exit.code,
            ..Default::default()
        };
        match stop {
            Some(Stop::Cancelled) => {
                return (
                    Outcome::Cancelled,
                    partial("cancelled; the agent was stopped".into()),
                    None,
                );
            }
            Some(Stop::TimedOut) => {
                let msg = format!(
                    "timed out after {} s; the agent was stopped",
                    timeout.as_secs()
                );
                return (Outcome::TimedOut, partial(msg), None);
            }
            Some(Stop::Shutdown) => {
                let msg = format!(
                    "runner {runner} shut down before the agent finished; the agent was stopped"
                );
                return (Outcome::Failed, partial(msg), None);
            }
            Some(Stop::Stale) => return (Outcome::Failed, partial("stale attempt".into()), None),
            None => {}
        }
        let Some(verdict) = verdict else {
            return failed("the agent ended without a verdict");
        };
        match verdict {
            Verdict::Succeeded(r) => return (Outcome::Succeeded, r, None),
            Verdict::Failed(_, Failure::TryAnotherModel(reason)) if i + 1 < models.len() => {
                reporter.event(Ev {
                    kind: "fallback",
                    data: json!({"from": model, "to": models[i + 1], "reason": reason}),
                });
            }
            Verdict::Failed(r, Failure::UsageLimit { reset_at, .. }) => {
                // Never park into the past: that would retry the limit at once, in a loop.
                let earliest = now_ms() + 60_000;
                let at = reset_at
                    .unwrap_or(now_ms() + cfg.default_park.as_millis() as i64)
                    .max(earliest);
                return (Outcome::Parked, r, Some(at));
            }
            Verdict::Failed(r, _) => return (Outcome::Failed, r, None),
        }
    }
    failed("no model left to try")
}

/// The task's own approval policy (from its submit).
fn task_policy(task: &tunnel_protocol::Task) -> ApprovalPolicy {
    task.approvals.unwrap_or_default()
}

/// When the heartbeats stop mattering: `finishing` once the agent has ended and its result is
/// on its way, `done` once it was reported.
struct Ending {
    finishing: CancellationToken,
    done: CancellationToken,
}

/// How long a held heartbeat's answer is waited for once the task was reported (see
/// `heartbeat_loop`); nothing waits on that.
const HELD_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Renews the lease until the task is done; a held heartbeat brings a cancel at once.
async fn heartbeat_loop(
    client: Client,
    id: String,
    at: AttemptRef,
    lease_ms: i64,
    cancel: CancellationToken,
    stale: CancellationToken,
    ending: Ending,
) {
    let Ending { finishing, done } = ending;
    let third = Duration::from_millis((lease_ms / 3).max(100) as u64);
    let mut failures = 0u32;
    loop {
        let hb = Heartbeat {
            attempt: at.attempt,
            lease_token: at.lease_token.clone(),
            wait_ms: if cancel.is_cancelled() {
                0
            } else {
                third.as_millis() as u64
            },
        };
        let call = client.heartbeat(&id, &hb);
        tokio::pin!(call);
        let pause = tokio::select! {
            _ = done.cancelled() => {
                // The finish ended the attempt, and the server answers a held heartbeat as it
                // does (409). That answer is read, so its connection goes back to the pool:
                // dropped mid-request it is closed, and a later request (the next task's
                // finish, say) opens a new one, a round trip more over a slow link.
                let _ = tokio::time::timeout(HELD_ANSWER_WITHIN, call).await;
                return;
            }
            r = &mut call => match r {
                Ok(status) => {
                    failures = 0;
                    if status.cancel && !cancel.is_cancelled() {
                        tracing::info!(task_id = %id, "Cancel requested; stopping the agent.");
                        cancel.cancel();
                    }
                    // A held heartbeat already waited; an immediate answer (cancel) needs a pause.
                    if status.cancel { third } else { Duration::ZERO }
                }
                Err(e) if e.is_stale() && finishing.is_cancelled() => {
                    // The finish ended the attempt while this heartbeat was held: normal.
                    tracing::debug!(task_id = %id, error = %e, "Heartbeat answered by the finish.");
                    return;
                }
                Err(e) if e.is_stale() => {
                    tracing::warn!(task_id = %id, error = %e, "The lease is gone; stopping the agent.");
                    stale.cancel();
                    return;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(task_id = %id, error = %e, "Heartbeat failed; retrying.");
                    backoff(failures).min(third)
                }
            },
        };
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// How long to wait before retrying after `e`. A server that did not answer at all (refused,
/// reset, timed out, or a gateway error: down or restarting) is probed about twice a second, so a runner is back
/// within a second of the server; an answer with an error backs off exponentially ([`backoff`]).
/// A refused connection costs the server nothing, and the jitter spreads many runners out.
pub(crate) fn retry_wait(e: &tunnel_client::ClientError, failures: u32) -> Duration {
    use tunnel_client::ClientError;
    // A proxy in front of a restarting server answers 502–504.
    if matches!(e, ClientError::Transport { .. }) || matches!(e.status(), Some(502..=504)) {
        backoff(failures.min(1))
    } else {
        backoff(failures)
    }
}

/// Capped exponential back-off with jitter: 0.5 s, 1 s, 2 s … 30 s, each ±25 %.
pub(crate) fn backoff(failures: u32) -> Duration {
    let base = 500u64
        .saturating_mul(1 << failures.min(6).saturating_sub(1))
        .min(30_000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let jitter = nanos % (base / 2 + 1);
    Duration::from_millis(base * 3 / 4 + jitter)
}

// ---------------------------------------------------------------------------------------------
// Reporter: events and the result, through the spool, to the server.

enum Msg {
    Event(Ev),
    Procs(Option<Leftover>),
    Finish(FinishRequest, oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
}

/// Sends an attempt's events in batches and its result, keeping both in the spool until the
/// server has them. Never blocks the agent's output loop.
pub(crate) struct Reporter {
    tx: mpsc::UnboundedSender<Msg>,
    /// Set when the server says this attempt is no longer current (409).
    pub(crate) stale: CancellationToken,
}

impl Reporter {
    fn start(ctx: Arc<Ctx>, entry: SpoolEntry) -> Reporter {
        let (tx, rx) = mpsc::unbounded_channel();
        let stale = CancellationToken::new();
        tokio::spawn(report_loop(ctx, entry, rx, stale.clone()));
        Reporter { tx, stale }
    }

    fn event(&self, e: Ev) {
        let _ = self.tx.send(Msg::Event(e));
    }

    /// What a restarted runner must end if this one dies (`None`: nothing runs).
    fn set_procs(&self, procs: Option<Leftover>) {
        let _ = self.tx.send(Msg::Procs(procs));
    }
}

impl crate::acp::Sink for Reporter {
    fn event(&self, e: Ev) {
        Reporter::event(self, e);
    }

    fn procs(&self, procs: Option<Leftover>) {
        self.set_procs(procs);
    }
}

impl Reporter {
    async fn finish(&self, f: FinishRequest) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Finish(f, tx)).is_ok() {
            let _ = rx.await;
        }
    }

    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Most events in one append.
const BATCH: usize = 200;
/// Most bytes of events in one append (the server takes 4 MiB by default).
const BATCH_BYTES: usize = 1 << 20;
/// Largest event kept whole (its JSON); a longer text is cut (an agent can print a 1 MiB line
/// of control characters, each six bytes as JSON).
const EVENT_MAX_BYTES: usize = 256 << 10;
/// Largest answer, error or stderr tail kept in a result (bytes of text).
const RESULT_TEXT_MAX: usize = 1 << 20;

fn json_len(v: &impl serde::Serialize) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
}

/// The first `max` bytes of `s` (on a char boundary) and a note of what was cut.
fn cut_head(s: &str, max: usize) -> String {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} bytes cut]", &s[..end], s.len() - end)
}

/// The last `max` bytes of `s` (on a char boundary) after a note of what was cut: the end of an
/// answer is where its conclusion is.
fn cut_tail(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("[{start} bytes cut] …{}", &s[start..])
}

/// An event small enough to send: a text too long is cut, anything else too long becomes a
/// note with the start of its JSON.
fn fit_event(e: Ev) -> Ev {
    if json_len(&e.data) <= EVENT_MAX_BYTES {
        return e;
    }
    let mut data = e.data;
    // Control characters take up to 6 bytes as JSON: cut the text to a sixth of the room.
    if let Some(text) = data.get("text").and_then(|t| t.as_str()).map(str::to_owned) {
        data["text"] = json!(cut_head(&text, EVENT_MAX_BYTES / 6));
        if json_len(&data) <= EVENT_MAX_BYTES {
            return Ev { kind: e.kind, data };
        }
    }
    let text = data.to_string();
    Ev {
        kind: e.kind,
        data: json!({"truncated": true, "start": cut_head(&text, EVENT_MAX_BYTES / 6)}),
    }
}

/// A result small enough to send: the answer keeps its end, the error its start, the stderr
/// tail its end; usage figures that are too large are dropped.
fn fit_result(r: &mut TaskResult) {
    let max = RESULT_TEXT_MAX / 6;
    if let Some(t) = &r.text
        && json_len(t) > RESULT_TEXT_MAX
    {
        r.text = Some(cut_tail(t, max));
    }
    if let Some(t) = &r.error
        && json_len(t) > RESULT_TEXT_MAX / 4
    {
        r.error = Some(cut_head(t, max / 4));
    }
    if let Some(t) = &r.stderr_tail
        && json_len(t) > RESULT_TEXT_MAX / 4
    {
        r.stderr_tail = Some(cut_tail(t, max / 4));
    }
    if r.usage.as_ref().is_some_and(|u| json_len(u) > 64 << 10) {
        r.usage = Some(json!({"truncated": true}));
    }
}
/// How often the spool file is brought up to date (and a failed append retried).
const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// Events go out as soon as they come while no append is in flight; while one is, they gather
/// and go together when it is answered. So an idle link carries each event at once (one
/// one-way delay to the server), and a busy one is never asked for more than one request at a
/// time. The spool file is written at most every [`FLUSH_EVERY`].
async fn report_loop(
    ctx: Arc<Ctx>,
    mut entry: SpoolEntry,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    stale: CancellationToken,
) {
    let mut next_n = 1u64;
    // run_offer wrote the entry before starting the agent.
    let mut dirty = false;
    let mut failures = 0u32;
    let mut retry_at = Instant::now();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The answer of the append in flight, if one is: how many of the first pending events the
    // server has.
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<tunnel_client::Result<(usize, bool)>>();
    let mut in_flight = false;
    loop {
        if !in_flight
            && !entry.pending.is_empty()
            && Instant::now() >= retry_at
            && !stale.is_cancelled()
        {
            in_flight = true;
            let (client, batch, tx) = (ctx.client.clone(), Batch::of(&entry), sent_tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(batch.send(&client).await);
            });
        }
        tokio::select! {
            Some(sent) = sent_rx.recv() => {
                in_flight = false;
                match sent {
                    Ok((n, truncated)) => {
                        entry.pending.drain(..n);
                        if truncated {
                            log_truncated(&mut entry);
                        }
                        failures = 0;
                        dirty = true;
                    }
                    Err(e) if e.is_stale() || e.status() == Some(404) => stale.cancel(),
                    Err(e) => {
                        failures += 1;
                        retry_at = Instant::now() + retry_wait(&e, failures);
                        tracing::warn!(task_id = %entry.task_id, error = %e, "Sending events failed; kept in the spool.");
                    }
                }
            }
            msg = rx.recv() => match msg {
                Some(Msg::Event(e)) => {
                    let e = fit_event(e);
                    let e = NewEvent { n: next_n, kind: e.kind.into(), data: e.data };
                    next_n += 1;
                    if !entry.truncated || sent_after_truncation(&e) {
                        entry.pending.push(e);
                        dirty = true;
                    }
                }
                Some(Msg::Procs(p)) => {
                    let p = p.unwrap_or_default();
                    entry.pgid = p.pgid;
                    entry.pgid_start = p.pgid_start;
                    entry.cgroup = p.cgroup;
                    entry.mark = p.mark;
                    save(&ctx.spool, &entry);
                    dirty = false;
                }
                Some(Msg::Finish(f, done)) => {
                    // An append in flight is not waited for (a round trip): its events are
                    // still pending, so the finish carries them too, and the server keeps
                    // each `n` once whichever request comes first (an append after the finish
                    // is refused).
                    entry.finish = Some(f);
                    save(&ctx.spool, &entry);
                    deliver(&ctx, &mut entry, &stale).await;
                    let _ = done.send(());
                    return;
                }
                Some(Msg::Close(done)) => {
                    ctx.spool.remove(&entry.task_id, entry.attempt);
                    let _ = done.send(());
                    return;
                }
                None => return,
            },
            _ = tick.tick() => {
                if dirty {
                    save(&ctx.spool, &entry);
                    dirty = false;
                }
            }
        }
    }
}

fn save(spool: &Spool, entry: &SpoolEntry) {
    if let Err(e) = spool.save(entry) {
        tracing::error!(task_id = %entry.task_id, error = %e, "Cannot write the spool.");
    }
}

/// Whether the server will never take this request as it is (too large, or refused as
/// invalid): sending it again cannot help.
fn refused_for_good(e: &tunnel_client::ClientError) -> bool {
    matches!(e.status(), Some(400 | 413 | 422))
}

/// Whether an event is still sent once the server said the task's log is truncated: only a
/// `session` event, which the server records for affinity even when it does not store it.
/// Everything else would be dropped there, so it is not spooled or uploaded at all.
fn sent_after_truncation(e: &NewEvent) -> bool {
    e.kind == "session"
}

/// The server truncated the task's log: drop what it would drop, and send no more of it.
fn log_truncated(entry: &mut SpoolEntry) {
    if !entry.truncated {
        tracing::info!(task_id = %entry.task_id, "The server truncated this task's event log; sending only its result from now on.");
    }
    entry.truncated = true;
    entry.pending.retain(sent_after_truncation);
}

/// The first pending events that fit in one request (by count and bytes), owned, so the
/// append can be in flight while more events come.
struct Batch {
    task_id: String,
    attempt: u32,
    lease_token: String,
    events: Vec<NewEvent>,
}

impl Batch {
    fn of(entry: &SpoolEntry) -> Batch {
        let n = batch_len(&entry.pending);
        Batch {
            task_id: entry.task_id.clone(),
            attempt: entry.attempt,
            lease_token: entry.lease_token.clone(),
            events: entry.pending[..n].to_vec(),
        }
    }

    /// Sends it; returns how many were sent (or dropped: a single event the server refuses for
    /// good is dropped, so one bad event cannot stop the report) and whether the server said
    /// the task's log is truncated.
    async fn send(self, client: &Client) -> tunnel_client::Result<(usize, bool)> {
        let mut n = self.events.len();
        let mut req = AppendEvents {
            attempt: self.attempt,
            lease_token: self.lease_token,
            events: self.events,
        };
        loop {
            match client.append_events(&self.task_id, &req).await {
                Ok(ack) => return Ok((n, ack.truncated)),
                // A smaller server limit: halve the batch; a single event that is still
                // refused is dropped.
                Err(e) if refused_for_good(&e) && n > 1 => {
                    n /= 2;
                    req.events.truncate(n);
                }
                Err(e) if refused_for_good(&e) => {
                    tracing::warn!(task_id = %self.task_id, error = %e, "The server refused an event; dropped.");
                    return Ok((1, false));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// How many of the first `pending` events go in one request: at most [`BATCH`], and no more
/// than [`BATCH_BYTES`] of JSON unless that is a single event.
fn batch_len(pending: &[NewEvent]) -> usize {
    let mut n = 0;
    let mut bytes = 0;
    for e in pending.iter().take(BATCH) {
        bytes += json_len(e);
        if n > 0 && bytes > BATCH_BYTES {
            break;
        }
        n += 1;
    }
    n
}

/// Sends up to one batch of pending events; returns how many were sent (or dropped) and
/// whether the server said the task's log is truncated.
async fn send_events(client: &Client, entry: &SpoolEntry) -> tunnel_client::Result<(usize, bool)> {
    Batch::of(entry).send(client).await
}

/// The finish to send instead of one the server refused for good (`tries` refusals so far):
/// first the same outcome with the end of the answer and a note why, then a bare failure.
fn smaller_finish(f: &FinishRequest, refusal: &str, tries: u32) -> Option<FinishRequest> {
    let error = Some(format!(
        "the server refused this attempt's result ({refusal})"
    ));
    let result = match tries {
        1 => TaskResult {
            text: f.result.text.as_deref().map(|t| cut_tail(t, 16 << 10)),
            error,
            exit_code: f.result.exit_code,
            ..Default::default()
        },
        2 => {
            return Some(FinishRequest {
                outcome: Outcome::Failed,
                not_before: None,
                result: TaskResult {
                    error,
                    ..Default::default()
                },
                ..f.clone()
            });
        }
        _ => return None,
    };
    Some(FinishRequest {
        result,
        ..f.clone()
    })
}

/// Delivers every pending event, then the result; keeps trying (with back-off) until the
/// server has them, the server refuses the attempt, or the runner is stopping (the spool keeps
/// them for the next start). A result the server refuses for good (too large, invalid) is
/// replaced by a smaller one, so the attempt is always reported.
pub(crate) async fn deliver(ctx: &Ctx, entry: &mut SpoolEntry, stale: &CancellationToken) {
    let mut failures = 0u32;
    loop {
        let step = async {
            // The last batch of events goes in the finish itself (one request, not two),
            // unless the server is older than that; what does not fit goes before it.
            let carry = ctx.finish_carries_events.load(Ordering::Relaxed);
            let fits = |pending: &[NewEvent]| carry && batch_len(pending) == pending.len();
            while !entry.pending.is_empty() && !fits(&entry.pending) {
                let (sent, truncated) = send_events(&ctx.client, entry).await?;
                entry.pending.drain(..sent);
                if truncated {
                    log_truncated(entry);
                }
            }
            let mut refusals = 0;
            while let Some(f) = &entry.finish {
                let mut req = f.clone();
                req.events = entry.pending.clone();
                match ctx.client.finish(&entry.task_id, &req).await {
                    Ok(_) => {
                        entry.pending.clear();
                        break;
                    }
                    // A server older than `events` in the finish refuses the field: send them
                    // as an append from now on.
                    Err(e) if refused_for_good(&e) && !req.events.is_empty() => {
                        tracing::info!(task_id = %entry.task_id, error = %e, "The server does not take events in the finish; sending them apart.");
                        ctx.finish_carries_events.store(false, Ordering::Relaxed);
                        while !entry.pending.is_empty() {
                            let (sent, truncated) = send_events(&ctx.client, entry).await?;
                            entry.pending.drain(..sent);
                            if truncated {
                                log_truncated(entry);
                            }
                        }
                    }
                    Err(e) if refused_for_good(&e) => {
                        tracing::warn!(task_id = %entry.task_id, error = %e, "The server refused the result; sending a smaller one.");
                        refusals += 1;
                        match smaller_finish(f, &e.to_string(), refusals) {
                            Some(smaller) => entry.finish = Some(smaller),
                            None => return Err(e),
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok::<(), tunnel_client::ClientError>(())
        };
        match step.await {
            Ok(()) => {
                ctx.spool.remove(&entry.task_id, entry.attempt);
                return;
            }
            Err(e) if e.is_stale() => {
                tracing::warn!(task_id = %entry.task_id, error = %e, "The server refused this attempt's report; dropping it.");
                stale.cancel();
                ctx.spool.remove(&entry.task_id, entry.attempt);
                return;
            }
            // The task is gone from the server (deleted, or another server's): sending again
            // cannot help, and retrying would hold the runner's shutdown.
            Err(e) if e.status() == Some(404) => {
                tracing::warn!(task_id = %entry.task_id, attempt = entry.attempt, error = %e, "The server no longer has this task; its spooled report is dropped.");
                stale.cancel();
                ctx.spool.remove(&entry.task_id, entry.attempt);
                return;
            }
            Err(e) => {
                failures += 1;
                save(&ctx.spool, entry);
                tracing::warn!(task_id = %entry.task_id, error = %e, "Reporting the result failed; retrying.");
                tokio::select! {
                    _ = tokio::time::sleep(retry_wait(&e, failures)) => {}
                    _ = ctx.abort.cancelled(), if failures > 3 => {
                        tracing::warn!(task_id = %entry.task_id, "Stopping with the result still in the spool; it is sent at the next start.");
                        return;
                    }
                }
            }
        }
    }
}

/// Finishes attempts an earlier run of this runner left in the spool: stops leftover agent
/// processes, sends what was kept, and reports an attempt that never finished as failed.
pub(crate) async fn recover(ctx: Arc<Ctx>) {
    for mut entry in ctx.spool.leftovers() {
        let leftover = Leftover {
            pgid: entry.pgid.take(),
            pgid_start: entry.pgid_start.take(),
            cgroup: entry.cgroup.take(),
            mark: entry.mark.take(),
        };
        let ended = tokio::task::spawn_blocking(move || crate::contain::end_leftover(&leftover))
            .await
            .unwrap_or_default();
        if !ended.is_empty() {
            tracing::info!(task_id = %entry.task_id, attempt = entry.attempt, "Leftovers of an earlier run: {}.", ended.join("; "));
        }
        if entry.finish.is_none() {
            entry.finish = Some(FinishRequest {
                attempt: entry.attempt,
                lease_token: entry.lease_token.clone(),
                outcome: Outcome::Failed,
                result: TaskResult {
                    error: Some(format!(
                        "runner {} restarted while the agent was running; the agent was stopped",
                        ctx.config.name
                    )),
                    ..Default::default()
                },
                not_before: None,
                events: vec![],
            });
        }
        tracing::info!(task_id = %entry.task_id, attempt = entry.attempt, events = entry.pending.len(), "Re-sending what an earlier run left in the spool.");
        deliver(&ctx, &mut entry, &CancellationToken::new()).await;
        ctx.held().remove(&entry.task_id);
    }
}
