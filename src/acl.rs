//! Access rules (`allow`/`deny`, DESIGN §3): which clients a listener takes.
//!
//! Sans-I/O. The first rule that matches decides (nginx's order); with no rule, or none that
//! matches, the client is allowed. An IPv4 client seen on an IPv6 socket (`::ffff:a.b.c.d`) is
//! matched as IPv4. Rules live in a binary trie per address family, each node holding the
//! earliest rule of its prefix, so a lookup walks at most 32 (or 128) nodes and keeps the earliest
//! rule met on the way: O(prefix length), whatever the number of rules.

use std::net::IpAddr;

use crate::config::{bits_of, unmapped};

pub use crate::config::AccessRule as Rule;

const NONE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    child: [u32; 2],
    /// The earliest rule whose range is exactly this node's prefix.
    rule: u32,
}

#[derive(Debug, Clone)]
struct Trie {
    width: u32,
    nodes: Vec<Node>,
}

impl Trie {
    fn new(width: u32) -> Trie {
        Trie {
            width,
            nodes: vec![Node {
                child: [NONE; 2],
                rule: NONE,
            }],
        }
    }

    fn bit(&self, bits: u128, depth: u32) -> usize {
        ((bits >> (self.width - 1 - depth)) & 1) as usize
    }

    fn insert(&mut self, bits: u128, prefix: u32, rule: u32) {
        let mut at = 0usize;
        for depth in 0..prefix.min(self.width) {
            let b = self.bit(bits, depth);
            let next = self.nodes[at].child[b];
            at = if next == NONE {
                let new = self.nodes.len();
                self.nodes.push(Node {
                    child: [NONE; 2],
                    rule: NONE,
                });
                self.nodes[at].child[b] = new as u32;
                new
            } else {
                next as usize
            };
        }
        let node = &mut self.nodes[at];
        node.rule = node.rule.min(rule);
    }

    /// The earliest rule among those whose range holds `bits`.
    fn lookup(&self, bits: u128) -> u32 {
        let mut best = NONE;
        let mut at = 0usize;
        let mut depth = 0;
        loop {
            let Some(node) = self.nodes.get(at) else {
                return best;
            };
            best = best.min(node.rule);
            if depth == self.width {
                return best;
            }
            let next = node.child[self.bit(bits, depth)];
            if next == NONE {
                return best;
            }
            at = next as usize;
            depth += 1;
        }
    }
}

/// A listener's rules, compiled.
#[derive(Debug, Clone)]
pub struct Acl {
    rules: Vec<Rule>,
    v4: Trie,
    v6: Trie,
}

impl Default for Acl {
    fn default() -> Acl {
        Acl::new(Vec::new())
    }
}

impl Acl {
    pub fn new(rules: Vec<Rule>) -> Acl {
        let (mut v4, mut v6) = (Trie::new(32), Trie::new(128));
        for (i, rule) in rules.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(NONE - 1);
            match rule.range {
                None => {
                    v4.insert(0, 0, i);
                    v6.insert(0, 0, i);
                }
                Some(r) if r.is_ipv4() => v4.insert(r.bits(), u32::from(r.prefix()), i),
                Some(r) => v6.insert(r.bits(), u32::from(r.prefix()), i),
            }
        }
        Acl { rules, v4, v6 }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule that decides for `ip`, if any matches.
    pub fn matching(&self, ip: IpAddr) -> Option<&Rule> {
        if self.rules.is_empty() {
            return None;
        }
        let ip = unmapped(ip);
        let i = match ip {
            IpAddr::V4(_) => self.v4.lookup(bits_of(ip)),
            IpAddr::V6(_) => self.v6.lookup(bits_of(ip)),
        };
        self.rules.get(i as usize)
    }

    /// The rule that refuses `ip`, if one does.
    pub fn denies(&self, ip: IpAddr) -> Option<&Rule> {
        self.matching(ip).filter(|r| !r.allow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cidr;
    use crate::testing::XorShift;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn rule(text: &str) -> Rule {
        let (verb, range) = text.split_once(' ').expect("verb range");
        Rule {
            allow: verb == "allow",
            range: match range {
                "all" => None,
                r => Some(Cidr::parse(r).expect("cidr")),
            },
        }
    }

    fn acl(rules: &[&str]) -> Acl {
        Acl::new(rules.iter().map(|r| rule(r)).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let a = acl(&["allow 127.0.0.2", "deny 127.0.0.0/8"]);
        assert!(a.denies(ip("127.0.0.2")).is_none());
        assert_eq!(
            a.denies(ip("127.0.0.3")).map(|r| r.to_string()).as_deref(),
            Some("deny 127.0.0.0/8")
        );
        assert!(
            a.denies(ip("10.0.0.1")).is_none(),
            "no rule matches: allowed"
        );
        let b = acl(&["deny 127.0.0.0/8", "allow 127.0.0.2"]);
        assert!(b.denies(ip("127.0.0.2")).is_some(), "order matters");
        let c = acl(&["deny 127.0.0.0/8", "allow all"]);
        assert!(
            c.denies(ip("::ffff:127.0.0.1")).is_some(),
            "v4-mapped is v4"
        );
        assert!(c.denies(ip("::1")).is_none());
        let d = acl(&["allow ::1", "deny all"]);
        assert!(d.denies(ip("::1")).is_none());
        assert_eq!(
            d.denies(ip("127.0.0.1")).map(|r| r.to_string()).as_deref(),
            Some("deny all")
        );
        assert!(Acl::default().denies(ip("1.2.3.4")).is_none());
    }

    /// A random range: a random address cut to a random prefix.
    fn random_range(rng: &mut XorShift, v4: bool) -> Cidr {
        let (bits, width): (u128, u32) = if v4 {
            (u128::from(rng.next() as u32), 32)
        } else {
            (u128::from(rng.next()) << 64 | u128::from(rng.next()), 128)
        };
        // Short prefixes are rare in real lists, and would match everything here.
        let prefix = 1 + rng.below(u64::from(width)) as u32;
        let host = width - prefix;
        let net = bits.checked_shr(host).map_or(0, |b| b << host);
        let text = if v4 {
            format!("{}/{prefix}", Ipv4Addr::from(net as u32))
        } else {
            format!("{}/{prefix}", Ipv6Addr::from(net))
        };
        Cidr::parse(&text).expect("range")
    }

    #[test]
    fn the_trie_agrees_with_a_scan_of_the_rules() {
        let mut rng = XorShift(0x51ce_2c3d);
        for round in 0..40 {
            let v4 = round % 2 == 0;
            let rules: Vec<Rule> = (0..200)
                .map(|_| Rule {
                    allow: rng.next() % 2 == 0,
                    range: Some(random_range(&mut rng, v4)),
                })
                .collect();
            let a = Acl::new(rules.clone());
            for k in 0..2000 {
                // Half the probes inside some rule's range, half anywhere.
                let probe = match (k % 2, v4) {
                    (0, _) => {
                        let r = rules[rng.index(rules.len())].range.expect("range");
                        let width = if v4 { 32 } else { 128 };
                        let host = width - u32::from(r.prefix());
                        let noise = u128::from(rng.next()) << 64 | u128::from(rng.next());
                        let mask = if host == 128 {
                            u128::MAX
                        } else {
                            (1u128 << host) - 1
                        };
                        r.bits() | (noise & mask)
                    }
                    (_, true) => u128::from(rng.next() as u32),
                    (_, false) => u128::from(rng.next()) << 64 | u128::from(rng.next()),
                };
                let addr = if v4 {
                    IpAddr::V4(Ipv4Addr::from(probe as u32))
                } else {
                    IpAddr::V6(Ipv6Addr::from(probe))
                };
                let scan = rules
                    .iter()
                    .find(|r| r.range.is_some_and(|c| c.contains(addr)));
                assert_eq!(a.matching(addr), scan, "{addr}");
            }
        }
    }

    #[test]
    fn rules_read_as_written() {
        assert_eq!(rule("deny 10.0.0.0/8").to_string(), "deny 10.0.0.0/8");
        assert_eq!(rule("allow 127.0.0.2").to_string(), "allow 127.0.0.2");
        assert_eq!(rule("deny all").to_string(), "deny all");
        assert_eq!(rule("allow ::1").to_string(), "allow ::1");
    }
}
