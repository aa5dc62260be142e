/**
 * The typed client of Docket's REST API. Shapes come from the server's
 * OpenAPI document (`src/generated/api.ts`, written by `npm run generate`).
 */

import type { components } from './generated/api.js';
import { DocketApiError } from './errors.js';
import { parseSse } from './sse.js';

type S = components['schemas'];
/** A run. */
export type Run = S['RunView'];
/** A run with its attempts, steps, ledger, events and timeline. */
export type RunDetail = S['RunDetail'];
/** One attempt of a run. */
export type Attempt = S['AttemptView'];
/** One stored event. */
export type DocketEvent = S['EventView'];
/** A page of runs. */
export type RunPage = S['RunPage'];
/** The answer of a trigger. */
export type TriggerResponse = S['TriggerResponse'];
/** The answer of a long poll. */
export type WaitResponse = S['WaitResponse'];
/** The registered jobs with run counts. */
export type JobList = S['JobList'];
/** The health check's answer. */
export type Health = S['Health'];
/** The seed's command envelope's answer. */
export type CommandResponse = S['CommandResponse'];

/** A remote worker seen by the server (`GET /api/workers`). */
export type WorkerInfo = S['WorkerView'];

/** A run's status. */
export type RunStatus =
  | 'pending'
  | 'running'
  | 'needs_input'
  | 'postponed'
  | 'completed'
  | 'failed'
  | 'cancelled';

/** Statuses after which a run changes only by an operator's command. */
export const TERMINAL_STATUSES: readonly RunStatus[] = ['completed', 'failed', 'cancelled'];

/** True for `completed`, `failed` and `cancelled`. */
export function isTerminal(status: string): boolean {
  return (TERMINAL_STATUSES as readonly string[]).includes(status);
}

/** How to reach the server. */
export interface ClientOptions {
  /** The server, e.g. `http://127.0.0.1:7878` (a trailing `/` is fine). */
  url: string;
  /** A bearer token (`dkt_…`); omit for `docket serve --insecure-dev-no-auth`. */
  token?: string;
  /** Sent as `X-Tenant-ID` (must be the token's tenant; without auth, picks it). */
  tenant?: string;
  /** The `fetch` to use (default: the global one). */
  fetch?: typeof fetch;
}

/** Options of a trigger. */
export interface TriggerOptions {
  /** A second trigger with this key for the same job returns the first run. */
  idempotencyKey?: string;
  /** Not before this instant. */
  runAfter?: Date | string;
  /** Higher runs first (default 0). */
  priority?: number;
  /** Carried into every attempt and event. */
  correlationId?: string;
  /**
   * Collapse this trigger with others of the same key within a window
   * (instead of the job's own debounce): `{ key?, window, keep }`, e.g.
   * `{ key: '{{ input.customer_id }}', window: '30s', keep: 'last' }`. A
   * collapsed trigger answers the existing run with `collapsed: true`.
   */
  debounce?: S['DebounceRequest'];
}

/** One run of a batch trigger. */
export interface BatchItem extends TriggerOptions {
  /** The job. */
  job: string;
  /** Its input. */
  input?: unknown;
}

/** Which runs `listRuns` answers. */
export interface RunFilter {
  /** Any of these statuses. */
  status?: RunStatus | RunStatus[];
  /** Only this job. */
  job?: string;
  /** Only `failed` and `needs_input` runs. */
  needsAttention?: boolean;
  /** Created at or after. */
  createdAfter?: Date | string;
  /** Created before. */
  createdBefore?: Date | string;
  /** 1 to 500 (default 50). */
  limit?: number;
  /** `next_cursor` of the previous page. */
  cursor?: string;
}

/** Options of one long poll. */
export interface WaitOptions {
  /** Milliseconds the server waits at most (default 30 000, at most 300 000). */
  timeoutMs?: number;
  /** `needs_input`: also answer once the run waits for an operator. */
  until?: 'terminal' | 'needs_input';
  /** Aborts the request. */
  signal?: AbortSignal;
}

/** Which events a subscription receives. */
export interface EventFilter {
  /** Only this run's events. */
  runId?: string;
  /** Only this job's events. */
  job?: string;
  /** Only these kinds (`run_completed`, `attempt_failed`, …). */
  kinds?: string[];
  /**
   * Resume after this event id: stored events after it come first, then
   * new ones, without gaps or repeats. Without it only new events come.
   */
  lastEventId?: number;
  /** Ends the subscription. */
  signal?: AbortSignal;
  /**
   * Reconnect (resuming after the last event received) when the stream
   * ends or fails, e.g. when the server restarts. Default true.
   */
  reconnect?: boolean;
  /** Milliseconds before a reconnect (default 1000; the server's `retry` field wins). */
  reconnectDelayMs?: number;
  /** Called when a connection is open (again). */
  onOpen?: () => void;
  /** Called with a connection's failure before reconnecting. */
  onError?: (err: unknown) => void;
}

/**
 * A live subscription to the server-sent events: iterate it with
 * `for await`, stop it with {@link EventSubscription.close}.
 */
export interface EventSubscription extends AsyncIterable<DocketEvent> {
  /** The id of the last event delivered (resume point), if any. */
  readonly lastEventId: number | undefined;
  /** Ends the subscription; a pending iteration ends. */
  close(): void;
}

function time(t: Date | string | undefined): string | undefined {
  return t instanceof Date ? t.toISOString() : t;
}

function triggerBody(job: string, input: unknown, o: TriggerOptions): Record<string, unknown> {
  const body: Record<string, unknown> = { job, input: input ?? null };
  if (o.idempotencyKey !== undefined) body.idempotency_key = o.idempotencyKey;
  if (o.runAfter !== undefined) body.run_after = time(o.runAfter);
  if (o.priority !== undefined) body.priority = o.priority;
  if (o.correlationId !== undefined) body.correlation_id = o.correlationId;
  if (o.debounce !== undefined) body.debounce = o.debounce;
  return body;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
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

/**
 * Docket's REST API.
 *
 * ```ts
 * const docket = new DocketClient({ url: 'http://127.0.0.1:7878', token: process.env.DOCKET_TOKEN })
 * const { run } = await docket.trigger('send-email', { to: 'a@example.com' }, { idempotencyKey: 'welcome/a' })
 * const done = await docket.waitForRun(run.id)
 * ```
 *
 * A refused request throws {@link DocketApiError} with the server's code.
 */
export class DocketClient {
  /** The server's base URL, without a trailing `/`. */
  readonly url: string;
  private readonly token?: string;
  private readonly tenant?: string;
  private readonly fetchFn: typeof fetch;

  constructor(options: ClientOptions) {
    this.url = options.url.replace(/\/+$/, '');
    this.token = options.token;
    this.tenant = options.tenant;
    this.fetchFn = options.fetch ?? ((...a) => globalThis.fetch(...a));
  }

  /** The headers every request carries. */
  headers(extra: Record<string, string> = {}): Record<string, string> {
    const h: Record<string, string> = { accept: 'application/json', ...extra };
    if (this.token) h.authorization = `Bearer ${this.token}`;
    if (this.tenant) h['x-tenant-id'] = this.tenant;
    return h;
  }

  /**
   * One request: JSON in, JSON out; a status of 400 or more throws
   * {@link DocketApiError}. `path` starts with `/`.
   */
  async request<T>(
    method: string,
    path: string,
    body?: unknown,
    init: { signal?: AbortSignal; query?: URLSearchParams } = {},
  ): Promise<{ status: number; data: T }> {
    const q = init.query?.toString();
    const res = await this.fetchFn(`${this.url}${path}${q ? `?${q}` : ''}`, {
      method,
      headers: this.headers(body === undefined ? {} : { 'content-type': 'application/json' }),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: init.signal,
    });
    const text = await res.text();
    let data: unknown = text;
    try {
      data = text === '' ? undefined : JSON.parse(text);
    } catch {
      // Not JSON (a proxy's error page): kept as text in the error.
    }
    if (res.status >= 400) {
      throw new DocketApiError(res.status, data, `${method} ${path}: HTTP ${res.status}`);
    }
    return { status: res.status, data: data as T };
  }

  /** `GET /healthz`. */
  async health(): Promise<Health> {
    return (await this.request<Health>('GET', '/healthz')).data;
  }

  /**
   * Triggers a run of `job`. With an `idempotencyKey` used before for this
   * job, answers the existing run and `existing: true` (nothing created);
   * a trigger collapsed by a debounce answers the run it was collapsed into
   * with `existing` and `collapsed` true.
   */
  async trigger(job: string, input?: unknown, options: TriggerOptions = {}): Promise<TriggerResponse> {
    return (await this.request<TriggerResponse>('POST', '/api/runs', triggerBody(job, input, options))).data;
  }

  /** Triggers 1 to 1,000 runs in one transaction: all or none. */
  async triggerBatch(runs: BatchItem[]): Promise<TriggerResponse[]> {
    const body = { runs: runs.map((r) => triggerBody(r.job, r.input, r)) };
    return (await this.request<S['BatchResponse']>('POST', '/api/runs/batch', body)).data.runs;
  }

  /** A run with its whole history. */
  async getRun(id: string, init: { signal?: AbortSignal } = {}): Promise<RunDetail> {
    return (await this.request<RunDetail>('GET', `/api/runs/${encodeURIComponent(id)}`, undefined, init)).data;
  }

  /** One page of runs, newest first (`next_cursor` for the next). */
  async listRuns(filter: RunFilter = {}, init: { signal?: AbortSignal } = {}): Promise<RunPage> {
    const q = new URLSearchParams();
    const status = filter.status === undefined ? [] : [filter.status].flat();
    if (status.length) q.set('status', status.join(','));
    if (filter.job !== undefined) q.set('job', filter.job);
    if (filter.needsAttention) q.set('needs_attention', 'true');
    if (filter.createdAfter !== undefined) q.set('created_after', time(filter.createdAfter)!);
    if (filter.createdBefore !== undefined) q.set('created_before', time(filter.createdBefore)!);
    if (filter.limit !== undefined) q.set('limit', String(filter.limit));
    if (filter.cursor !== undefined) q.set('cursor', filter.cursor);
    return (await this.request<RunPage>('GET', '/api/runs', undefined, { query: q, signal: init.signal })).data;
  }

  /** Every run matching `filter`, page after page. */
  async *runs(filter: Omit<RunFilter, 'cursor'> = {}): AsyncGenerator<Run> {
    let cursor: string | undefined;
    do {
      const page = await this.listRuns({ ...filter, cursor });
      yield* page.runs;
      cursor = page.next_cursor ?? undefined;
    } while (cursor);
  }

  /**
   * One long poll: answers when the run is terminal (or, with
   * `until: 'needs_input'`, waits for a person) or when `timeoutMs` passed
   * (`terminal: false`).
   */
  async wait(id: string, options: WaitOptions = {}): Promise<WaitResponse> {
    const q = new URLSearchParams();
    if (options.timeoutMs !== undefined) q.set('timeout', `${Math.round(options.timeoutMs)}ms`);
    if (options.until !== undefined) q.set('until', options.until);
    return (
      await this.request<WaitResponse>('GET', `/api/runs/${encodeURIComponent(id)}/wait`, undefined, {
        query: q,
        signal: options.signal,
      })
    ).data;
  }

  /**
   * Waits until the run is terminal (or waits for input, with `until`),
   * with as many long polls as needed, at most `timeoutMs` in all (default:
   * no bound). Throws `DocketApiError` with code `wait_timeout` when the
   * bound passes.
   */
  async waitForRun(
    id: string,
    options: { timeoutMs?: number; until?: 'terminal' | 'needs_input'; signal?: AbortSignal } = {},
  ): Promise<Run> {
    const deadline = options.timeoutMs === undefined ? Infinity : Date.now() + options.timeoutMs;
    for (;;) {
      const left = deadline - Date.now();
      const w = await this.wait(id, {
        timeoutMs: Math.max(1, Math.min(30_000, left)),
        until: options.until,
        signal: options.signal,
      });
      if (w.terminal || (options.until === 'needs_input' && w.run.status === 'needs_input')) return w.run;
      if (Date.now() >= deadline) {
        throw new DocketApiError(
          408,
          { error: { code: 'wait_timeout', message: `run ${id} is still ${w.run.status} after ${options.timeoutMs} ms`, current_status: w.run.status } },
          'wait timed out',
        );
      }
    }
  }

  private async command<T>(id: string, cmd: string, body: Record<string, unknown>): Promise<T> {
    for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
    return (await this.request<T>('POST', `/api/runs/${encodeURIComponent(id)}/${cmd}`, body)).data;
  }

  /** Cancels a run (a running one stops at its next step boundary). */
  cancel(id: string, options: { comment?: string } = {}): Promise<Run> {
    return this.command(id, 'cancel', { comment: options.comment });
  }

  /**
   * Retries a failed run: same run, completed steps kept,
   * `updatedVariables` merged into its variables, a fresh attempt budget.
   */
  retry(id: string, options: { updatedVariables?: Record<string, unknown>; comment?: string } = {}): Promise<Run> {
    return this.command(id, 'retry', { updated_variables: options.updatedVariables, comment: options.comment });
  }

  /** Skips a failed run's failed step; the run continues. */
  skip(id: string, options: { comment?: string } = {}): Promise<Run> {
    return this.command(id, 'skip', { comment: options.comment });
  }

  /** A new run with the same input as a terminal one (`retriggered_from`). */
  retrigger(id: string, options: { comment?: string } = {}): Promise<TriggerResponse> {
    return this.command(id, 'retrigger', { comment: options.comment });
  }

  /** Postpones a pending, postponed or waiting run: `until` an instant or by `delayMs`. */
  postpone(id: string, options: { until?: Date | string; delayMs?: number; comment?: string }): Promise<Run> {
    return this.command(id, 'postpone', {
      until: time(options.until),
      delay_ms: options.delayMs,
      comment: options.comment,
    });
  }

  /** Approves a run waiting for input; its wait returns `data`. */
  approve(id: string, options: { data?: unknown; comment?: string } = {}): Promise<Run> {
    return this.command(id, 'approve', { data: options.data, comment: options.comment });
  }

  /** Rejects a run waiting for input; its wait returns the rejection with `data`. */
  reject(id: string, options: { data?: unknown; comment?: string } = {}): Promise<Run> {
    return this.command(id, 'reject', { data: options.data, comment: options.comment });
  }

  /** The registered jobs with this tenant's run counts. */
  async jobs(): Promise<JobList['jobs']> {
    return (await this.request<JobList>('GET', '/api/jobs')).data.jobs;
  }

  /** The remote workers seen in this tenant, most recent first, with their last heartbeat and jobs. */
  async workers(): Promise<WorkerInfo[]> {
    return (await this.request<S['WorkerList']>('GET', '/api/workers')).data.workers;
  }

  /** A run's attempt timeline and forensic verdicts. */
  async forensics(id: string): Promise<unknown> {
    return (await this.request('GET', `/api/runs/${encodeURIComponent(id)}/forensics`)).data;
  }

  /** Forensic verdicts across a job's runs since `since` (default 24 h). */
  async jobForensics(job: string, since?: Date | string): Promise<unknown> {
    const q = new URLSearchParams();
    if (since !== undefined) q.set('since', time(since)!);
    return (await this.request('GET', `/api/jobs/${encodeURIComponent(job)}/forensics`, undefined, { query: q })).data;
  }

  /** The HTTP jobs' connections with their status and breaker. */
  async connections(): Promise<unknown[]> {
    return (await this.request<{ connections: unknown[] }>('GET', '/api/connections')).data.connections;
  }

  /** One connection and its audit trail. */
  async connection(name: string): Promise<unknown> {
    return (await this.request('GET', `/api/connections/${encodeURIComponent(name)}`)).data;
  }

  /** Enables, disables or expires a connection for this tenant. */
  async setConnection(name: string, change: 'enable' | 'disable' | 'expire', comment?: string): Promise<unknown> {
    const body = comment === undefined ? {} : { comment };
    return (await this.request('POST', `/api/connections/${encodeURIComponent(name)}/${change}`, body)).data;
  }

  /** The circuit breakers of the serving process. */
  async breakers(): Promise<unknown[]> {
    return (await this.request<{ breakers: unknown[] }>('GET', '/api/breakers')).data.breakers;
  }

  /**
   * The seed's command envelope (`POST /api/core/cmd`): answers the
   * envelope also for refusals (it never throws for a 4xx with an envelope).
   */
  async coreCommand(cmd: string, data: Record<string, unknown>): Promise<CommandResponse> {
    try {
      return (await this.request<CommandResponse>('POST', '/api/core/cmd', { cmd, data })).data;
    } catch (e) {
      if (e instanceof DocketApiError && e.body && typeof e.body === 'object' && 'isSuccessful' in e.body) {
        return e.body as CommandResponse;
      }
      throw e;
    }
  }

  /**
   * Subscribes to the server-sent events of this tenant. Reconnects after a
   * dropped stream, resuming after the last event received
   * (`Last-Event-ID`), so no event is lost or repeated.
   *
   * ```ts
   * const sub = docket.events({ runId })
   * for await (const e of sub) { if (e.kind === 'run_completed') sub.close() }
   * ```
   */
  events(filter: EventFilter = {}): EventSubscription {
    const stop = new AbortController();
    if (filter.signal) {
      if (filter.signal.aborted) stop.abort();
      else filter.signal.addEventListener('abort', () => stop.abort(), { once: true });
    }
    const state = { last: filter.lastEventId };
    const client = this;
    async function* run(): AsyncGenerator<DocketEvent> {
      let delay = filter.reconnectDelayMs ?? 1000;
      while (!stop.signal.aborted) {
        const q = new URLSearchParams();
        if (filter.runId !== undefined) q.set('run_id', filter.runId);
        if (filter.job !== undefined) q.set('job', filter.job);
        if (filter.kinds?.length) q.set('kind', filter.kinds.join(','));
        const headers = client.headers({ accept: 'text/event-stream' });
        if (state.last !== undefined) headers['last-event-id'] = String(state.last);
        try {
          const res = await client.fetchFn(`${client.url}/api/events${q.toString() ? `?${q}` : ''}`, {
            headers,
            signal: stop.signal,
          });
          if (res.status >= 400 || !res.body) {
            const text = await res.text();
            let body: unknown = text;
            try {
              body = JSON.parse(text);
            } catch {
              // kept as text
            }
            // A refusal (bad filter, no token, unknown run) will not heal by
            // reconnecting: it ends the subscription.
            throw new DocketApiError(res.status, body, `GET /api/events: HTTP ${res.status}`);
          }
          filter.onOpen?.();
          for await (const m of parseSse(res.body)) {
            if (m.retry !== undefined) delay = m.retry;
            if (m.id !== undefined && /^-?\d+$/.test(m.id)) state.last = Number(m.id);
            let e: DocketEvent;
            try {
              e = JSON.parse(m.data) as DocketEvent;
            } catch {
              continue;
            }
            yield e;
            if (stop.signal.aborted) return;
          }
        } catch (err) {
          if (stop.signal.aborted) return;
          if (err instanceof DocketApiError) throw err;
          filter.onError?.(err);
        }
        if (filter.reconnect === false || stop.signal.aborted) return;
        await sleep(delay, stop.signal);
      }
    }
    const gen = run();
    return {
      get lastEventId() {
        return state.last;
      },
      close() {
        stop.abort();
      },
      [Symbol.asyncIterator]() {
        return gen;
      },
    };
  }
}
