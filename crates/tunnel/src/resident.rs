//! Giving back the code pages that start-up touched (Linux).
//!
//! One `tunnel` binary holds the server, the runner, the CLI and the dashboard (24 MB in
//! release). Start-up runs code an idle server never runs again (argument parsing, logging
//! set-up, the store's migrations, building the router), and the kernel maps 64 KiB around
//! every page it touches ("fault-around"; `MADV_RANDOM` does not turn it off for file pages on
//! the kernels measured): an idle server had ~15 MiB of the binary's own pages resident and
//! ~3 MiB of memory of its own (docs/BENCHMARKS.md, round four). Those pages are the file's
//! page cache, mapped: dropping the mapping (`MADV_DONTNEED`) keeps them in the page cache and
//! the next use maps them again at the cost of a minor fault, so what stays resident is what
//! the server runs after start-up.
//!
//! Only mappings where that is exactly so are touched: file-backed, private, not writable, with
//! no page of their own (`Anonymous: 0 kB` in `/proc/self/smaps`: nothing was copied on write,
//! e.g. relocations, so every page reads back from the file as it was).

/// Drops the resident pages of the process's read-only file mappings (its binary and shared
/// libraries). Returns the bytes that were resident in them; `None` where this is not done or
/// `/proc` cannot be read.
#[cfg(target_os = "linux")]
pub(crate) fn release_startup_pages() -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut released = 0;
    for m in clean_file_mappings(&smaps) {
        if drop_pages(m.start, m.end - m.start) {
            released += m.rss_kib * 1024;
        }
    }
    Some(released)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn release_startup_pages() -> Option<u64> {
    None
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // One system call; its safety argument is below.
fn drop_pages(start: usize, len: usize) -> bool {
    use nix::sys::mman::{MmapAdvise, madvise};
    let Some(addr) = std::ptr::NonNull::new(std::ptr::with_exposed_provenance_mut(start)) else {
        return false;
    };
    // SAFETY: `start..start + len` is one whole mapping of this process, read from
    // /proc/self/smaps: private, file-backed, never writable, with no anonymous page (nothing
    // copied on write). MADV_DONTNEED on such a mapping only unmaps its pages; any later read
    // maps the same file contents again, so no reference into it (code, `&'static` data) can
    // see a change. Nothing can make it writable meanwhile (this process does not `mprotect`
    // its binary or libraries once loaded).
    unsafe { madvise(addr, len, MmapAdvise::MADV_DONTNEED) }.is_ok()
}

/// One mapping of `/proc/self/smaps` that may be dropped.
#[derive(Debug, PartialEq)]
struct Mapping {
    start: usize,
    end: usize,
    rss_kib: u64,
}

/// The mappings of an smaps text that are file-backed (an absolute path), private, not
/// writable, have resident pages and no anonymous one.
fn clean_file_mappings(smaps: &str) -> Vec<Mapping> {
    struct Current {
        start: usize,
        end: usize,
        eligible: bool,
        rss_kib: Option<u64>,
        anonymous_kib: Option<u64>,
    }
    fn finish(c: Option<Current>, out: &mut Vec<Mapping>) {
        if let Some(c) = c
            && c.eligible
            && c.anonymous_kib == Some(0)
            && let Some(rss_kib) = c.rss_kib.filter(|&r| r > 0)
        {
            out.push(Mapping {
                start: c.start,
                end: c.end,
                rss_kib,
            });
        }
    }
    let mut out = Vec::new();
    let mut current: Option<Current> = None;
    for line in smaps.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(first) = fields.next() else { continue };
        // A mapping's header: `start-end perms offset dev inode [path]`; its fields are
        // `Name: value kB`.
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            finish(current.take(), &mut out);
            let perms = fields.next().unwrap_or("").as_bytes();
            let path = fields.nth(3).unwrap_or("");
            current = Some(Current {
                start,
                end,
                eligible: end > start
                    && perms.len() == 4
                    && perms[1] == b'-'
                    && perms[3] == b'p'
                    && path.starts_with('/'),
                rss_kib: None,
                anonymous_kib: None,
            });
            continue;
        }
        let Some(c) = current.as_mut() else { continue };
        let value = fields.next().and_then(|v| v.parse::<u64>().ok());
        match first {
            "Rss:" => c.rss_kib = value,
            "Anonymous:" => c.anonymous_kib = value,
            _ => {}
        }
    }
    finish(current, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0400000 r--p 00000000 fd:01 1234                       /usr/bin/tunnel
Size:               4096 kB
Rss:                1024 kB
Anonymous:             0 kB
55d0c0400000-55d0c1000000 r-xp 00400000 fd:01 1234                       /usr/bin/tunnel
Size:              12288 kB
Rss:                9000 kB
Anonymous:             0 kB
55d0c1000000-55d0c1100000 r--p 01000000 fd:01 1234                       /usr/bin/tunnel
Size:               1024 kB
Rss:                1024 kB
Anonymous:          1024 kB
55d0c1100000-55d0c1200000 rw-p 01100000 fd:01 1234                       /usr/bin/tunnel
Size:               1024 kB
Rss:                  12 kB
Anonymous:            12 kB
7f0000000000-7f0000001000 r--s 00000000 fd:01 99                         /var/db/tunnel.db-shm
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
7f0000100000-7f0000200000 r-xp 00000000 fd:01 77                         /usr/lib/x86_64-linux-gnu/libc.so.6
Size:               1024 kB
Rss:                   0 kB
Anonymous:             0 kB
7f0000200000-7f0000300000 r-xp 00000000 fd:01 78                         /usr/lib/libm.so.6 (deleted)
Size:               1024 kB
Rss:                 600 kB
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
Size:                  8 kB
Rss:                   8 kB
Anonymous:             0 kB
7ffd00010000-7ffd00020000 ---p 00000000 00:00 0
Size:                 64 kB
Rss:                   0 kB
Anonymous:             0 kB
";

    #[test]
    fn only_clean_private_read_only_file_mappings() {
        assert_eq!(
            clean_file_mappings(SMAPS),
            vec![
                Mapping {
                    start: 0x55d0c0000000,
                    end: 0x55d0c0400000,
                    rss_kib: 1024
                },
                Mapping {
                    start: 0x55d0c0400000,
                    end: 0x55d0c1000000,
                    rss_kib: 9000
                },
                // Replaced on disk since: still the open file's pages.
                Mapping {
                    start: 0x7f0000200000,
                    end: 0x7f0000300000,
                    rss_kib: 600
                },
            ]
        );
    }

    #[test]
    fn a_mapping_without_an_anonymous_count_is_left_alone() {
        let text =
            "55d0c0400000-55d0c1000000 r-xp 00400000 fd:01 1234 /usr/bin/tunnel\nRss: 9000 kB\n";
        assert_eq!(clean_file_mappings(text), vec![]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_running_binary_is_found_and_survives_release() {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_string_lossy();
        assert!(
            smaps
                .lines()
                .any(|l| l.ends_with(exe.as_ref()) && l.contains(" r-xp ")),
            "no executable mapping of {exe}"
        );
        assert!(release_startup_pages().is_some_and(|b| b > 0));
        // Still runs, and reads its constants back as they were.
        assert_eq!(format!("{}", 6 * 7), "42");
        assert!(clean_file_mappings(SMAPS).len() == 3);
    }
}
