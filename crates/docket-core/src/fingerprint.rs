//! Failure fingerprints: the normalized identity of a failure.

use crate::{stable_hash, ErrorClass, LeaseId, RunId};
use serde::{Deserialize, Serialize};

/// The identity of one failure of one attempt.
///
/// Two fingerprints with the same [`Fingerprint::failure_key`] are "the same
/// failure" (same job, action and error class); the remaining fields tell
/// whether they came from the same run, attempt, lease and idempotency key,
/// which is what separates a deliberate retry from a duplicate dispatch, a
/// lease overlap or a duplicated log line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The job name.
    pub job: String,
    /// The action (step) that failed, or the job name when the failure was
    /// outside any step.
    pub action: String,
    /// The error class.
    pub error_class: ErrorClass,
    /// The run.
    pub run_id: RunId,
    /// The attempt number.
    pub attempt: u32,
    /// The lease the attempt ran under.
    pub lease_id: LeaseId,
    /// The idempotency key of the action or run, if any.
    pub idempotency_key: Option<String>,
}

impl Fingerprint {
    /// A hex hash of (job, action, error class): equal for "the same failure".
    pub fn failure_key(&self) -> String {
        format!(
            "{:016x}",
            stable_hash(&[
                self.job.as_bytes(),
                self.action.as_bytes(),
                self.error_class.as_str().as_bytes()
            ])
        )
    }

    /// The whole fingerprint as one line of text, stable and greppable:
    /// `job/action/class/run/attempt/lease/key`.
    pub fn to_line(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}/{}/{}",
            self.job,
            self.action,
            self.error_class,
            self.run_id,
            self.attempt,
            self.lease_id,
            self.idempotency_key.as_deref().unwrap_or("-")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_key_ignores_run_attempt_and_lease() {
        let a = Fingerprint {
            job: "send-email".into(),
            action: "smtp".into(),
            error_class: ErrorClass::Timeout,
            run_id: RunId::new(),
            attempt: 1,
            lease_id: LeaseId::new(),
            idempotency_key: Some("k".into()),
        };
        let mut b = a.clone();
        b.attempt = 2;
        b.lease_id = LeaseId::new();
        b.run_id = RunId::new();
        assert_eq!(a.failure_key(), b.failure_key());
        assert_ne!(a.to_line(), b.to_line());
        b.error_class = ErrorClass::Network;
        assert_ne!(a.failure_key(), b.failure_key());
        assert!(a.to_line().starts_with("send-email/smtp/timeout/"));
        assert!(a.to_line().ends_with(&format!("/1/{}/k", a.lease_id)));
    }
}
