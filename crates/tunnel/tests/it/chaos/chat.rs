//! A Discord (REST v10) and Telegram (Bot API) stand-in on 127.0.0.1:0, written on raw TCP so
//! it can misbehave the way the real ones do: 429 storms with `retry_after`, 500s, slow
//! answers, and connections reset before or after the message was created. It records every
//! request and every message it created, honours Discord's `nonce` + `enforce_nonce` (a repeated
//! nonce returns the first message instead of creating another, as Discord does), and notes any
//! request that came before a `retry_after` it gave had passed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub(crate) const DISCORD_TOKEN: &str = "chaos-discord-MTIzNDU2Nzg5MA.GhIjKl.secret";
pub(crate) const TELEGRAM_TOKEN: &str = "123456:chaos-telegram-AAHdqTcvCH1vGWJxfSeofSAs";

/// How often each fault happens (0.0 to 1.0), drawn per request from a seeded generator.
#[derive(Debug, Clone, Default)]
pub(crate) struct Faults {
    /// A 429 with `retry_after` drawn from `retry_after` (seconds).
    pub(crate) rate_limit: f64,
    pub(crate) retry_after: (f64, f64),
    /// Of the 429s, how many are Discord's global limit.
    pub(crate) global: f64,
    pub(crate) server_error: f64,
    /// The message is created, then the answer waits `slow_ms`.
    pub(crate) slow: f64,
    pub(crate) slow_ms: u64,
    /// The connection is reset without an answer, before anything was created.
    pub(crate) reset_before: f64,
    /// The message is created, then the connection is reset without an answer (the client
    /// cannot know it went out).
    pub(crate) reset_after: f64,
    /// Every request gets a 429 until then (a storm).
    pub(crate) storm_until: Option<Instant>,
}

#[derive(Debug, Clone)]
pub(crate) struct Message {
    /// Discord channel id or Telegram chat id.
    pub(crate) channel: String,
    pub(crate) text: String,
}

#[derive(Default)]
struct State {
    faults: Faults,
    rng: u64,
    requests: usize,
    /// POSTs that would have created a message but were answered with the earlier one
    /// (a repeated Discord nonce).
    deduplicated: usize,
    messages: Vec<Message>,
    edits: usize,
    nonces: HashMap<String, u64>,
    /// Channel ("" for Discord's global limit) → (when the 429 was given, no request allowed
    /// before then).
    limited_until: HashMap<String, (Instant, Instant)>,
    /// (channel, how early) for each request that ignored a retry_after.
    early: Vec<(String, Duration)>,
    counts: HashMap<&'static str, usize>,
}

impl State {
    fn draw(&mut self) -> f64 {
        // xorshift64*: deterministic per run, good enough to spread faults.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Discord,
    Telegram,
}

#[derive(Clone)]
pub(crate) struct Chat {
    pub(crate) addr: SocketAddr,
    pub(crate) kind: Kind,
    state: Arc<Mutex<State>>,
}

/// What a request turned into, decided under the lock.
enum Plan {
    Answer(u16, Value, Vec<(String, String)>),
    Slow(Duration, Value),
    Reset,
}

impl Chat {
    pub(crate) async fn start(kind: Kind, seed: u64) -> Chat {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            rng: seed | 1,
            ..State::default()
        }));
        let chat = Chat { addr, kind, state };
        let c = chat.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move { c.connection(sock).await });
            }
        });
        chat
    }

    /// The environment that points `tunnel serve` at this stand-in.
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        match self.kind {
            Kind::Discord => vec![
                ("CALLBACK_BOT_TOKEN".into(), DISCORD_TOKEN.into()),
                (
                    "CALLBACK_API_BASE_URL".into(),
                    format!("http://{}/api/v10", self.addr),
                ),
            ],
            Kind::Telegram => vec![
                ("TELEGRAM_BOT_TOKEN".into(), TELEGRAM_TOKEN.into()),
                (
                    "TELEGRAM_API_BASE_URL".into(),
                    format!("http://{}", self.addr),
                ),
            ],
        }
    }

    pub(crate) fn set_faults(&self, f: Faults) {
        self.state.lock().unwrap().faults = f;
    }

    pub(crate) fn messages(&self) -> Vec<Message> {
        self.state.lock().unwrap().messages.clone()
    }

    pub(crate) fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    pub(crate) fn deduplicated(&self) -> usize {
        self.state.lock().unwrap().deduplicated
    }

    pub(crate) fn edits(&self) -> usize {
        self.state.lock().unwrap().edits
    }

    /// Requests that came before the `retry_after` they were given had passed.
    pub(crate) fn early(&self) -> Vec<(String, Duration)> {
        self.state.lock().unwrap().early.clone()
    }

    /// How many times each fault was served.
    pub(crate) fn fault_counts(&self) -> HashMap<&'static str, usize> {
        self.state.lock().unwrap().counts.clone()
    }

    /// Final answers (messages with the footer `task <id>`), by task id, in the order created.
    pub(crate) fn finals(&self) -> Vec<(String, Message)> {
        self.messages()
            .into_iter()
            .filter_map(|m| final_task_id(&m.text).map(|id| (id, m)))
            .collect()
    }

    async fn connection(&self, sock: TcpStream) {
        let mut sock = BufReader::new(sock);
        loop {
            let mut head = Vec::new();
            loop {
                let mut line = Vec::new();
                match sock.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if line == b"\r\n" || line == b"\n" {
                    break;
                }
                head.push(String::from_utf8_lossy(&line).trim_end().to_owned());
            }
            let Some(request_line) = head.first() else {
                return;
            };
            let mut parts = request_line.split(' ');
            let method = parts.next().unwrap_or_default().to_owned();
            let path = parts.next().unwrap_or_default().to_owned();
            let len = head
                .iter()
                .filter_map(|h| h.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let auth = head
                .iter()
                .filter_map(|h| h.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                .map(|(_, v)| v.trim().to_owned());
            let mut body = vec![0; len];
            if sock.read_exact(&mut body).await.is_err() {
                return;
            }
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let plan = self.plan(&method, &path, auth.as_deref(), &body);
            let (status, value, headers) = match plan {
                Plan::Reset => {
                    let s = sock.into_inner();
                    #[allow(deprecated)] // a zero linger only makes the close a reset
                    let _ = s.set_linger(Some(Duration::ZERO));
                    drop(s);
                    return;
                }
                Plan::Slow(d, v) => {
                    tokio::time::sleep(d).await;
                    (200, v, vec![])
                }
                Plan::Answer(s, v, h) => (s, v, h),
            };
            let text = value.to_string();
            let mut resp = format!(
                "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                if status == 200 { "OK" } else { "Error" },
                text.len()
            );
            for (k, v) in headers {
                resp.push_str(&format!("{k}: {v}\r\n"));
            }
            resp.push_str("\r\n");
            resp.push_str(&text);
            if sock.get_mut().write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    fn plan(&self, method: &str, path: &str, auth: Option<&str>, body: &Value) -> Plan {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        st.requests += 1;
        // Which channel the request is about, and whether it creates a message.
        let (channel, create, edit) = match self.kind {
            Kind::Discord => {
                if auth != Some(&format!("Bot {DISCORD_TOKEN}")) {
                    return Plan::Answer(
                        401,
                        json!({"message": "401: Unauthorized", "code": 0}),
                        vec![],
                    );
                }
                let p: Vec<&str> = path.trim_start_matches('/').split('/').collect();
                match (method, p.as_slice()) {
                    ("POST", ["api", "v10", "channels", ch, "messages"]) => {
                        (ch.to_string(), true, false)
                    }
                    ("PATCH", ["api", "v10", "channels", ch, "messages", _]) => {
                        (ch.to_string(), false, true)
                    }
                    _ => {
                        return Plan::Answer(
                            404,
                            json!({"message": "404: Not Found", "code": 0}),
                            vec![],
                        );
                    }
                }
            }
            Kind::Telegram => {
                let Some(m) = path.strip_prefix(&format!("/bot{TELEGRAM_TOKEN}/")) else {
                    return Plan::Answer(
                        401,
                        json!({"ok": false, "error_code": 401, "description": "Unauthorized"}),
                        vec![],
                    );
                };
                let ch = body["chat_id"].to_string().trim_matches('"').to_owned();
                match m {
                    "sendMessage" => (ch, true, false),
                    "editMessageText" => (ch, false, true),
                    _ => {
                        return Plan::Answer(
                            404,
                            json!({"ok": false, "error_code": 404, "description": "Not Found"}),
                            vec![],
                        );
                    }
                }
            }
        };
        // Did the client wait as long as it was told to? Requests already on their way when
        // the 429 went out (other channels, for a global limit) could not know yet.
        for key in [channel.as_str(), ""] {
            if let Some((given, until)) = st.limited_until.get(key).copied()
                && now > given + Duration::from_millis(100)
                && now + Duration::from_millis(20) < until
            {
                let what = if key.is_empty() { "global" } else { "channel" };
                st.early.push((format!("{channel} ({what})"), until - now));
            }
        }
        let f = st.faults.clone();
        let storm = f.storm_until.is_some_and(|u| now < u);
        let r = st.draw();
        let mut acc = 0.0;
        let mut pick = |p: f64| {
            acc += p;
            r < acc
        };
        if storm || pick(f.rate_limit) {
            let (lo, hi) = f.retry_after;
            let after = ((lo + (hi - lo) * st.draw()) * 1000.0).round() / 1000.0;
            let global = self.kind == Kind::Discord && st.draw() < f.global;
            let key = if global {
                String::new()
            } else {
                channel.clone()
            };
            st.limited_until
                .insert(key, (now, now + Duration::from_secs_f64(after)));
            *st.counts.entry("429").or_default() += 1;
            return match self.kind {
                Kind::Discord => Plan::Answer(
                    429,
                    json!({"message": "You are being rate limited.", "retry_after": after, "global": global}),
                    vec![
                        ("retry-after".into(), format!("{}", after.ceil())),
                        ("x-ratelimit-limit".into(), "5".into()),
                        ("x-ratelimit-remaining".into(), "0".into()),
                        ("x-ratelimit-reset-after".into(), format!("{after:.3}")),
                        ("x-ratelimit-bucket".into(), "chaos0001".into()),
                        (
                            "x-ratelimit-scope".into(),
                            if global { "global" } else { "user" }.into(),
                        ),
                    ]
                    .into_iter()
                    .chain(global.then(|| ("x-ratelimit-global".to_owned(), "true".to_owned())))
                    .collect(),
                ),
                Kind::Telegram => Plan::Answer(
                    429,
                    json!({"ok": false, "error_code": 429,
                        "description": format!("Too Many Requests: retry after {}", after.ceil()),
                        "parameters": {"retry_after": after.ceil() as u64}}),
                    vec![],
                ),
            };
        }
        if pick(f.server_error) {
            *st.counts.entry("500").or_default() += 1;
            return match self.kind {
                Kind::Discord => Plan::Answer(
                    500,
                    json!({"message": "500: Internal Server Error", "code": 0}),
                    vec![],
                ),
                Kind::Telegram => Plan::Answer(
                    500,
                    json!({"ok": false, "error_code": 500, "description": "Internal Server Error"}),
                    vec![],
                ),
            };
        }
        if pick(f.reset_before) {
            *st.counts.entry("reset before").or_default() += 1;
            return Plan::Reset;
        }
        let after_reset = pick(f.reset_after);
        let slow = pick(f.slow);
        // The request succeeds: create or edit.
        let text = match self.kind {
            Kind::Discord => body["content"].as_str(),
            Kind::Telegram => body["text"].as_str(),
        }
        .unwrap_or_default()
        .to_owned();
        let id = if create {
            let nonce = (self.kind == Kind::Discord && body["enforce_nonce"] == true)
                .then(|| body["nonce"].to_string());
            match nonce.as_ref().and_then(|n| st.nonces.get(n)).copied() {
                Some(id) => {
                    st.deduplicated += 1;
                    id
                }
                None => {
                    let id = 1_000_000 + st.messages.len() as u64;
                    st.messages.push(Message {
                        channel: channel.clone(),
                        text: text.clone(),
                    });
                    if let Some(n) = nonce {
                        st.nonces.insert(n, id);
                    }
                    id
                }
            }
        } else {
            debug_assert!(edit);
            st.edits += 1;
            match self.kind {
                Kind::Discord => path
                    .rsplit('/')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                Kind::Telegram => body["message_id"].as_u64().unwrap_or(0),
            }
        };
        let value = match self.kind {
            Kind::Discord => json!({
                "id": id.to_string(), "channel_id": channel, "content": text, "type": 0,
                "author": {"id": "42", "username": "tunnel", "bot": true},
                "timestamp": "2026-11-25T12:00:00.000000+00:00", "edited_timestamp": null,
                "tts": false, "mention_everyone": false, "mentions": [], "mention_roles": [],
                "attachments": [], "embeds": [], "pinned": false, "flags": 0,
            }),
            Kind::Telegram => json!({"ok": true, "result": {
                "message_id": id, "date": 1_764_072_000, "text": text,
                "from": {"id": 123456, "is_bot": true, "first_name": "tunnel"},
                "chat": {"id": body["chat_id"], "type": "supergroup", "title": "dev"},
            }}),
        };
        if after_reset {
            *st.counts.entry("reset after").or_default() += 1;
            return Plan::Reset;
        }
        if slow {
            *st.counts.entry("slow").or_default() += 1;
            return Plan::Slow(Duration::from_millis(f.slow_ms), value);
        }
        Plan::Answer(200, value, vec![])
    }
}

/// The task id in a final answer's footer (`task <id>` or `task <id> · session …`).
pub(crate) fn final_task_id(text: &str) -> Option<String> {
    if text.starts_with('⏳') {
        return None;
    }
    let last = text.lines().last()?;
    let id = last.strip_prefix("task ")?.split_whitespace().next()?;
    (id.len() == 36).then(|| id.to_owned())
}
