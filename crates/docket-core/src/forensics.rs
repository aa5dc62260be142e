//! The forensic classifier: given the recorded failures of runs, says for
//! each pair of failures of the same action with the same error class what
//! the second one was — a deliberate, delayed retry, or one of the ways a
//! queue goes wrong. Pure: the engine gathers the evidence, this decides.

use crate::{ErrorClass, LeaseId, RunId, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One recorded failure: an attempt row, or a late report of an attempt
/// whose lease had already been taken away (a refused stale write).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// The run.
    pub run_id: RunId,
    /// The attempt number.
    pub attempt: u32,
    /// The lease the attempt ran under.
    pub lease_id: LeaseId,
    /// The job.
    pub job: String,
    /// The failing step or action (the job name when outside any step).
    pub action: String,
    /// The error class.
    pub error_class: ErrorClass,
    /// The action's (or run's) idempotency key.
    pub idempotency_key: Option<String>,
    /// When the attempt started.
    pub started_at: Timestamp,
    /// When the failure was recorded.
    pub finished_at: Timestamp,
    /// The delay the policy chose after this failure (`None`: no retry was
    /// scheduled by the policy).
    pub retry_delay_ms: Option<i64>,
    /// The policy stopped the run on this failure.
    pub terminal: bool,
    /// True for a late report refused as a stale write.
    pub late_report: bool,
}

/// What a pair of failures was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The gap honoured the policy's delay: a deliberate retry.
    DelayedRetry,
    /// The second attempt started before the policy's delay had passed.
    RetryWithoutBackoff,
    /// Same run, different leases, overlapping in time: two workers ran it
    /// at once (a lease shorter than the work).
    LeaseOverlap,
    /// Different runs, same idempotency key: the work was dispatched twice
    /// upstream (the ledger may still have protected the side effect).
    DuplicateDispatch,
    /// Same run and lease: one attempt reported twice, not two executions.
    DuplicateLog,
    /// A legitimate retry, after which the policy stopped the run.
    TerminalPolicyFailure,
}

/// How much a verdict should worry an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Working as designed.
    Info,
    /// Worth a look.
    Warning,
    /// A defect: fix it.
    Critical,
}

impl Verdict {
    /// The snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::DelayedRetry => "delayed_retry",
            Verdict::RetryWithoutBackoff => "retry_without_backoff",
            Verdict::LeaseOverlap => "lease_overlap",
            Verdict::DuplicateDispatch => "duplicate_dispatch",
            Verdict::DuplicateLog => "duplicate_log",
            Verdict::TerminalPolicyFailure => "terminal_policy_failure",
        }
    }

    /// Retry without backoff and lease overlap stand out.
    pub const fn severity(self) -> Severity {
        match self {
            Verdict::DelayedRetry | Verdict::DuplicateLog => Severity::Info,
            Verdict::TerminalPolicyFailure | Verdict::DuplicateDispatch => Severity::Warning,
            Verdict::RetryWithoutBackoff | Verdict::LeaseOverlap => Severity::Critical,
        }
    }
}

/// A reference to one failure in a verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailureRef {
    /// The run.
    pub run_id: RunId,
    /// The attempt.
    pub attempt: u32,
    /// The lease.
    pub lease_id: LeaseId,
    /// A late report refused as a stale write.
    pub late_report: bool,
}

/// The verdict on one pair of failures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairVerdict {
    /// The earlier failure.
    pub first: FailureRef,
    /// The later failure.
    pub second: FailureRef,
    /// The job.
    pub job: String,
    /// The action.
    pub action: String,
    /// The shared error class.
    pub error_class: ErrorClass,
    /// What it was.
    pub verdict: Verdict,
    /// Its severity.
    pub severity: Severity,
    /// From the first failure's end to the second attempt's start.
    pub gap_ms: i64,
    /// The delay the policy chose after the first failure.
    pub expected_delay_ms: Option<i64>,
    /// One sentence an operator can act on.
    pub explanation: String,
}

fn fref(r: &FailureRecord) -> FailureRef {
    FailureRef {
        run_id: r.run_id,
        attempt: r.attempt,
        lease_id: r.lease_id,
        late_report: r.late_report,
    }
}

/// One run that met an action's idempotency key already taken by another
/// run: it found the other run's attempt sending (`in_flight`) or its
/// effect committed. Recorded by the ledger, not inferred from timing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatchRecord {
    /// The run that met the key.
    pub run_id: RunId,
    /// Its attempt.
    pub attempt: u32,
    /// Its lease.
    pub lease_id: LeaseId,
    /// The job.
    pub job: String,
    /// The action.
    pub action: String,
    /// The shared key.
    pub idempotency_key: String,
    /// The run that holds or committed the key.
    pub other_run: RunId,
    /// Its attempt.
    pub other_attempt: u32,
    /// Its lease.
    pub other_lease: LeaseId,
    /// When this run met the key.
    pub at: Timestamp,
    /// True when the other run's effect was committed (the stored result
    /// was returned), false when it was still in flight (this run waited).
    pub committed: bool,
}

/// Duplicate dispatches: one verdict per (run, other run, key) — however
/// often the run looked again — naming both runs. The ledger kept the
/// effect single; the verdict says the work was dispatched twice upstream.
pub fn classify_dispatches(records: &[DispatchRecord]) -> Vec<PairVerdict> {
    let mut seen: BTreeMap<(RunId, RunId, &str), &DispatchRecord> = BTreeMap::new();
    for r in records {
        if r.run_id == r.other_run {
            continue;
        }
        seen.entry((r.run_id, r.other_run, r.idempotency_key.as_str()))
            .and_modify(|e| {
                if r.at < e.at {
                    *e = r;
                }
            })
            .or_insert(r);
    }
    let mut out: Vec<PairVerdict> = seen
        .into_values()
        .map(|r| PairVerdict {
            first: FailureRef {
                run_id: r.other_run,
                attempt: r.other_attempt,
                lease_id: r.other_lease,
                late_report: false,
            },
            second: FailureRef {
                run_id: r.run_id,
                attempt: r.attempt,
                lease_id: r.lease_id,
                late_report: false,
            },
            job: r.job.clone(),
            action: r.action.clone(),
            error_class: ErrorClass::Duplicate,
            verdict: Verdict::DuplicateDispatch,
            severity: Verdict::DuplicateDispatch.severity(),
            gap_ms: 0,
            expected_delay_ms: None,
            explanation: format!(
                "runs {} and {} carry the same idempotency key `{}` for action `{}`: the work was dispatched twice upstream; run {} {}, so the effect happened once",
                r.other_run,
                r.run_id,
                r.idempotency_key,
                r.action,
                r.run_id,
                if r.committed {
                    "found it committed and returned the stored result"
                } else {
                    "found it in flight and waited instead of sending"
                }
            ),
        })
        .collect();
    out.sort_by_key(|v| (v.second.run_id, v.first.run_id));
    out
}

/// Classifies every relevant pair among `records`.
///
/// Failures are grouped by (job, action, error class). Within a group:
/// consecutive failures of the same run are compared (duplicate log, lease
/// overlap, retry with or without backoff, terminal policy failure), and
/// failures of different runs sharing an idempotency key are compared
/// (duplicate dispatch). Unrelated runs are never paired.
pub fn classify(records: &[FailureRecord]) -> Vec<PairVerdict> {
    let mut groups: BTreeMap<(String, String, ErrorClass), Vec<&FailureRecord>> = BTreeMap::new();
    for r in records {
        groups
            .entry((r.job.clone(), r.action.clone(), r.error_class))
            .or_default()
            .push(r);
    }
    let mut out = Vec::new();
    for ((job, action, class), mut group) in groups {
        group.sort_by_key(|r| {
            (
                r.started_at,
                r.finished_at,
                r.run_id,
                r.attempt,
                r.late_report,
            )
        });
        let mut per_run: BTreeMap<RunId, Vec<&FailureRecord>> = BTreeMap::new();
        for r in &group {
            per_run.entry(r.run_id).or_default().push(r);
        }
        for failures in per_run.values() {
            for pair in failures.windows(2) {
                out.push(same_run(pair[0], pair[1], &job, &action, class));
            }
        }
        // Different runs with the same key: each run's first failure with
        // that key against the earliest other run's.
        let mut by_key: BTreeMap<&str, Vec<&FailureRecord>> = BTreeMap::new();
        for r in &group {
            if let Some(k) = r.idempotency_key.as_deref() {
                by_key.entry(k).or_default().push(r);
            }
        }
        for failures in by_key.values() {
            let mut firsts: Vec<&FailureRecord> = Vec::new();
            for r in failures {
                if !firsts.iter().any(|f| f.run_id == r.run_id) {
                    firsts.push(r);
                }
            }
            for pair in firsts.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                out.push(PairVerdict {
                    first: fref(a),
                    second: fref(b),
                    job: job.clone(),
                    action: action.clone(),
                    error_class: class,
                    verdict: Verdict::DuplicateDispatch,
                    severity: Verdict::DuplicateDispatch.severity(),
                    gap_ms: b.started_at.millis_since(a.finished_at),
                    expected_delay_ms: None,
                    explanation: format!(
                        "runs {} and {} carry the same idempotency key `{}`: the work was dispatched twice upstream; the ledger keeps a committed side effect from repeating",
                        a.run_id,
                        b.run_id,
                        a.idempotency_key.as_deref().unwrap_or_default()
                    ),
                });
            }
        }
    }
    out
}

fn same_run(
    a: &FailureRecord,
    b: &FailureRecord,
    job: &str,
    action: &str,
    class: ErrorClass,
) -> PairVerdict {
    let gap = b.started_at.millis_since(a.finished_at);
    let (verdict, explanation) = if a.lease_id == b.lease_id {
        (
            Verdict::DuplicateLog,
            format!(
                "attempt {} under lease {} was reported twice: one execution, two records",
                a.attempt, a.lease_id
            ),
        )
    } else if b.started_at < a.finished_at {
        (
            Verdict::LeaseOverlap,
            format!(
                "attempt {} started under a new lease while attempt {} was still running (it reported {} ms later): the lease is shorter than the work",
                b.attempt,
                a.attempt,
                a.finished_at.millis_since(b.started_at)
            ),
        )
    } else if let Some(expected) = a.retry_delay_ms.filter(|d| gap < *d) {
        (
            Verdict::RetryWithoutBackoff,
            format!(
                "attempt {} started {gap} ms after attempt {} failed, but the policy chose a delay of {expected} ms",
                b.attempt, a.attempt
            ),
        )
    } else if b.terminal {
        (
            Verdict::TerminalPolicyFailure,
            format!(
                "attempt {} retried after {gap} ms as the policy chose, failed the same way, and the policy stopped the run",
                b.attempt
            ),
        )
    } else {
        (
            Verdict::DelayedRetry,
            match a.retry_delay_ms {
                Some(d) => format!("attempt {} waited {gap} ms; the policy chose {d} ms", b.attempt),
                None => format!("attempt {} followed {gap} ms later without a policy delay (an operator's retry)", b.attempt),
            },
        )
    };
    PairVerdict {
        first: fref(a),
        second: fref(b),
        job: job.to_string(),
        action: action.to_string(),
        error_class: class,
        verdict,
        severity: verdict.severity(),
        gap_ms: gap,
        expected_delay_ms: a.retry_delay_ms,
        explanation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        run: u128,
        attempt: u32,
        lease: u128,
        start: i64,
        end: i64,
        delay: Option<i64>,
    ) -> FailureRecord {
        FailureRecord {
            run_id: RunId(uuid::Uuid::from_u128(run)),
            attempt,
            lease_id: LeaseId(uuid::Uuid::from_u128(lease)),
            job: "j".into(),
            action: "send".into(),
            error_class: ErrorClass::Timeout,
            idempotency_key: Some("k".into()),
            started_at: Timestamp(start),
            finished_at: Timestamp(end),
            retry_delay_ms: delay,
            terminal: false,
            late_report: false,
        }
    }

    #[test]
    fn each_rule_in_isolation() {
        let v = |a: FailureRecord, b: FailureRecord| classify(&[a, b])[0].verdict;
        assert_eq!(
            v(
                rec(1, 1, 1, 0, 10, Some(100)),
                rec(1, 2, 2, 110, 120, Some(200))
            ),
            Verdict::DelayedRetry
        );
        assert_eq!(
            v(rec(1, 1, 1, 0, 10, Some(100)), rec(1, 2, 2, 50, 60, None)),
            Verdict::RetryWithoutBackoff
        );
        assert_eq!(
            v(rec(1, 1, 1, 0, 100, Some(100)), rec(1, 2, 2, 50, 60, None)),
            Verdict::LeaseOverlap
        );
        assert_eq!(
            v(rec(1, 1, 1, 0, 10, Some(100)), rec(1, 1, 1, 0, 12, None)),
            Verdict::DuplicateLog
        );
        let mut last = rec(1, 2, 2, 200, 210, None);
        last.terminal = true;
        assert_eq!(
            v(rec(1, 1, 1, 0, 10, Some(100)), last),
            Verdict::TerminalPolicyFailure
        );
        assert_eq!(
            v(rec(1, 1, 1, 0, 10, None), rec(2, 1, 2, 5, 15, None)),
            Verdict::DuplicateDispatch
        );
    }

    #[test]
    fn different_classes_and_unrelated_runs_are_not_paired() {
        let mut b = rec(1, 2, 2, 110, 120, None);
        b.error_class = ErrorClass::Network;
        assert!(classify(&[rec(1, 1, 1, 0, 10, Some(100)), b]).is_empty());
        let mut other = rec(2, 1, 3, 0, 10, None);
        other.idempotency_key = Some("other".into());
        assert!(classify(&[rec(1, 1, 1, 0, 10, Some(100)), other]).is_empty());
    }

    #[test]
    fn severities_make_the_defects_stand_out() {
        assert_eq!(Verdict::RetryWithoutBackoff.severity(), Severity::Critical);
        assert_eq!(Verdict::LeaseOverlap.severity(), Severity::Critical);
        assert_eq!(Verdict::DelayedRetry.severity(), Severity::Info);
        assert_eq!(
            serde_json::to_value(Verdict::LeaseOverlap).unwrap(),
            "lease_overlap"
        );
    }

    #[test]
    fn dispatches_give_one_verdict_per_pair_of_runs() {
        let (a, b, c) = (RunId::new(), RunId::new(), RunId::new());
        let rec = |run: RunId, other: RunId, at: i64, committed: bool| DispatchRecord {
            run_id: run,
            attempt: 1,
            lease_id: LeaseId::new(),
            job: "charge".into(),
            action: "charge".into(),
            idempotency_key: "k".into(),
            other_run: other,
            other_attempt: 1,
            other_lease: LeaseId::new(),
            at: Timestamp(at),
            committed,
        };
        let v = classify_dispatches(&[
            rec(b, a, 5, false),
            rec(b, a, 9, true),
            rec(c, a, 7, true),
            rec(a, a, 1, true),
        ]);
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|v| v.first.run_id == a
            && v.verdict == Verdict::DuplicateDispatch
            && v.error_class == ErrorClass::Duplicate));
        let vb = v.iter().find(|v| v.second.run_id == b).unwrap();
        assert!(
            vb.explanation.contains("in flight"),
            "the earliest record wins"
        );
    }
}
