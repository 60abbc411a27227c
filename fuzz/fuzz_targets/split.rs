//! The delivery splitter (`tunnel_delivery::split`) on arbitrary text and limits.
//! Properties: every part is within the limit and not blank; with fences on (limit >= 16) every
//! part has balanced code fences; the parts keep all of the text, in order: with the fence lines
//! and whitespace taken out of both, the parts joined are the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_delivery::{split, text_len};

#[path = "fences.rs"]
mod fences;
use fences::{fences_at_line_starts, open_at_end};

/// A line that opens or closes a code fence: three or more backticks, then an info string
/// without backticks.
fn is_fence_line(line: &str) -> bool {
    let t = line.trim();
    let ticks = t.bytes().take_while(|&b| b == b'`').count();
    ticks >= 3 && !t[ticks..].contains('`')
}

fn content(text: &str) -> String {
    text.split('\n')
        .filter(|l| !is_fence_line(l))
        .flat_map(|l| l.chars())
        .filter(|c| !c.is_whitespace())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let [a, b, rest @ ..] = data else {
        return;
    };
    let limit = 1 + (usize::from(*a) << 8 | usize::from(*b)) % 4096;
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let parts = split(text, limit);
    for p in &parts {
        assert!(!p.trim().is_empty(), "a blank part");
        // With a limit of 1, one character of two UTF-16 units is taken anyway.
        assert!(
            text_len(p) <= limit || p.chars().count() == 1,
            "a part of {} units over the limit {limit}: {p:?}",
            text_len(p)
        );
        if limit >= 16 && fences_at_line_starts(text) {
            assert!(!open_at_end(p, limit), "a part leaves a fence open: {p:?}");
        }
    }
    if limit >= 16 {
        // A fence line longer than the limit is cut like any text; its pieces then count as
        // text, so compare only when every fence line fits.
        if fences_at_line_starts(text)
            && text
                .split('\n')
                .all(|l| !is_fence_line(l) || text_len(l) + 8 < limit / 2)
        {
            assert_eq!(
                content(&parts.join("\n")),
                content(text),
                "the parts lost or changed text"
            );
        }
    } else {
        let joined: String = parts
            .concat()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let want: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(joined, want, "the parts lost or changed text");
    }
    assert_eq!(parts.is_empty(), text.trim().is_empty());
});
