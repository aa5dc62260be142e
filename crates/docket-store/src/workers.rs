//! The roster of remote workers: who claimed or heartbeated, for which
//! tenant and jobs, and when last (docs/WORKER_PROTOCOL.md, "Listing
//! workers"). Only a listing for operators: the evidence of which worker ran
//! an attempt is the attempt row's `worker`, written with the claim.

use crate::Result;
use async_trait::async_trait;
use docket_core::Timestamp;
use serde::{Deserialize, Serialize};

/// A worker showing a sign of life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerSeen {
    /// The tenant its token reaches.
    pub tenant: String,
    /// Its name (stored on the attempts it runs).
    pub name: String,
    /// The jobs it asked for (a claim), or `None` (a heartbeat: the jobs
    /// stay as last claimed).
    pub jobs: Option<Vec<String>>,
    /// When.
    pub now: Timestamp,
}

/// A registered worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Its tenant.
    pub tenant: String,
    /// Its name.
    pub name: String,
    /// The jobs of its last claim, sorted.
    pub jobs: Vec<String>,
    /// When it was first seen.
    pub first_seen_at: Timestamp,
    /// Its last claim or heartbeat.
    pub last_seen_at: Timestamp,
    /// The tenant's runs running under its name now.
    pub running: u64,
}

/// Storage of the worker roster. A supertrait of [`Store`](crate::Store).
#[async_trait]
pub trait WorkerStore: Send + Sync {
    /// Records that a worker was seen: inserted the first time, its
    /// `last_seen_at` (never moved back) and, when given, its jobs updated
    /// after.
    async fn touch_worker(&self, seen: WorkerSeen) -> Result<()>;

    /// The workers of one tenant (or all), most recently seen first.
    async fn list_workers(&self, tenant: Option<String>) -> Result<Vec<WorkerRecord>>;

    /// Forgets the workers last seen before `seen_before` that hold no
    /// running run; answers how many. The roster is a listing, not
    /// evidence (attempts keep their worker's name), so it is pruned.
    async fn forget_workers(&self, seen_before: Timestamp) -> Result<u64>;
}

/// How long the pruner keeps a worker in the roster after its last sign of
/// life: long enough to see who stopped over a weekend.
pub const ROSTER_WINDOW_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// The stored form of a job list (a JSON array, sorted, no duplicates).
pub(crate) fn jobs_text(jobs: &[String]) -> String {
    let mut v: Vec<&String> = jobs.iter().collect();
    v.sort();
    v.dedup();
    serde_json::to_string(&v).unwrap_or_else(|_| "[]".into())
}

/// A stored job list; an undecodable one reads as empty (a roster, not
/// evidence: one bad row must not fail the listing).
pub(crate) fn jobs_from_text(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}
