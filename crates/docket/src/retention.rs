//! Retention and queue operations of the engine: the pruner (one node at a
//! time, under leadership that expires), pausing and resuming jobs, and the
//! explicit deletion of a final run.
//!
//! The decisions are `docket_store::retention`'s (pure); the store
//! persists them in bounded transactions. See docs/OPERATIONS.md.

use crate::ops::Actor;
use crate::{Docket, Error, Result, Run, RunId};
use docket_store::retention::{DeleteRequest, PauseChange, PRUNE_TASK};
use docket_store::StoreError;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

pub use docket_store::retention::{
    parse_duration, JobHealth, Pause, PruneReport, PrunedJob, Retention, RetentionConfig, ALL_JOBS,
    DEFAULT_LEDGER_MS, JOB_PAUSED, JOB_RESUMED, LEDGER_PRUNED, NO_RUN, RUNS_PRUNED, RUN_DELETED,
};

/// How the pruner runs.
#[derive(Clone, Debug)]
pub struct PrunerConfig {
    /// What to keep, and how long.
    pub retention: RetentionConfig,
    /// Pause between two rounds (a round prunes batch after batch while
    /// batches come back full). Default 60 s.
    pub interval: Duration,
    /// Runs (and ledger rows) per batch, i.e. per transaction. Default 500:
    /// a few milliseconds of deletes, so a claim waiting behind a batch
    /// (SQLite's single writer) is not delayed by more than that.
    pub batch: usize,
    /// Most batches in one round, so one round cannot run for ever when
    /// runs finish faster than they are pruned. Default 200.
    pub max_batches: usize,
    /// The lead's length: a pruner that stops renewing (killed, stopped,
    /// cut off) loses the task this long after its last renewal. Default
    /// 30 s.
    pub lead_ttl: Duration,
    /// This process's name for the lead (unique per process).
    pub holder: String,
}

impl PrunerConfig {
    /// Defaults around `retention`.
    pub fn new(retention: RetentionConfig) -> Self {
        PrunerConfig {
            retention,
            interval: Duration::from_secs(60),
            batch: 500,
            max_batches: 200,
            lead_ttl: Duration::from_secs(30),
            holder: format!(
                "pruner-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        }
    }
}

/// What one pruning round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneRound {
    /// Whether this process led the task in this round (otherwise another
    /// one does, and nothing was tried).
    pub led: bool,
    /// Batches (transactions) run.
    pub batches: usize,
    /// Runs removed.
    pub runs: u64,
    /// Ledger rows removed.
    pub ledger: u64,
    /// Remote workers forgotten from the roster (not seen for
    /// [`ROSTER_WINDOW_MS`](docket_store::workers::ROSTER_WINDOW_MS) and
    /// running nothing).
    pub workers: u64,
    /// The lead was lost during the round (a batch was fenced out).
    pub lost_lead: bool,
}

fn map_store(e: StoreError) -> Error {
    match e {
        StoreError::WrongState {
            run_id,
            current,
            message,
        } => Error::WrongState {
            run_id,
            current,
            message,
        },
        StoreError::NotFound(id) => Error::RunNotFound(id),
        StoreError::Conflict(m) => Error::InvalidInput(m),
        e => Error::Store(e),
    }
}

fn check(cfg: &PrunerConfig) -> Result<()> {
    cfg.retention.validate().map_err(Error::InvalidInput)?;
    if cfg.batch == 0 || cfg.max_batches == 0 {
        return Err(Error::InvalidInput(
            "pruner: batch and max_batches must be at least 1".into(),
        ));
    }
    Ok(())
}

/// A running pruner; stop it with [`PrunerHandle::shutdown`].
pub struct PrunerHandle {
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl PrunerHandle {
    /// Stops after the current batch and gives up the lead, so another
    /// process takes over at once instead of when it expires.
    pub async fn shutdown(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

impl Docket {
    /// One pruning round: takes (or renews) the `prune` lead and, while it
    /// holds, prunes batch after batch until a batch is not full (or
    /// `max_batches`). Each batch is its own transaction, fenced by the
    /// lead's token. Answers `led = false` when another process leads.
    pub async fn prune_once(&self, cfg: &PrunerConfig) -> Result<PruneRound> {
        check(cfg)?;
        let mut round = PruneRound::default();
        if !cfg.retention.is_enabled() {
            return Ok(round);
        }
        let ttl = cfg.lead_ttl.as_millis() as i64;
        for _ in 0..cfg.max_batches {
            let now = self.clock().now();
            // Renewed before every batch: a long round keeps its lead.
            let Some(token) = self
                .store()
                .try_lead(PRUNE_TASK.into(), cfg.holder.clone(), now, ttl)
                .await?
            else {
                round.lost_lead = round.led;
                return Ok(round);
            };
            round.led = true;
            let mut req = cfg.retention.plan(now, cfg.batch);
            req.lead = Some((PRUNE_TASK.into(), token));
            let report = self.store().prune(req).await?;
            round.batches += 1;
            if report.fenced_out {
                round.lost_lead = true;
                return Ok(round);
            }
            round.runs += report.runs();
            round.ledger += report.ledger_rows();
            if !report.is_full(cfg.batch) {
                break;
            }
            // Let claims and ends in between (SQLite: one writer).
            tokio::task::yield_now().await;
        }
        if round.led && !round.lost_lead {
            // The roster is tiny next to the runs: one statement a round.
            let seen_before = self
                .clock()
                .now()
                .plus_millis(-docket_store::workers::ROSTER_WINDOW_MS);
            round.workers = self.store().forget_workers(seen_before).await?;
        }
        Ok(round)
    }

    /// Starts the pruner: a round every `interval` (see
    /// [`prune_once`](Docket::prune_once)). Run it in every process that
    /// should be able to prune: only the one holding the lead does.
    /// Refuses an invalid configuration.
    pub fn start_pruner(&self, cfg: PrunerConfig) -> Result<PrunerHandle> {
        check(&cfg)?;
        let stop = Arc::new(Notify::new());
        let docket = self.clone();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                match docket.prune_once(&cfg).await {
                    Ok(r) if r.runs + r.ledger + r.workers > 0 => {
                        tracing::info!(
                            runs = r.runs,
                            ledger = r.ledger,
                            workers = r.workers,
                            batches = r.batches,
                            "pruned"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "pruning round failed; next round later"),
                }
                tokio::select! {
                    _ = s.notified() => break,
                    _ = tokio::time::sleep(cfg.interval) => {}
                }
            }
            let now = docket.clock().now();
            let ttl = cfg.lead_ttl.as_millis() as i64;
            // Give the lead up only if it is still ours (a renewal answers
            // our current token, and then resign ends it).
            if let Ok(Some(token)) = docket
                .store()
                .try_lead(PRUNE_TASK.into(), cfg.holder.clone(), now, ttl)
                .await
            {
                let _ = docket.store().resign(PRUNE_TASK.into(), token, now).await;
            }
        });
        Ok(PrunerHandle { stop, task })
    }

    /// Pauses `job` (or [`ALL_JOBS`]) of `tenant`: its runs stay queued
    /// (triggers still create them) but no worker of any process claims
    /// them until it is resumed. Audited (`job_paused`). Answers whether it
    /// was running before (false: already paused, nothing written).
    pub async fn pause_job(&self, tenant: &str, job: &str, by: Actor) -> Result<bool> {
        self.set_pause(tenant, job, true, by).await
    }

    /// Resumes `job` (or [`ALL_JOBS`]) of `tenant` and wakes workers.
    /// Audited (`job_resumed`). Answers whether it was paused.
    pub async fn resume_job(&self, tenant: &str, job: &str, by: Actor) -> Result<bool> {
        let changed = self.set_pause(tenant, job, false, by).await?;
        if changed {
            self.wake_workers();
        }
        Ok(changed)
    }

    async fn set_pause(&self, tenant: &str, job: &str, paused: bool, by: Actor) -> Result<bool> {
        if job.trim().is_empty() {
            return Err(Error::InvalidInput(
                "a job name is required (or `*` for every job of the tenant)".into(),
            ));
        }
        self.store()
            .set_pause(PauseChange {
                tenant: tenant.into(),
                job: job.into(),
                paused,
                actor: by.name,
                comment: by.comment,
                now: self.clock().now(),
            })
            .await
            .map_err(map_store)
    }

    /// Queue health per (tenant, job) of `tenant` (or all): due runs and
    /// the oldest (lag), running, scheduled for later, and runs completed
    /// or failed in the last `window`.
    pub async fn queue_health(
        &self,
        tenant: Option<&str>,
        window: Duration,
    ) -> Result<Vec<JobHealth>> {
        let now = self.clock().now();
        Ok(self
            .store()
            .queue_health(docket_store::retention::HealthQuery {
                tenant: tenant.map(str::to_string),
                now,
                since: now.plus_millis(-(window.as_millis() as i64)),
            })
            .await?)
    }

    /// The pauses in force (of a tenant, or all).
    pub async fn pauses(&self, tenant: Option<&str>) -> Result<Vec<Pause>> {
        Ok(self.store().pauses(tenant.map(str::to_string)).await?)
    }

    /// Deletes a final run (completed, failed, cancelled) with its
    /// attempts, events and steps; audited by a `run_deleted` event that
    /// keeps its id. Any other state is [`Error::WrongState`]. Its ledger
    /// rows stay for the ledger's window.
    pub async fn delete_run(&self, id: RunId, by: Actor) -> Result<Run> {
        self.store()
            .delete_run(DeleteRequest {
                run_id: id,
                actor: by.name,
                comment: by.comment,
                now: self.clock().now(),
            })
            .await
            .map_err(map_store)
    }
}
