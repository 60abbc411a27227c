//! Discord REST v10: create and edit a message, with per-route buckets and the global limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{DeliveryError, MessageId, ReplyTo, describe_reqwest, scrub, secs};

const USER_AGENT: &str = concat!(
    "DiscordBot (https://github.com/tunnel-dev/tunnel, ",
    env!("CARGO_PKG_VERSION"),
    ")"
);

#[derive(Clone)]
pub(crate) struct Discord {
    http: reqwest::Client,
    token: Arc<str>,
    base: Arc<str>,
    timeout: Duration,
    max_inline_wait: Duration,
    limits: Arc<Mutex<Limits>>,
    /// Set by a 401: the token is wrong and every further call would fail too (and count
    /// towards Discord's invalid-request ban), so none is made.
    unauthorized: Arc<AtomicBool>,
}

/// Rate-limit state learned from response headers.
#[derive(Default)]
struct Limits {
    /// Route ("PATCH /channels/{}/messages/{}") → bucket hash (`X-RateLimit-Bucket`).
    route_bucket: HashMap<&'static str, String>,
    /// "{bucket or route}:{channel}" → what is left of it.
    buckets: HashMap<String, Bucket>,
    /// No request until then (a global 429).
    global_until: Option<Instant>,
}

struct Bucket {
    remaining: u64,
    reset_at: Instant,
}

impl Limits {
    fn key(&self, route: &'static str, channel: &str) -> String {
        let bucket = self.route_bucket.get(route).map_or(route, String::as_str);
        format!("{bucket}:{channel}")
    }
}

/// A Discord id: a snowflake, digits only. Anything else could change the request path.
pub(crate) fn snowflake<'a>(what: &str, id: &'a str) -> Result<&'a str, DeliveryError> {
    if !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit()) {
        Ok(id)
    } else {
        Err(DeliveryError::Permanent(format!(
            "invalid Discord {what} id {:?}: must be a numeric snowflake",
            crate::split::head(id, 40)
        )))
    }
}

fn header_f64(h: &HeaderMap, name: &str) -> Option<f64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn header_str<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name)?.to_str().ok()
}

const CREATE: &str = "POST /channels/{}/messages";
const EDIT: &str = "PATCH /channels/{}/messages/{}";

impl Discord {
    pub(crate) fn new(
        http: reqwest::Client,
        token: String,
        base: String,
        timeout: Duration,
        max_inline_wait: Duration,
    ) -> Self {
        Discord {
            http,
            token: token.into(),
            base: base.into(),
            timeout,
            max_inline_wait,
            limits: Arc::default(),
            unauthorized: Arc::default(),
        }
    }

    pub(crate) async fn post(
        &self,
        to: &ReplyTo,
        text: &str,
        nonce: Option<&str>,
    ) -> Result<MessageId, DeliveryError> {
        let channel = snowflake("channel", to.thread.as_deref().unwrap_or(&to.channel))?;
        let mut body = json!({"content": text, "allowed_mentions": {"parse": []}});
        if let Some(n) = nonce.filter(|n| !n.is_empty() && n.len() <= 25) {
            body["nonce"] = n.into();
            body["enforce_nonce"] = true.into();
        }
        if let Some(m) = &to.message {
            // fail_if_not_exists: false — a deleted question must not lose the answer.
            body["message_reference"] =
                json!({"message_id": snowflake("message", m)?, "fail_if_not_exists": false});
        }
        let url = format!("{}/channels/{channel}/messages", self.base);
        let v = self
            .send(reqwest::Method::POST, CREATE, channel, url, body)
            .await?;
        match v.get("id") {
            Some(Value::String(id)) => Ok(MessageId(id.clone())),
            Some(Value::Number(n)) => Ok(MessageId(n.to_string())),
            _ => Err(DeliveryError::Transient(
                "Discord answered 2xx without a message id".to_owned(),
            )),
        }
    }

    pub(crate) async fn edit(
        &self,
        to: &ReplyTo,
        id: &MessageId,
        text: &str,
    ) -> Result<(), DeliveryError> {
        let channel = snowflake("channel", to.thread.as_deref().unwrap_or(&to.channel))?;
        let message = snowflake("message", &id.0)?;
        let body = json!({"content": text, "allowed_mentions": {"parse": []}});
        let url = format!("{}/channels/{channel}/messages/{message}", self.base);
        self.send(reqwest::Method::PATCH, EDIT, channel, url, body)
            .await?;
        Ok(())
    }

    /// Waits for (or refuses with RetryAfter) an exhausted bucket or a global limit, then
    /// takes one request from the bucket.
    async fn acquire(&self, route: &'static str, channel: &str) -> Result<(), DeliveryError> {
        loop {
            let wait = {
                let mut l = self.limits.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                if let Some(until) = l.global_until {
                    if until > now {
                        return Err(DeliveryError::RetryAfter {
                            after: until - now,
                            global: true,
                        });
                    }
                    l.global_until = None;
                }
                let key = l.key(route, channel);
                match l.buckets.get_mut(&key) {
                    Some(b) if b.reset_at <= now => {
                        l.buckets.remove(&key);
                        None
                    }
                    Some(b) if b.remaining == 0 => Some(b.reset_at - now),
                    Some(b) => {
                        b.remaining -= 1;
                        None
                    }
                    None => None,
                }
            };
            match wait {
                None => return Ok(()),
                Some(d) if d <= self.max_inline_wait => tokio::time::sleep(d).await,
                Some(d) => {
                    return Err(DeliveryError::RetryAfter {
                        after: d,
                        global: false,
                    });
                }
            }
        }
    }

    /// Learns from a response's rate-limit headers (and a 429's body).
    fn learn(
        &self,
        route: &'static str,
        channel: &str,
        h: &HeaderMap,
        limited: Option<(Duration, bool)>,
    ) {
        let mut l = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(bucket) = header_str(h, "x-ratelimit-bucket") {
            l.route_bucket.insert(route, bucket.to_owned());
        }
        let key = l.key(route, channel);
        if let (Some(remaining), Some(reset_after)) = (
            header_f64(h, "x-ratelimit-remaining"),
            header_f64(h, "x-ratelimit-reset-after"),
        ) {
            l.buckets.insert(
                key.clone(),
                Bucket {
                    remaining: remaining.max(0.0) as u64,
                    reset_at: now + secs(reset_after),
                },
            );
        }
        match limited {
            Some((after, true)) => l.global_until = Some(now + after),
            Some((after, false)) => {
                l.buckets.insert(
                    key,
                    Bucket {
                        remaining: 0,
                        reset_at: now + after,
                    },
                );
            }
            None => {}
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        route: &'static str,
        channel: &str,
        url: String,
        body: Value,
    ) -> Result<Value, DeliveryError> {
        if self.unauthorized.load(Ordering::Relaxed) {
            return Err(DeliveryError::Permanent(
                "Discord rejected the bot token earlier (401); fix CALLBACK_BOT_TOKEN and restart"
                    .to_owned(),
            ));
        }
        self.acquire(route, channel).await?;
        let secrets = [&*self.token];
        let mut auth = HeaderValue::from_str(&format!("Bot {}", self.token)).map_err(|_| {
            DeliveryError::Permanent("the Discord bot token is not a valid header value".into())
        })?;
        auth.set_sensitive(true);
        let resp = self
            .http
            .request(method, url)
            .timeout(self.timeout)
            .header(reqwest::header::AUTHORIZATION, auth)
            .header(reqwest::header::USER_AGENT, USER_AGENT)
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                DeliveryError::Transient(format!("Discord: {}", describe_reqwest(e, &secrets)))
            })?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) if (200..300).contains(&status) => {
                self.learn(route, channel, &headers, None);
                return Err(DeliveryError::Transient(format!(
                    "Discord: reading the answer: {}",
                    describe_reqwest(e, &secrets)
                )));
            }
            Err(_) => String::new(),
        };
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if (200..300).contains(&status) {
            self.learn(route, channel, &headers, None);
            return Ok(json.unwrap_or(Value::Null));
        }
        if status == 429 {
            let body = json.unwrap_or(Value::Null);
            let scope = header_str(&headers, "x-ratelimit-scope");
            let global = body["global"].as_bool().unwrap_or(false)
                || header_str(&headers, "x-ratelimit-global") == Some("true")
                || scope == Some("global");
            let after = body["retry_after"]
                .as_f64()
                .or_else(|| header_f64(&headers, "retry-after"))
                .or_else(|| header_f64(&headers, "x-ratelimit-reset-after"))
                .map_or(Duration::from_secs(5), secs);
            tracing::warn!(
                route,
                channel,
                global,
                scope,
                retry_after_ms = after.as_millis() as u64,
                "Discord rate limit (429)"
            );
            self.learn(route, channel, &headers, Some((after, global)));
            return Err(DeliveryError::RetryAfter { after, global });
        }
        self.learn(route, channel, &headers, None);
        let reason = describe_error(status, json.as_ref(), &text);
        let reason = scrub(&format!("Discord {route}: {reason}"), &secrets);
        match status {
            401 => {
                self.unauthorized.store(true, Ordering::Relaxed);
                tracing::error!("Discord rejected the bot token (401): no more Discord sends");
                Err(DeliveryError::Permanent(reason))
            }
            408 | 500..=599 => Err(DeliveryError::Transient(reason)),
            _ => Err(DeliveryError::Permanent(reason)),
        }
    }
}

/// "403 Forbidden: Missing Permissions (code 50013)", with the first field error of a 50035.
fn describe_error(status: u16, json: Option<&Value>, text: &str) -> String {
    let status_text = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let Some(v) = json.filter(|v| v.is_object()) else {
        let t = crate::split::head(text.trim(), 200);
        return if t.is_empty() {
            format!("HTTP {status} {status_text}")
        } else {
            format!("HTTP {status} {status_text}: {t}")
        };
    };
    let mut s = format!("HTTP {status} {status_text}");
    if let Some(m) = v["message"].as_str() {
        s.push_str(": ");
        s.push_str(&crate::split::head(m, 200));
    }
    if let Some(c) = v["code"].as_i64() {
        s.push_str(&format!(" (code {c})"));
    }
    if let Some(detail) = first_field_error(&v["errors"], String::new()) {
        s.push_str(&format!("; {}", crate::split::head(&detail, 200)));
    }
    s
}

/// Discord's nested `errors` object: the first `_errors` entry, with its field path.
fn first_field_error(v: &Value, path: String) -> Option<String> {
    let obj = v.as_object()?;
    if let Some(errs) = obj.get("_errors").and_then(Value::as_array) {
        let e = errs.first()?;
        let msg = e["message"].as_str().unwrap_or("invalid");
        return Some(if path.is_empty() {
            msg.to_owned()
        } else {
            format!("{path}: {msg}")
        });
    }
    obj.iter().find_map(|(k, child)| {
        let p = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        first_field_error(child, p)
    })
}
