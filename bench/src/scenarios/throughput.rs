//! Throughput: one or four TCP streams pushing bulk data through the target in one direction.
//!
//! Upload: each client thread writes 64 KiB chunks as fast as the socket takes them and the sink
//! backend counts what it reads. Download: the source backend writes and each client thread
//! counts what it reads. Either way the rate is taken at the receiver, so bytes sitting in socket
//! or proxy buffers never count. Beside the rate: the proxy's CPU % of one core and its CPU
//! microseconds per gigabyte (10^9 bytes) moved.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Metrics, Under, MAX_OPS};
use crate::report::Column;

pub const COLUMNS: &[Column] = &[
    Column::rate("gbps", "Gbit/s", 2),
    Column::cpu("cpu_pct", "proxy CPU %", 0),
    Column::cpu("us_per_gb", "CPU µs/GB", 0),
];

const CHUNK: usize = 64 * 1024;
/// How long a blocked read or write waits before the loop looks at its flags again.
const IO_TIMEOUT: Duration = Duration::from_millis(100);

pub fn run(under: &Under, streams: usize, upload: bool) -> Result<Metrics, String> {
    let flags = under.flags();
    let received = AtomicU64::new(0);
    let mut sockets = Vec::new();
    for _ in 0..streams {
        let s = TcpStream::connect_timeout(&under.addr(), Duration::from_secs(2))
            .map_err(|e| format!("connect {}: {e}", under.addr()))?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| s.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| e.to_string())?;
        sockets.push(s);
    }
    let window = std::thread::scope(|scope| {
        for mut s in sockets {
            let (flags, received) = (&flags, &received);
            scope.spawn(move || {
                let mut buf = vec![0x5au8; CHUNK];
                let mut ops = 0u64;
                while flags.running() && ops < MAX_OPS {
                    ops += 1;
                    let r = if upload {
                        s.write(&buf)
                    } else {
                        s.read(&mut buf)
                    };
                    match r {
                        Ok(0) if !upload => break,
                        Ok(n) if !upload => {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => break,
                    }
                }
                let _ = s.shutdown(Shutdown::Both);
            });
        }
        let count = || {
            if upload {
                under.backend.received()
            } else {
                received.load(Ordering::Relaxed)
            }
        };
        let w = under.measure(&flags, count);
        flags.stop();
        w
    });
    if window.count == 0 {
        return Err("no bytes arrived in the window".to_string());
    }
    let bytes = window.count as f64;
    let mut m = Metrics::new();
    m.insert("gbps", bytes * 8.0 / window.wall / 1e9);
    window.add_cpu(&mut m, "us_per_gb", bytes / 1e9);
    Ok(m)
}
