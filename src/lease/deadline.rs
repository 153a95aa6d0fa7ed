//! The self-fencing deadline, measured on two clocks.
//!
//! `tokio::time::Instant` is CLOCK_MONOTONIC, which stops while the machine
//! (a VM, a laptop, a host) is suspended. etcd's clock does not stop: a
//! sidecar resumed after a suspend longer than its TTL would see its deadline
//! still ahead on the monotonic clock while etcd has long expired the lease
//! and given the lock to another. So every deadline is also kept on
//! CLOCK_BOOTTIME, which counts suspended time, and has passed when it has
//! passed on *either* clock. (The monotonic half is what tests drive with a
//! paused tokio clock; the boot-time half is real time.)

use std::time::Duration;

use tokio::time::Instant;

/// A moment on both clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub mono: Instant,
    /// Time since boot, suspend included.
    pub boot: Duration,
}

impl Stamp {
    pub fn now() -> Stamp {
        Stamp { mono: Instant::now(), boot: boottime() }
    }
}

/// A deadline on both clocks; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    mono: Instant,
    boot: Duration,
}

impl Deadline {
    /// `d` after `start`.
    pub fn after(start: Stamp, d: Duration) -> Deadline {
        Deadline { mono: start.mono + d, boot: start.boot + d }
    }

    /// True once the deadline has passed on either clock.
    pub fn passed(&self, now: Stamp) -> bool {
        now.mono >= self.mono || now.boot >= self.boot
    }

    /// Time left, the shorter of the two clocks' (zero once passed).
    pub fn remaining(&self, now: Stamp) -> Duration {
        self.mono.saturating_duration_since(now.mono).min(self.boot.saturating_sub(now.boot))
    }

    /// The monotonic instant, for `sleep_until` (a sleep cannot span a
    /// suspend anyway: after a resume the next check sees the boot clock).
    pub fn mono(&self) -> Instant {
        self.mono
    }
}

/// CLOCK_BOOTTIME. It cannot fail on Linux; were it to, report a time far in
/// the future, so every deadline reads as passed (fail closed).
fn boottime() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return Duration::MAX;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_passes_on_the_monotonic_clock() {
        let start = Stamp::now();
        let d = Deadline::after(start, Duration::from_secs(2));
        assert!(!d.passed(Stamp::now()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(d.passed(Stamp::now()));
        assert_eq!(d.remaining(Stamp::now()), Duration::ZERO);
    }

    /// Issue 11, item 3: a suspend stops CLOCK_MONOTONIC but not
    /// CLOCK_BOOTTIME; the deadline passes when the boot clock says so, even
    /// though the monotonic clock has not moved.
    #[test]
    fn a_suspend_longer_than_the_deadline_makes_it_pass() {
        let start = Stamp::now();
        let d = Deadline::after(start, Duration::from_secs(10));
        let resumed = Stamp { mono: start.mono + Duration::from_millis(1), boot: start.boot + Duration::from_secs(30) };
        assert!(d.passed(resumed), "30 s suspended: etcd has expired the lease");
        assert_eq!(d.remaining(resumed), Duration::ZERO);
        let short = Stamp { mono: start.mono + Duration::from_secs(1), boot: start.boot + Duration::from_secs(4) };
        assert!(!d.passed(short));
        assert_eq!(d.remaining(short), Duration::from_secs(6), "the shorter of the two clocks' remainders");
    }

    #[test]
    fn boottime_runs() {
        let a = boottime();
        std::thread::sleep(Duration::from_millis(5));
        assert!(boottime() > a);
    }
}
