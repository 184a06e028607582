//! Address ranges (`10.0.0.0/8`, `2001:db8::/32`, or one address) for allow lists.
//!
//! Sans-I/O and total: `Cidr::parse` returns a message for any text it refuses, `contains`
//! never panics. An IPv4 client seen on an IPv6 socket (`::ffff:10.1.2.3`) matches the IPv4
//! ranges, so a dual-stack listener does not need both forms.

use std::fmt;
use std::net::IpAddr;

/// An address and how many of its leading bits a client must share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `ADDR/BITS` or a bare address (all bits). The host bits must be zero (`10.1.0.0/8` is a
    /// mistake worth naming, not a range to guess).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (ip, bits) = match text.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits)),
            None => (text, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("bad address '{ip}' in '{text}' (expected e.g. 10.0.0.0/8)"))?;
        if let IpAddr::V6(v6) = addr {
            if let Some(v4) = v6.to_ipv4_mapped() {
                // Clients in that form are matched as the IPv4 address they are.
                return Err(format!(
                    "'{text}' is an IPv4 address in IPv6 form: write the IPv4 range ({v4}/...)"
                ));
            }
        }
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = match bits {
            None => max,
            Some(bits) => match bits.parse::<u8>() {
                Ok(n) if n <= max && !bits.starts_with('+') => n,
                _ => {
                    return Err(format!(
                        "bad prefix length '/{bits}' in '{text}' (0 to {max})"
                    ))
                }
            },
        };
        let cidr = Cidr { addr, prefix };
        if cidr.network() != bits_of(addr) {
            return Err(format!(
                "'{text}' has host bits set (the range is {})",
                Cidr {
                    addr: from_bits(addr, cidr.network()),
                    prefix
                }
            ));
        }
        Ok(cidr)
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// How many leading bits a client must share.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The range's address bits (an IPv4 address in the low 32).
    pub fn bits(&self) -> u128 {
        self.network()
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = unmapped(ip);
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        (bits_of(ip) & self.mask()) == self.network()
    }

    fn width(&self) -> u32 {
        match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    /// The prefix's bits set, aligned as `bits_of` aligns addresses.
    fn mask(&self) -> u128 {
        let host = self.width() - u32::from(self.prefix);
        let all = match self.width() {
            32 => u128::from(u32::MAX),
            _ => u128::MAX,
        };
        all.checked_shr(host).map_or(0, |m| m << host)
    }

    fn network(&self) -> u128 {
        bits_of(self.addr) & self.mask()
    }
}

/// An address's bits (an IPv4 address in the low 32), as ranges hold them.
pub fn bits_of(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// An IPv4 client seen on an IPv6 socket (`::ffff:a.b.c.d`) as the IPv4 address it is.
pub fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn from_bits(like: IpAddr, bits: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4((bits as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(bits.into()),
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn ranges_contain_what_they_should() {
        let net = Cidr::parse("10.0.0.0/8").expect("cidr");
        assert!(net.contains(ip("10.255.1.2")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(net.contains(ip("::ffff:10.1.2.3")), "v4-mapped");
        assert!(!net.contains(ip("::1")));
        let one = Cidr::parse("127.0.0.1").expect("cidr");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let all = Cidr::parse("0.0.0.0/0").expect("cidr");
        assert!(all.contains(ip("203.0.113.9")) && !all.contains(ip("2001:db8::1")));
        let v6 = Cidr::parse("2001:db8::/32").expect("cidr");
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        assert!(Cidr::parse("::/0").expect("cidr").contains(ip("::1")));
        assert_eq!(one.to_string(), "127.0.0.1/32");
    }

    #[test]
    fn bad_ranges_are_named() {
        for (text, says) in [
            ("10.0.0.0/33", "bad prefix length '/33'"),
            ("10.0.0.0/", "bad prefix length '/'"),
            ("10.0.0.0/+8", "bad prefix length"),
            ("10.1.0.0/8", "has host bits set (the range is 10.0.0.0/8)"),
            ("10.0.0/8", "bad address '10.0.0'"),
            ("example.com/8", "bad address"),
            ("", "bad address"),
            ("::1/129", "(0 to 128)"),
            (
                "::ffff:10.0.0.0/104",
                "an IPv4 address in IPv6 form: write the IPv4 range (10.0.0.0/...)",
            ),
        ] {
            let e = Cidr::parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
