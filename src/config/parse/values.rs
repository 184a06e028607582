//! Values of the config language: durations, sizes, plain numbers, and the closest known name
//! to a misspelled one. The free functions are sans-I/O and shared (`parse_duration` and
//! `parse_size` are public); the `Parser` methods add `file:line:col` to their errors.

use super::{Arg, Parser};
use crate::config::ConfigError;
use std::time::Duration;

const DURATION_HINT: &str = "expected e.g. 250ms, 10s, 5m, 2h, 1d";
const SIZE_HINT: &str = "expected e.g. 512, 16k, 4m, 1g";

pub(super) enum NumberError {
    NotANumber,
    TooLarge,
}

/// `200us 250ms 10s 5m 2h 1d`; a bare number is seconds. `None` for anything else, negative
/// numbers, or a value that does not fit in `u64` milliseconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = split_number(text);
    let millis_per_unit: u64 = match unit {
        // Only `busy_poll` needs less than a millisecond.
        "us" => return parse_number(number).ok().map(Duration::from_micros),
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    let n = parse_number(number).ok()?;
    Some(Duration::from_millis(n.checked_mul(millis_per_unit)?))
}

/// `512 16k 4m 1g` bytes (k, m, g are powers of 1024; upper case too). `None` for anything else
/// or a value that does not fit in `usize`.
pub fn parse_size(text: &str) -> Option<usize> {
    let (number, unit) = split_number(text);
    let multiplier: u64 = match unit {
        "" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        _ => return None,
    };
    let n = parse_number(number).ok()?;
    usize::try_from(n.checked_mul(multiplier)?).ok()
}

impl Parser<'_> {
    pub(super) fn duration(&self, text: &str, at: &Arg) -> Result<Duration, ConfigError> {
        parse_duration(text)
            .ok_or_else(|| self.err_at(at, format!("bad duration '{text}' ({DURATION_HINT})")))
    }

    pub(super) fn positive_duration(
        &self,
        text: &str,
        at: &Arg,
        name: &str,
    ) -> Result<Duration, ConfigError> {
        let duration = self.duration(text, at)?;
        if duration.is_zero() {
            return Err(self.err_at(at, format!("'{name}' must be greater than 0")));
        }
        Ok(duration)
    }

    pub(super) fn size(&self, at: &Arg) -> Result<usize, ConfigError> {
        parse_size(&at.text)
            .ok_or_else(|| self.err_at(at, format!("bad size '{}' ({SIZE_HINT})", at.text)))
    }

    pub(super) fn integer(
        &self,
        text: &str,
        at: &Arg,
        name: &str,
        range: (u64, u64),
    ) -> Result<u64, ConfigError> {
        let (min, max) = range;
        match parse_number(text) {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            Err(NumberError::NotANumber) => Err(self.err_at(
                at,
                format!("bad number '{text}' for '{name}' (expected a whole number)"),
            )),
            _ => Err(self.err_at(
                at,
                format!("'{name}' must be between {min} and {max}, got '{text}'"),
            )),
        }
    }

    pub(super) fn u32_value(
        &self,
        text: &str,
        at: &Arg,
        name: &str,
        min: u32,
        max: u32,
    ) -> Result<u32, ConfigError> {
        let n = self.integer(text, at, name, (min.into(), max.into()))?;
        u32::try_from(n).map_err(|_| self.err_at(at, format!("'{name}' is too large")))
    }

    pub(super) fn usize_value(
        &self,
        text: &str,
        at: &Arg,
        name: &str,
        min: usize,
    ) -> Result<usize, ConfigError> {
        let too_large = || self.err_at(at, format!("'{name}' is too large"));
        let min = u64::try_from(min).map_err(|_| too_large())?;
        let max = u64::try_from(usize::MAX).unwrap_or(u64::MAX);
        let n = self.integer(text, at, name, (min, max))?;
        usize::try_from(n).map_err(|_| too_large())
    }
}

/// Leading ASCII digits and the rest.
pub(super) fn split_number(text: &str) -> (&str, &str) {
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    match (text.get(..digits), text.get(digits..)) {
        (Some(number), Some(unit)) => (number, unit),
        _ => ("", text),
    }
}

/// Plain decimal digits only: no sign, no spaces, no `_`.
pub(super) fn parse_number(text: &str) -> Result<u64, NumberError> {
    if text.is_empty() {
        return Err(NumberError::NotANumber);
    }
    let mut n: u64 = 0;
    for b in text.bytes() {
        if !b.is_ascii_digit() {
            return Err(NumberError::NotANumber);
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(NumberError::TooLarge)?;
    }
    Ok(n)
}

/// The known name closest to `word` (ignoring ASCII case), if it is at most two edits away and
/// closer than the word is long (so `x` does not "mean" every two-letter name).
pub(super) fn suggest<'n>(word: &str, names: impl IntoIterator<Item = &'n str>) -> Option<&'n str> {
    const MAX_EDITS: usize = 2;
    let word: Vec<char> = word.to_ascii_lowercase().chars().collect();
    let mut best: Option<(usize, &str)> = None;
    for name in names {
        let candidate: Vec<char> = name.to_ascii_lowercase().chars().collect();
        if word.len().abs_diff(candidate.len()) > MAX_EDITS {
            continue;
        }
        let distance = levenshtein(&word, &candidate);
        if distance <= MAX_EDITS
            && distance < word.len()
            && best.map_or(true, |(d, _)| distance < d)
        {
            best = Some((distance, name));
        }
    }
    best.map(|(_, name)| name)
}

pub(super) fn levenshtein(a: &[char], b: &[char]) -> usize {
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitute.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}
