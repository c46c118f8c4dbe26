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

  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    let res: Response;
    try {
      res = await fetch(`${this.baseUrl}${path}`, {
        method,
        ...(body !== undefined ? { body: JSON.stringify(body), headers: { 'content-type': 'application/json' } } : {}),
      });
    } catch (err) {
      const cause = (err as { cause?: { code?: string; message?: string } }).cause;
      throw new FerryError('UNAVAILABLE', `cannot reach the site at ${this.baseUrl} (${cause?.code ?? cause?.message ?? (err as Error).message}); is "ferry site start" running there?`);
    }
    const text = await res.text();
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

export function volumePath(name: string, suffix = ''): string {
  return `/api/v1/volumes/${encodeURIComponent(name)}${suffix}`;
}
