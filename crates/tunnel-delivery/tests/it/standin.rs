//! Stand-ins for Discord, Telegram and a webhook receiver, speaking their wire formats on
//! 127.0.0.1:0. They record every request and answer from a script (default: success).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::time::Instant;
use tunnel_delivery::{
    DiscordConfig, Platform, Platforms, PlatformsConfig, ReplyTo, TelegramConfig, WebhookConfig,
};

pub(crate) const DISCORD_TOKEN: &str = "MTA5ODc2NTQzMjEwOTg3NjU0.GhIjKl.discord-secret-token_XYZ";
pub(crate) const TELEGRAM_TOKEN: &str = "123456789:AAH-telegram_secret_TOKEN-abcdefghijk";
pub(crate) const WEBHOOK_SECRET: &str = "whsec-very-secret-hmac-key";

#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) raw: Bytes,
    pub(crate) body: Value,
    pub(crate) at: Instant,
}

impl Recorded {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What the stand-in does with the next request.
#[derive(Debug, Clone)]
pub(crate) enum Behave {
    /// The platform's success answer, with these extra headers.
    Ok(Vec<(&'static str, String)>),
    /// 429 in the platform's shape.
    RateLimited { retry_after: f64, global: bool },
    /// This status and JSON body.
    Error(u16, Value),
    /// This status and raw text body.
    Raw(u16, String),
    /// Wait, then succeed.
    Slow(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Discord,
    Telegram,
    Webhook,
}

#[derive(Clone)]
pub(crate) struct StandIn {
    pub(crate) addr: SocketAddr,
    kind: Kind,
    log: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Mutex<VecDeque<Behave>>>,
}

struct State {
    kind: Kind,
    log: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Mutex<VecDeque<Behave>>>,
}

impl StandIn {
    async fn start(kind: Kind) -> StandIn {
        let log = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let state = Arc::new(State {
            kind,
            log: log.clone(),
            script: script.clone(),
        });
        let app = Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, raw: Bytes| {
                let state = state.clone();
                async move { handle(&state, method, uri, headers, raw).await }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        StandIn {
            addr,
            kind,
            log,
            script,
        }
    }

    pub(crate) async fn discord() -> StandIn {
        Self::start(Kind::Discord).await
    }

    pub(crate) async fn telegram() -> StandIn {
        Self::start(Kind::Telegram).await
    }

    pub(crate) async fn webhook() -> StandIn {
        Self::start(Kind::Webhook).await
    }

    /// Queue behaviours for the next requests.
    pub(crate) fn then(&self, b: Behave) -> &Self {
        self.script.lock().unwrap().push_back(b);
        self
    }

    pub(crate) fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }

    pub(crate) fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    pub(crate) fn base(&self) -> String {
        match self.kind {
            Kind::Discord => format!("http://{}/api/v10", self.addr),
            Kind::Telegram => format!("http://{}", self.addr),
            Kind::Webhook => format!("http://{}/hook", self.addr),
        }
    }
}

async fn handle(
    state: &State,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let n = {
        let mut log = state.log.lock().unwrap();
        log.push(Recorded {
            method: method.to_string(),
            path: uri.path().to_owned(),
            headers: headers.clone(),
            raw,
            body: body.clone(),
            at: Instant::now(),
        });
        log.len()
    };
    let behave = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Behave::Ok(vec![]));
    let mut extra = vec![];
    match behave {
        Behave::Ok(h) => extra = h,
        Behave::Slow(d) => tokio::time::sleep(d).await,
        Behave::Error(status, v) => {
            return (StatusCode::from_u16(status).unwrap(), axum::Json(v)).into_response();
        }
        Behave::Raw(status, text) => {
            return (StatusCode::from_u16(status).unwrap(), text).into_response();
        }
        Behave::RateLimited {
            retry_after,
            global,
        } => {
            return match state.kind {
                Kind::Discord => {
                    let mut h = HeaderMap::new();
                    h.insert(
                        "retry-after",
                        format!("{}", retry_after.ceil()).parse().unwrap(),
                    );
                    h.insert("x-ratelimit-limit", "5".parse().unwrap());
                    h.insert("x-ratelimit-remaining", "0".parse().unwrap());
                    h.insert(
                        "x-ratelimit-reset-after",
                        format!("{retry_after:.3}").parse().unwrap(),
                    );
                    h.insert("x-ratelimit-bucket", "abcd1234".parse().unwrap());
                    if global {
                        h.insert("x-ratelimit-global", "true".parse().unwrap());
                        h.insert("x-ratelimit-scope", "global".parse().unwrap());
                    } else {
                        h.insert("x-ratelimit-scope", "user".parse().unwrap());
                    }
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        h,
                        axum::Json(json!({
                            "message": "You are being rate limited.",
                            "retry_after": retry_after,
                            "global": global,
                        })),
                    )
                        .into_response()
                }
                Kind::Telegram => (
                    StatusCode::TOO_MANY_REQUESTS,
                    axum::Json(json!({
                        "ok": false,
                        "error_code": 429,
                        "description": format!("Too Many Requests: retry after {retry_after}"),
                        "parameters": {"retry_after": retry_after},
                    })),
                )
                    .into_response(),
                Kind::Webhook => (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", format!("{retry_after}"))],
                    "slow down",
                )
                    .into_response(),
            };
        }
    }
    let mut h = HeaderMap::new();
    for (k, v) in extra {
        h.insert(k, v.parse().unwrap());
    }
    match state.kind {
        Kind::Discord => discord_ok(&method, uri.path(), &body, n, h),
        Kind::Telegram => telegram_ok(uri.path(), &body, n),
        Kind::Webhook => (StatusCode::NO_CONTENT, h).into_response(),
    }
}

fn discord_message(id: String, channel: &str, content: &Value) -> Value {
    json!({
        "id": id, "channel_id": channel,
        "author": {"id": "42", "username": "tunnel", "bot": true},
        "content": content, "timestamp": "2026-11-25T12:00:00.000000+00:00",
        "edited_timestamp": null, "tts": false, "mention_everyone": false, "mentions": [],
        "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0, "flags": 0,
    })
}

fn discord_ok(method: &Method, path: &str, body: &Value, n: usize, h: HeaderMap) -> Response {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("POST", ["api", "v10", "channels", ch, "messages"]) => (
            h,
            axum::Json(discord_message(format!("1000{n}"), ch, &body["content"])),
        )
            .into_response(),
        ("PATCH", ["api", "v10", "channels", ch, "messages", id]) => (
            h,
            axum::Json(discord_message((*id).to_owned(), ch, &body["content"])),
        )
            .into_response(),
        _ => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"message": "404: Not Found", "code": 0})),
        )
            .into_response(),
    }
}

fn telegram_ok(path: &str, body: &Value, n: usize) -> Response {
    let expected = format!("/bot{TELEGRAM_TOKEN}/");
    let Some(method) = path.strip_prefix(&expected) else {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"ok": false, "error_code": 401, "description": "Unauthorized"})),
        )
            .into_response();
    };
    let message = json!({
        "message_id": 500 + n,
        "from": {"id": 123456789, "is_bot": true, "first_name": "tunnel", "username": "tunnel_bot"},
        "chat": {"id": body["chat_id"], "type": "supergroup", "title": "dev"},
        "date": 1_764_072_000,
        "text": body["text"],
    });
    match method {
        "sendMessage" => axum::Json(json!({"ok": true, "result": message})).into_response(),
        "editMessageText" => {
            let mut m = message;
            m["message_id"] = body["message_id"].clone();
            m["edit_date"] = 1_764_072_010.into();
            axum::Json(json!({"ok": true, "result": m})).into_response()
        }
        _ => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"ok": false, "error_code": 404, "description": "Not Found"})),
        )
            .into_response(),
    }
}

/// Platforms pointed at the given stand-ins.
pub(crate) fn platforms(
    discord: Option<&StandIn>,
    telegram: Option<&StandIn>,
    webhook: Option<&StandIn>,
) -> Platforms {
    platforms_with(discord, telegram, webhook, |_| {})
}

pub(crate) fn platforms_with(
    discord: Option<&StandIn>,
    telegram: Option<&StandIn>,
    webhook: Option<&StandIn>,
    tweak: impl FnOnce(&mut PlatformsConfig),
) -> Platforms {
    let mut cfg = PlatformsConfig {
        discord: discord.map(|d| DiscordConfig {
            token: DISCORD_TOKEN.to_owned(),
            api_base: d.base(),
            proxy: None,
        }),
        telegram: telegram.map(|t| TelegramConfig {
            token: TELEGRAM_TOKEN.to_owned(),
            api_base: t.base(),
        }),
        timeout: Duration::from_secs(5),
        ..PlatformsConfig::default()
    };
    if let Some(w) = webhook {
        cfg.webhooks.insert(
            "ci".to_owned(),
            WebhookConfig {
                url: w.base(),
                secret: WEBHOOK_SECRET.to_owned(),
            },
        );
    }
    tweak(&mut cfg);
    Platforms::new(cfg).unwrap()
}

pub(crate) fn to(platform: Platform, channel: &str) -> ReplyTo {
    ReplyTo {
        platform,
        channel: channel.to_owned(),
        thread: None,
        message: None,
    }
}

/// Asserts no token or secret appears in an error's Display or Debug.
pub(crate) fn assert_no_secret(e: &tunnel_delivery::DeliveryError) {
    for text in [e.to_string(), format!("{e:?}")] {
        for secret in [DISCORD_TOKEN, TELEGRAM_TOKEN, WEBHOOK_SECRET] {
            assert!(!text.contains(secret), "secret leaked in {text:?}");
        }
        // Even a part of the token would be a leak.
        assert!(
            !text.contains("secret"),
            "secret-ish text leaked in {text:?}"
        );
    }
}
