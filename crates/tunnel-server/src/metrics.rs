//! `/metrics` in the Prometheus text format. Counters live in atomics updated where things
//! happen; gauges are read from the store and the hub when scraped. Names follow the spec in
//! ARCHITECTURE.md (Observability).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use tunnel_protocol::TaskState;

/// Upper bounds (seconds) of the dispatch latency histogram.
const BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0,
];

#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) submitted: AtomicU64,
    pub(crate) offered: AtomicU64,
    pub(crate) finished_by_runner: AtomicU64,
    pub(crate) deliveries_sent: AtomicU64,
    pub(crate) delivery_retries: AtomicU64,
    pub(crate) delivery_failures: AtomicU64,
    pub(crate) pruned_tasks: AtomicU64,
    dispatch_buckets: [AtomicU64; BUCKETS.len()],
    dispatch_count: AtomicU64,
    dispatch_sum_us: AtomicU64,
}

impl Metrics {
    /// A task was offered `waited_ms` after it was submitted.
    pub(crate) fn dispatched(&self, waited_ms: i64) {
        self.offered.fetch_add(1, Ordering::Relaxed);
        let secs = waited_ms.max(0) as f64 / 1000.0;
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.dispatch_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.dispatch_count.fetch_add(1, Ordering::Relaxed);
        self.dispatch_sum_us
            .fetch_add(waited_ms.max(0) as u64 * 1000, Ordering::Relaxed);
    }

    /// The whole exposition. `tasks` and the rest are read by the caller at scrape time.
    pub(crate) fn render(
        &self,
        tasks: &[(TaskState, u64)],
        parked_polls: usize,
        runners_online: usize,
        db_ms: f64,
    ) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let _ = writeln!(
            out,
            "# HELP tunnel_tasks Tasks in the store, by state.\n# TYPE tunnel_tasks gauge"
        );
        for s in TaskState::ALL {
            let n = tasks
                .iter()
                .find(|(t, _)| *t == s)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            let _ = writeln!(out, "tunnel_tasks{{state=\"{s}\"}} {n}");
        }
        counter(
            &mut out,
            "tunnel_tasks_submitted_total",
            "Tasks submitted to this server.",
            self.submitted.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "tunnel_tasks_offered_total",
            "Offers made by this server.",
            self.offered.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "tunnel_attempts_finished_total",
            "Attempts finished by runners on this server.",
            self.finished_by_runner.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP tunnel_dispatch_latency_seconds From submit to offer.\n# TYPE tunnel_dispatch_latency_seconds histogram"
        );
        for (i, le) in BUCKETS.iter().enumerate() {
            let n = self.dispatch_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "tunnel_dispatch_latency_seconds_bucket{{le=\"{le}\"}} {n}"
            );
        }
        let count = self.dispatch_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "tunnel_dispatch_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = self.dispatch_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "tunnel_dispatch_latency_seconds_sum {sum}\ntunnel_dispatch_latency_seconds_count {count}"
        );
        gauge(
            &mut out,
            "tunnel_long_polls_parked",
            "Runner long-polls waiting on this server.",
            parked_polls as f64,
        );
        gauge(
            &mut out,
            "tunnel_runners_online",
            "Runners seen recently.",
            runners_online as f64,
        );
        counter(
            &mut out,
            "tunnel_deliveries_sent_total",
            "Chat messages and webhook calls delivered.",
            self.deliveries_sent.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "tunnel_delivery_retries_total",
            "Deliveries rescheduled after a 429, 5xx or network error.",
            self.delivery_retries.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "tunnel_delivery_failures_total",
            "Deliveries given up.",
            self.delivery_failures.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "tunnel_tasks_pruned_total",
            "Finished tasks removed after the retention period.",
            self.pruned_tasks.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "tunnel_db_latency_seconds",
            "How long the store took to count tasks for this scrape.",
            db_ms / 1000.0,
        );
        out
    }
}
