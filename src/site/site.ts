import type { Server as HttpServer } from 'node:http';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { FerryError } from '../lib/errors.js';
import { formatHostPort, parseHostPort, type HostPort } from '../lib/units.js';
import { ExportRegistry } from '../nbd/export.js';
import { NbdServer } from '../nbd/server.js';
import { Catalog, type VolumeAccess } from '../storage/catalog.js';
import { SiteLock, readSiteConfig, siteLayout, type SiteConfig, type SiteLayout } from '../storage/site-dir.js';
import { SpaceReserve, fileSystemSpace, type FileSystemSpace } from '../storage/space-reserve.js';
import { VolumeStore, type VolumeInfo } from '../storage/volume-store.js';
import { RcpServer } from '../transport/rcp-server.js';
import { SiteListener } from '../transport/listener.js';
import { systemClock } from '../lib/clock.js';
import { ReplicationManager } from '../replication/manager.js';
import type { Extent } from '../storage/volume.js';
import { VolumeExportSource } from './nbd-exports.js';
import { SnapshotManager } from '../snapshot/manager.js';
import { SnapshotExportSource } from './snapshot-exports.js';
import { ferryVersion } from '../lib/version.js';

/** How often a site whose space reserve was given back looks for room to take it again. */
const reserveCheckMs = 30_000;

export interface SiteStartOptions {
  /** The API layer's HTTP server; it never listens itself, the site listener hands it connections. */
  httpServer: HttpServer;
  /** Overrides the configured listen address (tests pass port 0). */
  listen?: string;
  /** Overrides the configured NBD address (tests pass port 0). */
  nbd?: string;
  /** Overrides the configured URL other sites reach this one at. */
  advertise?: string;
  firstBytesTimeoutMs?: number;
}

export interface SiteAddresses {
  listen: HostPort;
  nbd?: HostPort;
}

/**
 * One site: its directory, lock, catalog, volumes and listeners. Opening recovers
 * every persistent structure before any host or peer is let in (SPEC §4); stopping
 * drains and is idempotent.
 */
export class Site {
  readonly volumes: VolumeStore;
  readonly rcp: RcpServer;
  readonly replication: ReplicationManager;
  /** What the NBD listener serves: volumes now, snapshots (`VOL@SNAP`) when that layer adds its source. */
  readonly exports = new ExportRegistry();
  /** Snapshot queues of every volume (SPEC C3); hooks each volume's write path. */
  readonly snapshots: SnapshotManager;
  readonly startedAt = new Date();
  /** Space held back so that the commands freeing space, and a failover, still work on a full file system. */
  readonly reserve: SpaceReserve;
  private reserveTimer: NodeJS.Timeout | undefined;
  private listener: SiteListener | undefined;
  private nbdServer: NbdServer | undefined;
  private httpServer: HttpServer | undefined;
  private addresses: SiteAddresses | undefined;
  private advertised: string | undefined;
  private stopping: Promise<void> | undefined;

  private constructor(
    readonly config: SiteConfig,
    readonly layout: SiteLayout,
    readonly catalog: Catalog,
    private readonly lock: SiteLock,
    readonly log: Logger,
  ) {
    this.volumes = new VolumeStore(catalog, layout.volumesDir, config.blockBytes, log);
    this.reserve = new SpaceReserve(layout.reservePath, () => fileSystemSpace(layout.dir));
    this.rcp = new RcpServer({ siteId: config.id, siteName: config.name }, log);
    this.snapshots = new SnapshotManager(catalog, this.volumes, join(layout.dir, 'snapshots'), log);
    this.replication = new ReplicationManager({
      self: { siteId: config.id, siteName: config.name },
      selfUrl: () => this.url,
      blockBytes: config.blockBytes,
      volumes: this.volumes,
      catalog,
      replicationDir: layout.replicationDir,
      rcp: this.rcp,
      clock: systemClock,
      log,
      setAccess: (volume, access) => this.setVolumeAccess(volume, access),
      hostConnections: (volume) => this.nbdServer?.connectionsByExport().get(volume) ?? 0,
      snapshots: this.snapshots,
    });
    this.exports.add(new VolumeExportSource(this.volumes, (name) => this.replication.targets.get(name)));
    this.exports.add(new SnapshotExportSource(this.volumes, this.snapshots));
  }

  /**
   * The API URL peers reach this site at: the advertised one, else the bound listener
   * (a wildcard host there is replaced by the peer with the address the connection
   * came from: see `reachableUrl`).
   */
  get url(): string {
    if (this.advertised !== undefined) return this.advertised;
    const a = this.addresses?.listen ?? parseHostPort(this.config.listen);
    return `http://${formatHostPort(a)}`;
  }

  /** Threads of libuv's pool, which carry the site's file I/O (set by the `ferry` command's entry, `ferry.cts`). */
  get threadPoolSize(): number {
    return Number(process.env.UV_THREADPOOL_SIZE ?? 4);
  }

  /** The size of the site directory's file system and what is left on it (volumes, snapshots and save volumes grow into it). */
  fileSystemSpace(): Promise<FileSystemSpace> {
    return fileSystemSpace(this.layout.dir);
  }

  /**
   * Runs a command a full file system must not stop: one that frees space (deleting a
   * volume or a snapshot, ending a pair), or a failover (in a disaster, taking over comes
   * first). On a full file system its own records could not be written: the space
   * reserve is given back first, and taken again after.
   */
  async usingReserve<T>(what: string, fn: () => Promise<T>): Promise<T> {
    const freedBytes = await this.reserve.releaseIfFull();
    if (freedBytes > 0) this.log.warn({ freedBytes, command: what }, 'the file system is full: the space reserve is given back so that this command can run');
    try {
      return await fn();
    } finally {
      await this.replenishReserve();
    }
  }

  private async replenishReserve(): Promise<void> {
    const wasHeld = this.reserve.heldBytes;
    try {
      if ((await this.reserve.replenish()) && wasHeld < this.reserve.targetBytes) this.log.info({ reserveBytes: this.reserve.targetBytes }, 'space reserve taken again');
    } catch (err) {
      this.log.warn({ err }, 'the space reserve could not be taken again');
    }
  }

  /**
   * What hosts and digests read for a volume: a replication target's consistent image
   * (with the delta set under playback laid over it), else the volume itself.
   */
  reader(name: string): { sizeBytes: number; readInto(buf: Uint8Array, offset: number): Promise<void>; blockStatus(offset: number, length: number): Extent[] } {
    const volume = this.volumes.get(name);
    const target = this.replication.targets.get(name);
    return {
      sizeBytes: volume.sizeBytes,
      readInto: target ? (buf, offset) => target.readInto(buf, offset) : (buf, offset) => volume.readInto(buf, offset),
      blockStatus: target ? (offset, length) => target.blockStatus(offset, length) : (offset, length) => volume.blockStatus(offset, length),
    };
  }

  static async open(dir: string, log: Logger): Promise<Site> {
    const config = await readSiteConfig(dir);
    const layout = siteLayout(dir);
    const lock = await SiteLock.acquire(dir);
    let catalog: Catalog | undefined;
    try {
      catalog = new Catalog(layout.catalogPath);
      const site = new Site(config, layout, catalog, lock, log.child({ site: config.name }));
      await site.volumes.load();
      // Snapshots load after volumes and before anything writes: every volume with
      // snapshots has its copy-on-first-write hook before the first write, including
      // a replica's redo of an interrupted playback when replication loads.
      await site.snapshots.load();
      await site.replication.load();
      await site.reserve.open();
      if (site.reserve.heldBytes < site.reserve.targetBytes) {
        log.warn({ reserveBytes: site.reserve.targetBytes, heldBytes: site.reserve.heldBytes }, 'the file system has no room for the space reserve: it is taken once space is freed');
      }
      return site;
    } catch (err) {
      catalog?.close();
      await lock.release();
      throw err;
    }
  }

  async start(options: SiteStartOptions): Promise<SiteAddresses> {
    if (this.listener) throw new FerryError('BAD_REQUEST', 'site already started');
    const listen = parseHostPort(options.listen ?? this.config.listen);
    this.httpServer = options.httpServer;
    this.listener = new SiteListener({
      host: listen.host,
      port: listen.port,
      http: this.httpServer,
      rcp: this.rcp,
      log: this.log,
      ...(options.firstBytesTimeoutMs !== undefined ? { firstBytesTimeoutMs: options.firstBytesTimeoutMs } : {}),
    });
    const bound = await this.listener.listen();
    this.advertised = options.advertise ?? this.config.advertise;
    const nbdAddress = parseHostPort(options.nbd ?? this.config.nbd);
    this.nbdServer = new NbdServer({ host: nbdAddress.host, port: nbdAddress.port, provider: this.exports, log: this.log });
    const nbdBound = await this.nbdServer.listen();
    this.addresses = { listen: bound, nbd: nbdBound };
    this.replication.startAll();
    // Space freed outside ferry (or by a catch-up's end) lets the reserve be taken again.
    this.reserveTimer = setInterval(() => {
      if (this.reserve.heldBytes < this.reserve.targetBytes) void this.replenishReserve();
    }, reserveCheckMs);
    this.reserveTimer.unref();
    this.log.info({ listen: formatHostPort(bound), nbd: formatHostPort(nbdBound), siteId: this.config.id, ferryVersion, threadPoolSize: this.threadPoolSize }, 'site started');
    return this.addresses;
  }

  get boundAddresses(): SiteAddresses | undefined {
    return this.addresses;
  }

  get nbd(): NbdServer | undefined {
    return this.nbdServer;
  }

  /** Changes who may use a volume; its NBD connections drain and reconnect to see the new mode. */
  async setVolumeAccess(name: string, access: VolumeAccess): Promise<VolumeInfo> {
    const info = this.volumes.setAccess(name, access);
    await this.nbdServer?.disconnectExport(name);
    this.log.info({ volume: name, access }, 'volume access changed');
    return info;
  }

  /** Drains and closes everything. Safe to call more than once. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.log.info('site stopping');
      clearInterval(this.reserveTimer);
      await this.replication.close();
      this.rcp.closeAll();
      this.listener?.close();
      // Hosts' requests in flight are answered before the volumes close.
      await this.nbdServer?.close();
      this.httpServer?.closeAllConnections();
      await new Promise<void>((resolve) => (this.httpServer ? this.httpServer.close(() => resolve()) : resolve()));
      await this.snapshots.close();
      await this.volumes.close();
      this.catalog.close();
      await this.lock.release();
      this.log.info('site stopped');
    })();
    return this.stopping;
  }
}
