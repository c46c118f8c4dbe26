import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { open, stat, statfs, unlink } from 'node:fs/promises';
import { isNoSpace } from '../lib/errors.js';

/**
 * Space a site holds back on its file system (the `reserve` file in its directory).
 * Volumes are thin and snapshots and save volumes grow, so the file system can fill;
 * then even the commands that free space fail, since each records its change in the
 * catalog first. Such a command (and a failover, which in a disaster comes first)
 * gives the reserve back when the file system is full, so its records can be written,
 * and the site takes the reserve again once there is room. The size covers catalog
 * records and a few before-images a deleted snapshot hands to an older one, not bulk data.
 */
export const spaceReserveBytes = 16 * 1024 * 1024;

const writePieceBytes = 1024 * 1024;

export interface FileSystemSpace {
  sizeBytes: number;
  availableBytes: number;
}

export async function fileSystemSpace(path: string): Promise<FileSystemSpace> {
  const fs = await statfs(path);
  return { sizeBytes: fs.blocks * fs.bsize, availableBytes: fs.bavail * fs.bsize };
}

export class SpaceReserve {
  private held = 0;
  /** One replenish or release at a time. */
  private busy: Promise<unknown> = Promise.resolve();

  /** `space` reads the file system's space (injected by tests). */
  constructor(
    private readonly path: string,
    private readonly space: () => Promise<FileSystemSpace>,
    readonly targetBytes = spaceReserveBytes,
  ) {}

  /** Bytes the reserve holds now (0 after a release, until it is taken again). */
  get heldBytes(): number {
    return this.held;
  }

  /** Reads what an earlier run left, then takes the reserve in full if there is room. */
  async open(): Promise<void> {
    try {
      this.held = Math.min((await stat(this.path)).size, this.targetBytes);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      this.held = 0;
    }
    await this.replenish();
  }

  /**
   * Takes the reserve again, in full, if the file system has room for it and as much
   * again besides (hosts need the space more). Returns whether it is held in full.
   * Random bytes, new for each piece: a compressing or deduplicating file system would
   * store zeros or a repeated piece in next to nothing.
   */
  replenish(): Promise<boolean> {
    return this.serially(async () => {
      if (this.held >= this.targetBytes) return true;
      const { availableBytes } = await this.space();
      if (availableBytes < 2 * this.targetBytes - this.held) return false;
      // Not O_APPEND: Linux would ignore the offsets given to each write.
      const file = await open(this.path, constants.O_WRONLY | constants.O_CREAT, 0o600);
      try {
        while (this.held < this.targetBytes) {
          const piece = randomBytes(Math.min(writePieceBytes, this.targetBytes - this.held));
          const { bytesWritten } = await file.write(piece, 0, piece.length, this.held);
          this.held += bytesWritten;
        }
        await file.datasync();
        return true;
      } catch (err) {
        // Something else took the space meanwhile: keep what was written.
        if (isNoSpace(err)) return false;
        throw err;
      } finally {
        await file.close();
      }
    });
  }

  /** Gives the reserve back to the file system if it has less than the reserve's size left. Returns the bytes freed. */
  releaseIfFull(): Promise<number> {
    return this.serially(async () => {
      if (this.held === 0) return 0;
      const { availableBytes } = await this.space();
      if (availableBytes >= this.targetBytes) return 0;
      const freed = this.held;
      await unlink(this.path).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== 'ENOENT') throw err;
      });
      this.held = 0;
      return freed;
    });
  }

  private serially<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.busy.then(fn, fn);
    this.busy = run.catch(() => undefined);
    return run;
  }
}
