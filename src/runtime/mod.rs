//! The running proxy: binding, the worker thread, counters and the handle that stops it.
//!
//! [`Proxy::start`] binds every listener on the caller's thread (so a bad address fails at once,
//! naming the address and the OS reason), then hands the sockets to a [`worker::Worker`] on its
//! own thread. The handle talks to the worker only through a channel plus a `mio::Waker`, and
//! reads the counters the worker publishes in atomics; nothing else is shared.

pub(crate) mod access_log;
pub mod timer;
pub mod token;
mod worker;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::{Config, Proto};
use crate::tcp::buffer::PoolStats;

/// `at + after`, saturating far in the future instead of overflowing: a config may ask for
/// a timeout of many years, and adding it to an `Instant` must never panic.
pub fn after(at: std::time::Instant, wait: std::time::Duration) -> std::time::Instant {
    const FAR: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);
    at.checked_add(wait.min(FAR)).unwrap_or(at)
}

/// Lets a repeated warning through at most once per `interval`, so a fault that recurs on every
/// event (out of descriptors, say) cannot flood the log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogLimit {
    interval: std::time::Duration,
    last: Option<std::time::Instant>,
    /// Lines held back since the last one let through.
    suppressed: u64,
}

impl LogLimit {
    pub(crate) const fn new(interval: std::time::Duration) -> LogLimit {
        LogLimit {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    pub(crate) fn allow(&mut self, now: std::time::Instant) -> bool {
        self.pass(now).is_some()
    }

    /// Like `allow`; when a line may go out, how many were held back since the last one, so the
    /// line can say so.
    pub(crate) fn pass(&mut self, now: std::time::Instant) -> Option<u64> {
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
pub(crate) struct Suppressed(pub u64);

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
    ConnectFailed,
    NoServer,
    Denied,
    Limit,
    Shutdown,
    Error,
}

impl End {
    pub const ALL: [End; 9] = [
        End::ClientClosed,
        End::ServerClosed,
        End::IdleTimeout,
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
            End::ConnectFailed => "connect_failed",
            End::NoServer => "no_server",
            End::Denied => "denied",
            End::Limit => "limit",
            End::Shutdown => "shutdown",
            End::Error => "error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters the worker publishes. Relaxed atomics: each is a plain tally, read for reporting.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    /// Bytes delivered client → server, counted when a connection or session ends.
    pub bytes_up: AtomicU64,
    /// Bytes delivered server → client, counted when a connection or session ends.
    pub bytes_down: AtomicU64,
    pub connect_failures: AtomicU64,
    /// How often accepting paused for lack of file descriptors.
    pub accept_backoffs: AtomicU64,
    /// Polls that found events while `busy_poll` kept the worker awake: sleeps it saved.
    pub busy_poll_hits: AtomicU64,
    pub udp_sessions_total: AtomicU64,
    pub udp_sessions_active: AtomicU64,
    pub udp_datagrams_up: AtomicU64,
    pub udp_datagrams_down: AtomicU64,
    /// Datagrams dropped because a socket's send buffer was full.
    pub udp_dropped: AtomicU64,
    pub pool: Arc<PoolStats>,
    ends: [AtomicU64; 9],
}

impl Stats {
    /// Connections and sessions that finished with `end`.
    pub fn ended(&self, end: End) -> u64 {
        self.ends[end.index()].load(Ordering::Relaxed)
    }

    pub fn buffers_in_use(&self) -> usize {
        self.pool.in_use.load(Ordering::Relaxed)
    }

    pub fn buffers_peak(&self) -> usize {
        self.pool.peak.load(Ordering::Relaxed)
    }

    pub(crate) fn count_end(&self, end: End) {
        self.ends[end.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// A runtime failure, naming the socket or the operation.
#[derive(Debug)]
pub enum RuntimeError {
    Bind {
        proto: Proto,
        addr: SocketAddr,
        error: io::Error,
    },
    NoListeners,
    Io {
        what: &'static str,
        error: io::Error,
    },
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeError::Bind { proto, addr, error } => write!(
                f,
                "cannot listen on {}{}: {}",
                match proto {
                    Proto::Tcp => "",
                    Proto::Udp => "udp ",
                },
                addr,
                crate::sys::io_reason(error)
            ),
            RuntimeError::NoListeners => write!(f, "nothing to do: the config has no listen block"),
            RuntimeError::Io { what, error } => {
                write!(f, "{}: {}", what, crate::sys::io_reason(error))
            }
        }
    }
}

impl std::error::Error for RuntimeError {}

enum Command {
    Stop,
}

/// What a timer entry wakes. Slab keys carry a generation so a stale entry for a freed and
/// reused slot is recognised and skipped.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Timer {
    Pair { key: usize, gen: u32 },
    Session { key: usize, gen: u32 },
    Probe { key: usize, gen: u32 },
    AcceptResume,
}

/// The parts of a worker that its UDP side and its health probes share with the TCP side,
/// lent for one call.
pub(crate) struct Ctx<'a> {
    pub registry: &'a mio::Registry,
    pub timers: &'a mut timer::TimerWheel<Timer>,
    pub groups: &'a mut [crate::upstream::Group],
    pub stats: &'a Stats,
    pub now: std::time::Instant,
    pub access_log: bool,
}

/// What a `Proxy` handle keeps to reach its worker.
#[derive(Clone)]
pub struct Stopper {
    commands: mpsc::Sender<Command>,
    waker: Arc<mio::Waker>,
}

impl Stopper {
    /// Asks the worker to close everything and exit; returns at once.
    pub fn stop(&self) {
        // A worker that already exited has dropped its receiver; nothing is left to stop.
        let _ = self.commands.send(Command::Stop);
        let _ = self.waker.wake();
    }
}

/// A running proxy.
pub struct Proxy {
    addrs: Vec<(Proto, SocketAddr)>,
    stats: Arc<Stats>,
    stopper: Stopper,
    thread: Option<JoinHandle<Result<(), RuntimeError>>>,
}

impl Proxy {
    /// Binds every listener and starts the worker.
    pub fn start(config: Config) -> Result<Proxy, RuntimeError> {
        if config.listeners.is_empty() {
            return Err(RuntimeError::NoListeners);
        }
        let stats = Arc::new(Stats::default());
        let (commands, inbox) = mpsc::channel();
        let worker = worker::Worker::new(config, Arc::clone(&stats), inbox)?;
        let addrs = worker.local_addrs();
        let stopper = Stopper {
            commands,
            waker: worker.waker(),
        };
        let thread = std::thread::Builder::new()
            .name("sluice-worker".into())
            .spawn(move || worker.run())
            .map_err(|error| RuntimeError::Io {
                what: "cannot start the worker thread",
                error,
            })?;
        Ok(Proxy {
            addrs,
            stats,
            stopper,
            thread: Some(thread),
        })
    }

    /// The bound addresses, in config order (port 0 in the config shows the port chosen).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.iter().map(|(_, a)| *a).collect()
    }

    /// The bound address of the `i`-th listener.
    pub fn local_addr(&self, i: usize) -> Option<SocketAddr> {
        self.addrs.get(i).map(|(_, a)| *a)
    }

    /// The protocol of the `i`-th listener.
    pub fn local_proto(&self, i: usize) -> Option<Proto> {
        self.addrs.get(i).map(|(p, _)| *p)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn stats_handle(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Blocks until the worker exits (after a `Stopper::stop` or a fatal error).
    pub fn wait(mut self) -> Result<(), RuntimeError> {
        self.join()
    }

    /// Stops the worker and waits for it.
    pub fn stop(mut self) -> Result<(), RuntimeError> {
        self.stopper.stop();
        self.join()
    }

    fn join(&mut self) -> Result<(), RuntimeError> {
        match self.thread.take() {
            Some(thread) => thread.join().unwrap_or_else(|_| {
                Err(RuntimeError::Io {
                    what: "worker thread",
                    error: io::Error::other("panicked"),
                })
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stopper.stop();
            let _ = self.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

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
}
