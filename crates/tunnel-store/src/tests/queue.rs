//! Queue floods: the claim reads only what the runner could take, tasks do not wait forever,
//! and one token cannot fill the queue.

use super::*;

conformance!(
    claim_merges_agents_and_projects_in_submission_order,
    tasks_waiting_past_the_maximum_end_timed_out_and_the_chat_is_told,
    a_token_may_have_only_so_many_tasks_waiting,
);

/// A second store on the fixture's database with these settings (and the fixture's clock).
async fn with_settings(f: &Fixture, settings: QueueSettings) -> Store {
    Store::open(
        &f.db,
        settings,
        f.clock.clone(),
        Arc::new(Recorder::default()),
    )
    .await
    .unwrap()
}

fn task(agent: &str, prompt: &str, project: Option<&str>) -> SubmitTask {
    let mut t = SubmitTask::new(agent, prompt);
    t.project = project.map(Into::into);
    t
}

async fn claim_req_of(
    store: &Store,
    runner: &str,
    agents: &[&str],
    projects: &[&str],
) -> Option<String> {
    let req = ClaimRequest {
        agents: agents.iter().map(|a| a.to_string()).collect(),
        projects: projects.iter().map(|p| p.to_string()).collect(),
        ..claim_req(runner)
    };
    store.claim(&req).await.unwrap().map(|o| o.task.prompt)
}

async fn claim_merges_agents_and_projects_in_submission_order(f: Fixture) {
    let s = &f.store;
    // Interleaved: tasks this runner can take, and a crowd it cannot (another agent, another
    // project, a session pinned to another runner, a parked task not yet due).
    let submit = |t: SubmitTask| async move { s.submit("o", None, t).await.unwrap().0 };
    // A conversation whose session lives on runner r2: its next task is r2's only.
    let (pinned, _) = s
        .submit("o", None, in_conv("pin first", "pc"))
        .await
        .unwrap();
    let o = s.claim(&claim_req("r2")).await.unwrap().unwrap();
    assert_eq!(o.task.id, pinned.id);
    s.ack(&o.task.id, &attempt_of(&o)).await.unwrap();
    s.finish(
        &o.task.id,
        finish_req(&o, Outcome::Succeeded, Some("sess-r2")),
    )
    .await
    .unwrap();
    submit(task("gemini", "other agent 1", None)).await;
    submit(task("codex", "codex web", Some("web"))).await;
    submit(task("claude", "claude other project", Some("api"))).await;
    submit(task("claude", "claude none", None)).await;
    submit(task("gemini", "other agent 2", None)).await;
    submit(task("claude", "claude web", Some("web"))).await;
    submit(task("codex", "codex none", None)).await;

    submit(in_conv("pinned to r2", "pc")).await;
    submit(task("codex", "codex last", None)).await;

    let mut got = Vec::new();
    while let Some(p) = claim_req_of(s, "r1", &["codex", "claude"], &["web"]).await {
        got.push(p);
    }
    assert_eq!(
        got,
        [
            "codex web",
            "claude none",
            "claude web",
            "codex none",
            "codex last"
        ],
        "oldest first across agents and projects; nothing another runner, agent or project \
         must take"
    );
    assert_eq!(
        claim_req_of(s, "r2", &["claude"], &[]).await.as_deref(),
        Some("pinned to r2")
    );
    assert_eq!(
        claim_req_of(s, "r3", &["claude", "claude"], &["api", "api"])
            .await
            .as_deref(),
        Some("claude other project"),
        "a runner listing a name twice gets each task once"
    );
    assert_eq!(claim_req_of(s, "r3", &["claude"], &["api"]).await, None);
}

async fn tasks_waiting_past_the_maximum_end_timed_out_and_the_chat_is_told(f: Fixture) {
    let max = 3_600_000;
    let store = with_settings(
        &f,
        QueueSettings {
            max_queue_ms: Some(max),
            // The running task's lease outlasts the test: only the queue limit is due.
            lease_ms: 4 * max,
            ..QueueSettings::default()
        },
    )
    .await;
    let start = f.clock.now_ms();
    let mut old = in_conv("nobody runs this agent", "c-old");
    old.agent = "gemini".into();
    old.reply_to = Some(discord("chan-1"));
    let (old, _) = store.submit("o", None, old).await.unwrap();
    // Running, and the task waiting behind it in the same session.
    let (running, _) = store
        .submit("o", None, in_conv("runs", "c-run"))
        .await
        .unwrap();
    let (behind, _) = store
        .submit("o", None, in_conv("behind", "c-run"))
        .await
        .unwrap();
    let o = store.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(o.task.id, running.id);
    store.ack(&running.id, &attempt_of(&o)).await.unwrap();

    assert_eq!(
        store.expire_due().await.unwrap(),
        Some(start + max),
        "the oldest queued task's limit is the next deadline"
    );
    f.clock.advance(max / 2);
    let (young, _) = store
        .submit("o", None, in_conv("young", "c-young"))
        .await
        .unwrap();
    f.clock.advance(max / 2);
    store.expire_due().await.unwrap();

    let t = store.task(&old.id, &Scope::All).await.unwrap();
    assert_eq!(t.state, TaskState::TimedOut);
    let reason = t.reason.unwrap_or_default();
    assert!(
        reason.contains("no runner took it") && reason.contains("1 h"),
        "{reason}"
    );
    let t = store.task(&behind.id, &Scope::All).await.unwrap();
    assert_eq!(
        t.state,
        TaskState::TimedOut,
        "waiting behind a session counts"
    );
    let t = store.task(&young.id, &Scope::All).await.unwrap();
    assert_eq!(t.state, TaskState::Queued);
    // The chat of the expired task is told through the ordinary final delivery, after what
    // its destination has queued before it (the acknowledgement posted at submit, its edit).
    let mut finals = Vec::new();
    for _ in 0..10 {
        let (due, _) = store.due_deliveries(10).await.unwrap();
        if due.is_empty() {
            break;
        }
        for d in due {
            if d.kind == DeliveryKind::Final {
                finals.extend(d.task.as_ref().map(|t| t.id.clone()));
            }
            store
                .update_delivery(d.id, DeliveryUpdate::Sent { message_id: None })
                .await
                .unwrap();
        }
    }
    assert_eq!(finals, std::slice::from_ref(&old.id));
    let (events, _) = store.events(&old.id, &Scope::All, 0, 100).await.unwrap();
    assert!(
        events.iter().any(|e| e.data["state"] == "timed_out"),
        "{events:?}"
    );
}

async fn a_token_may_have_only_so_many_tasks_waiting(f: Fixture) {
    let store = with_settings(
        &f,
        QueueSettings {
            max_queued_per_token: Some(3),
            ..QueueSettings::default()
        },
    )
    .await;
    for i in 0..3 {
        store
            .submit("c1", Some(format!("k{i}")), SubmitTask::new("claude", "x"))
            .await
            .unwrap();
    }
    let refused = store
        .submit("c1", None, SubmitTask::new("claude", "one too many"))
        .await;
    match refused {
        Err(StoreError::QueueFull(m)) => {
            assert!(
                m.contains("3 tasks waiting") && m.contains("max_queued_per_token"),
                "{m}"
            )
        }
        other => panic!("expected QueueFull, got {other:?}"),
    }
    // A retried submit with a key already used is an answer, not a new task.
    let (_, created) = store
        .submit("c1", Some("k0".into()), SubmitTask::new("claude", "x"))
        .await
        .unwrap();
    assert!(!created);
    // Other tokens are not affected; a task that starts frees a place.
    store
        .submit("c2", None, SubmitTask::new("claude", "other token"))
        .await
        .unwrap();
    let o = store.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(o.task.prompt, "x");
    store
        .submit("c1", None, SubmitTask::new("claude", "now fits"))
        .await
        .unwrap();
    let listed = store
        .tasks(
            TaskFilter {
                limit: 100,
                ..Default::default()
            },
            &Scope::Owner("c1".into()),
        )
        .await
        .unwrap();
    assert_eq!(listed.len(), 4, "the refused submit changed nothing");
}
