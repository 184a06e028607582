//! The `sluice` binary as a child process: output collected by reader threads, exit status
//! polled against a deadline, starts on a free port (another one when it was taken in
//! between), and the /proc views (CPU time, descriptors, listening sockets) the
//! descriptor-limit tests need.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{connect, free_port, wait_until, Transport, EVENTUALLY};

pub fn sluice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// A `Command` for the binary with a predictable log level.
pub fn sluice_command(args: &[&str]) -> Command {
    let mut c = Command::new(sluice_bin());
    c.args(args).env_remove("RUST_LOG");
    c
}

/// A running child whose stdout and stderr are collected by reader threads.
pub struct SluiceChild {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

/// How a finished child went.
#[derive(Debug)]
pub struct Outcome {
    /// `None`: killed by a signal, or did not exit in time.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl SluiceChild {
    pub fn spawn(mut command: Command) -> SluiceChild {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn the child");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(collect(out, Arc::clone(&stdout)));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(collect(err, Arc::clone(&stderr)));
        }
        SluiceChild {
            child,
            stdout,
            stderr,
            readers,
            status: None,
        }
    }

    /// Starts the binary listening on a free loopback port of `transport`: `args` gets
    /// `127.0.0.1:PORT` and returns the arguments. Returns the child and that address once the
    /// log says it is listening; picks another port (at most 5 times) when that one was taken
    /// in between.
    pub fn start_listening(
        transport: Transport,
        args: impl Fn(&str) -> Vec<String>,
    ) -> (SluiceChild, SocketAddr) {
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port(transport)));
            let args = args(&addr.to_string());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut child = SluiceChild::spawn(sluice_command(&args));
            let settled = wait_until(Duration::from_secs(20), || {
                child.stderr().contains("listening on") || child.exited().is_some()
            });
            if child.stderr().contains("listening on") {
                return (child, addr);
            }
            assert!(
                settled,
                "sluice did not say it listens:\n{}",
                child.stderr()
            );
            // It exited; a port taken in between is worth another go.
            let out = child.finish(Duration::from_secs(2));
            assert!(
                out.stderr.contains("cannot listen"),
                "sluice exited ({:?}) before listening:\n{}",
                out.code,
                out.stderr
            );
        }
        panic!("no free port for sluice after 5 tries");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The log (stderr) so far, line by line.
    pub fn log(&self) -> Vec<String> {
        self.stderr().lines().map(str::to_string).collect()
    }

    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for a stderr line for which `pred` holds; returns it.
    pub fn wait_for_stderr_line(
        &self,
        within: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let mut found = None;
        wait_until(within, || {
            found = self.stderr().lines().find(|l| pred(l)).map(str::to_string);
            found.is_some()
        });
        found
    }

    /// The exit status if the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        wait_until(within, || self.exited().is_some());
        self.status
    }

    /// Sends a signal by name (`TERM`, `INT`) with kill(1): the test has no `unsafe`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{}", name))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{} {} failed", name, self.pid());
    }

    /// Waits for the exit (killing the child after `within`) and all its output.
    pub fn finish(mut self, within: Duration) -> Outcome {
        let status = self.wait_exit(within);
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Outcome {
            code: status.and_then(|s| s.code()),
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for SluiceChild {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(from: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut lines = BufReader::new(from);
        let mut line = String::new();
        loop {
            line.clear();
            match lines.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => into
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&line),
            }
        }
    })
}

/// Runs the binary to completion (at most `EVENTUALLY`).
pub fn run_sluice(args: &[&str]) -> Outcome {
    SluiceChild::spawn(sluice_command(args)).finish(EVENTUALLY)
}

/// Starts `sluice -L 127.0.0.1:P -U ...` on a free port, retrying with another port if the
/// one picked was taken in between. Returns the child, its listening address and the first
/// connection it accepted, which a test may use as a client.
pub fn spawn_forward(upstreams: &[SocketAddr]) -> (SluiceChild, SocketAddr, TcpStream) {
    let (child, listen) = spawn_forward_listening(upstreams);
    let first = connect(listen);
    (child, listen, first)
}

/// [`spawn_forward`] without the first connection: the child and its listening address.
pub fn spawn_forward_listening(upstreams: &[SocketAddr]) -> (SluiceChild, SocketAddr) {
    let ups: Vec<String> = upstreams.iter().map(|a| a.to_string()).collect();
    for _ in 0..5 {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port(Transport::Tcp)));
        let listen_arg = listen.to_string();
        let mut args = vec!["-L", listen_arg.as_str()];
        for u in &ups {
            args.push("-U");
            args.push(u);
        }
        let mut child = SluiceChild::spawn(sluice_command(&args));
        if wait_listening(&mut child, listen.port()) {
            return (child, listen);
        }
        // The port was taken by someone else in between: try another one.
        let out = child.finish(Duration::from_secs(2));
        eprintln!("sluice did not come up on {}: {:?}", listen, out);
    }
    panic!("sluice did not come up on any of 5 ports");
}

/// Waits until the child listens on `port` itself; false if it exited or never did.
pub fn wait_listening(child: &mut SluiceChild, port: u16) -> bool {
    let pid = child.pid();
    wait_until(EVENTUALLY, || {
        child.exited().is_some() || owns_listener(pid, port)
    });
    child.exited().is_none() && owns_listener(pid, port)
}

/// Clock ticks of CPU time (user + system) the process has used, from /proc/PID/stat.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid)).expect("read /proc/PID/stat");
    // The command name may hold spaces; the fields after it are space-separated.
    let after = &stat[stat.rfind(')').expect("comm field") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; `after` starts at field 3.
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

/// Linux reports /proc CPU times in USER_HZ, which is 100 on every architecture it supports.
pub const TICKS_PER_SECOND: u64 = 100;

/// Descriptors this process has open: a leak check compares the count before and after.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Waits (up to `EVENTUALLY`) until this process holds no more descriptors than `before`:
/// threads and sockets of a finished run close a moment after their connections end.
pub fn assert_descriptors_back(before: usize) {
    assert!(
        wait_until(EVENTUALLY, || open_fds() <= before),
        "descriptors leaked: {} open, {} before",
        open_fds(),
        before
    );
}

/// Descriptors the process has open with a number below `below` (the ones that count
/// against an `RLIMIT_NOFILE` of `below`: new descriptors take the lowest free number).
pub fn open_fds_below(pid: u32, below: usize) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", pid))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<usize>().ok())
                .filter(|&fd| fd < below)
                .count()
        })
        .unwrap_or(0)
}

/// Inodes of the TCP sockets listening on `port` (any address), from /proc/net.
fn listening_inodes(port: u16) -> Vec<String> {
    let want = format!(":{:04X}", port);
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    let listening = cols.len() > 9 && cols[1].ends_with(&want) && cols[3] == "0A";
                    listening.then(|| cols[9].to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether process `pid` itself holds a socket listening on `port`: tells "sluice is up"
/// apart from "someone else took the port", without connecting.
pub fn owns_listener(pid: u32, port: u16) -> bool {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", pid)) else {
        return false;
    };
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| target.to_str().map(str::to_string))
        .any(|target| inodes.iter().any(|i| target == format!("socket:[{}]", i)))
}

/// The first `n` lines of a log, for failure messages.
pub fn head(text: &str, n: usize) -> String {
    let mut out: Vec<&str> = text.lines().take(n).collect();
    if text.lines().count() > n {
        out.push("...");
    }
    out.join("\n")
}

/// A counter for generating unique names in a test run.
pub fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Writes `text` to a fresh file under the temp dir; the file is removed on drop.
pub struct TempFile {
    pub path: std::path::PathBuf,
}

impl TempFile {
    pub fn new(tag: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!(
            "sluice-test-{}-{}-{}.conf",
            std::process::id(),
            tag,
            unique()
        ));
        std::fs::write(&path, text).expect("write a temp config");
        TempFile { path }
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
