//! What a trigger writes for a new run, computed once for both backends.
//! (Deduplication by idempotency key is the backend's read: an existing
//! run is returned and nothing is written. Whether a debounced trigger
//! creates a run at all is [`super::debounce::decide`].)

use super::end::{EventWrite, Fill};
use crate::model::{Keep, NewRun};
use docket_core::{EventKind, RunStatus, Timestamp};
use serde_json::json;

/// A new run's first fields and its `run_triggered` event.
#[derive(Clone, Debug, PartialEq)]
pub struct TriggerPlan {
    /// Every run starts `pending` (DESIGN.md's state table).
    pub status: RunStatus,
    /// Claimable from (the requested time, or now).
    pub run_after: Timestamp,
    /// A debounced run's window end (`now + window`); `None` without a
    /// debounce.
    pub debounce_until: Option<Timestamp>,
    /// The `run_triggered` event (with the actor who triggered, if any).
    pub event: EventWrite,
}

/// What triggering `r` at `now` writes.
pub fn trigger(r: &NewRun, now: Timestamp) -> TriggerPlan {
    let mut run_after = r.run_after.unwrap_or(now);
    let debounce_until = r
        .debounce
        .as_ref()
        .map(|d| Timestamp(now.0.saturating_add(d.window_ms)));
    if let (Some(d), Some(until)) = (&r.debounce, debounce_until) {
        if d.keep == Keep::Last {
            // Due when the window ends (fixed: later triggers do not move it).
            run_after = run_after.max(until);
        }
    }
    let mut data = json!({ "priority": r.priority, "run_after": run_after });
    if let (Some(d), Some(until)) = (&r.debounce, debounce_until) {
        data["debounce"] = json!({ "key": d.key, "keep": d.keep.as_str(), "until": until });
    }
    if let Some(k) = &r.concurrency {
        data["concurrency_key"] = json!(k.key);
        data["concurrency_limit"] = json!(k.limit);
    }
    if let Some(from) = r.retriggered_from {
        data["retriggered_from"] = json!(from);
    }
    TriggerPlan {
        status: RunStatus::Pending,
        run_after,
        debounce_until,
        event: EventWrite {
            kind: EventKind::RunTriggered,
            data,
            fill: Fill::None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use docket_core::{RunId, Transition};

    #[test]
    fn a_new_run_is_pending_and_claimable_at_its_time() {
        let mut r = NewRun::new("j", json!({}));
        let p = trigger(&r, Timestamp(5));
        assert_eq!(p.status, RunStatus::Pending);
        assert!(p.status.apply(Transition::Claim).is_ok());
        assert_eq!(p.run_after, Timestamp(5));
        assert_eq!(p.event.data.get("retriggered_from"), None);
        r.run_after = Some(Timestamp(9));
        r.retriggered_from = Some(RunId(uuid::Uuid::from_u128(3)));
        let p = trigger(&r, Timestamp(5));
        assert_eq!(p.run_after, Timestamp(9));
        assert_eq!(p.event.data["run_after"], json!(Timestamp(9)));
        assert!(p.event.data["retriggered_from"].is_string());
    }
}
