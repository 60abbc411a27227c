//! The dashboard in a real browser: Debian's Chromium, headless, driven over the DevTools
//! protocol (`cdp.rs`). Installed by `scripts/test`; without it this test says SKIPPED, except
//! in CI (`CI=true`) or with `TUNNEL_REQUIRE_BROWSER=1`, where it fails.
//!
//! Screenshots go to `target/dashboard-screenshots/` (ignored by git).

use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cdp::{Browser, Page, browser_required, chromium};
use crate::common::{TestServer, id};

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/dashboard-screenshots")
}

/// Signs in through the page's own form.
async fn sign_in(p: &mut Page, s: &TestServer, token: &str) {
    p.goto(&format!("{}/ui/login", s.url)).await;
    p.wait_for("document.getElementById('token')").await;
    p.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('sign-in').click()",
        json!(token)
    ))
    .await;
    p.wait_for("location.pathname === '/ui/' && document.getElementById('live')")
        .await;
}

async fn sign_out(p: &mut Page) {
    p.eval("document.querySelector('header form button').click()")
        .await;
    p.wait_for("location.pathname === '/ui/login' && document.getElementById('token')")
        .await;
}

/// Waits until the live stream is open, then marks the page: if the mark survives a later
/// check, the page was updated in place, not reloaded.
async fn mark(p: &mut Page) {
    p.wait_for("document.getElementById('live').dataset.stream === 'open'")
        .await;
    p.eval("window.__same_page = true").await;
}

async fn still_same_page(p: &mut Page) {
    assert_eq!(
        p.eval("window.__same_page === true").await,
        true,
        "the page was reloaded"
    );
}

async fn no_script_ran(p: &mut Page) {
    assert_eq!(
        p.eval("typeof window.__xss").await,
        "undefined",
        "injected script ran"
    );
    assert_eq!(p.eval("document.querySelectorAll('img').length").await, 0);
}

const XSS_PROMPT: &str =
    "<img src=x onerror=\"window.__xss=1\"></script><script>window.__xss=2</script> fix the build";
const XSS_CONV: &str = "<img src=x onerror=\"window.__xss=3\">";
const XSS_OUTPUT: &str =
    "Done: <img src=x onerror=\"window.__xss=4\"></script>\u{1b}[32mgreen\u{1b}[0m";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let Some(bin) = chromium() else {
        assert!(
            !browser_required(),
            "chromium is required here (CI); see scripts/test"
        );
        eprintln!("SKIPPED: no chromium (apt-get install chromium, or set TUNNEL_CHROMIUM)");
        return;
    };
    let s = TestServer::start().await;
    let browser = Browser::launch(&bin).await;
    let mut p = browser.page().await;

    // Not signed in: the sign-in page.
    p.goto(&format!("{}/ui/", s.url)).await;
    p.wait_for("location.pathname === '/ui/login'").await;
    p.viewport(390, 700, true).await;
    p.screenshot(&shots().join("login-390.png")).await;
    p.viewport(1280, 900, false).await;
    sign_in(&mut p, &s, &s.admin).await;

    // A task submitted through the API appears on the overview without a reload.
    mark(&mut p).await;
    let a = s
        .submit(json!({"agent": "claude", "prompt": XSS_PROMPT, "conversation": XSS_CONV}))
        .await;
    let a = id(&a);
    p.wait_for("document.getElementById('waiting').textContent.trim() === '1'")
        .await;
    p.wait_for("document.getElementById('queues').textContent.includes('claude')")
        .await;
    still_same_page(&mut p).await;

    // … and on the tasks page.
    p.goto(&format!("{}/ui/tasks", s.url)).await;
    mark(&mut p).await;
    let b = id(&s
        .submit(json!({"agent": "claude", "prompt": "second task"}))
        .await);
    p.wait_for(&format!("document.querySelector('[data-task=\"{b}\"]')"))
        .await;
    still_same_page(&mut p).await;
    let row = p
        .eval(&format!(
            "document.querySelector('[data-task=\"{a}\"]').textContent"
        ))
        .await;
    assert!(
        row.as_str().unwrap().contains(XSS_CONV),
        "shown as text: {row}"
    );
    no_script_ran(&mut p).await;

    // Its output streams on the task page.
    let offer = s.claim("home", &["claude"], 0).await.expect("an offer");
    assert_eq!(offer["task"]["id"], a);
    let (st, _) = s.attempt_call(&offer, "ack", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    p.goto(&format!("{}/ui/tasks/{a}", s.url)).await;
    mark(&mut p).await;
    let prompt = p
        .eval("document.getElementById('prompt').textContent")
        .await;
    assert_eq!(prompt, XSS_PROMPT);
    let events = json!({"events": [
        {"n": 1, "kind": "text", "data": {"text": XSS_OUTPUT}},
        {"n": 2, "kind": "tool_use", "data": {"name": "Bash", "input": {"command": "cargo build"}}},
    ]});
    let (st, body) = s.attempt_call(&offer, "events", events).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    p.wait_for("document.getElementById('output').textContent.includes('Done: <img src=x')")
        .await;
    p.wait_for("document.getElementById('output').textContent.includes('cargo build')")
        .await;
    let out = p
        .eval("document.getElementById('output').textContent")
        .await;
    assert!(
        out.as_str().unwrap().contains("greenBash"),
        "escapes dropped: {out}"
    );
    still_same_page(&mut p).await;
    no_script_ran(&mut p).await;
    p.screenshot(&shots().join("task-1280.png")).await;

    // A POST without the CSRF token is refused, even from the page itself.
    let status = p
        .eval(&format!(
            "fetch('/ui/tasks/{b}/cancel', {{method: 'POST', body: new URLSearchParams({{}})}}).then(r => r.status)"
        ))
        .await;
    assert_eq!(status, 403);
    assert_eq!(s.task(&b).await["state"], "queued");

    // Cancel from the page: the runner is told on its next heartbeat, and the page follows.
    p.eval("document.getElementById('cancel').click()").await;
    p.wait_for("document.querySelector('.badge').textContent === 'cancelling'")
        .await;
    let (st, lease) = s.attempt_call(&offer, "heartbeat", json!({})).await;
    assert_eq!(st, StatusCode::OK, "{lease}");
    assert_eq!(lease["cancel"], true, "the runner learns it must stop");
    mark(&mut p).await;
    let (st, _) = s
        .attempt_call(&offer, "finish", json!({"outcome": "cancelled"}))
        .await;
    assert_eq!(st, StatusCode::OK);
    p.wait_for("document.querySelector('.badge').textContent === 'cancelled'")
        .await;
    still_same_page(&mut p).await;
    assert_eq!(s.task(&a).await["state"], "cancelled");

    // Live updates pause while the tab is hidden and catch up when it shows again.
    p.goto(&format!("{}/ui/", s.url)).await;
    mark(&mut p).await;
    let hide = |hidden: bool| {
        format!(
            "Object.defineProperty(document, 'hidden', {{value: {hidden}, configurable: true}});\
             document.dispatchEvent(new Event('visibilitychange'))"
        )
    };
    p.eval(&hide(true)).await;
    p.wait_for("document.getElementById('live').dataset.stream === 'paused'")
        .await;
    let before = p
        .eval("document.getElementById('waiting').textContent.trim()")
        .await;
    s.submit(json!({"agent": "codex", "prompt": "while hidden"}))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let hidden = p
        .eval("document.getElementById('waiting').textContent.trim()")
        .await;
    assert_eq!(hidden, before, "no update while hidden");
    p.eval(&hide(false)).await;
    p.wait_for("document.getElementById('waiting').textContent.trim() === '2'")
        .await;
    still_same_page(&mut p).await;
    p.screenshot(&shots().join("overview-1280.png")).await;

    // A phone: 390 px wide, nothing wider than the screen, text at least 16 px.
    p.viewport(390, 844, true).await;
    for path in [
        "/ui/".to_owned(),
        "/ui/tasks".to_owned(),
        format!("/ui/tasks/{a}"),
    ] {
        p.goto(&format!("{}{path}", s.url)).await;
        let width = p.eval("document.documentElement.scrollWidth").await;
        assert!(width.as_u64().unwrap() <= 390, "{path} is {width} px wide");
        let font = p
            .eval("parseFloat(getComputedStyle(document.body).fontSize)")
            .await;
        assert!(font.as_f64().unwrap() >= 16.0, "{path}: {font}");
    }
    p.goto(&format!("{}/ui/", s.url)).await;
    p.screenshot(&shots().join("overview-390.png")).await;
    p.goto(&format!("{}/ui/tasks/{a}", s.url)).await;
    p.screenshot(&shots().join("task-390.png")).await;
    p.viewport(1280, 900, false).await;
    sign_out(&mut p).await;

    // Another client's token sees none of these tasks; the submitting client sees them.
    let other = s.create_token("client").await;
    sign_in(&mut p, &s, &other).await;
    p.goto(&format!("{}/ui/tasks", s.url)).await;
    let listed: Value = p
        .eval("Array.from(document.querySelectorAll('[data-task]')).map(r => r.dataset.task)")
        .await;
    assert_eq!(listed, json!([]));
    p.goto(&format!("{}/ui/tasks/{a}", s.url)).await;
    let text = p.eval("document.body.innerText").await;
    assert!(text.as_str().unwrap().contains("not found"), "{text}");
    assert!(!text.as_str().unwrap().contains("fix the build"));
    p.goto(&format!("{}/ui/", s.url)).await;
    sign_out(&mut p).await;
    sign_in(&mut p, &s, &s.client).await;
    p.goto(&format!("{}/ui/tasks", s.url)).await;
    let listed = p
        .eval("document.querySelectorAll('[data-task]').length")
        .await;
    assert_eq!(listed, 3);
    no_script_ran(&mut p).await;

    browser.close().await;
    s.stop().await;
}
