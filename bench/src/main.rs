//! `sluice-bench`: runs the load scenarios of issue #5 against `direct`, `sluice` and whichever of
//! haproxy, nginx and socat are installed, and prints one markdown table per scenario.
//!
//! Order of a run: pin this process to every CPU but the first (before any thread starts, so
//! backends and load threads inherit it), raise the descriptor limit, find the targets, then for
//! each scenario, case and repetition start each target in turn against a fresh backend. Targets
//! are interleaved within a repetition so that a slow drift of the machine (another build, thermal
//! throttling) touches all of them alike. Everything binds and connects on 127.0.0.1 only.

// `unsafe` only in `sys`, as in sluice itself.
#![deny(unsafe_code)]

mod backends;
mod procfs;
mod report;
mod scenarios;
mod stats;
#[allow(unsafe_code)]
mod sys;
mod targets;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use report::{Outcome, Table};
use scenarios::{Scenario, Settings, Under};
use targets::{Env, Kind};

const USAGE: &str = "\
Usage: sluice-bench [--scenario NAME]... [--target NAME]... [--reps N] [--seconds S]
                    [--sluice PATH] [--baseline PATH] [--out FILE]

  --scenario NAME  throughput, rr, pingpong, churn, idle, udp (repeatable; default: all)
  --target NAME    direct, sluice, haproxy, nginx, socat (repeatable; default: all installed)
  --reps N         repetitions per case and target; tables show medians (default 3)
  --seconds S      measuring window per run, after a short warm-up (default 3)
  --sluice PATH    the sluice binary (default: target/release/sluice of this repo)
  --baseline PATH  another sluice binary, run as target sluice-base beside sluice (a change
                   against the code before it, in one run)
  --out FILE       also write the tables here (default: bench/out/results.md)";

/// Idle connections held when the descriptor limit allows.
const IDLE_CONNS: usize = 10_000;
/// socat forks one process per connection: hold fewer through it.
const SOCAT_IDLE_CONNS: usize = 500;
/// Descriptors kept back for everything that is not an idle connection.
const FD_RESERVE: u64 = 256;

struct Args {
    scenarios: Vec<Scenario>,
    targets: Vec<Kind>,
    reps: usize,
    seconds: f64,
    sluice: PathBuf,
    baseline: Option<PathBuf>,
    out: PathBuf,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut a = Args {
        scenarios: Vec::new(),
        targets: Vec::new(),
        reps: 3,
        seconds: 3.0,
        sluice: root.join("../target/release/sluice"),
        baseline: None,
        out: root.join("out/results.md"),
    };
    while let Some(flag) = args.next() {
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (flag.clone(), None),
        };
        if name == "-h" || name == "--help" {
            return Err(String::new());
        }
        let value = match inline {
            Some(v) => v,
            None => args.next().ok_or_else(|| format!("{name} needs a value"))?,
        };
        match name.as_str() {
            "--scenario" => {
                for v in value.split(',') {
                    let s =
                        Scenario::from_name(v).ok_or_else(|| format!("unknown scenario '{v}'"))?;
                    a.scenarios.push(s);
                }
            }
            "--target" => {
                for v in value.split(',') {
                    let t = Kind::from_name(v).ok_or_else(|| format!("unknown target '{v}'"))?;
                    a.targets.push(t);
                }
            }
            "--reps" => {
                a.reps = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| format!("--reps wants 1..=100, got '{value}'"))?;
            }
            "--seconds" => {
                a.seconds = value
                    .parse()
                    .ok()
                    .filter(|s: &f64| (0.1..=600.0).contains(s))
                    .ok_or_else(|| format!("--seconds wants 0.1..=600, got '{value}'"))?;
            }
            "--sluice" => a.sluice = PathBuf::from(value),
            "--baseline" => a.baseline = Some(PathBuf::from(value)),
            "--out" => a.out = PathBuf::from(value),
            _ => return Err(format!("unknown option '{name}'")),
        }
    }
    if a.scenarios.is_empty() {
        a.scenarios = Scenario::ALL.to_vec();
    }
    if a.targets.is_empty() {
        let base = a.baseline.is_some();
        a.targets = Kind::ALL
            .into_iter()
            .filter(|&k| base || k != Kind::SluiceBase)
            .collect();
    }
    dedup(&mut a.scenarios);
    dedup(&mut a.targets);
    Ok(a)
}

/// Drops repeated entries, keeping the first of each in its place.
fn dedup<T: PartialEq + Copy>(v: &mut Vec<T>) {
    let mut seen = Vec::new();
    v.retain(|x| {
        let new = !seen.contains(x);
        seen.push(*x);
        new
    });
}

/// Where the proxy and the load run; lines for the report header.
fn place(notes: &mut Vec<String>) -> (Option<Vec<usize>>, Option<PathBuf>) {
    let cpus = match sys::allowed_cpus() {
        Ok(c) if !c.is_empty() => c,
        Ok(_) | Err(_) => {
            notes.push("placement: CPU affinity unreadable; nothing pinned".into());
            return (None, None);
        }
    };
    if cpus.len() < 2 {
        notes.push("placement: one CPU only; proxy and load share it (nothing pinned)".into());
        return (None, None);
    }
    let (proxy, load) = (vec![cpus[0]], cpus[1..].to_vec());
    let taskset = targets::which("taskset");
    let how = if taskset.is_some() {
        "taskset -c"
    } else {
        "sched_setaffinity before exec (no taskset)"
    };
    match sys::pin_self(&load) {
        Ok(()) => notes.push(format!(
            "placement: {} CPUs; proxy on CPU {} ({how}); load generator and backends on CPU {}",
            cpus.len(),
            proxy[0],
            load.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )),
        Err(e) => notes.push(format!(
            "placement: cannot pin the bench process ({e}); load unpinned"
        )),
    }
    (Some(proxy), taskset)
}

/// The descriptor limit after raising it, and how many idle connections it allows; lines for
/// the header.
fn idle_budget(notes: &mut Vec<String>) -> (u64, usize) {
    match sys::raise_nofile_limit() {
        Ok(limit) => {
            // The bench holds both ends of every idle connection: client and backend sockets.
            let fit = (limit.saturating_sub(FD_RESERVE) / 2) as usize;
            if fit < IDLE_CONNS {
                notes.push(format!(
                    "idle: RLIMIT_NOFILE hard limit is {limit}; holding {fit} connections instead of {IDLE_CONNS}"
                ));
            }
            (limit, fit.clamp(1, IDLE_CONNS))
        }
        Err(e) => {
            notes.push(format!(
                "idle: cannot read RLIMIT_NOFILE ({e}); holding 500 connections"
            ));
            (1024, 500)
        }
    }
}

fn header(
    a: &Args,
    settings: &Settings,
    notes: &[String],
    present: &[Kind],
    missing: &[(Kind, String)],
) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut h = String::from("# sluice bench\n\n");
    h += &format!(
        "- {} rep(s) × {} s per run (after {} ms warm-up), medians; Linux {}\n",
        a.reps,
        a.seconds,
        settings.warmup.as_millis(),
        kernel.trim(),
    );
    let names: Vec<&str> = present.iter().map(|k| k.name()).collect();
    h += &format!("- targets: {}\n", names.join(", "));
    for (k, why) in missing {
        h += &format!("- not measured: {} ({why})\n", k.name());
    }
    for n in notes {
        h += &format!("- {n}\n");
    }
    h += "- proxy CPU = utime+stime of the proxy's process tree over the window (socat: reaped and live children, approximate)\n";
    h
}

fn run(a: Args) -> Result<(), String> {
    let mut notes = Vec::new();
    // Pin before any thread exists, so every backend and load thread inherits the mask.
    let (proxy_cpus, taskset) = place(&mut notes);
    let (nofile, idle_conns) = idle_budget(&mut notes);
    let settings = Settings {
        seconds: a.seconds,
        warmup: Duration::from_secs_f64((a.seconds / 3.0).min(0.5)),
        idle_conns,
        socat_idle_conns: idle_conns.min(SOCAT_IDLE_CONNS),
    };
    let out_dir = a
        .out
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let env = Env {
        sluice: a.sluice.clone(),
        baseline: a.baseline.clone(),
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("out"),
        proxy_cpus,
        taskset,
        max_conns: idle_conns,
        nofile,
    };
    std::fs::create_dir_all(&env.out).map_err(|e| format!("{}: {e}", env.out.display()))?;
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let (mut present, mut missing) = (Vec::new(), Vec::new());
    for &k in &a.targets {
        match targets::available(k, &env) {
            Ok(()) => present.push(k),
            Err(why) => missing.push((k, why)),
        }
    }
    if present.contains(&Kind::Socat) && a.scenarios.contains(&Scenario::Idle) {
        notes.push(format!(
            "idle: socat holds {} connections (one process each; RSS summed over processes counts shared pages in each)",
            settings.socat_idle_conns
        ));
    }
    let head = header(&a, &settings, &notes, &present, &missing);
    print!("{head}");
    let mut tables: Vec<Table> = Vec::new();
    for &scenario in &a.scenarios {
        let mut table = Table::new(scenario);
        for case in scenario.cases() {
            for rep in 0..a.reps {
                for &kind in &present {
                    eprintln!(
                        "[{} / {} / rep {}] {}",
                        scenario.name(),
                        case.label,
                        rep + 1,
                        kind.name()
                    );
                    let outcome = run_one(&case, kind, &env, &settings);
                    if let Outcome::Failed(e) = &outcome {
                        eprintln!("    failed: {e}");
                    }
                    table.row(case.label, kind).runs.push(outcome);
                }
            }
        }
        let text = table.render();
        println!("\n{text}");
        tables.push(table);
        write_out(&a.out, &head, &tables)?;
    }
    eprintln!("results written to {}", a.out.display());
    Ok(())
}

/// One repetition of one case against one target: fresh backend, fresh proxy.
fn run_one(case: &scenarios::Case, kind: Kind, env: &Env, settings: &Settings) -> Outcome {
    let backend = match case.backend() {
        Ok(b) => b,
        Err(e) => return Outcome::Failed(format!("backend: {e}")),
    };
    let running = match targets::start(kind, env, case.slug, case.proto, backend.addr()) {
        Ok(r) => r,
        Err(e) if e.starts_with("n/a") => return Outcome::Skipped(e),
        Err(e) => return Outcome::Failed(e),
    };
    let under = Under {
        target: &running,
        backend: &backend,
        settings,
    };
    let result = case.run(&under);
    running.stop();
    drop(backend);
    match result {
        Ok(m) => Outcome::Ok(m),
        Err(e) => Outcome::Failed(e),
    }
}

fn write_out(path: &PathBuf, head: &str, tables: &[Table]) -> Result<(), String> {
    let mut text = head.to_string();
    for t in tables {
        text.push('\n');
        text.push_str(&t.render());
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("sluice-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
