//! The hot path: `claim` and `finish`, set-based, and grouped.
//!
//! **Set-based.** A batch of attempt ends is applied by ONE statement (one
//! round trip, one commit) instead of a savepoint and five statements per
//! end. The statement locks the batch's runs in id order (`FOR UPDATE`, so
//! concurrent batches and heartbeats cannot deadlock), keeps the ends whose
//! lease still holds the run, and in the same statement updates those runs
//! and their attempt rows, appends their events, and appends a
//! `stale_write_refused` event for every end whose lease no longer holds.
//! Every value an end writes is computed in Rust from the end alone; only
//! what depends on the locked row (the attempt number, tenant and job, the
//! expired lease's deadline, the current status) is filled in by the
//! statement. A claim is one statement too (`FOR UPDATE SKIP LOCKED`).
//!
//! **Together.** On PostgreSQL a commit waits for its WAL flush (with the
//! default `synchronous_commit = on`), and on a small machine that flush,
//! not the SQL, is what a claim or a finish costs. The worker's driver loop
//! hands the ends of finished attempts and the claim that refills their
//! slots to `Store::finish_and_claim`, which sends them as ONE statement
//! (one round trip, one commit, one flush) whenever that is exact (see
//! [`finish_and_claim`]).
//!
//! Each end stays its own unit:
//! - a run that appears twice among the ends is handled by a second
//!   statement that runs after the first has committed (the later end then
//!   sees the state the earlier one left, as if sent separately);
//! - when the server refuses a statement (a value it cannot store, a
//!   deadlock), nothing of it was written: its claim is sent again alone and
//!   each end is applied again on its own, so that only the offending end
//!   fails.
//!
//! Within one statement the finish part and the claim part touch disjoint
//! runs: the claim only takes runs that its snapshot shows claimable, the
//! finish only changes runs its ends' leases hold (running ones). Events are
//! appended in one `INSERT`: the ends' events (by run id, then in the order
//! a single end writes them), then the claim's `attempt_started` events in
//! claim order.

use crate::{AttemptEnd, ClaimRequest, Result, Run, StoreError};
use docket_core::{ErrorClass, LeaseId, RunId, RunStatus};
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::Row;
use std::collections::HashMap;
use std::sync::LazyLock;
use uuid::Uuid;

use super::db;
use super::ops::{run_from_row, RUN_COLS};
use crate::plan::fair::Cursor;

/// Lease ids generated in Rust per claim (UUIDv7, like SQLite's); a claim of
/// more runs than this takes `gen_random_uuid()` for the rest.
const CLAIM_LEASE_IDS: usize = 4096;

/// Parameters of the finish part: `$1..$21`, `$26`, `$28` and `$29` one
/// element per end, `$22..$25` and `$27` one element per event an end
/// writes if its lease holds.
const FINISH_PARAMS: usize = 29;

/// `cur` of an attempt's own ends: every run of the batch, locked (waiting
/// for a lock another transaction holds), so that a stale end can be told
/// apart and recorded as `stale_write_refused`.
const FINISH_CUR: &str = "
cur AS (
    SELECT r.id, r.tenant, r.job, r.status, r.lease_id, r.attempt, r.lease_expires_at,
           r.parent_id, r.parent_waits
    FROM runs r WHERE r.id = ANY($1)
    ORDER BY r.id
    FOR UPDATE
)";

/// `cur` of a reap: only the runs still running under the end's lease with
/// that lease expired by the end's `now` (the fence, checked again on the
/// row's newest version once locked). A row another transaction holds is
/// skipped, not waited for: another reaper is reaping it, or its worker is
/// heartbeating or ending it; either way the next round decides. A skipped
/// or fenced-off run is absent from `cur`, so the end writes nothing at all
/// (no `stale_write_refused`: a reaper is not the attempt's writer).
const REAP_CUR: &str = "
cur AS (
    SELECT r.id, r.tenant, r.job, r.status, r.lease_id, r.attempt, r.lease_expires_at,
           r.parent_id, r.parent_waits
    FROM runs r JOIN e ON e.run_id = r.id
    WHERE r.status = 'running' AND r.lease_id = e.lease_id AND r.lease_expires_at <= e.now
    ORDER BY r.id
    FOR UPDATE OF r SKIP LOCKED
)";

/// The finish part's CTEs (`e`, `cur`, `j`, `upd`, `att`, `fin_ev`) around
/// a given `cur`. `fin_ev` lists the events to append, numbered `k` in
/// append order.
fn finish_ctes(cur: &str) -> String {
    let rest = FINISH_REST.replace(
        "FAN_IN_SET",
        &crate::plan::child::fan_in_set("p.", "fan.n", "fan.now"),
    );
    format!("{FINISH_E},{cur},{rest}")
}

/// The ends, one row each (`idx`: 1-based position).
const FINISH_E: &str = "
e AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::text[], $5::jsonb[],
                         $6::int8[], $7::bool[], $8::text[], $9::text[], $10::text[],
                         $11::bool[], $12::int4[], $13::jsonb[], $14::text[], $15::text[],
                         $16::text[], $17::text[], $18::text[], $19::int8[], $20::int8[],
                         $21::text[], $28::text[], $29::text[])
        WITH ORDINALITY AS e(run_id, lease_id, now, to_status, output,
                             run_after, finished, terminal_reason, err_class, err_msg,
                             clear_cancel, forgive, input_request, att_outcome, fingerprint,
                             failure_key, action, retry_policy, delay_ms, eligible_at,
                             retry_reason, att_err_class, att_err_msg, idx)
)";

/// The finish part after `cur`.
const FINISH_REST: &str = "
j AS (
    SELECT e.*, cur.tenant, cur.job, cur.status AS cur_status, cur.lease_id AS cur_lease,
           cur.attempt AS cur_attempt, cur.lease_expires_at AS cur_expires,
           COALESCE(cur.status = 'running' AND cur.lease_id = e.lease_id, false) AS holds
    FROM e JOIN cur ON cur.id = e.run_id
),
fan AS (
    -- Child runs whose parent's join waits for them, ending final now
    -- (usually none): per parent, how many, and when (crate::children).
    SELECT cur.parent_id AS id, count(*)::int4 AS n, max(j.now) AS now
    FROM j JOIN cur ON cur.id = j.run_id
    WHERE j.holds AND j.finished AND cur.parent_waits AND cur.parent_id IS NOT NULL
    GROUP BY cur.parent_id
),
upd AS (
    UPDATE runs r SET
        status = j.to_status,
        output = COALESCE(j.output, r.output),
        -- A parent ending in this statement too gets its fan-in here (a row
        -- is updated once per statement): plan::child::fan_in_set applied
        -- to the status the end leaves it in. And plan::signal::
        -- postponement_wakes: a signal reached the wait this attempt
        -- recorded while it ran. Either way its postponement ends due now.
        run_after = CASE WHEN j.to_status = 'postponed'
                              AND (r.wake_requested
                                   OR (f.n IS NOT NULL AND r.join_waiting > 0
                                       AND r.join_waiting <= f.n))
                         THEN LEAST(COALESCE(j.run_after, r.run_after), j.now)
                         ELSE COALESCE(j.run_after, r.run_after) END,
        join_waiting = CASE WHEN f.n IS NULL THEN r.join_waiting
                            WHEN r.join_waiting > f.n THEN r.join_waiting - f.n ELSE 0 END,
        wake_requested = false,
        lease_id = NULL, lease_expires_at = NULL, worker = NULL,
        updated_at = j.now,
        finished_at = CASE WHEN j.finished THEN j.now ELSE r.finished_at END,
        terminal_reason = COALESCE(j.terminal_reason, r.terminal_reason),
        last_error_class = COALESCE(j.err_class, r.last_error_class),
        last_error_message = COALESCE(j.err_msg, r.last_error_message),
        cancel_requested = r.cancel_requested AND NOT j.clear_cancel,
        attempts_forgiven = r.attempts_forgiven + j.forgive,
        input_request = COALESCE(j.input_request, r.input_request)
    FROM j LEFT JOIN fan f ON f.id = j.run_id WHERE j.holds AND r.id = j.run_id
    RETURNING r.job, r.concurrency_key
),
fan_in AS (
    UPDATE runs p SET FAN_IN_SET
    FROM fan WHERE p.id = fan.id AND NOT EXISTS (SELECT 1 FROM j WHERE j.run_id = fan.id AND j.holds)
),
-- An end of a keyed run frees a slot of its key: wake every process's
-- workers (delivered at commit), as a trigger does. Nothing for unkeyed runs.
freed AS (
    SELECT pg_notify('docket_wakeup', x.job) FROM (
        SELECT DISTINCT job FROM upd WHERE concurrency_key IS NOT NULL
    ) x
),
att AS (
    UPDATE attempts a SET
        finished_at = j.now,
        outcome = j.att_outcome,
        error_class = COALESCE(j.att_err_class, a.error_class),
        error_message = COALESCE(j.att_err_msg, a.error_message),
        fingerprint = COALESCE(j.fingerprint, a.fingerprint),
        failure_key = COALESCE(j.failure_key, a.failure_key),
        action = COALESCE(j.action, a.action),
        retry_policy = COALESCE(j.retry_policy, a.retry_policy),
        delay_ms = COALESCE(j.delay_ms, a.delay_ms),
        eligible_at = COALESCE(j.eligible_at, a.eligible_at),
        retry_reason = COALESCE(j.retry_reason, a.retry_reason)
    FROM j WHERE j.holds AND a.run_id = j.run_id AND a.attempt = j.cur_attempt
),
fin_ev AS (
    SELECT run_id, tenant, job, kind, at, attempt, lease_id, data,
           row_number() OVER (ORDER BY run_id, seq) AS k
    FROM (
        SELECT j.run_id, j.tenant, j.job, v.kind, j.now AS at, j.cur_attempt AS attempt,
               j.lease_id,
               -- plan::end::Fill: what only the locked row knows.
               CASE v.fill
                   WHEN 'lease_expires_at' THEN jsonb_build_object('lease_expires_at', j.cur_expires)
                   WHEN 'next_attempt'
                       THEN v.data || jsonb_build_object('next_attempt', j.cur_attempt + 1)
                   ELSE v.data
               END AS data,
               v.seq
        FROM j JOIN unnest($22::int8[], $23::int4[], $24::text[], $25::jsonb[], $27::text[])
                    AS v(idx, seq, kind, data, fill) ON v.idx = j.idx
        WHERE j.holds
        UNION ALL
        SELECT j.run_id, j.tenant, j.job, 'stale_write_refused', j.now, NULL, j.lease_id,
               ($26::jsonb[])[j.idx::int]
                   || jsonb_build_object('current_status', j.cur_status,
                                         'current_lease_id', j.cur_lease,
                                         'current_attempt', j.cur_attempt),
               0
        FROM j WHERE NOT j.holds
    ) x
)";

/// The claim part's CTEs (`picked`, `numbered`, `claimed`, `claim_att`,
/// `claim_ev`), parameters `$1..$10` (renumbered when combined).
/// `claimed.n` is the claim order.
static CLAIM_CTES: LazyLock<String> = LazyLock::new(|| {
    claim_ctes(&format!(
        "
picked AS (
    SELECT id, priority, run_after FROM runs
    WHERE tenant = $10 AND status IN ({}) AND run_after <= $1 AND job = ANY($2)
        AND concurrency_key IS NULL
      AND NOT EXISTS (SELECT 1 FROM job_pauses p WHERE p.tenant = runs.tenant AND p.job IN (runs.job, '*'))
    ORDER BY priority DESC, run_after, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)",
        crate::plan::claim::CLAIMABLE_SQL
    ))
});

/// The keyed claim's `picked`: the runs `plan::concurrency::pick` chose
/// (`$11`), still claimable once locked (an operator may have moved one
/// since it was read). In the same statement (one round trip less), the
/// runs it found newly held back (`$12`) are marked, each with its
/// `run_held` event (`$13` kind, `$14` data), written before the claim's.
static KEYED_CLAIM_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {}, {}, {}
SELECT {RUN_COLS} FROM claimed ORDER BY n",
        claim_ctes(&format!(
            "
picked AS (
    SELECT id, priority, run_after FROM runs
    WHERE id = ANY($11) AND status IN ({})
    ORDER BY id
    FOR UPDATE
)",
            crate::plan::claim::CLAIMABLE_SQL
        )),
        "held AS (
    UPDATE runs r SET held_at = $1 FROM unnest($12::uuid[]) AS i(id)
    WHERE r.id = i.id RETURNING r.id, r.tenant, r.job
),
held_ev AS (
    SELECT h.id AS run_id, h.tenant, h.job, d.kind, $1::int8 AS at, NULL::int4 AS attempt,
           NULL::uuid AS lease_id, d.data, d.o AS k
    FROM held h JOIN unnest($12::uuid[], $13::text[], $14::jsonb[]) WITH ORDINALITY
        AS d(id, kind, data, o) ON d.id = h.id
)",
        events_insert(&["held_ev", "claim_ev"])
    )
});

/// The claim CTEs after a given `picked`.
fn claim_ctes(picked: &str) -> String {
    format!(
        "{picked},
numbered AS (
    SELECT id, row_number() OVER (ORDER BY priority DESC, run_after, id) AS n FROM picked
),
claimed AS (
    UPDATE runs r SET status = $8, attempt = r.attempt + 1,
        lease_id = COALESCE(($4::uuid[])[p.n::int], gen_random_uuid()),
        lease_expires_at = $5, worker = $6, updated_at = $1, held_at = NULL
    FROM numbered p WHERE r.id = p.id
    RETURNING r.*, p.n
),
claim_att AS (
    INSERT INTO attempts (run_id, attempt, lease_id, worker, started_at, outcome)
    SELECT id, attempt, lease_id, $6, $1, 'running' FROM claimed
),
claim_ev AS (
    SELECT id AS run_id, tenant, job, $9::text AS kind, $1::int8 AS at, attempt,
           lease_id, $7::jsonb AS data, n AS k
    FROM claimed
)"
    )
}

/// Appends the events of `parts` (CTE names, in order) in one `INSERT`.
fn events_insert(parts: &[&str]) -> String {
    let union: Vec<String> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!("SELECT {i} AS part, k, run_id, tenant, job, kind, at, attempt, lease_id, data FROM {p}")
        })
        .collect();
    format!(
        "ev AS (
    INSERT INTO events (run_id, tenant, job, kind, at, attempt, lease_id, data)
    SELECT run_id, tenant, job, kind, at, attempt, lease_id, data
    FROM ({}) x ORDER BY part, k
)",
        union.join(" UNION ALL ")
    )
}

/// Shifts every `$n` in `sql` by `by`.
fn renumber(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '$' {
            let mut n = String::new();
            while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                n.push(*d);
                chars.next();
            }
            match n.parse::<usize>() {
                Ok(n) => out.push_str(&(n + by).to_string()),
                Err(_) => out.push_str(&n),
            }
        }
    }
    out
}

/// The finish-only statement: one row per end (`k`, its position, the locked run's
/// status, whether the end's lease held it).
static FINISH_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {}, {}
SELECT e.idx AS k, j.cur_status, j.holds FROM e LEFT JOIN j ON j.idx = e.idx
WHERE (SELECT count(*) FROM freed) >= 0",
        finish_ctes(FINISH_CUR),
        events_insert(&["fin_ev"])
    )
});

/// The reap statement: [`FINISH_SQL`] with [`REAP_CUR`]; `holds` is true
/// for each end it applied, NULL for each end that changed nothing.
static REAP_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {}, {}
SELECT e.idx AS k, j.holds FROM e LEFT JOIN j ON j.idx = e.idx
WHERE (SELECT count(*) FROM freed) >= 0",
        finish_ctes(REAP_CUR),
        events_insert(&["fin_ev"])
    )
});

/// The claim-only statement: the claimed runs in claim order.
static CLAIM_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {}, {}
SELECT {RUN_COLS} FROM claimed ORDER BY n",
        *CLAIM_CTES,
        events_insert(&["claim_ev"])
    )
});

/// Both: a row per end (`part` 0, as in [`FINISH_SQL`]), then the claimed
/// runs (`part` 1, in claim order). The finish branch comes first so that
/// the ends' rows are locked (`cur`, which may wait) before the claim locks
/// any (`picked`, which never waits).
static BOTH_SQL: LazyLock<String> = LazyLock::new(|| {
    let nulls: Vec<String> = RUN_COLS
        .split(',')
        .map(|c| format!("NULL AS {}", c.trim()))
        .collect();
    format!(
        "WITH {}, {}, {}
SELECT 0 AS part, e.idx AS k, j.cur_status, j.holds, {} FROM e LEFT JOIN j ON j.idx = e.idx
WHERE (SELECT count(*) FROM freed) >= 0
UNION ALL
SELECT 1, n, NULL, NULL, {RUN_COLS} FROM claimed
ORDER BY part, k",
        finish_ctes(FINISH_CUR),
        renumber(&CLAIM_CTES, FINISH_PARAMS),
        events_insert(&["fin_ev", "claim_ev"]),
        nulls.join(", ")
    )
});

/// The ends of one statement, flattened into its columns.
#[derive(Default)]
struct Cols {
    run_id: Vec<Uuid>,
    lease_id: Vec<Uuid>,
    now: Vec<i64>,
    to_status: Vec<&'static str>,
    output: Vec<Option<Value>>,
    run_after: Vec<Option<i64>>,
    finished: Vec<bool>,
    terminal_reason: Vec<Option<&'static str>>,
    err_class: Vec<Option<&'static str>>,
    att_err_class: Vec<Option<&'static str>>,
    att_err_msg: Vec<Option<String>>,
    err_msg: Vec<Option<String>>,
    clear_cancel: Vec<bool>,
    forgive: Vec<i32>,
    input_request: Vec<Option<Value>>,
    att_outcome: Vec<&'static str>,
    fingerprint: Vec<Option<String>>,
    failure_key: Vec<Option<String>>,
    action: Vec<Option<String>>,
    retry_policy: Vec<Option<String>>,
    delay_ms: Vec<Option<i64>>,
    eligible_at: Vec<Option<i64>>,
    retry_reason: Vec<Option<String>>,
    /// What a `stale_write_refused` event records of the end
    /// (`AttemptEnd::refused_data`, as on SQLite).
    attempted: Vec<Value>,
    ev_idx: Vec<i64>,
    ev_seq: Vec<i32>,
    ev_kind: Vec<String>,
    ev_data: Vec<Value>,
    ev_fill: Vec<&'static str>,
}

impl Cols {
    /// Adds an end: its plan's columns, and what a refusal would record.
    fn push(&mut self, end: &AttemptEnd) {
        let idx = self.run_id.len() as i64 + 1;
        let p = crate::plan::end::end(end);
        let (r, a) = (p.run, p.attempt);
        self.run_id.push(end.run_id.0);
        self.lease_id.push(end.lease_id.0);
        self.now.push(end.now.0);
        self.to_status.push(r.status.as_str());
        self.output.push(r.output);
        self.run_after.push(r.run_after.map(|t| t.0));
        self.finished.push(r.finished);
        self.terminal_reason.push(r.terminal_reason);
        self.err_class.push(r.error_class.map(ErrorClass::as_str));
        self.err_msg.push(r.error_message);
        self.clear_cancel.push(r.clear_cancel);
        self.forgive
            .push(i32::try_from(r.forgive).unwrap_or(i32::MAX));
        self.input_request.push(r.input_request);
        self.att_outcome.push(a.outcome.as_str());
        self.att_err_class
            .push(a.error_class.map(ErrorClass::as_str));
        self.att_err_msg.push(a.error_message);
        self.fingerprint.push(a.fingerprint);
        self.failure_key.push(a.failure_key);
        self.action.push(a.action);
        self.retry_policy.push(a.retry_policy);
        self.delay_ms.push(a.delay_ms);
        self.eligible_at.push(a.eligible_at.map(|t| t.0));
        self.retry_reason
            .push(a.retry_reason.map(|r| r.as_str().to_string()));
        self.attempted.push(crate::plan::end::refused_attempt(end));
        for (seq, e) in p.events.into_iter().enumerate() {
            self.ev_idx.push(idx);
            self.ev_seq.push(seq as i32 + 1);
            self.ev_kind.push(e.kind.as_str().to_string());
            self.ev_data.push(e.data);
            self.ev_fill.push(e.fill.as_str());
        }
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

impl Cols {
    fn of(ends: &[&AttemptEnd]) -> Cols {
        let mut c = Cols::default();
        for end in ends {
            c.push(end);
        }
        c
    }

    fn bind<'q>(&'q self, q: Query<'q>) -> Query<'q> {
        q.bind(&self.run_id)
            .bind(&self.lease_id)
            .bind(&self.now)
            .bind(&self.to_status)
            .bind(&self.output)
            .bind(&self.run_after)
            .bind(&self.finished)
            .bind(&self.terminal_reason)
            .bind(&self.err_class)
            .bind(&self.err_msg)
            .bind(&self.clear_cancel)
            .bind(&self.forgive)
            .bind(&self.input_request)
            .bind(&self.att_outcome)
            .bind(&self.fingerprint)
            .bind(&self.failure_key)
            .bind(&self.action)
            .bind(&self.retry_policy)
            .bind(&self.delay_ms)
            .bind(&self.eligible_at)
            .bind(&self.retry_reason)
            .bind(&self.ev_idx)
            .bind(&self.ev_seq)
            .bind(&self.ev_kind)
            .bind(&self.ev_data)
            .bind(&self.attempted)
            .bind(&self.ev_fill)
            .bind(&self.att_err_class)
            .bind(&self.att_err_msg)
    }
}

/// A claim's parameters.
struct ClaimArgs {
    now: i64,
    jobs: Vec<String>,
    limit: i64,
    leases: Vec<Uuid>,
    expires: i64,
    worker: String,
    data: Value,
    status: &'static str,
    kind: String,
    tenant: Option<String>,
}

impl ClaimArgs {
    fn of(req: &ClaimRequest) -> ClaimArgs {
        let p = crate::plan::claim::claim(req);
        ClaimArgs {
            now: req.now.0,
            jobs: req.jobs.clone(),
            limit: i64::try_from(req.limit).unwrap_or(i64::MAX),
            leases: (0..req.limit.min(CLAIM_LEASE_IDS))
                .map(|_| LeaseId::new().0)
                .collect(),
            expires: p.lease_expires_at.0,
            worker: req.worker.clone(),
            data: p.event.data,
            status: p.status.as_str(),
            kind: p.event.kind.as_str().to_string(),
            tenant: req.tenant.clone(),
        }
    }

    fn bind<'q>(&'q self, q: Query<'q>) -> Query<'q> {
        q.bind(self.now)
            .bind(&self.jobs)
            .bind(self.limit)
            .bind(&self.leases)
            .bind(self.expires)
            .bind(&self.worker)
            .bind(&self.data)
            .bind(self.status)
            .bind(&self.kind)
            .bind(&self.tenant)
    }
}

/// Reads one finish answer row into `out[idx - 1]`.
fn finish_answer(
    row: &PgRow,
    ends: &[&AttemptEnd],
    out: &mut [Option<Result<RunStatus>>],
) -> Result<(), sqlx::Error> {
    let idx: i64 = row.try_get("k")?;
    let status: Option<String> = row.try_get("cur_status")?;
    let holds: Option<bool> = row.try_get("holds")?;
    let i = usize::try_from(idx - 1).map_err(|_| sqlx::Error::RowNotFound)?;
    let end = ends.get(i).ok_or(sqlx::Error::RowNotFound)?;
    out[i] = Some(match (status, holds) {
        (Some(_), Some(true)) => Ok(crate::plan::end::status_after(&end.outcome)),
        (Some(s), _) => match s.parse::<RunStatus>() {
            Ok(status) => Err(StoreError::StaleLease {
                run_id: end.run_id,
                lease_id: end.lease_id,
                status,
            }),
            Err(e) => Err(StoreError::Corrupt(format!("bad status `{s}`: {e}"))),
        },
        (None, _) => Err(StoreError::NotFound(end.run_id)),
    });
    Ok(())
}

fn finish_answers(
    ends: &[&AttemptEnd],
    out: Vec<Option<Result<RunStatus>>>,
) -> Vec<Result<RunStatus>> {
    out.into_iter()
        .zip(ends)
        .map(|(r, end)| {
            r.unwrap_or_else(|| {
                Err(StoreError::Database(format!(
                    "no answer for the end of run {}",
                    end.run_id
                )))
            })
        })
        .collect()
}

/// Applies `ends` (no run twice) with one statement; answers in their order.
async fn finish_only(
    c: &mut PgConnection,
    ends: &[&AttemptEnd],
) -> Result<Vec<Result<RunStatus>>, sqlx::Error> {
    let cols = Cols::of(ends);
    let rows = cols
        .bind(sqlx::query(&FINISH_SQL))
        .fetch_all(&mut *c)
        .await?;
    let mut out: Vec<Option<Result<RunStatus>>> = ends.iter().map(|_| None).collect();
    for row in &rows {
        finish_answer(row, ends, &mut out)?;
    }
    Ok(finish_answers(ends, out))
}

/// One claim: keyed runs first (bounded by their keys), then unkeyed runs
/// with the rest of the limit, shared among tenants (`plan::fair`).
pub(super) async fn claim(
    c: &mut PgConnection,
    req: &ClaimRequest,
    cursor: &Cursor,
    turn: &KeyedTurn,
) -> Result<Vec<Run>> {
    if req.jobs.is_empty() || req.limit == 0 {
        return Ok(Vec::new());
    }
    let found = claimable(&mut *c, req, cursor).await?;
    // Keyed and unkeyed parts, every tenant asked: one transaction, one
    // commit (a flush), all or nothing.
    claim_committed(
        &mut *c,
        std::slice::from_ref(req),
        req.limit,
        &found,
        cursor,
        turn,
    )
    .await
}

/// The unkeyed part of a claim: `limit` slots dealt among `tenants` by
/// `plan::fair::Dealer`, one claim statement per ask; moves the cursor (a
/// claim scoped to one tenant leaves it).
async fn fair_claim(
    c: &mut PgConnection,
    req: &ClaimRequest,
    limit: usize,
    tenants: &[String],
    cursor: &Cursor,
) -> Result<Vec<Run>> {
    let mut dealer = crate::plan::fair::Dealer::new(tenants, limit);
    let mut runs = Vec::with_capacity(limit);
    while let Some((tenant, n)) = dealer.ask() {
        let part = claim_plain(&mut *c, &for_tenant(req, &tenant, n)).await?;
        dealer.got(part.len());
        runs.extend(part);
    }
    if req.tenant.is_none() {
        cursor.advance(&dealer);
    }
    Ok(runs)
}

/// `req` narrowed to one tenant and `limit` runs.
fn for_tenant(req: &ClaimRequest, tenant: &str, limit: usize) -> ClaimRequest {
    ClaimRequest {
        tenant: Some(tenant.to_string()),
        limit,
        ..req.clone()
    }
}

/// What a claim may find: the keys with claimable runs, and the tenants
/// with claimable unkeyed runs it visits.
#[derive(Default)]
struct Claimable {
    keys: Vec<String>,
    tenants: Vec<String>,
}

impl Claimable {
    /// The tenants a claim asks: its own, or those found.
    fn tenants_of(&self, req: &ClaimRequest) -> Vec<String> {
        match &req.tenant {
            Some(t) => vec![t.clone()],
            None => self.tenants.clone(),
        }
    }
}

/// One round trip: the keys with claimable runs (a skip scan of
/// `runs_keyed_claim`, one index probe per key however many runs each
/// holds back) and the tenants with claimable unkeyed runs after the
/// cursor, then from the start (skip scans of `runs_claim`, at most
/// `plan::fair::MAX_TENANTS_PER_CLAIM` probes each). A claim scoped to one tenant
/// visits only that one.
async fn claimable(c: &mut PgConnection, req: &ClaimRequest, cursor: &Cursor) -> Result<Claimable> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        // `ORDER BY tenant LIMIT 1`, not `min(tenant)`: the planner read
        // `min` off another partial index with the same predicate
        // (`runs_due`, ordered by due time) and scanned all of it, every
        // round (measured: one full scan per round, ~15 % of a small-round
        // drain); the order asks for `runs_claim`'s first entry.
        let tenant_min = |bound: &str| {
            format!(
                "SELECT tenant FROM runs
                 WHERE status IN ({}) AND concurrency_key IS NULL{bound}
                 ORDER BY tenant LIMIT 1",
                crate::plan::claim::CLAIMABLE_SQL
            )
        };
        format!(
            "WITH RECURSIVE {keys},
             a(tenant, n) AS (
                SELECT ({a0}), 1 WHERE $1::text IS NOT NULL AND $3
                UNION ALL
                SELECT ({next_a}), n + 1 FROM a WHERE a.tenant IS NOT NULL AND n < $2
             ),
             w(tenant, n) AS (
                SELECT ({w0}), 1
                WHERE $3 AND (SELECT count(tenant) FROM a) < $2
                UNION ALL
                SELECT ({next_w}), n + 1 FROM w
                WHERE w.tenant IS NOT NULL AND n < $2 - (SELECT count(tenant) FROM a)
             )
             SELECT 0 AS part, key AS v, 0 AS n FROM k WHERE key IS NOT NULL
             UNION ALL SELECT 1, tenant, n FROM a WHERE tenant IS NOT NULL
             UNION ALL SELECT 2, tenant, n FROM w WHERE tenant IS NOT NULL
             ORDER BY part, n",
            keys = crate::plan::concurrency::claimable_keys_cte(),
            a0 = tenant_min(" AND tenant > $1"),
            next_a = tenant_min(" AND tenant > a.tenant"),
            w0 = tenant_min(""),
            next_w = tenant_min(" AND tenant > w.tenant"),
        )
    });
    let count = crate::plan::fair::MAX_TENANTS_PER_CLAIM;
    let scan = req.tenant.is_none();
    let rows = sqlx::query(&SQL)
        .bind(cursor.get())
        .bind(i64::try_from(count).unwrap_or(i64::MAX))
        .bind(scan)
        .fetch_all(&mut *c)
        .await
        .map_err(db)?;
    let mut found = Claimable::default();
    let (mut after, mut wrapped) = (Vec::new(), Vec::new());
    for row in &rows {
        let part: i32 = row.try_get("part").map_err(db)?;
        let v: String = row.try_get("v").map_err(db)?;
        match part {
            0 => found.keys.push(v),
            1 => after.push(v),
            _ => wrapped.push(v),
        }
    }
    found.tenants = match &req.tenant {
        Some(t) => vec![t.clone()],
        None => crate::plan::fair::visit(after, wrapped),
    };
    Ok(found)
}

/// Claims keyed runs of `keys` for `req`, inside the caller's transaction
/// (the locks are the transaction's): each key is locked first (a
/// transaction-level advisory lock; a key another claimer holds is
/// skipped, like `SKIP LOCKED`), then its running runs are counted
/// and its first due runs read in a new snapshot, so two claimers can never
/// both take a key's last slot. `plan::concurrency::pick` decides; newly
/// held runs are marked with their `run_held` event.
async fn keyed_claim(
    c: &mut PgConnection,
    req: &ClaimRequest,
    keys: Vec<String>,
) -> Result<Vec<Run>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    static STATES: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT k.key,
                    (SELECT count(*) FROM runs x
                     WHERE x.status = 'running' AND x.concurrency_key = k.key) AS running,
                    c.id, c.priority, c.run_after, c.concurrency_limit, c.held
             FROM unnest($1::text[]) AS k(key)
             LEFT JOIN LATERAL (
                SELECT id, priority, run_after, concurrency_limit, held_at IS NOT NULL AS held
                FROM runs
                WHERE concurrency_key = k.key AND status IN ({}) AND run_after <= $2
                  AND job = ANY($3) AND ($5::text IS NULL OR tenant = $5) AND {}
                ORDER BY priority DESC, run_after, id
                LIMIT $4
             ) c ON true
             ORDER BY k.key, c.priority DESC, c.run_after, c.id",
            crate::plan::claim::CLAIMABLE_SQL,
            crate::retention::NOT_PAUSED
        )
    });
    // Only the keys with a claimable run this claimer may take are locked
    // (the fenced subquery filters first): a claimer of other jobs or
    // another tenant must not hold a key's lock, or it would make the
    // claimers that can use the key skip it.
    static LOCK: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT k FROM (
                SELECT k FROM unnest($1::text[]) AS k
                WHERE EXISTS (SELECT 1 FROM runs
                              WHERE concurrency_key = k AND status IN ({})
                                AND job = ANY($2) AND ($3::text IS NULL OR tenant = $3))
                OFFSET 0
             ) mine
             WHERE pg_try_advisory_xact_lock(hashtextextended('docket.concurrency_key/' || current_schema() || '/' || k, 0))",
            crate::plan::claim::CLAIMABLE_SQL
        )
    });
    let locked: Vec<String> = sqlx::query_scalar(&LOCK)
        .bind(&keys)
        .bind(&req.jobs)
        .bind(&req.tenant)
        .fetch_all(&mut *c)
        .await
        .map_err(db)?;
    if locked.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(&STATES)
        .bind(&locked)
        .bind(req.now.0)
        .bind(&req.jobs)
        .bind(i64::try_from(req.limit).unwrap_or(i64::MAX))
        .bind(&req.tenant)
        .fetch_all(&mut *c)
        .await
        .map_err(db)?;
    let mut states: Vec<crate::plan::concurrency::KeyState> = Vec::new();
    for row in &rows {
        let key: String = row.try_get("key").map_err(db)?;
        let running: i64 = row.try_get("running").map_err(db)?;
        if states.last().is_none_or(|s| s.key != key) {
            states.push(crate::plan::concurrency::KeyState {
                key,
                running: u32::try_from(running).unwrap_or(u32::MAX),
                candidates: Vec::new(),
            });
        }
        let Some(id) = row.try_get::<Option<Uuid>, _>("id").map_err(db)? else {
            continue;
        };
        let limit: Option<i64> = row.try_get("concurrency_limit").map_err(db)?;
        if let Some(s) = states.last_mut() {
            s.candidates.push(crate::plan::concurrency::Candidate {
                id: RunId(id),
                priority: row.try_get("priority").map_err(db)?,
                run_after: docket_core::Timestamp(row.try_get("run_after").map_err(db)?),
                limit: limit.and_then(|l| u32::try_from(l).ok()).unwrap_or(1),
                held: row.try_get("held").map_err(db)?,
            });
        }
    }
    let p = crate::plan::concurrency::pick(&states, req.limit);
    if p.held.is_empty() && p.claim.is_empty() {
        return Ok(Vec::new());
    }
    let held: Vec<Uuid> = p.held.iter().map(|h| h.0 .0).collect();
    let kinds: Vec<&str> = p.held.iter().map(|h| h.1.kind.as_str()).collect();
    let data: Vec<Value> = p.held.iter().map(|h| h.1.data.clone()).collect();
    let ids: Vec<Uuid> = p.claim.iter().map(|id| id.0).collect();
    let a = ClaimArgs::of(req);
    let rows = a
        .bind(sqlx::query(&KEYED_CLAIM_SQL))
        .bind(&ids)
        .bind(&held)
        .bind(&kinds)
        .bind(&data)
        .fetch_all(&mut *c)
        .await
        .map_err(db)?;
    let runs = rows.iter().map(run_from_row).collect::<Result<_>>()?;
    Ok(runs)
}

/// One claim of unkeyed runs, alone.
async fn claim_plain(c: &mut PgConnection, req: &ClaimRequest) -> Result<Vec<Run>> {
    if req.jobs.is_empty() || req.limit == 0 {
        return Ok(Vec::new());
    }
    let a = ClaimArgs::of(req);
    let rows = a
        .bind(sqlx::query(&CLAIM_SQL))
        .fetch_all(&mut *c)
        .await
        .map_err(db)?;
    rows.iter().map(run_from_row).collect()
}

/// Ends (no run twice) and a claim in one statement.
async fn both(
    c: &mut PgConnection,
    ends: &[&AttemptEnd],
    req: &ClaimRequest,
) -> Result<(Vec<Result<RunStatus>>, Vec<Run>), sqlx::Error> {
    let cols = Cols::of(ends);
    let a = ClaimArgs::of(req);
    let rows = a
        .bind(cols.bind(sqlx::query(&BOTH_SQL)))
        .fetch_all(&mut *c)
        .await?;
    let mut out: Vec<Option<Result<RunStatus>>> = ends.iter().map(|_| None).collect();
    let mut runs = Vec::new();
    for row in &rows {
        let part: i32 = row.try_get("part")?;
        if part == 0 {
            finish_answer(row, ends, &mut out)?;
        } else {
            runs.push(run_from_row(row).map_err(|e| sqlx::Error::Decode(Box::new(e)))?);
        }
    }
    Ok((finish_answers(ends, out), runs))
}

/// Applies ends one by one (after the server refused them together), so
/// that only an offending end fails. A connection error stops everything.
async fn finish_each(c: &mut PgConnection, ends: &[&AttemptEnd]) -> Result<Vec<Result<RunStatus>>> {
    let mut out = Vec::with_capacity(ends.len());
    for end in ends {
        out.push(match finish_only(&mut *c, &[end]).await {
            Ok(mut r) => r.remove(0),
            Err(e @ sqlx::Error::Database(_)) => Err(db(e)),
            Err(e) => return Err(db(e)),
        });
    }
    Ok(out)
}

/// Applies a round of ends (no run twice), with a claim if given.
async fn round(
    c: &mut PgConnection,
    ends: &[&AttemptEnd],
    req: Option<&ClaimRequest>,
) -> (Result<Vec<Result<RunStatus>>>, Option<Result<Vec<Run>>>) {
    let req = req.filter(|r| !r.jobs.is_empty() && r.limit > 0);
    match (ends.is_empty(), req) {
        (true, None) => (Ok(Vec::new()), None),
        (true, Some(req)) => (Ok(Vec::new()), Some(claim_plain(&mut *c, req).await)),
        (false, None) => match finish_only(&mut *c, ends).await {
            Ok(r) => (Ok(r), None),
            Err(sqlx::Error::Database(_)) => (finish_each(&mut *c, ends).await, None),
            Err(e) => (Err(db(e)), None),
        },
        (false, Some(req)) => match both(&mut *c, ends, req).await {
            Ok((r, runs)) => (Ok(r), Some(Ok(runs))),
            Err(sqlx::Error::Database(_)) => {
                let f = finish_each(&mut *c, ends).await;
                (f, Some(claim_plain(&mut *c, req).await))
            }
            Err(e) => {
                let msg = e.to_string();
                (
                    Err(StoreError::Database(msg.clone())),
                    Some(Err(StoreError::Database(msg))),
                )
            }
        },
    }
}

/// Splits ends into rounds: the k-th end of each run goes into round k, in
/// run id order (so every statement locks its rows in one order).
fn rounds(ends: &[AttemptEnd]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..ends.len()).collect();
    order.sort_by_key(|&i| ends[i].run_id);
    let mut seen: HashMap<RunId, usize> = HashMap::with_capacity(ends.len());
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for i in order {
        let k = seen.entry(ends[i].run_id).or_insert(0);
        if rounds.len() <= *k {
            rounds.push(Vec::new());
        }
        rounds[*k].push(i);
        *k += 1;
    }
    rounds
}

/// What [`apply`] answers: one result per end, in their order, and the
/// claim's result if a claim was given.
type Applied = (Vec<Result<RunStatus>>, Option<Result<Vec<Run>>>);

/// Applies `ends` and, with the last round of them, `claim`. Answers in
/// the order of `ends`. When the first statement cannot reach the server,
/// nothing was applied and the whole call fails; a later statement's
/// connection error fails only the ends not yet applied.
async fn apply(
    c: &mut PgConnection,
    ends: &[AttemptEnd],
    claim: Option<&ClaimRequest>,
) -> Result<Applied> {
    let mut out: Vec<Option<Result<RunStatus>>> = ends.iter().map(|_| None).collect();
    let mut claimed = None;
    let mut failed: Option<String> = None;
    let mut claim = claim;
    let mut rounds = rounds(ends);
    if rounds.is_empty() {
        rounds.push(Vec::new());
    }
    let last = rounds.len() - 1;
    for (n, r) in rounds.into_iter().enumerate() {
        if let Some(msg) = &failed {
            for i in r {
                out[i] = Some(Err(StoreError::Database(msg.clone())));
            }
            continue;
        }
        let batch: Vec<&AttemptEnd> = r.iter().map(|&i| &ends[i]).collect();
        // The claim goes with the last round: it comes after every end.
        let with = if n == last { claim.take() } else { None };
        let (res, got) = round(&mut *c, &batch, with).await;
        if got.is_some() {
            claimed = got;
        }
        match res {
            Ok(res) => {
                for (i, x) in r.iter().zip(res) {
                    out[*i] = Some(x);
                }
            }
            Err(e) if n == 0 => return Err(e),
            Err(e) => {
                let msg = e.to_string();
                for i in r {
                    out[i] = Some(Err(StoreError::Database(msg.clone())));
                }
                failed = Some(msg);
            }
        }
    }
    let out = out
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(StoreError::Database("end not applied".into()))))
        .collect();
    Ok((out, claimed))
}

/// Ends attempts; see the module documentation.
pub(super) async fn finish(
    c: &mut PgConnection,
    ends: Vec<AttemptEnd>,
) -> Result<Vec<Result<RunStatus>>> {
    apply(&mut *c, &ends, None).await.map(|(out, _)| out)
}

/// Applies `ends` (no run twice) as a reap, with one statement; answers in
/// their order.
async fn reap_only(
    c: &mut PgConnection,
    ends: &[&AttemptEnd],
) -> Result<Vec<Option<RunStatus>>, sqlx::Error> {
    let cols = Cols::of(ends);
    let rows = cols.bind(sqlx::query(&REAP_SQL)).fetch_all(&mut *c).await?;
    let mut out: Vec<Option<RunStatus>> = vec![None; ends.len()];
    for row in &rows {
        let idx: i64 = row.try_get("k")?;
        let holds: Option<bool> = row.try_get("holds")?;
        let i = usize::try_from(idx - 1).map_err(|_| sqlx::Error::RowNotFound)?;
        let end = ends.get(i).ok_or(sqlx::Error::RowNotFound)?;
        if holds == Some(true) {
            out[i] = Some(crate::plan::end::status_after(&end.outcome));
        }
    }
    Ok(out)
}

/// Reaps expired leases (see `Store::reap`): one statement per round of
/// ends (a run twice among them: its later end in a later statement, which
/// sees what the earlier one left). When the server refuses a statement,
/// nothing of it was written and each end is applied again alone, so only
/// the offending end fails, in its slot.
pub(super) async fn reap(
    c: &mut PgConnection,
    ends: Vec<AttemptEnd>,
) -> Result<Vec<Result<Option<RunStatus>>>> {
    let mut out: Vec<Option<Result<Option<RunStatus>>>> = ends.iter().map(|_| None).collect();
    for r in rounds(&ends) {
        let batch: Vec<&AttemptEnd> = r.iter().map(|&i| &ends[i]).collect();
        match reap_only(&mut *c, &batch).await {
            Ok(res) => {
                for (i, x) in r.iter().zip(res) {
                    out[*i] = Some(Ok(x));
                }
            }
            Err(sqlx::Error::Database(_)) => {
                for (i, end) in r.iter().zip(&batch) {
                    out[*i] = Some(match reap_only(&mut *c, &[end]).await {
                        Ok(mut x) => Ok(x.remove(0)),
                        Err(e @ sqlx::Error::Database(_)) => Err(db(e)),
                        Err(e) => return Err(db(e)),
                    });
                }
            }
            Err(e) => return Err(db(e)),
        }
    }
    Ok(out
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(StoreError::Database("end not applied".into()))))
        .collect())
}

/// Ends attempts, then claims for each request with one shared budget
/// (the largest `limit`): the semantics of [`Store::finish_and_claim`]
/// (`crate::Store`), as if `finish` were followed by one `claim` per request.
///
/// One commit (one WAL flush) either way:
/// - usually ONE statement: the ends and the first claim share a round
///   trip. That is exact only when no keyed runs wait, one tenant is
///   visited and none of the ends can make a run claimable at once (a
///   release, or a retry or postponement due by the claim's `now`): the
///   statement's snapshot would not see it, where a claim after the finish
///   would;
/// - otherwise ONE transaction: the finish statement, then the keyed claim
///   (its locks, a new snapshot that sees the ends) and the unkeyed claims
///   of every tenant asked.
///
/// Only when a run ends twice among `ends`, or the server refuses the
/// transaction (nothing of it was written), does the step-by-step path run:
/// the ends round by round (each refused one alone), then the claims.
pub(super) async fn finish_and_claim(
    c: &mut PgConnection,
    ends: Vec<AttemptEnd>,
    claims: Vec<ClaimRequest>,
    cursor: &Cursor,
    turn: &KeyedTurn,
) -> Result<(Vec<Result<RunStatus>>, Vec<Run>)> {
    let budget = claims.iter().map(|c| c.limit).max().unwrap_or(0);
    let found = match claims.first() {
        Some(req) if budget > 0 => claimable(&mut *c, req, cursor).await?,
        _ => Claimable::default(),
    };
    let claims: Vec<ClaimRequest> = claims.into_iter().filter(|r| !r.jobs.is_empty()).collect();
    let together = found.keys.is_empty()
        && claims.first().is_some_and(|req| {
            found.tenants_of(req).len() == 1 && !ends.iter().any(|e| e.frees_by(req.now))
        });
    if together {
        let first = &claims[0];
        let tenant = &found.tenants_of(first)[0];
        let limit = first.limit.min(budget);
        let (finished, claimed) =
            apply(&mut *c, &ends, Some(&for_tenant(first, tenant, limit))).await?;
        let mut runs = claimed.transpose()?.unwrap_or_default();
        if first.tenant.is_none() {
            cursor.served(tenant);
        }
        let rest = budget.saturating_sub(runs.len());
        runs.extend(claim_committed(&mut *c, &claims[1..], rest, &found, cursor, turn).await?);
        return Ok((finished, runs));
    }
    if rounds(&ends).len() <= 1 {
        if let Some(done) =
            in_one_transaction(&mut *c, &ends, &claims, budget, &found, cursor, turn).await?
        {
            return Ok(done);
        }
    }
    let (finished, _) = apply(&mut *c, &ends, None).await?;
    let runs = claim_committed(&mut *c, &claims, budget, &found, cursor, turn).await?;
    Ok((finished, runs))
}

/// The turn of this process's keyed claims: taken before the key locks,
/// kept until the transaction ends.
///
/// Why: the driver keeps two rounds in flight on PostgreSQL. Each key is
/// locked with a *try* lock (a key another claimer holds is skipped, so
/// processes claim disjoint keys at once); a second round of this process
/// would find every key its first round holds locked and come back short.
/// Waiting here instead, the second round writes its ends while the first
/// commits, then takes the keys once they are free. Other processes keep
/// the try lock's skip.
#[derive(Default)]
pub(super) struct KeyedTurn(tokio::sync::Mutex<()>);

impl KeyedTurn {
    /// The turn, if the claim has keys to lock.
    async fn take(&self, found: &Claimable) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if found.keys.is_empty() {
            None
        } else {
            Some(self.0.lock().await)
        }
    }
}

/// [`claim_each`] in a transaction of its own (the keyed claim's locks
/// need one), committed.
async fn claim_committed(
    c: &mut PgConnection,
    claims: &[ClaimRequest],
    budget: usize,
    found: &Claimable,
    cursor: &Cursor,
    turn: &KeyedTurn,
) -> Result<Vec<Run>> {
    use sqlx::Connection as _;
    if budget == 0 || claims.is_empty() {
        return Ok(Vec::new());
    }
    let _turn = turn.take(found).await;
    let mut tx = c.begin().await.map_err(db)?;
    let runs = claim_each(&mut tx, claims, budget, found, cursor).await?;
    tx.commit().await.map_err(db)?;
    Ok(runs)
}

/// `ends` (no run twice) and `claims` in one transaction. `Ok(None)`: the
/// server refused a statement and nothing was written (the caller goes
/// step by step); `Err`: the connection failed (before the commit nothing
/// was written; at the commit the fate is unknown, as for any lost answer:
/// a claimed run's lease then expires and is reaped).
async fn in_one_transaction(
    c: &mut PgConnection,
    ends: &[AttemptEnd],
    claims: &[ClaimRequest],
    budget: usize,
    found: &Claimable,
    cursor: &Cursor,
    turn: &KeyedTurn,
) -> Result<Option<(Vec<Result<RunStatus>>, Vec<Run>)>> {
    use sqlx::Connection as _;
    let mut tx = c.begin().await.map_err(db)?;
    let refs: Vec<&AttemptEnd> = ends.iter().collect();
    let finished = if refs.is_empty() {
        Vec::new()
    } else {
        match finish_only(&mut tx, &refs).await {
            Ok(r) => r,
            Err(sqlx::Error::Database(_)) => {
                tx.rollback().await.map_err(db)?;
                return Ok(None);
            }
            Err(e) => return Err(db(e)),
        }
    };
    // The ends are written (their rows locked); the keyed part waits for
    // this process's other round to commit, not the ends.
    let _turn = turn.take(found).await;
    let runs = match claim_each(&mut tx, claims, budget, found, cursor).await {
        Ok(runs) => runs,
        Err(StoreError::Db { kind, .. }) if kind != crate::DbErrorKind::Connection => {
            // Refused by the server (a deadlock, 40P01, on a held run an
            // operator has locked, say): nothing of this transaction
            // stays, and the ends must not fail for the claim's sake.
            tx.rollback().await.map_err(db)?;
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    tx.commit().await.map_err(db)?;
    Ok(Some((finished, runs)))
}

/// Claims for each request in turn from one budget, with what
/// [`claimable`] found, inside the caller's transaction.
async fn claim_each(
    c: &mut PgConnection,
    claims: &[ClaimRequest],
    budget: usize,
    found: &Claimable,
    cursor: &Cursor,
) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for req in claims {
        let limit = req.limit.min(budget.saturating_sub(runs.len()));
        if limit == 0 {
            continue;
        }
        let req = ClaimRequest {
            limit,
            ..req.clone()
        };
        let tenants = found.tenants_of(&req);
        runs.extend(claim_found(&mut *c, &req, &found.keys, &tenants, cursor).await?);
    }
    Ok(runs)
}

/// A claim with what [`claimable`] found: keyed runs, then unkeyed ones,
/// inside the caller's transaction (the keyed claim's locks are its).
async fn claim_found(
    c: &mut PgConnection,
    req: &ClaimRequest,
    keys: &[String],
    tenants: &[String],
    cursor: &Cursor,
) -> Result<Vec<Run>> {
    if req.limit == 0 || req.jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut runs = keyed_claim(&mut *c, req, keys.to_vec()).await?;
    let rest = req.limit.saturating_sub(runs.len());
    runs.extend(fair_claim(&mut *c, req, rest, tenants, cursor).await?);
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorInfo, Outcome, RetryRecord};
    use docket_core::Timestamp;

    fn end(run: RunId, now: i64, outcome: Outcome) -> AttemptEnd {
        AttemptEnd {
            run_id: run,
            lease_id: LeaseId::new(),
            now: Timestamp(now),
            outcome,
        }
    }

    #[test]
    fn renumber_shifts_every_placeholder_and_nothing_else() {
        assert_eq!(
            renumber("SELECT $1, $2::text, $10 FROM t WHERE a = $1", 3),
            "SELECT $4, $5::text, $13 FROM t WHERE a = $4"
        );
        assert_eq!(renumber("no placeholders", 7), "no placeholders");
        // A `$` not followed by digits is kept as it is.
        assert_eq!(renumber("a $ b $x", 2), "a $ b $x");
        assert_eq!(renumber("$9$1", 1), "$10$2");
    }

    #[test]
    fn rounds_put_the_kth_end_of_each_run_in_round_k_in_run_id_order() {
        let (a, b) = (RunId::new(), RunId::new());
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        let ends = vec![
            end(hi, 1, Outcome::Cancelled),
            end(lo, 1, Outcome::Cancelled),
            end(hi, 2, Outcome::Cancelled),
            end(hi, 3, Outcome::Cancelled),
        ];
        // Round 0: each run's first end, lowest run id first (one lock
        // order for every statement); later ends of a run in later rounds.
        assert_eq!(rounds(&ends), vec![vec![1, 0], vec![2], vec![3]]);
        assert!(rounds(&[]).is_empty());
    }

    fn frees_by(end: &AttemptEnd, now: i64) -> bool {
        end.frees_by(Timestamp(now))
    }

    #[test]
    fn frees_by_only_ends_that_leave_the_run_claimable_by_then() {
        let r = RunId::new();
        let retry = |at: i64| Outcome::Retry {
            error: ErrorInfo {
                class: ErrorClass::Timeout,
                message: "m".into(),
                fingerprint: "f".into(),
                failure_key: "k".into(),
                action: None,
            },
            retry: RetryRecord {
                policy: "p".into(),
                delay_ms: 0,
                eligible_at: Timestamp(at),
                reason: docket_core::policy::RetryReason::Backoff,
            },
        };
        assert!(frees_by(&end(r, 5, Outcome::Released), 5));
        assert!(!frees_by(&end(r, 6, Outcome::Released), 5));
        assert!(frees_by(&end(r, 1, retry(5)), 5));
        assert!(!frees_by(&end(r, 1, retry(6)), 5));
        assert!(frees_by(
            &end(
                r,
                1,
                Outcome::Postponed {
                    until: Timestamp(4)
                }
            ),
            5
        ));
        assert!(!frees_by(
            &end(
                r,
                1,
                Outcome::Postponed {
                    until: Timestamp(9)
                }
            ),
            5
        ));
        assert!(!frees_by(&end(r, 1, Outcome::Cancelled), 5));
    }
}
