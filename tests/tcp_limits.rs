//! Limits: buffers are lent only while bytes are in flight (a slow reader pins at most two,
//! idle pairs none), `max_connections` holds clients back, and running out of descriptors
//! neither spins nor wedges the proxy.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn slow_reader_holds_at_most_two_buffers() {
    const LEN: u64 = 64 * 1024 * 1024;
    const MIB: u64 = 1024 * 1024;
    let server = Backend::stream(LEN, 31);
    let proxy = start(forward(&[server.addr()]));
    let mut c = connect(proxy.local_addr(0).expect("listener"));

    // The reading pattern under test (pauses are pacing, not synchronisation): stall at the
    // start so every buffer on the way fills, then small reads with a tiny pause per MiB and
    // a longer one every 16 MiB. Bounded: LEN bytes, each read within the connect timeout.
    std::thread::sleep(Duration::from_millis(200));
    let mut verifier = Verifier::new(31);
    let mut buf = [0u8; 4096];
    let mut next_pause = MIB;
    loop {
        let n = c.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        assert!(verifier.pos + n as u64 <= LEN, "more bytes than sent");
        if let Err(at) = verifier.check(&buf[..n]) {
            panic!("byte {} differs", at);
        }
        if verifier.pos >= next_pause {
            next_pause += MIB;
            let pause = if verifier.pos % (16 * MIB) < MIB {
                50
            } else {
                2
            };
            std::thread::sleep(Duration::from_millis(pause));
        }
    }
    assert_eq!(verifier.pos, LEN, "every byte arrives");
    c.shutdown(Shutdown::Write).expect("shutdown");

    assert_all_pairs_freed(&proxy, "the pair closes");
    let stats = proxy.stats();
    // A pair holds its bytes in flight in pooled buffers (copy path) or kernel pipes (splice).
    let (peak, pipes) = (stats.buffers_peak(), stats.pipes_peak());
    assert!(
        peak + pipes >= 1,
        "the slow reader never made the proxy hold bytes: the test did not exercise back-pressure"
    );
    assert!(peak <= 2, "one pair held {} buffers at once", peak);
    assert!(pipes <= 2, "one pair held {} pipes at once", pipes);
    assert_eq!((stats.buffers_in_use(), stats.pipes_in_use()), (0, 0));
}

#[test]
fn idle_connections_hold_no_buffers() {
    const CONNECTIONS: usize = 500;
    const SMALL: usize = 64 * 1024;
    const BIG: usize = 16 * 1024 * 1024;
    let echo = Backend::echo();
    let proxy = start(forward(&[echo.addr()]));
    let addr = proxy.local_addr(0).expect("listener");
    let stats = proxy.stats();

    let clients: Vec<TcpStream> = (0..CONNECTIONS).map(|_| connect(addr)).collect();
    assert!(
        wait_until(EVENTUALLY, || stats
            .connections_active
            .load(Ordering::Relaxed)
            == CONNECTIONS as u64),
        "all pairs open (active: {})",
        stats.connections_active.load(Ordering::Relaxed)
    );

    // Traffic on every pair, 50 at a time, each writing and reading at once. One pair per
    // batch gets a burst larger than the kernel buffers on its path and starts reading only
    // after a pause (the pattern under test, not synchronisation), so the proxy has to lend
    // it buffers while the echo is in flight.
    let small = payload(41, SMALL);
    let big = payload(42, BIG);
    for (b, batch) in clients.chunks(50).enumerate() {
        std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (burst, stall) = if i == b % 50 {
                        (&big, Duration::from_millis(100))
                    } else {
                        (&small, Duration::ZERO)
                    };
                    std::thread::Builder::new()
                        .stack_size(256 * 1024)
                        .spawn_scoped(scope, move || -> io::Result<()> {
                            let mut w = c;
                            let writer = std::thread::Builder::new()
                                .stack_size(256 * 1024)
                                .spawn_scoped(scope, move || w.write_all(burst))?;
                            std::thread::sleep(stall);
                            let mut back = vec![0u8; burst.len()];
                            let mut r = c;
                            let read = r.read_exact(&mut back);
                            writer
                                .join()
                                .unwrap_or_else(|_| Err(io::Error::other("panicked")))?;
                            read?;
                            if back != *burst {
                                return Err(io::Error::other("echo differs"));
                            }
                            Ok(())
                        })
                        .expect("client thread")
                })
                .collect();
            for h in handles {
                h.join().expect("client panicked").expect("burst echoed");
            }
        });
    }
    assert!(
        stats.buffers_peak() + stats.pipes_peak() >= 1,
        "the traffic never made the proxy lend a buffer or a pipe: the test exercised nothing"
    );

    // Traffic has stopped: no pair may keep a buffer or a pipe.
    assert!(
        wait_until(EVENTUALLY, || stats.buffers_in_use() == 0
            && stats.pipes_in_use() == 0),
        "{} buffers and {} pipes still lent to {} idle pairs",
        stats.buffers_in_use(),
        stats.pipes_in_use(),
        CONNECTIONS
    );
    assert_eq!(
        stats.connections_active.load(Ordering::Relaxed),
        CONNECTIONS as u64,
        "all pairs are still open"
    );
    // And they really are: every one still echoes.
    for (i, c) in clients.iter().enumerate() {
        let mut c = c;
        c.write_all(b"!").expect("write");
        let mut one = [0u8; 1];
        c.read_exact(&mut one)
            .unwrap_or_else(|e| panic!("pair {} no longer echoes: {}", i, e));
    }
}

#[test]
fn max_connections_holds_back_the_eleventh_client() {
    let echo = Backend::echo();
    let mut config = forward(&[echo.addr()]);
    config.max_connections = 10;
    let proxy = start(config);
    let addr = proxy.local_addr(0).expect("listener");
    let stats = proxy.stats();

    let mut ten: Vec<TcpStream> = (0..10).map(|_| connect(addr)).collect();
    for (i, c) in ten.iter_mut().enumerate() {
        round_trip(c, b"served").unwrap_or_else(|e| panic!("client {} not served: {}", i, e));
    }
    // The eleventh gets through the kernel's handshake but not past the proxy.
    let mut eleventh = connect(addr);
    eleventh.write_all(b"served").expect("write");
    assert!(
        silent_for(&mut eleventh, Duration::from_millis(300)),
        "the eleventh client was answered (or closed) while ten pairs were open"
    );
    assert_eq!(stats.connections_active.load(Ordering::Relaxed), 10);
    assert_eq!(echo.accepted(), 10);

    // One of the ten leaves: the eleventh is served.
    drop(ten.pop());
    let back =
        read_exactly(&mut eleventh, 6).expect("the eleventh client is served once a slot frees");
    assert_eq!(back, b"served");
    for (i, c) in ten.iter_mut().enumerate() {
        round_trip(c, b"still").unwrap_or_else(|e| panic!("client {} lost: {}", i, e));
    }
}

// ---- out of descriptors --------------------------------------------------------------------

/// sluice forwarding to `upstream` under `ulimit -n`, with an admin endpoint, once its
/// listener is up.
struct Limited {
    child: SluiceChild,
    addr: SocketAddr,
    admin: SocketAddr,
    _conf: TempFile,
    /// Descriptors sluice holds with no connection open.
    baseline: usize,
    limit: usize,
}

/// The limited sluice's `connect_timeout`: how long a client waits for a descriptor.
const LIMITED_CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

fn spawn_limited(limit: usize, upstream: SocketAddr) -> Limited {
    for _ in 0..5 {
        let port = free_port(Transport::Tcp);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port(Transport::Tcp)));
        let conf = TempFile::new(
            "limited.conf",
            &format!(
                "admin {admin};\nlisten {addr} {{\n  proxy {upstream};\n  \
                 connect_timeout {}ms;\n}}\n",
                LIMITED_CONNECT_TIMEOUT.as_millis()
            ),
        );
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {} && exec \"$0\" \"$@\"", limit))
            .arg(sluice_bin())
            .args(["-c", conf.path_str()])
            .env_remove("RUST_LOG");
        let mut child = SluiceChild::spawn(command);
        // Up means listening, seen without connecting (a probe would open a pair).
        if !wait_listening(&mut child, port) {
            eprintln!(
                "sluice did not come up on {}: {}",
                addr,
                head(&child.stderr(), 30)
            );
            continue;
        }
        let pid = child.pid();
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", pid)).expect("limits");
        let soft: usize = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
            .expect("the soft NOFILE limit");
        assert_eq!(soft, limit, "sluice runs with the low descriptor limit");
        // The descriptor count settles once the listener is up; read it until two reads agree.
        let mut last = open_fds_below(pid, limit);
        wait_until(EVENTUALLY, || {
            std::thread::sleep(Duration::from_millis(20));
            let now = open_fds_below(pid, limit);
            let same = now == last;
            last = now;
            same
        });
        return Limited {
            child,
            addr,
            admin,
            _conf: conf,
            baseline: last,
            limit,
        };
    }
    panic!("sluice did not come up under ulimit -n {}", limit);
}

/// Starts sluice under a descriptor limit whose free descriptors (beyond its baseline) are
/// even (`odd == false`: pairs use them up exactly, and the next accept fails with EMFILE)
/// or odd (the last accept succeeds and the connect to the server fails with EMFILE).
fn spawn_with_parity(upstream: SocketAddr, odd: bool) -> Limited {
    let first = spawn_limited(40, upstream);
    let free = first.limit - first.baseline;
    if (free % 2 == 1) == odd {
        return first;
    }
    drop(first);
    let second = spawn_limited(41, upstream);
    assert_eq!(
        (second.limit - second.baseline) % 2 == 1,
        odd,
        "sluice's baseline descriptors changed between two starts"
    );
    second
}

/// Clients each send "ping"; returns which got it back, waiting until `expect` did (or a
/// deadline). Unanswered clients are left as they are.
fn pings_answered(clients: &mut [TcpStream], expect: usize, within: Duration) -> Vec<bool> {
    for c in clients.iter_mut() {
        c.write_all(b"ping").expect("write ping");
        c.set_nonblocking(true).expect("nonblocking");
    }
    let mut got = vec![0usize; clients.len()];
    wait_until(within, || {
        for (c, n) in clients.iter_mut().zip(got.iter_mut()) {
            let mut buf = [0u8; 4];
            if *n < 4 {
                if let Ok(k) = c.read(&mut buf[..4 - *n]) {
                    *n += k;
                }
            }
        }
        got.iter().filter(|&&n| n == 4).count() >= expect
    });
    for c in clients.iter_mut() {
        c.set_nonblocking(false).expect("blocking");
    }
    got.iter().map(|&n| n == 4).collect()
}

/// After the clients left: a new client is served again (each try gets a fresh connection,
/// since one may be closed while the proxy recovers).
fn served_again(addr: SocketAddr, within: Duration) -> bool {
    wait_until(within, || {
        let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return false;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
        round_trip(&mut c, b"again").is_ok()
    })
}

/// `sluice_descriptor_shortages_total{at}` from the admin endpoint.
fn shortages(sluice: &Limited, at: &str) -> f64 {
    let metrics = http::get(sluice.admin, "/metrics").body;
    let series = format!("sluice_descriptor_shortages_total{{at=\"{at}\"}}");
    http::sample(&metrics, &series).unwrap_or(0.0)
}

/// CPU seconds (as clock ticks) the process uses over one second.
fn cpu_ticks_over_one_second(pid: u32) -> u64 {
    let before = cpu_ticks(pid);
    // A measurement window, not a synchronisation.
    std::thread::sleep(Duration::from_secs(1));
    cpu_ticks(pid) - before
}

/// Opens 20 more clients than sluice has descriptors for and pings them all; returns the
/// clients and which of them were answered, after checking that some, but no more than the
/// descriptors allow, were served.
fn overload(sluice: &Limited) -> (Vec<TcpStream>, Vec<bool>) {
    let pairs = (sluice.limit - sluice.baseline) / 2;
    let mut clients: Vec<TcpStream> = (0..pairs + 20).map(|_| connect(sluice.addr)).collect();
    let answered = pings_answered(&mut clients, pairs, EVENTUALLY);
    let served = answered.iter().filter(|&&a| a).count();
    assert!(served >= 1, "no client was served at all");
    assert!(
        served <= pairs,
        "{} clients served with descriptors for {} pairs",
        served,
        pairs
    );
    (clients, answered)
}

#[test]
fn out_of_descriptors_on_accept_does_not_spin_and_recovers() {
    let echo = Backend::echo();
    let mut sluice = spawn_with_parity(echo.addr(), false);
    let pid = sluice.child.pid();
    let (mut clients, answered) = overload(&sluice);
    // The others wait in the backlog: neither answered nor closed.
    let mut stuck = 0;
    for (c, _) in clients.iter_mut().zip(&answered).filter(|(_, &a)| !a) {
        if silent_for(c, Duration::from_millis(10)) {
            stuck += 1;
        }
    }
    assert!(
        stuck >= 10,
        "only {} clients wait while descriptors are exhausted",
        stuck
    );

    let ticks = cpu_ticks_over_one_second(pid);
    assert!(
        ticks < TICKS_PER_SECOND / 5,
        "sluice used {} ms of CPU in 1 s while out of descriptors",
        ticks * 1000 / TICKS_PER_SECOND
    );
    assert!(sluice.child.exited().is_none(), "sluice exited");

    drop(clients);
    assert!(
        served_again(sluice.addr, EVENTUALLY),
        "sluice serves no client after the others left; stderr:\n{}",
        head(&sluice.child.stderr(), 30)
    );
    assert!(sluice.child.exited().is_none(), "sluice exited");
    assert!(
        shortages(&sluice, "accept") > 0.0,
        "the paused accepts are counted"
    );
}

#[test]
fn out_of_descriptors_on_server_connect_recovers() {
    let echo = Backend::echo();
    let mut sluice = spawn_with_parity(echo.addr(), true);
    let pid = sluice.child.pid();
    let (clients, _) = overload(&sluice);
    let started = Instant::now();
    let ticks = cpu_ticks_over_one_second(pid);
    assert!(
        ticks < TICKS_PER_SECOND / 5,
        "sluice used {} ms of CPU in 1 s while out of descriptors",
        ticks * 1000 / TICKS_PER_SECOND
    );

    // The failed connects were the proxy's own shortage, not the server's fault: once the
    // clients leave, the server is used again at once (not after a passive-health mark).
    drop(clients);
    assert!(
        served_again(sluice.addr, Duration::from_secs(3)),
        "sluice serves no client within 3 s after the others left ({:?} since the shortage): \
         did a local EMFILE count as a failure of the server? stderr:\n{}",
        started.elapsed(),
        head(&sluice.child.stderr(), 30)
    );
    assert!(sluice.child.exited().is_none(), "sluice exited");
    assert!(
        shortages(&sluice, "connect") > 0.0,
        "the clients closed for want of a server connection are counted"
    );
}

/// A client accepted with the last descriptor, whose server connection then cannot be opened,
/// is not dropped: it waits (accepting paused) and is served when a served client leaves. One
/// that no descriptor reaches within `connect_timeout` is reset, never closed with a FIN that
/// would read as an empty answer.
#[test]
fn a_client_with_no_descriptor_for_its_server_waits_for_one() {
    let echo = Backend::echo();
    let mut sluice = spawn_with_parity(echo.addr(), true);
    let pairs = (sluice.limit - sluice.baseline) / 2;
    let mut served: Vec<TcpStream> = (0..pairs).map(|_| connect(sluice.addr)).collect();
    let answered = pings_answered(&mut served, pairs, EVENTUALLY);
    assert!(answered.iter().all(|&a| a), "{answered:?}");

    let mut waiter = connect(sluice.addr);
    waiter.write_all(b"ping").expect("write");
    let waits = |l: &str| l.contains("wait for a descriptor");
    let line = sluice.child.wait_for_stderr_line(EVENTUALLY, waits);
    assert!(line.is_some(), "{}", head(&sluice.child.stderr(), 30));
    assert!(
        silent_for(&mut waiter, Duration::from_millis(200)),
        "the client with no server connection is neither answered nor closed"
    );
    drop(served.pop());
    let mut echo_back = [0u8; 4];
    waiter
        .read_exact(&mut echo_back)
        .expect("the waiting client is served once a descriptor is free");
    assert_eq!(&echo_back, b"ping");

    // Nobody leaves now: the next such client is reset at its connect_timeout.
    let mut late = connect(sluice.addr);
    late.write_all(b"ping").expect("write");
    let began = Instant::now();
    late.set_read_timeout(Some(EVENTUALLY)).expect("timeout");
    assert_eq!(how_it_ends(&mut late), Err(io::ErrorKind::ConnectionReset));
    assert!(
        began.elapsed() + Duration::from_millis(200) >= LIMITED_CONNECT_TIMEOUT,
        "reset after {:?}, before connect_timeout",
        began.elapsed()
    );
    // Its descriptor is free again: the admin endpoint can take it.
    assert_eq!(
        shortages(&sluice, "connect"),
        2.0,
        "one count per waiting client"
    );
    drop(served);
    drop(waiter);
    assert!(served_again(sluice.addr, EVENTUALLY), "served again");
    assert!(sluice.child.exited().is_none(), "sluice exited");
}

/// Issue 17, item 1: a pool of one buffer and an echo server whose sockets push back after about
/// 4 KiB. Each client uploads while it reads the echo. One pair's upload can hold the only buffer
/// while the server waits to write its echo; the echo must still reach the client without a
/// pooled buffer, or every pair of the worker stalls until `idle_timeout` cuts it.
#[test]
fn a_dry_buffer_pool_slows_pairs_but_never_stalls_them() {
    const MIB: u64 = 1024 * 1024;
    // The last case adds one kernel pipe, forced on, which the pairs contend for as well.
    let cases = [
        (1, 8 * MIB, None),
        (2, 8 * MIB, None),
        (4, 8 * MIB, None),
        (50, MIB, None),
        (4, 8 * MIB, Some(1)),
    ];
    for (clients, len, pipes) in cases {
        let echo = Backend::echo_with_buffers(Some(4096));
        let mut config = forward(&[echo.addr()]);
        config.buffer_size = 16 * 1024;
        config.buffer_memory = 16 * 1024;
        // One buffer leaves no room for a pipe by default: this tests the buffer pool.
        config.max_pipes = pipes;
        if pipes.is_some() {
            config.listeners[0].splice = sluice::config::Splice::On;
        }
        config.listeners[0].idle_timeout = Duration::from_secs(3);
        config.listeners[0].half_close_timeout = Duration::from_secs(3);
        let proxy = start(config);
        let addr = proxy.local_addr(0).expect("listener");
        let workers: Vec<_> = (0..clients)
            .map(|k| {
                let seed = 1000 + k as u64;
                std::thread::spawn(move || -> Result<(), String> {
                    let mut c = connect(addr);
                    let mut w = c.try_clone().map_err(|e| e.to_string())?;
                    let writer = std::thread::spawn(move || {
                        write_payload(&mut w, seed, len)?;
                        w.shutdown(Shutdown::Write)
                    });
                    let read = read_and_verify(&mut c, seed, len);
                    let wrote = writer.join().map_err(|_| "writer panicked".to_string())?;
                    wrote.map_err(|e| format!("upload failed: {e}"))?;
                    read
                })
            })
            .collect();
        for (k, w) in workers.into_iter().enumerate() {
            let outcome = w.join().expect("client thread");
            assert!(
                outcome.is_ok(),
                "{clients} clients: client {k}: {outcome:?}"
            );
        }
        assert_all_pairs_freed(&proxy, "every pair ends");
        let stats = proxy.stats();
        assert_eq!(
            stats.ended(sluice::runtime::End::IdleTimeout),
            0,
            "{clients} clients: a pair stalled until idle_timeout"
        );
        assert_eq!((stats.buffers_in_use(), stats.pipes_in_use()), (0, 0));
    }
}
