//! The only module that talks to the OS below what `std`, `mio` and `socket2` offer, and the
//! only one allowed `unsafe`. Every unsafe block says why it is sound in a `// SAFETY:` line;
//! everything exported is a safe function.

use std::io;

/// The OS reason of an I/O error in the words an operator reads in a log line:
/// "address already in use", not "Address already in use (os error 98)".
pub fn io_reason(err: &io::Error) -> String {
    let text = err.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (each TCP pair costs two descriptors)
/// and returns the new soft limit.
// `rlim_t` is 32 bits wide on some embedded targets; the casts are not no-ops there.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // An unlimited hard limit is refused by the kernel for NOFILE; stay at a value it accepts.
    let target = if limit.rlim_max == libc::RLIM_INFINITY {
        1 << 20
    } else {
        limit.rlim_max
    };
    if limit.rlim_cur < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Ok(limit.rlim_cur as u64);
        }
        return Ok(target as u64);
    }
    Ok(limit.rlim_cur as u64)
}

/// The signals the main thread turns into messages for the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Hangup,
    Interrupt,
    Terminate,
}

/// Signals blocked in every thread and taken synchronously with [`SignalSet::wait`], so no
/// code runs inside a signal handler.
pub struct SignalSet {
    set: libc::sigset_t,
}

impl SignalSet {
    /// Blocks SIGHUP, SIGINT and SIGTERM in the calling thread and in every thread it starts
    /// afterwards. Call before starting workers.
    pub fn block() -> io::Result<SignalSet> {
        // SAFETY: an all-zero sigset_t is a valid value to hand to sigemptyset, which initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame; the signal numbers are valid.
        let rc = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(SignalSet { set })
    }

    /// Waits for the next blocked signal.
    pub fn wait(&self) -> io::Result<Signal> {
        loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: `self.set` was initialised by `block`; `signal` is a valid out pointer.
            let rc = unsafe { libc::sigwait(&self.set, &mut signal) };
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            match signal {
                libc::SIGHUP => return Ok(Signal::Hangup),
                libc::SIGINT => return Ok(Signal::Interrupt),
                libc::SIGTERM => return Ok(Signal::Terminate),
                _ => continue,
            }
        }
    }
}
