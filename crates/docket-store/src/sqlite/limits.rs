//! [`LimitStore`] on SQLite: each take is one request on the writer thread,
//! so takes are serialised by the write lock.

use super::{db_err, SqliteStore};
use crate::limits::{
    BreakerChange, BreakerChanged, BreakerRow, LimitStore, RateBucketRow, RateTake, RateTakeRequest,
};
use crate::plan::rate as plan;
use crate::Result;
use async_trait::async_trait;
use docket_core::rate::{Bucket, RateLimit};
use docket_core::Timestamp;
use rusqlite::{params, OptionalExtension};

/// Another holder's token a take that reserves may send on instead
/// (`plan::rate::take_over`), read under the writer's lock; only when the
/// take reserves, i.e. the bucket is empty.
fn late_reservation(
    c: &rusqlite::Connection,
    req: &RateTakeRequest,
    p: &plan::RatePlan,
) -> Result<Option<plan::LateReservation>> {
    let Some((from, to)) = plan::takeover_window(p, &req.limit, req.now) else {
        return Ok(None);
    };
    c.prepare_cached(&plan::late_sql("?1", "?2", "?3", "?4"))
        .map_err(db_err)?
        .query_row(params![req.key, from.0, to.0, req.holder], |r| {
            Ok(plan::LateReservation {
                holder: r.get(0)?,
                due: Timestamp(r.get(1)?),
            })
        })
        .optional()
        .map_err(db_err)
}

/// One take under the writer's lock.
fn take(c: &rusqlite::Connection, req: &RateTakeRequest) -> Result<RateTake> {
    let bucket = c
        .prepare_cached("SELECT tokens, refilled_at FROM rate_buckets WHERE key = ?1")
        .map_err(db_err)?
        .query_row(params![&req.key], |r| {
            Ok(Bucket {
                tokens: r.get(0)?,
                refilled_at: Timestamp(r.get(1)?),
            })
        })
        .optional()
        .map_err(db_err)?;
    let reservation = c
        .prepare_cached("SELECT due_at FROM rate_reservations WHERE key = ?1 AND holder = ?2")
        .map_err(db_err)?
        .query_row(params![&req.key, &req.holder], |r| r.get::<_, i64>(0))
        .optional()
        .map_err(db_err)?
        .map(Timestamp);
    let p = plan::take(bucket, reservation, &req.limit, req.now);
    let (p, moved) = plan::take_over(p.clone(), late_reservation(c, req, &p)?);
    if let Some(b) = p.bucket {
        c.prepare_cached(
            "INSERT INTO rate_buckets (key, tokens, refilled_at, per_second, burst)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (key) DO UPDATE SET tokens = ?2, refilled_at = ?3,
                        per_second = ?4, burst = ?5",
        )
        .map_err(db_err)?
        .execute(params![
            &req.key,
            b.tokens,
            b.refilled_at.0,
            req.limit.per_second,
            req.limit.burst
        ])
        .map_err(db_err)?;
    }
    if p.delete_reservation {
        c.prepare_cached("DELETE FROM rate_reservations WHERE key = ?1 AND holder = ?2")
            .map_err(db_err)?
            .execute(params![&req.key, &req.holder])
            .map_err(db_err)?;
    }
    if let Some(before) = p.gc_before {
        c.prepare_cached("DELETE FROM rate_reservations WHERE key = ?1 AND due_at < ?2")
            .map_err(db_err)?
            .execute(params![&req.key, before.0])
            .map_err(db_err)?;
    }
    if let Some(due) = p.reserve {
        c.prepare_cached(
            "INSERT INTO rate_reservations (key, holder, due_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (key, holder) DO UPDATE SET due_at = ?3",
        )
        .map_err(db_err)?
        .execute(params![&req.key, &req.holder, due.0])
        .map_err(db_err)?;
    }
    if let Some(m) = moved {
        c.prepare_cached("UPDATE rate_reservations SET due_at = ?3 WHERE key = ?1 AND holder = ?2")
            .map_err(db_err)?
            .execute(params![&req.key, m.holder, m.due.0])
            .map_err(db_err)?;
    }
    Ok(p.answer)
}

#[async_trait]
impl LimitStore for SqliteStore {
    async fn rate_take(&self, req: RateTakeRequest) -> Result<RateTake> {
        self.call(move |c| take(c, &req)).await
    }

    async fn rate_take_many(&self, reqs: Vec<RateTakeRequest>) -> Result<Vec<RateTake>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        // One writer request: the takes share its transaction (the write
        // lock orders them; no lock order to keep).
        self.call(move |c| reqs.iter().map(|req| take(c, req)).collect())
            .await
    }

    async fn rate_buckets(&self, prefix: String) -> Result<Vec<RateBucketRow>> {
        self.read(move |c| {
            let mut st = c
                .prepare(
                    "SELECT b.key, b.tokens, b.refilled_at, b.per_second, b.burst,
                        (SELECT COUNT(*) FROM rate_reservations r WHERE r.key = b.key)
                     FROM rate_buckets b WHERE substr(b.key, 1, length(?1)) = ?1
                     ORDER BY b.key",
                )
                .map_err(db_err)?;
            let rows = st
                .query_map(params![prefix], |r| {
                    Ok(RateBucketRow {
                        key: r.get(0)?,
                        tokens: r.get(1)?,
                        refilled_at: Timestamp(r.get(2)?),
                        limit: RateLimit {
                            per_second: r.get(3)?,
                            burst: r.get(4)?,
                        },
                        reserved: r.get::<_, i64>(5)? as u64,
                    })
                })
                .map_err(db_err)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db_err)?;
            Ok(rows)
        })
        .await
    }

    async fn breaker_get(&self, name: String) -> Result<Option<BreakerRow>> {
        self.read(move |c| {
            c.prepare_cached("SELECT state, changed_at FROM breakers WHERE name = ?1")
                .map_err(db_err)?
                .query_row(params![name], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()
                .map_err(db_err)
                .map(|row| {
                    row.map(|(state, at)| BreakerRow {
                        name: name.clone(),
                        state: crate::json::decode_text(&state),
                        changed_at: Timestamp(at),
                    })
                })
        })
        .await
    }

    async fn breaker_change(
        &self,
        name: String,
        now: Timestamp,
        change: BreakerChange,
    ) -> Result<BreakerChanged> {
        self.call(move |c| {
            let old = c
                .prepare_cached("SELECT state FROM breakers WHERE name = ?1")
                .map_err(db_err)?
                .query_row(params![name], |r| r.get::<_, String>(0))
                .optional()
                .map_err(db_err)?
                .map(|s| crate::json::decode_text(&s));
            let w = change(old.clone());
            let state = match w.state {
                None => old,
                Some(new) => {
                    c.prepare_cached(
                        "INSERT INTO breakers (name, state, changed_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (name) DO UPDATE SET state = ?2, changed_at = ?3",
                    )
                    .map_err(db_err)?
                    .execute(params![name, new.to_string(), now.0])
                    .map_err(db_err)?;
                    Some(new)
                }
            };
            // The writer's lock holds through the release: no claim or
            // end interleaves with it.
            let released = if w.release {
                super::connections::release_deferred(c, &name, now)?
            } else {
                Vec::new()
            };
            Ok(BreakerChanged { state, released })
        })
        .await
    }

    async fn debounce_windows(
        &self,
        tenant: Option<String>,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<crate::DebounceWindow>> {
        self.read(move |c| super::ops::debounce_windows(c, tenant.as_deref(), now, limit))
            .await
    }

    async fn debounce_counts(
        &self,
        tenant: Option<String>,
        now: Timestamp,
    ) -> Result<Vec<crate::DebounceCount>> {
        self.read(move |c| super::ops::debounce_counts(c, tenant.as_deref(), now))
            .await
    }
}
