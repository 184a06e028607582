//! The running proxy: binding, the worker threads, counters, and the handle that stops, drains
//! and reloads it.
//!
//! [`Proxy::start`] binds every listener on the caller's thread (so a bad address fails at once,
//! naming the address and the OS reason), then hands the sockets to the [`worker::Worker`]s, each
//! on its own thread. A [`Handle`] talks to the workers only through a channel each plus a
//! `mio::Waker`, and reads the counters they publish in the metrics registry; nothing else is
//! shared. A reload is made here, on the caller's thread: the new listeners are bound for every
//! worker first (one that cannot bind refuses the whole reload, and nothing has changed), then
//! each worker gets the new config with its own sockets and applies it between two turns of its
//! loop. What the running config is (for the next reload) lives behind one mutex that only
//! reloads and address lookups take.

mod listeners;
mod resolving;
mod worker;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, Proto};
use crate::metrics::Tables;
use crate::part::{BindError, Origin};
use listeners::Socket;

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

/// A reload that was refused; the running config stays.
#[derive(Debug)]
pub enum ReloadError {
    /// A new listener could not be bound.
    Bind(BindError),
    NoListeners,
    /// The proxy is stopping (a drain began): nothing to reload.
    Stopping,
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadError::Bind(e) => e.fmt(f),
            ReloadError::NoListeners => RuntimeError::NoListeners.fmt(f),
            ReloadError::Stopping => f.write_str("the proxy is stopping"),
        }
    }
}

impl std::error::Error for ReloadError {}

/// What a reload changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// Listeners bound by this reload.
    pub added: usize,
    /// Listeners closed by it (their connections run on).
    pub removed: usize,
    /// Upstreams added, removed or changed.
    pub upstreams_changed: usize,
}

impl fmt::Display for Reloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "+{} listeners, -{} listeners, {} upstreams changed",
            self.added, self.removed, self.upstreams_changed
        )
    }
}

enum Command {
    /// Close everything now (a reset for every open pair) and exit.
    Stop,
    /// Stop listening, let open connections finish for at most this long, then stop.
    Drain(Duration),
    Reload(Box<worker::Reload>),
}

/// How long a reload waits for every worker to say it applied the new config.
const RELOAD_WAIT: Duration = Duration::from_secs(10);

/// The running config as reloads see it.
struct Running {
    config: Config,
    /// By `ListenerId` of `config`.
    origins: Vec<Arc<Origin>>,
    /// A drain began: no reload any more.
    stopping: bool,
    /// UDP listeners a reload removed whose sockets still serve sessions in some worker (alive
    /// while one of them holds the origin); a reload that adds one back takes its port over.
    winding_down: Vec<Weak<Origin>>,
    /// The thread that looks `resolve` names up again, once the config has one.
    resolver: Option<resolving::Link>,
}

/// What every handle of one proxy shares.
struct Control {
    /// Each worker's inbox and the waker of its poll, by worker number.
    workers: Vec<(mpsc::Sender<Command>, Arc<mio::Waker>)>,
    /// The admin endpoint's bound address.
    admin: Option<SocketAddr>,
    stats: Arc<Stats>,
    running: Mutex<Running>,
}

/// What a `Proxy` handle keeps to reach its workers: stop, drain, reload. Cheap to clone, and
/// usable from any thread (a signal thread holds one).
#[derive(Clone)]
pub struct Handle {
    control: Arc<Control>,
}

impl Handle {
    fn send(&self, command: impl Fn() -> Command) {
        for (commands, waker) in &self.control.workers {
            // A worker that already exited has dropped its receiver; nothing is left to tell.
            let _ = commands.send(command());
            let _ = waker.wake();
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.control
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks every worker to close everything and exit; returns at once.
    pub fn stop(&self) {
        self.stopping();
        self.send(|| Command::Stop);
    }

    /// Asks every worker to close its listening sockets at once and to exit when its open
    /// connections have finished, or after `timeout`, closing the rest (`end=shutdown`). UDP
    /// sessions end at once. Returns at once; a `stop` during the drain ends it.
    pub fn drain(&self, timeout: Duration) {
        self.stopping();
        self.send(|| Command::Drain(timeout));
    }

    /// No reload any more, and no re-resolution.
    fn stopping(&self) {
        let mut running = self.running();
        running.stopping = true;
        if let Some(link) = &running.resolver {
            link.stop();
        }
    }

    /// Replaces the running config with `config`, keeping every listening socket that stays and
    /// every connection in flight (DESIGN.md §2 "Workers, reload, shutdown"). Returns once every
    /// worker has applied it (or after 10 s, with a warning). On error nothing has changed.
    /// Logs one line either way (`reloaded: …` or `reload failed: …`) and counts it.
    pub fn reload(&self, config: Config) -> Result<Reloaded, ReloadError> {
        let result = self.try_reload(config);
        match &result {
            Ok(done) => {
                self.control.stats.reloads.fetch_add(1, Ordering::Relaxed);
                log::info!("reloaded: {}", done);
            }
            Err(ReloadError::Stopping) => log::info!("reload ignored: the proxy is stopping"),
            Err(e) => self.reload_failed(e),
        }
        result
    }

    /// Counts and logs a reload that failed before it reached the proxy (the file could not be
    /// read or parsed: `error` names FILE:LINE:COL).
    pub fn reload_failed(&self, error: &dyn fmt::Display) {
        self.control
            .stats
            .reload_failures
            .fetch_add(1, Ordering::Relaxed);
        log::error!("reload failed: {}; the running config stays", error);
    }

    fn try_reload(&self, config: Config) -> Result<Reloaded, ReloadError> {
        if config.listeners.is_empty() {
            return Err(ReloadError::NoListeners);
        }
        let running = self.running();
        self.replace(running, config)
    }

    /// Makes the servers of a `resolve` name the addresses `found`, as a reload of the running
    /// config with that upstream's servers changed; whether they changed.
    fn apply_resolved(&self, watch: &resolving::Watch, found: &crate::resolver::Found) -> bool {
        let running = self.running();
        if running.stopping {
            return false;
        }
        let mut config = running.config.clone();
        let Some((old, new)) = resolving::reresolved(&mut config, watch, found) else {
            return false;
        };
        match self.replace(running, config) {
            Ok(_) => {
                log::info!(
                    "upstream {}: '{}' now resolves to {} (was {})",
                    watch.upstream,
                    watch.host,
                    resolving::list(&new),
                    resolving::list(&old)
                );
                true
            }
            Err(e) => {
                log::warn!(
                    "upstream {}: the new addresses of '{}' are not applied: {}",
                    watch.upstream,
                    watch.host,
                    e
                );
                false
            }
        }
    }

    /// Puts `config` in place of the running config, whose lock `running` is.
    fn replace(
        &self,
        mut running: std::sync::MutexGuard<'_, Running>,
        mut config: Config,
    ) -> Result<Reloaded, ReloadError> {
        if running.stopping {
            return Err(ReloadError::Stopping);
        }
        let kept = keep_fixed_settings(&running.config, &mut config);
        let workers = self.control.workers.len();
        let tables = Arc::new(Tables::carry(&self.control.stats.tables(), &config));
        running.winding_down.retain(|o| o.strong_count() > 0);
        let winding_down: Vec<Arc<Origin>> = running
            .winding_down
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut plan = Plan::make(&config, &tables, &running.origins, &winding_down, workers)
            .map_err(ReloadError::Bind)?;
        drop(winding_down);
        if let Some(kept) = kept {
            log::warn!("{kept}");
        }
        tables.checks_ended(&config);
        let new_ids: std::collections::HashSet<_> =
            config.listeners.iter().map(Origin::identity).collect();
        let done = Reloaded {
            added: plan.fresh.len(),
            removed: running
                .origins
                .iter()
                .filter(|o| !new_ids.contains(&Origin::identity(&o.conf)))
                .count(),
            upstreams_changed: upstreams_changed(&running.config, &config),
        };
        let removed: Vec<Arc<Origin>> = running
            .origins
            .iter()
            .filter(|o| !new_ids.contains(&Origin::identity(&o.conf)))
            .cloned()
            .collect();
        for o in &removed {
            match o.conf.proto {
                Proto::Tcp => log::info!("stopped listening on {}", describe(o, &running.config)),
                Proto::Udp => {
                    log::info!(
                        "stopped taking new clients on {}; its sessions run on",
                        describe(o, &running.config)
                    );
                    running.winding_down.push(Arc::downgrade(o));
                }
            }
        }
        for (_, origin) in &plan.fresh {
            log::info!("listening on {}", describe(origin, &config));
        }
        let (acks, acked) = mpsc::channel();
        let mut per_worker = plan.per_worker(workers);
        for (index, (commands, waker)) in self.control.workers.iter().enumerate() {
            let reload = worker::Reload {
                config: config.clone(),
                tables: Arc::clone(&tables),
                origins: plan.origins.clone(),
                fresh: std::mem::take(&mut per_worker[index]),
                done: Some(acks.clone()),
            };
            if commands.send(Command::Reload(Box::new(reload))).is_ok() {
                let _ = waker.wake();
            }
        }
        drop(acks);
        self.control.stats.install(tables);
        running.origins = plan.origins;
        resolving::follow(&mut running.resolver, &self.control, &config);
        running.config = config;
        drop(running);
        wait_for_workers(&acked, workers);
        Ok(done)
    }

    /// The bound addresses of the running config's listeners, in config order.
    pub fn local_addrs(&self) -> Vec<(Proto, SocketAddr)> {
        self.running()
            .origins
            .iter()
            .map(|o| (o.conf.proto, o.addr))
            .collect()
    }
}

/// Waits until `workers` acknowledgements arrived, or every sender is gone, or `RELOAD_WAIT`.
fn wait_for_workers(acked: &mpsc::Receiver<()>, workers: usize) {
    let until = Instant::now() + RELOAD_WAIT;
    for got in 0..workers {
        let left = until.saturating_duration_since(Instant::now());
        match acked.recv_timeout(left) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                log::warn!(
                    "reload: {} of {} workers have applied it after {} s; the others will",
                    got,
                    workers,
                    RELOAD_WAIT.as_secs()
                );
                return;
            }
        }
    }
}

/// Settings a running process cannot change (its threads, its buffer pool, its logger, its admin
/// socket): a reload keeps the running values; the warning that says so is returned, to be
/// logged once the reload goes through.
fn keep_fixed_settings(running: &Config, new: &mut Config) -> Option<String> {
    let mut kept = Vec::new();
    if new.workers != running.workers {
        kept.push(format!("workers {}", running.workers));
        new.workers = running.workers;
    }
    if new.buffer_size != running.buffer_size {
        kept.push(format!("buffer_size {}", running.buffer_size));
        new.buffer_size = running.buffer_size;
    }
    if new.buffer_memory != running.buffer_memory {
        kept.push(format!("buffer_memory {}", running.buffer_memory));
        new.buffer_memory = running.buffer_memory;
    }
    if new.admin != running.admin {
        kept.push(match &running.admin {
            Some(a) => format!("admin {}", a.addr),
            None => "no admin".to_string(),
        });
        new.admin = running.admin.clone();
    }
    if new.splice_pipe_size != running.splice_pipe_size {
        kept.push(format!("splice_pipe_size {}", running.splice_pipe_size));
        new.splice_pipe_size = running.splice_pipe_size;
    }
    if new.max_pipes != running.max_pipes {
        kept.push(match running.max_pipes {
            Some(n) => format!("max_pipes {n}"),
            None => "max_pipes (the default)".to_string(),
        });
        new.max_pipes = running.max_pipes;
    }
    if new.log_level != running.log_level {
        kept.push(format!("log_level {}", running.log_level));
        new.log_level = running.log_level;
    }
    if kept.is_empty() {
        return None;
    }
    Some(format!(
        "reload: {} changes only on restart; keeping {}",
        if kept.len() == 1 { "this" } else { "these" },
        kept.join(", ")
    ))
}

/// Upstreams added, removed, or whose block changed (by name).
fn upstreams_changed(old: &Config, new: &Config) -> usize {
    let by_name = |c: &Config| -> std::collections::HashMap<String, usize> {
        c.upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.clone(), i))
            .collect()
    };
    let (old_by, new_by) = (by_name(old), by_name(new));
    let changed = new
        .upstreams
        .iter()
        .filter(|u| old_by.get(&u.name).and_then(|&i| old.upstreams.get(i)) != Some(*u))
        .count();
    let removed = old
        .upstreams
        .iter()
        .filter(|u| !new_by.contains_key(&u.name))
        .count();
    changed + removed
}

/// "ADDR for upstream NAME" (with "udp " before a UDP address), for the log.
fn describe(origin: &Origin, config: &Config) -> String {
    let upstream = config
        .upstreams
        .get(origin.conf.upstream.0)
        .map_or("?", |u| u.name.as_str());
    let proto = match origin.conf.proto {
        Proto::Tcp => "",
        Proto::Udp => "udp ",
    };
    format!("{proto}{} for upstream {upstream}", origin.addr)
}

/// The listeners of a config to be started or reloaded: an origin for each (the sockets of
/// kept ones stay where they are), and the new ones bound for every worker.
struct Plan {
    /// By `ListenerId` of the new config.
    origins: Vec<Arc<Origin>>,
    /// The new listeners: their origin and their sockets, one per worker.
    fresh: Vec<(Vec<Socket>, Arc<Origin>)>,
}

impl Plan {
    /// Fails, having bound nothing that stays, if one new listener cannot be bound.
    fn make(
        config: &Config,
        tables: &Tables,
        running: &[Arc<Origin>],
        winding_down: &[Arc<Origin>],
        workers: usize,
    ) -> Result<Plan, BindError> {
        let mut origins = Vec::with_capacity(config.listeners.len());
        let mut fresh = Vec::new();
        let (running_by, winding_by) = (
            Origin::by_identity(running),
            Origin::by_identity(winding_down),
        );
        for (i, conf) in config.listeners.iter().enumerate() {
            let stats = tables
                .listener(crate::config::ListenerId(i))
                .cloned()
                .unwrap_or_else(|| {
                    Arc::new(crate::metrics::ListenerStats::new(conf.proto, conf.addr))
                });
            let kept = running_by.get(&Origin::identity(conf));
            let back = winding_by.get(&Origin::identity(conf));
            let (addr, sockets) = match (kept, back) {
                (Some(o), _) => (o.addr, None),
                // Back before its sessions ended: a worker that still has the old socket takes
                // it up again (and drops this one); the others use this one.
                (None, Some(o)) => {
                    let bound = listeners::bind_beside(conf, o.addr, workers)?;
                    (bound.addr, Some(bound.sockets))
                }
                (None, None) => {
                    let bound = listeners::bind(conf, workers)?;
                    (bound.addr, Some(bound.sockets))
                }
            };
            let origin = Arc::new(Origin::new(conf.clone(), addr, stats));
            if let Some(sockets) = sockets {
                fresh.push((sockets, Arc::clone(&origin)));
            }
            origins.push(origin);
        }
        Ok(Plan { origins, fresh })
    }

    /// Hands out the new sockets: for each worker, its socket of each new listener.
    fn per_worker(&mut self, workers: usize) -> Vec<Vec<(Arc<Origin>, Socket)>> {
        let mut out: Vec<Vec<(Arc<Origin>, Socket)>> = (0..workers).map(|_| Vec::new()).collect();
        for (sockets, origin) in self.fresh.drain(..) {
            for (mine, socket) in out.iter_mut().zip(sockets) {
                mine.push((Arc::clone(&origin), socket));
            }
        }
        out
    }
}

/// A running proxy.
pub struct Proxy {
    handle: Handle,
    threads: Vec<JoinHandle<Result<(), RuntimeError>>>,
}

/// Stops every worker when the worker that holds it fails or panics, so the process does not
/// run on with part of its listeners.
struct StopOnFailure(Option<Handle>);

impl Drop for StopOnFailure {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.stop();
        }
    }
}

impl Proxy {
    /// Binds every listener and starts the workers.
    pub fn start(config: Config) -> Result<Proxy, RuntimeError> {
        if config.listeners.is_empty() {
            return Err(RuntimeError::NoListeners);
        }
        let stats = Arc::new(Metrics::for_config(&config));
        let count = config.workers.clamp(1, crate::config::MAX_WORKERS);
        let tables = stats.tables();
        // Every listener is bound for every worker before any runs: one that cannot bind fails
        // the start (what was bound closes as it drops).
        let mut plan = Plan::make(&config, &tables, &[], &[], count)?;
        let (mut admin, admin_addr) = match &config.admin {
            Some(a) => {
                let (listener, bound) =
                    crate::tcp::listener::bind(a.addr, crate::part::Sharing::Alone)?;
                log::info!("admin endpoint on http://{bound}/");
                (Some((listener, a.allow.clone())), Some(bound))
            }
            None => (None, None),
        };
        let mut per_worker = plan.per_worker(count);
        let mut workers = Vec::with_capacity(count);
        let mut inboxes = Vec::with_capacity(count);
        for (index, fresh) in per_worker.iter_mut().enumerate() {
            let (commands, inbox) = mpsc::channel();
            let first = worker::Reload {
                config: config.clone(),
                tables: Arc::clone(&tables),
                origins: plan.origins.clone(),
                fresh: std::mem::take(fresh),
                done: None,
            };
            let worker =
                worker::Worker::new(first, Arc::clone(&stats), inbox, index, admin.take())?;
            inboxes.push((commands, worker.waker()));
            workers.push(worker);
        }
        for origin in &plan.origins {
            log::info!("listening on {}", describe(origin, &config));
        }
        if count > 1 {
            log::info!("{} workers", count);
        }
        let handle = Handle {
            control: Arc::new(Control {
                workers: inboxes,
                admin: admin_addr,
                stats,
                running: Mutex::new(Running {
                    config,
                    origins: plan.origins,
                    stopping: false,
                    winding_down: Vec::new(),
                    resolver: None,
                }),
            }),
        };
        {
            let mut running = handle.running();
            let running = &mut *running;
            resolving::follow(&mut running.resolver, &handle.control, &running.config);
        }
        let mut proxy = Proxy {
            handle,
            threads: Vec::with_capacity(count),
        };
        for (index, worker) in workers.into_iter().enumerate() {
            let others = StopOnFailure(Some(proxy.handle.clone()));
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
                Ok(thread) => proxy.threads.push(thread),
                Err(error) => {
                    // Dropping the proxy stops and joins the workers already running.
                    drop(proxy);
                    return Err(RuntimeError::Io {
                        what: "cannot start a worker thread",
                        error,
                    });
                }
            }
        }
        Ok(proxy)
    }

    /// The bound addresses, in config order (port 0 in the config shows the port chosen).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.handle
            .local_addrs()
            .into_iter()
            .map(|(_, a)| a)
            .collect()
    }

    /// The bound address of the `i`-th listener.
    pub fn local_addr(&self, i: usize) -> Option<SocketAddr> {
        self.handle.local_addrs().get(i).map(|(_, a)| *a)
    }

    /// The protocol of the `i`-th listener.
    pub fn local_proto(&self, i: usize) -> Option<Proto> {
        self.handle.local_addrs().get(i).map(|(p, _)| *p)
    }

    pub fn stats(&self) -> &Stats {
        &self.handle.control.stats
    }

    /// The admin endpoint's bound address, if the config has `admin`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.handle.control.admin
    }

    pub fn stats_handle(&self) -> Arc<Stats> {
        Arc::clone(&self.handle.control.stats)
    }

    /// A handle that stops, drains or reloads this proxy from another thread.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// See [`Handle::reload`].
    pub fn reload(&self, config: Config) -> Result<Reloaded, ReloadError> {
        self.handle.reload(config)
    }

    /// Blocks until the workers exit (after a `Handle::stop`, a drain, or a fatal error).
    pub fn wait(mut self) -> Result<(), RuntimeError> {
        self.join()
    }

    /// Stops the workers and waits for them.
    pub fn stop(mut self) -> Result<(), RuntimeError> {
        self.handle.stop();
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
                self.handle.stop();
                result = ended;
            }
        }
        // Every worker has exited: the resolver has nothing left to change.
        let resolver = self.handle.running().resolver.take();
        if let Some(mut link) = resolver {
            link.stop();
            if let Some(thread) = link.thread.take() {
                let _ = thread.join();
            }
        }
        result
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.handle.stop();
            let _ = self.join();
        }
    }
}
