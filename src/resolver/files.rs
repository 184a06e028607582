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

/// The `nameserver` lines of `/etc/resolv.conf` text, port 53, at most `MAX_NAMESERVERS`.
/// An address with a zone (`fe80::1%eth0`) is skipped: it names no route sluice can use.
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            match (fields.next(), fields.next()) {
                (Some("nameserver"), Some(ip)) => ip.parse::<IpAddr>().ok(),
                _ => None,
            }
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .take(MAX_NAMESERVERS)
        .collect()
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
    fn nameserver_lines_give_at_most_three_servers() {
        let text = "search example.org\nnameserver 127.0.0.53\nnameserver ::1\n\
                    nameserver fe80::1%eth0\nnameserver bogus\noptions edns0\n\
                    nameserver 127.0.0.2\nnameserver 127.0.0.3\n";
        let got: Vec<String> = nameservers(text).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["127.0.0.53:53", "[::1]:53", "127.0.0.2:53"]);
        assert!(nameservers("").is_empty());
    }
}
