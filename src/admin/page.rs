//! `GET /`: the status page. One HTML document with its style inline, no script and no external
//! asset; it refreshes itself every 5 s (`<meta refresh>`). On a narrow screen (a 375 px phone)
//! each table row becomes a card of `label value` lines, so nothing needs scrolling sideways.

use std::fmt::Write as _;
use std::time::Duration;

use super::view::{ServerView, View};
use crate::upstream::Availability;

const STYLE: &str = "\
body{font:15px/1.4 system-ui,sans-serif;margin:0;padding:12px;color:#1d2329;background:#f4f6f8}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 6px}\
.meta{color:#56606b;margin:0 0 8px}.meta span{display:inline-block;margin-right:14px}\
.box{background:#fff;border:1px solid #d8dde3;border-radius:6px;overflow:hidden}\
table{border-collapse:collapse;width:100%}\
th,td{padding:6px 10px;text-align:right;white-space:nowrap;border-bottom:1px solid #eceff2}\
th{font-weight:600;color:#56606b;background:#fafbfc}\
th.t,td.t{text-align:left}td.why{white-space:normal}tr:last-child td{border-bottom:0}\
.st{display:inline-block;padding:1px 8px;border-radius:9px;font-size:13px;font-weight:600}\
.up{background:#dcf5e3;color:#17652e}.warn{background:#fff1cc;color:#7a5300}\
.down{background:#fde0e0;color:#9b1c1c}.dim{color:#8a939c}\
@media (max-width:600px){body{padding:8px;font-size:14px}\
table,tbody,tr,td{display:block}tr.head{display:none}\
tr{border-bottom:1px solid #d8dde3;padding:4px 0}tr:last-child{border-bottom:0}\
td{border:0;padding:2px 10px;text-align:right;white-space:normal}\
td.t{text-align:right}td::before{content:attr(data-label);float:left;color:#56606b;margin-right:10px}\
td:first-child{font-weight:600}}";

/// The page's HTML.
pub fn render(v: &View) -> String {
    let mut h = String::with_capacity(8 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"5\"><title>sluice status</title>\
         <style>{STYLE}</style></head><body><h1>sluice {}</h1><p class=\"meta\">\
         <span>up {}</span><span>{} worker{}</span><span>reloads {} ok, {} failed</span>\
         <span>connections {} of {}</span><span>buffers {}</span></p>",
        esc(v.version),
        uptime(v.uptime),
        v.workers,
        if v.workers == 1 { "" } else { "s" },
        v.reloads,
        v.reload_failures,
        v.connections_active,
        v.max_connections,
        bytes(v.buffer_pool_bytes),
    );
    h.push_str(
        "<h2>Listeners</h2><div class=\"box\"><table><tr class=\"head\"><th class=\"t\">listener</th>\
         <th class=\"t\">upstream</th><th>active</th><th>total</th><th>client&rarr;server</th>\
         <th>server&rarr;client</th><th>denied</th></tr>",
    );
    for l in &v.listeners {
        let active = match l.proto {
            crate::config::Proto::Tcp => l.connections_active,
            crate::config::Proto::Udp => l.udp_sessions_active,
        };
        h.push_str("<tr>");
        cell(&mut h, "listener", "t", &esc(&l.name()));
        cell(&mut h, "upstream", "t", &esc(&l.upstream));
        cell(&mut h, "active", "", &active.to_string());
        cell(&mut h, "total", "", &l.connections_total.to_string());
        cell(&mut h, "client→server", "", &bytes(l.bytes_up));
        cell(&mut h, "server→client", "", &bytes(l.bytes_down));
        cell(&mut h, "denied", "", &l.denied.to_string());
        h.push_str("</tr>");
    }
    h.push_str("</table></div>");
    for u in &v.upstreams {
        let _ = write!(
            h,
            "<h2>Upstream {} <span class=\"dim\">({})</span></h2><div class=\"box\"><table>\
             <tr class=\"head\"><th class=\"t\">server</th><th class=\"t\">state</th>\
             <th>active</th><th>failures</th><th>connect</th><th>weight</th>\
             <th class=\"t\">why</th></tr>",
            esc(&u.name),
            u.balance
        );
        for s in &u.servers {
            server_row(&mut h, s);
        }
        h.push_str("</table></div>");
    }
    h.push_str(
        "<p class=\"meta\">Refreshes every 5 s. Also: <a href=\"/metrics\">/metrics</a> \
         <a href=\"/stats\">/stats</a></p></body></html>\n",
    );
    h
}

fn server_row(h: &mut String, s: &ServerView) {
    let class = match s.availability {
        Availability::Up => "up",
        Availability::Drained | Availability::Full | Availability::Retired => "warn",
        _ => "down",
    };
    let label = match s.availability {
        Availability::Up if s.backup => "up (backup)",
        Availability::Up => "up",
        Availability::Down => "down",
        Availability::AdminDown => "down (admin)",
        Availability::Drained => "drained",
        Availability::CheckDown => "down by check",
        Availability::Failed { .. } => "failed",
        Availability::Full => "full",
        Availability::Retired => "retired",
    };
    let connect = s.mean_connect().map_or_else(
        || "-".to_string(),
        |d| format!("{:.2} ms", d.as_secs_f64() * 1e3),
    );
    h.push_str("<tr>");
    cell(h, "server", "t", &s.addr.to_string());
    let badge = format!("<span class=\"st {class}\">{label}</span>");
    cell(h, "state", "t", &badge);
    cell(h, "active", "", &s.active.to_string());
    cell(h, "failures", "", &s.connect_failures.to_string());
    cell(h, "connect", "", &connect);
    cell(h, "weight", "", &s.weight.to_string());
    cell(h, "why", "t why", &esc(&s.reason));
    h.push_str("</tr>");
}

/// One table cell, labelled for the narrow layout. `html` is already escaped.
fn cell(h: &mut String, label: &str, class: &str, html: &str) {
    let _ = write!(
        h,
        "<td class=\"{class}\" data-label=\"{label}\">{html}</td>"
    );
}

/// Text for HTML: `&`, `<`, `>` and quotes escaped.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ => format!("{v:.1} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_sizes_read_well() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(uptime(Duration::from_secs(3725)), "1 h 2 min");
    }
}
