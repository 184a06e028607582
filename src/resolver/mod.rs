//! Name resolution without the C library: `/etc/hosts` first, then a stub resolver that asks
//! the nameservers of `resolver` (or of `/etc/resolv.conf`) for A and AAAA records itself.
//! `getaddrinfo` is never called: it blocks, and a static binary has no NSS modules to load.
//!
//! [`resolve`] runs one lookup to its end on a poll of its own, for the config loader (which
//! may block). The runtime's resolver thread drives [`Lookups`] on its reactor instead. Names
//! are tried as the C library tries them: with the search domains of `/etc/resolv.conf` by its
//! `ndots`, unless `resolver` names the nameservers, when they are looked up as written.

pub mod files;
pub mod lookup;
pub mod message;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use crate::config::Resolver;
pub use lookup::{Family, Found, Lookups};

pub const HOSTS: &str = "/etc/hosts";
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Where and how to ask: the nameservers, and the names to try for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asking {
    pub servers: Vec<SocketAddr>,
    search: Vec<String>,
    ndots: usize,
}

impl Asking {
    /// With `resolver`, its nameservers and names as written (as nginx does); without it,
    /// `/etc/resolv.conf`: its nameservers (or, as the C library does when there are none, a
    /// local one), its search list and `ndots`.
    pub fn new(conf: &Resolver) -> Asking {
        if !conf.nameservers.is_empty() {
            return Asking {
                servers: conf.nameservers.clone(),
                search: Vec::new(),
                ndots: 1,
            };
        }
        let text = std::fs::read_to_string(RESOLV_CONF).unwrap_or_default();
        let system = files::resolv_conf(&text);
        let mut servers = system.nameservers;
        if servers.is_empty() {
            servers.push(SocketAddr::from((Ipv4Addr::LOCALHOST, 53)));
        }
        Asking {
            servers,
            search: system.search,
            ndots: system.ndots,
        }
    }

    /// The names to look up for `name`, in order (see `files::candidates`).
    pub fn candidates(&self, name: &str) -> Vec<String> {
        files::candidates(name, &self.search, self.ndots)
    }
}

/// What `/etc/hosts` says of `name`. `localhost` is loopback even when the file forgets it.
pub fn from_hosts(name: &str) -> Vec<IpAddr> {
    let text = std::fs::read_to_string(HOSTS).unwrap_or_default();
    let found = files::hosts_lookup(&text, name);
    let bare = name.strip_suffix('.').unwrap_or(name);
    if found.is_empty() && bare.eq_ignore_ascii_case("localhost") {
        return vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
    }
    found
}

/// The addresses of `name`, blocking until the nameservers answer or every attempt is spent.
pub fn lookup_blocking(name: &str, conf: &Resolver) -> Result<Found, String> {
    let local = from_hosts(name);
    if !local.is_empty() {
        return Ok(Found {
            addrs: local,
            ttl: u32::try_from(conf.valid.as_secs()).unwrap_or(u32::MAX),
            unknown: None,
        });
    }
    let asking = Asking::new(conf);
    let mut poll = mio::Poll::new().map_err(|e| crate::sys::io_reason(&e))?;
    let mut events = mio::Events::with_capacity(8);
    let mut lookups = Lookups::new(0);
    let mut candidates = asking.candidates(name).into_iter();
    let first = candidates.next().unwrap_or_else(|| name.to_string());
    lookups.start(poll.registry(), &first, &asking.servers, Instant::now());
    loop {
        if let Some(done) = lookups.take_finished() {
            match (done.result, candidates.next()) {
                (Ok(found), _) => return Ok(found),
                (Err(_), Some(next)) => {
                    lookups.start(poll.registry(), &next, &asking.servers, Instant::now());
                    continue;
                }
                (Err(why), None) => return Err(why),
            }
        }
        let wait = lookups
            .next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, wait) {
            if e.kind() != io::ErrorKind::Interrupted {
                lookups.clear(poll.registry());
                return Err(crate::sys::io_reason(&e));
            }
        }
        let now = Instant::now();
        for event in events.iter() {
            lookups.ready(poll.registry(), event.token(), now);
        }
        lookups.expire(poll.registry(), now);
    }
}

/// `host:port` as socket addresses, for the config loader: an error says why in words.
pub fn resolve(host: &str, port: u16, conf: &Resolver) -> io::Result<Vec<SocketAddr>> {
    match lookup_blocking(host, conf) {
        Ok(found) => Ok(found
            .addrs
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect()),
        Err(why) => Err(io::Error::new(io::ErrorKind::NotFound, why)),
    }
}
