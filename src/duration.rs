//! Duration syntax shared by flags and pod annotations (humantime: `500ms`,
//! `10s`, `2m`), and deadlines made from such durations. Its own module so
//! that the injector, a core module, does not have to import `config` to
//! read `fencegate.io/ttl`.

use std::time::Duration;

/// Parses `s`, with examples in the error so a typo is easy to fix.
pub fn parse(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))
}

/// Further than any deadline needs to be: about 30 years.
pub const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);

/// The instant `d` from now, no further than [`FAR`]. `Instant + Duration`
/// panics past what an `Instant` holds, and the flags take durations up to
/// `u64::MAX` seconds: `--upstream-timeout 500000000000y` panicked every
/// forwarded request.
pub fn after(d: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + d.min(FAR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_too_far_for_an_instant_is_far_instead() {
        let huge = parse("500000000000y").unwrap();
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
    }
}
