// Server-sent events: live delivery, resume after a closed subscription
// (Last-Event-ID: the missed events, no repeats), and the automatic
// reconnect across a server restart.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { DocketClient, DocketApiError } from '@docket/client';
import { server, collect, startDocket, deferred } from './helpers.mjs';

const servers = [];
after(async () => {
  // Newest first: a restarted server uses an older one's files.
  for (const s of servers.reverse()) await s.close();
});

const completed = (id) => (events) => events.some((e) => e.run_id === id && e.kind === 'run_completed');

test('a run filter delivers that run live, in id order', async () => {
  const s = await server();
  servers.push(s);
  const { run: other } = await s.client.trigger('noop', 'other', { runAfter: new Date(Date.now() + 3_600_000) });
  const { run } = await s.client.trigger('noop', 'mine', { runAfter: new Date(Date.now() + 3_600_000) });
  const opened = deferred();
  const sub = s.client.events({ runId: run.id, onOpen: opened.resolve });
  const events = collect(sub, completed(run.id));
  await opened.promise;
  // Live only (no resume point): it is made due now, then runs.
  await s.client.postpone(run.id, { delayMs: 0 });
  const got = await events;
  assert.ok(got.every((e) => e.run_id === run.id), 'only the filtered run');
  assert.ok(got.some((e) => e.kind === 'attempt_started'));
  const ids = got.map((e) => e.id);
  assert.deepEqual(ids, [...ids].sort((a, b) => a - b));
  assert.equal(sub.lastEventId, ids.at(-1));
  await s.client.cancel(other.id);
});

test('resuming with lastEventId delivers the events missed while closed, without repeats', async () => {
  const s = await server();
  servers.push(s);
  const first = (await s.client.trigger('noop', 1)).run;
  // From the start of the store: every stored event, the first run's too.
  const all = await collect(s.client.events({ lastEventId: 0, job: 'noop' }), completed(first.id));
  const resumeAt = all.at(-1).id;
  // While nobody listens, a second run happens.
  const second = (await s.client.trigger('noop', 2)).run;
  await s.client.waitForRun(second.id, { timeoutMs: 20_000 });
  const missed = await collect(s.client.events({ lastEventId: resumeAt, job: 'noop' }), completed(second.id));
  assert.ok(missed.every((e) => e.id > resumeAt), 'nothing at or before the resume point');
  assert.ok(missed.every((e) => e.run_id === second.id), 'only what happened after');
  assert.equal(new Set(missed.map((e) => e.id)).size, missed.length, 'no repeats');
  assert.equal(missed[0].kind, 'run_triggered');
});

test('a subscription reconnects after a server restart and resumes where it stopped', async () => {
  const s = await server();
  servers.push(s);
  // The reconnect waits at a gate, so the run below happens while the
  // subscription is disconnected: only Last-Event-ID can bring it back.
  let calls = 0;
  const gate = deferred();
  const reconnecting = deferred();
  const sentIds = [];
  const fetchGated = async (url, init) => {
    calls += 1;
    sentIds.push(init.headers['last-event-id']);
    if (calls > 1) {
      reconnecting.resolve();
      await gate.promise;
    }
    return fetch(url, init);
  };
  const client = new DocketClient({ url: s.url, token: s.token, fetch: fetchGated });
  const sub = client.events({ job: 'noop', lastEventId: 0, reconnectDelayMs: 0 });
  const before = (await s.client.trigger('noop', 'before')).run;
  const iter = sub[Symbol.asyncIterator]();
  const seen = [];
  while (!completed(before.id)(seen)) seen.push((await iter.next()).value);

  await s.stop();
  // Pulling the next event drives the reconnect (to the gate).
  const next = iter.next();
  await reconnecting.promise;
  const again = await startDocket({ db: s.db, addr: s.addr, args: ['--demo-jobs'] });
  servers.push({ close: () => again.stop() });
  const during = (await s.client.trigger('noop', 'during')).run;
  await s.client.waitForRun(during.id, { timeoutMs: 20_000 });
  gate.resolve();
  const resumed = [(await next).value];
  while (!completed(during.id)(resumed)) resumed.push((await iter.next()).value);
  sub.close();
  assert.equal(sentIds[1], String(seen.at(-1).id), 'the reconnect sent the last id seen');
  assert.ok(resumed.every((e) => e.id > seen.at(-1).id), 'no repeats');
  assert.ok(resumed.every((e) => e.run_id === during.id));
  assert.equal(resumed[0].kind, 'run_triggered');
});

test('a refused subscription throws instead of reconnecting', async () => {
  const s = await server();
  servers.push(s);
  const sub = s.client.events({ runId: 'not-a-run-id' });
  await assert.rejects(
    (async () => {
      for await (const _ of sub);
    })(),
    (e) => e instanceof DocketApiError && e.status === 400 && e.code === 'invalid_parameter',
  );
});
