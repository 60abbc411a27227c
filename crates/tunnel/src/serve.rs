//! `tunnel serve`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result, bail};
use tunnel_server::{Server, ServerConfig};
use tunnel_store::{Database, Durability, QueueSettings};

use crate::cli::{DurabilityArg, LogFormat, ServeArgs};
use crate::config::{self, FileConfig};

const DEFAULT_PORT: u16 = 3456;

/// A bound server, ready to run.
pub(crate) struct Prepared {
    pub(crate) server: Server,
    /// Held while the process lives: one server per SQLite file.
    pub(crate) _db_lock: Option<std::fs::File>,
}

pub(crate) async fn serve(args: ServeArgs, file: FileConfig) -> Result<()> {
    // Registered before the server says where it listens: a SIGTERM sent as soon as it
    // answers is a clean stop (checkpointed, closed), not the default kill.
    let signals = stop_signals();
    let prepared = prepare(args, file, false).await?;
    release_startup_pages();
    let server = prepared.server;
    let token = server.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal(signals).await;
        tracing::info!("Shutting down: finishing in-flight requests.");
        token.cancel();
    });
    server.run().await.context("the server failed")?;
    tracing::info!("Server stopped.");
    Ok(())
}

/// Start-up is over: the code only it ran need not stay resident (src/resident.rs).
pub(crate) fn release_startup_pages() {
    if let Some(bytes) = crate::resident::release_startup_pages() {
        tracing::debug!(
            kib = bytes / 1024,
            "Dropped the start-up pages of the binary and its libraries from memory."
        );
    }
}

/// Reads the configuration, starts logging, opens the store, binds, and makes the first admin
/// token on a fresh install.
/// `local_runner`: `tunnel up`, which runs a runner beside the server (and says so itself).
pub(crate) async fn prepare(
    args: ServeArgs,
    file: FileConfig,
    local_runner: bool,
) -> Result<Prepared> {
    let f = file.server;
    let log_format = match (args.log_format, f.log_format.as_deref()) {
        (Some(l), _) => l,
        (None, None | Some("text")) => LogFormat::Text,
        (None, Some("json")) => LogFormat::Json,
        (None, Some(other)) => bail!("log_format {other:?} in the config file is not text or json"),
    };
    init_logging(log_format);
    let connections = connection_limits(&args, &f)?;

    let listen = listen_addr(args.listen.or(f.listen), args.port)?;
    let durability = match (args.durability, f.durability.as_deref()) {
        (Some(DurabilityArg::Full), _) | (None, Some("full")) => Durability::Full,
        (Some(DurabilityArg::Normal), _) | (None, None | Some("normal")) => Durability::Normal,
        (None, Some(other)) => {
            bail!("durability {other:?} in the config file is not normal or full")
        }
    };
    // Flag or TUNNEL_DATABASE, then DATABASE_URL (the usual name for a PostgreSQL URL), then
    // the config file.
    let db_arg = args
        .database
        .or_else(|| std::env::var("DATABASE_URL").ok().filter(|d| !d.is_empty()))
        .or(f.database);
    let database = match db_arg {
        Some(d) => Database::parse(&d).map_err(anyhow::Error::msg)?,
        None => Database::Sqlite {
            path: config::data_dir().join("tunnel.db"),
            durability,
        },
    };
    let mut db_lock = None;
    let database = match database {
        Database::Sqlite { path, .. } => {
            if let Some(dir) = path.parent() {
                config::private_dir(dir)?;
            }
            db_lock = Some(lock_database(&path)?);
            Database::Sqlite { path, durability }
        }
        pg @ Database::Postgres { .. } => pg,
    };

    let worker_token = std::env::var("WORKER_TOKEN").ok().filter(|t| !t.is_empty());
    let mut cfg = ServerConfig::new(listen, database.clone());
    cfg.worker_token = worker_token.clone();
    // Bot tokens come from the environment only (CALLBACK_BOT_TOKEN, TELEGRAM_BOT_TOKEN, …).
    cfg.delivery = tunnel_delivery::PlatformsConfig::from_env();
    if let Some(b) = args.max_body_bytes.or(f.max_body_bytes) {
        if b < 1024 {
            bail!("max body bytes must be at least 1024");
        }
        cfg.max_body_bytes = b;
    }
    if let Some(ms) = args.max_wait_ms {
        cfg.max_wait_ms = ms.min(tunnel_protocol::limits::WAIT_MAX_MS);
    }
    let defaults = QueueSettings::default();
    cfg.queue = QueueSettings {
        ack_timeout_ms: secs_ms("ack timeout", args.ack_timeout.or(f.ack_timeout_secs))?
            .unwrap_or(defaults.ack_timeout_ms),
        lease_ms: secs_ms("lease", args.lease.or(f.lease_secs))?.unwrap_or(defaults.lease_ms),
        runner_online_ms: defaults.runner_online_ms,
        max_queue_ms: match args.max_queue_time.or(f.max_queue_time) {
            Some(d) => parse_duration("max queue time", &d)?,
            None => defaults.max_queue_ms,
        },
        max_queued_per_token: match args.max_queued_per_token.or(f.max_queued_per_token) {
            Some(0) => None,
            Some(n) => Some(n),
            None => defaults.max_queued_per_token,
        },
        max_task_events: match args.max_task_events.or(f.max_task_events) {
            Some(n) if n < 100 => {
                bail!("--max-task-events (max_task_events) must be at least 100, not {n}")
            }
            Some(n) => n,
            None => defaults.max_task_events,
        },
        max_task_event_bytes: match args.max_task_event_bytes.or(f.max_task_event_bytes) {
            Some(n) if n < 65_536 => bail!(
                "--max-task-event-bytes (max_task_event_bytes) must be at least 65536, not {n}"
            ),
            Some(n) => n,
            None => defaults.max_task_event_bytes,
        },
    };
    cfg.connections = connections;
    if let Some(n) = args.max_polls_per_token.or(f.max_polls_per_token) {
        if n == 0 {
            bail!("--max-polls-per-token (max_polls_per_token) must be at least 1");
        }
        cfg.max_polls_per_token = n;
    }
    if let Some(r) = args.retention.or(f.retention) {
        cfg.retain_finished_ms = parse_retention(&r)?;
        // Look often enough that nothing outlives its retention by more than a tenth.
        if let Some(ms) = cfg.retain_finished_ms {
            cfg.prune_every = cfg
                .prune_every
                .min(std::time::Duration::from_millis((ms / 10).max(1_000) as u64));
        }
    }

    let server = match Server::bind(cfg).await {
        Ok(s) => s,
        Err(tunnel_server::StartError::Bind { addr, source })
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            bail!(
                "cannot listen on {addr}: the port is in use; another tunnel may be running (`tunnel doctor`); use --port to pick another"
            )
        }
        Err(e) => return Err(anyhow::Error::new(e).context("cannot start the server")),
    };
    if worker_token.is_none()
        && let Some(token) = server.bootstrap_admin_token().await?
    {
        let file = config::local_admin_token_path();
        write_private(&file, &token)?;
        let next = if local_runner {
            ""
        } else {
            "This server has no runner of its own (`tunnel up` has one): make a runner token\n\
             with `tunnel token create --role runner --name NAME` and start `tunnel runner` with it\n\
             where the agent CLIs are (`tunnel init --scenario runner` sets that machine up).\n\
             Tasks wait in the queue until a runner takes them.\n"
        };
        eprintln!(
            "\nCreated the first admin token and saved it to {} (only you can read it).\n\
             The tunnel CLI on this machine uses it automatically.\n{next}",
            file.display()
        );
    }

    let addr = server.local_addr();
    // Which server the saved admin token belongs to: the CLI sends it nowhere else.
    let mut local = addr;
    if local.ip().is_unspecified() {
        local.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    if let Err(e) = write_private(
        &config::local_admin_server_path(),
        &format!("http://{local}"),
    ) {
        tracing::warn!(error = %e, "Cannot record this server's address for the local CLI.");
    }
    let shown = match &database {
        Database::Sqlite { path, .. } => path.display().to_string(),
        Database::Postgres { url } => redact_url(url),
    };
    tracing::info!(address = %addr, database = %shown, "Tunnel server listening.");

    Ok(Prepared {
        server,
        _db_lock: db_lock,
    })
}

/// Takes `<database>.lock` for this process (released when it exits, however it exits), so
/// a second server on the same SQLite file is refused instead of fighting over it.
fn lock_database(db: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::path::PathBuf::from(format!("{}.lock", db.display()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let pid = holder.trim();
            let who = if pid.is_empty() {
                "another tunnel".to_owned()
            } else {
                format!("another tunnel (pid {pid})")
            };
            bail!(
                "{who} is already serving the database {}: two servers on one SQLite file would \
                 undo each other's work. Stop it first (or use it: `tunnel doctor`); to run several \
                 servers, give them one PostgreSQL database (--database postgres://…)",
                db.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    // Who holds it, for the next one's message.
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// Open files kept for the database, logs and outgoing connections, outside the connection
/// cap.
const FD_RESERVE: u64 = 128;

/// The connection limits (flag, environment, then config file), the cap fitted under the
/// open-file limit (raised to its hard limit first).
fn connection_limits(
    args: &ServeArgs,
    f: &config::ServerSection,
) -> Result<tunnel_server::ConnectionLimits> {
    let mut limits = tunnel_server::ConnectionLimits::default();
    let timeout = |what: &str, secs: Option<u64>, default: std::time::Duration| match secs {
        None => Ok(default),
        Some(s) if (1..=3600).contains(&s) => Ok(std::time::Duration::from_secs(s)),
        Some(s) => Err(anyhow::anyhow!(
            "{what} of {s} s is out of range (1 to 3600 seconds)"
        )),
    };
    limits.header_timeout = timeout(
        "--header-timeout (header_timeout_secs)",
        args.header_timeout.or(f.header_timeout_secs),
        limits.header_timeout,
    )?;
    limits.idle_timeout = timeout(
        "--idle-timeout (idle_timeout_secs)",
        args.idle_timeout.or(f.idle_timeout_secs),
        limits.idle_timeout,
    )?;
    limits.write_timeout = timeout(
        "--write-timeout (write_timeout_secs)",
        args.write_timeout.or(f.write_timeout_secs),
        limits.write_timeout,
    )?;
    let files = raise_open_file_limit();
    let fits = files.map(|n| n.saturating_sub(FD_RESERVE).max(16) as usize);
    limits.max_connections = match (args.max_connections.or(f.max_connections), fits) {
        (Some(0), _) => bail!("--max-connections (max_connections) must be at least 1"),
        (Some(n), Some(fits)) if n > fits => {
            tracing::warn!(
                max_connections = n,
                open_file_limit = files.unwrap_or_default(),
                using = fits,
                "max_connections is more than the open-file limit allows; using less. Raise LimitNOFILE (or ulimit -n)."
            );
            fits
        }
        (Some(n), _) => n,
        (None, Some(fits)) => fits.min(limits.max_connections),
        (None, None) => limits.max_connections,
    };
    Ok(limits)
}

/// Raises the soft open-file limit to the hard one (a service manager often starts processes
/// at 1,024) and returns the soft limit in force.
fn raise_open_file_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        // macOS refuses more than OPEN_MAX for an unlimited hard limit.
        let want = if cfg!(target_os = "macos") {
            hard.min(10_240)
        } else {
            hard
        };
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
            tracing::debug!(error = %e, "Cannot raise the open-file limit.");
        }
    }
    getrlimit(Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// `7d`, `12h`, `30m`, `90s` → milliseconds; `off` → keep forever.
fn parse_retention(s: &str) -> Result<Option<i64>> {
    parse_duration("retention", s)
}

/// A duration setting (7d, 12h, 30m, 90s) in milliseconds; "off" or "never": none.
fn parse_duration(what: &str, s: &str) -> Result<Option<i64>> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    let bad = || {
        anyhow::anyhow!(
            "{what} {s:?} is not a duration: use a number with s, m, h or d (e.g. 7d, 12h), or off"
        )
    };
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = num.parse().map_err(|_| bad())?;
    let unit_ms: i64 = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    if n == 0 {
        bail!("{what} must be more than 0 (use off for no limit)");
    }
    n.checked_mul(unit_ms).map(Some).ok_or_else(bad)
}

/// A database URL without its password, for logs.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    // `?password=…` in the query is a password too.
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            let masked = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{masked}@{host}{tail}")
        }
        None => format!("{scheme}://{authority}{tail}"),
    }
}

fn listen_addr(listen: Option<String>, port: Option<u16>) -> Result<SocketAddr> {
    let port = match port {
        Some(p) => Some(p),
        None => match std::env::var("WORKER_PORT") {
            Ok(p) if !p.is_empty() => Some(
                p.parse()
                    .with_context(|| format!("WORKER_PORT {p:?} is not a port number"))?,
            ),
            _ => None,
        },
    };
    let mut addr = match listen {
        Some(l) => parse_listen(&l).with_context(|| {
            format!("listen address {l:?} is not HOST:PORT (e.g. 0.0.0.0:3456 or localhost:3456)")
        })?,
        None => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT),
    };
    if let Some(p) = port {
        addr.set_port(p);
    }
    Ok(addr)
}

/// `IP:PORT`, `IP`, `HOST:PORT` or `HOST` (a name such as localhost, resolved once; IPv4
/// first, as the CLI's default URL is 127.0.0.1).
fn parse_listen(l: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = l.parse::<SocketAddr>() {
        return Some(a);
    }
    if let Ok(ip) = l.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let with_port = if l
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        l.to_owned()
    } else {
        format!("{l}:{DEFAULT_PORT}")
    };
    let addrs: Vec<SocketAddr> = with_port.to_socket_addrs().ok()?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
}

fn secs_ms(what: &str, secs: Option<u64>) -> Result<Option<i64>> {
    match secs {
        None => Ok(None),
        Some(s) if (1..=3600).contains(&s) => Ok(Some(s as i64 * 1000)),
        Some(s) => bail!("{what} of {s} s is out of range (1 to 3600 seconds)"),
    }
}

/// Writes a secret readable by the owner only.
pub(crate) fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        config::private_dir(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // `mode` applies only to a new file: an existing one may have been readable by others.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", path.display()))?;
    writeln!(f, "{contents}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Colour only for a person at a terminal: not in a file or journald, not with NO_COLOR set
/// (no-color.org: any non-empty value).
pub(crate) fn colour(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

pub(crate) fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .event_format(crate::logjson::JsonLines::new())
            .init(),
    }
}

type StopSignals = (
    std::io::Result<tokio::signal::unix::Signal>,
    std::io::Result<tokio::signal::unix::Signal>,
);

/// SIGTERM and SIGINT, caught from now on.
fn stop_signals() -> StopSignals {
    use tokio::signal::unix::{SignalKind, signal};
    (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    )
}

async fn wait_for_signal((term, int): StopSignals) {
    let mut term = match term {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot listen for SIGTERM.");
            std::future::pending::<()>().await;
            return;
        }
    };
    match int {
        Ok(mut int) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "Cannot listen for SIGINT.");
            term.recv().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn retention_durations() {
        let p = super::parse_retention;
        assert_eq!(p("7d").unwrap(), Some(7 * 86_400_000));
        assert_eq!(p(" 12h ").unwrap(), Some(12 * 3_600_000));
        assert_eq!(p("30m").unwrap(), Some(1_800_000));
        assert_eq!(p("90s").unwrap(), Some(90_000));
        assert_eq!(p("off").unwrap(), None);
        for bad in ["", "7", "d", "7w", "-1d", "1.5h", "99999999999999999999d"] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains("not a duration"), "{bad}: {e}");
        }
        assert!(p("0d").unwrap_err().to_string().contains("off"));
    }

    #[test]
    fn database_urls_lose_their_passwords() {
        let r = super::redact_url;
        assert_eq!(
            r("postgres://u:secret@db:5432/t"),
            "postgres://u:***@db:5432/t"
        );
        assert_eq!(
            r("postgres://db/t?user=u&password=secret&sslmode=disable"),
            "postgres://db/t?user=u&password=***&sslmode=disable"
        );
        assert_eq!(r("postgres://u@db/t"), "postgres://u@db/t");
    }
}
