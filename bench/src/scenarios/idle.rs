//! Idle memory: open many connections through the target, one 64-byte exchange on each, hold
//! them all, and compare the proxy's resident memory before and after.
//!
//! The count is 10,000 unless the bench's descriptor limit is lower (the bench holds both ends:
//! client and backend sockets), and smaller for socat, which forks a process per connection; the
//! report header says when the count was cut. Connections are opened one after another (each
//! exchange completes before the next connect) until the count is reached, an error streak, or a
//! time cap. "bytes/pair" is (RSS after - RSS before) / connections held: what one idle
//! client-server pair costs the proxy, including buffers it did not give back.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::{message, Metrics, Under, MESSAGE};
use crate::report::Column;
use crate::targets::Kind;

pub const COLUMNS: &[Column] = &[
    Column::plain("conns", "conns held", 0),
    Column::cpu("rss_before", "RSS before MiB", 1),
    Column::cpu("rss_after", "RSS after MiB", 1),
    Column::cpu("bytes_per_pair", "bytes/pair", 0),
    Column::cpu("us_per_conn", "CPU µs/conn setup", 1),
    Column::plain("procs", "processes", 0),
    Column::plain("errors", "errors", 0),
];

/// Consecutive failed connections after which opening stops.
const ERROR_STREAK: u32 = 50;
/// Time for the proxy to settle before RSS is read.
const SETTLE: Duration = Duration::from_millis(300);
const MIB: f64 = 1024.0 * 1024.0;

pub fn run(under: &Under) -> Result<Metrics, String> {
    let target = if under.target.kind == Kind::Socat {
        under.settings.socat_idle_conns
    } else {
        under.settings.idle_conns
    };
    // Opening is sequential; allow far more time than it should take, but never unbounded.
    let cap = Duration::from_secs_f64((4.0 * under.settings.seconds).max(20.0));
    std::thread::sleep(SETTLE);
    let before = under.target.rss();
    let cpu0 = under.target.cpu_seconds();
    let start = Instant::now();
    let mut held = Vec::with_capacity(target);
    let (mut errors, mut streak) = (0u64, 0u32);
    while held.len() < target && start.elapsed() < cap && streak < ERROR_STREAK {
        let seq = held.len() as u64;
        let opened = super::rr::connect(under).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            let out = message(seq);
            let mut reply = [0u8; MESSAGE];
            s.write_all(&out)
                .and_then(|_| s.read_exact(&mut reply))
                .map_err(|e| e.to_string())?;
            if reply != out {
                return Err("reply differs".to_string());
            }
            Ok(s)
        });
        match opened {
            Ok(s) => {
                held.push(s);
                streak = 0;
            }
            Err(_) => {
                errors += 1;
                streak += 1;
            }
        }
    }
    let cpu1 = under.target.cpu_seconds();
    std::thread::sleep(SETTLE);
    let after = under.target.rss();
    let mut m = Metrics::new();
    m.insert("conns", held.len() as f64);
    m.insert("errors", errors as f64);
    if let (Some((b, _)), Some((a, procs))) = (before, after) {
        m.insert("rss_before", b as f64 / MIB);
        m.insert("rss_after", a as f64 / MIB);
        m.insert("procs", procs as f64);
        if !held.is_empty() {
            m.insert("bytes_per_pair", (a as f64 - b as f64) / held.len() as f64);
        }
    }
    if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
        if !held.is_empty() {
            m.insert("us_per_conn", (c1 - c0).max(0.0) * 1e6 / held.len() as f64);
        }
    }
    drop(held);
    if m["conns"] == 0.0 {
        return Err(format!("no connection could be held ({errors} errors)"));
    }
    Ok(m)
}
