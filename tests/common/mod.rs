//! Shared helpers for the integration tests: TCP and UDP backends on loopback, TCP and UDP
//! clients, deterministic payloads, deadline-bounded waiting, an in-process proxy and the
//! `sluice` binary as a child.
//!
//! Every socket here is on loopback. Every backend runs in std threads and stops when it is
//! dropped, so no thread outlives the test that made it. Nothing waits by sleeping when a
//! readiness signal exists; where a wait is unavoidable, [`wait_until`] polls a condition
//! against a deadline, and blocking reads carry timeouts so a broken proxy fails a test
//! instead of hanging it.

#![allow(dead_code)]

mod backend;
mod child;
mod client;
pub mod http;
mod payload;
mod udp;

#[allow(unused_imports)]
pub use backend::*;
#[allow(unused_imports)]
pub use child::*;
#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use payload::*;
#[allow(unused_imports)]
pub use udp::*;

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use sluice::config::{Balance, Config, Proto};
use sluice::runtime::Proxy;

/// How long "eventually" may take on a loaded 2-core CI machine running tests in parallel.
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// Upper bound for one blocking read or connect of a test client that expects an answer soon.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Stack size of backend and client threads: they keep their buffers on the heap.
pub(crate) const THREAD_STACK: usize = 256 * 1024;

/// `127.0.0.1:0`: where test sockets bind unless a test needs another loopback address.
pub fn loopback_any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Polls `cond` until it holds or `within` has passed; returns whether it held.
/// For conditions that have no readiness signal (counters, log lines, process state).
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

/// A counter of the proxy's stats, read once.
pub fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Whether a read failed because its timeout passed (`WouldBlock` or `TimedOut`).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Which kind of port a listener takes, to pick a free one of that kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// A loopback port of `transport` that was free a moment ago (for the binary, which takes a
/// fixed port).
pub fn free_port(transport: Transport) -> u16 {
    match transport {
        Transport::Tcp => TcpListener::bind(loopback_any_port())
            .and_then(|l| l.local_addr())
            .expect("free tcp port")
            .port(),
        Transport::Udp => UdpSocket::bind(loopback_any_port())
            .and_then(|s| s.local_addr())
            .expect("free udp port")
            .port(),
    }
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

/// Starts a proxy for `config`.
pub fn start(mut config: Config) -> Proxy {
    raise_fd_limit();
    splice_from_env(&mut config);
    Proxy::start(config).expect("the proxy starts")
}

/// `SLUICE_TEST_SPLICE=on|off|auto` gives every TCP listener that `splice` mode, so the TCP
/// tests run on the splice path and on the copy path (`make test` runs them under each).
pub fn splice_from_env(config: &mut Config) {
    let mode = match std::env::var("SLUICE_TEST_SPLICE").as_deref() {
        Ok("on") => sluice::config::Splice::On,
        Ok("off") => sluice::config::Splice::Off,
        Ok("auto") => sluice::config::Splice::Auto,
        _ => return,
    };
    for l in &mut config.listeners {
        l.splice = mode;
    }
}

/// Parses the config text `text` and starts a proxy for it; panics with the text if it does
/// not parse.
pub fn start_conf(text: &str) -> Proxy {
    let config = Config::parse(text, "test.conf")
        .unwrap_or_else(|e| panic!("config does not parse: {e}\n{text}"));
    start(config)
}

/// Asserts that every pair of `proxy` is closed and freed within `EVENTUALLY`.
pub fn assert_all_pairs_freed(proxy: &Proxy, what: &str) {
    let stats = proxy.stats();
    let freed = wait_until(EVENTUALLY, || load(&stats.connections_active) == 0);
    assert!(freed, "{}", what);
}
