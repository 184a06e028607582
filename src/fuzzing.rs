//! The entry points of the fuzz targets (`fuzz/`, cargo-fuzz on nightly), here so that
//! `tests/fuzz_corpus.rs` replays every corpus file through the same code on stable: a crash
//! once found stays fixed. Each takes arbitrary bytes, must never panic, and checks what the
//! parser promises about what it accepts.

use crate::admin::http::{self, Parse};
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
