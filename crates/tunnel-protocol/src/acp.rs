//! What an ACP agent says about itself in `initialize`, as its runner reports it
//! (`ClaimRequest::acp_capabilities`): `GET /v1/runners` shows it, and `tunnel acp` answers its
//! own `initialize` from it. Data from a program on another machine, shown to admins and relayed
//! to editors: [`AcpCapabilities::from_initialize`] keeps a bounded, clean copy, and
//! [`AcpCapabilities::validate`] (the server's check) refuses anything else.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

use crate::{Invalid, validate_text};

/// Bounds on a reported `initialize` answer. Past them it is refused, never cut.
pub mod acp_limits {
    /// Largest `agent_capabilities` of one agent, as JSON text.
    pub const CAPABILITIES_MAX: usize = 4 * 1024;
    /// Largest `acp_capabilities` of one claim (all its agents), as JSON text.
    pub const ALL_MAX: usize = 16 * 1024;
    /// Deepest nesting of `agent_capabilities`.
    pub const DEPTH_MAX: usize = 8;
    /// Longest string in it, and longest name, title, version or auth method field.
    pub const TEXT_MAX: usize = 200;
    /// Most auth methods kept.
    pub const AUTH_METHODS_MAX: usize = 8;
}

/// An ACP agent's answer to `initialize`, as its runner last saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AcpCapabilities {
    /// The ACP version the agent answered.
    pub protocol_version: u32,
    /// Its `agentCapabilities` object, spelt as ACP spells it (`loadSession`,
    /// `promptCapabilities`, `mcpCapabilities`, `sessionCapabilities`…), without `_meta`.
    #[serde(default = "empty_object")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub agent_capabilities: Value,
    /// Its `agentInfo`, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_info: Option<AcpAgentInfo>,
    /// Its `authMethods`: how it logs in on the runner's machine (not relayed by `tunnel acp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub auth_methods: Vec<AcpAuthMethod>,
}

/// `agentInfo` of an ACP agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AcpAgentInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// One of an ACP agent's `authMethods`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AcpAuthMethod {
    pub id: String,
    pub name: String,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// `s` without control characters, trimmed, cut to [`acp_limits::TEXT_MAX`] bytes.
fn clean(s: &str) -> String {
    let s: String = s.chars().filter(|c| !c.is_control()).collect();
    let s = s.trim();
    let mut end = s.len().min(acp_limits::TEXT_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn clean_opt(v: &Value) -> Option<String> {
    v.as_str().map(clean).filter(|s| !s.is_empty())
}

/// A copy of `v` with clean strings and keys, no `_meta`, nothing nested deeper than `depth`.
fn clean_value(v: &Value, depth: usize) -> Value {
    match v {
        Value::String(s) => Value::String(clean(s)),
        Value::Array(a) if depth > 0 => a.iter().map(|x| clean_value(x, depth - 1)).collect(),
        Value::Object(o) if depth > 0 => Value::Object(
            o.iter()
                .filter(|(k, _)| k.as_str() != "_meta")
                .map(|(k, x)| (clean(k), clean_value(x, depth - 1)))
                .filter(|(k, _)| !k.is_empty())
                .collect(),
        ),
        Value::Array(_) => Value::Array(vec![]),
        Value::Object(_) => empty_object(),
        other => other.clone(),
    }
}

/// Whether every string of `v` is clean and short, and it nests at most `depth` deep.
fn check_value(v: &Value, depth: usize) -> Result<(), String> {
    let text = |s: &str| {
        if s.len() > acp_limits::TEXT_MAX {
            Err(format!(
                "a string longer than {} bytes",
                acp_limits::TEXT_MAX
            ))
        } else if s.chars().any(char::is_control) {
            Err("a control character".to_owned())
        } else {
            Ok(())
        }
    };
    match v {
        Value::String(s) => text(s),
        Value::Array(_) | Value::Object(_) if depth == 0 => {
            Err(format!("nesting deeper than {}", acp_limits::DEPTH_MAX))
        }
        Value::Array(a) => a.iter().try_for_each(|x| check_value(x, depth - 1)),
        Value::Object(o) => o.iter().try_for_each(|(k, x)| {
            text(k)?;
            check_value(x, depth - 1)
        }),
        _ => Ok(()),
    }
}

impl AcpCapabilities {
    /// What an `initialize` result says, cleaned: control characters dropped, strings cut, no
    /// `_meta`, nesting and auth methods bounded. Its size is not cut: [`Self::validate`]
    /// refuses one too large to report.
    pub fn from_initialize(result: &Value) -> AcpCapabilities {
        let caps = match &result["agentCapabilities"] {
            v @ Value::Object(_) => clean_value(v, acp_limits::DEPTH_MAX),
            _ => empty_object(),
        };
        let info = &result["agentInfo"];
        let agent_info = clean_opt(&info["name"]).map(|name| AcpAgentInfo {
            name,
            title: clean_opt(&info["title"]),
            version: clean_opt(&info["version"]),
        });
        let auth_methods = result["authMethods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let id = clean_opt(&m["id"])?;
                let name = clean_opt(&m["name"]).unwrap_or_else(|| id.clone());
                Some(AcpAuthMethod { id, name })
            })
            .take(acp_limits::AUTH_METHODS_MAX)
            .collect();
        AcpCapabilities {
            protocol_version: result["protocolVersion"]
                .as_u64()
                .map_or(0, |v| v.min(u32::MAX as u64) as u32),
            agent_capabilities: caps,
            agent_info,
            auth_methods,
        }
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        const F: &str = "acp_capabilities";
        let Value::Object(_) = &self.agent_capabilities else {
            return Err(Invalid::new(F, "agent_capabilities must be an object"));
        };
        let len = self.agent_capabilities.to_string().len();
        if len > acp_limits::CAPABILITIES_MAX {
            return Err(Invalid::new(
                F,
                format!(
                    "an agent's agent_capabilities is {len} bytes of JSON; at most {} are kept",
                    acp_limits::CAPABILITIES_MAX
                ),
            ));
        }
        check_value(&self.agent_capabilities, acp_limits::DEPTH_MAX)
            .map_err(|e| Invalid::new(F, format!("agent_capabilities has {e}")))?;
        if let Some(i) = &self.agent_info {
            validate_text(F, &i.name, acp_limits::TEXT_MAX)?;
            for t in [&i.title, &i.version].into_iter().flatten() {
                validate_text(F, t, acp_limits::TEXT_MAX)?;
            }
        }
        if self.auth_methods.len() > acp_limits::AUTH_METHODS_MAX {
            return Err(Invalid::new(
                F,
                format!(
                    "at most {} auth methods per agent",
                    acp_limits::AUTH_METHODS_MAX
                ),
            ));
        }
        for m in &self.auth_methods {
            validate_text(F, &m.id, acp_limits::TEXT_MAX)?;
            validate_text(F, &m.name, acp_limits::TEXT_MAX)?;
        }
        Ok(())
    }

    /// `agentCapabilities.<path…>` is `true`.
    pub fn flag(&self, path: &[&str]) -> bool {
        path.iter()
            .try_fold(&self.agent_capabilities, |v, k| v.get(*k))
            .is_some_and(|v| v == true)
    }
}

/// Checks a claim's `acp_capabilities`: agents it drives over ACP only, each valid, all of it
/// within [`acp_limits::ALL_MAX`].
pub(crate) fn validate_all(
    all: &BTreeMap<String, AcpCapabilities>,
    acp_agents: &[String],
) -> Result<(), Invalid> {
    const F: &str = "acp_capabilities";
    for (agent, caps) in all {
        if !acp_agents.contains(agent) {
            return Err(Invalid::new(F, "must be agents of `acp_agents`"));
        }
        caps.validate()?;
    }
    let len = serde_json::to_string(all).map_or(usize::MAX, |s| s.len());
    if len > acp_limits::ALL_MAX {
        return Err(Invalid::new(
            F,
            format!(
                "is {len} bytes of JSON; at most {} are kept",
                acp_limits::ALL_MAX
            ),
        ));
    }
    Ok(())
}
