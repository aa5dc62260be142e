/**
 * `@docket/client`: Docket's REST API from TypeScript (typed from the
 * server's OpenAPI document), server-sent events with resume, and remote
 * workers over the worker protocol. React hooks: `@docket/client/react`.
 */

export * from './errors.js';
export * from './client.js';
export * from './worker.js';
export type { SseMessage } from './sse.js';
export { parseSse } from './sse.js';
export type { paths, components } from './generated/api.js';
