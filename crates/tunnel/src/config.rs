//! The optional TOML config file and where local state lives.
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:3456"
//! database = "/var/lib/tunnel/tunnel.db"
//! durability = "normal"      # or "full"
//! max_body_bytes = 4194304
//! ack_timeout_secs = 15
//! lease_secs = 30
//! retention = "7d"           # finished tasks kept this long; "off" keeps them forever
//! max_queue_time = "7d"      # a task no runner took by then ends timed_out; "off": never
//! max_queued_per_token = 10000  # waiting tasks per token; 0: no cap
//! log_format = "text"        # or "json"
//! max_connections = 16384    # default: the open-file limit less 128, at most 16384
//! header_timeout_secs = 10   # a request head must arrive within this
//! idle_timeout_secs = 60     # keep-alive connections with no request are closed after this
//! write_timeout_secs = 30    # a reader that stops reading is cut off after this
//! max_polls_per_token = 64   # long-polls one token may have parked at once
//! max_task_events = 100000   # events stored per task, then a `truncated` event
//! max_task_event_bytes = 67108864
//!
//! [client]
//! server = "https://tunnel.example.com"
//! token = "tnl_…"
//!
//! [runner]
//! server = "https://tunnel.example.com"
//! name = "mac-mini"
//! max_concurrent = 5
//! default_timeout_secs = 600
//! work_dir = "/home/me/tunnel-work"
//! sandbox = true                       # Landlock closes tunnel's files to agents (Linux)
//! run_as = "agent"                     # a runner started as root runs agents as this user
//! files_write_vcs = false              # file tasks may not write .git/ and the like
//! [runner.projects]
//! web = "/home/me/src/web"
//! [runner.agents.claude]
//! models = ["opus", "sonnet"]          # tried in order when one is overloaded
//! env = { IS_SANDBOX = "1" }           # needed to skip permissions as root
//! [runner.agents.aider]
//! program = "aider"
//! command = ["--yes", "--message", "{prompt}"]
//! output = "text"                      # or "json_lines"
//!
//! [acp]                                # `tunnel acp`: editor directory → runner project
//! projects = { "/home/me/src/web" = "web" }
//! ```
//!
//! `WORKER_TOKEN` is read from the environment only, so it never sits in a file by accident.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    #[serde(default)]
    pub(crate) server: ServerSection,
    #[serde(default)]
    pub(crate) client: ClientSection,
    #[serde(default)]
    pub(crate) runner: RunnerSection,
    #[serde(default)]
    pub(crate) acp: AcpSection,
}

/// `[acp]`: how `tunnel acp` maps an editor's directory to a runner's project.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AcpSection {
    pub(crate) project: Option<String>,
    pub(crate) runner: Option<String>,
    /// A local directory (and everything under it) → the project name a runner declared.
    #[serde(default)]
    pub(crate) projects: std::collections::BTreeMap<PathBuf, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunnerSection {
    pub(crate) server: Option<String>,
    pub(crate) token: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) max_concurrent: Option<usize>,
    pub(crate) long_poll_wait_secs: Option<u64>,
    /// Ask each claim to ack its offer too (default true; false: ack apart, as runners did
    /// before the field).
    pub(crate) ack_in_claim: Option<bool>,
    pub(crate) default_timeout_secs: Option<u64>,
    pub(crate) shutdown_grace_secs: Option<u64>,
    /// Where tasks without a project run.
    pub(crate) work_dir: Option<PathBuf>,
    pub(crate) spool_dir: Option<PathBuf>,
    /// How long an `ask` approval waits for an answer before it counts as denied (default 600).
    pub(crate) approval_timeout_secs: Option<u64>,
    /// `auto` (a cgroup v2 per task where possible) or `process-tree`.
    pub(crate) containment: Option<tunnel_runner::Containment>,
    #[serde(default)]
    pub(crate) projects: std::collections::BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub(crate) agents: std::collections::BTreeMap<String, AgentSection>,
    /// Close tunnel's own files (data and config directories) to agents with Landlock where
    /// the kernel has it (default true).
    pub(crate) sandbox: Option<bool>,
    /// Run agents as this OS user; the runner must run as root.
    pub(crate) run_as: Option<String>,
    /// File tasks may write VCS metadata (`.git/`, `.hg/`, `.svn/`, `.jj/`; default false).
    pub(crate) files_write_vcs: Option<bool>,
    /// The file this came from (the agents must not read it).
    #[serde(skip)]
    pub(crate) config_file: Option<PathBuf>,
}

/// `[runner.agents.NAME]`: changes a built-in agent (claude, codex, gemini, echo) or adds a
/// custom one (`command` given).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentSection {
    pub(crate) kind: Option<tunnel_runner::AgentKind>,
    pub(crate) program: Option<String>,
    pub(crate) command: Option<Vec<String>>,
    pub(crate) args: Option<Vec<String>>,
    pub(crate) models: Option<Vec<String>>,
    pub(crate) output: Option<tunnel_runner::OutputMode>,
    #[serde(default)]
    pub(crate) env: std::collections::BTreeMap<String, String>,
    /// Set false to stop offering a built-in agent.
    pub(crate) enabled: Option<bool>,
    /// `auto` | `ask` | `deny`: how the agent's permission requests are answered.
    pub(crate) approvals: Option<tunnel_runner::ApprovalPolicy>,
    /// The ACP adapter of a built-in agent (default `claude-agent-acp`, `codex-acp`,
    /// `gemini --acp`), used when approvals are `ask` or `deny`.
    pub(crate) acp_program: Option<String>,
    pub(crate) acp_args: Option<Vec<String>>,
    /// The ACP session mode to select before the prompt (Claude: `default`, which asks).
    pub(crate) acp_mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerSection {
    pub(crate) listen: Option<String>,
    pub(crate) database: Option<String>,
    pub(crate) durability: Option<String>,
    pub(crate) max_body_bytes: Option<usize>,
    pub(crate) ack_timeout_secs: Option<u64>,
    pub(crate) lease_secs: Option<u64>,
    pub(crate) retention: Option<String>,
    pub(crate) max_queue_time: Option<String>,
    pub(crate) max_queued_per_token: Option<u32>,
    pub(crate) log_format: Option<String>,
    /// Connections open at once [default: the open-file limit less 128, at most 16384].
    pub(crate) max_connections: Option<usize>,
    /// A request head must arrive within this (slowloris) [default: 10].
    pub(crate) header_timeout_secs: Option<u64>,
    /// A keep-alive connection with no request is closed after this [default: 60].
    pub(crate) idle_timeout_secs: Option<u64>,
    /// A write with no progress ends the connection after this [default: 30].
    pub(crate) write_timeout_secs: Option<u64>,
    /// Long-polls one token may have parked at once [default: 64].
    pub(crate) max_polls_per_token: Option<usize>,
    /// Events stored per task; later ones are dropped after a `truncated` event
    /// [default: 100000].
    pub(crate) max_task_events: Option<u64>,
    /// Bytes of event data stored per task [default: 67108864 = 64 MiB].
    pub(crate) max_task_event_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientSection {
    pub(crate) server: Option<String>,
    pub(crate) token: Option<String>,
}

impl FileConfig {
    /// Reads `path`; without one, the one `tunnel init` writes (`~/.config/tunnel/tunnel.toml`)
    /// if it exists. Never a file from the current directory: a cloned repository could hold
    /// a `tunnel.toml` naming its own server (which would get the local admin token) or its
    /// own agent programs. A config elsewhere is used only when named (`--config`,
    /// `TUNNEL_CONFIG`).
    pub(crate) fn load(path: Option<&Path>) -> Result<FileConfig> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => match Some(default_config_path()).filter(|p| p.exists()) {
                Some(p) => p,
                None => return Ok(FileConfig::default()),
            },
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut file: FileConfig = toml::from_str(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        file.runner.config_file = Some(path);
        Ok(file)
    }
}

/// Where tunnel keeps its data on this machine: `$XDG_DATA_HOME/tunnel` or
/// `~/.local/share/tunnel`.
pub(crate) fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("tunnel");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/tunnel"),
        None => PathBuf::from(".tunnel"),
    }
}

/// Where `tunnel init` writes the config: `$XDG_CONFIG_HOME/tunnel/tunnel.toml` or
/// `~/.config/tunnel/tunnel.toml`.
pub(crate) fn default_config_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("tunnel/tunnel.toml")
}

/// Creates `dir` (and missing parents) readable only by this user: the database and the spool
/// hold prompts and answers. An existing directory keeps the permissions it has.
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// The admin token `tunnel serve` created on first start, for local CLI use.
pub(crate) fn local_admin_token_path() -> PathBuf {
    data_dir().join("admin.token")
}

/// The address of the local server the admin token belongs to (written by `tunnel serve` and
/// `tunnel up` at each start).
pub(crate) fn local_admin_server_path() -> PathBuf {
    data_dir().join("admin.server")
}

/// The saved local admin token, if `server` is the local server it belongs to. A server named
/// by a config file, a flag or a variable is not trusted with it just because no token was
/// given: `Err` says why it is withheld.
pub(crate) fn local_admin_token_for(server: &str) -> std::result::Result<Option<String>, String> {
    let token = match std::fs::read_to_string(local_admin_token_path()) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        _ => return Ok(None),
    };
    let local = std::fs::read_to_string(local_admin_server_path()).unwrap_or_default();
    let local = local.trim();
    let same = match endpoint(server) {
        Some((host, port)) if !local.is_empty() => endpoint(local).is_some_and(|(lh, lp)| {
            lp == port && (lh == host || (loopback(&lh) && loopback(&host)))
        }),
        // Saved before servers recorded their address: the default local address only.
        Some((host, port)) => loopback(&host) && port == 3456,
        None => false,
    };
    if same {
        Ok(Some(token))
    } else {
        Err(format!(
            "the local admin token ({}) belongs to the server on this machine{}; it is not sent to {server}: pass --token (or TUNNEL_TOKEN) for that server",
            local_admin_token_path().display(),
            if local.is_empty() {
                String::new()
            } else {
                format!(" ({local})")
            }
        ))
    }
}

/// `http://HOST:PORT/…` → (host, port); plain HTTP only (the local server does not do TLS).
fn endpoint(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.contains('@') {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (authority, 80),
    };
    Some((host.trim_matches(['[', ']']).to_ascii_lowercase(), port))
}

fn loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    #[test]
    fn endpoints() {
        use super::endpoint;
        assert_eq!(
            endpoint("http://127.0.0.1:3456"),
            Some(("127.0.0.1".into(), 3456))
        );
        assert_eq!(
            endpoint("http://LocalHost:80/x"),
            Some(("localhost".into(), 80))
        );
        assert_eq!(endpoint("http://[::1]:9/"), Some(("::1".into(), 9)));
        assert_eq!(endpoint("http://a@127.0.0.1:9/"), None);
        assert_eq!(endpoint("https://127.0.0.1:9/"), None);
    }
}
