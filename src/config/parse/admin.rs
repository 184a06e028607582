//! The `admin` directive (`admin ADDR;` or `admin ADDR { allow CIDR; ... }`), and the access
//! rules of listeners and the main context (`allow`/`deny` RANGE|all) and `rate_per_ip`.

use super::directives::Context;
use super::{Item, Parser, Seen, Stmt, Term};
use crate::config::{AccessRule, Admin, Cidr, ConfigError};

impl Parser<'_> {
    pub(super) fn admin(&mut self, stmt: &Stmt) -> Result<(), ConfigError> {
        let Some(arg) = stmt.args.first() else {
            return Err(self.err(
                stmt.term.pos(),
                "expected an address after 'admin' (e.g. admin 127.0.0.1:9901;)",
            ));
        };
        self.no_more(stmt, 1)?;
        let addr = self.listen_addr(arg)?;
        let mut allow = Vec::new();
        match stmt.term {
            Term::Semi(_) => {}
            Term::Open(_) => {
                let mut seen = Seen::default();
                loop {
                    let inner = match self.item()? {
                        Item::Stmt(inner) => inner,
                        Item::Close(_) => break,
                        Item::Eof(pos) => return Err(self.unclosed(pos, stmt)),
                    };
                    let d = self.directive(Context::Admin, &inner, &mut seen, None)?;
                    match d.name {
                        "allow" => {
                            let range =
                                self.single(&inner, "an address range (e.g. 10.0.0.0/8)")?;
                            let cidr =
                                Cidr::parse(&range.text).map_err(|e| self.err_at(range, e))?;
                            allow.push(cidr);
                        }
                        _ => return Err(self.unknown(Context::Admin, &inner.name)),
                    }
                }
            }
            Term::Close(_) | Term::Eof(_) => {
                return Err(self.err(stmt.last_end(), "expected ';' or '{' after 'admin ADDR'"));
            }
        }
        if !addr.ip().is_loopback() && allow.is_empty() {
            return Err(self.err_at(
                arg,
                format!(
                    "admin {addr} is reachable from other hosts: add an allow list \
                     (admin {addr} {{ allow 10.0.0.0/8; }}) or use 127.0.0.1"
                ),
            ));
        }
        self.config.admin = Some(Admin { addr, allow });
        Ok(())
    }

    /// `allow RANGE;`, `deny RANGE;`, `allow all;`, `deny all;`. A range with host bits set
    /// (`10.0.0.1/8`) is an error: it reads as a single host but would cover a whole network,
    /// so the meaning is the writer's to say.
    pub(super) fn access_rule(&self, stmt: &Stmt) -> Result<AccessRule, ConfigError> {
        let arg = self.single(stmt, "an address range or 'all' (e.g. 10.0.0.0/8)")?;
        let allow = stmt.name() == "allow";
        let range = match arg.text.as_str() {
            "all" => None,
            text => Some(Cidr::parse(text).map_err(|e| self.err_at(arg, e))?),
        };
        Ok(AccessRule { allow, range })
    }

    /// `rate_per_ip N/s [burst=M];` (the burst defaults to N); `0` turns it off.
    pub(super) fn rate_per_ip(&self, stmt: &Stmt) -> Result<Option<(u32, u32)>, ConfigError> {
        let Some(arg) = stmt.args.first() else {
            return Err(self.err(
                stmt.term.pos(),
                "expected a rate after 'rate_per_ip' (e.g. 20/s)",
            ));
        };
        self.semi(stmt)?;
        if arg.text == "0" {
            self.no_more(stmt, 1)?;
            return Ok(None);
        }
        let Some((count, unit)) = arg.text.split_once('/') else {
            return Err(self.err_at(
                arg,
                format!(
                    "rate '{}' has no unit (write e.g. {}/s)",
                    arg.text, arg.text
                ),
            ));
        };
        if unit != "s" {
            return Err(self.err_at(
                arg,
                format!("unknown rate unit '/{unit}' in '{}' (use /s)", arg.text),
            ));
        }
        let rate = self.u32_value(count, arg, "rate_per_ip", 1, u32::MAX)?;
        // One second's worth may come at once unless `burst=` says otherwise.
        let mut burst = rate;
        for extra in stmt.args.iter().skip(1) {
            match extra.text.split_once('=') {
                Some(("burst", value)) => {
                    burst = self.u32_value(value, extra, "burst", 1, u32::MAX)?;
                }
                _ => {
                    return Err(self.err_at(
                        extra,
                        format!("unknown rate_per_ip option '{}' (burst=N)", extra.text),
                    ))
                }
            }
        }
        Ok(Some((rate, burst)))
    }

    /// `so_keepalive on|off|IDLE:INTERVAL:COUNT` (durations with units or seconds; a field may
    /// be empty, e.g. `30m::10`).
    pub(super) fn keepalive(
        &self,
        arg: &super::Arg,
    ) -> Result<Option<crate::config::Keepalive>, ConfigError> {
        match arg.text.as_str() {
            "on" => return Ok(Some(crate::config::Keepalive::default())),
            "off" => return Ok(None),
            _ => {}
        }
        let fields: Vec<&str> = arg.text.split(':').collect();
        let [idle, interval, count] = fields.as_slice() else {
            return Err(self.err_at(
                arg,
                format!(
                    "so_keepalive '{}': expected on, off or IDLE:INTERVAL:COUNT",
                    arg.text
                ),
            ));
        };
        let time = |text: &str| -> Result<Option<std::time::Duration>, ConfigError> {
            if text.is_empty() {
                return Ok(None);
            }
            // What the kernel takes: whole seconds from 1 to 32767 (Linux refuses more, and
            // a refused one would leave every keepalive setting at the system's default).
            match super::parse_duration(text) {
                Some(d) if d.subsec_nanos() == 0 && (1..=32_767).contains(&d.as_secs()) => {
                    Ok(Some(d))
                }
                _ => Err(self.err_at(
                    arg,
                    format!(
                        "so_keepalive '{}': '{text}' is not whole seconds from 1s to 32767s",
                        arg.text
                    ),
                )),
            }
        };
        let count = match *count {
            "" => None,
            n => Some(self.u32_value(n, arg, "so_keepalive count", 1, 127)?),
        };
        Ok(Some(crate::config::Keepalive {
            idle: time(idle)?,
            interval: time(interval)?,
            count,
        }))
    }
}
