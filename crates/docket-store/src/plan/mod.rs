//! Pure decisions about what a store operation changes, computed once for
//! every backend. A backend reads the rows a decision needs, calls the
//! function here, and persists the answer in its own SQL inside the same
//! transaction; it decides nothing itself (River's driver design,
//! TigerBeetle's "compute what changes, then apply it").
//!
//! - [`trigger`]: what a new run starts with;
//! - [`claim`]: which runs a claim takes and what it writes to each;
//! - [`concurrency`]: which keyed runs a claim takes, and which it finds held;
//! - [`fair`]: how a claim shares its slots among tenants;
//! - [`end`]: an attempt's end (each outcome) and a refused stale end;
//! - [`operator`]: each operator command;
//! - [`step`]: a durable step's completion or failure;
//! - [`schedule`]: what a schedule's tick records;
//! - [`rate`]: what taking a rate limit's token writes;
//! - [`breaker`]: what a circuit breaker's close releases;
//! - this module: the idempotency ledger's begin and compare-and-set.

pub mod breaker;
pub mod child;
pub mod claim;
pub mod concurrency;
pub mod debounce;
pub mod end;
pub mod fair;
pub mod operator;
pub mod rate;
pub mod schedule;
pub mod signal;
pub mod step;
pub mod trigger;

use crate::model::{LedgerEntry, LedgerState, LedgerWrite};
use crate::StoreError;
use docket_core::{LeaseId, RunId, Timestamp};
use serde_json::{json, Value};

/// What is known about the attempt that holds a ledger row, read in the
/// same transaction as the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// The holder's run is `running` under the row's lease, and that lease
    /// expires at the given time, which is later than `now`.
    Live {
        /// When the holder's lease expires unless renewed.
        lease_expires_at: Timestamp,
    },
    /// The holder's attempt is over: its run is no longer running under the
    /// row's lease, or the lease has expired.
    Gone,
}

impl Holder {
    /// Liveness from the holder run's current columns: live when it is
    /// running under `row_lease` and that lease expires after `now`.
    pub fn from_run(
        running: bool,
        run_lease: Option<LeaseId>,
        lease_expires_at: Option<Timestamp>,
        row_lease: LeaseId,
        now: Timestamp,
    ) -> Holder {
        match lease_expires_at {
            Some(t) if running && run_lease == Some(row_lease) && t > now => Holder::Live {
                lease_expires_at: t,
            },
            _ => Holder::Gone,
        }
    }
}

/// What `ledger_begin` does with a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BeginPlan {
    /// No row: insert it `started` under the caller's lease.
    Insert,
    /// Replace the row with `started` under the caller's lease. When
    /// `reconcile_first`, the previous outcome is unknown.
    TakeOver {
        /// The previous holder may have sent: reconcile before sending.
        reconcile_first: bool,
    },
    /// Committed: change nothing, return the row.
    ReturnCommitted,
    /// Another live attempt holds it: change nothing but record that the
    /// caller found it in flight.
    InFlight {
        /// When the holder's lease expires unless renewed.
        holder_lease_expires_at: Timestamp,
    },
}

/// Decides what `ledger_begin` does, from the current row, what is known
/// of its holder (needed only for a `started` row held by another lease)
/// and the caller's lease.
///
/// - `committed` is final: returned, never taken over;
/// - `started` under the caller's own lease is the caller's (a second
///   begin in the same attempt changes nothing of substance);
/// - `started` under another lease: in flight while that lease is live,
///   otherwise the holder died mid-call: taken over, reconcile first;
/// - `unknown`: taken over, reconcile first;
/// - `failed_retryable` / `failed_terminal`: the remote side answered
///   that it did not do it: taken over, nothing to reconcile.
pub fn ledger_begin(current: Option<&LedgerEntry>, holder: Holder, caller: LeaseId) -> BeginPlan {
    let Some(row) = current else {
        return BeginPlan::Insert;
    };
    match row.state {
        LedgerState::Committed => BeginPlan::ReturnCommitted,
        LedgerState::Started if row.lease_id == caller => BeginPlan::TakeOver {
            reconcile_first: false,
        },
        LedgerState::Started => match holder {
            Holder::Live { lease_expires_at } => BeginPlan::InFlight {
                holder_lease_expires_at: lease_expires_at,
            },
            Holder::Gone => BeginPlan::TakeOver {
                reconcile_first: true,
            },
        },
        LedgerState::Unknown => BeginPlan::TakeOver {
            reconcile_first: true,
        },
        LedgerState::FailedRetryable | LedgerState::FailedTerminal => BeginPlan::TakeOver {
            reconcile_first: false,
        },
    }
}

/// Why a ledger write was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerRefusal {
    /// The row's state (`None`: there is no row).
    pub current: Option<LedgerState>,
    /// The run that holds or last wrote the row.
    pub holder_run: Option<RunId>,
    /// One sentence for the evidence.
    pub reason: &'static str,
}

/// Decides whether the caller's attempt may move the row to `next`:
/// compare-and-set on (state = `started`, lease = caller's). `started`
/// itself is only ever written by [`ledger_begin`].
pub fn ledger_write(
    current: Option<&LedgerEntry>,
    caller: LeaseId,
    next: LedgerState,
) -> Result<(), LedgerRefusal> {
    let refuse = |reason| LedgerRefusal {
        current: current.map(|r| r.state),
        holder_run: current.map(|r| r.run_id),
        reason,
    };
    if next == LedgerState::Started {
        return Err(refuse("a row becomes started only through ledger_begin"));
    }
    let Some(row) = current else {
        return Err(refuse("no started row: the action was not begun"));
    };
    if row.state == LedgerState::Committed {
        return Err(refuse("committed is final"));
    }
    if row.state != LedgerState::Started {
        return Err(refuse("the row is not started: its attempt already ended"));
    }
    if row.lease_id != caller {
        return Err(refuse("another attempt holds the row"));
    }
    Ok(())
}

/// The `action_started` event of a begin that took the key: what the row
/// was before, and whether the outcome must be reconciled first.
pub fn begin_event(
    action: &str,
    key: &str,
    previous: Option<&LedgerEntry>,
    plan: BeginPlan,
) -> Value {
    json!({
        "action": action,
        "idempotency_key": key,
        "state": LedgerState::Started,
        "error_class": null,
        "message": null,
        "previous_state": previous.map(|p| p.state),
        "previous_run": previous.map(|p| p.run_id),
        "reconcile_first": matches!(plan, BeginPlan::TakeOver { reconcile_first: true }),
    })
}

/// The `action_in_flight` event: the caller found the key held by another
/// live attempt and did not send. Names the holder, so the forensic view
/// can report the duplicate dispatch from evidence alone.
pub fn in_flight_event(entry: &LedgerEntry, holder_lease_expires_at: Timestamp) -> Value {
    json!({
        "action": entry.action,
        "idempotency_key": entry.idempotency_key,
        "held_by_run": entry.run_id,
        "held_by_attempt": entry.attempt,
        "held_by_lease": entry.lease_id,
        "holder_lease_expires_at": holder_lease_expires_at,
    })
}

/// The event of an accepted ledger write.
pub fn write_event(w: &LedgerWrite) -> Value {
    json!({
        "action": w.action,
        "idempotency_key": w.idempotency_key,
        "state": w.state,
        "error_class": w.error_class,
        "message": w.error_message,
    })
}

/// The `ledger_write_refused` event: what was asked, and what the row is.
pub fn refused_event(w: &LedgerWrite, attempted_event: &str, r: &LedgerRefusal) -> Value {
    json!({
        "action": w.action,
        "idempotency_key": w.idempotency_key,
        "attempted": w.state,
        "attempted_event": attempted_event,
        "error_class": w.error_class,
        "message": w.error_message,
        "current_state": r.current,
        "held_by_run": r.holder_run,
        "reason": r.reason,
    })
}

/// The error a refused ledger write answers with.
pub fn refusal_error(w: &LedgerWrite, r: &LedgerRefusal, caller_run: RunId) -> StoreError {
    match r.current {
        Some(current) => StoreError::LedgerConflict {
            idempotency_key: w.idempotency_key.clone(),
            attempted: w.state,
            current,
            holder_run: r.holder_run.unwrap_or(caller_run),
        },
        None => StoreError::Conflict(format!("ledger key `{}`: {}", w.idempotency_key, r.reason)),
    }
}

/// The `stale_write_refused` event's data for a lease-fenced write other
/// than an end (a step, a ledger write, an appended event) whose lease no
/// longer holds the run: what it attempted and the run as it stands.
pub fn stale_write(
    attempted: &str,
    current_status: docket_core::RunStatus,
    current_lease: Option<LeaseId>,
    current_attempt: u32,
) -> Value {
    json!({
        "attempted": attempted,
        "current_status": current_status,
        "current_lease_id": current_lease,
        "current_attempt": current_attempt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: LedgerState, lease: LeaseId) -> LedgerEntry {
        LedgerEntry {
            tenant: "t".into(),
            idempotency_key: "k".into(),
            action: "a".into(),
            run_id: RunId::new(),
            attempt: 1,
            lease_id: lease,
            state,
            result: None,
            error_class: None,
            error_message: None,
            created_at: Timestamp(1),
            updated_at: Timestamp(1),
        }
    }

    #[test]
    fn begin_by_state_and_holder() {
        let (me, other) = (LeaseId::new(), LeaseId::new());
        let live = Holder::Live {
            lease_expires_at: Timestamp(50),
        };
        assert_eq!(ledger_begin(None, Holder::Gone, me), BeginPlan::Insert);
        let c = row(LedgerState::Committed, other);
        assert_eq!(ledger_begin(Some(&c), live, me), BeginPlan::ReturnCommitted);
        let s = row(LedgerState::Started, other);
        assert_eq!(
            ledger_begin(Some(&s), live, me),
            BeginPlan::InFlight {
                holder_lease_expires_at: Timestamp(50)
            }
        );
        assert_eq!(
            ledger_begin(Some(&s), Holder::Gone, me),
            BeginPlan::TakeOver {
                reconcile_first: true
            }
        );
        let mine = row(LedgerState::Started, me);
        assert_eq!(
            ledger_begin(Some(&mine), live, me),
            BeginPlan::TakeOver {
                reconcile_first: false
            }
        );
        let u = row(LedgerState::Unknown, other);
        assert_eq!(
            ledger_begin(Some(&u), live, me),
            BeginPlan::TakeOver {
                reconcile_first: true
            }
        );
        for st in [LedgerState::FailedRetryable, LedgerState::FailedTerminal] {
            assert_eq!(
                ledger_begin(Some(&row(st, other)), live, me),
                BeginPlan::TakeOver {
                    reconcile_first: false
                }
            );
        }
    }

    #[test]
    fn holder_is_live_only_running_under_the_rows_lease_before_expiry() {
        let l = LeaseId::new();
        let now = Timestamp(10);
        assert_eq!(
            Holder::from_run(true, Some(l), Some(Timestamp(11)), l, now),
            Holder::Live {
                lease_expires_at: Timestamp(11)
            }
        );
        assert_eq!(
            Holder::from_run(true, Some(l), Some(Timestamp(10)), l, now),
            Holder::Gone
        );
        assert_eq!(
            Holder::from_run(false, Some(l), Some(Timestamp(11)), l, now),
            Holder::Gone
        );
        assert_eq!(
            Holder::from_run(true, Some(LeaseId::new()), Some(Timestamp(11)), l, now),
            Holder::Gone
        );
    }

    #[test]
    fn writes_are_compare_and_set_on_the_callers_started_row() {
        let (me, other) = (LeaseId::new(), LeaseId::new());
        let mine = row(LedgerState::Started, me);
        for next in [
            LedgerState::Committed,
            LedgerState::Unknown,
            LedgerState::FailedRetryable,
            LedgerState::FailedTerminal,
        ] {
            assert_eq!(ledger_write(Some(&mine), me, next), Ok(()));
            // Only the holder moves it on.
            assert!(ledger_write(Some(&mine), other, next).is_err());
            // Committed is final, also for the attempt that committed it.
            let c = row(LedgerState::Committed, me);
            let e = ledger_write(Some(&c), me, next).unwrap_err();
            assert_eq!(e.current, Some(LedgerState::Committed));
            assert_eq!(e.reason, "committed is final");
        }
        assert!(ledger_write(Some(&mine), me, LedgerState::Started).is_err());
        assert!(ledger_write(None, me, LedgerState::Committed).is_err());
        let ended = row(LedgerState::Unknown, me);
        assert!(ledger_write(Some(&ended), me, LedgerState::Committed).is_err());
    }
}
