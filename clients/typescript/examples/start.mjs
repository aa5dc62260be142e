// One command for the example (`npm run example`): a `docket serve` with
// examples/docket.toml (SQLite file examples/.data/docket.db), tokens, the
// worker, and the React page on a loopback port. Ctrl-C stops everything.

import { mkdirSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { startDocket, createToken } from '../scripts/docket.mjs';
import { servePage } from '../scripts/serve-page.mjs';

const here = fileURLToPath(new URL('.', import.meta.url));
const data = join(here, '.data');
mkdirSync(data, { recursive: true });
const db = join(data, 'docket.db');
const tokensFile = join(data, 'tokens.json');
// Tokens are made once per database (the database keeps only their hashes).
let tokens;
if (existsSync(tokensFile) && existsSync(db)) {
  tokens = JSON.parse(readFileSync(tokensFile, 'utf8'));
} else {
  tokens = {
    operator: createToken(db, 'example', 'example-page'),
    worker: createToken(db, 'example', 'example-worker', 'worker'),
  };
  writeFileSync(tokensFile, JSON.stringify(tokens), { mode: 0o600 });
}
const docket = await startDocket({ db, addr: process.env.DOCKET_ADDR ?? '127.0.0.1:7878', args: ['--config', join(here, 'docket.toml')] });
const worker = spawn(process.execPath, [join(here, 'worker.mjs')], {
  env: { ...process.env, DOCKET_URL: docket.url, DOCKET_WORKER_TOKEN: tokens.worker },
  stdio: 'inherit',
});
const page = await servePage({ entry: join(here, 'app.jsx'), upstream: docket.url, title: 'Docket example' });
console.log(`
Docket:    ${docket.url} (dashboard: ${docket.url}/ , token ${tokens.operator})
The page:  ${page.url}/?token=${tokens.operator}
`);
let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  if (worker.exitCode === null && worker.signalCode === null) {
    worker.kill('SIGTERM');
    await new Promise((r) => worker.once('exit', r));
  }
  await page.close();
  await docket.stop();
  process.exit(0);
}
// Whichever part ends first ends the example.
docket.child.once('exit', () => void stop());
worker.once('exit', () => void stop());
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
