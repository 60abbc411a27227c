//! What only PostgreSQL has: several stores ("instances", as several `tunnel serve`
//! processes would be) on one database.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::*;

async fn wait_for(what: &str, signals: &Recorder, check: impl Fn(&Recorder) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let woken = signals.woken.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if check(signals) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), woken).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_instance_signals_the_other() {
    let Some(f) = pg_fixture().await else { return };
    let (b, b_signals) = f.another(f.clock.clone()).await;
    // Submitted on A: B is told it is ready (it would wake its long-poll), and B can claim it.
    let (t, _) = f
        .store
        .submit("o", None, SubmitTask::new("claude", "p"))
        .await
        .unwrap();
    let took = wait_for("the ready hint on B", &b_signals, |s| {
        s.ready.lock().unwrap().contains(&t.id)
    })
    .await;
    eprintln!("cross-instance wake-up (submit on A -> task_ready on B): {took:?}");
    let o = b.claim(&claim_req("r")).await.unwrap().unwrap();
    assert_eq!(o.task.id, t.id);
    assert!(
        took < Duration::from_millis(500),
        "the wake-up came from the fallback poll, not NOTIFY: {took:?}"
    );
    // The offer's ack deadline reaches A's deadline timer.
    wait_for("the deadline on A", &f.signals, |s| {
        s.deadlines.lock().unwrap().contains(&o.ack_by)
    })
    .await;
    // A cancel on A reaches B's watchers.
    b_signals.changed.lock().unwrap().clear();
    f.store.cancel(&t.id, &Scope::All).await.unwrap();
    wait_for("task_changed on B", &b_signals, |s| {
        s.changed.lock().unwrap().contains(&t.id)
    })
    .await;
    // An outbox row written on B wakes A's delivery worker.
    let before = f.signals.deliveries.load(Ordering::SeqCst);
    b.notify(discord("c"), "hi".into()).await.unwrap();
    wait_for("delivery_ready on A", &f.signals, |s| {
        s.deliveries.load(Ordering::SeqCst) > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_on_two_instances_never_double_claim() {
    let Some(f) = pg_fixture().await else { return };
    let (b, _) = f.another(f.clock.clone()).await;
    const TASKS: usize = 600;
    const CONVERSATIONS: usize = 30;
    let mut order: HashMap<String, (Option<String>, usize)> = HashMap::new();
    for i in 0..TASKS {
        // Two thirds in 30 conversations, the rest alone.
        let req = if i % 3 == 0 {
            SubmitTask::new("claude", format!("{i}"))
        } else {
            in_conv(&format!("{i}"), &format!("c{}", i % CONVERSATIONS))
        };
        let store = if i % 2 == 0 { &f.store } else { &b };
        let (t, _) = store.submit("o", None, req).await.unwrap();
        order.insert(t.id, (t.conversation, i));
    }
    let clock = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let log = Arc::new(Mutex::new(Vec::<(String, u32, u64)>::new()));
    let mut claimers = tokio::task::JoinSet::new();
    for (n, store) in [f.store.clone(), b.clone()].into_iter().enumerate() {
        for k in 0..4 {
            let (store, clock, done, log) =
                (store.clone(), clock.clone(), done.clone(), log.clone());
            claimers.spawn(async move {
                let runner = format!("i{n}-r{k}");
                let mut idle = 0;
                while done.load(Ordering::SeqCst) < TASKS as u64 && idle < 500 {
                    let Some(o) = store.claim(&claim_req(&runner)).await.unwrap() else {
                        idle += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    idle = 0;
                    let at = clock.fetch_add(1, Ordering::SeqCst);
                    log.lock().unwrap().push((o.task.id.clone(), o.attempt, at));
                    store.ack(&o.task.id, &attempt_of(&o)).await.unwrap();
                    store
                        .finish(&o.task.id, finish_req(&o, Outcome::Succeeded, None))
                        .await
                        .unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    }
    let start = Instant::now();
    while let Some(r) = claimers.join_next().await {
        r.unwrap();
    }
    let log = log.lock().unwrap().clone();
    eprintln!(
        "{} tasks claimed by 8 claimers on 2 instances in {:?}",
        log.len(),
        start.elapsed()
    );
    let ids: HashSet<&String> = log.iter().map(|(id, _, _)| id).collect();
    assert_eq!(log.len(), TASKS, "every task offered exactly once");
    assert_eq!(ids.len(), TASKS, "no task offered twice");
    assert!(log.iter().all(|(_, attempt, _)| *attempt == 1));
    // Per conversation, tasks were offered in submission order.
    let mut by_conv: HashMap<String, Vec<(u64, usize)>> = HashMap::new();
    for (id, _, at) in &log {
        let (conv, i) = &order[id];
        if let Some(c) = conv {
            by_conv.entry(c.clone()).or_default().push((*at, *i));
        }
    }
    for (conv, mut v) in by_conv {
        v.sort();
        let submitted: Vec<usize> = v.iter().map(|(_, i)| *i).collect();
        let mut sorted = submitted.clone();
        sorted.sort();
        assert_eq!(submitted, sorted, "conversation {conv} ran out of order");
    }
    let counts = f.store.counts().await.unwrap();
    assert_eq!(counts.by_state, vec![(TaskState::Succeeded, TASKS as u64)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn due_deliveries_on_two_instances_hand_out_each_row_once() {
    let Some(f) = pg_fixture().await else { return };
    let (b, _) = f.another(f.clock.clone()).await;
    const ROWS: usize = 300;
    const DESTINATIONS: usize = 20;
    let mut dest_of = HashMap::new();
    for i in 0..ROWS {
        let dest = format!("d{}", i % DESTINATIONS);
        let id = f
            .store
            .notify(discord(&dest), format!("{i}"))
            .await
            .unwrap();
        dest_of.insert(id, dest);
    }
    let sent = Arc::new(Mutex::new(Vec::<i64>::new()));
    let mut senders = tokio::task::JoinSet::new();
    for store in [f.store.clone(), b.clone(), f.store.clone(), b.clone()] {
        let sent = sent.clone();
        senders.spawn(async move {
            let mut idle = 0;
            while idle < 50 {
                let (due, _) = store.due_deliveries(8).await.unwrap();
                if due.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                idle = 0;
                for d in due {
                    sent.lock().unwrap().push(d.id);
                    store
                        .update_delivery(d.id, DeliveryUpdate::Sent { message_id: None })
                        .await
                        .unwrap();
                }
            }
        });
    }
    while let Some(r) = senders.join_next().await {
        r.unwrap();
    }
    let sent = sent.lock().unwrap().clone();
    let unique: HashSet<i64> = sent.iter().copied().collect();
    assert_eq!(sent.len(), ROWS, "each row handed out exactly once");
    assert_eq!(unique.len(), ROWS);
    // Each destination's rows went out in id order.
    let mut last: HashMap<&String, i64> = HashMap::new();
    for id in &sent {
        let d = &dest_of[id];
        if let Some(prev) = last.insert(d, *id) {
            assert!(prev < *id, "destination {d}: {id} after {prev}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_its_connections_are_killed() {
    let Some(f) = pg_fixture().await else { return };
    let (b, b_signals) = f.another(f.clock.clone()).await;
    let (t, _) = f
        .store
        .submit("o", None, SubmitTask::new("claude", "before"))
        .await
        .unwrap();
    let Database::Postgres { url } = &f.db else {
        unreachable!()
    };
    let name = url.rsplit('/').next().unwrap().to_owned();
    let admin = admin_client(&pg_admin_url()).await.unwrap();
    let killed = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .await
        .unwrap()
        .len();
    assert!(killed >= 2, "killed {killed} connections");
    // The pool replaces dead connections: within a few tries every call works again.
    let start = Instant::now();
    let mut failures = 0;
    loop {
        match b.counts().await {
            Ok(_) => break,
            Err(e) => {
                assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
                failures += 1;
                assert!(start.elapsed() < Duration::from_secs(10), "never recovered");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    eprintln!(
        "recovered after {failures} failed calls in {:?}",
        start.elapsed()
    );
    // Nothing was lost, and B's listener is back: a submit on A wakes B again.
    assert_eq!(
        b.task(&t.id, &Scope::All).await.unwrap().state,
        TaskState::Queued
    );
    let (t2, _) = loop {
        match f
            .store
            .submit("o", None, SubmitTask::new("claude", "after"))
            .await
        {
            Ok(r) => break r,
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("{e:?}"),
        }
    };
    let took = wait_for("the ready hint on B after reconnecting", &b_signals, |s| {
        s.ready.lock().unwrap().contains(&t2.id)
    })
    .await;
    eprintln!("wake-up across instances after the kill: {took:?}");
    let o = b.claim(&claim_req("r")).await.unwrap().unwrap();
    assert_eq!(o.task.id, t.id);
}

#[test]
fn database_urls_parse() {
    assert!(matches!(
        Database::parse("postgres://u@h:5432/db"),
        Ok(Database::Postgres { .. })
    ));
    assert!(matches!(
        Database::parse("postgresql://u:p@h/db?application_name=x"),
        Ok(Database::Postgres { .. })
    ));
    assert!(matches!(
        Database::parse("/tmp/x.db"),
        Ok(Database::Sqlite { .. })
    ));
    assert_eq!(
        with_database("postgres://u@h:1/postgres?sslmode=disable", "x"),
        "postgres://u@h:1/x?sslmode=disable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn sequential_cycle_timing() {
    let Some(f) = pg_fixture().await else { return };
    let start = Instant::now();
    let n = 200;
    for i in 0..n {
        f.store
            .submit("o", None, SubmitTask::new("claude", format!("{i}")))
            .await
            .unwrap();
    }
    let submitted = start.elapsed();
    for _ in 0..n {
        let o = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
        run_to_end(&f.store, &o).await;
    }
    eprintln!(
        "{n} submits in {submitted:?}; {n} claim+ack+finish in {:?}",
        start.elapsed() - submitted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_changes_reach_the_other_instance() {
    #[derive(Default)]
    struct Tokens(std::sync::atomic::AtomicUsize, tokio::sync::Notify);
    impl Signals for Tokens {
        fn task_ready(&self, _: &ReadyHint) {}
        fn task_changed(&self, _: &str) {}
        fn deadline(&self, _: i64) {}
        fn tokens_changed(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.notify_waiters();
        }
    }
    let Some(f) = pg_fixture().await else { return };
    let seen = Arc::new(Tokens::default());
    let _b = Store::open(
        &f.db,
        QueueSettings::default(),
        f.clock.clone(),
        seen.clone(),
    )
    .await
    .unwrap();
    f.store
        .create_token("t1".into(), "x".into(), Role::Runner, [1; 32])
        .await
        .unwrap();
    f.store.revoke_token("t1").await.unwrap();
    let start = Instant::now();
    while seen.0.load(Ordering::SeqCst) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "tokens_changed not seen"
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), seen.1.notified()).await;
    }
}

/// The transaction id that last wrote the runner's row (`xmin`): it changes with every write.
async fn runner_row_version(db: &Database, runner: &str) -> String {
    let Database::Postgres { url } = db else {
        unreachable!()
    };
    let c = admin_client(url).await.unwrap();
    c.query_one("SELECT xmin::text FROM runners WHERE name = $1", &[&runner])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_claim_by_a_runner_just_seen_writes_nothing() {
    let Some(f) = pg_fixture().await else { return };
    // With several servers every ready task wakes a poll on each of them and all but one
    // claim nothing: such a claim must write nothing, so its commit waits for no WAL flush.
    assert!(f.store.claim(&claim_req("r")).await.unwrap().is_none());
    let first = runner_row_version(&f.db, "r").await;
    f.clock.advance(500);
    assert!(f.store.claim(&claim_req("r")).await.unwrap().is_none());
    assert_eq!(
        runner_row_version(&f.db, "r").await,
        first,
        "a claim that changed nothing rewrote the runner row"
    );
    // Still written when something changed, or when it was seen over a second ago.
    let mut other = claim_req("r");
    other.version = Some("2".into());
    assert!(f.store.claim(&other).await.unwrap().is_none());
    let second = runner_row_version(&f.db, "r").await;
    assert_ne!(second, first, "a new version was not recorded");
    f.clock.advance(1_500);
    assert!(f.store.claim(&other).await.unwrap().is_none());
    let third = runner_row_version(&f.db, "r").await;
    assert_ne!(third, second, "last_seen was not refreshed after a second");
    let seen = f.store.runners().await.unwrap();
    assert_eq!(seen[0].version.as_deref(), Some("2"));
    // A claim that finds a task still gets it.
    let (t, _) = f
        .store
        .submit("o", None, SubmitTask::new("claude", "p"))
        .await
        .unwrap();
    let o = f.store.claim(&other).await.unwrap().unwrap();
    assert_eq!(o.task.id, t.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_commits_at_once_all_reach_the_other_instance() {
    let Some(f) = pg_fixture().await else { return };
    let (_b, b_signals) = f.another(f.clock.clone()).await;
    // Notes of commits that come together go out merged: every task still reaches B, by
    // NOTIFY (the fallback poll re-wakes at most 32 ready tasks a second).
    let mut submits = tokio::task::JoinSet::new();
    for i in 0..200 {
        let store = f.store.clone();
        submits.spawn(async move {
            store
                .submit("o", None, SubmitTask::new("claude", format!("{i}")))
                .await
                .unwrap()
                .0
                .id
        });
    }
    let mut ids = Vec::new();
    while let Some(id) = submits.join_next().await {
        ids.push(id.unwrap());
    }
    let took = wait_for("every ready hint on B", &b_signals, |s| {
        let ready = s.ready.lock().unwrap();
        ids.iter().all(|id| ready.contains(id))
    })
    .await;
    eprintln!("200 concurrent submits on A, all ready on B after {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "the hints came from the fallback poll: {took:?}"
    );
}

/// Holds tasks' row locks from another connection (as another server's write would) until
/// `release` is sent: writes of those tasks wait on it, and their lanes with them.
async fn hold_rows(db: &Database, ids: &[&str]) -> tokio::sync::oneshot::Sender<()> {
    let Database::Postgres { url } = db else {
        unreachable!()
    };
    let mut c = admin_client(url).await.unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (locked_tx, locked) = tokio::sync::oneshot::channel();
    let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    tokio::spawn(async move {
        let tx = c.transaction().await.unwrap();
        let n = tx
            .query("SELECT 1 FROM tasks WHERE id = ANY($1) FOR UPDATE", &[&ids])
            .await
            .unwrap()
            .len();
        assert_eq!(n, ids.len());
        let _ = locked_tx.send(());
        let _ = released.await;
        tx.commit().await.unwrap();
    });
    locked.await.unwrap();
    release
}

/// Waits until the store has `n` writes queued on its lanes or running in them.
async fn wait_queued(store: &Store, n: u64) {
    let start = Instant::now();
    while store.pg_group_counters().unwrap()[3] < n {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never {n} queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Two tasks with these prompts, their rows locked by another connection until `release`
/// is sent (or dropped): a write on either waits for the lock.
async fn held_tasks(
    f: &Fixture,
    prompts: [&str; 2],
) -> (Vec<String>, tokio::sync::oneshot::Sender<()>) {
    let mut held = Vec::new();
    for p in prompts {
        let (task, _) = f
            .store
            .submit("o", None, SubmitTask::new("claude", p))
            .await
            .unwrap();
        held.push(task.id);
    }
    let release = hold_rows(&f.db, &[&held[0], &held[1]]).await;
    (held, release)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writes_share_a_commit_and_a_failing_one_fails_alone() {
    let Some(f) = pg_fixture().await else { return };
    // Both lanes held up by a write waiting for a row lock; everything submitted meanwhile
    // queues behind them and then runs in their groups.
    let (held, release) = held_tasks(&f, ["held", "held too"]).await;
    let before = f.store.pg_group_counters().unwrap();
    let mut cancels = tokio::task::JoinSet::new();
    for id in held.clone() {
        let store = f.store.clone();
        cancels.spawn(async move { store.cancel(&id, &Scope::All).await });
    }
    wait_queued(&f.store, 2).await;
    // Every other submit fails in PostgreSQL (a NUL byte in text): each must fail alone.
    let mut submits = tokio::task::JoinSet::new();
    for i in 0..40 {
        let store = f.store.clone();
        let prompt = if i % 2 == 0 {
            format!("bad\0{i}")
        } else {
            format!("good {i}")
        };
        submits.spawn(async move {
            (
                i,
                store
                    .submit("o", None, SubmitTask::new("claude", prompt))
                    .await,
            )
        });
    }
    wait_queued(&f.store, 42).await;
    release.send(()).unwrap();
    while let Some(r) = cancels.join_next().await {
        r.unwrap().unwrap();
    }
    let mut good = HashSet::new();
    while let Some(r) = submits.join_next().await {
        let (i, r) = r.unwrap();
        if i % 2 == 0 {
            let e = r.expect_err("a prompt with a NUL byte was stored");
            assert!(matches!(e, StoreError::Postgres { .. }), "{e:?}");
        } else {
            let (task, created) = r.unwrap();
            assert!(created);
            assert_eq!(task.prompt, format!("good {i}"));
            good.insert(task.id);
        }
    }
    // Every good submit is there once, and so is the cancel; no failed one is.
    let all = f
        .store
        .tasks(
            TaskFilter {
                limit: 100,
                ..Default::default()
            },
            &Scope::All,
        )
        .await
        .unwrap();
    assert_eq!(
        all.len(),
        22,
        "{:?}",
        all.iter().map(|t| &t.prompt).collect::<Vec<_>>()
    );
    for id in &good {
        assert!(all.iter().any(|t| &t.id == id), "{id} is missing");
    }
    for id in &held {
        let t = f.store.task(id, &Scope::All).await.unwrap();
        assert_eq!(t.state, TaskState::Cancelled);
    }
    let after = f.store.pg_group_counters().unwrap();
    let (commits, kept, undone) = (
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2],
    );
    eprintln!("{kept} writes kept in {commits} commits; {undone} rolled back inside a group");
    assert!(kept >= 22, "{kept} writes kept");
    assert!(
        commits * 3 <= kept,
        "{kept} writes took {commits} commits: they were not grouped"
    );
    // At most a lane's first write of a group rolls back the whole (empty) group.
    assert!(
        undone >= 10,
        "only {undone} failures were undone inside a group"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_abandoned_half_way_commits_nothing_and_its_lane_goes_on() {
    let Some(f) = pg_fixture().await else { return };
    let (held, release) = held_tasks(&f, ["held", "held on the other lane"]).await;
    let spawn_cancel = |id: String| {
        let store = f.store.clone();
        tokio::spawn(async move { store.cancel(&id, &Scope::All).await })
    };
    // Lane 0: a cancel waiting for its lock, then a submit queued behind it; lane 1: another
    // cancel waiting.
    let abandoned = spawn_cancel(held[0].clone());
    wait_queued(&f.store, 1).await;
    let other = spawn_cancel(held[1].clone());
    wait_queued(&f.store, 2).await;
    let store = f.store.clone();
    let behind = tokio::spawn(async move {
        store
            .submit("o", None, SubmitTask::new("claude", "behind"))
            .await
    });
    wait_queued(&f.store, 3).await;
    // The caller goes away: its group is dropped (its waiting statement cancelled, so its
    // transaction ends now) and the write queued behind it runs.
    abandoned.abort();
    let (task, created) = tokio::time::timeout(Duration::from_secs(10), behind)
        .await
        .expect("the lane did not go on")
        .unwrap()
        .unwrap();
    assert!(created);
    assert_eq!(
        f.store.task(&task.id, &Scope::All).await.unwrap().prompt,
        "behind"
    );
    release.send(()).unwrap();
    other.await.unwrap().unwrap();
    assert_eq!(
        f.store.task(&held[0], &Scope::All).await.unwrap().state,
        TaskState::Queued,
        "the abandoned cancel was committed"
    );
    assert_eq!(
        f.store.task(&held[1], &Scope::All).await.unwrap().state,
        TaskState::Cancelled
    );
}
