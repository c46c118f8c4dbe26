import { FerryError } from './errors.js';

const sizeSuffixes: Record<string, number> = {
  '': 1,
  B: 1,
  K: 1024,
  M: 1024 ** 2,
  G: 1024 ** 3,
  T: 1024 ** 4,
  P: 1024 ** 5,
};

/** The largest byte count ferry handles: file offsets must stay exact in a double. */
export const sizeBytesMax = Number.MAX_SAFE_INTEGER;

/**
 * Parses `512`, `64K`, `8M`, `10G`, `1T` (binary units; `KiB`/`KB` spellings accepted).
 * Throws INVALID_SIZE for anything else, including negatives and fractions of a byte.
 */
export function parseSize(input: string | number): number {
  if (typeof input === 'number') {
    if (!Number.isSafeInteger(input) || input < 0) {
      throw new FerryError('INVALID_SIZE', `invalid size ${input}: expected a whole number of bytes >= 0`);
    }
    return input;
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$/i.exec(input);
  if (!m) {
    throw new FerryError('INVALID_SIZE', `invalid size "${input}": expected a number with an optional unit K, M, G, T (e.g. 64K, 10G)`);
  }
  const value = Number(m[1]);
  const unit = (m[2] ?? '').toUpperCase();
  const bytes = value * (sizeSuffixes[unit] ?? 1);
  if (!Number.isSafeInteger(bytes) || bytes > sizeBytesMax) {
    throw new FerryError('INVALID_SIZE', `invalid size "${input}": not a whole number of bytes, or too large`);
  }
  return bytes;
}

/** Formats a byte count with the largest binary unit that keeps it readable: 8K, 1.5G. */
export function formatSize(bytes: number): string {
  if (bytes < 1024) return `${bytes}`;
  const units = ['K', 'M', 'G', 'T', 'P'];
  let value = bytes;
  let unit = '';
  for (const u of units) {
    if (value < 1024) break;
    value /= 1024;
    unit = u;
  }
  const text = Number.isInteger(value) ? value.toString() : value.toFixed(value < 10 ? 2 : 1);
  return `${text}${unit}`;
}

const durationUnitsMs: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** Parses `500ms`, `10s`, `5m`, `1h`; a bare number is seconds. Returns milliseconds. */
export function parseDuration(input: string | number): number {
  if (typeof input === 'number') {
    if (!Number.isFinite(input) || input < 0) throw new FerryError('INVALID_DURATION', `invalid duration ${input}`);
    return Math.round(input * 1000);
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(input);
  if (!m) {
    throw new FerryError('INVALID_DURATION', `invalid duration "${input}": expected e.g. 500ms, 10s, 5m`);
  }
  return Math.round(Number(m[1]) * (durationUnitsMs[m[2] ?? 's'] ?? 1000));
}

export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)}s`;
  if (ms < 3_600_000) return `${Math.floor(ms / 60_000)}m${Math.round((ms % 60_000) / 1000)}s`;
  return `${Math.floor(ms / 3_600_000)}h${Math.round((ms % 3_600_000) / 60_000)}m`;
}

export interface HostPort {
  host: string;
  port: number;
}

/** Parses `HOST:PORT` (IPv6 as `[::1]:PORT`). Port 0 asks the OS for a free port. */
export function parseHostPort(input: string): HostPort {
  const m = /^\[([0-9a-fA-F:.]+)\]:(\d{1,5})$/.exec(input) ?? /^([A-Za-z0-9.-]+):(\d{1,5})$/.exec(input);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port > 65535) {
    throw new FerryError('INVALID_ADDRESS', `invalid address "${input}": expected HOST:PORT`);
  }
  return { host: m[1] as string, port };
}

export function formatHostPort(hp: HostPort): string {
  return hp.host.includes(':') ? `[${hp.host}]:${hp.port}` : `${hp.host}:${hp.port}`;
}
