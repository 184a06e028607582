//! The one place where a finished pair or UDP session is settled, and where a failed connect is
//! reported: counters in the metrics registry, the server's connection slot, passive health, and
//! the access log line (info level, target `access`, the `key=value` shape of DESIGN.md §6, so it
//! greps and parses without a schema).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::AccessRule;
use crate::metrics::{Denial, ServerId, UpstreamId};
use crate::part::{Ctx, Origin};
use crate::reactor::End;

pub const TARGET: &str = "access";

/// Everything known about a pair or session at its end.
pub struct Settle<'a> {
    /// The listener that took the pair or session (its counters, its bound address).
    pub origin: &'a Origin,
    pub client: SocketAddr,
    pub upstream: UpstreamId,
    /// The server whose connection slot this held; released here.
    pub held: Option<ServerId>,
    /// The server the access log names: the one held, or else the last one tried.
    pub named: Option<ServerId>,
    /// Client → server and server → client bytes delivered.
    pub bytes: (u64, u64),
    /// UDP only: datagrams each way.
    pub datagrams: Option<(u64, u64)>,
    pub started: Instant,
    pub end: End,
    /// The server name of its TLS ClientHello, on a listener that routes by SNI.
    pub sni: Option<&'a str>,
}

/// Counts the end, gives the server its slot back and writes the access log line.
pub fn settle(ctx: &mut Ctx<'_>, s: &Settle<'_>) {
    ctx.metrics
        .closed(&s.origin.stats, s.end, s.bytes, s.datagrams);
    let access_log = ctx.access_log;
    let now = ctx.now;
    let Some(group) = ctx.upstreams.get_mut(s.upstream.0) else {
        return;
    };
    if let Some(held) = s.held {
        group.release(held);
        if let Some(server) = group.server(held) {
            let shared = &server.shared;
            shared
                .bytes_up
                .fetch_add(s.bytes.0, std::sync::atomic::Ordering::Relaxed);
            shared
                .bytes_down
                .fetch_add(s.bytes.1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    if access_log {
        let extra = s.sni.map(|name| format!(" sni={name}")).unwrap_or_default();
        write(&Entry {
            listen: s.origin.addr,
            client: s.client,
            upstream: &group.name,
            server: s.named.and_then(|id| group.server(id)).map(|x| x.conf.addr),
            up_bytes: s.bytes.0,
            down_bytes: s.bytes.1,
            datagrams: s.datagrams,
            duration: now.saturating_duration_since(s.started),
            end: s.end,
            extra: &extra,
        });
    }
}

/// A UDP client that got no session (no server available): counted and logged, nothing to release.
pub fn refuse(
    ctx: &mut Ctx<'_>,
    origin: &Origin,
    client: SocketAddr,
    upstream: UpstreamId,
    end: End,
) {
    ctx.metrics.refused(&origin.stats, end);
    if !ctx.access_log {
        return;
    }
    if let Some(group) = ctx.upstreams.get_mut(upstream.0) {
        write(&Entry {
            listen: origin.addr,
            client,
            upstream: &group.name,
            server: None,
            up_bytes: 0,
            down_bytes: 0,
            datagrams: Some((0, 0)),
            duration: Duration::ZERO,
            end,
            extra: "",
        });
    }
}

/// A client refused before any server saw it: by an access rule (`end=denied rule="..."`) or a
/// per-client limit (`end=limit limit=...`). Counted always; logged when `log` (a UDP listener
/// refuses datagram by datagram, and logs at most once a second).
pub fn deny(
    ctx: &mut Ctx<'_>,
    origin: &Origin,
    client: SocketAddr,
    why: Denial,
    rule: Option<&AccessRule>,
    log: bool,
) {
    let end = match why {
        Denial::Acl | Denial::UntrustedProxy => End::Denied,
        _ => End::Limit,
    };
    ctx.metrics.deny(&origin.stats, why, end);
    if !ctx.access_log || !log {
        return;
    }
    let extra = match (rule, why) {
        (Some(rule), _) => format!(" rule=\"{rule}\""),
        (None, Denial::UntrustedProxy) => " rule=\"proxy_protocol_trusted\"".to_string(),
        (None, _) => format!(" limit={}", why.as_str()),
    };
    let upstream = ctx
        .upstreams
        .get(origin.conf.upstream.0)
        .map_or("-", |g| g.name.as_str());
    write(&Entry {
        listen: origin.addr,
        client,
        upstream,
        server: None,
        up_bytes: 0,
        down_bytes: 0,
        datagrams: match origin.conf.proto {
            crate::config::Proto::Tcp => None,
            crate::config::Proto::Udp => Some((0, 0)),
        },
        duration: Duration::ZERO,
        end,
        extra: &extra,
    });
}

/// A connect to `server` failed (for UDP: the server refused a datagram): counted, logged, and
/// judged by passive health, which may mark the server unavailable (a warning says so).
pub fn connect_failed(
    ctx: &mut Ctx<'_>,
    upstream: UpstreamId,
    server: ServerId,
    client: SocketAddr,
    cause: &str,
) {
    ctx.metrics
        .connect_failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = ctx.now;
    let Some(group) = ctx.upstreams.get_mut(upstream.0) else {
        return;
    };
    let Some((addr, fail_timeout)) = group
        .server(server)
        .map(|s| (s.conf.addr, s.conf.fail_timeout))
    else {
        return;
    };
    log::info!(
        "upstream {}: connect to {} failed: {} (client {})",
        group.name,
        addr,
        cause,
        client
    );
    if group.connect_failed(server, now) {
        log::warn!(
            "upstream {}: server {} marked unavailable for {} ms after failed connects",
            group.name,
            addr,
            fail_timeout.as_millis()
        );
    }
}

struct Entry<'a> {
    listen: SocketAddr,
    client: SocketAddr,
    upstream: &'a str,
    server: Option<SocketAddr>,
    up_bytes: u64,
    down_bytes: u64,
    datagrams: Option<(u64, u64)>,
    duration: Duration,
    end: End,
    /// Appended as is: ` rule="..."` or ` limit=...` for refused clients.
    extra: &'a str,
}

fn write(entry: &Entry<'_>) {
    if !log::log_enabled!(target: TARGET, log::Level::Info) {
        return;
    }
    let server = Server(entry.server);
    match entry.datagrams {
        None => log::info!(
            target: TARGET,
            "listen={} client={} upstream={} server={} up_bytes={} down_bytes={} duration_ms={} end={}{}",
            entry.listen,
            entry.client,
            entry.upstream,
            server,
            entry.up_bytes,
            entry.down_bytes,
            entry.duration.as_millis(),
            entry.end.as_str(),
            entry.extra
        ),
        Some((up, down)) => log::info!(
            target: TARGET,
            "listen=udp:{} client={} upstream={} server={} up_datagrams={} down_datagrams={} up_bytes={} down_bytes={} duration_ms={} end={}{}",
            entry.listen,
            entry.client,
            entry.upstream,
            server,
            up,
            down,
            entry.up_bytes,
            entry.down_bytes,
            entry.duration.as_millis(),
            entry.end.as_str(),
            entry.extra
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
