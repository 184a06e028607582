//! The admin endpoint's HTTP/1.1, sans-I/O: a request head parser and a response writer.
//!
//! Only what the endpoint needs: the request line (GET, HEAD, POST; origin-form targets;
//! HTTP/1.0 or 1.1) and three headers (`Host`, `Origin`, `Sec-Fetch-Site`); the rest are read
//! and checked for form, then ignored. A body is never read (every response closes the
//! connection). The parser is total: any bytes give `Partial`, a request or a status to answer
//! with, never a panic, and it reads at most `MAX_HEAD` bytes.

use std::fmt::Write as _;

/// The largest request head taken (DESIGN §5); beyond it the answer is 431.
pub const MAX_HEAD: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
}

/// The statuses the endpoint answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    Forbidden,
    NotFound,
    /// A `Host` that is not the endpoint's (DNS rebinding).
    Misdirected,
    MethodNotAllowed,
    RequestTimeout,
    HeaderTooLarge,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::Misdirected => 421,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::HeaderTooLarge => 431,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::Forbidden => "Forbidden",
            Status::NotFound => "Not Found",
            Status::Misdirected => "Misdirected Request",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::HeaderTooLarge => "Request Header Fields Too Large",
        }
    }
}

/// A parsed request head; the strings borrow from the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: Method,
    /// The target's path, still percent-encoded.
    pub path: &'a str,
    /// What follows `?`, still encoded (empty if none).
    pub query: &'a str,
    pub host: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub sec_fetch_site: Option<&'a str>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parse<'a> {
    /// The head is not complete yet: read more.
    Partial,
    Done(Request<'a>),
    /// Answer with this status and close.
    Bad(Status),
}

/// Parses the request head at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parse<'_> {
    parse_from(buf, &mut 0)
}

/// `parse`, resuming the search for the head's end at `*scanned` (where the last call left it)
/// so that a head arriving a byte at a time is scanned once, not once per byte.
pub fn parse_from<'b>(buf: &'b [u8], scanned: &mut usize) -> Parse<'b> {
    let Some(end) = head_end(buf, scanned) else {
        return match buf.len() > MAX_HEAD {
            true => Parse::Bad(Status::HeaderTooLarge),
            false => Parse::Partial,
        };
    };
    if end > MAX_HEAD {
        return Parse::Bad(Status::HeaderTooLarge);
    }
    let Some(head) = buf.get(..end).and_then(|h| std::str::from_utf8(h).ok()) else {
        return Parse::Bad(Status::BadRequest);
    };
    match request(head) {
        Ok(r) => Parse::Done(r),
        Err(status) => Parse::Bad(status),
    }
}

/// Where the empty line that ends the head begins (CRLF or bare LF line ends), searching from
/// the line that starts at `*line_start` (left at the last incomplete line when not found). An
/// empty first line is not an end: it makes the request line empty, which is a 400.
fn head_end(buf: &[u8], line_start: &mut usize) -> Option<usize> {
    let scan = buf.get(..buf.len().min(MAX_HEAD + 4))?;
    let from = (*line_start).min(scan.len());
    for (i, &b) in scan.iter().enumerate().skip(from) {
        if b != b'\n' {
            continue;
        }
        let line = scan.get(*line_start..i).unwrap_or_default();
        if (line.is_empty() || line == b"\r") && *line_start > 0 {
            return Some(*line_start);
        }
        *line_start = i + 1;
    }
    None
}

fn request(head: &str) -> Result<Request<'_>, Status> {
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().ok_or(Status::BadRequest)?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Status::BadRequest);
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(Status::BadRequest);
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Status::BadRequest);
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        other if is_token(other) => return Err(Status::MethodNotAllowed),
        _ => return Err(Status::BadRequest),
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut r = Request {
        method,
        path,
        query,
        host: None,
        origin: None,
        sec_fetch_site: None,
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or(Status::BadRequest)?;
        // No whitespace before the colon (RFC 9112 §5.1), no obsolete line folding.
        if !is_token(name) {
            return Err(Status::BadRequest);
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(Status::BadRequest);
        }
        let slot = if name.eq_ignore_ascii_case("host") {
            &mut r.host
        } else if name.eq_ignore_ascii_case("origin") {
            &mut r.origin
        } else if name.eq_ignore_ascii_case("sec-fetch-site") {
            &mut r.sec_fetch_site
        } else {
            continue;
        };
        if slot.is_some() {
            // Two of one of these would leave the security checks a choice to make.
            return Err(Status::BadRequest);
        }
        *slot = Some(value);
    }
    Ok(r)
}

/// An RFC 9110 token: what methods and header names are made of.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The value of query parameter `name`, percent-decoded (`+` is a space), or None if absent
/// or not decodable.
pub fn param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| decode(k).as_deref() == Some(name))
        .and_then(|(_, v)| decode(v))
}

/// Percent-decoding; None for a broken escape or bytes that are not UTF-8.
fn decode(text: &str) -> Option<String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let (hi, lo) = (bytes.next()?, bytes.next()?);
                if !hi.is_ascii_hexdigit() || !lo.is_ascii_hexdigit() {
                    return None;
                }
                let hex = [hi, lo];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// A whole response: status line, headers, and (unless `head_only`) the body.
pub fn response(
    status: Status,
    content_type: &str,
    extra_headers: &str,
    body: &[u8],
    head_only: bool,
) -> Vec<u8> {
    let mut head = String::with_capacity(160 + extra_headers.len());
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n{}Connection: close\r\n\r\n",
        status.code(),
        status.reason(),
        content_type,
        body.len(),
        extra_headers
    );
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(text: &str) -> Request<'_> {
        match parse(text.as_bytes()) {
            Parse::Done(r) => r,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    fn bad(text: &[u8]) -> Status {
        match parse(text) {
            Parse::Bad(s) => s,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn a_request_and_its_headers() {
        let r = done(
            "POST /servers?upstream=u&server=127.0.0.1%3A80 HTTP/1.1\r\nHost: 127.0.0.1:9901\r\n\
             origin:  http://127.0.0.1:9901 \r\nSec-Fetch-Site: same-origin\r\nX-Other: a:b\r\n\r\n",
        );
        assert_eq!(r.method, Method::Post);
        assert_eq!(r.path, "/servers");
        assert_eq!(param(r.query, "server").as_deref(), Some("127.0.0.1:80"));
        assert_eq!(param(r.query, "upstream").as_deref(), Some("u"));
        assert_eq!(param(r.query, "state"), None);
        assert_eq!(r.host, Some("127.0.0.1:9901"));
        assert_eq!(r.origin, Some("http://127.0.0.1:9901"));
        assert_eq!(r.sec_fetch_site, Some("same-origin"));
        // Bare LF line ends, HTTP/1.0, no headers.
        let r = done("HEAD / HTTP/1.0\n\n");
        assert_eq!((r.method, r.path, r.query), (Method::Head, "/", ""));
    }

    #[test]
    fn a_head_fed_a_byte_at_a_time_is_found_once() {
        let text = b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut scanned = 0;
        for n in 1..text.len() {
            assert_eq!(parse_from(&text[..n], &mut scanned), Parse::Partial, "{n}");
            assert!(scanned <= n);
        }
        assert!(matches!(parse_from(text, &mut scanned), Parse::Done(r) if r.path == "/stats"));
    }

    #[test]
    fn partial_heads_wait_for_more() {
        for text in [
            "",
            "GET",
            "GET / HTTP/1.1\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n\r",
        ] {
            assert_eq!(parse(text.as_bytes()), Parse::Partial, "{text:?}");
        }
    }

    #[test]
    fn malformed_requests_get_400_and_others_their_status() {
        for text in [
            "GET /\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nno colon\r\n\r\n",
            "GET / HTTP/1.1\r\nOrigin: a\r\nOrigin: b\r\n\r\n",
            "G\u{e9}T / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(bad(text.as_bytes()), Status::BadRequest, "{text:?}");
        }
        assert_eq!(bad(b"GET /\xff HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(bad(b"DELETE / HTTP/1.1\r\n\r\n"), Status::MethodNotAllowed);
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(9 * 1024, b'a');
        assert_eq!(bad(&big), Status::HeaderTooLarge, "no end in sight");
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(bad(&big), Status::HeaderTooLarge, "complete but too large");
    }

    #[test]
    fn params_decode_or_are_refused() {
        assert_eq!(param("a=1&b=x+y%21", "b").as_deref(), Some("x y!"));
        assert_eq!(param("a", "a").as_deref(), Some(""));
        assert_eq!(param("a=%zz", "a"), None);
        assert_eq!(param("a=%4", "a"), None);
        assert_eq!(param("a=%ff", "a"), None, "not UTF-8");
        assert_eq!(param("a=%+f", "a"), None, "a sign is not a hex digit");
        assert_eq!(param("", "a"), None);
    }

    #[test]
    fn responses_carry_length_and_close() {
        let r = response(Status::NotFound, "text/plain", "", b"no", false);
        let text = String::from_utf8(r).expect("utf8");
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Content-Length: 2\r\n") && text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\nno"));
        let head = response(Status::Ok, "text/plain", "Allow: POST\r\n", b"body", true);
        let text = String::from_utf8(head).expect("utf8");
        assert!(text.contains("Content-Length: 4\r\nCache") && text.ends_with("\r\n\r\n"));
        assert!(text.contains("Allow: POST\r\n"));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = crate::testing::XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let len = (rng.next() % 300) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if rng.next() % 2 == 0 {
                buf.splice(0..0, b"GET / HTTP/1.1\r\n".iter().copied());
                buf.extend_from_slice(b"\r\n\r\n");
            }
            let _ = parse(&buf);
        }
    }
}
