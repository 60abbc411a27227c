//! `tunnel-bench`: starts `tunnel serve` as a child process with a fresh database (SQLite on
//! disk, or PostgreSQL with `--database postgres://…`) and measures it over HTTP on loopback
//! (see docs/BENCHMARKS.md):
//!
//! 1. dispatch latency: submit → a parked long-poll returns the offer;
//! 2. full-cycle throughput: producers submit, fake runners claim, ack, post events, finish;
//! 3. server RSS idle, during (2) and after;
//! 4. many parked long-polls at once: RSS and wake latency (on a second fresh server);
//! 5. runner overhead: the real runner in this process runs a trivial agent (this binary);
//! 6. approval round trip;
//! 7. SQLite's WAL: its peak size over phases 1–6, what a clean stop leaves, and the restart;
//! 8. with `--flood N`: claim and submit latency with N unrelated tasks queued, against the
//!    empty queue (on a third fresh server);
//! 9. over a slow link: a real `tunnel runner` process behind a relay that delays each
//!    direction (100 ms round trip by default): submit → agent started, an agent's line → an
//!    event-stream watcher, agent exit → finished (on a fresh server).
//!
//! Every phase counts what actually happened, and at the end the database files are reopened
//! to check every task ended `succeeded`; anything else fails the run.

mod approvals;
mod compat;
mod db;
mod flood;
mod node;
mod phases;
mod runner;
mod server;
mod stats;
mod wan;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::phases::{CycleParams, CycleReport, DispatchReport, ParkedReport};
use crate::server::ServerProcess;
use crate::stats::{mib, ms};

#[derive(Debug, Parser)]
#[command(
    name = "tunnel-bench",
    about = "Measure a tunnel server over HTTP on loopback: dispatch latency, full-cycle \
             throughput, memory, and many parked long-polls."
)]
struct Args {
    /// The `tunnel` binary to start [default: `tunnel` next to this binary].
    #[arg(long)]
    tunnel: Option<PathBuf>,
    /// Database file for phases 1–3 and 5 (must not exist); phase 4 uses the same name with
    /// `-parked` added [default: a new temporary directory, removed afterwards]. Or a
    /// PostgreSQL URL (`postgres://user@host:port/db`): each server then gets a new database
    /// created there and dropped after the run (`--durability` does not apply).
    #[arg(long)]
    database: Option<String>,
    /// Servers on the one database of phases 1–3 (PostgreSQL only): dispatch polls and
    /// submits, producers and runners are spread over them; phases 5 and 6 use the first.
    #[arg(long, default_value_t = 1)]
    servers: usize,
    /// SQLite durability the server runs with.
    #[arg(long, value_enum, default_value = "normal")]
    durability: DurabilityArg,
    /// Tasks for the dispatch-latency phase (0 skips it).
    #[arg(long, default_value_t = 1_000)]
    dispatch: usize,
    /// Idle gaps (ms, comma-separated) before each submit for extra dispatch runs, each with
    /// a `GET /health` after the same gap for comparison (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "50,200")]
    dispatch_gaps: Vec<u64>,
    /// Tasks of each dispatch run with an idle gap.
    #[arg(long, default_value_t = 100)]
    gap_dispatch: usize,
    /// Dispatches per API and idle gap from the Node client (phase 1c; 0 skips it). The gaps
    /// are `--node-gaps`.
    #[arg(long, default_value_t = 100)]
    node_dispatch: usize,
    /// Idle gaps (ms) of the Node client's dispatches (0: hot, 5 ms after the poll was sent).
    #[arg(long, value_delimiter = ',', default_value = "0,50,200")]
    node_gaps: Vec<u64>,
    /// The Node binary for phase 1c (skipped, with a message, if it does not run).
    #[arg(long, default_value = "node")]
    node: PathBuf,
    /// Tasks for the full-cycle phase (0 skips it).
    #[arg(long, default_value_t = 20_000)]
    tasks: u64,
    /// Concurrent producers submitting tasks.
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// Concurrent fake runners (claim, ack, events, finish).
    #[arg(long, default_value_t = 8)]
    runners: u32,
    /// Events each fake runner posts per task.
    #[arg(long, default_value_t = 3)]
    events: u32,
    /// Events per POST (3 events with 1 per post is 3 requests).
    #[arg(long, default_value_t = 1)]
    events_per_post: u32,
    /// Phase 2's fake runners claim with `ack` as the real runner does (the offer comes back
    /// started: no ack request); `--ack-in-claim false` acks apart (7 requests per task with
    /// the defaults, the cycle of rounds one to four).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ack_in_claim: bool,
    /// The last this many of the `--events` ride in the finish (`FinishRequest.events`), as
    /// the real runner sends what its agent wrote last, instead of an events post.
    #[arg(long, default_value_t = 0)]
    events_in_finish: u32,
    /// Long-polls parked at once in phase 4 (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    parked: usize,
    /// Tasks submitted one by one to the parked polls.
    #[arg(long, default_value_t = 1_000)]
    wakes: usize,
    /// Long-polls parked at once on the original API (`GET /worker/poll`) in phase 4b, on
    /// a fresh server (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    parked_compat: usize,
    /// Tasks submitted one by one to the parked original-API polls.
    #[arg(long, default_value_t = 200)]
    compat_wakes: usize,
    /// Tasks run one by one by a real runner with a trivial agent (0 skips phase 5).
    #[arg(long, default_value_t = 200)]
    runner_tasks: usize,
    /// Approval requests asked and answered one by one (0 skips phase 6).
    #[arg(long, default_value_t = 200)]
    approvals: usize,
    /// Unrelated tasks queued for phase 8 (claim and submit latency under a queue flood; 0
    /// skips it). The figure: 200000.
    #[arg(long, default_value_t = 0)]
    flood: u64,
    /// Claims and submits timed in phase 8, on the empty queue and again with the flood.
    #[arg(long, default_value_t = 300)]
    flood_samples: usize,
    /// Tasks run one at a time over the slow link of phase 9 (0 skips it).
    #[arg(long, default_value_t = 30)]
    wan_tasks: usize,
    /// One-way delay of phase 9's link, each direction (the round trip is twice this).
    #[arg(long, default_value_t = 50)]
    wan_delay_ms: u64,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum DurabilityArg {
    Normal,
    Full,
}

impl DurabilityArg {
    fn as_str(self) -> &'static str {
        match self {
            DurabilityArg::Normal => "normal",
            DurabilityArg::Full => "full",
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    durability: DurabilityArg,
    database: &'static str,
    /// Servers sharing the database of phases 1–3.
    servers: usize,
    machine: Machine,
    rss_idle: u64,
    dispatch: Option<DispatchReport>,
    dispatch_idle: Vec<DispatchReport>,
    node: Option<node::NodeReport>,
    /// Why phase 1c did not run, when it was asked for.
    node_skipped: Option<String>,
    cycle: Option<CycleReport>,
    parked: Option<ParkedReport>,
    parked_compat: Option<compat::CompatParkedReport>,
    wal: Option<WalReport>,
    runner: Option<runner::RunnerReport>,
    approvals: Option<approvals::ApprovalReport>,
    flood: Option<flood::FloodReport>,
    wan: Option<wan::WanReport>,
    total_s: f64,
    /// /proc/loadavg when the bench started and ended: the machine may be shared.
    load_before: String,
    load_after: String,
}

/// SQLite's write-ahead log on the server of phases 1–6.
#[derive(Debug, Serialize)]
struct WalReport {
    /// Tasks written while it was watched.
    tasks: u64,
    /// Largest size of the `-wal` file seen (sampled every 5 ms).
    peak_bytes: u64,
    /// Its size after the server stopped on SIGTERM (0: absent).
    after_stop_bytes: u64,
    /// A new server on the same database: start → its address logged, and → first
    /// `GET /health` answered.
    restart_ms: f64,
}

#[derive(Debug, Serialize)]
struct Machine {
    cpus: usize,
    cpu_model: String,
}

/// A shared token long enough for the server (`WORKER_TOKEN` works as an admin token).
const TOKEN: &str = "tunnel-bench-worker-token-0123456789";

fn main() -> Result<()> {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == runner::AGENT_PROBE)
    {
        runner::agent_probe();
        return Ok(());
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == wan::WAN_AGENT)
    {
        wan::wan_agent();
        return Ok(());
    }
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

fn progress(msg: &str) {
    eprintln!("tunnel-bench: {msg}");
}

async fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let tunnel = match &args.tunnel {
        // Absolute: a server runs in its database's directory (or `/`).
        Some(t) => std::path::absolute(t)?,
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("tunnel"),
    };
    ensure!(
        tunnel.exists(),
        "{} not found: build it with `cargo build --release -p tunnel -p tunnel-bench`, or pass --tunnel",
        tunnel.display()
    );
    if args.parked.max(args.parked_compat) > 0 {
        // The bench's own sockets, the server's (the child inherits the limit), and spare.
        server::raise_nofile(args.parked.max(args.parked_compat) as u64 + 1_024)?;
    }
    let tmp;
    let pg = args.database.as_deref().filter(|d| db::is_postgres(d));
    ensure!(
        args.servers >= 1 && (args.servers == 1 || pg.is_some()),
        "--servers above 1 needs a PostgreSQL --database (servers share it)"
    );
    let db = match &args.database {
        Some(_) if pg.is_some() => PathBuf::new(),
        // Absolute: the server runs in the database's directory.
        Some(p) => std::path::absolute(p)?,
        None => {
            tmp = tempfile::Builder::new().prefix("tunnel-bench-").tempdir()?;
            tmp.path().join("bench.db")
        }
    };
    let fresh = async |tag: &str, suffix: &str| -> Result<db::BenchDb> {
        match pg {
            Some(url) => db::BenchDb::postgres(url, tag).await,
            None => db::BenchDb::sqlite(&with_suffix(&db, suffix)),
        }
    };
    let durability = args.durability.as_str();

    let mut report = Report {
        durability: args.durability,
        database: if pg.is_some() {
            "PostgreSQL"
        } else {
            "SQLite on disk"
        },
        servers: args.servers,
        machine: machine(),
        rss_idle: 0,
        dispatch: None,
        dispatch_idle: Vec::new(),
        node: None,
        node_skipped: None,
        cycle: None,
        parked: None,
        parked_compat: None,
        wal: None,
        runner: None,
        approvals: None,
        flood: None,
        wan: None,
        total_s: 0.0,
        load_before: loadavg(),
        load_after: String::new(),
    };

    // Phases 1–3 and 5 on one server.
    if args.dispatch > 0
        || args.gap_dispatch > 0
        || args.node_dispatch > 0
        || args.tasks > 0
        || args.runner_tasks > 0
        || args.approvals > 0
    {
        let db13 = fresh("main", "").await?;
        progress(&format!(
            "starting {} x {} on {} (durability {durability})",
            args.servers,
            tunnel.display(),
            db13.describe()
        ));
        let mut servers = Vec::with_capacity(args.servers);
        for _ in 0..args.servers {
            servers.push(ServerProcess::start(&tunnel, &db13, durability, TOKEN).await?);
        }
        let server = &servers[0];
        let wal_watch = match &db13 {
            db::BenchDb::Sqlite(p) => Some(watch_wal(p)),
            db::BenchDb::Postgres { .. } => None,
        };
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        report.rss_idle = server.memory()?.rss;
        let mut expected = 0;
        if args.dispatch > 0 {
            progress(&format!("1. dispatch latency over {} tasks", args.dispatch));
            report.dispatch =
                Some(phases::dispatch(&servers, TOKEN, args.dispatch, Duration::ZERO).await?);
            expected += args.dispatch as u64;
        }
        if args.gap_dispatch > 0 {
            for gap in args.dispatch_gaps.iter().filter(|g| **g > 0) {
                progress(&format!(
                    "1b. dispatch latency over {} tasks, {gap} ms idle before each",
                    args.gap_dispatch
                ));
                report.dispatch_idle.push(
                    phases::dispatch(
                        &servers,
                        TOKEN,
                        args.gap_dispatch,
                        Duration::from_millis(*gap),
                    )
                    .await?,
                );
                expected += args.gap_dispatch as u64;
            }
        }
        if args.node_dispatch > 0 && !args.node_gaps.is_empty() {
            match node::find_node(&args.node).await {
                Ok(()) => {
                    progress(&format!(
                        "1c. Node client: {} dispatches per API and gap ({:?} ms)",
                        args.node_dispatch, args.node_gaps
                    ));
                    report.node = Some(
                        node::dispatch(
                            server,
                            &args.node,
                            TOKEN,
                            args.node_dispatch,
                            &args.node_gaps,
                        )
                        .await?,
                    );
                    expected += 2 * (args.node_dispatch * args.node_gaps.len()) as u64;
                }
                Err(why) => {
                    progress(&format!("1c. Node client skipped: {why}"));
                    report.node_skipped = Some(why);
                }
            }
        }
        if args.tasks > 0 {
            progress(&format!(
                "2. full cycle: {} tasks, {} producers, {} runners, {} events per task ({} in \
                 the finish), {}",
                args.tasks,
                args.producers,
                args.runners,
                args.events,
                args.events_in_finish.min(args.events),
                if args.ack_in_claim {
                    "claims with ack"
                } else {
                    "ack apart"
                }
            ));
            let p = CycleParams {
                tasks: args.tasks,
                producers: args.producers,
                runners: args.runners,
                events: args.events,
                events_per_post: args.events_per_post.max(1),
                ack_in_claim: args.ack_in_claim,
                events_in_finish: args.events_in_finish,
            };
            report.cycle = Some(phases::full_cycle(&servers, TOKEN, &p).await?);
            expected += args.tasks;
        }
        if args.runner_tasks > 0 {
            progress(&format!(
                "5. runner overhead: {} tasks, one at a time, real runner, trivial agent",
                args.runner_tasks
            ));
            report.runner = Some(runner::runner_overhead(server, TOKEN, args.runner_tasks).await?);
            expected += args.runner_tasks as u64;
        }
        if args.approvals > 0 {
            progress(&format!(
                "6. approval round trip: {} requests, one at a time",
                args.approvals
            ));
            report.approvals =
                Some(approvals::approval_round_trip(server, TOKEN, args.approvals).await?);
            expected += 1;
        }
        for s in servers {
            s.stop().await?;
        }
        if let (Some((stop, watcher)), db::BenchDb::Sqlite(path)) = (wal_watch, &db13) {
            stop.cancel();
            let peak_bytes = watcher.await?;
            let after_stop_bytes = wal_size(path);
            progress("7. restarting on the same database");
            let t0 = Instant::now();
            let again = ServerProcess::start(&tunnel, &db13, durability, TOKEN).await?;
            tunnel_client::Client::new(&again.url, TOKEN)?
                .health()
                .await
                .context("health after the restart")?;
            let restart_ms = t0.elapsed().as_secs_f64() * 1e3;
            // As after every start here: settled before it is stopped (a server older than
            // this bench took a SIGTERM in its first moments as a kill).
            tokio::time::sleep(Duration::from_secs(1)).await;
            again.stop().await?;
            report.wal = Some(WalReport {
                tasks: expected,
                peak_bytes,
                after_stop_bytes,
                restart_ms,
            });
        }
        let checked = phases::check_database(&db13, expected).await;
        db13.remove().await?;
        checked?;
    }

    // Phase 4 on a fresh server.
    if args.parked > 0 {
        let db4 = fresh("parked", "-parked").await?;
        progress(&format!(
            "4. {} parked long-polls, {} wakes (fresh server)",
            args.parked, args.wakes
        ));
        let server = ServerProcess::start(&tunnel, &db4, durability, TOKEN).await?;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let wakes = args.wakes.min(args.parked);
        let r = phases::parked(&server, TOKEN, args.parked, wakes).await?;
        if report.rss_idle == 0 {
            report.rss_idle = r.rss_idle;
        }
        report.parked = Some(r);
        server.stop().await?;
        let checked = phases::check_database(&db4, wakes as u64).await;
        db4.remove().await?;
        checked?;
    }
    // Phase 4b on a fresh server.
    if args.parked_compat > 0 {
        let db4b = fresh("compat", "-compat").await?;
        progress(&format!(
            "4b. {} parked polls on the original API, {} wakes (fresh server)",
            args.parked_compat, args.compat_wakes
        ));
        let server = ServerProcess::start(&tunnel, &db4b, durability, TOKEN).await?;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let wakes = args.compat_wakes.min(args.parked_compat);
        let r = compat::parked(&server, TOKEN, args.parked_compat, wakes).await?;
        report.parked_compat = Some(r);
        server.stop().await?;
        let checked = phases::check_database(&db4b, wakes as u64).await;
        db4b.remove().await?;
        checked?;
    }
    // Phase 8 on a fresh server: its flood stays queued, so there is no database check; each
    // measured task's finish must answer `succeeded`.
    if args.flood > 0 {
        let db7 = fresh("flood", "-flood").await?;
        progress(&format!(
            "8. claim and submit latency: empty queue, then {} unrelated tasks queued (fresh server)",
            args.flood
        ));
        let server = ServerProcess::start(&tunnel, &db7, durability, TOKEN).await?;
        let r = flood::flood(&server, TOKEN, args.flood, args.flood_samples).await;
        server.stop().await?;
        db7.remove().await?;
        report.flood = Some(r?);
    }
    // Phase 9 on a fresh server.
    if args.wan_tasks > 0 {
        let db9 = fresh("wan", "-wan").await?;
        progress(&format!(
            "9. over a link with {} ms each way: {} tasks, real `tunnel runner` process (fresh server)",
            args.wan_delay_ms, args.wan_tasks
        ));
        let server = ServerProcess::start(&tunnel, &db9, durability, TOKEN).await?;
        let r = wan::wan(
            &tunnel,
            &server,
            TOKEN,
            args.wan_tasks,
            Duration::from_millis(args.wan_delay_ms),
        )
        .await;
        server.stop().await?;
        let checked = match &r {
            Ok(_) => phases::check_database(&db9, args.wan_tasks as u64).await,
            Err(_) => Ok(()),
        };
        db9.remove().await?;
        report.wan = Some(r?);
        checked?;
    }
    report.total_s = started.elapsed().as_secs_f64();
    report.load_after = loadavg();
    progress("every task ended succeeded (checked in the database files)");

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn wal_size(db: &Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(wal).map_or(0, |m| m.len())
}

/// Samples the size of `db`'s WAL every 5 ms until cancelled; answers the largest seen.
fn watch_wal(
    db: &Path,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<u64>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let (db, until) = (db.to_path_buf(), stop.clone());
    let watcher = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = wal_size(&db).max(peak);
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(5)) => {}
                _ = until.cancelled() => return peak,
            }
        }
    });
    (stop, watcher)
}

fn with_suffix(db: &Path, suffix: &str) -> PathBuf {
    let stem = db
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match db.extension() {
        Some(e) => format!("{stem}{suffix}.{}", e.to_string_lossy()),
        None => format!("{stem}{suffix}"),
    };
    db.with_file_name(name)
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
    }
}

fn print_table(r: &Report) {
    let mut rows: Vec<(String, String, &str)> = Vec::new();
    if r.rss_idle > 0 {
        rows.push((
            "server RSS idle".into(),
            format!("{:.1} MiB", mib(r.rss_idle)),
            "<= 12 MiB",
        ));
    }
    if let Some(d) = &r.dispatch {
        rows.push((
            format!("1. dispatch p50/p90/p99/max (n={}, hot)", d.dispatch.n),
            d.dispatch.line(),
            "p50 <= 0.3 ms",
        ));
        rows.push((
            "   server's share: submit handler -> offer".into(),
            d.server.line(),
            "p50 <= 0.2 ms",
        ));
        if let (Some(across), Some(same)) = (&d.across, &d.same) {
            rows.push((
                format!("   submitted to another server (n={})", across.n),
                across.line(),
                "",
            ));
            rows.push((
                format!("   submitted to the poll's server (n={})", same.n),
                same.line(),
                "",
            ));
        }
        rows.push((
            "   submit round trip p50/p99".into(),
            format!(
                "{} / {} ms",
                ms(d.submit_rtt.p50_ms),
                ms(d.submit_rtt.p99_ms)
            ),
            "",
        ));
    }
    for d in &r.dispatch_idle {
        rows.push((
            format!(
                "1b. dispatch, {} ms idle before each (n={})",
                d.gap_ms, d.dispatch.n
            ),
            d.dispatch.line(),
            "",
        ));
        rows.push((
            "   server's share: submit handler -> offer".into(),
            d.server.line(),
            "p50 <= 0.2 ms",
        ));
        if let Some(h) = &d.health {
            rows.push((
                format!("   GET /health after {} ms idle", d.gap_ms),
                h.line(),
                "",
            ));
        }
    }
    if let Some(n) = &r.node {
        for g in &n.gaps {
            let gap = if g.gap_ms == 0 {
                "hot".to_owned()
            } else {
                format!("{} ms idle", g.gap_ms)
            };
            rows.push((
                format!(
                    "1c. Node {}, {gap}: GET /worker/poll (n={})",
                    n.node, g.compat.n
                ),
                g.compat.line(),
                "p50 <= 1.5x /health",
            ));
            rows.push((
                format!("   Node, {gap}: POST /v1/claim"),
                g.v1.line(),
                "p50 <= 1.5x /health",
            ));
            rows.push((format!("   Node, {gap}: GET /health"), g.health.line(), ""));
            rows.push((
                "   p50 over /health: original API / v1".into(),
                format!(
                    "{:.2}x / {:.2}x",
                    g.compat.p50_ms / g.health.p50_ms,
                    g.v1.p50_ms / g.health.p50_ms
                ),
                "<= 1.5x",
            ));
        }
    }
    if let Some(why) = &r.node_skipped {
        rows.push(("1c. Node client".into(), format!("skipped: {why}"), ""));
    }
    if let Some(c) = &r.cycle {
        rows.push((
            format!(
                "2. full cycle ({} tasks, P={} C={}, {} req/task{}{})",
                c.tasks,
                c.producers,
                c.runners,
                c.http_requests_per_task,
                match (c.ack_in_claim, c.events_in_finish) {
                    (true, 0) => ", ack in claim".to_owned(),
                    (true, k) => format!(", ack in claim, {k} events in finish"),
                    (false, 0) => ", ack apart".to_owned(),
                    (false, k) => format!(", ack apart, {k} events in finish"),
                },
                if c.servers > 1 {
                    format!(", {} servers", c.servers)
                } else {
                    String::new()
                }
            ),
            format!("{:.0} tasks/s ({:.1} s)", c.tasks_per_s, c.wall_s),
            ">= 2,500 tasks/s",
        ));
        rows.push((
            "   server CPU per task".into(),
            format!(
                "{:.0} us ({:.2} cores busy), of which the SQLite writer {:.0} us",
                c.server_cpu_us_per_task, c.server_cores, c.writer_cpu_us_per_task
            ),
            "<= 300 us",
        ));
        rows.push((
            "   bench CPU per task (same machine)".into(),
            format!("{:.0} us", c.bench_cpu_us_per_task),
            "",
        ));
        rows.push((
            "   submit / claim round trip p50/p99".into(),
            format!(
                "{} / {} ms, {} / {} ms",
                ms(c.submit_rtt.p50_ms),
                ms(c.submit_rtt.p99_ms),
                ms(c.claim_rtt.p50_ms),
                ms(c.claim_rtt.p99_ms)
            ),
            "",
        ));
        rows.push((
            "3. server RSS before / peak / after / after 2 s".into(),
            format!(
                "{:.1} / {:.1} / {:.1} / {:.1} MiB",
                mib(c.rss_before),
                mib(c.rss_peak),
                mib(c.rss_after),
                mib(c.rss_after_2s)
            ),
            "peak <= 50 MiB",
        ));
    }
    if let Some(p) = &r.parked {
        rows.push((
            format!("4. {} parked polls: RSS idle / parked", p.parked),
            format!("{:.1} / {:.1} MiB", mib(p.rss_idle), mib(p.rss_parked)),
            "<= 150 MiB",
        ));
        rows.push((
            "   time / server CPU to park them".into(),
            format!(
                "{:.1} s / {:.0} us per poll",
                p.park_s, p.park_cpu_us_per_poll
            ),
            "",
        ));
        rows.push((
            format!("   wake p50/p90/p99/max (n={})", p.wake.n),
            p.wake.line(),
            "p99 <= 10 ms",
        ));
    }
    if let Some(p) = &r.parked_compat {
        rows.push((
            format!(
                "4b. {} parked GET /worker/poll: RSS idle / parked",
                p.parked
            ),
            format!("{:.1} / {:.1} MiB", mib(p.rss_idle), mib(p.rss_parked)),
            "<= 100 MiB",
        ));
        rows.push((
            "   time / server CPU to park them".into(),
            format!(
                "{:.1} s / {:.0} us per poll",
                p.park_s, p.park_cpu_us_per_poll
            ),
            "",
        ));
        rows.push((
            format!("   wake p50/p90/p99/max (n={})", p.wake.n),
            p.wake.line(),
            "",
        ));
    }
    match &r.runner {
        Some(o) => {
            rows.push((
                format!(
                    "5. runner: offer -> agent started p50/p90/p99/max (n={})",
                    o.tasks
                ),
                o.offer_to_start.line(),
                "<= 5 ms",
            ));
            rows.push((
                "   runner: agent exit -> finish acknowledged".into(),
                o.exit_to_finish.line(),
                "<= 5 ms",
            ));
            rows.push((
                "   submit -> task read back done".into(),
                o.submit_to_done.line(),
                "",
            ));
        }
        None => rows.push(("5. runner overhead".into(), "skipped".into(), "")),
    }
    if let Some(a) = &r.approvals {
        rows.push((
            format!("6. approval: ask -> event on the stream (n={})", a.requests),
            a.ask_to_event.line(),
            "",
        ));
        rows.push((
            "   ask round trip / ask -> listed pending".into(),
            format!(
                "{} / {} ms p50, {} / {} ms p99",
                ms(a.ask_rtt.p50_ms),
                ms(a.ask_to_listed.p50_ms),
                ms(a.ask_rtt.p99_ms),
                ms(a.ask_to_listed.p99_ms)
            ),
            "",
        ));
        rows.push((
            "   answer -> the runner's wait returns".into(),
            a.answer_to_runner.line(),
            "",
        ));
        rows.push((
            "   answer round trip / answer -> event".into(),
            format!(
                "{} / {} ms p50, {} / {} ms p99",
                ms(a.answer_rtt.p50_ms),
                ms(a.answer_to_event.p50_ms),
                ms(a.answer_rtt.p99_ms),
                ms(a.answer_to_event.p99_ms)
            ),
            "",
        ));
        rows.push((
            "   server's share: ask -> event + answer -> runner, p50 / p99".into(),
            format!(
                "{} / {} ms",
                ms(a.ask_to_event.p50_ms + a.answer_to_runner.p50_ms),
                ms(a.ask_to_event.p99_ms + a.answer_to_runner.p99_ms)
            ),
            "<= 50 ms",
        ));
    }
    if let Some(f) = &r.flood {
        rows.push((
            format!(
                "8. claim p50/p90/p99/max, empty queue (n={})",
                f.empty.claim.n
            ),
            f.empty.claim.line(),
            "",
        ));
        rows.push((
            format!("   claim, {} unrelated tasks queued", f.flood),
            f.flooded.claim.line(),
            "<= 2x the empty queue",
        ));
        rows.push((
            "   submit with 8 re-polling runners, empty queue".into(),
            f.empty.submit.line(),
            "",
        ));
        rows.push((
            format!("   submit with 8 re-polling runners, {} queued", f.flood),
            f.flooded.submit.line(),
            "<= 2x the empty queue",
        ));
        rows.push((
            "   time to queue the flood".into(),
            format!("{:.1} s", f.seed_s),
            "",
        ));
    }

    if let Some(w) = &r.wan {
        let d = w.one_way_ms;
        rows.push((
            format!(
                "9. WAN ({d} ms each way): submit -> agent started (n={})",
                w.tasks
            ),
            w.submit_to_start.line(),
            "p50 <= one-way + 10 ms",
        ));
        rows.push((
            "   of which: offer logged -> agent started".into(),
            w.offer_to_start.line(),
            "",
        ));
        rows.push((
            "   agent line -> SSE watcher beside the server".into(),
            w.line_to_watcher.line(),
            "p50 <= one-way + 50 ms",
        ));
        rows.push((
            "   agent line -> SSE watcher across the link".into(),
            w.line_to_remote_watcher.line(),
            "",
        ));
        rows.push((
            "   agent exit -> task finished on the server".into(),
            w.exit_to_finished.line(),
            "p50 <= one-way + 10 ms",
        ));
        rows.push((
            "   submit -> task read back done".into(),
            w.submit_to_done.line(),
            "",
        ));
    }
    if let Some(w) = &r.wal {
        rows.push((
            format!("7. SQLite WAL: peak over {} tasks / after SIGTERM", w.tasks),
            format!(
                "{:.1} MiB / {} bytes",
                mib(w.peak_bytes),
                w.after_stop_bytes
            ),
            "<= 64 MiB (10,000+ tasks)",
        ));
        rows.push((
            "   restart on it: start -> /health answered".into(),
            format!("{:.0} ms", w.restart_ms),
            "",
        ));
    }

    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    let durability = if r.database == "PostgreSQL" {
        "the PostgreSQL server's own settings".to_owned()
    } else {
        format!("durability {}", r.durability.as_str())
    };
    let servers = if r.servers > 1 {
        format!(" ({} servers on one database)", r.servers)
    } else {
        String::new()
    };
    println!(
        "tunnel-bench: {} x {}, {}{servers}, {durability}, {:.0} s",
        r.machine.cpus, r.machine.cpu_model, r.database, r.total_s
    );
    println!(
        "load average before: {}, after: {} (other work on the machine skews the figures)",
        r.load_before, r.load_after
    );
    println!("{:<w0$}  {:<w1$}  target", "measure", "result");
    println!("{}  {}  {}", "-".repeat(w0), "-".repeat(w1), "-".repeat(24));
    for (a, b, c) in rows {
        println!("{a:<w0$}  {b:<w1$}  {c}");
    }
}
