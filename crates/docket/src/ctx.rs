//! What a handler knows about the attempt it runs in.

use docket_core::{LeaseId, RunId, Timestamp};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The context of one attempt, handed to the handler.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub(crate) run_id: RunId,
    pub(crate) job: String,
    pub(crate) tenant: String,
    pub(crate) attempt: u32,
    pub(crate) lease_id: LeaseId,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) correlation_id: String,
    pub(crate) deadline: Timestamp,
    pub(crate) variables: Value,
    pub(crate) cancelled: Arc<AtomicBool>,
}

impl Ctx {
    /// The run.
    pub fn run_id(&self) -> RunId {
        self.run_id
    }
    /// The job's name.
    pub fn job(&self) -> &str {
        &self.job
    }
    /// The run's tenant.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
    /// This attempt's number (1-based).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The lease fencing this attempt's writes.
    pub fn lease_id(&self) -> LeaseId {
        self.lease_id
    }
    /// The run's idempotency key, stable across attempts, if it was triggered
    /// with one.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }
    /// The correlation id (the trigger's, or the run id): attach it to every
    /// outbound request.
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
    /// When the handler's timeout runs out (injected clock).
    pub fn deadline(&self) -> Timestamp {
        self.deadline
    }
    /// The run's variables (merged by operator retries).
    pub fn variables(&self) -> &Value {
        &self.variables
    }
    /// True once a cancel was requested or the lease was lost: long work
    /// should stop at its next safe point.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}
