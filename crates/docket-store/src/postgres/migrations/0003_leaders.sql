-- Docket migration 0003 (PostgreSQL): expiring leadership (schema version 3).
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs in the connection's schema
-- (search_path), inside the step's transaction under the migration advisory
-- lock, together with the schema_version bump. Steps 0001-0003 use IF NOT
-- EXISTS because schemas from before numbered steps may hold some of their
-- objects already (see migrate in postgres/mod.rs).

-- Leadership that expires, of periodic tasks run on one node at a time
-- (Store::try_lead; lead.rs): renewed by its holder, taken over with a
-- larger fencing token once expired.
CREATE TABLE IF NOT EXISTS leaders (
    task       text PRIMARY KEY,
    holder     text NOT NULL,
    token      bigint NOT NULL,
    expires_at bigint NOT NULL
);
