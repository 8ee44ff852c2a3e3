//! Jittered exponential backoff between retries.

use std::time::Duration;

/// The bounds of a jittered exponential backoff: the first retry waits about `min`,
/// each further one about twice as long, up to `max`. Each wait is drawn between half
/// the nominal delay and the whole of it, so that hosts that failed together (when etcd
/// restarted) do not retry together, and no wait is shorter than `min / 2`: a failure
/// loop is never tight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
}

/// Bounds that cannot make a backoff.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid backoff bounds {min:?}..{max:?}: the minimum must be above zero and not above the maximum"
)]
pub struct InvalidBackoff {
    /// The minimum given.
    pub min: Duration,
    /// The maximum given.
    pub max: Duration,
}

/// The retries of one loop: how many failed in a row.
#[derive(Debug)]
pub(crate) struct Retries {
    bounds: Backoff,
    failures: u32,
    rng: fastrand::Rng,
}

// === impl Backoff ===

impl Backoff {
    /// Bounds from `min` to `max`; `min` above zero and not above `max`.
    pub fn new(min: Duration, max: Duration) -> Result<Backoff, InvalidBackoff> {
        if min.is_zero() || min > max {
            return Err(InvalidBackoff { min, max });
        }
        Ok(Backoff { min, max })
    }

    /// The shortest nominal wait.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The longest wait.
    pub fn max(&self) -> Duration {
        self.max
    }

    pub(crate) fn retries(self) -> Retries {
        Retries {
            bounds: self,
            failures: 0,
            rng: fastrand::Rng::new(),
        }
    }
}

impl Default for Backoff {
    /// 200 ms to 5 s: quick enough to catch an etcd restart, slow enough not to weigh on
    /// a cluster that is down.
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

// === impl Retries ===

impl Retries {
    /// Count one more failure and return how long to wait before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let nominal = self
            .bounds
            .min
            .saturating_mul(2u32.saturating_pow(self.failures.min(31)))
            .min(self.bounds.max);
        self.failures = self.failures.saturating_add(1);
        let half = nominal / 2;
        let jitter = self
            .rng
            .u64(0..=u64::try_from(half.as_nanos()).unwrap_or(u64::MAX));
        half + Duration::from_nanos(jitter)
    }

    /// An attempt succeeded: the next failure waits about `min` again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// How many attempts failed in a row.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_jitter_up_to_the_maximum() {
        let bounds = Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).unwrap();
        let mut retries = bounds.retries();
        retries.rng = fastrand::Rng::with_seed(7);
        let nominal = [100, 200, 400, 800, 1000, 1000, 1000];
        for ms in nominal {
            let delay = retries.next_delay();
            let nominal = Duration::from_millis(ms);
            assert!(
                delay >= nominal / 2 && delay <= nominal,
                "{delay:?} not within {:?}..={nominal:?}",
                nominal / 2
            );
        }
        assert_eq!(retries.failures(), 7);
        retries.reset();
        assert!(retries.next_delay() <= Duration::from_millis(100));
        // Many failures do not overflow.
        for _ in 0..100 {
            assert!(retries.next_delay() <= Duration::from_secs(1));
        }
    }

    #[test]
    fn bounds_are_checked() {
        assert!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).is_ok());
    }
}
