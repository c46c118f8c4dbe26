import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { FerryError, type ErrorCode } from '../lib/errors.js';

export const defaultSiteUrl = 'http://127.0.0.1:7370';

/** A thin client of a site's HTTP API; every failure becomes a FerryError with the API's code. */
export class ApiClient {
  readonly baseUrl: string;

  constructor(siteUrl: string) {
    this.baseUrl = siteUrl.replace(/\/+$/, '');
  }

  get<T>(path: string): Promise<T> {
    return this.request<T>('GET', path);
  }

  post<T>(path: string, body?: unknown): Promise<T> {
    return this.request<T>('POST', path, body);
  }

  delete<T>(path: string): Promise<T> {
    return this.request<T>('DELETE', path);
  }

  /**
   * node:http rather than fetch: a role change or a stop may keep the site working on
   * the request for longer than fetch waits for an answer (5 minutes), and the site
   * bounds each of its waits itself.
   */
  async request<T>(method: string, path: string, body?: unknown, onLine?: (value: unknown) => void): Promise<T> {
    let res: { ok: boolean; status: number; text: string };
    try {
      res = await send(method, `${this.baseUrl}${path}`, body === undefined ? undefined : JSON.stringify(body), onLine && ((line) => {
        try {
          onLine(JSON.parse(line));
        } catch {
          // Progress is best effort; the answer line is checked below.
        }
      }));
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      throw new FerryError('UNAVAILABLE', `cannot reach the site at ${this.baseUrl} (${e.code ?? e.message}); is "ferry site start" running there?`);
    }
    const text = res.text;
    let parsed: unknown = undefined;
    if (text.length > 0) {
      try {
        parsed = JSON.parse(text);
      } catch {
        if (!res.ok) throw new FerryError('INTERNAL', `site answered ${res.status}: ${text.slice(0, 200)}`);
        return text as T;
      }
    }
    const error = (parsed as { error?: { code?: string; message?: string } } | undefined)?.error;
    // A streamed answer that failed once under way ends with an error line.
    if (!res.ok || (onLine && error)) {
      throw new FerryError((error?.code as ErrorCode | undefined) ?? 'INTERNAL', error?.message ?? `site answered HTTP ${res.status}`);
    }
    return parsed as T;
  }

  /**
   * A GET answered with lines of JSON (`application/x-ndjson`, long work): every line but
   * the last goes to `onLine` as it arrives (progress); the last is the answer or an error.
   */
  getStreamed<T>(path: string, onLine: (value: unknown) => void): Promise<T> {
    return this.request<T>('GET', path, undefined, onLine);
  }
}

/**
 * One request; `text` is the whole answer, or with `onLine` and a streamed answer its
 * last line (the lines before it go to `onLine` as they arrive).
 */
function send(method: string, url: string, body: string | undefined, onLine?: (line: string) => void): Promise<{ ok: boolean; status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const headers = body === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) };
    const req = (url.startsWith('https:') ? httpsRequest : httpRequest)(url, { method, headers }, (res) => {
      const streamed = onLine !== undefined && String(res.headers['content-type']).startsWith('application/x-ndjson');
      res.setEncoding('utf8');
      let text = '';
      res.on('data', (piece: string) => {
        text += piece;
        if (!streamed) return;
        // Hold the newest complete line back: it may be the answer.
        for (let nl = text.indexOf('\n'); nl >= 0 && text.indexOf('\n', nl + 1) >= 0; nl = text.indexOf('\n')) {
          onLine(text.slice(0, nl));
          text = text.slice(nl + 1);
        }
      });
      res.on('error', reject);
      res.on('end', () => {
        const status = res.statusCode ?? 0;
        resolve({ ok: status >= 200 && status < 300, status, text: streamed ? text.trim() : text });
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

export function volumePath(name: string, suffix = ''): string {
  return `/api/v1/volumes/${encodeURIComponent(name)}${suffix}`;
}
