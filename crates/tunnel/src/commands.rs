//! The client subcommands: each is one or two API calls through `tunnel-client`.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tunnel_client::{Client, ClientError, TaskQuery};
use tunnel_protocol::{Role, SessionMode, SubmitTask, TaskState};

use crate::cli::{
    CancelArgs, Cli, ClientArgs, Command, SessionAction, SessionsArgs, SubmitArgs, TasksArgs,
    TokenAction, TokenArgs,
};
use crate::config::{self, ClientSection, FileConfig};
use crate::output::{self, err, out};

const DEFAULT_SERVER: &str = "http://127.0.0.1:3456";

pub(crate) async fn run(cli: Cli) -> Result<ExitCode> {
    let file = FileConfig::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve(crate::cli::ServeCmd {
            service: Some(action),
            ..
        }) => crate::service::service(crate::service::Kind::Server, action, cli.config.as_deref()),
        Command::Runner(crate::cli::RunnerCmd {
            service: Some(action),
            ..
        }) => crate::service::service(crate::service::Kind::Runner, action, cli.config.as_deref()),
        Command::Serve(crate::cli::ServeCmd { args, .. }) => crate::serve::serve(args, file)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Up(crate::cli::UpCmd {
            service: Some(action),
            ..
        }) => crate::service::service(crate::service::Kind::Up, action, cli.config.as_deref()),
        Command::Up(crate::cli::UpCmd { args, .. }) => crate::runner::up(args, file)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Runner(crate::cli::RunnerCmd { args, .. }) => crate::runner::runner(args, file)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Submit(args) => {
            let local: Vec<String> = file.runner.agents.keys().cloned().collect();
            submit(args, &file.client, &local).await
        }
        Command::Watch(args) => {
            let client = connect(&args.client, &file.client)?;
            let limit = match args.timeout {
                Some(s) => WatchLimit::For(Duration::from_secs(s)),
                None => WatchLimit::None,
            };
            let style = style(args.client.json, args.verbose);
            watch(&client, &args.id, args.after, style, limit).await
        }
        Command::Tasks(args) => tasks(args, &file.client).await,
        Command::Cancel(args) => cancel(args, &file.client).await,
        Command::Approvals(args) => {
            let client = connect(&args.client, &file.client)?;
            crate::approvals::list(&client, args).await
        }
        Command::Approve(args) => {
            let client = connect(&args.client, &file.client)?;
            crate::approvals::approve(&client, args).await
        }
        Command::Sessions(args) => sessions(args, &file.client).await,
        Command::Runners(args) => runners(args, &file.client).await,
        Command::Token(args) => token(args, &file.client).await,
        Command::Dashboard(args) => dashboard(args, &file.client).await,
        Command::Acp(args) => crate::acp::run(args, &file).await,
        Command::Doctor(args) => crate::doctor::doctor(args, file).await,
        Command::Init(args) => crate::init::init(args).await.map(|()| ExitCode::SUCCESS),
    }
}

fn style(json: bool, verbose: bool) -> output::Style {
    match (json, verbose) {
        (true, _) => output::Style::Json,
        (false, true) => output::Style::Verbose,
        (false, false) => output::Style::Human,
    }
}

/// Builds the client: flag/env, then `WORKER_URL`/`WORKER_TOKEN`, then the config file, then
/// local defaults (the admin token `tunnel serve` saved on this machine).
pub(crate) fn connect(args: &ClientArgs, file: &ClientSection) -> Result<Client> {
    let server = args
        .server
        .clone()
        .or_else(|| std::env::var("WORKER_URL").ok().filter(|s| !s.is_empty()))
        .or_else(|| file.server.clone())
        .unwrap_or_else(|| DEFAULT_SERVER.into());
    let token = match args
        .token
        .clone()
        .or_else(|| std::env::var("WORKER_TOKEN").ok().filter(|s| !s.is_empty()))
        .or_else(|| file.token.clone())
    {
        Some(t) => t,
        None => match config::local_admin_token_for(&server).map_err(anyhow::Error::msg)? {
            Some(t) => t,
            None => bail!(
                "no API token: pass --token, set TUNNEL_TOKEN, or run `tunnel serve` on this machine once (it saves an admin token to {})",
                config::local_admin_token_path().display()
            ),
        },
    };
    Client::new(&server, &token).map_err(Into::into)
}

/// Adds a hint to the errors a newcomer is most likely to meet.
pub(crate) fn explain(e: ClientError) -> anyhow::Error {
    let hint = match &e {
        ClientError::Transport { .. } => {
            Some("is `tunnel serve` running? Check --server / TUNNEL_URL")
        }
        ClientError::Api { status: 401, .. } => Some("check --token / TUNNEL_TOKEN"),
        ClientError::Api { status: 403, .. } => {
            Some("this needs a token with another role (`tunnel token create --role …`)")
        }
        _ => None,
    };
    match hint {
        Some(h) => anyhow::Error::new(e).context(h.to_owned()),
        None => e.into(),
    }
    .context("request failed")
}

/// `local`: the agents this machine's own runner config offers (`tunnel up` starts that
/// runner, which may not have claimed yet when the first submit comes).
async fn submit(args: SubmitArgs, file: &ClientSection, local: &[String]) -> Result<ExitCode> {
    let client = connect(&args.client, file)?;
    let prompt = if args.prompt.len() == 1 && args.prompt[0] == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the prompt from stdin")?;
        s
    } else {
        args.prompt.join(" ")
    };
    let mut req = SubmitTask::new(args.agent, prompt);
    req.conversation = args.conversation;
    req.project = args.project;
    req.model = args.model;
    req.timeout_ms = args.timeout.map(|s| s.saturating_mul(1000));
    req.max_attempts = args.max_attempts;
    req.approvals = args.approvals.map(|p| match p {
        crate::cli::PolicyArg::Ask => tunnel_protocol::ApprovalPolicy::Ask,
        crate::cli::PolicyArg::Auto => tunnel_protocol::ApprovalPolicy::Auto,
        crate::cli::PolicyArg::Deny => tunnel_protocol::ApprovalPolicy::Deny,
    });
    if let Some(r) = &args.reply_to {
        req.reply_to = Some(parse_reply_to(r)?);
    }
    req.session = match (args.new, args.resume) {
        (true, _) => SessionMode::New,
        (false, Some(id)) => SessionMode::Resume(id),
        (false, None) => SessionMode::Continue,
    };
    // Check here too, so a typo is explained before anything is sent.
    req.validate()
        .map_err(|e| anyhow::anyhow!("invalid task: {e}"))?;
    if !args.queue_anyway {
        check_agent_known(&client, &req.agent, local).await?;
    }
    let task = client
        .submit(&req, args.idempotency_key.as_deref())
        .await
        .map_err(explain)?;
    if args.client.json && !args.watch {
        output::json(&task)?;
    } else if !args.client.json {
        err!(
            "submitted task {} ({})",
            task.id,
            output::state_phrase(&task)
        );
        if task.state == TaskState::Queued {
            warn_if_nobody_can_run(&client, &task).await;
        }
        if !args.watch {
            out!("{}", task.id);
        }
    }
    if args.watch {
        let limit = match args.timeout {
            Some(s) => WatchLimit::Task(Duration::from_secs(s)),
            None => WatchLimit::None,
        };
        let style = style(args.client.json, args.verbose);
        return watch(&client, &task.id, 0, style, limit).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// The agents tunnel knows before any runner has connected.
const BUILT_IN_AGENTS: [&str; 3] = ["claude", "codex", "gemini"];

/// Refuses an agent that no runner has ever offered (a typo waits in the queue forever),
/// suggesting the nearest known name. Before any runner has connected, the built-in agents
/// are the known ones; the agents of this machine's own runner config always are. When the
/// runner list cannot be read, nothing is refused.
async fn check_agent_known(client: &Client, agent: &str, local: &[String]) -> Result<()> {
    if local.iter().any(|a| a == agent) {
        return Ok(());
    }
    let Ok(list) = client.runners().await else {
        return Ok(());
    };
    let mut known: Vec<String> = list
        .runners
        .iter()
        .flat_map(|r| r.agents.iter().cloned())
        .collect();
    if list.runners.is_empty() {
        known = BUILT_IN_AGENTS.iter().map(|s| (*s).to_owned()).collect();
    }
    known.sort();
    known.dedup();
    if known.iter().any(|k| k == agent) {
        return Ok(());
    }
    let nearest = known
        .iter()
        .map(|k| (edit_distance(agent, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| format!(" Did you mean {k}?"))
        .unwrap_or_default();
    let offered = if list.runners.is_empty() {
        format!(
            "no runner has connected yet, and {agent:?} is not a built-in agent ({})",
            known.join(", ")
        )
    } else {
        format!(
            "no runner has ever offered agent {agent:?} (offered: {})",
            known.join(", ")
        )
    };
    bail!(
        "{offered}.{nearest} Nothing was submitted; pass --queue-anyway to queue it for a runner that will offer it."
    )
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A queued task that no connected runner can take waits silently: say so, and why.
async fn warn_if_nobody_can_run(client: &Client, task: &tunnel_protocol::Task) {
    let Ok(list) = client.runners().await else {
        return;
    };
    let online: Vec<_> = list.runners.iter().filter(|r| r.online).collect();
    let fits = |r: &&tunnel_protocol::RunnerInfo| {
        r.agents.contains(&task.agent)
            && task
                .project
                .as_ref()
                .is_none_or(|p| r.projects.iter().any(|x| x == p))
    };
    if online.iter().any(fits) {
        return;
    }
    let wanted = match &task.project {
        Some(p) => format!("agent {} with project {p}", task.agent),
        None => format!("agent {}", task.agent),
    };
    if online.is_empty() {
        err!(
            "note: no runner is connected; the task waits in the queue until one offering {wanted} connects (`tunnel runners`)."
        );
    } else {
        let have: Vec<String> = online
            .iter()
            .map(|r| {
                let projects = if r.projects.is_empty() {
                    String::new()
                } else {
                    format!("; projects {}", r.projects.join(", "))
                };
                format!("{} ({}{projects})", r.name, r.agents.join(", "))
            })
            .collect();
        err!(
            "note: no connected runner offers {wanted}, so the task waits in the queue (connected: {}). Install the agent's CLI on a runner (`tunnel doctor` there) or give it the project, then restart it.",
            have.join("; ")
        );
    }
}

/// `discord:123[:456]`, `telegram:-100123[:7]`, `webhook:ci`.
fn parse_reply_to(s: &str) -> Result<tunnel_protocol::ReplyTo> {
    let mut parts = s.splitn(3, ':');
    let platform = match parts.next() {
        Some("discord") => tunnel_protocol::Platform::Discord,
        Some("telegram") => tunnel_protocol::Platform::Telegram,
        Some("webhook") => tunnel_protocol::Platform::Webhook,
        _ => bail!("--reply-to {s:?}: start with discord:, telegram: or webhook:"),
    };
    let channel = parts
        .next()
        .filter(|c| !c.is_empty())
        .with_context(|| format!("--reply-to {s:?} has no channel"))?;
    Ok(tunnel_protocol::ReplyTo {
        platform,
        channel: channel.to_owned(),
        thread: parts.next().map(str::to_owned),
        message: None,
    })
}

/// How long `watch` follows a task before giving up (the task goes on either way).
#[derive(Debug, Clone, Copy)]
pub(crate) enum WatchLimit {
    None,
    /// `tunnel watch --timeout`: this long, whatever the task does.
    For(Duration),
    /// `tunnel submit --watch --timeout`: this long while the task waits to start; once it runs,
    /// the task's own timeout (the same figure) plus time for its runner to report.
    Task(Duration),
}

/// Exit code when `watch` gives up before the task ended (as timeout(1)).
const EXIT_GAVE_UP: u8 = 124;
/// Exit code after Ctrl-C (128 + SIGINT, as a shell reports it).
const EXIT_INTERRUPTED: u8 = 130;
/// What a runner needs beyond the task's timeout to stop the agent and report.
const REPORT_GRACE: Duration = Duration::from_secs(30);

/// Follows the event stream until the task ends, reconnecting where it left off if the
/// connection drops. Exit 0 if the task succeeded. Ctrl-C or the limit leave the task running
/// and say how to come back to it.
pub(crate) async fn watch(
    client: &Client,
    id: &str,
    after: u64,
    style: output::Style,
    limit: WatchLimit,
) -> Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    // Before anything is printed, so a Ctrl-C from the first line on is ours.
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?;
    let started = tokio::time::Instant::now();
    let mut deadline = match limit {
        WatchLimit::None => None,
        WatchLimit::For(d) | WatchLimit::Task(d) => Some(started + d),
    };
    let task = client.task(id, None).await.map_err(explain)?;
    let mut printer = output::EventPrinter::new(style, &task);
    let json = style == output::Style::Json;
    if !json && after > 0 && matches!(task.state, TaskState::Queued | TaskState::Parked) {
        err!("waiting for {}", printer.waiting_for());
    }
    let mut after = after;
    let mut prompt = crate::approvals::Prompt::new();
    let mut failures = 0u32;
    loop {
        let connected = tokio::select! {
            s = client.event_stream(id, after) => Ok(s),
            _ = interrupt.recv() => Err(Stop::Interrupted),
            _ = sleep_until(deadline) => Err(Stop::Limit),
        };
        let mut stream = match connected {
            Ok(Ok(s)) => s,
            Ok(Err(e @ ClientError::Api { .. })) => return Err(explain(e)),
            Ok(Err(e)) => {
                failures += 1;
                if failures > 30 {
                    return Err(explain(e));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(stop) => match stopped(client, id, stop, limit, &mut deadline, &printer).await? {
                Some(code) => return Ok(code),
                None => continue,
            },
        };
        let mut stop = None;
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                line = prompt.line(), if prompt.asking() => {
                    prompt.answer(client, line).await;
                    continue;
                }
                _ = interrupt.recv() => { stop = Some(Stop::Interrupted); break }
                _ = sleep_until(deadline) => { stop = Some(Stop::Limit); break }
            };
            let Some(item) = item else { break };
            match item {
                Ok(event) => {
                    failures = 0;
                    after = event.seq;
                    printer.print(&event)?;
                    if !json {
                        prompt.on_event(&event);
                    }
                }
                Err(e) => {
                    err!("(stream interrupted: {e}; reconnecting)");
                    break;
                }
            }
        }
        if let Some(stop) = stop {
            match stopped(client, id, stop, limit, &mut deadline, &printer).await? {
                Some(code) => return Ok(code),
                None => continue,
            }
        }
        let task = client.task(id, None).await.map_err(explain)?;
        if task.state.is_terminal() {
            // Events written between the last read and the end are in the log: print them.
            let rest = client.events(id, after).await.map_err(explain)?;
            for e in &rest.events {
                printer.print(e)?;
            }
            printer.finish(&task)?;
            return Ok(if task.state == TaskState::Succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Interrupted,
    Limit,
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Ctrl-C or the limit: if the task still runs, say so and how to come back to it or stop it,
/// and return the exit code; `None` to keep watching (the task ended meanwhile, or it started
/// running and the limit moves to its own timeout).
async fn stopped(
    client: &Client,
    id: &str,
    stop: Stop,
    limit: WatchLimit,
    deadline: &mut Option<tokio::time::Instant>,
    printer: &output::EventPrinter,
) -> Result<Option<ExitCode>> {
    let task = match client.task(id, None).await {
        Ok(t) => t,
        // Interrupted while the server is away: still say how to come back.
        Err(_) if stop == Stop::Interrupted => {
            err!(
                "\nStopped watching. Task {id} may still be running: `tunnel watch {id}` follows it again, `tunnel cancel {id}` stops it."
            );
            return Ok(Some(ExitCode::from(EXIT_INTERRUPTED)));
        }
        Err(e) => return Err(explain(e)),
    };
    if task.state.is_terminal() {
        // The end is in the log: the caller reads it.
        *deadline = None;
        return Ok(None);
    }
    if stop == Stop::Limit
        && let (WatchLimit::Task(d), Some(start)) = (limit, task.started_at)
    {
        // Running: its own timeout applies from its start; wait for that and the report.
        let ends =
            start.saturating_add(i64::try_from((d + REPORT_GRACE).as_millis()).unwrap_or(i64::MAX));
        let left = u64::try_from(ends - output::now_ms()).unwrap_or(0);
        if left > 0 {
            *deadline = Some(tokio::time::Instant::now() + Duration::from_millis(left));
            return Ok(None);
        }
    }
    let what = match task.state {
        TaskState::Queued | TaskState::Parked => {
            format!("is still queued, waiting for {}", printer.waiting_for())
        }
        _ => format!("is still {}", output::state_phrase(&task)),
    };
    let (why, code) = match stop {
        Stop::Interrupted => ("Stopped watching".to_owned(), EXIT_INTERRUPTED),
        Stop::Limit => (
            match limit {
                WatchLimit::For(d) | WatchLimit::Task(d) => {
                    format!("Gave up watching after {} s", d.as_secs())
                }
                WatchLimit::None => "Gave up watching".to_owned(),
            },
            EXIT_GAVE_UP,
        ),
    };
    err!(
        "\n{why}. Task {id} {what}: `tunnel watch {id}` follows it again, `tunnel cancel {id}` stops it."
    );
    Ok(Some(ExitCode::from(code)))
}

async fn tasks(args: TasksArgs, file: &ClientSection) -> Result<ExitCode> {
    let client = connect(&args.client, file)?;
    if let Some(id) = &args.id {
        let task = client.task(id, None).await.map_err(explain)?;
        if args.client.json {
            output::json(&task)?
        } else {
            output::task_detail(&task)
        }
        return Ok(ExitCode::SUCCESS);
    }
    let q = TaskQuery {
        state: args.state,
        conversation: args.conversation,
        agent: args.agent,
        limit: Some(args.limit),
    };
    let tasks = client.tasks(&q).await.map_err(explain)?;
    if args.client.json {
        output::json(&tasks)?
    } else {
        output::task_table(&tasks)
    }
    Ok(ExitCode::SUCCESS)
}

async fn cancel(args: CancelArgs, file: &ClientSection) -> Result<ExitCode> {
    let client = connect(&args.client, file)?;
    let task = client.cancel(&args.id).await.map_err(explain)?;
    if args.client.json {
        output::json(&task)?;
    } else {
        out!("{} {}", task.id, output::state_phrase(&task));
    }
    Ok(ExitCode::SUCCESS)
}

async fn sessions(args: SessionsArgs, file: &ClientSection) -> Result<ExitCode> {
    let client = connect(&args.client, file)?;
    match args.action {
        None => {
            let list = client
                .sessions(args.conversation.as_deref(), args.agent.as_deref())
                .await
                .map_err(explain)?;
            if args.client.json {
                output::json(&list)?
            } else {
                output::sessions(&list)
            }
        }
        Some(SessionAction::New {
            conversation,
            agent,
        }) => {
            let b = client
                .new_session(&conversation, &agent)
                .await
                .map_err(explain)?;
            if args.client.json {
                output::json(&b)?;
            } else {
                out!("{conversation} ({agent}): the next task starts a new session");
            }
        }
        Some(SessionAction::Resume {
            conversation,
            agent,
            runner,
            session_id,
        }) => {
            let b = client
                .resume_session(&conversation, &agent, &session_id, runner.as_deref())
                .await
                .map_err(explain)?;
            if args.client.json {
                output::json(&b)?;
            } else {
                out!(
                    "{conversation} ({agent}): continues session {session_id}{}",
                    b.runner
                        .map(|r| format!(" on runner {r}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn runners(args: ClientArgs, file: &ClientSection) -> Result<ExitCode> {
    let client = connect(&args, file)?;
    let list = client.runners().await.map_err(explain)?;
    if args.json {
        output::json(&list)?
    } else {
        output::runners(&list.runners)
    }
    Ok(ExitCode::SUCCESS)
}

/// A one-time sign-in link to the dashboard; opened in a browser when this machine has one.
async fn dashboard(args: crate::cli::DashboardArgs, file: &ClientSection) -> Result<ExitCode> {
    let client = connect(&args.client, file)?;
    let code = client.dashboard_code().await.map_err(explain)?;
    let link = format!("{}{}", client.base_url(), code.path);
    if args.client.json {
        output::json(&serde_json::json!({"url": link, "expires_in_ms": code.expires_in_ms}))?;
    } else {
        out!("{link}");
        err!(
            "A one-time sign-in link to the dashboard, valid {} s. Or sign in at {}/ui/ with a token.",
            code.expires_in_ms / 1000,
            client.base_url()
        );
    }
    if !args.no_open
        && let Some(opener) = browser_opener()
    {
        // Detached, quiet: the browser outlives this command.
        let started = std::process::Command::new(&opener)
            .arg(&link)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Err(e) = started {
            err!("(could not start {opener}: {e}; open the link yourself)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The program that opens a URL in the user's browser, when there is a screen to show it on:
/// `$BROWSER`, else `open` (macOS) or `xdg-open` with a display.
fn browser_opener() -> Option<String> {
    if let Ok(b) = std::env::var("BROWSER")
        && !b.trim().is_empty()
    {
        return Some(b);
    }
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
    };
    if cfg!(target_os = "macos") && on_path("open") {
        return Some("open".into());
    }
    let display = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    (display && on_path("xdg-open")).then(|| "xdg-open".into())
}

async fn token(args: TokenArgs, file: &ClientSection) -> Result<ExitCode> {
    let client = connect(&args.client, file)?;
    match args.action {
        TokenAction::Create { name, role } => {
            let role = Role::parse(&role)
                .with_context(|| format!("role {role:?} is not client, runner or admin"))?;
            let created = client.create_token(&name, role).await.map_err(explain)?;
            if args.client.json {
                output::json(&created)?;
            } else {
                err!(
                    "created {} token {:?} (id {}); it is shown only now:",
                    role,
                    name,
                    created.info.id
                );
                out!("{}", created.token);
            }
        }
        TokenAction::List => {
            let tokens = client.tokens().await.map_err(explain)?;
            if args.client.json {
                output::json(&tokens)?
            } else {
                output::tokens(&tokens)
            }
        }
        TokenAction::Revoke { id } => {
            let info = client.revoke_token(&id).await.map_err(explain)?;
            if args.client.json {
                output::json(&info)?
            } else {
                out!("revoked token {} ({})", info.id, info.name)
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn edit_distance_finds_typos() {
        use super::edit_distance as d;
        assert_eq!(d("claud", "claude"), 1);
        assert_eq!(d("cluade", "claude"), 2);
        assert_eq!(d("codex", "codex"), 0);
        assert_eq!(d("", "abc"), 3);
    }
}
