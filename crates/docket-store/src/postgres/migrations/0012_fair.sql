-- Docket migration 0012: tenant fairness (docs/FLOW_CONTROL.md, "Tenant
-- fairness"; crate::plan::fair).
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump.

-- The unkeyed claim index leads with the tenant: a claim finds the tenants
-- with claimable runs by a skip scan (one probe per tenant) and claims each
-- tenant's share in claim order within the tenant. Same columns otherwise,
-- same partial predicate, so it costs what the old index cost to maintain.
DROP INDEX runs_claim;
CREATE INDEX runs_claim ON runs (tenant, priority DESC, run_after, id)
    WHERE status IN ('pending', 'postponed') AND concurrency_key IS NULL;
