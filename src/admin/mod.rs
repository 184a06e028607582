//! The admin endpoint (DESIGN §5): a minimal HTTP/1.1 server on worker 0's reactor, an I/O part
//! beside the TCP and UDP parts. `/metrics` (Prometheus), `/stats` (JSON), `/` (the status
//! page), `/explain` (what a client would get now) and `POST /servers` (drain, down, up).
//!
//! One request per connection, answered whole and closed. Invariants: at most `MAX_CONNS`
//! connections at once (further clients wait in the kernel backlog, so a flood of stalled admin
//! clients costs the proxy at most that many sockets and buffers); each has one timer: 5 s to send
//! its head (then 408), 10 s to take the answer, 1 s after it to close its side. A request is
//! parsed by the sans-I/O `http` module; nothing here allocates per byte, only per request.

pub mod http;
pub mod json;
mod page;
mod prom;
mod view;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::Interest;
use slab::Slab;

use crate::config::{Cidr, Config, ServerId, UpstreamId};
use crate::metrics::AdminState;
use crate::part::{Ctx, Origin};
use crate::reactor::timer::TimerKey;
use crate::reactor::token::{self, Gen, Key};
use crate::reactor::{after, retry, LogLimit, Readiness, Suppressed, Timer};
use http::{Method, Parse, Request, Status};
use json::Json;
use view::{Sources, View};

/// Admin connections at once (DESIGN §5).
pub const MAX_CONNS: usize = 64;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// After the answer: how long to wait for the client to close before closing on it.
const LINGER: Duration = Duration::from_secs(1);
/// After the answer: at most this much more of a client's bytes are read and dropped.
const MAX_DRAIN: usize = 64 * 1024;
/// Admin clients taken per readiness event before the proxy's own work gets a turn.
const ACCEPT_BUDGET: usize = 16;
/// After an accept error (out of descriptors), how soon to try again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

/// Where one admin connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the request head.
    Reading,
    /// Writing the answer.
    Answering,
    /// The answer is out and our side shut: reading (and dropping) until the client closes, so
    /// that unread bytes of its never make the kernel reset the answer away.
    Closing,
}

struct Conn {
    gen: Gen,
    socket: TcpStream,
    peer: SocketAddr,
    phase: Phase,
    head: Vec<u8>,
    /// How far the search for the head's end got (see `http::parse_from`).
    scanned: usize,
    /// Bytes read and dropped while closing, bounded by `MAX_DRAIN`.
    drained: usize,
    answer: Vec<u8>,
    written: usize,
    ready: Readiness,
    timer: Option<TimerKey>,
}

pub struct AdminPart {
    /// `None` once the proxy stops (a drain frees the port at once).
    listener: Option<TcpListener>,
    /// The bound address (port 0 in the config shows the port chosen).
    addr: SocketAddr,
    allow: Vec<Cidr>,
    conns: Slab<Conn>,
    next_gen: Gen,
    /// Clients may be waiting in the backlog (set by readiness, cleared by `WouldBlock`).
    pending: bool,
    /// Inside `accept`: a connection closed meanwhile must not start another accept loop.
    accepting: bool,
    /// The armed retry after an accept error (out of descriptors).
    retry: Option<TimerKey>,
    refusals: LogLimit,
    started: Instant,
    /// The running config and its listeners, for the views and `/explain`.
    config: Config,
    origins: Vec<Arc<Origin>>,
}

impl AdminPart {
    /// The part for a listening socket bound on `addr`, registered in `registry`.
    pub fn new(
        mut listener: TcpListener,
        allow: Vec<Cidr>,
        started: Instant,
        registry: &mio::Registry,
    ) -> io::Result<AdminPart> {
        registry.register(&mut listener, token::admin_listener(), Interest::READABLE)?;
        let addr = listener.local_addr()?;
        Ok(AdminPart {
            listener: Some(listener),
            addr,
            allow,
            conns: Slab::new(),
            next_gen: 0,
            pending: false,
            accepting: false,
            retry: None,
            refusals: LogLimit::new(Duration::from_secs(1)),
            started,
            config: Config::default(),
            origins: Vec::new(),
        })
    }

    /// The running config changed (a start or a reload).
    pub fn reload(&mut self, config: &Config, origins: &[Arc<Origin>]) {
        self.config = config.clone();
        self.origins = origins.to_vec();
    }

    pub fn listener_ready(&mut self, ctx: &mut Ctx<'_>) {
        self.pending = true;
        self.accept(ctx);
    }

    /// Whether clients wait that a turn's budget left in the backlog.
    pub fn has_pending_work(&self) -> bool {
        self.pending && self.listener.is_some() && self.conns.len() < MAX_CONNS
    }

    pub fn run_pending(&mut self, ctx: &mut Ctx<'_>) {
        if self.has_pending_work() {
            self.accept(ctx);
        }
    }

    /// The retry timer after an accept error fired.
    pub fn accept_retry(&mut self, ctx: &mut Ctx<'_>) {
        self.retry = None;
        self.pending = true;
        self.accept(ctx);
    }

    /// Takes clients from the backlog, at most `ACCEPT_BUDGET` a call and `MAX_CONNS` at once.
    fn accept(&mut self, ctx: &mut Ctx<'_>) {
        if self.accepting {
            return;
        }
        self.accepting = true;
        for _ in 0..ACCEPT_BUDGET {
            if !self.pending || self.conns.len() >= MAX_CONNS {
                break;
            }
            let Some(listener) = &self.listener else {
                break;
            };
            let (mut socket, peer) = match listener.accept() {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.pending = false;
                    break;
                }
                Err(e) if crate::tcp::listener::is_fd_exhaustion(&e) => {
                    // Out of descriptors: look again in a while (clients wait in the backlog).
                    log::debug!("admin: accept failed: {}", crate::sys::io_reason(&e));
                    if self.retry.is_none() {
                        let at = after(ctx.now, ACCEPT_RETRY);
                        self.retry = Some(ctx.timers.insert(at, Timer::AdminAccept));
                    }
                    self.pending = false;
                    break;
                }
                // This client gave up before we took it (ECONNABORTED and the like): next.
                Err(_) => continue,
            };
            if !self.allowed(peer.ip()) {
                // Never a slot, never a timer: a best-effort 403 and the socket is dropped.
                let answer = text(Status::Forbidden, "not in the admin allow list\n", false);
                let _ = socket.write(&answer);
                if let Some(held_back) = self.refusals.pass(ctx.now) {
                    log::info!(
                        "admin: refused {} (not in the allow list){}",
                        peer,
                        Suppressed(held_back)
                    );
                }
                continue;
            }
            let entry = self.conns.vacant_entry();
            let gen = self.next_gen;
            self.next_gen = token::next_gen(gen);
            let key = Key::new(entry.key(), gen);
            let interest = Interest::READABLE | Interest::WRITABLE;
            if ctx
                .registry
                .register(&mut socket, token::admin(key), interest)
                .is_err()
            {
                continue;
            }
            let timer = ctx
                .timers
                .insert(after(ctx.now, HEAD_TIMEOUT), Timer::Admin(key));
            entry.insert(Conn {
                gen,
                socket,
                peer,
                phase: Phase::Reading,
                head: Vec::new(),
                scanned: 0,
                drained: 0,
                answer: Vec::new(),
                written: 0,
                ready: Readiness::default(),
                timer: Some(timer),
            });
        }
        self.accepting = false;
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip))
    }

    pub fn conn_ready(&mut self, key: Key, event: &mio::event::Event, ctx: &mut Ctx<'_>) {
        let Some(c) = self.live(key) else {
            return;
        };
        c.ready.absorb(event);
        self.drive(key, ctx);
    }

    /// The connection's deadline passed: a head that never came gets 408; otherwise close.
    pub fn timer(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(c) = self.live(key) else {
            return;
        };
        c.timer = None;
        match c.phase {
            Phase::Reading => {
                log::debug!("admin: {} sent no request within 5 s", c.peer);
                let answer = text(
                    Status::RequestTimeout,
                    "request head not received in 5 s\n",
                    false,
                );
                self.answer(key, answer, ctx);
            }
            Phase::Answering | Phase::Closing => self.close(key, ctx),
        }
    }

    fn live(&mut self, key: Key) -> Option<&mut Conn> {
        self.conns.get_mut(key.index).filter(|c| c.gen == key.gen)
    }

    fn drive(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(c) = self.live(key) else {
            return;
        };
        match c.phase {
            Phase::Reading => self.read_head(key, ctx),
            Phase::Answering => self.write_answer(key, ctx),
            Phase::Closing => self.read_to_close(key, ctx),
        }
    }

    fn read_head(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let fallback = self.addr;
        let Some(c) = self.live(key) else {
            return;
        };
        let mut chunk = [0u8; 2048];
        let mut ended = false;
        while c.ready.readable && c.head.len() <= http::MAX_HEAD {
            match retry(|| c.socket.read(&mut chunk)) {
                Ok(Some(0)) => {
                    ended = true;
                    break;
                }
                Ok(Some(n)) => c.head.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Ok(None) => c.ready.readable = false,
                Err(_) => {
                    self.close(key, ctx);
                    return;
                }
            }
        }
        let parsed = match http::parse_from(&c.head, &mut c.scanned) {
            Parse::Partial if ended => {
                self.close(key, ctx);
                return;
            }
            Parse::Partial => return,
            Parse::Bad(status) => Err(status),
            // The request borrows the connection's buffer: answer from an owned copy.
            Parse::Done(request) => Ok(OwnedRequest::from(&request)),
        };
        let (local, peer) = (c.socket.local_addr().unwrap_or(fallback), c.peer);
        let answer = match parsed {
            Err(Status::MethodNotAllowed) => with_allow("GET, HEAD, POST", false),
            Err(status) => text(status, &format!("{}\n", status.reason()), false),
            Ok(request) => self.route(&request, local, peer, ctx),
        };
        self.answer(key, answer, ctx);
    }

    /// Starts writing `answer`, with the connection's deadline to take it.
    fn answer(&mut self, key: Key, answer: Vec<u8>, ctx: &mut Ctx<'_>) {
        let Some(c) = self.live(key) else {
            return;
        };
        c.answer = answer;
        c.written = 0;
        c.phase = Phase::Answering;
        if let Some(t) = c.timer.take() {
            ctx.timers.cancel(t);
        }
        c.timer = Some(
            ctx.timers
                .insert(after(ctx.now, ANSWER_TIMEOUT), Timer::Admin(key)),
        );
        self.write_answer(key, ctx);
    }

    fn write_answer(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(c) = self.live(key) else {
            return;
        };
        while c.written < c.answer.len() {
            let rest = c.answer.get(c.written..).unwrap_or_default();
            match retry(|| c.socket.write(rest)) {
                Ok(Some(0)) | Err(_) => {
                    self.close(key, ctx);
                    return;
                }
                Ok(Some(n)) => c.written += n,
                Ok(None) => return,
            }
        }
        let _ = c.socket.shutdown(Shutdown::Write);
        c.phase = Phase::Closing;
        c.answer = Vec::new();
        if let Some(t) = c.timer.take() {
            ctx.timers.cancel(t);
        }
        c.timer = Some(ctx.timers.insert(after(ctx.now, LINGER), Timer::Admin(key)));
        self.read_to_close(key, ctx);
    }

    fn read_to_close(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(c) = self.live(key) else {
            return;
        };
        let mut sink = [0u8; 2048];
        // A client that keeps sending is not waited for: past MAX_DRAIN it is closed on.
        while c.drained < MAX_DRAIN {
            match retry(|| c.socket.read(&mut sink)) {
                Ok(Some(0)) | Err(_) => break,
                Ok(Some(n)) => c.drained += n,
                Ok(None) => return,
            }
        }
        self.close(key, ctx);
    }

    fn close(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        if self.live(key).is_none() {
            return;
        }
        let mut c = self.conns.remove(key.index);
        let _ = ctx.registry.deregister(&mut c.socket);
        if let Some(t) = c.timer.take() {
            ctx.timers.cancel(t);
        }
        // A slot is free: clients that waited in the backlog may come in (unless this close
        // happens inside an accept loop, which goes on by itself).
        self.accept(ctx);
    }

    /// Closes the listening socket (its port is free at once) and every admin connection.
    pub fn close_all(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(mut listener) = self.listener.take() {
            let _ = ctx.registry.deregister(&mut listener);
        }
        self.pending = false;
        if let Some(t) = self.retry.take() {
            ctx.timers.cancel(t);
        }
        let keys: Vec<Key> = self.conns.iter().map(|(i, c)| Key::new(i, c.gen)).collect();
        for key in keys {
            self.close(key, ctx);
        }
    }

    // ---- requests ------------------------------------------------------------------------

    fn route(
        &self,
        r: &OwnedRequest,
        local: SocketAddr,
        peer: SocketAddr,
        ctx: &mut Ctx<'_>,
    ) -> Vec<u8> {
        let head_only = r.method == Method::Head;
        if let Some(why) = self.misdirected(r, local) {
            return text(Status::Misdirected, why, head_only);
        }
        match (r.path.as_str(), r.method) {
            ("/servers", Method::Post) => match self.refuse_cross_site(r, local) {
                Some(why) => text(Status::Forbidden, why, false),
                None => self.set_server_state(r, peer, ctx),
            },
            ("/servers", _) => with_allow("POST", head_only),
            ("/" | "/metrics" | "/stats" | "/explain", Method::Post) => {
                with_allow("GET, HEAD", false)
            }
            ("/", _) => {
                let body = page::render(&self.view(ctx));
                http::response(Status::Ok, HTML, "", body.as_bytes(), head_only)
            }
            ("/metrics", _) => {
                let body = prom::render(&self.view(ctx));
                http::response(
                    Status::Ok,
                    prom::CONTENT_TYPE,
                    "",
                    body.as_bytes(),
                    head_only,
                )
            }
            ("/stats", _) => {
                let body = json::stats(&self.view(ctx));
                http::response(Status::Ok, JSON, "", body.as_bytes(), head_only)
            }
            ("/explain", _) => {
                let (status, body) = self.explain(r, ctx);
                http::response(status, JSON, "", body.as_bytes(), head_only)
            }
            _ => text(
                Status::NotFound,
                &format!("no page {}\n", r.path),
                head_only,
            ),
        }
    }

    fn view(&self, ctx: &Ctx<'_>) -> View {
        View::read(&Sources {
            metrics: ctx.metrics,
            config: &self.config,
            origins: &self.origins,
            groups: ctx.upstreams,
            started: self.started,
            now: ctx.now,
        })
    }

    /// Why a state-changing request must be refused, if it must: it comes from another site
    /// (`Sec-Fetch-Site: cross-site`, or an `Origin` that is not this endpoint's own address), so
    /// a web page cannot drive the admin through an operator's browser.
    fn refuse_cross_site(&self, r: &OwnedRequest, local: SocketAddr) -> Option<&'static str> {
        if r.sec_fetch_site.as_deref() == Some("cross-site") {
            return Some("cross-site request refused\n");
        }
        let origin = r.origin.as_deref()?;
        let host = origin.strip_prefix("http://")?;
        match own_host(host, local) {
            true => None,
            false => Some("request from another origin refused\n"),
        }
    }

    /// On a loopback endpoint, a `Host` that is not its own address: a page on another site
    /// whose name was made to resolve to 127.0.0.1 (DNS rebinding) must not read it. On other
    /// addresses the allow list guards it, and scrapers may name the host as they like.
    fn misdirected(&self, r: &OwnedRequest, local: SocketAddr) -> Option<&'static str> {
        let host = r.host.as_deref()?;
        if !crate::config::unmapped(local.ip()).is_loopback() || own_host(host, local) {
            return None;
        }
        Some("this endpoint answers to its own address only\n")
    }

    /// `POST /servers?upstream=NAME&server=ADDR&state=up|drain|down`.
    fn set_server_state(&self, r: &OwnedRequest, peer: SocketAddr, ctx: &mut Ctx<'_>) -> Vec<u8> {
        let (Some(upstream), Some(server), Some(state)) = (
            http::param(&r.query, "upstream"),
            http::param(&r.query, "server"),
            http::param(&r.query, "state"),
        ) else {
            return text(
                Status::BadRequest,
                "expected upstream=NAME&server=ADDR&state=up|drain|down\n",
                false,
            );
        };
        let state = match state.as_str() {
            "up" => AdminState::Up,
            "drain" => AdminState::Drain,
            "down" => AdminState::Down,
            other => {
                let message = format!("unknown state '{other}' (up, drain or down)\n");
                return text(Status::BadRequest, &message, false);
            }
        };
        let tables = ctx.metrics.tables();
        let Some(index) = tables.upstreams.iter().position(|u| u.name == upstream) else {
            return text(
                Status::NotFound,
                &format!("no upstream '{upstream}'\n"),
                false,
            );
        };
        let shared = tables
            .servers(UpstreamId(index))
            .iter()
            .find(|s| s.addr.to_string() == server || server.parse() == Ok(s.addr));
        let Some(shared) = shared else {
            let message = format!("upstream '{upstream}' has no server {server}\n");
            return text(Status::NotFound, &message, false);
        };
        let was = shared.admin();
        shared.set_admin(state);
        log::info!(
            "admin: upstream {} server {} set {} (was {}), by {}",
            upstream,
            shared.addr,
            state.as_str(),
            was.as_str(),
            peer
        );
        let mut j = Json::new();
        j.open()
            .field("upstream", &upstream)
            .field("server", &shared.addr.to_string())
            .field("state", state.as_str())
            .field("was", was.as_str())
            .close();
        http::response(Status::Ok, JSON, "", j.finish().as_bytes(), false)
    }

    /// `GET /explain?listener=ADDR&client=IP[:PORT]`.
    fn explain(&self, r: &OwnedRequest, ctx: &mut Ctx<'_>) -> (Status, String) {
        let error = |status, message: String| {
            let mut j = Json::new();
            j.open().field("error", &message).close();
            (status, j.finish())
        };
        let (Some(listener), Some(client)) = (
            http::param(&r.query, "listener"),
            http::param(&r.query, "client"),
        ) else {
            return error(
                Status::BadRequest,
                "expected listener=ADDR&client=IP[:PORT]".into(),
            );
        };
        let ip = client
            .parse::<IpAddr>()
            .or_else(|_| client.parse::<SocketAddr>().map(|a| a.ip()));
        let Ok(ip) = ip else {
            return error(Status::BadRequest, format!("bad client address '{client}'"));
        };
        let found = self.origins.iter().find(|o| {
            let prefix = match o.conf.proto {
                crate::config::Proto::Tcp => "",
                crate::config::Proto::Udp => "udp:",
            };
            listener == format!("{prefix}{}", o.addr)
                || listener == format!("{prefix}{}", o.conf.addr)
        });
        let Some(origin) = found else {
            return error(Status::NotFound, format!("no listener {listener}"));
        };
        let upstream = origin.conf.upstream;
        let name = self
            .config
            .upstreams
            .get(upstream.0)
            .map_or("?", |u| u.name.as_str());
        let now = ctx.now;
        let active = ctx
            .metrics
            .connections_active
            .load(std::sync::atomic::Ordering::Relaxed);
        let max = self.config.max_connections as u64;
        let rule = origin.acl.matching(ip);
        let access = match rule {
            None if origin.acl.is_empty() => "allow: no rules".to_string(),
            None => "allow: no rule matches".to_string(),
            Some(r) => r.to_string(),
        };
        let mut j = Json::new();
        j.open()
            .field("listener", &listener)
            .field("client", &ip.to_string())
            .field("upstream", name)
            .field("access", &access)
            .key("denied")
            .bool(rule.is_some_and(|r| !r.allow));
        j.key("limits").open();
        j.count("max_connections", max)
            .count("connections_active", active)
            .key("at_capacity")
            .bool(active >= max);
        let conf = &origin.conf;
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        match conf.proto {
            crate::config::Proto::Tcp => j
                .count("listener_max_connections", conf.max_connections as u64)
                .count(
                    "listener_connections_active",
                    origin.stats.connections_active.load(relaxed),
                ),
            crate::config::Proto::Udp => j.count("max_sessions", conf.max_sessions as u64).count(
                "sessions_active",
                origin.stats.udp_sessions_active.load(relaxed),
            ),
        };
        j.count("max_per_ip", u64::from(origin.per_ip.max_per_ip));
        match conf.rate_per_ip {
            Some((rate, burst)) => {
                j.key("rate_per_ip").open();
                j.count("per_second", u64::from(rate))
                    .count("burst", u64::from(burst))
                    .close();
            }
            None => {
                j.key("rate_per_ip").null();
            }
        }
        // This worker's count of the client (worker 0's: with several workers, each counts its own).
        match ctx.per_ip.state(origin.tag, ip, now) {
            Some((open, tokens)) => {
                j.count("client_open", u64::from(open));
                match tokens {
                    Some(t) => j.count("client_rate_tokens", t),
                    None => j.key("client_rate_tokens").null(),
                };
            }
            None => {
                j.count("client_open", 0).key("client_rate_tokens").null();
            }
        }
        j.close();
        match ctx.upstreams.get_mut(upstream.0) {
            Some(group) => {
                j.field("balance", group.balance().name());
                match group.peek(ip, now).and_then(|id| group.server(id)) {
                    Some(s) => j.field("pick", &s.conf.addr.to_string()),
                    None => j.key("pick").null(),
                };
                j.key("servers").open_array();
                for (i, s) in group.servers().iter().enumerate() {
                    let a = group.availability(ServerId(i), now);
                    if a == crate::upstream::Availability::Retired {
                        continue;
                    }
                    j.open()
                        .field("server", &s.conf.addr.to_string())
                        .key("available")
                        .bool(a == crate::upstream::Availability::Up)
                        .field("state", a.name())
                        .field("reason", &a.reason(now))
                        .close();
                }
                j.close_array();
            }
            None => {
                j.key("pick").null();
            }
        }
        j.close();
        (Status::Ok, j.finish())
    }
}

/// What `route` needs of a request, owned (the parsed one borrows the read buffer).
struct OwnedRequest {
    method: Method,
    path: String,
    query: String,
    host: Option<String>,
    origin: Option<String>,
    sec_fetch_site: Option<String>,
}

impl From<&Request<'_>> for OwnedRequest {
    fn from(r: &Request<'_>) -> OwnedRequest {
        OwnedRequest {
            method: r.method,
            path: r.path.to_string(),
            query: r.query.to_string(),
            host: r.host.map(str::to_string),
            origin: r.origin.map(str::to_string),
            sec_fetch_site: r.sec_fetch_site.map(str::to_string),
        }
    }
}

fn text(status: Status, body: &str, head_only: bool) -> Vec<u8> {
    http::response(status, TEXT, "", body.as_bytes(), head_only)
}

fn with_allow(allow: &str, head_only: bool) -> Vec<u8> {
    let header = format!("Allow: {allow}\r\n");
    http::response(
        Status::MethodNotAllowed,
        TEXT,
        &header,
        b"method not allowed here\n",
        head_only,
    )
}

/// Whether `host` (a `Host` header or an `Origin` without its scheme) names the endpoint
/// itself: its address, or `localhost` when it is on loopback; the port may be left out only
/// for `Host`, which browsers always send with the port here.
fn own_host(host: &str, local: SocketAddr) -> bool {
    let ip = crate::config::unmapped(local.ip());
    let own = SocketAddr::new(ip, local.port()).to_string();
    host == own || (ip.is_loopback() && host == format!("localhost:{}", local.port()))
}
