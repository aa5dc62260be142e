//! Operator actions on many runs at once: by an id list or by a filter,
//! one page at a time. Each run's action is the single-run operation
//! (its own transaction and audit event, exactly as if done alone), so a
//! bulk call is never one giant transaction, and a refusal (wrong state,
//! not found) is reported for that run without failing the others. A
//! filter is walked newest first by id with a cursor, so a call can be
//! resumed where it stopped, and runs that an action moves out of the
//! filter (a retried run is pending again) are not visited twice.

use crate::ops::Actor;
use crate::{Docket, Error, Result, RunFilter, RunId, Timestamp};
use serde::Serialize;
use serde_json::Value;

/// Most runs in one bulk page.
pub const MAX_BULK_PAGE: usize = 500;
/// A dry run counts at most this many matching runs.
pub const MAX_DRY_RUN_COUNT: usize = 1_000_000;

/// What to do to each run.
#[derive(Clone, Debug, PartialEq)]
pub enum BulkAction {
    /// Retry a failed run (see [`Docket::retry`]).
    Retry {
        /// Merged into each run's variables.
        updated_variables: Option<Value>,
    },
    /// Cancel (see [`Docket::cancel`]).
    Cancel,
    /// A new run with the same input (see [`Docket::retrigger`]).
    Retrigger,
    /// Postpone until an instant (see [`Docket::postpone`]).
    Postpone {
        /// Not before.
        until: Timestamp,
    },
    /// Delete a final run (see [`Docket::delete_run`]).
    Delete,
}

impl BulkAction {
    /// `retry`, `cancel`, `retrigger`, `postpone`, `delete`.
    pub fn name(&self) -> &'static str {
        match self {
            BulkAction::Retry { .. } => "retry",
            BulkAction::Cancel => "cancel",
            BulkAction::Retrigger => "retrigger",
            BulkAction::Postpone { .. } => "postpone",
            BulkAction::Delete => "delete",
        }
    }
}

/// Which runs.
#[derive(Clone, Debug, PartialEq)]
pub enum BulkTarget {
    /// These runs (each must belong to the tenant, or it is reported
    /// `not_found`).
    Ids(Vec<RunId>),
    /// Every run of the tenant matching the filter (its `tenant`,
    /// `before_id` and `limit` are set by the call).
    Filter(RunFilter),
}

/// One page of a bulk action.
#[derive(Clone, Debug)]
pub struct BulkRequest {
    /// The caller's tenant: only its runs are touched.
    pub tenant: String,
    /// What to do.
    pub action: BulkAction,
    /// Which runs.
    pub target: BulkTarget,
    /// Who and why (each run's audit event carries it).
    pub by: Actor,
    /// At most this many runs in this page (1..=[`MAX_BULK_PAGE`]).
    pub limit: usize,
    /// Filter: continue after this run (the previous page's
    /// `next_cursor`). Ids: skip the ids up to and including this one.
    pub cursor: Option<RunId>,
    /// Only count what matches; change nothing.
    pub dry_run: bool,
}

/// What happened to one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BulkItem {
    /// The run.
    pub run_id: RunId,
    /// Whether the action was applied.
    pub ok: bool,
    /// Its status after the action (for `delete`: before it).
    pub status: Option<String>,
    /// `retrigger`: the new run.
    pub new_run_id: Option<RunId>,
    /// Why not: `wrong_state`, `not_found`, `invalid_input` (e.g. a
    /// retrigger whose input the job's current schema refuses),
    /// `store_error` (transient: try the page again from its cursor).
    pub error: Option<String>,
    /// The refusal's sentence.
    pub message: Option<String>,
}

/// One page's answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BulkPage {
    /// The action's name.
    pub action: String,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// Dry run: how many runs match (all pages, up to
    /// [`MAX_DRY_RUN_COUNT`]).
    pub matched: Option<usize>,
    /// Per run, in the order visited (empty for a dry run).
    pub results: Vec<BulkItem>,
    /// Applied in this page.
    pub succeeded: usize,
    /// Refused in this page.
    pub failed: usize,
    /// Pass it as `cursor` for the next page; `None` when done.
    pub next_cursor: Option<RunId>,
}

impl Docket {
    /// Runs one page of a bulk action (see the module's documentation).
    pub async fn bulk(&self, req: BulkRequest) -> Result<BulkPage> {
        if req.limit == 0 || req.limit > MAX_BULK_PAGE {
            return Err(Error::InvalidInput(format!(
                "limit must be 1 to {MAX_BULK_PAGE}, not {}",
                req.limit
            )));
        }
        let mut page = BulkPage {
            action: req.action.name().into(),
            dry_run: req.dry_run,
            matched: None,
            results: Vec::new(),
            succeeded: 0,
            failed: 0,
            next_cursor: None,
        };
        let (ids, more) = match &req.target {
            BulkTarget::Ids(ids) => {
                if ids.is_empty() {
                    return Err(Error::InvalidInput("ids is empty".into()));
                }
                let start = match req.cursor {
                    Some(c) => ids.iter().position(|i| *i == c).map_or(0, |p| p + 1),
                    None => 0,
                };
                if req.dry_run {
                    let mut n = 0;
                    for id in &ids[start..] {
                        if self.owned(&req.tenant, *id).await?.is_some() {
                            n += 1;
                        }
                    }
                    page.matched = Some(n);
                    return Ok(page);
                }
                let end = (start + req.limit).min(ids.len());
                (ids[start..end].to_vec(), end < ids.len())
            }
            BulkTarget::Filter(f) => {
                let mut f = f.clone();
                f.tenant = Some(req.tenant.clone());
                if req.dry_run {
                    page.matched = Some(self.count_matching(f, req.cursor).await?);
                    return Ok(page);
                }
                f.before_id = req.cursor;
                f.limit = req.limit;
                let runs = self.store().list_runs(f).await?;
                let full = runs.len() == req.limit;
                (runs.into_iter().map(|r| r.id).collect(), full)
            }
        };
        for id in &ids {
            let item = self.bulk_one(&req, *id).await;
            if item.ok {
                page.succeeded += 1;
            } else {
                page.failed += 1;
            }
            page.results.push(item);
        }
        page.next_cursor = if more { ids.last().copied() } else { None };
        Ok(page)
    }

    async fn owned(&self, tenant: &str, id: RunId) -> Result<Option<crate::Run>> {
        Ok(self
            .store()
            .get_run(id)
            .await?
            .filter(|r| r.tenant == tenant))
    }

    async fn count_matching(&self, mut f: RunFilter, cursor: Option<RunId>) -> Result<usize> {
        let mut n = 0;
        f.before_id = cursor;
        f.limit = MAX_BULK_PAGE;
        loop {
            let runs = self.store().list_runs(f.clone()).await?;
            n += runs.len();
            if runs.len() < MAX_BULK_PAGE || n >= MAX_DRY_RUN_COUNT {
                return Ok(n.min(MAX_DRY_RUN_COUNT));
            }
            f.before_id = runs.last().map(|r| r.id);
        }
    }

    async fn bulk_one(&self, req: &BulkRequest, id: RunId) -> BulkItem {
        let mut item = BulkItem {
            run_id: id,
            ok: false,
            status: None,
            new_run_id: None,
            error: None,
            message: None,
        };
        let res = match self.owned(&req.tenant, id).await {
            Ok(None) => Err(Error::RunNotFound(id)),
            Err(e) => Err(e),
            Ok(Some(_)) => {
                let by = req.by.clone();
                match &req.action {
                    BulkAction::Retry { updated_variables } => self
                        .retry(id, updated_variables.clone(), by)
                        .await
                        .map(|r| (r.status, None)),
                    BulkAction::Cancel => self.cancel(id, by).await.map(|r| (r.status, None)),
                    BulkAction::Retrigger => self
                        .retrigger(id, by)
                        .await
                        .map(|t| (t.run.status, Some(t.run.id))),
                    BulkAction::Postpone { until } => self
                        .postpone(id, *until, by)
                        .await
                        .map(|r| (r.status, None)),
                    BulkAction::Delete => self.delete_run(id, by).await.map(|r| (r.status, None)),
                }
            }
        };
        match res {
            Ok((status, new_run)) => {
                item.ok = true;
                item.status = Some(status.to_string());
                item.new_run_id = new_run;
            }
            Err(e) => {
                let code = match &e {
                    Error::WrongState { current, .. } => {
                        item.status = Some(current.to_string());
                        "wrong_state"
                    }
                    Error::RunNotFound(_) => "not_found",
                    Error::InvalidInput(_)
                    | Error::UnknownJob(_)
                    | Error::ContentTooLarge { .. } => "invalid_input",
                    _ => "store_error",
                };
                item.error = Some(code.into());
                item.message = Some(e.to_string());
            }
        }
        item
    }
}
