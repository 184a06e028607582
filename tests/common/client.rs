//! TCP clients of the proxy: a connect whose reads and writes time out, echo round trips,
//! waits for a close or for silence, and the name-fetching clients for backends that say who
//! they are (see `Backend::greet`).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{is_timeout, EVENTUALLY};

/// A client connection with timeouts, so that no read or write waits forever.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the proxy");
    s.set_read_timeout(Some(EVENTUALLY)).expect("read timeout");
    s.set_write_timeout(Some(EVENTUALLY))
        .expect("write timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// A client connection from loopback address `from` (any port), with timeouts.
pub fn connect_from(from: std::net::IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(to);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(EVENTUALLY))?;
    s.set_write_timeout(Some(EVENTUALLY))?;
    Ok(s)
}

/// Writes `msg` and reads the same bytes back.
pub fn round_trip(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(io::Error::other("the echo differs"));
    }
    Ok(())
}

/// Reads exactly `len` bytes.
pub fn read_exactly(s: &mut TcpStream, len: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    s.read_exact(&mut v)?;
    Ok(v)
}

/// Waits at most `within` for the connection to close (a read returns 0 or fails),
/// discarding data; returns how long that took, or `None` if it stayed open.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let deadline = start + within;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).ok()?;
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
}

/// Connects to a listener that may refuse the client at once, and reads until it is closed;
/// how long that took. A refusal is a reset, and the reset can beat the client's own connect
/// to its end (the kernel completed the handshake before sluice accepted): that counts as
/// closed at once. `None` if it was not closed within `within`.
pub fn refused_within(addr: SocketAddr, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    match TcpStream::connect_timeout(&addr, within) {
        Ok(mut s) => closed_within(&mut s, within).map(|_| start.elapsed()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Some(start.elapsed()),
        Err(e) => panic!("connect to the proxy: {e}"),
    }
}

/// Reads (discarding) until the stream ends: `Ok(())` for an EOF, else the error's kind, so a
/// test can tell a reset from a clean close.
pub fn how_it_ends(s: &mut TcpStream) -> Result<(), io::ErrorKind> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.kind()),
        }
    }
}

/// Whether `within` passes without any byte or close arriving on `s`.
pub fn silent_for(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1];
    s.set_read_timeout(Some(within)).expect("read timeout");
    let silent = matches!(s.read(&mut buf), Err(e) if is_timeout(&e));
    s.set_read_timeout(Some(EVENTUALLY)).expect("read timeout");
    silent
}

/// One whole connection through the proxy: sends `hello`, finishes the write side, reads to the
/// end and returns the first line (the backend's name). When this returns, the proxy has closed
/// the pair (the server's end of stream is forwarded only after the client's).
pub fn fetch_name_with(addr: SocketAddr, hello: &[u8]) -> io::Result<String> {
    let mut stream = connect(addr);
    stream.write_all(hello)?;
    stream.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    match text.lines().next() {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("closed without a name (got {out:?})"),
        )),
    }
}

/// `fetch_name_with` sending nothing.
pub fn fetch_name(addr: SocketAddr) -> io::Result<String> {
    fetch_name_with(addr, b"")
}

/// A connection kept open through the proxy, after its backend said its name.
pub struct Held {
    pub name: String,
    stream: TcpStream,
}

/// Opens a connection and reads the greeting line (a `Backend::greet_echo` keeps it open).
pub fn hold(addr: SocketAddr) -> io::Result<Held> {
    let stream = connect(addr);
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match (&stream).read(&mut byte)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the name",
                ))
            }
            _ => line.push(byte[0]),
        }
        if line.len() > 256 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no newline"));
        }
    }
    let name = String::from_utf8_lossy(&line).trim_end().to_string();
    Ok(Held { name, stream })
}

impl Held {
    /// Sends `msg` and reads it back (a `Backend::greet_echo` echoes after its name).
    pub fn round_trip(&mut self, msg: &[u8]) -> io::Result<()> {
        round_trip(&mut self.stream, msg)
    }

    /// Finishes the connection cleanly: write side shut, read to the end. On return the proxy
    /// has closed the pair and released the server.
    pub fn finish(mut self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest)?;
        Ok(())
    }
}
