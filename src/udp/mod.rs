//! UDP proxying: one listening socket per `listen udp`, one session per client address.
//!
//! A session owns a UDP socket connected to the server the balancer picked, registered in the
//! worker's poll, so replies are told apart by socket, never by a lookup. Client → server
//! datagrams arrive on the listener and leave on the session socket; replies leave through the
//! listener to the client's address, from the address the client sent to (on a wildcard
//! listener the kernel reports it with each datagram). Each datagram is read once into a 64 KiB
//! slot and written once from it; boundaries are kept. A listener's datagrams are read up to
//! 16 at a time (`recvmmsg`), and replies are gathered in a batch of slots and sent together
//! (`sendmmsg`) when the batch is full, when a reply for another listener comes, before a
//! listener closes, and at the end of every turn of the worker's loop, so a reply waits for
//! no more than the events of one turn and leaves in the order it came. A full send buffer
//! drops the datagram (UDP semantics) and counts it: nothing waits for writability and nothing
//! spins.
//!
//! Sessions end on `idle_timeout` (a lazy deadline on the timer wheel), after `udp_responses`
//! replies, when the server refuses (ICMP port unreachable, counted against the server), on
//! `max_sessions` eviction of the least recently active session, and at shutdown. A session's
//! slot is freed at once; its token and timer carry its generation, so a late event for it is
//! ignored (the same guard as TCP pairs). A session keeps the settings and the server it opened
//! with across a reload; a listener the reload removed serves its sessions until they end.

mod listener;
pub mod session;

pub use listener::bind;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Registry};

use crate::accounting::{self, Settle};
use crate::config::UdpHeaders;
use crate::config::{ServerId, UpstreamId};
use crate::limit::{Refusal, Ticket};
use crate::metrics::Denial;
use crate::part::{self, BindError, Ctx, Origin};
use crate::proxy_protocol as pp;
use crate::reactor::timer::TimerKey;
use crate::reactor::token::{self, Gen, Key};
use crate::reactor::{after, retry, End, LogLimit, Readiness, Suppressed, Timer};
use crate::sys::{self, Datagrams};
use crate::upstream::{Remap, Tried};
use session::SessionTable;

/// Large enough for any datagram (the IPv6 payload limit is 65,527 bytes).
const DATAGRAM_BUFFER: usize = 65_536;
/// Datagrams taken from one socket per wake-up before others get a turn.
const RECV_BUDGET: usize = 64;
/// A session's token index is `listener << SESSION_BITS | slot`, naming both at once (16M
/// sessions per listener; 16K on 32-bit targets, whose tokens have less room).
const SESSION_BITS: u32 = if usize::BITS >= 64 { 24 } else { 14 };
const SESSION_MASK: usize = (1 << SESSION_BITS) - 1;
/// Warnings about failing to open sessions are logged at most this often.
const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// A session's key from its listener's slot and its own.
fn session_key(listener: usize, slot: usize, gen: Gen) -> Key {
    Key::new(listener << SESSION_BITS | (slot & SESSION_MASK), gen)
}

/// The listener's slot and the session's.
fn split_key(key: Key) -> (usize, usize) {
    (key.index >> SESSION_BITS, key.index & SESSION_MASK)
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    datagrams: u64,
    bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: usize) {
        self.datagrams += 1;
        self.bytes += bytes as u64;
    }
}

pub(crate) struct Session {
    gen: Gen,
    /// The listener as it was when the session opened: a reload changes settings for new
    /// sessions only.
    origin: Arc<Origin>,
    /// The upstream of `server`; a reload translates both ids.
    upstream: UpstreamId,
    server: ServerId,
    /// Its place in the per-client table, given back when it ends.
    ticket: Option<Ticket>,
    /// The client: the datagrams' source, or the client their PROXY header named.
    client: SocketAddr,
    /// The address the client sent to, from its PROXY header (passed on in the header sent).
    proxied_dst: Option<SocketAddr>,
    /// On a wildcard listener: the address the client last sent to, where replies leave from.
    local: Option<IpAddr>,
    socket: UdpSocket,
    ready: Readiness,
    started: Instant,
    last_active: Instant,
    timer: Option<TimerKey>,
    up: Tally,
    down: Tally,
}

/// Whether a UDP listener takes new clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taking {
    Everyone,
    /// A reload removed the listener. Its sessions' replies leave through its socket, so it
    /// stays open, for the clients it has, until the last session ends; a new client's datagram
    /// is dropped and counted.
    KnownClients,
}

struct UdpListen {
    socket: UdpSocket,
    /// What each session opened here holds: the settings, the bound address, the counters.
    origin: Arc<Origin>,
    /// Bound to `0.0.0.0` or `[::]`: datagrams carry their destination address.
    wildcard: bool,
    taking: Taking,
    ready: Readiness,
    sessions: SessionTable<Session>,
}

impl UdpListen {
    /// A reply to `client`, from `local` when the listener is a wildcard one.
    fn reply(
        &self,
        datagram: &[u8],
        client: SocketAddr,
        local: Option<IpAddr>,
    ) -> io::Result<usize> {
        match local {
            Some(local) => crate::sys::send_to_from(&self.socket, datagram, client, local)
                // A source the route refuses (EINVAL): let the kernel pick one rather than drop.
                .or_else(|e| match e.kind() {
                    io::ErrorKind::InvalidInput => self.socket.send_to(datagram, client),
                    _ => Err(e),
                }),
            None => self.socket.send_to(datagram, client),
        }
    }
}

pub(crate) struct UdpProxy {
    /// By slot, which is the listener's token and the high part of its sessions' tokens: a
    /// listener keeps its slot while it has its socket (a reload that keeps it included).
    listeners: Vec<Option<UdpListen>>,
    /// A listener's datagrams, as one `recvmmsg` read them.
    rx: Datagrams,
    /// Replies not sent yet, all for the listener in slot `tx_listener` (see [`UdpProxy::flush`]).
    tx: Datagrams,
    tx_listener: usize,
    next_gen: Gen,
    /// Sessions that stopped reading with datagrams left (budget); drained before sleeping.
    ready: Vec<Key>,
    /// A datagram with its PROXY header in front, for servers that want one (kept, reused).
    out: Vec<u8>,
    /// Listeners with datagrams left over (a budget ran out): a few, even with thousands of
    /// listeners.
    waiting: Vec<usize>,
    /// No listener slot below this is free (see `part::free_slot`).
    free_from: usize,
    warnings: LogLimit,
    /// Refused datagrams of new clients are counted each, logged at most once a second.
    denial_log: LogLimit,
}

impl UdpProxy {
    /// A part with no listener yet (see [`UdpProxy::reload`]).
    pub(crate) fn new() -> UdpProxy {
        UdpProxy {
            listeners: Vec::new(),
            rx: Datagrams::default(),
            tx: Datagrams::default(),
            tx_listener: 0,
            next_gen: 0,
            ready: Vec::new(),
            out: Vec::new(),
            waiting: Vec::new(),
            free_from: 0,
            warnings: LogLimit::new(WARN_INTERVAL),
            denial_log: LogLimit::new(WARN_INTERVAL),
        }
    }

    /// Takes on a reloaded config (or the first one), as `TcpProxy::reload` does; a removed
    /// listener with sessions goes on serving them (see [`Taking::KnownClients`]).
    pub(crate) fn reload(
        &mut self,
        origins: &[Arc<Origin>],
        fresh: Vec<(Arc<Origin>, UdpSocket)>,
        remap: &Remap,
        ctx: &mut Ctx<'_>,
    ) -> Vec<BindError> {
        // Replies gathered so far leave before any listener can close.
        self.flush(ctx);
        let mut failed = Vec::new();
        let by_identity = Origin::by_identity(origins);
        for (index, slot) in self.listeners.iter_mut().enumerate() {
            let Some(l) = slot else {
                continue;
            };
            match by_identity.get(&Origin::identity(&l.origin.conf)) {
                Some(origin) => {
                    l.origin = Arc::clone(origin);
                    l.taking = Taking::Everyone;
                }
                None if l.sessions.is_empty() => {
                    let _ = ctx.registry.deregister(&mut l.socket);
                    *slot = None;
                    self.free_from = self.free_from.min(index);
                }
                None => l.taking = Taking::KnownClients,
            }
        }
        // The origins this worker's listeners have now (kept and revived ones), by pointer.
        let present: std::collections::HashSet<*const Origin> = self
            .listeners
            .iter()
            .flatten()
            .map(|l| Arc::as_ptr(&l.origin))
            .collect();
        for (origin, mut socket) in fresh {
            let revived = present.contains(&Arc::as_ptr(&origin));
            if revived {
                // Added back while this worker still served its sessions: the old socket goes
                // on, so this one is not needed.
                let _ = ctx.registry.deregister(&mut socket);
                continue;
            }
            if let Err(e) = self.listen(origin, socket, ctx.registry) {
                failed.push(e);
            }
        }
        for l in self.listeners.iter_mut().flatten() {
            for s in l.sessions.values_mut() {
                s.server = remap.held(s.upstream, s.server);
                s.upstream = remap.upstream(s.upstream);
            }
        }
        failed
    }

    /// Registers a listening socket in a free slot.
    fn listen(
        &mut self,
        origin: Arc<Origin>,
        mut socket: UdpSocket,
        registry: &Registry,
    ) -> Result<(), BindError> {
        let slot = part::free_slot(&mut self.listeners, &mut self.free_from);
        let fail = |error: io::Error| {
            log::error!(
                "cannot receive on udp {}: {}",
                origin.addr,
                crate::sys::io_reason(&error)
            );
            BindError {
                proto: origin.conf.proto,
                addr: origin.addr,
                error,
            }
        };
        if slot > token::MAX_INDEX >> SESSION_BITS {
            // Its sessions' tokens could not name it (only on 32-bit targets).
            self.free_from = self.free_from.min(slot);
            return Err(fail(io::Error::other("too many listeners")));
        }
        let token = token::udp_listener(slot);
        if let Err(e) = registry.register(&mut socket, token, Interest::READABLE) {
            self.free_from = self.free_from.min(slot);
            return Err(fail(e));
        }
        if self.rx.slot_size() == 0 {
            self.rx = Datagrams::new(DATAGRAM_BUFFER);
            self.tx = Datagrams::new(DATAGRAM_BUFFER);
        }
        if let Some(entry) = self.listeners.get_mut(slot) {
            *entry = Some(UdpListen {
                wildcard: origin.addr.ip().is_unspecified(),
                socket,
                origin,
                taking: Taking::Everyone,
                ready: Readiness::default(),
                sessions: SessionTable::default(),
            });
        }
        Ok(())
    }

    pub(crate) fn has_pending_work(&self) -> bool {
        !self.ready.is_empty() || !self.waiting.is_empty()
    }

    /// The listener in `id` (its slot) has datagrams waiting.
    pub(crate) fn listener_ready(&mut self, id: usize, ctx: &mut Ctx<'_>) {
        if let Some(l) = self.listeners.get_mut(id).and_then(Option::as_mut) {
            l.ready.readable = true;
            self.drain_listener(id, ctx);
            if self.listener_mut(id).is_some_and(|l| l.ready.readable)
                && !self.waiting.contains(&id)
            {
                self.waiting.push(id);
            }
        }
    }

    pub(crate) fn session_ready(&mut self, key: Key, event: &mio::event::Event, ctx: &mut Ctx<'_>) {
        if let Some(s) = self.live(key) {
            s.ready.absorb(event);
            self.drain_session(key, ctx);
        }
    }

    /// Continues what a budget cut short.
    pub(crate) fn run_pending(&mut self, ctx: &mut Ctx<'_>) {
        // Only listeners with datagrams left over (a budget ran out), not every one.
        let mut waiting = std::mem::take(&mut self.waiting);
        for &id in &waiting {
            if self.listener_mut(id).is_some_and(|l| l.ready.readable) {
                self.drain_listener(id, ctx);
            }
        }
        waiting.retain(|&id| {
            self.listeners
                .get(id)
                .and_then(Option::as_ref)
                .is_some_and(|l| l.ready.readable)
        });
        waiting.append(&mut self.waiting);
        self.waiting = waiting;
        let ready = std::mem::take(&mut self.ready);
        for &key in &ready {
            self.drain_session(key, ctx);
        }
    }

    /// A session's timer fired: end it if it has been idle for `idle_timeout`, else re-arm.
    pub(crate) fn timer(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(s) = self.live(key) else {
            return;
        };
        s.timer = None;
        let deadline = after(s.last_active, s.origin.conf.idle_timeout);
        if ctx.now >= deadline {
            self.end(key, End::IdleTimeout, ctx);
        } else {
            s.timer = Some(ctx.timers.insert(deadline, Timer::Session(key)));
        }
    }

    pub(crate) fn close_all(&mut self, end: End, ctx: &mut Ctx<'_>) {
        for id in 0..self.listeners.len() {
            let Some(l) = self.listeners.get_mut(id).and_then(Option::as_mut) else {
                continue;
            };
            let keys: Vec<Key> = l
                .sessions
                .keys()
                .filter_map(|slot| l.sessions.get(slot).map(|s| session_key(id, slot, s.gen)))
                .collect();
            for key in keys {
                self.end(key, end, ctx);
            }
        }
    }

    /// Ends every session and closes every listening socket. UDP has no connection to let
    /// finish, and replies leave through the listening socket, so a drain ends sessions at once.
    pub(crate) fn shut(&mut self, ctx: &mut Ctx<'_>) {
        self.close_all(End::Shutdown, ctx);
        self.flush(ctx);
        for slot in &mut self.listeners {
            if let Some(mut l) = slot.take() {
                let _ = ctx.registry.deregister(&mut l.socket);
            }
        }
        self.free_from = 0;
        self.ready.clear();
    }

    fn listener_mut(&mut self, id: usize) -> Option<&mut UdpListen> {
        self.listeners.get_mut(id).and_then(Option::as_mut)
    }

    /// The session `key` names, if the slot still holds that owner: the stale-event guard.
    fn live(&mut self, key: Key) -> Option<&mut Session> {
        let (id, slot) = split_key(key);
        let l = self.listeners.get_mut(id).and_then(Option::as_mut)?;
        l.sessions.get_mut(slot).filter(|s| s.gen == key.gen)
    }

    /// Client datagrams: find or open the client's session and send each on to its server.
    fn drain_listener(&mut self, id: usize, ctx: &mut Ctx<'_>) {
        let mut taken = 0;
        while taken < RECV_BUDGET {
            let Some(l) = self.listeners.get_mut(id).and_then(Option::as_mut) else {
                return;
            };
            let n = match retry(|| sys::recv_many(&l.socket, &mut self.rx, l.wildcard)) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    l.ready.readable = false;
                    return;
                }
                Err(e) => {
                    log::debug!(
                        "udp {}: receive failed: {}",
                        l.origin.addr,
                        sys::io_reason(&e)
                    );
                    taken += 1;
                    continue;
                }
            };
            if n < sys::DATAGRAM_BATCH && sys::SHORT_READ_DRAINS {
                // Fewer than asked for: the queue was empty, and the next datagram raises a
                // new event, so the call that would only say EAGAIN is saved.
                l.ready.readable = false;
            }
            for i in 0..n {
                self.take_datagram(id, i, ctx);
            }
            taken += n.max(1);
            if !self.listener_mut(id).is_some_and(|l| l.ready.readable) {
                return;
            }
        }
    }

    /// Datagram `i` of the batch just read on listener `id`: to its client's session, opened
    /// for it when the client is new and let in.
    fn take_datagram(&mut self, id: usize, i: usize, ctx: &mut Ctx<'_>) {
        let Some(l) = self.listeners.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        let Some((datagram, peer, local)) = self.rx.get(i) else {
            // No source address the socket could name (never on IP sockets): nobody to answer.
            ctx.metrics.dropped(&l.origin.stats);
            return;
        };
        let n = datagram.len();
        // Behind `accept_proxy_protocol` every datagram starts with a v2 header naming the
        // real client: it is taken off here, and used for rules, limits and balancing.
        let (start, client, dst) = match l.origin.conf.accept_proxy_protocol {
            false => (0, peer, None),
            true => match self.strip_header(id, i, peer, ctx) {
                Some(taken) => taken,
                None => return,
            },
        };
        let Some(l) = self.listeners.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        // A session speaks for one client: when the peer (a balancer in front) now sends for
        // another, the old session ends (once the new client is let in) and it gets its own.
        let stale = l.sessions.find(&peer).and_then(|slot| {
            let s = l.sessions.get(slot)?;
            (s.client != client).then(|| session_key(id, slot, s.gen))
        });
        let slot = match l.sessions.find(&peer) {
            Some(slot) if stale.is_none() => slot,
            _ if l.taking == Taking::KnownClients => {
                ctx.metrics.dropped(&l.origin.stats);
                log::trace!(
                    "udp {}: removed by a reload; {} dropped",
                    l.origin.addr,
                    client
                );
                return;
            }
            _ if l.origin.acl.denies(client.ip()).is_some() => {
                let origin = Arc::clone(&l.origin);
                let rule = origin.acl.denies(client.ip()).copied();
                let log = self.denial_log.pass(ctx.now).is_some();
                accounting::deny(ctx, &origin, client, Denial::Acl, rule.as_ref(), log);
                return;
            }
            _ => {
                if let Some(key) = stale {
                    self.end(key, End::ClientClosed, ctx);
                }
                match self.open(id, peer, client, ctx) {
                    Some(slot) => {
                        if let Some(s) =
                            self.listener_mut(id).and_then(|l| l.sessions.get_mut(slot))
                        {
                            s.proxied_dst = dst;
                        }
                        slot
                    }
                    None => return,
                }
            }
        };
        self.send_up(id, slot, i, start..n, local, ctx);
    }

    /// Takes the v2 PROXY header off the datagram in `buf[..n]` from `peer`: where the payload
    /// starts and the client it names. None: the datagram is dropped (no header, a bad one, or a
    /// peer not trusted to send one), and counted.
    fn strip_header(
        &mut self,
        id: usize,
        i: usize,
        peer: SocketAddr,
        ctx: &mut Ctx<'_>,
    ) -> Option<(usize, SocketAddr, Option<SocketAddr>)> {
        let l = self.listeners.get_mut(id).and_then(Option::as_mut)?;
        let trusted = &l.origin.conf.proxy_protocol_trusted;
        if !trusted.is_empty() && !trusted.iter().any(|c| c.contains(peer.ip())) {
            let origin = Arc::clone(&l.origin);
            let log = self.denial_log.pass(ctx.now).is_some();
            accounting::deny(ctx, &origin, peer, Denial::UntrustedProxy, None, log);
            return None;
        }
        let datagram = self.rx.get(i).map(|(d, _, _)| d).unwrap_or_default();
        let why = match pp::parse(datagram) {
            pp::Parsed::Header(h, len) => {
                let dst = h.client().and(h.addrs).map(|(_, dst)| dst);
                return Some((len, h.client().unwrap_or(peer), dst));
            }
            pp::Parsed::Incomplete => "a PROXY header cut short",
            pp::Parsed::Absent => "no PROXY header",
            pp::Parsed::Bad(why) => why,
        };
        ctx.metrics.dropped(&l.origin.stats);
        ctx.metrics
            .proxy_protocol_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(held_back) = self.warnings.pass(ctx.now) {
            log::warn!(
                "udp {}: dropped a datagram from {}: {}{}",
                l.origin.addr,
                peer,
                why,
                Suppressed(held_back)
            );
        }
        None
    }

    fn send_up(
        &mut self,
        id: usize,
        slot: usize,
        i: usize,
        payload: std::ops::Range<usize>,
        local: Option<IpAddr>,
        ctx: &mut Ctx<'_>,
    ) {
        let Some(l) = self.listeners.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        let Some(s) = l.sessions.get_mut(slot) else {
            return;
        };
        s.local = local;
        let n = payload.len();
        let received = self.rx.get(i).map(|(d, _, _)| d).unwrap_or_default();
        let mut datagram = received.get(payload).unwrap_or_default();
        // The server's own `proxy_protocol=` wins; over UDP any version means v2.
        let version = ctx
            .upstreams
            .get(s.upstream.0)
            .and_then(|g| g.server(s.server))
            .and_then(|srv| srv.conf.proxy_protocol)
            .unwrap_or(s.origin.conf.proxy_protocol);
        let header = match version {
            Some(_) => s.origin.conf.proxy_protocol_udp == UdpHeaders::Every || s.up.datagrams == 0,
            None => false,
        };
        if header {
            // The header and the datagram go as one: one copy into a buffer that is kept.
            let to = match (s.proxied_dst, local) {
                (Some(dst), _) => dst,
                (None, Some(ip)) => SocketAddr::new(ip, l.origin.addr.port()),
                (None, None) => l.origin.addr,
            };
            pp::encode_v2_into(
                &mut self.out,
                pp::Command::Proxy,
                pp::Transport::Datagram,
                Some((s.client, to)),
                &[],
            );
            self.out.extend_from_slice(datagram);
            datagram = &self.out;
        }
        match retry(|| s.socket.send(datagram)) {
            Ok(Some(_)) => {
                s.up.add(n);
                s.last_active = ctx.now;
                l.sessions.touch(slot);
            }
            Err(e) if is_refusal(&e) => {
                let key = session_key(id, slot, s.gen);
                self.refused(key, ctx);
            }
            Ok(None) | Err(_) => {
                ctx.metrics.dropped(&l.origin.stats);
                log::trace!("udp {}: datagram dropped", l.origin.addr);
            }
        }
    }

    /// Server datagrams: each goes back to the client through the listening socket.
    fn drain_session(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let (id, slot) = split_key(key);
        let mut taken = 0;
        while taken < RECV_BUDGET {
            if self.tx_listener != id || self.tx.is_full() {
                // The batch holds one listener's replies, and only so many.
                self.flush(ctx);
                self.tx_listener = id;
            }
            let Some(l) = self.listeners.get_mut(id).and_then(Option::as_mut) else {
                return;
            };
            let Some(client) = l.sessions.client(slot) else {
                return;
            };
            let Some(s) = l.sessions.get_mut(slot).filter(|s| s.gen == key.gen) else {
                return;
            };
            if !s.ready.readable {
                return;
            }
            let limit = u64::from(s.origin.conf.udp_responses);
            // With `udp_responses`, no more than the session may still pass on.
            let max = match limit {
                0 => sys::DATAGRAM_BATCH,
                _ => limit
                    .saturating_sub(s.down.datagrams)
                    .min(sys::DATAGRAM_BATCH as u64) as usize,
            };
            if max == 0 {
                // Not reached: a session ends as its last reply is read.
                self.end(key, End::ServerClosed, ctx);
                return;
            }
            let first = self.tx.len();
            let n = match retry(|| {
                sys::recv_connected(&s.socket, &mut self.tx, max, client, s.local)
            }) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    s.ready.readable = false;
                    return;
                }
                Err(e) if is_refusal(&e) => {
                    self.refused(key, ctx);
                    return;
                }
                Err(e) => {
                    log::debug!(
                        "udp session {}: receive failed: {}",
                        client,
                        crate::sys::io_reason(&e)
                    );
                    self.end(key, End::Error, ctx);
                    return;
                }
            };
            taken += n.max(1);
            // Sent with the others at the next flush, from where the client sent to.
            for i in first..first + n {
                s.down
                    .add(self.tx.get(i).map_or(0, |(bytes, _, _)| bytes.len()));
            }
            s.last_active = ctx.now;
            let complete = limit > 0 && s.down.datagrams >= limit;
            let drained = n < max.min(sys::DATAGRAM_BATCH - first) && sys::SHORT_READ_DRAINS;
            if drained {
                s.ready.readable = false;
            }
            l.sessions.touch(slot);
            if complete {
                // The exchange is complete (DNS style): free the session at once.
                self.end(key, End::ServerClosed, ctx);
                return;
            }
            if drained {
                return;
            }
        }
        self.ready.push(key);
    }

    /// Opens a session for a new client, evicting the least recently active one at the cap.
    /// A session for datagrams from `peer` (which replies go back to) on behalf of `client` (the
    /// same, or the client a PROXY header named).
    fn open(
        &mut self,
        id: usize,
        peer: SocketAddr,
        client: SocketAddr,
        ctx: &mut Ctx<'_>,
    ) -> Option<usize> {
        let l = self.listeners.get_mut(id).and_then(Option::as_mut)?;
        let origin = Arc::clone(&l.origin);
        let (upstream, listen, max) = (origin.conf.upstream, origin.addr, origin.conf.max_sessions);
        let now = ctx.now;
        // The per-client limits before the balancer: a refused client moves nothing on.
        let ticket = match origin.per_ip.is_none() {
            true => None,
            false => match ctx
                .per_ip
                .admit(origin.tag, client.ip(), &origin.per_ip, now)
            {
                Ok(t) => Some(t),
                Err(refusal) => {
                    let why = match refusal {
                        Refusal::MaxPerIp => Denial::MaxSessionsPerIp,
                        Refusal::Rate => Denial::RatePerIp,
                        Refusal::TableFull => Denial::PerIpTableFull,
                    };
                    let log = self.denial_log.pass(now).is_some();
                    if refusal == Refusal::TableFull && log {
                        log::warn!(
                            "per-client table full ({} clients with open sessions or connections): refusing new addresses",
                            ctx.per_ip.len()
                        );
                    }
                    accounting::deny(ctx, &origin, client, why, None, log);
                    return None;
                }
            },
        };
        let give_back = |ctx: &mut Ctx<'_>| {
            if let Some(t) = ticket {
                ctx.per_ip.release(t);
            }
        };
        let Some(group) = ctx.upstreams.get_mut(upstream.0) else {
            give_back(ctx);
            return None;
        };
        let Some(server) = group.pick(client.ip(), now, &Tried::default()) else {
            give_back(ctx);
            accounting::refuse(ctx, &origin, client, upstream, End::NoServer);
            return None;
        };
        let Some(addr) = group.server(server).map(|s| s.conf.addr) else {
            give_back(ctx);
            return None;
        };
        // Room is made only for a client that can be served: with no server available, a new
        // client must not push out a session that works.
        if max > 0 && l.sessions.len() >= max {
            let oldest = l
                .sessions
                .oldest()
                .and_then(|slot| l.sessions.get(slot).map(|s| session_key(id, slot, s.gen)));
            if let Some(key) = oldest {
                self.end(key, End::Limit, ctx);
            }
        }
        let Some(l) = self.listeners.get_mut(id).and_then(Option::as_mut) else {
            give_back(ctx);
            return None;
        };
        let slot = l.sessions.next_key();
        if slot > SESSION_MASK || ctx.upstreams.get(upstream.0).is_none() {
            // A token could not tell this session from another: refuse it instead.
            ctx.metrics.dropped(&origin.stats);
            give_back(ctx);
            return None;
        }
        let gen = self.next_gen;
        self.next_gen = token::next_gen(self.next_gen);
        let key = session_key(id, slot, gen);
        let socket = match listener::connect(addr, ctx.registry, token::udp_session(key)) {
            Ok(socket) => socket,
            Err(e) => {
                ctx.metrics.dropped(&origin.stats);
                give_back(ctx);
                if let Some(held_back) = self.warnings.pass(now) {
                    log::warn!(
                        "udp {}: cannot open a session to {} for {}: {}{}",
                        listen,
                        addr,
                        client,
                        crate::sys::io_reason(&e),
                        Suppressed(held_back)
                    );
                }
                return None;
            }
        };
        if let Some(group) = ctx.upstreams.get_mut(upstream.0) {
            group.acquire(server);
        }
        let timer = ctx
            .timers
            .insert(after(now, origin.conf.idle_timeout), Timer::Session(key));
        let slot = l.sessions.insert(
            peer,
            Session {
                gen,
                origin: Arc::clone(&origin),
                upstream,
                server,
                client,
                proxied_dst: None,
                local: None,
                socket,
                ready: Readiness::default(),
                started: now,
                last_active: now,
                timer: Some(timer),
                up: Tally::default(),
                down: Tally::default(),
                ticket,
            },
        );
        ctx.metrics.session_opened(&origin.stats);
        Some(slot)
    }

    /// The server answered with ICMP port unreachable: count it against the server.
    fn refused(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let (id, slot) = split_key(key);
        if let Some(l) = self.listeners.get(id).and_then(Option::as_ref) {
            if let Some(s) = l.sessions.get(slot) {
                let (upstream, server, client) = (s.upstream, s.server, s.client);
                accounting::connect_failed(
                    ctx,
                    upstream,
                    server,
                    client,
                    "refused (port unreachable)",
                );
            }
        }
        self.end(key, End::ConnectFailed, ctx);
    }

    fn end(&mut self, key: Key, end: End, ctx: &mut Ctx<'_>) {
        let (id, slot) = split_key(key);
        let Some(l) = self.listeners.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        if !l.sessions.get(slot).is_some_and(|s| s.gen == key.gen) {
            return;
        }
        let Some(mut s) = l.sessions.remove(slot) else {
            return;
        };
        let _ = ctx.registry.deregister(&mut s.socket);
        if let Some(timer) = s.timer.take() {
            ctx.timers.cancel(timer);
        }
        if let Some(ticket) = s.ticket.take() {
            ctx.per_ip.release(ticket);
        }
        accounting::settle(
            ctx,
            &Settle {
                origin: &s.origin,
                client: s.client,
                upstream: s.upstream,
                held: Some(s.server),
                named: Some(s.server),
                bytes: (s.up.bytes, s.down.bytes),
                datagrams: Some((s.up.datagrams, s.down.datagrams)),
                started: s.started,
                end,
                sni: None,
            },
        );
        self.close_if_retired(id, ctx);
    }

    /// Sends the gathered replies through their listener's socket, as few `sendmmsg` calls as
    /// the kernel takes them in. A reply the socket refuses is dropped and counted (a full send
    /// buffer drops the rest of the batch too: they would find it full as well).
    pub(crate) fn flush(&mut self, ctx: &mut Ctx<'_>) {
        if self.tx.is_empty() {
            return;
        }
        let Some(l) = self
            .listeners
            .get(self.tx_listener)
            .and_then(Option::as_ref)
        else {
            // Not reached: every path that closes a listener flushes first. Counted if it is.
            for _ in 0..self.tx.len() {
                ctx.metrics
                    .udp_dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            self.tx.clear();
            return;
        };
        let total = self.tx.len();
        let mut sent = 0;
        while sent < total {
            match retry(|| sys::send_many(&l.socket, &self.tx, sent)) {
                Ok(Some(0)) | Ok(None) => {
                    for _ in sent..total {
                        ctx.metrics.dropped(&l.origin.stats);
                    }
                    log::trace!(
                        "udp {}: {} replies dropped (send buffer full)",
                        l.origin.addr,
                        total - sent
                    );
                    break;
                }
                Ok(Some(k)) => sent += k,
                Err(e) => {
                    // The first of the rest failed: alone, and as `reply` does it (a source the
                    // route refuses is left to the kernel to pick).
                    let Some((datagram, client, local)) = self.tx.get(sent) else {
                        for _ in sent..total {
                            ctx.metrics.dropped(&l.origin.stats);
                        }
                        break;
                    };
                    let alone = match e.kind() {
                        io::ErrorKind::InvalidInput if local.is_some() => {
                            retry(|| l.reply(datagram, client, None))
                        }
                        _ => Err(e),
                    };
                    if !matches!(alone, Ok(Some(_))) {
                        ctx.metrics.dropped(&l.origin.stats);
                        log::trace!("udp {}: reply to {} dropped", l.origin.addr, client);
                    }
                    sent += 1;
                }
            }
        }
        self.tx.clear();
    }

    /// Closes a listener a reload removed once its last session has ended.
    fn close_if_retired(&mut self, id: usize, ctx: &mut Ctx<'_>) {
        let retired = self
            .listeners
            .get(id)
            .and_then(Option::as_ref)
            .is_some_and(|l| l.taking == Taking::KnownClients && l.sessions.is_empty());
        if !retired {
            return;
        }
        // Its replies leave before its socket closes (and only then: a flush at every session
        // end would split the batches of `udp_responses` listeners into single datagrams).
        if self.tx_listener == id {
            self.flush(ctx);
        }
        if let Some(mut l) = self.listeners.get_mut(id).and_then(Option::take) {
            let _ = ctx.registry.deregister(&mut l.socket);
            log::debug!("udp {}: closed, its last session ended", l.origin.addr);
        }
        self.free_from = self.free_from.min(id);
    }
}

fn is_refusal(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::ConnectionRefused
}
