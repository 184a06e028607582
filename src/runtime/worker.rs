//! One reactor thread: a `mio::Poll`, the timer wheel, the upstream groups, and the parts that
//! own sockets (the TCP proxy, the UDP proxy, the health probes).
//!
//! The worker only dispatches: each event goes to the part its token names, each timer to the
//! part its entry names, and the parts get what they share through a [`Ctx`]. Invariants: the
//! loop never blocks except in `poll`, whose timeout is 0 while some part has pending work (a
//! pair that yielded, a listener with clients waiting) and otherwise the time to the next timer,
//! so an idle proxy sleeps. A reload arrives as a command and is applied after the events of the
//! turn that brought it, so no event of that batch can reach a slot the reload reassigned.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Waker};

use super::listeners::Socket;
use super::{Command, RuntimeError, Stats};
use crate::admin::AdminPart;
use crate::config::Cidr;
use crate::config::Config;
use crate::health::Prober;
use crate::limit::PerIp;
use crate::metrics::Tables;
use crate::part::{BindError, Ctx, Origin};
use crate::reactor::timer::TimerWheel;
use crate::reactor::token::{self, Target};
use crate::reactor::{after, End, Timer};
use crate::tcp::proxy::TcpProxy;
use crate::udp::UdpProxy;
use crate::upstream::{self, Group};
use mio::net::TcpListener;

/// Where the worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Listening sockets closed; open pairs finish until `until`.
    Draining {
        until: Instant,
    },
    /// Close what is left and exit.
    Stopping,
}

/// A config for one worker to take on: the first one, or a reload.
pub struct Reload {
    pub config: Config,
    /// The shared state of its listeners, servers and upstreams.
    pub tables: Arc<Tables>,
    /// By `ListenerId` of `config`; a listener this worker has that is not among them closes.
    pub origins: Vec<Arc<Origin>>,
    /// This worker's sockets of the listeners that are new.
    pub fresh: Vec<(Arc<Origin>, Socket)>,
    /// Told once the worker has applied it.
    pub done: Option<mpsc::Sender<()>>,
}

/// The parts of a worker and what they share, lent for one call.
struct Parts<'a> {
    tcp: &'a mut TcpProxy,
    udp: &'a mut UdpProxy,
    probes: &'a mut Prober,
    /// Worker 0's, when the config has `admin`.
    admin: Option<&'a mut AdminPart>,
    ctx: Ctx<'a>,
}

pub struct Worker {
    poll: Poll,
    events: Option<Events>,
    waker: Arc<Waker>,
    inbox: mpsc::Receiver<Command>,
    config: Config,
    stats: Arc<Stats>,
    tcp: TcpProxy,
    udp: UdpProxy,
    probes: Prober,
    admin: Option<AdminPart>,
    /// Per-client counts and rates of this worker's listeners.
    per_ip: PerIp,
    /// Reloads that arrived this turn, applied once its events are handled.
    reloads: Vec<Reload>,
    /// This worker's number; worker 0 also runs the health probes.
    index: usize,
    /// By `UpstreamId`.
    groups: Vec<Group>,
    timers: TimerWheel<Timer>,
    now: Instant,
    phase: Phase,
    /// When the last poll returned events; `busy_poll` counts from here.
    last_event: Instant,
}

impl Worker {
    /// Worker number `index`, running `first` (its listeners already bound).
    pub fn new(
        first: Reload,
        stats: Arc<Stats>,
        inbox: mpsc::Receiver<Command>,
        index: usize,
        admin: Option<(TcpListener, Vec<Cidr>)>,
    ) -> Result<Worker, RuntimeError> {
        let io_err = |what| move |error| RuntimeError::Io { what, error };
        let poll = Poll::new().map_err(io_err("cannot create the poller"))?;
        let waker = Waker::new(poll.registry(), token::waker())
            .map_err(io_err("cannot create the waker"))?;
        let tcp = TcpProxy::new(
            &first.config,
            Arc::clone(&stats.pool),
            Arc::clone(&stats.pipes),
            Arc::clone(&stats.spares),
            index,
        );
        let now = Instant::now();
        let admin = match admin {
            Some((listener, allow)) => Some(
                AdminPart::new(listener, allow, now, poll.registry())
                    .map_err(io_err("cannot serve the admin endpoint"))?,
            ),
            None => None,
        };
        let mut worker = Worker {
            poll,
            events: Some(Events::with_capacity(1024)),
            waker: Arc::new(waker),
            inbox,
            groups: Vec::new(),
            config: first.config.clone(),
            stats,
            tcp,
            udp: UdpProxy::new(),
            probes: Prober::default(),
            admin,
            per_ip: PerIp::new(first.config.per_ip_table_size),
            reloads: Vec::new(),
            index,
            timers: TimerWheel::new(now),
            now,
            phase: Phase::Running,
            last_event: now,
        };
        // A listener this worker cannot register would leave it deaf on that address: at start
        // that fails the start.
        match worker.apply(first).into_iter().next() {
            Some(e) => Err(RuntimeError::Bind(e)),
            None => Ok(worker),
        }
    }

    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    pub fn run(mut self) -> Result<(), RuntimeError> {
        while self.phase != Phase::Stopping {
            self.turn()?;
            if let Phase::Draining { until } = self.phase {
                if self.tcp.open_pairs() == 0 || self.now >= until {
                    self.phase = Phase::Stopping;
                }
            }
        }
        let Parts {
            tcp,
            udp,
            admin,
            mut ctx,
            ..
        } = self.split();
        let left = tcp.open_pairs();
        tcp.close_all(End::Shutdown, &mut ctx);
        udp.close_all(End::Shutdown, &mut ctx);
        if let Some(admin) = admin {
            admin.close_all(&mut ctx);
        }
        if left > 0 {
            log::info!("stopped; {} connections closed unfinished", left);
        } else {
            log::info!("stopped");
        }
        Ok(())
    }

    /// One loop turn: wait, handle events, fire timers, finish pending work.
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
        for reload in std::mem::take(&mut self.reloads) {
            // Logged where it failed; the listener is missing in this worker only.
            let _ = self.apply(reload);
        }
        self.expire_timers();
        self.run_pending();
        Ok(())
    }

    /// Takes on a config: new groups that carry over what stays, the listeners it keeps, opens
    /// and closes, and (on worker 0) probes started afresh from the verdicts carried over. Pairs
    /// and sessions in flight keep their settings and their server.
    fn apply(&mut self, reload: Reload) -> Vec<BindError> {
        let Reload {
            config,
            tables,
            origins,
            fresh,
            done,
        } = reload;
        let mut failed = Vec::new();
        if self.phase == Phase::Running {
            let old = std::mem::take(&mut self.groups);
            let (groups, remap) = upstream::rebuild(old, &config.upstreams, &tables);
            self.groups = groups;
            self.per_ip.set_capacity(config.per_ip_table_size);
            let config_for_admin = match self.admin {
                Some(_) => config.clone(),
                None => Config::default(),
            };
            self.config = config;
            let (mut tcp_fresh, mut udp_fresh) = (Vec::new(), Vec::new());
            for (origin, socket) in fresh {
                match socket {
                    Socket::Tcp(s) => tcp_fresh.push((origin, s)),
                    Socket::Udp(s) => udp_fresh.push((origin, s)),
                }
            }
            let max_connections = self.config.max_connections;
            let probing = self.index == 0;
            let Parts {
                tcp,
                udp,
                admin,
                mut ctx,
                ..
            } = self.split();
            failed = tcp.reload(&origins, tcp_fresh, max_connections, &remap, &mut ctx);
            failed.extend(udp.reload(&origins, udp_fresh, &remap, &mut ctx));
            if let Some(admin) = admin {
                admin.reload(&config_for_admin, &origins);
            }
            if probing {
                // One worker probes; the verdicts reach the others through the shared state.
                let upstreams = std::mem::take(&mut self.config.upstreams);
                let listeners = std::mem::take(&mut self.config.listeners);
                let Parts {
                    probes, mut ctx, ..
                } = self.split();
                probes.reload(&upstreams, &listeners, &mut ctx);
                self.config.upstreams = upstreams;
                self.config.listeners = listeners;
            }
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
        failed
    }

    /// Polls for events: at once while work is pending; else, with `busy_poll` set and an event
    /// seen within it, without sleeping until the window closes (waking a sleeping CPU costs
    /// tens of microseconds on some machines: the `pingpong` bench scenario); then asleep until
    /// the next timer.
    fn wait(&mut self, events: &mut Events) -> io::Result<()> {
        let admin_waits = self.admin.as_ref().is_some_and(AdminPart::has_pending_work);
        if self.tcp.has_pending_work() || self.udp.has_pending_work() || admin_waits {
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

    /// The parts, each with the context they share, lent for one call.
    fn split(&mut self) -> Parts<'_> {
        let ctx = Ctx {
            registry: self.poll.registry(),
            timers: &mut self.timers,
            upstreams: &mut self.groups,
            metrics: &self.stats,
            now: self.now,
            access_log: self.config.access_log,
            per_ip: &mut self.per_ip,
        };
        Parts {
            tcp: &mut self.tcp,
            udp: &mut self.udp,
            probes: &mut self.probes,
            admin: self.admin.as_mut(),
            ctx,
        }
    }

    fn dispatch(&mut self, event: &mio::event::Event) {
        let target = token::decode(event.token());
        if target == Target::Waker {
            self.read_inbox();
            return;
        }
        let Parts {
            tcp,
            udp,
            probes,
            admin,
            mut ctx,
        } = self.split();
        match target {
            Target::Listener(slot) => tcp.listener_ready(slot, &mut ctx),
            Target::Pair(key, half) => tcp.socket_ready(key, half, event, &mut ctx),
            Target::Spare(key) => tcp.spare_ready(key, event, &mut ctx),
            Target::UdpListener(slot) => udp.listener_ready(slot, &mut ctx),
            Target::UdpSession(key) => udp.session_ready(key, event, &mut ctx),
            Target::Probe(key) => probes.ready(key, event, &mut ctx),
            Target::AdminListener => {
                if let Some(admin) = admin {
                    admin.listener_ready(&mut ctx);
                }
            }
            Target::Admin(key) => {
                if let Some(admin) = admin {
                    admin.conn_ready(key, event, &mut ctx);
                }
            }
            Target::Waker | Target::Unknown => {}
        }
    }

    fn read_inbox(&mut self) {
        while let Ok(command) = self.inbox.try_recv() {
            match command {
                Command::Stop => self.phase = Phase::Stopping,
                Command::Drain(timeout) if self.phase == Phase::Running => self.drain(timeout),
                Command::Drain(_) => {}
                Command::Reload(reload) => self.reloads.push(*reload),
            }
        }
    }

    /// Closes the listening sockets and lets open pairs run until `timeout` has passed.
    fn drain(&mut self, timeout: Duration) {
        let until = after(self.now, timeout);
        self.phase = Phase::Draining { until };
        self.timers.insert(until, Timer::DrainDeadline);
        let Parts {
            tcp,
            udp,
            admin,
            mut ctx,
            ..
        } = self.split();
        tcp.stop_listening(&mut ctx);
        udp.shut(&mut ctx);
        // Its port too is free for the next instance at once.
        if let Some(admin) = admin {
            admin.close_all(&mut ctx);
        }
        let limit = match timeout.as_millis() {
            ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
            ms => format!("{ms}ms"),
        };
        log::info!("draining {} connections (up to {limit})", tcp.open_pairs());
    }

    fn expire_timers(&mut self) {
        let now = self.now;
        while let Some(timer) = self.timers.expire(now) {
            let Parts {
                tcp,
                udp,
                probes,
                admin,
                mut ctx,
            } = self.split();
            match timer {
                Timer::Pair(key) => tcp.timer(key, &mut ctx),
                Timer::Throttle(key) => tcp.throttle_over(key, &mut ctx),
                Timer::Session(key) => udp.timer(key, &mut ctx),
                Timer::Probe(key) => probes.timer(key, &mut ctx),
                Timer::Admin(key) => {
                    if let Some(admin) = admin {
                        admin.timer(key, &mut ctx);
                    }
                }
                Timer::AdminAccept => {
                    if let Some(admin) = admin {
                        admin.accept_retry(&mut ctx);
                    }
                }
                Timer::AcceptResume => tcp.accept_resume(),
                Timer::Spares => tcp.refill_spares(&mut ctx),
                // The loop sees the deadline once this turn ends.
                Timer::DrainDeadline => {}
            }
        }
    }

    /// Drives what a budget cut short: pairs that yielded or waited for buffers, listeners with
    /// clients waiting, sessions with datagrams left.
    fn run_pending(&mut self) {
        let Parts {
            tcp,
            udp,
            admin,
            mut ctx,
            ..
        } = self.split();
        if let Some(admin) = admin {
            admin.run_pending(&mut ctx);
        }
        tcp.run_pending(&mut ctx);
        if udp.has_pending_work() {
            udp.run_pending(&mut ctx);
        }
        // Last: the replies this turn's events gathered leave together.
        udp.flush(&mut ctx);
    }
}
