//! The one table of directives: which context each belongs to, whether it may repeat in a
//! block, what it takes, and which protocol a listen directive is for. The parser's checks
//! (unknown name, wrong context, duplicate, wrong protocol), its "did you mean" suggestions and
//! `-t` all read it, so a new directive is one line here and one arm in its context's handler.

use crate::config::Proto;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Context {
    Main,
    Upstream,
    Listen,
    Admin,
}

impl Context {
    pub(super) const ALL: [Context; 4] = [
        Context::Main,
        Context::Upstream,
        Context::Listen,
        Context::Admin,
    ];

    pub(super) fn place(self) -> &'static str {
        match self {
            Context::Main => "the main context",
            Context::Upstream => "an upstream block",
            Context::Listen => "a listen block",
            Context::Admin => "an admin block",
        }
    }

    /// The names of this context's directives, in table order.
    pub(super) fn names(self) -> impl Iterator<Item = &'static str> {
        DIRECTIVES
            .iter()
            .filter(move |d| d.context == self)
            .map(|d| d.name)
    }
}

pub(super) struct Directive {
    pub(super) name: &'static str,
    pub(super) context: Context,
    /// May appear more than once in one block.
    pub(super) repeatable: bool,
    /// What its value is, as "expected X after 'name'" says it (blocks and option lists say
    /// what they expect themselves).
    pub(super) takes: &'static str,
    /// A listen directive that means something to one protocol only.
    pub(super) proto: Option<Proto>,
}

const fn once(name: &'static str, context: Context, takes: &'static str) -> Directive {
    Directive {
        name,
        context,
        repeatable: false,
        takes,
        proto: None,
    }
}

const fn many(name: &'static str, context: Context) -> Directive {
    Directive {
        repeatable: true,
        ..once(name, context, "")
    }
}

const fn only(proto: Proto, d: Directive) -> Directive {
    Directive {
        proto: Some(proto),
        ..d
    }
}

use Context::{Admin, Listen, Main, Upstream};

pub(super) const DIRECTIVES: &[Directive] = &[
    once("workers", Main, "a number or 'auto'"),
    once("max_connections", Main, "a number"),
    once("buffer_size", Main, "a size"),
    once("buffer_memory", Main, "a size"),
    once("busy_poll", Main, "'off' or a duration"),
    once("shutdown_timeout", Main, "a duration"),
    once("log_level", Main, "a log level"),
    once("access_log", Main, "'on' or 'off'"),
    many("upstream", Main),
    many("listen", Main),
    once("admin", Main, "an address"),
    many("allow", Main),
    many("deny", Main),
    once("per_ip_table_size", Main, "a number"),
    once("resolver", Main, "a nameserver address"),
    once("splice_pipe_size", Main, "a size"),
    once("max_pipes", Main, "a number"),
    many("allow", Admin),
    once("balance", Upstream, "a balance method"),
    many("server", Upstream),
    once("health_check", Upstream, ""),
    once("pool", Upstream, "a number of spares"),
    once("proxy", Listen, "an upstream name or an address"),
    only(Proto::Tcp, once("connect_timeout", Listen, "a duration")),
    once("idle_timeout", Listen, "a duration"),
    only(Proto::Tcp, once("half_close_timeout", Listen, "a duration")),
    only(Proto::Tcp, once("next_upstream_tries", Listen, "a number")),
    only(
        Proto::Tcp,
        once("next_upstream_timeout", Listen, "a duration"),
    ),
    only(Proto::Udp, once("udp_responses", Listen, "a number")),
    only(Proto::Udp, once("max_sessions", Listen, "a number")),
    many("allow", Listen),
    many("deny", Listen),
    only(Proto::Tcp, once("max_connections", Listen, "a number")),
    only(
        Proto::Tcp,
        once("max_connections_per_ip", Listen, "a number"),
    ),
    only(Proto::Udp, once("max_sessions_per_ip", Listen, "a number")),
    once("rate_per_ip", Listen, "a rate (e.g. 20/s)"),
    only(
        Proto::Tcp,
        once("limit_rate", Listen, "a size per second (e.g. 4m)"),
    ),
    only(Proto::Tcp, once("limit_rate_after", Listen, "a size")),
    once("proxy_protocol", Listen, "'off', 'v1' or 'v2'"),
    only(
        Proto::Udp,
        once("proxy_protocol_udp", Listen, "'first' or 'every'"),
    ),
    once("accept_proxy_protocol", Listen, "'on' or 'off'"),
    once("proxy_protocol_timeout", Listen, "a duration"),
    many("proxy_protocol_trusted", Listen),
    only(
        Proto::Tcp,
        once("so_keepalive", Listen, "'on', 'off' or IDLE:INTERVAL:COUNT"),
    ),
    only(Proto::Tcp, many("sni", Listen)),
    only(
        Proto::Tcp,
        once("sni_default", Listen, "an upstream name or an address"),
    ),
    only(Proto::Tcp, once("sni_timeout", Listen, "a duration")),
    only(Proto::Tcp, once("splice", Listen, "'auto', 'on' or 'off'")),
];

/// The directive `name` of `context`.
pub(super) fn find(context: Context, name: &str) -> Option<&'static Directive> {
    DIRECTIVES
        .iter()
        .find(|d| d.context == context && d.name == name)
}

pub(super) const SERVER_OPTIONS: &[&str] = &[
    "weight",
    "max_conns",
    "max_fails",
    "fail_timeout",
    "backup",
    "down",
    "proxy_protocol",
    "resolve",
];
pub(super) const HEALTH_CHECK_OPTIONS: &[&str] =
    &["interval", "timeout", "rise", "fall", "send", "expect"];
pub(super) const LOG_LEVELS: [(&str, log::LevelFilter); 5] = [
    ("error", log::LevelFilter::Error),
    ("warn", log::LevelFilter::Warn),
    ("info", log::LevelFilter::Info),
    ("debug", log::LevelFilter::Debug),
    ("trace", log::LevelFilter::Trace),
];
