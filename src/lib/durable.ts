import { open, rename, readFile, unlink } from 'node:fs/promises';
import { openSync, writeSync, fsyncSync, closeSync, renameSync, readFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { crc32c } from './checksum.js';
import { FerryError } from './errors.js';

/** fsync a directory so a rename or a new entry in it survives power loss. */
export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export function fsyncDirSync(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** Replaces `path` atomically: write a temp file, fsync it, rename over, fsync the directory. */
export async function writeFileAtomic(path: string, data: Uint8Array | string): Promise<void> {
  const tmp = `${path}.tmp`;
  const fh = await open(tmp, 'w', 0o644);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
  await fsyncDir(dirname(path));
}

export function writeFileAtomicSync(path: string, data: Uint8Array | string): void {
  const tmp = `${path}.tmp`;
  const fd = openSync(tmp, 'w', 0o644);
  try {
    const buf = typeof data === 'string' ? Buffer.from(data) : data;
    writeSync(fd, buf, 0, buf.length, 0);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
  fsyncDirSync(dirname(path));
}

/**
 * A small JSON document stored with a magic, a format version and a CRC32C, so that a
 * damaged or foreign file is refused with a typed error instead of being half-read.
 */
interface Envelope<T> {
  magic: string;
  version: number;
  crc32c: number;
  body: T;
}

export function encodeChecksummedJson<T>(magic: string, version: number, body: T): string {
  const bodyText = JSON.stringify(body);
  const envelope: Envelope<T> = { magic, version, crc32c: crc32c(bodyText), body };
  return `${JSON.stringify(envelope, null, 2)}\n`;
}

export function decodeChecksummedJson<T>(text: string, magic: string, versionMax: number, what: string): { version: number; body: T } {
  let envelope: Envelope<T>;
  try {
    envelope = JSON.parse(text) as Envelope<T>;
  } catch {
    throw new FerryError('CORRUPT_FILE', `${what} is not valid JSON`);
  }
  if (typeof envelope !== 'object' || envelope === null || envelope.magic !== magic) {
    throw new FerryError('CORRUPT_FILE', `${what} is not a ${magic} file`);
  }
  if (!Number.isInteger(envelope.version) || envelope.version < 1 || envelope.version > versionMax) {
    throw new FerryError('UNSUPPORTED_FORMAT', `${what} has format version ${String(envelope.version)}; this ferry reads up to ${versionMax}`);
  }
  if (crc32c(JSON.stringify(envelope.body)) !== envelope.crc32c) {
    throw new FerryError('CORRUPT_FILE', `${what} failed its checksum`);
  }
  return { version: envelope.version, body: envelope.body };
}

export async function readChecksummedJson<T>(path: string, magic: string, versionMax: number): Promise<{ version: number; body: T }> {
  return decodeChecksummedJson<T>(await readFile(path, 'utf8'), magic, versionMax, path);
}

export function readChecksummedJsonSync<T>(path: string, magic: string, versionMax: number): { version: number; body: T } {
  return decodeChecksummedJson<T>(readFileSync(path, 'utf8'), magic, versionMax, path);
}

export async function unlinkIfExists(path: string): Promise<void> {
  try {
    await unlink(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
}
