//! UDP proxying: one listening socket per `listen udp`, one session per client address.
//!
//! A session owns a UDP socket connected to the server the balancer picked, registered in the
//! worker's poll, so replies are told apart by socket, never by a lookup. Client → server
//! datagrams arrive on the listener and leave on the session socket; replies leave through the
//! listener to the client's address, so the client sees them come from the address it sent to.
//! Each datagram is read once into the worker's 64 KiB datagram buffer and written once;
//! boundaries are kept. A full send buffer drops the datagram (UDP semantics) and counts it:
//! nothing waits for writability and nothing spins.
//!
//! Sessions end on `idle_timeout` (a lazy deadline on the timer wheel), after `udp_responses`
//! replies, when the server refuses (ICMP port unreachable, counted against the server), on
//! `max_sessions` eviction of the least recently active session, and at shutdown.

mod listener;
pub mod session;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Registry};

use crate::config::{Listen, Proto};
use crate::runtime::access_log;
use crate::runtime::timer::TimerKey;
use crate::runtime::token;
use crate::runtime::{after, Ctx, End, LogLimit, RuntimeError, Timer};
use crate::upstream::Tried;
use session::SessionTable;

/// Large enough for any datagram (the IPv6 payload limit is 65,527 bytes).
const DATAGRAM_BUFFER: usize = 65_536;
/// Datagrams taken from one socket per wake-up before others get a turn.
const RECV_BUDGET: usize = 64;
/// A session id is `listener << SESSION_BITS | key`: tokens and timers name both at once.
const SESSION_BITS: u32 = 40;
const SESSION_MASK: usize = (1 << SESSION_BITS) - 1;
/// Warnings about failing to open sessions are logged at most this often.
const WARN_INTERVAL: Duration = Duration::from_secs(1);

fn session_id(listener: usize, key: usize) -> usize {
    listener << SESSION_BITS | (key & SESSION_MASK)
}

fn split_id(id: usize) -> (usize, usize) {
    (id >> SESSION_BITS, id & SESSION_MASK)
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
    gen: u32,
    server: usize,
    /// On a wildcard listener: the address the client last sent to, where replies leave from.
    local: Option<IpAddr>,
    socket: UdpSocket,
    readable: bool,
    started: Instant,
    last_active: Instant,
    timer: Option<TimerKey>,
    up: Tally,
    down: Tally,
}

struct UdpListen {
    socket: UdpSocket,
    conf: Listen,
    addr: SocketAddr,
    /// Bound to `0.0.0.0` or `[::]`: datagrams carry their destination address.
    wildcard: bool,
    readable: bool,
    sessions: SessionTable<Session>,
}

impl UdpListen {
    /// One datagram from a client, with the local address it was sent to on a wildcard listener.
    fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        if self.wildcard {
            return crate::sys::recv_from_to(&self.socket, buf);
        }
        let (n, from) = self.socket.recv_from(buf)?;
        Ok((n, from, None))
    }

    /// A reply to `client`, from `local` when the listener is a wildcard one.
    fn reply(
        &self,
        datagram: &[u8],
        client: SocketAddr,
        local: Option<IpAddr>,
    ) -> io::Result<usize> {
        match local {
            Some(local) => crate::sys::send_to_from(&self.socket, datagram, client, local),
            None => self.socket.send_to(datagram, client),
        }
    }
}

pub(crate) struct UdpProxy {
    listeners: Vec<UdpListen>,
    buf: Box<[u8]>,
    next_gen: u32,
    /// Sessions that stopped reading with datagrams left (budget); drained before sleeping.
    ready: Vec<usize>,
    warnings: LogLimit,
}

impl UdpProxy {
    /// Binds every `listen udp` among `confs`, in order.
    pub(crate) fn bind<'a>(
        confs: impl Iterator<Item = &'a Listen>,
        registry: &Registry,
    ) -> Result<UdpProxy, RuntimeError> {
        let mut listeners = Vec::new();
        for conf in confs.filter(|l| l.proto == Proto::Udp) {
            let bind_err = |error| RuntimeError::Bind {
                proto: Proto::Udp,
                addr: conf.addr,
                error,
            };
            let mut socket = listener::bind(conf.addr).map_err(bind_err)?;
            let addr = socket.local_addr().map_err(bind_err)?;
            registry
                .register(
                    &mut socket,
                    token::udp_listener(listeners.len()),
                    Interest::READABLE,
                )
                .map_err(bind_err)?;
            listeners.push(UdpListen {
                socket,
                conf: conf.clone(),
                addr,
                wildcard: addr.ip().is_unspecified(),
                readable: false,
                sessions: SessionTable::default(),
            });
        }
        let buf = if listeners.is_empty() {
            Box::default()
        } else {
            vec![0u8; DATAGRAM_BUFFER].into_boxed_slice()
        };
        Ok(UdpProxy {
            listeners,
            buf,
            next_gen: 0,
            ready: Vec::new(),
            warnings: LogLimit::new(WARN_INTERVAL),
        })
    }

    pub(crate) fn local_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.listeners.iter().map(|l| l.addr)
    }

    pub(crate) fn describe(&self) -> impl Iterator<Item = (SocketAddr, usize)> + '_ {
        self.listeners.iter().map(|l| (l.addr, l.conf.upstream))
    }

    pub(crate) fn has_pending_work(&self) -> bool {
        !self.ready.is_empty() || self.listeners.iter().any(|l| l.readable)
    }

    pub(crate) fn listener_ready(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        if let Some(l) = self.listeners.get_mut(i) {
            l.readable = true;
            self.drain_listener(i, ctx);
        }
    }

    pub(crate) fn session_ready(&mut self, id: usize, ctx: &mut Ctx<'_>) {
        let (i, key) = split_id(id);
        if let Some(s) = self
            .listeners
            .get_mut(i)
            .and_then(|l| l.sessions.get_mut(key))
        {
            s.readable = true;
            self.drain_session(id, ctx);
        }
    }

    /// Continues what a budget cut short.
    pub(crate) fn run_pending(&mut self, ctx: &mut Ctx<'_>) {
        for i in 0..self.listeners.len() {
            if self.listeners[i].readable {
                self.drain_listener(i, ctx);
            }
        }
        let ready = std::mem::take(&mut self.ready);
        for &id in &ready {
            self.drain_session(id, ctx);
        }
    }

    /// A session's timer fired: end it if it has been idle for `idle_timeout`, else re-arm.
    pub(crate) fn timer(&mut self, id: usize, gen: u32, ctx: &mut Ctx<'_>) {
        let (i, key) = split_id(id);
        let Some(l) = self.listeners.get_mut(i) else {
            return;
        };
        let idle_timeout = l.conf.idle_timeout;
        let Some(s) = l.sessions.get_mut(key) else {
            return;
        };
        if s.gen != gen {
            return;
        }
        s.timer = None;
        let deadline = after(s.last_active, idle_timeout);
        if ctx.now >= deadline {
            self.end(id, End::IdleTimeout, ctx);
        } else {
            s.timer = Some(ctx.timers.insert(deadline, Timer::Session { key: id, gen }));
        }
    }

    pub(crate) fn close_all(&mut self, end: End, ctx: &mut Ctx<'_>) {
        for i in 0..self.listeners.len() {
            let keys: Vec<usize> = self.listeners[i].sessions.keys().collect();
            for key in keys {
                self.end(session_id(i, key), end, ctx);
            }
        }
    }

    /// Client datagrams: find or open the client's session and send each on to its server.
    fn drain_listener(&mut self, i: usize, ctx: &mut Ctx<'_>) {
        for _ in 0..RECV_BUDGET {
            let Some(l) = self.listeners.get_mut(i) else {
                return;
            };
            let (n, client, local) = match l.recv(&mut self.buf) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    l.readable = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!(
                        "udp {}: receive failed: {}",
                        l.addr,
                        crate::sys::io_reason(&e)
                    );
                    continue;
                }
            };
            let key = match l.sessions.find(&client) {
                Some(key) => key,
                None => match self.open(i, client, ctx) {
                    Some(key) => key,
                    None => continue,
                },
            };
            self.send_up(i, key, n, local, ctx);
        }
    }

    fn send_up(
        &mut self,
        i: usize,
        key: usize,
        n: usize,
        local: Option<IpAddr>,
        ctx: &mut Ctx<'_>,
    ) {
        let Some(l) = self.listeners.get_mut(i) else {
            return;
        };
        let Some(s) = l.sessions.get_mut(key) else {
            return;
        };
        s.local = local;
        let datagram = self.buf.get(..n).unwrap_or_default();
        match s.socket.send(datagram) {
            Ok(_) => {
                s.up.add(n);
                s.last_active = ctx.now;
                l.sessions.touch(key);
            }
            Err(e) if is_refusal(&e) => self.refused(session_id(i, key), ctx),
            Err(e) => {
                ctx.stats.udp_dropped.fetch_add(1, Ordering::Relaxed);
                log::trace!(
                    "udp {}: datagram dropped: {}",
                    l.addr,
                    crate::sys::io_reason(&e)
                );
            }
        }
    }

    /// Server datagrams: each goes back to the client through the listening socket.
    fn drain_session(&mut self, id: usize, ctx: &mut Ctx<'_>) {
        let (i, key) = split_id(id);
        for _ in 0..RECV_BUDGET {
            let Some(l) = self.listeners.get_mut(i) else {
                return;
            };
            let Some(client) = l.sessions.client(key) else {
                return;
            };
            let Some(s) = l.sessions.get_mut(key) else {
                return;
            };
            if !s.readable {
                return;
            }
            let n = match s.socket.recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    s.readable = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_refusal(&e) => {
                    self.refused(id, ctx);
                    return;
                }
                Err(e) => {
                    log::debug!(
                        "udp session {}: receive failed: {}",
                        client,
                        crate::sys::io_reason(&e)
                    );
                    self.end(id, End::Error, ctx);
                    return;
                }
            };
            s.down.add(n);
            s.last_active = ctx.now;
            let replies = s.down.datagrams;
            let local = s.local;
            let datagram = self.buf.get(..n).unwrap_or_default();
            if let Err(e) = l.reply(datagram, client, local) {
                ctx.stats.udp_dropped.fetch_add(1, Ordering::Relaxed);
                log::trace!(
                    "udp {}: reply to {} dropped: {}",
                    l.addr,
                    client,
                    crate::sys::io_reason(&e)
                );
            }
            l.sessions.touch(key);
            let limit = u64::from(l.conf.udp_responses);
            if limit > 0 && replies >= limit {
                // The exchange is complete (DNS style): free the session at once.
                self.end(id, End::ServerClosed, ctx);
                return;
            }
        }
        self.ready.push(id);
    }

    /// Opens a session for a new client, evicting the least recently active one at the cap.
    fn open(&mut self, i: usize, client: SocketAddr, ctx: &mut Ctx<'_>) -> Option<usize> {
        let l = self.listeners.get_mut(i)?;
        let max = l.conf.max_sessions;
        if max > 0 && l.sessions.len() >= max {
            if let Some(oldest) = l.sessions.oldest() {
                self.end(session_id(i, oldest), End::Limit, ctx);
            }
        }
        let l = self.listeners.get_mut(i)?;
        let group = ctx.groups.get_mut(l.conf.upstream)?;
        let Some(server) = group.pick(client.ip(), ctx.now, &Tried::default()) else {
            ctx.stats.count_end(End::NoServer);
            if ctx.access_log {
                access_log::write(&access_log::Entry {
                    listen: l.addr,
                    client,
                    upstream: &group.name,
                    server: None,
                    up_bytes: 0,
                    down_bytes: 0,
                    datagrams: Some((0, 0)),
                    duration: Duration::ZERO,
                    end: End::NoServer,
                });
            }
            return None;
        };
        let addr = group.servers()[server].conf.addr;
        let key = l.sessions.next_key();
        let id = session_id(i, key);
        let socket = match listener::connect(addr, ctx.registry, token::udp_session(id)) {
            Ok(socket) => socket,
            Err(e) => {
                ctx.stats.udp_dropped.fetch_add(1, Ordering::Relaxed);
                if self.warnings.allow(ctx.now) {
                    log::warn!(
                        "udp {}: cannot open a session to {} for {}: {}",
                        self.listeners[i].addr,
                        addr,
                        client,
                        crate::sys::io_reason(&e)
                    );
                }
                return None;
            }
        };
        group.acquire(server);
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1);
        let timer = ctx.timers.insert(
            after(ctx.now, l.conf.idle_timeout),
            Timer::Session { key: id, gen },
        );
        let key = l.sessions.insert(
            client,
            Session {
                gen,
                server,
                local: None,
                socket,
                readable: false,
                started: ctx.now,
                last_active: ctx.now,
                timer: Some(timer),
                up: Tally::default(),
                down: Tally::default(),
            },
        );
        ctx.stats.udp_sessions_total.fetch_add(1, Ordering::Relaxed);
        ctx.stats
            .udp_sessions_active
            .fetch_add(1, Ordering::Relaxed);
        Some(key)
    }

    /// The server answered with ICMP port unreachable: count it against the server.
    fn refused(&mut self, id: usize, ctx: &mut Ctx<'_>) {
        let (i, key) = split_id(id);
        if let Some(l) = self.listeners.get(i) {
            if let (Some(s), Some(group)) =
                (l.sessions.get(key), ctx.groups.get_mut(l.conf.upstream))
            {
                ctx.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                let addr = group.servers()[s.server].conf.addr;
                log::info!(
                    "upstream {}: udp server {} refused (port unreachable)",
                    group.name,
                    addr
                );
                if group.connect_failed(s.server, ctx.now) {
                    log::warn!(
                        "upstream {}: server {} marked unavailable after refusals",
                        group.name,
                        addr
                    );
                }
            }
        }
        self.end(id, End::ConnectFailed, ctx);
    }

    fn end(&mut self, id: usize, end: End, ctx: &mut Ctx<'_>) {
        let (i, key) = split_id(id);
        let Some(l) = self.listeners.get_mut(i) else {
            return;
        };
        let Some(client) = l.sessions.client(key) else {
            return;
        };
        let Some(mut s) = l.sessions.remove(key) else {
            return;
        };
        let _ = ctx.registry.deregister(&mut s.socket);
        if let Some(timer) = s.timer.take() {
            ctx.timers.cancel(timer);
        }
        ctx.stats
            .udp_sessions_active
            .fetch_sub(1, Ordering::Relaxed);
        add(&ctx.stats.udp_datagrams_up, s.up.datagrams);
        add(&ctx.stats.udp_datagrams_down, s.down.datagrams);
        add(&ctx.stats.bytes_up, s.up.bytes);
        add(&ctx.stats.bytes_down, s.down.bytes);
        ctx.stats.count_end(end);
        let Some(group) = ctx.groups.get_mut(l.conf.upstream) else {
            return;
        };
        group.release(s.server);
        if ctx.access_log {
            access_log::write(&access_log::Entry {
                listen: l.addr,
                client,
                upstream: &group.name,
                server: Some(group.servers()[s.server].conf.addr),
                up_bytes: s.up.bytes,
                down_bytes: s.down.bytes,
                datagrams: Some((s.up.datagrams, s.down.datagrams)),
                duration: ctx.now.duration_since(s.started),
                end,
            });
        }
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn is_refusal(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::ConnectionRefused
}
