//! The `sluice` command: parse the command line, load or build a config, run the proxy until
//! SIGINT/SIGTERM, reload the file on SIGHUP. Exit status: 0 clean stop, 1 config or runtime
//! error, 2 usage error.

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use sluice::config::{self, Balance, Config, Proto};
use sluice::runtime::Proxy;
use sluice::sys::{Signal, SignalSet};

const USAGE: &str = "\
Usage:
  sluice [-c FILE] [-t] [-w N] [-l LEVEL]              run from a config file
  sluice -L ADDR -U ADDR [-U ADDR]... [--udp] [-b BALANCE]   forward without a file

Examples:
  sluice -L 0.0.0.0:8080 -U 127.0.0.1:80               forward TCP port 8080 to a local web server
  sluice -L 127.0.0.1:6380 -U 127.0.0.1:6379 -U 127.0.0.1:6381 -b least_conn
  sluice --udp -L 127.0.0.1:5353 -U 127.0.0.1:53       forward DNS over UDP
  sluice -t -c conf/sluice.conf                        check a config file

Signals:
  SIGHUP           reload the config file: listeners that stay keep their sockets, and
                   connections in flight keep their server; a bad file changes nothing
  SIGTERM, SIGINT  stop: close the listeners, let connections finish (shutdown_timeout),
                   then exit 0; a second one closes everything at once";

enum Mode {
    Run(Config, Option<Source>),
    Check(Config, String),
    Print(String),
}

/// Where a config came from, to read it again on SIGHUP with the same command-line overrides.
struct Source {
    path: PathBuf,
    workers: Option<usize>,
    log_level: Option<log::LevelFilter>,
}

impl Source {
    fn load(&self) -> Result<Config, config::ConfigError> {
        let mut config = Config::load(&self.path)?;
        self.apply(&mut config);
        Ok(config)
    }

    fn apply(&self, config: &mut Config) {
        if let Some(level) = self.log_level {
            config.log_level = level;
        }
        if let Some(n) = self.workers {
            config.workers = n;
        }
    }
}

/// A command-line mistake (exit 2) or a config error (exit 1).
enum Failure {
    Usage(String),
    Config(String),
}

fn options() -> getopts::Options {
    let mut o = getopts::Options::new();
    o.optopt(
        "c",
        "config",
        &format!("config file (default {})", config::DEFAULT_PATH),
        "FILE",
    );
    o.optflag(
        "t",
        "test",
        "check the config file and exit: 0 valid, 1 invalid",
    );
    o.optopt(
        "l",
        "log-level",
        "error, warn, info, debug or trace (RUST_LOG wins)",
        "LEVEL",
    );
    o.optopt(
        "w",
        "workers",
        "worker threads: a number (1-256) or auto, one per CPU (default: the config's, else 1)",
        "N",
    );
    o.optopt(
        "L",
        "listen",
        "forward without a file: address to listen on, IP:PORT, [IPv6]:PORT or PORT",
        "ADDR",
    );
    o.optmulti(
        "U",
        "upstream",
        "forward without a file: server address, IP:PORT, [IPv6]:PORT or host:PORT (repeatable)",
        "ADDR",
    );
    o.optopt(
        "b",
        "balance",
        "balancing for -U servers: round_robin, weighted_round_robin, least_conn, random, ip_hash, hash",
        "NAME",
    );
    o.optflag("", "udp", "forward UDP instead of TCP (with -L/-U)");
    o.optflag(
        "V",
        "version",
        "print the version, the git commit, rustc and target it was built from, and exit",
    );
    o.optflag("h", "help", "print this help and exit");
    o
}

/// What `-V` prints: enough to tell which source, compiler and target made this binary
/// (build.rs records them).
fn version() -> String {
    format!(
        "sluice {}\ncommit: {}\nrustc: {}\ntarget: {}",
        env!("CARGO_PKG_VERSION"),
        env!("SLUICE_GIT_COMMIT"),
        env!("SLUICE_RUSTC"),
        env!("SLUICE_TARGET"),
    )
}

fn parse_args(args: &[String]) -> Result<Mode, Failure> {
    let opts = options();
    let m = opts
        .parse(args)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if m.opt_present("h") {
        return Ok(Mode::Print(opts.usage(USAGE)));
    }
    if m.opt_present("V") {
        return Ok(Mode::Print(version()));
    }
    if let Some(extra) = m.free.first() {
        return Err(Failure::Usage(format!("unexpected argument '{}'", extra)));
    }
    // Usage errors win over config errors: check every option before reading the file.
    let log_level = match m.opt_str("l") {
        None => None,
        Some(level) => Some(level.parse().map_err(|_| {
            Failure::Usage(format!(
                "unknown log level '{}' (error, warn, info, debug, trace)",
                level
            ))
        })?),
    };
    let workers = match m.opt_str("w") {
        None => None,
        Some(text) if text == "auto" => Some(config::auto_workers()),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=config::MAX_WORKERS).contains(&n) => Some(n),
            _ => {
                return Err(Failure::Usage(format!(
                    "-w takes a number of workers from 1 to {} or 'auto', not '{}'",
                    config::MAX_WORKERS,
                    text
                )))
            }
        },
    };
    let forward = m.opt_present("L") || !m.opt_strs("U").is_empty();
    let (mut config, path) = if forward {
        if m.opt_present("c") || m.opt_present("t") {
            return Err(Failure::Usage(
                "-L/-U cannot be combined with -c or -t".into(),
            ));
        }
        (forward_config(&m)?, None)
    } else {
        if m.opt_present("b") || m.opt_present("udp") {
            return Err(Failure::Usage("-b and --udp go with -L and -U".into()));
        }
        let path = PathBuf::from(
            m.opt_str("c")
                .unwrap_or_else(|| config::DEFAULT_PATH.into()),
        );
        let config = Config::load(&path).map_err(|e| Failure::Config(e.to_string()))?;
        if m.opt_present("t") {
            return Ok(Mode::Check(config, path.display().to_string()));
        }
        (config, Some(path))
    };
    let overrides = Source {
        path: PathBuf::new(),
        workers,
        log_level,
    };
    overrides.apply(&mut config);
    let source = path.map(|path| Source { path, ..overrides });
    Ok(Mode::Run(config, source))
}

fn forward_config(m: &getopts::Matches) -> Result<Config, Failure> {
    let listen = m
        .opt_str("L")
        .ok_or_else(|| Failure::Usage("-U needs -L ADDR to listen on".into()))?;
    let listen = config::listen_addr(&listen).map_err(|e| Failure::Usage(format!("-L: {e}")))?;
    let mut servers = Vec::new();
    for arg in m.opt_strs("U") {
        servers.extend(config::server_addrs(&arg).map_err(|e| Failure::Usage(format!("-U: {e}")))?);
    }
    if servers.is_empty() {
        return Err(Failure::Usage(
            "-L needs at least one -U ADDR to forward to".into(),
        ));
    }
    if let Some(server) = servers.iter().find(|s| config::loops_back(listen, **s)) {
        return Err(Failure::Usage(format!(
            "-U {server} is sluice's own -L address {listen}: a proxy loop"
        )));
    }
    let balance = match m.opt_str("b") {
        None => Balance::RoundRobin,
        Some(name) => Balance::from_name(&name).ok_or_else(|| {
            let names: Vec<&str> = Balance::ALL.iter().map(|(n, _)| *n).collect();
            Failure::Usage(format!(
                "unknown balance '{}' (one of: {})",
                name,
                names.join(", ")
            ))
        })?,
    };
    let proto = if m.opt_present("udp") {
        Proto::Udp
    } else {
        Proto::Tcp
    };
    Ok(Config::forward(proto, listen, &servers, balance))
}

fn run(config: Config, source: Option<Source>) -> ExitCode {
    sluice::logging::init(config.log_level);
    let signals = match SignalSet::block() {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot block signals: {}", sluice::sys::io_reason(&e));
            return ExitCode::from(1);
        }
    };
    match sluice::sys::raise_nofile_limit() {
        Ok(n) => log::debug!("file descriptor limit: {}", n),
        Err(e) => log::warn!(
            "cannot read the file descriptor limit: {}",
            sluice::sys::io_reason(&e)
        ),
    }
    let mut shutdown_timeout = config.shutdown_timeout;
    let proxy = match Proxy::start(config) {
        Ok(p) => p,
        Err(e) => {
            // Printed once, like a config error; a log line would say it a second time.
            eprintln!("sluice: {}", e);
            return ExitCode::from(1);
        }
    };
    let handle = proxy.handle();
    let mut draining = false;
    std::thread::spawn(move || loop {
        match signals.wait() {
            // The first stop lets connections finish; a second one does not wait.
            Ok(Signal::Interrupt | Signal::Terminate) if !draining => {
                draining = true;
                handle.drain(shutdown_timeout);
            }
            Ok(Signal::Interrupt | Signal::Terminate) => {
                log::info!("second stop signal: closing every connection now");
                handle.stop();
            }
            Ok(Signal::Hangup) => match &source {
                None => log::warn!("SIGHUP: nothing to reload, sluice runs from -L/-U"),
                Some(source) => match source.load() {
                    Err(e) => handle.reload_failed(&e),
                    Ok(config) => {
                        let timeout = config.shutdown_timeout;
                        if handle.reload(config).is_ok() {
                            shutdown_timeout = timeout;
                        }
                    }
                },
            },
            Err(e) => {
                log::error!("waiting for signals failed: {}", sluice::sys::io_reason(&e));
                handle.stop();
                return;
            }
        }
    });
    match proxy.wait() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}", e);
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse_args(&args) {
        Ok(Mode::Print(text)) => {
            println!("{}", text);
            ExitCode::SUCCESS
        }
        Ok(Mode::Check(config, path)) => {
            println!("{}: ok: {}", path, config.summary());
            ExitCode::SUCCESS
        }
        Ok(Mode::Run(config, source)) => run(config, source),
        Err(Failure::Config(message)) => {
            eprintln!("sluice: {}", message);
            ExitCode::from(1)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("sluice: {}\n\n{}", message, options().usage(USAGE));
            ExitCode::from(2)
        }
    }
}
