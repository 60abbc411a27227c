//! Starting an agent in its own process group and containment cell (see [`crate::contain`]),
//! reading its output, and stopping everything it started on timeout, cancel or shutdown.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;

use crate::adapter::Invocation;
use crate::confine::{self, Confinement};
use crate::contain::{Cell, MARK_VAR, Mechanism};

/// Longest stdout line kept whole; longer lines are cut (an agent cannot exhaust memory).
const MAX_LINE: usize = 1 << 20;
/// Bytes of stderr kept for the failure message.
const STDERR_TAIL: usize = 4_096;

/// A running agent.
pub(crate) struct Running {
    pub(crate) child: Child,
    /// The process group (= the agent's pid).
    pub(crate) pgid: i32,
    /// Stdout, line by line (lossy UTF-8); closed at EOF.
    pub(crate) lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_reader: Option<tokio::task::JoinHandle<()>>,
    /// See [`guard`].
    guard: Option<Child>,
    /// Everything the agent starts, wherever it goes.
    pub(crate) cell: Cell,
    /// When the agent started (see [`crate::contain::start_time`]), to recognise it later.
    pub(crate) start_time: Option<u64>,
    /// The sandboxed agent's temporary directory, removed with this.
    _tmp: Option<confine::AgentTmp>,
}

/// A process in the agent's group that kills the task's cell and the whole group when the
/// runner dies: it waits on a pipe whose only writer is the runner, and the kernel closes that
/// pipe however the runner ends (even SIGKILL). Without it an agent whose runner was killed
/// keeps running (and editing files) while its task is retried elsewhere. Being in the group,
/// it also keeps the group id from being reused while it lives. Disarmed (killed) when the
/// task ends normally.
fn guard(pgid: i32, cell: &Cell) -> Option<Child> {
    // The runner's own helper: the environment policy, not the agent's user or sandbox.
    confine::command("sh", &Confinement::default())
        .arg("-c")
        .arg(cell.guard_script())
        .arg(cell.guard_arg())
        .process_group(pgid)
        .kill_on_drop(true)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        // The agent may already be gone (nothing to guard).
        .ok()
}

pub(crate) fn spawn(
    inv: &Invocation,
    cwd: &Path,
    extra_env: &BTreeMap<String, String>,
    confine: &Confinement,
    containment: &Mechanism,
) -> std::io::Result<Running> {
    let cell = Cell::new(containment);
    let tmp = confine::AgentTmp::for_agent(confine);
    // The environment, the user and the sandbox are decided in `confine` for every child; the
    // cell's wrapper (entering the task's cgroup) goes in front of the sandbox wrapper.
    let (program, args) = confine::wrapped(confine, &inv.program, &inv.args, &[cwd]);
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let (program, args) = cell.wrap(Path::new(&program), &args);
    let mut cmd = confine::command(program, confine);
    cmd.args(args)
        .current_dir(cwd)
        .process_group(0)
        .kill_on_drop(true)
        .stdin(if inv.stdin.is_some() || inv.keep_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(tmp) = &tmp {
        for var in confine::TMP_VARS {
            cmd.env(var, &tmp.path);
        }
    }
    // The agent's own `env` from config wins, a temporary directory included.
    cmd.envs(extra_env);
    cmd.env(MARK_VAR, &cell.mark);
    if cell.cgroup.is_some() && find_program(&inv.program).is_none() {
        // Behind the wrapper a missing program would be a shell error, not a spawn error.
        cell.remove();
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "No such file or directory",
        ));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            cell.remove();
            return Err(e);
        }
    };
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    let start_time = crate::contain::start_time(pgid);

    // With `keep_stdin` the pipe stays in `child.stdin` for the caller (ACP speaks over it).
    if let Some(text) = inv.stdin.clone()
        && let Some(mut stdin) = child.stdin.take()
    {
        tokio::spawn(async move {
            // A CLI that exits without reading its stdin is not an error here.
            let _ = stdin.write_all(text.as_bytes()).await;
            let _ = stdin.shutdown().await;
        });
    }

    let (tx, lines) = mpsc::channel(1024);
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(read_lines(stdout, tx));
    }
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let mut stderr_reader = None;
    if let Some(mut err) = child.stderr.take() {
        let tail = stderr.clone();
        stderr_reader = Some(tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                t.extend_from_slice(&buf[..n]);
                if t.len() > STDERR_TAIL * 2 {
                    let cut = t.len() - STDERR_TAIL;
                    t.drain(..cut);
                }
            }
        }));
    }
    let guard = guard(pgid, &cell);
    Ok(Running {
        child,
        pgid,
        lines,
        stderr_reader,
        stderr,
        guard,
        cell,
        start_time,
        _tmp: tmp,
    })
}

async fn read_lines(stdout: tokio::process::ChildStdout, tx: mpsc::Sender<String>) {
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Read at most MAX_LINE bytes of one line; the rest of an over-long line is skipped.
        let n = match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if n == MAX_LINE && buf.last() != Some(&b'\n') {
            let mut skip = Vec::new();
            let _ = reader.read_until(b'\n', &mut skip).await;
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        if tx
            .send(String::from_utf8_lossy(&buf).into_owned())
            .await
            .is_err()
        {
            return;
        }
    }
}

impl Running {
    /// The last part of what the agent wrote to stderr (after reading it to the end, or for a
    /// moment if a leftover process still holds it open).
    pub(crate) async fn stderr_tail(&mut self) -> String {
        if let Some(reader) = self.stderr_reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;
        }
        let t = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let start = t.len().saturating_sub(STDERR_TAIL);
        String::from_utf8_lossy(&t[start..]).trim().to_owned()
    }

    fn guard_pid(&self) -> Option<i32> {
        self.guard.as_ref().and_then(|g| g.id()).map(|p| p as i32)
    }

    /// SIGTERM to the group and the whole cell, then SIGKILL after `grace` if the agent is
    /// still there.
    pub(crate) async fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        signal_group(self.pgid, Signal::SIGTERM);
        let (cell, root) = (self.cell.clone(), self.pgid);
        let _ =
            tokio::task::spawn_blocking(move || cell.signal_outside_group(root, Signal::SIGTERM))
                .await;
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(s)) => Some(s),
            _ => {
                signal_group(self.pgid, Signal::SIGKILL);
                self.child.wait().await.ok()
            }
        };
        self.reap_group().await;
        status
    }

    /// Whatever the agent left behind (a server it started, a `sleep &`, a command in a new
    /// session, a daemon) is stopped too: TERM, a moment, then KILL, to the whole cell and
    /// the group.
    pub(crate) async fn reap_group(&mut self) {
        let (cell, root, spare) = (self.cell.clone(), self.pgid, self.guard_pid());
        let _ = tokio::task::spawn_blocking(move || {
            if cell.signal(root, spare, Signal::SIGTERM) > 0 {
                std::thread::sleep(Duration::from_millis(200));
                cell.kill_all(root, spare);
            }
            cell.remove();
        })
        .await;
        // Then the guard: it is in the group and would keep it alive.
        if let Some(mut g) = self.guard.take() {
            let _ = g.kill().await;
        }
        if signal_group(self.pgid, Signal::SIGTERM) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            signal_group(self.pgid, Signal::SIGKILL);
        }
    }
}

/// Signals a process group; false if it no longer exists.
pub(crate) fn signal_group(pgid: i32, signal: Signal) -> bool {
    if pgid <= 1 {
        return false;
    }
    killpg(Pid::from_raw(pgid), signal).is_ok()
}

/// Whether a program can be found (a path, or a name on PATH).
pub(crate) fn find_program(program: &str) -> Option<std::path::PathBuf> {
    let p = Path::new(program);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|c| is_executable(c))
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `<program> --version`, first line, within a few seconds.
pub(crate) async fn version_of(program: &Path, confine: &Confinement) -> Option<String> {
    // As the agents run: same user, same sandbox, same environment.
    let (program, args) = confine::wrapped(
        confine,
        &program.to_string_lossy(),
        &["--version".to_owned()],
        &[],
    );
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        confine::command(program, confine)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?.trim();
    (!line.is_empty()).then(|| line.chars().take(100).collect())
}
