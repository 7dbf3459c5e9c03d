//! User buckets and weights: how a user is placed at one-in-a-million precision.
//!
//! `bucket(salt, key) = XXH3-64(seed 0, salt ‖ 0x00 ‖ key) mod 1_000_000`, over the exact UTF-8
//! bytes of the salt and key. The algorithm, the seed and the byte layout are part of
//! Tidegate's contract: golden vectors in the tests pin them, so no upgrade can silently move
//! users between targets. (XXH3 is specified and stable across versions and platforms; Rust's
//! `Hash` trait is not.) The modulo bias is below 2^-44 per bucket and irrelevant here.
//!
//! Weights are parts per million. A split's targets take contiguous bucket ranges in the
//! order they are listed, so growing one target's weight at the cost of a `rest` target next
//! to it only ever adds users to it: ramps are monotone.

use std::net::IpAddr;

use xxhash_rust::xxh3::{Xxh3, xxh3_64_with_seed};

use crate::model::{BucketRangeSpec, SplitTarget};

/// Buckets per split: one-in-a-million precision.
pub const BUCKETS: u32 = 1_000_000;
/// The XXH3 seed. Changing it reshuffles every user: never do.
const SEED: u64 = 0;

/// A half-open range of buckets, `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketRange {
    /// First bucket in the range.
    pub from: u32,
    /// First bucket after the range.
    pub to: u32,
}

/// A parsed weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    /// Parts per million.
    Ppm(u32),
    /// Whatever the other targets leave.
    Rest,
}

// === impl BucketRange ===

impl BucketRange {
    /// Whether `b` is in the range.
    pub fn contains(&self, b: u32) -> bool {
        self.from <= b && b < self.to
    }
}

impl From<&BucketRangeSpec> for BucketRange {
    fn from(s: &BucketRangeSpec) -> Self {
        Self {
            from: s.from_ppm,
            to: s.to_ppm,
        }
    }
}

/// The bucket of `key` under `salt`.
pub fn bucket(salt: &str, key: &str) -> u32 {
    bucket_bytes(salt, key.as_bytes())
}

/// The bucket of a client IP under `salt` (for requests with no user): the 16-byte IPv6
/// form, so an IPv4 client and its IPv4-mapped IPv6 form share a bucket.
pub fn bucket_ip(salt: &str, ip: IpAddr) -> u32 {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    bucket_bytes(salt, &v6.octets())
}

/// Longest `salt ‖ 0 ‖ key` hashed from a small stack buffer: a route name and a user ID.
const SHORT: usize = 64;

#[inline]
pub(crate) fn bucket_bytes(salt: &str, key: &[u8]) -> u32 {
    let len = salt.len() + 1 + key.len();
    let h = match len <= SHORT {
        true => {
            let mut buf = [0u8; SHORT];
            copy_short(&mut buf, salt.as_bytes());
            copy_short(&mut buf[salt.len() + 1..], key);
            xxh3_64_with_seed(&buf[..len], SEED)
        }
        false => long_hash(salt, key),
    };
    (h % u64::from(BUCKETS)) as u32
}

/// `dst[..src.len()] = src`, for the short values hashed per request (user IDs, route
/// names): up to 32 bytes as two moves that may overlap, rather than a call to `memcpy`
/// (most of such a copy's cost). Longer ones are copied as usual.
#[inline(always)]
pub(crate) fn copy_short(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    let dst = &mut dst[..n];
    match n {
        0 => {}
        1..=3 => {
            dst[0] = src[0];
            dst[n / 2] = src[n / 2];
            dst[n - 1] = src[n - 1];
        }
        4..=7 => {
            dst[..4].copy_from_slice(&src[..4]);
            dst[n - 4..].copy_from_slice(&src[n - 4..]);
        }
        8..=15 => {
            dst[..8].copy_from_slice(&src[..8]);
            dst[n - 8..].copy_from_slice(&src[n - 8..]);
        }
        16..=32 => {
            dst[..16].copy_from_slice(&src[..16]);
            dst[n - 16..].copy_from_slice(&src[n - 16..]);
        }
        _ => dst.copy_from_slice(src),
    }
}

/// [`bucket_bytes`]'s hash of a longer key: from a larger buffer, or streamed (no
/// allocation either way). Out of line, so the common case's frame stays small.
#[inline(never)]
fn long_hash(salt: &str, key: &[u8]) -> u64 {
    let len = salt.len() + 1 + key.len();
    if len <= 256 {
        let mut buf = [0u8; 256];
        buf[..salt.len()].copy_from_slice(salt.as_bytes());
        buf[salt.len() + 1..len].copy_from_slice(key);
        return xxh3_64_with_seed(&buf[..len], SEED);
    }
    let mut s = Xxh3::with_seed(SEED);
    s.update(salt.as_bytes());
    s.update(&[0]);
    s.update(key);
    s.digest()
}

/// Parse a weight: `"rest"`, or a percentage with up to four decimals (`"0.0125%"`,
/// `"5%"`, `"100%"`), exactly, with no rounding.
pub fn parse_percent(s: &str) -> Result<Weight, String> {
    let t = s.trim();
    if t == "rest" {
        return Ok(Weight::Rest);
    }
    let num = t.strip_suffix('%').ok_or_else(|| {
        format!("{s:?} is not a weight: write a percentage like \"0.0125%\", or \"rest\"")
    })?;
    let (int, frac) = num.split_once('.').unwrap_or((num, "0"));
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !digits(frac) {
        return Err(format!("{s:?} is not a percentage"));
    }
    if frac.len() > 4 {
        return Err(format!(
            "{s:?} has more than four decimals (the precision is 0.0001%, one in a million)"
        ));
    }
    let int: u64 = int
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage"))?;
    let frac_ppm: u64 = format!("{frac:0<4}")
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage"))?;
    let ppm = int.saturating_mul(10_000).saturating_add(frac_ppm);
    if ppm > u64::from(BUCKETS) {
        return Err(format!("{s:?} is more than 100%"));
    }
    Ok(Weight::Ppm(ppm as u32))
}

/// A split target's weight, or the field at fault (empty: the target itself) and why.
pub fn target_weight(t: &SplitTarget) -> Result<Weight, (&'static str, String)> {
    match (&t.weight, t.weight_ppm) {
        (Some(_), Some(_)) => Err((
            "weight_ppm",
            "give either `weight` or `weight_ppm`, not both".into(),
        )),
        (None, None) => Err(("", "missing field `weight` (or `weight_ppm`)".into())),
        (Some(w), None) => parse_percent(w).map_err(|m| ("weight", m)),
        (None, Some(p)) if p > BUCKETS => Err((
            "weight_ppm",
            format!("{p} is out of range; allowed 0..={BUCKETS}"),
        )),
        (None, Some(p)) => Ok(Weight::Ppm(p)),
    }
}

/// Turn weights into contiguous ranges in order: the upper edge (exclusive) of each target.
/// `Rest` takes `BUCKETS` minus the sum of the others. The caller has validated the sum.
pub fn edges(weights: &[Weight]) -> Vec<u32> {
    let fixed: u32 = weights
        .iter()
        .map(|w| match w {
            Weight::Ppm(p) => *p,
            Weight::Rest => 0,
        })
        .sum();
    let mut edge = 0;
    weights
        .iter()
        .map(|w| {
            edge += match w {
                Weight::Ppm(p) => *p,
                Weight::Rest => BUCKETS.saturating_sub(fixed),
            };
            edge
        })
        .collect()
}

#[cfg(test)]
mod tests;
