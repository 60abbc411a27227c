//! `--log-format json`: the lines of tracing-subscriber's JSON format, written directly.
//!
//! The server logs a line per submit, offer and finish. tracing-subscriber's JSON formatter
//! builds each through serde with a UTF-8 check of every piece it writes: about 15,000
//! instructions a line, a tenth of a request's CPU in the standard cycle (docs/BENCHMARKS.md,
//! round five). This writes the same object (`timestamp`, `level`, `fields`, `target`) with
//! no allocation. An event inside a span is left to tracing-subscriber's formatter, which
//! also writes the span fields (nothing in the server logs inside one).

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

pub(crate) struct JsonLines {
    in_span: Format<Json>,
}

impl JsonLines {
    pub(crate) fn new() -> Self {
        JsonLines {
            in_span: tracing_subscriber::fmt::format().json(),
        }
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if event.parent().is_some() || (event.is_contextual() && ctx.lookup_current().is_some()) {
            return self.in_span.format_event(ctx, w, event);
        }
        let meta = event.metadata();
        w.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut w)?;
        w.write_str("\",\"level\":\"")?;
        w.write_str(meta.level().as_str())?;
        w.write_str("\",\"fields\":{")?;
        let mut fields = Fields {
            w: &mut w,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str("},\"target\":\"")?;
        Escaped(&mut w).write_str(meta.target())?;
        w.write_str("\"}\n")
    }
}

/// Writes each field as `"name":value`, separated by commas.
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let w = &mut *self.w;
        self.result = (|| {
            if !self.first {
                w.write_char(',')?;
            }
            w.write_char('"')?;
            Escaped(&mut *w).write_str(field.name())?;
            w.write_str("\":")?;
            value(w)
        })();
        self.first = false;
    }

    fn string(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        self.field(field, |w| {
            w.write_char('"')?;
            Escaped(&mut *w).write_fmt(value)?;
            w.write_char('"')
        });
    }
}

impl Visit for Fields<'_, '_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.string(field, format_args!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.string(field, format_args!("{value}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.string(field, format_args!("{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // As serde_json: a number when finite, else null.
        self.field(field, |w| {
            if value.is_finite() {
                write!(w, "{value:?}")
            } else {
                w.write_str("null")
            }
        });
    }
}

/// Writes through, escaped as a JSON string's contents.
struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..0x20 => "",
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::JsonLines;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    fn log_all() {
        let id = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
        let odd = "quote \" backslash \\ newline \n tab \t bell \u{7} é ✓";
        tracing::info!(task_id = %id, agent = "bench", took_us = 42u64, "Task submitted.");
        tracing::warn!(error = %odd, n = -3i64, ok = true, x = 1.5f64, nan = f64::NAN, "Odd {}.", "text");
        tracing::error!(debug = ?vec![1, 2], "Store error.");
        let span = tracing::info_span!("req", id = 7u64);
        let _in = span.enter();
        tracing::info!(inside = "span", "In a span.");
    }

    fn lines(json: bool) -> Vec<serde_json::Value> {
        let buf = Buffer::default();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(buf.clone())
            .json();
        let dispatch = if json {
            tracing::Dispatch::new(builder.event_format(JsonLines::new()).finish())
        } else {
            tracing::Dispatch::new(builder.finish())
        };
        tracing::dispatcher::with_default(&dispatch, log_all);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }

    /// The same objects as tracing-subscriber's JSON lines, timestamps aside (same format).
    #[test]
    fn lines_are_those_of_tracing_subscribers_json_format() {
        let (ours, theirs) = (lines(true), lines(false));
        assert_eq!(ours.len(), 4);
        for (mut a, mut b) in ours.into_iter().zip(theirs) {
            let ts = |v: &mut serde_json::Value| {
                v.as_object_mut()
                    .unwrap()
                    .remove("timestamp")
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned()
            };
            let (ta, tb) = (ts(&mut a), ts(&mut b));
            assert_eq!(ta.len(), tb.len(), "{ta} vs {tb}");
            assert!(ta.ends_with('Z') && ta.as_bytes()[10] == b'T', "{ta}");
            assert_eq!(a, b);
        }
    }
}
