//! What a person sees from the CLI (issue 18, CLI items; issue 14, terminal escapes): the
//! binary against a real `tunnel serve`, the runner's part by hand with curl.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::{BIN, Served, stderr, stdout};

/// Submits `prompt` for `agent` through the CLI; returns the task id.
fn submit(s: &Served, agent: &str, prompt: &str) -> String {
    let out = s.cli(&["submit", "--agent", agent, "--queue-anyway", prompt]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_owned()
}

/// Claims and acks `id` as runner `runner`; returns the attempt reference.
fn start(s: &Served, id: &str, runner: &str, agent: &str) -> Value {
    let (code, offer) = s.post(
        "/v1/claim",
        json!({"runner": runner, "agents": [agent], "wait_ms": 1000}),
    );
    assert_eq!(code, 200, "{offer}");
    assert_eq!(offer["task"]["id"], id);
    let at = json!({"attempt": offer["attempt"], "lease_token": offer["lease_token"]});
    assert_eq!(s.post(&format!("/v1/tasks/{id}/ack"), at.clone()).0, 200);
    at
}

fn events(s: &Served, id: &str, at: &Value, events: Value) {
    let mut body = at.clone();
    body["events"] = events;
    let (code, v) = s.post(&format!("/v1/tasks/{id}/events"), body);
    assert_eq!(code, 200, "{v}");
}

fn finish(s: &Served, id: &str, at: &Value, outcome: &str, result: Value) {
    let mut body = at.clone();
    body["outcome"] = json!(outcome);
    body["result"] = result;
    let (code, v) = s.post(&format!("/v1/tasks/{id}/finish"), body);
    assert_eq!(code, 200, "{v}");
}

#[test]
fn an_agent_no_runner_offers_is_refused_with_a_suggestion() {
    let s = Served::start(&[]);
    // Before any runner: the built-in agents are known, a typo is not.
    let out = s.cli(&["submit", "--agent", "claud", "--watch", "hi"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Did you mean claude?"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--queue-anyway"), "{}", stderr(&out));
    let out = s.cli(&["tasks", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!([]),
        "nothing was submitted"
    );
    let out = s.cli(&["submit", "--agent", "claude", "hi"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // An agent of this machine's own runner config is known too: `tunnel up` starts that
    // runner, which may not have claimed yet when the first submit comes.
    let cfg = s.data.path().join("own.toml");
    std::fs::write(
        &cfg,
        "[runner.agents.mine]\nprogram = \"cat\"\ncommand = []\n",
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = cfg.to_str().unwrap();
    let out = s.cli(&["--config", cfg, "submit", "--agent", "mine", "hi"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.cli(&["--config", cfg, "submit", "--agent", "mime", "hi"]);
    assert!(!out.status.success(), "a typo is still refused");

    // Once runners have connected, the agents they offered are the known ones.
    let (code, _) = s.post(
        "/v1/claim",
        json!({"runner": "r1", "agents": ["reviewer"], "wait_ms": 0}),
    );
    assert!(code == 200 || code == 204, "{code}");
    let out = s.cli(&["submit", "--agent", "reviewr", "hi"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("Did you mean reviewer?"), "{err}");
    assert!(err.contains("no runner has ever offered"), "{err}");
    // Error text once, not repeated by the error chain.
    assert_eq!(err.matches("Did you mean").count(), 1, "{err}");
    let out = s.cli(&["submit", "--agent", "reviewr", "--queue-anyway", "hi"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn watch_shows_steps_for_people_and_raw_events_on_request() {
    let s = Served::start(&[]);
    let id = submit(&s, "claude", "list the files");
    let at = start(&s, &id, "box", "claude");
    events(
        &s,
        &id,
        &at,
        json!([
            {"n": 1, "kind": "session", "data": {"session_id": "s-9", "model": "claude-sonnet-4-5"}},
            {"n": 2, "kind": "tool_use", "data": {"name": "Bash", "id": "t1", "input": {"command": "ls -la src"}}},
            {"n": 3, "kind": "tool_result", "data": {"id": "t1", "is_error": false, "output": "a.rs"}},
            {"n": 4, "kind": "tool_use", "data": {"name": "Read", "id": "t2", "input": {"file_path": "/w/src/a.rs"}}},
            {"n": 5, "kind": "text", "data": {"text": "There is one file."}},
            {"n": 6, "kind": "usage", "data": {"cost_usd": 0.0123, "usage": {"input_tokens": 10}, "num_turns": 2, "duration_ms": 65000}},
        ]),
    );
    finish(
        &s,
        &id,
        &at,
        "succeeded",
        json!({"text": "There is one file.", "session_id": "s-9", "duration_ms": 65000,
               "usage": {"cost_usd": 0.0123}}),
    );

    let out = s.cli(&["watch", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("› Bash: ls -la src"), "{err}");
    assert!(err.contains("› Read: /w/src/a.rs"), "{err}");
    assert!(err.contains("running on box"), "{err}");
    assert!(!err.contains('{'), "no raw JSON for people: {err}");
    let last = err.lines().last().unwrap();
    for part in [
        "succeeded",
        "1m 05s",
        "claude-sonnet-4-5",
        "$0.0123",
        "session s-9",
    ] {
        assert!(last.contains(part), "{part:?} in the final line: {last}");
    }
    assert_eq!(stdout(&out).trim(), "There is one file.");

    let out = s.cli(&["watch", "--verbose", &id]);
    let err = stderr(&out);
    assert!(err.contains("[session] {"), "{err}");
    assert!(err.contains("\"command\":\"ls -la src\""), "{err}");

    let out = s.cli(&["watch", "--json", &id]);
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|e| e["kind"] == "tool_use"));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));

    // `tasks ID` shows where, how long and what it cost.
    let out = s.cli(&["tasks", &id]);
    let o = stdout(&out);
    assert!(o.contains("runner:       box"), "{o}");
    assert!(o.contains("duration:     1m 05s"), "{o}");
    assert!(o.contains("cost:         $0.0123"), "{o}");
}

#[test]
fn a_failure_is_said_once() {
    let s = Served::start(&[]);
    let id = submit(&s, "codex", "fail");
    let at = start(&s, &id, "box", "codex");
    events(
        &s,
        &id,
        &at,
        json!([{"n": 1, "kind": "error", "data": {"message": "model overloaded, try later"}}]),
    );
    finish(
        &s,
        &id,
        &at,
        "failed",
        json!({"error": "model overloaded, try later", "exit_code": 1}),
    );
    let out = s.cli(&["watch", &id]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.matches("model overloaded").count(), 1, "{err}");
    assert!(err.lines().last().unwrap().contains("failed"), "{err}");
    assert_eq!(err.matches("failed").count(), 1, "{err}");
}

#[test]
fn terminal_escapes_from_the_server_are_made_visible_but_json_is_unchanged() {
    let s = Served::start(&[]);
    // OSC 52 writes the clipboard; CSI 2J clears the screen.
    let prompt = "hi \u{1b}]52;c;ZWNobyBwd25lZA==\u{7} there";
    let id = submit(&s, "claude", prompt);
    let at = start(&s, &id, "box", "claude");
    events(
        &s,
        &id,
        &at,
        json!([{"n": 1, "kind": "text", "data": {"text": "done\u{1b}[2J\u{9b}31m"}},
               {"n": 2, "kind": "tool_use", "data": {"name": "Bash\u{1b}]0;title\u{7}", "input": {"command": "ls"}}}]),
    );
    finish(&s, &id, &at, "succeeded", json!({"text": "done\u{1b}[2J"}));
    for args in [
        vec!["tasks"],
        vec!["tasks", id.as_str()],
        vec!["watch", id.as_str()],
        vec!["watch", "--verbose", id.as_str()],
        vec!["runners"],
    ] {
        let out = s.cli(&args);
        let all = [out.stdout.as_slice(), out.stderr.as_slice()].concat();
        assert!(
            !all.contains(&0x1b) && !all.contains(&0x07),
            "{args:?}: raw control characters: {}",
            String::from_utf8_lossy(&all)
        );
        assert!(
            !String::from_utf8_lossy(&all).contains('\u{9b}'),
            "{args:?}: raw C1 control"
        );
    }
    let out = s.cli(&["tasks", &id]);
    assert!(
        stdout(&out).contains("hi \\x1b]52;c;ZWNobyBwd25lZA==\\x07 there"),
        "{}",
        stdout(&out)
    );
    let out = s.cli(&["tasks", "--json", &id]);
    let task: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(task["prompt"], prompt, "--json carries the data unchanged");
}

/// `tunnel submit --watch` for a task no runner takes, with stderr read line by line.
struct Watching {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watching {
    fn start(s: &Served, extra: &[&str]) -> Watching {
        let mut child = Command::new(BIN)
            .args(["submit", "--agent", "claude", "--watch"])
            .args(extra)
            .arg("hello")
            .env("XDG_DATA_HOME", s.data.path())
            .env("XDG_CONFIG_HOME", s.data.path())
            .env("TUNNEL_URL", &s.url)
            .env_remove("WORKER_TOKEN")
            .env_remove("TUNNEL_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Watching {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `what`.
    fn wait_for(&mut self, what: &str) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => {
                    let hit = l.contains(what);
                    self.seen.push(l);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!("no {what:?} on stderr: {:#?}", self.seen),
            }
        }
    }

    fn rest(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.iter());
        (status.code(), self.seen.join("\n"))
    }
}

#[test]
fn ctrl_c_leaves_the_task_running_and_says_how_to_come_back() {
    let s = Served::start(&[]);
    let mut w = Watching::start(&s, &[]);
    w.wait_for("waiting for a runner offering agent claude");
    let pid = w.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (code, err) = w.rest();
    assert_eq!(code, Some(130), "{err}");
    let out = s.cli(&["tasks", "--json"]);
    let tasks: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = tasks[0]["id"].as_str().unwrap();
    assert_eq!(tasks[0]["state"], "queued", "the task goes on");
    assert!(err.contains(&format!("`tunnel watch {id}`")), "{err}");
    assert!(err.contains(&format!("`tunnel cancel {id}`")), "{err}");
}

#[test]
fn watch_gives_up_after_its_timeout_and_says_what_it_waited_for() {
    let s = Served::start(&[]);
    let id = submit(&s, "gemini", "hi");
    let out = s.cli(&["watch", "--timeout", "1", &id]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("Gave up watching after 1 s"), "{err}");
    assert!(
        err.contains("still queued, waiting for a runner offering agent gemini"),
        "{err}"
    );
    assert!(err.contains(&format!("`tunnel cancel {id}`")), "{err}");

    // `submit --watch --timeout`: the same limit while nothing takes the task.
    let mut w = Watching::start(&s, &["--timeout", "1"]);
    w.wait_for("Gave up watching after 1 s");
    let (code, _) = w.rest();
    assert_eq!(code, Some(124));
}

#[test]
fn help_describes_every_option_and_serve_is_not_sqlite_only() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let top = stdout(&out);
    assert!(top.contains("SQLite or PostgreSQL"), "{top}");
    for sub in [
        "init",
        "up",
        "serve",
        "serve install-service",
        "runner",
        "submit",
        "watch",
        "tasks",
        "cancel",
        "approvals",
        "approve",
        "sessions",
        "sessions new",
        "sessions resume",
        "runners",
        "token",
        "token create",
        "token revoke",
        "dashboard",
        "doctor",
    ] {
        let out = Command::new(BIN)
            .args(sub.split(' '))
            .arg("--help")
            .output()
            .unwrap();
        let help = stdout(&out);
        assert!(out.status.success(), "{sub}: {}", stderr(&out));
        assert!(
            !help.contains("scripts/") && !help.contains("schemathesis"),
            "{sub}: test scripts in user help: {help}"
        );
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim();
            // Options (`-a, --agent <AGENT>`) and arguments (`<ID>`), not value lists (`- x: …`).
            let option = (t.starts_with('-') && !t.starts_with("- "))
                || (t.starts_with('<') && line.starts_with("  "));
            if !option {
                continue;
            }
            // What follows the option on its line, without `[default: …]`, else the next line
            // when it is indented further (clap's long form).
            let same = t.split_once("  ").map(|(_, d)| d.trim()).unwrap_or("");
            let said = !same.is_empty() && !same.starts_with('[')
                || lines.get(i + 1).is_some_and(|n| {
                    let indent = |s: &str| s.len() - s.trim_start().len();
                    !n.trim().is_empty() && !n.trim().starts_with('[') && indent(n) > indent(line)
                });
            assert!(said, "{sub}: {t:?} has no description:\n{help}");
        }
    }
}

#[test]
fn listen_accepts_a_host_name() {
    let s = Served::start(&[("TUNNEL_LISTEN", "localhost:3456")]);
    assert!(s.url.starts_with("http://127.0.0.1:"), "{}", s.url);
    let out = s.cli(&["tasks"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `tunnel serve` with text logs, under a pseudo-terminal when `tty` (script(1)); returns what
/// it wrote once it is listening, then stops it.
fn serve_log(tty: bool, no_color: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let serve = format!("exec {BIN} serve --port 0 --log-format text");
    let mut cmd = if tty {
        let mut c = Command::new("script");
        c.args(["-qefc", &format!("echo PID $$; {serve}"), "/dev/null"]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &format!("echo PID $$ >&2; {serve}")]);
        c
    };
    cmd.env("XDG_DATA_HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path())
        .env_remove("WORKER_TOKEN")
        .env_remove("PORT")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(if tty { Stdio::piped() } else { Stdio::null() })
        .stderr(if tty { Stdio::null() } else { Stdio::piped() });
    if no_color {
        cmd.env("NO_COLOR", "1");
    } else {
        cmd.env_remove("NO_COLOR");
    }
    let mut child = cmd.spawn().unwrap();
    let out: Box<dyn std::io::Read + Send> = if tty {
        Box::new(child.stdout.take().unwrap())
    } else {
        Box::new(child.stderr.take().unwrap())
    };
    let mut reader = BufReader::new(out);
    let mut all = Vec::new();
    let mut pid = None;
    loop {
        let mut line = Vec::new();
        assert!(
            reader.read_until(b'\n', &mut line).unwrap() > 0,
            "ended early: {}",
            String::from_utf8_lossy(&all)
        );
        let text = String::from_utf8_lossy(&line).into_owned();
        if let Some(p) = text.trim().strip_prefix("PID ") {
            pid = Some(p.to_owned());
        }
        all.extend_from_slice(&line);
        if text.contains("listening") {
            break;
        }
    }
    Command::new("kill")
        .args(["-TERM", &pid.unwrap()])
        .status()
        .unwrap();
    let _ = std::io::Read::read_to_end(&mut reader, &mut all);
    child.wait().unwrap();
    all
}

#[test]
fn logs_are_coloured_only_on_a_terminal_without_no_color() {
    assert!(
        !serve_log(false, false).contains(&0x1b),
        "no colour codes in a log file"
    );
    assert!(
        !serve_log(true, true).contains(&0x1b),
        "NO_COLOR is honoured"
    );
    assert!(
        serve_log(true, false).windows(2).any(|w| w == b"\x1b["),
        "a person at a terminal still gets colour"
    );
}

#[test]
fn a_second_server_on_the_same_sqlite_file_or_port_is_refused_clearly() {
    let s = Served::start(&[]);
    let out = Command::new(BIN)
        .args(["serve", "--port", "0"])
        .env("XDG_DATA_HOME", s.data.path())
        .env("XDG_CONFIG_HOME", s.data.path())
        .env_remove("WORKER_TOKEN")
        .env_remove("PORT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("is already serving the database"), "{err}");
    assert!(err.contains("PostgreSQL"), "{err}");
    assert!(
        err.contains(&format!("pid {}", s.child.id())),
        "names the holder: {err}"
    );
    // `tunnel up` takes the same lock.
    let out = Command::new(BIN)
        .args(["up", "--port", "0"])
        .env("XDG_DATA_HOME", s.data.path())
        .env("XDG_CONFIG_HOME", s.data.path())
        .env_remove("WORKER_TOKEN")
        .env_remove("PORT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is already serving the database"),
        "{}",
        stderr(&out)
    );
    // The first one is unharmed.
    assert!(s.cli(&["tasks"]).status.success());

    // A busy port, with another database.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--port", &port])
        .env("XDG_DATA_HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path())
        .env_remove("WORKER_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("another tunnel may be running") && err.contains("use --port"),
        "{err}"
    );
    assert_eq!(err.matches("error:").count(), 1, "{err}");
}

#[test]
fn an_error_and_its_cause_are_said_once() {
    let out = Command::new(BIN)
        .args(["tasks", "--server", "http://127.0.0.1:9", "--token", "x"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(err.contains("error sending request"), "{err}");
    assert_eq!(err.matches("error sending request").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn doctor_follows_tunnel_url_and_names_the_tokens_role() {
    let s = Served::start(&[]);
    // TUNNEL_URL only (set by `cli`), as for every other client command.
    let out = s.cli(&["doctor"]);
    let text = stdout(&out);
    assert!(text.contains(&format!("{} answers", s.url)), "{text}");
    assert!(text.contains("its role is admin"), "{text}");
    let out = s.cli(&["token", "create", "--name", "cli", "--role", "client"]);
    let client = stdout(&out).trim().to_owned();
    let mut cmd = Command::new(BIN);
    let out = cmd
        .arg("doctor")
        .env("XDG_DATA_HOME", s.data.path())
        .env("XDG_CONFIG_HOME", s.data.path())
        .env("TUNNEL_URL", &s.url)
        .env("TUNNEL_TOKEN", &client)
        .env_remove("WORKER_TOKEN")
        .env_remove("WORKER_URL")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("the token from TUNNEL_TOKEN is valid; its role is client"),
        "{text}"
    );
}

fn runner_online(s: &Served, name: &str) -> Option<bool> {
    let out = s.cli(&["runners", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    list["runners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .map(|r| r["online"] == true)
}

fn goodbye(s: &Served, name: &str, token: &str) -> (u16, Value) {
    super::curl(&[
        "-X",
        "POST",
        &format!("{}/v1/runners/{name}/goodbye", s.url),
        "-H",
        &format!("authorization: Bearer {token}"),
    ])
}

fn token(s: &Served, name: &str, role: &str) -> String {
    let out = s.cli(&["token", "create", "--name", name, "--role", role]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_owned()
}

#[test]
fn a_runner_stopped_cleanly_is_offline_at_once() {
    let s = Served::start(&[]);
    let runner_token = token(&s, "box", "runner");
    let home = tempfile::tempdir().unwrap();
    let mut runner = Command::new(BIN)
        .args(["runner", "--server", &s.url, "--name", "box"])
        .env("WORKER_TOKEN", &runner_token)
        .env("XDG_DATA_HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .env("HOME", home.path())
        .env_remove("WORKER_URL")
        .current_dir(home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its first claim registers it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while runner_online(&s, "box") != Some(true) {
        assert!(
            std::time::Instant::now() < deadline,
            "the runner never came online"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = runner.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = runner.wait().unwrap();
    let log = {
        let mut s = String::new();
        std::io::Read::read_to_string(runner.stderr.as_mut().unwrap(), &mut s).unwrap();
        s
    };
    assert!(out.success(), "{log}");
    assert!(log.contains("the server shows it offline"), "{log}");
    assert_eq!(runner_online(&s, "box"), Some(false), "offline at once");
    let out = s.cli(&["submit", "--agent", "echo", "hi"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no runner is connected"),
        "{}",
        stderr(&out)
    );

    // Its next claim brings it back.
    let claim = |token: &str| {
        super::curl(&[
            "-X",
            "POST",
            &format!("{}/v1/claim", s.url),
            "-H",
            &format!("authorization: Bearer {token}"),
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"runner":"box","agents":["other"],"wait_ms":0}"#,
        ])
    };
    assert_eq!(claim(&runner_token).0, 204);
    assert_eq!(runner_online(&s, "box"), Some(true));
}

#[test]
fn only_the_token_that_claimed_as_a_runner_may_say_its_goodbye() {
    let s = Served::start(&[]);
    let a = token(&s, "a", "runner");
    let b = token(&s, "b", "runner");
    let client = token(&s, "c", "client");
    let (code, _) = super::curl(&[
        "-X",
        "POST",
        &format!("{}/v1/claim", s.url),
        "-H",
        &format!("authorization: Bearer {a}"),
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"runner":"box","agents":["other"],"wait_ms":0}"#,
    ]);
    assert_eq!(code, 204);
    assert_eq!(runner_online(&s, "box"), Some(true));

    assert_eq!(goodbye(&s, "box", &client).0, 403, "a client token");
    let (code, body) = goodbye(&s, "box", &b);
    assert_eq!(code, 403, "another runner's token: {body}");
    assert_eq!(
        goodbye(&s, "box", &s.admin_token()).0,
        403,
        "an admin that never claimed as box"
    );
    assert_eq!(goodbye(&s, "box", "tnl_000000000000_nope").0, 401);
    assert_eq!(goodbye(&s, "b%20x", &a).0, 400, "not a runner name");
    assert_eq!(goodbye(&s, "nobody", &a).0, 403, "a name it never claimed");
    assert_eq!(
        runner_online(&s, "box"),
        Some(true),
        "refusals changed nothing"
    );

    assert_eq!(goodbye(&s, "box", &a).0, 204);
    assert_eq!(runner_online(&s, "box"), Some(false));
}

#[test]
fn a_cancelled_task_is_said_to_be_cancelled_once() {
    let s = Served::start(&[]);
    let id = submit(&s, "claude", "long job");
    let at = start(&s, &id, "box", "claude");
    let out = s.cli(&["cancel", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    finish(
        &s,
        &id,
        &at,
        "cancelled",
        json!({"error": "cancelled; the agent was stopped", "exit_code": 143, "stderr_tail": "cancelled\nTerminated"}),
    );
    let out = s.cli(&["watch", &id]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.matches("the agent was stopped").count(), 1, "{err}");
    assert!(!err.contains("Terminated"), "{err}");
    assert!(err.lines().last().unwrap().contains("cancelled"), "{err}");
}

/// The runner crate's fixtures: the model-API stand-in and the env a real CLI needs for it.
fn runner_fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tunnel-runner/tests/fixtures")
}

/// `tunnel submit --watch` against the real `claude` (CLAUDE_BIN) run by `tunnel up`, its
/// model answered by the offline stand-in: what a person sees for a real tool call.
#[test]
fn watch_shows_a_real_claude_run_for_people() {
    let Some(bin) = std::env::var("CLAUDE_BIN")
        .ok()
        .filter(|p| std::path::Path::new(p).is_file())
    else {
        assert_ne!(
            std::env::var("TUNNEL_REAL_CLIS").as_deref(),
            Ok("1"),
            "TUNNEL_REAL_CLIS=1 but CLAUDE_BIN is not set"
        );
        eprintln!("SKIPPED watch_shows_a_real_claude_run_for_people: set CLAUDE_BIN");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut api = Command::new("python3")
        .arg(runner_fixtures().join("fake_model_api.py"))
        .args(["--port", "0", "--scenario", "tool"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut api_lines = BufReader::new(api.stdout.take().unwrap()).lines();
    let port = api_lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("FAKE_MODEL_API_PORT=").map(str::to_owned))
        .expect("the stand-in printed its port");
    std::thread::spawn(move || api_lines.for_each(drop));
    let api_url = format!("http://127.0.0.1:{port}");
    let set = Command::new("curl")
        .args([
            "-sf",
            "-X",
            "POST",
            &format!("{api_url}/_fake/scenario"),
            "-d",
        ])
        .arg(
            json!({"scenario": "tool", "tool_command": "echo hi-from-claude > out.txt"})
                .to_string(),
        )
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(set.success());

    let home = dir.path().join("claude-home");
    let env = Command::new("bash")
        .arg(runner_fixtures().join("real-cli-env.sh"))
        .args(["claude", home.to_str().unwrap(), &api_url])
        .output()
        .unwrap();
    assert!(env.status.success(), "{}", stderr(&env));
    let mut env_toml: Vec<String> = String::from_utf8(env.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| format!("{k} = {}", json!(v)))
        .collect();
    // The tests run as root; README: Claude needs it there.
    env_toml.push("IS_SANDBOX = \"1\"".into());
    let project = dir.path().join("proj");
    std::fs::create_dir_all(&project).unwrap();
    let cfg = dir.path().join("tunnel.toml");
    std::fs::write(
        &cfg,
        format!(
            "[runner]\nname = \"real\"\n[runner.projects]\nproj = {}\n[runner.agents.claude]\nprogram = {}\nenv = {{ {} }}\n[runner.agents.codex]\nenabled = false\n[runner.agents.gemini]\nenabled = false\n",
            json!(project.display().to_string()),
            json!(bin),
            env_toml.join(", ")
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut up = Command::new(BIN)
        .args(["up", "--port", "0", "--log-format", "json", "--config"])
        .arg(&cfg)
        .env("XDG_DATA_HOME", &data)
        .env("XDG_CONFIG_HOME", &data)
        .env_remove("WORKER_TOKEN")
        .env_remove("PORT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let up_err = up.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(up_err).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && let Some(addr) = v["fields"]["address"].as_str()
            {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let url = format!(
        "http://{}",
        rx.recv_timeout(Duration::from_secs(30)).unwrap()
    );
    let out = Command::new(BIN)
        .args([
            "submit",
            "--agent",
            "claude",
            "--project",
            "proj",
            "--queue-anyway",
            "--timeout",
            "120",
            "--watch",
            "write the file",
        ])
        .env("XDG_DATA_HOME", &data)
        .env("XDG_CONFIG_HOME", &data)
        .env("TUNNEL_URL", &url)
        .env_remove("WORKER_TOKEN")
        .env_remove("TUNNEL_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = up.kill();
    let _ = up.wait();
    let _ = api.kill();
    let _ = api.wait();
    let err = stderr(&out);
    // What a person saw, for the test log.
    eprintln!("{err}{}", stdout(&out));
    assert!(out.status.success(), "{err}\n{}", stdout(&out));
    assert!(
        err.contains("› Bash: echo hi-from-claude > out.txt"),
        "the tool and its command: {err}"
    );
    assert!(
        !err.contains("[session]") && !err.contains("[usage]"),
        "{err}"
    );
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("succeeded") && last.contains(" · session "),
        "{last}"
    );
    assert!(
        std::fs::read_to_string(project.join("out.txt"))
            .unwrap_or_default()
            .contains("hi-from-claude")
    );
}
