//! Fence checks shared by the `split` and `render` targets (the splitter's own rules,
//! restated independently of it).

/// Whether a fence is left open at the end of `text` (the splitter's own rule, restated). A
/// fence too long to close and reopen within the limit is plain text.
pub fn open_at_end(text: &str, limit: usize) -> bool {
    let mut open: Option<usize> = None;
    for line in text.split('\n') {
        let t = line.trim_start().trim_end_matches('\r');
        let ticks = t.bytes().take_while(|&b| b == b'`').count();
        open = match open {
            None if ticks >= 3 && !t[ticks..].contains('`') && 2 * ticks + 4 <= limit => {
                Some(ticks)
            }
            None => None,
            Some(n) if ticks >= n && t[ticks..].trim().is_empty() => None,
            Some(n) => Some(n),
        };
    }
    open.is_some()
}

/// Whether the text's code fences are the ordinary kind: every run of three or more backticks
/// is a whole fence line of 3 to 5 backticks, indented by at most 3 spaces, and an
/// optional info word (```rust). Fence
/// balance is checked only for such texts: when a line that merely starts with backticks
/// (```x` …, or 30 backticks) must be cut, its pieces can look like fences in the chat.
pub fn fences_at_line_starts(text: &str) -> bool {
    text.split('\n').all(|line| {
        let t = line.trim_start_matches(' ');
        let lead = t.bytes().take_while(|&b| b == b'`').count();
        let indent = line.len() - t.len();
        !t[lead..].contains("```")
            && (lead < 3
                || (indent <= 3
                    && lead <= 5
                    && t[lead..].chars().all(|c| c.is_ascii_alphanumeric())))
    })
}
