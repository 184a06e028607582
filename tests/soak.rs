//! The soak (issue 16): as many long-lived connections as the descriptor limit allows, each
//! exchanging a small message every second, through the `sluice` binary (a child process, so
//! that its resident memory and CPU time are its own), for a bounded time, with reloads and
//! health flips on the way. One backend fails its health check now and then (it answers the
//! check's PING with DOWN, so the active check marks it down, while the connections it has
//! go on) and passes it again; clients keep reconnecting a few at a time, so new connections
//! meet both states. (Closing its listener instead would reset connections caught in its
//! accept queue: the test's own fault, not sluice's.)
//!
//! Checked: every message comes back whole and in order on its own connection within 5 s,
//! no connection fails, every reload is applied, the flipping server is seen down and up
//! again, and resident memory after the warm-up has no slope worth the name. Reported: the RSS
//! samples, their slope, and CPU per connection per second.
//!
//! `make soak` runs `soak_long` (`SOAK_SECONDS`, default 600; `SOAK_CONNECTIONS`, default as
//! many as the limit allows, at most 9,000); `make test` runs `soak_short` (20 s, 400).

mod common;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use common::*;

/// One soak's shape.
struct Soak {
    seconds: u64,
    connections: usize,
    /// A reload (SIGHUP after a changed file) this often.
    reload_every: Duration,
    /// The second backend goes away this often, for `flip_down`.
    flip_every: Duration,
    flip_down: Duration,
    /// RSS and CPU are sampled this often; the slope counts the samples after `warm_up`.
    sample_every: Duration,
    warm_up: Duration,
    /// Clients that close and reconnect each second.
    churn_per_second: usize,
}

/// Each message: the client's index and its sequence number; the echo must be the same bytes.
const MESSAGE: usize = 16;

/// An echo must come back within this.
const ECHO_WITHIN: Duration = Duration::from_secs(5);

// ---- the backend -------------------------------------------------------------------------

/// An echo server on a mio reactor of its own, for thousands of connections on one thread.
/// `up` false makes it answer a health check's `PING` with `DOWN` (every other byte is
/// echoed as ever).
struct EchoServer {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(TcpListener::from_std(socket.into()))
}

impl EchoServer {
    fn start() -> EchoServer {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind the backend");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (u, s, a) = (Arc::clone(&up), Arc::clone(&stop), Arc::clone(&accepted));
        let thread = thread::spawn(move || echo_loop(listener, &u, &s, &a));
        EchoServer {
            addr,
            up,
            stop,
            accepted,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const LISTENER: Token = Token(usize::MAX);

fn echo_loop(mut listener: TcpListener, up: &AtomicBool, stop: &AtomicBool, accepted: &AtomicU64) {
    let mut poll = Poll::new().expect("poll");
    let mut events = Events::with_capacity(1024);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .expect("register");
    let mut conns: Slab<TcpStream> = Slab::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        // A short timeout notices `stop`.
        let _ = poll.poll(&mut events, Some(Duration::from_millis(50)));
        for event in events.iter() {
            if event.token() == LISTENER {
                while let Ok((mut s, _)) = listener.accept() {
                    let entry = conns.vacant_entry();
                    let token = Token(entry.key());
                    if poll
                        .registry()
                        .register(&mut s, token, Interest::READABLE)
                        .is_ok()
                    {
                        entry.insert(s);
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                continue;
            }
            let key = event.token().0;
            let Some(s) = conns.get_mut(key) else {
                continue;
            };
            if !echo(s, &mut buf, up.load(Ordering::Relaxed)) {
                let mut s = conns.remove(key);
                let _ = poll.registry().deregister(&mut s);
            }
        }
    }
}

/// The health check's probe, and the answer of a server that fails it. No client message
/// starts with it: their first bytes are an index below 9,000.
const PROBE: &[u8] = b"PING\r\n";
const FAILING: &[u8] = b"DOWN\r\n";

/// Echoes what is readable (a probe gets `DOWN` unless `up`); false when the connection is
/// done. Messages are small and the clients wait for each echo, so a write that does not take
/// everything is a failure here.
fn echo(s: &mut TcpStream, buf: &mut [u8], up: bool) -> bool {
    loop {
        match s.read(buf) {
            Ok(0) => return false,
            Ok(n) => {
                let answer = match &buf[..n] {
                    probe if probe == PROBE && !up => FAILING,
                    bytes => bytes,
                };
                match s.write(answer) {
                    Ok(w) if w == answer.len() => {}
                    _ => return false,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

// ---- the clients -------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    /// The connect, begun then, is in flight.
    Connecting(Instant),
    /// Waiting for its next turn to send.
    Idle,
    /// A message is out; its echo has `got` bytes so far.
    Waiting { since: Instant, got: usize },
}

struct Client {
    stream: TcpStream,
    state: ClientState,
    seq: u64,
    echo: [u8; MESSAGE],
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    exchanges: AtomicU64,
    reconnects: AtomicU64,
    errors: AtomicU64,
    first_errors: Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_errors.lock().expect("errors");
        if first.len() < 20 {
            first.push(what);
        }
    }
}

fn message(id: usize, seq: u64) -> [u8; MESSAGE] {
    let mut m = [0u8; MESSAGE];
    m[..8].copy_from_slice(&(id as u64).to_le_bytes());
    m[8..].copy_from_slice(&seq.to_le_bytes());
    m
}

/// All clients on one reactor: client `id` sends in its slot of every second.
struct Clients {
    poll: Poll,
    clients: Vec<Option<Client>>,
    to: SocketAddr,
}

impl Clients {
    /// Opens client `id`; a failure counts as an error and leaves it closed.
    fn connect(&mut self, id: usize, tally: &Tally) {
        match TcpStream::connect(self.to) {
            Ok(mut stream) => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                if self
                    .poll
                    .registry()
                    .register(&mut stream, Token(id), interest)
                    .is_ok()
                {
                    self.clients[id] = Some(Client {
                        stream,
                        state: ClientState::Connecting(Instant::now()),
                        seq: 0,
                        echo: [0; MESSAGE],
                    });
                } else {
                    tally.error(format!("client {id}: cannot register its socket"));
                }
            }
            Err(e) => tally.error(format!("client {id}: cannot connect to sluice: {e}")),
        }
    }

    fn close(&mut self, id: usize) {
        if let Some(mut c) = self.clients[id].take() {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    fn connecting(&self) -> usize {
        self.clients
            .iter()
            .flatten()
            .filter(|c| matches!(c.state, ClientState::Connecting(_)))
            .count()
    }

    /// A readiness event for client `id`.
    fn ready(&mut self, id: usize, tally: &Tally) {
        let Some(c) = self.clients.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        if let Err(why) = on_ready(id, c, tally) {
            self.fail(id, why, tally);
        }
    }

    /// Client `id`'s turn: send the next message, or fail it if its last echo is late.
    fn turn(&mut self, id: usize, now: Instant, tally: &Tally) {
        let Some(c) = self.clients.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        if let Err(why) = on_turn(id, c, now) {
            self.fail(id, why, tally);
        }
    }

    /// A failed client is counted, closed and replaced, so the load stays what it was.
    fn fail(&mut self, id: usize, why: String, tally: &Tally) {
        tally.error(why);
        self.close(id);
        self.connect(id, tally);
    }
}

fn on_ready(id: usize, c: &mut Client, tally: &Tally) -> Result<(), String> {
    if let ClientState::Connecting(_) = c.state {
        if let Ok(Some(e)) | Err(e) = c.stream.take_error() {
            return Err(format!("client {id}: connect failed: {e}"));
        }
        match c.stream.peer_addr() {
            Ok(_) => c.state = ClientState::Idle,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
            Err(e) => return Err(format!("client {id}: connect failed: {e}")),
        }
    }
    read_echo(id, c)?;
    if let ClientState::Waiting { got: MESSAGE, .. } = c.state {
        c.state = ClientState::Idle;
        c.seq += 1;
        tally.exchanges.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn on_turn(id: usize, c: &mut Client, now: Instant) -> Result<(), String> {
    match c.state {
        ClientState::Connecting(since) if now - since > ECHO_WITHIN => {
            Err(format!("client {id}: not connected in 5 s"))
        }
        ClientState::Connecting(_) => Ok(()),
        ClientState::Waiting { since, got } if now - since > ECHO_WITHIN => Err(format!(
            "client {id}: message {} echoed {got} of {MESSAGE} bytes in 5 s",
            c.seq
        )),
        ClientState::Waiting { .. } => Ok(()),
        ClientState::Idle => match c.stream.write(&message(id, c.seq)) {
            Ok(MESSAGE) => {
                c.state = ClientState::Waiting { since: now, got: 0 };
                Ok(())
            }
            Ok(n) => Err(format!("client {id}: a short write of {n}")),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(format!("client {id}: write failed: {e}")),
        },
    }
}

/// Reads what the socket holds of the echo of the message out, checking each byte.
fn read_echo(id: usize, c: &mut Client) -> Result<(), String> {
    loop {
        let ClientState::Waiting { since, got } = c.state else {
            // Nothing is out: any byte is one the proxy made up, or another client's.
            let mut one = [0u8; 1];
            return match c.stream.read(&mut one) {
                Ok(0) => Err(format!("client {id}: closed by the proxy")),
                Ok(_) => Err(format!("client {id}: a byte with no message out")),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                Err(e) => Err(format!("client {id}: read failed: {e}")),
            };
        };
        if got == MESSAGE {
            return Ok(());
        }
        match c.stream.read(&mut c.echo[got..]) {
            Ok(0) => return Err(format!("client {id}: closed by the proxy mid-echo")),
            Ok(n) => {
                let sent = message(id, c.seq);
                if c.echo[got..got + n] != sent[got..got + n] {
                    return Err(format!("client {id}: message {} came back changed", c.seq));
                }
                c.state = ClientState::Waiting {
                    since,
                    got: got + n,
                };
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("client {id}: read failed: {e}")),
        }
    }
}

/// Opens every client, at most 256 connects in flight, then runs their exchanges until
/// `until`; closes and reopens `churn` clients a second.
fn run_clients(to: SocketAddr, n: usize, churn: usize, until: Instant, tally: &Tally) {
    let mut c = Clients {
        poll: Poll::new().expect("poll"),
        clients: (0..n).map(|_| None).collect(),
        to,
    };
    let mut events = Events::with_capacity(4096);
    let started = Instant::now();
    let mut opened = 0;
    let mut next_churn = 0;
    let mut last_tick = started;
    while Instant::now() < until {
        while opened < n && c.connecting() < 256 {
            c.connect(opened, tally);
            opened += 1;
        }
        let _ = c.poll.poll(&mut events, Some(Duration::from_millis(10)));
        for event in events.iter() {
            c.ready(event.token().0, tally);
        }
        // Every client sends once a second, in its own slot of it: 100 slots of 10 ms.
        let now = Instant::now();
        let slot = |t: Instant| (t - started).as_millis() as usize / 10;
        for s in slot(last_tick)..slot(now) {
            for id in (s % 100..opened).step_by(100) {
                c.turn(id, now, tally);
            }
            if s % 100 == 0 && opened == n {
                for _ in 0..churn {
                    let id = next_churn % n;
                    next_churn += 1;
                    if matches!(
                        c.clients[id].as_ref().map(|x| x.state),
                        Some(ClientState::Idle)
                    ) {
                        c.close(id);
                        c.connect(id, tally);
                        tally.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        last_tick = now;
    }
}

// ---- sluice and its samples --------------------------------------------------------------

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn config_text(
    listen: SocketAddr,
    admin: SocketAddr,
    servers: [SocketAddr; 2],
    gen: u64,
) -> String {
    // The idle timeout changes with each reload: every reload has something to apply.
    format!(
        "workers 1;\nmax_connections 20000;\nadmin {admin};\naccess_log off;\n\
         upstream soak {{\n  balance least_conn;\n  server {} fail_timeout=2s;\n  server {} fail_timeout=2s;\n  \
         health_check interval=1s timeout=1s rise=2 fall=2 send=\"PING\\r\\n\" expect=\"PING\";\n}}\n\
         listen {listen} {{\n  proxy soak;\n  idle_timeout {}s;\n}}\n",
        servers[0],
        servers[1],
        600 + gen % 2
    )
}

/// Least squares slope of `(seconds, KiB)` samples, in KiB per minute.
fn slope_kib_per_minute(samples: &[(f64, u64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_r = samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
    let cov: f64 = samples
        .iter()
        .map(|s| (s.0 - mean_t) * (s.1 as f64 - mean_r))
        .sum();
    let var: f64 = samples.iter().map(|s| (s.0 - mean_t).powi(2)).sum();
    if var == 0.0 {
        0.0
    } else {
        cov / var * 60.0
    }
}

fn server_up(admin: SocketAddr, server: SocketAddr) -> Option<bool> {
    let metrics = http::raw(
        admin,
        format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\n\r\n").as_bytes(),
    )
    .ok()?
    .body;
    let series = format!("sluice_server_up{{upstream=\"soak\",server=\"{server}\"}}");
    http::sample(&metrics, &series).map(|v| v > 0.0)
}

/// Where the flipping server is in its flip.
#[derive(Clone, Copy)]
enum Flip {
    Steady,
    /// It fails its health check until then.
    Down(Instant),
    /// Passing its check again; the health check has yet to see it (`rise=2` at 1 s).
    Rising,
}

/// Time allowed for the health check to see a server back.
const RISE: Duration = Duration::from_secs(4);

/// sluice on a config of free loopback ports (picked again, at most 5 times, when one was
/// taken before sluice could bind it); returns it with its config file and two addresses.
fn spawn_sluice(servers: [SocketAddr; 2]) -> (SluiceChild, TempFile, SocketAddr, SocketAddr) {
    for _ in 0..5 {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port(Transport::Tcp)));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port(Transport::Tcp)));
        let conf = TempFile::new("soak.conf", &config_text(listen, admin, servers, 0));
        let mut child = SluiceChild::spawn(sluice_command(&["-c", conf.path_str()]));
        if wait_listening(&mut child, listen.port()) {
            return (child, conf, listen, admin);
        }
        eprintln!("sluice did not come up: {}", head(&child.stderr(), 30));
    }
    panic!("sluice did not come up in 5 tries");
}

fn soak(shape: Soak) {
    raise_fd_limit();
    let backends = [EchoServer::start(), EchoServer::start()];
    let servers = [backends[0].addr, backends[1].addr];
    let (child, conf, listen, admin) = spawn_sluice(servers);
    let pid = child.pid();
    let tally = Tally::default();
    let started = Instant::now();
    let until = started + Duration::from_secs(shape.seconds);
    let done = AtomicBool::new(false);
    let samples: Mutex<Vec<(f64, u64, u64)>> = Mutex::new(Vec::new());
    let (mut reloads, mut flips, mut seen_down, mut seen_up_again) = (0u64, 0u64, 0u64, 0u64);
    thread::scope(|scope| {
        scope.spawn(|| {
            // Set however the clients end, a panic included: the conductor must not wait on.
            let _done = SetOnDrop(&done);
            run_clients(
                listen,
                shape.connections,
                shape.churn_per_second,
                until,
                &tally,
            );
        });
        // The conductor: samples, reloads and flips, on a schedule from the start.
        let (mut next_sample, mut next_reload, mut next_flip) = (
            started,
            started + shape.reload_every,
            started + shape.flip_every,
        );
        let mut flip = Flip::Steady;
        let give_up = until + Duration::from_secs(60);
        while !done.load(Ordering::Relaxed) && Instant::now() < give_up {
            let now = Instant::now();
            if now >= next_sample {
                let t = (now - started).as_secs_f64();
                samples
                    .lock()
                    .expect("samples")
                    .push((t, rss_kib(pid), cpu_ticks(pid)));
                next_sample += shape.sample_every;
            }
            if now >= next_reload && now < until {
                reloads += 1;
                std::fs::write(&conf.path, config_text(listen, admin, servers, reloads))
                    .expect("rewrite the config");
                child.signal("HUP");
                next_reload += shape.reload_every;
            }
            flip = match flip {
                // A flip starts only if it can be seen through before the end.
                Flip::Steady if now >= next_flip && now + shape.flip_down + RISE < until => {
                    backends[1].up.store(false, Ordering::Relaxed);
                    flips += 1;
                    next_flip += shape.flip_every;
                    Flip::Down(now + shape.flip_down)
                }
                Flip::Down(at) if now >= at => {
                    if server_up(admin, servers[1]) == Some(false) {
                        seen_down += 1;
                    }
                    backends[1].up.store(true, Ordering::Relaxed);
                    Flip::Rising
                }
                Flip::Rising if server_up(admin, servers[1]) == Some(true) => {
                    seen_up_again += 1;
                    Flip::Steady
                }
                other => other,
            };
            // The conductor's own pace; the clients run on their reactor.
            thread::sleep(Duration::from_millis(100));
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let samples = samples.into_inner().expect("samples");
    let warm: Vec<(f64, u64)> = samples
        .iter()
        .filter(|s| s.0 >= shape.warm_up.as_secs_f64())
        .map(|s| (s.0, s.1))
        .collect();
    let slope = slope_kib_per_minute(&warm);
    let (first, last) = (warm.first().copied(), samples.last().copied());
    let cpu_per_conn_s = match (
        samples.iter().find(|s| s.0 >= shape.warm_up.as_secs_f64()),
        last,
    ) {
        (Some(a), Some(b)) if b.0 > a.0 => {
            (b.2 - a.2) as f64 / TICKS_PER_SECOND as f64 / (b.0 - a.0) / shape.connections as f64
        }
        _ => 0.0,
    };
    let applied = || {
        let metrics = http::get(admin, "/metrics").body;
        http::sample(&metrics, "sluice_reloads_total{result=\"ok\"}").unwrap_or(0.0) as u64
    };
    // The last reload may still be on its way.
    wait_until(EVENTUALLY, || applied() >= reloads);
    let applied = applied();
    println!(
        "soak: {} connections for {elapsed:.0} s: {} exchanges, {} reconnects, {} errors, \
         {reloads} reloads ({applied} applied), {flips} health flips ({seen_down} seen down, \
         {seen_up_again} seen up again); backends accepted {} and {}",
        shape.connections,
        tally.exchanges.load(Ordering::Relaxed),
        tally.reconnects.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
        backends[0].accepted.load(Ordering::Relaxed),
        backends[1].accepted.load(Ordering::Relaxed),
    );
    let rss: Vec<String> = samples
        .iter()
        .map(|s| format!("{:.0}s {} KiB", s.0, s.1))
        .collect();
    println!("soak: RSS samples: {}", rss.join(", "));
    println!(
        "soak: RSS slope after {} s of warm-up: {slope:+.1} KiB/min; CPU {:.2} µs per \
         connection per second",
        shape.warm_up.as_secs(),
        cpu_per_conn_s * 1e6
    );
    let errors = tally.first_errors.lock().expect("errors").clone();
    assert!(
        errors.is_empty(),
        "{} errors, the first:\n{}",
        tally.errors.load(Ordering::Relaxed),
        errors.join("\n")
    );
    assert_eq!(
        applied,
        reloads,
        "every reload applied: {}",
        head(&child.stderr(), 40)
    );
    assert_eq!(
        (seen_down, seen_up_again),
        (flips, flips),
        "each flip seen down and up again"
    );
    // Flat: what the warm samples span may grow by no more than 2 MiB over the run.
    if let (Some(a), Some(b)) = (first, last) {
        let growth = slope * (b.0 - a.0) / 60.0;
        assert!(
            growth < 2048.0,
            "RSS grows {slope:+.1} KiB/min after warm-up: {}",
            rss.join(", ")
        );
    }
    // Every connection that had its warm-up exchanges once a second after it.
    let steady = shape.seconds.saturating_sub(shape.warm_up.as_secs()) as usize;
    let floor = (shape.connections * steady * 9 / 10) as u64;
    let exchanges = tally.exchanges.load(Ordering::Relaxed);
    assert!(
        exchanges >= floor,
        "{exchanges} exchanges, fewer than 90% of one a second per connection after warm-up"
    );
    child.signal("TERM");
    let out = child.finish(Duration::from_secs(40));
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert_eq!(
        out.code,
        Some(0),
        "sluice did not stop cleanly: {}",
        head(&out.stderr, 40)
    );
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `make test`: a short soak, so the soak itself stays working.
#[test]
fn soak_short() {
    soak(Soak {
        seconds: 20,
        connections: 400,
        reload_every: Duration::from_secs(4),
        flip_every: Duration::from_secs(6),
        flip_down: Duration::from_secs(5),
        sample_every: Duration::from_secs(1),
        warm_up: Duration::from_secs(3),
        churn_per_second: 10,
    });
}

/// `make soak`: SOAK_SECONDS (default 600) with SOAK_CONNECTIONS (default: as many as the
/// descriptor limit allows, at most 9,000: each takes two descriptors here and two in sluice).
#[test]
#[ignore]
fn soak_long() {
    raise_fd_limit();
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let limit = fd_limit();
    let fit = (limit.saturating_sub(1000) / 2).min(9000);
    soak(Soak {
        seconds: var("SOAK_SECONDS").unwrap_or(600),
        connections: var("SOAK_CONNECTIONS").map_or(fit, |n| n as usize),
        reload_every: Duration::from_secs(60),
        flip_every: Duration::from_secs(60),
        flip_down: Duration::from_secs(20),
        sample_every: Duration::from_secs(10),
        warm_up: Duration::from_secs(60),
        churn_per_second: 20,
    });
}

/// This process's soft descriptor limit (raised to the hard one by `raise_fd_limit`).
fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}
