// Units without a server: the SSE parser, error classes.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseSse, DocketError, DocketApiError, classify, ERROR_CLASSES } from '@docket/client';

function stream(chunks) {
  const enc = new TextEncoder();
  return new ReadableStream({
    start(c) {
      for (const ch of chunks) c.enqueue(enc.encode(ch));
      c.close();
    },
  });
}

async function all(chunks) {
  const out = [];
  for await (const m of parseSse(stream(chunks))) out.push(m);
  return out;
}

test('SSE: fields, multi-line data, comments, CRLF and messages split across chunks', async () => {
  const got = await all([
    ': keep-alive\n\n',
    'id: 7\nevent: run_completed\ndata: {"a":\n',
    'data: 1}\n\n',
    'id: 8\r\nevent: progress\r',
    '\ndata: x\r\n\r\n',
    'retry: 2500\ndata: y\n\n',
    'data: no end',
  ]);
  assert.deepEqual(got, [
    { id: '7', event: 'run_completed', data: '{"a":\n1}', retry: undefined },
    { id: '8', event: 'progress', data: 'x', retry: undefined },
    { id: undefined, event: 'message', data: 'y', retry: 2500 },
  ]);
});

test('DocketError carries its class and retryAfter (ms or a Date)', () => {
  const e = new DocketError('rate_limited', 'quota', { retryAfter: 30_000 });
  assert.equal(e.errorClass, 'rate_limited');
  assert.equal(e.retryAfterMs, 30_000);
  const at = new DocketError('unavailable', 'later', { retryAfter: new Date(Date.now() + 60_000) });
  assert.ok(at.retryAfterMs > 59_000 && at.retryAfterMs <= 60_000);
  assert.throws(() => new DocketError('flaky', 'x'), /unknown error class `flaky`/);
  assert.equal(ERROR_CLASSES.length, 12);
});

test('classify: DocketError, timeouts, fetch network failures, anything else permanent', () => {
  assert.deepEqual(classify(new DocketError('duplicate', 'done')), { errorClass: 'duplicate', message: 'done', retryAfterMs: undefined });
  assert.equal(classify(new DOMException('timed out', 'TimeoutError')).errorClass, 'timeout');
  assert.equal(classify(new TypeError('fetch failed', { cause: new Error('ECONNREFUSED') })).errorClass, 'network');
  assert.equal(classify(new Error('boom')).errorClass, 'permanent');
  assert.equal(classify('text').message, 'text');
});

test('DocketApiError reads the API envelope', () => {
  const e = new DocketApiError(409, { error: { code: 'wrong_state', message: 'run is completed', current_status: 'completed' } }, 'x');
  assert.equal(e.code, 'wrong_state');
  assert.equal(e.currentStatus, 'completed');
  assert.equal(e.message, 'run is completed');
  const bare = new DocketApiError(502, '<html>', 'GET /api/runs: HTTP 502');
  assert.equal(bare.code, 'http_502');
  assert.equal(bare.message, 'GET /api/runs: HTTP 502');
});
