//! UDP sockets: the listening socket of a `listen udp`, and the connected socket a session
//! uses to talk to its server.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use crate::config::Proto;
use crate::part::{self, BindError, Sharing};

/// Receive buffer asked for on listening sockets: a burst from many clients waits here while
/// the worker is busy (the kernel caps it at `net.core.rmem_max`).
const LISTEN_RCVBUF: usize = 4 << 20;

/// Binds a listening socket. No `SO_REUSEADDR`: for UDP it would let a second process bind the
/// same port and take its datagrams. On a wildcard address the kernel is asked for each
/// datagram's destination, so replies can leave from the address the client sent to.
pub fn bind(addr: SocketAddr, sharing: Sharing) -> Result<(UdpSocket, SocketAddr), BindError> {
    let socket = part::bind(Proto::Udp, addr, sharing, &|socket| {
        if addr.ip().is_unspecified() {
            crate::sys::report_datagram_destination(socket, addr.is_ipv6())?;
        }
        // Best effort: a smaller buffer only means earlier drops under bursts.
        let _ = socket.set_recv_buffer_size(LISTEN_RCVBUF);
        Ok(())
    })?;
    let socket = UdpSocket::from_std(socket.into());
    let local = socket.local_addr().map_err(|error| BindError {
        proto: Proto::Udp,
        addr,
        error,
    })?;
    Ok((socket, local))
}

/// A socket on an ephemeral port connected to `server`, registered readable under `token`.
/// Being connected, it receives only the server's datagrams and reports its ICMP refusals.
pub fn connect(server: SocketAddr, registry: &Registry, token: Token) -> io::Result<UdpSocket> {
    let any: IpAddr = match server {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let mut socket = UdpSocket::bind(SocketAddr::new(any, 0))?;
    socket.connect(server)?;
    registry.register(&mut socket, token, Interest::READABLE)?;
    Ok(socket)
}
