//! SNI routing: a pair on a listener with `sni` routes reads its client's TLS ClientHello (by
//! peeking, so every byte still goes to the server unchanged) before it picks an upstream.

use super::TcpProxy;
use crate::part::Ctx;
use crate::reactor::token::Key;
use crate::reactor::{after, End};
use crate::sni::{self, Hello};
use crate::tcp::pipe::{PairState, MAX_PARTIAL_PEEKS};

impl TcpProxy {
    /// The client is accepted (and its PROXY header read, if any): choose the upstream by its
    /// ClientHello first where the listener routes by SNI, else connect at once.
    pub(super) fn proceed(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(pair) = super::live(&mut self.pairs, key) else {
            return;
        };
        if pair.origin.conf.sni_routes.is_empty() {
            self.connect_next(key, ctx);
            return;
        }
        pair.state = PairState::Peeking;
        let deadline = after(ctx.now, pair.origin.conf.sni_timeout);
        self.arm(key, deadline, ctx);
        if pair_has_bytes(self, key) {
            self.peek_hello(key, ctx);
        }
    }

    /// The client of a `Peeking` pair sent more: is its ClientHello whole?
    pub(super) fn peek_hello(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let mut buf = [0u8; sni::MAX_HELLO];
        let Some(n) = self.peek_client(key, &mut buf, ctx) else {
            return;
        };
        let Some(pair) = super::live(&mut self.pairs, key) else {
            return;
        };
        let conf = &pair.origin.conf;
        let chosen = match sni::parse(buf.get(..n).unwrap_or_default()) {
            // A reload took the routes away while it peeked: the listener's upstream.
            _ if conf.sni_routes.is_empty() => Some(conf.upstream),
            Hello::Incomplete
                if n < sni::MAX_HELLO
                    && !pair.client_ready.read_closed
                    && pair.extra.as_ref().map_or(0, |e| e.partial_peeks) < MAX_PARTIAL_PEEKS =>
            {
                pair.extra.get_or_insert_with(Box::default).partial_peeks += 1;
                pair.client_ready.readable = false;
                return;
            }
            // Not TLS, broken, cut short by the client's end, or no name: the default.
            Hello::Incomplete | Hello::NotTls | Hello::Bad(_) | Hello::Found(None) => {
                conf.sni_default
            }
            Hello::Found(Some(name)) => {
                let routed = sni::route(&conf.sni_routes, &name)
                    .copied()
                    .or(conf.sni_default);
                pair.extra.get_or_insert_with(Box::default).sni = Some(name);
                routed
            }
        };
        let Some(upstream) = chosen else {
            self.close(key, End::NoServer, ctx);
            return;
        };
        pair.upstream = upstream;
        pair.state = PairState::Unassigned;
        // The retry budget counts from the choice, not from the accept.
        pair.budget_from = ctx.now;
        if let Some(t) = pair.timer.take() {
            ctx.timers.cancel(t);
        }
        self.connect_next(key, ctx);
    }

    /// A `Peeking` pair's deadline: a client that sent too little in `sni_timeout` is closed.
    pub(super) fn peek_timeout(&mut self, key: Key, ctx: &mut Ctx<'_>) {
        let Some(pair) = super::live(&mut self.pairs, key) else {
            return;
        };
        // From when it began to peek: the accept, or the end of its PROXY header.
        let deadline = after(pair.budget_from, pair.origin.conf.sni_timeout);
        if ctx.now >= deadline {
            self.close(key, End::IdleTimeout, ctx);
        } else {
            self.arm(key, deadline, ctx);
        }
    }
}

/// Whether the pair's client already reported bytes (its header was read and more came).
fn pair_has_bytes(proxy: &mut TcpProxy, key: Key) -> bool {
    super::live(&mut proxy.pairs, key).is_some_and(|p| p.client_ready.readable)
}
