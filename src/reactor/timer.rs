//! The worker's timer wheel: every timeout (connect, idle, half-close, UDP session, probe
//! interval, drain deadline) is an entry here, and the reactor sleeps until the next one.
//!
//! A hashed hierarchical wheel counting ticks (1 ms by default) since `start`: 4 levels of
//! 64 slots, level `l` slot `s` covering 64^l ticks, so the wheel spans 64^4 ticks (~4.66 h at
//! 1 ms). Deadlines in a later 64^4-tick block wait in one overflow list, re-sorted once when
//! the wheel reaches the block of its earliest entry, so deadlines of days cost nothing until
//! then. Invariants: a deadline is rounded *up* to a tick and `now` *down*, so nothing fires
//! before its deadline and nothing fires later than one tick after it once `expire` is called;
//! an entry sits at the lowest level whose slot range holds its tick and shares every higher
//! bit with `elapsed`, and between calls every occupied slot starts after `elapsed`; a level's
//! `occupied` bitmask has a bit set exactly for its non-empty slots, so the next event (slot to
//! fire or cascade, or overflow re-sort) is a few bit operations and advancing jumps straight
//! to it: an idle gap costs O(levels), never O(ticks). Entries live in one arena with intrusive
//! doubly-linked slot lists and a free list: insert and cancel are O(1) and allocate nothing
//! once the arena has grown. A key carries its node's generation, bumped on every free, so a
//! stale key (fired or cancelled) never touches the node's next owner.

use std::time::{Duration, Instant};

const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
const LEVELS: usize = 4;
/// log2 of the ticks the levels span together: deadlines further out go to the overflow list.
const WHEEL_BITS: u32 = SLOT_BITS * LEVELS as u32;
const BLOCK_MASK: u64 = (1 << WHEEL_BITS) - 1;

/// List ids index `TimerWheel::heads`: `level * SLOTS + slot` for wheel slots, then these.
const OVERFLOW: u16 = (LEVELS * SLOTS) as u16;
/// Entries already due (a past deadline, or a slot just reached); drained before advancing.
const PENDING: u16 = OVERFLOW + 1;
const LISTS: usize = PENDING as usize + 1;
/// A node on the free list, holding no value.
const FREE: u16 = u16::MAX;

const NIL: u32 = u32::MAX;
/// Far-future deadlines clamp here (2^62 ticks: ~146 million years at 1 ms), which keeps every
/// tick computation clear of `u64` overflow.
const MAX_TICK: u64 = u64::MAX >> 2;

/// Names one inserted entry. Cancelling with a key whose entry already fired or was
/// cancelled is a harmless no-op, even after its arena slot went to a new entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerKey {
    index: u32,
    generation: u32,
}

/// Values of type `T` armed to fire at deadlines; `expire` hands them back in deadline order
/// (tick by tick; entries sharing a tick come out in no particular order).
pub struct TimerWheel<T> {
    start: Instant,
    tick_nanos: u128,
    /// The tick the wheel has advanced to: every entry still in a slot is due later.
    elapsed: u64,
    nodes: Vec<Node<T>>,
    free: u32,
    heads: [u32; LISTS],
    occupied: [u64; LEVELS],
    /// A lower bound of the overflow entries' ticks (cancels leave it low; waking early is fine).
    overflow_min: u64,
    len: usize,
    /// Slots (and overflow re-sorts) processed, so tests can prove idle gaps are jumped.
    #[cfg(test)]
    steps: u64,
}

struct Node<T> {
    value: Option<T>,
    when: u64,
    prev: u32,
    next: u32,
    list: u16,
    generation: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Slot(usize, u64),
    Overflow,
}

impl<T> TimerWheel<T> {
    /// A wheel with 1 ms ticks, counting from `start`.
    pub fn new(start: Instant) -> Self {
        Self::with_tick(start, Duration::from_millis(1))
    }

    /// A wheel with the given tick (the firing precision); a zero tick is taken as 1 ns.
    pub fn with_tick(start: Instant, tick: Duration) -> Self {
        TimerWheel {
            start,
            tick_nanos: tick.as_nanos().max(1),
            elapsed: 0,
            nodes: Vec::new(),
            free: NIL,
            heads: [NIL; LISTS],
            occupied: [0; LEVELS],
            overflow_min: u64::MAX,
            len: 0,
            #[cfg(test)]
            steps: 0,
        }
    }

    /// Arms `value` to fire at `deadline`; a deadline already passed fires on the next `expire`.
    pub fn insert(&mut self, deadline: Instant, value: T) -> TimerKey {
        let when = self.deadline_tick(deadline);
        let index = self.alloc(when, value);
        self.place(index);
        self.len += 1;
        TimerKey {
            index,
            generation: self.nodes[index as usize].generation,
        }
    }

    /// Disarms an entry and hands its value back; `None` if it already fired or was cancelled.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        let node = self.nodes.get(key.index as usize)?;
        if node.generation != key.generation || node.list == FREE {
            return None;
        }
        self.unlink(key.index);
        self.release(key.index)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Time the reactor may sleep: None when empty; otherwise never later than the earliest
    /// deadline (rounded up to the tick, as that is the first instant `expire` can return it).
    /// It may be earlier, at a level boundary where entries cascade down; it is zero only when
    /// an entry or a cascade is due, so a loop that calls `expire` never spins.
    pub fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let pending = self.heads[PENDING as usize];
        let tick = if pending != NIL {
            self.nodes[pending as usize].when
        } else {
            self.next_event()?.0
        };
        let due = u128::from(tick) * self.tick_nanos;
        let passed = now.saturating_duration_since(self.start).as_nanos();
        Some(duration_from_nanos(due.saturating_sub(passed)))
    }

    /// Pops one entry whose deadline is <= `now` (never one whose deadline is later),
    /// advancing the wheel as needed. Call in a loop until `None`.
    pub fn expire(&mut self, now: Instant) -> Option<T> {
        let now_tick = self.now_tick(now);
        loop {
            let pending = self.heads[PENDING as usize];
            if pending != NIL {
                // Pending entries are due at or before `elapsed`; the check only matters when
                // a caller hands in a `now` older than an earlier one.
                if self.nodes[pending as usize].when > now_tick {
                    return None;
                }
                self.unlink(pending);
                return self.release(pending);
            }
            match self.next_event() {
                Some((tick, event)) if tick <= now_tick => self.advance(tick, event),
                _ => {
                    // Nothing is due up to `now_tick`, so the wheel can stand there; later
                    // inserts then land on the lowest level that fits them.
                    self.elapsed = self.elapsed.max(now_tick);
                    return None;
                }
            }
        }
    }

    fn deadline_tick(&self, deadline: Instant) -> u64 {
        let nanos = deadline.saturating_duration_since(self.start).as_nanos();
        clamp_tick(nanos.div_ceil(self.tick_nanos))
    }

    fn now_tick(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.start).as_nanos();
        clamp_tick(nanos / self.tick_nanos)
    }

    fn alloc(&mut self, when: u64, value: T) -> u32 {
        if self.free != NIL {
            let index = self.free;
            let node = &mut self.nodes[index as usize];
            self.free = node.next;
            node.value = Some(value);
            node.when = when;
            return index;
        }
        // A node is at least 24 bytes, so memory runs out long before 2^32 nodes.
        let index = u32::try_from(self.nodes.len())
            .ok()
            .filter(|&i| i != NIL)
            .expect("timer arena holds fewer than 2^32 entries");
        self.nodes.push(Node {
            value: Some(value),
            when,
            prev: NIL,
            next: NIL,
            list: FREE,
            generation: 0,
        });
        index
    }

    /// Puts a detached node on the list its tick calls for, relative to `elapsed`.
    fn place(&mut self, index: u32) {
        let when = self.nodes[index as usize].when;
        let list = if when <= self.elapsed {
            PENDING
        } else {
            // The highest bit where `when` and `elapsed` differ picks the level: below it they
            // share everything, so the entry belongs to the level's current rotation.
            let differ = (self.elapsed ^ when) | SLOT_MASK;
            let level = ((63 - differ.leading_zeros()) / SLOT_BITS) as usize;
            if level < LEVELS {
                let slot = (when >> (level as u32 * SLOT_BITS)) & SLOT_MASK;
                self.occupied[level] |= 1 << slot;
                (level * SLOTS) as u16 + slot as u16
            } else {
                self.overflow_min = self.overflow_min.min(when);
                OVERFLOW
            }
        };
        self.push(list, index);
    }

    fn push(&mut self, list: u16, index: u32) {
        let head = self.heads[list as usize];
        let node = &mut self.nodes[index as usize];
        node.list = list;
        node.prev = NIL;
        node.next = head;
        if head != NIL {
            self.nodes[head as usize].prev = index;
        }
        self.heads[list as usize] = index;
    }

    fn unlink(&mut self, index: u32) {
        let node = &self.nodes[index as usize];
        let (list, prev, next) = (node.list as usize, node.prev, node.next);
        if prev != NIL {
            self.nodes[prev as usize].next = next;
        } else {
            self.heads[list] = next;
            if next == NIL && list < LEVELS * SLOTS {
                self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
            }
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
    }

    /// Frees an unlinked node; the generation bump retires every key that named it.
    fn release(&mut self, index: u32) -> Option<T> {
        let node = &mut self.nodes[index as usize];
        node.generation = node.generation.wrapping_add(1);
        node.list = FREE;
        node.prev = NIL;
        node.next = self.free;
        self.free = index;
        self.len -= 1;
        node.value.take()
    }

    /// The earliest tick at which a slot must fire or cascade, or the overflow be re-sorted.
    fn next_event(&self) -> Option<(u64, Event)> {
        let mut next: Option<(u64, Event)> = None;
        for (level, &occupied) in self.occupied.iter().enumerate() {
            let shift = level as u32 * SLOT_BITS;
            let current = (self.elapsed >> shift) & SLOT_MASK;
            let ahead = occupied & (u64::MAX << current);
            if ahead == 0 {
                continue;
            }
            let slot = u64::from(ahead.trailing_zeros());
            let rotation = self.elapsed & !((1u64 << (shift + SLOT_BITS)) - 1);
            let tick = rotation + (slot << shift);
            if next.map_or(true, |(t, _)| tick < t) {
                next = Some((tick, Event::Slot(level, slot)));
            }
        }
        if self.heads[OVERFLOW as usize] != NIL {
            let next_block = (self.elapsed | BLOCK_MASK) + 1;
            let tick = (self.overflow_min & !BLOCK_MASK).max(next_block);
            if next.map_or(true, |(t, _)| tick < t) {
                next = Some((tick, Event::Overflow));
            }
        }
        next
    }

    /// Moves the wheel to `tick` and re-places the event's entries: due ones go to pending,
    /// the rest to a lower level (or back to overflow when still beyond the span).
    fn advance(&mut self, tick: u64, event: Event) {
        self.elapsed = self.elapsed.max(tick);
        #[cfg(test)]
        {
            self.steps += 1;
        }
        let list = match event {
            Event::Slot(level, slot) => {
                self.occupied[level] &= !(1 << slot);
                level * SLOTS + slot as usize
            }
            Event::Overflow => {
                self.overflow_min = u64::MAX;
                OVERFLOW as usize
            }
        };
        let mut index = std::mem::replace(&mut self.heads[list], NIL);
        while index != NIL {
            let next = self.nodes[index as usize].next;
            self.place(index);
            index = next;
        }
    }
}

fn clamp_tick(ticks: u128) -> u64 {
    u64::try_from(ticks).map_or(MAX_TICK, |t| t.min(MAX_TICK))
}

fn duration_from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(nanos / NANOS_PER_SEC) {
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::XorShift;
    use std::collections::BTreeMap;

    const MS: Duration = Duration::from_millis(1);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);

    /// A fixed point well away from `Instant`'s lower limit, so deadlines before it exist.
    fn origin() -> Instant {
        Instant::now() + HOUR
    }

    fn ticks(n: u64) -> Duration {
        MS * u32::try_from(n).unwrap()
    }

    impl<T> TimerWheel<T> {
        /// Checks every structural invariant the module doc promises.
        fn check(&self) {
            let mut seen = 0;
            for list in 0..LISTS {
                let mut prev = NIL;
                let mut index = self.heads[list];
                while index != NIL {
                    let node = &self.nodes[index as usize];
                    assert_eq!(node.list as usize, list);
                    assert_eq!(node.prev, prev);
                    assert!(node.value.is_some());
                    if list < LEVELS * SLOTS {
                        let (level, slot) = (list / SLOTS, (list % SLOTS) as u64);
                        let shift = level as u32 * SLOT_BITS;
                        assert!(node.when > self.elapsed, "slot entry not in the future");
                        assert_eq!((node.when >> shift) & SLOT_MASK, slot);
                        let above = shift + SLOT_BITS;
                        assert_eq!(node.when >> above, self.elapsed >> above);
                        let slot_start = node.when & !((1u64 << shift) - 1);
                        assert!(slot_start > self.elapsed, "occupied slot already passed");
                    } else if list == OVERFLOW as usize {
                        assert!(node.when >> WHEEL_BITS > self.elapsed >> WHEEL_BITS);
                        assert!(node.when >= self.overflow_min);
                    } else {
                        assert!(node.when <= self.elapsed);
                    }
                    seen += 1;
                    prev = index;
                    index = node.next;
                }
                if list < LEVELS * SLOTS {
                    let bit = self.occupied[list / SLOTS] >> (list % SLOTS) & 1;
                    assert_eq!(bit == 1, self.heads[list] != NIL, "bitmask out of sync");
                }
            }
            assert_eq!(seen, self.len);
            let mut free = 0;
            let mut index = self.free;
            while index != NIL {
                let node = &self.nodes[index as usize];
                assert_eq!(node.list, FREE);
                assert!(node.value.is_none());
                free += 1;
                index = node.next;
            }
            assert_eq!(seen + free, self.nodes.len());
        }
    }

    fn drain<T>(wheel: &mut TimerWheel<T>, now: Instant) -> Vec<T> {
        std::iter::from_fn(|| wheel.expire(now)).collect()
    }

    /// Ceil of `deadline - start` in ticks: the tick at which the entry may fire.
    fn tick_of(start: Instant, deadline: Instant, tick: Duration) -> u128 {
        deadline
            .saturating_duration_since(start)
            .as_nanos()
            .div_ceil(tick.as_nanos())
    }

    #[test]
    fn random_deadlines_fire_in_order_never_early() {
        let start = origin();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut wheel = TimerWheel::new(start);
        let mut deadlines = Vec::new();
        for id in 0..20_000usize {
            // Mix scales so every level and the overflow get entries; sub-tick offsets
            // exercise rounding.
            let range = [70u64, 5_000, 300_000, 20_000_000, 200_000_000][id % 5];
            let offset = Duration::from_nanos(rng.below(range * 1_000_000));
            deadlines.push(start + offset);
            wheel.insert(start + offset, id);
        }
        wheel.check();
        let mut remaining: Vec<usize> = (0..deadlines.len()).collect();
        remaining.sort_by_key(|&id| deadlines[id]);
        remaining.reverse();
        let mut now = start;
        let mut last_tick = 0;
        let mut seen = vec![false; deadlines.len()];
        while !wheel.is_empty() {
            // Sleep as told, or less, or (a busy reactor) a little longer.
            let timeout = wheel.poll_timeout(now).unwrap();
            assert!(
                timeout > Duration::ZERO,
                "nothing is due, yet timeout is zero"
            );
            let earliest = deadlines[*remaining.last().unwrap()];
            let earliest_tick = start + ticks(tick_of(start, earliest, MS) as u64);
            assert!(
                now + timeout <= earliest_tick,
                "sleeps past the earliest entry"
            );
            now += match rng.below(4) {
                0 => timeout,
                1 => Duration::from_nanos(rng.below(timeout.as_nanos() as u64) + 1),
                2 => timeout + Duration::from_nanos(rng.below(3_000_000)),
                _ => Duration::from_nanos(rng.below(600_000_000_000)),
            };
            for id in drain(&mut wheel, now) {
                assert!(deadlines[id] <= now, "fired early");
                let t = tick_of(start, deadlines[id], MS);
                assert!(t >= last_tick, "out of order");
                last_tick = t;
                assert!(!seen[id], "fired twice");
                seen[id] = true;
            }
            while remaining
                .last()
                .is_some_and(|&id| tick_of(start, deadlines[id], MS) <= last_tick)
            {
                remaining.pop();
            }
            // Whatever is left is due after the tick `now` is in: at most one tick late.
            let now_floor = now.duration_since(start).as_nanos() / MS.as_nanos();
            if let Some(&id) = remaining.last() {
                assert!(tick_of(start, deadlines[id], MS) > now_floor, "fired late");
            }
        }
        assert!(seen.iter().all(|&s| s));
        wheel.check();
    }

    #[test]
    fn random_operations_match_a_model() {
        let start = origin();
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let mut wheel = TimerWheel::new(start);
        let mut model: BTreeMap<u64, (Instant, TimerKey)> = BTreeMap::new();
        let mut retired: Vec<TimerKey> = Vec::new();
        let mut now = start;
        for id in 0..50_000u64 {
            match rng.below(10) {
                0..=4 => {
                    let scale =
                        [10u64, 1_000, 100_000, 10_000_000, 400_000_000][rng.below(5) as usize];
                    let offset = Duration::from_nanos(rng.below(scale * 1_000_000));
                    // Some deadlines land in the past.
                    let deadline = if rng.below(8) == 0 {
                        now.checked_sub(offset).unwrap_or(now)
                    } else {
                        now + offset
                    };
                    let key = wheel.insert(deadline, id);
                    model.insert(id, (deadline, key));
                }
                5 | 6 => {
                    let pick = rng.below(id + 1);
                    let victim = model.range(pick..).chain(model.iter()).next();
                    if let Some((&victim, _)) = victim {
                        let (_, key) = model.remove(&victim).unwrap();
                        assert_eq!(wheel.cancel(key), Some(victim));
                        retired.push(key);
                    }
                    if !retired.is_empty() {
                        let stale = retired[rng.below(retired.len() as u64) as usize];
                        assert_eq!(wheel.cancel(stale), None);
                    }
                }
                _ => {
                    now += Duration::from_nanos({
                        let scale = [3, 200, 30_000][rng.below(3) as usize];
                        rng.below(scale * 1_000_000)
                    });
                    let now_floor = now.duration_since(start).as_nanos() / MS.as_nanos();
                    for fired in drain(&mut wheel, now) {
                        let (deadline, key) = model.remove(&fired).expect("fired twice");
                        assert!(deadline <= now, "fired early");
                        retired.push(key);
                    }
                    for (deadline, _) in model.values() {
                        assert!(tick_of(start, *deadline, MS) > now_floor, "fired late");
                    }
                    if let Some(timeout) = wheel.poll_timeout(now) {
                        assert!(timeout > Duration::ZERO);
                    }
                }
            }
            assert_eq!(wheel.len(), model.len());
            if id % 97 == 0 {
                wheel.check();
            }
        }
        wheel.check();
    }

    #[test]
    fn cancel_before_fire_and_stale_keys() {
        let start = origin();
        let mut wheel = TimerWheel::new(start);
        let a = wheel.insert(start + 5 * MS, "a");
        let b = wheel.insert(start + 5 * MS, "b");
        assert_eq!(wheel.cancel(a), Some("a"));
        assert_eq!(wheel.cancel(a), None);
        assert_eq!(wheel.len(), 1);
        assert_eq!(drain(&mut wheel, start + 5 * MS), vec!["b"]);
        assert_eq!(wheel.cancel(b), None, "cancel after fire is a no-op");
        assert!(wheel.is_empty());
        assert_eq!(wheel.poll_timeout(start), None);

        // The freed node goes to the next insert; the old keys must not reach it.
        let c = wheel.insert(start + 9 * MS, "c");
        assert_eq!(c.index, b.index);
        assert_ne!(c, b);
        assert_eq!(wheel.cancel(b), None);
        assert_eq!(wheel.cancel(a), None);
        assert_eq!(wheel.len(), 1);
        assert_eq!(drain(&mut wheel, start + 9 * MS), vec!["c"]);

        // Keys from another wheel: out of its arena, or naming one of its free nodes.
        let mut other: TimerWheel<u8> = TimerWheel::new(start);
        assert_eq!(other.cancel(c), None);
        let (x, y) = (other.insert(start, 0), other.insert(start, 1));
        assert_eq!(other.cancel(x), Some(0));
        assert_eq!(other.cancel(y), Some(1));
        assert_eq!(other.cancel(c), None, "free node taken for a live one");
        other.check();
        wheel.check();
    }

    #[test]
    fn cancel_from_every_list() {
        let start = origin();
        let mut wheel = TimerWheel::new(start);
        let offsets = [0, 1, 63, 64, 4_095, 4_096, 262_144, 16_777_215, 16_777_216];
        let mut keys: Vec<TimerKey> = offsets
            .iter()
            .map(|&t| wheel.insert(start + ticks(t), t))
            .collect();
        keys.push(wheel.insert(start + 2 * DAY, 1 << 40));
        keys.push(wheel.insert(start - MS, 1 << 41));
        wheel.check();
        for (i, key) in keys.iter().enumerate().rev() {
            assert!(wheel.cancel(*key).is_some());
            assert_eq!(wheel.len(), i);
            wheel.check();
        }
        assert_eq!(wheel.occupied, [0; LEVELS]);
        assert_eq!(wheel.poll_timeout(start), None);
        assert_eq!(wheel.expire(start + 3 * DAY), None);
    }

    /// Deadlines on both sides of every level boundary and far past the span fire exactly at
    /// their tick, from a fresh wheel and from one sitting just below a span boundary.
    #[test]
    fn deadlines_across_every_level_and_beyond_the_span() {
        let span = 1u64 << WHEEL_BITS;
        let mut offsets = vec![
            1,
            2 * DAY.as_millis() as u64,
            2 * DAY.as_millis() as u64 + 1,
        ];
        for level in 1..=LEVELS as u32 {
            let boundary = 1u64 << (level * SLOT_BITS);
            offsets.extend([boundary - 1, boundary, boundary + 1, 3 * boundary + 7]);
        }
        offsets.extend([span * 5 + 3, span * 40]);
        offsets.sort_unstable();
        offsets.dedup();
        for base in [0, 12_345, span - 3] {
            let start = origin();
            let mut wheel = TimerWheel::new(start);
            assert_eq!(wheel.expire(start + ticks(base)), None);
            for &offset in &offsets {
                wheel.insert(start + ticks(base + offset), offset);
            }
            wheel.check();
            for &offset in &offsets {
                let due = start + ticks(base + offset);
                assert_eq!(
                    wheel.expire(due - Duration::from_nanos(1)),
                    None,
                    "{offset} early"
                );
                wheel.check();
                assert_eq!(wheel.expire(due), Some(offset));
                assert_eq!(wheel.expire(due), None);
            }
            assert!(wheel.is_empty());
            wheel.check();
        }
    }

    #[test]
    fn past_deadlines_fire_on_the_next_expire() {
        let base = origin();
        let start = base + HOUR;
        let mut wheel = TimerWheel::new(start);
        wheel.insert(base, "before start");
        assert_eq!(wheel.poll_timeout(start), Some(Duration::ZERO));
        assert_eq!(drain(&mut wheel, start), vec!["before start"]);

        let now = start + 1_000 * MS;
        wheel.insert(now + 10 * MS, "later");
        assert_eq!(wheel.expire(now), None);
        wheel.insert(now - 500 * MS, "past");
        wheel.insert(now, "now");
        assert_eq!(wheel.poll_timeout(now), Some(Duration::ZERO));
        let mut fired = drain(&mut wheel, now);
        fired.sort_unstable();
        assert_eq!(fired, vec!["now", "past"]);
        assert_eq!(wheel.poll_timeout(now), Some(10 * MS));

        // A `now` older than one already seen must still not fire anything early.
        wheel.insert(now - 500 * MS, "past again");
        assert_eq!(wheel.expire(now - 600 * MS), None);
        assert_eq!(wheel.poll_timeout(now - 600 * MS), Some(100 * MS));
        assert_eq!(drain(&mut wheel, now - 500 * MS), vec!["past again"]);
        wheel.check();
    }

    #[test]
    fn poll_timeout_is_cheap_bound_on_the_earliest_deadline() {
        let start = origin();
        let mut wheel = TimerWheel::new(start);
        assert_eq!(wheel.poll_timeout(start), None);
        wheel.insert(start + 10 * MS, 10);
        assert_eq!(wheel.poll_timeout(start), Some(10 * MS));
        assert_eq!(wheel.poll_timeout(start + MS * 7 / 2), Some(MS * 13 / 2));
        assert_eq!(wheel.poll_timeout(start + 10 * MS), Some(Duration::ZERO));
        assert_eq!(wheel.poll_timeout(start + 11 * MS), Some(Duration::ZERO));
        // An earlier insert lowers it.
        wheel.insert(start + 3 * MS, 3);
        assert_eq!(wheel.poll_timeout(start), Some(3 * MS));

        // A deadline inside a tick can fire only once that tick is reached.
        let mut wheel = TimerWheel::new(start);
        wheel.insert(start + MS * 103 / 10, ());
        assert_eq!(wheel.poll_timeout(start), Some(11 * MS));
        assert_eq!(wheel.expire(start + MS * 103 / 10), None);
        assert_eq!(wheel.poll_timeout(start + MS * 103 / 10), Some(MS * 7 / 10));
        assert_eq!(wheel.expire(start + 11 * MS), Some(()));
        assert_eq!(wheel.poll_timeout(start + 11 * MS), None);
    }

    /// Following the timeouts reaches each deadline without ever overshooting it, and with
    /// at most one wake per level plus the overflow re-sort.
    #[test]
    fn following_poll_timeout_wakes_a_few_times_per_entry() {
        for deadline in [
            1,
            100,
            5_000,
            1_000_000,
            20_000_000,
            2 * DAY.as_millis() as u64,
        ] {
            let start = origin();
            let mut wheel = TimerWheel::new(start);
            wheel.insert(start + ticks(deadline), deadline);
            let mut now = start + MS / 3;
            let mut wakes = 0;
            loop {
                let timeout = wheel.poll_timeout(now).unwrap();
                assert!(timeout > Duration::ZERO);
                now += timeout;
                assert!(now <= start + ticks(deadline));
                wakes += 1;
                if let Some(fired) = wheel.expire(now) {
                    assert_eq!(fired, deadline);
                    break;
                }
            }
            assert_eq!(now, start + ticks(deadline));
            assert!(wakes <= LEVELS + 1, "{deadline} took {wakes} wakes");
        }
    }

    #[test]
    fn coarse_tick_rounds_deadlines_up() {
        let start = origin();
        let tick = 10 * MS;
        let mut wheel = TimerWheel::with_tick(start, tick);
        wheel.insert(start + 25 * MS, "25");
        wheel.insert(start + 30 * MS, "30");
        assert_eq!(wheel.poll_timeout(start + 2 * MS), Some(28 * MS));
        assert_eq!(wheel.expire(start + 29 * MS), None);
        let mut fired = drain(&mut wheel, start + 30 * MS);
        fired.sort_unstable();
        assert_eq!(fired, vec!["25", "30"]);

        let mut zero = TimerWheel::with_tick(start, Duration::ZERO);
        zero.insert(start + Duration::from_nanos(5), ());
        assert_eq!(zero.expire(start + Duration::from_nanos(4)), None);
        assert_eq!(zero.expire(start + Duration::from_nanos(5)), Some(()));
    }

    #[test]
    fn same_deadline_entries_fire_together() {
        let start = origin();
        let mut wheel = TimerWheel::new(start);
        for id in 0..1_000 {
            wheel.insert(start + 4_000 * MS, id);
        }
        wheel.insert(start + 4_001 * MS, 1_000);
        let mut fired = drain(&mut wheel, start + 4_000 * MS);
        fired.sort_unstable();
        assert_eq!(fired, (0..1_000).collect::<Vec<_>>());
        assert_eq!(wheel.len(), 1);
    }

    #[test]
    fn long_idle_gaps_are_jumped_not_walked() {
        let start = origin();
        let mut wheel: TimerWheel<()> = TimerWheel::new(start);
        // Empty: ten hours pass in no steps at all.
        assert_eq!(wheel.expire(start + 10 * HOUR), None);
        assert_eq!(wheel.steps, 0);
        // The wheel now stands at ten hours, so a short timer goes straight to level 0.
        wheel.insert(start + 10 * HOUR + 5 * MS, ());
        assert_eq!(wheel.poll_timeout(start + 10 * HOUR), Some(5 * MS));
        assert_eq!(wheel.expire(start + 10 * HOUR + 5 * MS), Some(()));
        assert_eq!(wheel.steps, 1);

        // One entry ten hours out: an overflow re-sort plus one slot per level.
        let start = origin();
        let mut wheel = TimerWheel::new(start);
        wheel.insert(start + 10 * HOUR, "ten hours");
        assert_eq!(wheel.expire(start + 10 * HOUR - MS), None);
        assert_eq!(wheel.expire(start + 10 * HOUR), Some("ten hours"));
        assert!(wheel.steps <= LEVELS as u64 + 1, "{} steps", wheel.steps);

        // Ten idle hours with a 20-hour entry waiting: nothing to do yet.
        let mut wheel = TimerWheel::new(start);
        wheel.insert(start + 20 * HOUR, "twenty hours");
        wheel.insert(start + MS, "soon");
        assert_eq!(drain(&mut wheel, start + 10 * HOUR), vec!["soon"]);
        assert!(wheel.steps <= 2, "{} steps", wheel.steps);
        assert!(wheel.poll_timeout(start + 10 * HOUR).unwrap() > 8 * HOUR);
        assert_eq!(drain(&mut wheel, start + 20 * HOUR), vec!["twenty hours"]);
        assert!(
            wheel.steps <= 2 + LEVELS as u64 + 1,
            "{} steps",
            wheel.steps
        );
        wheel.check();
    }

    #[test]
    fn arena_is_reused() {
        let start = origin();
        let mut wheel = TimerWheel::new(start);
        let mut now = start;
        let mut fired = 0;
        for id in 0..100_000u64 {
            wheel.insert(now + ticks(id % 100 + 1), id);
            if id % 3 == 0 {
                // A timer re-armed before it fires, as an activity timeout might be.
                let key = wheel.insert(now + 50 * MS, u64::MAX);
                assert_eq!(wheel.cancel(key), Some(u64::MAX));
            }
            now += MS;
            fired += drain(&mut wheel, now).len();
        }
        fired += drain(&mut wheel, now + HOUR).len();
        assert_eq!(fired, 100_000);
        assert!(
            wheel.nodes.len() <= 102,
            "arena grew to {}",
            wheel.nodes.len()
        );
        wheel.check();
    }

    #[test]
    fn far_future_deadlines_clamp_without_overflow() {
        let start = origin();
        let mut wheel = TimerWheel::with_tick(start, Duration::from_nanos(1));
        let far = start + Duration::from_secs(u64::MAX / 4);
        let key = wheel.insert(far, "far");
        assert!(wheel.poll_timeout(start).unwrap() > DAY);
        assert_eq!(wheel.expire(start + 1_000 * DAY), None);
        assert_eq!(wheel.cancel(key), Some("far"));
        wheel.check();
    }
}
