//! Name resolution without the C library: `/etc/hosts` first, then a stub resolver that asks
//! the nameservers of `resolver` (or of `/etc/resolv.conf`) for A and AAAA records itself.
//! `getaddrinfo` is never called: it blocks, and a static binary has no NSS modules to load.
//!
//! [`resolve`] runs one lookup to its end on a poll of its own, for the config loader (which
//! may block). The runtime's resolver thread drives [`Lookups`] on its reactor instead. Names
//! are looked up as written, with no search domains: a config names full names.

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

/// The nameservers `resolver` names, or else those of `/etc/resolv.conf`, or else, as the C
/// library does when there are none, a local one.
pub fn nameservers(conf: &Resolver) -> Vec<SocketAddr> {
    if !conf.nameservers.is_empty() {
        return conf.nameservers.clone();
    }
    let text = std::fs::read_to_string(RESOLV_CONF).unwrap_or_default();
    let found = files::nameservers(&text);
    if found.is_empty() {
        return vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 53))];
    }
    found
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
    let servers = nameservers(conf);
    let mut poll = mio::Poll::new().map_err(|e| crate::sys::io_reason(&e))?;
    let mut events = mio::Events::with_capacity(8);
    let mut lookups = Lookups::new(0);
    lookups.start(poll.registry(), name, &servers, Instant::now());
    loop {
        if let Some(done) = lookups.take_finished() {
            return done.result;
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
