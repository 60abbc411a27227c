//! Hostile prompts and hostile agent output through the real server and runner: prompts with
//! shell metacharacters, leading dashes and 1 MB of text reach the agent verbatim and never as
//! options; an agent printing invalid UTF-8, NUL bytes and megabytes of output still gets its
//! task reported.

use std::time::Duration;

use tunnel_protocol::TaskState;
use tunnel_runner::{AgentKind, OutputMode};

use crate::harness::{RunnerHandle, World, builtin, custom, task};

/// Prompts that would do harm if a shell or an option parser saw them.
fn hostile_prompts() -> Vec<String> {
    vec![
        "--help".into(),
        "-p --dangerously-skip-permissions --model evil".into(),
        "$(touch CANARY) `touch CANARY`; touch CANARY && touch CANARY | touch CANARY > CANARY"
            .into(),
        "'\"\\ * ? [a-z] ~ # ! { } %s %n \u{7}\r\n-- -x\nline two ✓ 🦀".into(),
        // 1 MB: too long for one argv string (128 KiB on Linux), fine on stdin.
        format!("-{}", "x".repeat(1 << 20)),
    ]
}

/// A stand-in for `claude` that records its argv (one file per argument) and stdin, then
/// answers in stream-json.
const RECORDING_CLAUDE: &str = r#"dir="$RECORD_DIR/$$"; mkdir -p "$dir"; i=0
for a in "$@"; do printf '%s' "$a" > "$dir/arg$i"; i=$((i+1)); done
cat > "$dir/stdin"
sid=5f1c0000-0000-4000-8000-0000000000bb
echo '{"type":"system","subtype":"init","session_id":"'$sid'"}'
echo '{"type":"result","subtype":"success","is_error":false,"duration_ms":5,"num_turns":1,"result":"ok","session_id":"'$sid'"}'"#;

fn recorded(dir: &std::path::Path) -> Vec<(Vec<String>, Vec<u8>)> {
    let mut runs = Vec::new();
    for run in std::fs::read_dir(dir).unwrap().flatten() {
        let mut args = Vec::new();
        for i in 0.. {
            match std::fs::read_to_string(run.path().join(format!("arg{i}"))) {
                Ok(a) => args.push(a),
                Err(_) => break,
            }
        }
        runs.push((args, std::fs::read(run.path().join("stdin")).unwrap()));
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_prompts_reach_a_builtin_agent_on_stdin_and_never_in_argv() {
    let w = World::start().await;
    let record = w.dir.path().join("record");
    std::fs::create_dir_all(&record).unwrap();
    let project = w.dir.path().join("work");
    std::fs::create_dir_all(&project).unwrap();
    let program = w.script("recording-claude", RECORDING_CLAUDE);
    let mut agent = builtin(AgentKind::Claude, &program);
    agent
        .env
        .insert("RECORD_DIR".into(), record.display().to_string());
    let mut c = w.config("r1");
    c.default_dir = project.clone();
    c.agents.insert("claude".into(), agent);
    let r = RunnerHandle::spawn(c);

    let prompts = hostile_prompts();
    for p in &prompts {
        let t = w.submit(task("claude", p)).await;
        let done = w.ended(&t.id).await;
        assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.result);
    }
    let runs = recorded(&record);
    assert_eq!(runs.len(), prompts.len());
    let fixed = [
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--dangerously-skip-permissions",
    ];
    for (args, stdin) in &runs {
        assert_eq!(args, &fixed, "the argv changed with the prompt");
        assert!(
            prompts.iter().any(|p| p.as_bytes() == stdin.as_slice()),
            "stdin was not one of the prompts verbatim ({} bytes)",
            stdin.len()
        );
    }
    assert!(
        !project.join("CANARY").exists() && !w.dir.path().join("CANARY").exists(),
        "a prompt was run by a shell"
    );
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_template_passes_the_prompt_as_one_argument() {
    let w = World::start().await;
    let project = w.dir.path().join("work");
    std::fs::create_dir_all(&project).unwrap();
    // Prints each argument between brackets, one per line.
    let program = w.script(
        "argv-agent",
        r#"for a in "$@"; do printf '[%s]\n' "$a"; done"#,
    );
    let mut c = w.config("r1");
    c.default_dir = project.clone();
    c.agents.insert(
        "argv".into(),
        custom(
            &program,
            &["--prompt", "{prompt}", "--end"],
            OutputMode::Text,
        ),
    );
    let r = RunnerHandle::spawn(c);

    let mut prompts = hostile_prompts();
    let huge = prompts.pop().unwrap();
    for p in &prompts {
        let t = w.submit(task("argv", p)).await;
        let done = w.ended(&t.id).await;
        assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.result);
        let text = done.result.unwrap().text.unwrap();
        // Output is read line by line: a CR before a line feed goes, as with any text agent.
        let shown = p.trim_end().replace("\r\n", "\n");
        assert_eq!(text, format!("[--prompt]\n[{shown}]\n[--end]"));
    }
    assert!(
        !project.join("CANARY").exists(),
        "a prompt was run by a shell"
    );

    // 1 MB cannot be one argument (the kernel's limit is 128 KiB): the task fails and says
    // why, instead of hanging or running something else.
    let t = w.submit(task("argv", &huge)).await;
    let done = w.ended(&t.id).await;
    assert_eq!(done.state, TaskState::Failed, "{:?}", done.result);
    let error = done.result.unwrap().error.unwrap();
    assert!(
        error.to_lowercase().contains("argument list too long"),
        "{error}"
    );
    r.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_nul_bytes_and_megabytes_of_output_are_reported() {
    let w = World::start().await;
    // Invalid UTF-8 and NUL bytes, then a line of 1.5 MB (over the runner's 1 MiB line cap),
    // then six lines of 1 MB (6 MB of events: more than one request may carry).
    let program = w.script(
        "noisy-agent",
        r#"cat > /dev/null
printf 'bad \377\376 utf8\n'
printf 'nul\000byte\n'
head -c 1572864 /dev/zero | tr '\0' a; echo
for i in 1 2 3 4 5 6; do head -c 1000000 /dev/zero | tr '\0' b; echo; done
echo done"#,
    );
    let mut c = w.config("r1");
    c.agents
        .insert("noisy".into(), custom(&program, &[], OutputMode::Text));
    let r = RunnerHandle::spawn(c);

    let t = w.submit(task("noisy", "go")).await;
    let done = tokio::time::timeout(Duration::from_secs(60), w.ended(&t.id))
        .await
        .expect("the task was never reported");
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.reason);
    let text = done.result.unwrap().text.unwrap();
    assert!(
        text.ends_with("done"),
        "{}",
        &text[text.len().saturating_sub(80)..]
    );
    let log = w.admin.events(&t.id, 0).await.unwrap();
    let lines: Vec<&str> = log
        .events
        .iter()
        .filter(|e| e.kind == "text")
        .filter_map(|e| e.data["text"].as_str())
        .collect();
    assert_eq!(
        lines.first(),
        Some(&"bad \u{fffd}\u{fffd} utf8"),
        "{:?}",
        &lines[..2]
    );
    assert_eq!(lines.get(1), Some(&"nul\0byte"));
    assert_eq!(lines.last(), Some(&"done"));
    r.stop().await.unwrap();
}

/// A TCP proxy in front of `to` that counts the bytes sent towards it (the runner's uploads).
async fn counting_proxy(
    to: std::net::SocketAddr,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let up = Arc::new(AtomicU64::new(0));
    let counted = up.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let up = counted.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let upload = async move {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        up.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = sw.shutdown().await;
                };
                let download = async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                tokio::join!(upload, download);
            });
        }
    });
    (url, up)
}

/// Once the server says a task's log is truncated (at its cap), the runner sends none of the
/// agent's later output: an agent printing 10 MB against a 64 KiB cap costs about the cap and
/// the answer in uploads, not the 10 MB (before: every event went up and was dropped there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_printing_past_the_event_cap_costs_no_further_uploads() {
    use std::sync::atomic::Ordering;
    let w = World::start_with(|cfg| cfg.queue.max_task_event_bytes = 64 << 10).await;
    let program = w.script(
        "chatty-agent",
        r#"cat > /dev/null
awk 'BEGIN { s = sprintf("%1000s", ""); gsub(/ /, "x", s); for (i = 0; i < 10000; i++) print s }'
echo done"#,
    );
    let (proxy, uploaded) = counting_proxy(w.addr()).await;
    let mut c = w.config("r1");
    c.server = proxy;
    c.agents
        .insert("chatty".into(), custom(&program, &[], OutputMode::Text));
    let r = RunnerHandle::spawn(c);

    let t = w.submit(task("chatty", "go")).await;
    let done = tokio::time::timeout(Duration::from_secs(60), w.ended(&t.id))
        .await
        .expect("the task was never reported");
    assert_eq!(done.state, TaskState::Succeeded, "{:?}", done.reason);
    // The answer is kept whole at its end.
    let text = done.result.unwrap().text.unwrap();
    assert!(text.ends_with("done"), "{}", &text[text.len() - 40..]);
    let log = w.admin.events(&t.id, 0).await.unwrap();
    let truncated = log.events.iter().filter(|e| e.kind == "truncated").count();
    assert_eq!(truncated, 1);
    let up = uploaded.load(Ordering::Relaxed);
    println!(
        "10 MB of agent output against a 64 KiB event cap: {:.2} MB uploaded by the runner",
        up as f64 / 1e6
    );
    // The cap, the first batch (at most 1 MiB), the answer (at most 1 MiB) and the polls.
    assert!(
        up < 4_000_000,
        "the runner uploaded {up} bytes for a log truncated at 64 KiB"
    );
    r.stop().await.unwrap();
}
