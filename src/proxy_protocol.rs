//! The PROXY protocol, versions 1 and 2 (haproxy.org's `proxy-protocol.txt`): a header that
//! tells a server who the client really is. Sans-I/O: `parse` reads a header at the start of a
//! buffer (or says it needs more bytes, or that there is none), `encode_v1`/`encode_v2` write one.
//!
//! Limits, from the spec: a v1 header is at most 107 bytes; a v2 header's address and TLV part is
//! at most `MAX_V2_BODY` bytes here (the spec allows 65,535; 4 KiB covers every TLV in use and
//! bounds what a client can make us hold). A v2 CRC32c TLV is checked when present and written
//! (recomputed) when a header with TLVs is sent. Nothing here panics on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, `\r\n` included.
pub const V1_MAX: usize = 107;
/// The most address and TLV bytes a v2 header may carry here.
pub const MAX_V2_BODY: usize = 4096;
/// The longest header `parse` ever needs to see.
pub const MAX_HEADER: usize = 16 + MAX_V2_BODY;

const TLV_CRC32C: u8 = 0x03;
const TLV_NOOP: u8 = 0x04;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// What the header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The sender speaks for itself (a health check): keep the real peer's address.
    Local,
    /// Relayed for a client: the addresses are the client's and the one it reached.
    Proxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Stream,
    Datagram,
    /// `UNKNOWN` (v1) or `UNSPEC` (v2).
    Unspecified,
}

/// One TLV of a v2 header (type, value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    pub kind: u8,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    pub command: Command,
    pub transport: Transport,
    /// The client's address and the address it connected to; `None` for `LOCAL`, `UNKNOWN`
    /// and address families this proxy does not relay (`AF_UNIX`).
    pub addrs: Option<(SocketAddr, SocketAddr)>,
    /// v2 TLVs as received, CRC32c and NOOP left out (they are the header's own business).
    pub tlvs: Vec<Tlv>,
}

impl Header {
    /// The client address to use in place of the peer's, if the header gives one.
    pub fn client(&self) -> Option<SocketAddr> {
        match self.command {
            Command::Proxy => self.addrs.map(|(src, _)| src),
            Command::Local => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A header may start here but is not complete: read more.
    Incomplete,
    /// No PROXY header starts here.
    Absent,
    /// A whole header, and its length in bytes.
    Header(Header, usize),
    /// A header that breaks the spec, and why.
    Bad(&'static str),
}

/// Reads a PROXY header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    let v2 = V2_SIGNATURE.len().min(buf.len());
    if buf.get(..v2) == V2_SIGNATURE.get(..v2) {
        return parse_v2(buf);
    }
    let v1 = b"PROXY ".len().min(buf.len());
    if buf.get(..v1) == b"PROXY ".get(..v1) {
        return parse_v1(buf);
    }
    Parsed::Absent
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let scan = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = scan.windows(2).position(|w| w == b"\r\n") else {
        return match buf.len() >= V1_MAX {
            true => Parsed::Bad("v1 header longer than 107 bytes"),
            false => Parsed::Incomplete,
        };
    };
    let Ok(line) = std::str::from_utf8(&scan[..end]) else {
        return Parsed::Bad("v1 header is not text");
    };
    let mut words = line.split(' ');
    let _proxy = words.next();
    let header = |transport, addrs| Header {
        version: Version::V1,
        command: Command::Proxy,
        transport,
        addrs,
        tlvs: Vec::new(),
    };
    let parsed = match words.next() {
        Some("UNKNOWN") => header(Transport::Unspecified, None),
        Some(family @ ("TCP4" | "TCP6")) => {
            let fields: Vec<&str> = words.collect();
            let [src, dst, sport, dport] = fields.as_slice() else {
                return Parsed::Bad("v1 header needs 4 fields after the family");
            };
            let (Some(src), Some(dst)) = (v1_ip(src, family), v1_ip(dst, family)) else {
                return Parsed::Bad("v1 address does not match its family");
            };
            let (Some(sport), Some(dport)) = (v1_port(sport), v1_port(dport)) else {
                return Parsed::Bad("v1 port out of range");
            };
            header(
                Transport::Stream,
                Some((SocketAddr::new(src, sport), SocketAddr::new(dst, dport))),
            )
        }
        _ => return Parsed::Bad("v1 family is not TCP4, TCP6 or UNKNOWN"),
    };
    Parsed::Header(parsed, end + 2)
}

fn v1_ip(text: &str, family: &str) -> Option<IpAddr> {
    match family {
        "TCP4" => text.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
        _ => text.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
    }
}

/// A port as v1 writes it: decimal, no sign, no leading zero, 0..=65535.
fn v1_port(text: &str) -> Option<u16> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = text.len() > 1 && text.starts_with('0');
    (digits && !leading_zero)
        .then(|| text.parse().ok())
        .flatten()
}

fn parse_v2(buf: &[u8]) -> Parsed {
    let Some(fixed) = buf.get(..16) else {
        return Parsed::Incomplete;
    };
    let ver_cmd = fixed[12];
    if ver_cmd >> 4 != 2 {
        return Parsed::Bad("v2 version is not 2");
    }
    let command = match ver_cmd & 0x0f {
        0 => Command::Local,
        1 => Command::Proxy,
        _ => return Parsed::Bad("v2 command is neither LOCAL nor PROXY"),
    };
    let family = fixed[13] >> 4;
    let transport = match fixed[13] & 0x0f {
        0 => Transport::Unspecified,
        1 => Transport::Stream,
        2 => Transport::Datagram,
        _ => return Parsed::Bad("v2 transport is not STREAM or DGRAM"),
    };
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > MAX_V2_BODY {
        return Parsed::Bad("v2 header longer than 4096 bytes of addresses and TLVs");
    }
    let Some(body) = buf.get(16..16 + len) else {
        return Parsed::Incomplete;
    };
    let (addrs, rest) = match (family, body) {
        (0, _) => (None, body),
        (1, _) if body.len() >= 12 => {
            let ip = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            let src = SocketAddr::new(ip(&body[0..4]).into(), port(&body[8..10]));
            let dst = SocketAddr::new(ip(&body[4..8]).into(), port(&body[10..12]));
            (Some((src, dst)), &body[12..])
        }
        (2, _) if body.len() >= 36 => {
            let ip = |b: &[u8]| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&b[..16]);
                Ipv6Addr::from(octets)
            };
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            let src = SocketAddr::new(ip(&body[0..16]).into(), port(&body[32..34]));
            let dst = SocketAddr::new(ip(&body[16..32]).into(), port(&body[34..36]));
            (Some((src, dst)), &body[36..])
        }
        // AF_UNIX: 216 bytes of paths, relayed as no address.
        (3, _) if body.len() >= 216 => (None, &body[216..]),
        (1..=3, _) => return Parsed::Bad("v2 address block shorter than its family needs"),
        _ => return Parsed::Bad("v2 address family unknown"),
    };
    let mut tlvs = Vec::new();
    let mut at = rest;
    let mut crc_seen = None;
    let tlv_start = 16 + (body.len() - rest.len());
    while !at.is_empty() {
        let Some(&[kind, hi, lo]) = at.get(..3) else {
            return Parsed::Bad("v2 TLV cut short");
        };
        let n = usize::from(u16::from_be_bytes([hi, lo]));
        let Some(value) = at.get(3..3 + n) else {
            return Parsed::Bad("v2 TLV longer than the header");
        };
        match kind {
            TLV_CRC32C => {
                let Ok(crc) = <[u8; 4]>::try_from(value) else {
                    return Parsed::Bad("v2 CRC32c TLV is not 4 bytes");
                };
                let offset = tlv_start + (rest.len() - at.len()) + 3;
                crc_seen = Some((u32::from_be_bytes(crc), offset));
            }
            TLV_NOOP => {}
            _ => tlvs.push(Tlv {
                kind,
                value: value.to_vec(),
            }),
        }
        at = &at[3 + n..];
    }
    let total = 16 + len;
    if let Some((crc, offset)) = crc_seen {
        let mut copy = buf[..total].to_vec();
        copy[offset..offset + 4].fill(0);
        if crc32c(&copy) != crc {
            return Parsed::Bad("v2 CRC32c does not match");
        }
    }
    let header = Header {
        version: Version::V2,
        command,
        transport,
        addrs: match command {
            Command::Proxy => addrs,
            Command::Local => None,
        },
        tlvs,
    };
    Parsed::Header(header, total)
}

/// An address as the header carries it: IPv4-mapped IPv6 as the IPv4 address it is.
fn unmapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// Both addresses in one family: IPv4 when both are (or are IPv4-mapped), else both IPv6 (an
/// IPv4 one as IPv4-mapped), so a header never loses its client to a family mismatch.
fn one_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (unmapped(src), unmapped(dst));
    if s.is_ipv4() == d.is_ipv4() {
        return (s, d);
    }
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), a.port()),
        IpAddr::V6(_) => a,
    };
    (v6(src), v6(dst))
}

/// A v1 header for a TCP connection from `src` to `dst`.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = one_family(src, dst);
    let line = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            format!(
                "PROXY TCP4 {} {} {} {}\r\n",
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            )
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            format!(
                "PROXY TCP6 {} {} {} {}\r\n",
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            )
        }
        _ => "PROXY UNKNOWN\r\n".to_string(),
    };
    line.into_bytes()
}

/// A v1 header for a connection of the proxy's own (a health check).
pub fn encode_v1_unknown() -> Vec<u8> {
    b"PROXY UNKNOWN\r\n".to_vec()
}

/// A v2 header. Addresses of mixed families go as IPv6 (see `one_family`); with TLVs, a CRC32c
/// TLV is added so the receiver can check the whole header.
pub fn encode_v2(
    command: Command,
    transport: Transport,
    addrs: Option<(SocketAddr, SocketAddr)>,
    tlvs: &[Tlv],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(52 + tlvs.iter().map(|t| 3 + t.value.len()).sum::<usize>());
    encode_v2_into(&mut out, command, transport, addrs, tlvs);
    out
}

/// `encode_v2` into `out` (cleared first), so a caller that sends many headers (a UDP session's
/// datagrams) reuses one buffer.
pub fn encode_v2_into(
    out: &mut Vec<u8>,
    command: Command,
    transport: Transport,
    addrs: Option<(SocketAddr, SocketAddr)>,
    tlvs: &[Tlv],
) {
    out.clear();
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(
        0x20 | match command {
            Command::Local => 0,
            Command::Proxy => 1,
        },
    );
    let proto = match transport {
        Transport::Unspecified => 0,
        Transport::Stream => 1,
        Transport::Datagram => 2,
    };
    let addrs = addrs.map(|(s, d)| one_family(s, d));
    let family_byte_at = out.len();
    out.push(0);
    out.extend_from_slice(&[0, 0]);
    let family = match (command, addrs) {
        (Command::Proxy, Some((SocketAddr::V4(s), SocketAddr::V4(d)))) => {
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
            1
        }
        (Command::Proxy, Some((SocketAddr::V6(s), SocketAddr::V6(d)))) => {
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
            2
        }
        _ => 0,
    };
    out[family_byte_at] = family << 4 | if family == 0 { 0 } else { proto };
    let mut crc_at = None;
    let passed = |t: &&Tlv| t.kind != TLV_CRC32C && t.kind != TLV_NOOP;
    let tlv_bytes: usize = tlvs.iter().filter(passed).map(|t| 3 + t.value.len()).sum();
    // What a receiver here takes at most: if the TLVs would not all fit, none go (a partial set
    // could be worse than none: a unique id without its SSL details, say).
    let tlvs: &[Tlv] = match out.len() - 16 + tlv_bytes + 7 <= MAX_V2_BODY {
        true => tlvs,
        false => &[],
    };
    for t in tlvs.iter().filter(passed) {
        let n = t.value.len().min(usize::from(u16::MAX));
        out.push(t.kind);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&t.value[..n]);
    }
    if !tlvs.is_empty() {
        out.push(TLV_CRC32C);
        out.extend_from_slice(&4u16.to_be_bytes());
        crc_at = Some(out.len());
        out.extend_from_slice(&[0; 4]);
    }
    let body = u16::try_from(out.len() - 16).unwrap_or(u16::MAX);
    out[14..16].copy_from_slice(&body.to_be_bytes());
    if let Some(at) = crc_at {
        let crc = crc32c(out);
        out[at..at + 4].copy_from_slice(&crc.to_be_bytes());
    }
}

/// CRC-32C (Castagnoli), as the v2 CRC32c TLV uses it.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn header(buf: &[u8]) -> (Header, usize) {
        match parse(buf) {
            Parsed::Header(h, n) => (h, n),
            other => panic!("{buf:?}: {other:?}"),
        }
    }

    #[test]
    fn the_spec_v1_examples() {
        let (h, n) = header(b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\nGET /");
        assert_eq!(n, 56);
        assert_eq!(h.client(), Some(addr("255.255.255.255:65535")));
        let v6 = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert!(
            matches!(parse(v6), Parsed::Bad(_)),
            "the spec's placeholder is not an address"
        );
        let (h, _) = header(b"PROXY TCP6 2001:db8::1 ::1 56324 443\r\n");
        assert_eq!(
            h.addrs,
            Some((addr("[2001:db8::1]:56324"), addr("[::1]:443")))
        );
        let (h, n) = header(b"PROXY UNKNOWN\r\n");
        assert_eq!((h.client(), n), (None, 15));
        let (h, _) = header(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n");
        assert_eq!(h.transport, Transport::Unspecified);
        // The longest v1 header fits in 107 bytes.
        assert_eq!("PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n".len(), 107);
    }

    #[test]
    fn bad_v1_headers_say_why() {
        for (text, why) in [
            (&b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 1\r\n"[..], "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 1\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 1\r\n", "port"),
            (b"PROXY TCP4 ::1 5.6.7.8 1 1\r\n", "family"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "4 fields"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 1\r\n", "family"),
            (b"PROXY \xff\r\n", "text"),
        ] {
            match parse(text) {
                Parsed::Bad(m) => assert!(m.contains(why), "{text:?}: {m}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 120]].concat();
        assert!(matches!(parse(&long), Parsed::Bad(m) if m.contains("107")));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::Absent);
        assert_eq!(parse(b"PROX"), Parsed::Incomplete);
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Parsed::Incomplete);
    }

    #[test]
    fn round_trips_for_every_family_and_transport() {
        let pairs = [
            (addr("192.0.2.1:5000"), addr("198.51.100.2:80")),
            (addr("[2001:db8::1]:5000"), addr("[2001:db8::2]:443")),
        ];
        for (src, dst) in pairs {
            let (h, n) = header(&encode_v1(src, dst));
            assert_eq!(h.addrs, Some((src, dst)));
            assert_eq!(n, encode_v1(src, dst).len());
            for transport in [Transport::Stream, Transport::Datagram] {
                let bytes = encode_v2(Command::Proxy, transport, Some((src, dst)), &[]);
                let (h, n) = header(&bytes);
                assert_eq!(
                    (h.version, h.transport, h.addrs),
                    (Version::V2, transport, Some((src, dst)))
                );
                assert_eq!(n, bytes.len());
            }
        }
        // A v4-mapped client goes out as IPv4.
        let mapped = addr("[::ffff:192.0.2.9]:1234");
        assert!(
            encode_v1(mapped, addr("[::ffff:192.0.2.1]:80")).starts_with(b"PROXY TCP4 192.0.2.9 ")
        );
        let (h, _) = header(&encode_v2(
            Command::Proxy,
            Transport::Stream,
            Some((mapped, addr("192.0.2.1:80"))),
            &[],
        ));
        assert_eq!(h.client(), Some(addr("192.0.2.9:1234")));
        // LOCAL keeps the real peer.
        let (h, n) = header(&encode_v2(
            Command::Local,
            Transport::Unspecified,
            None,
            &[],
        ));
        assert_eq!((h.command, h.client(), n), (Command::Local, None, 16));
        // Mixed families go as IPv6 rather than lose the client (found by fuzzing: a v2 header
        // with an IPv4-mapped source and an IPv6 destination came back with no address).
        assert_eq!(
            encode_v1(addr("192.0.2.1:1"), addr("[::1]:2")),
            b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n"
        );
        let mixed = (addr("[::ffff:0.0.1.0]:5"), addr("[2001:db8::1]:6"));
        let (h, _) = header(&encode_v2(
            Command::Proxy,
            Transport::Stream,
            Some(mixed),
            &[],
        ));
        assert_eq!(h.addrs, Some(mixed));
    }

    #[test]
    fn tlvs_pass_and_the_crc_is_checked() {
        let tlvs = vec![
            Tlv {
                kind: 0x01,
                value: b"h2".to_vec(),
            },
            Tlv {
                kind: 0x02,
                value: b"example.com".to_vec(),
            },
            Tlv {
                kind: 0xe0,
                value: vec![1, 2, 3],
            },
        ];
        let mut bytes = encode_v2(
            Command::Proxy,
            Transport::Stream,
            Some((addr("192.0.2.1:5000"), addr("192.0.2.2:80"))),
            &tlvs,
        );
        let (h, _) = header(&bytes);
        assert_eq!(h.tlvs, tlvs, "received as sent, the CRC TLV left out");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert_eq!(parse(&bytes), Parsed::Bad("v2 CRC32c does not match"));
        // The check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn every_truncation_waits_and_nothing_panics() {
        let v2 = encode_v2(
            Command::Proxy,
            Transport::Stream,
            Some((addr("[2001:db8::1]:5000"), addr("[2001:db8::2]:443"))),
            &[Tlv {
                kind: 0x05,
                value: vec![9; 20],
            }],
        );
        let v1 = encode_v1(addr("192.0.2.1:5000"), addr("192.0.2.2:80"));
        for full in [&v2, &v1] {
            for cut in 0..full.len() {
                assert_eq!(parse(&full[..cut]), Parsed::Incomplete, "cut at {cut}");
            }
        }
        let mut oversize = v2.clone();
        oversize[14..16].copy_from_slice(&5000u16.to_be_bytes());
        assert!(matches!(parse(&oversize), Parsed::Bad(m) if m.contains("4096")));
        let mut wrong = v2.clone();
        wrong[12] = 0x31;
        assert!(matches!(parse(&wrong), Parsed::Bad(_)));
        let mut rng = crate::testing::XorShift(77);
        for _ in 0..20_000 {
            let mut buf = v2.clone();
            let i = rng.index(buf.len());
            buf[i] = rng.next() as u8;
            buf.truncate(rng.index(buf.len() + 1));
            let _ = parse(&buf);
        }
    }
}
