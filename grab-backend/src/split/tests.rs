use super::*;
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

proptest! {
    /// Any valid (total, count): exactly `count` shares, each ≥ 1 cent, summing to total.
    #[test]
    fn shares_conserve_total(count in 1u32..=10_000, extra in 0u64..=20_000_000, seed: u64) {
        let total = u64::from(count) + extra % (20_000_001 - u64::from(count));
        let mut rng = StdRng::seed_from_u64(seed);
        let shares = split(total, count, &mut rng);
        prop_assert_eq!(shares.len(), count as usize);
        prop_assert!(shares.iter().all(|&s| s >= 1));
        prop_assert_eq!(shares.iter().sum::<u64>(), total);
    }

    /// Every draw stays inside [1, max_share] and leaves a cent for everyone after.
    #[test]
    fn draw_within_bounds(count in 2u32..=10_000, extra in 0u64..=1_000_000, seed: u64) {
        let remaining = u64::from(count) + extra;
        let mut rng = StdRng::seed_from_u64(seed);
        let max = max_share(remaining, count);
        let share = draw_share(remaining, count, &mut rng);
        prop_assert!(share >= 1 && share <= max);
        prop_assert!(remaining - share >= u64::from(count - 1));
    }

    /// Tight envelopes (total == count) give everybody exactly one cent.
    #[test]
    fn one_cent_each_when_tight(count in 1u32..=2_000, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        prop_assert!(split(u64::from(count), count, &mut rng).iter().all(|&s| s == 1));
    }
}

/// Over many runs the mean of the k-th share is close to total / count for every k:
/// the double-mean rule does not favour early or late grabbers.
#[test]
fn kth_share_mean_is_fair() {
    const RUNS: u32 = 40_000;
    let mut rng = StdRng::seed_from_u64(0x6772_6162);
    for &(total, count) in &[(10_000u64, 10u32), (1_000, 7), (200_000, 50)] {
        let mut sums = vec![0u64; count as usize];
        for _ in 0..RUNS {
            for (k, s) in split(total, count, &mut rng).into_iter().enumerate() {
                sums[k] += s;
            }
        }
        let fair = total as f64 / f64::from(count);
        for (k, sum) in sums.iter().enumerate() {
            let mean = *sum as f64 / f64::from(RUNS);
            let err = (mean - fair).abs() / fair;
            // Integer flooring biases early shares down by < 1 cent; the last
            // share's spread is the widest, so 3% leaves > 4 sigma of room.
            assert!(
                err < 0.03,
                "total {total} count {count}: share {k} mean {mean:.2} vs {fair:.2}"
            );
        }
    }
}

/// Known values: 100.00 over 10 caps the first share at 19.99.
#[test]
fn max_share_examples() {
    assert_eq!(max_share(10_000, 10), 1_999);
    assert_eq!(max_share(10, 10), 1);
    assert_eq!(max_share(3, 2), 2);
    assert_eq!(max_share(500, 1), 500);
}
