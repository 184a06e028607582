//! Names re-resolved while running (issue 14): `server NAME:PORT resolve` with `resolver`,
//! against a DNS responder in the test (which can change its records, fall silent, send
//! replies that answer nothing asked, or truncate) and against Debian's `dnsmasq`. Every
//! address, nameserver and server included, is on 127.0.0.0/8.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use sluice::config::Config;
use sluice::runtime::Proxy;

/// How the responder answers.
#[derive(Clone, Default)]
struct Zone {
    /// The A records of every name asked for.
    a: Vec<Ipv4Addr>,
    ttl: u32,
    /// Answer nothing.
    silent: bool,
    /// Before each answer, send one with another id and one for another name, both naming
    /// 127.0.0.9.
    decoys: bool,
    /// Over UDP, answer with TC set and no records.
    truncate: bool,
}

struct Responder {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Responder {
    /// Listens on 127.0.0.1, one port for UDP and TCP.
    fn start(zone: Zone) -> Responder {
        let (udp, tcp) = (0..20)
            .find_map(|_| {
                let udp = UdpSocket::bind("127.0.0.1:0").ok()?;
                let tcp = TcpListener::bind(udp.local_addr().ok()?).ok()?;
                Some((udp, tcp))
            })
            .expect("a port free for UDP and TCP");
        let addr = udp.local_addr().expect("addr");
        let responder = Responder {
            addr,
            zone: Arc::new(Mutex::new(zone)),
            udp_queries: Arc::new(AtomicUsize::new(0)),
            tcp_queries: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (zone, count, stop) = (
            Arc::clone(&responder.zone),
            Arc::clone(&responder.udp_queries),
            Arc::clone(&responder.stop),
        );
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                count.fetch_add(1, Ordering::Relaxed);
                let zone = zone.lock().expect("zone").clone();
                for reply in replies(&buf[..n], &zone, true) {
                    let _ = udp.send_to(&reply, from);
                }
            }
        });
        let (zone, count, stop) = (
            Arc::clone(&responder.zone),
            Arc::clone(&responder.tcp_queries),
            Arc::clone(&responder.stop),
        );
        thread::spawn(move || {
            for stream in tcp.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                let mut len = [0u8; 2];
                if stream.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if stream.read_exact(&mut query).is_err() {
                    continue;
                }
                count.fetch_add(1, Ordering::Relaxed);
                let zone = zone.lock().expect("zone").clone();
                if let Some(reply) = replies(&query, &zone, false).pop() {
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    let _ = stream.write_all(&framed);
                }
            }
        });
        responder
    }

    fn set(&self, change: impl FnOnce(&mut Zone)) {
        change(&mut self.zone.lock().expect("zone"));
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake both threads so they see the flag.
        if let Ok(s) = UdpSocket::bind("127.0.0.1:0") {
            let _ = s.send_to(b"x", self.addr);
        }
        let _ = TcpStream::connect(self.addr);
    }
}

/// The replies to `query` (the last one the real answer). A query this responder cannot read
/// gets none.
fn replies(query: &[u8], zone: &Zone, udp: bool) -> Vec<Vec<u8>> {
    if zone.silent || query.len() < 17 {
        return Vec::new();
    }
    // The question: from byte 12 to the end of the name, then type and class.
    let mut at = 12;
    while let Some(&len) = query.get(at) {
        if len == 0 {
            break;
        }
        at += 1 + usize::from(len);
    }
    let Some(question) = query.get(12..at + 5) else {
        return Vec::new();
    };
    let qtype = u16::from_be_bytes([question[question.len() - 4], question[question.len() - 3]]);
    let id = [query[0], query[1]];
    let records: Vec<[u8; 4]> = match qtype {
        1 => zone.a.iter().map(|a| a.octets()).collect(),
        _ => Vec::new(),
    };
    let answer = |id: [u8; 2], question: &[u8], records: &[[u8; 4]], tc: bool| {
        let mut m = id.to_vec();
        m.extend_from_slice(&(0x8180u16 | if tc { 0x0200 } else { 0 }).to_be_bytes());
        m.extend_from_slice(&[0, 1]);
        m.extend_from_slice(&(records.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(question);
        for r in records {
            m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
            m.extend_from_slice(&zone.ttl.to_be_bytes());
            m.extend_from_slice(&[0, 4]);
            m.extend_from_slice(r);
        }
        m
    };
    let mut out = Vec::new();
    if zone.decoys && qtype == 1 {
        let decoy = [[127, 0, 0, 9]];
        out.push(answer([id[0] ^ 0x55, id[1]], question, &decoy, false));
        let mut other = question.to_vec();
        // Another first letter: another name (names compare without case).
        other[1] = if other[1] == b'q' { b'r' } else { b'q' };
        out.push(answer(id, &other, &decoy, false));
    }
    if udp && zone.truncate {
        out.push(answer(id, question, &[], true));
    } else {
        out.push(answer(id, question, &records, false));
    }
    out
}

/// Servers on 127.0.0.2, .3 and .4, one port for all: each writes its last octet and a
/// newline, then echoes until the client finishes.
struct Servers {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Servers {
    fn start() -> Servers {
        let ips = [2u8, 3, 4];
        let (port, listeners) = (0..50)
            .find_map(|_| {
                let first = TcpListener::bind("127.0.0.2:0").ok()?;
                let port = first.local_addr().ok()?.port();
                let mut all = vec![first];
                for &ip in &ips[1..] {
                    all.push(TcpListener::bind((Ipv4Addr::new(127, 0, 0, ip), port)).ok()?);
                }
                Some((port, all))
            })
            .expect("one port free on 127.0.0.2-4");
        let stop = Arc::new(AtomicBool::new(false));
        for (listener, ip) in listeners.into_iter().zip(ips) {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(mut s) = stream else { continue };
                    thread::spawn(move || {
                        if s.write_all(format!("{ip}\n").as_bytes()).is_err() {
                            return;
                        }
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
        Servers { port, stop }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for ip in [2u8, 3, 4] {
            let _ = TcpStream::connect((Ipv4Addr::new(127, 0, 0, ip), self.port));
        }
    }
}

fn conf(dns: SocketAddr, port: u16, valid: &str) -> String {
    format!(
        "resolver {dns} valid={valid};\nupstream db {{\n  server db.test:{port} resolve max_fails=0;\n}}\n\
         listen 127.0.0.1:0 {{ proxy db; }}\n"
    )
}

fn server_addrs(config: &Config) -> Vec<String> {
    let mut v: Vec<String> = config.upstreams[0]
        .servers
        .iter()
        .map(|s| s.addr.ip().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn two_a_records_give_two_servers_and_a_change_moves_new_connections_only() {
    let servers = Servers::start();
    let dns = Responder::start(Zone {
        a: vec![[127, 0, 0, 2].into(), [127, 0, 0, 3].into()],
        ttl: 1,
        ..Zone::default()
    });
    let config = Config::parse(&conf(dns.addr, servers.port, "30s"), "resolve.conf")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server_addrs(&config), ["127.0.0.2", "127.0.0.3"]);
    let proxy = start(config);
    let addr = proxy.local_addr(0).expect("listener");
    let mut seen: Vec<String> = (0..4).map(|_| fetch_name(addr).expect("a name")).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["2", "3"], "round robin over both addresses");

    let mut old = hold(addr).expect("a pair before the change");
    dns.set(|z| z.a = vec![[127, 0, 0, 4].into()]);
    // The TTL is 1 s: within a few lookups every new connection goes to .4.
    let moved = wait_until(EVENTUALLY, || {
        (0..3).all(|_| fetch_name(addr).map(|n| n == "4").unwrap_or(false))
    });
    assert!(moved, "new connections moved to the new address");
    assert!(load(&proxy.stats().resolver_changes) >= 1);
    // The pair opened before the change still reaches its server.
    old.round_trip(b"still here").expect("the old pair runs on");
    old.finish().expect("the old pair ends cleanly");
    let queries = dns.udp_queries.load(Ordering::Relaxed);
    let lookups = load(&proxy.stats().resolver_lookups) + 1; // and the one at load
    println!("{queries} queries over {lookups} lookups");
    // Two a lookup (A and AAAA); a retry after a late answer on a loaded machine is allowed.
    assert!(
        queries as u64 <= lookups * 4 + 4,
        "{queries} queries for {lookups} lookups"
    );
}

/// A proxy whose one server is `resolve`d through a responder that answers 127.0.0.2 (TTL 1 s,
/// `valid=1s`), checked to reach it: the start of the tests that change the answers later.
fn proxying_to_one_address() -> (Servers, Responder, Proxy, SocketAddr) {
    let servers = Servers::start();
    let dns = Responder::start(Zone {
        a: vec![[127, 0, 0, 2].into()],
        ttl: 1,
        ..Zone::default()
    });
    let config = Config::parse(&conf(dns.addr, servers.port, "1s"), "resolve.conf")
        .unwrap_or_else(|e| panic!("{e}"));
    let proxy = start(config);
    let addr = proxy.local_addr(0).expect("listener");
    assert_eq!(fetch_name(addr).expect("a name"), "2");
    (servers, dns, proxy, addr)
}

#[test]
fn a_silent_resolver_leaves_the_last_good_set() {
    let (_servers, dns, proxy, addr) = proxying_to_one_address();
    dns.set(|z| z.silent = true);
    // Each query waits 2 s for the one nameserver, twice.
    let failed = wait_until(Duration::from_secs(15), || {
        load(&proxy.stats().resolver_failures) >= 1
    });
    assert!(failed, "the lookup failed");
    assert_eq!(fetch_name(addr).expect("a name"), "2", "the last set stays");
    assert_eq!(load(&proxy.stats().resolver_changes), 0);
    // And once it answers again, with another address, that applies.
    dns.set(|z| {
        z.silent = false;
        z.a = vec![[127, 0, 0, 3].into()];
    });
    let moved = wait_until(Duration::from_secs(15), || {
        fetch_name(addr).map(|n| n == "3").unwrap_or(false)
    });
    assert!(moved, "the answer after the silence applies");
}

#[test]
fn replies_that_answer_another_id_or_question_are_ignored() {
    let servers = Servers::start();
    let dns = Responder::start(Zone {
        a: vec![[127, 0, 0, 2].into()],
        ttl: 1,
        decoys: true,
        ..Zone::default()
    });
    let config = Config::parse(&conf(dns.addr, servers.port, "1s"), "resolve.conf")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        server_addrs(&config),
        ["127.0.0.2"],
        "the decoys' 127.0.0.9 is not taken"
    );
    let proxy = start(config);
    let ignored = wait_until(EVENTUALLY, || {
        load(&proxy.stats().resolver_ignored) >= 2 && load(&proxy.stats().resolver_lookups) >= 1
    });
    assert!(ignored, "the decoys were counted as ignored");
    assert_eq!(load(&proxy.stats().resolver_changes), 0);
    let addr = proxy.local_addr(0).expect("listener");
    assert_eq!(fetch_name(addr).expect("a name"), "2");
}

#[test]
fn a_truncated_answer_is_asked_again_over_tcp() {
    let servers = Servers::start();
    let dns = Responder::start(Zone {
        a: vec![[127, 0, 0, 2].into(), [127, 0, 0, 3].into()],
        ttl: 30,
        truncate: true,
        ..Zone::default()
    });
    let config = Config::parse(&conf(dns.addr, servers.port, "30s"), "resolve.conf")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server_addrs(&config), ["127.0.0.2", "127.0.0.3"]);
    assert_eq!(
        dns.tcp_queries.load(Ordering::Relaxed),
        2,
        "A and AAAA over TCP"
    );
}

#[test]
fn a_truncated_answer_while_running_is_asked_again_over_tcp() {
    let (_servers, dns, _proxy, addr) = proxying_to_one_address();
    assert_eq!(dns.tcp_queries.load(Ordering::Relaxed), 0);
    dns.set(|z| {
        z.truncate = true;
        z.a = vec![[127, 0, 0, 3].into()];
    });
    let moved = wait_until(EVENTUALLY, || {
        fetch_name(addr).map(|n| n == "3").unwrap_or(false)
    });
    assert!(moved, "the answer that came over TCP applies");
    assert!(dns.tcp_queries.load(Ordering::Relaxed) >= 2);
}

#[test]
fn a_name_that_does_not_resolve_at_start_is_a_config_error() {
    let dns = Responder::start(Zone {
        silent: true,
        ..Zone::default()
    });
    let err = Config::parse(&conf(dns.addr, 80, "30s"), "resolve.conf").expect_err("no address");
    let text = err.to_string();
    assert!(
        text.starts_with("resolve.conf:3:10: cannot resolve 'db.test'")
            && text.contains("no answer"),
        "{text}"
    );
    let empty = Responder::start(Zone::default());
    let err = Config::parse(&conf(empty.addr, 80, "30s"), "resolve.conf").expect_err("none");
    assert!(err.to_string().ends_with("no addresses"), "{err}");
}

/// dnsmasq on a loopback port, answering only from its command line.
struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dnsmasq_gives_two_servers_for_two_records() {
    let Some(dnsmasq) = ["dnsmasq", "/usr/sbin/dnsmasq"]
        .into_iter()
        .find(|bin| Command::new(bin).arg("--version").output().is_ok())
    else {
        println!("skipped: dnsmasq is not installed (apt-get install dnsmasq-base)");
        return;
    };
    let servers = Servers::start();
    // A port free for UDP and TCP both (dnsmasq takes both), released just before it starts.
    let port = (0..20)
        .find_map(|_| {
            let udp = UdpSocket::bind("127.0.0.1:0").ok()?;
            let port = udp.local_addr().ok()?.port();
            TcpListener::bind(("127.0.0.1", port)).ok().map(|_| port)
        })
        .expect("a port free for UDP and TCP");
    let mut child = Command::new(dnsmasq)
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--pid-file=",
            "--user=root",
        ])
        .arg(format!("--port={port}"))
        .arg("--host-record=db.test,127.0.0.2")
        .arg("--host-record=db.test,127.0.0.3")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq starts");
    let dns = SocketAddr::from(([127, 0, 0, 1], port));
    let text = conf(dns, servers.port, "30s");
    // dnsmasq binds its port a moment after it starts; there is no signal for that.
    let mut parsed = None;
    let mut exited = None;
    wait_until(EVENTUALLY, || {
        exited = child.try_wait().ok().flatten();
        parsed = Config::parse(&text, "resolve.conf").ok();
        parsed.is_some() || exited.is_some()
    });
    let _dnsmasq = Dnsmasq(child);
    if let Some(status) = exited {
        panic!("dnsmasq exited ({status}) on port {port}");
    }
    let config = parsed.expect("dnsmasq answered");
    assert_eq!(server_addrs(&config), ["127.0.0.2", "127.0.0.3"]);
    let proxy = start(config);
    let addr = proxy.local_addr(0).expect("listener");
    let mut seen: Vec<String> = (0..4).map(|_| fetch_name(addr).expect("a name")).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["2", "3"]);
    // Looked up again at once: dnsmasq answers A and refuses AAAA (it has no upstream to ask),
    // which is a lookup that worked and changed nothing.
    let stats = proxy.stats();
    assert!(wait_until(EVENTUALLY, || load(&stats.resolver_lookups) >= 1));
    assert_eq!(load(&stats.resolver_failures), 0);
    assert_eq!(load(&stats.resolver_changes), 0);
}

#[test]
fn the_shipped_example_parses() {
    let servers = Servers::start();
    let dns = Responder::start(Zone {
        a: vec![[127, 0, 0, 2].into()],
        ttl: 30,
        ..Zone::default()
    });
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/resolve.conf"))
        .expect("conf/resolve.conf");
    // Its nameserver is this test's responder, which answers 127.0.0.2 for both names (so
    // the backup goes to another port).
    let text = text
        .replace("127.0.0.53", &dns.addr.to_string())
        .replace(":6379 backup", ":7 backup")
        .replace(":6379", &format!(":{}", servers.port));
    let config = Config::parse(&text, "conf/resolve.conf").unwrap_or_else(|e| panic!("{e}"));
    let summary = config.summary();
    assert!(summary.contains("(re-resolving db.internal)"), "{summary}");
}
