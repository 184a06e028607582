//! One reactor thread: a `mio::Poll`, the slab of TCP pairs, the timer wheel, the buffer pool
//! and the per-worker upstream state.
//!
//! Invariants: the loop never blocks except in `poll`, whose timeout is 0 while some work is
//! pending (a pair that yielded, a listener with clients waiting) and otherwise the time to the
//! next timer, so an idle proxy sleeps. Sockets are registered once, readable and writable;
//! readiness lives in the pair. A closed pair keeps its slab slot until the end of the event
//! batch (`reap`), so a token is never reused while an event for its old owner may follow.

mod tcp;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Waker};
use slab::Slab;

use super::timer::TimerWheel;
use super::token::{self, Target};
use super::{after, Command, Ctx, End, LogLimit, RuntimeError, Stats, Timer};
use crate::config::{Config, Listen, Proto};
use crate::tcp::buffer::BufferPool;
use crate::tcp::listener;
use crate::tcp::pipe::{Pair, PairState};
use crate::udp::UdpProxy;
use crate::upstream::health::Prober;
use crate::upstream::Group;

/// Accepts per listener per loop turn before other work gets a go.
const ACCEPT_BUDGET: usize = 64;
/// Pause after `EMFILE`/`ENFILE` before trying to accept again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Out-of-descriptor warnings are logged at most this often.
const FD_WARN_INTERVAL: Duration = Duration::from_secs(1);

/// Whether the worker takes new TCP clients now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptState {
    Open,
    /// `max_connections` pairs are open; resumes when one ends.
    AtCapacity,
    /// Out of file descriptors; resumes when the timer fires or a pair ends.
    BackingOff,
}

struct TcpListen {
    socket: TcpListener,
    conf: Listen,
    addr: SocketAddr,
    /// The kernel said readable and `accept` has not yet said `WouldBlock`.
    readable: bool,
}

pub struct Worker {
    poll: Poll,
    events: Option<Events>,
    waker: Arc<Waker>,
    inbox: mpsc::Receiver<Command>,
    config: Config,
    stats: Arc<Stats>,
    listeners: Vec<TcpListen>,
    udp: UdpProxy,
    probes: Prober,
    /// Bound addresses of all listeners in config order.
    bound: Vec<(Proto, SocketAddr)>,
    groups: Vec<Group>,
    pairs: Slab<Pair>,
    next_gen: u32,
    timers: TimerWheel<Timer>,
    pool: BufferPool,
    scratch: Box<[u8]>,
    /// Pairs that stopped with readiness left (fairness budget); driven again before sleeping.
    ready: Vec<(usize, u32)>,
    /// Pairs waiting for the pool to lend a buffer again.
    starved: Vec<(usize, u32)>,
    /// Pairs closed in this batch; their slots are freed by `reap`.
    dead: Vec<usize>,
    accept: AcceptState,
    fd_warnings: LogLimit,
    /// "no server available" is logged at most once per `FD_WARN_INTERVAL`, with a count.
    no_server_warnings: LogLimit,
    now: Instant,
    stopping: bool,
    /// When the last poll returned events; `busy_poll` counts from here.
    last_event: Instant,
}

impl Worker {
    pub fn new(
        config: Config,
        stats: Arc<Stats>,
        inbox: mpsc::Receiver<Command>,
    ) -> Result<Worker, RuntimeError> {
        let io_err = |what| move |error| RuntimeError::Io { what, error };
        let poll = Poll::new().map_err(io_err("cannot create the poller"))?;
        let waker = Waker::new(poll.registry(), token::waker())
            .map_err(io_err("cannot create the waker"))?;
        let mut listeners = Vec::new();
        for conf in config.listeners.iter().filter(|l| l.proto == Proto::Tcp) {
            let bind_err = |error| RuntimeError::Bind {
                proto: Proto::Tcp,
                addr: conf.addr,
                error,
            };
            let mut socket = listener::bind(conf.addr).map_err(bind_err)?;
            let addr = socket.local_addr().map_err(bind_err)?;
            poll.registry()
                .register(
                    &mut socket,
                    token::listener(listeners.len()),
                    Interest::READABLE,
                )
                .map_err(bind_err)?;
            listeners.push(TcpListen {
                socket,
                conf: conf.clone(),
                addr,
                readable: false,
            });
        }
        let udp = UdpProxy::bind(config.listeners.iter(), poll.registry())?;
        let (mut tcp_addrs, mut udp_addrs) = (listeners.iter().map(|l| l.addr), udp.local_addrs());
        let bound = config
            .listeners
            .iter()
            .filter_map(|l| match l.proto {
                Proto::Tcp => tcp_addrs.next().map(|a| (Proto::Tcp, a)),
                Proto::Udp => udp_addrs.next().map(|a| (Proto::Udp, a)),
            })
            .collect();
        drop(udp_addrs);
        let now = Instant::now();
        let pool = BufferPool::new(
            config.buffer_size,
            config.buffer_memory,
            Arc::clone(&stats.pool),
        );
        Ok(Worker {
            poll,
            events: Some(Events::with_capacity(1024)),
            waker: Arc::new(waker),
            inbox,
            groups: config.upstreams.iter().map(Group::new).collect(),
            scratch: vec![0u8; config.buffer_size.max(1)].into_boxed_slice(),
            config,
            stats,
            listeners,
            udp,
            probes: Prober::default(),
            bound,
            pairs: Slab::new(),
            next_gen: 0,
            timers: TimerWheel::new(now),
            pool,
            ready: Vec::new(),
            starved: Vec::new(),
            dead: Vec::new(),
            accept: AcceptState::Open,
            fd_warnings: LogLimit::new(FD_WARN_INTERVAL),
            no_server_warnings: LogLimit::new(FD_WARN_INTERVAL),
            now,
            stopping: false,
            last_event: now,
        })
    }

    pub fn local_addrs(&self) -> Vec<(Proto, SocketAddr)> {
        self.bound.clone()
    }

    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    pub fn run(mut self) -> Result<(), RuntimeError> {
        for l in &self.listeners {
            log::info!(
                "listening on {} for upstream {}",
                l.addr,
                self.groups[l.conf.upstream].name
            );
        }
        for (addr, upstream) in self.udp.describe() {
            log::info!(
                "listening on udp {} for upstream {}",
                addr,
                self.groups[upstream].name
            );
        }
        let upstreams = std::mem::take(&mut self.config.upstreams);
        self.with_probes(|probes, ctx| *probes = Prober::start(&upstreams, ctx));
        self.config.upstreams = upstreams;
        while !self.stopping {
            self.turn()?;
        }
        self.close_all(End::Shutdown);
        self.with_udp(|udp, ctx| udp.close_all(End::Shutdown, ctx));
        self.reap();
        Ok(())
    }

    /// One loop turn: wait, handle events, fire timers, finish pending work, free slots.
    fn turn(&mut self) -> Result<(), RuntimeError> {
        let mut events = self
            .events
            .take()
            .unwrap_or_else(|| Events::with_capacity(1024));
        let polled = self.wait(&mut events);
        self.now = Instant::now();
        if !events.is_empty() {
            self.last_event = self.now;
        }
        match polled {
            Ok(()) => {
                for event in events.iter() {
                    self.dispatch(event);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                self.events = Some(events);
                return Err(RuntimeError::Io {
                    what: "poll",
                    error,
                });
            }
        }
        self.events = Some(events);
        self.expire_timers();
        self.run_pending();
        self.reap();
        Ok(())
    }

    /// Polls for events: at once while work is pending; else, with `busy_poll` set and an event
    /// seen within it, without sleeping until the window closes (waking a sleeping CPU costs
    /// tens of microseconds on some machines); then asleep until the next timer.
    fn wait(&mut self, events: &mut Events) -> io::Result<()> {
        if self.has_pending_work() {
            return self.poll.poll(events, Some(Duration::ZERO));
        }
        let mut now = Instant::now();
        let spin_until = self.last_event + self.config.busy_poll;
        if now < spin_until {
            let spin_until = match self.timers.poll_timeout(now) {
                Some(timeout) => spin_until.min(after(now, timeout)),
                None => spin_until,
            };
            while now < spin_until {
                self.poll.poll(events, Some(Duration::ZERO))?;
                if !events.is_empty() {
                    self.stats.busy_poll_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                std::hint::spin_loop();
                now = Instant::now();
            }
        }
        self.poll.poll(events, self.timers.poll_timeout(now))
    }

    fn has_pending_work(&self) -> bool {
        !self.ready.is_empty()
            || (!self.starved.is_empty() && self.pool.can_lend())
            || (self.accept == AcceptState::Open && self.listeners.iter().any(|l| l.readable))
            || self.udp.has_pending_work()
    }

    /// The UDP side and the probes, each with the parts of the worker they share.
    fn split(&mut self) -> (&mut UdpProxy, &mut Prober, Ctx<'_>) {
        let ctx = Ctx {
            registry: self.poll.registry(),
            timers: &mut self.timers,
            groups: &mut self.groups,
            stats: &self.stats,
            now: self.now,
            access_log: self.config.access_log,
        };
        (&mut self.udp, &mut self.probes, ctx)
    }

    fn with_udp(&mut self, f: impl FnOnce(&mut UdpProxy, &mut Ctx<'_>)) {
        let (udp, _, mut ctx) = self.split();
        f(udp, &mut ctx);
    }

    fn with_probes(&mut self, f: impl FnOnce(&mut Prober, &mut Ctx<'_>)) {
        let (_, probes, mut ctx) = self.split();
        f(probes, &mut ctx);
    }

    fn dispatch(&mut self, event: &mio::event::Event) {
        match token::decode(event.token()) {
            Target::Waker => self.read_inbox(),
            Target::Listener(i) => {
                if let Some(l) = self.listeners.get_mut(i) {
                    l.readable = true;
                    self.accept_from(i);
                }
            }
            Target::Pair(key, side) => {
                let Some(pair) = self.pairs.get_mut(key) else {
                    return;
                };
                if pair.state == PairState::Closed {
                    return;
                }
                pair.readiness(side).absorb(event);
                let gen = pair.gen;
                self.drive(key, gen);
            }
            Target::UdpListener(i) => self.with_udp(|udp, ctx| udp.listener_ready(i, ctx)),
            Target::UdpSession(id) => self.with_udp(|udp, ctx| udp.session_ready(id, ctx)),
            Target::Probe(key) => self.with_probes(|probes, ctx| probes.ready(key, ctx)),
            Target::Unknown => {}
        }
    }

    fn read_inbox(&mut self) {
        while let Ok(command) = self.inbox.try_recv() {
            match command {
                Command::Stop => self.stopping = true,
            }
        }
    }

    // ---- timers ----------------------------------------------------------------------------

    fn expire_timers(&mut self) {
        while let Some(timer) = self.timers.expire(self.now) {
            match timer {
                Timer::Pair { key, gen } => self.pair_timer(key, gen),
                Timer::Session { key, gen } => self.with_udp(|udp, ctx| udp.timer(key, gen, ctx)),
                Timer::Probe { key, gen } => {
                    self.with_probes(|probes, ctx| probes.timer(key, gen, ctx))
                }
                Timer::AcceptResume => {
                    if self.accept == AcceptState::BackingOff {
                        self.accept = AcceptState::Open;
                    }
                    self.reopen_accepting();
                }
            }
        }
    }

    // ---- pending work ----------------------------------------------------------------------

    /// Drives pairs that yielded or waited for buffers, and listeners with clients waiting.
    fn run_pending(&mut self) {
        if !self.starved.is_empty() && self.pool.can_lend() {
            let mut starved = std::mem::take(&mut self.starved);
            self.ready.append(&mut starved);
            self.starved = starved;
        }
        if !self.ready.is_empty() {
            let mut batch = std::mem::take(&mut self.ready);
            for &(key, gen) in &batch {
                self.drive(key, gen);
            }
            batch.clear();
            // Keep the larger allocation: the list is reused every turn.
            if batch.capacity() > self.ready.capacity() {
                batch.append(&mut self.ready);
                self.ready = batch;
            }
        }
        if self.udp.has_pending_work() {
            self.with_udp(|udp, ctx| udp.run_pending(ctx));
        }
        if self.accept == AcceptState::Open {
            for i in 0..self.listeners.len() {
                if self.listeners[i].readable {
                    self.accept_from(i);
                }
            }
        }
    }
}
