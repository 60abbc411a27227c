//! The dashboard's pages. Each reads through the store with the signed-in token's scope, so a
//! client token sees exactly what the API shows it.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use futures_util::stream::{self, Stream};
use tunnel_protocol::{Approval, Role, SubmitTask, Task, TaskEvent, TaskState};
use tunnel_store::{Scope, TaskFilter};

use super::html::{Html, duration, utc};
use super::{Form, Signed, WebError, check_post, html_response, require};
use crate::AppState;
use crate::error::ApiError;

/// Tasks per page of the task list.
const PAGE: u32 = 50;
/// Output events shown on a task page (the newest).
const EVENTS_SHOWN: u32 = 500;
/// Longest filter value accepted.
const FILTER_MAX: usize = 200;
/// A prompt search looks at this many tasks before the page's cursor at most: a search that
/// matches nothing reads every prompt it looks at (54 ms p50 for 100,000), so it is bounded.
const SEARCH_DEPTH: u32 = 20_000;

macro_rules! signed {
    ($s:expr, $headers:expr) => {
        match require(&$s, &$headers).await {
            Ok(signed) => signed,
            Err(resp) => return resp,
        }
    };
}

fn respond(r: Result<Html, WebError>) -> Response {
    match r {
        Ok(h) => html_response(h),
        Err(e) => e.into_response(),
    }
}

fn is_task_id(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

fn scope(signed: &Signed) -> Scope {
    signed.caller.scope()
}

// ---------------------------------------------------------------------------------------------
// Layout

/// The top of every signed-in page, up to the live region's opening tag.
fn start(h: &mut Html, title: &str, active: &str, signed: &Signed) {
    h.raw("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
        .raw("<link rel=\"stylesheet\" href=\"/ui/app.css\">")
        .raw("<script src=\"/ui/app.js\" defer></script><title>")
        .text(title)
        .raw(" · tunnel</title></head><body><header class=\"top\">")
        .raw("<a class=\"brand\" href=\"/ui/\">tunnel</a><nav>");
    let mut items = vec![
        ("overview", "/ui/", "Overview"),
        ("tasks", "/ui/tasks", "Tasks"),
        ("approvals", "/ui/approvals", "Approvals"),
        ("sessions", "/ui/sessions", "Sessions"),
    ];
    if signed.caller.role == Role::Admin {
        items.push(("tokens", "/ui/tokens", "Tokens"));
    }
    for (key, href, label) in items {
        h.raw("<a href=\"").text(href).raw("\"");
        if key == active {
            h.raw(" class=\"on\" aria-current=\"page\"");
        }
        h.raw(">").text(label).raw("</a>");
    }
    h.raw("</nav><span class=\"who\">")
        .text(signed.caller.role.as_str())
        .raw(" · ")
        .text(&signed.caller.token_id)
        .raw("</span>");
    post_button(h, signed, "/ui/logout", "", "Sign out");
    h.raw("</header><main><h1>").text(title).raw("</h1>");
}

/// Opens the region the script refreshes when tasks change (`/ui/live` says when).
fn live_start(h: &mut Html, s: &AppState) {
    let version = *s.hub.changes().borrow();
    h.raw("<div id=\"live\" data-live=\"/ui/live?since=")
        .num(version)
        .raw("\">");
}

fn end(h: &mut Html, live: bool) {
    if live {
        h.raw("</div>");
    }
    h.raw("</main></body></html>");
}

fn csrf(h: &mut Html, signed: &Signed) {
    h.raw("<input type=\"hidden\" name=\"_csrf\" value=\"")
        .text(&signed.csrf)
        .raw("\">");
}

/// A one-button form that posts (with the CSRF field) to `action`; `button_attrs` are the
/// button's attributes after `<button`, e.g. ` class="danger" id="cancel"`.
fn post_button(
    h: &mut Html,
    signed: &Signed,
    action: &str,
    button_attrs: &'static str,
    label: &'static str,
) {
    h.raw("<form method=\"post\" action=\"")
        .text(action)
        .raw("\">");
    csrf(h, signed);
    h.raw("<button")
        .raw(button_attrs)
        .raw(" type=\"submit\">")
        .text(label)
        .raw("</button></form>");
}

fn badge(h: &mut Html, state: TaskState) {
    h.raw("<span class=\"badge s-")
        .text(state.as_str())
        .raw("\">")
        .text(state.as_str())
        .raw("</span>");
}

fn task_link(h: &mut Html, t: &Task) {
    h.raw("<a href=\"")
        .text(&format!("/ui/tasks/{}", t.id))
        .raw("\">")
        .text(&t.id[..8])
        .raw("</a>");
}

/// The first line of a prompt, cut to `max` characters.
fn summary(text: &str, max: usize) -> String {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut out: String = line.chars().take(max).collect();
    if line.chars().count() > max || text.trim().lines().nth(1).is_some() {
        out.push('…');
    }
    out
}

/// A table of tasks (the task list, running and failed tasks on the overview).
fn task_table(h: &mut Html, tasks: &[Task], now: i64) {
    h.raw("<div class=\"table-wrap\"><table><thead><tr><th>Task</th><th>State</th><th>Agent</th>")
        .raw("<th class=\"wide\">Conversation</th><th class=\"wide\">Runner</th><th>Prompt</th>")
        .raw("<th>Submitted</th></tr></thead><tbody>");
    for t in tasks {
        h.raw("<tr data-task=\"").text(&t.id).raw("\"><td>");
        task_link(h, t);
        h.raw("</td><td>");
        badge(h, t.state);
        h.raw("</td><td>")
            .text(&t.agent)
            .raw("</td><td class=\"wide\">")
            .text(t.conversation.as_deref().unwrap_or("—"))
            .raw("</td><td class=\"wide\">")
            .text(t.runner.as_deref().unwrap_or("—"))
            .raw("</td><td class=\"clip\">")
            .text(&summary(&t.prompt, 120))
            .raw("</td><td class=\"small\">")
            .ago(t.created_at, now)
            .raw("</td></tr>");
    }
    if tasks.is_empty() {
        h.raw("<tr><td colspan=\"7\" class=\"muted\">No tasks.</td></tr>");
    }
    h.raw("</tbody></table></div>");
}

// ---------------------------------------------------------------------------------------------
// Sign-in

pub(crate) async fn login_page(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let q = Form::parse(q.unwrap_or_default().as_bytes());
    let code = q.get("code").filter(|c| !c.is_empty());
    if code.is_none()
        && let Ok(Some(_)) = super::signed_in(&s, &headers).await
    {
        return Redirect::to("/ui/").into_response();
    }
    let mut h = Html::new();
    h.raw("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
        .raw("<link rel=\"stylesheet\" href=\"/ui/app.css\"><title>Sign in · tunnel</title>")
        .raw("</head><body><main class=\"narrow\"><h1>Sign in to tunnel</h1>")
        .raw("<form class=\"card\" method=\"post\" action=\"/ui/login\">");
    match code {
        Some(code) => {
            h.raw("<p>Sign in with the one-time code from <code>tunnel dashboard</code>.</p>")
                .raw("<input type=\"hidden\" name=\"code\" value=\"")
                .text(code)
                .raw("\"><button type=\"submit\" id=\"sign-in\">Sign in</button>");
        }
        None => {
            h.raw("<label class=\"block\">Token (admin or client)")
                .raw("<input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" required></label>")
                .raw("<button type=\"submit\" id=\"sign-in\">Sign in</button>")
                .raw("<p class=\"muted small\">Or run <code>tunnel dashboard</code> for a one-time sign-in link. ")
                .raw("The token is exchanged for a session cookie; it is not kept in the browser.</p>");
        }
    }
    h.raw("</form></main></body></html>");
    html_response(h)
}

// ---------------------------------------------------------------------------------------------
// Overview

pub(crate) async fn overview(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let signed = signed!(s, headers);
    respond(render_overview(&s, &signed).await)
}

async fn render_overview(s: &AppState, signed: &Signed) -> Result<Html, WebError> {
    let now = s.clock.now_ms();
    let scope = scope(signed);
    let hour_ago = now - 3_600_000;
    let (runners, counts, running, failed) = tokio::try_join!(
        s.store.runners(),
        s.store.overview(hour_ago, &scope),
        s.store.tasks(
            TaskFilter {
                state: Some(TaskState::Running),
                limit: 20,
                ..Default::default()
            },
            &scope,
        ),
        s.store.tasks(
            TaskFilter {
                state: Some(TaskState::Failed),
                limit: 5,
                ..Default::default()
            },
            &scope,
        ),
    )?;
    let mut h = Html::new();
    start(&mut h, "Overview", "overview", signed);
    live_start(&mut h, s);

    // Totals and throughput.
    let waiting: u64 = counts.queues.iter().map(|q| q.waiting).sum();
    let oldest = counts.queues.iter().map(|q| q.oldest_created_at).min();
    let done: u64 = counts.finished_per_minute.iter().map(|m| m.1).sum();
    let not_ok: u64 = counts.finished_per_minute.iter().map(|m| m.2).sum();
    let online = runners.iter().filter(|r| r.online).count();
    h.raw("<div class=\"grid\"><div class=\"card\"><div class=\"muted small\">Runners online</div><div class=\"stat\" id=\"runners-online\">")
        .num(online as i64)
        .raw(" / ")
        .num(runners.len() as i64)
        .raw("</div></div><div class=\"card\"><div class=\"muted small\">Waiting</div><div class=\"stat\" id=\"waiting\">")
        .num(waiting as i64)
        .raw("</div><div class=\"small muted\">");
    match oldest {
        Some(at) => {
            h.raw("oldest waiting ").text(&duration(now - at)).raw("");
        }
        None => {
            h.raw("nothing waiting");
        }
    }
    h.raw("</div></div><div class=\"card\"><div class=\"muted small\">Running</div><div class=\"stat\" id=\"running\">")
        .num(running.len() as i64)
        .raw("</div></div><div class=\"card span2\"><div class=\"muted small\">Finished in the last hour</div><div class=\"stat\">")
        .num((done + not_ok) as i64)
        .raw("</div><div class=\"small muted\">")
        .num(not_ok as i64)
        .raw(" not succeeded</div>");
    // Tasks per minute, one bar per minute of the last hour, scaled to the busiest minute.
    let first = hour_ago / 60_000 * 60_000 + 60_000;
    let max = counts
        .finished_per_minute
        .iter()
        .map(|m| m.1 + m.2)
        .max()
        .unwrap_or(0)
        .max(1);
    h.raw("<div class=\"chart\" role=\"img\" aria-label=\"tasks finished per minute, last hour\">");
    for i in 0..60 {
        let minute = first + i * 60_000;
        let (ok, bad) = counts
            .finished_per_minute
            .iter()
            .find(|m| m.0 == minute)
            .map_or((0, 0), |m| (m.1, m.2));
        let level = ((ok + bad) * 10).div_ceil(max).min(10);
        h.raw("<span class=\"");
        if bad > 0 {
            h.raw("fail ");
        }
        h.raw("h").num(level as i64).raw("\" title=\"");
        h.text(&utc(minute))
            .raw(": ")
            .num(ok as i64)
            .raw(" ok, ")
            .num(bad as i64)
            .raw(" not ok\"></span>");
    }
    h.raw("</div></div></div>");

    // Runners.
    h.raw("<h2>Runners</h2><div class=\"table-wrap\"><table id=\"runners\"><thead><tr><th>Runner</th><th>Status</th>")
        .raw("<th>Agents</th><th class=\"wide\">Projects</th><th>Load</th><th>Last heartbeat</th>")
        .raw("<th class=\"wide\">Version</th></tr></thead><tbody>");
    for r in &runners {
        h.raw("<tr><td><a href=\"")
            .url("/ui/tasks", &[("runner", &r.name)])
            .raw("\">")
            .text(&r.name)
            .raw("</a></td><td>");
        if r.online {
            h.raw("<span class=\"badge online\">online</span>");
        } else {
            h.raw("<span class=\"badge offline\">offline</span>");
        }
        h.raw("</td><td>")
            .text(&r.agents.join(", "))
            .raw("</td><td class=\"wide\">")
            .text(&r.projects.join(", "))
            .raw("</td><td>")
            .num(r.active_tasks)
            .raw(" / ")
            .num(r.capacity)
            .raw("</td><td class=\"small\">")
            .ago(r.last_seen, now)
            .raw("</td><td class=\"wide small\">")
            .text(r.version.as_deref().unwrap_or("—"))
            .raw("</td></tr>");
    }
    if runners.is_empty() {
        h.raw("<tr><td colspan=\"7\" class=\"muted\">No runner has connected yet. Start one with <code>tunnel runner</code> or <code>tunnel up</code>.</td></tr>");
    }
    h.raw("</tbody></table></div>");

    // Queues.
    h.raw("<h2>Queues</h2><div class=\"table-wrap\"><table id=\"queues\"><thead><tr><th>Agent</th><th>Waiting</th>")
        .raw("<th>Oldest waiting</th></tr></thead><tbody>");
    for q in &counts.queues {
        h.raw("<tr><td><a href=\"")
            .url("/ui/tasks", &[("agent", &q.agent), ("state", "queued")])
            .raw("\">")
            .text(&q.agent)
            .raw("</a></td><td>")
            .num(q.waiting as i64)
            .raw("</td><td>")
            .text(&duration(now - q.oldest_created_at))
            .raw("</td></tr>");
    }
    if counts.queues.is_empty() {
        h.raw("<tr><td colspan=\"3\" class=\"muted\">Nothing waiting.</td></tr>");
    }
    h.raw("</tbody></table></div>");

    h.raw("<h2>Running now</h2>");
    task_table(&mut h, &running, now);
    h.raw("<h2>Recent failures</h2>");
    task_table(&mut h, &failed, now);
    end(&mut h, true);
    Ok(h)
}

// ---------------------------------------------------------------------------------------------
// Tasks

pub(crate) async fn tasks(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let signed = signed!(s, headers);
    let q = Form::parse(q.unwrap_or_default().as_bytes());
    respond(render_tasks(&s, &signed, &q).await)
}

async fn render_tasks(s: &AppState, signed: &Signed, q: &Form) -> Result<Html, WebError> {
    let now = s.clock.now_ms();
    let field = |k: &str| -> Result<Option<String>, WebError> {
        match q.get(k).map(str::trim).filter(|v| !v.is_empty()) {
            Some(v) if v.len() > FILTER_MAX => {
                Err(ApiError::bad_request(format!("{k} is longer than {FILTER_MAX} bytes")).into())
            }
            v => Ok(v.map(str::to_owned)),
        }
    };
    let state = match field("state")? {
        None => None,
        Some(st) => Some(
            TaskState::parse(&st)
                .ok_or_else(|| ApiError::bad_request(format!("{st:?} is not a task state")))?,
        ),
    };
    let before = field("before")?;
    if let Some(b) = &before
        && !is_task_id(b)
    {
        return Err(ApiError::bad_request("before must be a task id").into());
    }
    let filter = TaskFilter {
        state,
        agent: field("agent")?,
        conversation: field("conversation")?,
        runner: field("runner")?,
        search: field("q")?,
        search_depth: SEARCH_DEPTH,
        before: before.clone(),
        limit: PAGE + 1,
    };
    let searching = filter.search.is_some();
    let keep = [
        ("state", state.map(|s| s.as_str()).unwrap_or("").to_owned()),
        ("agent", filter.agent.clone().unwrap_or_default()),
        (
            "conversation",
            filter.conversation.clone().unwrap_or_default(),
        ),
        ("runner", filter.runner.clone().unwrap_or_default()),
        ("q", filter.search.clone().unwrap_or_default()),
    ];
    let mut tasks = s.store.tasks(filter, &scope(signed)).await?;
    let more = tasks.len() > PAGE as usize;
    tasks.truncate(PAGE as usize);

    let mut h = Html::new();
    start(&mut h, "Tasks", "tasks", signed);
    h.raw("<form class=\"filters\" method=\"get\" action=\"/ui/tasks\"><label>State<select name=\"state\"><option value=\"\">any</option>");
    for st in TaskState::ALL {
        h.raw("<option");
        if Some(st) == state {
            h.raw(" selected");
        }
        h.raw(">").text(st.as_str()).raw("</option>");
    }
    h.raw("</select></label>");
    for (name, label) in [
        ("agent", "Agent"),
        ("conversation", "Conversation"),
        ("runner", "Runner"),
        ("q", "Prompt contains"),
    ] {
        let value = keep
            .iter()
            .find(|k| k.0 == name)
            .map_or("", |k| k.1.as_str());
        h.raw("<label>")
            .text(label)
            .raw("<input name=\"")
            .text(name)
            .raw("\" value=\"")
            .text(value)
            .raw("\"></label>");
    }
    h.raw("<button type=\"submit\">Filter</button> <a href=\"/ui/tasks\">clear</a></form>");
    live_start(&mut h, s);
    task_table(&mut h, &tasks, now);
    if searching && !more {
        h.raw("<p class=\"muted small\" id=\"search-depth\">")
            .text(&format!(
                "Only the {SEARCH_DEPTH} newest tasks{} were searched.",
                if before.is_some() {
                    " before this page"
                } else {
                    ""
                }
            ))
            .raw("</p>");
    }
    h.raw("<div class=\"pager\">");
    if before.is_some() {
        h.raw("<a href=\"");
        let pairs: Vec<(&str, &str)> = keep.iter().map(|(k, v)| (*k, v.as_str())).collect();
        h.url("/ui/tasks", &pairs).raw("\">Newest</a> ");
    }
    if more && let Some(last) = tasks.last() {
        let mut pairs: Vec<(&str, &str)> = keep.iter().map(|(k, v)| (*k, v.as_str())).collect();
        pairs.push(("before", &last.id));
        h.raw("<a id=\"older\" href=\"")
            .url("/ui/tasks", &pairs)
            .raw("\">Older →</a>");
    }
    h.raw("</div>");
    end(&mut h, true);
    Ok(h)
}

pub(crate) async fn task(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let signed = signed!(s, headers);
    respond(render_task(&s, &signed, &id).await)
}

async fn render_task(s: &AppState, signed: &Signed, id: &str) -> Result<Html, WebError> {
    if !is_task_id(id) {
        return Err(ApiError::not_found("no such task").into());
    }
    let now = s.clock.now_ms();
    // The scoped read first: another client's task is "not found", and its events unread.
    let t = s.store.task(id, &scope(signed)).await?;
    let events = s.store.last_events(id, EVENTS_SHOWN).await?;
    let mut h = Html::new();
    start(&mut h, "Task", "tasks", signed);
    live_start(&mut h, s);
    h.raw("<div class=\"card\"><div class=\"actions\">");
    badge(&mut h, t.state);
    h.raw("<span class=\"mono small\">")
        .text(&t.id)
        .raw("</span></div>");
    h.raw("<div class=\"prompt\" id=\"prompt\">")
        .text(&t.prompt)
        .raw("</div>");
    h.raw("<div class=\"actions\">");
    if !t.state.is_terminal() && t.state != TaskState::Cancelling {
        let action = format!("/ui/tasks/{}/cancel", t.id);
        post_button(
            &mut h,
            signed,
            &action,
            " class=\"danger\" id=\"cancel\"",
            "Cancel",
        );
    }
    if t.state.is_terminal() {
        let action = format!("/ui/tasks/{}/retry", t.id);
        post_button(
            &mut h,
            signed,
            &action,
            " class=\"plain\" id=\"retry\"",
            "Run again",
        );
    }
    h.raw("</div></div>");

    // Facts.
    h.raw("<div class=\"card\"><dl class=\"facts\">");
    let mut fact = |label: &'static str, value: Option<String>| {
        if let Some(v) = value {
            h.raw("<dt>")
                .raw(label)
                .raw("</dt><dd>")
                .text(&v)
                .raw("</dd>");
        }
    };
    fact("Agent", Some(t.agent.clone()));
    fact("Conversation", t.conversation.clone());
    fact("Project", t.project.clone());
    fact("Model", t.model.clone());
    fact(
        "Session",
        Some(match &t.session {
            tunnel_protocol::SessionMode::Continue => "continue".to_owned(),
            tunnel_protocol::SessionMode::New => "new".to_owned(),
            tunnel_protocol::SessionMode::Resume(id) => format!("resume {id}"),
        }),
    );
    fact(
        "Session id",
        t.result.as_ref().and_then(|r| r.session_id.clone()),
    );
    fact("Runner", t.runner.clone());
    fact(
        "Attempt",
        Some(format!("{} of {}", t.attempt, t.max_attempts)),
    );
    fact("Queue position", t.queue_position.map(|p| p.to_string()));
    fact("Submitted", Some(utc(t.created_at)));
    fact("Started", t.started_at.map(utc));
    fact("Finished", t.finished_at.map(utc));
    fact(
        "Took",
        t.started_at
            .zip(t.finished_at)
            .map(|(a, b)| duration(b - a)),
    );
    fact("Reason", t.reason.clone());
    fact(
        "Delivery",
        t.delivery.as_ref().map(|d| {
            let mut s = format!("{} ({} attempts)", d.state, d.attempts);
            if let Some(e) = &d.error {
                s.push_str(": ");
                s.push_str(e);
            }
            s
        }),
    );
    fact(
        "Reply to",
        t.reply_to
            .as_ref()
            .map(|r| format!("{:?} {}", r.platform, r.channel).to_lowercase()),
    );
    h.raw("</dl></div>");

    // Result.
    if let Some(r) = &t.result {
        h.raw("<h2>Result</h2><div class=\"card\" id=\"result\">");
        if let Some(text) = &r.text {
            h.raw("<div class=\"prompt\">").text(text).raw("</div>");
        }
        if let Some(e) = &r.error {
            h.raw("<p class=\"error\">").text(e).raw("</p>");
        }
        if let Some(code) = r.exit_code {
            h.raw("<p class=\"small muted\">exit code ")
                .num(code)
                .raw("</p>");
        }
        if let Some(tail) = &r.stderr_tail {
            h.raw("<pre class=\"small\">").text(tail).raw("</pre>");
        }
        if let Some(u) = &r.usage {
            h.raw("<p class=\"small muted\">usage ")
                .text(&u.to_string())
                .raw("</p>");
        }
        h.raw("</div>");
    }

    // Output and timeline, as in chat: text, tool calls, usage, state changes.
    h.raw("<h2>Output</h2><div class=\"card\" id=\"output\">");
    if events.is_empty() {
        h.raw("<p class=\"muted\">Nothing yet.</p>");
    }
    for e in &events {
        event(&mut h, e, now);
    }
    h.raw("</div>");
    end(&mut h, true);
    Ok(h)
}

fn event(h: &mut Html, e: &TaskEvent, now: i64) {
    let str_of = |k: &str| e.data[k].as_str().unwrap_or_default().to_owned();
    match e.kind.as_str() {
        "text" => {
            h.raw("<div class=\"out text prompt\">")
                .text(&str_of("text"))
                .raw("</div>");
        }
        "tool_use" => {
            let input = match &e.data["input"] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => String::new(),
                other => other.to_string(),
            };
            h.raw("<div class=\"out tool\"><strong>")
                .text(&str_of("name"))
                .raw("</strong> <span class=\"mono small\">")
                .text(&summary(&input, 300))
                .raw("</span></div>");
        }
        "tool_result" => {
            h.raw("<div class=\"out tool\"><pre class=\"small\">")
                .text(&summary(&str_of("output"), 300))
                .raw("</pre></div>");
        }
        "state" => {
            h.raw("<div class=\"out state\">attempt ")
                .num(e.attempt)
                .raw(": <strong>")
                .text(&str_of("state"))
                .raw("</strong>");
            for k in ["runner", "reason"] {
                let v = str_of(k);
                if !v.is_empty() {
                    h.raw(" · ").text(&v);
                }
            }
            h.raw(" <span class=\"muted small\">")
                .ago(e.at, now)
                .raw("</span></div>");
        }
        "usage" => {
            h.raw("<div class=\"out usage\">usage ")
                .text(&e.data.to_string())
                .raw("</div>");
        }
        "session" => {
            h.raw("<div class=\"out log\">session ")
                .text(&str_of("session_id"))
                .raw("</div>");
        }
        other => {
            h.raw("<div class=\"out log\">")
                .text(other)
                .raw(" ")
                .text(&summary(&e.data.to_string(), 300))
                .raw("</div>");
        }
    }
}

pub(crate) async fn cancel(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let r = async {
        let signed = check_post(&s, &headers, &Form::parse(&body)).await?;
        if !is_task_id(&id) {
            return Err(WebError::from(ApiError::not_found("no such task")));
        }
        s.store.cancel(&id, &scope(&signed)).await?;
        tracing::info!(task_id = %id, by = %signed.caller.token_id, "Task cancel asked from the dashboard.");
        Ok(Redirect::to(&format!("/ui/tasks/{id}")).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// Submits the task again, as a new task of the signed-in token (its answer is shown here,
/// not sent to the original chat).
pub(crate) async fn retry(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let r = async {
        let signed = check_post(&s, &headers, &Form::parse(&body)).await?;
        if !is_task_id(&id) {
            return Err(WebError::from(ApiError::not_found("no such task")));
        }
        let t = s.store.task(&id, &scope(&signed)).await?;
        let mut req = SubmitTask::new(t.agent, t.prompt);
        req.conversation = t.conversation;
        req.project = t.project;
        req.model = t.model;
        req.timeout_ms = t.timeout_ms;
        req.max_attempts = Some(t.max_attempts);
        req.validate().map_err(ApiError::from)?;
        let (new, _) = s.store.submit(&signed.caller.token_id, None, req).await?;
        tracing::info!(task_id = %new.id, again = %id, "Task run again from the dashboard.");
        Ok(Redirect::to(&format!("/ui/tasks/{}", new.id)).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

// ---------------------------------------------------------------------------------------------
// Approvals

/// The pending approvals the caller may answer (a client: its own tasks' only).
async fn pending_approvals(s: &AppState, scope: &Scope) -> Result<Vec<Approval>, WebError> {
    let filter = tunnel_store::ApprovalFilter {
        state: Some(tunnel_protocol::ApprovalState::Pending),
        task: None,
        limit: 100,
    };
    Ok(s.store.approvals(filter, scope).await?)
}

pub(crate) async fn approvals(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let signed = signed!(s, headers);
    let r = async {
        let now = s.clock.now_ms();
        let pending = pending_approvals(&s, &scope(&signed)).await?;
        let mut h = Html::new();
        start(&mut h, "Approvals", "approvals", &signed);
        live_start(&mut h, &s);
        if pending.is_empty() {
            h.raw(
                "<p class=\"muted\" id=\"no-approvals\">No approval is waiting for an answer.</p>",
            );
        }
        for a in &pending {
            h.raw("<div class=\"card\"><p><strong>")
                .text(&a.tool.title)
                .raw("</strong> <span class=\"badge\">")
                .text(&a.tool.kind)
                .raw("</span></p><p class=\"small muted\">")
                .text(&a.agent)
                .raw(" on ")
                .text(a.runner.as_deref().unwrap_or("?"))
                .raw(" · asked ")
                .ago(a.asked_at, now)
                .raw(" · <a href=\"")
                .text(&format!("/ui/tasks/{}", a.task_id))
                .raw("\">task</a></p>");
            if let Some(c) = &a.tool.command {
                h.raw("<pre>").text(c).raw("</pre>");
            }
            for p in &a.tool.paths {
                h.raw("<div class=\"mono small\">").text(p).raw("</div>");
            }
            if let Some(d) = &a.tool.diff {
                h.raw("<pre class=\"small\">").text(d).raw("</pre>");
            }
            h.raw("<form class=\"actions\" method=\"post\" action=\"")
                .text(&format!("/ui/approvals/{}", a.id))
                .raw("\">");
            csrf(&mut h, &signed);
            h.raw("<button name=\"decision\" value=\"allow_once\">Allow once</button>")
                .raw("<button class=\"plain\" name=\"decision\" value=\"allow_session\">Allow for the session</button>")
                .raw("<button class=\"danger\" name=\"decision\" value=\"deny\">Deny</button></form></div>");
        }
        end(&mut h, true);
        Ok(h)
    };
    respond(r.await)
}

pub(crate) async fn answer_approval(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(aid): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let r = async {
        let form = Form::parse(&body);
        let signed = check_post(&s, &headers, &form).await?;
        if !tunnel_protocol::is_approval_id(&aid) {
            return Err(WebError::from(ApiError::not_found("no such approval")));
        }
        let decision = serde_json::from_value::<tunnel_protocol::Decision>(serde_json::json!(
            form.get("decision").unwrap_or_default()
        ))
        .map_err(|_| ApiError::bad_request("decision must be allow_once, allow_session or deny"))?;
        let answer = tunnel_protocol::ApprovalAnswer {
            decision,
            message: None,
            by: Some("dashboard".into()),
        };
        answer.validate().map_err(ApiError::from)?;
        let a = s
            .store
            .answer_approval(&aid, &scope(&signed), &signed.caller.token_id, answer)
            .await?;
        tracing::info!(task_id = %a.task_id, approval_id = %a.id, state = %a.state,
            token_id = %signed.caller.token_id, "Approval answered from the dashboard.");
        Ok(Redirect::to("/ui/approvals").into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

// ---------------------------------------------------------------------------------------------
// Sessions

pub(crate) async fn sessions(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let signed = signed!(s, headers);
    let r = async {
        let now = s.clock.now_ms();
        let list = s.store.sessions(None, None, 100, &scope(&signed)).await?;
        let mut h = Html::new();
        start(&mut h, "Sessions", "sessions", &signed);
        live_start(&mut h, &s);
        // Conversation names are scoped by owner: an admin sees every token's, and whose each is.
        let admin = signed.caller.role == Role::Admin;
        h.raw("<h2>Conversations</h2><div class=\"table-wrap\"><table><thead><tr><th>Conversation</th>");
        if admin {
            h.raw("<th>Owner</th>");
        }
        h.raw("<th>Agent</th><th>Session</th><th class=\"wide\">Runner</th><th>Updated</th></tr></thead><tbody>");
        for b in &list.sessions {
            h.raw("<tr><td><a href=\"")
                .url("/ui/tasks", &[("conversation", &b.conversation)])
                .raw("\">")
                .text(&b.conversation)
                .raw("</a></td><td>");
            if admin {
                match &b.owner {
                    Some(o) => h.raw("token ").text(o),
                    None => h.raw("admins"),
                };
                h.raw("</td><td>");
            }
            h.text(&b.agent)
                .raw("</td><td class=\"mono small\">")
                .text(b.session_id.as_deref().unwrap_or("(fresh)"))
                .raw("</td><td class=\"wide\">")
                .text(b.runner.as_deref().unwrap_or("—"))
                .raw("</td><td class=\"small\">")
                .ago(b.updated_at, now)
                .raw("</td></tr>");
        }
        if list.sessions.is_empty() {
            h.raw(if admin {
                "<tr><td colspan=\"6\" class=\"muted\">No conversation has a session yet.</td></tr>"
            } else {
                "<tr><td colspan=\"5\" class=\"muted\">No conversation has a session yet.</td></tr>"
            });
        }
        h.raw("</tbody></table></div><h2>Recent agent sessions</h2><div class=\"table-wrap\"><table><thead><tr>")
            .raw("<th>Agent</th><th>Session</th><th class=\"wide\">Runner</th><th>Conversation</th><th>Last used</th></tr></thead><tbody>");
        for r in &list.recent {
            h.raw("<tr><td>")
                .text(&r.agent)
                .raw("</td><td class=\"mono small\">")
                .text(&r.session_id)
                .raw("</td><td class=\"wide\">")
                .text(r.runner.as_deref().unwrap_or("—"))
                .raw("</td><td>")
                .text(r.conversation.as_deref().unwrap_or("—"))
                .raw("</td><td class=\"small\">")
                .ago(r.last_used, now)
                .raw("</td></tr>");
        }
        if list.recent.is_empty() {
            h.raw("<tr><td colspan=\"5\" class=\"muted\">None.</td></tr>");
        }
        h.raw("</tbody></table></div>");
        end(&mut h, true);
        Ok(h)
    };
    respond(r.await)
}

// ---------------------------------------------------------------------------------------------
// Tokens (admin)

fn admin_only(signed: &Signed) -> Result<(), WebError> {
    if signed.caller.role == Role::Admin {
        Ok(())
    } else {
        Err(ApiError::forbidden("only an admin token can manage tokens").into())
    }
}

pub(crate) async fn tokens(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let signed = signed!(s, headers);
    respond(render_tokens(&s, &signed, None).await)
}

async fn render_tokens(
    s: &AppState,
    signed: &Signed,
    created: Option<tunnel_protocol::CreatedToken>,
) -> Result<Html, WebError> {
    admin_only(signed)?;
    let now = s.clock.now_ms();
    let tokens = s.store.tokens().await?;
    let mut h = Html::new();
    start(&mut h, "Tokens", "tokens", signed);
    if let Some(c) = created {
        h.raw("<div class=\"notice\" id=\"new-token\"><p>Token <strong>")
            .text(&c.info.name)
            .raw("</strong> (")
            .text(c.info.role.as_str())
            .raw(") created. Copy it now: it is not shown again.</p><p class=\"secret\">")
            .text(&c.token)
            .raw("</p></div>");
    }
    h.raw("<form class=\"filters card\" method=\"post\" action=\"/ui/tokens\">");
    csrf(&mut h, signed);
    h.raw("<label>Name<input name=\"name\" required maxlength=\"64\"></label>")
        .raw("<label>Role<select name=\"role\"><option>client</option><option>runner</option><option>admin</option></select></label>")
        .raw("<button type=\"submit\" id=\"create-token\">Create token</button></form>");
    h.raw("<div class=\"table-wrap\"><table id=\"tokens\"><thead><tr><th>Name</th><th>Id</th><th>Role</th>")
        .raw("<th class=\"wide\">Created</th><th>Status</th></tr></thead><tbody>");
    for t in tokens.iter().rev() {
        let t = &t.info;
        h.raw("<tr><td>")
            .text(&t.name)
            .raw("</td><td class=\"mono small\">")
            .text(&t.id)
            .raw("</td><td>")
            .text(t.role.as_str())
            .raw("</td><td class=\"wide small\">")
            .ago(t.created_at, now)
            .raw("</td><td>");
        match t.revoked_at {
            Some(at) => {
                h.raw("<span class=\"muted small\">revoked ")
                    .ago(at, now)
                    .raw("</span>");
            }
            None => {
                let action = format!("/ui/tokens/{}/revoke", t.id);
                post_button(&mut h, signed, &action, " class=\"danger\"", "Revoke");
            }
        }
        h.raw("</td></tr>");
    }
    h.raw("</tbody></table></div>");
    end(&mut h, false);
    Ok(h)
}

pub(crate) async fn create_token(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let r = async {
        let form = Form::parse(&body);
        let signed = check_post(&s, &headers, &form).await?;
        admin_only(&signed)?;
        let role = Role::parse(form.get("role").unwrap_or_default())
            .ok_or_else(|| ApiError::bad_request("role must be client, runner or admin"))?;
        let req = tunnel_protocol::CreateToken {
            name: form.get("name").unwrap_or_default().trim().to_owned(),
            role,
        };
        req.validate().map_err(ApiError::from)?;
        let created = s.auth.create(&s.store, req.name, req.role).await?;
        tracing::info!(token_id = %created.info.id, by = %signed.caller.token_id, "Token created from the dashboard.");
        render_tokens(&s, &signed, Some(created)).await
    };
    respond(r.await)
}

pub(crate) async fn revoke_token(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let r = async {
        let signed = check_post(&s, &headers, &Form::parse(&body)).await?;
        admin_only(&signed)?;
        s.auth.revoke(&s.store, &id).await?;
        tracing::info!(token_id = %id, by = %signed.caller.token_id, "Token revoked from the dashboard.");
        Ok::<_, WebError>(Redirect::to("/ui/tokens").into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

// ---------------------------------------------------------------------------------------------
// Live updates

/// `GET /ui/live?since=N`: a `change` event whenever a task changes (at most one per 250 ms),
/// at once if something changed since the page was rendered (version `N`).
pub(crate) async fn live(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    match super::signed_in(&s, &headers).await {
        Ok(Some(_)) => {}
        Ok(None) => return WebError(ApiError::unauthorized("sign in first")).into_response(),
        Err(e) => return e.into_response(),
    }
    let since = Form::parse(q.unwrap_or_default().as_bytes())
        .get("since")
        .and_then(|v| v.parse::<u64>().ok());
    let rx = s.hub.changes();
    let stale = since.is_some_and(|v| v != *rx.borrow());
    Sse::new(changes(s, rx, stale))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn changes(
    s: AppState,
    rx: tokio::sync::watch::Receiver<u64>,
    stale: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold((s, rx, stale), |(s, mut rx, stale)| async move {
        if !stale {
            tokio::select! {
                r = rx.changed() => r.ok()?,
                _ = s.shutdown.cancelled() => return None,
            }
        }
        // Coalesce a burst (a runner appending output) into one refresh.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = s.shutdown.cancelled() => return None,
        }
        rx.borrow_and_update();
        let ev = Event::default().event("change").data("tasks");
        Some((Ok(ev), (s, rx, false)))
    })
}
