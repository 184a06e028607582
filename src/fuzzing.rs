//! The entry points of the fuzz targets (`fuzz/`, cargo-fuzz on nightly), here so that
//! `tests/fuzz_corpus.rs` replays every corpus file through the same code on stable: a crash
//! once found stays fixed. Each takes arbitrary bytes, must never panic, and checks what the
//! parser promises about what it accepts.

use crate::admin::http::{self, Parse};
use crate::proxy_protocol as pp;
use std::net::{IpAddr, SocketAddr};

fn unmapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(v4.into(), a.port())),
        IpAddr::V4(_) => a,
    }
}
use crate::config::{Cidr, Config};

/// The admin endpoint's request head parser.
pub fn admin_http(data: &[u8]) {
    match http::parse(data) {
        Parse::Done(r) => {
            assert!(r.path.starts_with('/'), "a path that is not origin-form");
            for name in ["upstream", "server", "state", "listener", "client"] {
                let _ = http::param(r.query, name);
            }
        }
        Parse::Partial => assert!(data.len() <= http::MAX_HEAD + 4, "no limit on a head"),
        Parse::Bad(status) => assert!(status.code() >= 400),
    }
}

/// The config parser (host names are refused, never resolved).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse_without_names(text, "fuzz.conf") {
        let _ = config.summary();
        // A config that parses names valid upstreams for every listener.
        for l in &config.listeners {
            assert!(l.upstream.0 < config.upstreams.len(), "a dangling upstream");
        }
    }
}

/// Address ranges of allow lists.
pub fn cidr(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(range) = Cidr::parse(text) {
        let again = Cidr::parse(&range.to_string()).expect("a range reads back");
        assert_eq!(again, range);
        for ip in ["127.0.0.1", "::1", "10.1.2.3", "::ffff:10.1.2.3", "0.0.0.0"] {
            let _ = range.contains(ip.parse().expect("ip"));
        }
    }
}

/// The PROXY header parser: a header found is found whole (every shorter prefix of it is
/// `Incomplete`), and one re-encoded reads back the same.
pub fn proxy_protocol(data: &[u8]) {
    let data = data.get(..pp::MAX_HEADER + 16).unwrap_or(data);
    if let pp::Parsed::Header(h, len) = pp::parse(data) {
        assert!(len <= data.len());
        for cut in 0..len {
            assert_eq!(
                pp::parse(data.get(..cut).unwrap_or_default()),
                pp::Parsed::Incomplete,
                "a prefix of a header is not incomplete"
            );
        }
        if h.version == pp::Version::V2 && h.command == pp::Command::Proxy {
            let again = pp::encode_v2(h.command, h.transport, h.addrs, &h.tlvs);
            match pp::parse(&again) {
                pp::Parsed::Header(back, _) => {
                    // IPv4-mapped addresses may come back as IPv4: the same addresses.
                    let plain = |a: Option<(SocketAddr, SocketAddr)>| {
                        a.map(|(s, d)| (unmapped(s), unmapped(d)))
                    };
                    assert_eq!(plain(back.addrs), plain(h.addrs));
                    assert_eq!(back.tlvs, h.tlvs);
                }
                other => panic!("a re-encoded header does not read back: {other:?}"),
            }
        }
    }
}

/// The ClientHello reader: a name found is found whole (every shorter prefix is `Incomplete`,
/// for a hello that fits in one read) and is a lower-case host name without a trailing dot.
pub fn sni(data: &[u8]) {
    if let crate::sni::Hello::Found(Some(name)) = crate::sni::parse(data) {
        assert!(!name.ends_with('.') && name == name.to_ascii_lowercase());
        let _ = crate::sni::route(&[("*.example.org".to_string(), 1u8)], &name);
    }
}

/// The DNS answer reader: any bytes, read as the answer to an A and to an AAAA query for
/// `a.test` with the id the bytes start with, so the fuzzer gets past the id check.
pub fn dns(data: &[u8]) {
    use crate::resolver::message::{answer, QType};
    let id = match data {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 0,
    };
    for (qtype, v4) in [(QType::A, true), (QType::Aaaa, false)] {
        if let Ok(a) = answer(data, id, "a.test", qtype) {
            assert!(
                a.addrs.iter().all(|ip| ip.is_ipv4() == v4),
                "another family"
            );
            assert!(
                a.addrs.len() <= data.len() / 4,
                "more addresses than records"
            );
        }
    }
}
