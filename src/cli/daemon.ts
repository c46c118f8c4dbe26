import { setFlagsFromString } from 'node:v8';
import { pino, type Logger } from 'pino';
import { buildApi } from '../api/server.js';
import { Site } from '../site/site.js';

export interface RunningSite {
  site: Site;
  url: string;
  stop(): Promise<void>;
}

export function createLogger(): Logger {
  return pino({ level: process.env.FERRY_LOG_LEVEL ?? 'info', base: { pid: process.pid } });
}

/** Opens the site in `dir`, wires the API to its listener and starts serving. */
export async function startSite(dir: string, log: Logger, listen?: string, nbd?: string, advertise?: string): Promise<RunningSite> {
  const site = await Site.open(dir, log);
  try {
    const api = await buildApi(site);
    const firstBytes = process.env.FERRY_FIRST_BYTES_TIMEOUT_MS;
    const { listen: bound } = await site.start({
      httpServer: api.server,
      ...(listen !== undefined ? { listen } : {}),
      ...(nbd !== undefined ? { nbd } : {}),
      ...(advertise !== undefined ? { advertise } : {}),
      ...(firstBytes !== undefined ? { firstBytesTimeoutMs: Number(firstBytes) } : {}),
    });
    const host = bound.host.includes(':') ? `[${bound.host}]` : bound.host;
    return { site, url: `http://${host}:${bound.port}`, stop: () => site.stop() };
  } catch (err) {
    await site.stop();
    throw err;
  }
}

/**
 * How far V8 lets the old generation grow past what the last full collection kept,
 * in percent (V8's `--heap-growing-percent`): 400 sets the limit at five times the live
 * heap.
 *
 * Why: V8 counts external memory allocated since the last full collection against
 * that limit, and a daemon streaming data allocates a lot of it. Every read from an
 * accepted socket (a host's NBD writes, a peer's RCP frames) arrives in a new buffer of
 * up to 64 KiB, freed only by the next young-generation collection, after about 32 MiB.
 * With a site's small heap (about 13 MB live), V8 chose limits about 12 MB above the live
 * heap. That churn alone then started a full mark-compact every 40-60 ms: 82 at the
 * target during a 2 GiB copy. With this limit there were 2.
 * (Node offers a reusable read buffer only to sockets it connects, not to those it accepts.)
 */
const heapGrowingPercent = 400;

/** Runs a site in the foreground until SIGTERM or SIGINT, then drains and exits 0. */
export async function runDaemon(dir: string, listen?: string, nbd?: string, advertise?: string): Promise<void> {
  // Read by V8 each time it sets the limit, so it applies from the next collection on.
  setFlagsFromString(`--heap-growing-percent=${heapGrowingPercent}`);
  const log = createLogger();
  const running = await startSite(dir, log, listen, nbd, advertise);
  let stopping = false;
  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'signal received, draining');
    running.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        log.error({ err }, 'error while stopping');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  // An invariant broken anywhere stops the site before bad data spreads.
  process.on('uncaughtException', (err) => {
    log.fatal({ err }, 'uncaught exception; stopping the site');
    process.exit(70);
  });
  process.on('unhandledRejection', (err) => {
    log.fatal({ err }, 'unhandled rejection; stopping the site');
    process.exit(70);
  });
}
