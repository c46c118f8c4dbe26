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
export async function startSite(dir: string, log: Logger, listen?: string, nbd?: string): Promise<RunningSite> {
  const site = await Site.open(dir, log);
  try {
    const api = await buildApi(site);
    const firstBytes = process.env.FERRY_FIRST_BYTES_TIMEOUT_MS;
    const { listen: bound } = await site.start({
      httpServer: api.server,
      ...(listen !== undefined ? { listen } : {}),
      ...(nbd !== undefined ? { nbd } : {}),
      ...(firstBytes !== undefined ? { firstBytesTimeoutMs: Number(firstBytes) } : {}),
    });
    const host = bound.host.includes(':') ? `[${bound.host}]` : bound.host;
    return { site, url: `http://${host}:${bound.port}`, stop: () => site.stop() };
  } catch (err) {
    await site.stop();
    throw err;
  }
}

/** Runs a site in the foreground until SIGTERM or SIGINT, then drains and exits 0. */
export async function runDaemon(dir: string, listen?: string, nbd?: string): Promise<void> {
  const log = createLogger();
  const running = await startSite(dir, log, listen, nbd);
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
