//! A small HTML writer that makes escaping the default: markup can only be a `&'static str`
//! (written in this crate), and every other string goes through [`Html::text`], which escapes
//! it and drops terminal escape sequences and control characters. So a prompt, a conversation
//! name or an agent's output can never become markup, whatever it contains.

use std::fmt::Write;

pub(crate) struct Html(String);

impl Html {
    pub(crate) fn new() -> Html {
        Html(String::with_capacity(16 << 10))
    }

    /// Markup from this crate's own source.
    pub(crate) fn raw(&mut self, markup: &'static str) -> &mut Html {
        self.0.push_str(markup);
        self
    }

    /// Any text: escaped for element content and quoted attribute values alike.
    pub(crate) fn text(&mut self, s: &str) -> &mut Html {
        escape_into(&mut self.0, s);
        self
    }

    /// A number (nothing to escape).
    pub(crate) fn num(&mut self, n: impl Into<i128>) -> &mut Html {
        let _ = write!(self.0, "{}", n.into());
        self
    }

    /// A URL path with query parameters, escaped for an attribute.
    pub(crate) fn url(&mut self, path: &str, query: &[(&str, &str)]) -> &mut Html {
        let mut u = path.to_owned();
        let pairs: Vec<_> = query.iter().filter(|(_, v)| !v.is_empty()).collect();
        if !pairs.is_empty() {
            u.push('?');
            let mut ser = form_urlencoded::Serializer::new(String::new());
            for (k, v) in pairs {
                ser.append_pair(k, v);
            }
            u.push_str(&ser.finish());
        }
        self.text(&u)
    }

    /// A time as "12 s ago" with the UTC date in a tooltip.
    pub(crate) fn ago(&mut self, at: i64, now: i64) -> &mut Html {
        self.raw("<time title=\"")
            .text(&utc(at))
            .raw("\">")
            .text(&ago(at, now))
            .raw("</time>")
    }

    pub(crate) fn into_string(self) -> String {
        self.0
    }
}

fn escape_into(out: &mut String, s: &str) {
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // A terminal escape (CSI `ESC [ … final`, OSC `ESC ] … BEL/ST`, or a two-byte one):
            // dropped whole, so colour codes in agent output do not show as garbage.
            '\u{1b}' => match chars.next() {
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            // Bidirectional overrides could make text read differently from what it is.
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {}
            c => out.push(c),
        }
    }
}

/// `2026-12-07 05:32:11 UTC`.
pub(crate) fn utc(ms: i64) -> String {
    // `YYYY-MM-DDTHH:MM:SS.mmmZ` → `YYYY-MM-DD HH:MM:SS UTC` (split, not sliced: any year).
    let iso = tunnel_protocol::iso8601(ms);
    let (date, time) = iso.split_once('T').unwrap_or((&iso, ""));
    let time = time.split('.').next().unwrap_or(time);
    format!("{date} {time} UTC")
}

/// How long ago, coarsely.
pub(crate) fn ago(at: i64, now: i64) -> String {
    let s = (now - at).max(0) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// A duration in ms, coarsely (`850 ms`, `12 s`, `3 min`).
pub(crate) fn duration(ms: i64) -> String {
    match ms.max(0) {
        ms @ 0..1000 => format!("{ms} ms"),
        ms @ 1000..120_000 => format!("{} s", ms / 1000),
        ms @ 120_000..7_200_000 => format!("{} min", ms / 60_000),
        ms => format!("{} h", ms / 3_600_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_terminal_escapes_dropped() {
        let mut h = Html::new();
        h.text("<img src=x onerror=alert(1)>\"'&</script>\u{1b}[31mred\u{1b}[0m\u{1b}]0;title\u{7}ok\u{0}\u{202e}");
        assert_eq!(
            h.into_string(),
            "&lt;img src=x onerror=alert(1)&gt;&quot;&#39;&amp;&lt;/script&gt;redok"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_796_621_531_000), "2026-12-07 05:32:11 UTC");
        assert_eq!(ago(0, 61_000), "1 min ago");
        assert_eq!(duration(1500), "1 s");
    }

    #[test]
    fn urls_are_encoded_then_escaped() {
        let mut h = Html::new();
        h.url("/ui/tasks", &[("q", "a&b \"<"), ("state", "")]);
        assert_eq!(h.into_string(), "/ui/tasks?q=a%26b+%22%3C");
    }
}
