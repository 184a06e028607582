//! `upstream` blocks: the balance method, `server` lines with their options, `health_check`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

use super::directives::{Context, HEALTH_CHECK_OPTIONS, SERVER_OPTIONS};
use super::values::suggest;
use super::{Arg, Item, Parser, Seen, Stmt};
use crate::config::addr::HostPort;
use crate::config::{Balance, ConfigError, HealthCheck, ProxyVersion, Server, Upstream};

impl Parser<'_> {
    pub(super) fn upstream(&mut self, stmt: &Stmt) -> Result<(), ConfigError> {
        let Some(name) = stmt.args.first() else {
            return Err(self.err(
                stmt.term.pos(),
                "expected an upstream name after 'upstream'",
            ));
        };
        self.no_more(stmt, 1)?;
        self.open(stmt)?;
        let first = self
            .upstream_names
            .get(&name.text)
            .and_then(|&i| self.explicit_upstreams.get(i));
        if let Some(line) = first {
            return Err(self.err_at(
                name,
                format!(
                    "duplicate upstream '{}' (first defined at line {line})",
                    name.text
                ),
            ));
        }
        let mut upstream = Upstream {
            name: name.text.clone(),
            balance: Balance::RoundRobin,
            servers: Vec::new(),
            health_check: None,
            pool: None,
        };
        let mut seen = Seen::default();
        let mut server_lines: HashMap<SocketAddr, u32> = HashMap::new();
        loop {
            let inner = match self.item()? {
                Item::Stmt(inner) => inner,
                Item::Close(_) => break,
                Item::Eof(pos) => return Err(self.unclosed(pos, stmt)),
            };
            let d = self.directive(Context::Upstream, &inner, &mut seen, None)?;
            match d.name {
                "balance" => {
                    let arg = self.single(&inner, d.takes)?;
                    let names = Balance::ALL.map(|(n, _)| n);
                    upstream.balance = Balance::from_name(&arg.text)
                        .ok_or_else(|| self.not_one_of(arg, "balance method", &names))?;
                }
                "server" => {
                    let before = upstream.servers.len();
                    self.server(&inner, &mut upstream.servers)?;
                    for server in upstream.servers.get(before..).unwrap_or_default() {
                        if let Some(first) = server_lines.insert(server.addr, inner.name.line) {
                            let at = inner.args.first().unwrap_or(&inner.name);
                            return Err(self.err_at(
                                at,
                                format!(
                                    "duplicate server {} in upstream '{}' (first at line {first})",
                                    server.addr, name.text
                                ),
                            ));
                        }
                    }
                }
                "health_check" => {
                    upstream.health_check = Some(self.health_check(&inner)?);
                }
                "pool" => {
                    upstream.pool = Some(self.spare_pool(&inner, d.takes)?);
                    self.pool_lines
                        .insert(name.text.clone(), (inner.name.line, inner.name.col));
                }
                _ => return Err(self.unknown(Context::Upstream, &inner.name)),
            }
        }
        if upstream.servers.is_empty() {
            return Err(self.err_at(
                &stmt.name,
                format!(
                    "upstream '{}' has no servers (add e.g. 'server 127.0.0.1:8080;')",
                    name.text
                ),
            ));
        }
        self.add_upstream(upstream);
        self.explicit_upstreams.push(stmt.name.line);
        Ok(())
    }

    pub(super) fn server(&self, stmt: &Stmt, servers: &mut Vec<Server>) -> Result<(), ConfigError> {
        let Some(addr_arg) = stmt.args.first() else {
            return Err(self.err(
                stmt.term.pos(),
                "expected an address after 'server' (IP:PORT, [IPv6]:PORT or host:PORT)",
            ));
        };
        let addr = self.host_port(addr_arg, "server address")?;
        let mut options = Server::new(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        let mut seen = Seen::default();
        for (index, arg) in stmt.args.iter().enumerate().skip(1) {
            let (key, value) = split_option(&arg.text);
            if !SERVER_OPTIONS.contains(&key) {
                let message = unknown_option("server", key, SERVER_OPTIONS);
                return Err(self.stray(stmt, index, message));
            }
            if let Some(line) = seen.first(key, arg.line) {
                return Err(self.err_at(
                    arg,
                    format!("duplicate server option '{key}' (first set at line {line})"),
                ));
            }
            match (key, value) {
                ("backup" | "down" | "resolve", Some(_)) => {
                    return Err(self.err_at(arg, format!("'{key}' takes no value")));
                }
                ("backup", None) => options.backup = true,
                ("down", None) => options.down = true,
                ("resolve", None) => match addr {
                    HostPort::Name(host, _) => options.resolve = Some(host.to_ascii_lowercase()),
                    HostPort::Addr(a) => {
                        return Err(self.err_at(
                            arg,
                            format!("'resolve' needs a host name; {a} is an address"),
                        ))
                    }
                },
                (_, None) => {
                    let example = if key == "fail_timeout" { "10s" } else { "N" };
                    return Err(
                        self.err_at(arg, format!("'{key}' needs a value, e.g. {key}={example}"))
                    );
                }
                ("weight", Some(v)) => options.weight = self.u32_value(v, arg, key, 1, 1000)?,
                ("proxy_protocol", Some(v)) => {
                    options.proxy_protocol = match v {
                        "v1" => Some(Some(ProxyVersion::V1)),
                        "v2" => Some(Some(ProxyVersion::V2)),
                        "off" => Some(None),
                        _ => {
                            return Err(self.err_at(
                                arg,
                                format!("proxy_protocol={v}: expected v1, v2 or off"),
                            ))
                        }
                    };
                }
                ("max_conns", Some(v)) => {
                    options.max_conns = self.u32_value(v, arg, key, 0, u32::MAX)?;
                }
                ("max_fails", Some(v)) => {
                    options.max_fails = self.u32_value(v, arg, key, 0, u32::MAX)?;
                }
                (_, Some(v)) => options.fail_timeout = self.duration(v, arg)?,
            }
        }
        self.semi(stmt)?;
        for addr in self.resolve_addr(addr, addr_arg, "server address")? {
            servers.push(Server {
                addr,
                ..options.clone()
            });
        }
        Ok(())
    }

    /// `pool N [idle=T]`: N from 1 to 1000 spares per server and worker; idle 30 s by default.
    fn spare_pool(
        &self,
        stmt: &Stmt,
        takes: &str,
    ) -> Result<crate::config::SparePool, ConfigError> {
        let Some(n) = stmt.args.first() else {
            return Err(self.err(stmt.term.pos(), format!("expected {takes} after 'pool'")));
        };
        let mut pool = crate::config::SparePool {
            size: self.u32_value(&n.text, n, "pool", 1, 1000)?,
            idle: std::time::Duration::from_secs(30),
        };
        for arg in stmt.args.iter().skip(1) {
            match arg.text.strip_prefix("idle=") {
                Some(v) => pool.idle = self.positive_duration(v, arg, "idle")?,
                None => {
                    return Err(self.err_at(
                        arg,
                        format!("unknown pool option '{}' (expected idle=T)", arg.text),
                    ))
                }
            }
        }
        self.semi(stmt)?;
        Ok(pool)
    }

    pub(super) fn health_check(&self, stmt: &Stmt) -> Result<HealthCheck, ConfigError> {
        let mut check = HealthCheck::default();
        let mut seen = Seen::default();
        for (index, arg) in stmt.args.iter().enumerate() {
            let (key, value) = split_option(&arg.text);
            if !HEALTH_CHECK_OPTIONS.contains(&key) {
                let message = unknown_option("health_check", key, HEALTH_CHECK_OPTIONS);
                return Err(self.stray(stmt, index, message));
            }
            if let Some(line) = seen.first(key, arg.line) {
                return Err(self.err_at(
                    arg,
                    format!("duplicate health_check option '{key}' (first set at line {line})"),
                ));
            }
            let Some(value) = value else {
                let example = match key {
                    "interval" | "timeout" => "5s",
                    "rise" | "fall" => "2",
                    _ => "\"...\"",
                };
                return Err(
                    self.err_at(arg, format!("'{key}' needs a value, e.g. {key}={example}"))
                );
            };
            match key {
                "interval" => check.interval = self.positive_duration(value, arg, key)?,
                "timeout" => check.timeout = self.positive_duration(value, arg, key)?,
                "rise" => check.rise = self.u32_value(value, arg, key, 1, u32::MAX)?,
                "fall" => check.fall = self.u32_value(value, arg, key, 1, u32::MAX)?,
                "send" => check.send = self.escaped_value(arg, key)?,
                _ => check.expect = self.escaped_value(arg, key)?,
            }
        }
        self.semi(stmt)?;
        Ok(check)
    }

    /// Decodes the value of `send=`/`expect=` from the source text, so each escape is decoded
    /// exactly once: inside quotes `\r \n \t \\ \" \xHH`; outside quotes a backslash is an error.
    pub(super) fn escaped_value(&self, arg: &Arg, key: &str) -> Result<Vec<u8>, ConfigError> {
        let raw = self.text.get(arg.span.clone()).unwrap_or(&arg.text);
        let mut out = Vec::with_capacity(raw.len());
        let (mut line, mut col) = (arg.line, arg.col);
        let mut step = |c: char| {
            let here = (line, col);
            if c == '\n' {
                line = line.saturating_add(1);
                col = 1;
            } else {
                col = col.saturating_add(1);
            }
            here
        };
        let hint = "expected \\r, \\n, \\t, \\\\, \\\" or \\xHH";
        let mut quoted = false;
        let mut chars = raw.chars();
        let mut utf8 = [0u8; 4];
        while let Some(c) = chars.next() {
            let here = step(c);
            match c {
                '"' => quoted = !quoted,
                '\\' if !quoted => {
                    return Err(self.err(
                        here,
                        format!("escapes in '{key}' work only inside quotes: {key}=\"...\""),
                    ));
                }
                '\\' => {
                    let escape = chars.next();
                    if let Some(e) = escape {
                        step(e);
                    }
                    let byte = match escape {
                        Some('r') => b'\r',
                        Some('n') => b'\n',
                        Some('t') => b'\t',
                        Some('\\') => b'\\',
                        Some('"') => b'"',
                        Some('x') => {
                            let hi = chars.next();
                            let lo = chars.next();
                            let digit = |c: Option<char>| c.and_then(|c| c.to_digit(16));
                            match (digit(hi), digit(lo)) {
                                (Some(hi), Some(lo)) => {
                                    step('x');
                                    step('x');
                                    u8::try_from(hi * 16 + lo).unwrap_or(0)
                                }
                                _ => {
                                    return Err(self.err(
                                        here,
                                        format!("bad escape in '{key}': \\x needs two hex digits"),
                                    ));
                                }
                            }
                        }
                        Some(other) => {
                            let other = other.escape_debug();
                            return Err(self
                                .err(here, format!("bad escape '\\{other}' in '{key}' ({hint})")));
                        }
                        None => {
                            return Err(self.err(here, format!("bad escape in '{key}' ({hint})")));
                        }
                    };
                    out.push(byte);
                }
                c => out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes()),
            }
        }
        // The key has no quotes or escapes (it matched a known name), so it decodes to itself.
        let prefix_len = key.len().saturating_add(1);
        match out.get(prefix_len..) {
            Some(value) if out.starts_with(key.as_bytes()) => Ok(value.to_vec()),
            _ => Err(self.err_at(arg, format!("bad value for '{key}'"))),
        }
    }
}

/// `key=value` → (`key`, `Some(value)`); `flag` → (`flag`, `None`).
fn split_option(text: &str) -> (&str, Option<&str>) {
    match text.split_once('=') {
        Some((key, value)) => (key, Some(value)),
        None => (text, None),
    }
}

fn unknown_option(directive: &str, key: &str, known: &[&str]) -> String {
    let mut message = format!("unknown {directive} option '{key}'");
    match suggest(key, known.iter().copied()) {
        Some(s) => message.push_str(&format!(" (did you mean '{s}'?)")),
        None => message.push_str(&format!(" (expected one of: {})", known.join(", "))),
    }
    message
}
