//! What a durable step's write does, decided once for both backends: a
//! completed or skipped step is final (a second completion under the same
//! name is refused, so a completed step never runs again); a failed one may
//! be failed again or completed by a later attempt.

use super::end::{EventWrite, Fill};
use crate::StoreError;
use docket_core::{ErrorClass, EventKind, RunId};
use serde_json::json;

/// Whether a step whose row has `existing` status (`None`: no row) may be
/// written again; the refusal names the step and its status.
pub fn may_write(existing: Option<&str>, run: RunId, name: &str) -> Result<(), StoreError> {
    match existing {
        Some(s @ ("completed" | "skipped")) => Err(StoreError::Conflict(format!(
            "step `{name}` of run {run} is already {s}; step names must be unique within a run"
        ))),
        _ => Ok(()),
    }
}

/// The `step_completed` event.
pub fn completed(name: &str) -> EventWrite {
    EventWrite {
        kind: EventKind::StepCompleted,
        data: json!({ "step": name }),
        fill: Fill::None,
    }
}

/// The `step_failed` event.
pub fn failed(name: &str, class: ErrorClass, message: &str) -> EventWrite {
    EventWrite {
        kind: EventKind::StepFailed,
        data: json!({ "step": name, "error_class": class, "message": message }),
        fill: Fill::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completed_or_skipped_step_is_final_and_a_failed_one_is_not() {
        let run = RunId(uuid::Uuid::from_u128(1));
        assert!(may_write(None, run, "a").is_ok());
        assert!(may_write(Some("failed"), run, "a").is_ok());
        for s in ["completed", "skipped"] {
            let e = may_write(Some(s), run, "charge").unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("`charge` of run {run} is already {s}")),
                "{e}"
            );
        }
        assert_eq!(
            failed("a", ErrorClass::Timeout, "m").data["error_class"],
            json!("timeout")
        );
    }
}
