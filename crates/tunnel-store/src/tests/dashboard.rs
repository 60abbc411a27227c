//! What the web dashboard asks of the store: task listing with every filter and keyset
//! pagination, the overview's counts, and sign-ins kept hashed.

use super::*;

conformance!(
    every_state_is_listed_and_counted,
    task_filters_and_keyset_pages,
    overview_counts_waiting_and_finished,
    web_sessions_expire_and_codes_are_taken_once,
);

fn filter(limit: u32) -> TaskFilter {
    TaskFilter {
        limit,
        ..Default::default()
    }
}

async fn ids(f: &Fixture, filter: TaskFilter, scope: &Scope) -> Vec<String> {
    let tasks = f.store.tasks(filter, scope).await.unwrap();
    tasks.into_iter().map(|t| t.prompt).collect()
}

/// Each state is listed and counted from its own partial index (migration 0019): a task in
/// every state a task can be in, for two owners, each listed under its state (by every owner
/// scope, and with the other filters that take another index) and counted once.
async fn every_state_is_listed_and_counted(f: Fixture) {
    // Per owner, in this order: queued, offered, running, cancelling, parked, succeeded,
    // failed, cancelled (before it ran).
    let mut expected: Vec<(String, &str, TaskState)> = Vec::new();
    for owner in ["alice", "bob"] {
        let mut ids = Vec::new();
        for i in 0..8 {
            // The last two are for an agent the runner lacks: they stay queued.
            let agent = if i < 6 { "claude" } else { "codex" };
            let (t, _) = f
                .store
                .submit(owner, None, SubmitTask::new(agent, format!("{owner} {i}")))
                .await
                .unwrap();
            ids.push(t.id);
        }
        // Claims take the oldest first.
        let mut offers = Vec::new();
        for _ in 0..5 {
            offers.push(f.store.claim(&claim_req("r1")).await.unwrap().unwrap());
        }
        let [o_offered, o_running, o_cancelling, o_parked, o_succeeded] = &offers[..] else {
            unreachable!()
        };
        for o in [o_running, o_cancelling, o_parked, o_succeeded] {
            f.store.ack(&o.task.id, &attempt_of(o)).await.unwrap();
        }
        f.store
            .cancel(&o_cancelling.task.id, &Scope::All)
            .await
            .unwrap();
        let mut park = finish_req(o_parked, Outcome::Parked, None);
        park.not_before = Some(f.clock.now_ms() + 3_600_000);
        f.store.finish(&o_parked.task.id, park).await.unwrap();
        f.store
            .finish(
                &o_succeeded.task.id,
                finish_req(o_succeeded, Outcome::Succeeded, None),
            )
            .await
            .unwrap();
        let o_failed = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
        f.store
            .finish(
                &o_failed.task.id,
                finish_req(&o_failed, Outcome::Failed, None),
            )
            .await
            .unwrap();
        let left = f.store.cancel(&ids[7], &Scope::All).await.unwrap();
        assert_eq!(left.state, TaskState::Cancelled);
        for (o, state) in [
            (o_offered, TaskState::Offered),
            (o_running, TaskState::Running),
            (o_cancelling, TaskState::Cancelling),
            (o_parked, TaskState::Parked),
            (o_succeeded, TaskState::Succeeded),
            (&o_failed, TaskState::Failed),
        ] {
            expected.push((o.task.prompt.clone(), owner, state));
        }
        expected.push((format!("{owner} 6"), owner, TaskState::Queued));
        expected.push((format!("{owner} 7"), owner, TaskState::Cancelled));
    }
    let mut counted = f.store.counts().await.unwrap().by_state;
    counted.sort_by_key(|(s, _)| s.as_str());
    let mut want: Vec<(TaskState, u64)> = Vec::new();
    for (_, _, s) in &expected {
        match want.iter_mut().find(|(w, _)| w == s) {
            Some((_, n)) => *n += 1,
            None => want.push((*s, 1)),
        }
    }
    want.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(counted, want);
    for state in TaskState::ALL {
        for scope in [
            Scope::All,
            Scope::Owner("alice".into()),
            Scope::Owner("bob".into()),
        ] {
            let mut want: Vec<String> = expected
                .iter()
                .filter(|(_, o, s)| {
                    *s == state && (scope == Scope::All || scope == Scope::Owner((*o).into()))
                })
                .map(|(p, _, _)| p.clone())
                .collect();
            // Newest first.
            want.reverse();
            let by_state = TaskFilter {
                state: Some(state),
                ..filter(50)
            };
            assert_eq!(
                ids(&f, by_state.clone(), &scope).await,
                want,
                "{state} {scope:?}"
            );
            let with_runner = TaskFilter {
                runner: Some("r1".into()),
                agent: Some("claude".into()),
                ..by_state
            };
            let ran: Vec<String> = want
                .into_iter()
                .filter(|p| !p.ends_with(" 6") && !p.ends_with(" 7"))
                .collect();
            assert_eq!(
                ids(&f, with_runner, &scope).await,
                ran,
                "{state} {scope:?} r1"
            );
        }
    }
}

async fn task_filters_and_keyset_pages(f: Fixture) {
    for i in 0..5 {
        f.store
            .submit(
                "alice",
                None,
                SubmitTask::new("claude", format!("p{i} fix 100%_done")),
            )
            .await
            .unwrap();
    }
    f.store
        .submit("bob", None, SubmitTask::new("codex", "bob's <b>secret</b>"))
        .await
        .unwrap();
    let offer = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(offer.task.prompt, "p0 fix 100%_done");

    // Pages of two, newest first, each continuing after the last id of the one before.
    let all = f.store.tasks(filter(10), &Scope::All).await.unwrap();
    assert_eq!(all.len(), 6);
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = f
            .store
            .tasks(
                TaskFilter {
                    before: before.clone(),
                    ..filter(2)
                },
                &Scope::All,
            )
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        before = Some(page.last().unwrap().id.clone());
        seen.extend(page.into_iter().map(|t| t.id));
    }
    assert_eq!(seen, all.iter().map(|t| t.id.clone()).collect::<Vec<_>>());

    let by_runner = TaskFilter {
        runner: Some("r1".into()),
        ..filter(10)
    };
    assert_eq!(ids(&f, by_runner, &Scope::All).await, ["p0 fix 100%_done"]);
    // `%` and `_` are text, not wildcards; case does not matter.
    let search = |q: &str| TaskFilter {
        search: Some(q.into()),
        ..filter(10)
    };
    assert_eq!(ids(&f, search("100%_D"), &Scope::All).await.len(), 5);
    assert!(ids(&f, search("1000"), &Scope::All).await.is_empty());
    assert!(ids(&f, search("%"), &Scope::All).await.len() == 5);
    assert_eq!(
        ids(&f, search("<B>SECRET"), &Scope::All).await,
        ["bob's <b>secret</b>"]
    );
    // A bounded search looks at the newest tasks only (bob's is the newest of six), and
    // from a cursor on, at the ones just before it.
    let shallow = |q: &str, depth: u32, before: Option<String>| TaskFilter {
        search: Some(q.into()),
        search_depth: depth,
        before,
        ..filter(10)
    };
    assert!(
        ids(&f, shallow("fix", 1, None), &Scope::All)
            .await
            .is_empty()
    );
    assert_eq!(
        ids(&f, shallow("fix", 3, None), &Scope::All).await,
        ["p4 fix 100%_done", "p3 fix 100%_done"]
    );
    assert_eq!(ids(&f, shallow("fix", 6, None), &Scope::All).await.len(), 5);
    let p3 = all.iter().find(|t| t.prompt.starts_with("p3")).unwrap();
    assert_eq!(
        ids(&f, shallow("fix", 2, Some(p3.id.clone())), &Scope::All).await,
        ["p2 fix 100%_done", "p1 fix 100%_done"]
    );
    // A client's search never reaches another client's tasks.
    let alice = Scope::Owner("alice".into());
    assert!(ids(&f, search("secret"), &alice).await.is_empty());
    let codex = TaskFilter {
        agent: Some("codex".into()),
        ..filter(10)
    };
    assert!(ids(&f, codex, &alice).await.is_empty());
    let queued = TaskFilter {
        state: Some(TaskState::Queued),
        ..filter(10)
    };
    assert_eq!(ids(&f, queued, &alice).await.len(), 4);
    // An unknown cursor gives an empty page, not everything.
    let unknown = TaskFilter {
        before: Some(new_id()),
        ..filter(10)
    };
    assert!(ids(&f, unknown, &Scope::All).await.is_empty());
}

async fn overview_counts_waiting_and_finished(f: Fixture) {
    let start = f.clock.now_ms();
    f.store
        .submit("alice", None, SubmitTask::new("claude", "a"))
        .await
        .unwrap();
    f.clock.advance(61_000);
    for p in ["b", "c"] {
        f.store
            .submit("bob", None, SubmitTask::new("claude", p))
            .await
            .unwrap();
    }
    let (t, _) = f
        .store
        .submit("bob", None, SubmitTask::new("codex", "d"))
        .await
        .unwrap();
    f.store.cancel(&t.id, &Scope::All).await.unwrap();
    let o = f.store.overview(start, &Scope::All).await.unwrap();
    assert_eq!(
        o.queues,
        [AgentQueue {
            agent: "claude".into(),
            waiting: 3,
            oldest_created_at: start,
        }]
    );
    let now = f.clock.now_ms();
    assert_eq!(o.finished_per_minute, [(now / 60_000 * 60_000, 0, 1)]);
    let alice = f
        .store
        .overview(start, &Scope::Owner("alice".into()))
        .await
        .unwrap();
    assert_eq!(alice.queues[0].waiting, 1);
    assert!(alice.finished_per_minute.is_empty());
    let later = f.store.overview(now + 60_000, &Scope::All).await.unwrap();
    assert!(later.finished_per_minute.is_empty());
    // A task that ends by running to success counts as succeeded, in its own minute.
    f.clock.advance(60_000);
    let (t, _) = f
        .store
        .submit("alice", None, SubmitTask::new("gemini", "e"))
        .await
        .unwrap();
    let gemini = ClaimRequest {
        agents: vec!["gemini".into()],
        ..claim_req("r1")
    };
    let o = f.store.claim(&gemini).await.unwrap().unwrap();
    assert_eq!(o.task.id, t.id);
    run_to_end(&f.store, &o).await;
    let next = f.clock.now_ms() / 60_000 * 60_000;
    let o = f.store.overview(start, &Scope::All).await.unwrap();
    assert_eq!(
        o.finished_per_minute,
        [(now / 60_000 * 60_000, 0, 1), (next, 1, 0)]
    );
    // Pruning the tasks prunes what the chart counted of them.
    f.store.prune(next, 100).await.unwrap();
    let o = f.store.overview(start, &Scope::All).await.unwrap();
    assert_eq!(o.finished_per_minute, [(next, 1, 0)]);
}

async fn web_sessions_expire_and_codes_are_taken_once(f: Fixture) {
    let now = f.clock.now_ms();
    let session = |expires_at| WebSession {
        token_id: "tok1".into(),
        role: Role::Client,
        expires_at,
    };
    let (s, c) = ([1u8; 32], [2u8; 32]);
    f.store
        .put_web_session(s, WebSessionKind::Session, session(now + 1000))
        .await
        .unwrap();
    f.store
        .put_web_session(c, WebSessionKind::Code, session(now + 1000))
        .await
        .unwrap();
    let got = f.store.web_session(s, WebSessionKind::Session, false).await;
    assert_eq!(got.unwrap(), Some(session(now + 1000)));
    // A code is not a session, and a session hash is not a code.
    let wrong = f.store.web_session(c, WebSessionKind::Session, false).await;
    assert_eq!(wrong.unwrap(), None);
    let taken = f.store.web_session(c, WebSessionKind::Code, true).await;
    assert_eq!(taken.unwrap(), Some(session(now + 1000)));
    let again = f.store.web_session(c, WebSessionKind::Code, true).await;
    assert_eq!(again.unwrap(), None, "a code works once");
    f.clock.advance(1000);
    let expired = f.store.web_session(s, WebSessionKind::Session, false).await;
    assert_eq!(expired.unwrap(), None);
}
