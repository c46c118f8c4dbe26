/**
 * A child process for crash tests: opens a snapshot environment in DIR, says "ready",
 * runs one operation and says "done". The parent SIGKILLs it at a random moment.
 *   node snapshot-child.js DIR delete SNAP | create SNAP | write SEED
 */
import { join } from 'node:path';
import { pino } from 'pino';
import { Catalog } from '../../src/storage/catalog.js';
import { VolumeStore } from '../../src/storage/volume-store.js';
import { SnapshotManager } from '../../src/snapshot/manager.js';

const childBlockBytes = 4096;

// `node --test dist/test/` also loads helpers; without arguments this file does nothing.
if (process.argv.length >= 5) await main();

async function main(): Promise<void> {
const [dir, op, arg] = process.argv.slice(2) as [string, string, string];
const log = pino({ level: 'silent' });
const catalog = new Catalog(join(dir, 'catalog.db'));
const store = new VolumeStore(catalog, join(dir, 'volumes'), childBlockBytes, log);
await store.load();
const snaps = new SnapshotManager(catalog, store, join(dir, 'snapshots'), log);
await snaps.load();
process.stdout.write('ready\n');
if (op === 'delete') await snaps.delete('v', arg);
else if (op === 'create') await snaps.create('v', arg);
else if (op === 'write') {
  const v = store.get('v');
  const data = Buffer.alloc(64 * childBlockBytes, Number(arg) & 0xff);
  for (let o = 0; o + data.length <= v.sizeBytes; o += data.length) await v.write(o, data);
}
process.stdout.write('done\n');
await snaps.close();
await store.close();
catalog.close();
}
