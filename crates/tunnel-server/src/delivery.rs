//! The delivery worker: sends what the store's outbox holds to Discord, Telegram and webhooks.
//!
//! Each round takes the due messages (at most one per destination, so every channel keeps its
//! order), sends them concurrently, and records the outcome: sent, retry at a time (a 429's
//! `retry_after`, or back-off after a 5xx or network error), or given up (a 4xx that will never
//! succeed). A crash between a send and its record repeats at most that one message part; a
//! crash before the send loses nothing, because the row was written with the state change.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tunnel_delivery::{DeliveryError, Platforms};
use tunnel_protocol::Platform;
use tunnel_store::{Delivery, DeliveryKind, DeliveryUpdate};

use crate::AppState;

/// Most messages sent in one round.
const ROUND: u32 = 32;
/// Attempts before a message failing with 5xx or network errors is given up (about 4 hours
/// with the back-off below).
const MAX_ATTEMPTS: u32 = 50;
/// Events shown in a progress message.
const PROGRESS_EVENTS: u32 = 40;

pub(crate) async fn worker(state: AppState, platforms: Arc<Platforms>) {
    // Discord's global rate limit pauses every Discord send until this time (ms).
    let discord_pause = Arc::new(Mutex::new(0i64));
    loop {
        let woken = state.hub.delivery_woken();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let (due, next) = match state.store.due_deliveries(ROUND).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "Reading the outbox failed; retrying in 1 s.");
                (vec![], Some(state.clock.now_ms() + 1_000))
            }
        };
        if due.is_empty() {
            let sleep = state.clock.sleep_until(next.unwrap_or(i64::MAX));
            tokio::select! {
                _ = sleep, if next.is_some() => {}
                _ = &mut woken => {}
                _ = state.shutdown.cancelled() => return,
            }
            continue;
        }
        let mut round = JoinSet::new();
        for d in due {
            round.spawn(deliver(
                state.clone(),
                platforms.clone(),
                discord_pause.clone(),
                d,
            ));
        }
        tokio::select! {
            _ = async { while round.join_next().await.is_some() {} } => {}
            _ = state.shutdown.cancelled() => return,
        }
    }
}

async fn deliver(state: AppState, platforms: Arc<Platforms>, pause: Arc<Mutex<i64>>, d: Delivery) {
    let now = state.clock.now_ms();
    let paused_until = *pause.lock().unwrap_or_else(|p| p.into_inner());
    if d.target.platform == Platform::Discord && paused_until > now {
        let update = DeliveryUpdate::Wait {
            at: paused_until,
            error: "Discord's global rate limit".into(),
        };
        record(&state, &d, update).await;
        return;
    }
    let update = match send(&state, &platforms, &d).await {
        Ok(message_id) => DeliveryUpdate::Sent { message_id },
        Err(DeliveryError::RetryAfter { after, global }) => {
            let at = now + after.as_millis() as i64;
            if global && d.target.platform == Platform::Discord {
                let mut p = pause.lock().unwrap_or_else(|p| p.into_inner());
                *p = (*p).max(at);
            }
            DeliveryUpdate::Wait {
                at,
                error: format!("rate limited for {} ms", after.as_millis()),
            }
        }
        Err(DeliveryError::Transient(e)) if d.attempts + 1 < MAX_ATTEMPTS => {
            DeliveryUpdate::Retry {
                at: now + backoff(d.attempts).as_millis() as i64,
                error: e,
            }
        }
        Err(DeliveryError::Transient(e)) | Err(DeliveryError::Permanent(e)) => {
            tracing::warn!(
                task_id = d.task.as_ref().map(|t| t.id.as_str()).unwrap_or("-"),
                delivery = d.id,
                error = %e,
                "Delivery given up."
            );
            DeliveryUpdate::Failed { error: e }
        }
    };
    record(&state, &d, update).await;
}

async fn record(state: &AppState, d: &Delivery, update: DeliveryUpdate) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &state.metrics;
    match &update {
        DeliveryUpdate::Sent { .. } => m.deliveries_sent.fetch_add(1, Relaxed),
        DeliveryUpdate::Retry { .. } | DeliveryUpdate::Wait { .. } => {
            m.delivery_retries.fetch_add(1, Relaxed)
        }
        DeliveryUpdate::Failed { .. } => m.delivery_failures.fetch_add(1, Relaxed),
        DeliveryUpdate::Parts { .. } => 0,
    };
    if let Err(e) = state.store.update_delivery(d.id, update).await {
        tracing::error!(delivery = d.id, error = %e, "Recording a delivery failed.");
    }
}

/// Sends one outbox row; returns the id of the (first) message sent.
async fn send(
    state: &AppState,
    platforms: &Platforms,
    d: &Delivery,
) -> Result<Option<String>, DeliveryError> {
    let limit = platforms.limit(d.target.platform);
    match d.kind {
        DeliveryKind::Progress | DeliveryKind::Edit => {
            let Some(task) = &d.task else {
                return Err(DeliveryError::Permanent("the task is gone".into()));
            };
            // A task that ended before its "working…" message went out (a chat outage, 429s)
            // needs none: the answer follows. Nothing about it is posted then.
            if task.state.is_terminal()
                && (d.kind == DeliveryKind::Progress || d.progress_message.is_none())
            {
                return Ok(None);
            }
            let recent = state
                .store
                .last_events(&task.id, PROGRESS_EVENTS)
                .await
                .map_err(|e| DeliveryError::Transient(format!("reading events: {e}")))?;
            let text = tunnel_delivery::render_progress(task, &recent, limit);
            if d.kind == DeliveryKind::Progress {
                let key = once_key(d, "p");
                return platforms
                    .post_once(&d.target, &text, key.as_deref())
                    .await
                    .map(|id| Some(id.0));
            }
            match &d.progress_message {
                Some(id) => {
                    let id = tunnel_delivery::MessageId(id.clone());
                    platforms.edit(&d.target, &id, &text).await.map(|()| None)
                }
                None => Err(DeliveryError::Permanent(
                    "the working message was never posted".into(),
                )),
            }
        }
        DeliveryKind::Final => {
            let Some(task) = &d.task else {
                return Err(DeliveryError::Permanent("the task is gone".into()));
            };
            let parts = tunnel_delivery::render_final(task, limit);
            send_parts(state, platforms, d, &parts).await
        }
        DeliveryKind::Notify => {
            let text = d
                .body
                .as_ref()
                .and_then(|b| b["text"].as_str())
                .unwrap_or_default();
            let parts = tunnel_delivery::split(text, limit);
            send_parts(state, platforms, d, &parts).await
        }
        DeliveryKind::Approval => {
            let Some(a) = &d.approval else {
                return Err(DeliveryError::Permanent(
                    "the approval request is gone".into(),
                ));
            };
            if a.state.is_final() {
                // Settled before the question went out (a chat outage): post the outcome.
                let text = tunnel_delivery::render_approval_settled(a, limit);
                return send_parts(state, platforms, d, &[text]).await;
            }
            let text = tunnel_delivery::render_approval(a, limit);
            send_parts(state, platforms, d, &[text]).await
        }
        DeliveryKind::ApprovalEdit => {
            let Some(a) = &d.approval else {
                return Err(DeliveryError::Permanent(
                    "the approval request is gone".into(),
                ));
            };
            let text = tunnel_delivery::render_approval_settled(a, limit);
            match &d.approval_message {
                Some(id) => {
                    let id = tunnel_delivery::MessageId(id.clone());
                    platforms.edit(&d.target, &id, &text).await.map(|()| None)
                }
                None => Err(DeliveryError::Permanent(
                    "the approval question was never posted".into(),
                )),
            }
        }
        DeliveryKind::Webhook => {
            let Some(task) = &d.task else {
                return Err(DeliveryError::Permanent("the task is gone".into()));
            };
            let payload = serde_json::json!({"event": "task.finished", "task": task});
            platforms
                .webhook(&d.target.channel, &payload)
                .await
                .map(|()| None)
        }
    }
}

/// Posts the parts not sent yet, recording each, so a retry or a restart resumes after the last
/// part that went out instead of repeating the message.
async fn send_parts(
    state: &AppState,
    platforms: &Platforms,
    d: &Delivery,
    parts: &[String],
) -> Result<Option<String>, DeliveryError> {
    let mut first = None;
    for (i, part) in parts.iter().enumerate().skip(d.done_parts as usize) {
        let key = once_key(d, &i.to_string());
        let id = platforms.post_once(&d.target, part, key.as_deref()).await?;
        if i == 0 {
            first = Some(id.0.clone());
        }
        if i + 1 < parts.len() {
            let update = DeliveryUpdate::Parts {
                done_parts: i as u32 + 1,
                message_id: first.clone(),
            };
            if let Err(e) = state.store.update_delivery(d.id, update).await {
                return Err(DeliveryError::Transient(format!("recording progress: {e}")));
            }
        }
    }
    Ok(first)
}

/// The key that makes a repeated send of one part of a task's message return the first one
/// (Discord's nonce, at most 25 characters): the outbox row and the part, plus the random end
/// of the task's id so that two servers with the same bot never share a key. `Notify` rows
/// have no task, so no key: a lost answer may repeat them rather than risk swallowing one.
fn once_key(d: &Delivery, part: &str) -> Option<String> {
    let task = d.task.as_ref()?;
    let tail: String = task.id.chars().filter(char::is_ascii_hexdigit).collect();
    let tail = &tail[tail.len().saturating_sub(8)..];
    Some(format!("{tail}.{}.{part}", d.id))
}

/// 1 s, 2 s, 4 s … capped at 5 minutes.
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(8)).min(Duration::from_secs(300))
}
