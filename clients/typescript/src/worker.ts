/**
 * A remote worker over Docket's worker protocol (v1, see
 * docs/WORKER_PROTOCOL.md): it claims runs of its jobs, runs their
 * handlers, heartbeats their leases and reports each attempt's end. The
 * server decides everything else: retries, fencing, evidence.
 */

import { DocketApiError, DocketError, classify, type ErrorClass } from './errors.js';
import type { ClientOptions } from './client.js';
import type { components } from './generated/api.js';

const PREFIX = '/api/worker/v1';

/** A run as the claim hands it to the worker (from the OpenAPI document). */
export type ClaimedRun = components['schemas']['ClaimedRunView'];

/** What a reconcile function found out about an action whose outcome was unknown. */
export type ReconcileResult =
  /** The effect landed: its result (the action is committed without repeating it). */
  | { found: 'committed'; result: unknown }
  /** The effect did not happen: run the action now. */
  | { found: 'not_done' }
  /** The service cannot tell yet: the attempt fails `timeout`, retried by policy. */
  | { found: 'still_unknown' };

/** Options of `ctx.action`. */
export interface ActionOptions<T> {
  /**
   * Asks the service whether the effect with `key` landed, when a previous
   * attempt left it unknown (a timeout, a crash mid-call). Without it such
   * an action fails `permanent` for an operator to check.
   */
  reconcile?: (key: string) => Promise<ReconcileResult | { found: 'committed'; result: T }>;
}

/** An operator's answer to `ctx.waitForInput`. */
export interface InputDecision<T = unknown> {
  /** `approved` or `rejected`. */
  decision: 'approved' | 'rejected';
  /** The operator's data. */
  data: T;
}

/** What a handler gets: the run's facts and its durable operations. */
export interface JobContext {
  /** The run's id. */
  readonly runId: string;
  /** The job's name. */
  readonly job: string;
  /** The tenant. */
  readonly tenant: string;
  /** The attempt, 1-based. */
  readonly attempt: number;
  /** The trigger's idempotency key, if any. */
  readonly idempotencyKey: string | null;
  /** The correlation id (the run id when none was given). */
  readonly correlationId: string;
  /** The run's variables (merged by operator retries). */
  readonly variables: Record<string, unknown>;
  /** When the handler should be done (claim + the job's timeout). */
  readonly deadline: Date;
  /**
   * Aborted when the attempt must stop: its lease was lost, the run was
   * cancelled, the deadline passed, or the worker is shutting down hard.
   * Pass it to `fetch` so calls stop too.
   */
  readonly signal: AbortSignal;
  /**
   * An operator cancelled the run: the next `step` or `action` stops the
   * handler (the run ends `cancelled`). Long loops may check it.
   */
  readonly cancelRequested: boolean;
  /**
   * A durable step: its result is stored once; later attempts of the run
   * get it back without running `fn` again. Names are unique within an
   * attempt. A skipped step (by an operator) answers `undefined`.
   */
  step<T>(name: string, fn: () => T | Promise<T>): Promise<T>;
  /**
   * A side effect guarded by `key` (from business intent, e.g.
   * `order-42/charge`) and the ledger: done at most once across attempts,
   * runs and workers. `fn` gets the key to send to the service (e.g. as
   * `Idempotency-Key`).
   */
  action<T>(name: string, key: string, fn: (key: string) => T | Promise<T>, options?: ActionOptions<T>): Promise<T>;
  /**
   * Waits for an operator's approve/reject: the attempt ends
   * `needs_input` (no retry budget spent) and the handler runs again once
   * decided; then this returns the decision.
   */
  waitForInput<T = unknown>(name: string, request?: unknown): Promise<InputDecision<T>>;
  /** Ends the attempt `postponed` until an instant or for `ms` milliseconds (no retry budget spent). */
  postpone(until: Date | number): never;
  /** Appends a `log` event to the run. Never log secrets. */
  log(message: string, data?: unknown, level?: 'debug' | 'info' | 'warn' | 'error'): Promise<void>;
  /** Appends a `progress` event. */
  progress(current: number, total?: number, message?: string): Promise<void>;
}

/** A job's handler. */
export type Handler = (ctx: JobContext, input: any) => unknown | Promise<unknown>;

/** Options of {@link createWorker}. */
export interface WorkerOptions extends ClientOptions {
  /** The handlers by job name (each declared `remote = true` on the server). */
  jobs: Record<string, Handler>;
  /** This worker's name (default `HOST-PID`, letters, digits, `-_.@`). */
  name?: string;
  /** Handlers running at once (default 4). */
  concurrency?: number;
  /** Longest claim long poll in ms (default 20 000). */
  claimWaitMs?: number;
  /** Start claiming at once (default true); otherwise call `start()`. */
  autoStart?: boolean;
  /** Stop gracefully on SIGTERM and SIGINT (default true in Node). */
  handleSignals?: boolean;
  /** Milliseconds running handlers get to finish at shutdown (default 30 000). */
  shutdownGraceMs?: number;
  /** Called with failures of the worker's own calls (claim, heartbeat, end). */
  onError?: (err: unknown) => void;
}

/** A running worker. */
export interface Worker {
  /** Its name. */
  readonly name: string;
  /** Starts claiming (a no-op when started). */
  start(): Promise<void>;
  /**
   * Stops claiming and waits (at most `graceMs`) for running handlers to
   * end their attempts; handlers still running then are aborted (their
   * leases expire and the server retries them by policy).
   */
  stop(graceMs?: number): Promise<void>;
  /** Runs in progress. */
  readonly running: number;
  /** Resolves when the worker has stopped. */
  readonly stopped: Promise<void>;
}

/** Ends the handler without reporting: the server already ended the attempt. */
class AttemptEnded extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'AttemptEnded';
  }
}

/** Thrown at a step boundary after an operator's cancel. */
class Cancelled extends Error {
  constructor() {
    super('the run was cancelled by an operator: stopped at a step boundary');
    this.name = 'Cancelled';
  }
}

/** Thrown by `ctx.postpone`. */
class Postpone extends Error {
  constructor(readonly until: Date) {
    super(`postponed until ${until.toISOString()}`);
    this.name = 'Postpone';
  }
}

/** Thrown by `ctx.waitForInput` when no decision is stored yet. */
class NeedsInput extends Error {
  constructor(
    readonly inputName: string,
    readonly request: unknown,
  ) {
    super(`waiting for input \`${inputName}\``);
    this.name = 'NeedsInput';
  }
}

interface ErrorJson {
  class: ErrorClass;
  message: string;
  retry_after_ms?: number | null;
  action?: string | null;
  key?: string | null;
}

function errorFromJson(e: ErrorJson | undefined, fallback: string): DocketError {
  const ra = e?.retry_after_ms;
  return new DocketError(e?.class ?? 'permanent', e?.message ?? fallback, {
    retryAfter: typeof ra === 'number' ? ra : undefined,
  });
}

function defaultName(): string {
  const host = (globalThis as any).process?.env?.HOSTNAME || 'worker';
  const pid = (globalThis as any).process?.pid ?? Math.floor(Math.random() * 1e6);
  return `${host}-${pid}`.replace(/[^A-Za-z0-9_.@-]/g, '-').slice(0, 100);
}

function delay(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}

/** The worker protocol's calls, with retries of `unavailable` and network failures. */
class Protocol {
  private readonly url: string;
  private readonly headers: Record<string, string>;
  private readonly fetchFn: typeof fetch;

  constructor(o: ClientOptions) {
    this.url = o.url.replace(/\/+$/, '');
    this.headers = { 'content-type': 'application/json', accept: 'application/json' };
    if (o.token) this.headers.authorization = `Bearer ${o.token}`;
    if (o.tenant) this.headers['x-tenant-id'] = o.tenant;
    this.fetchFn = o.fetch ?? ((...a) => globalThis.fetch(...a));
  }

  /**
   * One call. A 503 or a network failure is retried with backoff (every
   * call is fenced by its lease, so a repeat is applied once or refused);
   * other errors throw {@link DocketApiError}.
   */
  async call<T>(path: string, body: unknown, signal?: AbortSignal, tries = 5): Promise<T> {
    let wait = 200;
    for (let i = 1; ; i++) {
      let res: Response;
      try {
        res = await this.fetchFn(`${this.url}${PREFIX}${path}`, {
          method: 'POST',
          headers: this.headers,
          body: JSON.stringify(body),
          signal,
        });
      } catch (err) {
        if (signal?.aborted || i >= tries) throw err;
        await delay(wait, signal);
        wait *= 2;
        continue;
      }
      const text = await res.text();
      let data: unknown = text;
      try {
        data = text === '' ? {} : JSON.parse(text);
      } catch {
        // kept as text
      }
      if (res.status === 503 && i < tries) {
        await delay(wait, signal);
        wait *= 2;
        continue;
      }
      if (res.status >= 400) throw new DocketApiError(res.status, data, `POST ${PREFIX}${path}: HTTP ${res.status}`);
      return data as T;
    }
  }
}

/** One attempt being run. */
class Attempt {
  readonly abort = new AbortController();
  /**
   * An operator cancelled the run (learnt from the claim, a heartbeat or a
   * step's completion): the next step or action stops the handler.
   */
  cancelRequested = false;
  private readonly steps = new Set<string>();
  private readonly base: string;

  constructor(
    readonly run: ClaimedRun,
    private readonly proto: Protocol,
  ) {
    this.base = `/runs/${encodeURIComponent(run.run_id)}`;
    this.cancelRequested = run.cancel_requested;
  }

  private async call<T>(what: string, body: Record<string, unknown>): Promise<T> {
    try {
      return await this.proto.call<T>(`${this.base}/${what}`, { lease_id: this.run.lease_id, ...body });
    } catch (e) {
      if (e instanceof DocketApiError && (e.code === 'stale_lease' || e.status === 404)) {
        // The lease is gone: the server refused and recorded the write;
        // nothing this attempt does can land any more.
        this.abort.abort(e);
        throw new AttemptEnded(e.message);
      }
      throw e;
    }
  }

  private ended(answer: { attempt_ended?: boolean; decision?: string; message?: string; status?: string }): void {
    if (answer.attempt_ended || answer.decision === 'deferred' || answer.decision === 'cancelled') {
      const why = answer.message ?? `the server ended the attempt (${answer.decision ?? answer.status})`;
      this.abort.abort(new AttemptEnded(why));
      throw new AttemptEnded(why);
    }
  }

  /** Stops the handler at a step boundary once a cancel is known. */
  private boundary(): void {
    if (this.cancelRequested) throw new Cancelled();
  }

  private uniqueStep(name: string): void {
    if (typeof name !== 'string' || name === '') throw new DocketError('permanent', 'a step name must be non-empty text');
    if (this.steps.has(name)) {
      throw new DocketError('permanent', `step \`${name}\` is used twice in one attempt: build unique names (e.g. batch-3)`);
    }
    this.steps.add(name);
  }

  context(): JobContext {
    const a = this;
    const r = this.run;
    return {
      runId: r.run_id,
      job: r.job,
      tenant: r.tenant,
      attempt: r.attempt,
      idempotencyKey: r.idempotency_key ?? null,
      correlationId: r.correlation_id ?? r.run_id,
      variables: (r.variables ?? {}) as Record<string, unknown>,
      deadline: new Date(r.deadline),
      signal: this.abort.signal,

      get cancelRequested() {
        return a.cancelRequested;
      },

      async step<T>(name: string, fn: () => T | Promise<T>): Promise<T> {
        a.boundary();
        a.uniqueStep(name);
        const got = await a.call<{ found: boolean; status?: string; result?: T; attempt_ended?: boolean }>('steps/get', { name });
        a.ended(got);
        if (got.found) return (got.status === 'skipped' ? undefined : got.result) as T;
        let value: T;
        try {
          value = await fn();
        } catch (err) {
          if (!(err instanceof AttemptEnded)) {
            const c = classify(err);
            await a.call('steps/fail', { name, error: { class: c.errorClass, message: c.message } }).catch(() => {});
          }
          throw err;
        }
        const done = await a.call<{ cancel_requested?: boolean; attempt_ended?: boolean }>('steps/complete', {
          name,
          result: value === undefined ? null : value,
        });
        a.ended(done);
        if (done.cancel_requested) a.cancelRequested = true;
        return value;
      },

      async action<T>(name: string, key: string, fn: (key: string) => T | Promise<T>, options: ActionOptions<T> = {}): Promise<T> {
        a.boundary();
        a.uniqueStep(name);
        type Answer = { decision: string; result?: T; error?: ErrorJson; message?: string; attempt_ended?: boolean };
        let ans = await a.call<Answer>('actions/begin', { name, key });
        a.ended(ans);
        if (ans.decision === 'replay' || ans.decision === 'committed') return ans.result as T;
        if (ans.decision === 'skipped') return undefined as T;
        if (ans.decision === 'reconcile') {
          let found: Record<string, unknown>;
          if (!options.reconcile) {
            found = { found: 'no_reconcile' };
          } else {
            try {
              const f = await options.reconcile(key);
              found = f.found === 'committed' ? { found: 'committed', result: f.result ?? null } : { found: f.found };
            } catch (err) {
              const c = classify(err);
              found = { found: 'error', error: { class: c.errorClass, message: c.message } };
            }
          }
          ans = await a.call<Answer>('actions/reconciled', { name, key, ...found });
          a.ended(ans);
          if (ans.decision === 'done') return ans.result as T;
          if (ans.decision === 'failed') throw errorFromJson(ans.error, `action \`${name}\` failed`);
          // `run`: the service never got it; send it now.
        }
        let value: T;
        try {
          value = await fn(key);
        } catch (err) {
          if (err instanceof AttemptEnded) throw err;
          const c = classify(err);
          const error: Record<string, unknown> = { class: c.errorClass, message: c.message };
          if (c.retryAfterMs !== undefined) error.retry_after_ms = c.retryAfterMs;
          const f = await a.call<Answer>('actions/fail', { name, key, error });
          a.ended(f);
          const e = errorFromJson(f.error, c.message);
          // The server keeps the handler's Retry-After; carry it to `end`.
          throw c.retryAfterMs !== undefined && e.retryAfterMs === undefined
            ? new DocketError(e.errorClass, e.message, { retryAfter: c.retryAfterMs })
            : e;
        }
        const c = await a.call<Answer>('actions/commit', { name, key, result: value === undefined ? null : value });
        a.ended(c);
        if (c.decision === 'failed') throw errorFromJson(c.error, `action \`${name}\` could not be stored`);
        return value;
      },

      async waitForInput<T>(name: string, request: unknown = null): Promise<InputDecision<T>> {
        const got = await a.call<{ found: boolean; result?: InputDecision<T>; attempt_ended?: boolean }>('steps/get', {
          name: `input:${name}`,
        });
        a.ended(got);
        if (got.found && got.result) return got.result;
        throw new NeedsInput(name, request);
      },

      postpone(until: Date | number): never {
        throw new Postpone(typeof until === 'number' ? new Date(Date.now() + until) : until);
      },

      async log(message: string, data: unknown = null, level: 'debug' | 'info' | 'warn' | 'error' = 'info'): Promise<void> {
        await a.call('log', { level, message, data });
      },

      async progress(current: number, total?: number, message?: string): Promise<void> {
        const body: Record<string, unknown> = { current };
        if (total !== undefined) body.total = total;
        if (message !== undefined) body.message = message;
        await a.call('progress', body);
      },
    };
  }

  /** Runs the handler and reports the attempt's end (once). */
  async execute(handler: Handler): Promise<void> {
    const ctx = this.context();
    let end: Record<string, unknown>;
    const deadlineMs = new Date(this.run.deadline).getTime() - Date.now();
    const timer = setTimeout(
      () => this.abort.abort(new DocketError('timeout', `job timeout of ${this.run.timeout_ms} ms passed`)),
      Math.max(0, deadlineMs),
    );
    try {
      const output = await Promise.race([
        Promise.resolve().then(() => handler(ctx, this.run.input)),
        new Promise<never>((_, reject) => {
          const onAbort = () => reject(this.abort.signal.reason);
          if (this.abort.signal.aborted) onAbort();
          else this.abort.signal.addEventListener('abort', onAbort, { once: true });
        }),
      ]);
      end = { outcome: 'completed', output: output === undefined ? null : output };
    } catch (err) {
      if (err instanceof AttemptEnded) return;
      if (err instanceof Postpone) {
        end = { outcome: 'postponed', until: err.until.toISOString() };
      } else if (err instanceof Cancelled) {
        // The server ends a run whose cancel was requested `cancelled`,
        // whatever the outcome says; this one records why the handler stopped.
        end = { outcome: 'failed', error: { class: 'permanent', message: err.message } };
      } else if (err instanceof NeedsInput) {
        end = { outcome: 'needs_input', name: err.inputName, request: err.request ?? null };
      } else {
        const c = classify(err);
        const error: Record<string, unknown> = { class: c.errorClass, message: c.message.slice(0, 4000) };
        if (c.retryAfterMs !== undefined) error.retry_after_ms = c.retryAfterMs;
        end = { outcome: 'failed', error };
      }
    } finally {
      clearTimeout(timer);
    }
    if (this.abort.signal.aborted && this.abort.signal.reason instanceof AttemptEnded) return;
    try {
      await this.call('end', end);
    } catch (err) {
      if (!(err instanceof AttemptEnded)) throw err;
    }
  }
}

/**
 * Starts a worker for `jobs` (at once, unless `autoStart: false`).
 *
 * ```ts
 * const worker = createWorker({
 *   url: 'http://127.0.0.1:7878', token: process.env.DOCKET_WORKER_TOKEN,
 *   jobs: {
 *     'send-welcome': async (ctx, input) => {
 *       const user = await ctx.step('load-user', () => db.user(input.userId))
 *       return ctx.action('send-email', `welcome/${user.id}`, (key) => mail.send(user, key))
 *     },
 *   },
 * })
 * ```
 */
export function createWorker(options: WorkerOptions): Worker {
  const jobs = Object.keys(options.jobs);
  if (jobs.length === 0) throw new TypeError('createWorker: `jobs` names no handler');
  const name = options.name ?? defaultName();
  const concurrency = Math.max(1, Math.floor(options.concurrency ?? 4));
  const proto = new Protocol(options);
  const onError = options.onError ?? ((e: unknown) => console.error('[docket worker]', e));
  const attempts = new Map<string, Attempt>();
  const inFlight = new Set<Promise<void>>();
  const stopClaiming = new AbortController();
  let started = false;
  let loop: Promise<void> | undefined;
  let heartbeat: ReturnType<typeof setInterval> | undefined;
  let heartbeatMs = 10_000;
  let resolveStopped!: () => void;
  const stopped = new Promise<void>((r) => (resolveStopped = r));
  let freed: (() => void) | undefined;
  const signals: Array<[string, () => void]> = [];

  async function beat(): Promise<void> {
    if (attempts.size === 0) return;
    const held = [...attempts.values()];
    try {
      const ans = await proto.call<{ leases: Array<{ run_id: string; lease_id: string; held: boolean; cancel_requested?: boolean }> }>(
        '/heartbeat',
        { worker: name, leases: held.map((a) => ({ run_id: a.run.run_id, lease_id: a.run.lease_id })) },
      );
      for (const l of ans.leases ?? []) {
        const a = attempts.get(l.lease_id);
        if (a && !l.held) a.abort.abort(new AttemptEnded(`lease ${l.lease_id} was lost`));
        if (a && l.cancel_requested) a.cancelRequested = true;
      }
    } catch (e) {
      onError(e);
    }
  }

  function schedule(run: ClaimedRun): void {
    const handler = options.jobs[run.job];
    const a = new Attempt(run, proto);
    attempts.set(run.lease_id, a);
    if (run.heartbeat_ms > 0 && run.heartbeat_ms < heartbeatMs) {
      heartbeatMs = run.heartbeat_ms;
      if (heartbeat) clearInterval(heartbeat);
      heartbeat = setInterval(() => void beat(), heartbeatMs);
    }
    const go = handler
      ? a.execute(handler)
      : Promise.reject(new Error(`no handler for job ${run.job}`));
    const done = go.catch(onError).finally(() => {
      attempts.delete(run.lease_id);
      inFlight.delete(done);
      freed?.();
    });
    inFlight.add(done);
  }

  async function claimLoop(): Promise<void> {
    let backoff = 200;
    while (!stopClaiming.signal.aborted) {
      const free = concurrency - attempts.size;
      if (free <= 0) {
        await new Promise<void>((r) => {
          freed = r;
          stopClaiming.signal.addEventListener('abort', () => r(), { once: true });
        });
        freed = undefined;
        continue;
      }
      try {
        const ans = await proto.call<{ runs: ClaimedRun[] }>(
          '/claim',
          { worker: name, jobs, max: free, wait_ms: options.claimWaitMs ?? 20_000 },
          stopClaiming.signal,
          1,
        );
        backoff = 200;
        for (const run of ans.runs ?? []) schedule(run);
      } catch (e) {
        if (stopClaiming.signal.aborted) break;
        if (e instanceof DocketApiError && (e.status === 401 || e.status === 403 || e.status === 422)) {
          // Will not heal by retrying: a wrong token, scope or job list.
          onError(e);
          break;
        }
        onError(e);
        await delay(backoff, stopClaiming.signal);
        backoff = Math.min(backoff * 2, 5_000);
      }
    }
  }

  async function start(): Promise<void> {
    if (started) return;
    started = true;
    heartbeat = setInterval(() => void beat(), heartbeatMs);
    const proc = (globalThis as any).process;
    if ((options.handleSignals ?? true) && proc?.on) {
      for (const sig of ['SIGTERM', 'SIGINT']) {
        const h = () => void stop();
        proc.once(sig, h);
        signals.push([sig, h]);
      }
    }
    loop = claimLoop();
    loop.catch(onError);
  }

  let stopping: Promise<void> | undefined;
  function stop(graceMs = options.shutdownGraceMs ?? 30_000): Promise<void> {
    stopping ??= (async () => {
      stopClaiming.abort();
      await loop?.catch(() => {});
      // Running handlers get the grace period to end their attempts.
      const grace = new AbortController();
      await Promise.race([Promise.allSettled([...inFlight]), delay(graceMs, grace.signal)]);
      grace.abort();
      for (const a of attempts.values()) a.abort.abort(new AttemptEnded('worker stopped'));
      if (heartbeat) clearInterval(heartbeat);
      const proc = (globalThis as any).process;
      for (const [sig, h] of signals) proc?.off?.(sig, h);
      resolveStopped();
    })();
    return stopping;
  }

  const worker: Worker = {
    name,
    start,
    stop,
    get running() {
      return attempts.size;
    },
    stopped,
  };
  if (options.autoStart ?? true) void start();
  return worker;
}
