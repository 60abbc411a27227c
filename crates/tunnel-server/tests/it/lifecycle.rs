//! Each transition of the task model, through the API.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{TestServer, id};

#[tokio::test]
async fn submit_claim_ack_events_finish() {
    let s = TestServer::start().await;
    let task = s
        .submit(json!({"agent": "claude", "prompt": "hello"}))
        .await;
    assert_eq!(task["state"], "queued");
    assert_eq!(task["attempt"], 0);

    let offer = s.claim("r1", &["claude"], 0).await.expect("an offer");
    assert_eq!(offer["task"]["id"], task["id"]);
    assert_eq!(offer["attempt"], 1);
    assert_eq!(s.task(&id(&task)).await["state"], "offered");

    let (st, lease) = s.attempt_call(&offer, "ack", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(lease["cancel"], false);
    assert_eq!(s.task(&id(&task)).await["state"], "running");

    let (st, ack) = s
        .attempt_call(
            &offer,
            "events",
            json!({"events": [
            {"n": 1, "kind": "text", "data": {"text": "hi"}},
            {"n": 2, "kind": "tool_use", "data": {"name": "Bash"}}]}),
        )
        .await;
    assert_eq!((st, ack["accepted"].as_u64()), (StatusCode::OK, Some(2)));
    // A retried append with the same numbers adds nothing.
    let (_, ack) = s
        .attempt_call(
            &offer,
            "events",
            json!({"events": [{"n": 2, "kind": "tool_use", "data": {}}]}),
        )
        .await;
    assert_eq!(ack["accepted"], 0);

    let done = s.run_to_success_after_ack(&offer, "the answer").await;
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["result"]["text"], "the answer");
    assert!(done["finished_at"].as_i64().is_some());

    let (_, events) = s
        .get(
            &format!("/v1/tasks/{}/events?format=json", id(&task)),
            &s.client,
        )
        .await;
    let kinds: Vec<String> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| match e["kind"].as_str().unwrap() {
            "state" => format!("state:{}", e["data"]["state"].as_str().unwrap()),
            k => k.to_owned(),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "state:queued",
            "state:offered",
            "state:running",
            "text",
            "tool_use",
            "state:succeeded"
        ]
    );
    let seqs: Vec<u64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());

    // A lost answer to finish is retried: the same attempt gets the same task back.
    let (st, again) = s
        .attempt_call(&offer, "finish", json!({"outcome": "failed"}))
        .await;
    assert_eq!(
        (st, again["state"].as_str()),
        (StatusCode::OK, Some("succeeded"))
    );
}

#[tokio::test]
async fn offer_not_acked_in_time_goes_back_to_the_queue() {
    let s = TestServer::start().await;
    let task = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let first = s.claim("r1", &["claude"], 0).await.unwrap();
    assert!(
        s.claim("r2", &["claude"], 0).await.is_none(),
        "offered tasks are not offered twice"
    );

    s.clock.advance(s.settings().ack_timeout_ms + 1);
    // The deadline timer requeues it and wakes this parked claim.
    let second = s
        .claim("r2", &["claude"], 10_000)
        .await
        .expect("requeued task offered again");
    assert_eq!(second["task"]["id"], task["id"]);
    assert_eq!(second["attempt"], 2);
    assert!(second["task"]["reason"].is_null());

    // The first attempt is fenced out of every call.
    for call in ["ack", "heartbeat", "finish"] {
        let extra = if call == "finish" {
            json!({"outcome": "succeeded"})
        } else {
            json!({})
        };
        let (st, body) = s.attempt_call(&first, call, extra).await;
        assert_eq!(st, StatusCode::CONFLICT, "{call}: {body}");
        assert_eq!(body["error"]["code"], "stale_attempt");
    }
    let (st, _) = s
        .attempt_call(
            &first,
            "events",
            json!({"events": [{"n": 1, "kind": "text", "data": {}}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    // The current attempt is untouched by all that.
    let done = s.run_to_success(&second, "ok").await;
    assert_eq!(done["state"], "succeeded");
}

#[tokio::test]
async fn late_ack_after_the_deadline_is_refused_and_requeues() {
    let s = TestServer::start().await;
    let task = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let offer = s.claim("r1", &["claude"], 0).await.unwrap();
    s.clock.advance(s.settings().ack_timeout_ms + 1);
    let (st, body) = s.attempt_call(&offer, "ack", json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    let again = s.claim("r1", &["claude"], 5_000).await.unwrap();
    assert_eq!(
        (again["task"]["id"].clone(), again["attempt"].clone()),
        (task["id"].clone(), json!(2))
    );
}

#[tokio::test]
async fn expired_lease_marks_the_task_lost_with_a_reason() {
    let s = TestServer::start().await;
    let task = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let offer = s.claim("laptop", &["claude"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    // Heartbeats keep it alive across several lease lengths.
    for _ in 0..3 {
        s.clock.advance(s.settings().lease_ms - 1_000);
        let (st, hb) = s.attempt_call(&offer, "heartbeat", json!({})).await;
        assert_eq!((st, hb["cancel"].as_bool()), (StatusCode::OK, Some(false)));
    }
    s.clock.advance(s.settings().lease_ms + 1);
    let (st, lost) = s
        .get(&format!("/v1/tasks/{}?wait=10", id(&task)), &s.client)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(lost["state"], "lost", "{lost}");
    assert!(
        lost["reason"].as_str().unwrap().contains("laptop"),
        "{lost}"
    );
    let (st, _) = s.attempt_call(&offer, "heartbeat", json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT);
}

#[tokio::test]
async fn lost_lease_retries_on_another_runner_when_attempts_are_left() {
    let s = TestServer::start().await;
    let task = s
        .submit(json!({"agent": "claude", "prompt": "p", "max_attempts": 2}))
        .await;
    let first = s.claim("a", &["claude"], 0).await.unwrap();
    s.attempt_call(&first, "ack", json!({})).await;
    s.clock.advance(s.settings().lease_ms + 1);
    let second = s.claim("b", &["claude"], 10_000).await.expect("retried");
    assert_eq!(second["task"]["id"], task["id"]);
    assert_eq!(second["attempt"], 2);
    assert!(second["task"]["reason"].is_null() || second["task"]["state"] == "offered");
    let done = s.run_to_success(&second, "second time").await;
    assert_eq!(done["runner"], "b");
}

#[tokio::test]
async fn idempotency_key_returns_the_first_task() {
    let s = TestServer::start().await;
    let body = json!({"agent": "claude", "prompt": "once"});
    let send = |token: String| {
        let r = s
            .http
            .post(format!("{}/v1/tasks", s.url))
            .bearer_auth(token)
            .header("Idempotency-Key", "discord-msg-1234")
            .json(&body);
        async move {
            let resp = r.send().await.unwrap();
            (
                resp.status(),
                resp.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let (s1, t1) = send(s.client.clone()).await;
    let (s2, t2) = send(s.client.clone()).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::OK));
    assert_eq!(t1["id"], t2["id"]);
    let (_, list) = s.get("/v1/tasks", &s.client).await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1);
    // Another token's key space is its own.
    let other = s.create_token("client").await;
    let (s3, t3) = send(other).await;
    assert_eq!(s3, StatusCode::CREATED);
    assert_ne!(t3["id"], t1["id"]);
}

#[tokio::test]
async fn one_session_runs_in_order_while_others_run_in_parallel() {
    let s = TestServer::start().await;
    let a1 = s
        .submit(json!({"agent": "claude", "prompt": "a1", "conversation": "chan-a"}))
        .await;
    let a2 = s
        .submit(json!({"agent": "claude", "prompt": "a2", "conversation": "chan-a"}))
        .await;
    let a3 = s
        .submit(json!({"agent": "claude", "prompt": "a3", "conversation": "chan-a"}))
        .await;
    let b1 = s
        .submit(json!({"agent": "claude", "prompt": "b1", "conversation": "chan-b"}))
        .await;
    // Same conversation, other agent: a session of its own.
    let c1 = s
        .submit(json!({"agent": "codex", "prompt": "c1", "conversation": "chan-a"}))
        .await;
    assert_eq!(s.task(&id(&a3)).await["queue_position"], 2);

    let o1 = s.claim("r1", &["claude", "codex"], 0).await.unwrap();
    let o2 = s.claim("r2", &["claude", "codex"], 0).await.unwrap();
    let o3 = s.claim("r3", &["claude", "codex"], 0).await.unwrap();
    let got: Vec<_> = [&o1, &o2, &o3]
        .iter()
        .map(|o| o["task"]["id"].clone())
        .collect();
    assert_eq!(
        got,
        vec![a1["id"].clone(), b1["id"].clone(), c1["id"].clone()]
    );
    assert!(
        s.claim("r4", &["claude", "codex"], 0).await.is_none(),
        "a2 waits for a1"
    );

    s.run_to_success(&o1, "1").await;
    let o4 = s.claim("r4", &["claude"], 0).await.unwrap();
    assert_eq!(o4["task"]["id"], a2["id"]);
    assert!(
        s.claim("r4", &["claude"], 0).await.is_none(),
        "a3 waits for a2"
    );
    // A failure also lets the next one go.
    s.attempt_call(&o4, "ack", json!({})).await;
    s.attempt_call(
        &o4,
        "finish",
        json!({"outcome": "failed", "result": {"error": "boom"}}),
    )
    .await;
    let o5 = s.claim("r4", &["claude"], 0).await.unwrap();
    assert_eq!(o5["task"]["id"], a3["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_runners_never_overlap_a_session() {
    let s = std::sync::Arc::new(TestServer::start().await);
    const CONVS: usize = 4;
    const PER_CONV: usize = 6;
    for i in 0..PER_CONV {
        for c in 0..CONVS {
            s.submit(json!({"agent": "claude", "prompt": format!("{c}:{i}"), "conversation": format!("conv-{c}")}))
                .await;
        }
    }
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, &'static str)>::new()));
    let mut runners = Vec::new();
    for r in 0..5 {
        let (s, log) = (s.clone(), log.clone());
        runners.push(tokio::spawn(async move {
            let name = format!("runner-{r}");
            let mut done = 0;
            while let Some(offer) = s.claim(&name, &["claude"], 300).await {
                let prompt = offer["task"]["prompt"].as_str().unwrap().to_owned();
                s.attempt_call(&offer, "ack", json!({})).await;
                log.lock().unwrap().push((prompt.clone(), "start"));
                tokio::task::yield_now().await;
                log.lock().unwrap().push((prompt, "end"));
                s.attempt_call(&offer, "finish", json!({"outcome": "succeeded"}))
                    .await;
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for r in runners {
        total += r.await.unwrap();
    }
    assert_eq!(total, CONVS * PER_CONV, "every task ran exactly once");
    let log = log.lock().unwrap();
    for c in 0..CONVS {
        let mine: Vec<_> = log
            .iter()
            .filter(|(p, _)| p.starts_with(&format!("{c}:")))
            .collect();
        // Strictly start, end, start, end… in submission order: never two at once.
        for (i, pair) in mine.chunks(2).enumerate() {
            assert_eq!(pair[0], &(format!("{c}:{i}"), "start"), "{mine:?}");
            assert_eq!(pair[1], &(format!("{c}:{i}"), "end"), "{mine:?}");
        }
    }
}

#[tokio::test]
async fn cancel_queued_and_running_tasks() {
    let s = TestServer::start().await;
    let queued = s
        .submit(json!({"agent": "claude", "prompt": "q", "conversation": "x"}))
        .await;
    let (st, c) = s
        .post(
            &format!("/v1/tasks/{}/cancel", id(&queued)),
            &s.client,
            json!({}),
        )
        .await;
    assert_eq!(
        (st, c["state"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    assert!(
        s.claim("r", &["claude"], 0).await.is_none(),
        "a cancelled task is never offered"
    );

    let running = s
        .submit(json!({"agent": "claude", "prompt": "r", "conversation": "x"}))
        .await;
    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    let (_, c) = s
        .post(
            &format!("/v1/tasks/{}/cancel", id(&running)),
            &s.client,
            json!({}),
        )
        .await;
    assert_eq!(c["state"], "cancelling");
    let (_, hb) = s.attempt_call(&offer, "heartbeat", json!({})).await;
    assert_eq!(
        hb["cancel"], true,
        "the runner learns of the cancel on its heartbeat"
    );
    let (_, done) = s
        .attempt_call(&offer, "finish", json!({"outcome": "cancelled"}))
        .await;
    assert_eq!(done["state"], "cancelled");
    let (st, body) = s
        .post(
            &format!("/v1/tasks/{}/cancel", id(&running)),
            &s.client,
            json!({}),
        )
        .await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict"))
    );
}

#[tokio::test]
async fn cancelled_offer_fences_its_ack() {
    let s = TestServer::start().await;
    let t = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    s.post(
        &format!("/v1/tasks/{}/cancel", id(&t)),
        &s.client,
        json!({}),
    )
    .await;
    let (st, body) = s.attempt_call(&offer, "ack", json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{body}"
    );
}

#[tokio::test]
async fn runner_lost_while_cancelling_ends_cancelled() {
    let s = TestServer::start().await;
    let t = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    s.post(
        &format!("/v1/tasks/{}/cancel", id(&t)),
        &s.client,
        json!({}),
    )
    .await;
    s.clock.advance(s.settings().lease_ms + 1);
    let (_, done) = s
        .get(&format!("/v1/tasks/{}?wait=10", id(&t)), &s.client)
        .await;
    assert_eq!(done["state"], "cancelled");
}

#[tokio::test]
async fn parked_task_runs_again_after_its_time() {
    let s = TestServer::start().await;
    let t = s
        .submit(json!({"agent": "claude", "prompt": "p", "conversation": "c"}))
        .await;
    let next = s
        .submit(json!({"agent": "claude", "prompt": "later", "conversation": "c"}))
        .await;
    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    let until = crate::common::START_MS + 3_600_000;
    let (st, parked) = s
        .attempt_call(
            &offer,
            "finish",
            json!({"outcome": "parked", "not_before": until,
            "result": {"error": "usage limit; resets in an hour"}}),
        )
        .await;
    assert_eq!(
        (st, parked["state"].as_str()),
        (StatusCode::OK, Some("parked")),
        "{parked}"
    );
    assert_eq!(parked["not_before"], until);
    assert!(
        s.claim("r", &["claude"], 0).await.is_none(),
        "parked, and its session waits behind it"
    );
    assert_eq!(s.task(&id(&next)).await["state"], "queued");

    s.clock.advance(3_600_000);
    let again = s.claim("r", &["claude"], 10_000).await.expect("runs again");
    assert_eq!(again["task"]["id"], t["id"]);
    assert_eq!(again["attempt"], 2);
}

impl TestServer {
    async fn run_to_success_after_ack(
        &self,
        offer: &serde_json::Value,
        text: &str,
    ) -> serde_json::Value {
        let (st, task) = self
            .attempt_call(
                offer,
                "finish",
                json!({"outcome": "succeeded", "result": {"text": text}}),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{task}");
        task
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_heartbeat_returns_as_soon_as_cancel_is_asked() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let t = s.submit(json!({"agent": "claude", "prompt": "p"})).await;
    let offer = s.claim("r", &["claude"], 0).await.unwrap();
    s.attempt_call(&offer, "ack", json!({})).await;
    let held = {
        let (s, offer) = (s.clone(), offer.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = s
                .attempt_call(&offer, "heartbeat", json!({"wait_ms": 14_000}))
                .await;
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    s.post(
        &format!("/v1/tasks/{}/cancel", id(&t)),
        &s.client,
        json!({}),
    )
    .await;
    let ((st, hb), took) = held.await.unwrap();
    assert_eq!(
        (st, hb["cancel"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{hb}"
    );
    assert!(
        took < std::time::Duration::from_secs(10),
        "held {took:?}: cancel did not cut the wait"
    );
    assert_eq!(hb["lease_ms"], s.settings().lease_ms);
}

#[tokio::test]
async fn finished_tasks_are_removed_after_the_retention_but_open_ones_stay() {
    let s = TestServer::start_with(crate::common::Options {
        retention: Some((60_000, std::time::Duration::from_millis(20))),
        ..Default::default()
    })
    .await;
    let done = s.submit(json!({"agent": "claude", "prompt": "old"})).await;
    let offer = s.claim("r1", &["claude"], 0).await.expect("an offer");
    s.run_to_success(&offer, "answer").await;
    let running = s.submit(json!({"agent": "claude", "prompt": "long"})).await;
    let offer = s.claim("r1", &["claude"], 0).await.expect("an offer");
    let (st, _) = s.attempt_call(&offer, "ack", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let queued = s
        .submit(json!({"agent": "codex", "prompt": "waiting"}))
        .await;

    // Not old enough yet: several prune rounds leave it alone.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(s.task(&id(&done)).await["state"], "succeeded");

    // Past the retention, with the running task's lease kept alive on the way.
    for _ in 0..4 {
        let (st, _) = s.attempt_call(&offer, "heartbeat", json!({})).await;
        assert_eq!(st, StatusCode::OK);
        s.clock.advance(15_500);
    }
    let (st, _) = s.attempt_call(&offer, "heartbeat", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let mut gone = false;
    for _ in 0..200 {
        let (st, _) = s.get(&format!("/v1/tasks/{}", id(&done)), &s.client).await;
        if st == StatusCode::NOT_FOUND {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(gone, "the finished task outlived its retention");
    assert_eq!(s.task(&id(&running)).await["state"], "running");
    assert_eq!(s.task(&id(&queued)).await["state"], "queued");
    let (_, metrics) = s
        .request(reqwest::Method::GET, "/metrics", None, None)
        .await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("tunnel_tasks_pruned_total 1\n"),
        "{metrics}"
    );
}

/// The task's events as `kind` (or `state:<state>`) and their text, oldest first.
async fn event_kinds(s: &TestServer, task_id: &str) -> Vec<String> {
    let (_, events) = s
        .get(
            &format!("/v1/tasks/{task_id}/events?format=json"),
            &s.client,
        )
        .await;
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| match e["kind"].as_str().unwrap() {
            "state" => format!("state:{}", e["data"]["state"].as_str().unwrap()),
            k => format!("{k}:{}", e["data"]["text"].as_str().unwrap_or("")),
        })
        .collect()
}

#[tokio::test]
async fn a_claim_with_ack_starts_the_attempt_and_a_lost_answer_is_offered_again() {
    let s = TestServer::start().await;
    let task = s
        .submit(json!({"agent": "claude", "prompt": "hello"}))
        .await;
    let claim = json!({"runner": "r1", "agents": ["claude"], "wait_ms": 0, "ack": true});
    let (st, offer) = s.post("/v1/claim", &s.runner, claim.clone()).await;
    assert_eq!(st, StatusCode::OK, "{offer}");
    assert_eq!(offer["task"]["id"], task["id"]);
    assert!(offer["lease"]["lease_until"].as_i64().is_some(), "{offer}");
    assert_eq!(offer["lease"]["cancel"], false);
    assert_eq!(s.task(&id(&task)).await["state"], "running");

    // That answer was lost: the runner claims again and gets the same attempt, started.
    let (st, again) = s.post("/v1/claim", &s.runner, claim.clone()).await;
    assert_eq!(st, StatusCode::OK, "{again}");
    assert_eq!(
        (
            &again["task"]["id"],
            &again["attempt"],
            &again["lease_token"]
        ),
        (
            &offer["task"]["id"],
            &offer["attempt"],
            &offer["lease_token"]
        )
    );
    assert!(again["lease"]["lease_until"].as_i64().is_some());
    // Another runner name, or another token under the same name, never gets it.
    let (st, other) = s
        .post(
            "/v1/claim",
            &s.runner,
            json!({"runner": "r2", "agents": ["claude"], "wait_ms": 0, "ack": true}),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{other}");
    let second = s.create_token("runner").await;
    let (st, _) = s.post("/v1/claim", &second, claim.clone()).await;
    assert_ne!(st, StatusCode::OK);
    // A runner that lists it as held does not get it again; nor after any call about it.
    let mut holding = claim.clone();
    holding["holding"] = json!([id(&task)]);
    let (st, _) = s.post("/v1/claim", &s.runner, holding).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = s.post("/v1/claim", &s.runner, claim.clone()).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "confirmed by the holding list");

    // Old runners: a claim without `ack` gets an offer without `lease`, acked apart.
    let t2 = s
        .submit(json!({"agent": "claude", "prompt": "again"}))
        .await;
    let old = s.claim("r1", &["claude"], 0).await.expect("an offer");
    assert_eq!(old["task"]["id"], t2["id"]);
    assert!(old.get("lease").is_none(), "{old}");
    assert_eq!(s.task(&id(&t2)).await["state"], "offered");
    let done = s.run_to_success(&old, "ok").await;
    assert_eq!(done["state"], "succeeded");

    let done = s
        .attempt_call(
            &offer,
            "finish",
            json!({"outcome": "succeeded", "result": {"text": "once"}}),
        )
        .await;
    assert_eq!(done.0, StatusCode::OK, "{}", done.1);
    assert_eq!(
        event_kinds(&s, &id(&task)).await,
        [
            "state:queued",
            "state:offered",
            "state:running",
            "state:succeeded"
        ]
    );
}

#[tokio::test]
async fn a_finish_carries_the_last_events_and_a_repeated_one_stores_none_twice() {
    let s = TestServer::start().await;
    let task = s
        .submit(json!({"agent": "claude", "prompt": "hello"}))
        .await;
    let offer = s.claim("r1", &["claude"], 0).await.expect("an offer");
    let (st, _) = s.attempt_call(&offer, "ack", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = s
        .attempt_call(
            &offer,
            "events",
            json!({"events": [{"n": 1, "kind": "text", "data": {"text": "one"}}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    // The finish repeats event 1 (its append's answer was lost) and carries 2 and 3.
    let finish = json!({
        "outcome": "succeeded", "result": {"text": "done"},
        "events": [
            {"n": 1, "kind": "text", "data": {"text": "one"}},
            {"n": 2, "kind": "text", "data": {"text": "two"}},
            {"n": 3, "kind": "text", "data": {"text": "three"}}]
    });
    let (st, done) = s.attempt_call(&offer, "finish", finish.clone()).await;
    assert_eq!(
        (st, done["state"].as_str()),
        (StatusCode::OK, Some("succeeded")),
        "{done}"
    );
    // Its answer was lost: the same finish again answers the same and stores nothing.
    let (st, again) = s.attempt_call(&offer, "finish", finish).await;
    assert_eq!(
        (st, again["state"].as_str()),
        (StatusCode::OK, Some("succeeded")),
        "{again}"
    );
    let want = [
        "state:queued",
        "state:offered",
        "state:running",
        "text:one",
        "text:two",
        "text:three",
        "state:succeeded",
    ];
    assert_eq!(event_kinds(&s, &id(&task)).await, want);

    // Fenced like an append: another attempt's finish with events stores nothing.
    let mut stale = offer.clone();
    stale["lease_token"] = json!("not-the-lease-token");
    let (st, _) = s
        .attempt_call(
            &stale,
            "finish",
            json!({"outcome": "failed",
                   "events": [{"n": 9, "kind": "text", "data": {"text": "stale"}}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    // Validated like an append: a reserved kind is refused and nothing changes.
    let t2 = s.submit(json!({"agent": "claude", "prompt": "x"})).await;
    let o2 = s.claim("r1", &["claude"], 0).await.expect("an offer");
    s.attempt_call(&o2, "ack", json!({})).await;
    let (st, _) = s
        .attempt_call(
            &o2,
            "finish",
            json!({"outcome": "succeeded", "events": [{"n": 1, "kind": "state", "data": {}}]}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(s.task(&id(&t2)).await["state"], "running");
    assert_eq!(event_kinds(&s, &id(&task)).await, want);
}
