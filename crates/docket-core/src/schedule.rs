//! Schedules: when a schedule's slots fall, and what happens to each slot.
//!
//! Everything here is pure: the scheduler (in the `docket` crate) reads the
//! schedule and the clock, asks these functions what to do, and the store
//! persists the answer.
//!
//! - [`Rule`]: a cron expression (5 fields, 6 with seconds, or an `@hourly`
//!   style shortcut; parsed by the `croner` crate) in an IANA time zone
//!   (jiff's bundled tz database, so results do not depend on the host's
//!   `/usr/share/zoneinfo`), or a fixed interval; with an optional start and
//!   end. [`Rule::next_after`] and [`Rule::slots`] list its slots.
//! - **The DST rule.** A cron expression describes wall-clock (civil) times
//!   in the zone. A civil time that does not exist on a day (the spring-
//!   forward gap, e.g. 02:30 in Europe/Berlin on the last Sunday of March) is
//!   **skipped**: that day has no such slot. A civil time that occurs twice
//!   (the autumn fall-back hour) fires **once, at its first occurrence** (the
//!   earlier instant, summer time); the repeated hour's second pass has no
//!   slots. So a schedule never fires twice for one wall-clock time and never
//!   fires at a time it does not name. Intervals (`every`) are fixed
//!   durations counted from the start (or the Unix epoch) and ignore the zone.
//! - [`jitter_ms`]: the deterministic delay added to a slot, a hash of
//!   (schedule name, slot) modulo the window — like the retry policy's.
//! - [`plan_due`]: which due slots fire, which are caught up, which are
//!   skipped and why (the catch-up policy, [`CatchUp`]).
//! - [`overlap`]: what a slot does while the schedule's previous run is
//!   unfinished ([`Overlap`], Temporal's names).

use crate::{stable_hash, Timestamp};
use jiff::civil::DateTime;
use jiff::tz::{AmbiguousOffset, TimeZone};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A due slot counts as on time while it is at most this late (measured from
/// its fire time, slot + jitter); later than that it is a missed slot, and
/// the catch-up policy decides. Larger than the scheduler's failover bound
/// (a leader's lead of 5 s plus a tick), so a slot delayed by a hung leader is
/// still fired as on time and never dropped by `catch_up = "none"`.
pub const ON_TIME_GRACE_MS: i64 = 60_000;

/// The default catch-up window: missed slots older than this are skipped.
pub const DEFAULT_CATCH_UP_WINDOW_MS: i64 = 24 * 3_600_000;

/// How many slots one tick of the scheduler handles for one schedule at most
/// (a per-second schedule after a long downtime); the rest wait for the next
/// tick, so one call stays small.
pub const MAX_SLOTS_PER_TICK: usize = 500;

/// A schedule definition that is invalid, naming the field and the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct ScheduleError {
    /// The field (`cron`, `every`, `timezone`, `overlap`, …).
    pub field: &'static str,
    /// What is wrong with it, with the position in a cron expression.
    pub message: String,
}

impl ScheduleError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        ScheduleError {
            field,
            message: message.into(),
        }
    }
}

/// What a slot does while the schedule's previous run is unfinished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Fire regardless.
    Allow,
    /// Do not fire; the slot is recorded as skipped with the reason.
    #[default]
    Skip,
    /// Keep one slot waiting and fire it when the previous run ends; a slot
    /// that finds one already waiting is skipped.
    BufferOne,
    /// Cancel the previous run, then fire.
    CancelOther,
}

impl Overlap {
    /// The snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Overlap::Allow => "allow",
            Overlap::Skip => "skip",
            Overlap::BufferOne => "buffer_one",
            Overlap::CancelOther => "cancel_other",
        }
    }
}

impl FromStr for Overlap {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, ScheduleError> {
        Ok(match s {
            "allow" => Overlap::Allow,
            "skip" => Overlap::Skip,
            "buffer_one" => Overlap::BufferOne,
            "cancel_other" => Overlap::CancelOther,
            _ => {
                return Err(ScheduleError::new(
                    "overlap",
                    format!("`{s}` is not one of allow, skip, buffer_one, cancel_other"),
                ))
            }
        })
    }
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to slots missed while no scheduler ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Fire the newest missed slot within the window (unless an on-time slot
    /// fires in the same tick); skip the others.
    #[default]
    Last,
    /// Fire every missed slot within the window, oldest first.
    All,
    /// Skip every missed slot.
    None,
}

impl CatchUp {
    /// The snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            CatchUp::Last => "last",
            CatchUp::All => "all",
            CatchUp::None => "none",
        }
    }
}

impl FromStr for CatchUp {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, ScheduleError> {
        Ok(match s {
            "last" => CatchUp::Last,
            "all" => CatchUp::All,
            "none" => CatchUp::None,
            _ => {
                return Err(ScheduleError::new(
                    "catch_up",
                    format!("`{s}` is not one of last, all, none"),
                ))
            }
        })
    }
}

impl fmt::Display for CatchUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a duration like `"30s"`, `"5m"`, `"1h 30m"`, `"500ms"` or ISO 8601
/// `"PT30S"` (jiff's friendly format) into whole milliseconds; it must be
/// positive.
pub fn parse_duration_ms(field: &'static str, s: &str) -> Result<i64, ScheduleError> {
    let d: jiff::SignedDuration = s.trim().parse().map_err(|e| {
        ScheduleError::new(
            field,
            format!("`{s}` is not a duration like \"30s\", \"5m\", \"1h 30m\": {e}"),
        )
    })?;
    let ms = d.as_millis();
    if ms <= 0 || ms > i128::from(i64::MAX) {
        return Err(ScheduleError::new(
            field,
            format!("`{s}` must be a positive duration of at least 1ms"),
        ));
    }
    Ok(ms as i64)
}

/// Looks up an IANA time zone (e.g. `Europe/Berlin`, `UTC`) in the bundled
/// tz database.
pub fn parse_zone(name: &str) -> Result<TimeZone, ScheduleError> {
    jiff::tz::db().get(name).map_err(|e| {
        ScheduleError::new(
            "timezone",
            format!(
                "`{name}` is not an IANA time zone name (like \"Europe/Berlin\" or \"UTC\"): {e}"
            ),
        )
    })
}

const FIELD_NAMES: [&str; 6] = [
    "second",
    "minute",
    "hour",
    "day of month",
    "month",
    "day of week",
];

/// The parser: 5 fields, or 6 with seconds first; no year field.
fn cron_parser() -> croner::parser::CronParser {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
}

/// Parses a cron expression; an error names the field and its position
/// (1-based column) in the expression.
fn parse_cron(expr: &str) -> Result<croner::Cron, ScheduleError> {
    let parser = cron_parser();
    match parser.parse(expr) {
        Ok(c) => Ok(c),
        Err(e) => {
            let trimmed = expr.trim();
            if trimmed.starts_with('@') {
                return Err(ScheduleError::new(
                    "cron",
                    format!("`{trimmed}` is not a known shortcut (@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly): {e}"),
                ));
            }
            // Find the field at fault: parse each field alone in an
            // otherwise match-all expression of the same shape.
            let fields: Vec<(usize, &str)> = field_spans(expr);
            if fields.len() != 5 && fields.len() != 6 {
                return Err(ScheduleError::new(
                    "cron",
                    format!(
                        "`{trimmed}` has {} fields; expected 5 (minute hour day-of-month month day-of-week), 6 (with seconds first) or a shortcut like @hourly",
                        fields.len()
                    ),
                ));
            }
            let offset = 6 - fields.len();
            for (i, (col, text)) in fields.iter().enumerate() {
                let mut probe = vec!["*"; fields.len()];
                probe[i] = text;
                if let Err(fe) = parser.parse(&probe.join(" ")) {
                    return Err(ScheduleError::new(
                        "cron",
                        format!(
                            "field {} ({}) `{}` at column {}: {}",
                            i + 1,
                            FIELD_NAMES[i + offset],
                            text,
                            col + 1,
                            fe
                        ),
                    ));
                }
            }
            Err(ScheduleError::new("cron", format!("`{trimmed}`: {e}")))
        }
    }
}

/// The whitespace-separated fields of `s` with their byte offsets.
fn field_spans(s: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, ch) in s.char_indices() {
        match (ch.is_whitespace(), start) {
            (true, Some(st)) => {
                out.push((st, &s[st..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(st) = start {
        out.push((st, &s[st..]));
    }
    out
}

#[derive(Clone, Debug)]
enum Kind {
    Cron(Box<croner::Cron>),
    Every(i64),
}

/// When a schedule's slots fall: a cron expression in a zone, or a fixed
/// interval, between an optional start and end.
#[derive(Clone, Debug)]
pub struct Rule {
    kind: Kind,
    zone: TimeZone,
    start: Option<Timestamp>,
    end: Option<Timestamp>,
}

impl Rule {
    /// Builds a rule from exactly one of `cron` and `every_ms`, a zone name,
    /// and optional bounds (a slot is in the rule when `start <= slot <= end`).
    pub fn new(
        cron: Option<&str>,
        every_ms: Option<i64>,
        timezone: &str,
        start: Option<Timestamp>,
        end: Option<Timestamp>,
    ) -> Result<Rule, ScheduleError> {
        let zone = parse_zone(timezone)?;
        let kind = match (cron, every_ms) {
            (Some(c), None) => Kind::Cron(Box::new(parse_cron(c)?)),
            (None, Some(ms)) if ms > 0 => Kind::Every(ms),
            (None, Some(_)) => return Err(ScheduleError::new("every", "must be positive")),
            (Some(_), Some(_)) => {
                return Err(ScheduleError::new(
                    "cron",
                    "give either `cron` or `every`, not both",
                ))
            }
            (None, None) => {
                return Err(ScheduleError::new(
                    "cron",
                    "a schedule needs `cron` (e.g. \"0 * * * *\") or `every` (e.g. \"30s\")",
                ))
            }
        };
        if let (Some(s), Some(e)) = (start, end) {
            if e < s {
                return Err(ScheduleError::new("end", "is before `start`"));
            }
        }
        Ok(Rule {
            kind,
            zone,
            start,
            end,
        })
    }

    /// The rule's time zone.
    pub fn zone(&self) -> &TimeZone {
        &self.zone
    }

    /// The first slot strictly after `t`, if any (before the end).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let t = match self.start {
            Some(s) if s.0 > t.0 => Timestamp(s.0 - 1),
            _ => t,
        };
        let next = match &self.kind {
            Kind::Every(ms) => {
                let anchor = self.start.map_or(0, |s| s.0);
                // The first anchor + k·ms > t.
                let k = (t.0 - anchor).div_euclid(*ms) + 1;
                Some(Timestamp(anchor.checked_add(k.checked_mul(*ms)?)?))
            }
            Kind::Cron(cron) => self.next_cron(cron, t),
        }?;
        match self.end {
            Some(e) if next > e => None,
            _ => Some(next),
        }
    }

    /// Cron slots are civil times in the zone; see the module's DST rule.
    fn next_cron(&self, cron: &croner::Cron, t: Timestamp) -> Option<Timestamp> {
        let ts = jiff::Timestamp::from_millisecond(t.0).ok()?;
        // Civil time of `t` in the zone, carried in UTC so that croner does
        // no zone arithmetic of its own: we apply the DST rule below.
        let mut civil = self.zone.to_datetime(ts);
        // Bounded: each turn moves on by at least one civil second; a
        // repeated hour has at most 3,600 of them to walk past.
        for _ in 0..10_000 {
            let carrier = civil.to_zoned(TimeZone::UTC).ok()?;
            let next = cron.find_next_occurrence(&carrier, false).ok()?;
            civil = next.datetime();
            let Some(instant) = self.first_instant(civil) else {
                continue; // in the spring-forward gap: no such slot that day
            };
            if instant > t {
                return Some(instant);
            }
            // A civil time already passed: the second pass of a repeated
            // hour (it fired at its first occurrence).
        }
        None
    }

    /// The instant of a civil time in the zone: `None` in a gap, the earlier
    /// instant when it occurs twice.
    fn first_instant(&self, civil: DateTime) -> Option<Timestamp> {
        let amb = self.zone.to_ambiguous_timestamp(civil);
        let offset = match amb.offset() {
            AmbiguousOffset::Unambiguous { offset } => offset,
            AmbiguousOffset::Gap { .. } => return None,
            AmbiguousOffset::Fold { before, .. } => before,
        };
        let ts = offset.to_timestamp(civil).ok()?;
        Some(Timestamp(ts.as_millisecond()))
    }

    /// The slots `s` with `after < s <= until`, oldest first, at most `max`.
    pub fn slots(&self, after: Timestamp, until: Timestamp, max: usize) -> Vec<Timestamp> {
        let mut out = Vec::new();
        let mut t = after;
        while out.len() < max {
            match self.next_after(t) {
                Some(s) if s <= until => {
                    out.push(s);
                    t = s;
                }
                _ => break,
            }
        }
        out
    }

    /// The next `n` slots after `t`.
    pub fn next_n(&self, t: Timestamp, n: usize) -> Vec<Timestamp> {
        self.slots(t, Timestamp(i64::MAX), n)
    }

    /// A slot as RFC 3339 in the rule's zone (with its offset), for people.
    pub fn in_zone(&self, slot: Timestamp) -> String {
        match jiff::Timestamp::from_millisecond(slot.0) {
            Ok(ts) => ts.to_zoned(self.zone.clone()).to_string(),
            Err(_) => slot.to_rfc3339(),
        }
    }
}

/// The deterministic jitter of a slot: `stable_hash(name, slot) mod window`
/// (0 when the window is 0). Stable across builds and processes, so every
/// scheduler computes the same fire time for a slot.
pub fn jitter_ms(name: &str, slot: Timestamp, window_ms: u64) -> i64 {
    if window_ms == 0 {
        return 0;
    }
    (stable_hash(&[name.as_bytes(), &slot.0.to_le_bytes()]) % window_ms) as i64
}

/// When a slot fires: the slot plus its jitter.
pub fn fire_at(name: &str, slot: Timestamp, window_ms: u64) -> Timestamp {
    slot.plus_millis(jitter_ms(name, slot, window_ms))
}

/// How a due slot was handled before overlap is considered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SlotPlan {
    /// Fire it, on time (at most [`ON_TIME_GRACE_MS`] after its fire time).
    OnTime {
        /// The slot.
        slot: Timestamp,
    },
    /// Fire it late, as a catch-up after a downtime.
    CatchUp {
        /// The slot.
        slot: Timestamp,
    },
    /// Do not fire it.
    Skip {
        /// The slot.
        slot: Timestamp,
        /// Why: `catch_up_none`, `superseded` (catch-up `last` fired a newer
        /// slot), `outside_catch_up_window`.
        reason: String,
    },
}

impl SlotPlan {
    /// The slot.
    pub fn slot(&self) -> Timestamp {
        match self {
            SlotPlan::OnTime { slot }
            | SlotPlan::CatchUp { slot }
            | SlotPlan::Skip { slot, .. } => *slot,
        }
    }
}

/// Decides the due slots of one schedule at `now`: `due` are the slots after
/// the schedule's cursor whose fire time is at or before `now`, oldest
/// first (from [`Rule::slots`] and [`fire_at`]). On-time slots fire; late
/// ones go by `catch_up` within `window_ms` of `now`.
pub fn plan_due(
    name: &str,
    due: &[Timestamp],
    jitter_window_ms: u64,
    catch_up: CatchUp,
    window_ms: i64,
    now: Timestamp,
) -> Vec<SlotPlan> {
    let on_time =
        |s: Timestamp| now.millis_since(fire_at(name, s, jitter_window_ms)) <= ON_TIME_GRACE_MS;
    let any_on_time = due.iter().any(|s| on_time(*s));
    let late: Vec<Timestamp> = due
        .iter()
        .copied()
        .filter(|s| !on_time(*s) && now.millis_since(*s) <= window_ms)
        .collect();
    let newest_late = late.last().copied();
    due.iter()
        .map(|&slot| {
            if on_time(slot) {
                SlotPlan::OnTime { slot }
            } else if now.millis_since(slot) > window_ms {
                SlotPlan::Skip {
                    slot,
                    reason: "outside_catch_up_window".into(),
                }
            } else {
                match catch_up {
                    CatchUp::All => SlotPlan::CatchUp { slot },
                    CatchUp::None => SlotPlan::Skip {
                        slot,
                        reason: "catch_up_none".into(),
                    },
                    CatchUp::Last if !any_on_time && Some(slot) == newest_late => {
                        SlotPlan::CatchUp { slot }
                    }
                    CatchUp::Last => SlotPlan::Skip {
                        slot,
                        reason: "superseded".into(),
                    },
                }
            }
        })
        .collect()
}

/// What a slot that would fire does, given the overlap policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum OverlapAction {
    /// Fire it.
    Fire,
    /// Cancel the previous run, then fire.
    CancelThenFire,
    /// Keep it waiting; fire it when the previous run ends.
    Buffer,
    /// Do not fire it.
    Skip {
        /// `previous_run_unfinished` or `buffer_full`.
        reason: String,
    },
}

/// Decides a slot under the overlap policy: `previous_unfinished` says
/// whether the schedule's last run has not ended (pending, running, waiting
/// for input, postponed); `buffered` whether a slot is already waiting.
pub fn overlap(policy: Overlap, previous_unfinished: bool, buffered: bool) -> OverlapAction {
    if !previous_unfinished {
        return OverlapAction::Fire;
    }
    match policy {
        Overlap::Allow => OverlapAction::Fire,
        Overlap::Skip => OverlapAction::Skip {
            reason: "previous_run_unfinished".into(),
        },
        Overlap::BufferOne if !buffered => OverlapAction::Buffer,
        Overlap::BufferOne => OverlapAction::Skip {
            reason: "buffer_full".into(),
        },
        Overlap::CancelOther => OverlapAction::CancelThenFire,
    }
}

/// The idempotency key of a slot's run: `schedule:NAME:<slot RFC 3339>`, so
/// two schedulers firing one slot make one run, and anyone can see which
/// slot a run belongs to.
pub fn slot_key(name: &str, slot: Timestamp) -> String {
    format!("schedule:{name}:{}", slot.to_rfc3339())
}

/// Checks a schedule name: 1–128 characters of letters, digits, `-`, `_`,
/// `.` (it appears in URLs and idempotency keys).
pub fn check_name(name: &str) -> Result<(), ScheduleError> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ScheduleError::new(
            "name",
            format!("`{name}` must be 1-128 characters of letters, digits, '-', '_', '.'"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    fn rule(cron: &str, tz: &str) -> Rule {
        Rule::new(Some(cron), None, tz, None, None).unwrap()
    }

    #[test]
    fn five_and_six_fields_and_shortcuts() {
        let r = rule("*/15 * * * *", "UTC");
        assert_eq!(
            r.next_n(ts("2026-01-01T00:07:00Z"), 3),
            vec![
                ts("2026-01-01T00:15:00Z"),
                ts("2026-01-01T00:30:00Z"),
                ts("2026-01-01T00:45:00Z")
            ]
        );
        let r = rule("*/20 * * * * *", "UTC");
        assert_eq!(
            r.next_n(ts("2026-01-01T00:00:00Z"), 2),
            vec![ts("2026-01-01T00:00:20Z"), ts("2026-01-01T00:00:40Z")]
        );
        let r = rule("@hourly", "UTC");
        assert_eq!(
            r.next_after(ts("2026-01-01T00:00:00Z")),
            Some(ts("2026-01-01T01:00:00Z"))
        );
        // A zone moves the civil time.
        let r = rule("0 9 * * *", "America/New_York");
        assert_eq!(
            r.next_after(ts("2026-01-01T00:00:00Z")),
            Some(ts("2026-01-01T14:00:00Z"))
        );
    }

    #[test]
    fn bad_cron_names_the_field_and_column() {
        let e = Rule::new(Some("0 25 * * *"), None, "UTC", None, None).unwrap_err();
        assert_eq!(e.field, "cron");
        assert!(e.message.contains("field 2 (hour) `25` at column 3"), "{e}");
        let e = Rule::new(Some("*/5 * * *"), None, "UTC", None, None).unwrap_err();
        assert!(e.message.contains("has 4 fields"), "{e}");
        let e = Rule::new(Some("@sometimes"), None, "UTC", None, None).unwrap_err();
        assert!(e.message.contains("shortcut"), "{e}");
        let e = Rule::new(Some("* * * * *"), None, "Mars/Olympus", None, None).unwrap_err();
        assert_eq!(e.field, "timezone");
        assert!(Rule::new(None, None, "UTC", None, None).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("every", "30s").unwrap(), 30_000);
        assert_eq!(parse_duration_ms("every", "1h 30m").unwrap(), 5_400_000);
        assert_eq!(parse_duration_ms("every", "500ms").unwrap(), 500);
        assert!(parse_duration_ms("every", "soon").is_err());
        assert!(parse_duration_ms("every", "0s").is_err());
    }

    #[test]
    fn dst_spring_gap_is_skipped() {
        // Europe/Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST.
        let r = rule("30 2 * * *", "Europe/Berlin");
        let slots = r.next_n(ts("2026-03-27T12:00:00Z"), 3);
        assert_eq!(
            slots,
            vec![
                ts("2026-03-28T01:30:00Z"), // 02:30 CET
                // 2026-03-29 02:30 does not exist: no slot that day
                ts("2026-03-30T00:30:00Z"), // 02:30 CEST
                ts("2026-03-31T00:30:00Z"),
            ]
        );
        // Every minute across the gap: 01:59 CET then 03:00 CEST, one minute apart in UTC.
        let r = rule("* * * * *", "Europe/Berlin");
        assert_eq!(
            r.next_n(ts("2026-03-29T00:58:00Z"), 2),
            vec![ts("2026-03-29T00:59:00Z"), ts("2026-03-29T01:00:00Z")]
        );
    }

    #[test]
    fn dst_autumn_repeat_fires_once() {
        // Europe/Berlin, 2026-10-25: 03:00 CEST falls back to 02:00 CET;
        // 02:30 happens at 00:30Z and again at 01:30Z.
        let r = rule("30 2 * * *", "Europe/Berlin");
        let slots = r.next_n(ts("2026-10-24T12:00:00Z"), 2);
        assert_eq!(
            slots,
            vec![ts("2026-10-25T00:30:00Z"), ts("2026-10-26T01:30:00Z")]
        );
        // Asked from inside the second pass, the repeated 02:30 is not offered again.
        assert_eq!(
            r.next_after(ts("2026-10-25T01:00:00Z")),
            Some(ts("2026-10-26T01:30:00Z"))
        );
        // Hourly: 02:00 fires once (first pass), then 03:00 CET.
        let r = rule("0 * * * *", "Europe/Berlin");
        assert_eq!(
            r.next_n(ts("2026-10-24T23:30:00Z"), 3),
            vec![
                ts("2026-10-25T00:00:00Z"), // 02:00 CEST
                ts("2026-10-25T02:00:00Z"), // 03:00 CET (02:00 CET is the repeat)
                ts("2026-10-25T03:00:00Z"),
            ]
        );
    }

    #[test]
    fn intervals_start_and_end() {
        let start = ts("2026-01-01T00:00:10Z");
        let end = ts("2026-01-01T00:01:10Z");
        let r = Rule::new(None, Some(30_000), "UTC", Some(start), Some(end)).unwrap();
        assert_eq!(r.next_after(Timestamp(0)), Some(start));
        assert_eq!(
            r.next_n(start, 5),
            vec![ts("2026-01-01T00:00:40Z"), ts("2026-01-01T00:01:10Z")]
        );
        let r = Rule::new(None, Some(1_000), "UTC", None, None).unwrap();
        assert_eq!(r.next_after(Timestamp(1_500)), Some(Timestamp(2_000)));
        assert_eq!(r.next_after(Timestamp(2_000)), Some(Timestamp(3_000)));
        assert_eq!(r.slots(Timestamp(0), Timestamp(3_000), 10).len(), 3);
    }

    #[test]
    fn jitter_is_in_its_window_and_stable() {
        let slot = ts("2026-01-01T00:00:00Z");
        assert_eq!(jitter_ms("a", slot, 0), 0);
        let j: Vec<i64> = (0..50)
            .map(|i| jitter_ms("nightly", slot.plus_millis(i * 60_000), 5_000))
            .collect();
        assert!(j.iter().all(|x| (0..5_000).contains(x)));
        assert_eq!(
            j,
            (0..50)
                .map(|i| jitter_ms("nightly", slot.plus_millis(i * 60_000), 5_000))
                .collect::<Vec<_>>()
        );
        assert!(j.iter().any(|x| *x != j[0]), "jitter varies by slot");
        assert_ne!(
            jitter_ms("a", slot, 1_000_000),
            jitter_ms("b", slot, 1_000_000)
        );
    }

    #[test]
    fn catch_up_modes_after_a_downtime() {
        let h = 3_600_000;
        let due: Vec<Timestamp> = (1..=5).map(|i| Timestamp(i * h)).collect();
        // Back at 5h + 10 s: slot 5 is on time, 1-4 were missed.
        let now = Timestamp(5 * h + 10_000);
        let last = plan_due("s", &due, 0, CatchUp::Last, 3 * h, now);
        assert_eq!(last[4], SlotPlan::OnTime { slot: due[4] });
        assert!(
            matches!(&last[0], SlotPlan::Skip { reason, .. } if reason == "outside_catch_up_window")
        );
        assert!(matches!(&last[3], SlotPlan::Skip { reason, .. } if reason == "superseded"));
        // Back at 5h + 10 min: nothing on time, the newest missed fires.
        let now = Timestamp(5 * h + 600_000);
        let last = plan_due("s", &due, 0, CatchUp::Last, 3 * h, now);
        assert_eq!(last[4], SlotPlan::CatchUp { slot: due[4] });
        assert!(matches!(&last[3], SlotPlan::Skip { reason, .. } if reason == "superseded"));
        let all = plan_due("s", &due, 0, CatchUp::All, 3 * h, now);
        assert!(
            matches!(&all[0], SlotPlan::Skip { reason, .. } if reason == "outside_catch_up_window")
        );
        assert_eq!(
            &all[2..],
            &[
                SlotPlan::CatchUp { slot: due[2] },
                SlotPlan::CatchUp { slot: due[3] },
                SlotPlan::CatchUp { slot: due[4] }
            ]
        );
        let none = plan_due("s", &due, 0, CatchUp::None, 3 * h, now);
        assert!(none.iter().all(|p| matches!(p, SlotPlan::Skip { .. })));
        assert!(matches!(&none[4], SlotPlan::Skip { reason, .. } if reason == "catch_up_none"));
    }

    #[test]
    fn overlap_policies() {
        for p in [
            Overlap::Allow,
            Overlap::Skip,
            Overlap::BufferOne,
            Overlap::CancelOther,
        ] {
            assert_eq!(overlap(p, false, false), OverlapAction::Fire, "{p}");
        }
        assert_eq!(overlap(Overlap::Allow, true, false), OverlapAction::Fire);
        assert_eq!(
            overlap(Overlap::Skip, true, false),
            OverlapAction::Skip {
                reason: "previous_run_unfinished".into()
            }
        );
        assert_eq!(
            overlap(Overlap::BufferOne, true, false),
            OverlapAction::Buffer
        );
        assert_eq!(
            overlap(Overlap::BufferOne, true, true),
            OverlapAction::Skip {
                reason: "buffer_full".into()
            }
        );
        assert_eq!(
            overlap(Overlap::CancelOther, true, false),
            OverlapAction::CancelThenFire
        );
    }

    proptest::proptest! {
        /// Whatever an operator types, parsing and listing slots answer
        /// (an error or slots), never panic: the API must not 5xx on it.
        #[test]
        fn any_cron_text_parses_or_is_refused_without_panicking(
            fields in proptest::collection::vec("[0-9*/,#LW?A-Z@-]{1,6}", 1..8),
            t in 0i64..4_000_000_000_000,
        ) {
            let expr = fields.join(" ");
            if let Ok(r) = Rule::new(Some(&expr), None, "Europe/Berlin", None, None) {
                let _ = r.next_n(Timestamp(t), 3);
            }
        }
    }

    #[test]
    fn slot_keys_and_names() {
        assert_eq!(
            slot_key("nightly", ts("2026-01-01T00:00:00Z")),
            "schedule:nightly:2026-01-01T00:00:00.000Z"
        );
        assert!(check_name("nightly-report_1.v2").is_ok());
        assert!(check_name("a b").is_err());
        assert!(check_name("").is_err());
    }
}
