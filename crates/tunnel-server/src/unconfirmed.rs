//! Offers acked at claim time (`ClaimRequest::ack`) that their runner has not yet shown it
//! received. Such an attempt is running on the server before the runner has read the answer;
//! if the answer is lost in transit (the connection died), nobody runs it until its lease runs
//! out and it is lost. So the server keeps the offer until the runner's first call about that
//! task (heartbeat, events, finish, ack, or a claim listing it in `holding`), and answers it
//! again to the same runner's next claim with `ack`.
//!
//! In memory only, and bounded: a server that restarts in the instant between the ack's commit
//! and the answer falls back to the lease (as a runner dying after its ack does).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tunnel_protocol::Offer;

/// Most offers kept; past it an offer is not kept (the lease is its fallback).
const MAX_KEPT: usize = 10_000;

struct Kept {
    token_id: String,
    runner: String,
    offer: Offer,
    /// Forgotten after this (ms): the lease it was given has run out by then.
    until: i64,
}

#[derive(Default)]
pub(crate) struct Unconfirmed {
    by_task: Mutex<HashMap<String, Kept>>,
    /// `by_task.len()`, read without the lock on every runner call.
    len: AtomicUsize,
}

impl Unconfirmed {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Kept>> {
        self.by_task.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps an offer acked at claim time until its runner shows it has it.
    pub(crate) fn keep(&self, token_id: &str, runner: &str, offer: &Offer, until: i64, now: i64) {
        let mut map = self.lock();
        if map.len() >= MAX_KEPT / 2 {
            map.retain(|_, k| k.until > now);
        }
        if map.len() < MAX_KEPT {
            map.insert(
                offer.task.id.clone(),
                Kept {
                    token_id: token_id.to_owned(),
                    runner: runner.to_owned(),
                    offer: offer.clone(),
                    until,
                },
            );
        }
        self.len.store(map.len(), Ordering::Relaxed);
    }

    /// The runner has the task (it made a call about it).
    pub(crate) fn confirm(&self, task_id: &str) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut map = self.lock();
        map.remove(task_id);
        self.len.store(map.len(), Ordering::Relaxed);
    }

    /// An offer this runner (name and token) never confirmed and does not list in `holding`;
    /// the ones it lists are confirmed. It stays kept until confirmed (the answer that brings
    /// it again may be lost too).
    pub(crate) fn unconfirmed_for(
        &self,
        token_id: &str,
        runner: &str,
        holding: &[String],
        now: i64,
    ) -> Option<Offer> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut map = self.lock();
        for id in holding {
            map.remove(id);
        }
        self.len.store(map.len(), Ordering::Relaxed);
        map.values()
            .find(|k| k.token_id == token_id && k.runner == runner && k.until > now)
            .map(|k| k.offer.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(id: &str) -> Offer {
        let task: tunnel_protocol::Task = serde_json::from_value(serde_json::json!({
            "id": id, "state": "running", "agent": "a", "prompt": "p", "attempt": 1,
            "session": "continue", "max_attempts": 1, "cancel_requested": false,
            "created_at": 0, "updated_at": 0
        }))
        .unwrap();
        Offer {
            task,
            attempt: 1,
            lease_token: "l".into(),
            ack_by: 0,
            resume_session_id: None,
            lease: None,
        }
    }

    #[test]
    fn an_offer_goes_back_only_to_its_runner_and_token_until_confirmed() {
        let u = Unconfirmed::default();
        u.keep("tok", "r1", &offer("a"), 1_000, 0);
        assert!(u.unconfirmed_for("other", "r1", &[], 10).is_none());
        assert!(u.unconfirmed_for("tok", "r2", &[], 10).is_none());
        assert!(u.unconfirmed_for("tok", "r1", &["a".into()], 10).is_none());
        u.keep("tok", "r1", &offer("b"), 1_000, 0);
        assert!(
            u.unconfirmed_for("tok", "r1", &[], 2_000).is_none(),
            "expired"
        );
        u.confirm("b");
        u.keep("tok", "r1", &offer("c"), 1_000, 0);
        u.confirm("c");
        assert!(u.unconfirmed_for("tok", "r1", &[], 10).is_none());
        u.keep("tok", "r1", &offer("d"), 1_000, 0);
        assert_eq!(
            u.unconfirmed_for("tok", "r1", &[], 10).unwrap().task.id,
            "d"
        );
        assert_eq!(
            u.unconfirmed_for("tok", "r1", &[], 10).unwrap().task.id,
            "d",
            "kept until confirmed"
        );
        assert!(u.unconfirmed_for("tok", "r1", &["d".into()], 10).is_none());
    }
}
