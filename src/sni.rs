//! The server name of a TLS ClientHello, read without decrypting anything: the TLS record layer
//! (handshake records, reassembled across records and reads), the handshake header, the
//! ClientHello's fixed fields and its extensions, of which only `server_name` matters. Sans-I/O:
//! `parse` looks at the bytes a client has sent so far and says whether more are needed, whether
//! this is not TLS at all, or what the name is. GREASE values (RFC 8701) are extensions like any
//! other and are skipped; every length is checked against what contains it, and a malformed one
//! is an error, never a panic. At most `MAX_HELLO` bytes are looked at.

/// The most of a client's first bytes the proxy reads before choosing a server.
pub const MAX_HELLO: usize = 16 * 1024;

const RECORD_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello may be under way: read more.
    Incomplete,
    /// Not a TLS handshake (plain text, another protocol).
    NotTls,
    /// A whole ClientHello, and the server name it asks for (lower case, no trailing dot).
    Found(Option<String>),
    /// A TLS handshake that breaks its own lengths.
    Bad(&'static str),
}

/// Reads the ClientHello at the start of `buf`.
pub fn parse(buf: &[u8]) -> Hello {
    let buf = buf.get(..buf.len().min(MAX_HELLO)).unwrap_or(buf);
    match buf.first() {
        None => return Hello::Incomplete,
        Some(&RECORD_HANDSHAKE) => {}
        Some(_) => return Hello::NotTls,
    }
    if buf.get(1).is_some_and(|&major| major != 3) {
        return Hello::NotTls;
    }
    // The handshake message, gathered from as many records as it spans.
    let mut message = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return incomplete_or_too_long(buf);
        };
        if header[0] != RECORD_HANDSHAKE {
            return Hello::Bad("a non-handshake record inside the ClientHello");
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > (1 << 14) {
            return Hello::Bad("a TLS record length out of range");
        }
        let Some(fragment) = buf.get(at + 5..at + 5 + len) else {
            return incomplete_or_too_long(buf);
        };
        message.extend_from_slice(fragment);
        at += 5 + len;
        if let Some(hs) = message.get(..4) {
            if hs[0] != HANDSHAKE_CLIENT_HELLO {
                return Hello::Bad("the first handshake message is not a ClientHello");
            }
            let body = usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]);
            // The handshake message and the record header it came in must fit in what is read.
            if body + 4 + 5 > MAX_HELLO {
                return Hello::Bad("a ClientHello longer than 16 KiB");
            }
            if let Some(hello) = message.get(4..4 + body) {
                return match client_hello(hello) {
                    Ok(name) => Hello::Found(name),
                    Err(why) => Hello::Bad(why),
                };
            }
        }
    }
}

fn incomplete_or_too_long(buf: &[u8]) -> Hello {
    match buf.len() >= MAX_HELLO {
        true => Hello::Bad("a ClientHello longer than 16 KiB"),
        false => Hello::Incomplete,
    }
}

/// A cursor over bytes whose every read is checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let Some(head) = self.0.get(..n) else {
            return Err("a ClientHello field runs past its end");
        };
        self.0 = &self.0[n..];
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A block prefixed by its length in `width` bytes.
    fn block(&mut self, width: usize) -> Result<Reader<'a>, &'static str> {
        let n = match width {
            1 => usize::from(self.u8()?),
            _ => usize::from(self.u16()?),
        };
        Ok(Reader(self.take(n)?))
    }
}

fn client_hello(hello: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader(hello);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    let session = r.block(1)?;
    if session.0.len() > 32 {
        return Err("a session id longer than 32 bytes");
    }
    let suites = r.block(2)?;
    if suites.0.is_empty() || suites.0.len() % 2 != 0 {
        return Err("a cipher-suite list of odd or no length");
    }
    r.block(1)?; // compression methods
    if r.0.is_empty() {
        return Ok(None); // no extensions at all
    }
    let mut exts = r.block(2)?;
    if !r.0.is_empty() {
        return Err("bytes after the extensions");
    }
    let mut name = None;
    let mut seen_name = false;
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let mut data = exts.block(2)?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        if seen_name {
            return Err("two server_name extensions");
        }
        seen_name = true;
        let mut list = data.block(2)?;
        while !list.0.is_empty() {
            let kind = list.u8()?;
            let host = list.block(2)?;
            if kind == NAME_TYPE_HOST && name.is_none() {
                name = Some(host_name(host.0)?);
            }
        }
        if !data.0.is_empty() {
            return Err("bytes after the server name list");
        }
    }
    Ok(name)
}

/// A host name as routing compares it: ASCII, lower case, no trailing dot.
fn host_name(raw: &[u8]) -> Result<String, &'static str> {
    if raw.is_empty() || raw.len() > 255 {
        return Err("a server name of no or too many bytes");
    }
    if !raw
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err("a server name with bytes a host name cannot have");
    }
    let text = String::from_utf8_lossy(raw).to_ascii_lowercase();
    // A name with an empty label (`a..`, `..`) is not a host name (found by fuzzing: one
    // trailing dot off left another).
    let name = text.strip_suffix('.').unwrap_or(&text);
    if name.is_empty() || name.split('.').any(str::is_empty) {
        return Err("a server name with an empty label");
    }
    Ok(name.to_string())
}

/// The route for server name `name` among `routes` (names in lower case, or `*.suffix`): an
/// exact name wins, then the longest wildcard whose suffix the name ends with (`*.example.org`
/// takes `a.example.org` and `a.b.example.org`, not `example.org`).
pub fn route<'a, T>(routes: &'a [(String, T)], name: &str) -> Option<&'a T> {
    if let Some((_, t)) = routes.iter().find(|(n, _)| n == name) {
        return Some(t);
    }
    routes
        .iter()
        .filter_map(|(n, t)| {
            let suffix = n.strip_prefix('*')?;
            (name.len() > suffix.len() && name.ends_with(suffix)).then_some((suffix.len(), t))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENSSL_A: &[u8] = include_bytes!("testdata/client_hello_a_test.bin");
    const OPENSSL_DOT: &[u8] = include_bytes!("testdata/client_hello_alpn_trailing_dot.bin");

    /// A ClientHello with `exts` (type, data) as its extensions, in one record.
    fn hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        let mut ext_bytes = Vec::new();
        for (kind, data) in exts {
            ext_bytes.extend_from_slice(&kind.to_be_bytes());
            ext_bytes.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext_bytes.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext_bytes.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext_bytes);
        let mut hs = vec![
            HANDSHAKE_CLIENT_HELLO,
            0,
            (body.len() >> 8) as u8,
            body.len() as u8,
        ];
        hs.extend_from_slice(&body);
        records(&hs, hs.len())
    }

    /// `hs` cut into handshake records of at most `size` bytes.
    fn records(hs: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in hs.chunks(size) {
            out.extend_from_slice(&[RECORD_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn sni(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![NAME_TYPE_HOST];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        (EXT_SERVER_NAME, list)
    }

    #[test]
    fn exact_names_win_then_the_longest_wildcard() {
        let routes = vec![
            ("*.example.org".to_string(), 1),
            ("api.example.org".to_string(), 2),
            ("*.b.example.org".to_string(), 3),
        ];
        assert_eq!(route(&routes, "api.example.org"), Some(&2));
        assert_eq!(route(&routes, "x.b.example.org"), Some(&3));
        assert_eq!(route(&routes, "x.example.org"), Some(&1));
        assert_eq!(route(&routes, "example.org"), None);
        assert_eq!(route(&routes, "other.test"), None);
    }

    #[test]
    fn real_client_hellos_from_openssl() {
        assert_eq!(parse(OPENSSL_A), Hello::Found(Some("a.test".into())));
        assert_eq!(
            parse(OPENSSL_DOT),
            Hello::Found(Some("service.b.example.org".into())),
            "lower case, the trailing dot gone"
        );
        for cut in 0..OPENSSL_A.len() {
            assert_eq!(parse(&OPENSSL_A[..cut]), Hello::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn grease_and_names_over_several_records() {
        let grease = (0x0a0a, vec![]);
        let bytes = hello(&[grease.clone(), sni("x.example"), (0x1a1a, vec![0])]);
        assert_eq!(parse(&bytes), Hello::Found(Some("x.example".into())));
        // The same handshake message over records of 7 bytes.
        let hs = &bytes[5..];
        let split = records(hs, 7);
        assert_eq!(parse(&split), Hello::Found(Some("x.example".into())));
        for cut in 0..split.len() {
            assert_eq!(parse(&split[..cut]), Hello::Incomplete, "cut at {cut}");
        }
        assert_eq!(
            parse(&hello(&[grease])),
            Hello::Found(None),
            "no server_name"
        );
        // A first server_name with no host entry does not make a second one acceptable.
        let no_host = (EXT_SERVER_NAME, vec![0, 4, 7, 0, 1, b'x']);
        assert!(matches!(
            parse(&hello(&[no_host, sni("b.example")])),
            Hello::Bad("two server_name extensions")
        ));
    }

    #[test]
    fn not_tls_and_broken_lengths() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse(b"\x16\x02\x00"), Hello::NotTls, "SSLv2-ish");
        assert_eq!(parse(b""), Hello::Incomplete);
        let good = hello(&[sni("a.test")]);
        let mut not_hello = good.clone();
        not_hello[5] = 2;
        assert!(matches!(parse(&not_hello), Hello::Bad(_)));
        let mut long_record = good.clone();
        long_record[3..5].copy_from_slice(&0x5000u16.to_be_bytes());
        assert!(matches!(parse(&long_record), Hello::Bad(_)));
        let mut oversize = good.clone();
        oversize[6..9].copy_from_slice(&[0x01, 0, 0]);
        assert!(matches!(parse(&oversize), Hello::Bad(m) if m.contains("16 KiB")));
        for bad in ["a b", "a..", "..", "a..b", ".", "*.example.org"] {
            assert!(
                matches!(parse(&hello(&[sni(bad)])), Hello::Bad(_)),
                "{bad:?}"
            );
        }
        let mut rng = crate::testing::XorShift(0xdead_beef);
        for _ in 0..20_000 {
            let mut b = good.clone();
            let i = rng.index(b.len());
            b[i] = rng.next() as u8;
            b.truncate(rng.index(b.len() + 1));
            let _ = parse(&b);
        }
    }
}
