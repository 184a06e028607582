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
    let refused = refused_tcp();
    let b = Backend::name("server-b");
    let proxy = start(forward(&[refused.addr, b.addr()]));
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
    let (r1, r2) = (refused_tcp(), refused_tcp());
    let proxy = start(forward(&[r1.addr, r2.addr]));
    let listener = proxy.local_addr(0).expect("listener");
    let took = refused_within(listener, EVENTUALLY).expect("the client is closed");
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

/// Issue 17, item 2: a pair that sluice ends while bytes still flow (here: the proxy stops in
/// the middle of a download and of an upload) resets both peers, so neither side takes the cut
/// stream for a complete one.
#[test]
fn stopping_mid_stream_resets_both_peers() {
    const LEN: u64 = 256 * 1024 * 1024;
    let source = Backend::stream(LEN, 41);
    let sink = Backend::sink();
    let mut config = forward(&[source.addr()]);
    config.upstreams.push(sluice::config::Upstream {
        name: "sink".into(),
        balance: sluice::config::Balance::RoundRobin,
        servers: vec![sluice::config::Server::new(sink.addr())],
        health_check: None,
        pool: None,
    });
    let mut upload = config.listeners[0].clone();
    upload.upstream = sluice::config::UpstreamId(1);
    config.listeners.push(upload);
    let proxy = start(config);
    let stats = proxy.stats_handle();

    let mut down = connect(proxy.local_addr(0).expect("download listener"));
    let mut first = [0u8; 64 * 1024];
    std::io::Read::read_exact(&mut down, &mut first).expect("the download starts");
    let mut up = connect(proxy.local_addr(1).expect("upload listener"));
    up.write_all(&[7u8; 64 * 1024]).expect("the upload starts");
    assert_eq!(sink.next_event(EVENTUALLY), Some(Event::Data));
    assert!(wait_until(EVENTUALLY, || stats
        .connections_active
        .load(Ordering::Relaxed)
        == 2));

    proxy.stop().expect("the proxy stops");

    let download_end = how_it_ends(&mut down);
    assert_eq!(
        download_end,
        Err(std::io::ErrorKind::ConnectionReset),
        "the client of the cut download must see a reset, not an EOF"
    );
    match sink.next_event(EVENTUALLY) {
        Some(Event::Ended { reset, .. }) => {
            assert!(
                reset,
                "the server of the cut upload must see a reset, not an EOF"
            )
        }
        other => panic!("the sink saw no end of the upload: {other:?}"),
    }
    assert_eq!(stats.ended(End::Shutdown), 2);
}

/// Issue 17, item 2: `idle_timeout` on a pair that still holds bytes for a reader that stopped
/// reading resets the reader instead of closing with a FIN after a cut stream.
#[test]
fn idle_timeout_with_bytes_pending_resets_the_reader() {
    const LEN: u64 = 64 * 1024 * 1024;
    let source = Backend::stream(LEN, 43);
    let mut config = forward(&[source.addr()]);
    config.listeners[0].idle_timeout = Duration::from_millis(500);
    config.listeners[0].half_close_timeout = Duration::from_millis(500);
    let proxy = start(config);
    let stats = proxy.stats_handle();
    let mut c = connect(proxy.local_addr(0).expect("listener"));
    let mut first = [0u8; 1024];
    std::io::Read::read_exact(&mut c, &mut first).expect("the download starts");
    // The reader stalls: every buffer on the way fills and nothing moves until the timeout.
    assert!(wait_until(EVENTUALLY, || stats.ended(End::IdleTimeout) == 1));
    let end = how_it_ends(&mut c);
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "a download cut by idle_timeout must end in a reset"
    );
}

/// Issue 17, item 8: a client that resets while its server connect is still pending ends the
/// pair at once as `client_closed`, and the server is not blamed for it.
#[test]
fn client_reset_during_a_pending_connect_ends_the_pair_at_once() {
    let hang = HangListener::new();
    let mut config = forward(&[hang.addr()]);
    config.listeners[0].connect_timeout = Duration::from_secs(30);
    let proxy = start(config);
    let stats = proxy.stats_handle();
    let c = connect(proxy.local_addr(0).expect("listener"));
    assert!(wait_until(EVENTUALLY, || stats
        .connections_active
        .load(Ordering::Relaxed)
        == 1));
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    let reset_at = Instant::now();
    drop(c);
    assert!(
        wait_until(EVENTUALLY, || stats.ended(End::ClientClosed) == 1),
        "the pair did not end on the client's reset"
    );
    assert!(reset_at.elapsed() < Duration::from_secs(5));
    assert_eq!(stats.connections_active.load(Ordering::Relaxed), 0);
    assert_eq!(stats.ended(End::ConnectFailed), 0);
    assert_eq!(
        stats.connect_failures.load(Ordering::Relaxed),
        0,
        "the server was blamed for the client's reset"
    );
}
