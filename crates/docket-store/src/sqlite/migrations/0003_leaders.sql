-- Docket migration 0003 (SQLite): expiring leadership (schema version 3).
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump. Steps 0001-0003 use IF NOT EXISTS
-- because databases from before numbered steps may hold some of their
-- objects already (see migrate in sqlite/mod.rs).

-- Leadership that expires, of periodic tasks run on one node at a time
-- (Store::try_lead; lead.rs): renewed by its holder, taken over with a
-- larger fencing token once expired.
CREATE TABLE IF NOT EXISTS leaders (
    task       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    token      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
