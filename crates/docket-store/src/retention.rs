//! Retention, pruning, pausing and explicit deletion: the pure part.
//!
//! How long a final run and its evidence (attempts, events, steps) are kept
//! is a [`RetentionConfig`]: one window per final status, globally and per
//! job, and a separate, longer window for the ledger (the idempotency
//! memory). [`RetentionConfig::plan`] turns it into a [`PruneRequest`] for
//! one bounded batch; each backend only persists it
//! ([`Store::prune`](crate::Store::prune)).
//!
//! Pruning records what it removed as ONE event per (tenant, job) and batch
//! ([`RUNS_PRUNED`]), not an event per run (which would itself grow). Those
//! events, like the pause and delete audit events, are not about a live run:
//! their `run_id` is [`NO_RUN`] (the nil UUID) — except [`RUN_DELETED`],
//! which names the deleted run.

use crate::lead::FencingToken;
use docket_core::{RunId, RunStatus, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Event kind: counts of one pruning batch for one (tenant, job).
pub const RUNS_PRUNED: docket_core::EventKind = docket_core::EventKind::RunsPruned;
/// Event kind: ledger rows pruned in one batch, per tenant (job `""`).
pub const LEDGER_PRUNED: docket_core::EventKind = docket_core::EventKind::LedgerPruned;
/// Event kind: a job (or `*`, all jobs of the tenant) was paused.
pub const JOB_PAUSED: docket_core::EventKind = docket_core::EventKind::JobPaused;
/// Event kind: a job (or `*`) was resumed.
pub const JOB_RESUMED: docket_core::EventKind = docket_core::EventKind::JobResumed;
/// Event kind: an operator deleted a final run (the event keeps its id).
pub const RUN_DELETED: docket_core::EventKind = docket_core::EventKind::RunDeleted;
/// The `job` of a pause that covers every job of a tenant.
pub const ALL_JOBS: &str = "*";

/// The `run_id` of events that belong to no run (pruning, pauses).
pub const NO_RUN: RunId = RunId(uuid::Uuid::nil());

/// The leadership task name of the pruner.
pub const PRUNE_TASK: &str = "prune";

/// The ledger window used when none is configured: longer than any run's,
/// because the ledger is what stops a duplicate from repeating an effect.
pub const DEFAULT_LEDGER_MS: i64 = 90 * DAY_MS;

const SECOND_MS: i64 = 1000;
const MINUTE_MS: i64 = 60 * SECOND_MS;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;
const WEEK_MS: i64 = 7 * DAY_MS;

/// Parses a retention duration strictly: a positive integer and one unit,
/// `ms`, `s`, `m`, `h`, `d` or `w` (`"7d"`, `"36h"`, `"500ms"`). Zero, a
/// negative number, a fraction, spaces, a missing or unknown unit are
/// refused with a sentence that says what is wrong.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let digits = text.chars().take_while(|c| c.is_ascii_digit()).count();
    let (num, unit) = text.split_at(digits);
    if text.starts_with('-') {
        return Err(format!(
            "`{text}` is negative: a retention must be a positive duration such as \"7d\""
        ));
    }
    if num.is_empty() {
        return Err(format!(
            "`{text}` is not a duration: expected a positive integer and a unit (ms, s, m, h, d, w), e.g. \"7d\""
        ));
    }
    let mult = match unit {
        "ms" => 1,
        "s" => SECOND_MS,
        "m" => MINUTE_MS,
        "h" => HOUR_MS,
        "d" => DAY_MS,
        "w" => WEEK_MS,
        "" => {
            return Err(format!(
                "`{text}` has no unit: write e.g. \"{text}d\" (units: ms, s, m, h, d, w)"
            ))
        }
        other => {
            return Err(format!(
                "`{text}` has an unknown unit `{other}`: use ms, s, m, h, d or w"
            ))
        }
    };
    let n: i64 = num.parse().map_err(|_| format!("`{text}` is too large"))?;
    if n == 0 {
        return Err(format!(
            "`{text}` is zero: a retention must be positive (leave the key out to keep runs forever)"
        ));
    }
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Retention windows (milliseconds) of the three final statuses; `None`
/// keeps runs of that status forever.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Completed runs are pruned this long after they finished.
    pub completed_ms: Option<i64>,
    /// Failed runs are pruned this long after they finished.
    pub failed_ms: Option<i64>,
    /// Cancelled runs are pruned this long after they finished.
    pub cancelled_ms: Option<i64>,
}

impl Retention {
    /// The window of a final status (`None` for others, or when unset).
    pub fn of(&self, status: RunStatus) -> Option<i64> {
        match status {
            RunStatus::Completed => self.completed_ms,
            RunStatus::Failed => self.failed_ms,
            RunStatus::Cancelled => self.cancelled_ms,
            _ => None,
        }
    }

    fn windows(&self) -> impl Iterator<Item = i64> {
        [self.completed_ms, self.failed_ms, self.cancelled_ms]
            .into_iter()
            .flatten()
    }
}

/// The final statuses, in the order pruning visits them.
pub const FINAL_STATUSES: [RunStatus; 3] = [
    RunStatus::Completed,
    RunStatus::Failed,
    RunStatus::Cancelled,
];

/// All retention settings: the global windows, per-job overrides (a key
/// missing in a job's table falls back to the global one) and the ledger's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionConfig {
    /// For every job without its own value.
    pub default: Retention,
    /// Per job.
    pub jobs: BTreeMap<String, Retention>,
    /// The ledger's window, counted from a row's last write; `None`: the
    /// larger of [`DEFAULT_LEDGER_MS`] and the longest run window.
    pub ledger_ms: Option<i64>,
}

impl RetentionConfig {
    /// Whether any run window is set (otherwise nothing is ever pruned).
    pub fn is_enabled(&self) -> bool {
        self.default.windows().next().is_some()
            || self.jobs.values().any(|r| r.windows().next().is_some())
    }

    fn longest_run_window(&self) -> Option<i64> {
        self.default
            .windows()
            .chain(self.jobs.values().flat_map(|r| r.windows()))
            .max()
    }

    /// The ledger window in force.
    pub fn ledger_window(&self) -> i64 {
        self.ledger_ms
            .unwrap_or_else(|| DEFAULT_LEDGER_MS.max(self.longest_run_window().unwrap_or(0)))
    }

    /// Refuses settings that would let an effect repeat: every window must
    /// be positive, and the ledger must be kept at least as long as any run
    /// (a run that is still kept can be retried by an operator, and its
    /// committed actions must still be remembered then).
    pub fn validate(&self) -> Result<(), String> {
        let all = self
            .default
            .windows()
            .chain(self.jobs.values().flat_map(|r| r.windows()))
            .chain(self.ledger_ms);
        if let Some(bad) = all.into_iter().find(|ms| *ms <= 0) {
            return Err(format!(
                "retention of {bad} ms: a retention must be positive"
            ));
        }
        if let (Some(ledger), Some(longest)) = (self.ledger_ms, self.longest_run_window()) {
            if ledger < longest {
                return Err(format!(
                    "retention: ledger ({ledger} ms) is shorter than a run retention ({longest} ms); \
                     the ledger must be kept at least as long as any run, or a retried run could repeat a committed effect"
                ));
            }
        }
        Ok(())
    }

    /// The effective window of `job` in `status`.
    pub fn window(&self, job: &str, status: RunStatus) -> Option<i64> {
        self.jobs
            .get(job)
            .and_then(|r| r.of(status))
            .or_else(|| self.default.of(status))
    }

    /// One batch of pruning at `now`: at most `limit` runs and `limit`
    /// ledger rows. A job with its own window for a status is pruned by it;
    /// every other job by the global one.
    pub fn plan(&self, now: Timestamp, limit: usize) -> PruneRequest {
        let mut classes = Vec::new();
        for status in FINAL_STATUSES {
            let mut own = Vec::new();
            for (job, r) in &self.jobs {
                if let Some(ms) = r.of(status) {
                    own.push(job.clone());
                    classes.push(PruneClass {
                        jobs: JobSelector::Only(job.clone()),
                        status,
                        finished_before: now.plus_millis(-ms),
                    });
                }
            }
            if let Some(ms) = self.default.of(status) {
                classes.push(PruneClass {
                    jobs: JobSelector::AllExcept(own),
                    status,
                    finished_before: now.plus_millis(-ms),
                });
            }
        }
        PruneRequest {
            classes,
            ledger_before: self
                .is_enabled()
                .then(|| now.plus_millis(-self.ledger_window())),
            limit,
            now,
            lead: None,
        }
    }
}

/// Which jobs a [`PruneClass`] covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobSelector {
    /// This job only.
    Only(String),
    /// Every job but these (they have their own window).
    AllExcept(Vec<String>),
}

/// Runs of `status` that finished at or before `finished_before`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneClass {
    /// Which jobs.
    pub jobs: JobSelector,
    /// A final status (a non-final one is refused by the backends).
    pub status: RunStatus,
    /// Finished at or before this instant.
    pub finished_before: Timestamp,
}

/// One bounded pruning batch, one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneRequest {
    /// The runs to prune, visited in order until `limit` runs are found.
    pub classes: Vec<PruneClass>,
    /// Ledger rows last written at or before this instant are pruned — only
    /// once the run that wrote them is gone. `None`: the ledger is kept.
    pub ledger_before: Option<Timestamp>,
    /// At most this many runs, and this many ledger rows.
    pub limit: usize,
    /// The injected clock's now (the events' time, the lead's check).
    pub now: Timestamp,
    /// The pruner's leadership (task, token): checked in the transaction;
    /// when it no longer holds, nothing is deleted.
    pub lead: Option<(String, FencingToken)>,
}

/// What one pruning batch removed, for one (tenant, job).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunedJob {
    /// The tenant.
    pub tenant: String,
    /// The job.
    pub job: String,
    /// Completed runs removed.
    pub completed: u64,
    /// Failed runs removed.
    pub failed: u64,
    /// Cancelled runs removed.
    pub cancelled: u64,
    /// Their attempt rows.
    pub attempts: u64,
    /// Their events.
    pub events: u64,
    /// Their steps.
    pub steps: u64,
}

impl PrunedJob {
    /// Runs removed.
    pub fn runs(&self) -> u64 {
        self.completed + self.failed + self.cancelled
    }

    pub(crate) fn count(&mut self, status: RunStatus) {
        match status {
            RunStatus::Completed => self.completed += 1,
            RunStatus::Failed => self.failed += 1,
            RunStatus::Cancelled => self.cancelled += 1,
            _ => {}
        }
    }

    /// The data of its [`RUNS_PRUNED`] event.
    pub fn event_data(&self) -> serde_json::Value {
        serde_json::json!({
            "runs": self.runs(),
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "attempts": self.attempts,
            "events": self.events,
            "steps": self.steps,
        })
    }
}

/// What a pruning batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    /// Per (tenant, job), sorted.
    pub jobs: Vec<PrunedJob>,
    /// Ledger rows removed, per tenant, sorted.
    pub ledger: Vec<(String, u64)>,
    /// The lead was lost before the batch: nothing was deleted.
    pub fenced_out: bool,
}

impl PruneReport {
    /// Runs removed in all.
    pub fn runs(&self) -> u64 {
        self.jobs.iter().map(PrunedJob::runs).sum()
    }

    /// Ledger rows removed in all.
    pub fn ledger_rows(&self) -> u64 {
        self.ledger.iter().map(|(_, n)| n).sum()
    }

    /// Whether the batch was full (runs or ledger rows at `limit`): more
    /// may be eligible, the next batch should follow at once.
    pub fn is_full(&self, limit: usize) -> bool {
        self.runs() >= limit as u64 || self.ledger_rows() >= limit as u64
    }
}

/// Pause or resume a job (or [`ALL_JOBS`]) of a tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PauseChange {
    /// The tenant.
    pub tenant: String,
    /// The job, or [`ALL_JOBS`].
    pub job: String,
    /// `true` pauses, `false` resumes.
    pub paused: bool,
    /// Who.
    pub actor: String,
    /// Why.
    pub comment: Option<String>,
    /// The injected clock's now.
    pub now: Timestamp,
}

/// A pause in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// The tenant.
    pub tenant: String,
    /// The job, or [`ALL_JOBS`].
    pub job: String,
    /// Since when.
    pub since: Timestamp,
    /// Who paused it.
    pub actor: String,
    /// Why.
    pub comment: Option<String>,
}

/// An operator's deletion of a final run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteRequest {
    /// The run.
    pub run_id: RunId,
    /// Who.
    pub actor: String,
    /// Why.
    pub comment: Option<String>,
    /// The injected clock's now.
    pub now: Timestamp,
}

/// Queue health of one (tenant, job): what is waiting, for how long, what
/// runs, what finished recently. Read at call time from the runs table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobHealth {
    /// The tenant.
    pub tenant: String,
    /// The job.
    pub job: String,
    /// Pending or postponed runs whose `run_after` has come (claimable now,
    /// unless the job is paused).
    pub due: u64,
    /// The earliest `run_after` among them: the lag is `now` minus this.
    pub oldest_due_at: Option<Timestamp>,
    /// Runs running now.
    pub running: u64,
    /// Runs waiting for later (`run_after` in the future: retries
    /// scheduled, postponements, deferrals by limits or open circuits).
    pub scheduled: u64,
    /// Of `due`: runs a claim found held back by their concurrency key (no
    /// slot free for the key; they spend nothing while held).
    pub held: u64,
    /// Of `scheduled`: runs whose last attempt was deferred without
    /// sending (a rate limit's token, an open circuit's reset, another
    /// run's action in flight) and which wait for that time; no attempt
    /// was spent.
    pub deferred: u64,
    /// Runs completed at or after the query's `since`.
    pub completed_recently: u64,
    /// Runs failed (terminally) at or after `since`.
    pub failed_recently: u64,
}

impl JobHealth {
    /// Milliseconds the oldest due run has waited at `now` (0 when none).
    pub fn lag_ms(&self, now: Timestamp) -> i64 {
        self.oldest_due_at.map_or(0, |t| now.millis_since(t).max(0))
    }
}

/// Which queue health to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthQuery {
    /// One tenant, or all.
    pub tenant: Option<String>,
    /// What "due" is measured against.
    pub now: Timestamp,
    /// "Recently" starts here (e.g. `now` − 5 minutes).
    pub since: Timestamp,
}

/// Merges the three per-(tenant, job) reads of a health query.
/// One row of [`HEALTH_WAITING_SQL`]: tenant, job, due, oldest due, running,
/// scheduled, held, deferred.
pub(crate) type HealthWaiting = (String, String, i64, Option<i64>, i64, i64, i64, i64);

pub(crate) fn merge_health(
    waiting: Vec<HealthWaiting>,
    finished: Vec<(String, String, String, i64)>,
) -> Vec<JobHealth> {
    fn at<'a>(
        out: &'a mut BTreeMap<(String, String), JobHealth>,
        t: &str,
        j: &str,
    ) -> &'a mut JobHealth {
        out.entry((t.to_string(), j.to_string()))
            .or_insert_with(|| JobHealth {
                tenant: t.to_string(),
                job: j.to_string(),
                ..Default::default()
            })
    }
    let mut out: BTreeMap<(String, String), JobHealth> = BTreeMap::new();
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    for (t, j, due, oldest, running, scheduled, held, deferred) in waiting {
        let h = at(&mut out, &t, &j);
        h.due = n(due);
        h.oldest_due_at = oldest.map(Timestamp);
        h.running = n(running);
        h.scheduled = n(scheduled);
        h.held = n(held);
        h.deferred = n(deferred);
    }
    for (t, j, status, count) in finished {
        let h = at(&mut out, &t, &j);
        match status.as_str() {
            "completed" => h.completed_recently += n(count),
            "failed" => h.failed_recently += n(count),
            _ => {}
        }
    }
    out.into_values().collect()
}

/// The waiting/running part of a health query: one pass over the
/// claimable and running runs (partial indexes `runs_claim`, `runs_lease`
/// cover them; a scheduled run's last attempt is one primary-key probe), `$1` = now, `$2` = tenant or NULL. Same text on both
/// backends (SQLite numbers `?N` from `$N`).
pub(crate) const HEALTH_WAITING_SQL: &str = "
SELECT tenant, job,
       SUM(CASE WHEN status <> 'running' AND run_after <= $1 THEN 1 ELSE 0 END),
       MIN(CASE WHEN status <> 'running' AND run_after <= $1 THEN run_after END),
       SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END),
       SUM(CASE WHEN status <> 'running' AND run_after > $1 THEN 1 ELSE 0 END),
       SUM(CASE WHEN status <> 'running' AND run_after <= $1 AND held_at IS NOT NULL
                THEN 1 ELSE 0 END),
       SUM(CASE WHEN status <> 'running' AND run_after > $1
                     AND EXISTS (SELECT 1 FROM attempts a
                                 WHERE a.run_id = runs.id AND a.attempt = runs.attempt
                                   AND a.outcome = 'deferred')
                THEN 1 ELSE 0 END)
FROM runs
WHERE status IN ('pending', 'postponed', 'running') AND ($2 IS NULL OR tenant = $2)
GROUP BY tenant, job";

/// The recent part: runs finished at or after `$1` (index
/// `runs_finished`), `$2` = tenant or NULL.
pub(crate) const HEALTH_FINISHED_SQL: &str = "
SELECT tenant, job, status, COUNT(*)
FROM runs
WHERE status IN ('completed', 'failed') AND finished_at >= $1 AND ($2 IS NULL OR tenant = $2)
GROUP BY tenant, job, status";

/// The `NOT EXISTS` the claim and `next_due` add so a paused job's runs are
/// never claimed (same text on both backends; `runs` is the outer table).
pub(crate) const NOT_PAUSED: &str = "NOT EXISTS (SELECT 1 FROM job_pauses p WHERE p.tenant = runs.tenant AND p.job IN (runs.job, '*'))";

/// What deleting `run` records, or why it may not be deleted: only a final
/// run goes (a running or waiting one must be cancelled first), and the
/// audit event keeps what the run was (decided once for both backends).
pub fn delete_plan(run: &crate::Run) -> crate::Result<serde_json::Value> {
    if !run.status.is_terminal() {
        return Err(crate::StoreError::WrongState {
            run_id: run.id,
            current: run.status,
            message: "only a completed, failed or cancelled run can be deleted; cancel it first"
                .into(),
        });
    }
    Ok(serde_json::json!({
        "status": run.status,
        "terminal_reason": run.terminal_reason,
        "created_at": run.created_at,
        "finished_at": run.finished_at,
        "attempts": run.attempt,
        "idempotency_key": run.idempotency_key,
    }))
}

/// The `ledger_pruned` event's data for `rows` ledger rows of one tenant.
pub fn ledger_pruned_data(rows: u64) -> serde_json::Value {
    serde_json::json!({ "rows": rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_parsed_strictly() {
        assert_eq!(parse_duration("7d"), Ok(7 * DAY_MS));
        assert_eq!(parse_duration("36h"), Ok(36 * HOUR_MS));
        assert_eq!(parse_duration("2w"), Ok(14 * DAY_MS));
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("5s"), Ok(5000));
        assert_eq!(parse_duration("10m"), Ok(600_000));
        for bad in [
            "0d",
            "-1d",
            "7",
            "d",
            "7 d",
            "1.5d",
            "7days",
            "",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
        assert!(parse_duration("0d").unwrap_err().contains("zero"));
        assert!(parse_duration("-3d").unwrap_err().contains("negative"));
        assert!(parse_duration("7").unwrap_err().contains("no unit"));
    }

    fn cfg() -> RetentionConfig {
        let mut c = RetentionConfig {
            default: Retention {
                completed_ms: Some(7 * DAY_MS),
                failed_ms: Some(30 * DAY_MS),
                cancelled_ms: None,
            },
            ..Default::default()
        };
        c.jobs.insert(
            "fast".into(),
            Retention {
                completed_ms: Some(HOUR_MS),
                ..Default::default()
            },
        );
        c
    }

    #[test]
    fn job_windows_override_the_global_ones_key_by_key() {
        let c = cfg();
        assert_eq!(c.window("fast", RunStatus::Completed), Some(HOUR_MS));
        assert_eq!(c.window("fast", RunStatus::Failed), Some(30 * DAY_MS));
        assert_eq!(c.window("other", RunStatus::Completed), Some(7 * DAY_MS));
        assert_eq!(c.window("other", RunStatus::Cancelled), None);
        let now = Timestamp(100 * DAY_MS);
        let p = c.plan(now, 10);
        assert_eq!(
            p.classes,
            vec![
                PruneClass {
                    jobs: JobSelector::Only("fast".into()),
                    status: RunStatus::Completed,
                    finished_before: Timestamp(100 * DAY_MS - HOUR_MS)
                },
                PruneClass {
                    jobs: JobSelector::AllExcept(vec!["fast".into()]),
                    status: RunStatus::Completed,
                    finished_before: Timestamp(93 * DAY_MS)
                },
                PruneClass {
                    jobs: JobSelector::AllExcept(vec![]),
                    status: RunStatus::Failed,
                    finished_before: Timestamp(70 * DAY_MS)
                },
            ]
        );
        assert_eq!(p.ledger_before, Some(Timestamp(10 * DAY_MS)));
    }

    #[test]
    fn the_ledger_outlives_every_run_window() {
        let mut c = cfg();
        assert_eq!(c.ledger_window(), DEFAULT_LEDGER_MS);
        c.default.failed_ms = Some(200 * DAY_MS);
        assert_eq!(c.ledger_window(), 200 * DAY_MS);
        c.ledger_ms = Some(100 * DAY_MS);
        assert!(c.validate().unwrap_err().contains("shorter"));
        c.ledger_ms = Some(200 * DAY_MS);
        assert_eq!(c.validate(), Ok(()));
        assert!(!RetentionConfig::default().is_enabled());
        assert_eq!(
            RetentionConfig::default()
                .plan(Timestamp(0), 5)
                .ledger_before,
            None
        );
    }
}
