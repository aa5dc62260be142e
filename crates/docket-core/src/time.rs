//! Milliseconds since the Unix epoch: the one time type Docket stores.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

/// A point in time, in whole milliseconds since the Unix epoch (UTC).
///
/// Stored as an integer in both backends so that eligibility comparisons are
/// exact and never depend on a database's own clock.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

/// Why a text is not an accepted time (see [`Timestamp::parse_checked`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeError {
    /// Not RFC 3339 text with a date, a time and an offset.
    NotRfc3339,
    /// RFC 3339, but outside [`Timestamp::MIN`]..=[`Timestamp::MAX`].
    OutOfRange,
}

/// Docket's accepted range of times, in words, for error messages.
pub const TIME_RANGE: &str = "1970-01-01T00:00:00.000Z to 9999-12-31T23:59:59.999Z";

/// Days from 1970-01-01 to the civil date `y-m-d` (proleptic Gregorian;
/// H. Hinnant's algorithm), so that dates jiff's `Timestamp` cannot hold
/// (up to 9999-12-31) still convert.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count from 1970-01-01 (inverse of
/// [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl Timestamp {
    /// The earliest time Docket accepts: 1970-01-01T00:00:00.000Z.
    pub const MIN: Timestamp = Timestamp(0);
    /// The latest time Docket accepts: 9999-12-31T23:59:59.999Z (the last
    /// instant RFC 3339's four-digit year can write).
    pub const MAX: Timestamp = Timestamp(253_402_300_799_999);

    /// Whether this time is within [`Timestamp::MIN`]..=[`Timestamp::MAX`]
    /// (then it always renders as RFC 3339).
    pub const fn in_range(self) -> bool {
        self.0 >= Self::MIN.0 && self.0 <= Self::MAX.0
    }

    /// Parses RFC 3339 text and checks it is in Docket's range.
    pub fn parse_checked(s: &str) -> Result<Self, TimeError> {
        let t = Self::parse_any(s).ok_or(TimeError::NotRfc3339)?;
        if t.in_range() {
            Ok(t)
        } else {
            Err(TimeError::OutOfRange)
        }
    }

    /// RFC 3339 text (date, time, offset) as milliseconds, whatever the
    /// range; sub-millisecond digits are dropped.
    fn parse_any(s: &str) -> Option<Self> {
        let p = jiff::fmt::temporal::Pieces::parse(s).ok()?;
        let time = p.time()?;
        let offset = p.to_numeric_offset()?;
        let date = p.date();
        let days = days_from_civil(
            i64::from(date.year()),
            i64::from(date.month()),
            i64::from(date.day()),
        );
        let secs = days * 86_400
            + i64::from(time.hour()) * 3600
            + i64::from(time.minute()) * 60
            + i64::from(time.second())
            - i64::from(offset.seconds());
        Some(Timestamp(
            secs * 1000 + i64::from(time.subsec_nanosecond()) / 1_000_000,
        ))
    }

    /// The instant `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// This instant plus `d`, saturating.
    pub fn plus(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// This instant plus `ms` milliseconds, saturating.
    pub fn plus_millis(self, ms: i64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self` (negative when `earlier` is later).
    pub fn millis_since(self, earlier: Timestamp) -> i64 {
        self.0.saturating_sub(earlier.0)
    }

    /// RFC 3339 text, e.g. `2026-11-22T10:00:00.123Z`. Every time in
    /// [`Timestamp::MIN`]..=[`Timestamp::MAX`] renders so; one outside it
    /// (which Docket refuses at every entry) is written `@<ms>ms`, since no
    /// RFC 3339 text can say it.
    pub fn to_rfc3339(self) -> String {
        if !self.in_range() {
            return format!("@{}ms", self.0);
        }
        let days = self.0.div_euclid(86_400_000);
        let ms = self.0.rem_euclid(86_400_000);
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000
        )
    }

    /// Parses RFC 3339 text (`2026-11-22T10:00:00Z`) in Docket's range
    /// ([`Timestamp::MIN`]..=[`Timestamp::MAX`]); `None` otherwise. Use
    /// [`Timestamp::parse_checked`] to tell the two apart.
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        Self::parse_checked(s).ok()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        self.plus(d)
    }
}

impl Sub<Timestamp> for Timestamp {
    type Output = i64;
    fn sub(self, other: Timestamp) -> i64 {
        self.millis_since(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let t = Timestamp::from_millis(1_700_000_000_123);
        let s = t.to_rfc3339();
        assert_eq!(s, "2023-11-14T22:13:20.123Z");
        assert_eq!(Timestamp::parse_rfc3339(&s), Some(t));
        assert_eq!(Timestamp::parse_rfc3339("not a time"), None);
    }

    #[test]
    fn the_whole_range_renders_and_parses_as_rfc3339() {
        assert_eq!(Timestamp::MIN.to_rfc3339(), "1970-01-01T00:00:00.000Z");
        assert_eq!(Timestamp::MAX.to_rfc3339(), "9999-12-31T23:59:59.999Z");
        for s in [
            "9999-12-31T23:59:59Z",
            "9999-12-31T23:59:59.999Z",
            "1970-01-01T00:00:00Z",
            "2000-02-29T12:34:56.789+02:00",
        ] {
            let t = Timestamp::parse_checked(s).unwrap();
            assert_eq!(Timestamp::parse_checked(&t.to_rfc3339()), Ok(t), "{s}");
        }
        assert_eq!(
            Timestamp::parse_checked("2000-02-29T12:34:56.789+02:00")
                .unwrap()
                .to_rfc3339(),
            "2000-02-29T10:34:56.789Z"
        );
        // Agrees with jiff wherever jiff can hold the time.
        for ms in [
            1,
            86_399_999,
            951_782_400_000,
            1_700_000_000_123,
            253_402_000_000_000,
        ] {
            let j = format!("{:.3}", jiff::Timestamp::from_millisecond(ms).unwrap());
            assert_eq!(Timestamp(ms).to_rfc3339(), j);
            assert_eq!(Timestamp::parse_rfc3339(&j), Some(Timestamp(ms)));
        }
        assert_eq!(
            Timestamp::parse_checked("1969-12-31T23:59:59.999Z"),
            Err(TimeError::OutOfRange)
        );
        assert_eq!(
            Timestamp::parse_checked("9999-12-31T23:59:59Z-01:00"),
            Err(TimeError::NotRfc3339)
        );
        assert_eq!(
            Timestamp::parse_checked("9999-12-31T23:00:00-01:00"),
            Err(TimeError::OutOfRange)
        );
        assert_eq!(
            Timestamp::parse_checked("2026-01-31"),
            Err(TimeError::NotRfc3339)
        );
        assert_eq!(Timestamp(i64::MAX).to_rfc3339(), "@9223372036854775807ms");
    }

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_millis(i64::MAX - 1);
        assert_eq!(t.plus_millis(10).as_millis(), i64::MAX);
        assert_eq!(Timestamp(10) - Timestamp(4), 6);
        assert_eq!(Timestamp(0) + Duration::from_millis(250), Timestamp(250));
    }
}
