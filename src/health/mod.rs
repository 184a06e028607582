//! Active health checks: one probe per server of every upstream with a `health_check`.
//!
//! A probe is a non-blocking TCP connect registered in the worker's poll, optionally followed by
//! writing `send` and reading a reply that must start with `expect`. Every wait (the interval
//! and the probe's own timeout) is a timer-wheel entry, so probes cost no thread and never block
//! the loop. [`Verdict`] turns results into up/down with `rise`/`fall` hysteresis and is plain
//! data, tested without sockets. Invariants: a probe holds a socket only while a check is under
//! way; each check bumps the probe's generation, so a timer or event for an earlier check is
//! recognised and ignored.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mio::net::TcpStream;
use slab::Slab;

use crate::config::{HealthCheck, Listen, ProxyVersion, ServerId, Upstream, UpstreamId};
use crate::part::Ctx;
use crate::proxy_protocol as pp;
use crate::reactor::timer::TimerKey;
use crate::reactor::token::{self, Gen, Key};
use crate::reactor::{after, retry, Readiness, Timer};
use crate::tcp::connect::{self, Outcome as Connect};

/// Consecutive results → up/down, with `rise` and `fall` thresholds. Servers start up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    up: bool,
    /// Consecutive results that disagree with `up`.
    streak: u32,
}

impl Default for Verdict {
    fn default() -> Self {
        Verdict {
            up: true,
            streak: 0,
        }
    }
}

impl Verdict {
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one check; returns the new state when this result flipped it.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { rise } else { fall };
        if self.streak >= needed.max(1) {
            self.up = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

/// Where one check is.
enum Phase {
    /// Waiting for the next interval.
    Idle,
    Connecting,
    /// Connected; `sent` bytes of `send` are written.
    Sending {
        sent: usize,
    },
    /// `matched` bytes of `expect` have arrived and agree.
    Expecting {
        matched: usize,
    },
}

struct Probe {
    /// The upstream's name: a reload keeps the probe of the same upstream, server and check.
    name: String,
    upstream: UpstreamId,
    server: ServerId,
    addr: SocketAddr,
    check: HealthCheck,
    /// What a check sends: a PROXY header first when the server expects one (v2 `LOCAL` or v1
    /// `UNKNOWN`, so its parser takes the probe for what it is), then the check's `send`.
    payload: Vec<u8>,
    gen: Gen,
    phase: Phase,
    socket: Option<TcpStream>,
    ready: Readiness,
    started: Instant,
    timer: Option<TimerKey>,
    verdict: Verdict,
}

/// A probe the config asks for.
struct Wanted<'a> {
    upstream: UpstreamId,
    server: ServerId,
    name: &'a str,
    addr: SocketAddr,
    check: &'a HealthCheck,
    payload: Vec<u8>,
}

/// All probes of a worker.
#[derive(Default)]
pub struct Prober {
    probes: Slab<Probe>,
}

/// How a check ended.
type Outcome = Result<(), String>;

impl Prober {
    /// Takes on a config (the first, or a reloaded one): a probe per server (except `down`
    /// ones) of every upstream with a `health_check`. A probe of the same server (upstream name
    /// and address) with the same check goes on as it was (its streak and schedule too, so
    /// frequent reloads never keep a failing server from being found down); others stop; new
    /// ones start at once, from the server's verdict in its group (carried over: a server that
    /// was down needs `rise` passed checks to be up).
    pub(crate) fn reload(
        &mut self,
        upstreams: &[Upstream],
        listeners: &[Listen],
        ctx: &mut Ctx<'_>,
    ) {
        let mut wanted: Vec<Wanted<'_>> = Vec::new();
        for (group, up) in upstreams.iter().enumerate() {
            let Some(check) = &up.health_check else {
                continue;
            };
            // A listener that sends PROXY headers to this upstream makes its servers expect one.
            // Probes are TCP: only TCP listeners' headers count.
            let by_listener = listeners
                .iter()
                .filter(|l| l.upstream == UpstreamId(group) && l.proto == crate::config::Proto::Tcp)
                .find_map(|l| l.proxy_protocol);
            for (server, conf) in up.servers.iter().enumerate().filter(|(_, s)| !s.down) {
                let mut payload = match conf.proxy_protocol.unwrap_or(by_listener) {
                    Some(ProxyVersion::V1) => pp::encode_v1_unknown(),
                    Some(ProxyVersion::V2) => {
                        pp::encode_v2(pp::Command::Local, pp::Transport::Unspecified, None, &[])
                    }
                    None => Vec::new(),
                };
                payload.extend_from_slice(&check.send);
                wanted.push(Wanted {
                    upstream: UpstreamId(group),
                    server: ServerId(server),
                    name: &up.name,
                    addr: conf.addr,
                    check,
                    payload,
                });
            }
        }
        let mut gone = Vec::new();
        for (key, p) in self.probes.iter_mut() {
            let same = wanted.iter().position(|w| {
                w.name == p.name
                    && w.addr == p.addr
                    && *w.check == p.check
                    && w.payload == p.payload
            });
            match same {
                Some(i) => {
                    let w = wanted.swap_remove(i);
                    (p.upstream, p.server) = (w.upstream, w.server);
                }
                None => gone.push(key),
            }
        }
        for key in gone {
            let mut p = self.probes.remove(key);
            if let Some(mut socket) = p.socket.take() {
                let _ = ctx.registry.deregister(&mut socket);
            }
            if let Some(timer) = p.timer.take() {
                ctx.timers.cancel(timer);
            }
        }
        for Wanted {
            upstream,
            server,
            name,
            addr,
            check,
            payload,
        } in wanted
        {
            let healthy = ctx
                .upstreams
                .get(upstream.0)
                .and_then(|g| g.server(server))
                .map_or(true, |s| s.shared.healthy.load(Ordering::Relaxed));
            let key = self.probes.insert(Probe {
                name: name.to_string(),
                upstream,
                server,
                addr,
                check: check.clone(),
                payload,
                gen: 0,
                phase: Phase::Idle,
                socket: None,
                ready: Readiness::default(),
                started: ctx.now,
                timer: None,
                verdict: Verdict {
                    up: healthy,
                    streak: 0,
                },
            });
            self.begin(key, ctx);
        }
    }

    pub fn len(&self) -> usize {
        self.probes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// A timer for probe `key` fired: start the next check, or fail the one that timed out.
    pub(crate) fn timer(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(p) = self.probes.get_mut(key.index).filter(|p| p.gen == key.gen) else {
            return;
        };
        p.timer = None;
        match p.phase {
            Phase::Idle => self.begin(key.index, ctx),
            _ => self.finish(key.index, Err("timed out".into()), ctx),
        }
    }

    /// The probe's socket reported readiness.
    pub(crate) fn ready(&mut self, key: Key, event: &mio::event::Event, ctx: &mut Ctx<'_>) {
        let Some(p) = self.probes.get_mut(key.index).filter(|p| p.gen == key.gen) else {
            return;
        };
        p.ready.absorb(event);
        let key = key.index;
        let outcome = match p.advance() {
            Ok(None) => return,
            Ok(Some(())) => Ok(()),
            Err(cause) => Err(cause),
        };
        self.finish(key, outcome, ctx);
    }

    /// Opens the connection of a new check and arms its timeout.
    fn begin(&mut self, key: usize, ctx: &mut Ctx<'_>) {
        let Some(p) = self.probes.get_mut(key) else {
            return;
        };
        p.gen = token::next_gen(p.gen);
        p.started = ctx.now;
        p.ready = Readiness::default();
        let id = Key::new(key, p.gen);
        match connect::start(ctx.registry, p.addr, token::probe(id)) {
            Ok(socket) => {
                p.socket = Some(socket);
                p.phase = Phase::Connecting;
                let timer = Timer::Probe(id);
                p.timer = Some(ctx.timers.insert(after(ctx.now, p.check.timeout), timer));
            }
            Err(e) => {
                let cause = format!("connect: {}", crate::sys::io_reason(&e));
                self.finish(key, Err(cause), ctx);
            }
        }
    }

    /// Closes the check, updates the verdict (telling the group on a flip) and waits for the
    /// next interval.
    fn finish(&mut self, key: usize, outcome: Outcome, ctx: &mut Ctx<'_>) {
        let Some(p) = self.probes.get_mut(key) else {
            return;
        };
        if let Some(mut socket) = p.socket.take() {
            let _ = ctx.registry.deregister(&mut socket);
        }
        if let Some(timer) = p.timer.take() {
            ctx.timers.cancel(timer);
        }
        let flip = p
            .verdict
            .record(outcome.is_ok(), p.check.rise, p.check.fall);
        if let (Some(up), Some(group)) = (flip, ctx.upstreams.get_mut(p.upstream.0)) {
            group.set_health(p.server, up);
            match &outcome {
                Err(cause) => log::warn!(
                    "upstream {}: server {} is down: {} consecutive failed checks, last: {}",
                    group.name,
                    p.addr,
                    p.check.fall,
                    cause
                ),
                Ok(()) => log::info!(
                    "upstream {}: server {} is up: {} consecutive checks passed",
                    group.name,
                    p.addr,
                    p.check.rise
                ),
            }
        } else if let Err(cause) = &outcome {
            log::debug!("health check of {} failed: {}", p.addr, cause);
        }
        p.phase = Phase::Idle;
        p.gen = token::next_gen(p.gen);
        // Checks start `interval` apart, however long each took.
        let next = after(p.started, p.check.interval).max(ctx.now);
        p.timer = Some(ctx.timers.insert(next, Timer::Probe(Key::new(key, p.gen))));
    }
}

impl Probe {
    /// Moves the check on as far as the socket allows: `Ok(Some(()))` passed, `Ok(None)` wait.
    fn advance(&mut self) -> Result<Option<()>, String> {
        let Some(socket) = self.socket.as_mut() else {
            return Ok(None);
        };
        loop {
            match self.phase {
                Phase::Idle => return Ok(None),
                Phase::Connecting => match connect::outcome(socket, &self.ready) {
                    Connect::Connected => self.phase = Phase::Sending { sent: 0 },
                    Connect::Pending => return Ok(None),
                    Connect::Failed(e) => {
                        return Err(format!("connect: {}", crate::sys::io_reason(&e)))
                    }
                },
                Phase::Sending { sent } => {
                    let rest = self.payload.get(sent..).unwrap_or_default();
                    if rest.is_empty() {
                        if self.check.expect.is_empty() {
                            return Ok(Some(()));
                        }
                        self.phase = Phase::Expecting { matched: 0 };
                        continue;
                    }
                    match retry(|| socket.write(rest)) {
                        Ok(Some(0)) => return Err("send: connection closed".into()),
                        Ok(Some(n)) => self.phase = Phase::Sending { sent: sent + n },
                        Ok(None) => return Ok(None),
                        Err(e) => return Err(format!("send: {}", crate::sys::io_reason(&e))),
                    }
                }
                Phase::Expecting { matched } => {
                    let mut chunk = [0u8; 256];
                    let want = self
                        .check
                        .expect
                        .len()
                        .saturating_sub(matched)
                        .min(chunk.len());
                    match retry(|| socket.read(&mut chunk[..want])) {
                        Ok(Some(0)) => return Err("closed before the expected reply".into()),
                        Ok(Some(n)) => {
                            let expected = self
                                .check
                                .expect
                                .get(matched..matched + n)
                                .unwrap_or_default();
                            if chunk.get(..n) != Some(expected) {
                                return Err("unexpected reply".into());
                            }
                            if matched + n == self.check.expect.len() {
                                return Ok(Some(()));
                            }
                            self.phase = Phase::Expecting {
                                matched: matched + n,
                            };
                        }
                        Ok(None) => return Ok(None),
                        Err(e) => return Err(format!("reply: {}", crate::sys::io_reason(&e))),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_then_rise() {
        let mut v = Verdict::default();
        assert!(v.is_up());
        assert_eq!(v.record(false, 2, 3), None);
        assert_eq!(v.record(false, 2, 3), None);
        assert_eq!(v.record(false, 2, 3), Some(false));
        assert!(!v.is_up());
        assert_eq!(v.record(false, 2, 3), None);
        assert_eq!(v.record(true, 2, 3), None);
        assert_eq!(v.record(true, 2, 3), Some(true));
        assert!(v.is_up());
    }

    #[test]
    fn a_success_resets_the_fall_streak() {
        let mut v = Verdict::default();
        for _ in 0..10 {
            assert_eq!(v.record(false, 1, 3), None);
            assert_eq!(v.record(false, 1, 3), None);
            assert_eq!(v.record(true, 1, 3), None);
        }
        assert!(v.is_up());
    }

    #[test]
    fn thresholds_of_one_flip_at_once() {
        let mut v = Verdict::default();
        assert_eq!(v.record(false, 1, 1), Some(false));
        assert_eq!(v.record(true, 1, 1), Some(true));
        // A zero threshold behaves like one, never like "flip without a result".
        assert_eq!(v.record(false, 0, 0), Some(false));
    }
}
