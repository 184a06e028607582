//! UDP on 127.0.0.1: backends that echo or say their name and record every datagram's size and
//! source, a port that refuses datagrams, and clients that resend on loss.

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{is_timeout, loopback_any_port};

/// What a UDP backend sends back for each datagram.
#[derive(Clone, Copy, Debug)]
pub enum UdpReply {
    /// The datagram itself.
    Echo,
    /// Its own name, `copies` times.
    Name { copies: usize },
}

#[derive(Default)]
struct UdpShared {
    stop: AtomicBool,
    sizes: Mutex<Vec<usize>>,
    peers: Mutex<HashSet<SocketAddr>>,
}

/// A UDP server on 127.0.0.1 that records the size of every datagram and who sent it.
pub struct UdpBackend {
    pub addr: SocketAddr,
    pub name: String,
    shared: Arc<UdpShared>,
    thread: Option<JoinHandle<()>>,
}

impl UdpBackend {
    pub fn echo(name: &str) -> UdpBackend {
        UdpBackend::spawn(name, UdpReply::Echo)
    }

    pub fn named(name: &str, copies: usize) -> UdpBackend {
        UdpBackend::spawn(name, UdpReply::Name { copies })
    }

    pub fn spawn(name: &str, reply: UdpReply) -> UdpBackend {
        let socket = UdpSocket::bind(loopback_any_port()).expect("bind udp backend");
        let addr = socket.local_addr().expect("local addr");
        // Only so that a stop request whose wake-up datagram was dropped is still seen.
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        let shared = Arc::new(UdpShared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            let name = name.to_string();
            thread::spawn(move || serve_udp(socket, &name, reply, &shared))
        };
        UdpBackend {
            addr,
            name: name.to_string(),
            shared,
            thread: Some(thread),
        }
    }

    /// Sizes of the datagrams received, in order.
    pub fn sizes(&self) -> Vec<usize> {
        self.shared.sizes.lock().expect("sizes").clone()
    }

    pub fn received(&self) -> usize {
        self.shared.sizes.lock().expect("sizes").len()
    }

    /// The distinct source addresses datagrams came from (one per proxy session).
    pub fn peers(&self) -> HashSet<SocketAddr> {
        self.shared.peers.lock().expect("peers").clone()
    }
}

fn serve_udp(socket: UdpSocket, name: &str, reply: UdpReply, shared: &UdpShared) {
    let mut buf = vec![0u8; 65_536];
    while !shared.stop.load(Ordering::Relaxed) {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(_) => continue,
        };
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        shared.sizes.lock().expect("sizes").push(n);
        shared.peers.lock().expect("peers").insert(peer);
        // A reply that finds the peer's buffer full is lost, as UDP goes.
        match reply {
            UdpReply::Echo => {
                let _ = socket.send_to(&buf[..n], peer);
            }
            UdpReply::Name { copies } => {
                for _ in 0..copies {
                    let _ = socket.send_to(name.as_bytes(), peer);
                }
            }
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Ok(waker) = UdpSocket::bind(loopback_any_port()) {
            let _ = waker.send_to(b"", self.addr);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A loopback UDP port where no server takes datagrams: they draw an ICMP port unreachable,
/// exactly as for an unbound port. The port is held by a socket connected to itself, which the
/// kernel matches only for datagrams from its own address, so no parallel test can bind it.
pub struct DeadUdp {
    pub addr: SocketAddr,
    _holder: UdpSocket,
}

pub fn dead_udp() -> DeadUdp {
    let holder = UdpSocket::bind(loopback_any_port()).expect("bind udp");
    let addr = holder.local_addr().expect("local addr");
    holder.connect(addr).expect("connect to itself");
    DeadUdp {
        addr,
        _holder: holder,
    }
}

/// A UDP client socket on 127.0.0.1 with a read timeout.
pub fn udp_client(read_timeout: Duration) -> UdpSocket {
    let socket = UdpSocket::bind(loopback_any_port()).expect("bind udp client");
    socket
        .set_read_timeout(Some(read_timeout))
        .expect("read timeout");
    socket
}

/// Sends `datagram` to `to` and returns the first reply that `accept` takes, resending up to
/// `tries` times when the read times out. Replies `accept` refuses (late answers to earlier
/// sends) are skipped, at most `max_skips` of them. Every reply must come from `to`.
pub fn exchange_with(
    socket: &UdpSocket,
    to: SocketAddr,
    datagram: &[u8],
    tries: usize,
    max_skips: usize,
    mut accept: impl FnMut(&[u8]) -> bool,
) -> Vec<u8> {
    let mut buf = vec![0u8; 65_536];
    let mut skipped = 0;
    for _ in 0..tries {
        socket.send_to(datagram, to).expect("send to the proxy");
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    assert_eq!(from, to, "a reply came from another address");
                    if accept(&buf[..n]) {
                        return buf[..n].to_vec();
                    }
                    skipped += 1;
                    assert!(skipped <= max_skips, "more than {max_skips} stray replies");
                }
                Err(e) if is_timeout(&e) => break,
                Err(e) => panic!("receive from the proxy failed: {e}"),
            }
        }
    }
    panic!(
        "no reply to a {}-byte datagram after {tries} tries",
        datagram.len()
    );
}

/// Sends `datagram` and returns the first reply, resending on loss.
pub fn exchange(socket: &UdpSocket, to: SocketAddr, datagram: &[u8]) -> Vec<u8> {
    exchange_with(socket, to, datagram, 5, 0, |_| true)
}
