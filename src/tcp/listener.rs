//! Binding TCP listeners and accepting from them.
//!
//! A listener is bound on the caller's thread so that a bad address fails `Proxy::start` with
//! the address and the OS reason, before any worker runs. Accepting never blocks and never
//! spins: out of descriptors (`EMFILE`/`ENFILE`) is reported as [`Accept::OutOfFds`] and the
//! worker backs off on its timer wheel, leaving clients in the kernel backlog.

use std::io;
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};

use crate::config::Proto;
use crate::part::{self, BindError, Sharing};

/// Pending connections the kernel may hold for one listener (capped by `somaxconn`).
const BACKLOG: i32 = 1024;

/// A listening socket on `addr`, and the address it got (a port 0 shows the port chosen).
pub fn bind(addr: SocketAddr, sharing: Sharing) -> Result<(TcpListener, SocketAddr), BindError> {
    let fail = |error| BindError {
        proto: Proto::Tcp,
        addr,
        error,
    };
    let socket = part::bind(Proto::Tcp, addr, sharing, &|socket| {
        // A restarted proxy must be able to bind while old connections sit in TIME_WAIT; for
        // TCP this never lets two listeners share a port.
        socket.set_reuse_address(true)?;
        // Accepted sockets inherit it on Linux, which saves a setsockopt per client.
        socket.set_tcp_nodelay(true)
    })?;
    socket.listen(BACKLOG).map_err(fail)?;
    let listener = TcpListener::from_std(socket.into());
    let local = listener.local_addr().map_err(fail)?;
    Ok((listener, local))
}

/// The outcome of one accept call.
pub enum Accept {
    Client(TcpStream, SocketAddr),
    /// Nothing more to accept until the next readiness event.
    Drained,
    /// The process or system is out of file descriptors.
    OutOfFds(io::Error),
    /// A client gave up before we accepted it, or a similar per-connection failure.
    Skipped(io::Error),
}

pub fn accept(listener: &TcpListener) -> Accept {
    match crate::reactor::retry(|| listener.accept()) {
        Ok(Some((stream, addr))) => Accept::Client(stream, addr),
        Ok(None) => Accept::Drained,
        Err(e) if is_fd_exhaustion(&e) => Accept::OutOfFds(e),
        Err(e) => Accept::Skipped(e),
    }
}

/// The process or the system ran out of descriptors or socket memory.
pub fn is_fd_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn accepted_sockets_have_nodelay_from_the_listener() {
        let (listener, addr) =
            bind("127.0.0.1:0".parse().expect("address"), Sharing::Alone).expect("bind");
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let stream = loop {
            match accept(&listener) {
                Accept::Client(stream, _) => break stream,
                Accept::Drained if std::time::Instant::now() < deadline => std::thread::yield_now(),
                _ => panic!("no client accepted"),
            }
        };
        assert!(stream.nodelay().expect("getsockopt"));
    }
}
