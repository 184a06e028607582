//! Data integrity through a TCP pair: every byte that goes in comes out, in order, both ways,
//! for sizes from 0 B to 64 MiB, many connections at once, and with half-close both ways.

mod common;

use std::io::Read;
use std::net::Shutdown;
use std::sync::atomic::Ordering;

use common::*;
use sluice::runtime::End;

#[test]
fn echo_round_trip() {
    let echo = Backend::echo();
    let proxy = start(forward(&[echo.addr()]));
    let mut c = connect(proxy.local_addr(0).expect("listener"));
    round_trip(&mut c, b"hello, sluice").expect("echo through the proxy");
    round_trip(&mut c, b"and again").expect("second echo on the same pair");
    c.shutdown(Shutdown::Write).expect("shutdown");
    assert!(
        closed_within(&mut c, EVENTUALLY).is_some(),
        "the pair closes after both EOFs"
    );

    let stats = proxy.stats();
    assert!(
        wait_until(EVENTUALLY, || stats.ended(End::ClientClosed) == 1),
        "the pair ends as client_closed"
    );
    assert_eq!(stats.connections_total.load(Ordering::Relaxed), 1);
    assert_eq!(stats.connections_active.load(Ordering::Relaxed), 0);
    assert_eq!(stats.bytes_up.load(Ordering::Relaxed), 22);
    assert_eq!(stats.bytes_down.load(Ordering::Relaxed), 22);
    assert_eq!(echo.accepted(), 1);
}

/// Streams `len` bytes of the stream for `seed` through an echo pair and checks every byte of
/// the echo, writing and reading at once.
fn echo_verified(addr: std::net::SocketAddr, len: u64, seed: u64) -> Result<(), String> {
    let mut reader = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {}", e))?;
    reader
        .set_read_timeout(Some(EVENTUALLY))
        .map_err(|e| e.to_string())?;
    let mut writer = reader.try_clone().map_err(|e| e.to_string())?;
    writer
        .set_write_timeout(Some(EVENTUALLY))
        .map_err(|e| e.to_string())?;
    std::thread::scope(|scope| {
        let w = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn_scoped(scope, move || -> Result<(), String> {
                write_payload(&mut writer, seed, len).map_err(|e| format!("write: {}", e))?;
                writer
                    .shutdown(Shutdown::Write)
                    .map_err(|e| format!("shutdown: {}", e))
            })
            .map_err(|e| e.to_string())?;
        let read = read_and_verify(&mut reader, seed, len);
        let wrote = w.join().unwrap_or_else(|_| Err("writer panicked".into()));
        wrote.and(read)
    })
}

#[test]
fn sixty_four_mib_each_way_every_byte_verified() {
    const LEN: u64 = 64 * 1024 * 1024;
    let echo = Backend::echo();
    let proxy = start(forward(&[echo.addr()]));
    echo_verified(proxy.local_addr(0).expect("listener"), LEN, 64).expect("64 MiB echo intact");

    assert_all_pairs_freed(&proxy, "the pair closes");
    let stats = proxy.stats();
    assert_eq!(stats.bytes_up.load(Ordering::Relaxed), LEN);
    assert_eq!(stats.bytes_down.load(Ordering::Relaxed), LEN);
}

#[test]
fn two_hundred_concurrent_connections_of_random_sizes() {
    const CONNECTIONS: usize = 200;
    const MAX: u64 = 4 * 1024 * 1024;
    let echo = Backend::echo();
    let proxy = start(forward(&[echo.addr()]));
    let addr = proxy.local_addr(0).expect("listener");

    // Log-uniform sizes keep the total moderate while covering 0 B .. 4 MiB; both ends are
    // always in the set.
    let mut rng = Xorshift::new(200);
    let sizes: Vec<u64> = (0..CONNECTIONS)
        .map(|i| match i {
            0 => 0,
            1 => MAX,
            2 => 1,
            _ => {
                let bits = rng.below(23);
                rng.below((1u64 << bits) + 1)
            }
        })
        .collect();

    // All 200 are open at once before any byte moves.
    let streams: Vec<std::net::TcpStream> = (0..CONNECTIONS).map(|_| connect(addr)).collect();
    let stats = proxy.stats();
    assert!(
        wait_until(EVENTUALLY, || stats
            .connections_active
            .load(Ordering::Relaxed)
            == CONNECTIONS as u64),
        "all {} pairs are open at once (active: {})",
        CONNECTIONS,
        stats.connections_active.load(Ordering::Relaxed)
    );

    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .into_iter()
            .zip(&sizes)
            .enumerate()
            .map(|(i, (mut reader, &len))| {
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || -> Result<(), String> {
                        let seed = 1000 + i as u64;
                        let mut writer = reader.try_clone().map_err(|e| e.to_string())?;
                        let w = std::thread::Builder::new()
                            .stack_size(256 * 1024)
                            .spawn(move || -> Result<(), String> {
                                write_payload(&mut writer, seed, len)
                                    .map_err(|e| format!("write: {}", e))?;
                                writer
                                    .shutdown(Shutdown::Write)
                                    .map_err(|e| format!("shutdown: {}", e))
                            })
                            .map_err(|e| e.to_string())?;
                        let read = read_and_verify(&mut reader, seed, len);
                        let wrote = w.join().unwrap_or_else(|_| Err("writer panicked".into()));
                        wrote
                            .and(read)
                            .map_err(|e| format!("connection {} ({} bytes): {}", i, len, e))
                    })
                    .expect("client thread")
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("client panicked".into()))
                    .err()
            })
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        failures
    );

    let total: u64 = sizes.iter().sum();
    assert!(
        wait_until(EVENTUALLY, || stats
            .connections_active
            .load(Ordering::Relaxed)
            == 0),
        "every pair closes"
    );
    assert_eq!(
        stats.connections_total.load(Ordering::Relaxed),
        CONNECTIONS as u64
    );
    assert_eq!(stats.bytes_up.load(Ordering::Relaxed), total);
    assert_eq!(stats.bytes_down.load(Ordering::Relaxed), total);
}

#[test]
fn client_half_close_still_gets_the_whole_answer() {
    const REQUEST: u64 = 256 * 1024;
    const ANSWER: usize = 2 * 1024 * 1024;
    let answer = payload(7, ANSWER);
    let server = Backend::answer_after_eof(answer.clone());
    let proxy = start(forward(&[server.addr()]));
    let mut c = connect(proxy.local_addr(0).expect("listener"));

    write_payload(&mut c, 6, REQUEST).expect("send the request");
    c.shutdown(Shutdown::Write).expect("half-close");

    // The server saw the whole request and then EOF: the FIN went through.
    let mut ended = None;
    while let Some(e) = server.next_event(EVENTUALLY) {
        if let Event::Ended { .. } = e {
            ended = Some(e);
            break;
        }
    }
    let Some(Event::Ended {
        received,
        checksum,
        reset,
        ..
    }) = ended
    else {
        panic!("the server never saw EOF after the client's shutdown");
    };
    assert!(!reset, "the server saw a reset, not EOF");
    assert_eq!(received, REQUEST);
    assert_eq!(checksum, Checksum::of(&payload(6, REQUEST as usize)));

    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("read the answer to EOF");
    assert_eq!(got.len(), ANSWER, "the whole answer arrives");
    assert!(got == answer, "the answer is intact");

    let stats = proxy.stats();
    assert!(
        wait_until(EVENTUALLY, || stats.ended(End::ClientClosed) == 1),
        "the pair ends as client_closed"
    );
}

#[test]
fn server_half_close_first_still_receives_client_data() {
    const DOWN: u64 = 1024 * 1024;
    const UP: u64 = 1024 * 1024;
    let server = Backend::stream(DOWN, 11);
    let proxy = start(forward(&[server.addr()]));
    let mut c = connect(proxy.local_addr(0).expect("listener"));

    // The server sends everything and shuts down its write side; the client sees EOF...
    read_and_verify(&mut c, 11, DOWN).expect("the server's stream, then EOF");
    // ... and only then sends its own data, which must still reach the server.
    write_payload(&mut c, 12, UP).expect("the client still sends after the server's EOF");
    c.shutdown(Shutdown::Write).expect("half-close");

    let ended = loop {
        match server.next_event(EVENTUALLY) {
            Some(e @ Event::Ended { .. }) => break e,
            Some(Event::Data) => {}
            None => panic!("the server never saw the client's data end"),
        }
    };
    let Event::Ended {
        received,
        checksum,
        reset,
        ..
    } = ended
    else {
        unreachable!()
    };
    assert!(!reset, "the server saw a reset, not EOF");
    assert_eq!(
        received, UP,
        "every byte sent after the server's EOF arrives"
    );
    assert_eq!(checksum, Checksum::of(&payload(12, UP as usize)));
    assert!(
        closed_within(&mut c, EVENTUALLY).is_some(),
        "the pair closes"
    );

    let stats = proxy.stats();
    assert!(
        wait_until(EVENTUALLY, || stats.ended(End::ServerClosed) == 1),
        "the pair ends as server_closed"
    );
}
