//! TCP proxying: the listeners, the pair state machine and its pipe, the buffer pool the pipe
//! borrows from, and the non-blocking connect that pairs and health probes share.
//!
//! [`proxy::TcpProxy`] owns everything TCP in a worker; every state change of a pair happens in
//! this module.

pub mod buffer;
pub mod connect;
pub mod listener;
pub mod pipe;
pub mod proxy;
pub mod splice;

/// One of a pair's two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    /// Which of the pair's two tokens names this side.
    pub fn half(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Server => 1,
        }
    }

    pub fn from_half(half: usize) -> Side {
        if half == 0 {
            Side::Client
        } else {
            Side::Server
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}
