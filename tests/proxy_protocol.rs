//! The PROXY protocol (issue 13): sending v1 and v2 to servers, accepting them from clients, the
//! trusted-peer check, chaining, and interop with the real HAProxy and nginx (skipped, with a
//! line saying so, when they are not installed). Loopback only.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use sluice::config::Config;
use sluice::proxy_protocol::{self as pp, Parsed};
use sluice::runtime::End;

fn parse(text: &str) -> Config {
    Config::parse(text, "pp.conf").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A backend that reads a PROXY header (reporting it), answers `src=ADDR\n` (or `src=local\n`),
/// then echoes what follows until EOF.
struct HeaderBackend {
    addr: SocketAddr,
    headers: mpsc::Receiver<(pp::Header, Vec<u8>)>,
}

impl HeaderBackend {
    fn spawn() -> HeaderBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, headers) = mpsc::channel();
        thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let tx = tx.clone();
                thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (header, len) = loop {
                        match pp::parse(&buf) {
                            Parsed::Header(h, len) => break (h, len),
                            Parsed::Incomplete => {}
                            _ => return,
                        }
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let after = buf[len..].to_vec();
                    let line = match header.client() {
                        Some(a) => format!("src={a}\n"),
                        None => "src=local\n".to_string(),
                    };
                    let _ = tx.send((header, after.clone()));
                    let _ = s.write_all(line.as_bytes());
                    let _ = s.write_all(&after);
                    loop {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&chunk[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        HeaderBackend { addr, headers }
    }

    fn next(&self) -> (pp::Header, Vec<u8>) {
        self.headers
            .recv_timeout(EVENTUALLY)
            .expect("a header reached the backend")
    }
}

/// Reads one `\n`-ended line.
fn line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while out.last() != Some(&b'\n') {
        match s.read(&mut b) {
            Ok(1) => out.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).trim_end().to_string()
}

#[test]
fn v1_and_v2_go_out_before_any_client_byte() {
    let backend = HeaderBackend::spawn();
    let b = backend.addr;
    let proxy = start(parse(&format!(
        "upstream v2 {{ server {b} proxy_protocol=v2; }}\n\
         listen 127.0.0.1:0 {{ proxy {b}; proxy_protocol v1; }}\n\
         listen 127.0.0.2:0 {{ proxy {b}; proxy_protocol v2; }}\n\
         listen 127.0.0.3:0 {{ proxy v2; proxy_protocol v1; }}"
    )));
    for (i, version) in [
        (0, pp::Version::V1),
        (1, pp::Version::V2),
        (2, pp::Version::V2),
    ] {
        let to = proxy.local_addr(i).expect("addr");
        let mut c = connect(to);
        // The client speaks first; its bytes still come after the header.
        c.write_all(b"hello").expect("write");
        let me = c.local_addr().expect("local");
        let (header, after) = backend.next();
        assert_eq!(header.version, version, "listener {i}");
        assert_eq!(header.addrs, Some((me, to)), "listener {i}");
        assert!(after.is_empty() || after == b"hello");
        assert_eq!(line(&mut c), format!("src={me}"));
        let mut echo = [0u8; 5];
        c.read_exact(&mut echo).expect("echo");
        assert_eq!(&echo, b"hello");
    }
}

#[test]
fn an_accepted_header_names_the_client_everywhere_and_is_passed_on() {
    let backend = HeaderBackend::spawn();
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ proxy {}; accept_proxy_protocol on; proxy_protocol v2;\n\
         deny 192.0.2.66; max_connections_per_ip 1; }}",
        backend.addr
    )));
    let to = proxy.local_addr(0).expect("addr");
    // v1 in, v2 out: the client named by the header, the bytes after it in the same write kept.
    let mut c = connect(to);
    c.write_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\nhello")
        .expect("write");
    let (header, _) = backend.next();
    assert_eq!(header.version, pp::Version::V2);
    let client: SocketAddr = "192.0.2.7:5555".parse().expect("addr");
    assert_eq!(
        header.addrs,
        Some((client, "198.51.100.1:443".parse().expect("addr")))
    );
    assert_eq!(line(&mut c), "src=192.0.2.7:5555");
    let mut echo = [0u8; 5];
    c.read_exact(&mut echo).expect("the bytes after the header");
    assert_eq!(&echo, b"hello");
    // Per-client limits count the header's client: a second one from 192.0.2.7 is refused.
    let mut again = connect(to);
    again
        .write_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 5556 443\r\n")
        .expect("write");
    assert_eq!(
        how_it_ends(&mut again),
        Ok(()),
        "closed, max_connections_per_ip"
    );
    // Access rules too.
    let mut denied = connect(to);
    denied
        .write_all(b"PROXY TCP4 192.0.2.66 198.51.100.1 1 443\r\n")
        .expect("write");
    assert_eq!(how_it_ends(&mut denied), Ok(()));
    assert!(wait_until(EVENTUALLY, || proxy.stats().ended(End::Denied) == 1));
    assert_eq!(proxy.stats().ended(End::Limit), 1);
    // v2 in with TLVs, v2 out: the original client and the TLVs go on.
    drop(c);
    let tlvs = vec![pp::Tlv {
        kind: 0x02,
        value: b"example.com".to_vec(),
    }];
    let v2 = pp::encode_v2(
        pp::Command::Proxy,
        pp::Transport::Stream,
        Some((
            "[2001:db8::5]:7000".parse().expect("a"),
            "[2001:db8::1]:443".parse().expect("a"),
        )),
        &tlvs,
    );
    let mut c = connect(to);
    c.write_all(&v2).expect("write");
    let (header, _) = backend.next();
    assert_eq!(
        header.client(),
        Some("[2001:db8::5]:7000".parse().expect("a"))
    );
    assert_eq!(header.tlvs, tlvs);
}

#[test]
fn a_header_split_over_three_writes_is_read_whole() {
    let backend = HeaderBackend::spawn();
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ proxy {}; accept_proxy_protocol on; proxy_protocol v1; }}",
        backend.addr
    )));
    let mut c = connect(proxy.local_addr(0).expect("addr"));
    for part in [
        &b"PROXY TCP4 192.0"[..],
        b".2.8 198.51.100.1 4",
        b"444 443\r\n",
    ] {
        c.write_all(part).expect("write");
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(line(&mut c), "src=192.0.2.8:4444");
}

#[test]
fn late_garbage_and_untrusted_headers_are_closed_before_any_server() {
    let backend = HeaderBackend::spawn();
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ proxy {b}; accept_proxy_protocol on; proxy_protocol_timeout 1s; }}\n\
         listen 127.0.0.1:0 {{ proxy {b}; accept_proxy_protocol on; proxy_protocol_trusted 127.0.0.2; proxy_protocol v1; }}",
        b = backend.addr
    )));
    let (open, trusted_only) = (
        proxy.local_addr(0).expect("a"),
        proxy.local_addr(1).expect("b"),
    );
    // Late: half a header, then nothing.
    let mut late = connect(open);
    late.write_all(b"PROXY TCP4 192.0").expect("write");
    let began = Instant::now();
    assert!(
        closed_within(&mut late, EVENTUALLY).is_some(),
        "a late header is closed"
    );
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "closed after {took:?}, not at the 1 s proxy_protocol_timeout"
    );
    // Garbage.
    let mut garbage = connect(open);
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    assert!(closed_within(&mut garbage, EVENTUALLY).is_some());
    assert_eq!(proxy.stats().ended(End::Error), 2);
    assert_eq!(load(&proxy.stats().proxy_protocol_errors), 2);
    // A header from a peer not trusted to send one.
    let mut untrusted = connect(trusted_only);
    untrusted
        .write_all(b"PROXY TCP4 192.0.2.9 198.51.100.1 1 443\r\n")
        .expect("write");
    assert!(closed_within(&mut untrusted, EVENTUALLY).is_some());
    assert!(wait_until(EVENTUALLY, || proxy.stats().ended(End::Denied) == 1));
    // From a trusted peer it is taken, and its client passed on.
    let mut ok = connect_from("127.0.0.2".parse().expect("ip"), trusted_only).expect("connect");
    ok.write_all(b"PROXY TCP4 192.0.2.9 198.51.100.1 1 443\r\n")
        .expect("write");
    assert_eq!(line(&mut ok), "src=192.0.2.9:1");
    assert_eq!(
        proxy.stats().ended(End::Denied),
        1,
        "only the untrusted one was refused"
    );
    let (header, _) = backend.next();
    assert_eq!(header.client(), Some("192.0.2.9:1".parse().expect("addr")));
}

#[test]
fn health_checks_send_a_local_header_first() {
    let backend = HeaderBackend::spawn();
    let _proxy = start(parse(&format!(
        "upstream u {{ server {} proxy_protocol=v2; health_check interval=100ms timeout=1s; }}\n\
         listen 127.0.0.1:0 {{ proxy u; }}",
        backend.addr
    )));
    let (header, _) = backend.next();
    assert_eq!(
        header.command,
        pp::Command::Local,
        "a probe speaks for itself"
    );
}

// ---- real peers ---------------------------------------------------------------------------

/// A peer process (haproxy or nginx) that is stopped when dropped.
struct Peer {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ]
    .iter()
    .map(|d| std::path::Path::new(d).join(name))
    .find(|p| p.is_file())
}

/// Starts `program` with `args`, its output in `log`, and waits until `port` accepts.
fn peer(program: &std::path::Path, args: &[&str], log: std::path::PathBuf, port: u16) -> Peer {
    let out = std::fs::File::create(&log).expect("log file");
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone"))
        .stderr(out)
        .spawn()
        .expect("start the peer");
    let peer = Peer { child, log };
    let up = wait_until(EVENTUALLY, || {
        TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_ok()
    });
    assert!(
        up,
        "peer did not listen: {}",
        std::fs::read_to_string(&peer.log).unwrap_or_default()
    );
    peer
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sluice-pp-{tag}-{}-{}",
        std::process::id(),
        unique()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

#[test]
fn nginx_reads_the_real_client_from_sluices_v1_and_v2() {
    let Some(nginx) = which("nginx") else {
        eprintln!("skipped: nginx not found (Debian packages nginx and libnginx-mod-stream)");
        return;
    };
    let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
    let load = if std::path::Path::new(module).is_file() {
        format!("load_module {module};\n")
    } else {
        String::new()
    };
    let dir = temp_dir("nginx");
    let port = free_port(Transport::Tcp);
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "{load}worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 64; }}\n\
             stream {{ server {{ listen 127.0.0.1:{port} proxy_protocol;\n\
             return \"$proxy_protocol_addr:$proxy_protocol_port\\n\"; }} }}\n",
            d = dir.display()
        ),
    )
    .expect("conf");
    let conf_arg = conf.display().to_string();
    let prefix = dir.display().to_string();
    let _nginx = peer(
        &nginx,
        &["-p", &prefix, "-c", &conf_arg],
        dir.join("out.log"),
        port,
    );
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ proxy 127.0.0.1:{port}; proxy_protocol v1; }}\n\
         listen 127.0.0.2:0 {{ proxy 127.0.0.1:{port}; proxy_protocol v2; }}"
    )));
    for i in 0..2 {
        let mut c = connect(proxy.local_addr(i).expect("addr"));
        let me = c.local_addr().expect("local");
        assert_eq!(
            line(&mut c),
            me.to_string(),
            "nginx saw the client through v{}",
            i + 1
        );
    }
}

#[test]
fn haproxy_in_front_with_send_proxy_and_behind_with_accept_proxy() {
    let Some(haproxy) = which("haproxy") else {
        eprintln!("skipped: haproxy not found (Debian package haproxy)");
        return;
    };
    let dir = temp_dir("haproxy");
    // In front: haproxy → sluice (accept_proxy_protocol) → a backend that reads the header
    // sluice sends on.
    let backend = HeaderBackend::spawn();
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ proxy {b}; accept_proxy_protocol on; proxy_protocol v1; }}\n\
         listen 127.0.0.2:0 {{ proxy {b}; accept_proxy_protocol on; proxy_protocol v1; }}",
        b = backend.addr
    )));
    let (front_v1, front_v2) = (free_port(Transport::Tcp), free_port(Transport::Tcp));
    let conf = dir.join("front.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
             listen v1\n    bind 127.0.0.1:{front_v1}\n    server s {} send-proxy\n\
             listen v2\n    bind 127.0.0.1:{front_v2}\n    server s {} send-proxy-v2\n",
            proxy.local_addr(0).expect("a"),
            proxy.local_addr(1).expect("b")
        ),
    )
    .expect("conf");
    let conf_arg = conf.display().to_string();
    let _front = peer(
        &haproxy,
        &["-db", "-f", &conf_arg],
        dir.join("front.log"),
        front_v2,
    );
    for port in [front_v1, front_v2] {
        let mut c = connect(SocketAddr::from(([127, 0, 0, 1], port)));
        c.write_all(b"through haproxy").expect("write");
        let me = c.local_addr().expect("local");
        assert_eq!(line(&mut c), format!("src={me}"), "via haproxy port {port}");
        let mut echo = [0u8; 15];
        c.read_exact(&mut echo).expect("bytes intact");
        assert_eq!(&echo, b"through haproxy");
    }
    // Behind: sluice (proxy_protocol v2) → haproxy `accept-proxy`, which logs %ci:%cp.
    let behind_port = free_port(Transport::Tcp);
    let greet = Backend::greet("g");
    let conf = dir.join("behind.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n    nbthread 1\n    log stdout format raw local0 info\n\
             defaults\n    mode tcp\n    log global\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
             listen behind\n    bind 127.0.0.1:{behind_port} accept-proxy\n    log-format \"client=%ci:%cp\"\n    server g {}\n",
            greet.addr()
        ),
    )
    .expect("conf");
    let conf_arg = conf.display().to_string();
    let behind = peer(
        &haproxy,
        &["-db", "-f", &conf_arg],
        dir.join("behind.log"),
        behind_port,
    );
    let sender = start(parse(&format!(
        "listen 127.0.0.1:0 {{ proxy 127.0.0.1:{behind_port}; proxy_protocol v2; }}"
    )));
    let mut c = connect(sender.local_addr(0).expect("addr"));
    let me = c.local_addr().expect("local");
    assert_eq!(line(&mut c), "g");
    drop(c);
    let logged = wait_until(EVENTUALLY, || {
        std::fs::read_to_string(&behind.log)
            .unwrap_or_default()
            .contains(&format!("client={me}"))
    });
    assert!(
        logged,
        "haproxy did not log client={me}:\n{}",
        std::fs::read_to_string(&behind.log).unwrap_or_default()
    );
}

// ---- UDP ------------------------------------------------------------------------------------

/// What a UDP backend saw of one datagram: its PROXY header, if any, and the payload.
type Seen = mpsc::Receiver<(Option<pp::Header>, Vec<u8>)>;

/// A UDP server that reports each datagram's PROXY header (if any) and echoes its payload.
fn udp_header_backend() -> (SocketAddr, Seen) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 65_536];
        // Bounded: a test sends a handful of datagrams.
        for _ in 0..1000 {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                return;
            };
            let (header, payload) = match pp::parse(&buf[..n]) {
                Parsed::Header(h, len) => (Some(h), buf[len..n].to_vec()),
                _ => (None, buf[..n].to_vec()),
            };
            let _ = socket.send_to(&payload, from);
            if tx.send((header, payload)).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

#[test]
fn udp_datagrams_carry_a_v2_header_to_the_server() {
    let (backend, seen) = udp_header_backend();
    let proxy = start(parse(&format!(
        "listen udp 127.0.0.1:0 {{ proxy {backend}; proxy_protocol v2; }}\n\
         listen udp 127.0.0.2:0 {{ proxy {backend}; proxy_protocol v2; proxy_protocol_udp first; }}"
    )));
    for (i, every) in [(0, true), (1, false)] {
        let to = proxy.local_addr(i).expect("addr");
        // Sent once each (no resend on loss: a resent first datagram would carry no header
        // under `first`, and be taken for the second).
        let client = udp_client(EVENTUALLY);
        let me = client.local_addr().expect("local");
        for k in 0..2u8 {
            let msg = [b'a' + k; 10];
            client.send_to(&msg, to).expect("send");
            let mut back = [0u8; 64];
            let (n, _) = client.recv_from(&mut back).expect("the reply");
            assert_eq!(&back[..n], msg, "the reply comes back unchanged");
            let (header, payload) = seen.recv_timeout(EVENTUALLY).expect("a datagram");
            assert_eq!(payload, msg, "the datagram arrives intact");
            let expect_header = every || k == 0;
            assert_eq!(
                header.is_some(),
                expect_header,
                "listener {i}, datagram {k}"
            );
            if let Some(h) = header {
                assert_eq!(h.transport, pp::Transport::Datagram);
                assert_eq!(h.addrs, Some((me, to)));
            }
        }
    }
}

#[test]
fn udp_accepts_a_v2_header_on_every_datagram() {
    let (backend, seen) = udp_header_backend();
    let proxy = start(parse(&format!(
        "listen udp 127.0.0.1:0 {{ proxy {backend}; accept_proxy_protocol on; proxy_protocol v2; deny 192.0.2.66; }}"
    )));
    let to = proxy.local_addr(0).expect("addr");
    let client = udp_client(Duration::from_millis(500));
    let real: SocketAddr = "192.0.2.7:5353".parse().expect("addr");
    let header = pp::encode_v2(
        pp::Command::Proxy,
        pp::Transport::Datagram,
        Some((real, "198.51.100.1:53".parse().expect("addr"))),
        &[],
    );
    let datagram = [header.as_slice(), b"query"].concat();
    assert_eq!(
        exchange(&client, to, &datagram),
        b"query",
        "the reply, without any header"
    );
    let (h, payload) = seen.recv_timeout(EVENTUALLY).expect("a datagram");
    assert_eq!(payload, b"query");
    assert_eq!(
        h.and_then(|h| h.client()),
        Some(real),
        "the header's client is passed on"
    );
    // Without a header: dropped and counted.
    client.send_to(b"bare", to).expect("send");
    let mut buf = [0u8; 64];
    assert!(client.recv_from(&mut buf).is_err());
    assert!(wait_until(EVENTUALLY, || load(
        &proxy.stats().proxy_protocol_errors
    ) == 1));
    // The header's client meets the access rules.
    let denied = pp::encode_v2(
        pp::Command::Proxy,
        pp::Transport::Datagram,
        Some((
            "192.0.2.66:1".parse().expect("a"),
            "198.51.100.1:53".parse().expect("a"),
        )),
        &[],
    );
    let other = udp_client(Duration::from_millis(300));
    other
        .send_to(&[denied.as_slice(), b"x"].concat(), to)
        .expect("send");
    assert!(other.recv_from(&mut buf).is_err());
    assert!(wait_until(EVENTUALLY, || proxy.stats().ended(End::Denied) == 1));
}

#[test]
fn a_servers_proxy_protocol_off_wins_over_the_listener() {
    let echo = Backend::echo();
    let proxy = start(parse(&format!(
        "upstream u {{ server {} proxy_protocol=off; }}\n\
         listen 127.0.0.1:0 {{ proxy u; proxy_protocol v2; }}",
        echo.addr()
    )));
    let mut c = connect(proxy.local_addr(0).expect("addr"));
    round_trip(&mut c, b"no header, just this").expect("the echo has no header in front");
}
