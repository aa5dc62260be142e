//! [`LimitStore`] on PostgreSQL: a take locks the bucket's row (an upsert
//! that changes nothing, so a bucket never used is created full and locked
//! in the same statement), reads the holder's reservation with it, and
//! writes the plan's answer in a second statement, in one transaction.
//! Takers in other processes wait on the row lock, so none sees a token
//! another has taken.

use super::{db, PgStore};
use crate::limits::{
    BreakerChange, BreakerChanged, BreakerRow, LimitStore, RateBucketRow, RateTake, RateTakeRequest,
};
use crate::plan::rate as plan;
use crate::Result;
use async_trait::async_trait;
use docket_core::rate::{Bucket, RateLimit};
use docket_core::Timestamp;
use sqlx::Row;

/// Locks (creating it full if new) the bucket and reads it with the
/// holder's reservation. `DO UPDATE` (not `DO NOTHING`) so the row is
/// locked and returned in both cases.
const LOCK_SQL: &str = "INSERT INTO rate_buckets (key, tokens, refilled_at, per_second, burst)
     VALUES ($1, $3, $4, $5, $6)
     ON CONFLICT (key) DO UPDATE SET key = rate_buckets.key
     RETURNING tokens, refilled_at,
        (SELECT due_at FROM rate_reservations WHERE key = $1 AND holder = $2)";

/// Writes a plan: the bucket (when `$3` is not null), the holder's
/// reservation deleted (`$7`) or set (`$8`), and the key's stale
/// reservations removed (`$9`).
const WRITE_SQL: &str = "WITH b AS (
        UPDATE rate_buckets SET tokens = $3, refilled_at = $4, per_second = $5, burst = $6
        WHERE key = $1 AND $3::bigint IS NOT NULL
     ), d AS (
        DELETE FROM rate_reservations
        WHERE key = $1 AND (($7 AND holder = $2) OR (due_at < $9::bigint AND holder <> $2))
     )
     INSERT INTO rate_reservations (key, holder, due_at)
     SELECT $1, $2, $8 WHERE $8::bigint IS NOT NULL
     ON CONFLICT (key, holder) DO UPDATE SET due_at = EXCLUDED.due_at";

/// Another holder's token a take that reserves may send on instead
/// (`plan::rate::take_over`), read while the bucket's row is locked, which
/// every take of the key holds; only when the take reserves, i.e. the
/// bucket is empty.
async fn late_reservation(
    c: &mut sqlx::PgConnection,
    req: &RateTakeRequest,
    p: &plan::RatePlan,
) -> Result<Option<plan::LateReservation>> {
    let Some((from, to)) = plan::takeover_window(p, &req.limit, req.now) else {
        return Ok(None);
    };
    let row: Option<(String, i64)> = sqlx::query_as(&plan::late_sql("$1", "$2", "$3", "$4"))
        .bind(&req.key)
        .bind(from.0)
        .bind(to.0)
        .bind(&req.holder)
        .fetch_optional(c)
        .await
        .map_err(db)?;
    Ok(row.map(|(holder, due)| plan::LateReservation {
        holder,
        due: Timestamp(due),
    }))
}

/// One take inside the caller's transaction: the bucket's row is locked
/// until it commits.
async fn take(c: &mut sqlx::PgConnection, req: &RateTakeRequest) -> Result<RateTake> {
    let row = sqlx::query(LOCK_SQL)
        .bind(&req.key)
        .bind(&req.holder)
        .bind(req.limit.capacity())
        .bind(req.now.0)
        .bind(req.limit.per_second)
        .bind(i64::from(req.limit.burst))
        .fetch_one(&mut *c)
        .await
        .map_err(db)?;
    let bucket = Bucket {
        tokens: row.get(0),
        refilled_at: Timestamp(row.get(1)),
    };
    let reservation: Option<i64> = row.get(2);
    let p = plan::take(
        Some(bucket),
        reservation.map(Timestamp),
        &req.limit,
        req.now,
    );
    let (p, moved) = plan::take_over(p.clone(), late_reservation(&mut *c, req, &p).await?);
    if p.bucket.is_some() || p.delete_reservation || p.reserve.is_some() {
        // The stale reservation a holder replaces is its own: the
        // conflict clause of the insert updates it, and `d` never
        // deletes the row the insert writes (a data-modifying CTE sees
        // the snapshot from before the statement).
        let reserve_replaces_own = p.reserve.is_some() && p.delete_reservation;
        sqlx::query(WRITE_SQL)
            .bind(&req.key)
            .bind(&req.holder)
            .bind(p.bucket.map(|b| b.tokens))
            .bind(p.bucket.map(|b| b.refilled_at.0))
            .bind(req.limit.per_second)
            .bind(i64::from(req.limit.burst))
            .bind(p.delete_reservation && !reserve_replaces_own)
            .bind(p.reserve.map(|t| t.0))
            .bind(p.gc_before.map(|t| t.0))
            .execute(&mut *c)
            .await
            .map_err(db)?;
    }
    if let Some(m) = moved {
        sqlx::query("UPDATE rate_reservations SET due_at = $3 WHERE key = $1 AND holder = $2")
            .bind(&req.key)
            .bind(&m.holder)
            .bind(m.due.0)
            .execute(&mut *c)
            .await
            .map_err(db)?;
    }
    Ok(p.answer)
}

#[async_trait]
impl LimitStore for PgStore {
    async fn rate_take(&self, req: RateTakeRequest) -> Result<RateTake> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let answer = take(&mut tx, &req).await?;
        tx.commit().await.map_err(db)?;
        Ok(answer)
    }

    async fn rate_take_many(&self, reqs: Vec<RateTakeRequest>) -> Result<Vec<RateTake>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        // Key order (stable: one key's takes stay in their order), so two
        // batches lock shared buckets in the same order.
        let mut order: Vec<usize> = (0..reqs.len()).collect();
        order.sort_by(|&a, &b| reqs[a].key.cmp(&reqs[b].key));
        let mut out = vec![RateTake::Granted; reqs.len()];
        let mut tx = self.pool.begin().await.map_err(db)?;
        for i in order {
            out[i] = take(&mut tx, &reqs[i]).await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(out)
    }

    async fn rate_buckets(&self, prefix: String) -> Result<Vec<RateBucketRow>> {
        let rows = sqlx::query(
            "SELECT b.key, b.tokens, b.refilled_at, b.per_second, b.burst,
                (SELECT COUNT(*) FROM rate_reservations r WHERE r.key = b.key)
             FROM rate_buckets b WHERE left(b.key, length($1)) = $1
             ORDER BY b.key",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| RateBucketRow {
                key: r.get(0),
                tokens: r.get(1),
                refilled_at: Timestamp(r.get(2)),
                limit: RateLimit {
                    per_second: r.get(3),
                    burst: r.get::<i64, _>(4) as u32,
                },
                reserved: r.get::<i64, _>(5) as u64,
            })
            .collect())
    }

    async fn breaker_get(&self, name: String) -> Result<Option<BreakerRow>> {
        let row = sqlx::query("SELECT state, changed_at FROM breakers WHERE name = $1")
            .bind(&name)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        // A row whose first update stored nothing reads as never stored.
        Ok(row
            .map(|r| BreakerRow {
                name,
                state: crate::json::decode_text(&r.get::<String, _>(0)),
                changed_at: Timestamp(r.get(1)),
            })
            .filter(|r| !r.state.is_null()))
    }

    async fn breaker_change(
        &self,
        name: String,
        now: Timestamp,
        change: BreakerChange,
    ) -> Result<BreakerChanged> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        // FOR UPDATE: a second process's update waits for this one and
        // then sees its state.
        let old: Option<String> =
            sqlx::query_scalar("SELECT state FROM breakers WHERE name = $1 FOR UPDATE")
                .bind(&name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        // `null`: a row an earlier update created without storing a state.
        let old = match old {
            Some(s) => Some(crate::json::decode_text(&s)).filter(|v| !v.is_null()),
            None => {
                // Never stored: create the row (or wait for the process
                // creating it) and lock it, so two first updates are
                // applied one after the other too.
                sqlx::query_scalar::<_, String>(
                    "INSERT INTO breakers (name, state, changed_at) VALUES ($1, 'null', $2)
                     ON CONFLICT (name) DO UPDATE SET name = breakers.name
                     RETURNING state",
                )
                .bind(&name)
                .bind(now.0)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)
                .map(|s| Some(crate::json::decode_text(&s)).filter(|v| !v.is_null()))?
            }
        };
        let w = change(old.clone());
        let state = match w.state {
            None => old,
            Some(new) => {
                sqlx::query("UPDATE breakers SET state = $2, changed_at = $3 WHERE name = $1")
                    .bind(&name)
                    .bind(new.to_string())
                    .bind(now.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                Some(new)
            }
        };
        let released = if w.release {
            super::connections::release_deferred(&mut tx, &name, now).await?
        } else {
            Vec::new()
        };
        tx.commit().await.map_err(db)?;
        Ok(BreakerChanged { state, released })
    }

    async fn debounce_windows(
        &self,
        tenant: Option<String>,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<crate::DebounceWindow>> {
        super::ops::debounce_windows(&self.pool, tenant.as_deref(), now, limit).await
    }

    async fn debounce_counts(
        &self,
        tenant: Option<String>,
        now: Timestamp,
    ) -> Result<Vec<crate::DebounceCount>> {
        super::ops::debounce_counts(&self.pool, tenant.as_deref(), now).await
    }
}
