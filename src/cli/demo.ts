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
 */
const root = resolve(process.env.FERRY_DEMO_DIR ?? '.ferry');
const cli = join(dirname(fileURLToPath(import.meta.url)), 'ferry.cjs');
const sites = [
  { name: 'site-a', dir: join(root, 'site-a'), listen: '127.0.0.1:7370', nbd: '127.0.0.1:10809' },
  { name: 'site-b', dir: join(root, 'site-b'), listen: '127.0.0.1:7371', nbd: '127.0.0.1:10810' },
];

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
    Promise.all(children.map((c) => new Promise((r) => (c.exitCode !== null ? r(null) : c.once('exit', r))))).then(() => process.exit(0), () => process.exit(1));
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  for (const c of children) c.once('exit', () => stop());

  const a = new ApiClient(`http://${sites[0]!.listen}`);
  const b = `http://${sites[1]!.listen}`;
  try {
    await a.get(volumePath('demo'));
  } catch (err) {
    if (!(err instanceof FerryError && err.code === 'VOLUME_NOT_FOUND')) throw err;
    await a.post('/api/v1/volumes', { name: 'demo', size: '1G' });
  }
  const pairs = await a.get<{ volume: string }[]>('/api/v1/status');
  // B's demo volume, left by an earlier run whose pair was stopped, is this demo's own replica: overwritten.
  if (!pairs.some((p) => p.volume === 'demo')) await a.post('/api/v1/replication', { volume: 'demo', to: b, interval: '5s', force: true });

  const A = `http://${sites[0]!.listen}`;
  process.stdout.write(
    [
      '',
      `ferry two-site demo is running (data in ${root})`,
      `  site-a  ${A}/   NBD nbd://${sites[0]!.nbd}/demo   (source, read-write)`,
      `  site-b  ${b}/   NBD nbd://${sites[1]!.nbd}/demo   (replica, read-only)`,
      '',
      'Volume "demo" on site-a replicates to site-b in delta sets every 5s. Try, in another terminal:',
      `  npx ferry status --site ${A}`,
      `  npx ferry info demo -v --site ${A}`,
      `  qemu-io -f raw -c 'write -P 0x5a 0 1M' nbd://${sites[0]!.nbd}/demo`,
      `  npx ferry replicate delta demo --site ${A}        # cut a delta set now`,
      `  npx ferry volume digest demo --site ${A} ; npx ferry volume digest demo --site ${b}`,
      '',
      'Ctrl-C stops both sites; the data stays for the next start.',
      '',
    ].join('\n'),
  );
}

main().catch((err: unknown) => {
  const e = err as Error & { code?: string };
  process.stderr.write(`ferry: ${e.code ?? 'INTERNAL'}: ${e.message}\n`);
  process.exit(1);
});
