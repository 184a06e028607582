//! `GET /metrics`: the Prometheus text exposition format 0.0.4 (HELP and TYPE before each
//! family, label values escaped), names and labels as DESIGN §5 lists them.

use std::fmt::Write as _;

use super::view::View;
use crate::metrics::{AdminState, CONNECT_BUCKETS_US};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The text of every metric.
pub fn render(v: &View) -> String {
    let mut out = Text(String::with_capacity(8 * 1024));
    let listeners = &v.listeners;
    out.family(
        "sluice_connections_total",
        "counter",
        "TCP connections accepted and UDP sessions opened.",
    );
    for l in listeners {
        out.sample(
            "sluice_connections_total",
            &[("listener", &l.name())],
            l.connections_total,
        );
    }
    out.family(
        "sluice_connections_active",
        "gauge",
        "TCP connections open now.",
    );
    for l in listeners {
        out.sample(
            "sluice_connections_active",
            &[("listener", &l.name())],
            l.connections_active,
        );
    }
    out.family(
        "sluice_connections_ended_total",
        "counter",
        "Connections and sessions that ended, and clients refused, by how (the access log's end=).",
    );
    for l in listeners {
        for (end, n) in &l.ends {
            let labels = [("listener", l.name()), ("end", end.as_str().to_string())];
            out.sample_owned("sluice_connections_ended_total", &labels, *n);
        }
    }
    out.family(
        "sluice_bytes_total",
        "counter",
        "Bytes delivered, counted when a connection or session ends.",
    );
    for l in listeners {
        for (direction, n) in [
            ("client_to_server", l.bytes_up),
            ("server_to_client", l.bytes_down),
        ] {
            out.sample(
                "sluice_bytes_total",
                &[("listener", &l.name()), ("direction", direction)],
                n,
            );
        }
    }
    out.family(
        "sluice_udp_sessions_active",
        "gauge",
        "UDP sessions open now.",
    );
    for l in listeners
        .iter()
        .filter(|l| l.proto == crate::config::Proto::Udp)
    {
        out.sample(
            "sluice_udp_sessions_active",
            &[("listener", &l.name())],
            l.udp_sessions_active,
        );
    }
    out.family(
        "sluice_udp_datagrams_total",
        "counter",
        "UDP datagrams delivered, counted when a session ends.",
    );
    for l in listeners
        .iter()
        .filter(|l| l.proto == crate::config::Proto::Udp)
    {
        for (direction, n) in [
            ("client_to_server", l.udp_datagrams_up),
            ("server_to_client", l.udp_datagrams_down),
        ] {
            out.sample(
                "sluice_udp_datagrams_total",
                &[("listener", &l.name()), ("direction", direction)],
                n,
            );
        }
    }
    out.family(
        "sluice_udp_dropped_total",
        "counter",
        "UDP datagrams dropped (a full socket buffer, or a new client of a listener a reload removed).",
    );
    for l in listeners
        .iter()
        .filter(|l| l.proto == crate::config::Proto::Udp)
    {
        out.sample(
            "sluice_udp_dropped_total",
            &[("listener", &l.name())],
            l.udp_dropped,
        );
    }
    out.family(
        "sluice_denied_total",
        "counter",
        "Clients refused by an access rule or a per-client limit (UDP: datagrams of new clients).",
    );
    for l in listeners {
        for (why, n) in &l.denied_by {
            out.sample(
                "sluice_denied_total",
                &[("listener", &l.name()), ("reason", why.as_str())],
                *n,
            );
        }
    }
    servers(&mut out, v);
    out.family(
        "sluice_buffer_pool_bytes",
        "gauge",
        "Bytes the buffer pools hold (lent and cached), all workers.",
    );
    out.sample("sluice_buffer_pool_bytes", &[], v.buffer_pool_bytes);
    out.family(
        "sluice_buffer_waits_total",
        "counter",
        "Times a connection began to wait for a buffer: the pools had lent all buffer_memory \
         allows.",
    );
    out.sample("sluice_buffer_waits_total", &[], v.buffer_waits);
    out.family(
        "sluice_descriptor_shortages_total",
        "counter",
        "Out of file descriptors or socket memory: times accepting paused for 100 ms \
         (at=accept), clients closed because their server connection could not be opened \
         (at=connect).",
    );
    out.sample(
        "sluice_descriptor_shortages_total",
        &[("at", "accept")],
        v.accept_backoffs,
    );
    out.sample(
        "sluice_descriptor_shortages_total",
        &[("at", "connect")],
        v.connect_fd_shortages,
    );
    out.family(
        "sluice_splice_pipes",
        "gauge",
        "Kernel pipes lent to splicing directions now.",
    );
    out.sample("sluice_splice_pipes", &[], v.pipes_in_use);
    out.family(
        "sluice_spliced_bytes_total",
        "counter",
        "Bytes moved socket to socket through kernel pipes (never copied to user space).",
    );
    out.sample("sluice_spliced_bytes_total", &[], v.spliced_bytes);
    out.family(
        "sluice_splice_fallbacks_total",
        "counter",
        "Reads that would have spliced and copied instead: no pipe left under max_pipes.",
    );
    out.sample("sluice_splice_fallbacks_total", &[], v.splice_fallbacks);
    out.family(
        "sluice_spares",
        "gauge",
        "Pre-connected spare connections open now (pool), connecting or ready.",
    );
    out.sample("sluice_spares", &[], v.spares_open);
    out.family(
        "sluice_spares_taken_total",
        "counter",
        "Spares a new client took in place of a connect.",
    );
    out.sample("sluice_spares_taken_total", &[], v.spares_taken);
    out.family(
        "sluice_spares_discarded_total",
        "counter",
        "Spares closed unused: closed by the server while idle, or older than idle=.",
    );
    out.sample("sluice_spares_discarded_total", &[], v.spares_discarded);
    out.family(
        "sluice_proxy_protocol_errors_total",
        "counter",
        "Clients closed (UDP: datagrams dropped) for a missing, bad or late PROXY header.",
    );
    out.sample(
        "sluice_proxy_protocol_errors_total",
        &[],
        v.proxy_protocol_errors,
    );
    out.family("sluice_reloads_total", "counter", "Reloads, by result.");
    out.sample("sluice_reloads_total", &[("result", "ok")], v.reloads);
    out.sample(
        "sluice_reloads_total",
        &[("result", "failed")],
        v.reload_failures,
    );
    out.family(
        "sluice_resolver_lookups_total",
        "counter",
        "Re-resolutions of resolve names, by result (failed: the last good addresses stayed).",
    );
    let lookups = [("ok", v.resolver_lookups), ("failed", v.resolver_failures)];
    for (result, n) in lookups {
        out.sample("sluice_resolver_lookups_total", &[("result", result)], n);
    }
    out.family(
        "sluice_resolver_changes_total",
        "counter",
        "Re-resolutions that changed an upstream's servers.",
    );
    out.sample("sluice_resolver_changes_total", &[], v.resolver_changes);
    out.family(
        "sluice_resolver_replies_ignored_total",
        "counter",
        "DNS replies that answered no question asked (wrong id or question, or malformed).",
    );
    out.sample(
        "sluice_resolver_replies_ignored_total",
        &[],
        v.resolver_ignored,
    );
    out.family("sluice_workers", "gauge", "Worker threads.");
    out.sample("sluice_workers", &[], v.workers as u64);
    out.family(
        "sluice_uptime_seconds",
        "gauge",
        "Seconds since the proxy started.",
    );
    let _ = writeln!(out.0, "sluice_uptime_seconds {:.3}", v.uptime.as_secs_f64());
    out.family(
        "sluice_build_info",
        "gauge",
        "The running build (always 1).",
    );
    out.sample("sluice_build_info", &[("version", v.version)], 1);
    out.0
}

fn servers(out: &mut Text, v: &View) {
    let each = || {
        v.upstreams
            .iter()
            .flat_map(|u| u.servers.iter().map(move |s| (u.name.as_str(), s)))
    };
    out.family(
        "sluice_connect_failures_total",
        "counter",
        "Failed connects to a server (for UDP: refusals), from every worker.",
    );
    for (u, s) in each() {
        out.sample(
            "sluice_connect_failures_total",
            &[("upstream", u), ("server", &s.addr.to_string())],
            s.connect_failures,
        );
    }
    out.family(
        "sluice_connect_duration_seconds",
        "histogram",
        "How long successful connects to a server took.",
    );
    for (u, s) in each() {
        let server = s.addr.to_string();
        let counts = s.shared.connect_time.cumulative();
        for (bound, n) in CONNECT_BUCKETS_US.iter().zip(counts) {
            let le = format!("{}", *bound as f64 / 1e6);
            out.sample(
                "sluice_connect_duration_seconds_bucket",
                &[("upstream", u), ("server", &server), ("le", &le)],
                n,
            );
        }
        let all = counts.last().copied().unwrap_or(0);
        out.sample(
            "sluice_connect_duration_seconds_bucket",
            &[("upstream", u), ("server", &server), ("le", "+Inf")],
            all,
        );
        let labels = labels(&[("upstream", u), ("server", &server)]);
        let _ = writeln!(
            out.0,
            "sluice_connect_duration_seconds_sum{labels} {:.6}",
            s.shared.connect_time.sum().as_secs_f64()
        );
        let _ = writeln!(out.0, "sluice_connect_duration_seconds_count{labels} {all}");
    }
    out.family(
        "sluice_server_up",
        "gauge",
        "1 while the health checks and passive health let the server take connections.",
    );
    for (u, s) in each() {
        out.sample(
            "sluice_server_up",
            &[("upstream", u), ("server", &s.addr.to_string())],
            u64::from(s.up),
        );
    }
    out.family(
        "sluice_server_state",
        "gauge",
        "The operator's state of the server (admin endpoint): 1 for the current one.",
    );
    for (u, s) in each() {
        for state in [AdminState::Up, AdminState::Drain, AdminState::Down] {
            out.sample(
                "sluice_server_state",
                &[
                    ("upstream", u),
                    ("server", &s.addr.to_string()),
                    ("state", state.as_str()),
                ],
                u64::from(s.admin == state),
            );
        }
    }
    out.family(
        "sluice_server_connections_active",
        "gauge",
        "Connections and UDP sessions open to the server.",
    );
    for (u, s) in each() {
        out.sample(
            "sluice_server_connections_active",
            &[("upstream", u), ("server", &s.addr.to_string())],
            s.active,
        );
    }
}

struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, pairs: &[(&str, &str)], value: u64) {
        let _ = writeln!(self.0, "{name}{} {value}", labels(pairs));
    }

    fn sample_owned(&mut self, name: &str, pairs: &[(&str, String)], value: u64) {
        let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.sample(name, &borrowed, value);
    }
}

/// `{a="x",b="y"}`, or nothing without labels.
fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let mut out = String::from("{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
    }
    out.push('}');
    out
}

/// Label values escape `\`, `"` and newlines.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text escapes `\` and newlines.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(
            labels(&[("upstream", "a\"b\\c\nd"), ("server", "x")]),
            r#"{upstream="a\"b\\c\nd",server="x"}"#
        );
        assert_eq!(labels(&[]), "");
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    }
}
