/**
 * Errors: {@link DocketApiError} for answers of the REST API that are not a
 * success, {@link DocketError} for a handler's failure carrying one of
 * Docket's error classes (which decide retries on the server).
 */

/**
 * Docket's error classes. The server's retry policy decides from the class:
 * `timeout`, `network`, `rate_limited`, `unavailable` and `lease_expired`
 * are retried by default; `invalid_input`, `content_too_large`,
 * `connection_unresolved`, `unauthorized`, `not_found` and `permanent` fail
 * the run; `duplicate` means the side effect was already done (complete,
 * do not retry).
 */
export type ErrorClass =
  | 'timeout'
  | 'network'
  | 'rate_limited'
  | 'unavailable'
  | 'lease_expired'
  | 'invalid_input'
  | 'content_too_large'
  | 'connection_unresolved'
  | 'unauthorized'
  | 'not_found'
  | 'permanent'
  | 'duplicate';

/** Every error class, in the server's order. */
export const ERROR_CLASSES: readonly ErrorClass[] = [
  'timeout',
  'network',
  'rate_limited',
  'unavailable',
  'lease_expired',
  'invalid_input',
  'content_too_large',
  'connection_unresolved',
  'unauthorized',
  'not_found',
  'permanent',
  'duplicate',
];

/** Options of a {@link DocketError}. */
export interface DocketErrorOptions {
  /**
   * Do not retry before this: milliseconds from now, or an instant (a
   * provider's `Retry-After`). The server's policy may wait longer, never
   * shorter.
   */
  retryAfter?: number | Date | null;
  /** The underlying error. */
  cause?: unknown;
}

/**
 * A handler's failure with one of Docket's classes. Throw it from a job
 * handler (or from `ctx.step`/`ctx.action`); anything else thrown is
 * classified by {@link classify}: `fetch`'s network failures are `network`,
 * `AbortSignal.timeout` aborts `timeout`, the rest `permanent`.
 *
 * ```ts
 * throw new DocketError('rate_limited', 'CRM quota', { retryAfter: 30_000 })
 * ```
 */
export class DocketError extends Error {
  /** The error class. */
  readonly errorClass: ErrorClass;
  /** Milliseconds to wait at least before the next attempt. */
  readonly retryAfterMs?: number;

  constructor(errorClass: ErrorClass, message: string, options: DocketErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'DocketError';
    if (!ERROR_CLASSES.includes(errorClass)) {
      throw new TypeError(
        `unknown error class \`${errorClass}\`: one of ${ERROR_CLASSES.join(', ')}`,
      );
    }
    this.errorClass = errorClass;
    const ra = options.retryAfter;
    if (ra !== undefined && ra !== null) {
      const ms = ra instanceof Date ? ra.getTime() - Date.now() : ra;
      if (!Number.isFinite(ms)) throw new TypeError('retryAfter must be a finite number or a Date');
      this.retryAfterMs = Math.max(0, Math.round(ms));
    }
  }
}

/**
 * The class of anything a handler threw: a {@link DocketError}'s own class,
 * `timeout` for an `AbortSignal.timeout` abort, `network` for `fetch`'s
 * `TypeError: fetch failed`, `permanent` for anything else.
 */
export function classify(err: unknown): { errorClass: ErrorClass; message: string; retryAfterMs?: number } {
  if (err instanceof DocketError) {
    return { errorClass: err.errorClass, message: err.message, retryAfterMs: err.retryAfterMs };
  }
  if (err instanceof Error) {
    if (err.name === 'TimeoutError') return { errorClass: 'timeout', message: err.message };
    if (err instanceof TypeError && err.message === 'fetch failed') {
      const cause = err.cause instanceof Error ? `: ${err.cause.message}` : '';
      return { errorClass: 'network', message: `fetch failed${cause}` };
    }
    return { errorClass: 'permanent', message: err.message || err.name };
  }
  return { errorClass: 'permanent', message: String(err) };
}

/** The error envelope of the REST API: `{"error": {"code", "message", …}}`. */
export interface ApiErrorBody {
  error: {
    code: string;
    message: string;
    field?: string;
    current_status?: string;
    [extra: string]: unknown;
  };
}

/**
 * An answer of the REST API that is not a success. `code` is the server's
 * stable code (`wrong_state`, `not_found`, `invalid_field`, …).
 */
export class DocketApiError extends Error {
  /** The HTTP status. */
  readonly status: number;
  /** The stable error code, e.g. `wrong_state`. */
  readonly code: string;
  /** The field named by `invalid_field` (a JSON path such as `runs[2].job`). */
  readonly field?: string;
  /** The run's status named by `wrong_state`. */
  readonly currentStatus?: string;
  /** The whole answer body (parsed JSON when it was JSON). */
  readonly body: unknown;

  constructor(status: number, body: unknown, fallback: string) {
    const err = (body as ApiErrorBody | undefined)?.error;
    super(err?.message ?? fallback);
    this.name = 'DocketApiError';
    this.status = status;
    this.code = err?.code ?? `http_${status}`;
    this.field = err?.field;
    this.currentStatus = err?.current_status;
    this.body = body;
  }
}
