//! The config layer's one error type. Every error names `FILE:LINE:COL` and the cause,
//! so an operator can jump straight to the place in the file.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the error has no position (the file could not be read).
    pub line: u32,
    pub col: u32,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &str, line: u32, col: u32, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            line,
            col,
            message: tidy(&message.into()),
        }
    }

    /// The file is not UTF-8: name the line and column of the first bad byte.
    pub fn not_utf8(file: &str, bytes: &[u8], err: &std::str::Utf8Error) -> ConfigError {
        let good = bytes.get(..err.valid_up_to()).unwrap_or_default();
        let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = std::str::from_utf8(good.get(line_start..).unwrap_or_default())
            .map_or(1, |s| s.chars().count() + 1);
        let byte = bytes.get(err.valid_up_to()).copied().unwrap_or(0);
        ConfigError::new(
            file,
            u32::try_from(line).unwrap_or(u32::MAX),
            u32::try_from(col).unwrap_or(u32::MAX),
            format!("invalid UTF-8 (byte 0x{byte:02x}); save the file as UTF-8"),
        )
    }

    pub fn io(file: &str, err: &std::io::Error) -> ConfigError {
        ConfigError::new(
            file,
            0,
            0,
            format!("cannot read config: {}", crate::sys::io_reason(err)),
        )
    }
}

/// Longest run of non-blank characters a message repeats from the input.
const MAX_ECHO: usize = 64;

/// Makes a message safe to print: control characters from the input are escaped (a NUL or an
/// escape sequence never reaches the terminal raw), and a token longer than `MAX_ECHO`
/// characters is cut, so a 10 MB bad token gives a one-line error.
fn tidy(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(1024));
    let mut run = 0usize;
    for c in message.chars() {
        if c.is_whitespace() && !c.is_control() {
            run = 0;
            out.push(c);
            continue;
        }
        run += 1;
        if run > MAX_ECHO {
            if run == MAX_ECHO + 1 {
                out.push('…');
            }
            continue;
        }
        if c.is_control() || is_invisible_format(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Format characters that change how a terminal shows the text around them (bidi overrides,
/// zero-width marks) without showing themselves.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_escape_control_characters_and_cut_long_tokens() {
        let e = ConfigError::new("f", 1, 1, "unknown directive 'a\0b\x1b[31m'");
        assert_eq!(e.message, "unknown directive 'a\\u{0}b\\u{1b}[31m'");
        let e = ConfigError::new("f", 1, 1, "unknown directive 'ab\u{202e}cd'");
        assert_eq!(e.message, "unknown directive 'ab\\u{202e}cd'");
        let long = "x".repeat(10_000_000);
        let e = ConfigError::new("f", 1, 1, format!("unknown directive '{long}' here"));
        assert!(e.message.len() < 200, "{} bytes", e.message.len());
        assert!(e.message.starts_with("unknown directive 'xxxx"));
        assert!(e.message.ends_with("… here"), "{}", e.message);
    }

    #[test]
    fn invalid_utf8_names_its_line_and_column() {
        let bytes: &[u8] = &b"listen 1;\nproxy \xc3\xa9\xff;\n"[..];
        let err = std::str::from_utf8(bytes).expect_err("not utf-8");
        let e = ConfigError::not_utf8("f.conf", bytes, &err);
        assert_eq!(
            e.to_string(),
            "f.conf:2:8: invalid UTF-8 (byte 0xff); save the file as UTF-8"
        );
    }
}
