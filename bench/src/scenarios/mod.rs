//! The six scenarios, their cases, and the measuring window they share.
//!
//! A scenario is a list of cases (throughput has four: one and four streams, each direction).
//! Each run of a case gets a fresh backend and a fresh target process, so no state (TIME_WAIT
//! sockets, pooled buffers, RSS) leaks from one run into the next. A run warms up, then measures
//! for `--seconds`: counters and the proxy's CPU time are read at both ends of the window, and
//! latency samples are only recorded while the window is open. Every load loop also stops at a
//! hard deadline (`Flags::running`) and after `MAX_OPS` operations, whatever happens to the
//! orchestrating thread.

pub mod churn;
pub mod idle;
pub mod rr;
pub mod throughput;
pub mod udp;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::backends::{Mode, TcpBackend, UdpBackend};
use crate::report::Column;
use crate::targets::{Proto, Running};

/// Named figures of one run, keyed by `Column::key`.
pub type Metrics = BTreeMap<&'static str, f64>;

/// Operations one load loop may do, whatever the clock says.
pub const MAX_OPS: u64 = 200_000_000;
/// The size of every request, response and datagram in the message scenarios.
pub const MESSAGE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Throughput,
    Rr,
    PingPong,
    Churn,
    Idle,
    Udp,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Throughput,
        Scenario::Rr,
        Scenario::PingPong,
        Scenario::Churn,
        Scenario::Idle,
        Scenario::Udp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Rr => "rr",
            Scenario::PingPong => "pingpong",
            Scenario::Churn => "churn",
            Scenario::Idle => "idle",
            Scenario::Udp => "udp",
        }
    }

    pub fn from_name(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }

    /// One line saying what the table shows.
    pub fn title(self) -> &'static str {
        match self {
            Scenario::Throughput => {
                "bulk TCP transfer, one and four streams each way (Gbit/s at the receiver)"
            }
            Scenario::Rr => "50 persistent connections, one 64-byte request in flight each",
            Scenario::PingPong => "one connection, one 64-byte message in flight (round trip)",
            Scenario::Churn => "a new connection per request: connect, 64 B each way, close",
            Scenario::Idle => {
                "connections held open through the proxy after one 64-byte exchange each"
            }
            Scenario::Udp => "64-byte datagrams echoed by the backend: 20 clients, and ping-pong",
        }
    }

    pub fn columns(self) -> &'static [Column] {
        match self {
            Scenario::Throughput => throughput::COLUMNS,
            Scenario::Rr | Scenario::PingPong => rr::COLUMNS,
            Scenario::Churn => churn::COLUMNS,
            Scenario::Idle => idle::COLUMNS,
            Scenario::Udp => udp::COLUMNS,
        }
    }

    pub fn cases(self) -> Vec<Case> {
        let case = |label, slug, proto, kind| Case {
            label,
            slug,
            proto,
            kind,
        };
        match self {
            Scenario::Throughput => vec![
                case(
                    "1 stream up",
                    "tput-1-up",
                    Proto::Tcp,
                    CaseKind::Throughput {
                        streams: 1,
                        upload: true,
                    },
                ),
                case(
                    "1 stream down",
                    "tput-1-down",
                    Proto::Tcp,
                    CaseKind::Throughput {
                        streams: 1,
                        upload: false,
                    },
                ),
                case(
                    "4 streams up",
                    "tput-4-up",
                    Proto::Tcp,
                    CaseKind::Throughput {
                        streams: 4,
                        upload: true,
                    },
                ),
                case(
                    "4 streams down",
                    "tput-4-down",
                    Proto::Tcp,
                    CaseKind::Throughput {
                        streams: 4,
                        upload: false,
                    },
                ),
            ],
            Scenario::Rr => vec![case(
                "50 conns",
                "rr",
                Proto::Tcp,
                CaseKind::Rr { conns: 50 },
            )],
            Scenario::PingPong => vec![case("1 conn", "pingpong", Proto::Tcp, CaseKind::PingPong)],
            Scenario::Churn => vec![case(
                "4 clients",
                "churn",
                Proto::Tcp,
                CaseKind::Churn { clients: 4 },
            )],
            Scenario::Idle => vec![case("held open", "idle", Proto::Tcp, CaseKind::Idle)],
            Scenario::Udp => vec![
                case(
                    "20 clients",
                    "udp-rr",
                    Proto::Udp,
                    CaseKind::UdpRr {
                        clients: 20,
                        window: 4,
                    },
                ),
                case(
                    "ping-pong",
                    "udp-pingpong",
                    Proto::Udp,
                    CaseKind::UdpPingPong,
                ),
            ],
        }
    }
}

/// One measured setting of a scenario.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub label: &'static str,
    /// File-name-friendly label, for the generated proxy configs.
    pub slug: &'static str,
    pub proto: Proto,
    pub kind: CaseKind,
}

#[derive(Debug, Clone, Copy)]
pub enum CaseKind {
    Throughput { streams: usize, upload: bool },
    Rr { conns: usize },
    PingPong,
    Churn { clients: usize },
    Idle,
    UdpRr { clients: usize, window: usize },
    UdpPingPong,
}

/// The backend of one run.
pub enum Backend {
    Tcp(TcpBackend),
    Udp(UdpBackend),
}

impl Backend {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Backend::Tcp(b) => b.addr(),
            Backend::Udp(b) => b.addr(),
        }
    }

    /// Bytes a TCP backend has read (0 for UDP).
    pub fn received(&self) -> u64 {
        match self {
            Backend::Tcp(b) => b.received(),
            Backend::Udp(_) => 0,
        }
    }
}

/// Settings every case reads.
#[derive(Debug, Clone)]
pub struct Settings {
    pub seconds: f64,
    pub warmup: Duration,
    /// Connections the idle scenario holds (10,000 unless the descriptor limit is lower).
    pub idle_conns: usize,
    /// socat forks a process per connection; the idle scenario holds fewer through it.
    pub socat_idle_conns: usize,
}

impl Case {
    pub fn backend(&self) -> io::Result<Backend> {
        let tcp = |mode| TcpBackend::start(mode).map(Backend::Tcp);
        match self.kind {
            CaseKind::Throughput { upload: true, .. } => tcp(Mode::Sink),
            CaseKind::Throughput { upload: false, .. } => tcp(Mode::Source),
            CaseKind::Rr { .. } | CaseKind::PingPong | CaseKind::Idle => tcp(Mode::Echo),
            CaseKind::Churn { .. } => tcp(Mode::EchoClose(MESSAGE)),
            CaseKind::UdpRr { .. } | CaseKind::UdpPingPong => UdpBackend::start().map(Backend::Udp),
        }
    }

    /// Runs the load against `under` and returns the figures of this run.
    pub fn run(&self, under: &Under) -> Result<Metrics, String> {
        match self.kind {
            CaseKind::Throughput { streams, upload } => throughput::run(under, streams, upload),
            CaseKind::Rr { conns } => rr::run_many(under, conns),
            CaseKind::PingPong => rr::run_pingpong(under),
            CaseKind::Churn { clients } => churn::run(under, clients),
            CaseKind::Idle => idle::run(under),
            CaseKind::UdpRr { clients, window } => udp::run_many(under, clients, window),
            CaseKind::UdpPingPong => udp::run_pingpong(under),
        }
    }
}

/// What a load sees of one run: the target, its backend, the settings.
pub struct Under<'a> {
    pub target: &'a Running,
    pub backend: &'a Backend,
    pub settings: &'a Settings,
}

impl Under<'_> {
    /// Where clients connect: the proxy's listener, or the backend for `direct`.
    pub fn addr(&self) -> SocketAddr {
        self.target.addr
    }

    /// A fresh set of flags for one load, with its hard deadline.
    pub fn flags(&self) -> Flags {
        Flags {
            measuring: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            deadline: Instant::now()
                + self.settings.warmup
                + Duration::from_secs_f64(self.settings.seconds)
                + Duration::from_secs(5),
        }
    }

    /// Warms up, then opens the window for `--seconds`, reading `count` and the proxy's CPU at
    /// both ends. Sets `stop` when done; the load threads are the caller's to join.
    pub fn measure(&self, flags: &Flags, count: impl Fn() -> u64) -> Window {
        std::thread::sleep(self.settings.warmup);
        let (c0, cpu0, t0) = (count(), self.target.cpu_seconds(), Instant::now());
        flags.measuring.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs_f64(self.settings.seconds));
        flags.measuring.store(false, Ordering::Relaxed);
        let (c1, cpu1, t1) = (count(), self.target.cpu_seconds(), Instant::now());
        flags.stop.store(true, Ordering::Relaxed);
        Window {
            wall: (t1 - t0).as_secs_f64(),
            cpu: cpu0.zip(cpu1).map(|(a, b)| (b - a).max(0.0)),
            count: c1.saturating_sub(c0),
        }
    }
}

/// Shared by the orchestrator and the load threads of one run.
pub struct Flags {
    /// Latency samples are recorded only while this is set.
    pub measuring: AtomicBool,
    pub stop: AtomicBool,
    deadline: Instant,
}

impl Flags {
    /// Whether a load loop should go on.
    pub fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    pub fn measuring(&self) -> bool {
        self.measuring.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What one measuring window saw.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub wall: f64,
    /// Proxy CPU seconds in the window; `None` for `direct`.
    pub cpu: Option<f64>,
    pub count: u64,
}

impl Window {
    pub fn rate(&self) -> f64 {
        if self.wall > 0.0 {
            self.count as f64 / self.wall
        } else {
            0.0
        }
    }

    /// Adds the proxy's CPU % of one core and its CPU microseconds per `units` of work.
    pub fn add_cpu(&self, m: &mut Metrics, per_unit_key: &'static str, units: f64) {
        if let Some(cpu) = self.cpu {
            if self.wall > 0.0 {
                m.insert("cpu_pct", 100.0 * cpu / self.wall);
            }
            if units > 0.0 {
                m.insert(per_unit_key, cpu * 1e6 / units);
            }
        }
    }
}

/// p50/p99/p99.9 of `lat` into `m` (nothing when there were no samples).
pub fn add_percentiles(m: &mut Metrics, lat: &mut crate::stats::Latencies) {
    if let Some(p) = lat.percentiles_us(&[50.0, 99.0, 99.9]) {
        m.insert("p50", p[0]);
        m.insert("p99", p[1]);
        m.insert("p999", p[2]);
    }
}

/// A 64-byte message carrying `seq` (first 8 bytes) and a fixed pattern, so a reply can be
/// checked byte for byte.
pub fn message(seq: u64) -> [u8; MESSAGE] {
    let mut m = [0u8; MESSAGE];
    m[..8].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in m[8..].iter_mut().enumerate() {
        *b = (seq as u8).wrapping_add(i as u8).wrapping_mul(31);
    }
    m
}
