/**
 * A parser of `text/event-stream` (the WHATWG server-sent events format)
 * over a `fetch` body, so that a bearer token can be sent (the browser's
 * `EventSource` cannot send headers) and the same code runs in Node and
 * browsers.
 */

/** One message of the stream. */
export interface SseMessage {
  /** The `id` field, when the message had one. */
  id?: string;
  /** The `event` field (`message` when absent). */
  event: string;
  /** The `data` lines joined by newlines. */
  data: string;
  /** The `retry` field (milliseconds), when present. */
  retry?: number;
}

/** Splits a byte stream into SSE messages (comments and keep-alives dropped). */
export async function* parseSse(body: ReadableStream<Uint8Array>): AsyncGenerator<SseMessage> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let data: string[] = [];
  let event = '';
  let id: string | undefined;
  let retry: number | undefined;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      // Lines end with \n, \r\n or \r; a trailing \r may be half of a \r\n
      // still in flight, so it stays in the buffer.
      let m: RegExpExecArray | null;
      const eol = /\r\n|\n|\r(?!$)/g;
      let start = 0;
      while ((m = eol.exec(buffer)) !== null) {
        const line = buffer.slice(start, m.index);
        start = m.index + m[0].length;
        if (line === '') {
          if (data.length > 0) {
            yield { id, event: event || 'message', data: data.join('\n'), retry };
          }
          data = [];
          event = '';
          id = undefined;
          retry = undefined;
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'data') data.push(val);
        else if (field === 'event') event = val;
        else if (field === 'id' && !val.includes('\0')) id = val;
        else if (field === 'retry' && /^\d+$/.test(val)) retry = Number(val);
      }
      buffer = buffer.slice(start);
    }
  } finally {
    reader.releaseLock();
  }
}
