//! Readiness kept in userland, one for every registered socket (pair sides, listeners, UDP
//! sockets, probes). Sockets are registered once, edge-triggered: an event ORs bits in, a
//! `WouldBlock` clears its bit, and the owner's state machine works on what is set.
//!
//! The peer's FIN (`read_closed`) is kept apart from an error (`error`): after a FIN the other
//! direction still flows, after an error nothing will.

/// What the kernel last told us about one socket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
    /// The peer's FIN (or a reset) was reported: read on to `Ok(0)` even after a short read.
    pub read_closed: bool,
    /// An error or a hang-up was reported: a connect under way may have failed.
    pub hung_up: bool,
    /// The socket reported an error (a reset, a refused connect): unlike a FIN, nothing more
    /// will be read or written on it.
    pub error: bool,
}

impl Readiness {
    pub fn absorb(&mut self, event: &mio::event::Event) {
        // Closed and error conditions count as ready: the next read or write reports them.
        self.readable |= event.is_readable() || event.is_read_closed() || event.is_error();
        self.writable |= event.is_writable() || event.is_write_closed() || event.is_error();
        self.read_closed |= event.is_read_closed() || event.is_error();
        self.hung_up |= event.is_error() || event.is_write_closed() || event.is_read_closed();
        self.error |= event.is_error();
    }
}
