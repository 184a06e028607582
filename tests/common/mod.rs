//! Shared helpers for the integration tests: backends on loopback, deterministic payloads,
//! deadline-bounded waiting, an in-process proxy and the `sluice` binary as a child.
//!
//! Every socket here is on 127.0.0.1. Every backend runs in std threads and stops when it is
//! dropped: its acceptor is woken by a connect to itself, and its connections are shut down
//! through a duplicate descriptor, so no thread outlives the test that made it. Nothing waits
//! by sleeping when a readiness signal exists; where a wait is unavoidable, [`wait_until`]
//! polls a condition against a deadline.

#![allow(dead_code)]

mod backend;
mod child;
mod payload;

#[allow(unused_imports)]
pub use backend::*;
#[allow(unused_imports)]
pub use child::*;
#[allow(unused_imports)]
pub use payload::*;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Once;
use std::time::{Duration, Instant};

use sluice::config::{Balance, Config, Proto};
use sluice::runtime::Proxy;

/// How long "eventually" may take on a loaded 2-core CI machine running tests in parallel.
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// Stack size of backend and client threads: they keep their buffers on the heap.
pub(crate) const THREAD_STACK: usize = 256 * 1024;

/// `127.0.0.1:0`: the only address tests bind.
pub fn loopback_any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Polls `cond` until it holds or `within` has passed; returns whether it held.
/// For conditions that have no readiness signal (counters, log lines, process state).
/// Asserts that every pair of `proxy` is closed and freed within `EVENTUALLY`.
pub fn assert_all_pairs_freed(proxy: &sluice::runtime::Proxy, what: &str) {
    let stats = proxy.stats();
    let freed = wait_until(EVENTUALLY, || {
        stats
            .connections_active
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    });
    assert!(freed, "{}", what);
}

pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Tests open hundreds of sockets in one process; lift the soft descriptor limit once.
pub fn raise_fd_limit() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = sluice::sys::raise_nofile_limit();
    });
}

// ---- the proxy in-process ------------------------------------------------------------------

/// A TCP forward from 127.0.0.1 (port chosen by the OS) to `servers`, round robin.
pub fn forward(servers: &[SocketAddr]) -> Config {
    Config::forward(
        Proto::Tcp,
        loopback_any_port(),
        servers,
        Balance::RoundRobin,
    )
}

pub fn start(config: Config) -> Proxy {
    raise_fd_limit();
    Proxy::start(config).expect("the proxy starts")
}

/// A client connection with timeouts, so that no read or write waits forever.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the proxy");
    s.set_read_timeout(Some(EVENTUALLY)).expect("read timeout");
    s.set_write_timeout(Some(EVENTUALLY))
        .expect("write timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Writes `msg` and reads the same bytes back.
pub fn round_trip(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(io::Error::other("the echo differs"));
    }
    Ok(())
}

/// Reads exactly `len` bytes.
pub fn read_exactly(s: &mut TcpStream, len: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    s.read_exact(&mut v)?;
    Ok(v)
}

/// Waits at most `within` for the connection to close (a read returns 0 or fails),
/// discarding data; returns how long that took, or `None` if it stayed open.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let deadline = start + within;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).ok()?;
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return None
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
}

/// Whether `within` passes without any byte or close arriving on `s`.
pub fn silent_for(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1];
    s.set_read_timeout(Some(within)).expect("read timeout");
    let silent = matches!(s.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut);
    s.set_read_timeout(Some(EVENTUALLY)).expect("read timeout");
    silent
}
