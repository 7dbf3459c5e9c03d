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
    let l = Latency::default();
    for i in 1..=1000u64 {
        l.observe(Duration::from_micros(i * 100)); // 0.1 ms .. 100 ms, uniform
    }
    let h = l.take();
    let p50 = quantile_ms(&h, 0.5).unwrap();
    let p99 = quantile_ms(&h, 0.99).unwrap();
    assert!((p50 - 50.0).abs() / 50.0 < 0.2, "p50 {p50}");
    assert!((p99 - 99.0).abs() / 99.0 < 0.2, "p99 {p99}");
    assert_eq!(quantile_ms(&[0; LAT_BUCKETS], 0.5), None);
    // Taking resets.
    assert_eq!(l.take().iter().sum::<u32>(), 0);
}
