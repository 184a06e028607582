//! Address forms of the config language, shared by the config parser and the command line so
//! that `-U`/`-L` accept exactly what `server`/`listen` accept.
//!
//! Sans-I/O: the functions here return a message (without position; the caller adds
//! `file:line:col` or a usage prefix) and never resolve names. A server's IPv4 address must be a
//! strict dotted quad: the old forms that `inet_aton` still reads (`0177.0.0.1`, `0x7f.1`, `127.1`,
//! `2130706433`) are refused, so `010.0.0.1` can never silently mean 8.0.0.1.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A server or proxy address before resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPort<'s> {
    Addr(SocketAddr),
    Name(&'s str, u16),
}

/// `IP:PORT`, `[IPv6]:PORT`, or `host:PORT` (resolved later); port 0 is an error. `what` names
/// the value in messages ("server address").
pub fn host_port<'s>(text: &'s str, what: &str) -> Result<HostPort<'s>, String> {
    let no_port = || format!("{what} '{text}' has no port");
    let bad = || format!("bad {what} '{text}' (expected IP:PORT, [IPv6]:PORT or host:PORT)");
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(bad());
        }
        match after.strip_prefix(':') {
            Some(port) => (host, port),
            None if after.is_empty() => return Err(no_port()),
            None => return Err(bad()),
        }
    } else {
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(no_port());
        };
        if host.contains(':') {
            if text.parse::<Ipv6Addr>().is_ok() {
                return Err(format!(
                    "{what} '{text}' has no port (write IPv6 as [ADDR]:PORT)"
                ));
            }
            return Err(bad());
        }
        (host, port)
    };
    if port.is_empty() {
        return Err(no_port());
    }
    if host.is_empty() {
        return Err(format!("{what} '{text}' has no host"));
    }
    let port = match port.parse::<u16>() {
        Ok(0) if port_digits(port) => return Err(format!("{what} '{text}' has port 0")),
        Ok(number) if port_digits(port) => number,
        _ => {
            return Err(format!(
                "bad port '{port}' in {what} '{text}' (expected 1..65535)"
            ))
        }
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(HostPort::Addr(SocketAddr::new(ip, port)));
    }
    if is_numeric_host(host) {
        return Err(format!(
            "bad {what} '{text}': '{host}' is not a dotted-quad IPv4 address (write four \
             decimal numbers 0-255 without leading zeros, e.g. 127.0.0.1)"
        ));
    }
    Ok(HostPort::Name(host, port))
}

/// Only decimal digits: `+80` parses as a `u16` but is not a port as written.
fn port_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// A host made only of numbers (decimal, octal-looking or `0x` hex) and dots is an IPv4 address
/// in one of the old forms, never a name: no top-level domain is numeric.
fn is_numeric_host(host: &str) -> bool {
    host.split('.').all(|label| {
        let hex = label
            .strip_prefix("0x")
            .or_else(|| label.strip_prefix("0X"));
        match hex {
            Some(digits) => digits.bytes().all(|b| b.is_ascii_hexdigit()),
            None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
        }
    })
}

/// `IP:PORT`, `[IPv6]:PORT`, `*:PORT` or `PORT` (the last two mean 0.0.0.0:PORT); port 0 asks
/// the kernel for a free port.
pub fn listen_addr(text: &str) -> Result<SocketAddr, String> {
    let port = text.strip_prefix("*:").unwrap_or(text);
    if port_digits(port) {
        return match port.parse::<u16>() {
            Ok(port) => Ok(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))),
            Err(_) => Err(format!(
                "bad port '{port}' in listen address '{text}' (expected 0..65535)"
            )),
        };
    }
    let addr = text.parse::<SocketAddr>().map_err(|_| {
        format!("bad listen address '{text}' (expected IP:PORT, [IPv6]:PORT, *:PORT or PORT)")
    })?;
    if let SocketAddr::V6(v6) = addr {
        // An IPv6 socket bound to a mapped address fails with EINVAL: say what works instead.
        if let Some(v4) = v6.ip().to_ipv4_mapped() {
            return Err(format!(
                "listen address '{text}' is an IPv4-mapped IPv6 address (write it as {}:{})",
                v4,
                v6.port()
            ));
        }
    }
    Ok(addr)
}

/// A port range at the end of an address: `ADDR:P1-P2` gives `ADDR:P1` and the number of ports;
/// `None` when the text has no range (a plain address, parsed as before).
pub fn port_range(text: &str) -> Option<Result<(String, u16, u16), String>> {
    // A bare `P1-P2` is on every IPv4 address, as a bare `PORT` is.
    let (host, ports) = text.rsplit_once(':').unwrap_or(("0.0.0.0", text));
    let (first, last) = ports.split_once('-')?;
    if !port_digits(first) || !port_digits(last) {
        return None;
    }
    let parsed = (first.parse::<u16>(), last.parse::<u16>());
    Some(match parsed {
        (Ok(p1), Ok(p2)) if p1 >= 1 && p1 <= p2 => Ok((host.to_string(), p1, p2 - p1 + 1)),
        (Ok(p1), Ok(p2)) if p1 > p2 => {
            Err(format!("port range '{ports}' runs backwards in '{text}'"))
        }
        _ => Err(format!(
            "bad port range '{ports}' in '{text}' (expected P1-P2 within 1..65535)"
        )),
    })
}

/// Whether a connection to `server` would arrive at a listener on `listen`: the same address,
/// or a wildcard listen address of the same family and a server address that is one of this
/// host's (`local`; loopback always is). IPv4-mapped IPv6 server addresses count as IPv4.
pub fn reaches(listen: SocketAddr, server: SocketAddr, local: &[IpAddr]) -> bool {
    let ip = server.ip().to_canonical();
    if listen.port() != server.port() || listen.port() == 0 || ip.is_multicast() {
        return false;
    }
    listen.ip() == ip
        || (listen.ip().is_unspecified()
            && listen.is_ipv4() == ip.is_ipv4()
            && (ip.is_loopback() || ip.is_unspecified() || local.contains(&ip)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_ipv4_forms_are_refused_and_names_pass() {
        for text in [
            "0177.0.0.1:80",
            "0x7f.1:80",
            "127.1:80",
            "2130706433:80",
            "010.0.0.1:80",
            "256.1.1.1:80",
            "0x7F000001:80",
        ] {
            let err = host_port(text, "server address").expect_err(text);
            assert!(err.contains("not a dotted-quad"), "{text}: {err}");
        }
        assert_eq!(
            host_port("127.0.0.1:80", "s"),
            Ok(HostPort::Addr("127.0.0.1:80".parse().expect("addr")))
        );
        for name in [
            "localhost",
            "db.internal",
            "1password.example",
            "a0x1.example",
        ] {
            let text = format!("{name}:80");
            assert_eq!(
                host_port(&text, "s"),
                Ok(HostPort::Name(name, 80)),
                "{name}"
            );
        }
    }

    #[test]
    fn ports_and_ipv6_forms() {
        assert!(host_port("127.0.0.1:0", "s")
            .expect_err("port 0")
            .contains("port 0"));
        assert!(host_port("127.0.0.1:+80", "s")
            .expect_err("+80")
            .contains("bad port"));
        // `::1:80` is itself an IPv6 address: never read as [::1]:80.
        assert!(host_port("::1:80", "s")
            .expect_err("ambiguous")
            .contains("[ADDR]:PORT"));
        assert!(host_port("::1", "s")
            .expect_err("no port")
            .contains("has no port"));
        assert_eq!(
            host_port("[::1]:80", "s"),
            Ok(HostPort::Addr("[::1]:80".parse().expect("addr")))
        );
    }

    #[test]
    fn listen_forms() {
        assert_eq!(
            listen_addr("8080"),
            Ok("0.0.0.0:8080".parse().expect("addr"))
        );
        assert_eq!(listen_addr("*:0"), Ok("0.0.0.0:0".parse().expect("addr")));
        assert_eq!(listen_addr("[::]:53"), Ok("[::]:53".parse().expect("addr")));
        let err = listen_addr("[::ffff:127.0.0.1]:80").expect_err("mapped");
        assert!(err.contains("write it as 127.0.0.1:80"), "{err}");
        assert!(listen_addr("localhost:80").is_err());
    }

    #[test]
    fn what_reaches_a_listener() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let local = [IpAddr::from([192, 0, 2, 7])];
        assert!(reaches(a("127.0.0.1:80"), a("127.0.0.1:80"), &[]));
        assert!(reaches(a("0.0.0.0:80"), a("127.0.0.5:80"), &[]));
        assert!(reaches(a("0.0.0.0:80"), a("[::ffff:127.0.0.1]:80"), &[]));
        assert!(reaches(a("0.0.0.0:80"), a("192.0.2.7:80"), &local));
        assert!(reaches(a("[::]:53"), a("[::1]:53"), &[]));
        // Another host, another port, another family, a multicast group, a port-0 listener.
        assert!(!reaches(a("0.0.0.0:80"), a("192.0.2.8:80"), &local));
        assert!(!reaches(a("0.0.0.0:80"), a("127.0.0.1:81"), &[]));
        assert!(!reaches(a("[::]:80"), a("[::ffff:127.0.0.1]:80"), &[]));
        assert!(!reaches(a("0.0.0.0:80"), a("239.1.1.1:80"), &[]));
        assert!(!reaches(a("127.0.0.1:0"), a("127.0.0.1:0"), &[]));
    }
}
