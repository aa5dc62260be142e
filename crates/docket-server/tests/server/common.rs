//! A real server on a loopback port, over in-memory SQLite, with test jobs
//! and tokens for two tenants.

use docket::{Docket, Job, JobError, RetryPolicy, WorkerConfig, WorkerHandle};
use docket_server::{auth, AuthMode, HubConfig, Server, ServerConfig};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::oneshot;

pub struct TestServer {
    pub base: String,
    pub docket: Docket,
    pub http: reqwest::Client,
    /// Tenant `acme`, token name `alice`.
    pub a: String,
    /// Tenant `globex`, token name `bob`.
    pub b: String,
    worker: Option<WorkerHandle>,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
}

pub struct Opts {
    pub worker: bool,
    pub config: ServerConfig,
    /// A `docket.toml` with HTTP jobs and connections to install.
    pub http_toml: Option<String>,
    /// The store's URL (default `sqlite::memory:`): a file lets a test
    /// reach the rows with raw SQL.
    pub db: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            worker: true,
            config: ServerConfig {
                hub: HubConfig {
                    poll_interval: Duration::from_millis(20),
                    ..HubConfig::default()
                },
                ..ServerConfig::default()
            },
            http_toml: None,
            db: None,
        }
    }
}

pub fn register_jobs(d: &Docket) {
    // Child runs: `{"children": N, "job": J}` spawns N runs of J (default
    // `noop`), joins them and outputs how many completed.
    d.register(Job::new("fan", |ctx, input: Value| async move {
        let n = input["children"].as_u64().unwrap_or(2).min(20);
        let job = input["job"].as_str().unwrap_or("noop").to_string();
        let kids = (0..n)
            .map(|i| (format!("kid-{i}"), job.clone(), json!({ "i": i })))
            .collect();
        let hs = ctx
            .spawn_many(kids, docket::SpawnOptions::default())
            .await?;
        let done = ctx.join(&hs).await?;
        Ok::<_, JobError>(json!({ "completed": done.iter().filter(|r| r.is_completed()).count() }))
    }))
    .unwrap();
    d.register(Job::new("noop", |_ctx, input: Value| async move {
        Ok::<_, JobError>(input)
    }))
    .unwrap();
    // Fails permanently (the run ends failed) while attempt <= failures.
    d.register(Job::new("flaky", |ctx, input: Value| async move {
        let n = input["failures"].as_u64().unwrap_or(1) as u32;
        if ctx.attempt() <= n {
            return Err(JobError::permanent(format!(
                "Credit bureau API still unavailable - 503 Service Unavailable (attempt {})",
                ctx.attempt()
            ))
            .in_action("Task_CreditCheck"));
        }
        if let Some(ms) = input["sleep_ms"].as_u64() {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(json!({ "creditScore": 720, "variables": ctx.variables() }))
    }))
    .unwrap();
    // Three steps; `charge` fails permanently while attempt <= failures.
    d.register(Job::new("stepper", |ctx, input: Value| async move {
        let n = input["failures"].as_u64().unwrap_or(1) as u32;
        ctx.step("validate", || async { Ok::<_, JobError>(1) })
            .await?;
        let attempt = ctx.attempt();
        let charged = ctx
            .step("charge", || async move {
                if attempt <= n {
                    Err(JobError::permanent("card declined"))
                } else {
                    Ok(42)
                }
            })
            .await?;
        ctx.step("notify", || async { Ok::<_, JobError>(true) })
            .await?;
        Ok(json!({ "charged": charged.into_option() }))
    }))
    .unwrap();
    // Waits for an operator, after failing `failures` times.
    d.register(Job::new("approval", |ctx, input: Value| async move {
        let n = input["failures"].as_u64().unwrap_or(0) as u32;
        if ctx.attempt() <= n {
            return Err(JobError::permanent("not yet"));
        }
        let d = ctx
            .wait_for_input("Task_ApprovalDecision", json!({ "amount": 100 }))
            .await?;
        Ok(json!({ "decision": format!("{d:?}") }))
    }))
    .unwrap();
    // Retryable failures with a short backoff.
    d.register(
        Job::new("unavailable", |ctx, input: Value| async move {
            let n = input["failures"].as_u64().unwrap_or(1) as u32;
            if ctx.attempt() <= n {
                return Err(JobError::unavailable("503 from upstream"));
            }
            Ok(json!("done"))
        })
        .retry(RetryPolicy {
            name: "fast".into(),
            base_delay_ms: 20,
            max_delay_ms: 100,
            jitter_ms: 0,
            max_attempts: 3,
            ..RetryPolicy::default()
        }),
    )
    .unwrap();
    // Waits (an hour at most) for the signal `name` (keyed by `key` when
    // given) and outputs its payload and sender.
    d.register(Job::new("waiter", |ctx, input: Value| async move {
        let name = input["name"].as_str().unwrap_or("paid").to_string();
        let got = match input["key"].as_str() {
            Some(k) => {
                ctx.wait_for_signal_keyed(&name, k, Duration::from_secs(3600))
                    .await?
            }
            None => {
                ctx.wait_for_signal(&name, Duration::from_secs(3600))
                    .await?
            }
        };
        let sig = got
            .into_signal()
            .ok_or_else(|| JobError::permanent("timed out"))?;
        Ok::<_, JobError>(json!({ "data": sig.data, "sent_by": sig.sent_by }))
    }))
    .unwrap();
    // Sleeps durably for `ms` milliseconds, then outputs "rested".
    d.register(Job::new("napper", |ctx, input: Value| async move {
        let ms = input["ms"].as_u64().unwrap_or(60_000);
        ctx.sleep("nap", Duration::from_millis(ms)).await?;
        Ok::<_, JobError>(json!("rested"))
    }))
    .unwrap();
    // Runs for `ms` milliseconds, stopping early on cancel.
    d.register(Job::new("sleepy", |ctx, input: Value| async move {
        let ms = input["ms"].as_u64().unwrap_or(10_000);
        ctx.step("sleep", || async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, JobError>(())
        })
        .await?;
        ctx.step("after", || async { Ok::<_, JobError>(()) })
            .await?;
        Ok(json!("slept"))
    }))
    .unwrap();
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(Opts::default()).await
    }

    pub async fn start_with(mut opts: Opts) -> TestServer {
        let docket = Docket::open(opts.db.as_deref().unwrap_or("sqlite::memory:"))
            .await
            .unwrap();
        register_jobs(&docket);
        if let Some(text) = &opts.http_toml {
            let http = docket::http::HttpJobs::from_toml(text, ".").unwrap();
            http.install(&docket).unwrap();
            opts.config.http = Some(http);
        }
        let now = docket.clock().now();
        let mut secrets = Vec::new();
        for (tenant, name) in [("acme", "alice"), ("globex", "bob")] {
            let t = auth::issue_token(tenant, name, now).unwrap();
            docket.store().create_token(t.record).await.unwrap();
            secrets.push(t.secret);
        }
        let worker = opts.worker.then(|| {
            docket
                .worker(WorkerConfig {
                    poll_interval: Duration::from_millis(20),
                    reap_interval: Duration::from_millis(50),
                    ..WorkerConfig::default()
                })
                .start()
        });
        let server = Server::start(docket.clone(), opts.config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, rx) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            server
                .serve(listener, async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        TestServer {
            base,
            docket,
            http: reqwest::Client::new(),
            b: secrets.pop().unwrap(),
            a: secrets.pop().unwrap(),
            worker,
            stop: Some(stop),
            served: Some(served),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request with a token (or none) and a JSON body (or none).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self.http.request(method, self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let res = r.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(&self.a.clone()), None)
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(&self.a.clone()), Some(body))
            .await
    }

    /// Triggers a run for tenant `acme`; returns its id.
    pub async fn trigger(&self, job: &str, input: Value) -> String {
        let (s, v) = self
            .post("/api/runs", json!({ "job": job, "input": input }))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["run"]["id"].as_str().unwrap().to_string()
    }

    /// Waits (bounded) until the run is terminal or in one of `statuses`.
    pub async fn until(&self, id: &str, statuses: &[&str]) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, v) = self.get(&format!("/api/runs/{id}")).await;
            let st = v["run"]["status"].as_str().unwrap_or("").to_string();
            if statuses.contains(&st.as_str()) {
                return v["run"].clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {id} stayed {st}, wanted {statuses:?}"
            );
            // Block until the run is terminal, at most 200 ms (a long
            // poll, not a sleep: it answers at once when the run ends).
            self.get(&format!("/api/runs/{id}/wait?timeout=200ms"))
                .await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(j) = self.served.take() {
            tokio::time::timeout(Duration::from_secs(10), j)
                .await
                .expect("server stops within 10 s")
                .unwrap();
        }
        if let Some(w) = self.worker.take() {
            w.shutdown(Duration::from_secs(5)).await;
        }
    }
}

pub fn no_auth() -> Opts {
    let mut o = Opts::default();
    o.config.auth = AuthMode::InsecureNoAuth;
    o
}
