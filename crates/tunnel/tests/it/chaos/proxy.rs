//! A TCP proxy on loopback between runners and the server that can cut the link in the ways a
//! real network does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Bytes flow both ways.
    Pass,
    /// Nothing flows, nothing is refused: connections (old and new) hang, as when packets are
    /// dropped. Held bytes flow again when the mode changes back to `Pass` (TCP retransmits).
    Blackhole,
    /// New connections are reset at once.
    Refuse,
    /// Requests reach the server, but each connection is cut as soon as the server's answer
    /// starts: the client never learns the outcome (a lost ack, a lost finish answer).
    LoseAnswers,
    /// Like `LoseAnswers`, only for connections whose request contains this text (e.g.
    /// `/ack HTTP`).
    LoseAnswersTo(&'static str),
}

#[derive(Clone)]
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    mode: Arc<watch::Sender<(Mode, u64)>>,
    /// Connections cut so far (by `cut` or `LoseAnswers`).
    pub(crate) cut_count: Arc<AtomicUsize>,
}

impl Proxy {
    pub(crate) async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel((Mode::Pass, 0u64));
        let cut_count = Arc::new(AtomicUsize::new(0));
        let cuts = cut_count.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = rx.clone();
                let cuts = cuts.clone();
                tokio::spawn(async move { connection(client, upstream, rx, cuts).await });
            }
        });
        Proxy {
            addr,
            mode: Arc::new(tx),
            cut_count,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn set(&self, mode: Mode) {
        self.mode.send_modify(|m| m.0 = mode);
    }

    /// Drops every open connection (both sides see it closed).
    pub(crate) fn cut(&self) {
        self.mode.send_modify(|m| m.1 += 1);
    }
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mut rx: watch::Receiver<(Mode, u64)>,
    cuts: Arc<AtomicUsize>,
) {
    let generation = rx.borrow().1;
    // A connection attempt during a blackhole hangs until the link is back.
    loop {
        let m = rx.borrow_and_update().0;
        match m {
            Mode::Refuse => {
                #[allow(deprecated)] // a zero linger only makes the close a reset
                let _ = client.set_linger(Some(std::time::Duration::ZERO));
                return;
            }
            Mode::Blackhole => {
                if rx.changed().await.is_err() {
                    return;
                }
            }
            Mode::Pass | Mode::LoseAnswers | Mode::LoseAnswersTo(_) => break,
        }
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let doomed = AtomicBool::new(false);
    let up = pump(&mut cr, &mut sw, rx.clone(), generation, false, &doomed);
    let down = pump(&mut sr, &mut cw, rx.clone(), generation, true, &doomed);
    let cut = tokio::select! {
        c = up => c,
        c = down => c,
    };
    if cut {
        cuts.fetch_add(1, Ordering::Relaxed);
    }
    // Dropping all four halves closes both connections.
}

/// Copies `from` → `to` while the link allows; returns whether the connection was cut.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    mut rx: watch::Receiver<(Mode, u64)>,
    generation: u64,
    answers: bool,
    doomed: &AtomicBool,
) -> bool
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Wait while blackholed; stop if cut.
        loop {
            let (m, g) = *rx.borrow_and_update();
            if g != generation {
                return true;
            }
            if m != Mode::Blackhole {
                break;
            }
            if rx.changed().await.is_err() {
                return true;
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            },
            _ = rx.changed() => continue,
        };
        // Bytes read during a blackhole are held until it ends (or the connection is cut).
        loop {
            let (m, g) = *rx.borrow_and_update();
            if g != generation {
                return true;
            }
            if let Mode::LoseAnswersTo(what) = m
                && !answers
                && buf[..n].windows(what.len()).any(|w| w == what.as_bytes())
            {
                doomed.store(true, Ordering::Relaxed);
            }
            if answers && (m == Mode::LoseAnswers || doomed.load(Ordering::Relaxed)) {
                return true;
            }
            if m != Mode::Blackhole {
                break;
            }
            if rx.changed().await.is_err() {
                return true;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return false;
        }
    }
}
