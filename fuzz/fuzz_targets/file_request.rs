//! File tasks (`{"op": "read" | "write" | "edit", "path": …}` as the prompt), run by the runner
//! itself in a project directory an attacker prepared: links to a folder and a file outside
//! it, a dangling link whose target is outside, a hard link to a file outside, a FIFO and a
//! `.git/config`. Properties: whatever the request, nothing outside the project is created,
//! changed or read (a secret kept outside never appears in an answer), `.git/` is never
//! written, and no request blocks (a FIFO opened for reading would hang the fuzzer).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tunnel_runner::fuzzing::file_request;

const SECRET: &str = "outside-secret-7f3a";
const GIT_CONFIG: &str = "[core]\n\tbare = false\n";

struct Dirs {
    _tmp: PathBuf,
    project: PathBuf,
    outside: PathBuf,
}

fn dirs() -> &'static Dirs {
    static DIRS: OnceLock<Dirs> = OnceLock::new();
    DIRS.get_or_init(|| {
        let tmp = std::env::temp_dir().join(format!("tunnel-fuzz-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let project = tmp.join("project");
        let outside = tmp.join("outside");
        std::fs::create_dir_all(&project).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), SECRET).unwrap();
        Dirs {
            _tmp: tmp,
            project,
            outside,
        }
    })
}

/// Every file under `dir` with its contents, sorted.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() && !meta.file_type().is_symlink() {
                stack.push(p.clone());
                out.push((p, vec![]));
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(prompt) = std::str::from_utf8(data) else {
        return;
    };
    let d = dirs();
    // A fresh project each time: a file, a folder, and a symlink leading out.
    let _ = std::fs::remove_dir_all(&d.project);
    std::fs::create_dir_all(d.project.join("src")).unwrap();
    std::fs::write(d.project.join("src/lib.rs"), "fn main() {}\n").unwrap();
    std::os::unix::fs::symlink(&d.outside, d.project.join("out")).unwrap();
    std::os::unix::fs::symlink(d.outside.join("secret"), d.project.join("link")).unwrap();
    std::os::unix::fs::symlink(d.outside.join("planted"), d.project.join("dangling")).unwrap();
    std::fs::hard_link(d.outside.join("secret"), d.project.join("hard")).unwrap();
    std::fs::create_dir_all(d.project.join(".git")).unwrap();
    std::fs::write(d.project.join(".git/config"), GIT_CONFIG).unwrap();
    nix::unistd::mkfifo(&d.project.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600))
        .unwrap();
    let before = snapshot(&d.outside);
    let answer = file_request(&d.project, prompt);
    assert_eq!(
        std::fs::read(d.project.join(".git/config")).unwrap(),
        GIT_CONFIG.as_bytes(),
        ".git/config changed: {prompt:?}"
    );
    if let Ok(text) = &answer {
        assert!(
            !text.contains(SECRET),
            "read outside the project: {prompt:?}"
        );
    }
    assert_eq!(
        snapshot(&d.outside),
        before,
        "changed outside the project: {prompt:?}"
    );
});
