//! CPU time and resident memory of a proxy process and its descendants, read from `/proc`.
//!
//! CPU of a tree = the root's `utime + stime + cutime + cstime` plus, for every live descendant,
//! its own four fields. `cutime`/`cstime` hold the children a process has already reaped, and a
//! live descendant's own children are listed separately, so nothing is counted twice. For a
//! single process (sluice, haproxy) this is just its own time over all threads; for nginx it adds
//! the worker to the master; for socat (one process per connection) it is exact only for
//! children that were reaped or are still alive when sampled: one that exited but was not reaped
//! yet between two samples is still a zombie with its times, so the error is small, but the
//! report calls socat's figures approximate.
//!
//! RSS of a tree is the sum of `VmRSS` over its processes. Shared pages count once per process,
//! which overstates a forking proxy (socat); the report says so.

use std::collections::HashMap;
use std::fs;

use crate::sys;

/// The fields of `/proc/PID/stat` the bench reads. Times are in clock ticks.
#[derive(Debug, Clone, Copy)]
struct Stat {
    ppid: u32,
    ticks: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field n of proc(5) is index n - 3 here: ppid is 4, utime..cstime are 14..17.
    let num = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let ppid = u32::try_from(num(4)?).ok()?;
    let ticks = num(14)? + num(15)? + num(16)? + num(17)?;
    Some(Stat { ppid, ticks })
}

/// Every live process whose parent chain leads to `root` (not `root` itself).
pub fn descendants(root: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = read_stat(pid) {
            children.entry(stat.ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        if let Some(kids) = children.get(&pid) {
            for &kid in kids {
                // A pid cannot be its own ancestor, but a reused pid read mid-scan could loop.
                if kid != root && !out.contains(&kid) {
                    out.push(kid);
                    todo.push(kid);
                }
            }
        }
    }
    out
}

/// CPU seconds (user + system) used so far by `pid` and its descendants, reaped or alive.
/// `None` when `pid` is gone.
pub fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let mut ticks = read_stat(pid)?.ticks;
    for kid in descendants(pid) {
        ticks += read_stat(kid).map_or(0, |s| s.ticks);
    }
    Some(ticks as f64 / sys::clock_ticks_per_second())
}

/// `VmRSS` of one process in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Sum of `VmRSS` over `pid` and its live descendants, with how many processes that is.
pub fn tree_rss_bytes(pid: u32) -> Option<(u64, usize)> {
    let mut total = rss_bytes(pid)?;
    let kids = descendants(pid);
    for &kid in &kids {
        total += rss_bytes(kid).unwrap_or(0);
    }
    Some((total, 1 + kids.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(tree_cpu_seconds(me).is_some());
        let (rss, procs) = tree_rss_bytes(me).expect("own status");
        assert!(rss > 0);
        assert!(procs >= 1);
    }
}
