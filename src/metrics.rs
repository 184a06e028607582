//! The registry of counters: a process table, a listener table and a server table of atomics.
//!
//! Workers write, anything may read: `Proxy::stats()`, tests, and later the admin endpoint. Every
//! counter is a relaxed atomic (a plain tally, read for reporting), so updating one never takes a
//! lock. The tables follow the running config, in config order; a listener and a server are
//! reached through their id, and a lookup that misses returns `None`. A reload installs new
//! tables that carry over what stays; pairs and sessions hold their listener's counters
//! themselves, so the data path never reads the tables (nor their lock).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
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

/// Adds one to `counter` if it is below `max` (a compare-and-swap: every worker may race for
/// the last slot, and only one gets it).
fn take_slot(counter: &AtomicU64, max: usize) -> bool {
    let max = u64::try_from(max).unwrap_or(u64::MAX);
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            (v < max).then_some(v + 1)
        })
        .is_ok()
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

/// The kernel pipes the workers splice through (`splice`), all workers together.
#[derive(Debug, Default)]
pub struct PipeStats {
    /// Pipes lent to directions now.
    pub in_use: AtomicUsize,
    /// Most pipes lent at once since start.
    pub peak: AtomicUsize,
    /// Bytes moved from socket to socket through a pipe, never copied to user space.
    pub spliced_bytes: AtomicU64,
    /// Times a direction that would have spliced copied instead: no pipe left under
    /// `max_pipes`, or none could be made.
    pub fallbacks: AtomicU64,
}

/// Pre-connected spares (`pool`), all workers together.
#[derive(Debug, Default)]
pub struct SpareStats {
    /// Spares open now, connecting or ready.
    pub open: AtomicUsize,
    /// Spares a client took.
    pub taken: AtomicU64,
    /// Spares closed without a client: the server closed or reset them while idle, they aged
    /// past `idle`, or their server went down.
    pub discarded: AtomicU64,
}

/// Upper bounds of the connect-time histogram's buckets, in microseconds: loopback (100 µs) to
/// a slow WAN (10 s).
pub const CONNECT_BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A histogram of durations with fixed buckets: one relaxed add per observation into the first
/// bucket that holds it (the last slot takes what is beyond every bound).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; CONNECT_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = CONNECT_BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(CONNECT_BUCKETS_US.len());
        if let Some(b) = self.buckets.get(i) {
            add(b, 1);
        }
        add(&self.sum_us, us);
    }

    /// Cumulative counts for each bound of `CONNECT_BUCKETS_US`, then the count of all.
    pub fn cumulative(&self) -> [u64; CONNECT_BUCKETS_US.len() + 1] {
        let mut out = [0u64; CONNECT_BUCKETS_US.len() + 1];
        let mut total = 0u64;
        for (o, b) in out.iter_mut().zip(&self.buckets) {
            total = total.saturating_add(get(b));
            *o = total;
        }
        out
    }

    pub fn sum(&self) -> Duration {
        Duration::from_micros(get(&self.sum_us))
    }
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
    /// Clients (for UDP: datagrams of new clients) refused, by `Denial::ALL`.
    pub denied: [AtomicU64; Denial::ALL.len()],
}

/// Why a client was refused before any server saw it: `sluice_denied_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// An access rule.
    Acl,
    MaxConnectionsPerIp,
    RatePerIp,
    MaxSessionsPerIp,
    /// The per-client table had no room (every entry holds connections).
    PerIpTableFull,
    /// A PROXY header from a peer not in `proxy_protocol_trusted`.
    UntrustedProxy,
}

impl Denial {
    pub const ALL: [Denial; 6] = [
        Denial::Acl,
        Denial::MaxConnectionsPerIp,
        Denial::RatePerIp,
        Denial::MaxSessionsPerIp,
        Denial::PerIpTableFull,
        Denial::UntrustedProxy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Denial::Acl => "acl",
            Denial::MaxConnectionsPerIp => "max_connections_per_ip",
            Denial::RatePerIp => "rate_per_ip",
            Denial::MaxSessionsPerIp => "max_sessions_per_ip",
            Denial::PerIpTableFull => "per_ip_table_full",
            Denial::UntrustedProxy => "proxy_protocol_untrusted",
        }
    }
}

impl ListenerStats {
    /// Clients refused for `why`.
    pub fn denied(&self, why: Denial) -> u64 {
        self.denied.get(why as usize).map_or(0, get)
    }

    /// All clients refused.
    pub fn denied_total(&self) -> u64 {
        self.denied.iter().map(get).sum()
    }
}

impl ListenerStats {
    pub fn new(proto: Proto, addr: SocketAddr) -> ListenerStats {
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
            denied: Default::default(),
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
    /// How long successful connects took.
    pub connect_time: Histogram,
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
            connect_time: Histogram::default(),
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
    pub name: String,
    pub changes: AtomicU64,
}

impl UpstreamShared {
    pub fn named(name: &str) -> UpstreamShared {
        UpstreamShared {
            name: name.to_string(),
            changes: AtomicU64::new(0),
        }
    }
}

/// One worker's share of the work.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// TCP clients this worker accepted.
    pub connections_total: AtomicU64,
}

/// The tables of one running config: a listener's counters by `ListenerId`, a server's shared
/// state by `UpstreamId` and `ServerId`, an upstream's change counter by `UpstreamId`. A reload
/// builds new tables that carry over every entry that stays (see [`Tables::carry`]).
#[derive(Debug, Default)]
pub struct Tables {
    pub listeners: Vec<Arc<ListenerStats>>,
    /// By upstream, then by server.
    pub servers: Vec<Vec<Arc<ServerShared>>>,
    pub upstreams: Vec<Arc<UpstreamShared>>,
}

impl Tables {
    /// Tables for `config`, taking from `old` every entry that stays: a listener with the same
    /// protocol and configured address, a server with the same upstream name and address (its
    /// health, passive-health and admin state, and its counters, go on), an upstream with the
    /// same name. Everything else starts fresh, as at start-up.
    pub fn carry(old: &Tables, config: &Config) -> Tables {
        let old_listeners: std::collections::HashMap<(Proto, SocketAddr), &Arc<ListenerStats>> =
            // Reversed, so that the first of two with one address wins, as a scan would.
            old.listeners
                .iter()
                .rev()
                .map(|o| ((o.proto, o.addr), o))
                .collect();
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                old_listeners
                    .get(&(l.proto, l.addr))
                    .map(|o| Arc::clone(o))
                    .unwrap_or_else(|| Arc::new(ListenerStats::new(l.proto, l.addr)))
            })
            .collect();
        let by_name: std::collections::HashMap<
            &str,
            (&Arc<UpstreamShared>, &Vec<Arc<ServerShared>>),
        > = old
            .upstreams
            .iter()
            .zip(&old.servers)
            .map(|(shared, servers)| (shared.name.as_str(), (shared, servers)))
            .collect();
        let old_upstream = |name: &str| by_name.get(name).copied();
        let mut servers = Vec::with_capacity(config.upstreams.len());
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for u in &config.upstreams {
            let before = old_upstream(&u.name);
            upstreams.push(before.map_or_else(
                || Arc::new(UpstreamShared::named(&u.name)),
                |(shared, _)| Arc::clone(shared),
            ));
            let kept: &[Arc<ServerShared>] = before.map_or(&[], |(_, s)| s.as_slice());
            servers.push(
                u.servers
                    .iter()
                    .map(|s| {
                        kept.iter()
                            .find(|k| k.addr == s.addr)
                            .cloned()
                            .unwrap_or_else(|| Arc::new(ServerShared::new(&u.name, s.addr)))
                    })
                    .collect(),
            );
        }
        Tables {
            listeners,
            servers,
            upstreams,
        }
    }

    /// Servers of upstreams that have no `health_check` (any more) are up as far as checks go:
    /// nothing would ever say so otherwise. The groups read it at their next pick.
    pub fn checks_ended(&self, config: &Config) {
        for (i, u) in config.upstreams.iter().enumerate() {
            if u.health_check.is_some() {
                continue;
            }
            let mut changed = false;
            for s in self.servers(UpstreamId(i)) {
                changed |= !s.healthy.swap(true, Ordering::Relaxed);
            }
            if changed {
                if let Some(shared) = self.upstreams.get(i) {
                    shared.changes.fetch_add(1, Ordering::Release);
                }
            }
        }
    }

    /// The shared state of every server of upstream `id`, in config order.
    pub fn servers(&self, id: UpstreamId) -> &[Arc<ServerShared>] {
        self.servers.get(id.0).map_or(&[], Vec::as_slice)
    }

    /// What the groups of upstream `id` in every worker share.
    pub fn upstream(&self, id: UpstreamId) -> Arc<UpstreamShared> {
        self.upstreams.get(id.0).cloned().unwrap_or_default()
    }

    pub fn listener(&self, id: ListenerId) -> Option<&Arc<ListenerStats>> {
        self.listeners.get(id.0)
    }
}

/// The whole registry: process-wide counters (fields), and the tables of the running config.
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
    /// Clients closed because no descriptor was left to open their server connection.
    pub connect_fd_shortages: AtomicU64,
    /// Times a pair had to wait for a buffer: the pools had lent all `buffer_memory` allows.
    pub buffer_waits: AtomicU64,
    /// Polls that found events while `busy_poll` kept the worker awake: sleeps it saved.
    pub busy_poll_hits: AtomicU64,
    pub udp_sessions_total: AtomicU64,
    pub udp_sessions_active: AtomicU64,
    pub udp_datagrams_up: AtomicU64,
    pub udp_datagrams_down: AtomicU64,
    /// Datagrams dropped because a socket's send buffer was full, or because they came from a
    /// new client to a listener a reload removed.
    pub udp_dropped: AtomicU64,
    /// Clients closed for a bad, missing or late PROXY header (or datagrams dropped for one).
    pub proxy_protocol_errors: AtomicU64,
    /// Reloads applied.
    pub reloads: AtomicU64,
    /// Reloads refused (a config error, a listener that could not bind); the running config stayed.
    pub reload_failures: AtomicU64,
    /// Re-resolutions of `resolve` names that got an answer, and that did not (the last good
    /// set of addresses stayed).
    pub resolver_lookups: AtomicU64,
    pub resolver_failures: AtomicU64,
    /// Re-resolutions whose set of addresses differed, applied to their upstream.
    pub resolver_changes: AtomicU64,
    /// Replies that answered nothing asked (another id or question, or broken), ignored.
    pub resolver_ignored: AtomicU64,
    pub pool: Arc<PoolStats>,
    pub pipes: Arc<PipeStats>,
    pub spares: Arc<SpareStats>,
    ends: Ends,
    /// Swapped whole by a reload; the workers never read it on the data path (pairs and sessions
    /// hold their listener's counters), so the lock is taken only by a reload and by readers.
    tables: RwLock<Arc<Tables>>,
    /// By worker.
    workers: Vec<WorkerStats>,
}

impl Metrics {
    /// Tables for every listener and every server of `config`, all counters at 0.
    pub fn for_config(config: &Config) -> Metrics {
        Metrics {
            tables: RwLock::new(Arc::new(Tables::carry(&Tables::default(), config))),
            workers: (0..config.workers.max(1))
                .map(|_| WorkerStats::default())
                .collect(),
            ..Metrics::default()
        }
    }

    /// The tables of the running config.
    pub fn tables(&self) -> Arc<Tables> {
        match self.tables.read() {
            Ok(t) => Arc::clone(&t),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Makes `tables` the running config's (a reload).
    pub fn install(&self, tables: Arc<Tables>) {
        match self.tables.write() {
            Ok(mut t) => *t = tables,
            Err(poisoned) => *poisoned.into_inner() = tables,
        }
    }

    /// What the groups of upstream `id` in every worker share.
    pub fn upstream(&self, id: UpstreamId) -> Arc<UpstreamShared> {
        self.tables().upstream(id)
    }

    pub fn listener(&self, id: ListenerId) -> Option<Arc<ListenerStats>> {
        self.tables().listener(id).cloned()
    }

    pub fn listeners(&self) -> Vec<Arc<ListenerStats>> {
        self.tables().listeners.clone()
    }

    /// Each worker's counters, by worker number.
    pub fn workers(&self) -> &[WorkerStats] {
        &self.workers
    }

    /// The shared state of every server of upstream `id`, in config order.
    pub fn servers(&self, id: UpstreamId) -> Vec<Arc<ServerShared>> {
        self.tables().servers(id).to_vec()
    }

    pub fn server(&self, upstream: UpstreamId, server: ServerId) -> Option<Arc<ServerShared>> {
        self.tables().servers(upstream).get(server.0).cloned()
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

    pub fn pipes_in_use(&self) -> usize {
        self.pipes.in_use.load(Ordering::Relaxed)
    }

    pub fn pipes_peak(&self) -> usize {
        self.pipes.peak.load(Ordering::Relaxed)
    }

    pub fn spliced_bytes(&self) -> u64 {
        self.pipes.spliced_bytes.load(Ordering::Relaxed)
    }

    // ---- what the parts record ----------------------------------------------------------

    /// Takes one of the process's `max` connection slots before an accept, so that every
    /// worker together keeps `max_connections` (a compare-and-swap, no lock). False at the cap:
    /// the client waits in the kernel backlog.
    pub fn reserve(&self, max: usize) -> bool {
        take_slot(&self.connections_active, max)
    }

    /// Gives back a slot that `reserve` took for an accept that brought no client.
    pub fn unreserve(&self) {
        sub(&self.connections_active, 1);
    }

    /// A TCP client was accepted on listener `l` by `worker`, in a slot `reserve` took.
    pub fn opened(&self, l: &ListenerStats, worker: usize, reserved_on_listener: bool) {
        add(&self.connections_total, 1);
        add(&l.connections_total, 1);
        if !reserved_on_listener {
            add(&l.connections_active, 1);
        }
        if let Some(w) = self.workers.get(worker) {
            add(&w.connections_total, 1);
        }
    }

    /// A UDP session opened on listener `l`.
    pub fn session_opened(&self, l: &ListenerStats) {
        add(&self.udp_sessions_total, 1);
        add(&self.udp_sessions_active, 1);
        add(&l.connections_total, 1);
        add(&l.udp_sessions_active, 1);
    }

    /// A connection or session ended; `datagrams` is set for UDP sessions.
    pub fn closed(
        &self,
        l: &ListenerStats,
        end: End,
        bytes: (u64, u64),
        datagrams: Option<(u64, u64)>,
    ) {
        match datagrams {
            None => {
                sub(&self.connections_active, 1);
                sub(&l.connections_active, 1);
            }
            Some((up, down)) => {
                sub(&self.udp_sessions_active, 1);
                add(&self.udp_datagrams_up, up);
                add(&self.udp_datagrams_down, down);
                sub(&l.udp_sessions_active, 1);
                add(&l.udp_datagrams_up, up);
                add(&l.udp_datagrams_down, down);
            }
        }
        add(&self.bytes_up, bytes.0);
        add(&self.bytes_down, bytes.1);
        self.ends.count(end);
        add(&l.bytes_up, bytes.0);
        add(&l.bytes_down, bytes.1);
        l.ends.count(end);
    }

    /// A client that never got a connection or session (no server, refused): counted by `end`.
    pub fn refused(&self, l: &ListenerStats, end: End) {
        self.ends.count(end);
        l.ends.count(end);
    }

    /// A client was refused for `why` before any server saw it (counted with its `end`).
    pub fn deny(&self, l: &ListenerStats, why: Denial, end: End) {
        self.ends.count(end);
        l.ends.count(end);
        if let Some(c) = l.denied.get(why as usize) {
            add(c, 1);
        }
    }

    /// Takes one of listener `l`'s `max` connection slots (a compare-and-swap on its active
    /// count, shared by every worker); false at its cap. `opened` then leaves the count alone.
    pub fn reserve_listener(&self, l: &ListenerStats, max: usize) -> bool {
        take_slot(&l.connections_active, max)
    }

    /// A pair counted by `opened` was refused before it reached a server (after its PROXY
    /// header): it leaves the active counts; its end is counted by `deny`.
    pub fn unopened(&self, l: &ListenerStats) {
        sub(&self.connections_active, 1);
        sub(&l.connections_active, 1);
    }

    /// Gives back a slot `reserve_listener` took for an accept that brought no pair.
    pub fn unreserve_listener(&self, l: &ListenerStats) {
        sub(&l.connections_active, 1);
    }

    /// A datagram was dropped on listener `l`.
    pub fn dropped(&self, l: &ListenerStats) {
        add(&self.udp_dropped, 1);
        add(&l.udp_dropped, 1);
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
        let l = m.listener(ListenerId(0)).expect("listener");
        m.opened(&l, 0, false);
        m.closed(&l, End::ClientClosed, (3, 4), None);
        // A listener a reload removed: its pairs still count in the process totals.
        let gone = ListenerStats::new(Proto::Tcp, "127.0.0.1:9".parse().expect("addr"));
        m.closed(&gone, End::Error, (1, 1), None);
        assert_eq!(get(&l.connections_total), 1);
        assert_eq!(get(&l.connections_active), 0);
        assert_eq!((get(&l.bytes_up), get(&l.bytes_down)), (3, 4));
        assert_eq!(l.ends.get(End::ClientClosed), 1);
        assert_eq!(m.ended(End::Error), 1);
        assert_eq!(get(&m.connections_active), 0, "never below 0");
    }

    #[test]
    fn the_histogram_counts_each_connect_in_its_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(80));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let c = h.cumulative();
        assert_eq!((c[0], c[1], c[5]), (2, 2, 3), "le=100us, le=250us, le=5ms");
        assert_eq!(c[CONNECT_BUCKETS_US.len() - 1], 3, "le=10s");
        assert_eq!(c[CONNECT_BUCKETS_US.len()], 4, "+Inf counts all");
        assert_eq!(h.sum(), Duration::from_micros(60_003_180));
    }

    #[test]
    fn a_reload_carries_what_stays_and_starts_the_rest_fresh() {
        let first = Config::parse(
            "upstream a { server 127.0.0.1:1; server 127.0.0.1:2; }
             upstream b { server 127.0.0.1:3; }
             listen 127.0.0.1:10 { proxy a; }
             listen udp 127.0.0.1:11 { proxy b; }",
            "first.conf",
        )
        .expect("config");
        let second = Config::parse(
            "upstream b { server 127.0.0.1:3; server 127.0.0.1:4; }
             upstream a { server 127.0.0.1:2; }
             listen 127.0.0.1:11 { proxy a; }
             listen udp 127.0.0.1:11 { proxy b; }",
            "second.conf",
        )
        .expect("config");
        let old = Tables::carry(&Tables::default(), &first);
        let new = Tables::carry(&old, &second);
        // Listeners by protocol and address: udp :11 stays, tcp :10 went, tcp :11 is new.
        assert!(!Arc::ptr_eq(&new.listeners[0], &old.listeners[0]));
        assert!(Arc::ptr_eq(&new.listeners[1], &old.listeners[1]));
        // Servers by upstream name and address, wherever they now stand.
        assert!(
            Arc::ptr_eq(&new.servers[1][0], &old.servers[0][1]),
            "a's :2"
        );
        assert!(
            Arc::ptr_eq(&new.servers[0][0], &old.servers[1][0]),
            "b's :3"
        );
        assert_eq!(new.servers[0][1].addr.port(), 4);
        assert!(new.servers[0][1].healthy.load(Ordering::Relaxed), "new: up");
        assert!(Arc::ptr_eq(&new.upstreams[0], &old.upstreams[1]));
        assert_eq!(new.upstreams[1].name, "a");
    }
}
