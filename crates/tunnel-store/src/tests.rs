//! The store conformance suite: store behaviour through its public API, run against every
//! backend. SQLite always (a temp file); PostgreSQL whenever one is reachable at
//! `TUNNEL_TEST_PG_URL` (else `postgres://postgres@127.0.0.1:5432/postgres`), each test in a
//! fresh database `tunnel_test_<uuid>` dropped at the end. Without PostgreSQL the PostgreSQL
//! tests say so and pass, unless `TUNNEL_REQUIRE_PG=1`, which makes them fail.
//!
//! `postgres_only` holds what only PostgreSQL has: several stores ("instances") on one
//! database.

use std::sync::{Arc, Mutex};

use tunnel_protocol::{
    AttemptRef, ClaimRequest, FinishRequest, NewEvent, Outcome, Platform, ReplyTo, Role,
    SessionCommand, SessionMode, SubmitTask, TaskResult, TaskState,
};

use super::*;

#[derive(Default)]
struct Recorder {
    ready: Mutex<Vec<String>>,
    changed: Mutex<Vec<String>>,
    deadlines: Mutex<Vec<i64>>,
    deliveries: std::sync::atomic::AtomicUsize,
    woken: tokio::sync::Notify,
}

impl Signals for Recorder {
    fn task_ready(&self, hint: &ReadyHint) {
        // Each task once, in the order first told: PostgreSQL's fallback poll repeats hints
        // for tasks still ready.
        let mut ready = self.ready.lock().unwrap();
        if !ready.contains(&hint.task_id) {
            ready.push(hint.task_id.clone());
        }
        drop(ready);
        self.woken.notify_waiters();
    }
    fn task_changed(&self, id: &str) {
        self.changed.lock().unwrap().push(id.to_owned());
        self.woken.notify_waiters();
    }
    fn deadline(&self, at: i64) {
        self.deadlines.lock().unwrap().push(at);
    }
    fn delivery_ready(&self) {
        self.deliveries
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.woken.notify_waiters();
    }
}

enum Guard {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Pg(#[allow(dead_code)] Arc<PgDb>),
}

struct Fixture {
    store: Store,
    clock: Arc<ManualClock>,
    signals: Arc<Recorder>,
    db: Database,
    _guard: Guard,
}

impl Fixture {
    /// Another store ("instance") on the same database, with its own signals.
    async fn another(&self, clock: Arc<dyn Clock>) -> (Store, Arc<Recorder>) {
        let signals = Arc::new(Recorder::default());
        let store = Store::open(&self.db, QueueSettings::default(), clock, signals.clone())
            .await
            .unwrap();
        (store, signals)
    }

    /// Another store on the same database with other settings.
    async fn with_settings(&self, settings: QueueSettings) -> Store {
        Store::open(&self.db, settings, self.clock.clone(), self.signals.clone())
            .await
            .unwrap()
    }
}

async fn sqlite_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::Sqlite {
        path: dir.path().join("t.db"),
        durability: Durability::Normal,
    };
    open_fixture(db, Guard::Dir(dir)).await
}

async fn open_fixture(db: Database, guard: Guard) -> Fixture {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let signals = Arc::new(Recorder::default());
    let store = Store::open(
        &db,
        QueueSettings::default(),
        clock.clone(),
        signals.clone(),
    )
    .await
    .unwrap();
    Fixture {
        store,
        clock,
        signals,
        db,
        _guard: guard,
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL test databases

fn pg_admin_url() -> String {
    std::env::var("TUNNEL_TEST_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The URL with its database name replaced.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (base, query) = match rest.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = base.split('/').next().unwrap_or(base);
    format!("{scheme}://{authority}/{name}{query}")
}

/// A fresh database, dropped (with its connections) when the last holder goes away.
struct PgDb {
    admin_url: String,
    name: String,
    url: String,
}

async fn admin_client(url: &str) -> Result<tokio_postgres::Client, String> {
    let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, conn) = tokio::time::timeout(std::time::Duration::from_secs(3), connect)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

impl PgDb {
    /// `None` (after saying so) when no PostgreSQL answers and it is not required.
    async fn create() -> Option<Arc<PgDb>> {
        let admin_url = pg_admin_url();
        let client = match admin_client(&admin_url).await {
            Ok(c) => c,
            Err(e) => {
                if std::env::var("TUNNEL_REQUIRE_PG").is_ok_and(|v| v == "1") {
                    panic!(
                        "TUNNEL_REQUIRE_PG=1 but PostgreSQL at {admin_url} is not reachable: {e}"
                    );
                }
                eprintln!(
                    "SKIPPED (PostgreSQL backend): no PostgreSQL at {admin_url} ({e}); set \
                     TUNNEL_TEST_PG_URL, or TUNNEL_REQUIRE_PG=1 to make this a failure"
                );
                return None;
            }
        };
        let name = format!("tunnel_test_{}", uuid::Uuid::now_v7().simple());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("cannot create the test database: {e}"));
        let url = with_database(&admin_url, &name);
        Some(Arc::new(PgDb {
            admin_url,
            name,
            url,
        }))
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(c) = admin_client(&admin).await {
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

async fn pg_fixture() -> Option<Fixture> {
    let db = PgDb::create().await?;
    let database = Database::Postgres {
        url: db.url.clone(),
    };
    Some(open_fixture(database, Guard::Pg(db)).await)
}

/// Each listed test runs once per backend: `sqlite::NAME` and `postgres::NAME`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::sqlite_fixture().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(f) = super::pg_fixture().await {
                        super::$name(f).await
                    }
                }
            )*
        }
    };
}

conformance!(
    session_tasks_are_ready_one_at_a_time_in_order,
    expired_offer_and_lease_are_handled_by_expire_due,
    idempotency_key_is_per_owner,
    cancel_before_and_while_running,
    events_are_deduplicated_per_attempt,
    finish_is_fenced_and_repeatable,
    parked_task_runs_again_after_not_before,
    sessions_bind_resume_and_report,
    runner_affinity_and_filters,
    tokens_create_list_revoke,
    outbox_keeps_destination_order_and_reports_status,
    listing_and_counts,
    scope_hides_other_owners,
    prune_removes_only_old_finished_and_delivered,
    long_lease_ack_and_current_attempt,
    meta_is_kept_as_submitted,
    sessions_belong_to_their_client,
    a_runner_that_left_is_offline_until_it_claims,
    event_log_is_capped_and_read_in_pages,
    runners_keep_their_acp_capabilities,
    claim_and_start_refuses_acks_and_says_whose,
    return_offer_requeues_only_that_offer,
    return_start_requeues_only_that_start,
);

use handoff::{
    claim_and_start_refuses_acks_and_says_whose, return_offer_requeues_only_that_offer,
    return_start_requeues_only_that_start,
};

// ---------------------------------------------------------------------------------------------
// Helpers

fn claim_req(runner: &str) -> ClaimRequest {
    ClaimRequest {
        runner: runner.into(),
        agents: vec!["claude".into()],
        projects: vec![],
        capacity: 1,
        wait_ms: 0,
        version: None,
        agent_versions: Default::default(),
        acp_agents: vec![],
        acp_capabilities: None,
        ack: false,
        holding: vec![],
    }
}

fn in_conv(prompt: &str, conv: &str) -> SubmitTask {
    let mut t = SubmitTask::new("claude", prompt);
    t.conversation = Some(conv.into());
    t
}

fn attempt_of(o: &Offer) -> AttemptRef {
    AttemptRef {
        attempt: o.attempt,
        lease_token: o.lease_token.clone(),
    }
}

fn finish_req(o: &Offer, outcome: Outcome, session: Option<&str>) -> FinishRequest {
    FinishRequest {
        attempt: o.attempt,
        lease_token: o.lease_token.clone(),
        outcome,
        result: TaskResult {
            session_id: session.map(str::to_owned),
            text: Some("done".into()),
            ..Default::default()
        },
        not_before: None,
        events: vec![],
    }
}

async fn run_to_end(store: &Store, o: &Offer) {
    store.ack(&o.task.id, &attempt_of(o)).await.unwrap();
    store
        .finish(&o.task.id, finish_req(o, Outcome::Succeeded, None))
        .await
        .unwrap();
}

fn discord(channel: &str) -> ReplyTo {
    serde_json::from_value(serde_json::json!({"platform": "discord", "channel": channel})).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The conformance tests

async fn session_tasks_are_ready_one_at_a_time_in_order(f: Fixture) {
    let (a, _) = f.store.submit("o", None, in_conv("a", "c1")).await.unwrap();
    let (b, _) = f.store.submit("o", None, in_conv("b", "c1")).await.unwrap();
    let (x, _) = f.store.submit("o", None, in_conv("x", "c2")).await.unwrap();
    assert_eq!(
        *f.signals.ready.lock().unwrap(),
        vec![a.id.clone(), x.id.clone()]
    );
    assert_eq!(b.queue_position, Some(1));

    let o1 = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    let o2 = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(
        (o1.task.id.as_str(), o2.task.id.as_str()),
        (a.id.as_str(), x.id.as_str())
    );
    assert!(
        f.store.claim(&claim_req("r1")).await.unwrap().is_none(),
        "b must wait for a"
    );

    f.store.ack(&a.id, &attempt_of(&o1)).await.unwrap();
    f.store
        .finish(&a.id, finish_req(&o1, Outcome::Succeeded, Some("sess-1")))
        .await
        .unwrap();
    assert_eq!(f.signals.ready.lock().unwrap().last(), Some(&b.id));
    // b continues a's session, and only on the runner that holds it.
    assert!(f.store.claim(&claim_req("r2")).await.unwrap().is_none());
    let ob = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(ob.task.id, b.id);
    assert_eq!(ob.resume_session_id.as_deref(), Some("sess-1"));
}

async fn expired_offer_and_lease_are_handled_by_expire_due(f: Fixture) {
    let mut req = SubmitTask::new("claude", "p");
    req.max_attempts = Some(2);
    let (t, _) = f.store.submit("o", None, req).await.unwrap();
    let o = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(f.store.expire_due().await.unwrap(), Some(o.ack_by));
    f.clock.advance(QueueSettings::default().ack_timeout_ms + 1);
    f.store.expire_due().await.unwrap();
    assert_eq!(
        f.store.task(&t.id, &Scope::All).await.unwrap().state,
        TaskState::Queued
    );

    let o = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(o.attempt, 2);
    let at = attempt_of(&o);
    f.store.ack(&t.id, &at).await.unwrap();
    f.clock.advance(QueueSettings::default().lease_ms + 1);
    f.store.expire_due().await.unwrap();
    // One run used of two: it goes back to the queue.
    let again = f.store.task(&t.id, &Scope::All).await.unwrap();
    assert_eq!(again.state, TaskState::Queued, "{again:?}");
    let o = f.store.claim(&claim_req("r2")).await.unwrap().unwrap();
    let at = attempt_of(&o);
    f.store.ack(&t.id, &at).await.unwrap();
    f.clock.advance(QueueSettings::default().lease_ms + 1);
    // A late heartbeat finds the lease expired: refused, and the expiry is kept.
    let err = f.store.heartbeat(&t.id, &at).await.unwrap_err();
    assert!(matches!(err, StoreError::Stale(_)), "{err:?}");
    let lost = f.store.task(&t.id, &Scope::All).await.unwrap();
    assert_eq!(lost.state, TaskState::Lost);
    assert!(lost.reason.unwrap().contains("r2"));
    assert_eq!(f.store.expire_due().await.unwrap(), None);
}

async fn idempotency_key_is_per_owner(f: Fixture) {
    let (a, created) = f
        .store
        .submit("o1", Some("k".into()), SubmitTask::new("claude", "p"))
        .await
        .unwrap();
    assert!(created);
    let (b, created) = f
        .store
        .submit("o1", Some("k".into()), SubmitTask::new("claude", "other"))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(a.id, b.id);
    let (c, created) = f
        .store
        .submit("o2", Some("k".into()), SubmitTask::new("claude", "p"))
        .await
        .unwrap();
    assert!(created);
    assert_ne!(a.id, c.id);
}

async fn cancel_before_and_while_running(f: Fixture) {
    let (a, _) = f.store.submit("o", None, in_conv("a", "c")).await.unwrap();
    let (b, _) = f.store.submit("o", None, in_conv("b", "c")).await.unwrap();
    // Cancelling the first queued task lets the next one go.
    let t = f.store.cancel(&a.id, &Scope::All).await.unwrap();
    assert_eq!(t.state, TaskState::Cancelled);
    assert!(t.finished_at.is_some());
    assert_eq!(f.signals.ready.lock().unwrap().last(), Some(&b.id));
    let err = f.store.cancel(&a.id, &Scope::All).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    let o = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
    assert_eq!(o.task.id, b.id);
    f.store.ack(&b.id, &attempt_of(&o)).await.unwrap();
    let t = f.store.cancel(&b.id, &Scope::All).await.unwrap();
    assert_eq!(t.state, TaskState::Cancelling);
    assert!(t.cancel_requested);
    let hb = f.store.heartbeat(&b.id, &attempt_of(&o)).await.unwrap();
    assert!(hb.cancel);
    let t = f
        .store
        .finish(&b.id, finish_req(&o, Outcome::Cancelled, None))
        .await
        .unwrap();
    assert_eq!(t.state, TaskState::Cancelled);
    let err = f.store.cancel("nope", &Scope::All).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

async fn events_are_deduplicated_per_attempt(f: Fixture) {
    let (t, _) = f
        .store
        .submit("o", None, SubmitTask::new("claude", "p"))
        .await
        .unwrap();
    let o = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
    f.store.ack(&t.id, &attempt_of(&o)).await.unwrap();
    let ev = |n: u64, text: &str| NewEvent {
        n,
        kind: "text".into(),
        data: serde_json::json!({"text": text}),
    };
    let append = |events: Vec<NewEvent>| AppendEvents {
        attempt: o.attempt,
        lease_token: o.lease_token.clone(),
        events,
    };
    let ack = f
        .store
        .append_events(&t.id, append(vec![ev(1, "a"), ev(2, "b")]))
        .await
        .unwrap();
    assert_eq!(ack.accepted, 2);
    let ack = f
        .store
        .append_events(&t.id, append(vec![ev(2, "b"), ev(3, "c")]))
        .await
        .unwrap();
    assert_eq!(ack.accepted, 1);
    let (events, state) = f.store.events(&t.id, &Scope::All, 0, 100).await.unwrap();
    assert_eq!(state, TaskState::Running);
    let texts: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "text")
        .map(|e| e.data["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, ["a", "b", "c"]);
    // Event seqs are 1, 2, 3, … per task.
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let last = f.store.last_events(&t.id, 2).await.unwrap();
    assert_eq!(last.len(), 2);
    assert_eq!(last[1].data["text"], "c");
    let (after, _) = f
        .store
        .events(&t.id, &Scope::All, seqs[seqs.len() - 2], 100)
        .await
        .unwrap();
    assert_eq!(after.len(), 1);
    // A stale attempt is refused.
    let mut stale = append(vec![ev(4, "d")]);
    stale.lease_token = "0".repeat(32);
    let err = f.store.append_events(&t.id, stale).await.unwrap_err();
    assert!(matches!(err, StoreError::Stale(_)), "{err:?}");
}

async fn finish_is_fenced_and_repeatable(f: Fixture) {
    let (t, _) = f
        .store
        .submit("o", None, SubmitTask::new("claude", "p"))
        .await
        .unwrap();
    let o = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
    let at = attempt_of(&o);
    f.store.ack(&t.id, &at).await.unwrap();
    // A retried ack answers as the first did.
    f.store.ack(&t.id, &at).await.unwrap();
    let done = f
        .store
        .finish(&t.id, finish_req(&o, Outcome::Succeeded, None))
        .await
        .unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.result.as_ref().unwrap().text.as_deref(), Some("done"));
    let again = f
        .store
        .finish(&t.id, finish_req(&o, Outcome::Failed, None))
        .await
        .unwrap();
    assert_eq!(again.state, TaskState::Succeeded, "the first finish stands");
    let mut wrong = finish_req(&o, Outcome::Succeeded, None);
    wrong.attempt += 1;
    let err = f.store.finish(&t.id, wrong).await.unwrap_err();
    assert!(matches!(err, StoreError::Stale(_)), "{err:?}");
    let err = f.store.heartbeat(&t.id, &at).await.unwrap_err();
    assert!(matches!(err, StoreError::Stale(_)), "{err:?}");
}

async fn parked_task_runs_again_after_not_before(f: Fixture) {
    let (t, _) = f.store.submit("o", None, in_conv("p", "c")).await.unwrap();
    let (next, _) = f.store.submit("o", None, in_conv("q", "c")).await.unwrap();
    let o = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
    f.store.ack(&t.id, &attempt_of(&o)).await.unwrap();
    let until = f.clock.now_ms() + 60_000;
    let mut park = finish_req(&o, Outcome::Parked, None);
    park.not_before = Some(until);
    let parked = f.store.finish(&t.id, park).await.unwrap();
    assert_eq!(parked.state, TaskState::Parked);
    assert_eq!(parked.not_before, Some(until));
    // Nothing to claim: it waits, and its conversation waits behind it.
    assert!(f.store.claim(&claim_req("r")).await.unwrap().is_none());
    assert_eq!(f.store.expire_due().await.unwrap(), Some(until));
    f.clock.advance(60_001);
    // What is left is the queued tasks' maximum time in queue.
    assert_eq!(
        f.store.expire_due().await.unwrap(),
        Some(t.created_at + DEFAULT_MAX_QUEUE_MS)
    );
    assert_eq!(
        f.store.task(&t.id, &Scope::All).await.unwrap().state,
        TaskState::Queued
    );
    let o2 = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
    assert_eq!(o2.task.id, t.id);
    assert_eq!(o2.attempt, 2);
    run_to_end(&f.store, &o2).await;
    let o3 = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
    assert_eq!(o3.task.id, next.id);
}

async fn sessions_bind_resume_and_report(f: Fixture) {
    let (a, _) = f.store.submit("o", None, in_conv("a", "c")).await.unwrap();
    let o = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    f.store.ack(&a.id, &attempt_of(&o)).await.unwrap();
    // A session event binds at once.
    f.store
        .append_events(
            &a.id,
            AppendEvents {
                attempt: o.attempt,
                lease_token: o.lease_token.clone(),
                events: vec![NewEvent {
                    n: 1,
                    kind: "session".into(),
                    data: serde_json::json!({"session_id": "s-1"}),
                }],
            },
        )
        .await
        .unwrap();
    let list = f
        .store
        .sessions(Some("c".into()), None, 10, &Scope::All)
        .await
        .unwrap();
    assert_eq!(list.sessions.len(), 1);
    assert_eq!(list.sessions[0].session_id.as_deref(), Some("s-1"));
    assert_eq!(list.sessions[0].runner.as_deref(), Some("r1"));
    f.store
        .finish(&a.id, finish_req(&o, Outcome::Succeeded, None))
        .await
        .unwrap();

    // A fresh session: the next task may run anywhere.
    let b = f
        .store
        .bind_session(
            SessionCommand {
                conversation: "c".into(),
                agent: "claude".into(),
                session_id: None,
                runner: None,
            },
            &Scope::All,
        )
        .await
        .unwrap();
    assert_eq!(b.session_id, None);
    let (t2, _) = f.store.submit("o", None, in_conv("b", "c")).await.unwrap();
    let o2 = f.store.claim(&claim_req("r2")).await.unwrap().unwrap();
    assert_eq!(o2.task.id, t2.id);
    assert_eq!(o2.resume_session_id, None);
    run_to_end(&f.store, &o2).await;

    // Resume s-1: back on r1, which reported it.
    let b = f
        .store
        .bind_session(
            SessionCommand {
                conversation: "c".into(),
                agent: "claude".into(),
                session_id: Some("s-1".into()),
                runner: None,
            },
            &Scope::All,
        )
        .await
        .unwrap();
    assert_eq!(b.runner.as_deref(), Some("r1"));
    let (t3, _) = f.store.submit("o", None, in_conv("c", "c")).await.unwrap();
    assert!(f.store.claim(&claim_req("r2")).await.unwrap().is_none());
    let o3 = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(o3.task.id, t3.id);
    assert_eq!(o3.resume_session_id.as_deref(), Some("s-1"));
    run_to_end(&f.store, &o3).await;

    // A submit that resumes a session found on a runner's disk.
    f.store
        .report_sessions(
            "r3",
            vec![tunnel_protocol::ReportedSession {
                agent: "claude".into(),
                session_id: "disk-1".into(),
                last_used: 5,
            }],
        )
        .await
        .unwrap();
    let mut req = SubmitTask::new("claude", "resume it");
    req.conversation = Some("d".into());
    req.session = tunnel_protocol::SessionMode::Resume("disk-1".into());
    let (t4, _) = f.store.submit("o", None, req).await.unwrap();
    assert!(f.store.claim(&claim_req("r1")).await.unwrap().is_none());
    let o4 = f.store.claim(&claim_req("r3")).await.unwrap().unwrap();
    assert_eq!(o4.task.id, t4.id);
    assert_eq!(o4.resume_session_id.as_deref(), Some("disk-1"));
    let list = f.store.sessions(None, None, 10, &Scope::All).await.unwrap();
    assert!(list.recent.iter().any(|r| r.session_id == "disk-1"));
    let d = list
        .sessions
        .iter()
        .find(|s| s.conversation == "d")
        .unwrap();
    assert_eq!(d.session_id.as_deref(), Some("disk-1"));
}

async fn runner_affinity_and_filters(f: Fixture) {
    let mut p = SubmitTask::new("claude", "in web");
    p.project = Some("web".into());
    let (tp, _) = f.store.submit("o", None, p).await.unwrap();
    let (tc, _) = f
        .store
        .submit("o", None, SubmitTask::new("codex", "codex"))
        .await
        .unwrap();
    // r has claude and no projects: neither task.
    assert!(f.store.claim(&claim_req("r")).await.unwrap().is_none());
    let mut with_web = claim_req("r");
    with_web.projects = vec!["web".into()];
    let o = f.store.claim(&with_web).await.unwrap().unwrap();
    assert_eq!(o.task.id, tp.id);
    let mut codex = claim_req("r");
    codex.agents = vec!["codex".into()];
    codex.acp_agents = vec!["codex".into()];
    codex.capacity = 3;
    let o2 = f.store.claim(&codex).await.unwrap().unwrap();
    assert_eq!(o2.task.id, tc.id);
    let runners = f.store.runners().await.unwrap();
    assert_eq!(runners.len(), 1);
    assert_eq!(runners[0].name, "r");
    assert_eq!(runners[0].agents, ["codex"]);
    assert_eq!(
        runners[0].acp_agents,
        ["codex"],
        "the agents it drives over ACP"
    );
    assert_eq!(runners[0].capacity, 3);
    assert_eq!(runners[0].active_tasks, 2);
    assert!(runners[0].online);
}

async fn runners_keep_their_acp_capabilities(f: Fixture) {
    let caps = |title: &str| {
        tunnel_protocol::AcpCapabilities::from_initialize(&serde_json::json!({
            "protocolVersion": 1,
            "agentCapabilities": {"loadSession": false, "promptCapabilities": {"image": true}},
            "agentInfo": {"name": "tiny-acp", "title": title, "version": "9.9"},
            "authMethods": [{"id": "login", "name": "Log in"}],
        }))
    };
    let shown = |store: &Store| {
        let store = store.clone();
        async move {
            let r = store.runners().await.unwrap();
            r[0].acp_capabilities
                .get("tiny")
                .and_then(|c| c.agent_info.clone())
                .and_then(|i| i.title)
        }
    };
    let mut req = claim_req("r");
    req.agents = vec!["tiny".into(), "claude".into()];
    req.acp_agents = vec!["tiny".into()];
    req.acp_capabilities = Some([("tiny".to_owned(), caps("first"))].into());
    f.store.claim_as(&req, "t1").await.unwrap();
    let r = f.store.runners().await.unwrap();
    assert_eq!(r[0].acp_capabilities["tiny"], caps("first"));

    // Claims that do not carry it keep it, within the second a claim leaves the row alone and
    // after it.
    req.acp_capabilities = None;
    f.store.claim_as(&req, "t1").await.unwrap();
    f.clock.advance(5_000);
    f.store.claim_as(&req, "t1").await.unwrap();
    assert_eq!(shown(&f.store).await.as_deref(), Some("first"));

    // Another runner token cannot set it under this name.
    req.acp_capabilities = Some([("tiny".to_owned(), caps("forged"))].into());
    assert!(f.store.claim_as(&req, "t2").await.is_err());
    assert_eq!(shown(&f.store).await.as_deref(), Some("first"));

    // A change is kept at once, even within the second; and by a restart.
    req.acp_capabilities = Some([("tiny".to_owned(), caps("second"))].into());
    f.store.claim_as(&req, "t1").await.unwrap();
    assert_eq!(shown(&f.store).await.as_deref(), Some("second"));
    let (again, _) = f.another(f.clock.clone()).await;
    assert_eq!(shown(&again).await.as_deref(), Some("second"));

    // An agent no longer driven over ACP is not shown; an empty report clears them.
    req.acp_capabilities = None;
    req.acp_agents = vec![];
    f.clock.advance(5_000);
    f.store.claim_as(&req, "t1").await.unwrap();
    assert!(
        f.store.runners().await.unwrap()[0]
            .acp_capabilities
            .is_empty()
    );
    req.acp_agents = vec!["tiny".into()];
    f.clock.advance(5_000);
    f.store.claim_as(&req, "t1").await.unwrap();
    assert_eq!(shown(&f.store).await.as_deref(), Some("second"));
    req.acp_capabilities = Some(Default::default());
    f.store.claim_as(&req, "t1").await.unwrap();
    assert!(
        f.store.runners().await.unwrap()[0]
            .acp_capabilities
            .is_empty()
    );
}

async fn a_runner_that_left_is_offline_until_it_claims(f: Fixture) {
    assert!(!f.store.runner_left("r", "t1").await.unwrap(), "never seen");
    assert!(
        f.store
            .claim_as(&claim_req("r"), "t1")
            .await
            .unwrap()
            .is_none()
    );
    assert!(f.store.runners().await.unwrap()[0].online);
    assert!(
        !f.store.runner_left("r", "t2").await.unwrap(),
        "not the token the name belongs to"
    );
    assert!(
        f.store.runners().await.unwrap()[0].online,
        "nothing changed"
    );
    assert!(f.store.runner_left("r", "t1").await.unwrap());
    let r = &f.store.runners().await.unwrap()[0];
    assert!(!r.online, "offline at once");
    f.clock.advance(1);
    assert!(f.store.claim(&claim_req("r")).await.unwrap().is_none());
    assert!(
        f.store.runners().await.unwrap()[0].online,
        "back with its claim"
    );
}

async fn tokens_create_list_revoke(f: Fixture) {
    let hash = [7u8; 32];
    let info = f
        .store
        .create_token("t1".into(), "bot".into(), Role::Client, hash)
        .await
        .unwrap();
    assert_eq!(info.revoked_at, None);
    let tokens = f.store.tokens().await.unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].secret_sha256, hash);
    assert_eq!(tokens[0].info.role, Role::Client);
    let revoked = f.store.revoke_token("t1").await.unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(revoked.name, "bot");
    let err = f.store.revoke_token("t2").await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

async fn outbox_keeps_destination_order_and_reports_status(f: Fixture) {
    let mut req = SubmitTask::new("claude", "p");
    req.reply_to = Some(discord("chan"));
    let (t, _) = f.store.submit("o", None, req).await.unwrap();
    let n1 = f.store.notify(discord("chan"), "one".into()).await.unwrap();
    let n2 = f
        .store
        .notify(discord("other"), "two".into())
        .await
        .unwrap();
    let o = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
    f.store.ack(&t.id, &attempt_of(&o)).await.unwrap();
    // The acknowledgement (the "working…" message to be) was queued at submit, before n1.
    let (due, _) = f.store.due_deliveries(10).await.unwrap();
    let ids: Vec<i64> = due.iter().map(|d| d.id).collect();
    // One per destination: the acknowledgement first on "chan", n2 on "other".
    assert_eq!(ids[1], n2);
    assert!(ids[0] < n1, "{ids:?}");
    assert_eq!(due[0].kind, DeliveryKind::Progress);
    assert_eq!(due[0].task.as_ref().unwrap().id, t.id);
    assert_eq!(due[0].target.platform, Platform::Discord);
    f.store
        .update_delivery(
            due[0].id,
            DeliveryUpdate::Sent {
                message_id: Some("m-1".into()),
            },
        )
        .await
        .unwrap();
    let task = f.store.task(&t.id, &Scope::All).await.unwrap();
    assert_eq!(task.delivery.unwrap().state, "working_message_sent");
    // A rate limit's wait is not a failed attempt; a 5xx's retry is.
    f.store
        .update_delivery(
            n2,
            DeliveryUpdate::Wait {
                at: f.clock.now_ms() + 1_000,
                error: "429".into(),
            },
        )
        .await
        .unwrap();
    f.store
        .update_delivery(
            n2,
            DeliveryUpdate::Retry {
                at: f.clock.now_ms() + 5_000,
                error: "500".into(),
            },
        )
        .await
        .unwrap();
    let (due, _) = f.store.due_deliveries(10).await.unwrap();
    assert_eq!(due.iter().map(|d| d.id).collect::<Vec<_>>(), [n1]);
    assert_eq!(due[0].body.as_ref().unwrap()["text"], "one");
    f.store
        .update_delivery(n1, DeliveryUpdate::Sent { message_id: None })
        .await
        .unwrap();
    // The edit to "working…" queued at the start.
    let (due, _) = f.store.due_deliveries(10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].kind, DeliveryKind::Edit);
    assert_eq!(due[0].progress_message.as_deref(), Some("m-1"));
    f.store
        .update_delivery(due[0].id, DeliveryUpdate::Sent { message_id: None })
        .await
        .unwrap();
    // Nothing due now; the next wake-up is n2's retry, not earlier.
    let (due, next) = f.store.due_deliveries(10).await.unwrap();
    assert!(due.is_empty());
    assert_eq!(next, Some(f.clock.now_ms() + 5_000));
    f.store
        .finish(&t.id, finish_req(&o, Outcome::Succeeded, None))
        .await
        .unwrap();
    // The end: the working message is edited to the outcome, then the answer.
    let (due, _) = f.store.due_deliveries(10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].kind, DeliveryKind::Edit);
    f.store
        .update_delivery(due[0].id, DeliveryUpdate::Sent { message_id: None })
        .await
        .unwrap();
    let (due, _) = f.store.due_deliveries(10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].kind, DeliveryKind::Final);
    assert_eq!(due[0].progress_message.as_deref(), Some("m-1"));
    let final_id = due[0].id;
    f.store
        .update_delivery(
            final_id,
            DeliveryUpdate::Parts {
                done_parts: 1,
                message_id: Some("m-2".into()),
            },
        )
        .await
        .unwrap();
    f.store
        .update_delivery(
            final_id,
            DeliveryUpdate::Failed {
                error: "403".into(),
            },
        )
        .await
        .unwrap();
    let task = f.store.task(&t.id, &Scope::All).await.unwrap();
    let status = task.delivery.unwrap();
    assert_eq!(status.state, "failed");
    assert_eq!(status.error.as_deref(), Some("403"));
    f.clock.advance(5_000);
    let (due, _) = f.store.due_deliveries(10).await.unwrap();
    assert_eq!(due.iter().map(|d| d.id).collect::<Vec<_>>(), [n2]);
    assert_eq!(due[0].attempts, 1);
    let err = f
        .store
        .update_delivery(999_999, DeliveryUpdate::Sent { message_id: None })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

async fn listing_and_counts(f: Fixture) {
    for i in 0..3 {
        f.store
            .submit("o", None, in_conv(&format!("p{i}"), "c"))
            .await
            .unwrap();
    }
    f.store
        .submit("o", None, SubmitTask::new("codex", "x"))
        .await
        .unwrap();
    let all = f
        .store
        .tasks(
            TaskFilter {
                limit: 10,
                ..Default::default()
            },
            &Scope::All,
        )
        .await
        .unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].agent, "codex", "newest first");
    let conv = f
        .store
        .tasks(
            TaskFilter {
                conversation: Some("c".into()),
                limit: 2,
                ..Default::default()
            },
            &Scope::All,
        )
        .await
        .unwrap();
    assert_eq!(conv.len(), 2);
    assert_eq!(conv[0].queue_position, Some(2));
    let queued = f
        .store
        .tasks(
            TaskFilter {
                state: Some(TaskState::Queued),
                agent: Some("codex".into()),
                limit: 10,
                ..Default::default()
            },
            &Scope::All,
        )
        .await
        .unwrap();
    assert_eq!(queued.len(), 1);
    let counts = f.store.counts().await.unwrap();
    assert_eq!(counts.by_state, vec![(TaskState::Queued, 4)]);
}

async fn scope_hides_other_owners(f: Fixture) {
    let (t, _) = f
        .store
        .submit("alice", None, SubmitTask::new("claude", "p"))
        .await
        .unwrap();
    let bob = Scope::Owner("bob".into());
    let err = f.store.task(&t.id, &bob).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = f.store.cancel(&t.id, &bob).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = f.store.events(&t.id, &bob, 0, 10).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let mine = f
        .store
        .tasks(
            TaskFilter {
                limit: 10,
                ..Default::default()
            },
            &Scope::Owner("alice".into()),
        )
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
}

mod approvals;
mod claim_ack;
mod dashboard;
mod handoff;
mod postgres_only;
mod queue;
mod sqlite_wal;
mod tenancy;

/// Marks every due delivery sent, until none is due.
async fn deliver_all(store: &Store) -> usize {
    let mut sent = 0;
    loop {
        let (due, _) = store.due_deliveries(10).await.unwrap();
        if due.is_empty() {
            return sent;
        }
        for d in due {
            store
                .update_delivery(d.id, DeliveryUpdate::Sent { message_id: None })
                .await
                .unwrap();
            sent += 1;
        }
    }
}

async fn prune_removes_only_old_finished_and_delivered(f: Fixture) {
    let with_reply = |channel: &str| {
        let mut req = SubmitTask::new("claude", "p");
        req.reply_to = Some(discord(channel));
        req
    };
    // Old, finished, everything delivered: the one to go.
    let (old, _) = f.store.submit("o", None, with_reply("a")).await.unwrap();
    let o = f.store.claim(&claim_req("gone")).await.unwrap().unwrap();
    run_to_end(&f.store, &o).await;
    f.store.notify(discord("n"), "note".into()).await.unwrap();
    assert!(
        deliver_all(&f.store).await >= 4,
        "ack, outcome, final, note"
    );
    // Old and finished, but its answer is not delivered yet: kept.
    let (undelivered, _) = f.store.submit("o", None, with_reply("b")).await.unwrap();
    let ou = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
    run_to_end(&f.store, &ou).await;
    // Old but running, and old but queued: kept.
    let (running, _) = f
        .store
        .submit("o", None, SubmitTask::new("claude", "p"))
        .await
        .unwrap();
    let or = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
    f.store.ack(&running.id, &attempt_of(&or)).await.unwrap();
    let mut other = SubmitTask::new("codex", "p");
    other.conversation = Some("c".into());
    let (queued, _) = f.store.submit("o", None, other).await.unwrap();

    f.clock.advance(10_000);
    let (recent, _) = f
        .store
        .submit("o", None, SubmitTask::new("claude", "p"))
        .await
        .unwrap();
    let orc = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
    run_to_end(&f.store, &orc).await;

    let cutoff = f.clock.now_ms() - 5_000;
    let pruned = f.store.prune(cutoff, 100).await.unwrap();
    assert_eq!(pruned.tasks, 1, "{pruned:?}");
    assert!(
        pruned.events >= 3,
        "queued, offered, running, succeeded: {pruned:?}"
    );
    // Of `old`: the acknowledgement, its edits to "working…" and to the outcome, the answer;
    // and the plain note.
    assert_eq!(pruned.deliveries, 5, "{pruned:?}");
    assert_eq!(
        pruned.runners, 1,
        "`gone` has not been seen since: {pruned:?}"
    );
    let gone = f.store.task(&old.id, &Scope::All).await.unwrap_err();
    assert!(matches!(gone, StoreError::NotFound(_)), "{gone:?}");
    assert!(
        f.store.events(&old.id, &Scope::All, 0, 10).await.is_err(),
        "events go with their task"
    );
    for id in [&undelivered.id, &running.id, &queued.id, &recent.id] {
        f.store.task(id, &Scope::All).await.unwrap();
    }
    let runners: Vec<String> = f
        .store
        .runners()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(runners, ["r"]);

    // Nothing more until the answer is delivered; then it goes too.
    assert_eq!(f.store.prune(cutoff, 100).await.unwrap(), Pruned::default());
    assert!(deliver_all(&f.store).await >= 1);
    let pruned = f.store.prune(cutoff, 100).await.unwrap();
    assert_eq!(pruned.tasks, 1, "{pruned:?}");
    f.store
        .task(&undelivered.id, &Scope::All)
        .await
        .unwrap_err();

    // The limit bounds one call.
    f.clock.advance(10_000);
    let pruned = f.store.prune(f.clock.now_ms(), 1).await.unwrap();
    assert_eq!(pruned.tasks, 1, "{pruned:?}");
    f.store.task(&running.id, &Scope::All).await.unwrap();
    f.store.task(&queued.id, &Scope::All).await.unwrap();
}

async fn long_lease_ack_and_current_attempt(f: Fixture) {
    let (t, _) = f
        .store
        .submit("o", None, SubmitTask::new("claude", "p"))
        .await
        .unwrap();
    assert_eq!(f.store.current_attempt(&t.id).await.unwrap(), None);
    assert!(matches!(
        f.store
            .current_attempt("01900000-0000-7000-8000-000000000000")
            .await,
        Err(StoreError::NotFound(_))
    ));
    let o = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    let current = f.store.current_attempt(&t.id).await.unwrap().unwrap();
    assert_eq!(current.attempt_ref(), attempt_of(&o));
    assert_eq!(current.runner.as_deref(), Some("r1"));
    assert_eq!(current.state, TaskState::Offered);

    let long = 10 * QueueSettings::default().lease_ms;
    let lease = f
        .store
        .ack_with_lease(&t.id, &attempt_of(&o), long)
        .await
        .unwrap();
    assert_eq!(lease.lease_ms, long);
    assert_eq!(lease.lease_until, f.clock.now_ms() + long);
    // A heartbeat or an event never shortens it.
    let hb = f.store.heartbeat(&t.id, &attempt_of(&o)).await.unwrap();
    assert_eq!(hb.lease_until, lease.lease_until);
    f.store
        .append_events(
            &t.id,
            tunnel_protocol::AppendEvents {
                attempt: o.attempt,
                lease_token: o.lease_token.clone(),
                events: vec![NewEvent {
                    n: 1,
                    kind: "text".into(),
                    data: serde_json::json!({"text": "hi"}),
                }],
            },
        )
        .await
        .unwrap();
    // Well past the configured lease, the task still runs.
    f.clock.advance(5 * QueueSettings::default().lease_ms);
    f.store.expire_due().await.unwrap();
    let running = f.store.task(&t.id, &Scope::All).await.unwrap();
    assert_eq!(running.state, TaskState::Running);
    assert_eq!(running.lease_until, Some(lease.lease_until));
    // Past the long lease, it is lost like any other.
    f.clock.advance(5 * QueueSettings::default().lease_ms + 1);
    f.store.expire_due().await.unwrap();
    assert_eq!(
        f.store.task(&t.id, &Scope::All).await.unwrap().state,
        TaskState::Lost
    );
    // The lease token stays with the last attempt, so a replayed finish is still fenced.
    assert_eq!(
        f.store
            .current_attempt(&t.id)
            .await
            .unwrap()
            .map(|c| c.state),
        Some(TaskState::Lost)
    );
}

async fn meta_is_kept_as_submitted(f: Fixture) {
    let mut req = SubmitTask::new("claude", "p");
    let meta = serde_json::json!({"origin": "x", "nested": {"n": 1}});
    req.meta = Some(meta.clone());
    let (t, _) = f.store.submit("o", None, req).await.unwrap();
    assert_eq!(t.meta.as_ref(), Some(&meta));
    let o = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(o.task.meta.as_ref(), Some(&meta));
    let listed = f
        .store
        .tasks(
            TaskFilter {
                limit: 10,
                ..Default::default()
            },
            &Scope::All,
        )
        .await
        .unwrap();
    assert_eq!(listed[0].meta.as_ref(), Some(&meta));
    let (plain, _) = f
        .store
        .submit("o", None, SubmitTask::new("claude", "q"))
        .await
        .unwrap();
    assert_eq!(plain.meta, None);
}

/// A client's bindings and the sessions its tasks made are its own: another client neither
/// lists, rebinds, submits into nor resumes them; an admin's bindings and sessions found on a
/// runner's disk are shared.
async fn sessions_belong_to_their_client(f: Fixture) {
    for (id, role) in [
        ("ca", Role::Client),
        ("cb", Role::Client),
        ("ad", Role::Admin),
    ] {
        f.store
            .create_token(id.into(), id.into(), role, [0; 32])
            .await
            .unwrap();
    }
    let (a, _) = f.store.submit("ca", None, in_conv("a", "c")).await.unwrap();
    let o = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    f.store.ack(&a.id, &attempt_of(&o)).await.unwrap();
    f.store
        .finish(
            &a.id,
            FinishRequest {
                attempt: o.attempt,
                lease_token: o.lease_token.clone(),
                outcome: Outcome::Succeeded,
                result: TaskResult {
                    session_id: Some("s-a".into()),
                    ..Default::default()
                },
                not_before: None,
                events: vec![],
            },
        )
        .await
        .unwrap();
    f.store
        .report_sessions(
            "r1",
            vec![tunnel_protocol::ReportedSession {
                agent: "claude".into(),
                session_id: "disk".into(),
                last_used: 1,
            }],
        )
        .await
        .unwrap();
    let a_scope = Scope::Owner("ca".into());
    let b_scope = Scope::Owner("cb".into());
    let mine = f.store.sessions(None, None, 10, &a_scope).await.unwrap();
    assert_eq!(mine.sessions.len(), 1);
    let theirs = f.store.sessions(None, None, 10, &b_scope).await.unwrap();
    assert!(theirs.sessions.is_empty(), "{theirs:?}");
    let recent: Vec<&str> = theirs
        .recent
        .iter()
        .map(|r| r.session_id.as_str())
        .collect();
    assert_eq!(recent, ["disk"]);

    let cmd = |conv: &str, sid: Option<&str>| SessionCommand {
        conversation: conv.into(),
        agent: "claude".into(),
        session_id: sid.map(Into::into),
        runner: None,
    };
    // Another client's names are its own namespace: binding or submitting under "c" makes
    // its own conversation and leaves the first client's alone.
    let theirs_c = f
        .store
        .bind_session(cmd("c", None), &b_scope)
        .await
        .unwrap();
    assert_eq!(theirs_c.owner, None);
    let refused = f.store.bind_session(cmd("x", Some("s-a")), &b_scope).await;
    assert!(
        matches!(refused, Err(StoreError::NotFound(_))),
        "{refused:?}"
    );
    let (b, _) = f.store.submit("cb", None, in_conv("b", "c")).await.unwrap();
    assert_eq!(b.queue_position, Some(0));
    let mut resume = in_conv("b", "y");
    resume.session = SessionMode::Resume("s-a".into());
    let refused = f.store.submit("cb", None, resume).await;
    assert!(
        matches!(refused, Err(StoreError::NotFound(_))),
        "{refused:?}"
    );
    // Its own conversations, and the disk's sessions, are fine; admin may do anything.
    f.store
        .bind_session(cmd("y", Some("disk")), &b_scope)
        .await
        .unwrap();
    f.store.submit("cb", None, in_conv("b", "y")).await.unwrap();
    f.store.submit("ad", None, in_conv("d", "c")).await.unwrap();
    f.store
        .bind_session(cmd("c", None), &Scope::All)
        .await
        .unwrap();
    // The admin sees every namespace's "c", other tokens' with their owner.
    let all = f.store.sessions(None, None, 10, &Scope::All).await.unwrap();
    let mut seen: Vec<(String, Option<String>, Option<String>)> = all
        .sessions
        .iter()
        .map(|b| {
            (
                b.conversation.clone(),
                b.owner.clone(),
                b.session_id.clone(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("c".into(), None, None),
            ("c".into(), Some("ca".into()), Some("s-a".into())),
            ("c".into(), Some("cb".into()), None),
            ("y".into(), Some("cb".into()), Some("disk".into())),
        ]
    );
    let mine = f.store.sessions(None, None, 10, &a_scope).await.unwrap();
    assert_eq!(mine.sessions.len(), 1, "{mine:?}");
    assert_eq!(mine.sessions[0].session_id.as_deref(), Some("s-a"));
    assert_eq!(mine.sessions[0].owner, None);
}

async fn event_log_is_capped_and_read_in_pages(f: Fixture) {
    let store = f
        .with_settings(QueueSettings {
            max_task_events: 10,
            max_task_event_bytes: 2_000,
            ..QueueSettings::default()
        })
        .await;
    let (t, _) = store
        .submit("o", None, SubmitTask::new("claude", "p"))
        .await
        .unwrap();
    let o = store.claim(&claim_req("r")).await.unwrap().unwrap();
    store.ack(&t.id, &attempt_of(&o)).await.unwrap();
    let append = |from: u64, to: u64, size: usize| AppendEvents {
        attempt: o.attempt,
        lease_token: o.lease_token.clone(),
        events: (from..=to)
            .map(|n| NewEvent {
                n,
                kind: "text".into(),
                data: serde_json::json!({ "text": "x".repeat(size) }),
            })
            .collect(),
    };
    // Within the cap, the answer says nothing is truncated.
    let ack = store.append_events(&t.id, append(1, 1, 10)).await.unwrap();
    assert!(!ack.truncated);
    // ~300 bytes each against 2,000: six fit (with the state events before them).
    let ack = store
        .append_events(&t.id, append(2, 20, 290))
        .await
        .unwrap();
    assert_eq!(ack.accepted, 19, "dropped events are acknowledged");
    assert!(ack.truncated, "the runner is told, so it stops sending");
    let ack = store
        .append_events(&t.id, append(21, 25, 10))
        .await
        .unwrap();
    assert_eq!(ack.accepted, 5);
    assert!(ack.truncated);
    // A resent event is still a duplicate, stored or not.
    let ack = store.append_events(&t.id, append(1, 1, 290)).await.unwrap();
    assert_eq!(ack.accepted, 0);
    let done = FinishRequest {
        attempt: o.attempt,
        lease_token: o.lease_token.clone(),
        outcome: Outcome::Succeeded,
        result: TaskResult {
            text: Some("the answer".into()),
            ..Default::default()
        },
        not_before: None,
        events: vec![],
    };
    let task = store.finish(&t.id, done).await.unwrap();
    assert_eq!(task.result.unwrap().text.as_deref(), Some("the answer"));
    let (events, _) = store.events(&t.id, &Scope::All, 0, 100).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let texts = kinds.iter().filter(|k| **k == "text").count();
    assert!((5..=7).contains(&texts), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "truncated").count(), 1);
    assert_eq!(*kinds.last().unwrap(), "state", "{kinds:?}");
    let bytes: usize = events
        .iter()
        .map(|e| e.kind.len() + e.data.to_string().len())
        .sum();
    assert!(bytes <= 2_000 + 300, "{bytes}");
    let (state, last) = store.event_log_end(&t.id, &Scope::All).await.unwrap();
    assert_eq!(state, TaskState::Succeeded);
    assert_eq!(last, events.last().unwrap().seq);

    // A page stops once it holds EVENT_PAGE_BYTES (the event that passes it included).
    let (t, _) = f
        .store
        .submit("o", None, SubmitTask::new("claude", "q"))
        .await
        .unwrap();
    let o = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
    f.store.ack(&t.id, &attempt_of(&o)).await.unwrap();
    let big = EVENT_PAGE_BYTES * 3 / 4;
    let events = (1..=3)
        .map(|n| NewEvent {
            n,
            kind: "text".into(),
            data: serde_json::json!({ "text": "y".repeat(big) }),
        })
        .collect();
    f.store
        .append_events(
            &t.id,
            AppendEvents {
                attempt: o.attempt,
                lease_token: o.lease_token.clone(),
                events,
            },
        )
        .await
        .unwrap();
    let (all, _) = f.store.events(&t.id, &Scope::All, 0, 100).await.unwrap();
    let first_text = all.iter().position(|e| e.kind == "text").unwrap();
    let after = all[first_text].seq - 1;
    let (page, _) = f
        .store
        .events(&t.id, &Scope::All, after, 100)
        .await
        .unwrap();
    assert_eq!(
        page.len(),
        2,
        "{:?}",
        page.iter().map(|e| e.seq).collect::<Vec<_>>()
    );
    let (rest, _) = f
        .store
        .events(&t.id, &Scope::All, page[1].seq, 100)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    // The newest events, bounded the same way.
    let last = f.store.last_events(&t.id, 100).await.unwrap();
    assert_eq!(last.len(), 2);
    assert_eq!(last[1].seq, rest[0].seq);
}
