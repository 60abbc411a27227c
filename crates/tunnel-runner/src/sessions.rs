//! Finding the sessions each agent CLI keeps on this machine, for `recent`.
//!
//! - Claude Code: `$CLAUDE_CONFIG_DIR` or `~/.claude`, `projects/<cwd with / → ->/<session id>.jsonl`.
//! - Codex: `$CODEX_HOME` or `~/.codex`, `sessions/YYYY/MM/DD/rollout-<time>-<session id>.jsonl`.
//! - Gemini: `~/.gemini/tmp/<project hash>/chats/*.json`, the id in the file's `sessionId`.
//!
//! Only names and modification times are read (and for Gemini the id field), never contents.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use tunnel_protocol::ReportedSession;

use crate::config::{AgentConfig, AgentKind};

/// Most sessions reported per agent.
const PER_AGENT: usize = 50;

/// The newest sessions of every built-in agent configured.
pub(crate) fn scan(agents: &BTreeMap<String, AgentConfig>) -> Vec<ReportedSession> {
    let mut out = Vec::new();
    for (name, agent) in agents {
        let home = agent
            .env
            .get("HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(PathBuf::from));
        let Some(home) = home else { continue };
        let env = |k: &str| agent.env.get(k).cloned().or_else(|| std::env::var(k).ok());
        let mut found = match agent.kind {
            AgentKind::Claude => {
                let root = env("CLAUDE_CONFIG_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join(".claude"));
                files(&root.join("projects"), 1, "jsonl")
                    .into_iter()
                    .filter_map(|(p, t)| Some((stem(&p)?, t)))
                    .collect()
            }
            AgentKind::Codex => {
                let root = env("CODEX_HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join(".codex"));
                files(&root.join("sessions"), 3, "jsonl")
                    .into_iter()
                    .filter_map(|(p, t)| {
                        let s = stem(&p)?;
                        let id = s.get(s.len().checked_sub(36)?..)?.to_owned();
                        Some((id, t))
                    })
                    .collect()
            }
            AgentKind::Gemini => files(&home.join(".gemini/tmp"), 2, "json")
                .into_iter()
                .filter(|(p, _)| p.parent().is_some_and(|d| d.ends_with("chats")))
                .filter_map(|(p, t)| Some((gemini_id(&p)?, t)))
                .collect(),
            AgentKind::Custom | AgentKind::Shell | AgentKind::Files | AgentKind::Acp => Vec::new(),
        };
        found.sort_by_key(|(_, t): &(String, i64)| std::cmp::Reverse(*t));
        found.truncate(PER_AGENT);
        for (session_id, last_used) in found {
            if tunnel_protocol::validate_session_id("session_id", &session_id).is_ok() {
                out.push(ReportedSession {
                    agent: name.clone(),
                    session_id,
                    last_used,
                });
            }
        }
    }
    out
}

fn stem(p: &Path) -> Option<String> {
    p.file_stem().and_then(|s| s.to_str()).map(str::to_owned)
}

/// Files with extension `ext` exactly `depth` directories below `root`, with their mtime (ms).
fn files(root: &Path, depth: usize, ext: &str) -> Vec<(PathBuf, i64)> {
    let mut dirs = vec![root.to_path_buf()];
    for _ in 0..depth {
        dirs = dirs
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()))
            .collect();
    }
    dirs.iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten())
        .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some(ext))
        .filter_map(|e| {
            let t = e
                .metadata()
                .ok()?
                .modified()
                .ok()?
                .duration_since(UNIX_EPOCH)
                .ok()?;
            Some((e.path(), t.as_millis() as i64))
        })
        .collect()
}

fn gemini_id(p: &Path) -> Option<String> {
    let text = std::fs::read_to_string(p).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["sessionId"].as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_claude_and_codex_sessions() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        let claude = h.join(".claude/projects/-work-web");
        std::fs::create_dir_all(&claude).unwrap();
        std::fs::write(
            claude.join("5f1c0000-0000-4000-8000-000000000001.jsonl"),
            "{}",
        )
        .unwrap();
        let codex = h.join(".codex/sessions/2026/11/25");
        std::fs::create_dir_all(&codex).unwrap();
        std::fs::write(
            codex.join("rollout-2026-11-25T10-00-00-0199a213-81c0-7800-8aa1-bbab2a035a53.jsonl"),
            "{}",
        )
        .unwrap();
        let gem = h.join(".gemini/tmp/abc123/chats");
        std::fs::create_dir_all(&gem).unwrap();
        std::fs::write(
            gem.join("session-1.json"),
            r#"{"sessionId":"9a9a9a9a-0000-4000-8000-000000000000"}"#,
        )
        .unwrap();

        let mut agents = BTreeMap::new();
        for (name, kind) in [
            ("claude", AgentKind::Claude),
            ("codex", AgentKind::Codex),
            ("gemini", AgentKind::Gemini),
        ] {
            let mut a = AgentConfig::builtin(kind, name);
            a.env.insert("HOME".into(), h.display().to_string());
            agents.insert(name.to_owned(), a);
        }
        let found = scan(&agents);
        let ids: Vec<(&str, &str)> = found
            .iter()
            .map(|s| (s.agent.as_str(), s.session_id.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                ("claude", "5f1c0000-0000-4000-8000-000000000001"),
                ("codex", "0199a213-81c0-7800-8aa1-bbab2a035a53"),
                ("gemini", "9a9a9a9a-0000-4000-8000-000000000000")
            ]
        );
        assert!(found.iter().all(|s| s.last_used > 0));
    }
}
