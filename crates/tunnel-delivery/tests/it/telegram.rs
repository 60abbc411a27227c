use std::time::Duration;

use serde_json::json;
use tunnel_delivery::{DeliveryError, MessageId, Platform, ReplyTo};

use crate::standin::{
    Behave, StandIn, TELEGRAM_TOKEN, assert_no_secret, platforms, platforms_with, to,
};

#[tokio::test]
async fn send_message_has_telegrams_exact_shape() {
    let t = StandIn::telegram().await;
    let p = platforms(None, Some(&t), None);
    let to = ReplyTo {
        platform: Platform::Telegram,
        channel: "-1001234567890".into(),
        thread: Some("7".into()),
        message: Some("42".into()),
    };
    let id = p.post(&to, "hello *world* <b>").await.unwrap();
    assert_eq!(id, MessageId("501".into()));
    let r = &t.requests()[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, format!("/bot{TELEGRAM_TOKEN}/sendMessage"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.body,
        json!({
            "chat_id": -1001234567890_i64,
            "text": "hello *world* <b>",
            "message_thread_id": 7,
            "reply_parameters": {"message_id": 42, "allow_sending_without_reply": true},
            "link_preview_options": {"is_disabled": true},
        })
    );
    assert!(
        r.body.get("parse_mode").is_none(),
        "plain text: no parse_mode"
    );

    // A channel by username, no topic, no reply.
    p.post(&crate::standin::to(Platform::Telegram, "@tunnel_news"), "x")
        .await
        .unwrap();
    assert_eq!(
        t.requests()[1].body,
        json!({"chat_id": "@tunnel_news", "text": "x", "link_preview_options": {"is_disabled": true}})
    );
}

#[tokio::test]
async fn edit_message_text_and_not_modified_is_success() {
    let t = StandIn::telegram().await;
    t.then(Behave::Ok(vec![])).then(Behave::Error(
        400,
        json!({"ok": false, "error_code": 400, "description": "Bad Request: message is not modified: specified new message content and reply markup are exactly the same as a current content and reply markup of the message"}),
    ));
    let p = platforms(None, Some(&t), None);
    let to = to(Platform::Telegram, "12345");
    p.edit(&to, &MessageId("77".into()), "working… 10s")
        .await
        .unwrap();
    p.edit(&to, &MessageId("77".into()), "working… 10s")
        .await
        .unwrap();
    let r = &t.requests()[0];
    assert_eq!(r.path, format!("/bot{TELEGRAM_TOKEN}/editMessageText"));
    assert_eq!(
        r.body,
        json!({"chat_id": 12345, "message_id": 77, "text": "working… 10s", "link_preview_options": {"is_disabled": true}})
    );
    assert_eq!(t.count(), 2);
}

#[tokio::test]
async fn flood_control_429_returns_retry_after_and_holds_the_chat() {
    let t = StandIn::telegram().await;
    t.then(Behave::RateLimited {
        retry_after: 3.0,
        global: false,
    });
    let p = platforms(None, Some(&t), None);
    let e = p.post(&to(Platform::Telegram, "5"), "a").await.unwrap_err();
    assert_eq!(
        e,
        DeliveryError::RetryAfter {
            after: Duration::from_secs(3),
            global: false
        }
    );
    let e = p.post(&to(Platform::Telegram, "5"), "b").await.unwrap_err();
    assert!(
        matches!(e, DeliveryError::RetryAfter { after, .. } if after <= Duration::from_secs(3) && after > Duration::from_secs(2))
    );
    assert_eq!(t.count(), 1);
    p.post(&to(Platform::Telegram, "6"), "c").await.unwrap();
    assert_eq!(t.count(), 2);
}

#[tokio::test]
async fn server_errors_are_transient_and_refusals_permanent_with_reason() {
    let t = StandIn::telegram().await;
    t.then(Behave::Error(
        500,
        json!({"ok": false, "error_code": 500, "description": "Internal Server Error"}),
    ))
    .then(Behave::Raw(502, "<html>502 Bad Gateway</html>".into()))
    .then(Behave::Error(
        403,
        json!({"ok": false, "error_code": 403, "description": "Forbidden: bot was blocked by the user"}),
    ))
    .then(Behave::Error(
        400,
        json!({"ok": false, "error_code": 400, "description": "Bad Request: chat not found"}),
    ))
    .then(Behave::Error(
        400,
        json!({"ok": false, "error_code": 400, "description": "Bad Request: group chat was upgraded to a supergroup chat", "parameters": {"migrate_to_chat_id": -1009876543210_i64}}),
    ));
    let p = platforms(None, Some(&t), None);
    let to = to(Platform::Telegram, "5");
    for _ in 0..2 {
        let e = p.post(&to, "a").await.unwrap_err();
        assert!(matches!(e, DeliveryError::Transient(_)), "{e:?}");
        assert_no_secret(&e);
    }
    let e = p.post(&to, "a").await.unwrap_err();
    assert_eq!(
        e,
        DeliveryError::Permanent(
            "Telegram sendMessage: 403 Forbidden: bot was blocked by the user".into()
        )
    );
    let e = p.post(&to, "a").await.unwrap_err();
    assert!(
        e.is_permanent() && e.to_string().contains("chat not found"),
        "{e}"
    );
    let e = p.post(&to, "a").await.unwrap_err();
    assert!(e.to_string().contains("-1009876543210"), "{e}");
}

#[tokio::test]
async fn bad_ids_are_permanent_without_a_request() {
    let t = StandIn::telegram().await;
    let p = platforms(None, Some(&t), None);
    for bad in ["abc", "@", "@a/b", ""] {
        assert!(
            p.post(&to(Platform::Telegram, bad), "a")
                .await
                .unwrap_err()
                .is_permanent()
        );
    }
    let mut topic = to(Platform::Telegram, "1");
    topic.thread = Some("general".into());
    assert!(p.post(&topic, "a").await.unwrap_err().is_permanent());
    assert_eq!(t.count(), 0);
}

/// The token is in the URL path; no error may show it, whatever goes wrong.
#[tokio::test]
async fn the_token_in_the_url_never_appears_in_an_error() {
    let t = StandIn::telegram().await;
    // A gateway that echoes the request path (with the token) in its error page.
    t.then(Behave::Raw(
        404,
        format!("no route for POST /bot{TELEGRAM_TOKEN}/sendMessage"),
    ))
    .then(Behave::Raw(
        503,
        format!("upstream /bot{TELEGRAM_TOKEN}/sendMessage unavailable"),
    ))
    .then(Behave::Error(
        400,
        json!({"ok": false, "error_code": 400, "description": format!("Bad Request: token {TELEGRAM_TOKEN} is weird")}),
    ))
    .then(Behave::Slow(Duration::from_secs(2)));
    let p = platforms_with(None, Some(&t), None, |c| {
        c.timeout = Duration::from_millis(300)
    });
    let to = to(Platform::Telegram, "5");
    let mut errors = vec![];
    for _ in 0..4 {
        errors.push(p.post(&to, "a").await.unwrap_err());
    }
    assert!(errors[0].is_permanent(), "{:?}", errors[0]);
    assert!(
        matches!(errors[1], DeliveryError::Transient(_)),
        "{:?}",
        errors[1]
    );
    assert!(errors[2].is_permanent());
    assert!(
        matches!(&errors[3], DeliveryError::Transient(m) if m.contains("timed out")),
        "{:?}",
        errors[3]
    );

    // Nothing listens: a connection error (reqwest's text would name the URL).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let p = platforms_with(None, Some(&t), None, |c| {
        c.telegram.as_mut().unwrap().api_base = format!("http://{closed}");
    });
    let e = p.post(&to, "a").await.unwrap_err();
    assert!(matches!(e, DeliveryError::Transient(_)), "{e:?}");
    errors.push(e);
    let e = p.edit(&to, &MessageId("1".into()), "a").await.unwrap_err();
    errors.push(e);

    for e in &errors {
        assert_no_secret(e);
        // The token's bot id half alone is not secret, but its key half is.
        assert!(!e.to_string().contains("AAH-telegram"), "{e}");
    }
}
