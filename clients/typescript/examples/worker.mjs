// The seed's TypeScript job, on Docket: steps whose results are kept, an
// idempotent side effect guarded by the ledger, a flaky service whose
// failures Docket's retry policy handles (no hand-written retry loop).
//
//   DOCKET_URL=http://127.0.0.1:7878 DOCKET_WORKER_TOKEN=dkt_… node examples/worker.mjs

import { createWorker, DocketError } from '@docket/client';

// A stand-in for the mail service: every other call answers 503,
// and it remembers idempotency keys, as a real provider would.
const delivered = new Map();
let calls = 0;
async function notifyOwner(key, summary) {
  calls += 1;
  if (calls % 2 === 1) throw new DocketError('unavailable', 'mail service answered 503');
  if (!delivered.has(key)) delivered.set(key, { messageId: `msg-${delivered.size + 1}`, summary });
  return delivered.get(key);
}

const worker = createWorker({
  url: process.env.DOCKET_URL ?? 'http://127.0.0.1:7878',
  token: process.env.DOCKET_WORKER_TOKEN,
  concurrency: 4,
  jobs: {
    'import-csv': async (ctx, input) => {
      const rows = await ctx.step('parse', () => {
        if (input.filename.includes('broken')) throw new DocketError('invalid_input', `${input.filename}: not a CSV file`);
        return Array.from({ length: 250 }, (_, i) => ({ id: i, name: `row ${i}` }));
      });
      // Batch checkpoints: a retry redoes only the batches not stored.
      let imported = 0;
      for (let i = 0; i < rows.length; i += 100) {
        imported += await ctx.step(`batch-${i}`, async () => rows.slice(i, i + 100).length);
        await ctx.progress(Math.min(i + 100, rows.length), rows.length, `imported ${imported} rows`);
      }
      // The side effect: once per file, whatever happens to this worker.
      const receipt = await ctx.action('notify-owner', `import/${input.filename}/notify`, (key) =>
        notifyOwner(key, `${imported} rows from ${input.filename}`),
      );
      await ctx.log('imported', { rows: imported, attempt: ctx.attempt });
      return { imported, receipt };
    },
  },
});
console.log(`worker ${worker.name} serving import-csv (Ctrl-C stops it gracefully)`);
