//! The runner's readers of agent output (Claude, Codex and Gemini stream-json, custom agents'
//! text and JSON lines), fed arbitrary bytes as the supervisor hands them over (lossy UTF-8,
//! line by line). Properties: never panics; every event it makes is one the server accepts
//! (`AppendEvents::validate`); the result it reports is one the server accepts
//! (`FinishRequest::validate`), else the runner could never report the attempt; it succeeds
//! only on exit code 0. And the prompt never reaches a built-in agent's argv.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_protocol::{AppendEvents, FinishRequest, NewEvent, Outcome};
use tunnel_runner::fuzzing::{agent_output, invocation};
use tunnel_runner::{AgentConfig, AgentKind, OutputMode};

fuzz_target!(|data: &[u8]| {
    let [which, exit, rest @ ..] = data else {
        return;
    };
    let (kind, output) = match which % 5 {
        0 => (AgentKind::Claude, OutputMode::Text),
        1 => (AgentKind::Codex, OutputMode::Text),
        2 => (AgentKind::Gemini, OutputMode::Text),
        3 => (AgentKind::Custom, OutputMode::Text),
        _ => (AgentKind::Custom, OutputMode::JsonLines),
    };
    let code = match exit % 4 {
        0 | 1 => Some(0),
        2 => Some(i32::from(*exit)),
        _ => None,
    };
    let text = String::from_utf8_lossy(rest);
    let lines: Vec<&str> = text.split('\n').collect();
    let parsed = agent_output(kind, output, &lines, code, Some(9), "stderr tail");

    let events: Vec<NewEvent> = parsed
        .events
        .iter()
        .enumerate()
        .map(|(i, (kind, data))| NewEvent {
            n: i as u64 + 1,
            kind: kind.clone(),
            data: data.clone(),
        })
        .collect();
    for chunk in events.chunks(1000) {
        let append = AppendEvents {
            attempt: 1,
            lease_token: "t".into(),
            events: chunk.to_vec(),
        };
        if let Err(e) = append.validate() {
            panic!("the server would refuse these events: {e:?}");
        }
    }
    let finish = FinishRequest {
        attempt: 1,
        lease_token: "t".into(),
        outcome: if parsed.succeeded {
            Outcome::Succeeded
        } else {
            Outcome::Failed
        },
        result: parsed.result,
        not_before: None,
        events: vec![],
    };
    if let Err(e) = finish.validate() {
        panic!("the server would refuse this result: {e:?}");
    }
    assert!(
        !parsed.succeeded || code == Some(0),
        "succeeded with exit {code:?}"
    );

    // The prompt goes to a built-in agent's stdin, never into its argv.
    if matches!(
        kind,
        AgentKind::Claude | AgentKind::Codex | AgentKind::Gemini
    ) {
        let agent = AgentConfig::builtin(kind, "agent");
        let (_, args, stdin) = invocation(&agent, &text, Some("sonnet"), None);
        let (_, plain, _) = invocation(&agent, "x", Some("sonnet"), None);
        assert_eq!(args, plain, "the prompt changed the argv");
        assert_eq!(stdin.as_deref(), Some(&*text));
    }
});
