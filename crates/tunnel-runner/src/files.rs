//! File tasks (the original's `file-read`, `file-write`, `file-edit`), done by the runner
//! itself, only inside the task's project directory.
//!
//! The prompt is a JSON request:
//! `{"op": "read", "path": "src/lib.rs"}`,
//! `{"op": "write", "path": "notes.txt", "content": "…", "encoding": "utf8" | "base64"}`,
//! `{"op": "edit", "path": "src/lib.rs", "old_string": "…", "new_string": "…", "replace_all": false}`.
//! Paths are relative to the project; anything that could resolve outside it (`..`, an
//! absolute path, any symlink) is refused. Each component is opened relative to the previous
//! directory without following links (`openat` with `O_NOFOLLOW`), so a link swapped in
//! meanwhile cannot redirect it. Only regular files are read or written (a FIFO or a device
//! is refused without blocking); reads are bounded ([`MAX_READ`]); a write goes to a new file
//! renamed over the old one, so it never writes through a hard link or a link planted at the
//! last moment. Writes into version-control metadata (`.git/`, `.hg/`, `.svn/`, `.jj/`) are
//! refused unless the runner allows them: a `.git/config` or hook runs code on the next git
//! command. Replacement text is literal (the original treated `$&` in it as a pattern).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use serde::Deserialize;

/// Longest a file task may take before it is reported failed.
pub(crate) const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Largest file a file task reads or edits (its text goes back in one result).
pub(crate) const MAX_READ: u64 = 1 << 20;

/// Version-control metadata: writing there can run code (hooks, `core.fsmonitor`, …).
const VCS_DIRS: &[&str] = &[".git", ".hg", ".svn", ".jj"];

/// What the runner's config allows file tasks.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Options {
    /// Writes into `.git/` and the like.
    pub(crate) write_vcs: bool,
}

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

/// Runs one file request in `project`; the answer text, or what went wrong. Blocking: the
/// runner calls it off the async runtime.
pub(crate) fn run(project: &Path, prompt: &str, opts: Options) -> Result<String, String> {
    let req: Request = serde_json::from_str(prompt).map_err(|e| {
        format!("a file task's prompt must be a JSON request ({{\"op\": \"read\" | \"write\" | \"edit\", \"path\": …}}): {e}")
    })?;
    match req {
        Request::Read { path } => {
            let (dir, name) = resolve(project, &path, false)?;
            read(&dir, name, &path)
        }
        Request::Write {
            path,
            content,
            encoding,
        } => {
            let bytes = match encoding {
                Encoding::Utf8 => content.into_bytes(),
                Encoding::Base64 => base64(&content)
                    .ok_or_else(|| format!("{path}: content is not valid base64"))?,
            };
            writable(&path, opts)?;
            let (dir, name) = resolve(project, &path, true)?;
            write(&dir, name, &path, &bytes)?;
            Ok(format!("File written: {path} ({} bytes)", bytes.len()))
        }
        Request::Edit {
            path,
            old_string,
            new_string,
            replace_all,
        } => {
            if old_string.is_empty() {
                return Err("old_string must not be empty".into());
            }
            writable(&path, opts)?;
            let (dir, name) = resolve(project, &path, false)?;
            let text = read(&dir, name, &path)?;
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
            write(&dir, name, &path, edited.as_bytes())?;
            Ok(format!(
                "File edited: {path} ({found} replacement{})",
                if found == 1 { "" } else { "s" }
            ))
        }
    }
}

/// Refuses writes into version-control metadata unless allowed. Compared without case: on a
/// case-insensitive file system `.GIT/config` is `.git/config`.
fn writable(path: &str, opts: Options) -> Result<(), String> {
    if opts.write_vcs {
        return Ok(());
    }
    for c in Path::new(path).components() {
        if let Component::Normal(c) = c
            && let Some(vcs) = VCS_DIRS
                .iter()
                .find(|v| c.to_string_lossy().eq_ignore_ascii_case(v))
        {
            return Err(format!(
                "{path} is version-control metadata ({vcs}): file tasks do not write there (it can run code on the next {} command); the runner's `files_write_vcs = true` allows it",
                vcs.trim_start_matches('.')
            ));
        }
    }
    Ok(())
}

/// `path` checked and opened inside `project`: the directory holding its last component (each
/// component opened without following links), and that last component. `create`: missing
/// directories are made.
fn resolve<'p>(
    project: &Path,
    path: &'p str,
    create: bool,
) -> Result<(OwnedFd, &'p OsStr), String> {
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
    let parts: Vec<&OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let Some((name, dirs)) = parts.split_last() else {
        return Err(format!("{path:?} names no file"));
    };
    // The project itself is the runner's own setting: it may be reached through a link.
    let mut dir = nix::fcntl::open(
        project,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("the project directory {}: {e}", project.display()))?;
    let open_dir = |at: &OwnedFd, c: &OsStr| {
        openat(
            at,
            c,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    };
    for c in dirs {
        dir = match open_dir(&dir, c) {
            Ok(d) => d,
            Err(Errno::ENOENT) if create => {
                match mkdirat(&dir, *c, Mode::from_bits_truncate(0o777)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(format!("cannot create the folder of {path}: {e}")),
                }
                open_dir(&dir, c).map_err(|e| not_followed(path, c, e))?
            }
            Err(Errno::ENOENT) => return Err(format!("{path} does not exist")),
            Err(e) => return Err(not_followed(path, c, e)),
        };
    }
    Ok((dir, name))
}

/// Why a directory component could not be opened.
fn not_followed(path: &str, c: &OsStr, e: Errno) -> String {
    match e {
        Errno::ELOOP | Errno::ENOTDIR => format!(
            "{path}: {} is a link or not a folder; file tasks follow no links (a link may lead outside the project)",
            c.to_string_lossy()
        ),
        e => format!("{path}: {e}"),
    }
}

/// Refuses anything but a regular file with one name.
fn regular(st: &nix::sys::stat::FileStat, path: &str) -> Result<(), String> {
    let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    let what = match kind {
        SFlag::S_IFREG => None,
        SFlag::S_IFLNK => Some("a symbolic link (file tasks follow no links)"),
        SFlag::S_IFDIR => Some("a folder"),
        SFlag::S_IFIFO => Some("a FIFO"),
        SFlag::S_IFCHR | SFlag::S_IFBLK => Some("a device"),
        SFlag::S_IFSOCK => Some("a socket"),
        _ => Some("not a regular file"),
    };
    if let Some(what) = what {
        return Err(format!(
            "{path} is {what}; file tasks read and write regular files only"
        ));
    }
    if st.st_nlink > 1 {
        return Err(format!(
            "{path} has {} hard links (one may be a file outside the project); file tasks leave it alone",
            st.st_nlink
        ));
    }
    Ok(())
}

fn read(dir: &OwnedFd, name: &OsStr, path: &str) -> Result<String, String> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ENOENT => format!("{path} does not exist"),
        Errno::ELOOP => format!("{path} is a symbolic link; file tasks follow no links"),
        e => format!("cannot read {path}: {e}"),
    })?;
    let st = fstat(&fd).map_err(|e| format!("cannot read {path}: {e}"))?;
    regular(&st, path)?;
    if st.st_size as u64 > MAX_READ {
        return Err(format!(
            "{path} is {} bytes; file tasks read at most {MAX_READ} bytes",
            st.st_size
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_READ + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if bytes.len() as u64 > MAX_READ {
        return Err(format!(
            "{path} grew past {MAX_READ} bytes while it was read"
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("cannot read {path}: it is not UTF-8 text"))
}

/// Writes a new file next to the old one and renames it over: the old name's target (a hard
/// link, a link planted meanwhile) is never written through. Keeps an existing file's mode.
fn write(dir: &OwnedFd, name: &OsStr, path: &str, bytes: &[u8]) -> Result<(), String> {
    let mode = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => {
            regular(&st, path)?;
            Mode::from_bits_truncate(st.st_mode & 0o7777)
        }
        Err(Errno::ENOENT) => Mode::from_bits_truncate(0o666),
        Err(e) => return Err(format!("cannot write {path}: {e}")),
    };
    let tmp = format!(".{}.tunnel-{:016x}", name.to_string_lossy(), rand64());
    let fd = openat(
        dir,
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        mode,
    )
    .map_err(|e| format!("cannot write {path}: {e}"))?;
    let written = std::fs::File::from(fd)
        .write_all(bytes)
        .map_err(|e| format!("cannot write {path}: {e}"))
        .and_then(|()| {
            renameat(dir, tmp.as_str(), dir, name).map_err(|e| format!("cannot write {path}: {e}"))
        });
    if written.is_err() {
        let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    written
}

/// A name for a temporary file nobody can guess ahead.
fn rand64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
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

    fn run(p: &Path, prompt: &str) -> Result<String, String> {
        super::run(p, prompt, Options::default())
    }

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
                .contains("follow no links")
        );
        assert!(
            run(p, r#"{"op":"write","path":"out/evil","content":"x"}"#)
                .unwrap_err()
                .contains("follow no links")
        );
        assert!(run(p, "rm -rf /").unwrap_err().contains("JSON request"));
    }
}
