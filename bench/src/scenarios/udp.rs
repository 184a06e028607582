//! UDP: 64-byte datagrams echoed by the backend through the target.
//!
//! `20 clients`: twenty sockets (one per client address, so the proxy keeps twenty sessions), one
//! thread driving them with epoll; each keeps up to `window` requests outstanding. A request not
//! answered within `LOST_AFTER` frees its slot (so loss cannot stall the load); loss % is
//! computed over the whole run as 1 - replies / requests, after a short drain, so late replies
//! still count as delivered. `ping-pong`: one socket, one datagram in flight, the round trip.
//! Every reply carries its request's sequence number and is checked against it.

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{add_percentiles, message, Flags, Metrics, Under, Window, MAX_OPS, MESSAGE};
use crate::report::Column;
use crate::stats::Latencies;
use crate::sys::Poller;

pub const COLUMNS: &[Column] = &[
    Column::rate("dps", "dgram/s", 0),
    Column::plain("loss_pct", "loss %", 2),
    Column::latency("p50", "p50 µs", 1),
    Column::latency("p99", "p99 µs", 1),
    Column::latency("p999", "p99.9 µs", 1),
    Column::cpu("cpu_pct", "proxy CPU %", 0),
    Column::cpu("us_per_dgram", "CPU µs/dgram", 2),
];

/// An unanswered request older than this is given up (its slot reused).
const LOST_AFTER: Duration = Duration::from_millis(200);
/// Wait for late replies after the window closes.
const DRAIN: Duration = Duration::from_millis(300);

fn socket(under: &Under) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.connect(under.addr())?;
    Ok(s)
}

/// The sequence number a reply carries, if it is a well-formed echo of a request.
fn seq_of(reply: &[u8]) -> Option<u64> {
    if reply.len() != MESSAGE {
        return None;
    }
    let seq = u64::from_le_bytes(reply[..8].try_into().ok()?);
    (reply == message(seq)).then_some(seq)
}

struct Client {
    socket: UdpSocket,
    next_seq: u64,
    /// Outstanding requests: (seq, sent at).
    waiting: Vec<(u64, Instant)>,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    replies: u64,
    lat: Latencies,
}

pub fn run_many(under: &Under, clients: usize, window: usize) -> Result<Metrics, String> {
    let mut poller = Poller::new().map_err(|e| e.to_string())?;
    let mut all = Vec::with_capacity(clients);
    for i in 0..clients {
        let s = socket(under).map_err(|e| e.to_string())?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        poller
            .add(s.as_raw_fd(), i as u64, true, false)
            .map_err(|e| e.to_string())?;
        all.push(Client {
            socket: s,
            next_seq: (i as u64) << 40,
            waiting: Vec::with_capacity(window),
        });
    }
    let flags = under.flags();
    let replies = AtomicU64::new(0);
    let (w, tally) = std::thread::scope(|scope| {
        let (flags_ref, replies_ref) = (&flags, &replies);
        let load =
            scope.spawn(move || drive(&mut poller, &mut all, window, flags_ref, replies_ref));
        let w = under.measure(&flags, || replies.load(Ordering::Relaxed));
        flags.stop();
        (w, load.join().unwrap_or_default())
    });
    finish(w, tally)
}

fn drive(
    poller: &mut Poller,
    all: &mut [Client],
    window: usize,
    flags: &Flags,
    replies: &AtomicU64,
) -> Tally {
    let mut t = Tally::default();
    let mut events = Vec::new();
    let mut buf = [0u8; 2048];
    let mut ops = 0u64;
    let mut drain_until: Option<Instant> = None;
    loop {
        let sending = flags.running() && ops < MAX_OPS;
        if !sending {
            let until = *drain_until.get_or_insert_with(|| Instant::now() + DRAIN);
            if Instant::now() >= until || all.iter().all(|c| c.waiting.is_empty()) {
                break;
            }
        }
        let now = Instant::now();
        for c in all.iter_mut() {
            c.waiting
                .retain(|&(_, at)| now.duration_since(at) < LOST_AFTER);
            while sending && c.waiting.len() < window {
                c.next_seq += 1;
                match c.socket.send(&message(c.next_seq)) {
                    Ok(_) => {
                        t.sent += 1;
                        ops += 1;
                        c.waiting.push((c.next_seq, Instant::now()));
                    }
                    // A full socket buffer (or ENOBUFS): try again on the next turn.
                    Err(_) => break,
                }
            }
        }
        if poller.wait(&mut events, Duration::from_millis(10)).is_err() {
            break;
        }
        for ev in &events {
            let Some(c) = all.get_mut(ev.key as usize) else {
                continue;
            };
            // Drain the socket: level-triggered, but one wakeup per datagram would be wasteful.
            for _ in 0..64 {
                let n = match c.socket.recv(&mut buf) {
                    Ok(n) => n,
                    Err(_) => break,
                };
                let Some(seq) = seq_of(&buf[..n]) else {
                    continue;
                };
                t.replies += 1;
                replies.fetch_add(1, Ordering::Relaxed);
                if let Some(i) = c.waiting.iter().position(|&(s, _)| s == seq) {
                    let (_, at) = c.waiting.swap_remove(i);
                    if flags.measuring() {
                        t.lat.record(at.elapsed());
                    }
                }
            }
        }
    }
    t
}

pub fn run_pingpong(under: &Under) -> Result<Metrics, String> {
    let s = socket(under).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(LOST_AFTER))
        .map_err(|e| e.to_string())?;
    let flags = under.flags();
    let replies = AtomicU64::new(0);
    let (w, tally) = std::thread::scope(|scope| {
        let (flags_ref, replies_ref) = (&flags, &replies);
        let load = scope.spawn(move || {
            let mut t = Tally::default();
            let mut buf = [0u8; 2048];
            let mut seq = 0u64;
            while flags_ref.running() && seq < MAX_OPS {
                seq += 1;
                let at = Instant::now();
                if s.send(&message(seq)).is_err() {
                    continue;
                }
                t.sent += 1;
                // Skip late replies to earlier requests; give up after LOST_AFTER.
                while at.elapsed() < LOST_AFTER {
                    match s.recv(&mut buf) {
                        Ok(n) if seq_of(&buf[..n]) == Some(seq) => {
                            if flags_ref.measuring() {
                                t.lat.record(at.elapsed());
                            }
                            t.replies += 1;
                            replies_ref.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
            t
        });
        let w = under.measure(&flags, || replies.load(Ordering::Relaxed));
        flags.stop();
        (w, load.join().unwrap_or_default())
    });
    finish(w, tally)
}

fn finish(w: Window, mut t: Tally) -> Result<Metrics, String> {
    if w.count == 0 {
        return Err(format!("no reply in the window ({} sent)", t.sent));
    }
    let mut m = Metrics::new();
    m.insert("dps", w.rate());
    if t.sent > 0 {
        let lost = t.sent.saturating_sub(t.replies);
        m.insert("loss_pct", 100.0 * lost as f64 / t.sent as f64);
    }
    add_percentiles(&mut m, &mut t.lat);
    w.add_cpu(&mut m, "us_per_dgram", w.count as f64);
    Ok(m)
}
