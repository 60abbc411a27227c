//! `tunnel runner` and `tunnel up`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tunnel_runner::{AgentConfig, AgentKind, RunnerConfig, Shutdown};

use crate::cli::{RunnerArgs, RunnerOpts, UpArgs};
use crate::config::{self, FileConfig, RunnerSection};
use crate::serve;

/// Reads a duration in milliseconds from a seed env name (`LONG_POLL_WAIT`, `CC_TIMEOUT`, …).
fn env_ms(name: &str) -> Result<Option<Duration>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            let ms: u64 = v
                .trim()
                .parse()
                .with_context(|| format!("{name}={v:?} is not a number of milliseconds"))?;
            Ok(Some(Duration::from_millis(ms)))
        }
        _ => Ok(None),
    }
}

/// The runner's configuration: flags, then env (the original's names), then `[runner]` in the
/// config file, then defaults.
pub(crate) fn runner_config(
    server: String,
    token: String,
    opts: &RunnerOpts,
    file: RunnerSection,
) -> Result<RunnerConfig> {
    let data = config::data_dir();
    let mut c = RunnerConfig::new(server, token, data.clone());
    let (sandbox, run_as, config_file) =
        (file.sandbox, file.run_as.clone(), file.config_file.clone());
    c.files_write_vcs = file.files_write_vcs.unwrap_or(false);
    if let Some(n) = opts.name.clone().or(file.name) {
        c.name = n;
    }
    if let Some(m) = opts.max_concurrent.or(file.max_concurrent) {
        if !(1..=50).contains(&m) {
            bail!("max concurrent tasks must be 1 to 50 (got {m})");
        }
        c.max_concurrent = m;
    }
    if let Some(w) = env_ms("LONG_POLL_WAIT")?.or(file.long_poll_wait_secs.map(Duration::from_secs))
    {
        c.long_poll_wait = w.clamp(Duration::from_secs(1), Duration::from_secs(60));
    }
    if let Some(a) = file.ack_in_claim {
        c.ack_in_claim = a;
    }
    if let Some(p) = env_ms("POLL_INTERVAL")? {
        c.retry_base = p.clamp(Duration::from_millis(50), Duration::from_secs(60));
    }
    if let Some(t) = env_ms("CC_TIMEOUT")?.or(file.default_timeout_secs.map(Duration::from_secs)) {
        c.default_timeout = t;
    }
    if let Some(g) = file.shutdown_grace_secs {
        c.shutdown_grace = Duration::from_secs(g);
    }
    if let Some(w) = file.work_dir {
        c.default_dir = w;
    }
    if let Some(s) = file.spool_dir {
        c.spool_dir = s;
    }
    if let Some(t) = file.approval_timeout_secs {
        let ms = t.saturating_mul(1000);
        let limits = tunnel_protocol::approval_limits::TIMEOUT_MIN_MS
            ..=tunnel_protocol::approval_limits::TIMEOUT_MAX_MS;
        if !limits.contains(&ms) {
            bail!("approval_timeout_secs must be 1 to 86400 (got {t})");
        }
        c.approval_timeout = Duration::from_millis(ms);
    }
    if let Some(k) = file.containment {
        c.containment = k;
    }
    c.projects = file.projects;
    for p in &opts.projects {
        let (name, dir) = p
            .split_once('=')
            .with_context(|| format!("--project {p:?} is not NAME=DIR"))?;
        tunnel_protocol::validate_name("project", name).map_err(anyhow::Error::msg)?;
        c.projects.insert(name.to_owned(), PathBuf::from(dir));
    }
    for (name, dir) in &c.projects {
        tunnel_protocol::validate_name("project", name).map_err(anyhow::Error::msg)?;
        if !dir.is_dir() {
            bail!("project {name}: {} is not a directory", dir.display());
        }
    }
    for (env, agent) in [
        ("CLAUDE_PATH", "claude"),
        ("CODEX_PATH", "codex"),
        ("GEMINI_PATH", "gemini"),
    ] {
        if let Ok(path) = std::env::var(env)
            && !path.is_empty()
            && let Some(a) = c.agents.get_mut(agent)
        {
            a.program = path;
        }
    }
    for (name, section) in file.agents {
        tunnel_protocol::validate_name("agent", &name).map_err(anyhow::Error::msg)?;
        if section.enabled == Some(false) {
            c.agents.remove(&name);
            continue;
        }
        let kind = section
            .kind
            .or(c.agents.get(&name).map(|a| a.kind))
            .unwrap_or(AgentKind::Custom);
        let mut agent = c
            .agents
            .remove(&name)
            .filter(|a| a.kind == kind)
            .unwrap_or_else(|| AgentConfig::builtin(kind, name.clone()));
        let has_program = section.program.is_some();
        if let Some(p) = section.program {
            agent.program = p;
        }
        if let Some(cmd) = section.command {
            agent.command = cmd;
            if let Some(why) = agent.prompt_as_option() {
                bail!("custom agent {name}: {why}");
            }
        }
        if kind == AgentKind::Acp && !has_program {
            bail!(
                "ACP agent {name}: set `program` (and `args`), e.g. program = \"claude-agent-acp\" or program = \"gemini\", args = [\"--acp\"]"
            );
        }
        if kind == AgentKind::Custom && agent.command.is_empty() && agent.program == name {
            bail!(
                "custom agent {name}: set `program` and `command` (use {{prompt}} where the prompt goes, or leave it out to send it on stdin)"
            );
        }
        if let Some(a) = section.args {
            agent.args = a;
        }
        if let Some(m) = section.models {
            agent.models = m;
        }
        if let Some(o) = section.output {
            agent.output = o;
        }
        agent.env.extend(section.env);
        if let Some(a) = section.approvals {
            agent.approvals = a;
        }
        if section.acp_program.is_some() || section.acp_args.is_some() {
            let Some(launch) = agent.acp.as_mut() else {
                bail!(
                    "agent {name}: acp_program / acp_args are for the built-in agents (claude, codex, gemini); an ACP agent of its own is kind = \"acp\" with program and args"
                );
            };
            if let Some(p) = section.acp_program {
                launch.program = p;
            }
            if let Some(a) = section.acp_args {
                launch.args = a;
            }
        }
        if let Some(m) = section.acp_mode {
            agent.acp_mode = Some(m);
        }
        if agent.approvals != tunnel_runner::ApprovalPolicy::Auto
            && agent.acp.is_none()
            && kind != AgentKind::Acp
        {
            bail!(
                "agent {name}: approvals = \"{}\" needs an agent that can ask (kind = \"acp\", or claude, codex, gemini through their ACP adapter)",
                agent.approvals.as_str()
            );
        }
        c.agents.insert(name, agent);
    }
    c.confine = confinement(&c, sandbox, run_as.as_deref(), config_file.as_deref())?;
    Ok(c)
}

/// How agents are confined beyond a clean environment: Landlock closes tunnel's data and
/// config directories to them (when the kernel has it and `sandbox = false` is not set), and
/// `run_as` runs them as another user.
fn confinement(
    c: &RunnerConfig,
    sandbox: Option<bool>,
    run_as: Option<&str>,
    config_file: Option<&std::path::Path>,
) -> Result<tunnel_runner::Confinement> {
    let mut contain = tunnel_runner::Confinement::default();
    let exe = || {
        std::env::current_exe()
            .context("cannot find the tunnel binary to start agents through its wrapper")
    };
    if let Some(user) = run_as {
        contain.run_as = Some(tunnel_runner::RunAs::lookup(user).map_err(anyhow::Error::msg)?);
        // The wrapper changes user after the agent entered its task's cgroup.
        contain.wrapper = Some(exe()?);
    }
    if sandbox == Some(false) {
        return Ok(contain);
    }
    match crate::sandbox::landlock_abi() {
        Ok(_) => {
            contain.wrapper = Some(exe()?);
            let config_dir = config::default_config_path();
            contain.deny = [
                Some(config::data_dir()),
                config_dir.parent().map(PathBuf::from),
                config_file.map(PathBuf::from),
                Some(c.spool_dir.clone()),
            ]
            .into_iter()
            .flatten()
            .collect();
            // Shortest first, so a path inside one already denied is dropped.
            contain.deny.sort_by_key(|p| p.components().count());
            let mut kept: Vec<PathBuf> = Vec::new();
            for d in std::mem::take(&mut contain.deny) {
                if !kept.iter().any(|k| d.starts_with(k)) {
                    kept.push(d);
                }
            }
            contain.deny = kept;
        }
        Err(why) => tracing::debug!(%why, "Landlock is unavailable."),
    }
    Ok(contain)
}

pub(crate) async fn runner(args: RunnerArgs, file: FileConfig) -> Result<()> {
    serve::init_logging(args.log_format.unwrap_or(crate::cli::LogFormat::Text));
    let section = file.runner;
    let server = args
        .server
        .or(section.server.clone())
        .unwrap_or_else(|| "http://127.0.0.1:3456".into());
    let from_file = args.token.is_none() && section.token.is_some();
    let token = match args.token.or(section.token.clone()) {
        Some(t) => t,
        None => bail!(
            "no runner token: set WORKER_TOKEN or --token (create one with `tunnel token create --role runner --name NAME`)"
        ),
    };
    let config = runner_config(server, token, &args.opts, section)?;
    // The spool and the default work directory hold prompts and answers.
    config::private_dir(&config::data_dir())?;
    log_containment(&config);
    let shutdown = Shutdown::default();
    tokio::spawn(signals(shutdown.clone()));
    tunnel_runner::run(config, shutdown)
        .await
        .context(if from_file {
            "the runner stopped (its token is `token` under [runner] in the config file)"
        } else {
            "the runner stopped"
        })
}

/// First SIGTERM/SIGINT: stop claiming and let tasks finish; a second SIGINT: stop them now.
async fn signals(shutdown: Shutdown) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("Cannot listen for signals.");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!(
        "Stopping: no new tasks; running ones may finish (Ctrl-C again to stop them now)."
    );
    shutdown.stop.cancel();
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::warn!("Stopping running tasks now.");
    shutdown.abort.cancel();
}

pub(crate) async fn up(args: UpArgs, file: FileConfig) -> Result<()> {
    let FileConfig {
        server,
        client,
        runner: runner_section,
        ..
    } = file;
    let prepared = serve::prepare(
        args.serve,
        FileConfig {
            server,
            client,
            runner: RunnerSection::default(),
            acp: Default::default(),
        },
        true,
    )
    .await?;
    let url = format!("http://{}", prepared.server.local_addr());
    let token = prepared.server.local_runner_token();
    let mut config = runner_config(url.clone(), token, &args.runner, runner_section)?;
    // One machine, one runner: a task for a missing CLI should fail and say what to install.
    config.offer_missing_agents = true;
    log_containment(&config);

    let server_stop = prepared.server.shutdown_token();
    let shutdown = Shutdown::default();
    tokio::spawn(signals(shutdown.clone()));
    serve::release_startup_pages();
    let server = tokio::spawn(prepared.server.run());
    let hint = if url.ends_with(":3456") {
        String::new()
    } else {
        format!(" --server {url}")
    };
    eprintln!(
        "\ntunnel is up at {url} with a local runner ({}).\nDashboard: {url}/ui/ (sign in with `tunnel dashboard{hint}`)\nTry:\n\n  tunnel submit{hint} --agent echo --watch hello\n  tunnel submit{hint} --agent claude --watch \"what is in this directory?\"\n",
        config.name
    );
    let result = tunnel_runner::run(config, shutdown).await;
    server_stop.cancel();
    server
        .await
        .context("the server task failed")?
        .context("the server failed")?;
    result.context("the runner stopped")
}

/// Says once, at start, what keeps agents away from tunnel's secrets.
fn log_containment(c: &RunnerConfig) {
    let user = c.confine.run_as.as_ref().map(|u| u.name.as_str());
    match (c.confine.deny.is_empty(), crate::sandbox::landlock_abi()) {
        (false, Ok(abi)) => tracing::info!(
            landlock_abi = abi,
            run_as = user,
            denied = ?c.confine.deny,
            "Agents are confined: tunnel's files are closed to them (Landlock)."
        ),
        (true, Ok(_)) => tracing::warn!(
            run_as = user,
            "Agents are not sandboxed (`sandbox = false`): they can read what this user can, tunnel's tokens included."
        ),
        (_, Err(why)) => tracing::warn!(
            run_as = user,
            %why,
            "Agents are not sandboxed: they can read what this user can, tunnel's tokens included; run the runner as a dedicated user."
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<RunnerConfig> {
        let file: FileConfig = toml::from_str(toml_text).unwrap();
        let opts = RunnerOpts {
            name: Some("t".into()),
            max_concurrent: None,
            projects: vec![],
        };
        runner_config("http://127.0.0.1:1".into(), "x".into(), &opts, file.runner)
    }

    #[test]
    fn acp_agents_and_approval_policies_come_from_the_config() {
        let c = parse(
            r#"
            [runner]
            approval_timeout_secs = 120
            [runner.agents.claude]
            approvals = "ask"
            acp_program = "/opt/claude-agent-acp"
            [runner.agents.qwen]
            kind = "acp"
            program = "qwen"
            args = ["--acp"]
            approvals = "deny"
            "#,
        )
        .unwrap();
        assert_eq!(c.approval_timeout, Duration::from_secs(120));
        let claude = &c.agents["claude"];
        assert_eq!(claude.approvals, tunnel_runner::ApprovalPolicy::Ask);
        assert_eq!(
            claude.acp.as_ref().unwrap().program,
            "/opt/claude-agent-acp"
        );
        assert_eq!(claude.acp_mode.as_deref(), Some("default"));
        let qwen = &c.agents["qwen"];
        assert_eq!(qwen.kind, AgentKind::Acp);
        assert_eq!(qwen.args, vec!["--acp"]);
        // Untouched built-ins keep auto and their adapters.
        assert_eq!(
            c.agents["codex"].approvals,
            tunnel_runner::ApprovalPolicy::Auto
        );
        assert_eq!(c.agents["codex"].acp.as_ref().unwrap().program, "codex-acp");
    }

    #[test]
    fn a_policy_an_agent_cannot_keep_is_refused() {
        let e = parse(
            r#"
            [runner.agents.mine]
            program = "my-agent"
            command = ["--", "{prompt}"]
            approvals = "ask"
            "#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("needs an agent that can ask"), "{e}");
        let e = parse("[runner.agents.x]\nkind = \"acp\"\n").unwrap_err();
        assert!(e.to_string().contains("set `program`"), "{e}");
        let e = parse("[runner.agents.echo]\nacp_program = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("for the built-in agents"), "{e}");
        let e = parse("[runner]\napproval_timeout_secs = 0\n").unwrap_err();
        assert!(e.to_string().contains("approval_timeout_secs"), "{e}");
        assert!(
            toml::from_str::<FileConfig>("[runner.agents.claude]\napprovals = \"maybe\"\n")
                .is_err()
        );
    }
}
