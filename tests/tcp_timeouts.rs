//! Activity timeouts of a TCP pair: `idle_timeout` closes a silent pair and spares a busy one;
//! `half_close_timeout` closes a pair whose other side never finishes.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use sluice::runtime::End;

#[test]
fn silent_pair_is_closed_after_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(500);
    let echo = Backend::echo();
    let mut config = forward(&[echo.addr()]);
    config.listeners[0].idle_timeout = IDLE;
    config.listeners[0].half_close_timeout = IDLE;
    let proxy = start(config);
    let mut c = connect(proxy.local_addr(0).expect("listener"));

    round_trip(&mut c, b"one exchange, then silence").expect("echo");
    let took = closed_within(&mut c, EVENTUALLY).expect("the silent pair is closed");
    // The proxy's clock started when it forwarded the echo, a moment before the client's.
    assert!(
        took >= IDLE - Duration::from_millis(100),
        "closed after {:?}, before the {:?} idle timeout",
        took,
        IDLE
    );
    assert!(
        took < Duration::from_secs(3),
        "closed only after {:?} with a {:?} idle timeout",
        took,
        IDLE
    );
    let stats = proxy.stats();
    assert!(
        wait_until(EVENTUALLY, || stats.ended(End::IdleTimeout) == 1),
        "the end is counted as idle_timeout"
    );
    assert_eq!(stats.connections_active.load(Ordering::Relaxed), 0);
}

#[test]
fn pair_with_traffic_every_100ms_outlives_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(500);
    let echo = Backend::echo();
    let mut config = forward(&[echo.addr()]);
    config.listeners[0].idle_timeout = IDLE;
    config.listeners[0].half_close_timeout = IDLE;
    let proxy = start(config);
    let mut c = connect(proxy.local_addr(0).expect("listener"));

    let started = Instant::now();
    let mut i = 0u32;
    // Bounded by count and time: 3 s of traffic, at most 60 exchanges.
    while started.elapsed() < Duration::from_secs(3) && i < 60 {
        round_trip(&mut c, &i.to_le_bytes()).unwrap_or_else(|e| {
            panic!("exchange {} after {:?} failed: {}", i, started.elapsed(), e)
        });
        i += 1;
        // Pacing, not synchronisation: the traffic pattern under test.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(i >= 20, "only {} exchanges in 3 s", i);
    round_trip(&mut c, b"still open").expect("the busy pair is still open after 3 s");
    let stats = proxy.stats();
    assert_eq!(stats.ended(End::IdleTimeout), 0);
    assert_eq!(stats.connections_active.load(Ordering::Relaxed), 1);
}

#[test]
fn half_closed_pair_is_closed_after_half_close_timeout() {
    const HALF_CLOSE: Duration = Duration::from_millis(300);
    let server = Backend::sink();
    let mut config = forward(&[server.addr()]);
    config.listeners[0].idle_timeout = Duration::from_secs(60);
    config.listeners[0].half_close_timeout = HALF_CLOSE;
    let proxy = start(config);
    let mut c = connect(proxy.local_addr(0).expect("listener"));

    c.write_all(b"a request the server never answers")
        .expect("send");
    assert_eq!(server.next_event(EVENTUALLY), Some(Event::Data));
    c.shutdown(Shutdown::Write).expect("half-close");
    let shut_at = Instant::now();

    // The FIN reached the server, which neither answers nor closes.
    match server.next_event(EVENTUALLY) {
        Some(Event::Ended { reset: false, .. }) => {}
        other => panic!("the server did not see the client's EOF: {:?}", other),
    }
    assert!(
        closed_within(&mut c, Duration::from_secs(5)).is_some(),
        "the half-closed pair stays open"
    );
    let took = shut_at.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "closed {:?} after the client's shutdown, before the {:?} half-close timeout",
        took,
        HALF_CLOSE
    );
    assert!(
        took < Duration::from_secs(2),
        "closed only {:?} after the client's shutdown with a {:?} half-close timeout",
        took,
        HALF_CLOSE
    );
    assert_all_pairs_freed(&proxy, "the pair is freed");
    assert_eq!(
        proxy.stats().ended(End::HalfCloseTimeout),
        1,
        "ends as half_close_timeout (DESIGN §6)"
    );
    assert_eq!(proxy.stats().ended(End::IdleTimeout), 0);
}

#[test]
fn busy_polling_worker_forwards_and_still_fires_timers() {
    const IDLE: Duration = Duration::from_millis(300);
    let echo = Backend::echo();
    let mut config = forward(&[echo.addr()]);
    // The longest window: the worker polls without sleeping for 10 ms after every event, and
    // must still leave that loop for a due timer and for the next event.
    config.busy_poll = Duration::from_millis(10);
    config.listeners[0].idle_timeout = IDLE;
    config.listeners[0].half_close_timeout = IDLE;
    let proxy = start(config);
    let mut c = connect(proxy.local_addr(0).expect("listener"));

    for i in 0..50u32 {
        let message = format!("exchange {i} while the worker spins");
        round_trip(&mut c, message.as_bytes()).expect("echo through a busy-polling worker");
    }
    let stats = proxy.stats();
    // Each echo comes back within microseconds of the request, well inside the window.
    assert!(
        stats.busy_poll_hits.load(Ordering::Relaxed) > 0,
        "no event was caught while busy polling"
    );
    let took = closed_within(&mut c, EVENTUALLY).expect("the silent pair is closed");
    assert!(
        took >= IDLE - Duration::from_millis(100) && took < Duration::from_secs(3),
        "closed after {took:?} with a {IDLE:?} idle timeout"
    );
    assert!(
        wait_until(EVENTUALLY, || stats.ended(End::IdleTimeout) == 1),
        "the end is counted as idle_timeout"
    );
}

#[test]
fn worker_without_busy_poll_sleeps_between_events() {
    let echo = Backend::echo();
    let proxy = start(forward(&[echo.addr()]));
    let mut c = connect(proxy.local_addr(0).expect("listener"));
    for i in 0..50u32 {
        round_trip(&mut c, &i.to_le_bytes()).expect("echo");
    }
    assert_eq!(proxy.stats().busy_poll_hits.load(Ordering::Relaxed), 0);
}

/// Issue 17, item 9: `next_upstream_timeout` bounds the connect in flight too. Two hung
/// servers, `connect_timeout 1s`, `next_upstream_timeout 1200ms`: the client is closed at about
/// 1.2 s, not when the second connect times out at 2 s.
#[test]
fn next_upstream_timeout_cuts_the_connect_in_flight() {
    let (a, b) = (HangListener::new(), HangListener::new());
    let mut config = forward(&[a.addr(), b.addr()]);
    config.listeners[0].connect_timeout = Duration::from_secs(1);
    config.listeners[0].next_upstream_timeout = Some(Duration::from_millis(1200));
    let proxy = start(config);
    let started = Instant::now();
    let mut c = connect(proxy.local_addr(0).expect("listener"));
    let closed = closed_within(&mut c, EVENTUALLY).expect("the client is closed");
    let elapsed = started.elapsed().max(closed);
    assert!(
        elapsed >= Duration::from_millis(1100) && elapsed < Duration::from_millis(1800),
        "closed after {elapsed:?}, expected about 1.2 s"
    );
    assert_eq!(proxy.stats().ended(sluice::runtime::End::ConnectFailed), 1);
}

/// `ss -tno` lines of this host's TCP connections, or None without `ss` (iproute2).
fn ss_lines() -> Option<Vec<String>> {
    let out = std::process::Command::new("ss")
        .args(["-tno"])
        .output()
        .ok()?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn so_keepalive_is_set_on_both_sockets_of_a_pair() {
    if ss_lines().is_none() {
        eprintln!("skipped: ss (iproute2) not found");
        return;
    }
    let backend = Backend::greet_echo("k");
    let proxy = start_conf(&format!(
        "listen 127.0.0.1:0 {{ proxy {}; so_keepalive 1:1:3; }}",
        backend.addr()
    ));
    let listen = proxy.local_addr(0).expect("addr");
    let held = hold(listen).expect("a pair");
    // The accepted socket's local address is the listener's; the server socket's peer is the
    // backend. Each must carry a keepalive timer of at most the 1 s idle time.
    // The timer counts down from the 1 s idle time (the system's default would be 2 hours).
    let keepalive = |line: &String| {
        line.split("timer:(keepalive,")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .is_some_and(|left| left.ends_with("ms") || left == "1sec")
    };
    let found = wait_until(EVENTUALLY, || {
        let lines = ss_lines().unwrap_or_default();
        let client_side = lines
            .iter()
            .any(|l| l.contains(&format!(" {listen} ")) && keepalive(l));
        let server_side = lines.iter().any(|l| {
            l.split_whitespace().nth(4) == Some(&backend.addr().to_string()) && keepalive(l)
        });
        client_side && server_side
    });
    assert!(
        found,
        "no keepalive timers:\n{}",
        ss_lines().unwrap_or_default().join("\n")
    );
    held.finish().expect("finish");
}
