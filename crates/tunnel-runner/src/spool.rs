//! The spool: what an attempt produced that the server has not acknowledged yet, on disk, so a
//! runner restart or a server outage loses nothing. One file per attempt, replaced atomically.
//! Re-sending is safe: the server ignores events it already has (same attempt and `n`) and
//! answers a repeated finish with the task as it was.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tunnel_protocol::{FinishRequest, NewEvent};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SpoolEntry {
    pub(crate) task_id: String,
    pub(crate) attempt: u32,
    pub(crate) lease_token: String,
    /// The agent's process group while it runs, to stop leftovers after a runner crash.
    pub(crate) pgid: Option<i32>,
    /// The start time of the agent (`pgid`), so a restarted runner never signals a process
    /// that reused the id.
    #[serde(default)]
    pub(crate) pgid_start: Option<u64>,
    /// The task's cgroup, when cgroups contain it.
    #[serde(default)]
    pub(crate) cgroup: Option<PathBuf>,
    /// The marker in the environment of the task's processes.
    #[serde(default)]
    pub(crate) mark: Option<String>,
    /// Events not yet acknowledged by the server.
    pub(crate) pending: Vec<NewEvent>,
    /// The server said the task's event log is truncated (at its cap): later events would be
    /// dropped there, so only what it still uses (`session`) is kept and sent.
    #[serde(default)]
    pub(crate) truncated: bool,
    /// The result, once the agent is done and until the server has it.
    pub(crate) finish: Option<FinishRequest>,
}

#[derive(Debug, Clone)]
pub(crate) struct Spool {
    dir: PathBuf,
}

impl Spool {
    pub(crate) fn open(dir: &Path) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, task_id: &str, attempt: u32) -> PathBuf {
        self.dir.join(format!("{task_id}.{attempt}.json"))
    }

    pub(crate) fn save(&self, e: &SpoolEntry) -> std::io::Result<()> {
        let path = self.path(&e.task_id, e.attempt);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(e).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, &path)
    }

    pub(crate) fn remove(&self, task_id: &str, attempt: u32) {
        let _ = std::fs::remove_file(self.path(task_id, attempt));
    }

    /// Every entry left by an earlier run (unreadable files are set aside, not fatal).
    pub(crate) fn leftovers(&self) -> Vec<SpoolEntry> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return vec![];
        };
        let mut out = Vec::new();
        for entry in dir.flatten() {
            let p = entry.path();
            if p.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<SpoolEntry>(&b).ok())
            {
                Some(e) => out.push(e),
                None => {
                    tracing::warn!(file = %p.display(), "Unreadable spool file set aside.");
                    let _ = std::fs::rename(&p, p.with_extension("bad"));
                }
            }
        }
        out
    }
}
