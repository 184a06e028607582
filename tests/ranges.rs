//! Port ranges (issue 14): `listen ADDR:P1-P2` is one listener per port; `proxy ADDR:Q1-Q2`
//! pairs port P1+i with Q1+i, `proxy UPSTREAM` sends every port to one upstream. Loopback only.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use sluice::config::Config;

fn parse(text: &str) -> Config {
    Config::parse(text, "ranges.conf").unwrap_or_else(|e| panic!("{e}"))
}

/// `n` consecutive ports free on 127.0.0.1 (bound to find them, then released), searched below
/// the kernel's ephemeral range (from 32768), where nothing else takes ports by itself.
fn consecutive_free(n: u16) -> u16 {
    // Tests of this file run at once: each search starts past what the others took.
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let offset = NEXT.fetch_add(n + 1, Ordering::Relaxed);
    let mut base = 10_000 + (std::process::id() % 2_000) as u16 + offset;
    while u32::from(base) + u32::from(n) < 32_768 {
        let held: Vec<TcpListener> = (0..n)
            .map_while(|i| TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return base;
        }
        // Past the port that was taken.
        base += held.len() as u16 + 1;
    }
    panic!("no {n} consecutive free ports below 32768");
}

/// Servers on `n` consecutive ports from `base`, each answering its own port number.
struct PortServers {
    stop: Arc<AtomicBool>,
    base: u16,
    n: u16,
}

impl PortServers {
    fn start(n: u16) -> PortServers {
        for _ in 0..5 {
            let base = consecutive_free(n);
            let listeners: Vec<TcpListener> = (0..n)
                .map_while(|i| TcpListener::bind(("127.0.0.1", base + i)).ok())
                .collect();
            if listeners.len() != usize::from(n) {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            for l in listeners {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
                    for s in l.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        if let Ok(mut s) = s {
                            let _ =
                                std::io::Write::write_all(&mut s, format!("{port}\n").as_bytes());
                        }
                    }
                });
            }
            return PortServers { stop, base, n };
        }
        panic!("could not hold {n} consecutive ports");
    }
}

impl Drop for PortServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake each accept loop so that it sees the flag.
        for i in 0..self.n {
            let _ = std::net::TcpStream::connect(("127.0.0.1", self.base + i));
        }
    }
}

fn answer(addr: SocketAddr) -> String {
    let mut s = connect(addr);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.trim().to_string()
}

#[test]
fn every_port_of_a_range_goes_to_its_offset_server() {
    let servers = PortServers::start(100);
    let listen = consecutive_free(100);
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:{listen}-{} {{ proxy 127.0.0.1:{}-{}; }}",
        listen + 99,
        servers.base,
        servers.base + 99
    )));
    assert_eq!(proxy.local_addrs().len(), 100);
    for i in 0..100u16 {
        let addr = SocketAddr::from(([127, 0, 0, 1], listen + i));
        assert_eq!(
            answer(addr),
            (servers.base + i).to_string(),
            "port {}",
            listen + i
        );
    }
    // Each port is its own listener in the counters.
    let listeners = proxy.stats().listeners();
    assert_eq!(listeners.len(), 100);
    assert!(listeners.iter().all(|l| load(&l.connections_total) == 1));
}

#[test]
fn a_range_can_share_one_upstream() {
    let backend = Backend::greet("g");
    let listen = consecutive_free(5);
    let proxy = start(parse(&format!(
        "upstream u {{ server {}; }}\nlisten 127.0.0.1:{listen}-{} {{ proxy u; }}",
        backend.addr(),
        listen + 4
    )));
    for addr in proxy.local_addrs() {
        assert_eq!(fetch_name(addr).expect("name"), "g");
    }
    assert_eq!(backend.served(), 5);
}

/// This process's resident memory, from /proc.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn ten_thousand_ports_start_at_once_and_serve() {
    const N: u16 = 10_000;
    raise_fd_limit();
    let limit = libc_nofile();
    if limit < u64::from(N) + 2_000 {
        eprintln!("skipped: the file descriptor limit ({limit}) is too low for {N} listeners");
        return;
    }
    let backend = Backend::greet("last");
    let listen = consecutive_free(N);
    let text = format!(
        "upstream u {{ server {}; }}\nlisten 127.0.0.1:{listen}-{} {{ proxy u; }}",
        backend.addr(),
        listen + N - 1
    );
    let config = parse(&text);
    let before = rss_kib();
    let began = Instant::now();
    let proxy = sluice::runtime::Proxy::start(config).expect("starts");
    let took = began.elapsed();
    let after = rss_kib();
    let last = SocketAddr::from(([127, 0, 0, 1], listen + N - 1));
    assert_eq!(fetch_name(last).expect("the last port serves"), "last");
    eprintln!(
        "{N} ports: started in {:.0} ms, {} KiB more resident ({} bytes per listener)",
        took.as_secs_f64() * 1e3,
        after.saturating_sub(before),
        after.saturating_sub(before) * 1024 / u64::from(N)
    );
    assert!(took < Duration::from_secs(5), "start took {took:?}");
    drop(proxy);
}

/// The soft limit on open files.
fn libc_nofile() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
