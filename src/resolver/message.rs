//! DNS messages for the stub resolver: a query for the A or AAAA records of one name, and the
//! addresses an answer gives for it. Sans-I/O and total: every length and pointer is checked, compression pointers may only point
//! backwards and are followed a bounded number of times, and a message that is not an answer to
//! the question asked (another id, another name or type) is refused, so a spoofed or stray reply
//! changes nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    A,
    Aaaa,
}

impl QType {
    fn code(self) -> u16 {
        match self {
            QType::A => 1,
            QType::Aaaa => 28,
        }
    }
}

const TYPE_CNAME: u16 = 5;
const CLASS_IN: u16 = 1;
/// CNAMEs followed inside one answer.
const MAX_CHAIN: usize = 8;
/// Compression pointers followed while reading one name.
const MAX_JUMPS: usize = 32;

/// What an answer says about the name asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub addrs: Vec<IpAddr>,
    /// The least TTL of the records used (seconds); 0 when there are none.
    pub ttl: u32,
    /// The server cut the answer short (TC): ask again over TCP.
    pub truncated: bool,
    /// The name does not exist (NXDOMAIN).
    pub no_such_name: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not an answer to this query (id, question): ignore it, keep waiting.
    NotOurs,
    /// The server failed (SERVFAIL, REFUSED, ...): try another.
    ServerError(u8),
    /// Broken lengths or pointers.
    Malformed,
}

/// A query with `id` for `qtype` records of `name`, recursion desired.
pub fn query(id: u16, name: &str, qtype: QType) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(18 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    encode_name(&mut out, name)?;
    out.extend_from_slice(&qtype.code().to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(out)
}

fn encode_name(out: &mut Vec<u8>, name: &str) -> Result<(), &'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err("a name of no or too many bytes");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("a label of no or more than 63 bytes");
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    Ok(())
}

/// The addresses `msg` gives for the `qtype` records of `name`, if it answers the query `id`.
pub fn answer(msg: &[u8], id: u16, name: &str, qtype: QType) -> Result<Answer, Refused> {
    let header = msg.get(..12).ok_or(Refused::Malformed)?;
    let word = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    if word(0) != id {
        return Err(Refused::NotOurs);
    }
    let flags = word(2);
    if flags & 0x8000 == 0 || (flags >> 11) & 0xf != 0 {
        return Err(Refused::NotOurs); // a query, or another opcode
    }
    let truncated = flags & 0x0200 != 0;
    let rcode = (flags & 0xf) as u8;
    let (qdcount, ancount) = (word(4), usize::from(word(6)));
    if qdcount != 1 {
        return Err(Refused::NotOurs);
    }
    let mut at = 12;
    let (qname, after) = read_name(msg, at)?;
    at = after;
    let q = msg.get(at..at + 4).ok_or(Refused::Malformed)?;
    let (qt, qc) = (
        u16::from_be_bytes([q[0], q[1]]),
        u16::from_be_bytes([q[2], q[3]]),
    );
    at += 4;
    let wanted = name.strip_suffix('.').unwrap_or(name);
    if !qname.eq_ignore_ascii_case(wanted) || qt != qtype.code() || qc != CLASS_IN {
        return Err(Refused::NotOurs);
    }
    match rcode {
        0 => {}
        3 => {
            return Ok(Answer {
                addrs: Vec::new(),
                ttl: 0,
                truncated,
                no_such_name: true,
            })
        }
        other => return Err(Refused::ServerError(other)),
    }
    // The answer records: (owner, type, ttl, data offset, data length).
    let mut records = Vec::with_capacity(ancount.min(64));
    for _ in 0..ancount {
        let (owner, after) = read_name(msg, at)?;
        let fixed = msg.get(after..after + 10).ok_or(Refused::Malformed)?;
        let kind = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let data = after + 10;
        msg.get(data..data + len).ok_or(Refused::Malformed)?;
        at = data + len;
        if class == CLASS_IN {
            records.push((owner, kind, ttl, data, len));
        }
    }
    // Follow CNAMEs from the name asked for, whatever order the records came in.
    let mut target = wanted.to_ascii_lowercase();
    let mut ttl = u32::MAX;
    for _ in 0..MAX_CHAIN {
        let Some(&(_, _, t, data, _)) = records
            .iter()
            .find(|(o, k, ..)| *k == TYPE_CNAME && o.eq_ignore_ascii_case(&target))
        else {
            break;
        };
        let (next, _) = read_name(msg, data)?;
        ttl = ttl.min(t);
        target = next.to_ascii_lowercase();
    }
    let mut addrs = Vec::new();
    for (owner, kind, t, data, len) in &records {
        if *kind != qtype.code() || !owner.eq_ignore_ascii_case(&target) {
            continue;
        }
        let bytes = msg.get(*data..data + len).ok_or(Refused::Malformed)?;
        let ip = match (qtype, bytes.len()) {
            (QType::A, 4) => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
            (QType::Aaaa, 16) => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(bytes);
                IpAddr::V6(Ipv6Addr::from(octets))
            }
            _ => return Err(Refused::Malformed),
        };
        ttl = ttl.min(*t);
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    Ok(Answer {
        ttl: if addrs.is_empty() { 0 } else { ttl },
        addrs,
        truncated,
        no_such_name: false,
    })
}

/// The name at `at` (following compression pointers) and where the bytes after it start.
fn read_name(msg: &[u8], mut at: usize) -> Result<(String, usize), Refused> {
    let mut name = String::new();
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = *msg.get(at).ok_or(Refused::Malformed)?;
        match len {
            0 => {
                let after = end.unwrap_or(at + 1);
                return Ok((name, after));
            }
            l if l & 0xc0 == 0xc0 => {
                let low = *msg.get(at + 1).ok_or(Refused::Malformed)?;
                let to = usize::from(l & 0x3f) << 8 | usize::from(low);
                // Only backwards, and only so often: no loop can hold the reader.
                if to >= at || jumps >= MAX_JUMPS {
                    return Err(Refused::Malformed);
                }
                jumps += 1;
                end.get_or_insert(at + 2);
                at = to;
            }
            l if l & 0xc0 != 0 => return Err(Refused::Malformed),
            l => {
                let label = msg
                    .get(at + 1..at + 1 + usize::from(l))
                    .ok_or(Refused::Malformed)?;
                if name.len() + label.len() > 254 {
                    return Err(Refused::Malformed);
                }
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(&String::from_utf8_lossy(label));
                at += 1 + usize::from(l);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer to `query(id, name, qtype)` with `records` (owner, type, ttl, data).
    fn reply(
        id: u16,
        name: &str,
        qtype: QType,
        flags: u16,
        records: &[(&str, u16, u32, Vec<u8>)],
    ) -> Vec<u8> {
        let mut msg = query(id, name, qtype).expect("query");
        msg[2..4].copy_from_slice(&(0x8180 | flags).to_be_bytes());
        msg[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        for (owner, kind, ttl, data) in records {
            encode_name(&mut msg, owner).expect("name");
            msg.extend_from_slice(&kind.to_be_bytes());
            msg.extend_from_slice(&CLASS_IN.to_be_bytes());
            msg.extend_from_slice(&ttl.to_be_bytes());
            msg.extend_from_slice(&(data.len() as u16).to_be_bytes());
            msg.extend_from_slice(data);
        }
        msg
    }

    fn name_bytes(name: &str) -> Vec<u8> {
        let mut v = Vec::new();
        encode_name(&mut v, name).expect("name");
        v
    }

    #[test]
    fn two_a_records_give_two_addresses_and_the_least_ttl() {
        let msg = reply(
            7,
            "db.test",
            QType::A,
            0,
            &[
                ("db.test", 1, 30, vec![127, 0, 0, 1]),
                ("db.test", 1, 20, vec![127, 0, 0, 2]),
            ],
        );
        let a = answer(&msg, 7, "db.test.", QType::A).expect("answer");
        assert_eq!(
            a.addrs,
            vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2])]
        );
        assert_eq!((a.ttl, a.truncated, a.no_such_name), (20, false, false));
    }

    #[test]
    fn cname_chains_are_followed_in_any_order() {
        let msg = reply(
            9,
            "www.test",
            QType::Aaaa,
            0,
            &[
                (
                    "edge.test",
                    28,
                    50,
                    vec![0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                ),
                ("www.test", TYPE_CNAME, 60, name_bytes("edge.test")),
                ("other.test", 28, 5, vec![0; 16]),
            ],
        );
        let a = answer(&msg, 9, "WWW.test", QType::Aaaa).expect("answer");
        assert_eq!(a.addrs, vec!["2001:db8::1".parse::<IpAddr>().expect("ip")]);
        assert_eq!(a.ttl, 50);
    }

    #[test]
    fn replies_to_another_question_are_not_ours() {
        let msg = reply(
            1,
            "a.test",
            QType::A,
            0,
            &[("a.test", 1, 5, vec![127, 0, 0, 1])],
        );
        assert_eq!(
            answer(&msg, 2, "a.test", QType::A),
            Err(Refused::NotOurs),
            "id"
        );
        assert_eq!(
            answer(&msg, 1, "b.test", QType::A),
            Err(Refused::NotOurs),
            "name"
        );
        assert_eq!(
            answer(&msg, 1, "a.test", QType::Aaaa),
            Err(Refused::NotOurs),
            "type"
        );
        let q = query(1, "a.test", QType::A).expect("query");
        assert_eq!(
            answer(&q, 1, "a.test", QType::A),
            Err(Refused::NotOurs),
            "a query"
        );
    }

    #[test]
    fn truncation_nxdomain_and_server_errors() {
        let tc = reply(3, "a.test", QType::A, 0x0200, &[]);
        assert!(
            answer(&tc, 3, "a.test", QType::A)
                .expect("answer")
                .truncated
        );
        let nx = reply(3, "a.test", QType::A, 3, &[]);
        assert!(
            answer(&nx, 3, "a.test", QType::A)
                .expect("answer")
                .no_such_name
        );
        let fail = reply(3, "a.test", QType::A, 2, &[]);
        assert_eq!(
            answer(&fail, 3, "a.test", QType::A),
            Err(Refused::ServerError(2))
        );
    }

    #[test]
    fn pointers_lengths_and_names_are_checked() {
        let mut msg = reply(
            4,
            "a.test",
            QType::A,
            0,
            &[("a.test", 1, 5, vec![127, 0, 0, 1])],
        );
        // Point the answer's owner at the question's name (compression), then at itself (a loop).
        let owner_at = 12 + name_bytes("a.test").len() + 4;
        let tail = msg.split_off(owner_at + name_bytes("a.test").len());
        msg.truncate(owner_at);
        msg.extend_from_slice(&[0xc0, 12]);
        msg.extend_from_slice(&tail);
        let a = answer(&msg, 4, "a.test", QType::A).expect("compressed owner");
        assert_eq!(a.addrs, vec![IpAddr::from([127, 0, 0, 1])]);
        let mut looped = msg.clone();
        looped[owner_at + 1] = owner_at as u8;
        assert_eq!(
            answer(&looped, 4, "a.test", QType::A),
            Err(Refused::Malformed)
        );
        for cut in 0..msg.len() {
            assert!(
                answer(&msg[..cut], 4, "a.test", QType::A).is_err(),
                "cut at {cut}"
            );
        }
        let mut wrong_len = msg.clone();
        let last = wrong_len.len() - 5;
        wrong_len[last] = 9;
        assert!(answer(&wrong_len, 4, "a.test", QType::A).is_err());
        assert!(query(1, &"a".repeat(64), QType::A).is_err());
        assert!(query(1, "a..b", QType::A).is_err());
        let mut rng = crate::testing::XorShift(0x5eed);
        for _ in 0..20_000 {
            let mut m = msg.clone();
            let i = rng.index(m.len());
            m[i] = rng.next() as u8;
            let _ = answer(&m, 4, "a.test", QType::A);
        }
    }
}
