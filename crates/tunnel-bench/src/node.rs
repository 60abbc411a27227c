//! Phase 1c: dispatch from a Node client (the plugin and the original runner are Node), over
//! the original API (`POST /claude` → parked `GET /worker/poll`) and API v1 (`POST /v1/tasks`
//! → parked `POST /v1/claim`), each beside a bare `GET /health` after the same idle gap. The
//! client is `node/dispatch.mjs` (kept in this crate, written to a temporary file and run with
//! `node`); no Node, no phase, and the report says so.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use crate::server::ServerProcess;
use crate::stats::Latency;

const SCRIPT: &str = include_str!("../node/dispatch.mjs");

#[derive(Debug, Serialize)]
pub(crate) struct NodeReport {
    /// `node --version`.
    pub(crate) node: String,
    pub(crate) gaps: Vec<NodeGap>,
}

#[derive(Debug, Serialize)]
pub(crate) struct NodeGap {
    pub(crate) gap_ms: u64,
    /// Submit sent → the parked `GET /worker/poll` answer read.
    pub(crate) compat: Latency,
    /// Submit sent → the parked `POST /v1/claim` answer read.
    pub(crate) v1: Latency,
    /// A bare `GET /health` round trip after the same gap.
    pub(crate) health: Latency,
}

#[derive(Deserialize)]
struct ScriptOut {
    node: String,
    gaps: Vec<ScriptGap>,
}

#[derive(Deserialize)]
struct ScriptGap {
    gap_ms: u64,
    compat: Vec<f64>,
    v1: Vec<f64>,
    health: Vec<f64>,
}

/// `node` if it runs (`node --version`), else why not.
pub(crate) async fn find_node(node: &Path) -> std::result::Result<(), String> {
    match tokio::process::Command::new(node)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`{} --version` failed ({})",
            node.display(),
            out.status
        )),
        Err(e) => Err(format!("cannot run {}: {e}", node.display())),
    }
}

/// Runs the Node client against `server`: `n` dispatches per API and gap. Tasks made:
/// `2 × n × gaps`, each finished `succeeded`.
pub(crate) async fn dispatch(
    server: &ServerProcess,
    node: &Path,
    token: &str,
    n: usize,
    gaps: &[u64],
) -> Result<NodeReport> {
    let dir = tempfile::Builder::new()
        .prefix("tunnel-bench-node-")
        .tempdir()?;
    let script = dir.path().join("dispatch.mjs");
    std::fs::write(&script, SCRIPT)?;
    let gaps_arg = gaps
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let run = tokio::process::Command::new(node)
        .arg(&script)
        .arg(&server.url)
        .arg(token)
        .arg(n.to_string())
        .arg(&gaps_arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    // Each dispatch waits its gap twice (before the submit and before /health), three kinds.
    let budget = Duration::from_secs(60)
        + Duration::from_millis(gaps.iter().sum::<u64>() * n as u64 * 6 + n as u64 * 200);
    let out = tokio::time::timeout(budget, run)
        .await
        .with_context(|| format!("the Node client did not finish within {budget:?}"))??;
    ensure!(
        out.status.success(),
        "the Node client failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: ScriptOut = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the Node client's output: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let lat = |v: &[f64]| {
        Latency::of(
            &v.iter()
                .map(|ms| Duration::from_secs_f64(ms / 1e3))
                .collect::<Vec<_>>(),
        )
    };
    let gaps = parsed
        .gaps
        .iter()
        .map(|g| {
            ensure!(
                g.compat.len() == n && g.v1.len() == n && g.health.len() == n,
                "the Node client measured {} / {} / {} of {n} at gap {} ms",
                g.compat.len(),
                g.v1.len(),
                g.health.len(),
                g.gap_ms
            );
            Ok(NodeGap {
                gap_ms: g.gap_ms,
                compat: lat(&g.compat),
                v1: lat(&g.v1),
                health: lat(&g.health),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(NodeReport {
        node: parsed.node,
        gaps,
    })
}
