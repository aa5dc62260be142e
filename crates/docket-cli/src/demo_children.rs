//! The `fan-out` demo job of `docket serve --demo-jobs` (child runs).

use docket::{Docket, Job, JobError, SpawnOptions};
use serde_json::{json, Value};

/// Most children one `fan-out` run spawns (a demo, not a load test).
pub const MAX_DEMO_CHILDREN: u64 = 10_000;

/// Registers `fan-out`: input `{"children": N}` (default 10, at most
/// [`MAX_DEMO_CHILDREN`]) spawns N `echo` children (`child-0` …), joins
/// them — suspended, holding no worker slot, until the last one ends — and
/// outputs `{"children": N, "completed": M}`.
pub fn register(d: &Docket) -> Result<(), docket::Error> {
    d.register(Job::new("fan-out", |ctx, input: Value| async move {
        let n = input.get("children").and_then(Value::as_u64).unwrap_or(10);
        if n > MAX_DEMO_CHILDREN {
            return Err(JobError::invalid_input(format!(
                "children: at most {MAX_DEMO_CHILDREN}, not {n}"
            )));
        }
        let children = (0..n)
            .map(|i| (format!("child-{i}"), "echo".to_string(), json!({ "i": i })))
            .collect();
        let handles = ctx.spawn_many(children, SpawnOptions::default()).await?;
        let results = ctx.join(&handles).await?;
        let completed = results.iter().filter(|r| r.is_completed()).count();
        Ok::<_, JobError>(json!({ "children": n, "completed": completed }))
    }))
}
