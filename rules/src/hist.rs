//! Log-scale latency histograms: the buckets the proxy counts request times in, and the
//! quantiles read from them (by the dashboard, plan triggers and ramp guards).

/// Buckets: exact below 4 µs, then four per power of two of microseconds, up to ~268 s.
pub const LAT_BUCKETS: usize = 112;

/// The bucket of a latency in microseconds: exact below 4 µs, then four buckets per power of
/// two (each about 19% wide).
pub fn lat_bucket(us: u64) -> usize {
    if us < 4 {
        return us as usize;
    }
    let msb = 63 - us.leading_zeros() as usize;
    let sub = ((us >> (msb - 2)) & 3) as usize;
    ((msb - 1) * 4 + sub).min(LAT_BUCKETS - 1)
}

/// The smallest latency (µs) in a bucket.
pub fn lat_bucket_low(idx: usize) -> u64 {
    if idx < 4 {
        return idx as u64;
    }
    let msb = idx / 4 + 1;
    (4 + (idx % 4) as u64) << (msb - 2)
}

/// The `q` quantile (0..1) of a histogram, in milliseconds (the bucket's midpoint), or
/// `None` when it is empty.
pub fn quantile_ms<C: Copy + Into<u64>>(h: &[C; LAT_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = h.iter().map(|&c| c.into()).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0u64;
    for (i, &c) in h.iter().enumerate() {
        seen += c.into();
        if seen >= rank {
            let lo = lat_bucket_low(i) as f64;
            let hi = lat_bucket_low(i + 1) as f64;
            return Some((lo + hi) / 2.0 / 1000.0);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every latency lands in the bucket whose range holds it, and buckets are contiguous.
    #[test]
    fn latency_buckets_hold_their_values() {
        for us in (0..5000u64).chain([65_535, 1_000_000, 60_000_000]) {
            let b = lat_bucket(us);
            assert!(lat_bucket_low(b) <= us, "{us} µs below bucket {b}");
            assert!(us < lat_bucket_low(b + 1), "{us} µs above bucket {b}");
        }
        for b in 0..LAT_BUCKETS - 1 {
            assert_eq!(lat_bucket(lat_bucket_low(b)), b);
        }
        assert_eq!(lat_bucket(u64::MAX), LAT_BUCKETS - 1);
    }

    /// p50 and p99 of a known distribution are within one bucket (±19%) of the truth.
    #[test]
    fn quantiles_within_a_bucket() {
        let mut h = [0u64; LAT_BUCKETS];
        for i in 1..=1000u64 {
            h[lat_bucket(i * 100)] += 1; // 0.1 ms .. 100 ms, uniform
        }
        let p50 = quantile_ms(&h, 0.5).unwrap();
        let p99 = quantile_ms(&h, 0.99).unwrap();
        assert!((p50 - 50.0).abs() / 50.0 < 0.2, "p50 {p50}");
        assert!((p99 - 99.0).abs() / 99.0 < 0.2, "p99 {p99}");
        assert_eq!(quantile_ms(&[0u32; LAT_BUCKETS], 0.5), None);
    }
}
