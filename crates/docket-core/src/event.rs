//! The vocabulary of a run's timeline: every kind of event Docket writes.
//!
//! Stored as today's snake_case names (`run_triggered`, `retry_scheduled`,
//! …), so existing databases stay readable. A handler may record evidence of
//! its own under any other name ([`EventKind::Custom`]); it may not record
//! one of Docket's own kinds, which would forge the engine's evidence (a
//! `run_completed` written by a handler would read as a completion).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

macro_rules! kinds {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, )*) => {
        /// What happened to a run. See the module docs.
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        pub enum EventKind {
            $( $(#[$doc])* $variant, )*
            /// Evidence a handler recorded under a name of its own
            /// (never one of the names above).
            Custom(String),
        }

        impl EventKind {
            /// Every kind Docket itself writes, in declaration order.
            pub const BUILT_IN: &'static [EventKind] = &[$(EventKind::$variant,)*];

            /// The stored name.
            pub fn as_str(&self) -> &str {
                match self {
                    $( EventKind::$variant => $name, )*
                    EventKind::Custom(name) => name,
                }
            }

            /// The kind a stored name denotes: a built-in kind by its name,
            /// anything else a [`EventKind::Custom`] one.
            pub fn parse(name: &str) -> EventKind {
                match name {
                    $( $name => EventKind::$variant, )*
                    other => EventKind::Custom(other.to_string()),
                }
            }
        }
    };
}

kinds! {
    /// A run was created (trigger, batch, retrigger, schedule).
    RunTriggered = "run_triggered",
    /// A due run was found held back by its concurrency key (one per
    /// episode: recorded when first found held, again only after it was
    /// claimed).
    RunHeld = "run_held",
    /// A trigger was collapsed into this run by the job's debounce (its
    /// mode, actor, the collapse count, and the size and SHA-256 of the
    /// input it replaced or dropped; never the input itself).
    TriggerCollapsed = "trigger_collapsed",
    /// A worker claimed the run: a new attempt under a new lease.
    AttemptStarted = "attempt_started",
    /// The handler returned: the run is completed.
    RunCompleted = "run_completed",
    /// An attempt failed (its error class, message, fingerprint).
    AttemptFailed = "attempt_failed",
    /// An attempt sent nothing (an open circuit, an action in flight
    /// elsewhere): rescheduled without spending budget.
    AttemptDeferred = "attempt_deferred",
    /// The retry policy's decision: when, why, by which policy.
    RetryScheduled = "retry_scheduled",
    /// The attempt's lease expired before it ended (reaped).
    LeaseExpired = "lease_expired",
    /// The run failed for good, with a terminal reason and advice.
    RunFailed = "run_failed",
    /// The run was postponed (by its handler or an operator).
    RunPostponed = "run_postponed",
    /// The handler asked for operator input.
    InputRequested = "input_requested",
    /// An operator answered (approve/reject) a request for input.
    InputReceived = "input_received",
    /// The run was cancelled.
    RunCancelled = "run_cancelled",
    /// An operator asked a running run to cancel at its next step boundary.
    CancelRequested = "cancel_requested",
    /// A shutting-down worker gave the run back without spending budget.
    AttemptReleased = "attempt_released",
    /// A write under a lease that no longer held the run was refused.
    StaleWriteRefused = "stale_write_refused",
    /// An operator retried a final run (fresh budget, maybe new variables).
    OperatorRetry = "operator_retry",
    /// An operator skipped the run's failed step.
    OperatorSkip = "operator_skip",
    /// A durable step completed (its result is stored).
    StepCompleted = "step_completed",
    /// A durable step failed.
    StepFailed = "step_failed",
    /// A failed step was skipped by an operator.
    StepSkipped = "step_skipped",
    /// A ledger-guarded action took its idempotency key (before sending).
    ActionStarted = "action_started",
    /// The action's effect is committed (its result is stored).
    ActionCommitted = "action_committed",
    /// The remote side answered that the action was not done.
    ActionFailed = "action_failed",
    /// The action's outcome is unknown (a timeout): reconcile before repeating.
    ActionUnknown = "action_unknown",
    /// Reconciliation found out what an unknown action did.
    ActionReconciled = "action_reconciled",
    /// Another live attempt holds the action's key: this one waits.
    ActionInFlight = "action_in_flight",
    /// A ledger write that lost its compare-and-set was refused.
    LedgerWriteRefused = "ledger_write_refused",
    /// A committed action was not repeated; its stored result was returned.
    DuplicateSuppressed = "duplicate_suppressed",
    /// The handler reported progress.
    Progress = "progress",
    /// The handler logged a line.
    Log = "log",
    /// An HTTP job's response (status, timing, bounded excerpt).
    HttpResponse = "http_response",
    /// A connection's circuit breaker opened.
    CircuitOpened = "circuit_opened",
    /// A connection's circuit breaker let a probe through.
    CircuitHalfOpen = "circuit_half_open",
    /// A connection's circuit breaker closed again.
    CircuitClosed = "circuit_closed",
    /// The breaker that deferred this run (`circuit_open`) closed before
    /// the time the run was deferred to: the run is due at once (data: the
    /// connection and the time it was deferred to). Written by the close's
    /// transaction.
    DeferralReleased = "deferral_released",
    /// The pruner deleted final runs of a job (counts, not one per run;
    /// recorded on no run).
    RunsPruned = "runs_pruned",
    /// The pruner deleted ledger rows past the ledger window.
    LedgerPruned = "ledger_pruned",
    /// An operator paused a job (or every job of a tenant).
    JobPaused = "job_paused",
    /// An operator resumed a paused job.
    JobResumed = "job_resumed",
    /// An operator deleted a final run.
    RunDeleted = "run_deleted",
    /// The run spawned a child run (`ctx.spawn`; data: the step, the child's id,
    /// job and cancel policy).
    ChildSpawned = "child_spawned",
    /// The run suspended until the children it joins are final (data: how
    /// many it still waits for, of how many).
    WaitingForChildren = "waiting_for_children",
    /// A parent's cancel cancelled this child (its policy was `cancel`).
    CancelledWithParent = "cancelled_with_parent",
    /// A signal was sent to the run (who sent it, its name, key and a
    /// bounded excerpt of its payload); kept until a wait consumes it.
    SignalReceived = "signal_received",
    /// The run began waiting for a signal (its name, key and deadline).
    SignalWaiting = "signal_waiting",
    /// A wait consumed a signal: stored as the wait's result.
    SignalDelivered = "signal_delivered",
    /// A wait for a signal reached its deadline with none delivered.
    SignalTimedOut = "signal_timed_out",
}

impl EventKind {
    /// Whether Docket itself writes this kind (handlers may not).
    pub fn is_built_in(&self) -> bool {
        !matches!(self, EventKind::Custom(_))
    }

    /// A kind for evidence a handler records under `name`: refused when
    /// `name` is one of Docket's own kinds, empty, longer than 64 bytes or
    /// not made of ASCII letters, digits, `_`, `.` and `-`.
    pub fn custom(name: &str) -> Result<EventKind, InvalidEventKind> {
        let bad = |why: &'static str| {
            Err(InvalidEventKind {
                name: name.chars().take(80).collect(),
                why,
            })
        };
        if name.is_empty() || name.len() > 64 {
            return bad("must be 1 to 64 bytes");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return bad("may contain only ASCII letters, digits, '_', '.' and '-'");
        }
        match EventKind::parse(name) {
            EventKind::Custom(n) => Ok(EventKind::Custom(n)),
            _ => bad("is one of Docket's own event kinds, which only the engine writes"),
        }
    }
}

/// A handler asked to record evidence under a name it may not use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("event kind {name:?} {why}")]
pub struct InvalidEventKind {
    /// The name (cut to 80 characters).
    pub name: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// The kind a stored name denotes (see [`EventKind::parse`]). Use
/// [`EventKind::custom`] to check a name a handler chose.
impl From<&str> for EventKind {
    fn from(name: &str) -> EventKind {
        EventKind::parse(name)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<str> for EventKind {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for EventKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for EventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<EventKind> for &str {
    fn eq(&self, other: &EventKind) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<EventKind> for str {
    fn eq(&self, other: &EventKind) -> bool {
        self == other.as_str()
    }
}

impl Serialize for EventKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Ok(EventKind::parse(&name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_kind_round_trips_through_its_stored_name() {
        let mut names = std::collections::HashSet::new();
        for k in EventKind::BUILT_IN {
            assert!(names.insert(k.as_str()), "{k} named twice");
            assert_eq!(&EventKind::parse(k.as_str()), k);
            assert!(k.is_built_in());
            let json = serde_json::to_value(k).unwrap();
            assert_eq!(json, serde_json::json!(k.as_str()));
            assert_eq!(serde_json::from_value::<EventKind>(json).unwrap(), *k);
        }
        // Pinned names: stored data depends on them.
        assert_eq!(EventKind::RetryScheduled.as_str(), "retry_scheduled");
        assert_eq!(EventKind::StaleWriteRefused.as_str(), "stale_write_refused");
    }

    #[test]
    fn unknown_names_read_as_custom_and_handlers_cannot_forge_built_in_kinds() {
        assert_eq!(
            EventKind::parse("crm_synced"),
            EventKind::Custom("crm_synced".into())
        );
        assert_eq!(
            EventKind::custom("crm.synced-v2"),
            Ok(EventKind::Custom("crm.synced-v2".into()))
        );
        let forged = EventKind::custom("run_completed").unwrap_err();
        assert!(forged.to_string().contains("Docket's own"), "{forged}");
        assert!(EventKind::custom("").is_err());
        assert!(EventKind::custom("has space").is_err());
        assert!(EventKind::custom(&"x".repeat(65)).is_err());
    }
}
