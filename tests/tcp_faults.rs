//! Faults around a TCP pair: resets from either side, refused and hanging connects, and no
//! server left to try.

mod common;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use sluice::runtime::End;

/// The acceptance bound for a reset to reach the other side.
const RESET_BOUND: Duration = Duration::from_secs(1);

#[test]
fn server_reset_mid_stream_closes_the_client_within_1s() {
    const LEN: u64 = 256 * 1024;
    let server = Backend::reset_mid_stream(LEN, 21);
    let proxy = start(forward(&[server.addr()]));
    let mut c = connect(proxy.local_addr(0).expect("listener"));

    let got = read_exactly(&mut c, LEN as usize).expect("the stream before the reset");
    assert!(
        got == payload(21, LEN as usize),
        "the bytes before the reset are intact"
    );
    // Tell the server to reset now, and time how long the client takes to notice.
    c.write_all(b"g").expect("send go");
    let took =
        closed_within(&mut c, EVENTUALLY).expect("the client is closed after the server's reset");
    assert!(
        took < RESET_BOUND,
        "the client noticed the server's reset after {:?}",
        took
    );
    assert_all_pairs_freed(&proxy, "the pair is freed");
}

#[test]
fn client_reset_closes_the_server_within_1s() {
    let server = Backend::sink();
    let proxy = start(forward(&[server.addr()]));
    let mut c = connect(proxy.local_addr(0).expect("listener"));

    c.write_all(b"some request bytes").expect("send");
    assert_eq!(
        server.next_event(EVENTUALLY),
        Some(Event::Data),
        "the server gets the client's bytes"
    );
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    let reset_at = Instant::now();
    drop(c);

    match server.next_event(EVENTUALLY) {
        Some(Event::Ended { at, received, .. }) => {
            assert_eq!(received, 18);
            let took = at.duration_since(reset_at);
            assert!(
                took < RESET_BOUND,
                "the server's socket closed {:?} after the client's reset",
                took
            );
        }
        other => panic!(
            "the server's socket did not close after the client's reset: {:?}",
            other
        ),
    }
    assert_all_pairs_freed(&proxy, "the pair is freed");
}

#[test]
fn refused_first_server_falls_through_to_the_next() {
    let refused = refused_addr();
    let b = Backend::name("server-b");
    let proxy = start(forward(&[refused, b.addr()]));
    let addr = proxy.local_addr(0).expect("listener");

    // Every client lands on B, whichever server the balancer offers first.
    for i in 0..4 {
        let mut c = connect(addr);
        let name =
            read_exactly(&mut c, 8).unwrap_or_else(|e| panic!("client {} got no server: {}", i, e));
        assert_eq!(
            name, b"server-b",
            "client {} is served by the second server",
            i
        );
    }
    let stats = proxy.stats();
    assert!(
        stats.connect_failures.load(Ordering::Relaxed) >= 1,
        "the refused connect is counted"
    );
    assert_eq!(stats.ended(End::ConnectFailed), 0);
    assert_eq!(stats.ended(End::NoServer), 0);
    assert_eq!(b.accepted(), 4);
}

#[test]
fn all_servers_refusing_closes_the_client_at_once() {
    let proxy = start(forward(&[refused_addr(), refused_addr()]));
    let mut c = connect(proxy.local_addr(0).expect("listener"));
    let took = closed_within(&mut c, EVENTUALLY).expect("the client is closed");
    assert!(
        took < Duration::from_secs(1),
        "the client was closed only after {:?}",
        took
    );
    let stats = proxy.stats();
    assert!(
        wait_until(EVENTUALLY, || stats.ended(End::ConnectFailed)
            + stats.ended(End::NoServer)
            == 1),
        "the pair ends as connect_failed or no_server (connect_failed {}, no_server {})",
        stats.ended(End::ConnectFailed),
        stats.ended(End::NoServer)
    );
    assert_eq!(stats.connections_active.load(Ordering::Relaxed), 0);
}

#[test]
fn hanging_connect_times_out_to_the_next_server() {
    const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
    let hang = HangListener::new();
    let b = Backend::name("server-b");
    let mut config = forward(&[hang.addr(), b.addr()]);
    config.listeners[0].connect_timeout = CONNECT_TIMEOUT;
    let proxy = start(config);
    let addr = proxy.local_addr(0).expect("listener");

    // Two clients: whichever server the balancer offers first, at least one client meets the
    // hanging server first and must be moved to the second one by the connect timeout.
    let mut slow = 0;
    for i in 0..2 {
        let started = Instant::now();
        let mut c = connect(addr);
        let name = read_exactly(&mut c, 8)
            .unwrap_or_else(|e| panic!("client {}: the second server never answered: {}", i, e));
        let took = started.elapsed();
        assert_eq!(name, b"server-b");
        assert!(
            took < Duration::from_secs(3),
            "client {} served only after {:?} with a {:?} connect timeout",
            i,
            took,
            CONNECT_TIMEOUT
        );
        if took >= CONNECT_TIMEOUT - Duration::from_millis(50) {
            slow += 1;
        }
    }
    assert!(
        slow >= 1,
        "no client waited for the hanging connect to time out"
    );
    assert_eq!(
        proxy.stats().connect_failures.load(Ordering::Relaxed),
        slow,
        "each timed-out connect counts as a failure"
    );
    assert_eq!(b.accepted(), 2);
}
