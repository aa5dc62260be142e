// The React hooks in a real headless Chromium (Debian's /usr/bin/chromium,
// driven by playwright-core; nothing downloads a browser) against a real
// server: useTrigger follows its run live, useRuns lists and flags runs
// needing attention, useRunActions retries, retriggers and cancels, useRun
// shows live status and errors. Every wait is bounded.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createWorker } from '@docket/client';
import { server, createToken, tempDir, deferred } from './helpers.mjs';
import { servePage } from '../scripts/serve-page.mjs';

const WAIT = 20_000;
const executablePath = process.env.DOCKET_CHROMIUM || '/usr/bin/chromium';

// A remote job served by a TypeScript worker in this process, for
// useRun's live progress and steps.
let s, page, browser, site, worker, cfg;
const gate = { release: deferred(), reported: deferred() };
before(async () => {
  if (!existsSync(executablePath)) {
    throw new Error(`no Chromium at ${executablePath}: install Debian's chromium (.ci/run does) or set DOCKET_CHROMIUM`);
  }
  cfg = tempDir();
  const config = join(cfg.dir, 'docket.toml');
  writeFileSync(config, '[jobs.ts-progress]\nremote = true\n');
  s = await server({ args: ['--config', config] });
  worker = createWorker({
    url: s.url,
    token: createToken(s.db, 'acme', 'page-worker', 'worker'),
    handleSignals: false,
    claimWaitMs: 2000,
    jobs: {
      'ts-progress': async (ctx) => {
        await ctx.step('load', () => 'rows');
        await ctx.progress(1, 3, 'first batch');
        gate.reported.resolve();
        await gate.release.promise;
        await ctx.step('import', () => 3);
        await ctx.progress(3, 3, 'done');
        return 'imported';
      },
    },
  });
  site = await servePage({ entry: fileURLToPath(new URL('./react/app.jsx', import.meta.url)), upstream: s.url });
  browser = await chromium.launch({ executablePath, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
  page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e));
  page.on('console', (m) => {
    // The browser logs every 4xx the tests provoke on purpose; the rest is
    // a real error of the page.
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) errors.push(m.text());
  });
  page.errors = errors;
  await page.goto(`${site.url}/?token=${s.token}`);
  await page.waitForSelector('#runs[data-loading="false"]', { timeout: WAIT });
});
after(async () => {
  await worker?.stop(1000);
  await browser?.close();
  await site?.close();
  await s?.close();
  cfg?.remove();
});

const row = (id) => `li.run[data-id="${id}"]`;

test('useTrigger triggers a run and follows it live to completed', async () => {
  await page.click('#trigger-ok');
  await page.waitForSelector('#trigger[data-status="completed"]', { timeout: WAIT });
  const id = await page.textContent('#trigger-run');
  assert.match(id, /^[0-9a-f-]{36}$/);
  assert.equal(await page.textContent('#trigger-output'), JSON.stringify({ succeeded_on_attempt: 1, variables: {} }));
  // The live list shows it too (useRuns, refreshed by events).
  await page.waitForSelector(`${row(id)}[data-status="completed"]`, { timeout: WAIT });
  // The same idempotency key again: the same run, `existing`.
  await page.click('#trigger-ok');
  await page.waitForSelector('#trigger-existing:text("true")', { timeout: WAIT });
  assert.equal(await page.textContent('#trigger-run'), id);
});

test('a refused trigger shows the server code and message', async () => {
  await page.click('#trigger-unknown');
  await page.waitForSelector('#refused-code:text("unknown_job")', { timeout: WAIT });
  assert.match(await page.textContent('#refused-error'), /no-such-job/);
  assert.equal(await page.textContent('#refused-run'), '');
});

test('a failed run needs attention; Retry from the page completes it', async () => {
  await page.click('#trigger-bad');
  await page.waitForSelector('#trigger[data-status="failed"]', { timeout: WAIT });
  const id = await page.textContent('#trigger-run');
  assert.match(await page.textContent('#trigger-error'), /demo failure 1 of 1/);
  await page.waitForSelector(`${row(id)}[data-status="failed"]`, { timeout: WAIT });
  assert.equal(await page.textContent('#attention'), '1');
  assert.match(await page.textContent(`${row(id)} .error`), /demo failure/);
  await page.click(`${row(id)} button.retry`);
  await page.waitForSelector(`${row(id)}[data-status="completed"][data-live-status="completed"]`, { timeout: WAIT });
  await page.waitForSelector('#attention:text("0")', { timeout: WAIT });
  const detail = await s.client.getRun(id);
  assert.deepEqual(detail.run.variables, { from: 'page' });
  assert.equal(detail.events.find((e) => e.kind === 'operator_retry').comment, 'retried from the page');
  // A command the state forbids: the hook's error carries the server code.
  await page.click(`${row(id)} button.retry-wrong`);
  await page.waitForSelector(`${row(id)} .action-error:text("wrong_state")`, { timeout: WAIT });
});

test('Retrigger makes a new run that appears in the list; Cancel cancels a pending one', async () => {
  const { run } = await s.client.trigger('noop', { from: 'api' });
  await page.waitForSelector(`${row(run.id)}[data-status="completed"]`, { timeout: WAIT });
  await page.click(`${row(run.id)} button.retrigger`);
  await page.waitForFunction((sel) => document.querySelector(sel)?.textContent.length === 36, `${row(run.id)} .retriggered`, {
    timeout: WAIT,
  });
  const fresh = await page.textContent(`${row(run.id)} .retriggered`);
  await page.waitForSelector(`${row(fresh)}[data-status="completed"]`, { timeout: WAIT });
  assert.equal((await s.client.getRun(fresh)).run.retriggered_from, run.id);

  const later = (await s.client.trigger('noop', null, { runAfter: new Date(Date.now() + 3_600_000) })).run;
  await page.waitForSelector(`${row(later.id)}[data-status="pending"]`, { timeout: WAIT });
  await page.click(`${row(later.id)} button.cancel`);
  await page.waitForSelector(`${row(later.id)}[data-status="cancelled"][data-live-status="cancelled"]`, { timeout: WAIT });
});

test("useRun shows a TypeScript worker's progress and steps live", async () => {
  const { run } = await s.client.trigger('ts-progress', {});
  await gate.reported.promise;
  await page.waitForSelector(`${row(run.id)} .progress:text("1/3: first batch")`, { timeout: WAIT });
  assert.equal(await page.textContent(`${row(run.id)} .steps`), 'load');
  gate.release.resolve();
  await page.waitForSelector(`${row(run.id)}[data-status="completed"] .progress:text("3/3: done")`, { timeout: WAIT });
  assert.equal(await page.textContent(`${row(run.id)} .steps`), 'load,import');
});

test('a run waiting for input is approved from the page', async () => {
  const { run } = await s.client.trigger('approval', { amount: 5 });
  await page.waitForSelector(`${row(run.id)}[data-status="needs_input"]`, { timeout: WAIT });
  await page.click(`${row(run.id)} button.approve`);
  await page.waitForSelector(`${row(run.id)}[data-status="completed"]`, { timeout: WAIT });
  assert.deepEqual((await s.client.getRun(run.id)).run.output, { approved: true, data: { by: 'page' } });
  assert.deepEqual(page.errors, []);
});
