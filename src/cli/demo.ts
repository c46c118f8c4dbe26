import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { resolve, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { initSiteDir } from '../storage/site-dir.js';
import { ApiClient, volumePath } from './client.js';
import { FerryError } from '../lib/errors.js';

/**
 * `npm start`: ferry's main job on embedded defaults — a two-site demo on loopback.
 * Site A (127.0.0.1:7370, NBD 10809) holds volume `demo` and replicates it to site B
 * (127.0.0.1:7371, NBD 10810). Each site is a real daemon in its own process; data
 * stays under ./.ferry/ for the next start. Ctrl-C stops both cleanly.
 *
 * A site that dies (`kill -9`, to try a disaster) leaves the other running: the demo
 * says so and how to start the lost one again, so the whole recovery (failover,
 * resync, failback) can be tried on it.
 *
 * Environment: FERRY_DEMO_DIR (data), FERRY_DEMO_HTTP_PORT and FERRY_DEMO_NBD_PORT
 * (site A's ports, site B's are the next ones; used when the sites are first made).
 */
/** Site A's port from `name` (site B gets the next one); checked before any site is made. */
function demoPort(name: string, fallback: number): number {
  const text = process.env[name];
  const port = text === undefined ? fallback : Number(text);
  if (!Number.isInteger(port) || port < 1 || port > 65534) {
    process.stderr.write(`ferry: BAD_REQUEST: ${name}=${text} is not a port from 1 to 65534 (site B takes the next one); nothing was created\n`);
    process.exit(1);
  }
  return port;
}

const root = resolve(process.env.FERRY_DEMO_DIR ?? '.ferry');
const cli = join(dirname(fileURLToPath(import.meta.url)), 'ferry.cjs');
const httpPort = demoPort('FERRY_DEMO_HTTP_PORT', 7370);
const nbdPort = demoPort('FERRY_DEMO_NBD_PORT', 10809);
const sites = ['site-a', 'site-b'].map((name, i) => ({ name, dir: join(root, name), listen: `127.0.0.1:${httpPort + i}`, nbd: `127.0.0.1:${nbdPort + i}` }));

function startDaemon(dir: string, name: string): Promise<ChildProcess> {
  const child = spawn(process.execPath, [cli, 'site', 'start', '--dir', dir], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, FERRY_LOG_LEVEL: process.env.FERRY_LOG_LEVEL ?? 'info' } });
  return new Promise((resolveStart, reject) => {
    const lines = createInterface({ input: child.stdout! });
    lines.on('line', (line) => {
      if (line.includes('"site started"')) resolveStart(child);
      else if (/"level":(40|50|60)/.test(line)) process.stderr.write(`${name}: ${line}\n`);
    });
    child.once('exit', (code) => reject(new FerryError('UNAVAILABLE', `${name} exited with status ${code} while starting`)));
  });
}

/** Commands with their comments lined up, indented as the banner's lines are. */
function commented(lines: [string, string][]): string[] {
  const width = Math.max(...lines.map(([command]) => command.length));
  return lines.map(([command, comment]) => `  ${command.padEnd(width)}   # ${comment}`);
}

async function main(): Promise<void> {
  for (const s of sites) {
    if (!existsSync(join(s.dir, 'site.json'))) await initSiteDir({ dir: s.dir, name: s.name, listen: s.listen, nbd: s.nbd, blockBytes: 8192 });
  }
  const children = await Promise.all(sites.map((s) => startDaemon(s.dir, s.name)));
  let stopping = false;
  const stop = (): void => {
    if (stopping) return;
    stopping = true;
    for (const c of children) c.kill('SIGTERM');
    Promise.all(children.map((c) => new Promise((r) => (c.exitCode !== null || c.signalCode !== null ? r(null) : c.once('exit', r))))).then(() => process.exit(0), () => process.exit(1));
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  children.forEach((c, i) =>
    c.once('exit', (code, signal) => {
      if (stopping) return;
      const lost = sites[i]!;
      const other = sites[1 - i]!;
      if (children.every((x) => x.exitCode !== null || x.signalCode !== null)) {
        process.stdout.write(`\n${lost.name} stopped too (${signal ?? `status ${code}`}): the demo ends.\n`);
        process.exit(1);
      }
      process.stdout.write(
        [
          '',
          `${lost.name} (pid ${c.pid}) stopped (${signal ?? `status ${code}`}); ${other.name} goes on. To start ${lost.name} again, in another terminal:`,
          `  npx ferry site start --dir ${lost.dir}`,
          '',
        ].join('\n'),
      );
    }),
  );

  const [siteA, siteB] = sites as [(typeof sites)[0], (typeof sites)[0]];
  const A = `http://${siteA.listen}`;
  const B = `http://${siteB.listen}`;
  const a = new ApiClient(A);
  try {
    await a.get(volumePath('demo'));
  } catch (err) {
    if (!(err instanceof FerryError && err.code === 'VOLUME_NOT_FOUND')) throw err;
    await a.post('/api/v1/volumes', { name: 'demo', size: '1G' });
  }
  const pairs = await a.get<{ volume: string }[]>('/api/v1/status');
  // B's demo volume, left by an earlier run whose pair was stopped, is this demo's own replica: overwritten.
  if (!pairs.some((p) => p.volume === 'demo')) await a.post('/api/v1/replication', { volume: 'demo', to: B, interval: '5s', force: true });

  const [pidA, pidB] = children.map((c) => c.pid);
  process.stdout.write(
    [
      '',
      `ferry two-site demo is running (data in ${root})`,
      `  site-a  ${A}/   NBD nbd://${siteA.nbd}/demo   pid ${pidA}`,
      `  site-b  ${B}/   NBD nbd://${siteB.nbd}/demo   pid ${pidB}`,
      '',
      'Volume "demo" replicates from site-a to site-b in delta sets every 5s (after a',
      'restart, "ferry status" says which site is the source now). Try, in another terminal:',
      `  npx ferry status --site ${A}`,
      `  npx ferry info demo -v --site ${A}`,
      `  qemu-io -f raw -c 'write -P 0x5a 0 1M' nbd://${siteA.nbd}/demo`,
      `  npx ferry replicate delta demo --site ${A}        # cut a delta set now`,
      `  npx ferry volume digest demo --site ${A} ; npx ferry volume digest demo --site ${B}`,
      '',
      'A disaster and the way back:',
      ...commented([
        [`kill -9 ${pidA}`, 'site-a is lost'],
        [`npx ferry failover demo --site ${B}`, 'site-b takes over, read-write'],
        [`npx ferry site start --dir ${siteA.dir}`, 'site-a returns: demo is not writable there'],
        [`npx ferry resync demo --wait --site ${B}`, 'rebuild site-a from the blocks that differ'],
        [`npx ferry failback demo --site ${B}`, 'site-a is the source again'],
      ]),
      '',
      'Ctrl-C stops the sites the demo started; the data stays for the next start.',
      '',
    ].join('\n'),
  );
}

main().catch((err: unknown) => {
  const e = err as Error & { code?: string };
  process.stderr.write(`ferry: ${e.code ?? 'INTERNAL'}: ${e.message}\n`);
  process.exit(1);
});
