//! Errors of the public API and of handlers.

use docket_core::{ErrorClass, RunStatus, Timestamp};
use docket_store::StoreError;
use std::fmt;

/// What a handler returns when it fails. The class decides the retry.
#[derive(Clone, Debug, PartialEq)]
pub struct JobError {
    /// The failure's class.
    pub class: ErrorClass,
    /// A message for the operator (stored, bounded to 4 KiB).
    pub message: String,
    /// A provider's reset time (Retry-After), honoured when later than the
    /// policy's delay.
    pub retry_after: Option<Timestamp>,
    /// The step or action that failed, if known.
    pub action: Option<String>,
    /// Not a failure: the handler suspends the run (input, postpone,
    /// cancel). Made only by [`Ctx`](crate::Ctx) methods.
    pub(crate) control: Option<Box<Control>>,
    /// The failing action's idempotency key, for the fingerprint.
    pub(crate) key: Option<String>,
}

/// How a handler suspends its run instead of failing it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Control {
    NeedsInput {
        name: String,
        request: serde_json::Value,
    },
    Postpone {
        until: Timestamp,
    },
    Cancelled,
    /// A circuit breaker is open: reschedule at `until` as a retry decision
    /// with reason `circuit_open`, consuming no attempt.
    CircuitOpen {
        until: Timestamp,
        breaker: String,
    },
    /// Another live attempt holds an action's idempotency key: reschedule
    /// at `until` with reason `action_in_flight`, consuming no attempt.
    ActionInFlight {
        until: Timestamp,
    },
    /// The handler joins children that are not all final: the run is
    /// postponed until the last of them ends (`Ctx::join`).
    AwaitChildren {
        waiting: u32,
        of: u32,
    },
    /// A rate limit's bucket had no token: reschedule at `until` (the token
    /// reserved for this run) with reason `rate_limited`, consuming no
    /// attempt.
    RateLimited {
        until: Timestamp,
        key: String,
    },
    /// Fail the run at once with this terminal reason, no retry.
    Terminal {
        reason: docket_core::TerminalReason,
    },
}

impl JobError {
    /// A failure of class `class`.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        JobError {
            class,
            message: message.into(),
            retry_after: None,
            action: None,
            control: None,
            key: None,
        }
    }
    /// The worker stopped waiting (retryable).
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Timeout, message)
    }
    /// A connection failure (retryable).
    pub fn network(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Network, message)
    }
    /// A 502/503/504 or overload (retryable).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Unavailable, message)
    }
    /// Rate limited, with the provider's reset time if known (retryable).
    pub fn rate_limited(message: impl Into<String>, retry_after: Option<Timestamp>) -> Self {
        JobError {
            retry_after,
            ..Self::new(ErrorClass::RateLimited, message)
        }
    }
    /// Input the job cannot process (terminal).
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::InvalidInput, message)
    }
    /// A failure retrying will not fix (terminal).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Permanent, message)
    }
    pub(crate) fn control(control: Control, message: &str) -> Self {
        JobError {
            control: Some(Box::new(control)),
            ..Self::permanent(message)
        }
    }

    /// True when this is not a failure but the handler suspending its run
    /// (waiting for input, postponing, stopping for a cancel). Propagate it
    /// with `?`; never swallow it.
    pub fn is_suspension(&self) -> bool {
        self.control.is_some()
    }

    /// The request was not sent because the circuit breaker `breaker` is open
    /// until `until`: the run is rescheduled to that time as a retry decision
    /// with reason `circuit_open`, consuming no attempt.
    pub fn circuit_open(
        breaker: impl Into<String>,
        until: Timestamp,
        message: impl Into<String>,
    ) -> Self {
        JobError {
            control: Some(Box::new(Control::CircuitOpen {
                until,
                breaker: breaker.into(),
            })),
            ..Self::new(ErrorClass::Unavailable, message)
        }
    }

    /// Fails the run at once with `reason` (e.g. `rejected` after an operator
    /// rejected an approval and the job says that ends it), no retry.
    pub fn terminal(reason: docket_core::TerminalReason, message: impl Into<String>) -> Self {
        JobError {
            control: Some(Box::new(Control::Terminal { reason })),
            ..Self::new(ErrorClass::Permanent, message)
        }
    }

    pub(crate) fn with_key(mut self, key: &str) -> Self {
        self.key = Some(key.to_string());
        self
    }

    /// The failing action's idempotency key, when an action failed.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Names the step or action that failed.
    pub fn in_action(mut self, action: impl Into<String>) -> Self {
        self.action = Some(action.into());
        self
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.message)
    }
}

impl std::error::Error for JobError {}

/// Errors of the [`Docket`](crate::Docket) API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A job definition breaks a rule (named in the message).
    #[error("invalid job `{job}`: {problem}")]
    InvalidJob {
        /// The job.
        job: String,
        /// What is wrong.
        problem: String,
    },
    /// No job of that name is registered.
    #[error("unknown job `{0}`: register it before triggering it")]
    UnknownJob(String),
    /// The input exceeds the configured limit.
    #[error("content_too_large: input of job `{job}` is {size} bytes, the limit is {limit} bytes")]
    ContentTooLarge {
        /// The job.
        job: String,
        /// The input's serialized size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A request's data is unusable (named in the message).
    #[error("invalid_input: {0}")]
    InvalidInput(String),
    /// No run with that id.
    #[error("run {0} not found")]
    RunNotFound(docket_core::RunId),
    /// Waiting for a run ran out of time; the run as last seen.
    #[error("run {} is still {} after waiting", .0.id, .0.status)]
    WaitTimedOut(Box<docket_store::Run>),
    /// A schedule definition is invalid: the field and the problem (with
    /// the position in a cron expression).
    #[error("invalid schedule `{schedule}`: `{field}`: {message}")]
    InvalidSchedule {
        /// The schedule.
        schedule: String,
        /// The field (`cron`, `every`, `timezone`, …).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// No schedule of that name (in that tenant).
    #[error("schedule `{0}` not found")]
    ScheduleNotFound(String),
    /// An operation the run's state does not allow.
    #[error("run {run_id} is {current}: {message}")]
    WrongState {
        /// The run.
        run_id: docket_core::RunId,
        /// Its status.
        current: RunStatus,
        /// What was refused.
        message: String,
    },
}

/// The API's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
