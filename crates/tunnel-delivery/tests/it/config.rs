use tunnel_delivery::{
    DISCORD_API_BASE, DiscordConfig, Platform, Platforms, PlatformsConfig, TELEGRAM_API_BASE,
    TelegramConfig,
};

use crate::standin::{DISCORD_TOKEN, TELEGRAM_TOKEN, WEBHOOK_SECRET, to};

fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn reads_the_seeds_names_and_telegrams() {
    let c = PlatformsConfig::from_vars(vars(&[
        ("CALLBACK_BOT_TOKEN", DISCORD_TOKEN),
        ("CALLBACK_API_BASE_URL", "https://discord.example/api/v10"),
        ("DISCORD_PROXY", "http://proxy.local:3128"),
        ("TELEGRAM_BOT_TOKEN", TELEGRAM_TOKEN),
        ("TUNNEL_WEBHOOK_CI_URL", "https://ci.example/hook"),
        ("TUNNEL_WEBHOOK_CI_SECRET", WEBHOOK_SECRET),
        ("TUNNEL_WEBHOOK_ORPHAN_URL", "https://x.example/"),
        ("UNRELATED", "x"),
    ]));
    let d = c.discord.clone().unwrap();
    assert_eq!(d.token, DISCORD_TOKEN);
    assert_eq!(d.api_base, "https://discord.example/api/v10");
    assert_eq!(d.proxy.as_deref(), Some("http://proxy.local:3128"));
    let t = c.telegram.clone().unwrap();
    assert_eq!(t.api_base, TELEGRAM_API_BASE);
    assert_eq!(c.webhooks.keys().collect::<Vec<_>>(), vec!["ci"]);

    // Debug never shows a secret.
    let debug = format!("{c:?}");
    for s in [
        DISCORD_TOKEN,
        TELEGRAM_TOKEN,
        WEBHOOK_SECRET,
        "https://ci.example/hook",
    ] {
        assert!(!debug.contains(s), "{debug}");
    }
    let p = Platforms::new(c).unwrap();
    assert!(!format!("{p:?}").contains(DISCORD_TOKEN));
    assert!(p.supports(&to(Platform::Discord, "1")));
    assert!(p.supports(&to(Platform::Webhook, "ci")));
    assert!(!p.supports(&to(Platform::Webhook, "orphan")));
    assert_eq!(p.limit(Platform::Discord), 2000);
    assert_eq!(p.limit(Platform::Telegram), 4096);

    let c = PlatformsConfig::from_vars(vars(&[
        ("DISCORD_BOT_TOKEN", "t"),
        ("CALLBACK_API_BASE_URL", ""),
    ]));
    assert_eq!(c.discord.unwrap().api_base, DISCORD_API_BASE);
    assert!(PlatformsConfig::from_vars(vec![]).telegram.is_none());
}

#[test]
fn bad_config_is_refused_without_echoing_the_token() {
    let mut c = PlatformsConfig {
        discord: Some(DiscordConfig {
            api_base: "discord.com".into(),
            ..DiscordConfig::new(DISCORD_TOKEN)
        }),
        ..PlatformsConfig::default()
    };
    let e = Platforms::new(c.clone()).unwrap_err();
    assert!(e.to_string().contains("API base"), "{e}");
    c.discord = None;
    c.telegram = Some(TelegramConfig::new("bad token/with slash"));
    let e = Platforms::new(c).unwrap_err();
    assert!(!e.to_string().contains("bad token"), "{e}");
}

#[test]
fn reply_to_ids_are_checked_before_any_send() {
    use tunnel_delivery::{ReplyTo, validate_reply_to};
    let r = |platform, channel: &str, thread: Option<&str>, message: Option<&str>| ReplyTo {
        platform,
        channel: channel.into(),
        thread: thread.map(Into::into),
        message: message.map(Into::into),
    };
    assert!(validate_reply_to(&r(Platform::Discord, "123", Some("456"), Some("789"))).is_ok());
    assert!(validate_reply_to(&r(Platform::Discord, "../x", None, None)).is_err());
    assert!(validate_reply_to(&r(Platform::Discord, "1", None, Some("abc"))).is_err());
    assert!(validate_reply_to(&r(Platform::Telegram, "-100123", Some("7"), Some("42"))).is_ok());
    assert!(validate_reply_to(&r(Platform::Telegram, "@chan_name", None, None)).is_ok());
    assert!(validate_reply_to(&r(Platform::Telegram, "chan", None, None)).is_err());
    assert!(validate_reply_to(&r(Platform::Telegram, "1", Some("x"), None)).is_err());
    assert!(validate_reply_to(&r(Platform::Webhook, "ci", None, None)).is_ok());
    assert!(validate_reply_to(&r(Platform::Webhook, " ", None, None)).is_err());
}
