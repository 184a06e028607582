//! Backends on 127.0.0.1 in std threads, one thread per connection. A backend stops when it is
//! dropped: its acceptor is woken by a connect to itself and its connections are shut down
//! through a duplicate descriptor, so no thread outlives the test that made it. Also the
//! full-backlog listener that makes a connect hang, and an address that refuses.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use super::{loopback_any_port, raise_fd_limit, write_payload, Checksum, THREAD_STACK};

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

struct Shared {
    stopped: Mutex<bool>,
    stop_signal: Condvar,
    /// A duplicate of every open connection, so `drop` can shut them down. A handler removes
    /// its duplicate before its own socket closes, so close semantics (FIN, or RST after
    /// `SO_LINGER 0`) are the handler's.
    conns: Mutex<HashMap<u64, TcpStream>>,
    handlers: Mutex<Vec<JoinHandle<()>>>,
    accepted: AtomicUsize,
    open: AtomicUsize,
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
}

/// A TCP server on 127.0.0.1 with one thread per connection.
pub struct Backend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
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
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("backend socket");
        if let Some(bytes) = socket_buffers {
            socket.set_send_buffer_size(bytes).expect("SO_SNDBUF");
            socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        }
        socket
            .bind(&SockAddr::from(loopback_any_port()))
            .expect("backend bind");
        socket.listen(1024).expect("backend listen");
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().expect("backend address");
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            stopped: Mutex::new(false),
            stop_signal: Condvar::new(),
            conns: Mutex::new(HashMap::new()),
            handlers: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            events: Mutex::new(tx),
        });
        let handler = Arc::new(handler);
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("backend-{}", addr.port()))
                .stack_size(THREAD_STACK)
                .spawn(move || accept_loop(listener, shared, handler))
                .expect("backend acceptor thread")
        };
        Backend {
            addr,
            shared,
            acceptor: Some(acceptor),
            events: Mutex::new(rx),
        }
    }

    /// Writes back everything it reads; on EOF shuts down its write side and closes.
    pub fn echo() -> Backend {
        Backend::echo_with_buffers(None)
    }

    /// An echo whose sockets have send and receive buffers of about `socket_buffers` bytes.
    pub fn echo_with_buffers(socket_buffers: Option<usize>) -> Backend {
        Backend::spawn_with_buffers(socket_buffers, |s, _| {
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
        })
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

    /// Writes `name` on connect, then reads until EOF and closes.
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

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections whose handler is still running.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
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
        // Wake the blocking accept; if even that fails, leave the acceptor detached: it exits
        // on its next accept.
        let woke = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).is_ok();
        if let Some(acceptor) = self.acceptor.take() {
            if woke {
                let _ = acceptor.join();
            }
        }
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

fn accept_loop<H>(listener: TcpListener, shared: Arc<Shared>, handler: Arc<H>)
where
    H: Fn(&mut TcpStream, &Ctx) + Send + Sync + 'static,
{
    let mut next_id = 0u64;
    for incoming in listener.incoming() {
        if shared.is_stopped() {
            return;
        }
        let Ok(mut stream) = incoming else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let id = next_id;
        next_id += 1;
        if let Ok(dup) = stream.try_clone() {
            shared
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, dup);
        }
        shared.open.fetch_add(1, Ordering::Relaxed);
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
                ctx.shared.open.fetch_sub(1, Ordering::Relaxed);
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
                shared.open.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
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

/// A loopback address where nothing listens: connects to it are refused.
pub fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind(loopback_any_port()).expect("bind");
    l.local_addr().expect("address")
}

/// A loopback port that was free a moment ago (for the binary, which takes a fixed port).
pub fn free_port() -> u16 {
    refused_addr().port()
}
