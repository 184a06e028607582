//! The resolver thread: looks the `server NAME:PORT resolve` names of the running config up
//! again, on a reactor of its own, as their TTL (capped by `resolver valid=`) says, and applies
//! each changed set of addresses as a reload of the running config with only that upstream's
//! servers changed. Addresses that appear become servers (with the line's options) and start
//! as at start-up; ones that vanish are retired by the reload, so their pairs run on and new
//! connections go elsewhere. A failed lookup keeps the last good set and is logged once per
//! change of reason.
//!
//! It is a thread rather than a part of worker 0 because applying a change waits for every
//! worker, worker 0 included, to take the new config; the lookups themselves never block
//! (`resolver::Lookups`). It runs only while the config has a `resolve` name.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Control, Handle};
use crate::config::{Config, Resolver};
use crate::resolver::{self, Family, Found, Lookups};

const WAKER: mio::Token = mio::Token(0);
/// The lookups' tokens start here.
const LOOKUPS: usize = 1;
/// The least time between two lookups of a name, whatever its TTL says.
const MIN_RECHECK: Duration = Duration::from_secs(1);
/// How soon a failed lookup is tried again (or after `valid`, if that is sooner).
const RETRY: Duration = Duration::from_secs(5);

/// One name to keep looking up: the servers of `upstream` written as `host:port resolve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Watch {
    pub upstream: String,
    pub host: String,
    pub port: u16,
}

/// Every `resolve` name of `config`, once each.
pub(super) fn watches(config: &Config) -> Vec<Watch> {
    let mut out: Vec<Watch> = Vec::new();
    for u in &config.upstreams {
        for s in &u.servers {
            let Some(host) = &s.resolve else { continue };
            let watch = Watch {
                upstream: u.name.clone(),
                host: host.clone(),
                port: s.addr.port(),
            };
            if !out.contains(&watch) {
                out.push(watch);
            }
        }
    }
    out
}

/// What the servers of `watch` were and become, when `found` differs from them (as a set);
/// `config` then has the new servers. Servers that stay keep their place, new ones follow
/// them, an address that another line of the upstream already has is left to that line, and
/// the servers of a family `found` knows nothing of stay.
pub(super) fn reresolved(
    config: &mut Config,
    watch: &Watch,
    found: &Found,
) -> Option<(Vec<SocketAddr>, Vec<SocketAddr>)> {
    let index = config
        .upstreams
        .iter()
        .position(|u| u.name == watch.upstream)?;
    let upstream = config.upstreams.get(index)?;
    let mine = |s: &crate::config::Server| {
        s.resolve.as_deref() == Some(watch.host.as_str()) && s.addr.port() == watch.port
    };
    let first = upstream.servers.iter().position(mine)?;
    let template = upstream.servers.get(first)?.clone();
    let old: Vec<SocketAddr> = upstream
        .servers
        .iter()
        .filter(|s| mine(s))
        .map(|s| s.addr)
        .collect();
    let others: Vec<SocketAddr> = upstream
        .servers
        .iter()
        .filter(|s| !mine(s))
        .map(|s| s.addr)
        .collect();
    let unknown = old
        .iter()
        .map(|a| a.ip())
        .filter(|ip| Some(Family::of(*ip)) == found.unknown);
    let ips: Vec<IpAddr> = found.addrs.iter().copied().chain(unknown).collect();
    let mut new: Vec<SocketAddr> = Vec::with_capacity(ips.len());
    for ip in ips {
        let addr = SocketAddr::new(ip, watch.port);
        if new.contains(&addr) || others.contains(&addr) {
            continue;
        }
        if let Some(listen) = own_listener(config, index, addr) {
            log::warn!(
                "upstream {}: '{}' resolves to {addr}, which is sluice's own listen address \
                 {listen}; that address is left out (a proxy loop)",
                watch.upstream,
                watch.host
            );
            continue;
        }
        new.push(addr);
    }
    let same = new.len() == old.len() && new.iter().all(|a| old.contains(a));
    if same || new.is_empty() {
        return None;
    }
    let kept: Vec<SocketAddr> = old.iter().filter(|a| new.contains(a)).copied().collect();
    let added = new.iter().filter(|a| !old.contains(a)).copied();
    let ordered: Vec<SocketAddr> = kept.into_iter().chain(added).collect();
    let mut servers = Vec::with_capacity(upstream.servers.len() + ordered.len());
    for (i, s) in upstream.servers.iter().enumerate() {
        if i == first {
            servers.extend(ordered.iter().map(|&addr| crate::config::Server {
                addr,
                ..template.clone()
            }));
        } else if !mine(s) {
            servers.push(s.clone());
        }
    }
    config.upstreams.get_mut(index)?.servers = servers;
    // A listener's default number of tries follows the size of its upstreams.
    config.default_tries();
    Some((old, ordered))
}

/// The listen address of `config` that a connection to `server` from a listener of upstream
/// `index` would come back to, if any (the check the config loader makes, for new addresses).
fn own_listener(config: &Config, index: usize, server: SocketAddr) -> Option<SocketAddr> {
    let uses = |l: &crate::config::Listen| {
        l.upstream.0 == index
            || l.sni_default.map(|u| u.0) == Some(index)
            || l.sni_routes.iter().any(|(_, u)| u.0 == index)
    };
    let protos: Vec<crate::config::Proto> = config
        .listeners
        .iter()
        .filter(|l| uses(l))
        .map(|l| l.proto)
        .collect();
    config
        .listeners
        .iter()
        .filter(|l| protos.contains(&l.proto))
        .find(|l| crate::config::loops_back(l.addr, server))
        .map(|l| l.addr)
}

enum Message {
    /// The names of the running config, after a reload.
    Watch(Vec<Watch>, Resolver),
    Stop,
}

/// The running thread, as the runtime holds it.
pub(super) struct Link {
    commands: mpsc::Sender<Message>,
    waker: Arc<mio::Waker>,
    pub(super) thread: Option<JoinHandle<()>>,
}

impl Link {
    fn send(&self, message: Message) {
        if self.commands.send(message).is_ok() {
            let _ = self.waker.wake();
        }
    }

    pub(super) fn stop(&self) {
        self.send(Message::Stop);
    }
}

/// Makes the resolver thread follow `config`: tells it the names, or starts it when there is
/// none yet and the config has a `resolve` name.
pub(super) fn follow(link: &mut Option<Link>, control: &Arc<Control>, config: &Config) {
    let names = watches(config);
    match link {
        Some(link) => link.send(Message::Watch(names, config.resolver.clone())),
        None if names.is_empty() => {}
        None => match spawn(Arc::downgrade(control), names, config.resolver.clone()) {
            Ok(started) => *link = Some(started),
            Err(e) => log::error!(
                "cannot start the resolver thread: {}; resolve names are not looked up again",
                crate::sys::io_reason(&e)
            ),
        },
    }
}

fn spawn(control: Weak<Control>, names: Vec<Watch>, conf: Resolver) -> io::Result<Link> {
    let poll = mio::Poll::new()?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
    let (commands, inbox) = mpsc::channel();
    let mut thread = Thread {
        poll,
        inbox,
        control,
        lookups: Lookups::new(LOOKUPS),
        watched: Vec::new(),
        asking: resolver::Asking::new(&conf),
        conf: conf.clone(),
    };
    thread.watch(names, conf, Instant::now());
    let handle = std::thread::Builder::new()
        .name("sluice-resolver".to_string())
        .spawn(move || thread.run())?;
    Ok(Link {
        commands,
        waker,
        thread: Some(handle),
    })
}

struct Watched {
    watch: Watch,
    due: Instant,
    /// The key of its lookup in flight.
    lookup: Option<usize>,
    /// The names still to try if this lookup fails (search domains), the next one last.
    candidates: Vec<String>,
    /// Why the last lookup failed, as logged (so the same reason is not logged again).
    failing: Option<String>,
}

struct Thread {
    poll: mio::Poll,
    inbox: mpsc::Receiver<Message>,
    control: Weak<Control>,
    lookups: Lookups,
    watched: Vec<Watched>,
    /// The nameservers asked and the search list, read when the names were last given.
    asking: resolver::Asking,
    conf: Resolver,
}

impl Thread {
    fn run(mut self) {
        let mut events = mio::Events::with_capacity(64);
        loop {
            let now = Instant::now();
            self.start_due(now);
            let next = self
                .watched
                .iter()
                .filter(|w| w.lookup.is_none())
                .map(|w| w.due)
                .chain(self.lookups.next_deadline())
                .min();
            let wait = next.map(|at| at.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut events, wait) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("resolver thread: {}; it stops", crate::sys::io_reason(&e));
                    return self.lookups.clear(self.poll.registry());
                }
            }
            let now = Instant::now();
            for event in events.iter() {
                if event.token() == WAKER {
                    continue;
                }
                self.lookups.ready(self.poll.registry(), event.token(), now);
            }
            loop {
                match self.inbox.try_recv() {
                    Ok(Message::Watch(names, conf)) => self.watch(names, conf, now),
                    Err(mpsc::TryRecvError::Empty) => break,
                    // Told to stop, or the runtime is gone: nothing is left to change.
                    Ok(Message::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                        return self.lookups.clear(self.poll.registry());
                    }
                }
            }
            self.lookups.expire(self.poll.registry(), now);
            while let Some(done) = self.lookups.take_finished() {
                if self.finished(done, Instant::now()).is_err() {
                    return self.lookups.clear(self.poll.registry());
                }
            }
        }
    }

    /// Takes the names of a new config: those it had keep their schedule (unless the resolver
    /// settings changed: then every lookup starts again now), new ones are due now.
    fn watch(&mut self, names: Vec<Watch>, conf: Resolver, now: Instant) {
        let asking = resolver::Asking::new(&conf);
        let changed = conf != self.conf || asking != self.asking;
        if changed {
            self.lookups.clear(self.poll.registry());
        }
        self.asking = asking;
        self.conf = conf;
        let mut old = std::mem::take(&mut self.watched);
        for watch in names {
            let entry = match old.iter().position(|w| w.watch == watch) {
                Some(i) if !changed => old.swap_remove(i),
                Some(i) => Watched {
                    due: now,
                    lookup: None,
                    ..old.swap_remove(i)
                },
                None => Watched {
                    watch,
                    due: now,
                    lookup: None,
                    failing: None,
                    candidates: Vec::new(),
                },
            };
            self.watched.push(entry);
        }
        // Lookups of names that went away end on their own; their answers find no one.
    }

    fn start_due(&mut self, now: Instant) {
        for i in 0..self.watched.len() {
            let w = &self.watched[i];
            if w.lookup.is_some() || w.due > now {
                continue;
            }
            let local = resolver::from_hosts(&w.watch.host);
            if !local.is_empty() {
                let ttl = u32::try_from(self.conf.valid.as_secs()).unwrap_or(u32::MAX);
                let found = Found {
                    addrs: local,
                    ttl,
                    unknown: None,
                };
                if self.settle(i, Ok(found), now).is_err() {
                    // The runtime is gone; `run` ends at its next message check.
                    return;
                }
                continue;
            }
            // The names to try, last first (`pop` takes the next).
            let mut candidates = self.asking.candidates(&w.watch.host);
            candidates.reverse();
            self.watched[i].candidates = candidates;
            self.next_candidate(i, now);
        }
    }

    /// Starts the lookup of the next name to try for name `i`; false when none is left.
    fn next_candidate(&mut self, i: usize, now: Instant) -> bool {
        let Some(name) = self.watched[i].candidates.pop() else {
            return false;
        };
        let key = self
            .lookups
            .start(self.poll.registry(), &name, &self.asking.servers, now);
        self.watched[i].lookup = Some(key);
        true
    }

    /// `Err` when the runtime is gone.
    fn finished(&mut self, done: resolver::lookup::Finished, now: Instant) -> Result<(), Gone> {
        let control = self.control.upgrade().ok_or(Gone)?;
        let ignored = u64::from(done.ignored);
        control
            .stats
            .resolver_ignored
            .fetch_add(ignored, Ordering::Relaxed);
        drop(control);
        let Some(i) = self.watched.iter().position(|w| w.lookup == Some(done.key)) else {
            return Ok(());
        };
        self.watched[i].lookup = None;
        if done.result.is_err() && self.next_candidate(i, now) {
            return Ok(());
        }
        self.settle(i, done.result, now)
    }

    /// What a lookup of name `i` found: applied, logged and counted; its next one scheduled.
    fn settle(
        &mut self,
        i: usize,
        result: Result<Found, String>,
        now: Instant,
    ) -> Result<(), Gone> {
        let control = self.control.upgrade().ok_or(Gone)?;
        let stats = Arc::clone(&control.stats);
        let valid = self.conf.valid.max(MIN_RECHECK);
        let w = &mut self.watched[i];
        match result {
            Ok(found) => {
                stats.resolver_lookups.fetch_add(1, Ordering::Relaxed);
                if w.failing.take().is_some() {
                    log::info!(
                        "'{}' of upstream {} resolves again",
                        w.watch.host,
                        w.watch.upstream
                    );
                }
                let ttl = Duration::from_secs(u64::from(found.ttl));
                w.due = now + ttl.clamp(MIN_RECHECK, valid);
                let handle = Handle { control };
                if handle.apply_resolved(&w.watch, &found) {
                    stats.resolver_changes.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(why) => {
                stats.resolver_failures.fetch_add(1, Ordering::Relaxed);
                if w.failing.as_deref() != Some(why.as_str()) {
                    log::warn!(
                        "cannot look up '{}' of upstream {} again: {}; its last addresses stay",
                        w.watch.host,
                        w.watch.upstream,
                        why
                    );
                    w.failing = Some(why);
                }
                w.due = now + RETRY.min(valid);
            }
        }
        Ok(())
    }
}

/// The runtime the thread served has gone: the thread ends.
struct Gone;

/// Addresses for a log line: "a, b, c".
pub(super) fn list(addrs: &[SocketAddr]) -> String {
    let names: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = "upstream u {\n  server 127.0.0.9:80;\n  server 127.0.0.1:80 resolve;\n  \
                    server 127.0.0.1:81;\n}\nlisten 127.0.0.1:0 { proxy u; }\n";
        // `resolve` needs a name; the parse sees an address, so mark the server by hand.
        let mut config = Config::parse(&text.replace(" resolve", ""), "t.conf").expect("config");
        config.upstreams[0].servers[1].resolve = Some("db.test".to_string());
        config.upstreams[0].servers[1].weight = 7;
        config
    }

    fn watch() -> Watch {
        Watch {
            upstream: "u".to_string(),
            host: "db.test".to_string(),
            port: 80,
        }
    }

    fn addrs(config: &Config) -> Vec<String> {
        config.upstreams[0]
            .servers
            .iter()
            .map(|s| format!("{}/{}", s.addr, s.weight))
            .collect()
    }

    #[test]
    fn the_watched_names_are_the_resolve_servers() {
        assert_eq!(watches(&config()), [watch()]);
    }

    #[test]
    fn a_new_set_replaces_the_servers_of_its_line_only() {
        let mut c = config();
        let ips = found(&["127.0.0.2", "127.0.0.1", "127.0.0.9", "127.0.0.1"], None);
        let (old, new) = reresolved(&mut c, &watch(), &ips).expect("a change");
        assert_eq!(list(&old), "127.0.0.1:80");
        // .9 belongs to another line; .1 stays first; the options are the line's.
        assert_eq!(list(&new), "127.0.0.1:80, 127.0.0.2:80");
        assert_eq!(
            addrs(&c),
            [
                "127.0.0.9:80/1",
                "127.0.0.1:80/7",
                "127.0.0.2:80/7",
                "127.0.0.1:81/1"
            ]
        );
        assert!(c.upstreams[0].servers[2].resolve.is_some());
        // The same set in another order is no change; nor is an empty one.
        let again = found(&["127.0.0.2", "127.0.0.1"], None);
        assert_eq!(reresolved(&mut c, &watch(), &again), None);
        assert_eq!(reresolved(&mut c, &watch(), &found(&[], None)), None);
        let moved = found(&["127.0.0.3"], None);
        reresolved(&mut c, &watch(), &moved).expect("a change");
        assert_eq!(
            addrs(&c),
            ["127.0.0.9:80/1", "127.0.0.3:80/7", "127.0.0.1:81/1"]
        );
    }

    #[test]
    fn a_family_whose_query_failed_keeps_its_servers() {
        let mut c = config();
        reresolved(&mut c, &watch(), &found(&["127.0.0.3", "::1"], None)).expect("a change");
        // AAAA failed: ::1 stays while A moves on.
        let half = found(&["127.0.0.4"], Some(Family::V6));
        let (_, new) = reresolved(&mut c, &watch(), &half).expect("a change");
        assert_eq!(list(&new), "[::1]:80, 127.0.0.4:80");
        let none_v4 = found(&["::1"], Some(Family::V4));
        assert_eq!(
            reresolved(&mut c, &watch(), &none_v4),
            None,
            "A failed: .4 stays"
        );
    }

    #[test]
    fn tries_follow_the_server_count_and_own_addresses_are_left_out() {
        let text = "upstream u {\n  server 127.0.0.1:80;\n}\nlisten 127.0.0.1:0 { proxy u; }\n\
                    listen 127.0.0.5:80 { proxy u; next_upstream_tries 2; }\n";
        let mut c = Config::parse(text, "t.conf").expect("config");
        c.upstreams[0].servers[0].resolve = Some("db.test".to_string());
        let tries = |c: &Config| -> Vec<u32> {
            c.listeners.iter().map(|l| l.next_upstream_tries).collect()
        };
        assert_eq!(tries(&c), [1, 2]);
        let three = found(&["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.5"], None);
        let (_, new) = reresolved(&mut c, &watch(), &three).expect("a change");
        // 127.0.0.5:80 is the second listener: a connection there would come back to sluice.
        assert_eq!(list(&new), "127.0.0.1:80, 127.0.0.2:80, 127.0.0.3:80");
        assert_eq!(tries(&c), [3, 2], "the written value stays");
        reresolved(&mut c, &watch(), &found(&["127.0.0.2"], None)).expect("a change");
        assert_eq!(tries(&c), [1, 2]);
    }

    fn found(ips: &[&str], unknown: Option<Family>) -> Found {
        Found {
            addrs: ips.iter().map(|s| s.parse().expect("ip")).collect(),
            ttl: 5,
            unknown,
        }
    }
}
