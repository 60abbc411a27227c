//! SQLite only: the write-ahead log stays bounded under sustained load, is emptied when the
//! server goes idle, and is checkpointed, truncated and closed by [`Store::close`].

use std::path::Path;

use tunnel_protocol::AppendEvents;

use super::*;

fn wal_size(db: &Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
}

fn db_path(f: &Fixture) -> std::path::PathBuf {
    match &f.db {
        Database::Sqlite { path, .. } => path.clone(),
        Database::Postgres { .. } => unreachable!("SQLite fixture"),
    }
}

/// One task through the standard cycle: submit, claim, ack, three events, finish.
async fn cycle(store: &Store, i: usize) {
    store
        .submit(
            "o",
            None,
            SubmitTask::new("claude", format!("task {i}: {}", "x".repeat(200))),
        )
        .await
        .unwrap();
    // Another worker may have taken this one; any ready task will do.
    let Some(o) = store.claim(&claim_req(&format!("r{i}"))).await.unwrap() else {
        return;
    };
    store.ack(&o.task.id, &attempt_of(&o)).await.unwrap();
    let events = (1..=3)
        .map(|n| NewEvent {
            n,
            kind: "text".into(),
            data: serde_json::json!({"text": "y".repeat(300)}),
        })
        .collect();
    store
        .append_events(
            &o.task.id,
            AppendEvents {
                attempt: o.attempt,
                lease_token: o.lease_token.clone(),
                events,
            },
        )
        .await
        .unwrap();
    store
        .finish(&o.task.id, finish_req(&o, Outcome::Succeeded, None))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_stays_bounded_under_a_burst() {
    const TASKS: usize = 3_000;
    const WORKERS: usize = 32;
    let f = sqlite_fixture().await;
    let path = db_path(&f);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (store, next, peak, path) = (f.store.clone(), next.clone(), peak.clone(), path.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= TASKS {
                    return;
                }
                cycle(&store, i).await;
                // A reader now and then, as the server has (each holds a snapshot while it
                // runs, which a checkpoint must wait for).
                if i % 10 == 0 {
                    store.counts().await.unwrap();
                }
                peak.fetch_max(wal_size(&path), std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    // Every task claimed by someone got finished; the rest are still queued: finish them.
    while let Some(o) = f.store.claim(&claim_req("last")).await.unwrap() {
        run_to_end(&f.store, &o).await;
    }
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    let db = std::fs::metadata(&path).unwrap().len();
    // Without restarts the log only grows: tens of KiB per task, well over 100 MiB here.
    assert!(
        peak <= 32 * 1024 * 1024,
        "WAL peaked at {peak} bytes over {TASKS} tasks (database {db} bytes)"
    );
    f.store.close().await;
    assert_eq!(wal_size(&path), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_checkpoints_truncates_and_refuses_later_calls() {
    let f = sqlite_fixture().await;
    let path = db_path(&f);
    for i in 0..20 {
        cycle(&f.store, i).await;
    }
    // A read, so a reader connection is pooled and must be closed too.
    f.store.counts().await.unwrap();
    assert!(wal_size(&path) > 0, "the writes are in the WAL");
    f.store.close().await;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    assert!(
        !Path::new(&wal).exists(),
        "the last connection closed removes the WAL ({} bytes left)",
        wal_size(&path)
    );
    assert!(matches!(
        f.store.counts().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        f.store
            .submit("o", None, SubmitTask::new("claude", "late"))
            .await,
        Err(StoreError::Unavailable(_))
    ));
    // Everything is in the database itself.
    let (again, _) = f.another(f.clock.clone()).await;
    let counts = again.counts().await.unwrap();
    let done: u64 = counts
        .by_state
        .iter()
        .filter(|(s, _)| *s == TaskState::Succeeded)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(done, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_store_truncates_its_wal() {
    let f = sqlite_fixture().await;
    let path = db_path(&f);
    for i in 0..20 {
        cycle(&f.store, i).await;
    }
    assert!(wal_size(&path) > 0, "the writes are in the WAL");
    // Nothing else to wait on: the writer truncates after a second with no write.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while wal_size(&path) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the WAL of an idle store was not truncated ({} bytes)",
            wal_size(&path)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Still working after it.
    cycle(&f.store, 99).await;
}
