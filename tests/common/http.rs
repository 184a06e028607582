//! A minimal HTTP/1.1 client for the admin endpoint: one request per connection, the answer
//! read to the end (the endpoint always closes).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::IO_TIMEOUT;

/// An answer: status code, headers as written, body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Sends `request` as is (a whole request head, and a body if any) and reads the answer.
pub fn raw(addr: SocketAddr, request: &[u8]) -> io::Result<Answer> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    parse(&out)
}

fn parse(out: &[u8]) -> io::Result<Answer> {
    let text = String::from_utf8_lossy(out).to_string();
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("not HTTP: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok(Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// `GET path`.
pub fn get(addr: SocketAddr, path: &str) -> Answer {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    raw(addr, request.as_bytes()).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// `POST path` with extra header lines (each ending in `\r\n`).
pub fn post(addr: SocketAddr, path: &str, headers: &str) -> Answer {
    let request = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n");
    raw(addr, request.as_bytes()).unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// The value of the sample `name{labels}` in a Prometheus text (labels as written, in order).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
