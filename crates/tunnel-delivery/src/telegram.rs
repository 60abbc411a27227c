//! Telegram Bot API: sendMessage and editMessageText, honouring flood control.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{DeliveryError, MessageId, ReplyTo, describe_reqwest, scrub, secs};

#[derive(Clone)]
pub(crate) struct Telegram {
    http: reqwest::Client,
    token: Arc<str>,
    base: Arc<str>,
    timeout: Duration,
    /// Chat → no request before then (a 429's `retry_after`): calls in between are refused
    /// without reaching Telegram.
    blocked: Arc<Mutex<HashMap<String, Instant>>>,
}

/// `chat_id`: an integer, or `@channelusername`.
pub(crate) fn chat_id(id: &str) -> Result<Value, DeliveryError> {
    if let Ok(n) = id.parse::<i64>() {
        return Ok(n.into());
    }
    if let Some(name) = id.strip_prefix('@')
        && !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Ok(id.into());
    }
    Err(DeliveryError::Permanent(format!(
        "invalid Telegram chat id {:?}: must be an integer or @channelusername",
        crate::split::head(id, 40)
    )))
}

pub(crate) fn int_id(what: &str, id: &str) -> Result<i64, DeliveryError> {
    id.parse::<i64>().map_err(|_| {
        DeliveryError::Permanent(format!(
            "invalid Telegram {what} {:?}: must be an integer",
            crate::split::head(id, 40)
        ))
    })
}

impl Telegram {
    pub(crate) fn new(
        http: reqwest::Client,
        token: String,
        base: String,
        timeout: Duration,
    ) -> Self {
        Telegram {
            http,
            token: token.into(),
            base: base.into(),
            timeout,
            blocked: Arc::default(),
        }
    }

    pub(crate) async fn post(&self, to: &ReplyTo, text: &str) -> Result<MessageId, DeliveryError> {
        let mut body = json!({
            "chat_id": chat_id(&to.channel)?,
            "text": text,
            "link_preview_options": {"is_disabled": true},
        });
        if let Some(t) = &to.thread {
            body["message_thread_id"] = int_id("topic (message_thread_id)", t)?.into();
        }
        if let Some(m) = &to.message {
            // allow_sending_without_reply: a deleted question must not lose the answer.
            body["reply_parameters"] = json!({
                "message_id": int_id("message id", m)?,
                "allow_sending_without_reply": true,
            });
        }
        let result = self.call("sendMessage", &to.channel, body).await?;
        match result.get("message_id") {
            Some(Value::Number(n)) => Ok(MessageId(n.to_string())),
            _ => Err(DeliveryError::Transient(
                "Telegram answered ok without a message_id".to_owned(),
            )),
        }
    }

    pub(crate) async fn edit(
        &self,
        to: &ReplyTo,
        id: &MessageId,
        text: &str,
    ) -> Result<(), DeliveryError> {
        let body = json!({
            "chat_id": chat_id(&to.channel)?,
            "message_id": int_id("message id", &id.0)?,
            "text": text,
            "link_preview_options": {"is_disabled": true},
        });
        match self.call("editMessageText", &to.channel, body).await {
            Err(DeliveryError::Permanent(reason)) if reason.contains("message is not modified") => {
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    /// POSTs a method and returns its `result`.
    async fn call(&self, method: &str, chat: &str, body: Value) -> Result<Value, DeliveryError> {
        {
            let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            match blocked.get(chat) {
                Some(&until) if until > now => {
                    return Err(DeliveryError::RetryAfter {
                        after: until - now,
                        global: false,
                    });
                }
                Some(_) => {
                    blocked.remove(chat);
                }
                None => {}
            }
        }
        let secrets = [&*self.token];
        let url = format!("{}/bot{}/{method}", self.base, self.token);
        let resp = self
            .http
            .post(url)
            .timeout(self.timeout)
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                DeliveryError::Transient(format!(
                    "Telegram {method}: {}",
                    describe_reqwest(e, &secrets)
                ))
            })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| {
            DeliveryError::Transient(format!(
                "Telegram {method}: reading the answer: {}",
                describe_reqwest(e, &secrets)
            ))
        })?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if v["ok"] == true {
            return Ok(v["result"].clone());
        }
        let code = v["error_code"]
            .as_u64()
            .map_or(status, |c| u16::try_from(c).unwrap_or(status));
        let description = v["description"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| crate::split::head(text.trim(), 200));
        if code == 429 || status == 429 {
            let after = v["parameters"]["retry_after"]
                .as_f64()
                .map_or(Duration::from_secs(5), secs);
            tracing::warn!(
                method,
                retry_after_s = after.as_secs(),
                "Telegram flood control (429)"
            );
            self.blocked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(chat.to_owned(), Instant::now() + after);
            return Err(DeliveryError::RetryAfter {
                after,
                global: false,
            });
        }
        let mut reason = format!("Telegram {method}: {code} {description}");
        if let Some(new_chat) = v["parameters"]["migrate_to_chat_id"].as_i64() {
            reason.push_str(&format!(" (the group is now chat {new_chat})"));
        }
        let reason = scrub(&reason, &secrets);
        match code {
            408 | 500..=599 => Err(DeliveryError::Transient(reason)),
            // Telegram's own flood/overload answers sometimes come as 5xx bodies; anything
            // without a JSON error and with a non-4xx status is a gateway problem.
            _ if v.is_null() && !(400..500).contains(&status) => {
                Err(DeliveryError::Transient(reason))
            }
            _ => Err(DeliveryError::Permanent(reason)),
        }
    }
}
