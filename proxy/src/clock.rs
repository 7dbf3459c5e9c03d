//! The request path's clock: one for the request's timings, its limits and its breaker.
//!
//! A [`Stamp`] is nanoseconds since the first reading in the process, on quanta's clock (the
//! TSC, scaled): a reading is about 20 instructions and an interval a subtraction. A
//! `std::time::Instant` costs a `clock_gettime` per reading and a `timespec` difference made
//! nanoseconds (about 37 instructions) per interval, and a request took four readings and
//! two intervals of it. The limiters read the same clock ([`limiter_clock`]), so a request's
//! start is also its limits' time.
//!
//! Timers (tokio's deadlines) keep tokio's clock; nothing here is compared with it.

use std::sync::OnceLock;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, QuantaInstant, Reference};
use governor::nanos::Nanos;

/// A reading of the request path's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(u64);

impl Stamp {
    /// Now.
    #[inline]
    pub fn now() -> Self {
        let (clock, epoch) = clock_and_epoch();
        Self(u64::from(clock.now().duration_since(*epoch)))
    }

    /// Nanoseconds since the process's first reading (the breakers' time).
    pub fn nanos(self) -> u64 {
        self.0
    }

    /// The time from `self` to `later` (zero if `later` is earlier).
    pub fn until(self, later: Stamp) -> Duration {
        Duration::from_nanos(later.0.saturating_sub(self.0))
    }

    /// The time since `self`.
    pub fn elapsed(self) -> Duration {
        self.until(Self::now())
    }

    /// This reading as an instant of [`limiter_clock`].
    pub fn limiter_instant(self) -> QuantaInstant {
        clock_and_epoch().1 + Nanos::from(self.0)
    }
}

/// The clock of every limiter in the process: one, so that a limiter kept over a reload and
/// a new one read the same time, and a request's [`Stamp`] is their time too.
pub(crate) fn limiter_clock() -> &'static DefaultClock {
    &clock_and_epoch().0
}

/// [`limiter_clock`] and its first reading (the zero of [`Stamp`]): one lazily made static,
/// so that a reading costs one check that it is made, not two.
fn clock_and_epoch() -> &'static (DefaultClock, QuantaInstant) {
    static CLOCK: OnceLock<(DefaultClock, QuantaInstant)> = OnceLock::new();
    CLOCK.get_or_init(|| {
        let clock = DefaultClock::default();
        let epoch = clock.now();
        (clock, epoch)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_is_the_limiters_time() {
        let before = limiter_clock().now();
        let s = Stamp::now();
        let after = limiter_clock().now();
        let at = s.limiter_instant();
        assert!(
            before <= at && at <= after,
            "{before:?} <= {at:?} <= {after:?}"
        );
    }

    #[test]
    fn intervals_follow_the_wall_clock() {
        // Within 5 ms of std's measure of the same sleep (the readings are not at the same
        // instants, and the TSC's scale is calibrated). A thread descheduled between two
        // readings on a loaded machine spoils one try, not all of them; a wrong clock does.
        let diffs: Vec<Duration> = (0..5)
            .map(|_| {
                let s = Stamp::now();
                let std = std::time::Instant::now();
                std::thread::sleep(Duration::from_millis(20));
                let (ours, theirs) = (s.elapsed(), std.elapsed());
                ours.abs_diff(theirs)
            })
            .collect();
        assert!(
            diffs.iter().any(|d| *d < Duration::from_millis(5)),
            "{diffs:?}"
        );
        assert_eq!(
            Stamp::now().until(Stamp(0)),
            Duration::ZERO,
            "an earlier stamp is zero"
        );
    }
}
