//! Store behaviour through its public API on a temp-file SQLite database. These are the seed
//! of the conformance suite every backend must pass.

use std::sync::{Arc, Mutex};

use tunnel_protocol::{
    AttemptRef, ClaimRequest, FinishRequest, Outcome, SubmitTask, TaskResult, TaskState,
};

use super::*;

#[derive(Default)]
struct Recorder {
    ready: Mutex<Vec<String>>,
}

impl Signals for Recorder {
    fn task_ready(&self, hint: &ReadyHint) {
        self.ready.lock().unwrap().push(hint.task_id.clone());
    }
    fn task_changed(&self, _: &str) {}
    fn deadline(&self, _: i64) {}
}

struct Fixture {
    store: Store,
    clock: Arc<ManualClock>,
    signals: Arc<Recorder>,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let signals = Arc::new(Recorder::default());
    let db = Database::Sqlite {
        path: dir.path().join("t.db"),
        durability: Durability::Normal,
    };
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
        _dir: dir,
    }
}

fn claim_req(runner: &str) -> ClaimRequest {
    ClaimRequest {
        runner: runner.into(),
        agents: vec!["claude".into()],
        projects: vec![],
        capacity: 1,
        wait_ms: 0,
        version: None,
        agent_versions: Default::default(),
    }
}

fn in_conv(prompt: &str, conv: &str) -> SubmitTask {
    let mut t = SubmitTask::new("claude", prompt);
    t.conversation = Some(conv.into());
    t
}

#[tokio::test]
async fn session_tasks_are_ready_one_at_a_time_in_order() {
    let f = fixture().await;
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

    let at = AttemptRef {
        attempt: o1.attempt,
        lease_token: o1.lease_token.clone(),
    };
    f.store.ack(&a.id, &at).await.unwrap();
    let fin = FinishRequest {
        attempt: o1.attempt,
        lease_token: o1.lease_token,
        outcome: Outcome::Succeeded,
        result: TaskResult {
            session_id: Some("sess-1".into()),
            ..Default::default()
        },
        not_before: None,
    };
    f.store.finish(&a.id, fin).await.unwrap();
    assert_eq!(f.signals.ready.lock().unwrap().last(), Some(&b.id));
    // b continues a's session, and only on the runner that holds it.
    assert!(f.store.claim(&claim_req("r2")).await.unwrap().is_none());
    let ob = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(ob.task.id, b.id);
    assert_eq!(ob.resume_session_id.as_deref(), Some("sess-1"));
}

#[tokio::test]
async fn expired_offer_and_lease_are_handled_by_expire_due() {
    let f = fixture().await;
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
    let at = AttemptRef {
        attempt: o.attempt,
        lease_token: o.lease_token.clone(),
    };
    f.store.ack(&t.id, &at).await.unwrap();
    f.clock.advance(QueueSettings::default().lease_ms + 1);
    f.store.expire_due().await.unwrap();
    // One run used of two: it goes back to the queue.
    let again = f.store.task(&t.id, &Scope::All).await.unwrap();
    assert_eq!(again.state, TaskState::Queued, "{again:?}");
    let o = f.store.claim(&claim_req("r2")).await.unwrap().unwrap();
    let at = AttemptRef {
        attempt: o.attempt,
        lease_token: o.lease_token.clone(),
    };
    f.store.ack(&t.id, &at).await.unwrap();
    f.clock.advance(QueueSettings::default().lease_ms + 1);
    let err = f.store.heartbeat(&t.id, &at).await.unwrap_err();
    assert!(matches!(err, StoreError::Stale(_)), "{err:?}");
    let lost = f.store.task(&t.id, &Scope::All).await.unwrap();
    assert_eq!(lost.state, TaskState::Lost);
    assert!(lost.reason.unwrap().contains("r2"));
}

#[tokio::test]
async fn idempotency_key_is_per_owner() {
    let f = fixture().await;
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
