//! The double-mean split: how much one grab takes.
//!
//! Each grab draws uniformly from `[1, 2 × remaining / remaining_count − 1]`
//! cents, so its expected value is the current mean share and every later
//! grabber still gets at least one cent; the last grab takes the remainder.
//! The draw happens once, before the grab is logged; replay reads the logged
//! amount and never draws again.

use rand::Rng;

/// Largest share the next grab may take from an envelope with
/// `remaining_cents` left for `remaining_count` grabs.
///
/// `⌊2 × remaining / count⌋ − 1`, which keeps `remaining − share ≥ count − 1`
/// (one cent for everybody after). Requires `remaining_cents ≥
/// remaining_count ≥ 1`.
pub fn max_share(remaining_cents: u64, remaining_count: u32) -> u64 {
    debug_assert!(remaining_count >= 1 && remaining_cents >= u64::from(remaining_count));
    if remaining_count <= 1 {
        return remaining_cents;
    }
    let double_mean = (u128::from(remaining_cents) * 2) / u128::from(remaining_count);
    // `double_mean ≥ 2` because remaining ≥ count, so the subtraction stays ≥ 1;
    // the min() is belt and braces for the one-cent guarantee.
    let max = u64::try_from(double_mean - 1).unwrap_or(u64::MAX);
    max.min(remaining_cents - u64::from(remaining_count - 1))
        .max(1)
}

/// Draw the next share. The last grab (`remaining_count == 1`) takes
/// everything left.
pub fn draw_share<R: Rng + ?Sized>(remaining_cents: u64, remaining_count: u32, rng: &mut R) -> u64 {
    if remaining_count <= 1 {
        return remaining_cents;
    }
    rng.random_range(1..=max_share(remaining_cents, remaining_count))
}

/// Split `total_cents` into `count` shares in grab order, as a full sequence
/// of grabs would. Used by tests and the benchmark's expectations.
pub fn split<R: Rng + ?Sized>(total_cents: u64, count: u32, rng: &mut R) -> Vec<u64> {
    let mut shares = Vec::with_capacity(count as usize);
    let mut remaining = total_cents;
    for left in (1..=count).rev() {
        let share = draw_share(remaining, left, rng);
        remaining -= share;
        shares.push(share);
    }
    shares
}

#[cfg(test)]
mod tests;
