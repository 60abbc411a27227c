//! The runner's edges with the server: a normal finish is quiet, and a server that was down
//! is reached again within a second of being back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tunnel_protocol::TaskState;

use crate::harness::{RunnerHandle, World, task};

/// Every WARN or ERROR event the runner logged in this process, as "message field=value …".
fn warnings() -> &'static Mutex<Vec<String>> {
    static LOG: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let sub = tracing_subscriber::registry().with(Capture);
        // Another test binary-wide subscriber would win; none is installed in this binary.
        let _ = tracing::subscriber::set_global_default(sub);
    });
    LOG.get_or_init(Mutex::default)
}

struct Capture;

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if *event.metadata().level() <= tracing::Level::WARN {
            let mut line = Line(String::new());
            event.record(&mut line);
            warnings().lock().unwrap().push(line.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_finish_logs_no_lost_lease() {
    let log = warnings();
    let w = World::start().await;
    let mut c = w.config("quiet");
    c.agents
        .insert("echo".into(), tunnel_runner::AgentConfig::echo());
    let r = RunnerHandle::spawn(c);
    // Every task has a held heartbeat in flight when it finishes; before the fix about half
    // of them answered 409 after the finish and logged "The lease is gone" (so 12 tasks
    // all passing by luck had odds of 1 in 4,000).
    let mut ids = Vec::new();
    for i in 0..12 {
        let t = w.submit(task("echo", &format!("quick {i}"))).await;
        assert_eq!(w.ended(&t.id).await.state, TaskState::Succeeded);
        ids.push(t.id);
    }
    r.stop().await.unwrap();
    let lines = log.lock().unwrap().clone();
    let ours: Vec<&String> = lines
        .iter()
        .filter(|l| ids.iter().any(|id| l.contains(id.as_str())))
        .collect();
    assert!(ours.is_empty(), "warnings for successful tasks: {ours:#?}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_the_runner_is_back_within_a_second() {
    let mut w = World::start().await;
    let mut c = w.config("back");
    c.agents
        .insert("echo".into(), tunnel_runner::AgentConfig::echo());
    c.long_poll_wait = Duration::from_secs(2);
    let r = RunnerHandle::spawn(c);
    let t = w.submit(task("echo", "before")).await;
    assert_eq!(w.ended(&t.id).await.state, TaskState::Succeeded);

    // The outage: the server is gone and its port answers nothing (a connection is taken and
    // dropped at once, as during a restart behind a proxy or a half-started process). Count
    // how often the runner tries: with the old exponential back-off (0.5, 1, 2, 4, 8 s) it
    // tried 4 or 5 times in 10 s; probing about twice a second it tries about 16 times.
    w.stop_server().await;
    let listener = tokio::net::TcpListener::bind(w.addr()).await.unwrap();
    let tries = Arc::new(AtomicUsize::new(0));
    let counter = {
        let tries = tries.clone();
        tokio::spawn(async move {
            loop {
                if let Ok((s, _)) = listener.accept().await {
                    tries.fetch_add(1, Ordering::Relaxed);
                    drop(s);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(10)).await;
    counter.abort();
    let _ = counter.await;
    let tried = tries.load(Ordering::Relaxed);

    // The server is back: how long until the runner runs a task submitted right away.
    w.start_server_again().await;
    let back = Instant::now();
    let back_ms = unix_ms();
    let t = w.submit(task("echo", "after")).await;
    let done = w.ended(&t.id).await;
    let finished = back.elapsed();
    assert_eq!(done.state, TaskState::Succeeded);
    let started = done.started_at.unwrap() - back_ms;
    println!(
        "runner reconnect: {tried} tries in a 10 s outage; a task submitted as the server came back started {started} ms and finished {} ms after it",
        finished.as_millis()
    );
    assert!(
        tried >= 8,
        "the runner tried only {tried} times in 10 s while the server was down"
    );
    r.stop().await.unwrap();
    w.stop().await;
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
