//! `listen` blocks: the address, `proxy`, timeouts, retries and the UDP settings.

use super::directives::Context;
use super::values::suggest;
use super::{Item, Parser, PendingListen, Seen, Stmt};
use crate::config::{ConfigError, Listen, Proto, ProxyVersion, UdpHeaders, UpstreamId};

impl Parser<'_> {
    pub(super) fn listen(&mut self, stmt: &Stmt) -> Result<(), ConfigError> {
        let (proto, addr_arg) = match stmt.args.as_slice() {
            [] => {
                return Err(self.err(
                    stmt.term.pos(),
                    "expected an address after 'listen' (e.g. listen 127.0.0.1:8080 { ... })",
                ));
            }
            [proto] if matches!(proto.text.as_str(), "tcp" | "udp") => {
                return Err(self.err(
                    stmt.term.pos(),
                    format!("expected an address after 'listen {}'", proto.text),
                ));
            }
            [addr] => (Proto::Tcp, addr),
            [first, addr, ..] => {
                let proto = match first.text.as_str() {
                    "tcp" => Proto::Tcp,
                    "udp" => Proto::Udp,
                    _ if self.listen_addr(first).is_ok() => {
                        return Err(self.stray(
                            stmt,
                            1,
                            format!("unexpected argument '{}' after the address", addr.text),
                        ));
                    }
                    _ => {
                        let mut message = format!(
                            "expected 'tcp' or 'udp' before the listen address, found '{}'",
                            first.text
                        );
                        if let Some(s) = suggest(&first.text, ["tcp", "udp"]) {
                            message.push_str(&format!(" (did you mean '{s}'?)"));
                        }
                        return Err(self.err_at(first, message));
                    }
                };
                self.no_more(stmt, 2)?;
                (proto, addr)
            }
        };
        self.open(stmt)?;
        // `ADDR:P1-P2`: one listener per port, each its own in metrics and logs.
        let (addr, ports) = match crate::config::addr::port_range(&addr_arg.text) {
            None => (self.listen_addr(addr_arg)?, 1),
            Some(Err(message)) => return Err(self.err_at(addr_arg, message)),
            Some(Ok((host, first, count))) => {
                let text = format!("{host}:{first}");
                let addr = crate::config::addr::listen_addr(&text)
                    .map_err(|message| self.err_at(addr_arg, message))?;
                (addr, count)
            }
        };
        // Port 0 asks the kernel for a fresh port each time, so two of them never collide.
        if addr.port() != 0 {
            for i in 0..ports {
                let mut at = addr;
                at.set_port(addr.port() + i);
                if let Some(first) = self.listen_lines.insert((proto, at), stmt.name.line) {
                    let what = match ports {
                        1 => format!("duplicate listen {} {at}", proto.as_str()),
                        _ => format!(
                            "listen range {} overlaps listen {} {at}",
                            addr_arg.text,
                            proto.as_str()
                        ),
                    };
                    return Err(
                        self.err_at(addr_arg, format!("{what} (first defined at line {first})"))
                    );
                }
            }
        }
        let mut listen = Listen::new(proto, addr, UpstreamId(0), 0);
        let mut proxy = None;
        let mut sni: Vec<(String, super::Arg)> = Vec::new();
        let mut sni_default: Option<super::Arg> = None;
        let mut tries = None;
        let mut half_close = None;
        let mut seen = Seen::default();
        loop {
            let inner = match self.item()? {
                Item::Stmt(inner) => inner,
                Item::Close(_) => break,
                Item::Eof(pos) => return Err(self.unclosed(pos, stmt)),
            };
            let d = self.directive(Context::Listen, &inner, &mut seen, Some(proto))?;
            let name = d.name;
            match name {
                "proxy" => {
                    let arg = self.single(&inner, d.takes)?;
                    proxy = Some(arg.clone());
                }
                "connect_timeout" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.connect_timeout = self.positive_duration(&arg.text, arg, name)?;
                }
                "idle_timeout" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.idle_timeout = self.positive_duration(&arg.text, arg, name)?;
                }
                "half_close_timeout" => {
                    let arg = self.single(&inner, d.takes)?;
                    half_close = Some(self.positive_duration(&arg.text, arg, name)?);
                }
                "next_upstream_tries" => {
                    let arg = self.single(&inner, d.takes)?;
                    tries = Some(self.u32_value(&arg.text, arg, name, 0, u32::MAX)?);
                }
                "next_upstream_timeout" => {
                    let arg = self.single(&inner, d.takes)?;
                    let timeout = self.duration(&arg.text, arg)?;
                    listen.next_upstream_timeout = Some(timeout).filter(|t| !t.is_zero());
                }
                "udp_responses" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.udp_responses = self.u32_value(&arg.text, arg, name, 0, u32::MAX)?;
                }
                "max_sessions" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.max_sessions = self.usize_value(&arg.text, arg, name, 0)?;
                }
                "allow" | "deny" => listen.access.push(self.access_rule(&inner)?),
                "max_connections" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.max_connections = self.usize_value(&arg.text, arg, name, 0)?;
                }
                "max_connections_per_ip" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.max_connections_per_ip =
                        self.u32_value(&arg.text, arg, name, 0, u32::MAX)?;
                }
                "max_sessions_per_ip" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.max_sessions_per_ip =
                        self.u32_value(&arg.text, arg, name, 0, u32::MAX)?;
                }
                "rate_per_ip" => listen.rate_per_ip = self.rate_per_ip(&inner)?,
                "limit_rate" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.limit_rate = self.size(arg)? as u64;
                }
                "proxy_protocol" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.proxy_protocol = match arg.text.as_str() {
                        "off" => None,
                        "v1" if proto == Proto::Udp => return Err(self.err_at(
                            arg,
                            "a UDP listener sends the PROXY header as v2 only (v1 is text for TCP)",
                        )),
                        "v1" => Some(ProxyVersion::V1),
                        "v2" => Some(ProxyVersion::V2),
                        _ => {
                            return Err(self.not_one_of(
                                arg,
                                "proxy_protocol value",
                                &["off", "v1", "v2"],
                            ))
                        }
                    };
                }
                "proxy_protocol_udp" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.proxy_protocol_udp = match arg.text.as_str() {
                        "first" => UdpHeaders::First,
                        "every" => UdpHeaders::Every,
                        _ => {
                            return Err(self.not_one_of(
                                arg,
                                "proxy_protocol_udp value",
                                &["first", "every"],
                            ))
                        }
                    };
                }
                "accept_proxy_protocol" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.accept_proxy_protocol = match arg.text.as_str() {
                        "on" => true,
                        "off" => false,
                        _ => {
                            return Err(self.not_one_of(
                                arg,
                                "accept_proxy_protocol value",
                                &["on", "off"],
                            ))
                        }
                    };
                }
                "proxy_protocol_timeout" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.proxy_protocol_timeout = self.positive_duration(&arg.text, arg, name)?;
                }
                "sni" => {
                    let [name, upstream] = inner.args.as_slice() else {
                        return Err(self.err(
                            inner.term.pos(),
                            "expected a name and an upstream after 'sni' (e.g. sni example.com web;)",
                        ));
                    };
                    self.semi(&inner)?;
                    let pattern = name.text.to_ascii_lowercase();
                    let pattern = pattern.strip_suffix('.').unwrap_or(&pattern).to_string();
                    let bare = pattern.strip_prefix("*.").unwrap_or(&pattern);
                    let valid = !bare.is_empty()
                        && !bare.split('.').any(str::is_empty)
                        && bare
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
                    if !valid {
                        return Err(self.err_at(
                            name,
                            format!("bad sni name '{}' (a host name, or *.suffix)", name.text),
                        ));
                    }
                    if sni.iter().any(|(p, _)| *p == pattern) {
                        return Err(self.err_at(name, format!("duplicate sni name '{pattern}'")));
                    }
                    sni.push((pattern, upstream.clone()));
                }
                "sni_default" => {
                    let arg = self.single(&inner, d.takes)?;
                    sni_default = Some(arg.clone());
                }
                "sni_timeout" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.sni_timeout = self.positive_duration(&arg.text, arg, name)?;
                }
                "splice" => {
                    let arg = self.single(&inner, d.takes)?;
                    let names = crate::config::Splice::ALL.map(|(n, _)| n);
                    listen.splice = crate::config::Splice::ALL
                        .iter()
                        .find(|(n, _)| *n == arg.text)
                        .map(|(_, mode)| *mode)
                        .ok_or_else(|| self.not_one_of(arg, "splice mode", &names))?;
                }
                "so_keepalive" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.so_keepalive = self.keepalive(arg)?;
                }
                "proxy_protocol_trusted" => {
                    if inner.args.is_empty() {
                        return Err(self.err(
                            inner.term.pos(),
                            "expected address ranges after 'proxy_protocol_trusted' (e.g. 10.0.0.0/8)",
                        ));
                    }
                    self.semi(&inner)?;
                    for arg in &inner.args {
                        let range = crate::config::Cidr::parse(&arg.text)
                            .map_err(|e| self.err_at(arg, e))?;
                        listen.proxy_protocol_trusted.push(range);
                    }
                }
                "limit_rate_after" => {
                    let arg = self.single(&inner, d.takes)?;
                    listen.limit_rate_after = self.size(arg)? as u64;
                }
                _ => return Err(self.unknown(Context::Listen, &inner.name)),
            }
        }
        if sni.is_empty() {
            if let Some(arg) = &sni_default {
                return Err(self.err_at(arg, "sni_default without any 'sni NAME UPSTREAM;' route"));
            }
        }
        // With SNI routes, an explicit `proxy` is the default; else the listener's own upstream
        // is the default's, or the first route's.
        if !sni.is_empty() && sni_default.is_none() {
            sni_default = proxy.clone();
        }
        let proxy = proxy
            .or_else(|| sni_default.clone())
            .or_else(|| sni.first().map(|(_, u)| u.clone()));
        let Some(proxy) = proxy else {
            return Err(self.err_at(
                &stmt.name,
                "listen block has no 'proxy' (add e.g. 'proxy backend;')",
            ));
        };
        listen.half_close_timeout = half_close.unwrap_or(listen.idle_timeout);
        // A `proxy ADDR:Q1-Q2` pairs port P1+i with Q1+i; a range needs a range of one length.
        let range = match proxy.text.contains(':') {
            true => crate::config::addr::port_range(&proxy.text),
            false => None,
        };
        let targets = match range {
            None => None,
            Some(Err(message)) => return Err(self.err_at(&proxy, message)),
            Some(Ok((host, first, count))) if count == ports => Some((host, first)),
            Some(Ok((_, _, count))) => {
                return Err(self.err_at(
                    &proxy,
                    format!(
                        "proxy range {} has {count} ports, the listen range {}",
                        proxy.text, ports
                    ),
                ))
            }
        };
        for i in 0..ports {
            let mut listen = listen.clone();
            listen.addr.set_port(addr.port().saturating_add(i));
            let mut proxy = proxy.clone();
            if let Some((host, first)) = &targets {
                proxy.text = format!("{host}:{}", first + i);
            }
            self.listeners.push(PendingListen {
                listen,
                line: stmt.name.line,
                proxy,
                tries,
                sni: sni.clone(),
                sni_default: sni_default.clone(),
            });
        }
        Ok(())
    }
}
