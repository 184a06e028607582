//! What needs the whole file: `proxy` targets (named upstreams, forward references and the
//! implicit upstreams of `proxy ADDR;`), the default `next_upstream_tries`, `buffer_memory`
//! against `buffer_size`, proxy loops, and the address forms with name resolution.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use super::values::suggest;
use super::{Arg, Parser, PendingListen};
use crate::config::addr::{self, HostPort};
use crate::config::{Balance, Config, ConfigError, Proto, Server, Upstream, UpstreamId};

impl Parser<'_> {
    /// Settles what needs the whole file: `proxy` targets, tries, `buffer_memory`.
    pub(super) fn finish(mut self) -> Result<Config, ConfigError> {
        if let Some(arg) = &self.buffer_memory {
            if self.config.buffer_memory < self.config.buffer_size {
                return Err(self.err_at(
                    arg,
                    format!(
                        "buffer_memory '{}' must be at least buffer_size ({} bytes)",
                        arg.text, self.config.buffer_size
                    ),
                ));
            }
        }
        let explicit = self.config.upstreams.len();
        let pending = std::mem::take(&mut self.listeners);
        let own = OwnAddresses::new(&pending);
        for pending in pending {
            let upstream = self.proxy_target(&pending.proxy, explicit)?;
            let servers = self
                .config
                .upstreams
                .get(upstream)
                .map_or(1, |u| u.servers.len());
            self.no_loop(&pending, upstream, &own)?;
            // Routes get the checks `proxy` gets; the default number of tries is enough for
            // the largest upstream a client may be routed to.
            let mut most = servers;
            let mut routes = Vec::with_capacity(pending.sni.len());
            for (name, target) in &pending.sni {
                let id = self.proxy_target(target, explicit)?;
                self.no_loop(&pending, id, &own)?;
                most = most.max(self.config.upstreams.get(id).map_or(1, |u| u.servers.len()));
                routes.push((name.clone(), UpstreamId(id)));
            }
            let sni_default = match &pending.sni_default {
                Some(target) => {
                    let id = self.proxy_target(target, explicit)?;
                    self.no_loop(&pending, id, &own)?;
                    Some(UpstreamId(id))
                }
                None => None,
            };
            let used = std::iter::once(upstream)
                .chain(routes.iter().map(|(_, u)| u.0))
                .chain(sni_default.map(|u| u.0));
            for id in used {
                self.no_spares_for_headers(&pending, id)?;
            }
            let mut listen = pending.listen;
            listen.upstream = UpstreamId(upstream);
            listen.sni_routes = routes;
            listen.sni_default = sni_default;
            if listen.access.is_empty() {
                listen.access = self.config.access.clone();
            }
            listen.tries_written = matches!(pending.tries, Some(n) if n > 0);
            listen.next_upstream_tries = match pending.tries {
                Some(n) if n > 0 => n,
                _ => u32::try_from(most.max(1)).unwrap_or(u32::MAX),
            };
            self.config.listeners.push(listen);
        }
        Ok(self.config)
    }

    /// Adds an upstream; returns its index.
    pub(super) fn add_upstream(&mut self, upstream: Upstream) -> usize {
        let index = self.config.upstreams.len();
        self.upstream_names.insert(upstream.name.clone(), index);
        self.config.upstreams.push(upstream);
        index
    }

    /// A spare is opened before its client is known, so it cannot start with a PROXY header
    /// naming that client: `pool` and a header for any of the upstream's servers are refused.
    fn no_spares_for_headers(
        &self,
        pending: &PendingListen,
        upstream: usize,
    ) -> Result<(), ConfigError> {
        let Some(u) = self.config.upstreams.get(upstream) else {
            return Ok(());
        };
        let Some(&(line, col)) = self.pool_lines.get(&u.name) else {
            return Ok(());
        };
        if pending.listen.proto == Proto::Udp {
            return Err(ConfigError::new(
                self.file,
                line,
                col,
                format!(
                    "'pool' keeps TCP connections: udp listener {} (line {}) uses upstream '{}'",
                    pending.listen.addr, pending.line, u.name
                ),
            ));
        }
        let sends = |s: &crate::config::Server| {
            s.proxy_protocol
                .unwrap_or(pending.listen.proxy_protocol)
                .is_some()
        };
        if !u.servers.iter().any(sends) {
            return Ok(());
        }
        Err(ConfigError::new(
            self.file,
            line,
            col,
            format!(
                "'pool' cannot go with proxy_protocol: listener {} (line {}) sends upstream '{}' \
                 a PROXY header, and a spare is connected before its client is known",
                pending.listen.addr, pending.line, u.name
            ),
        ))
    }

    /// A listener whose upstream includes one of sluice's own listen addresses would feed its
    /// own connections back to itself until descriptors or CPU run out.
    fn no_loop(
        &self,
        pending: &PendingListen,
        upstream: usize,
        own: &OwnAddresses,
    ) -> Result<(), ConfigError> {
        let proto = pending.listen.proto;
        let Some(u) = self.config.upstreams.get(upstream) else {
            return Ok(());
        };
        for server in &u.servers {
            if let Some((addr, line)) = own.reached_by(proto, server.addr) {
                return Err(self.err_at(
                    &pending.proxy,
                    format!(
                        "proxy loop: upstream '{}' includes {}, which is sluice's own listen {} {addr} (line {line})",
                        u.name,
                        server.addr,
                        proto.as_str()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The index of the upstream `proxy ARG;` names. An argument with a ':' that names no
    /// upstream is an address: it gets an implicit upstream named after its text, shared by every
    /// listener that writes the same text.
    fn proxy_target(&mut self, arg: &Arg, explicit: usize) -> Result<usize, ConfigError> {
        if let Some(&index) = self.upstream_names.get(&arg.text) {
            return Ok(index);
        }
        if arg.text.contains(':') {
            let addr = self.host_port(arg, "proxy address")?;
            let addrs = self.resolve_addr(addr, arg, "proxy address")?;
            return Ok(self.add_upstream(Upstream {
                name: arg.text.clone(),
                balance: Balance::RoundRobin,
                servers: addrs.into_iter().map(Server::new).collect(),
                health_check: None,
                pool: None,
            }));
        }
        let names = self
            .config
            .upstreams
            .iter()
            .take(explicit)
            .map(|u| u.name.as_str());
        let mut message = format!("unknown upstream '{}'", arg.text);
        if let Some(s) = suggest(&arg.text, names) {
            message.push_str(&format!(" (did you mean '{s}'?)"));
        } else if arg.text.parse::<IpAddr>().is_ok() || arg.text == "localhost" {
            message.push_str(&format!(" (an address needs a port: {}:PORT)", arg.text));
        }
        Err(self.err_at(arg, message))
    }

    /// `IP:PORT`, `[IPv6]:PORT`, or `host:PORT` (resolved later); port 0 is an error.
    pub(super) fn host_port<'s>(
        &self,
        arg: &'s Arg,
        what: &str,
    ) -> Result<HostPort<'s>, ConfigError> {
        addr::host_port(&arg.text, what).map_err(|message| self.err_at(arg, message))
    }

    pub(super) fn resolve_addr(
        &self,
        addr: HostPort<'_>,
        arg: &Arg,
        what: &str,
    ) -> Result<Vec<SocketAddr>, ConfigError> {
        let (host, port) = match addr {
            HostPort::Addr(addr) => return Ok(vec![addr]),
            HostPort::Name(host, port) => (host, port),
        };
        let cannot = |why: String| {
            self.err_at(
                arg,
                format!("cannot resolve '{host}' in {what} '{}': {why}", arg.text),
            )
        };
        if self.first_name.get().is_none() {
            self.first_name.set(Some(arg.line));
        }
        let found = (self.resolve)(host, port, &self.config.resolver)
            .map_err(|e| cannot(crate::sys::io_reason(&e)))?;
        let mut addrs: Vec<SocketAddr> = Vec::with_capacity(found.len());
        for addr in found {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(cannot("no addresses".to_string()));
        }
        Ok(addrs)
    }

    /// `IP:PORT`, `[IPv6]:PORT`, `*:PORT` or `PORT` (the last two mean 0.0.0.0:PORT).
    pub(super) fn listen_addr(&self, arg: &Arg) -> Result<SocketAddr, ConfigError> {
        addr::listen_addr(&arg.text).map_err(|message| self.err_at(arg, message))
    }
}

/// The listen addresses of a file by protocol and port, to find a server that is one of them.
struct OwnAddresses {
    listens: HashMap<(Proto, u16), Vec<(SocketAddr, u32)>>,
    /// This host's addresses, which a wildcard listen address takes.
    local: Vec<IpAddr>,
}

impl OwnAddresses {
    fn new(pending: &[PendingListen]) -> OwnAddresses {
        let mut map: HashMap<(Proto, u16), Vec<(SocketAddr, u32)>> = HashMap::new();
        for p in pending.iter().filter(|p| p.listen.addr.port() != 0) {
            map.entry((p.listen.proto, p.listen.addr.port()))
                .or_default()
                .push((p.listen.addr, p.line));
        }
        // Only a wildcard listen address needs the interface list.
        let wildcard = pending.iter().any(|p| p.listen.addr.ip().is_unspecified());
        let local = match wildcard {
            true => crate::sys::local_addresses().unwrap_or_default(),
            false => Vec::new(),
        };
        OwnAddresses {
            listens: map,
            local,
        }
    }

    /// The listen address (and its line) that a connection to `server` would arrive at.
    fn reached_by(&self, proto: Proto, server: SocketAddr) -> Option<(SocketAddr, u32)> {
        let listens = self.listens.get(&(proto, server.port()))?;
        listens
            .iter()
            .copied()
            .find(|(listen, _)| addr::reaches(*listen, server, &self.local))
    }
}
