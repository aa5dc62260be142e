/**
 * React hooks over {@link DocketClient}: live runs (server-sent events
 * refresh them), run lists, operator actions and triggers — the shape of
 * help Durably's hooks give (`useRun`, `useRunActions`, `useJob`).
 *
 * ```tsx
 * <DocketProvider client={new DocketClient({ url: '', token })}>
 *   <App />
 * </DocketProvider>
 * ```
 */

import { createContext, createElement, useCallback, useContext, useEffect, useMemo, useRef, useState } from 'react';
import type { ReactNode } from 'react';
import {
  DocketClient,
  isTerminal,
  type DocketEvent,
  type Run,
  type RunDetail,
  type RunFilter,
  type TriggerOptions,
} from './client.js';

const ClientContext = createContext<DocketClient | null>(null);

/** Makes `client` the one the hooks below use. */
export function DocketProvider(props: { client: DocketClient; children?: ReactNode }) {
  return createElement(ClientContext.Provider, { value: props.client }, props.children);
}

/** The client of the nearest {@link DocketProvider} (or `client` when given). */
export function useDocketClient(client?: DocketClient): DocketClient {
  const ctx = useContext(ClientContext);
  const c = client ?? ctx;
  if (!c) throw new Error('no DocketClient: wrap the tree in <DocketProvider client={…}> or pass `client`');
  return c;
}

interface Listener {
  runId?: string;
  job?: string;
  onEvent: () => void;
}

/**
 * One event stream per client, shared by every hook on the page: a browser
 * allows only ~6 connections per origin over HTTP/1.1, so a stream per
 * hook (per row of a list) would starve the page's other requests.
 */
class EventBus {
  private readonly listeners = new Set<Listener>();
  private sub: ReturnType<DocketClient['events']> | undefined;
  private closing: ReturnType<typeof setTimeout> | undefined;

  constructor(private readonly client: DocketClient) {}

  add(l: Listener): () => void {
    this.listeners.add(l);
    if (this.closing) clearTimeout(this.closing);
    this.closing = undefined;
    if (!this.sub) this.open();
    return () => {
      this.listeners.delete(l);
      // Closed a moment later, so a remount (React's strict mode, a list
      // re-rendering) keeps the same stream.
      if (this.listeners.size === 0 && !this.closing) {
        this.closing = setTimeout(() => {
          this.closing = undefined;
          if (this.listeners.size === 0) {
            this.sub?.close();
            this.sub = undefined;
          }
        }, 1000);
      }
    };
  }

  private open(): void {
    // Each (re)connection reloads every view: events missed while the
    // stream was down are then reflected even without a resume point.
    const sub = this.client.events({ onOpen: () => this.listeners.forEach((l) => l.onEvent()) });
    this.sub = sub;
    void (async () => {
      try {
        for await (const e of sub) {
          for (const l of this.listeners) {
            if ((l.runId === undefined || l.runId === e.run_id) && (l.job === undefined || l.job === e.job)) l.onEvent();
          }
        }
      } catch {
        // A refused stream (a revoked token): views keep their last load.
      }
      if (this.sub === sub) this.sub = undefined;
    })();
  }
}

const buses = new WeakMap<DocketClient, EventBus>();
function busOf(client: DocketClient): EventBus {
  let b = buses.get(client);
  if (!b) buses.set(client, (b = new EventBus(client)));
  return b;
}

/**
 * Calls `load` now and again whenever a matching event arrives: at most
 * one load at a time, and one more after it when events came meanwhile, so
 * a burst of events costs two loads, never a stale view.
 */
function useLive<T>(
  client: DocketClient,
  key: string | null,
  load: (signal: AbortSignal) => Promise<T>,
  events: { runId?: string; job?: string } | null,
): { data: T | undefined; error: unknown; isLoading: boolean; refresh: () => void } {
  const [data, setData] = useState<T | undefined>(undefined);
  const [error, setError] = useState<unknown>(undefined);
  const [isLoading, setLoading] = useState<boolean>(key !== null);
  const loadRef = useRef(load);
  loadRef.current = load;
  const kick = useRef<() => void>(() => {});
  const eventsKey = events === null ? null : JSON.stringify(events);

  useEffect(() => {
    setData(undefined);
    setError(undefined);
    if (key === null) {
      setLoading(false);
      return;
    }
    setLoading(true);
    const stop = new AbortController();
    let busy = false;
    let again = false;
    const refresh = async () => {
      if (stop.signal.aborted) return;
      if (busy) {
        again = true;
        return;
      }
      busy = true;
      do {
        again = false;
        try {
          const v = await loadRef.current(stop.signal);
          if (stop.signal.aborted) return;
          setData(v);
          setError(undefined);
        } catch (e) {
          if (stop.signal.aborted) return;
          setError(e);
        } finally {
          if (!stop.signal.aborted) setLoading(false);
        }
      } while (again && !stop.signal.aborted);
      busy = false;
    };
    kick.current = () => void refresh();
    // Listen first, then load: an event between the two causes one more
    // load instead of being missed.
    const remove = eventsKey === null ? undefined : busOf(client).add({ ...JSON.parse(eventsKey), onEvent: () => void refresh() });
    void refresh();
    return () => {
      stop.abort();
      remove?.();
    };
  }, [client, key, eventsKey]);

  return { data, error, isLoading, refresh: useCallback(() => kick.current(), []) };
}

/** Progress reported by a handler (`ctx.progress`). */
export interface Progress {
  current: number;
  total?: number;
  message?: string;
}

/** What {@link useRun} answers. */
export interface UseRunResult {
  /** The run (undefined while loading or without an id). */
  run: Run | undefined;
  /** Its whole history: attempts, steps, ledger, events, timeline. */
  detail: RunDetail | undefined;
  /** The run's status. */
  status: Run['status'] | undefined;
  /** Its durable steps. */
  steps: RunDetail['steps'];
  /** The latest `progress` event's data. */
  progress: Progress | undefined;
  /** The output once completed. */
  output: unknown;
  /** The latest failure's message (the run's error while failed). */
  error: string | null;
  /** A failure to load the run (a {@link DocketApiError}, e.g. `not_found`). */
  loadError: unknown;
  isLoading: boolean;
  isPending: boolean;
  isRunning: boolean;
  isCompleted: boolean;
  isFailed: boolean;
  isCancelled: boolean;
  /** `needs_input`: an operator must approve or reject. */
  needsInput: boolean;
  isTerminal: boolean;
  /** Loads it again now. */
  refresh: () => void;
}

function lastProgress(events: DocketEvent[] | undefined): Progress | undefined {
  if (!events) return undefined;
  for (let i = events.length - 1; i >= 0; i--) {
    if (events[i].kind === 'progress') return events[i].data as unknown as Progress;
  }
  return undefined;
}

/**
 * A run, kept live: loaded, then loaded again on each of its events (over
 * SSE). `id` null or undefined: nothing.
 */
export function useRun(id: string | null | undefined, options: { client?: DocketClient } = {}): UseRunResult {
  const client = useDocketClient(options.client);
  const key = id ?? null;
  const { data, error, isLoading, refresh } = useLive<RunDetail>(
    client,
    key,
    (signal) => client.getRun(key!, { signal }),
    key === null ? null : { runId: key },
  );
  const run = data?.run;
  const status = run?.status;
  return {
    run,
    detail: data,
    status,
    steps: data?.steps ?? [],
    progress: lastProgress(data?.events),
    output: run?.output,
    error: run?.last_error_message ?? null,
    loadError: error,
    isLoading,
    isPending: status === 'pending' || status === 'postponed',
    isRunning: status === 'running',
    isCompleted: status === 'completed',
    isFailed: status === 'failed',
    isCancelled: status === 'cancelled',
    needsInput: status === 'needs_input',
    isTerminal: status !== undefined && isTerminal(status),
    refresh,
  };
}

/** What {@link useRuns} answers. */
export interface UseRunsResult {
  /** The first page of matching runs, newest first. */
  runs: Run[];
  /** Of those, the ones an operator should look at (failed, needs_input). */
  needsAttention: Run[];
  /** The next page's cursor, when there is one. */
  nextCursor: string | null;
  error: unknown;
  isLoading: boolean;
  refresh: () => void;
}

/**
 * A live list of runs (`filter` as {@link DocketClient.listRuns}), loaded
 * again whenever an event of the matching job (or any job) arrives.
 */
export function useRuns(filter: RunFilter = {}, options: { client?: DocketClient } = {}): UseRunsResult {
  const client = useDocketClient(options.client);
  const key = JSON.stringify(filter);
  const f = useMemo(() => JSON.parse(key) as RunFilter, [key]);
  const { data, error, isLoading, refresh } = useLive(
    client,
    key,
    (signal) => client.listRuns(f, { signal }),
    f.job === undefined ? {} : { job: f.job },
  );
  const runs = data?.runs ?? [];
  return {
    runs,
    needsAttention: runs.filter((r) => r.status === 'failed' || r.status === 'needs_input'),
    nextCursor: data?.next_cursor ?? null,
    error,
    isLoading,
    refresh,
  };
}

/** What {@link useRunActions} answers: operator commands, with their state. */
export interface RunActions {
  /** Retries a failed run (same run, steps kept, variables merged). */
  retry: (id: string, options?: { updatedVariables?: Record<string, unknown>; comment?: string }) => Promise<Run>;
  /** Cancels a run. */
  cancel: (id: string, options?: { comment?: string }) => Promise<Run>;
  /** Skips a failed run's failed step. */
  skip: (id: string, options?: { comment?: string }) => Promise<Run>;
  /** A new run with the same input; answers the new run's id. */
  retrigger: (id: string, options?: { comment?: string }) => Promise<string>;
  /** Postpones a run. */
  postpone: (id: string, options: { until?: Date | string; delayMs?: number; comment?: string }) => Promise<Run>;
  /** Approves a run waiting for input. */
  approve: (id: string, options?: { data?: unknown; comment?: string }) => Promise<Run>;
  /** Rejects a run waiting for input. */
  reject: (id: string, options?: { data?: unknown; comment?: string }) => Promise<Run>;
  /** A command is in flight. */
  isPending: boolean;
  /** The last command's failure (a {@link DocketApiError}, e.g. `wrong_state`), cleared by the next. */
  error: unknown;
}

/** Operator commands for any run. Each throws on refusal and also sets `error`. */
export function useRunActions(options: { client?: DocketClient } = {}): RunActions {
  const client = useDocketClient(options.client);
  const [pending, setPending] = useState(0);
  const [error, setError] = useState<unknown>(undefined);
  const wrap = useCallback(
    <A extends unknown[], R>(f: (...a: A) => Promise<R>) =>
      async (...a: A): Promise<R> => {
        setPending((n) => n + 1);
        setError(undefined);
        try {
          return await f(...a);
        } catch (e) {
          setError(e);
          throw e;
        } finally {
          setPending((n) => n - 1);
        }
      },
    [],
  );
  return useMemo(
    () => ({
      retry: wrap((id: string, o?: { updatedVariables?: Record<string, unknown>; comment?: string }) => client.retry(id, o)),
      cancel: wrap((id: string, o?: { comment?: string }) => client.cancel(id, o)),
      skip: wrap((id: string, o?: { comment?: string }) => client.skip(id, o)),
      retrigger: wrap(async (id: string, o?: { comment?: string }) => (await client.retrigger(id, o)).run.id),
      postpone: wrap((id: string, o: { until?: Date | string; delayMs?: number; comment?: string }) => client.postpone(id, o)),
      approve: wrap((id: string, o?: { data?: unknown; comment?: string }) => client.approve(id, o)),
      reject: wrap((id: string, o?: { data?: unknown; comment?: string }) => client.reject(id, o)),
      isPending: pending > 0,
      error,
    }),
    [client, wrap, pending, error],
  );
}

/** What {@link useTrigger} answers. */
export interface UseTriggerResult extends Omit<UseRunResult, 'error' | 'loadError'> {
  /** Triggers a run of the job; answers its id. The run is then followed live. */
  trigger: (input?: unknown, options?: TriggerOptions) => Promise<string>;
  /** The last triggered run's id. */
  runId: string | null;
  /** The trigger was answered `existing: true` (the idempotency key was used before). */
  existing: boolean;
  /** The run's failure message, or the trigger's refusal message. */
  error: string | null;
  /** The trigger's refusal (a {@link DocketApiError}) or a failure to load the run. */
  triggerError: unknown;
  /** A trigger is in flight. */
  isTriggering: boolean;
  /** Forgets the run (to trigger again from a clean state). */
  reset: () => void;
}

/** Triggers runs of `job` and follows the last one live (Durably's `useJob`). */
export function useTrigger(job: string, options: { client?: DocketClient } = {}): UseTriggerResult {
  const client = useDocketClient(options.client);
  const [runId, setRunId] = useState<string | null>(null);
  const [existing, setExisting] = useState(false);
  const [triggerError, setTriggerError] = useState<unknown>(undefined);
  const [isTriggering, setTriggering] = useState(false);
  const live = useRun(runId, { client });
  const trigger = useCallback(
    async (input?: unknown, o?: TriggerOptions) => {
      setTriggering(true);
      setTriggerError(undefined);
      try {
        const t = await client.trigger(job, input, o);
        setRunId(t.run.id);
        setExisting(t.existing);
        return t.run.id;
      } catch (e) {
        setTriggerError(e);
        throw e;
      } finally {
        setTriggering(false);
      }
    },
    [client, job],
  );
  const reset = useCallback(() => {
    setRunId(null);
    setExisting(false);
    setTriggerError(undefined);
  }, []);
  const refusal = triggerError instanceof Error ? triggerError.message : null;
  return {
    ...live,
    trigger,
    runId,
    existing,
    error: refusal ?? live.error,
    triggerError: triggerError ?? live.loadError,
    isTriggering,
    reset,
  };
}
