// W1 drain with a TypeScript worker over the worker protocol, next to the
// in-process Rust worker (`docket bench W1`) of the same binary:
//
//   node scripts/bench-w1.mjs [--runs 10000] [--concurrency 8]
//
// Enqueues the runs of a no-op remote job in batches of 1,000 (SQLite file
// in a temporary directory), then drains them with one worker in this
// process; prints enqueue and processed runs/s, then runs `docket bench W1`
// with the same numbers and prints the ratio.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { DocketClient, createWorker } from '@docket/client';
import { startDocket, createToken, tempDir, docketBin } from './docket.mjs';

const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i < 0 ? dflt : Number(process.argv[i + 1]);
};
const runs = arg('runs', 10_000);
const concurrency = arg('concurrency', 8);

const tmp = tempDir();
const db = join(tmp.dir, 'docket.db');
const config = join(tmp.dir, 'docket.toml');
writeFileSync(config, '[jobs.w1]\nremote = true\n');
const operator = createToken(db, 'bench', 'bench');
const workerToken = createToken(db, 'bench', 'bench-worker', 'worker');
const server = await startDocket({ db, args: ['--config', config], env: { DOCKET_LOG: 'warn,docket_server=info,docket_server::http=warn' } });
try {
  const client = new DocketClient({ url: server.url, token: operator });
  let t0 = performance.now();
  for (let i = 0; i < runs; i += 1000) {
    const n = Math.min(1000, runs - i);
    await client.triggerBatch(Array.from({ length: n }, (_, j) => ({ job: 'w1', input: { i: i + j } })));
  }
  const enqueue = runs / ((performance.now() - t0) / 1000);
  let done = 0;
  let finished;
  const all = new Promise((r) => (finished = r));
  t0 = performance.now();
  const worker = createWorker({
    url: server.url,
    token: workerToken,
    concurrency,
    handleSignals: false,
    jobs: {
      w1: () => {
        // Counted when the handler returns; the last `end` is awaited below.
        if (++done === runs) finished();
        return null;
      },
    },
  });
  await all;
  await worker.stop();
  const processed = runs / ((performance.now() - t0) / 1000);
  const counts = (await client.jobs()).find((j) => j.name === 'w1').runs;
  if (counts.completed !== runs) throw new Error(`not all runs completed: ${JSON.stringify(counts)}`);
  const rust = JSON.parse(
    execFileSync(docketBin(), ['bench', 'W1', '--runs', String(runs), '--concurrency', String(concurrency), '--json'], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
    })
      .trim()
      .split('\n')
      .at(-1),
  );
  const rustProcessed = rust.processed_runs_per_s ?? rust.processed_per_s ?? rust.runs_per_s;
  console.log(JSON.stringify({ runs, concurrency, ts_enqueue_runs_per_s: Math.round(enqueue), ts_processed_runs_per_s: Math.round(processed), rust: rust }));
  if (rustProcessed) console.log(`TypeScript worker over HTTP: ${Math.round(processed)} runs/s; in-process Rust: ${Math.round(rustProcessed)} runs/s; ratio ${(processed / rustProcessed).toFixed(3)}`);
} finally {
  await server.stop();
  tmp.remove();
}
