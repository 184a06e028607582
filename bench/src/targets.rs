//! The things a scenario runs against: `direct` (the backend itself), `sluice`, and, when
//! installed, `haproxy`, `nginx` (stream module) and `socat`. `sluice-bp` and `haproxy-bp` are
//! the same two proxies with busy polling on (`busy_poll 200us`; haproxy's `busy-polling`),
//! which trades CPU for the latency of waking a sleeping CPU. `sluice-scrape` is `sluice` with its
//! admin endpoint on and a scraper fetching `/metrics` every 100 ms for as long as it runs: what
//! being watched by Prometheus costs the data path.
//!
//! Each run starts a fresh proxy process with one listener on a free 127.0.0.1 port forwarding to
//! the case's backend, written as a generated config under `bench/out/<kind>/`, waits until it
//! answers, and stops it (SIGTERM, then SIGKILL for the whole process tree) afterwards. Every
//! listener binds 127.0.0.1 explicitly: socat is given `bind=127.0.0.1`, which the usual
//! `TCP-LISTEN:P` form leaves out (it would listen on every address).
//!
//! The proxy is pinned to the proxy CPU with `taskset -c`, or, without taskset, by setting the
//! affinity between fork and exec; its stdout and stderr go to `bench/out/<kind>/<kind>.log`.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{procfs, sys};

/// How long a proxy may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a proxy may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// Pipes `haproxy-splice` may use (`maxpipes`): plenty for the throughput streams.
const HAPROXY_PIPES: u64 = 1024;
/// Where Debian's `libnginx-mod-stream` puts the stream module.
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Sluice,
    /// The `--baseline` binary, as `sluice` is run.
    SluiceBase,
    SluiceBusy,
    /// sluice with `-w 2`: two workers sharing the listening ports.
    SluiceWorkers,
    /// sluice with `admin` on, scraped every 100 ms.
    SluiceScraped,
    /// sluice with 100 access rules and per-client limits that let the bench through.
    SluiceAcl,
    /// sluice with `splice on` (every direction through kernel pipes), pipes of the default size.
    SluiceSplice,
    /// `splice on` with `splice_pipe_size 64k` (the kernel's own size).
    SluiceSpliceSmall,
    /// `splice on` with `splice_pipe_size 1m`.
    SluiceSpliceBig,
    /// sluice with `splice off`: the copy path only (plain `sluice` is `splice auto`).
    SluiceCopy,
    /// sluice with `pool 16`: connections to the backend opened before clients come.
    SluicePool,
    Haproxy,
    HaproxyBusy,
    /// haproxy with `option splice-request` and `option splice-response`.
    HaproxySplice,
    Nginx,
    Socat,
}

impl Kind {
    pub const ALL: [Kind; 17] = [
        Kind::Direct,
        Kind::Sluice,
        Kind::SluiceBase,
        Kind::SluiceBusy,
        Kind::SluiceWorkers,
        Kind::SluiceScraped,
        Kind::SluiceAcl,
        Kind::SluiceSplice,
        Kind::SluiceSpliceSmall,
        Kind::SluiceSpliceBig,
        Kind::SluiceCopy,
        Kind::SluicePool,
        Kind::Haproxy,
        Kind::HaproxyBusy,
        Kind::HaproxySplice,
        Kind::Nginx,
        Kind::Socat,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Sluice => "sluice",
            Kind::SluiceBase => "sluice-base",
            Kind::SluiceBusy => "sluice-bp",
            Kind::SluiceWorkers => "sluice-w2",
            Kind::SluiceScraped => "sluice-scrape",
            Kind::SluiceAcl => "sluice-acl",
            Kind::SluiceSplice => "sluice-splice",
            Kind::SluiceSpliceSmall => "sluice-splice-64k",
            Kind::SluiceSpliceBig => "sluice-splice-1m",
            Kind::SluiceCopy => "sluice-copy",
            Kind::SluicePool => "sluice-pool",
            Kind::Haproxy => "haproxy",
            Kind::HaproxyBusy => "haproxy-bp",
            Kind::HaproxySplice => "haproxy-splice",
            Kind::Nginx => "nginx",
            Kind::Socat => "socat",
        }
    }

    /// The same proxy with busy polling on.
    fn busy(self) -> bool {
        matches!(self, Kind::SluiceBusy | Kind::HaproxyBusy)
    }

    fn is_sluice(self) -> bool {
        matches!(
            self,
            Kind::Sluice
                | Kind::SluiceBase
                | Kind::SluiceBusy
                | Kind::SluiceWorkers
                | Kind::SluiceScraped
                | Kind::SluiceAcl
                | Kind::SluiceSplice
                | Kind::SluiceSpliceSmall
                | Kind::SluiceSpliceBig
                | Kind::SluiceCopy
                | Kind::SluicePool
        )
    }

    fn is_haproxy(self) -> bool {
        matches!(
            self,
            Kind::Haproxy | Kind::HaproxyBusy | Kind::HaproxySplice
        )
    }

    /// The config lines that set how a listener moves its bytes.
    fn splice(self) -> (&'static str, &'static str) {
        match self {
            Kind::SluiceSplice => ("", "    splice on;\n"),
            Kind::SluiceSpliceSmall => ("splice_pipe_size 64k;\n", "    splice on;\n"),
            Kind::SluiceSpliceBig => ("splice_pipe_size 1m;\n", "    splice on;\n"),
            Kind::SluiceCopy => ("", "    splice off;\n"),
            _ => ("", ""),
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// What every target start needs to know about this bench run.
#[derive(Debug, Clone)]
pub struct Env {
    pub sluice: PathBuf,
    /// Another sluice binary (`--baseline`), run as `sluice-base` on the default config, so a
    /// change is measured against the code before it in one run.
    pub baseline: Option<PathBuf>,
    pub out: PathBuf,
    /// CPUs the proxy is pinned to; `None`: not pinned (one CPU only).
    pub proxy_cpus: Option<Vec<usize>>,
    pub taskset: Option<PathBuf>,
    /// The most connections one run holds open at once (idle scenario), to size proxy limits.
    pub max_conns: usize,
    /// The descriptor limit proxies inherit from the bench (its hard limit): haproxy refuses to
    /// start when its `maxconn` needs more, nginx warns.
    pub nofile: u64,
}

/// The first executable called `name` on `PATH` (plus the sbin directories, where Debian puts
/// haproxy and nginx while a non-root `PATH` may leave them out).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Whether `kind` can run here; `Err` says why not.
pub fn available(kind: Kind, env: &Env) -> Result<(), String> {
    match kind {
        Kind::Direct => Ok(()),
        Kind::SluiceBase => match &env.baseline {
            Some(path) if path.is_file() => Ok(()),
            Some(path) => Err(format!("{} not found", path.display())),
            None => Err("no --baseline binary given".to_string()),
        },
        k if k.is_sluice() && env.sluice.is_file() => Ok(()),
        Kind::Haproxy | Kind::HaproxyBusy | Kind::HaproxySplice => which("haproxy")
            .map(|_| ())
            .ok_or_else(|| "not installed".to_string()),
        Kind::Socat => which("socat")
            .map(|_| ())
            .ok_or_else(|| "not installed".to_string()),
        Kind::Nginx => {
            let nginx = which("nginx").ok_or_else(|| "not installed".to_string())?;
            if Path::new(NGINX_STREAM_MODULE).is_file() || nginx_has_static_stream(&nginx) {
                Ok(())
            } else {
                Err("stream module missing (libnginx-mod-stream)".to_string())
            }
        }
        // A sluice target whose binary is missing.
        _ => Err(format!(
            "{} not found (cargo build --release)",
            env.sluice.display()
        )),
    }
}

/// `nginx -V` lists `--with-stream` when the module is built in (not `=dynamic`).
fn nginx_has_static_stream(nginx: &Path) -> bool {
    Command::new(nginx)
        .arg("-V")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stderr).into_owned();
            text.split_whitespace().any(|w| w == "--with-stream")
        })
        .unwrap_or(false)
}

/// A free port on 127.0.0.1 for `proto` (bound, read, released: another process could take it
/// in between, which only makes that run fail to start).
fn free_port(proto: Proto) -> io::Result<u16> {
    Ok(match proto {
        Proto::Tcp => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        Proto::Udp => UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port(),
    })
}

/// A target answering on `addr`. For `direct` there is no process.
pub struct Running {
    pub kind: Kind,
    pub addr: SocketAddr,
    child: Option<Child>,
    scraper: Option<Scraper>,
}

/// Fetches `/metrics` from a sluice admin endpoint every 100 ms until dropped.
struct Scraper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scraper {
    fn start(admin: SocketAddr) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            // Bounded: a run lasts seconds; this is an upper limit, not the expected count.
            for _ in 0..100_000 {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                let _ = scrape(admin);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Scraper {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One `GET /metrics`, read to the end.
fn scrape(admin: SocketAddr) -> io::Result<usize> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\n\r\n").as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out.len())
}

impl Running {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// CPU seconds of the proxy's process tree so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        procfs::tree_cpu_seconds(self.pid()?)
    }

    /// Resident bytes of the proxy's process tree, and how many processes that is.
    pub fn rss(&self) -> Option<(u64, usize)> {
        procfs::tree_rss_bytes(self.pid()?)
    }

    /// Stops the proxy and every process it started.
    pub fn stop(mut self) {
        drop(self.scraper.take());
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        let kids = procfs::descendants(pid);
        let _ = sys::kill(pid, sys::SIGTERM);
        for &kid in &kids {
            let _ = sys::kill(kid, sys::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Forked children (socat) outlive their parent unless told to go.
        for kid in kids {
            let _ = sys::kill(kid, sys::SIGKILL);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `kind` forwarding `proto` from a fresh 127.0.0.1 port to `backend`. `label` names the
/// generated config file.
pub fn start(
    kind: Kind,
    env: &Env,
    label: &str,
    proto: Proto,
    backend: SocketAddr,
) -> Result<Running, String> {
    if kind == Kind::Direct {
        return Ok(Running {
            kind,
            addr: backend,
            child: None,
            scraper: None,
        });
    }
    if kind.is_haproxy() && proto == Proto::Udp {
        return Err("n/a: haproxy does not proxy UDP".to_string());
    }
    let port = free_port(proto).map_err(|e| format!("no free port: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let dir = env.out.join(kind.name());
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let conf = dir.join(format!("{label}.conf"));
    let admin = match kind {
        Kind::SluiceScraped => {
            let port = free_port(Proto::Tcp).map_err(|e| format!("no free port: {e}"))?;
            Some(SocketAddr::from(([127, 0, 0, 1], port)))
        }
        _ => None,
    };
    let (program, args) = command(kind, env, &dir, &conf, proto, port, backend, admin)?;

    let log_path = dir.join(format!("{}.log", kind.name()));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut log_err = log.try_clone().map_err(|e| e.to_string())?;
    let _ = writeln!(log_err, "== sluice-bench: {label} on {addr}");
    let mut cmd = match (&env.taskset, &env.proxy_cpus) {
        (Some(taskset), Some(cpus)) => {
            let mut c = Command::new(taskset);
            c.arg("-c").arg(cpu_list(cpus)).arg(&program);
            c
        }
        (None, Some(cpus)) => {
            let mut c = Command::new(&program);
            sys::pin_command(&mut c, cpus);
            c
        }
        (_, None) => Command::new(&program),
    };
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let mut running = Running {
        kind,
        addr,
        child: Some(child),
        scraper: None,
    };
    if let Err(e) = wait_ready(&mut running, proto) {
        let tail = log_tail(&log_path);
        running.stop();
        return Err(format!("{e}; log {}: {tail}", log_path.display()));
    }
    if let Some(admin) = admin {
        scrape(admin).map_err(|e| format!("admin endpoint {admin}: {e}"))?;
        running.scraper = Some(Scraper::start(admin));
    }
    Ok(running)
}

fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Writes the config for `kind` (where it has one) and returns the program and its arguments.
#[allow(clippy::too_many_arguments)]
fn command(
    kind: Kind,
    env: &Env,
    dir: &Path,
    conf: &Path,
    proto: Proto,
    port: u16,
    backend: SocketAddr,
    admin: Option<SocketAddr>,
) -> Result<(PathBuf, Vec<String>), String> {
    let write =
        |text: String| fs::write(conf, text).map_err(|e| format!("{}: {e}", conf.display()));
    let conf_arg = conf.display().to_string();
    match kind {
        Kind::Direct => Err("direct has no process".to_string()),
        k if k.is_sluice() => {
            let mut text = sluice_config(proto, port, backend, env.max_conns, kind.busy());
            let (main, listen) = kind.splice();
            if proto == Proto::Tcp {
                text = text.replacen("log_level", &format!("{main}log_level"), 1);
                text = text.replacen("    proxy ", &format!("{listen}    proxy "), 1);
            }
            if let Some(admin) = admin {
                text.push_str(&format!("admin {admin};\n"));
            }
            if kind == Kind::SluiceAcl {
                text = with_access_rules(&text, proto, env.max_conns);
            }
            if kind == Kind::SluicePool && proto == Proto::Tcp {
                let block =
                    format!("upstream bench {{\n    server {backend};\n    pool 16;\n}}\n\n");
                text = text.replacen(&format!("proxy {backend};"), "proxy bench;", 1);
                text = text.replacen("\nlisten ", &format!("\n{block}listen "), 1);
            }
            write(text)?;
            let mut args = vec!["-c".into(), conf_arg];
            if kind == Kind::SluiceWorkers {
                args.extend(["-w".into(), "2".into()]);
            }
            let binary = match (kind, &env.baseline) {
                (Kind::SluiceBase, Some(path)) => path.clone(),
                _ => env.sluice.clone(),
            };
            Ok((binary, args))
        }
        Kind::Haproxy | Kind::HaproxyBusy | Kind::HaproxySplice => {
            let splicing = kind == Kind::HaproxySplice;
            // Each pipe is two more descriptors, which haproxy counts against the limit at start.
            let nofile = match splicing {
                true => env.nofile.saturating_sub(2 * HAPROXY_PIPES),
                false => env.nofile,
            };
            let mut text = haproxy_config(port, backend, env.max_conns, nofile, kind.busy());
            if splicing {
                // Forced both ways, as `splice on` is.
                text = text.replacen(
                    "    nbthread 1\n",
                    &format!("    nbthread 1\n    maxpipes {HAPROXY_PIPES}\n"),
                    1,
                );
                text.push_str("    option splice-request\n    option splice-response\n");
            }
            write(text)?;
            let program = which("haproxy").ok_or("haproxy not installed")?;
            Ok((program, vec!["-db".into(), "-f".into(), conf_arg]))
        }
        Kind::Nginx => {
            write(nginx_config(
                dir,
                proto,
                port,
                backend,
                env.max_conns,
                env.nofile,
            ))?;
            let program = which("nginx").ok_or("nginx not installed")?;
            let prefix = format!("{}/", dir.display());
            let error_log = dir.join("error.log").display().to_string();
            let args = vec![
                "-p".into(),
                prefix,
                "-e".into(),
                error_log,
                "-c".into(),
                conf_arg,
            ];
            Ok((program, args))
        }
        Kind::Socat => {
            let program = which("socat").ok_or("socat not installed")?;
            let (listen, connect) = match proto {
                Proto::Tcp => ("TCP-LISTEN", "TCP"),
                Proto::Udp => ("UDP-LISTEN", "UDP"),
            };
            let args = vec![
                format!("{listen}:{port},fork,reuseaddr,bind=127.0.0.1"),
                format!("{connect}:{backend}"),
            ];
            Ok((program, args))
        }
        other => Err(format!("{} has no command", other.name())),
    }
}

/// `text` with 100 rules in the listen block (98 that never match the bench's 127.0.0.1, then
/// `allow 127.0.0.0/8;` and `deny all;`) and per-client limits the bench stays under.
fn with_access_rules(text: &str, proto: Proto, max_conns: usize) -> String {
    let mut rules = String::new();
    for i in 0..98u32 {
        rules.push_str(&format!("    deny 10.{}.{}.0/24;\n", i / 256, i % 256));
    }
    rules.push_str("    allow 127.0.0.0/8;\n    deny all;\n");
    let per_ip = match proto {
        Proto::Tcp => format!("    max_connections_per_ip {};\n", max_conns + 1000),
        Proto::Udp => format!("    max_sessions_per_ip {};\n", max_conns + 1000),
    };
    rules.push_str(&per_ip);
    rules.push_str("    rate_per_ip 1000000/s;\n");
    text.replacen("    proxy ", &format!("{rules}    proxy "), 1)
}

fn sluice_config(
    proto: Proto,
    port: u16,
    backend: SocketAddr,
    max_conns: usize,
    busy: bool,
) -> String {
    let listen = match proto {
        Proto::Tcp => "listen",
        Proto::Udp => "listen udp",
    };
    format!(
        "# Generated by sluice-bench; overwritten on every run.\n\
         max_connections {max};\n\
         buffer_size 16k;\n\
         busy_poll {busy_poll};\n\
         log_level warn;\n\
         access_log off;\n\n\
         {listen} 127.0.0.1:{port} {{\n    proxy {backend};\n}}\n",
        max = max_conns + 1000,
        busy_poll = if busy { "200us" } else { "off" },
    )
}

fn haproxy_config(
    port: u16,
    backend: SocketAddr,
    max_conns: usize,
    nofile: u64,
    busy: bool,
) -> String {
    // haproxy wants two descriptors per connection plus a few of its own, all within the limit.
    let fit = (nofile.saturating_sub(64) / 2) as usize;
    format!(
        "# Generated by sluice-bench; overwritten on every run.\n\
         global\n    nbthread 1\n    maxconn {max}\n{busy}\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 10m\n    timeout server 10m\n\n\
         listen bench\n    bind 127.0.0.1:{port}\n    server backend {backend}\n",
        max = (max_conns + 100).min(fit),
        busy = if busy { "    busy-polling\n" } else { "" },
    )
}

fn nginx_config(
    dir: &Path,
    proto: Proto,
    port: u16,
    backend: SocketAddr,
    max_conns: usize,
    nofile: u64,
) -> String {
    let load = if Path::new(NGINX_STREAM_MODULE).is_file() {
        format!("load_module {NGINX_STREAM_MODULE};\n")
    } else {
        String::new()
    };
    let (udp, timeout) = match proto {
        Proto::Tcp => ("", "10m"),
        Proto::Udp => (" udp", "30s"),
    };
    // Each proxied connection costs two descriptors and two worker_connections; asking for more
    // descriptors than the inherited limit only earns a warning, so stay within it.
    let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
    let conns = (2 * max_conns + 200).min(nofile.saturating_sub(100));
    format!(
        "# Generated by sluice-bench; overwritten on every run.\n\
         {load}worker_processes 1;\n\
         daemon off;\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\n\
         worker_rlimit_nofile {nofile};\n\n\
         events {{\n    worker_connections {conns};\n}}\n\n\
         stream {{\n    server {{\n        listen 127.0.0.1:{port}{udp};\n        \
         proxy_pass {backend};\n        proxy_timeout {timeout};\n    }}\n}}\n",
        dir = dir.display(),
    )
}

/// Waits until the proxy answers on its port, or fails early if it exits.
fn wait_ready(running: &mut Running, proto: Proto) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(child) = running.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "{} exited at start ({status})",
                    running.kind.name()
                ));
            }
        }
        let ok = match proto {
            Proto::Tcp => {
                TcpStream::connect_timeout(&running.addr, Duration::from_millis(200)).is_ok()
            }
            Proto::Udp => udp_answers(running.addr),
        };
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} did not answer on {} within {:?}",
                running.kind.name(),
                running.addr,
                START_TIMEOUT
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One datagram through the proxy to the echo backend and back.
fn udp_answers(addr: SocketAddr) -> bool {
    let probe = || -> io::Result<bool> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        socket.send(b"sluice-bench probe")?;
        let mut buf = [0u8; 64];
        Ok(socket.recv(&mut buf).is_ok_and(|n| n > 0))
    };
    probe().unwrap_or(false)
}

/// The last few lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    if tail.is_empty() {
        "(empty)".to_string()
    } else {
        tail.join(" | ")
    }
}
