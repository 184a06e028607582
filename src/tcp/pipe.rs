//! A TCP pair: the client socket, the server socket and the two directions between them.
//!
//! Each direction is its own state machine, `Open → Draining → Closed`: `Draining` means the
//! source sent EOF and bytes are still on their way; `Closed` means the destination got our
//! `shutdown(Write)`. The other direction keeps flowing, so a half-closed client still gets the
//! whole answer. Readiness is kept here, in userland (sockets are registered once,
//! edge-triggered): an event sets bits, `WouldBlock` clears them, and [`Pair::pump`] works on
//! what is set. A direction holds a pooled buffer (or, splicing, a kernel pipe: `splice.rs`)
//! only while the destination could not take everything read, so a pair holds at most two and
//! an idle pair holds none. A pipe is filled only when empty: a splice into a pipe that holds
//! bytes may refuse more while the socket still has some, and under edge-triggered readiness
//! that `WouldBlock` would be taken for an empty socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use super::buffer::{Buffer, BufferPool};
use super::splice::{self, Pipe, PipePool, Splicing};
use super::Side;
use crate::config::{ServerId, UpstreamId};
use crate::limit::Ticket;
use crate::part::Origin;
use crate::reactor::timer::TimerKey;
use crate::reactor::token::Gen;
use crate::reactor::{retry, End, Readiness};
use crate::upstream::Tried;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirState {
    Open,
    /// The source sent EOF; pending bytes still go out before the destination is shut down.
    Draining,
    /// `shutdown(Write)` went to the destination.
    Closed,
}

/// What holds a direction's bytes between the read that took them and the write that delivers
/// them: a buffer lent by the pool, or a kernel pipe (splice).
pub enum Carrier {
    /// Nothing in flight: read bytes go from the worker's scratch buffer straight on.
    Empty,
    /// Bytes the destination has not taken yet, in a pooled buffer.
    Buffered(Buffer),
    /// Bytes spliced from the source that the destination has not taken yet.
    Piped(Pipe),
}

impl Carrier {
    pub fn is_empty(&self) -> bool {
        matches!(self, Carrier::Empty)
    }

    /// Gives a held buffer or pipe back to its pool.
    fn release(&mut self, pool: &mut BufferPool, pipes: &mut PipePool) {
        match std::mem::replace(self, Carrier::Empty) {
            Carrier::Buffered(buf) => pool.put(buf),
            Carrier::Piped(pipe) => pipes.put(pipe),
            Carrier::Empty => {}
        }
    }
}

/// One way through the pair: its state, and the carrier of its bytes in flight.
pub struct Direction {
    pub state: DirState,
    carrier: Carrier,
    /// Bytes delivered to the destination.
    pub bytes: u64,
    /// `limit_rate`, if set (boxed: most pairs have none, and an idle pair should stay small;
    /// the `idle` bench scenario measures it).
    pub throttle: Option<Box<Throttle>>,
    /// Whether reads go into a kernel pipe or through the copy path.
    pub splicing: Splicing,
}

/// `limit_rate` for one direction: a token bucket of bytes (`rate` a second, a tenth of a
/// second's worth saved up at most), after `limit_rate_after` bytes that go at full speed. When
/// it is empty the direction stops reading (the source's own buffer fills and TCP slows the
/// sender, as with a slow reader) until a timer on the wheel says there is budget again: no
/// busy loop, no timer per byte, and the pair's buffers stay as they are.
#[derive(Debug, Clone, Copy)]
pub struct Throttle {
    /// Out of its byte budget, with bytes waiting in the source: read again at this time.
    pub until: Option<Instant>,
    rate: u64,
    burst: u64,
    tokens: u64,
    /// What is left of `limit_rate_after`.
    free: u64,
    last: Instant,
}

/// Waiting for less than this would wake the worker for a handful of bytes.
const MIN_THROTTLE_STEP: u64 = 4096;

impl Throttle {
    pub fn new(rate: u64, after: u64, now: Instant) -> Throttle {
        let burst = (rate / 10).max(MIN_THROTTLE_STEP);
        Throttle {
            until: None,
            rate: rate.max(1),
            burst,
            tokens: MIN_THROTTLE_STEP.min(burst),
            free: after,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let us = now.saturating_duration_since(self.last).as_micros();
        let add =
            u64::try_from(us.saturating_mul(u128::from(self.rate)) / 1_000_000).unwrap_or(u64::MAX);
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(self.burst);
            self.last = now;
        }
    }

    /// Bytes that may be read now.
    pub fn allowance(&mut self, now: Instant) -> usize {
        self.refill(now);
        usize::try_from(self.free.saturating_add(self.tokens)).unwrap_or(usize::MAX)
    }

    /// `n` bytes were read.
    pub fn consume(&mut self, n: usize) {
        let mut n = n as u64;
        let from_free = n.min(self.free);
        self.free -= from_free;
        n -= from_free;
        self.tokens = self.tokens.saturating_sub(n);
    }

    /// When enough budget for one worthwhile read will be there.
    pub fn ready_at(&self, now: Instant) -> Instant {
        // Half the bucket: about 20 wake-ups a second whatever the rate (a bucket is a tenth of
        // a second's worth), never a wait for less than one small step.
        let step = (self.burst / 2).max(MIN_THROTTLE_STEP).min(self.burst);
        let need = step.saturating_sub(self.tokens).max(1);
        let us = need.saturating_mul(1_000_000) / self.rate;
        crate::reactor::after(now, std::time::Duration::from_micros(us.max(1000)))
    }
}

/// Why pumping stopped without a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing more to do until the kernel reports readiness.
    Idle,
    /// The fairness budget ran out while the source was still readable.
    Yield,
    /// A buffer is needed and the pool is at its cap.
    Starved,
}

impl Step {
    fn merge(self, other: Step) -> Step {
        match (self, other) {
            (Step::Starved, _) | (_, Step::Starved) => Step::Starved,
            (Step::Yield, _) | (_, Step::Yield) => Step::Yield,
            _ => Step::Idle,
        }
    }
}

/// An I/O error on one side of the pair; the whole pair closes.
#[derive(Debug)]
pub struct Fault {
    pub side: Side,
    pub error: io::Error,
}

/// Reads per direction per wake-up before the pair yields to others.
const READ_BUDGET: u32 = 16;

/// What a direction needs of a socket: the pump is written against this, so its unit tests
/// drive it with a scripted stream instead of the kernel.
pub trait Stream {
    fn read(&mut self, into: &mut [u8]) -> io::Result<usize>;
    /// Reads without consuming: the same bytes come back on the next `read`.
    fn peek(&mut self, into: &mut [u8]) -> io::Result<usize>;
    fn write(&mut self, from: &[u8]) -> io::Result<usize>;
    fn shutdown_write(&mut self) -> io::Result<()>;
    /// The descriptor to splice from or to; `None` (a scripted stream) always copies.
    fn fd(&self) -> Option<RawFd> {
        None
    }
}

impl Stream for TcpStream {
    fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        Read::read(self, into)
    }

    fn peek(&mut self, into: &mut [u8]) -> io::Result<usize> {
        TcpStream::peek(self, into)
    }

    fn write(&mut self, from: &[u8]) -> io::Result<usize> {
        Write::write(self, from)
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// Ends of one direction, borrowed from the pair for one pump.
pub(crate) struct Ends<'a, S> {
    pub src: &'a mut S,
    pub src_ready: &'a mut Readiness,
    pub src_side: Side,
    pub dst: &'a mut S,
    pub dst_ready: &'a mut Readiness,
    pub dst_side: Side,
    /// The other direction is closed: when this one closes too, the pair closes its sockets at
    /// once, and `close` sends the same FIN that `shutdown` would (a syscall saved per pair in
    /// the `churn` bench scenario).
    pub last: bool,
}

impl<S> Ends<'_, S> {
    fn src_fault(&self, error: io::Error) -> Fault {
        Fault {
            side: self.src_side,
            error,
        }
    }

    fn dst_fault(&self, error: io::Error) -> Fault {
        Fault {
            side: self.dst_side,
            error,
        }
    }
}

/// What one read step did to the source.
enum Got {
    /// The source sent EOF.
    Eof,
    /// Bytes moved on; `drained` when the read came back short, so the socket is empty
    /// (edge-triggered: new data raises a new event), which saves the read that would only say
    /// `WouldBlock`: one `recvfrom` per message per side in the `rr` bench scenario.
    Data { drained: bool, n: usize },
    /// The source has nothing now.
    WouldBlock,
    /// Bytes are waiting in the source for a destination that cannot take them now; `n` were
    /// moved before it filled.
    Left { n: usize },
    /// The carrier is full (or a pipe holds bytes): nothing is read until the destination
    /// takes some.
    Full,
    /// A buffer is needed and the pool is at its cap.
    Starved,
}

impl Direction {
    pub fn new() -> Direction {
        Direction {
            state: DirState::Open,
            carrier: Carrier::Empty,
            bytes: 0,
            throttle: None,
            splicing: Splicing::Off,
        }
    }

    pub fn holds_buffer(&self) -> bool {
        !self.carrier.is_empty()
    }

    pub fn holds_pipe(&self) -> bool {
        matches!(self.carrier, Carrier::Piped(_))
    }

    /// Gives the buffer or pipe back (the pair is closing).
    pub fn release(&mut self, pool: &mut BufferPool, pipes: &mut PipePool) {
        self.carrier.release(pool, pipes);
    }

    /// Moves bytes from `src` to `dst` until the kernel says wait, the budget runs out, or the
    /// pool is dry and the destination is full.
    pub(crate) fn pump<S: Stream>(
        &mut self,
        mut io: Ends<'_, S>,
        pool: &mut BufferPool,
        pipes: &mut PipePool,
        scratch: &mut [u8],
        now: Instant,
    ) -> Result<Step, Fault> {
        let mut budget = READ_BUDGET;
        // Bytes too: 16 splices into 1 MiB pipes must not hold the worker for 16 MiB.
        let mut bytes_left = READ_BUDGET as usize * scratch.len().max(1);
        loop {
            self.flush(io.dst, io.dst_ready, pool, pipes)
                .map_err(|e| io.dst_fault(e))?;
            match self.state {
                DirState::Open => {}
                DirState::Draining => {
                    if self.carrier.is_empty() {
                        self.state = DirState::Closed;
                        // Both sources were read to EOF, so closing sends a FIN, not a reset.
                        if !io.last {
                            // The peer may already be gone; the other direction will see it.
                            let _ = io.dst.shutdown_write();
                        }
                    }
                    return Ok(Step::Idle);
                }
                DirState::Closed => return Ok(Step::Idle),
            }
            if !io.src_ready.readable {
                return Ok(Step::Idle);
            }
            if budget == 0 || bytes_left == 0 {
                return Ok(Step::Yield);
            }
            let allowed = match self.throttle.as_deref_mut() {
                None => usize::MAX,
                Some(t) => t.allowance(now),
            };
            if allowed == 0 {
                if let Some(t) = self.throttle.as_deref_mut() {
                    t.until = Some(t.ready_at(now));
                }
                return Ok(Step::Idle);
            }
            budget -= 1;
            let piped = match (&self.carrier, self.splicing.wants_pipe()) {
                (Carrier::Empty, true) => io.src.fd().zip(io.dst.fd()),
                _ => None,
            };
            let pipe = match piped.map(|(src, _)| (pipes.get(), src)) {
                Some((Ok(pipe), src)) => Some((pipe, src)),
                // The kernel will not make pipes (out of descriptors, no splice here): this
                // direction copies from now on rather than ask again on every read.
                Some((Err(splice::NoPipe::Broken), _)) => {
                    self.splicing = Splicing::Off;
                    None
                }
                Some((Err(splice::NoPipe::AtCap), _)) | None => None,
            };
            let got = if let Some((pipe, src)) = pipe {
                self.splice_in(pipe, src, &mut io, pool, pipes, allowed)?
            } else {
                self.copy_step(&mut io, pool, scratch, allowed)?
            };
            if let Got::Data { n, .. } | Got::Left { n } = &got {
                bytes_left = bytes_left.saturating_sub(*n);
                if let Some(t) = self.throttle.as_deref_mut() {
                    t.consume(*n);
                }
            }
            match got {
                Got::Eof => {
                    self.state = DirState::Draining;
                    io.src_ready.readable = false;
                }
                Got::Data { drained, .. } => {
                    if drained && !io.src_ready.read_closed {
                        io.src_ready.readable = false;
                    }
                }
                Got::WouldBlock => io.src_ready.readable = false,
                Got::Left { .. } => {}
                Got::Full => return Ok(Step::Idle),
                Got::Starved => return Ok(Step::Starved),
            }
        }
    }

    /// One read on the copy path: into the free room of the held buffer, a pooled buffer, or
    /// the worker's scratch buffer, as the destination and the pool allow.
    fn copy_step<S: Stream>(
        &mut self,
        io: &mut Ends<'_, S>,
        pool: &mut BufferPool,
        scratch: &mut [u8],
        allowed: usize,
    ) -> Result<Got, Fault> {
        Ok(match &mut self.carrier {
            // Bytes wait in the pipe for the destination; it says when it takes more.
            Carrier::Piped(_) => Got::Full,
            // Bytes are waiting for the destination: read behind them, or wait if full.
            Carrier::Buffered(buf) => {
                let spare = buf.spare();
                if spare.is_empty() {
                    return Ok(Got::Full);
                }
                let spare = cap(spare, allowed);
                let asked = spare.len();
                match read_some(io.src, spare).map_err(|e| io.src_fault(e))? {
                    Some(0) => Got::Eof,
                    Some(n) => {
                        buf.commit(n);
                        Got::Data {
                            drained: n < asked,
                            n,
                        }
                    }
                    None => Got::WouldBlock,
                }
            }
            // The destination cannot take anything now: read straight into a pooled buffer.
            Carrier::Empty if !io.dst_ready.writable => {
                let Some(mut buf) = pool.get() else {
                    return Ok(Got::Starved);
                };
                let room = buf.spare().len();
                let spare = cap(buf.spare(), allowed);
                let asked = spare.len();
                let got = read_some(io.src, spare);
                match got {
                    Ok(Some(n)) if n > 0 => {
                        buf.commit(n);
                        // Against the room, not `asked`: a read the throttle cut is no sign
                        // of a bulk stream.
                        self.splicing.copied(n, room);
                        self.carrier = Carrier::Buffered(buf);
                    }
                    _ => pool.put(buf),
                }
                match got.map_err(|e| io.src_fault(e))? {
                    Some(0) => Got::Eof,
                    Some(n) => Got::Data {
                        drained: n < asked,
                        n,
                    },
                    None => Got::WouldBlock,
                }
            }
            // The usual case: read into the worker's scratch buffer and write on at once;
            // only what the destination refuses moves into a pooled buffer.
            Carrier::Empty if pool.can_lend() => {
                let into = cap(scratch, allowed);
                let asked = into.len();
                match read_some(io.src, into).map_err(|e| io.src_fault(e))? {
                    Some(0) => Got::Eof,
                    Some(n) => {
                        self.splicing.copied(n, scratch.len());
                        let chunk = scratch.get(..n).unwrap_or_default();
                        self.forward(chunk, io.dst, io.dst_ready, pool)
                            .map_err(|e| io.dst_fault(e))?;
                        Got::Data {
                            drained: n < asked,
                            n,
                        }
                    }
                    None => Got::WouldBlock,
                }
            }
            // The pool is dry but the destination takes bytes.
            Carrier::Empty => self.pass_through(io, cap(scratch, allowed))?,
        })
    }

    /// With no buffer to lend, a direction whose destination is writable still moves: it peeks,
    /// writes what the destination takes, and consumes exactly that from the source, so nothing
    /// is left over to hold. Without this, a pair holding the last buffer for a server that waits
    /// on its own reply stalls every pair of the worker (the echo deadlock of issue 17). It costs
    /// one more read per step, and runs only while the pool is at its cap.
    fn pass_through<S: Stream>(
        &mut self,
        io: &mut Ends<'_, S>,
        scratch: &mut [u8],
    ) -> Result<Got, Fault> {
        let n = match peek_some(io.src, scratch).map_err(|e| io.src_fault(e))? {
            None => return Ok(Got::WouldBlock),
            Some(0) => return Ok(Got::Eof),
            Some(n) => n,
        };
        let chunk = scratch.get(..n).unwrap_or_default();
        let taken = write_ready(io.dst, io.dst_ready, chunk).map_err(|e| io.dst_fault(e))?;
        self.bytes += taken as u64;
        let mut left = taken;
        while left > 0 {
            let part = scratch.get_mut(..left).unwrap_or_default();
            match read_some(io.src, part).map_err(|e| io.src_fault(e))? {
                Some(got) if got > 0 => left -= got.min(left),
                // The peeked bytes are gone: the stream cannot be kept whole.
                _ => return Err(io.src_fault(io::ErrorKind::UnexpectedEof.into())),
            }
        }
        Ok(if taken == n {
            Got::Data {
                drained: n < scratch.len(),
                n,
            }
        } else {
            Got::Left { n: taken }
        })
    }

    /// Moves one read of the source into `pipe` and on to the destination as far as it takes
    /// it; what it does not take stays in the pipe, held by the direction. The read never
    /// counts as draining the source: a splice can stop short at a page boundary.
    fn splice_in<S: Stream>(
        &mut self,
        mut pipe: Pipe,
        src: RawFd,
        io: &mut Ends<'_, S>,
        pool: &mut BufferPool,
        pipes: &mut PipePool,
        allowed: usize,
    ) -> Result<Got, Fault> {
        let len = pipe.capacity().min(allowed);
        match retry(|| pipe.fill(src, len)) {
            Ok(Some(0)) => {
                pipes.put(pipe);
                Ok(Got::Eof)
            }
            Ok(Some(n)) => {
                self.splicing.spliced(n, len);
                self.carrier = Carrier::Piped(pipe);
                self.flush(io.dst, io.dst_ready, pool, pipes)
                    .map_err(|e| io.dst_fault(e))?;
                Ok(Got::Data { drained: false, n })
            }
            Ok(None) => {
                pipes.put(pipe);
                Ok(Got::WouldBlock)
            }
            // These sockets cannot splice: this direction copies from now on.
            Err(e) if splice::unsupported(&e) => {
                pipes.put(pipe);
                self.splicing = Splicing::Off;
                Ok(Got::Left { n: 0 })
            }
            Err(e) => {
                pipes.put(pipe);
                Err(io.src_fault(e))
            }
        }
    }

    /// Writes pending bytes while the destination takes them; returns the buffer or pipe when
    /// empty.
    fn flush<S: Stream>(
        &mut self,
        dst: &mut S,
        ready: &mut Readiness,
        pool: &mut BufferPool,
        pipes: &mut PipePool,
    ) -> io::Result<()> {
        match &mut self.carrier {
            Carrier::Empty => return Ok(()),
            Carrier::Buffered(buf) => {
                if !buf.is_empty() {
                    let n = write_ready(dst, ready, buf.pending())?;
                    buf.consume(n);
                    self.bytes += n as u64;
                }
                if !buf.is_empty() {
                    return Ok(());
                }
            }
            Carrier::Piped(pipe) => {
                let fd = dst.fd().ok_or(io::ErrorKind::Unsupported)?;
                let n = pipe.drain_into(fd, ready)?;
                self.bytes += n as u64;
                pipes.count(n);
                if pipe.pending() > 0 {
                    return Ok(());
                }
            }
        }
        self.carrier.release(pool, pipes);
        Ok(())
    }

    /// Writes a freshly read chunk; keeps what the destination did not take.
    fn forward<S: Stream>(
        &mut self,
        chunk: &[u8],
        dst: &mut S,
        ready: &mut Readiness,
        pool: &mut BufferPool,
    ) -> io::Result<()> {
        let n = write_ready(dst, ready, chunk)?;
        self.bytes += n as u64;
        let rest = chunk.get(n..).unwrap_or_default();
        if !rest.is_empty() {
            // `pump` checked `can_lend` before reading, and a chunk is at most one buffer long.
            let mut buf = pool
                .get()
                .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
            buf.push(rest);
            self.carrier = Carrier::Buffered(buf);
        }
        Ok(())
    }
}

impl Default for Direction {
    fn default() -> Self {
        Direction::new()
    }
}

/// At most `n` bytes of `buf`.
fn cap(buf: &mut [u8], n: usize) -> &mut [u8] {
    let len = buf.len().min(n);
    buf.get_mut(..len).unwrap_or_default()
}

/// Writes as much of `from` as the destination takes while it is writable; returns how much.
/// An error after some bytes went returns those (they count); the next write meets it again.
fn write_ready<S: Stream>(dst: &mut S, ready: &mut Readiness, from: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < from.len() && ready.writable {
        let rest = from.get(done..).unwrap_or_default();
        let wrote = match write_some(dst, rest) {
            Err(_) if done > 0 => return Ok(done),
            other => other?,
        };
        match wrote {
            Some(n) => {
                done += n;
                // A short write means the send buffer is full; EPOLLOUT will say when not.
                ready.writable = n == rest.len();
            }
            None => ready.writable = false,
        }
    }
    Ok(done)
}

/// `Ok(None)` means WouldBlock.
fn read_some<S: Stream>(src: &mut S, into: &mut [u8]) -> io::Result<Option<usize>> {
    retry(|| src.read(into))
}

/// `Ok(None)` means WouldBlock.
fn peek_some<S: Stream>(src: &mut S, into: &mut [u8]) -> io::Result<Option<usize>> {
    retry(|| src.peek(into))
}

/// `Ok(None)` means WouldBlock. A zero-length write of a non-empty slice is an error.
fn write_some<S: Stream>(dst: &mut S, from: &[u8]) -> io::Result<Option<usize>> {
    match retry(|| dst.write(from))? {
        Some(0) => Err(io::ErrorKind::WriteZero.into()),
        other => Ok(other),
    }
}

/// Where a pair is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairState {
    /// Accepted on a listener with `accept_proxy_protocol`: waiting for the client's PROXY
    /// header (until `proxy_protocol_timeout` after `started`); nothing is read past it.
    ReadingProxyHeader,
    /// On a listener with `sni` routes: reading (without consuming) the client's ClientHello
    /// to choose the upstream, until `sni_timeout` after the accept.
    Peeking,
    /// Accepted, or between two connect attempts: no server socket.
    Unassigned,
    /// Its server socket could not be opened for want of a descriptor: it waits in line for one
    /// that a closing pair frees, until `connect_timeout` after `since`.
    WaitingForDescriptor { since: Instant },
    /// A non-blocking connect to `server` is under way, started at `since`.
    Connecting { server: ServerId, since: Instant },
    /// Connected; the PROXY header goes to `server` before any client byte.
    SendingProxyHeader { server: ServerId },
    /// Bytes flow between the client and `server`.
    Streaming { server: ServerId },
}

/// A pair's rarely needed state.
#[derive(Debug, Default)]
pub struct Extra {
    /// Armed while a direction waits for its `limit_rate` budget, and when it fires.
    pub throttle_timer: Option<TimerKey>,
    pub throttle_at: Option<Instant>,
    /// The PROXY header for the server while `SendingProxyHeader`, and how much of it went.
    pub header_out: Vec<u8>,
    pub header_sent: usize,
    /// From the client's own PROXY header, if it sent one.
    pub proxied: Option<Proxied>,
    /// The server name its ClientHello asked for (SNI routing), for the access log.
    pub sni: Option<String>,
    /// Peeks at a PROXY header or a ClientHello that found it incomplete (bounded: a client
    /// that trickles bytes must not make the worker re-read kilobytes per byte).
    pub partial_peeks: u8,
}

/// Incomplete peeks allowed before a header or hello is taken as it is (a real one comes in a
/// few segments).
pub const MAX_PARTIAL_PEEKS: u8 = 32;

/// What a client's PROXY header said, kept to be passed on (chaining).
#[derive(Debug, Clone)]
pub struct Proxied {
    /// The address the original client connected to.
    pub dst: Option<SocketAddr>,
    pub tlvs: Vec<crate::proxy_protocol::Tlv>,
}

/// One client connection and its server connection.
pub struct Pair {
    pub gen: Gen,
    /// The listener that accepted the pair, as it was then: a reload changes settings for new
    /// pairs only.
    pub origin: Arc<Origin>,
    /// The upstream the pair's server comes from; a reload translates the id.
    pub upstream: UpstreamId,
    /// Its place in the per-client table, given back when it closes.
    pub ticket: Option<Ticket>,
    pub state: PairState,
    pub client: TcpStream,
    pub client_addr: SocketAddr,
    pub client_ready: Readiness,
    pub server: Option<TcpStream>,
    pub server_ready: Readiness,
    /// client → server
    pub up: Direction,
    /// server → client
    pub down: Direction,
    pub tried: Tried,
    pub tries: u32,
    /// The server of the last connect attempt, named in the access log of a failed pair.
    pub last_server: Option<ServerId>,
    pub started: Instant,
    /// Where `next_upstream_timeout` counts from: the accept, or the end of its PROXY header.
    pub budget_from: Instant,
    pub last_active: Instant,
    /// The one timer this pair has armed (connect or activity deadline).
    pub timer: Option<TimerKey>,
    /// What only some pairs need (`limit_rate`, the PROXY protocol, SNI), boxed on first use
    /// so that the common pair stays small.
    pub extra: Option<Box<Extra>>,
    /// Which side sent EOF first; decides `client_closed` or `server_closed`.
    pub first_eof: Option<Side>,
    /// On the worker's list of pairs waiting for a buffer: listed once, however many events
    /// arrive while the pool stays dry.
    pub starved: bool,
}

impl Pair {
    pub fn new(
        gen: Gen,
        origin: Arc<Origin>,
        client: TcpStream,
        client_addr: SocketAddr,
        now: Instant,
    ) -> Pair {
        let throttle = |conf: &crate::config::Listen| {
            (conf.limit_rate > 0)
                .then(|| Throttle::new(conf.limit_rate, conf.limit_rate_after, now))
        };
        let (mut up, mut down) = (Direction::new(), Direction::new());
        up.throttle = throttle(&origin.conf).map(Box::new);
        down.throttle = throttle(&origin.conf).map(Box::new);
        up.splicing = Splicing::new(origin.conf.splice);
        down.splicing = up.splicing;
        Pair {
            gen,
            upstream: origin.conf.upstream,
            ticket: None,
            origin,
            state: PairState::Unassigned,
            client,
            client_addr,
            client_ready: Readiness::default(),
            server: None,
            server_ready: Readiness::default(),
            up,
            down,
            tried: Tried::default(),
            tries: 0,
            last_server: None,
            started: now,
            budget_from: now,
            last_active: now,
            timer: None,
            extra: None,
            first_eof: None,
            starved: false,
        }
    }

    /// The pair's rarely needed state, made on first use.
    pub fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    pub fn readiness(&mut self, side: Side) -> &mut Readiness {
        match side {
            Side::Client => &mut self.client_ready,
            Side::Server => &mut self.server_ready,
        }
    }

    /// Moves bytes both ways as far as readiness, budget, pool and `limit_rate` allow.
    pub fn pump(
        &mut self,
        pool: &mut BufferPool,
        pipes: &mut PipePool,
        scratch: &mut [u8],
        now: Instant,
    ) -> Result<Step, Fault> {
        let Some(server) = self.server.as_mut() else {
            return Ok(Step::Idle);
        };
        let before = (self.up.state, self.down.state);
        let up = self.up.pump(
            Ends {
                src: &mut self.client,
                src_ready: &mut self.client_ready,
                src_side: Side::Client,
                dst: server,
                dst_ready: &mut self.server_ready,
                dst_side: Side::Server,
                last: self.down.state == DirState::Closed,
            },
            pool,
            pipes,
            scratch,
            now,
        )?;
        let down = self.down.pump(
            Ends {
                src: server,
                src_ready: &mut self.server_ready,
                src_side: Side::Server,
                dst: &mut self.client,
                dst_ready: &mut self.client_ready,
                dst_side: Side::Client,
                last: self.up.state == DirState::Closed,
            },
            pool,
            pipes,
            scratch,
            now,
        )?;
        if self.first_eof.is_none() {
            if before.0 == DirState::Open && self.up.state != DirState::Open {
                self.first_eof = Some(Side::Client);
            } else if before.1 == DirState::Open && self.down.state != DirState::Open {
                self.first_eof = Some(Side::Server);
            }
        }
        Ok(up.merge(down))
    }

    /// When a direction out of its `limit_rate` budget may read again (the earlier of the two).
    pub fn throttled_until(&mut self) -> Option<Instant> {
        let until = |d: &mut Direction| d.throttle.as_deref_mut().and_then(|t| t.until.take());
        let (a, b) = (until(&mut self.up), until(&mut self.down));
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Both directions have delivered everything and shut down their destination.
    pub fn finished(&self) -> bool {
        self.up.state == DirState::Closed && self.down.state == DirState::Closed
    }

    /// One direction is done: the shorter `half_close_timeout` applies.
    pub fn half_closed(&self) -> bool {
        self.up.state != DirState::Open || self.down.state != DirState::Open
    }

    pub fn bytes(&self) -> u64 {
        self.up.bytes + self.down.bytes
    }

    pub fn release_buffers(&mut self, pool: &mut BufferPool, pipes: &mut PipePool) {
        self.up.release(pool, pipes);
        self.down.release(pool, pipes);
    }

    /// A connect attempt to `server` begins, or a spare of it is taken: it counts against
    /// `next_upstream_tries`, and the balancer does not offer `server` to this pair again.
    pub fn count_try(&mut self, server: ServerId) {
        self.tried.insert(server);
        self.tries += 1;
        self.last_server = Some(server);
    }

    /// Before the pair closes for `end`: makes closing send a reset (`SO_LINGER 0`) to each peer
    /// whose incoming stream sluice cuts short, so it never takes a cut stream for a complete
    /// one. A peer whose direction already finished keeps its FIN and everything before it (a
    /// complete reply stays complete even if the other direction then failed).
    ///
    /// A pair that sluice gives up on before any server has its stream (no server, connects
    /// failed, out of descriptors, shutdown) resets the client: a FIN would read as "the server
    /// answered nothing", and the client that already sent its request would take it as served.
    /// A pair refused for its own PROXY header or ClientHello keeps the FIN, as a refusal does.
    pub fn reset_cut_peers(&self, end: End) {
        match self.state {
            PairState::Streaming { .. } => self.reset_cut_streams(end),
            PairState::Unassigned
            | PairState::WaitingForDescriptor { .. }
            | PairState::Connecting { .. }
            | PairState::SendingProxyHeader { .. } => {
                // A server that never took the PROXY header ends in a timeout: as much a cut.
                if matches!(
                    end,
                    End::ConnectFailed
                        | End::NoServer
                        | End::Shutdown
                        | End::Error
                        | End::IdleTimeout
                        | End::HalfCloseTimeout
                ) {
                    let zero = Some(std::time::Duration::ZERO);
                    let _ = socket2::SockRef::from(&self.client).set_linger(zero);
                    // A server that got part of a PROXY header must not take it as a stream.
                    if let (Some(server), PairState::SendingProxyHeader { .. }) =
                        (&self.server, self.state)
                    {
                        let _ = socket2::SockRef::from(server).set_linger(zero);
                    }
                }
            }
            PairState::ReadingProxyHeader | PairState::Peeking => {}
        }
    }

    fn reset_cut_streams(&self, end: End) {
        let cuts = match end {
            End::Shutdown | End::Error => true,
            // Nothing was in flight on an idle pair: closing it cuts nothing.
            End::IdleTimeout | End::HalfCloseTimeout => self.in_flight(),
            _ => false,
        };
        if !cuts {
            return;
        }
        let zero = Some(std::time::Duration::ZERO);
        if self.down.state != DirState::Closed {
            let _ = socket2::SockRef::from(&self.client).set_linger(zero);
        }
        if let (Some(server), true) = (&self.server, self.up.state != DirState::Closed) {
            let _ = socket2::SockRef::from(server).set_linger(zero);
        }
    }

    /// Bytes are on their way: held in a buffer, or waiting in a source that could not be read
    /// (the destination was full and the pool dry).
    fn in_flight(&self) -> bool {
        let waiting = |dir: &Direction, src: &Readiness| {
            dir.holds_buffer() || (dir.state == DirState::Open && src.readable)
        };
        waiting(&self.up, &self.client_ready) || waiting(&self.down, &self.server_ready)
    }
}

#[cfg(test)]
mod tests {
    //! The pump against scripted streams: every case names the rule it checks and fails when
    //! that rule is broken.

    use super::*;
    use crate::metrics::PoolStats;
    use std::collections::VecDeque;
    use std::sync::Arc;

    /// One step of what a scripted socket does when read from.
    enum Read {
        Data(Vec<u8>),
        Block,
        Interrupt,
        Eof,
        Fail(io::ErrorKind),
    }

    /// One step of what a scripted socket does when written to.
    enum Write {
        Take(usize),
        Block,
        Fail(io::ErrorKind),
        Zero,
    }

    #[derive(Default)]
    struct Script {
        reads: VecDeque<Read>,
        writes: VecDeque<Write>,
        written: Vec<u8>,
        shut: bool,
        read_calls: usize,
    }

    impl Script {
        fn reading(steps: Vec<Read>) -> Script {
            Script {
                reads: steps.into(),
                ..Script::default()
            }
        }

        fn writing(steps: Vec<Write>) -> Script {
            Script {
                writes: steps.into(),
                ..Script::default()
            }
        }

        fn take(&mut self, into: &mut [u8], consume: bool) -> io::Result<usize> {
            self.read_calls += 1;
            match self.reads.front_mut() {
                None | Some(Read::Block) => {
                    if consume {
                        self.reads.pop_front();
                    }
                    Err(io::ErrorKind::WouldBlock.into())
                }
                Some(Read::Interrupt) => {
                    self.reads.pop_front();
                    Err(io::ErrorKind::Interrupted.into())
                }
                Some(Read::Eof) => Ok(0),
                Some(Read::Fail(kind)) => Err((*kind).into()),
                Some(Read::Data(bytes)) => {
                    let n = bytes.len().min(into.len());
                    into[..n].copy_from_slice(&bytes[..n]);
                    if consume {
                        bytes.drain(..n);
                        if bytes.is_empty() {
                            self.reads.pop_front();
                        }
                    }
                    Ok(n)
                }
            }
        }
    }

    impl Stream for Script {
        fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
            self.take(into, true)
        }

        fn peek(&mut self, into: &mut [u8]) -> io::Result<usize> {
            self.take(into, false)
        }

        fn write(&mut self, from: &[u8]) -> io::Result<usize> {
            let n = match self.writes.pop_front() {
                None => from.len(),
                Some(Write::Take(n)) => n.min(from.len()),
                Some(Write::Block) => return Err(io::ErrorKind::WouldBlock.into()),
                Some(Write::Fail(kind)) => return Err(kind.into()),
                Some(Write::Zero) => 0,
            };
            self.written.extend_from_slice(&from[..n]);
            Ok(n)
        }

        fn shutdown_write(&mut self) -> io::Result<()> {
            self.shut = true;
            Ok(())
        }
    }

    const BUF: usize = 8;

    struct Rig {
        src: Script,
        dst: Script,
        src_ready: Readiness,
        dst_ready: Readiness,
        pool: BufferPool,
        pipes: PipePool,
        scratch: Vec<u8>,
        dir: Direction,
        last: bool,
        now: Instant,
    }

    fn ready() -> Readiness {
        Readiness {
            readable: true,
            writable: true,
            ..Readiness::default()
        }
    }

    impl Rig {
        /// A direction with `buffers` pooled buffers of `BUF` bytes.
        fn new(src: Script, dst: Script, buffers: usize) -> Rig {
            Rig {
                src,
                dst,
                src_ready: ready(),
                dst_ready: ready(),
                pool: BufferPool::new(BUF, BUF * buffers, Arc::new(PoolStats::default())),
                pipes: PipePool::new(4096, 4, Arc::default()),
                scratch: vec![0; BUF],
                dir: Direction::new(),
                last: false,
                now: Instant::now(),
            }
        }

        fn pump(&mut self) -> Result<Step, Fault> {
            self.dir.pump(
                Ends {
                    src: &mut self.src,
                    src_ready: &mut self.src_ready,
                    src_side: Side::Client,
                    dst: &mut self.dst,
                    dst_ready: &mut self.dst_ready,
                    dst_side: Side::Server,
                    last: self.last,
                },
                &mut self.pool,
                &mut self.pipes,
                &mut self.scratch,
                self.now,
            )
        }
    }

    fn data(bytes: &[u8]) -> Read {
        Read::Data(bytes.to_vec())
    }

    #[test]
    fn a_throttle_lends_its_rate_and_says_when_to_come_back() {
        let t0 = Instant::now();
        let mut t = Throttle::new(100_000, 1000, t0);
        // The free bytes, then one step's worth of the bucket.
        assert_eq!(t.allowance(t0), 1000 + 4096);
        t.consume(1000 + 4096);
        assert_eq!(t.allowance(t0), 0);
        let back = t.ready_at(t0);
        // Half the 10,000-byte bucket at 100,000 B/s: 50 ms.
        let wait = back.duration_since(t0);
        assert!(
            wait >= std::time::Duration::from_millis(49)
                && wait <= std::time::Duration::from_millis(51),
            "{wait:?}"
        );
        assert!(t.allowance(back) >= 5000);
        // At most a tenth of a second's worth saves up.
        assert_eq!(t.allowance(t0 + std::time::Duration::from_secs(60)), 10_000);
    }

    #[test]
    fn a_throttled_direction_reads_only_its_budget_then_waits() {
        let mut r = Rig::new(
            Script::reading(vec![Read::Data(vec![7u8; 10_000])]),
            Script::default(),
            1,
        );
        r.scratch = vec![0; 16_384];
        r.dir.throttle = Some(Box::new(Throttle::new(10_000, 0, r.now)));
        assert_eq!(r.pump().ok(), Some(Step::Idle));
        assert_eq!(r.dst.written.len(), 4096, "one step of budget, no more");
        let until = r
            .dir
            .throttle
            .as_ref()
            .and_then(|t| t.until)
            .expect("told when to come back");
        assert!(until > r.now);
        assert!(r.src_ready.readable, "the source still has bytes");
        assert!(!r.dir.holds_buffer(), "waiting holds no buffer");
        r.now = until;
        if let Some(t) = r.dir.throttle.as_deref_mut() {
            t.until = None;
        }
        assert_eq!(r.pump().ok(), Some(Step::Idle));
        assert_eq!(r.dst.written.len(), 8192, "one more step after the wait");
    }

    #[test]
    fn bytes_pass_through_in_order_without_a_pooled_buffer() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"abcdefgh"), data(b"ij")]),
            Script::default(),
            1,
        );
        assert_eq!(r.pump().ok(), Some(Step::Idle));
        assert_eq!(r.dst.written, b"abcdefghij");
        assert_eq!(r.dir.bytes, 10);
        assert!(!r.dir.holds_buffer());
        assert_eq!(r.pool.in_use(), 0);
    }

    #[test]
    fn a_short_read_means_drained() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"abc"), data(b"late")]),
            Script::default(),
            1,
        );
        assert_eq!(r.pump().ok(), Some(Step::Idle));
        assert_eq!(r.dst.written, b"abc", "no read after a short one");
        assert!(!r.src_ready.readable);
        assert_eq!(r.src.read_calls, 1);
    }

    #[test]
    fn after_a_fin_short_reads_go_on_to_eof() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"abc"), data(b"de"), Read::Eof]),
            Script::default(),
            1,
        );
        r.src_ready.read_closed = true;
        r.pump().expect("pump");
        assert_eq!(r.dst.written, b"abcde");
        assert_eq!(r.dir.state, DirState::Closed);
    }

    #[test]
    fn would_block_on_read_clears_readable() {
        let mut r = Rig::new(
            Script::reading(vec![Read::Block, data(b"x")]),
            Script::default(),
            1,
        );
        assert_eq!(r.pump().ok(), Some(Step::Idle));
        assert!(!r.src_ready.readable);
        assert!(r.dst.written.is_empty());
    }

    #[test]
    fn an_interrupted_read_is_retried() {
        let mut r = Rig::new(
            Script::reading(vec![Read::Interrupt, data(b"ok")]),
            Script::default(),
            1,
        );
        r.pump().expect("pump");
        assert_eq!(r.dst.written, b"ok");
    }

    #[test]
    fn a_short_write_keeps_the_rest_in_a_pooled_buffer() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"abcdefgh")]),
            Script::writing(vec![Write::Take(3)]),
            1,
        );
        r.pump().expect("pump");
        assert_eq!(r.dst.written, b"abc");
        assert!(r.dir.holds_buffer());
        assert!(
            !r.dst_ready.writable,
            "a short write means the send buffer is full"
        );
        assert_eq!(r.dir.bytes, 3, "only delivered bytes count");
    }

    #[test]
    fn writable_again_flushes_and_returns_the_buffer() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"abcdefgh"), Read::Block]),
            Script::writing(vec![Write::Take(3)]),
            1,
        );
        r.pump().expect("pump");
        r.dst_ready.writable = true;
        r.pump().expect("pump");
        assert_eq!(r.dst.written, b"abcdefgh");
        assert!(!r.dir.holds_buffer());
        assert_eq!(r.pool.in_use(), 0);
    }

    #[test]
    fn would_block_on_write_holds_the_bytes() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"abcd")]),
            Script::writing(vec![Write::Block]),
            1,
        );
        r.pump().expect("pump");
        assert!(r.dst.written.is_empty());
        assert!(r.dir.holds_buffer());
        assert!(!r.dst_ready.writable);
    }

    #[test]
    fn an_unwritable_destination_reads_into_a_pooled_buffer_until_it_is_full() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"abcdefghijkl")]),
            Script::default(),
            1,
        );
        r.dst_ready.writable = false;
        assert_eq!(r.pump().ok(), Some(Step::Idle));
        assert!(r.dir.holds_buffer());
        assert!(
            r.src_ready.readable,
            "bytes are still waiting in the source"
        );
        assert_eq!(r.src.reads.len(), 1, "a full buffer stops reading");
        r.dst_ready.writable = true;
        r.pump().expect("pump");
        assert_eq!(r.dst.written, b"abcdefghijkl");
    }

    #[test]
    fn eof_shuts_the_destination_down_once_everything_is_out() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"ab"), Read::Eof]),
            Script::default(),
            1,
        );
        r.src_ready.read_closed = true;
        r.pump().expect("pump");
        assert_eq!(r.dir.state, DirState::Closed);
        assert!(r.dst.shut);
    }

    #[test]
    fn eof_with_bytes_pending_waits_before_the_shutdown() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"abcd"), Read::Eof]),
            Script::writing(vec![Write::Take(1)]),
            1,
        );
        r.src_ready.read_closed = true;
        r.pump().expect("pump");
        assert_eq!(r.dir.state, DirState::Draining);
        assert!(!r.dst.shut, "no FIN while bytes are still owed");
        r.dst_ready.writable = true;
        r.pump().expect("pump");
        assert_eq!(r.dst.written, b"abcd");
        assert_eq!(r.dir.state, DirState::Closed);
        assert!(r.dst.shut);
    }

    #[test]
    fn the_last_direction_to_close_skips_the_shutdown() {
        let mut r = Rig::new(Script::reading(vec![Read::Eof]), Script::default(), 1);
        r.last = true;
        r.pump().expect("pump");
        assert_eq!(r.dir.state, DirState::Closed);
        assert!(!r.dst.shut, "closing both sockets sends the FIN");
    }

    #[test]
    fn a_closed_direction_moves_nothing() {
        let mut r = Rig::new(Script::reading(vec![Read::Eof]), Script::default(), 1);
        r.pump().expect("pump");
        r.src = Script::reading(vec![data(b"after the end")]);
        r.src_ready.readable = true;
        assert_eq!(r.pump().ok(), Some(Step::Idle));
        assert!(r.dst.written.is_empty());
        assert_eq!(r.src.read_calls, 0);
    }

    #[test]
    fn a_read_error_is_a_fault_of_the_source() {
        let mut r = Rig::new(
            Script::reading(vec![Read::Fail(io::ErrorKind::ConnectionReset)]),
            Script::default(),
            1,
        );
        let fault = r.pump().expect_err("a fault");
        assert_eq!(fault.side, Side::Client);
        assert_eq!(fault.error.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn a_write_error_is_a_fault_of_the_destination() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"x")]),
            Script::writing(vec![Write::Fail(io::ErrorKind::BrokenPipe)]),
            1,
        );
        let fault = r.pump().expect_err("a fault");
        assert_eq!(fault.side, Side::Server);
        assert_eq!(fault.error.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn a_zero_length_write_is_an_error_not_a_loop() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"x")]),
            Script::writing(vec![Write::Zero]),
            1,
        );
        let fault = r.pump().expect_err("a fault");
        assert_eq!(fault.error.kind(), io::ErrorKind::WriteZero);
    }

    #[test]
    fn a_reset_while_bytes_are_held_is_still_a_fault() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"abcd")]),
            Script::writing(vec![
                Write::Block,
                Write::Fail(io::ErrorKind::ConnectionReset),
            ]),
            1,
        );
        r.pump().expect("pump");
        r.dst_ready.writable = true;
        let fault = r.pump().expect_err("the flush fails");
        assert_eq!(fault.side, Side::Server);
    }

    #[test]
    fn the_read_budget_yields_with_readiness_kept() {
        let chunks: Vec<Read> = (0..READ_BUDGET + 4).map(|_| data(b"12345678")).collect();
        let mut r = Rig::new(Script::reading(chunks), Script::default(), 1);
        assert_eq!(r.pump().ok(), Some(Step::Yield));
        assert!(r.src_ready.readable);
        assert_eq!(r.dst.written.len(), READ_BUDGET as usize * BUF);
    }

    #[test]
    fn a_dry_pool_with_a_writable_destination_passes_bytes_through() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"abcdefgh"), data(b"ij")]),
            Script::default(),
            1,
        );
        let held = r.pool.get().expect("the only buffer");
        assert!(!r.pool.can_lend());
        assert_eq!(r.pump().ok(), Some(Step::Idle));
        assert_eq!(
            r.dst.written, b"abcdefghij",
            "the dry pool must not stop a writable pair"
        );
        assert!(!r.dir.holds_buffer());
        r.pool.put(held);
    }

    #[test]
    fn a_dry_pool_consumes_only_what_the_destination_took() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"abcdefgh")]),
            Script::writing(vec![Write::Take(3), Write::Block]),
            1,
        );
        let held = r.pool.get().expect("the only buffer");
        assert_eq!(r.pump().ok(), Some(Step::Starved));
        assert_eq!(r.dst.written, b"abc");
        assert_eq!(r.dir.bytes, 3);
        // The rest is still in the source, not lost and not held by the pipe.
        let mut rest = [0u8; 8];
        assert_eq!(r.src.read(&mut rest).ok(), Some(5));
        assert_eq!(&rest[..5], b"defgh");
        r.pool.put(held);
    }

    #[test]
    fn a_dry_pool_and_a_full_destination_is_starved() {
        let mut r = Rig::new(Script::reading(vec![data(b"abc")]), Script::default(), 1);
        r.dst_ready.writable = false;
        let held = r.pool.get().expect("the only buffer");
        assert_eq!(r.pump().ok(), Some(Step::Starved));
        assert!(r.dst.written.is_empty());
        assert_eq!(
            r.src.read_calls, 0,
            "nothing is read that could not be held"
        );
        r.pool.put(held);
    }

    #[test]
    fn eof_seen_through_a_peek_drains_the_direction() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"ab"), Read::Eof]),
            Script::default(),
            1,
        );
        r.src_ready.read_closed = true;
        let held = r.pool.get().expect("the only buffer");
        r.pump().expect("pump");
        assert_eq!(r.dst.written, b"ab");
        assert_eq!(r.dir.state, DirState::Closed);
        r.pool.put(held);
    }

    #[test]
    fn release_gives_the_buffer_back() {
        let mut r = Rig::new(
            Script::reading(vec![data(b"abcd")]),
            Script::writing(vec![Write::Block]),
            1,
        );
        r.pump().expect("pump");
        assert_eq!(r.pool.in_use(), 1);
        r.dir.release(&mut r.pool, &mut r.pipes);
        assert_eq!(r.pool.in_use(), 0);
        assert!(!r.dir.holds_buffer());
    }

    /// A connected loopback pair of mio streams (client side of sluice, server side of sluice).
    fn pair_of_sockets() -> (Pair, std::net::TcpStream, std::net::TcpStream) {
        let open = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let near =
                std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (far, _) = l.accept().expect("accept");
            (TcpStream::from_std(near), far)
        };
        let (client, client_peer) = open();
        let (server, server_peer) = open();
        let now = Instant::now();
        let addr = "127.0.0.1:1".parse().expect("addr");
        let listen = crate::config::Listen::new(
            crate::config::Proto::Tcp,
            addr,
            crate::config::UpstreamId(0),
            1,
        );
        let stats = Arc::new(crate::metrics::ListenerStats::new(listen.proto, addr));
        let origin = Origin::new(listen, addr, stats);
        let mut pair = Pair::new(0, Arc::new(origin), client, addr, now);
        pair.server = Some(server);
        pair.state = PairState::Streaming {
            server: ServerId(0),
        };
        (pair, client_peer, server_peer)
    }

    fn resets(pair: &Pair) -> (bool, bool) {
        let zero = |s: &TcpStream| {
            socket2::SockRef::from(s).linger().ok().flatten() == Some(std::time::Duration::ZERO)
        };
        (zero(&pair.client), pair.server.as_ref().is_some_and(zero))
    }

    #[test]
    fn only_peers_whose_stream_is_cut_are_reset() {
        // Shutdown while both directions flow: both peers are cut.
        let (pair, _c, _s) = pair_of_sockets();
        pair.reset_cut_peers(End::Shutdown);
        assert_eq!(resets(&pair), (true, true));
        // The reply to the client was complete (down closed): only the server is cut.
        let (mut pair, _c, _s) = pair_of_sockets();
        pair.down.state = DirState::Closed;
        pair.reset_cut_peers(End::Error);
        assert_eq!(
            resets(&pair),
            (false, true),
            "a complete reply keeps its FIN"
        );
        // An idle pair with nothing in flight closes with FINs.
        let (pair, _c, _s) = pair_of_sockets();
        pair.reset_cut_peers(End::IdleTimeout);
        assert_eq!(resets(&pair), (false, false));
        // Idle with bytes waiting unread in the client socket (pool dry, server full): cut.
        let (mut pair, _c, _s) = pair_of_sockets();
        pair.client_ready.readable = true;
        pair.reset_cut_peers(End::HalfCloseTimeout);
        assert_eq!(resets(&pair), (true, true));
        // Normal ends never reset.
        let (pair, _c, _s) = pair_of_sockets();
        pair.reset_cut_peers(End::ClientClosed);
        assert_eq!(resets(&pair), (false, false));
        // A pair given up on before a server had its stream resets the client; the server
        // socket of a connect in flight carries no stream, so it closes as it is.
        for end in [End::Shutdown, End::ConnectFailed, End::NoServer, End::Error] {
            let (mut pair, _c, _s) = pair_of_sockets();
            pair.state = PairState::Unassigned;
            pair.reset_cut_peers(end);
            assert_eq!(resets(&pair), (true, false), "{end:?}");
        }
        let (mut pair, _c, _s) = pair_of_sockets();
        pair.state = PairState::Connecting {
            server: ServerId(0),
            since: Instant::now(),
        };
        pair.reset_cut_peers(End::ConnectFailed);
        assert_eq!(resets(&pair), (true, false));
        // Part of a PROXY header reached the server: both are cut.
        let (mut pair, _c, _s) = pair_of_sockets();
        pair.state = PairState::SendingProxyHeader {
            server: ServerId(0),
        };
        pair.reset_cut_peers(End::Error);
        assert_eq!(resets(&pair), (true, true));
        // The server never took the header: the idle timeout cuts both as well.
        let (mut pair, _c, _s) = pair_of_sockets();
        pair.state = PairState::SendingProxyHeader {
            server: ServerId(0),
        };
        pair.reset_cut_peers(End::IdleTimeout);
        assert_eq!(resets(&pair), (true, true));
        // A client that closed first, or was refused for its own PROXY header, gets a FIN.
        let (mut pair, _c, _s) = pair_of_sockets();
        pair.state = PairState::Connecting {
            server: ServerId(0),
            since: Instant::now(),
        };
        pair.reset_cut_peers(End::ClientClosed);
        assert_eq!(resets(&pair), (false, false));
        let (mut pair, _c, _s) = pair_of_sockets();
        pair.state = PairState::ReadingProxyHeader;
        pair.reset_cut_peers(End::Error);
        assert_eq!(resets(&pair), (false, false));
    }
}
