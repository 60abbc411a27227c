//! Signed webhooks: HMAC-SHA256 over sha2, and the POST.

use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
pub use tunnel_protocol::hex;

use crate::{DeliveryError, WebhookConfig, classify_status, describe_reqwest, scrub};

/// Header with the Unix time (seconds) the request was signed at.
pub const TIMESTAMP_HEADER: &str = "x-tunnel-timestamp";
/// Header with `sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`.
pub const SIGNATURE_HEADER: &str = "x-tunnel-signature";

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for i in 0..BLOCK {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

/// The value of the signature header for a body sent at `timestamp`:
/// `sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`.
///
/// A receiver recomputes it over the raw body bytes and the timestamp header, compares in
/// constant time, and rejects timestamps more than a few minutes old (replays).
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(body);
    format!("sha256={}", hex(&hmac_sha256(secret.as_bytes(), &message)))
}

#[derive(Clone)]
pub(crate) struct Webhook {
    pub(crate) http: reqwest::Client,
    pub(crate) config: WebhookConfig,
    pub(crate) timeout: std::time::Duration,
}

impl Webhook {
    pub(crate) async fn send(
        &self,
        name: &str,
        payload: &serde_json::Value,
    ) -> Result<(), DeliveryError> {
        let body = serde_json::to_vec(payload)
            .map_err(|e| DeliveryError::Permanent(format!("webhook {name}: bad payload: {e}")))?;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let signature = signature(&self.config.secret, timestamp, &body);
        // The key, and every part of the URL beyond its host: a receiver may echo its path
        // or query (where Slack-style URLs keep their secret) in an error.
        let url_parts = crate::url_secrets(&self.config.url);
        let mut secrets = vec![self.config.secret.as_str()];
        secrets.extend(url_parts.iter().map(String::as_str));
        let resp = self
            .http
            .post(&self.config.url)
            .timeout(self.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                DeliveryError::Transient(format!(
                    "webhook {name}: {}",
                    describe_reqwest(e, &secrets)
                ))
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok());
        let text = resp.text().await.unwrap_or_default();
        // Scrubbed whole before it is cut, so a cut cannot leave half a secret.
        let text = scrub(text.trim(), &secrets);
        let snippet = crate::split::head(&text, 200);
        let reason = format!("webhook {name}: HTTP {}: {snippet}", status.as_u16());
        Err(classify_status(status.as_u16(), reason, retry_after))
    }
}
