//! Claims that ack their offer (`ClaimRequest::ack`, issue #19 §2): an attempt a claim
//! started is running before its runner has read the answer, so until the runner shows it has
//! it, the store offers it again to that runner's next claim with `ack`, also after the
//! server that sent the lost answer died (a store opened again on the same database), and
//! never to anyone else or twice to a runner that has it.

use super::*;

conformance!(
    an_attempt_started_by_a_claim_survives_a_restart_until_confirmed,
    any_call_about_the_attempt_confirms_it,
    an_offer_made_by_a_claim_is_offered_again_until_acked_or_expired,
    another_token_cannot_confirm_a_runners_attempt,
    a_claim_and_its_ack_in_one_write_leave_the_attempt_unconfirmed,
);

fn ack_claim(runner: &str, holding: &[&str]) -> ClaimRequest {
    ClaimRequest {
        ack: true,
        holding: holding.iter().map(|h| h.to_string()).collect(),
        ..claim_req(runner)
    }
}

/// The window of issue #19 §2: the server committed the claim's offer and its ack, then died
/// before its answer reached the runner.
async fn an_attempt_started_by_a_claim_survives_a_restart_until_confirmed(f: Fixture) {
    let mut req = SubmitTask::new("claude", "resume it");
    req.session = SessionMode::Resume("disk-1".into());
    let (task, _) = f.store.submit("o", None, req).await.unwrap();
    let offer = f.store.claim(&ack_claim("r1", &[])).await.unwrap().unwrap();
    assert_eq!(offer.task.id, task.id);
    assert_eq!(offer.resume_session_id.as_deref(), Some("disk-1"));
    let lease = f
        .store
        .ack_for_claim(&task.id, &attempt_of(&offer))
        .await
        .unwrap();
    f.store.close().await;

    // Another server process on the same database.
    let (store, _) = f.another(f.clock.clone()).await;
    f.clock.advance(1_000);
    // Not to another runner, nor to a claim that did not ask for acked offers.
    assert!(store.claim(&ack_claim("r2", &[])).await.unwrap().is_none());
    assert!(store.claim(&claim_req("r1")).await.unwrap().is_none());
    let again = store.claim(&ack_claim("r1", &[])).await.unwrap();
    let again = again.expect("the attempt started for r1 is offered to it again");
    assert_eq!(
        (&again.task.id, again.attempt, &again.lease_token),
        (&task.id, offer.attempt, &offer.lease_token),
        "the same attempt: fencing is unchanged"
    );
    assert_eq!(again.task.state, TaskState::Running);
    assert_eq!(again.resume_session_id.as_deref(), Some("disk-1"));
    let again_lease = again.lease.expect("started: it comes with its lease");
    assert_eq!(again_lease.lease_until, lease.lease_until);
    assert!(!again_lease.cancel);
    // That answer may be lost too: it stays until the runner shows it has it.
    let third = store.claim(&ack_claim("r1", &[])).await.unwrap().unwrap();
    assert_eq!(third.task.id, task.id);
    // The runner lists it as held: never again, also not to a claim that lists nothing.
    assert!(
        store
            .claim(&ack_claim("r1", &[&task.id]))
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.claim(&ack_claim("r1", &[])).await.unwrap().is_none());
    // It runs once, to the end, under that attempt.
    store
        .finish(&task.id, finish_req(&offer, Outcome::Succeeded, None))
        .await
        .unwrap();
    let done = store.task(&task.id, &Scope::All).await.unwrap();
    assert_eq!((done.state, done.attempt), (TaskState::Succeeded, 1));
}

async fn any_call_about_the_attempt_confirms_it(f: Fixture) {
    let s = &f.store;
    type Call = for<'a> fn(
        &'a Store,
        &'a Offer,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;
    let calls: [(&str, Call); 4] = [
        ("ack", |s, o| {
            Box::pin(async move {
                s.ack(&o.task.id, &attempt_of(o)).await.unwrap();
            })
        }),
        ("heartbeat", |s, o| {
            Box::pin(async move {
                s.heartbeat(&o.task.id, &attempt_of(o)).await.unwrap();
            })
        }),
        ("events", |s, o| {
            Box::pin(async move {
                let req = AppendEvents {
                    attempt: o.attempt,
                    lease_token: o.lease_token.clone(),
                    events: vec![NewEvent {
                        n: 1,
                        kind: "text".into(),
                        data: serde_json::json!({"text": "hi"}),
                    }],
                };
                s.append_events(&o.task.id, req).await.unwrap();
            })
        }),
        ("finish", |s, o| {
            Box::pin(async move {
                s.finish(&o.task.id, finish_req(o, Outcome::Succeeded, None))
                    .await
                    .unwrap();
            })
        }),
    ];
    for (what, call) in calls {
        let (task, _) = s
            .submit("o", None, SubmitTask::new("claude", what))
            .await
            .unwrap();
        let offer = s.claim(&ack_claim("r1", &[])).await.unwrap().unwrap();
        assert_eq!(offer.task.id, task.id, "{what}");
        s.ack_for_claim(&task.id, &attempt_of(&offer))
            .await
            .unwrap();
        call(s, &offer).await;
        assert!(
            s.claim(&ack_claim("r1", &[])).await.unwrap().is_none(),
            "{what} confirms the attempt"
        );
        if what != "finish" {
            s.finish(&task.id, finish_req(&offer, Outcome::Succeeded, None))
                .await
                .unwrap();
        }
    }
    // A claim without `ack` (an older runner) leaves nothing to offer again.
    let (task, _) = s
        .submit("o", None, SubmitTask::new("claude", "old runner"))
        .await
        .unwrap();
    let offer = s.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(offer.task.id, task.id);
    s.ack(&task.id, &attempt_of(&offer)).await.unwrap();
    assert!(s.claim(&ack_claim("r1", &[])).await.unwrap().is_none());
}

/// The server died between the claim's offer and its ack (or the ack failed): the offer is
/// given again, to be acked, until its ack deadline; then it goes back to the queue as any
/// offer not acked in time, and is never offered again under that attempt.
async fn an_offer_made_by_a_claim_is_offered_again_until_acked_or_expired(f: Fixture) {
    let s = &f.store;
    let (task, _) = s
        .submit("o", None, SubmitTask::new("claude", "a"))
        .await
        .unwrap();
    let offer = s.claim(&ack_claim("r1", &[])).await.unwrap().unwrap();
    let again = s.claim(&ack_claim("r1", &[])).await.unwrap().unwrap();
    assert_eq!(
        (&again.task.id, &again.lease_token, again.task.state),
        (&task.id, &offer.lease_token, TaskState::Offered)
    );
    assert!(again.lease.is_none(), "not started: to be acked");
    s.ack_for_claim(&task.id, &attempt_of(&again))
        .await
        .unwrap();
    // The runner acks it itself (its claim's ack failed): confirmed.
    s.ack(&task.id, &attempt_of(&again)).await.unwrap();
    assert!(s.claim(&ack_claim("r1", &[])).await.unwrap().is_none());
    s.finish(&task.id, finish_req(&offer, Outcome::Succeeded, None))
        .await
        .unwrap();

    let (task, _) = s
        .submit("o", None, SubmitTask::new("claude", "b"))
        .await
        .unwrap();
    let first = s.claim(&ack_claim("r1", &[])).await.unwrap().unwrap();
    f.clock.advance(QueueSettings::default().ack_timeout_ms + 1);
    // Past its ack deadline: not offered again as it was, but queued again and offered anew.
    s.expire_due().await.unwrap();
    let next = s.claim(&ack_claim("r1", &[])).await.unwrap().unwrap();
    assert_eq!(next.task.id, task.id);
    assert_eq!(next.attempt, first.attempt + 1);
    assert!(next.lease.is_none());
    // The old attempt stays fenced out.
    assert!(matches!(
        s.ack(&task.id, &attempt_of(&first)).await,
        Err(StoreError::Stale(_))
    ));
}

/// A claim under a runner name that belongs to another token is refused, and its `holding`
/// changes nothing: the attempt is still offered again to the name's own token.
async fn another_token_cannot_confirm_a_runners_attempt(f: Fixture) {
    let s = &f.store;
    let (task, _) = s
        .submit("o", None, SubmitTask::new("claude", "mine"))
        .await
        .unwrap();
    let offer = s
        .claim_as(&ack_claim("mac", &[]), "tok-a")
        .await
        .unwrap()
        .unwrap();
    s.ack_for_claim(&task.id, &attempt_of(&offer))
        .await
        .unwrap();
    assert!(matches!(
        s.claim_as(&ack_claim("mac", &[&task.id]), "tok-b").await,
        Err(StoreError::Conflict(_))
    ));
    let again = s.claim_as(&ack_claim("mac", &[]), "tok-a").await.unwrap();
    assert_eq!(again.map(|o| o.task.id), Some(task.id));
}

/// The server's `/v1/claim` with `ack` claims and acks in one write (`claim_and_start` with
/// `confirm: false`): the attempt is as unconfirmed as one acked apart, and an original
/// runner's (`confirm: true`) is not.
async fn a_claim_and_its_ack_in_one_write_leave_the_attempt_unconfirmed(f: Fixture) {
    const V1: StartAtClaim = StartAtClaim {
        refuse: |_| None,
        lease_ms: None,
        wanted_session: |_| None,
        confirm: false,
    };
    let s = &f.store;
    let (task, _) = s
        .submit("o", None, SubmitTask::new("claude", "x"))
        .await
        .unwrap();
    let started = s
        .claim_and_start(&ack_claim("r1", &[]), "tok", V1)
        .await
        .unwrap()
        .expect("the task is claimed");
    assert_eq!(started.offer.task.id, task.id);
    let lease = started
        .offer
        .lease
        .clone()
        .expect("acked in the same write");
    assert_eq!(
        lease.lease_ms,
        QueueSettings::default().lease_ms,
        "the configured lease"
    );
    let t = s.task(&task.id, &Scope::All).await.unwrap();
    assert_eq!((t.state, t.attempt), (TaskState::Running, 1));
    // Its answer lost: the runner's next claim gets the same attempt again, started.
    let again = s
        .claim_and_start(&ack_claim("r1", &[]), "tok", V1)
        .await
        .unwrap()
        .expect("offered again");
    assert_eq!(
        (
            &again.offer.task.id,
            again.offer.attempt,
            &again.offer.lease_token
        ),
        (&task.id, 1, &started.offer.lease_token)
    );
    assert_eq!(again.offer.task.state, TaskState::Running);
    // Held: never again.
    assert!(
        s.claim_and_start(&ack_claim("r1", &[&task.id]), "tok", V1)
            .await
            .unwrap()
            .is_none()
    );

    // Confirmed at once: an answer lost is not offered again.
    let (other, _) = s
        .submit("o", None, SubmitTask::new("claude", "y"))
        .await
        .unwrap();
    let confirmed = StartAtClaim {
        confirm: true,
        ..V1
    };
    let first = s
        .claim_and_start(&ack_claim("r2", &[]), "tok2", confirmed)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.offer.task.id, other.id);
    assert!(
        s.claim_and_start(&ack_claim("r2", &[]), "tok2", confirmed)
            .await
            .unwrap()
            .is_none()
    );
}
