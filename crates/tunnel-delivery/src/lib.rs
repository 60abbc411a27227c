//! Delivery of task answers and progress to Discord, Telegram and signed webhooks.
//!
//! This crate is the platform side of the server's delivery outbox: the clients
//! ([`Platforms::post`], [`Platforms::edit`], [`Platforms::webhook`]) with each platform's
//! rate limits, and the pure rendering functions ([`split`], [`render_final`],
//! [`render_progress`]). The outbox, ordering per destination, backoff and throttling of
//! progress edits belong to the caller (the server's delivery worker); what a send returned
//! tells it what to do next ([`DeliveryError`]).
//!
//! # Why plain reqwest rather than twilight-http / frankenstein
//!
//! Both were measured on the 2-core build box (shared with other builds, load 5–7, so the
//! figures are indicative) in a scratch project with a copy of the workspace lock file: a
//! cold `cargo build` of our stack alone (reqwest 0.13 `rustls-no-provider` + rustls `ring`,
//! tokio, serde, thiserror, tracing) took 259 s; then each library was added and built on top.
//!
//! - **twilight-http 0.18** with twilight-model (`default-features = false`, feature
//!   `rustls-platform-verifier`): 18 more crates (twilight-model, -validate,
//!   -http-ratelimiting, hyper-rustls, rustls-platform-verifier, time, serde_repr, …),
//!   **+95 s** cold (+176 s in a run that shared the cores with another build); no aws-lc.
//!   It brings its own hyper client and needs a process-wide rustls provider (it panics with
//!   "no usable cipher suites" without one). Its rate limiter is good, but its `proxy()` is not
//!   a forward proxy (it replaces the host, for twilight's http-proxy), so `DISCORD_PROXY` (the
//!   seed's HTTPS proxy) cannot work, and it builds `{http|https}://{host}/api/v10/…` itself,
//!   so a `CALLBACK_API_BASE_URL` of any other shape cannot work either.
//! - **frankenstein 0.52** (`client-reqwest`): 23 more crates (aws-lc-rs, aws-lc-sys, bon,
//!   darling, serde_with, …), **+433 s** cold (aws-lc's C build, and reqwest/rustls rebuilt
//!   with it). It depends on reqwest with the `rustls` feature, which in reqwest 0.13 turns on
//!   **aws-lc-rs** for the whole tree: a second crypto provider, which our setup forbids.
//!   Telegram needs only two methods (`sendMessage`, `editMessageText`) anyway.
//!
//! So both platforms are two REST calls each over the reqwest client the workspace already
//! has (0 new crates), and the rate-limit bookkeeping is the small part Discord documents:
//! buckets from `X-RateLimit-Bucket` / `-Remaining` / `-Reset-After` per route and channel,
//! the global flag of a 429, and Telegram's `parameters.retry_after`.
//!
//! # For the delivery worker
//!
//! - Build once: `Platforms::new(PlatformsConfig::from_env())` (names in
//!   [`PlatformsConfig::from_vars`]), or fill [`PlatformsConfig`] from the config file. Clone
//!   it freely; rate-limit state is shared by the clones and kept in memory only.
//! - [`DeliveryError::RetryAfter`]: reschedule no earlier than `after`; `global: true` means
//!   pause every Discord row. A Discord bucket that resets within
//!   [`PlatformsConfig::max_inline_wait`] (2 s) is waited for inside the call instead; a
//!   Telegram 429 also blocks that chat inside the client until `retry_after` has passed.
//!   [`DeliveryError::Transient`]: back off and retry. [`DeliveryError::Permanent`]: give up
//!   and show the reason. After a Discord 401 every Discord send is `Permanent` at once (until
//!   restart), so a bad token cannot run up Discord's invalid-request ban.
//! - Render with [`Platforms::limit`]: [`render_final`] gives the chunks to post in order,
//!   [`render_progress`] the text of the "working…" message to post and then edit.
//!   [`validate_reply_to`] checks ids at submit time.
//!
//! # Connecting a real bot
//!
//! Discord: create an application and a bot at <https://discord.com/developers/applications>,
//! invite it with the *Send Messages*, *Send Messages in Threads* and *Read Message History*
//! permissions, and set `CALLBACK_BOT_TOKEN`; a `reply_to` channel is the channel id (Developer
//! Mode → Copy Channel ID), `thread` a thread id. Telegram: create a bot with @BotFather, add it
//! to the chat, and set `TELEGRAM_BOT_TOKEN`; a `reply_to` channel is the chat id (negative for
//! groups) or `@channelusername`, `thread` a forum topic's `message_thread_id`.
//!
//! # Counting characters
//!
//! Lengths are counted in UTF-16 code units ([`text_len`]): exact for Telegram (4096 units,
//! plain text so no entities), never under-counting for Discord (2000 code points).
//!
//! # Secrets
//!
//! Bot tokens and webhook secrets never appear in a [`DeliveryError`], a log line or a
//! `Debug` output: reqwest errors are stripped of their URL (Telegram's contains the token) and
//! every error text is scrubbed of the configured secrets.

mod approval;
mod discord;
mod render;
mod split;
mod telegram;
mod webhook;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use approval::{approval_outcome_line, render_approval, render_approval_settled};
pub use render::{render_final, render_progress, render_progress_at};
pub use split::{split, text_len};
pub use tunnel_protocol::{Platform, ReplyTo};
pub use webhook::{SIGNATURE_HEADER, TIMESTAMP_HEADER, hex, hmac_sha256, signature};

use discord::Discord;
use telegram::Telegram;
use webhook::Webhook;

/// Discord's limit on a message's content.
pub const DISCORD_LIMIT: usize = 2000;
/// Telegram's limit on a message's text.
pub const TELEGRAM_LIMIT: usize = 4096;
/// What [`Platforms::limit`] says for webhooks: they take the whole answer.
pub const WEBHOOK_LIMIT: usize = 1 << 20;

/// The default Discord API base (`CALLBACK_API_BASE_URL`).
pub const DISCORD_API_BASE: &str = "https://discord.com/api/v10";
/// The default Telegram Bot API base (`TELEGRAM_API_BASE_URL`).
pub const TELEGRAM_API_BASE: &str = "https://api.telegram.org";

/// The id of a sent message: Discord's snowflake, Telegram's `message_id`, or for a webhook an
/// id this crate made up (sent in the payload).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub String);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a send did not happen, and what to do about it. The texts never contain a token.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliveryError {
    /// Try again no earlier than this (429 `retry_after`, Discord bucket reset, Telegram
    /// `parameters.retry_after`). `global`: Discord's global limit (pause all Discord sends).
    #[error("rate limited: retry after {after:?}{}", if *.global { " (global)" } else { "" })]
    RetryAfter { after: Duration, global: bool },
    /// 5xx, network error, timeout: retry with backoff.
    #[error("{0}")]
    Transient(String),
    /// 400/401/403/404 and similar that will never succeed: give up, with the reason.
    #[error("{0}")]
    Permanent(String),
}

impl DeliveryError {
    /// A 429 or an exhausted bucket: the send may be retried after [`DeliveryError::RetryAfter`]'s
    /// `after`, and does not count as a failure.
    pub fn is_rate_limit(&self) -> bool {
        matches!(self, DeliveryError::RetryAfter { .. })
    }

    pub fn is_permanent(&self) -> bool {
        matches!(self, DeliveryError::Permanent(_))
    }
}

/// A bad configuration value. The text never contains a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("delivery config: {0}")]
pub struct ConfigError(pub String);

/// A Discord bot.
#[derive(Clone, PartialEq, Eq)]
pub struct DiscordConfig {
    /// The bot token (sent as `Authorization: Bot <token>`).
    pub token: String,
    /// Default [`DISCORD_API_BASE`]; the seed's `CALLBACK_API_BASE_URL`.
    pub api_base: String,
    /// An HTTP(S) proxy for `https:` API bases (the seed's `DISCORD_PROXY`).
    pub proxy: Option<String>,
}

impl DiscordConfig {
    pub fn new(token: impl Into<String>) -> Self {
        DiscordConfig {
            token: token.into(),
            api_base: DISCORD_API_BASE.to_owned(),
            proxy: None,
        }
    }
}

impl fmt::Debug for DiscordConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscordConfig")
            .field("token", &"<redacted>")
            .field("api_base", &self.api_base)
            .field("proxy", &self.proxy.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// A Telegram bot.
#[derive(Clone, PartialEq, Eq)]
pub struct TelegramConfig {
    /// The bot token from @BotFather (it goes in the URL path: `/bot<token>/sendMessage`).
    pub token: String,
    /// Default [`TELEGRAM_API_BASE`] (a local Bot API server works too).
    pub api_base: String,
}

impl TelegramConfig {
    pub fn new(token: impl Into<String>) -> Self {
        TelegramConfig {
            token: token.into(),
            api_base: TELEGRAM_API_BASE.to_owned(),
        }
    }
}

impl fmt::Debug for TelegramConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelegramConfig")
            .field("token", &"<redacted>")
            .field("api_base", &self.api_base)
            .finish()
    }
}

/// A signed webhook. The URL is treated as a secret too (Slack-style URLs carry one).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub url: String,
    /// The HMAC key of the signature header.
    pub secret: String,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &"<redacted>")
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Everything [`Platforms::new`] needs.
#[derive(Debug, Clone)]
pub struct PlatformsConfig {
    pub discord: Option<DiscordConfig>,
    pub telegram: Option<TelegramConfig>,
    /// By name: a task's `reply_to.channel` for `platform: webhook`.
    pub webhooks: BTreeMap<String, WebhookConfig>,
    /// Whole-request timeout of one send (default 15 s, the seed's).
    pub timeout: Duration,
    /// An exhausted Discord bucket that resets within this is waited for inside the call;
    /// a longer wait is returned as [`DeliveryError::RetryAfter`] (default 2 s).
    pub max_inline_wait: Duration,
}

impl Default for PlatformsConfig {
    fn default() -> Self {
        PlatformsConfig {
            discord: None,
            telegram: None,
            webhooks: BTreeMap::new(),
            timeout: Duration::from_secs(15),
            max_inline_wait: Duration::from_secs(2),
        }
    }
}

impl PlatformsConfig {
    /// Reads the process environment; see [`PlatformsConfig::from_vars`].
    pub fn from_env() -> Self {
        Self::from_vars(std::env::vars())
    }

    /// Reads these variables (empty values count as unset):
    ///
    /// - Discord: `CALLBACK_BOT_TOKEN` (else `DISCORD_BOT_TOKEN`), `CALLBACK_API_BASE_URL`
    ///   (else `DISCORD_API_BASE_URL`, else [`DISCORD_API_BASE`]), `DISCORD_PROXY`.
    /// - Telegram: `TELEGRAM_BOT_TOKEN`, `TELEGRAM_API_BASE_URL` (else [`TELEGRAM_API_BASE`]).
    /// - Webhooks: `TUNNEL_WEBHOOK_<NAME>_URL` and `TUNNEL_WEBHOOK_<NAME>_SECRET`; the webhook's
    ///   name is `<NAME>` in lower case (`TUNNEL_WEBHOOK_CI_URL` → `ci`). One without a secret
    ///   is skipped with a warning.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .filter(|(_, v)| !v.trim().is_empty())
            .collect();
        let get = |k: &str| vars.get(k).map(|v| v.trim().to_owned());
        let discord = get("CALLBACK_BOT_TOKEN")
            .or_else(|| get("DISCORD_BOT_TOKEN"))
            .map(|token| DiscordConfig {
                token,
                api_base: get("CALLBACK_API_BASE_URL")
                    .or_else(|| get("DISCORD_API_BASE_URL"))
                    .unwrap_or_else(|| DISCORD_API_BASE.to_owned()),
                proxy: get("DISCORD_PROXY"),
            });
        let telegram = get("TELEGRAM_BOT_TOKEN").map(|token| TelegramConfig {
            token,
            api_base: get("TELEGRAM_API_BASE_URL").unwrap_or_else(|| TELEGRAM_API_BASE.to_owned()),
        });
        let mut webhooks = BTreeMap::new();
        for (key, url) in &vars {
            let Some(name) = key
                .strip_prefix("TUNNEL_WEBHOOK_")
                .and_then(|k| k.strip_suffix("_URL"))
            else {
                continue;
            };
            match get(&format!("TUNNEL_WEBHOOK_{name}_SECRET")) {
                Some(secret) => {
                    webhooks.insert(
                        name.to_lowercase(),
                        WebhookConfig {
                            url: url.trim().to_owned(),
                            secret,
                        },
                    );
                }
                None => tracing::warn!(
                    webhook = %name.to_lowercase(),
                    "TUNNEL_WEBHOOK_{name}_URL is set without TUNNEL_WEBHOOK_{name}_SECRET: webhook skipped"
                ),
            }
        }
        PlatformsConfig {
            discord,
            telegram,
            webhooks,
            ..PlatformsConfig::default()
        }
    }
}

/// The configured platforms. Cheap to clone (the clients and rate-limit state are shared).
#[derive(Clone)]
pub struct Platforms {
    discord: Option<Discord>,
    telegram: Option<Telegram>,
    webhooks: Arc<BTreeMap<String, Webhook>>,
    /// Every configured secret (bot tokens, webhook keys and URLs), scrubbed from every error
    /// whichever platform it came from.
    secrets: Arc<Vec<String>>,
}

impl fmt::Debug for Platforms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Platforms")
            .field("discord", &self.discord.is_some())
            .field("telegram", &self.telegram.is_some())
            .field("webhooks", &self.webhooks.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn check_base(what: &str, base: &str) -> Result<String, ConfigError> {
    let base = base.trim().trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) || base.len() < 10 {
        return Err(ConfigError(format!(
            "{what} must be an http:// or https:// URL"
        )));
    }
    Ok(base.to_owned())
}

fn check_token(what: &str, token: &str) -> Result<(), ConfigError> {
    if token.trim().is_empty() {
        return Err(ConfigError(format!("{what} is empty")));
    }
    if token
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return Err(ConfigError(format!(
            "{what} contains whitespace, control characters or '/'"
        )));
    }
    Ok(())
}

fn http_client(proxy: Option<&str>) -> Result<reqwest::Client, ConfigError> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        // A redirect would carry a signed body or a token somewhere unexpected: never follow.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(p) = proxy {
        let proxy = reqwest::Proxy::https(p)
            .map_err(|_| ConfigError("DISCORD_PROXY is not a valid proxy URL".to_owned()))?;
        b = b.proxy(proxy);
    }
    b.build()
        .map_err(|e| ConfigError(format!("cannot build the HTTP client: {e}")))
}

impl Platforms {
    /// Builds the clients. Installs rustls' `ring` provider as the process default if none is
    /// installed yet (the workspace's one TLS provider).
    pub fn new(config: PlatformsConfig) -> Result<Platforms, ConfigError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = http_client(None)?;
        let mut secrets: Vec<String> = Vec::new();
        secrets.extend(config.discord.iter().map(|d| d.token.clone()));
        secrets.extend(config.telegram.iter().map(|t| t.token.clone()));
        for w in config.webhooks.values() {
            secrets.push(w.secret.clone());
            secrets.push(w.url.clone());
        }
        let discord = match config.discord {
            Some(d) => {
                check_token("the Discord bot token", &d.token)?;
                let base = check_base("the Discord API base URL", &d.api_base)?;
                let http = match &d.proxy {
                    Some(p) => http_client(Some(p))?,
                    None => http.clone(),
                };
                Some(Discord::new(
                    http,
                    d.token,
                    base,
                    config.timeout,
                    config.max_inline_wait,
                ))
            }
            None => None,
        };
        let telegram = match config.telegram {
            Some(t) => {
                check_token("the Telegram bot token", &t.token)?;
                let base = check_base("the Telegram API base URL", &t.api_base)?;
                Some(Telegram::new(http.clone(), t.token, base, config.timeout))
            }
            None => None,
        };
        let mut webhooks = BTreeMap::new();
        for (name, w) in config.webhooks {
            check_base(&format!("the URL of webhook {name}"), &w.url)?;
            if w.secret.is_empty() {
                return Err(ConfigError(format!("webhook {name} has an empty secret")));
            }
            webhooks.insert(
                name,
                Webhook {
                    http: http.clone(),
                    config: w,
                    timeout: config.timeout,
                },
            );
        }
        secrets.retain(|s| !s.is_empty());
        // Longest first: a secret that contains another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Ok(Platforms {
            discord,
            telegram,
            webhooks: Arc::new(webhooks),
            secrets: Arc::new(secrets),
        })
    }

    /// Whether `to` can be delivered to (its platform or webhook is configured).
    pub fn supports(&self, to: &ReplyTo) -> bool {
        match to.platform {
            Platform::Discord => self.discord.is_some(),
            Platform::Telegram => self.telegram.is_some(),
            Platform::Webhook => self.webhooks.contains_key(&to.channel),
        }
    }

    /// The longest message the platform takes, in [`text_len`] units.
    pub fn limit(&self, platform: Platform) -> usize {
        match platform {
            Platform::Discord => DISCORD_LIMIT,
            Platform::Telegram => TELEGRAM_LIMIT,
            Platform::Webhook => WEBHOOK_LIMIT,
        }
    }

    fn discord(&self) -> Result<&Discord, DeliveryError> {
        self.discord.as_ref().ok_or_else(|| {
            DeliveryError::Permanent(
                "Discord is not configured (set CALLBACK_BOT_TOKEN)".to_owned(),
            )
        })
    }

    fn telegram(&self) -> Result<&Telegram, DeliveryError> {
        self.telegram.as_ref().ok_or_else(|| {
            DeliveryError::Permanent(
                "Telegram is not configured (set TELEGRAM_BOT_TOKEN)".to_owned(),
            )
        })
    }

    fn hook(&self, name: &str) -> Result<&Webhook, DeliveryError> {
        self.webhooks.get(name).ok_or_else(|| {
            DeliveryError::Permanent(format!("no webhook named {name:?} is configured"))
        })
    }

    /// Sends a new message. Discord: `POST /channels/{thread or channel}/messages` with
    /// `allowed_mentions: {parse: []}` and a `message_reference` when `to.message` is set.
    /// Telegram: `sendMessage` (plain text) with `message_thread_id` and `reply_parameters`.
    /// Webhook: the webhook gets `{"type": "message", "id", "text", "thread"?, "reply_to"?}`
    /// and the returned id is the `id` sent.
    ///
    /// A text longer than the platform's limit is cut (with a warning): [`split`] it first.
    pub async fn post(&self, to: &ReplyTo, text: &str) -> Result<MessageId, DeliveryError> {
        self.post_once(to, text, None).await
    }

    /// An error without any configured secret in it.
    fn scrubbed(&self, e: DeliveryError) -> DeliveryError {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        match e {
            DeliveryError::Transient(m) => DeliveryError::Transient(scrub(&m, &secrets)),
            DeliveryError::Permanent(m) => DeliveryError::Permanent(scrub(&m, &secrets)),
            e @ DeliveryError::RetryAfter { .. } => e,
        }
    }

    /// [`Platforms::post`] with a key that makes a repeated send of the same message (after a
    /// lost answer, a timeout or a crash before the outcome was recorded) return the first
    /// message instead of creating another: Discord's `nonce` with `enforce_nonce` (checked by
    /// Discord for a few minutes; at most 25 characters). Telegram and webhooks have no such
    /// key; there the send is repeated.
    pub async fn post_once(
        &self,
        to: &ReplyTo,
        text: &str,
        key: Option<&str>,
    ) -> Result<MessageId, DeliveryError> {
        self.post_inner(to, text, key)
            .await
            .map_err(|e| self.scrubbed(e))
    }

    async fn post_inner(
        &self,
        to: &ReplyTo,
        text: &str,
        key: Option<&str>,
    ) -> Result<MessageId, DeliveryError> {
        let text = fit(text, self.limit(to.platform))?;
        match to.platform {
            Platform::Discord => self.discord()?.post(to, &text, key).await,
            Platform::Telegram => self.telegram()?.post(to, &text).await,
            Platform::Webhook => {
                let hook = self.hook(&to.channel)?;
                let id = MessageId(webhook_message_id());
                let mut payload = serde_json::json!({"type": "message", "id": id.0, "text": text});
                if let Some(t) = &to.thread {
                    payload["thread"] = t.as_str().into();
                }
                if let Some(m) = &to.message {
                    payload["reply_to"] = m.as_str().into();
                }
                hook.send(&to.channel, &payload).await?;
                Ok(id)
            }
        }
    }

    /// Replaces the text of a message sent by [`Platforms::post`]. Discord: `PATCH
    /// /channels/{thread or channel}/messages/{id}`; Telegram: `editMessageText`, where
    /// "message is not modified" counts as success; webhook:
    /// `{"type": "edit", "id", "text"}`.
    pub async fn edit(
        &self,
        to: &ReplyTo,
        id: &MessageId,
        text: &str,
    ) -> Result<(), DeliveryError> {
        self.edit_inner(to, id, text)
            .await
            .map_err(|e| self.scrubbed(e))
    }

    async fn edit_inner(
        &self,
        to: &ReplyTo,
        id: &MessageId,
        text: &str,
    ) -> Result<(), DeliveryError> {
        let text = fit(text, self.limit(to.platform))?;
        match to.platform {
            Platform::Discord => self.discord()?.edit(to, id, &text).await,
            Platform::Telegram => self.telegram()?.edit(to, id, &text).await,
            Platform::Webhook => {
                let payload = serde_json::json!({"type": "edit", "id": id.0, "text": text});
                self.hook(&to.channel)?.send(&to.channel, &payload).await
            }
        }
    }

    /// POSTs `payload` as JSON to the named webhook, signed: `X-Tunnel-Timestamp: <unix
    /// seconds>` and `X-Tunnel-Signature: sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`
    /// ([`signature`]). Any 2xx is success; 429 honours `Retry-After`; 408 and 5xx are
    /// transient; other statuses (and redirects, which are not followed) are permanent.
    pub async fn webhook(
        &self,
        name: &str,
        payload: &serde_json::Value,
    ) -> Result<(), DeliveryError> {
        match self.hook(name) {
            Ok(h) => h.send(name, payload).await,
            Err(e) => Err(e),
        }
        .map_err(|e| self.scrubbed(e))
    }
}

/// Checks the shape of `to`'s ids without sending anything (e.g. when a task is submitted):
/// Discord channel, thread and message ids are numeric snowflakes; a Telegram chat is an
/// integer or `@channelusername`, its topic and message ids integers; a webhook is named.
/// The same checks run before every send, so a bad id fails as [`DeliveryError::Permanent`]
/// without a request.
pub fn validate_reply_to(to: &ReplyTo) -> Result<(), String> {
    let r = match to.platform {
        Platform::Discord => discord::snowflake("channel", &to.channel)
            .and_then(|_| {
                to.thread
                    .as_deref()
                    .map_or(Ok(""), |t| discord::snowflake("thread", t))
            })
            .and_then(|_| {
                to.message
                    .as_deref()
                    .map_or(Ok(""), |m| discord::snowflake("message", m))
            })
            .map(|_| ()),
        Platform::Telegram => telegram::chat_id(&to.channel)
            .and_then(|_| {
                to.thread
                    .as_deref()
                    .map_or(Ok(0), |t| telegram::int_id("topic (message_thread_id)", t))
            })
            .and_then(|_| {
                to.message
                    .as_deref()
                    .map_or(Ok(0), |m| telegram::int_id("message id", m))
            })
            .map(|_| ()),
        Platform::Webhook if to.channel.trim().is_empty() => Err(DeliveryError::Permanent(
            "a webhook reply_to needs the webhook's name as its channel".to_owned(),
        )),
        Platform::Webhook => Ok(()),
    };
    r.map_err(|e| e.to_string())
}

fn fit(text: &str, limit: usize) -> Result<String, DeliveryError> {
    if text.trim().is_empty() {
        return Err(DeliveryError::Permanent(
            "refusing to send an empty message".to_owned(),
        ));
    }
    if text_len(text) > limit {
        tracing::warn!(
            len = text_len(text),
            limit,
            "message over the platform limit: cut (split it before sending)"
        );
        return Ok(split::head(text, limit));
    }
    Ok(text.to_owned())
}

fn webhook_message_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{ms}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// The parts of a URL beyond its host, each of which may be a secret (Slack-style webhook
/// paths, `?token=` queries): the path with its query, the path, the query, each path segment
/// and each query pair and value, as written and percent-decoded. Parts under 4 characters
/// are left (they would mangle ordinary words and hide nothing).
pub(crate) fn url_secrets(url: &str) -> Vec<String> {
    let Ok(u) = reqwest::Url::parse(url) else {
        return vec![url.to_owned()];
    };
    let mut parts: Vec<String> = vec![url.to_owned()];
    let path = u.path().to_owned();
    let query = u.query().unwrap_or_default().to_owned();
    parts.push(format!("{path}?{query}"));
    parts.push(path.clone());
    parts.push(query.clone());
    parts.extend(path.split('/').map(str::to_owned));
    for pair in query.split('&') {
        parts.push(pair.to_owned());
        if let Some((_, v)) = pair.split_once('=') {
            parts.push(v.to_owned());
        }
    }
    for (k, v) in u.query_pairs() {
        parts.push(format!("{k}={v}"));
        parts.push(v.into_owned());
    }
    if let Some(segments) = u.path_segments() {
        for seg in segments {
            parts.push(percent_decode(seg));
        }
    }
    parts.retain(|p| p.len() >= 4 && p != "/");
    parts.sort_by_key(|p| std::cmp::Reverse(p.len()));
    parts.dedup();
    parts
}

/// `%XX` escapes decoded (invalid ones kept as written).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces every non-empty secret in `text` with `<redacted>`.
pub(crate) fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut s = text.to_owned();
    for secret in secrets {
        if !secret.is_empty() {
            s = s.replace(secret, "<redacted>");
        }
    }
    s
}

/// A reqwest error for people: without its URL (Telegram's contains the token), with its
/// causes, scrubbed of `secrets`.
pub(crate) fn describe_reqwest(e: reqwest::Error, secrets: &[&str]) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    scrub(&text, secrets)
}

/// The error for an HTTP status that is not a success.
pub(crate) fn classify_status(
    status: u16,
    reason: String,
    retry_after_secs: Option<f64>,
) -> DeliveryError {
    match status {
        429 => DeliveryError::RetryAfter {
            after: secs(retry_after_secs.unwrap_or(5.0)),
            global: false,
        },
        408 | 425 | 500..=599 => DeliveryError::Transient(reason),
        _ => DeliveryError::Permanent(reason),
    }
}

/// Seconds (as the platforms send them: float, maybe negative or absurd) as a Duration,
/// clamped to 0..=1 day.
pub(crate) fn secs(s: f64) -> Duration {
    if s.is_finite() && s > 0.0 {
        Duration::from_secs_f64(s.min(86_400.0))
    } else {
        Duration::ZERO
    }
}
