//! The non-blocking connect that pairs and health probes both make, and the one check of how it
//! went once the socket reported readiness.

use std::io;
use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::reactor::Readiness;

/// Opens a non-blocking connect to `addr`, registered readable and writable under `token`.
pub fn start(registry: &Registry, addr: SocketAddr, token: Token) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
    Ok(stream)
}

#[derive(Debug)]
pub enum Outcome {
    Pending,
    Connected,
    Failed(io::Error),
}

/// How a non-blocking connect went, once the socket reported writable (or an error). Where a
/// plain writable event means connected (`sys::WRITABLE_MEANS_CONNECTED`) this costs no
/// syscall; otherwise mio's documented way: `take_error`, then `peer_addr` to tell a finished
/// connect from a spurious wake-up.
pub fn outcome(stream: &TcpStream, ready: &Readiness) -> Outcome {
    if !ready.writable {
        return Outcome::Pending;
    }
    if crate::sys::WRITABLE_MEANS_CONNECTED && !ready.hung_up {
        return Outcome::Connected;
    }
    match stream.take_error() {
        Ok(Some(error)) | Err(error) => return Outcome::Failed(error),
        Ok(None) => {}
    }
    match stream.peer_addr() {
        Ok(_) => Outcome::Connected,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Outcome::Pending,
        Err(error) => Outcome::Failed(error),
    }
}

/// `so_keepalive` on one socket of a pair. Best effort: a system that refuses an option keeps
/// its default, which only matters for connections idle through a NAT.
pub fn keepalive(stream: &TcpStream, k: &crate::config::Keepalive) {
    let socket = socket2::SockRef::from(stream);
    let mut ka = socket2::TcpKeepalive::new();
    if let Some(idle) = k.idle {
        ka = ka.with_time(idle);
    }
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos"
    ))]
    {
        if let Some(interval) = k.interval {
            ka = ka.with_interval(interval);
        }
        if let Some(count) = k.count {
            ka = ka.with_retries(count);
        }
    }
    if let Err(e) = socket.set_tcp_keepalive(&ka) {
        log::debug!("so_keepalive not set: {}", crate::sys::io_reason(&e));
    }
}
