//! Access rules and per-client limits (issue 12): who a listener refuses, how much one client
//! may take, all before any server sees the client. Loopback only: clients take distinct
//! 127.0.0.x source addresses, and IPv6 ones come from [::1].

mod common;

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use sluice::config::Config;
use sluice::runtime::{End, Proxy};

fn parse(text: &str) -> Config {
    Config::parse(text, "access.conf").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Whether a connection from `from` to `to` is served: the backend's greeting arrives (a
/// refused client is closed before any byte).
fn served_from(from: IpAddr, to: SocketAddr) -> bool {
    let Ok(mut s) = connect_from(from, to) else {
        return false;
    };
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if n > 0)
}

fn denied(proxy: &Proxy, why: &str) -> u64 {
    let l = proxy
        .stats()
        .listener(sluice::config::ListenerId(0))
        .expect("listener");
    let d = sluice::metrics::Denial::ALL
        .into_iter()
        .find(|d| d.as_str() == why)
        .expect("reason");
    l.denied(d)
}

#[test]
fn rules_decide_in_order_and_ipv6_and_ipv4_clients_are_told_apart() {
    let backend = Backend::greet("b");
    let both = |rules: &str| {
        format!(
            "{rules}\nlisten 127.0.0.1:0 {{ proxy {0}; }}\nlisten [::1]:0 {{ proxy {0}; }}",
            backend.addr()
        )
    };
    let proxy = start(parse(&both("deny 127.0.0.0/8; allow all;")));
    let (v4, v6) = (
        proxy.local_addr(0).expect("v4"),
        proxy.local_addr(1).expect("v6"),
    );
    assert!(!served_from(ip("127.0.0.1"), v4), "127.0.0.1 is denied");
    assert!(served_from(ip("::1"), v6), "::1 is served");
    assert_eq!(
        backend.accepted(),
        1,
        "the denied client never reached the server"
    );
    assert_eq!(denied(&proxy, "acl"), 1);
    assert_eq!(proxy.stats().ended(End::Denied), 1);
    // The other way round.
    proxy
        .reload(parse(&both("allow ::1; deny all;")))
        .expect("reload");
    assert!(served_from(ip("::1"), v6));
    assert!(!served_from(ip("127.0.0.1"), v4));
    assert_eq!(backend.accepted(), 2);
    // Order: the first rule that matches wins.
    proxy
        .reload(parse(&both("allow 127.0.0.2; deny 127.0.0.0/8;")))
        .expect("reload");
    assert!(served_from(ip("127.0.0.2"), v4), "127.0.0.2 is let in");
    assert!(!served_from(ip("127.0.0.3"), v4), "127.0.0.3 is kept out");
    assert_eq!(backend.accepted(), 3);
}

#[test]
fn the_sixth_connection_from_one_address_is_refused_and_others_go_on() {
    let backend = Backend::greet_echo("b");
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ proxy {}; max_connections_per_ip 5; }}",
        backend.addr()
    )));
    let addr = proxy.local_addr(0).expect("addr");
    let mut five: Vec<Held> = (0..5).map(|_| hold(addr).expect("held")).collect();
    let mut sixth = connect(addr);
    assert_eq!(
        how_it_ends(&mut sixth),
        Ok(()),
        "closed at once, no greeting"
    );
    for h in &mut five {
        h.round_trip(b"still working\n").expect("the five go on");
    }
    assert!(
        served_from(ip("127.0.0.2"), addr),
        "another address is unaffected"
    );
    assert_eq!(denied(&proxy, "max_connections_per_ip"), 1);
    assert_eq!(proxy.stats().ended(End::Limit), 1);
    five.pop().expect("one").finish().expect("finish");
    assert!(
        wait_until(EVENTUALLY, || hold(addr).is_ok_and(|h| h.finish().is_ok())),
        "after one closes a new one is served"
    );
    assert_eq!(
        backend.served(),
        7,
        "the refused one never reached the server"
    );
}

#[test]
fn a_burst_gets_the_burst_then_the_rate() {
    let backend = Backend::greet("b");
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ proxy {}; rate_per_ip 10/s burst=5; }}",
        backend.addr()
    )));
    let addr = proxy.local_addr(0).expect("addr");
    let from = ip("127.0.0.4");
    let began = Instant::now();
    let burst = (0..30).filter(|_| served_from(from, addr)).count();
    let took = began.elapsed();
    // About 5 at once, plus what 10 a second refilled while the burst ran.
    let refill = (took.as_secs_f64() * 10.0).ceil() as usize;
    assert!(
        (5..=5 + refill + 1).contains(&burst),
        "{burst} of 30 in {took:?}"
    );
    // Then about 10 a second: one every 100 ms, counted over 3 s (about 30, loosely: a loaded
    // machine tries less often, and never gets more through than the bucket refills).
    let mut later = 0;
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(3) {
        if served_from(from, addr) {
            later += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!((15..=36).contains(&later), "{later} served in 3 s at 10/s");
    assert!(
        served_from(ip("127.0.0.5"), addr),
        "another address has its own bucket"
    );
    assert!(denied(&proxy, "rate_per_ip") > 0);
}

#[test]
fn a_listener_at_its_own_cap_leaves_clients_in_the_backlog() {
    let backend = Backend::greet_echo("b");
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ proxy {}; max_connections 2; }}",
        backend.addr()
    )));
    let addr = proxy.local_addr(0).expect("addr");
    let first = hold(addr).expect("one");
    let _second = hold(addr).expect("two");
    let mut third = connect(addr);
    assert!(
        silent_for(&mut third, Duration::from_millis(400)),
        "the third waits"
    );
    first.finish().expect("finish");
    let mut greeting = [0u8; 2];
    third
        .read_exact(&mut greeting)
        .expect("the third is served once a slot frees");
    assert_eq!(&greeting, b"b\n");
    assert_eq!(
        proxy.stats().ended(End::Limit),
        0,
        "waiting is not refusing"
    );
}

#[test]
fn udp_rules_and_sessions_per_client() {
    let server = UdpBackend::echo("u");
    let proxy = start(parse(&format!(
        "listen udp 127.0.0.1:0 {{ proxy {}; deny 127.0.0.9; max_sessions_per_ip 1; }}",
        server.addr
    )));
    let addr = proxy.local_addr(0).expect("addr");
    let client = udp_client(Duration::from_millis(300));
    assert_eq!(exchange(&client, addr, b"one"), b"one");
    // A second session from the same address (another port) is refused.
    let second = udp_client(Duration::from_millis(300));
    second.send_to(b"two", addr).expect("send");
    let mut buf = [0u8; 16];
    assert!(
        second.recv_from(&mut buf).is_err(),
        "a second session was opened"
    );
    // A denied address gets nothing and opens no session.
    let banned = std::net::UdpSocket::bind("127.0.0.9:0").expect("bind");
    banned
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    banned.send_to(b"let me in", addr).expect("send");
    assert!(banned.recv_from(&mut buf).is_err());
    assert_eq!(
        server.received(),
        1,
        "only the first client reached the server"
    );
    assert_eq!(denied(&proxy, "max_sessions_per_ip"), 1);
    assert_eq!(denied(&proxy, "acl"), 1);
    assert_eq!(load(&proxy.stats().udp_sessions_active), 1);
}

#[test]
fn the_access_log_names_the_rule_and_the_limit() {
    let backend = Backend::greet_echo("b");
    let (sluice, addr) = SluiceChild::start_listening(Transport::Tcp, |listen| {
        let conf = format!(
            "listen {listen} {{ proxy {}; deny 127.0.0.8; max_connections_per_ip 1; }}\n",
            backend.addr()
        );
        let file = Box::leak(Box::new(TempFile::new("access", &conf)));
        vec!["-c".into(), file.path_str().to_string()]
    });
    assert!(!served_from(ip("127.0.0.8"), addr));
    let line = sluice.wait_for_stderr_line(EVENTUALLY, |l| l.contains("end=denied"));
    let line = line.unwrap_or_else(|| panic!("no denied line:\n{}", sluice.stderr()));
    assert!(
        line.contains("client=127.0.0.8:") && line.contains("rule=\"deny 127.0.0.8\""),
        "{line}"
    );
    assert!(line.contains("server=-"), "{line}");
    let held = hold(addr).expect("one");
    let mut second = connect(addr);
    assert_eq!(how_it_ends(&mut second), Ok(()));
    let line = sluice.wait_for_stderr_line(EVENTUALLY, |l| l.contains("end=limit"));
    let line = line.unwrap_or_else(|| panic!("no limit line:\n{}", sluice.stderr()));
    assert!(line.contains("limit=max_connections_per_ip"), "{line}");
    held.finish().expect("finish");
}

#[test]
fn explain_names_the_rule_that_matches() {
    let backend = Backend::greet("b");
    let proxy = start(parse(&format!(
        "admin 127.0.0.1:0;\nlisten 127.0.0.1:0 {{ proxy {}; allow 127.0.0.2; deny 127.0.0.0/8; max_connections_per_ip 3; }}",
        backend.addr()
    )));
    let admin = proxy.admin_addr().expect("admin");
    let listen = proxy.local_addr(0).expect("addr");
    let body = http::get(
        admin,
        &format!("/explain?listener={listen}&client=127.0.0.3"),
    )
    .body;
    assert!(
        body.contains("\"access\":\"deny 127.0.0.0/8\"") && body.contains("\"denied\":true"),
        "{body}"
    );
    let body = http::get(
        admin,
        &format!("/explain?listener={listen}&client=127.0.0.2"),
    )
    .body;
    assert!(
        body.contains("\"access\":\"allow 127.0.0.2\"") && body.contains("\"max_per_ip\":3"),
        "{body}"
    );
    let body = http::get(
        admin,
        &format!("/explain?listener={listen}&client=10.1.1.1"),
    )
    .body;
    assert!(
        body.contains("\"access\":\"allow: no rule matches\""),
        "{body}"
    );
}

/// Reads `len` bytes of the stream for `seed`, verifying them; returns when the first
/// `mark` bytes had arrived and when all had.
fn timed_read(s: &mut std::net::TcpStream, seed: u64, len: u64, mark: u64) -> (Duration, Duration) {
    let began = Instant::now();
    let mut verifier = Verifier::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut at_mark = None;
    while verifier.pos < len {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "the stream ended at {}", verifier.pos);
        verifier
            .check(&buf[..n])
            .unwrap_or_else(|at| panic!("byte {at} differs"));
        if at_mark.is_none() && verifier.pos >= mark {
            at_mark = Some(began.elapsed());
        }
    }
    (at_mark.unwrap_or_default(), began.elapsed())
}

#[test]
fn limit_rate_paces_each_direction_and_every_byte_arrives() {
    const LEN: u64 = 8 << 20;
    let server = Backend::stream(LEN, 21);
    let echo = Backend::echo();
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ proxy {}; limit_rate 4m; }}\n\
         listen 127.0.0.2:0 {{ proxy {}; limit_rate 4m; }}",
        server.addr(),
        echo.addr()
    )));
    // Download: 8 MiB at 4 MiB/s is 2 s.
    let mut down = connect(proxy.local_addr(0).expect("addr"));
    let (_, took) = timed_read(&mut down, 21, LEN, 0);
    let window = Duration::from_millis(1400)..Duration::from_millis(3000);
    assert!(window.contains(&took), "download took {took:?}");
    assert!(
        proxy.stats().buffers_peak() <= 2,
        "one pair, at most two buffers"
    );
    drop(down);
    // Upload through an echo: the upload is paced, and so is the echo coming back.
    let mut up = connect(proxy.local_addr(1).expect("addr"));
    let mut writer = up.try_clone().expect("clone");
    let sender = std::thread::spawn(move || write_payload(&mut writer, 22, LEN));
    let (_, took) = timed_read(&mut up, 22, LEN, 0);
    sender.join().expect("sender").expect("upload");
    assert!(window.contains(&took), "upload and echo took {took:?}");
    assert!(
        proxy.stats().buffers_peak() <= 2,
        "still at most two buffers"
    );
}

#[test]
fn limit_rate_after_lets_the_first_bytes_go_at_full_speed() {
    const LEN: u64 = 3 << 20;
    let server = Backend::stream(LEN, 23);
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ proxy {}; limit_rate 1m; limit_rate_after 1m; }}",
        server.addr()
    )));
    let mut c = connect(proxy.local_addr(0).expect("addr"));
    let (first, all) = timed_read(&mut c, 23, LEN, 1 << 20);
    assert!(
        first < Duration::from_millis(500),
        "the first MiB took {first:?}"
    );
    // The other 2 MiB at 1 MiB/s: about 2 s more.
    assert!(
        all >= Duration::from_millis(1400),
        "the rest was not paced: {all:?}"
    );
}
