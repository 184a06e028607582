//! The TCP part of a worker: its listeners, the slab of pairs, accepting (with the
//! `max_connections` cap and the back-off when descriptors run out), connecting to servers with
//! next-upstream retries, pumping bytes, timeouts, and closing with one access-log line.
//!
//! Every `PairState` transition is here, and each event has one `match` on the state. The worker
//! only hands over events and timers. Invariants: a pair holds at most one server socket, and
//! `Group::acquire`/`release` run exactly once per connect attempt (`release` through
//! `accounting::settle` or `abandon_server`), so the per-server counts that `least_conn` and
//! `max_conns` read stay exact. A closed pair's slot is freed at once: tokens and timers carry
//! the pair's generation, so an event for the old owner of a reused slot is ignored. A pair holds
//! its listener's [`Origin`] (settings, address, counters), so a reload that changes or removes
//! the listener leaves it as it was; a reload only translates its upstream and server ids.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Interest, Registry};
use slab::Slab;

mod accept;
mod header;
mod peek;
mod spares;

use super::buffer::BufferPool;
use super::connect::{self, Outcome};
use super::listener;
use super::pipe::{Fault, Pair, PairState, Step};
use super::splice::PipePool;
use super::Side;
use crate::accounting::{self, Settle};
use crate::config::{Config, Listen, ServerId};
use crate::metrics::PoolStats;
use crate::part::{self, BindError, Ctx, Origin};
use crate::reactor::timer::TimerKey;
use crate::reactor::token::{self, Gen, Key};
use crate::reactor::{after, End, LogLimit, Readiness, Suppressed, Timer};
use crate::upstream::Remap;
use accept::AcceptState;

/// Repeated warnings (out of descriptors, no server) are logged at most this often.
const WARN_INTERVAL: Duration = Duration::from_secs(1);

struct TcpListen {
    /// `None` once the part stopped listening (a drain).
    socket: Option<TcpListener>,
    /// What each pair accepted here holds: the settings, the bound address, the counters.
    origin: Arc<Origin>,
    ready: Readiness,
    /// At its own `max_connections`: not accepting until a pair ends or the recheck timer.
    full: bool,
    /// On the part's `waiting` list.
    queued: bool,
}

pub struct TcpProxy {
    /// By slot, which is the listener's token: a listener keeps its slot as long as it keeps
    /// its socket (a reload that keeps it included); a removed one frees it.
    listeners: Vec<Option<TcpListen>>,
    pairs: Slab<Pair>,
    next_gen: Gen,
    pool: BufferPool,
    pipes: PipePool,
    /// Pre-connected spares of pooled upstreams.
    spares: spares::Spares,
    scratch: Box<[u8]>,
    /// The process's cap, kept by every worker together through `Metrics::reserve`.
    max_connections: usize,
    /// Which worker this part belongs to (for the per-worker counters).
    worker: usize,
    /// The armed `AcceptResume` timer, if any.
    resume_timer: Option<TimerKey>,
    /// Pairs that stopped with readiness left (fairness budget); driven again before sleeping.
    ready: Vec<Key>,
    /// Pairs waiting for the pool to lend a buffer again.
    starved: Vec<Key>,
    /// Pairs in `WaitingForDescriptor`, first in line first.
    fd_waiters: std::collections::VecDeque<Key>,
    /// How many of them to let try again: descriptors freed since they last tried.
    fd_wakes: usize,
    /// Slots of listeners that stopped with clients still in their backlog (budget, a cap).
    waiting: Vec<usize>,
    /// Slots of listeners at their own `max_connections` (`full`), cleared when a pair ends.
    full_slots: Vec<usize>,
    /// No listener slot below this is free (see `part::free_slot`).
    free_from: usize,
    accept: AcceptState,
    fd_warnings: LogLimit,
    no_server_warnings: LogLimit,
    table_warnings: LogLimit,
    header_warnings: LogLimit,
}

impl TcpProxy {
    /// A part with no listener yet (see [`TcpProxy::reload`]).
    pub fn new(
        config: &Config,
        pool_stats: Arc<PoolStats>,
        pipe_stats: Arc<crate::metrics::PipeStats>,
        spare_stats: Arc<crate::metrics::SpareStats>,
        worker: usize,
    ) -> TcpProxy {
        // By default pipes may pin no more kernel memory than `buffer_memory` lets buffers
        // take, and (two descriptors each) no more than half the descriptors.
        let max_pipes = config.max_pipes.unwrap_or_else(|| {
            let share = crate::sys::nofile_limit() / 4 / config.workers.max(1) as u64;
            let by_fds = usize::try_from(share).unwrap_or(usize::MAX);
            by_fds.min(config.buffer_memory / config.splice_pipe_size.max(1))
        });
        TcpProxy {
            listeners: Vec::new(),
            pairs: Slab::new(),
            next_gen: 0,
            pool: BufferPool::new(config.buffer_size, config.buffer_memory, pool_stats),
            pipes: PipePool::new(config.splice_pipe_size, max_pipes, pipe_stats),
            spares: spares::Spares::new(spare_stats),
            scratch: vec![0u8; config.buffer_size.max(1)].into_boxed_slice(),
            max_connections: config.max_connections,
            worker,
            resume_timer: None,
            ready: Vec::new(),
            starved: Vec::new(),
            fd_waiters: std::collections::VecDeque::new(),
            fd_wakes: 0,
            waiting: Vec::new(),
            full_slots: Vec::new(),
            free_from: 0,
            accept: AcceptState::Open,
            fd_warnings: LogLimit::new(WARN_INTERVAL),
            no_server_warnings: LogLimit::new(WARN_INTERVAL),
            table_warnings: LogLimit::new(WARN_INTERVAL),
            header_warnings: LogLimit::new(WARN_INTERVAL),
        }
    }

    /// Takes on a reloaded config (or the first one). `origins` are the config's TCP listeners:
    /// a listener already here that is among them keeps its socket and backlog and takes the new
    /// settings for new pairs; one that is not stops accepting and is closed. `fresh` are the
    /// sockets of the new listeners, bound for this worker. Pairs in flight keep their settings
    /// and their server; their upstream and server ids are translated by `remap`. Returns the
    /// new listeners that could not be registered in the poll (each also logged).
    pub fn reload(
        &mut self,
        origins: &[Arc<Origin>],
        fresh: Vec<(Arc<Origin>, TcpListener)>,
        max_connections: usize,
        remap: &Remap,
        ctx: &mut Ctx<'_>,
    ) -> Vec<BindError> {
        let by_identity = Origin::by_identity(origins);
        for (index, slot) in self.listeners.iter_mut().enumerate() {
            let Some(l) = slot else {
                continue;
            };
            match by_identity.get(&Origin::identity(&l.origin.conf)) {
                Some(origin) => l.origin = Arc::clone(origin),
                None => {
                    if let Some(mut socket) = l.socket.take() {
                        let _ = ctx.registry.deregister(&mut socket);
                    }
                    *slot = None;
                    self.free_from = self.free_from.min(index);
                }
            }
        }
        let failed = fresh
            .into_iter()
            .filter_map(|(origin, socket)| self.listen(origin, socket, ctx.registry).err())
            .collect();
        self.max_connections = max_connections;
        let mut unrouted = Vec::new();
        for (index, pair) in self.pairs.iter_mut() {
            // A client not yet routed (header or ClientHello still coming) takes the listener's
            // new settings: its routes name upstreams by the new ids.
            if matches!(
                pair.state,
                PairState::Peeking | PairState::ReadingProxyHeader
            ) {
                match by_identity.get(&Origin::identity(&pair.origin.conf)) {
                    Some(origin) => {
                        // Not routed yet: it takes the listener as it is now, upstream too.
                        pair.origin = Arc::clone(origin);
                        pair.upstream = origin.conf.upstream;
                        continue;
                    }
                    // Its listener is gone, and with it the routes it would need.
                    None if !pair.origin.conf.sni_routes.is_empty() => {
                        unrouted.push(Key::new(index, pair.gen));
                    }
                    None => {}
                }
            }
            let upstream = pair.upstream;
            pair.upstream = remap.upstream(upstream);
            pair.tried = remap.tried(upstream, &pair.tried);
            pair.last_server = pair.last_server.and_then(|s| remap.server(upstream, s));
            pair.state = match pair.state {
                PairState::ReadingProxyHeader => PairState::ReadingProxyHeader,
                PairState::Peeking => PairState::Peeking,
                PairState::Unassigned => PairState::Unassigned,
                PairState::WaitingForDescriptor { since } => {
                    PairState::WaitingForDescriptor { since }
                }
                PairState::SendingProxyHeader { server } => PairState::SendingProxyHeader {
                    server: remap.held(upstream, server),
                },
                PairState::Connecting { server, since } => PairState::Connecting {
                    server: remap.held(upstream, server),
                    since,
                },
                PairState::Streaming { server } => PairState::Streaming {
                    server: remap.held(upstream, server),
                },
            };
        }
        for key in unrouted {
            self.close(key, End::Shutdown, ctx);
        }
        self.remap_spares(remap, ctx);
        self.reopen_accepting();
        failed
    }

    /// Registers a listening socket in a free slot.
    fn listen(
        &mut self,
        origin: Arc<Origin>,
        mut socket: TcpListener,
        registry: &Registry,
    ) -> Result<(), BindError> {
        let slot = part::free_slot(&mut self.listeners, &mut self.free_from);
        if let Err(error) =
            registry.register(&mut socket, token::listener(slot), Interest::READABLE)
        {
            log::error!(
                "cannot accept on {}: {}",
                origin.addr,
                crate::sys::io_reason(&error)
            );
            self.free_from = self.free_from.min(slot);
            return Err(BindError {
                proto: origin.conf.proto,
                addr: origin.addr,
                error,
            });
        }
        if let Some(entry) = self.listeners.get_mut(slot) {
            *entry = Some(TcpListen {
                socket: Some(socket),
                origin,
                ready: Readiness::default(),
                full: false,
                queued: false,
            });
        }
        Ok(())
    }

    pub fn has_pending_work(&self) -> bool {
        !self.ready.is_empty()
            || (!self.starved.is_empty() && self.pool.can_lend())
            || (self.fd_wakes > 0 && !self.fd_waiters.is_empty())
            || (self.accept == AcceptState::Open
                && self.waiting.iter().any(|&slot| self.may_accept(slot)))
    }

    /// Whether the listener in `slot` has clients waiting that it may take now.
    fn may_accept(&self, slot: usize) -> bool {
        self.listeners
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|l| l.ready.readable && l.socket.is_some() && !l.full)
    }

    // ---- events ----------------------------------------------------------------------------

    /// An event on one of a pair's sockets.
    pub fn socket_ready(
        &mut self,
        key: Key,
        half: usize,
        event: &mio::event::Event,
        ctx: &mut Ctx<'_>,
    ) {
        let Some(pair) = live(&mut self.pairs, key) else {
            return;
        };
        pair.readiness(Side::from_half(half)).absorb(event);
        self.drive(key, ctx);
    }

    /// A pair's timer fired. Activity deadlines are lazy: if traffic moved the deadline, re-arm
    /// for the new one instead of closing.
    pub fn timer(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(pair) = live(&mut self.pairs, key) else {
            return;
        };
        pair.timer = None;
        let origin = Arc::clone(&pair.origin);
        let conf = &origin.conf;
        match pair.state {
            PairState::ReadingProxyHeader => self.header_timeout(key, ctx),
            PairState::Peeking => self.peek_timeout(key, ctx),
            PairState::Unassigned => {}
            PairState::WaitingForDescriptor { .. } => {
                log::debug!(
                    "client {}: no descriptor for its server connection within connect_timeout",
                    pair.client_addr
                );
                self.close(key, End::ConnectFailed, ctx);
            }
            PairState::Connecting { server, since } => {
                if ctx.now >= after(since, conf.connect_timeout) {
                    let error = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                    self.abandon_server(key, ctx);
                    self.report_connect_failure(key, server, &error, ctx);
                    self.connect_next(key, ctx);
                } else if out_of_time(conf, pair.budget_from, ctx.now) {
                    // next_upstream_timeout bounds the attempt in flight too; the server had
                    // less than its connect_timeout, so it is not blamed.
                    log::debug!(
                        "client {}: next_upstream_timeout reached while connecting",
                        pair.client_addr
                    );
                    self.abandon_server(key, ctx);
                    self.close(key, End::ConnectFailed, ctx);
                } else {
                    let deadline = connect_deadline(conf, pair.budget_from, since);
                    self.arm(key, deadline, ctx);
                }
            }
            PairState::SendingProxyHeader { .. } | PairState::Streaming { .. } => {
                let (timeout, end) = if pair.half_closed() {
                    (conf.half_close_timeout, End::HalfCloseTimeout)
                } else {
                    (conf.idle_timeout, End::IdleTimeout)
                };
                let deadline = after(pair.last_active, timeout);
                if ctx.now >= deadline {
                    self.close(key, end, ctx);
                } else {
                    self.arm(key, deadline, ctx);
                }
            }
        }
    }

    /// A pair's `limit_rate` wait ran out: its directions may read again.
    pub fn throttle_over(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(pair) = live(&mut self.pairs, key) else {
            return;
        };
        if let Some(e) = pair.extra.as_mut() {
            e.throttle_timer = None;
            e.throttle_at = None;
        }
        self.drive(key, ctx);
    }

    /// Drives pairs that yielded or waited for buffers, and listeners with clients waiting.
    pub fn run_pending(&mut self, ctx: &mut Ctx<'_>) {
        self.wake_descriptor_waiters(ctx);
        if !self.starved.is_empty() && self.pool.can_lend() {
            for key in self.starved.drain(..) {
                if let Some(pair) = live(&mut self.pairs, key) {
                    pair.starved = false;
                    self.ready.push(key);
                }
            }
        }
        if !self.ready.is_empty() {
            let mut batch = std::mem::take(&mut self.ready);
            for &key in &batch {
                self.drive(key, ctx);
            }
            batch.clear();
            // Keep the larger allocation: the list is reused every turn.
            if batch.capacity() > self.ready.capacity() {
                batch.append(&mut self.ready);
                self.ready = batch;
            }
        }
        if self.accept == AcceptState::Open && !self.waiting.is_empty() {
            // Only listeners with clients left over: with thousands of listeners (port ranges)
            // a turn must not look at every one.
            let mut waiting = std::mem::take(&mut self.waiting);
            for &slot in &waiting {
                if self.may_accept(slot) {
                    self.accept_from(slot, ctx);
                }
            }
            waiting.retain(|&slot| {
                let keep = self
                    .listeners
                    .get(slot)
                    .and_then(Option::as_ref)
                    .is_some_and(|l| l.ready.readable && l.socket.is_some());
                if !keep {
                    if let Some(Some(l)) = self.listeners.get_mut(slot) {
                        l.queued = false;
                    }
                }
                keep
            });
            waiting.append(&mut self.waiting);
            self.waiting = waiting;
        }
    }

    /// Closes every listening socket (a new instance can bind the ports at once); open pairs go
    /// on with their listener's settings.
    pub fn stop_listening(&mut self, ctx: &mut Ctx<'_>) {
        self.close_spares(ctx);
        for l in self.listeners.iter_mut().flatten() {
            if let Some(mut socket) = l.socket.take() {
                let _ = ctx.registry.deregister(&mut socket);
            }
            l.ready.readable = false;
        }
    }

    /// Pairs open now.
    pub fn open_pairs(&self) -> usize {
        self.pairs.len()
    }

    pub fn close_all(&mut self, end: End, ctx: &mut Ctx<'_>) {
        self.close_spares(ctx);
        let keys: Vec<Key> = self.pairs.iter().map(|(k, p)| Key::new(k, p.gen)).collect();
        for key in keys {
            self.close(key, end, ctx);
        }
    }

    // ---- connecting ------------------------------------------------------------------------

    /// Starts a connect to the next server the balancer offers, or closes the client when the
    /// tries, the time budget or the servers have run out.
    fn connect_next(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        loop {
            let Some(pair) = live(&mut self.pairs, key) else {
                return;
            };
            let origin = Arc::clone(&pair.origin);
            let conf = &origin.conf;
            let out_of_time = pair.tries > 0 && out_of_time(conf, pair.budget_from, ctx.now);
            if pair.tries >= conf.next_upstream_tries || out_of_time {
                self.close(key, End::ConnectFailed, ctx);
                return;
            }
            let now = ctx.now;
            // A lookup that misses (the upstream gone in a reload) must still end the pair, or
            // it would sit unassigned with no timer, holding a connection slot.
            let Some(group) = ctx.upstreams.get_mut(pair.upstream.0) else {
                self.close(key, End::Error, ctx);
                return;
            };
            let Some(server) = group.pick(pair.client_addr.ip(), now, &pair.tried) else {
                let end = if pair.tries == 0 {
                    if let Some(held_back) = self.no_server_warnings.pass(now) {
                        log::warn!(
                            "upstream {}: no server available for {}{}",
                            group.name,
                            pair.client_addr,
                            Suppressed(held_back)
                        );
                    }
                    End::NoServer
                } else {
                    End::ConnectFailed
                };
                self.close(key, end, ctx);
                return;
            };
            let Some(addr) = group.server(server).map(|s| s.conf.addr) else {
                self.close(key, End::Error, ctx);
                return;
            };
            let upstream = pair.upstream;
            let spare = match group.pool {
                Some(_) => self.take_spare(key, upstream, server, ctx),
                None => None,
            };
            if let Some(took) = spare {
                // Connected already: the pair's next drive finds it so and starts streaming,
                // and the server's connect-time histogram gets the time the spare's connect took.
                if let Some(pair) = live(&mut self.pairs, key) {
                    pair.count_try(server);
                    let since = now.checked_sub(took).unwrap_or(now);
                    pair.state = PairState::Connecting { server, since };
                }
                self.ready.push(key);
                return;
            }
            let (Some(pair), Some(group)) = (
                live(&mut self.pairs, key),
                ctx.upstreams.get_mut(upstream.0),
            ) else {
                return;
            };
            let token = token::pair(key, Side::Server.half());
            match connect::start(ctx.registry, addr, token) {
                Ok(stream) => {
                    if let Some(k) = &conf.so_keepalive {
                        connect::keepalive(&stream, k);
                    }
                    pair.count_try(server);
                    group.acquire(server);
                    pair.server = Some(stream);
                    pair.server_ready = Readiness::default();
                    pair.state = PairState::Connecting { server, since: now };
                    let deadline = connect_deadline(conf, pair.budget_from, now);
                    self.arm(key, deadline, ctx);
                    return;
                }
                Err(error) if listener::is_fd_exhaustion(&error) => {
                    // Our shortage, not the server's fault: no try used, no passive-health mark.
                    self.wait_for_descriptor(key, &error, ctx);
                    return;
                }
                Err(error) => {
                    pair.count_try(server);
                    self.report_connect_failure(key, server, &error, ctx);
                }
            }
        }
    }

    /// The server socket reported readiness while connecting: find out how the connect went.
    /// True when the pair now streams.
    fn finish_connect(
        &mut self,
        key: Key,
        server: ServerId,
        since: Instant,
        ctx: &mut Ctx<'_>,
    ) -> bool {
        let Some(pair) = live(&mut self.pairs, key) else {
            return false;
        };
        let Some(stream) = pair.server.as_ref() else {
            return false;
        };
        match connect::outcome(stream, &pair.server_ready) {
            Outcome::Pending => {
                pair.server_ready.writable = false;
                false
            }
            Outcome::Failed(error) => {
                self.abandon_server(key, ctx);
                self.report_connect_failure(key, server, &error, ctx);
                self.connect_next(key, ctx);
                false
            }
            Outcome::Connected => {
                // Nagle would hold back the small writes the client sent without delay (its
                // loss showed as 1.6x the CPU per GB in the `throughput` scenario's upload).
                let _ = stream.set_nodelay(true);
                pair.state = PairState::Streaming { server };
                pair.last_active = ctx.now;
                let (upstream, idle) = (pair.upstream, pair.origin.conf.idle_timeout);
                let mut version = pair.origin.conf.proxy_protocol;
                let now = ctx.now;
                if let Some(group) = ctx.upstreams.get_mut(upstream.0) {
                    if let Some(s) = group.server(server) {
                        s.shared
                            .connect_time
                            .observe(now.saturating_duration_since(since));
                        // A server's own `proxy_protocol=` wins over the listener's.
                        version = s.conf.proxy_protocol.unwrap_or(version);
                    }
                    group.connected(server, now);
                }
                self.arm(key, after(now, idle), ctx);
                let Some(version) = version else {
                    return true;
                };
                let Some(header) = self.header_for(key, version) else {
                    return false;
                };
                if let Some(pair) = live(&mut self.pairs, key) {
                    let extra = pair.extra();
                    extra.header_out = header;
                    extra.header_sent = 0;
                    pair.state = PairState::SendingProxyHeader { server };
                }
                self.send_proxy_header(key, ctx)
            }
        }
    }

    /// Deregisters and drops the server socket of a pair whose connect failed or was given up,
    /// and gives the server its connection slot back.
    fn abandon_server(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(pair) = live(&mut self.pairs, key) else {
            return;
        };
        if let Some(mut stream) = pair.server.take() {
            let _ = ctx.registry.deregister(&mut stream);
        }
        if let PairState::Connecting { server, .. } = pair.state {
            if let Some(group) = ctx.upstreams.get_mut(pair.upstream.0) {
                group.release(server);
            }
        }
        pair.state = PairState::Unassigned;
    }

    fn report_connect_failure(
        &mut self,
        key: Key,
        server: ServerId,
        error: &io::Error,
        ctx: &mut Ctx<'_>,
    ) {
        let Some(pair) = live(&mut self.pairs, key) else {
            return;
        };
        let (client, upstream) = (pair.client_addr, pair.upstream);
        let cause = crate::sys::io_reason(error);
        accounting::connect_failed(ctx, upstream, server, client, &cause);
    }

    // ---- streaming -------------------------------------------------------------------------

    /// Moves the pair on after an event: finish a connect, then pump.
    fn drive(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(pair) = live(&mut self.pairs, key) else {
            return;
        };
        match pair.state {
            PairState::ReadingProxyHeader => self.read_proxy_header(key, ctx),
            PairState::Peeking => self.peek_hello(key, ctx),
            PairState::SendingProxyHeader { .. } => {
                if self.send_proxy_header(key, ctx) {
                    self.pump(key, ctx);
                }
            }
            PairState::Unassigned => {}
            PairState::WaitingForDescriptor { .. } if pair.client_ready.error => {
                self.close(key, End::ClientClosed, ctx);
            }
            // Its turn comes from `run_pending` when descriptors are freed, not from its events.
            PairState::WaitingForDescriptor { .. } => {}
            PairState::Connecting { .. } if pair.client_ready.error => {
                // The client reset while we were connecting for it: nothing to blame the
                // server for, and nobody left to wait for.
                self.abandon_server(key, ctx);
                self.close(key, End::ClientClosed, ctx);
            }
            PairState::Connecting { server, since } => {
                if self.finish_connect(key, server, since, ctx) {
                    self.pump(key, ctx);
                }
            }
            PairState::Streaming { .. } => self.pump(key, ctx),
        }
    }

    fn pump(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(pair) = live(&mut self.pairs, key) else {
            return;
        };
        let before = (pair.bytes(), pair.half_closed());
        let step = match pair.pump(&mut self.pool, &mut self.pipes, &mut self.scratch, ctx.now) {
            Ok(step) => step,
            Err(fault) => {
                self.fail(key, fault, ctx);
                return;
            }
        };
        if pair.bytes() != before.0 || pair.half_closed() != before.1 {
            pair.last_active = ctx.now;
        }
        if pair.finished() {
            let end = match pair.first_eof {
                Some(Side::Server) => End::ServerClosed,
                _ => End::ClientClosed,
            };
            self.close(key, end, ctx);
            return;
        }
        if let Some(at) = pair.throttled_until() {
            // One timer a pair; a direction that needs an earlier wake than the armed one
            // re-arms it.
            let extra = pair.extra();
            let earlier = extra.throttle_at.map_or(true, |armed| at < armed);
            if earlier {
                if let Some(old) = extra.throttle_timer.take() {
                    ctx.timers.cancel(old);
                }
                extra.throttle_timer = Some(ctx.timers.insert(at, Timer::Throttle(key)));
                extra.throttle_at = Some(at);
            }
        }
        let newly_starved = step == Step::Starved && !pair.starved;
        pair.starved |= newly_starved;
        if newly_starved {
            ctx.metrics.buffer_waits.fetch_add(1, Ordering::Relaxed);
        }
        if pair.half_closed() && !before.1 {
            // The shorter half-close timeout may now be due before the armed timer.
            let deadline = after(pair.last_active, pair.origin.conf.half_close_timeout);
            self.arm(key, deadline, ctx);
        }
        match step {
            Step::Idle => {}
            Step::Yield => self.ready.push(key),
            Step::Starved if newly_starved => self.starved.push(key),
            Step::Starved => {}
        }
    }

    /// An I/O error on one side: the pair closes, resetting the other side too (see
    /// `Pair::reset_cut_peers`), so its peer does not take a cut stream for a complete one.
    fn fail(&mut self, key: Key, fault: Fault, ctx: &mut Ctx<'_>) {
        if let Some(pair) = live(&mut self.pairs, key) {
            log::debug!(
                "client {}: {} side failed: {}",
                pair.client_addr,
                fault.side.name(),
                crate::sys::io_reason(&fault.error)
            );
        }
        self.close(key, End::Error, ctx);
    }

    /// Settles the pair (counters, server slot, access log) and frees it with its sockets.
    fn close(&mut self, key: Key, end: End, ctx: &mut Ctx<'_>) {
        if live(&mut self.pairs, key).is_none() {
            return;
        }
        let mut pair = self.pairs.remove(key.index);
        // Its client socket, and its server socket if it had one, free descriptors for those
        // waiting.
        self.fd_wakes = self.fd_wakes.saturating_add(2);
        let held = match pair.state {
            PairState::ReadingProxyHeader | PairState::Peeking | PairState::Unassigned => None,
            PairState::WaitingForDescriptor { .. } => {
                self.fd_waiters.retain(|&k| k != key);
                None
            }
            PairState::Connecting { server, .. }
            | PairState::SendingProxyHeader { server }
            | PairState::Streaming { server } => Some(server),
        };
        if !crate::sys::CLOSE_DEREGISTERS {
            let _ = ctx.registry.deregister(&mut pair.client);
            if let Some(stream) = pair.server.as_mut() {
                let _ = ctx.registry.deregister(stream);
            }
        }
        pair.reset_cut_peers(end);
        pair.release_buffers(&mut self.pool, &mut self.pipes);
        if let Some(ticket) = pair.ticket.take() {
            ctx.per_ip.release(ticket);
        }
        if let Some(timer) = pair.timer.take() {
            ctx.timers.cancel(timer);
        }
        if let Some(timer) = pair.extra.as_mut().and_then(|e| e.throttle_timer.take()) {
            ctx.timers.cancel(timer);
        }
        accounting::settle(
            ctx,
            &Settle {
                origin: &pair.origin,
                client: pair.client_addr,
                upstream: pair.upstream,
                held,
                // A failed pair names the server it tried last.
                named: held.or(pair.last_server),
                bytes: (pair.up.bytes, pair.down.bytes),
                datagrams: None,
                started: pair.started,
                end,
                sni: pair.extra.as_ref().and_then(|e| e.sni.as_deref()),
            },
        );
        self.reopen_accepting();
    }

    // ---- timers ----------------------------------------------------------------------------

    /// Arms the pair's one timer for `deadline`, replacing whatever it had.
    fn arm(&mut self, key: Key, deadline: Instant, ctx: &mut Ctx<'_>) {
        let Some(pair) = live(&mut self.pairs, key) else {
            return;
        };
        if let Some(old) = pair.timer.take() {
            ctx.timers.cancel(old);
        }
        pair.timer = Some(ctx.timers.insert(deadline, Timer::Pair(key)));
    }
}

/// The pair in `key`'s slot, if it is still the owner `key` names: the stale-event guard.
fn live(pairs: &mut Slab<Pair>, key: Key) -> Option<&mut Pair> {
    pairs.get_mut(key.index).filter(|p| p.gen == key.gen)
}

/// Whether a pair that started at `started` has used up `next_upstream_timeout`.
fn out_of_time(conf: &Listen, started: Instant, now: Instant) -> bool {
    conf.next_upstream_timeout
        .is_some_and(|limit| now >= after(started, limit))
}

/// When a connect begun at `since` must be given up: at `connect_timeout`, or earlier when
/// `next_upstream_timeout` for the whole pair runs out first.
fn connect_deadline(conf: &Listen, started: Instant, since: Instant) -> Instant {
    let own = after(since, conf.connect_timeout);
    match conf.next_upstream_timeout {
        Some(limit) => own.min(after(started, limit)),
        None => own,
    }
}
