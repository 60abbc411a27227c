//! File tasks through the real runner against a project an attacker prepared: links leading
//! out (dangling, or as a parent folder), a FIFO, a device, a huge file, `.git/config`.
//! Nothing outside the project is read or written, nothing blocks the runner, and every
//! refusal says why.

use std::path::Path;
use std::time::{Duration, Instant};

use tunnel_protocol::{Task, TaskState};
use tunnel_runner::AgentKind;

use crate::harness::{RunnerHandle, World, task};

async fn file_task(w: &World, prompt: &str) -> Task {
    let mut t = task("files", prompt);
    t.project = Some("proj".into());
    w.ended(&w.submit(t).await.id).await
}

fn error_of(t: &Task) -> String {
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    t.result.as_ref().unwrap().error.clone().unwrap_or_default()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_tasks_stay_inside_the_project_and_never_block() {
    let w = World::start().await;
    let proj = w.dir.path().join("proj");
    let outside = w.dir.path().join("outside");
    std::fs::create_dir_all(proj.join(".git")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "outside-secret").unwrap();
    std::fs::write(proj.join(".git/config"), "[core]\n").unwrap();
    let link =
        |target: &Path, name: &str| std::os::unix::fs::symlink(target, proj.join(name)).unwrap();
    // A link to a file that does not exist yet, outside: a write must not create it.
    link(&outside.join("planted"), "dangling");
    // A folder link: writing beneath it must not land outside.
    link(&outside, "linkdir");
    link(&outside.join("secret"), "secret-link");
    nix::unistd::mkfifo(
        &proj.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::fs::File::create(proj.join("huge"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    std::fs::hard_link(outside.join("secret"), proj.join("hardlink")).unwrap();
    let device = is_root()
        && std::process::Command::new("mknod")
            .arg(proj.join("null"))
            .args(["c", "1", "3"])
            .status()
            .is_ok_and(|s| s.success());

    let mut c = w.config("files");
    c.agents.insert(
        "files".into(),
        tunnel_runner::AgentConfig::builtin(AgentKind::Files, "files"),
    );
    c.projects.insert("proj".into(), proj.clone());
    let r = RunnerHandle::spawn(c);

    let started = Instant::now();
    let e = error_of(&file_task(&w, r#"{"op":"read","path":"pipe"}"#).await);
    assert!(e.contains("pipe is a FIFO"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a FIFO does not block: {:?}",
        started.elapsed()
    );
    let e = error_of(&file_task(&w, r#"{"op":"write","path":"pipe","content":"x"}"#).await);
    assert!(e.contains("pipe is a FIFO"), "{e}");

    let e = error_of(&file_task(&w, r#"{"op":"write","path":"dangling","content":"pwned"}"#).await);
    assert!(e.contains("symbolic link"), "{e}");
    assert!(!outside.join("planted").exists(), "nothing written outside");

    let e = error_of(
        &file_task(
            &w,
            r#"{"op":"write","path":"linkdir/new","content":"pwned"}"#,
        )
        .await,
    );
    assert!(e.contains("follow no links"), "{e}");
    assert!(!outside.join("new").exists());
    let e = error_of(&file_task(&w, r#"{"op":"read","path":"linkdir/secret"}"#).await);
    assert!(e.contains("follow no links"), "{e}");
    let e = error_of(&file_task(&w, r#"{"op":"read","path":"secret-link"}"#).await);
    assert!(e.contains("symbolic link"), "{e}");

    let e = error_of(&file_task(&w, r#"{"op":"read","path":"hardlink"}"#).await);
    assert!(e.contains("hard links"), "{e}");
    let e = error_of(&file_task(&w, r#"{"op":"write","path":"hardlink","content":"pwned"}"#).await);
    assert!(e.contains("hard links"), "{e}");
    assert_eq!(
        std::fs::read_to_string(outside.join("secret")).unwrap(),
        "outside-secret"
    );

    let e = error_of(&file_task(&w, r#"{"op":"read","path":"huge"}"#).await);
    assert!(e.contains("at most 1048576 bytes"), "{e}");

    if device {
        let e = error_of(&file_task(&w, r#"{"op":"read","path":"null"}"#).await);
        assert!(e.contains("null is a device"), "{e}");
    } else {
        eprintln!("not root: the device case is skipped (mknod needs CAP_MKNOD)");
    }

    for p in [
        ".git/config",
        ".GIT/config",
        "sub/.git/hooks/pre-commit",
        ".hg/hgrc",
        ".jj/repo/config",
    ] {
        let e = error_of(
            &file_task(
                &w,
                &format!(r#"{{"op":"write","path":"{p}","content":"[core]\nfsmonitor = evil\n"}}"#),
            )
            .await,
        );
        assert!(e.contains("version-control metadata"), "{p}: {e}");
    }
    let e = error_of(
        &file_task(&w, r#"{"op":"edit","path":".git/config","old_string":"[core]","new_string":"[core]\nfsmonitor = evil"}"#).await,
    );
    assert!(e.contains("version-control metadata"), "{e}");
    assert_eq!(
        std::fs::read_to_string(proj.join(".git/config")).unwrap(),
        "[core]\n"
    );

    let e = error_of(&file_task(&w, r#"{"op":"read","path":"../outside/secret"}"#).await);
    assert!(e.contains("inside the project"), "{e}");

    // And the files agent still works, in a new folder too; reading .git is fine.
    let ok = file_task(&w, r#"{"op":"write","path":"a/b/c.txt","content":"hello"}"#).await;
    assert_eq!(ok.state, TaskState::Succeeded, "{ok:?}");
    assert_eq!(
        std::fs::read_to_string(proj.join("a/b/c.txt")).unwrap(),
        "hello"
    );
    let ok = file_task(&w, r#"{"op":"read","path":".git/config"}"#).await;
    assert_eq!(ok.result.unwrap().text.as_deref(), Some("[core]\n"));
    assert!(
        std::fs::read_dir(&outside).unwrap().count() == 1,
        "nothing new outside the project"
    );
    r.stop().await.unwrap();
    w.stop().await;
}
