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
use crate::output;

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
        Command::Submit(args) => submit(args, &file.client).await,
        Command::Watch(args) => {
            let client = connect(&args.client, &file.client)?;
            watch(&client, &args.id, args.after, args.client.json).await
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

async fn submit(args: SubmitArgs, file: &ClientSection) -> Result<ExitCode> {
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
    let task = client
        .submit(&req, args.idempotency_key.as_deref())
        .await
        .map_err(explain)?;
    if args.client.json && !args.watch {
        output::json(&task)?;
    } else if !args.client.json {
        eprintln!(
            "submitted task {} ({})",
            task.id,
            output::state_phrase(&task)
        );
        if task.state == TaskState::Queued {
            warn_if_nobody_can_run(&client, &task).await;
        }
        if !args.watch {
            println!("{}", task.id);
        }
    }
    if args.watch {
        return watch(&client, &task.id, 0, args.client.json).await;
    }
    Ok(ExitCode::SUCCESS)
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
        eprintln!(
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
        eprintln!(
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

/// Follows the event stream until the task ends, reconnecting where it left off if the
/// connection drops. Exit 0 if the task succeeded.
pub(crate) async fn watch(client: &Client, id: &str, after: u64, json: bool) -> Result<ExitCode> {
    let mut after = after;
    let mut printer = output::EventPrinter::new(json);
    let mut prompt = crate::approvals::Prompt::new();
    let mut failures = 0u32;
    loop {
        let mut stream = match client.event_stream(id, after).await {
            Ok(s) => s,
            Err(e @ ClientError::Api { .. }) => return Err(explain(e)),
            Err(e) => {
                failures += 1;
                if failures > 30 {
                    return Err(explain(e));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                line = prompt.line(), if prompt.asking() => {
                    prompt.answer(client, line).await;
                    continue;
                }
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
                    eprintln!("(stream interrupted: {e}; reconnecting)");
                    break;
                }
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
        println!("{} {}", task.id, output::state_phrase(&task));
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
                println!("{conversation} ({agent}): the next task starts a new session");
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
                println!(
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
        println!("{link}");
        eprintln!(
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
            eprintln!("(could not start {opener}: {e}; open the link yourself)");
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
                eprintln!(
                    "created {} token {:?} (id {}); it is shown only now:",
                    role, name, created.info.id
                );
                println!("{}", created.token);
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
                println!("revoked token {} ({})", info.id, info.name)
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
