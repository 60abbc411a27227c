//! The built-in adapters against CLIs that print exactly what the real ones print: the fake
//! CLIs in tests/fixtures always, and the real `claude`, `codex` and `gemini` from npm when
//! CLAUDE_BIN / CODEX_BIN / GEMINI_BIN point at them (`.ci/run` installs them), driven against
//! the offline model-API stand-in `fake_model_api.py`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tunnel_protocol::{SessionMode, TaskState};
use tunnel_runner::{AgentConfig, AgentKind};

use crate::harness::{RunnerHandle, World, task};

#[path = "../fixtures/model_api.rs"]
mod model_api;
pub use model_api::{ModelApi, real_env};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

const KINDS: [(AgentKind, &str); 3] = [
    (AgentKind::Claude, "claude"),
    (AgentKind::Codex, "codex"),
    (AgentKind::Gemini, "gemini"),
];

pub fn agent(kind: AgentKind, program: &Path, env: BTreeMap<String, String>) -> AgentConfig {
    let mut a = AgentConfig::builtin(kind, program.display().to_string());
    a.env = env;
    // The tests run as root in CI; Claude needs exactly this to skip permissions there.
    a.env.insert("IS_SANDBOX".into(), "1".into());
    a
}

/// Runs the shared scenario: an answer with a session id, a follow-up that resumes it, and a
/// tool call that edits a file in the project directory.
async fn answer_resume_and_tool(
    w: &World,
    name: &str,
    plain: AgentConfig,
    tool: AgentConfig,
    project: &Path,
) {
    let mut c = w.config(&format!("r-{name}"));
    c.agents.insert(name.into(), plain);
    c.agents.insert(format!("{name}-tool"), tool);
    c.projects.insert("proj".into(), project.to_path_buf());
    let r = RunnerHandle::spawn(c);

    let mut first = task(name, "say hi");
    first.conversation = Some(format!("conv-{name}"));
    first.project = Some("proj".into());
    let t1 = w.ended(&w.submit(first.clone()).await.id).await;
    assert_eq!(t1.state, TaskState::Succeeded, "{name}: {t1:?}");
    let r1 = t1.result.unwrap();
    assert_eq!(
        r1.text.as_deref().map(str::trim),
        Some("fake reply to: say hi"),
        "{name}"
    );
    let sid = r1.session_id.expect("a native session id");

    let mut second = first.clone();
    second.prompt = "again".into();
    let t2 = w.ended(&w.submit(second).await.id).await;
    assert_eq!(t2.state, TaskState::Succeeded, "{name}: {t2:?}");
    let r2 = t2.result.unwrap();
    assert_eq!(
        r2.session_id.as_deref(),
        Some(sid.as_str()),
        "{name}: the follow-up resumed the session"
    );
    assert_eq!(
        r2.text.as_deref().map(str::trim),
        Some("fake reply to: again")
    );

    let mut edit = task(&format!("{name}-tool"), "write the file");
    edit.project = Some("proj".into());
    edit.session = SessionMode::New;
    let t3 = w.ended(&w.submit(edit).await.id).await;
    assert_eq!(t3.state, TaskState::Succeeded, "{name}: {t3:?}");
    let written =
        std::fs::read_to_string(project.join(format!("from-{name}.txt"))).unwrap_or_default();
    assert!(
        written.contains(&format!("from-{name}")),
        "{name}: the tool call edited the project"
    );
    let log = w.admin.events(&t3.id, 0).await.unwrap();
    assert!(
        log.events.iter().any(|e| e.kind == "tool_use"),
        "{name}: {log:?}"
    );
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_clis_answer_resume_and_edit() {
    let w = World::start().await;
    for (kind, name) in KINDS {
        let home = w.dir.path().join(format!("home-{name}"));
        let project = w.dir.path().join(format!("proj-{name}"));
        std::fs::create_dir_all(&project).unwrap();
        let program = fixtures().join(format!("fake-{name}"));
        let base = BTreeMap::from([("HOME".to_owned(), home.display().to_string())]);
        if kind == AgentKind::Claude {
            // A session started outside tunnel, in Claude's own store: `recent` lists it.
            let dir = home.join(".claude/projects/-elsewhere");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("0b0e0000-0000-4000-8000-00000000cafe.jsonl"),
                "{}\n",
            )
            .unwrap();
        }
        let mut tool_env = base.clone();
        tool_env.insert("FAKE_SCENARIO".into(), "tool".into());
        tool_env.insert(
            "FAKE_TOOL_COMMAND".into(),
            format!("echo from-{name} > from-{name}.txt"),
        );
        answer_resume_and_tool(
            &w,
            name,
            agent(kind, &program, base),
            agent(kind, &program, tool_env),
            &project,
        )
        .await;
    }
}

/// Models each real CLI accepts, for the fallback check.
fn models(kind: AgentKind) -> (&'static str, &'static str) {
    match kind {
        AgentKind::Claude => ("claude-bad-model", "claude-sonnet-4-5"),
        AgentKind::Codex => ("gpt-bad-model", "gpt-5.5"),
        _ => ("gemini-bad-model", "gemini-2.5-flash"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clis_run_end_to_end_offline() {
    let available: Vec<_> = KINDS
        .iter()
        .filter_map(|(kind, name)| {
            let var = format!("{}_BIN", name.to_uppercase());
            std::env::var(&var)
                .ok()
                .filter(|p| Path::new(p).is_file())
                .map(|p| (*kind, *name, PathBuf::from(p)))
        })
        .collect();
    if available.is_empty() {
        eprintln!(
            "SKIPPED real_clis_run_end_to_end_offline: set CLAUDE_BIN/CODEX_BIN/GEMINI_BIN (scripts/test installs them when TUNNEL_REAL_CLIS=1)"
        );
        return;
    }
    if std::env::var("TUNNEL_REAL_CLIS").as_deref() == Ok("1") {
        assert_eq!(
            available.len(),
            3,
            "TUNNEL_REAL_CLIS=1 but not all three CLIs are installed"
        );
    }
    let w = World::start().await;
    for (kind, name, bin) in available {
        let api = ModelApi::start(&w.dir.path().join(format!("{name}-requests.jsonl")));
        let home = w.dir.path().join(format!("real-home-{name}"));
        let env = real_env(name, &home, &api.url);
        let project = w.dir.path().join(format!("real-proj-{name}"));
        std::fs::create_dir_all(&project).unwrap();

        // The tool scenario is the stand-in's: its model asks for one shell call.
        let plain = agent(kind, &bin, env.clone());
        let tool = agent(kind, &bin, env.clone());
        api.scenario(serde_json::json!({"scenario": "text"}));
        // Text answers first; the tool task switches the stand-in just before it runs.
        let mut c = w.config(&format!("real-{name}"));
        c.agents.insert(name.into(), plain.clone());
        c.projects.insert("proj".into(), project.clone());
        let r = RunnerHandle::spawn(c);
        let mut first = task(name, "say hi");
        first.conversation = Some(format!("real-{name}"));
        first.project = Some("proj".into());
        let t1 = w.ended(&w.submit(first.clone()).await.id).await;
        assert_eq!(t1.state, TaskState::Succeeded, "{name}: {t1:?}");
        let r1 = t1.result.unwrap();
        assert!(
            r1.text
                .as_deref()
                .unwrap_or_default()
                .contains("fake reply to: say hi"),
            "{name}: {r1:?}"
        );
        let sid = r1.session_id.expect("the real CLI's session id");
        let mut again = first.clone();
        again.prompt = "again".into();
        let t2 = w.ended(&w.submit(again).await.id).await;
        assert_eq!(t2.state, TaskState::Succeeded, "{name}: {t2:?}");
        assert_eq!(
            t2.result.unwrap().session_id.as_deref(),
            Some(sid.as_str()),
            "{name} resumed"
        );

        api.scenario(serde_json::json!({"scenario": "tool", "tool_command": format!("echo from-{name} > from-{name}.txt")}));
        let mut edit = task(name, "write the file");
        edit.project = Some("proj".into());
        edit.session = SessionMode::New;
        let t3 = w.ended(&w.submit(edit).await.id).await;
        assert_eq!(t3.state, TaskState::Succeeded, "{name}: {t3:?}");
        let written =
            std::fs::read_to_string(project.join(format!("from-{name}.txt"))).unwrap_or_default();
        assert!(
            written.contains(&format!("from-{name}")),
            "{name}: the real CLI's tool call edited the project"
        );

        api.scenario(serde_json::json!({"scenario": "error:500"}));
        let t4 = w.ended(&w.submit(task(name, "fail please")).await.id).await;
        assert_eq!(t4.state, TaskState::Failed, "{name}: {t4:?}");
        let err = t4.result.unwrap().error.unwrap_or_default();
        assert!(
            !err.is_empty(),
            "{name}: a model error becomes a clear failure"
        );
        r.stop().await.unwrap();

        // Fallback: the first model is overloaded, the second answers.
        let (bad, good) = models(kind);
        api.scenario(serde_json::json!({"scenario": "error:529", "error_models": bad}));
        let mut fallback = tool.clone();
        fallback.models = vec![bad.into(), good.into()];
        let mut c = w.config(&format!("real-{name}-fb"));
        c.agents.insert(name.into(), fallback);
        let r = RunnerHandle::spawn(c);
        let t5 = w.ended(&w.submit(task(name, "fall back")).await.id).await;
        let log = w.admin.events(&t5.id, 0).await.unwrap();
        assert_eq!(t5.state, TaskState::Succeeded, "{name}: {t5:?} {log:?}");
        assert!(
            log.events.iter().any(|e| e.kind == "fallback"),
            "{name}: {log:?}"
        );
        r.stop().await.unwrap();
    }
}
