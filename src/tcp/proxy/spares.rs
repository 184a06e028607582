//! Pre-connected spares (`pool N [idle=T]` in an upstream): connections a worker opens to each
//! available server before any client comes, so a new client skips the connect.
//!
//! Each spare serves exactly one client: a pair takes it in place of a connect and it is never
//! given back. Invariants: a spare holds its server's connection slot from its connect on
//! (`Group::acquire`, so spares count toward `max_conns` and `least_conn` sees them), and
//! releases it exactly once, when it closes unused; a taken spare's slot passes to its pair,
//! which releases it as every pair does. A spare the server closed or reset while idle is
//! discarded at the event (or found so by a peek when a client takes it) and replaced; one
//! older than `idle` is closed and replaced; a server that is not up (down by checks or
//! config, drained or down through the admin endpoint, failed, retired by a reload) has its
//! spares closed and gets none. Refills run on a timer, so a server that refuses connects is
//! tried at most once a second, never in a loop.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::Interest;
use slab::Slab;

use super::super::connect::{self, Outcome};
use super::{live, TcpProxy};
use crate::config::{ServerId, UpstreamId};
use crate::metrics::SpareStats;
use crate::part::Ctx;
use crate::reactor::timer::TimerKey;
use crate::reactor::token::{self, Gen, Key};
use crate::reactor::{after, Readiness, Timer};
use crate::upstream::{Availability, Remap};

/// How often the spares are looked at: refills, ages, servers that went down.
const REFILL_EVERY: Duration = Duration::from_millis(250);
/// How long a server whose spare failed to connect (or died young) waits for another.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A spare still connecting after this is given up, as a failed connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A spare the server closes within this of its connect is a server that refuses to keep
/// idle connections: it is not reopened at once, or the worker would reconnect in a loop.
const YOUNG: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpareState {
    Connecting,
    /// Connected since `Spare::since`, waiting for a client.
    Ready,
}

struct Spare {
    gen: Gen,
    upstream: UpstreamId,
    server: ServerId,
    stream: TcpStream,
    state: SpareState,
    ready: Readiness,
    /// When its connect started (`Connecting`) or finished (`Ready`).
    since: Instant,
    /// How long its connect took, for the server's connect-time histogram when it is taken.
    connect_time: Duration,
}

/// A worker's spares.
pub(super) struct Spares {
    slab: Slab<Spare>,
    next_gen: Gen,
    /// Spares open (connecting or ready) by (upstream, server).
    count: HashMap<(UpstreamId, ServerId), u32>,
    /// Servers whose last spare connect failed, and when they may get one again.
    retry_at: HashMap<(UpstreamId, ServerId), Instant>,
    timer: Option<TimerKey>,
    /// A drain began: no more spares.
    off: bool,
    stats: Arc<SpareStats>,
}

impl Spares {
    pub(super) fn new(stats: Arc<SpareStats>) -> Spares {
        Spares {
            slab: Slab::new(),
            next_gen: 0,
            count: HashMap::new(),
            retry_at: HashMap::new(),
            timer: None,
            off: false,
            stats,
        }
    }

    fn live(&mut self, key: Key) -> Option<&mut Spare> {
        self.slab.get_mut(key.index).filter(|s| s.gen == key.gen)
    }

    fn counted(&mut self, at: (UpstreamId, ServerId), up: bool) {
        let n = self.count.entry(at).or_insert(0);
        *n = if up {
            n.saturating_add(1)
        } else {
            n.saturating_sub(1)
        };
        if *n == 0 {
            self.count.remove(&at);
        }
    }
}

/// What a peek at an idle spare says.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte) {
        // A banner (the server speaks first) stays for the client, as on a fresh connect.
        Ok(n) => n > 0,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    }
}

impl TcpProxy {
    /// Opens the spares every pooled upstream lacks, closes those that aged or whose server is
    /// no longer up, and arms the next look.
    pub fn refill_spares(&mut self, ctx: &mut Ctx<'_>) {
        self.spares.timer = None;
        let now = ctx.now;
        // Close first: what is closed may be replaced in the same turn.
        let mut doomed = Vec::new();
        for (index, s) in &self.spares.slab {
            let group = ctx.upstreams.get(s.upstream.0);
            let pool = group.and_then(|g| g.pool);
            // A full server is not picked: its spares would hold slots no client can use.
            let usable = group.is_some_and(|g| g.availability(s.server, now) == Availability::Up);
            let age = now.saturating_duration_since(s.since);
            let aged = match s.state {
                SpareState::Ready => pool.is_some_and(|p| age >= p.idle),
                SpareState::Connecting => age >= CONNECT_TIMEOUT,
            };
            if self.spares.off || pool.is_none() || !usable || aged {
                let late = s.state == SpareState::Connecting && aged;
                doomed.push((
                    Key::new(index, s.gen),
                    late.then_some((s.upstream, s.server)),
                ));
            }
        }
        for (key, late) in doomed {
            self.close_spare(key, ctx);
            if let Some((upstream, server)) = late {
                self.spares
                    .retry_at
                    .insert((upstream, server), now + RETRY_AFTER);
                if let Some(group) = ctx.upstreams.get_mut(upstream.0) {
                    group.connect_failed(server, now);
                }
            }
        }
        let pooled = !self.spares.off && ctx.upstreams.iter().any(|g| g.pool.is_some());
        // A client waiting for a descriptor gets one before a spare does.
        if !self.spares.off && self.fd_waiters.is_empty() {
            for u in 0..ctx.upstreams.len() {
                let Some(pool) = ctx.upstreams.get(u).and_then(|g| g.pool) else {
                    continue;
                };
                let servers = ctx.upstreams.get(u).map_or(0, |g| g.servers().len());
                for id in (0..servers).map(ServerId) {
                    self.fill_server(UpstreamId(u), id, pool.size, ctx);
                }
            }
        }
        if pooled || !self.spares.slab.is_empty() {
            let key = ctx.timers.insert(after(now, REFILL_EVERY), Timer::Spares);
            self.spares.timer = Some(key);
        }
    }

    /// Opens spares to one server up to `size`, if it is up and not waiting out a failure.
    fn fill_server(&mut self, upstream: UpstreamId, id: ServerId, size: u32, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        let at = (upstream, id);
        if self.spares.retry_at.get(&at).is_some_and(|&t| now < t) {
            return;
        }
        self.spares.retry_at.remove(&at);
        let have = self.spares.count.get(&at).copied().unwrap_or(0);
        for _ in have..size {
            let Some(group) = ctx.upstreams.get_mut(upstream.0) else {
                return;
            };
            if group.availability(id, now) != Availability::Up {
                return;
            }
            let Some(addr) = group
                .server(id)
                .filter(|s| s.room_for_spare())
                .map(|s| s.conf.addr)
            else {
                return;
            };
            let entry = self.spares.slab.vacant_entry();
            let key = Key::new(entry.key(), self.spares.next_gen);
            match connect::start(ctx.registry, addr, token::spare(key)) {
                Ok(stream) => {
                    group.acquire(id);
                    entry.insert(Spare {
                        gen: key.gen,
                        upstream,
                        server: id,
                        stream,
                        state: SpareState::Connecting,
                        ready: Readiness::default(),
                        since: now,
                        connect_time: Duration::ZERO,
                    });
                    self.spares.next_gen = token::next_gen(self.spares.next_gen);
                    self.spares.counted(at, true);
                    self.spares.stats.open.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    log::debug!(
                        "spare to {addr}: cannot connect: {}",
                        crate::sys::io_reason(&e)
                    );
                    self.spares.retry_at.insert(at, now + RETRY_AFTER);
                    return;
                }
            }
        }
    }

    /// A spare's socket reported readiness: its connect finished, or the server closed it.
    pub fn spare_ready(&mut self, key: Key, event: &mio::event::Event, ctx: &mut Ctx<'_>) {
        let Some(s) = self.spares.live(key) else {
            return;
        };
        s.ready.absorb(event);
        match s.state {
            SpareState::Connecting => match connect::outcome(&s.stream, &s.ready) {
                Outcome::Pending => s.ready.writable = false,
                Outcome::Connected => {
                    let _ = s.stream.set_nodelay(true);
                    s.state = SpareState::Ready;
                    s.connect_time = ctx.now.saturating_duration_since(s.since);
                    s.since = ctx.now;
                    // A reset or close that came with the connect shows on the next peek.
                    if !still_open(&s.stream) {
                        self.discard_spare(key, ctx);
                    }
                }
                Outcome::Failed(e) => {
                    let (upstream, server) = (s.upstream, s.server);
                    log::debug!("spare connect failed: {}", crate::sys::io_reason(&e));
                    self.spares
                        .retry_at
                        .insert((upstream, server), ctx.now + RETRY_AFTER);
                    self.close_spare(key, ctx);
                    // The same failure a client's connect would have met.
                    if let Some(group) = ctx.upstreams.get_mut(upstream.0) {
                        group.connect_failed(server, ctx.now);
                    }
                }
            },
            SpareState::Ready => {
                if s.ready.error || s.ready.read_closed || !still_open(&s.stream) {
                    self.discard_spare(key, ctx);
                }
            }
        }
    }

    /// A spare the server closed while idle: closed, counted, and replaced at the next look
    /// (a second later when it died young: a server that closes at once is not reconnected in
    /// a loop).
    fn discard_spare(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let young = self.spares.live(key).and_then(|s| {
            let fresh = ctx.now.saturating_duration_since(s.since) < YOUNG;
            fresh.then_some((s.upstream, s.server))
        });
        self.close_spare(key, ctx);
        self.spares.stats.discarded.fetch_add(1, Ordering::Relaxed);
        if let Some(at) = young {
            self.spares.retry_at.insert(at, ctx.now + RETRY_AFTER);
        }
        if self.spares.timer.is_none() {
            self.arm_refill(ctx, REFILL_EVERY);
        }
    }

    /// Closes a spare unused, giving its server its connection slot back.
    fn close_spare(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        if self.spares.live(key).is_none() {
            return;
        }
        let mut s = self.spares.slab.remove(key.index);
        let _ = ctx.registry.deregister(&mut s.stream);
        if let Some(group) = ctx.upstreams.get_mut(s.upstream.0) {
            group.release(s.server);
        }
        self.spares.counted((s.upstream, s.server), false);
        self.spares.stats.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Looks at the spares again within `delay` (sooner than the armed look, if any).
    fn arm_refill(&mut self, ctx: &mut Ctx<'_>, delay: Duration) {
        if let Some(old) = self.spares.timer.take() {
            ctx.timers.cancel(old);
        }
        let key = ctx.timers.insert(after(ctx.now, delay), Timer::Spares);
        self.spares.timer = Some(key);
    }

    /// Gives pair `key`, about to connect to `server` of `upstream`, a ready spare to it
    /// instead: re-registered under the pair's token, the server's slot passing to the pair.
    /// The time its connect took, when the pair got one (it then finishes its "connect" on
    /// its next drive).
    pub(super) fn take_spare(
        &mut self,
        key: Key,
        upstream: UpstreamId,
        server: ServerId,
        ctx: &mut Ctx<'_>,
    ) -> Option<Duration> {
        loop {
            let found = self.spares.slab.iter().find(|(_, s)| {
                s.upstream == upstream && s.server == server && s.state == SpareState::Ready
            });
            let (index, gen) = found.map(|(i, s)| (i, s.gen))?;
            let spare_key = Key::new(index, gen);
            let open = self
                .spares
                .slab
                .get(index)
                .is_some_and(|s| still_open(&s.stream));
            if !open {
                self.discard_spare(spare_key, ctx);
                continue;
            }
            let mut s = self.spares.slab.remove(index);
            self.spares.counted((upstream, server), false);
            self.spares.stats.open.fetch_sub(1, Ordering::Relaxed);
            let token = token::pair(key, super::Side::Server.half());
            let interest = Interest::READABLE | Interest::WRITABLE;
            if ctx
                .registry
                .reregister(&mut s.stream, token, interest)
                .is_err()
            {
                let _ = ctx.registry.deregister(&mut s.stream);
                if let Some(group) = ctx.upstreams.get_mut(upstream.0) {
                    group.release(server);
                }
                continue;
            }
            let Some(pair) = live(&mut self.pairs, key) else {
                // Not reachable (the caller holds the pair), but the slot must not leak.
                let _ = ctx.registry.deregister(&mut s.stream);
                if let Some(group) = ctx.upstreams.get_mut(upstream.0) {
                    group.release(server);
                }
                return None;
            };
            if let Some(k) = &pair.origin.conf.so_keepalive {
                connect::keepalive(&s.stream, k);
            }
            pair.server = Some(s.stream);
            // Connected and quiet: writable, and a read will find out the rest.
            pair.server_ready = Readiness {
                readable: true,
                writable: true,
                ..Readiness::default()
            };
            self.spares.stats.taken.fetch_add(1, Ordering::Relaxed);
            // The refill runs on the loop's next turn: the clients of one turn share it, and
            // the next client finds a spare again (a delay here left most of a quick series
            // of clients without one).
            self.arm_refill(ctx, Duration::ZERO);
            return Some(s.connect_time);
        }
    }

    /// After a reload: the spares' upstream and server ids in the new config (a removed
    /// server's spares are closed at the next look, which comes at once).
    pub(super) fn remap_spares(&mut self, remap: &Remap, ctx: &mut Ctx<'_>) {
        let mut count = HashMap::new();
        for (_, s) in self.spares.slab.iter_mut() {
            let old = s.upstream;
            s.upstream = remap.upstream(old);
            s.server = remap.held(old, s.server);
            *count.entry((s.upstream, s.server)).or_insert(0) += 1;
        }
        self.spares.count = count;
        self.spares.retry_at.clear();
        self.arm_refill(ctx, Duration::ZERO);
    }

    /// A drain or a stop: every spare closes, and none is opened again.
    pub(super) fn close_spares(&mut self, ctx: &mut Ctx<'_>) {
        self.spares.off = true;
        let keys: Vec<Key> = self
            .spares
            .slab
            .iter()
            .map(|(i, s)| Key::new(i, s.gen))
            .collect();
        for key in keys {
            self.close_spare(key, ctx);
        }
        if let Some(timer) = self.spares.timer.take() {
            ctx.timers.cancel(timer);
        }
    }
}
