//! Tenancy edges (issue #14): runner names belong to their first token; conversation names
//! are scoped by owner (each client token has its own, admin tokens share one namespace), and
//! a database from before that carries its conversations over.

use super::*;

conformance!(
    a_runner_name_belongs_to_its_first_token,
    conversations_are_scoped_by_owner,
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

async fn conversations_are_scoped_by_owner(f: Fixture) {
    let s = &f.store;
    for id in ["ca", "cb"] {
        s.create_token(id.into(), id.into(), Role::Client, [7; 32])
            .await
            .unwrap();
    }
    let conv = "discord:123";
    // Client A's task is running in the conversation; client B uses the same name meanwhile
    // and is neither refused nor queued behind A's task.
    let (a1, _) = s.submit("ca", None, in_conv("a1", conv)).await.unwrap();
    let oa = s.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(oa.task.id, a1.id);
    s.ack(&a1.id, &attempt_of(&oa)).await.unwrap();
    let (b1, _) = s.submit("cb", None, in_conv("b1", conv)).await.unwrap();
    assert_eq!(b1.queue_position, Some(0), "{b1:?}");
    let ob = s.claim(&claim_req("r2")).await.unwrap().unwrap();
    assert_eq!(ob.task.id, b1.id);
    assert_eq!(ob.resume_session_id, None);
    s.ack(&b1.id, &attempt_of(&ob)).await.unwrap();
    s.finish(&a1.id, finish_req(&oa, Outcome::Succeeded, Some("sess-a")))
        .await
        .unwrap();
    s.finish(&b1.id, finish_req(&ob, Outcome::Succeeded, Some("sess-b")))
        .await
        .unwrap();

    // Each continues its own session on its own runner (affinity by namespace).
    s.submit("ca", None, in_conv("a2", conv)).await.unwrap();
    s.submit("cb", None, in_conv("b2", conv)).await.unwrap();
    let o = s.claim(&claim_req("r2")).await.unwrap().unwrap();
    assert_eq!(o.task.prompt, "b2");
    assert_eq!(o.resume_session_id.as_deref(), Some("sess-b"));
    assert!(s.claim(&claim_req("r2")).await.unwrap().is_none());
    run_to_end(s, &o).await;
    let o = s.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(o.task.prompt, "a2");
    assert_eq!(o.resume_session_id.as_deref(), Some("sess-a"));
    run_to_end(s, &o).await;

    // B starting fresh or binding its name touches only its own conversation.
    let cmd = SessionCommand {
        conversation: conv.into(),
        agent: "claude".into(),
        session_id: None,
        runner: None,
    };
    s.bind_session(cmd.clone(), &Scope::Owner("cb".into()))
        .await
        .unwrap();
    let mut fresh = in_conv("b3", conv);
    fresh.session = SessionMode::New;
    s.submit("cb", None, fresh).await.unwrap();
    let o = s.claim(&claim_req("r2")).await.unwrap().unwrap();
    assert_eq!(o.resume_session_id, None);
    run_to_end(s, &o).await;

    // Each client lists only its own; neither sees the other's tasks under the name.
    for (me, sess, prompts) in [
        ("ca", "sess-a", ["a2", "a1"]),
        ("cb", "sess-b", ["b3", "b2"]),
    ] {
        let scope = Scope::Owner(me.into());
        let list = s
            .sessions(Some(conv.into()), None, 10, &scope)
            .await
            .unwrap();
        assert_eq!(list.sessions.len(), 1, "{me}: {list:?}");
        assert_eq!(list.sessions[0].owner, None);
        if me == "ca" {
            assert_eq!(list.sessions[0].session_id.as_deref(), Some(sess));
        }
        let recent: Vec<&str> = list.recent.iter().map(|r| r.session_id.as_str()).collect();
        assert_eq!(recent, [sess], "{me}");
        let tasks = s
            .tasks(
                TaskFilter {
                    conversation: Some(conv.into()),
                    limit: 10,
                    ..Default::default()
                },
                &scope,
            )
            .await
            .unwrap();
        let got: Vec<&str> = tasks.iter().map(|t| t.prompt.as_str()).collect();
        assert_eq!(&got[..2], prompts, "{me}");
        assert_eq!(got.len(), if me == "ca" { 2 } else { 3 }, "{me}: {got:?}");
    }

    // Admin tokens share one namespace of their own: the admin's name is a third conversation,
    // and the admin's listing shows every one, the clients' with their owner.
    s.submit("adm", None, in_conv("ad", conv)).await.unwrap();
    let o = s.claim(&claim_req("r3")).await.unwrap().unwrap();
    assert_eq!(o.task.prompt, "ad");
    assert_eq!(o.resume_session_id, None);
    s.ack(&o.task.id, &attempt_of(&o)).await.unwrap();
    s.finish(
        &o.task.id,
        finish_req(&o, Outcome::Succeeded, Some("sess-adm")),
    )
    .await
    .unwrap();
    let all = s
        .sessions(Some(conv.into()), None, 10, &Scope::All)
        .await
        .unwrap();
    let mut owners: Vec<(Option<String>, Option<String>)> = all
        .sessions
        .iter()
        .map(|b| (b.owner.clone(), b.session_id.clone()))
        .collect();
    owners.sort();
    assert_eq!(
        owners,
        [
            (None, Some("sess-adm".into())),
            (Some("ca".into()), Some("sess-a".into())),
            (Some("cb".into()), None),
        ]
    );
    // Another admin token continues the shared one.
    s.submit("adm2", None, in_conv("ad2", conv)).await.unwrap();
    let o = s.claim(&claim_req("r3")).await.unwrap().unwrap();
    assert_eq!(o.resume_session_id.as_deref(), Some("sess-adm"));
}

/// What a database from before migration 0016 held: a client's conversation "x" (bound, and a
/// task of it queued) and an admin's shared "ops", under the old one-namespace key.
fn rows_before_0016(blob: &str, us: &str, yes: &str) -> String {
    format!(
        "INSERT INTO tokens (id, name, role, secret_sha256, created_at) VALUES
            ('ca', 'ca', 'client', {blob}, 1), ('cb', 'cb', 'client', {blob}, 1),
            ('adm', 'adm', 'admin', {blob}, 1);
         INSERT INTO sessions (agent, conversation, session_id, runner, updated_at, owner) VALUES
            ('claude', 'x', 's-ca', 'r1', 1, 'ca'), ('claude', 'ops', 's-ops', 'r1', 2, NULL);
         INSERT INTO session_history (agent, session_id, runner, conversation, last_used, owner)
         VALUES ('claude', 's-ca', 'r1', 'x', 1, 'ca'), ('claude', 's-ops', 'r1', 'ops', 2, NULL);
         INSERT INTO tasks (id, agent, prompt, conversation, session_key, session_mode,
            max_attempts, owner, state, ready, created_at, updated_at) VALUES
            ('t-ca', 'claude', 'p', 'x', 'claude' || {us} || 'x', 'continue', 1, 'ca', 'queued',
             {yes}, 1, 1),
            ('t-adm', 'claude', 'p', 'ops', 'claude' || {us} || 'ops', 'continue', 1, 'adm',
             'queued', {yes}, 1, 1);"
    )
}

/// After 0016 the client's conversation is in its namespace, the admin's shared, and the
/// queued tasks resume their sessions; another client's "x" is its own, not behind the first's.
async fn check_after_0016(f: Fixture) {
    let s = &f.store;
    let ca = Scope::Owner("ca".into());
    let mine = s.sessions(None, None, 10, &ca).await.unwrap();
    assert_eq!(mine.sessions.len(), 1, "{mine:?}");
    assert_eq!(mine.sessions[0].conversation, "x");
    assert_eq!(mine.sessions[0].session_id.as_deref(), Some("s-ca"));
    let all = s.sessions(None, None, 10, &Scope::All).await.unwrap();
    let owners: Vec<(&str, Option<&str>)> = all
        .sessions
        .iter()
        .map(|b| (b.conversation.as_str(), b.owner.as_deref()))
        .collect();
    assert_eq!(owners, [("ops", None), ("x", Some("ca"))]);
    // Before 0016 this was 409: "x" belonged to ca.
    let (b, _) = s.submit("cb", None, in_conv("b", "x")).await.unwrap();
    assert_eq!(b.queue_position, Some(0));
    let o = s.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(
        (o.task.id.as_str(), o.resume_session_id.as_deref()),
        ("t-ca", Some("s-ca"))
    );
    let o = s.claim(&claim_req("r1")).await.unwrap().unwrap();
    assert_eq!(
        (o.task.id.as_str(), o.resume_session_id.as_deref()),
        ("t-adm", Some("s-ops"))
    );
    let o = s.claim(&claim_req("r2")).await.unwrap().unwrap();
    assert_eq!(
        (o.task.id.as_str(), o.resume_session_id.as_deref()),
        (b.id.as_str(), None)
    );
    // ca's next task in "x" waits behind its migrated one, which is still running.
    let (a2, _) = s.submit("ca", None, in_conv("a2", "x")).await.unwrap();
    assert_eq!(a2.queue_position, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_migration_0016_carries_conversations_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        // Every migration before 0016 (versions are positions in the list, not file numbers).
        let before = crate::sqlite::MIGRATIONS
            .iter()
            .position(|m| *m == include_str!("../../migrations/sqlite/0016_conversation_owner.sql"))
            .unwrap();
        for sql in &crate::sqlite::MIGRATIONS[..before] {
            c.execute_batch(sql).unwrap();
        }
        c.execute_batch(&rows_before_0016("X'00'", "char(31)", "1"))
            .unwrap();
        c.execute_batch(&format!("PRAGMA user_version = {before}"))
            .unwrap();
    }
    let db = Database::Sqlite {
        path,
        durability: Durability::Normal,
    };
    check_after_0016(open_fixture(db, Guard::Dir(dir)).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migration_0016_carries_conversations_over() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    {
        let c = admin_client(&db.url).await.unwrap();
        c.batch_execute(
            "CREATE TABLE tunnel_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL,
                applied_at BIGINT NOT NULL)",
        )
        .await
        .unwrap();
        let before = crate::postgres::MIGRATIONS
            .iter()
            .position(|(name, _)| *name == "0016_conversation_owner")
            .unwrap();
        for (i, (name, sql)) in crate::postgres::MIGRATIONS[..before].iter().enumerate() {
            c.batch_execute(sql).await.unwrap();
            c.execute(
                "INSERT INTO tunnel_migrations VALUES ($1, $2, 0)",
                &[&(i as i64 + 1), name],
            )
            .await
            .unwrap();
        }
        c.batch_execute(&rows_before_0016("'\\x00'::bytea", "chr(31)", "TRUE"))
            .await
            .unwrap();
    }
    let database = Database::Postgres {
        url: db.url.clone(),
    };
    check_after_0016(open_fixture(database, Guard::Pg(db)).await).await;
}
