//! What a schedule's tick writes, decided once for both backends. The
//! scheduler (in the engine) decided which slots fire, skip or wait; the
//! store checks the tick may still apply, fires each firing slot through the
//! idempotent trigger, and records what happened with these functions.

use crate::schedules::{Schedule, ScheduleTick, SlotKind};
use crate::{StoreError, Triggered};
use docket_core::{RunId, Timestamp};
use serde_json::{json, Value};

/// Whether the tick applies to the schedule as stored: a tick computed
/// from another cursor (another scheduler got there first, or a resumed old
/// leader) changes nothing. The leadership token is checked separately, in
/// the same transaction.
pub fn applies(stored: &Schedule, t: &ScheduleTick) -> bool {
    t.expect_cursor
        .is_none_or(|expect| stored.cursor_at == expect)
}

/// The cursor the tick writes: only a tick that read one (a scheduler's
/// round) moves it; a manual fire or backfill does not.
pub fn new_cursor(t: &ScheduleTick) -> Option<Timestamp> {
    t.new_cursor.filter(|_| t.expect_cursor.is_some())
}

/// Whether a slot of this kind makes a run.
pub fn fires(kind: SlotKind) -> bool {
    !matches!(kind, SlotKind::Skipped | SlotKind::Buffered)
}

/// A firing slot must come with its run.
pub fn missing_run(slot: Timestamp, kind: SlotKind) -> StoreError {
    StoreError::Conflict(format!("slot {slot} is `{}` but has no run", kind.as_str()))
}

/// The schedule's last fired slot and its run, moved forward by each slot
/// the tick fires (never back: a backfilled slot older than the last one
/// keeps it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastFired {
    /// The newest slot that made a run.
    pub slot: Option<Timestamp>,
    /// Its run.
    pub run: Option<RunId>,
}

impl LastFired {
    /// As stored before the tick.
    pub fn of(stored: &Schedule) -> LastFired {
        LastFired {
            slot: stored.last_slot,
            run: stored.last_run_id,
        }
    }

    /// Records that `slot` fired as `t` at `now`; answers the history row's
    /// data (whether the run already existed, and how late the slot fired).
    pub fn fired(&mut self, slot: Timestamp, now: Timestamp, t: &Triggered) -> Value {
        if self.slot.is_none_or(|l| slot >= l) {
            self.slot = Some(slot);
            self.run = Some(t.run.id);
        }
        json!({ "existing": t.existing, "late_ms": now.millis_since(slot) })
    }

    /// Whether the tick fired a new last run (`last_fired_at` moves).
    pub fn moved_from(&self, stored: &Schedule) -> bool {
        self.run != stored.last_run_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Run;

    fn triggered(id: u128, existing: bool) -> Triggered {
        let run: Run = serde_json::from_value(json!({
            "id": RunId(uuid::Uuid::from_u128(id)), "tenant": "t", "job": "j", "status": "pending",
            "priority": 0, "input": {}, "variables": {}, "output": null, "attempt": 0,
            "attempts_forgiven": 0, "run_after": 0, "retriggered_from": null, "lease_id": null,
            "lease_expires_at": null, "worker": null, "created_at": 0, "updated_at": 0,
            "finished_at": null, "terminal_reason": null, "last_error_class": null,
            "last_error_message": null, "idempotency_key": null, "correlation_id": null,
            "input_request": null, "cancel_requested": false
        }))
        .expect("a run");
        Triggered {
            run,
            existing,
            collapsed: false,
        }
    }

    #[test]
    fn the_last_fired_slot_moves_forward_never_back() {
        let mut last = LastFired {
            slot: Some(Timestamp(1_000)),
            run: Some(RunId(uuid::Uuid::from_u128(1))),
        };
        let data = last.fired(Timestamp(2_000), Timestamp(2_500), &triggered(2, false));
        assert_eq!(data, json!({ "existing": false, "late_ms": 500 }));
        assert_eq!(last.slot, Some(Timestamp(2_000)));
        assert_eq!(last.run, Some(RunId(uuid::Uuid::from_u128(2))));
        // A backfilled older slot fires, but the last fired slot stays.
        let data = last.fired(Timestamp(500), Timestamp(2_500), &triggered(3, true));
        assert_eq!(data["existing"], json!(true));
        assert_eq!(last.slot, Some(Timestamp(2_000)));
        assert_eq!(last.run, Some(RunId(uuid::Uuid::from_u128(2))));
        assert!(fires(SlotKind::Fired) && !fires(SlotKind::Skipped) && !fires(SlotKind::Buffered));
    }
}
