//! Leadership of periodic work: one node at a time, another takes over when
//! it dies.
//!
//! A store leads a task while it holds a session-level advisory lock
//! (`pg_try_advisory_lock`) on a connection of its own, outside the pool.
//! The lock lives exactly as long as that session: when the process dies, or
//! its connection breaks or is terminated, PostgreSQL releases it and the
//! next node to ask gets it. The key is derived from the schema and the
//! task's name, so stores on different schemas of one database never
//! compete.

use super::{db, set_search_path};
use crate::Result;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Row};
use std::collections::HashSet;

/// The leader connection and the tasks it leads.
#[derive(Default)]
pub(super) struct Leader {
    conn: Option<PgConnection>,
    held: HashSet<i64>,
}

/// The advisory lock key of `task` in `schema` (FNV-1a of a fixed prefix,
/// the schema and the task).
pub(super) fn lead_key(schema: &str, task: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "docket-lead:"
        .bytes()
        .chain(schema.bytes())
        .chain(std::iter::once(0))
        .chain(task.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

impl Leader {
    /// Forgets the connection and with it every hold (PostgreSQL releases
    /// a dead session's locks).
    fn lost(&mut self) {
        self.conn = None;
        self.held.clear();
    }

    /// See `Store::try_lead`.
    pub(super) async fn try_lead(
        &mut self,
        opts: &PgConnectOptions,
        schema: &str,
        task: &str,
    ) -> Result<bool> {
        let key = lead_key(schema, task);
        if self.held.contains(&key) {
            // Still ours if the session is alive.
            let alive = match self.conn.as_mut() {
                Some(c) => c.ping().await.is_ok(),
                None => false,
            };
            if alive {
                return Ok(true);
            }
            tracing::warn!(task, "lost the leader connection; asking again");
            self.lost();
        }
        if self.conn.is_none() {
            let mut c = PgConnection::connect_with(opts).await.map_err(db)?;
            set_search_path(&mut c, schema).await.map_err(db)?;
            self.conn = Some(c);
        }
        let c = self.conn.as_mut().expect("connected above");
        match sqlx::query("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *c)
            .await
            .and_then(|r| r.try_get::<bool, _>(0))
        {
            Ok(got) => {
                if got {
                    self.held.insert(key);
                }
                Ok(got)
            }
            Err(e) => {
                self.lost();
                Err(db(e))
            }
        }
    }

    /// See `Store::resign`.
    pub(super) async fn resign(&mut self, schema: &str, task: &str) -> Result<()> {
        let key = lead_key(schema, task);
        if !self.held.remove(&key) {
            return Ok(());
        }
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        if let Err(e) = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(key)
            .execute(&mut *c)
            .await
        {
            // Whatever the session holds goes with it.
            if let Some(c) = self.conn.take() {
                let _ = c.close().await;
            }
            self.held.clear();
            return Err(db(e));
        }
        if self.held.is_empty() {
            if let Some(c) = self.conn.take() {
                let _ = c.close().await;
            }
        }
        Ok(())
    }
}
