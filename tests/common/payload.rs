//! Deterministic payloads: an xorshift byte stream, a piecewise verifier and a checksum, so
//! every byte that crosses the proxy can be checked without keeping a copy of it.

use std::io::{self, Read, Write};

/// xorshift64: a deterministic pseudo-random source for payloads and sizes.
#[derive(Debug, Clone)]
pub struct Xorshift(u64);

impl Xorshift {
    pub fn new(seed: u64) -> Xorshift {
        // Zero is the one state xorshift never leaves; mix the seed so small seeds differ a lot.
        Xorshift((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform enough in `0..n` for test sizes (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// An endless deterministic byte stream, readable in pieces of any size.
#[derive(Debug, Clone)]
pub struct PayloadStream {
    rng: Xorshift,
    carry: [u8; 8],
    carry_len: usize,
}

impl PayloadStream {
    pub fn new(seed: u64) -> PayloadStream {
        PayloadStream {
            rng: Xorshift::new(seed),
            carry: [0; 8],
            carry_len: 0,
        }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && self.carry_len > 0 {
            buf[i] = self.carry[8 - self.carry_len];
            self.carry_len -= 1;
            i += 1;
        }
        let mut chunks = buf[i..].chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            self.carry = self.rng.next_u64().to_le_bytes();
            self.carry_len = 8;
            for b in tail {
                *b = self.carry[8 - self.carry_len];
                self.carry_len -= 1;
            }
        }
    }
}

/// The first `len` bytes of the stream for `seed`.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    PayloadStream::new(seed).fill(&mut v);
    v
}

/// Checks received bytes, piece by piece, against the stream they should be.
pub struct Verifier {
    expected: PayloadStream,
    scratch: Vec<u8>,
    /// Bytes verified so far.
    pub pos: u64,
}

impl Verifier {
    pub fn new(seed: u64) -> Verifier {
        Verifier {
            expected: PayloadStream::new(seed),
            scratch: Vec::new(),
            pos: 0,
        }
    }

    /// `Err(offset)` names the first byte that differs.
    pub fn check(&mut self, data: &[u8]) -> Result<(), u64> {
        if self.scratch.len() < data.len() {
            self.scratch.resize(data.len(), 0);
        }
        let want = &mut self.scratch[..data.len()];
        self.expected.fill(want);
        if want != data {
            let i = want.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
            return Err(self.pos + i as u64);
        }
        self.pos += data.len() as u64;
        Ok(())
    }
}

/// FNV-1a, 64 bit: a cheap checksum for what a backend received.
#[derive(Debug, Clone, Copy)]
pub struct Checksum(pub u64);

impl Default for Checksum {
    fn default() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
}

impl Checksum {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn of(bytes: &[u8]) -> u64 {
        let mut c = Checksum::default();
        c.update(bytes);
        c.0
    }
}

/// Writes the first `len` bytes of the stream for `seed`.
pub fn write_payload(w: &mut impl Write, seed: u64, len: u64) -> io::Result<()> {
    let mut stream = PayloadStream::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        stream.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads until EOF and checks that exactly the first `len` bytes of the stream for `seed` came.
pub fn read_and_verify(r: &mut impl Read, seed: u64, len: u64) -> Result<(), String> {
    let mut verifier = Verifier::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(format!(
                    "read failed after {} of {} bytes: {}",
                    verifier.pos, len, e
                ))
            }
        };
        if verifier.pos + n as u64 > len {
            return Err(format!("more than the {} bytes expected arrived", len));
        }
        verifier
            .check(&buf[..n])
            .map_err(|at| format!("byte {} of {} differs", at, len))?;
    }
    if verifier.pos != len {
        return Err(format!("EOF after {} of {} bytes", verifier.pos, len));
    }
    Ok(())
}
