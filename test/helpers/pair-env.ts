import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino, type Logger } from 'pino';
import { Catalog } from '../../src/storage/catalog.js';
import { JournalFile } from '../../src/storage/journal.js';
import { ReplicationCatalog, type PairRecord } from '../../src/storage/replication-catalog.js';
import type { Volume } from '../../src/storage/volume.js';
import { VolumeStore } from '../../src/storage/volume-store.js';
import { freshCounters } from '../../src/replication/manager.js';

/** One end of a pair for unit tests of the replicators: real files in a temporary directory. */
export interface PairEnv {
  dir: string;
  log: Logger;
  catalog: Catalog;
  store: VolumeStore;
  /** Volume v. */
  volume: Volume;
  replication: ReplicationCatalog;
  /** Stored in `replication` already. */
  pair: PairRecord;
  /** The pair's save volume. */
  journal: JournalFile;
  /** Closes the files and removes the directory. */
  close(): Promise<void>;
}

export async function openPairEnv(options: { role: PairRecord['role']; blockBytes: number; blocks: number; copyDone: boolean; pair?: Partial<PairRecord> }): Promise<PairEnv> {
  const { role, blockBytes, blocks, copyDone } = options;
  const log = pino({ level: 'silent' });
  const dir = await mkdtemp(join(tmpdir(), `ferry-${role}-`));
  await mkdir(join(dir, 'volumes'));
  const catalog = new Catalog(join(dir, 'catalog.db'));
  const store = new VolumeStore(catalog, join(dir, 'volumes'), blockBytes, log);
  await store.load();
  await store.create('v', blocks * blockBytes);
  const volume = store.get('v');
  const replication = new ReplicationCatalog(catalog);
  const now = new Date().toISOString();
  const pair: PairRecord = {
    volume: 'v',
    pairId: 'p1',
    role,
    mode: 'async',
    peerUrl: 'http://127.0.0.1:1',
    peerSiteId: 's',
    peerSiteName: role === 'target' ? 'a' : 'b',
    peerVolume: 'v',
    state: copyDone ? 'duplex' : 'initial-copying',
    stateReason: '',
    generation: 1,
    intervalMs: 10_000,
    highWaterBytes: 64 << 20,
    saveVolumeBytes: 1 << 20,
    createdAt: now,
    initialCopy: copyDone
      ? { cursorBlock: blocks, totalBlocks: blocks, stampedDeltaSet: 0, startedAt: now, doneAt: now, bytes: 0, copyId: 1 }
      : { cursorBlock: 0, totalBlocks: blocks, stampedDeltaSet: 0, startedAt: now, bytes: 0, copyId: 1 },
    ...freshCounters(),
    ...options.pair,
  };
  replication.putPair(pair);
  const journal = await JournalFile.open(join(dir, 'save.journal'), pair.saveVolumeBytes);
  return {
    dir,
    log,
    catalog,
    store,
    volume,
    replication,
    pair,
    journal,
    async close() {
      await journal.close();
      await store.close();
      catalog.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
