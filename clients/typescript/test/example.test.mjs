// The example (examples/worker.mjs with examples/docket.toml) against a
// real server: the flaky notification is retried by the job's policy, the
// stored steps are not redone, the effect happens once; a broken file fails
// at once for an operator.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { DocketClient } from '@docket/client';
import { tempDir, createToken, startDocket } from './helpers.mjs';

const examples = fileURLToPath(new URL('../examples/', import.meta.url));
let tmp, server, client, worker;
before(async () => {
  tmp = tempDir();
  const db = join(tmp.dir, 'docket.db');
  const operator = createToken(db, 'example', 'page');
  const workerToken = createToken(db, 'example', 'worker', 'worker');
  server = await startDocket({ db, args: ['--config', join(examples, 'docket.toml')] });
  client = new DocketClient({ url: server.url, token: operator });
  worker = spawn(process.execPath, [join(examples, 'worker.mjs')], {
    env: { ...process.env, DOCKET_URL: server.url, DOCKET_WORKER_TOKEN: workerToken },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
});
after(async () => {
  worker?.kill('SIGKILL');
  await server?.stop();
  tmp?.remove();
});

test('the import completes on the retry the policy scheduled, notifying once', async () => {
  const { run } = await client.trigger('import-csv', { filename: 'data.csv' });
  const r = await client.waitForRun(run.id, { timeoutMs: 30_000 });
  assert.equal(r.status, 'completed');
  assert.equal(r.attempt, 2);
  assert.equal(r.output.imported, 250);
  const d = await client.getRun(run.id);
  assert.equal(d.attempts[0].error_class, 'unavailable');
  assert.equal(d.attempts[0].retry.policy, 'import-csv');
  assert.deepEqual(
    d.ledger.map((l) => [l.idempotency_key, l.state]),
    [['import/data.csv/notify', 'committed']],
  );
  // parse and the batches ran in attempt 1 only.
  assert.ok(d.steps.filter((s) => s.name !== 'notify-owner').every((s) => s.attempt === 1), JSON.stringify(d.steps));
  assert.ok(d.events.some((e) => e.kind === 'progress'));
});

test('a broken file fails at once (invalid_input), for an operator', async () => {
  const { run } = await client.trigger('import-csv', { filename: 'broken.txt' });
  const r = await client.waitForRun(run.id, { timeoutMs: 30_000 });
  assert.equal(r.status, 'failed');
  assert.equal(r.last_error_class, 'invalid_input');
  assert.equal(r.attempt, 1);
});

test('the worker stops gracefully on SIGTERM', async () => {
  const exited = new Promise((r) => worker.once('exit', (code) => r(code)));
  worker.kill('SIGTERM');
  assert.equal(await exited, 0);
});
