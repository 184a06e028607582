//! Taking clients: accepting from the TCP listeners within a per-turn budget, the
//! `max_connections` cap (clients wait in the kernel backlog), and the back-off when
//! descriptors run out (a timer, never a busy loop).
//!
//! A client accepted with the last descriptor, whose server socket then cannot be opened, is
//! not dropped: it waits in `WaitingForDescriptor`, first come first served, for a descriptor
//! a closing pair frees (or the back-off timer finds), until its `connect_timeout`. Accepting
//! stays paused while any client waits so, or new clients would take every descriptor freed
//! and none of the waiting would reach a server; spares are not refilled meanwhile either.
//! The pause is the worker's: with `workers` above 1 the other workers go on accepting, and a
//! waiting client may then see its `connect_timeout` run out and be reset.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mio::net::TcpStream;
use mio::Interest;

use super::TcpProxy;
use crate::accounting;
use crate::limit::{Refusal, Ticket};
use crate::metrics::Denial;
use crate::part::{Ctx, Origin};
use crate::reactor::token::{self, Key};
use crate::reactor::{Suppressed, Timer};
use crate::tcp::listener::{self, Accept};
use crate::tcp::pipe::{Pair, PairState};
use crate::tcp::Side;

/// Accepts per listener per loop turn before other work gets a go.
const ACCEPT_BUDGET: usize = 64;
/// At `max_connections`, how soon to look again for a slot another worker freed (this worker's
/// own pairs reopen accepting the moment they end).
const CAPACITY_RECHECK: Duration = Duration::from_millis(50);
/// Pause after `EMFILE`/`ENFILE` before trying to accept again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Whether the part takes new clients now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AcceptState {
    Open,
    /// `max_connections` pairs are open; resumes when one ends.
    AtCapacity,
    /// Out of file descriptors; resumes when the timer fires or a pair ends.
    BackingOff,
}

impl TcpProxy {
    /// The listener in `slot` (its token) has clients waiting.
    pub fn listener_ready(&mut self, slot: usize, ctx: &mut Ctx<'_>) {
        if let Some(Some(l)) = self.listeners.get_mut(slot) {
            // A late event for a socket a drain closed: nothing to accept from.
            if l.socket.is_none() {
                return;
            }
            l.ready.readable = true;
            self.accept_from(slot, ctx);
            if let Some(Some(l)) = self.listeners.get_mut(slot) {
                if l.ready.readable && !l.queued {
                    l.queued = true;
                    self.waiting.push(slot);
                }
            }
        }
    }

    /// The wait for descriptors or for a free slot ran out: try accepting again, or, while
    /// clients wait for a descriptor, let them try their connects again, first in line first,
    /// until one finds none (descriptors may have been freed by what is not a pair: a spare,
    /// a UDP session, an admin connection, another worker).
    pub fn accept_resume(&mut self) {
        self.resume_timer = None;
        self.fd_wakes = usize::MAX;
        self.reopen_accepting();
    }

    /// The server socket of `key` could not be opened for want of a descriptor: it waits for
    /// one (see the module's note). A pair that tried again and failed keeps its place in line
    /// and its deadline.
    pub(super) fn wait_for_descriptor(&mut self, key: Key, error: &io::Error, ctx: &mut Ctx<'_>) {
        let Some(pair) = super::live(&mut self.pairs, key) else {
            return;
        };
        let since = match pair.state {
            PairState::WaitingForDescriptor { since } => {
                self.fd_waiters.push_front(key);
                since
            }
            _ => {
                ctx.metrics
                    .connect_fd_shortages
                    .fetch_add(1, Ordering::Relaxed);
                self.fd_waiters.push_back(key);
                ctx.now
            }
        };
        pair.state = PairState::WaitingForDescriptor { since };
        let deadline = super::connect_deadline(&pair.origin.conf, pair.budget_from, since);
        self.arm(key, deadline, ctx);
        self.accept = AcceptState::BackingOff;
        self.resume_at(ctx.now + ACCEPT_BACKOFF, ctx);
        if let Some(held_back) = self.fd_warnings.pass(ctx.now) {
            log::warn!(
                "cannot open a server connection: {}; {} clients wait for a descriptor, \
                 accepting paused{}",
                crate::sys::io_reason(error),
                self.fd_waiters.len(),
                Suppressed(held_back)
            );
        }
    }

    /// Lets as many clients waiting for a descriptor try their connect again as descriptors
    /// were freed, first in line first; stops at the first that finds none.
    pub(super) fn wake_descriptor_waiters(&mut self, ctx: &mut Ctx<'_>) {
        let had_waiters = !self.fd_waiters.is_empty();
        while self.fd_wakes > 0 {
            let Some(key) = self.fd_waiters.pop_front() else {
                break;
            };
            self.fd_wakes -= 1;
            let waiting = |p: &mut Pair| matches!(p.state, PairState::WaitingForDescriptor { .. });
            if !super::live(&mut self.pairs, key).is_some_and(waiting) {
                continue;
            }
            self.connect_next(key, ctx);
            if super::live(&mut self.pairs, key).is_some_and(waiting) {
                break;
            }
        }
        self.fd_wakes = 0;
        if !self.fd_waiters.is_empty() {
            // Those left try again at the back-off timer if no pair closes first.
            self.resume_at(ctx.now + ACCEPT_BACKOFF, ctx);
        }
        // The last one got its descriptor: take clients again (an accept that finds none
        // backs off again by its own timer).
        if had_waiters && self.fd_waiters.is_empty() && self.accept == AcceptState::BackingOff {
            self.accept = AcceptState::Open;
        }
    }

    /// Looks again at `at`; one such timer at a time, however often the cap or a shortage of
    /// descriptors is met.
    fn resume_at(&mut self, at: std::time::Instant, ctx: &mut Ctx<'_>) {
        if self.resume_timer.is_none() {
            self.resume_timer = Some(ctx.timers.insert(at, Timer::AcceptResume));
        }
    }

    pub(super) fn accept_from(&mut self, slot: usize, ctx: &mut Ctx<'_>) {
        for _ in 0..ACCEPT_BUDGET {
            if self.accept != AcceptState::Open {
                return;
            }
            let Some(Some(l)) = self.listeners.get_mut(slot) else {
                return;
            };
            if !l.ready.readable || l.full {
                return;
            }
            let Some(socket) = &l.socket else {
                return;
            };
            // A slot of the process's max_connections, shared by every worker, before the
            // accept: at the cap, clients wait in the kernel backlog.
            if !ctx.metrics.reserve(self.max_connections) {
                self.accept = AcceptState::AtCapacity;
                // A pair of another worker may end first; look again then.
                self.resume_at(ctx.now + CAPACITY_RECHECK, ctx);
                return;
            }
            // And one of this listener's own, if it has a cap: at it, only this listener waits.
            let cap = l.origin.conf.max_connections;
            if cap > 0 && !ctx.metrics.reserve_listener(&l.origin.stats, cap) {
                ctx.metrics.unreserve();
                l.full = true;
                self.full_slots.push(slot);
                self.resume_at(ctx.now + CAPACITY_RECHECK, ctx);
                return;
            }
            let accepted = listener::accept(socket);
            if !matches!(accepted, Accept::Client(..)) {
                ctx.metrics.unreserve();
                if cap > 0 {
                    ctx.metrics.unreserve_listener(&l.origin.stats);
                }
            }
            match accepted {
                Accept::Client(stream, addr) => {
                    let origin = Arc::clone(&l.origin);
                    self.admit(origin, stream, addr, cap > 0, ctx);
                }
                Accept::Drained => l.ready.readable = false,
                Accept::OutOfFds(error) => {
                    self.back_off_accepting(&error, ctx);
                    return;
                }
                Accept::Skipped(error) => {
                    log::debug!(
                        "accept on {} failed: {}",
                        l.origin.addr,
                        crate::sys::io_reason(&error)
                    );
                }
            }
        }
    }

    fn back_off_accepting(&mut self, error: &io::Error, ctx: &mut Ctx<'_>) {
        self.accept = AcceptState::BackingOff;
        ctx.metrics.accept_backoffs.fetch_add(1, Ordering::Relaxed);
        self.resume_at(ctx.now + ACCEPT_BACKOFF, ctx);
        if let Some(held_back) = self.fd_warnings.pass(ctx.now) {
            log::warn!(
                "cannot accept: {} ({} connections open); pausing accepts for {} ms{}",
                crate::sys::io_reason(error),
                self.pairs.len(),
                ACCEPT_BACKOFF.as_millis(),
                Suppressed(held_back)
            );
        }
    }

    /// A pair ended or a wait ran out: take clients again (the next accept checks the caps).
    pub(super) fn reopen_accepting(&mut self) {
        self.accept = match self.fd_waiters.is_empty() {
            true => AcceptState::Open,
            false => AcceptState::BackingOff,
        };
        // Only the listeners that hit their own cap, not every listener (port ranges).
        for slot in self.full_slots.drain(..) {
            if let Some(Some(l)) = self.listeners.get_mut(slot) {
                l.full = false;
            }
        }
    }

    /// Gives back what an accepted client took that no pair will hold.
    fn unreserve(&self, origin: &Origin, listener_slot: bool, ctx: &mut Ctx<'_>) {
        ctx.metrics.unreserve();
        if listener_slot {
            ctx.metrics.unreserve_listener(&origin.stats);
        }
    }

    /// The access rules and the per-client limits, before any server is asked: a refused client
    /// is closed at once. Returns its place in the per-client table, if it has one.
    pub(super) fn screen(
        &mut self,
        origin: &Origin,
        client: SocketAddr,
        ctx: &mut Ctx<'_>,
    ) -> Result<Option<Ticket>, ()> {
        if let Some(rule) = origin.acl.denies(client.ip()) {
            accounting::deny(ctx, origin, client, Denial::Acl, Some(rule), true);
            return Err(());
        }
        if origin.per_ip.is_none() {
            return Ok(None);
        }
        match ctx
            .per_ip
            .admit(origin.tag, client.ip(), &origin.per_ip, ctx.now)
        {
            Ok(ticket) => Ok(Some(ticket)),
            Err(refusal) => {
                let why = match refusal {
                    Refusal::MaxPerIp => Denial::MaxConnectionsPerIp,
                    Refusal::Rate => Denial::RatePerIp,
                    Refusal::TableFull => Denial::PerIpTableFull,
                };
                if refusal == Refusal::TableFull {
                    if let Some(held_back) = self.table_warnings.pass(ctx.now) {
                        log::warn!(
                            "per-client table full ({} clients with open connections): refusing new addresses{}",
                            ctx.per_ip.len(),
                            Suppressed(held_back)
                        );
                    }
                }
                accounting::deny(ctx, origin, client, why, None, true);
                Err(())
            }
        }
    }

    fn admit(
        &mut self,
        origin: Arc<Origin>,
        stream: TcpStream,
        client_addr: SocketAddr,
        listener_slot: bool,
        ctx: &mut Ctx<'_>,
    ) {
        // Behind a PROXY header the client is who the header says: screened once it is read.
        // Every client of such a listener must send one, so a peer not trusted to is refused
        // at once, before it holds anything.
        let awaits_header = origin.conf.accept_proxy_protocol;
        let trusted = &origin.conf.proxy_protocol_trusted;
        if awaits_header
            && !trusted.is_empty()
            && !trusted.iter().any(|c| c.contains(client_addr.ip()))
        {
            accounting::deny(
                ctx,
                &origin,
                client_addr,
                Denial::UntrustedProxy,
                None,
                true,
            );
            self.unreserve(&origin, listener_slot, ctx);
            return;
        }
        let ticket = match awaits_header {
            true => None,
            false => match self.screen(&origin, client_addr, ctx) {
                Ok(ticket) => ticket,
                Err(()) => {
                    self.unreserve(&origin, listener_slot, ctx);
                    return;
                }
            },
        };
        let give_back = |ctx: &mut Ctx<'_>| {
            if let Some(t) = ticket {
                ctx.per_ip.release(t);
            }
        };
        if let Some(k) = &origin.conf.so_keepalive {
            crate::tcp::connect::keepalive(&stream, k);
        }
        // Nagle would hold back small writes that the client already sent without delay.
        if !crate::sys::ACCEPT_INHERITS_NODELAY {
            let _ = stream.set_nodelay(true);
        }
        if self.pairs.vacant_key() > token::MAX_INDEX >> 1 {
            // Its tokens could not name the slot (only on 32-bit targets, past 2M pairs).
            self.unreserve(&origin, listener_slot, ctx);
            give_back(ctx);
            return;
        }
        let entry = self.pairs.vacant_entry();
        let gen = self.next_gen;
        self.next_gen = token::next_gen(self.next_gen);
        let key = Key::new(entry.key(), gen);
        let mut pair = Pair::new(gen, origin, stream, client_addr, ctx.now);
        if let Err(e) = ctx.registry.register(
            &mut pair.client,
            token::pair(key, Side::Client.half()),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!(
                "cannot register client {}: {}",
                client_addr,
                crate::sys::io_reason(&e)
            );
            ctx.metrics.unreserve();
            if listener_slot {
                ctx.metrics.unreserve_listener(&pair.origin.stats);
            }
            give_back(ctx);
            return;
        }
        ctx.metrics
            .opened(&pair.origin.stats, self.worker, listener_slot);
        pair.ticket = ticket;
        if awaits_header {
            pair.state = PairState::ReadingProxyHeader;
            let deadline = crate::reactor::after(ctx.now, pair.origin.conf.proxy_protocol_timeout);
            entry.insert(pair);
            self.arm(key, deadline, ctx);
            return;
        }
        entry.insert(pair);
        self.proceed(key, ctx);
    }
}
