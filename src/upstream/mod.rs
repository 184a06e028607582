//! Upstream groups at run time: the servers of one `upstream` block, their health, and the
//! balancer that picks one for each new connection or UDP session.
//!
//! A `Group` is per worker and never touches a socket: the reactor reports what happened
//! (`connected`, `connect_failed`, `acquire`/`release`, `set_health` from the active probes) and
//! asks `pick`. Invariants:
//! - A server is *available* when it is not `down`, the active checks say up, it is below
//!   `max_conns` and no passive-health mark is running. `pick` only returns available servers
//!   that the client has not tried; backups only when no primary qualifies.
//! - Passive health follows nginx: `max_fails` failed connects within `fail_timeout` mark a server
//!   unavailable for `fail_timeout` (0 disables). The window opens at the first failure and a
//!   failure after it has run out opens a new one, so failures that straddle two windows may not
//!   add up (a fixed window, cheaper than nginx-exact bookkeeping and never stricter). When the mark
//!   runs out the server is back on trial: one more failure marks it again at once, a successful
//!   connect clears the count.
//! - `pick` never allocates; everything a balancer needs is built in `Group::new`.
//!   Costs per method are in `balance.rs`.

mod balance;

pub use crate::config::{ServerId, UpstreamId};
pub use balance::client_hash;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{self, Balance};
use crate::metrics::{AdminState, ServerShared, UpstreamShared};
use balance::Pool;

/// Run-time state of one server of a group.
#[derive(Debug)]
pub struct ServerState {
    pub conf: config::Server,
    /// Connections (or UDP sessions) open to this server now. Change it through
    /// `Group::acquire`/`Group::release`, which keep `least_conn` in step.
    pub active: u32,
    /// Failed connects this worker saw since start.
    pub connect_failures: u64,
    /// The active health checks' verdict as this group last read it from `shared`; servers
    /// start up. `least_conn` ranks on it.
    healthy: bool,
    /// Passive mark as `least_conn` ranks it; cleared by `Group::expire_marks` once the mark ran
    /// out, so the ranking never needs the clock.
    marked: bool,
    /// Position in the primary or backup pool.
    pool_pos: usize,
    /// A reload removed the server while connections held it: it stays, in no pool, never
    /// picked, until they end (see [`rebuild`]).
    retired: bool,
    /// The server's state that every worker shares: the health verdict, the passive-health
    /// window (failures from any worker count toward the same `max_fails`), the admin state.
    pub shared: Arc<ServerShared>,
}

impl ServerState {
    fn new(conf: &config::Server, shared: Arc<ServerShared>) -> ServerState {
        ServerState {
            shared,
            conf: conf.clone(),
            active: 0,
            connect_failures: 0,
            healthy: true,
            marked: false,
            pool_pos: 0,
            retired: false,
        }
    }

    /// The active health checks' verdict.
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// When the last passive-health mark ends (or ended, while the server is on trial).
    pub fn unavailable_until(&self) -> Option<Instant> {
        self.shared.unavailable_until()
    }

    fn full(&self) -> bool {
        self.conf.max_conns != 0 && self.active >= self.conf.max_conns
    }

    /// Whether one more connection leaves a slot free under `max_conns`: a spare may never
    /// take the last one, or the balancer (which skips full servers) could not give the
    /// server to the client the spare is for.
    pub fn room_for_spare(&self) -> bool {
        self.conf.max_conns == 0 || self.active.saturating_add(1) < self.conf.max_conns
    }

    /// Available apart from the clock: what `least_conn` can rank without knowing the time.
    fn listed(&self) -> bool {
        !self.conf.down && !self.retired && self.healthy && !self.full() && !self.marked
    }

    fn available(&self, now: Instant) -> bool {
        !self.conf.down
            && !self.retired
            // An operator's drain or down, set from any thread; `least_conn` ranks without it and
            // its search steps over such a server like a tried one.
            && self.shared.admin() == AdminState::Up
            && self.healthy
            && !self.full()
            && self.unavailable_until().map_or(true, |t| now >= t)
    }
}

/// Servers already tried by one client connection: a bit set with no size limit. The first 256
/// servers live inline, so a pair in a group of up to 256 servers never allocates for it; a retry
/// in a larger group grows a heap part once, sized to the server it marks.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct Tried {
    inline: [u64; INLINE_WORDS],
    more: Option<Box<[u64]>>,
}

const INLINE_WORDS: usize = 4;

impl Tried {
    pub fn insert(&mut self, server: ServerId) {
        let i = server.0;
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if let Some(w) = self.inline.get_mut(word) {
            *w |= bit;
            return;
        }
        let at = word - INLINE_WORDS;
        let more = self.more.get_or_insert_with(Default::default);
        if at >= more.len() {
            let mut grown = vec![0u64; at + 1].into_boxed_slice();
            grown[..more.len()].copy_from_slice(more);
            *more = grown;
        }
        more[at] |= bit;
    }

    /// The same servers under the ids a reload gave them (`map` by old id); servers gone are left out.
    pub fn remap(&self, map: &[Option<ServerId>]) -> Tried {
        let mut out = Tried::default();
        let words = self
            .inline
            .iter()
            .chain(self.more.iter().flat_map(|m| m.iter()));
        for (w, &word) in words.enumerate() {
            let mut bits = word;
            while bits != 0 {
                let old = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(Some(new)) = map.get(old) {
                    out.insert(*new);
                }
            }
        }
        out
    }

    pub fn contains(&self, server: ServerId) -> bool {
        let i = server.0;
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let w = match self.inline.get(word) {
            Some(w) => Some(w),
            None => self
                .more
                .as_ref()
                .and_then(|more| more.get(word - INLINE_WORDS)),
        };
        w.is_some_and(|w| w & bit != 0)
    }
}

/// Per-worker run-time state of one upstream group.
pub struct Group {
    pub name: String,
    /// Pre-connected spares to keep per server (`pool`); the TCP part keeps them.
    pub pool: Option<config::SparePool>,
    balance: Balance,
    servers: Vec<ServerState>,
    primary: Pool,
    backup: Pool,
    /// The earliest end of a passive mark that `least_conn` still ranks as marked.
    next_expiry: Option<Instant>,
    /// Changes to the servers' shared state, by any worker.
    changes: Arc<UpstreamShared>,
    /// `changes` when this group last read its servers' shared state.
    seen: u64,
}

impl Group {
    /// A group for `conf`; `shared` is the server table's row for it (fresh state is made for
    /// any server it lacks).
    pub fn new(
        conf: &config::Upstream,
        shared: &[Arc<ServerShared>],
        changes: Arc<UpstreamShared>,
    ) -> Group {
        let mut servers: Vec<ServerState> = conf
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let shared = shared
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(ServerShared::new(&conf.name, s.addr)));
                ServerState::new(s, shared)
            })
            .collect();
        let (mut primary, mut backup) = (Vec::new(), Vec::new());
        for (i, s) in servers.iter_mut().enumerate() {
            let pool = if s.conf.backup {
                &mut backup
            } else {
                &mut primary
            };
            s.pool_pos = pool.len();
            pool.push(i);
        }
        let seed = balance::process_seed(&conf.name);
        Group {
            name: conf.name.clone(),
            pool: conf.pool,
            balance: conf.balance,
            primary: Pool::new(conf.balance, primary, &servers, seed),
            backup: Pool::new(conf.balance, backup, &servers, !seed),
            servers,
            next_expiry: None,
            // Not yet read: the first pick reads the servers' shared state, which a reload
            // carries over (a server down before it is down after it).
            seen: changes.changes.load(Ordering::Relaxed).wrapping_sub(1),
            changes,
        }
    }

    /// Takes in a server a reload removed from the group (or whose group it removed) while
    /// connections still hold it: never picked, it keeps their count until they end.
    fn retire(&mut self, mut s: ServerState) -> ServerId {
        s.retired = true;
        self.servers.push(s);
        ServerId(self.servers.len() - 1)
    }

    /// Connections open to the group's servers in this worker.
    fn held(&self) -> bool {
        self.servers.iter().any(|s| s.active > 0)
    }

    pub fn balance(&self) -> Balance {
        self.balance
    }

    pub fn servers(&self) -> &[ServerState] {
        &self.servers
    }

    pub fn server(&self, id: ServerId) -> Option<&ServerState> {
        self.servers.get(id.0)
    }

    /// Seeds `random`: for deterministic tests and simulations (groups seed themselves otherwise).
    pub fn reseed(&mut self, seed: u64) {
        self.primary.reseed(seed);
        self.backup.reseed(!seed);
    }

    /// An available server not in `tried` for a client from `client`, primaries first, backups
    /// only when no primary qualifies. The hash methods hash `client`; a retry (the failed server
    /// in `tried`) moves on deterministically: `hash` to the next server on the ring, `ip_hash` to
    /// the next best score. None: nothing available (all down, full, failed or tried).
    pub fn pick(&mut self, client: IpAddr, now: Instant, tried: &Tried) -> Option<ServerId> {
        self.pick_position(client, now, tried).map(ServerId)
    }

    fn pick_position(&mut self, client: IpAddr, now: Instant, tried: &Tried) -> Option<usize> {
        self.sync(now);
        self.expire_marks(now);
        let servers = &self.servers;
        let eligible = |i: usize| {
            !tried.contains(ServerId(i)) && servers.get(i).is_some_and(|s| s.available(now))
        };
        self.primary
            .pick(servers, client, &eligible)
            .or_else(|| self.backup.pick(servers, client, &eligible))
    }

    /// A connect to server `i` succeeded: its failure count starts again (nginx). A connect that
    /// began before the server was marked leaves the mark running.
    pub fn connected(&mut self, id: ServerId, now: Instant) {
        let i = id.0;
        let Some(s) = self.servers.get_mut(i) else {
            return;
        };
        let shared = &s.shared;
        let until = shared.unavailable_until();
        if until.is_some_and(|t| now < t) {
            return;
        }
        let counted = shared.fails.load(Ordering::Relaxed) > 0 || shared.window_start().is_some();
        if !counted && until.is_none() && !s.marked {
            return;
        }
        shared.fails.store(0, Ordering::Relaxed);
        shared.set_window_start(None);
        shared.set_unavailable_until(None);
        shared.marked.store(false, Ordering::Relaxed);
        self.changed();
        if let Some(s) = self.servers.get_mut(i) {
            if s.marked {
                s.marked = false;
                self.touch(i);
            }
        }
    }

    /// A connect to server `i` failed. True if this made the server unavailable (worth a log
    /// line). The window and the count are shared, so failures seen by every worker add up.
    pub fn connect_failed(&mut self, id: ServerId, now: Instant) -> bool {
        let i = id.0;
        let Some(s) = self.servers.get_mut(i) else {
            return false;
        };
        s.connect_failures += 1;
        let shared = Arc::clone(&s.shared);
        shared.connect_failures.fetch_add(1, Ordering::Relaxed);
        let (max_fails, fail_timeout) = (s.conf.max_fails, s.conf.fail_timeout);
        if max_fails == 0 {
            return false;
        }
        match shared.unavailable_until() {
            Some(t) if now < t => return false,
            // On trial after a mark: one failure marks it again (nginx keeps `fails` at the limit).
            Some(_) => {}
            None => {
                let expired = shared
                    .window_start()
                    .map_or(true, |w| now.saturating_duration_since(w) >= fail_timeout);
                if expired {
                    shared.fails.store(0, Ordering::Relaxed);
                    shared.set_window_start(Some(now));
                }
                let fails = shared
                    .fails
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1);
                // The failure that reaches the limit marks; later ones in the same window (from
                // other workers) find the mark.
                if fails != u64::from(max_fails) {
                    return false;
                }
            }
        }
        let until = crate::reactor::after(now, fail_timeout);
        shared.set_unavailable_until(Some(until));
        shared.marked.store(true, Ordering::Relaxed);
        self.changed();
        if let Some(s) = self.servers.get_mut(i) {
            s.marked = true;
        }
        self.next_expiry = Some(self.next_expiry.map_or(until, |e| e.min(until)));
        self.touch(i);
        true
    }

    /// A connection to server `i` opened.
    pub fn acquire(&mut self, id: ServerId) {
        if let Some(s) = self.servers.get_mut(id.0) {
            s.active = s.active.saturating_add(1);
            s.shared.active.fetch_add(1, Ordering::Relaxed);
            self.touch(id.0);
        }
    }

    /// A connection to server `i` closed (saturates at 0).
    pub fn release(&mut self, id: ServerId) {
        if let Some(s) = self.servers.get_mut(id.0) {
            if s.active > 0 {
                s.active -= 1;
                // Every worker takes off its own: the shared count is the process's.
                s.shared.active.fetch_sub(1, Ordering::Relaxed);
            }
            self.touch(id.0);
        }
    }

    /// The active health checks' verdict on server `i`.
    pub fn set_health(&mut self, id: ServerId, up: bool) {
        let Some(s) = self.servers.get_mut(id.0) else {
            return;
        };
        if s.shared.healthy.swap(up, Ordering::Relaxed) != up {
            self.changed();
        }
        if let Some(s) = self.servers.get_mut(id.0) {
            if s.healthy != up {
                s.healthy = up;
                self.touch(id.0);
            }
        }
    }

    /// This group changed its servers' shared state: the other workers' groups read it again.
    fn changed(&mut self) {
        // Release: a group that sees the new count also sees the state written before it.
        let before = self.changes.changes.fetch_add(1, Ordering::Release);
        // Only this change is known to be read: one another worker made since the last sync
        // must still be read at the next pick.
        if before == self.seen {
            self.seen = before + 1;
        }
    }

    /// Reads the servers' shared verdicts again when another worker changed one (one atomic load
    /// per pick otherwise), so `least_conn`'s ranking and the marks' expiry follow them.
    fn sync(&mut self, now: Instant) {
        let current = self.changes.changes.load(Ordering::Acquire);
        if current == self.seen {
            return;
        }
        self.seen = current;
        let mut next = None;
        for i in 0..self.servers.len() {
            let s = &mut self.servers[i];
            let healthy = s.shared.healthy.load(Ordering::Relaxed);
            let until = s.shared.unavailable_until().filter(|&t| now < t);
            if let Some(t) = until {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
            let marked = until.is_some();
            if (healthy, marked) != (s.healthy, s.marked) {
                s.healthy = healthy;
                s.marked = marked;
                self.touch(i);
            }
        }
        self.next_expiry = next;
    }

    /// The server a client from `client` would get now, without advancing the balancer (a
    /// copy of its state picks): exact for `ip_hash` and `hash`, the next in turn for the others.
    pub fn peek(&mut self, client: IpAddr, now: Instant) -> Option<ServerId> {
        self.sync(now);
        self.expire_marks(now);
        let servers = &self.servers;
        let eligible = |i: usize| servers.get(i).is_some_and(|s| s.available(now));
        let (mut primary, mut backup) = (self.primary.clone(), self.backup.clone());
        primary
            .pick(servers, client, &eligible)
            .or_else(|| backup.pick(servers, client, &eligible))
            .map(ServerId)
    }

    /// Whether server `id` can be picked now, and if not, why (the first reason that applies).
    pub fn availability(&self, id: ServerId, now: Instant) -> Availability {
        let Some(s) = self.servers.get(id.0) else {
            return Availability::Retired;
        };
        let until = s.unavailable_until().filter(|&t| now < t);
        if s.retired {
            Availability::Retired
        } else if s.conf.down {
            Availability::Down
        } else if s.shared.admin() == AdminState::Down {
            Availability::AdminDown
        } else if s.shared.admin() == AdminState::Drain {
            Availability::Drained
        } else if !s.shared.healthy.load(Ordering::Relaxed) {
            Availability::CheckDown
        } else if let Some(until) = until {
            Availability::Failed { until }
        } else if s.full() {
            Availability::Full
        } else {
            Availability::Up
        }
    }

    pub fn is_available(&self, id: ServerId, now: Instant) -> bool {
        self.servers.get(id.0).is_some_and(|s| s.available(now))
    }

    /// Clears the `marked` flag of servers whose mark ran out. One O(n) pass per expiry time,
    /// and there is at most one expiry per failure mark, so this is amortised over the marks.
    fn expire_marks(&mut self, now: Instant) {
        if !self.next_expiry.is_some_and(|t| now >= t) {
            return;
        }
        let mut next = None;
        for i in 0..self.servers.len() {
            let s = &mut self.servers[i];
            if !s.marked {
                continue;
            }
            match s.shared.unavailable_until() {
                Some(t) if now < t => next = Some(next.map_or(t, |n: Instant| n.min(t))),
                _ => {
                    s.marked = false;
                    s.shared.marked.store(false, Ordering::Relaxed);
                    self.touch(i);
                }
            }
        }
        self.next_expiry = next;
    }

    /// Server `i` changed something `least_conn` ranks on.
    fn touch(&mut self, i: usize) {
        let Some(s) = self.servers.get(i).filter(|s| !s.retired) else {
            return;
        };
        let pool = if s.conf.backup {
            &mut self.backup
        } else {
            &mut self.primary
        };
        pool.update(&self.servers, s.pool_pos);
    }
}

/// Whether a server can be picked, and if not, why: what the admin endpoint shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Up,
    /// `down` in the config.
    Down,
    /// Set down by an operator (admin endpoint).
    AdminDown,
    /// Drained by an operator: open connections go on, no new ones.
    Drained,
    /// The active health checks say down.
    CheckDown,
    /// Passive health marked it after failed connects, until then.
    Failed {
        until: Instant,
    },
    /// At `max_conns`.
    Full,
    /// A reload removed it; connections still hold it.
    Retired,
}

impl Availability {
    pub fn name(self) -> &'static str {
        match self {
            Availability::Up => "up",
            Availability::Down => "down",
            Availability::AdminDown => "down_by_admin",
            Availability::Drained => "drained",
            Availability::CheckDown => "down_by_check",
            Availability::Failed { .. } => "failed",
            Availability::Full => "full",
            Availability::Retired => "retired",
        }
    }

    /// A sentence for an operator ("failed connects: unavailable for 3 s more").
    pub fn reason(self, now: Instant) -> String {
        match self {
            Availability::Up => "available".into(),
            Availability::Down => "marked down in the config".into(),
            Availability::AdminDown => "set down through the admin endpoint".into(),
            Availability::Drained => {
                "drained through the admin endpoint: no new connections".into()
            }
            Availability::CheckDown => "health checks failed".into(),
            Availability::Failed { until } => format!(
                "failed connects (max_fails): unavailable for {} ms more",
                until.saturating_duration_since(now).as_millis()
            ),
            Availability::Full => "at max_conns".into(),
            Availability::Retired => "removed by a reload, still held by connections".into(),
        }
    }
}

/// How the ids that pairs and sessions in flight hold translate after a reload: an upstream by
/// its name, a server by its upstream's name and its address. Every server that a connection
/// holds has a new id (a retired one if the reload removed it); others may be gone.
#[derive(Debug, Default)]
pub struct Remap {
    /// By old `UpstreamId`.
    upstreams: Vec<Option<UpstreamId>>,
    /// By old `UpstreamId`, then old `ServerId`.
    servers: Vec<Vec<Option<ServerId>>>,
}

/// The id of nothing: a lookup with it misses (an id is a position, and no table is this long).
const GONE: usize = usize::MAX;

impl Remap {
    /// The group's new id; one that names no group if the reload removed it and nothing held it.
    pub fn upstream(&self, old: UpstreamId) -> UpstreamId {
        UpstreamId(
            self.upstreams
                .get(old.0)
                .copied()
                .flatten()
                .map_or(GONE, |u| u.0),
        )
    }

    /// The server's new id in its group's new id.
    pub fn server(&self, upstream: UpstreamId, old: ServerId) -> Option<ServerId> {
        self.servers.get(upstream.0)?.get(old.0).copied().flatten()
    }

    /// The new id of a server a pair or session holds. Every held server has one; were one
    /// missing, the id returned names nothing, so the holder loses only its access-log name.
    pub fn held(&self, upstream: UpstreamId, old: ServerId) -> ServerId {
        self.server(upstream, old).unwrap_or(ServerId(GONE))
    }

    /// `tried` under the new ids of `upstream`'s servers.
    pub fn tried(&self, upstream: UpstreamId, tried: &Tried) -> Tried {
        self.servers
            .get(upstream.0)
            .map_or_else(Tried::default, |map| tried.remap(map))
    }
}

/// One worker's groups for a reloaded config (`tables`: its shared state, carried over by
/// `metrics::Tables::carry`), made from the groups it runs now (`old`). A server that stays keeps
/// this worker's count of its connections (`least_conn` and `max_conns` stay exact); one the
/// reload removed while connections hold it is retired into its group; a group the reload removed
/// while connections hold its servers stays, after the config's, until they end.
pub fn rebuild(
    old: Vec<Group>,
    upstreams: &[config::Upstream],
    tables: &crate::metrics::Tables,
) -> (Vec<Group>, Remap) {
    let mut groups: Vec<Group> = upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let id = UpstreamId(i);
            Group::new(u, tables.servers(id), tables.upstream(id))
        })
        .collect();
    let mut remap = Remap::default();
    let by_name: std::collections::HashMap<String, usize> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| (g.name.clone(), i))
        .collect();
    for before in old {
        let mut map = vec![None; before.servers.len()];
        let at = match by_name.get(&before.name).copied() {
            Some(at) => Some(at),
            None if before.held() => {
                let empty = config::Upstream {
                    name: before.name.clone(),
                    balance: before.balance,
                    servers: Vec::new(),
                    health_check: None,
                    pool: None,
                };
                groups.push(Group::new(&empty, &[], Arc::clone(&before.changes)));
                Some(groups.len() - 1)
            }
            None => None,
        };
        remap.upstreams.push(at.map(UpstreamId));
        if let Some(group) = at.and_then(|at| groups.get_mut(at)) {
            for (slot, s) in map.iter_mut().zip(before.servers) {
                *slot = group.carry(s);
            }
        }
        remap.servers.push(map);
    }
    (groups, remap)
}

impl Group {
    /// Takes over server `s` of the group this one replaces: the same server (by address) keeps
    /// its connection count; a server that left stays retired while connections hold it.
    fn carry(&mut self, s: ServerState) -> Option<ServerId> {
        let same = self
            .servers
            .iter()
            .position(|n| !n.retired && n.conf.addr == s.conf.addr);
        match same {
            Some(i) => {
                if let Some(n) = self.servers.get_mut(i) {
                    n.active = s.active;
                    n.connect_failures = s.connect_failures;
                    if !Arc::ptr_eq(&n.shared, &s.shared) {
                        // Back after a reload retired it: this worker's connections now count
                        // (and will be released) in the fresh shared state.
                        let mine = u64::from(s.active);
                        n.shared.active.fetch_add(mine, Ordering::Relaxed);
                        let _ = s.shared.active.fetch_update(
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                            |v| Some(v.saturating_sub(mine)),
                        );
                    }
                }
                self.touch(i);
                Some(ServerId(i))
            }
            None if s.active > 0 => Some(self.retire(s)),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Server, Upstream};
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::OnceLock;
    use std::time::Duration;

    /// A fixed "now" for synthetic clocks: tests add durations to it and never sleep.
    pub(super) fn t0() -> Instant {
        static T0: OnceLock<Instant> = OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    /// Client address number `k` inside 127.0.0.0/8 (k = 1 is 127.0.0.1).
    pub(super) fn loopback(k: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | (k & 0x00ff_ffff)))
    }

    pub(super) fn server(port: u16) -> Server {
        Server::new(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    pub(super) fn group(balance: Balance, servers: Vec<Server>) -> Group {
        Group::new(
            &Upstream {
                name: "test".to_string(),
                balance,
                servers,
                health_check: None,
                pool: None,
            },
            &[],
            Arc::default(),
        )
    }

    /// An upstream "u" and a fresh shared state for each of its servers, as a worker gets them.
    fn shared_servers(
        balance: Balance,
        servers: Vec<Server>,
    ) -> (Upstream, Vec<Arc<ServerShared>>) {
        let shared = servers
            .iter()
            .map(|s| Arc::new(ServerShared::new("u", s.addr)))
            .collect();
        let conf = Upstream {
            name: "u".to_string(),
            balance,
            servers,
            health_check: None,
            pool: None,
        };
        (conf, shared)
    }

    fn secs(s: u64) -> Instant {
        t0() + Duration::from_secs(s)
    }

    fn fails(max_fails: u32, fail_timeout: u64) -> Server {
        Server {
            max_fails,
            fail_timeout: Duration::from_secs(fail_timeout),
            ..server(1)
        }
    }

    #[test]
    fn tried_marks_exactly_the_servers_inserted_in_any_group_size() {
        let mut t = Tried::default();
        assert!(!t.contains(ServerId(0)) && !t.contains(ServerId(100_000)));
        let marked = [0, 63, 64, 200, 255, 256, 299, 511, 4096];
        for i in marked {
            t.insert(ServerId(i));
            assert!(t.contains(ServerId(i)));
        }
        for i in 0..5000 {
            assert_eq!(t.contains(ServerId(i)), marked.contains(&i), "server {i}");
        }
        assert_eq!(t.clone(), t);
    }

    #[test]
    fn max_fails_within_fail_timeout_marks_then_recovers() {
        let mut g = group(Balance::RoundRobin, vec![fails(3, 10), server(2)]);
        assert!(!g.connect_failed(ServerId(0), secs(0)));
        assert!(!g.connect_failed(ServerId(0), secs(4)));
        assert!(g.is_available(ServerId(0), secs(5)));
        assert!(g.connect_failed(ServerId(0), secs(9)));
        assert_eq!(g.servers()[0].connect_failures, 3);
        assert!(!g.is_available(ServerId(0), secs(9)));
        assert!(!g.is_available(ServerId(0), secs(18)));
        let t = Tried::default();
        for s in 10..19 {
            assert_eq!(g.pick_position(loopback(1), secs(s), &t), Some(1));
        }
        // Marked at 9 s for 10 s.
        assert!(g.is_available(ServerId(0), secs(19)));
        assert_eq!(g.pick_position(loopback(1), secs(19), &t), Some(0));
    }

    #[test]
    fn failures_spread_beyond_fail_timeout_do_not_add_up() {
        let mut g = group(Balance::RoundRobin, vec![fails(3, 10)]);
        for s in [0, 8, 11, 19, 22, 30] {
            assert!(!g.connect_failed(ServerId(0), secs(s)), "at {s}s");
        }
        assert!(g.is_available(ServerId(0), secs(30)));
        assert_eq!(g.servers()[0].connect_failures, 6);
    }

    #[test]
    fn max_fails_zero_never_marks() {
        let mut g = group(Balance::RoundRobin, vec![fails(0, 10)]);
        for _ in 0..100 {
            assert!(!g.connect_failed(ServerId(0), secs(1)));
        }
        assert!(g.is_available(ServerId(0), secs(1)));
        assert_eq!(
            g.pick_position(loopback(1), secs(1), &Tried::default()),
            Some(0)
        );
        assert_eq!(g.servers()[0].connect_failures, 100);
    }

    #[test]
    fn a_failure_on_trial_marks_again_and_a_success_clears() {
        let mut g = group(Balance::RoundRobin, vec![fails(2, 10)]);
        g.connect_failed(ServerId(0), secs(0));
        assert!(g.connect_failed(ServerId(0), secs(1)));
        // Failures while marked count for metrics only.
        assert!(!g.connect_failed(ServerId(0), secs(2)));
        assert!(g.is_available(ServerId(0), secs(11)));
        assert!(
            g.connect_failed(ServerId(0), secs(12)),
            "on trial: one failure is enough"
        );
        assert!(!g.is_available(ServerId(0), secs(21)));
        // A connect begun before the mark that succeeds late does not lift it.
        g.connected(ServerId(0), secs(13));
        assert!(!g.is_available(ServerId(0), secs(21)));
        g.connected(ServerId(0), secs(22));
        assert!(
            !g.connect_failed(ServerId(0), secs(23)),
            "count starts again after a success"
        );
        assert!(g.connect_failed(ServerId(0), secs(24)));
    }

    #[test]
    fn connected_resets_the_count() {
        let mut g = group(Balance::RoundRobin, vec![fails(2, 10)]);
        assert!(!g.connect_failed(ServerId(0), secs(0)));
        g.connected(ServerId(0), secs(1));
        assert!(!g.connect_failed(ServerId(0), secs(2)));
        assert!(g.connect_failed(ServerId(0), secs(3)));
    }

    #[test]
    fn least_conn_sees_marks_come_and_go() {
        let mut g = group(Balance::LeastConn, vec![fails(1, 10), server(2)]);
        g.acquire(ServerId(1));
        let t = Tried::default();
        assert_eq!(g.pick_position(loopback(1), secs(0), &t), Some(0));
        assert!(g.connect_failed(ServerId(0), secs(0)));
        assert_eq!(g.pick_position(loopback(1), secs(5), &t), Some(1));
        assert_eq!(g.pick_position(loopback(1), secs(10), &t), Some(0));
        // And a success on trial lifts the mark without waiting for a pick.
        assert!(g.connect_failed(ServerId(0), secs(11)));
        g.connected(ServerId(0), secs(21));
        assert_eq!(g.pick_position(loopback(1), secs(21), &t), Some(0));
    }

    #[test]
    fn backups_only_when_no_primary_is_available() {
        for (name, balance) in Balance::ALL {
            let mut conf = vec![server(1), server(2), server(3), server(4)];
            conf[2].backup = true;
            conf[3].backup = true;
            let mut g = group(balance, conf);
            let t = Tried::default();
            for k in 0..100 {
                assert!(
                    g.pick_position(loopback(k + 1), secs(0), &t).unwrap() < 2,
                    "{name}"
                );
            }
            g.set_health(ServerId(0), false);
            assert!(g.connect_failed(ServerId(1), secs(0)));
            for k in 0..100 {
                assert!(
                    g.pick_position(loopback(k + 1), secs(1), &t).unwrap() >= 2,
                    "{name}"
                );
            }
            // Primaries that were tried count as unavailable for that client.
            g.set_health(ServerId(0), true);
            let mut tried = Tried::default();
            tried.insert(ServerId(0));
            assert!(
                g.pick_position(loopback(1), secs(1), &tried).unwrap() >= 2,
                "{name}"
            );
            assert_eq!(
                g.pick_position(loopback(1), secs(1), &Tried::default()),
                Some(0),
                "{name}"
            );
            assert_eq!(
                g.pick_position(loopback(1), secs(10), &tried),
                Some(1),
                "{name}"
            );
        }
    }

    #[test]
    fn down_is_never_picked_and_health_comes_back() {
        let mut conf = vec![server(1), server(2)];
        conf[0].down = true;
        let mut g = group(Balance::RoundRobin, conf);
        let t = Tried::default();
        for _ in 0..10 {
            assert_eq!(g.pick_position(loopback(1), secs(0), &t), Some(1));
        }
        g.set_health(ServerId(0), true);
        assert!(
            !g.is_available(ServerId(0), secs(0)),
            "set_health does not override down"
        );
        g.set_health(ServerId(1), false);
        assert_eq!(g.pick_position(loopback(1), secs(0), &t), None);
        g.set_health(ServerId(1), true);
        assert_eq!(g.pick_position(loopback(1), secs(0), &t), Some(1));
    }

    #[test]
    fn max_conns_full_server_is_skipped_until_released() {
        let mut conf = vec![server(1), server(2)];
        conf[0].max_conns = 2;
        let mut g = group(Balance::RoundRobin, conf);
        g.acquire(ServerId(0));
        assert!(g.is_available(ServerId(0), secs(0)));
        g.acquire(ServerId(0));
        assert!(!g.is_available(ServerId(0), secs(0)));
        let t = Tried::default();
        assert_eq!(g.pick_position(loopback(1), secs(0), &t), Some(1));
        assert_eq!(g.pick_position(loopback(1), secs(0), &t), Some(1));
        g.release(ServerId(0));
        assert_eq!(g.pick_position(loopback(1), secs(0), &t), Some(0));
    }

    #[test]
    fn release_saturates_and_bad_indices_are_ignored() {
        let mut g = group(Balance::LeastConn, vec![server(1)]);
        g.release(ServerId(0));
        assert_eq!(g.servers()[0].active, 0);
        g.acquire(ServerId(7));
        g.release(ServerId(7));
        g.set_health(ServerId(7), false);
        g.connected(ServerId(7), secs(0));
        assert!(!g.connect_failed(ServerId(7), secs(0)));
        assert!(!g.is_available(ServerId(7), secs(0)));
    }

    #[test]
    fn empty_and_all_unavailable_groups_pick_nothing() {
        for (name, balance) in Balance::ALL {
            let mut g = group(balance, Vec::new());
            assert_eq!(
                g.pick_position(loopback(1), secs(0), &Tried::default()),
                None,
                "{name}"
            );

            let mut conf = vec![server(1), server(2), server(3)];
            conf[2].backup = true;
            let mut g = group(balance, conf);
            for i in 0..3 {
                assert!(g.connect_failed(ServerId(i), secs(0)));
            }
            assert_eq!(
                g.pick_position(loopback(1), secs(1), &Tried::default()),
                None,
                "{name}"
            );
        }
    }

    #[test]
    fn shared_state_follows_every_change() {
        let (conf, shared) = shared_servers(Balance::LeastConn, vec![fails(1, 10), server(2)]);
        let mut g = Group::new(&conf, &shared, Arc::default());
        let load = |i: usize| shared[i].active.load(Ordering::Relaxed);
        g.acquire(ServerId(0));
        g.acquire(ServerId(0));
        g.release(ServerId(0));
        assert_eq!(load(0), 1);
        g.release(ServerId(0));
        g.release(ServerId(0));
        assert_eq!(load(0), 0, "never below 0");
        assert!(g.connect_failed(ServerId(0), secs(0)));
        assert!(shared[0].marked.load(Ordering::Relaxed));
        assert_eq!(shared[0].connect_failures.load(Ordering::Relaxed), 1);
        g.connected(ServerId(0), secs(11));
        assert!(!shared[0].marked.load(Ordering::Relaxed));
        g.set_health(ServerId(1), false);
        assert!(!shared[1].healthy.load(Ordering::Relaxed));
        // A second group over the same servers (another worker) adds to the same counts.
        let mut other = Group::new(&conf, &shared, Arc::default());
        g.acquire(ServerId(1));
        other.acquire(ServerId(1));
        assert_eq!(load(1), 2);
    }

    #[test]
    fn workers_share_failures_marks_and_health_verdicts() {
        for (name, balance) in Balance::ALL {
            let (conf, shared) = shared_servers(balance, vec![fails(2, 10), server(2)]);
            let changes = Arc::new(UpstreamShared::default());
            let mut a = Group::new(&conf, &shared, Arc::clone(&changes));
            let mut b = Group::new(&conf, &shared, Arc::clone(&changes));
            // One failure in each worker reaches max_fails=2 together.
            assert!(!a.connect_failed(ServerId(0), secs(0)), "{name}");
            assert!(b.connect_failed(ServerId(0), secs(1)), "{name}");
            for k in 0..20 {
                assert_eq!(
                    a.pick(loopback(k + 1), secs(2), &Tried::default()),
                    Some(ServerId(1)),
                    "{name}"
                );
            }
            // The mark runs out for both; a success in one clears the count for both.
            assert!(a.is_available(ServerId(0), secs(11)), "{name}");
            b.connected(ServerId(0), secs(12));
            assert!(
                !a.connect_failed(ServerId(0), secs(13)),
                "{name}: the count started again"
            );
            // A health verdict reached in one worker (the probes run in one) reaches the other.
            a.set_health(ServerId(1), false);
            for k in 0..20 {
                assert_eq!(
                    b.pick(loopback(k + 1), secs(14), &Tried::default()),
                    Some(ServerId(0)),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn an_operator_drain_or_down_takes_a_server_out_of_every_method() {
        for (name, balance) in Balance::ALL {
            let (conf, shared) = shared_servers(balance, vec![server(1), server(2), server(3)]);
            let mut g = Group::new(&conf, &shared, Arc::default());
            shared[0].set_admin(AdminState::Drain);
            shared[1].set_admin(AdminState::Down);
            for k in 0..50 {
                let got = g.pick(loopback(k + 1), secs(0), &Tried::default());
                assert_eq!(got, Some(ServerId(2)), "{name}");
            }
            shared[2].set_admin(AdminState::Drain);
            assert_eq!(
                g.pick(loopback(1), secs(0), &Tried::default()),
                None,
                "{name}"
            );
            shared[0].set_admin(AdminState::Up);
            assert_eq!(
                g.pick(loopback(1), secs(0), &Tried::default()),
                Some(ServerId(0)),
                "{name}"
            );
        }
    }

    #[test]
    fn the_passive_window_is_readable_from_other_threads() {
        let (conf, shared) = shared_servers(Balance::RoundRobin, vec![fails(2, 10)]);
        let mut g = Group::new(&conf, &shared, Arc::default());
        assert!(!g.connect_failed(ServerId(0), secs(0)));
        assert_eq!(shared[0].fails.load(Ordering::Relaxed), 1);
        assert_eq!(shared[0].unavailable_until(), None);
        assert!(g.connect_failed(ServerId(0), secs(1)));
        let until = shared[0].unavailable_until().expect("marked");
        let due = secs(11);
        assert!(
            until.max(due) - until.min(due) <= Duration::from_millis(1),
            "{until:?}"
        );
        g.connected(ServerId(0), secs(12));
        assert_eq!(shared[0].unavailable_until(), None);
        assert_eq!(shared[0].fails.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn absurd_fail_timeout_does_not_panic() {
        let mut conf = fails(1, 0);
        conf.fail_timeout = Duration::MAX;
        let mut g = group(Balance::RoundRobin, vec![conf]);
        assert!(g.connect_failed(ServerId(0), secs(0)));
        assert!(!g.is_available(ServerId(0), secs(3600)));
    }

    /// Tables and one worker's groups for config text `text`, carried from `before`.
    fn reload(
        text: &str,
        before: Option<(Vec<Group>, &crate::metrics::Tables)>,
    ) -> (Vec<Group>, Remap, crate::metrics::Tables) {
        let config = config::Config::parse(text, "t.conf").expect("config");
        let empty = crate::metrics::Tables::default();
        let (old, old_tables) = before.unwrap_or((Vec::new(), &empty));
        let tables = crate::metrics::Tables::carry(old_tables, &config);
        let (groups, remap) = rebuild(old, &config.upstreams, &tables);
        (groups, remap, tables)
    }

    const LISTEN: &str = "listen 127.0.0.1:9 { proxy a; }";

    #[test]
    fn a_reload_keeps_counts_and_verdicts_of_servers_that_stay() {
        let text = format!(
            "upstream a {{ balance least_conn; server 127.0.0.1:1; server 127.0.0.1:2; }} {LISTEN}"
        );
        let (mut groups, _, tables) = reload(&text, None);
        groups[0].acquire(ServerId(1));
        groups[0].acquire(ServerId(1));
        groups[0].set_health(ServerId(0), false);
        // The same servers listed the other way round, and a third one.
        let text = format!(
            "upstream a {{ balance least_conn; server 127.0.0.1:3; server 127.0.0.1:2; server 127.0.0.1:1; }} {LISTEN}"
        );
        let (mut groups, remap, _) = reload(&text, Some((groups, &tables)));
        assert_eq!(remap.upstream(UpstreamId(0)), UpstreamId(0));
        assert_eq!(remap.server(UpstreamId(0), ServerId(1)), Some(ServerId(1)));
        assert_eq!(remap.server(UpstreamId(0), ServerId(0)), Some(ServerId(2)));
        let g = &mut groups[0];
        assert_eq!(g.server(ServerId(1)).map(|s| s.active), Some(2));
        // :1 is still down, :2 has two connections: least_conn picks the new :3.
        let client = loopback(1);
        assert_eq!(
            g.pick(client, secs(0), &Tried::default()),
            Some(ServerId(0))
        );
        assert!(
            !g.is_available(ServerId(2), secs(0)),
            "down before, down after"
        );
        // Releasing the carried connections lands on the same server.
        g.release(ServerId(1));
        g.release(ServerId(1));
        assert_eq!(g.server(ServerId(1)).map(|s| s.active), Some(0));
    }

    #[test]
    fn a_removed_server_stays_retired_while_held_then_goes() {
        let text = format!("upstream a {{ server 127.0.0.1:1; server 127.0.0.1:2; }} {LISTEN}");
        let (mut groups, _, tables) = reload(&text, None);
        groups[0].acquire(ServerId(0));
        let text = format!("upstream a {{ server 127.0.0.1:2; }} {LISTEN}");
        let (mut groups, remap, tables) = reload(&text, Some((groups, &tables)));
        let held = remap
            .server(UpstreamId(0), ServerId(0))
            .expect("held server kept");
        assert_eq!(held, ServerId(1), "retired after the config's servers");
        assert_eq!(remap.server(UpstreamId(0), ServerId(1)), Some(ServerId(0)));
        for k in 0..50 {
            let pick = groups[0].pick(loopback(k), secs(0), &Tried::default());
            assert_eq!(pick, Some(ServerId(0)), "a retired server is never picked");
        }
        assert!(!groups[0].is_available(held, secs(0)));
        groups[0].release(held);
        // Nothing holds it now: the next reload lets it go.
        let (groups, remap, _) = reload(&text, Some((groups, &tables)));
        assert_eq!(groups[0].servers().len(), 1);
        assert_eq!(remap.server(UpstreamId(0), held), None);
    }

    #[test]
    fn a_removed_upstream_stays_while_held() {
        let text = format!(
            "upstream a {{ server 127.0.0.1:1; }} upstream b {{ server 127.0.0.1:2; }} {LISTEN}"
        );
        let (mut groups, _, tables) = reload(&text, None);
        groups[1].acquire(ServerId(0));
        let text = format!("upstream a {{ server 127.0.0.1:1; }} {LISTEN}");
        let (groups, remap, tables) = reload(&text, Some((groups, &tables)));
        assert_eq!(groups.len(), 2, "b retired after the config's groups");
        assert_eq!(remap.upstream(UpstreamId(1)), UpstreamId(1));
        assert_eq!(groups[1].name, "b");
        assert_eq!(remap.server(UpstreamId(1), ServerId(0)), Some(ServerId(0)));
        // Unheld, the next reload drops it; its old id then names nothing.
        let (mut groups, remap, _) = {
            let mut groups = groups;
            groups[1].release(ServerId(0));
            reload(&text, Some((groups, &tables)))
        };
        assert_eq!(groups.len(), 1);
        assert!(groups.get_mut(remap.upstream(UpstreamId(1)).0).is_none());
    }

    #[test]
    fn tried_servers_follow_their_new_ids() {
        let mut t = Tried::default();
        t.insert(ServerId(0));
        t.insert(ServerId(2));
        let moved = t.remap(&[Some(ServerId(5)), Some(ServerId(0)), None]);
        assert!(moved.contains(ServerId(5)));
        assert!(!moved.contains(ServerId(0)) && !moved.contains(ServerId(2)));
    }
}
