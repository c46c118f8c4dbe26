import { mkdir, readdir, open, stat, type FileHandle } from 'node:fs/promises';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { tryLock } from 'fs-native-extensions';
import { FerryError } from '../lib/errors.js';
import { readChecksummedJson, writeFileAtomic, encodeChecksummedJson, fsyncDir } from '../lib/durable.js';

/** The on-disk layout of one site. */
export interface SiteLayout {
  dir: string;
  configPath: string;
  catalogPath: string;
  lockPath: string;
  /** The space reserve (see `SpaceReserve`). */
  reservePath: string;
  volumesDir: string;
  replicationDir: string;
}

export function siteLayout(dir: string): SiteLayout {
  return {
    dir,
    configPath: join(dir, 'site.json'),
    catalogPath: join(dir, 'catalog.db'),
    lockPath: join(dir, 'lock'),
    reservePath: join(dir, 'reserve'),
    volumesDir: join(dir, 'volumes'),
    replicationDir: join(dir, 'replication'),
  };
}

export interface SiteConfig {
  id: string;
  name: string;
  /** HOST:PORT of the shared HTTP + RCP listener. */
  listen: string;
  /** HOST:PORT of the NBD listener. */
  nbd: string;
  /** The URL other sites reach this one at, when `listen` is not it (a wildcard, NAT). */
  advertise?: string;
  blockBytes: number;
  createdAt: string;
}

const configMagic = 'ferry-site';
const configVersion = 1;

export const siteNamePattern = /^[A-Za-z0-9._-]{1,64}$/;

export async function readSiteConfig(dir: string): Promise<SiteConfig> {
  const layout = siteLayout(dir);
  try {
    await stat(layout.configPath);
  } catch {
    throw new FerryError('SITE_NOT_FOUND', `${dir} is not a ferry site directory (no site.json); run "ferry site init --dir ${dir} --name NAME" first`);
  }
  return (await readChecksummedJson<SiteConfig>(layout.configPath, configMagic, configVersion)).body;
}

export async function writeSiteConfig(dir: string, config: SiteConfig): Promise<void> {
  await writeFileAtomic(siteLayout(dir).configPath, encodeChecksummedJson(configMagic, configVersion, config));
}

export interface InitOptions {
  dir: string;
  name: string;
  listen: string;
  nbd: string;
  advertise?: string;
  blockBytes: number;
}

/** Creates a site directory. Refuses one that holds anything else, or an existing site. */
export async function initSiteDir(options: InitOptions): Promise<SiteConfig> {
  const { dir } = options;
  if (!siteNamePattern.test(options.name)) {
    throw new FerryError('INVALID_NAME', `site name "${options.name}" must be 1-64 characters of A-Z a-z 0-9 . _ -`);
  }
  if (!Number.isInteger(Math.log2(options.blockBytes)) || options.blockBytes < 512 || options.blockBytes > 1024 * 1024) {
    throw new FerryError('INVALID_SIZE', `block size ${options.blockBytes} must be a power of two from 512 to 1M`);
  }
  await mkdir(dir, { recursive: true });
  const entries = await readdir(dir);
  if (entries.includes('site.json')) {
    throw new FerryError('SITE_EXISTS', `${dir} already holds a ferry site`);
  }
  if (entries.length > 0) {
    throw new FerryError('NOT_A_SITE_DIRECTORY', `${dir} is not empty and is not a ferry site; choose an empty or new directory`);
  }
  const layout = siteLayout(dir);
  await mkdir(layout.volumesDir);
  const config: SiteConfig = {
    id: randomUUID(),
    name: options.name,
    listen: options.listen,
    nbd: options.nbd,
    ...(options.advertise !== undefined ? { advertise: options.advertise } : {}),
    blockBytes: options.blockBytes,
    createdAt: new Date().toISOString(),
  };
  await writeSiteConfig(dir, config);
  await fsyncDir(dir);
  return config;
}

/**
 * An exclusive lock on the site directory, held for the daemon's lifetime. The OS
 * drops it when the process dies, so a SIGKILLed daemon leaves no stale lock.
 */
export class SiteLock {
  private constructor(private readonly fh: FileHandle) {}

  static async acquire(dir: string): Promise<SiteLock> {
    const { lockPath } = siteLayout(dir);
    const fh = await open(lockPath, 'a+', 0o644);
    if (!tryLock(fh.fd)) {
      const holder = (await fh.readFile('utf8')).trim();
      await fh.close();
      throw new FerryError('SITE_LOCKED', `site directory ${dir} is in use by another ferry daemon${holder ? ` (pid ${holder})` : ''}`);
    }
    await fh.truncate(0);
    await fh.write(`${process.pid}\n`, 0);
    return new SiteLock(fh);
  }

  async release(): Promise<void> {
    await this.fh.close().catch(() => undefined);
  }
}
