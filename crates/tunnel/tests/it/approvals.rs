//! `tunnel submit --approvals`, `tunnel approvals`, `tunnel approve` and `tunnel watch`'s
//! question, through the binary against a real `tunnel serve`; the runner's part by hand (curl).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{BIN, Served, stderr, stdout};

/// Submits with `--approvals ask`, runs it by hand to the point where the agent asks; returns
/// the task id, the attempt (for later runner calls) and the approval id.
fn asking(s: &Served) -> (String, Value, String) {
    let out = s.cli(&[
        "submit",
        "--agent",
        "claude",
        "--approvals",
        "ask",
        "--json",
        "clean",
        "up",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let task: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(task["approvals"], "ask");
    let id = task["id"].as_str().unwrap().to_owned();
    let (code, offer) = s.post(
        "/v1/claim",
        json!({"runner": "by-hand", "agents": ["claude"], "wait_ms": 1000}),
    );
    assert_eq!(code, 200, "{offer}");
    assert_eq!(
        offer["task"]["approvals"], "ask",
        "the runner sees the policy"
    );
    let at = json!({"attempt": offer["attempt"], "lease_token": offer["lease_token"]});
    assert_eq!(s.post(&format!("/v1/tasks/{id}/ack"), at.clone()).0, 200);
    let mut ask = at.clone();
    ask["key"] = json!("call_1");
    ask["tool"] =
        json!({"kind": "execute", "title": "Run rm -rf build", "command": "rm -rf build"});
    ask["options"] = json!([
        {"id": "y", "name": "Allow", "kind": "allow_once"},
        {"id": "n", "name": "Reject", "kind": "reject_once"}
    ]);
    let (code, a) = s.post(&format!("/v1/tasks/{id}/approvals"), ask);
    assert_eq!(code, 201, "{a}");
    (id, at, a["id"].as_str().unwrap().to_owned())
}

fn finish(s: &Served, id: &str, at: &Value) {
    let mut finish = at.clone();
    finish["outcome"] = json!("succeeded");
    finish["result"] = json!({"text": "done"});
    assert_eq!(s.post(&format!("/v1/tasks/{id}/finish"), finish).0, 200);
}

#[test]
fn approvals_are_listed_and_answered_from_the_cli() {
    let s = Served::start(&[]);
    let (id, at, aid) = asking(&s);

    let out = s.cli(&["approvals"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains(&aid) && table.contains("rm -rf build"),
        "{table}"
    );
    assert!(
        table.contains("execute") && table.contains(&id[..8]),
        "{table}"
    );
    let out = s.cli(&["tasks", &id]);
    assert!(
        stdout(&out).contains(&format!("approval {aid}")),
        "{}",
        stdout(&out)
    );

    // `watch` off a terminal prints the question and how to answer it.
    let watcher = Command::new(BIN)
        .args(["watch", &id])
        .env("XDG_DATA_HOME", s.data.path())
        .env("TUNNEL_URL", &s.url)
        .env_remove("WORKER_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let out = s.cli(&["approve", &aid, "--deny", "not that folder", "--by", "ops"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("🚫 denied by ops via token local-admin: not that folder"),
        "{}",
        stdout(&out)
    );
    // A second answer is refused, saying how and by whom it was decided.
    let out = s.cli(&["approve", &aid]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already denied by ops via token local-admin at "),
        "{}",
        stderr(&out)
    );
    let out = s.cli(&["approve", "apr_0190b2d4-0000-7000-8000-000000000001"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no approval request"),
        "{}",
        stderr(&out)
    );
    let out = s.cli(&["approve", "nope", "--session"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not an approval id"),
        "{}",
        stderr(&out)
    );

    let out = s.cli(&["approvals"]);
    assert!(stdout(&out).contains("nothing waits"), "{}", stdout(&out));
    let out = s.cli(&["approvals", "--all", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["state"], "denied");
    assert_eq!(list[0]["outcome"]["message"], "not that folder");

    finish(&s, &id, &at);
    let out = watcher.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(err.contains("🔐 claude asks: Run rm -rf build"), "{err}");
    assert!(err.contains("$ rm -rf build"), "{err}");
    assert!(
        err.contains(&format!("tunnel approve {aid} --deny")),
        "{err}"
    );
    assert!(err.contains("[🚫 denied by ops"), "{err}");
}

/// On a terminal (a pseudo-terminal from util-linux `script`), `watch` asks and the answer
/// typed goes to the server; two requests at once are asked one after the other.
#[test]
fn watch_on_a_terminal_asks_and_answers() {
    let s = Served::start(&[]);
    let (id, at, aid) = asking(&s);
    let mut second = at.clone();
    second["key"] = json!("call_2");
    second["tool"] = json!({"kind": "edit", "title": "Edit README.md", "paths": ["README.md"]});
    second["options"] = json!([
        {"id": "y", "name": "Allow", "kind": "allow_once"},
        {"id": "a", "name": "Always", "kind": "allow_always"},
        {"id": "n", "name": "Reject", "kind": "reject_once"}
    ]);
    let (code, b) = s.post(&format!("/v1/tasks/{id}/approvals"), second);
    assert_eq!(code, 201, "{b}");
    let bid = b["id"].as_str().unwrap().to_owned();
    let cmd = format!("{BIN} watch {id}");
    let mut child = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env("XDG_DATA_HOME", s.data.path())
        .env("TUNNEL_URL", &s.url)
        .env("USER", "pat")
        .env_remove("WORKER_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("util-linux `script` is installed");
    let mut input = child.stdin.take().unwrap();
    input.write_all(b"n keep the build\ns\n").unwrap();
    input.flush().unwrap();
    let settled = |aid: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, a) = super::curl(&[
                &format!("{}/v1/approvals/{aid}", s.url),
                "-H",
                &format!("authorization: Bearer {}", s.admin_token()),
            ]);
            if a["state"] != "pending" || Instant::now() > deadline {
                break a;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let decided = settled(&aid);
    let second = settled(&bid);
    assert_eq!(second["state"], "allowed", "{second}");
    assert_eq!(second["outcome"]["decision"], "allow_session");
    assert_eq!(second["outcome"]["option_id"], "a");
    assert_eq!(decided["state"], "denied", "{decided}");
    assert_eq!(decided["outcome"]["message"], "keep the build");
    assert_eq!(decided["outcome"]["by"], "cli:pat via token local-admin");
    finish(&s, &id, &at);
    let out = child.wait_with_output().unwrap();
    drop(input);
    let shown = stdout(&out);
    assert!(
        shown.contains("Allow? [y]es once / [s]ession / [n]o"),
        "{shown}"
    );
}
