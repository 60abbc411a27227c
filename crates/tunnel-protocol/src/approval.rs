//! Approvals: an agent asks before it acts, a person answers (chat, CLI, API, dashboard).
//!
//! The runner turns an agent's permission request (ACP `session/request_permission`) into an
//! [`ApprovalRequest`] on the server (`POST /v1/tasks/{id}/approvals`, fenced by the attempt
//! like every runner call), then waits for the answer (`POST /v1/tasks/{id}/approvals/{aid}/wait`,
//! a long-poll). The task's owner or an admin answers with [`ApprovalAnswer`]
//! (`POST /v1/approvals/{aid}`); `GET /v1/approvals` lists them. A request not answered by
//! `expires_at` is `expired` (the agent is told no); a task that is cancelled or whose attempt
//! ends answers its pending requests `cancelled`.

use serde::{Deserialize, Serialize};

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

use crate::{Invalid, validate_text};

/// Limits on approval fields. A value outside them is rejected, never truncated, except the
/// diff and command, which the runner shortens before sending (see [`ApprovalTool::shorten`]).
pub mod approval_limits {
    /// Longest title (the agent's one-line description of the action).
    pub const TITLE_MAX: usize = 512;
    /// Longest command line shown.
    pub const COMMAND_MAX: usize = 4 * 1024;
    /// Longest diff shown.
    pub const DIFF_MAX: usize = 8 * 1024;
    /// Most paths named by one request, and the longest of them.
    pub const PATHS_MAX: usize = 32;
    pub const PATH_MAX: usize = 1_024;
    /// Most options an agent may offer, and the longest option id / name.
    pub const OPTIONS_MAX: usize = 8;
    pub const OPTION_ID_MAX: usize = 128;
    pub const OPTION_NAME_MAX: usize = 128;
    /// Longest runner key (its idempotency key for one request).
    pub const KEY_MAX: usize = 256;
    /// Longest message passed to the agent with a deny, and the longest answerer name.
    pub const MESSAGE_MAX: usize = 2 * 1024;
    pub const BY_MAX: usize = 128;
    /// Shortest and longest time a request may wait for an answer.
    pub const TIMEOUT_MIN_MS: u64 = 1_000;
    pub const TIMEOUT_MAX_MS: u64 = 24 * 3_600_000;
    /// The default wait (10 minutes).
    pub const TIMEOUT_DEFAULT_MS: u64 = 600_000;
}
use approval_limits as al;

/// How a runner treats an agent's permission requests, per agent in its config and per task in
/// a submit; the stricter of the two wins (`deny` > `ask` > `auto`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ApprovalPolicy {
    /// Everything the agent asks is allowed (what print mode did before approvals existed).
    #[default]
    Auto,
    /// Each request waits for a person's answer.
    Ask,
    /// Each request is denied at once.
    Deny,
}

impl ApprovalPolicy {
    /// The stricter of two policies.
    pub fn stricter(self, other: ApprovalPolicy) -> ApprovalPolicy {
        self.max(other)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalPolicy::Auto => "auto",
            ApprovalPolicy::Ask => "ask",
            ApprovalPolicy::Deny => "deny",
        }
    }
}

/// What kind of choice an agent's option is (ACP `PermissionOptionKind`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ApprovalOptionKind {
    AllowOnce,
    AllowAlways,
    RejectOnce,
    RejectAlways,
}

/// One choice the agent offers, as the agent named it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApprovalOption {
    /// The agent's own id for the option (sent back to the agent as chosen).
    pub id: String,
    pub name: String,
    pub kind: ApprovalOptionKind,
}

/// What the agent wants to do.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApprovalTool {
    /// ACP tool kind: `read`, `edit`, `delete`, `move`, `search`, `execute`, `think`, `fetch`,
    /// `switch_mode` or `other`.
    pub kind: String,
    /// The agent's one-line title of the action ("Run `rm -rf build`").
    pub title: String,
    /// The command line, for `execute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Files the action touches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// A short unified diff, for `edit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
}

impl ApprovalTool {
    /// Cuts the command and diff to their limits (on a char boundary, marked with `…`), so an
    /// agent's huge edit still produces a question a person can read.
    pub fn shorten(&mut self) {
        fn cut(s: &mut String, max: usize) {
            if s.len() > max {
                let mut end = max - '…'.len_utf8();
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.truncate(end);
                s.push('…');
            }
        }
        if let Some(c) = &mut self.command {
            cut(c, al::COMMAND_MAX);
        }
        if let Some(d) = &mut self.diff {
            cut(d, al::DIFF_MAX);
        }
        let mut title = std::mem::take(&mut self.title);
        cut(&mut title, al::TITLE_MAX);
        self.title = title;
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        if self.kind.is_empty()
            || self.kind.len() > 32
            || !self
                .kind
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_')
        {
            return Err(Invalid::new("tool.kind", "must be 1 to 32 of a-z and '_'"));
        }
        validate_text("tool.title", &self.title, al::TITLE_MAX)?;
        if let Some(c) = &self.command {
            validate_multiline("tool.command", c, al::COMMAND_MAX)?;
        }
        if let Some(d) = &self.diff {
            validate_multiline("tool.diff", d, al::DIFF_MAX)?;
        }
        if self.paths.len() > al::PATHS_MAX {
            return Err(Invalid::new(
                "tool.paths",
                format!("at most {} paths", al::PATHS_MAX),
            ));
        }
        for p in &self.paths {
            validate_text("tool.paths", p, al::PATH_MAX)?;
        }
        Ok(())
    }
}

/// `POST /v1/tasks/{id}/approvals` (runner): the agent of this attempt asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApprovalRequest {
    pub attempt: u32,
    pub lease_token: String,
    /// The runner's key for this question within the attempt (e.g. the ACP tool call id): the
    /// same key again returns the same approval, so the request can be retried safely.
    pub key: String,
    pub tool: ApprovalTool,
    /// The agent's options; at least one allow and one reject.
    pub options: Vec<ApprovalOption>,
    /// How long to wait for an answer before it counts as denied (default 10 minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl ApprovalRequest {
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_text("key", &self.key, al::KEY_MAX)?;
        self.tool.validate()?;
        if self.options.is_empty() || self.options.len() > al::OPTIONS_MAX {
            return Err(Invalid::new(
                "options",
                format!("must have 1 to {} options", al::OPTIONS_MAX),
            ));
        }
        for o in &self.options {
            validate_text("options.id", &o.id, al::OPTION_ID_MAX)?;
            validate_text("options.name", &o.name, al::OPTION_NAME_MAX)?;
        }
        let allows = self.options.iter().any(|o| {
            matches!(
                o.kind,
                ApprovalOptionKind::AllowOnce | ApprovalOptionKind::AllowAlways
            )
        });
        if !allows {
            return Err(Invalid::new("options", "must offer at least one allow"));
        }
        if let Some(t) = self.timeout_ms
            && !(al::TIMEOUT_MIN_MS..=al::TIMEOUT_MAX_MS).contains(&t)
        {
            return Err(Invalid::new(
                "timeout_ms",
                format!(
                    "must be between {} and {}",
                    al::TIMEOUT_MIN_MS,
                    al::TIMEOUT_MAX_MS
                ),
            ));
        }
        Ok(())
    }
}

/// Where an approval request is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for an answer.
    Pending,
    /// Answered allow (once or for the session).
    Allowed,
    /// Answered deny.
    Denied,
    /// Nobody answered in time: the agent was told no.
    Expired,
    /// The task was cancelled or its attempt ended first.
    Cancelled,
}

impl ApprovalState {
    pub const ALL: [ApprovalState; 5] = [
        ApprovalState::Pending,
        ApprovalState::Allowed,
        ApprovalState::Denied,
        ApprovalState::Expired,
        ApprovalState::Cancelled,
    ];

    pub fn is_final(self) -> bool {
        self != ApprovalState::Pending
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Allowed => "allowed",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
            ApprovalState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<ApprovalState> {
        ApprovalState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for ApprovalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::AllowOnce => "allow_once",
            Decision::AllowSession => "allow_session",
            Decision::Deny => "deny",
        }
    }

    /// The agent option that carries this decision: allow once → its allow-once option (never
    /// an allow-always one: that would grant more than was said), allow for the session → its
    /// allow-always option (else allow-once), deny → its reject-once option (else
    /// reject-always). `None` when it offers no such option: the runner then cancels the
    /// request, which the agent reads as no.
    pub fn option_for(self, options: &[ApprovalOption]) -> Option<String> {
        use ApprovalOptionKind as K;
        let prefs: &[K] = match self {
            Decision::AllowOnce => &[K::AllowOnce],
            Decision::AllowSession => &[K::AllowAlways, K::AllowOnce],
            Decision::Deny => &[K::RejectOnce, K::RejectAlways],
        };
        prefs
            .iter()
            .find_map(|k| options.iter().find(|o| o.kind == *k))
            .map(|o| o.id.clone())
    }
}

/// Prefix of approval ids.
pub const APPROVAL_ID_PREFIX: &str = "apr_";

/// Whether `id` has the shape of an approval id (`apr_` and a UUID), so a path segment that
/// is not one is refused as a bad request, never looked up.
pub fn is_approval_id(id: &str) -> bool {
    id.strip_prefix(APPROVAL_ID_PREFIX).is_some_and(|u| {
        u.len() == 36
            && u.char_indices().all(|(i, c)| {
                if [8, 13, 18, 23].contains(&i) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            })
    })
}

/// A person's choice.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Allow this one call.
    AllowOnce,
    /// Allow this and the same kind of call for the rest of the agent's session (the agent's
    /// own "always" option; where it has none, the runner allows once).
    AllowSession,
    /// Do not do it; `message` is passed to the agent.
    Deny,
}

/// `POST /v1/approvals/{id}` (the task's owner or admin).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApprovalAnswer {
    pub decision: Decision,
    /// With `deny`: told to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Who answered, as the client knows them (a chat user's name); the server records the
    /// token's name beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl ApprovalAnswer {
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(m) = &self.message {
            validate_multiline("message", m, al::MESSAGE_MAX)?;
        }
        if let Some(b) = &self.by {
            validate_text("by", b, al::BY_MAX)?;
        }
        Ok(())
    }
}

/// How a request was settled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApprovalOutcome {
    /// `None` for `expired` and `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// The agent option the runner should choose (filled by the server from the decision and
    /// the offered options; `None` means "reject / cancel the request").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub option_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Who answered ("chat:alice via token plugin", "token admin", "timeout", "cancel").
    pub by: String,
    pub at: i64,
}

/// An approval request as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Approval {
    /// `apr_…`.
    pub id: String,
    pub task_id: String,
    pub attempt: u32,
    pub agent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    pub state: ApprovalState,
    pub tool: ApprovalTool,
    pub options: Vec<ApprovalOption>,
    pub asked_at: i64,
    pub expires_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ApprovalOutcome>,
}

/// `GET /v1/approvals`: newest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApprovalList {
    pub approvals: Vec<Approval>,
}

/// `POST /v1/tasks/{id}/approvals/{aid}/wait` (runner): holds up to `wait_ms` while the
/// request is pending; answers at once when it is settled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApprovalWait {
    pub attempt: u32,
    pub lease_token: String,
    #[serde(default)]
    pub wait_ms: u64,
}

/// Text that may span lines (commands, diffs, messages): a length limit, no NUL and no control
/// characters other than newline and tab.
fn validate_multiline(field: &'static str, s: &str, max: usize) -> Result<(), Invalid> {
    if s.is_empty() || s.len() > max {
        return Err(Invalid::new(field, format!("must be 1 to {max} bytes")));
    }
    if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(Invalid::new(
            field,
            "must not contain control characters other than newline and tab",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ApprovalRequest {
        ApprovalRequest {
            attempt: 1,
            lease_token: "l".into(),
            key: "call_1".into(),
            tool: ApprovalTool {
                kind: "execute".into(),
                title: "Run rm -rf build".into(),
                command: Some("rm -rf build".into()),
                ..Default::default()
            },
            options: vec![
                ApprovalOption {
                    id: "allow".into(),
                    name: "Allow".into(),
                    kind: ApprovalOptionKind::AllowOnce,
                },
                ApprovalOption {
                    id: "reject".into(),
                    name: "Reject".into(),
                    kind: ApprovalOptionKind::RejectOnce,
                },
            ],
            timeout_ms: None,
        }
    }

    #[test]
    fn stricter_policy_wins() {
        use ApprovalPolicy::*;
        assert_eq!(Auto.stricter(Ask), Ask);
        assert_eq!(Deny.stricter(Ask), Deny);
        assert_eq!(Auto.stricter(Auto), Auto);
    }

    #[test]
    fn request_validation() {
        assert!(request().validate().is_ok());
        let mut r = request();
        r.options
            .retain(|o| o.kind == ApprovalOptionKind::RejectOnce);
        assert_eq!(r.validate().unwrap_err().field, "options");
        let mut r = request();
        r.tool.title = "a\u{1b}[2Jb".into();
        assert_eq!(r.validate().unwrap_err().field, "tool.title");
        let mut r = request();
        r.timeout_ms = Some(10);
        assert_eq!(r.validate().unwrap_err().field, "timeout_ms");
        let mut r = request();
        r.tool.kind = "Exec!".into();
        assert_eq!(r.validate().unwrap_err().field, "tool.kind");
    }

    #[test]
    fn shorten_cuts_on_char_boundaries() {
        let mut t = ApprovalTool {
            kind: "edit".into(),
            title: "é".repeat(600),
            diff: Some("ü".repeat(al::DIFF_MAX)),
            ..Default::default()
        };
        t.shorten();
        assert!(t.title.len() <= al::TITLE_MAX && t.title.ends_with('…'));
        assert!(t.diff.as_ref().unwrap().len() <= al::DIFF_MAX);
        assert!(t.validate().is_ok());
    }
}
