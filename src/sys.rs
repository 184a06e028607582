//! The only module that talks to the OS below what `std`, `mio` and `socket2` offer, and the
//! only one allowed `unsafe`. Every unsafe block says why it is sound in a `// SAFETY:` line;
//! everything exported is a safe function.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
#[cfg(target_os = "linux")]
use std::net::{SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

/// Accepted TCP sockets inherit `TCP_NODELAY` from their listener, which saves a setsockopt per
/// client (Linux copies it; other systems may not). This and the two below took the `churn`
/// bench scenario from 22.3 to 16.2 syscalls per connection (bench/RESULTS.md, 2026-12-01).
pub const ACCEPT_INHERITS_NODELAY: bool = cfg!(target_os = "linux");

/// Closing a descriptor takes it out of the poller's set (epoll does, since sluice never
/// duplicates a descriptor), so a deregister before close would be a wasted syscall.
pub const CLOSE_DEREGISTERS: bool = cfg!(target_os = "linux");

/// A connecting TCP socket reports writable only once the handshake is done (`tcp_poll` leaves
/// EPOLLOUT out in SYN_SENT), and a failed connect also raises EPOLLERR or EPOLLHUP, so a plain
/// writable event means connected and no `SO_ERROR` or `getpeername` call is needed.
pub const WRITABLE_MEANS_CONNECTED: bool = cfg!(target_os = "linux");

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

/// A kernel pipe for splice(2): its read and write ends, both non-blocking and close-on-exec.
#[cfg(target_os = "linux")]
pub fn pipe() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid, writable array of two ints for the duration of the call.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let ends = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    Ok(ends)
}

/// Asks for a pipe of `size` bytes (`F_SETPIPE_SZ`); returns the size the kernel gave it,
/// which is rounded up to pages and may be capped by `/proc/sys/fs/pipe-max-size`.
#[cfg(target_os = "linux")]
pub fn set_pipe_size(pipe: &impl AsRawFd, size: usize) -> io::Result<usize> {
    let want = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_SETPIPE_SZ takes an int and touches no memory of ours; a bad fd is an error.
    let got = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(got as usize)
}

/// The size of a pipe's buffer (`F_GETPIPE_SZ`).
#[cfg(target_os = "linux")]
pub fn pipe_size(pipe: &impl AsRawFd) -> io::Result<usize> {
    // SAFETY: F_GETPIPE_SZ takes no argument and touches no memory of ours; a bad fd is an
    // error.
    let got = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(got as usize)
}

/// Moves up to `len` bytes from `from` to `to` inside the kernel (one of them a pipe) with
/// `SPLICE_F_MOVE | SPLICE_F_NONBLOCK`. `Ok(0)` from a socket is its end of stream.
#[cfg(target_os = "linux")]
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: null offsets mean "the file position", valid for pipes and sockets; the call
    // reads and writes no memory of ours, and bad descriptors are reported as errors.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Without splice(2), every direction copies.
#[cfg(not(target_os = "linux"))]
pub fn pipe() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    Err(io::ErrorKind::Unsupported.into())
}

#[cfg(not(target_os = "linux"))]
pub fn set_pipe_size(_pipe: &impl AsRawFd, _size: usize) -> io::Result<usize> {
    Err(io::ErrorKind::Unsupported.into())
}

#[cfg(not(target_os = "linux"))]
pub fn pipe_size(_pipe: &impl AsRawFd) -> io::Result<usize> {
    Err(io::ErrorKind::Unsupported.into())
}

#[cfg(not(target_os = "linux"))]
pub fn splice(_from: RawFd, _to: RawFd, _len: usize) -> io::Result<usize> {
    Err(io::ErrorKind::Unsupported.into())
}

/// The soft `RLIMIT_NOFILE` (1024 if it cannot be read).
#[allow(clippy::unnecessary_cast)]
pub fn nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur as u64
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

/// The addresses of this host's interfaces (`getifaddrs`), for telling whether a server address
/// is one of sluice's own.
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out pointer; on success the list is freed below, once.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut node = head;
    while !node.is_null() {
        // SAFETY: `node` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*node };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a non-null `ifa_addr` points to a sockaddr whose family tells its real
            // type; sockaddr_in and sockaddr_in6 are read only for their own family.
            let ip = unsafe {
                match libc::c_int::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                    }
                    _ => None,
                }
            };
            found.extend(ip);
        }
        node = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once; no reference into it outlives this.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// Asks the kernel to report each datagram's destination address on a UDP socket bound to a
/// wildcard address (`IP_PKTINFO`, `IPV6_RECVPKTINFO`), so a reply can leave from the address
/// the client sent to. Elsewhere than Linux it does nothing, and replies leave from the address
/// the kernel picks.
pub fn report_datagram_destination(socket: &impl AsRawFd, v6: bool) -> io::Result<()> {
    pktinfo::enable(socket.as_raw_fd(), v6)
}

/// `recv_from` that also returns the datagram's destination address, when the socket was set up
/// with [`report_datagram_destination`].
pub fn recv_from_to(
    socket: &impl AsRawFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    pktinfo::recv(socket.as_raw_fd(), buf)
}

/// `send_to` with `from` as the source address (one of this host's addresses, as reported by
/// [`recv_from_to`]).
pub fn send_to_from(
    socket: &impl AsRawFd,
    buf: &[u8],
    to: SocketAddr,
    from: IpAddr,
) -> io::Result<usize> {
    pktinfo::send(socket.as_raw_fd(), buf, to, from)
}

/// A `recvmmsg` on a non-blocking socket that returned fewer datagrams than asked found the
/// queue empty when it returned, so the next datagram makes it non-empty again and raises a new
/// edge-triggered event: the socket need not be read again until then. (A short batch can also
/// mean an error after some datagrams, which the kernel keeps for the next call; an unconnected
/// listener without `IP_RECVERR` is not given such errors.)
pub const SHORT_READ_DRAINS: bool = cfg!(target_os = "linux");

/// Datagrams one `recvmmsg` or `sendmmsg` moves at most. Sixteen take a burst of 20 clients'
/// datagrams in two calls (the `udp` bench scenario); a bigger batch saves little more and
/// costs another 64 KiB of address space per slot.
pub const DATAGRAM_BATCH: usize = 16;

/// Slots for a batch of datagrams, each with its own payload room (`slot` bytes, so one
/// datagram never runs into the next and boundaries are kept), its peer (the source of a
/// received datagram, the destination of one to send) and its local address (the destination
/// a wildcard socket saw, or the source to send from). Plain data: the system calls build
/// their headers on the stack, pointing into it, for the length of one call.
#[derive(Default)]
pub struct Datagrams {
    /// `DATAGRAM_BATCH` slots of `slot` bytes, allocated zeroed and touched only as far as
    /// datagrams reach, so the pages a small datagram never reaches are never resident.
    data: Box<[u8]>,
    slot: usize,
    lens: [usize; DATAGRAM_BATCH],
    peers: [Option<SocketAddr>; DATAGRAM_BATCH],
    locals: [Option<IpAddr>; DATAGRAM_BATCH],
    count: usize,
}

impl Datagrams {
    /// Empty slots of `slot` bytes each.
    pub fn new(slot: usize) -> Datagrams {
        Datagrams {
            data: vec![0u8; slot * DATAGRAM_BATCH].into_boxed_slice(),
            slot,
            ..Datagrams::default()
        }
    }

    /// The room of each slot; 0 before [`Datagrams::new`].
    pub fn slot_size(&self) -> usize {
        self.slot
    }

    /// Datagrams held.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == DATAGRAM_BATCH
    }

    pub fn clear(&mut self) {
        self.count = 0;
    }

    /// Datagram `i`: its bytes, its peer and its local address.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr, Option<IpAddr>)> {
        if i >= self.count {
            return None;
        }
        let start = i * self.slot;
        let bytes = self.data.get(start..start + self.lens[i])?;
        Some((bytes, self.peers[i]?, self.locals[i]))
    }

    /// The room of the next free slot, to read a datagram into before [`Datagrams::push`].
    pub fn next_room(&mut self) -> Option<&mut [u8]> {
        if self.is_full() || self.slot == 0 {
            return None;
        }
        let start = self.count * self.slot;
        self.data.get_mut(start..start + self.slot)
    }

    /// Keeps the `len` bytes just read into [`Datagrams::next_room`], for `peer`.
    pub fn push(&mut self, len: usize, peer: SocketAddr, local: Option<IpAddr>) {
        if self.is_full() {
            return;
        }
        self.lens[self.count] = len.min(self.slot);
        self.peers[self.count] = Some(peer);
        self.locals[self.count] = local;
        self.count += 1;
    }
}

/// Fills `batch` (emptied first) with the datagrams waiting on `socket`, up to
/// [`DATAGRAM_BATCH`], in one call; with `pktinfo` (the socket was set up with
/// [`report_datagram_destination`]) each carries the address it was sent to. `WouldBlock`
/// when none was waiting.
pub fn recv_many(socket: &impl AsRawFd, batch: &mut Datagrams, pktinfo: bool) -> io::Result<usize> {
    batch.clear();
    pktinfo::recv_many(socket.as_raw_fd(), batch, pktinfo)
}

/// Appends to `batch`, in one call, up to `max` of the datagrams waiting on the connected
/// `socket`, each to go on to `peer` from `local`. `WouldBlock` when none was waiting; fewer
/// than asked means the queue was empty ([`SHORT_READ_DRAINS`]), which saves the read that
/// would only say so. (An error the kernel met after some datagrams waits for the next call.)
pub fn recv_connected(
    socket: &impl AsRawFd,
    batch: &mut Datagrams,
    max: usize,
    peer: SocketAddr,
    local: Option<IpAddr>,
) -> io::Result<usize> {
    pktinfo::recv_connected(socket.as_raw_fd(), batch, max, peer, local)
}

/// Sends datagrams `from..` of `batch` from `socket` in one call, each to its peer and, where
/// it has one, from its local address. Returns how many went; an error is the first one's
/// (the caller deals with it and goes on from the next).
pub fn send_many(socket: &impl AsRawFd, batch: &Datagrams, from: usize) -> io::Result<usize> {
    if from >= batch.count {
        return Ok(0);
    }
    pktinfo::send_many(socket.as_raw_fd(), batch, from)
}

#[cfg(target_os = "linux")]
mod pktinfo {
    use super::*;
    use std::mem::{size_of, zeroed};

    /// Control-message room for one `in6_pktinfo` (the larger of the two), aligned for `cmsghdr`.
    #[repr(C, align(8))]
    struct Control([u8; 64]);

    fn on(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: `one` is a valid c_int that outlives the call; the length matches it.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn enable(fd: RawFd, v6: bool) -> io::Result<()> {
        if v6 {
            on(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
        } else {
            on(fd, libc::IPPROTO_IP, libc::IP_PKTINFO)
        }
    }

    fn socket_addr(storage: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
        match libc::c_int::from(storage.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in, which fits in it.
                let a: libc::sockaddr_in =
                    unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
                Ok(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6, which fits in it.
                let a: libc::sockaddr_in6 =
                    unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => Err(io::Error::from(io::ErrorKind::InvalidData)),
        }
    }

    pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        // SAFETY: all-zero is a valid sockaddr_storage and msghdr (null pointers, zero lengths).
        let (mut storage, mut msg): (libc::sockaddr_storage, libc::msghdr) =
            unsafe { (zeroed(), zeroed()) };
        let mut control = Control([0; 64]);
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        msg.msg_name = (&mut storage as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control.0.len() as _;
        // SAFETY: every pointer in `msg` points to a live local of the stated length.
        let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((n as usize, socket_addr(&storage)?, local_of(&msg)))
    }

    /// The destination address a received datagram's `IP_PKTINFO`/`IPV6_PKTINFO` names. Only
    /// for a header recvmsg or recvmmsg just filled: its control pointer and length are the
    /// kernel's (private to this module, whose two callers are those).
    fn local_of(msg: &libc::msghdr) -> Option<IpAddr> {
        if msg.msg_control.is_null() {
            return None;
        }
        let mut to = None;
        // SAFETY: `msg` was filled by the kernel; the CMSG_* macros walk only within
        // `msg_controllen` bytes of its control buffer, and each header's data is read unaligned.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(msg);
            while !cmsg.is_null() {
                let header = &*cmsg;
                let data = libc::CMSG_DATA(cmsg);
                // A header too short for the struct its type names is skipped, not read past.
                let fits =
                    |size: usize| header.cmsg_len as usize >= libc::CMSG_LEN(size as _) as usize;
                match (header.cmsg_level, header.cmsg_type) {
                    (libc::IPPROTO_IP, libc::IP_PKTINFO) if fits(size_of::<libc::in_pktinfo>()) => {
                        let info: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                        // The local address of the packet (ip(7)): for a datagram sent to a
                        // broadcast or multicast address, a unicast address of the interface,
                        // which a reply can leave from; `ipi_addr` would be the group itself.
                        to = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            info.ipi_spec_dst.s_addr,
                        ))));
                    }
                    (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
                        if fits(size_of::<libc::in6_pktinfo>()) =>
                    {
                        let info: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                        let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                        // A multicast group is no source; the kernel picks one then.
                        to = (!ip.is_multicast()).then_some(IpAddr::V6(ip));
                    }
                    _ => {}
                }
                cmsg = libc::CMSG_NXTHDR(msg, cmsg);
            }
        }
        to
    }

    pub fn recv_many(fd: RawFd, batch: &mut Datagrams, pktinfo: bool) -> io::Result<usize> {
        let slot = batch.slot;
        if batch.data.len() < slot * DATAGRAM_BATCH || slot == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: all-zero is a valid sockaddr_storage, iovec and mmsghdr (null pointers, zero
        // lengths); each is filled in below before the call.
        let (mut names, mut iovs, mut msgs): (
            [libc::sockaddr_storage; DATAGRAM_BATCH],
            [libc::iovec; DATAGRAM_BATCH],
            [libc::mmsghdr; DATAGRAM_BATCH],
        ) = unsafe { (zeroed(), zeroed(), zeroed()) };
        let mut controls: [Control; DATAGRAM_BATCH] = std::array::from_fn(|_| Control([0; 64]));
        for (i, room) in batch
            .data
            .chunks_exact_mut(slot)
            .enumerate()
            .take(DATAGRAM_BATCH)
        {
            iovs[i] = libc::iovec {
                iov_base: room.as_mut_ptr().cast(),
                iov_len: room.len(),
            };
        }
        for i in 0..DATAGRAM_BATCH {
            let hdr = &mut msgs[i].msg_hdr;
            hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut iovs[i];
            hdr.msg_iovlen = 1;
            if pktinfo {
                hdr.msg_control = controls[i].0.as_mut_ptr().cast();
                hdr.msg_controllen = controls[i].0.len() as _;
            }
        }
        // SAFETY: each of the DATAGRAM_BATCH headers points to its own live name, control
        // buffer and iovec, and each iovec to its own `slot` bytes of `batch.data`, all of the
        // stated lengths and alive for the call; a null timeout means none.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                DATAGRAM_BATCH as libc::c_uint,
                0,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (n as usize).min(DATAGRAM_BATCH);
        for i in 0..n {
            batch.lens[i] = (msgs[i].msg_len as usize).min(slot);
            // A datagram without a usable source address (never on IP sockets) is kept out by
            // `get`, which needs a peer.
            batch.peers[i] = socket_addr(&names[i]).ok();
            batch.locals[i] = local_of(&msgs[i].msg_hdr);
        }
        batch.count = n;
        Ok(n)
    }

    pub fn recv_connected(
        fd: RawFd,
        batch: &mut Datagrams,
        max: usize,
        peer: SocketAddr,
        local: Option<IpAddr>,
    ) -> io::Result<usize> {
        let (slot, first) = (batch.slot, batch.count.min(DATAGRAM_BATCH));
        let want = max.min(DATAGRAM_BATCH - first);
        if want == 0 || slot == 0 || batch.data.len() < slot * DATAGRAM_BATCH {
            return Ok(0);
        }
        // SAFETY: all-zero is a valid iovec and mmsghdr (null pointers, zero lengths): a
        // connected socket needs no name, and these datagrams no control data.
        let (mut iovs, mut msgs): (
            [libc::iovec; DATAGRAM_BATCH],
            [libc::mmsghdr; DATAGRAM_BATCH],
        ) = unsafe { (zeroed(), zeroed()) };
        let rooms = batch.data.chunks_exact_mut(slot).skip(first).take(want);
        for ((room, iov), msg) in rooms.zip(&mut iovs).zip(&mut msgs) {
            *iov = libc::iovec {
                iov_base: room.as_mut_ptr().cast(),
                iov_len: room.len(),
            };
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the first `want` headers each point to their own iovec, and each iovec to its
        // own free `slot` bytes of `batch.data`, alive for the call; a null timeout means none.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                want as libc::c_uint,
                0,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (n as usize).min(want);
        for (k, msg) in msgs.iter().enumerate().take(n) {
            batch.lens[first + k] = (msg.msg_len as usize).min(slot);
            batch.peers[first + k] = Some(peer);
            batch.locals[first + k] = local;
        }
        batch.count = first + n;
        Ok(n)
    }

    pub fn send_many(fd: RawFd, batch: &Datagrams, from: usize) -> io::Result<usize> {
        let count = batch.count.min(DATAGRAM_BATCH).saturating_sub(from);
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let names: [socket2::SockAddr; DATAGRAM_BATCH] = std::array::from_fn(|k| {
            let peer = batch.peers.get(from + k).copied().flatten();
            socket2::SockAddr::from(peer.unwrap_or(unspecified))
        });
        // SAFETY: all-zero is a valid iovec and mmsghdr (null pointers, zero lengths); each
        // one used is filled in below before the call.
        let (mut iovs, mut msgs): (
            [libc::iovec; DATAGRAM_BATCH],
            [libc::mmsghdr; DATAGRAM_BATCH],
        ) = unsafe { (zeroed(), zeroed()) };
        let mut controls: [Control; DATAGRAM_BATCH] = std::array::from_fn(|_| Control([0; 64]));
        for (k, iov) in iovs.iter_mut().enumerate().take(count) {
            let (bytes, _, _) = batch
                .get(from + k)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            *iov = libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            };
        }
        let parts = msgs
            .iter_mut()
            .zip(&names)
            .zip(&mut iovs)
            .zip(&mut controls);
        for (k, (((msg, name), iov), control)) in parts.enumerate().take(count) {
            let hdr = &mut msg.msg_hdr;
            hdr.msg_name = name.as_ptr() as *mut libc::c_void;
            hdr.msg_namelen = name.len();
            hdr.msg_iov = iov;
            hdr.msg_iovlen = 1;
            if let Some(local) = batch.locals.get(from + k).copied().flatten() {
                put_pktinfo(hdr, control, local)?;
            }
        }
        // SAFETY: the first `count` headers each point to their own live name, iovec (into
        // `batch.data`, read only) and control buffer, of the stated lengths, alive for the call.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), count as libc::c_uint, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Puts the `IP_PKTINFO` or `IPV6_PKTINFO` control message that sends `msg` from `from`
    /// into `control`, and points `msg` at it.
    fn put_pktinfo(msg: &mut libc::msghdr, control: &mut Control, from: IpAddr) -> io::Result<()> {
        let (level, kind, len) = match from {
            IpAddr::V4(_) => (
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                size_of::<libc::in_pktinfo>(),
            ),
            IpAddr::V6(_) => (
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                size_of::<libc::in6_pktinfo>(),
            ),
        };
        msg.msg_control = control.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(len as libc::c_uint) } as _;
        // SAFETY: `control` is aligned for cmsghdr and larger than CMSG_SPACE of either pktinfo,
        // so the first header and its data lie within it; the data is written unaligned.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            if cmsg.is_null() {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            (*cmsg).cmsg_level = level;
            (*cmsg).cmsg_type = kind;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len as libc::c_uint) as _;
            let data = libc::CMSG_DATA(cmsg);
            match from {
                IpAddr::V4(ip) => {
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(ip).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    std::ptr::write_unaligned(data.cast(), info);
                }
                IpAddr::V6(ip) => {
                    let info = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: ip.octets(),
                        },
                        ipi6_ifindex: 0,
                    };
                    std::ptr::write_unaligned(data.cast(), info);
                }
            }
        }
        Ok(())
    }

    pub fn send(fd: RawFd, buf: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<usize> {
        let to = socket2::SockAddr::from(to);
        let mut control = Control([0; 64]);
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        msg.msg_name = to.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = to.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        put_pktinfo(&mut msg, &mut control, from)?;
        // SAFETY: every pointer in `msg` points to a live value of the stated length.
        let n = unsafe { libc::sendmsg(fd, &msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(not(target_os = "linux"))]
mod pktinfo {
    use super::*;

    pub fn enable(_fd: RawFd, _v6: bool) -> io::Result<()> {
        Ok(())
    }

    fn socket(fd: RawFd) -> std::mem::ManuallyDrop<std::net::UdpSocket> {
        use std::os::fd::FromRawFd;
        // SAFETY: `fd` is an open UDP socket owned by the caller; ManuallyDrop never closes it.
        std::mem::ManuallyDrop::new(unsafe { std::net::UdpSocket::from_raw_fd(fd) })
    }

    pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        let (n, from) = socket(fd).recv_from(buf)?;
        Ok((n, from, None))
    }

    pub fn send(fd: RawFd, buf: &[u8], to: SocketAddr, _from: IpAddr) -> io::Result<usize> {
        socket(fd).send_to(buf, to)
    }

    /// Without recvmmsg: one datagram per call.
    pub fn recv_many(fd: RawFd, batch: &mut Datagrams, _pktinfo: bool) -> io::Result<usize> {
        let Some(room) = batch.next_room() else {
            return Ok(0);
        };
        let (n, from) = socket(fd).recv_from(room)?;
        batch.push(n, from, None);
        Ok(1)
    }

    /// Without recvmmsg: one datagram per call.
    pub fn recv_connected(
        fd: RawFd,
        batch: &mut Datagrams,
        max: usize,
        peer: SocketAddr,
        local: Option<IpAddr>,
    ) -> io::Result<usize> {
        let Some(room) = batch.next_room().filter(|_| max > 0) else {
            return Ok(0);
        };
        let n = socket(fd).recv(room)?;
        batch.push(n, peer, local);
        Ok(1)
    }

    /// Without sendmmsg: one datagram per call.
    pub fn send_many(fd: RawFd, batch: &Datagrams, from: usize) -> io::Result<usize> {
        let Some((bytes, to, _)) = batch.get(from) else {
            return Ok(0);
        };
        socket(fd).send_to(bytes, to)?;
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
        a.connect(b.local_addr().expect("addr")).expect("connect");
        b.connect(a.local_addr().expect("addr")).expect("connect");
        b.set_nonblocking(true).expect("nonblocking");
        (a, b)
    }

    /// Reads until `want` came, or a deadline (datagrams on loopback arrive at once, but a
    /// test must not hang on that).
    fn read_all(b: &UdpSocket, batch: &mut Datagrams, max: usize, peer: SocketAddr, want: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while batch.len() < want && std::time::Instant::now() < deadline {
            let _ = recv_connected(b, batch, max, peer, None);
        }
    }

    #[test]
    fn connected_datagrams_append_after_what_the_batch_holds() {
        let (a, b) = pair();
        let peer = SocketAddr::from(([127, 0, 0, 9], 5353));
        let mut batch = Datagrams::new(2048);
        if let Some(room) = batch.next_room() {
            room[..3].copy_from_slice(b"old");
        }
        batch.push(3, peer, None);
        for msg in [&b"one"[..], b"two!", b""] {
            a.send(msg).expect("send");
        }
        read_all(&b, &mut batch, DATAGRAM_BATCH, peer, 4);
        let got: Vec<&[u8]> = (0..batch.len())
            .filter_map(|i| batch.get(i).map(|d| d.0))
            .collect();
        assert_eq!(got, [&b"old"[..], b"one", b"two!", b""]);
        assert!(batch.get(3).is_some_and(|d| d.1 == peer));
        // Nothing more waits: a would-block, and the batch is as it was.
        let again = recv_connected(&b, &mut batch, DATAGRAM_BATCH, peer, None);
        assert_eq!(again.map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock));
        assert_eq!(batch.len(), 4);
    }

    #[test]
    fn connected_reads_take_no_more_than_asked() {
        let (a, b) = pair();
        let peer = a.local_addr().expect("addr");
        for msg in [&b"1"[..], b"2", b"3"] {
            a.send(msg).expect("send");
        }
        let mut batch = Datagrams::new(64);
        read_all(&b, &mut batch, 2, peer, 2);
        assert_eq!(batch.len(), 2);
        assert_eq!(recv_connected(&b, &mut batch, 0, peer, None).ok(), Some(0));
        read_all(&b, &mut batch, 2, peer, 3);
        assert_eq!(batch.get(2).map(|d| d.0), Some(&b"3"[..]));
    }
}
