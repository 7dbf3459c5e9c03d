//! A keyed limiter's table: `u64` key → `u64` state (a GCRA arrival time), for keys that are
//! already hashes (of a user ID, a client address).
//!
//! Open addressing with linear probing over 16-byte slots that hold the key itself, so a
//! look-up reads the slot it lands on and, at this load, rarely its neighbour: one cache line,
//! where a table of separate control bytes and slots (hashbrown's, `std`'s) reads two. With
//! many users each seen now and then (a per-user limit on a busy night) nearly every look-up
//! misses the cache, so the lines read are the cost. The table is at most half full, which
//! keeps a look-up of an absent key (a user's first request in a while, the common case) to
//! about two slots.
//!
//! A slot's home is taken from the key mixed with a random seed chosen per store: keys are
//! hashes of what clients send, and with a mapping known in advance a client could pick user
//! IDs whose hashes share a home, making every look-up walk one long run of slots while the
//! shard's lock is held.
//!
//! Keys are removed only by [`KeyTable::drop_at_or_below`], in one pass that moves each
//! survivor back along its probe path, so no tombstones are needed.

use std::ops::Range;

/// A key of 0 marks an empty slot; key 0 itself is kept beside the slots.
const EMPTY: u64 = 0;

/// Slots of the smallest allocated table.
const MIN_SLOTS: usize = 8;

#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(16))]
struct Slot {
    key: u64,
    val: u64,
}

#[derive(Debug)]
pub(super) struct KeyTable {
    /// A power of two of slots, or none before the first insert.
    slots: Box<[Slot]>,
    /// Keys, key 0 included.
    len: usize,
    /// Key 0's value.
    zero: Option<u64>,
    /// `64 - log2(slots.len())`: a home is the mixed key's top bits.
    shift: u32,
    /// Random, the same for the table's life (its slots are placed by it).
    seed: u64,
}

pub(super) enum Entry<'a> {
    Occupied(&'a mut u64),
    Vacant(VacantEntry<'a>),
}

pub(super) struct VacantEntry<'a> {
    table: &'a mut KeyTable,
    key: u64,
    at: usize,
}

impl KeyTable {
    /// An empty table (nothing allocated) placing keys by `seed`.
    pub(super) fn new(seed: u64) -> Self {
        Self {
            slots: Box::new([]),
            len: 0,
            zero: None,
            shift: 64,
            seed,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keys the table holds before it grows.
    pub(super) fn capacity(&self) -> usize {
        self.slots.len() / 2
    }

    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        home_of(key, self.seed, self.shift)
    }

    /// Where `key` is (`Ok`) or would go (`Err`); `Err(0)` in a table with no slots.
    #[inline(always)]
    fn find(&self, key: u64) -> Result<usize, usize> {
        if self.slots.is_empty() {
            return Err(0);
        }
        probe(&self.slots, self.home(key), key)
    }

    #[inline(always)]
    pub(super) fn get(&self, key: u64) -> Option<u64> {
        if key == EMPTY {
            return self.zero;
        }
        self.find(key).ok().map(|i| self.slots[i].val)
    }

    #[inline(always)]
    pub(super) fn entry(&mut self, key: u64) -> Entry<'_> {
        if key == EMPTY {
            return match self.zero {
                Some(ref mut v) => Entry::Occupied(v),
                None => Entry::Vacant(VacantEntry {
                    table: self,
                    key,
                    at: 0,
                }),
            };
        }
        match self.find(key) {
            Ok(i) => Entry::Occupied(&mut self.slots[i].val),
            Err(at) => Entry::Vacant(VacantEntry {
                table: self,
                key,
                at,
            }),
        }
    }

    pub(super) fn insert(&mut self, key: u64, val: u64) {
        match self.entry(key) {
            Entry::Occupied(v) => *v = val,
            Entry::Vacant(e) => e.insert(val),
        }
    }

    /// Drop every key whose value is at or below `drop_below`; returns how many stay.
    ///
    /// One pass, in slot order from a slot that was empty (no run of slots crosses it). A key
    /// after a slot this pass emptied in its run is taken out and put back at the first
    /// empty slot of its probe path, which is where it was or earlier; the runs before it
    /// are already whole, so every key stays reachable from its home. A key with no such
    /// slot before it in its run stays where it is, unwritten.
    pub(super) fn drop_at_or_below(&mut self, drop_below: u64) -> usize {
        if self.zero.is_some_and(|v| v <= drop_below) {
            self.zero = None;
            self.len -= 1;
        }
        if self.len == usize::from(self.zero.is_some()) {
            return self.len;
        }
        let Some(start) = self.slots.iter().position(|s| s.key == EMPTY) else {
            return self.len;
        };
        // From the empty slot to the end, then round from the start: two plain loops, no
        // wrapped index (most slots are read and passed over).
        let hole = self.drop_in(start + 1..self.slots.len(), drop_below, false);
        self.drop_in(0..start, drop_below, hole);
        self.len
    }

    /// [`KeyTable::drop_at_or_below`] over the slots `range`, `hole` saying whether a slot of
    /// the run reaching into it was emptied; returns the same for the run reaching out of it.
    #[inline(always)]
    fn drop_in(&mut self, range: Range<usize>, drop_below: u64, mut hole: bool) -> bool {
        let (seed, shift) = (self.seed, self.shift);
        let slots = &mut *self.slots;
        let (mut i, end) = (range.start, range.end);
        let mut dropped = 0;
        loop {
            // Outside a run with a hole, the slots up to the next key to drop are read and
            // passed over (most of them): a plain scan.
            if !hole {
                let next = slots[i..end]
                    .iter()
                    .position(|s| s.key != EMPTY && s.val <= drop_below);
                match next {
                    Some(n) => i += n,
                    None => break,
                }
            }
            if i == end {
                break;
            }
            let slot = slots[i];
            i += 1;
            if slot.key == EMPTY {
                hole = false;
                continue;
            }
            slots[i - 1] = Slot::default();
            hole = true;
            if slot.val <= drop_below {
                dropped += 1;
                continue;
            }
            let at = probe(slots, home_of(slot.key, seed, shift), slot.key).unwrap_err();
            slots[at] = slot;
        }
        self.len -= dropped;
        hole
    }

    /// Reallocate for `keys` keys (at least those it holds), nothing when `keys` is 0 and it
    /// is empty.
    pub(super) fn shrink_to(&mut self, keys: usize) {
        let keys = keys.max(self.len);
        let slots = match keys {
            0 => 0,
            n => (n * 2).next_power_of_two().max(MIN_SLOTS),
        };
        if slots < self.slots.len() {
            self.rebuild(slots);
        }
    }

    fn grow(&mut self) {
        self.rebuild((self.slots.len() * 2).max(MIN_SLOTS));
    }

    fn rebuild(&mut self, slots: usize) {
        let old = std::mem::replace(&mut self.slots, vec![Slot::default(); slots].into());
        self.shift = match slots {
            0 => 64,
            n => 64 - n.trailing_zeros(),
        };
        for s in old.iter().filter(|s| s.key != EMPTY) {
            let at = self.find(s.key).unwrap_err();
            self.slots[at] = *s;
        }
    }

    /// The keys and values, in slot order.
    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        (self.slots.iter())
            .filter(|s| s.key != EMPTY)
            .map(|s| (s.key, s.val))
            .chain(self.zero.map(|v| (EMPTY, v)))
    }

    /// Slots a look-up of `key` reads.
    #[cfg(test)]
    fn probes(&self, key: u64) -> usize {
        let (Ok(at) | Err(at)) = self.find(key);
        ((at.wrapping_sub(self.home(key))) & (self.slots.len() - 1)) + 1
    }
}

impl VacantEntry<'_> {
    #[inline(always)]
    pub(super) fn insert(self, val: u64) {
        let t = self.table;
        t.len += 1;
        if self.key == EMPTY {
            t.zero = Some(val);
            return;
        }
        let at = match t.len * 2 > t.slots.len() {
            true => {
                t.grow();
                t.find(self.key).unwrap_err()
            }
            false => self.at,
        };
        t.slots[at] = Slot { key: self.key, val };
    }
}

/// The slot `key` is placed from in a table of `2^(64 - shift)` slots seeded by `seed`.
/// `shift` is 64 (an overlong shift) only while there are no slots, and no home is asked
/// for then.
#[inline(always)]
fn home_of(key: u64, seed: u64, shift: u32) -> usize {
    (mix(key ^ seed) >> shift) as usize
}

/// Where `key` is (`Ok`) or would go (`Err`) in `slots`, from `home` on.
#[inline(always)]
fn probe(slots: &[Slot], home: usize, key: u64) -> Result<usize, usize> {
    let mask = slots.len() - 1;
    let mut i = home;
    // Ends: the table is at most half full, so a run of slots ends in an empty one.
    loop {
        let k = slots[i].key;
        if k == key {
            return Ok(i);
        }
        if k == EMPTY {
            return Err(i);
        }
        i = (i + 1) & mask;
    }
}

/// SplitMix64's finalizer (Stafford's variant 13) less its last step, which only stirs the
/// low bits: every bit of the input moves about half of the top bits a home is read from.
/// Not a linear map (a multiply, or a folded one, is nearly linear in a key's low bits, so
/// keys an attacker picks to be close stay close under any seed).
#[inline(always)]
fn mix(x: u64) -> u64 {
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Update(u64, u64),
        Get(u64),
        Drop(u64),
        Shrink(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few keys (so they meet) and the edges: 0 (kept beside the slots), the largest.
        let key = prop_oneof![0..64u64, Just(u64::MAX), any::<u64>()];
        prop_oneof![
            (key.clone(), 1..100u64).prop_map(|(k, v)| Op::Insert(k, v)),
            (key.clone(), 1..100u64).prop_map(|(k, v)| Op::Update(k, v)),
            key.prop_map(Op::Get),
            (0..100u64).prop_map(Op::Drop),
            (0..80usize).prop_map(Op::Shrink),
        ]
    }

    proptest! {
        /// Any sequence of operations leaves the table holding what a `HashMap` holds.
        #[test]
        fn behaves_as_a_map(seed in any::<u64>(), ops in prop::collection::vec(op(), 0..400)) {
            let mut t = KeyTable::new(seed);
            let mut m: HashMap<u64, u64> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        t.insert(k, v);
                        m.insert(k, v);
                    }
                    Op::Update(k, v) => {
                        match t.entry(k) {
                            Entry::Occupied(x) => *x += v,
                            Entry::Vacant(e) => e.insert(v),
                        }
                        *m.entry(k).or_default() += v;
                    }
                    Op::Get(k) => prop_assert_eq!(t.get(k), m.get(&k).copied()),
                    Op::Drop(below) => {
                        m.retain(|_, v| *v > below);
                        prop_assert_eq!(t.drop_at_or_below(below), m.len());
                    }
                    Op::Shrink(keys) => t.shrink_to(keys),
                }
                prop_assert_eq!(t.len(), m.len());
                prop_assert_eq!(t.iter().count(), t.len());
                let in_slots = t.len() - usize::from(t.zero.is_some());
                prop_assert!(in_slots * 2 <= t.slots.len(), "at most half full");
            }
            let got: HashMap<u64, u64> = t.iter().collect();
            prop_assert_eq!(got, m.clone());
            for (k, v) in &m {
                prop_assert_eq!(t.get(*k), Some(*v));
            }
        }
    }

    /// Keys picked to share a home under a mapping an attacker could know (the key's low
    /// bits; this table's mapping with the seed fixed, found by trying keys as a client would
    /// try user IDs) are spread by the table's random seed: no long runs of slots to walk.
    #[test]
    fn keys_chosen_to_collide_do_not_pile_up() {
        let known = KeyTable::new(0);
        // Keys whose folded product's top 12 bits are zero: home 0 in a table of up to 4,096
        // slots under seed 0.
        let crafted = (1..u64::MAX)
            .filter(|&k| mix(k ^ known.seed) >> 52 == 0)
            .take(500)
            .collect::<Vec<_>>();
        let shared_low_bits = (1..=10_000u64).map(|i| i << 40).collect::<Vec<_>>();
        for (what, keys) in [("crafted", crafted), ("low bits", shared_low_bits)] {
            let mut t = KeyTable::new(rand::random());
            for &k in &keys {
                t.insert(k, 1);
            }
            let probes: Vec<usize> = keys.iter().map(|&k| t.probes(k)).collect();
            let mean = probes.iter().sum::<usize>() as f64 / probes.len() as f64;
            let max = probes.iter().max().copied().unwrap_or(0);
            assert!(
                mean < 3.0 && max < 64,
                "{what}: mean {mean:.1}, longest {max} slots"
            );
        }
    }

    #[test]
    fn an_emptied_table_gives_its_memory_back() {
        let mut t = KeyTable::new(7);
        for k in 1..=1000 {
            t.insert(k, k);
        }
        assert!(t.capacity() >= 1000);
        assert_eq!(t.drop_at_or_below(1000), 0);
        t.shrink_to(0);
        assert_eq!((t.capacity(), t.slots.len()), (0, 0));
        t.insert(5, 5);
        assert_eq!((t.get(5), t.capacity()), (Some(5), MIN_SLOTS / 2));
    }
}
