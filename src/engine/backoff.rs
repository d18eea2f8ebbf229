//! Retry delays: exponential with full jitter, from `backon`'s builder. `backoff`
//! (the crate named in the design card) is unmaintained (RUSTSEC-2025-0012); `backon`
//! is its maintained equivalent. Only this module knows which crate computes delays.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// An endless sequence of growing, jittered delays between `min` and `max`.
pub struct Backoff {
    builder: ExponentialBuilder,
    current: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min_ms: u64, max_ms: u64) -> Self {
        let max = Duration::from_millis(max_ms.max(min_ms));
        let builder = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(min_ms))
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            current: builder.build(),
            builder,
            max,
        }
    }

    /// The next delay; never more than the configured maximum.
    pub fn next_delay(&mut self) -> Duration {
        self.current.next().unwrap_or(self.max).min(self.max)
    }

    /// Starts again from the smallest delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_bounded_and_reset() {
        let mut b = Backoff::new(100, 1_000);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_millis(1_000)),
            "{delays:?}"
        );
        // Later delays reach the ceiling region; the first never exceeds twice the minimum.
        assert!(delays[0] <= Duration::from_millis(200), "{delays:?}");
        assert!(
            delays[8..].iter().any(|d| *d >= Duration::from_millis(500)),
            "{delays:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(200));
    }
}
