//! The `admin` directive: `admin ADDR;` or `admin ADDR { allow CIDR; ... }`.

use super::directives::Context;
use super::{Item, Parser, Seen, Stmt, Term};
use crate::config::{Admin, Cidr, ConfigError};

impl Parser<'_> {
    pub(super) fn admin(&mut self, stmt: &Stmt) -> Result<(), ConfigError> {
        let Some(arg) = stmt.args.first() else {
            return Err(self.err(
                stmt.term.pos(),
                "expected an address after 'admin' (e.g. admin 127.0.0.1:9901;)",
            ));
        };
        self.no_more(stmt, 1)?;
        let addr = self.listen_addr(arg)?;
        let mut allow = Vec::new();
        match stmt.term {
            Term::Semi(_) => {}
            Term::Open(_) => {
                let mut seen = Seen::default();
                loop {
                    let inner = match self.item()? {
                        Item::Stmt(inner) => inner,
                        Item::Close(_) => break,
                        Item::Eof(pos) => return Err(self.unclosed(pos, stmt)),
                    };
                    let d = self.directive(Context::Admin, &inner, &mut seen, None)?;
                    match d.name {
                        "allow" => {
                            let range =
                                self.single(&inner, "an address range (e.g. 10.0.0.0/8)")?;
                            let cidr =
                                Cidr::parse(&range.text).map_err(|e| self.err_at(range, e))?;
                            allow.push(cidr);
                        }
                        _ => return Err(self.unknown(Context::Admin, &inner.name)),
                    }
                }
            }
            Term::Close(_) | Term::Eof(_) => {
                return Err(self.err(stmt.last_end(), "expected ';' or '{' after 'admin ADDR'"));
            }
        }
        if !addr.ip().is_loopback() && allow.is_empty() {
            return Err(self.err_at(
                arg,
                format!(
                    "admin {addr} is reachable from other hosts: add an allow list \
                     (admin {addr} {{ allow 10.0.0.0/8; }}) or use 127.0.0.1"
                ),
            ));
        }
        self.config.admin = Some(Admin { addr, allow });
        Ok(())
    }
}
