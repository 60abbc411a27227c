use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use tunnel_protocol::ApprovalOutcome;

fn options() -> Vec<ApprovalOption> {
    let o = |id: &str, kind| ApprovalOption {
        id: id.into(),
        name: id.into(),
        kind,
    };
    vec![
        o("once", ApprovalOptionKind::AllowOnce),
        o("always", ApprovalOptionKind::AllowAlways),
        o("no", ApprovalOptionKind::RejectOnce),
    ]
}

fn tool(cmd: &str) -> ApprovalTool {
    ApprovalTool {
        kind: "execute".into(),
        title: format!("Run {cmd}"),
        command: Some(cmd.into()),
        ..Default::default()
    }
}

/// A server that answers each question after `pending_waits` waits, with `answer`; it fails
/// the first `transient` calls as a restarting server would.
struct Fake {
    answer: Option<(ApprovalState, Option<Decision>, Option<String>)>,
    pending_waits: usize,
    transient: AtomicUsize,
    creates: AtomicUsize,
    waits: AtomicUsize,
}

impl Fake {
    fn new(answer: Option<(ApprovalState, Option<Decision>, Option<&str>)>) -> Fake {
        Fake {
            answer: answer.map(|(s, d, o)| (s, d, o.map(str::to_owned))),
            pending_waits: 1,
            transient: AtomicUsize::new(0),
            creates: AtomicUsize::new(0),
            waits: AtomicUsize::new(0),
        }
    }

    fn approval(&self, req_key: &str, settled: bool) -> Approval {
        let (state, decision, option_id) = match (&self.answer, settled) {
            (Some(a), true) => a.clone(),
            _ => (ApprovalState::Pending, None, None),
        };
        Approval {
            id: "apr_1".into(),
            task_id: "t".into(),
            attempt: 1,
            agent: "a".into(),
            runner: None,
            state,
            tool: tool(req_key),
            options: options(),
            asked_at: 0,
            expires_at: 0,
            outcome: state.is_final().then(|| ApprovalOutcome {
                decision,
                option_id,
                message: None,
                by: "alice".into(),
                at: 1,
            }),
        }
    }
}

impl ApprovalApi for Fake {
    fn create<'a>(
        &'a self,
        _: &'a str,
        req: &'a ApprovalRequest,
    ) -> BoxFut<'a, Result<Approval, ApiError>> {
        Box::pin(async move {
            if self
                .transient
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(ApiError::Transient("connection refused".into()));
            }
            self.creates.fetch_add(1, Ordering::SeqCst);
            assert!(req.validate().is_ok());
            Ok(self.approval(&req.key, false))
        })
    }

    fn wait<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: &'a ApprovalWait,
    ) -> BoxFut<'a, Result<Approval, ApiError>> {
        Box::pin(async move {
            let n = self.waits.fetch_add(1, Ordering::SeqCst);
            if self.answer.is_none() {
                // Never answered: hold like the server does.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(self.approval("k", n + 1 >= self.pending_waits))
        })
    }
}

fn gate(policy: ApprovalPolicy, api: Option<Arc<dyn ApprovalApi>>) -> Gate {
    Gate::new(
        policy,
        api,
        "t".into(),
        1,
        "l".into(),
        Duration::from_secs(600),
        CancellationToken::new(),
    )
}

#[tokio::test]
async fn auto_and_deny_answer_at_once() {
    let s = gate(ApprovalPolicy::Auto, None)
        .decide("k", &tool("ls"), &options())
        .await;
    assert_eq!(s.option_id.as_deref(), Some("once"));
    assert_eq!(s.state, ApprovalState::Allowed);
    let s = gate(ApprovalPolicy::Deny, None)
        .decide("k", &tool("ls"), &options())
        .await;
    assert_eq!(s.option_id.as_deref(), Some("no"));
    assert_eq!(s.state, ApprovalState::Denied);
}

#[tokio::test]
async fn ask_without_a_route_fails_closed() {
    let s = gate(ApprovalPolicy::Ask, None)
        .decide("k", &tool("ls"), &options())
        .await;
    assert_eq!(s.state, ApprovalState::Denied);
    assert_eq!(s.option_id, None);
}

#[tokio::test]
async fn allow_for_the_session_is_asked_once() {
    let fake = Arc::new(Fake::new(Some((
        ApprovalState::Allowed,
        Some(Decision::AllowSession),
        Some("always"),
    ))));
    let g = gate(ApprovalPolicy::Ask, Some(fake.clone()));
    let s = g.decide("c1", &tool("make"), &options()).await;
    assert_eq!(s.option_id.as_deref(), Some("always"));
    assert_eq!(s.approval_id.as_deref(), Some("apr_1"));
    let s = g.decide("c2", &tool("make"), &options()).await;
    assert_eq!(s.option_id.as_deref(), Some("always"));
    assert_eq!(s.by, "allowed for this session earlier");
    assert_eq!(fake.creates.load(Ordering::SeqCst), 1, "asked once");
    // Another command is asked again.
    g.decide("c3", &tool("make install"), &options()).await;
    assert_eq!(fake.creates.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_option_the_agent_did_not_offer_is_never_sent() {
    let fake = Arc::new(Fake::new(Some((
        ApprovalState::Allowed,
        Some(Decision::AllowOnce),
        Some("made-up"),
    ))));
    let s = gate(ApprovalPolicy::Ask, Some(fake))
        .decide("k", &tool("ls"), &options())
        .await;
    assert_eq!(s.option_id, None);
}

#[tokio::test]
async fn a_restarting_server_is_retried_and_the_wait_goes_on() {
    let mut f = Fake::new(Some((ApprovalState::Denied, Some(Decision::Deny), None)));
    f.transient = AtomicUsize::new(1);
    f.pending_waits = 4;
    let fake = Arc::new(f);
    let s = gate(ApprovalPolicy::Ask, Some(fake.clone()))
        .decide("k", &tool("ls"), &options())
        .await;
    assert_eq!(s.state, ApprovalState::Denied);
    assert_eq!(fake.creates.load(Ordering::SeqCst), 1);
    assert_eq!(fake.waits.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_cancel_ends_the_wait() {
    let fake = Arc::new(Fake::new(None));
    let g = Arc::new(gate(ApprovalPolicy::Ask, Some(fake)));
    let g2 = g.clone();
    let asking = tokio::spawn(async move { g2.decide("k", &tool("ls"), &options()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    g.cancel.cancel();
    let s = asking.await.unwrap();
    assert_eq!(s.state, ApprovalState::Cancelled);
    assert_eq!(s.approval_id.as_deref(), Some("apr_1"));
}

#[test]
fn the_same_request_has_the_same_signature() {
    assert_eq!(signature(&tool("ls")), signature(&tool("ls")));
    assert_ne!(signature(&tool("ls")), signature(&tool("ls -la")));
}
