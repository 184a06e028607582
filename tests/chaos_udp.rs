//! A seeded UDP chaos run: many sessions through sluice's UDP path where the two ends misbehave
//! on purpose, drawn from one seed per session. The backend decides per datagram: no reply, one,
//! two (a duplicate), one of another size, or one held back until the next datagram of any
//! session has come (reordered across sessions). Clients send in bursts, in lockstep, or vanish
//! mid-session with replies due. With the PROXY protocol on, every datagram reaches the backend
//! behind a v2 header, which the backend reads with its own parser (not sluice's) and checks
//! against the client the datagram says it comes from. As in the TCP chaos run, the faults come
//! from the ends themselves, not from a relay whose own behaviour the checks would have to trust.
//!
//! Every datagram either end receives is checked against one invariant: it is whole (its length
//! field matches its size: never cut, never merged), it belongs to the receiver's own session
//! (its seed; with PROXY on, a header naming the client that sent it), it is one that was sent,
//! its bytes are exactly those sent, and it comes no more often than it was sent. Loss is UDP's
//! right and is only counted. After the run every session has expired and no descriptor leaked.
//!
//! A failure names the seed of its session, and that seed replays its plan (not the timing of
//! the sessions around it): `CHAOS_SEED=... CHAOS_CONNECTIONS=1`, or for a seed of the half with
//! PROXY headers `CHAOS_SEED=<seed - 1> CHAOS_CONNECTIONS=2`. `make test` runs a short variant
//! (200 sessions without PROXY headers and 200 with, fixed seeds); `chaos_udp_long` runs
//! `CHAOS_CONNECTIONS` (default 5,000): `cargo test --release --test chaos_udp -- --ignored`.

mod common;

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use sluice::config::Config;
use sluice::runtime::Proxy;

/// Client threads, each running one session after another.
const THREADS: usize = 16;

/// A request: seed (u64), index (u32), the client's own port (u16) and the payload's length
/// (u32), little-endian, then the payload.
const REQUEST_HEAD: usize = 18;

/// A reply: seed (u64), index (u32) and the payload's length (u32), then the payload.
const REPLY_HEAD: usize = 16;

/// A client that has heard nothing for this long takes what is missing as lost.
const QUIET: Duration = Duration::from_millis(300);

/// The longest one session may take, whatever comes.
const SESSION_TIME: Duration = Duration::from_secs(5);

/// One blocking read of a client or of the backend. A held reply waits at most about this long
/// when no other datagram comes: far less than the idle timeout, so its session is still there.
const TURN: Duration = Duration::from_millis(50);

/// Reads of one wait of a client, at most (each takes a datagram or a `TURN`).
const MAX_READS: usize = 10_000;

/// What a seed drawn by `mix` is for: the two ends draw the same numbers from it.
const SIZE_SALT: u64 = 0x10;
const ACTION_SALT: u64 = 0x20;
const REQUEST_SALT: u64 = 0x30;
const REPLY_SALT: u64 = 0x40;

/// A seed for one datagram's size, fate or bytes: from the session's seed, the datagram's index
/// and what it is for.
fn mix(seed: u64, index: u32, salt: u64) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (u64::from(index) << 8) ^ salt
}

/// How a client paces its datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// Sends them all at once, then reads: sluice moves them in batches.
    Burst,
    /// Sends one, waits for what the backend answers to it, sends the next.
    Lockstep,
    /// Lockstep for this many, then stops reading and closes its socket with replies due.
    Vanish(u32),
}

/// One session's plan, all drawn from its seed.
#[derive(Debug, Clone, Copy)]
struct Plan {
    seed: u64,
    datagrams: u32,
    pace: Pace,
}

impl Plan {
    fn from_seed(seed: u64) -> Plan {
        let mut r = Xorshift::new(seed);
        let datagrams = 1 + r.below(40) as u32;
        let pace = match r.below(10) {
            0..=3 => Pace::Burst,
            4..=7 => Pace::Lockstep,
            _ => Pace::Vanish(1 + r.below(u64::from(datagrams)) as u32),
        };
        Plan {
            seed,
            datagrams,
            pace,
        }
    }

    /// The payload length of datagram `index`, drawn on its own so that the backend finds it.
    fn payload_len(&self, index: u32) -> usize {
        size(&mut Xorshift::new(mix(self.seed, index, SIZE_SALT)))
    }
}

/// A payload length: mostly tiny or near a typical path's 1,400 bytes, a few up to 8,000.
fn size(r: &mut Xorshift) -> usize {
    let n = match r.below(10) {
        0..=3 => r.below(16),
        4..=6 => 1300 + r.below(200),
        7 | 8 => r.below(1400),
        _ => r.below(8001),
    };
    n as usize
}

/// What the backend does with one datagram; drawn from the session's seed and the datagram's
/// index, so the client knows what to expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    NoReply,
    Once,
    /// The same reply twice.
    Twice,
    /// One reply of this many payload bytes, not the request's.
    Resize(usize),
    /// One reply, sent after the next datagram of any session (or a quiet `TURN`).
    Hold,
}

impl Action {
    fn of(seed: u64, index: u32, len: usize) -> Action {
        let mut r = Xorshift::new(mix(seed, index, ACTION_SALT));
        match r.below(20) {
            0 | 1 => Action::NoReply,
            2 | 3 => Action::Twice,
            4 | 5 => match size(&mut r) {
                n if n == len => Action::Resize(n + 1),
                n => Action::Resize(n),
            },
            6 | 7 => Action::Hold,
            _ => Action::Once,
        }
    }

    /// How many replies the backend sends.
    fn copies(self) -> u32 {
        match self {
            Action::NoReply => 0,
            Action::Twice => 2,
            Action::Once | Action::Resize(_) | Action::Hold => 1,
        }
    }

    /// The payload length of its reply to a request of `len` bytes.
    fn reply_len(self, len: usize) -> usize {
        match self {
            Action::Resize(n) => n,
            _ => len,
        }
    }
}

/// Datagram `index` of session `seed`, from the client on `port`.
fn request(seed: u64, index: u32, port: u16, len: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(REQUEST_HEAD + len);
    d.extend_from_slice(&seed.to_le_bytes());
    d.extend_from_slice(&index.to_le_bytes());
    d.extend_from_slice(&port.to_le_bytes());
    d.extend_from_slice(&(len as u32).to_le_bytes());
    d.extend_from_slice(&payload(mix(seed, index, REQUEST_SALT), len));
    d
}

/// The backend's reply to datagram `index` of session `seed`, with `len` payload bytes.
fn reply(seed: u64, index: u32, len: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(REPLY_HEAD + len);
    d.extend_from_slice(&seed.to_le_bytes());
    d.extend_from_slice(&index.to_le_bytes());
    d.extend_from_slice(&(len as u32).to_le_bytes());
    d.extend_from_slice(&payload(mix(seed, index, REPLY_SALT), len));
    d
}

// The readers below are called only once the length has been checked.

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The seed a datagram claims, for the report of one that fails its checks.
fn seed_of(b: &[u8]) -> Option<u64> {
    (b.len() >= 8).then(|| le_u64(b, 0))
}

/// Faults and datagrams seen, for the figures.
#[derive(Default)]
struct Tally {
    sessions: AtomicU64,
    vanished: AtomicU64,
    sent: AtomicU64,
    /// Sends the kernel refused (ENOBUFS under load): never answered, not counted as lost.
    unsent: AtomicU64,
    server_got: AtomicU64,
    replies: AtomicU64,
    /// Second copies of a reply the backend sent twice.
    duplicates: AtomicU64,
    /// Replies the backend sends to the sessions that read to their end, and those of them
    /// that never came.
    expected: AtomicU64,
    lost: AtomicU64,
    bytes_verified: AtomicU64,
    violations: Mutex<Vec<String>>,
}

impl Tally {
    fn violation(&self, seed: u64, what: String) {
        self.report(Some(seed), what);
    }

    /// A violation; `None` for a datagram too broken to name its session.
    fn report(&self, seed: Option<u64>, what: String) {
        let seed = seed.map_or_else(|| "?".to_string(), |s| s.to_string());
        self.violations
            .lock()
            .expect("violations")
            .push(format!("seed {seed}: {what}"));
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

// ---- the backend ----------------------------------------------------------------------------

/// A PROXY v2 header as the backend reads it.
struct V2 {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    /// The header's length: the datagram's own bytes start here.
    len: usize,
}

/// Reads the v2 header sluice puts before a datagram of an IPv4 client: the 12-byte signature,
/// version 2 with the PROXY command (0x21), UDP over IPv4 (0x12), the length of the rest
/// (big-endian), then source and destination address and port, and TLVs, if any, after them.
fn parse_v2(d: &[u8]) -> Result<V2, String> {
    const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
    if d.len() < 16 || d[..12] != SIGNATURE {
        return Err(format!(
            "a {}-byte datagram without a PROXY header",
            d.len()
        ));
    }
    if (d[12], d[13]) != (0x21, 0x12) {
        return Err(format!(
            "a header of command 0x{:02x} and family 0x{:02x}: not PROXY for UDP over IPv4",
            d[12], d[13]
        ));
    }
    let rest = usize::from(u16::from_be_bytes([d[14], d[15]]));
    if rest < 12 || d.len() < 16 + rest {
        return Err(format!(
            "a header of {rest} bytes in a {}-byte datagram",
            d.len()
        ));
    }
    let ip = |at: usize| Ipv4Addr::new(d[at], d[at + 1], d[at + 2], d[at + 3]);
    let port = |at: usize| u16::from_be_bytes([d[at], d[at + 1]]);
    Ok(V2 {
        src: SocketAddrV4::new(ip(16), port(24)),
        dst: SocketAddrV4::new(ip(20), port(26)),
        len: 16 + rest,
    })
}

/// A request as the backend read it.
struct Request {
    seed: u64,
    index: u32,
    port: u16,
    len: usize,
}

/// Reads a request and checks it: whole, one its session sends, its bytes those sent.
fn parse_request(b: &[u8]) -> Result<Request, String> {
    if b.len() < REQUEST_HEAD {
        return Err(format!("a {}-byte datagram: no request", b.len()));
    }
    let req = Request {
        seed: le_u64(b, 0),
        index: le_u32(b, 8),
        port: le_u16(b, 12),
        len: le_u32(b, 14) as usize,
    };
    let body = &b[REQUEST_HEAD..];
    if body.len() != req.len {
        return Err(format!(
            "datagram {} says {} bytes and carries {}: cut or merged",
            req.index,
            req.len,
            body.len()
        ));
    }
    let plan = Plan::from_seed(req.seed);
    if req.index >= plan.datagrams || req.len != plan.payload_len(req.index) {
        return Err(format!(
            "datagram {} of {} bytes: its session sends none such",
            req.index, req.len
        ));
    }
    if *body != payload(mix(req.seed, req.index, REQUEST_SALT), req.len)[..] {
        return Err(format!("datagram {}: its bytes differ", req.index));
    }
    Ok(req)
}

/// The backend's side: one socket for every session (sluice gives each its own source port).
struct Server {
    socket: UdpSocket,
    tally: Arc<Tally>,
    proxy_protocol: bool,
    /// sluice's listening port once known: what a header must name as the destination.
    listener_port: Arc<AtomicU16>,
    /// (seed, index) of every request so far: none may come twice.
    seen: HashSet<(u64, u32)>,
    /// Replies held back, and where they go.
    held: Vec<(SocketAddr, Vec<u8>)>,
}

impl Server {
    fn serve(mut self, stop: &AtomicBool, until: Instant) {
        let mut buf = vec![0u8; 65_536];
        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
            let got = self.socket.recv_from(&mut buf);
            if stop.load(Ordering::Relaxed) {
                return;
            }
            // Held replies leave after this datagram's own answer: behind a later reply, often
            // one of another session. A quiet turn lets them go too.
            let held = std::mem::take(&mut self.held);
            if let Ok((n, from)) = got {
                self.take(&buf[..n], from);
            }
            for (to, datagram) in held {
                let _ = self.socket.send_to(&datagram, to);
            }
        }
    }

    /// Checks one datagram (its header first, with the PROXY protocol on), then answers it.
    fn take(&mut self, datagram: &[u8], from: SocketAddr) {
        let (body, header) = if self.proxy_protocol {
            match parse_v2(datagram) {
                Ok(h) => (&datagram[h.len..], Some(h)),
                Err(why) => {
                    let why = format!("server: {why}");
                    return self.tally.report(seed_of(datagram), why);
                }
            }
        } else {
            (datagram, None)
        };
        let req = match parse_request(body) {
            Ok(req) => req,
            Err(why) => {
                let why = format!("server: {why}");
                return self.tally.report(seed_of(body), why);
            }
        };
        if let Some(why) = header.and_then(|h| self.header_fault(&h, &req)) {
            return self.tally.violation(req.seed, why);
        }
        if !self.seen.insert((req.seed, req.index)) {
            let why = format!("server: datagram {} came twice", req.index);
            return self.tally.violation(req.seed, why);
        }
        add(&self.tally.server_got, 1);
        add(&self.tally.bytes_verified, req.len as u64);
        self.answer(&req, from);
    }

    /// What is wrong with the header of `req`, if anything: it must name the client whose port
    /// the datagram carries (else it is another session's) and sluice's listening address.
    fn header_fault(&self, h: &V2, req: &Request) -> Option<String> {
        let client = SocketAddrV4::new(Ipv4Addr::LOCALHOST, req.port);
        if h.src != client {
            return Some(format!(
                "server: datagram {} of {client} came behind a header naming {}",
                req.index, h.src
            ));
        }
        let port = self.listener_port.load(Ordering::Relaxed);
        let listener = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        if port != 0 && h.dst != listener {
            return Some(format!(
                "server: a header names {} as the address sent to, not {listener}",
                h.dst
            ));
        }
        None
    }

    /// Plays the datagram's part of the plan. A reply the kernel cannot take is lost, as UDP
    /// goes; the client counts it.
    fn answer(&mut self, req: &Request, to: SocketAddr) {
        let action = Action::of(req.seed, req.index, req.len);
        let datagram = reply(req.seed, req.index, action.reply_len(req.len));
        match action {
            Action::NoReply => {}
            Action::Hold => self.held.push((to, datagram)),
            Action::Twice => {
                let _ = self.socket.send_to(&datagram, to);
                let _ = self.socket.send_to(&datagram, to);
            }
            Action::Once | Action::Resize(_) => {
                let _ = self.socket.send_to(&datagram, to);
            }
        }
    }
}

/// The backend socket: bursts of many sessions meet here, and a bigger receive buffer loses
/// fewer of them (the kernel caps what is asked).
fn backend_socket() -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.bind(&loopback_any_port().into())?;
    let socket = UdpSocket::from(socket);
    // So that a stop whose wake-up datagram was lost is still seen, and held replies go.
    socket.set_read_timeout(Some(TURN))?;
    Ok(socket)
}

/// The backend on its thread, until dropped.
struct ChaosUdpBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ChaosUdpBackend {
    fn start(
        tally: Arc<Tally>,
        proxy_protocol: bool,
        listener_port: Arc<AtomicU16>,
        until: Instant,
    ) -> ChaosUdpBackend {
        let socket = backend_socket().expect("the backend binds");
        let addr = socket.local_addr().expect("the backend's address");
        let server = Server {
            socket,
            tally,
            proxy_protocol,
            listener_port,
            seen: HashSet::new(),
            held: Vec::new(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || server.serve(&done, until))
            .expect("backend thread");
        ChaosUdpBackend {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ChaosUdpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(waker) = UdpSocket::bind(loopback_any_port()) {
            let _ = waker.send_to(b"", self.addr);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---- the clients ----------------------------------------------------------------------------

/// What a client expects of one datagram it sent, and what came of it.
struct Expect {
    copies: u32,
    len: usize,
    got: u32,
}

impl Expect {
    fn complete(&self) -> bool {
        self.got >= self.copies
    }
}

fn all_complete(sent: &[Expect]) -> bool {
    sent.iter().all(Expect::complete)
}

fn step_complete(sent: &[Expect], index: u32) -> bool {
    sent.get(index as usize).map_or(true, Expect::complete)
}

/// Checks one reply against what session `seed` sent: its payload length, and whether it is
/// the second copy of a reply sent twice.
fn verify_reply(d: &[u8], seed: u64, sent: &mut [Expect]) -> Result<(usize, bool), String> {
    if d.len() < REPLY_HEAD {
        return Err(format!("a {}-byte reply: cut", d.len()));
    }
    let (from, index, len) = (le_u64(d, 0), le_u32(d, 8), le_u32(d, 12) as usize);
    if from != seed {
        return Err(format!(
            "a reply of seed {from}: another session's datagram"
        ));
    }
    let Some(e) = sent.get_mut(index as usize) else {
        return Err(format!("a reply to datagram {index}, which was never sent"));
    };
    let carried = d.len() - REPLY_HEAD;
    if len != carried || len != e.len {
        return Err(format!(
            "reply {index} says {len} bytes, carries {carried}, and {} were sent: cut or merged",
            e.len
        ));
    }
    if d[REPLY_HEAD..] != payload(mix(seed, index, REPLY_SALT), len)[..] {
        return Err(format!("reply {index}: its bytes differ"));
    }
    e.got += 1;
    if e.got > e.copies {
        return Err(format!(
            "reply {index} came {} times, and was sent {}",
            e.got, e.copies
        ));
    }
    Ok((len, e.got > 1))
}

/// One client's session in progress.
struct Session<'a> {
    plan: Plan,
    socket: UdpSocket,
    port: u16,
    tally: &'a Tally,
    /// By index.
    sent: Vec<Expect>,
    buf: Vec<u8>,
    deadline: Instant,
    /// A violation was recorded: the rest of the session proves nothing more.
    broken: bool,
}

impl Session<'_> {
    fn send(&mut self, index: u32) {
        let (seed, len) = (self.plan.seed, self.plan.payload_len(index));
        let action = Action::of(seed, index, len);
        let datagram = request(seed, index, self.port, len);
        let copies = match self.socket.send(&datagram) {
            Ok(_) => {
                add(&self.tally.sent, 1);
                action.copies()
            }
            Err(_) => {
                add(&self.tally.unsent, 1);
                0
            }
        };
        self.sent.push(Expect {
            copies,
            len: action.reply_len(len),
            got: 0,
        });
    }

    /// Reads replies until `done` holds, `QUIET` passes with none, or the session's time is up.
    fn read_until(&mut self, done: impl Fn(&[Expect]) -> bool) {
        let mut last = Instant::now();
        for _ in 0..MAX_READS {
            let now = Instant::now();
            if self.broken || done(&self.sent) {
                return;
            }
            if now >= self.deadline || now.duration_since(last) >= QUIET {
                return;
            }
            match self.socket.recv(&mut self.buf) {
                Ok(n) => {
                    last = Instant::now();
                    self.take(n);
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => self.fail(format!("client: receive failed: {e}")),
            }
        }
    }

    fn take(&mut self, n: usize) {
        match verify_reply(&self.buf[..n], self.plan.seed, &mut self.sent) {
            Ok((len, again)) => {
                add(&self.tally.replies, 1);
                add(&self.tally.bytes_verified, len as u64);
                if again {
                    add(&self.tally.duplicates, 1);
                }
            }
            Err(why) => self.fail(format!("client: {why}")),
        }
    }

    fn fail(&mut self, why: String) {
        self.broken = true;
        self.tally.violation(self.plan.seed, why);
    }

    /// Counts what never came, for a session that read to its end.
    fn finish(self) {
        if self.broken {
            return;
        }
        let expected: u32 = self.sent.iter().map(|e| e.copies).sum();
        let got: u32 = self.sent.iter().map(|e| e.got).sum();
        add(&self.tally.expected, u64::from(expected));
        add(&self.tally.lost, u64::from(expected.saturating_sub(got)));
    }
}

/// A client socket on 127.0.0.1, on a port that no earlier session of this run had. sluice
/// keys sessions by the client's address: a reused port would join a session that may still
/// have late replies for the seed it had, which the checks would take for a cross-session leak.
fn fresh_socket(to: SocketAddr, used: &Mutex<HashSet<u16>>) -> io::Result<(UdpSocket, u16)> {
    // Kept open until a fresh port is found, so that the next bind cannot return them again.
    let mut passed_over = Vec::new();
    for _ in 0..16 {
        let socket = client_socket()?;
        let port = socket.local_addr()?.port();
        if used.lock().expect("ports").insert(port) {
            socket.connect(to)?;
            return Ok((socket, port));
        }
        passed_over.push(socket);
    }
    Err(io::Error::other("16 binds gave ports earlier sessions had"))
}

fn client_socket() -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // A burst's replies wait here until read (the kernel caps what is asked).
    let _ = socket.set_recv_buffer_size(1 << 20);
    socket.bind(&loopback_any_port().into())?;
    let socket = UdpSocket::from(socket);
    socket.set_read_timeout(Some(TURN))?;
    Ok(socket)
}

/// One session: a fresh socket, the plan's datagrams at its pace, every reply checked.
fn client(shared: &Shared<'_>, plan: Plan) {
    let (socket, port) = match fresh_socket(shared.addr, &shared.ports) {
        Ok(got) => got,
        Err(e) => {
            let why = format!("client: no socket: {e}");
            return shared.tally.violation(plan.seed, why);
        }
    };
    let mut s = Session {
        plan,
        socket,
        port,
        tally: shared.tally,
        sent: Vec::new(),
        buf: vec![0u8; 65_536],
        deadline: Instant::now() + SESSION_TIME,
        broken: false,
    };
    match plan.pace {
        Pace::Burst => {
            for index in 0..plan.datagrams {
                s.send(index);
            }
        }
        Pace::Lockstep => {
            for index in 0..plan.datagrams {
                s.send(index);
                s.read_until(|sent| step_complete(sent, index));
            }
        }
        Pace::Vanish(k) => {
            for index in 0..k {
                s.send(index);
                if index + 1 < k {
                    s.read_until(|sent| step_complete(sent, index));
                }
            }
            // Gone with replies due: they meet a closed port, and the session lingers in
            // sluice until its idle timeout.
            add(&shared.tally.vanished, 1);
            return;
        }
    }
    s.read_until(all_complete);
    s.finish();
}

// ---- the run --------------------------------------------------------------------------------

/// What the client threads of one run share.
struct Shared<'a> {
    addr: SocketAddr,
    proxy: &'a Proxy,
    config: &'a Config,
    tally: &'a Tally,
    next: AtomicU64,
    end: u64,
    reload_every: u64,
    reloads: AtomicU64,
    /// Client ports this run has used.
    ports: Mutex<HashSet<u16>>,
}

/// One client thread: sessions by seed until `end`, reloading the proxy every `reload_every`.
fn drive(shared: &Shared<'_>) {
    loop {
        let seed = shared.next.fetch_add(1, Ordering::Relaxed);
        if seed >= shared.end {
            return;
        }
        reload_at(shared, seed);
        client(shared, Plan::from_seed(seed));
        add(&shared.tally.sessions, 1);
    }
}

fn reload_at(shared: &Shared<'_>, seed: u64) {
    if shared.reload_every == 0 || seed % shared.reload_every != 0 {
        return;
    }
    let mut config = shared.config.clone();
    // A change every reload: the idle timeout alternates between 2 s and 1 s.
    let step = seed / shared.reload_every;
    config.listeners[0].idle_timeout = Duration::from_secs(1 + step % 2);
    if shared.proxy.reload(config).is_ok() {
        add(&shared.reloads, 1);
    }
}

/// A UDP listener on 127.0.0.1 in front of `backend`, open to loopback only, with sessions that
/// expire soon after their last datagram; PROXY v2 headers on every datagram if asked.
fn chaos_config(backend: SocketAddr, proxy_protocol: bool) -> Config {
    let header = if proxy_protocol {
        "  proxy_protocol v2;\n  proxy_protocol_udp every;\n"
    } else {
        ""
    };
    let text = format!(
        "access_log off;\nallow 127.0.0.0/8;\ndeny all;\n\
         listen udp 127.0.0.1:0 {{\n  proxy {backend};\n  idle_timeout 1s;\n{header}}}\n"
    );
    Config::parse(&text, "chaos_udp.conf").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Prints the run's figures in one line.
fn summary(shared: &Shared<'_>, first: u64, proxy_protocol: bool, took: Duration) {
    let (t, stats) = (shared.tally, shared.proxy.stats());
    let violations = t.violations.lock().expect("violations").len();
    println!(
        "chaos_udp, PROXY headers {}: {} sessions (seeds {first}..{}) in {:.1} s, {} vanished; \
         {} datagrams sent ({} refused by the kernel), {} reached the server; {} replies came, \
         {} of them second copies; {} of {} lost; {} bytes verified; {} reloads; sluice \
         opened {} sessions and dropped {} datagrams; {violations} violations",
        if proxy_protocol { "on" } else { "off" },
        load(&t.sessions),
        shared.end,
        took.as_secs_f64(),
        load(&t.vanished),
        load(&t.sent),
        load(&t.unsent),
        load(&t.server_got),
        load(&t.replies),
        load(&t.duplicates),
        load(&t.lost),
        load(&t.expected),
        load(&t.bytes_verified),
        load(&shared.reloads),
        load(&stats.udp_sessions_total),
        load(&stats.udp_dropped),
    );
}

/// `sessions` sessions with seeds from `first`, 16 at a time, through one proxy.
fn run(first: u64, sessions: u64, proxy_protocol: bool, reload_every: u64) {
    raise_fd_limit();
    let fds_before = open_fds();
    let tally = Arc::new(Tally::default());
    let listener_port = Arc::new(AtomicU16::new(0));
    // Far beyond what the run takes: only a hung run meets it.
    let until = Instant::now() + Duration::from_millis(60_000 + 100 * sessions);
    let backend = ChaosUdpBackend::start(
        Arc::clone(&tally),
        proxy_protocol,
        Arc::clone(&listener_port),
        until,
    );
    let config = chaos_config(backend.addr, proxy_protocol);
    let proxy = Proxy::start(config.clone()).expect("the proxy starts");
    let addr = proxy.local_addr(0).expect("listener");
    listener_port.store(addr.port(), Ordering::Relaxed);
    let shared = Shared {
        addr,
        proxy: &proxy,
        config: &config,
        tally: &tally,
        next: AtomicU64::new(first),
        end: first + sessions,
        reload_every,
        reloads: AtomicU64::new(0),
        ports: Mutex::new(HashSet::new()),
    };
    let started = Instant::now();
    thread::scope(|scope| {
        for _ in 0..THREADS {
            let shared = &shared;
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || drive(shared))
                .expect("client thread");
        }
    });
    let took = started.elapsed();
    let stats = proxy.stats_handle();
    // Every session ends by its idle timeout, 1 or 2 s after its last datagram.
    let expired = wait_until(EVENTUALLY, || load(&stats.udp_sessions_active) == 0);
    summary(&shared, first, proxy_protocol, took);
    drop(shared);
    assert!(
        expired,
        "{} sessions still open after the run",
        load(&stats.udp_sessions_active)
    );
    let violations = tally.violations.lock().expect("violations").clone();
    assert!(
        violations.is_empty(),
        "{} violations, the first ones:\n{}",
        violations.len(),
        violations[..violations.len().min(20)].join("\n")
    );
    let (expected, lost) = (load(&tally.expected), load(&tally.lost));
    assert!(
        lost * 20 <= expected,
        "{lost} of {expected} replies lost: on loopback at most 5% may be"
    );
    drop(proxy);
    drop(backend);
    // The backend's thread and socket are gone once it is dropped; the proxy's with it.
    assert_descriptors_back(fds_before);
}

/// One test, so the two runs do not share the process's descriptor count.
#[test]
fn chaos_udp_short() {
    run(1, 200, false, 50);
    run(500_001, 200, true, 50);
}

/// CHAOS_CONNECTIONS sessions (default 5,000) from CHAOS_SEED (default 1), half without PROXY
/// headers and half with.
#[test]
#[ignore]
fn chaos_udp_long() {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (seed, n) = (var("CHAOS_SEED", 1), var("CHAOS_CONNECTIONS", 5000));
    run(seed, n.div_ceil(2), false, 250);
    run(seed + n.div_ceil(2), n / 2, true, 250);
}
