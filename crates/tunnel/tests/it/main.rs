//! The `tunnel` binary as a user runs it: real processes, real files, HTTP on loopback.

#![allow(unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod acp;
mod approvals;
mod cli_ux;
mod contain;
mod hostile;
mod setup;

const BIN: &str = env!("CARGO_BIN_EXE_tunnel");

mod chaos;

/// A `tunnel serve` child process on a free port with its own data dir.
struct Served {
    child: Child,
    url: String,
    data: tempfile::TempDir,
}

impl Served {
    fn start(extra_env: &[(&str, &str)]) -> Served {
        Self::start_in(tempfile::tempdir().unwrap(), extra_env)
    }

    /// Serves with `data` as its data and config home (so a config `tunnel init` wrote there is
    /// read).
    fn start_in(data: tempfile::TempDir, extra_env: &[(&str, &str)]) -> Served {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--port", "0", "--log-format", "json"])
            .env("XDG_DATA_HOME", data.path())
            .env("XDG_CONFIG_HOME", data.path())
            .env_remove("WORKER_TOKEN")
            .env_remove("TUNNEL_TOKEN")
            .env_remove("PORT")
            .current_dir(data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && let Some(addr) = v["fields"]["address"].as_str()
                {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server logged its address");
        Served {
            child,
            url: format!("http://{addr}"),
            data,
        }
    }

    /// Runs a client subcommand against this server with the locally saved admin token.
    fn cli(&self, args: &[&str]) -> Output {
        self.cli_with(args, None)
    }

    fn cli_with(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("XDG_DATA_HOME", self.data.path())
            .env("XDG_CONFIG_HOME", self.data.path())
            .env("TUNNEL_URL", &self.url)
            .env_remove("WORKER_TOKEN")
            .env_remove("TUNNEL_TOKEN")
            .current_dir(self.data.path())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data.path().join("tunnel/admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        curl(&[
            "-X",
            "POST",
            &format!("{}{path}", self.url),
            "-H",
            &format!("authorization: Bearer {}", self.admin_token()),
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
        ])
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl, as the README tells a user to do the runner's part by hand.
fn curl(args: &[&str]) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (
        code.parse().unwrap(),
        if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap()
        },
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_readme_walkthrough_works() {
    let s = Served::start(&[]);
    // First start made an admin token only its owner can read.
    let token_file = s.data.path().join("tunnel/admin.token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let out = s.cli(&[
        "submit",
        "--agent",
        "claude",
        "--conversation",
        "readme",
        "say",
        "hello",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    assert_eq!(id.len(), 36, "prints the task id: {id:?}");

    let out = s.cli(&["tasks", "--json"]);
    let tasks: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tasks[0]["id"], id.as_str());
    assert_eq!(tasks[0]["prompt"], "say hello");
    let out = s.cli(&["tasks"]);
    assert!(
        stdout(&out).contains(&id) && stdout(&out).contains("queued"),
        "{}",
        stdout(&out)
    );

    // The runner's part by hand, with curl.
    let (code, offer) = s.post(
        "/v1/claim",
        json!({"runner": "by-hand", "agents": ["claude"], "wait_ms": 1000}),
    );
    assert_eq!(code, 200, "{offer}");
    let at = json!({"attempt": offer["attempt"], "lease_token": offer["lease_token"]});
    assert_eq!(s.post(&format!("/v1/tasks/{id}/ack"), at.clone()).0, 200);
    let watcher = {
        let mut cmd = Command::new(BIN);
        cmd.args(["watch", &id])
            .env("XDG_DATA_HOME", s.data.path())
            .env("TUNNEL_URL", &s.url)
            .env_remove("WORKER_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    };
    let mut events = at.clone();
    events["events"] = json!([{"n": 1, "kind": "text", "data": {"text": "Hello from the agent"}}]);
    assert_eq!(s.post(&format!("/v1/tasks/{id}/events"), events).0, 200);
    let mut finish = at.clone();
    finish["outcome"] = json!("succeeded");
    finish["result"] = json!({"text": "Hello from the agent", "session_id": "s-1"});
    assert_eq!(s.post(&format!("/v1/tasks/{id}/finish"), finish).0, 200);

    let out = watcher.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "watch exits 0 for a succeeded task: {}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("Hello from the agent"),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("succeeded"), "{}", stderr(&out));

    let out = s.cli(&["sessions"]);
    assert!(
        stdout(&out).contains("s-1") && stdout(&out).contains("by-hand"),
        "{}",
        stdout(&out)
    );
    let out = s.cli(&["runners"]);
    assert!(
        stdout(&out).contains("by-hand") && stdout(&out).contains("online"),
        "{}",
        stdout(&out)
    );

    // Cancelling a finished task is refused with a readable error.
    let out = s.cli(&["cancel", &id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already ended"), "{}", stderr(&out));
}

#[test]
fn submit_reads_stdin_and_watch_reports_failure() {
    let s = Served::start(&[]);
    let out = s.cli_with(
        &["submit", "--agent", "codex", "--json", "-"],
        Some("fix the --flaky test\n"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let task: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(task["prompt"], "fix the --flaky test\n");
    let id = task["id"].as_str().unwrap();
    let (_, offer) = s.post("/v1/claim", json!({"runner": "r", "agents": ["codex"]}));
    let at = json!({"attempt": offer["attempt"], "lease_token": offer["lease_token"]});
    s.post(&format!("/v1/tasks/{id}/ack"), at.clone());
    let mut finish = at;
    finish["outcome"] = json!("failed");
    finish["result"] = json!({"error": "codex exited 1", "stderr_tail": "boom"});
    s.post(&format!("/v1/tasks/{id}/finish"), finish);
    let out = s.cli(&["watch", id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("codex exited 1"), "{}", stderr(&out));
}

#[test]
fn tokens_are_created_listed_and_revoked() {
    let s = Served::start(&[]);
    let out = s.cli(&["token", "create", "--name", "plugin", "--role", "client"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let client_token = stdout(&out).trim().to_owned();
    assert!(client_token.starts_with("tnl_"));

    let out = s.cli(&["token", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let plugin = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "plugin")
        .unwrap()
        .clone();
    assert!(
        !stdout(&out).contains(&client_token),
        "secrets are never listed"
    );

    // The new token works, in its role only.
    let out = s.cli(&["tasks", "--token", &client_token]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.cli(&["token", "list", "--token", &client_token]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("admin"), "{}", stderr(&out));

    let out = s.cli(&["token", "revoke", plugin["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.cli(&["tasks", "--token", &client_token]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));

    let out = s.cli(&["token", "create", "--name", "x", "--role", "superuser"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not client, runner or admin"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn weak_or_default_worker_tokens_are_refused_at_start() {
    for (token, why) in [
        ("short", "too short"),
        ("change-me-to-a-secure-token", "default"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args(["serve", "--port", "0"])
            .env("WORKER_TOKEN", token)
            .env("XDG_DATA_HOME", dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(stderr(&out).contains(why), "{}", stderr(&out));
    }
}

#[test]
fn worker_token_works_as_admin_and_no_token_file_is_written() {
    let token = "a1b2c3d4e5f6a7b8c9d0e1f2";
    let s = Served::start(&[("WORKER_TOKEN", token)]);
    assert!(!s.data.path().join("tunnel/admin.token").exists());
    let out = s.cli(&["tasks", "--token", token]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.cli(&["tasks"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no API token"), "{}", stderr(&out));
}

#[test]
fn sigterm_stops_the_server_promptly_with_a_poll_parked() {
    let mut s = Served::start(&[]);
    let url = s.url.clone();
    let token = s.admin_token();
    let poll = std::thread::spawn(move || {
        curl(&[
            "-X",
            "POST",
            &format!("{url}/v1/claim"),
            "-H",
            &format!("authorization: Bearer {token}"),
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"runner":"r","agents":["claude"],"wait_ms":60000}"#,
        ])
    });
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let pid = s.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let (code, _) = poll.join().unwrap();
    assert_eq!(code, 204, "the parked poll was answered, not cut");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// The signal handlers are in place before the server logs its address: a SIGTERM sent the
/// moment it is announced stops it cleanly (exit 0), not by the default action.
#[test]
fn sigterm_as_soon_as_listening_is_a_clean_stop() {
    let mut s = Served::start(&[]);
    let pid = s.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn sigterm_checkpoints_and_removes_the_sqlite_wal() {
    let mut s = Served::start(&[]);
    let wal = s.data.path().join("tunnel/tunnel.db-wal");
    let mut ids = Vec::new();
    for i in 0..5 {
        let (code, task) = s.post(
            "/v1/tasks",
            json!({"agent": "claude", "prompt": format!("task {i}")}),
        );
        assert_eq!(code, 201, "{task}");
        ids.push(task["id"].as_str().unwrap().to_owned());
    }
    let (code, offer) = s.post(
        "/v1/claim",
        json!({"runner": "r", "agents": ["claude"], "wait_ms": 1000}),
    );
    assert_eq!(code, 200, "{offer}");
    assert!(wal.exists(), "the server writes through a WAL");
    let pid = s.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // Checkpointed into the database and closed: nothing for the next start to replay.
    assert!(
        !wal.exists(),
        "the WAL is left behind ({} bytes)",
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0)
    );
    // And nothing was lost: a new server on the same data has all five.
    let data = std::mem::replace(&mut s.data, tempfile::tempdir().unwrap());
    let again = Served::start_in(data, &[]);
    let out = again.cli(&["tasks", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tasks: Value = serde_json::from_slice(&out.stdout).unwrap();
    for id in &ids {
        assert!(
            tasks
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["id"] == id.as_str()),
            "{id} is kept: {tasks}"
        );
    }
}

#[test]
fn config_file_is_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tunnel.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisten = \"127.0.0.1:0\"\nlease_secs = 99999\n",
    )
    .unwrap();
    let out = run_in(dir.path(), &["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("lease of 99999 s is out of range"),
        "{}",
        stderr(&out)
    );

    std::fs::write(&cfg, "[server]\nlisten_address = \"x\"\n").unwrap();
    let out = run_in(dir.path(), &["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown field `listen_address`"),
        "{}",
        stderr(&out)
    );

    std::fs::write(
        &cfg,
        "[server]\nlisten = \"127.0.0.1:0\"\nretention = \"2 weeks\"\n",
    )
    .unwrap();
    let out = run_in(dir.path(), &["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("retention \"2 weeks\" is not a duration"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn client_errors_explain_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["tasks", "--server", "http://127.0.0.1:9", "--token", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is `tunnel serve` running?"),
        "{}",
        stderr(&out)
    );
    let out = run_in(dir.path(), &["submit", "--agent", "--rm", "x"]);
    assert!(!out.status.success());
    let out = Command::new(BIN)
        .args([
            "submit",
            "--server",
            "http://127.0.0.1:9",
            "--token",
            "x",
            "--agent",
            "claude",
            "--timeout",
            "0",
            "p",
        ])
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("timeout_ms"),
        "validated before sending: {}",
        stderr(&out)
    );
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("XDG_DATA_HOME", dir)
        .env("XDG_CONFIG_HOME", dir)
        .env_remove("WORKER_TOKEN")
        .output()
        .unwrap()
}

#[test]
fn a_runner_killed_mid_task_reports_the_task_after_restart_and_leaves_no_agent() {
    let s = Served::start(&[]);
    let dir = s.data.path();
    // In a folder of its own: `dir` holds tunnel's data directory, so the sandboxed agent may
    // not create new files directly in it.
    std::fs::create_dir_all(dir.join("agent")).unwrap();
    let pid_file = dir.join("agent/agent.pid");
    let script = dir.join("slow-agent");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho $$ > {}\necho working\nexec sleep 300\n",
            pid_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = dir.join("runner.toml");
    std::fs::write(
        &cfg,
        format!(
            "[runner]\nname = \"crashy\"\nspool_dir = \"{}\"\n[runner.agents.slow]\nprogram = \"{}\"\ncommand = []\n[runner.agents.claude]\nenabled = false\n[runner.agents.codex]\nenabled = false\n[runner.agents.gemini]\nenabled = false\n",
            dir.join("spool").display(),
            script.display()
        ),
    )
    .unwrap();
    let start_runner = || {
        Command::new(BIN)
            .args([
                "runner",
                "--config",
                cfg.to_str().unwrap(),
                "--server",
                &s.url,
                "--token",
                &s.admin_token(),
            ])
            .env("XDG_DATA_HOME", dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut runner = start_runner();
    // The runner may not have claimed (and so offered `slow`) yet.
    let out = s.cli(&["submit", "--agent", "slow", "--queue-anyway", "go"]);
    let id = stdout(&out).trim().to_owned();
    let agent_pid = wait_for_pid(&pid_file);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stdout(&s.cli(&["tasks", &id])).contains("running") {
        assert!(Instant::now() < deadline, "never running");
        std::thread::sleep(Duration::from_millis(100));
    }
    runner.kill().unwrap(); // SIGKILL: no chance to clean up
    runner.wait().unwrap();
    // The agent runs in its own process group, but the group's guard stops it when its runner
    // dies, so it does not go on working (and editing files) for a task nobody reports.
    let orphan_gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        !Path::new(&format!("/proc/{agent_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{agent_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    assert!(orphan_gone, "the agent outlived its runner");

    let mut runner = start_runner();
    let out = s.cli(&["tasks", "--json", &id]);
    let mut task: Value = serde_json::from_slice(&out.stdout).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while task["state"] == "running" {
        assert!(
            Instant::now() < deadline,
            "the restarted runner never reported the task: {task}"
        );
        std::thread::sleep(Duration::from_millis(100));
        task = serde_json::from_slice(&s.cli(&["tasks", "--json", &id]).stdout).unwrap();
    }
    assert_eq!(task["state"], "failed", "{task}");
    assert!(
        task["result"]["error"]
            .as_str()
            .unwrap()
            .contains("restarted"),
        "{task}"
    );
    let gone = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        !Path::new(&format!("/proc/{agent_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{agent_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    assert!(gone, "the restarted runner stopped the leftover agent");
    let _ = runner.kill();
    let _ = runner.wait();
}

fn wait_for_pid(path: &Path) -> i32 {
    for _ in 0..200 {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(p) = s.trim().parse()
        {
            return p;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no pid in {}", path.display());
}

#[test]
fn doctor_explains_a_missing_cli_and_a_wrong_token() {
    let s = Served::start(&[]);
    let cfg = s.data.path().join("doctor.toml");
    std::fs::write(
        &cfg,
        "[runner.agents.aider]\nprogram = \"/nonexistent/aider\"\ncommand = [\"--message\", \"{prompt}\"]\n",
    )
    .unwrap();
    let out = s.cli(&[
        "doctor",
        "--config",
        cfg.to_str().unwrap(),
        "--server",
        &s.url,
    ]);
    let text = stdout(&out);
    assert!(
        !out.status.success(),
        "a missing custom agent is a problem: {text}"
    );
    assert!(
        text.contains("aider: `/nonexistent/aider` not found"),
        "{text}"
    );
    assert!(text.contains("is valid; its role is admin"), "{text}");
    assert!(
        text.contains("npm install -g @anthropic-ai/claude-code") || text.contains("claude: /"),
        "{text}"
    );
    // Which mechanism ends everything an agent starts.
    assert!(
        text.contains("containment\n")
            && (text.contains("cgroup v2: each task in its own cgroup")
                || text.contains("process-tree walk (")),
        "{text}"
    );

    // A runner machine (its config names the server) where no agent CLI is installed.
    let out = s.cli(&["token", "create", "--name", "box", "--role", "runner"]);
    let runner_token = stdout(&out).trim().to_owned();
    std::fs::write(
        &cfg,
        format!(
            "[runner]\nserver = \"{}\"\ntoken = \"{runner_token}\"\n",
            s.url
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["doctor", "--config", cfg.to_str().unwrap()])
        .env("CLAUDE_PATH", "/nonexistent/claude")
        .env("CODEX_PATH", "/nonexistent/codex")
        .env("GEMINI_PATH", "/nonexistent/gemini")
        .env_remove("WORKER_TOKEN")
        .env_remove("WORKER_URL")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("its role is runner"), "{text}");
    assert!(
        text.contains("FAIL  no agent CLI is installed")
            && text.contains("claude: `/nonexistent/claude` not found"),
        "{text}"
    );

    let out = s.cli(&[
        "doctor",
        "--server",
        &s.url,
        "--token",
        "tnl_000000000000_nope",
    ]);
    let text = stdout(&out);
    assert!(!out.status.success());
    assert!(
        text.contains("refuses the token from --token (401: unknown, mistyped or revoked)"),
        "{text}"
    );
    assert!(text.contains("tunnel token create --role runner"), "{text}");
}

#[test]
fn init_writes_a_private_config_with_tokens_and_never_overwrites_it() {
    let dir = tempfile::tempdir().unwrap();
    let proj = dir.path().join("web");
    std::fs::create_dir_all(&proj).unwrap();
    let out = run_in(
        dir.path(),
        &[
            "init",
            "--yes",
            "--scenario",
            "local",
            "--project",
            &format!("web={}", proj.display()),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg = dir.path().join("tunnel/tunnel.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cfg).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the config holds secrets");
    assert!(
        text.contains("[runner.projects]") && text.contains("token = \"tnl_"),
        "{text}"
    );
    assert!(
        stdout(&out).contains("\"token\": \"tnl_"),
        "prints the plugin config: {}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("tunnel up"), "says what to run next");

    let again = run_in(dir.path(), &["init", "--yes"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        text,
        "nothing replaced"
    );

    // The server started on this machine knows the tokens init made.
    let s = Served::start_in(dir, &[]);
    let out = s.cli(&["token", "list"]);
    assert!(
        stdout(&out).contains("openclaw") && stdout(&out).contains("client"),
        "{}",
        stdout(&out)
    );

    let runner_cfg = s.data.path().join("runner.toml");
    let out = s.cli(&[
        "init",
        "--yes",
        "--scenario",
        "runner",
        "--output",
        runner_cfg.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--server is needed"),
        "{}",
        stderr(&out)
    );
    let out = s.cli(&["token", "create", "--name", "box", "--role", "runner"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let runner_token = stdout(&out).trim().to_owned();
    let out = s.cli(&[
        "init",
        "--yes",
        "--scenario",
        "runner",
        "--server",
        &s.url,
        "--token",
        &runner_token,
        "--name",
        "box",
        "--output",
        runner_cfg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&runner_cfg).unwrap();
    assert!(
        text.contains("name = \"box\"") && text.contains(&s.url),
        "{text}"
    );
}

#[test]
fn install_service_writes_a_user_unit_that_reads_the_token_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &["runner", "install-service", "--no-start"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("tunnel init"), "{}", stderr(&out));

    let out = run_in(
        dir.path(),
        &[
            "init",
            "--yes",
            "--scenario",
            "runner",
            "--server",
            "http://127.0.0.1:9",
            "--token",
            "tnl_abc_secretsecret",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_in(dir.path(), &["runner", "install-service", "--no-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let unit =
        std::fs::read_to_string(dir.path().join("systemd/user/tunnel-runner.service")).unwrap();
    let cfg = dir.path().join("tunnel/tunnel.toml");
    assert!(
        unit.contains(&format!("runner --config \"{}\"", cfg.display())),
        "{unit}"
    );
    assert!(
        !unit.contains("secretsecret"),
        "the token stays in the private config file"
    );
    assert!(
        unit.contains("\nEnvironment=\"PATH="),
        "the agent CLIs are found with the installing shell's PATH: {unit}"
    );
    assert!(
        !unit.contains("network-online"),
        "a user manager has no network-online.target: {unit}"
    );
    // systemd checks the unit where it is installed (not PID 1 here: verify only).
    let runtime = tempfile::tempdir().unwrap();
    if let Ok(v) = Command::new("systemd-analyze")
        .args(["verify", "--user"])
        .arg(dir.path().join("systemd/user/tunnel-runner.service"))
        .env("XDG_RUNTIME_DIR", runtime.path())
        .output()
    {
        assert!(
            v.status.success() && v.stderr.is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&v.stderr)
        );
    }
    assert!(
        stdout(&out).contains("systemctl --user enable --now tunnel-runner"),
        "{}",
        stdout(&out)
    );

    // Everything on one machine: `tunnel up` as the service.
    let out = run_in(dir.path(), &["up", "install-service", "--no-start"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let unit = std::fs::read_to_string(dir.path().join("systemd/user/tunnel-up.service")).unwrap();
    assert!(
        unit.contains(&format!("\" up --config \"{}\"", cfg.display())),
        "{unit}"
    );
    let out = run_in(dir.path(), &["up", "uninstall-service"]);
    assert!(out.status.success());
    assert!(!dir.path().join("systemd/user/tunnel-up.service").exists());

    let out = run_in(dir.path(), &["runner", "uninstall-service"]);
    assert!(out.status.success());
    assert!(
        !dir.path()
            .join("systemd/user/tunnel-runner.service")
            .exists()
    );
}

#[test]
fn containment_is_chosen_in_the_config_and_shown_by_doctor() {
    let s = Served::start(&[]);
    let cfg = s.data.path().join("contain.toml");
    std::fs::write(&cfg, "[runner]\ncontainment = \"process-tree\"\n").unwrap();
    let out = s.cli(&[
        "doctor",
        "--config",
        cfg.to_str().unwrap(),
        "--server",
        &s.url,
    ]);
    let text = stdout(&out);
    assert!(
        text.contains("warn  process-tree walk (chosen in the config)"),
        "{text}"
    );

    std::fs::write(&cfg, "[runner]\ncontainment = \"none\"\n").unwrap();
    let out = s.cli(&[
        "doctor",
        "--config",
        cfg.to_str().unwrap(),
        "--server",
        &s.url,
    ]);
    assert!(!out.status.success());
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        all.contains("unknown variant `none`") && all.contains("process-tree"),
        "{all}"
    );
}
