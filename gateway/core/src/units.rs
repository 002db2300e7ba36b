//! Durations and times as operators write them: `250ms`, `1s`, `1m`, `1h`; RFC 3339.

use std::fmt;
use std::time::Duration;

/// A text that is not a duration in the config's units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotADuration(pub String);

impl fmt::Display for NotADuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "'{}' is not a duration such as 250ms, 1s, 1m or 1h",
            self.0
        )
    }
}

/// Parses `250ms`, `1s`, `1m`, `1h` (a positive whole number and a unit).
pub fn parse_duration(text: &str) -> Result<Duration, NotADuration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(n) if n > 0 && millis_per_unit > 0 => {
            Ok(Duration::from_millis(n.saturating_mul(millis_per_unit)))
        }
        _ => Err(NotADuration(text.to_owned())),
    }
}

/// The shortest spelling of a duration in the config's own units, for messages.
pub fn format_duration_ms(ms: u64) -> String {
    match ms {
        0 => "0ms".into(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

/// Unix seconds of an RFC 3339 time.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let parsed =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(parsed.unix_timestamp())
}

/// Unix seconds as an RFC 3339 time in UTC.
pub fn format_rfc3339(unix_seconds: i64) -> Option<String> {
    let time = time::OffsetDateTime::from_unix_timestamp(unix_seconds).ok()?;
    time.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (text, ms) in [
            ("250ms", 250),
            ("1s", 1000),
            ("1m", 60_000),
            ("2h", 7_200_000),
        ] {
            assert_eq!(parse_duration(text), Ok(Duration::from_millis(ms)));
            assert_eq!(format_duration_ms(ms), text);
        }
        for bad in ["", "1", "s", "0s", "-1s", "1.5s", "1 s", "1d", "1sec"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_duration("soon").unwrap_err().to_string(),
            "'soon' is not a duration such as 250ms, 1s, 1m or 1h"
        );
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:01:00Z"), Some(60));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_rfc3339("tomorrow"), None);
        assert_eq!(format_rfc3339(60).as_deref(), Some("1970-01-01T00:01:00Z"));
    }
}
