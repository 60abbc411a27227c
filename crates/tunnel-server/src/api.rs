//! The HTTP routes of API v1. Each handler validates its input, checks the caller's role
//! through its auth extractor, and calls the store.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use tokio::time::Instant;
use tower_http::catch_panic::CatchPanicLayer;
use tunnel_protocol::{
    AppendAck, AppendEvents, AttemptRef, ClaimRequest, CreateToken, CreatedToken, EventList,
    FinishRequest, Health, Heartbeat, IDEMPOTENCY_KEY_HEADER, LeaseStatus, Offer, ReportSessions,
    RunnerList, SessionBinding, SessionCommand, SessionList, SubmitTask, Task, TaskList, TaskState,
    TokenInfo, TokenList, limits,
};
use tunnel_store::{Handoff, Signals, StartAtClaim, TaskFilter};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{AdminAuth, ClientAuth, RunnerAuth};
use crate::error::{ApiError, Json, Path, Query};
use crate::hub::PendingHint;
use crate::{AppState, openapi};

pub(crate) fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(submit_task, list_tasks))
        .routes(routes!(get_task))
        .routes(routes!(cancel_task))
        .routes(routes!(task_events))
        .routes(routes!(task_progress))
        .routes(routes!(claim))
        .routes(routes!(ack))
        .routes(routes!(heartbeat))
        .routes(routes!(append_events))
        .routes(routes!(finish))
        .routes(routes!(crate::approvals::create_approval))
        .routes(routes!(crate::approvals::wait_approval))
        .routes(routes!(crate::approvals::list_approvals))
        .routes(routes!(
            crate::approvals::get_approval,
            crate::approvals::answer_approval
        ))
        .routes(routes!(list_runners))
        .routes(routes!(report_sessions))
        .routes(routes!(runner_goodbye))
        .routes(routes!(list_sessions))
        .routes(routes!(new_session))
        .routes(routes!(resume_session))
        .routes(routes!(create_token, list_tokens))
        .routes(routes!(revoke_token))
        .routes(routes!(notify))
        .routes(routes!(metrics))
        .routes(routes!(healthz))
        .routes(routes!(health))
        .routes(routes!(readyz))
}

pub(crate) fn router(state: AppState, max_body_bytes: usize) -> Router {
    let (router, _) = api_routes().split_for_parts();
    router
        .route("/openapi.json", get(openapi_route))
        .route(
            "/acp",
            get(crate::acp::acp)
                .post(crate::acp::post)
                .delete(crate::acp::delete),
        )
        .merge(crate::compat::router())
        .merge(crate::web::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

async fn openapi_route() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        crate::openapi::openapi_json(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send>) -> Response {
    tracing::error!("A request handler panicked.");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
    .into_response()
}

/// Task ids are UUIDs; anything else is a client mistake, not a missing task.
pub(crate) fn check_task_id(id: &str) -> Result<(), ApiError> {
    let ok = id.len() == 36
        && id.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("{id:?} is not a task id")))
    }
}

pub(crate) fn wait_budget(state: &AppState, ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms.min(state.max_wait_ms))
}

// ---------------------------------------------------------------------------------------------
// Tasks (client)

/// Submit a task.
///
/// With an `Idempotency-Key` header already used by this token, the first task is returned
/// (200) instead of creating another (201).
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks",
    params(("Idempotency-Key" = Option<String>, Header, description = "makes a retried submit return the first task")),
    request_body = SubmitTask,
    responses((status = 201, body = Task), (status = 200, description = "replayed", body = Task),
        (status = 400, body = tunnel_protocol::ErrorBody),
        (status = 404, description = "resume of a session another client's task made", body = tunnel_protocol::ErrorBody),
        (status = 429, description = "the token has as many tasks waiting as it may (max_queued_per_token)", body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["client"])))]
async fn submit_task(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
    headers: HeaderMap,
    Json(req): Json<SubmitTask>,
) -> Result<Response, ApiError> {
    // The server's own share of a dispatch is measured from here (docs/BENCHMARKS.md).
    let received = std::time::Instant::now();
    req.validate()?;
    if let Some(to) = &req.reply_to
        && !s.platforms.supports(to)
    {
        return Err(ApiError::bad_request(unsupported(to)));
    }
    let key = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= limits::IDEMPOTENCY_KEY_MAX)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "Idempotency-Key must be 1 to {} visible ASCII characters",
                        limits::IDEMPOTENCY_KEY_MAX
                    ))
                })?;
            Some(k.to_owned())
        }
    };
    let (task, created) = s.store.submit(&caller.token_id, key, req).await?;
    if created {
        s.metrics
            .submitted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let took_us = received.elapsed().as_micros() as u64;
        tracing::info!(task_id = %task.id, agent = %task.agent, took_us, "Task submitted.");
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(task)).into_response())
}

fn unsupported(to: &tunnel_protocol::ReplyTo) -> String {
    match to.platform {
        tunnel_protocol::Platform::Discord => {
            "reply_to: this server has no Discord bot; set CALLBACK_BOT_TOKEN".into()
        }
        tunnel_protocol::Platform::Telegram => {
            "reply_to: this server has no Telegram bot; set TELEGRAM_BOT_TOKEN".into()
        }
        tunnel_protocol::Platform::Webhook => format!(
            "reply_to: no webhook named {:?}; set TUNNEL_WEBHOOK_<NAME>_URL and _SECRET",
            to.channel
        ),
    }
}

/// The original's `POST /notify`: send a message to a chat channel (Discord by default).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NotifyRequest {
    channel: String,
    message: String,
    /// `discord` (default) or `telegram`.
    #[serde(default)]
    platform: Option<tunnel_protocol::Platform>,
    #[serde(default)]
    thread: Option<String>,
}

/// Send a message to a channel through the outbox (retried, rate limited, never pings).
#[utoipa::path(post, path = "/notify", tag = "delivery", request_body = NotifyRequest,
    responses((status = 200, description = "queued for delivery")),
    security(("bearer" = ["client"])))]
async fn notify(
    State(s): State<AppState>,
    ClientAuth(_): ClientAuth,
    Json(req): Json<NotifyRequest>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let to = tunnel_protocol::ReplyTo {
        platform: req.platform.unwrap_or(tunnel_protocol::Platform::Discord),
        channel: req.channel,
        thread: req.thread,
        message: None,
    };
    let mut check = SubmitTask::new("notify", "x");
    check.reply_to = Some(to.clone());
    check.validate()?;
    if req.message.trim().is_empty() || req.message.len() > 64 * 1024 {
        return Err(ApiError::bad_request("message must be 1 byte to 64 KiB"));
    }
    if to.platform == tunnel_protocol::Platform::Webhook || !s.platforms.supports(&to) {
        return Err(ApiError::bad_request(unsupported(&to)));
    }
    let id = s.store.notify(to, req.message).await?;
    Ok(axum::Json(serde_json::json!({"ok": true, "queued": id})))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only tasks in this state.
    state: Option<String>,
    conversation: Option<String>,
    agent: Option<String>,
    /// At most this many (default 50, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// List tasks, newest first. A client token sees the tasks it submitted; admin sees all.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", params(ListQuery),
    responses((status = 200, body = TaskList)), security(("bearer" = ["client"])))]
async fn list_tasks(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<TaskList>, ApiError> {
    let state = match &q.state {
        None => None,
        Some(st) => Some(TaskState::parse(st).ok_or_else(|| {
            let all: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::bad_request(format!("state {st:?} is not one of {}", all.join(", ")))
        })?),
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    let filter = TaskFilter {
        state,
        conversation: q.conversation,
        agent: q.agent,
        limit,
        ..Default::default()
    };
    let tasks = s.store.tasks(filter, &caller.scope()).await?;
    Ok(axum::Json(TaskList { tasks }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// Seconds to wait for the task to end before answering (at most 60).
    #[param(minimum = 0)]
    wait: Option<f64>,
}

/// Get a task; with `?wait=`, answer when it ends or the wait runs out.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "task id"), WaitQuery),
    responses((status = 200, body = Task), (status = 404, body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["client"])))]
async fn get_task(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<axum::Json<Task>, ApiError> {
    check_task_id(&id)?;
    let wait_ms = match q.wait {
        None => 0,
        Some(w) if w.is_finite() && w >= 0.0 => (w * 1000.0) as u64,
        Some(_) => {
            return Err(ApiError::bad_request(
                "wait must be a number of seconds >= 0",
            ));
        }
    };
    let scope = caller.scope();
    let deadline = wait_budget(&s, wait_ms);
    let notify = s.hub.watch(&id);
    loop {
        let changed = notify.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let task = s.store.task(&id, &scope).await?;
        if task.state.is_terminal() || Instant::now() >= deadline {
            return Ok(axum::Json(task));
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = s.shutdown.cancelled() => return Ok(axum::Json(task)),
        }
    }
}

/// Cancel a task: at once if it has not started, else on the runner's next heartbeat.
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses((status = 200, body = Task), (status = 409, description = "already ended", body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["client"])))]
async fn cancel_task(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
    Path(id): Path<String>,
) -> Result<axum::Json<Task>, ApiError> {
    check_task_id(&id)?;
    let task = s.store.cancel(&id, &caller.scope()).await?;
    tracing::info!(task_id = %task.id, state = %task.state, "Cancel requested.");
    Ok(axum::Json(task))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ProgressQuery {
    /// The longest text the chat takes, in UTF-16 units (200 to 4096; default 4096).
    #[param(minimum = 200, maximum = 4096)]
    limit: Option<u32>,
}

/// A task's progress message as a chat shows it (the text server delivery posts and edits).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct TaskProgress {
    state: TaskState,
    /// `⏳ claude · working… 12s` and the last tool uses while it runs; one line with the
    /// outcome once it ended.
    text: String,
}

/// Events a progress text is rendered from (as server delivery does).
const PROGRESS_EVENTS: u32 = 40;

/// The task's live progress as one chat message (for chat front ends that deliver answers
/// themselves, like the OpenClaw plugin), rendered the way server delivery renders it.
#[utoipa::path(get, path = "/v1/tasks/{id}/progress", tag = "tasks",
    params(("id" = String, Path, description = "task id"), ProgressQuery),
    responses((status = 200, body = TaskProgress), (status = 404, body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["client"])))]
async fn task_progress(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
    Path(id): Path<String>,
    Query(q): Query<ProgressQuery>,
) -> Result<axum::Json<TaskProgress>, ApiError> {
    check_task_id(&id)?;
    let limit = match q.limit {
        None => tunnel_delivery::TELEGRAM_LIMIT,
        Some(l @ 200..=4096) => l as usize,
        Some(_) => return Err(ApiError::bad_request("limit must be between 200 and 4096")),
    };
    // The owner check comes first: another token's task is a 404 before any event is read.
    let task = s.store.task(&id, &caller.scope()).await?;
    let recent = s.store.last_events(&id, PROGRESS_EVENTS).await?;
    let text = tunnel_delivery::render_progress(&task, &recent, limit);
    Ok(axum::Json(TaskProgress {
        state: task.state,
        text,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Only events after this sequence number (like the `Last-Event-ID` header).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// `sse` (default): a live stream that ends when the task ends; `json`: the log so far.
    format: Option<String>,
}

/// The task's event log: a live Server-Sent Events stream (resumable with `Last-Event-ID`),
/// or with `?format=json` the events so far.
#[utoipa::path(get, path = "/v1/tasks/{id}/events", tag = "tasks",
    params(("id" = String, Path, description = "task id"), EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "resume after this event")),
    responses((status = 200, description = "a text/event-stream of TaskEvent (each `data:` is one TaskEvent as JSON), or with ?format=json an EventList",
        content((EventList = "application/json"), (SseEvent = "text/event-stream")))),
    security(("bearer" = ["client"])))]
async fn task_events(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_task_id(&id)?;
    let header_after = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("Last-Event-ID must be an event seq number")
                })?,
        ),
    };
    let query_after = match q.after {
        Some(a) => Some(
            u64::try_from(a).map_err(|_| ApiError::bad_request("after must be a seq number"))?,
        ),
        None => None,
    };
    let after = header_after.or(query_after).unwrap_or(0);
    let scope = caller.scope();
    match q.format.as_deref() {
        Some("json") => {
            let (state, last) = s.store.event_log_end(&id, &scope).await?;
            return Ok(json_event_log(s, id, scope, after, state, last));
        }
        None | Some("sse") => {}
        Some(f) => {
            return Err(ApiError::bad_request(format!(
                "format {f:?} is not sse or json"
            )));
        }
    }
    // Fail before the stream starts if the task does not exist or is not the caller's.
    s.store.events(&id, &scope, after, 1).await?;
    let stream = event_stream(s, id, scope, after);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// `?format=json`: an [`EventList`] written a page at a time, so a read of a large log holds
/// one page in memory. The events are those up to `last`, the last one when `state` was read.
fn json_event_log(
    s: AppState,
    id: String,
    scope: tunnel_store::Scope,
    after: u64,
    state: TaskState,
    last: u64,
) -> Response {
    enum Part {
        Head,
        Events { after: u64, first: bool },
        Done,
    }
    let head = format!(
        "{{\"state\":{},\"events\":[",
        serde_json::to_string(&state).unwrap_or_else(|_| "null".into())
    );
    let body = stream::unfold(Part::Head, move |part| {
        let (s, id, scope, head) = (s.clone(), id.clone(), scope.clone(), head.clone());
        async move {
            match part {
                Part::Head => Some((
                    Ok::<_, std::io::Error>(axum::body::Bytes::from(head)),
                    Part::Events { after, first: true },
                )),
                Part::Events { after, mut first } => {
                    let page = if after >= last {
                        Vec::new()
                    } else {
                        match s.store.events(&id, &scope, after, 500).await {
                            Ok((events, _)) => events,
                            Err(e) => {
                                // The status is sent: all that is left is to cut the answer
                                // short, which the reader sees as invalid JSON.
                                tracing::warn!(task_id = %id, error = %e, "Event log read failed mid-answer.");
                                return Some((
                                    Err(std::io::Error::other("event log read failed")),
                                    Part::Done,
                                ));
                            }
                        }
                    };
                    let page: Vec<_> = page.into_iter().take_while(|e| e.seq <= last).collect();
                    let Some(next) = page.last().map(|e| e.seq) else {
                        return Some((Ok(axum::body::Bytes::from_static(b"]}")), Part::Done));
                    };
                    let mut out = Vec::new();
                    for e in &page {
                        if !first {
                            out.push(b',');
                        }
                        first = false;
                        let _ = serde_json::to_writer(&mut out, e);
                    }
                    Some((Ok(out.into()), Part::Events { after: next, first }))
                }
                Part::Done => None,
            }
        }
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// One Server-Sent Event of `GET /v1/tasks/{id}/events` (for the OpenAPI document).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct SseEvent {
    /// The event's `seq` (absent on an `error` event).
    id: Option<String>,
    /// The event's `kind` (`state`, `text`, …), or `error` when the log cannot be read.
    event: String,
    /// The `TaskEvent` as JSON (a message on an `error` event).
    data: String,
}

struct StreamState {
    s: AppState,
    id: String,
    scope: tunnel_store::Scope,
    after: u64,
    buffer: std::collections::VecDeque<tunnel_protocol::TaskEvent>,
    done: bool,
}

fn event_stream(
    s: AppState,
    id: String,
    scope: tunnel_store::Scope,
    after: u64,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let init = StreamState {
        s,
        id,
        scope,
        after,
        buffer: Default::default(),
        done: false,
    };
    stream::unfold(init, |mut st| async move {
        loop {
            if let Some(e) = st.buffer.pop_front() {
                st.after = e.seq;
                let ev = Event::default()
                    .id(e.seq.to_string())
                    .event(e.kind.clone())
                    .json_data(&e)
                    .unwrap_or_else(|_| Event::default().comment("unserialisable event"));
                return Some((Ok(ev), st));
            }
            if st.done {
                return None;
            }
            let notify = st.s.hub.watch(&st.id);
            let changed = notify.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match st.s.store.events(&st.id, &st.scope, st.after, 500).await {
                Ok((events, state)) if events.is_empty() => {
                    if state.is_terminal() {
                        return None;
                    }
                }
                Ok((events, _)) => {
                    st.buffer.extend(events);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(task_id = %st.id, error = %e, "Event stream read failed.");
                    st.done = true;
                    return Some((
                        Ok(Event::default()
                            .event("error")
                            .data("the event log could not be read")),
                        st,
                    ));
                }
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = st.s.shutdown.cancelled() => return None,
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Runner protocol

/// Long-poll for work. Answers 200 with an offer as soon as a task this runner can take is
/// ready, or 204 when `wait_ms` runs out. Ack the offer before `ack_by`.
#[utoipa::path(post, path = "/v1/claim", tag = "runner", request_body = ClaimRequest,
    responses((status = 200, body = Offer), (status = 204, description = "nothing to do"),
        (status = 409, description = "the runner name belongs to another runner token", body = tunnel_protocol::ErrorBody),
        (status = 429, description = "this token already has the most long-polls parked that the server allows", body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["runner"])))]
async fn claim(
    State(s): State<AppState>,
    RunnerAuth(caller): RunnerAuth,
    Json(req): Json<ClaimRequest>,
) -> Result<Response, ApiError> {
    req.validate()?;
    // The compat API names each original runner `openclaw.<token id>`: not another's to take.
    if req.runner.starts_with("openclaw.") {
        return Err(ApiError::bad_request(
            "runner: names starting with \"openclaw.\" are the original runners' (compat API)",
        ));
    }
    // Parked polls are never closed to make room for new connections, so one token may not
    // hold many of them.
    let _counted = s.poll_slot(&caller.token_id).ok_or_else(|| {
        tracing::warn!(token_id = %caller.token_id, max = s.max_polls_per_token, "Too many long-polls parked by one token; refused one.");
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_polls",
            format!(
                "this token already has {} long-polls parked, the most the server allows \
                 (max_polls_per_token); a runner needs one at a time, so another runner may be \
                 using the same token",
                s.max_polls_per_token
            ),
        )
    })?;
    let deadline = wait_budget(&s, req.wait_ms);
    let mut pending = PendingHint {
        hub: s.hub.clone(),
        hint: None,
    };
    let req = Arc::new(req);
    let token: Arc<str> = caller.token_id.as_str().into();
    loop {
        // Register before looking, so a task that becomes ready in between still wakes us.
        let mut slot = s.hub.wait_slot(&req);
        // Boxed: the store's future is large (the PostgreSQL one most), and an unboxed one
        // would be part of every parked poll's future while it waits.
        let offer = if req.ack {
            Box::pin(
                s.store
                    .claim_and_start(&req, &caller.token_id, ACK_IN_CLAIM),
            )
            .await?
            .map(|started| Box::new(started.offer))
        } else {
            Box::pin(s.store.claim_as(&req, &caller.token_id))
                .await?
                .map(Box::new)
        };
        if let Some(offer) = offer {
            drop(slot);
            pending.settle(Some(&offer.task.id));
            return Ok(offered(&s, &caller.token_id, &req, *offer));
        }
        pending.hint = None;
        // From here a write that makes a task ready for it claims for it (SQLite).
        slot.arm(&token, req.ack.then_some(ACK_IN_CLAIM));
        let woken = tokio::select! {
            h = slot.woken() => Some(h),
            _ = tokio::time::sleep_until(deadline) => None,
            _ = s.shutdown.cancelled() => None,
        };
        // Out of time: a claim being made for it right now still comes.
        let woken = match woken {
            Some(h) => h,
            None => match slot.close().await {
                Some(Handoff::Ready(hint)) => {
                    s.hub.task_ready(&hint);
                    return Ok(StatusCode::NO_CONTENT.into_response());
                }
                Some(h) => h,
                None => return Ok(StatusCode::NO_CONTENT.into_response()),
            },
        };
        match woken {
            Handoff::Ready(hint) => pending.hint = Some(hint),
            Handoff::Offered(offer) => {
                return Ok(offered(&s, &caller.token_id, &req, *offer));
            }
            Handoff::Failed(e) => return Err(e.into()),
            Handoff::Started(started) => {
                return Ok(offered(&s, &caller.token_id, &req, started.offer));
            }
        }
    }
}

/// A claim with `ack` (`ClaimRequest::ack`) acks its offer in the write that makes it, with the
/// configured lease. The store keeps the attempt unconfirmed until its runner makes a call
/// about it, and offers it again to the runner's next claim with `ack` meanwhile.
const ACK_IN_CLAIM: StartAtClaim = StartAtClaim {
    refuse: |_| None,
    lease_ms: None,
    wanted_session: |_| None,
    confirm: false,
};

/// A claim's answer: the offer (already acked when the claim asked).
fn offered(s: &AppState, token_id: &str, req: &ClaimRequest, offer: Offer) -> Response {
    // The store gives an attempt an earlier claim with `ack` started, and this runner has not
    // confirmed, first: the answer that brought it may have been lost (with the connection, or
    // with a server that died before sending it). It is answered as it is, started.
    if offer.task.state != TaskState::Offered {
        tracing::info!(task_id = %offer.task.id, runner = %req.runner, attempt = offer.attempt, "Task offered again: the answer that started it was not confirmed.");
        return axum::Json(offer).into_response();
    }
    s.metrics
        .dispatched(s.clock.now_ms() - offer.task.created_at);
    tracing::info!(task_id = %offer.task.id, runner = %req.runner, token_id = %token_id, attempt = offer.attempt, "Task offered.");
    axum::Json(offer).into_response()
}

/// Ack an offer: the attempt starts and its lease with it.
#[utoipa::path(post, path = "/v1/tasks/{id}/ack", tag = "runner",
    params(("id" = String, Path, description = "task id")), request_body = AttemptRef,
    responses((status = 200, body = LeaseStatus), (status = 409, description = "stale attempt", body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["runner"])))]
async fn ack(
    State(s): State<AppState>,
    RunnerAuth(_): RunnerAuth,
    Path(id): Path<String>,
    Json(req): Json<AttemptRef>,
) -> Result<axum::Json<LeaseStatus>, ApiError> {
    check_task_id(&id)?;
    let lease = s.store.ack(&id, &req).await?;
    Ok(axum::Json(lease))
}

/// Renew the lease. The answer says whether cancel was asked; with `wait_ms` it is held until
/// cancel is asked or the wait (at most half a lease) runs out, so cancel arrives at once.
#[utoipa::path(post, path = "/v1/tasks/{id}/heartbeat", tag = "runner",
    params(("id" = String, Path, description = "task id")), request_body = Heartbeat,
    responses((status = 200, body = LeaseStatus), (status = 409, description = "stale attempt", body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["runner"])))]
async fn heartbeat(
    State(s): State<AppState>,
    RunnerAuth(_): RunnerAuth,
    Path(id): Path<String>,
    Json(req): Json<Heartbeat>,
) -> Result<axum::Json<LeaseStatus>, ApiError> {
    check_task_id(&id)?;
    let at = req.attempt_ref();
    let status = s.store.heartbeat(&id, &at).await?;
    if status.cancel || req.wait_ms == 0 {
        return Ok(axum::Json(status));
    }
    let wait = req.wait_ms.min((status.lease_ms / 2).max(0) as u64);
    let deadline = wait_budget(&s, wait);
    let notify = s.hub.watch(&id);
    loop {
        let changed = notify.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let task = s.store.task(&id, &tunnel_store::Scope::All).await?;
        if task.state != TaskState::Running || task.attempt != req.attempt {
            // Cancel asked (or the attempt ended some other way): let the store say which.
            return Ok(axum::Json(s.store.heartbeat(&id, &at).await?));
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(axum::Json(status)),
            _ = s.shutdown.cancelled() => return Ok(axum::Json(status)),
        }
    }
}

/// Append events of the running attempt. Resending an event with the same `n` is harmless.
#[utoipa::path(post, path = "/v1/tasks/{id}/events", tag = "runner",
    params(("id" = String, Path, description = "task id")), request_body = AppendEvents,
    responses((status = 200, body = AppendAck), (status = 409, description = "stale attempt", body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["runner"])))]
async fn append_events(
    State(s): State<AppState>,
    RunnerAuth(_): RunnerAuth,
    Path(id): Path<String>,
    Json(req): Json<AppendEvents>,
) -> Result<axum::Json<AppendAck>, ApiError> {
    check_task_id(&id)?;
    req.validate()?;
    let ack = s.store.append_events(&id, req).await?;
    Ok(axum::Json(ack))
}

/// End the attempt with its outcome and result, after storing the last `events` it carries
/// (as an append would: one request instead of two, and a repeated finish stores none twice).
#[utoipa::path(post, path = "/v1/tasks/{id}/finish", tag = "runner",
    params(("id" = String, Path, description = "task id")), request_body = FinishRequest,
    responses((status = 200, body = Task), (status = 409, description = "stale attempt", body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["runner"])))]
async fn finish(
    State(s): State<AppState>,
    RunnerAuth(_): RunnerAuth,
    Path(id): Path<String>,
    Json(mut req): Json<FinishRequest>,
) -> Result<axum::Json<Task>, ApiError> {
    check_task_id(&id)?;
    req.validate()?;
    if !req.events.is_empty() {
        let append = AppendEvents {
            attempt: req.attempt,
            lease_token: req.lease_token.clone(),
            events: std::mem::take(&mut req.events),
        };
        match s.store.append_events(&id, append).await {
            Ok(_) => {}
            // The attempt has ended: this is a repeated finish (its events went in with the
            // first one) or a stale one; the finish answers which.
            Err(tunnel_store::StoreError::Stale(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let task = s.store.finish(&id, req).await?;
    s.metrics
        .finished_by_runner
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(task_id = %task.id, state = %task.state, "Task attempt finished.");
    Ok(axum::Json(task))
}

// ---------------------------------------------------------------------------------------------
// Runners and sessions (client)

/// Runners seen: agents, projects, capacity, last seen, and whether they are online.
#[utoipa::path(get, path = "/v1/runners", tag = "runners",
    responses((status = 200, body = RunnerList)), security(("bearer" = ["client"])))]
async fn list_runners(
    State(s): State<AppState>,
    ClientAuth(_): ClientAuth,
) -> Result<axum::Json<RunnerList>, ApiError> {
    Ok(axum::Json(RunnerList {
        runners: s.store.runners().await?,
    }))
}

/// A runner stopping cleanly says goodbye: it is offline at once (`tunnel runners`, and
/// `submit` warns that nobody will take the task) instead of after the online window. Only
/// the token the name belongs to (the first to claim under it) may say it (403 otherwise);
/// the next claim brings the runner back online.
#[utoipa::path(post, path = "/v1/runners/{name}/goodbye", tag = "runner",
    params(("name" = String, Path, description = "runner name")),
    responses((status = 204, description = "offline now"),
        (status = 403, description = "the name was not claimed with this token", body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["runner"])))]
async fn runner_goodbye(
    State(s): State<AppState>,
    RunnerAuth(caller): RunnerAuth,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    tunnel_protocol::validate_name("runner", &name)?;
    // An unknown name is refused like another token's: the answer does not tell which.
    if !s.store.runner_left(&name, &caller.token_id).await? {
        return Err(ApiError::forbidden(format!(
            "runner {name} has not claimed tasks with this token"
        )));
    }
    tracing::info!(runner = %name, token_id = %caller.token_id, "Runner said goodbye.");
    Ok(StatusCode::NO_CONTENT)
}

/// A runner reports the sessions it found in its agents' own session stores, so `recent`
/// lists sessions started outside tunnel too.
#[utoipa::path(post, path = "/v1/runners/{name}/sessions", tag = "runner",
    params(("name" = String, Path, description = "runner name")), request_body = ReportSessions,
    responses((status = 204, description = "recorded")), security(("bearer" = ["runner"])))]
async fn report_sessions(
    State(s): State<AppState>,
    RunnerAuth(_): RunnerAuth,
    Path(name): Path<String>,
    Json(req): Json<ReportSessions>,
) -> Result<StatusCode, ApiError> {
    tunnel_protocol::validate_name("runner", &name)?;
    req.validate()?;
    s.store.report_sessions(&name, req.sessions).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SessionQuery {
    conversation: Option<String>,
    agent: Option<String>,
    /// At most this many of each list (default 20, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// Session bindings (conversation × agent → native session, runner) and recent sessions.
/// Conversation names are scoped by owner: a client token sees the conversations of its own
/// namespace; an admin sees those of the admin tokens' shared namespace and every client's,
/// the latter with `owner`. Recent sessions: a client's own and the shared ones (made by an
/// admin, or found on a runner's disk).
#[utoipa::path(get, path = "/v1/sessions", tag = "sessions", params(SessionQuery),
    responses((status = 200, body = SessionList)), security(("bearer" = ["client"])))]
async fn list_sessions(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
    Query(q): Query<SessionQuery>,
) -> Result<axum::Json<SessionList>, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    Ok(axum::Json(
        s.store
            .sessions(q.conversation, q.agent, limit, &caller.scope())
            .await?,
    ))
}

/// Start fresh: the conversation's next task starts a new agent session. The conversation is
/// the caller's own (a client token's namespace, or the admin tokens' shared one): the same
/// name of another token is never touched.
#[utoipa::path(post, path = "/v1/sessions/new", tag = "sessions", request_body = SessionCommand,
    responses((status = 200, body = SessionBinding), (status = 404, body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["client"])))]
async fn new_session(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
    Json(cmd): Json<SessionCommand>,
) -> Result<axum::Json<SessionBinding>, ApiError> {
    cmd.validate(false)?;
    Ok(axum::Json(
        s.store.bind_session(cmd, &caller.scope()).await?,
    ))
}

/// Bind the caller's own conversation to an existing native session id. A client cannot take
/// a session another client's task made (404).
#[utoipa::path(post, path = "/v1/sessions/resume", tag = "sessions", request_body = SessionCommand,
    responses((status = 200, body = SessionBinding), (status = 404, body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["client"])))]
async fn resume_session(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
    Json(cmd): Json<SessionCommand>,
) -> Result<axum::Json<SessionBinding>, ApiError> {
    cmd.validate(true)?;
    Ok(axum::Json(
        s.store.bind_session(cmd, &caller.scope()).await?,
    ))
}

// ---------------------------------------------------------------------------------------------
// Tokens (admin)

/// Create a token. Its secret is in this answer only.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses((status = 201, body = CreatedToken)), security(("bearer" = ["admin"])))]
async fn create_token(
    State(s): State<AppState>,
    AdminAuth(caller): AdminAuth,
    Json(req): Json<CreateToken>,
) -> Result<(StatusCode, axum::Json<CreatedToken>), ApiError> {
    req.validate()?;
    let created = s.auth.create(&s.store, req.name, req.role).await?;
    tracing::info!(token_id = %created.info.id, role = %created.info.role, by = %caller.token_id, "Token created.");
    Ok((StatusCode::CREATED, axum::Json(created)))
}

/// List tokens (never their secrets).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, body = TokenList)), security(("bearer" = ["admin"])))]
async fn list_tokens(
    State(s): State<AppState>,
    AdminAuth(_): AdminAuth,
) -> Result<axum::Json<TokenList>, ApiError> {
    let tokens = s
        .store
        .tokens()
        .await?
        .into_iter()
        .map(|t| t.info)
        .collect();
    Ok(axum::Json(TokenList { tokens }))
}

/// Revoke a token; it stops working at once.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "token id")),
    responses((status = 200, body = TokenInfo)), security(("bearer" = ["admin"])))]
async fn revoke_token(
    State(s): State<AppState>,
    AdminAuth(caller): AdminAuth,
    Path(id): Path<String>,
) -> Result<axum::Json<TokenInfo>, ApiError> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(ApiError::bad_request(format!("{id:?} is not a token id")));
    }
    let info = s.auth.revoke(&s.store, &id).await?;
    tracing::info!(token_id = %info.id, by = %caller.token_id, "Token revoked.");
    Ok(axum::Json(info))
}

// ---------------------------------------------------------------------------------------------
// Health

/// Liveness: the process answers. Reveals nothing else.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
async fn healthz() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
    })
}

/// Prometheus metrics: tasks by state, dispatch latency, parked long-polls, runners online,
/// deliveries. Names are specified in ARCHITECTURE.md.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(s): State<AppState>) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let counts = s.store.counts().await?;
    let db_ms = started.elapsed().as_secs_f64() * 1000.0;
    let online = s.store.runners().await?.iter().filter(|r| r.online).count();
    let mut text = s
        .metrics
        .render(&counts.by_state, s.hub.parked(), online, db_ms);
    s.connections.render(&mut text);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response())
}

/// The original's liveness route (openclaw-tunnel's Docker healthcheck and plugin use it).
/// Unlike the original, it reveals no paths or counts.
#[utoipa::path(get, path = "/health", tag = "health", responses((status = 200, body = Health)))]
async fn health() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: the database answers.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = Health), (status = 503, body = tunnel_protocol::ErrorBody)))]
async fn readyz(State(s): State<AppState>) -> Result<axum::Json<Health>, ApiError> {
    if s.shutdown.is_cancelled() {
        return Err(ApiError::unavailable("shutting down"));
    }
    s.store
        .counts()
        .await
        .map_err(|_| ApiError::unavailable("the database does not answer"))?;
    Ok(axum::Json(Health {
        status: "ready".into(),
    }))
}
