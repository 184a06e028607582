//! TCP backends on 127.0.0.1 in std threads, one thread per connection: data modes (echo,
//! stream, sink, ...) for the pair tests and modes that say their name (`greet`, `greet_echo`,
//! `line`) for the balancing tests. A backend counts its connections, can be killed (its
//! listening socket closed, so connects are refused) and restarted on the same port, and stops
//! when it is dropped: its acceptor is woken by a connect to itself and its connections are shut
//! down through a duplicate descriptor, so no thread outlives the test that made it. Also the
//! full-backlog listener that makes a connect hang, and a port that refuses.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{
    loopback_any_port, raise_fd_limit, wait_until, write_payload, Checksum, IO_TIMEOUT,
    THREAD_STACK,
};

/// What a backend connection reports to its test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The first bytes of a connection arrived.
    Data,
    /// The peer finished sending: the read returned 0 (`reset: false`) or failed (`reset: true`).
    Ended {
        received: u64,
        checksum: u64,
        reset: bool,
        at: Instant,
    },
}

/// What a backend runs for every accepted connection.
type Handler = dyn Fn(&mut TcpStream, &Ctx) + Send + Sync;

struct Shared {
    stopped: Mutex<bool>,
    stop_signal: Condvar,
    /// A duplicate of every open connection, so `drop` can shut them down. A handler removes
    /// its duplicate before its own socket closes, so close semantics (FIN, or RST after
    /// `SO_LINGER 0`) are the handler's.
    conns: Mutex<HashMap<u64, TcpStream>>,
    /// Keys of `conns`, unique over every life of the listening socket.
    next_id: AtomicU64,
    handlers: Mutex<Vec<JoinHandle<()>>>,
    accepted: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
    /// Connections that got the name (clients, as opposed to `PING` probes in `line` mode).
    served: AtomicUsize,
    pings: AtomicUsize,
    events: Mutex<mpsc::Sender<Event>>,
}

impl Shared {
    fn is_stopped(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a backend handler may use besides its socket.
pub struct Ctx {
    shared: Arc<Shared>,
}

impl Ctx {
    /// Blocks until the backend is dropped.
    pub fn wait_stop(&self) {
        let mut stopped = self
            .shared
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while !*stopped {
            stopped = self
                .shared
                .stop_signal
                .wait(stopped)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn report(&self, event: Event) {
        let tx = self.shared.events.lock().unwrap_or_else(|e| e.into_inner());
        let _ = tx.send(event);
    }

    /// Counts a connection that got the backend's name (see `Backend::served`).
    pub fn count_served(&self) {
        self.shared.served.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts a health probe answered (see `Backend::pings`).
    pub fn count_ping(&self) {
        self.shared.pings.fetch_add(1, Ordering::SeqCst);
    }
}

/// The accept thread of one life of the listening socket, which it owns.
struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// A TCP server on 127.0.0.1 with one thread per connection.
pub struct Backend {
    addr: SocketAddr,
    socket_buffers: Option<usize>,
    handler: Arc<Handler>,
    shared: Arc<Shared>,
    /// `None` while killed.
    acceptor: Option<Acceptor>,
    events: Mutex<mpsc::Receiver<Event>>,
}

impl Backend {
    /// A server that runs `handler` for every accepted connection, then closes it.
    pub fn spawn(handler: impl Fn(&mut TcpStream, &Ctx) + Send + Sync + 'static) -> Backend {
        Backend::spawn_with_buffers(None, handler)
    }

    /// Like `spawn`; with `Some(bytes)`, every accepted socket has send and receive buffers of
    /// about that size (inherited from the listener), so the backend pushes back early.
    pub fn spawn_with_buffers(
        socket_buffers: Option<usize>,
        handler: impl Fn(&mut TcpStream, &Ctx) + Send + Sync + 'static,
    ) -> Backend {
        raise_fd_limit();
        let listener = listen(loopback_any_port(), socket_buffers).expect("backend listen");
        let addr = listener.local_addr().expect("backend address");
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            stopped: Mutex::new(false),
            stop_signal: Condvar::new(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            handlers: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            pings: AtomicUsize::new(0),
            events: Mutex::new(tx),
        });
        let mut backend = Backend {
            addr,
            socket_buffers,
            handler: Arc::new(handler),
            shared,
            acceptor: None,
            events: Mutex::new(rx),
        };
        backend.serve(listener);
        backend
    }

    /// Starts an acceptor on `listener`.
    fn serve(&mut self, listener: TcpListener) {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            let shared = Arc::clone(&self.shared);
            let handler = Arc::clone(&self.handler);
            std::thread::Builder::new()
                .name(format!("backend-{}", self.addr.port()))
                .stack_size(THREAD_STACK)
                .spawn(move || accept_loop(listener, &stop, shared, handler))
                .expect("backend acceptor thread")
        };
        self.acceptor = Some(Acceptor { stop, thread });
    }

    /// Writes back everything it reads; on EOF shuts down its write side and closes.
    pub fn echo() -> Backend {
        Backend::echo_with_buffers(None)
    }

    /// An echo whose sockets have send and receive buffers of about `socket_buffers` bytes.
    pub fn echo_with_buffers(socket_buffers: Option<usize>) -> Backend {
        Backend::spawn_with_buffers(socket_buffers, |s, _| echo_to_eof(s))
    }

    /// Reads until EOF (reporting what came), then writes `answer` and closes.
    pub fn answer_after_eof(answer: Vec<u8>) -> Backend {
        Backend::spawn(move |s, ctx| {
            let Some(ended) = read_to_end_report(s, ctx) else {
                return;
            };
            if ended {
                let _ = s.write_all(&answer);
                let _ = s.shutdown(Shutdown::Write);
            }
        })
    }

    /// Sends `len` bytes of the stream for `seed`, shuts down its write side, then keeps
    /// reading until EOF (reporting what came) before it closes.
    pub fn stream(len: u64, seed: u64) -> Backend {
        Backend::spawn(move |s, ctx| {
            if write_payload(s, seed, len).is_err() {
                return;
            }
            let _ = s.shutdown(Shutdown::Write);
            read_to_end_report(s, ctx);
        })
    }

    /// Writes `name` (no newline) on connect, then reads until EOF and closes.
    pub fn name(name: &str) -> Backend {
        let name = name.as_bytes().to_vec();
        Backend::spawn(move |s, _| {
            if s.write_all(&name).is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        })
    }

    /// Writes `NAME\n` (counted as served) and closes at once: each whole connection tells which
    /// backend took it.
    pub fn greet(name: &str) -> Backend {
        let greeting = format!("{name}\n").into_bytes();
        Backend::spawn(move |s, ctx| {
            ctx.count_served();
            let _ = s.write_all(&greeting);
        })
    }

    /// Writes `NAME\n` (counted as served), then echoes until the peer finishes: a long
    /// connection for as long as the client keeps it open.
    pub fn greet_echo(name: &str) -> Backend {
        let greeting = format!("{name}\n").into_bytes();
        Backend::spawn(move |s, ctx| {
            ctx.count_served();
            if s.write_all(&greeting).is_ok() {
                echo_to_eof(s);
            }
        })
    }

    /// Reads one line: `PING\r\n` (a health probe, counted as a ping) gets `ping_answer`,
    /// anything else gets `NAME\n` (counted as served); then closes.
    pub fn line(name: &str, ping_answer: &'static [u8]) -> Backend {
        let greeting = format!("{name}\n").into_bytes();
        Backend::spawn(move |s, ctx| {
            let mut line = Vec::new();
            if BufReader::new(&mut *s)
                .take(256)
                .read_until(b'\n', &mut line)
                .is_err()
            {
                return;
            }
            if line == b"PING\r\n" {
                ctx.count_ping();
                let _ = s.write_all(ping_answer);
            } else {
                ctx.count_served();
                let _ = s.write_all(&greeting);
            }
        })
    }

    /// Sends `len` bytes of the stream for `seed`, waits for one byte from the client, then
    /// resets the connection (`SO_LINGER 0`, close) without finishing the stream.
    pub fn reset_mid_stream(len: u64, seed: u64) -> Backend {
        Backend::spawn(move |s, _| {
            if write_payload(s, seed, len).is_err() {
                return;
            }
            let mut go = [0u8; 1];
            if !matches!(s.read(&mut go), Ok(1)) {
                return;
            }
            let _ = socket2::SockRef::from(&*s).set_linger(Some(Duration::ZERO));
        })
    }

    /// Reads and discards until EOF or error (reporting both), never answers, and keeps the
    /// connection open until the backend is dropped.
    pub fn sink() -> Backend {
        Backend::spawn(|s, ctx| {
            if read_to_end_report(s, ctx).is_some() {
                ctx.wait_stop();
            }
        })
    }

    /// Closes the listening socket: from the return on, connects to `addr` are refused.
    /// Connections already accepted carry on.
    pub fn kill(&mut self) {
        assert!(
            self.stop_acceptor(),
            "the acceptor of {} did not wake: its listener may still be open",
            self.addr
        );
    }

    /// Listens on the same port again (SO_REUSEADDR, so connections of the earlier life still
    /// in TIME_WAIT do not block the bind).
    pub fn restart(&mut self) {
        assert!(self.acceptor.is_none(), "restart of a running backend");
        let mut listener = None;
        let mut failure = None;
        wait_until(IO_TIMEOUT, || {
            match listen(self.addr, self.socket_buffers) {
                Ok(l) => {
                    listener = Some(l);
                    true
                }
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        });
        let listener =
            listener.unwrap_or_else(|| panic!("cannot rebind {}: {:?}", self.addr, failure));
        self.serve(listener);
    }

    /// Stops the acceptor, which closes the listening socket; false if it could not be woken
    /// (then it stays detached and exits on its next accept).
    fn stop_acceptor(&mut self) -> bool {
        let Some(acceptor) = self.acceptor.take() else {
            return true;
        };
        acceptor.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept; the loop sees `stop` and drops the listener.
        let woke = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT).is_ok();
        if woke {
            let _ = acceptor.thread.join();
        }
        woke
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections whose handler is still running.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// The most connections whose handlers ran at once.
    pub fn max_active(&self) -> usize {
        self.shared.max_active.load(Ordering::SeqCst)
    }

    /// Connections that got the name (`greet`, `greet_echo`, `line`).
    pub fn served(&self) -> usize {
        self.shared.served.load(Ordering::SeqCst)
    }

    /// `PING` probes answered (`line`).
    pub fn pings(&self) -> usize {
        self.shared.pings.load(Ordering::SeqCst)
    }

    /// The next event a connection reported, waiting at most `within`.
    pub fn next_event(&self, within: Duration) -> Option<Event> {
        let rx = self.events.lock().unwrap_or_else(|e| e.into_inner());
        rx.recv_timeout(within).ok()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        {
            let mut stopped = self
                .shared
                .stopped
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *stopped = true;
            self.shared.stop_signal.notify_all();
        }
        self.stop_acceptor();
        for conn in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let _ = conn.shutdown(Shutdown::Both);
        }
        let handlers = std::mem::take(
            &mut *self
                .shared
                .handlers
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for h in handlers {
            let _ = h.join();
        }
    }
}

/// A listening socket on `addr`. SO_REUSEADDR, so that a restart can bind the port again while
/// connections of the earlier life linger; with `Some(bytes)`, accepted sockets inherit send
/// and receive buffers of about that size.
fn listen(addr: SocketAddr, socket_buffers: Option<usize>) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if let Some(bytes) = socket_buffers {
        socket.set_send_buffer_size(bytes)?;
        socket.set_recv_buffer_size(bytes)?;
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn accept_loop(
    listener: TcpListener,
    stop: &AtomicBool,
    shared: Arc<Shared>,
    handler: Arc<Handler>,
) {
    loop {
        let incoming = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match incoming {
            Ok((stream, _)) => stream,
            // Out of descriptors and the like: let the moment pass instead of spinning.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        if let Ok(dup) = stream.try_clone() {
            shared
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, dup);
        }
        let now = shared.active.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_active.fetch_max(now, Ordering::SeqCst);
        let ctx = Ctx {
            shared: Arc::clone(&shared),
        };
        let handler = Arc::clone(&handler);
        let spawned = std::thread::Builder::new()
            .name("backend-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                handler(&mut stream, &ctx);
                // The duplicate goes first, so dropping `stream` really closes the socket.
                ctx.shared
                    .conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                drop(stream);
                ctx.shared.active.fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(h) => shared
                .handlers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(h),
            Err(_) => {
                shared
                    .conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                shared.active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// Writes back everything it reads; on EOF shuts down its write side.
fn echo_to_eof(s: &mut TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// Reads until EOF or an error, reporting `Data` on the first bytes and `Ended` at the end.
/// `Some(true)` on a clean EOF, `Some(false)` on an error, `None` if the backend stopped.
fn read_to_end_report(s: &mut TcpStream, ctx: &Ctx) -> Option<bool> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    let mut sum = Checksum::default();
    let reset = loop {
        match s.read(&mut buf) {
            Ok(0) => break false,
            Ok(n) => {
                if received == 0 {
                    ctx.report(Event::Data);
                }
                received += n as u64;
                sum.update(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break true,
        }
    };
    let at = Instant::now();
    if ctx.shared.is_stopped() {
        return None;
    }
    ctx.report(Event::Ended {
        received,
        checksum: sum.0,
        reset,
        at,
    });
    Some(!reset)
}

/// A loopback listener whose backlog is full and which never accepts: a connect to it hangs
/// in SYN_SENT, because the kernel drops SYNs for a listener with a full accept queue.
pub struct HangListener {
    addr: SocketAddr,
    _listener: Socket,
    _fillers: Vec<Socket>,
}

impl HangListener {
    pub fn new() -> HangListener {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        listener
            .bind(&SockAddr::from(loopback_any_port()))
            .expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("inet address");
        let target = SockAddr::from(addr);
        let mut fillers = Vec::new();
        for _ in 0..8 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            let done = s.connect_timeout(&target, Duration::from_millis(200));
            fillers.push(s);
            if done.is_err() {
                break;
            }
        }
        let probe = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let outcome = probe.connect_timeout(&target, Duration::from_millis(300));
        assert!(
            matches!(&outcome, Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock),
            "a connect to the full-backlog listener {} should hang, got {:?}",
            addr,
            outcome
        );
        fillers.push(probe);
        HangListener {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Default for HangListener {
    fn default() -> Self {
        HangListener::new()
    }
}

/// A loopback TCP port where nothing listens: connects to `addr` are refused. A socket bound
/// to it, never listening, holds the port while this lives, so a parallel test's `bind(0)` cannot
/// pick it up and start answering there.
pub struct RefusedTcp {
    pub addr: SocketAddr,
    _holder: Socket,
}

pub fn refused_tcp() -> RefusedTcp {
    let holder = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("tcp socket");
    holder
        .bind(&SockAddr::from(loopback_any_port()))
        .expect("bind tcp");
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
