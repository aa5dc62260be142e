// Starts a real `docket serve` for the generator and the tests.
//
// The binary: $DOCKET_BIN, else $CARGO_TARGET_DIR/debug/docket, else the
// workspace's target/debug/docket (built by `cargo build -p docket-cli`).
// A missing binary is an error, never a skip.

import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

const here = dirname(fileURLToPath(import.meta.url));
const workspace = resolve(here, '../../..');

/** The `docket` binary to run. */
export function docketBin() {
  const candidates = [
    process.env.DOCKET_BIN,
    process.env.CARGO_TARGET_DIR && join(process.env.CARGO_TARGET_DIR, 'debug', 'docket'),
    join(workspace, 'target', 'debug', 'docket'),
  ].filter(Boolean);
  const found = candidates.find((p) => existsSync(p));
  if (!found) {
    throw new Error(
      `no docket binary (looked at ${candidates.join(', ')}): run \`cargo build -p docket-cli\` or set DOCKET_BIN`,
    );
  }
  return found;
}

/** A fresh temporary directory (removed by the returned function). */
export function tempDir() {
  const dir = mkdtempSync(join(tmpdir(), 'docket-ts-'));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** `docket token create`; answers the token text (`dkt_…`). */
export function createToken(db, tenant, name, scope) {
  const args = ['token', 'create', '--tenant', tenant, '--name', name, '--db', db];
  if (scope) args.push('--scope', scope);
  const out = execFileSync(docketBin(), args, {
    encoding: 'utf8',
    env: { ...process.env, DOCKET_DB: '' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const m = out.match(/dkt_[0-9a-f]{64}/);
  if (!m) throw new Error(`no token in the output of docket ${args.join(' ')}: ${out}`);
  return m[0];
}

/**
 * Starts `docket serve` on a loopback port (127.0.0.1:0 unless `addr`),
 * answers once it logged its address (at most 30 s): `{ url, addr, stop,
 * logs }`. `stop()` sends SIGTERM and waits for the exit.
 */
export async function startDocket({ db, addr = '127.0.0.1:0', args = [], env = {} } = {}) {
  const child = spawn(docketBin(), ['serve', '--db', db ?? 'sqlite::memory:', '--addr', addr, ...args], {
    env: { ...process.env, DOCKET_LOG: 'info', DOCKET_DB: '', ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const logs = [];
  const exited = new Promise((r) => child.once('exit', (code, signal) => r({ code, signal })));
  const lines = createInterface({ input: child.stderr });
  const url = await new Promise((resolveUrl, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`docket serve did not log its address within 30 s:\n${logs.join('\n')}`));
    }, 30_000);
    lines.on('line', (line) => {
      logs.push(line);
      const m = line.match(/docket API listening.*addr=(\S+)/);
      if (m) {
        clearTimeout(timer);
        resolveUrl(`http://${m[1]}`);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`docket serve exited (${code ?? signal}) before listening:\n${logs.join('\n')}`));
    });
  });
  return {
    url,
    addr: url.slice('http://'.length),
    logs,
    child,
    /** SIGTERM, then the exit (SIGKILL after `graceMs`). */
    async stop(graceMs = 20_000) {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), graceMs);
      const r = await exited;
      clearTimeout(t);
      return r;
    },
  };
}
