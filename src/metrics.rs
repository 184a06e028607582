//! The registry of counters: a process table, a listener table and a server table of atomics.
//!
//! Workers write, anything may read: `Proxy::stats()`, tests, and later the admin endpoint. Every
//! counter is a relaxed atomic (a plain tally, read for reporting), so updating one never takes a
//! lock. The tables are built once from the config, in config order; a listener and a server are
//! reached through their id, and a lookup that misses returns `None`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, Proto};
use crate::reactor::End;

pub use crate::config::{ListenerId, ServerId, UpstreamId};

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn sub(counter: &AtomicU64, n: u64) {
    // Saturating: a counter that another path already brought to 0 stays there.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Connections and sessions that ended, by `end=`.
#[derive(Debug, Default)]
pub struct Ends([AtomicU64; End::ALL.len()]);

impl Ends {
    pub fn count(&self, end: End) {
        if let Some(c) = self.0.get(end.index()) {
            add(c, 1);
        }
    }

    pub fn get(&self, end: End) -> u64 {
        self.0.get(end.index()).map_or(0, get)
    }
}

/// The buffer pool's counters.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Buffers currently lent out.
    pub in_use: AtomicUsize,
    /// Most buffers lent out at once since start.
    pub peak: AtomicUsize,
    /// Bytes allocated by the pool (lent and cached).
    pub allocated_bytes: AtomicUsize,
}

/// One listener's counters.
#[derive(Debug)]
pub struct ListenerStats {
    pub proto: Proto,
    /// The address as configured (port 0 stays 0 here).
    pub addr: SocketAddr,
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    /// Client → server bytes, counted when a connection or session ends.
    pub bytes_up: AtomicU64,
    /// Server → client bytes, counted when a connection or session ends.
    pub bytes_down: AtomicU64,
    pub udp_sessions_active: AtomicU64,
    pub udp_datagrams_up: AtomicU64,
    pub udp_datagrams_down: AtomicU64,
    /// Datagrams dropped because a socket's send buffer was full.
    pub udp_dropped: AtomicU64,
    pub ends: Ends,
}

impl ListenerStats {
    fn new(proto: Proto, addr: SocketAddr) -> ListenerStats {
        ListenerStats {
            proto,
            addr,
            connections_total: AtomicU64::new(0),
            connections_active: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            udp_sessions_active: AtomicU64::new(0),
            udp_datagrams_up: AtomicU64::new(0),
            udp_datagrams_down: AtomicU64::new(0),
            udp_dropped: AtomicU64::new(0),
            ends: Ends::default(),
        }
    }
}

/// What an operator set for a server: `Drain` takes no new connections while the open ones go
/// on, `Down` is never picked. Health checks and passive health still apply under `Up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    Up,
    Drain,
    Down,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Up => "up",
            AdminState::Drain => "drain",
            AdminState::Down => "down",
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            AdminState::Up => 0,
            AdminState::Drain => 1,
            AdminState::Down => 2,
        }
    }

    fn from_u8(v: u8) -> AdminState {
        match v {
            1 => AdminState::Drain,
            2 => AdminState::Down,
            _ => AdminState::Up,
        }
    }
}

/// State of one server that every worker (and the admin endpoint) may read. The worker that
/// changes a server writes here; balancing reads its own per-worker copy, so picks take no
/// atomic read-modify-write.
#[derive(Debug)]
pub struct ServerShared {
    pub upstream: String,
    pub addr: SocketAddr,
    /// The active health checks' verdict (true while no checks run).
    pub healthy: AtomicBool,
    /// Passive health has marked the server unavailable for now.
    pub marked: AtomicBool,
    /// Failed connects counted in the current passive-health window, by every worker.
    pub fails: AtomicU64,
    /// When the current window opened, in microseconds after the epoch (0: no window).
    window_start_us: AtomicU64,
    /// When the passive mark ends, in microseconds after the epoch (0: no mark).
    unavailable_until_us: AtomicU64,
    admin: AtomicU8,
    /// Connections (or UDP sessions) open to the server.
    pub active: AtomicU64,
    /// Failed connects (or UDP refusals) since start.
    pub connect_failures: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

impl ServerShared {
    pub fn new(upstream: &str, addr: SocketAddr) -> ServerShared {
        ServerShared {
            upstream: upstream.to_string(),
            addr,
            healthy: AtomicBool::new(true),
            marked: AtomicBool::new(false),
            fails: AtomicU64::new(0),
            window_start_us: AtomicU64::new(0),
            unavailable_until_us: AtomicU64::new(0),
            admin: AtomicU8::new(AdminState::Up.to_u8()),
            active: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
        }
    }
}

impl ServerShared {
    pub fn admin(&self) -> AdminState {
        AdminState::from_u8(self.admin.load(Ordering::Relaxed))
    }

    pub fn set_admin(&self, state: AdminState) {
        self.admin.store(state.to_u8(), Ordering::Relaxed);
    }

    /// When the last passive-health mark ends (or ended).
    pub fn unavailable_until(&self) -> Option<Instant> {
        self.instant(&self.unavailable_until_us)
    }

    pub fn set_unavailable_until(&self, until: Option<Instant>) {
        self.store_instant(&self.unavailable_until_us, until);
    }

    /// When the current passive-health window opened.
    pub fn window_start(&self) -> Option<Instant> {
        self.instant(&self.window_start_us)
    }

    pub fn set_window_start(&self, start: Option<Instant>) {
        self.store_instant(&self.window_start_us, start);
    }

    fn instant(&self, at: &AtomicU64) -> Option<Instant> {
        match at.load(Ordering::Relaxed) {
            0 => None,
            us => epoch().checked_add(Duration::from_micros(us)),
        }
    }

    /// Instants as microseconds after the process's epoch, at least 1 (0 means none): an
    /// atomic holds them, so any worker can read what another wrote.
    fn store_instant(&self, at: &AtomicU64, when: Option<Instant>) {
        let us = when.map_or(0, |t| {
            let us = t.saturating_duration_since(epoch()).as_micros();
            u64::try_from(us).unwrap_or(u64::MAX).max(1)
        });
        at.store(us, Ordering::Relaxed);
    }
}

/// The origin of the instants the shared state stores: a little before the first use, so that
/// instants taken just before it (a test's clock, a worker that started first) still fit.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        [3600, 60, 1]
            .iter()
            .find_map(|&s| now.checked_sub(Duration::from_secs(s)))
            .unwrap_or(now)
    })
}

/// What every worker's copy of one upstream group watches: a count of changes to its servers'
/// health and passive marks. A group that sees it move reads its servers' shared state again,
/// so a verdict reached in one worker reaches the balancers of all.
#[derive(Debug, Default)]
pub struct UpstreamShared {
    pub changes: AtomicU64,
}

/// One worker's share of the work.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// TCP clients this worker accepted.
    pub connections_total: AtomicU64,
}

/// The whole registry: process-wide counters (fields), and the listener and server tables.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    /// Bytes delivered client → server, counted when a connection or session ends.
    pub bytes_up: AtomicU64,
    /// Bytes delivered server → client, counted when a connection or session ends.
    pub bytes_down: AtomicU64,
    pub connect_failures: AtomicU64,
    /// How often accepting paused for lack of file descriptors.
    pub accept_backoffs: AtomicU64,
    /// Polls that found events while `busy_poll` kept the worker awake: sleeps it saved.
    pub busy_poll_hits: AtomicU64,
    pub udp_sessions_total: AtomicU64,
    pub udp_sessions_active: AtomicU64,
    pub udp_datagrams_up: AtomicU64,
    pub udp_datagrams_down: AtomicU64,
    /// Datagrams dropped because a socket's send buffer was full.
    pub udp_dropped: AtomicU64,
    pub pool: Arc<PoolStats>,
    ends: Ends,
    listeners: Vec<ListenerStats>,
    /// By upstream, then by server.
    servers: Vec<Vec<Arc<ServerShared>>>,
    /// By upstream.
    upstreams: Vec<Arc<UpstreamShared>>,
    /// By worker.
    workers: Vec<WorkerStats>,
}

impl Metrics {
    /// Tables for every listener and every server of `config`, all counters at 0.
    pub fn for_config(config: &Config) -> Metrics {
        Metrics {
            listeners: config
                .listeners
                .iter()
                .map(|l| ListenerStats::new(l.proto, l.addr))
                .collect(),
            servers: config
                .upstreams
                .iter()
                .map(|u| {
                    u.servers
                        .iter()
                        .map(|s| Arc::new(ServerShared::new(&u.name, s.addr)))
                        .collect()
                })
                .collect(),
            upstreams: config
                .upstreams
                .iter()
                .map(|_| Arc::new(UpstreamShared::default()))
                .collect(),
            workers: (0..config.workers.max(1))
                .map(|_| WorkerStats::default())
                .collect(),
            ..Metrics::default()
        }
    }

    /// What the groups of upstream `id` in every worker share.
    pub fn upstream(&self, id: UpstreamId) -> Arc<UpstreamShared> {
        self.upstreams.get(id.0).cloned().unwrap_or_default()
    }

    pub fn listener(&self, id: ListenerId) -> Option<&ListenerStats> {
        self.listeners.get(id.0)
    }

    pub fn listeners(&self) -> &[ListenerStats] {
        &self.listeners
    }

    /// Each worker's counters, by worker number.
    pub fn workers(&self) -> &[WorkerStats] {
        &self.workers
    }

    /// The shared state of every server of upstream `id`, in config order.
    pub fn servers(&self, id: UpstreamId) -> &[Arc<ServerShared>] {
        self.servers.get(id.0).map_or(&[], Vec::as_slice)
    }

    pub fn server(&self, upstream: UpstreamId, server: ServerId) -> Option<&Arc<ServerShared>> {
        self.servers(upstream).get(server.0)
    }

    /// Connections and sessions that finished with `end`.
    pub fn ended(&self, end: End) -> u64 {
        self.ends.get(end)
    }

    pub fn buffers_in_use(&self) -> usize {
        self.pool.in_use.load(Ordering::Relaxed)
    }

    pub fn buffers_peak(&self) -> usize {
        self.pool.peak.load(Ordering::Relaxed)
    }

    // ---- what the parts record ----------------------------------------------------------

    /// Takes one of the process's `max` connection slots before an accept, so that every
    /// worker together keeps `max_connections` (a compare-and-swap, no lock). False at the cap:
    /// the client waits in the kernel backlog.
    pub fn reserve(&self, max: usize) -> bool {
        let max = u64::try_from(max).unwrap_or(u64::MAX);
        self.connections_active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v < max).then_some(v + 1)
            })
            .is_ok()
    }

    /// Gives back a slot that `reserve` took for an accept that brought no client.
    pub fn unreserve(&self) {
        sub(&self.connections_active, 1);
    }

    /// A TCP client was accepted on `listener` by `worker`, in a slot `reserve` took.
    pub fn opened(&self, listener: ListenerId, worker: usize) {
        add(&self.connections_total, 1);
        if let Some(l) = self.listener(listener) {
            add(&l.connections_total, 1);
            add(&l.connections_active, 1);
        }
        if let Some(w) = self.workers.get(worker) {
            add(&w.connections_total, 1);
        }
    }

    /// A UDP session opened on `listener`.
    pub fn session_opened(&self, listener: ListenerId) {
        add(&self.udp_sessions_total, 1);
        add(&self.udp_sessions_active, 1);
        if let Some(l) = self.listener(listener) {
            add(&l.connections_total, 1);
            add(&l.udp_sessions_active, 1);
        }
    }

    /// A connection or session ended; `datagrams` is set for UDP sessions.
    pub fn closed(
        &self,
        listener: ListenerId,
        end: End,
        bytes: (u64, u64),
        datagrams: Option<(u64, u64)>,
    ) {
        let l = self.listener(listener);
        match datagrams {
            None => {
                sub(&self.connections_active, 1);
                if let Some(l) = l {
                    sub(&l.connections_active, 1);
                }
            }
            Some((up, down)) => {
                sub(&self.udp_sessions_active, 1);
                add(&self.udp_datagrams_up, up);
                add(&self.udp_datagrams_down, down);
                if let Some(l) = l {
                    sub(&l.udp_sessions_active, 1);
                    add(&l.udp_datagrams_up, up);
                    add(&l.udp_datagrams_down, down);
                }
            }
        }
        add(&self.bytes_up, bytes.0);
        add(&self.bytes_down, bytes.1);
        self.ends.count(end);
        if let Some(l) = l {
            add(&l.bytes_up, bytes.0);
            add(&l.bytes_down, bytes.1);
            l.ends.count(end);
        }
    }

    /// A client that never got a connection or session (no server, refused): counted by `end`.
    pub fn refused(&self, listener: ListenerId, end: End) {
        self.ends.count(end);
        if let Some(l) = self.listener(listener) {
            l.ends.count(end);
        }
    }

    /// A datagram was dropped on `listener`.
    pub fn dropped(&self, listener: ListenerId) {
        add(&self.udp_dropped, 1);
        if let Some(l) = self.listener(listener) {
            add(&l.udp_dropped, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_follow_the_config_and_count_per_listener() {
        let config = Config::forward(
            Proto::Tcp,
            "127.0.0.1:0".parse().expect("addr"),
            &[
                "127.0.0.1:1".parse().expect("addr"),
                "127.0.0.1:2".parse().expect("addr"),
            ],
            crate::config::Balance::RoundRobin,
        );
        let m = Metrics::for_config(&config);
        assert_eq!(m.listeners().len(), 1);
        assert_eq!(m.servers(UpstreamId(0)).len(), 2);
        assert!(m.server(UpstreamId(0), ServerId(2)).is_none());
        assert!(m.listener(ListenerId(1)).is_none());
        assert!(m.reserve(1));
        assert!(!m.reserve(1), "one slot in all");
        m.opened(ListenerId(0), 0);
        m.closed(ListenerId(0), End::ClientClosed, (3, 4), None);
        m.closed(ListenerId(7), End::Error, (1, 1), None);
        let l = m.listener(ListenerId(0)).expect("listener");
        assert_eq!(get(&l.connections_total), 1);
        assert_eq!(get(&l.connections_active), 0);
        assert_eq!((get(&l.bytes_up), get(&l.bytes_down)), (3, 4));
        assert_eq!(l.ends.get(End::ClientClosed), 1);
        assert_eq!(m.ended(End::Error), 1);
        assert_eq!(get(&m.connections_active), 0, "never below 0");
    }
}
