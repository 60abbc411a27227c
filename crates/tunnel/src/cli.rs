//! The command line. Every option can also come from the environment (names of the original
//! openclaw-tunnel where it had one) or from the config file; flags win over env, env over file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tunnel",
    version,
    about = "Hand coding tasks from chat to AI coding agents on another machine."
)]
pub(crate) struct Cli {
    /// Config file (TOML). Default: ~/.config/tunnel/tunnel.toml (the one `tunnel init`
    /// writes), if present; a tunnel.toml in the current directory is never read implicitly.
    #[arg(long, global = true, env = "TUNNEL_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Set up this machine: config file, tokens, and the next command to run.
    Init(InitArgs),
    /// Server and a local runner in one process: the quickest start.
    Up(UpCmd),
    /// Run the server (API, queue, event streams) on SQLite or PostgreSQL.
    Serve(ServeCmd),
    /// Run a runner: claim tasks from a server and run agent CLIs on this machine.
    Runner(RunnerCmd),
    /// Submit a task.
    Submit(SubmitArgs),
    /// Follow a task's events live until it ends (exit 0 if it succeeded).
    Watch(WatchArgs),
    /// List tasks, or show one.
    Tasks(TasksArgs),
    /// Cancel a task.
    Cancel(CancelArgs),
    /// List what agents are waiting for you to approve (pending; --all for every state).
    Approvals(ApprovalsArgs),
    /// Answer an agent's approval request: allow once (default), for the session, or deny.
    Approve(ApproveArgs),
    /// Show or change which agent session a conversation continues.
    Sessions(SessionsArgs),
    /// List the runners the server has seen.
    Runners(ClientArgs),
    /// Create, list and revoke API tokens (admin).
    Token(TokenArgs),
    /// Print a sign-in link to the web dashboard (a one-time code, not the token) and open it
    /// in a browser when one is available.
    Dashboard(DashboardArgs),
    /// Be an ACP agent on stdio for an editor or acpx: each prompt runs as a task on a remote
    /// runner (its updates streamed back, approvals forwarded), and survives disconnects.
    Acp(AcpArgs),
    /// Check this machine's setup (server, token, agent CLIs, projects, bots) and say how to
    /// fix what is wrong.
    Doctor(DoctorArgs),
}

/// The three deployment scenarios.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum Scenario {
    /// Everything on this machine (`tunnel up`).
    Local,
    /// This machine is the server; runners connect from elsewhere.
    Server,
    /// This machine runs agents for a server elsewhere.
    Runner,
}

#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// Which setup [default: asked, or local with --yes].
    #[arg(long, value_enum)]
    pub(crate) scenario: Option<Scenario>,
    /// For a runner: the server's URL.
    #[arg(long)]
    pub(crate) server: Option<String>,
    /// For a runner: its token (printed by `tunnel init` on the server, or `tunnel token create
    /// --role runner` there); checked with the server before anything is written.
    #[arg(long, hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// For a server: the URL runners and OpenClaw will use (https:// behind a TLS proxy, or
    /// http://ADDRESS:3456 on a private network); needed with --yes.
    #[arg(long)]
    pub(crate) public_url: Option<String>,
    /// For a runner: its name [default: the host name].
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// A project, as NAME=DIR (repeat for more).
    #[arg(long = "project", value_name = "NAME=DIR")]
    pub(crate) projects: Vec<String>,
    /// Ask nothing; use the flags and defaults.
    #[arg(long, short)]
    pub(crate) yes: bool,
    /// Replace an existing config without asking (tokens already handed out keep working).
    #[arg(long)]
    pub(crate) force: bool,
    /// Where to write [default: ~/.config/tunnel/tunnel.toml].
    #[arg(long)]
    pub(crate) output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Server URL [default: TUNNEL_URL, WORKER_URL, the config file, then
    /// http://127.0.0.1:3456].
    #[arg(long, env = "TUNNEL_URL")]
    pub(crate) server: Option<String>,
    /// Token [default: TUNNEL_TOKEN, WORKER_TOKEN, the config file, then the local admin token].
    #[arg(long, env = "TUNNEL_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum DurabilityArg {
    /// A commit survives the process being killed (SQLite WAL, synchronous=NORMAL).
    Normal,
    /// A commit is on disk before it is acknowledged (synchronous=FULL).
    Full,
}

#[derive(Debug, Args)]
pub(crate) struct ServeCmd {
    #[command(flatten)]
    pub(crate) args: ServeArgs,
    #[command(subcommand)]
    pub(crate) service: Option<ServiceAction>,
}

#[derive(Debug, Args)]
pub(crate) struct RunnerCmd {
    #[command(flatten)]
    pub(crate) args: RunnerArgs,
    #[command(subcommand)]
    pub(crate) service: Option<ServiceAction>,
}

/// Run it as a service of this user (systemd on Linux, launchd on macOS).
#[derive(Debug, Subcommand)]
pub(crate) enum ServiceAction {
    /// Write the unit (it runs with the config file, where the token stays) and start it.
    InstallService {
        /// Only write the unit; don't enable or start it.
        #[arg(long)]
        no_start: bool,
    },
    /// Stop the service and remove its unit.
    UninstallService,
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:3456].
    #[arg(long, env = "TUNNEL_LISTEN")]
    pub(crate) listen: Option<String>,
    /// Port on 127.0.0.1 (or the --listen host); PORT and WORKER_PORT as in openclaw-tunnel.
    #[arg(long, env = "PORT")]
    pub(crate) port: Option<u16>,
    /// SQLite database file, or a PostgreSQL URL (postgres://…) so several servers share one
    /// queue [default: DATABASE_URL, else $XDG_DATA_HOME/tunnel/tunnel.db].
    #[arg(long, env = "TUNNEL_DATABASE")]
    pub(crate) database: Option<String>,
    /// How hard SQLite works to keep a commit across a crash [default: normal].
    #[arg(long, value_enum, env = "TUNNEL_DURABILITY")]
    pub(crate) durability: Option<DurabilityArg>,
    /// Largest request body in bytes [default: 4194304].
    #[arg(long, env = "TUNNEL_MAX_BODY_BYTES")]
    pub(crate) max_body_bytes: Option<usize>,
    /// Seconds a runner has to ack an offer [default: 15].
    #[arg(long, env = "TUNNEL_ACK_TIMEOUT")]
    pub(crate) ack_timeout: Option<u64>,
    /// Seconds a lease lasts without a heartbeat [default: 30].
    #[arg(long, env = "TUNNEL_LEASE")]
    pub(crate) lease: Option<u64>,
    /// How long finished tasks (with their events and delivered messages) are kept, as 7d,
    /// 12h, 30m or 90s; "off" keeps them forever. Queued and running tasks are never removed
    /// [default: 7d].
    #[arg(long, env = "TUNNEL_RETENTION", value_name = "DURATION")]
    pub(crate) retention: Option<String>,
    /// Longest a task may wait in the queue for a runner, as 7d, 12h, 30m or 90s; then it ends
    /// `timed_out` with a reason that says so (and its chat is told). "off": forever
    /// [default: 7d].
    #[arg(long, env = "TUNNEL_MAX_QUEUE_TIME", value_name = "DURATION")]
    pub(crate) max_queue_time: Option<String>,
    /// Most tasks one token may have waiting (queued or parked); a submit beyond it is
    /// refused with 429. 0: no cap [default: 10000].
    #[arg(long, env = "TUNNEL_MAX_QUEUED_PER_TOKEN", value_name = "N")]
    pub(crate) max_queued_per_token: Option<u32>,
    /// Longest a long-poll (claim, `?wait=`, heartbeat) is held, in milliseconds [default:
    /// 60000].
    #[arg(long, env = "TUNNEL_MAX_WAIT_MS")]
    pub(crate) max_wait_ms: Option<u64>,
    /// Log format [default: text].
    #[arg(long, value_enum, env = "TUNNEL_LOG_FORMAT")]
    pub(crate) log_format: Option<LogFormat>,
    /// Long-polls one token may have parked at once [default: 64]; more get 429.
    #[arg(long, env = "TUNNEL_MAX_POLLS_PER_TOKEN")]
    pub(crate) max_polls_per_token: Option<usize>,
    /// Most connections open at once; beyond it an idle one is closed for the new one, or the
    /// new one gets 503 when all are busy. Fitted under the open-file limit [default: the
    /// open-file limit less 128, at most 16384].
    #[arg(long, env = "TUNNEL_MAX_CONNECTIONS", value_name = "N")]
    pub(crate) max_connections: Option<usize>,
    /// Seconds a connection has to send a whole request head (slowloris), 1 to 3600
    /// [default: 10].
    #[arg(long, env = "TUNNEL_HEADER_TIMEOUT", value_name = "SECS")]
    pub(crate) header_timeout: Option<u64>,
    /// Seconds a keep-alive connection with no request in flight is kept, 1 to 3600
    /// [default: 60].
    #[arg(long, env = "TUNNEL_IDLE_TIMEOUT", value_name = "SECS")]
    pub(crate) idle_timeout: Option<u64>,
    /// Seconds a write may make no progress (a reader that stopped reading) before the
    /// connection is closed, 1 to 3600 [default: 30].
    #[arg(long, env = "TUNNEL_WRITE_TIMEOUT", value_name = "SECS")]
    pub(crate) write_timeout: Option<u64>,
    /// Events stored per task; past it one `truncated` event is written and later output is
    /// dropped (the answer is always kept). At least 100 [default: 100000].
    #[arg(long, env = "TUNNEL_MAX_TASK_EVENTS", value_name = "N")]
    pub(crate) max_task_events: Option<u64>,
    /// Bytes of events stored per task (kind plus JSON data), as for --max-task-events. At
    /// least 65536 [default: 67108864, 64 MiB].
    #[arg(long, env = "TUNNEL_MAX_TASK_EVENT_BYTES", value_name = "BYTES")]
    pub(crate) max_task_event_bytes: Option<u64>,
}

/// Options of the runner, for `tunnel runner` and `tunnel up`.
#[derive(Debug, Args, Clone)]
pub(crate) struct RunnerOpts {
    /// Runner name, unique per server [default: the host name].
    #[arg(long, env = "TUNNEL_RUNNER_NAME")]
    pub(crate) name: Option<String>,
    /// Tasks run at once [default: 5].
    #[arg(long, env = "MAX_CONCURRENT")]
    pub(crate) max_concurrent: Option<usize>,
    /// A project this runner has, as NAME=DIR (repeat for more); tasks name projects, never
    /// paths.
    #[arg(long = "project", value_name = "NAME=DIR")]
    pub(crate) projects: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct RunnerArgs {
    /// Server URL [default: http://127.0.0.1:3456].
    #[arg(long, env = "WORKER_URL")]
    pub(crate) server: Option<String>,
    /// A runner (or admin) token.
    #[arg(long, env = "WORKER_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    #[command(flatten)]
    pub(crate) opts: RunnerOpts,
    /// Log format [default: text].
    #[arg(long, value_enum, env = "TUNNEL_LOG_FORMAT")]
    pub(crate) log_format: Option<LogFormat>,
    /// Long-polls one token may have parked at once [default: 64]; more get 429.
    #[arg(long, env = "TUNNEL_MAX_POLLS_PER_TOKEN")]
    pub(crate) max_polls_per_token: Option<usize>,
}

#[derive(Debug, Args)]
pub(crate) struct UpCmd {
    #[command(flatten)]
    pub(crate) args: UpArgs,
    #[command(subcommand)]
    pub(crate) service: Option<ServiceAction>,
}

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    #[command(flatten)]
    pub(crate) serve: ServeArgs,
    #[command(flatten)]
    pub(crate) runner: RunnerOpts,
}

/// How to reach the server.
#[derive(Debug, Args, Clone)]
pub(crate) struct ClientArgs {
    /// Server URL [default: http://127.0.0.1:3456].
    #[arg(long, global = true, env = "TUNNEL_URL")]
    pub(crate) server: Option<String>,
    /// API token [default: WORKER_TOKEN, then the admin token `tunnel serve` saved locally].
    #[arg(long, global = true, env = "TUNNEL_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct SubmitArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// The agent: claude, codex, gemini or a custom agent's name.
    #[arg(long, short)]
    pub(crate) agent: String,
    /// The conversation: tasks of one conversation run in order and share a session.
    #[arg(long, short)]
    pub(crate) conversation: Option<String>,
    /// A project a runner declared.
    #[arg(long, short)]
    pub(crate) project: Option<String>,
    /// The model the agent uses (its own name for it, e.g. sonnet, gpt-5, gemini-2.5-pro)
    /// [default: the agent's or the runner's].
    #[arg(long, short)]
    pub(crate) model: Option<String>,
    /// Stop the agent after it has run this many seconds (the task ends timed_out). With
    /// --watch, also stop watching if the task has not started within that time.
    #[arg(long, value_name = "SECONDS")]
    pub(crate) timeout: Option<u64>,
    /// Start a fresh agent session.
    #[arg(long, conflicts_with = "resume")]
    pub(crate) new: bool,
    /// Resume this native session id.
    #[arg(long)]
    pub(crate) resume: Option<String>,
    /// Run again on another runner if the runner is lost (default 1: report, don't re-run).
    #[arg(long)]
    pub(crate) max_attempts: Option<u32>,
    /// Makes a retried submit return the first task.
    #[arg(long)]
    pub(crate) idempotency_key: Option<String>,
    /// Send the answer to a chat: discord:CHANNEL[:THREAD], telegram:CHAT[:TOPIC] or
    /// webhook:NAME.
    #[arg(long, value_name = "PLATFORM:ID")]
    pub(crate) reply_to: Option<String>,
    /// How the agent's permission requests are handled for this task: ask (wait for your
    /// answer: `tunnel approve`, chat, `--watch`), auto (allow) or deny. The stricter of this and
    /// the runner's setting for the agent wins [default: the runner's setting].
    #[arg(long, value_enum)]
    pub(crate) approvals: Option<PolicyArg>,
    /// Follow the task's events until it ends (Ctrl-C stops watching, not the task).
    #[arg(long, short)]
    pub(crate) watch: bool,
    /// With --watch: show every event raw, as `[kind] data`.
    #[arg(long, short)]
    pub(crate) verbose: bool,
    /// Queue the task even though no runner has ever offered the agent (one may come later).
    #[arg(long)]
    pub(crate) queue_anyway: bool,
    /// The prompt; `-` reads it from standard input.
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true, trailing_var_arg = true)]
    pub(crate) prompt: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct AcpArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// The agent the runner runs: claude, codex, gemini or a custom agent's name.
    #[arg(long, default_value = "claude")]
    pub(crate) agent: String,
    /// Run new sessions on this runner, from their first prompt on, and only map the client's
    /// directory to projects it declared [default: the config's `[acp] runner`]. A loaded
    /// session's prompts go to the runner that holds it.
    #[arg(long)]
    pub(crate) runner: Option<String>,
    /// Run every session in this project instead of mapping the client's directory
    /// [default: the config's `[acp] project`, else `[acp.projects]`, else the directory's name].
    #[arg(long)]
    pub(crate) project: Option<String>,
    /// How the agent's permission requests are handled: ask (this client, chat or `tunnel
    /// approve` answers; the first answer wins), auto or deny [default: ask].
    #[arg(long, value_enum)]
    pub(crate) approvals: Option<PolicyArg>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum PolicyArg {
    Ask,
    Auto,
    Deny,
}

#[derive(Debug, Args)]
pub(crate) struct ApprovalsArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// Every request, answered or not (default: only the pending ones).
    #[arg(long)]
    pub(crate) all: bool,
    /// Only this task's requests.
    #[arg(long)]
    pub(crate) task: Option<String>,
    /// Show at most this many requests, newest first.
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: u32,
}

#[derive(Debug, Args)]
pub(crate) struct ApproveArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// The request's id (apr_…), from `tunnel approvals` or the chat message.
    pub(crate) id: String,
    /// Allow this and the same kind of action for the rest of the agent's session.
    #[arg(long, conflicts_with = "deny")]
    pub(crate) session: bool,
    /// Deny it; the optional message is passed to the agent.
    #[arg(long, value_name = "MESSAGE", num_args = 0..=1, default_missing_value = "")]
    pub(crate) deny: Option<String>,
    /// Who is answering, as recorded beside the token's name [default: $USER].
    #[arg(long)]
    pub(crate) by: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// The task's id (printed by `tunnel submit`, listed by `tunnel tasks`).
    pub(crate) id: String,
    /// Start after this event seq (0 = from the beginning).
    #[arg(long, default_value_t = 0)]
    pub(crate) after: u64,
    /// Show every event raw, as `[kind] data`.
    #[arg(long, short)]
    pub(crate) verbose: bool,
    /// Stop watching after this many seconds (exit 124); the task goes on.
    #[arg(long, value_name = "SECONDS")]
    pub(crate) timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub(crate) struct TasksArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// Show this task (runner, duration, cost, answer) instead of listing.
    pub(crate) id: Option<String>,
    /// Only tasks in this state: queued, offered, running, cancelling, parked, succeeded,
    /// failed, timed_out, cancelled or lost.
    #[arg(long)]
    pub(crate) state: Option<String>,
    /// Only this conversation's tasks.
    #[arg(long)]
    pub(crate) conversation: Option<String>,
    /// Only this agent's tasks.
    #[arg(long)]
    pub(crate) agent: Option<String>,
    /// Show at most this many, newest first.
    #[arg(long, default_value_t = 20)]
    pub(crate) limit: u32,
}

#[derive(Debug, Args)]
pub(crate) struct CancelArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// The task's id (printed by `tunnel submit`, listed by `tunnel tasks`).
    pub(crate) id: String,
}

#[derive(Debug, Args)]
pub(crate) struct SessionsArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    #[command(subcommand)]
    pub(crate) action: Option<SessionAction>,
    /// Only this conversation's binding. Names are scoped by token: a client token sees its
    /// own conversations; an admin token every token's, with an OWNER column.
    #[arg(long)]
    pub(crate) conversation: Option<String>,
    /// Only this agent's bindings and sessions.
    #[arg(long)]
    pub(crate) agent: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum SessionAction {
    /// The conversation's next task starts a fresh session.
    New {
        /// The conversation (as given to `submit --conversation`).
        #[arg(long)]
        conversation: String,
        /// The agent whose session starts fresh.
        #[arg(long)]
        agent: String,
    },
    /// The conversation continues this native session id.
    Resume {
        /// The conversation (as given to `submit --conversation`).
        #[arg(long)]
        conversation: String,
        /// The agent the session belongs to.
        #[arg(long)]
        agent: String,
        /// Runner that has the session (default: the one that last reported it).
        #[arg(long)]
        runner: Option<String>,
        /// The agent's own session id (from `tunnel sessions` or a task's answer).
        session_id: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct DashboardArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// Only print the link; do not start a browser.
    #[arg(long)]
    pub(crate) no_open: bool,
}

#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    #[command(subcommand)]
    pub(crate) action: TokenAction,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenAction {
    /// Create a token; its secret is printed once.
    Create {
        /// What the token is for (shown by `token list`), e.g. openclaw or laptop.
        #[arg(long)]
        name: String,
        /// client (submit and read its tasks), runner (run tasks) or admin.
        #[arg(long)]
        role: String,
    },
    /// List tokens.
    List,
    /// Revoke a token by id.
    Revoke {
        /// The token's id (from `tunnel token list`), not its secret.
        id: String,
    },
}
