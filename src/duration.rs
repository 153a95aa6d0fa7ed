//! Duration syntax shared by flags and pod annotations (humantime: `500ms`,
//! `10s`, `2m`), and deadlines made from such durations. Its own module so
//! that the injector, a core module, does not have to import `config` to
//! read `fencegate.io/ttl`.

use std::time::Duration;

/// The longest duration a flag or annotation takes: ten years (humantime's
/// `10y`). Beyond that nothing is meant but "never", and sums such as
/// `now + ttl + grace` stop fitting in an `Instant` (a panic on a request's
/// path), so such values are refused where they are read rather than
/// saturated at each place they are used.
pub const MAX: Duration = Duration::from_secs(315_576_000);

/// Parses `s`, with examples in the error so a typo is easy to fix; at most
/// [`MAX`].
pub fn parse(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))?;
    if d > MAX {
        return Err(format!("{s} is longer than 10 years, the longest duration taken"));
    }
    Ok(d)
}

/// Further than any deadline needs to be: about 30 years.
pub const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);

/// The instant `d` from now, no further than [`FAR`]. `Instant + Duration`
/// panics past what an `Instant` holds; the flags took durations up to
/// `u64::MAX` seconds before [`MAX`] (`--upstream-timeout 500000000000y`
/// panicked every forwarded request), and a deadline computed from a sum
/// of durations can still reach past it.
pub fn after(d: Duration) -> tokio::time::Instant {
    after_at(tokio::time::Instant::now(), d)
}

/// [`after`], counted from `now` (a clock read the caller keeps too).
pub fn after_at(now: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    now + d.min(FAR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_too_far_for_an_instant_is_far_instead() {
        let huge = humantime::parse_duration("500000000000y").unwrap();
        // Control: what `Instant::now() + huge` does (it panics on `None`).
        assert_eq!(std::time::Instant::now().checked_add(huge), None);
        let far = after(huge);
        assert!(far > tokio::time::Instant::now() + FAR - Duration::from_secs(1));
        assert!(after(Duration::from_secs(1)) < far);
    }

    #[test]
    fn parses_humantime_and_explains_errors() {
        assert_eq!(parse("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert!(parse("ten").unwrap_err().contains("examples"));
        assert_eq!(parse("10y"), Ok(MAX));
        assert!(parse("10y 1s").unwrap_err().contains("longer than 10 years"));
        assert!(parse("500000000000y").is_err());
    }
}
