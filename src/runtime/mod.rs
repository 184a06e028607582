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
use crate::part::BindError;

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

enum Command {
    /// Close everything now (a reset for every open pair) and exit.
    Stop,
    /// Stop listening, let open connections finish for at most this long, then stop.
    Drain(std::time::Duration),
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

    /// Asks the worker to close its listening sockets at once and to exit when its open
    /// connections have finished, or after `timeout`, closing the rest (`end=shutdown`). UDP
    /// sessions end at once. Returns at once; a `stop` during the drain ends it.
    pub fn drain(&self, timeout: std::time::Duration) {
        let _ = self.commands.send(Command::Drain(timeout));
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
        let stats = Arc::new(Metrics::for_config(&config));
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
