//! `tunnel runner install-service` and `tunnel serve install-service`: a systemd user unit on
//! Linux, a launchd agent on macOS. The unit runs the binary with the config file; the token
//! stays in that file (readable only by its owner), never in the unit.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

use crate::cli::ServiceAction;
use crate::config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Runner,
    Server,
    /// `tunnel up`: the server and a runner in one process (everything on one machine).
    Up,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Runner => "tunnel-runner",
            Kind::Server => "tunnel-server",
            Kind::Up => "tunnel-up",
        }
    }

    fn subcommand(self) -> &'static str {
        match self {
            Kind::Runner => "runner",
            Kind::Server => "serve",
            Kind::Up => "up",
        }
    }
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// The unit file's path for this platform.
fn unit_path(kind: Kind) -> Result<PathBuf> {
    Ok(if cfg!(target_os = "macos") {
        home()?.join(format!(
            "Library/LaunchAgents/dev.tunnel.{}.plist",
            kind.subcommand()
        ))
    } else {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .map_or_else(|| home().map(|h| h.join(".config")), Ok)?;
        base.join(format!("systemd/user/{}.service", kind.name()))
    })
}

/// One word of a systemd command line or assignment, quoted: spaces, quotes, `%` specifiers
/// and `$` variables in a path stay literal.
fn systemd_quote(s: &str, in_exec: bool) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '%' => out.push_str("%%"),
            '$' if in_exec => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A systemd user unit. `path` is the PATH of the shell that installed it: the user manager's
/// own PATH rarely has npm's global bin directory, where the agent CLIs live.
pub(crate) fn systemd_unit(kind: Kind, exe: &Path, config: &Path, path: Option<&str>) -> String {
    let env = path
        .map(|p| {
            format!(
                "Environment={}\n",
                systemd_quote(&format!("PATH={p}"), false)
            )
        })
        .unwrap_or_default();
    // No network-online.target: a user manager cannot order on it, and both commands retry
    // the network by themselves.
    format!(
        "[Unit]\nDescription=tunnel {sub} (coding tasks from chat to AI agents)\n\n\
         [Service]\nExecStart={exe} {sub} --config {config}\n{env}\
         Restart=on-failure\nRestartSec=5\n\
         # SIGTERM lets running tasks finish (up to the runner's grace), then they are stopped.\n\
         KillMode=mixed\nTimeoutStopSec=90\n\
         # Each connection (parked long-polls included) is an open file; 1,024 is not enough.\n\
         LimitNOFILE=65536\n\
         # The runner puts each task in a cgroup of its own under this one (see `tunnel doctor`).\n\
         Delegate=yes\n\n\
         [Install]\nWantedBy=default.target\n",
        sub = kind.subcommand(),
        exe = systemd_quote(&exe.display().to_string(), true),
        config = systemd_quote(&config.display().to_string(), true),
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A launchd agent.
pub(crate) fn launchd_plist(
    kind: Kind,
    exe: &Path,
    config: &Path,
    logs: &Path,
    path: Option<&str>,
) -> String {
    let label = format!("dev.tunnel.{}", kind.subcommand());
    let env = path
        .map(|p| {
            format!(
                "\t<key>EnvironmentVariables</key>\n\t<dict><key>PATH</key><string>{}</string></dict>\n",
                xml_escape(p)
            )
        })
        .unwrap_or_default();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <plist version=\"1.0\">\n<dict>\n\
         \t<key>Label</key><string>{label}</string>\n\
         \t<key>ProgramArguments</key>\n\t<array>\n\
         \t\t<string>{exe}</string><string>{sub}</string><string>--config</string><string>{config}</string>\n\
         \t</array>\n{env}\
         \t<key>RunAtLoad</key><true/>\n\t<key>KeepAlive</key><true/>\n\
         \t<key>SoftResourceLimits</key>\n\t<dict><key>NumberOfFiles</key><integer>10240</integer></dict>\n\
         \t<key>HardResourceLimits</key>\n\t<dict><key>NumberOfFiles</key><integer>10240</integer></dict>\n\
         \t<key>StandardOutPath</key><string>{log}</string>\n\
         \t<key>StandardErrorPath</key><string>{log}</string>\n\
         </dict>\n</plist>\n",
        exe = xml_escape(&exe.display().to_string()),
        sub = kind.subcommand(),
        config = xml_escape(&config.display().to_string()),
        log = xml_escape(
            &logs
                .join(format!("{}.log", kind.name()))
                .display()
                .to_string()
        ),
    )
}

/// Variables a shell often holds for the agent CLIs that a service does not inherit.
const AGENT_KEYS: [&str; 6] = [
    "ANTHROPIC_API_KEY",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "OPENAI_API_KEY",
    "CODEX_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
];

pub(crate) fn service(
    kind: Kind,
    action: ServiceAction,
    config: Option<&Path>,
) -> Result<ExitCode> {
    let unit = unit_path(kind)?;
    match action {
        ServiceAction::InstallService { no_start } => {
            let config = match config {
                Some(c) => c
                    .canonicalize()
                    .with_context(|| format!("config file {}", c.display()))?,
                None => config::default_config_path(),
            };
            if !config.exists() {
                bail!(
                    "{} does not exist: run `tunnel init` first (the service reads its token from there)",
                    config.display()
                );
            }
            let exe = std::env::current_exe().context("cannot find the tunnel binary")?;
            let path = std::env::var("PATH").ok().filter(|p| !p.is_empty());
            let text = if cfg!(target_os = "macos") {
                launchd_plist(
                    kind,
                    &exe,
                    &config,
                    &home()?.join("Library/Logs"),
                    path.as_deref(),
                )
            } else {
                systemd_unit(kind, &exe, &config, path.as_deref())
            };
            if let Some(dir) = unit.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            std::fs::write(&unit, text)
                .with_context(|| format!("cannot write {}", unit.display()))?;
            println!(
                "Wrote {} (it runs with this shell's PATH; the token stays in {}).",
                unit.display(),
                config.display()
            );
            let keys: Vec<&str> = AGENT_KEYS
                .into_iter()
                .filter(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()))
                .collect();
            if kind != Kind::Server && !keys.is_empty() {
                println!(
                    "Note: {} is set in this shell but the service will not see it; put it under [runner.agents.NAME] env in {} (readable only by you), or log the CLI in once.",
                    keys.join(", "),
                    config.display()
                );
            }
            let start: Vec<Vec<String>> = if cfg!(target_os = "macos") {
                vec![vec![
                    "launchctl".into(),
                    "load".into(),
                    "-w".into(),
                    unit.display().to_string(),
                ]]
            } else {
                vec![
                    vec!["systemctl".into(), "--user".into(), "daemon-reload".into()],
                    vec![
                        "systemctl".into(),
                        "--user".into(),
                        "enable".into(),
                        "--now".into(),
                        kind.name().into(),
                    ],
                ]
            };
            if no_start {
                println!("Start it with:");
                for c in &start {
                    println!("  {}", c.join(" "));
                }
            } else {
                for c in &start {
                    let ok = Command::new(&c[0])
                        .env_clear()
                        .envs(tunnel_runner::confine::child_env())
                        .args(&c[1..])
                        .status()
                        .is_ok_and(|s| s.success());
                    if !ok {
                        println!(
                            "`{}` did not succeed; run it yourself once the user service manager is available.",
                            c.join(" ")
                        );
                        return Ok(ExitCode::FAILURE);
                    }
                }
                if cfg!(target_os = "macos") {
                    println!("Started. Logs: ~/Library/Logs/{}.log", kind.name());
                } else {
                    println!("Started. Logs: journalctl --user -u {}", kind.name());
                }
            }
            if !cfg!(target_os = "macos") {
                println!(
                    "To keep it running when you are logged out: loginctl enable-linger $USER"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ServiceAction::UninstallService => {
            if cfg!(target_os = "macos") {
                let _ = Command::new("launchctl")
                    .env_clear()
                    .envs(tunnel_runner::confine::child_env())
                    .args(["unload", "-w"])
                    .arg(&unit)
                    .status();
            } else {
                let _ = Command::new("systemctl")
                    .env_clear()
                    .envs(tunnel_runner::confine::child_env())
                    .args(["--user", "disable", "--now", kind.name()])
                    .status();
            }
            match std::fs::remove_file(&unit) {
                Ok(()) => println!("Removed {}.", unit.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("No service was installed ({}).", unit.display())
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", unit.display()));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{Kind, launchd_plist, systemd_unit};

    #[test]
    fn odd_paths_stay_literal_in_a_systemd_unit() {
        let unit = systemd_unit(
            Kind::Runner,
            Path::new("/opt/my tools/tunnel"),
            Path::new("/home/a%b/$HOME/\"q\".toml"),
            Some("/usr/bin:/home/a%b/.npm/bin"),
        );
        assert!(
            unit.contains(
                "ExecStart=\"/opt/my tools/tunnel\" runner --config \"/home/a%%b/$$HOME/\\\"q\\\".toml\""
            ),
            "{unit}"
        );
        assert!(
            unit.contains("Environment=\"PATH=/usr/bin:/home/a%%b/.npm/bin\""),
            "{unit}"
        );
        // A server holds a file per connection: the unit must not leave it at 1,024.
        assert!(unit.contains("\nLimitNOFILE=65536\n"), "{unit}");
    }

    #[test]
    fn a_launchd_agent_escapes_xml_and_carries_path() {
        let plist = launchd_plist(
            Kind::Server,
            Path::new("/Users/a&b/tunnel"),
            Path::new("/Users/a&b/.config/tunnel/tunnel.toml"),
            Path::new("/Users/a&b/Library/Logs"),
            Some("/opt/homebrew/bin:/usr/bin"),
        );
        assert!(
            plist.contains("<string>/Users/a&amp;b/tunnel</string><string>serve</string>"),
            "{plist}"
        );
        assert!(!plist.contains("a&b"), "{plist}");
        assert!(
            plist.contains("<key>PATH</key><string>/opt/homebrew/bin:/usr/bin</string>"),
            "{plist}"
        );
        assert!(plist.contains("<key>Label</key><string>dev.tunnel.serve</string>"));
        assert!(
            plist.contains("<key>SoftResourceLimits</key>\n\t<dict><key>NumberOfFiles</key><integer>10240</integer></dict>"),
            "{plist}"
        );
    }
}
