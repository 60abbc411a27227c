//! Approval requests, on every backend: ask (idempotent by key), scope, answer, expiry, the
//! end of the attempt, and the chat deliveries they cause.

use tunnel_protocol::{
    ApprovalAnswer, ApprovalOption, ApprovalOptionKind, ApprovalPolicy, ApprovalRequest,
    ApprovalState, ApprovalTool, Decision,
};

use super::*;

conformance!(
    ask_answer_and_scope,
    requests_expire_and_end_with_their_attempt,
    approvals_are_delivered_to_chat,
);

fn request(o: &Offer, key: &str, timeout_ms: Option<u64>) -> ApprovalRequest {
    ApprovalRequest {
        attempt: o.attempt,
        lease_token: o.lease_token.clone(),
        key: key.into(),
        tool: ApprovalTool {
            kind: "execute".into(),
            title: "Run rm -rf build".into(),
            command: Some("rm -rf build".into()),
            ..Default::default()
        },
        options: vec![
            ApprovalOption {
                id: "yes".into(),
                name: "Allow".into(),
                kind: ApprovalOptionKind::AllowOnce,
            },
            ApprovalOption {
                id: "no".into(),
                name: "Reject".into(),
                kind: ApprovalOptionKind::RejectOnce,
            },
        ],
        timeout_ms,
    }
}

fn answer(decision: Decision, by: Option<&str>) -> ApprovalAnswer {
    ApprovalAnswer {
        decision,
        message: None,
        by: by.map(Into::into),
    }
}

/// A running task of `owner`.
async fn running(f: &Fixture, owner: &str, req: SubmitTask) -> (Task, Offer) {
    let (t, _) = f.store.submit(owner, None, req).await.unwrap();
    let o = f.store.claim(&claim_req("r")).await.unwrap().unwrap();
    f.store.ack(&t.id, &attempt_of(&o)).await.unwrap();
    (t, o)
}

async fn ask_answer_and_scope(f: Fixture) {
    f.store
        .create_token("tka".into(), "plugin".into(), Role::Client, [1; 32])
        .await
        .unwrap();
    let mut req = SubmitTask::new("claude", "p");
    req.approvals = Some(ApprovalPolicy::Ask);
    let (t, o) = running(&f, "tka", req).await;
    assert_eq!(t.approvals, Some(ApprovalPolicy::Ask));
    assert_eq!(
        o.task.approvals,
        Some(ApprovalPolicy::Ask),
        "the offer carries the policy"
    );

    let (a, created) = f
        .store
        .create_approval(&t.id, request(&o, "k", None))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(a.state, ApprovalState::Pending);
    assert_eq!(
        (a.agent.as_str(), a.runner.as_deref()),
        ("claude", Some("r"))
    );
    assert_eq!(a.expires_at - a.asked_at, 600_000);
    assert!(f.signals.deadlines.lock().unwrap().contains(&a.expires_at));
    let (again, created) = f
        .store
        .create_approval(&t.id, request(&o, "k", None))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again.id, a.id);
    let task = f.store.task(&t.id, &Scope::All).await.unwrap();
    assert_eq!(task.waiting_for_approval.as_deref(), Some(a.id.as_str()));

    // Scope: the owner and admin see it; another client does not, and cannot answer.
    let mine = Scope::Owner("tka".into());
    let theirs = Scope::Owner("tkb".into());
    let pending = ApprovalFilter {
        state: Some(ApprovalState::Pending),
        task: Some(t.id.clone()),
        limit: 10,
    };
    assert_eq!(
        f.store
            .approvals(pending.clone(), &mine)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        f.store
            .approvals(pending.clone(), &Scope::All)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        f.store
            .approvals(pending, &theirs)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        f.store.approval(&a.id, &theirs).await,
        Err(StoreError::NotFound(_))
    ));
    let refused = f
        .store
        .answer_approval(&a.id, &theirs, "tkb", answer(Decision::AllowOnce, None))
        .await;
    assert!(
        matches!(refused, Err(StoreError::NotFound(_))),
        "{refused:?}"
    );

    // The runner's read is fenced to its attempt.
    let mut stale = attempt_of(&o);
    stale.lease_token = "wrong".into();
    assert!(matches!(
        f.store.runner_approval(&t.id, &a.id, &stale).await,
        Err(StoreError::Stale(_))
    ));

    // The owner answers; the token's name is recorded beside the person.
    let settled = f
        .store
        .answer_approval(
            &a.id,
            &mine,
            "tka",
            answer(Decision::AllowOnce, Some("alice")),
        )
        .await
        .unwrap();
    assert_eq!(settled.state, ApprovalState::Allowed);
    let outcome = settled.outcome.clone().unwrap();
    assert_eq!(outcome.option_id.as_deref(), Some("yes"));
    assert_eq!(outcome.by, "alice via token plugin");
    let seen = f
        .store
        .runner_approval(&t.id, &a.id, &attempt_of(&o))
        .await
        .unwrap();
    assert_eq!(seen, settled);
    let twice = f
        .store
        .answer_approval(&a.id, &Scope::All, "adm", answer(Decision::Deny, None))
        .await;
    match twice {
        Err(StoreError::Settled { code, message }) => {
            assert_eq!(code, "already_decided");
            assert!(
                message.contains("allowed once by alice via token plugin"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    let task = f.store.task(&t.id, &Scope::All).await.unwrap();
    assert_eq!(task.waiting_for_approval, None);
    let (events, _) = f.store.events(&t.id, &Scope::All, 0, 100).await.unwrap();
    let states: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "approval")
        .map(|e| e.data["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "allowed"]);
}

async fn requests_expire_and_end_with_their_attempt(f: Fixture) {
    let (t, o) = running(&f, "o", SubmitTask::new("claude", "p")).await;
    let (a, _) = f
        .store
        .create_approval(&t.id, request(&o, "k1", Some(1_000)))
        .await
        .unwrap();
    // The next deadline is the request's (the lease runs longer).
    assert_eq!(f.store.expire_due().await.unwrap(), Some(a.expires_at));
    f.clock.advance(1_000);
    f.store.expire_due().await.unwrap();
    let got = f.store.approval(&a.id, &Scope::All).await.unwrap();
    assert_eq!(got.state, ApprovalState::Expired);
    let outcome = got.outcome.unwrap();
    assert_eq!(
        (outcome.by.as_str(), outcome.option_id.as_deref()),
        ("timeout", Some("no"))
    );

    // Answered after its time but before the timer ran: expired now, and refused.
    let (b, _) = f
        .store
        .create_approval(&t.id, request(&o, "k2", Some(1_000)))
        .await
        .unwrap();
    f.clock.advance(1_500);
    let late = f
        .store
        .answer_approval(&b.id, &Scope::All, "adm", answer(Decision::AllowOnce, None))
        .await;
    assert!(
        matches!(
            late,
            Err(StoreError::Settled {
                code: "approval_expired",
                ..
            })
        ),
        "{late:?}"
    );
    let got = f.store.approval(&b.id, &Scope::All).await.unwrap();
    assert_eq!(got.state, ApprovalState::Expired);

    // Cancel settles what is pending; no new questions while cancelling.
    let (c, _) = f
        .store
        .create_approval(&t.id, request(&o, "k3", None))
        .await
        .unwrap();
    f.store.cancel(&t.id, &Scope::All).await.unwrap();
    let got = f.store.approval(&c.id, &Scope::All).await.unwrap();
    assert_eq!(got.state, ApprovalState::Cancelled);
    assert_eq!(got.outcome.unwrap().option_id, None);
    let refused = f
        .store
        .create_approval(&t.id, request(&o, "k4", None))
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );

    // The attempt finishing settles what is pending; a finished task cannot be asked for.
    let (t2, o2) = running(&f, "o", SubmitTask::new("claude", "q")).await;
    let (d, _) = f
        .store
        .create_approval(&t2.id, request(&o2, "k", None))
        .await
        .unwrap();
    f.store
        .finish(&t2.id, finish_req(&o2, Outcome::Succeeded, None))
        .await
        .unwrap();
    let got = f.store.approval(&d.id, &Scope::All).await.unwrap();
    assert_eq!(got.state, ApprovalState::Cancelled);
    let refused = f
        .store
        .create_approval(&t2.id, request(&o2, "k9", None))
        .await;
    assert!(matches!(refused, Err(StoreError::Stale(_))), "{refused:?}");

    // A lost lease does too.
    let (t3, o3) = running(&f, "o", SubmitTask::new("claude", "r")).await;
    let (e, _) = f
        .store
        .create_approval(&t3.id, request(&o3, "k", None))
        .await
        .unwrap();
    f.clock.advance(QueueSettings::default().lease_ms + 1);
    f.store.expire_due().await.unwrap();
    let got = f.store.approval(&e.id, &Scope::All).await.unwrap();
    assert_eq!(got.state, ApprovalState::Cancelled);
    let all = f
        .store
        .approvals(
            ApprovalFilter {
                limit: 10,
                ..Default::default()
            },
            &Scope::All,
        )
        .await
        .unwrap();
    let ids: Vec<&str> = all.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, [&e.id, &d.id, &c.id, &b.id, &a.id], "newest first");
}

async fn approvals_are_delivered_to_chat(f: Fixture) {
    let mut req = SubmitTask::new("claude", "p");
    req.reply_to = Some(discord("chan"));
    let (t, o) = running(&f, "o", req).await;
    deliver_all(&f.store).await; // the "working…" message
    let (a, _) = f
        .store
        .create_approval(&t.id, request(&o, "k", None))
        .await
        .unwrap();
    let (due, _) = f.store.due_deliveries(10).await.unwrap();
    assert_eq!(due.len(), 1, "one destination, one at a time: {due:?}");
    assert_eq!(due[0].kind, DeliveryKind::Approval);
    assert_eq!(
        due[0].approval.as_ref().map(|x| x.id.as_str()),
        Some(a.id.as_str())
    );
    f.store
        .update_delivery(
            due[0].id,
            DeliveryUpdate::Sent {
                message_id: Some("q-1".into()),
            },
        )
        .await
        .unwrap();
    f.store
        .answer_approval(&a.id, &Scope::All, "adm", answer(Decision::Deny, None))
        .await
        .unwrap();
    // The progress edit (showing the question) goes out now, then the question's edit.
    let (due, _) = f.store.due_deliveries(10).await.unwrap();
    let kinds: Vec<DeliveryKind> = due.iter().map(|d| d.kind).collect();
    assert_eq!(kinds, [DeliveryKind::Edit]);
    f.store
        .update_delivery(due[0].id, DeliveryUpdate::Sent { message_id: None })
        .await
        .unwrap();
    let (due, _) = f.store.due_deliveries(10).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(due[0].kind, DeliveryKind::ApprovalEdit);
    assert_eq!(due[0].approval_message.as_deref(), Some("q-1"));
    assert_eq!(
        due[0].approval.as_ref().unwrap().state,
        ApprovalState::Denied
    );
    f.store
        .update_delivery(due[0].id, DeliveryUpdate::Sent { message_id: None })
        .await
        .unwrap();
    assert_eq!(deliver_all(&f.store).await, 0);
}
