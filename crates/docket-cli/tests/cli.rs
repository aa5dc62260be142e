//! `docket token`, `docket serve` and the client commands, end to end: the
//! real binary, a real server on a loopback port, a temporary SQLite file.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_docket");

fn tmp_db() -> String {
    let dir = std::env::temp_dir().join(format!("docket-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("docket.db").to_str().unwrap().to_string()
}

fn docket(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("DOCKET_URL")
        .env_remove("DOCKET_TOKEN")
        .env_remove("DOCKET_DB")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the command with its stdout a pipe whose reader is already gone
/// (as under `| head -1` once head has its line): the exit code and stderr.
/// The reader is closed before the command starts, so its first write
/// fails whatever the timing.
fn docket_into_closed_pipe(args: &[&str]) -> (i32, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .args(args)
        .env_remove("DOCKET_URL")
        .env_remove("DOCKET_TOKEN")
        .env_remove("DOCKET_DB")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Served {
    /// Taken by `terminate`; killed on drop otherwise, so a failing test
    /// leaves no server behind.
    child: Option<Child>,
    url: String,
    /// Log lines before "listening".
    early: Vec<String>,
}

/// Starts `docket serve` on 127.0.0.1:0 and reads the bound address from
/// its log (waiting at most 30 s).
fn serve(db: &str, extra: &[&str]) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--db", db, "--addr", "127.0.0.1:0", "--demo-jobs"])
        .args(extra)
        .env("DOCKET_LOG", "info")
        .env_remove("DOCKET_DB")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Keep draining after the test stops listening.
            let _ = tx.send(line);
        }
    });
    let mut early = Vec::new();
    loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not log its address within 30 s: {early:?}");
        };
        early.push(line.clone());
        if line.contains("docket API listening") {
            let addr = line
                .split("addr=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
            return Served {
                child: Some(child),
                url: format!("http://{addr}"),
                early,
            };
        }
    }
}

/// SIGTERM, then the exit code (waiting at most 20 s).
impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn terminate(mut s: Served) -> i32 {
    let mut child = s.child.take().expect("the server is running");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait().map(|st| st.code().unwrap_or(-1)));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("docket serve stops within 20 s of SIGTERM")
        .unwrap()
}

#[test]
fn tokens_serve_and_client_end_to_end() {
    let db = tmp_db();
    let (code, secret, err) = docket(
        &[
            "token", "create", "--tenant", "acme", "--name", "alice", "--db", &db,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let secret = secret.trim().to_string();
    assert!(secret.starts_with("dkt_") && secret.len() == 68, "{secret}");
    assert!(err.contains("shown only now"));
    let (code, _, err) = docket(
        &[
            "token", "create", "--tenant", "acme", "--name", "alice", "--db", &db,
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("already has a live token named `alice`"),
        "{err}"
    );
    let (code, list, _) = docket(&["token", "list", "--db", &db], &[]);
    assert_eq!(code, 0);
    assert!(list.starts_with("ID "), "{list}");
    assert!(list.contains("acme") && list.contains("alice") && list.contains("active"));
    assert!(!list.contains(&secret[4..]), "the secret is never listed");

    let s = serve(&db, &[]);
    let env = [
        ("DOCKET_URL", s.url.as_str()),
        ("DOCKET_TOKEN", secret.as_str()),
    ];

    // A run that fails terminally, then an operator retry with variables.
    let (code, out, err) = docket(
        &[
            "trigger",
            "fail-then-succeed",
            r#"{"failures":1,"class":"permanent"}"#,
            "--wait",
            "--timeout",
            "20s",
        ],
        &env,
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("failed (permanent_error)"), "{out}");
    let (code, out, _) = docket(&["runs", "list", "--needs-attention", "--json"], &env);
    assert_eq!(code, 0);
    let page: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = page["runs"][0]["id"].as_str().unwrap().to_string();
    let (code, out, err) = docket(
        &[
            "runs",
            "retry",
            &id,
            "--vars",
            r#"{"fixed":true}"#,
            "--comment",
            "fixed the config",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("retry: run"), "{out}");
    let (code, out, _) = docket(&["runs", "wait", &id, "--timeout", "20s"], &env);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("completed"), "{out}");
    let (code, out, _) = docket(&["runs", "show", &id], &env);
    assert_eq!(code, 0);
    for want in [
        "attempts",
        "timeline",
        "operator_retry",
        "fixed the config",
        "alice",
        "permanent: demo failure 1 of 1",
        "GAP",
    ] {
        assert!(out.contains(want), "`{want}` missing from:\n{out}");
    }
    // A table for people.
    let (_, out, _) = docket(&["runs", "list"], &env);
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("STATUS"),
        "{out}"
    );
    // Retrying a completed run: the server's 409 message, exit 1.
    let (code, _, err) = docket(&["runs", "retry", &id], &env);
    assert_eq!(code, 1);
    assert!(
        err.contains("HTTP 409") && err.contains("completed"),
        "{err}"
    );
    // Idempotency through the CLI.
    let (_, a, _) = docket(&["trigger", "echo", r#"{"a":1}"#, "--key", "k1"], &env);
    let (_, b, _) = docket(&["trigger", "echo", r#"{"a":1}"#, "--key", "k1"], &env);
    assert!(a.starts_with("created run"), "{a}");
    assert!(b.starts_with("existing run"), "{b}");
    // A debounced trigger through the CLI: the second is collapsed into the
    // first's run (keep = last with a long window: nothing runs meanwhile),
    // `runs show` shows the count; a bad window is the server's 422 naming
    // the field.
    let deb = |input: &str| {
        docket(
            &[
                "trigger",
                "echo",
                input,
                "--debounce-window",
                "1h",
                "--debounce-keep",
                "last",
                "--debounce-key",
                "{{ input.c }}",
            ],
            &env,
        )
    };
    let (_, a, _) = deb(r#"{"c":"cli","v":1}"#);
    let (_, b, _) = deb(r#"{"c":"cli","v":2}"#);
    assert!(a.starts_with("created run"), "{a}");
    assert!(b.starts_with("collapsed into run"), "{b}");
    let deb_id = a.split_whitespace().nth(2).unwrap().to_string();
    assert!(b.contains(&deb_id), "{a} / {b}");
    let (_, shown, _) = docket(&["runs", "show", &deb_id], &env);
    assert!(shown.contains("collapsed 1"), "{shown}");
    // `docket limits` lists the open window: its job, key, mode, run and
    // count.
    let (code, limits, err) = docket(&["limits"], &env);
    assert_eq!(code, 0, "{err}");
    let row = limits
        .lines()
        .find(|l| l.contains(&deb_id))
        .unwrap_or_else(|| panic!("the open window in:\n{limits}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..3], ["echo", "cli", "last"], "{limits}");
    assert_eq!(cells.last(), Some(&"1"), "collapsed once: {limits}");
    assert!(limits.contains("DEBOUNCED JOB"), "{limits}");
    let (code, _, err) = docket(
        &[
            "trigger",
            "echo",
            "{}",
            "--debounce-window",
            "0s",
            "--debounce-keep",
            "first",
        ],
        &env,
    );
    assert_eq!(code, 1);
    assert!(err.contains("debounce.window"), "{err}");
    // Approve and cancel and postpone.
    let (_, out, _) = docket(&["trigger", "approval", r#"{"amount":5}"#, "--json"], &env);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ap = v["run"]["id"].as_str().unwrap().to_string();
    let (code, out, _) = docket(&["runs", "wait", &ap, "--timeout", "20s"], &env);
    assert_eq!(code, 3, "waiting for input answers at once: {out}");
    let (code, out, err) = docket(&["runs", "approve", &ap, "--data", r#"{"ok":true}"#], &env);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = docket(&["runs", "wait", &ap, "--timeout", "20s", "--json"], &env);
    assert_eq!(code, 0, "{out}");
    let (_, out, _) = docket(
        &[
            "trigger",
            "noop",
            "null",
            "--run-after",
            "2999-01-01T00:00:00Z",
            "--json",
        ],
        &env,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let later = v["run"]["id"].as_str().unwrap().to_string();
    let (code, _, err) = docket(&["runs", "postpone", &later, "--delay", "10m"], &env);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = docket(&["runs", "cancel", &later, "--comment", "not needed"], &env);
    assert_eq!(code, 0);
    assert!(out.contains("cancelled"), "{out}");
    let (code, out, _) = docket(&["runs", "retrigger", &later], &env);
    assert_eq!(code, 0);
    assert!(out.contains("retriggered"), "{out}");
    // Without a token: 401.
    let (code, _, err) = docket(&["runs", "list"], &[("DOCKET_URL", s.url.as_str())]);
    assert_eq!(code, 1);
    assert!(err.contains("HTTP 401"), "{err}");

    // Revoke: refused at once.
    let (code, out, _) = docket(
        &[
            "token", "revoke", "--tenant", "acme", "--name", "alice", "--db", &db,
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = docket(&["runs", "list"], &env);
    assert_eq!(code, 1);
    assert!(err.contains("revoked"), "{err}");

    // SIGTERM: a clean exit.
    assert_eq!(terminate(s), 0);
}

#[test]
fn insecure_flag_is_refused_off_loopback_and_config_errors_are_clear() {
    let db = tmp_db();
    let (code, _, err) = docket(
        &[
            "serve",
            "--db",
            &db,
            "--addr",
            "0.0.0.0:0",
            "--insecure-dev-no-auth",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("only allowed on a loopback address"), "{err}");
    let cfg = std::path::Path::new(&db).with_file_name("bad.toml");
    std::fs::write(&cfg, "port = 1\n").unwrap();
    let (code, _, err) = docket(&["serve", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown field `port`"), "{err}");
}

#[test]
fn insecure_dev_mode_on_loopback_says_so_loudly() {
    let db = tmp_db();
    let s = serve(&db, &["--insecure-dev-no-auth"]);
    let warnings = s
        .early
        .iter()
        .filter(|l| l.contains("AUTHENTICATION IS OFF"))
        .count();
    assert!(warnings >= 1, "{:?}", s.early);
    let (code, out, err) = docket(
        &["trigger", "noop", "1", "--wait", "--timeout", "20s"],
        &[("DOCKET_URL", s.url.as_str())],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(terminate(s), 0);
}

/// A service on a loopback port that answers every request 503.
fn unavailable_service() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut sock in listener.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 8192];
            let _ = sock.read(&mut buf);
            let _ = sock.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndown",
            );
        }
    });
    format!("http://{addr}")
}

#[test]
fn forensics_connections_and_breakers_from_the_command_line() {
    let db = tmp_db();
    let dir = std::path::Path::new(&db).parent().unwrap().to_path_buf();
    let toml = dir.join("docket.toml");
    std::fs::write(
        &toml,
        format!(
            r#"
[connections.crm]
base_url = "{}"
breaker = {{ failures = 2, window_ms = 60000, open_ms = 600000 }}

[jobs.ping]
connection = "crm"
path = "/emails"
idempotency_key = "{{{{ input.id }}}}/ping/v1"
body = {{ id = "{{{{ input.id }}}}" }}
retry = {{ base_delay_ms = 50, max_delay_ms = 50, max_attempts = 2, jitter_ms = 0 }}
"#,
            unavailable_service()
        ),
    )
    .unwrap();
    let s = serve(
        &db,
        &["--config", toml.to_str().unwrap(), "--insecure-dev-no-auth"],
    );
    let url = s.url.clone();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--url", &url]);
        docket(&all, &[])
    };

    // Two 503s: a retry on the policy's schedule, then the policy stops.
    let (code, out, err) = run(&["trigger", "ping", r#"{"id":"p-1"}"#, "--wait", "--json"]);
    assert_eq!(code, 1, "{out} {err}");
    let w: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = w["run"]["id"].as_str().unwrap().to_string();
    assert_eq!(w["run"]["status"], "failed", "{w}");

    let (code, out, err) = run(&["forensics", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("timeline"), "{out}");
    assert!(out.contains("p-1/ping/v1"), "the fingerprint's key: {out}");
    assert!(out.contains("terminal_policy_failure"), "{out}");
    assert!(out.contains("unavailable"), "{out}");
    let (code, out, _) = run(&["forensics", &id, "--json"]);
    assert_eq!(code, 0);
    let f: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        f["verdicts"][0]["verdict"], "terminal_policy_failure",
        "{f}"
    );
    assert_eq!(f["attempts"].as_array().unwrap().len(), 2);
    assert!(f.get("chart_svg").is_none(), "no SVG in a terminal");

    let (code, out, err) = run(&[
        "forensics",
        "--job",
        "ping",
        "--since",
        "1h",
        "--fail-on-critical",
    ]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("runs examined 1"), "{out}");
    assert!(
        out.contains("same_action_same_error_within_backoff_window 0"),
        "{out}"
    );
    assert!(out.contains("terminal_policy_failure 1"), "{out}");
    let (code, _, err) = run(&["forensics", "--job", "ping", "--since", "last week"]);
    assert_eq!(code, 1);
    assert!(err.contains("--since `last week`"), "{err}");
    let (code, _, err) = run(&["forensics"]);
    assert_eq!(code, 2, "clap names what is missing: {err}");

    // A reader that stops early (`| head -1`) ends the output quietly: no
    // panic, no exit 101, the command's own exit code.
    for args in [
        vec!["runs", "show", &id],
        vec!["forensics", &id],
        vec!["forensics", "--job", "ping", "--since", "1h"],
        vec!["runs", "list"],
        vec!["breakers"],
    ] {
        let mut all = args.clone();
        all.extend(["--url", &url]);
        let (code, err) = docket_into_closed_pipe(&all);
        assert_eq!((code, err.as_str()), (0, ""), "{args:?}");
    }
    // `runs wait` keeps its answer's exit code (1: the run failed).
    let (code, err) = docket_into_closed_pipe(&["runs", "wait", &id, "--url", &url]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim(), format!("error: run {id} ended failed"));

    // The breaker opened on the two failures.
    let (code, out, _) = run(&["breakers"]);
    assert_eq!(code, 0);
    let line = out
        .lines()
        .find(|l| l.starts_with("crm"))
        .unwrap_or_default();
    assert!(line.contains("open"), "{out}");

    let (code, out, _) = run(&["connections", "list"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("NAME"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("crm"))
        .unwrap_or_default();
    assert!(line.contains("enabled") && line.contains("ping"), "{out}");
    let (code, out, err) = run(&["connections", "disable", "crm", "--comment", "key rotation"]);
    assert_eq!(
        (code, out.trim()),
        (0, "connection crm is now disabled"),
        "{err}"
    );
    let (code, out, _) = run(&["connections", "show", "crm"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("enabled → disabled") && out.contains("key rotation"),
        "{out}"
    );
    let (code, out, _) = run(&["connections", "enable", "crm"]);
    assert_eq!((code, out.trim()), (0, "connection crm is now enabled"));
    let (code, _, err) = run(&["connections", "disable", "nope"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("HTTP 404") && err.contains("known: crm"),
        "{err}"
    );
    assert_eq!(terminate(s), 0);
}

/// A database password never reaches the terminal, also when opening fails.
#[test]
fn a_database_password_is_never_printed() {
    for args in [
        vec![
            "token",
            "list",
            "--db",
            "postgres://qa:hunter2@127.0.0.1:1/test",
        ],
        vec![
            "serve",
            "--db",
            "postgres://qa:hunter2@127.0.0.1:1/test?schema=x",
            "--addr",
            "127.0.0.1:0",
        ],
    ] {
        let (code, out, err) = docket(&args, &[]);
        assert_eq!(code, 1, "{out} {err}");
        assert!(
            err.contains("cannot open postgres://qa:***@127.0.0.1:1"),
            "{err}"
        );
        assert!(
            !out.contains("hunter2") && !err.contains("hunter2"),
            "{err}"
        );
    }
}

/// A mistyped --db is an error for listing and revoking tokens, not an
/// empty table (and no file is created); creating one says it made a file.
#[test]
fn token_commands_do_not_invent_a_database() {
    let db = tmp_db();
    let (code, out, err) = docket(&["token", "list", "--db", &db], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains(&format!("no database at {db}")), "{err}");
    assert!(!std::path::Path::new(&db).exists(), "nothing created");
    let (code, _, err) = docket(
        &[
            "token", "create", "--tenant", "acme", "--name", "a", "--db", &db,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("creating it"), "{err}");
    let (code, out, _) = docket(&["token", "list", "--db", &db], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("acme"), "{out}");
}

/// `--wait` on a run that needs a person returns at once with exit code 3
/// and the commands that answer it; after approval it completes (exit 0).
#[test]
fn waiting_for_a_person_is_its_own_answer() {
    let db = tmp_db();
    let s = serve(&db, &["--insecure-dev-no-auth"]);
    let url = s.url.clone();
    let (code, out, err) = docket(
        &[
            "trigger",
            "approval",
            "{}",
            "--wait",
            "--timeout",
            "60s",
            "--url",
            &url,
        ],
        &[],
    );
    assert_eq!(code, 3, "{out} {err}");
    assert!(out.contains("needs_input"), "{out}");
    assert!(err.contains("docket runs approve"), "{err}");
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    let (code, _, err) = docket(&["runs", "approve", &id, "--url", &url], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = docket(&["runs", "wait", &id, "--url", &url], &[]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("completed"), "{out}");
    assert_eq!(terminate(s), 0);
}

/// SIGTERM stops the server even when nobody reads its log any more (its
/// stderr is a closed pipe): logging must not stand in the way of a
/// shutdown. (It did: tracing reported the failed write with `eprintln!`,
/// which panicked in the task that turns the signal into a stop.)
#[test]
fn sigterm_stops_the_server_when_its_log_is_a_closed_pipe() {
    let db = tmp_db();
    let mut child = Command::new(BIN)
        .args(["serve", "--db", &db, "--addr", "127.0.0.1:0", "--demo-jobs"])
        .env("DOCKET_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stderr).lines();
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("docket API listening"));
        // Dropping the reader closes the pipe.
        let _ = tx.send(ready);
    });
    let ready = rx.recv_timeout(Duration::from_secs(30));
    assert_eq!(ready, Ok(true), "the server started");
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait().map(|st| st.code()));
    });
    let Ok(code) = rx.recv_timeout(Duration::from_secs(20)) else {
        Command::new("kill").args(["-KILL", &pid]).status().unwrap();
        panic!("docket serve did not stop within 20 s of SIGTERM");
    };
    assert_eq!(code.unwrap(), Some(0));
}

/// POSTs JSON with curl; the status and the body.
fn curl_post(url: &str, token: &str, body: &str) -> (u16, serde_json::Value) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-X", "POST", url])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", "Content-Type: application/json", "-d", body])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (
        code.trim().parse().unwrap(),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// A remote job declared in docket.toml, a worker token from
/// `docket token create --scope worker`, a remote worker (curl) claiming
/// and completing the run, and `docket workers` listing it.
#[test]
fn a_remote_worker_with_a_worker_token_end_to_end() {
    let db = tmp_db();
    let token = |name: &str, scope: &[&str]| {
        let mut args = vec![
            "token", "create", "--tenant", "acme", "--name", name, "--db", &db,
        ];
        args.extend_from_slice(scope);
        let (code, secret, err) = docket(&args, &[]);
        assert_eq!(code, 0, "{err}");
        (secret.trim().to_string(), err)
    };
    let (op, _) = token("ops", &[]);
    let (wk, err) = token("ts-worker", &["--scope", "worker"]);
    assert!(err.contains("created worker token"), "{err}");
    let (code, _, err) = docket(
        &[
            "token", "create", "--tenant", "acme", "--name", "x", "--scope", "root", "--db", &db,
        ],
        &[],
    );
    assert_eq!(code, 2, "a bad scope is a usage error");
    assert!(err.contains("unknown token scope `root`"), "{err}");
    let (_, list, _) = docket(&["token", "list", "--db", &db], &[]);
    assert!(list.contains("SCOPE"), "{list}");
    assert!(
        list.contains("worker") && list.contains("operator"),
        "{list}"
    );

    let dir = std::path::Path::new(&db).parent().unwrap().to_path_buf();
    let toml = dir.join("docket.toml");
    std::fs::write(
        &toml,
        "[jobs.send-welcome]\nremote = true\njob_timeout_ms = 5000\nlease_ms = 20000\n\
         input_schema = { type = \"object\", required = [\"email\"] }\n",
    )
    .unwrap();
    let s = serve(&db, &["--config", toml.to_str().unwrap()]);
    let env = [
        ("DOCKET_URL", s.url.as_str()),
        ("DOCKET_TOKEN", op.as_str()),
    ];
    let (code, out, err) = docket(
        &["trigger", "send-welcome", r#"{"email":"a@example.com"}"#],
        &env,
    );
    assert_eq!(code, 0, "{out} {err}");
    let claim = format!("{}/api/worker/v1/claim", s.url);
    let body = r#"{"worker":"ts-1","jobs":["send-welcome"],"max":1,"wait_ms":5000}"#;
    // The operator token cannot claim.
    let (st, _) = curl_post(&claim, &op, body);
    assert_eq!(st, 403);
    let (st, v) = curl_post(&claim, &wk, body);
    assert_eq!(st, 200, "{v}");
    let run = &v["runs"][0];
    assert_eq!(run["input"]["email"], "a@example.com", "{v}");
    assert_eq!(run["timeout_ms"], 5000);
    let end = format!(
        "{}/api/worker/v1/runs/{}/end",
        s.url,
        run["run_id"].as_str().unwrap()
    );
    let (st, v) = curl_post(
        &end,
        &wk,
        &format!(
            r#"{{"lease_id":"{}","outcome":"completed","output":{{"sent":true}}}}"#,
            run["lease_id"].as_str().unwrap()
        ),
    );
    assert_eq!(
        (st, v["status"].clone()),
        (200, serde_json::json!("completed"))
    );
    let (code, out, err) = docket(&["workers"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ts-1") && out.contains("send-welcome"),
        "{out}"
    );
    // A worker token is refused by the operator commands.
    let (code, _, err) = docket(
        &["workers"],
        &[
            ("DOCKET_URL", s.url.as_str()),
            ("DOCKET_TOKEN", wk.as_str()),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("scope"), "{err}");
}

/// A client command runner: (exit code, stdout, stderr).
type Runner<'a> = dyn Fn(&[&str]) -> (i32, String, String) + 'a;

/// Schedules from docket.toml across restarts, and `docket schedules …`:
/// a schedule in the file fires (a run per slot, keyed by the slot);
/// pause, resume, trigger and backfill from the command line are audited;
/// editing the file and restarting changes, adds and removes schedules; a
/// bad schedule refuses the start, naming its place.
#[test]
fn schedules_from_docket_toml_across_restarts() {
    let db = tmp_db();
    let dir = std::path::Path::new(&db).parent().unwrap().to_path_buf();
    let toml = dir.join("docket.toml");
    let write = |text: &str| std::fs::write(&toml, text).unwrap();
    let start = || {
        serve(
            &db,
            &["--config", toml.to_str().unwrap(), "--insecure-dev-no-auth"],
        )
    };
    write(
        r#"
[schedules.tick]
job = "echo"
every = "1s"
overlap = "allow"
input = { slot = "{{ slot }}" }
"#,
    );
    let s = start();
    let url = s.url.clone();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--url", &url]);
        docket(&all, &[])
    };
    let show = |run: &Runner| {
        let (code, out, err) = run(&["schedules", "show", "tick", "--json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    // Wait, on the server's event stream (bounded by curl's 30 s), for the
    // first two slots' runs to be triggered.
    {
        use std::io::BufRead;
        let mut sse = Command::new("curl")
            .args(["-sN", "--max-time", "30"])
            .arg(format!(
                "{url}/api/events?kind=run_triggered&last_event_id=0"
            ))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("curl runs");
        let lines = std::io::BufReader::new(sse.stdout.take().unwrap()).lines();
        let mut triggered = 0;
        for line in lines.map_while(Result::ok) {
            if line.starts_with("data:") && line.contains("\"job\":\"echo\"") {
                triggered += 1;
                if triggered == 2 {
                    break;
                }
            }
        }
        let _ = sse.kill();
        let _ = sse.wait();
        assert_eq!(triggered, 2, "two slots did not fire within 30 s");
    }
    let v = show(&run);
    let fired: Vec<serde_json::Value> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["kind"] == "fired")
        .cloned()
        .collect();
    assert!(fired.len() >= 2, "{v}");
    let run_id = fired[0]["run_id"].as_str().unwrap().to_string();
    let (code, out, err) = run(&["runs", "show", &run_id, "--json"]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let slot = fired[0]["slot"].as_str().unwrap();
    assert_eq!(
        r["run"]["idempotency_key"],
        format!("schedule:tick:{slot}"),
        "{r}"
    );
    assert_eq!(r["run"]["input"]["slot"], slot);

    let (code, out, _) = run(&["schedules", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("tick") && out.contains("every 1000 ms") && out.contains("enabled"),
        "{out}"
    );
    let (code, out, _) = run(&["schedules", "pause", "tick", "--comment", "quiet please"]);
    assert_eq!((code, out.trim()), (0, "schedule tick is now paused"));
    let (code, out, _) = run(&["schedules", "resume", "tick"]);
    assert_eq!((code, out.trim()), (0, "schedule tick is now enabled"));
    let (code, out, _) = run(&["schedules", "trigger", "tick", "--comment", "by hand"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("schedule tick fired: run "), "{out}");
    let (code, out, err) = run(&[
        "schedules",
        "backfill",
        "tick",
        "--from",
        "2026-01-01T00:00:00Z",
        "--to",
        "2026-01-01T00:00:02Z",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "schedule tick: 3 slots, 3 new runs, 0 already had a run"
    );
    let v = show(&run);
    let paused = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["kind"] == "paused")
        .unwrap()
        .clone();
    assert_eq!(paused["comment"], "quiet please");
    assert_eq!(
        paused["actor"], "anonymous",
        "the insecure mode's actor: {paused}"
    );
    let (code, out, _) = run(&["schedules", "show", "nope"]);
    assert_ne!(code, 0, "{out}");
    assert_eq!(terminate(s), 0);

    // Change tick, add daily; restart.
    write(
        r#"
[schedules.tick]
job = "echo"
every = "2s"
overlap = "skip"

[schedules.daily]
job = "noop"
cron = "0 6 * * *"
timezone = "America/New_York"
"#,
    );
    let s = start();
    let url = s.url.clone();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--url", &url]);
        docket(&all, &[])
    };
    let v = show(&run);
    assert_eq!(v["schedule"]["every_ms"], 2000, "{v}");
    assert_eq!(v["schedule"]["overlap"], "skip");
    let updated = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["kind"] == "updated")
        .unwrap()
        .clone();
    assert_eq!(updated["actor"], "docket.toml");
    let (code, out, _) = run(&["schedules", "show", "daily"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("T06:00:00-05:00[America/New_York]")
            || out.contains("T06:00:00-04:00[America/New_York]"),
        "{out}"
    );
    assert_eq!(terminate(s), 0);

    // Remove tick; a bad schedule first refuses the start.
    write(
        r#"
[schedules.daily]
job = "noop"
cron = "0 6 * * * * *"
"#,
    );
    let (code, _, err) = docket(
        &[
            "serve",
            "--db",
            &db,
            "--addr",
            "127.0.0.1:0",
            "--demo-jobs",
            "--config",
            toml.to_str().unwrap(),
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("schedules.daily.cron"), "{err}");
    write(
        r#"
[schedules.daily]
job = "noop"
cron = "0 6 * * *"
timezone = "America/New_York"
"#,
    );
    let s = start();
    let url = s.url.clone();
    let (code, out, _) = docket(&["schedules", "list", "--json", "--url", &url], &[]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["daily"], "tick was removed with the file's entry");
    // tick's runs stay.
    let (code, out, _) = docket(
        &["runs", "list", "--job", "echo", "--json", "--url", &url],
        &[],
    );
    assert_eq!(code, 0);
    assert!(out.contains("schedule:tick:"), "{out}");
    assert_eq!(terminate(s), 0);
}
