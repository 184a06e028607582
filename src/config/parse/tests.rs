//! The parser against text: every directive, every error and its position.

use super::directives::LOG_LEVELS;
use super::values::{levenshtein, suggest};
use super::*;
use crate::config::{Balance, HealthCheck, Proto, Server, UpstreamId};
use crate::testing::XorShift;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// Knows only `localhost` (twice 127.0.0.1, to show duplicates fold, and ::1) and
/// `nowhere.localhost` (no addresses); everything else fails. Never touches DNS.
fn fake_resolve(host: &str, port: u16, _: &crate::config::Resolver) -> io::Result<Vec<SocketAddr>> {
    match host {
        "localhost" => Ok(vec![
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
            SocketAddr::from(([127, 0, 0, 1], port)),
        ]),
        "nowhere.localhost" => Ok(Vec::new()),
        _ => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "Name or service not known",
        )),
    }
}

fn ok(text: &str) -> Config {
    parse_with(text, "t.conf", &fake_resolve).unwrap_or_else(|e| panic!("{e}"))
}

fn fail(text: &str) -> ConfigError {
    match parse_with(text, "t.conf", &fake_resolve) {
        Ok(config) => panic!("expected an error for {text:?}, got {config:?}"),
        Err(e) => e,
    }
}

#[track_caller]
fn assert_err(text: &str, line: u32, col: u32, phrase: &str) {
    let e = fail(text);
    assert_eq!((e.line, e.col), (line, col), "position of: {e}");
    assert!(
        e.message.contains(phrase),
        "{e:?} should contain {phrase:?}"
    );
    assert_eq!(e.to_string(), format!("t.conf:{line}:{col}: {}", e.message));
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv6Addr::LOCALHOST, port))
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

const ONE: &str = "upstream b {\n  server 127.0.0.1:1;\n}\n";

/// DESIGN.md §3, restricted to the directives this parser knows, with loopback addresses.
const EXAMPLE: &str = r#"# main context                              default
max_connections 10000;                      # all listeners together
buffer_size 16k;                            # per direction, per pair, only while bytes are in flight
buffer_memory 64m;                          # hard cap for all buffers of a worker
log_level info;                             # error|warn|info|debug|trace; RUST_LOG wins
access_log on;                              # one line per finished connection/session

upstream backend {
balance round_robin;                    # round_robin | weighted_round_robin | least_conn | random | ip_hash | hash
server 127.0.0.1:6379 weight=3 max_conns=100 max_fails=3 fail_timeout=10s;
server 127.0.0.1:6382;
server 127.0.0.1:6381 backup;           # used only when no primary is up
server [::1]:6379 down;                 # configured but never picked
health_check interval=5s timeout=2s rise=2 fall=3;               # TCP connect probe
# health_check interval=5s send="PING\r\n" expect="+PONG";      # optional payload check
}

listen 127.0.0.1:6380 {                     # "listen tcp ADDR" is the same; "listen udp ADDR" for UDP
proxy backend;                          # an upstream name, or an address: proxy 127.0.0.1:6379;
connect_timeout 5s;                     # default 5s
idle_timeout 10m;                       # default 10m for tcp, 30s for udp
half_close_timeout 1m;                  # once one side has finished; default: idle_timeout
next_upstream_tries 3;                  # connect attempts in all; default: number of servers
next_upstream_timeout 10s;              # default 0 = no limit beyond tries
}

listen udp 127.0.0.1:5353 {
proxy dns;
idle_timeout 30s;
udp_responses 1;                        # replies per session before it closes; 0 = unlimited
max_sessions 10000;
}

upstream dns {
server 127.0.0.1:53;
}
"#;

// ---- durations and sizes ----

#[test]
fn durations_in_every_unit() {
    let cases = [
        ("250ms", Duration::from_millis(250)),
        ("0ms", Duration::ZERO),
        ("10s", Duration::from_secs(10)),
        ("10", Duration::from_secs(10)),
        ("0", Duration::ZERO),
        ("5m", Duration::from_secs(300)),
        ("2h", Duration::from_secs(7_200)),
        ("1d", Duration::from_secs(86_400)),
        ("007s", Duration::from_secs(7)),
        ("200us", Duration::from_micros(200)),
        ("18446744073709551615ms", Duration::from_millis(u64::MAX)),
    ];
    for (text, want) in cases {
        assert_eq!(parse_duration(text), Some(want), "{text}");
    }
}

#[test]
fn bad_durations_are_none() {
    for text in [
        "",
        "s",
        "ms",
        "10x",
        "-5s",
        "+5s",
        "1.5s",
        " 1s",
        "1s ",
        "1 s",
        "10S",
        "1sm",
        "5min",
        "1_000",
        "0x10",
        "1e3",
        "١s",
        // overflow: digits beyond u64, and units that overflow u64 milliseconds
        "99999999999999999999",
        "18446744073709551616ms",
        "18446744073709551615s",
        "213503982334602d",
    ] {
        assert_eq!(parse_duration(text), None, "{text:?}");
    }
}

#[test]
fn sizes_in_every_unit() {
    let cases = [
        ("0", 0),
        ("512", 512),
        ("16k", 16 << 10),
        ("16K", 16 << 10),
        ("4m", 4 << 20),
        ("4M", 4 << 20),
        ("1g", 1 << 30),
        ("1G", 1 << 30),
    ];
    for (text, want) in cases {
        assert_eq!(parse_size(text), Some(want), "{text}");
    }
}

#[test]
fn bad_sizes_are_none() {
    for text in [
        "",
        "k",
        "16x",
        "-1k",
        "+1k",
        "1.5m",
        "16kb",
        "16 k",
        "1t",
        "99999999999999999999",
        "18446744073709551615g",
    ] {
        assert_eq!(parse_size(text), None, "{text:?}");
    }
}

// ---- whole files ----

#[test]
fn design_example() {
    let config = ok(EXAMPLE);
    assert_eq!(config.max_connections, 10_000);
    assert_eq!(config.buffer_size, 16 << 10);
    assert_eq!(config.buffer_memory, 64 << 20);
    assert_eq!(config.log_level, log::LevelFilter::Info);
    assert!(config.access_log);

    let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["backend", "dns"]);
    let backend = &config.upstreams[0];
    assert_eq!(backend.balance, Balance::RoundRobin);
    let first = Server {
        weight: 3,
        max_conns: 100,
        max_fails: 3,
        fail_timeout: Duration::from_secs(10),
        ..Server::new(v4(6379))
    };
    let backup = Server {
        backup: true,
        ..Server::new(v4(6381))
    };
    let down = Server {
        down: true,
        ..Server::new(v6(6379))
    };
    assert_eq!(
        backend.servers,
        [first, Server::new(v4(6382)), backup, down]
    );
    assert_eq!(
        backend.health_check,
        Some(HealthCheck {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
            send: Vec::new(),
            expect: Vec::new(),
        })
    );
    assert_eq!(config.upstreams[1].servers, [Server::new(v4(53))]);

    let tcp = &config.listeners[0];
    assert_eq!(
        (tcp.proto, tcp.addr, tcp.upstream.0),
        (Proto::Tcp, v4(6380), 0)
    );
    assert_eq!(tcp.connect_timeout, Duration::from_secs(5));
    assert_eq!(tcp.idle_timeout, Duration::from_secs(600));
    assert_eq!(tcp.half_close_timeout, Duration::from_secs(60));
    assert_eq!(tcp.next_upstream_tries, 3);
    assert_eq!(tcp.next_upstream_timeout, Some(Duration::from_secs(10)));

    let udp = &config.listeners[1];
    assert_eq!(
        (udp.proto, udp.addr, udp.upstream.0),
        (Proto::Udp, v4(5353), 1)
    );
    assert_eq!(udp.idle_timeout, Duration::from_secs(30));
    assert_eq!(udp.half_close_timeout, Duration::from_secs(30));
    assert_eq!(udp.udp_responses, 1);
    assert_eq!(udp.max_sessions, 10_000);
    assert_eq!(udp.next_upstream_tries, 1);
    assert_eq!(config.listeners.len(), 2);
}

#[test]
fn busy_poll_is_off_or_a_short_duration() {
    assert_eq!(ok("").busy_poll, Duration::ZERO);
    assert_eq!(ok("busy_poll off;").busy_poll, Duration::ZERO);
    assert_eq!(ok("busy_poll 200us;").busy_poll, Duration::from_micros(200));
    assert_eq!(ok("busy_poll 10ms;").busy_poll, Duration::from_millis(10));
}

#[test]
fn main_context_values() {
    let config = ok("max_connections 5;\nbuffer_size 4M;\nbuffer_memory 1g;\n\
                     log_level trace;\naccess_log off;\n");
    assert_eq!(config.max_connections, 5);
    assert_eq!(config.buffer_size, 4 << 20);
    assert_eq!(config.buffer_memory, 1 << 30);
    assert_eq!(config.log_level, log::LevelFilter::Trace);
    assert!(!config.access_log);
    for (name, level) in LOG_LEVELS {
        assert_eq!(ok(&format!("log_level {name};")).log_level, level);
    }
    assert_eq!(ok("buffer_size 1k;").buffer_size, 1024);
    assert_eq!(ok("buffer_size 16m;").buffer_size, 16 << 20);
    assert_eq!(
        ok("buffer_size 16m; buffer_memory 16m;").buffer_memory,
        16 << 20
    );
}

#[test]
fn shutdown_timeout_is_a_duration_with_a_default() {
    assert_eq!(ok("").shutdown_timeout, Duration::from_secs(30));
    assert_eq!(
        ok("shutdown_timeout 1500ms;").shutdown_timeout,
        Duration::from_millis(1500)
    );
    assert_eq!(ok("shutdown_timeout 0;").shutdown_timeout, Duration::ZERO);
    assert_err("shutdown_timeout soon;", 1, 18, "bad duration 'soon'");
    assert_err(
        "shutdown_timeout 1s;\nshutdown_timeout 2s;",
        2,
        1,
        "duplicate 'shutdown_timeout' (first set at line 1)",
    );
}

#[test]
fn empty_and_comment_only_files_are_default() {
    assert_eq!(ok(""), Config::default());
    assert_eq!(ok("\n  # nothing here { ; }\n\t\n"), Config::default());
}

#[test]
fn defaults() {
    let config = ok(
        "upstream b { server 127.0.0.1:80; }\nlisten 8080 { proxy b; }\n\
                     listen udp *:53 { proxy b; }\n",
    );
    assert_eq!(
        Config {
            upstreams: Vec::new(),
            listeners: Vec::new(),
            ..config.clone()
        },
        Config::default()
    );
    let b = &config.upstreams[0];
    assert_eq!(b.balance, Balance::RoundRobin);
    assert_eq!(b.health_check, None);
    assert_eq!(b.servers, [Server::new(v4(80))]);
    assert_eq!(
        config.listeners[0],
        Listen::new(Proto::Tcp, any(8080), UpstreamId(0), 1)
    );
    assert_eq!(
        config.listeners[1],
        Listen::new(Proto::Udp, any(53), UpstreamId(0), 1)
    );
}

#[test]
fn half_close_timeout_follows_idle_timeout() {
    let config = ok(&format!(
        "{ONE}listen 80 {{ idle_timeout 2m; proxy b; }}\n\
         listen 81 {{ proxy b; half_close_timeout 5s; idle_timeout 1h; }}\n"
    ));
    assert_eq!(
        config.listeners[0].half_close_timeout,
        Duration::from_secs(120)
    );
    assert_eq!(
        config.listeners[1].half_close_timeout,
        Duration::from_secs(5)
    );
    assert_eq!(config.listeners[1].idle_timeout, Duration::from_secs(3600));
}

#[test]
fn listen_address_forms() {
    let config = ok(&format!(
        "{ONE}listen 80 {{ proxy b; }}\nlisten *:81 {{ proxy b; }}\n\
         listen tcp 127.0.0.1:0 {{ proxy b; }}\nlisten 127.0.0.1:0 {{ proxy b; }}\n\
         listen udp [::1]:0 {{ proxy b; }}\nlisten udp 80 {{ proxy b; }}\n\
         listen 0 {{ proxy b; }}\n"
    ));
    let got: Vec<(Proto, SocketAddr)> =
        config.listeners.iter().map(|l| (l.proto, l.addr)).collect();
    assert_eq!(
        got,
        [
            (Proto::Tcp, any(80)),
            (Proto::Tcp, any(81)),
            (Proto::Tcp, v4(0)),
            (Proto::Tcp, v4(0)),
            (Proto::Udp, v6(0)),
            (Proto::Udp, any(80)),
            (Proto::Tcp, any(0)),
        ]
    );
}

#[test]
fn implicit_upstreams_from_addresses() {
    let config = ok("listen 80 { proxy 127.0.0.1:6379; }\n\
         listen udp [::1]:53 { proxy [::1]:5353; }\n\
         listen 81 { proxy 127.0.0.1:6379; next_upstream_tries 0; }\n\
         listen 82 { proxy localhost:8080; }\n");
    let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["127.0.0.1:6379", "[::1]:5353", "localhost:8080"]);
    for upstream in &config.upstreams {
        assert_eq!(upstream.balance, Balance::RoundRobin);
        assert_eq!(upstream.health_check, None);
    }
    assert_eq!(config.upstreams[0].servers, [Server::new(v4(6379))]);
    assert_eq!(config.upstreams[1].servers, [Server::new(v6(5353))]);
    // A name gives one server per distinct address.
    assert_eq!(
        config.upstreams[2].servers,
        [Server::new(v4(8080)), Server::new(v6(8080))]
    );
    let targets: Vec<(usize, u32)> = config
        .listeners
        .iter()
        .map(|l| (l.upstream.0, l.next_upstream_tries))
        .collect();
    assert_eq!(targets, [(0, 1), (1, 1), (0, 1), (2, 2)]);
}

#[test]
fn forward_references_and_named_upstreams_win() {
    let config = ok("listen 80 { proxy later; }\n\
         listen 81 { proxy 127.0.0.1:9; }\n\
         upstream later { server 127.0.0.1:1; server 127.0.0.1:2; }\n\
         upstream 127.0.0.1:9 { server [::1]:7; }\n");
    assert_eq!(config.upstreams.len(), 2);
    assert_eq!(config.listeners[0].upstream, UpstreamId(0));
    assert_eq!(config.listeners[0].next_upstream_tries, 2);
    assert_eq!(config.listeners[1].upstream, UpstreamId(1));
    assert_eq!(config.upstreams[1].servers, [Server::new(v6(7))]);
}

#[test]
fn next_upstream_tries_and_timeout() {
    let ups = "upstream b { server 127.0.0.1:1; server 127.0.0.1:2; server [::1]:3 backup; }\n";
    let config = ok(&format!(
        "{ups}listen 80 {{ proxy b; }}\nlisten 81 {{ proxy b; next_upstream_tries 0; }}\n\
         listen 82 {{ proxy b; next_upstream_tries 7; next_upstream_timeout 0; }}\n\
         listen 83 {{ proxy b; next_upstream_timeout 1500ms; }}\n"
    ));
    let tries: Vec<u32> = config
        .listeners
        .iter()
        .map(|l| l.next_upstream_tries)
        .collect();
    assert_eq!(tries, [3, 3, 7, 3]);
    assert_eq!(config.listeners[2].next_upstream_timeout, None);
    assert_eq!(
        config.listeners[3].next_upstream_timeout,
        Some(Duration::from_millis(1500))
    );
}

#[test]
fn udp_settings() {
    let config = ok(&format!(
        "{ONE}listen udp 127.0.0.1:53 {{ proxy b; udp_responses 0; max_sessions 0; }}\n"
    ));
    let udp = &config.listeners[0];
    assert_eq!((udp.udp_responses, udp.max_sessions), (0, 0));
}

#[test]
fn server_options_and_name_fan_out() {
    let config = ok("upstream b {\n  balance least_conn;\n\
         server localhost:80 weight=1000 max_conns=0 max_fails=0 fail_timeout=250ms backup down;\n\
         server \"127.0.0.1:81\" weight=\"2\";\n}\n");
    let b = &config.upstreams[0];
    assert_eq!(b.balance, Balance::LeastConn);
    let options = |addr| Server {
        weight: 1000,
        max_conns: 0,
        max_fails: 0,
        fail_timeout: Duration::from_millis(250),
        backup: true,
        down: true,
        ..Server::new(addr)
    };
    let second = Server {
        weight: 2,
        ..Server::new(v4(81))
    };
    assert_eq!(b.servers, [options(v4(80)), options(v6(80)), second]);
}

#[test]
fn every_balance_name() {
    for (name, balance) in Balance::ALL {
        let config = ok(&format!(
            "upstream b {{ balance {name}; server 127.0.0.1:1; }}"
        ));
        assert_eq!(config.upstreams[0].balance, balance);
    }
}

#[test]
fn system_resolver_handles_localhost() {
    let config = parse(
        "upstream b { server localhost:80; }\nlisten 127.0.0.1:0 { proxy b; }\n",
        "t.conf",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let servers = &config.upstreams[0].servers;
    assert!(!servers.is_empty());
    for server in servers {
        assert!(server.addr.ip().is_loopback(), "{server:?}");
        assert_eq!(server.addr.port(), 80);
    }
}

#[test]
fn health_check_payloads_decode_escapes_once() {
    let check = |line: &str| {
        let config = ok(&format!("upstream b {{ server 127.0.0.1:1; {line} }}"));
        config.upstreams[0].health_check.clone().unwrap_or_default()
    };
    let hc = check(r#"health_check interval=1s send="PING\r\n" expect="+PONG";"#);
    assert_eq!(hc.send, b"PING\r\n");
    assert_eq!(hc.expect, b"+PONG");
    assert_eq!(hc.interval, Duration::from_secs(1));
    assert_eq!(
        (hc.timeout, hc.rise, hc.fall),
        (Duration::from_secs(2), 2, 3)
    );

    // `\\r` is a backslash and an r, never a carriage return.
    let hc = check(r#"health_check send="\x00\xfF\\r\"\t" expect=ok;"#);
    assert_eq!(hc.send, b"\x00\xff\\r\"\t");
    assert_eq!(hc.expect, b"ok");
    // Quoted whole, or split into parts, or holding specials and non-ASCII.
    let hc = check(r#"health_check "send=a\nb" expect=x"; {}#"'é';"#);
    assert_eq!(hc.send, b"a\nb");
    assert_eq!(hc.expect, "x; {}#'é'".as_bytes());
    assert_eq!(check("health_check;"), HealthCheck::default());
    let hc = check("health_check timeout=1m rise=1 fall=10 send=\"\";");
    assert_eq!(
        (hc.timeout, hc.rise, hc.fall),
        (Duration::from_secs(60), 1, 10)
    );
    assert!(hc.send.is_empty());
}

// ---- errors: names and contexts ----

#[test]
fn unknown_directives_suggest_from_their_context() {
    assert_err(
        "max_conections 5;",
        1,
        1,
        "unknown directive 'max_conections' (did you mean 'max_connections'?)",
    );
    assert_err(
        "upstream b {\n    sever 127.0.0.1:80;\n}\n",
        2,
        5,
        "unknown directive 'sever' (did you mean 'server'?)",
    );
    assert_err(
        "listen 80 {\n  proxy 127.0.0.1:80;\n  conect_timeout 5s;\n}\n",
        3,
        3,
        "unknown directive 'conect_timeout' (did you mean 'connect_timeout'?)",
    );
    assert_err("\n\n  Listen 80 {", 3, 3, "(did you mean 'listen'?)");
    let e = fail("frobnicate on;");
    assert_eq!((e.line, e.col), (1, 1));
    assert_eq!(e.message, "unknown directive 'frobnicate'");
    // Close to a name of another context only: no suggestion from there.
    let e = fail("listen 80 {\n  servr 127.0.0.1:1;\n}");
    assert_eq!(e.message, "unknown directive 'servr'");
}

#[test]
fn splice_and_its_pipes() {
    use crate::config::Splice;
    let c = ok("splice_pipe_size 256k;\nmax_pipes 100;\n\
                listen 127.0.0.1:1 { proxy 127.0.0.1:2; splice on; }\n\
                listen 127.0.0.1:3 { proxy 127.0.0.1:2; splice off; }\n\
                listen 127.0.0.1:4 { proxy 127.0.0.1:2; }\n");
    let modes: Vec<Splice> = c.listeners.iter().map(|l| l.splice).collect();
    assert_eq!(modes, [Splice::On, Splice::Off, Splice::Auto]);
    assert_eq!((c.splice_pipe_size, c.max_pipes), (256 * 1024, Some(100)));
    let d = ok("");
    assert_eq!((d.splice_pipe_size, d.max_pipes), (256 * 1024, None));
    assert_eq!(ok("max_pipes 0;").max_pipes, Some(0), "0 splices nothing");
    assert_err(
        "listen 127.0.0.1:1 { proxy 127.0.0.1:2; splice yes; }",
        1,
        48,
        "unknown splice mode 'yes' (expected one of: auto, on, off)",
    );
    assert_err(
        "splice_pipe_size 2m;",
        1,
        18,
        "splice_pipe_size must be between 4k and 1m",
    );
    assert_err(
        "listen udp 127.0.0.1:1 { proxy 127.0.0.1:2; splice on; }",
        1,
        45,
        "splice",
    );
}

#[test]
fn workers_is_a_count_or_auto() {
    assert_eq!(ok("").workers, 1);
    assert_eq!(ok("workers 4;").workers, 4);
    let auto = ok("workers auto;").workers;
    assert!((1..=crate::config::MAX_WORKERS).contains(&auto));
    assert_err(
        "workers 0;",
        1,
        9,
        "'workers' must be between 1 and 256, got '0'",
    );
    assert_err("workers 257;", 1, 9, "'workers' must be between 1 and 256");
    assert_err("workers many;", 1, 9, "bad number 'many' for 'workers'");
}

#[test]
fn directives_in_the_wrong_context() {
    assert_err(
        "listen 80 {\n  server 127.0.0.1:80;\n}",
        2,
        3,
        "'server' is not allowed here (it belongs in an upstream block)",
    );
    assert_err(
        "upstream b {\n  proxy x;\n}",
        2,
        3,
        "'proxy' is not allowed here (it belongs in a listen block)",
    );
    assert_err(
        "server 127.0.0.1:80;",
        1,
        1,
        "(it belongs in an upstream block)",
    );
    assert_err(
        "listen 80 {\n  upstream b {\n    server 127.0.0.1:1;\n  }\n}",
        2,
        3,
        "'upstream' is not allowed here (it belongs in the main context)",
    );
    assert_err(
        "listen 80 {\n proxy 127.0.0.1:1;\n buffer_size 16k;\n}",
        3,
        2,
        "'buffer_size' is not allowed here (it belongs in the main context)",
    );
}

#[test]
fn udp_only_directives_in_a_tcp_listener() {
    assert_err(
        "listen 80 {\n  proxy 127.0.0.1:1;\n  udp_responses 1;\n}",
        3,
        3,
        "'udp_responses' applies to udp listeners only",
    );
    assert_err(
        "listen tcp 80 {\n  max_sessions 10;\n  proxy 127.0.0.1:1;\n}",
        2,
        3,
        "'max_sessions' applies to udp listeners only",
    );
}

#[test]
fn tcp_only_directives_in_a_udp_listener() {
    for (line, name) in [
        ("half_close_timeout 1s;", "half_close_timeout"),
        ("next_upstream_tries 2;", "next_upstream_tries"),
        ("next_upstream_timeout 2s;", "next_upstream_timeout"),
        ("connect_timeout 1s;", "connect_timeout"),
    ] {
        assert_err(
            &format!("listen udp 127.0.0.1:53 {{\n  proxy 127.0.0.1:1;\n  {line}\n}}"),
            3,
            3,
            &format!("'{name}' applies to tcp listeners only (this one is udp"),
        );
    }
}

#[test]
fn duplicate_servers_name_both_lines() {
    assert_err(
        "upstream u {\n  server 127.0.0.1:1;\n  server 127.0.0.2:1;\n  server 127.0.0.1:1 backup;\n}",
        4,
        10,
        "duplicate server 127.0.0.1:1 in upstream 'u' (first at line 2)",
    );
    // A name that resolves to an address already listed is the same server.
    assert_err(
        "upstream u {\n  server 127.0.0.1:7;\n  server localhost:7;\n}",
        3,
        10,
        "duplicate server 127.0.0.1:7 in upstream 'u' (first at line 2)",
    );
}

#[test]
fn a_listener_that_proxies_to_sluice_itself_is_refused() {
    assert_err(
        "listen udp 127.0.0.1:5300 {\n  proxy 127.0.0.1:5300;\n}",
        2,
        9,
        "proxy loop: upstream '127.0.0.1:5300' includes 127.0.0.1:5300, which is sluice's own listen udp 127.0.0.1:5300 (line 1)",
    );
    // Another listener's address, and a wildcard listener reached through loopback.
    assert_err(
        "upstream u {\n  server 127.0.0.1:9000;\n  server 127.0.0.5:80;\n}\n\
         listen 127.0.0.1:9001 {\n  proxy u;\n}\nlisten 0.0.0.0:80 {\n  proxy 127.0.0.1:9;\n}",
        6,
        9,
        "includes 127.0.0.5:80, which is sluice's own listen tcp 0.0.0.0:80 (line 8)",
    );
    assert_err("listen [::]:53 {\n  proxy [::1]:53;\n}", 2, 9, "proxy loop");
    // Same port on another protocol, or on an address of another family, is no loop.
    ok("listen udp 127.0.0.1:53 {\n  proxy 127.0.0.1:54;\n}\nlisten 127.0.0.1:54 {\n  proxy 127.0.0.1:53;\n}\n\
        listen 127.0.0.1:55 {\n  proxy [::1]:55;\n}\nlisten 127.0.0.1:0 {\n  proxy 127.0.0.1:56;\n}");
}

#[test]
fn mapped_ipv4_servers_count_as_ipv4_in_the_loop_check() {
    assert_err(
        "listen 0.0.0.0:80 {\n  proxy [::ffff:127.0.0.1]:80;\n}",
        2,
        9,
        "proxy loop",
    );
    // An IPv6-only wildcard never gets connections to an IPv4 address.
    ok("listen [::]:80 {\n  proxy [::ffff:127.0.0.1]:80;\n}");
    // Multicast is never one of our own addresses.
    ok("listen udp 0.0.0.0:5353 {\n  proxy 239.1.1.1:5353;\n}");
}

#[test]
fn server_addresses_must_be_strict_dotted_quads() {
    for (text, col) in [
        ("0177.0.0.1:80", 10),
        ("0x7f.1:80", 10),
        ("127.1:80", 10),
        ("2130706433:80", 10),
        ("010.0.0.1:80", 10),
    ] {
        assert_err(
            &format!("upstream u {{\n  server {text};\n}}"),
            2,
            col,
            "is not a dotted-quad IPv4 address",
        );
        assert_err(
            &format!("listen 80 {{\n  proxy {text};\n}}"),
            2,
            9,
            "is not a dotted-quad IPv4 address",
        );
    }
}

#[test]
fn ipv4_mapped_listen_addresses_are_refused() {
    assert_err(
        "listen [::ffff:127.0.0.1]:8080 {\n  proxy 127.0.0.1:1;\n}",
        1,
        8,
        "IPv4-mapped IPv6 address (write it as 127.0.0.1:8080)",
    );
}

#[test]
fn a_byte_order_mark_is_skipped() {
    let config = ok("\u{feff}listen 127.0.0.1:80 {\n  proxy 127.0.0.1:1;\n}");
    assert_eq!(config.listeners.len(), 1);
    assert_err("\u{feff}lisen 80 {}", 1, 1, "unknown directive 'lisen'");
}

#[test]
fn many_upstreams_parse_in_linear_time() {
    // 40,000 upstreams and listeners took seconds when every name lookup was a scan. A
    // loose bound that only a quadratic parse can miss, even in a debug build.
    let mut text = String::new();
    for i in 0..40_000u32 {
        let port = 10_000 + i % 50_000;
        text.push_str(&format!(
            "upstream u{i} {{ server 127.0.0.1:{port}; }}\nlisten 127.0.{}.{}:{} {{ proxy u{i}; }}\n",
            i / 256 % 256,
            i % 256,
            1 + i % 9_000
        ));
    }
    let started = std::time::Instant::now();
    let config = ok(&text);
    assert_eq!(config.upstreams.len(), 40_000);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "40,000 upstreams took {:?}",
        started.elapsed()
    );
}

#[test]
fn bad_enumerated_values() {
    assert_err(
        "upstream b {\n  balance roundrobin;\n  server 127.0.0.1:1;\n}",
        2,
        11,
        "unknown balance method 'roundrobin' (did you mean 'round_robin'?)",
    );
    assert_err(
        "upstream b {\n  balance fastest;\n}",
        2,
        11,
        "(expected one of: round_robin, weighted_round_robin, least_conn, random, ip_hash, hash)",
    );
    assert_err(
        "log_level debg;",
        1,
        11,
        "unknown log level 'debg' (did you mean 'debug'?)",
    );
    assert_err(
        "log_level verbose;",
        1,
        11,
        "expected one of: error, warn, info, debug, trace",
    );
    assert_err("access_log yes;", 1, 12, "unknown access_log value 'yes'");
}

// ---- errors: servers and health checks ----

#[test]
fn bad_server_options() {
    let server = |options: &str| format!("upstream b {{\n  server 127.0.0.1:1 {options};\n}}");
    // "  server 127.0.0.1:1 " is 21 chars: options start at column 22.
    assert_err(
        &server("wieght=3"),
        2,
        22,
        "unknown server option 'wieght' (did you mean 'weight'?)",
    );
    assert_err(
        &server("primary"),
        2,
        22,
        "unknown server option 'primary' (expected one of",
    );
    assert_err(
        &server("weight=0"),
        2,
        22,
        "'weight' must be between 1 and 1000, got '0'",
    );
    assert_err(
        &server("weight=1001"),
        2,
        22,
        "'weight' must be between 1 and 1000",
    );
    assert_err(&server("weight=-1"), 2, 22, "bad number '-1' for 'weight'");
    assert_err(
        &server("max_conns=4294967296"),
        2,
        22,
        "'max_conns' must be between 0",
    );
    assert_err(
        &server("max_fails=99999999999999999999999"),
        2,
        22,
        "'max_fails' must be",
    );
    assert_err(&server("fail_timeout=10x"), 2, 22, "bad duration '10x'");
    assert_err(&server("backup=yes"), 2, 22, "'backup' takes no value");
    assert_err(
        &server("weight"),
        2,
        22,
        "'weight' needs a value, e.g. weight=N",
    );
    assert_err(
        &server("down weight=2 down"),
        2,
        36,
        "duplicate server option 'down'",
    );
}

#[test]
fn bad_server_addresses() {
    let server = |addr: &str| format!("upstream b {{\n  server {addr};\n}}");
    assert_err(
        &server("127.0.0.1"),
        2,
        10,
        "server address '127.0.0.1' has no port",
    );
    assert_err(
        &server("localhost"),
        2,
        10,
        "server address 'localhost' has no port",
    );
    assert_err(
        &server("localhost:"),
        2,
        10,
        "server address 'localhost:' has no port",
    );
    assert_err(
        &server("[::1]"),
        2,
        10,
        "server address '[::1]' has no port",
    );
    assert_err(
        &server("::1"),
        2,
        10,
        "has no port (write IPv6 as [ADDR]:PORT)",
    );
    assert_err(
        &server("127.0.0.1:0"),
        2,
        10,
        "server address '127.0.0.1:0' has port 0",
    );
    assert_err(&server("[::1]:0"), 2, 10, "has port 0");
    assert_err(&server("127.0.0.1:65536"), 2, 10, "bad port '65536'");
    assert_err(&server("127.0.0.1:http"), 2, 10, "bad port 'http'");
    assert_err(&server(":80"), 2, 10, "server address ':80' has no host");
    assert_err(&server("[::1"), 2, 10, "bad server address '[::1'");
    assert_err(&server("[localhost]:80"), 2, 10, "bad server address");
    assert_err(
        &server("nosuchhost:80"),
        2,
        10,
        "cannot resolve 'nosuchhost' in server address 'nosuchhost:80': name or service not known",
    );
    assert_err(&server("nowhere.localhost:80"), 2, 10, "no addresses");
    assert_err(
        "upstream b {\n  server;\n}",
        2,
        9,
        "expected an address after 'server'",
    );
}

#[test]
fn bad_health_checks() {
    let hc = |options: &str| {
        format!("upstream b {{\n  server 127.0.0.1:1;\n  health_check {options};\n}}")
    };
    // "  health_check " is 15 chars: options start at column 16.
    assert_err(&hc("rise=0"), 3, 16, "'rise' must be between 1 and");
    assert_err(&hc("fall=0"), 3, 16, "'fall' must be between 1 and");
    assert_err(
        &hc("interval=0"),
        3,
        16,
        "'interval' must be greater than 0",
    );
    assert_err(
        &hc("timeout=0ms"),
        3,
        16,
        "'timeout' must be greater than 0",
    );
    assert_err(&hc("intervall=5s"), 3, 16, "(did you mean 'interval'?)");
    assert_err(&hc("rise"), 3, 16, "'rise' needs a value, e.g. rise=2");
    assert_err(
        &hc("rise=2 rise=3"),
        3,
        23,
        "duplicate health_check option 'rise'",
    );
    // Escapes: the position is the backslash. `send="A` puts it at column 23.
    assert_err(&hc(r#"send="A\q""#), 3, 23, r"bad escape '\q' in 'send'");
    assert_err(&hc(r#"send="A\x4""#), 3, 23, r"\x needs two hex digits");
    assert_err(&hc(r#"send="A\xg0""#), 3, 23, r"\x needs two hex digits");
    assert_err(
        &hc(r"send=A\r"),
        3,
        22,
        "escapes in 'send' work only inside quotes",
    );
    assert_err(
        &hc("expect=\"a\nb\\z\""),
        4,
        2,
        r"bad escape '\z' in 'expect'",
    );
    assert_err(
        "upstream b {\n  server 127.0.0.1:1;\n  health_check;\n  health_check rise=1;\n}",
        4,
        3,
        "duplicate 'health_check' (first set at line 3)",
    );
    assert_err(
        "upstream b {\n  balance random;\n  server 127.0.0.1:1;\n  balance hash;\n}",
        4,
        3,
        "duplicate 'balance' (first set at line 2)",
    );
    assert_err(
        "upstream b {\n  health_check send=\"PING;\n}\n",
        2,
        21,
        "unterminated string",
    );
}

// ---- errors: structure ----

#[test]
fn duplicates_of_blocks() {
    assert_err(
        "upstream b {\n server 127.0.0.1:1;\n}\nupstream b {\n server 127.0.0.1:2;\n}",
        4,
        10,
        "duplicate upstream 'b' (first defined at line 1)",
    );
    let two = |a: &str, b: &str| {
        format!("listen {a} {{\n proxy 127.0.0.1:1;\n}}\nlisten {b} {{\n proxy 127.0.0.1:1;\n}}")
    };
    assert_err(
        &two("127.0.0.1:80", "tcp 127.0.0.1:80"),
        4,
        12,
        "duplicate listen tcp 127.0.0.1:80 (first defined at line 1)",
    );
    assert_err(&two("80", "*:80"), 4, 8, "duplicate listen tcp 0.0.0.0:80");
    assert_err(
        &two("udp [::1]:53", "udp [::1]:53"),
        4,
        12,
        "duplicate listen udp [::1]:53",
    );
    assert_eq!(ok(&two("udp 80", "tcp 80")).listeners.len(), 2);
    assert_eq!(ok(&two("127.0.0.1:80", "[::1]:80")).listeners.len(), 2);
    assert_eq!(ok(&two("127.0.0.1:0", "127.0.0.1:0")).listeners.len(), 2);
    assert_err(
        "listen 80 {\n  proxy 127.0.0.1:1;\n  proxy 127.0.0.1:2;\n}",
        3,
        3,
        "duplicate 'proxy' (first set at line 2)",
    );
    assert_err(
        "max_connections 5;\nmax_connections 6;",
        2,
        1,
        "duplicate 'max_connections' (first set at line 1)",
    );
}

#[test]
fn upstream_without_servers() {
    assert_err(
        "\nupstream empty {\n}\n",
        2,
        1,
        "upstream 'empty' has no servers",
    );
    assert_err(
        "upstream b {\n  balance hash;\n  health_check;\n}",
        1,
        1,
        "upstream 'b' has no servers",
    );
}

#[test]
fn missing_semicolon() {
    let b = "upstream backend { server 127.0.0.1:1; }\n";
    // Before `}`: just past "    proxy backend".
    assert_err(
        &format!("listen 80 {{\n    proxy backend\n}}\n{b}"),
        2,
        18,
        "expected ';' after 'proxy'",
    );
    // Before the end of the file.
    assert_err("log_level info", 1, 15, "expected ';' after 'log_level'");
    assert_err(
        "log_level info  # done\n",
        1,
        15,
        "expected ';' after 'log_level'",
    );
    // A `{` where the directive ends with `;`.
    assert_err(
        "log_level info {",
        1,
        16,
        "expected ';' after 'log_level' (it takes no block)",
    );
    // The next directive on the next line was read as more arguments.
    assert_err(
        &format!("{b}listen 80 {{\n  proxy backend\n  connect_timeout 5s;\n}}"),
        3,
        16,
        "expected ';' after 'proxy'",
    );
    assert_err(
        "upstream b {\n  server 127.0.0.1:1\n  server 127.0.0.1:2;\n}",
        2,
        21,
        "expected ';' after 'server'",
    );
    assert_err(
        "upstream b {\n server 127.0.0.1:1;\n health_check rise=2\n balance random;\n}",
        3,
        21,
        "expected ';' after 'health_check'",
    );
    // ...but a stray argument on the same line is just that.
    assert_err(
        "log_level info debug;",
        1,
        16,
        "unexpected argument 'debug'",
    );
    // Options may continue on the next line.
    let config = ok("upstream b {\n  server 127.0.0.1:1\n      weight=4;\n}");
    assert_eq!(config.upstreams[0].servers[0].weight, 4);
}

#[test]
fn missing_or_misplaced_braces() {
    assert_err("upstream b;", 1, 11, "expected '{' after 'upstream'");
    assert_err("listen 80", 1, 10, "expected '{' after 'listen'");
    assert_err(
        "log_level info;\n}\n",
        2,
        1,
        "unexpected '}' (no block is open here)",
    );
    assert_err(&format!("{ONE}}}"), 4, 1, "unexpected '}'");
    assert_err("  ;", 1, 3, "unexpected ';'");
    assert_err("{ }", 1, 1, "unexpected '{'");
    assert_err(
        "upstream b {\n  server 127.0.0.1:1;\n",
        3,
        1,
        "expected '}' before end of file, to close the 'upstream' block opened at line 1",
    );
    assert_err(
        "listen 80\n{\n  proxy 127.0.0.1:1;",
        3,
        21,
        "the 'listen' block opened at line 2",
    );
}

#[test]
fn missing_values() {
    assert_err(
        "listen 80 {\n  proxy 127.0.0.1:1;\n  connect_timeout;\n}",
        3,
        18,
        "expected a duration after 'connect_timeout'",
    );
    assert_err(
        "max_connections;",
        1,
        16,
        "expected a number after 'max_connections'",
    );
    assert_err(
        "buffer_size }",
        1,
        13,
        "expected a size after 'buffer_size'",
    );
    assert_err(
        "upstream {",
        1,
        10,
        "expected an upstream name after 'upstream'",
    );
    assert_err("listen {", 1, 8, "expected an address after 'listen'");
    assert_err(
        "listen 80 {\n  proxy;\n}",
        2,
        8,
        "expected an upstream name or an address",
    );
}

#[test]
fn bad_values() {
    let listen = |line: &str| format!("listen 80 {{\n  proxy 127.0.0.1:1;\n  {line}\n}}");
    let e = fail(&listen("idle_timeout 10x;"));
    assert_eq!((e.line, e.col), (3, 16));
    assert_eq!(
        e.message,
        "bad duration '10x' (expected e.g. 250ms, 10s, 5m, 2h, 1d)"
    );
    assert_err(&listen("connect_timeout -5s;"), 3, 19, "bad duration '-5s'");
    assert_err(
        &listen("connect_timeout 0;"),
        3,
        19,
        "'connect_timeout' must be greater",
    );
    assert_err(
        &listen("half_close_timeout 0s;"),
        3,
        22,
        "must be greater than 0",
    );
    assert_err(&listen("next_upstream_tries -1;"), 3, 23, "bad number '-1'");
    assert_err(
        &listen("next_upstream_timeout 1y;"),
        3,
        25,
        "bad duration '1y'",
    );
    assert_err(
        &listen("idle_timeout 5s 6s;"),
        3,
        19,
        "unexpected argument '6s'",
    );
    assert_err(
        "buffer_size 16q;",
        1,
        13,
        "bad size '16q' (expected e.g. 512, 16k, 4m, 1g)",
    );
    assert_err(
        "buffer_size 512;",
        1,
        13,
        "buffer_size must be between 1k and 16m, got '512'",
    );
    assert_err(
        "buffer_size 17m;",
        1,
        13,
        "buffer_size must be between 1k and 16m",
    );
    assert_err(
        "buffer_memory 1m;\nbuffer_size 4m;",
        1,
        15,
        "buffer_memory '1m' must be at least buffer_size (4194304 bytes)",
    );
    assert_err(
        "max_connections 0;",
        1,
        17,
        "'max_connections' must be between 1 and",
    );
    assert_err("max_connections 1e3;", 1, 17, "bad number '1e3'");
    assert_err(
        "busy_poll 20ms;",
        1,
        11,
        "busy_poll must be 'off' or at most 10ms, got '20ms'",
    );
    assert_err("busy_poll on;", 1, 11, "bad duration 'on'");
    assert_err(
        "max_connections 99999999999999999999999;",
        1,
        17,
        "'max_connections' must be between 1 and",
    );
}

#[test]
fn bad_listen_lines() {
    assert_err(
        "listen localhost:80 {",
        1,
        8,
        "bad listen address 'localhost:80'",
    );
    assert_err("listen 70000 {", 1, 8, "bad port '70000'");
    assert_err("listen *:x {", 1, 8, "bad listen address '*:x'");
    assert_err(
        "listen tpc 80 {",
        1,
        8,
        "expected 'tcp' or 'udp' before the listen address",
    );
    assert_err("listen tpc 80 {", 1, 8, "(did you mean 'tcp'?)");
    assert_err(
        "listen 80 extra {",
        1,
        11,
        "unexpected argument 'extra' after the address",
    );
    assert_err("listen udp 80 x {", 1, 15, "unexpected argument 'x'");
    assert_err(
        "listen 80 {\n  idle_timeout 5s;\n}",
        1,
        1,
        "listen block has no 'proxy'",
    );
}

#[test]
fn bad_proxy_targets() {
    assert_err(
        "listen 80 {\n  proxy backnd;\n}\nupstream backend {\n  server 127.0.0.1:1;\n}",
        2,
        9,
        "unknown upstream 'backnd' (did you mean 'backend'?)",
    );
    let e = fail("listen 80 {\n  proxy elsewhere;\n}");
    assert_eq!(e.message, "unknown upstream 'elsewhere'");
    assert_err(
        "listen 80 {\n  proxy 127.0.0.1;\n}",
        2,
        9,
        "(an address needs a port: 127.0.0.1:PORT)",
    );
    assert_err(
        "listen 80 {\n  proxy 127.0.0.1:0;\n}",
        2,
        9,
        "proxy address '127.0.0.1:0' has port 0",
    );
    assert_err(
        "listen 80 {\n  proxy ::1;\n}",
        2,
        9,
        "proxy address '::1' has no port",
    );
    assert_err(
        "listen 80 {\n  proxy nosuch:80;\n}",
        2,
        9,
        "cannot resolve 'nosuch' in proxy address 'nosuch:80'",
    );
}

#[test]
fn proxy_targets_are_checked_after_the_block_is_read() {
    // `proxy` may name an upstream defined later, so a bad name is only known at the end.
    assert_err(
        "listen 80 {\n  proxy nowhere;\n  idle_timeout x;\n}",
        3,
        16,
        "bad duration 'x'",
    );
}

// ---- helpers ----

#[test]
fn suggestions() {
    let names = ["round_robin", "random", "hash", "ip_hash"];
    assert_eq!(suggest("randon", names), Some("random"));
    assert_eq!(suggest("hsah", names), Some("hash"));
    assert_eq!(suggest("RANDOM", names), Some("random"));
    assert_eq!(suggest("r", names), None);
    assert_eq!(suggest("", names), None);
    assert_eq!(suggest("consistent", names), None);
    assert_eq!(levenshtein(&['a', 'b'], &[]), 2);
    assert_eq!(levenshtein(&[], &['a']), 1);
    let kitten: Vec<char> = "kitten".chars().collect();
    let sitting: Vec<char> = "sitting".chars().collect();
    assert_eq!(levenshtein(&kitten, &sitting), 3);
}

// ---- robustness ----

#[test]
fn mangled_input_never_panics() {
    let run = |text: &str| {
        let _ = parse_with(text, "fuzz.conf", &fake_resolve);
    };
    let source = format!(
        "{EXAMPLE}\nupstream hc {{ server localhost:7; health_check send=\"a\\x41\\r\" \
         expect=\"\\\"b\"; }}\nlisten 9 {{ proxy hc; }}\n"
    );
    assert!(parse_with(&source, "fuzz.conf", &fake_resolve).is_ok());
    let bytes = source.as_bytes();
    for cut in 0..=bytes.len() {
        run(&String::from_utf8_lossy(&bytes[..cut]));
        run(&String::from_utf8_lossy(&bytes[cut..]));
    }
    let specials = b";{}\"\\#=:[]*\n x09kms";
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..5_000 {
        let mut mangled = bytes.to_vec();
        for _ in 0..1 + rng.index(4) {
            let at = rng.index(mangled.len());
            match rng.index(4) {
                0 => mangled[at] = specials[rng.index(specials.len())],
                1 => mangled[at] = (rng.next() & 0xff) as u8,
                2 => {
                    mangled.remove(at);
                }
                _ => mangled.insert(at, specials[rng.index(specials.len())]),
            }
        }
        run(&String::from_utf8_lossy(&mangled));
    }
    for piece in ["{", "}", "listen 1 {", "\"", "#", ";", "a", "\\"] {
        run(&piece.repeat(100_000));
    }
    run(&format!("listen 1 {{ proxy {}; }}", "9".repeat(100_000)));
    run(&format!("max_connections {};", "x".repeat(100_000)));
}

const ONE_LISTENER: &str = "listen 127.0.0.1:1 { proxy 127.0.0.1:2; }\n";

#[test]
fn admin_on_loopback_or_with_an_allow_list() {
    let c = ok(&format!("admin 127.0.0.1:9901;\n{ONE_LISTENER}"));
    let admin = c.admin.expect("admin");
    assert_eq!(admin.addr, v4(9901));
    assert!(admin.allow.is_empty());
    let c = ok(&format!(
        "admin 0.0.0.0:9901 {{\n  allow 10.0.0.0/8;\n  allow ::1;\n}}\n{ONE_LISTENER}"
    ));
    let admin = c.admin.expect("admin");
    assert_eq!(admin.addr, any(9901));
    assert_eq!(admin.allow.len(), 2);
    assert!(admin.allow[0].contains("10.9.8.7".parse().expect("ip")));
    assert!(ok(ONE_LISTENER).admin.is_none());
}

#[test]
fn admin_errors_name_the_line() {
    assert_err(
        &format!("{ONE_LISTENER}admin 0.0.0.0:9901;\n"),
        2,
        7,
        "admin 0.0.0.0:9901 is reachable from other hosts: add an allow list",
    );
    assert_err(
        &format!("admin 127.0.0.1:9901 {{\n  allow 10.1.0.0/8;\n}}\n{ONE_LISTENER}"),
        2,
        9,
        "'10.1.0.0/8' has host bits set",
    );
    assert_err(
        &format!("admin 127.0.0.1:9901 {{\n  proxy u;\n}}\n{ONE_LISTENER}"),
        2,
        3,
        "'proxy' is not allowed here (it belongs in a listen block)",
    );
    assert_err(
        &format!("admin 127.0.0.1:1;\nadmin 127.0.0.1:2;\n{ONE_LISTENER}"),
        2,
        1,
        "duplicate 'admin'",
    );
}

#[test]
fn access_rules_in_order_and_inherited_from_the_main_context() {
    let c = ok("deny 10.0.0.0/8;\nallow all;\n\
                listen 127.0.0.1:1 { proxy 127.0.0.1:2; }\n\
                listen 127.0.0.1:3 { proxy 127.0.0.1:2; allow 127.0.0.2; deny 127.0.0.0/8; }\n");
    let text = |l: &Listen| l.access.iter().map(|r| r.to_string()).collect::<Vec<_>>();
    assert_eq!(
        text(&c.listeners[0]),
        ["deny 10.0.0.0/8", "allow all"],
        "inherited"
    );
    assert_eq!(
        text(&c.listeners[1]),
        ["allow 127.0.0.2", "deny 127.0.0.0/8"],
        "its own"
    );
    assert_err(
        "listen 127.0.0.1:1 {\n  proxy 127.0.0.1:2;\n  deny 10.0.0.1/8;\n}",
        3,
        8,
        "'10.0.0.1/8' has host bits set (the range is 10.0.0.0/8)",
    );
    assert_err(
        "listen 127.0.0.1:1 {\n  proxy 127.0.0.1:2;\n  deny 10.0.0.0/33;\n}",
        3,
        8,
        "bad prefix length '/33'",
    );
    assert_err("allow;\n", 1, 6, "expected an address range or 'all'");
}

#[test]
fn limits_and_their_errors() {
    let c = ok("per_ip_table_size 5000;\n\
                listen 127.0.0.1:1 { proxy 127.0.0.1:2; max_connections 100; max_connections_per_ip 5;\n\
                rate_per_ip 20/s burst=40; limit_rate 4m; limit_rate_after 1m; }\n\
                listen udp 127.0.0.1:1 { proxy 127.0.0.1:2; max_sessions_per_ip 3; rate_per_ip 7/s; }\n");
    assert_eq!(c.per_ip_table_size, 5000);
    let (t, u) = (&c.listeners[0], &c.listeners[1]);
    assert_eq!((t.max_connections, t.max_connections_per_ip), (100, 5));
    assert_eq!(t.rate_per_ip, Some((20, 40)));
    assert_eq!((t.limit_rate, t.limit_rate_after), (4 << 20, 1 << 20));
    assert_eq!(
        (u.max_sessions_per_ip, u.rate_per_ip),
        (3, Some((7, 7))),
        "burst: a second's worth"
    );
    let listen = |body: &str| format!("listen 127.0.0.1:1 {{\n  proxy 127.0.0.1:2;\n  {body}\n}}");
    assert_err(
        &listen("rate_per_ip 20;"),
        3,
        15,
        "rate '20' has no unit (write e.g. 20/s)",
    );
    assert_err(
        &listen("rate_per_ip 20/h;"),
        3,
        15,
        "unknown rate unit '/h' in '20/h' (use /s)",
    );
    assert_err(
        &listen("rate_per_ip 20/s burst;"),
        3,
        20,
        "unknown rate_per_ip option 'burst'",
    );
    assert_err(&listen("limit_rate 4q;"), 3, 14, "bad size '4q'");
    assert_err(
        "listen udp 127.0.0.1:1 {\n  proxy 127.0.0.1:2;\n  max_connections_per_ip 5;\n}",
        3,
        3,
        "max_connections_per_ip",
    );
    assert_eq!(ok(&listen("rate_per_ip 0;")).listeners[0].rate_per_ip, None);
}

#[test]
fn proxy_protocol_directives() {
    let c = ok(
        "upstream u { server 127.0.0.1:1 proxy_protocol=v2; server 127.0.0.1:2; }\n\
                listen 127.0.0.1:3 { proxy u; proxy_protocol v1; accept_proxy_protocol on;\n\
                proxy_protocol_timeout 2s; proxy_protocol_trusted 10.0.0.0/8 127.0.0.1; }\n\
                listen udp 127.0.0.1:4 { proxy u; proxy_protocol v2; proxy_protocol_udp first; }\n",
    );
    use crate::config::{ProxyVersion, UdpHeaders};
    assert_eq!(
        c.upstreams[0].servers[0].proxy_protocol,
        Some(Some(ProxyVersion::V2))
    );
    assert_eq!(c.upstreams[0].servers[1].proxy_protocol, None);
    let (t, u) = (&c.listeners[0], &c.listeners[1]);
    assert_eq!(t.proxy_protocol, Some(ProxyVersion::V1));
    assert!(t.accept_proxy_protocol);
    assert_eq!(t.proxy_protocol_timeout, Duration::from_secs(2));
    assert_eq!(t.proxy_protocol_trusted.len(), 2);
    assert_eq!(
        (u.proxy_protocol, u.proxy_protocol_udp),
        (Some(ProxyVersion::V2), UdpHeaders::First)
    );
    assert_eq!(
        ok(ONE_LISTENER).listeners[0].proxy_protocol_udp,
        UdpHeaders::Every
    );
    let listen = |body: &str| format!("listen 127.0.0.1:1 {{\n  proxy 127.0.0.1:2;\n  {body}\n}}");
    assert_err(&listen("proxy_protocol v3;"), 3, 18, "proxy_protocol value");
    assert_err(
        &listen("proxy_protocol_trusted;"),
        3,
        25,
        "expected address ranges",
    );
    assert_err(
        &listen("proxy_protocol_trusted 10.0.0.1/8;"),
        3,
        26,
        "host bits",
    );
    assert_err(
        "listen udp 127.0.0.1:1 {\n  proxy 127.0.0.1:2;\n  proxy_protocol v1;\n}",
        3,
        18,
        "a UDP listener sends the PROXY header as v2 only",
    );
    assert_err(
        "upstream u { server 127.0.0.1:1 proxy_protocol=v9; }",
        1,
        33,
        "proxy_protocol=v9: expected v1, v2 or off",
    );
}

#[test]
fn port_ranges_make_one_listener_per_port() {
    let c = ok(
        "listen 127.0.0.1:9000-9002 { proxy 127.0.0.1:7000-7002; }\n\
                upstream u { server 127.0.0.1:1; }\n\
                listen udp 127.0.0.1:9000-9001 { proxy u; }\n",
    );
    let got: Vec<(Proto, u16, String)> = c
        .listeners
        .iter()
        .map(|l| {
            (
                l.proto,
                l.addr.port(),
                c.upstreams[l.upstream.0].name.clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (Proto::Tcp, 9000, "127.0.0.1:7000".to_string()),
            (Proto::Tcp, 9001, "127.0.0.1:7001".to_string()),
            (Proto::Tcp, 9002, "127.0.0.1:7002".to_string()),
            (Proto::Udp, 9000, "u".to_string()),
            (Proto::Udp, 9001, "u".to_string()),
        ]
    );
    assert_err(
        "listen 127.0.0.1:9005 { proxy 127.0.0.1:1; }\nlisten 127.0.0.1:9000-9010 { proxy 127.0.0.1:1; }",
        2,
        8,
        "listen range 127.0.0.1:9000-9010 overlaps listen tcp 127.0.0.1:9005 (first defined at line 1)",
    );
    assert_err(
        "listen 127.0.0.1:9000-9010 { proxy 127.0.0.1:7000-7001; }",
        1,
        36,
        "proxy range 127.0.0.1:7000-7001 has 2 ports, the listen range 11",
    );
    assert_err(
        "listen 127.0.0.1:9010-9000 { proxy u; }",
        1,
        8,
        "runs backwards",
    );
    assert_err("listen 127.0.0.1:0-10 { proxy u; }", 1, 8, "bad port range");
    assert_err(
        "listen 127.0.0.1:9000-70000 { proxy u; }",
        1,
        8,
        "bad port range",
    );
}

#[test]
fn so_keepalive_in_nginx_form() {
    use crate::config::Keepalive;
    let listen =
        |v: &str| format!("listen 127.0.0.1:1 {{\n  proxy 127.0.0.1:2;\n  so_keepalive {v};\n}}");
    let get = |v: &str| ok(&listen(v)).listeners[0].so_keepalive;
    assert_eq!(get("on"), Some(Keepalive::default()));
    assert_eq!(get("off"), None);
    assert_eq!(
        get("1:1:3"),
        Some(Keepalive {
            idle: Some(Duration::from_secs(1)),
            interval: Some(Duration::from_secs(1)),
            count: Some(3)
        })
    );
    assert_eq!(
        get("30m::10"),
        Some(Keepalive {
            idle: Some(Duration::from_secs(1800)),
            interval: None,
            count: Some(10)
        })
    );
    assert_err(
        &listen("1:2"),
        3,
        16,
        "expected on, off or IDLE:INTERVAL:COUNT",
    );
    assert_err(
        &listen("0:1:1"),
        3,
        16,
        "'0' is not whole seconds from 1s to 32767s",
    );
    assert_err(&listen("10h:1:1"), 3, 16, "'10h' is not whole seconds");
    assert_err(
        &listen("1500ms:1:1"),
        3,
        16,
        "'1500ms' is not whole seconds",
    );
    assert_err(&listen("1:1:0"), 3, 16, "so_keepalive count");
}

#[test]
fn sni_routes_and_their_errors() {
    let c = ok("upstream a { server 127.0.0.1:1; }\nupstream b { server 127.0.0.1:2; }\n\
                listen 127.0.0.1:443 { sni A.Example.COM. a; sni *.example.org b; sni_default a; sni_timeout 2s; }\n\
                listen 127.0.0.1:444 { sni x.test b; }\n");
    let (l, only) = (&c.listeners[0], &c.listeners[1]);
    assert_eq!(
        l.sni_routes,
        [
            ("a.example.com".to_string(), UpstreamId(0)),
            ("*.example.org".to_string(), UpstreamId(1)),
        ]
    );
    assert_eq!(l.sni_default, Some(UpstreamId(0)));
    assert_eq!(l.sni_timeout, Duration::from_secs(2));
    assert_eq!(
        (only.sni_default, only.upstream),
        (None, UpstreamId(1)),
        "no proxy needed"
    );
    assert_err(
        "upstream a { server 127.0.0.1:1; }\nlisten 127.0.0.1:443 {\n  sni a;\n}",
        3,
        8,
        "expected a name and an upstream after 'sni'",
    );
    assert_err(
        "upstream a { server 127.0.0.1:1; }\nlisten 127.0.0.1:443 {\n  sni a..b a;\n}",
        3,
        7,
        "bad sni name 'a..b'",
    );
    assert_err(
        "upstream a { server 127.0.0.1:1; }\nlisten 127.0.0.1:443 {\n  sni a.test a;\n  sni A.test a;\n}",
        4,
        7,
        "duplicate sni name 'a.test'",
    );
    assert_err(
        "upstream a { server 127.0.0.1:1; }\nlisten 127.0.0.1:443 {\n  proxy a;\n  sni_default a;\n}",
        4,
        15,
        "sni_default without any 'sni NAME UPSTREAM;' route",
    );
    assert_err(
        "listen 127.0.0.1:443 {\n  sni a.test nowhere;\n}",
        2,
        14,
        "unknown upstream 'nowhere'",
    );
}

#[test]
fn resolver_and_resolve() {
    let config = ok("resolver 127.0.0.53 [::1]:5353 127.0.0.1:53 valid=10s;\n\
                     upstream u { server localhost:80 resolve weight=3; server 127.0.0.1:81; }\n\
                     listen 127.0.0.1:0 { proxy u; }\n");
    let names: Vec<String> = config
        .resolver
        .nameservers
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(names, ["127.0.0.53:53", "[::1]:5353", "127.0.0.1:53"]);
    assert_eq!(config.resolver.valid, Duration::from_secs(10));
    let servers = &config.upstreams[0].servers;
    assert_eq!(servers.len(), 3, "{servers:?}");
    for s in &servers[..2] {
        assert_eq!((s.resolve.as_deref(), s.weight), (Some("localhost"), 3));
    }
    assert_eq!(servers[2].resolve, None);
    // Without the directive: the system's nameservers, answers trusted for 30 s at most.
    let plain = ok("listen 127.0.0.1:0 { proxy localhost:80; }\n");
    assert_eq!(plain.resolver, crate::config::Resolver::default());
    assert_eq!(plain.resolver.valid, Duration::from_secs(30));
    assert_eq!(
        plain.upstreams[0].servers[0].resolve, None,
        "only with 'resolve'"
    );
}

#[test]
fn resolver_and_resolve_errors() {
    assert_err(
        "resolver;\n",
        1,
        9,
        "expected a nameserver address after 'resolver'",
    );
    assert_err(
        "resolver valid=5s;\n",
        1,
        18,
        "expected a nameserver address",
    );
    assert_err(
        "resolver dns.test;\n",
        1,
        10,
        "bad nameserver address 'dns.test'",
    );
    assert_err("resolver 127.0.0.1:0;\n", 1, 10, "bad nameserver address");
    assert_err("resolver 127.0.0.1 valid=0s;\n", 1, 20, "valid");
    assert_err(
        "upstream u { server localhost:80; }\nresolver 127.0.0.1;\n",
        2,
        1,
        "'resolver' must come before the first host name (line 1 looks one up)",
    );
    assert_err(
        "resolver 127.0.0.1;\nresolver 127.0.0.2;\n",
        2,
        1,
        "duplicate",
    );
    assert_err(
        "upstream u { server 127.0.0.1:80 resolve; }\n",
        1,
        34,
        "'resolve' needs a host name; 127.0.0.1:80 is an address",
    );
    assert_err(
        "upstream u { server localhost:80 resolve=yes; }\n",
        1,
        34,
        "'resolve' takes no value",
    );
}

#[test]
fn pool_of_spares() {
    let c = ok("upstream u { server 127.0.0.1:1; pool 16 idle=5s; }\n\
                upstream v { server 127.0.0.1:2; pool 2; }\n");
    let pools: Vec<_> = c.upstreams.iter().map(|u| u.pool).collect();
    assert_eq!(
        pools,
        [
            Some(crate::config::SparePool {
                size: 16,
                idle: Duration::from_secs(5)
            }),
            Some(crate::config::SparePool {
                size: 2,
                idle: Duration::from_secs(30)
            }),
        ]
    );
    assert_eq!(
        ok("upstream u { server 127.0.0.1:1; }").upstreams[0].pool,
        None
    );
    assert_err(
        "upstream u { server 127.0.0.1:1; pool 0; }",
        1,
        39,
        "'pool' must be between 1 and 1000",
    );
    assert_err(
        "upstream u { server 127.0.0.1:1; pool 4 max=2; }",
        1,
        41,
        "unknown pool option 'max=2'",
    );
    assert_err(
        "upstream u { server 127.0.0.1:1; pool; }",
        1,
        38,
        "expected a number of spares after 'pool'",
    );
    // A spare is connected before its client is known: no PROXY header can name the client.
    assert_err(
        "upstream u {\n  server 127.0.0.1:1;\n  pool 4;\n}\nlisten 127.0.0.1:9 {\n  proxy u;\n  proxy_protocol v2;\n}\n",
        3,
        3,
        "'pool' cannot go with proxy_protocol: listener 127.0.0.1:9 (line 5) sends upstream 'u' a PROXY header",
    );
    assert_err(
        "upstream u {\n  server 127.0.0.1:1 proxy_protocol=v1;\n  pool 4;\n}\nlisten 127.0.0.1:9 { proxy u; }\n",
        3,
        3,
        "'pool' cannot go with proxy_protocol",
    );
    assert_err(
        "upstream u {\n  server 127.0.0.1:1;\n  pool 4;\n}\nlisten udp 127.0.0.1:9 { proxy u; }\n",
        3,
        3,
        "'pool' keeps TCP connections: udp listener 127.0.0.1:9 (line 5) uses upstream 'u'",
    );
    // A server that says off wins over the listener's header: no conflict.
    ok(
        "upstream u {\n  server 127.0.0.1:1 proxy_protocol=off;\n  pool 4;\n}\n\
        listen 127.0.0.1:9 {\n  proxy u;\n  proxy_protocol v2;\n}\n",
    );
}
