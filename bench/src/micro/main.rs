//! `sluice-micro`: timings of sluice's inner pieces, in-process, no sockets: the timer wheel, the
//! buffer pool, every balancer with 3 and 100 servers, the config parser, and the access rules and
//! per-client table that every new connection goes through.
//!
//! Each benchmark is a batch function that does a fixed amount of work and returns the time of
//! the part it measures plus the operations done; batches repeat until the time budget is spent
//! (at least 3, at most `MAX_BATCHES`), and the table shows the median batch's ns/op. Inputs and
//! results pass through `std::hint::black_box` so the optimiser cannot drop the work.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::config::{Balance, Config, Server, Upstream};
use sluice::reactor::timer::TimerWheel;
use sluice::tcp::buffer::{BufferPool, PoolStats};
use sluice::upstream::{Group, Tried};

const USAGE: &str = "\
Usage: sluice-micro [--seconds S] [--filter TEXT] [--out FILE]

  --seconds S    time budget per benchmark (default 0.5)
  --filter TEXT  only benchmarks whose name contains TEXT
  --out FILE     also write the table here (default: bench/out/micro.md)";

const MAX_BATCHES: usize = 10_000;
/// Timers per wheel in the timer benchmarks: about one reactor's worth of connections.
const TIMERS: usize = 10_000;
const BALANCING_CONF: &str = include_str!("../../../conf/balancing.conf");

/// One batch: (time of the measured part, operations done).
type Batch = Box<dyn FnMut() -> (Duration, u64)>;

struct Bench {
    name: String,
    batch: Batch,
}

fn bench(name: impl Into<String>, batch: impl FnMut() -> (Duration, u64) + 'static) -> Bench {
    Bench {
        name: name.into(),
        batch: Box::new(batch),
    }
}

/// Times `f` over `ops` operations.
fn timed(ops: u64, f: impl FnOnce()) -> (Duration, u64) {
    let t = Instant::now();
    f();
    (t.elapsed(), ops)
}

/// Deadlines spread pseudo-randomly over `span` after `t0` (a fixed LCG: same run, same input).
fn deadlines(t0: Instant, n: usize, span: Duration) -> Vec<Instant> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let span_ns = span.as_nanos().max(1) as u64;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            t0 + Duration::from_nanos((x >> 11) % span_ns)
        })
        .collect()
}

fn timer_benches() -> Vec<Bench> {
    let mut v = Vec::new();
    v.push(bench(
        "timer: insert (10k pending, deadlines over 10 s)",
        || {
            let t0 = Instant::now();
            let ds = deadlines(t0, TIMERS, Duration::from_secs(10));
            let mut w = TimerWheel::new(t0);
            let r = timed(TIMERS as u64, || {
                for (i, d) in ds.iter().enumerate() {
                    black_box(w.insert(*d, i));
                }
            });
            black_box(&w);
            r
        },
    ));
    v.push(bench("timer: cancel (10k pending)", || {
        let t0 = Instant::now();
        let ds = deadlines(t0, TIMERS, Duration::from_secs(10));
        let mut w = TimerWheel::new(t0);
        let keys: Vec<_> = ds
            .iter()
            .enumerate()
            .map(|(i, d)| w.insert(*d, i))
            .collect();
        timed(TIMERS as u64, || {
            for k in keys {
                black_box(w.cancel(k));
            }
        })
    }));
    v.push(bench(
        "timer: expire, 1 ms steps (10k over 1 s), per timer",
        || {
            let t0 = Instant::now();
            let ds = deadlines(t0, TIMERS, Duration::from_secs(1));
            let mut w = TimerWheel::new(t0);
            for (i, d) in ds.iter().enumerate() {
                w.insert(*d, i);
            }
            let mut expired = 0u64;
            let t = Instant::now();
            // Step past the last deadline, as a reactor would, one millisecond per turn.
            for ms in 0..=1_001u64 {
                let now = t0 + Duration::from_millis(ms);
                black_box(w.poll_timeout(now));
                while let Some(x) = w.expire(now) {
                    black_box(x);
                    expired += 1;
                }
            }
            (t.elapsed(), expired.max(1))
        },
    ));
    v.push(bench("timer: poll_timeout (10k pending)", || {
        let t0 = Instant::now();
        let ds = deadlines(t0, TIMERS, Duration::from_secs(10));
        let mut w = TimerWheel::new(t0);
        for (i, d) in ds.iter().enumerate() {
            w.insert(*d, i);
        }
        let calls = 1_000u64;
        timed(calls, || {
            for i in 0..calls {
                black_box(w.poll_timeout(black_box(t0 + Duration::from_micros(i))));
            }
        })
    }));
    v
}

fn pool_benches() -> Vec<Bench> {
    let mut v = Vec::new();
    let mut pool = BufferPool::new(16 * 1024, 64 << 20, Arc::new(PoolStats::default()));
    v.push(bench(
        "buffer pool: get + put (warm, 16k buffers)",
        move || {
            let n = 100_000u64;
            timed(n, || {
                for _ in 0..n {
                    if let Some(b) = pool.get() {
                        pool.put(black_box(b));
                    }
                }
            })
        },
    ));
    for burst in [64usize, 256] {
        let mut pool = BufferPool::new(16 * 1024, 64 << 20, Arc::new(PoolStats::default()));
        let mut held = Vec::with_capacity(burst);
        v.push(bench(
            format!("buffer pool: {burst} gets then {burst} puts, per get+put"),
            move || {
                let rounds = 100u64;
                timed(rounds * burst as u64, || {
                    for _ in 0..rounds {
                        held.extend((0..burst).filter_map(|_| pool.get()));
                        for b in held.drain(..) {
                            pool.put(black_box(b));
                        }
                    }
                })
            },
        ));
    }
    v
}

fn upstream(balance: Balance, n: usize) -> Upstream {
    let servers = (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16));
            let mut s = Server::new(addr);
            s.weight = 1 + (i % 5) as u32;
            s
        })
        .collect();
    Upstream {
        name: format!("bench-{}-{n}", balance.name()),
        balance,
        servers,
        health_check: None,
        pool: None,
    }
}

fn balancer_benches() -> Vec<Bench> {
    let mut v = Vec::new();
    for (name, balance) in Balance::ALL {
        for n in [3usize, 100] {
            let mut group = Group::new(&upstream(balance, n), &[], Default::default());
            // Connections stay open a while: release the oldest of the last 64 picks, so
            // least_conn and random see real, moving counts.
            let mut open = std::collections::VecDeque::with_capacity(64);
            let mut client: u32 = 0;
            v.push(bench(
                format!("balancer: {name}, {n} servers (pick + acquire/release)"),
                move || {
                    let picks = 100_000u64;
                    let now = Instant::now();
                    timed(picks, || {
                        for _ in 0..picks {
                            client = client.wrapping_add(0x9e37_79b9);
                            // Spread over 127.0.0.0/8 so the hash methods see many clients.
                            let ip =
                                IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | (client & 0x00ff_ffff)));
                            if let Some(i) = group.pick(black_box(ip), now, &Tried::default()) {
                                group.acquire(i);
                                open.push_back(i);
                            }
                            if open.len() > 64 {
                                if let Some(old) = open.pop_front() {
                                    group.release(old);
                                }
                            }
                        }
                    })
                },
            ));
        }
    }
    v
}

fn config_benches() -> Vec<Bench> {
    vec![bench("config: parse conf/balancing.conf", || {
        let n = 200u64;
        timed(n, || {
            for _ in 0..n {
                let parsed = Config::parse(black_box(BALANCING_CONF), "bench.conf");
                black_box(parsed.is_ok());
            }
        })
    })]
}

/// `n` pseudo-random IPv4 rules (prefixes /8 to /32, alternately allow and deny), then `deny all`.
fn rules(n: usize) -> Vec<sluice::config::AccessRule> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut out: Vec<sluice::config::AccessRule> = (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let prefix = 8 + (x % 25) as u32;
            let host = 32 - prefix;
            let net = ((x >> 32) as u32)
                .checked_shr(host)
                .map_or(0, |b| b << host);
            let text = format!("{}/{prefix}", Ipv4Addr::from(net));
            sluice::config::AccessRule {
                allow: i % 2 == 0,
                range: Some(sluice::config::Cidr::parse(&text).expect("range")),
            }
        })
        .collect();
    out.push(sluice::config::AccessRule {
        allow: false,
        range: None,
    });
    out
}

fn access_benches() -> Vec<Bench> {
    let mut v = Vec::new();
    for n in [100, 10_000] {
        let acl = sluice::acl::Acl::new(rules(n));
        v.push(bench(
            format!("acl: check a client ({n} rules)"),
            move || {
                let ops = 100_000u64;
                timed(ops, || {
                    let mut ip = 0x0a00_0001u32;
                    for _ in 0..ops {
                        ip = ip.wrapping_mul(2_654_435_761).wrapping_add(1);
                        black_box(acl.denies(IpAddr::V4(Ipv4Addr::from(ip))));
                    }
                })
            },
        ));
    }
    let mut table = sluice::limit::PerIp::new(100_000);
    let policy = sluice::limit::Policy {
        max_per_ip: 50,
        rate: Some((20, 40)),
    };
    let t0 = Instant::now();
    v.push(bench(
        "per-ip: admit + release (100k table, 1M clients)",
        move || {
            let ops = 100_000u64;
            timed(ops, || {
                let mut ip = 1u32;
                for _ in 0..ops {
                    ip = ip.wrapping_mul(2_654_435_761).wrapping_add(7) % 1_000_000;
                    let client = IpAddr::V4(Ipv4Addr::from(ip));
                    if let Ok(ticket) = table.admit(1, client, &policy, t0) {
                        table.release(ticket);
                    }
                }
            })
        },
    ));
    v
}

/// Median ns/op of the batches that fit in `budget`.
fn run_bench(b: &mut Bench, budget: Duration) -> f64 {
    let start = Instant::now();
    let mut per_op = Vec::new();
    while per_op.len() < MAX_BATCHES && (per_op.len() < 3 || start.elapsed() < budget) {
        let (t, ops) = (b.batch)();
        per_op.push(t.as_nanos() as f64 / ops.max(1) as f64);
    }
    per_op.sort_by(f64::total_cmp);
    per_op[per_op.len() / 2]
}

fn format_rate(ops: f64) -> String {
    if ops >= 1e6 {
        format!("{:.1} M", ops / 1e6)
    } else if ops >= 1e3 {
        format!("{:.1} k", ops / 1e3)
    } else {
        format!("{ops:.0}")
    }
}

fn main() -> ExitCode {
    let mut budget = Duration::from_millis(500);
    let mut filter = String::new();
    let mut out = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("out/micro.md");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        } else {
            args.next()
        };
        match (flag.as_str(), value) {
            ("--seconds", Some(v)) => match v.parse::<f64>() {
                Ok(s) if (0.01..=60.0).contains(&s) => budget = Duration::from_secs_f64(s),
                _ => {
                    eprintln!("sluice-micro: --seconds wants 0.01..=60, got '{v}'");
                    return ExitCode::from(2);
                }
            },
            ("--filter", Some(v)) => filter = v,
            ("--out", Some(v)) => out = v.into(),
            _ => {
                eprintln!("sluice-micro: bad option '{flag}'\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let mut all: Vec<Bench> = timer_benches();
    all.extend(pool_benches());
    all.extend(balancer_benches());
    all.extend(config_benches());
    all.extend(access_benches());
    let mut table =
        String::from("### micro: sluice's inner pieces (median batch, single thread)\n\n");
    table.push_str("| benchmark | ns/op | ops/s |\n|---|---:|---:|\n");
    for b in all.iter_mut().filter(|b| b.name.contains(&filter)) {
        let ns = run_bench(b, budget);
        let line = format!(
            "| {} | {:.1} | {} |\n",
            b.name,
            ns,
            format_rate(1e9 / ns.max(1e-3))
        );
        eprint!("{line}");
        table.push_str(&line);
    }
    println!("\n{table}");
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&out, &table) {
        eprintln!("sluice-micro: {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
