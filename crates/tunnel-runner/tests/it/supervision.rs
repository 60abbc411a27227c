//! Timeouts, cancels and shutdowns stop the agent's whole process group; nothing is orphaned.

use std::time::{Duration, Instant};

use tunnel_protocol::TaskState;
use tunnel_runner::{OutputMode, RunnerError};

use crate::harness::{RunnerHandle, World, alive, custom, read_pid, task};

/// An agent that starts a grandchild and waits forever, writing both pids.
fn stubborn(w: &World) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let me = w.dir.path().join("agent.pid");
    let kid = w.dir.path().join("child.pid");
    let script = w.script(
        "stubborn",
        &format!(
            "echo $$ > {me}; sleep 300 & echo $! > {kid}; echo started; trap '' TERM; while true; do sleep 1; done",
            me = me.display(),
            kid = kid.display()
        ),
    );
    (script, me, kid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_group() {
    let w = World::start().await;
    let (script, me, kid) = stubborn(&w);
    let mut c = w.config("r1");
    c.agents
        .insert("slow".into(), custom(&script, &[], OutputMode::Text));
    let r = RunnerHandle::spawn(c);
    let mut t = task("slow", "go");
    t.timeout_ms = Some(1_000);
    let t = w.ended(&w.submit(t).await.id).await;
    assert_eq!(t.state, TaskState::TimedOut, "{t:?}");
    let (agent, child) = (read_pid(&me), read_pid(&kid));
    assert!(
        !alive(agent) && !alive(child),
        "the agent ignored SIGTERM, so SIGKILL took the group"
    );
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_agent_within_seconds() {
    let w = World::start().await;
    let (script, me, kid) = stubborn(&w);
    let mut c = w.config("r1");
    c.agents
        .insert("slow".into(), custom(&script, &[], OutputMode::Text));
    let r = RunnerHandle::spawn(c);
    let t = w.submit(task("slow", "go")).await;
    w.reaches(&t.id, TaskState::Running).await;
    let (agent, child) = (read_pid(&me), read_pid(&kid));
    let asked = Instant::now();
    w.admin.cancel(&t.id).await.unwrap();
    let done = w.ended(&t.id).await;
    assert_eq!(done.state, TaskState::Cancelled, "{done:?}");
    // Seen at once through the held heartbeat; the rest is the kill grace (0.5 s here).
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "took {:?}",
        asked.elapsed()
    );
    assert!(!alive(agent) && !alive(child));
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grandchild_left_behind_is_stopped_too() {
    let w = World::start().await;
    let kid = w.dir.path().join("orphan.pid");
    let script = w.script(
        "leaver",
        &format!("sleep 300 & echo $! > {}; echo bye", kid.display()),
    );
    let mut c = w.config("r1");
    c.agents
        .insert("leaver".into(), custom(&script, &[], OutputMode::Text));
    let r = RunnerHandle::spawn(c);
    let t = w.ended(&w.submit(task("leaver", "go")).await.id).await;
    assert_eq!(t.state, TaskState::Succeeded);
    let child = read_pid(&kid);
    for _ in 0..50 {
        if !alive(child) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(child), "the sleep the agent left behind was killed");
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_then_stops_and_reports_honestly() {
    let w = World::start().await;
    let (script, me, kid) = stubborn(&w);
    let mut c = w.config("r1");
    c.agents
        .insert("slow".into(), custom(&script, &[], OutputMode::Text));
    c.shutdown_grace = Duration::from_millis(500);
    let r = RunnerHandle::spawn(c);
    let t = w.submit(task("slow", "go")).await;
    w.reaches(&t.id, TaskState::Running).await;
    let (agent, child) = (read_pid(&me), read_pid(&kid));
    r.stop().await.unwrap();
    let done = w.admin.task(&t.id, None).await.unwrap();
    assert_eq!(
        done.state,
        TaskState::Failed,
        "reported, not left running: {done:?}"
    );
    assert!(done.result.unwrap().error.unwrap().contains("shut down"));
    assert!(!alive(agent) && !alive(child));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_stops_the_runner_with_a_clear_error() {
    let w = World::start().await;
    let mut c = w.config("r1");
    c.agents
        .insert("echo".into(), tunnel_runner::AgentConfig::echo());
    c.token = "tnl_000000000000_00000000".into();
    let err = tunnel_runner::run(c, Default::default()).await.unwrap_err();
    assert!(matches!(err, RunnerError::Unauthorized(_)), "{err}");
    let client_token = w
        .admin
        .create_token("c", tunnel_protocol::Role::Client)
        .await
        .unwrap()
        .token;
    let mut c = w.config("r2");
    c.agents
        .insert("echo".into(), tunnel_runner::AgentConfig::echo());
    c.token = client_token;
    let err = tunnel_runner::run(c, Default::default()).await.unwrap_err();
    assert!(err.to_string().contains("--role runner"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_concurrently_up_to_the_limit() {
    let w = World::start().await;
    let marks = w.dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    // Each run marks when it starts and ends; with four slots, all four overlap.
    let agent = w.script(
        "nap",
        &format!(
            "name=$(cat); date +%s%N > {m}/start.$name; sleep 1; date +%s%N > {m}/end.$name; echo ok",
            m = marks.display()
        ),
    );
    let mut c = w.config("r1");
    c.agents
        .insert("nap".into(), custom(&agent, &[], OutputMode::Text));
    c.max_concurrent = 4;
    let r = RunnerHandle::spawn(c);
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(w.submit(task("nap", &format!("t{i}"))).await.id);
    }
    for id in ids {
        assert_eq!(w.ended(&id).await.state, TaskState::Succeeded);
    }
    let read = |kind: &str, i: usize| -> u128 {
        std::fs::read_to_string(marks.join(format!("{kind}.t{i}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let last_start = (0..4).map(|i| read("start", i)).max().unwrap();
    let first_end = (0..4).map(|i| read("end", i)).min().unwrap();
    assert!(last_start < first_end, "all four ran at once");
    r.stop().await.unwrap();
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_crashed_run_left_in_the_spool_reaches_the_server() {
    let w = World::start().await;
    let c = {
        let mut c = w.config("r1");
        c.agents
            .insert("echo".into(), tunnel_runner::AgentConfig::echo());
        c
    };
    // An attempt a previous run of this runner acked, whose last events never left the spool.
    let runner_api = tunnel_client::Client::new(&w.url, &w.runner_token).unwrap();
    let t = w.submit(task("echo", "x")).await;
    let claim = tunnel_protocol::ClaimRequest {
        runner: "r1".into(),
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
    let offer = runner_api.claim(&claim).await.unwrap().unwrap();
    let at = tunnel_protocol::AttemptRef {
        attempt: offer.attempt,
        lease_token: offer.lease_token.clone(),
    };
    runner_api.ack(&t.id, &at).await.unwrap();
    std::fs::create_dir_all(&c.spool_dir).unwrap();
    let entry = serde_json::json!({
        "task_id": t.id, "attempt": offer.attempt, "lease_token": offer.lease_token, "pgid": null,
        "pending": [{"n": 1, "kind": "text", "data": {"text": "written before the crash"}}],
        "finish": null
    });
    std::fs::write(
        c.spool_dir.join(format!("{}.{}.json", t.id, offer.attempt)),
        entry.to_string(),
    )
    .unwrap();

    let r = RunnerHandle::spawn(c.clone());
    let done = w.ended(&t.id).await;
    assert_eq!(done.state, TaskState::Failed);
    assert!(
        done.result.unwrap().error.unwrap().contains("restarted"),
        "the fate is reported"
    );
    let log = w.admin.events(&t.id, 0).await.unwrap();
    assert!(
        log.events
            .iter()
            .any(|e| e.data["text"] == "written before the crash"),
        "{log:?}"
    );
    r.stop().await.unwrap();
    assert_eq!(
        std::fs::read_dir(&c.spool_dir).unwrap().count(),
        0,
        "the spool is empty once delivered"
    );
}
