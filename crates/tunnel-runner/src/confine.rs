//! What every child process tunnel starts gets, in one place: an environment without tunnel's
//! secrets ([`child_env`]), and, when the runner is configured for it ([`Confinement`]), a
//! wrapper in front of the agent that closes tunnel's files to it (Landlock, applied by the
//! `tunnel` binary re-executed as `tunnel __sandbox`) and another OS user to run it as.
//!
//! Any child the runner starts (agent, `--version` probe, the guard process, an adapter) goes
//! through [`command`], so a new kind of child cannot forget the policy.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// Variables tunnel itself reads that hold a credential or name a place holding one. None of
/// them is ever passed to a child. Every `TUNNEL_*` variable is dropped too (tokens, webhook
/// secrets, the database, the config file).
pub const SECRET_VARS: &[&str] = &[
    // The runner's token, the server's bootstrap admin token; where they are used.
    "WORKER_TOKEN",
    "WORKER_URL",
    // The server's database: a PostgreSQL URL carries its password.
    "DATABASE_URL",
    // Chat bots and their endpoints (the proxy URL may carry a user and password).
    "CALLBACK_BOT_TOKEN",
    "DISCORD_BOT_TOKEN",
    "TELEGRAM_BOT_TOKEN",
    "DISCORD_PROXY",
    "CALLBACK_API_BASE_URL",
    "DISCORD_API_BASE_URL",
    "TELEGRAM_API_BASE_URL",
    // The OpenClaw plugin's hook token, when the gateway and tunnel share an environment.
    "OPENCLAW_HOOKS_TOKEN",
    // The agent CLIs' paths and the runner's tuning: not secret, but tunnel's own.
    "CLAUDE_PATH",
    "CODEX_PATH",
    "GEMINI_PATH",
    "MAX_CONCURRENT",
    "LONG_POLL_WAIT",
    "POLL_INTERVAL",
    "CC_TIMEOUT",
    "PORT",
    "WORKER_PORT",
];

/// Whether a child must not see this variable.
pub fn is_withheld(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    let upper = name.to_ascii_uppercase();
    upper.starts_with("TUNNEL_")
        || upper.starts_with("OPENCLAW_")
        || SECRET_VARS.contains(&upper.as_str())
}

/// The environment every child of tunnel starts with: this process's, without tunnel's
/// variables.
pub fn child_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| !is_withheld(k))
        .collect()
}

/// A command for any child of the runner: the policy's environment (plus `extra`, the agent's
/// own `env` from config), and the user in [`Confinement::run_as`].
pub(crate) fn command(
    program: impl AsRef<OsStr>,
    confine: &Confinement,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.env_clear().envs(child_env());
    if let Some(user) = &confine.run_as {
        // With a wrapper, the wrapper changes user (after the task's cgroup is entered, which
        // needs the runner's rights); without, std does (clearing the supplementary groups).
        if confine.wrapper.is_none() {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    cmd
}

/// How agents are confined beyond their environment.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// A program that restricts itself and then `exec`s the agent, started as
    /// `<wrapper> __sandbox [--uid N --gid N] [--deny PATH]… [--allow PATH]… -- PROGRAM ARGS…`
    /// (the `tunnel` binary; see its `sandbox` module): it changes to `run_as`'s user, closes
    /// `deny` with Landlock (when not empty), then `exec`s. `None`: agents start directly, and tunnel's files are
    /// protected by their permissions only.
    pub wrapper: Option<PathBuf>,
    /// What the agent must not read or change (tunnel's data and config directories).
    pub deny: Vec<PathBuf>,
    /// Run agents as this user (the runner must be root).
    pub run_as: Option<RunAs>,
}

/// Another OS user to run agents as.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl RunAs {
    /// Looks the user up; the runner must be root to switch to it.
    pub fn lookup(name: &str) -> Result<RunAs, String> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| format!("cannot look up user {name:?}: {e}"))?
            .ok_or_else(|| format!("run_as: there is no user {name:?} on this machine"))?;
        if !nix::unistd::Uid::effective().is_root() && user.uid != nix::unistd::Uid::effective() {
            return Err(format!(
                "run_as = {name:?} needs the runner to run as root (it runs as uid {})",
                nix::unistd::Uid::effective()
            ));
        }
        Ok(RunAs {
            name: name.to_owned(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
        })
    }
}

/// The program and arguments to start `program args` with under `confine`: through the
/// wrapper when there is one. `allow` are the directories the agent works in (its project),
/// kept open even when they lie inside a denied directory.
pub(crate) fn wrapped(
    confine: &Confinement,
    program: &str,
    args: &[String],
    allow: &[&Path],
) -> (OsString, Vec<OsString>) {
    let Some(wrapper) = &confine.wrapper else {
        return (program.into(), args.iter().map(OsString::from).collect());
    };
    let mut argv: Vec<OsString> = vec!["__sandbox".into()];
    if let Some(user) = &confine.run_as {
        argv.extend([
            "--uid".into(),
            user.uid.to_string().into(),
            "--gid".into(),
            user.gid.to_string().into(),
        ]);
    }
    for d in &confine.deny {
        argv.push("--deny".into());
        argv.push(d.into());
    }
    for a in allow {
        argv.push("--allow".into());
        argv.push(a.into());
    }
    argv.push("--".into());
    argv.push(program.into());
    argv.extend(args.iter().map(OsString::from));
    (wrapper.into(), argv)
}

/// The wrapper's last argument when it is started ahead of its task (see
/// `supervisor::Warm`): instead of `-- PROGRAM ARGS…` it reads a [`Launch`] from its stdin.
pub const LAUNCH_ON_STDIN: &str = "--launch-on-stdin";

/// What a wrapper started ahead of its task runs once the task comes: everything of the
/// agent's start that depends on the task. Sent on the wrapper's stdin as a length (8 bytes,
/// little-endian) and then that many bytes of JSON, so the wrapper reads exactly this and
/// leaves what follows on the pipe (the prompt of an agent that reads it from stdin) to the
/// agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Launch {
    /// The directories the agent works in, as `--allow` would name them.
    pub allow: Vec<PathBuf>,
    /// The agent's working directory, entered before the user changes (as the runner's
    /// `current_dir` was).
    pub dir: PathBuf,
    pub program: String,
    pub args: Vec<String>,
    /// Added to (and replacing in) the wrapper's environment: the agent's own `env`.
    pub env: Vec<(String, String)>,
    /// The agent's stdin is /dev/null (else it keeps the pipe, after this message).
    pub stdin_null: bool,
}

/// The largest [`Launch`] a wrapper reads (a prompt is at most a few MiB).
pub const LAUNCH_MAX: u64 = 64 << 20;

impl Launch {
    pub fn encode(&self) -> std::io::Result<Vec<u8>> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        Ok(out)
    }

    /// Reads one [`Launch`] and nothing after it (`r` must be unbuffered).
    pub fn read_from(r: &mut impl std::io::Read) -> std::io::Result<Launch> {
        let mut len = [0u8; 8];
        r.read_exact(&mut len)?;
        let len = u64::from_le_bytes(len);
        if len > LAUNCH_MAX {
            return Err(std::io::Error::other(format!(
                "a launch of {len} bytes is more than {LAUNCH_MAX}"
            )));
        }
        let mut json = vec![0u8; len as usize];
        r.read_exact(&mut json)?;
        serde_json::from_slice(&json).map_err(std::io::Error::other)
    }
}

/// The wrapper started ahead of its task: [`wrapped`]'s program and arguments without the
/// task's part (`--allow`, the program), which comes as a [`Launch`]. `None` without a
/// wrapper.
pub(crate) fn waiting(confine: &Confinement) -> Option<(OsString, Vec<OsString>)> {
    confine.wrapper.as_ref()?;
    let (program, mut args) = wrapped(confine, "", &[], &[]);
    // `wrapped` ends with `-- PROGRAM`: the launch replaces both.
    args.truncate(args.len() - 2);
    args.push(LAUNCH_ON_STDIN.into());
    Some((program, args))
}

/// A private temporary directory for one agent run under the sandbox, removed when dropped.
///
/// Landlock closes a denied path by opening only what surrounds it, so a directory that holds
/// one of tunnel's (the system temp directory, when tunnel's state lives there) is listable but
/// nothing new can be made in it: an agent that creates `/tmp/claude-0` on its first run then
/// fails (`EACCES`). This directory exists before the sandbox is planned, so the agent gets all
/// rights in it, and it ends with the task.
#[derive(Debug)]
pub(crate) struct AgentTmp {
    pub(crate) path: PathBuf,
}

/// The variables agents take their temporary directory from (Claude Code has its own).
pub(crate) const TMP_VARS: &[&str] = &["TMPDIR", "TMP", "TEMP", "CLAUDE_CODE_TMPDIR"];

impl AgentTmp {
    /// One for an agent under `confine`, when it runs sandboxed (else `None`: it keeps the
    /// machine's). Made new (never an existing path: another user could have put one there),
    /// mode 0700, owned by `run_as`'s user.
    pub(crate) fn for_agent(confine: &Confinement) -> Option<AgentTmp> {
        use std::os::unix::fs::DirBuilderExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        if confine.wrapper.is_none() || confine.deny.is_empty() {
            return None;
        }
        let base = std::env::temp_dir();
        for _ in 0..16 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("tunnel-agent-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    if let Some(user) = &confine.run_as
                        && let Err(e) =
                            std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                    {
                        tracing::warn!(path = %path.display(), error = %e, "Cannot give the agent's temporary directory to its user.");
                        let _ = std::fs::remove_dir(&path);
                        return None;
                    }
                    return Some(AgentTmp { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "Cannot make a temporary directory for the agent; it uses the machine's.");
                    return None;
                }
            }
        }
        None
    }
}

/// Removes the agents' temporary directories that runners killed before they could remove them
/// left behind (`tunnel-agent-<pid>-<n>` of a pid no longer alive, owned by this user).
pub(crate) fn remove_orphaned_agent_tmps() {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let me = nix::unistd::Uid::effective().as_raw();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("tunnel-agent-"))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // Alive (or not ours to signal): leave it. A directory, not a link, made by this user.
        let gone = matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        let ours = std::fs::symlink_metadata(e.path())
            .is_ok_and(|m| m.is_dir() && (m.uid() == me || me == 0));
        if pid > 0 && gone && ours {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for AgentTmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandboxed_agent_gets_its_own_temporary_directory_until_dropped() {
        assert!(AgentTmp::for_agent(&Confinement::default()).is_none());
        let c = Confinement {
            wrapper: Some("/usr/bin/tunnel".into()),
            deny: vec!["/d".into()],
            run_as: None,
        };
        let (a, b) = (
            AgentTmp::for_agent(&c).unwrap(),
            AgentTmp::for_agent(&c).unwrap(),
        );
        assert_ne!(a.path, b.path);
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::symlink_metadata(&a.path).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        std::fs::write(a.path.join("x"), "y").unwrap();
        let path = a.path.clone();
        drop(a);
        assert!(!path.exists(), "removed with its contents");
    }

    #[test]
    fn orphaned_agent_tmps_of_dead_runners_are_removed_and_live_ones_kept() {
        // A pid that cannot be alive (above the kernel's pid_max limit of 2^22).
        let dead = std::env::temp_dir().join("tunnel-agent-4194305-0");
        let live = std::env::temp_dir().join(format!("tunnel-agent-{}-999999", std::process::id()));
        for d in [&dead, &live] {
            std::fs::create_dir_all(d.join("inner")).unwrap();
        }
        remove_orphaned_agent_tmps();
        assert!(!dead.exists(), "a dead runner's directory is removed");
        assert!(live.exists(), "a live runner's directory is kept");
        std::fs::remove_dir_all(&live).unwrap();
    }

    #[test]
    fn tunnel_variables_are_withheld_and_others_kept() {
        for v in [
            "WORKER_TOKEN",
            "TUNNEL_TOKEN",
            "TUNNEL_WEBHOOK_CI_SECRET",
            "tunnel_database",
            "DATABASE_URL",
            "DISCORD_PROXY",
            "OPENCLAW_HOOKS_TOKEN",
            "CALLBACK_BOT_TOKEN",
        ] {
            assert!(is_withheld(OsStr::new(v)), "{v}");
        }
        for v in ["PATH", "HOME", "ANTHROPIC_API_KEY", "HTTPS_PROXY", "LANG"] {
            assert!(!is_withheld(OsStr::new(v)), "{v}");
        }
    }

    #[test]
    fn a_launch_is_read_exactly_and_what_follows_is_left_to_the_agent() {
        let l = Launch {
            allow: vec!["/w".into()],
            dir: "/w".into(),
            program: "/bin/agent".into(),
            args: vec!["-p".into(), "a prompt\nwith lines".into()],
            env: vec![("K".into(), "v".into())],
            stdin_null: false,
        };
        let mut bytes = l.encode().unwrap();
        bytes.extend_from_slice(b"the prompt on stdin");
        let mut r = &bytes[..];
        assert_eq!(Launch::read_from(&mut r).unwrap(), l);
        assert_eq!(r, b"the prompt on stdin");
        let huge = (LAUNCH_MAX + 1).to_le_bytes();
        assert!(Launch::read_from(&mut &huge[..]).is_err());
        assert!(Launch::read_from(&mut &bytes[..10]).is_err(), "cut short");
    }

    #[test]
    fn a_wrapper_started_ahead_gets_the_runners_part_of_the_arguments() {
        assert!(waiting(&Confinement::default()).is_none());
        let c = Confinement {
            wrapper: Some("/usr/bin/tunnel".into()),
            deny: vec!["/d".into()],
            run_as: Some(RunAs {
                name: "agent".into(),
                uid: 1001,
                gid: 1002,
                home: "/home/agent".into(),
            }),
        };
        let (p, a) = waiting(&c).unwrap();
        assert_eq!(p, "/usr/bin/tunnel");
        assert_eq!(
            a,
            [
                "__sandbox",
                "--uid",
                "1001",
                "--gid",
                "1002",
                "--deny",
                "/d",
                LAUNCH_ON_STDIN
            ]
        );
    }

    #[test]
    fn the_wrapper_goes_in_front() {
        let c = Confinement {
            wrapper: Some("/usr/bin/tunnel".into()),
            deny: vec!["/d".into()],
            run_as: None,
        };
        let (p, a) = wrapped(&c, "claude", &["-p".into()], &[Path::new("/w")]);
        assert_eq!(p, "/usr/bin/tunnel");
        assert_eq!(
            a,
            [
                "__sandbox",
                "--deny",
                "/d",
                "--allow",
                "/w",
                "--",
                "claude",
                "-p"
            ]
        );
        let c = Confinement {
            run_as: Some(RunAs {
                name: "agent".into(),
                uid: 1001,
                gid: 1002,
                home: "/home/agent".into(),
            }),
            ..c
        };
        let (_, a) = wrapped(&c, "claude", &[], &[]);
        assert_eq!(
            a[..5],
            ["__sandbox", "--uid", "1001", "--gid", "1002"],
            "the wrapper changes user (after the cell's cgroup is entered)"
        );
        let (p, a) = wrapped(&Confinement::default(), "claude", &["-p".into()], &[]);
        assert_eq!((p.as_os_str(), a.len()), (OsStr::new("claude"), 1));
    }
}
