// The REST client against a real `docket serve`: triggers with idempotency
// keys, reads, lists, long polls, every operator command, refusals with the
// server's codes, tenants.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { DocketClient, DocketApiError, isTerminal } from '@docket/client';
import { server, createToken } from './helpers.mjs';

let s;
before(async () => {
  s = await server();
});
after(async () => {
  await s?.close();
});

const future = () => new Date(Date.now() + 3_600_000);

test('health answers the backend', async () => {
  const h = await s.client.health();
  assert.equal(h.status, 'ok');
  assert.equal(h.backend, 'sqlite');
});

test('trigger with an idempotency key creates one run; the second answers it as existing', async () => {
  const a = await s.client.trigger('noop', { n: 1 }, { idempotencyKey: 'idem-1', correlationId: 'corr-1', priority: 3 });
  assert.equal(a.existing, false);
  assert.equal(a.run.job, 'noop');
  assert.equal(a.run.idempotency_key, 'idem-1');
  assert.equal(a.run.correlation_id, 'corr-1');
  assert.equal(a.run.priority, 3);
  const b = await s.client.trigger('noop', { n: 2 }, { idempotencyKey: 'idem-1' });
  assert.equal(b.existing, true);
  assert.equal(b.run.id, a.run.id);
  assert.deepEqual(b.run.input, { n: 1 });
});

test('waitForRun answers the completed run; getRun its history', async () => {
  const { run } = await s.client.trigger('noop', { hello: 'world' });
  const done = await s.client.waitForRun(run.id, { timeoutMs: 20_000 });
  assert.equal(done.status, 'completed');
  assert.deepEqual(done.output, { hello: 'world' });
  assert.ok(isTerminal(done.status));
  const detail = await s.client.getRun(run.id);
  assert.equal(detail.run.id, run.id);
  assert.equal(detail.attempts.length, 1);
  assert.ok(detail.events.some((e) => e.kind === 'run_completed'));
  assert.ok(detail.timeline.length > 0);
});

test('wait answers terminal: false when its timeout passes first', async () => {
  const { run } = await s.client.trigger('noop', null, { runAfter: future() });
  const w = await s.client.wait(run.id, { timeoutMs: 200 });
  assert.equal(w.terminal, false);
  assert.equal(w.run.status, 'pending');
  await assert.rejects(s.client.waitForRun(run.id, { timeoutMs: 300 }), (e) => e instanceof DocketApiError && e.code === 'wait_timeout');
  await s.client.cancel(run.id);
});

test('listRuns filters by job and status; runs() walks every page', async () => {
  const ids = [];
  for (let i = 0; i < 3; i++) ids.push((await s.client.trigger('echo', { i }, { runAfter: future() })).run.id);
  const page = await s.client.listRuns({ job: 'echo', status: 'pending', limit: 2 });
  assert.equal(page.runs.length, 2);
  assert.ok(page.next_cursor);
  assert.ok(page.runs.every((r) => r.job === 'echo' && r.status === 'pending'));
  const all = [];
  for await (const r of s.client.runs({ job: 'echo', status: ['pending'], limit: 1 })) all.push(r.id);
  assert.deepEqual(all.sort(), [...ids].sort());
  for (const id of ids) await s.client.cancel(id, { comment: 'cleanup' });
  const cancelled = await s.client.listRuns({ job: 'echo', status: 'cancelled' });
  assert.equal(cancelled.runs.length, 3);
});

test('a failed run needs attention; retry with variables completes it, keeping the run', async () => {
  const { run } = await s.client.trigger('fail-then-succeed', { failures: 1, class: 'permanent' });
  const failed = await s.client.waitForRun(run.id, { timeoutMs: 20_000 });
  assert.equal(failed.status, 'failed');
  assert.match(failed.last_error_message, /demo failure 1/);
  const attention = await s.client.listRuns({ needsAttention: true, job: 'fail-then-succeed' });
  assert.ok(attention.runs.some((r) => r.id === run.id));
  const retried = await s.client.retry(run.id, { updatedVariables: { timeout: 30000 }, comment: 'bigger timeout' });
  assert.equal(retried.id, run.id);
  const done = await s.client.waitForRun(run.id, { timeoutMs: 20_000 });
  assert.equal(done.status, 'completed');
  assert.deepEqual(done.output.variables, { timeout: 30000 });
  const detail = await s.client.getRun(run.id);
  const audit = detail.events.find((e) => e.kind === 'operator_retry');
  assert.equal(audit.comment, 'bigger timeout');
  assert.equal(audit.actor, 'sdk-test');
});

test('retrigger makes a new run from a terminal one', async () => {
  const { run } = await s.client.trigger('noop', { again: true });
  await s.client.waitForRun(run.id, { timeoutMs: 20_000 });
  const t = await s.client.retrigger(run.id, { comment: 'once more' });
  assert.notEqual(t.run.id, run.id);
  assert.equal(t.run.retriggered_from, run.id);
  assert.deepEqual(t.run.input, { again: true });
});

test('skip is refused, naming why, when the run failed outside any step', async () => {
  // (A skip of a failed step is in worker.test.mjs: the demo jobs fail outside steps.)
  const { run } = await s.client.trigger('fail-then-succeed', { failures: 1, class: 'permanent' });
  await s.client.waitForRun(run.id, { timeoutMs: 20_000 });
  await assert.rejects(s.client.skip(run.id, { comment: 'not needed' }), (e) => {
    assert.equal(e.code, 'wrong_state');
    assert.equal(e.currentStatus, 'failed');
    assert.match(e.message, /no failed step to skip/);
    return true;
  });
});

test('postpone and cancel a pending run', async () => {
  const { run } = await s.client.trigger('noop', null, { runAfter: future() });
  const until = new Date(Date.now() + 7_200_000);
  const p = await s.client.postpone(run.id, { until, comment: 'later' });
  assert.equal(p.status, 'postponed');
  assert.equal(new Date(p.run_after).getTime(), until.getTime());
  const p2 = await s.client.postpone(run.id, { delayMs: 60_000 });
  assert.equal(p2.status, 'postponed');
  const c = await s.client.cancel(run.id, { comment: 'not needed' });
  assert.equal(c.status, 'cancelled');
});

test('approve and reject answer a run waiting for input', async () => {
  const a = (await s.client.trigger('approval', { amount: 120 })).run;
  const waiting = await s.client.waitForRun(a.id, { until: 'needs_input', timeoutMs: 20_000 });
  assert.equal(waiting.status, 'needs_input');
  await s.client.approve(a.id, { data: { by: 'ops' }, comment: 'fine' });
  const done = await s.client.waitForRun(a.id, { timeoutMs: 20_000 });
  assert.deepEqual(done.output, { approved: true, data: { by: 'ops' } });

  const r = (await s.client.trigger('approval', {})).run;
  await s.client.waitForRun(r.id, { until: 'needs_input', timeoutMs: 20_000 });
  await s.client.reject(r.id, { data: 'no' });
  const rejected = await s.client.waitForRun(r.id, { timeoutMs: 20_000 });
  assert.deepEqual(rejected.output, { approved: false, data: 'no' });
});

test('refusals throw DocketApiError with the server code, field and state', async () => {
  const { run } = await s.client.trigger('noop', 1);
  await s.client.waitForRun(run.id, { timeoutMs: 20_000 });
  await assert.rejects(s.client.retry(run.id), (e) => {
    assert.ok(e instanceof DocketApiError);
    assert.equal(e.status, 409);
    assert.equal(e.code, 'wrong_state');
    assert.equal(e.currentStatus, 'completed');
    return true;
  });
  await assert.rejects(s.client.trigger('no-such-job', {}), (e) => e.status === 422 && e.code === 'unknown_job');
  await assert.rejects(s.client.getRun('01900000-0000-7000-8000-000000000000'), (e) => e.status === 404 && e.code === 'not_found');
  await assert.rejects(s.client.listRuns({ limit: 0 }), (e) => e.status === 400 && e.code === 'invalid_parameter');
  const anonymous = new DocketClient({ url: s.url });
  await assert.rejects(anonymous.jobs(), (e) => e.status === 401 && e.code === 'unauthorized');
});

test("a token reaches only its tenant's runs", async () => {
  const other = new DocketClient({ url: s.url, token: createToken(s.db, 'globex', 'other') });
  const { run } = await s.client.trigger('noop', null, { runAfter: future() });
  await assert.rejects(other.getRun(run.id), (e) => e.status === 404);
  await assert.rejects(other.cancel(run.id), (e) => e.status === 404);
  assert.ok(!(await other.listRuns()).runs.some((r) => r.id === run.id));
  await s.client.cancel(run.id);
});

test('jobs, batch triggers and the seed command envelope', async () => {
  const jobs = await s.client.jobs();
  assert.ok(jobs.some((j) => j.name === 'noop'));
  const batch = await s.client.triggerBatch([
    { job: 'noop', input: 1, idempotencyKey: 'b-1' },
    { job: 'echo', input: 2 },
  ]);
  assert.equal(batch.length, 2);
  assert.equal(batch[0].run.job, 'noop');
  const again = await s.client.triggerBatch([{ job: 'noop', input: 9, idempotencyKey: 'b-1' }]);
  assert.equal(again[0].existing, true);
  assert.equal(again[0].run.id, batch[0].run.id);
  const state = await s.client.coreCommand('GetProcessStateCommand', { instanceGuid: batch[0].run.id });
  assert.equal(state.isSuccessful, true);
  const missing = await s.client.coreCommand('GetProcessStateCommand', { instanceGuid: 'invalid-guid' });
  assert.equal(missing.isSuccessful, false);
  assert.match(missing.message, /not found/);
  const f = await s.client.forensics(batch[0].run.id);
  assert.equal(f.run_id, batch[0].run.id);
  assert.deepEqual(await s.client.connections(), []);
});
