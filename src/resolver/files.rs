//! The two files a stub resolver reads: `/etc/hosts` (names this host answers for itself) and
//! `/etc/resolv.conf` (the nameservers to ask). Sans-I/O: each reader takes the text. A line
//! it cannot read is skipped, as the C library skips it, so a stray line never hides the rest.

use std::net::{IpAddr, SocketAddr};

/// The C library asks at most this many nameservers (`MAXNS`); later lines are ignored.
pub const MAX_NAMESERVERS: usize = 3;

/// The addresses `/etc/hosts` text gives for `name` (case-insensitive, a trailing dot ignored),
/// in file order, without repeats.
pub fn hosts_lookup(text: &str, name: &str) -> Vec<IpAddr> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if fields.any(|n| n.strip_suffix('.').unwrap_or(n).eq_ignore_ascii_case(name))
            && !found.contains(&ip)
        {
            found.push(ip);
        }
    }
    found
}

/// What `/etc/resolv.conf` says, as far as a stub resolver needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvConf {
    /// Port 53, at most `MAX_NAMESERVERS`.
    pub nameservers: Vec<SocketAddr>,
    /// `search` (or `domain`): the last such line wins, as in the C library.
    pub search: Vec<String>,
    /// `options ndots:N`: a name with fewer dots is tried with the search domains first.
    pub ndots: usize,
}

/// The C library caps `ndots` at 15.
const MAX_NDOTS: usize = 15;

/// Reads resolv.conf text. An address with a zone (`fe80::1%eth0`) is skipped: it names no
/// route sluice can use.
pub fn resolv_conf(text: &str) -> ResolvConf {
    let mut conf = ResolvConf {
        nameservers: Vec::new(),
        search: Vec::new(),
        ndots: 1,
    };
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("nameserver") => {
                let ip = fields.next().and_then(|ip| ip.parse::<IpAddr>().ok());
                if let Some(ip) = ip {
                    if conf.nameservers.len() < MAX_NAMESERVERS {
                        conf.nameservers.push(SocketAddr::new(ip, 53));
                    }
                }
            }
            Some("search" | "domain") => {
                conf.search = fields
                    .take_while(|f| !f.starts_with('#') && !f.starts_with(';'))
                    .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                    .filter(|d| !d.is_empty())
                    .collect();
            }
            Some("options") => {
                for option in fields {
                    if let Some(n) = option.strip_prefix("ndots:") {
                        if let Ok(n) = n.parse::<usize>() {
                            conf.ndots = n.min(MAX_NDOTS);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    conf
}

/// The names to try for `name`, in order, as the C library tries them: a name that ends in
/// a dot only as written; one with at least `ndots` dots as written first, then with each
/// search domain; one with fewer, with the search domains first.
pub fn candidates(name: &str, search: &[String], ndots: usize) -> Vec<String> {
    if let Some(absolute) = name.strip_suffix('.') {
        return vec![absolute.to_string()];
    }
    let searched = search.iter().map(|d| format!("{name}.{d}"));
    if name.matches('.').count() >= ndots {
        std::iter::once(name.to_string()).chain(searched).collect()
    } else {
        searched.chain(std::iter::once(name.to_string())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lines_are_read_like_the_c_library_reads_them() {
        let text = "# comment\n127.0.0.1\tlocalhost  loop.test # trailing\n\
                    ::1 localhost ip6-localhost\nnot-an-ip db.test\n\
                    127.0.0.2 DB.test. other\n127.0.0.3 db.test\n127.0.0.2 db.test\n";
        assert_eq!(
            hosts_lookup(text, "LOCALHOST"),
            [
                "127.0.0.1".parse::<IpAddr>().expect("ip"),
                "::1".parse().expect("ip")
            ]
        );
        assert_eq!(
            hosts_lookup(text, "db.test."),
            [IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 3])]
        );
        assert!(
            hosts_lookup(text, "trailing").is_empty(),
            "a comment is not a name"
        );
        assert!(hosts_lookup(text, "loop").is_empty(), "whole names only");
    }

    #[test]
    fn resolv_conf_gives_three_servers_the_last_search_line_and_ndots() {
        let text = "domain first.test\nnameserver 127.0.0.53\nnameserver ::1\n\
                    nameserver fe80::1%eth0\nnameserver bogus\noptions edns0 ndots:2 rotate\n\
                    search svc.cluster.local Cluster.Local. # comment\n\
                    nameserver 127.0.0.2\nnameserver 127.0.0.3\n";
        let conf = resolv_conf(text);
        let got: Vec<String> = conf.nameservers.iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["127.0.0.53:53", "[::1]:53", "127.0.0.2:53"]);
        assert_eq!(conf.search, ["svc.cluster.local", "cluster.local"]);
        assert_eq!(conf.ndots, 2);
        let empty = resolv_conf("");
        assert!(empty.nameservers.is_empty() && empty.search.is_empty());
        assert_eq!(empty.ndots, 1);
        assert_eq!(resolv_conf("options ndots:99").ndots, 15);
    }

    #[test]
    fn candidates_follow_ndots_and_the_search_list() {
        let search = vec!["svc.test".to_string(), "test".to_string()];
        assert_eq!(
            candidates("db", &search, 1),
            ["db.svc.test", "db.test", "db"]
        );
        assert_eq!(
            candidates("db.x", &search, 1),
            ["db.x", "db.x.svc.test", "db.x.test"]
        );
        assert_eq!(candidates("db.x", &search, 5)[0], "db.x.svc.test");
        assert_eq!(candidates("db.x.", &search, 5), ["db.x"]);
        assert_eq!(candidates("db", &[], 1), ["db"]);
    }
}
