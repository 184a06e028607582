//! Config text → tokens, each with the 1-based `line:col` where it starts (`col` counts chars).
//!
//! Tokens are `;`, `{`, `}` and arguments. `#` starts a comment that runs to the end of the line.
//! An argument is a run of bare characters (anything but whitespace, `;`, `{`, `}`, `"`, `#`) and
//! double-quoted parts with nothing between them, as in a shell: `send="PING\r\n"` and
//! `"a b"c` are one argument each. Its kind says how it was written:
//! - `Quoted(s)`: exactly one quoted part and nothing else (`"a b"`, `""`);
//! - `Word(s)`: anything else, bare (`proxy`, `10s`) or joined (`send="PING\r\n"` gives the
//!   value `send=PING\r\n`).
//!
//! In both, the value is the text without the quotes, with `\"` and `\\` inside quotes
//! decoded; any other backslash pair inside quotes stays as written (backslash and char), and a
//! backslash outside quotes is an ordinary character. A reader that must decode more escapes
//! (health_check `send`/`expect`) decodes once from the source text that [`Lexer::span`] gives,
//! so that `"\\r"` stays a backslash and an `r` instead of becoming a carriage return.
//!
//! Invariants: no input makes the lexer panic; after the first error the lexer yields nothing.

use super::ConfigError;
use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub kind: TokenKind,
    /// 1-based line of the token's first char.
    pub line: u32,
    /// 1-based column (in chars) of the token's first char.
    pub col: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenKind {
    /// A bare argument, or one joined from bare and quoted parts (see the module docs).
    Word(String),
    /// An argument that is exactly one double-quoted string.
    Quoted(String),
    Semi,
    Open,
    Close,
}

#[derive(Debug, Clone)]
pub struct Lexer<'a> {
    text: &'a str,
    file: &'a str,
    /// Byte offset of the next char.
    pos: usize,
    line: u32,
    col: u32,
    /// Source bytes of the last token returned.
    span: Range<usize>,
    /// `line:col` just past the last token returned.
    end: (u32, u32),
    failed: bool,
}

impl<'a> Lexer<'a> {
    /// `file` is the name used in error messages.
    pub fn new(text: &'a str, file: &'a str) -> Lexer<'a> {
        Lexer {
            text,
            file,
            pos: 0,
            line: 1,
            col: 1,
            span: 0..0,
            end: (1, 1),
            failed: false,
        }
    }

    /// The source bytes of the token last returned by [`Lexer::next_token`], quotes and escapes as
    /// written. `text.get(lexer.span())` is always `Some`.
    pub fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    /// `line:col` just past the token last returned (where a missing `;` belongs).
    pub fn end(&self) -> (u32, u32) {
        self.end
    }

    /// `line:col` of the next char to read; at the end of input, the end of the text.
    pub fn position(&self) -> (u32, u32) {
        (self.line, self.col)
    }

    /// The next token, `Ok(None)` at the end of input. After an error, always `Ok(None)`.
    pub fn next_token(&mut self) -> Result<Option<Token>, ConfigError> {
        if self.failed {
            return Ok(None);
        }
        let result = self.scan();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn peek(&self) -> Option<char> {
        self.text
            .get(self.pos..)
            .and_then(|rest| rest.chars().next())
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        if c == '\n' {
            self.line = self.line.saturating_add(1);
            self.col = 1;
        } else {
            self.col = self.col.saturating_add(1);
        }
        Some(c)
    }

    fn skip_blanks_and_comments(&mut self) {
        while let Some(c) = self.peek() {
            if c == '#' {
                while let Some(c) = self.bump() {
                    if c == '\n' {
                        break;
                    }
                }
            } else if c.is_whitespace() {
                self.bump();
            } else {
                break;
            }
        }
    }

    fn scan(&mut self) -> Result<Option<Token>, ConfigError> {
        self.skip_blanks_and_comments();
        let (start, line, col) = (self.pos, self.line, self.col);
        let Some(c) = self.peek() else {
            return Ok(None);
        };
        let kind = match c {
            ';' | '{' | '}' => {
                self.bump();
                match c {
                    ';' => TokenKind::Semi,
                    '{' => TokenKind::Open,
                    _ => TokenKind::Close,
                }
            }
            _ => self.argument()?,
        };
        self.span = start..self.pos;
        self.end = (self.line, self.col);
        Ok(Some(Token { kind, line, col }))
    }

    fn argument(&mut self) -> Result<TokenKind, ConfigError> {
        let mut value = String::new();
        let mut bare = false;
        let mut quoted_parts = 0u32;
        while let Some(c) = self.peek() {
            match c {
                '"' => {
                    self.quoted_part(&mut value)?;
                    quoted_parts = quoted_parts.saturating_add(1);
                }
                ';' | '{' | '}' | '#' => break,
                c if c.is_whitespace() => break,
                c => {
                    self.bump();
                    value.push(c);
                    bare = true;
                }
            }
        }
        if !bare && quoted_parts == 1 {
            Ok(TokenKind::Quoted(value))
        } else {
            Ok(TokenKind::Word(value))
        }
    }

    /// Reads `"..."` (the next char is the opening quote) and appends its value to `value`.
    fn quoted_part(&mut self, value: &mut String) -> Result<(), ConfigError> {
        let (line, col) = (self.line, self.col);
        let unterminated = || {
            ConfigError::new(
                self.file,
                line,
                col,
                "unterminated string: this '\"' is never closed",
            )
        };
        self.bump();
        loop {
            match self.bump() {
                None => return Err(unterminated()),
                Some('"') => return Ok(()),
                Some('\\') => match self.bump() {
                    None => return Err(unterminated()),
                    Some(c @ ('"' | '\\')) => value.push(c),
                    Some(c) => {
                        value.push('\\');
                        value.push(c);
                    }
                },
                Some(c) => value.push(c),
            }
        }
    }
}

impl Iterator for Lexer<'_> {
    type Item = Result<Token, ConfigError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_token().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex(text: &str) -> Vec<(TokenKind, u32, u32)> {
        Lexer::new(text, "t.conf")
            .map(|t| t.map(|t| (t.kind, t.line, t.col)))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("lex failed: {e}"))
    }

    fn lex_err(text: &str) -> ConfigError {
        match Lexer::new(text, "t.conf").collect::<Result<Vec<_>, _>>() {
            Ok(tokens) => panic!("expected an error, got {tokens:?}"),
            Err(e) => e,
        }
    }

    fn word(s: &str) -> TokenKind {
        TokenKind::Word(s.to_string())
    }

    fn quoted(s: &str) -> TokenKind {
        TokenKind::Quoted(s.to_string())
    }

    #[test]
    fn tokens_and_positions() {
        let got = lex("upstream b {\n  server 127.0.0.1:80;\n}\n");
        assert_eq!(
            got,
            vec![
                (word("upstream"), 1, 1),
                (word("b"), 1, 10),
                (TokenKind::Open, 1, 12),
                (word("server"), 2, 3),
                (word("127.0.0.1:80"), 2, 10),
                (TokenKind::Semi, 2, 22),
                (TokenKind::Close, 3, 1),
            ]
        );
    }

    #[test]
    fn punctuation_ends_words_without_space() {
        let got = lex("a;b{c}d");
        assert_eq!(
            got,
            vec![
                (word("a"), 1, 1),
                (TokenKind::Semi, 1, 2),
                (word("b"), 1, 3),
                (TokenKind::Open, 1, 4),
                (word("c"), 1, 5),
                (TokenKind::Close, 1, 6),
                (word("d"), 1, 7),
            ]
        );
    }

    #[test]
    fn columns_count_chars_not_bytes() {
        let got = lex("é ü\tx");
        assert_eq!(
            got,
            vec![(word("é"), 1, 1), (word("ü"), 1, 3), (word("x"), 1, 5)]
        );
    }

    #[test]
    fn comments_run_to_end_of_line() {
        let got = lex("# all comment\na; # tail { } \"\nb#c\n#last");
        assert_eq!(
            got,
            vec![
                (word("a"), 2, 1),
                (TokenKind::Semi, 2, 2),
                (word("b"), 3, 1),
            ]
        );
    }

    #[test]
    fn quoted_strings_and_escapes() {
        let got = lex(r#""a b" "" "x\"y\\z" "\r\n\t\x41\q""#);
        assert_eq!(
            got,
            vec![
                (quoted("a b"), 1, 1),
                (quoted(""), 1, 7),
                (quoted("x\"y\\z"), 1, 10),
                (quoted(r"\r\n\t\x41\q"), 1, 20),
            ]
        );
    }

    #[test]
    fn quoted_string_may_hold_specials_and_newlines() {
        let got = lex("\"a;{}#b\nc\" d");
        assert_eq!(got, vec![(quoted("a;{}#b\nc"), 1, 1), (word("d"), 2, 4)]);
    }

    #[test]
    fn key_equals_quoted_joins_into_one_word() {
        let got = lex(r#"health_check send="PING\r\n" expect="+PONG";"#);
        assert_eq!(
            got,
            vec![
                (word("health_check"), 1, 1),
                (word(r"send=PING\r\n"), 1, 14),
                (word("expect=+PONG"), 1, 30),
                (TokenKind::Semi, 1, 44),
            ]
        );
        let got = lex(r#""a"b"c d"e x"#);
        assert_eq!(got, vec![(word("abc de"), 1, 1), (word("x"), 1, 12)]);
    }

    #[test]
    fn backslash_outside_quotes_is_plain() {
        assert_eq!(lex(r"a\nb"), vec![(word(r"a\nb"), 1, 1)]);
    }

    #[test]
    fn span_and_end_follow_the_last_token() {
        let text = "x  send=\"a\\\"b\"  ;";
        let mut lexer = Lexer::new(text, "t.conf");
        assert!(matches!(lexer.next_token(), Ok(Some(_))));
        assert!(matches!(lexer.next_token(), Ok(Some(_))));
        assert_eq!(text.get(lexer.span()), Some("send=\"a\\\"b\""));
        assert_eq!(lexer.end(), (1, 15));
        assert!(matches!(lexer.next_token(), Ok(Some(_))));
        assert!(matches!(lexer.next_token(), Ok(None)));
        assert_eq!(lexer.position(), (1, 18));
    }

    #[test]
    fn unterminated_string_points_at_opening_quote() {
        let e = lex_err("a;\n  b \"never closed;\n}\n");
        assert_eq!((e.line, e.col), (2, 5));
        assert!(e.message.contains("unterminated string"), "{e}");
        assert_eq!(e.to_string(), format!("t.conf:2:5: {}", e.message));

        let e = lex_err("x=\"ends in backslash\\");
        assert_eq!((e.line, e.col), (1, 3));
        let e = lex_err("\"\\\"");
        assert_eq!((e.line, e.col), (1, 1));
    }

    #[test]
    fn nothing_after_an_error() {
        let mut lexer = Lexer::new("\"x", "t.conf");
        assert!(lexer.next_token().is_err());
        assert!(matches!(lexer.next_token(), Ok(None)));
        assert!(lexer.next().is_none());
    }

    #[test]
    fn crlf_line_endings() {
        let got = lex("a;\r\nb \"x\r\ny\";\r\n");
        assert_eq!(
            got,
            vec![
                (word("a"), 1, 1),
                (TokenKind::Semi, 1, 2),
                (word("b"), 2, 1),
                (quoted("x\r\ny"), 2, 3),
                (TokenKind::Semi, 3, 3),
            ]
        );
    }

    #[test]
    fn empty_and_blank_inputs() {
        assert!(lex("").is_empty());
        assert!(lex(" \t\r\n\n# c\n").is_empty());
    }
}
