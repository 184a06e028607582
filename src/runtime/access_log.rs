//! The access log: one `info` line, target `access`, per finished connection or UDP session,
//! in the `key=value` shape of DESIGN.md §6 so that it greps and parses without a schema.

use std::net::SocketAddr;
use std::time::Duration;

use super::End;

pub const TARGET: &str = "access";

pub struct Entry<'a> {
    pub listen: SocketAddr,
    pub client: SocketAddr,
    pub upstream: &'a str,
    pub server: Option<SocketAddr>,
    pub up_bytes: u64,
    pub down_bytes: u64,
    /// UDP only: datagrams each way.
    pub datagrams: Option<(u64, u64)>,
    pub duration: Duration,
    pub end: End,
}

pub fn write(entry: &Entry<'_>) {
    if !log::log_enabled!(target: TARGET, log::Level::Info) {
        return;
    }
    let server = Server(entry.server);
    match entry.datagrams {
        None => log::info!(
            target: TARGET,
            "listen={} client={} upstream={} server={} up_bytes={} down_bytes={} duration_ms={} end={}",
            entry.listen,
            entry.client,
            entry.upstream,
            server,
            entry.up_bytes,
            entry.down_bytes,
            entry.duration.as_millis(),
            entry.end.as_str()
        ),
        Some((up, down)) => log::info!(
            target: TARGET,
            "listen=udp:{} client={} upstream={} server={} up_datagrams={} down_datagrams={} up_bytes={} down_bytes={} duration_ms={} end={}",
            entry.listen,
            entry.client,
            entry.upstream,
            server,
            up,
            down,
            entry.up_bytes,
            entry.down_bytes,
            entry.duration.as_millis(),
            entry.end.as_str()
        ),
    }
}

struct Server(Option<SocketAddr>);

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{}", addr),
            None => f.write_str("-"),
        }
    }
}
