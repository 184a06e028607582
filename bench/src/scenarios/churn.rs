//! Churn: a new TCP connection per request. Each client thread loops: connect, send 64 bytes,
//! read the 64-byte echo, read to EOF, close. The backend closes first (`EchoClose`), so the
//! TIME_WAIT state stays on the listening side and the clients' ephemeral ports are not used up
//! within a run; through a proxy, the proxy's FIN to the client comes first for the same reason.
//!
//! Latency is connect-start to EOF: the whole life of one connection. Beside it, connect-start
//! to the first byte of the echo (`first byte`): the connect time a hop adds, which is what
//! pre-connected spares (`pool`) can save; the close that follows is not in it. Errors (refused, reset,
//! timed out, wrong reply) are counted and the loop goes on after a millisecond's pause, so a
//! broken target cannot turn the client into a busy loop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{add_percentiles, message, Flags, Metrics, Under, MAX_OPS, MESSAGE};
use crate::report::Column;
use crate::stats::Latencies;

pub const COLUMNS: &[Column] = &[
    Column::rate("cps", "conn/s", 0),
    Column::latency("p50", "p50 µs", 1),
    Column::latency("p99", "p99 µs", 1),
    Column::latency("p999", "p99.9 µs", 1),
    Column::latency("fb50", "first byte p50 µs", 1),
    Column::latency("fb99", "first byte p99 µs", 1),
    Column::cpu("cpu_pct", "proxy CPU %", 0),
    Column::cpu("us_per_conn", "CPU µs/conn", 1),
    Column::plain("errors", "errors", 0),
];

const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// One connection's life from `began`; the time to the echo's first byte if the reply was
/// right and the peer closed cleanly.
fn one(under: &Under, seq: u64, began: Instant) -> Option<Duration> {
    let mut s = TcpStream::connect_timeout(&under.addr(), IO_TIMEOUT).ok()?;
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let out = message(seq);
    let mut reply = [0u8; MESSAGE];
    s.write_all(&out).ok()?;
    // The first read returns as soon as any of the echo is in.
    let first = s.read(&mut reply).ok().filter(|&n| n > 0)?;
    let first_byte = began.elapsed();
    s.read_exact(&mut reply[first..]).ok()?;
    let mut rest = [0u8; 16];
    (reply == out && matches!(s.read(&mut rest), Ok(0))).then_some(first_byte)
}

fn client(
    under: &Under,
    flags: &Flags,
    id: u64,
    done: &AtomicU64,
    errors: &AtomicU64,
) -> (Latencies, Latencies) {
    let (mut lat, mut first) = (Latencies::new(), Latencies::new());
    let mut ops = 0u64;
    while flags.running() && ops < MAX_OPS {
        ops += 1;
        let t = Instant::now();
        if let Some(first_byte) = one(under, (id << 40) | ops, t) {
            if flags.measuring() {
                lat.record(t.elapsed());
                first.record(first_byte);
            }
            done.fetch_add(1, Ordering::Relaxed);
        } else if flags.running() {
            errors.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    (lat, first)
}

pub fn run(under: &Under, clients: usize) -> Result<Metrics, String> {
    let flags = under.flags();
    let done = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let (window, lat) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients as u64)
            .map(|id| {
                let (flags, done, errors) = (&flags, &done, &errors);
                scope.spawn(move || client(under, flags, id, done, errors))
            })
            .collect();
        let w = under.measure(&flags, || done.load(Ordering::Relaxed));
        flags.stop();
        let (mut all, mut first) = (Latencies::new(), Latencies::new());
        for h in handles {
            let (lat, fb) = h.join().unwrap_or_default();
            all.merge(lat);
            first.merge(fb);
        }
        (w, (all, first))
    });
    let (mut lat, mut first) = lat;
    let errors = errors.load(Ordering::Relaxed);
    if window.count == 0 {
        return Err(format!("no connection completed ({errors} errors)"));
    }
    let mut m = Metrics::new();
    m.insert("cps", window.rate());
    add_percentiles(&mut m, &mut lat);
    if let Some(p) = first.percentiles_us(&[50.0, 99.0]) {
        m.insert("fb50", p[0]);
        m.insert("fb99", p[1]);
    }
    window.add_cpu(&mut m, "us_per_conn", window.count as f64);
    m.insert("errors", errors as f64);
    Ok(m)
}
