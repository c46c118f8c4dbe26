// Node's thread pool runs file I/O; the default of 4 threads starves concurrent volume requests.
process.env.UV_THREADPOOL_SIZE ??= '16';

import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { initSiteDir } from '../storage/site-dir.js';
import { ApiClient, volumePath } from './client.js';
import { createLogger, startSite } from './daemon.js';
import { FerryError } from '../lib/errors.js';

/**
 * `npm start`: ferry's main job on embedded defaults. Initialises (once) and runs a
 * site under ./.ferry/site-a on 127.0.0.1:7370 with a volume `demo`, and prints
 * what to try next. Ctrl-C stops it cleanly; the data stays for the next start.
 */
const root = resolve(process.env.FERRY_DEMO_DIR ?? '.ferry');
const dir = resolve(root, 'site-a');
const listen = process.env.FERRY_DEMO_LISTEN ?? '127.0.0.1:7370';
const nbd = process.env.FERRY_DEMO_NBD ?? '127.0.0.1:10809';

async function main(): Promise<void> {
  if (!existsSync(resolve(dir, 'site.json'))) {
    await initSiteDir({ dir, name: 'site-a', listen, nbd, blockBytes: 8192 });
  }
  const log = createLogger();
  const running = await startSite(dir, log.child({}, { level: process.env.FERRY_LOG_LEVEL ?? 'warn' }));
  const api = new ApiClient(running.url);
  try {
    await api.get(volumePath('demo'));
  } catch (err) {
    if (!(err instanceof FerryError && err.code === 'VOLUME_NOT_FOUND')) throw err;
    await api.post('/api/v1/volumes', { name: 'demo', size: '1G' });
  }
  const stop = (): void => {
    void running.stop().then(() => process.exit(0));
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  process.stdout.write(
    [
      '',
      `ferry site "site-a" is running (data in ${dir})`,
      `  API and dashboard: ${running.url}/`,
      `  metrics:           ${running.url}/metrics`,
      '',
      'Try, in another terminal:',
      `  npx ferry volume list --site ${running.url}`,
      `  npx ferry volume create vol1 --size 10G --site ${running.url}`,
      `  npx ferry volume show demo --site ${running.url}`,
      '',
      'Ctrl-C stops the site; the data stays for the next start.',
      '',
    ].join('\n'),
  );
}

main().catch((err: unknown) => {
  const e = err as Error & { code?: string };
  process.stderr.write(`ferry: ${e.code ?? 'INTERNAL'}: ${e.message}\n`);
  process.exit(1);
});
