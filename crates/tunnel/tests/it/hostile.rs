//! Issue #14, as an attacker on the internet would try it: a real `tunnel serve` child started
//! with a small open-file limit (util-linux `prlimit`, as a service manager would start it),
//! flooded with connections that never finish a request, and a huge event log read while
//! readers stall. Figures are printed (docs/RELIABILITY.md, "Hostile load"); only bounds far
//! from them are asserted.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "hostile-test-worker-token-5c2e9a1f";

/// A `tunnel serve` child under `prlimit --nofile=SOFT:HARD`.
struct Limited {
    child: Child,
    pid: u32,
    addr: String,
    url: String,
    _dir: tempfile::TempDir,
}

impl Limited {
    fn start(nofile: &str, config: &str) -> Limited {
        Limited::start_with(nofile, config, &[])
    }

    /// With more `tunnel serve` flags.
    fn start_with(nofile: &str, config: &str, flags: &[&str]) -> Limited {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("tunnel.toml");
        std::fs::write(&cfg, format!("[server]\n{config}")).unwrap();
        let mut child = Command::new("prlimit")
            .arg(format!("--nofile={nofile}"))
            .arg("--")
            .arg(super::BIN)
            .args(["serve", "--port", "0", "--log-format", "json", "--config"])
            .arg(&cfg)
            .arg("--database")
            .arg(dir.path().join("tunnel.db"))
            .args(flags)
            .env("WORKER_TOKEN", TOKEN)
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .env_remove("RUST_LOG")
            .env_remove("PORT")
            .env_remove("DATABASE_URL")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("prlimit (util-linux) runs tunnel serve");
        let pid = child.id();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if let Some(addr) = v["fields"]["address"].as_str() {
                        let _ = tx.send(addr.to_owned());
                    }
                    if v["level"] == "ERROR" {
                        eprintln!("server: {line}");
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server logged its address");
        Limited {
            child,
            pid,
            url: format!("http://{addr}"),
            addr,
            _dir: dir,
        }
    }

    /// Soft and hard open-file limits of the server process.
    fn nofile(&self) -> (u64, u64) {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid)).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let n: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (n[0], n[1])
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    async fn metric(&self, http: &reqwest::Client, name: &str) -> f64 {
        let text = http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    }

    /// Polls /metrics until `name` reaches `at_least` (an event the test cannot await
    /// otherwise), for at most `within`.
    async fn metric_reaches(
        &self,
        http: &reqwest::Client,
        name: &str,
        at_least: f64,
        within: Duration,
    ) {
        let end = Instant::now() + within;
        loop {
            if self.metric(http, name).await >= at_least {
                return;
            }
            assert!(Instant::now() < end, "{name} never reached {at_least}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fresh_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn post(http: &reqwest::Client, url: &str, path: &str, body: Value) -> (u16, Value) {
    let resp = http
        .post(format!("{url}{path}"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Waits until the server closes `s` (end of stream or reset), reading whatever comes first.
async fn closed(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The connection limits and event caps are `tunnel serve` (and `tunnel up`) flags, not only
/// config keys: each is in the help, a bad value stops the start with a message naming the
/// flag (and nothing is created), and a good one takes effect over the config file's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_are_flags_with_help_and_clear_errors() {
    let flags = [
        "--max-connections",
        "--header-timeout",
        "--idle-timeout",
        "--write-timeout",
        "--max-task-events",
        "--max-task-event-bytes",
        "--max-polls-per-token",
    ];
    for cmd in ["serve", "up"] {
        let out = Command::new(super::BIN)
            .args([cmd, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        for f in flags {
            assert!(help.contains(f), "tunnel {cmd} --help lacks {f}: {help}");
        }
    }
    let bad: [(&[&str], &str); 7] = [
        (
            &["--header-timeout", "0"],
            "--header-timeout (header_timeout_secs) of 0 s is out of range (1 to 3600 seconds)",
        ),
        (
            &["--idle-timeout", "7200"],
            "--idle-timeout (idle_timeout_secs) of 7200 s is out of range",
        ),
        (
            &["--write-timeout", "soon"],
            "invalid value 'soon' for '--write-timeout <SECS>'",
        ),
        (
            &["--max-connections", "0"],
            "--max-connections (max_connections) must be at least 1",
        ),
        (
            &["--max-connections", "many"],
            "invalid value 'many' for '--max-connections <N>'",
        ),
        (
            &["--max-task-events", "10"],
            "--max-task-events (max_task_events) must be at least 100",
        ),
        (
            &["--max-task-event-bytes", "1000"],
            "--max-task-event-bytes (max_task_event_bytes) must be at least 65536",
        ),
    ];
    for (args, says) in bad {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tunnel.db");
        let out = Command::new(super::BIN)
            .args(["serve", "--port", "0", "--database"])
            .arg(&db)
            .args(args)
            .env("WORKER_TOKEN", TOKEN)
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .env_remove("DATABASE_URL")
            .env_remove("PORT")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!db.exists(), "{args:?} created the database");
    }

    // A flag wins over the config file: a silent connection is closed after the flag's 1 s
    // header timeout, not the file's 30 s (nor the default 10 s).
    let s = Limited::start_with(
        "1024:1024",
        "header_timeout_secs = 30\n",
        &["--header-timeout", "1", "--idle-timeout", "2"],
    );
    let silent = TcpStream::connect(&s.addr).await.unwrap();
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(8), closed(silent))
        .await
        .expect("the silent connection was never closed");
    let took = start.elapsed();
    println!("a silent connection was closed after {took:?} (--header-timeout 1)");
    assert!(took >= Duration::from_millis(800), "{took:?}");
}

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let s = Limited::start("512:4096", "");
    assert_eq!(s.nofile(), (4096, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_connections_do_not_take_down_a_server_with_1024_files() {
    let mut s = Limited::start(
        "1024:1024",
        "header_timeout_secs = 2\nidle_timeout_secs = 3\n",
    );
    assert_eq!(s.nofile(), (1024, 1024));
    let http = fresh_client();

    // A runner parked before the flood: a request in flight is never closed for room.
    let parked = {
        let url = s.url.clone();
        tokio::spawn(async move {
            post(
                &fresh_client(),
                &url,
                "/v1/claim",
                json!({"runner": "home", "agents": ["claude"], "wait_ms": 60_000}),
            )
            .await
        })
    };
    s.metric_reaches(
        &http,
        "tunnel_long_polls_parked",
        1.0,
        Duration::from_secs(10),
    )
    .await;

    // 2,000 connections without a token: half send nothing, half a request head a byte every
    // 500 ms (slowloris). Each task ends when the server closes its connection.
    let flood_start = Instant::now();
    let mut bad = Vec::new();
    for i in 0..2000 {
        let mut c = TcpStream::connect(&s.addr).await.unwrap();
        bad.push(tokio::spawn(async move {
            if i % 2 == 0 {
                return closed(c).await;
            }
            if c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
                .await
                .is_err()
            {
                return;
            }
            let (r, mut w) = c.into_split();
            let reader = tokio::spawn(async move {
                let mut r = r;
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                }
            });
            tokio::pin!(reader);
            loop {
                tokio::select! {
                    _ = &mut reader => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if w.write_all(b"a").await.is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }
    println!(
        "opened 2,000 idle and slowloris connections in {:?}",
        flood_start.elapsed()
    );

    // While they are held: /healthz on new connections, and a whole task cycle.
    let mut health = Vec::new();
    let one_shot = fresh_client();
    for _ in 0..20 {
        let t = Instant::now();
        let resp = one_shot
            .get(format!("{}/healthz", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        health.push(t.elapsed());
    }
    health.sort();
    let cycle = Instant::now();
    let (st, task) = post(
        &http,
        &s.url,
        "/v1/tasks",
        json!({"agent": "claude", "prompt": "under attack"}),
    )
    .await;
    assert_eq!(st, 201, "{task}");
    let (st, offer) = parked.await.unwrap();
    assert_eq!(st, 200, "the parked poll got the task: {offer}");
    let id = offer["task"]["id"].as_str().unwrap().to_owned();
    let at = json!({"attempt": offer["attempt"], "lease_token": offer["lease_token"]});
    let (st, b) = post(&http, &s.url, &format!("/v1/tasks/{id}/ack"), at.clone()).await;
    assert_eq!(st, 200, "{b}");
    let mut ev = at.clone();
    ev["events"] = json!([{"n": 1, "kind": "text", "data": {"text": "still here"}}]);
    let (st, b) = post(&http, &s.url, &format!("/v1/tasks/{id}/events"), ev).await;
    assert_eq!(st, 200, "{b}");
    let mut fin = at.clone();
    fin["outcome"] = json!("succeeded");
    fin["result"] = json!({"text": "done"});
    let (st, b) = post(&http, &s.url, &format!("/v1/tasks/{id}/finish"), fin).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["state"], "succeeded");
    let cycle = cycle.elapsed();
    println!(
        "during the flood: /healthz p50 {:?} max {:?} (20 new connections); submit → offer → ack → events → finish {:?}",
        percentile(&health, 0.5),
        health.last().unwrap(),
        cycle
    );

    // Every bad connection is closed: the oldest to make room, the rest by the header timeout.
    let all_closed = tokio::time::timeout(Duration::from_secs(60), async {
        for h in bad {
            h.await.unwrap();
        }
    })
    .await;
    assert!(all_closed.is_ok(), "some bad connections were never closed");
    println!(
        "all 2,000 closed {:?} after the flood began; evicted {}, timed out {}, refused {}, server RSS {} KiB",
        flood_start.elapsed(),
        s.metric(&http, "tunnel_connections_evicted_total").await,
        s.metric(&http, "tunnel_connections_timed_out_total").await,
        s.metric(&http, "tunnel_connections_refused_total").await,
        s.rss_kib()
    );
    assert!(s.metric(&http, "tunnel_connections_timed_out_total").await > 0.0);
    let resp = http.get(format!("{}/healthz", s.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(s.alive());
}

/// The server's RSS, sampled every 20 ms until `stop` is cancelled; the peak, in KiB.
fn sample_rss(pid: u32, stop: tokio_util::sync::CancellationToken) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        loop {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
            {
                peak = peak.max(kib);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stop.cancelled() => return peak,
            }
        }
    })
}

/// `TUNNEL_HOSTILE_LOG_MB` attempted (default 40 MB; 2048 gives the figure in
/// docs/RELIABILITY.md) against a 16 MiB cap, then three full JSON reads at once while three
/// event streams are never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_event_log_is_capped_and_read_in_bounded_memory() {
    const CAP: u64 = 16 << 20;
    let attempt_mb: u64 = std::env::var("TUNNEL_HOSTILE_LOG_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let s = Limited::start(
        "4096:4096",
        &format!("write_timeout_secs = 2\nmax_task_event_bytes = {CAP}\n"),
    );
    let http = fresh_client();
    let (st, task) = post(
        &http,
        &s.url,
        "/v1/tasks",
        json!({"agent": "claude", "prompt": "print everything"}),
    )
    .await;
    assert_eq!(st, 201, "{task}");
    let (st, offer) = post(
        &http,
        &s.url,
        "/v1/claim",
        json!({"runner": "r", "agents": ["claude"], "wait_ms": 0}),
    )
    .await;
    assert_eq!(st, 200, "{offer}");
    let id = offer["task"]["id"].as_str().unwrap().to_owned();
    let at = json!({"attempt": offer["attempt"], "lease_token": offer["lease_token"]});
    let (st, b) = post(&http, &s.url, &format!("/v1/tasks/{id}/ack"), at.clone()).await;
    assert_eq!(st, 200, "{b}");

    // Events of 10 KB, 100 to a request.
    let line = "x".repeat(10_000);
    let writing = Instant::now();
    let mut n = 1u64;
    let total = attempt_mb * 100;
    while n <= total {
        let mut body = at.clone();
        body["events"] = (n..(n + 100).min(total + 1))
            .map(|n| json!({"n": n, "kind": "text", "data": {"text": line}}))
            .collect();
        n += 100;
        let (st, b) = post(&http, &s.url, &format!("/v1/tasks/{id}/events"), body).await;
        assert_eq!(st, 200, "{b}");
    }
    let mut fin = at.clone();
    fin["outcome"] = json!("succeeded");
    fin["result"] = json!({"text": "the final answer"});
    let (st, b) = post(&http, &s.url, &format!("/v1/tasks/{id}/finish"), fin).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["result"]["text"], "the final answer");
    println!(
        "{attempt_mb} MB of events attempted in {:?}; server RSS {} KiB",
        writing.elapsed(),
        s.rss_kib()
    );

    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = sample_rss(s.pid, stop.clone());
    let reading = Instant::now();
    // Three streams whose readers never read.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        // A small receive buffer, so what the kernel holds for it is far below the log.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let mut c = socket.connect(s.addr.parse().unwrap()).await.unwrap();
        c.write_all(
            format!(
                "GET /v1/tasks/{id}/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        stalled.push(c);
    }
    // Three full reads at once.
    let reads: Vec<_> = (0..3)
        .map(|_| {
            let (http, url, id) = (http.clone(), s.url.clone(), id.clone());
            tokio::spawn(async move {
                let resp = http
                    .get(format!("{url}/v1/tasks/{id}/events?format=json"))
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                resp.bytes().await.unwrap()
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for r in reads {
        bodies.push(r.await.unwrap());
    }
    let read_time = reading.elapsed();
    // The stalled streams are cut off by the write timeout.
    s.metric_reaches(
        &http,
        "tunnel_connections_write_timeouts_total",
        3.0,
        Duration::from_secs(30),
    )
    .await;
    stop.cancel();
    let peak = sampler.await.unwrap();
    for mut c in stalled {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut got))
            .await
            .expect("a stalled stream was closed");
        assert!(
            (got.len() as u64) < CAP,
            "the stream was cut short: {} bytes",
            got.len()
        );
    }

    // What was stored: within the cap, marked truncated, ending with the final state.
    assert!(bodies.iter().all(|b| b == &bodies[0]));
    let log: Value = serde_json::from_slice(&bodies[0]).unwrap();
    let events = log["events"].as_array().unwrap();
    let stored: u64 = events
        .iter()
        .map(|e| (e["kind"].as_str().unwrap().len() + e["data"].to_string().len()) as u64)
        .sum();
    assert!(stored <= CAP + 1_000, "{stored} bytes stored");
    assert_eq!(
        events.iter().filter(|e| e["kind"] == "truncated").count(),
        1
    );
    assert_eq!(events.last().unwrap()["data"]["state"], "succeeded");
    println!(
        "stored {} events, {stored} bytes; three {} MB JSON reads took {read_time:?}; \
         peak server RSS during them and three stalled streams: {peak} KiB",
        events.len(),
        bodies[0].len() / 1_000_000
    );
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
}
