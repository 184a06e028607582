//! Stopping gracefully (issue 10, "Drain"): on SIGTERM the listening sockets close at once,
//! open connections finish until `shutdown_timeout`, the rest are closed with `end=shutdown`,
//! and the exit status is 0; a second SIGTERM exits at once. The `sluice` binary on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// `sluice -c` on a free port in front of `server`, with `shutdown_timeout` set; up and
/// listening when it returns.
fn sluice_with(server: SocketAddr, shutdown_timeout: &str) -> (SluiceChild, SocketAddr, TempFile) {
    let port = free_port(Transport::Tcp);
    let conf = TempFile::new(
        "drain",
        &format!(
            "shutdown_timeout {shutdown_timeout};\nlisten 127.0.0.1:{port} {{\n  proxy {server};\n}}\n"
        ),
    );
    let mut child = SluiceChild::spawn(sluice_command(&["-c", conf.path_str()]));
    assert!(
        wait_listening(&mut child, port),
        "stderr:\n{}",
        child.stderr()
    );
    (child, SocketAddr::from(([127, 0, 0, 1], port)), conf)
}

#[test]
fn a_transfer_under_way_finishes_intact_and_the_port_is_free_at_once() {
    const LEN: u64 = 24 * 1024 * 1024;
    let server = Backend::stream(LEN, 77);
    let (mut sluice, addr, _conf) = sluice_with(server.addr(), "10s");
    let mut c = connect(addr);
    let mut verifier = Verifier::new(77);
    let mut buf = vec![0u8; 64 * 1024];
    let n = c.read(&mut buf).expect("the transfer starts");
    verifier.check(&buf[..n]).expect("first bytes");
    sluice.signal("TERM");
    assert!(
        sluice
            .wait_for_stderr_line(EVENTUALLY, |l| l.contains("draining 1 connections"))
            .is_some(),
        "no drain line; stderr:\n{}",
        sluice.stderr()
    );
    // The listening socket is closed: a new instance could bind the port now.
    let rebound = TcpListener::bind(addr);
    assert!(rebound.is_ok(), "the port is still held: {rebound:?}");
    drop(rebound);
    // Reading at about 8 MB/s keeps the transfer going for ~3 s after the signal (pacing).
    let started = Instant::now();
    loop {
        let n = c.read(&mut buf).expect("the transfer goes on");
        if n == 0 {
            break;
        }
        verifier
            .check(&buf[..n])
            .unwrap_or_else(|at| panic!("byte {at} differs"));
        if verifier.pos % (512 * 1024) < n as u64 {
            std::thread::sleep(Duration::from_millis(60));
        }
    }
    assert_eq!(verifier.pos, LEN, "every byte arrives");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the transfer was not under way"
    );
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let status = sluice.wait_exit(EVENTUALLY);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "stderr:\n{}",
        sluice.stderr()
    );
    assert!(
        sluice.stderr().contains("stopped"),
        "stderr:\n{}",
        sluice.stderr()
    );
}

/// A sluice whose one pair stays open: a client that sent a little to a server that never
/// answers nor closes.
fn held_pair(shutdown_timeout: &str) -> (SluiceChild, TcpStream, Backend, TempFile) {
    let server = Backend::sink();
    let (sluice, addr, conf) = sluice_with(server.addr(), shutdown_timeout);
    let mut c = connect(addr);
    c.write_all(b"held open").expect("write");
    assert_eq!(server.next_event(EVENTUALLY), Some(Event::Data));
    (sluice, c, server, conf)
}

#[test]
fn a_pair_that_never_ends_is_closed_at_shutdown_timeout() {
    let (mut sluice, mut c, _server, _conf) = held_pair("1s");
    let me = c.local_addr().expect("address");
    let signalled = Instant::now();
    sluice.signal("TERM");
    assert_eq!(
        how_it_ends(&mut c),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "closed {took:?} after SIGTERM with shutdown_timeout 1s"
    );
    let status = sluice.wait_exit(EVENTUALLY);
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    let line = sluice
        .stderr()
        .lines()
        .find(|l| l.contains(&format!("client={me} ")))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(line.contains("end=shutdown"), "access log: {line:?}");
}

#[test]
fn a_second_sigterm_exits_at_once() {
    let (mut sluice, mut c, _server, _conf) = held_pair("60s");
    sluice.signal("TERM");
    assert!(sluice
        .wait_for_stderr_line(EVENTUALLY, |l| l
            .contains("draining 1 connections (up to 60s)"))
        .is_some());
    assert!(
        sluice.exited().is_none(),
        "the drain waits for the open pair"
    );
    let again = Instant::now();
    sluice.signal("TERM");
    let status = sluice.wait_exit(EVENTUALLY);
    assert!(
        again.elapsed() < Duration::from_secs(5),
        "took {:?}",
        again.elapsed()
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "stderr:\n{}",
        sluice.stderr()
    );
    assert_eq!(
        how_it_ends(&mut c),
        Err(std::io::ErrorKind::ConnectionReset)
    );
}
