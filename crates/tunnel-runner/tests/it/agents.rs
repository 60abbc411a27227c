//! Agents run for real and their answers, sessions and failures come back through the server.

use std::time::Duration;

use tunnel_protocol::{SessionMode, TaskState};
use tunnel_runner::{AgentKind, OutputMode};

use crate::harness::{RunnerHandle, World, builtin, custom, task};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_goes_round_verbatim() {
    let w = World::start().await;
    let mut c = w.config("r1");
    c.agents
        .insert("echo".into(), tunnel_runner::AgentConfig::echo());
    let r = RunnerHandle::spawn(c);
    let prompt = "-n --help $(id) `whoami`; echo \"quoted\" | cat ✓";
    let t = w.submit(task("echo", prompt)).await;
    let done = w.ended(&t.id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(done.result.unwrap().text.as_deref(), Some(prompt));
    let log = w.admin.events(&t.id, 0).await.unwrap();
    assert!(
        log.events
            .iter()
            .any(|e| e.kind == "text" && e.data["text"] == prompt),
        "{log:?}"
    );
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_id_comes_back_and_the_next_task_resumes_it() {
    let w = World::start().await;
    // A JSON-lines agent that reports a session (new, or the one it was asked to resume).
    let agent = w.script(
        "session-agent",
        r#"prompt=$(cat); sid="${1:-new-$$}"
printf '{"session_id":"%s"}\n{"text":"resumed=%s"}\n{"result":"answer to %s"}\n' "$sid" "$1" "$prompt""#,
    );
    let mut c = w.config("r1");
    c.agents.insert(
        "sess".into(),
        custom(&agent, &["{session_id}"], OutputMode::JsonLines),
    );
    let r = RunnerHandle::spawn(c);

    let mut first = task("sess", "one");
    first.conversation = Some("chat-1".into());
    let t1 = w.ended(&w.submit(first.clone()).await.id).await;
    let sid = t1.result.as_ref().unwrap().session_id.clone().unwrap();
    assert!(sid.starts_with("new-"), "{t1:?}");

    let mut second = first.clone();
    second.prompt = "two".into();
    let t2 = w.ended(&w.submit(second).await.id).await;
    assert_eq!(
        t2.result.as_ref().unwrap().session_id.as_deref(),
        Some(sid.as_str())
    );
    let log = w.admin.events(&t2.id, 0).await.unwrap();
    assert!(
        log.events
            .iter()
            .any(|e| e.data["text"] == format!("resumed={sid}")),
        "{log:?}"
    );

    let mut fresh = first.clone();
    fresh.session = SessionMode::New;
    let t3 = w.ended(&w.submit(fresh).await.id).await;
    assert_ne!(t3.result.unwrap().session_id, Some(sid));
    r.stop().await.unwrap();
}

/// A stand-in for `claude` that is overloaded on model `bad` and answers on any other.
const FAKE_CLAUDE: &str = r#"model=""
while [ $# -gt 0 ]; do case "$1" in --model) model="$2"; shift;; esac; shift; done
cat > /dev/null
sid=5f1c0000-0000-4000-8000-0000000000aa
echo '{"type":"system","subtype":"init","session_id":"'$sid'","model":"'$model'"}'
case "$model" in
bad) echo '{"type":"result","subtype":"success","is_error":true,"duration_ms":1,"duration_api_ms":0,"num_turns":1,"result":"API Error: 529 Overloaded. This is a server-side issue, usually temporary","session_id":"'$sid'","api_error_status":529,"errors":[]}'; exit 1;;
limited) echo '{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":'$(( $(date +%s) + 7200 ))',"rateLimitType":"five_hour"},"uuid":"u","session_id":"'$sid'"}'
  echo '{"type":"result","subtype":"success","is_error":true,"duration_ms":1,"duration_api_ms":0,"num_turns":1,"result":"You'"'"'ve hit your limit · resets 1pm (Europe/Lisbon)","session_id":"'$sid'"}'; exit 1;;
esac
echo '{"type":"assistant","message":{"id":"m","type":"message","role":"assistant","model":"'$model'","content":[{"type":"text","text":"hi from '$model'"}]},"session_id":"'$sid'"}'
echo '{"type":"result","subtype":"success","is_error":false,"duration_ms":5,"duration_api_ms":4,"num_turns":1,"result":"done by '$model'","session_id":"'$sid'","total_cost_usd":0.01,"usage":{"input_tokens":1,"output_tokens":1}}'"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_model_falls_back_to_the_next() {
    let w = World::start().await;
    let mut claude = builtin(AgentKind::Claude, &w.script("claude", FAKE_CLAUDE));
    claude.models = vec!["bad".into(), "good".into()];
    let mut c = w.config("r1");
    c.agents.insert("claude".into(), claude);
    let r = RunnerHandle::spawn(c);
    let t = w.ended(&w.submit(task("claude", "go")).await.id).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.result.unwrap().text.as_deref(), Some("done by good"));
    let log = w.admin.events(&t.id, 0).await.unwrap();
    let fallback = log
        .events
        .iter()
        .find(|e| e.kind == "fallback")
        .expect("a fallback event");
    assert_eq!(
        (fallback.data["from"].as_str(), fallback.data["to"].as_str()),
        (Some("bad"), Some("good"))
    );

    // With only the overloaded model, the failure is clear.
    let mut only_bad = task("claude", "go");
    only_bad.model = Some("bad".into());
    let t = w.ended(&w.submit(only_bad).await.id).await;
    assert_eq!(t.state, TaskState::Failed);
    assert!(t.result.unwrap().error.unwrap().contains("529 Overloaded"));
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_limit_parks_the_task_until_the_reset() {
    let w = World::start().await;
    let mut c = w.config("r1");
    c.agents.insert(
        "claude".into(),
        builtin(AgentKind::Claude, &w.script("claude", FAKE_CLAUDE)),
    );
    let r = RunnerHandle::spawn(c);
    let mut t = task("claude", "go");
    t.model = Some("limited".into());
    let t = w.submit(t).await;
    let parked = w.reaches(&t.id, TaskState::Parked).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let nb = parked.not_before.unwrap();
    assert!(
        (nb - (now + 7_200_000)).abs() < 60_000,
        "parked until the reported reset: {nb} vs {now}"
    );
    assert!(parked.reason.unwrap().contains("hit your limit"));
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_cli_fails_with_how_to_install_it() {
    let w = World::start().await;
    let mut c = w.config("r1");
    c.agents.insert(
        "codex".into(),
        builtin(AgentKind::Codex, std::path::Path::new("/nonexistent/codex")),
    );
    c.offer_missing_agents = true;
    let r = RunnerHandle::spawn(c);
    let t = w.ended(&w.submit(task("codex", "go")).await.id).await;
    assert_eq!(t.state, TaskState::Failed);
    let err = t.result.unwrap().error.unwrap();
    assert!(err.contains("npm install -g @openai/codex"), "{err}");
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_agent_reports_its_stderr() {
    let w = World::start().await;
    let agent = w.script(
        "broken",
        "echo partial; echo 'fatal: config missing' >&2; exit 3",
    );
    let mut c = w.config("r1");
    c.agents
        .insert("broken".into(), custom(&agent, &[], OutputMode::Text));
    let r = RunnerHandle::spawn(c);
    let t = w.ended(&w.submit(task("broken", "go")).await.id).await;
    assert_eq!(t.state, TaskState::Failed);
    let res = t.result.unwrap();
    assert_eq!(res.exit_code, Some(3));
    assert_eq!(res.stderr_tail.as_deref(), Some("fatal: config missing"));
    assert_eq!(res.text.as_deref(), Some("partial"));
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_choose_the_directory() {
    let w = World::start().await;
    let web = w.dir.path().join("web");
    std::fs::create_dir_all(&web).unwrap();
    let agent = w.script("pwd-agent", "cat >/dev/null; pwd");
    let mut c = w.config("r1");
    c.agents
        .insert("pwd".into(), custom(&agent, &[], OutputMode::Text));
    c.projects.insert("web".into(), web.clone());
    let r = RunnerHandle::spawn(c);
    let mut t = task("pwd", "where am I");
    t.project = Some("web".into());
    let t = w.ended(&w.submit(t).await.id).await;
    assert_eq!(
        t.result.unwrap().text.unwrap(),
        web.canonicalize().unwrap().display().to_string()
    );
    let _ = Duration::ZERO;
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_and_file_tasks_run_only_where_enabled_and_inside_the_project() {
    let w = World::start().await;
    let proj = w.dir.path().join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    // A runner with the default agents offers neither.
    let mut plain = w.config("plain");
    plain
        .agents
        .insert("echo".into(), tunnel_runner::AgentConfig::echo());
    let r1 = RunnerHandle::spawn(plain);
    let mut shell_task = task("shell", "echo made > out.txt && cat out.txt");
    shell_task.project = Some("proj".into());
    let queued = w.submit(shell_task.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        w.admin.task(&queued.id, None).await.unwrap().state,
        TaskState::Queued,
        "not offered to a runner without shell"
    );
    r1.stop().await.unwrap();

    let mut c = w.config("ops");
    c.agents.insert(
        "shell".into(),
        tunnel_runner::AgentConfig::builtin(AgentKind::Shell, "shell"),
    );
    c.agents.insert(
        "files".into(),
        tunnel_runner::AgentConfig::builtin(AgentKind::Files, "files"),
    );
    c.projects.insert("proj".into(), proj.clone());
    let r2 = RunnerHandle::spawn(c);
    let done = w.ended(&queued.id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(done.result.unwrap().text.as_deref(), Some("made"));
    assert!(
        proj.join("out.txt").exists(),
        "the command ran in the project"
    );

    let mut edit = task(
        "files",
        r#"{"op":"edit","path":"out.txt","old_string":"made","new_string":"edited"}"#,
    );
    edit.project = Some("proj".into());
    assert_eq!(
        w.ended(&w.submit(edit).await.id).await.state,
        TaskState::Succeeded
    );
    assert_eq!(
        std::fs::read_to_string(proj.join("out.txt")).unwrap(),
        "edited\n"
    );
    let mut escape = task("files", r#"{"op":"read","path":"../t.db"}"#);
    escape.project = Some("proj".into());
    let refused = w.ended(&w.submit(escape).await.id).await;
    assert_eq!(refused.state, TaskState::Failed);
    assert!(
        refused
            .result
            .unwrap()
            .error
            .unwrap()
            .contains("inside the project")
    );
    r2.stop().await.unwrap();
}
