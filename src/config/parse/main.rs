//! The main context: process-wide settings, and the `upstream` and `listen` blocks.

use super::directives::{Context, LOG_LEVELS};
use super::{Arg, Item, Parser, Seen};
use crate::config::ConfigError;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const MIN_BUFFER_SIZE: usize = 1 << 10;
/// One page, and Linux's `pipe-max-size` default (an unprivileged process may not go past it).
const MIN_PIPE_SIZE: usize = 4 << 10;
const MAX_PIPE_SIZE: usize = 1 << 20;
const MAX_BUFFER_SIZE: usize = 16 << 20;
/// A longer spin only burns CPU: past a few milliseconds, sleeping in the kernel costs less.
const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

impl Parser<'_> {
    pub(super) fn main(&mut self) -> Result<(), ConfigError> {
        let mut seen = Seen::default();
        loop {
            let stmt = match self.item()? {
                Item::Stmt(stmt) => stmt,
                Item::Eof(_) => return Ok(()),
                Item::Close(pos) => {
                    return Err(self.err(pos, "unexpected '}' (no block is open here)"));
                }
            };
            let d = self.directive(Context::Main, &stmt, &mut seen, None)?;
            match d.name {
                "upstream" => self.upstream(&stmt)?,
                "listen" => self.listen(&stmt)?,
                "admin" => self.admin(&stmt)?,
                "allow" | "deny" => {
                    let rule = self.access_rule(&stmt)?;
                    self.config.access.push(rule);
                }
                "resolver" => self.resolver(&stmt)?,
                "splice_pipe_size" => {
                    let arg = self.single(&stmt, d.takes)?;
                    let size = self.size(arg)?;
                    if !(MIN_PIPE_SIZE..=MAX_PIPE_SIZE).contains(&size) {
                        return Err(self.err_at(
                            arg,
                            format!(
                                "splice_pipe_size must be between 4k and 1m, got '{}'",
                                arg.text
                            ),
                        ));
                    }
                    self.config.splice_pipe_size = size;
                }
                "max_pipes" => {
                    let arg = self.single(&stmt, d.takes)?;
                    self.config.max_pipes =
                        Some(self.usize_value(&arg.text, arg, "max_pipes", 0)?);
                }
                "per_ip_table_size" => {
                    let arg = self.single(&stmt, d.takes)?;
                    self.config.per_ip_table_size =
                        self.usize_value(&arg.text, arg, "per_ip_table_size", 1)?;
                }
                "max_connections" => {
                    let arg = self.single(&stmt, d.takes)?;
                    self.config.max_connections =
                        self.usize_value(&arg.text, arg, "max_connections", 1)?;
                }
                "buffer_size" => {
                    let arg = self.single(&stmt, d.takes)?;
                    let size = self.size(arg)?;
                    if !(MIN_BUFFER_SIZE..=MAX_BUFFER_SIZE).contains(&size) {
                        return Err(self.err_at(
                            arg,
                            format!("buffer_size must be between 1k and 16m, got '{}'", arg.text),
                        ));
                    }
                    self.config.buffer_size = size;
                }
                "buffer_memory" => {
                    let arg = self.single(&stmt, d.takes)?;
                    self.config.buffer_memory = self.size(arg)?;
                    self.buffer_memory = Some(arg.clone());
                }
                "workers" => {
                    let arg = self.single(&stmt, d.takes)?;
                    self.config.workers = match arg.text.as_str() {
                        "auto" => crate::config::auto_workers(),
                        text => {
                            let max = u32::try_from(crate::config::MAX_WORKERS).unwrap_or(256);
                            self.u32_value(text, arg, "workers", 1, max)? as usize
                        }
                    };
                }
                "shutdown_timeout" => {
                    let arg = self.single(&stmt, d.takes)?;
                    self.config.shutdown_timeout = self.duration(&arg.text, arg)?;
                }
                "busy_poll" => {
                    let arg = self.single(&stmt, d.takes)?;
                    self.config.busy_poll = self.busy_poll(arg)?;
                }
                "log_level" => {
                    let arg = self.single(&stmt, d.takes)?;
                    let names = LOG_LEVELS.map(|(n, _)| n);
                    self.config.log_level = LOG_LEVELS
                        .iter()
                        .find(|(n, _)| *n == arg.text)
                        .map(|(_, level)| *level)
                        .ok_or_else(|| self.not_one_of(arg, "log level", &names))?;
                }
                "access_log" => {
                    let arg = self.single(&stmt, d.takes)?;
                    self.config.access_log = match arg.text.as_str() {
                        "on" => true,
                        "off" => false,
                        _ => return Err(self.not_one_of(arg, "access_log value", &["on", "off"])),
                    };
                }
                _ => return Err(self.unknown(Context::Main, &stmt.name)),
            }
        }
    }

    /// `resolver ADDR... [valid=T];`: IP addresses (port 53 unless given), then how long an
    /// answer may be trusted at most.
    fn resolver(&mut self, stmt: &super::Stmt) -> Result<(), ConfigError> {
        if let Some(line) = self.first_name.get() {
            return Err(self.err_at(
                &stmt.name,
                format!(
                    "'resolver' must come before the first host name (line {line} looks one up)"
                ),
            ));
        }
        let mut resolver = crate::config::Resolver::default();
        for arg in &stmt.args {
            if let Some(value) = arg.text.strip_prefix("valid=") {
                resolver.valid = self.positive_duration(value, arg, "valid")?;
                continue;
            }
            let addr = match (arg.text.parse::<SocketAddr>(), arg.text.parse::<IpAddr>()) {
                (Ok(addr), _) if addr.port() != 0 => addr,
                (_, Ok(ip)) => SocketAddr::new(ip, 53),
                _ => {
                    return Err(self.err_at(
                        arg,
                        format!(
                            "bad nameserver address '{}' (expected IP, IP:PORT or [IPv6]:PORT)",
                            arg.text
                        ),
                    ))
                }
            };
            resolver.nameservers.push(addr);
        }
        if resolver.nameservers.is_empty() {
            return Err(self.err(
                stmt.term.pos(),
                "expected a nameserver address after 'resolver' (IP, IP:PORT or [IPv6]:PORT)",
            ));
        }
        self.semi(stmt)?;
        self.config.resolver = resolver;
        Ok(())
    }

    pub(super) fn busy_poll(&self, arg: &Arg) -> Result<Duration, ConfigError> {
        if arg.text == "off" {
            return Ok(Duration::ZERO);
        }
        let spin = self.duration(&arg.text, arg)?;
        if spin > MAX_BUSY_POLL {
            return Err(self.err_at(
                arg,
                format!(
                    "busy_poll must be 'off' or at most 10ms, got '{}'",
                    arg.text
                ),
            ));
        }
        Ok(spin)
    }
}
