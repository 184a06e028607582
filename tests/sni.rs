//! SNI routing (issue 14): the ClientHello's server name picks the upstream, and every byte goes
//! on unchanged, so real TLS handshakes complete through sluice. Against `openssl s_server`
//! backends and `openssl s_client` (skipped, with a line saying so, without openssl).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sluice::config::Config;
use sluice::runtime::End;

fn parse(text: &str) -> Config {
    Config::parse(text, "sni.conf").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn openssl() -> Option<&'static str> {
    Command::new("openssl")
        .arg("version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| "openssl")
}

/// An `openssl s_server` for `name` (its own self-signed certificate), stopped when dropped.
struct TlsServer {
    child: Child,
    addr: SocketAddr,
    _dir: TempDirGuard,
}

struct TempDirGuard(std::path::PathBuf);

impl Drop for TempDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_server(name: &str) -> TlsServer {
    let dir = std::env::temp_dir().join(format!(
        "sluice-sni-{name}-{}-{}",
        std::process::id(),
        unique()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args(["-subj", &format!("/CN={name}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl req");
    assert!(made.success(), "no certificate for {name}");
    let port = free_port(Transport::Tcp);
    let child = Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-accept",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        wait_until(EVENTUALLY, || std::net::TcpStream::connect(addr).is_ok()),
        "s_server for {name} did not listen"
    );
    TlsServer {
        child,
        addr,
        _dir: TempDirGuard(dir),
    }
}

/// The certificate subject `openssl s_client` sees through `to`, asking for `name` (or no SNI).
fn subject_through(to: SocketAddr, name: Option<&str>) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &to.to_string()]);
    match name {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let subject = text
        .lines()
        .find_map(|l| l.strip_prefix("subject="))
        .unwrap_or("")
        .replace(' ', "");
    assert!(
        text.contains("Verify return code"),
        "the handshake did not complete:\n{text}"
    );
    subject
}

#[test]
fn each_name_reaches_its_tls_server_and_the_handshake_completes() {
    if openssl().is_none() {
        eprintln!("skipped: openssl not found (Debian package openssl)");
        return;
    }
    let (a, b, d) = (
        tls_server("a.test"),
        tls_server("b.example.org"),
        tls_server("default.test"),
    );
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ sni a.test {}; sni *.example.org {}; sni_default {}; }}",
        a.addr, b.addr, d.addr
    )));
    let to = proxy.local_addr(0).expect("addr");
    assert_eq!(subject_through(to, Some("a.test")), "CN=a.test");
    assert_eq!(
        subject_through(to, Some("A.Test.")),
        "CN=a.test",
        "case and trailing dot"
    );
    assert_eq!(
        subject_through(to, Some("www.example.org")),
        "CN=b.example.org",
        "wildcard"
    );
    assert_eq!(
        subject_through(to, Some("other.test")),
        "CN=default.test",
        "no match: default"
    );
    assert_eq!(
        subject_through(to, None),
        "CN=default.test",
        "no SNI: default"
    );
}

#[test]
fn plain_text_goes_to_the_default_or_is_closed_without_one() {
    let plain = Backend::name("plain");
    let proxy = start(parse(&format!(
        "upstream tls {{ server 127.0.0.1:9; }}\n\
         listen 127.0.0.1:0 {{ sni a.test tls; sni_default {}; }}\n\
         listen 127.0.0.2:0 {{ sni a.test tls; sni_timeout 1s; }}",
        plain.addr()
    )));
    let (with_default, without) = (
        proxy.local_addr(0).expect("a"),
        proxy.local_addr(1).expect("b"),
    );
    assert_eq!(
        fetch_name_with(with_default, b"GET / HTTP/1.0\r\n\r\n").expect("name"),
        "plain"
    );
    let mut c = connect(without);
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    assert!(
        out.is_empty(),
        "nothing answers a plain client without a default"
    );
    assert!(wait_until(EVENTUALLY, || proxy
        .stats()
        .ended(End::NoServer)
        == 1));
    // A client that sends nothing is closed at sni_timeout.
    let mut silent = connect(without);
    let began = Instant::now();
    assert!(closed_within(&mut silent, EVENTUALLY).is_some());
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
    assert!(wait_until(EVENTUALLY, || proxy
        .stats()
        .ended(End::IdleTimeout)
        == 1));
}

#[test]
fn a_hello_trickled_byte_by_byte_is_not_waited_for_forever() {
    let (a, d) = (Backend::name("a"), Backend::name("d"));
    let proxy = start(parse(&format!(
        "listen 127.0.0.1:0 {{ sni a.test {}; sni_default {}; }}",
        a.addr(),
        d.addr()
    )));
    let hello = include_bytes!("../src/testdata/client_hello_a_test.bin");
    // Whole, it goes to a.
    let mut c = connect(proxy.local_addr(0).expect("addr"));
    c.write_all(hello).expect("write");
    let mut name = [0u8; 1];
    c.read_exact(&mut name).expect("a name");
    assert_eq!(&name, b"a");
    // A byte at a time, each its own segment: after a bounded number of looks sluice stops
    // waiting and takes the default, instead of re-reading the growing hello per byte.
    let mut c = connect(proxy.local_addr(0).expect("addr"));
    let mut got = None;
    for &b in hello.iter() {
        if c.write_all(&[b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(3));
        c.set_nonblocking(true).expect("nonblocking");
        if let Ok(1) = c.read(&mut name) {
            got = Some(name[0]);
            break;
        }
        c.set_nonblocking(false).expect("blocking");
    }
    assert_eq!(
        got,
        Some(b'd'),
        "routed to the default before the hello was whole"
    );
    assert!(a.accepted() == 1, "only the whole hello reached a");
}
