//! UDP proxying end to end (issue 3): sessions per client, datagram boundaries, reply source
//! address, idle expiry, response counting, session caps, refusing servers, bursts and the
//! command-line forward. Real sockets on 127.0.0.1 only.

mod common;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use sluice::runtime::End;

/// One UDP listener on a free loopback port in front of upstream `u` (`upstream` is its block
/// body; `listen` goes into the listen block).
fn udp_conf(upstream: &str, listen: &str) -> String {
    format!("access_log off;\nupstream u {{\n{upstream}\n}}\nlisten udp 127.0.0.1:0 {{\n    proxy u;\n{listen}\n}}\n")
}

fn server_lines(addrs: &[SocketAddr], options: &str) -> String {
    addrs
        .iter()
        .map(|a| format!("    server {a} {options};\n"))
        .collect()
}

/// Request `seq` of client `client`: a header naming both, then pseudo-random bytes.
fn request(client: u64, seq: u64) -> Vec<u8> {
    let mut out = format!("c{client:02}s{seq:03}:").into_bytes();
    let len = (client * 131 + seq * 17) % 480;
    out.extend(payload(client << 16 | seq, len as usize));
    out
}

#[test]
fn echo_50_clients_200_datagrams_each() {
    const CLIENTS: u64 = 50;
    const DATAGRAMS: u64 = 200;
    let backend = UdpBackend::echo("echo");
    let proxy = start_conf(&udp_conf(&server_lines(&[backend.addr], ""), ""));
    let addr = proxy.local_addr(0).expect("listener");
    let deadline = Instant::now() + Duration::from_secs(120);

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            thread::spawn(move || {
                let socket = udp_client(Duration::from_millis(500));
                let mut resent = 0;
                for seq in 0..DATAGRAMS {
                    assert!(Instant::now() < deadline, "client {c}: out of time");
                    let payload = request(c, seq);
                    let mut sends = 0;
                    exchange_with(&socket, addr, &payload, 10, 20, |reply| {
                        if reply == payload.as_slice() {
                            return true;
                        }
                        // Only a late echo of one of this client's earlier requests may show up.
                        let earlier = (0..=seq).any(|s| reply == request(c, s).as_slice());
                        assert!(earlier, "client {c}: reply matches none of its requests");
                        sends += 1;
                        false
                    });
                    resent += sends;
                }
                resent
            })
        })
        .collect();
    let resent: u64 = clients
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .sum();
    println!("late or duplicate replies skipped: {resent}");

    let stats = proxy.stats();
    assert_eq!(
        load(&stats.udp_sessions_total),
        CLIENTS,
        "one session per client"
    );
    assert_eq!(load(&stats.udp_sessions_active), CLIENTS);
    assert_eq!(
        backend.peers().len(),
        CLIENTS as usize,
        "each session talks to the server from its own socket"
    );
    assert!(backend.received() >= (CLIENTS * DATAGRAMS) as usize);
}

#[test]
fn datagram_sizes_arrive_whole_and_separate() {
    const SIZES: [usize; 5] = [0, 1, 1472, 8192, 65_507];
    let backend = UdpBackend::echo("echo");
    let proxy = start_conf(&udp_conf(&server_lines(&[backend.addr], ""), ""));
    let addr = proxy.local_addr(0).expect("listener");
    let socket = udp_client(Duration::from_secs(1));
    let payloads: Vec<Vec<u8>> = SIZES.iter().map(|&n| payload(n as u64, n)).collect();

    // One at a time.
    for p in &payloads {
        let reply = exchange_with(&socket, addr, p, 5, 5, |r| r.len() == p.len());
        assert_eq!(reply.len(), p.len());
        assert!(reply == *p, "the {}-byte reply differs", p.len());
    }

    // All five back to back: still five datagrams each way, none merged or split.
    let mut missing: HashSet<usize> = SIZES.iter().copied().collect();
    let mut buf = vec![0u8; 65_536];
    for _round in 0..3 {
        for p in payloads.iter().filter(|p| missing.contains(&p.len())) {
            socket.send_to(p, addr).expect("send");
        }
        while !missing.is_empty() {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    assert_eq!(from, addr);
                    let p = payloads
                        .iter()
                        .find(|p| p.len() == n)
                        .unwrap_or_else(|| panic!("a {n}-byte reply: merged or split"));
                    assert!(buf[..n] == p[..], "the {n}-byte reply differs");
                    missing.remove(&n);
                }
                Err(e) if is_timeout(&e) => break,
                Err(e) => panic!("receive: {e}"),
            }
        }
        if missing.is_empty() {
            break;
        }
    }
    assert!(missing.is_empty(), "replies never came back: {missing:?}");

    let sizes = backend.sizes();
    for n in &sizes {
        assert!(
            SIZES.contains(n),
            "the server got a {n}-byte datagram: merged or split ({sizes:?})"
        );
    }
    for n in SIZES {
        assert!(
            sizes.iter().filter(|&&m| m == n).count() >= 2,
            "the {n}-byte datagram reached the server fewer than twice ({sizes:?})"
        );
    }
}

#[test]
fn replies_come_from_the_listening_address() {
    let backend = UdpBackend::echo("echo");
    let proxy = start_conf(&udp_conf(&server_lines(&[backend.addr], ""), ""));
    let addr = proxy.local_addr(0).expect("listener");

    // A connected socket accepts datagrams only from the address it is connected to.
    let connected = udp_client(Duration::from_millis(500));
    connected.connect(addr).expect("connect");
    let mut buf = [0u8; 64];
    let mut got = None;
    for _ in 0..5 {
        connected.send(b"through a connected socket").expect("send");
        match connected.recv(&mut buf) {
            Ok(n) => {
                got = Some(buf[..n].to_vec());
                break;
            }
            Err(e) if is_timeout(&e) => continue,
            Err(e) => panic!("receive on the connected socket: {e}"),
        }
    }
    assert_eq!(
        got.as_deref(),
        Some(&b"through a connected socket"[..]),
        "a connected client got no reply: it must come from the listening address"
    );

    // An unconnected socket sees the source address itself (exchange checks it is `addr`).
    let plain = udp_client(Duration::from_millis(500));
    assert_eq!(exchange(&plain, addr, b"where from?"), b"where from?");
    assert_eq!(load(&proxy.stats().udp_sessions_total), 2);
}

#[test]
fn each_client_gets_its_own_sticky_session() {
    let backends: Vec<UdpBackend> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|n| UdpBackend::named(n, 1))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let proxy = start_conf(&udp_conf(
        &format!("    balance round_robin;\n{}", server_lines(&addrs, "")),
        "",
    ));
    let addr = proxy.local_addr(0).expect("listener");
    let clients: Vec<UdpSocket> = (0..3)
        .map(|_| udp_client(Duration::from_millis(500)))
        .collect();

    let mut seen: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    for round in 0..10 {
        for (i, c) in clients.iter().enumerate() {
            let reply = exchange(c, addr, format!("round {round}").as_bytes());
            seen[i].push(String::from_utf8(reply).expect("a name"));
        }
    }
    let mut names = HashSet::new();
    for (i, replies) in seen.iter().enumerate() {
        let first = &replies[0];
        assert!(
            replies.iter().all(|n| n == first),
            "client {i} changed server within its session: {replies:?}"
        );
        names.insert(first.clone());
    }
    assert_eq!(
        names.len(),
        3,
        "three clients, three sessions, round robin over three servers: {seen:?}"
    );
    let stats = proxy.stats();
    assert_eq!(load(&stats.udp_sessions_total), 3);
    assert_eq!(load(&stats.udp_sessions_active), 3);
}

#[test]
fn idle_session_expires_and_a_new_one_opens() {
    let backend = UdpBackend::echo("echo");
    let proxy = start_conf(&udp_conf(
        &server_lines(&[backend.addr], ""),
        "    idle_timeout 300ms;",
    ));
    let addr = proxy.local_addr(0).expect("listener");
    let stats = proxy.stats();
    let socket = udp_client(Duration::from_secs(1));

    let sent = Instant::now();
    assert_eq!(exchange(&socket, addr, b"one"), b"one");
    assert_eq!(load(&stats.udp_sessions_total), 1);
    assert!(
        wait_until(Duration::from_secs(10), || load(&stats.udp_sessions_active)
            == 0),
        "timed out waiting for the idle session to end"
    );
    let lived = sent.elapsed();
    assert!(
        lived >= Duration::from_millis(300),
        "the session ended {lived:?} after its last datagram, before idle_timeout"
    );
    assert_eq!(stats.ended(End::IdleTimeout), 1);

    assert_eq!(exchange(&socket, addr, b"two"), b"two");
    assert_eq!(
        load(&stats.udp_sessions_total),
        2,
        "the same client after expiry gets a new session"
    );
    assert_eq!(load(&stats.udp_sessions_active), 1);
}

#[test]
fn busy_session_outlives_idle_timeout() {
    let backend = UdpBackend::echo("echo");
    let proxy = start_conf(&udp_conf(
        &server_lines(&[backend.addr], ""),
        "    idle_timeout 300ms;",
    ));
    let addr = proxy.local_addr(0).expect("listener");
    let stats = proxy.stats();
    let socket = udp_client(Duration::from_secs(1));

    // Traffic every 100 ms for 2 s: the pace is the test's input, not a wait for the proxy.
    let begin = Instant::now();
    for k in 0..20u32 {
        let due = begin + Duration::from_millis(100) * k;
        thread::sleep(due.saturating_duration_since(Instant::now()));
        let payload = format!("tick {k}");
        assert_eq!(
            exchange(&socket, addr, payload.as_bytes()),
            payload.as_bytes()
        );
    }
    assert_eq!(
        load(&stats.udp_sessions_total),
        1,
        "a session with traffic was expired"
    );
    assert_eq!(load(&stats.udp_sessions_active), 1);
    assert_eq!(stats.ended(End::IdleTimeout), 0);
}

#[test]
fn udp_responses_ends_the_session_after_the_first_reply() {
    // The server answers every datagram twice; only the first answer may get through.
    let backend = UdpBackend::named("dns", 2);
    let proxy = start_conf(&udp_conf(
        &server_lines(&[backend.addr], ""),
        "    udp_responses 1;\n    idle_timeout 30s;",
    ));
    let addr = proxy.local_addr(0).expect("listener");
    let stats = proxy.stats();
    let socket = udp_client(Duration::from_secs(1));

    assert_eq!(exchange(&socket, addr, b"query"), b"dns");
    assert!(
        wait_until(Duration::from_secs(5), || load(&stats.udp_sessions_active)
            == 0),
        "timed out waiting for the session to end after one reply"
    );
    assert_eq!(stats.ended(End::ServerClosed), 1);
    assert_eq!(stats.ended(End::IdleTimeout), 0);
    assert_eq!(load(&stats.udp_datagrams_down), 1, "one reply forwarded");

    // The second answer died with the session. (A negative check has to wait a little.)
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    match socket.recv_from(&mut buf) {
        Err(e) if is_timeout(&e) => {}
        other => panic!("a second reply got through: {other:?}"),
    }

    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    assert_eq!(exchange(&socket, addr, b"again"), b"dns");
    assert_eq!(load(&stats.udp_sessions_total), 2);
}

#[test]
fn max_sessions_caps_live_sessions() {
    const CLIENTS: usize = 20;
    const REQUESTS: usize = 5;
    let backend = UdpBackend::echo("echo");
    let proxy = start_conf(&udp_conf(
        &server_lines(&[backend.addr], ""),
        "    max_sessions 10;\n    idle_timeout 30s;",
    ));
    let addr = proxy.local_addr(0).expect("listener");
    let stats = proxy.stats_handle();

    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak, stats) = (Arc::clone(&done), Arc::clone(&peak), Arc::clone(&stats));
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut samples = 0u64;
            while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                peak.fetch_max(load(&stats.udp_sessions_active), Ordering::SeqCst);
                samples += 1;
                thread::sleep(Duration::from_micros(200));
            }
            samples
        })
    };
    let clients: Vec<_> = (0..CLIENTS as u64)
        .map(|c| {
            thread::spawn(move || {
                // Evictions lose replies in flight; the client resends, as UDP clients do.
                let socket = udp_client(Duration::from_millis(300));
                for seq in 0..REQUESTS as u64 {
                    let payload = request(c, seq);
                    let reply = exchange_with(&socket, addr, &payload, 40, 100, |r| r == payload);
                    assert_eq!(reply, payload);
                }
            })
        })
        .collect();
    for (c, t) in clients.into_iter().enumerate() {
        t.join()
            .unwrap_or_else(|_| panic!("client {c} got no answer"));
    }
    done.store(true, Ordering::SeqCst);
    let samples = sampler.join().expect("sampler");

    let peak = peak.load(Ordering::SeqCst);
    println!(
        "sessions: peak {peak} over {samples} samples, total {}, evicted {}",
        load(&stats.udp_sessions_total),
        stats.ended(End::Limit)
    );
    assert!(peak <= 10, "{peak} sessions at once with max_sessions 10");
    assert!(load(&stats.udp_sessions_active) <= 10);
    assert!(load(&stats.udp_sessions_total) >= CLIENTS as u64);
    assert!(
        stats.ended(End::Limit) >= 10,
        "20 clients through 10 slots must evict at least 10 sessions"
    );
}

#[test]
fn refusing_server_ends_its_session_and_is_skipped() {
    let dead = dead_udp();
    let healthy = UdpBackend::named("healthy", 1);
    let proxy = start_conf(&udp_conf(
        &format!(
            "    balance round_robin;\n    server {} max_fails=1 fail_timeout=30s;\n    server {} max_fails=1 fail_timeout=30s;",
            dead.addr, healthy.addr
        ),
        "    idle_timeout 30s;",
    ));
    let addr = proxy.local_addr(0).expect("listener");
    let stats = proxy.stats();

    // New clients until one session lands on the dead server (round robin: within two).
    let mut to_dead = false;
    for _ in 0..4 {
        let socket = udp_client(Duration::from_millis(50));
        socket.send_to(b"hello", addr).expect("send");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 64];
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, _)) => {
                    assert_eq!(&buf[..n], b"healthy");
                    break;
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => panic!("receive: {e}"),
            }
            if stats.ended(End::ConnectFailed) > 0 {
                to_dead = true;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "neither a reply nor a refused session"
            );
        }
        if to_dead {
            break;
        }
    }
    assert!(to_dead, "no session ever went to the dead server");
    assert_eq!(stats.ended(End::ConnectFailed), 1);
    assert_eq!(load(&stats.connect_failures), 1);

    // From now on (max_fails=1) new sessions skip the dead server.
    for i in 0..6 {
        let socket = udp_client(Duration::from_millis(500));
        let reply = exchange(&socket, addr, format!("client {i}").as_bytes());
        assert_eq!(
            reply, b"healthy",
            "session {i} did not go to the healthy server"
        );
    }
    assert_eq!(load(&stats.connect_failures), 1);
    assert_eq!(stats.ended(End::ConnectFailed), 1);
}

#[test]
fn burst_of_100k_datagrams_does_not_stall_the_proxy() {
    const BURST: usize = 100_000;
    let backend = UdpBackend::echo("echo");
    let proxy = start_conf(&udp_conf(&server_lines(&[backend.addr], ""), ""));
    let addr = proxy.local_addr(0).expect("listener");
    let stats = proxy.stats_handle();
    let socket = udp_client(Duration::from_secs(2));

    let begin = Instant::now();
    let mut sent = 0;
    while sent < BURST && begin.elapsed() < Duration::from_secs(30) {
        let datagram = format!("burst {sent:08}");
        match socket.send_to(datagram.as_bytes(), addr) {
            Ok(_) => sent += 1,
            // Even loopback may push back with ENOBUFS; that datagram is simply lost.
            Err(e) if e.raw_os_error() == Some(105) => sent += 1,
            Err(e) => panic!("send: {e}"),
        }
    }
    println!("sent {sent} datagrams in {:?}", begin.elapsed());

    // The same client still gets an answer, past whatever burst echoes are queued for it.
    let marker = b"after the burst";
    let reply = exchange_with(&socket, addr, marker, 5, 300_000, |r| {
        if r.starts_with(b"burst ") {
            return false;
        }
        true
    });
    assert_eq!(reply, marker);
    // And a new client does too.
    let fresh = udp_client(Duration::from_secs(2));
    assert_eq!(exchange(&fresh, addr, b"fresh client"), b"fresh client");

    let dropped = load(&stats.udp_dropped);
    let received = backend.received();
    proxy.stop().expect("stop");
    println!(
        "server received {received} datagrams; proxy forwarded up {}, down {}; counted as dropped {dropped}",
        load(&stats.udp_datagrams_up),
        load(&stats.udp_datagrams_down),
    );
    assert!(received > 0);
    assert!(load(&stats.udp_datagrams_up) >= 2);
}

#[test]
fn command_line_udp_forward() {
    let backend = UdpBackend::echo("echo");
    let upstream = backend.addr.to_string();
    let (_sluice, addr) = SluiceChild::start_listening(Transport::Udp, |listen| {
        ["--udp", "-L", listen, "-U", &upstream]
            .iter()
            .map(|s| s.to_string())
            .collect()
    });
    let socket = udp_client(Duration::from_millis(500));
    // exchange checks that the reply comes from the listening address.
    assert_eq!(
        exchange(&socket, addr, b"via the binary"),
        b"via the binary"
    );
    let big = payload(7, 4000);
    assert_eq!(exchange(&socket, addr, &big), big);
    assert_eq!(backend.peers().len(), 1, "one session for one client");
}

/// Issue 17, item 3: a second process (here a second proxy) cannot bind a UDP port that one
/// already listens on; it fails as TCP does, naming the address.
#[test]
fn a_udp_port_in_use_cannot_be_bound_twice() {
    let backend = UdpBackend::echo("a");
    let first = start_conf(&udp_conf(&server_lines(&[backend.addr], ""), ""));
    let addr = first.local_addr(0).expect("listener");
    let conf =
        udp_conf(&server_lines(&[backend.addr], ""), "").replace("127.0.0.1:0", &addr.to_string());
    let config = sluice::config::Config::parse(&conf, "test.conf").expect("config");
    let err = match sluice::runtime::Proxy::start(config) {
        Ok(_) => panic!("a second proxy bound udp {addr}, which the first one holds"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        err,
        format!("cannot listen on udp {addr}: address already in use")
    );
    let client = udp_client(IO_TIMEOUT);
    assert_eq!(exchange(&client, addr, b"still mine"), b"still mine");
}

/// Issue 17, item 4: on a wildcard listener a reply leaves from the address the client sent
/// to, so a client that sent to 127.0.0.2 sees its answer come from there, and a client that
/// `connect()`ed its socket (as DNS stubs do) receives it at all.
#[test]
fn a_wildcard_listener_replies_from_the_address_the_client_sent_to() {
    let backend = UdpBackend::echo("a");
    for (wildcard, targets) in [
        ("0.0.0.0:0", &["127.0.0.2", "127.0.0.1", "127.0.0.3"][..]),
        ("[::]:0", &["::1"][..]),
    ] {
        let conf =
            udp_conf(&server_lines(&[backend.addr], ""), "").replace("127.0.0.1:0", wildcard);
        let proxy = start_conf(&conf);
        let port = proxy.local_addr(0).expect("listener").port();
        for target in targets {
            let ip: std::net::IpAddr = target.parse().expect("ip");
            let to = SocketAddr::new(ip, port);
            let local: SocketAddr = if ip.is_ipv4() {
                "127.0.0.1:0".parse().expect("addr")
            } else {
                "[::1]:0".parse().expect("addr")
            };
            let free = UdpSocket::bind(local).expect("bind client");
            free.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            free.send_to(b"where from?", to).expect("send");
            let mut buf = [0u8; 64];
            let (n, from) = free.recv_from(&mut buf).expect("a reply");
            assert_eq!(&buf[..n], b"where from?");
            assert_eq!(
                from, to,
                "the reply must come from the address the client sent to"
            );

            let connected = UdpSocket::bind(local).expect("bind client");
            connected
                .set_read_timeout(Some(IO_TIMEOUT))
                .expect("timeout");
            connected.connect(to).expect("connect");
            connected.send(b"connected").expect("send");
            let n = connected
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("a connected client of {to} got no reply: {e}"));
            assert_eq!(&buf[..n], b"connected");
        }
    }
}

/// At `max_sessions`, a new client pushes out the least recently active session only when it
/// can be served itself: with no server available it is refused, and the working session stays.
#[test]
fn a_client_that_cannot_be_served_evicts_no_session() {
    let backend = UdpBackend::echo("a");
    // No TCP listener on the backend's port: the connect probes fail, so after three checks
    // the server is down for new sessions while the one already open keeps going.
    let conf = udp_conf(
        &format!(
            "    server {} max_fails=0;\n    health_check interval=200ms timeout=200ms fall=3 rise=100;",
            backend.addr
        ),
        "    max_sessions 1;",
    );
    let proxy = start_conf(&conf);
    let addr = proxy.local_addr(0).expect("listener");
    let stats = proxy.stats_handle();
    let a = udp_client(IO_TIMEOUT);
    assert_eq!(exchange(&a, addr, b"first"), b"first");
    let shared = &stats.servers(sluice::config::UpstreamId(0))[0];
    assert!(
        wait_until(EVENTUALLY, || !shared
            .healthy
            .load(std::sync::atomic::Ordering::Relaxed)),
        "the health checks never marked the server down"
    );
    let b = udp_client(Duration::from_millis(300));
    b.send_to(b"no server for me", addr).expect("send");
    assert!(
        wait_until(EVENTUALLY, || stats.ended(End::NoServer) == 1),
        "the second client was not refused"
    );
    assert_eq!(
        stats.ended(End::Limit),
        0,
        "a working session was evicted for nothing"
    );
    assert_eq!(load(&stats.udp_sessions_active), 1);
    assert_eq!(exchange(&a, addr, b"still here"), b"still here");
}

/// Rounds of bursts: each of `clients` sends `burst` datagrams at once, then reads what comes
/// back. Every reply must be one of its own requests, whole, and later than the one before it
/// (batched replies keep each client's order); returns (sent, received).
fn burst_rounds(addr: SocketAddr, clients: u64, burst: u64, rounds: u64) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            thread::spawn(move || {
                let socket = udp_client(Duration::from_millis(300));
                let mut buf = vec![0u8; 65_536];
                let (mut sent, mut received) = (0, 0);
                let mut last: Option<u64> = None;
                for round in 0..rounds {
                    assert!(Instant::now() < deadline, "client {c}: out of time");
                    for k in 0..burst {
                        let seq = round * burst + k;
                        socket.send_to(&request(c, seq), addr).expect("send");
                        sent += 1;
                    }
                    for _ in 0..burst {
                        let Ok((n, from)) = socket.recv_from(&mut buf) else {
                            break; // lost on the way (loopback may drop a burst): not a fault
                        };
                        assert_eq!(from, addr, "client {c}: a reply from elsewhere");
                        let seq = (0..rounds * burst)
                            .find(|&s| buf[..n] == request(c, s)[..])
                            .unwrap_or_else(|| panic!("client {c}: a reply it never sent"));
                        assert!(
                            last.map_or(true, |l| seq > l),
                            "client {c}: reply {seq} after {last:?}"
                        );
                        last = Some(seq);
                        received += 1;
                    }
                }
                (sent, received)
            })
        })
        .collect();
    threads.into_iter().fold((0, 0), |(s, r), t| {
        let (a, b) = t.join().expect("client thread");
        (s + a, r + b)
    })
}

/// Issue 15, item 4: with datagrams read 16 at a time and replies sent in batches, bursts from
/// 20 clients come back whole, each to its own client, in order.
#[test]
fn bursts_from_20_clients_come_back_whole_and_in_order() {
    let backend = UdpBackend::echo("echo");
    let proxy = start_conf(&udp_conf(&server_lines(&[backend.addr], ""), ""));
    let addr = proxy.local_addr(0).expect("listener");
    let stats = proxy.stats_handle();
    let (sent, received) = burst_rounds(addr, 20, 8, 10);
    println!(
        "{sent} sent, {received} came back; the proxy dropped {}",
        load(&stats.udp_dropped)
    );
    assert!(
        received * 10 >= sent * 9,
        "most replies arrive on loopback: {received} of {sent}"
    );
    assert_eq!(
        load(&stats.udp_sessions_total),
        20,
        "one session per client"
    );
}

/// sluice under `strace -f`, listening on a free port for `args(addr)`, with the trace going
/// to a file of its own; None (after saying so) where strace is missing or may not trace.
fn traced_sluice(
    args: impl Fn(SocketAddr) -> Vec<String>,
) -> Option<(SluiceChild, SocketAddr, std::path::PathBuf)> {
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("skipped: strace is not installed");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("sluice-mmsg-{}", unique()));
    std::fs::create_dir_all(&dir).expect("dir");
    let trace = dir.join("trace");
    for _ in 0..5 {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port(Transport::Udp)));
        let mut command = std::process::Command::new("strace");
        command
            .args(["-f", "-qq", "-e", "trace=recvmmsg,sendmmsg", "-o"])
            .arg(&trace)
            .arg(sluice_bin())
            .args(args(addr))
            .env_remove("RUST_LOG");
        let mut child = SluiceChild::spawn(command);
        wait_until(EVENTUALLY, || {
            child.stderr().contains("listening on") || child.exited().is_some()
        });
        if child.stderr().contains("listening on") {
            return Some((child, addr, trace));
        }
        let why = child.stderr();
        if why.contains("ptrace") || why.contains("Operation not permitted") {
            eprintln!("skipped: strace cannot trace here: {why}");
            return None;
        }
    }
    panic!("sluice under strace did not listen");
}

/// Stops the traced sluice (strace's child; strace ends with it) and returns, for `recvmmsg`
/// and `sendmmsg`, how many datagrams each call moved.
fn stop_traced(child: SluiceChild, trace: &std::path::Path) -> (Vec<u64>, Vec<u64>) {
    let pid = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        child.pid(),
        child.pid()
    ))
    .expect("strace's children");
    let pid = pid
        .split_whitespace()
        .next()
        .expect("the traced sluice")
        .to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let out = child.finish(EVENTUALLY);
    assert!(out.code == Some(0), "{}", out.stderr);
    let text = std::fs::read_to_string(trace).expect("the trace");
    if let Some(dir) = trace.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    // Lines end in "= N" (datagrams moved) or "= -1 EAGAIN ...".
    let moved = |call: &str| -> Vec<u64> {
        text.lines()
            // A call cut by another thread's shows its result on a "resumed" line.
            .filter(|l| {
                l.contains(&format!("{call}(")) || l.contains(&format!("<... {call} resumed>"))
            })
            .filter_map(|l| {
                l.rsplit_once("= ")?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    (moved("recvmmsg"), moved("sendmmsg"))
}

/// Issue 15, item 4, seen from the system calls: the listener is read with recvmmsg, several
/// datagrams at a time, and replies leave with sendmmsg, several per call.
#[test]
fn datagrams_move_in_batches_of_system_calls() {
    let backend = UdpBackend::echo("echo");
    let upstream = backend.addr.to_string();
    let Some((child, addr, trace)) = traced_sluice(|addr| {
        ["--udp", "-w", "1", "-L", &addr.to_string(), "-U", &upstream]
            .map(String::from)
            .to_vec()
    }) else {
        return;
    };
    let (sent, received) = burst_rounds(addr, 20, 12, 5);
    let (reads, writes) = stop_traced(child, &trace);
    let (read_total, write_total) = (reads.iter().sum::<u64>(), writes.iter().sum::<u64>());
    println!(
        "{sent} sent, {received} back; recvmmsg: {} calls moved {read_total}, most {:?}; \
         sendmmsg: {} calls moved {write_total}, most {:?}",
        reads.len(),
        reads.iter().max(),
        writes.len(),
        writes.iter().max()
    );
    assert!(
        read_total >= received,
        "the listener's datagrams came by recvmmsg"
    );
    assert!(
        reads.iter().any(|&n| n > 1),
        "a recvmmsg took several datagrams"
    );
    assert!(write_total >= received, "the replies left by sendmmsg");
    assert!(
        writes.iter().any(|&n| n > 1),
        "a sendmmsg sent several replies"
    );
    assert!(
        (writes.len() as u64) < write_total,
        "fewer sendmmsg calls than replies: {} for {write_total}",
        writes.len()
    );
}

/// With `udp_responses 1` every reply ends its session; the replies of one turn still leave
/// together (a flush at each session end once sent them one per call).
#[test]
fn replies_that_end_their_sessions_still_leave_in_batches() {
    let backend = UdpBackend::echo("echo");
    let dir = std::env::temp_dir().join(format!("sluice-responses-{}", unique()));
    std::fs::create_dir_all(&dir).expect("dir");
    let conf = dir.join("sluice.conf");
    let upstream = backend.addr;
    let Some((child, addr, trace)) = traced_sluice(|addr| {
        let text = format!(
            "access_log off;\nlisten udp {addr} {{\n    proxy {upstream};\n    udp_responses 1;\n}}\n"
        );
        std::fs::write(&conf, text).expect("write the config");
        ["-w", "1", "-c", conf.to_str().expect("path")]
            .map(String::from)
            .to_vec()
    }) else {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    // One datagram per client per round: each opens a session its reply ends.
    let (sent, received) = burst_rounds(addr, 20, 1, 20);
    let (_, writes) = stop_traced(child, &trace);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{sent} sent, {received} back; sendmmsg: {} calls, most {:?}",
        writes.len(),
        writes.iter().max()
    );
    assert!(received * 10 >= sent * 9, "{received} of {sent} came back");
    assert!(
        writes.iter().any(|&n| n > 1),
        "a sendmmsg sent several replies"
    );
}

/// Two UDP listeners on port 0 never share a port: the kernel would give a `SO_REUSEPORT`
/// socket a port another such socket already has, and the two proxies would split each
/// other's datagrams (seen as sessions from strangers in tests running side by side).
#[test]
fn listeners_on_port_0_get_ports_of_their_own() {
    let _ = sluice::sys::raise_nofile_limit();
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let sockets: Vec<_> = (0..600)
        .map(|_| sluice::udp::bind(any, sluice::part::Sharing::First).expect("bind"))
        .collect();
    let ports: HashSet<u16> = sockets.iter().map(|(_, local)| local.port()).collect();
    assert_eq!(ports.len(), sockets.len(), "a port was handed out twice");
}
