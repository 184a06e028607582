//! Tokens → a validated [`Config`].
//!
//! One pass of recursive descent over the lexer's tokens, never deeper than the grammar allows
//! (main context → `upstream`/`listen` block), so nesting in the input cannot grow the stack. A
//! statement is read whole (name, arguments, terminator), then its context checks it against the
//! one directive table ([`directives`]): whether the name belongs here, whether it may repeat,
//! which protocol it is for, and what to suggest for a misspelling. Each context's handler
//! (`main.rs`, `upstream.rs`, `listen.rs`) turns the arguments into values (`values.rs`). What needs
//! the whole file (forward `proxy` references, implicit upstreams, `next_upstream_tries` that
//! defaults to the upstream's server count, `buffer_memory >= buffer_size`, proxy loops) is
//! settled in `settle.rs`. The first error stops the parse; every error names `file:line:col` of
//! the offending token, or of the place where a missing `;`, `{` or `}` belongs.
//!
//! Host names (`server host:PORT`, `proxy host:PORT`) are resolved here, once, through a resolver
//! function so that tests never touch DNS. Nothing here panics on any input: numbers use checked
//! arithmetic, slices use `get`.

mod admin;
mod directives;
mod listen;
mod main;
mod settle;
#[cfg(test)]
mod tests;
mod upstream;
mod values;

pub use values::{parse_duration, parse_size};

use super::{Config, ConfigError, Lexer, Listen, Proto, Resolver, TokenKind};
use directives::{Context, Directive};
use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;

/// Resolves `host` (not an IP literal) and `port` to addresses, at the nameservers of the
/// `resolver` given. Blocking: config load only.
type Resolve<'r> = &'r dyn Fn(&str, u16, &Resolver) -> io::Result<Vec<SocketAddr>>;

/// Parse config text; `file` is the name used in error messages. Host names are resolved now.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    parse_with(text, file, &crate::resolver::resolve)
}

/// `parse` that resolves no host name (a name is an error): for fuzzing, which must never
/// reach DNS.
pub fn parse_without_names(text: &str, file: &str) -> Result<Config, ConfigError> {
    parse_with(text, file, &|host, _, _| {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host}: names are not resolved here"),
        ))
    })
}

fn parse_with(text: &str, file: &str, resolve: Resolve<'_>) -> Result<Config, ConfigError> {
    // Editors on some systems start UTF-8 files with a byte-order mark; it is not part of the text.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parser = Parser {
        text,
        file,
        lexer: Lexer::new(text, file),
        resolve,
        config: Config::default(),
        explicit_upstreams: Vec::new(),
        upstream_names: HashMap::new(),
        listeners: Vec::new(),
        listen_lines: HashMap::new(),
        buffer_memory: None,
        first_name: Cell::new(None),
        pool_lines: HashMap::new(),
    };
    parser.main()?;
    parser.finish()
}

/// `line:col`
type Pos = (u32, u32);

/// A directive name or argument as written.
#[derive(Debug, Clone)]
struct Arg {
    /// The lexer's value: quotes removed, `\"` and `\\` decoded.
    text: String,
    line: u32,
    col: u32,
    /// Just past the argument.
    end: Pos,
    /// Source bytes, for values that decode their own escapes.
    span: Range<usize>,
}

impl Arg {
    fn pos(&self) -> Pos {
        (self.line, self.col)
    }
}

/// What ended a statement. `Close` and `Eof` mean the `;` or `{` is missing.
#[derive(Debug, Clone, Copy)]
enum Term {
    Semi(Pos),
    Open(Pos),
    Close(Pos),
    Eof(Pos),
}

impl Term {
    fn pos(self) -> Pos {
        match self {
            Term::Semi(p) | Term::Open(p) | Term::Close(p) | Term::Eof(p) => p,
        }
    }
}

/// `name arg... ;` or `name arg... {` (the block's body is read by the directive's handler).
#[derive(Debug)]
struct Stmt {
    name: Arg,
    args: Vec<Arg>,
    term: Term,
}

impl Stmt {
    fn name(&self) -> &str {
        &self.name.text
    }

    /// Where a missing `;` or `{` belongs: just past the last token of the statement.
    fn last_end(&self) -> Pos {
        self.args.last().map_or(self.name.end, |a| a.end)
    }
}

enum Item {
    Stmt(Stmt),
    Close(Pos),
    Eof(Pos),
}

/// Directives (or options) already set in one block, with the line that set them.
#[derive(Default)]
struct Seen(Vec<(String, u32)>);

/// A `listen` block whose `proxy` is resolved once the whole file is read.
struct PendingListen {
    listen: Listen,
    line: u32,
    proxy: Arg,
    /// `next_upstream_tries` as written; 0 or `None` = the upstream's server count.
    tries: Option<u32>,
    /// `sni NAME UPSTREAM;` as written, and `sni_default`.
    sni: Vec<(String, Arg)>,
    sni_default: Option<Arg>,
}

struct Parser<'a> {
    text: &'a str,
    file: &'a str,
    lexer: Lexer<'a>,
    resolve: Resolve<'a>,
    config: Config,
    /// Line of each `upstream` block so far, by index into `config.upstreams`.
    explicit_upstreams: Vec<u32>,
    /// Every upstream so far by name (explicit and implicit), so a lookup is not a scan: a file
    /// with 40,000 upstreams parses in linear time.
    upstream_names: HashMap<String, usize>,
    listeners: Vec<PendingListen>,
    /// The line of each `listen` so far, by protocol and address (port 0 excluded).
    listen_lines: HashMap<(Proto, SocketAddr), u32>,
    /// The `buffer_memory` argument, checked against `buffer_size` at the end.
    buffer_memory: Option<Arg>,
    /// The line of the first host name looked up: a `resolver` after it would come too late.
    first_name: Cell<Option<u32>>,
    /// The line of each upstream's `pool`, by name (checked against `proxy_protocol` at the end).
    pool_lines: HashMap<String, Pos>,
}

impl Parser<'_> {
    fn err(&self, pos: Pos, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.file, pos.0, pos.1, message)
    }

    fn err_at(&self, arg: &Arg, message: impl Into<String>) -> ConfigError {
        self.err(arg.pos(), message)
    }

    fn arg(&self, text: String, line: u32, col: u32) -> Arg {
        Arg {
            text,
            line,
            col,
            end: self.lexer.end(),
            span: self.lexer.span(),
        }
    }

    /// The next statement, a `}`, or the end of input.
    fn item(&mut self) -> Result<Item, ConfigError> {
        let Some(token) = self.lexer.next_token()? else {
            return Ok(Item::Eof(self.lexer.position()));
        };
        let pos = (token.line, token.col);
        let name = match token.kind {
            TokenKind::Word(s) | TokenKind::Quoted(s) => self.arg(s, token.line, token.col),
            TokenKind::Close => return Ok(Item::Close(pos)),
            TokenKind::Semi => {
                return Err(self.err(pos, "unexpected ';' (expected a directive name)"));
            }
            TokenKind::Open => {
                return Err(self.err(pos, "unexpected '{' (expected a directive name)"));
            }
        };
        let mut args = Vec::new();
        let term = loop {
            let Some(token) = self.lexer.next_token()? else {
                break Term::Eof(self.lexer.position());
            };
            let pos = (token.line, token.col);
            match token.kind {
                TokenKind::Word(s) | TokenKind::Quoted(s) => {
                    args.push(self.arg(s, token.line, token.col));
                }
                TokenKind::Semi => break Term::Semi(pos),
                TokenKind::Open => break Term::Open(pos),
                TokenKind::Close => break Term::Close(pos),
            }
        };
        Ok(Item::Stmt(Stmt { name, args, term }))
    }

    /// The one value of a directive that takes exactly one and ends with `;`.
    fn single<'s>(&self, stmt: &'s Stmt, what: &str) -> Result<&'s Arg, ConfigError> {
        let Some(first) = stmt.args.first() else {
            return Err(self.err(
                stmt.term.pos(),
                format!("expected {what} after '{}'", stmt.name()),
            ));
        };
        self.no_more(stmt, 1)?;
        self.semi(stmt)?;
        Ok(first)
    }

    fn no_more(&self, stmt: &Stmt, allowed: usize) -> Result<(), ConfigError> {
        match stmt.args.get(allowed) {
            None => Ok(()),
            Some(extra) => {
                let message = format!(
                    "unexpected argument '{}' ('{}' takes {allowed} value{})",
                    extra.text,
                    stmt.name(),
                    if allowed == 1 { "" } else { "s" }
                );
                Err(self.stray(stmt, allowed, message))
            }
        }
    }

    /// An argument the directive cannot use. When it starts a new line, the likely mistake is a
    /// missing `;` that made the next directive part of this one, so say that instead.
    fn stray(&self, stmt: &Stmt, index: usize, message: String) -> ConfigError {
        let previous_end = match index.checked_sub(1) {
            None => stmt.name.end,
            Some(i) => stmt.args.get(i).map_or(stmt.name.end, |a| a.end),
        };
        match stmt.args.get(index) {
            Some(arg) if arg.line > previous_end.0 => self.err(
                previous_end,
                format!("expected ';' after '{}'", stmt.name()),
            ),
            Some(arg) => self.err_at(arg, message),
            None => self.err(stmt.last_end(), message),
        }
    }

    fn semi(&self, stmt: &Stmt) -> Result<(), ConfigError> {
        let message = || format!("expected ';' after '{}'", stmt.name());
        match stmt.term {
            Term::Semi(_) => Ok(()),
            Term::Open(pos) => Err(self.err(pos, format!("{} (it takes no block)", message()))),
            Term::Close(_) | Term::Eof(_) => Err(self.err(stmt.last_end(), message())),
        }
    }

    fn open(&self, stmt: &Stmt) -> Result<(), ConfigError> {
        let message = format!("expected '{{' after '{}'", stmt.name());
        match stmt.term {
            Term::Open(_) => Ok(()),
            Term::Semi(pos) => Err(self.err(pos, message)),
            Term::Close(_) | Term::Eof(_) => Err(self.err(stmt.last_end(), message)),
        }
    }

    fn unclosed(&self, eof: Pos, block: &Stmt) -> ConfigError {
        self.err(
            eof,
            format!(
                "expected '}}' before end of file, to close the '{}' block opened at line {}",
                block.name(),
                block.term.pos().0
            ),
        )
    }

    fn once(&self, seen: &mut Seen, stmt: &Stmt) -> Result<(), ConfigError> {
        match seen.first(stmt.name(), stmt.name.line) {
            None => Ok(()),
            Some(line) => Err(self.err_at(
                &stmt.name,
                format!("duplicate '{}' (first set at line {line})", stmt.name()),
            )),
        }
    }

    fn unknown(&self, context: Context, name: &Arg) -> ConfigError {
        let text = name.text.as_str();
        for other in Context::ALL {
            if other != context && directives::find(other, text).is_some() {
                return self.err_at(
                    name,
                    format!(
                        "'{text}' is not allowed here (it belongs in {})",
                        other.place()
                    ),
                );
            }
        }
        let mut message = format!("unknown directive '{text}'");
        if let Some(s) = values::suggest(text, context.names()) {
            message.push_str(&format!(" (did you mean '{s}'?)"));
        }
        self.err_at(name, message)
    }

    /// Checks `stmt` against the directive table: a name of `context`, for the listener's
    /// `proto` (listen blocks), at most once in the block unless it may repeat. Returns its
    /// table entry.
    fn directive(
        &self,
        context: Context,
        stmt: &Stmt,
        seen: &mut Seen,
        proto: Option<Proto>,
    ) -> Result<&'static Directive, ConfigError> {
        let Some(d) = directives::find(context, stmt.name()) else {
            return Err(self.unknown(context, &stmt.name));
        };
        if let (Some(only), Some(proto)) = (d.proto, proto) {
            if only != proto {
                let hint = match only {
                    Proto::Udp => "write 'listen udp ADDR' for udp",
                    Proto::Tcp => "udp sessions pick one server and do not connect",
                };
                return Err(self.err_at(
                    &stmt.name,
                    format!(
                        "'{}' applies to {} listeners only (this one is {}; {hint})",
                        d.name,
                        only.as_str(),
                        proto.as_str()
                    ),
                ));
            }
        }
        if !d.repeatable {
            self.once(seen, stmt)?;
        }
        Ok(d)
    }

    fn not_one_of(&self, arg: &Arg, what: &str, names: &[&str]) -> ConfigError {
        let mut message = format!("unknown {what} '{}'", arg.text);
        match values::suggest(&arg.text, names.iter().copied()) {
            Some(s) => message.push_str(&format!(" (did you mean '{s}'?)")),
            None => message.push_str(&format!(" (expected one of: {})", names.join(", "))),
        }
        self.err_at(arg, message)
    }
}

impl Seen {
    /// Records `name` at `line`; returns the earlier line if it was already recorded.
    fn first(&mut self, name: &str, line: u32) -> Option<u32> {
        if let Some((_, first)) = self.0.iter().find(|(n, _)| n == name) {
            return Some(*first);
        }
        self.0.push((name.to_string(), line));
        None
    }
}
