//! `tunnel init`: writes the config for one of the three deployment scenarios, makes the
//! tokens, and says what to run next. Safe to run again: it never replaces a config (and the
//! secrets in it) unless told to.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tunnel_protocol::Role;
use tunnel_store::{Database, Durability, QueueSettings, ReadyHint, Signals, Store, SystemClock};

use crate::cli::{InitArgs, Scenario};
use crate::config;
use crate::serve::write_private;

/// The store opened by `init` has nobody to tell about changes.
struct Quiet;

impl Signals for Quiet {
    fn task_ready(&self, _: &ReadyHint) {}
    fn task_changed(&self, _: &str) {}
    fn deadline(&self, _: i64) {}
}

/// Asks on stdout, reads a line from stdin (a terminal, or answers piped in); at the end of the
/// input the default is taken.
fn ask(question: &str, default: &str) -> Result<String> {
    if default.is_empty() {
        print!("{question}: ");
    } else {
        print!("{question} [{default}]: ");
    }
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if !std::io::stdin().is_terminal() {
        // Answers piped in are not echoed by a terminal: show them, so the transcript reads
        // like a conversation.
        println!("{}", line.trim_end());
    }
    let answer = line.trim();
    Ok(if answer.is_empty() {
        default.to_owned()
    } else {
        answer.to_owned()
    })
}

/// A URL the client can use, or a clear error naming where it came from.
fn check_url(what: &str, url: &str) -> Result<String> {
    let url = url.trim().trim_end_matches('/').to_owned();
    tunnel_client::Client::new(&url, "-").map_err(|_| {
        anyhow::anyhow!(
            "{what} {url:?} is not a URL like https://tunnel.example.com or http://10.0.0.5:3456"
        )
    })?;
    Ok(url)
}

/// `NAME=DIR` → a `[runner.projects]` line, with the directory made absolute.
fn project_line(p: &str) -> Result<String> {
    let (name, dir) = p
        .split_once('=')
        .with_context(|| format!("project {p:?} is not NAME=DIR"))?;
    tunnel_protocol::validate_name("project", name).map_err(anyhow::Error::msg)?;
    let dir = std::fs::canonicalize(dir)
        .ok()
        .filter(|d| d.is_dir())
        .with_context(|| format!("project {name}: {dir} is not a directory"))?;
    Ok(format!(
        "{name} = {}\n",
        toml_str(&dir.display().to_string())
    ))
}

/// Asks the server whether it takes `token` before anything is written: a typo found now is
/// cheaper than a runner that restarts forever.
async fn check_runner_token(server: &str, token: &str) -> Result<()> {
    let client = tunnel_client::Client::new(server, token)?;
    match client.health().await {
        Ok(_) => {}
        // Something else answers there (a 4xx): this URL will never work.
        Err(tunnel_client::ClientError::Api { status, .. }) if (400..500).contains(&status) => {
            bail!(
                "{server} answers HTTP {status} on /healthz, which a tunnel server does not: check the URL (and the proxy's route to `tunnel serve`); nothing was written"
            )
        }
        Err(tunnel_client::ClientError::Api { status, .. }) => {
            println!(
                "warning: {server} answers HTTP {status} on /healthz, which a tunnel server does not (a wrong URL, or the server behind the proxy is down); the runner will keep trying. `tunnel doctor` checks it again."
            );
            return Ok(());
        }
        Err(e) => {
            println!(
                "warning: the server does not answer yet ({e}); the runner will keep trying. Check the URL with `tunnel doctor` once it is up."
            );
            return Ok(());
        }
    }
    let q = tunnel_client::TaskQuery {
        limit: Some(1),
        ..Default::default()
    };
    match client.tasks(&q).await {
        // A runner token may not list tasks (403); an admin token may.
        Ok(_) | Err(tunnel_client::ClientError::Api { status: 403, .. }) => {
            println!("The server at {server} answers and accepts the token.");
            Ok(())
        }
        Err(tunnel_client::ClientError::Api { status: 401, .. }) => bail!(
            "the server at {server} refuses this token (401): copy the runner token `tunnel init` printed on the server, or make one there with `tunnel token create --role runner --name NAME` (nothing was written)"
        ),
        Err(e) => {
            println!("warning: could not check the token ({e}).");
            Ok(())
        }
    }
}

pub(crate) async fn init(args: InitArgs) -> Result<()> {
    // Without --yes the questions are asked, on a terminal or from answers piped in; at the end
    // of the input, defaults are taken (and a value without a default must come as a flag).
    let interactive = !args.yes;
    let path = args
        .output
        .clone()
        .unwrap_or_else(config::default_config_path);
    if path.exists() && !args.force {
        let replace = interactive
            && ask(
                &format!(
                    "{} exists. Replace it (its settings and the tokens written in it are lost here; tokens already handed out keep working)?",
                    path.display()
                ),
                "no",
            )?
            .to_lowercase()
            .starts_with('y');
        if !replace {
            bail!(
                "{} already exists; keeping it (use --force to replace it)",
                path.display()
            );
        }
    }
    let scenario = match (args.scenario, interactive) {
        (Some(s), _) => s,
        (None, false) => Scenario::Local,
        (None, true) => {
            println!(
                "Where do things run?\n  local   everything on this machine (server + runner)\n  server  this machine is the server; runners connect from elsewhere\n  runner  this machine runs agents for a server elsewhere"
            );
            match ask("scenario", "local")?.to_lowercase().as_str() {
                "local" => Scenario::Local,
                "server" => Scenario::Server,
                "runner" => Scenario::Runner,
                other => bail!("unknown scenario {other:?}: local, server or runner"),
            }
        }
    };
    // Asked where a runner is configured: after the server and token, which can fail.
    let projects = || -> Result<String> {
        let mut list = args.projects.clone();
        if interactive && list.is_empty() {
            let answer = ask(
                "projects the agents may work in, as NAME=DIR separated by spaces (tasks name a project; empty: none)",
                "",
            )?;
            list = answer.split_whitespace().map(str::to_owned).collect();
        }
        let mut lines = String::new();
        for p in &list {
            lines.push_str(&project_line(p)?);
        }
        Ok(lines)
    };

    let text = match scenario {
        Scenario::Local | Scenario::Server => {
            let public = match (&args.public_url, scenario, interactive) {
                (Some(u), _, _) => check_url("--public-url", u)?,
                (None, Scenario::Server, true) => check_url(
                    "the URL",
                    &ask(
                        "the URL runners and OpenClaw will use (https:// behind a TLS proxy, or http://ADDRESS:3456 on a private network)",
                        "",
                    )?,
                )
                .context("the server's public URL is needed (or pass --public-url)")?,
                (None, Scenario::Server, false) => bail!(
                    "--public-url is needed for a server: the URL runners and OpenClaw will use, e.g. https://tunnel.example.com"
                ),
                _ => "http://127.0.0.1:3456".into(),
            };
            // Behind a TLS proxy on this machine the server stays on loopback; a plain http://
            // URL means runners connect to it directly.
            let behind_proxy = public.starts_with("https://");
            let projects = if scenario == Scenario::Local {
                projects()?
            } else {
                String::new()
            };
            // A loopback URL (everything on one host, or an SSH tunnel) needs no open port.
            let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                .iter()
                .any(|p| public.starts_with(p));
            let listen = if scenario == Scenario::Server && !behind_proxy && !loopback {
                "0.0.0.0:3456"
            } else {
                "127.0.0.1:3456"
            };
            // The database `tunnel serve` will use: the tokens must be made in it.
            let db = std::env::var("TUNNEL_DATABASE")
                .ok()
                .or_else(|| std::env::var("DATABASE_URL").ok())
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| config::data_dir().join("tunnel.db").display().to_string());
            let database = Database::parse(&db).map_err(anyhow::Error::msg)?;
            let database = match database {
                Database::Sqlite { path, .. } => {
                    if let Some(dir) = path.parent() {
                        config::private_dir(dir)?;
                    }
                    Database::Sqlite {
                        path,
                        durability: Durability::Normal,
                    }
                }
                pg => pg,
            };
            let store = Store::open(
                &database,
                QueueSettings::default(),
                Arc::new(SystemClock),
                Arc::new(Quiet),
            )
            .await
            .with_context(|| format!("cannot open the database {}", shown_db(&db)))?;
            let admin =
                tunnel_server::mint_token(&store, "admin (tunnel init)".into(), Role::Admin)
                    .await?;
            let client = tunnel_server::mint_token(&store, "openclaw".into(), Role::Client).await?;
            write_private(&config::local_admin_token_path(), &admin.token)?;
            let mut text = format!(
                "# Written by `tunnel init` ({}). Secrets live here: keep it private.\n\
                 [server]\nlisten = \"{listen}\"\ndatabase = {}\n\n[client]\nserver = \"http://127.0.0.1:3456\"\ntoken = {}\n",
                scenario_name(scenario),
                toml_str(&db),
                toml_str(&admin.token)
            );
            if !projects.is_empty() {
                text.push_str(&format!("\n[runner.projects]\n{projects}"));
            }
            let (plugin_url, plugin_note) = if scenario == Scenario::Local {
                (
                    "http://host.docker.internal:3456".to_owned(),
                    "for OpenClaw in Docker on this machine; OpenClaw running directly on this machine uses http://127.0.0.1:3456",
                )
            } else {
                (
                    public.clone(),
                    "OpenClaw on this machine may use http://127.0.0.1:3456 instead, or http://host.docker.internal:3456 from Docker",
                )
            };
            let plugin = serde_json::json!({"plugins": {"entries": {"tunnel": {"enabled": true, "config": {
                "serverUrl": plugin_url,
                "token": client.token}}}}});
            // The checkout this binary was built from has the plugin, if it is still there.
            let plugin_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugin");
            let plugin_dir = std::fs::canonicalize(&plugin_dir).map_or_else(
                |_| "/path/to/tunnel/plugin".to_owned(),
                |d| d.display().to_string(),
            );
            println!(
                "\nOpenClaw: install the plugin once on its host, from a tunnel checkout there:\n  openclaw plugins install --link {plugin_dir} --force --accept-capabilities\n\
                 then merge this into openclaw.json and restart the gateway:\n{}\n({plugin_note}.)",
                serde_json::to_string_pretty(&plugin)?
            );
            if scenario == Scenario::Server {
                let runner =
                    tunnel_server::mint_token(&store, "runner".into(), Role::Runner).await?;
                println!(
                    "\nOn each runner machine (add --project NAME=DIR for each repository the agents may work in):\n  tunnel init --scenario runner --server {public} --token {}\n  tunnel runner\n",
                    runner.token
                );
                if behind_proxy || loopback {
                    println!(
                        "Next, on this machine: `tunnel serve` (it listens on 127.0.0.1:3456){}.\n\
                         `tunnel serve install-service` runs it at login; `tunnel doctor` checks it.",
                        if behind_proxy {
                            format!(
                                " and a TLS reverse proxy from {public} to it (README, \"Docker\": deploy/Caddyfile)"
                            )
                        } else {
                            String::new()
                        }
                    );
                } else {
                    println!(
                        "Next, on this machine: `tunnel serve` (it listens on 0.0.0.0:3456).\n\
                         {public} is plain HTTP: tokens and prompts cross the network unencrypted, so use it only on a private network (LAN, VPN); otherwise put a TLS reverse proxy in front (README, \"Docker\").\n\
                         `tunnel serve install-service` runs it at login; `tunnel doctor` checks it."
                    );
                }
            } else {
                println!(
                    "\nNext: `tunnel up`, then `tunnel submit --agent echo --watch hello`.\n\
                     `tunnel up install-service` runs it at login; `tunnel doctor` checks the agent CLIs."
                );
            }
            text
        }
        Scenario::Runner => {
            let server = match (&args.server, interactive) {
                (Some(s), _) => check_url("--server", s)?,
                (None, true) => check_url(
                    "the server URL",
                    &ask("server URL (as `tunnel init` printed it on the server)", "")?,
                )
                .context("the server's URL is needed (or pass --server)")?,
                (None, false) => bail!("--server is needed for a runner"),
            };
            let token = match (&args.token, interactive) {
                (Some(t), _) => t.trim().to_owned(),
                (None, true) => ask(
                    "runner token (printed by `tunnel init` on the server, or `tunnel token create --role runner --name NAME` there)",
                    "",
                )?,
                (None, false) => String::new(),
            };
            if token.is_empty() {
                bail!(
                    "--token is needed for a runner (create one on the server: `tunnel token create --role runner --name NAME`)"
                );
            }
            check_runner_token(&server, &token).await?;
            let default_name = tunnel_runner::config::default_name();
            let name = match (&args.name, interactive) {
                (Some(n), _) => n.clone(),
                (None, true) => ask("this runner's name", &default_name)?,
                (None, false) => default_name,
            };
            tunnel_protocol::validate_name("runner", &name).map_err(anyhow::Error::msg)?;
            let projects = projects()?;
            let mut text = format!(
                "# Written by `tunnel init` (runner). Secrets live here: keep it private.\n\
                 [runner]\nserver = {}\ntoken = {}\nname = {}\n",
                toml_str(&server),
                toml_str(&token),
                toml_str(&name)
            );
            if !projects.is_empty() {
                text.push_str(&format!("\n[runner.projects]\n{projects}"));
            }
            println!(
                "\nNext: `tunnel doctor` to check the agent CLIs, then `tunnel runner` (or `tunnel runner install-service` to run it at login)."
            );
            text
        }
    };
    write_private(&path, text.trim_end())?;
    println!("Wrote {} (readable only by you).", path.display());
    Ok(())
}

/// A database for messages: a PostgreSQL URL without its password.
fn shown_db(db: &str) -> String {
    match db.split_once("://") {
        Some((scheme, rest)) if rest.contains('@') => {
            format!("{scheme}://…@{}", rest.rsplit_once('@').map_or("", |x| x.1))
        }
        _ => db.to_owned(),
    }
}

/// A TOML string, quoted and escaped.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Local => "local",
        Scenario::Server => "server",
        Scenario::Runner => "runner",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn toml_strings_read_back_as_written() {
        for s in [
            "plain",
            "a \"quoted\" \\ path",
            "tab\there\nnewline",
            "é ü 漢",
        ] {
            let doc = format!("k = {}", super::toml_str(s));
            let v: toml::Table = toml::from_str(&doc).unwrap();
            assert_eq!(v["k"].as_str(), Some(s), "{doc}");
        }
    }
}
