//! sluice: a Layer-4 (TCP and UDP) reverse proxy, port forwarder and load balancer
//! on a hand-rolled `mio` event loop.
//!
//! The crate is the proxy; `main.rs` only turns a command line into a [`config::Config`]
//! and hands it to [`runtime::Proxy`]. Tests and `bench/` drive the same API in-process.

pub mod config;
pub mod logging;
pub mod runtime;
pub mod sys;
pub mod tcp;
pub mod udp;
pub mod upstream;

#[cfg(test)]
mod testing;
