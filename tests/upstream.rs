//! Upstream groups end to end (issue 4): balancing methods, active health checks (connect and
//! send/expect), passive health (`max_fails`), `max_conns`, backup servers, all servers down, and
//! `-b` on the command line. Real TCP backends on 127.0.0.1, each answering with its own name.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use sluice::runtime::{End, Proxy};

/// A TCP listener on a free loopback port in front of upstream `u` (given as its block body).
fn tcp_conf(upstream: &str) -> String {
    format!(
        "access_log off;\nupstream u {{\n{upstream}\n}}\nlisten 127.0.0.1:0 {{\n    proxy u;\n}}\n"
    )
}

fn addr_of(proxy: &Proxy) -> SocketAddr {
    proxy.local_addr(0).expect("listener")
}

/// `n` whole connections one after the other; how many each backend name served.
fn tally(addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let name = fetch_name(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// The pause between the paced connections of the health-check tests: a probe of the proxy's
/// state, not a wait for it.
const PACE: Duration = Duration::from_millis(20);

#[test]
fn weighted_round_robin_follows_weights() {
    let a = Backend::greet("a");
    let b = Backend::greet("b");
    let c = Backend::greet("c");
    let proxy = start_conf(&tcp_conf(&format!(
        "    balance weighted_round_robin;\n    server {} weight=3;\n    server {} weight=2;\n    server {} weight=1;",
        a.addr(), b.addr(), c.addr()
    )));
    let counts = tally(addr_of(&proxy), 600);
    println!("600 connections: {counts:?}");
    for (name, due) in [("a", 300), ("b", 200), ("c", 100)] {
        let got = counts.get(name).copied().unwrap_or(0);
        let slack = due / 20;
        assert!(
            got.abs_diff(due) <= slack,
            "server {name} got {got} of 600 connections, {due} ± {slack} due: {counts:?}"
        );
    }
}

#[test]
fn active_health_check_takes_a_dead_server_out_and_back() {
    const INTERVAL: u64 = 200;
    const TIMEOUT: u64 = 100;
    const FALL: u64 = 2;
    const RISE: u64 = 2;
    const SLACK: u64 = 500;
    let a = Backend::greet("a");
    let mut b = Backend::greet("b");
    let c = Backend::greet("c");
    // max_fails=0: passive health is off, so only the probes can take `b` out.
    let proxy = start_conf(&tcp_conf(&format!(
        "    balance round_robin;\n    server {} max_fails=0;\n    server {} max_fails=0;\n    server {} max_fails=0;\n    health_check interval={INTERVAL}ms timeout={TIMEOUT}ms fall={FALL} rise={RISE};",
        a.addr(), b.addr(), c.addr()
    )));
    let addr = addr_of(&proxy);
    let stats = proxy.stats();
    let counts = tally(addr, 9);
    assert_eq!(counts.len(), 3, "all three serve at first: {counts:?}");

    // Kill `b`. Until the probes notice, round robin still tries it: each try is a refused
    // connect (counted) and the client is retried on the next server.
    b.kill();
    let killed = Instant::now();
    let mut failures = load(&stats.connect_failures);
    let mut last_try = None;
    let mut clean = 0;
    while clean < 12 {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "the dead server is still tried after 15 s"
        );
        let name = fetch_name(addr).expect("a connection is still served");
        assert_ne!(name, "b");
        let now = load(&stats.connect_failures);
        if now > failures {
            failures = now;
            last_try = Some(killed.elapsed());
            clean = 0;
        } else {
            clean += 1;
        }
        thread::sleep(PACE);
    }
    let last_try =
        last_try.expect("the dead server was tried at least once before the probes took it out");
    let bound = Duration::from_millis(FALL * INTERVAL + TIMEOUT + SLACK);
    println!("dead server last tried {last_try:?} after the kill (bound {bound:?})");
    assert!(
        last_try <= bound,
        "the dead server was still tried {last_try:?} after the kill"
    );

    // Bring it back: the probes put it in again within rise × interval.
    b.restart();
    let back = Instant::now();
    loop {
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "the server never came back"
        );
        if fetch_name(addr).expect("served") == "b" {
            break;
        }
        thread::sleep(PACE);
    }
    let took = back.elapsed();
    let bound = Duration::from_millis(RISE * INTERVAL + SLACK);
    println!("server back after {took:?} (bound {bound:?})");
    assert!(took <= bound, "the server came back only after {took:?}");
}

#[test]
fn health_check_send_expect_marks_a_wrong_answer_down() {
    let good = Backend::line("good", b"+PONG\r\n");
    let bad = Backend::line("bad", b"-ERR wrong\r\n");
    let proxy = start_conf(&tcp_conf(&format!(
        "    balance round_robin;\n    server {} max_fails=0;\n    server {} max_fails=0;\n    health_check interval=200ms timeout=100ms rise=2 fall=2 send=\"PING\\r\\n\" expect=\"+PONG\";",
        good.addr(), bad.addr()
    )));
    let addr = addr_of(&proxy);
    let hello = b"HELLO\n";

    // Poll until a run of connections all go to `good`.
    let begin = Instant::now();
    let mut run = 0;
    while run < 10 {
        assert!(
            begin.elapsed() < Duration::from_secs(10),
            "the server with the wrong answer is still picked after 10 s"
        );
        match fetch_name_with(addr, hello).expect("served").as_str() {
            "good" => run += 1,
            _ => run = 0,
        }
        thread::sleep(PACE);
    }
    println!(
        "wrong answer taken out within {:?}; probes: good {} bad {}",
        begin.elapsed(),
        good.pings(),
        bad.pings()
    );
    let bad_served = bad.served();
    let counts = tally_with(addr, 30, hello);
    assert_eq!(
        counts.get("good").copied(),
        Some(30),
        "all go to the good server: {counts:?}"
    );
    assert_eq!(bad.served(), bad_served, "the bad server got a client");
    assert!(
        good.pings() >= 2,
        "the probe sent `send` to the good server"
    );
    assert!(bad.pings() >= 2);
}

fn tally_with(addr: SocketAddr, n: usize, hello: &[u8]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let name = fetch_name_with(addr, hello).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

#[test]
fn refused_connects_count_towards_max_fails() {
    let refused = refused_tcp();
    let a = Backend::greet("a");
    let proxy = start_conf(&tcp_conf(&format!(
        "    balance round_robin;\n    server {} max_fails=2 fail_timeout=30s;\n    server {} max_fails=2 fail_timeout=30s;",
        refused.addr, a.addr()
    )));
    let addr = addr_of(&proxy);
    let stats = proxy.stats();

    let mut history = Vec::new();
    for i in 0..20 {
        let name = fetch_name(addr).unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(name, "a", "client {i} landed on the retry target");
        history.push(load(&stats.connect_failures));
    }
    println!("connect_failures after each client: {history:?}");
    assert_eq!(
        load(&stats.connect_failures),
        2,
        "two refusals (max_fails=2), then the server is skipped"
    );
    // The failures came first, then nothing for the rest.
    let settled = history.iter().position(|&f| f == 2).expect("two failures");
    assert!(
        settled <= 4,
        "round robin reached the refused server late: {history:?}"
    );
    assert_eq!(
        stats.ended(End::ConnectFailed),
        0,
        "every client was served"
    );
    assert_eq!(a.accepted(), 20);
}

#[test]
fn max_conns_caps_a_server() {
    let capped = Backend::greet_echo("capped");
    let other = Backend::greet_echo("other");
    let proxy = start_conf(&tcp_conf(&format!(
        "    balance round_robin;\n    server {} max_conns=2;\n    server {};",
        capped.addr(),
        other.addr()
    )));
    let addr = addr_of(&proxy);

    let held: Vec<Held> = (0..5)
        .map(|i| hold(addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    let on_capped = held.iter().filter(|h| h.name == "capped").count();
    let on_other = held.iter().filter(|h| h.name == "other").count();
    println!("5 long connections: capped {on_capped}, other {on_other}");
    assert_eq!(on_capped + on_other, 5);
    assert!(
        on_capped <= 2,
        "{on_capped} connections on a server with max_conns=2"
    );
    assert_eq!(
        on_capped, 2,
        "round robin fills the capped server to its cap"
    );
    assert!(capped.max_active() <= 2);
    assert_eq!(capped.active(), 2);
    assert_eq!(other.active(), 3);
    for h in held {
        h.finish().expect("clean finish");
    }
}

#[test]
fn backup_serves_only_when_the_primaries_are_down() {
    let mut primary = Backend::greet("primary");
    let refused = refused_tcp();
    let backup = Backend::greet("backup");
    let proxy = start_conf(&tcp_conf(&format!(
        "    balance round_robin;\n    server {} max_fails=1 fail_timeout=30s;\n    server {} max_fails=1 fail_timeout=30s;\n    server {} backup max_fails=1 fail_timeout=30s;",
        primary.addr(), refused.addr, backup.addr()
    )));
    let addr = addr_of(&proxy);

    // One primary is up: the backup stays idle.
    let counts = tally(addr, 10);
    assert_eq!(
        counts.get("primary").copied(),
        Some(10),
        "a primary is up: {counts:?}"
    );
    assert_eq!(backup.accepted(), 0);

    // All primaries down: the backup takes over.
    primary.kill();
    let counts = tally(addr, 10);
    assert_eq!(
        counts.get("backup").copied(),
        Some(10),
        "no primary is up: {counts:?}"
    );
}

/// Reads until the proxy closes the connection; panics if that takes a second or more.
fn assert_closed_at_once(addr: SocketAddr, which: &str) {
    let begin = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
        Ok(s) => s,
        // Refused with a reset that beat the connect to its end: closed at once.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("{which}: connect: {e}"),
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut buf = [0u8; 64];
    let got = stream.read(&mut buf);
    let took = begin.elapsed();
    match &got {
        Ok(0) => {}
        Err(e) if !is_timeout(e) => {}
        other => panic!("{which}: expected the proxy to close, got {other:?}"),
    }
    assert!(
        took < Duration::from_secs(1),
        "{which}: the client was closed only after {took:?}"
    );
}

#[test]
fn all_servers_down_closes_the_client_at_once() {
    let (r1, r2, r3) = (refused_tcp(), refused_tcp(), refused_tcp());
    let proxy = start_conf(&tcp_conf(&format!(
        "    server {} max_fails=1 fail_timeout=30s;\n    server {} max_fails=1 fail_timeout=30s;\n    server {} backup max_fails=1 fail_timeout=30s;",
        r1.addr, r2.addr, r3.addr
    )));
    let addr = addr_of(&proxy);
    let stats = proxy.stats();

    // The first client tries every server; the second finds them all marked.
    assert_closed_at_once(addr, "first client");
    assert_closed_at_once(addr, "second client");
    assert!(
        wait_until(Duration::from_secs(5), || stats.ended(End::NoServer)
            + stats.ended(End::ConnectFailed)
            == 2),
        "timed out waiting for both clients counted as ended"
    );
    println!(
        "no_server {}, connect_failed {}, connect_failures {}",
        stats.ended(End::NoServer),
        stats.ended(End::ConnectFailed),
        load(&stats.connect_failures)
    );
    assert_eq!(
        load(&stats.connect_failures),
        3,
        "the first client tries both primaries, then the backup"
    );
}

#[test]
fn least_conn_avoids_the_busy_server() {
    let a = Backend::greet_echo("a");
    let b = Backend::greet_echo("b");
    let proxy = start_conf(&tcp_conf(&format!(
        "    balance least_conn;\n    server {};\n    server {};",
        a.addr(),
        b.addr()
    )));
    let addr = addr_of(&proxy);

    // Open connections until two sit on `a` (least_conn alternates, so b gets some too),
    // then finish the ones on `b`, which frees it.
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        if on_a.len() == 2 {
            break;
        }
        let h = hold(addr).expect("connection");
        if h.name == "a" {
            on_a.push(h);
        } else {
            on_b.push(h);
        }
    }
    for h in on_b {
        h.finish().expect("finish");
    }
    assert_eq!(on_a.len(), 2, "could not place two connections on a");
    assert_eq!(a.active(), 2);

    let counts = tally(addr, 6);
    assert_eq!(
        counts.get("b").copied(),
        Some(6),
        "a holds 2 connections, b none: new ones go to b ({counts:?})"
    );
    for h in on_a {
        h.finish().expect("finish");
    }
}

fn assert_sticky(balance: &str) {
    let backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::greet(n)).collect();
    let servers: String = backends
        .iter()
        .map(|b| format!("    server {};\n", b.addr()))
        .collect();
    let proxy = start_conf(&tcp_conf(&format!("    balance {balance};\n{servers}")));
    let counts = tally(addr_of(&proxy), 30);
    assert_eq!(
        counts.len(),
        1,
        "{balance}: one client address, one server ({counts:?})"
    );
}

#[test]
fn ip_hash_keeps_a_client_on_one_server() {
    assert_sticky("ip_hash");
}

#[test]
fn hash_keeps_a_client_on_one_server() {
    assert_sticky("hash");
}

#[test]
fn command_line_balance_least_conn() {
    let a = Backend::greet_echo("a");
    let b = Backend::greet_echo("b");
    let (ua, ub) = (a.addr().to_string(), b.addr().to_string());
    let (_sluice, addr) = SluiceChild::start_listening(Transport::Tcp, |listen| {
        ["-L", listen, "-U", &ua, "-U", &ub, "-b", "least_conn"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    });
    // One long connection on one server; round robin would still send every other new
    // connection there, least_conn sends none.
    let busy = hold(addr).expect("first connection");
    for i in 0..6 {
        let name = fetch_name(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_ne!(
            name, busy.name,
            "connection {i} went to the busy server: -b least_conn not applied"
        );
    }
    busy.finish().expect("finish");
}

/// Issue 17, item 5: in a group of 300 servers where only the last one is alive, every client
/// reaches it with enough tries, whatever the method: a retry never skips an untried server.
#[test]
fn every_server_of_a_large_group_can_be_tried() {
    const SERVERS: usize = 300;
    const CLIENTS: usize = 20;
    let dead: Vec<RefusedTcp> = (0..SERVERS - 1).map(|_| refused_tcp()).collect();
    let live = Backend::greet("live");
    let mut lines: String = dead
        .iter()
        .map(|d| format!("    server {} max_fails=0;\n", d.addr))
        .collect();
    lines.push_str(&format!("    server {} max_fails=0;\n", live.addr()));
    for (name, _) in sluice::config::Balance::ALL {
        let conf = format!(
            "access_log off;\nupstream u {{\n    balance {name};\n{lines}}}\nlisten 127.0.0.1:0 {{\n    proxy u;\n    next_upstream_tries {SERVERS};\n}}\n"
        );
        let proxy = start_conf(&conf);
        let addr = addr_of(&proxy);
        let reached = (0..CLIENTS)
            .filter(|_| fetch_name(addr).is_ok_and(|n| n == "live"))
            .count();
        assert_eq!(
            reached, CLIENTS,
            "{name}: clients that reached the live server"
        );
    }
}
