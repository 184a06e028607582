//! Fixed-size buffers lent to a pipe direction only while bytes are in flight.
//!
//! Invariants: every buffer is `size` bytes; the bytes of all buffers the pool has allocated
//! (lent plus cached) never exceed the cap given to [`BufferPool::new`]; when the cap is reached
//! `get` returns `None` and the caller waits (back-pressure) instead of allocating. A buffer goes
//! back with [`BufferPool::put`] the moment it is empty, so an idle pair holds none.

use std::sync::atomic::Ordering;
use std::sync::Arc;

/// How many returned buffers are kept for reuse; the rest are freed so an idle proxy gives
/// its memory back to the system.
const CACHE_LIMIT: usize = 64;

/// A lent buffer: `data[start..end]` are bytes read but not yet written on. The offsets are
/// `u32` (a buffer is at most 16 MiB) so that a `Carrier` holding a buffer or a pipe stays 32
/// bytes: every pair has two, idle or not (the `idle` bench scenario).
pub struct Buffer {
    data: Box<[u8]>,
    start: u32,
    end: u32,
}

impl Buffer {
    fn span(&self) -> (usize, usize) {
        (self.start as usize, self.end as usize)
    }

    fn set(&mut self, start: usize, end: usize) {
        // Both are within `data`, whose length `BufferPool::new` keeps below 4 GiB.
        self.start = u32::try_from(start).unwrap_or(u32::MAX);
        self.end = u32::try_from(end).unwrap_or(u32::MAX);
    }

    pub fn pending(&self) -> &[u8] {
        let (start, end) = self.span();
        self.data.get(start..end).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn is_full(&self) -> bool {
        self.start == 0 && self.end as usize == self.data.len()
    }

    /// `n` pending bytes were written on.
    pub fn consume(&mut self, n: usize) {
        let (start, end) = self.span();
        let start = start.saturating_add(n).min(end);
        if start == end {
            self.set(0, 0);
        } else {
            self.set(start, end);
        }
    }

    /// Free space at the tail, moving pending bytes to the front first when that makes room.
    pub fn spare(&mut self) -> &mut [u8] {
        let (start, end) = self.span();
        if end == self.data.len() && start > 0 {
            self.data.copy_within(start..end, 0);
            self.set(0, end - start);
        }
        let end = self.end as usize;
        self.data.get_mut(end..).unwrap_or_default()
    }

    /// `n` bytes were written into `spare()`.
    pub fn commit(&mut self, n: usize) {
        let (start, end) = self.span();
        self.set(start, end.saturating_add(n).min(self.data.len()));
    }

    /// Appends as much of `bytes` as fits; returns how much did.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let spare = self.spare();
        let n = spare.len().min(bytes.len());
        spare[..n].copy_from_slice(&bytes[..n]);
        self.commit(n);
        n
    }
}

pub use crate::metrics::PoolStats;

pub struct BufferPool {
    size: usize,
    max_buffers: usize,
    allocated: usize,
    lent: usize,
    free: Vec<Box<[u8]>>,
    stats: Arc<PoolStats>,
}

impl BufferPool {
    /// A pool of `size`-byte buffers holding at most `cap_bytes` in all (at least one buffer).
    /// `size` is capped at 1 GiB (the config allows 16 MiB): a `Buffer` keeps `u32` offsets.
    pub fn new(size: usize, cap_bytes: usize, stats: Arc<PoolStats>) -> BufferPool {
        let size = size.clamp(1, 1 << 30);
        BufferPool {
            size,
            max_buffers: (cap_bytes / size).max(1),
            allocated: 0,
            lent: 0,
            free: Vec::new(),
            stats,
        }
    }

    pub fn buffer_size(&self) -> usize {
        self.size
    }

    pub fn in_use(&self) -> usize {
        self.lent
    }

    /// Whether `get` would succeed now.
    pub fn can_lend(&self) -> bool {
        !self.free.is_empty() || self.allocated < self.max_buffers
    }

    pub fn get(&mut self) -> Option<Buffer> {
        let data = match self.free.pop() {
            Some(data) => data,
            None if self.allocated < self.max_buffers => {
                self.allocated += 1;
                // The counters are the process's: every worker's pool adds its own.
                self.stats
                    .allocated_bytes
                    .fetch_add(self.size, Ordering::Relaxed);
                vec![0u8; self.size].into_boxed_slice()
            }
            None => return None,
        };
        self.lent += 1;
        let in_use = self.stats.in_use.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats.peak.fetch_max(in_use, Ordering::Relaxed);
        Some(Buffer {
            data,
            start: 0,
            end: 0,
        })
    }

    pub fn put(&mut self, buffer: Buffer) {
        if self.lent > 0 {
            self.lent -= 1;
            self.stats.in_use.fetch_sub(1, Ordering::Relaxed);
        }
        if self.free.len() < CACHE_LIMIT {
            self.free.push(buffer.data);
        } else if self.allocated > 0 {
            self.allocated -= 1;
            self.stats
                .allocated_bytes
                .fetch_sub(self.size, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(size: usize, cap: usize) -> BufferPool {
        BufferPool::new(size, cap, Arc::new(PoolStats::default()))
    }

    #[test]
    fn cap_is_hard() {
        let mut p = pool(1024, 3 * 1024);
        let a = p.get().expect("first");
        let b = p.get().expect("second");
        let c = p.get().expect("third");
        assert!(!p.can_lend());
        assert!(p.get().is_none());
        p.put(b);
        assert!(p.can_lend());
        let d = p.get().expect("reused");
        assert_eq!(p.in_use(), 3);
        for x in [a, c, d] {
            p.put(x);
        }
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.stats.peak.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn tiny_cap_still_lends_one() {
        let mut p = pool(4096, 10);
        assert!(p.get().is_some());
        assert!(p.get().is_none());
    }

    #[test]
    fn cache_is_bounded() {
        let mut p = pool(16, 16 * 1000);
        let held: Vec<Buffer> = (0..200).filter_map(|_| p.get()).collect();
        assert_eq!(held.len(), 200);
        for b in held {
            p.put(b);
        }
        assert_eq!(p.free.len(), CACHE_LIMIT);
        assert_eq!(
            p.stats.allocated_bytes.load(Ordering::Relaxed),
            CACHE_LIMIT * 16
        );
    }

    #[test]
    fn buffer_push_consume_compact() {
        let mut p = pool(8, 64);
        let mut b = p.get().expect("buffer");
        assert!(b.is_empty());
        assert_eq!(b.push(b"abcdefghij"), 8);
        assert!(b.is_full());
        b.consume(3);
        assert_eq!(b.pending(), b"defgh");
        assert!(!b.is_full());
        // Compaction moves the 5 pending bytes to the front, leaving 3 free.
        assert_eq!(b.spare().len(), 3);
        assert_eq!(b.push(b"xyz!"), 3);
        assert_eq!(b.pending(), b"defghxyz");
        b.consume(8);
        assert!(b.is_empty());
        assert_eq!(b.spare().len(), 8);
        p.put(b);
    }
}
