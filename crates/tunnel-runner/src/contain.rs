//! Containment: everything an agent starts ends with its task.
//!
//! An agent's process group is not enough: Claude's Bash tool starts each command in a new
//! session, and any program may `setsid`, double-fork or daemonize. So each task gets a cell:
//!
//! - **cgroup v2** (Linux, when the runner can create a cgroup under its own, as root or in a
//!   systemd user slice with a delegated cgroup): the agent enters the task's own cgroup
//!   before it runs (a `sh` wrapper moves itself there, then `exec`s the agent), so everything
//!   it starts stays inside whatever it does with sessions and parents, and `cgroup.kill` ends
//!   them all at once.
//! - **process-tree walk** (elsewhere): every agent carries a random marker in its environment;
//!   the process table is walked for the agent's descendants, its process group, the sessions
//!   they lead and the marker, and each found process is killed, until none is left. A process
//!   that both leaves the tree (re-parented) and clears its environment can escape this.
//!
//! The runner's own death (even SIGKILL) is covered by the guard process (see
//! `supervisor::guard`), which uses the same cell, and by the spool: a restarted runner
//! ends what the cell still holds, after checking that it is still what it started.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::Deserialize;

/// The environment variable that marks every process of one task run (value: the cell id).
pub(crate) const MARK_VAR: &str = "TUNNEL_TASK_MARK";
/// Prefix of the cgroups the runner creates (a restarted runner removes only these).
const CGROUP_PREFIX: &str = "tunnel-";

/// What the runner may use to contain agents (`containment` under `[runner]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Containment {
    /// A cgroup v2 per task where the runner can create one, else the process-tree walk.
    #[default]
    Auto,
    /// Always the process-tree walk.
    ProcessTree,
}

/// The mechanism in force on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    /// Task cgroups are made under this directory.
    CgroupV2(PathBuf),
    /// The process-tree walk; why cgroups are not used.
    ProcessTree(String),
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mechanism::CgroupV2(dir) => write!(
                f,
                "cgroup v2: each task in its own cgroup under {}, ended with cgroup.kill (catches setsid, daemons, re-parented processes)",
                dir.display()
            ),
            Mechanism::ProcessTree(why) => write!(
                f,
                "process-tree walk ({why}): descendants, process group, sessions and an environment marker are killed; a process that leaves the tree and clears its environment can escape"
            ),
        }
    }
}

impl Mechanism {
    /// Whether every descendant is contained whatever it does with sessions and parents.
    pub fn is_complete(&self) -> bool {
        matches!(self, Mechanism::CgroupV2(_))
    }
}

/// Finds what this machine offers (creates and removes a probe cgroup).
pub fn detect(choice: Containment) -> Mechanism {
    if choice == Containment::ProcessTree {
        return Mechanism::ProcessTree("chosen in the config".into());
    }
    #[cfg(target_os = "linux")]
    {
        match cgroup_parent() {
            Ok(dir) => Mechanism::CgroupV2(dir),
            Err(why) => Mechanism::ProcessTree(why),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        Mechanism::ProcessTree("no cgroups on this system".into())
    }
}

fn unique(kind: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{CGROUP_PREFIX}{kind}-{}-{}-{nanos:08x}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The `sh` script that moves itself into the cgroup `$0`, then becomes the program: the
/// agent is inside before it runs a single instruction of its own (no race with its forks).
const ENTER: &str = r#"echo 0 > "$0/cgroup.procs" || { echo "tunnel: cannot enter the task's cgroup $0" >&2; exit 125; }; exec "$@""#;

/// `sh`, found once on PATH: a command whose program is a path is started with `posix_spawn`
/// (no copy of the runner's address space); with a bare name and its own environment, std
/// forks the whole runner first.
pub(crate) fn sh() -> &'static std::ffi::OsStr {
    static SH: std::sync::OnceLock<OsString> = std::sync::OnceLock::new();
    SH.get_or_init(|| {
        crate::supervisor::find_program("sh").map_or_else(|| "sh".into(), PathBuf::into_os_string)
    })
}

/// Where the cgroup v2 hierarchy is mounted.
fn cgroup2_mount() -> Result<PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    // "… mount-point … - cgroup2 …": field 5 is the mount point, the type follows " - ".
    Ok(mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or("no cgroup v2 hierarchy is mounted")?)
}

/// The cgroup v2 directory of this process, if a child cgroup can be made there, entered and
/// killed.
#[cfg(target_os = "linux")]
fn cgroup_parent() -> Result<PathBuf, String> {
    let mount = cgroup2_mount()?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2")?;
    let own = own.trim().trim_matches('/');
    let parent = if own.is_empty() {
        mount
    } else {
        mount.join(own)
    };
    let probe = parent.join(unique("probe"));
    std::fs::create_dir(&probe).map_err(|e| {
        format!(
            "cannot create a cgroup under {} ({e}); a systemd user service gets a delegated one",
            parent.display()
        )
    })?;
    let result = (|| {
        if !probe.join("cgroup.kill").exists() {
            return Err("the kernel has no cgroup.kill (Linux 5.14 or later needed)".to_owned());
        }
        let entered = std::process::Command::new("sh")
            .args(["-c", ENTER, &probe.display().to_string(), "true"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !entered {
            return Err(format!(
                "cannot move a process into a cgroup under {}",
                parent.display()
            ));
        }
        Ok(parent.clone())
    })();
    remove_cgroup(&probe);
    result
}

fn remove_cgroup(dir: &Path) {
    // The last process may still be exiting: rmdir fails with EBUSY for a moment.
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    tracing::warn!(cgroup = %dir.display(), "Could not remove a task's cgroup.");
}

/// One task run's containment.
#[derive(Debug, Clone)]
pub(crate) struct Cell {
    /// The marker value (`MARK_VAR`) in the agent's environment.
    pub(crate) mark: String,
    /// The task's cgroup, when cgroups are in use.
    pub(crate) cgroup: Option<PathBuf>,
}

impl Cell {
    /// A new cell; a cgroup that cannot be made falls back to the process-tree walk.
    pub(crate) fn new(mech: &Mechanism) -> Cell {
        let name = unique("task");
        let mark = name.trim_start_matches(CGROUP_PREFIX).to_owned();
        let cgroup = match mech {
            Mechanism::CgroupV2(parent) => {
                let dir = parent.join(&name);
                match std::fs::create_dir(&dir) {
                    Ok(()) => Some(dir),
                    Err(e) => {
                        tracing::warn!(cgroup = %dir.display(), error = %e, "Cannot create the task's cgroup; using the process-tree walk.");
                        None
                    }
                }
            }
            Mechanism::ProcessTree(_) => None,
        };
        Cell { mark, cgroup }
    }

    /// The program and arguments that run `program args` inside the cell.
    pub(crate) fn wrap(&self, program: &Path, args: &[String]) -> (OsString, Vec<OsString>) {
        match &self.cgroup {
            Some(dir) => {
                let mut argv: Vec<OsString> = vec![
                    "-c".into(),
                    ENTER.into(),
                    dir.clone().into_os_string(),
                    program.as_os_str().to_owned(),
                ];
                argv.extend(args.iter().map(OsString::from));
                (sh().to_owned(), argv)
            }
            None => (
                program.as_os_str().to_owned(),
                args.iter().map(OsString::from).collect(),
            ),
        }
    }

    /// For the task's events.
    pub(crate) fn describe(&self) -> String {
        match &self.cgroup {
            Some(dir) => format!("containment: cgroup v2 ({})", dir.display()),
            None => format!(
                "containment: process-tree walk (marker {MARK_VAR}={})",
                self.mark
            ),
        }
    }

    /// The `sh` script of the guard process (`$0` is its argument, see [`Cell::guard_arg`]):
    /// on the runner's death it ends the whole cell, then the agent's process group.
    pub(crate) fn guard_script(&self) -> &'static str {
        match &self.cgroup {
            // The guard is outside the cgroup: it removes it once empty, then ends the group.
            Some(_) => {
                r#"read _; echo 1 > "$0/cgroup.kill"; for i in 1 2 3 4 5 6 7 8 9 10; do rmdir "$0" 2>/dev/null && break; sleep 0.1; done; kill -KILL 0"#
            }
            // Two passes: a process may fork while the first one runs.
            None if cfg!(target_os = "linux") => {
                r#"read _; for i in 1 2; do for e in $(grep -lzx "TUNNEL_TASK_MARK=$0" /proc/[0-9]*/environ 2>/dev/null); do p=${e#/proc/}; kill -KILL "${p%/environ}" 2>/dev/null; done; done; kill -KILL 0"#
            }
            None => "read _; kill -KILL 0",
        }
    }

    pub(crate) fn guard_arg(&self) -> OsString {
        match &self.cgroup {
            Some(dir) => dir.clone().into_os_string(),
            None => self.mark.clone().into(),
        }
    }

    /// Sends `signal` to every process of the cell outside the agent's process group `root`
    /// (the group gets its own signal: a second SIGTERM can mean "quit now" to a CLI).
    pub(crate) fn signal_outside_group(&self, root: i32, signal: Signal) -> usize {
        let groups: std::collections::HashMap<i32, i32> =
            table().into_iter().map(|p| (p.pid, p.pgrp)).collect();
        let pids: Vec<i32> = self
            .members(root, None)
            .into_iter()
            .filter(|p| groups.get(p) != Some(&root))
            .collect();
        for &p in &pids {
            let _ = kill(Pid::from_raw(p), signal);
        }
        pids.len()
    }

    /// Sends `signal` to every process of the cell (the agent `root` included, `spare` not);
    /// how many.
    pub(crate) fn signal(&self, root: i32, spare: Option<i32>, signal: Signal) -> usize {
        let pids = self.members(root, spare);
        for &p in &pids {
            let _ = kill(Pid::from_raw(p), signal);
        }
        pids.len()
    }

    /// The processes of the cell now (but `spare`: the guard, which is in the agent's group).
    pub(crate) fn members(&self, root: i32, spare: Option<i32>) -> Vec<i32> {
        let mut pids = match &self.cgroup {
            Some(dir) => cgroup_procs(dir),
            None => tree_members(root, &self.mark),
        };
        pids.retain(|&p| Some(p) != spare);
        pids
    }

    /// Kills every process of the cell and waits (up to a few seconds) until none is left.
    /// Blocking: call it off the async runtime.
    pub(crate) fn kill_all(&self, root: i32, spare: Option<i32>) -> usize {
        let started = Instant::now();
        let mut killed = 0;
        while started.elapsed() < Duration::from_secs(5) {
            match &self.cgroup {
                Some(dir) => {
                    if !populated(dir) {
                        return killed;
                    }
                    killed = killed.max(cgroup_procs(dir).len());
                    // Atomic for the whole subtree, forks included.
                    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
                        // An old kernel or a vanished cgroup: one by one.
                        for p in cgroup_procs(dir) {
                            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                        }
                    }
                }
                None => {
                    let pids = self.members(root, spare);
                    if pids.is_empty() {
                        return killed;
                    }
                    killed += pids.len();
                    for p in pids {
                        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(mark = %self.mark, "Processes of a task survived SIGKILL for 5 s.");
        killed
    }

    /// Removes the task's cgroup (once empty).
    pub(crate) fn remove(&self) {
        if let Some(dir) = &self.cgroup {
            remove_cgroup(dir);
        }
    }
}

fn populated(dir: &Path) -> bool {
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(ev) => ev.lines().any(|l| l == "populated 1"),
        Err(_) => false,
    }
}

fn cgroup_procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// One row of the process table.
#[derive(Debug, Clone, Copy)]
struct Proc {
    pid: i32,
    ppid: i32,
    pgrp: i32,
    session: i32,
}

/// `/proc/<pid>/stat`: (ppid, pgrp, session, start time in clock ticks since boot).
#[cfg(target_os = "linux")]
fn stat(pid: i32) -> Option<(i32, i32, i32, u64)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// See [`stat`]; `None` for a zombie.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_stat(s: &str) -> Option<(i32, i32, i32, u64)> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let f: Vec<&str> = s.get(s.rfind(')')? + 1..)?.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    if f.first() == Some(&"Z") {
        return None;
    }
    Some((
        f.get(1)?.parse().ok()?,
        f.get(2)?.parse().ok()?,
        f.get(3)?.parse().ok()?,
        f.get(19)?.parse().ok()?,
    ))
}

/// When a process started (clock ticks since boot; Linux), to tell it from a later process
/// with the same pid.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        stat(pid).map(|s| s.3)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        None
    }
}

#[cfg(target_os = "linux")]
fn table() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let (ppid, pgrp, session, _) = stat(pid)?;
            Some(Proc {
                pid,
                ppid,
                pgrp,
                session,
            })
        })
        .collect()
}

/// Elsewhere (macOS): `ps`, which shows every process of the user.
#[cfg(not(target_os = "linux"))]
fn table() -> Vec<Proc> {
    let Ok(out) = std::process::Command::new("ps")
        // No session id: macOS's `sess` is a kernel address.
        .args(["-A", "-o", "pid=,ppid=,pgid="])
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<i32> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            Some(Proc {
                pid: *f.first()?,
                ppid: *f.get(1)?,
                pgrp: *f.get(2)?,
                session: 0,
            })
        })
        .collect()
}

fn has_mark(pid: i32, mark: &str) -> bool {
    if !cfg!(target_os = "linux") {
        return false;
    }
    let want = format!("{MARK_VAR}={mark}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == want.as_bytes()))
}

/// The processes of a task without a cgroup: the agent `root`, its process group, anything
/// carrying the marker, and (until nothing changes) the children, group members and session
/// members of those.
fn tree_members(root: i32, mark: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let procs = table();
    let mut found: std::collections::BTreeSet<i32> = procs
        .iter()
        .filter(|p| p.pid != me)
        .filter(|p| p.pid == root || (root > 1 && p.pgrp == root) || has_mark(p.pid, mark))
        .map(|p| p.pid)
        .collect();
    loop {
        let before = found.len();
        for p in &procs {
            if p.pid != me
                && p.pid > 1
                && (found.contains(&p.ppid)
                    || found.contains(&p.pgrp)
                    || (p.session > 1 && found.contains(&p.session)))
            {
                found.insert(p.pid);
            }
        }
        if found.len() == before {
            break;
        }
    }
    found.into_iter().collect()
}

/// What an earlier run of the runner recorded about a task's processes (in the spool).
#[derive(Debug, Clone, Default)]
pub(crate) struct Leftover {
    pub(crate) pgid: Option<i32>,
    /// The start time of the process `pgid` (the agent), see [`start_time`].
    pub(crate) pgid_start: Option<u64>,
    pub(crate) cgroup: Option<PathBuf>,
    pub(crate) mark: Option<String>,
}

/// Ends what an earlier run left, never an unrelated process: a cgroup only if it is one the
/// runner makes; marked processes (the marker is unique to the task run); the process group
/// only while its leader is still the agent (same start time). Blocking. Returns what was
/// done, for the log.
pub(crate) fn end_leftover(l: &Leftover) -> Vec<String> {
    let mut done = Vec::new();
    if let Some(dir) = &l.cgroup {
        // Only a cgroup (inside the cgroup v2 mount) of the name the runner gives.
        let ours = cgroup2_mount().is_ok_and(|m| dir.starts_with(m))
            && !dir
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            && dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(CGROUP_PREFIX))
            && dir.join("cgroup.procs").exists();
        if ours {
            let cell = Cell {
                mark: String::new(),
                cgroup: Some(dir.clone()),
            };
            let n = cell.kill_all(0, None);
            cell.remove();
            done.push(format!(
                "killed {n} process(es) of cgroup {}",
                dir.display()
            ));
        }
    }
    if let Some(mark) = l.mark.as_deref().filter(|m| !m.is_empty()) {
        let me = std::process::id() as i32;
        let marked: Vec<i32> = table()
            .iter()
            .filter(|p| p.pid != me && has_mark(p.pid, mark))
            .map(|p| p.pid)
            .collect();
        for &p in &marked {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        if !marked.is_empty() {
            done.push(format!("killed {} marked process(es)", marked.len()));
        }
    }
    if let Some(pgid) = l.pgid.filter(|&p| p > 1) {
        match (start_time(pgid), l.pgid_start) {
            (Some(now), Some(then)) if now == then => {
                if killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok() {
                    done.push(format!("killed process group {pgid}"));
                }
            }
            // The agent is gone: the group id may since have been taken by a process that
            // reused the pid and left children. What the agent left is the cell's (above).
            (None, _) => {}
            _ => {
                tracing::warn!(
                    pgid,
                    "Process {pgid} is no longer the agent this runner started (pid reused); not signalled."
                );
                done.push(format!(
                    "process group {pgid} left alone: its leader is another process now"
                ));
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name_whatever_it_holds() {
        // A command may name itself ") S 1 1 1" to fool a naive parser.
        let line = "4242 (evil) S 1 1 1 x) R 77 4242 4100 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_stat(line), Some((77, 4242, 4100, 987654)));
        let zombie =
            "4243 (gone) Z 77 4242 4100 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987655 0 0";
        assert_eq!(parse_stat(zombie), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_recorded_cgroup_that_is_not_the_runners_is_left_alone() {
        let dir = std::env::temp_dir().join(format!("not-a-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        let done = end_leftover(&Leftover {
            cgroup: Some(dir.clone()),
            ..Default::default()
        });
        assert!(done.is_empty(), "{done:?}");
        assert!(dir.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
