//! The `sluice` binary: config checking with `-t -c`, forwarding with `-L/-U`, the access
//! log line, and the exit statuses (0 clean, 1 config or runtime error, 2 usage).

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

// ---- config errors -------------------------------------------------------------------------

/// Checks `text` with `sluice -t -c FILE`: exit 1, and stderr names `FILE:line:col` with `col`
/// one of `cols` (the offending token, or the directive it belongs to) and contains `needles`.
fn config_error(text: &str, lines: &[u32], cols: &[u32], needles: &[&str]) {
    let file = TempFile::new("bad", text);
    let out = run_sluice(&["-t", "-c", file.path_str()]);
    assert_eq!(
        out.code,
        Some(1),
        "`sluice -t` on a bad config exits 1; stderr:\n{}",
        out.stderr
    );
    let prefix = format!("{}:", file.path_str());
    let position = out.stderr.find(&prefix).map(|i| {
        let rest = &out.stderr[i + prefix.len()..];
        let mut parts = rest.splitn(3, ':');
        let line = parts.next().and_then(|l| l.parse::<u32>().ok());
        let col = parts.next().and_then(|c| c.parse::<u32>().ok());
        (line, col)
    });
    match position {
        Some((Some(line), Some(col))) => {
            assert!(
                lines.contains(&line) && cols.contains(&col),
                "the error points at {}:{}, expected line {:?} col {:?}; stderr:\n{}",
                line,
                col,
                lines,
                cols,
                out.stderr
            );
        }
        _ => panic!("stderr does not name {}LINE:COL:\n{}", prefix, out.stderr),
    }
    for needle in needles {
        assert!(
            out.stderr.contains(needle),
            "stderr should mention {:?}:\n{}",
            needle,
            out.stderr
        );
    }
}

#[test]
fn config_unknown_directive_suggests_the_closest_name() {
    config_error(
        "# a comment on line 1\nmax_conections 100;\n",
        &[2],
        &[1],
        &["did you mean", "max_connections"],
    );
}

#[test]
fn config_missing_semicolon() {
    // The parser may report the end of the directive (line 2) or the `}` it found instead
    // of `;` (line 3, col 1).
    config_error(
        "upstream backend {\n    server 127.0.0.1:7001\n}\nlisten 127.0.0.1:7000 { proxy backend; }\n",
        &[2, 3],
        &[1, 5, 12, 26],
        &[";"],
    );
}

#[test]
fn config_bad_duration() {
    config_error(
        "listen 127.0.0.1:7000 {\n    proxy 127.0.0.1:7001;\n    connect_timeout 5parsecs;\n}\n",
        &[3],
        &[21, 5],
        &["5parsecs"],
    );
}

#[test]
fn config_unknown_upstream() {
    config_error(
        "upstream backend {\n    server 127.0.0.1:7001;\n}\nlisten 127.0.0.1:7000 {\n    proxy backnd;\n}\n",
        &[5],
        &[11, 5],
        &["backnd"],
    );
}

#[test]
fn config_duplicate_listen() {
    config_error(
        "listen 127.0.0.1:7000 {\n    proxy 127.0.0.1:7001;\n}\nlisten 127.0.0.1:7000 {\n    proxy 127.0.0.1:7002;\n}\n",
        &[4],
        &[8, 1],
        &["127.0.0.1:7000"],
    );
}

#[test]
fn config_server_without_port() {
    config_error(
        "upstream backend {\n    server 127.0.0.1;\n}\nlisten 127.0.0.1:7000 {\n    proxy backend;\n}\n",
        &[2],
        &[12, 5],
        &["port"],
    );
}

#[test]
fn example_config_checks_ok() {
    let mut command = sluice_command(&["-t", "-c", "conf/sluice.conf"]);
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    let out = SluiceChild::spawn(command).finish(EVENTUALLY);
    assert_eq!(
        out.code,
        Some(0),
        "`sluice -t -c conf/sluice.conf` fails:\n{}{}",
        out.stdout,
        out.stderr
    );
    // Issue 9: -t says what it parsed.
    for part in [
        "conf/sluice.conf: ok: 1 listener, 1 upstream, 1 server",
        "listen tcp 127.0.0.1:8080 -> ",
        ": round_robin, 1 server: 127.0.0.1:8000",
    ] {
        assert!(
            out.stdout.contains(part),
            "stdout lacks {part:?}:\n{}",
            out.stdout
        );
    }
}

// ---- forwarding ----------------------------------------------------------------------------

#[test]
fn forwards_without_a_config_file() {
    let echo = Backend::echo();
    let (mut sluice, addr, first) = spawn_forward(&[echo.addr()]);
    drop(first);
    let mut c = connect(addr);
    round_trip(&mut c, b"through the binary").expect("echo through `sluice -L -U`");
    let big = payload(51, 1024 * 1024);
    round_trip(&mut c, &big).expect("a larger echo");
    assert!(sluice.exited().is_none(), "sluice exited");
}

#[test]
fn stops_cleanly_on_sigterm() {
    let echo = Backend::echo();
    let (mut sluice, _, mut c) = spawn_forward(&[echo.addr()]);
    round_trip(&mut c, b"x").expect("echo");
    drop(c);
    sluice.signal("TERM");
    let status = sluice.wait_exit(EVENTUALLY);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "SIGTERM is a clean stop; stderr:\n{}",
        sluice.stderr()
    );
}

#[test]
fn all_servers_refusing_logs_connect_failed() {
    let refused = refused_tcp();
    // The first client (the connect that found sluice up) meets the refusing server; later
    // ones may meet a server that passive health already marked (end=no_server).
    let (sluice, addr) = spawn_forward_listening(&[refused.addr]);
    // Bound first, so the client knows its address even if the refusal (a reset) beats its
    // connect to its end.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let me = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("local address");
    let began = Instant::now();
    match socket.connect_timeout(&addr.into(), EVENTUALLY) {
        Ok(()) => {
            let mut c = TcpStream::from(socket);
            // The reset may already be in: the write is not what is tested.
            let _ = c.write_all(b"hello?");
            assert!(
                closed_within(&mut c, EVENTUALLY).is_some(),
                "the client is closed"
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("connect: {e}"),
    }
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "the client is closed only after {:?}",
        began.elapsed()
    );
    let client = format!("client={} ", me);
    let line = sluice
        .wait_for_stderr_line(EVENTUALLY, |l| l.contains(&client))
        .unwrap_or_else(|| {
            panic!(
                "no access log line for {}; stderr:\n{}",
                me,
                sluice.stderr()
            )
        });
    for field in [
        "access".to_string(),
        format!("listen={} ", addr),
        "up_bytes=0 ".to_string(),
        "down_bytes=0 ".to_string(),
        "duration_ms=".to_string(),
        "end=connect_failed".to_string(),
        // Issue 17, item 14: the line names the server that failed, not `server=-`.
        format!("server={} ", refused.addr),
    ] {
        assert!(
            line.contains(&field),
            "the access log line lacks {:?}: {}",
            field,
            line
        );
    }
    assert!(
        line.trim_end().ends_with("end=connect_failed"),
        "end= is the last field: {}",
        line
    );
}

#[test]
fn port_in_use_exits_1_naming_the_address() {
    let taken = TcpListener::bind(loopback_any_port()).expect("bind");
    let addr: SocketAddr = taken.local_addr().expect("address");
    let out = run_sluice(&["-L", &addr.to_string(), "-U", "127.0.0.1:1"]);
    assert_eq!(out.code, Some(1), "stderr:\n{}", out.stderr);
    assert!(
        out.stderr.contains(&addr.to_string()),
        "stderr should name {}:\n{}",
        addr,
        out.stderr
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["-L", "127.0.0.1:0"][..],
        &["-U", "127.0.0.1:1"][..],
        &["--bogus"][..],
    ] {
        let out = run_sluice(args);
        assert_eq!(
            out.code,
            Some(2),
            "`sluice {}` is a usage error; stderr:\n{}",
            args.join(" "),
            out.stderr
        );
    }
}

/// Issue 17, item 12: a bind failure is printed once, not as a log line and a message both.
#[test]
fn a_bind_failure_is_printed_once() {
    let taken = TcpListener::bind(loopback_any_port()).expect("bind");
    let addr: SocketAddr = taken.local_addr().expect("address");
    let out = run_sluice(&["-L", &addr.to_string(), "-U", "127.0.0.1:1"]);
    assert_eq!(out.code, Some(1), "stderr:\n{}", out.stderr);
    let mentions = out.stderr.matches("cannot listen on").count();
    assert_eq!(mentions, 1, "stderr:\n{}", out.stderr);
}

/// Issue 17, items 12 and 13: `-t` rejects what a start would reject, `-U` takes exactly what
/// `server` takes, and a usage error (exit 2) wins over a config error (exit 1).
#[test]
fn the_command_line_checks_what_the_config_checks() {
    let good = TempFile::new("good", "listen 127.0.0.1:0 {\n  proxy 127.0.0.1:1;\n}\n");
    let bad = TempFile::new("bad", "lisen 80;\n");
    let mapped = TempFile::new(
        "mapped",
        "listen [::ffff:127.0.0.1]:8080 {\n  proxy 127.0.0.1:1;\n}\n",
    );
    let cases: [(&[&str], i32, &str); 10] = [
        (&["-L", "8080", "-U", "127.0.0.1:8080"], 2, "a proxy loop"),
        (
            &["-L", "127.0.0.1:8081", "-U", "[::ffff:127.0.0.1]:8081"],
            2,
            "a proxy loop",
        ),
        (&["-t", "-c", mapped.path_str()], 1, "IPv4-mapped"),
        (&["-L", "127.0.0.1:0", "-U", "127.0.0.1:0"], 2, "port 0"),
        (&["-L", "127.0.0.1:0", "-U", "::1:80"], 2, "[ADDR]:PORT"),
        (&["-L", "127.0.0.1:0", "-U", "127.1:80"], 2, "dotted-quad"),
        (&["-L", "127.0.0.1:0", "-U", "0x7f.1:80"], 2, "dotted-quad"),
        (
            &["-t", "-l", "bogus", "-c", good.path_str()],
            2,
            "unknown log level",
        ),
        (
            &["-l", "bogus", "-c", bad.path_str()],
            2,
            "unknown log level",
        ),
        (
            &["-L", "[::ffff:127.0.0.1]:80", "-U", "127.0.0.1:1"],
            2,
            "IPv4-mapped",
        ),
    ];
    for (args, code, phrase) in cases {
        let out = run_sluice(args);
        assert_eq!(
            out.code,
            Some(code),
            "`sluice {}`; stderr:\n{}",
            args.join(" "),
            out.stderr
        );
        assert!(
            out.stderr.contains(phrase),
            "`sluice {}` should say {phrase:?}; stderr:\n{}",
            args.join(" "),
            out.stderr
        );
    }
}

/// Issue 17, item 11: a byte-order mark is skipped; invalid UTF-8 is reported with its line and
/// column; control characters are escaped and a huge token is cut in the message.
#[test]
fn config_messages_are_safe_to_print() {
    let bom = TempFile::new(
        "bom",
        "\u{feff}listen 127.0.0.1:0 {\n  proxy 127.0.0.1:1;\n}\n",
    );
    let out = run_sluice(&["-t", "-c", bom.path_str()]);
    assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);

    let dir = std::env::temp_dir();
    let not_utf8 = dir.join(format!("sluice-not-utf8-{}.conf", unique()));
    std::fs::write(&not_utf8, b"listen 80 {\n  proxy \xff;\n}\n").expect("write");
    let path = not_utf8.display().to_string();
    let out = run_sluice(&["-t", "-c", &path]);
    let _ = std::fs::remove_file(&not_utf8);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains(&format!("{path}:2:9: invalid UTF-8")),
        "stderr:\n{}",
        out.stderr
    );

    let long = "x".repeat(1_000_000);
    let nasty = TempFile::new("nasty", &format!("a\u{0}\u{1b}[2J{long};\n"));
    let out = run_sluice(&["-t", "-c", nasty.path_str()]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.len() < 4096,
        "{} bytes of stderr",
        out.stderr.len()
    );
    assert!(
        !out.stderr.contains('\u{0}') && !out.stderr.contains('\u{1b}'),
        "raw control characters in: {:?}",
        out.stderr
    );
    assert!(out
        .stderr
        .contains("unknown directive 'a\\u{0}\\u{1b}[2Jxxx"));
}

/// Issue 17, item 14: "no server available" is a warning per burst, not per client: one line
/// goes out, the rest are counted, and the next line says how many were held back.
#[test]
fn no_server_warnings_are_rate_limited_with_a_count() {
    let port = free_port(Transport::Tcp);
    let conf = TempFile::new(
        "down",
        &format!(
            "access_log off;\nupstream u {{\n  server 127.0.0.1:1 down;\n}}\n\
             listen 127.0.0.1:{port} {{\n  proxy u;\n}}\n"
        ),
    );
    let mut sluice = SluiceChild::spawn(sluice_command(&["-c", conf.path_str()]));
    assert!(
        wait_listening(&mut sluice, port),
        "stderr:\n{}",
        sluice.stderr()
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..200 {
        assert!(refused_within(addr, EVENTUALLY).is_some());
    }
    // The first line went out at once; keep clients coming until the next one is due.
    let counted = wait_until(EVENTUALLY, || {
        let _ = refused_within(addr, EVENTUALLY);
        sluice.stderr().contains("similar lines suppressed")
    });
    let stderr = sluice.stderr();
    let lines = stderr.matches("no server available").count();
    assert!(
        counted,
        "no line counted the suppressed warnings; stderr:\n{stderr}"
    );
    assert!(
        (2..=10).contains(&lines),
        "{lines} 'no server available' lines for 200+ clients; stderr:\n{}",
        head(&stderr, 20)
    );
}

/// The shipped systemd unit passes `systemd-analyze verify` (with the path of this build's
/// binary, as `make install` writes it).
#[test]
fn the_systemd_unit_verifies() {
    let Ok(found) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    };
    assert!(found.status.success());
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/sluice.service"))
        .expect("conf/sluice.service");
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(unit.contains("KillSignal=SIGTERM"));
    let dir = std::env::temp_dir().join(format!("sluice-unit-{}", unique()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sluice.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/sluice", sluice_bin())).expect("write");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

/// `-w N` runs N workers (both answer), and a bad `-w` is a usage error.
#[test]
fn the_workers_option() {
    let out = run_sluice(&["-w", "0", "-L", "127.0.0.1:0", "-U", "127.0.0.1:1"]);
    assert_eq!(out.code, Some(2), "stderr:\n{}", out.stderr);
    assert!(
        out.stderr.contains("-w takes a number of workers"),
        "{}",
        out.stderr
    );
    let echo = Backend::echo();
    let port = free_port(Transport::Tcp);
    let listen = format!("127.0.0.1:{port}");
    let upstream = echo.addr().to_string();
    let mut sluice =
        SluiceChild::spawn(sluice_command(&["-w", "2", "-L", &listen, "-U", &upstream]));
    assert!(
        wait_listening(&mut sluice, port),
        "stderr:\n{}",
        sluice.stderr()
    );
    let listening = sluice.stderr().matches("listening on").count();
    assert_eq!(
        listening,
        1,
        "one start-up line per listener, not per worker:\n{}",
        sluice.stderr()
    );
    for k in 0..20 {
        let mut c = connect(SocketAddr::from(([127, 0, 0, 1], port)));
        round_trip(&mut c, format!("ping {k}").as_bytes()).expect("echo through two workers");
    }
    let threads = std::fs::read_dir(format!("/proc/{}/task", sluice.pid()))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        threads >= 3,
        "{threads} threads: main and two workers expected"
    );
}

/// `sluice -V` says what built it: the version, the commit of this tree (or "unknown" outside
/// a git tree), the compiler and the target.
#[test]
fn the_version_names_commit_compiler_and_target() {
    let out = run_sluice(&["-V"]);
    assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "four lines:\n{}", out.stdout);
    assert_eq!(lines[0], format!("sluice {}", env!("CARGO_PKG_VERSION")));
    let commit = lines[1].strip_prefix("commit: ").expect("commit line");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(["-C", env!("CARGO_MANIFEST_DIR")])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // As build.rs decides: the commit only when this crate is the top of its own git tree.
    let own = git(&["rev-parse", "--show-toplevel"]).is_some_and(|top| {
        std::fs::canonicalize(top).ok() == std::fs::canonicalize(env!("CARGO_MANIFEST_DIR")).ok()
    });
    let head = git(&["rev-parse", "HEAD"]).filter(|_| own);
    match head {
        Some(head) => assert_eq!(commit, head, "the commit this tree is at"),
        None => assert_eq!(commit, "unknown"),
    }
    let rustc = lines[2].strip_prefix("rustc: ").expect("rustc line");
    assert!(rustc.starts_with("rustc 1."), "{rustc}");
    let target = lines[3].strip_prefix("target: ").expect("target line");
    assert!(target.contains("-linux"), "{target}");
}
