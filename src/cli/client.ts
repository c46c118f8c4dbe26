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
  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    let res: { ok: boolean; status: number; text: string };
    try {
      res = await send(method, `${this.baseUrl}${path}`, body === undefined ? undefined : JSON.stringify(body));
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
    if (!res.ok) {
      const error = (parsed as { error?: { code?: string; message?: string } } | undefined)?.error;
      throw new FerryError((error?.code as ErrorCode | undefined) ?? 'INTERNAL', error?.message ?? `site answered HTTP ${res.status}`);
    }
    return parsed as T;
  }
}

function send(method: string, url: string, body: string | undefined): Promise<{ ok: boolean; status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const headers = body === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) };
    const req = (url.startsWith('https:') ? httpsRequest : httpRequest)(url, { method, headers }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (b: Buffer) => parts.push(b));
      res.on('error', reject);
      res.on('end', () => {
        const status = res.statusCode ?? 0;
        resolve({ ok: status >= 200 && status < 300, status, text: Buffer.concat(parts).toString('utf8') });
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

export function volumePath(name: string, suffix = ''): string {
  return `/api/v1/volumes/${encodeURIComponent(name)}${suffix}`;
}
