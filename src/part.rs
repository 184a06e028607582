//! What a worker lends each of its parts (the TCP proxy, the UDP proxy, the health probes) for one
//! call: the poll's registry, the timer wheel, the upstream groups, the metrics and the clock.
//!
//! The parts own their sockets and state machines; everything they share lives in the worker and
//! reaches them only through a `Ctx`, so no part holds a reference into another. An [`Origin`] is
//! what a pair or session keeps of the listener that took it, so a reload that changes or
//! removes the listener leaves connections in flight as they were.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::acl::Acl;
use crate::config::{Listen, Proto};
use crate::limit::{PerIp, Policy};
use crate::metrics::{ListenerStats, Metrics};
use crate::reactor::timer::TimerWheel;
use crate::reactor::Timer;
use crate::upstream::Group;

pub struct Ctx<'a> {
    pub registry: &'a mio::Registry,
    pub timers: &'a mut TimerWheel<Timer>,
    /// The worker's groups, by `UpstreamId` (`upstreams.get_mut(id.0)`; a miss is handled).
    pub upstreams: &'a mut [Group],
    pub metrics: &'a Metrics,
    pub now: Instant,
    pub access_log: bool,
    /// The worker's per-client table (connections at once, connection rates).
    pub per_ip: &'a mut PerIp,
}

/// One listener as the running config has it, shared by every worker and held by each pair and
/// session it accepted: the settings it was accepted under, the bound address (a configured port
/// 0 shows the port chosen) and the listener's counters.
#[derive(Debug)]
pub struct Origin {
    pub conf: Listen,
    pub addr: SocketAddr,
    pub stats: Arc<ListenerStats>,
    /// The access rules, compiled.
    pub acl: Acl,
    /// What the listener allows each client.
    pub per_ip: Policy,
    /// Names the listener in the per-client table, the same across reloads (its protocol and
    /// bound address), so a kept listener's clients keep their counts.
    pub tag: u64,
}

impl Origin {
    pub fn new(conf: Listen, addr: SocketAddr, stats: Arc<ListenerStats>) -> Origin {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        // The bound address: stable across reloads (a kept listener keeps it) and distinct for
        // two listeners whose configured port is 0.
        (conf.proto, addr).hash(&mut h);
        let per_ip = Policy {
            max_per_ip: match conf.proto {
                Proto::Tcp => conf.max_connections_per_ip,
                Proto::Udp => conf.max_sessions_per_ip,
            },
            rate: conf.rate_per_ip,
        };
        Origin {
            acl: Acl::new(conf.access.clone()),
            per_ip,
            tag: h.finish(),
            conf,
            addr,
            stats,
        }
    }

    /// Whether `conf` is the same listener (same protocol and configured address): a reload keeps
    /// its socket.
    pub fn same_listener(&self, conf: &Listen) -> bool {
        self.conf.proto == conf.proto && self.conf.addr == conf.addr
    }

    /// What `same_listener` compares, to look listeners up in a map (a reload of thousands of
    /// listeners, a port range, must not compare every pair).
    pub fn identity(conf: &Listen) -> (Proto, SocketAddr) {
        (conf.proto, conf.addr)
    }

    /// The origins by identity.
    pub fn by_identity(origins: &[Arc<Origin>]) -> HashMap<(Proto, SocketAddr), &Arc<Origin>> {
        // The first of two with one identity (two port-0 listeners on one address), as a scan
        // in config order would find.
        let mut map = HashMap::with_capacity(origins.len());
        for o in origins {
            map.entry(Origin::identity(&o.conf)).or_insert(o);
        }
        map
    }
}

/// A free slot in a part's table of listeners (their slot is their token): the first empty one
/// from `*hint` on (no slot below it is free), else a new one at the end. The part lowers the
/// hint when it frees a slot, so thousands of listeners (a port range) start in linear time.
pub fn free_slot<T>(table: &mut Vec<Option<T>>, hint: &mut usize) -> usize {
    let from = (*hint).min(table.len());
    let slot = match table.iter().skip(from).position(Option::is_none) {
        Some(free) => from + free,
        None => {
            table.push(None);
            table.len() - 1
        }
    };
    *hint = slot + 1;
    slot
}

/// A listener that could not be bound: names the protocol, the address and the OS reason.
#[derive(Debug)]
pub struct BindError {
    pub proto: Proto,
    pub addr: SocketAddr,
    pub error: io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot listen on {}{}: {}",
            match self.proto {
                Proto::Tcp => "",
                Proto::Udp => "udp ",
            },
            self.addr,
            crate::sys::io_reason(&self.error)
        )
    }
}

impl std::error::Error for BindError {}

/// Whether a listening socket shares its port with the other workers' (`SO_REUSEPORT`, the
/// kernel spreading connections and UDP flows between them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// One worker: the port is this socket's alone.
    Alone,
    /// The first of several workers: it checks that no other process holds the port (a bind
    /// without `SO_REUSEPORT`, released at once) before it binds with it.
    First,
    /// Another worker, binding the address the first one got.
    Another,
}

/// Port 0 for sockets that will share their port: the kernel may hand a UDP `SO_REUSEPORT`
/// socket a port another such socket of the same user already has (they count as compatible),
/// and the two would then split each other's datagrams. A port is picked by a socket without
/// the option (which no holder is compatible with), released, and bound with it; a port taken
/// in that moment is tried again with another.
fn bind_fresh_port(
    proto: Proto,
    addr: SocketAddr,
    prepare: &dyn Fn(&socket2::Socket) -> io::Result<()>,
) -> Result<socket2::Socket, BindError> {
    let mut last = None;
    for _ in 0..8 {
        let probe = bind(proto, addr, Sharing::Alone, prepare)?;
        let picked = probe
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| BindError {
                proto,
                addr,
                error: io::Error::other("no local address"),
            })?;
        drop(probe);
        match bind(proto, picked, Sharing::Another, prepare) {
            Ok(socket) => return Ok(socket),
            Err(e) if e.error.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(BindError { addr, ..e }),
        }
    }
    Err(last.map_or_else(
        || BindError {
            proto,
            addr,
            error: io::ErrorKind::AddrInUse.into(),
        },
        |e| BindError { addr, ..e },
    ))
}

/// Binds a listening socket of either protocol with the options sluice always wants: IPv6
/// sockets only for IPv6 (`[::]:P` and `0.0.0.0:P` are separate listeners, as in nginx),
/// non-blocking. `prepare` sets the protocol's own options before `bind`.
pub fn bind(
    proto: Proto,
    addr: SocketAddr,
    sharing: Sharing,
    prepare: &dyn Fn(&socket2::Socket) -> io::Result<()>,
) -> Result<socket2::Socket, BindError> {
    if sharing == Sharing::First && addr.port() == 0 {
        return bind_fresh_port(proto, addr, prepare);
    }
    if sharing == Sharing::First {
        // SO_REUSEPORT would let this bind succeed beside another process of the same user
        // holding the port (and share its traffic): find that out first.
        drop(bind(proto, addr, Sharing::Alone, prepare)?);
    }
    let fail = |error| BindError { proto, addr, error };
    let (kind, protocol) = match proto {
        Proto::Tcp => (socket2::Type::STREAM, socket2::Protocol::TCP),
        Proto::Udp => (socket2::Type::DGRAM, socket2::Protocol::UDP),
    };
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), kind, Some(protocol))
        .map_err(fail)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(fail)?;
    }
    prepare(&socket).map_err(fail)?;
    if sharing != Sharing::Alone {
        socket.set_reuse_port(true).map_err(fail)?;
    }
    socket.set_nonblocking(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    Ok(socket)
}
