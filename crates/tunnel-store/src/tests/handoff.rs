//! SQLite only: a write that makes a task ready claims it, in its own transaction, for the
//! parked long-poll the server would have woken ([`Signals::take_parked`]), with the poll's
//! own claim (filters, order, session affinity), and hands it the answer after the commit.
//! Plus [`Store::claim_and_start`] and [`Store::return_offer`] on both backends.

use tokio::sync::oneshot;

use super::*;

/// Signals with a line of parked polls, served first come first served to the first that
/// matches (as the server's hub does).
#[derive(Default)]
struct Parking {
    line: Mutex<Vec<ParkedClaim>>,
    woken: Mutex<Vec<ReadyHint>>,
    lost: Mutex<Vec<Handoff>>,
}

impl Parking {
    fn park(&self, req: ClaimRequest, start: Option<StartAtClaim>) -> oneshot::Receiver<Handoff> {
        let (answer, rx) = oneshot::channel();
        self.line.lock().unwrap().push(ParkedClaim {
            req: Arc::new(req),
            token: "t".into(),
            start,
            answer,
        });
        rx
    }

    fn woken(&self) -> Vec<String> {
        self.woken
            .lock()
            .unwrap()
            .iter()
            .map(|h| h.task_id.clone())
            .collect()
    }
}

impl Signals for Parking {
    fn task_ready(&self, hint: &ReadyHint) {
        self.woken.lock().unwrap().push(hint.clone());
    }
    fn take_parked(&self, hint: &ReadyHint) -> Option<ParkedClaim> {
        let mut line = self.line.lock().unwrap();
        let i = line.iter().position(|p| {
            p.req.agents.contains(&hint.agent)
                && hint
                    .project
                    .as_ref()
                    .is_none_or(|x| p.req.projects.contains(x))
                && hint.runner.as_ref().is_none_or(|r| r == &p.req.runner)
        })?;
        Some(line.remove(i))
    }
    fn handoff_lost(&self, lost: Handoff) {
        self.lost.lock().unwrap().push(lost);
    }
    fn task_changed(&self, _: &str) {}
    fn deadline(&self, _: i64) {}
}

async fn parking_store() -> (Store, Arc<Parking>, Arc<ManualClock>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::Sqlite {
        path: dir.path().join("t.db"),
        durability: Durability::Normal,
    };
    let clock = Arc::new(ManualClock::new(1_000_000));
    let parking = Arc::new(Parking::default());
    let store = Store::open(
        &db,
        QueueSettings::default(),
        clock.clone(),
        parking.clone(),
    )
    .await
    .unwrap();
    (store, parking, clock, dir)
}

/// What the parked poll got; it must have got it by the time the submit was answered.
fn answer(mut rx: oneshot::Receiver<Handoff>) -> Handoff {
    rx.try_recv()
        .expect("answered with the commit that made the task ready")
}

fn offered(h: Handoff) -> Offer {
    match h {
        Handoff::Offered(o) => *o,
        other => panic!("expected an offer, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_claims_for_the_parked_poll_in_its_own_commit() {
    let (store, parking, _clock, _dir) = parking_store().await;
    let rx = parking.park(claim_req("r1"), None);
    let (t, _) = store
        .submit("o", None, SubmitTask::new("claude", "x"))
        .await
        .unwrap();
    let o = offered(answer(rx));
    assert_eq!(o.task.id, t.id);
    assert_eq!(o.attempt, 1);
    assert!(parking.woken().is_empty(), "nobody needed waking");
    let now = store.task(&t.id, &Scope::All).await.unwrap();
    assert_eq!(now.state, TaskState::Offered);
    assert_eq!(now.runner.as_deref(), Some("r1"));
    // The runner goes on with it as with any offer.
    store.ack(&t.id, &attempt_of(&o)).await.unwrap();
    store
        .finish(&t.id, finish_req(&o, Outcome::Succeeded, None))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_parked_polls_for_different_agents_each_get_theirs() {
    let (store, parking, _clock, _dir) = parking_store().await;
    let rx_claude = parking.park(claim_req("r1"), None);
    let mut codex = claim_req("r2");
    codex.agents = vec!["codex".into()];
    let rx_codex = parking.park(codex, None);
    let (tc, _) = store
        .submit("o", None, SubmitTask::new("codex", "c"))
        .await
        .unwrap();
    let (tl, _) = store
        .submit("o", None, SubmitTask::new("claude", "l"))
        .await
        .unwrap();
    let (oc, ol) = (offered(answer(rx_codex)), offered(answer(rx_claude)));
    assert_eq!(oc.task.id, tc.id, "the codex poll, though second in line");
    assert_eq!(oc.task.runner.as_deref(), Some("r2"));
    assert_eq!(ol.task.id, tl.id);
    assert_eq!(ol.task.runner.as_deref(), Some("r1"));
    assert!(parking.woken().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_task_is_not_handed_to_another_runner() {
    let (store, parking, _clock, _dir) = parking_store().await;
    // Conversation c's session lives on r-home.
    let (a, _) = store.submit("o", None, in_conv("a", "c")).await.unwrap();
    let o = store.claim(&claim_req("r-home")).await.unwrap().unwrap();
    assert_eq!(o.task.id, a.id);
    store.ack(&a.id, &attempt_of(&o)).await.unwrap();
    store
        .finish(&a.id, finish_req(&o, Outcome::Succeeded, Some("s-1")))
        .await
        .unwrap();
    // Another runner parked first, then its home.
    let mut rx_other = parking.park(claim_req("r-other"), None);
    let rx_home = parking.park(claim_req("r-home"), None);
    let (b, _) = store.submit("o", None, in_conv("b", "c")).await.unwrap();
    let ob = offered(answer(rx_home));
    assert_eq!(ob.task.id, b.id);
    assert_eq!(ob.resume_session_id.as_deref(), Some("s-1"));
    assert!(
        matches!(
            rx_other.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ),
        "the other runner stays parked"
    );
    assert_eq!(parking.line.lock().unwrap().len(), 1);
    // With only another runner parked, the pinned task waits for its home.
    store.ack(&b.id, &attempt_of(&ob)).await.unwrap();
    store
        .finish(&b.id, finish_req(&ob, Outcome::Succeeded, Some("s-1")))
        .await
        .unwrap();
    parking.woken.lock().unwrap().clear();
    let (c, _) = store.submit("o", None, in_conv("c", "c")).await.unwrap();
    assert!(matches!(
        rx_other.try_recv(),
        Err(oneshot::error::TryRecvError::Empty)
    ));
    assert_eq!(
        parking.woken(),
        vec![c.id.clone()],
        "woken for its home only"
    );
    assert_eq!(
        store.task(&c.id, &Scope::All).await.unwrap().state,
        TaskState::Queued
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_ready_task_goes_first_and_the_hinted_one_to_the_next_poll() {
    let (store, parking, _clock, _dir) = parking_store().await;
    // Queued while nobody was parked.
    let (old, _) = store
        .submit("o", None, SubmitTask::new("claude", "old"))
        .await
        .unwrap();
    let rx1 = parking.park(claim_req("r1"), None);
    let rx2 = parking.park(claim_req("r2"), None);
    let (new, _) = store
        .submit("o", None, SubmitTask::new("claude", "new"))
        .await
        .unwrap();
    assert_eq!(
        offered(answer(rx1)).task.id,
        old.id,
        "oldest first, as its own claim would"
    );
    assert_eq!(offered(answer(rx2)).task.id, new.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_whose_poll_is_gone_is_given_back_and_offered_again() {
    let (store, parking, _clock, _dir) = parking_store().await;
    let rx = parking.park(claim_req("r1"), None);
    // The poll goes away after it was taken out of line (its client hung up).
    drop(rx);
    let (t, _) = store
        .submit("o", None, SubmitTask::new("claude", "x"))
        .await
        .unwrap();
    let lost = offered(parking.lost.lock().unwrap().pop().expect("an offer lost"));
    assert_eq!(lost.task.id, t.id);
    assert_eq!(
        store.task(&t.id, &Scope::All).await.unwrap().state,
        TaskState::Offered
    );
    // What the server does with it: given back at once, then claimed by the next poll.
    assert!(store.return_offer(&t.id, &attempt_of(&lost)).await.unwrap());
    assert_eq!(parking.woken(), vec![t.id.clone()]);
    let again = store.claim(&claim_req("r2")).await.unwrap().unwrap();
    assert_eq!(again.task.id, t.id);
    assert_eq!(again.attempt, 2, "the lost offer's attempt is fenced off");
    assert!(
        !store.return_offer(&t.id, &attempt_of(&lost)).await.unwrap(),
        "an old attempt changes nothing"
    );
    store.ack(&t.id, &attempt_of(&again)).await.unwrap();
    assert!(
        !store
            .return_offer(&t.id, &attempt_of(&again))
            .await
            .unwrap(),
        "an acked offer is not given back"
    );
    assert_eq!(
        store.task(&t.id, &Scope::All).await.unwrap().state,
        TaskState::Running
    );
}

/// The original runner's claim, as the compat poll makes it: files tasks need a path.
const START: StartAtClaim = StartAtClaim {
    refuse: |t| (t.prompt == "unrunnable").then(|| "cannot run it".to_owned()),
    lease_ms: Some(|t| t.timeout_ms.unwrap_or(1_000) as i64 + 5),
    wanted_session: |t| t.conversation.clone(),
    confirm: true,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_start_claim_is_claimed_and_acked_in_the_submits_commit() {
    let (store, parking, clock, _dir) = parking_store().await;
    let rx = parking.park(claim_req("r1"), Some(START));
    let mut s = in_conv("x", "conv-1");
    s.timeout_ms = Some(10_000);
    let (t, _) = store.submit("o", None, s).await.unwrap();
    let started = match answer(rx) {
        Handoff::Started(s) => *s,
        other => panic!("expected a start, got {other:?}"),
    };
    assert_eq!(started.offer.task.id, t.id);
    let lease = started.offer.lease.expect("acked");
    assert_eq!(lease.lease_ms, 10_005);
    assert_eq!(lease.lease_until, clock.now_ms() + 10_005);
    assert!(started.may_resume, "an admin's task may resume any session");
    assert_eq!(
        store.task(&t.id, &Scope::All).await.unwrap().state,
        TaskState::Running
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_poll_is_gone_is_handed_back_as_confirmed() {
    let (store, parking, _clock, _dir) = parking_store().await;
    let rx = parking.park(claim_req("r1"), Some(START));
    drop(rx);
    let (t, _) = store
        .submit("o", None, SubmitTask::new("claude", "x"))
        .await
        .unwrap();
    let lost = match parking.lost.lock().unwrap().pop() {
        Some(Handoff::Started(s)) => *s,
        other => panic!("expected a lost start, got {other:?}"),
    };
    assert!(
        lost.confirmed,
        "an original runner's start: nothing offers it again"
    );
    assert_eq!(lost.offer.task.id, t.id);
    // What the server does with it: queued again at once, not at the end of its lease.
    assert!(
        store
            .return_start(&t.id, &attempt_of(&lost.offer))
            .await
            .unwrap()
    );
    assert_eq!(
        store.task(&t.id, &Scope::All).await.unwrap().state,
        TaskState::Queued
    );
    assert_eq!(parking.woken(), vec![t.id.clone()]);
}

// Both backends.

pub(super) async fn claim_and_start_refuses_acks_and_says_whose(f: Fixture) {
    let client_id = "tkc".to_owned();
    f.store
        .create_token(client_id.clone(), "c".into(), Role::Client, [3; 32])
        .await
        .unwrap();
    let (bad, _) = f
        .store
        .submit("o", None, SubmitTask::new("claude", "unrunnable"))
        .await
        .unwrap();
    let (good, _) = f
        .store
        .submit(&client_id, None, in_conv("fine", "s-x"))
        .await
        .unwrap();
    let started = f
        .store
        .claim_and_start(&claim_req("r1"), "t1", START)
        .await
        .unwrap()
        .expect("the second task");
    assert_eq!(started.offer.task.id, good.id);
    assert_eq!(started.offer.lease.as_ref().unwrap().lease_ms, 1_005);
    assert!(
        !started.may_resume,
        "a client's task, a session it never made"
    );
    assert_eq!(started.conv_owner.as_deref(), Some(client_id.as_str()));
    let bad = f.store.task(&bad.id, &Scope::All).await.unwrap();
    assert_eq!(bad.state, TaskState::Failed);
    assert_eq!(
        bad.result.and_then(|r| r.error).as_deref(),
        Some("cannot run it")
    );
    let good = f.store.task(&good.id, &Scope::All).await.unwrap();
    assert_eq!(good.state, TaskState::Running);
    assert!(
        f.store
            .claim_and_start(&claim_req("r1"), "t1", START)
            .await
            .unwrap()
            .is_none()
    );
    // The runner name is the token's, as for any claim.
    assert!(matches!(
        f.store.claim_and_start(&claim_req("r1"), "t2", START).await,
        Err(StoreError::Conflict(_))
    ));
}

pub(super) async fn return_offer_requeues_only_that_offer(f: Fixture) {
    let (t, _) = f
        .store
        .submit("o", None, SubmitTask::new("claude", "x"))
        .await
        .unwrap();
    let o = f.store.claim(&claim_req("r1")).await.unwrap().unwrap();
    let wrong = AttemptRef {
        attempt: o.attempt,
        lease_token: "nope".into(),
    };
    assert!(!f.store.return_offer(&t.id, &wrong).await.unwrap());
    assert!(f.store.return_offer(&t.id, &attempt_of(&o)).await.unwrap());
    assert_eq!(
        f.store.task(&t.id, &Scope::All).await.unwrap().state,
        TaskState::Queued
    );
    assert!(!f.store.return_offer(&t.id, &attempt_of(&o)).await.unwrap());
    let o2 = f.store.claim(&claim_req("r2")).await.unwrap().unwrap();
    assert_eq!((o2.task.id.as_str(), o2.attempt), (t.id.as_str(), 2));
}

pub(super) async fn return_start_requeues_only_that_start(f: Fixture) {
    let mut req = SubmitTask::new("claude", "x");
    req.max_attempts = Some(2);
    let (t, _) = f.store.submit("o", None, req).await.unwrap();
    let started = f
        .store
        .claim_and_start(&claim_req("r1"), "t1", START)
        .await
        .unwrap()
        .expect("the task");
    assert!(started.confirmed);
    let at = attempt_of(&started.offer);
    let wrong = AttemptRef {
        attempt: at.attempt,
        lease_token: "nope".into(),
    };
    assert!(!f.store.return_start(&t.id, &wrong).await.unwrap());
    assert_eq!(
        f.store.task(&t.id, &Scope::All).await.unwrap().state,
        TaskState::Running,
        "a wrong lease token changes nothing"
    );
    assert!(f.store.return_start(&t.id, &at).await.unwrap());
    let back = f.store.task(&t.id, &Scope::All).await.unwrap();
    assert_eq!(back.state, TaskState::Queued);
    assert!(back.reason.unwrap().contains("had gone"));
    assert!(
        !f.store.return_start(&t.id, &at).await.unwrap(),
        "given back once"
    );
    // The start given back used no attempt: of two, the next run's lease running out still
    // leaves one (it would end the task lost if the start had counted).
    let o = f.store.claim(&claim_req("r2")).await.unwrap().unwrap();
    assert_eq!(o.attempt, 2, "the given-back attempt is fenced off");
    assert!(
        !f.store.return_start(&t.id, &at).await.unwrap(),
        "an old attempt changes nothing"
    );
    f.store.ack(&t.id, &attempt_of(&o)).await.unwrap();
    f.clock.advance(QueueSettings::default().lease_ms + 1);
    f.store.expire_due().await.unwrap();
    assert_eq!(
        f.store.task(&t.id, &Scope::All).await.unwrap().state,
        TaskState::Queued,
        "one run used of two"
    );
    // A start whose cancel was asked meanwhile ends cancelled.
    let started = f
        .store
        .claim_and_start(&claim_req("r1"), "t1", START)
        .await
        .unwrap()
        .expect("the task again");
    f.store.cancel(&t.id, &Scope::All).await.unwrap();
    assert!(
        f.store
            .return_start(&t.id, &attempt_of(&started.offer))
            .await
            .unwrap()
    );
    assert_eq!(
        f.store.task(&t.id, &Scope::All).await.unwrap().state,
        TaskState::Cancelled
    );
}
