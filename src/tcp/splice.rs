//! Kernel pipes for splice(2), and the choice between splicing and copying.
//!
//! A direction that splices moves bytes socket → pipe → socket without copying them to user
//! space. Like a buffer, a pipe is lent only while bytes are in it: a direction takes one from
//! the worker's [`PipePool`] when it reads and gives it back the moment the destination has
//! taken everything, so an idle pair holds no pipe. The pool never lends more than `max_pipes`;
//! when it is at its cap (or the kernel will not make a pipe) the direction copies, and that is
//! counted.
//!
//! Splicing costs two syscalls per move where copying costs two as well, but no copy of the
//! bytes: it pays on bulk streams and loses on small request/response messages, where a read
//! and a write of a few hundred bytes are cheaper than two splices and a pipe. [`Splicing`]
//! `Auto` therefore starts on the copy path and moves a direction to the pipe after several
//! full reads in a row, and back after several small splices in a row.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::Splice;
use crate::metrics::PipeStats;
use crate::reactor::Readiness;

/// Returned pipes kept for reuse (each costs two descriptors, no memory until bytes come).
const CACHE_LIMIT: usize = 64;
/// Full reads in a row that move an `auto` direction to the pipe.
const TO_PIPE: u8 = 4;
/// Small splices in a row (under a sixteenth of what was asked: 4 KiB of a 64 KiB pipe) that
/// move it back to copying.
const TO_COPY: u8 = 8;
const SMALL_PART: usize = 16;

/// Why the pool lent no pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPipe {
    /// `max_pipes` are lent: copy this time, a pipe may be free next time.
    AtCap,
    /// The kernel will not make one (out of descriptors, or no splice on this system).
    Broken,
}

/// A kernel pipe lent to a direction, and how many bytes it holds.
/// Sizes are `u32` (a pipe is at most 1 MiB) so that a `Carrier` holding a pipe is no larger
/// than one holding a buffer: an idle pair stays small (the `idle` bench scenario).
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    pending: u32,
    capacity: u32,
}

impl Pipe {
    pub fn pending(&self) -> usize {
        self.pending as usize
    }

    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Moves up to `len` bytes of socket `src` into the pipe; `Ok(0)` is the socket's end of
    /// stream. Called on an empty pipe only, so `WouldBlock` means the socket has nothing (a
    /// pipe with bytes in it may refuse more while the socket still has some).
    pub fn fill(&mut self, src: RawFd, len: usize) -> io::Result<usize> {
        let room = self.capacity.saturating_sub(self.pending) as usize;
        let n = crate::sys::splice(src, self.write.as_raw_fd(), len.min(room))?;
        self.pending = self
            .pending
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        Ok(n)
    }

    /// Moves the pipe's bytes into socket `dst` while it takes them; returns how many went.
    /// Only `WouldBlock` clears `ready.writable`: a short splice may be a page boundary. An
    /// error after some bytes went returns those (they count); the next call meets it again.
    pub fn drain_into(&mut self, dst: RawFd, ready: &mut Readiness) -> io::Result<usize> {
        let mut done = 0;
        while self.pending > 0 && ready.writable {
            let pending = self.pending as usize;
            let read = self.read.as_raw_fd();
            let moved = match crate::reactor::retry(|| crate::sys::splice(read, dst, pending)) {
                Err(_) if done > 0 => return Ok(done),
                other => other?,
            };
            match moved {
                Some(0) => return Err(io::ErrorKind::WriteZero.into()),
                Some(n) => {
                    let n = n.min(pending);
                    self.pending -= n as u32;
                    done += n;
                }
                None => ready.writable = false,
            }
        }
        Ok(done)
    }
}

/// The size of a pipe the kernel makes unless told otherwise.
const KERNEL_PIPE_SIZE: usize = 64 * 1024;

/// A worker's pipes: lent at most `max` at once, `size` bytes each.
pub struct PipePool {
    size: usize,
    max: usize,
    lent: usize,
    free: Vec<Pipe>,
    stats: Arc<PipeStats>,
}

impl PipePool {
    /// `max` 0 lends none: every direction copies.
    pub fn new(size: usize, max: usize, stats: Arc<PipeStats>) -> PipePool {
        PipePool {
            size,
            max,
            lent: 0,
            free: Vec::new(),
            stats,
        }
    }

    /// An empty pipe, or why not (counted as a fallback, unless `max_pipes 0` turned
    /// splicing off altogether).
    pub fn get(&mut self) -> Result<Pipe, NoPipe> {
        if self.lent >= self.max {
            if self.max > 0 {
                self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            }
            return Err(NoPipe::AtCap);
        }
        let pipe = match self.free.pop() {
            Some(pipe) => pipe,
            None => match self.make() {
                Ok(pipe) if pipe.capacity() >= self.size.min(KERNEL_PIPE_SIZE) => pipe,
                Ok(small) => {
                    self.stop_growing(small.capacity());
                    self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                    return Err(NoPipe::AtCap);
                }
                Err(e) => {
                    log::debug!("cannot make a pipe: {}", crate::sys::io_reason(&e));
                    self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                    return Err(NoPipe::Broken);
                }
            },
        };
        self.lent += 1;
        let now = self.stats.in_use.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats.peak.fetch_max(now, Ordering::Relaxed);
        Ok(pipe)
    }

    /// The kernel made a pipe of `got` bytes, smaller than its own default: it does so for a
    /// user past `fs.pipe-user-pages-soft` (pipes of 8 KiB, which would cost more than copying).
    /// The pool keeps the pipes it has and lends no more; beyond them directions copy.
    fn stop_growing(&mut self, got: usize) {
        self.max = self.lent + self.free.len();
        log::warn!(
            "the kernel makes this user's new pipes {got} bytes (fs.pipe-user-pages-soft or \
             fs.pipe-max-size): splicing keeps the {} pipes it has, beyond them connections copy",
            self.max
        );
    }

    fn make(&self) -> io::Result<Pipe> {
        let (read, write) = crate::sys::pipe()?;
        // A kernel that refuses the size (over pipe-max-size, or an unprivileged user past
        // pipe-user-pages-soft, whose new pipes it also makes smaller) keeps the size it made.
        let capacity = crate::sys::set_pipe_size(&write, self.size)
            .or_else(|_| crate::sys::pipe_size(&write))
            .unwrap_or(4096);
        let capacity = u32::try_from(capacity).unwrap_or(u32::MAX);
        Ok(Pipe {
            read,
            write,
            pending: 0,
            capacity,
        })
    }

    /// Takes a pipe back: an empty one is kept for reuse, one with bytes left (its pair
    /// closed with them in flight) is closed.
    pub fn put(&mut self, pipe: Pipe) {
        self.lent = self.lent.saturating_sub(1);
        self.stats.in_use.fetch_sub(1, Ordering::Relaxed);
        if pipe.pending == 0 && self.free.len() < CACHE_LIMIT {
            self.free.push(pipe);
        }
    }

    /// `n` bytes were spliced to a destination.
    pub fn count(&self, n: usize) {
        self.stats
            .spliced_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn lent(&self) -> usize {
        self.lent
    }
}

/// How a direction moves its bytes, and for `Auto`, what it has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Splicing {
    Off,
    On,
    Auto { piping: bool, streak: u8 },
}

impl Splicing {
    pub fn new(mode: Splice) -> Splicing {
        match mode {
            // splice(2) is Linux's.
            _ if !cfg!(target_os = "linux") => Splicing::Off,
            Splice::Off => Splicing::Off,
            Splice::On => Splicing::On,
            Splice::Auto => Splicing::Auto {
                piping: false,
                streak: 0,
            },
        }
    }

    /// Whether the next read should go into a pipe.
    pub fn wants_pipe(self) -> bool {
        matches!(self, Splicing::On | Splicing::Auto { piping: true, .. })
    }

    /// A read on the copy path took `n` bytes into room for `room`.
    pub fn copied(&mut self, n: usize, room: usize) {
        if let Splicing::Auto {
            piping: false,
            streak,
        } = self
        {
            *streak = if n >= room {
                streak.saturating_add(1)
            } else {
                0
            };
            if *streak >= TO_PIPE {
                *self = Splicing::Auto {
                    piping: true,
                    streak: 0,
                };
            }
        }
    }

    /// A splice into the pipe took `n` of the `asked` bytes.
    pub fn spliced(&mut self, n: usize, asked: usize) {
        if let Splicing::Auto {
            piping: true,
            streak,
        } = self
        {
            let small = n.saturating_mul(SMALL_PART) < asked;
            *streak = if small { streak.saturating_add(1) } else { 0 };
            if *streak >= TO_COPY {
                *self = Splicing::Auto {
                    piping: false,
                    streak: 0,
                };
            }
        }
    }
}

/// The kernel cannot splice these descriptors (not sockets, an old kernel): copy instead.
pub fn unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_moves_to_the_pipe_on_full_reads_and_back_on_small_splices() {
        let mut s = Splicing::new(Splice::Auto);
        for _ in 0..3 {
            s.copied(16384, 16384);
        }
        s.copied(100, 16384);
        assert!(!s.wants_pipe(), "a short read starts the count again");
        for _ in 0..TO_PIPE {
            s.copied(16384, 16384);
        }
        assert!(s.wants_pipe());
        for _ in 0..TO_COPY - 1 {
            s.spliced(512, 65536);
        }
        s.spliced(65536, 65536);
        for _ in 0..TO_COPY - 1 {
            s.spliced(512, 65536);
        }
        assert!(s.wants_pipe(), "a large splice starts the count again");
        // A splice the throttle cut to 512 bytes took all it was allowed: not small.
        s.spliced(512, 512);
        assert!(s.wants_pipe());
        for _ in 0..TO_COPY {
            s.spliced(512, 65536);
        }
        assert!(!s.wants_pipe());
        let mut on = Splicing::new(Splice::On);
        on.spliced(1, 65536);
        assert!(on.wants_pipe() && !Splicing::new(Splice::Off).wants_pipe());
    }

    #[test]
    fn the_pool_lends_at_most_its_cap_and_counts_the_rest() {
        let stats = Arc::new(PipeStats::default());
        let mut pool = PipePool::new(64 * 1024, 2, Arc::clone(&stats));
        let (a, b) = (pool.get().expect("a pipe"), pool.get().expect("a pipe"));
        assert_eq!(pool.get().err(), Some(NoPipe::AtCap));
        assert_eq!(stats.fallbacks.load(Ordering::Relaxed), 1);
        assert_eq!(stats.in_use.load(Ordering::Relaxed), 2);
        assert!(a.capacity() >= 4096);
        pool.put(a);
        pool.put(b);
        assert_eq!((pool.lent(), pool.free.len()), (0, 2));
        assert_eq!(stats.in_use.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn bytes_go_through_a_pipe_between_sockets() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut src_peer =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (src, _) = listener.accept().expect("accept");
        let dst =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut dst_peer, _) = listener.accept().expect("accept");
        src.set_nonblocking(true).expect("nonblocking");
        let mut pool = PipePool::new(64 * 1024, 1, Arc::new(PipeStats::default()));
        let mut pipe = pool.get().expect("a pipe");
        let wouldblock = pipe.fill(src.as_raw_fd(), 1024).expect_err("nothing yet");
        assert_eq!(wouldblock.kind(), io::ErrorKind::WouldBlock);
        src_peer.write_all(b"through the kernel").expect("write");
        // Loopback delivers at once; the deadline only bounds a broken kernel.
        let fill = |pipe: &mut Pipe| {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match pipe.fill(src.as_raw_fd(), 1024) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(std::time::Instant::now() < until, "nothing came");
                    }
                    other => return other.expect("splice"),
                }
            }
        };
        assert_eq!(fill(&mut pipe), 18);
        assert_eq!(pipe.pending(), 18);
        let mut ready = Readiness {
            writable: true,
            ..Readiness::default()
        };
        assert_eq!(
            pipe.drain_into(dst.as_raw_fd(), &mut ready).expect("drain"),
            18
        );
        let mut got = [0u8; 18];
        dst_peer.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"through the kernel");
        drop(src_peer);
        assert_eq!(fill(&mut pipe), 0, "end of stream");
        pool.put(pipe);
    }
}
