//! The mapping between `mio::Token`s and what they name.
//!
//! A token is `tag (4 bits) | generation (16 bits) | index (44 bits)` (on 32-bit targets the
//! generation gets 6 bits and the index 22). The tag says what kind of
//! thing it names; the index is a slot (a TCP pair owns two tokens, `key << 1 | side`, so one slab
//! key serves both of its sockets); the generation is the slot's owner's. This is the one
//! stale-event guard of the worker: a part acts on an event only when the slot's current owner
//! has the generation the token carries, so a slot freed and reused within one batch of events
//! is never mistaken for its new owner, and slots can be freed at once.

use mio::Token;

const TAG_SHIFT: u32 = usize::BITS - 4;
/// Fewer on 32-bit targets, where the index needs the room.
const GEN_BITS: u32 = if usize::BITS >= 64 { 16 } else { 6 };
const GEN_MASK: usize = (1 << GEN_BITS) - 1;
const GEN_SHIFT: u32 = TAG_SHIFT - GEN_BITS;
const INDEX_MASK: usize = (1 << GEN_SHIFT) - 1;

/// The largest index a token can name; a part refuses a slot beyond it rather than alias one.
pub const MAX_INDEX: usize = INDEX_MASK;

const TAG_PAIR: usize = 0;
const TAG_LISTENER: usize = 1;
const TAG_UDP_LISTENER: usize = 2;
const TAG_UDP_SESSION: usize = 3;
const TAG_PROBE: usize = 4;
const TAG_ADMIN_LISTENER: usize = 5;
const TAG_ADMIN: usize = 6;
const TAG_SPARE: usize = 7;
const TAG_WAKER: usize = 15;

/// A slot's owner's generation. It wraps (at 65,536, or 64 on 32-bit targets): a stale event
/// would need that many owners of one slot within one batch of events to be mistaken, and the
/// timers of freed owners are cancelled.
pub type Gen = u16;

/// The generation after `gen`, wrapping at what a token carries.
pub fn next_gen(gen: Gen) -> Gen {
    ((usize::from(gen) + 1) & GEN_MASK) as Gen
}

/// A slot and the generation of its owner: what tokens and timers name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub index: usize,
    pub gen: Gen,
}

impl Key {
    pub fn new(index: usize, gen: Gen) -> Key {
        Key { index, gen }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Waker,
    Listener(usize),
    /// A pair's socket: the pair's key and which of its two sockets (0 or 1).
    Pair(Key, usize),
    UdpListener(usize),
    UdpSession(Key),
    Probe(Key),
    AdminListener,
    /// An admin endpoint's connection.
    Admin(Key),
    /// A pre-connected spare (`pool`).
    Spare(Key),
    Unknown,
}

fn make(tag: usize, index: usize, gen: Gen) -> Token {
    Token(tag << TAG_SHIFT | (usize::from(gen) & GEN_MASK) << GEN_SHIFT | (index & INDEX_MASK))
}

pub fn waker() -> Token {
    make(TAG_WAKER, 0, 0)
}

pub fn listener(i: usize) -> Token {
    make(TAG_LISTENER, i, 0)
}

/// Socket `half` (0 or 1) of the pair in slot `key`.
pub fn pair(key: Key, half: usize) -> Token {
    make(TAG_PAIR, key.index << 1 | (half & 1), key.gen)
}

pub fn udp_listener(i: usize) -> Token {
    make(TAG_UDP_LISTENER, i, 0)
}

pub fn udp_session(key: Key) -> Token {
    make(TAG_UDP_SESSION, key.index, key.gen)
}

pub fn probe(key: Key) -> Token {
    make(TAG_PROBE, key.index, key.gen)
}

pub fn admin_listener() -> Token {
    make(TAG_ADMIN_LISTENER, 0, 0)
}

pub fn admin(key: Key) -> Token {
    make(TAG_ADMIN, key.index, key.gen)
}

pub fn spare(key: Key) -> Token {
    make(TAG_SPARE, key.index, key.gen)
}

pub fn decode(token: Token) -> Target {
    let index = token.0 & INDEX_MASK;
    let gen = ((token.0 >> GEN_SHIFT) & GEN_MASK) as Gen;
    let key = Key::new(index, gen);
    match token.0 >> TAG_SHIFT {
        TAG_PAIR => Target::Pair(Key::new(index >> 1, gen), index & 1),
        TAG_LISTENER => Target::Listener(index),
        TAG_UDP_LISTENER => Target::UdpListener(index),
        TAG_UDP_SESSION => Target::UdpSession(key),
        TAG_PROBE => Target::Probe(key),
        TAG_ADMIN_LISTENER => Target::AdminListener,
        TAG_ADMIN => Target::Admin(key),
        TAG_SPARE => Target::Spare(key),
        TAG_WAKER => Target::Waker,
        _ => Target::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for index in [0usize, 1, 7, 1 << 20, (1 << 40) - 1] {
            for gen in [0, 1, 0x7fff, Gen::MAX] {
                let key = Key::new(index, gen);
                assert_eq!(decode(pair(key, 0)), Target::Pair(key, 0));
                assert_eq!(decode(pair(key, 1)), Target::Pair(key, 1));
                assert_eq!(decode(udp_session(key)), Target::UdpSession(key));
                assert_eq!(decode(probe(key)), Target::Probe(key));
                assert_eq!(decode(admin(key)), Target::Admin(key));
                assert_eq!(decode(spare(key)), Target::Spare(key));
            }
            assert_eq!(decode(listener(index)), Target::Listener(index));
            assert_eq!(decode(udp_listener(index)), Target::UdpListener(index));
        }
        assert_eq!(decode(waker()), Target::Waker);
        assert_eq!(decode(admin_listener()), Target::AdminListener);
        assert_eq!(decode(Token(9 << TAG_SHIFT)), Target::Unknown);
    }

    #[test]
    fn generations_wrap_at_what_a_token_carries() {
        let mut gen = 0;
        for _ in 0..=GEN_MASK {
            gen = next_gen(gen);
        }
        assert_eq!(gen, 0);
        let key = Key::new(3, next_gen(GEN_MASK as Gen - 1));
        assert_eq!(decode(probe(key)), Target::Probe(key));
    }

    #[test]
    fn generations_tell_owners_of_one_slot_apart() {
        let old = pair(Key::new(5, 1), 1);
        let new = pair(Key::new(5, 2), 1);
        assert_ne!(old, new);
        assert_eq!(decode(old), Target::Pair(Key::new(5, 1), 1));
    }
}
