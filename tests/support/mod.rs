//! Helpers for the UDP and upstream integration tests: loopback backends that say who they are
//! and count what they see, a condition poller with a deadline, TCP client shortcuts, and a guard
//! around the `sluice` binary.
//!
//! Everything binds 127.0.0.1 only. Nothing here sleeps to synchronise: waits poll a condition
//! with a deadline, and blocking reads carry timeouts so a broken proxy fails a test instead of
//! hanging it.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sluice::config::Config;
use sluice::runtime::Proxy;

/// Where every test socket binds: loopback, a port the kernel picks.
pub const LOCAL: &str = "127.0.0.1:0";
/// Upper bound for one blocking read or connect of a test client.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `wait_until` looks at its condition.
const POLL_EVERY: Duration = Duration::from_millis(5);

/// Parses `conf` and starts a proxy; panics with the config text on any error.
pub fn start(conf: &str) -> Proxy {
    let config = Config::parse(conf, "test.conf")
        .unwrap_or_else(|e| panic!("config does not parse: {e}\n{conf}"));
    Proxy::start(config).unwrap_or_else(|e| panic!("proxy does not start: {e}"))
}

pub fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Polls `cond` until it holds and returns how long that took; panics naming `what` once
/// `limit` has passed.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        thread::sleep(POLL_EVERY);
    }
}

/// A loopback TCP port where nothing listens: connects to `addr` are refused. A socket bound
/// to it, never listening, holds the port while this lives, so a parallel test's `bind(0)` cannot
/// pick it up and start answering there.
pub struct RefusedTcp {
    pub addr: SocketAddr,
    _holder: socket2::Socket,
}

pub fn refused_tcp() -> RefusedTcp {
    use socket2::{Domain, Protocol, Socket, Type};
    let holder = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("tcp socket");
    let any: SocketAddr = LOCAL.parse().expect("addr");
    holder.bind(&any.into()).expect("bind tcp");
    let addr = holder
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("local addr");
    RefusedTcp {
        addr,
        _holder: holder,
    }
}

/// A loopback UDP port where no server takes datagrams: they draw an ICMP port unreachable,
/// exactly as for an unbound port. The port is held by a socket connected to itself, which the
/// kernel matches only for datagrams from its own address, so no parallel test can bind it.
pub struct DeadUdp {
    pub addr: SocketAddr,
    _holder: UdpSocket,
}

pub fn dead_udp() -> DeadUdp {
    let holder = UdpSocket::bind(LOCAL).expect("bind udp");
    let addr = holder.local_addr().expect("local addr");
    holder.connect(addr).expect("connect to itself");
    DeadUdp {
        addr,
        _holder: holder,
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so a reply can be checked byte for byte.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

// ---- UDP backends -------------------------------------------------------------------------------

/// What a UDP backend sends back for each datagram.
#[derive(Clone, Copy, Debug)]
pub enum UdpReply {
    /// The datagram itself.
    Echo,
    /// Its own name, `copies` times.
    Name { copies: usize },
}

#[derive(Default)]
struct UdpShared {
    stop: AtomicBool,
    sizes: Mutex<Vec<usize>>,
    peers: Mutex<HashSet<SocketAddr>>,
}

/// A UDP server on 127.0.0.1 that records the size of every datagram and who sent it.
pub struct UdpBackend {
    pub addr: SocketAddr,
    pub name: String,
    shared: Arc<UdpShared>,
    thread: Option<JoinHandle<()>>,
}

impl UdpBackend {
    pub fn echo(name: &str) -> UdpBackend {
        UdpBackend::spawn(name, UdpReply::Echo)
    }

    pub fn named(name: &str, copies: usize) -> UdpBackend {
        UdpBackend::spawn(name, UdpReply::Name { copies })
    }

    pub fn spawn(name: &str, reply: UdpReply) -> UdpBackend {
        let socket = UdpSocket::bind(LOCAL).expect("bind udp backend");
        let addr = socket.local_addr().expect("local addr");
        // Only so that a stop request whose wake-up datagram was dropped is still seen.
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        let shared = Arc::new(UdpShared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            let name = name.to_string();
            thread::spawn(move || serve_udp(socket, &name, reply, &shared))
        };
        UdpBackend {
            addr,
            name: name.to_string(),
            shared,
            thread: Some(thread),
        }
    }

    /// Sizes of the datagrams received, in order.
    pub fn sizes(&self) -> Vec<usize> {
        self.shared.sizes.lock().expect("sizes").clone()
    }

    pub fn received(&self) -> usize {
        self.shared.sizes.lock().expect("sizes").len()
    }

    /// The distinct source addresses datagrams came from (one per proxy session).
    pub fn peers(&self) -> HashSet<SocketAddr> {
        self.shared.peers.lock().expect("peers").clone()
    }
}

fn serve_udp(socket: UdpSocket, name: &str, reply: UdpReply, shared: &UdpShared) {
    let mut buf = vec![0u8; 65_536];
    while !shared.stop.load(Ordering::Relaxed) {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(_) => continue,
        };
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        shared.sizes.lock().expect("sizes").push(n);
        shared.peers.lock().expect("peers").insert(peer);
        // A reply that finds the peer's buffer full is lost, as UDP goes.
        match reply {
            UdpReply::Echo => {
                let _ = socket.send_to(&buf[..n], peer);
            }
            UdpReply::Name { copies } => {
                for _ in 0..copies {
                    let _ = socket.send_to(name.as_bytes(), peer);
                }
            }
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Ok(waker) = UdpSocket::bind(LOCAL) {
            let _ = waker.send_to(b"", self.addr);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP client socket on 127.0.0.1 with a read timeout.
pub fn udp_client(read_timeout: Duration) -> UdpSocket {
    let socket = UdpSocket::bind(LOCAL).expect("bind udp client");
    socket
        .set_read_timeout(Some(read_timeout))
        .expect("read timeout");
    socket
}

pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Sends `payload` to `to` and returns the first reply that `accept` takes, resending up to
/// `tries` times when the read times out. Replies `accept` refuses (late answers to earlier
/// sends) are skipped, at most `max_skips` of them. Every reply must come from `to`.
pub fn exchange_with(
    socket: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
    tries: usize,
    max_skips: usize,
    mut accept: impl FnMut(&[u8]) -> bool,
) -> Vec<u8> {
    let mut buf = vec![0u8; 65_536];
    let mut skipped = 0;
    for _ in 0..tries {
        socket.send_to(payload, to).expect("send to the proxy");
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    assert_eq!(from, to, "a reply came from another address");
                    if accept(&buf[..n]) {
                        return buf[..n].to_vec();
                    }
                    skipped += 1;
                    assert!(skipped <= max_skips, "more than {max_skips} stray replies");
                }
                Err(e) if is_timeout(&e) => break,
                Err(e) => panic!("receive from the proxy failed: {e}"),
            }
        }
    }
    panic!(
        "no reply to a {}-byte datagram after {tries} tries",
        payload.len()
    );
}

/// Sends `payload` and returns the first reply, resending on loss.
pub fn exchange(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    exchange_with(socket, to, payload, 5, 0, |_| true)
}

// ---- TCP backends -------------------------------------------------------------------------------

/// How a TCP backend treats a connection. Every mode starts by writing `NAME\n`, except `Line`,
/// which first reads one line.
#[derive(Clone, Copy, Debug)]
pub enum TcpReply {
    /// Writes its name and closes.
    Greet,
    /// Writes its name, then echoes until the peer finishes, then closes: a long connection
    /// for as long as the client keeps it open.
    Echo,
    /// Reads one line: `PING\r\n` (a health probe) gets `ping_answer`, anything else gets the
    /// name; then closes.
    Line { ping_answer: &'static [u8] },
}

#[derive(Default)]
struct TcpShared {
    accepted: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
    /// Connections that got the name (clients, as opposed to `PING` probes in `Line` mode).
    served: AtomicUsize,
    pings: AtomicUsize,
}

/// A TCP server on 127.0.0.1 that can be killed (its listening socket closed, so connects are
/// refused) and brought back on the same port.
pub struct TcpBackend {
    pub addr: SocketAddr,
    pub name: String,
    reply: TcpReply,
    shared: Arc<TcpShared>,
    running: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl TcpBackend {
    pub fn spawn(name: &str, reply: TcpReply) -> TcpBackend {
        let listener = listen_tcp(LOCAL.parse().expect("addr")).expect("bind tcp backend");
        let addr = listener.local_addr().expect("local addr");
        let mut backend = TcpBackend {
            addr,
            name: name.to_string(),
            reply,
            shared: Arc::new(TcpShared::default()),
            running: None,
        };
        backend.serve(listener);
        backend
    }

    pub fn greet(name: &str) -> TcpBackend {
        TcpBackend::spawn(name, TcpReply::Greet)
    }

    pub fn echo(name: &str) -> TcpBackend {
        TcpBackend::spawn(name, TcpReply::Echo)
    }

    fn serve(&mut self, listener: TcpListener) {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            let shared = Arc::clone(&self.shared);
            let name = self.name.clone();
            let reply = self.reply;
            thread::spawn(move || accept_loop(listener, &name, reply, &shared, &stop))
        };
        self.running = Some((stop, thread));
    }

    /// Closes the listening socket: from the return on, connects to `addr` are refused.
    /// Connections already accepted carry on.
    pub fn kill(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            stop.store(true, Ordering::SeqCst);
            // Wakes the blocking accept; the loop sees `stop` and drops the listener.
            let _ = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT);
            let _ = thread.join();
        }
    }

    /// Listens on the same port again (SO_REUSEADDR, so connections of the earlier life still
    /// in TIME_WAIT do not block the bind).
    pub fn restart(&mut self) {
        assert!(self.running.is_none(), "restart of a running backend");
        let deadline = Instant::now() + IO_TIMEOUT;
        let listener = loop {
            match listen_tcp(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {} failed ({e}); retrying", self.addr);
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    pub fn max_active(&self) -> usize {
        self.shared.max_active.load(Ordering::SeqCst)
    }

    pub fn served(&self) -> usize {
        self.shared.served.load(Ordering::SeqCst)
    }

    pub fn pings(&self) -> usize {
        self.shared.pings.load(Ordering::SeqCst)
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn listen_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

fn accept_loop(
    listener: TcpListener,
    name: &str,
    reply: TcpReply,
    shared: &Arc<TcpShared>,
    stop: &AtomicBool,
) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let now = shared.active.fetch_add(1, Ordering::SeqCst) + 1;
                shared.max_active.fetch_max(now, Ordering::SeqCst);
                let shared = Arc::clone(shared);
                let name = name.to_string();
                thread::spawn(move || {
                    let _ = handle_tcp(stream, &name, reply, &shared);
                    shared.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            // Out of descriptors and the like: let the moment pass instead of spinning.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn handle_tcp(
    mut stream: TcpStream,
    name: &str,
    reply: TcpReply,
    shared: &TcpShared,
) -> io::Result<()> {
    // A connection the proxy forgets must not pin a thread forever.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let greeting = format!("{name}\n");
    match reply {
        TcpReply::Greet => {
            shared.served.fetch_add(1, Ordering::SeqCst);
            stream.write_all(greeting.as_bytes())
        }
        TcpReply::Echo => {
            shared.served.fetch_add(1, Ordering::SeqCst);
            stream.write_all(greeting.as_bytes())?;
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf)? {
                    0 => return Ok(()),
                    n => stream.write_all(&buf[..n])?,
                }
            }
        }
        TcpReply::Line { ping_answer } => {
            let mut line = Vec::new();
            BufReader::new(&mut stream)
                .take(256)
                .read_until(b'\n', &mut line)?;
            if line == b"PING\r\n" {
                shared.pings.fetch_add(1, Ordering::SeqCst);
                stream.write_all(ping_answer)
            } else {
                shared.served.fetch_add(1, Ordering::SeqCst);
                stream.write_all(greeting.as_bytes())
            }
        }
    }
}

// ---- TCP clients --------------------------------------------------------------------------------

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// One whole connection through the proxy: sends `hello`, finishes the write side, reads to the
/// end and returns the first line (the backend's name). When this returns, the proxy has closed
/// the pair (the server's end of stream is forwarded only after the client's).
pub fn fetch_name_with(addr: SocketAddr, hello: &[u8]) -> io::Result<String> {
    let mut stream = connect(addr)?;
    stream.write_all(hello)?;
    stream.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    match text.lines().next() {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("closed without a name (got {out:?})"),
        )),
    }
}

pub fn fetch_name(addr: SocketAddr) -> io::Result<String> {
    fetch_name_with(addr, b"")
}

/// A connection kept open through the proxy, after its backend said its name.
pub struct Held {
    pub name: String,
    stream: TcpStream,
}

/// Opens a connection and reads the greeting line (an `Echo` backend keeps it open).
pub fn hold(addr: SocketAddr) -> io::Result<Held> {
    let stream = connect(addr)?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match (&stream).read(&mut byte)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the name",
                ))
            }
            _ => line.push(byte[0]),
        }
        if line.len() > 256 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no newline"));
        }
    }
    let name = String::from_utf8_lossy(&line).trim_end().to_string();
    Ok(Held { name, stream })
}

impl Held {
    /// Finishes the connection cleanly: write side shut, read to the end. On return the proxy
    /// has closed the pair and released the server.
    pub fn finish(mut self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest)?;
        Ok(())
    }
}

// ---- the binary ---------------------------------------------------------------------------------

/// Which kind of port the binary listens on, to pick a free one of that kind.
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Tcp,
    Udp,
}

fn free_port(transport: Transport) -> u16 {
    match transport {
        Transport::Tcp => TcpListener::bind(LOCAL)
            .and_then(|l| l.local_addr())
            .expect("free tcp port")
            .port(),
        Transport::Udp => UdpSocket::bind(LOCAL)
            .and_then(|s| s.local_addr())
            .expect("free udp port")
            .port(),
    }
}

/// A running `sluice` process, killed when dropped. Its stderr (the log) is collected.
pub struct Sluice {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Sluice {
    /// Starts the binary listening on a free loopback port: `args` gets `127.0.0.1:PORT` and
    /// returns the arguments. Returns once the log says it is listening; picks another port
    /// (at most 5 times) when that one was taken in between.
    pub fn start(transport: Transport, args: impl Fn(&str) -> Vec<String>) -> Sluice {
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port(transport)));
            let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args(args(&addr.to_string()))
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn sluice");
            let stderr = child.stderr.take().expect("stderr");
            let log = Arc::new(Mutex::new(Vec::new()));
            let (tx, rx) = mpsc::channel();
            {
                let log = Arc::clone(&log);
                thread::spawn(move || {
                    for line in BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        log.lock().expect("log").push(line.clone());
                        let _ = tx.send(line);
                    }
                });
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(line) if line.contains("listening on") => {
                        return Sluice { child, addr, log };
                    }
                    Ok(_) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!("sluice did not say it listens: {:?}", log.lock());
                    }
                }
            }
            // stderr closed: the process exited; a port taken in between is worth another go.
            let status = child.wait().expect("wait for sluice");
            let lines = log.lock().expect("log").clone();
            assert!(
                lines.iter().any(|l| l.contains("cannot listen")),
                "sluice exited ({status}) before listening: {lines:?}"
            );
        }
        panic!("no free port for sluice after 5 tries");
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
