//! The runner's side of approvals: how an agent's permission request is answered.
//!
//! `auto` picks the agent's allow option at once, `deny` its reject option; `ask` turns the
//! request into a durable approval on the server (`POST /v1/tasks/{id}/approvals`) and
//! long-polls it (`…/approvals/{aid}/wait`) until a person answers, it expires, or the task is
//! cancelled. A request identical to one allowed "for this session" is answered with the
//! agent's own allow-always option without asking again, whatever the agent remembers.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tunnel_protocol::{
    Approval, ApprovalOption, ApprovalOptionKind, ApprovalPolicy, ApprovalRequest, ApprovalState,
    ApprovalTool, ApprovalWait, Decision,
};

pub(crate) type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the server could not take or answer a question.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// The attempt is no longer current (409) or the request was refused for good (4xx).
    Refused(String),
    /// No answer (connection, 5xx): worth retrying.
    Transient(String),
}

/// The two server routes a runner uses (a trait so the policy logic is testable alone).
pub(crate) trait ApprovalApi: Send + Sync {
    fn create<'a>(
        &'a self,
        task_id: &'a str,
        req: &'a ApprovalRequest,
    ) -> BoxFut<'a, Result<Approval, ApiError>>;
    fn wait<'a>(
        &'a self,
        task_id: &'a str,
        approval_id: &'a str,
        req: &'a ApprovalWait,
    ) -> BoxFut<'a, Result<Approval, ApiError>>;
}

/// How a question was settled, as the runner acts on it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settled {
    pub(crate) state: ApprovalState,
    pub(crate) decision: Option<Decision>,
    /// The agent option to choose; `None`: reject (or cancel when `state` is `cancelled`).
    pub(crate) option_id: Option<String>,
    pub(crate) message: Option<String>,
    pub(crate) by: String,
    /// The server's `apr_…` id, when it was asked.
    pub(crate) approval_id: Option<String>,
}

/// One attempt's permission gate.
pub(crate) struct Gate {
    pub(crate) policy: ApprovalPolicy,
    pub(crate) api: Option<Arc<dyn ApprovalApi>>,
    pub(crate) task_id: String,
    pub(crate) attempt: u32,
    pub(crate) lease_token: String,
    pub(crate) timeout: Duration,
    /// The task was cancelled (or the runner is stopping): pending questions end `cancelled`.
    pub(crate) cancel: CancellationToken,
    /// Tools allowed for the rest of the session (see [`signature`]).
    allowed_for_session: Mutex<HashSet<String>>,
}

/// What makes two requests "the same" for allow-for-session: the tool's kind, command, paths
/// and title (the diff is left out: the same file edited again counts as the same request).
pub(crate) fn signature(tool: &ApprovalTool) -> String {
    format!(
        "{}\u{0}{}\u{0}{}\u{0}{}",
        tool.kind,
        tool.command.as_deref().unwrap_or_default(),
        tool.paths.join("\u{1}"),
        tool.title
    )
}

fn pick(options: &[ApprovalOption], kinds: &[ApprovalOptionKind]) -> Option<String> {
    kinds
        .iter()
        .find_map(|k| options.iter().find(|o| o.kind == *k).map(|o| o.id.clone()))
}

pub(crate) fn allow_option(options: &[ApprovalOption]) -> Option<String> {
    pick(
        options,
        &[
            ApprovalOptionKind::AllowOnce,
            ApprovalOptionKind::AllowAlways,
        ],
    )
}

pub(crate) fn reject_option(options: &[ApprovalOption]) -> Option<String> {
    pick(
        options,
        &[
            ApprovalOptionKind::RejectOnce,
            ApprovalOptionKind::RejectAlways,
        ],
    )
}

fn local(
    state: ApprovalState,
    decision: Option<Decision>,
    option_id: Option<String>,
    by: &str,
) -> Settled {
    Settled {
        state,
        decision,
        option_id,
        message: None,
        by: by.into(),
        approval_id: None,
    }
}

/// Longest a single wait is held by the server (it may hold less).
const WAIT_MS: u64 = 25_000;

impl Gate {
    pub(crate) fn new(
        policy: ApprovalPolicy,
        api: Option<Arc<dyn ApprovalApi>>,
        task_id: String,
        attempt: u32,
        lease_token: String,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> Gate {
        Gate {
            policy,
            api,
            task_id,
            attempt,
            lease_token,
            timeout,
            cancel,
            allowed_for_session: Mutex::new(HashSet::new()),
        }
    }

    /// Answers one request. `key` identifies it within the attempt (the tool call id).
    pub(crate) async fn decide(
        &self,
        key: &str,
        tool: &ApprovalTool,
        options: &[ApprovalOption],
    ) -> Settled {
        let sig = signature(tool);
        match self.policy {
            ApprovalPolicy::Auto => {
                return local(
                    ApprovalState::Allowed,
                    Some(Decision::AllowOnce),
                    allow_option(options),
                    "policy auto",
                );
            }
            ApprovalPolicy::Deny => {
                return local(
                    ApprovalState::Denied,
                    Some(Decision::Deny),
                    reject_option(options),
                    "policy deny",
                );
            }
            ApprovalPolicy::Ask => {}
        }
        let remembered = self
            .allowed_for_session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&sig);
        if remembered {
            let id = pick(
                options,
                &[
                    ApprovalOptionKind::AllowAlways,
                    ApprovalOptionKind::AllowOnce,
                ],
            );
            return local(
                ApprovalState::Allowed,
                Some(Decision::AllowSession),
                id,
                "allowed for this session earlier",
            );
        }
        let settled = self.ask(key, tool, options).await;
        if settled.state == ApprovalState::Allowed
            && (settled.decision == Some(Decision::AllowSession)
                || options.iter().any(|o| {
                    Some(&o.id) == settled.option_id.as_ref()
                        && o.kind == ApprovalOptionKind::AllowAlways
                }))
        {
            self.allowed_for_session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(sig);
        }
        settled
    }

    async fn ask(&self, key: &str, tool: &ApprovalTool, options: &[ApprovalOption]) -> Settled {
        let Some(api) = &self.api else {
            return local(
                ApprovalState::Denied,
                None,
                None,
                "runner: no approval route on this server",
            );
        };
        let mut tool = tool.clone();
        tool.shorten();
        let req = ApprovalRequest {
            attempt: self.attempt,
            lease_token: self.lease_token.clone(),
            key: cut(key, tunnel_protocol::approval_limits::KEY_MAX),
            tool,
            options: options.to_vec(),
            timeout_ms: Some(self.timeout.as_millis() as u64),
        };
        if let Err(e) = req.validate() {
            // The agent's request cannot be shown as it is (no allow option, a bad field): fail
            // closed rather than allow something nobody saw.
            return local(
                ApprovalState::Denied,
                None,
                None,
                &format!("runner: the request cannot be asked ({e})"),
            );
        }
        // A server that stays away past the expiry cannot answer any more: deny locally then.
        let give_up = tokio::time::Instant::now() + self.timeout + Duration::from_secs(60);
        let mut failures = 0u32;
        let mut approval = loop {
            let r = tokio::select! {
                r = api.create(&self.task_id, &req) => r,
                _ = self.cancel.cancelled() => return local(ApprovalState::Cancelled, None, None, "cancel"),
            };
            match r {
                Ok(a) => break a,
                Err(ApiError::Refused(m)) => {
                    return local(ApprovalState::Denied, None, None, &format!("server: {m}"));
                }
                Err(ApiError::Transient(m)) => {
                    failures += 1;
                    if tokio::time::Instant::now() > give_up {
                        return local(ApprovalState::Expired, None, None, &format!("runner: {m}"));
                    }
                    tracing::warn!(task_id = %self.task_id, error = %m, "Asking for approval failed; retrying.");
                    if self.pause(failures).await {
                        return local(ApprovalState::Cancelled, None, None, "cancel");
                    }
                }
            }
        };
        failures = 0;
        while approval.state == ApprovalState::Pending {
            let wait = ApprovalWait {
                attempt: self.attempt,
                lease_token: self.lease_token.clone(),
                wait_ms: WAIT_MS,
            };
            let r = tokio::select! {
                r = api.wait(&self.task_id, &approval.id, &wait) => r,
                _ = self.cancel.cancelled() => return Settled {
                    approval_id: Some(approval.id.clone()),
                    ..local(ApprovalState::Cancelled, None, None, "cancel")
                },
            };
            match r {
                Ok(a) => {
                    failures = 0;
                    approval = a;
                }
                Err(ApiError::Refused(m)) => {
                    return Settled {
                        approval_id: Some(approval.id.clone()),
                        ..local(
                            ApprovalState::Cancelled,
                            None,
                            None,
                            &format!("server: {m}"),
                        )
                    };
                }
                Err(ApiError::Transient(m)) => {
                    // The server restarting: the question is durable there; keep asking.
                    failures += 1;
                    if tokio::time::Instant::now() > give_up {
                        return Settled {
                            approval_id: Some(approval.id.clone()),
                            ..local(ApprovalState::Expired, None, None, &format!("runner: {m}"))
                        };
                    }
                    if self.pause(failures).await {
                        return Settled {
                            approval_id: Some(approval.id.clone()),
                            ..local(ApprovalState::Cancelled, None, None, "cancel")
                        };
                    }
                }
            }
        }
        let outcome = approval
            .outcome
            .unwrap_or(tunnel_protocol::ApprovalOutcome {
                decision: None,
                option_id: None,
                message: None,
                by: "server".into(),
                at: 0,
            });
        // Only an option the agent offered is ever sent back to it.
        let option_id = outcome
            .option_id
            .filter(|id| options.iter().any(|o| &o.id == id));
        Settled {
            state: approval.state,
            decision: outcome.decision,
            option_id,
            message: outcome.message,
            by: outcome.by,
            approval_id: Some(approval.id),
        }
    }

    /// Sleeps a back-off; true if cancelled meanwhile.
    async fn pause(&self, failures: u32) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(crate::task::backoff(failures).min(Duration::from_secs(5))) => false,
            _ = self.cancel.cancelled() => true,
        }
    }
}

fn cut(s: &str, max: usize) -> String {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// The real routes, through the tunnel client.
impl ApprovalApi for tunnel_client::Client {
    fn create<'a>(
        &'a self,
        task_id: &'a str,
        req: &'a ApprovalRequest,
    ) -> BoxFut<'a, Result<Approval, ApiError>> {
        Box::pin(async move { self.create_approval(task_id, req).await.map_err(api_error) })
    }

    fn wait<'a>(
        &'a self,
        task_id: &'a str,
        approval_id: &'a str,
        req: &'a ApprovalWait,
    ) -> BoxFut<'a, Result<Approval, ApiError>> {
        Box::pin(async move {
            self.wait_approval(task_id, approval_id, req)
                .await
                .map_err(api_error)
        })
    }
}

fn api_error(e: tunnel_client::ClientError) -> ApiError {
    match e.status() {
        Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => {
            ApiError::Refused(e.to_string())
        }
        _ => ApiError::Transient(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
