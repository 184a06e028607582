//! A small JSON writer (RFC 8259: strings escaped, numbers finite) and the `/stats` document.
//!
//! The writer keeps track of commas itself, so the documents below read as their shape.

use std::fmt::Write as _;

use super::view::View;

/// Builds one JSON text. `key` and the value calls must alternate inside an object; nesting is
/// the caller's, closed in order.
pub struct Json {
    out: String,
    /// Whether the innermost open array or object already has an element.
    has_element: Vec<bool>,
    after_key: bool,
}

impl Default for Json {
    fn default() -> Json {
        Json::new()
    }
}

impl Json {
    pub fn new() -> Json {
        Json {
            out: String::with_capacity(4096),
            has_element: Vec::new(),
            after_key: false,
        }
    }

    fn separate(&mut self) {
        if self.after_key {
            self.after_key = false;
            return;
        }
        if let Some(has) = self.has_element.last_mut() {
            if *has {
                self.out.push(',');
            }
            *has = true;
        }
    }

    pub fn key(&mut self, k: &str) -> &mut Json {
        self.separate();
        string(&mut self.out, k);
        self.out.push(':');
        self.after_key = true;
        self
    }

    pub fn open(&mut self) -> &mut Json {
        self.separate();
        self.out.push('{');
        self.has_element.push(false);
        self
    }

    pub fn close(&mut self) -> &mut Json {
        self.has_element.pop();
        self.out.push('}');
        self
    }

    pub fn open_array(&mut self) -> &mut Json {
        self.separate();
        self.out.push('[');
        self.has_element.push(false);
        self
    }

    pub fn close_array(&mut self) -> &mut Json {
        self.has_element.pop();
        self.out.push(']');
        self
    }

    pub fn str(&mut self, v: &str) -> &mut Json {
        self.separate();
        string(&mut self.out, v);
        self
    }

    pub fn uint(&mut self, v: u64) -> &mut Json {
        self.separate();
        let _ = write!(self.out, "{v}");
        self
    }

    /// A finite number; NaN and infinities (which JSON cannot say) are written as null.
    pub fn float(&mut self, v: f64) -> &mut Json {
        self.separate();
        if v.is_finite() {
            let _ = write!(self.out, "{v}");
        } else {
            self.out.push_str("null");
        }
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Json {
        self.separate();
        self.out.push_str(if v { "true" } else { "false" });
        self
    }

    pub fn null(&mut self) -> &mut Json {
        self.separate();
        self.out.push_str("null");
        self
    }

    /// `key: value` for a string.
    pub fn field(&mut self, k: &str, v: &str) -> &mut Json {
        self.key(k).str(v)
    }

    /// `key: value` for a count.
    pub fn count(&mut self, k: &str, v: u64) -> &mut Json {
        self.key(k).uint(v)
    }

    pub fn finish(mut self) -> String {
        self.out.push('\n');
        self.out
    }
}

/// A JSON string: quotes, backslashes and control characters escaped.
fn string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `GET /stats`: what `/metrics` says, plus each listener's settings and each server's state
/// and reason.
pub fn stats(v: &View) -> String {
    let mut j = Json::new();
    j.open();
    j.field("version", v.version);
    j.key("uptime_seconds").float(v.uptime.as_secs_f64());
    j.count("workers", v.workers as u64);
    j.key("reloads").open();
    j.count("ok", v.reloads)
        .count("failed", v.reload_failures)
        .close();
    j.count("connections_active", v.connections_active);
    j.count("max_connections", v.max_connections as u64);
    j.count("buffer_pool_bytes", v.buffer_pool_bytes);
    j.count("splice_pipes", v.pipes_in_use);
    j.count("spliced_bytes", v.spliced_bytes);
    j.count("splice_fallbacks", v.splice_fallbacks);
    j.count("proxy_protocol_errors", v.proxy_protocol_errors);
    j.key("descriptor_shortages").open();
    j.count("accept", v.accept_backoffs)
        .count("connect", v.connect_fd_shortages)
        .close();
    j.count("buffer_waits", v.buffer_waits);
    j.key("listeners").open_array();
    for l in &v.listeners {
        j.open();
        j.field("listener", &l.name())
            .field("proto", l.proto.as_str())
            .field("upstream", &l.upstream);
        let c = &l.conf;
        j.key("settings").open();
        j.count("connect_timeout_ms", ms(c.connect_timeout))
            .count("idle_timeout_ms", ms(c.idle_timeout))
            .count("half_close_timeout_ms", ms(c.half_close_timeout))
            .count("next_upstream_tries", u64::from(c.next_upstream_tries));
        match c.next_upstream_timeout {
            Some(t) => j.count("next_upstream_timeout_ms", ms(t)),
            None => j.key("next_upstream_timeout_ms").null(),
        };
        j.count("udp_responses", u64::from(c.udp_responses))
            .count("max_sessions", c.max_sessions as u64)
            .close();
        j.count("connections_total", l.connections_total)
            .count("connections_active", l.connections_active)
            .count("denied", l.denied);
        j.key("denied_by").open();
        for (why, n) in &l.denied_by {
            j.count(why.as_str(), *n);
        }
        j.close();
        j.key("bytes").open();
        j.count("client_to_server", l.bytes_up)
            .count("server_to_client", l.bytes_down)
            .close();
        j.key("ended").open();
        for (end, n) in &l.ends {
            j.count(end.as_str(), *n);
        }
        j.close();
        if l.proto == crate::config::Proto::Udp {
            j.key("udp").open();
            j.count("sessions_active", l.udp_sessions_active)
                .count("datagrams_client_to_server", l.udp_datagrams_up)
                .count("datagrams_server_to_client", l.udp_datagrams_down)
                .count("dropped", l.udp_dropped)
                .close();
        }
        j.close();
    }
    j.close_array();
    j.key("upstreams").open_array();
    for u in &v.upstreams {
        j.open();
        j.field("name", &u.name).field("balance", u.balance);
        j.key("servers").open_array();
        for s in &u.servers {
            j.open();
            j.field("server", &s.addr.to_string())
                .count("weight", u64::from(s.weight))
                .key("backup")
                .bool(s.backup)
                .field("state", s.availability.name())
                .field("reason", &s.reason)
                .key("up")
                .bool(s.up)
                .field("admin", s.admin.as_str())
                .count("connections_active", s.active)
                .count("connect_failures", s.connect_failures);
            j.key("bytes").open();
            j.count("client_to_server", s.bytes_up)
                .count("server_to_client", s.bytes_down)
                .close();
            let connects = s
                .shared
                .connect_time
                .cumulative()
                .last()
                .copied()
                .unwrap_or(0);
            j.key("connect_duration").open();
            j.count("count", connects)
                .key("sum_seconds")
                .float(s.shared.connect_time.sum().as_secs_f64())
                .close();
            j.close();
        }
        j.close_array();
        j.close();
    }
    j.close_array();
    j.close();
    j.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_numbers_are_valid_json() {
        let mut j = Json::new();
        j.open();
        j.field("s", "a\"b\\c\n\u{1}\u{7f}é")
            .key("list")
            .open_array()
            .uint(1)
            .float(f64::NAN)
            .float(0.5)
            .bool(true)
            .null()
            .close_array()
            .key("o")
            .open()
            .close();
        j.close();
        assert_eq!(
            j.finish(),
            "{\"s\":\"a\\\"b\\\\c\\n\\u0001\\u007fé\",\"list\":[1,null,0.5,true,null],\"o\":{}}\n"
        );
    }
}
