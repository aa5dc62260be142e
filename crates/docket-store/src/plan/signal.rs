//! What sending a signal and waiting for one write, decided once for both
//! backends (docs/DURABLE.md, "Signals").
//!
//! A backend reads the run (locked), the signal id's existing row, the
//! run's open wait for the name and the oldest pending signal, calls these
//! functions, and persists the answer in the same transaction.

use super::end::{EventWrite, Fill};
use crate::signals::{SignalRecord, WaitSignal};
use crate::StoreError;
use docket_core::{EventKind, RunId, RunStatus, Timestamp};
use serde_json::{json, Value};

/// How much of a payload a `signal_received` event keeps: larger payloads
/// are kept whole in the signal's row, and the event carries this many
/// bytes of their JSON text.
pub const EVENT_EXCERPT_BYTES: usize = 4096;

/// What a send does to the run it reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Nothing: the run is not waiting for this name (the signal is kept
    /// for its next wait).
    None,
    /// The run is suspended in a wait for this name: `run_after` becomes
    /// the given time (now), and workers are woken.
    Now(Timestamp),
    /// The run is running an attempt that already recorded a wait for this
    /// name: the run's `wake_requested` flag is set, so the attempt's
    /// suspension ([`postponement_wakes`]) leaves it due at once instead of
    /// at the wait's deadline.
    AtEnd,
}

/// Whether a send to a run in `status` is allowed: a final run is refused
/// with its state named (the server's 409).
pub fn may_send(run: RunId, status: RunStatus) -> Result<(), StoreError> {
    if status.is_terminal() {
        return Err(StoreError::WrongState {
            run_id: run,
            current: status,
            message: format!("cannot signal a run that is {status}"),
        });
    }
    Ok(())
}

/// What a new signal does to its run: `waiting` is whether the run has an
/// open wait for the signal's name.
pub fn wake(status: RunStatus, run_after: Timestamp, waiting: bool, now: Timestamp) -> Wake {
    if !waiting {
        return Wake::None;
    }
    match status {
        // Suspended in the wait: due now (never later than it already is).
        RunStatus::Postponed => Wake::Now(run_after.min(now)),
        // The attempt that recorded the wait has not ended yet.
        RunStatus::Running => Wake::AtEnd,
        // Pending (a retry scheduled after the wait was recorded) or
        // waiting for a person: the signal waits for the run's next wait.
        _ => Wake::None,
    }
}

/// The rule every attempt end applies with the run's `wake_requested` flag
/// (set by [`Wake::AtEnd`]; every end clears it): an end that leaves the
/// run `postponed` makes it due at the end's time instead of its
/// postponement's. Both backends' end statements spell this rule; only a
/// postponement is cut short (a retry's backoff is not).
pub fn postponement_wakes(to: RunStatus) -> bool {
    to == RunStatus::Postponed
}

/// A payload as an event keeps it: whole up to [`EVENT_EXCERPT_BYTES`] of
/// JSON text, else `{"docket_truncated": bytes, "excerpt": "<first bytes>"}`.
pub fn excerpt(data: &Value) -> Value {
    let text = data.to_string();
    if text.len() <= EVENT_EXCERPT_BYTES {
        return data.clone();
    }
    let mut end = EVENT_EXCERPT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    json!({ "docket_truncated": text.len(), "excerpt": &text[..end] })
}

/// The `signal_received` event of a new signal.
pub fn received(sig: &SignalRecord, wake: Wake) -> EventWrite {
    let woke = match wake {
        Wake::None => Value::Null,
        Wake::Now(_) => json!("now"),
        Wake::AtEnd => json!("when_the_attempt_suspends"),
    };
    EventWrite {
        kind: EventKind::SignalReceived,
        data: json!({
            "signal_id": sig.id, "name": sig.name, "key": sig.key,
            "sent_by": sig.sent_by, "data": excerpt(&sig.data), "woke": woke,
        }),
        fill: Fill::None,
    }
}

/// What a wait does, given the run's oldest pending signal of the name
/// received by the deadline (`pending`), and the deadline (`until`: the
/// stored wait's, or the request's the first time).
#[derive(Clone, Debug, PartialEq)]
pub enum WaitPlan {
    /// Consume `pending`: mark it delivered to the wait, store the step,
    /// close the wait, append the event.
    Deliver {
        /// The step's result.
        step: Value,
        /// `signal_delivered`.
        event: EventWrite,
    },
    /// Past the deadline with none: store the step, close the wait, append
    /// the event.
    TimeOut {
        /// The step's result.
        step: Value,
        /// `signal_timed_out`.
        event: EventWrite,
    },
    /// Keep waiting; `open` is the wait row and event to write when it is
    /// not stored yet.
    Wait {
        /// `signal_waiting`, when the wait is new.
        open: Option<EventWrite>,
    },
}

/// Decides a wait. `stored_until` is the stored wait's deadline, if one is
/// stored. The deadline used is [`deadline`].
pub fn wait(
    w: &WaitSignal,
    stored_until: Option<Timestamp>,
    pending: Option<&SignalRecord>,
) -> WaitPlan {
    let until = deadline(w, stored_until);
    if let Some(sig) = pending {
        return WaitPlan::Deliver {
            step: delivered_step(sig),
            event: EventWrite {
                kind: EventKind::SignalDelivered,
                data: json!({ "wait": w.wait, "signal_id": sig.id, "name": sig.name,
                              "key": sig.key, "sent_by": sig.sent_by,
                              "received_at": sig.received_at }),
                fill: Fill::None,
            },
        };
    }
    if w.now >= until {
        return WaitPlan::TimeOut {
            step: json!({ "timeout": { "until": until } }),
            event: EventWrite {
                kind: EventKind::SignalTimedOut,
                data: json!({ "wait": w.wait, "name": w.name, "key": w.key, "until": until }),
                fill: Fill::None,
            },
        };
    }
    WaitPlan::Wait {
        open: stored_until.is_none().then(|| EventWrite {
            kind: EventKind::SignalWaiting,
            data: json!({ "wait": w.wait, "name": w.name, "key": w.key, "until": until }),
            fill: Fill::None,
        }),
    }
}

/// The wait's deadline: the stored one, else the request's (clamped to
/// the storable range).
pub fn deadline(w: &WaitSignal, stored_until: Option<Timestamp>) -> Timestamp {
    stored_until.unwrap_or_else(|| w.until.clamp(Timestamp::MIN, Timestamp::MAX))
}

/// The step result of a delivered signal (what a replay returns).
pub fn delivered_step(sig: &SignalRecord) -> Value {
    json!({ "signal": {
        "id": sig.id, "name": sig.name, "key": sig.key, "data": sig.data,
        "sent_by": sig.sent_by, "received_at": sig.received_at,
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timestamp = Timestamp(1_000_000);

    fn sig() -> SignalRecord {
        SignalRecord {
            seq: 1,
            id: "s1".into(),
            run_id: RunId::new(),
            tenant: "t".into(),
            name: "paid".into(),
            key: None,
            data: json!({"amount": 5}),
            sent_by: "api".into(),
            received_at: T,
            delivered_to: None,
            delivered_at: None,
        }
    }

    fn req(until: Timestamp, now: Timestamp) -> WaitSignal {
        WaitSignal {
            wait: "signal:paid:1".into(),
            name: "paid".into(),
            key: None,
            until,
            now,
        }
    }

    #[test]
    fn a_final_run_is_refused_by_name_of_its_state() {
        let id = RunId::new();
        assert!(may_send(id, RunStatus::Postponed).is_ok());
        assert!(may_send(id, RunStatus::Running).is_ok());
        let e = may_send(id, RunStatus::Completed).unwrap_err();
        assert!(e.to_string().contains("completed"), "{e}");
    }

    #[test]
    fn only_a_waiting_run_is_woken_and_a_running_one_at_its_end() {
        let later = T.plus_millis(10);
        assert_eq!(wake(RunStatus::Postponed, later, true, T), Wake::Now(T));
        assert_eq!(wake(RunStatus::Postponed, later, false, T), Wake::None);
        assert_eq!(wake(RunStatus::Running, later, true, T), Wake::AtEnd);
        assert_eq!(wake(RunStatus::Pending, later, true, T), Wake::None);
        assert!(postponement_wakes(RunStatus::Postponed));
        assert!(!postponement_wakes(RunStatus::Pending));
    }

    #[test]
    fn a_wait_delivers_times_out_or_waits() {
        let s = sig();
        match wait(&req(T.plus_millis(5), T), None, Some(&s)) {
            WaitPlan::Deliver { step, event } => {
                assert_eq!(step["signal"]["data"], json!({"amount": 5}));
                assert_eq!(event.kind, EventKind::SignalDelivered);
            }
            p => panic!("{p:?}"),
        }
        // The stored deadline wins over the request's.
        assert!(matches!(
            wait(
                &req(T.plus_millis(50), T.plus_millis(6)),
                Some(T.plus_millis(5)),
                None
            ),
            WaitPlan::TimeOut { .. }
        ));
        assert_eq!(
            wait(&req(T.plus_millis(5), T), None, None),
            WaitPlan::Wait {
                open: Some(EventWrite {
                    kind: EventKind::SignalWaiting,
                    data: json!({"wait": "signal:paid:1", "name": "paid", "key": null,
                                 "until": T.plus_millis(5)}),
                    fill: Fill::None,
                })
            }
        );
        assert_eq!(
            wait(&req(T.plus_millis(5), T), Some(T.plus_millis(5)), None),
            WaitPlan::Wait { open: None }
        );
    }

    #[test]
    fn large_payloads_are_excerpted_in_events() {
        let small = json!({"a": 1});
        assert_eq!(excerpt(&small), small);
        let big = json!("é".repeat(EVENT_EXCERPT_BYTES));
        let e = excerpt(&big);
        assert!(e["docket_truncated"].as_u64().unwrap() > EVENT_EXCERPT_BYTES as u64);
        assert!(e["excerpt"].as_str().unwrap().len() <= EVENT_EXCERPT_BYTES);
    }
}
