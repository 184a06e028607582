//! Several workers (issue 10, "Workers"): each binds its own listeners with SO_REUSEPORT and
//! the kernel spreads clients between them; `max_connections` holds for the whole process; a
//! UDP client's datagrams stay with one worker, so in one session. Real sockets on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

fn tcp_conf(workers: usize, main: &str, server: SocketAddr) -> String {
    format!(
        "workers {workers};\naccess_log off;\n{main}\nlisten 127.0.0.1:0 {{\n  proxy {server};\n}}\n"
    )
}

#[test]
fn both_workers_serve_clients() {
    const CLIENTS: usize = 400;
    let echo = Backend::echo();
    let proxy = start_conf(&tcp_conf(2, "", echo.addr()));
    let addr = proxy.local_addr(0).expect("listener");
    for k in 0..CLIENTS {
        let mut c = connect(addr);
        round_trip(&mut c, format!("client {k}").as_bytes()).expect("echo through the proxy");
        c.shutdown(Shutdown::Write).expect("shutdown");
        assert!(closed_within(&mut c, EVENTUALLY).is_some());
    }
    let stats = proxy.stats();
    let per_worker: Vec<u64> = stats
        .workers()
        .iter()
        .map(|w| w.connections_total.load(Ordering::Relaxed))
        .collect();
    assert_eq!(per_worker.len(), 2);
    assert_eq!(
        per_worker.iter().sum::<u64>(),
        CLIENTS as u64,
        "{per_worker:?}"
    );
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "one worker served every client: {per_worker:?}"
    );
    assert_all_pairs_freed(&proxy, "every pair ends");
}

#[test]
fn max_connections_holds_for_the_whole_process() {
    const LIMIT: usize = 10;
    // An echo ends a connection when its client does, so the pairs of dropped clients end.
    let sink = Backend::echo();
    let proxy = start_conf(&tcp_conf(
        2,
        &format!("max_connections {LIMIT};"),
        sink.addr(),
    ));
    let addr = proxy.local_addr(0).expect("listener");
    let stats = proxy.stats_handle();
    let mut clients: Vec<TcpStream> = (0..3 * LIMIT).map(|_| connect(addr)).collect();
    for c in &mut clients {
        c.write_all(b"x").expect("write");
        c.set_nonblocking(true).expect("nonblocking");
    }
    // The admitted clients get their byte back; the others wait in a worker's backlog.
    let mut answered = vec![false; clients.len()];
    wait_until(EVENTUALLY, || {
        for (c, done) in clients.iter_mut().zip(answered.iter_mut()) {
            let mut byte = [0u8; 1];
            if !*done && matches!(c.read(&mut byte), Ok(1)) {
                *done = true;
            }
        }
        answered.iter().filter(|&&a| a).count() >= LIMIT
    });
    // Both workers had clients waiting; neither may take one past the process's cap. A window
    // to see a violation, not a synchronisation.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sink.accepted(),
        LIMIT,
        "the cap of the whole process was passed"
    );
    assert_eq!(
        stats.connections_active.load(Ordering::Relaxed),
        LIMIT as u64
    );
    // Room made anywhere lets waiting clients in, whichever worker holds them.
    let mut k = 0;
    clients.retain(|_| {
        k += 1;
        !answered[k - 1]
    });
    assert!(
        wait_until(EVENTUALLY, || sink.accepted() >= 2 * LIMIT),
        "the waiting clients did not get in: {}",
        sink.accepted()
    );
    assert!(stats.connections_active.load(Ordering::Relaxed) <= LIMIT as u64);
}

#[test]
fn a_udp_client_stays_in_one_session() {
    let backend = UdpBackend::echo("a");
    let conf = format!(
        "workers 2;\naccess_log off;\nlisten udp 127.0.0.1:0 {{\n  proxy {};\n}}\n",
        backend.addr
    );
    let proxy = start_conf(&conf);
    let addr = proxy.local_addr(0).expect("listener");
    let clients: Vec<_> = (0..8).map(|_| udp_client(IO_TIMEOUT)).collect();
    for round in 0..20 {
        for (k, c) in clients.iter().enumerate() {
            let msg = format!("client {k} round {round}");
            assert_eq!(exchange(c, addr, msg.as_bytes()), msg.as_bytes());
        }
    }
    let stats = proxy.stats();
    assert_eq!(
        stats.udp_sessions_total.load(Ordering::Relaxed),
        8,
        "a client's datagrams were split between sessions"
    );
    assert_eq!(backend.peers().len(), 8);
}

#[test]
fn a_port_held_by_another_process_fails_the_start_with_workers() {
    // The holder shares its port (SO_REUSEPORT), as another sluice with workers does: without
    // the check that binds once alone first, the workers would bind beside it and share its
    // datagrams.
    let taken =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    taken.set_reuse_port(true).expect("SO_REUSEPORT");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    taken.bind(&any.into()).expect("bind");
    let addr = taken
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("address");
    let conf = format!("workers 2;\nlisten udp {addr} {{\n  proxy 127.0.0.1:9;\n}}\n");
    let config = sluice::config::Config::parse(&conf, "test.conf").expect("config");
    let err = sluice::runtime::Proxy::start(config)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(
        err,
        format!("cannot listen on udp {addr}: address already in use")
    );
}
