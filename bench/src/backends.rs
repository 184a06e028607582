//! The servers the proxies forward to, run inside the bench process on the load generator's CPUs.
//!
//! A TCP backend is one thread with a level-triggered epoll loop over its listener and all its
//! connections, so it serves one stream or ten thousand idle ones the same way, without a thread
//! per connection. Its `Mode` says what a connection does:
//! - `Echo`: write back every byte read (request/response, ping-pong, idle);
//! - `EchoClose(n)`: echo, and close once `n` bytes went back, so the backend sends the first FIN
//!   and the TIME_WAIT state lands on the listening side, not on the client's ephemeral ports
//!   (churn would otherwise run out of ports in a few seconds);
//! - `Sink`: read and count (upload throughput, counted at the receiver);
//! - `Source`: write as fast as the peer takes it (download throughput).
//!
//! The UDP backend echoes each datagram to its sender. Every backend binds 127.0.0.1 only and
//! stops (its thread joined) when dropped.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::sys::{Event, Poller};

/// How a backend connection behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Echo,
    EchoClose(usize),
    Sink,
    Source,
}

/// How long a backend waits in `epoll_wait` before looking at its stop flag.
const TICK: Duration = Duration::from_millis(50);
/// Connections accepted per loop turn before serving the others.
const ACCEPT_BUDGET: usize = 256;
/// An echo connection stops reading while this much is still waiting to go back.
const ECHO_BACKLOG: usize = 1 << 20;
const CHUNK: usize = 64 * 1024;
const LISTENER_KEY: u64 = u64::MAX;

struct Conn {
    stream: TcpStream,
    /// Bytes read but not yet written back (echo modes).
    pending: VecDeque<u8>,
    echoed: usize,
    reading: bool,
    writing: bool,
}

/// A running TCP backend. Dropping it stops the thread and closes every connection.
pub struct TcpBackend {
    addr: SocketAddr,
    /// Bytes read from all connections (what a `Sink` received).
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpBackend {
    pub fn start(mode: Mode) -> io::Result<TcpBackend> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = Server {
            mode,
            listener,
            poller: Poller::new()?,
            conns: Vec::new(),
            free: Vec::new(),
            received: received.clone(),
            scratch: vec![0u8; CHUNK],
        };
        server
            .poller
            .add(server.listener.as_raw_fd(), LISTENER_KEY, true, false)?;
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("backend-{}", addr.port()))
            .spawn(move || server.run(&flag))?;
        Ok(TcpBackend {
            addr,
            received,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Server {
    mode: Mode,
    listener: TcpListener,
    poller: Poller,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    received: Arc<AtomicU64>,
    scratch: Vec<u8>,
}

impl Server {
    fn run(&mut self, stop: &AtomicBool) {
        let mut events = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = self.poller.wait(&mut events, TICK) {
                eprintln!("backend: epoll_wait: {e}");
                return;
            }
            for ev in events.iter().copied() {
                if ev.key == LISTENER_KEY {
                    self.accept();
                } else {
                    self.serve(ev);
                }
            }
        }
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPT_BUDGET {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // EMFILE and friends: the run will show errors on the client side.
                Err(_) => return,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let writing = self.mode == Mode::Source;
            let slot = match self.free.pop() {
                Some(i) => i,
                None => {
                    self.conns.push(None);
                    self.conns.len() - 1
                }
            };
            if self
                .poller
                .add(stream.as_raw_fd(), slot as u64, true, writing)
                .is_err()
            {
                self.free.push(slot);
                continue;
            }
            self.conns[slot] = Some(Conn {
                stream,
                pending: VecDeque::new(),
                echoed: 0,
                reading: true,
                writing,
            });
        }
    }

    fn serve(&mut self, ev: Event) {
        let slot = ev.key as usize;
        let Some(Some(conn)) = self.conns.get_mut(slot) else {
            return;
        };
        let open = match self.mode {
            Mode::Sink => sink(conn, &mut self.scratch, &self.received),
            Mode::Source => source(conn, ev, &mut self.scratch),
            Mode::Echo => echo(conn, ev, &mut self.scratch, &self.received, None),
            Mode::EchoClose(n) => echo(conn, ev, &mut self.scratch, &self.received, Some(n)),
        };
        let keep = open.unwrap_or(false);
        if !keep {
            if let Some(conn) = self.conns[slot].take() {
                let _ = self.poller.delete(conn.stream.as_raw_fd());
            }
            self.free.push(slot);
            return;
        }
        // Echo connections switch interest with their backlog; the one place that decides it.
        if let Some(conn) = self.conns[slot].as_mut() {
            let want_write = !conn.pending.is_empty() || self.mode == Mode::Source;
            let want_read = conn.pending.len() < ECHO_BACKLOG;
            if want_write != conn.writing || want_read != conn.reading {
                conn.writing = want_write;
                conn.reading = want_read;
                let fd = conn.stream.as_raw_fd();
                let _ = self.poller.modify(fd, slot as u64, want_read, want_write);
            }
        }
    }
}

/// Reads what is there and counts it. `Ok(false)`: the peer closed.
fn sink(conn: &mut Conn, scratch: &mut [u8], received: &AtomicU64) -> io::Result<bool> {
    for _ in 0..16 {
        match conn.stream.read(scratch) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Writes as much as the peer takes; reads only to notice that the peer closed.
fn source(conn: &mut Conn, ev: Event, scratch: &mut [u8]) -> io::Result<bool> {
    if ev.readable || ev.closed {
        match conn.stream.read(scratch) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    if ev.writable {
        for _ in 0..16 {
            match conn.stream.write(&scratch[..CHUNK.min(scratch.len())]) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(true)
}

/// Echoes; with `close_after`, closes once that many bytes went back.
fn echo(
    conn: &mut Conn,
    ev: Event,
    scratch: &mut [u8],
    received: &AtomicU64,
    close_after: Option<usize>,
) -> io::Result<bool> {
    let mut peer_closed = false;
    if (ev.readable || ev.closed) && conn.pending.len() < ECHO_BACKLOG {
        match conn.stream.read(scratch) {
            Ok(0) => peer_closed = true,
            Ok(n) => {
                received.fetch_add(n as u64, Ordering::Relaxed);
                conn.pending.extend(&scratch[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    while !conn.pending.is_empty() {
        let (front, _) = conn.pending.as_slices();
        match conn.stream.write(front) {
            Ok(n) => {
                conn.pending.drain(..n);
                conn.echoed += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    if close_after.is_some_and(|n| conn.echoed >= n) && conn.pending.is_empty() {
        return Ok(false);
    }
    // A peer that half-closed still gets what it sent; close once it is all back.
    Ok(!(peer_closed && conn.pending.is_empty()))
}

/// A UDP echo server on one thread. Dropping it stops the thread.
pub struct UdpBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpBackend {
    pub fn start() -> io::Result<UdpBackend> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(TICK))?;
        let addr = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("backend-udp".into())
            .spawn(move || {
                let mut buf = [0u8; 2048];
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        // A full socket buffer drops the reply: that is loss the client counts.
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })?;
        Ok(UdpBackend {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
