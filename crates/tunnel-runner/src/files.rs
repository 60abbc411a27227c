//! File tasks (the original's `file-read`, `file-write`, `file-edit`), done by the runner
//! itself, only inside the task's project directory.
//!
//! The prompt is a JSON request:
//! `{"op": "read", "path": "src/lib.rs"}`,
//! `{"op": "write", "path": "notes.txt", "content": "…", "encoding": "utf8" | "base64"}`,
//! `{"op": "edit", "path": "src/lib.rs", "old_string": "…", "new_string": "…", "replace_all": false}`.
//! Paths are relative to the project; anything that resolves outside it (`..`, an absolute
//! path, a symlink pointing out) is refused. Replacement text is literal (the original treated
//! `$&` in it as a pattern).

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Read {
        path: String,
    },
    Write {
        path: String,
        content: String,
        #[serde(default)]
        encoding: Encoding,
    },
    Edit {
        path: String,
        old_string: String,
        new_string: String,
        #[serde(default)]
        replace_all: bool,
    },
}

#[derive(Debug, Deserialize, Default, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Encoding {
    #[default]
    Utf8,
    Base64,
}

/// Runs one file request in `project`; the answer text, or what went wrong.
pub(crate) fn run(project: &Path, prompt: &str) -> Result<String, String> {
    let req: Request = serde_json::from_str(prompt).map_err(|e| {
        format!("a file task's prompt must be a JSON request ({{\"op\": \"read\" | \"write\" | \"edit\", \"path\": …}}): {e}")
    })?;
    match req {
        Request::Read { path } => {
            let p = inside(project, &path, true)?;
            std::fs::read_to_string(&p).map_err(|e| format!("cannot read {path}: {e}"))
        }
        Request::Write {
            path,
            content,
            encoding,
        } => {
            let p = inside(project, &path, false)?;
            let bytes = match encoding {
                Encoding::Utf8 => content.into_bytes(),
                Encoding::Base64 => base64(&content)
                    .ok_or_else(|| format!("{path}: content is not valid base64"))?,
            };
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create the folder of {path}: {e}"))?;
            }
            std::fs::write(&p, &bytes).map_err(|e| format!("cannot write {path}: {e}"))?;
            Ok(format!("File written: {path} ({} bytes)", bytes.len()))
        }
        Request::Edit {
            path,
            old_string,
            new_string,
            replace_all,
        } => {
            let p = inside(project, &path, true)?;
            let text =
                std::fs::read_to_string(&p).map_err(|e| format!("cannot read {path}: {e}"))?;
            if old_string.is_empty() {
                return Err("old_string must not be empty".into());
            }
            let found = text.matches(&old_string).count();
            let edited = match (found, replace_all) {
                (0, _) => return Err(format!("old_string not found in {path}")),
                (1, _) | (_, true) => text.replace(&old_string, &new_string),
                (n, false) => {
                    return Err(format!(
                        "old_string found {n} times in {path}; use replace_all or give more context"
                    ));
                }
            };
            std::fs::write(&p, edited).map_err(|e| format!("cannot write {path}: {e}"))?;
            Ok(format!(
                "File edited: {path} ({found} replacement{})",
                if found == 1 { "" } else { "s" }
            ))
        }
    }
}

/// `path` resolved inside `project`, or why not.
fn inside(project: &Path, path: &str, must_exist: bool) -> Result<PathBuf, String> {
    let rel = Path::new(path);
    if path.is_empty()
        || rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "{path:?} must be a relative path inside the project (no '..')"
        ));
    }
    let root = project
        .canonicalize()
        .map_err(|e| format!("the project directory: {e}"))?;
    let full = root.join(rel);
    // Resolve symlinks of what exists (the file, or its closest existing parent).
    let mut existing = full.clone();
    while !existing.exists() {
        if must_exist || !existing.pop() {
            return Err(format!("{path} does not exist"));
        }
    }
    let real = existing
        .canonicalize()
        .map_err(|e| format!("{path}: {e}"))?;
    if !real.starts_with(&root) {
        return Err(format!("{path} resolves outside the project"));
    }
    Ok(full)
}

fn base64(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let clean: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !clean.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        let mut pad = 0;
        for &c in chunk {
            let v = match c {
                b'=' => {
                    pad += 1;
                    0
                }
                _ if pad > 0 => return None,
                _ => ALPHABET.iter().position(|&a| a == c)? as u32,
            };
            n = (n << 6) | v;
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad.min(2)]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_edit_inside_the_project_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        assert_eq!(
            run(p, r#"{"op":"write","path":"a/b.txt","content":"x $& y"}"#).unwrap(),
            "File written: a/b.txt (6 bytes)"
        );
        assert_eq!(
            run(p, r#"{"op":"read","path":"a/b.txt"}"#).unwrap(),
            "x $& y"
        );
        run(
            p,
            r#"{"op":"edit","path":"a/b.txt","old_string":"x","new_string":"$&$&"}"#,
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(p.join("a/b.txt")).unwrap(),
            "$&$& $& y",
            "replacement is literal"
        );
        assert!(
            run(
                p,
                r#"{"op":"edit","path":"a/b.txt","old_string":"$&","new_string":"z"}"#
            )
            .unwrap_err()
            .contains("found 3 times")
        );
        run(
            p,
            r#"{"op":"write","path":"bin","content":"aGk=","encoding":"base64"}"#,
        )
        .unwrap();
        assert_eq!(std::fs::read(p.join("bin")).unwrap(), b"hi");

        for bad in [
            r#"{"op":"read","path":"../etc/passwd"}"#,
            r#"{"op":"read","path":"/etc/passwd"}"#,
            r#"{"op":"write","path":"x/../../y","content":""}"#,
        ] {
            assert!(
                run(p, bad).unwrap_err().contains("relative path inside"),
                "{bad}"
            );
        }
        std::os::unix::fs::symlink("/etc", p.join("out")).unwrap();
        assert!(
            run(p, r#"{"op":"read","path":"out/hostname"}"#)
                .unwrap_err()
                .contains("outside the project")
        );
        assert!(
            run(p, r#"{"op":"write","path":"out/evil","content":"x"}"#)
                .unwrap_err()
                .contains("outside the project")
        );
        assert!(run(p, "rm -rf /").unwrap_err().contains("JSON request"));
    }
}
