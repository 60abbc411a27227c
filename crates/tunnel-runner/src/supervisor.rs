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
    confine::command(crate::contain::sh(), &Confinement::default())
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
    if let Some(e) = missing_behind(&cell, &inv.program) {
        cell.remove();
        return Err(e);
    }
    // The environment, the user and the sandbox are decided in `confine` for every child.
    let (program, args) = confine::wrapped(confine, &inv.program, &inv.args, &[cwd]);
    let stdin = if inv.stdin.is_some() || inv.keep_stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let started = start_in_cell(cell, program, &args, cwd, stdin, extra_env, confine)?;
    Ok(started.running(inv))
}

/// The error a missing `program` gives: behind the cell's wrapper it would be a shell error,
/// not a spawn error, so it is looked for first.
fn missing_behind(cell: &Cell, program: &str) -> Option<std::io::Error> {
    (cell.cgroup.is_some() && find_program(program).is_none())
        .then(|| std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory"))
}

/// Starts `program` as every agent process starts: in a process group of its own and in
/// `cell` (the cell's wrapper, entering the task's cgroup, goes in front of `program`), with
/// the guard beside it, its own temporary directory, the agent's `extra_env` over it and the
/// cell's marker, stdout and stderr piped. The cell is removed if it cannot start.
fn start_in_cell(
    cell: Cell,
    program: std::ffi::OsString,
    args: &[std::ffi::OsString],
    cwd: &Path,
    stdin: Stdio,
    extra_env: &BTreeMap<String, String>,
    confine: &Confinement,
) -> std::io::Result<Warm> {
    let tmp = confine::AgentTmp::for_agent(confine);
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
        .stdin(stdin)
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
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            cell.remove();
            return Err(e);
        }
    };
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    let start_time = crate::contain::start_time(pgid);
    let guard = guard(pgid, &cell);
    Ok(Warm {
        child,
        pgid,
        start_time,
        cell,
        guard,
        tmp,
    })
}

/// Starts the agent of `inv`: in `warm` when there is one (see [`Warm`]), else as [`spawn`]
/// does. A warm process that is gone is discarded and the agent started the usual way.
pub(crate) async fn start(
    inv: &Invocation,
    cwd: &Path,
    extra_env: &BTreeMap<String, String>,
    confine: &Confinement,
    containment: &Mechanism,
    warm: Option<Warm>,
) -> std::io::Result<Running> {
    if let Some(warm) = warm {
        if let Some(e) = missing_behind(&warm.cell, &inv.program) {
            warm.discard().await;
            return Err(e);
        }
        match warm.launch(inv, cwd, extra_env).await {
            Ok(running) => return Ok(running),
            Err((warm, e)) => {
                tracing::debug!(error = %e, "The agent process started ahead is gone; starting one now.");
                warm.discard().await;
            }
        }
    }
    spawn(inv, cwd, extra_env, confine, containment)
}

/// An agent process started before its task, while the runner waits for work: in its own
/// process group and cell (the task's cgroup entered, the guard beside it, its temporary
/// directory made), with the environment policy applied, inside the `tunnel __sandbox`
/// wrapper, which waits on its stdin for the task's [`confine::Launch`] and then confines
/// itself and `exec`s the agent exactly as a wrapper started for the task would. What the
/// agent runs under is the same; what moves off the path from offer to agent is entering the
/// cgroup (the kernel waits for an RCU grace period: 10–30 ms on a busy machine), forking the
/// runner and starting the wrapper. Only with a wrapper (the wrapper reads the launch).
pub(crate) struct Warm {
    child: Child,
    pgid: i32,
    start_time: Option<u64>,
    cell: Cell,
    guard: Option<Child>,
    tmp: Option<confine::AgentTmp>,
}

impl Warm {
    /// Starts one (`None`: no wrapper, or it cannot be started).
    pub(crate) fn prepare(confine: &Confinement, containment: &Mechanism) -> Option<Warm> {
        let (program, args) = confine::waiting(confine)?;
        // The agent's directory and `env` come with the task's launch.
        let cell = Cell::new(containment);
        let started = start_in_cell(
            cell,
            program,
            &args,
            Path::new("/"),
            Stdio::piped(),
            &BTreeMap::new(),
            confine,
        );
        started
            .map_err(
                |e| tracing::debug!(error = %e, "Cannot start an agent process ahead of its task."),
            )
            .ok()
    }

    /// The task's process, once it runs `inv`.
    fn running(self, inv: &Invocation) -> Running {
        let Warm {
            child,
            pgid,
            start_time,
            cell,
            guard,
            tmp,
        } = self;
        Running::of(inv, child, pgid, start_time, cell, guard, tmp)
    }

    /// Tells the waiting wrapper what to run; the agent is then started as [`spawn`] starts it.
    async fn launch(
        mut self,
        inv: &Invocation,
        cwd: &Path,
        extra_env: &BTreeMap<String, String>,
    ) -> Result<Running, (Warm, std::io::Error)> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let e = std::io::Error::other(format!("it ended ({status})"));
            return Err((self, e));
        }
        let launch = confine::Launch {
            allow: vec![cwd.to_path_buf()],
            dir: cwd.to_path_buf(),
            program: inv.program.clone(),
            args: inv.args.clone(),
            // The marker is the cell's, as `spawn` sets it after the agent's own `env`.
            env: extra_env
                .iter()
                .filter(|(k, _)| k.as_str() != MARK_VAR)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            stdin_null: !(inv.stdin.is_some() || inv.keep_stdin),
        };
        let sent = match (launch.encode(), self.child.stdin.as_mut()) {
            (Ok(bytes), Some(stdin)) => stdin.write_all(&bytes).await,
            (Err(e), _) => Err(e),
            (_, None) => Err(std::io::Error::other("no stdin")),
        };
        if let Err(e) = sent {
            return Err((self, e));
        }
        if launch.stdin_null {
            // The agent reads /dev/null; the wrapper's pipe is of no more use.
            self.child.stdin = None;
        }
        Ok(self.running(inv))
    }

    /// Ends it (the wrapper, its guard, its cell).
    pub(crate) async fn discard(mut self) {
        signal_group(self.pgid, Signal::SIGKILL);
        let _ = self.child.wait().await;
        let (cell, root, spare) = (
            self.cell.clone(),
            self.pgid,
            self.guard.as_ref().and_then(|g| g.id()).map(|p| p as i32),
        );
        let _ = tokio::task::spawn_blocking(move || {
            cell.kill_all(root, spare);
            cell.remove();
        })
        .await;
        if let Some(mut g) = self.guard.take() {
            let _ = g.kill().await;
        }
    }
}

/// How long after a task took the warm process the next one is started: not at once, where
/// its fork, `exec`s and cgroup entry would compete with the agent just launched for the CPU
/// (tens of ms on a busy two-core machine); a task that comes sooner starts its agent as
/// before.
pub(crate) const REFILL_AFTER: Duration = Duration::from_millis(100);

/// Keeps one [`Warm`] agent process ready for the next task.
pub(crate) struct WarmSlot {
    confine: Confinement,
    containment: Mechanism,
    warm: Mutex<Option<Warm>>,
    filling: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
}

impl WarmSlot {
    pub(crate) fn new(confine: Confinement, containment: Mechanism) -> WarmSlot {
        WarmSlot {
            confine,
            containment,
            warm: Mutex::new(None),
            filling: Default::default(),
            closed: Default::default(),
        }
    }

    /// The process ready, if one is; [`WarmSlot::fill`] makes the next one.
    pub(crate) fn take(&self) -> Option<Warm> {
        self.warm.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Starts the next warm process in the background (after `after`), unless one is ready
    /// or being made.
    pub(crate) fn fill(self: &Arc<Self>, after: Duration) {
        use std::sync::atomic::Ordering;
        if self.confine.wrapper.is_none()
            || self.closed.load(Ordering::Acquire)
            || self
                .warm
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
            || self.filling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let slot = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if slot.closed.load(Ordering::Acquire) {
                return;
            }
            let warm = Warm::prepare(&slot.confine, &slot.containment);
            let extra = {
                let mut held = slot.warm.lock().unwrap_or_else(|p| p.into_inner());
                if slot.closed.load(Ordering::Acquire) || held.is_some() {
                    warm
                } else {
                    *held = warm;
                    None
                }
            };
            slot.filling.store(false, Ordering::Release);
            if let Some(w) = extra {
                w.discard().await;
            }
        });
    }

    /// No more warm processes; the one ready is ended.
    pub(crate) async fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(w) = self.take() {
            w.discard().await;
        }
    }
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
    /// The agent just started: its stdin written (`inv.stdin`) or kept (`keep_stdin`), its
    /// output read.
    fn of(
        inv: &Invocation,
        mut child: Child,
        pgid: i32,
        start_time: Option<u64>,
        cell: Cell,
        guard: Option<Child>,
        tmp: Option<confine::AgentTmp>,
    ) -> Running {
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
        Running {
            child,
            pgid,
            lines,
            stderr_reader,
            stderr,
            guard,
            cell,
            start_time,
            _tmp: tmp,
        }
    }

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
