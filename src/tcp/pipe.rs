//! A TCP pair: the client socket, the server socket and the two directions between them.
//!
//! Each direction is its own state machine, `Open → Draining → Closed`: `Draining` means the
//! source sent EOF and bytes are still on their way; `Closed` means the destination got our
//! `shutdown(Write)`. The other direction keeps flowing, so a half-closed client still gets the
//! whole answer. Readiness is kept here, in userland (sockets are registered once,
//! edge-triggered): an event sets bits, `WouldBlock` clears them, and [`Pair::pump`] works on
//! what is set. A direction holds a pooled buffer only while the destination could not take
//! everything read, so a pair holds at most two buffers and an idle pair holds none.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Instant;

use mio::net::TcpStream;

use super::buffer::{Buffer, BufferPool};
use crate::runtime::timer::TimerKey;
use crate::runtime::token::Side;
use crate::upstream::Tried;

/// What the kernel last told us about one socket.
#[derive(Debug, Default, Clone, Copy)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
    /// The peer's FIN (or a reset) was reported: read on to `Ok(0)` even after a short read.
    pub read_closed: bool,
    /// An error or a hang-up was reported: a connect under way may have failed.
    pub hung_up: bool,
}

impl Readiness {
    pub fn absorb(&mut self, event: &mio::event::Event) {
        // Closed and error conditions count as ready: the next read or write reports them.
        self.readable |= event.is_readable() || event.is_read_closed() || event.is_error();
        self.writable |= event.is_writable() || event.is_write_closed() || event.is_error();
        self.read_closed |= event.is_read_closed() || event.is_error();
        self.hung_up |= event.is_error() || event.is_write_closed() || event.is_read_closed();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirState {
    Open,
    /// The source sent EOF; pending bytes still go out before the destination is shut down.
    Draining,
    /// `shutdown(Write)` went to the destination.
    Closed,
}

/// One way through the pair.
pub struct Direction {
    pub state: DirState,
    buf: Option<Buffer>,
    /// Bytes delivered to the destination.
    pub bytes: u64,
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

/// Ends of one direction, borrowed from the pair for one pump.
struct Ends<'a> {
    src: &'a mut TcpStream,
    src_ready: &'a mut Readiness,
    src_side: Side,
    dst: &'a mut TcpStream,
    dst_ready: &'a mut Readiness,
    dst_side: Side,
    /// The other direction is closed: when this one closes too, the pair closes its sockets at
    /// once, and `close` sends the same FIN that `shutdown` would.
    last: bool,
}

impl Direction {
    pub fn new() -> Direction {
        Direction {
            state: DirState::Open,
            buf: None,
            bytes: 0,
        }
    }

    pub fn holds_buffer(&self) -> bool {
        self.buf.is_some()
    }

    /// Gives the buffer back to the pool (the pair is closing).
    pub fn release(&mut self, pool: &mut BufferPool) {
        if let Some(buf) = self.buf.take() {
            pool.put(buf);
        }
    }

    /// Moves bytes from `src` to `dst` until the kernel says wait, the budget runs out, or the
    /// pool is dry.
    fn pump(
        &mut self,
        io: Ends<'_>,
        pool: &mut BufferPool,
        scratch: &mut [u8],
    ) -> Result<Step, Fault> {
        let read_fault = |error| Fault {
            side: io.src_side,
            error,
        };
        let mut budget = READ_BUDGET;
        loop {
            self.flush(io.dst, io.dst_ready, pool)
                .map_err(|error| Fault {
                    side: io.dst_side,
                    error,
                })?;
            match self.state {
                DirState::Open => {}
                DirState::Draining => {
                    if self.buf.is_none() {
                        self.state = DirState::Closed;
                        // Both sources were read to EOF, so closing sends a FIN, not a reset.
                        if !io.last {
                            // The peer may already be gone; the other direction will see it.
                            let _ = io.dst.shutdown(Shutdown::Write);
                        }
                    }
                    return Ok(Step::Idle);
                }
                DirState::Closed => return Ok(Step::Idle),
            }
            if !io.src_ready.readable {
                return Ok(Step::Idle);
            }
            if budget == 0 {
                return Ok(Step::Yield);
            }
            budget -= 1;
            // How many bytes this read asked for: a shorter answer means the socket is drained
            // (edge-triggered: new data raises a new event), which saves the read that would
            // only say `WouldBlock`.
            let asked;
            let read = match &mut self.buf {
                // Bytes are waiting for the destination: read behind them, or wait if full.
                Some(buf) => {
                    let spare = buf.spare();
                    if spare.is_empty() {
                        return Ok(Step::Idle);
                    }
                    asked = spare.len();
                    match read_some(io.src, spare) {
                        Ok(Some(n)) if n > 0 => {
                            buf.commit(n);
                            Ok(Some(n))
                        }
                        other => other,
                    }
                }
                // The destination cannot take anything now: read straight into a pooled buffer.
                None if !io.dst_ready.writable => {
                    let Some(mut buf) = pool.get() else {
                        return Ok(Step::Starved);
                    };
                    let spare = buf.spare();
                    asked = spare.len();
                    let got = read_some(io.src, spare);
                    match got {
                        Ok(Some(n)) if n > 0 => {
                            buf.commit(n);
                            self.buf = Some(buf);
                        }
                        _ => pool.put(buf),
                    }
                    got
                }
                // The usual case: read into the worker's scratch buffer and write on at once;
                // only what the destination refuses moves into a pooled buffer.
                None => {
                    if !pool.can_lend() {
                        return Ok(Step::Starved);
                    }
                    asked = scratch.len();
                    match read_some(io.src, scratch) {
                        Ok(Some(n)) if n > 0 => {
                            let chunk = scratch.get(..n).unwrap_or_default();
                            self.forward(chunk, io.dst, io.dst_ready, pool)
                                .map_err(|error| Fault {
                                    side: io.dst_side,
                                    error,
                                })?;
                            Ok(Some(n))
                        }
                        other => other,
                    }
                }
            };
            match read {
                Ok(Some(0)) => {
                    self.state = DirState::Draining;
                    io.src_ready.readable = false;
                }
                Ok(Some(n)) => {
                    if n < asked && !io.src_ready.read_closed {
                        io.src_ready.readable = false;
                    }
                }
                Ok(None) => io.src_ready.readable = false,
                Err(error) => return Err(read_fault(error)),
            }
        }
    }

    /// Writes pending bytes while the destination takes them; returns the buffer when empty.
    fn flush(
        &mut self,
        dst: &mut TcpStream,
        ready: &mut Readiness,
        pool: &mut BufferPool,
    ) -> io::Result<()> {
        let Some(buf) = &mut self.buf else {
            return Ok(());
        };
        while !buf.is_empty() && ready.writable {
            let asked = buf.pending().len();
            match write_some(dst, buf.pending())? {
                Some(n) => {
                    buf.consume(n);
                    self.bytes += n as u64;
                    // A short write means the send buffer is full; EPOLLOUT will say when not.
                    ready.writable = n == asked;
                }
                None => ready.writable = false,
            }
        }
        if buf.is_empty() {
            if let Some(buf) = self.buf.take() {
                pool.put(buf);
            }
        }
        Ok(())
    }

    /// Writes a freshly read chunk; keeps what the destination did not take.
    fn forward(
        &mut self,
        mut chunk: &[u8],
        dst: &mut TcpStream,
        ready: &mut Readiness,
        pool: &mut BufferPool,
    ) -> io::Result<()> {
        while !chunk.is_empty() && ready.writable {
            match write_some(dst, chunk)? {
                Some(n) => {
                    self.bytes += n as u64;
                    ready.writable = n == chunk.len();
                    chunk = chunk.get(n..).unwrap_or_default();
                }
                None => ready.writable = false,
            }
        }
        if !chunk.is_empty() {
            // `pump` checked `can_lend` before reading, and a chunk is at most one buffer long.
            let mut buf = pool
                .get()
                .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
            buf.push(chunk);
            self.buf = Some(buf);
        }
        Ok(())
    }
}

impl Default for Direction {
    fn default() -> Self {
        Direction::new()
    }
}

/// `Ok(None)` means WouldBlock.
fn read_some(src: &mut TcpStream, into: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match src.read(into) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `Ok(None)` means WouldBlock. A zero-length write of a non-empty slice is an error.
fn write_some(dst: &mut TcpStream, from: &[u8]) -> io::Result<Option<usize>> {
    loop {
        match dst.write(from) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Where a pair is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairState {
    /// Accepted, or between two connect attempts: no server socket.
    Unassigned,
    /// A non-blocking connect to `server` is under way, started at `since`.
    Connecting { server: usize, since: Instant },
    /// Bytes flow between the client and `server`.
    Streaming { server: usize },
    /// Done with; the slot and both sockets are freed at the end of the event batch.
    Closed,
}

/// One client connection and its server connection.
pub struct Pair {
    pub gen: u32,
    pub listener: usize,
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
    pub started: Instant,
    pub last_active: Instant,
    /// The one timer this pair has armed (connect or activity deadline).
    pub timer: Option<TimerKey>,
    /// Which side sent EOF first; decides `client_closed` or `server_closed`.
    pub first_eof: Option<Side>,
}

impl Pair {
    pub fn new(
        gen: u32,
        listener: usize,
        client: TcpStream,
        client_addr: SocketAddr,
        now: Instant,
    ) -> Pair {
        Pair {
            gen,
            listener,
            state: PairState::Unassigned,
            client,
            client_addr,
            client_ready: Readiness::default(),
            server: None,
            server_ready: Readiness::default(),
            up: Direction::new(),
            down: Direction::new(),
            tried: Tried::default(),
            tries: 0,
            started: now,
            last_active: now,
            timer: None,
            first_eof: None,
        }
    }

    pub fn readiness(&mut self, side: Side) -> &mut Readiness {
        match side {
            Side::Client => &mut self.client_ready,
            Side::Server => &mut self.server_ready,
        }
    }

    /// Moves bytes both ways as far as readiness, budget and pool allow.
    pub fn pump(&mut self, pool: &mut BufferPool, scratch: &mut [u8]) -> Result<Step, Fault> {
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
            scratch,
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
            scratch,
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

    pub fn release_buffers(&mut self, pool: &mut BufferPool) {
        self.up.release(pool);
        self.down.release(pool);
    }

    pub fn buffers_held(&self) -> usize {
        usize::from(self.up.holds_buffer()) + usize::from(self.down.holds_buffer())
    }
}
