// The TypeScript worker against a real `docket serve` over the worker
// protocol: steps replayed across attempts, ledger-guarded actions (replay
// and reconcile), error classes and Retry-After through the server's retry
// policy, waitForInput, postpone, log and progress, concurrency, SIGTERM
// shutdown and a worker killed mid-attempt.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { createWorker, DocketClient, DocketError, DocketApiError } from '@docket/client';
import { tempDir, createToken, startDocket, deferred } from './helpers.mjs';

// Short retry delays and leases so the policy's work shows in seconds.
const CONFIG = `
[jobs.ts-job]
remote = true
lease_ms = 6000
job_timeout_ms = 5000
[jobs.ts-job.retry]
max_attempts = 3
base_delay_ms = 10
multiplier = 1.0
max_delay_ms = 10
jitter_ms = 0

# A short lease (its handler's timeout must be shorter still).
[jobs.ts-beat]
remote = true
lease_ms = 1000
job_timeout_ms = 900
[jobs.ts-beat.retry]
max_attempts = 2
base_delay_ms = 10
max_delay_ms = 10
jitter_ms = 0

[jobs.ts-other]
remote = true
lease_ms = 2000
job_timeout_ms = 1500
[jobs.ts-other.retry]
max_attempts = 2
base_delay_ms = 10
max_delay_ms = 10
jitter_ms = 0
`;

let tmp, server, client, workerToken, operatorToken, db;
const workers = [];
before(async () => {
  tmp = tempDir();
  // DOCKET_TS_DB: another database (crates/docket-cli/tests/typescript_sdk.rs
  // runs this file again on a fresh PostgreSQL schema when
  // DOCKET_TEST_POSTGRES_URL is set); by default a SQLite file.
  db = process.env.DOCKET_TS_DB || join(tmp.dir, 'docket.db');
  const config = join(tmp.dir, 'docket.toml');
  writeFileSync(config, CONFIG);
  const operator = createToken(db, 'acme', 'ops');
  operatorToken = operator;
  workerToken = createToken(db, 'acme', 'ts-worker', 'worker');
  server = await startDocket({ db, args: ['--config', config] });
  client = new DocketClient({ url: server.url, token: operator });
  worker({ 'ts-job': (ctx, input) => handler(ctx, input) }, { name: 'main-worker', concurrency: 4 });
});
after(async () => {
  for (const w of workers) await w.stop(1000);
  await server?.stop();
  tmp?.remove();
});

/** A worker for `jobs` (stopped after the tests). */
function worker(jobs, extra = {}) {
  const w = createWorker({ url: server.url, token: workerToken, jobs, claimWaitMs: 2000, handleSignals: false, ...extra });
  workers.push(w);
  return w;
}

/** One handler for `ts-job`, swapped per test (runs are sequential). */
let handler = async () => null;

const done = (id) => client.waitForRun(id, { timeoutMs: 30_000 });

test('steps are stored once and replayed on the retry the policy scheduled', async () => {
  let calls = 0;
  handler = async (ctx, input) => {
    const a = await ctx.step('load', () => {
      calls += 1;
      return { n: input.n * 2 };
    });
    if (ctx.attempt === 1) throw new DocketError('unavailable', 'provider 503');
    return { a, attempt: ctx.attempt, runId: ctx.runId };
  };
  const { run } = await client.trigger('ts-job', { n: 21 });
  const r = await done(run.id);
  assert.equal(r.status, 'completed');
  assert.deepEqual(r.output, { a: { n: 42 }, attempt: 2, runId: run.id });
  assert.equal(calls, 1, 'the step ran once');
  const d = await client.getRun(run.id);
  assert.equal(d.attempts.length, 2);
  assert.equal(d.attempts[0].error_class, 'unavailable');
  assert.equal(d.attempts[0].worker, 'main-worker');
  assert.ok(d.attempts[0].retry, 'the server scheduled the retry');
  assert.equal(d.steps.find((s) => s.name === 'load').status, 'completed');
  const seen = (await client.workers()).find((w) => w.name === 'main-worker');
  assert.deepEqual(seen.jobs, ['ts-job']);
  assert.equal(seen.tenant, 'acme');
  assert.ok(new Date(seen.last_seen_at).getTime() > Date.now() - 60_000);
});

test('an action runs once across attempts: replayed after a later failure', async () => {
  const sent = [];
  handler = async (ctx, input) => {
    const receipt = await ctx.action('charge', `order-${input.order}/charge`, (key) => {
      sent.push(key);
      return { receipt: `r-${sent.length}` };
    });
    if (ctx.attempt === 1) throw new DocketError('network', 'lost the reply');
    return receipt;
  };
  const { run } = await client.trigger('ts-job', { order: 7 });
  const r = await done(run.id);
  assert.equal(r.status, 'completed');
  assert.deepEqual(r.output, { receipt: 'r-1' });
  assert.deepEqual(sent, ['order-7/charge']);
  const d = await client.getRun(run.id);
  assert.equal(d.ledger.length, 1);
  assert.equal(d.ledger[0].state, 'committed');
});

test('an action whose outcome was unknown is reconciled, not sent again', async () => {
  const service = new Map();
  let sends = 0;
  handler = async (ctx, input) =>
    ctx.action(
      'send-email',
      `${input.to}/welcome`,
      async (key) => {
        sends += 1;
        service.set(key, { id: `m-${sends}` });
        // The effect landed but the answer never came back.
        if (ctx.attempt === 1) throw new DocketError('timeout', 'no answer in 10 s');
        return service.get(key);
      },
      { reconcile: async (key) => (service.has(key) ? { found: 'committed', result: service.get(key) } : { found: 'not_done' }) },
    );
  const { run } = await client.trigger('ts-job', { to: 'a@example.com' });
  const r = await done(run.id);
  assert.equal(r.status, 'completed', JSON.stringify((await client.getRun(run.id)).timeline.map((t) => t.summary)));
  assert.deepEqual(r.output, { id: 'm-1' });
  assert.equal(sends, 1, 'one email');
  const d = await client.getRun(run.id);
  assert.ok(d.events.some((e) => e.kind === 'action_unknown'));
  assert.ok(d.events.some((e) => e.kind === 'action_reconciled'));
});

test('error classes decide: a plain Error is permanent and fails the run at once', async () => {
  handler = async () => {
    throw new Error('bad data');
  };
  const { run } = await client.trigger('ts-job', {});
  const r = await done(run.id);
  assert.equal(r.status, 'failed');
  assert.equal(r.last_error_class, 'permanent');
  assert.equal(r.last_error_message, 'bad data');
  assert.equal(r.attempt, 1);
});

test("a DocketError's retryAfter holds the retry back at least that long", async () => {
  handler = async (ctx) => {
    if (ctx.attempt === 1) throw new DocketError('rate_limited', 'quota', { retryAfter: 1500 });
    return 'ok';
  };
  const { run } = await client.trigger('ts-job', {});
  const r = await done(run.id);
  assert.equal(r.status, 'completed');
  const d = await client.getRun(run.id);
  assert.equal(d.attempts[0].error_class, 'rate_limited');
  assert.ok(d.attempts[0].retry.delay_ms >= 1500, JSON.stringify(d.attempts[0].retry));
  assert.ok(d.attempts[1].gap_ms >= 1500, `gap ${d.attempts[1].gap_ms}`);
});

test('waitForInput suspends the run until an operator decides', async () => {
  handler = async (ctx, input) => {
    const d = await ctx.waitForInput('approve-refund', { amount: input.amount });
    return d;
  };
  const { run } = await client.trigger('ts-job', { amount: 120 });
  const waiting = await client.waitForRun(run.id, { until: 'needs_input', timeoutMs: 30_000 });
  assert.equal(waiting.status, 'needs_input');
  assert.deepEqual(waiting.input_request, { name: 'approve-refund', request: { amount: 120 } });
  await client.approve(run.id, { data: { ok: true } });
  const r = await done(run.id);
  assert.deepEqual(r.output, { decision: 'approved', data: { ok: true } });
});

test('postpone suspends without spending an attempt; log and progress are events', async () => {
  let first = true;
  handler = async (ctx) => {
    await ctx.log('starting', { attempt: ctx.attempt });
    await ctx.progress(1, 2, 'half');
    if (first) {
      first = false;
      ctx.postpone(100);
    }
    return 'after';
  };
  const { run } = await client.trigger('ts-job', {});
  const r = await done(run.id);
  assert.equal(r.status, 'completed');
  const d = await client.getRun(run.id);
  assert.ok(d.events.some((e) => e.kind === 'log' && e.data.message === 'starting'));
  const p = d.events.find((e) => e.kind === 'progress');
  assert.equal(p.data.current, 1);
  assert.equal(p.data.total, 2);
  assert.ok(d.events.some((e) => /postpone/.test(e.kind)), d.events.map((e) => e.kind).join(','));
  assert.ok(d.attempts.every((a) => a.error_class == null), 'no failure recorded');
});

test('an operator skips a failed step; the handler continues past it', async () => {
  handler = async (ctx) => {
    const fetched = await ctx.step('fetch-profile', () => {
      throw new DocketError('permanent', 'profile service says no');
    });
    const after = await ctx.step('after', () => 'ran');
    return { fetched: fetched ?? 'skipped', after };
  };
  const { run } = await client.trigger('ts-job', {});
  const failed = await done(run.id);
  assert.equal(failed.status, 'failed');
  const d = await client.getRun(run.id);
  assert.equal(d.steps.find((s) => s.name === 'fetch-profile').status, 'failed');
  await client.skip(run.id, { comment: 'profile not needed' });
  const r = await done(run.id);
  assert.equal(r.status, 'completed');
  assert.deepEqual(r.output, { fetched: 'skipped', after: 'ran' });
});

test('a cancel while running stops the handler at its next step boundary', async () => {
  const inside = deferred();
  const release = deferred();
  let ranTwo = false;
  let reachedThird = false;
  handler = async (ctx) => {
    await ctx.step('one', () => 1);
    inside.resolve();
    await release.promise;
    // Whether or not a heartbeat told the worker yet, the server answers
    // this step's `steps/get` by ending the attempt: `two` never runs.
    await ctx.step('two', () => {
      ranTwo = true;
      return 2;
    });
    await ctx.step('three', () => {
      reachedThird = true;
    });
    return 'finished';
  };
  const { run } = await client.trigger('ts-job', {});
  await inside.promise;
  const c = await client.cancel(run.id, { comment: 'stop it' });
  assert.equal(c.cancel_requested, true);
  release.resolve();
  const r = await done(run.id);
  assert.equal(r.status, 'cancelled');
  assert.equal(ranTwo, false);
  assert.equal(reachedThird, false);
  const d = await client.getRun(run.id);
  assert.deepEqual(d.steps.map((s) => s.name).sort(), ['one']);
});

test('two workers, one action key, a slow service: one effect', async () => {
  let sends = 0;
  const inService = deferred();
  const release = deferred();
  const slow = async (ctx, input) =>
    ctx.action('charge', `order-${input.order}/charge`, async () => {
      sends += 1;
      inService.resolve();
      await release.promise;
      return { charge: 'ch-1' };
    });
  handler = slow;
  const second = worker({ 'ts-job': (ctx, input) => handler(ctx, input) }, { name: 'second-worker' });
  // Two runs carrying the same business key (a duplicate dispatch).
  const a = (await client.trigger('ts-job', { order: 99 })).run;
  await inService.promise;
  const b = (await client.trigger('ts-job', { order: 99 })).run;
  // b's attempt finds the key in flight: the server defers it.
  const deferredEvent = await client.events({ runId: b.id, lastEventId: 0, kinds: ['action_in_flight'] })[Symbol.asyncIterator]().next();
  assert.equal(deferredEvent.value.kind, 'action_in_flight');
  release.resolve();
  const ra = await done(a.id);
  const rb = await done(b.id);
  assert.deepEqual(ra.output, { charge: 'ch-1' });
  assert.deepEqual(rb.output, { charge: 'ch-1' });
  assert.equal(sends, 1, 'the service was called once');
  const db = await client.getRun(b.id);
  assert.ok(db.events.some((e) => e.kind === 'duplicate_suppressed'));
  await second.stop();
});

test('heartbeats keep a lease alive past its length: an end held back past the lease lands on attempt 1', async () => {
  // A handler must stop before its lease's first expiry (its timeout is
  // shorter), so what outlives the lease here is the attempt: its `end` is
  // held back until the 1 s lease granted at claim is 2 s past — longer
  // than the server's reaper needs (every ~1 s). Only this worker's
  // heartbeats (every lease/3, while the attempt lasts) keep the run.
  let claimExpiry;
  let endSentAt;
  const held = [];
  const past = deferred();
  const beating = async (url, init) => {
    if (url.endsWith('/end')) {
      await past.promise;
      endSentAt = Date.now();
      return fetch(url, init);
    }
    const res = await fetch(url, init);
    if (res.ok && url.endsWith('/claim')) {
      const run = (await res.clone().json()).runs?.[0];
      if (run) claimExpiry = Date.parse(run.lease_expires_at);
    }
    if (res.ok && url.endsWith('/heartbeat')) {
      for (const l of (await res.clone().json()).leases ?? []) held.push(l.held);
      if (claimExpiry !== undefined && Date.now() > claimExpiry + 2000 && held.at(-1) === true) past.resolve();
    }
    return res;
  };
  const w = worker({ 'ts-beat': async (ctx) => ({ attempt: ctx.attempt }) }, { name: 'beating', fetch: beating });
  const { run } = await client.trigger('ts-beat', {});
  const r = await done(run.id);
  assert.equal(r.status, 'completed', JSON.stringify(r));
  assert.deepEqual(r.output, { attempt: 1 });
  assert.ok(endSentAt > claimExpiry + 2000, 'the end came after the lease granted at claim had passed');
  assert.ok(held.length >= 3 && held.every((h) => h === true), JSON.stringify(held));
  const d = await client.getRun(run.id);
  assert.equal(d.attempts.length, 1, JSON.stringify(d.attempts));
  assert.ok(!d.attempts.some((a) => a.error_class === 'lease_expired'), JSON.stringify(d.attempts));
  await w.stop();
});

test('the job timeout aborts the handler: the attempt fails `timeout` and is retried', async () => {
  const w = worker(
    {
      'ts-other': async (ctx) => {
        if (ctx.attempt === 1) await new Promise((_, reject) => ctx.signal.addEventListener('abort', () => reject(ctx.signal.reason)));
        return { attempt: ctx.attempt, aborted: ctx.signal.aborted };
      },
    },
    { name: 'deadline' },
  );
  const { run } = await client.trigger('ts-other', {});
  const r = await done(run.id);
  assert.deepEqual(r.output, { attempt: 2, aborted: false });
  const d = await client.getRun(run.id);
  assert.equal(d.attempts[0].error_class, 'timeout');
  await w.stop();
});

test("a late end after the lease lapsed is refused and recorded; the policy retried the run", async () => {
  // This worker's heartbeats fail and its first `end` is held back until
  // the server has reaped the lease: the end arrives stale.
  const heldEnd = deferred();
  let held = false;
  const errors = [];
  const fetchLate = async (url, init) => {
    if (url.endsWith('/heartbeat')) throw new TypeError('fetch failed');
    if (url.endsWith('/end') && !held) {
      held = true;
      await heldEnd.promise;
    }
    return fetch(url, init);
  };
  const w = worker(
    {
      'ts-other': async (ctx) => {
        if (ctx.attempt === 1) throw new DocketError('unavailable', 'first try');
        return { attempt: ctx.attempt };
      },
    },
    { name: 'late', fetch: fetchLate, onError: (e) => errors.push(e) },
  );
  const { run } = await client.trigger('ts-other', {});
  const r = await done(run.id);
  assert.deepEqual(r.output, { attempt: 2 });
  const refused = client.events({ runId: run.id, lastEventId: 0, kinds: ['stale_write_refused'] });
  heldEnd.resolve();
  const ev = (await refused[Symbol.asyncIterator]().next()).value;
  refused.close();
  assert.equal(ev.kind, 'stale_write_refused');
  const d = await client.getRun(run.id);
  assert.equal(ev.lease_id, d.attempts[0].lease_id, 'the stale lease is named');
  assert.equal(ev.data.attempted, 'failed');
  assert.equal(ev.data.error_class, 'unavailable');
  assert.equal(d.attempts[0].error_class, 'lease_expired');
  assert.equal(d.run.status, 'completed', 'the stale end changed nothing');
  assert.ok(!errors.some((e) => e instanceof DocketApiError), 'a stale end is expected, not an error');
  await w.stop();
});

test('concurrency bounds the handlers running at once', async () => {
  let now = 0;
  let peak = 0;
  const release = deferred();
  const started = [];
  const all = deferred();
  const w = worker(
    {
      'ts-other': async () => {
        now += 1;
        peak = Math.max(peak, now);
        started.push(1);
        if (started.length === 2) all.resolve();
        await release.promise;
        now -= 1;
        return 'ok';
      },
    },
    { concurrency: 2, name: 'bounded' },
  );
  const ids = [];
  for (let i = 0; i < 5; i++) ids.push((await client.trigger('ts-other', { i })).run.id);
  await all.promise;
  assert.equal(w.running, 2);
  release.resolve();
  for (const id of ids) assert.equal((await done(id)).status, 'completed');
  assert.equal(peak, 2);
  await w.stop();
});

test('a worker token cannot read runs; an operator token cannot claim', async () => {
  const asWorker = new DocketClient({ url: server.url, token: workerToken });
  await assert.rejects(asWorker.listRuns(), (e) => e instanceof DocketApiError && e.status === 403);
  const errors = [];
  const refused = deferred();
  const w = createWorker({
    url: server.url,
    token: operatorToken,
    jobs: { 'ts-other': () => 'never' },
    handleSignals: false,
    onError: (e) => {
      errors.push(e);
      refused.resolve();
    },
  });
  // A refused claim does not heal by retrying: the worker stops claiming.
  await refused.promise;
  await w.stop();
  assert.ok(errors.some((e) => e instanceof DocketApiError && e.status === 403), errors.map(String).join('\n'));
});

// A worker in its own process (test/fixtures/worker-process.mjs).
function spawnWorker(env) {
  const child = spawn(process.execPath, [fileURLToPath(new URL('./fixtures/worker-process.mjs', import.meta.url))], {
    env: { ...process.env, DOCKET_URL: server.url, DOCKET_TOKEN: workerToken, ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: child.stdout });
  const waiters = [];
  const seen = [];
  lines.on('line', (l) => {
    seen.push(l);
    for (const w of waiters) if (w.match(l)) w.resolve(l);
  });
  const exited = new Promise((r) => child.once('exit', (code, signal) => r({ code, signal })));
  return {
    child,
    exited,
    line(prefix) {
      const found = seen.find((l) => l.startsWith(prefix));
      if (found) return Promise.resolve(found);
      const d = deferred();
      waiters.push({ match: (l) => l.startsWith(prefix), resolve: d.resolve });
      return d.promise;
    },
  };
}

test('SIGTERM stops claiming and lets the running handler finish its attempt', async () => {
  const p = spawnWorker({ JOB: 'ts-other' });
  await p.line('ready');
  const { run } = await client.trigger('ts-other', { hold: true });
  await p.line(`started ${run.id}`);
  p.child.kill('SIGTERM');
  const { code } = await p.exited;
  assert.equal(code, 0);
  const r = await done(run.id);
  assert.equal(r.status, 'completed');
  assert.equal(r.attempt, 1, 'finished in the attempt that was running');
});

test('a worker killed mid-attempt costs one lease; the policy retries on another worker', async () => {
  const p = spawnWorker({ JOB: 'ts-other', HANG: '1' });
  await p.line('ready');
  const { run } = await client.trigger('ts-other', { hold: true });
  await p.line(`started ${run.id}`);
  p.child.kill('SIGKILL');
  await p.exited;
  const w = worker({ 'ts-other': (ctx) => ({ attempt: ctx.attempt }) }, { name: 'rescuer' });
  const r = await done(run.id);
  assert.equal(r.status, 'completed');
  assert.deepEqual(r.output, { attempt: 2 });
  const d = await client.getRun(run.id);
  assert.equal(d.attempts[0].error_class, 'lease_expired');
  await w.stop();
});
