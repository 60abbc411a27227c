//! Splitting long text into messages that fit a platform's limit.

/// The length of `text` as this crate counts it: UTF-16 code units.
///
/// Telegram counts a message's length in UTF-16 code units (after entity parsing; we send plain
/// text, so there are no entities). Discord counts Unicode code points. A character outside the
/// Basic Multilingual Plane (most emoji) is one code point but two UTF-16 units, so counting
/// UTF-16 units is exact for Telegram and never under-counts for Discord: one rule, safe for
/// both. The only cost is that an emoji-heavy Discord message is split a little earlier.
pub fn text_len(text: &str) -> usize {
    text.chars().map(char::len_utf16).sum()
}

/// The longest prefix of `text` (in bytes, on a char boundary) whose [`text_len`] is at most
/// `budget`.
fn prefix_within(text: &str, budget: usize) -> usize {
    let mut units = 0;
    for (i, c) in text.char_indices() {
        units += c.len_utf16();
        if units > budget {
            return i;
        }
    }
    text.len()
}

/// An open code fence: the opening line as written (e.g. "```rust") and its backtick count.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fence {
    opener: String,
    ticks: usize,
}

impl Fence {
    fn closer(&self) -> String {
        "`".repeat(self.ticks)
    }
}

/// The fence state after the line `line`, starting from `state`. A fence of more than
/// `max_ticks` backticks does not open (see [`split`]).
fn step(state: Option<Fence>, line: &str, max_ticks: usize) -> Option<Fence> {
    let t = line.trim_start().trim_end_matches('\r');
    let ticks = t.bytes().take_while(|&b| b == b'`').count();
    match state {
        None => {
            // An opening fence: three or more backticks, and an info string without backticks
            // (otherwise it is inline code such as ```x```).
            if (3..=max_ticks).contains(&ticks) && !t[ticks..].contains('`') {
                Some(Fence {
                    opener: t.trim_end().to_owned(),
                    ticks,
                })
            } else {
                None
            }
        }
        Some(f) => {
            if ticks >= f.ticks && t[ticks..].trim().is_empty() {
                None
            } else {
                Some(f)
            }
        }
    }
}

/// The fence state at the end of `text`. With `mid_line`, `text` starts in the middle of a
/// line (after a cut inside it), so its first line can neither open nor close a fence.
fn state_after(
    mut state: Option<Fence>,
    text: &str,
    mid_line: bool,
    max_ticks: usize,
) -> Option<Fence> {
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 || !mid_line {
            state = step(state, line, max_ticks);
        }
    }
    state
}

/// Where to cut `rest` so that the piece before the cut has at most `budget` units: the piece
/// and what follows (with the separator removed). Prefers a paragraph break, then a line
/// break, then a space; cuts inside a word only when there is no whitespace to cut at.
fn cut(rest: &str, budget: usize) -> (&str, &str) {
    let max = prefix_within(rest, budget);
    if max == 0 {
        // Not even one character fits: take one anyway so the split always progresses (only
        // reachable with absurdly small limits).
        let one = rest.chars().next().map_or(rest.len(), char::len_utf8);
        return (&rest[..one], &rest[one..]);
    }
    let bytes = rest.as_bytes();
    // A separator starting exactly at `max` still counts: the piece before it fits.
    let last = |pred: &dyn Fn(usize) -> bool, min: usize| -> Option<usize> {
        (min.max(1)..=max.min(bytes.len().saturating_sub(1)))
            .rev()
            .find(|&i| pred(i))
    };
    let para = |i: usize| bytes[i] == b'\n' && bytes.get(i + 1) == Some(&b'\n');
    let line = |i: usize| bytes[i] == b'\n';
    // A chunk never starts with backticks cut from the middle of a line: they would open a
    // code block in the chat.
    let space = |i: usize| {
        (bytes[i] == b' ' || bytes[i] == b'\t') && !rest[i..].trim_start().starts_with('`')
    };
    let nonblank = |i: usize| !rest[..i].trim().is_empty();

    let newline_cut = |i: usize| (&rest[..i], rest[i..].trim_start_matches(['\n', '\r']));
    let space_cut = |i: usize| (&rest[..i], rest[i..].trim_start_matches([' ', '\t']));

    if let Some(i) = last(&para, max / 2).filter(|&i| nonblank(i)) {
        return newline_cut(i);
    }
    if let Some(i) = last(&line, max / 3).filter(|&i| nonblank(i)) {
        return newline_cut(i);
    }
    if let Some(i) = last(&space, 1).filter(|&i| nonblank(i)) {
        return space_cut(i);
    }
    if let Some(i) = last(&line, 1).filter(|&i| nonblank(i)) {
        return newline_cut(i);
    }
    let mut at = max;
    // Back up while the rest would start inside a line with backticks; a line start is fine
    // (its backticks are a real fence line).
    while at > 0 && bytes[at - 1] != b'\n' && rest[at..].trim_start().starts_with('`') {
        at = rest[..at].char_indices().next_back().map_or(0, |(i, _)| i);
    }
    let at = if at == 0 { max } else { at };
    (&rest[..at], &rest[at..])
}

/// If `rest` starts with a line that closes `fence`, what follows that line.
fn strip_closing_line<'a>(rest: &'a str, fence: &Fence) -> Option<&'a str> {
    let (first, after) = rest.split_once('\n').unwrap_or((rest, ""));
    step(Some(fence.clone()), first, fence.ticks)
        .is_none()
        .then_some(after)
}

/// Splits `text` into chunks of at most `limit` units ([`text_len`]: UTF-16 code units),
/// in order.
///
/// - Cuts at a paragraph break, else a line break, else a space; a single word longer than the
///   limit is the only thing cut in the middle.
/// - Never leaves a code fence open across chunks: a chunk that ends inside a ``` block is
///   closed with ``` and the next chunk reopens it with the same info string (```rust).
///   An unclosed fence at the end of the text is closed too. Below a limit of 16, and for a
///   fence whose closing and reopening lines would leave no room for text within the limit,
///   fences are plain text. Backticks after a cut inside a line never open a fence.
/// - Drops whitespace at the cuts and at both ends; never returns an empty or blank chunk
///   (an empty or blank text gives no chunks).
pub fn split(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(1);
    // Below 16, a reopened fence would eat most of the chunk; above `max_ticks`, the closing
    // line, the reopening line and one character (two units) would not fit: plain text.
    let max_ticks = if limit >= 16 { (limit - 4) / 2 } else { 0 };
    let mut out = Vec::new();
    let mut rest = text.trim_end().trim_start_matches(['\n', '\r']);
    let mut open: Option<Fence> = None;
    // Whether `rest` starts inside a line (the previous chunk was cut in the middle of it).
    let mut mid_line = false;
    while !rest.trim().is_empty() {
        if let Some(f) = &open
            && !mid_line
            && let Some(after) = strip_closing_line(rest, f)
        {
            // The previous chunk already closed this block.
            open = None;
            rest = after.trim_start_matches(['\n', '\r']);
            continue;
        }
        let prefix = match &open {
            Some(f) if 2 * (text_len(&f.opener) + f.ticks) + 4 <= limit => {
                format!("{}\n", f.opener)
            }
            Some(f) => format!("{}\n", f.closer()),
            None => String::new(),
        };
        let budget = limit.saturating_sub(text_len(&prefix)).max(1);
        // Whether a line is a fence depends on all of it: a piece cut inside a line is judged
        // with that whole line.
        let end_state = |piece: &str| {
            let end = if piece.is_empty() || piece.ends_with('\n') {
                piece.len()
            } else {
                rest[piece.len()..]
                    .find('\n')
                    .map_or(rest.len(), |i| piece.len() + i)
            };
            state_after(open.clone(), &rest[..end], mid_line, max_ticks)
        };
        let closing = |st: &Option<Fence>| st.as_ref().map_or(0, |f| 1 + f.ticks);

        let whole = end_state(rest);
        let (piece, next, state) = if text_len(rest) + closing(&whole) <= budget {
            (rest, "", whole)
        } else {
            // A chunk that ends inside a fence needs room for the closing line.
            let mut b = budget;
            loop {
                let (piece, next) = cut(rest, b);
                let state = end_state(piece);
                let c = closing(&state);
                if text_len(piece.trim_end()) + c <= budget || b <= 1 {
                    break (piece, next, state);
                }
                b = budget.saturating_sub(c).min(b - 1).max(1);
            }
        };
        let body = piece.trim_end();
        if !body.trim().is_empty() {
            let mut chunk = prefix;
            chunk.push_str(body);
            if let Some(f) = &state {
                chunk.push('\n');
                chunk.push_str(&f.closer());
            }
            out.push(chunk);
        }
        open = state;
        // What the cut dropped between the piece and the rest: a line break or not.
        let dropped = &rest[piece.len()..rest.len() - next.len()];
        mid_line = !next.is_empty() && !dropped.contains('\n') && !piece.ends_with('\n');
        rest = next;
    }
    out
}

/// The last `max` units of `text`, cut at a line break or space when one is near, prefixed
/// with "…" when something was dropped.
pub(crate) fn tail(text: &str, max: usize) -> String {
    let text = text.trim();
    if text_len(text) <= max {
        return text.to_owned();
    }
    let keep = max.saturating_sub(1);
    // Walk back from the end until `keep` units are taken.
    let mut units = 0;
    let mut start = text.len();
    for (i, c) in text.char_indices().rev() {
        if units + c.len_utf16() > keep {
            break;
        }
        units += c.len_utf16();
        start = i;
    }
    let mut s = &text[start..];
    // Prefer to start at a line, else a word, if that loses little.
    if let Some(i) = s.find('\n').filter(|&i| i < s.len() / 4) {
        s = &s[i + 1..];
    } else if let Some(i) = s.find(' ').filter(|&i| i < 40.min(s.len() / 4)) {
        s = &s[i + 1..];
    }
    format!("…{}", s.trim_start())
}

/// The first `max` units of `text`, ending with "…" when something was dropped.
pub(crate) fn head(text: &str, max: usize) -> String {
    if text_len(text) <= max {
        return text.to_owned();
    }
    let end = prefix_within(text, max.saturating_sub(1));
    format!("{}…", text[..end].trim_end())
}

/// The closing line for a code fence left open at the end of `text`, if one is.
pub(crate) fn open_fence_closer(text: &str) -> Option<String> {
    state_after(None, text, false, usize::MAX).map(|f| f.closer())
}

/// `text` with every run of three backticks broken by zero-width spaces, so it can sit inside
/// (or next to) a code block without opening or closing one.
pub(crate) fn defuse_fences(text: &str) -> String {
    text.replace("```", "`\u{200b}`\u{200b}`")
}
