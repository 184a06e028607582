//! The running proxy: binding, the worker thread, counters and the handle that stops it.
//!
//! [`Proxy::start`] binds every listener on the caller's thread (so a bad address fails at once,
//! naming the address and the OS reason), then hands the sockets to a [`worker::Worker`] on its
//! own thread. The handle talks to the worker only through a channel plus a `mio::Waker`, and
//! reads the counters the worker publishes in the metrics registry; nothing else is shared.

mod worker;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::{Config, Proto};
use crate::part::{BindError, BindPlan, Sharing};

pub use crate::metrics::Metrics;
pub use crate::reactor::End;

/// The counters `Proxy::stats` returns: the metrics registry.
pub type Stats = Metrics;

/// A runtime failure, naming the socket or the operation.
#[derive(Debug)]
pub enum RuntimeError {
    Bind(BindError),
    NoListeners,
    Io {
        what: &'static str,
        error: io::Error,
    },
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeError::Bind(e) => e.fmt(f),
            RuntimeError::NoListeners => write!(f, "nothing to do: the config has no listen block"),
            RuntimeError::Io { what, error } => {
                write!(f, "{}: {}", what, crate::sys::io_reason(error))
            }
        }
    }
}

impl std::error::Error for RuntimeError {}

impl From<BindError> for RuntimeError {
    fn from(e: BindError) -> RuntimeError {
        RuntimeError::Bind(e)
    }
}

#[derive(Debug, Clone, Copy)]
enum Command {
    /// Close everything now (a reset for every open pair) and exit.
    Stop,
    /// Stop listening, let open connections finish for at most this long, then stop.
    Drain(std::time::Duration),
}

/// What a `Proxy` handle keeps to reach its worker.
#[derive(Clone)]
pub struct Stopper {
    /// Each worker's inbox and the waker of its poll.
    workers: Vec<(mpsc::Sender<Command>, Arc<mio::Waker>)>,
}

impl Stopper {
    fn send(&self, command: Command) {
        for (commands, waker) in &self.workers {
            // A worker that already exited has dropped its receiver; nothing is left to tell.
            let _ = commands.send(command);
            let _ = waker.wake();
        }
    }

    /// Asks every worker to close everything and exit; returns at once.
    pub fn stop(&self) {
        self.send(Command::Stop);
    }

    /// Asks every worker to close its listening sockets at once and to exit when its open
    /// connections have finished, or after `timeout`, closing the rest (`end=shutdown`). UDP
    /// sessions end at once. Returns at once; a `stop` during the drain ends it.
    pub fn drain(&self, timeout: std::time::Duration) {
        self.send(Command::Drain(timeout));
    }
}

/// Stops every worker when the worker that holds it fails or panics, so the process does not
/// run on with part of its listeners.
struct StopOnFailure(Option<Stopper>);

impl Drop for StopOnFailure {
    fn drop(&mut self) {
        if let Some(stopper) = self.0.take() {
            stopper.stop();
        }
    }
}

/// A running proxy.
pub struct Proxy {
    addrs: Vec<(Proto, SocketAddr)>,
    stats: Arc<Stats>,
    stopper: Stopper,
    threads: Vec<JoinHandle<Result<(), RuntimeError>>>,
}

impl Proxy {
    /// Binds every listener and starts the worker.
    pub fn start(config: Config) -> Result<Proxy, RuntimeError> {
        if config.listeners.is_empty() {
            return Err(RuntimeError::NoListeners);
        }
        let stats = Arc::new(Metrics::for_config(&config));
        let count = config.workers.clamp(1, crate::config::MAX_WORKERS);
        // Every worker binds before any runs, so a listener that cannot bind fails the start
        // (the workers built so far close their sockets as they drop). The first binds the
        // config's addresses; the others bind the addresses it got, so a port 0 is one port.
        let configured: Vec<SocketAddr> = config.listeners.iter().map(|l| l.addr).collect();
        let first = match count {
            1 => Sharing::Alone,
            _ => Sharing::First,
        };
        let mut workers = Vec::with_capacity(count);
        let mut addrs = Vec::new();
        let mut stopper = Stopper {
            workers: Vec::with_capacity(count),
        };
        for index in 0..count {
            let (commands, inbox) = mpsc::channel();
            let bound: Vec<SocketAddr> = addrs.iter().map(|(_, a)| *a).collect();
            let plan = match index {
                0 => BindPlan {
                    addrs: &configured,
                    sharing: first,
                },
                _ => BindPlan {
                    addrs: &bound,
                    sharing: Sharing::Another,
                },
            };
            let worker =
                worker::Worker::new(config.clone(), Arc::clone(&stats), inbox, index, plan)?;
            if index == 0 {
                addrs = worker.local_addrs();
            }
            stopper.workers.push((commands, worker.waker()));
            workers.push(worker);
        }
        let mut threads = Vec::with_capacity(count);
        for (index, worker) in workers.into_iter().enumerate() {
            let others = StopOnFailure(Some(stopper.clone()));
            let spawned = std::thread::Builder::new()
                .name(format!("sluice-worker-{index}"))
                .spawn(move || {
                    let mut others = others;
                    let ended = worker.run();
                    if ended.is_ok() {
                        others.0 = None;
                    }
                    ended
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(error) => {
                    let started = Proxy {
                        addrs,
                        stats,
                        stopper,
                        threads,
                    };
                    drop(started);
                    return Err(RuntimeError::Io {
                        what: "cannot start a worker thread",
                        error,
                    });
                }
            }
        }
        Ok(Proxy {
            addrs,
            stats,
            stopper,
            threads,
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

    /// Waits for every worker; the first failure is the result (a worker that fails stops the
    /// others, so the process does not run on with part of its listeners).
    fn join(&mut self) -> Result<(), RuntimeError> {
        let mut result = Ok(());
        for thread in std::mem::take(&mut self.threads) {
            let ended = thread.join().unwrap_or_else(|_| {
                Err(RuntimeError::Io {
                    what: "worker thread",
                    error: io::Error::other("panicked"),
                })
            });
            if ended.is_err() && result.is_ok() {
                self.stopper.stop();
                result = ended;
            }
        }
        result
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stopper.stop();
            let _ = self.join();
        }
    }
}
