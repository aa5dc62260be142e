// Bundles a page with esbuild and serves it on a loopback port, passing
// /api, /healthz and /metrics through to a Docket server (same origin: the
// page needs no CORS). Used by the browser test and the example.

import { createServer, request } from 'node:http';
import { build } from 'esbuild';

/**
 * Serves `entry` (a .jsx file) bundled at `/app.js` inside a bare HTML page
 * titled `title`; everything under /api goes to `upstream`. Answers `{ url,
 * close }`.
 */
export async function servePage({ entry, upstream, title = 'Docket' }) {
  const out = await build({
    entryPoints: [entry],
    bundle: true,
    write: false,
    format: 'esm',
    jsx: 'automatic',
    target: 'es2022',
    define: { 'process.env.NODE_ENV': '"development"' },
    logLevel: 'silent',
  });
  const js = out.outputFiles[0].text;
  const html = `<!doctype html><html><head><meta charset="utf-8"><title>${title}</title>
<style>body{font:14px system-ui;margin:2em}li{margin:.3em 0}button{margin-left:.4em}.error{color:#b00}</style>
</head><body><div id="root"></div><script type="module" src="/app.js"></script></body></html>`;
  const target = new URL(upstream);
  const srv = createServer((req, res) => {
    if (req.url === '/' || req.url.startsWith('/?')) {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      return res.end(html);
    }
    if (req.url === '/favicon.ico') {
      res.writeHead(204);
      return res.end();
    }
    if (req.url === '/app.js') {
      res.writeHead(200, { 'content-type': 'text/javascript; charset=utf-8' });
      return res.end(js);
    }
    const up = request(
      { host: target.hostname, port: target.port, path: req.url, method: req.method, headers: { ...req.headers, host: target.host } },
      (upRes) => {
        res.writeHead(upRes.statusCode ?? 502, upRes.headers);
        upRes.pipe(res);
      },
    );
    up.on('error', () => {
      if (!res.headersSent) res.writeHead(502, { 'content-type': 'application/json' });
      res.end('{"error":{"code":"unavailable","message":"Docket server not reachable"}}');
    });
    req.pipe(up);
  });
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address();
  return {
    url: `http://127.0.0.1:${port}`,
    server: srv,
    close: () =>
      new Promise((r) => {
        srv.closeAllConnections();
        srv.close(() => r());
      }),
  };
}
