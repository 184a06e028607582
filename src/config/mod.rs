//! Typed configuration: what a config file (or the command line) asks sluice to do.
//!
//! The lexer turns text into tokens that carry `line:col`; the parser turns tokens into the
//! types below and validates them. A `Config` that exists is valid: every listener names an
//! upstream that exists, every upstream has at least one server, every value is in range.
//! Nothing here touches a socket; host names are resolved once, when the file is loaded.

mod addr;
mod cidr;
mod error;
mod lexer;
mod parse;

pub use addr::listen_addr;
pub use cidr::{bits_of, unmapped, Cidr};
pub use error::ConfigError;
pub use lexer::{Lexer, Token, TokenKind};
pub use parse::{parse_duration, parse_size};

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// A listener: its position among the config's `listen` blocks. Every table of listeners (the
/// worker's parts, the metrics) is reached through it and a lookup can miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub usize);

/// An upstream: its position in `Config::upstreams`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamId(pub usize);

/// A server of one upstream: its position in that upstream's servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(pub usize);

/// Four times the kernel's own pipe size: in the `throughput` bench scenario one bulk stream
/// spliced through 256 KiB pipes cost 0.44-0.58x the copy path's CPU per GB, through 64 KiB
/// pipes 0.58-0.89x; 1 MiB pipes saved a little more but pin four times the kernel memory each
/// when full (bench/RESULTS.md, 2026-12-02).
pub const DEFAULT_PIPE_SIZE: usize = 256 * 1024;

/// Default path of the config file when `-c` is not given.
pub const DEFAULT_PATH: &str = "/etc/sluice/sluice.conf";

/// The whole configuration of one sluice process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// All listeners together (main context `max_connections`).
    pub max_connections: usize,
    /// Size of one pooled buffer (`buffer_size`), per direction, per pair, only while bytes are in flight.
    pub buffer_size: usize,
    /// Hard cap on the memory of all pooled buffers of a worker (`buffer_memory`).
    pub buffer_memory: usize,
    /// How long the worker keeps polling without sleeping after its last event (`busy_poll`);
    /// zero means off, the default.
    pub busy_poll: Duration,
    /// Worker threads (`workers N|auto`; `auto` is resolved to the CPUs the process may use).
    pub workers: usize,
    /// How long a stop waits for open connections to finish (`shutdown_timeout`).
    pub shutdown_timeout: Duration,
    pub log_level: log::LevelFilter,
    pub access_log: bool,
    pub upstreams: Vec<Upstream>,
    pub listeners: Vec<Listen>,
    /// The admin endpoint (`admin ADDR;`), if any.
    pub admin: Option<Admin>,
    /// `allow`/`deny` of the main context: the rules of every listener that has none.
    pub access: Vec<AccessRule>,
    /// Clients each worker keeps per-client state for (`per_ip_table_size`).
    pub per_ip_table_size: usize,
    /// Where host names are looked up (`resolver`).
    pub resolver: Resolver,
    /// Bytes of each kernel pipe a splicing direction uses (`splice_pipe_size`).
    pub splice_pipe_size: usize,
    /// Pipes each worker lends at once (`max_pipes`; 0 splices nothing); `None`: as many as
    /// `buffer_memory` would hold of `splice_pipe_size`, and at most a quarter of the
    /// descriptor limit shared by the workers.
    pub max_pipes: Option<usize>,
}

/// `resolver ADDR... [valid=T];`: the nameservers host names are looked up at, and the longest
/// a re-resolved (`resolve`) name's answer is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolver {
    /// Empty: the nameservers of `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    /// An answer's TTL, capped at this.
    pub valid: Duration,
}

impl Default for Resolver {
    fn default() -> Resolver {
        Resolver {
            nameservers: Vec::new(),
            valid: Duration::from_secs(30),
        }
    }
}

/// One `allow` or `deny` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessRule {
    pub allow: bool,
    /// `None`: `all`.
    pub range: Option<Cidr>,
}

impl std::fmt::Display for AccessRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.allow { "allow" } else { "deny" };
        match self.range {
            None => write!(f, "{verb} all"),
            // A one-address range reads as the address, as it was most likely written.
            Some(r) if u32::from(r.prefix()) == if r.is_ipv4() { 32 } else { 128 } => {
                let shown = r.to_string();
                write!(f, "{verb} {}", shown.split('/').next().unwrap_or(&shown))
            }
            Some(r) => write!(f, "{verb} {r}"),
        }
    }
}

/// The `admin` directive: where the admin endpoint listens and who may use it.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub addr: SocketAddr,
    /// Empty: every client that can reach the address (a loopback one; any other needs a list).
    pub allow: Vec<Cidr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One `listen` block.
#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    pub proto: Proto,
    pub addr: SocketAddr,
    /// The upstream it proxies to. `proxy ADDR;` creates an upstream named after the address text.
    pub upstream: UpstreamId,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Applies once one direction of a TCP pair has finished.
    pub half_close_timeout: Duration,
    /// Connect attempts in all (already resolved: the config's 0/absent means the number of servers).
    pub next_upstream_tries: u32,
    /// `next_upstream_tries` was written (not 0): a change of server count leaves it alone.
    pub tries_written: bool,
    /// `None`: no limit beyond the tries.
    pub next_upstream_timeout: Option<Duration>,
    /// UDP: replies per session before it closes; 0 = unlimited.
    pub udp_responses: u32,
    /// UDP: sessions at once on this listener; 0 = unlimited.
    pub max_sessions: usize,
    /// `allow`/`deny`, in order (the main context's when the block has none).
    pub access: Vec<AccessRule>,
    /// TCP: connections at once on this listener; 0 = unlimited.
    pub max_connections: usize,
    /// TCP: connections at once per client address; 0 = unlimited.
    pub max_connections_per_ip: u32,
    /// UDP: sessions at once per client address; 0 = unlimited.
    pub max_sessions_per_ip: u32,
    /// New connections (or sessions) per second per client, and the burst.
    pub rate_per_ip: Option<(u32, u32)>,
    /// TCP: bytes per second per connection and direction; 0 = unlimited.
    pub limit_rate: u64,
    /// TCP: bytes each direction moves at full speed before `limit_rate` applies.
    pub limit_rate_after: u64,
    /// `proxy_protocol v1|v2`: the header sent to servers (a server's own option wins).
    pub proxy_protocol: Option<ProxyVersion>,
    /// UDP with `proxy_protocol v2`: which datagrams carry the header.
    pub proxy_protocol_udp: UdpHeaders,
    /// `accept_proxy_protocol on`: clients start with a PROXY header.
    pub accept_proxy_protocol: bool,
    /// How long a client may take to send its whole header.
    pub proxy_protocol_timeout: Duration,
    /// The peers that may send a header; empty: any peer.
    pub proxy_protocol_trusted: Vec<Cidr>,
    /// TCP: `so_keepalive` on both sockets of each pair.
    pub so_keepalive: Option<Keepalive>,
    /// TCP: `sni NAME UPSTREAM;` in order: a name (lower case, no trailing dot) or `*.suffix`.
    pub sni_routes: Vec<(String, UpstreamId)>,
    /// `sni_default`: for no SNI, not TLS, or no match; `None`: close (`end=no_server`).
    pub sni_default: Option<UpstreamId>,
    /// How long a client may take to send its ClientHello.
    pub sni_timeout: Duration,
    /// TCP: whether directions move bytes through kernel pipes (`splice`).
    pub splice: Splice,
}

/// `splice auto|on|off`: `auto` copies small messages and splices bulk streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Splice {
    Off,
    On,
    Auto,
}

impl Splice {
    pub const ALL: [(&'static str, Splice); 3] = [
        ("auto", Splice::Auto),
        ("on", Splice::On),
        ("off", Splice::Off),
    ];
}

/// `so_keepalive on|IDLE:INTERVAL:COUNT` (nginx's form; an empty field keeps the system's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keepalive {
    /// Idle time before the first probe (`TCP_KEEPIDLE`).
    pub idle: Option<Duration>,
    /// Between probes (`TCP_KEEPINTVL`).
    pub interval: Option<Duration>,
    /// Probes unanswered before the connection is dropped (`TCP_KEEPCNT`).
    pub count: Option<u32>,
}

/// One `upstream` block (or the implicit group of `proxy ADDR;` and of `-U`).
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub balance: Balance,
    pub servers: Vec<Server>,
    pub health_check: Option<HealthCheck>,
    /// `pool N [idle=T]`: connections each worker keeps open to each available server.
    pub pool: Option<SparePool>,
}

/// Pre-connected spares of an upstream (`pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparePool {
    /// Spares per server, per worker.
    pub size: u32,
    /// A spare not taken within this is closed and replaced (servers close idle connections).
    pub idle: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    WeightedRoundRobin,
    LeastConn,
    Random,
    IpHash,
    Hash,
}

impl Balance {
    pub const ALL: [(&'static str, Balance); 6] = [
        ("round_robin", Balance::RoundRobin),
        ("weighted_round_robin", Balance::WeightedRoundRobin),
        ("least_conn", Balance::LeastConn),
        ("random", Balance::Random),
        ("ip_hash", Balance::IpHash),
        ("hash", Balance::Hash),
    ];

    pub fn from_name(name: &str) -> Option<Balance> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, b)| *b == self)
            .map_or("round_robin", |(n, _)| n)
    }
}

/// One `server` line. A host name that resolves to several addresses gives one `Server` each.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub addr: SocketAddr,
    /// 1..=1000
    pub weight: u32,
    /// 0 = unlimited
    pub max_conns: u32,
    /// 0 disables passive health.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub backup: bool,
    pub down: bool,
    /// `proxy_protocol=v1|v2|off`: the header this server gets, over the listener's choice
    /// (`None`: as the listener says; `Some(None)`: none, whatever the listener says).
    pub proxy_protocol: Option<Option<ProxyVersion>>,
    /// The host name this server came from, when the line says `resolve`: re-resolved while
    /// running, with every server of the same name and port in the upstream.
    pub resolve: Option<String>,
}

/// A PROXY protocol version (`proxy_protocol v1|v2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

/// When a UDP listener with `proxy_protocol v2` prepends the header (`proxy_protocol_udp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpHeaders {
    /// To the first datagram of each session only.
    First,
    /// To every datagram (the default: a server that lost its state still learns the client).
    Every,
}

impl Server {
    pub fn new(addr: SocketAddr) -> Server {
        Server {
            addr,
            weight: 1,
            max_conns: 0,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            backup: false,
            down: false,
            proxy_protocol: None,
            resolve: None,
        }
    }
}

/// `health_check interval=5s timeout=2s rise=2 fall=3 [send="..."] [expect="..."]`
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Bytes written once connected (escapes already decoded); empty = connect only.
    pub send: Vec<u8>,
    /// The reply must start with these bytes; empty = any reply (or none) will do.
    pub expect: Vec<u8>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
            send: Vec::new(),
            expect: Vec::new(),
        }
    }
}

/// Most worker threads: far more than the CPUs of any box sluice is for.
pub const MAX_WORKERS: usize = 256;

/// `auto` workers: one per CPU the process may run on.
pub fn auto_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WORKERS)
}

pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;

impl Default for Config {
    fn default() -> Self {
        Config {
            max_connections: 10_000,
            buffer_size: 16 * 1024,
            buffer_memory: 64 * 1024 * 1024,
            busy_poll: Duration::ZERO,
            workers: 1,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            log_level: log::LevelFilter::Info,
            access_log: true,
            upstreams: Vec::new(),
            listeners: Vec::new(),
            admin: None,
            access: Vec::new(),
            per_ip_table_size: 100_000,
            resolver: Resolver::default(),
            splice_pipe_size: DEFAULT_PIPE_SIZE,
            max_pipes: None,
        }
    }
}

impl Listen {
    /// A listener with every setting at its default, proxying to upstream `upstream`.
    pub fn new(proto: Proto, addr: SocketAddr, upstream: UpstreamId, servers: usize) -> Listen {
        Listen {
            proto,
            addr,
            upstream,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: match proto {
                Proto::Tcp => DEFAULT_TCP_IDLE_TIMEOUT,
                Proto::Udp => DEFAULT_UDP_IDLE_TIMEOUT,
            },
            half_close_timeout: match proto {
                Proto::Tcp => DEFAULT_TCP_IDLE_TIMEOUT,
                Proto::Udp => DEFAULT_UDP_IDLE_TIMEOUT,
            },
            next_upstream_tries: servers.max(1) as u32,
            tries_written: false,
            next_upstream_timeout: None,
            udp_responses: 0,
            max_sessions: DEFAULT_MAX_SESSIONS,
            access: Vec::new(),
            max_connections: 0,
            max_connections_per_ip: 0,
            max_sessions_per_ip: 0,
            rate_per_ip: None,
            limit_rate: 0,
            limit_rate_after: 0,
            proxy_protocol: None,
            proxy_protocol_udp: UdpHeaders::Every,
            accept_proxy_protocol: false,
            proxy_protocol_timeout: Duration::from_secs(5),
            proxy_protocol_trusted: Vec::new(),
            so_keepalive: None,
            sni_routes: Vec::new(),
            sni_default: None,
            sni_timeout: Duration::from_secs(5),
            splice: Splice::Auto,
        }
    }
}

/// A server address as `server` takes it (`IP:PORT`, `[IPv6]:PORT` or `host:PORT`, the name
/// resolved now, blocking), for the command line's `-U`.
pub fn server_addrs(text: &str) -> Result<Vec<SocketAddr>, String> {
    match addr::host_port(text, "server address")? {
        addr::HostPort::Addr(a) => Ok(vec![a]),
        addr::HostPort::Name(host, port) => {
            let found = crate::resolver::resolve(host, port, &Resolver::default())
                .map_err(|e| format!("cannot resolve '{host}': {}", crate::sys::io_reason(&e)))?;
            if found.is_empty() {
                return Err(format!("cannot resolve '{host}': no addresses"));
            }
            Ok(found)
        }
    }
}

/// Whether a connection to `server` would come back to a listener on `listen`, a proxy loop
/// (a wildcard listen address stands for every address of this host).
pub fn loops_back(listen: SocketAddr, server: SocketAddr) -> bool {
    let local = match listen.ip().is_unspecified() {
        true => crate::sys::local_addresses().unwrap_or_default(),
        false => Vec::new(),
    };
    addr::reaches(listen, server, &local)
}

impl Config {
    /// Parse config text. `file` is the name used in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        parse::parse(text, file)
    }

    /// `parse` resolving no host name (a `host:PORT` is an error): for fuzzing.
    pub fn parse_without_names(text: &str, file: &str) -> Result<Config, ConfigError> {
        parse::parse_without_names(text, file)
    }

    /// Gives every listener without a written `next_upstream_tries` the default again: the
    /// server count of the largest upstream it may send a client to (after a change of servers).
    pub fn default_tries(&mut self) {
        let count = |u: UpstreamId| self.upstreams.get(u.0).map_or(1, |u| u.servers.len());
        let tries: Vec<Option<u32>> = self
            .listeners
            .iter()
            .map(|l| {
                let routes = l.sni_routes.iter().map(|(_, u)| *u).chain(l.sni_default);
                let most = routes.map(count).fold(count(l.upstream), usize::max);
                (!l.tries_written).then(|| u32::try_from(most.max(1)).unwrap_or(u32::MAX))
            })
            .collect();
        for (l, t) in self.listeners.iter_mut().zip(tries) {
            if let Some(t) = t {
                l.next_upstream_tries = t;
            }
        }
    }

    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ConfigError::io(&file, &e))?;
        let text =
            std::str::from_utf8(&bytes).map_err(|e| ConfigError::not_utf8(&file, &bytes, &e))?;
        Config::parse(text, &file)
    }

    /// What `-t` prints after `FILE: ok`: the counts, then one line per listener and upstream.
    pub fn summary(&self) -> String {
        fn plural(n: usize, one: &str) -> String {
            format!("{n} {one}{}", if n == 1 { "" } else { "s" })
        }
        let servers: usize = self.upstreams.iter().map(|u| u.servers.len()).sum();
        let mut out = format!(
            "{}, {}, {}",
            plural(self.listeners.len(), "listener"),
            plural(self.upstreams.len(), "upstream"),
            plural(servers, "server")
        );
        for l in &self.listeners {
            let upstream = self
                .upstreams
                .get(l.upstream.0)
                .map_or("?", |u| u.name.as_str());
            out.push_str(&format!(
                "\n  listen {} {} -> {}",
                l.proto.as_str(),
                l.addr,
                upstream
            ));
            let mut limits = Vec::new();
            if !l.access.is_empty() {
                limits.push(plural(l.access.len(), "access rule"));
            }
            if l.max_connections > 0 {
                limits.push(format!("max_connections {}", l.max_connections));
            }
            match (l.proto, l.max_connections_per_ip, l.max_sessions_per_ip) {
                (Proto::Tcp, n, _) | (Proto::Udp, _, n) if n > 0 => {
                    limits.push(format!("{n} at once per client"));
                }
                _ => {}
            }
            if let Some((rate, burst)) = l.rate_per_ip {
                limits.push(format!("{rate}/s per client (burst {burst})"));
            }
            if l.limit_rate > 0 {
                limits.push(format!("limit_rate {} B/s", l.limit_rate));
            }
            if l.accept_proxy_protocol {
                limits.push(match l.proxy_protocol_trusted.len() {
                    0 => "takes PROXY headers from anyone".to_string(),
                    n => format!("takes PROXY headers from {}", plural(n, "trusted range")),
                });
            }
            if let Some(v) = l.proxy_protocol {
                limits.push(format!(
                    "sends PROXY {}",
                    if v == ProxyVersion::V1 { "v1" } else { "v2" }
                ));
            }
            match (l.proto, l.splice) {
                (Proto::Tcp, Splice::On) => limits.push("splice on".to_string()),
                (Proto::Tcp, Splice::Off) => limits.push("splice off".to_string()),
                _ => {}
            }
            if !limits.is_empty() {
                out.push_str(&format!(" ({})", limits.join(", ")));
            }
        }
        if let Some(a) = &self.admin {
            out.push_str(&format!("\n  admin {}", a.addr));
            if !a.allow.is_empty() {
                out.push_str(&format!(" ({})", plural(a.allow.len(), "allowed range")));
            }
        }
        for u in &self.upstreams {
            let addrs: Vec<String> = u.servers.iter().map(|s| s.addr.to_string()).collect();
            let checked = if u.health_check.is_some() {
                ", health checked"
            } else {
                ""
            };
            let mut names: Vec<&str> = u
                .servers
                .iter()
                .filter_map(|s| s.resolve.as_deref())
                .collect();
            names.dedup();
            let mut resolved = match names.is_empty() {
                true => String::new(),
                false => format!(" (re-resolving {})", names.join(" ")),
            };
            if let Some(p) = u.pool {
                resolved.push_str(&format!(" (pool {} per server and worker)", p.size));
            }
            out.push_str(&format!(
                "\n  upstream {}: {}, {}{checked}: {}{resolved}",
                u.name,
                u.balance.name(),
                plural(u.servers.len(), "server"),
                addrs.join(" ")
            ));
        }
        out
    }

    /// The config of a command-line forward: one listener, one implicit upstream.
    pub fn forward(
        proto: Proto,
        listen: SocketAddr,
        servers: &[SocketAddr],
        balance: Balance,
    ) -> Config {
        let upstream = Upstream {
            name: "cli".to_string(),
            balance,
            servers: servers.iter().map(|a| Server::new(*a)).collect(),
            health_check: None,
            pool: None,
        };
        Config {
            upstreams: vec![upstream],
            listeners: vec![Listen::new(proto, listen, UpstreamId(0), servers.len())],
            ..Config::default()
        }
    }
}
