//! splice(2) (issue 15): `splice on` moves a stream through kernel pipes, `auto` does so for a
//! bulk transfer and not for small request/response exchanges, and a worker out of pipes
//! copies instead, losing nothing. The TCP test files also run whole with `splice on` and
//! `splice off` (`make test`, `SLUICE_TEST_SPLICE`). Loopback only.

mod common;

use std::io::Read;
use std::net::Shutdown;

use common::*;
use sluice::config::Config;
use sluice::runtime::Proxy;

const MIB: u64 = 1024 * 1024;

fn proxy(text: &str) -> Proxy {
    raise_fd_limit();
    let config = Config::parse(text, "splice.conf").unwrap_or_else(|e| panic!("{e}"));
    Proxy::start(config).expect("the proxy starts")
}

/// Reads a whole `Backend::stream(len, seed)` through the proxy and checks every byte.
fn fetch_stream(addr: std::net::SocketAddr, len: u64, seed: u64) -> Result<(), String> {
    let mut c = connect(addr);
    c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    read_and_verify(&mut c, seed, len)?;
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).map_err(|e| e.to_string())?;
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!("{} bytes past the end", rest.len()))
    }
}

#[test]
fn splice_on_moves_a_stream_through_pipes() {
    let server = Backend::stream(32 * MIB, 7);
    let p = proxy(&format!(
        "listen 127.0.0.1:0 {{ proxy {}; splice on; }}\n",
        server.addr()
    ));
    fetch_stream(p.local_addr(0).expect("listener"), 32 * MIB, 7).expect("intact");
    assert_all_pairs_freed(&p, "the pair closes");
    let stats = p.stats();
    // Everything the server sent went through a pipe (the client sent nothing).
    assert_eq!(stats.spliced_bytes(), 32 * MIB);
    assert!(stats.pipes_peak() >= 1 && stats.pipes_peak() <= 2);
    assert_eq!((stats.pipes_in_use(), stats.buffers_peak()), (0, 0));
}

#[test]
fn echo_both_ways_through_pipes_is_intact() {
    let echo = Backend::echo();
    let p = proxy(&format!(
        "listen 127.0.0.1:0 {{ proxy {}; splice on; }}\n",
        echo.addr()
    ));
    let addr = p.local_addr(0).expect("listener");
    let data = payload(9, 8 * MIB as usize);
    let mut c = connect(addr);
    let mut w = c.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        w.write_all(&data).and_then(|_| w.shutdown(Shutdown::Write))
    });
    read_and_verify(&mut c, 9, 8 * MIB).expect("the echo is intact");
    writer.join().expect("writer").expect("written");
    assert_all_pairs_freed(&p, "the pair closes");
    assert_eq!(
        p.stats().spliced_bytes(),
        16 * MIB,
        "both directions spliced"
    );
}

#[test]
fn auto_splices_a_bulk_transfer_and_not_small_exchanges() {
    let echo = Backend::echo();
    let bulk = Backend::stream(32 * MIB, 3);
    let p = proxy(&format!(
        "upstream echo {{ server {}; }}\nupstream bulk {{ server {}; }}\n\
         listen 127.0.0.1:0 {{ proxy echo; }}\nlisten 127.0.0.1:0 {{ proxy bulk; }}\n",
        echo.addr(),
        bulk.addr()
    ));
    let (small, big) = (
        p.local_addr(0).expect("listener"),
        p.local_addr(1).expect("listener"),
    );
    let mut c = connect(small);
    for i in 0..500u32 {
        round_trip(
            &mut c,
            format!("request {i}: a few hundred bytes at most").as_bytes(),
        )
        .expect("echo");
    }
    drop(c);
    assert_eq!(
        p.stats().spliced_bytes(),
        0,
        "small exchanges stay on the copy path"
    );
    fetch_stream(big, 32 * MIB, 3).expect("intact");
    let spliced = p.stats().spliced_bytes();
    println!("auto spliced {spliced} of {} bytes", 32 * MIB);
    assert!(
        spliced >= 16 * MIB,
        "a bulk transfer moves to pipes: {spliced} bytes spliced"
    );
}

#[test]
fn out_of_pipes_transfers_copy_and_stay_intact() {
    const STREAMS: u64 = 4;
    let server = Backend::stream(8 * MIB, 5);
    let p = proxy(&format!(
        "max_pipes 1;\nlisten 127.0.0.1:0 {{ proxy {}; splice on; }}\n",
        server.addr()
    ));
    let addr = p.local_addr(0).expect("listener");
    let stats = p.stats_handle();
    let fallbacks = || {
        stats
            .pipes
            .fallbacks
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Nobody reads yet: the first pair's pipe fills and stays lent, so the others find none.
    let held: Vec<_> = (0..STREAMS).map(|_| connect(addr)).collect();
    assert!(
        wait_until(EVENTUALLY, || fallbacks() > 0),
        "some reads found no pipe and copied"
    );
    let clients: Vec<_> = held
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
                read_and_verify(&mut c, 5, 8 * MIB)
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client").expect("intact");
    }
    assert_all_pairs_freed(&p, "the pairs close");
    assert!(
        stats.pipes_peak() <= 1,
        "max_pipes holds: {}",
        stats.pipes_peak()
    );
    assert!(
        stats.spliced_bytes() < STREAMS * 8 * MIB,
        "not every byte was spliced"
    );
}

#[test]
fn splice_off_never_splices() {
    let server = Backend::stream(16 * MIB, 8);
    let p = proxy(&format!(
        "listen 127.0.0.1:0 {{ proxy {}; splice off; }}\n",
        server.addr()
    ));
    fetch_stream(p.local_addr(0).expect("listener"), 16 * MIB, 8).expect("intact");
    assert_eq!(p.stats().spliced_bytes(), 0);
    assert_eq!(p.stats().pipes_peak(), 0);
}
