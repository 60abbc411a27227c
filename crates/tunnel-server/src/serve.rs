//! Accepting connections and serving HTTP/1.1 on them with hyper directly.
//!
//! `axum::serve` would do, but it serves every connection through hyper-util's HTTP/1-or-2
//! builder with hyper's default buffers. A parked long-poll is an idle connection that lives
//! for up to a minute, and 10,000 of them are a normal load, so what one connection costs
//! matters: here each is a plain HTTP/1 connection (tunnel speaks nothing else) and its
//! future stays small (docs/BENCHMARKS.md has the measurements).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Serves `router` until `shutdown` is cancelled, then lets every open connection finish its
/// request in flight (long-polls end at once: they watch the same token) and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // As `axum::serve` had it: no timer, so no header read timeout.
    http.header_read_timeout(None);
    let http = Arc::new(http);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: a busy loop would not help.
                    tracing::error!(error = %e, "Accepting a connection failed; retrying in 1 s.");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let (http, router, shutdown) = (http.clone(), router.clone(), shutdown.clone());
        connections.spawn(async move {
            // Made inside the task, so the task holds one connection, not a moved-from copy
            // as well (each is over 600 bytes; an idle long-poll is mostly this).
            let service = TowerToHyperService::new(router);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = shutdown.cancelled() => {}
            }
            // Finish the request in flight, then close.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors of one incoming connection (the client gave up before it was accepted), not of the
/// listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
