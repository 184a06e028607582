//! Request/response over persistent TCP connections: `rr` (50 connections, one thread driving
//! them all with epoll) and `pingpong` (one connection, blocking calls, the plainest round trip).
//!
//! Each connection keeps exactly one 64-byte request in flight: send, wait for all 64 bytes of
//! the echo, check them byte for byte, send the next. Latency is send-to-last-byte. A reply that
//! differs, a short read at EOF or a reset counts as an error and ends that connection; the rest
//! go on. The epoll client handles partial reads and writes, which a proxy may legitimately
//! produce (a 64-byte message split in two is still a correct byte stream).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{add_percentiles, message, Flags, Metrics, Under, MAX_OPS, MESSAGE};
use crate::report::Column;
use crate::stats::Latencies;
use crate::sys::Poller;

pub const COLUMNS: &[Column] = &[
    Column::rate("rps", "req/s", 0),
    Column::latency("p50", "p50 µs", 1),
    Column::latency("p99", "p99 µs", 1),
    Column::latency("p999", "p99.9 µs", 1),
    Column::cpu("cpu_pct", "proxy CPU %", 0),
    Column::cpu("us_per_req", "CPU µs/req", 2),
    Column::plain("errors", "errors", 0),
];

pub fn connect(under: &Under) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&under.addr(), Duration::from_secs(2))
        .map_err(|e| format!("connect {}: {e}", under.addr()))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// One connection of the epoll client.
struct Conn {
    stream: TcpStream,
    key: u64,
    seq: u64,
    out: [u8; MESSAGE],
    sent: usize,
    got: usize,
    reply: [u8; MESSAGE],
    since: Instant,
    open: bool,
}

impl Conn {
    fn start_request(&mut self) {
        self.seq += 1;
        self.out = message(self.seq);
        self.sent = 0;
        self.got = 0;
        self.since = Instant::now();
    }

    /// Writes what is left of the request. `Ok(true)` when all of it is out.
    fn flush(&mut self) -> io::Result<bool> {
        while self.sent < MESSAGE {
            match self.stream.write(&self.out[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads what arrived. `Ok(true)` when the whole, correct reply is in.
    fn receive(&mut self) -> io::Result<bool> {
        while self.got < MESSAGE {
            match self.stream.read(&mut self.reply[self.got..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if self.reply != self.out {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "reply differs"));
        }
        Ok(true)
    }
}

pub fn run_many(under: &Under, conns: usize) -> Result<Metrics, String> {
    let mut poller = Poller::new().map_err(|e| e.to_string())?;
    let mut all = Vec::with_capacity(conns);
    for i in 0..conns {
        let stream = connect(under)?;
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        poller
            .add(stream.as_raw_fd(), i as u64, true, false)
            .map_err(|e| e.to_string())?;
        all.push(Conn {
            stream,
            key: i as u64,
            seq: (i as u64) << 40,
            out: [0; MESSAGE],
            sent: 0,
            got: 0,
            reply: [0; MESSAGE],
            since: Instant::now(),
            open: true,
        });
    }
    let flags = under.flags();
    let done = AtomicU64::new(0);
    let (window, (mut lat, errors)) = std::thread::scope(|scope| {
        let (flags_ref, done_ref) = (&flags, &done);
        let load = scope.spawn(move || drive(&mut poller, &mut all, flags_ref, done_ref));
        let w = under.measure(&flags, || done.load(Ordering::Relaxed));
        flags.stop();
        (w, load.join().unwrap_or_default())
    });
    finish(window, &mut lat, errors)
}

/// The epoll client loop; returns the latency samples and the error count.
fn drive(
    poller: &mut Poller,
    all: &mut [Conn],
    flags: &Flags,
    done: &AtomicU64,
) -> (Latencies, u64) {
    let mut lat = Latencies::new();
    let mut errors = 0u64;
    let mut events = Vec::new();
    for c in all.iter_mut() {
        c.start_request();
        match c.flush() {
            Ok(true) => {}
            Ok(false) => {
                let _ = poller.modify(c.stream.as_raw_fd(), c.key, true, true);
            }
            Err(_) => fail(c, poller, &mut errors),
        }
    }
    let mut ops = 0u64;
    while flags.running() && ops < MAX_OPS {
        if poller.wait(&mut events, Duration::from_millis(50)).is_err() {
            break;
        }
        for ev in &events {
            let Some(c) = all.get_mut(ev.key as usize) else {
                continue;
            };
            if !c.open {
                continue;
            }
            let key = c.key;
            if c.sent < MESSAGE {
                match c.flush() {
                    Ok(true) => {
                        let _ = poller.modify(c.stream.as_raw_fd(), key, true, false);
                    }
                    Ok(false) => continue,
                    Err(_) => {
                        fail(c, poller, &mut errors);
                        continue;
                    }
                }
            }
            match c.receive() {
                Ok(false) => {}
                Ok(true) => {
                    if flags.measuring() {
                        lat.record(c.since.elapsed());
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    ops += 1;
                    c.start_request();
                    match c.flush() {
                        Ok(true) => {}
                        Ok(false) => {
                            let _ = poller.modify(c.stream.as_raw_fd(), key, true, true);
                        }
                        Err(_) => fail(c, poller, &mut errors),
                    }
                }
                Err(_) => fail(c, poller, &mut errors),
            }
        }
    }
    (lat, errors)
}

pub fn run_pingpong(under: &Under) -> Result<Metrics, String> {
    let mut stream = connect(under)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let flags = under.flags();
    let done = AtomicU64::new(0);
    let (window, (mut lat, errors)) = std::thread::scope(|scope| {
        let (flags_ref, done_ref) = (&flags, &done);
        let load = scope.spawn(move || {
            let mut lat = Latencies::new();
            let mut reply = [0u8; MESSAGE];
            let mut seq = 0u64;
            while flags_ref.running() && seq < MAX_OPS {
                seq += 1;
                let out = message(seq);
                let t = Instant::now();
                let ok = stream.write_all(&out).is_ok()
                    && stream.read_exact(&mut reply).is_ok()
                    && reply == out;
                if !ok {
                    return (lat, 1);
                }
                if flags_ref.measuring() {
                    lat.record(t.elapsed());
                }
                done_ref.fetch_add(1, Ordering::Relaxed);
            }
            (lat, 0)
        });
        let w = under.measure(&flags, || done.load(Ordering::Relaxed));
        flags.stop();
        (w, load.join().unwrap_or_default())
    });
    finish(window, &mut lat, errors)
}

/// Counts the error and takes the connection out of the loop.
fn fail(c: &mut Conn, poller: &Poller, errors: &mut u64) {
    *errors += 1;
    c.open = false;
    let _ = poller.delete(c.stream.as_raw_fd());
}

fn finish(window: super::Window, lat: &mut Latencies, errors: u64) -> Result<Metrics, String> {
    if window.count == 0 {
        return Err(format!("no request completed ({errors} errors)"));
    }
    let mut m = Metrics::new();
    m.insert("rps", window.rate());
    add_percentiles(&mut m, lat);
    window.add_cpu(&mut m, "us_per_req", window.count as f64);
    m.insert("errors", errors as f64);
    Ok(m)
}
