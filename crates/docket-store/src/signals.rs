//! Durable signals: named messages with data, delivered to runs that wait
//! for them (docs/DURABLE.md, "Signals").
//!
//! A signal is sent to one run (by id) or, by correlation key, to every
//! run of a tenant that waits for its name and key at that moment. Each
//! signal a run receives is one row of `signals`, pending until a wait of
//! that run consumes it. A wait is a durable step (`signal:NAME:N`): the
//! consumed signal becomes the step's result in the transaction that marks
//! the signal delivered, so a signal is delivered exactly once even when
//! the worker dies between the two (there is no "between").
//!
//! What each operation writes is decided by [`crate::plan::signal`], once
//! for both backends.

use crate::Result;
use async_trait::async_trait;
use docket_core::{RunId, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The largest signal payload, as serialized JSON: 64 KiB. Larger ones are
/// refused (the server answers 413) before anything is written.
pub const MAX_SIGNAL_BYTES: usize = 64 * 1024;

/// The longest signal name, wait name or signal id, in bytes.
pub const MAX_SIGNAL_NAME: usize = 128;

/// The longest correlation key, in bytes.
pub const MAX_SIGNAL_KEY: usize = 256;

/// Checks a signal name (also used for signal ids): 1 to
/// [`MAX_SIGNAL_NAME`] bytes of ASCII letters, digits, `_`, `.`, `-`. The
/// message names `field`.
pub fn check_name(field: &str, name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > MAX_SIGNAL_NAME {
        return Err(format!(
            "`{field}` must be 1 to {MAX_SIGNAL_NAME} bytes long (got {})",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "`{field}` may contain only ASCII letters, digits, `_`, `.` and `-` (found {c:?})"
        ));
    }
    Ok(())
}

/// Checks a correlation key: 1 to [`MAX_SIGNAL_KEY`] bytes, no control
/// characters. Keys are compared exactly (bytes; no case folding, no
/// trimming).
pub fn check_key(field: &str, key: &str) -> std::result::Result<(), String> {
    if key.is_empty() || key.len() > MAX_SIGNAL_KEY {
        return Err(format!(
            "`{field}` must be 1 to {MAX_SIGNAL_KEY} bytes long (got {})",
            key.len()
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(format!("`{field}` must not contain control characters"));
    }
    Ok(())
}

/// Checks a payload's size: its JSON text is at most [`MAX_SIGNAL_BYTES`].
/// Answers the size when it is too large.
pub fn check_payload(data: &Value) -> std::result::Result<(), usize> {
    let n = serde_json::to_vec(data)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if n > MAX_SIGNAL_BYTES {
        return Err(n);
    }
    Ok(())
}

/// One signal received by one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignalRecord {
    /// Arrival order, across the store (a later signal has a larger one).
    pub seq: i64,
    /// The signal's id: the sender's `signal_id`, or one Docket made.
    pub id: String,
    /// The run it was sent to.
    pub run_id: RunId,
    /// The run's tenant.
    pub tenant: String,
    /// Its name.
    pub name: String,
    /// The correlation key it was sent by, if it was.
    pub key: Option<String>,
    /// Its payload.
    pub data: Value,
    /// Who sent it (a token's name, `api`, `rust`, …).
    pub sent_by: String,
    /// When the store received it.
    pub received_at: Timestamp,
    /// The wait (step name, `signal:NAME:N`) that consumed it; `None` while
    /// it is pending.
    pub delivered_to: Option<String>,
    /// When it was consumed.
    pub delivered_at: Option<Timestamp>,
}

/// A signal for one run, by id.
#[derive(Clone, Debug, PartialEq)]
pub struct SendSignal {
    /// The run.
    pub run_id: RunId,
    /// When set, the run must belong to this tenant (else
    /// [`StoreError::NotFound`](crate::StoreError::NotFound): another
    /// tenant's run does not exist for the caller).
    pub tenant: Option<String>,
    /// The signal's name ([`check_name`]).
    pub name: String,
    /// Its id: the same id for the same run twice is one signal (the
    /// second send answers the first, [`Sent::duplicate`]).
    pub signal_id: String,
    /// Its payload (at most [`MAX_SIGNAL_BYTES`]).
    pub data: Value,
    /// Who sends it.
    pub sent_by: String,
    /// Now.
    pub now: Timestamp,
}

/// A signal for every run of a tenant waiting for its name and key.
#[derive(Clone, Debug, PartialEq)]
pub struct SendKeyed {
    /// The tenant whose runs it reaches.
    pub tenant: String,
    /// The signal's name.
    pub name: String,
    /// The correlation key: exact match.
    pub key: String,
    /// Its id (one signal per run and id, as for [`SendSignal`]).
    pub signal_id: String,
    /// Its payload.
    pub data: Value,
    /// Who sends it.
    pub sent_by: String,
    /// Now.
    pub now: Timestamp,
}

/// What a send did to one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    /// The signal as stored (the original one for a duplicate).
    pub signal: SignalRecord,
    /// The id was already stored for this run: nothing was written.
    pub duplicate: bool,
    /// The run was waiting for this name and was made due now (or, when
    /// it was still running its attempt, will be due as soon as that
    /// attempt suspends).
    pub woke: bool,
}

/// A wait for a signal by the attempt holding the run's lease.
#[derive(Clone, Debug, PartialEq)]
pub struct WaitSignal {
    /// The wait's step name, `signal:NAME:N` (the N-th wait for NAME in
    /// the run).
    pub wait: String,
    /// The signal's name.
    pub name: String,
    /// The correlation key the wait can be reached by (`POST /api/signals`).
    pub key: Option<String>,
    /// The deadline, used the first time (a stored wait keeps its own).
    pub until: Timestamp,
    /// Now.
    pub now: Timestamp,
}

/// What a wait found.
#[derive(Clone, Debug, PartialEq)]
pub enum WaitOutcome {
    /// A signal was consumed and stored as the wait's result.
    Delivered(Box<SignalRecord>),
    /// The deadline passed with none: stored as the wait's result.
    TimedOut {
        /// The deadline.
        until: Timestamp,
    },
    /// None yet: the run should suspend until `until` (a signal for this
    /// name makes it due earlier).
    Waiting {
        /// The deadline.
        until: Timestamp,
    },
}

/// A run's open wait for a signal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignalWaitRecord {
    /// The run.
    pub run_id: RunId,
    /// The wait's step name.
    pub wait: String,
    /// The signal's name.
    pub name: String,
    /// The correlation key, if any.
    pub key: Option<String>,
    /// Its deadline.
    pub until: Timestamp,
    /// When it began.
    pub since: Timestamp,
}

/// Signals: sends, waits and their reads. Every backend implements it; the
/// behaviour is pinned by `signal_conformance`.
#[async_trait]
pub trait SignalStore: Send + Sync {
    /// Sends a signal to one run, in one transaction: stored pending with a
    /// `signal_received` event; a run waiting for the name is made due now
    /// (and workers woken). A final run is refused
    /// ([`StoreError::WrongState`](crate::StoreError::WrongState)), an
    /// unknown run (or another tenant's) is `NotFound`. An id the run
    /// already has answers the stored signal (`duplicate`).
    async fn send_signal(&self, s: SendSignal) -> Result<Sent>;

    /// Sends a signal to every non-final run of the tenant that waits for
    /// `name` with exactly `key`, each as [`SignalStore::send_signal`],
    /// all in one transaction. Runs that already have this id are
    /// answered as duplicates (so a repeated call answers the runs the
    /// first one reached). Nobody waiting: nothing is stored.
    async fn send_keyed_signal(&self, s: SendKeyed) -> Result<Vec<Sent>>;

    /// A wait, fenced by the lease, in one transaction: the oldest pending
    /// signal of that name received by the deadline is consumed and stored
    /// as the wait's step (`signal_delivered`); else past the deadline a
    /// timeout is stored (`signal_timed_out`); else the wait is recorded
    /// (the first time, `signal_waiting`) and the caller suspends.
    async fn signal_wait(&self, lease: crate::LeaseRef, w: WaitSignal) -> Result<WaitOutcome>;

    /// A run's signals, in arrival order.
    async fn signals(&self, run_id: RunId) -> Result<Vec<SignalRecord>>;

    /// A run's open waits.
    async fn signal_waits(&self, run_id: RunId) -> Result<Vec<SignalWaitRecord>>;

    /// Runs suspended (postponed) in a wait for a signal, by signal name,
    /// optionally of one tenant.
    async fn waiting_for_signals(&self, tenant: Option<String>) -> Result<Vec<(String, i64)>>;

    /// Runs suspended (postponed) in a durable sleep, optionally of one
    /// tenant: postponed runs with a `sleep:NAME` step whose wake time is
    /// the run's `run_after` (the rule of the run's "sleeping until" view).
    /// One query over the postponed runs' index (`runs_postponed`).
    async fn count_sleeping(&self, tenant: Option<String>) -> Result<i64>;
}
