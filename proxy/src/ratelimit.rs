//! `traffic.rate_limit` (SPEC §3 "Rate limits and concurrency"): a token bucket in each
//! replica's inbound, applied to every caller (the ingress included) after
//! authorization.
//!
//! The bucket holds `burst` tokens, starts full, and refills continuously at `rps`
//! tokens per second. A request (or, for tcp, a new connection) takes one token; when
//! none is left the inbound answers `rate-limited` (429 with `Retry-After`), or closes
//! the connection. Each replica has its own bucket: a service of N replicas admits up
//! to N × `rps` in total.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// `rate_limit = { rps, burst }`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second (finite, greater than 0).
    pub rps: f64,
    /// Tokens the bucket holds and starts with (at least 1).
    pub burst: u32,
}

/// One replica's bucket. Shared by all of the replica's connections.
#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Tokens as of `at`, at most `burst`.
    tokens: f64,
    at: Instant,
}

// === impl TokenBucket ===

impl TokenBucket {
    /// A full bucket as of `now`.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        TokenBucket {
            limit,
            state: Mutex::new(State {
                tokens: f64::from(limit.burst),
                at: now,
            }),
        }
    }

    /// The configured limit.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Take one token at `now`; when none is left, `Err` says how long until one is.
    pub fn try_take(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock();
        let elapsed = now.saturating_duration_since(state.at).as_secs_f64();
        state.tokens = (state.tokens + elapsed * self.limit.rps).min(f64::from(self.limit.burst));
        // A clock that did not move (or a `now` from before `at`) adds nothing; keep the
        // later instant so that time is never counted twice.
        if now > state.at {
            state.at = now;
        }
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - state.tokens;
            Err(Duration::from_secs_f64(missing / self.limit.rps))
        }
    }
}

/// `Retry-After` for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs_f64().ceil();
    // Saturating cast; a wait of more than u64::MAX seconds cannot come from a valid rps.
    (secs as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn starts_full_then_refills_at_rps() {
        let t0 = Instant::now();
        let bucket = TokenBucket::new(RateLimit { rps: 2.0, burst: 3 }, t0);
        for _ in 0..3 {
            assert_eq!(bucket.try_take(t0), Ok(()));
        }
        // Empty: one token is half a second away at 2 rps.
        let wait = bucket.try_take(t0).expect_err("empty");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        // A quarter second later, a quarter second is left.
        let wait = bucket.try_take(t0 + ms(250)).expect_err("still empty");
        assert!((wait.as_secs_f64() - 0.25).abs() < 1e-9, "{wait:?}");
        assert_eq!(bucket.try_take(t0 + ms(500)), Ok(()));
        assert!(bucket.try_take(t0 + ms(500)).is_err());
    }

    #[test]
    fn never_holds_more_than_burst() {
        let t0 = Instant::now();
        let bucket = TokenBucket::new(
            RateLimit {
                rps: 100.0,
                burst: 2,
            },
            t0,
        );
        let later = t0 + Duration::from_secs(60);
        assert_eq!(bucket.try_take(later), Ok(()));
        assert_eq!(bucket.try_take(later), Ok(()));
        assert!(bucket.try_take(later).is_err());
    }

    #[test]
    fn fractional_rates() {
        let t0 = Instant::now();
        let bucket = TokenBucket::new(RateLimit { rps: 0.2, burst: 1 }, t0);
        assert_eq!(bucket.try_take(t0), Ok(()));
        let wait = bucket.try_take(t0 + ms(100)).expect_err("empty");
        assert_eq!(retry_after_secs(wait), 5);
        assert_eq!(bucket.try_take(t0 + Duration::from_secs(5)), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_one_second() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(ms(1)), 1);
        assert_eq!(retry_after_secs(ms(1000)), 1);
        assert_eq!(retry_after_secs(ms(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(10)), 10);
    }
}
