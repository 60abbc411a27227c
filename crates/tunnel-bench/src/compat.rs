//! Phase 4b: parked long-polls on the original openclaw-tunnel API (`GET /worker/poll`), as
//! the original runner (Node) sends them. Plain HTTP/1.1 over a TCP socket per poll, each
//! request its own connection (`Connection: close`), so nothing but the server's own cost per
//! waiting poll is measured.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tunnel_client::Client;
use tunnel_protocol::SubmitTask;

use crate::server::ServerProcess;
use crate::stats::Latency;

#[derive(Debug, Serialize)]
pub(crate) struct CompatParkedReport {
    pub(crate) parked: usize,
    pub(crate) rss_idle: u64,
    pub(crate) rss_parked: u64,
    pub(crate) park_s: f64,
    pub(crate) park_cpu_us_per_poll: f64,
    /// Submit sent → one of the parked polls has read the task.
    pub(crate) wake: Latency,
}

/// One request on its own connection; the status and the body read to the end.
pub(crate) async fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).await?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {text:.200}"))?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the response head")?;
    Ok((status, answer[split + 4..].to_vec()))
}

/// The `tunnel_long_polls_parked` gauge of `/metrics`.
async fn parked_now(addr: &str, token: &str) -> Result<usize> {
    let (status, body) = request(addr, "GET", "/metrics", token, None).await?;
    ensure!(status == 200, "GET /metrics answered {status}");
    let text = String::from_utf8_lossy(&body);
    let line = text
        .lines()
        .find(|l| l.starts_with("tunnel_long_polls_parked "))
        .context("no tunnel_long_polls_parked in /metrics")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<f64>().ok())
        .context("a bad tunnel_long_polls_parked value")? as usize)
}

pub(crate) async fn parked(
    server: &ServerProcess,
    token: &str,
    n: usize,
    wakes: usize,
) -> Result<CompatParkedReport> {
    let addr = server
        .url
        .strip_prefix("http://")
        .context("the server URL is not http://")?
        .to_owned();
    let rss_idle = server.memory()?.rss;
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Value)>();
    let cpu0 = server.cpu()?;
    let t0 = Instant::now();
    let mut polls = JoinSet::new();
    for i in 0..n {
        let (addr, token, tx) = (addr.clone(), token.to_owned(), tx.clone());
        polls.spawn(async move {
            // A poll whose wait ran out (`null`) polls again, as the original runner does.
            loop {
                let (status, body) = request(&addr, "GET", "/worker/poll?wait=60000", &token, None)
                    .await
                    .with_context(|| format!("compat poll {i}"))?;
                ensure!(status == 200, "compat poll {i} answered {status}");
                let v: Value = serde_json::from_slice(&body)?;
                if !v.is_null() {
                    let _ = tx.send((Instant::now(), v));
                    return Ok::<_, anyhow::Error>(());
                }
            }
        });
        // In waves, so the listen backlog does not overflow (as phase 4).
        if i % 256 == 255 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(r) = polls.try_join_next() {
            r??;
            bail!("a parked compat poll ended before any task was submitted");
        }
        let seen = parked_now(&addr, token).await?;
        if seen >= n {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {seen} of {n} compat polls parked within 60 s"
        );
    }
    let park_s = t0.elapsed().as_secs_f64();
    let park_cpu = (server.cpu()? - cpu0).as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_parked = server.memory()?.rss;

    let client = Client::new(&server.url, token)?;
    let mut wake = Vec::with_capacity(wakes);
    for i in 0..wakes.min(n) {
        let t0 = Instant::now();
        let task = client
            .submit(&SubmitTask::new("claude", format!("compat wake {i}")), None)
            .await
            .context("submit")?;
        let (t1, shown) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .context("no parked compat poll got the task within 10 s")?
            .context("every compat poll ended")?;
        ensure!(
            shown["id"] == task.id.as_str(),
            "a compat poll was handed {} instead of the task just submitted ({})",
            shown["id"],
            task.id
        );
        wake.push(t1 - t0);
        let result = serde_json::json!({"taskId": task.id, "stdout": "done", "exitCode": 0});
        let (status, body) = request(&addr, "POST", "/worker/result", token, Some(&result)).await?;
        ensure!(
            status == 200,
            "POST /worker/result answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    while let Some(r) = polls.try_join_next() {
        r??;
    }
    polls.abort_all();
    while polls.join_next().await.is_some() {}
    Ok(CompatParkedReport {
        parked: n,
        rss_idle,
        rss_parked,
        park_s,
        park_cpu_us_per_poll: park_cpu * 1e6 / n as f64,
        wake: Latency::of(&wake),
    })
}
