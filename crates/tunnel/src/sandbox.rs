//! `tunnel __sandbox [--deny PATH]… [--allow PATH]… -- PROGRAM ARGS…`: the wrapper the runner
//! puts in front of every agent. It closes tunnel's own files (data and config directories:
//! admin token, database, spool, config with tokens) to itself with Landlock, then `exec`s the
//! agent, which inherits the restriction with everything it starts. Also, `PR_SET_DUMPABLE`
//! for tunnel's own processes. Hidden: the runner starts it, not a user.
//!
//! Landlock can only allow, never deny, and what a directory allows holds for everything
//! beneath it. So a denied path is closed by allowing everything *around* it: every ancestor
//! of a denied path gets only the right to list it, and every other entry of that ancestor
//! gets full access. The price: the agent cannot create new entries directly in those
//! ancestors (`/`, `/home`, `$HOME`, `~/.config`, `~/.local/share`…); existing ones work.
//! An `--allow` path inside a denied one (the default work directory lies in the data
//! directory) is opened again the same way.
//!
//! Landlock also keeps the agent from reading the memory or environment of processes outside
//! its domain (`/proc/<runner>/environ`, `/proc/<runner>/mem`), even as root, and from
//! signalling them (ABI ≥ 6).
//!
//! `tunnel __sandbox [--uid N --gid N] [--deny PATH]… --launch-on-stdin`: the same wrapper
//! started ahead of its task (the runner's warm agent process, already in the task's cgroup):
//! it waits for the task's `Launch` on stdin (the `--allow` directories, the directory to
//! enter, the program and arguments, the agent's `env`, whether stdin is /dev/null), then goes
//! on exactly as above.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

pub(crate) const SUBCOMMAND: &str = "__sandbox";

/// Makes this process non-dumpable: `/proc/<pid>/environ`, `/proc/<pid>/mem` and ptrace are
/// closed to other processes of the same user (not to root). Done first thing in `main`; an
/// `exec`ed child (an agent) gets its own, normal setting back.
pub(crate) fn not_dumpable() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("warning: cannot make tunnel non-dumpable: {e}");
    }
}

/// Whether this process is non-dumpable (for `tunnel doctor`).
pub(crate) fn is_not_dumpable() -> Option<bool> {
    #[cfg(target_os = "linux")]
    return nix::sys::prctl::get_dumpable().ok().map(|d| !d);
    #[cfg(not(target_os = "linux"))]
    None
}

/// The Landlock ABI this kernel offers, or why there is none.
pub(crate) fn landlock_abi() -> Result<u8, String> {
    #[cfg(target_os = "linux")]
    {
        imp::abi()
    }
    #[cfg(not(target_os = "linux"))]
    Err(format!(
        "Landlock is Linux only ({}); agents can read what this user can",
        std::env::consts::OS
    ))
}

// Only Linux applies `deny` and `allow`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct Args {
    /// Become this user (`run_as`; the runner is root).
    user: Option<(u32, u32)>,
    deny: Vec<PathBuf>,
    allow: Vec<PathBuf>,
    program: OsString,
    args: Vec<OsString>,
    /// Added to the environment (the agent's own `env`, from a launch).
    env: Vec<(String, String)>,
    /// The agent's stdin instead of the wrapper's (/dev/null, from a launch).
    stdin: Option<std::fs::File>,
}

/// What the wrapper runs: its arguments, or (`--launch-on-stdin`, a wrapper the runner started
/// ahead of its task) the arguments before that and the rest read from stdin.
enum Parsed {
    Now(Args),
    Waiting(Args),
}

fn parse(argv: Vec<OsString>) -> Result<Parsed, String> {
    let mut it = argv.into_iter();
    let (mut deny, mut allow) = (vec![], vec![]);
    let (mut uid, mut gid) = (None, None);
    let id = |v: Option<OsString>, what: &str| -> Result<u32, String> {
        v.and_then(|v| v.to_str()?.parse().ok())
            .ok_or_else(|| format!("{what} needs a number"))
    };
    loop {
        let Some(a) = it.next() else {
            return Err("missing `-- PROGRAM`".into());
        };
        match a.to_str() {
            Some("--uid") => uid = Some(id(it.next(), "--uid")?),
            Some("--gid") => gid = Some(id(it.next(), "--gid")?),
            Some("--deny") => deny.push(it.next().ok_or("--deny needs a path")?.into()),
            Some("--allow") => allow.push(it.next().ok_or("--allow needs a path")?.into()),
            Some(tunnel_runner::confine::LAUNCH_ON_STDIN) => {
                if let Some(extra) = it.next() {
                    return Err(format!(
                        "unexpected argument {extra:?} after the launch flag"
                    ));
                }
                return Ok(Parsed::Waiting(Args {
                    user: ids(uid, gid)?,
                    deny,
                    allow,
                    program: OsString::new(),
                    args: vec![],
                    env: vec![],
                    stdin: None,
                }));
            }
            Some("--") => break,
            _ => return Err(format!("unexpected argument {a:?}")),
        }
    }
    let program = it.next().ok_or("missing the program after --")?;
    Ok(Parsed::Now(Args {
        user: ids(uid, gid)?,
        deny,
        allow,
        program,
        args: it.collect(),
        env: vec![],
        stdin: None,
    }))
}

fn ids(uid: Option<u32>, gid: Option<u32>) -> Result<Option<(u32, u32)>, String> {
    match (uid, gid) {
        (Some(u), Some(g)) => Ok(Some((u, g))),
        (None, None) => Ok(None),
        _ => Err("--uid and --gid go together".into()),
    }
}

/// Waits for the task's launch on stdin (read unbuffered: what follows it is the agent's),
/// enters its directory (before the user changes, as the runner's `current_dir` did) and
/// completes `args` with it; the agent's stdin is /dev/null when the launch says so (opened
/// now, before the sandbox).
fn wait_for_launch(mut args: Args) -> Result<Args, String> {
    use std::os::fd::AsFd;
    let mut stdin = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .map_err(|e| format!("cannot read stdin: {e}"))?;
    let launch = tunnel_runner::confine::Launch::read_from(&mut stdin)
        .map_err(|e| format!("no launch on stdin: {e}"))?;
    drop(stdin);
    std::env::set_current_dir(&launch.dir)
        .map_err(|e| format!("cannot enter {}: {e}", launch.dir.display()))?;
    if launch.stdin_null {
        args.stdin = Some(std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?);
    }
    args.allow.extend(launch.allow);
    args.program = launch.program.into();
    args.args = launch.args.into_iter().map(OsString::from).collect();
    args.env = launch.env;
    Ok(args)
}

/// Runs the wrapper (`argv` after the subcommand); returns only if it fails: the runner then
/// sees the agent fail with this message, and nothing ran unconfined.
pub(crate) fn main(argv: Vec<OsString>) -> ExitCode {
    let parsed = parse(argv).and_then(|p| match p {
        Parsed::Now(a) => Ok(a),
        Parsed::Waiting(a) => wait_for_launch(a),
    });
    let mut args = match parsed {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tunnel sandbox: {e}");
            return ExitCode::from(126);
        }
    };
    if let Some((uid, gid)) = args.user
        && let Err(e) = become_user(uid, gid)
    {
        eprintln!("tunnel sandbox: cannot run the agent as uid {uid}: {e}");
        return ExitCode::from(126);
    }
    #[cfg(target_os = "linux")]
    if !args.deny.is_empty()
        && let Err(e) = imp::restrict(&args.deny, &args.allow)
    {
        eprintln!("tunnel sandbox: cannot confine the agent: {e}");
        return ExitCode::from(126);
    }
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(&args.program);
    cmd.args(&args.args).envs(std::mem::take(&mut args.env));
    if let Some(null) = args.stdin.take() {
        cmd.stdin(null);
    }
    let e = cmd.exec();
    eprintln!("tunnel sandbox: cannot start {:?}: {e}", args.program);
    ExitCode::from(127)
}

/// Drops to `uid`/`gid` for good: supplementary groups, then group, then user.
fn become_user(uid: u32, gid: u32) -> nix::Result<()> {
    use nix::unistd::{Gid, Uid, setgid, setuid};
    let gid = Gid::from_raw(gid);
    #[cfg(not(target_vendor = "apple"))]
    nix::unistd::setgroups(&[gid])?;
    setgid(gid)?;
    setuid(Uid::from_raw(uid))
}

#[cfg(target_os = "linux")]
mod imp {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use landlock::{
        ABI, Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope,
    };

    /// The rights handled (so denied unless allowed): every file-system right up to ABI 5
    /// (reading, writing, creating, removing, renaming across directories, truncating, device
    /// ioctls). Later rights (connecting to UNIX sockets, ABI 9) stay unrestricted.
    const ABI_USED: ABI = ABI::V5;

    pub(super) fn abi() -> Result<u8, String> {
        // Creating (not applying) a ruleset that requires each ABI in turn finds the highest.
        let mut found = None;
        for (n, abi) in [
            (1, ABI::V1),
            (2, ABI::V2),
            (3, ABI::V3),
            (4, ABI::V4),
            (5, ABI::V5),
            (6, ABI::V6),
            (7, ABI::V7),
        ] {
            let ok = Ruleset::default()
                .set_compatibility(CompatLevel::HardRequirement)
                .handle_access(AccessFs::from_all(abi))
                .and_then(|r| r.create())
                .is_ok();
            if !ok {
                break;
            }
            found = Some(n);
        }
        found.ok_or_else(|| {
            match Ruleset::default()
                .set_compatibility(CompatLevel::HardRequirement)
                .handle_access(AccessFs::from_all(ABI::V1))
                .and_then(|r| r.create())
            {
                Err(e) => format!(
                    "the kernel offers no Landlock ({e}); Linux ≥ 5.13 with `lsm=…,landlock` has it"
                ),
                Ok(_) => "unknown".into(),
            }
        })
    }

    /// What to allow so that `deny` is closed and everything else (with `allow`) stays open.
    #[derive(Debug, PartialEq)]
    pub(super) enum Rule {
        /// Only listing (an ancestor of something denied).
        List(PathBuf),
        /// Everything beneath.
        All(PathBuf),
    }

    pub(super) fn plan(deny: &[PathBuf], allow: &[PathBuf]) -> Vec<Rule> {
        // Compared by their real paths. A denied path that does not exist yet stays closed:
        // its existing ancestors get listing rights only, so nobody can create it.
        let real = |p: &PathBuf| -> Option<PathBuf> {
            let mut base = p.clone();
            let mut rest = Vec::new();
            loop {
                if let Ok(r) = base.canonicalize() {
                    return Some(rest.iter().rev().fold(r, |acc, c| acc.join(c)));
                }
                rest.push(base.file_name()?.to_owned());
                if !base.pop() {
                    return None;
                }
            }
        };
        let deny: BTreeSet<PathBuf> = deny.iter().filter_map(real).collect();
        let allow: BTreeSet<PathBuf> = allow.iter().filter_map(|p| p.canonicalize().ok()).collect();
        // An allowed path matters only inside a denied one; an allowed path that contains a
        // denied one loses (the denial wins).
        let allow: BTreeSet<PathBuf> = allow
            .into_iter()
            .filter(|a| deny.iter().any(|d| a.starts_with(d) && a != d))
            .collect();
        let marks: Vec<&PathBuf> = deny.iter().chain(allow.iter()).collect();
        let mut rules = Vec::new();
        walk(Path::new("/"), false, &deny, &allow, &marks, &mut rules);
        rules
    }

    /// `dir` is an ancestor of a mark (a denied or re-allowed path).
    fn walk(
        dir: &Path,
        inside_denied: bool,
        deny: &BTreeSet<PathBuf>,
        allow: &BTreeSet<PathBuf>,
        marks: &[&PathBuf],
        rules: &mut Vec<Rule>,
    ) {
        if !inside_denied {
            rules.push(Rule::List(dir.to_path_buf()));
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            // A symlink is opened through its target, which has its own place in this walk.
            if e.file_type().is_ok_and(|t| t.is_symlink()) {
                continue;
            }
            let is_denied = deny.contains(&p);
            let leads_to_mark = marks.iter().any(|m| m.starts_with(&p) && **m != p);
            if allow.contains(&p) {
                rules.push(Rule::All(p));
            } else if leads_to_mark {
                walk(&p, inside_denied || is_denied, deny, allow, marks, rules);
            } else if !inside_denied && !is_denied {
                rules.push(Rule::All(p));
            }
        }
    }

    pub(super) fn restrict(deny: &[PathBuf], allow: &[PathBuf]) -> Result<(), String> {
        let all = AccessFs::from_all(ABI_USED);
        let file = AccessFs::from_file(ABI_USED);
        let mut ruleset = Ruleset::default()
            .handle_access(all)
            .and_then(|r| r.scope(Scope::Signal))
            .and_then(|r| r.create())
            .map_err(|e| e.to_string())?;
        for rule in plan(deny, allow) {
            let (path, access) = match rule {
                Rule::List(p) => (p, AccessFs::ReadDir.into()),
                Rule::All(p) => {
                    let access = if p.is_dir() { all } else { file };
                    (p, access)
                }
            };
            // An entry that vanished meanwhile simply stays closed.
            let Ok(fd) = PathFd::new(&path) else { continue };
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let status = ruleset.restrict_self().map_err(|e| e.to_string())?;
        if status.ruleset == RulesetStatus::NotEnforced {
            return Err("the kernel enforced no Landlock rule".into());
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn denied_paths_are_closed_by_opening_what_surrounds_them() {
            let t = tempfile::tempdir().unwrap();
            let root = t.path().canonicalize().unwrap();
            for d in ["data/work/p", "data/spool", "other", "conf"] {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            std::fs::write(root.join("data/admin.token"), "x").unwrap();
            std::fs::write(root.join("file"), "x").unwrap();
            std::os::unix::fs::symlink(root.join("data"), root.join("link")).unwrap();
            let rules = plan(
                &[root.join("data"), root.join("conf/tunnel.toml")],
                &[root.join("data/work")],
            );
            let has = |r: Rule| rules.contains(&r);
            assert!(has(Rule::List("/".into())));
            assert!(has(Rule::List(root.clone())));
            assert!(has(Rule::All(root.join("other"))));
            assert!(has(Rule::All(root.join("file"))));
            assert!(has(Rule::All(root.join("data/work"))));
            // The config file does not exist: its folder is only listed.
            assert!(has(Rule::List(root.join("conf"))));
            for never in ["data", "data/spool", "data/admin.token", "link", "conf"] {
                assert!(!has(Rule::All(root.join(never))), "{never}: {rules:?}");
            }
            assert!(!has(Rule::List(root.join("data"))), "{rules:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_wrapper_started_ahead_takes_the_rest_from_stdin() {
        let Ok(Parsed::Waiting(a)) = parse(args(&[
            "--uid",
            "5",
            "--gid",
            "6",
            "--deny",
            "/d",
            tunnel_runner::confine::LAUNCH_ON_STDIN,
        ])) else {
            panic!("not waiting");
        };
        assert_eq!((a.user, a.deny), (Some((5, 6)), vec![PathBuf::from("/d")]));
        assert!(
            parse(args(&[tunnel_runner::confine::LAUNCH_ON_STDIN, "prog"])).is_err(),
            "nothing after the flag"
        );
        let Ok(Parsed::Now(a)) = parse(args(&["--deny", "/d", "--", "prog", "x"])) else {
            panic!("not now");
        };
        assert_eq!((a.program, a.args), ("prog".into(), args(&["x"])));
    }
}
