//! The routes of approvals: a runner's agent asks (`POST /v1/tasks/{id}/approvals`) and waits
//! (`…/{aid}/wait`, a long-poll on the task's notifier); the task's owner or an admin lists
//! (`GET /v1/approvals`) and answers (`POST /v1/approvals/{aid}`). The store decides; the
//! deadline timer expires what nobody answered.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::time::Instant;
use tunnel_protocol::{
    Approval, ApprovalAnswer, ApprovalList, ApprovalRequest, ApprovalState, ApprovalWait,
    AttemptRef, is_approval_id,
};
use tunnel_store::ApprovalFilter;
use utoipa::IntoParams;

use crate::AppState;
use crate::api::{check_task_id, wait_budget};
use crate::auth::{ClientAuth, RunnerAuth};
use crate::error::{ApiError, Json, Path, Query};

fn check_approval_id(id: &str) -> Result<(), ApiError> {
    if is_approval_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{id:?} is not an approval id (apr_…)"
        )))
    }
}

/// The agent of the running attempt asks before it acts. Fenced like every runner call. The
/// same `key` again in this attempt returns the first request (200) instead of a new one (201).
#[utoipa::path(post, path = "/v1/tasks/{id}/approvals", tag = "approvals",
    params(("id" = String, Path, description = "task id")), request_body = ApprovalRequest,
    responses((status = 201, body = Approval), (status = 200, description = "asked before with this key", body = Approval),
        (status = 404, description = "no such task", body = tunnel_protocol::ErrorBody),
        (status = 409, description = "stale attempt, task not running, or too many requests waiting", body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["runner"])))]
pub(crate) async fn create_approval(
    State(s): State<AppState>,
    RunnerAuth(caller): RunnerAuth,
    Path(id): Path<String>,
    Json(req): Json<ApprovalRequest>,
) -> Result<Response, ApiError> {
    check_task_id(&id)?;
    req.validate()?;
    let (approval, created) = s.store.create_approval(&id, req).await?;
    if !created {
        return Ok((StatusCode::OK, axum::Json(approval)).into_response());
    }
    tracing::info!(task_id = %id, approval_id = %approval.id, kind = %approval.tool.kind,
        token_id = %caller.token_id, "Approval requested.");
    Ok((StatusCode::CREATED, axum::Json(approval)).into_response())
}

/// Wait for the answer: at once when the request is settled, else held up to `wait_ms` (at
/// most half a lease) and answered within milliseconds of the answer, the expiry or a cancel.
/// A request still pending when the wait runs out comes back `pending`: ask again.
#[utoipa::path(post, path = "/v1/tasks/{id}/approvals/{aid}/wait", tag = "approvals",
    params(("id" = String, Path, description = "task id"), ("aid" = String, Path, description = "approval id")),
    request_body = ApprovalWait,
    responses((status = 200, body = Approval),
        (status = 404, description = "no such task, or no such request of this attempt", body = tunnel_protocol::ErrorBody),
        (status = 409, description = "stale attempt", body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["runner"])))]
pub(crate) async fn wait_approval(
    State(s): State<AppState>,
    RunnerAuth(_): RunnerAuth,
    Path((id, aid)): Path<(String, String)>,
    Json(req): Json<ApprovalWait>,
) -> Result<axum::Json<Approval>, ApiError> {
    check_task_id(&id)?;
    check_approval_id(&aid)?;
    let at = AttemptRef {
        attempt: req.attempt,
        lease_token: req.lease_token,
    };
    // Held no longer than a heartbeat is, so the runner's other calls keep their rhythm.
    let deadline = wait_budget(&s, req.wait_ms.min((s.lease_ms / 2).max(0) as u64));
    let notify = s.hub.watch(&id);
    loop {
        // Registered before reading, so an answer committed in between still wakes us.
        let changed = notify.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let approval = s.store.runner_approval(&id, &aid, &at).await?;
        if approval.state.is_final() || Instant::now() >= deadline {
            return Ok(axum::Json(approval));
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = s.shutdown.cancelled() => return Ok(axum::Json(approval)),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApprovalQuery {
    /// Only requests in this state (`pending`, `allowed`, `denied`, `expired`, `cancelled`).
    state: Option<String>,
    /// Only this task's requests.
    task: Option<String>,
    /// At most this many (default 50, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// Approval requests, newest first. A client token sees its own tasks' requests; admin sees all.
#[utoipa::path(get, path = "/v1/approvals", tag = "approvals", params(ApprovalQuery),
    responses((status = 200, body = ApprovalList)), security(("bearer" = ["client"])))]
pub(crate) async fn list_approvals(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
    Query(q): Query<ApprovalQuery>,
) -> Result<axum::Json<ApprovalList>, ApiError> {
    let state = match &q.state {
        None => None,
        Some(st) => Some(ApprovalState::parse(st).ok_or_else(|| {
            let all: Vec<&str> = ApprovalState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::bad_request(format!("state {st:?} is not one of {}", all.join(", ")))
        })?),
    };
    if let Some(t) = &q.task {
        check_task_id(t)?;
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    let filter = ApprovalFilter {
        state,
        task: q.task,
        limit,
    };
    let approvals = s.store.approvals(filter, &caller.scope()).await?;
    Ok(axum::Json(ApprovalList { approvals }))
}

/// One approval request (another client's is 404).
#[utoipa::path(get, path = "/v1/approvals/{aid}", tag = "approvals",
    params(("aid" = String, Path, description = "approval id")),
    responses((status = 200, body = Approval), (status = 404, body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["client"])))]
pub(crate) async fn get_approval(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
    Path(aid): Path<String>,
) -> Result<axum::Json<Approval>, ApiError> {
    check_approval_id(&aid)?;
    Ok(axum::Json(s.store.approval(&aid, &caller.scope()).await?))
}

/// Answer a pending request: allow once, allow for the session, or deny (with a message for
/// the agent). Only the task's owner or an admin; the runner waiting learns it at once.
#[utoipa::path(post, path = "/v1/approvals/{aid}", tag = "approvals",
    params(("aid" = String, Path, description = "approval id")), request_body = ApprovalAnswer,
    responses((status = 200, body = Approval),
        (status = 404, description = "no such request (or not yours)", body = tunnel_protocol::ErrorBody),
        (status = 409, description = "already decided (`already_decided`) or expired (`approval_expired`)", body = tunnel_protocol::ErrorBody)),
    security(("bearer" = ["client"])))]
pub(crate) async fn answer_approval(
    State(s): State<AppState>,
    ClientAuth(caller): ClientAuth,
    Path(aid): Path<String>,
    Json(answer): Json<ApprovalAnswer>,
) -> Result<axum::Json<Approval>, ApiError> {
    check_approval_id(&aid)?;
    answer.validate()?;
    let approval = s
        .store
        .answer_approval(&aid, &caller.scope(), &caller.token_id, answer)
        .await?;
    tracing::info!(task_id = %approval.task_id, approval_id = %approval.id,
        state = %approval.state, token_id = %caller.token_id, "Approval answered.");
    Ok(axum::Json(approval))
}
