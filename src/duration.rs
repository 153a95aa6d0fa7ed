//! Duration syntax shared by flags and pod annotations (humantime: `500ms`,
//! `10s`, `2m`). Its own module so that the injector, a core module, does
//! not have to import `config` to read `fencegate.io/ttl`.

use std::time::Duration;

/// Parses `s`, with examples in the error so a typo is easy to fix.
pub fn parse(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_humantime_and_explains_errors() {
        assert_eq!(parse("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert!(parse("ten").unwrap_err().contains("examples"));
    }
}
