//! The in-process wake-up hub: what the store's [`Signals`] turn into.
//!
//! - Parked long-polls register a [`WaitSlot`]. When a task becomes ready, exactly one
//!   matching slot is woken (no thundering herd over thousands of parked runners). A woken
//!   poll claims through the store, which decides atomically who gets the task.
//! - Task watchers (`?wait=` and SSE) wait on a per-task [`Notify`].
//! - The deadline timer is woken when a deadline earlier than the one it sleeps towards
//!   appears.
//!
//! **Architecture Invariant:** nothing here sleeps in a loop; every wait ends on a signal,
//! a deadline, or shutdown.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Notify, oneshot};
use tunnel_store::{ReadyHint, Signals};

struct Waiter {
    id: u64,
    runner: String,
    agents: Vec<String>,
    projects: Vec<String>,
    wake: oneshot::Sender<ReadyHint>,
}

impl Waiter {
    fn matches(&self, hint: &ReadyHint) -> bool {
        self.agents.contains(&hint.agent)
            && hint
                .project
                .as_ref()
                .is_none_or(|p| self.projects.contains(p))
            && hint.runner.as_ref().is_none_or(|r| r == &self.runner)
    }
}

#[derive(Default)]
pub(crate) struct Hub {
    waiters: Mutex<VecDeque<Waiter>>,
    next_waiter: AtomicU64,
    watchers: Mutex<HashMap<String, Weak<Notify>>>,
    /// The deadline the timer sleeps towards (`i64::MAX` while it recomputes or has none).
    timer_target: AtomicI64,
    timer_wake: Notify,
    delivery_wake: Notify,
    tokens_wake: Notify,
    /// Bumped on any task change or newly ready task: the dashboard's live pages listen.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Hub {
    pub(crate) fn new() -> Arc<Hub> {
        Arc::new(Hub {
            timer_target: AtomicI64::new(i64::MAX),
            ..Default::default()
        })
    }

    /// A receiver that sees every later task change (the dashboard's live updates).
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Registers a parked long-poll. Dropping the slot unregisters it, and passes on a wake-up
    /// it received but did not act on.
    pub(crate) fn wait_slot(
        self: &Arc<Self>,
        runner: &str,
        agents: &[String],
        projects: &[String],
    ) -> WaitSlot {
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let (wake, rx) = oneshot::channel();
        self.lock_waiters().push_back(Waiter {
            id,
            runner: runner.to_owned(),
            agents: agents.to_vec(),
            projects: projects.to_vec(),
            wake,
        });
        WaitSlot {
            hub: self.clone(),
            id,
            rx,
        }
    }

    /// Long-polls parked right now.
    pub(crate) fn parked(&self) -> usize {
        self.lock_waiters().len()
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiter>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The notifier of one task, for `?wait=` and event streams.
    pub(crate) fn watch(&self, task_id: &str) -> Arc<Notify> {
        let mut map = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get(task_id).and_then(Weak::upgrade) {
            return n;
        }
        if map.len() >= 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let n = Arc::new(Notify::new());
        map.insert(task_id.to_owned(), Arc::downgrade(&n));
        n
    }

    /// Waits until a deadline may be due or earlier than the one last set.
    pub(crate) fn timer_woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.timer_wake.notified()
    }

    /// Waits until another server changed the token table.
    pub(crate) fn tokens_woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.tokens_wake.notified()
    }

    /// Waits until something is added to the outbox.
    pub(crate) fn delivery_woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.delivery_wake.notified()
    }

    /// The deadline timer says what it now sleeps towards.
    pub(crate) fn set_timer_target(&self, at: Option<i64>) {
        self.timer_target
            .store(at.unwrap_or(i64::MAX), Ordering::SeqCst);
    }
}

impl Signals for Hub {
    fn task_ready(&self, hint: &ReadyHint) {
        self.bump();
        let mut waiters = self.lock_waiters();
        let mut i = 0;
        while i < waiters.len() {
            if waiters[i].matches(hint) {
                let w = waiters.remove(i).expect("index is in range");
                // A closed slot is a poll whose client went away: try the next one.
                if w.wake.send(hint.clone()).is_ok() {
                    return;
                }
            } else {
                i += 1;
            }
        }
    }

    fn task_changed(&self, task_id: &str) {
        self.bump();
        let mut map = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = map.get(task_id) {
            match w.upgrade() {
                Some(n) => n.notify_waiters(),
                None => {
                    map.remove(task_id);
                }
            }
        }
    }

    fn delivery_ready(&self) {
        self.delivery_wake.notify_one();
    }

    fn tokens_changed(&self) {
        self.tokens_wake.notify_one();
    }

    fn deadline(&self, at_ms: i64) {
        if at_ms < self.timer_target.load(Ordering::SeqCst) {
            // notify_one keeps a permit, so a timer between two waits still sees it.
            self.timer_wake.notify_one();
        }
    }
}

/// A parked long-poll's place in line.
pub(crate) struct WaitSlot {
    hub: Arc<Hub>,
    id: u64,
    rx: oneshot::Receiver<ReadyHint>,
}

impl WaitSlot {
    /// Resolves when a matching task became ready (or never, if the hub is gone).
    pub(crate) async fn woken(&mut self) -> ReadyHint {
        match (&mut self.rx).await {
            Ok(hint) => hint,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.hub.lock_waiters().retain(|w| w.id != self.id);
        // Woken but gone before acting: wake someone else instead.
        if let Ok(hint) = self.rx.try_recv() {
            self.hub.task_ready(&hint);
        }
    }
}

/// A wake-up being acted on. If the poll is dropped before its claim settles, the wake-up is
/// passed on so the task is not left waiting for the next poll.
pub(crate) struct PendingHint {
    pub(crate) hub: Arc<Hub>,
    pub(crate) hint: Option<ReadyHint>,
}

impl PendingHint {
    /// The claim took `taken` (or nothing); if the hinted task is still waiting, pass it on.
    pub(crate) fn settle(mut self, taken: Option<&str>) {
        if let Some(hint) = self.hint.take()
            && taken.is_some_and(|t| t != hint.task_id)
        {
            self.hub.task_ready(&hint);
        }
    }
}

impl Drop for PendingHint {
    fn drop(&mut self) {
        if let Some(hint) = self.hint.take() {
            self.hub.task_ready(&hint);
        }
    }
}
