//! `GET /metrics`: Prometheus text exposition.
//!
//! - `docket_runs{tenant,job,status}`: a gauge read from the store at
//!   scrape time (exact, whichever process ran the runs);
//! - counters and histograms derived from the event tail (so they cover
//!   every worker writing to the store, not only this process), counted
//!   since this server started: attempts started, attempt failures by
//!   error class, retries scheduled, runs completed and failed, pickup
//!   latency (an attempt's start minus the instant its run became due:
//!   triggered, retry eligible, postponed until, or resumed by an operator)
//!   and attempt duration (start to the attempt's end event).
//!
//! - `docket_circuit_breaker_state{connection,state}`: 1 for each
//!   connection's current breaker state (`closed`, `open`, `half_open`),
//!   0 for the others; `docket_circuit_breaker_opened_total{connection}`
//!   and `docket_circuit_breaker_deferred_total{connection}` since this
//!   process started. Breakers are this process's (its worker's).
//! - `docket_breaker_open{connection}` and
//!   `docket_rate_limit_tokens{bucket}`: a connection's shared breaker and
//!   rate limit bucket, read from the store at scrape time
//!   (docs/RATE_LIMITS.md).
//! - `docket_connection_status{tenant,connection,status}`: 1 for each
//!   connection's status for the tenant (`enabled`, `disabled`,
//!   `expired`), read from the store at scrape time.
//!
//! - debounce (docs/FLOW_CONTROL.md): `docket_debounce_collapsed_total{tenant,job}`
//!   from the event tail (as the counters above) and
//!   `docket_debounce_windows_open{tenant,job}` read from the store at
//!   scrape time ([`Metrics::render_debounce`]).
//! - retention and queue operations (docs/OPERATIONS.md):
//!   `docket_runs_pruned_total{tenant,job}` and
//!   `docket_ledger_pruned_total{tenant}` from the pruning events;
//!   `docket_job_paused{tenant,job}` and the queue health gauges
//!   `docket_queue_due`, `docket_queue_lag_seconds`, `docket_queue_running`,
//!   `docket_queue_scheduled` (`{tenant,job}`) and
//!   `docket_queue_finished_5m{tenant,job,status}`, read from the store at
//!   scrape time.
//!
//! A token sees only its own tenant's series.

use docket::{EventRecord, RunId, Timestamp};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::Mutex;

/// Pickup latency buckets, in seconds.
const PICKUP_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];
/// Attempt duration buckets, in seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0,
];
/// Most runs/attempts tracked for latency at once; beyond it the oldest
/// half is forgotten (their latency is not observed).
const MAX_TRACKED: usize = 100_000;

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, buckets: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; buckets.len()];
        }
        for (i, b) in buckets.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

type Key = (String, String); // (tenant, job)

#[derive(Default)]
struct Inner {
    attempts: BTreeMap<Key, u64>,
    failures: BTreeMap<(String, String, String), u64>,
    retries: BTreeMap<Key, u64>,
    completed: BTreeMap<Key, u64>,
    failed: BTreeMap<Key, u64>,
    /// Runs pruned, from `runs_pruned` events (one per batch and job).
    pruned: BTreeMap<Key, u64>,
    /// Ledger rows pruned, per tenant (job `""`), from `ledger_pruned`.
    ledger_pruned: BTreeMap<Key, u64>,
    /// Triggers collapsed by a debounce, from `trigger_collapsed`.
    collapsed: BTreeMap<Key, u64>,
    pickup: BTreeMap<Key, Histogram>,
    duration: BTreeMap<Key, Histogram>,
    due: HashMap<RunId, Timestamp>,
    started: HashMap<(RunId, u32), Timestamp>,
}

/// Counters and histograms fed by the event tail.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn bump<K: Ord>(m: &mut BTreeMap<K, u64>, k: K) {
    *m.entry(k).or_insert(0) += 1;
}

fn ts_field(e: &EventRecord, field: &str) -> Option<Timestamp> {
    e.data.get(field).and_then(|v| v.as_i64()).map(Timestamp)
}

fn secs(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}

fn bound<K, V>(m: &mut HashMap<K, V>) {
    if m.len() >= MAX_TRACKED {
        m.clear();
    }
}

impl Metrics {
    /// Takes one published event into account.
    pub fn observe(&self, e: &EventRecord) {
        let mut m = self.inner.lock().expect("metrics lock");
        let key = (e.tenant.clone(), e.job.clone());
        match e.kind.as_str() {
            "run_triggered" => {
                bound(&mut m.due);
                m.due
                    .insert(e.run_id, ts_field(e, "run_after").unwrap_or(e.at));
            }
            "retry_scheduled" => {
                bump(&mut m.retries, key.clone());
                bound(&mut m.due);
                m.due
                    .insert(e.run_id, ts_field(e, "eligible_at").unwrap_or(e.at));
            }
            "run_postponed" => {
                bound(&mut m.due);
                m.due.insert(e.run_id, ts_field(e, "until").unwrap_or(e.at));
            }
            "attempt_released" | "input_received" | "operator_retry" | "operator_skip" => {
                bound(&mut m.due);
                m.due.insert(e.run_id, e.at);
            }
            "attempt_started" => {
                bump(&mut m.attempts, key.clone());
                if let Some(due) = m.due.remove(&e.run_id) {
                    m.pickup
                        .entry(key.clone())
                        .or_default()
                        .observe(&PICKUP_BUCKETS, secs(e.at.millis_since(due)));
                }
                if let Some(n) = e.attempt {
                    bound(&mut m.started);
                    m.started.insert((e.run_id, n), e.at);
                }
            }
            "attempt_failed" => {
                let class = e
                    .data
                    .get("error_class")
                    .and_then(|v| v.as_str())
                    .unwrap_or("unknown")
                    .to_string();
                bump(&mut m.failures, (key.0.clone(), key.1.clone(), class));
            }
            "lease_expired" => {
                bump(
                    &mut m.failures,
                    (key.0.clone(), key.1.clone(), "lease_expired".into()),
                );
            }
            "trigger_collapsed" => bump(&mut m.collapsed, key.clone()),
            "run_completed" => bump(&mut m.completed, key.clone()),
            "run_failed" => bump(&mut m.failed, key.clone()),
            k if k == docket::retention::RUNS_PRUNED || k == docket::retention::LEDGER_PRUNED => {
                let field = if k == docket::retention::RUNS_PRUNED {
                    "runs"
                } else {
                    "rows"
                };
                let n = e.data.get(field).and_then(|v| v.as_u64()).unwrap_or(0);
                let map = if k == docket::retention::RUNS_PRUNED {
                    &mut m.pruned
                } else {
                    &mut m.ledger_pruned
                };
                *map.entry(key.clone()).or_default() += n;
            }
            _ => {}
        }
        const ENDS: [&str; 9] = [
            "attempt_failed",
            "attempt_deferred",
            "run_completed",
            "run_postponed",
            "input_requested",
            "run_cancelled",
            "attempt_released",
            "lease_expired",
            "run_failed",
        ];
        if ENDS.contains(&e.kind.as_str()) {
            if let Some(n) = e.attempt {
                if let Some(start) = m.started.remove(&(e.run_id, n)) {
                    m.duration
                        .entry(key)
                        .or_default()
                        .observe(&DURATION_BUCKETS, secs(e.at.millis_since(start)));
                }
            }
        }
    }

    /// The Prometheus text for `tenant`, with the run counts read from the
    /// store (`(job, status, count)`).
    pub fn render(&self, tenant: &str, runs: &[(String, String, i64)]) -> String {
        let m = self.inner.lock().expect("metrics lock");
        let mut out = String::new();
        let t = escape(tenant);
        out.push_str("# HELP docket_runs Runs by job and status (read from the store).\n# TYPE docket_runs gauge\n");
        for (job, status, n) in runs {
            let _ = writeln!(
                out,
                "docket_runs{{tenant=\"{t}\",job=\"{}\",status=\"{status}\"}} {n}",
                escape(job)
            );
        }
        counter(
            &mut out,
            "docket_attempts_started_total",
            "Attempts started.",
            &m.attempts,
            tenant,
        );
        out.push_str("# HELP docket_attempt_failures_total Failed attempts by error class.\n# TYPE docket_attempt_failures_total counter\n");
        for ((tn, job, class), n) in &m.failures {
            if tn == tenant {
                let _ = writeln!(
                    out,
                    "docket_attempt_failures_total{{tenant=\"{t}\",job=\"{}\",error_class=\"{}\"}} {n}",
                    escape(job),
                    escape(class)
                );
            }
        }
        counter(
            &mut out,
            "docket_retries_scheduled_total",
            "Retries scheduled by the policy.",
            &m.retries,
            tenant,
        );
        counter(
            &mut out,
            "docket_runs_completed_total",
            "Runs completed.",
            &m.completed,
            tenant,
        );
        counter(
            &mut out,
            "docket_runs_failed_total",
            "Runs failed (terminal).",
            &m.failed,
            tenant,
        );
        counter(
            &mut out,
            "docket_runs_pruned_total",
            "Final runs deleted by the pruner (retention), with all their rows.",
            &m.pruned,
            tenant,
        );
        let ledger: u64 = m
            .ledger_pruned
            .iter()
            .filter(|((tn, _), _)| tn == tenant)
            .map(|(_, n)| n)
            .sum();
        let _ = write!(
            out,
            "# HELP docket_ledger_pruned_total Ledger rows deleted by the pruner (past the ledger window, their run gone).\n# TYPE docket_ledger_pruned_total counter\ndocket_ledger_pruned_total{{tenant=\"{t}\"}} {ledger}\n"
        );
        histogram(
            &mut out,
            "docket_pickup_latency_seconds",
            "From a run becoming due to its attempt starting.",
            &m.pickup,
            &PICKUP_BUCKETS,
            tenant,
        );
        histogram(
            &mut out,
            "docket_attempt_duration_seconds",
            "From an attempt's start to its end.",
            &m.duration,
            &DURATION_BUCKETS,
            tenant,
        );
        out
    }
}

impl Metrics {
    /// Debounce (docs/FLOW_CONTROL.md, "Debounce"), every job in `jobs`
    /// listed (0 when it has none) so alerts can use `rate()`:
    /// `docket_debounce_collapsed_total{tenant,job}`, the triggers
    /// collapsed into an existing run, counted from the event tail since
    /// this server started (by every process on the store; an event the
    /// pruner deletes later was counted when it was written), and
    /// `docket_debounce_windows_open{tenant,job}`, the windows open now
    /// (`open`, read from the store at scrape time).
    pub fn render_debounce(
        &self,
        out: &mut String,
        tenant: &str,
        jobs: &[String],
        open: &[docket_store::DebounceCount],
    ) {
        let mut collapsed: BTreeMap<&str, u64> = jobs.iter().map(|j| (j.as_str(), 0)).collect();
        let m = self.inner.lock().expect("metrics lock");
        for ((tn, job), n) in &m.collapsed {
            if tn == tenant {
                collapsed.insert(job, *n);
            }
        }
        let mut windows: BTreeMap<&str, u64> = jobs.iter().map(|j| (j.as_str(), 0)).collect();
        for c in open.iter().filter(|c| c.tenant == tenant) {
            windows.insert(&c.job, c.open);
        }
        let t = escape(tenant);
        for (name, kind, help, values) in [
            (
                "docket_debounce_collapsed_total",
                "counter",
                "Triggers collapsed into an existing run by a debounce (since this server started, every process).",
                &collapsed,
            ),
            (
                "docket_debounce_windows_open",
                "gauge",
                "Debounce windows open now: a trigger of their key would be collapsed.",
                &windows,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (job, n) in values {
                let _ = writeln!(out, "{name}{{tenant=\"{t}\",job=\"{}\"}} {n}", escape(job));
            }
        }
    }
}

/// The "recent" window of queue health (throughput, `*_5m`).
pub const HEALTH_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// Reads one gauge of a job's queue health.
type HealthGauge = fn(&docket::retention::JobHealth, docket::Timestamp) -> f64;

/// Queue health per job, read from the store at scrape time (so it is
/// right whichever process runs the work), every registered job listed
/// (0 when idle) so alerts can compare against thresholds:
/// `docket_queue_due{tenant,job}`, `docket_queue_lag_seconds{tenant,job}`
/// (age of the oldest due run), `docket_queue_running{tenant,job}`,
/// `docket_queue_scheduled{tenant,job}`,
/// `docket_queue_finished_5m{tenant,job,status}`.
pub fn render_queue(
    out: &mut String,
    tenant: &str,
    jobs: &[String],
    health: &[docket::retention::JobHealth],
    now: docket::Timestamp,
) {
    let t = escape(tenant);
    let of = |job: &str| health.iter().find(|h| h.tenant == tenant && h.job == job);
    let gauges: [(&str, &str, HealthGauge); 6] = [
        (
            "docket_queue_due",
            "Runs due now (pending or postponed, run_after passed), paused or not.",
            |h, _| h.due as f64,
        ),
        (
            "docket_queue_lag_seconds",
            "Age of the oldest due run: how far the queue is behind (0 when none is due).",
            |h, now| h.lag_ms(now) as f64 / 1000.0,
        ),
        ("docket_queue_running", "Runs running now.", |h, _| {
            h.running as f64
        }),
        (
            "docket_queue_scheduled",
            "Runs waiting for a later time (retries, postponements, deferrals).",
            |h, _| h.scheduled as f64,
        ),
        (
            "docket_queue_held",
            "Of the due runs: those held back by their concurrency key (no slot free for the key).",
            |h, _| h.held as f64,
        ),
        (
            "docket_queue_deferred",
            "Of the scheduled runs: those deferred without sending by a rate limit, an open circuit or an action in flight.",
            |h, _| h.deferred as f64,
        ),
    ];
    for (name, help, get) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for job in jobs {
            let v = of(job).map_or(0.0, |h| get(h, now));
            let _ = writeln!(out, "{name}{{tenant=\"{t}\",job=\"{}\"}} {v}", escape(job));
        }
    }
    out.push_str("# HELP docket_queue_finished_5m Runs completed or failed in the last 5 minutes (from the store).\n# TYPE docket_queue_finished_5m gauge\n");
    for job in jobs {
        let h = of(job);
        for (status, n) in [
            ("completed", h.map_or(0, |h| h.completed_recently)),
            ("failed", h.map_or(0, |h| h.failed_recently)),
        ] {
            let _ = writeln!(
                out,
                "docket_queue_finished_5m{{tenant=\"{t}\",job=\"{}\",status=\"{status}\"}} {n}",
                escape(job)
            );
        }
    }
}

/// `docket_job_paused{tenant,job}`: 1 for each job of `jobs` paused for
/// the tenant (by itself or by `*`), 0 for the others — read from the
/// store at scrape time, so alerts see a pause made by any process.
pub fn render_paused(
    out: &mut String,
    tenant: &str,
    jobs: &[String],
    pauses: &[docket::retention::Pause],
) {
    out.push_str("# HELP docket_job_paused Whether the job is paused for the tenant (its runs are not claimed).\n# TYPE docket_job_paused gauge\n");
    let t = escape(tenant);
    for job in jobs {
        let paused = pauses
            .iter()
            .any(|p| p.tenant == tenant && (&p.job == job || p.job == docket::retention::ALL_JOBS));
        let _ = writeln!(
            out,
            "docket_job_paused{{tenant=\"{t}\",job=\"{}\"}} {}",
            escape(job),
            u8::from(paused)
        );
    }
}

/// `docket_runs_sleeping{tenant}`: runs suspended in a durable sleep
/// (`ctx.sleep`), read from the store at scrape time (one query).
pub fn render_sleeping(out: &mut String, tenant: &str, n: i64) {
    out.push_str("# HELP docket_runs_sleeping Runs suspended in a durable sleep (read from the store).\n# TYPE docket_runs_sleeping gauge\n");
    let _ = writeln!(
        out,
        "docket_runs_sleeping{{tenant=\"{}\"}} {n}",
        escape(tenant)
    );
}

/// `docket_runs_waiting_for_children{tenant}`: parents suspended in a join
/// now (`ctx.join`), read from the store at scrape time.
pub fn render_joining(out: &mut String, tenant: &str, n: i64) {
    out.push_str("# HELP docket_runs_waiting_for_children Runs suspended until their child runs end.\n# TYPE docket_runs_waiting_for_children gauge\n");
    let _ = writeln!(
        out,
        "docket_runs_waiting_for_children{{tenant=\"{}\"}} {n}",
        escape(tenant)
    );
}

/// Concurrency keys (docs/FLOW_CONTROL.md), read from the store at scrape
/// time so every process's runs count: `docket_concurrency_running`,
/// `docket_concurrency_limit` and `docket_concurrency_held` (due runs held
/// back because the key is full: alert on it staying above 0) per key.
/// Only keys with runs running or waiting appear (at most
/// `limits::MAX_KEYS`), so finished keys do not pile up as series.
pub fn render_concurrency(out: &mut String, tenant: &str, keys: &[docket_store::KeyUsage]) {
    let t = escape(tenant);
    for (name, help) in [
        (
            "docket_concurrency_running",
            "Runs running per concurrency key (every process).",
        ),
        (
            "docket_concurrency_limit",
            "The limit of a concurrency key.",
        ),
        (
            "docket_concurrency_held",
            "Due runs held back by a full concurrency key (0 while the key has room).",
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for k in keys {
            let v = match name {
                "docket_concurrency_running" => k.running,
                "docket_concurrency_limit" => u64::from(k.limit),
                _ if k.running >= u64::from(k.limit) => k.due,
                _ => 0,
            };
            let _ = writeln!(
                out,
                "{name}{{tenant=\"{t}\",key=\"{}\"}} {v}",
                escape(&k.key)
            );
        }
    }
}

/// `docket_store_errors_total{kind}`: store failures this process's
/// workers met since it started, by kind (`connection`, `busy` are waited
/// out; `constraint`, `corrupt`, `bug` are not and are logged as errors).
/// Every kind is listed, at 0 when none happened, so alerts can use rate().
pub fn render_store_errors(out: &mut String, counts: &[(docket_store::DbErrorKind, u64)]) {
    use docket_store::DbErrorKind as K;
    out.push_str("# HELP docket_store_errors_total Store failures met by this process's workers, by kind.\n# TYPE docket_store_errors_total counter\n");
    for kind in [K::Connection, K::Busy, K::Constraint, K::Corrupt, K::Bug] {
        let n = counts
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n);
        out.push_str(&format!(
            "docket_store_errors_total{{kind=\"{kind}\"}} {n}\n"
        ));
    }
}

/// The scheduler's series of this process (the leader's count; other
/// processes show 0): `docket_schedule_slots_fired_total{kind}`,
/// `docket_schedule_slots_skipped_total{reason}`, and how late fired slots
/// were behind their fire time, `docket_schedule_late_seconds` (a summary:
/// `_sum`, `_count`) with `docket_schedule_late_seconds_max` and `_last`.
pub fn render_schedules(out: &mut String, c: &docket::ScheduleCounters) {
    out.push_str("# HELP docket_schedule_slots_fired_total Schedule slots that made a run, by kind (fired, caught_up, backfilled, triggered, unbuffered).\n# TYPE docket_schedule_slots_fired_total counter\n");
    for kind in [
        "fired",
        "caught_up",
        "backfilled",
        "triggered",
        "unbuffered",
    ] {
        let n = c.fired.get(kind).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "docket_schedule_slots_fired_total{{kind=\"{kind}\"}} {n}"
        );
    }
    out.push_str("# HELP docket_schedule_slots_skipped_total Schedule slots not fired, by reason.\n# TYPE docket_schedule_slots_skipped_total counter\n");
    let mut reasons: Vec<&str> = vec![
        "previous_run_unfinished",
        "buffer_full",
        "catch_up_none",
        "superseded",
        "outside_catch_up_window",
    ];
    for r in c.skipped.keys() {
        if !reasons.contains(&r.as_str()) {
            reasons.push(r);
        }
    }
    for r in reasons {
        let n = c.skipped.get(r).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "docket_schedule_slots_skipped_total{{reason=\"{}\"}} {n}",
            escape(r)
        );
    }
    out.push_str("# HELP docket_schedule_late_seconds How late fired slots were behind their fire time (slot + jitter).\n# TYPE docket_schedule_late_seconds summary\n");
    let _ = writeln!(
        out,
        "docket_schedule_late_seconds_sum {}",
        c.late_seconds_sum
    );
    let _ = writeln!(out, "docket_schedule_late_seconds_count {}", c.late_count);
    out.push_str("# HELP docket_schedule_late_seconds_max The latest a slot fired, in seconds behind its fire time.\n# TYPE docket_schedule_late_seconds_max gauge\n");
    let _ = writeln!(
        out,
        "docket_schedule_late_seconds_max {}",
        c.max_late_seconds
    );
    out.push_str("# HELP docket_schedule_late_seconds_last How late the last fired slot was.\n# TYPE docket_schedule_late_seconds_last gauge\n");
    let _ = writeln!(
        out,
        "docket_schedule_late_seconds_last {}",
        c.last_late_seconds
    );
}

/// `docket_trace_spans_exported_total` and
/// `docket_trace_spans_dropped_total`: spans this process's exporter
/// delivered, and spans lost because the collector was down or refused them
/// (runs are never held up for traces; docs/OBSERVABILITY.md). Listed only
/// when traces are on.
pub fn render_traces(out: &mut String, exported: u64, dropped: u64) {
    out.push_str("# HELP docket_trace_spans_exported_total Spans this process exported to the OTLP collector.\n# TYPE docket_trace_spans_exported_total counter\n");
    out.push_str(&format!("docket_trace_spans_exported_total {exported}\n"));
    out.push_str("# HELP docket_trace_spans_dropped_total Spans this process lost: their export failed, or its export queue was full.\n# TYPE docket_trace_spans_dropped_total counter\n");
    out.push_str(&format!("docket_trace_spans_dropped_total {dropped}\n"));
}

/// Reads one counter of a breaker.
type BreakerCounter = fn(&docket::http::BreakerState) -> u64;

/// The breaker and connection-status series (see the module docs).
pub fn render_connections(
    out: &mut String,
    tenant: &str,
    breakers: &[docket::http::BreakerState],
    statuses: &[(String, docket::http::ConnectionStatus)],
) {
    use docket::http::{BreakerPhase, ConnectionStatus};
    out.push_str("# HELP docket_circuit_breaker_state A connection's circuit breaker state in this process (1 = current).\n# TYPE docket_circuit_breaker_state gauge\n");
    for b in breakers {
        for p in [
            BreakerPhase::Closed,
            BreakerPhase::Open,
            BreakerPhase::HalfOpen,
        ] {
            let _ = writeln!(
                out,
                "docket_circuit_breaker_state{{connection=\"{}\",state=\"{}\"}} {}",
                escape(&b.connection),
                p.as_str(),
                u8::from(b.state == p)
            );
        }
    }
    let per_breaker: [(&str, &str, BreakerCounter); 2] = [
        (
            "docket_circuit_breaker_opened_total",
            "Times a connection's breaker opened since this process started.",
            |b| b.times_opened,
        ),
        (
            "docket_circuit_breaker_deferred_total",
            "Runs a connection's open breaker rescheduled (reason circuit_open) since this process started.",
            |b| b.deferred,
        ),
    ];
    for (name, help, value) in per_breaker {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for b in breakers {
            let _ = writeln!(
                out,
                "{name}{{connection=\"{}\"}} {}",
                escape(&b.connection),
                value(b)
            );
        }
    }
    out.push_str("# HELP docket_connection_status A connection's status for the tenant (1 = current).\n# TYPE docket_connection_status gauge\n");
    let t = escape(tenant);
    for (name, status) in statuses {
        for s in ConnectionStatus::ALL {
            let _ = writeln!(
                out,
                "docket_connection_status{{tenant=\"{t}\",connection=\"{}\",status=\"{}\"}} {}",
                escape(name),
                s.as_str(),
                u8::from(*status == s)
            );
        }
    }
}

/// `docket_breaker_open{connection}` (1 while a connection's shared
/// breaker is open or half-open) and `docket_rate_limit_tokens{bucket}`
/// (whole tokens left now in a connection's bucket; keyed buckets are not
/// listed), both read from the store at scrape time.
pub fn render_limits(out: &mut String, limits: &[docket::http::ConnectionLimits]) {
    out.push_str("# HELP docket_breaker_open 1 while a connection's circuit breaker (shared by every process) is open or half-open.\n# TYPE docket_breaker_open gauge\n");
    for l in limits {
        let _ = writeln!(
            out,
            "docket_breaker_open{{connection=\"{}\"}} {}",
            escape(&l.connection),
            u8::from(l.breaker.state != docket::http::BreakerPhase::Closed)
        );
    }
    out.push_str("# HELP docket_rate_limit_tokens Whole tokens left now in a connection's rate limit bucket (shared by every process).\n# TYPE docket_rate_limit_tokens gauge\n");
    for l in limits {
        let own = format!("connection:{}", l.connection);
        for b in l.buckets.iter().filter(|b| b.key == own) {
            let _ = writeln!(
                out,
                "docket_rate_limit_tokens{{bucket=\"{}\"}} {}",
                escape(&b.key),
                b.tokens_left
            );
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn counter(out: &mut String, name: &str, help: &str, m: &BTreeMap<Key, u64>, tenant: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for ((tn, job), n) in m {
        if tn == tenant {
            let _ = writeln!(
                out,
                "{name}{{tenant=\"{}\",job=\"{}\"}} {n}",
                escape(tn),
                escape(job)
            );
        }
    }
}

fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    m: &BTreeMap<Key, Histogram>,
    buckets: &[f64],
    tenant: &str,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for ((tn, job), h) in m {
        if tn != tenant {
            continue;
        }
        let labels = format!("tenant=\"{}\",job=\"{}\"", escape(tn), escape(job));
        for (b, c) in buckets.iter().zip(&h.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(
        run: RunId,
        tenant: &str,
        kind: &str,
        at: i64,
        attempt: Option<u32>,
        data: serde_json::Value,
    ) -> EventRecord {
        EventRecord {
            id: 0,
            run_id: run,
            tenant: tenant.into(),
            job: "mail".into(),
            kind: kind.into(),
            at: Timestamp(at),
            attempt,
            lease_id: None,
            actor: None,
            comment: None,
            data,
        }
    }

    #[test]
    fn derives_counters_and_histograms_from_events() {
        let m = Metrics::default();
        let r = RunId::new();
        m.observe(&ev(
            r,
            "a",
            "run_triggered",
            1000,
            None,
            json!({"run_after": 1000}),
        ));
        m.observe(&ev(r, "a", "attempt_started", 1004, Some(1), json!({})));
        m.observe(&ev(
            r,
            "a",
            "attempt_failed",
            1104,
            Some(1),
            json!({"error_class": "timeout"}),
        ));
        m.observe(&ev(
            r,
            "a",
            "retry_scheduled",
            1104,
            Some(1),
            json!({"eligible_at": 2104}),
        ));
        m.observe(&ev(r, "a", "attempt_started", 2204, Some(2), json!({})));
        m.observe(&ev(r, "a", "run_completed", 2214, Some(2), json!({})));
        m.observe(&ev(
            RunId::new(),
            "b",
            "attempt_started",
            0,
            Some(1),
            json!({}),
        ));
        let text = m.render("a", &[("mail".into(), "completed".into(), 1)]);
        assert!(text.contains("docket_runs{tenant=\"a\",job=\"mail\",status=\"completed\"} 1"));
        assert!(text.contains("docket_attempts_started_total{tenant=\"a\",job=\"mail\"} 2"));
        assert!(text.contains(
            "docket_attempt_failures_total{tenant=\"a\",job=\"mail\",error_class=\"timeout\"} 1"
        ));
        assert!(text.contains("docket_retries_scheduled_total{tenant=\"a\",job=\"mail\"} 1"));
        // Pickup: 4 ms and 100 ms.
        assert!(text.contains(
            "docket_pickup_latency_seconds_bucket{tenant=\"a\",job=\"mail\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "docket_pickup_latency_seconds_bucket{tenant=\"a\",job=\"mail\",le=\"0.1\"} 2"
        ));
        assert!(text.contains("docket_pickup_latency_seconds_count{tenant=\"a\",job=\"mail\"} 2"));
        // Durations: 100 ms and 10 ms.
        assert!(text.contains(
            "docket_attempt_duration_seconds_bucket{tenant=\"a\",job=\"mail\",le=\"0.01\"} 1"
        ));
        assert!(
            text.contains("docket_attempt_duration_seconds_sum{tenant=\"a\",job=\"mail\"} 0.11")
        );
        assert!(!text.contains("tenant=\"b\""));
    }
}
