//! An agent is an attacker's best foothold (its prompt comes from a chat): it must not reach
//! tunnel's credentials. A spy agent, started by the real `tunnel runner` and `tunnel up`,
//! tries every read an attacker would (its own environment, every ancestor's
//! /proc/PID/environ, the runner's memory, the admin token file, the config file) and prints
//! what it finds; no secret may appear in its answer, and it must still work in its project.
//!
//! As root every process can read every other's memory, so when the tests run as root the
//! tunnel processes (and so the agent) run as `nobody`: the deployment the README asks for.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{BIN, curl};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // The effective uid of this process.
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        .unwrap_or(false)
}

/// A machine's home for one user: data and config inside, owned by the user tunnel runs as.
struct Home {
    dir: tempfile::TempDir,
    /// tunnel itself runs as `nobody` (the tests run as root).
    as_nobody: bool,
}

impl Home {
    fn new() -> Home {
        Self::with_owner(is_root())
    }

    fn with_owner(as_nobody: bool) -> Home {
        let dir = tempfile::tempdir().unwrap();
        for d in ["data", "config/tunnel", "proj"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        Home { dir, as_nobody }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn config(&self) -> PathBuf {
        self.path().join("config/tunnel/tunnel.toml")
    }

    /// Everything belongs to the user tunnel runs as.
    fn hand_over(&self) {
        if self.as_nobody {
            let ok = Command::new("chown")
                .args(["-R", &format!("{NOBODY}:{NOBODY}")])
                .arg(self.path())
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
    }

    /// `tunnel ARGS` as that user, with this home.
    fn tunnel(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(self.path())
            .env("HOME", self.path())
            .env("XDG_DATA_HOME", self.path().join("data"))
            .env("XDG_CONFIG_HOME", self.path().join("config"));
        for k in [
            "WORKER_TOKEN",
            "WORKER_URL",
            "TUNNEL_TOKEN",
            "TUNNEL_URL",
            "TUNNEL_CONFIG",
            "PORT",
            "WORKER_PORT",
            "DATABASE_URL",
        ] {
            cmd.env_remove(k);
        }
        cmd.envs(env.iter().copied());
        if self.as_nobody {
            cmd.uid(NOBODY).gid(NOBODY);
        }
        cmd
    }

    fn start(&self, args: &[&str], env: &[(&str, &str)]) -> Killed {
        let log = std::fs::File::create(self.path().join("tunnel.log")).unwrap();
        let child = self
            .tunnel(args, env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Killed(child)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("tunnel.log")).unwrap_or_default()
    }

    fn admin_token(&self) -> String {
        // Read as the test (root, or the same user).
        let f = self.path().join("data/tunnel/admin.token");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(t) = std::fs::read_to_string(&f)
                && !t.trim().is_empty()
            {
                return t.trim().to_owned();
            }
            assert!(Instant::now() < deadline, "no admin token: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The spy: prints everything it can find, then does its job (writes a file in its
    /// project).
    fn spy(&self) -> PathBuf {
        let p = self.path().join("spy.sh");
        let home = self.path().display().to_string();
        let body = format!(
            r#"#!/bin/sh
echo "== own environment"; env
echo "== id: $(id)"
p=$$
while [ "$p" -gt 1 ]; do
  pp=$(awk '/^PPid:/{{print $2}}' /proc/$p/status)
  echo "== environ of $pp ($(cat /proc/$pp/comm 2>/dev/null))"
  tr '\0' '\n' < /proc/$pp/environ 2>&1 | head -c 20000
  echo
  p=$pp
done
echo "== memory of the parent"
python3 - "$PPID" <<'EOF' 2>&1
import re, sys
pid = sys.argv[1]
found = 0
try:
    maps = open(f"/proc/{{pid}}/maps").read().splitlines()
    mem = open(f"/proc/{{pid}}/mem", "rb", 0)
except Exception as e:
    print("cannot open:", e); sys.exit()
print("opened", len(maps), "regions")
for line in maps:
    addr, perms = line.split()[:2]
    if not perms.startswith("r"):
        continue
    lo, hi = (int(x, 16) for x in addr.split("-"))
    if hi - lo > 256 << 20:
        continue
    try:
        mem.seek(lo); data = mem.read(hi - lo)
    except Exception:
        continue
    for m in re.finditer(rb"tnl_[A-Za-z0-9_-]{{8,}}|WORKER_TOKEN=[^\0]{{4,}}|SECRET[^\0]{{0,40}}", data):
        print("found in memory:", m.group(0)[:120]); found += 1
        if found > 50: sys.exit()
print("memory scan done,", found, "hits")
EOF
for f in "{home}/data/tunnel/admin.token" "{home}/config/tunnel/tunnel.toml" "$HOME/.local/share/tunnel/admin.token" "$HOME/.config/tunnel/tunnel.toml"; do
  echo "== file: $f"; cat "$f" 2>&1
done
echo "== data dir"; ls -la "{home}/data/tunnel" 2>&1
echo "done" > spy-was-here.txt && echo "== wrote spy-was-here.txt"
"#
        );
        std::fs::write(&p, body).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

/// A child process killed when the test ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_healthy(url: &str, home: &Home) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if curl(&[&format!("{url}/healthz")]).0 == 200 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{url} did not come up: {}", home.log());
}

/// `tunnel submit --watch` for the spy, as the test; its answer.
fn run_spy(url: &str, token: &str) -> Output {
    Command::new(BIN)
        .args([
            "submit",
            "--server",
            url,
            "--token",
            token,
            "--agent",
            "spy",
            // The runner may not have claimed (and so offered `spy`) yet.
            "--queue-anyway",
            "--project",
            "proj",
            "--timeout",
            "60",
            "--watch",
            "look around",
        ])
        .env_remove("TUNNEL_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Secrets in the environment of a tunnel process that it has no use for, or that it uses
/// itself: none may reach an agent.
const ENV_SECRETS: &[(&str, &str)] = &[
    (
        "DISCORD_PROXY",
        "http://proxyuser:SECRET-proxy-pw@127.0.0.1:9",
    ),
    ("OPENCLAW_HOOKS_TOKEN", "SECRET-hooks-token"),
    ("TUNNEL_WEBHOOK_CI_SECRET", "SECRET-webhook"),
    ("TELEGRAM_BOT_TOKEN", "123:SECRET-telegram"),
];

/// Whether this kernel lets tunnel's sandbox wrapper apply Landlock.
fn landlock_here() -> bool {
    let dir = tempfile::tempdir().unwrap();
    Command::new(BIN)
        .args(["__sandbox", "--deny"])
        .arg(dir.path())
        .args(["--", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

fn assert_no_secret(answer: &str, secrets: &[String], home: &Home) {
    assert!(
        answer.contains("== environ of") && answer.contains("== memory of the parent"),
        "the spy ran: {answer}\n{}",
        home.log()
    );
    // Without Landlock (an old kernel, CI without it) tunnel's files are protected by nothing
    // but their owner, which the agent shares; the rest must hold all the same.
    let answer = if landlock_here() || !home.as_nobody && is_root() {
        answer
    } else {
        eprintln!("Landlock is unavailable here: the file reads are not checked");
        answer.split("== file: ").next().unwrap_or_default()
    };
    for s in secrets {
        assert!(
            !answer.contains(s.as_str()),
            "the agent found {s:?}:\n{answer}"
        );
    }
    assert!(
        home.path().join("proj/spy-was-here.txt").exists(),
        "the agent can still work in its project: {answer}"
    );
}

#[test]
fn an_agent_of_tunnel_runner_finds_no_secret() {
    runner_spy(None);
}

/// A runner started as root runs its agents as another user (`run_as`): the agent cannot
/// read the root runner's memory, environment or files.
#[test]
fn an_agent_run_as_another_user_finds_no_secret() {
    if !is_root() {
        eprintln!("not root: run_as needs a runner started as root; skipped");
        return;
    }
    runner_spy(Some("nobody"));
}

fn runner_spy(run_as: Option<&str>) {
    let home = if run_as.is_some() {
        // tunnel runs as root; the agent's user must reach its script and project.
        let h = Home::with_owner(false);
        use std::os::unix::fs::PermissionsExt;
        let open = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        open(h.path(), 0o755);
        open(&h.path().join("proj"), 0o777);
        h
    } else {
        Home::new()
    };
    let spy = home.spy();
    let db_pw = "SECRET-db-pw";
    // The server: its own process, its admin token saved in the data dir.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    home.hand_over();
    let _server = home.start(&["serve", "--port", &port.to_string()], &[]);
    wait_healthy(&url, &home);
    let admin = home.admin_token();
    let out = Command::new(BIN)
        .args([
            "token", "create", "--server", &url, "--token", &admin, "--name", "box", "--role",
            "runner",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runner_token = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("tnl_"))
        .unwrap()
        .to_owned();
    // The runner's config holds its token, as `tunnel init` writes it.
    std::fs::write(
        home.config(),
        format!(
            "[runner]\nserver = \"{url}\"\ntoken = \"{runner_token}\"\n{}[runner.projects]\nproj = \"{}\"\n[runner.agents.spy]\nprogram = \"{}\"\n",
            run_as.map(|u| format!("run_as = \"{u}\"\n")).unwrap_or_default(),
            home.path().join("proj").display(),
            spy.display()
        ),
    )
    .unwrap();
    home.hand_over();
    let db_url = format!("postgres://tunnel:{db_pw}@127.0.0.1:1/tunnel");
    let mut env: Vec<(&str, &str)> = ENV_SECRETS.to_vec();
    env.push(("WORKER_TOKEN", &runner_token));
    env.push(("DATABASE_URL", &db_url));
    let _runner = home.start(&["runner"], &env);

    let out = run_spy(&url, &admin);
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut secrets: Vec<String> = ENV_SECRETS.iter().map(|(_, v)| v.to_string()).collect();
    secrets.extend([admin, runner_token, db_pw.to_owned(), "SECRET-".into()]);
    assert_no_secret(&answer, &secrets, &home);
    if run_as.is_some() {
        assert!(
            answer.contains(&format!("== id: uid={NOBODY}(")),
            "{answer}"
        );
    }
    assert!(
        out.status.success(),
        "{answer}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_agent_of_tunnel_up_finds_no_secret() {
    let home = Home::new();
    let spy = home.spy();
    std::fs::write(
        home.config(),
        format!(
            "[client]\ntoken = \"tnl_SECRET_client_token_in_config\"\n[runner.projects]\nproj = \"{}\"\n[runner.agents.spy]\nprogram = \"{}\"\n",
            home.path().join("proj").display(),
            spy.display()
        ),
    )
    .unwrap();
    home.hand_over();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    // `tunnel up` reads the bot tokens and DATABASE_URL itself.
    let db = home.path().join("data/SECRET-db-name.db");
    let mut env: Vec<(&str, &str)> = ENV_SECRETS.to_vec();
    env.push(("CALLBACK_BOT_TOKEN", "SECRET-discord-bot"));
    env.push(("DATABASE_URL", db.to_str().unwrap()));
    let _up = home.start(&["up", "--port", &port.to_string()], &env);
    wait_healthy(&url, &home);
    let admin = home.admin_token();

    let out = run_spy(&url, &admin);
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut secrets: Vec<String> = ENV_SECRETS.iter().map(|(_, v)| v.to_string()).collect();
    secrets.extend([admin, "SECRET".into()]);
    assert_no_secret(&answer, &secrets, &home);
    assert!(
        out.status.success(),
        "{answer}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A config file in the current directory (a cloned repository) is not read: `tunnel tasks`
/// there sends nothing to the server it names, and never the local admin token.
#[test]
fn a_config_in_the_current_directory_gets_no_token() {
    let hostile = TcpListener::bind("127.0.0.1:0").unwrap();
    let hostile_url = format!("http://{}", hostile.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in hostile.incoming() {
            let Ok(mut s) = stream else { continue };
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).unwrap_or(0);
            let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n[]");
        }
    });
    let home = Home::new();
    let repo = home.path().join("cloned-repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("tunnel.toml"),
        format!("[client]\nserver = \"{hostile_url}\"\n"),
    )
    .unwrap();
    let data = home.path().join("data/tunnel");
    std::fs::create_dir_all(&data).unwrap();
    let admin = "tnl_local_admin_SECRET_token_value";
    std::fs::write(data.join("admin.token"), format!("{admin}\n")).unwrap();
    // The local server it belongs to (as `tunnel serve` records it), on another port.
    std::fs::write(data.join("admin.server"), "http://127.0.0.1:9\n").unwrap();
    let out = Command::new(BIN)
        .arg("tasks")
        .current_dir(&repo)
        .env("HOME", home.path())
        .env("XDG_DATA_HOME", home.path().join("data"))
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env_remove("TUNNEL_URL")
        .env_remove("TUNNEL_TOKEN")
        .env_remove("WORKER_TOKEN")
        .env_remove("WORKER_URL")
        .env_remove("TUNNEL_CONFIG")
        .output()
        .unwrap();
    let got: Vec<String> = rx.try_iter().collect();
    assert!(
        got.is_empty(),
        "the server named by ./tunnel.toml was contacted: {got:?}; {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Named explicitly, a remote server still never gets the local admin token.
    let out = Command::new(BIN)
        .args(["tasks", "--server", &hostile_url])
        .current_dir(&repo)
        .env("HOME", home.path())
        .env("XDG_DATA_HOME", home.path().join("data"))
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env_remove("TUNNEL_TOKEN")
        .env_remove("WORKER_TOKEN")
        .env_remove("WORKER_URL")
        .env_remove("TUNNEL_CONFIG")
        .output()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let got: Vec<String> = rx.try_iter().collect();
    assert!(
        got.iter().all(|r| !r.contains(admin)),
        "the local admin token went to another server: {got:?}"
    );
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not sent to"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A custom agent whose template puts `{prompt}` where its program reads options is refused
/// when the config is loaded: a prompt like `--help` or `-rf` must never become an option.
#[test]
fn a_prompt_in_an_option_position_is_refused_at_config_load() {
    let home = Home::new();
    for (command, refused) in [
        (r#"["{prompt}"]"#, Some("right after the program")),
        (r#"["run", "{prompt}"]"#, Some("after the argument \"run\"")),
        (r#"["--", "{prompt}"]"#, None),
        (r#"["--yes", "--message", "{prompt}"]"#, None),
    ] {
        std::fs::write(
            home.config(),
            format!("[runner.agents.rm]\nprogram = \"rm\"\ncommand = {command}\n"),
        )
        .unwrap();
        let out = Command::new(BIN)
            .args([
                "doctor",
                "--server",
                "http://127.0.0.1:9",
                "--token",
                "x",
                "--config",
            ])
            .arg(home.config())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        match refused {
            Some(why) => assert!(
                text.contains("custom agent rm: {prompt} comes")
                    && text.contains(why)
                    && text.contains("put \"--\" before {prompt}"),
                "{command}: {text}"
            ),
            None => assert!(!text.contains("{prompt} comes"), "{command}: {text}"),
        }
    }
}

/// The runner starts the next task's agent process ahead (in its cell, inside the sandbox
/// wrapper, waiting for the task on its stdin). Such an agent runs as one started for its
/// task: in its project, its prompt on stdin, its own `env`, the cell's marker, a temporary
/// directory of its own, in the task's cgroup when there is one, tunnel's files closed. Two
/// tasks in a row: the first takes the process made at start, the second the one made after.
#[test]
fn an_agent_started_ahead_of_its_task_runs_as_one_started_for_it() {
    let home = Home::new();
    let probe = home.path().join("probe.sh");
    std::fs::write(
        &probe,
        format!(
            r#"#!/bin/sh
echo "pwd=$(pwd -P)"
echo "stdin=$(cat)"
echo "env=$PROBE_ENV mark=${{TUNNEL_TASK_MARK:+set}}"
touch "$TMPDIR/x" && echo "tmp=$TMPDIR"
grep '^0::' /proc/self/cgroup
cat "{}" >/dev/null 2>&1 && echo config-open || echo config-closed
"#,
            home.config().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let proj = home.path().join("proj");
    std::fs::write(
        home.config(),
        format!(
            "[runner.projects]\nproj = \"{}\"\n[runner.agents.probe]\nprogram = \"{}\"\ncommand = []\nenv = {{ PROBE_ENV = \"its-own\" }}\n",
            proj.display(),
            probe.display()
        ),
    )
    .unwrap();
    home.hand_over();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _up = home.start(&["up", "--port", &port.to_string()], &[]);
    wait_healthy(&url, &home);
    let admin = home.admin_token();
    let proj = proj.canonicalize().unwrap();
    for i in 0..2 {
        let out = Command::new(BIN)
            .args([
                "submit",
                "--server",
                &url,
                "--token",
                &admin,
                "--agent",
                "probe",
                "--queue-anyway",
                "--project",
                "proj",
                "--timeout",
                "60",
                "--watch",
            ])
            .arg(format!("prompt {i}"))
            .env_remove("TUNNEL_CONFIG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let answer = String::from_utf8_lossy(&out.stdout).into_owned();
        let expect = [
            format!("pwd={}", proj.display()),
            format!("stdin=prompt {i}"),
            "env=its-own mark=set".to_owned(),
        ];
        for e in &expect {
            assert!(
                answer.contains(e.as_str()),
                "task {i}: {e:?} in {answer}\n{}",
                home.log()
            );
        }
        if landlock_here() {
            assert!(answer.contains("tmp=/"), "task {i}: {answer}");
            assert!(answer.contains("config-closed"), "task {i}: {answer}");
        }
        if home.log().contains("containment=cgroup v2") {
            assert!(answer.contains("/tunnel-task-"), "task {i}: {answer}");
        }
        assert!(out.status.success(), "task {i}: {answer}");
    }
}
