//! The web dashboard over plain HTTP: sign-in, its refusals, CSRF, headers, escaping, scope.
//! (The real-browser checks are in `browser.rs`.)

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::json;

use crate::common::{TestServer, id};

/// A cookie-less client that never follows redirects, so each answer can be checked.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `application/x-www-form-urlencoded`, as a browser sends a form.
trait FormBody {
    fn form_body(self, pairs: &[(&str, &str)]) -> Self;
}

impl FormBody for reqwest::RequestBuilder {
    fn form_body(self, pairs: &[(&str, &str)]) -> Self {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            ser.append_pair(k, v);
        }
        self.header("content-type", "application/x-www-form-urlencoded")
            .body(ser.finish())
    }
}

fn host(s: &TestServer) -> String {
    s.url.trim_start_matches("http://").to_owned()
}

/// Posts a form as a page of this server would (same Origin), with the session cookie.
pub async fn post_form(
    s: &TestServer,
    path: &str,
    cookie: Option<&str>,
    origin: Option<&str>,
    form: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = http().post(format!("{}{path}", s.url)).form_body(form);
    if let Some(c) = cookie {
        r = r.header("cookie", c);
    }
    if let Some(o) = origin {
        r = r.header("origin", o);
    }
    r.send().await.unwrap()
}

/// Signs in with a token; returns the `tunnel_session=…` cookie pair.
pub async fn sign_in(s: &TestServer, token: &str) -> String {
    let resp = post_form(s, "/ui/login", None, Some(&s.url), &[("token", token)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age="] {
        assert!(set.contains(attr), "{attr} missing in {set}");
    }
    assert!(!set.contains("Secure"), "plain http: no Secure flag");
    set.split(';').next().unwrap().to_owned()
}

async fn get_page(
    s: &TestServer,
    path: &str,
    cookie: Option<&str>,
) -> (StatusCode, HeaderMap, String) {
    let mut r = http().get(format!("{}{path}", s.url));
    if let Some(c) = cookie {
        r = r.header("cookie", c);
    }
    let resp = r.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.text().await.unwrap())
}

/// The CSRF token in a page's forms.
fn csrf(page: &str) -> String {
    let at = page
        .find("name=\"_csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 20;
    page[at..at + 64].to_owned()
}

#[tokio::test]
async fn sign_in_refusals_and_security_headers() {
    let s = TestServer::start().await;
    // Not signed in: pages send to the sign-in page, the live stream refuses.
    let (status, headers, _) = get_page(&s, "/ui/", None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers["location"], "/ui/login");
    let (status, _, _) = get_page(&s, "/ui/live", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, headers, _) = get_page(&s, "/", None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers["location"], "/ui/");

    // A forged or unknown cookie is no session.
    let forged = format!("tunnel_session={}", "a".repeat(64));
    let (status, _, _) = get_page(&s, "/ui/tasks", Some(&forged)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);

    // Sign-in refusals: a runner token, a wrong token, a cross-origin or origin-less form.
    for (token, origin) in [
        (s.runner.as_str(), Some(s.url.as_str())),
        ("tnl_nope_nope", Some(s.url.as_str())),
        (s.client.as_str(), Some("http://evil.example")),
        (s.client.as_str(), None),
    ] {
        let resp = post_form(&s, "/ui/login", None, origin, &[("token", token)]).await;
        assert!(resp.headers().get("set-cookie").is_none());
        assert!(
            matches!(
                resp.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ),
            "{token} from {origin:?}: {}",
            resp.status()
        );
    }

    let cookie = sign_in(&s, &s.admin).await;
    let (status, headers, page) = get_page(&s, "/ui/", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    // No inline script anywhere: only the one file of our own.
    assert_eq!(page.matches("<script").count(), 1);
    assert!(page.contains("<script src=\"/ui/app.js\" defer></script>"));

    // Behind a TLS proxy the cookie is Secure.
    let resp = http()
        .post(format!("{}/ui/login", s.url))
        .header("origin", format!("https://{}", host(&s)))
        .header("x-forwarded-proto", "https")
        .form_body(&[("token", s.client.as_str())])
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("; Secure")
    );

    // Signing out ends the session in the store, not just in the browser.
    let page = get_page(&s, "/ui/", Some(&cookie)).await.2;
    let resp = post_form(
        &s,
        "/ui/logout",
        Some(&cookie),
        Some(&s.url),
        &[("_csrf", &csrf(&page))],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (status, _, _) = get_page(&s, "/ui/", Some(&cookie)).await;
    assert_eq!(
        status,
        StatusCode::SEE_OTHER,
        "the old cookie no longer works"
    );
    s.stop().await;
}

#[tokio::test]
async fn posts_need_the_csrf_token_and_the_same_origin() {
    let s = TestServer::start().await;
    let task = s
        .submit(json!({"agent": "claude", "prompt": "keep me"}))
        .await;
    let tid = id(&task);
    let cookie = sign_in(&s, &s.client).await;
    let page = get_page(&s, &format!("/ui/tasks/{tid}"), Some(&cookie))
        .await
        .2;
    let token = csrf(&page);
    let path = format!("/ui/tasks/{tid}/cancel");
    let other = sign_in(&s, &s.client).await;
    let other_token = csrf(&get_page(&s, "/ui/", Some(&other)).await.2);
    for (origin, form, why) in [
        (Some(s.url.as_str()), vec![], "no CSRF token"),
        (
            Some(s.url.as_str()),
            vec![("_csrf", "0".repeat(64))],
            "a wrong token",
        ),
        (
            Some(s.url.as_str()),
            vec![("_csrf", other_token.clone())],
            "another session's token",
        ),
        (
            Some("http://evil.example"),
            vec![("_csrf", token.clone())],
            "another origin",
        ),
        (None, vec![("_csrf", token.clone())], "no Origin"),
    ] {
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let resp = post_form(&s, &path, Some(&cookie), origin, &form).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{why}");
        assert_eq!(
            s.task(&tid).await["state"],
            "queued",
            "{why}: nothing changed"
        );
    }
    // A Referer of this server stands in for a missing Origin.
    let resp = http()
        .post(format!("{}{path}", s.url))
        .header("cookie", &cookie)
        .header(
            "referer",
            HeaderValue::from_str(&format!("{}/ui/tasks/{tid}", s.url)).unwrap(),
        )
        .form_body(&[("_csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(s.task(&tid).await["state"], "cancelled");

    // Run again: a new task with the same prompt, owned by the signed-in token.
    let resp = post_form(
        &s,
        &format!("/ui/tasks/{tid}/retry"),
        Some(&cookie),
        Some(&s.url),
        &[("_csrf", &token)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let again = resp.headers()["location"]
        .to_str()
        .unwrap()
        .trim_start_matches("/ui/tasks/")
        .to_owned();
    assert_ne!(again, tid);
    assert_eq!(s.task(&again).await["prompt"], "keep me");
    s.stop().await;
}

#[tokio::test]
async fn text_is_escaped_and_clients_see_only_their_tasks() {
    let s = TestServer::start().await;
    let xss = "<img src=x onerror=alert(1)></script><script>alert(2)</script>\u{1b}[31m";
    let task = s
        .submit(json!({"agent": "claude", "prompt": xss, "conversation": "<b>conv</b>\"'"}))
        .await;
    let tid = id(&task);
    let mine = sign_in(&s, &s.client).await;
    for path in [
        "/ui/",
        "/ui/tasks",
        &format!("/ui/tasks/{tid}"),
        "/ui/tasks?q=%3Cimg",
    ] {
        let (status, _, page) = get_page(&s, path, Some(&mine)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(!page.contains("<img"), "{path}");
        assert!(!page.contains("<b>conv"), "{path}");
        assert!(!page.contains("\u{1b}"), "{path}");
        assert_eq!(page.matches("<script").count(), 1, "{path}");
    }
    let page = get_page(&s, &format!("/ui/tasks/{tid}"), Some(&mine))
        .await
        .2;
    assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;&lt;/script&gt;&lt;script&gt;"));
    let page = get_page(&s, "/ui/tasks?q=%3Cimg", Some(&mine)).await.2;
    assert!(page.contains(&tid), "the search finds it");
    // A search says how far back it looked (it is bounded); the plain list does not.
    assert!(
        page.contains("Only the 20000 newest tasks were searched."),
        "{page}"
    );
    let page = get_page(&s, "/ui/tasks", Some(&mine)).await.2;
    assert!(!page.contains("search-depth"));

    // Another client token: not in its list, its search, nor by id; cannot cancel it.
    let other_token = s.create_token("client").await;
    let other = sign_in(&s, &other_token).await;
    let (_, _, list) = get_page(&s, "/ui/tasks", Some(&other)).await;
    assert!(!list.contains(&tid));
    let (_, _, list) = get_page(&s, "/ui/tasks?q=img", Some(&other)).await;
    assert!(!list.contains(&tid));
    let (status, _, page) = get_page(&s, &format!("/ui/tasks/{tid}"), Some(&other)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!page.contains("onerror"));
    let token = csrf(&get_page(&s, "/ui/", Some(&other)).await.2);
    let resp = post_form(
        &s,
        &format!("/ui/tasks/{tid}/cancel"),
        Some(&other),
        Some(&s.url),
        &[("_csrf", &token)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(s.task(&tid).await["state"], "queued");
    // Clients have no tokens page.
    let (status, _, _) = get_page(&s, "/ui/tokens", Some(&other)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Bad filters are a clear 400, not an empty list.
    for q in [
        "state=nope",
        "before=xyz",
        &format!("q={}", "a".repeat(300)),
    ] {
        let (status, _, _) = get_page(&s, &format!("/ui/tasks?{q}"), Some(&mine)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}");
    }
    // Revoking the token ends its dashboard sessions.
    let path = format!("/v1/tokens/{}", other_token.split('_').nth(1).unwrap());
    let (st, _) = s
        .request(reqwest::Method::DELETE, &path, Some(&s.admin), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let (status, _, _) = get_page(&s, "/ui/", Some(&other)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    s.stop().await;
}

#[tokio::test]
async fn tokens_page_creates_once_shown_secrets_and_revokes() {
    let s = TestServer::start().await;
    let cookie = sign_in(&s, &s.admin).await;
    let token = csrf(&get_page(&s, "/ui/tokens", Some(&cookie)).await.2);
    let resp = post_form(
        &s,
        "/ui/tokens",
        Some(&cookie),
        Some(&s.url),
        &[("_csrf", &token), ("name", "<phone>"), ("role", "client")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let page = resp.text().await.unwrap();
    assert!(page.contains("&lt;phone&gt;"));
    let at = page.find("class=\"secret\">").unwrap() + 15;
    let secret = &page[at..at + page[at..].find('<').unwrap()];
    assert!(secret.starts_with("tnl_"));
    // The new token works, and the list never shows it again.
    let (st, _) = s.get("/v1/tasks", secret).await;
    assert_eq!(st, StatusCode::OK);
    let list = get_page(&s, "/ui/tokens", Some(&cookie)).await.2;
    assert!(!list.contains(secret));
    let tid = secret.split('_').nth(1).unwrap();
    let resp = post_form(
        &s,
        &format!("/ui/tokens/{tid}/revoke"),
        Some(&cookie),
        Some(&s.url),
        &[("_csrf", &token)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (st, _) = s.get("/v1/tasks", secret).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Bad input: a clear 400, nothing created.
    let resp = post_form(
        &s,
        "/ui/tokens",
        Some(&cookie),
        Some(&s.url),
        &[("_csrf", &token), ("name", "x"), ("role", "root")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    s.stop().await;
}

#[tokio::test]
async fn one_time_codes_and_the_login_rate_limit() {
    let s = TestServer::start().await;
    // Only a bearer token gets a code.
    let resp = http()
        .post(format!("{}/ui/code", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = http()
        .post(format!("{}/ui/code", s.url))
        .bearer_auth(&s.client)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: serde_json::Value = resp.json().await.unwrap();
    let code = body["code"].as_str().unwrap().to_owned();
    assert_eq!(body["path"], format!("/ui/login?code={code}"));
    let (status, _, page) = get_page(&s, &format!("/ui/login?code={code}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&code));
    let resp = post_form(&s, "/ui/login", None, Some(&s.url), &[("code", &code)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie = resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let (status, _, page) = get_page(&s, "/ui/tasks", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("client"));
    let resp = post_form(&s, "/ui/login", None, Some(&s.url), &[("code", &code)]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "a code works once");
    // An expired code.
    let resp = http()
        .post(format!("{}/ui/code", s.url))
        .bearer_auth(&s.client)
        .send()
        .await
        .unwrap();
    let late: serde_json::Value = resp.json().await.unwrap();
    s.clock.advance(121_000);
    let resp = post_form(
        &s,
        "/ui/login",
        None,
        Some(&s.url),
        &[("code", late["code"].as_str().unwrap())],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Guessing is cut off: after 20 failures even a good token must wait.
    for _ in 0..20 {
        post_form(
            &s,
            "/ui/login",
            None,
            Some(&s.url),
            &[("token", "tnl_x_guess")],
        )
        .await;
    }
    let resp = post_form(&s, "/ui/login", None, Some(&s.url), &[("token", &s.client)]).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    s.stop().await;
}

/// Server time per dashboard page with 100,000 tasks in the store (goal: p50 ≤ 20 ms). Prints
/// figures for docs/BENCHMARKS.md; not a pass/fail timing. Run optimized:
/// `cargo test --release -p tunnel-server --test it dashboard_page_timing -- --ignored --nocapture`
/// (`TUNNEL_DASHBOARD_TASKS` changes the count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints timing figures; run optimized"]
async fn dashboard_page_timing() {
    use std::sync::Arc;
    use std::time::Instant;

    use tunnel_protocol::SubmitTask;
    use tunnel_store::{Database, Durability, QueueSettings, ReadyHint, Scope, Signals, Store};

    struct Quiet;
    impl Signals for Quiet {
        fn task_ready(&self, _: &ReadyHint) {}
        fn task_changed(&self, _: &str) {}
        fn deadline(&self, _: i64) {}
    }

    let n: usize = std::env::var("TUNNEL_DASHBOARD_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let s = TestServer::start().await;
    let client_id = s.client.split('_').nth(1).unwrap().to_owned();
    // A second store on the same file seeds it, on the server's (manual) clock.
    let db = Database::Sqlite {
        path: s.db_path.clone(),
        durability: Durability::Normal,
    };
    let store = Store::open(
        &db,
        QueueSettings::default(),
        s.clock.clone(),
        Arc::new(Quiet),
    )
    .await
    .unwrap();
    let seeding = Instant::now();
    let agents = ["claude", "codex", "gemini"];
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(256) {
        let submits = chunk.iter().map(|&i| {
            let mut req = SubmitTask::new(
                agents[i % 3],
                format!(
                    "task {i}: fix the flaky test in module m{} and explain why",
                    i % 97
                ),
            );
            req.conversation = Some(format!("conv-{}", i % 500));
            let owner = if i % 2 == 0 {
                client_id.clone()
            } else {
                "other".into()
            };
            let store = store.clone();
            async move { store.submit(&owner, None, req).await.unwrap().0.id }
        });
        ids.extend(futures_util::future::join_all(submits).await);
        // Spread over the last hour or so: 36 ms per task at 100,000.
        s.clock
            .advance(36 * chunk.len() as i64 * 100_000 / n.max(1) as i64);
    }
    // Nine in ten end (cancelled, which finishes them); one in ten stays queued.
    let ends = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 0)
        .map(|(_, id)| id.clone())
        .collect::<Vec<_>>();
    for chunk in ends.chunks(256) {
        let cancels = chunk.iter().map(|id| {
            let store = store.clone();
            async move { store.cancel(id, &Scope::All).await.unwrap() }
        });
        futures_util::future::join_all(cancels).await;
    }
    println!(
        "seeded {n} tasks in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let sample = ids[n / 2].clone();
    let older = ids[n / 3].clone();
    let admin = sign_in(&s, &s.admin).await;
    let client = sign_in(&s, &s.client).await;
    let pages = [
        ("overview (admin)", "/ui/".to_owned(), &admin),
        ("overview (client)", "/ui/".to_owned(), &client),
        ("tasks, newest 50", "/ui/tasks".to_owned(), &admin),
        (
            "tasks, page deep in the list",
            format!("/ui/tasks?before={older}"),
            &admin,
        ),
        (
            "tasks, state=queued",
            "/ui/tasks?state=queued".to_owned(),
            &admin,
        ),
        (
            "tasks, agent=codex (client)",
            "/ui/tasks?agent=codex".to_owned(),
            &client,
        ),
        (
            "tasks, conversation",
            "/ui/tasks?conversation=conv-42".to_owned(),
            &admin,
        ),
        (
            "tasks, search prompt (common)",
            "/ui/tasks?q=module+m42".to_owned(),
            &admin,
        ),
        (
            "tasks, search prompt (no match)",
            "/ui/tasks?q=zzz-nothing".to_owned(),
            &admin,
        ),
        ("task", format!("/ui/tasks/{sample}"), &admin),
        ("sessions", "/ui/sessions".to_owned(), &admin),
        ("approvals", "/ui/approvals".to_owned(), &admin),
        ("tokens", "/ui/tokens".to_owned(), &admin),
    ];
    println!("| page | p50 | p90 | max | bytes |\n| --- | --- | --- | --- | --- |");
    for (name, path, cookie) in pages {
        let mut times = Vec::new();
        let mut bytes = 0;
        for round in 0..60 {
            let started = Instant::now();
            let (status, _, body) = get_page(&s, &path, Some(cookie)).await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(status, StatusCode::OK, "{path}");
            bytes = body.len();
            if round >= 10 {
                times.push(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {bytes} |",
            at(0.5),
            at(0.9),
            times[times.len() - 1]
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn approvals_are_listed_escaped_and_answered_from_the_page() {
    let s = TestServer::start().await;
    s.submit(json!({"agent": "claude", "prompt": "clean up"}))
        .await;
    let offer = s.claim("r1", &["claude"], 0).await.expect("an offer");
    let (st, _) = s.attempt_call(&offer, "ack", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let ask = json!({
        "key": "call_1",
        "tool": {"kind": "execute", "title": "Run <img src=x onerror=alert(1)>", "command": "rm -rf build </script>"},
        "options": [
            {"id": "allow", "name": "Allow", "kind": "allow_once"},
            {"id": "reject", "name": "Reject", "kind": "reject_once"}
        ]
    });
    let (st, a) = s.attempt_call(&offer, "approvals", ask).await;
    assert_eq!(st, StatusCode::CREATED, "{a}");
    let aid = id(&a);

    // The submitting client sees it, escaped; another client does not.
    let mine = sign_in(&s, &s.client).await;
    let page = get_page(&s, "/ui/approvals", Some(&mine)).await.2;
    assert!(page.contains(&aid), "{page}");
    assert!(page.contains("Run &lt;img src=x onerror=alert(1)&gt;"));
    assert!(page.contains("rm -rf build &lt;/script&gt;"));
    assert!(!page.contains("<img"));
    let other = sign_in(&s, &s.create_token("client").await).await;
    let theirs = get_page(&s, "/ui/approvals", Some(&other)).await.2;
    assert!(!theirs.contains(&aid));
    assert!(theirs.contains("No approval is waiting"));
    let their_csrf = csrf(&theirs);
    let path = format!("/ui/approvals/{aid}");
    let resp = post_form(
        &s,
        &path,
        Some(&other),
        Some(&s.url),
        &[("_csrf", &their_csrf), ("decision", "allow_once")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // Without the CSRF token: refused, still pending. A bad decision: 400.
    let resp = post_form(
        &s,
        &path,
        Some(&mine),
        Some(&s.url),
        &[("decision", "allow_once")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let token = csrf(&page);
    let resp = post_form(
        &s,
        &path,
        Some(&mine),
        Some(&s.url),
        &[("_csrf", &token), ("decision", "yes")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (_, now) = s.get(&format!("/v1/approvals/{aid}"), &s.client).await;
    assert_eq!(now["state"], "pending");

    let resp = post_form(
        &s,
        &path,
        Some(&mine),
        Some(&s.url),
        &[("_csrf", &token), ("decision", "deny")],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, now) = s.get(&format!("/v1/approvals/{aid}"), &s.client).await;
    assert_eq!(now["state"], "denied", "{now}");
    let page = get_page(&s, "/ui/approvals", Some(&mine)).await.2;
    assert!(!page.contains(&aid), "answered: no longer pending");
    s.stop().await;
}

/// Conversations are scoped by owner: two clients' `discord:123` show on each one's sessions
/// page as its own only; an admin's page lists both, each with its owner.
#[tokio::test]
async fn the_sessions_page_shows_each_token_its_own_and_an_admin_every_owner() {
    let s = TestServer::start().await;
    let other = s.create_token("client").await;
    for (token, sid) in [(&s.client, "sess-mine-1"), (&other, "sess-theirs-2")] {
        let (st, b) = s
            .post(
                "/v1/tasks",
                token,
                json!({"agent": "claude", "prompt": "p", "conversation": "discord:123"}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{b}");
        let o = s.claim("r1", &["claude"], 0).await.expect("an offer");
        s.attempt_call(&o, "ack", json!({})).await;
        let (st, _) = s
            .attempt_call(
                &o,
                "finish",
                json!({"outcome": "succeeded", "result": {"text": "ok", "session_id": sid}}),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
    }
    let mine = sign_in(&s, &s.client).await;
    let page = get_page(&s, "/ui/sessions", Some(&mine)).await.2;
    assert!(page.contains("sess-mine-1"), "{page}");
    assert!(!page.contains("sess-theirs-2"), "{page}");
    assert!(!page.contains("<th>Owner</th>"), "{page}");
    let admin = sign_in(&s, &s.admin).await;
    let page = get_page(&s, "/ui/sessions", Some(&admin)).await.2;
    assert!(page.contains("<th>Owner</th>"), "{page}");
    for (token, sid) in [(&s.client, "sess-mine-1"), (&other, "sess-theirs-2")] {
        let token_id = token.split('_').nth(1).unwrap();
        assert!(page.contains(sid), "{page}");
        assert!(page.contains(&format!("token {token_id}")), "{page}");
    }
}
