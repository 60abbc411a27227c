//! The server under test: a `tunnel serve` child process, and what /proc says about it.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::db::BenchDb;

/// A running `tunnel serve`.
pub(crate) struct ServerProcess {
    child: Child,
    pub(crate) pid: u32,
    pub(crate) url: String,
    /// While `Some`, the server's "Task submitted.", "Task offered." and "Task attempt
    /// finished." log lines are kept here (their timestamps have microseconds).
    pub(crate) task_log: Arc<Mutex<Option<Vec<String>>>>,
}

impl ServerProcess {
    /// Starts `tunnel serve` on a free loopback port with a fresh database and waits until it
    /// logs the address it listens on.
    pub(crate) async fn start(
        tunnel: &Path,
        database: &BenchDb,
        durability: &str,
        token: &str,
    ) -> Result<ServerProcess> {
        let dir = match database {
            BenchDb::Sqlite(p) => p.parent().filter(|d| d.is_dir()).unwrap_or(Path::new("/")),
            BenchDb::Postgres { .. } => Path::new("/"),
        };
        let mut child = Command::new(tunnel)
            .args(["serve", "--port", "0", "--log-format", "json"])
            .arg("--listen")
            .arg("127.0.0.1")
            .arg("--database")
            .arg(database.server_arg())
            .args(["--durability", durability])
            // One token submits every task here (and the flood phase queues 200,000): no cap.
            .args(["--max-queued-per-token", "0"])
            // The parked phase holds thousands of long-polls with one token.
            .args(["--max-polls-per-token", "100000"])
            .env("WORKER_TOKEN", token)
            // The production log level (info: a line per submit, offer and finish), default
            // timeouts, and no config file or environment that could override the flags.
            .env_remove("RUST_LOG")
            .env_remove("TUNNEL_CONFIG")
            .env_remove("DATABASE_URL")
            .env_remove("TUNNEL_ACK_TIMEOUT")
            .env_remove("TUNNEL_LEASE")
            .env_remove("TUNNEL_MAX_BODY_BYTES")
            .env_remove("TUNNEL_MAX_QUEUE_TIME")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", tunnel.display()))?;
        let pid = child.id().context("the server exited at once")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        let address = loop {
            let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
                .await
                .context("the server did not announce its address within 30 s")??;
            let Some(line) = line else {
                bail!("the server exited before listening:\n{}", seen.join("\n"));
            };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(a) = v.pointer("/fields/address").and_then(|a| a.as_str())
            {
                break a.to_owned();
            }
            seen.push(line);
        };
        // Keep draining stderr so the server never blocks on a full pipe; show warnings.
        let task_log: Arc<Mutex<Option<Vec<String>>>> = Arc::default();
        let log = task_log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("\"WARN\"") || line.contains("\"ERROR\"") {
                    eprintln!("server: {line}");
                }
                if line.contains("\"Task offered.\"")
                    || line.contains("\"Task attempt finished.\"")
                    || line.contains("\"Task submitted.\"")
                {
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(l) = log.as_mut() {
                        l.push(line);
                    }
                }
            }
        });
        Ok(ServerProcess {
            child,
            pid,
            url: format!("http://{address}"),
            task_log,
        })
    }

    /// Resident memory now (VmRSS) and its high-water mark (VmHWM), in bytes.
    pub(crate) fn memory(&self) -> Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("cannot read the server's /proc status")?;
        let field = |name: &str| -> Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("no {name} in /proc status"))?;
            let kb: u64 = line[name.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("bad {name} line {line:?}"))?;
            Ok(kb * 1024)
        };
        Ok(Memory {
            rss: field("VmRSS:")?,
            hwm: field("VmHWM:")?,
        })
    }

    /// CPU time the server has used so far (user + system).
    pub(crate) fn cpu(&self) -> Result<Duration> {
        cpu_of(&format!("/proc/{}/stat", self.pid))
    }

    /// utime + stime of the server's threads whose name starts with `prefix` (the SQLite
    /// writer is `tunnel-sqlite-writer`, shown as `tunnel-sqlite-w`); zero if none.
    pub(crate) fn threads_cpu(&self, prefix: &str) -> Result<Duration> {
        let mut total = Duration::ZERO;
        for entry in std::fs::read_dir(format!("/proc/{}/task", self.pid))? {
            let dir = entry?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim_end().starts_with(prefix) {
                // A thread that ended between the listing and the read counts nothing.
                total += cpu_of(&dir.join("stat").to_string_lossy()).unwrap_or_default();
            }
        }
        Ok(total)
    }

    /// Stops the server with SIGTERM (graceful: long-polls answer 204, in-flight requests
    /// finish) and waits for it to exit.
    pub(crate) async fn stop(mut self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid);
        }
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("the server exited with {status} after SIGTERM");
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the server did not stop within 15 s of SIGTERM")
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    pub(crate) rss: u64,
    pub(crate) hwm: u64,
}

/// utime + stime of a process from its `/proc/<pid>/stat`.
pub(crate) fn cpu_of(stat_path: &str) -> Result<Duration> {
    let stat =
        std::fs::read_to_string(stat_path).with_context(|| format!("cannot read {stat_path}"))?;
    // The command name (field 2) may hold spaces; fields are counted after its ')'.
    let rest = &stat[stat.rfind(')').context("bad stat line")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz = clock_ticks_per_second();
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// `USER_HZ`, the unit of /proc CPU times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_second() -> u64 {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|hz| *hz > 0)
            .unwrap_or(100)
    })
}

/// The soft and hard open-file limits of a process, from `/proc/<pid>/limits`.
fn nofile_limits(pid: u32) -> Result<(u64, u64)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-files line in /proc limits")?;
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| {
            if w == "unlimited" {
                Some(u64::MAX)
            } else {
                w.parse().ok()
            }
        })
        .collect();
    match nums[..] {
        [soft, hard, ..] => Ok((soft, hard)),
        _ => bail!("cannot read the open-files limit from {line:?}"),
    }
}

/// Raises this process's open-file limit to at least `want` (children inherit it), with
/// util-linux `prlimit` (the workspace forbids the `unsafe` a direct setrlimit needs).
pub(crate) fn raise_nofile(want: u64) -> Result<()> {
    let me = std::process::id();
    let (soft, hard) = nofile_limits(me)?;
    if soft >= want {
        return Ok(());
    }
    // Up to the hard limit anyone may go; above it only root (CAP_SYS_RESOURCE).
    let new_hard = hard.max(want);
    let ok = std::process::Command::new("prlimit")
        .arg(format!("--pid={me}"))
        .arg(format!("--nofile={want}:{new_hard}"))
        .status()
        .is_ok_and(|s| s.success());
    let (soft, hard) = nofile_limits(me)?;
    if !ok || soft < want {
        bail!(
            "need {want} open files for the parked long-poll test but the limit is {soft} \
             (hard {hard}); raise it (ulimit -n {want}) or pass a smaller --parked"
        );
    }
    Ok(())
}
