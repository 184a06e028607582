//! A seeded chaos run (issue 16): many connections through sluice where the clients and the
//! backends misbehave on purpose, drawn from one seed per connection: resets at a random byte,
//! writes in 1-byte pieces, stalls, slow readers, a backend that closes before reading, one that
//! never reads. The faults are injected by the two ends themselves rather than by a relay in
//! between: a relay would be a second proxy whose own behaviour the checks would have to trust.
//!
//! Every connection is checked against one invariant: the bytes that arrive at either end are a
//! prefix of what was sent on that connection (never another connection's), in order, and a
//! stream that ends with a clean FIN is complete; a cut stream ends with a reset. After the run
//! no pair, buffer or pipe is left and no descriptor leaked. A failure prints the seed of the
//! connection, and that seed replays it (`CHAOS_SEED=... CHAOS_CONNECTIONS=1`).
//!
//! `make test` runs a short variant (300 connections on the copy path and 300 splicing, fixed
//! seeds); `make chaos` runs `chaos_long` (`CHAOS_CONNECTIONS`, default 5,000) in release.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use sluice::config::{Config, Splice};
use sluice::runtime::Proxy;

/// What the client of one connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientFault {
    None,
    /// Writes its request one byte at a time.
    OneByteWrites,
    /// Pauses between writes.
    Stalls,
    /// Sends part of its request, then resets.
    ResetAt(u64),
    /// Reads the answer in small pieces with pauses.
    SlowReader,
}

/// What the backend does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerFault {
    None,
    /// Answers one byte per write.
    OneByteWrites,
    /// Waits up to 300 ms before answering.
    Stall(u64),
    /// Sends part of its answer, then resets.
    ResetAt(u64),
    /// Closes before reading anything: the whole answer is empty.
    CloseBeforeRead,
    /// Accepts and never reads; sluice's idle timeout ends it.
    NeverReads,
    /// Reads its request slowly.
    SlowReader,
}

/// One connection's plan, all drawn from its seed.
#[derive(Debug, Clone, Copy)]
struct Plan {
    seed: u64,
    request: u64,
    answer: u64,
    client: ClientFault,
    server: ServerFault,
}

impl Plan {
    fn from_seed(seed: u64) -> Plan {
        let mut r = Xorshift::new(seed);
        let size = |r: &mut Xorshift| match r.below(4) {
            0 => r.below(64),
            1 => r.below(4096),
            2 => r.below(64 * 1024),
            _ => r.below(2 * 1024 * 1024),
        };
        let mut request = size(&mut r);
        let mut answer = size(&mut r);
        let client = match r.below(10) {
            0 => ClientFault::OneByteWrites,
            1 => ClientFault::Stalls,
            2 => ClientFault::ResetAt(r.below(request + 1)),
            3 => ClientFault::SlowReader,
            _ => ClientFault::None,
        };
        let server = match r.below(12) {
            0 => ServerFault::OneByteWrites,
            1 => ServerFault::Stall(r.below(300)),
            2 => ServerFault::ResetAt(r.below(answer + 1)),
            3 => ServerFault::CloseBeforeRead,
            4 => ServerFault::NeverReads,
            5 => ServerFault::SlowReader,
            _ => ServerFault::None,
        };
        // A slow reader gets more than the kernel buffers on its path hold (4 MiB of send
        // buffer at most here), so that sluice must hold what it cannot pass on yet.
        const BIG: u64 = 4 * 1024 * 1024;
        if client == ClientFault::SlowReader {
            answer = BIG + r.below(BIG);
        }
        if server == ServerFault::SlowReader {
            request = BIG + r.below(BIG);
        }
        // Byte-at-a-time ends send a few kilobytes at most: bounded in time.
        if client == ClientFault::OneByteWrites {
            request = request.min(2048);
        }
        if server == ServerFault::OneByteWrites {
            answer = answer.min(2048);
        }
        Plan {
            seed,
            request,
            answer,
            client,
            server,
        }
    }

    /// The header a client sends first: its seed, so the backend knows the plan too.
    fn header(&self) -> [u8; 8] {
        self.seed.to_le_bytes()
    }
}

/// The request's bytes and the answer's are two streams of the connection's seed.
fn request_seed(seed: u64) -> u64 {
    seed.wrapping_mul(2)
}

fn answer_seed(seed: u64) -> u64 {
    seed.wrapping_mul(2) | 1
}

/// How one end saw its incoming stream end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// A FIN after this many bytes.
    Clean(u64),
    /// A reset (or another error) after this many bytes.
    Cut(u64),
}

/// Reads `stream` to its end, checking each byte against the stream for `seed` and at most
/// `len` of them; `pause` between small reads for a slow reader.
fn read_checked(s: &mut TcpStream, seed: u64, len: u64, slow: bool) -> Result<Ended, String> {
    let mut verifier = Verifier::new(seed);
    let mut buf = vec![0u8; if slow { 4096 } else { 64 * 1024 }];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(Ended::Clean(verifier.pos)),
            Ok(n) => {
                if verifier.pos + n as u64 > len {
                    return Err(format!(
                        "{} bytes past the {len} sent",
                        verifier.pos + n as u64 - len
                    ));
                }
                verifier.check(&buf[..n]).map_err(|at| {
                    format!("byte {at} differs: another connection's, or reordered")
                })?;
                if slow {
                    thread::sleep(Duration::from_micros(100));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(format!("stalled after {} bytes", verifier.pos))
            }
            Err(_) => return Ok(Ended::Cut(verifier.pos)),
        }
    }
}

/// Writes `len` bytes of the stream for `seed`, in the client's or server's manner.
fn write_stream(
    s: &mut TcpStream,
    seed: u64,
    len: u64,
    one_byte: bool,
    stalls: bool,
) -> io::Result<()> {
    let mut stream = PayloadStream::new(seed);
    let mut buf = vec![0u8; if one_byte { 1 } else { 16 * 1024 }];
    let mut left = len;
    let mut r = Xorshift::new(seed ^ 0x5a5a);
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        stream.fill(&mut buf[..n]);
        s.write_all(&buf[..n])?;
        left -= n as u64;
        if stalls && r.below(8) == 0 {
            thread::sleep(Duration::from_millis(r.below(20)));
        }
    }
    Ok(())
}

/// Closes with a reset: `SO_LINGER` 0.
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// Faults and bytes seen, for the figures.
#[derive(Default)]
struct Tally {
    connections: AtomicU64,
    bytes_checked: AtomicU64,
    client_faults: AtomicU64,
    server_faults: AtomicU64,
    violations: Mutex<Vec<String>>,
}

impl Tally {
    fn violation(&self, seed: u64, what: String) {
        self.violations
            .lock()
            .expect("violations")
            .push(format!("seed {seed}: {what}"));
    }
}

/// The backend: reads the seed, then plays its side of the plan, checking what it receives.
fn serve(mut s: TcpStream, tally: &Tally) {
    let _ = s.set_read_timeout(Some(EVENTUALLY));
    let _ = s.set_write_timeout(Some(EVENTUALLY));
    let mut header = [0u8; 8];
    if s.read_exact(&mut header).is_err() {
        return; // a client that reset before its header: nothing to check
    }
    let plan = Plan::from_seed(u64::from_le_bytes(header));
    match plan.server {
        ServerFault::CloseBeforeRead => return,
        ServerFault::NeverReads => {
            // Hold the connection until sluice gives up on it (its idle timeout).
            let mut one = [0u8; 1];
            let _ = s.set_read_timeout(Some(Duration::from_secs(4)));
            thread::sleep(Duration::from_secs(3));
            let _ = s.peek(&mut one);
            return;
        }
        _ => {}
    }
    let slow = plan.server == ServerFault::SlowReader;
    let got = match read_checked(&mut s, request_seed(plan.seed), plan.request, slow) {
        Ok(got) => got,
        Err(why) => return tally.violation(plan.seed, format!("backend: {why}")),
    };
    match (got, plan.client) {
        (Ended::Clean(n), _) if n != plan.request => {
            return tally.violation(
                plan.seed,
                format!(
                    "backend: a clean end after {n} of {} bytes: a cut presented as complete",
                    plan.request
                ),
            );
        }
        (Ended::Clean(_), _) => {}
        // The client reset, or sluice cut the stream (and said so with a reset).
        (Ended::Cut(_), _) => return,
    }
    tally
        .bytes_checked
        .fetch_add(plan.request, Ordering::Relaxed);
    let (len, one_byte) = match plan.server {
        ServerFault::ResetAt(k) => (k, false),
        ServerFault::OneByteWrites => (plan.answer, true),
        _ => (plan.answer, false),
    };
    if let ServerFault::Stall(ms) = plan.server {
        thread::sleep(Duration::from_millis(ms));
    }
    let wrote = write_stream(&mut s, answer_seed(plan.seed), len, one_byte, false);
    if matches!(plan.server, ServerFault::ResetAt(_)) {
        return reset(s);
    }
    if wrote.is_ok() {
        let _ = s.shutdown(Shutdown::Write);
    }
}

/// A client socket; a slow reader's has a small receive buffer, so that sluice has to hold
/// the answer (a buffer or a pipe) instead of the kernel.
fn open(addr: SocketAddr, small: bool) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    if small {
        socket.set_recv_buffer_size(8 * 1024)?;
    }
    socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(EVENTUALLY))?;
    s.set_write_timeout(Some(EVENTUALLY))?;
    Ok(s)
}

/// The client of one connection; checks the answer.
fn client(addr: SocketAddr, plan: Plan, tally: &Tally) {
    let Ok(mut s) = open(addr, plan.client == ClientFault::SlowReader) else {
        return tally.violation(plan.seed, "client: cannot connect".to_string());
    };
    if s.write_all(&plan.header()).is_err() {
        return;
    }
    let (len, one_byte, stalls) = match plan.client {
        ClientFault::ResetAt(k) => (k, false, false),
        ClientFault::OneByteWrites => (plan.request, true, false),
        ClientFault::Stalls => (plan.request, false, true),
        _ => (plan.request, false, false),
    };
    // The request goes out while the answer comes in, as a real client's would.
    let mut writer_side = s.try_clone().expect("clone");
    let seed = plan.seed;
    let writer = thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let wrote = write_stream(&mut writer_side, request_seed(seed), len, one_byte, stalls);
            if wrote.is_ok() && len == plan.request {
                // The whole request is out: the backend answers after this end of stream.
                let _ = writer_side.shutdown(Shutdown::Write);
            }
            (wrote, writer_side)
        })
        .expect("writer thread");
    if let ClientFault::ResetAt(_) = plan.client {
        let (_, w) = writer.join().expect("writer");
        drop(s);
        return reset(w);
    }
    let slow = plan.client == ClientFault::SlowReader;
    let got = read_checked(&mut s, answer_seed(plan.seed), plan.answer, slow);
    let (_, _w) = writer.join().expect("writer");
    let expected = match plan.server {
        ServerFault::CloseBeforeRead | ServerFault::NeverReads => 0,
        ServerFault::ResetAt(_) => u64::MAX, // never complete: it must end in a reset
        _ => plan.answer,
    };
    match got {
        Err(why) => tally.violation(plan.seed, format!("client: {why}")),
        Ok(Ended::Clean(n)) if expected != u64::MAX && n == expected => {
            tally.bytes_checked.fetch_add(n, Ordering::Relaxed);
        }
        Ok(Ended::Clean(n)) => tally.violation(
            plan.seed,
            format!(
                "client: a clean end after {n} bytes of an answer that is {}",
                match expected {
                    u64::MAX => "cut by a reset".to_string(),
                    e => format!("{e} bytes"),
                }
            ),
        ),
        Ok(_) => {}
    }
}

/// A backend listener running `serve` for every connection, until dropped.
struct ChaosBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl ChaosBackend {
    fn start(tally: Arc<Tally>) -> ChaosBackend {
        // Small receive buffers (accepted sockets inherit them): a backend that reads slowly
        // makes sluice hold the request.
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(16 * 1024).expect("rcvbuf");
        socket.set_reuse_address(true).expect("reuseaddr");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        socket.listen(1024).expect("listen");
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&stop);
        thread::spawn(move || {
            for s in listener.incoming() {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(s) = s else { continue };
                let tally = Arc::clone(&tally);
                let _ = thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || serve(s, &tally));
            }
        });
        ChaosBackend { addr, stop }
    }
}

impl Drop for ChaosBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// `connections` connections with seeds from `first`, 16 at a time, through one proxy.
fn run(first: u64, connections: u64, splice: Splice, reload_every: u64) {
    raise_fd_limit();
    let fds_before = open_fds();
    let tally = Arc::new(Tally::default());
    let backend = ChaosBackend::start(Arc::clone(&tally));
    let text = format!(
        "allow 127.0.0.0/8;\ndeny all;\n\
         listen 127.0.0.1:0 {{\n  proxy {};\n  idle_timeout 2s;\n  half_close_timeout 2s;\n  \
         max_connections_per_ip 1000;\n  rate_per_ip 100000/s burst=1000;\n}}\n",
        backend.addr
    );
    let mut config = Config::parse(&text, "chaos.conf").unwrap_or_else(|e| panic!("{e}"));
    config.listeners[0].splice = splice;
    let proxy = Proxy::start(config.clone()).expect("the proxy starts");
    let addr = proxy.local_addr(0).expect("listener");
    let next = Arc::new(AtomicU64::new(first));
    let end = first + connections;
    let started = Instant::now();
    let reloads = AtomicUsize::new(0);
    thread::scope(|scope| {
        for _ in 0..16 {
            let (next, tally) = (Arc::clone(&next), Arc::clone(&tally));
            let (proxy, config, reloads) = (&proxy, &config, &reloads);
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        return;
                    }
                    if reload_every > 0 && seed % reload_every == 0 {
                        let mut c = config.clone();
                        // A change every reload: the idle timeout moves between 2 s and 3 s.
                        c.listeners[0].idle_timeout = Duration::from_secs(2 + seed % 2);
                        if proxy.reload(c).is_ok() {
                            reloads.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let plan = Plan::from_seed(seed);
                    if plan.client != ClientFault::None {
                        tally.client_faults.fetch_add(1, Ordering::Relaxed);
                    }
                    if plan.server != ServerFault::None {
                        tally.server_faults.fetch_add(1, Ordering::Relaxed);
                    }
                    client(addr, plan, &tally);
                    tally.connections.fetch_add(1, Ordering::Relaxed);
                })
                .expect("client thread");
        }
    });
    let stats = proxy.stats_handle();
    assert!(
        wait_until(EVENTUALLY, || stats
            .connections_active
            .load(Ordering::Relaxed)
            == 0),
        "{} pairs left after the run",
        stats.connections_active.load(Ordering::Relaxed)
    );
    assert_eq!(
        (stats.buffers_in_use(), stats.pipes_in_use()),
        (0, 0),
        "buffers or pipes left"
    );
    let violations = tally.violations.lock().expect("violations").clone();
    println!(
        "chaos {splice:?}: {} connections (seeds {first}..{end}) in {:.1} s, {} with a client fault, \
         {} with a server fault, {} reloads, {} bytes checked, {} spliced, {} violations",
        tally.connections.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        tally.client_faults.load(Ordering::Relaxed),
        tally.server_faults.load(Ordering::Relaxed),
        reloads.load(Ordering::Relaxed),
        tally.bytes_checked.load(Ordering::Relaxed),
        stats.spliced_bytes(),
        violations.len()
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    drop(proxy);
    drop(backend);
    // The backend's threads and sockets end a moment after their connections do.
    assert!(
        wait_until(EVENTUALLY, || open_fds() <= fds_before + 8),
        "descriptors leaked: {} open, {} before",
        open_fds(),
        fds_before
    );
}

/// One test, so the two runs do not share the process's descriptor count.
#[test]
fn chaos_short() {
    run(1, 300, Splice::Off, 100);
    run(100_001, 300, Splice::On, 100);
}

/// `make chaos`: CHAOS_CONNECTIONS (default 5,000) from CHAOS_SEED (default 1), half on the
/// copy path and half splicing.
#[test]
#[ignore]
fn chaos_long() {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (seed, n) = (var("CHAOS_SEED", 1), var("CHAOS_CONNECTIONS", 5000));
    run(seed, n.div_ceil(2), Splice::Off, 250);
    run(seed + n.div_ceil(2), n / 2, Splice::On, 250);
}
