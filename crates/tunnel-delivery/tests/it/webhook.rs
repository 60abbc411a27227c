use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tunnel_delivery::{DeliveryError, MessageId, Platform, hex, hmac_sha256, signature};

use crate::standin::{Behave, StandIn, WEBHOOK_SECRET, assert_no_secret, platforms, to};

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// RFC 4231 test cases 1-4, 6 and 7 (case 5 is a truncated output).
#[test]
fn hmac_sha256_matches_rfc_4231() {
    let long_key = vec![0xaa; 131];
    let cases: [(Vec<u8>, Vec<u8>, &str); 6] = [
        (
            vec![0x0b; 20],
            b"Hi There".to_vec(),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        ),
        (
            b"Jefe".to_vec(),
            b"what do ya want for nothing?".to_vec(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        ),
        (
            vec![0xaa; 20],
            vec![0xdd; 50],
            "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
        ),
        (
            unhex("0102030405060708090a0b0c0d0e0f10111213141516171819"),
            vec![0xcd; 50],
            "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
        ),
        (
            long_key.clone(),
            b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
        ),
        (
            long_key,
            b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.".to_vec(),
            "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
        ),
    ];
    for (key, data, want) in cases {
        assert_eq!(hex(&hmac_sha256(&key, &data)), want);
    }
    // A key of exactly one block is used as is.
    assert_eq!(hmac_sha256(&[7; 64], b"x").len(), 32);
}

#[tokio::test]
async fn webhook_is_signed_and_the_signature_verifies() {
    let w = StandIn::webhook().await;
    let p = platforms(None, None, Some(&w));
    let payload = json!({"task": {"id": "t1", "state": "succeeded"}, "text": "done ✅"});
    p.webhook("ci", &payload).await.unwrap();
    let r = &w.requests()[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/hook");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let ts: u64 = r.header("x-tunnel-timestamp").unwrap().parse().unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(ts) <= 5);
    // What a receiver does: HMAC over "{timestamp}.{raw body}" with the shared secret.
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(&r.raw);
    let want = format!(
        "sha256={}",
        hex(&hmac_sha256(WEBHOOK_SECRET.as_bytes(), &signed))
    );
    assert_eq!(r.header("x-tunnel-signature"), Some(want.as_str()));
    assert_eq!(signature(WEBHOOK_SECRET, ts, &r.raw), want);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&r.raw).unwrap(),
        payload
    );
    // A different secret does not verify.
    assert_ne!(signature("other", ts, &r.raw), want);
}

#[tokio::test]
async fn webhook_statuses_map_to_retry_transient_and_permanent() {
    let w = StandIn::webhook().await;
    w.then(Behave::Raw(500, "oops".into()))
        .then(Behave::RateLimited {
            retry_after: 7.0,
            global: false,
        })
        .then(Behave::Raw(410, "gone".into()))
        .then(Behave::Raw(302, String::new()));
    let p = platforms(None, None, Some(&w));
    let payload = json!({"x": 1});
    let mut errors = vec![];
    let e = p.webhook("ci", &payload).await.unwrap_err();
    assert!(matches!(e, DeliveryError::Transient(_)), "{e:?}");
    errors.push(e);
    let e = p.webhook("ci", &payload).await.unwrap_err();
    assert_eq!(
        e,
        DeliveryError::RetryAfter {
            after: Duration::from_secs(7),
            global: false
        }
    );
    let e = p.webhook("ci", &payload).await.unwrap_err();
    assert!(e.is_permanent() && e.to_string().contains("410"), "{e}");
    errors.push(e);
    let e = p.webhook("ci", &payload).await.unwrap_err();
    assert!(e.is_permanent(), "a redirect is not followed: {e:?}");
    errors.push(e);
    assert_eq!(w.count(), 4);
    let e = p.webhook("nope", &payload).await.unwrap_err();
    assert!(e.is_permanent() && e.to_string().contains("nope"));
    errors.push(e);
    // The URL (which may carry a secret) is never in the errors.
    for e in &errors {
        assert_no_secret(e);
        assert!(!e.to_string().contains(&w.base()), "{e}");
    }
}

#[tokio::test]
async fn post_and_edit_to_a_webhook_send_message_events() {
    let w = StandIn::webhook().await;
    let p = platforms(None, None, Some(&w));
    let mut to = to(Platform::Webhook, "ci");
    to.thread = Some("build-7".into());
    let id = p.post(&to, "working…").await.unwrap();
    p.edit(&to, &id, "done").await.unwrap();
    let reqs = w.requests();
    assert_eq!(
        reqs[0].body,
        json!({"type": "message", "id": id.0, "text": "working…", "thread": "build-7"})
    );
    assert_eq!(
        reqs[1].body,
        json!({"type": "edit", "id": id.0, "text": "done"})
    );
    let other = p.post(&to, "again").await.unwrap();
    assert_ne!(other, id);
    assert_ne!(other, MessageId(String::new()));
}
