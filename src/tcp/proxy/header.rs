//! The PROXY protocol on TCP pairs: reading a client's header (`accept_proxy_protocol`) before
//! anything else, and sending one to the server (`proxy_protocol`) before any client byte.
//!
//! A client's header is found by peeking, and only its own bytes are then read, so whatever the
//! client sent after it stays in the socket and is forwarded as usual: nothing is lost, nothing
//! is copied aside. Invariants: a pair in `ReadingProxyHeader` has no server and no buffer; a
//! pair in `SendingProxyHeader` reads nothing from its client until the header is out.

use std::io::Read;
use std::net::SocketAddr;

use super::TcpProxy;
use crate::config::ProxyVersion;
use crate::part::Ctx;
use crate::proxy_protocol::{self as pp, Parsed};
use crate::reactor::token::Key;
use crate::reactor::{after, retry, End, Suppressed};
use crate::tcp::pipe::{PairState, Proxied, MAX_PARTIAL_PEEKS};

impl TcpProxy {
    /// The client of a pair in `ReadingProxyHeader` has bytes: is its header complete?
    pub(super) fn read_proxy_header(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let mut buf = [0u8; pp::MAX_HEADER];
        let Some(n) = self.peek_client(key, &mut buf, ctx) else {
            return;
        };
        let Some(pair) = super::live(&mut self.pairs, key) else {
            return;
        };

        let seen = buf.get(..n).unwrap_or_default();
        let (header, len) = match pp::parse(seen) {
            Parsed::Incomplete if pair.client_ready.read_closed => {
                return self.bad_header(key, "closed before the header was complete", ctx);
            }
            // More will come (a new segment raises a new edge): wait for it, up to the timeout
            // and a bounded number of looks.
            Parsed::Incomplete if n < pp::MAX_HEADER => {
                let extra = pair.extra.get_or_insert_with(Box::default);
                extra.partial_peeks += 1;
                if extra.partial_peeks > MAX_PARTIAL_PEEKS {
                    return self.bad_header(key, "sent in too many pieces", ctx);
                }
                pair.client_ready.readable = false;
                return;
            }
            Parsed::Incomplete => return self.bad_header(key, "header too long", ctx),
            Parsed::Absent => return self.bad_header(key, "no PROXY header", ctx),
            Parsed::Bad(why) => return self.bad_header(key, why, ctx),
            Parsed::Header(h, len) => (h, len),
        };
        // Take exactly the header's bytes; the rest stays for the pipe.
        let mut left = len;
        while left > 0 {
            let part = buf.get_mut(..left).unwrap_or_default();
            match retry(|| pair.client.read(part)) {
                Ok(Some(got)) if got > 0 => left -= got.min(left),
                _ => {
                    self.close(key, End::Error, ctx);
                    return;
                }
            }
        }
        if let Some(client) = header.client() {
            pair.client_addr = client;
        }
        pair.extra().proxied = Some(Proxied {
            // A LOCAL header speaks for its sender: its addresses are not the client's.
            dst: header.client().and(header.addrs).map(|(_, dst)| dst),
            tlvs: header.tlvs,
        });
        pair.state = PairState::Unassigned;
        // The retry budget (`next_upstream_timeout`) counts from here, not from the accept.
        pair.budget_from = ctx.now;
        if let Some(t) = pair.timer.take() {
            ctx.timers.cancel(t);
        }
        // The client is who the header says: the access rules and limits apply to that address.
        let (origin, client) = (std::sync::Arc::clone(&pair.origin), pair.client_addr);
        match self.screen(&origin, client, ctx) {
            Ok(ticket) => {
                if let Some(pair) = super::live(&mut self.pairs, key) {
                    pair.ticket = ticket;
                }
                self.proceed(key, ctx);
            }
            Err(()) => self.discard(key, ctx),
        }
    }

    /// Peeks at what the client of pair `key` has sent, without taking it: the byte count, or
    /// None when there is nothing to look at now (no data yet: readiness is spent; the client
    /// closed or failed: the pair is closed).
    pub(super) fn peek_client(
        &mut self,
        key: Key,
        buf: &mut [u8],
        ctx: &mut Ctx<'_>,
    ) -> Option<usize> {
        let pair = super::live(&mut self.pairs, key)?;
        match retry(|| pair.client.peek(buf)) {
            Ok(Some(0)) => self.close(key, End::ClientClosed, ctx),
            Ok(Some(n)) => return Some(n),
            Ok(None) => pair.client_ready.readable = false,
            Err(_) => self.close(key, End::Error, ctx),
        }
        None
    }

    /// A header that cannot be taken: the client is closed, no byte reaches a server.
    fn bad_header(&mut self, key: Key, why: &str, ctx: &mut Ctx<'_>) {
        ctx.metrics
            .proxy_protocol_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(pair) = super::live(&mut self.pairs, key) {
            let (client, listen) = (pair.client_addr, pair.origin.addr);
            if let Some(held_back) = self.header_warnings.pass(ctx.now) {
                log::warn!(
                    "{listen}: closing {client}: bad PROXY header: {why}{}",
                    Suppressed(held_back)
                );
            }
        }
        self.close(key, End::Error, ctx);
    }

    /// The header's deadline passed while still waiting for it.
    pub(super) fn header_timeout(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(pair) = super::live(&mut self.pairs, key) else {
            return;
        };
        let deadline = after(pair.started, pair.origin.conf.proxy_protocol_timeout);
        if ctx.now >= deadline {
            self.bad_header(key, "not complete within proxy_protocol_timeout", ctx);
        } else {
            self.arm(key, deadline, ctx);
        }
    }

    /// The PROXY header a pair that just connected to `server` must send first, if any.
    pub(super) fn header_for(&mut self, key: Key, version: ProxyVersion) -> Option<Vec<u8>> {
        let pair = super::live(&mut self.pairs, key)?;
        let src = pair.client_addr;
        let proxied = pair.extra.as_ref().and_then(|e| e.proxied.as_ref());
        let dst: SocketAddr = match proxied.and_then(|p| p.dst) {
            Some(dst) => dst,
            None => pair.client.local_addr().unwrap_or(pair.origin.addr),
        };
        Some(match version {
            ProxyVersion::V1 => pp::encode_v1(src, dst),
            ProxyVersion::V2 => {
                let tlvs = proxied.map_or(&[][..], |p| p.tlvs.as_slice());
                pp::encode_v2(
                    pp::Command::Proxy,
                    pp::Transport::Stream,
                    Some((src, dst)),
                    tlvs,
                )
            }
        })
    }

    /// Writes what is left of the pair's PROXY header; true once it is all out (the pair
    /// streams from then on).
    pub(super) fn send_proxy_header(&mut self, key: Key, ctx: &mut Ctx<'_>) -> bool {
        let Some(pair) = super::live(&mut self.pairs, key) else {
            return false;
        };
        let PairState::SendingProxyHeader { server } = pair.state else {
            return false;
        };
        let Some(stream) = pair.server.as_mut() else {
            return false;
        };
        let extra = pair.extra.get_or_insert_with(Box::default);
        while extra.header_sent < extra.header_out.len() {
            if !pair.server_ready.writable {
                return false;
            }
            let rest = extra
                .header_out
                .get(extra.header_sent..)
                .unwrap_or_default();
            match retry(|| std::io::Write::write(stream, rest)) {
                Ok(Some(0)) | Err(_) => {
                    self.close(key, End::Error, ctx);
                    return false;
                }
                Ok(Some(n)) => extra.header_sent += n,
                Ok(None) => {
                    pair.server_ready.writable = false;
                    return false;
                }
            }
        }
        extra.header_out = Vec::new();
        pair.state = PairState::Streaming { server };
        true
    }

    /// Frees a pair refused before it reached a server (already counted and logged as
    /// refused): no access-log line of its own, no end counted twice.
    pub(super) fn discard(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        if super::live(&mut self.pairs, key).is_none() {
            return;
        }
        let mut pair = self.pairs.remove(key.index);
        if !crate::sys::CLOSE_DEREGISTERS {
            let _ = ctx.registry.deregister(&mut pair.client);
        }
        if let Some(t) = pair.timer.take() {
            ctx.timers.cancel(t);
        }
        if let Some(ticket) = pair.ticket.take() {
            ctx.per_ip.release(ticket);
        }
        ctx.metrics.unopened(&pair.origin.stats);
        self.reopen_accepting();
    }
}
