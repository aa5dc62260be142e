//! Read-only queries for dashboards: the "needs attention" count, bounded
//! scans of a tenant's runs (filters and text search that stay fast at any
//! table size), and aggregates over a recent time window.
//!
//! Every query here is bounded: a scan examines at most
//! [`RunScan::budget`] runs, newest first, and says where to resume; a
//! window examines at most [`WindowQuery::max_runs`] runs and says when it
//! was capped. Neither reads the database's clock: the window's start is a
//! parameter.

use crate::{Result, Run};
use async_trait::async_trait;
use docket_core::{ErrorClass, RunId, RunStatus, Timestamp};
use serde::{Deserialize, Serialize};

/// A bounded scan of one tenant's runs, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunScan {
    /// The tenant.
    pub tenant: String,
    /// Any of these statuses (all when empty). When every status is
    /// `failed` or `needs_input`, only runs needing attention are examined
    /// (their own index), so the budget goes much further.
    pub statuses: Vec<RunStatus>,
    /// Only this job.
    pub job: Option<String>,
    /// Case-insensitive (ASCII) substring of the run's id, job, idempotency
    /// key, correlation id, last error class and message, terminal reason or
    /// input JSON.
    pub text: Option<String>,
    /// Only runs with an id below this one (the previous page's resume
    /// point).
    pub before_id: Option<RunId>,
    /// Most runs returned.
    pub limit: usize,
    /// Most runs examined (in the attention index when the statuses allow).
    pub budget: usize,
}

/// A page of a [`RunScan`].
#[derive(Clone, Debug, PartialEq)]
pub struct ScanPage {
    /// Matching runs, newest first, at most `limit`.
    pub runs: Vec<Run>,
    /// How many runs were examined.
    pub examined: usize,
    /// Where the next page starts (`before_id`), when older runs may still
    /// match: after the last run returned when the page is full, or below
    /// the oldest run examined when the budget ran out first.
    pub resume_before: Option<RunId>,
}

/// An aggregate over the runs of one tenant triggered since an instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowQuery {
    /// The tenant.
    pub tenant: String,
    /// The window's start (runs created at or after it; attempts started at
    /// or after it).
    pub since: Timestamp,
    /// The width of one time bucket, in milliseconds (at least 1).
    pub bucket_ms: i64,
    /// Most runs examined, newest first.
    pub max_runs: usize,
}

/// Runs created in one bucket, of one job, now in one status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketCount {
    /// The bucket: `(created_at - since) / bucket_ms`.
    pub bucket: i64,
    /// The job.
    pub job: String,
    /// The runs' current status.
    pub status: RunStatus,
    /// How many.
    pub count: i64,
}

/// Failed attempts of one error class that started in one bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCount {
    /// The bucket: `(started_at - since) / bucket_ms`.
    pub bucket: i64,
    /// The error class.
    pub error_class: ErrorClass,
    /// Attempts that failed with it (including lease expiries).
    pub failures: i64,
    /// Of those, how many the policy answered with a retry (a stored
    /// delay).
    pub retries: i64,
    /// Of those, how many ended the run (`failed` without a retry).
    pub terminal: i64,
}

/// The answer of a [`WindowQuery`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowStats {
    /// Runs created in the window by bucket, job and current status.
    pub runs: Vec<BucketCount>,
    /// Failed attempts of those runs in the window, by bucket and class.
    pub classes: Vec<ClassCount>,
    /// How many runs were examined (the newest `max_runs` of the tenant).
    pub examined: usize,
    /// True when the window holds more runs than `max_runs`: the counts
    /// cover only the newest of them.
    pub capped: bool,
}

/// Dashboard queries. A supertrait of [`Store`](crate::Store), so every
/// backend implements it and a `DynStore` offers it.
#[async_trait]
pub trait StatsStore: Send + Sync {
    /// How many of the tenant's runs need attention (`failed` or
    /// `needs_input`). Reads only the attention index.
    async fn attention_count(&self, tenant: String) -> Result<i64>;

    /// A bounded scan: examines at most `budget` runs below `before_id`,
    /// newest first, and returns up to `limit` that match.
    async fn scan_runs(&self, scan: RunScan) -> Result<ScanPage>;

    /// Runs triggered since `since` (at most the newest `max_runs` of the
    /// tenant) by bucket, job and status, and their failed attempts by
    /// bucket and error class.
    async fn window_stats(&self, query: WindowQuery) -> Result<WindowStats>;
}

/// True when every status asked for is one the attention index holds.
pub fn attention_only(statuses: &[RunStatus]) -> bool {
    !statuses.is_empty()
        && statuses
            .iter()
            .all(|s| matches!(s, RunStatus::Failed | RunStatus::NeedsInput))
}

/// Turns the matches of a scan (up to `limit + 1`, newest first) into a
/// page; `examined` runs were looked at, the oldest being `floor`.
pub(crate) fn page(
    mut runs: Vec<Run>,
    limit: usize,
    budget: usize,
    examined: usize,
    floor: Option<RunId>,
) -> ScanPage {
    let resume_before = if runs.len() > limit {
        runs.truncate(limit);
        runs.last().map(|r| r.id)
    } else if examined >= budget {
        floor
    } else {
        None
    };
    ScanPage {
        runs,
        examined,
        resume_before,
    }
}

#[cfg(feature = "conformance")]
pub mod conformance {
    //! Conformance of [`StatsStore`] (run by each backend's tests through
    //! [`stats_conformance_tests!`](crate::stats_conformance_tests)).

    use super::*;
    use crate::conformance::T0;
    use crate::{AttemptEnd, ClaimRequest, DynStore, ErrorInfo, NewRun, Outcome, RetryRecord};
    use docket_core::TerminalReason;
    use serde_json::json;

    async fn trigger(store: &DynStore, tenant: &str, job: &str, input: serde_json::Value) -> Run {
        let mut n = NewRun::new(job, input);
        n.tenant = tenant.into();
        store.trigger(vec![n], T0).await.unwrap().remove(0).run
    }

    fn claim(job: &str, now: Timestamp) -> ClaimRequest {
        ClaimRequest {
            tenant: None,
            jobs: vec![job.into()],
            limit: 1,
            now,
            lease_ms: 30_000,
            worker: "w1".into(),
        }
    }

    fn err(class: ErrorClass) -> ErrorInfo {
        ErrorInfo {
            class,
            message: format!("{class} happened"),
            fingerprint: "fp".into(),
            failure_key: "fk".into(),
            action: None,
        }
    }

    /// Claims the one due run of `job` and ends its attempt with `outcome`.
    async fn run_once(store: &DynStore, job: &str, now: Timestamp, outcome: Outcome) -> Run {
        let run = store.claim(claim(job, now)).await.unwrap().remove(0);
        let lease = run.lease_id.unwrap();
        store
            .finish(vec![AttemptEnd {
                run_id: run.id,
                lease_id: lease,
                now: now.plus_millis(10),
                outcome,
            }])
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        store.get_run(run.id).await.unwrap().unwrap()
    }

    /// The attention count covers failed and needs_input runs of one tenant.
    pub async fn stats_attention_count(store: DynStore) {
        assert_eq!(store.attention_count("acme".into()).await.unwrap(), 0);
        trigger(&store, "acme", "a", json!(1)).await;
        run_once(
            &store,
            "a",
            T0,
            Outcome::Failed {
                error: Some(err(ErrorClass::InvalidInput)),
                reason: TerminalReason::InvalidInput,
                detail: "bad input".into(),
            },
        )
        .await;
        trigger(&store, "acme", "b", json!(2)).await;
        run_once(
            &store,
            "b",
            T0,
            Outcome::NeedsInput {
                name: "approval".into(),
                request: json!({"question": "ok?"}),
            },
        )
        .await;
        trigger(&store, "acme", "c", json!(3)).await;
        trigger(&store, "other", "a", json!(4)).await;
        run_once(
            &store,
            "a",
            T0,
            Outcome::Failed {
                error: Some(err(ErrorClass::InvalidInput)),
                reason: TerminalReason::InvalidInput,
                detail: "bad input".into(),
            },
        )
        .await;
        assert_eq!(store.attention_count("acme".into()).await.unwrap(), 2);
        assert_eq!(store.attention_count("other".into()).await.unwrap(), 1);
        assert_eq!(store.attention_count("nobody".into()).await.unwrap(), 0);
    }

    /// Scans filter by status, job and text, page newest first, stay within
    /// their budget and say where to resume.
    pub async fn stats_scan_filters_and_budget(store: DynStore) {
        let mut ids = Vec::new();
        for i in 0..10 {
            let job = if i % 2 == 0 { "even" } else { "odd" };
            let r = trigger(
                &store,
                "acme",
                job,
                json!({"customer": format!("Cust-{i}")}),
            )
            .await;
            ids.push(r.id);
        }
        trigger(&store, "other", "even", json!({"customer": "Cust-1"})).await;
        let newest_first: Vec<RunId> = ids.iter().rev().copied().collect();
        let scan = |f: &dyn Fn(&mut RunScan)| {
            let mut s = RunScan {
                tenant: "acme".into(),
                limit: 3,
                budget: 100,
                ..Default::default()
            };
            f(&mut s);
            s
        };
        // Plain pages, newest first, with a resume point.
        let p = store.scan_runs(scan(&|_| {})).await.unwrap();
        assert_eq!(
            p.runs.iter().map(|r| r.id).collect::<Vec<_>>(),
            newest_first[..3]
        );
        assert_eq!(p.resume_before, Some(newest_first[2]));
        let p2 = store
            .scan_runs(scan(&|s| s.before_id = p.resume_before))
            .await
            .unwrap();
        assert_eq!(
            p2.runs.iter().map(|r| r.id).collect::<Vec<_>>(),
            newest_first[3..6]
        );
        // Job and text (case-insensitive, in the input).
        let p = store
            .scan_runs(scan(&|s| {
                s.job = Some("odd".into());
                s.text = Some("cust-3".into());
            }))
            .await
            .unwrap();
        assert_eq!(p.runs.len(), 1);
        assert_eq!(p.runs[0].id, ids[3]);
        assert_eq!(p.resume_before, None);
        // The id is searchable too.
        let needle = ids[4].to_string()[24..].to_uppercase();
        let p = store
            .scan_runs(scan(&|s| s.text = Some(needle.clone())))
            .await
            .unwrap();
        assert_eq!(p.runs.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[4]]);
        // The budget bounds the scan: 4 runs examined, none matched, resume
        // below the oldest examined.
        let p = store
            .scan_runs(scan(&|s| {
                s.text = Some("Cust-0".into());
                s.budget = 4;
            }))
            .await
            .unwrap();
        assert!(p.runs.is_empty());
        assert_eq!(p.examined, 4);
        assert_eq!(p.resume_before, Some(newest_first[3]));
        let p = store
            .scan_runs(scan(&|s| {
                s.text = Some("Cust-0".into());
                s.before_id = Some(newest_first[3]);
            }))
            .await
            .unwrap();
        assert_eq!(p.runs.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[0]]);
        assert_eq!(p.examined, 6);
        assert_eq!(p.resume_before, None);
        // Statuses; the attention set reads only runs needing attention.
        run_once(
            &store,
            "even",
            T0,
            Outcome::Failed {
                error: Some(err(ErrorClass::Permanent)),
                reason: TerminalReason::PermanentError,
                detail: "permanent".into(),
            },
        )
        .await;
        let p = store
            .scan_runs(scan(&|s| {
                s.statuses = vec![RunStatus::Failed, RunStatus::NeedsInput];
                s.budget = 1;
            }))
            .await
            .unwrap();
        assert_eq!(p.runs.len(), 1);
        assert_eq!(p.runs[0].status, RunStatus::Failed);
        assert_eq!(p.runs[0].tenant, "acme");
        let p = store
            .scan_runs(scan(&|s| s.statuses = vec![RunStatus::Pending]))
            .await
            .unwrap();
        assert_eq!(p.runs.len(), 3);
        assert!(p.runs.iter().all(|r| r.status == RunStatus::Pending));
        // Another tenant's runs are never examined.
        let p = store
            .scan_runs(RunScan {
                tenant: "other".into(),
                limit: 10,
                budget: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(p.runs.len(), 1);
        assert_eq!(p.examined, 1);
    }

    /// Window stats count runs by bucket, job and status, and failed
    /// attempts by bucket and class, with retries and terminal failures.
    pub async fn stats_window_counts(store: DynStore) {
        // Created before the window: not counted.
        let mut old = NewRun::new("old", json!(0));
        old.tenant = "acme".into();
        store
            .trigger(vec![old], T0.plus_millis(-120_000))
            .await
            .unwrap();
        let since = T0.plus_millis(-60_000);
        // Two runs of `mail`: one retried twice then completed, one failed.
        trigger(&store, "acme", "mail", json!(1)).await;
        let mut t = T0;
        for _ in 0..2 {
            run_once(
                &store,
                "mail",
                t,
                Outcome::Retry {
                    error: err(ErrorClass::Timeout),
                    retry: RetryRecord {
                        policy: "default".into(),
                        delay_ms: 1_000,
                        eligible_at: t.plus_millis(1_010),
                        reason: "backoff".into(),
                    },
                },
            )
            .await;
            t = t.plus_millis(70_000);
        }
        run_once(&store, "mail", t, Outcome::Completed { output: json!(1) }).await;
        trigger(&store, "acme", "mail", json!(2)).await;
        run_once(
            &store,
            "mail",
            t,
            Outcome::Failed {
                error: Some(err(ErrorClass::Unauthorized)),
                reason: TerminalReason::PermanentError,
                detail: "unauthorized".into(),
            },
        )
        .await;
        trigger(&store, "other", "mail", json!(3)).await;
        let q = WindowQuery {
            tenant: "acme".into(),
            since,
            bucket_ms: 60_000,
            max_runs: 100,
        };
        let w = store.window_stats(q.clone()).await.unwrap();
        assert!(!w.capped);
        assert_eq!(w.examined, 3);
        let mut runs = w.runs.clone();
        runs.sort_by(|a, b| a.status.as_str().cmp(b.status.as_str()));
        assert_eq!(
            runs,
            [
                BucketCount {
                    bucket: 1,
                    job: "mail".into(),
                    status: RunStatus::Completed,
                    count: 1
                },
                BucketCount {
                    bucket: 1,
                    job: "mail".into(),
                    status: RunStatus::Failed,
                    count: 1
                },
            ]
        );
        let mut classes = w.classes.clone();
        classes.sort_by_key(|c| (c.bucket, c.error_class));
        assert_eq!(
            classes,
            [
                ClassCount {
                    bucket: 1,
                    error_class: ErrorClass::Timeout,
                    failures: 1,
                    retries: 1,
                    terminal: 0
                },
                ClassCount {
                    bucket: 2,
                    error_class: ErrorClass::Timeout,
                    failures: 1,
                    retries: 1,
                    terminal: 0
                },
                ClassCount {
                    bucket: 3,
                    error_class: ErrorClass::Unauthorized,
                    failures: 1,
                    retries: 0,
                    terminal: 1
                },
            ]
        );
        // The cap: only the newest run is examined, and the answer says so.
        let w = store
            .window_stats(WindowQuery { max_runs: 1, ..q })
            .await
            .unwrap();
        assert!(w.capped);
        assert_eq!(w.examined, 1);
        assert_eq!(w.runs.iter().map(|r| r.count).sum::<i64>(), 1);
    }
}

/// Generates one `#[tokio::test]` per [`StatsStore`] conformance function,
/// with the same two forms as
/// [`conformance_tests!`](crate::conformance_tests).
#[cfg(feature = "conformance")]
#[macro_export]
macro_rules! stats_conformance_tests {
    (optional: $factory:expr) => {
        $crate::stats_conformance_tests!(@each $factory;
            stats_attention_count, stats_scan_filters_and_budget, stats_window_counts);
    };
    ($factory:expr) => {
        $crate::stats_conformance_tests!(@each ::std::option::Option::Some($factory);
            stats_attention_count, stats_scan_filters_and_budget, stats_window_counts);
    };
    (@each $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let store: ::std::option::Option<$crate::DynStore> = $factory;
                if let ::std::option::Option::Some(store) = store {
                    $crate::stats::conformance::$name(store).await;
                }
            }
        )*
    };
}
