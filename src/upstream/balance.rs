//! Balancers: which server of a pool takes the next connection.
//!
//! A group has two pools, primaries and backups; each pool runs its own instance of the group's
//! method over its members (so a hashed client stays sticky on the backups too). A pool only sees
//! group indices and asks an `eligible` test (available now and not yet tried by this client);
//! passive and active health live in `mod.rs`.
//!
//! Invariants: every structure is built once, in `Pool::new`; a pick never allocates (it reads
//! vectors sized at build time and writes only cursors, counters and stamps in place). Costs per
//! pick, n = servers in the pool:
//!
//! - `round_robin`: O(1 + servers skipped); O(n) only when most servers are unavailable.
//!   Weights are ignored: plain rotation (use `weighted_round_robin` for weights).
//! - `weighted_round_robin`: nginx's smooth weighted round robin, precomputed as one period of its
//!   sequence (weights divided by their gcd; at most `SCHEDULE_MAX` entries). O(1) while one of the
//!   next `SCHEDULE_SKIPS` scheduled servers is eligible; otherwise one nginx pass over the eligible
//!   servers, O(n), which keeps the shares by weight among the servers that remain.
//! - `least_conn`: a tournament tree ranked by (listed, active/weight, least recently picked), so
//!   ties rotate. O(log n) per pick, and per acquire/release/health change; plus O(log n) for each
//!   tried server that still ranks ahead (retries only).
//! - `random`: two choices drawn by weight (binary search over cumulative weights, O(log n)), the
//!   one with fewer active connections relative to weight wins. If `RANDOM_DRAWS` draws find no
//!   eligible server, one O(n) scan for the least loaded.
//! - `ip_hash`: weighted rendezvous hashing, O(n): each eligible server scores the client from the
//!   client's hash and the server's own address, the best score wins. Nothing depends on the order
//!   of the `server` lines (two instances that list the same servers in any order agree on every
//!   client), and adding or removing one of N servers moves only the clients it wins or won,
//!   about 1/N of them, none between two servers that stay.
//! - `hash`: consistent hashing on a ring of (point, server) sorted by point, binary search
//!   O(log P) with P points; an ineligible server's clients walk on to the next point, expected
//!   O(1) steps. After `RING_CHECK_AFTER` fruitless steps an O(n) test decides between None and
//!   walking on (degenerate only).
//!
//! Hash methods use fixed functions with no per-process seed (FNV-1a 64 over the bytes, then the
//! splitmix64 finaliser), so every sluice instance, before and after a restart, maps a client alike.

use std::cmp::Ordering;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::ServerState;
use crate::config::Balance;

/// Most entries in a smooth WRR schedule (4 bytes each). Weights whose reduced sum is larger are
/// scaled down proportionally (each at least 1): shares then round to 1/16384.
const SCHEDULE_MAX: u64 = 16_384;
/// Scheduled entries a weighted pick may skip before it falls back to a live nginx pass.
const SCHEDULE_SKIPS: usize = 8;
/// Draws `random` makes looking for two distinct eligible servers.
const RANDOM_DRAWS: usize = 8;
/// Ring points per unit of weight: 160 points give each server a share within about 8% of its due.
const RING_POINTS_PER_WEIGHT: u64 = 160;
/// Most points on one ring (8 bytes each: 320 KB). Up to 250 units of weight in a pool every server
/// has exactly 160 points per unit, and removing a server never moves a client between two servers
/// that stay. Past that, points scale down with the total weight (each server keeps at least one),
/// so a removal also shifts a few clients between the servers that stay.
const RING_MAX_POINTS: u64 = 40_000;
/// Ring steps `hash` takes before checking whether any server of the pool is eligible at all.
const RING_CHECK_AFTER: usize = 32;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The splitmix64 finaliser: FNV-1a's low and high bits are weak; this spreads every input bit.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `h` mapped onto `0..n` by its high bits (no modulo bias worth the name, no division).
fn below(h: u64, n: u64) -> u64 {
    ((u128::from(h) * u128::from(n)) >> 64) as u64
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack listener sees) is its IPv4
/// address, so a client hashes alike whichever listener it came through.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn fnv_ip(h: u64, ip: IpAddr) -> u64 {
    match canonical(ip) {
        IpAddr::V4(a) => fnv1a(fnv1a(h, &[4]), &a.octets()),
        IpAddr::V6(a) => fnv1a(fnv1a(h, &[6]), &a.octets()),
    }
}

/// The hash of a client address used by `ip_hash` and `hash`: splitmix64's finaliser over FNV-1a 64
/// of a family byte (4 or 6) and the whole address (all 4 or 16 octets; unlike nginx's `ip_hash`,
/// not only the /24). Fixed forever: changing it moves every hashed client of every deployment.
pub fn client_hash(ip: IpAddr) -> u64 {
    mix64(fnv_ip(FNV_OFFSET, ip))
}

/// Ring point `k` of the server at `addr`: derived from the address alone, so the points of a server
/// stay where they are when other servers come or go or the config lines are reordered.
fn ring_point(addr: SocketAddr, k: u64) -> u32 {
    let h = fnv_ip(FNV_OFFSET, addr.ip());
    let h = fnv1a(h, &addr.port().to_be_bytes());
    (mix64(fnv1a(h, &k.to_be_bytes())) >> 32) as u32
}

fn ring_points(weight: u64, total: u64) -> u64 {
    if total.saturating_mul(RING_POINTS_PER_WEIGHT) <= RING_MAX_POINTS {
        weight * RING_POINTS_PER_WEIGHT
    } else {
        (weight * RING_MAX_POINTS / total).max(1)
    }
}

/// A seed for `random` that differs between groups, workers and processes (only the hash methods
/// must agree across processes).
pub(super) fn process_seed(name: &str) -> u64 {
    static GROUPS: AtomicU64 = AtomicU64::new(0);
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = GROUPS.fetch_add(1, AtomicOrdering::Relaxed);
    mix64(time ^ fnv1a(FNV_OFFSET, name.as_bytes()) ^ n.wrapping_mul(GOLDEN))
}

/// splitmix64: tiny, fast, and plenty for picking two servers.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix64(self.0)
    }
}

fn weight(s: &ServerState) -> u64 {
    u64::from(s.conf.weight.max(1))
}

/// Orders two servers by active connections relative to weight (cross-multiplied, no floats).
fn load_cmp(a: &ServerState, b: &ServerState) -> Ordering {
    (u64::from(a.active) * weight(b)).cmp(&(u64::from(b.active) * weight(a)))
}

/// The servers of one pool (primaries or backups) and the state of its method.
#[derive(Clone)]
pub(super) struct Pool {
    /// Group indices of the pool's servers, in config order. "Position" below indexes this.
    members: Vec<usize>,
    method: Method,
}

#[derive(Clone)]
enum Method {
    RoundRobin { next: usize },
    Weighted(Smooth),
    LeastConn(Tournament),
    Random { weights: Weights, rng: Rng },
    IpHash(Rendezvous),
    Hash(Ring),
}

impl Pool {
    pub(super) fn new(
        balance: Balance,
        members: Vec<usize>,
        servers: &[ServerState],
        seed: u64,
    ) -> Pool {
        let weights: Vec<u64> = members.iter().map(|&i| weight(&servers[i])).collect();
        let method = match balance {
            Balance::RoundRobin => Method::RoundRobin { next: 0 },
            Balance::WeightedRoundRobin => Method::Weighted(Smooth::new(&weights)),
            Balance::LeastConn => Method::LeastConn(Tournament::new(&members, servers)),
            Balance::Random => Method::Random {
                weights: Weights::new(&weights),
                rng: Rng(seed),
            },
            Balance::IpHash => Method::IpHash(Rendezvous::new(&members, servers, &weights)),
            Balance::Hash => Method::Hash(Ring::new(&members, servers, &weights)),
        };
        Pool { members, method }
    }

    /// A server of this pool that passes `eligible`, or None.
    pub(super) fn pick<F: Fn(usize) -> bool>(
        &mut self,
        servers: &[ServerState],
        client: IpAddr,
        eligible: &F,
    ) -> Option<usize> {
        let members = &self.members;
        if members.is_empty() {
            return None;
        }
        let pos = match &mut self.method {
            Method::RoundRobin { next } => {
                let pos = scan(members, *next, eligible)?;
                *next = (pos + 1) % members.len();
                Some(pos)
            }
            Method::Weighted(smooth) => smooth.pick(members, servers, eligible),
            Method::LeastConn(tree) => tree.pick(members, servers, eligible),
            Method::Random { weights, rng } => random(members, servers, weights, rng, eligible),
            Method::IpHash(rendezvous) => rendezvous.pick(members, client, eligible),
            Method::Hash(ring) => ring.pick(members, client, eligible),
        }?;
        Some(members[pos])
    }

    /// The server at pool position `pos` changed something `least_conn` ranks on (active count,
    /// health, failure mark). O(log n) for `least_conn`, nothing for the other methods.
    pub(super) fn update(&mut self, servers: &[ServerState], pos: usize) {
        if let Method::LeastConn(tree) = &mut self.method {
            tree.update(&self.members, servers, pos);
        }
    }

    pub(super) fn reseed(&mut self, seed: u64) {
        if let Method::Random { rng, .. } = &mut self.method {
            *rng = Rng(seed);
        }
    }
}

/// The first eligible position from `start` on, wrapping.
fn scan<F: Fn(usize) -> bool>(members: &[usize], start: usize, eligible: &F) -> Option<usize> {
    let n = members.len();
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&pos| eligible(members[pos]))
}

/// One period of nginx's smooth weighted round robin, plus the live state of its fallback pass.
#[derive(Clone)]
struct Smooth {
    /// Pool positions. With every server eligible, reading it in a circle *is* nginx's sequence.
    schedule: Vec<u32>,
    cursor: usize,
    /// nginx's `current_weight` per position, for picks that fall back to the live pass.
    current: Vec<i64>,
}

impl Smooth {
    fn new(weights: &[u64]) -> Smooth {
        Smooth {
            schedule: schedule(weights),
            cursor: 0,
            current: vec![0; weights.len()],
        }
    }

    fn pick<F: Fn(usize) -> bool>(
        &mut self,
        members: &[usize],
        servers: &[ServerState],
        eligible: &F,
    ) -> Option<usize> {
        let len = self.schedule.len();
        // Skipping an entry of an ineligible server keeps the others' shares exact (each of their
        // entries is still taken once per period); only the interleaving gets lumpier.
        for _ in 0..SCHEDULE_SKIPS.min(len) {
            let pos = self.schedule[self.cursor] as usize;
            self.cursor = (self.cursor + 1) % len;
            if eligible(members[pos]) {
                return Some(pos);
            }
        }
        // nginx's pass over the eligible servers: add each one's weight, take the largest, charge it
        // the total.
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (pos, &i) in members.iter().enumerate() {
            if !eligible(i) {
                continue;
            }
            let w = weight(&servers[i]) as i64;
            self.current[pos] += w;
            total += w;
            if best.map_or(true, |b| self.current[pos] > self.current[b]) {
                best = Some(pos);
            }
        }
        let best = best?;
        self.current[best] -= total;
        Some(best)
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// nginx's sequence for `weights` over one period (the sum of the reduced weights). Built in
/// O(period × n), once per config load.
fn schedule(weights: &[u64]) -> Vec<u32> {
    let g = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    let mut w: Vec<u64> = weights.iter().map(|&x| x / g).collect();
    let total: u64 = w.iter().sum();
    if total > SCHEDULE_MAX {
        for x in &mut w {
            *x = (*x * SCHEDULE_MAX / total).max(1);
        }
    }
    if w.iter().all(|&x| x == 1) {
        return (0..w.len() as u32).collect();
    }
    let total: u64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (pos, &x) in w.iter().enumerate() {
            current[pos] += x as i64;
            if current[pos] > current[best] {
                best = pos;
            }
        }
        current[best] -= total as i64;
        out.push(best as u32);
    }
    out
}

/// Tournament tree for `least_conn`: leaf p is pool position p, an inner node holds the better of
/// its children's winners, the root the best server of the pool.
#[derive(Clone)]
struct Tournament {
    /// Leaves in the tree: a power of two ≥ the pool size.
    leaves: usize,
    /// Heap layout from index 1; `nodes[leaves + p]` is leaf p; NONE marks padding.
    nodes: Vec<u32>,
    /// When each position was last picked (by `clock`); among equal loads the oldest wins, so
    /// ties rotate in round-robin order.
    stamps: Vec<u64>,
    clock: u64,
}

const NONE: u32 = u32::MAX;

impl Tournament {
    fn new(members: &[usize], servers: &[ServerState]) -> Tournament {
        let leaves = members.len().next_power_of_two().max(1);
        let mut tree = Tournament {
            leaves,
            nodes: vec![NONE; 2 * leaves],
            stamps: vec![0; members.len()],
            clock: 0,
        };
        for pos in 0..members.len() {
            tree.nodes[leaves + pos] = pos as u32;
        }
        for node in (1..leaves).rev() {
            tree.nodes[node] = tree.winner(members, servers, 2 * node, 2 * node + 1);
        }
        tree
    }

    /// True if position `a` ranks strictly before position `b`.
    fn beats(&self, members: &[usize], servers: &[ServerState], a: u32, b: u32) -> bool {
        if a == NONE || b == NONE {
            return b == NONE && a != NONE;
        }
        let (sa, sb) = (&servers[members[a as usize]], &servers[members[b as usize]]);
        match (sa.listed(), sb.listed()) {
            (true, false) => return true,
            (false, true) => return false,
            _ => {}
        }
        match load_cmp(sa, sb) {
            Ordering::Less => true,
            Ordering::Greater => false,
            Ordering::Equal => (self.stamps[a as usize], a) < (self.stamps[b as usize], b),
        }
    }

    fn winner(&self, members: &[usize], servers: &[ServerState], l: usize, r: usize) -> u32 {
        let (a, b) = (self.nodes[l], self.nodes[r]);
        if self.beats(members, servers, b, a) {
            b
        } else {
            a
        }
    }

    fn update(&mut self, members: &[usize], servers: &[ServerState], pos: usize) {
        let mut node = (self.leaves + pos) / 2;
        while node >= 1 {
            self.nodes[node] = self.winner(members, servers, 2 * node, 2 * node + 1);
            node /= 2;
        }
    }

    /// The best eligible position under `node`. A subtree whose winner is eligible answers at
    /// once; one whose winner is not even listed has nothing eligible; otherwise (the winner was
    /// tried) both children are searched.
    fn search<F: Fn(usize) -> bool>(
        &self,
        node: usize,
        members: &[usize],
        servers: &[ServerState],
        eligible: &F,
    ) -> Option<u32> {
        let w = self.nodes[node];
        if w == NONE || !servers[members[w as usize]].listed() {
            return None;
        }
        if eligible(members[w as usize]) {
            return Some(w);
        }
        if node >= self.leaves {
            return None;
        }
        let l = self.search(2 * node, members, servers, eligible);
        let r = self.search(2 * node + 1, members, servers, eligible);
        match (l, r) {
            (Some(a), Some(b)) if self.beats(members, servers, b, a) => Some(b),
            (Some(a), _) => Some(a),
            (None, b) => b,
        }
    }

    fn pick<F: Fn(usize) -> bool>(
        &mut self,
        members: &[usize],
        servers: &[ServerState],
        eligible: &F,
    ) -> Option<usize> {
        let pos = self.search(1, members, servers, eligible)? as usize;
        self.clock += 1;
        self.stamps[pos] = self.clock;
        self.update(members, servers, pos);
        Some(pos)
    }
}

/// Cumulative weights: a value in `0..total` falls on a position with probability weight/total.
#[derive(Clone)]
struct Weights {
    cumulative: Vec<u64>,
    total: u64,
}

impl Weights {
    fn new(weights: &[u64]) -> Weights {
        let mut total = 0;
        let cumulative = weights
            .iter()
            .map(|&w| {
                total += w;
                total
            })
            .collect();
        Weights { cumulative, total }
    }

    /// The position that owns hash or random value `h`.
    fn locate(&self, h: u64) -> usize {
        let r = below(h, self.total);
        self.cumulative.partition_point(|&c| c <= r)
    }
}

fn random<F: Fn(usize) -> bool>(
    members: &[usize],
    servers: &[ServerState],
    weights: &Weights,
    rng: &mut Rng,
    eligible: &F,
) -> Option<usize> {
    if members.len() == 1 {
        return eligible(members[0]).then_some(0);
    }
    let mut first: Option<usize> = None;
    for _ in 0..RANDOM_DRAWS {
        let pos = weights.locate(rng.next());
        if first == Some(pos) || !eligible(members[pos]) {
            continue;
        }
        match first {
            None => first = Some(pos),
            Some(f) => {
                let lighter = load_cmp(&servers[members[pos]], &servers[members[f]]);
                return Some(if lighter == Ordering::Less { pos } else { f });
            }
        }
    }
    if first.is_some() {
        return first;
    }
    // Degenerate: the draws kept landing on ineligible servers. Take the least loaded eligible
    // one, starting the scan at a random place so that ties spread.
    let n = members.len();
    let start = below(rng.next(), n as u64) as usize;
    let mut best: Option<usize> = None;
    for pos in (0..n).map(|k| (start + k) % n) {
        let i = members[pos];
        if eligible(i)
            && best.map_or(true, |b| {
                load_cmp(&servers[i], &servers[members[b]]).is_lt()
            })
        {
            best = Some(pos);
        }
    }
    best
}

/// The key of a server for hashing: its address alone, never its position.
fn server_key(addr: SocketAddr) -> u64 {
    fnv1a(fnv_ip(FNV_OFFSET, addr.ip()), &addr.port().to_be_bytes())
}

/// Weighted rendezvous (highest random weight) hashing for `ip_hash`.
#[derive(Clone)]
struct Rendezvous {
    /// `server_key` of each pool position.
    keys: Vec<u64>,
    weights: Vec<f64>,
    /// All weights are equal: scores compare as integers, exactly alike on every platform.
    plain: bool,
}

impl Rendezvous {
    fn new(members: &[usize], servers: &[ServerState], weights: &[u64]) -> Rendezvous {
        Rendezvous {
            keys: members
                .iter()
                .map(|&i| server_key(servers[i].conf.addr))
                .collect(),
            weights: weights.iter().map(|&w| w as f64).collect(),
            plain: weights.windows(2).all(|w| w[0] == w[1]),
        }
    }

    /// The score of position `pos` for a client hashed to `h`. With weights, `-w / ln(u)` for a
    /// uniform `u` in (0, 1) gives each server a share of clients in proportion to its weight.
    fn score(&self, h: u64, pos: usize) -> (f64, u64) {
        let key = self.keys.get(pos).copied().unwrap_or(0);
        let x = mix64(h ^ key);
        if self.plain {
            return (0.0, x);
        }
        let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let w = self.weights.get(pos).copied().unwrap_or(1.0);
        (-w / u.ln(), x)
    }

    fn pick<F: Fn(usize) -> bool>(
        &self,
        members: &[usize],
        client: IpAddr,
        eligible: &F,
    ) -> Option<usize> {
        let h = client_hash(client);
        let mut best: Option<(usize, (f64, u64))> = None;
        for (pos, &i) in members.iter().enumerate() {
            if !eligible(i) {
                continue;
            }
            let score = self.score(h, pos);
            let wins = best.map_or(true, |(_, b)| {
                score.0 > b.0 || (score.0 == b.0 && score.1 > b.1)
            });
            if wins {
                best = Some((pos, score));
            }
        }
        best.map(|(pos, _)| pos)
    }
}

/// Consistent-hash ring. A ring rather than Maglev because a ring guarantees that removing a server
/// moves only that server's clients; Maglev's table also reshuffles a few between the others.
#[derive(Clone)]
struct Ring {
    /// (point, pool position), sorted by point and, on the rare equal points, by server address.
    points: Vec<(u32, u32)>,
}

impl Ring {
    fn new(members: &[usize], servers: &[ServerState], weights: &[u64]) -> Ring {
        let total: u64 = weights.iter().sum();
        let mut points = Vec::new();
        for (pos, &i) in members.iter().enumerate() {
            let addr = servers[i].conf.addr;
            for k in 0..ring_points(weights[pos], total) {
                points.push((ring_point(addr, k), pos as u32));
            }
        }
        let addr = |pos: u32| servers[members[pos as usize]].conf.addr;
        points.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| addr(a.1).cmp(&addr(b.1)))
                .then(a.1.cmp(&b.1))
        });
        Ring { points }
    }

    fn pick<F: Fn(usize) -> bool>(
        &self,
        members: &[usize],
        client: IpAddr,
        eligible: &F,
    ) -> Option<usize> {
        let len = self.points.len();
        let key = (client_hash(client) >> 32) as u32;
        let start = self.points.partition_point(|p| p.0 < key);
        for step in 0..len {
            if step == RING_CHECK_AFTER && !members.iter().any(|&i| eligible(i)) {
                return None;
            }
            let pos = self.points[(start + step) % len].1 as usize;
            if eligible(members[pos]) {
                return Some(pos);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{group, loopback, server, t0};
    use super::super::{Group, ServerId, Tried};
    use super::*;
    use crate::config::Server;
    use std::net::Ipv6Addr;

    fn pick(g: &mut Group) -> Option<usize> {
        g.pick_position(loopback(1), t0(), &Tried::default())
    }

    fn picks(g: &mut Group, n: usize) -> Vec<usize> {
        (0..n).map(|_| pick(g).unwrap()).collect()
    }

    fn weighted(port: u16, weight: u32) -> Server {
        Server {
            weight,
            ..server(port)
        }
    }

    fn servers(n: u16) -> Vec<Server> {
        (0..n).map(|k| server(10_000 + k)).collect()
    }

    fn counts(seq: &[usize], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in seq {
            c[i] += 1;
        }
        c
    }

    /// 10,000 distinct client addresses, all inside 127.0.0.0/8.
    fn clients() -> impl Iterator<Item = IpAddr> {
        (0..10_000u32).map(|k| loopback(k + 1))
    }

    #[test]
    fn round_robin_rotates_and_ignores_weight() {
        let mut g = group(
            Balance::RoundRobin,
            vec![weighted(1, 5), server(2), server(3)],
        );
        assert_eq!(picks(&mut g, 7), [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn round_robin_skips_unavailable_servers() {
        let mut g = group(Balance::RoundRobin, servers(4));
        g.set_health(ServerId(1), false);
        assert_eq!(picks(&mut g, 6), [0, 2, 3, 0, 2, 3]);
    }

    #[test]
    fn smooth_weighted_round_robin_is_nginx_sequence() {
        let mut g = group(
            Balance::WeightedRoundRobin,
            vec![weighted(1, 5), weighted(2, 1), weighted(3, 1)],
        );
        let (a, b, c) = (0, 1, 2);
        let period = [a, a, b, a, c, a, a];
        assert_eq!(picks(&mut g, 7), period);
        assert_eq!(picks(&mut g, 7), period);
    }

    #[test]
    fn smooth_schedule_matches_live_nginx_pass_and_reduces_by_gcd() {
        assert_eq!(schedule(&[10, 2, 2]), schedule(&[5, 1, 1]));
        assert_eq!(schedule(&[3, 3, 3]), [0, 1, 2]);
        // weights 4,3,2: nginx gives a b c a a b c b a (hand-checked against ngx_http_upstream_round_robin.c)
        assert_eq!(schedule(&[4, 3, 2]), [0, 1, 2, 0, 1, 0, 2, 1, 0]);
    }

    #[test]
    fn smooth_schedule_is_capped() {
        let weights: Vec<u64> = (0..40).map(|k| 1000 - k).collect();
        let s = schedule(&weights);
        assert!(s.len() as u64 <= SCHEDULE_MAX + 40, "{}", s.len());
        let c = counts(&s.iter().map(|&p| p as usize).collect::<Vec<_>>(), 40);
        assert!(c.iter().all(|&n| n > 0));
    }

    #[test]
    fn weighted_keeps_shares_when_a_server_is_down() {
        let mut conf = vec![weighted(1, 5), weighted(2, 1), weighted(3, 2)];
        conf[1].down = true;
        let mut g = group(Balance::WeightedRoundRobin, conf);
        assert_eq!(counts(&picks(&mut g, 700), 3), [500, 0, 200]);
    }

    #[test]
    fn weighted_falls_back_to_live_pass_when_schedule_is_blocked() {
        // Weights 20:1 with the heavy server full: the next 8 entries are all its own, so every
        // pick goes through the live pass, which still finds the light server.
        let mut conf = vec![weighted(1, 20), weighted(2, 1)];
        conf[0].max_conns = 1;
        let mut g = group(Balance::WeightedRoundRobin, conf);
        g.acquire(ServerId(0));
        assert_eq!(picks(&mut g, 30), [1; 30]);
        g.release(ServerId(0));
        assert_eq!(counts(&picks(&mut g, 210), 2), [200, 10]);
    }

    #[test]
    fn least_conn_follows_connection_counts() {
        let mut g = group(Balance::LeastConn, servers(3));
        for _ in 0..3 {
            g.acquire(ServerId(0));
        }
        g.acquire(ServerId(2));
        assert_eq!(pick(&mut g), Some(1));
        g.acquire(ServerId(1));
        g.acquire(ServerId(1));
        assert_eq!(pick(&mut g), Some(2));
        for _ in 0..3 {
            g.release(ServerId(0));
        }
        assert_eq!(pick(&mut g), Some(0));
    }

    #[test]
    fn least_conn_breaks_ties_round_robin() {
        let mut g = group(Balance::LeastConn, servers(3));
        assert_eq!(picks(&mut g, 7), [0, 1, 2, 0, 1, 2, 0]);
        // Every pick made a connection: still a rotation.
        let mut g = group(Balance::LeastConn, servers(3));
        let seq: Vec<usize> = (0..6)
            .map(|_| {
                let i = pick(&mut g).unwrap();
                g.acquire(ServerId(i));
                i
            })
            .collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_conn_compares_active_relative_to_weight() {
        let mut g = group(Balance::LeastConn, vec![weighted(1, 3), weighted(2, 1)]);
        g.acquire(ServerId(0));
        g.acquire(ServerId(0));
        g.acquire(ServerId(1));
        assert_eq!(pick(&mut g), Some(0), "2/3 < 1/1");
        g.acquire(ServerId(0));
        // 3/3 == 1/1: a tie; server 0 was picked last, so server 1 goes.
        assert_eq!(pick(&mut g), Some(1));
        assert_eq!(pick(&mut g), Some(0));
        g.acquire(ServerId(0));
        assert_eq!(pick(&mut g), Some(1), "4/3 > 1/1");
        // Steady state: connections spread 3:1.
        let mut g = group(Balance::LeastConn, vec![weighted(1, 3), weighted(2, 1)]);
        for _ in 0..400 {
            let i = pick(&mut g).unwrap();
            g.acquire(ServerId(i));
        }
        assert_eq!((g.servers()[0].active, g.servers()[1].active), (300, 100));
    }

    #[test]
    fn least_conn_skips_tried_full_and_down() {
        let mut conf = servers(5);
        conf[1].max_conns = 1;
        conf[3].down = true;
        let mut g = group(Balance::LeastConn, conf);
        g.acquire(ServerId(1));
        for _ in 0..5 {
            g.acquire(ServerId(4));
        }
        let mut tried = Tried::default();
        tried.insert(ServerId(0));
        // 1 is full, 3 down, 0 tried: 2 (idle) before 4 (busy).
        assert_eq!(g.pick_position(loopback(1), t0(), &tried), Some(2));
        tried.insert(ServerId(2));
        assert_eq!(g.pick_position(loopback(1), t0(), &tried), Some(4));
        tried.insert(ServerId(4));
        assert_eq!(g.pick_position(loopback(1), t0(), &tried), None);
    }

    #[test]
    fn least_conn_tree_handles_many_servers() {
        let mut g = group(Balance::LeastConn, servers(100));
        for i in 0..100 {
            for _ in 0..(i % 7) {
                g.acquire(ServerId(i));
            }
        }
        // The idle servers are those with i % 7 == 0; ties go in index order.
        let idle: Vec<usize> = (0..100).filter(|i| i % 7 == 0).collect();
        assert_eq!(picks(&mut g, idle.len()), idle);
        let mut tried = Tried::default();
        for &i in &idle {
            tried.insert(ServerId(i));
        }
        let i = g.pick_position(loopback(1), t0(), &tried).unwrap();
        assert_eq!(i % 7, 1);
    }

    #[test]
    fn random_prefers_fewer_connections() {
        let mut g = group(Balance::Random, servers(3));
        g.reseed(7);
        for _ in 0..10 {
            g.acquire(ServerId(0));
        }
        for _ in 0..5 {
            g.acquire(ServerId(2));
        }
        let c = counts(&picks(&mut g, 3000), 3);
        // Server 1 wins whenever it is drawn (5/9 of pairs); 2 beats 0; 0 only if drawn alone.
        assert!(c[0] < 10, "{c:?}");
        assert!(c[1] > 1500 && c[2] > 900, "{c:?}");
    }

    #[test]
    fn random_follows_counts_as_connections_open() {
        let mut g = group(Balance::Random, servers(4));
        g.reseed(11);
        for _ in 0..4000 {
            let i = pick(&mut g).unwrap();
            g.acquire(ServerId(i));
        }
        let active: Vec<u32> = g.servers().iter().map(|s| s.active).collect();
        let (lo, hi) = (active.iter().min().unwrap(), active.iter().max().unwrap());
        assert!(hi - lo <= 3, "{active:?}");
    }

    #[test]
    fn random_idle_shares_follow_weight() {
        let mut g = group(Balance::Random, vec![weighted(1, 3), weighted(2, 1)]);
        g.reseed(3);
        let c = counts(&picks(&mut g, 8000), 2);
        // Idle servers tie, so the first weighted draw wins: about 3:1.
        assert!((5700..6300).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn client_hash_is_fixed() {
        // If these change, every hashed client of every deployment moves: don't. The values (and
        // the expected picks below) were computed by an independent Python model of the hashes.
        assert_eq!(client_hash(loopback(1)), 0xb810_e4fe_0606_3556);
        assert_eq!(client_hash("::1".parse().unwrap()), 0x3884_9cec_ae79_b513);
        let mapped = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x7f00, 1));
        assert_eq!(client_hash(mapped), client_hash(loopback(1)));
    }

    #[test]
    fn ip_hash_is_stable_across_instances() {
        // Rendezvous picks (issue 10), computed by an independent Python model of fnv1a, the
        // splitmix64 finaliser, client_hash and server_key: [2, 0, 3, 0, 2, 1, 1, 0].
        let expected = [2, 0, 3, 0, 2, 1, 1, 0];
        for _ in 0..2 {
            let mut g = group(Balance::IpHash, servers(4));
            let got: Vec<usize> = (1..=8)
                .map(|k| {
                    g.pick_position(loopback(k), t0(), &Tried::default())
                        .unwrap()
                })
                .collect();
            assert_eq!(got, expected);
        }
    }

    /// The server address each of the 10,000 clients gets.
    fn ip_hash_addresses(servers: Vec<Server>) -> Vec<SocketAddr> {
        let mut g = group(Balance::IpHash, servers);
        clients()
            .map(|ip| {
                let pos = g.pick_position(ip, t0(), &Tried::default()).unwrap();
                g.servers()[pos].conf.addr
            })
            .collect()
    }

    #[test]
    fn ip_hash_ignores_the_order_of_servers_and_moves_few_clients_on_change() {
        for weights in [[1, 1, 1, 1, 1], [1, 2, 3, 1, 5]] {
            let five: Vec<Server> = (0..5)
                .map(|k| weighted(20_000 + k as u16, weights[k]))
                .collect();
            let mut reversed = five.clone();
            reversed.reverse();
            let picks = ip_hash_addresses(five.clone());
            assert_eq!(
                picks,
                ip_hash_addresses(reversed),
                "{weights:?}: order matters"
            );
            // Remove the third server: only its clients move, and not many.
            let removed = five[2].addr;
            let four: Vec<Server> = five.iter().filter(|s| s.addr != removed).cloned().collect();
            let after = ip_hash_addresses(four);
            let mut moved = 0;
            for (before, now) in picks.iter().zip(&after) {
                if before != now {
                    moved += 1;
                    assert_eq!(
                        *before, removed,
                        "{weights:?}: a client moved between two servers that stay"
                    );
                }
            }
            assert!(
                moved * 5 <= 10_000 * 3 / 2,
                "{weights:?}: {moved} of 10,000 moved"
            );
            assert!(moved > 0);
        }
    }

    #[test]
    fn ip_hash_spreads_by_weight() {
        let mut g = group(Balance::IpHash, vec![weighted(1, 3), server(2)]);
        let seq: Vec<usize> = clients()
            .map(|ip| g.pick_position(ip, t0(), &Tried::default()).unwrap())
            .collect();
        let c = counts(&seq, 2);
        assert!((7200..7800).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn ip_hash_moves_only_the_clients_of_a_down_server() {
        let mut g = group(Balance::IpHash, servers(4));
        let before: Vec<usize> = clients()
            .map(|ip| g.pick_position(ip, t0(), &Tried::default()).unwrap())
            .collect();
        g.set_health(ServerId(2), false);
        for (ip, &b) in clients().zip(&before) {
            let now = g.pick_position(ip, t0(), &Tried::default()).unwrap();
            assert_ne!(now, 2);
            if b != 2 {
                assert_eq!(now, b);
            }
        }
    }

    fn hash_picks(g: &mut Group) -> Vec<usize> {
        clients()
            .map(|ip| g.pick_position(ip, t0(), &Tried::default()).unwrap())
            .collect()
    }

    #[test]
    fn hash_is_stable_across_instances() {
        let expected = [0, 3, 2, 2, 3, 0, 3, 2];
        for _ in 0..2 {
            let mut g = group(Balance::Hash, servers(4));
            let got: Vec<usize> = (1..=8)
                .map(|k| {
                    g.pick_position(loopback(k), t0(), &Tried::default())
                        .unwrap()
                })
                .collect();
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn hash_removal_moves_about_one_nth() {
        let n = 5;
        let all = servers(n);
        let mut g = group(Balance::Hash, all.clone());
        let before = hash_picks(&mut g);
        for removed in 0..n as usize {
            let mut rest = all.clone();
            rest.remove(removed);
            let mut g = group(Balance::Hash, rest.clone());
            let after = hash_picks(&mut g);
            let mut moved = 0;
            for (&b, &a) in before.iter().zip(&after) {
                let (b, a) = (all[b].addr, rest[a].addr);
                if b != a {
                    moved += 1;
                    // Only the removed server's clients move; never between two that stay.
                    assert_eq!(b, all[removed].addr);
                }
            }
            assert!(moved * n as usize * 2 <= 3 * 10_000, "moved {moved}");
        }
    }

    #[test]
    fn hash_order_of_config_lines_does_not_matter() {
        let all = servers(5);
        let mut g = group(Balance::Hash, all.clone());
        let before = hash_picks(&mut g);
        let mut reversed = all.clone();
        reversed.reverse();
        let mut g = group(Balance::Hash, reversed.clone());
        let after = hash_picks(&mut g);
        for (&b, &a) in before.iter().zip(&after) {
            assert_eq!(all[b].addr, reversed[a].addr);
        }
    }

    #[test]
    fn hash_down_server_goes_to_next_on_ring() {
        let mut g = group(Balance::Hash, servers(5));
        let before = hash_picks(&mut g);
        g.set_health(ServerId(3), false);
        let during = hash_picks(&mut g);
        for (&b, &d) in before.iter().zip(&during) {
            assert_ne!(d, 3);
            if b != 3 {
                assert_eq!(b, d);
            }
        }
        // The retry of a client moves it the same way: a tried server is skipped like a down one.
        g.set_health(ServerId(3), true);
        assert_eq!(hash_picks(&mut g), before);
        let mut tried = Tried::default();
        tried.insert(ServerId(3));
        for ((ip, &b), &d) in clients().zip(&before).zip(&during) {
            let retry = g.pick_position(ip, t0(), &tried).unwrap();
            assert_eq!(retry, if b == 3 { d } else { b });
        }
    }

    #[test]
    fn hash_spreads_by_weight() {
        let mut g = group(Balance::Hash, vec![weighted(1, 2), server(2), server(3)]);
        let c = counts(&hash_picks(&mut g), 3);
        assert!((4300..5700).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn ring_points_are_capped() {
        let conf: Vec<Server> = (0..100).map(|k| weighted(20_000 + k, 1000)).collect();
        let g = group(Balance::Hash, conf);
        let Method::Hash(ring) = &g.primary.method else {
            panic!("not a ring")
        };
        assert!(ring.points.len() as u64 <= RING_MAX_POINTS + 100);
        assert_eq!(ring_points(1, 5), 160);
        assert_eq!(ring_points(3, 250), 480);
        assert_eq!(ring_points(1000, 100_000), 400);
    }

    #[test]
    fn every_method_excludes_tried_and_handles_one_server() {
        for (name, balance) in Balance::ALL {
            let mut g = group(balance, servers(3));
            let mut tried = Tried::default();
            let mut seen = Vec::new();
            for _ in 0..3 {
                let i = g.pick_position(loopback(9), t0(), &tried).unwrap();
                assert!(!seen.contains(&i), "{name}: {i} picked twice");
                seen.push(i);
                tried.insert(ServerId(i));
            }
            assert_eq!(g.pick_position(loopback(9), t0(), &tried), None, "{name}");

            let mut g = group(balance, servers(1));
            assert_eq!(picks(&mut g, 3), [0, 0, 0], "{name}");
            g.set_health(ServerId(0), false);
            assert_eq!(pick(&mut g), None, "{name}");
        }
    }

    #[test]
    fn every_method_skips_down_full_and_failed() {
        for (name, balance) in Balance::ALL {
            let mut conf = servers(4);
            conf[0].down = true;
            conf[1].max_conns = 2;
            let mut g = group(balance, conf);
            g.acquire(ServerId(1));
            g.acquire(ServerId(1));
            assert!(g.connect_failed(ServerId(2), t0()));
            for k in 0..200 {
                assert_eq!(
                    g.pick_position(loopback(k + 1), t0(), &Tried::default()),
                    Some(3),
                    "{name}"
                );
            }
            g.set_health(ServerId(3), false);
            assert_eq!(pick(&mut g), None, "{name}");
        }
    }
}
