//! The vocabulary every part of a worker speaks: tokens, the timer wheel and what its entries
//! wake, readiness kept in userland, why a connection ended, and a few small helpers.
//!
//! Nothing here knows about pairs, sessions or upstreams; the parts above give these words their
//! meaning. Invariants: a token names its owner's slot and generation, so an event for a freed
//! and reused slot is told apart from one for its new owner ([`token::Key`]); `after` never
//! overflows; a `LogLimit` lets one line through per interval and counts the rest.

pub mod readiness;
pub mod timer;
pub mod token;

pub use readiness::Readiness;

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

/// `at + wait`, saturating far in the future instead of overflowing: a config may ask for a
/// timeout of many years, and adding it to an `Instant` must never panic.
pub fn after(at: Instant, wait: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);
    at.checked_add(wait.min(FAR)).unwrap_or(at)
}

/// Runs a non-blocking call again when a signal interrupted it; `Ok(None)` means WouldBlock.
/// Every read, write, accept and receive of the proxy goes through here.
pub fn retry<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<Option<T>> {
    loop {
        match call() {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Lets a repeated warning through at most once per `interval`, so a fault that recurs on every
/// event (out of descriptors, say) cannot flood the log, and counts what it held back.
#[derive(Debug, Clone, Copy)]
pub struct LogLimit {
    interval: Duration,
    last: Option<Instant>,
    /// Lines held back since the last one let through.
    suppressed: u64,
}

impl LogLimit {
    pub const fn new(interval: Duration) -> LogLimit {
        LogLimit {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether a line may go out now and, if so, how many were held back since the last one,
    /// so the line can say so.
    pub fn pass(&mut self, now: Instant) -> Option<u64> {
        let due = match self.last {
            None => true,
            Some(last) => now.saturating_duration_since(last) >= self.interval,
        };
        if !due {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// ` (N similar lines suppressed)` after a rate-limited log line, or nothing.
pub struct Suppressed(pub u64);

impl fmt::Display for Suppressed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, " ({n} similar lines suppressed)"),
        }
    }
}

/// Why a connection or UDP session ended, as the access log's `end=` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    ClientClosed,
    ServerClosed,
    IdleTimeout,
    HalfCloseTimeout,
    ConnectFailed,
    NoServer,
    Denied,
    Limit,
    Shutdown,
    Error,
}

impl End {
    pub const ALL: [End; 10] = [
        End::ClientClosed,
        End::ServerClosed,
        End::IdleTimeout,
        End::HalfCloseTimeout,
        End::ConnectFailed,
        End::NoServer,
        End::Denied,
        End::Limit,
        End::Shutdown,
        End::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::ServerClosed => "server_closed",
            End::IdleTimeout => "idle_timeout",
            End::HalfCloseTimeout => "half_close_timeout",
            End::ConnectFailed => "connect_failed",
            End::NoServer => "no_server",
            End::Denied => "denied",
            End::Limit => "limit",
            End::Shutdown => "shutdown",
            End::Error => "error",
        }
    }

    /// Position in [`End::ALL`], for tables of counters.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What a timer entry wakes. Each names a slot and its generation, so a stale entry for a freed
/// and reused slot is recognised and skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    Pair(token::Key),
    Session(token::Key),
    Probe(token::Key),
    /// An admin connection's deadline (its request head, its response, its close).
    Admin(token::Key),
    /// The admin endpoint tries accepting again after an error.
    AdminAccept,
    /// A pair's `limit_rate` wait ran out.
    Throttle(token::Key),
    AcceptResume,
    /// A drain's `shutdown_timeout` ran out.
    DrainDeadline,
    /// Time to look at the pre-connected spares again (refill, age out).
    Spares,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limit_counts_what_it_holds_back() {
        let t0 = Instant::now();
        let mut limit = LogLimit::new(Duration::from_secs(1));
        assert_eq!(limit.pass(t0), Some(0));
        for ms in [1, 10, 500, 999] {
            assert_eq!(limit.pass(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(limit.pass(t0 + Duration::from_millis(1000)), Some(4));
        assert_eq!(limit.pass(t0 + Duration::from_millis(2500)), Some(0));
        assert_eq!(Suppressed(0).to_string(), "");
        assert_eq!(Suppressed(4).to_string(), " (4 similar lines suppressed)");
    }

    #[test]
    fn after_saturates() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now);
        assert_eq!(
            after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[test]
    fn retry_maps_would_block_and_retries_interrupts() {
        let mut calls = 0;
        let got = retry(|| {
            calls += 1;
            if calls < 3 {
                Err(io::Error::from(io::ErrorKind::Interrupted))
            } else {
                Ok(7)
            }
        });
        assert_eq!(got.ok().flatten(), Some(7));
        let blocked = retry(|| Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock)));
        assert!(matches!(blocked, Ok(None)));
    }
}
