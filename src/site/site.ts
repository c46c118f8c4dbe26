import type { Server as HttpServer } from 'node:http';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { FerryError } from '../lib/errors.js';
import { formatHostPort, parseHostPort, type HostPort } from '../lib/units.js';
import { Catalog } from '../storage/catalog.js';
import { SiteLock, readSiteConfig, siteLayout, type SiteConfig, type SiteLayout } from '../storage/site-dir.js';
import { VolumeStore } from '../storage/volume-store.js';
import { RcpServer } from '../transport/rcp-server.js';
import { SiteListener } from '../transport/listener.js';
import { SnapshotManager } from '../snapshot/manager.js';

export interface SiteStartOptions {
  /** The API layer's HTTP server; it never listens itself, the site listener hands it connections. */
  httpServer: HttpServer;
  /** Overrides the configured listen address (tests pass port 0). */
  listen?: string;
  firstBytesTimeoutMs?: number;
}

export interface SiteAddresses {
  listen: HostPort;
}

/**
 * One site: its directory, lock, catalog, volumes and listeners. Opening recovers
 * every persistent structure before any host or peer is let in (SPEC §4); stopping
 * drains and is idempotent.
 */
export class Site {
  readonly volumes: VolumeStore;
  readonly rcp: RcpServer;
  /** Snapshot queues of every volume (SPEC C3); hooks each volume's write path. */
  readonly snapshots: SnapshotManager;
  readonly startedAt = new Date();
  private listener: SiteListener | undefined;
  private httpServer: HttpServer | undefined;
  private addresses: SiteAddresses | undefined;
  private stopping: Promise<void> | undefined;

  private constructor(
    readonly config: SiteConfig,
    readonly layout: SiteLayout,
    readonly catalog: Catalog,
    private readonly lock: SiteLock,
    readonly log: Logger,
  ) {
    this.volumes = new VolumeStore(catalog, layout.volumesDir, config.blockBytes, log);
    this.rcp = new RcpServer({ siteId: config.id, siteName: config.name }, log);
    this.snapshots = new SnapshotManager(catalog, this.volumes, join(layout.dir, 'snapshots'), log);
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
      // Snapshots load after volumes and before anything listens: every volume with
      // snapshots has its copy-on-first-write hook before the first write can arrive.
      await site.snapshots.load();
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
    this.addresses = { listen: bound };
    this.log.info({ listen: formatHostPort(bound), siteId: this.config.id }, 'site started');
    return this.addresses;
  }

  get boundAddresses(): SiteAddresses | undefined {
    return this.addresses;
  }

  /** Drains and closes everything. Safe to call more than once. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.log.info('site stopping');
      this.rcp.closeAll();
      await this.listener?.close();
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
