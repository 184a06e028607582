//! Per-client limits (DESIGN §3): connections (or UDP sessions) at once per client address, and
//! new connections per second per address (a token bucket), in one bounded table per worker.
//!
//! Sans-I/O: the clock is passed in. A client is its IPv4 address, or the /64 of its IPv6 one (a
//! host gets a /64, so a finer key would let one host take any number of entries). Invariants:
//! the table never holds more than its capacity; an entry with open connections is never dropped
//! (it is not even on the eviction list), so its count stays exact; the least recently used idle
//! entry goes first when room is needed; each operation is O(1) and allocates only when the table
//! grows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use slab::Slab;

use crate::config::unmapped;

/// Entries per worker by default (`per_ip_table_size`).
pub const DEFAULT_TABLE_SIZE: usize = 100_000;

/// Tokens are counted in thousandths, so rates below one per second still refill smoothly.
const MILLI: u64 = 1000;

/// A token bucket: `rate` tokens a second, at most `burst` saved up; it starts full.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    milli_tokens: u64,
    rate: u64,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32, now: Instant) -> TokenBucket {
        let burst = u64::from(burst.max(1));
        TokenBucket {
            milli_tokens: burst * MILLI,
            rate: u64::from(rate),
            burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let us =
            u64::try_from(now.saturating_duration_since(self.last).as_micros()).unwrap_or(u64::MAX);
        // rate tokens per 10^6 µs, in thousandths: rate * us / 1000.
        let add = self.rate.saturating_mul(us) / 1000;
        if add > 0 {
            self.milli_tokens = (self.milli_tokens.saturating_add(add)).min(self.burst * MILLI);
            self.last = now;
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.milli_tokens >= MILLI {
            self.milli_tokens -= MILLI;
            true
        } else {
            false
        }
    }

    /// Whole tokens left now.
    pub fn left(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.milli_tokens / MILLI
    }
}

/// A client as the limits count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(u32),
    /// The first 64 bits.
    V6(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match unmapped(ip) {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => ClientKey::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// What one listener allows each client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// Connections (or UDP sessions) at once; 0: no limit.
    pub max_per_ip: u32,
    /// New connections per second and the burst; `None`: no limit.
    pub rate: Option<(u32, u32)>,
}

impl Policy {
    pub fn is_none(&self) -> bool {
        self.max_per_ip == 0 && self.rate.is_none()
    }
}

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxPerIp,
    Rate,
    /// Every entry holds open connections: no room for a new address.
    TableFull,
}

/// What an admitted connection keeps to give its place back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    slot: usize,
}

const NIL: usize = usize::MAX;

struct Entry {
    key: (u64, ClientKey),
    open: u32,
    bucket: Option<TokenBucket>,
    /// On the idle list (open == 0): towards the newer and the older end.
    newer: usize,
    older: usize,
}

/// One worker's table of clients, by listener (a tag that names it across reloads) and address.
pub struct PerIp {
    capacity: usize,
    map: HashMap<(u64, ClientKey), usize>,
    slab: Slab<Entry>,
    /// The idle entries (no open connection), most recently used first.
    newest_idle: usize,
    oldest_idle: usize,
}

impl Default for PerIp {
    fn default() -> PerIp {
        PerIp::new(DEFAULT_TABLE_SIZE)
    }
}

impl PerIp {
    pub fn new(capacity: usize) -> PerIp {
        PerIp {
            capacity: capacity.max(1),
            map: HashMap::new(),
            slab: Slab::new(),
            newest_idle: NIL,
            oldest_idle: NIL,
        }
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// A new capacity (a reload); a smaller one drops idle entries, oldest first, down to it.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        while self.slab.len() > self.capacity && self.oldest_idle != NIL {
            let victim = self.oldest_idle;
            self.unlink(victim);
            let gone = self.slab.remove(victim);
            self.map.remove(&gone.key);
        }
    }

    /// Takes a place for a new connection of `ip` on listener `tag` under `policy`.
    pub fn admit(
        &mut self,
        tag: u64,
        ip: IpAddr,
        policy: &Policy,
        now: Instant,
    ) -> Result<Ticket, Refusal> {
        let key = (tag, ClientKey::of(ip));
        let slot = match self.map.get(&key) {
            Some(&slot) => slot,
            None => self.insert(key, policy, now)?,
        };
        let Some(e) = self.slab.get_mut(slot) else {
            return Err(Refusal::TableFull);
        };
        // A reload may have changed the listener's rate: the entry follows the policy now.
        let wanted = policy.rate;
        let has = e.bucket.map(|b| (b.rate as u32, b.burst as u32));
        if has != wanted {
            e.bucket = wanted.map(|(rate, burst)| {
                let mut fresh = TokenBucket::new(rate, burst, now);
                if let Some(mut old) = e.bucket {
                    old.refill(now);
                    fresh.milli_tokens = fresh.milli_tokens.min(old.milli_tokens);
                }
                fresh
            });
        }
        // The cap first: a client refused for it keeps its tokens.
        if policy.max_per_ip > 0 && e.open >= policy.max_per_ip {
            return Err(Refusal::MaxPerIp);
        }
        if let Some(bucket) = e.bucket.as_mut() {
            if !bucket.take(now) {
                self.touch_idle(slot);
                return Err(Refusal::Rate);
            }
        }
        e.open += 1;
        if e.open == 1 {
            self.unlink(slot);
        }
        Ok(Ticket { slot })
    }

    /// A connection admitted with `ticket` ended.
    pub fn release(&mut self, ticket: Ticket) {
        let Some(e) = self.slab.get_mut(ticket.slot) else {
            return;
        };
        if e.open == 0 {
            return;
        }
        e.open -= 1;
        if e.open == 0 {
            self.link_newest(ticket.slot);
        }
    }

    /// Open connections and whole tokens left of `ip` on listener `tag` (for `/explain`).
    pub fn state(&mut self, tag: u64, ip: IpAddr, now: Instant) -> Option<(u32, Option<u64>)> {
        let slot = *self.map.get(&(tag, ClientKey::of(ip)))?;
        let e = self.slab.get_mut(slot)?;
        Some((e.open, e.bucket.as_mut().map(|b| b.left(now))))
    }

    fn insert(
        &mut self,
        key: (u64, ClientKey),
        policy: &Policy,
        now: Instant,
    ) -> Result<usize, Refusal> {
        while self.slab.len() >= self.capacity {
            let victim = self.oldest_idle;
            if victim == NIL {
                return Err(Refusal::TableFull);
            }
            self.unlink(victim);
            let gone = self.slab.remove(victim);
            self.map.remove(&gone.key);
        }
        let slot = self.slab.insert(Entry {
            key,
            open: 0,
            bucket: policy
                .rate
                .map(|(rate, burst)| TokenBucket::new(rate, burst, now)),
            newer: NIL,
            older: NIL,
        });
        self.map.insert(key, slot);
        self.link_newest(slot);
        Ok(slot)
    }

    /// An idle entry was used: it moves to the newest end.
    fn touch_idle(&mut self, slot: usize) {
        if self.slab.get(slot).is_some_and(|e| e.open == 0) {
            self.unlink(slot);
            self.link_newest(slot);
        }
    }

    fn link_newest(&mut self, slot: usize) {
        let old_newest = self.newest_idle;
        if let Some(e) = self.slab.get_mut(slot) {
            e.newer = NIL;
            e.older = old_newest;
        }
        match self.slab.get_mut(old_newest) {
            Some(n) => n.newer = slot,
            None => self.oldest_idle = slot,
        }
        self.newest_idle = slot;
    }

    /// Takes `slot` off the idle list (a no-op if it is not on it).
    fn unlink(&mut self, slot: usize) {
        let Some(e) = self.slab.get(slot) else {
            return;
        };
        let (newer, older) = (e.newer, e.older);
        let listed = newer != NIL || older != NIL || self.newest_idle == slot;
        if !listed {
            return;
        }
        match self.slab.get_mut(newer) {
            Some(n) => n.older = older,
            None => self.newest_idle = older,
        }
        match self.slab.get_mut(older) {
            Some(o) => o.newer = newer,
            None => self.oldest_idle = newer,
        }
        if let Some(e) = self.slab.get_mut(slot) {
            e.newer = NIL;
            e.older = NIL;
        }
    }

    /// Bytes one entry takes (the slab's and the map's share), for the README.
    pub const ENTRY_BYTES: usize =
        std::mem::size_of::<Entry>() + std::mem::size_of::<((u64, ClientKey), usize)>() + 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    const MAX5: Policy = Policy {
        max_per_ip: 5,
        rate: None,
    };

    #[test]
    fn an_entry_is_as_big_as_the_readme_says() {
        assert_eq!(
            PerIp::ENTRY_BYTES,
            121,
            "update README's per_ip_table_size line"
        );
    }

    #[test]
    fn at_most_n_at_once_per_client() {
        let mut t = PerIp::new(100);
        let now = Instant::now();
        let a = v4(0x7f00_0001);
        let tickets: Vec<Ticket> = (0..5)
            .map(|_| t.admit(1, a, &MAX5, now).expect("in"))
            .collect();
        assert_eq!(t.admit(1, a, &MAX5, now), Err(Refusal::MaxPerIp));
        assert!(
            t.admit(1, v4(0x7f00_0002), &MAX5, now).is_ok(),
            "another client"
        );
        assert!(t.admit(2, a, &MAX5, now).is_ok(), "another listener");
        t.release(tickets[0]);
        assert!(t.admit(1, a, &MAX5, now).is_ok(), "a place freed");
        assert_eq!(t.state(1, a, now), Some((5, None)));
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64() {
        let mut t = PerIp::new(100);
        let now = Instant::now();
        let one = Policy {
            max_per_ip: 1,
            rate: None,
        };
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert!(t.admit(1, a, &one, now).is_ok());
        assert_eq!(t.admit(1, b, &one, now), Err(Refusal::MaxPerIp), "same /64");
        assert!(t.admit(1, c, &one, now).is_ok(), "another /64");
        let mapped = IpAddr::V6(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(ClientKey::of(mapped), ClientKey::of(v4(0x7f00_0001)));
        assert_eq!(
            ClientKey::of(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ClientKey::V6(0)
        );
    }

    #[test]
    fn the_rate_is_a_token_bucket() {
        let mut t = PerIp::new(100);
        let start = Instant::now();
        let p = Policy {
            max_per_ip: 0,
            rate: Some((10, 5)),
        };
        let a = v4(1);
        let burst = (0..30).filter(|_| t.admit(1, a, &p, start).is_ok()).count();
        assert_eq!(burst, 5, "the burst at once");
        // 10 a second: 1 more every 100 ms.
        let later = start + Duration::from_millis(1000);
        let refilled = (0..30).filter(|_| t.admit(1, a, &p, later).is_ok()).count();
        assert_eq!(refilled, 5, "a second refills 10, capped at the burst of 5");
        let soon = later + Duration::from_millis(350);
        assert_eq!(
            (0..30).filter(|_| t.admit(1, a, &p, soon).is_ok()).count(),
            3
        );
    }

    #[test]
    fn a_changed_policy_applies_to_known_clients() {
        let mut t = PerIp::new(100);
        let now = Instant::now();
        let a = v4(9);
        let loose = Policy {
            max_per_ip: 0,
            rate: Some((100, 100)),
        };
        let tight = Policy {
            max_per_ip: 0,
            rate: Some((1, 1)),
        };
        let ticket = t.admit(1, a, &loose, now).expect("in");
        t.release(ticket);
        let through = (0..10)
            .filter(|_| t.admit(1, a, &tight, now).is_ok())
            .count();
        assert_eq!(through, 1, "the new, lower rate");
        let none = Policy::default();
        assert!(
            (0..10).all(|_| t.admit(1, a, &none, now).is_ok()),
            "no rate any more"
        );
        // A smaller table drops idle entries at once.
        let mut big = PerIp::new(50);
        for i in 0..50 {
            let ticket = big.admit(1, v4(i), &none, now).expect("in");
            big.release(ticket);
        }
        big.set_capacity(10);
        assert_eq!(big.len(), 10);
    }

    #[test]
    fn the_table_stays_bounded_and_never_drops_an_open_entry() {
        let cap = 1000;
        let mut t = PerIp::new(cap);
        let now = Instant::now();
        let p = Policy {
            max_per_ip: 3,
            rate: None,
        };
        // 100 clients hold connections throughout.
        let held: Vec<Ticket> = (0..100)
            .map(|i| t.admit(7, v4(i), &p, now).expect("held"))
            .collect();
        for i in 100..1_000_000u32 {
            let ticket = t.admit(7, v4(i), &p, now).expect("room by eviction");
            t.release(ticket);
            assert!(t.len() <= cap);
        }
        for (i, _) in held.iter().enumerate() {
            assert_eq!(
                t.state(7, v4(i as u32), now),
                Some((1, None)),
                "open entry {i} kept"
            );
        }
        // Every entry open: new clients are refused, not let in uncounted.
        let mut full = PerIp::new(10);
        let _open: Vec<Ticket> = (0..10)
            .map(|i| full.admit(1, v4(i), &p, now).expect("in"))
            .collect();
        assert_eq!(full.admit(1, v4(99), &p, now), Err(Refusal::TableFull));
        for ticket in held {
            t.release(ticket);
        }
    }
}
