//! The TCP side of the worker: accepting clients, connecting to servers (with next-upstream
//! retries), pumping bytes through a pair, and closing it with one access-log line.
//!
//! Invariants: a pair holds at most one server socket, and `Group::acquire`/`release` are
//! called exactly once per connect attempt, so the per-server connection counts that
//! `least_conn` and `max_conns` read stay exact.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Poll};

use super::{AcceptState, Worker, ACCEPT_BACKOFF, ACCEPT_BUDGET};
use crate::runtime::access_log;
use crate::runtime::token::{self, Side};
use crate::runtime::{after, End, Suppressed, Timer};
use crate::tcp::listener::{self, Accept};
use crate::tcp::pipe::{Fault, Pair, PairState, Readiness, Step};

impl Worker {
    // ---- accepting -------------------------------------------------------------------------

    pub(super) fn accept_from(&mut self, i: usize) {
        for _ in 0..ACCEPT_BUDGET {
            if self.accept != AcceptState::Open {
                return;
            }
            if self.pairs.len() >= self.config.max_connections {
                // Clients wait in the kernel backlog until a pair ends.
                self.accept = AcceptState::AtCapacity;
                return;
            }
            let Some(l) = self.listeners.get_mut(i) else {
                return;
            };
            if !l.readable {
                return;
            }
            match listener::accept(&l.socket) {
                Accept::Client(stream, addr) => self.admit(i, stream, addr),
                Accept::Drained => l.readable = false,
                Accept::OutOfFds(error) => {
                    self.back_off_accepting(&error);
                    return;
                }
                Accept::Skipped(error) => {
                    log::debug!(
                        "accept on {} failed: {}",
                        l.addr,
                        crate::sys::io_reason(&error)
                    );
                }
            }
        }
    }

    pub(super) fn back_off_accepting(&mut self, error: &io::Error) {
        self.accept = AcceptState::BackingOff;
        self.stats.accept_backoffs.fetch_add(1, Ordering::Relaxed);
        self.timers
            .insert(self.now + ACCEPT_BACKOFF, Timer::AcceptResume);
        if let Some(held_back) = self.fd_warnings.pass(self.now) {
            log::warn!(
                "cannot accept: {} ({} connections open); pausing accepts for {} ms{}",
                crate::sys::io_reason(error),
                self.pairs.len(),
                ACCEPT_BACKOFF.as_millis(),
                Suppressed(held_back)
            );
        }
    }

    /// A pair ended or a back-off expired: take clients again if there is room.
    pub(super) fn reopen_accepting(&mut self) {
        if self.accept != AcceptState::Open && self.pairs.len() < self.config.max_connections {
            self.accept = AcceptState::Open;
        }
    }

    pub(super) fn admit(&mut self, listener: usize, stream: TcpStream, client_addr: SocketAddr) {
        // Nagle would hold back small writes that the client already sent without delay. Linux
        // copies TCP_NODELAY from the listener (set in `listener::bind`) to accepted sockets.
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        let entry = self.pairs.vacant_entry();
        let key = entry.key();
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1);
        let mut pair = Pair::new(gen, listener, stream, client_addr, self.now);
        if let Err(e) = self.poll.registry().register(
            &mut pair.client,
            token::pair(key, Side::Client),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!(
                "cannot register client {}: {}",
                client_addr,
                crate::sys::io_reason(&e)
            );
            return;
        }
        entry.insert(pair);
        self.stats.connections_total.fetch_add(1, Ordering::Relaxed);
        self.stats
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        self.connect_next(key);
    }

    // ---- connecting ------------------------------------------------------------------------

    /// Starts a connect to the next server the balancer offers, or closes the client when the
    /// tries, the time budget or the servers have run out.
    pub(super) fn connect_next(&mut self, key: usize) {
        loop {
            let Some(pair) = self.pairs.get_mut(key) else {
                return;
            };
            let Some(l) = self.listeners.get(pair.listener) else {
                return;
            };
            let conf = &l.conf;
            let out_of_time = pair.tries > 0 && out_of_time(conf, pair.started, self.now);
            if pair.tries >= conf.next_upstream_tries || out_of_time {
                self.close(key, End::ConnectFailed);
                return;
            }
            let Some(group) = self.groups.get_mut(conf.upstream) else {
                return;
            };
            let Some(server) = group.pick(pair.client_addr.ip(), self.now, &pair.tried) else {
                let end = if pair.tries == 0 {
                    End::NoServer
                } else {
                    End::ConnectFailed
                };
                if pair.tries == 0 {
                    if let Some(held_back) = self.no_server_warnings.pass(self.now) {
                        log::warn!(
                            "upstream {}: no server available for {}{}",
                            group.name,
                            pair.client_addr,
                            Suppressed(held_back)
                        );
                    }
                }
                self.close(key, end);
                return;
            };
            pair.tried.insert(server);
            pair.tries += 1;
            pair.last_server = Some(server);
            let addr = group.servers()[server].conf.addr;
            match start_connect(&self.poll, addr, key) {
                Ok(stream) => {
                    group.acquire(server);
                    pair.server = Some(stream);
                    pair.server_ready = Default::default();
                    pair.state = PairState::Connecting {
                        server,
                        since: self.now,
                    };
                    let deadline = connect_deadline(conf, pair.started, self.now);
                    self.arm(key, deadline);
                    return;
                }
                Err(error) if listener::is_fd_exhaustion(&error) => {
                    // Our shortage, not the server's fault: no passive-health mark.
                    if let Some(held_back) = self.fd_warnings.pass(self.now) {
                        log::warn!(
                            "cannot open a server connection: {}{}",
                            crate::sys::io_reason(&error),
                            Suppressed(held_back)
                        );
                    }
                    self.close(key, End::Error);
                    return;
                }
                Err(error) => self.count_connect_failure(key, server, &error),
            }
        }
    }

    /// The server socket reported readiness while connecting: find out how the connect went.
    pub(super) fn finish_connect(&mut self, key: usize, server: usize) -> bool {
        let Some(pair) = self.pairs.get_mut(key) else {
            return false;
        };
        if !pair.server_ready.writable {
            return false;
        }
        let Some(stream) = pair.server.as_ref() else {
            return false;
        };
        match connect_result(stream, &pair.server_ready) {
            ConnectResult::Pending => {
                pair.server_ready.writable = false;
                false
            }
            ConnectResult::Failed(error) => {
                self.abandon_server(key);
                self.count_connect_failure(key, server, &error);
                self.connect_next(key);
                false
            }
            ConnectResult::Connected => {
                let _ = stream.set_nodelay(true);
                pair.state = PairState::Streaming { server };
                pair.last_active = self.now;
                if let Some(l) = self.listeners.get(pair.listener) {
                    if let Some(group) = self.groups.get_mut(l.conf.upstream) {
                        group.connected(server, self.now);
                    }
                    let deadline = after(self.now, l.conf.idle_timeout);
                    self.arm(key, deadline);
                }
                true
            }
        }
    }

    /// Deregisters and drops the server socket of a pair whose connect failed.
    pub(super) fn abandon_server(&mut self, key: usize) {
        let Some(pair) = self.pairs.get_mut(key) else {
            return;
        };
        if let Some(mut stream) = pair.server.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        if let PairState::Connecting { server, .. } = pair.state {
            if let Some(group) = self
                .listeners
                .get(pair.listener)
                .and_then(|l| self.groups.get_mut(l.conf.upstream))
            {
                group.release(server);
            }
        }
        pair.state = PairState::Unassigned;
    }

    pub(super) fn count_connect_failure(&mut self, key: usize, server: usize, error: &io::Error) {
        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        let Some(pair) = self.pairs.get(key) else {
            return;
        };
        let Some(l) = self.listeners.get(pair.listener) else {
            return;
        };
        let Some(group) = self.groups.get_mut(l.conf.upstream) else {
            return;
        };
        let addr = group.servers()[server].conf.addr;
        log::info!(
            "upstream {}: connect to {} failed: {} (client {})",
            group.name,
            addr,
            crate::sys::io_reason(error),
            pair.client_addr
        );
        if group.connect_failed(server, self.now) {
            let fail_timeout = group.servers()[server].conf.fail_timeout;
            log::warn!(
                "upstream {}: server {} marked unavailable for {} ms after failed connects",
                group.name,
                addr,
                fail_timeout.as_millis()
            );
        }
    }

    // ---- streaming -------------------------------------------------------------------------

    pub(super) fn drive(&mut self, key: usize, gen: u32) {
        let Some(pair) = self.pairs.get(key) else {
            return;
        };
        if pair.gen != gen {
            return;
        }
        match pair.state {
            PairState::Closed | PairState::Unassigned => return,
            PairState::Connecting { .. } if pair.client_ready.error => {
                // The client reset while we were connecting for it: nothing to blame the
                // server for, and nobody left to wait for.
                self.abandon_server(key);
                self.close(key, End::ClientClosed);
                return;
            }
            PairState::Connecting { server, .. } => {
                if !self.finish_connect(key, server) {
                    return;
                }
            }
            PairState::Streaming { .. } => {}
        }
        self.pump(key, gen);
    }

    pub(super) fn pump(&mut self, key: usize, gen: u32) {
        let Some(pair) = self.pairs.get_mut(key) else {
            return;
        };
        let before = (pair.bytes(), pair.half_closed());
        let step = pair.pump(&mut self.pool, &mut self.scratch);
        let step = match step {
            Ok(step) => step,
            Err(fault) => {
                self.fail(key, fault);
                return;
            }
        };
        if pair.bytes() != before.0 || pair.half_closed() != before.1 {
            pair.last_active = self.now;
        }
        if pair.finished() {
            let end = match pair.first_eof {
                Some(Side::Server) => End::ServerClosed,
                _ => End::ClientClosed,
            };
            self.close(key, end);
            return;
        }
        if pair.half_closed() && !before.1 {
            // The shorter half-close timeout may now be due before the armed timer.
            if let Some(l) = self.listeners.get(pair.listener) {
                let deadline = after(pair.last_active, l.conf.half_close_timeout);
                self.arm(key, deadline);
            }
        }
        match step {
            Step::Idle => {}
            Step::Yield => self.ready.push((key, gen)),
            Step::Starved => self.starved.push((key, gen)),
        }
    }

    /// An I/O error on one side: reset the other side too, so its peer does not take a cut
    /// stream for a complete one, and free the pair.
    pub(super) fn fail(&mut self, key: usize, fault: Fault) {
        if let Some(pair) = self.pairs.get_mut(key) {
            log::debug!(
                "client {}: {} side failed: {}",
                pair.client_addr,
                match fault.side {
                    Side::Client => "client",
                    Side::Server => "server",
                },
                crate::sys::io_reason(&fault.error)
            );
        }
        self.close(key, End::Error);
    }

    /// Frees a pair's resources, logs it, and leaves its slot for `reap`.
    pub(super) fn close(&mut self, key: usize, end: End) {
        let Some(pair) = self.pairs.get_mut(key) else {
            return;
        };
        let server = match pair.state {
            PairState::Closed => return,
            PairState::Unassigned => None,
            PairState::Connecting { server, .. } | PairState::Streaming { server } => Some(server),
        };
        // A failed pair names the server it tried last.
        let logged_server = server.or(pair.last_server);
        // Elsewhere sockets are deregistered before they are dropped. On Linux, closing the
        // descriptor (in `reap`) takes it out of the epoll set, since sluice never duplicates
        // one, so the two `EPOLL_CTL_DEL` calls per pair would be wasted.
        #[cfg(not(target_os = "linux"))]
        {
            let registry = self.poll.registry();
            let _ = registry.deregister(&mut pair.client);
            if let Some(stream) = pair.server.as_mut() {
                let _ = registry.deregister(stream);
            }
        }
        if pair.cut_short(end) {
            pair.reset_on_close();
        }
        pair.release_buffers(&mut self.pool);
        if let Some(timer) = pair.timer.take() {
            self.timers.cancel(timer);
        }
        pair.state = PairState::Closed;
        let l = &self.listeners[pair.listener];
        let group = &mut self.groups[l.conf.upstream];
        if let Some(server) = server {
            group.release(server);
        }
        self.stats
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        self.stats
            .bytes_up
            .fetch_add(pair.up.bytes, Ordering::Relaxed);
        self.stats
            .bytes_down
            .fetch_add(pair.down.bytes, Ordering::Relaxed);
        self.stats.count_end(end);
        if self.config.access_log {
            access_log::write(&access_log::Entry {
                listen: l.addr,
                client: pair.client_addr,
                upstream: &group.name,
                server: logged_server
                    .and_then(|s| group.servers().get(s))
                    .map(|s| s.conf.addr),
                up_bytes: pair.up.bytes,
                down_bytes: pair.down.bytes,
                datagrams: None,
                duration: self.now.duration_since(pair.started),
                end,
            });
        }
        self.dead.push(key);
    }

    pub(super) fn close_all(&mut self, end: End) {
        let keys: Vec<usize> = self.pairs.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, end);
        }
    }

    /// Frees the slots of pairs closed in this batch; their sockets close here.
    pub(super) fn reap(&mut self) {
        if self.dead.is_empty() {
            return;
        }
        for key in self.dead.drain(..) {
            if self
                .pairs
                .get(key)
                .is_some_and(|p| p.state == PairState::Closed)
            {
                self.pairs.remove(key);
            }
        }
        self.reopen_accepting();
    }

    // ---- timers ----------------------------------------------------------------------------

    /// Arms the pair's one timer for `deadline`, replacing whatever it had.
    pub(super) fn arm(&mut self, key: usize, deadline: Instant) {
        let Some(pair) = self.pairs.get_mut(key) else {
            return;
        };
        if let Some(old) = pair.timer.take() {
            self.timers.cancel(old);
        }
        pair.timer = Some(
            self.timers
                .insert(deadline, Timer::Pair { key, gen: pair.gen }),
        );
    }

    /// A pair's timer fired. Activity deadlines are lazy: if traffic moved the deadline,
    /// re-arm for the new one instead of closing.
    pub(super) fn pair_timer(&mut self, key: usize, gen: u32) {
        let Some(pair) = self.pairs.get_mut(key) else {
            return;
        };
        if pair.gen != gen {
            return;
        }
        pair.timer = None;
        let Some(l) = self.listeners.get(pair.listener) else {
            return;
        };
        match pair.state {
            PairState::Closed | PairState::Unassigned => {}
            PairState::Connecting { server, since } => {
                let timed_out = self.now >= after(since, l.conf.connect_timeout);
                if timed_out {
                    let error = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                    self.abandon_server(key);
                    self.count_connect_failure(key, server, &error);
                    self.connect_next(key);
                } else if out_of_time(&l.conf, pair.started, self.now) {
                    // next_upstream_timeout bounds the attempt in flight too; the server had
                    // less than its connect_timeout, so it is not blamed.
                    log::debug!(
                        "client {}: next_upstream_timeout reached while connecting",
                        pair.client_addr
                    );
                    self.abandon_server(key);
                    self.close(key, End::ConnectFailed);
                } else {
                    let deadline = connect_deadline(&l.conf, pair.started, since);
                    self.arm(key, deadline);
                }
            }
            PairState::Streaming { .. } => {
                let timeout = if pair.half_closed() {
                    l.conf.half_close_timeout
                } else {
                    l.conf.idle_timeout
                };
                let deadline = after(pair.last_active, timeout);
                if self.now >= deadline {
                    self.close(key, End::IdleTimeout);
                } else {
                    self.arm(key, deadline);
                }
            }
        }
    }
}

/// Whether a pair that started at `started` has used up `next_upstream_timeout`.
fn out_of_time(conf: &crate::config::Listen, started: Instant, now: Instant) -> bool {
    conf.next_upstream_timeout
        .is_some_and(|limit| now >= after(started, limit))
}

/// When a connect begun at `since` must be given up: at `connect_timeout`, or earlier when
/// `next_upstream_timeout` for the whole pair runs out first.
fn connect_deadline(conf: &crate::config::Listen, started: Instant, since: Instant) -> Instant {
    let own = after(since, conf.connect_timeout);
    match conf.next_upstream_timeout {
        Some(limit) => own.min(after(started, limit)),
        None => own,
    }
}

/// Opens a non-blocking connect to `addr` registered under the pair's server token.
fn start_connect(poll: &Poll, addr: SocketAddr, key: usize) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    poll.registry().register(
        &mut stream,
        token::pair(key, Side::Server),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    Ok(stream)
}

enum ConnectResult {
    Pending,
    Connected,
    Failed(io::Error),
}

/// How a non-blocking connect went, once the socket reported writable.
///
/// Linux reports a connecting socket writable only once the handshake is done (`tcp_poll`
/// leaves EPOLLOUT out in SYN_SENT), and a failed connect also raises EPOLLERR or EPOLLHUP, so
/// a plain writable event there means connected and costs no syscall. Otherwise mio's
/// documented way: `take_error`, then `peer_addr` to tell a finished connect from a spurious
/// wake-up.
fn connect_result(stream: &TcpStream, ready: &Readiness) -> ConnectResult {
    if cfg!(target_os = "linux") && !ready.hung_up {
        return ConnectResult::Connected;
    }
    match stream.take_error() {
        Ok(Some(error)) | Err(error) => return ConnectResult::Failed(error),
        Ok(None) => {}
    }
    match stream.peer_addr() {
        Ok(_) => ConnectResult::Connected,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => ConnectResult::Pending,
        Err(error) => ConnectResult::Failed(error),
    }
}
