//! `cargo bench -p tunnel-store`: what each store operation costs on SQLite on disk, through
//! the public API (the writer thread, group commit, the claim query), with no HTTP around it.
//! A plain loop with `std::time`; it prints µs per operation and operations per second.
//!
//! - one caller at a time: every operation is its own commit (latency of one write);
//! - 64 callers at once: operations share commits (what the writer sustains).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tunnel_protocol::{
    AppendEvents, AttemptRef, ClaimRequest, FinishRequest, NewEvent, Offer, Outcome, SubmitTask,
    TaskResult,
};
use tunnel_store::{Database, Durability, QueueSettings, ReadyHint, Signals, Store, SystemClock};

struct Quiet;
impl Signals for Quiet {
    fn task_ready(&self, _: &ReadyHint) {}
    fn task_changed(&self, _: &str) {}
    fn deadline(&self, _: i64) {}
}

const N: usize = 2_000;
const CONCURRENT: usize = 64;

fn claim_request() -> ClaimRequest {
    serde_json::from_value(serde_json::json!({
        "runner": "bench", "agents": ["bench"], "capacity": 1, "wait_ms": 0
    }))
    .expect("a valid claim request")
}

fn line(what: &str, n: usize, took: Duration) {
    println!(
        "{what:<44} {:>8.1} us/op {:>10.0} ops/s",
        took.as_secs_f64() * 1e6 / n as f64,
        n as f64 / took.as_secs_f64()
    );
}

async fn open(dir: &std::path::Path, name: &str) -> Store {
    Store::open(
        &Database::Sqlite {
            path: dir.join(name),
            durability: Durability::Normal,
        },
        QueueSettings::default(),
        Arc::new(SystemClock),
        Arc::new(Quiet),
    )
    .await
    .expect("open the store")
}

async fn finish(store: &Store, offer: &Offer) {
    let at = AttemptRef {
        attempt: offer.attempt,
        lease_token: offer.lease_token.clone(),
    };
    store.ack(&offer.task.id, &at).await.expect("ack");
    store
        .append_events(
            &offer.task.id,
            AppendEvents {
                attempt: at.attempt,
                lease_token: at.lease_token.clone(),
                events: vec![NewEvent {
                    n: 1,
                    kind: "text".into(),
                    data: serde_json::json!({"text": "done"}),
                }],
            },
        )
        .await
        .expect("events");
    store
        .finish(
            &offer.task.id,
            FinishRequest {
                attempt: at.attempt,
                lease_token: at.lease_token,
                outcome: Outcome::Succeeded,
                result: TaskResult::default(),
                not_before: None,
                events: vec![],
            },
        )
        .await
        .expect("finish");
}

async fn sequential(dir: &std::path::Path) {
    println!("one caller at a time ({N} tasks):");
    let store = open(dir, "sequential.db").await;
    let t = Instant::now();
    for i in 0..N {
        store
            .submit("bench", None, SubmitTask::new("bench", format!("task {i}")))
            .await
            .expect("submit");
    }
    line("  submit (queue grows to N)", N, t.elapsed());
    let req = claim_request();
    let t = Instant::now();
    let mut offers = Vec::with_capacity(N);
    for _ in 0..N {
        offers.push(store.claim(&req).await.expect("claim").expect("an offer"));
    }
    line("  claim (oldest ready task, queue shrinks)", N, t.elapsed());
    let t = Instant::now();
    for o in &offers {
        finish(&store, o).await;
    }
    line("  ack + 1 event + finish (3 writes)", N * 3, t.elapsed());
    let t = Instant::now();
    for _ in 0..N {
        assert!(store.claim(&req).await.expect("claim").is_none());
    }
    line("  claim on an empty queue", N, t.elapsed());
}

async fn concurrent(dir: &std::path::Path) {
    println!("{CONCURRENT} callers at once ({N} tasks):");
    let store = Arc::new(open(dir, "concurrent.db").await);
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for c in 0..CONCURRENT {
        let store = store.clone();
        set.spawn(async move {
            for i in (c..N).step_by(CONCURRENT) {
                store
                    .submit("bench", None, SubmitTask::new("bench", format!("task {i}")))
                    .await
                    .expect("submit");
            }
        });
    }
    while set.join_next().await.is_some() {}
    line("  submit", N, t.elapsed());
    let t = Instant::now();
    for _ in 0..CONCURRENT {
        let store = store.clone();
        set.spawn(async move {
            let req = claim_request();
            while let Some(o) = store.claim(&req).await.expect("claim") {
                finish(&store, &o).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
    line("  claim + ack + 1 event + finish, per task", N, t.elapsed());
}

fn main() {
    // `cargo test --benches` runs this too; keep that quick.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = tempfile::tempdir().expect("a temp dir");
    rt.block_on(async {
        sequential(dir.path()).await;
        concurrent(dir.path()).await;
    });
}
