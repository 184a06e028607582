//! One reading of everything the admin endpoint shows, taken once per request, so that
//! `/metrics`, `/stats` and the page of one moment agree. Counters are read from the shared
//! registry (every worker's work, summed by construction); servers' states come from worker 0's
//! groups, whose verdicts every worker shares.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, Listen, Proto, ServerId, UpstreamId};
use crate::metrics::{AdminState, Denial, ListenerStats, Metrics, ServerShared};
use crate::part::Origin;
use crate::reactor::End;
use crate::upstream::{Availability, Group};

pub struct View {
    pub version: &'static str,
    pub uptime: Duration,
    pub workers: usize,
    pub reloads: u64,
    pub reload_failures: u64,
    pub resolver_lookups: u64,
    pub resolver_failures: u64,
    pub resolver_changes: u64,
    pub resolver_ignored: u64,
    pub connections_active: u64,
    pub max_connections: usize,
    pub buffer_pool_bytes: u64,
    pub pipes_in_use: u64,
    pub spliced_bytes: u64,
    pub splice_fallbacks: u64,
    pub spares_open: u64,
    pub spares_taken: u64,
    pub spares_discarded: u64,
    pub proxy_protocol_errors: u64,
    pub accept_backoffs: u64,
    pub connect_fd_shortages: u64,
    pub buffer_waits: u64,
    pub listeners: Vec<ListenerView>,
    pub upstreams: Vec<UpstreamView>,
}

pub struct ListenerView {
    pub proto: Proto,
    /// The bound address.
    pub addr: SocketAddr,
    pub upstream: String,
    pub conf: Listen,
    pub connections_total: u64,
    pub connections_active: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub udp_sessions_active: u64,
    pub udp_datagrams_up: u64,
    pub udp_datagrams_down: u64,
    pub udp_dropped: u64,
    /// All refused clients.
    pub denied: u64,
    /// By `Denial::ALL`.
    pub denied_by: Vec<(Denial, u64)>,
    /// By `End::ALL`.
    pub ends: Vec<(End, u64)>,
}

impl ListenerView {
    /// The label and JSON name of a listener: its address, `udp:` first for UDP (as in the
    /// access log).
    pub fn name(&self) -> String {
        match self.proto {
            Proto::Tcp => self.addr.to_string(),
            Proto::Udp => format!("udp:{}", self.addr),
        }
    }
}

pub struct UpstreamView {
    pub name: String,
    pub balance: &'static str,
    pub servers: Vec<ServerView>,
}

pub struct ServerView {
    pub addr: SocketAddr,
    pub weight: u32,
    pub backup: bool,
    pub availability: Availability,
    pub reason: String,
    /// The health verdict (checks and passive marks): what `sluice_server_up` reports.
    pub up: bool,
    pub admin: AdminState,
    pub active: u64,
    pub connect_failures: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub shared: Arc<ServerShared>,
}

impl ServerView {
    /// The mean connect time, if any connect succeeded.
    pub fn mean_connect(&self) -> Option<Duration> {
        let count = self.shared.connect_time.cumulative().last().copied()?;
        let n = u32::try_from(count).ok().filter(|&n| n > 0)?;
        Some(self.shared.connect_time.sum() / n)
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

pub struct Sources<'a> {
    pub metrics: &'a Metrics,
    pub config: &'a Config,
    pub origins: &'a [Arc<Origin>],
    pub groups: &'a [Group],
    pub started: Instant,
    pub now: Instant,
}

impl View {
    pub fn read(s: &Sources<'_>) -> View {
        let m = s.metrics;
        let tables = m.tables();
        let listeners = s
            .origins
            .iter()
            .map(|o| listener(o, &o.stats, s.config))
            .collect();
        let upstreams = s
            .config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let group = s.groups.get(i);
                let table = tables.servers(UpstreamId(i));
                // Worker 0's groups follow the same config as `s.config` (both change in one
                // step of its loop); the tables change a little earlier in a reload.
                let shared_of = |j: usize| {
                    group
                        .and_then(|g| g.servers().get(j))
                        .map(|st| &st.shared)
                        .or_else(|| table.get(j))
                };
                UpstreamView {
                    name: u.name.clone(),
                    balance: u.balance.name(),
                    servers: u
                        .servers
                        .iter()
                        .enumerate()
                        .filter_map(|(j, conf)| shared_of(j).map(|shared| (j, conf, shared)))
                        .map(|(j, conf, shared)| {
                            let availability = group
                                .map_or(Availability::Up, |g| g.availability(ServerId(j), s.now));
                            let marked = shared.unavailable_until().is_some_and(|t| s.now < t);
                            ServerView {
                                addr: conf.addr,
                                weight: conf.weight,
                                backup: conf.backup,
                                availability,
                                reason: availability.reason(s.now),
                                up: shared.healthy.load(Ordering::Relaxed) && !marked,
                                admin: shared.admin(),
                                active: get(&shared.active),
                                connect_failures: get(&shared.connect_failures),
                                bytes_up: get(&shared.bytes_up),
                                bytes_down: get(&shared.bytes_down),
                                shared: Arc::clone(shared),
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        View {
            version: env!("CARGO_PKG_VERSION"),
            uptime: s.now.saturating_duration_since(s.started),
            workers: m.workers().len(),
            reloads: get(&m.reloads),
            reload_failures: get(&m.reload_failures),
            resolver_lookups: get(&m.resolver_lookups),
            resolver_failures: get(&m.resolver_failures),
            resolver_changes: get(&m.resolver_changes),
            resolver_ignored: get(&m.resolver_ignored),
            connections_active: get(&m.connections_active),
            max_connections: s.config.max_connections,
            buffer_pool_bytes: m.pool.allocated_bytes.load(Ordering::Relaxed) as u64,
            pipes_in_use: m.pipes_in_use() as u64,
            spliced_bytes: m.spliced_bytes(),
            splice_fallbacks: get(&m.pipes.fallbacks),
            spares_open: m.spares.open.load(Ordering::Relaxed) as u64,
            spares_taken: get(&m.spares.taken),
            spares_discarded: get(&m.spares.discarded),
            proxy_protocol_errors: get(&m.proxy_protocol_errors),
            accept_backoffs: get(&m.accept_backoffs),
            connect_fd_shortages: get(&m.connect_fd_shortages),
            buffer_waits: get(&m.buffer_waits),
            listeners,
            upstreams,
        }
    }
}

fn listener(o: &Origin, l: &ListenerStats, config: &Config) -> ListenerView {
    ListenerView {
        proto: o.conf.proto,
        addr: o.addr,
        upstream: config
            .upstreams
            .get(o.conf.upstream.0)
            .map_or_else(|| "?".to_string(), |u| u.name.clone()),
        conf: o.conf.clone(),
        connections_total: get(&l.connections_total),
        connections_active: get(&l.connections_active),
        bytes_up: get(&l.bytes_up),
        bytes_down: get(&l.bytes_down),
        udp_sessions_active: get(&l.udp_sessions_active),
        udp_datagrams_up: get(&l.udp_datagrams_up),
        udp_datagrams_down: get(&l.udp_datagrams_down),
        udp_dropped: get(&l.udp_dropped),
        denied: l.denied_total(),
        denied_by: Denial::ALL.iter().map(|&d| (d, l.denied(d))).collect(),
        ends: End::ALL.iter().map(|&e| (e, l.ends.get(e))).collect(),
    }
}
