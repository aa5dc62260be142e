// A real `docket serve` (SQLite file, bearer tokens, the demo jobs) per
// test file, and tokens for it.

import { join } from 'node:path';
import { startDocket, createToken, tempDir } from '../scripts/docket.mjs';
import { DocketClient } from '@docket/client';

export { startDocket, createToken, tempDir };

/**
 * A server with the demo jobs and an operator token of tenant `acme`;
 * `extra` args go to `docket serve`. `close()` stops it and removes its
 * files.
 */
export async function server({ args = [], db } = {}) {
  const tmp = tempDir();
  const dbPath = db ?? join(tmp.dir, 'docket.db');
  // Tokens first: `docket token create` migrates the database.
  const token = createToken(dbPath, 'acme', 'sdk-test');
  const s = await startDocket({ db: dbPath, args: ['--demo-jobs', ...args] });
  const client = new DocketClient({ url: s.url, token });
  return {
    ...s,
    db: dbPath,
    dir: tmp.dir,
    token,
    client,
    async close() {
      await s.stop();
      tmp.remove();
    },
  };
}

/** Collects events from a subscription until `until(events)` holds (bounded). */
export async function collect(sub, until, timeoutMs = 20_000) {
  const got = [];
  const timer = setTimeout(() => sub.close(), timeoutMs);
  try {
    for await (const e of sub) {
      got.push(e);
      if (until(got)) break;
    }
  } finally {
    clearTimeout(timer);
  }
  if (!until(got)) {
    throw new Error(`events did not arrive within ${timeoutMs} ms; got ${JSON.stringify(got.map((e) => [e.id, e.kind]))}`);
  }
  return got;
}

/** A promise with its resolve and reject (Node 20 has no Promise.withResolvers). */
export function deferred() {
  let resolve, reject;
  const promise = new Promise((a, b) => {
    resolve = a;
    reject = b;
  });
  return { promise, resolve, reject };
}
