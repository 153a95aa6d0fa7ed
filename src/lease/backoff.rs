//! Exponential backoff with jitter for the keeper's retries.
//!
//! Fixed retry intervals make every sidecar that lost etcd at the same moment
//! come back at the same moment too; "equal jitter" (half fixed, half random)
//! spreads them while keeping a floor, so a retry never comes at once.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap, next: base }
    }

    /// The keeper's default: 100 ms doubling up to 2 s (a sidecar back from an etcd outage should hold again soon).
    pub fn default_retry() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
    }

    /// The next wait: between half and all of the current step; the step doubles up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.cap);
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// After a success: start again from the base.
    pub fn reset(&mut self) {
        self.next = self.base;
    }

    /// Sleeps for [`Self::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let steps: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, step) in steps.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            assert!(
                *d >= Duration::from_millis(step / 2) && *d <= Duration::from_millis(step),
                "{d:?} for step {step}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
