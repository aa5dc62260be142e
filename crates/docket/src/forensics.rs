//! The forensic view: a run's attempt timeline with fingerprints, and a
//! verdict for each pair of failures of the same action with the same error
//! class (the classifier itself is pure, in `docket_core::forensics`).

use crate::{Docket, Result, Run, RunFilter, RunId, Timestamp};
use docket_core::forensics::{
    classify, classify_dispatches, DispatchRecord, FailureRecord, PairVerdict, Verdict,
};
use docket_core::{ErrorClass, Fingerprint, LeaseId};
use docket_store::{AttemptRecord, EventFilter, EventRecord};
use serde::Serialize;
use std::collections::BTreeMap;

/// One attempt in the timeline.
#[derive(Clone, Debug, Serialize)]
pub struct TimelineEntry {
    /// The attempt row.
    #[serde(flatten)]
    pub attempt: AttemptRecord,
    /// The fingerprint, decoded.
    pub fingerprint: Option<Fingerprint>,
    /// From the previous attempt's end to this one's start.
    pub gap_since_previous_ms: Option<i64>,
    /// The delay the policy chose after the previous attempt.
    pub policy_delay_before_ms: Option<i64>,
}

/// A run's forensic report.
#[derive(Clone, Debug, Serialize)]
pub struct ForensicReport {
    /// The run.
    pub run: Run,
    /// Every attempt, in order.
    pub timeline: Vec<TimelineEntry>,
    /// Every failure considered, including late reports of attempts whose
    /// lease had been taken away.
    pub failures: Vec<FailureRecord>,
    /// A verdict per pair of failures of the same action and error class.
    pub verdicts: Vec<PairVerdict>,
}

/// The most runs one job-wide report examines (the newest).
pub const MAX_JOB_REPORT_RUNS: usize = 10_000;

/// The forensic report over a job's runs since a time.
#[derive(Clone, Debug, Serialize)]
pub struct JobReport {
    /// The job.
    pub job: String,
    /// Runs created at or after this instant were examined (RFC 3339 in
    /// JSON, as everywhere in the API).
    #[serde(serialize_with = "rfc3339")]
    pub since: Timestamp,
    /// How many runs.
    pub runs_examined: usize,
    /// More runs matched than one report examines (the newest
    /// [`MAX_JOB_REPORT_RUNS`] were).
    pub truncated: bool,
    /// Verdicts by kind.
    pub counts: BTreeMap<Verdict, usize>,
    /// Pairs where the same action failed with the same error inside the
    /// backoff window the policy chose (retry without backoff, lease
    /// overlap): the seed's `same_action_same_error_within_backoff_window`.
    pub same_action_same_error_within_backoff_window: usize,
    /// Every verdict.
    pub verdicts: Vec<PairVerdict>,
}

fn rfc3339<S: serde::Serializer>(t: &Timestamp, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339())
}

fn decode_fp(s: Option<&str>) -> Option<Fingerprint> {
    s.and_then(|s| serde_json::from_str(s).ok())
}

/// The failures recorded for one run: its failed attempt rows, and late
/// reports (refused stale writes that carried a failure).
fn failures_of(
    run: &Run,
    attempts: &[AttemptRecord],
    events: &[EventRecord],
) -> Vec<FailureRecord> {
    let mut out = Vec::new();
    for a in attempts {
        let Some(class) = a.error_class else { continue };
        if !matches!(a.outcome.as_str(), "failed" | "lease_expired") {
            continue;
        }
        // A deferral (an open breaker, an action in flight) sent nothing: it is not a failure of
        // the action, and two of them are not a retry without backoff.
        if a.retry_reason
            .is_some_and(docket_core::policy::RetryReason::is_deferral)
        {
            continue;
        }
        let fp = decode_fp(a.fingerprint.as_deref());
        out.push(FailureRecord {
            run_id: run.id,
            attempt: a.attempt,
            lease_id: a.lease_id,
            job: run.job.clone(),
            action: a.action.clone().unwrap_or_else(|| run.job.clone()),
            error_class: class,
            idempotency_key: fp.and_then(|f| f.idempotency_key),
            started_at: a.started_at,
            finished_at: a.finished_at.unwrap_or(a.started_at),
            retry_delay_ms: a.delay_ms,
            terminal: a.delay_ms.is_none() && a.outcome == "failed",
            late_report: false,
        });
    }
    for e in events.iter().filter(|e| e.kind == "stale_write_refused") {
        let Some(class) = e
            .data
            .get("error_class")
            .and_then(|c| serde_json::from_value::<ErrorClass>(c.clone()).ok())
        else {
            continue;
        };
        let Some(lease) = e.lease_id else { continue };
        let Some(a) = attempts.iter().find(|a| a.lease_id == lease) else {
            continue;
        };
        let fp = decode_fp(e.data.get("fingerprint").and_then(|f| f.as_str()));
        out.push(FailureRecord {
            run_id: run.id,
            attempt: a.attempt,
            lease_id: lease,
            job: run.job.clone(),
            action: e
                .data
                .get("action")
                .and_then(|a| a.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| run.job.clone()),
            error_class: class,
            idempotency_key: fp.and_then(|f| f.idempotency_key),
            started_at: a.started_at,
            finished_at: e.at,
            retry_delay_ms: None,
            terminal: false,
            late_report: true,
        });
    }
    out
}

/// The duplicate dispatches a run met, from the ledger's evidence on it:
/// `action_in_flight` (another run's attempt was sending) and
/// `duplicate_suppressed` (another run had committed).
fn dispatches_of(
    run: &Run,
    attempts: &[AttemptRecord],
    events: &[EventRecord],
) -> Vec<DispatchRecord> {
    events
        .iter()
        .filter_map(|e| {
            let (other, attempt, lease, committed) = match e.kind.as_str() {
                "action_in_flight" => (
                    &e.data["held_by_run"],
                    &e.data["held_by_attempt"],
                    &e.data["held_by_lease"],
                    false,
                ),
                "duplicate_suppressed" => (
                    &e.data["committed_by_run"],
                    &e.data["committed_by_attempt"],
                    &e.data["committed_by_lease"],
                    true,
                ),
                _ => return None,
            };
            let own_lease = e.lease_id?;
            Some(DispatchRecord {
                run_id: run.id,
                attempt: e.attempt.or_else(|| {
                    attempts
                        .iter()
                        .find(|a| a.lease_id == own_lease)
                        .map(|a| a.attempt)
                })?,
                lease_id: own_lease,
                job: run.job.clone(),
                action: e.data["action"].as_str()?.to_string(),
                idempotency_key: e.data["idempotency_key"].as_str()?.to_string(),
                other_run: serde_json::from_value::<RunId>(other.clone()).ok()?,
                other_attempt: attempt
                    .as_u64()
                    .and_then(|a| u32::try_from(a).ok())
                    .unwrap_or(0),
                other_lease: serde_json::from_value::<LeaseId>(lease.clone())
                    .unwrap_or(LeaseId(uuid::Uuid::nil())),
                at: e.at,
                committed,
            })
        })
        .collect()
}

/// The failure verdicts plus the ledger's duplicate dispatches, a pair of
/// runs reported once even when their failures were also paired.
fn with_dispatches(
    mut verdicts: Vec<PairVerdict>,
    dispatches: &[DispatchRecord],
) -> Vec<PairVerdict> {
    let pair = |v: &PairVerdict| {
        let (a, b) = (v.first.run_id, v.second.run_id);
        (a.min(b), a.max(b))
    };
    let known: std::collections::BTreeSet<_> = verdicts
        .iter()
        .filter(|v| v.verdict == Verdict::DuplicateDispatch)
        .map(pair)
        .collect();
    verdicts.extend(
        classify_dispatches(dispatches)
            .into_iter()
            .filter(|v| !known.contains(&pair(v))),
    );
    verdicts
}

impl Docket {
    async fn evidence(&self, run: &Run) -> Result<(Vec<AttemptRecord>, Vec<EventRecord>)> {
        let attempts = self.store().attempts(run.id).await?;
        let events = self
            .store()
            .events(EventFilter {
                run_id: Some(run.id),
                limit: 100_000,
                ..Default::default()
            })
            .await?;
        Ok((attempts, events))
    }

    /// The attempt timeline of a run with fingerprints, and a verdict for
    /// each pair of failures of the same action with the same error class.
    pub async fn forensics(&self, id: RunId) -> Result<ForensicReport> {
        let run = self.get_run(id).await?;
        let (attempts, events) = self.evidence(&run).await?;
        let failures = failures_of(&run, &attempts, &events);
        let verdicts = with_dispatches(
            classify(&failures),
            &dispatches_of(&run, &attempts, &events),
        );
        let mut timeline = Vec::with_capacity(attempts.len());
        let mut prev: Option<&AttemptRecord> = None;
        for a in &attempts {
            timeline.push(TimelineEntry {
                fingerprint: decode_fp(a.fingerprint.as_deref()),
                gap_since_previous_ms: prev
                    .and_then(|p| p.finished_at)
                    .map(|f| a.started_at.millis_since(f)),
                policy_delay_before_ms: prev.and_then(|p| p.delay_ms),
                attempt: a.clone(),
            });
            prev = Some(a);
        }
        Ok(ForensicReport {
            run,
            timeline,
            failures,
            verdicts,
        })
    }

    /// The forensic verdicts across a job's runs created since `since`
    /// (at most [`MAX_JOB_REPORT_RUNS`], newest first), including duplicate dispatches
    /// between runs, for one tenant or all.
    pub async fn forensics_for_job(
        &self,
        job: &str,
        since: Timestamp,
        tenant: Option<String>,
    ) -> Result<JobReport> {
        let mut runs = Vec::new();
        let mut cursor: Option<RunId> = None;
        let mut truncated = false;
        loop {
            let page = self
                .list_runs(RunFilter {
                    tenant: tenant.clone(),
                    job: Some(job.to_string()),
                    created_after: Some(since),
                    before_id: cursor,
                    limit: 500,
                    ..Default::default()
                })
                .await?;
            let done = page.len() < 500;
            cursor = page.last().map(|r| r.id);
            runs.extend(page);
            if done {
                break;
            }
            if runs.len() >= MAX_JOB_REPORT_RUNS {
                truncated = true;
                runs.truncate(MAX_JOB_REPORT_RUNS);
                break;
            }
        }
        let mut failures = Vec::new();
        let mut dispatches = Vec::new();
        for run in &runs {
            let (attempts, events) = self.evidence(run).await?;
            failures.extend(failures_of(run, &attempts, &events));
            dispatches.extend(dispatches_of(run, &attempts, &events));
        }
        let verdicts = with_dispatches(classify(&failures), &dispatches);
        let mut counts = BTreeMap::new();
        for v in &verdicts {
            *counts.entry(v.verdict).or_insert(0) += 1;
        }
        let within = verdicts
            .iter()
            .filter(|v| {
                matches!(
                    v.verdict,
                    Verdict::RetryWithoutBackoff | Verdict::LeaseOverlap
                )
            })
            .count();
        Ok(JobReport {
            job: job.to_string(),
            since,
            runs_examined: runs.len(),
            truncated,
            counts,
            same_action_same_error_within_backoff_window: within,
            verdicts,
        })
    }
}
