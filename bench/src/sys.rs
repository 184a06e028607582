//! The only module of the bench with `unsafe`: CPU affinity, the descriptor limit, the clock
//! tick, and a minimal level-triggered `epoll` wrapper for the backends and the multi-connection
//! clients. Every block says why it is sound in a `// SAFETY:` line; everything exported is safe.
//!
//! The `Poller` is level-triggered on purpose: a backend that reads one chunk and comes back later
//! is still told the socket is readable, so no handler has to drain to `EAGAIN` to stay correct.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// CPUs this process may run on, in ascending order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` was filled by the kernel; CPU_ISSET only reads it, `cpu` is below its size.
    Ok((0..max)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins the calling thread (and every thread it starts afterwards) to `cpus`.
pub fn pin_self(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &cpu in cpus.iter().filter(|&&c| c < max) {
        // SAFETY: `set` is a valid cpu_set_t and `cpu` is below its capacity.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 means the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `cmd` pin its process to `cpus` between fork and exec: the fallback when `taskset` is
/// missing, so the proxy's threads never start on the load generator's CPUs.
pub fn pin_command(cmd: &mut std::process::Command, cpus: &[usize]) {
    use std::os::unix::process::CommandExt;
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &cpu in cpus.iter().filter(|&&c| c < max) {
        // SAFETY: `set` is a valid cpu_set_t and `cpu` is below its capacity.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: the closure only makes one async-signal-safe system call on a set built before
    // fork; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The bench holds both ends of every connection, so it needs as many descriptors as sluice.
pub use sluice::sys::raise_nofile_limit;

/// Kernel clock ticks per second, the unit of `utime`/`stime` in `/proc/PID/stat`.
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects; it only returns a value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Sends `signal` to process `pid`. Errors (the process is gone) are the caller's to ignore.
pub fn kill(pid: u32, signal: i32) -> io::Result<()> {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: kill has no memory effects; a stale pid only yields ESRCH.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub const SIGTERM: i32 = libc::SIGTERM;
pub const SIGKILL: i32 = libc::SIGKILL;

/// What a ready descriptor reported.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub key: u64,
    pub readable: bool,
    pub writable: bool,
    /// Error or hang-up: the next read or write tells which.
    pub closed: bool,
}

/// A level-triggered epoll instance. Descriptors are added with a caller-chosen key.
pub struct Poller {
    fd: RawFd,
    buf: Vec<libc::epoll_event>,
}

impl Poller {
    pub fn new() -> io::Result<Poller> {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let empty = libc::epoll_event { events: 0, u64: 0 };
        Ok(Poller {
            fd,
            buf: vec![empty; 1024],
        })
    }

    fn ctl(&self, op: i32, fd: RawFd, key: u64, read: bool, write: bool) -> io::Result<()> {
        let mut events = 0u32;
        if read {
            events |= libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32;
        }
        if write {
            events |= libc::EPOLLOUT as u32;
        }
        let mut ev = libc::epoll_event { events, u64: key };
        // SAFETY: `ev` is a valid epoll_event for the call; a bad fd only yields EBADF.
        if unsafe { libc::epoll_ctl(self.fd, op, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn add(&self, fd: RawFd, key: u64, read: bool, write: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, key, read, write)
    }

    pub fn modify(&self, fd: RawFd, key: u64, read: bool, write: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, key, read, write)
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, false, false)
    }

    /// Waits up to `timeout` and appends what became ready to `out` (cleared first).
    pub fn wait(&mut self, out: &mut Vec<Event>, timeout: Duration) -> io::Result<()> {
        out.clear();
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let len = i32::try_from(self.buf.len()).unwrap_or(i32::MAX);
        // SAFETY: `buf` holds `len` writable epoll_events that outlive the call.
        let n = unsafe { libc::epoll_wait(self.fd, self.buf.as_mut_ptr(), len, ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(err);
        }
        let hangup = (libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLRDHUP) as u32;
        for ev in &self.buf[..n as usize] {
            let bits = ev.events;
            out.push(Event {
                key: ev.u64,
                readable: bits & libc::EPOLLIN as u32 != 0,
                writable: bits & libc::EPOLLOUT as u32 != 0,
                closed: bits & hangup != 0,
            });
        }
        Ok(())
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        // SAFETY: `fd` is the epoll descriptor this struct owns; it is closed exactly once.
        unsafe { libc::close(self.fd) };
    }
}
