//! Lookups in flight. A lookup of one name is two queries, A and AAAA, each a small state
//! machine over a socket of its own: `Udp`, then `Tcp` when the answer came back truncated.
//! A query moves on to the next nameserver on a timeout, a refused port or a server error,
//! and gives up after two rounds over all of them.
//!
//! Each query binds a socket to a port the kernel picks at random, connects it to the
//! nameserver and sends a random id, so a reply counts only if it comes from the server
//! asked, to the port asked from, with the id and the question asked; anything else is
//! ignored and the query keeps waiting. Non-blocking on the caller's `mio::Poll`: the config
//! loader runs one lookup to its end, the runtime's resolver thread keeps many in flight.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::message::{self, QType, Refused};

/// How long one nameserver gets to answer one query.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Rounds over the nameservers before a query gives up.
const ROUNDS: usize = 2;
/// A reply over UDP without EDNS is at most 512 bytes; room for a server that sends more.
const UDP_REPLY_MAX: usize = 4096;
/// Replies that answer nothing asked, in one read of a socket, before the server is left for
/// the next: a flood must not hold the thread.
const MAX_IGNORED: u32 = 64;

/// What a lookup found: the addresses (A first, then AAAA) and the least TTL among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub addrs: Vec<IpAddr>,
    pub ttl: u32,
    /// The family whose query failed while the other's found addresses: what was known of it
    /// before still holds (some servers refuse AAAA questions they cannot forward).
    pub unknown: Option<Family>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Why a query is still waiting for its socket, and on what.
enum Wire {
    Udp(UdpSocket),
    /// The answer over UDP was truncated: the same question over TCP, length-prefixed.
    Tcp {
        stream: TcpStream,
        out: Vec<u8>,
        sent: usize,
        got: Vec<u8>,
    },
}

enum State {
    Asking {
        wire: Wire,
        id: u16,
        deadline: Instant,
    },
    Answered(Vec<IpAddr>, u32),
    /// Every nameserver was tried; the last reason.
    Failed(String),
}

struct Query {
    qtype: QType,
    /// Attempts so far: attempt `k` asks nameserver `k % n`.
    attempt: usize,
    state: State,
}

struct Lookup {
    name: String,
    servers: Vec<SocketAddr>,
    queries: [Query; 2],
    /// Replies that were not answers to our questions (another id, name or type, or broken).
    ignored: u32,
}

/// The lookups of one poll. Tokens from `base` up are this set's: two per lookup.
pub struct Lookups {
    base: usize,
    lookups: Slab<Lookup>,
}

/// What one finished lookup says.
pub struct Finished {
    pub key: usize,
    pub result: Result<Found, String>,
    pub ignored: u32,
}

impl Lookups {
    pub fn new(base: usize) -> Lookups {
        Lookups {
            base,
            lookups: Slab::new(),
        }
    }

    /// Starts looking up `name` at `servers` (at least one); returns the lookup's key.
    pub fn start(
        &mut self,
        registry: &Registry,
        name: &str,
        servers: &[SocketAddr],
        now: Instant,
    ) -> usize {
        let failed = |why: &str| State::Failed(why.to_string());
        let entry = self.lookups.vacant_entry();
        let key = entry.key();
        let mut lookup = Lookup {
            name: name.to_string(),
            servers: servers.to_vec(),
            queries: [QType::A, QType::Aaaa].map(|qtype| Query {
                qtype,
                attempt: 0,
                state: failed("no nameserver to ask"),
            }),
            ignored: 0,
        };
        for q in 0..2 {
            let token = Token(self.base + key * 2 + q);
            if !lookup.servers.is_empty() {
                lookup.ask(q, registry, token, now, None);
            }
        }
        entry.insert(lookup);
        key
    }

    /// Reads and writes what the socket behind `token` is ready for.
    pub fn ready(&mut self, registry: &Registry, token: Token, now: Instant) {
        let Some(index) = token.0.checked_sub(self.base) else {
            return;
        };
        if let Some(lookup) = self.lookups.get_mut(index / 2) {
            lookup.progress(index % 2, registry, token, now);
        }
    }

    /// Moves every query whose nameserver is late on to the next one.
    pub fn expire(&mut self, registry: &Registry, now: Instant) {
        for (key, lookup) in &mut self.lookups {
            for q in 0..2 {
                if let State::Asking { deadline, .. } = &lookup.queries[q].state {
                    if *deadline <= now {
                        let server = lookup.server(q);
                        let why = format!(
                            "no answer from {server} within {} s",
                            ATTEMPT_TIMEOUT.as_secs()
                        );
                        let token = Token(self.base + key * 2 + q);
                        lookup.ask(q, registry, token, now, Some(why));
                    }
                }
            }
        }
    }

    /// When the next query times out, if any is waiting.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lookups
            .iter()
            .flat_map(|(_, l)| l.queries.iter())
            .filter_map(|q| match &q.state {
                State::Asking { deadline, .. } => Some(*deadline),
                _ => None,
            })
            .min()
    }

    /// Takes out one lookup whose two queries have ended.
    pub fn take_finished(&mut self) -> Option<Finished> {
        let key = self
            .lookups
            .iter()
            .find(|(_, l)| l.queries.iter().all(|q| !q.asking()))
            .map(|(k, _)| k)?;
        let lookup = self.lookups.try_remove(key)?;
        Some(Finished {
            key,
            ignored: lookup.ignored,
            result: lookup.result(),
        })
    }

    /// Ends every lookup, closing its sockets.
    pub fn clear(&mut self, registry: &Registry) {
        for mut lookup in self.lookups.drain() {
            for q in &mut lookup.queries {
                q.close(registry);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lookups.is_empty()
    }
}

impl Query {
    fn asking(&self) -> bool {
        matches!(self.state, State::Asking { .. })
    }

    /// Deregisters the socket, if any (so it can be dropped).
    fn close(&mut self, registry: &Registry) {
        if let State::Asking { wire, .. } = &mut self.state {
            let _ = match wire {
                Wire::Udp(socket) => registry.deregister(socket),
                Wire::Tcp { stream, .. } => registry.deregister(stream),
            };
        }
    }
}

impl Lookup {
    fn server(&self, q: usize) -> SocketAddr {
        let n = self.servers.len().max(1);
        self.servers
            .get(self.queries[q].attempt % n)
            .copied()
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, 53)))
    }

    /// Asks query `q` again, of the next nameserver when `why` says the last one failed,
    /// until an attempt is under way or every attempt is spent.
    fn ask(
        &mut self,
        q: usize,
        registry: &Registry,
        token: Token,
        now: Instant,
        why: Option<String>,
    ) {
        let mut why = why;
        loop {
            self.queries[q].close(registry);
            if why.is_some() {
                self.queries[q].attempt += 1;
            }
            let attempt = self.queries[q].attempt;
            if attempt >= self.servers.len() * ROUNDS {
                let reason = why.unwrap_or_else(|| "no nameserver answered".to_string());
                self.queries[q].state = State::Failed(reason);
                return;
            }
            let server = self.server(q);
            match self.send_udp(q, server, registry, token, now) {
                Ok(state) => {
                    self.queries[q].state = state;
                    return;
                }
                Err(e) => why = Some(format!("{server}: {}", crate::sys::io_reason(&e))),
            }
        }
    }

    /// Query `q` under a fresh random id, encoded: the id and the packet.
    fn question(&self, q: usize) -> io::Result<(u16, Vec<u8>)> {
        let id = random_id();
        let packet = message::query(id, &self.name, self.queries[q].qtype)
            .map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, why))?;
        Ok((id, packet))
    }

    fn send_udp(
        &self,
        q: usize,
        server: SocketAddr,
        registry: &Registry,
        token: Token,
        now: Instant,
    ) -> io::Result<State> {
        let (id, packet) = self.question(q)?;
        let mut socket = UdpSocket::bind(unspecified(server))?;
        socket.connect(server)?;
        registry.register(&mut socket, token, Interest::READABLE)?;
        if let Err(e) = socket.send(&packet) {
            let _ = registry.deregister(&mut socket);
            return Err(e);
        }
        Ok(State::Asking {
            wire: Wire::Udp(socket),
            id,
            deadline: now + ATTEMPT_TIMEOUT,
        })
    }

    fn send_tcp(
        &self,
        q: usize,
        server: SocketAddr,
        registry: &Registry,
        token: Token,
        now: Instant,
    ) -> io::Result<State> {
        let (id, packet) = self.question(q)?;
        let len = u16::try_from(packet.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(&packet);
        let mut stream = TcpStream::connect(server)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(State::Asking {
            wire: Wire::Tcp {
                stream,
                out,
                sent: 0,
                got: Vec::new(),
            },
            id,
            deadline: now + ATTEMPT_TIMEOUT,
        })
    }

    /// What the socket of query `q` has for it.
    fn progress(&mut self, q: usize, registry: &Registry, token: Token, now: Instant) {
        let server = self.server(q);
        let qtype = self.queries[q].qtype;
        let step = match &mut self.queries[q].state {
            State::Asking { wire, id, .. } => match wire {
                Wire::Udp(socket) => read_udp(socket, *id, &self.name, qtype),
                Wire::Tcp {
                    stream,
                    out,
                    sent,
                    got,
                } => exchange_tcp(stream, out, sent, got, *id, &self.name, qtype),
            },
            _ => return,
        };
        self.ignored = self.ignored.saturating_add(step.ignored);
        match step.outcome {
            Outcome::Waiting => {}
            Outcome::Answer(addrs, ttl) => {
                self.queries[q].close(registry);
                self.queries[q].state = State::Answered(addrs, ttl);
            }
            Outcome::Truncated => {
                self.queries[q].close(registry);
                match self.send_tcp(q, server, registry, token, now) {
                    Ok(state) => self.queries[q].state = state,
                    Err(e) => {
                        let why = format!("{server} over TCP: {}", crate::sys::io_reason(&e));
                        self.ask(q, registry, token, now, Some(why));
                    }
                }
            }
            Outcome::Next(why) => {
                self.ask(q, registry, token, now, Some(format!("{server}: {why}")))
            }
        }
    }

    /// Both queries together, as the C library puts them: the addresses of either, and a
    /// failure only when neither found any. A family whose query failed is `unknown`.
    fn result(&self) -> Result<Found, String> {
        let mut addrs = Vec::new();
        let mut ttl = u32::MAX;
        let mut unknown = None;
        let mut why = None;
        for q in &self.queries {
            match &q.state {
                State::Answered(found, t) => {
                    if !found.is_empty() {
                        ttl = ttl.min(*t);
                    }
                    addrs.extend(found.iter().copied());
                }
                State::Failed(reason) => {
                    unknown = Some(match q.qtype {
                        QType::A => Family::V4,
                        QType::Aaaa => Family::V6,
                    });
                    why.get_or_insert_with(|| reason.clone());
                }
                State::Asking { .. } => return Err("unfinished".to_string()),
            }
        }
        if addrs.is_empty() {
            return Err(why.unwrap_or_else(|| "no addresses".to_string()));
        }
        Ok(Found {
            addrs,
            ttl,
            unknown,
        })
    }
}

enum Outcome {
    Waiting,
    Answer(Vec<IpAddr>, u32),
    Truncated,
    /// This nameserver failed; ask the next.
    Next(String),
}

struct Step {
    outcome: Outcome,
    ignored: u32,
}

/// Reads datagrams until one answers the query or the socket has no more.
fn read_udp(socket: &UdpSocket, id: u16, name: &str, qtype: QType) -> Step {
    let mut buf = [0u8; UDP_REPLY_MAX];
    let mut ignored = 0;
    loop {
        let outcome = match socket.recv(&mut buf) {
            Ok(n) => match judge(buf.get(..n).unwrap_or(&[]), id, name, qtype) {
                Some(outcome) => outcome,
                None if ignored + 1 >= MAX_IGNORED => {
                    let why = format!("{MAX_IGNORED} replies that answer nothing asked");
                    return Step {
                        outcome: Outcome::Next(why),
                        ignored: MAX_IGNORED,
                    };
                }
                None => {
                    ignored += 1;
                    continue;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Outcome::Waiting,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Outcome::Next(crate::sys::io_reason(&e)),
        };
        return Step { outcome, ignored };
    }
}

/// Writes the rest of the question, then reads the length-prefixed answer.
fn exchange_tcp(
    stream: &mut TcpStream,
    out: &[u8],
    sent: &mut usize,
    got: &mut Vec<u8>,
    id: u16,
    name: &str,
    qtype: QType,
) -> Step {
    let step = |outcome| Step {
        outcome,
        ignored: 0,
    };
    while *sent < out.len() {
        match stream.write(out.get(*sent..).unwrap_or(&[])) {
            Ok(0) => return step(Outcome::Next("took no bytes over TCP".into())),
            Ok(n) => *sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return step(Outcome::Waiting),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return step(Outcome::Next(crate::sys::io_reason(&e))),
        }
    }
    let mut buf = [0u8; 4096];
    loop {
        if got.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([got[0], got[1]]));
            if got.len() >= 2 + len {
                let msg = got.get(2..2 + len).unwrap_or(&[]);
                return match judge(msg, id, name, qtype) {
                    Some(Outcome::Truncated) => step(Outcome::Next("truncated over TCP".into())),
                    Some(outcome) => step(outcome),
                    // One question per connection: anything else ends it.
                    None => Step {
                        outcome: Outcome::Next(
                            "a reply over TCP that answers nothing asked".into(),
                        ),
                        ignored: 1,
                    },
                };
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => return step(Outcome::Next("closed before answering over TCP".into())),
            Ok(n) => got.extend_from_slice(buf.get(..n).unwrap_or(&[])),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return step(Outcome::Waiting),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return step(Outcome::Next(crate::sys::io_reason(&e))),
        }
    }
}

/// What a reply means for the query; `None` when it is not an answer to it.
fn judge(msg: &[u8], id: u16, name: &str, qtype: QType) -> Option<Outcome> {
    match message::answer(msg, id, name, qtype) {
        Ok(a) if a.truncated => Some(Outcome::Truncated),
        // No such name, or no records of this type: an answer, with nothing in it.
        Ok(a) => Some(Outcome::Answer(a.addrs, a.ttl)),
        Err(Refused::ServerError(code)) => Some(Outcome::Next(format!("answered {}", rcode(code)))),
        Err(Refused::NotOurs | Refused::Malformed) => None,
    }
}

fn rcode(code: u8) -> String {
    match code {
        1 => "FORMERR".to_string(),
        2 => "SERVFAIL".to_string(),
        4 => "NOTIMP".to_string(),
        5 => "REFUSED".to_string(),
        other => format!("rcode {other}"),
    }
}

/// The wildcard address of `server`'s family, port 0: the kernel picks a random port.
fn unspecified(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// A query id no one off the path can guess: SipHash over the time, under keys drawn from the
/// OS once per thread (each `RandomState` of a thread takes the next of them).
fn random_id() -> u16 {
    let state = RandomState::new();
    let bits = state.hash_one(Instant::now());
    (bits ^ (bits >> 16) ^ (bits >> 32) ^ (bits >> 48)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_vary() {
        let ids: std::collections::HashSet<u16> = (0..200).map(|_| random_id()).collect();
        assert!(ids.len() > 150, "{} distinct ids of 200", ids.len());
    }
}
