//! Binding listeners for every worker, on the caller's thread and before any worker sees the
//! sockets, so that a start or a reload that cannot bind one listener fails whole: the sockets
//! bound so far close as they drop, and nothing running has changed.
//!
//! With several workers each gets its own socket on the same address (`SO_REUSEPORT`, the
//! kernel spreading connections and UDP flows); the first binds the configured address, the
//! others the address it got, so a configured port 0 is one port for all.

use std::net::SocketAddr;

use mio::net::{TcpListener, UdpSocket};

use crate::config::{Listen, Proto};
use crate::part::{BindError, Sharing};

/// One worker's listening socket.
pub(super) enum Socket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// One listener, bound for every worker.
pub(super) struct Bound {
    /// The address it got (a configured port 0 shows the port chosen).
    pub addr: SocketAddr,
    /// By worker number.
    pub sockets: Vec<Socket>,
}

/// Binds `conf` once for each of `workers` workers.
pub(super) fn bind(conf: &Listen, workers: usize) -> Result<Bound, BindError> {
    // UDP sockets always share their port (after checking that no other process holds it): a
    // removed UDP listener keeps its socket while its sessions last, and a reload that adds it
    // back must be able to bind beside it (`bind_beside`).
    let first = match (workers, conf.proto) {
        (1, Proto::Tcp) => Sharing::Alone,
        _ => Sharing::First,
    };
    let (socket, addr) = open(conf.proto, conf.addr, first)?;
    let mut sockets = Vec::with_capacity(workers);
    sockets.push(socket);
    for _ in 1..workers {
        let (socket, _) = open(conf.proto, addr, Sharing::Another)?;
        sockets.push(socket);
    }
    Ok(Bound { addr, sockets })
}

/// Binds `conf` for every worker on `addr`, beside a socket of this process that still holds it
/// (a UDP listener winding down).
pub(super) fn bind_beside(
    conf: &Listen,
    addr: SocketAddr,
    workers: usize,
) -> Result<Bound, BindError> {
    let mut sockets = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (socket, _) = open(conf.proto, addr, Sharing::Another)?;
        sockets.push(socket);
    }
    Ok(Bound { addr, sockets })
}

fn open(
    proto: Proto,
    addr: SocketAddr,
    sharing: Sharing,
) -> Result<(Socket, SocketAddr), BindError> {
    match proto {
        Proto::Tcp => crate::tcp::listener::bind(addr, sharing).map(|(s, a)| (Socket::Tcp(s), a)),
        Proto::Udp => crate::udp::bind(addr, sharing).map(|(s, a)| (Socket::Udp(s), a)),
    }
}
