//! Debounce: whether a trigger opens a new window (a new run) or is
//! collapsed into the key's current window, and what either writes,
//! computed once for both backends (docs/FLOW_CONTROL.md, "Debounce").
//!
//! Each (tenant, job, debounce key) has at most one *current* window: the
//! latest run triggered with that key, marked `runs.debounce_current`
//! under a partial unique index, so two racing triggers cannot both open
//! one. A backend reads the current window's run (PostgreSQL: locked, with
//! `FOR UPDATE`), asks [`decide`], and persists the answer in the trigger's
//! transaction.
//!
//! The rules, with the window `[first trigger, first trigger + window)`:
//! - a trigger at or after the window's end opens a new window (the end is
//!   outside the window);
//! - a cancelled run ends its window: the next trigger opens a new one;
//! - `keep = first`: inside the window, the trigger is collapsed into the
//!   window's run whatever its status (pending, running, completed,
//!   failed); the trigger's input is dropped;
//! - `keep = last`: inside the window, the trigger is collapsed into the
//!   window's run and replaces its input only while that run has not
//!   started (pending or postponed, no attempt yet); once it has started,
//!   the trigger opens a new window with its own run, so the last input is
//!   never lost and a started run's input never changes under it.
//! - a window keeps the mode it was opened with.

use super::end::{EventWrite, Fill};
use super::trigger::{trigger, TriggerPlan};
use crate::model::{DebounceKey, Keep, NewRun};
use docket_core::{EventKind, RunId, RunStatus, Timestamp};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The key's current window, as the backend read it.
#[derive(Clone, Debug, PartialEq)]
pub struct Window<'a> {
    /// The window's run.
    pub run: RunId,
    /// Its status now.
    pub status: RunStatus,
    /// Its attempts so far (0: never claimed).
    pub attempt: u32,
    /// The mode the window was opened with.
    pub keep: Keep,
    /// The window's end (exclusive).
    pub until: Timestamp,
    /// Triggers collapsed into it so far.
    pub collapsed: u32,
    /// Its input now (only its size and hash are recorded when replaced).
    pub input: &'a Value,
}

/// Why a trigger opened a new window (recorded in its `run_triggered`
/// event as `debounce.opened`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// The key had no window.
    First,
    /// The current window had ended (`now >= until`).
    WindowEnded,
    /// The window's run was cancelled.
    RunCancelled,
    /// `keep = last` and the window's run had already started.
    RunStarted,
}

impl Opened {
    /// The recorded name.
    pub fn as_str(self) -> &'static str {
        match self {
            Opened::First => "first",
            Opened::WindowEnded => "window_ended",
            Opened::RunCancelled => "run_cancelled",
            Opened::RunStarted => "run_started",
        }
    }
}

/// A collapse: what is written to the window's run.
#[derive(Clone, Debug, PartialEq)]
pub struct Collapse {
    /// The window's run, which the trigger answers with.
    pub run: RunId,
    /// Its new input (`keep = last`), or `None`: its input stays.
    pub input: Option<Value>,
    /// Its new collapse count.
    pub collapsed: u32,
    /// The `trigger_collapsed` event on it (actor: the trigger's).
    pub event: EventWrite,
}

/// What a debounced trigger does.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Insert the trigger's run as the key's new current window, after
    /// clearing the current mark of `close` (the previous window's run).
    Open {
        /// The previous window's run, if the key had one.
        close: Option<RunId>,
        /// The new run's fields and `run_triggered` event.
        plan: TriggerPlan,
    },
    /// Write `Collapse` to the window's run; nothing is created.
    Collapse(Collapse),
}

/// The size and SHA-256 of a JSON value as stored (never the value).
pub fn digest(v: &Value) -> Value {
    let bytes = v.to_string();
    let hash = Sha256::digest(bytes.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    json!({ "bytes": bytes.len(), "sha256": hex })
}

/// What trigger `r` (with debounce `d`) does at `now`, given the key's
/// current window.
pub fn decide(
    window: Option<&Window<'_>>,
    r: &NewRun,
    d: &DebounceKey,
    now: Timestamp,
) -> Decision {
    let opened = match window {
        None => Opened::First,
        Some(w) if now >= w.until => Opened::WindowEnded,
        Some(w) if w.status == RunStatus::Cancelled => Opened::RunCancelled,
        Some(w) if w.keep == Keep::Last && !not_started(w) => Opened::RunStarted,
        Some(w) => return Decision::Collapse(collapse(w, r, d)),
    };
    let mut plan = trigger(r, now);
    if let Some(db) = plan.event.data.get_mut("debounce") {
        db["opened"] = json!(opened.as_str());
    }
    Decision::Open {
        close: window.map(|w| w.run),
        plan,
    }
}

/// Whether a trigger of the window's key at `now` would be collapsed into
/// its run (what [`decide`] answers with a collapse): the window is open.
/// [`open_sql`] is the same rule for the backends' reads.
pub fn is_open(w: &Window<'_>, now: Timestamp) -> bool {
    now < w.until && w.status != RunStatus::Cancelled && (w.keep == Keep::First || not_started(w))
}

/// [`is_open`] as an SQL condition on `runs` at `{now}` (a placeholder in
/// the backend's syntax). Its first terms are the partial index
/// `runs_debounce_open (tenant, debounce_until) WHERE debounce_current IS
/// NOT NULL`, so a read walks only the windows that have not ended.
pub fn open_sql(now: &str) -> String {
    format!(
        "runs.debounce_current IS NOT NULL AND runs.debounce_until > {now} \
         AND runs.status <> 'cancelled' \
         AND (runs.debounce_keep = 'first' \
              OR (runs.status IN ('pending', 'postponed') AND runs.attempt = 0))"
    )
}

/// The tenant condition of the reads: one tenant (`Some(placeholder)`) or
/// every tenant.
fn tenant_sql(tenant: Option<&str>) -> String {
    tenant.map_or_else(|| "1 = 1".to_string(), |t| format!("runs.tenant = {t}"))
}

/// `LimitStore::debounce_windows`: the open windows by (tenant, job, key),
/// at most `{limit}`. Columns: tenant, job, key, keep, opened_at, until,
/// run id, status, collapsed.
pub fn windows_sql(now: &str, tenant: Option<&str>, limit: &str) -> String {
    format!(
        "SELECT runs.tenant, runs.job, runs.debounce_key, runs.debounce_keep, runs.created_at,
                runs.debounce_until, runs.id, runs.status, runs.collapsed
         FROM runs WHERE {} AND {}
         ORDER BY runs.tenant, runs.job, runs.debounce_key LIMIT {limit}",
        tenant_sql(tenant),
        open_sql(now)
    )
}

/// `LimitStore::debounce_counts`: open windows per (tenant, job). Columns:
/// tenant, job, count.
pub fn counts_sql(now: &str, tenant: Option<&str>) -> String {
    format!(
        "SELECT runs.tenant, runs.job, COUNT(*) FROM runs WHERE {} AND {}
         GROUP BY runs.tenant, runs.job ORDER BY runs.tenant, runs.job",
        tenant_sql(tenant),
        open_sql(now)
    )
}

/// A `keep = last` window's run whose input may still be replaced.
fn not_started(w: &Window<'_>) -> bool {
    matches!(w.status, RunStatus::Pending | RunStatus::Postponed) && w.attempt == 0
}

fn collapse(w: &Window<'_>, r: &NewRun, d: &DebounceKey) -> Collapse {
    let collapsed = w.collapsed.saturating_add(1);
    let replace = w.keep == Keep::Last;
    let discarded = if replace { w.input } else { &r.input };
    let mut data = json!({
        "key": d.key,
        "keep": w.keep.as_str(),
        "collapsed": collapsed,
        "input_replaced": replace,
        "discarded_input": digest(discarded),
        "window_until": w.until,
    });
    if let Some(k) = &r.idempotency_key {
        data["idempotency_key"] = json!(k);
    }
    if let Some(c) = &r.correlation_id {
        data["correlation_id"] = json!(c);
    }
    Collapse {
        run: w.run,
        input: replace.then(|| r.input.clone()),
        collapsed,
        event: EventWrite {
            kind: EventKind::TriggerCollapsed,
            data,
            fill: Fill::None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn run(keep: Keep) -> (NewRun, DebounceKey) {
        let d = DebounceKey {
            key: "acme/42".into(),
            keep,
            window_ms: 1_000,
        };
        let mut r = NewRun::new("j", json!({ "n": 2 }));
        r.debounce = Some(d.clone());
        (r, d)
    }

    fn window(input: &Value, keep: Keep, status: RunStatus, attempt: u32) -> Window<'_> {
        Window {
            run: RunId(Uuid::from_u128(7)),
            status,
            attempt,
            keep,
            until: Timestamp(2_000),
            collapsed: 3,
            input,
        }
    }

    #[test]
    fn the_first_trigger_opens_a_window_and_last_waits_for_its_end() {
        let (r, d) = run(Keep::Last);
        let Decision::Open { close, plan } = decide(None, &r, &d, Timestamp(1_000)) else {
            panic!("opens")
        };
        assert_eq!(close, None);
        assert_eq!(plan.run_after, Timestamp(2_000));
        assert_eq!(plan.debounce_until, Some(Timestamp(2_000)));
        assert_eq!(plan.event.data["debounce"]["opened"], json!("first"));
        assert_eq!(plan.event.data["debounce"]["keep"], json!("last"));
        let (r, d) = run(Keep::First);
        let Decision::Open { plan, .. } = decide(None, &r, &d, Timestamp(1_000)) else {
            panic!("opens")
        };
        assert_eq!(plan.run_after, Timestamp(1_000), "first is due at once");
        assert_eq!(plan.debounce_until, Some(Timestamp(2_000)));
    }

    /// `is_open` (and so the reads' SQL, which the conformance suite
    /// checks against it) is exactly "a trigger now would collapse".
    #[test]
    fn a_window_is_open_exactly_when_a_trigger_would_collapse() {
        let old = json!({ "n": 1 });
        for keep in [Keep::First, Keep::Last] {
            let (r, d) = run(keep);
            for status in [
                RunStatus::Pending,
                RunStatus::Postponed,
                RunStatus::Running,
                RunStatus::Completed,
                RunStatus::Failed,
                RunStatus::Cancelled,
            ] {
                for attempt in [0, 1] {
                    let w = window(&old, keep, status, attempt);
                    for now in [1_000, 1_999, 2_000, 2_001] {
                        let now = Timestamp(now);
                        let collapses =
                            matches!(decide(Some(&w), &r, &d, now), Decision::Collapse(_));
                        assert_eq!(
                            is_open(&w, now),
                            collapses,
                            "{keep} {status} attempt {attempt} at {now:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_window_end_is_outside_the_window() {
        let old = json!({ "n": 1 });
        for keep in [Keep::First, Keep::Last] {
            let (r, d) = run(keep);
            let w = window(&old, keep, RunStatus::Pending, 0);
            assert!(matches!(
                decide(Some(&w), &r, &d, Timestamp(1_999)),
                Decision::Collapse(_)
            ));
            let Decision::Open { close, plan } = decide(Some(&w), &r, &d, Timestamp(2_000)) else {
                panic!("at the end: a new window")
            };
            assert_eq!(close, Some(w.run));
            assert_eq!(plan.event.data["debounce"]["opened"], json!("window_ended"));
            assert_eq!(plan.debounce_until, Some(Timestamp(3_000)));
        }
    }

    #[test]
    fn last_replaces_the_input_only_before_the_run_starts() {
        let old = json!({ "n": 1 });
        let (r, d) = run(Keep::Last);
        let w = window(&old, Keep::Last, RunStatus::Pending, 0);
        let Decision::Collapse(c) = decide(Some(&w), &r, &d, Timestamp(1_500)) else {
            panic!("collapses")
        };
        assert_eq!(c.input, Some(json!({ "n": 2 })));
        assert_eq!(c.collapsed, 4);
        assert_eq!(c.event.kind, EventKind::TriggerCollapsed);
        assert_eq!(c.event.data["input_replaced"], json!(true));
        assert_eq!(c.event.data["discarded_input"], digest(&old));
        assert_eq!(c.event.data["discarded_input"]["bytes"], json!(7));
        assert!(
            !c.event.data.to_string().contains("\"n\":1"),
            "no input in the event"
        );
        for (status, attempt) in [
            (RunStatus::Running, 1),
            (RunStatus::Pending, 1),
            (RunStatus::Completed, 1),
            (RunStatus::Failed, 1),
        ] {
            let w = window(&old, Keep::Last, status, attempt);
            let Decision::Open { close, plan } = decide(Some(&w), &r, &d, Timestamp(1_500)) else {
                panic!("a started run is never collapsed into ({status})")
            };
            assert_eq!(close, Some(w.run));
            assert_eq!(plan.event.data["debounce"]["opened"], json!("run_started"));
        }
    }

    #[test]
    fn first_drops_the_input_whatever_the_run_did_but_a_cancel_ends_the_window() {
        let old = json!({ "n": 1 });
        let (r, d) = run(Keep::First);
        for status in [
            RunStatus::Pending,
            RunStatus::Running,
            RunStatus::Completed,
            RunStatus::Failed,
        ] {
            let w = window(&old, Keep::First, status, 1);
            let Decision::Collapse(c) = decide(Some(&w), &r, &d, Timestamp(1_500)) else {
                panic!("collapses into a {status} run")
            };
            assert_eq!(c.input, None);
            assert_eq!(c.event.data["input_replaced"], json!(false));
            assert_eq!(c.event.data["discarded_input"], digest(&r.input));
        }
        for keep in [Keep::First, Keep::Last] {
            let w = window(&old, keep, RunStatus::Cancelled, 0);
            let Decision::Open { plan, .. } = decide(Some(&w), &r, &d, Timestamp(1_500)) else {
                panic!("a cancelled run ends its window")
            };
            assert_eq!(
                plan.event.data["debounce"]["opened"],
                json!("run_cancelled")
            );
        }
    }

    #[test]
    fn a_postponed_run_that_never_started_still_takes_the_last_input() {
        let old = json!({ "n": 1 });
        let (r, d) = run(Keep::Last);
        let w = window(&old, Keep::Last, RunStatus::Postponed, 0);
        let Decision::Collapse(c) = decide(Some(&w), &r, &d, Timestamp(1_500)) else {
            panic!("collapses")
        };
        assert_eq!(c.input, Some(json!({ "n": 2 })));
        let w = window(&old, Keep::Last, RunStatus::Postponed, 1);
        assert!(matches!(
            decide(Some(&w), &r, &d, Timestamp(1_500)),
            Decision::Open { .. }
        ));
    }

    #[test]
    fn a_window_keeps_the_mode_it_was_opened_with() {
        let old = json!({ "n": 1 });
        let (r, d) = run(Keep::Last);
        let w = window(&old, Keep::First, RunStatus::Pending, 0);
        let Decision::Collapse(c) = decide(Some(&w), &r, &d, Timestamp(1_500)) else {
            panic!("collapses")
        };
        assert_eq!(c.input, None, "the window's mode (first) decides");
    }
}
