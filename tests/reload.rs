//! Reloading the config (issue 10, "Reload"): listeners that stay keep their socket, new ones
//! bind, removed ones stop accepting while their connections finish, connections in flight keep
//! their server and settings, health carries over, and a reload that fails changes nothing.
//! In-process through `Proxy::reload`, and the binary through SIGHUP.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use sluice::config::{Config, ServerId, UpstreamId};
use sluice::runtime::{Proxy, ReloadError};

fn parse(text: &str) -> Config {
    Config::parse(text, "reload.conf").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The bound address of the listener of `proxy` on IP `ip` (each test listener has its own
/// loopback address, so that a port 0 in the config still names one listener).
fn bound_on(proxy: &Proxy, ip: [u8; 4]) -> SocketAddr {
    proxy
        .local_addrs()
        .into_iter()
        .find(|a| a.ip() == std::net::IpAddr::from(ip))
        .unwrap_or_else(|| panic!("no listener on {ip:?}: {:?}", proxy.local_addrs()))
}

/// One round trip of `msg` through an echo.
fn echo_once(addr: SocketAddr, msg: &[u8]) -> io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    round_trip(&mut s, msg)
}

/// A long connection streaming verified bytes both ways through an echo until `stop`, then
/// finishing cleanly; returns the bytes verified.
fn stream_until(
    addr: SocketAddr,
    seed: u64,
    stop: &AtomicBool,
    echoes: &AtomicU64,
    started: &AtomicU64,
) -> Result<u64, String> {
    const CHUNK: usize = 4096;
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut out = PayloadStream::new(seed);
    let mut verifier = Verifier::new(seed);
    let (mut chunk, mut back) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    while !stop.load(Ordering::Relaxed) {
        out.fill(&mut chunk);
        s.write_all(&chunk)
            .map_err(|e| format!("write at {}: {e}", verifier.pos))?;
        s.read_exact(&mut back)
            .map_err(|e| format!("read at {}: {e}", verifier.pos))?;
        verifier
            .check(&back)
            .map_err(|at| format!("byte {at} differs"))?;
        echoes.fetch_add(1, Ordering::Relaxed);
        if verifier.pos == CHUNK as u64 {
            started.fetch_add(1, Ordering::Relaxed);
        }
        // Pacing, not synchronisation: 100 of these share two CPUs with the proxy.
        thread::sleep(Duration::from_millis(10));
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("the end: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last echo", rest.len()));
    }
    Ok(verifier.pos * 2)
}

/// Round `round` of the reload test's configs: two listeners that always stay (127.0.0.1 and
/// 127.0.0.2), one that changes every round (127.0.0.3 to .5), listed in an order that changes
/// too; the servers, the balance method and the timeouts change as well.
fn round_conf(round: usize, echo: &[SocketAddr; 3]) -> String {
    let [a, b, c] = echo;
    let servers = match round % 3 {
        0 => format!("server {a}; server {b};"),
        1 => format!("server {a}; server {b}; server {c};"),
        _ => format!("server {a}; server {c};"),
    };
    let balance = ["round_robin", "least_conn"][round % 2];
    let settings = format!(
        "idle_timeout {}s; connect_timeout {}s;",
        60 + round,
        2 + round % 3
    );
    let listen = |ip: u8| format!("listen 127.0.0.{ip}:0 {{ proxy u; {settings} }}\n");
    let extra = listen(3 + (round % 3) as u8);
    let kept = [listen(1), listen(2)];
    let listeners = if round % 2 == 0 {
        format!("{}{extra}{}", kept[0], kept[1])
    } else {
        format!("{extra}{}{}", kept[1], kept[0])
    };
    format!("workers 2;\nupstream u {{ balance {balance}; {servers} }}\n{listeners}")
}

#[test]
fn twenty_reloads_under_load_refuse_nothing_and_lose_nothing() {
    const STREAMS: usize = 100;
    const RELOADS: usize = 20;
    let backends = [Backend::echo(), Backend::echo(), Backend::echo()];
    let echo = [backends[0].addr(), backends[1].addr(), backends[2].addr()];
    let proxy = start(parse(&round_conf(0, &echo)));
    let kept = [
        bound_on(&proxy, [127, 0, 0, 1]),
        bound_on(&proxy, [127, 0, 0, 2]),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let echoes = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let streams: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (stop, echoes, started) =
                (Arc::clone(&stop), Arc::clone(&echoes), Arc::clone(&started));
            let addr = kept[i % 2];
            thread::spawn(move || stream_until(addr, 1000 + i as u64, &stop, &echoes, &started))
        })
        .collect();
    let opened = Arc::new(AtomicU64::new(0));
    let connector = {
        let (stop, opened) = (Arc::clone(&stop), Arc::clone(&opened));
        thread::spawn(move || -> Vec<String> {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for addr in kept {
                    match echo_once(addr, b"new connection\n") {
                        Ok(()) => {
                            opened.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(format!("{addr}: {e}")),
                    }
                }
            }
            failures
        })
    };
    let streaming = wait_until(EVENTUALLY, || load(&started) == STREAMS as u64);
    assert!(streaming, "the streams did not all start");
    // Every server state any round had: each must end with no connection counted.
    let mut seen: Vec<Arc<sluice::metrics::ServerShared>> = Vec::new();

    let before = opened.load(Ordering::Relaxed);
    for round in 1..=RELOADS {
        for shared in proxy.stats().servers(UpstreamId(0)) {
            if !seen.iter().any(|s| Arc::ptr_eq(s, &shared)) {
                seen.push(shared);
            }
        }
        let done = proxy
            .reload(parse(&round_conf(round, &echo)))
            .unwrap_or_else(|e| panic!("reload {round}: {e}"));
        assert_eq!((done.added, done.removed), (1, 1), "round {round}");
        // The listener this round added serves at once.
        let extra = bound_on(&proxy, [127, 0, 0, 3 + (round % 3) as u8]);
        echo_once(extra, b"the new listener\n")
            .unwrap_or_else(|e| panic!("round {round}: new listener {extra}: {e}"));
        // Between two reloads: more new connections, and the streams move on.
        let (now, moved) = (
            opened.load(Ordering::Relaxed),
            echoes.load(Ordering::Relaxed),
        );
        let going = wait_until(EVENTUALLY, || {
            opened.load(Ordering::Relaxed) >= now + 25
                && echoes.load(Ordering::Relaxed) >= moved + 2 * STREAMS as u64
        });
        assert!(going, "round {round}: connections or streams stopped");
    }
    let during = opened.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    let failures = connector.join().expect("connector");
    let mut verified = 0;
    let mut broken = Vec::new();
    for (i, s) in streams.into_iter().enumerate() {
        match s.join().expect("stream thread") {
            Ok(bytes) => verified += bytes,
            Err(e) => broken.push(format!("stream {i}: {e}")),
        }
    }
    eprintln!(
        "reload under load: {RELOADS} reloads, {during} connections opened during them, \
         {} failed; {STREAMS} streams, {verified} bytes verified, {} broken",
        failures.len(),
        broken.len()
    );
    assert!(failures.is_empty(), "connects failed: {failures:?}");
    assert!(broken.is_empty(), "streams broke: {broken:?}");
    assert_eq!(load(&proxy.stats().reloads), RELOADS as u64);
    assert_all_pairs_freed(&proxy, "every pair ends");
    // The per-server counts carried through 20 reloads (servers removed while in use, retired,
    // and added back) are exact: nothing is left counted, nothing went below zero.
    seen.extend(proxy.stats().servers(UpstreamId(0)));
    for shared in &seen {
        assert_eq!(load(&shared.active), 0, "server {}", shared.addr);
    }
}

#[test]
fn a_removed_listener_refuses_new_connects_while_its_pair_finishes() {
    let server = Backend::echo();
    let both = format!(
        "upstream u {{ server {0}; }}
         listen 127.0.0.1:0 {{ proxy u; }}
         listen 127.0.0.2:0 {{ proxy u; }}",
        server.addr()
    );
    let proxy = start(parse(&both));
    let removed = bound_on(&proxy, [127, 0, 0, 2]);
    let mut open = connect(removed);
    round_trip(&mut open, b"before\n").expect("through the listener");
    let one = format!(
        "upstream u {{ server {0}; }} listen 127.0.0.1:0 {{ proxy u; }}",
        server.addr()
    );
    let done = proxy.reload(parse(&one)).expect("reload");
    assert_eq!((done.added, done.removed), (0, 1));
    let refused = TcpStream::connect(removed)
        .map(|_| ())
        .map_err(|e| e.kind());
    assert_eq!(refused, Err(io::ErrorKind::ConnectionRefused));
    // The pair it had goes on: a 1 MB round trip, then a clean end.
    let big = payload(7, 1 << 20);
    open.write_all(&big).expect("write");
    let back = read_exactly(&mut open, big.len()).expect("echo");
    assert!(back == big, "the echo differs");
    open.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert_eq!(how_it_ends(&mut open), Ok(()));
    assert_all_pairs_freed(&proxy, "the pair ends");
    assert_eq!(proxy.local_addrs().len(), 1);
}

#[test]
fn a_pair_keeps_a_server_the_reload_removed_and_new_ones_go_to_the_new_servers() {
    let (a, b) = (Backend::greet_echo("a"), Backend::greet_echo("b"));
    let conf = |server: SocketAddr| {
        format!("upstream u {{ server {server}; }} listen 127.0.0.1:0 {{ proxy u; }}")
    };
    let proxy = start(parse(&conf(a.addr())));
    let addr = proxy.local_addr(0).expect("addr");
    let mut held = hold(addr).expect("a connection to a");
    assert_eq!(held.name, "a");
    let a_state = proxy.stats().server(UpstreamId(0), ServerId(0)).expect("a");
    proxy.reload(parse(&conf(b.addr()))).expect("reload");
    for _ in 0..5 {
        assert_eq!(hold(addr).expect("new connection").name, "b");
    }
    held.round_trip(b"still a?\n")
        .expect("the held pair goes on");
    held.finish().expect("the held pair ends cleanly");
    assert!(
        wait_until(EVENTUALLY, || load(&a_state.active) == 0),
        "a's connection is released"
    );
    assert_all_pairs_freed(&proxy, "every pair ends");
}

#[test]
fn pairs_in_flight_keep_the_settings_they_were_accepted_under() {
    let server = Backend::echo();
    let conf = |idle: &str| {
        format!(
            "upstream u {{ server {}; }} listen 127.0.0.1:0 {{ proxy u; idle_timeout {idle}; }}",
            server.addr()
        )
    };
    let proxy = start(parse(&conf("2s")));
    let addr = proxy.local_addr(0).expect("addr");
    let mut before = connect(addr);
    round_trip(&mut before, b"accepted under 2s\n").expect("echo");
    proxy.reload(parse(&conf("1h"))).expect("reload");
    round_trip(&mut before, b"still open after the reload\n").expect("echo");
    let mut after = connect(addr);
    round_trip(&mut after, b"accepted under 1h\n").expect("echo");
    // The old pair still ends at its 2 s idle timeout; the new one, under 1 h, does not.
    let closed = closed_within(&mut before, EVENTUALLY);
    assert!(closed.is_some(), "the old pair took the new idle_timeout");
    assert!(
        silent_for(&mut after, Duration::from_millis(2500)),
        "the new pair took the old one"
    );
    assert_eq!(proxy.stats().ended(sluice::runtime::End::IdleTimeout), 1);
}

#[test]
fn a_server_down_by_health_checks_stays_down_across_a_reload() {
    // b accepts connections but fails the payload check: only the checks keep clients off it.
    let (a, b) = (
        Backend::line("a", b"PONG\r\n"),
        Backend::line("b", b"NOPE\r\n"),
    );
    let conf = |check: &str, idle: u32| {
        format!(
            "upstream u {{ server {}; server {}; health_check interval=100ms timeout=1s rise=2 fall=1 {check}; }}
             listen 127.0.0.1:0 {{ proxy u; idle_timeout {idle}s; }}",
            a.addr(),
            b.addr()
        )
    };
    let payload_check = r#"send="PING\r\n" expect="PONG""#;
    let proxy = start(parse(&conf(payload_check, 60)));
    let addr = proxy.local_addr(0).expect("addr");
    let b_state = proxy.stats().server(UpstreamId(0), ServerId(1)).expect("b");
    assert!(
        wait_until(EVENTUALLY, || !b_state.healthy.load(Ordering::Relaxed)),
        "b is found down"
    );
    let pings = b.pings();
    proxy
        .reload(parse(&conf(payload_check, 61)))
        .expect("reload");
    assert!(!b_state.healthy.load(Ordering::Relaxed), "still down");
    for _ in 0..20 {
        assert_eq!(fetch_name_with(addr, b"hello\n").expect("a name"), "a");
    }
    assert!(
        wait_until(EVENTUALLY, || b.pings() > pings + 2),
        "the checks go on after the reload"
    );
    assert!(
        !b_state.healthy.load(Ordering::Relaxed),
        "down until a check passes"
    );
    assert_eq!(b.served(), 0, "no client reached b");
    // Checks that b passes (a plain connect) bring it up after `rise` of them.
    proxy.reload(parse(&conf("", 61))).expect("reload");
    assert!(
        wait_until(EVENTUALLY, || b_state.healthy.load(Ordering::Relaxed)),
        "b comes up once its checks pass"
    );
    assert!(
        wait_until(EVENTUALLY, || fetch_name_with(addr, b"hello\n")
            .is_ok_and(|n| n == "b")),
        "clients reach b again"
    );
}

#[test]
fn a_udp_session_outlives_the_reload_that_removed_its_listener() {
    let server = UdpBackend::echo("u");
    let conf = |udp: bool| {
        let udp = match udp {
            true => "listen udp 127.0.0.2:0 { proxy u; idle_timeout 3s; }",
            false => "",
        };
        format!(
            "upstream u {{ server {}; }} listen 127.0.0.1:0 {{ proxy u; }} {udp}",
            server.addr
        )
    };
    let proxy = start(parse(&conf(true)));
    let udp = bound_on(&proxy, [127, 0, 0, 2]);
    let client = udp_client(Duration::from_millis(300));
    assert_eq!(exchange(&client, udp, b"one"), b"one");
    proxy.reload(parse(&conf(false))).expect("reload");
    // The session goes on, replies leaving through the removed listener's socket.
    assert_eq!(exchange(&client, udp, b"two"), b"two");
    // A new client gets nothing, and the drop is counted.
    let dropped = load(&proxy.stats().udp_dropped);
    let stranger = udp_client(Duration::from_millis(300));
    stranger.send_to(b"hello", udp).expect("send");
    let mut buf = [0u8; 64];
    assert!(
        stranger.recv_from(&mut buf).is_err(),
        "a new client was served"
    );
    assert!(load(&proxy.stats().udp_dropped) > dropped);
    assert_eq!(
        server.received(),
        2,
        "the stranger never reached the server"
    );
    // When the session's idle timeout ends it, the port is let go.
    let freed = wait_until(EVENTUALLY, || std::net::UdpSocket::bind(udp).is_ok());
    assert!(freed, "the removed listener's port stays bound");
    assert_eq!(load(&proxy.stats().udp_sessions_active), 0);
}

#[test]
fn a_reload_that_cannot_bind_or_has_no_listener_changes_nothing() {
    let (a, b) = (Backend::greet("a"), Backend::greet("b"));
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ proxy {}; }}",
        a.addr()
    )));
    let addr = proxy.local_addr(0).expect("addr");
    let taken = TcpListener::bind("127.0.0.2:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let text = format!(
        "listen 127.0.0.1:0 {{ proxy {}; }} listen 127.0.0.2:{port} {{ proxy {}; }}",
        b.addr(),
        b.addr()
    );
    match proxy.reload(parse(&text)) {
        Err(ReloadError::Bind(e)) => assert!(
            e.to_string().contains(&format!(
                "cannot listen on 127.0.0.2:{port}: address already in use"
            )),
            "{e}"
        ),
        other => panic!("the reload went through: {other:?}"),
    }
    assert_eq!(
        fetch_name(addr).expect("name"),
        "a",
        "the old upstream stays"
    );
    assert_eq!(proxy.local_addrs(), vec![addr]);
    let empty = Config {
        listeners: Vec::new(),
        ..parse(&text)
    };
    assert!(matches!(proxy.reload(empty), Err(ReloadError::NoListeners)));
    assert_eq!(load(&proxy.stats().reload_failures), 2);
    assert_eq!(load(&proxy.stats().reloads), 0);
}

// ---- the binary: SIGHUP ------------------------------------------------------------------------

#[test]
fn sighup_rereads_the_file_and_a_bad_one_changes_nothing() {
    let (a, b) = (Backend::greet("a"), Backend::greet("b"));
    let port = free_port(Transport::Tcp);
    let conf = TempFile::new(
        "sighup",
        &format!("listen 127.0.0.1:{port} {{\n  proxy {};\n}}\n", a.addr()),
    );
    let mut sluice = SluiceChild::spawn(sluice_command(&["-c", conf.path_str()]));
    assert!(
        wait_listening(&mut sluice, port),
        "stderr:\n{}",
        sluice.stderr()
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(fetch_name(addr).expect("name"), "a");
    let reload = |sluice: &mut SluiceChild, text: &str, expect: &str| {
        std::fs::write(conf.path_str(), text).expect("rewrite the config");
        sluice.signal("HUP");
        let line = sluice.wait_for_stderr_line(EVENTUALLY, |l| l.contains(expect));
        assert!(
            line.is_some(),
            "no '{expect}'; stderr:\n{}",
            sluice.stderr()
        );
    };

    // A syntax error: named with file, line and column; the proxy goes on as it was.
    let path = conf.path_str().to_string();
    reload(
        &mut sluice,
        &format!("listen 127.0.0.1:{port} {{\n  proxy {}\n}}\n", b.addr()),
        &format!("reload failed: {path}:2:24: expected ';'"),
    );
    assert_eq!(fetch_name(addr).expect("name"), "a");

    // A new listener whose port another socket holds: the whole reload is refused.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    reload(
        &mut sluice,
        &format!(
            "listen 127.0.0.1:{port} {{ proxy {b}; }}\nlisten 127.0.0.1:{taken_port} {{ proxy {b}; }}\n",
            b = b.addr()
        ),
        &format!("reload failed: cannot listen on 127.0.0.1:{taken_port}: address already in use"),
    );
    assert_eq!(fetch_name(addr).expect("name"), "a");

    // A good one: the new upstream and the new listener, the same socket.
    drop(taken);
    let new_port = free_port(Transport::Tcp);
    reload(
        &mut sluice,
        &format!(
            "listen 127.0.0.1:{port} {{ proxy {b}; }}\nlisten 127.0.0.1:{new_port} {{ proxy {b}; }}\n",
            b = b.addr()
        ),
        "reloaded: +1 listeners, -0 listeners, 2 upstreams changed",
    );
    assert_eq!(fetch_name(addr).expect("name"), "b");
    let new_addr = SocketAddr::from(([127, 0, 0, 1], new_port));
    assert_eq!(fetch_name(new_addr).expect("name"), "b");
    sluice.signal("TERM");
    let status = sluice.wait_exit(EVENTUALLY);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "stderr:\n{}",
        sluice.stderr()
    );
}

#[test]
fn a_server_removed_while_in_use_and_added_back_counts_its_connections_right() {
    let (a, b) = (Backend::greet_echo("a"), Backend::greet_echo("b"));
    let conf =
        |servers: &str| format!("upstream u {{ {servers} }} listen 127.0.0.1:0 {{ proxy u; }}");
    let both = format!("server {}; server {};", a.addr(), b.addr());
    let proxy = start(parse(&conf(&both)));
    let addr = proxy.local_addr(0).expect("addr");
    let held: Vec<Held> = (0..4).map(|_| hold(addr).expect("hold")).collect();
    assert!(held.iter().any(|h| h.name == "b"), "round robin reached b");
    proxy
        .reload(parse(&conf(&format!("server {};", a.addr()))))
        .expect("b removed");
    proxy.reload(parse(&conf(&both))).expect("b back");
    let b_now = proxy.stats().server(UpstreamId(0), ServerId(1)).expect("b");
    let on_b = held.iter().filter(|h| h.name == "b").count() as u64;
    assert_eq!(
        load(&b_now.active),
        on_b,
        "b's connections count in its new state"
    );
    for h in held {
        h.finish().expect("finish");
    }
    assert_all_pairs_freed(&proxy, "every pair ends");
    assert!(wait_until(EVENTUALLY, || load(&b_now.active) == 0));
    let a_now = proxy.stats().server(UpstreamId(0), ServerId(0)).expect("a");
    assert_eq!(load(&a_now.active), 0);
}

#[test]
fn removing_health_checks_brings_their_down_servers_back() {
    let (a, b) = (
        Backend::line("a", b"PONG\r\n"),
        Backend::line("b", b"NOPE\r\n"),
    );
    let conf = |check: &str| {
        format!(
            "upstream u {{ server {}; server {}; {check} }} listen 127.0.0.1:0 {{ proxy u; }}",
            a.addr(),
            b.addr()
        )
    };
    let checked = r#"health_check interval=100ms timeout=1s fall=1 send="PING\r\n" expect="PONG";"#;
    let proxy = start(parse(&conf(checked)));
    let addr = proxy.local_addr(0).expect("addr");
    let b_state = proxy.stats().server(UpstreamId(0), ServerId(1)).expect("b");
    assert!(wait_until(EVENTUALLY, || !b_state
        .healthy
        .load(Ordering::Relaxed)));
    proxy
        .reload(parse(&conf("")))
        .expect("reload without checks");
    assert!(
        b_state.healthy.load(Ordering::Relaxed),
        "no checks: nothing keeps b down"
    );
    let names: Vec<String> = (0..4)
        .map(|_| fetch_name_with(addr, b"hello\n").expect("name"))
        .collect();
    assert!(
        names.iter().any(|n| n == "b"),
        "b takes clients again: {names:?}"
    );
}

#[test]
fn a_udp_listener_added_back_before_its_sessions_ended_takes_its_port_again() {
    let server = UdpBackend::echo("u");
    let conf = |udp: bool| {
        let udp = match udp {
            true => "listen udp 127.0.0.2:0 { proxy u; idle_timeout 30s; }",
            false => "",
        };
        format!(
            "workers 2; upstream u {{ server {}; }} listen 127.0.0.1:0 {{ proxy u; }} {udp}",
            server.addr
        )
    };
    let proxy = start(parse(&conf(true)));
    let udp = bound_on(&proxy, [127, 0, 0, 2]);
    let client = udp_client(Duration::from_millis(300));
    assert_eq!(exchange(&client, udp, b"one"), b"one");
    proxy.reload(parse(&conf(false))).expect("removed");
    proxy
        .reload(parse(&conf(true)))
        .expect("added back while its session runs");
    assert_eq!(bound_on(&proxy, [127, 0, 0, 2]), udp, "the same port");
    assert_eq!(
        exchange(&client, udp, b"two"),
        b"two",
        "the session goes on"
    );
    let stranger = udp_client(Duration::from_millis(300));
    assert_eq!(
        exchange(&stranger, udp, b"new"),
        b"new",
        "new clients are served again"
    );
}
