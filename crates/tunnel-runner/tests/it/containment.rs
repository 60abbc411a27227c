//! Everything an agent starts ends with its task: commands the real `claude` runs through its
//! Bash tool (in a session of their own), and a synthetic agent that double-forks and calls
//! `setsid`, after a cancel, a timeout, a shutdown, a normal exit and the runner's `kill -9`.
//! Every process of a task carries a test tag in its environment; "gone" is checked in /proc,
//! and each case prints how long after its trigger the last process was gone.
//! Also: a restarted runner never signals a process that reused a recorded pid, and a spooled
//! report of a task the server no longer has is dropped.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tunnel_protocol::TaskState;
use tunnel_runner::{AgentKind, Containment, OutputMode, RunnerConfig};

use crate::clis::{ModelApi, agent, real_env};
use crate::harness::{RunnerHandle, World, alive, custom, read_pid, task};

const TAG_VAR: &str = "CONTAIN_TEST_TAG";

/// Live (not zombie) processes whose environment carries `TAG_VAR=tag`.
fn tagged(tag: &str) -> Vec<(i32, String)> {
    let want = format!("{TAG_VAR}={tag}");
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || !alive(pid) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            out.push((pid, cmd));
        }
    }
    out
}

/// Waits until no process of the tag is left; how long that took from `since`.
async fn all_gone(tag: &str, since: Instant, what: &str) -> Duration {
    let limit = Instant::now() + Duration::from_secs(10);
    loop {
        let left = tagged(tag);
        if left.is_empty() {
            let took = since.elapsed();
            println!("containment figure: {what}: last process gone {took:?} after the trigger");
            return took;
        }
        assert!(
            Instant::now() < limit,
            "{what}: processes of the task outlived it: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// No process of the tag is left now (the task has been reported as ended).
fn none_left(tag: &str, what: &str) {
    let left = tagged(tag);
    assert!(
        left.is_empty(),
        "{what}: the task ended but these of its processes run on: {left:?}"
    );
}

async fn wait_file(path: &Path, within: Duration) {
    let limit = Instant::now() + within;
    while !path.exists() {
        assert!(Instant::now() < limit, "{} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `secs` after `since` and checks that the late file was never written.
async fn never_written(marker: &Path, since: Instant, secs: u64, what: &str) {
    let until = since + Duration::from_secs(secs) + Duration::from_millis(1500);
    tokio::time::sleep_until(until.into()).await;
    assert!(
        !marker.exists(),
        "{what}: a process of the task went on working after it ended ({} written)",
        marker.display()
    );
}

fn unique_tag(case: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{case}-{}-{nanos}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// The real `claude`, whose Bash tool runs a command in a session of its own.

/// How long the tool command sleeps before it writes its file.
const TOOL_SLEEP: u64 = 20;

struct Claude {
    w: World,
    _api: ModelApi,
    bin: PathBuf,
    env: BTreeMap<String, String>,
    started: PathBuf,
    marker: PathBuf,
    tag: String,
}

async fn claude_case(case: &str, answer_delay: u64) -> Option<Claude> {
    let Some(bin) = std::env::var("CLAUDE_BIN")
        .ok()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
    else {
        eprintln!(
            "SKIPPED containment with the real claude ({case}): set CLAUDE_BIN (scripts/test installs it when TUNNEL_REAL_CLIS=1)"
        );
        assert_ne!(
            std::env::var("TUNNEL_REAL_CLIS").as_deref(),
            Ok("1"),
            "TUNNEL_REAL_CLIS=1 but CLAUDE_BIN is not set"
        );
        return None;
    };
    let w = World::start().await;
    let api = ModelApi::start(&w.dir.path().join("requests.jsonl"));
    let started = w.dir.path().join("started");
    let marker = w.dir.path().join("late-write");
    // The model asks for one Bash call that leaves a command running in the background (as a
    // dev server or a long build would), then thinks for `answer_delay` seconds. Claude starts
    // the call in a session of its own and, stopped with SIGTERM, ends only the call in
    // progress: the background command is what outlives it.
    api.scenario(serde_json::json!({
        "scenario": "tool",
        "tool_command": format!(
            "(sleep {TOOL_SLEEP}; touch {m}) >/dev/null 2>&1 & echo $! > {s}",
            s = started.display(),
            m = marker.display()
        ),
        "answer_delay": answer_delay,
    }));
    let tag = unique_tag(case);
    let mut env = real_env("claude", &w.dir.path().join("home"), &api.url);
    env.insert(TAG_VAR.into(), tag.clone());
    Some(Claude {
        w,
        _api: api,
        bin,
        env,
        started,
        marker,
        tag,
    })
}

impl Claude {
    fn config(&self) -> RunnerConfig {
        let mut c = self.w.config("claude-runner");
        c.agents.insert(
            "claude".into(),
            agent(AgentKind::Claude, &self.bin, self.env.clone()),
        );
        c
    }

    /// The background command, once it runs and the tool call that started it is over (Claude
    /// has sent the tool's result to the model).
    async fn tool_started(&self) -> (i32, Instant) {
        wait_file(&self.started, Duration::from_secs(60)).await;
        let at = Instant::now();
        let log = self.w.dir.path().join("requests.jsonl");
        let limit = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("tool_result")
        {
            assert!(
                Instant::now() < limit,
                "Claude never sent the tool's result"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = read_pid(&self.started);
        assert!(
            tagged(&self.tag).iter().any(|(p, _)| *p == pid),
            "the tool command carries the task's environment"
        );
        (pid, at)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_claude_tool_command_ends_on_cancel() {
    let Some(cl) = claude_case("claude-cancel", 600).await else {
        return;
    };
    let r = RunnerHandle::spawn(cl.config());
    let t = cl.w.submit(task("claude", "run the tool")).await;
    let (pid, started) = cl.tool_started().await;
    let asked = Instant::now();
    cl.w.admin.cancel(&t.id).await.unwrap();
    let gone = all_gone(&cl.tag, asked, "real claude, cancel").await;
    let done = cl.w.ended(&t.id).await;
    assert_eq!(done.state, TaskState::Cancelled, "{done:?}");
    none_left(&cl.tag, "real claude, cancel");
    assert!(!alive(pid), "the background command is gone");
    println!(
        "containment figure: real claude, cancel: reported {:?} after the cancel (processes gone at {gone:?})",
        asked.elapsed()
    );
    never_written(&cl.marker, started, TOOL_SLEEP, "real claude, cancel").await;
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_claude_tool_command_ends_on_timeout() {
    let Some(cl) = claude_case("claude-timeout", 600).await else {
        return;
    };
    let r = RunnerHandle::spawn(cl.config());
    let mut t = task("claude", "run the tool");
    // Long enough for Claude to start and call its tool, well short of the tool's sleep.
    t.timeout_ms = Some(12_000);
    let t = cl.w.submit(t).await;
    let (pid, started) = cl.tool_started().await;
    let done = cl.w.ended(&t.id).await;
    assert_eq!(done.state, TaskState::TimedOut, "{done:?}");
    let reported = Instant::now();
    none_left(&cl.tag, "real claude, timeout");
    assert!(!alive(pid));
    all_gone(&cl.tag, reported, "real claude, timeout").await;
    never_written(&cl.marker, started, TOOL_SLEEP, "real claude, timeout").await;
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_claude_tool_command_ends_on_runner_shutdown() {
    let Some(cl) = claude_case("claude-shutdown", 600).await else {
        return;
    };
    let mut c = cl.config();
    c.shutdown_grace = Duration::from_millis(500);
    let r = RunnerHandle::spawn(c);
    let t = cl.w.submit(task("claude", "run the tool")).await;
    let (pid, started) = cl.tool_started().await;
    let asked = Instant::now();
    r.stop().await.unwrap();
    none_left(&cl.tag, "real claude, runner shutdown");
    assert!(!alive(pid));
    println!(
        "containment figure: real claude, runner shutdown: runner stopped {:?} after the stop (grace 0.5 s)",
        asked.elapsed()
    );
    let done = cl.w.admin.task(&t.id, None).await.unwrap();
    assert_eq!(done.state, TaskState::Failed, "{done:?}");
    never_written(
        &cl.marker,
        started,
        TOOL_SLEEP,
        "real claude, runner shutdown",
    )
    .await;
}

async fn claude_exit_case(containment: Containment, label: &str) {
    let Some(cl) = claude_case(&format!("claude-exit-{label}"), 0).await else {
        return;
    };
    let mut c = cl.config();
    c.containment = containment;
    let r = RunnerHandle::spawn(c);
    let t = cl.w.submit(task("claude", "run the tool")).await;
    let (pid, started) = cl.tool_started().await;
    let done = cl.w.ended(&t.id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    let reported = Instant::now();
    let what = format!("real claude, normal exit, {label}");
    none_left(&cl.tag, &what);
    assert!(!alive(pid));
    all_gone(&cl.tag, reported, &what).await;
    never_written(&cl.marker, started, TOOL_SLEEP, &what).await;
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_claude_background_command_ends_when_claude_exits() {
    claude_exit_case(Containment::Auto, "auto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_claude_background_command_ends_under_the_process_tree_walk_too() {
    claude_exit_case(Containment::ProcessTree, "process-tree").await;
}

/// A runner in a child process (this test binary, re-run on [`child_runner`]), so that it can
/// be killed with SIGKILL. Its one agent is `claude` (the real CLI at `bin`) or, with `custom`,
/// the script at `bin` under the name `custom`. It exits when its stdin closes: a test that
/// fails before killing it leaves no runner behind.
fn spawn_child_runner(
    c: &RunnerConfig,
    agent_env: &BTreeMap<String, String>,
    bin: &Path,
    custom: bool,
) -> std::process::Child {
    let spec = serde_json::json!({
        "server": c.server, "token": c.token, "name": c.name,
        "spool_dir": c.spool_dir, "default_dir": c.default_dir,
        "program": bin, "env": agent_env, "custom": custom,
        "process_tree": c.containment == Containment::ProcessTree,
    });
    Command::new(std::env::current_exe().unwrap())
        .args([
            "containment::child_runner",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("CONTAIN_CHILD_RUNNER", spec.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
#[ignore = "the runner process of the kill -9 tests, started by them"]
fn child_runner() {
    let Ok(spec) = std::env::var("CONTAIN_CHILD_RUNNER") else {
        return;
    };
    std::thread::spawn(|| {
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
        std::process::exit(0);
    });
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let s = |k: &str| spec[k].as_str().unwrap().to_owned();
    let mut c = RunnerConfig::new(s("server"), s("token"), PathBuf::from("/nonexistent"));
    c.name = s("name");
    c.spool_dir = s("spool_dir").into();
    c.default_dir = s("default_dir").into();
    c.agents.clear();
    if spec["process_tree"] == true {
        c.containment = Containment::ProcessTree;
    }
    let env: BTreeMap<String, String> = serde_json::from_value(spec["env"].clone()).unwrap();
    let program = PathBuf::from(s("program"));
    if spec["custom"] == true {
        let mut a = custom(&program, &[], OutputMode::Text);
        a.env = env;
        c.agents.insert("custom".into(), a);
    } else {
        c.agents
            .insert("claude".into(), agent(AgentKind::Claude, &program, env));
    }
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(tunnel_runner::run(c, Default::default()))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_claude_tool_command_ends_when_the_runner_is_killed() {
    let Some(cl) = claude_case("claude-kill9", 600).await else {
        return;
    };
    let c = cl.config();
    let mut runner = spawn_child_runner(&c, &cl.env, &cl.bin, false);
    let t = cl.w.submit(task("claude", "run the tool")).await;
    let (pid, started) = cl.tool_started().await;
    let killed = Instant::now();
    runner.kill().unwrap(); // SIGKILL: the runner cannot clean up; its guard must
    runner.wait().unwrap();
    all_gone(&cl.tag, killed, "real claude, runner killed (SIGKILL)").await;
    assert!(!alive(pid));
    never_written(
        &cl.marker,
        started,
        TOOL_SLEEP,
        "real claude, runner killed",
    )
    .await;
    // The task stays running until a restarted runner reports it (tested elsewhere).
    let _ = t;
}

// ---------------------------------------------------------------------------------------------
// A synthetic agent that leaves a daemon: double fork, `setsid`, stdio closed.

/// Seconds the daemon sleeps before it writes its file: well beyond the timeout case's
/// 4 s plus the kill grace (at 4 s the daemon could write its file before the timeout fired).
const DAEMON_SLEEP: u64 = 9;

fn daemonizing_agent(w: &World, case: &str, then: &str) -> (PathBuf, PathBuf, PathBuf) {
    let pid = w.dir.path().join(format!("daemon-{case}.pid"));
    let marker = w.dir.path().join(format!("daemon-{case}.late"));
    let script = w.script(
        &format!("daemonizer-{case}"),
        &format!(
            "{trap}( setsid sh -c 'echo $$ > {pid}; sleep {DAEMON_SLEEP}; touch {marker}' </dev/null >/dev/null 2>&1 & )\nwhile [ ! -s {pid} ]; do sleep 0.05; done\necho started\n{then}",
            pid = pid.display(),
            marker = marker.display(),
            // An agent that ignores SIGTERM (it is killed after the grace).
            trap = if then.starts_with("exit") { "" } else { "trap '' TERM\n" },
        ),
    );
    (script, pid, marker)
}

async fn daemon_cases(containment: Containment, label: &str) {
    let w = World::start().await;
    let mut c = w.config("r1");
    c.containment = containment;
    let cases = [
        ("cancel", "while true; do sleep 1; done"),
        ("timeout", "while true; do sleep 1; done"),
        ("exit", "exit 0"),
    ];
    let mut tags = BTreeMap::new();
    for (case, then) in cases {
        let (script, pid, marker) = daemonizing_agent(&w, case, then);
        let tag = unique_tag(case);
        let mut a = custom(&script, &[], OutputMode::Text);
        a.env.insert(TAG_VAR.into(), tag.clone());
        c.agents.insert(case.into(), a);
        tags.insert(case, (tag, pid, marker));
    }
    let r = RunnerHandle::spawn(c);
    let mut checks = Vec::new();

    // Cancel.
    let (tag, pid_file, marker) = &tags["cancel"];
    let t = w.submit(task("cancel", "go")).await;
    let daemon = read_pid(pid_file);
    let started = Instant::now();
    assert!(alive(daemon));
    let asked = Instant::now();
    w.admin.cancel(&t.id).await.unwrap();
    all_gone(tag, asked, &format!("{label}, daemon, cancel")).await;
    assert_eq!(w.ended(&t.id).await.state, TaskState::Cancelled);
    none_left(tag, "daemon, cancel");
    checks.push((marker.clone(), started));

    // Timeout.
    let (tag, pid_file, marker) = &tags["timeout"];
    let mut t = task("timeout", "go");
    // Long enough for the daemon to be up before the timeout even on a loaded box (1 s lost
    // that race at load 20).
    t.timeout_ms = Some(4_000);
    let t = w.submit(t).await;
    let daemon = read_pid(pid_file);
    let started = Instant::now();
    assert!(alive(daemon));
    let done = w.ended(&t.id).await;
    assert_eq!(done.state, TaskState::TimedOut);
    let reported = Instant::now();
    none_left(tag, "daemon, timeout");
    all_gone(tag, reported, &format!("{label}, daemon, timeout")).await;
    checks.push((marker.clone(), started));

    // The agent exits normally, its daemon running.
    let (tag, pid_file, marker) = &tags["exit"];
    let t = w.submit(task("exit", "go")).await;
    let daemon = read_pid(pid_file);
    let started = Instant::now();
    let done = w.ended(&t.id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    none_left(tag, "daemon, normal exit");
    assert!(!alive(daemon), "the daemon ended with its task");
    let log = w.admin.events(&t.id, 0).await.unwrap();
    let line = log
        .events
        .iter()
        .find_map(|e| {
            e.data["line"]
                .as_str()
                .filter(|l| l.starts_with("containment:"))
        })
        .unwrap_or_else(|| panic!("the task's events name its containment: {log:?}"))
        .to_owned();
    println!("{label}: the task's event: {line}");
    checks.push((marker.clone(), started));

    r.stop().await.unwrap();

    // The runner is killed (SIGKILL) while the agent and its daemon run: the guard ends both.
    let (script, pid_file, marker) = daemonizing_agent(&w, "kill9", "while true; do sleep 1; done");
    let tag = unique_tag("kill9");
    let mut c = w.config("r-kill9");
    c.containment = containment;
    let env = BTreeMap::from([(TAG_VAR.to_owned(), tag.clone())]);
    let mut runner = spawn_child_runner(&c, &env, &script, true);
    let t = w.submit(task("custom", "go")).await;
    let daemon = read_pid(&pid_file);
    let started = Instant::now();
    assert!(alive(daemon));
    let killed = Instant::now();
    runner.kill().unwrap();
    runner.wait().unwrap();
    all_gone(
        &tag,
        killed,
        &format!("{label}, daemon, runner killed (SIGKILL)"),
    )
    .await;
    checks.push((marker, started));
    let _ = t;

    for (marker, started) in checks {
        never_written(&marker, started, DAEMON_SLEEP, label).await;
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_by_the_agent_ends_with_its_task() {
    daemon_cases(Containment::Auto, "auto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_ends_with_its_task_under_the_process_tree_walk_too() {
    daemon_cases(Containment::ProcessTree, "process-tree").await;
}

// ---------------------------------------------------------------------------------------------
// A restarted runner and its spool.

/// An attempt a previous run of this runner acked; returns (task id, attempt, lease token).
async fn acked_attempt(w: &World, runner: &str) -> (String, u32, String) {
    let api = tunnel_client::Client::new(&w.url, &w.runner_token).unwrap();
    let t = w.submit(task("echo", "x")).await;
    let claim = tunnel_protocol::ClaimRequest {
        runner: runner.into(),
        agents: vec!["echo".into()],
        projects: vec![],
        capacity: 1,
        wait_ms: 0,
        version: None,
        agent_versions: Default::default(),
        acp_agents: vec![],
        ack: false,
        holding: vec![],
    };
    let offer = api.claim(&claim).await.unwrap().unwrap();
    let at = tunnel_protocol::AttemptRef {
        attempt: offer.attempt,
        lease_token: offer.lease_token.clone(),
    };
    api.ack(&t.id, &at).await.unwrap();
    (t.id, offer.attempt, offer.lease_token)
}

/// `/proc/<pid>/stat` field 22.
fn start_time(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s[s.rfind(')').unwrap() + 1..].split_whitespace().collect();
    f[19].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_runner_never_signals_a_process_that_reused_a_recorded_pid() {
    let w = World::start().await;
    let mut c = w.config("r1");
    c.agents
        .insert("echo".into(), tunnel_runner::AgentConfig::echo());
    std::fs::create_dir_all(&c.spool_dir).unwrap();
    // Two process-group leaders: one stands for an unrelated process that got the pid of the
    // dead agent (its start time differs from the recorded one), one for the agent itself.
    let leader = || {
        Command::new("sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let (mut stranger, mut leftover) = (leader(), leader());
    let mut ids = Vec::new();
    for (p, start) in [
        (&stranger, start_time(stranger.id() as i32) + 1),
        (&leftover, start_time(leftover.id() as i32)),
    ] {
        let (id, attempt, lease_token) = acked_attempt(&w, "r1").await;
        let entry = serde_json::json!({
            "task_id": id, "attempt": attempt, "lease_token": lease_token,
            "pgid": p.id(), "pgid_start": start, "pending": [], "finish": null
        });
        std::fs::write(
            c.spool_dir.join(format!("{id}.{attempt}.json")),
            entry.to_string(),
        )
        .unwrap();
        ids.push(id);
    }

    let r = RunnerHandle::spawn(c);
    for id in &ids {
        assert_eq!(w.ended(id).await.state, TaskState::Failed);
    }
    // Reap what was killed, so that "alive" means running.
    let leftover_status = leftover.wait().unwrap();
    assert!(
        leftover_status.code().is_none(),
        "the genuine leftover was killed"
    );
    assert!(
        stranger.try_wait().unwrap().is_none() && alive(stranger.id() as i32),
        "the process that reused the pid was left alone"
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
    r.stop().await.unwrap();
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_report_of_a_task_the_server_no_longer_has_is_dropped() {
    let w = World::start().await;
    let mut c = w.config("r1");
    c.agents
        .insert("echo".into(), tunnel_runner::AgentConfig::echo());
    // A long grace: a report retried forever would hold the shutdown for all of it.
    c.shutdown_grace = Duration::from_secs(60);
    std::fs::create_dir_all(&c.spool_dir).unwrap();
    // Offered to no runner here: it stays queued.
    let real = w.submit(task("other", "x")).await.id;
    // The same shape, another id: a task this server never had (or has deleted).
    let last = real.chars().last().unwrap();
    let gone = format!(
        "{}{}",
        &real[..real.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    let entry = serde_json::json!({
        "task_id": gone, "attempt": 1, "lease_token": "l", "pgid": null,
        "pending": [{"n": 1, "kind": "text", "data": {"text": "orphan"}}],
        "finish": {"attempt": 1, "lease_token": "l", "outcome": "succeeded", "result": {"text": "x"}}
    });
    let file = c.spool_dir.join(format!("{gone}.1.json"));
    std::fs::write(&file, entry.to_string()).unwrap();
    let spool_dir = c.spool_dir.clone();
    let r = RunnerHandle::spawn(c);
    let limit = Instant::now() + Duration::from_secs(20);
    while file.exists() {
        assert!(
            Instant::now() < limit,
            "the spooled report of a task the server does not have is retried forever"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = Instant::now();
    r.stop().await.unwrap();
    let took = asked.elapsed();
    println!("containment figure: 404 spool entry dropped; shutdown took {took:?}");
    assert!(
        took < Duration::from_secs(30),
        "a dropped report does not hold the shutdown ({took:?} of a 60 s grace)"
    );
    assert_eq!(std::fs::read_dir(&spool_dir).unwrap().count(), 0);
    // The real task is untouched.
    assert_eq!(
        w.admin.task(&real, None).await.unwrap().state,
        TaskState::Queued
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_runner_ends_what_the_cell_of_an_earlier_run_still_holds() {
    let w = World::start().await;
    let mut c = w.config("r1");
    c.agents
        .insert("echo".into(), tunnel_runner::AgentConfig::echo());
    std::fs::create_dir_all(&c.spool_dir).unwrap();
    let tag = unique_tag("leftover");
    let mut spawned = Vec::new();
    let mut entries = Vec::new();

    // A leftover that left the agent's group and session but carries the task's marker.
    let mark = format!("test-{tag}");
    let marked = Command::new("setsid")
        .args(["sleep", "300"])
        .env("TUNNEL_TASK_MARK", &mark)
        .env(TAG_VAR, &tag)
        .spawn()
        .unwrap();
    spawned.push(marked);
    entries.push(serde_json::json!({"pgid": null, "mark": mark}));

    // A leftover in the task's cgroup, where cgroups are available.
    let mut cgroup = None;
    if let tunnel_runner::Mechanism::CgroupV2(parent) =
        tunnel_runner::contain::detect(Containment::Auto)
    {
        let dir = parent.join(format!("tunnel-test-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let inside = Command::new("sh")
            .args([
                "-c",
                r#"echo 0 > "$0/cgroup.procs" && exec setsid sleep 300"#,
            ])
            .arg(&dir)
            .env(TAG_VAR, &tag)
            .spawn()
            .unwrap();
        spawned.push(inside);
        let procs = dir.join("cgroup.procs");
        while std::fs::read_to_string(&procs)
            .unwrap_or_default()
            .trim()
            .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        entries.push(serde_json::json!({"pgid": null, "cgroup": dir}));
        cgroup = Some(dir);
    } else {
        eprintln!("no writable cgroup v2 here: only the marked leftover is checked");
    }
    assert_eq!(tagged(&tag).len(), entries.len());

    for e in &entries {
        let (id, attempt, lease_token) = acked_attempt(&w, "r1").await;
        let mut entry = serde_json::json!({
            "task_id": id, "attempt": attempt, "lease_token": lease_token,
            "pending": [], "finish": null
        });
        for (k, v) in e.as_object().unwrap() {
            entry[k] = v.clone();
        }
        std::fs::write(
            c.spool_dir.join(format!("{id}.{attempt}.json")),
            entry.to_string(),
        )
        .unwrap();
    }
    let started = Instant::now();
    let r = RunnerHandle::spawn(c);
    all_gone(&tag, started, "restarted runner, leftovers of a cell").await;
    for mut p in spawned {
        let status = p.wait().unwrap();
        assert!(status.code().is_none(), "killed by a signal: {status:?}");
    }
    if let Some(dir) = cgroup {
        let limit = Instant::now() + Duration::from_secs(5);
        while dir.exists() {
            assert!(Instant::now() < limit, "the task's cgroup was removed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    r.stop().await.unwrap();
    w.stop().await;
}
