//! The TypeScript package (`clients/typescript`, `@docket/client`) tested
//! as part of `cargo test`: `npm ci` from its committed lock file, then
//! `npm test`, which builds it, checks its generated API types against this
//! server's OpenAPI document (drift) and runs its tests (node's test
//! runner) against this build's `docket` binary — the REST client, SSE
//! resume, the worker over the worker protocol, and the React hooks in
//! headless Chromium. With DOCKET_TEST_POSTGRES_URL set, the worker tests
//! (test/worker.test.mjs) run a second time against a fresh PostgreSQL
//! schema.
//!
//! Needs `node` and `npm` (Node 20+) and Debian's `chromium`. Without node
//! the test fails when `CI=true` and is skipped with one line otherwise.

use std::path::Path;
use std::process::{Command, Stdio};

fn has(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs npm (with `envs` set); its output is shown only when it fails (it
/// is long).
fn npm(dir: &Path, args: &[&str], envs: &[(&str, &str)]) {
    let out = Command::new("npm")
        .args(args)
        .current_dir(dir)
        .envs(envs.iter().copied())
        // The tests start this build's server, not one found elsewhere.
        .env("DOCKET_BIN", env!("CARGO_BIN_EXE_docket"))
        .env("npm_config_fund", "false")
        .env("npm_config_audit", "false")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run npm {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "`npm {}` failed in {} ({}):\n{stdout}\n{}",
        args.join(" "),
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The runner's summary (`# pass N`, `# fail 0`) for the log.
    for line in stdout
        .lines()
        .filter(|l| l.starts_with("# ") && !l.starts_with("# Subtest"))
    {
        eprintln!("{line}");
    }
}

#[test]
fn typescript_client_worker_and_react_hooks() {
    if !has("node") || !has("npm") {
        let msg = "node and npm (Node 20+) are needed for the TypeScript package's tests";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("skipped: {msg}");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/typescript");
    npm(&dir, &["ci", "--no-progress"], &[]);
    npm(&dir, &["test"], &[]);
    // The worker tests again on PostgreSQL (the protocol's claims, fences
    // and ledger run different SQL there); only those, to keep the suite
    // short: the client and the hooks do not depend on the backend.
    if let Some(db) = postgres() {
        eprintln!("the worker tests on PostgreSQL:");
        npm(&dir, &["run", "test:worker"], &[("DOCKET_TS_DB", &db)]);
    }
}

/// A fresh PostgreSQL schema's URL (`t_<uuidv7>`, swept by the store's
/// PostgreSQL tests after an hour) when DOCKET_TEST_POSTGRES_URL is set.
fn postgres() -> Option<String> {
    match std::env::var("DOCKET_TEST_POSTGRES_URL") {
        Ok(u) if !u.trim().is_empty() => Some(format!(
            "{u}{}schema=t_{}",
            if u.contains('?') { '&' } else { '?' },
            uuid::Uuid::now_v7().simple()
        )),
        _ => {
            eprintln!("the worker tests on PostgreSQL skipped: set DOCKET_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test");
            None
        }
    }
}
