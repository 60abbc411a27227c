//! Tenancy edges (issue #14): runner names belong to their first token; a shared conversation
//! binding is never taken over by a client.

use super::*;

conformance!(
    a_runner_name_belongs_to_its_first_token,
    a_shared_binding_stays_shared,
);

async fn a_runner_name_belongs_to_its_first_token(f: Fixture) {
    let s = &f.store;
    assert!(
        s.claim_as(&claim_req("mac"), "tok-a")
            .await
            .unwrap()
            .is_none()
    );
    match s.claim_as(&claim_req("mac"), "tok-b").await {
        Err(StoreError::Conflict(m)) => assert!(m.contains("another runner token"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    s.submit("o", None, SubmitTask::new("claude", "x"))
        .await
        .unwrap();
    // The refused claim took nothing; the owner's claim takes the task.
    assert!(s.claim_as(&claim_req("mac"), "tok-b").await.is_err());
    let o = s.claim_as(&claim_req("mac"), "tok-a").await.unwrap();
    assert!(o.is_some());
    // A name never claimed by a token (or from before names had owners) goes to the first.
    assert!(s.claim(&claim_req("old")).await.unwrap().is_none());
    assert!(
        s.claim_as(&claim_req("old"), "tok-b")
            .await
            .unwrap()
            .is_none()
    );
    assert!(s.claim_as(&claim_req("old"), "tok-a").await.is_err());
}

async fn a_shared_binding_stays_shared(f: Fixture) {
    let s = &f.store;
    let client = "tok-client".to_owned();
    s.create_token(client.clone(), "c".into(), Role::Client, [7; 32])
        .await
        .unwrap();
    // An admin's conversation (shared), bound to the admin's session.
    s.submit("admin", None, in_conv("a", "ops")).await.unwrap();
    let o = s.claim(&claim_req("r1")).await.unwrap().unwrap();
    s.ack(&o.task.id, &attempt_of(&o)).await.unwrap();
    s.finish(
        &o.task.id,
        finish_req(&o, Outcome::Succeeded, Some("admin-s")),
    )
    .await
    .unwrap();
    let scope = Scope::Owner(client.clone());
    let cmd = SessionCommand {
        conversation: "ops".into(),
        agent: "claude".into(),
        session_id: None,
        runner: None,
    };
    let refused = s.bind_session(cmd, &scope).await;
    assert!(
        matches!(refused, Err(StoreError::NotFound(_))),
        "{refused:?}"
    );
    let mut switch = in_conv("b", "ops");
    switch.session = SessionMode::New;
    let refused = s.submit(&client, None, switch).await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    // Continuing is allowed, and finishing with a session does not make it the client's.
    s.submit(&client, None, in_conv("c", "ops")).await.unwrap();
    let o = s.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(o.resume_session_id.as_deref(), Some("admin-s"));
    s.ack(&o.task.id, &attempt_of(&o)).await.unwrap();
    s.finish(
        &o.task.id,
        finish_req(&o, Outcome::Succeeded, Some("admin-s")),
    )
    .await
    .unwrap();
    // Still shared: another client may continue it too (had the first come to own it, this
    // would be refused as another token's conversation).
    s.create_token("tok-b".into(), "b".into(), Role::Client, [8; 32])
        .await
        .unwrap();
    s.submit("tok-b", None, in_conv("e", "ops")).await.unwrap();
    let o = s.claim(&claim_req("r1")).await.unwrap().unwrap();
    run_to_end(s, &o).await;
    // A client's own new conversation, first bound at the offer, is the client's.
    let mut fresh = in_conv("d", "mine");
    fresh.session = SessionMode::New;
    s.submit(&client, None, fresh).await.unwrap();
    let o = s.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(o.task.prompt, "d");
    let mine = s
        .sessions(Some("mine".into()), None, 10, &scope)
        .await
        .unwrap();
    assert_eq!(mine.sessions.len(), 1, "{mine:?}");
}
