//! The mapping between `mio::Token`s and what they name.
//!
//! The top four bits of a token are a tag saying what kind of thing it is; the rest is an index.
//! A TCP pair owns two tokens, `key << 1 | side`, so one slab key serves both of its sockets.
//! Tokens are never reused within one event batch: the worker frees slab slots only after the
//! batch is done (see `Worker::reap`).

use mio::Token;

const TAG_SHIFT: u32 = usize::BITS - 4;
const INDEX_MASK: usize = (1 << TAG_SHIFT) - 1;

const TAG_PAIR: usize = 0;
const TAG_LISTENER: usize = 1;
const TAG_UDP_LISTENER: usize = 2;
const TAG_UDP_SESSION: usize = 3;
const TAG_PROBE: usize = 4;
const TAG_WAKER: usize = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Waker,
    Listener(usize),
    Pair(usize, Side),
    UdpListener(usize),
    UdpSession(usize),
    Probe(usize),
    Unknown,
}

fn make(tag: usize, index: usize) -> Token {
    Token(tag << TAG_SHIFT | (index & INDEX_MASK))
}

pub fn waker() -> Token {
    make(TAG_WAKER, 0)
}

pub fn listener(i: usize) -> Token {
    make(TAG_LISTENER, i)
}

pub fn pair(key: usize, side: Side) -> Token {
    let bit = match side {
        Side::Client => 0,
        Side::Server => 1,
    };
    make(TAG_PAIR, key << 1 | bit)
}

pub fn udp_listener(i: usize) -> Token {
    make(TAG_UDP_LISTENER, i)
}

pub fn udp_session(key: usize) -> Token {
    make(TAG_UDP_SESSION, key)
}

pub fn probe(key: usize) -> Token {
    make(TAG_PROBE, key)
}

pub fn decode(token: Token) -> Target {
    let index = token.0 & INDEX_MASK;
    match token.0 >> TAG_SHIFT {
        TAG_PAIR => {
            let side = if index & 1 == 0 {
                Side::Client
            } else {
                Side::Server
            };
            Target::Pair(index >> 1, side)
        }
        TAG_LISTENER => Target::Listener(index),
        TAG_UDP_LISTENER => Target::UdpListener(index),
        TAG_UDP_SESSION => Target::UdpSession(index),
        TAG_PROBE => Target::Probe(index),
        TAG_WAKER => Target::Waker,
        _ => Target::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for key in [0usize, 1, 7, 1 << 20] {
            assert_eq!(
                decode(pair(key, Side::Client)),
                Target::Pair(key, Side::Client)
            );
            assert_eq!(
                decode(pair(key, Side::Server)),
                Target::Pair(key, Side::Server)
            );
            assert_eq!(decode(listener(key)), Target::Listener(key));
            assert_eq!(decode(udp_listener(key)), Target::UdpListener(key));
            assert_eq!(decode(udp_session(key)), Target::UdpSession(key));
            assert_eq!(decode(probe(key)), Target::Probe(key));
        }
        assert_eq!(decode(waker()), Target::Waker);
        assert_eq!(decode(Token(9 << TAG_SHIFT)), Target::Unknown);
    }
}
