//! The tunnel runner: claims tasks from the server over outbound HTTP, runs agent CLIs under
//! supervision, streams their output back as events, and reports each result.
//!
//! **Architecture Invariant:** the runner never opens the database; everything goes through the
//! HTTP API (`tunnel-client`), so a runner works behind NAT and through proxies.

mod acp;
mod adapter;
mod approvals;
pub mod config;
pub mod confine;
pub mod contain;
mod files;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod sessions;
mod spool;
mod supervisor;
mod task;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel_client::{Client, ClientError};
use tunnel_protocol::ClaimRequest;

pub use acp::{AcpProbe, probe as acp_probe};
pub use config::{AcpLaunch, AgentConfig, AgentKind, ApprovalPolicy, OutputMode, RunnerConfig};
pub use confine::{Confinement, RunAs};
pub use contain::{Containment, Mechanism};

/// Why the runner stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("{0}")]
    Config(String),
    #[error("the server refused the runner's token ({0}); check WORKER_TOKEN / --token")]
    Unauthorized(String),
    #[error(
        "the token is not a runner token ({0}); create one with `tunnel token create --role runner`"
    )]
    Forbidden(String),
    #[error("the server rejected the runner's claim: {0}")]
    Rejected(String),
    #[error("cannot use the spool directory {path}: {source}")]
    Spool {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Stops a runner. `stop`: claim nothing more, let running tasks finish (up to the shutdown
/// grace). `abort`: stop the agents now and report them as interrupted.
#[derive(Clone, Default)]
pub struct Shutdown {
    pub stop: CancellationToken,
    pub abort: CancellationToken,
}

/// Tells the server which sessions the agents keep on this machine, at start and every few
/// minutes, so `recent` lists them.
async fn report_sessions(client: Client, config: Arc<RunnerConfig>, stop: CancellationToken) {
    loop {
        let agents = config.agents.clone();
        let sessions = tokio::task::spawn_blocking(move || sessions::scan(&agents))
            .await
            .unwrap_or_default();
        if !sessions.is_empty() {
            let report = tunnel_protocol::ReportSessions { sessions };
            if let Err(e) = client.report_sessions(&config.name, &report).await {
                tracing::debug!(error = %e, "Could not report recent sessions.");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(300)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The longest claim while ACP agents are being probed at start.
const PROBING_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long an ACP agent has to answer the start-up `initialize`.
const PROBE_WITHIN: std::time::Duration = std::time::Duration::from_secs(20);

/// Asks each ACP agent for its `initialize` answer, one at a time (each a short-lived process
/// under the same confinement as a task), then cancels `done`. One that fails is only logged:
/// its first task learns it instead.
async fn probe_acp_agents(
    ctx: Arc<task::Ctx>,
    agents: Vec<String>,
    stop: CancellationToken,
    done: CancellationToken,
) {
    let _done = done.drop_guard();
    let cfg = &ctx.config;
    let _ = std::fs::create_dir_all(&cfg.default_dir);
    for name in agents {
        let Some(agent) = cfg.agents.get(&name) else {
            continue;
        };
        // Never beside a task over ACP: two adapters starting at once in one agent home (two
        // agent names may share one) fight over its state (Codex's SQLite state fails to
        // open). A running task learns the answer itself; a task that comes now waits for
        // this probe.
        let Ok(_alone) = ctx.acp_probing.try_write() else {
            continue;
        };
        let (program, args) = match (agent.kind, &agent.acp, ctx.acp_programs.get(&name)) {
            (AgentKind::Acp, _, _) => match ctx.programs.get(&name) {
                Some(Some(p)) => (p.clone(), agent.args.clone()),
                _ => continue,
            },
            (_, Some(launch), Some(Some(p))) => (p.clone(), launch.args.clone()),
            _ => continue,
        };
        let program = program.display().to_string();
        let launch = acp::Launch {
            program: &program,
            args: &args,
            env: &agent.env,
            dir: &cfg.default_dir,
            confine: &cfg.confine,
            containment: &ctx.containment,
        };
        match acp::probe_with(&launch, "tunnel-runner", PROBE_WITHIN, &stop).await {
            Ok(p) => ctx.learn_acp(&name, p.capabilities),
            Err(e) => {
                tracing::info!(agent = %name, error = %e, "Could not ask the ACP agent for its capabilities at start; its first task will.")
            }
        }
        if stop.is_cancelled() {
            return;
        }
    }
}

/// Runs until `shutdown.stop`, then drains.
pub async fn run(config: RunnerConfig, shutdown: Shutdown) -> Result<(), RunnerError> {
    let client = Client::new(&config.server, &config.token)?;
    tunnel_protocol::validate_name("runner name", &config.name)
        .map_err(|e| RunnerError::Config(e.to_string()))?;
    let spool = spool::Spool::open(&config.spool_dir).map_err(|source| RunnerError::Spool {
        path: config.spool_dir.display().to_string(),
        source,
    })?;

    let mut programs = BTreeMap::new();
    let mut acp_programs = BTreeMap::new();
    let mut versions = BTreeMap::new();
    for (name, agent) in &config.agents {
        if let Some(launch) = &agent.acp {
            let found = supervisor::find_program(&launch.program);
            if found.is_none() && agent.approvals != ApprovalPolicy::Auto {
                tracing::warn!(agent = %name, program = %launch.program, "ACP adapter not found: {}.", agent.acp_install_hint().unwrap_or_default());
            }
            acp_programs.insert(name.clone(), found);
        }
        let found = match agent.kind {
            AgentKind::Files => Some(std::path::PathBuf::from(config::FILES_PROGRAM)),
            _ => supervisor::find_program(&agent.program),
        };
        match &found {
            Some(path) => {
                // Only the known CLIs are asked for a version: a custom program may not
                // understand `--version` at all.
                let known = matches!(
                    agent.kind,
                    AgentKind::Claude | AgentKind::Codex | AgentKind::Gemini
                );
                if known && let Some(v) = supervisor::version_of(path, &config.confine).await {
                    versions.insert(name.clone(), v);
                }
                tracing::info!(agent = %name, program = %path.display(), version = versions.get(name).map(String::as_str).unwrap_or("?"), "Agent available.");
            }
            None => {
                tracing::warn!(agent = %name, program = %agent.program, "Agent CLI not found: {}.", agent.install_hint())
            }
        }
        programs.insert(name.clone(), found);
    }
    let offered: Vec<String> = programs
        .iter()
        .filter(|(n, p)| {
            p.is_some()
                || config.offer_missing_agents
                || acp_programs.get(*n).is_some_and(Option::is_some)
        })
        .map(|(n, _)| n.clone())
        .collect();
    if offered.is_empty() {
        return Err(RunnerError::Config(
            "no agent CLI was found on this machine (claude, codex, gemini…); install one or configure a custom agent".into(),
        ));
    }
    let projects: Vec<String> = config.projects.keys().cloned().collect();
    // Over ACP: an ACP agent itself, or a built-in CLI whose adapter is installed.
    let acp_agents: Vec<String> = offered
        .iter()
        .filter(|n| {
            config.agents.get(*n).is_some_and(|a| {
                (a.kind == AgentKind::Acp && programs.get(*n).is_some_and(Option::is_some))
                    || acp_programs.get(*n).is_some_and(Option::is_some)
            })
        })
        .cloned()
        .collect();

    let choice = config.containment;
    let containment = tokio::task::spawn_blocking(move || contain::detect(choice))
        .await
        .unwrap_or_else(|e| contain::Mechanism::ProcessTree(format!("detection failed: {e}")));
    tracing::info!(containment = %containment, "Agent containment.");
    let config = Arc::new(config);
    let warm = Arc::new(supervisor::WarmSlot::new(
        config.confine.clone(),
        containment.clone(),
    ));
    let ctx = Arc::new(task::Ctx {
        containment,
        warm: warm.clone(),
        client: client.clone(),
        config: config.clone(),
        spool,
        programs,
        acp_programs,
        approvals: Some(Arc::new(client.clone())),
        abort: shutdown.abort.clone(),
        held: Default::default(),
        finish_carries_events: std::sync::atomic::AtomicBool::new(true),
        acp_caps: Default::default(),
        acp_probing: Default::default(),
    });
    // Agents' temporary directories that a killed runner could not remove.
    confine::remove_orphaned_agent_tmps();
    // The first task's agent process, started while the runner waits for work.
    warm.fill(std::time::Duration::ZERO);
    // What an earlier run left in the spool is held until reported: never run again.
    ctx.held()
        .extend(ctx.spool.leftovers().into_iter().map(|e| e.task_id));
    let tracker = TaskTracker::new();
    tracker.spawn(task::recover(ctx.clone()));
    tokio::spawn(report_sessions(
        client.clone(),
        config.clone(),
        shutdown.stop.clone(),
    ));

    // What each ACP agent answers to `initialize`, for `tunnel acp`: asked in the background,
    // so a slow or missing adapter delays nothing; claims are short while it runs, so the
    // answer reaches the server soon after.
    let probing = CancellationToken::new();
    tokio::spawn(probe_acp_agents(
        ctx.clone(),
        acp_agents.clone(),
        shutdown.stop.clone(),
        probing.clone(),
    ));
    // What the server has of it from this run (`None`: nothing yet).
    let mut caps_sent: Option<BTreeMap<String, tunnel_protocol::AcpCapabilities>> = None;

    let slots = Arc::new(Semaphore::new(config.max_concurrent.max(1)));
    let mut failures = 0u32;
    // Claims ask the server to ack the offer too (one round trip fewer per task), unless it is
    // older than that and refused the field.
    let mut claim_ack = config.ack_in_claim;
    tracing::info!(runner = %config.name, server = %config.server, agents = ?offered, capacity = config.max_concurrent, "Runner started.");
    let result = loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.stop.cancelled() => break Ok(()),
        };
        let caps = ctx.acp_caps();
        let changed = match &caps_sent {
            None => !caps.is_empty(),
            Some(sent) => *sent != caps,
        };
        let mut wait = config.long_poll_wait;
        if !probing.is_cancelled() {
            wait = wait.min(PROBING_WAIT);
        }
        let mut req = ClaimRequest {
            runner: config.name.clone(),
            agents: offered.clone(),
            projects: projects.clone(),
            capacity: config.max_concurrent as u32,
            wait_ms: wait.as_millis() as u64,
            version: Some(env!("CARGO_PKG_VERSION").into()),
            agent_versions: versions.clone(),
            acp_agents: acp_agents.clone(),
            acp_capabilities: changed.then(|| caps.clone()),
            ack: claim_ack,
            holding: if claim_ack {
                ctx.held().iter().cloned().collect()
            } else {
                vec![]
            },
        };
        if let Some(Err(e)) = req.acp_capabilities.as_ref().map(|_| req.validate()) {
            // Each agent's answer was checked when learned; all of them together can still
            // be more than the server takes.
            tracing::warn!(error = %e, "The ACP agents' capabilities are not reported: the server would refuse them.");
            req.acp_capabilities = None;
            caps_sent = Some(caps.clone());
        }
        let claimed = tokio::select! {
            r = client.claim(&req) => r,
            _ = shutdown.stop.cancelled() => break Ok(()),
        };
        if claimed.is_ok() && req.acp_capabilities.is_some() {
            caps_sent = req.acp_capabilities.take();
        }
        match claimed {
            Ok(Some(offer)) => {
                failures = 0;
                // Held before the next claim is built, so that claim lists it. An offer of a
                // task already held (an answer repeated after a lost one crossed our
                // confirmation) is not run twice.
                if !ctx.held().insert(offer.task.id.clone()) {
                    tracing::debug!(task_id = %offer.task.id, "Offered a task this runner already holds; ignored.");
                    continue;
                }
                let ctx = ctx.clone();
                tracker.spawn(async move {
                    let id = offer.task.id.clone();
                    task::run_offer(ctx.clone(), offer).await;
                    ctx.held().remove(&id);
                    drop(permit);
                });
            }
            // A server older than `acp_capabilities` refuses the field, and any server refuses
            // what is past its bounds: claim without it until it changes. (First: an old
            // server's message lists the fields it knows, `ack` among them.)
            Err(ClientError::Api {
                status: 400,
                message,
                ..
            }) if req.acp_capabilities.is_some() && message.contains("acp_capabilities") => {
                tracing::warn!(error = %message, "The server did not take the ACP agents' capabilities; `tunnel acp` answers its baseline.");
                caps_sent = req.acp_capabilities.take();
            }
            // A server older than the claim's `ack` field refuses it: claim without.
            Err(ClientError::Api {
                status: 400,
                message,
                ..
            }) if claim_ack && message.contains("ack") => {
                tracing::info!(error = %message, "The server does not ack in the claim; acking apart.");
                claim_ack = false;
            }
            Ok(None) => failures = 0,
            Err(ClientError::Api {
                status: 401,
                message,
                ..
            }) => break Err(RunnerError::Unauthorized(message)),
            Err(ClientError::Api {
                status: 403,
                message,
                ..
            }) => break Err(RunnerError::Forbidden(message)),
            Err(ClientError::Api {
                status: 400,
                message,
                ..
            }) => break Err(RunnerError::Rejected(message)),
            Err(e) => {
                failures += 1;
                let wait = task::retry_wait(&e, failures).max(config.retry_base);
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "Cannot claim work; retrying.");
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.stop.cancelled() => break Ok(()),
                }
            }
        }
    };

    tracker.close();
    if !tracker.is_empty() {
        tracing::info!(
            grace_secs = config.shutdown_grace.as_secs(),
            "Runner stopping: letting running tasks finish."
        );
    }
    tokio::select! {
        _ = tracker.wait() => {}
        _ = tokio::time::sleep(config.shutdown_grace) => shutdown.abort.cancel(),
        _ = shutdown.abort.cancelled() => {}
    }
    // After an abort, tasks stop their agents and report; wait for that.
    tracker.wait().await;
    warm.close().await;
    if result.is_ok() {
        // Offline at once on the server, rather than "online" for its online window while
        // tasks are submitted to nobody. Best effort: the window still covers a failure.
        match client.goodbye(&config.name).await {
            Ok(()) => tracing::info!("Runner stopped; the server shows it offline."),
            Err(e) => tracing::info!(error = %e, "Runner stopped (the server was not told)."),
        }
    } else {
        tracing::info!("Runner stopped.");
    }
    result
}
