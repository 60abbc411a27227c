//! The in-process wake-up hub: what the store's [`Signals`] turn into.
//!
//! - Parked long-polls register a [`WaitSlot`]. When a task becomes ready, exactly one
//!   matching slot is woken (no thundering herd over thousands of parked runners). A slot
//!   whose own claim found nothing is *armed* ([`WaitSlot::arm`]): SQLite's writer then claims
//!   for it in the transaction that made the task ready ([`Signals::take_parked`]) and hands
//!   it the offer; otherwise a woken poll claims through the store, which decides atomically
//!   who gets the task.
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
use tunnel_protocol::{AttemptRef, ClaimRequest};
use tunnel_store::{Handoff, ParkedClaim, ReadyHint, Signals, StartAtClaim};

struct Waiter {
    id: u64,
    req: Arc<ClaimRequest>,
    /// Set once the poll's own claim found nothing: what the writer may claim for it with.
    armed: Option<(Arc<str>, Option<StartAtClaim>)>,
    wake: oneshot::Sender<Handoff>,
}

impl Waiter {
    fn matches(&self, hint: &ReadyHint) -> bool {
        self.req.agents.contains(&hint.agent)
            && hint
                .project
                .as_ref()
                .is_none_or(|p| self.req.projects.contains(p))
            && hint.runner.as_ref().is_none_or(|r| r == &self.req.runner)
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
    /// Offers (and confirmed starts) claimed for a poll that was gone before it could answer
    /// with them: given back by [`offer_returner`](crate) so the task is offered again at once.
    returned: Mutex<Vec<Returned>>,
    returned_wake: Notify,
}

/// What a poll that was gone left behind ([`Hub::take_returned`]).
pub(crate) struct Returned {
    pub(crate) task_id: String,
    pub(crate) at: AttemptRef,
    /// Started ([`Store::return_start`](tunnel_store::Store::return_start)) rather than
    /// only offered.
    pub(crate) started: bool,
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
    pub(crate) fn wait_slot(self: &Arc<Self>, req: &Arc<ClaimRequest>) -> WaitSlot {
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let (wake, rx) = oneshot::channel();
        self.lock_waiters().push_back(Waiter {
            id,
            req: req.clone(),
            armed: None,
            wake,
        });
        WaitSlot {
            hub: self.clone(),
            id,
            rx,
        }
    }

    /// Offers to give back ([`Signals::handoff_lost`]), taken; empty until
    /// [`Hub::returned_woken`].
    pub(crate) fn take_returned(&self) -> Vec<Returned> {
        std::mem::take(&mut *self.returned.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits until an offer is to be given back.
    pub(crate) fn returned_woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.returned_wake.notified()
    }

    fn give_back(&self, task_id: String, attempt: u32, lease_token: String, started: bool) {
        let at = AttemptRef {
            attempt,
            lease_token,
        };
        self.returned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Returned {
                task_id,
                at,
                started,
            });
        self.returned_wake.notify_one();
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
                if w.wake.send(Handoff::Ready(hint.clone())).is_ok() {
                    return;
                }
            } else {
                i += 1;
            }
        }
    }

    fn take_parked(&self, hint: &ReadyHint) -> Option<ParkedClaim> {
        let mut waiters = self.lock_waiters();
        let mut i = 0;
        while i < waiters.len() {
            if !waiters[i].matches(hint) {
                i += 1;
                continue;
            }
            if waiters[i].wake.is_closed() {
                // Its client went away.
                waiters.remove(i);
                continue;
            }
            // The first in line only, as `task_ready` would wake: one still claiming for
            // itself is woken after the commit instead.
            let (token, start) = waiters[i].armed.clone()?;
            let w = waiters.remove(i).expect("index is in range");
            return Some(ParkedClaim {
                req: w.req,
                token,
                start,
                answer: w.wake,
            });
        }
        None
    }

    fn handoff_lost(&self, lost: Handoff) {
        match lost {
            Handoff::Ready(hint) => self.task_ready(&hint),
            Handoff::Offered(offer) => {
                tracing::info!(task_id = %offer.task.id, runner = %offer.task.runner.as_deref().unwrap_or("?"), "The poll an offer was claimed for had gone; offering it again.");
                self.give_back(offer.task.id, offer.attempt, offer.lease_token, false);
            }
            // Started for a poll that had gone. A claim with `ack` left it unconfirmed: that
            // runner's next claim gets it again, so it must not be given back (that claim may
            // already have it). An original runner's (confirmed: nothing offers it again) is
            // given back: its lease covers the task's whole timeout.
            Handoff::Started(s) if s.confirmed => {
                tracing::info!(task_id = %s.offer.task.id, "The poll a task was started for had gone; queueing it again.");
                let o = s.offer;
                self.give_back(o.task.id, o.attempt, o.lease_token, true);
            }
            Handoff::Started(s) => {
                tracing::info!(task_id = %s.offer.task.id, "The poll a task was started for had gone; its runner's next claim with ack gets it again.");
            }
            Handoff::Failed(_) => {}
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
    rx: oneshot::Receiver<Handoff>,
}

impl WaitSlot {
    /// The poll's own claim found nothing: from now on a write that makes a task ready for it
    /// may claim for it (as `token`; with `start`, claim and ack) and hand it the answer.
    pub(crate) fn arm(&self, token: &Arc<str>, start: Option<StartAtClaim>) {
        let mut waiters = self.hub.lock_waiters();
        if let Some(w) = waiters.iter_mut().find(|w| w.id == self.id) {
            w.armed = Some((token.clone(), start));
        }
    }

    /// Resolves when a matching task became ready or was claimed for this poll (or never, if
    /// the hub is gone).
    pub(crate) async fn woken(&mut self) -> Handoff {
        match (&mut self.rx).await {
            Ok(h) => h,
            Err(_) => std::future::pending().await,
        }
    }

    /// The poll is done waiting (its time ran out, or shutdown): `None` if it was still in
    /// line, else what it was woken with, waited for, so a claim the writer is making for it
    /// right now is not lost.
    pub(crate) async fn close(mut self) -> Option<Handoff> {
        let queued = {
            let mut waiters = self.hub.lock_waiters();
            let before = waiters.len();
            waiters.retain(|w| w.id != self.id);
            waiters.len() != before
        };
        if queued {
            return None;
        }
        (&mut self.rx).await.ok()
    }
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.hub.lock_waiters().retain(|w| w.id != self.id);
        // Woken but gone before acting: wake someone else, or give the offer back.
        if let Ok(h) = self.rx.try_recv() {
            self.hub.handoff_lost(h);
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
