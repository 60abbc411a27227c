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

fn ask(question: &str, default: &str) -> Result<String> {
    print!("{question} [{default}]: ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let answer = line.trim();
    Ok(if answer.is_empty() {
        default.to_owned()
    } else {
        answer.to_owned()
    })
}

pub(crate) async fn init(args: InitArgs) -> Result<()> {
    let interactive = !args.yes && std::io::stdin().is_terminal();
    let path = args
        .output
        .clone()
        .unwrap_or_else(config::default_config_path);
    if path.exists() && !args.force {
        let replace = interactive
            && ask(
                &format!(
                    "{} exists. Replace it (its tokens stop being used)?",
                    path.display()
                ),
                "no",
            )?
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
            match ask("scenario", "local")?.as_str() {
                "local" => Scenario::Local,
                "server" => Scenario::Server,
                "runner" => Scenario::Runner,
                other => bail!("unknown scenario {other:?}: local, server or runner"),
            }
        }
    };
    let mut projects = String::new();
    for p in &args.projects {
        let (name, dir) = p
            .split_once('=')
            .with_context(|| format!("--project {p:?} is not NAME=DIR"))?;
        tunnel_protocol::validate_name("project", name).map_err(anyhow::Error::msg)?;
        let dir = std::fs::canonicalize(dir)
            .with_context(|| format!("project {name}: {dir} is not a directory"))?;
        projects.push_str(&format!("{name} = {:?}\n", dir.display().to_string()));
    }

    let text = match scenario {
        Scenario::Local | Scenario::Server => {
            let public = match (&args.public_url, scenario, interactive) {
                (Some(u), _, _) => u.clone(),
                (None, Scenario::Server, true) => ask(
                    "the URL runners and OpenClaw will use",
                    "https://tunnel.example.com",
                )?,
                (None, Scenario::Server, false) => "https://tunnel.example.com".into(),
                _ => "http://127.0.0.1:3456".into(),
            };
            let listen = if scenario == Scenario::Server {
                "0.0.0.0:3456"
            } else {
                "127.0.0.1:3456"
            };
            let db = config::data_dir().join("tunnel.db");
            let store = Store::open(
                &Database::Sqlite {
                    path: db.clone(),
                    durability: Durability::Normal,
                },
                QueueSettings::default(),
                Arc::new(SystemClock),
                Arc::new(Quiet),
            )
            .await
            .with_context(|| format!("cannot open {}", db.display()))?;
            let admin =
                tunnel_server::mint_token(&store, "admin (tunnel init)".into(), Role::Admin)
                    .await?;
            let client = tunnel_server::mint_token(&store, "openclaw".into(), Role::Client).await?;
            write_private(&config::local_admin_token_path(), &admin.token)?;
            let mut text = format!(
                "# Written by `tunnel init` ({scenario:?}). Secrets live here: keep it private.\n\
                 [server]\nlisten = \"{listen}\"\ndatabase = {:?}\n\n[client]\nserver = \"http://127.0.0.1:3456\"\ntoken = \"{}\"\n",
                db.display().to_string(),
                admin.token
            );
            if !projects.is_empty() {
                text.push_str(&format!("\n[runner.projects]\n{projects}"));
            }
            let plugin = serde_json::json!({"plugins": {"entries": {"tunnel": {"enabled": true, "config": {
                "serverUrl": if scenario == Scenario::Local { "http://host.docker.internal:3456".to_owned() } else { public.clone() },
                "token": client.token}}}}});
            println!(
                "\nOpenClaw plugin config (merge into openclaw.json; use http://127.0.0.1:3456 if OpenClaw is not in Docker):\n{}",
                serde_json::to_string_pretty(&plugin)?
            );
            if scenario == Scenario::Server {
                let runner =
                    tunnel_server::mint_token(&store, "runner".into(), Role::Runner).await?;
                println!(
                    "\nOn each runner machine:\n  tunnel init --scenario runner --server {public} --token {}\n  tunnel runner\n",
                    runner.token
                );
                println!(
                    "Next, on this machine: `tunnel serve` behind a TLS reverse proxy for {public} (see the README)."
                );
            } else {
                println!("\nNext: `tunnel up`, then `tunnel submit --agent echo --watch hello`.");
            }
            text
        }
        Scenario::Runner => {
            let server = match (&args.server, interactive) {
                (Some(s), _) => s.clone(),
                (None, true) => ask("server URL", "https://tunnel.example.com")?,
                (None, false) => bail!("--server is needed for a runner"),
            };
            let token = match (&args.token, interactive) {
                (Some(t), _) => t.clone(),
                (None, true) => ask(
                    "runner token (from `tunnel token create --role runner` on the server)",
                    "",
                )?,
                (None, false) => bail!(
                    "--token is needed for a runner (create one on the server: `tunnel token create --role runner --name NAME`)"
                ),
            };
            let client = tunnel_client::Client::new(&server, &token)?;
            match client.health().await {
                Ok(_) => println!("The server at {server} answers."),
                Err(e) => println!(
                    "warning: the server does not answer yet ({e}); the runner will keep trying."
                ),
            }
            let name = args
                .name
                .clone()
                .unwrap_or_else(tunnel_runner::config::default_name);
            let mut text = format!(
                "# Written by `tunnel init` (runner). Secrets live here: keep it private.\n\
                 [runner]\nserver = \"{server}\"\ntoken = \"{token}\"\nname = \"{name}\"\n"
            );
            if !projects.is_empty() {
                text.push_str(&format!("\n[runner.projects]\n{projects}"));
            }
            println!(
                "\nNext: `tunnel runner` (or `tunnel runner install-service` to run it at login), and `tunnel doctor` to check the agent CLIs."
            );
            text
        }
    };
    write_private(&path, text.trim_end())?;
    println!("Wrote {} (readable only by you).", path.display());
    Ok(())
}
