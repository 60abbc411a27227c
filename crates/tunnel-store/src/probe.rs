//! TEMPORARY (issue 19 §1 measurement): timestamps of one hot dispatch's stages, on with
//! `TUNNEL_PROBE=<file>`; percentiles appended to that file every 200 dispatches. Assumes one
//! dispatch at a time (the bench's phase 1).
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

pub const SUBMIT_START: usize = 0;
pub const QUEUED: usize = 1;
pub const PICKED: usize = 2;
pub const JOBS_RAN: usize = 3;
pub const HANDED: usize = 4;
pub const COMMITTED: usize = 5;
pub const ANSWERED: usize = 6;
pub const POLL_WOKEN: usize = 7;
pub const OFFER_BUILT: usize = 8;
pub const SUBMIT_WOKEN: usize = 9;
const N: usize = 10;
const NAMES: [&str; N] = [
    "submit_start",
    "queued",
    "picked",
    "jobs_ran",
    "handed",
    "committed",
    "answered",
    "poll_woken",
    "offer_built",
    "submit_woken",
];

struct P {
    base: Instant,
    file: String,
    stamps: [AtomicU64; N],
    rows: Mutex<Vec<[i64; N]>>,
}

fn p() -> Option<&'static P> {
    static ON: OnceLock<Option<P>> = OnceLock::new();
    ON.get_or_init(|| {
        std::env::var("TUNNEL_PROBE").ok().map(|file| P {
            base: Instant::now(),
            file,
            stamps: Default::default(),
            rows: Mutex::new(Vec::new()),
        })
    })
    .as_ref()
}

pub fn stamp(i: usize) {
    if let Some(p) = p() {
        p.stamps[i].store(p.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Ends one dispatch (at the offer): deltas from the submit's start.
pub fn done() {
    let Some(p) = p() else { return };
    let s: Vec<u64> = p.stamps.iter().map(|a| a.swap(0, Ordering::Relaxed)).collect();
    let t0 = s[SUBMIT_START] as i64;
    let mut row = [0i64; N];
    for i in 0..N {
        row[i] = if s[i] == 0 { -1 } else { s[i] as i64 - t0 };
    }
    let mut rows = p.rows.lock().unwrap();
    rows.push(row);
    if rows.len() >= 200 {
        let mut out = String::from("stage: p50 p90 (us from submit start; n)\n");
        for (i, name) in NAMES.iter().enumerate() {
            let mut v: Vec<i64> = rows.iter().map(|r| r[i]).filter(|x| *x >= 0).collect();
            v.sort();
            if v.is_empty() {
                continue;
            }
            out += &format!(
                "{name:>13}: {:>7.1} {:>7.1} ({})\n",
                v[v.len() / 2] as f64 / 1e3,
                v[v.len() * 9 / 10] as f64 / 1e3,
                v.len()
            );
        }
        rows.clear();
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.file)
        {
            let _ = f.write_all(out.as_bytes());
        }
    }
}
