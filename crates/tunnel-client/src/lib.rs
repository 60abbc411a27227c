//! A typed client for the tunnel HTTP API, shared by the CLI and the runner.
//!
//! Every method is one request. Errors keep the server's `{"error": {code, message}}` so a
//! caller can tell a stale attempt (409) from a bad token (401).

use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tunnel_protocol::{
    AppendAck, AppendEvents, Approval, ApprovalAnswer, ApprovalList, ApprovalRequest, ApprovalWait,
    AttemptRef, ClaimRequest, CreateToken, CreatedToken, ErrorBody, EventList, FinishRequest,
    Health, Heartbeat, IDEMPOTENCY_KEY_HEADER, LeaseStatus, Offer, ReportSessions, Role,
    RunnerList, SessionBinding, SessionCommand, SessionList, SubmitTask, Task, TaskEvent, TaskList,
    TokenInfo, TokenList,
};

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{message} ({status} {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The request did not get an answer (connect, timeout, reset).
    #[error("cannot reach the server at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
    #[error("invalid server URL {0:?}: use http://host:port or https://host")]
    InvalidUrl(String),
}

impl ClientError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A 409: this attempt is no longer current and must stop.
    pub fn is_stale(&self) -> bool {
        self.status() == Some(409)
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Filters for [`Client::tasks`].
#[derive(Debug, Default, Clone)]
pub struct TaskQuery {
    pub state: Option<String>,
    pub conversation: Option<String>,
    pub agent: Option<String>,
    pub limit: Option<u32>,
}

/// Filters for [`Client::list_approvals`].
#[derive(Debug, Default, Clone)]
pub struct ApprovalQuery {
    /// `pending`, `allowed`, `denied`, `expired` or `cancelled`.
    pub state: Option<String>,
    /// Only this task's requests.
    pub task: Option<String>,
    pub limit: Option<u32>,
}

/// A client bound to one server and token.
/// A one-time dashboard sign-in code.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SignInCode {
    pub code: String,
    /// `/ui/login?code=…`, to append to the server's URL.
    pub path: String,
    pub expires_in_ms: i64,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    timeout: Duration,
}

impl Client {
    pub fn new(base_url: &str, token: &str) -> Result<Client> {
        Client::build(base_url, token, true)
    }

    /// For a server calling its own API on loopback: no proxy from the environment.
    pub fn direct(base_url: &str, token: &str) -> Result<Client> {
        Client::build(base_url, token, false)
    }

    /// The same client (and connection pool) acting with another token.
    pub fn with_token(&self, token: &str) -> Client {
        Client {
            token: token.to_owned(),
            ..self.clone()
        }
    }

    fn build(base_url: &str, token: &str, proxy: bool) -> Result<Client> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) || base.len() < 10 {
            return Err(ClientError::InvalidUrl(base_url.to_owned()));
        }
        // One TLS provider for the whole process; a second install is a harmless no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut http = reqwest::Client::builder();
        if !proxy {
            http = http.no_proxy();
        }
        let http = http
            .connect_timeout(Duration::from_secs(10))
            // Below common proxy idle timeouts, so a pooled connection is not reused just as
            // the other side closes it.
            .pool_idle_timeout(Duration::from_secs(20))
            .user_agent(concat!("tunnel/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Decode(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base,
            token: token.to_owned(),
            timeout: Duration::from_secs(30),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T> {
        let resp = self.execute(req).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    async fn execute(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => ClientError::Api {
                status: status.as_u16(),
                code: b.error.code,
                message: b.error.message,
            },
            Err(_) => ClientError::Api {
                status: status.as_u16(),
                code: "http".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            },
        })
    }

    fn transport(&self, source: reqwest::Error) -> ClientError {
        ClientError::Transport {
            url: self.base.clone(),
            source,
        }
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).timeout(self.timeout)
    }

    fn post<B: Serialize>(&self, path: &str, body: &B) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(path))
            .timeout(self.timeout)
            .json(body)
    }

    // -- tasks --------------------------------------------------------------------------------

    /// Submits a task; with an idempotency key, a retry returns the first task.
    pub async fn submit(&self, req: &SubmitTask, idempotency_key: Option<&str>) -> Result<Task> {
        let mut r = self.post("/v1/tasks", req);
        if let Some(k) = idempotency_key {
            r = r.header(IDEMPOTENCY_KEY_HEADER, k);
        }
        self.send(r).await
    }

    /// Gets a task; with `wait`, the server answers when it ends or the wait runs out.
    pub async fn task(&self, id: &str, wait: Option<Duration>) -> Result<Task> {
        let mut path = format!("/v1/tasks/{}", encode(id));
        let mut timeout = self.timeout;
        if let Some(w) = wait {
            path.push_str(&format!("?wait={}", w.as_secs_f64()));
            timeout += w;
        }
        self.send(self.http.get(self.url(&path)).timeout(timeout))
            .await
    }

    pub async fn tasks(&self, q: &TaskQuery) -> Result<Vec<Task>> {
        let mut params = Vec::new();
        push_param(&mut params, "state", q.state.as_deref());
        push_param(&mut params, "conversation", q.conversation.as_deref());
        push_param(&mut params, "agent", q.agent.as_deref());
        push_param(
            &mut params,
            "limit",
            q.limit.map(|l| l.to_string()).as_deref(),
        );
        let list: TaskList = self
            .send(self.get(&format!("/v1/tasks{}", query(&params))))
            .await?;
        Ok(list.tasks)
    }

    pub async fn cancel(&self, id: &str) -> Result<Task> {
        self.send(
            self.http
                .post(self.url(&format!("/v1/tasks/{}/cancel", encode(id))))
                .timeout(self.timeout),
        )
        .await
    }

    /// The event log so far (after `after`).
    pub async fn events(&self, id: &str, after: u64) -> Result<EventList> {
        self.send(self.get(&format!(
            "/v1/tasks/{}/events?format=json&after={after}",
            encode(id)
        )))
        .await
    }

    /// Opens the live event stream after `after`. It ends when the task ends (or the
    /// connection drops: reopen with the last seq seen).
    pub async fn event_stream(&self, id: &str, after: u64) -> Result<EventStream> {
        let req = self
            .http
            .get(self.url(&format!("/v1/tasks/{}/events", encode(id))))
            .header("accept", "text/event-stream")
            .header("last-event-id", after.to_string());
        let resp = self.execute(req).await?;
        Ok(EventStream {
            inner: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
        })
    }

    // -- runner protocol -----------------------------------------------------------------------

    /// Long-polls for work: `Some(offer)`, or `None` when the wait ran out.
    pub async fn claim(&self, req: &ClaimRequest) -> Result<Option<Offer>> {
        let timeout = Duration::from_millis(req.wait_ms) + self.timeout;
        let r = self
            .http
            .post(self.url("/v1/claim"))
            .timeout(timeout)
            .json(req);
        let resp = self.execute(r).await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn ack(&self, id: &str, at: &AttemptRef) -> Result<LeaseStatus> {
        self.send(self.post(&format!("/v1/tasks/{}/ack", encode(id)), at))
            .await
    }

    /// Renews the lease; with `wait_ms` the server holds the answer until cancel is asked or
    /// the wait runs out.
    pub async fn heartbeat(&self, id: &str, hb: &Heartbeat) -> Result<LeaseStatus> {
        let timeout = self.timeout + Duration::from_millis(hb.wait_ms);
        let r = self
            .http
            .post(self.url(&format!("/v1/tasks/{}/heartbeat", encode(id))))
            .timeout(timeout)
            .json(hb);
        self.send(r).await
    }

    pub async fn append_events(&self, id: &str, req: &AppendEvents) -> Result<AppendAck> {
        self.send(self.post(&format!("/v1/tasks/{}/events", encode(id)), req))
            .await
    }

    pub async fn finish(&self, id: &str, req: &FinishRequest) -> Result<Task> {
        self.send(self.post(&format!("/v1/tasks/{}/finish", encode(id)), req))
            .await
    }

    /// Reports the sessions found in this runner's agents' session stores.
    pub async fn report_sessions(&self, runner: &str, report: &ReportSessions) -> Result<()> {
        let resp = self
            .execute(self.post(&format!("/v1/runners/{}/sessions", encode(runner)), report))
            .await?;
        drop(resp);
        Ok(())
    }

    // -- approvals -----------------------------------------------------------------------------

    /// The running attempt's agent asks (runner). Retrying with the same `key` returns the
    /// first request.
    pub async fn create_approval(&self, task_id: &str, req: &ApprovalRequest) -> Result<Approval> {
        self.send(self.post(&format!("/v1/tasks/{}/approvals", encode(task_id)), req))
            .await
    }

    /// Waits for the answer to a request (runner): at once when it is settled, else held up to
    /// `wait_ms` by the server; still `pending` when the wait ran out (ask again).
    pub async fn wait_approval(
        &self,
        task_id: &str,
        approval_id: &str,
        req: &ApprovalWait,
    ) -> Result<Approval> {
        let timeout = self.timeout + Duration::from_millis(req.wait_ms);
        let r = self
            .http
            .post(self.url(&format!(
                "/v1/tasks/{}/approvals/{}/wait",
                encode(task_id),
                encode(approval_id)
            )))
            .timeout(timeout)
            .json(req);
        self.send(r).await
    }

    /// Approval requests, newest first (a client token sees its own tasks').
    pub async fn list_approvals(&self, q: &ApprovalQuery) -> Result<Vec<Approval>> {
        let mut params = Vec::new();
        push_param(&mut params, "state", q.state.as_deref());
        push_param(&mut params, "task", q.task.as_deref());
        push_param(
            &mut params,
            "limit",
            q.limit.map(|l| l.to_string()).as_deref(),
        );
        let list: ApprovalList = self
            .send(self.get(&format!("/v1/approvals{}", query(&params))))
            .await?;
        Ok(list.approvals)
    }

    pub async fn get_approval(&self, id: &str) -> Result<Approval> {
        self.send(self.get(&format!("/v1/approvals/{}", encode(id))))
            .await
    }

    /// Answers a pending request (the task's owner or admin).
    pub async fn answer_approval(&self, id: &str, answer: &ApprovalAnswer) -> Result<Approval> {
        self.send(self.post(&format!("/v1/approvals/{}", encode(id)), answer))
            .await
    }

    // -- runners, sessions, tokens ---------------------------------------------------------------

    /// A one-time sign-in code for the web dashboard (`POST /ui/code`).
    pub async fn dashboard_code(&self) -> Result<SignInCode> {
        self.send(self.post("/ui/code", &serde_json::json!({})))
            .await
    }

    /// This runner stops cleanly: the server shows it offline at once.
    pub async fn goodbye(&self, runner: &str) -> Result<()> {
        let url = self.url(&format!("/v1/runners/{}/goodbye", encode(runner)));
        self.execute(self.http.post(url).timeout(Duration::from_secs(5)))
            .await
            .map(drop)
    }

    pub async fn runners(&self) -> Result<RunnerList> {
        self.send(self.get("/v1/runners")).await
    }

    pub async fn sessions(
        &self,
        conversation: Option<&str>,
        agent: Option<&str>,
    ) -> Result<SessionList> {
        let mut params = Vec::new();
        push_param(&mut params, "conversation", conversation);
        push_param(&mut params, "agent", agent);
        self.send(self.get(&format!("/v1/sessions{}", query(&params))))
            .await
    }

    pub async fn new_session(&self, conversation: &str, agent: &str) -> Result<SessionBinding> {
        self.new_session_on(conversation, agent, None).await
    }

    /// A fresh start whose first task goes to `runner` (when given).
    pub async fn new_session_on(
        &self,
        conversation: &str,
        agent: &str,
        runner: Option<&str>,
    ) -> Result<SessionBinding> {
        let cmd = SessionCommand {
            conversation: conversation.into(),
            agent: agent.into(),
            session_id: None,
            runner: runner.map(str::to_owned),
        };
        self.send(self.post("/v1/sessions/new", &cmd)).await
    }

    pub async fn resume_session(
        &self,
        conversation: &str,
        agent: &str,
        session_id: &str,
        runner: Option<&str>,
    ) -> Result<SessionBinding> {
        let cmd = SessionCommand {
            conversation: conversation.into(),
            agent: agent.into(),
            session_id: Some(session_id.into()),
            runner: runner.map(Into::into),
        };
        self.send(self.post("/v1/sessions/resume", &cmd)).await
    }

    pub async fn create_token(&self, name: &str, role: Role) -> Result<CreatedToken> {
        self.send(self.post(
            "/v1/tokens",
            &CreateToken {
                name: name.into(),
                role,
            },
        ))
        .await
    }

    pub async fn tokens(&self) -> Result<Vec<TokenInfo>> {
        let list: TokenList = self.send(self.get("/v1/tokens")).await?;
        Ok(list.tokens)
    }

    pub async fn revoke_token(&self, id: &str) -> Result<TokenInfo> {
        self.send(
            self.http
                .delete(self.url(&format!("/v1/tokens/{}", encode(id))))
                .timeout(self.timeout),
        )
        .await
    }

    pub async fn health(&self) -> Result<Health> {
        self.send(self.get("/healthz")).await
    }
}

/// A live Server-Sent Events stream of task events.
pub struct EventStream {
    inner:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: Vec<u8>,
}

impl EventStream {
    /// The next event; `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Result<TaskEvent>> {
        loop {
            if let Some(block) = take_block(&mut self.buf) {
                match parse_block(&block) {
                    Some(Ok(e)) => return Some(Ok(e)),
                    Some(Err(e)) => return Some(Err(e)),
                    None => continue, // a comment or keep-alive
                }
            }
            match self.inner.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    return Some(Err(ClientError::Decode(format!("event stream broke: {e}"))));
                }
                None => return None,
            }
        }
    }
}

/// Takes one complete SSE block (up to a blank line) off the buffer.
fn take_block(buf: &mut Vec<u8>) -> Option<String> {
    let text = std::str::from_utf8(buf).ok()?;
    let normalized_end = text
        .find("\n\n")
        .map(|i| (i, 2))
        .or_else(|| text.find("\r\n\r\n").map(|i| (i, 4)));
    let (i, len) = normalized_end?;
    let block = text[..i].to_owned();
    buf.drain(..i + len);
    Some(block)
}

fn parse_block(block: &str) -> Option<Result<TaskEvent>> {
    let mut data = String::new();
    let mut event = None;
    for line in block.lines() {
        if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        } else if let Some(e) = line.strip_prefix("event:") {
            event = Some(e.trim().to_owned());
        }
    }
    if data.is_empty() {
        return None;
    }
    match serde_json::from_str::<TaskEvent>(&data) {
        Ok(e) => Some(Ok(e)),
        // The server's own `event: error` carries a sentence; an agent's `error` event (Codex
        // sends them) is a task event like any other and parsed above.
        Err(_) if event.as_deref() == Some("error") => Some(Err(ClientError::Decode(data))),
        Err(e) => Some(Err(ClientError::Decode(e.to_string()))),
    }
}

fn push_param(params: &mut Vec<String>, key: &str, value: Option<&str>) {
    if let Some(v) = value {
        params.push(format!("{key}={}", encode(v)));
    }
}

fn query(params: &[String]) -> String {
    if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_blocks_parse_and_skip_keepalives() {
        let mut buf = b": keep-alive\n\nid: 1\nevent: text\ndata: {\"seq\":1,\"attempt\":1,\"kind\":\"text\",\"data\":{\"t\":\"hi\"},\"at\":5}\n\nid: 2".to_vec();
        let first = take_block(&mut buf).unwrap();
        assert!(parse_block(&first).is_none());
        let second = take_block(&mut buf).unwrap();
        let e = parse_block(&second).unwrap().unwrap();
        assert_eq!((e.seq, e.kind.as_str()), (1, "text"));
        assert!(
            take_block(&mut buf).is_none(),
            "an incomplete block stays buffered"
        );
        assert_eq!(buf, b"id: 2");
    }

    #[test]
    fn an_agents_error_event_is_an_event_not_a_broken_stream() {
        let block = "id: 4\nevent: error\ndata: {\"seq\":4,\"attempt\":1,\"kind\":\"error\",\"data\":{\"message\":\"overloaded\"},\"at\":5}";
        let e = parse_block(block).unwrap().unwrap();
        assert_eq!((e.seq, e.kind.as_str()), (4, "error"));
        let server = "event: error\ndata: the event log could not be read";
        assert!(matches!(
            parse_block(server),
            Some(Err(ClientError::Decode(_)))
        ));
    }

    #[test]
    fn encoding_keeps_paths_inside_their_segment() {
        assert_eq!(encode("../x?y=1"), "..%2Fx%3Fy%3D1");
        assert_eq!(encode("chat:123"), "chat%3A123");
    }

    #[test]
    fn bad_urls_are_refused() {
        assert!(matches!(
            Client::new("localhost:3456", "t"),
            Err(ClientError::InvalidUrl(_))
        ));
        assert!(Client::new("http://127.0.0.1:3456/", "t").is_ok());
    }
}
