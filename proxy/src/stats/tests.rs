use super::*;

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
    assert_eq!(quantile_ms(&[0u32; LAT_BUCKETS], 0.5), None);
    // Taking resets.
    assert_eq!(l.take().iter().sum::<u32>(), 0);
}
