//! The injectable clock. Every deadline comparison in the store and server reads time from a
//! [`Clock`], so tests move time forward instead of sleeping.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A source of time in Unix milliseconds.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
    /// Resolves once `now_ms() >= at_ms` may hold. The caller re-reads the time after.
    fn sleep_until(&self, at_ms: i64) -> Sleep<'_>;
}

/// Wall-clock time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn sleep_until(&self, at_ms: i64) -> Sleep<'_> {
        let wait = (at_ms - self.now_ms()).max(0) as u64;
        Box::pin(tokio::time::sleep(Duration::from_millis(wait)))
    }
}

/// Time that moves only when a test says so.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicI64,
    changed: Notify,
}

impl ManualClock {
    pub fn new(start_ms: i64) -> Self {
        ManualClock {
            now: AtomicI64::new(start_ms),
            changed: Notify::new(),
        }
    }

    /// Moves time forward and wakes everything sleeping on this clock.
    pub fn advance(&self, ms: i64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }

    fn sleep_until(&self, at_ms: i64) -> Sleep<'_> {
        Box::pin(async move {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.now_ms() >= at_ms {
                    return;
                }
                changed.await;
            }
        })
    }
}
