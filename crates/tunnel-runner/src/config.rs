//! What a runner runs and where.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
pub use tunnel_protocol::ApprovalPolicy;

/// The agent CLIs tunnel knows how to drive, and custom commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentKind {
    Claude,
    Codex,
    Gemini,
    /// A command template from config.
    Custom,
    /// The original's shell tasks: the prompt is run by `sh -c` in the project directory. Off
    /// unless the runner's config declares an agent of this kind.
    Shell,
    /// The original's file tasks: the prompt is a JSON request (read, write, edit) on a path
    /// inside the project directory, done by the runner itself. Off unless declared.
    Files,
    /// Any agent that speaks the Agent Client Protocol (v1, JSON-RPC on stdio): `program` and
    /// `args` start it (Copilot, OpenCode, Qwen, the Claude and Codex adapters, `gemini --acp`…).
    Acp,
}

/// How a custom agent's stdout is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OutputMode {
    /// Every line is answer text.
    #[default]
    Text,
    /// One JSON object per line: `{"text": …}`, `{"session_id": …}`, `{"result": …}`; other
    /// objects are kept as events.
    JsonLines,
}

/// What file tasks show as their program: they run inside the runner.
pub(crate) const FILES_PROGRAM: &str = "(built in)";

/// One agent this runner offers.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub kind: AgentKind,
    /// The program (a name looked up on PATH, or a path).
    pub program: String,
    /// For custom agents: the argv after the program. `{prompt}`, `{model}`, `{session_id}`,
    /// `{task_id}` and `{project_dir}` are replaced (each placeholder must be a whole
    /// argument). Without `{prompt}`, the prompt is written to stdin.
    pub command: Vec<String>,
    /// Extra arguments for the built-in agents (e.g. Claude's permission mode).
    pub args: Vec<String>,
    /// Models to try in order when a model is overloaded, rate limited or unavailable. A
    /// task's own `model` overrides the list.
    pub models: Vec<String>,
    pub output: OutputMode,
    /// Extra environment for the agent.
    pub env: BTreeMap<String, String>,
    /// How the agent's permission requests are answered (`auto`, `ask`, `deny`); a task may ask
    /// for a stricter policy, never a looser one.
    pub approvals: ApprovalPolicy,
    /// For the built-in CLIs: the ACP adapter that drives them when a task's policy is `ask` or
    /// `deny` (print mode cannot ask). `None` for the other kinds (`acp` agents are ACP anyway).
    pub acp: Option<AcpLaunch>,
    /// The ACP session mode selected before the prompt (`session/set_mode`), e.g. Claude's
    /// `default` ("always ask"), so that the agent asks instead of deciding alone.
    pub acp_mode: Option<String>,
}

/// How to start an ACP adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpLaunch {
    pub program: String,
    pub args: Vec<String>,
}

impl AcpLaunch {
    /// The adapter for a built-in CLI: `claude-agent-acp`, `codex-acp`, `gemini --acp`.
    pub fn builtin(kind: AgentKind) -> Option<AcpLaunch> {
        let (program, args): (&str, &[&str]) = match kind {
            AgentKind::Claude => ("claude-agent-acp", &[]),
            AgentKind::Codex => ("codex-acp", &[]),
            AgentKind::Gemini => ("gemini", &["--acp"]),
            _ => return None,
        };
        Some(AcpLaunch {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
        })
    }
}

impl AgentConfig {
    /// A built-in agent with its default arguments.
    pub fn builtin(kind: AgentKind, program: impl Into<String>) -> AgentConfig {
        let args = match kind {
            // The agent works unattended: no one is there to approve a tool. As root, Claude
            // refuses this unless IS_SANDBOX=1 is set (in `env`).
            AgentKind::Claude => vec!["--dangerously-skip-permissions".into()],
            AgentKind::Codex => vec!["--sandbox".into(), "workspace-write".into()],
            AgentKind::Gemini => vec!["--approval-mode".into(), "yolo".into()],
            AgentKind::Custom | AgentKind::Shell | AgentKind::Files | AgentKind::Acp => vec![],
        };
        // The adapter's session mode in which the agent asks before it acts: Claude's ACP
        // default is "auto" (a classifier decides alone), Codex's "agent" (asks only for what
        // it finds unsafe); Gemini's "default" already asks.
        let acp_mode = match kind {
            AgentKind::Claude | AgentKind::Gemini => Some("default".to_owned()),
            AgentKind::Codex => Some("read-only".to_owned()),
            _ => None,
        };
        let program = match kind {
            AgentKind::Shell => "sh".to_owned(),
            AgentKind::Files => FILES_PROGRAM.to_owned(),
            _ => program.into(),
        };
        AgentConfig {
            kind,
            program,
            command: vec![],
            args,
            models: vec![],
            output: OutputMode::Text,
            env: BTreeMap::new(),
            approvals: ApprovalPolicy::Auto,
            acp: AcpLaunch::builtin(kind),
            acp_mode,
        }
    }

    /// The harmless agent every default config has: it prints the prompt back.
    pub fn echo() -> AgentConfig {
        AgentConfig {
            kind: AgentKind::Custom,
            program: "printf".into(),
            command: vec!["%s\\n".into(), "{prompt}".into()],
            args: vec![],
            models: vec![],
            output: OutputMode::Text,
            env: BTreeMap::new(),
            approvals: ApprovalPolicy::Auto,
            acp: None,
            acp_mode: None,
        }
    }

    /// How to install the ACP adapter of this agent, when it has one.
    pub fn acp_install_hint(&self) -> Option<&'static str> {
        let acp = self.acp.as_ref()?;
        Some(match acp.program.as_str() {
            "claude-agent-acp" => {
                "install it with `npm install -g @agentclientprotocol/claude-agent-acp`"
            }
            "codex-acp" => "install it with `npm install -g @agentclientprotocol/codex-acp`",
            "gemini" => "install it with `npm install -g @google/gemini-cli`",
            _ => "check `acp_program` of this agent in the runner config",
        })
    }

    /// How to install the CLI, for the message when it is missing.
    pub fn install_hint(&self) -> String {
        match self.kind {
            AgentKind::Claude => {
                "install it with `npm install -g @anthropic-ai/claude-code` or set CLAUDE_PATH"
                    .into()
            }
            AgentKind::Codex => {
                "install it with `npm install -g @openai/codex` or set CODEX_PATH".into()
            }
            AgentKind::Gemini => {
                "install it with `npm install -g @google/gemini-cli` or set GEMINI_PATH".into()
            }
            AgentKind::Shell | AgentKind::Files => "it is built in; check the runner config".into(),
            AgentKind::Custom | AgentKind::Acp => format!(
                "check the `program` of this agent in the runner config ({:?})",
                self.program
            ),
        }
    }
}

impl AgentConfig {
    /// Why this custom agent's template could hand the prompt to its program as an option, if
    /// it could: `{prompt}` right after the program, or after a positional argument (a
    /// subcommand), with no `--` before it. A prompt such as `--help` or `-rf` would then be
    /// an option, not text. After an option (`--message {prompt}`) it is that option's value.
    pub fn prompt_as_option(&self) -> Option<String> {
        if self.kind != AgentKind::Custom {
            return None;
        }
        let at = self.command.iter().position(|a| a == "{prompt}")?;
        let before = &self.command[..at];
        if before.iter().any(|a| a == "--") {
            return None;
        }
        match before.last() {
            Some(prev) if prev.starts_with('-') => None,
            prev => Some(format!(
                "{{prompt}} comes {} with no `--` before it, so a prompt such as `--help` or `-rf` would reach {} as an option; put \"--\" before {{prompt}} if the program accepts it, pass it as an option's value (e.g. [\"--message\", \"{{prompt}}\"]), or leave {{prompt}} out to send the prompt on stdin",
                match prev {
                    Some(p) => format!("after the argument {p:?}"),
                    None => "right after the program".to_owned(),
                },
                self.program
            )),
        }
    }
}

/// Everything a runner needs.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub server: String,
    pub token: String,
    /// Unique among the server's runners (default: the host name).
    pub name: String,
    /// Tasks run at once (`MAX_CONCURRENT`).
    pub max_concurrent: usize,
    /// How long a claim long-poll is held (`LONG_POLL_WAIT`).
    pub long_poll_wait: Duration,
    /// Each claim asks the server to ack its offer too: one round trip fewer per task (what a
    /// slow link notices). On by default. The server keeps an attempt it started this way
    /// marked in its store until the runner makes a call about it or lists it in `holding`,
    /// and gives it again to this runner's next claim meanwhile, so an answer lost in transit
    /// or with a server that died before sending it costs nothing (the chaos test
    /// `a_server_killed_before_its_acked_claim_answer_arrives…`). Off: the runner acks apart.
    pub ack_in_claim: bool,
    /// First back-off after an error (`POLL_INTERVAL`); doubles up to 30 s, with jitter, except
    /// while the server does not answer at all (down, restarting): then it is probed every
    /// 0.5 s or so, so the runner is back within a second of the server.
    pub retry_base: Duration,
    pub agents: BTreeMap<String, AgentConfig>,
    /// Project name → directory.
    pub projects: BTreeMap<String, PathBuf>,
    /// Where tasks without a project run.
    pub default_dir: PathBuf,
    /// Events and results not yet acknowledged by the server.
    pub spool_dir: PathBuf,
    /// For tasks that name no timeout (`CC_TIMEOUT`).
    pub default_timeout: Duration,
    /// Between SIGTERM and SIGKILL of an agent's process group.
    pub kill_grace: Duration,
    /// How long running tasks may finish after the runner is asked to stop.
    pub shutdown_grace: Duration,
    /// How long a task parks after a usage limit whose reset time could not be read.
    pub default_park: Duration,
    /// How long an `ask` approval waits for a person before it counts as denied.
    pub approval_timeout: Duration,
    /// Offer agents whose CLI is missing (they fail with an install hint) instead of hiding
    /// them. `tunnel up` does this so a newcomer learns what to install.
    pub offer_missing_agents: bool,
    /// How agents' processes are contained (`containment`): a cgroup v2 per task where
    /// possible, else the process-tree walk.
    pub containment: crate::contain::Containment,
    /// How agents are confined beyond a clean environment (sandbox wrapper, another user).
    pub confine: crate::confine::Confinement,
    /// File tasks may write VCS metadata (`.git/`, `.hg/`, `.svn/`, `.jj/`): a `.git/config`
    /// or hook runs code on the next git command, so off by default.
    pub files_write_vcs: bool,
}

impl RunnerConfig {
    /// Defaults for everything but where the server is.
    pub fn new(
        server: impl Into<String>,
        token: impl Into<String>,
        data_dir: PathBuf,
    ) -> RunnerConfig {
        let mut agents = BTreeMap::new();
        agents.insert(
            "claude".into(),
            AgentConfig::builtin(AgentKind::Claude, "claude"),
        );
        agents.insert(
            "codex".into(),
            AgentConfig::builtin(AgentKind::Codex, "codex"),
        );
        agents.insert(
            "gemini".into(),
            AgentConfig::builtin(AgentKind::Gemini, "gemini"),
        );
        agents.insert("echo".into(), AgentConfig::echo());
        RunnerConfig {
            server: server.into(),
            token: token.into(),
            name: default_name(),
            max_concurrent: 5,
            long_poll_wait: Duration::from_secs(30),
            ack_in_claim: true,
            retry_base: Duration::from_millis(500),
            agents,
            projects: BTreeMap::new(),
            default_dir: data_dir.join("work"),
            spool_dir: data_dir.join("spool"),
            default_timeout: Duration::from_secs(600),
            kill_grace: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(60),
            default_park: Duration::from_secs(30 * 60),
            approval_timeout: Duration::from_millis(
                tunnel_protocol::approval_limits::TIMEOUT_DEFAULT_MS,
            ),
            offer_missing_agents: false,
            containment: Default::default(),
            confine: crate::confine::Confinement::default(),
            files_write_vcs: false,
        }
    }
}

/// The host name, made into a valid runner name.
pub fn default_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let clean: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if clean
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        clean
    } else {
        "runner".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_where_options_are_read_is_found() {
        let mut a = AgentConfig::echo();
        let cmd = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (c, risky) in [
            (&["{prompt}"][..], true),
            (&["exec", "{prompt}"][..], true),
            (&["--", "{prompt}"][..], false),
            (&["--", "exec", "{prompt}"][..], false),
            (&["-m", "{prompt}"][..], false),
            (&["--model", "{model}"][..], false),
        ] {
            a.command = cmd(c);
            assert_eq!(a.prompt_as_option().is_some(), risky, "{c:?}");
        }
    }
}
