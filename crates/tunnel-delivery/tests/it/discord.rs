use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tunnel_delivery::{DeliveryError, MessageId, Platform, ReplyTo};

use crate::standin::{
    Behave, DISCORD_TOKEN, StandIn, assert_no_secret, platforms, platforms_with, to,
};

#[tokio::test]
async fn post_has_discords_exact_shape_and_never_pings() {
    let d = StandIn::discord().await;
    let p = platforms(Some(&d), None, None);
    let id = p
        .post(
            &to(Platform::Discord, "123456789012345678"),
            "hi @everyone <@42>",
        )
        .await
        .unwrap();
    assert_eq!(id, MessageId("10001".into()));
    let r = &d.requests()[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/api/v10/channels/123456789012345678/messages");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bot {DISCORD_TOKEN}").as_str())
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    let ua = r.header("user-agent").unwrap();
    assert!(
        ua.starts_with("DiscordBot (https://") && ua.ends_with(')'),
        "{ua}"
    );
    assert_eq!(
        r.body,
        json!({"content": "hi @everyone <@42>", "allowed_mentions": {"parse": []}})
    );
}

/// A repeated send (after a lost answer or a crash before the outcome was recorded) carries
/// the same nonce with `enforce_nonce`, so Discord returns the first message instead of
/// posting the answer twice (found by the server-crash chaos test).
#[tokio::test]
async fn post_once_sends_a_nonce_discord_enforces() {
    let d = StandIn::discord().await;
    let p = platforms(Some(&d), None, None);
    p.post_once(
        &to(Platform::Discord, "123"),
        "answer",
        Some("0a1b2c3d.42.0"),
    )
    .await
    .unwrap();
    // Longer than Discord's 25 characters: sent without one rather than refused.
    p.post_once(&to(Platform::Discord, "123"), "b", Some(&"x".repeat(26)))
        .await
        .unwrap();
    let r = d.requests();
    assert_eq!(
        r[0].body,
        json!({"content": "answer", "allowed_mentions": {"parse": []},
               "nonce": "0a1b2c3d.42.0", "enforce_nonce": true})
    );
    assert_eq!(
        r[1].body,
        json!({"content": "b", "allowed_mentions": {"parse": []}})
    );
}

#[tokio::test]
async fn post_into_a_thread_replying_to_a_message() {
    let d = StandIn::discord().await;
    let p = platforms(Some(&d), None, None);
    let to = ReplyTo {
        platform: Platform::Discord,
        channel: "111".into(),
        thread: Some("222".into()),
        message: Some("333".into()),
    };
    p.post(&to, "answer").await.unwrap();
    let r = &d.requests()[0];
    assert_eq!(r.path, "/api/v10/channels/222/messages");
    assert_eq!(
        r.body,
        json!({
            "content": "answer",
            "allowed_mentions": {"parse": []},
            "message_reference": {"message_id": "333", "fail_if_not_exists": false},
        })
    );
}

#[tokio::test]
async fn edit_is_a_patch_of_the_content() {
    let d = StandIn::discord().await;
    let p = platforms(Some(&d), None, None);
    p.edit(
        &to(Platform::Discord, "123"),
        &MessageId("789".into()),
        "working… 5s",
    )
    .await
    .unwrap();
    let r = &d.requests()[0];
    assert_eq!(r.method, "PATCH");
    assert_eq!(r.path, "/api/v10/channels/123/messages/789");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bot {DISCORD_TOKEN}").as_str())
    );
    assert_eq!(
        r.body,
        json!({"content": "working… 5s", "allowed_mentions": {"parse": []}})
    );
}

#[tokio::test]
async fn a_429_returns_retry_after_and_holds_the_bucket() {
    let d = StandIn::discord().await;
    d.then(Behave::RateLimited {
        retry_after: 1.5,
        global: false,
    });
    // Not waited for inside the call (a reset this short would be, by default).
    let p = platforms_with(Some(&d), None, None, |c| c.max_inline_wait = Duration::ZERO);
    let err = p.post(&to(Platform::Discord, "1"), "a").await.unwrap_err();
    assert_eq!(
        err,
        DeliveryError::RetryAfter {
            after: Duration::from_millis(1500),
            global: false
        }
    );
    // The next send to the same channel is refused without reaching Discord, for what is
    // left of the 1.5 s.
    let err = p.post(&to(Platform::Discord, "1"), "b").await.unwrap_err();
    match err {
        DeliveryError::RetryAfter { after, global } => {
            assert!(!global);
            assert!(after > Duration::from_millis(1000) && after <= Duration::from_millis(1500));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.count(), 1);
    // Another channel has its own bucket.
    p.post(&to(Platform::Discord, "2"), "c").await.unwrap();
    assert_eq!(d.count(), 2);
}

#[tokio::test]
async fn a_global_429_pauses_every_discord_send() {
    let d = StandIn::discord().await;
    d.then(Behave::RateLimited {
        retry_after: 0.75,
        global: true,
    });
    let p = platforms(Some(&d), None, None);
    let err = p.post(&to(Platform::Discord, "1"), "a").await.unwrap_err();
    assert_eq!(
        err,
        DeliveryError::RetryAfter {
            after: Duration::from_millis(750),
            global: true
        }
    );
    let err = p
        .edit(&to(Platform::Discord, "99"), &MessageId("5".into()), "b")
        .await
        .unwrap_err();
    assert!(
        matches!(err, DeliveryError::RetryAfter { global: true, after } if after <= Duration::from_millis(750))
    );
    assert_eq!(d.count(), 1, "nothing sent during a global limit");
    tokio::time::sleep(Duration::from_millis(800)).await;
    p.post(&to(Platform::Discord, "1"), "c").await.unwrap();
    assert_eq!(d.count(), 2);
}

#[tokio::test]
async fn an_exhausted_bucket_is_waited_for_when_short_and_refused_when_long() {
    let d = StandIn::discord().await;
    let bucket = |reset: &str| {
        Behave::Ok(vec![
            ("x-ratelimit-limit", "5".into()),
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset-after", reset.to_owned()),
            ("x-ratelimit-bucket", "b1".into()),
        ])
    };
    d.then(bucket("0.400"));
    let p = platforms(Some(&d), None, None);
    p.post(&to(Platform::Discord, "7"), "one").await.unwrap();
    let start = Instant::now();
    p.post(&to(Platform::Discord, "7"), "two").await.unwrap();
    let reqs = d.requests();
    assert!(
        reqs[1].at - reqs[0].at >= Duration::from_millis(380),
        "the second send waited for the reset ({:?})",
        start.elapsed()
    );

    // An edit shares the channel's bucket once Discord said so (same bucket hash).
    let d = StandIn::discord().await;
    d.then(bucket("30"));
    let p = platforms(Some(&d), None, None);
    p.post(&to(Platform::Discord, "7"), "one").await.unwrap();
    let err = p
        .post(&to(Platform::Discord, "7"), "two")
        .await
        .unwrap_err();
    match err {
        DeliveryError::RetryAfter { after, global } => {
            assert!(!global);
            assert!(after > Duration::from_secs(29) && after <= Duration::from_secs(30));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.count(), 1);
}

#[tokio::test]
async fn a_500_is_transient_and_a_timeout_too() {
    let d = StandIn::discord().await;
    d.then(Behave::Error(
        500,
        json!({"message": "500: Internal Server Error", "code": 0}),
    ))
    .then(Behave::Raw(502, "<html>Bad gateway</html>".into()))
    .then(Behave::Slow(Duration::from_secs(2)));
    let p = platforms_with(Some(&d), None, None, |c| {
        c.timeout = Duration::from_millis(300)
    });
    for _ in 0..3 {
        let err = p.post(&to(Platform::Discord, "1"), "a").await.unwrap_err();
        assert!(matches!(err, DeliveryError::Transient(_)), "{err:?}");
        assert_no_secret(&err);
    }
    p.post(&to(Platform::Discord, "1"), "a").await.unwrap();
}

#[tokio::test]
async fn a_403_or_404_is_permanent_with_discords_reason() {
    let d = StandIn::discord().await;
    d.then(Behave::Error(403, json!({"message": "Missing Permissions", "code": 50013})))
        .then(Behave::Error(404, json!({"message": "Unknown Channel", "code": 10003})))
        .then(Behave::Error(
            400,
            json!({"code": 50035, "message": "Invalid Form Body", "errors": {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}}}),
        ));
    let p = platforms(Some(&d), None, None);
    let e = p.post(&to(Platform::Discord, "1"), "a").await.unwrap_err();
    let DeliveryError::Permanent(reason) = &e else {
        panic!("{e:?}")
    };
    assert!(
        reason.contains("403")
            && reason.contains("Missing Permissions")
            && reason.contains("50013"),
        "{reason}"
    );
    let e = p.post(&to(Platform::Discord, "1"), "a").await.unwrap_err();
    let DeliveryError::Permanent(reason) = &e else {
        panic!("{e:?}")
    };
    assert!(reason.contains("Unknown Channel"), "{reason}");
    let e = p.post(&to(Platform::Discord, "1"), "a").await.unwrap_err();
    let DeliveryError::Permanent(reason) = &e else {
        panic!("{e:?}")
    };
    assert!(
        reason.contains("content: Must be 2000 or fewer in length."),
        "{reason}"
    );
}

#[tokio::test]
async fn a_401_stops_all_discord_sends_and_no_error_shows_the_token() {
    let d = StandIn::discord().await;
    // A misbehaving proxy that echoes the Authorization header back.
    d.then(Behave::Error(
        401,
        json!({"message": format!("401: Unauthorized (got Bot {DISCORD_TOKEN})"), "code": 0}),
    ));
    let p = platforms(Some(&d), None, None);
    let e = p.post(&to(Platform::Discord, "1"), "a").await.unwrap_err();
    assert!(e.is_permanent());
    assert!(e.to_string().contains("<redacted>"), "{e}");
    assert_no_secret(&e);
    let e = p.post(&to(Platform::Discord, "2"), "b").await.unwrap_err();
    assert!(e.is_permanent() && e.to_string().contains("401"), "{e}");
    assert_eq!(d.count(), 1, "no request after a 401");
}

#[tokio::test]
async fn ids_that_are_not_snowflakes_never_reach_the_path() {
    let d = StandIn::discord().await;
    let p = platforms(Some(&d), None, None);
    for bad in ["../users/@me", "12/34", "", "1?x=1"] {
        let e = p.post(&to(Platform::Discord, bad), "a").await.unwrap_err();
        assert!(e.is_permanent(), "{e:?}");
    }
    let e = p
        .edit(
            &to(Platform::Discord, "1"),
            &MessageId("../../x".into()),
            "a",
        )
        .await
        .unwrap_err();
    assert!(e.is_permanent());
    assert_eq!(d.count(), 0);
}

#[tokio::test]
async fn unconfigured_platform_and_empty_text_are_permanent() {
    let d = StandIn::discord().await;
    let p = platforms(Some(&d), None, None);
    let e = p.post(&to(Platform::Telegram, "1"), "a").await.unwrap_err();
    assert!(
        e.is_permanent() && e.to_string().contains("TELEGRAM_BOT_TOKEN"),
        "{e}"
    );
    let e = p
        .post(&to(Platform::Discord, "1"), " \n")
        .await
        .unwrap_err();
    assert!(e.is_permanent());
    // Over the limit: cut to fit rather than refused by Discord.
    p.post(&to(Platform::Discord, "1"), &"x".repeat(2500))
        .await
        .unwrap();
    let r = &d.requests()[0];
    assert_eq!(r.body["content"].as_str().unwrap().chars().count(), 2000);
}
