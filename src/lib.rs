//! sluice: a Layer-4 (TCP and UDP) reverse proxy, port forwarder and load balancer
//! on a hand-rolled `mio` event loop.
//!
//! The crate is the proxy; `main.rs` only turns a command line into a [`config::Config`]
//! and hands it to [`runtime::Proxy`]. Tests and `bench/` drive the same API in-process.
//!
//! Layers, top to bottom. A module names (through `crate::`) only modules of its own layer or
//! of a layer below it, so there are no cycles; `tests/layers.rs` reads this list and checks it.
//!
//! 1. `runtime` `fuzzing`: the `Proxy` handle, the worker loop that dispatches tokens and timers;
//!    the fuzz targets' entry points
//! 2. `tcp` `udp` `health` `admin`: the I/O parts; each owns its sockets and state machines
//! 3. `part` `accounting`: what the parts share (`Ctx`, binding) and how a pair or session ends
//! 4. `upstream` `acl` `limit` `proxy_protocol` `sni`: groups, balancing and health verdicts;
//!    access rules; per-client limits; the PROXY header codec; the ClientHello reader; pure
//! 5. `metrics`: the registry of counters every worker writes and anything may read
//! 6. `reactor`: tokens, the timer wheel, readiness, `End`, `LogLimit`, `after`, `retry`
//! 7. `config` `resolver` `sys` `logging` `testing`: the typed config and the name lookups it
//!    needs, the OS calls below std, log output

// Unsafe code is refused everywhere but in `sys` (`make audit` lists each block there).
#![deny(unsafe_code)]

pub mod accounting;
pub mod acl;
pub mod admin;
pub mod config;
pub mod fuzzing;
pub mod health;
pub mod limit;
pub mod logging;
pub mod metrics;
pub mod part;
pub mod proxy_protocol;
pub mod reactor;
pub mod resolver;
pub mod runtime;
pub mod sni;
#[allow(unsafe_code)]
pub mod sys;
pub mod tcp;
pub mod udp;
pub mod upstream;

#[cfg(test)]
mod testing;
