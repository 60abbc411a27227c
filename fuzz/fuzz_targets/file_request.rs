//! File tasks (`{"op": "read" | "write" | "edit", "path": …}` as the prompt), run by the runner
//! itself in a project directory that holds a symlink to a directory outside it. Property:
//! whatever the request, nothing outside the project is created, changed or read (a secret
//! kept outside never appears in an answer).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tunnel_runner::fuzzing::file_request;

const SECRET: &str = "outside-secret-7f3a";

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
            if meta.is_dir() {
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
    let before = snapshot(&d.outside);
    let answer = file_request(&d.project, prompt);
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
