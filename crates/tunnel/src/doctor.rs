//! `tunnel doctor`: checks this machine's setup and says how to fix what is wrong.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use tunnel_client::{Client, ClientError};
use tunnel_runner::{AgentKind, RunnerConfig};

use crate::cli::{DoctorArgs, RunnerOpts};
use crate::config::{self, FileConfig};

struct Report {
    problems: u32,
    warnings: u32,
}

impl Report {
    fn ok(&self, what: &str) {
        crate::output::out!("  ok    {what}");
    }

    fn warn(&mut self, what: &str, fix: &str) {
        self.warnings += 1;
        crate::output::out!("  warn  {what}\n        → {fix}");
    }

    fn fail(&mut self, what: &str, fix: &str) {
        self.problems += 1;
        crate::output::out!("  FAIL  {what}\n        → {fix}");
    }
}

pub(crate) async fn doctor(args: DoctorArgs, file: FileConfig) -> Result<ExitCode> {
    let mut r = Report {
        problems: 0,
        warnings: 0,
    };
    let FileConfig { client, runner, .. } = file;

    println!("server");
    let server = args
        .server
        .clone()
        .or_else(|| std::env::var("WORKER_URL").ok().filter(|s| !s.is_empty()))
        .or(runner.server.clone())
        .or(client.server.clone())
        .unwrap_or_else(|| "http://127.0.0.1:3456".into());
    // Where the token came from, so a refused one can be found and replaced.
    let admin_file = config::local_admin_token_path();
    let (token, token_source) = if let Some(t) = args.token.clone() {
        let from = if std::env::var("TUNNEL_TOKEN").is_ok_and(|e| e == t) {
            "TUNNEL_TOKEN"
        } else {
            "--token"
        };
        (Some(t), from.to_owned())
    } else if let Some(t) = std::env::var("WORKER_TOKEN").ok().filter(|s| !s.is_empty()) {
        (Some(t), "WORKER_TOKEN".to_owned())
    } else if let Some(t) = runner.token.clone() {
        (
            Some(t),
            "`token` under [runner] in the config file".to_owned(),
        )
    } else if let Some(t) = client.token.clone() {
        (
            Some(t),
            "`token` under [client] in the config file".to_owned(),
        )
    } else {
        match config::local_admin_token_for(&server) {
            Ok(saved) => (saved, admin_file.display().to_string()),
            Err(why) => {
                r.warn(&why, "pass --token for that server");
                (None, admin_file.display().to_string())
            }
        }
    };
    check_server(&mut r, &server, token.as_deref(), &token_source).await;

    println!("agents");
    // A runner's own config names its server; elsewhere (a server, `tunnel up`) a machine
    // without agent CLIs may be intended.
    let runner_machine =
        runner.server.is_some() || std::env::var("WORKER_URL").is_ok_and(|s| !s.is_empty());
    let opts = RunnerOpts {
        name: None,
        max_concurrent: None,
        projects: vec![],
    };
    match crate::runner::runner_config(server.clone(), token.unwrap_or_default(), &opts, runner) {
        Ok(cfg) => {
            check_agents(&mut r, &cfg, runner_machine).await;
            println!("projects");
            check_projects(&mut r, &cfg);
            println!("containment");
            check_containment(&mut r, &cfg).await;
            println!("protections");
            check_protections(&mut r, &cfg);
        }
        Err(e) => r.fail(
            &format!("the [runner] config is invalid: {e:#}"),
            "fix the config file",
        ),
    }

    println!("delivery");
    check_delivery(&mut r);

    println!();
    match (r.problems, r.warnings) {
        (0, 0) => println!("All good."),
        (0, w) => println!("No problems; {w} warning(s)."),
        (p, w) => println!("{p} problem(s), {w} warning(s)."),
    }
    Ok(if r.problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn check_server(r: &mut Report, server: &str, token: Option<&str>, source: &str) {
    let client = match Client::new(server, token.unwrap_or("-")) {
        Ok(c) => c,
        Err(e) => {
            return r.fail(
                &format!("{e}"),
                "set --server / WORKER_URL to http(s)://host:port",
            );
        }
    };
    let started = std::time::Instant::now();
    match client.health().await {
        Ok(_) => r.ok(&format!(
            "{server} answers ({} ms)",
            started.elapsed().as_millis()
        )),
        Err(ClientError::Api { status, .. }) => {
            return r.fail(
                &format!(
                    "{server} answers HTTP {status} on /healthz: that is not a tunnel server"
                ),
                "check the URL and port; behind a reverse proxy, check that it forwards to `tunnel serve` (a 502 means the server behind it is down)",
            );
        }
        Err(e) => {
            let local = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                .iter()
                .any(|p| server.starts_with(p));
            let fix = if local {
                "start it here with `tunnel up` (or `tunnel serve`), or fix --server / WORKER_URL / `server` in the config file"
            } else {
                "check that the server runs and that this URL reaches it from here (firewall, proxy, DNS); fix --server / WORKER_URL / `server` in the config file"
            };
            return r.fail(&format!("{server} does not answer: {e}"), fix);
        }
    }
    if let Some(skew) = clock_skew(server).await {
        if skew.as_secs() >= 5 {
            r.warn(
                &format!("this machine's clock is {} s off the server's", skew.as_secs()),
                "enable NTP (timedatectl set-ntp true); leases and parked times use the server's clock",
            );
        } else {
            r.ok("clocks agree");
        }
    }
    let Some(_) = token else {
        return r.fail(
            "no token",
            "set WORKER_TOKEN or --token, or run `tunnel init` (a token is made on the server with `tunnel token create`)",
        );
    };
    match client
        .tasks(&tunnel_client::TaskQuery {
            limit: Some(1),
            ..Default::default()
        })
        .await
    {
        Ok(_) => {
            // Listing tokens is for admins only: that tells the two roles apart.
            let role = match client.tokens().await {
                Ok(_) => "admin: every command, token management included",
                Err(_) => "client: submits and reads its own tasks",
            };
            r.ok(&format!("the token from {source} is valid; its role is {role}"));
            // What a client needs next: somebody to run its tasks.
            if let Ok(list) = client.runners().await {
                let online: Vec<String> = list
                    .runners
                    .iter()
                    .filter(|x| x.online)
                    .map(|x| format!("{} ({})", x.name, x.agents.join(", ")))
                    .collect();
                if online.is_empty() {
                    r.warn(
                        "no runner is connected, so tasks wait in the queue",
                        "start one: `tunnel runner` on a machine with the agent CLIs (`tunnel init --scenario runner` sets it up), or `tunnel up` here",
                    );
                } else {
                    r.ok(&format!("runners online: {}", online.join("; ")));
                }
            }
        }
        Err(ClientError::Api { status: 403, .. }) => r.ok(&format!(
            "the token from {source} is valid; its role is runner: claims and runs tasks, cannot submit"
        )),
        Err(ClientError::Api { status: 401, .. }) => r.fail(
            &format!("the server refuses the token from {source} (401: unknown, mistyped or revoked)"),
            "make a new one on the server (`tunnel token create --role runner --name NAME`, or --role client for the CLI and the plugin) and put it there; `tunnel token list` on the server shows which tokens exist",
        ),
        Err(e) => r.fail(
            &format!("the token check failed: {e}"),
            "see the server's log",
        ),
    }
}

/// How far the server's `Date` header is from this machine's clock.
async fn clock_skew(server: &str) -> Option<Duration> {
    let out = tokio::process::Command::new("curl")
        .env_clear()
        .envs(tunnel_runner::confine::child_env())
        .args([
            "-sI",
            "--max-time",
            "5",
            &format!("{}/healthz", server.trim_end_matches('/')),
        ])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let date = text.lines().find_map(|l| {
        l.strip_prefix("date: ")
            .or_else(|| l.strip_prefix("Date: "))
    })?;
    let server_secs = parse_http_date(date.trim())?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
    Some(Duration::from_secs(server_secs.abs_diff(now)))
}

/// `Wed, 25 Nov 2026 14:22:05 GMT` → Unix seconds.
fn parse_http_date(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, _] = parts.as_slice() else {
        return None;
    };
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = months.iter().position(|x| x == month)? as i64 + 1;
    let (d, y): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let t: Vec<i64> = time.split(':').filter_map(|x| x.parse().ok()).collect();
    let [hh, mm, ss] = t.as_slice() else {
        return None;
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

async fn check_agents(r: &mut Report, cfg: &RunnerConfig, runner_machine: bool) {
    // `echo` is only a smoke test: a runner whose every real agent is missing can do no work.
    let usable = cfg
        .agents
        .iter()
        .filter(|(name, a)| name.as_str() != "echo" && (find(&a.program).is_some() || acp_only(a)))
        .count();
    // A declared custom agent that is missing fails on its own line below.
    let custom = cfg
        .agents
        .iter()
        .any(|(name, a)| name != "echo" && a.kind == AgentKind::Custom);
    if usable == 0 && !custom {
        let what = "no agent CLI is installed: a runner here can run only the `echo` test agent";
        let fix = "install one (`npm install -g @anthropic-ai/claude-code`, `@openai/codex` or `@google/gemini-cli`), or declare a custom agent under [runner.agents.NAME]";
        if runner_machine {
            r.fail(what, fix);
        } else {
            r.warn(what, fix);
        }
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    for (name, agent) in &cfg.agents {
        check_acp(r, name, agent).await;
        // An ACP agent, or a built-in one that always runs through its adapter, needs no
        // print-mode CLI.
        if agent.kind == AgentKind::Acp || acp_only(agent) {
            continue;
        }
        let Some(path) = find(&agent.program) else {
            let level = if agent.kind == AgentKind::Custom {
                "FAIL"
            } else {
                "warn"
            };
            let what = format!("{name}: `{}` not found", agent.program);
            if level == "FAIL" {
                r.fail(&what, &agent.install_hint());
            } else {
                r.warn(&what, &agent.install_hint());
            }
            continue;
        };
        let version = if agent.kind == AgentKind::Custom {
            None
        } else {
            version(&path).await
        };
        r.ok(&format!(
            "{name}: {}{}",
            path.display(),
            version.map(|v| format!(" ({v})")).unwrap_or_default()
        ));
        let env = |k: &str| {
            agent
                .env
                .get(k)
                .cloned()
                .or_else(|| std::env::var(k).ok())
                .filter(|v| !v.is_empty())
        };
        let logged_in = match agent.kind {
            AgentKind::Claude => Some(
                env("ANTHROPIC_API_KEY").is_some()
                    || env("CLAUDE_CODE_OAUTH_TOKEN").is_some()
                    || home.join(".claude/.credentials.json").exists(),
            ),
            AgentKind::Codex => Some(
                env("CODEX_API_KEY").is_some()
                    || env("OPENAI_API_KEY").is_some()
                    || home.join(".codex/auth.json").exists(),
            ),
            AgentKind::Gemini => Some(
                env("GEMINI_API_KEY").is_some()
                    || env("GOOGLE_API_KEY").is_some()
                    || home.join(".gemini/oauth_creds.json").exists(),
            ),
            AgentKind::Custom | AgentKind::Shell | AgentKind::Files | AgentKind::Acp => None,
        };
        if logged_in == Some(false) {
            r.warn(
                &format!("{name}: no login found"),
                &format!(
                    "log in once: run `{}` interactively, or set its API key",
                    agent.program
                ),
            );
        }
        let root = nix::unistd::Uid::effective().is_root();
        if agent.kind == AgentKind::Claude
            && root
            && agent
                .args
                .iter()
                .any(|a| a == "--dangerously-skip-permissions")
            && agent.env.get("IS_SANDBOX").map(String::as_str) != Some("1")
        {
            r.warn(
                "claude: running as root, Claude refuses to skip permissions",
                "in a sandbox, set IS_SANDBOX = \"1\" under [runner.agents.claude] env; else run the runner as a normal user",
            );
        }
    }
}

/// Which mechanism makes everything an agent starts end with its task.
async fn check_containment(r: &mut Report, cfg: &RunnerConfig) {
    let choice = cfg.containment;
    let mech = tokio::task::spawn_blocking(move || tunnel_runner::contain::detect(choice))
        .await
        .unwrap_or_else(|e| tunnel_runner::Mechanism::ProcessTree(e.to_string()));
    if mech.is_complete() {
        r.ok(&mech.to_string());
    } else {
        r.warn(
            &mech.to_string(),
            "run the runner where it can create a cgroup v2 (a systemd user service: `tunnel install-service`; or as root)",
        );
    }
}

fn check_projects(r: &mut Report, cfg: &RunnerConfig) {
    if cfg.projects.is_empty() {
        r.ok(&format!(
            "no projects; tasks run in {}",
            cfg.default_dir.display()
        ));
    }
    for (name, dir) in &cfg.projects {
        if dir.is_dir() {
            r.ok(&format!("{name}: {}", dir.display()));
        } else {
            r.fail(
                &format!("{name}: {} is not a directory", dir.display()),
                "fix [runner.projects] or --project",
            );
        }
    }
}

/// What keeps an agent away from tunnel's credentials on this machine.
fn check_protections(r: &mut Report, cfg: &RunnerConfig) {
    match crate::sandbox::is_not_dumpable() {
        Some(true) => r.ok("non-dumpable: other processes of this user cannot read tunnel's environment or memory (/proc/PID/environ, /proc/PID/mem); root still can"),
        Some(false) => r.warn("tunnel is dumpable", "PR_SET_DUMPABLE failed; see the warning printed at start"),
        None => r.warn(
            "non-dumpable: unavailable on this OS",
            "agents of this user may read tunnel's memory; run the runner as a dedicated user",
        ),
    }
    let withheld: Vec<String> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| tunnel_runner::confine::is_withheld(k))
        .map(|k| k.to_string_lossy().into_owned())
        .collect();
    r.ok(&format!(
        "environment scrubbed: agents never get tunnel's variables{}",
        if withheld.is_empty() {
            String::new()
        } else {
            format!(" (withheld here: {})", withheld.join(", "))
        }
    ));
    match (crate::sandbox::landlock_abi(), cfg.confine.deny.is_empty()) {
        (Ok(abi), false) => r.ok(&format!(
            "Landlock ABI {abi}: agents cannot read or change {}",
            cfg.confine
                .deny
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        (Ok(abi), true) => r.warn(
            &format!("Landlock ABI {abi} is available but `sandbox = false`: agents can read tunnel's tokens"),
            "remove `sandbox = false` from [runner]",
        ),
        (Err(why), _) => r.warn(
            &format!("Landlock unavailable: {why}"),
            "agents can read what this user can (admin token, config): run the runner as a dedicated user with only its projects",
        ),
    }
    let root = nix::unistd::Uid::effective().is_root();
    match (&cfg.confine.run_as, root) {
        (Some(u), _) => r.ok(&format!("agents run as user {} (uid {})", u.name, u.uid)),
        (None, true) => r.warn(
            "running as root without run_as: an agent is root and can read any process's memory and any file",
            "set run_as = \"USER\" under [runner], or run the runner as a normal user",
        ),
        (None, false) => r.ok("agents run as this user"),
    }
}

fn check_delivery(r: &mut Report) {
    let config = tunnel_delivery::PlatformsConfig::from_env();
    let any = config.discord.is_some() || config.telegram.is_some() || !config.webhooks.is_empty();
    match tunnel_delivery::Platforms::new(config.clone()) {
        Err(e) => r.fail(&e.to_string(), "fix the bot token / webhook variables"),
        Ok(_) if !any => r.ok("no bot configured (answers go through the plugin or the API)"),
        Ok(_) => {
            if config.discord.is_some() {
                r.ok("Discord bot token set (CALLBACK_BOT_TOKEN)");
            }
            if config.telegram.is_some() {
                r.ok("Telegram bot token set (TELEGRAM_BOT_TOKEN)");
            }
            for name in config.webhooks.keys() {
                r.ok(&format!("webhook {name}"));
            }
        }
    }
}

/// Whether the agent runs only through its ACP adapter here (approvals other than `auto`,
/// adapter installed).
fn acp_only(agent: &tunnel_runner::AgentConfig) -> bool {
    agent.approvals != tunnel_runner::ApprovalPolicy::Auto
        && agent
            .acp
            .as_ref()
            .is_some_and(|l| find(&l.program).is_some())
}

/// An ACP agent (or the adapter of a built-in one): found, its version, and an `initialize`
/// round trip (protocol version, agent name).
async fn check_acp(r: &mut Report, name: &str, agent: &tunnel_runner::AgentConfig) {
    use tunnel_runner::ApprovalPolicy;
    let (program, args, needed, hint) = match (agent.kind, &agent.acp) {
        (AgentKind::Acp, _) => (
            agent.program.clone(),
            agent.args.clone(),
            true,
            agent.install_hint(),
        ),
        (_, Some(l)) => (
            l.program.clone(),
            l.args.clone(),
            agent.approvals != ApprovalPolicy::Auto,
            agent.acp_install_hint().unwrap_or_default().to_owned(),
        ),
        _ => return,
    };
    let Some(path) = find(&program) else {
        if needed {
            r.fail(&format!("{name} (ACP): `{program}` not found"), &hint);
        } else {
            // Only tasks that ask for approvals need it: not a problem, but say how to get it.
            r.ok(&format!(
                "{name} (ACP): `{program}` not installed; needed for approvals = \"ask\" or \"deny\" ({hint})"
            ));
        }
        return;
    };
    // A generic ACP agent may not know `--version` (it could wait on stdin): only the known
    // adapters are asked.
    let version = match agent.kind {
        AgentKind::Acp => None,
        _ => version(&path).await,
    };
    let shown = format!(
        "{name} (ACP): {}{}",
        path.display(),
        version.map(|v| format!(" ({v})")).unwrap_or_default()
    );
    let probe = tunnel_runner::acp_probe(
        &path.display().to_string(),
        &args,
        &agent.env,
        &std::env::temp_dir(),
        Duration::from_secs(30),
    )
    .await;
    match probe {
        Ok(p) if p.protocol_version == 1 => r.ok(&format!(
            "{shown}; initialize: ACP v1, {} {}",
            p.agent_name.as_deref().unwrap_or("(unnamed agent)"),
            p.agent_version.as_deref().unwrap_or("")
        )),
        Ok(p) => r.fail(
            &format!("{shown} speaks ACP version {}", p.protocol_version),
            "tunnel speaks ACP version 1: install a version of the agent that does",
        ),
        Err(e) => {
            let what = format!("{shown}: no ACP answer ({e})");
            let fix = format!(
                "run `{program} {}` by hand: it should wait for JSON-RPC on stdin",
                args.join(" ")
            );
            if needed {
                r.fail(&what, &fix);
            } else {
                r.warn(&what, &fix);
            }
        }
    }
}

fn find(program: &str) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|c| c.is_file())
}

async fn version(path: &Path) -> Option<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(path)
            .env_clear()
            .envs(tunnel_runner::confine::child_env())
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_dates() {
        assert_eq!(
            super::parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(0)
        );
        assert_eq!(
            super::parse_http_date("Wed, 25 Nov 2026 14:22:05 GMT"),
            Some(1_795_616_525)
        );
        assert_eq!(super::parse_http_date("garbage"), None);
    }
}
