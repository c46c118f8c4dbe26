/**
 * A seeded simulator of one asynchronous pair (SPEC §3, STYLE 1): a source and a target
 * site, an in-memory volume, save volume and mailbox at each, a network that drops,
 * damages, stalls and cuts connections, and crashes of either site at any moment.
 * The deciding code is ferry's own: the pair-state machine, the delta-set triggers,
 * the sender's window and the receiver's ledger, the choice of what to play back and
 * what to free, and the recovery plan of a failover. Only storage, network and clock
 * are simulated, in virtual time, so one seed runs minutes of faults in milliseconds
 * and a failing seed replays exactly.
 *
 * The pair starts with a new remote copy (E FIG. 11) of a volume that holds data,
 * while hosts write and delta sets flow on the other connection; a backlog larger
 * than the save volume is caught up by a copy of its blocks while the target serves
 * readers from a protective snapshot (rule 8); the target site may
 * crash as a process (its page cache survives) or lose power (writes it has not
 * flushed may or may not be on disk).
 *
 * Checked after every event: until the copy is whole, every block below the target's
 * durable copy cursor holds the copied image on disk; after it, the target's image
 * as readers see it is the source's image at a delta-set boundary (rule 2); a delta
 * set is acknowledged only once the target holds it durably; nothing that does not
 * match its header is ever sealed; no delta set the target still needs is freed. At
 * the end: either the faults
 * stop and the target catches up to exactly the source's image, in Duplex, without
 * a further copy; or the target fails over (refused while it holds no consistent
 * image), and the undo list the old source would build covers every block it changed
 * after the restart point.
 */
import assert from 'node:assert/strict';
import { crc32c, crc32cCombine } from '../../src/lib/checksum.js';
import { RingSpace, recordAlignBytes } from '../../src/storage/journal.js';
import type { BitmapFile } from '../../src/storage/bitmap-file.js';
import { PagedBitmap } from '../../src/lib/paged-bitmap.js';
import { ActivityLog, type ActivityLogStore } from '../../src/tracking/activity-log.js';
import { ChangeLog } from '../../src/tracking/change-log.js';
import {
  CopyWindow,
  DeltaSetWindow,
  ReceiveLedger,
  SessionRetries,
  copyRetransmitMs,
  copyStart,
  judgeCopyDone,
  judgeCopyPiece,
  makeRoom,
  nextToPlay,
  resumePoint,
  retransmitMs,
  rowToSend,
  targetReleasePoint,
  type SendAction,
} from '../../src/replication/ledger.js';
import { initialPairStatus, isActive, nextPairStatus, type PairEvent } from '../../src/replication/pair-state.js';
import { DeltaSetTrigger } from '../../src/replication/triggers.js';
import { headerCrcFields, type AckBody, type CopyAckBody, type DeltaSetHeaderBody, type NackBody, type TargetPosition } from '../../src/replication/protocol.js';
import { checkFailover, planUndo } from '../../src/recovery/plan.js';
import { cutterPollMs, heartbeatMs } from '../../src/replication/source.js';
import { fullNoticeMs } from '../../src/replication/target.js';
import type { DeltaSetRecord, PairRecord } from '../../src/storage/replication-catalog.js';

// ---- knobs ---------------------------------------------------------------------------

const blockCount = 48;
const blockBytes = 4;
const chunkBlocksMax = 4;
/** Every chunk record takes one aligned unit of a save volume. */
const recordBytes = recordAlignBytes;
/** Holds a delta set of 36 of the 48 blocks at most: a larger backlog is caught up by a copy (rule 8). */
const sourceSaveBytes = 10 * recordBytes;
/** The smallest the target's may be: the source's (the manager refuses less). */
const targetSaveBytes = sourceSaveBytes;
const intervalMs = 300;
const highWaterBytes = 24 * blockBytes;
const openTimeoutMs = 2_000;
/** Activity-log extents of 4 blocks, at most 8 of the 12 hot: evictions happen. */
const extentBlocks = 4;
const alExtentsMax = 8;
/** Blocks of a copy piece. */
const pieceBlocks = 6;
/** The target makes its copy cursor durable (flush, then record) every this many pieces, or once a second. */
const copyFlushPieces = 3;
const copyPersistMs = 1_000;
const playedHistoryMax = 2;

export interface SimOptions {
  seed: number;
  /** Virtual time with faults and writes. */
  faultMs: number;
  /** End with a failover at the target instead of catching up. */
  failover?: 'default' | 'now';
}

export interface SimReport {
  seed: number;
  events: number;
  writes: number;
  deltaSetsCreated: number;
  deltaSetsPlayed: number;
  sourceCrashes: number;
  targetCrashes: number;
  connectionsCut: number;
  framesDamaged: number;
  retransmits: number;
  suspendedByFailure: number;
  sourceSaveVolumeFull: number;
  targetSaveVolumeFull: number;
  targetPowerLosses: number;
  copyRewinds: number;
  /** Virtual ms until the target had the whole initial copy (-1: never). */
  copyDoneAtMs: number;
  catchUps: number;
  catchUpsDone: number;
  storeErrors: number;
  sourcePowerLosses: number;
  failoverRefused?: string;
  failover?: { restartPoint: number; skippedDeltaSets: number; undoBlocks: number; changedBlocks: number; plan: 'delta-sets' | 'full-copy' };
}

// ---- seeded randomness and virtual time -------------------------------------------------

class Random {
  constructor(private state: number) {}
  /** mulberry32 */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) | 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
}

class Scheduler {
  now = 0;
  events = 0;
  private queue: { at: number; seq: number; run: () => void }[] = [];
  private seq = 0;

  at(delayMs: number, run: () => void): void {
    const e = { at: this.now + Math.max(0, delayMs), seq: this.seq++, run };
    let i = this.queue.length;
    while (i > 0 && ((this.queue[i - 1] as { at: number }).at > e.at)) i--;
    this.queue.splice(i, 0, e);
  }

  /** Async work of ferry's own code started by events (the change log), finished before the next event. */
  private readonly pending = new Set<Promise<unknown>>();

  async drain(): Promise<void> {
    while (this.pending.size > 0) await Promise.all([...this.pending]);
  }

  track(work: Promise<unknown>): void {
    const p = work.finally(() => this.pending.delete(p));
    this.pending.add(p);
  }

  /**
   * Runs events until `untilMs` or until `stop` says so after an event. The simulated
   * storage answers at once, so the async work an event starts completes in virtual
   * time zero, before the next event.
   */
  async run(untilMs: number, afterEach: () => void, stop: () => boolean = () => false): Promise<void> {
    while (this.queue.length > 0 && (this.queue[0] as { at: number }).at <= untilMs) {
      const e = this.queue.shift() as { at: number; run: () => void };
      this.now = e.at;
      this.events++;
      e.run();
      await this.drain();
      afterEach();
      if (stop()) return;
    }
    this.now = Math.max(this.now, untilMs);
  }
}

// ---- data ----------------------------------------------------------------------------

/** A chunk: blocks and the values they hold at the cut. */
interface SimChunk {
  blocks: number[];
  values: number[];
}

function chunkData(c: SimChunk): Buffer {
  const b = Buffer.alloc(c.values.length * blockBytes);
  c.values.forEach((v, i) => b.writeInt32LE(v, i * blockBytes));
  return b;
}

interface JournalRecord {
  lsn: number;
  generation: number;
  n: number;
  index: number;
  chunk: SimChunk;
}

/** A save volume: records by position; one written over part of another destroys it. */
class SimJournal {
  readonly records = new Map<number, JournalRecord>();
  constructor(readonly capacityBytes: number) {}
  write(r: JournalRecord): void {
    const at = r.lsn % this.capacityBytes;
    for (const [lsn] of this.records) if (lsn % this.capacityBytes === at) this.records.delete(lsn);
    this.records.set(r.lsn, r);
  }
  read(lsn: number, expect: { generation: number; n: number; index: number }): JournalRecord | undefined {
    const r = this.records.get(lsn);
    return r && r.generation === expect.generation && r.n === expect.n && r.index === expect.index ? r : undefined;
  }
  /** The record at or after `lsn` within the lap skip (what a reader walking the ring finds next). */
  next(lsn: number): JournalRecord | undefined {
    const direct = this.records.get(lsn);
    if (direct) return direct;
    const lap = Math.ceil(lsn / this.capacityBytes) * this.capacityBytes;
    return lap !== lsn ? this.records.get(lap) : undefined;
  }
}

/** A mailbox row, as the catalog keeps it. */
type Row = Pick<DeltaSetRecord, 'generation' | 'n' | 'state' | 'startLsn' | 'endLsn' | 'chunks' | 'blocks' | 'dataBytes' | 'dataCrc' | 'createdAtMs' | 'afterCopy'>;

// ---- network -------------------------------------------------------------------------

type ToTarget =
  | { t: 'chunk'; n: number; index: number; generation: number; chunk: SimChunk }
  | { t: 'header'; body: DeltaSetHeaderBody }
  | { t: 'piece'; copyId: number; from: number; to: number; blocks: number[]; values: number[] }
  | { t: 'copy-done'; copyId: number; stampedDeltaSet: number; final: boolean }
  | { t: 'heartbeat' }
  | { t: 'damaged' };
type ToSource = { t: 'open-ok'; position: TargetPosition } | { t: 'ack'; body: AckBody } | { t: 'nack'; body: NackBody } | { t: 'copy-ack'; body: CopyAckBody } | { t: 'damaged' };
type Channel = 'deltas' | 'copy';

class Connection {
  open = true;
  private lastAt = { source: 0, target: 0 };
  onSourceFrame: (f: ToSource) => void = () => undefined;
  onTargetFrame: (f: ToTarget) => void = () => undefined;
  onClose: (() => void)[] = [];

  constructor(
    private readonly net: Network,
    readonly id: number,
  ) {}

  toTarget(f: ToTarget): void {
    this.deliver('target', () => this.onTargetFrame(this.net.damage(f) ? { t: 'damaged' } : f));
  }

  toSource(f: ToSource): void {
    this.deliver('source', () => this.onSourceFrame(this.net.damage(f) ? { t: 'damaged' } : f));
  }

  close(): void {
    if (!this.open) return;
    this.open = false;
    for (const c of this.onClose) this.net.sched.at(this.net.latency(), c);
  }

  private deliver(to: 'source' | 'target', handle: () => void): void {
    if (!this.open) return;
    if (this.net.cutNow()) {
      this.close();
      return;
    }
    // TCP: in order, each frame after the one before it.
    const at = Math.max(this.lastAt[to], this.net.sched.now + this.net.latency());
    this.lastAt[to] = at;
    this.net.sched.at(at - this.net.sched.now, () => {
      if (this.open) handle();
    });
  }
}

class Network {
  partitionedUntilMs = 0;
  faults = true;
  cut = 0;
  damaged = 0;
  private nextId = 1;
  constructor(
    readonly sched: Scheduler,
    private readonly rnd: Random,
  ) {}
  latency(): number {
    return this.faults && this.rnd.chance(0.02) ? this.rnd.int(200, 2_500) : this.rnd.int(1, 15);
  }
  damage(f: { t: string }): boolean {
    if (!this.faults || f.t === 'open-ok' || !this.rnd.chance(0.03)) return false;
    this.damaged++;
    return true;
  }
  cutNow(): boolean {
    if (!this.faults || !this.rnd.chance(0.004)) return false;
    this.cut++;
    return true;
  }
  get partitioned(): boolean {
    return this.sched.now < this.partitionedUntilMs;
  }
  connect(): Connection {
    return new Connection(this, this.nextId++);
  }
}

// ---- the simulation -------------------------------------------------------------------

export async function simulate(options: SimOptions): Promise<SimReport> {
  const rnd = new Random(options.seed);
  const sched = new Scheduler();
  const net = new Network(sched, rnd);
  const generation = 1;
  const report: SimReport = {
    seed: options.seed,
    events: 0,
    writes: 0,
    deltaSetsCreated: 0,
    deltaSetsPlayed: 0,
    sourceCrashes: 0,
    targetCrashes: 0,
    connectionsCut: 0,
    framesDamaged: 0,
    retransmits: 0,
    suspendedByFailure: 0,
    sourceSaveVolumeFull: 0,
    targetSaveVolumeFull: 0,
    targetPowerLosses: 0,
    copyRewinds: 0,
    copyDoneAtMs: -1,
    catchUps: 0,
    catchUpsDone: 0,
    storeErrors: 0,
    sourcePowerLosses: 0,
  };
  const trace = process.env.FERRY_SIM_TRACE ? (msg: string) => console.log(`${String(sched.now).padStart(7)} ${msg}`) : () => undefined;
  /** The volume holds data before it is replicated: the copy's snapshot, stamped with delta set 0. */
  const copyImage = Int32Array.from({ length: blockCount }, () => (rnd.chance(0.6) ? rnd.int(1, 999) * 1_000 : 0));
  /** The source's image at each delta-set boundary, by delta set number. */
  const boundaries = new Map<number, Int32Array>([[0, copyImage]]);
  /**
   * Each copy of the pair: the image it copies (taken at the switch for a catch-up),
   * the blocks it copies (all, or the backlog), the delta set stamped on it.
   */
  interface SimCopy {
    copyId: number;
    image: Int32Array;
    blocks: number[] | undefined;
    stampedDeltaSet: number;
  }
  const copies = new Map<number, SimCopy>([[1, { copyId: 1, image: copyImage, blocks: undefined, stampedDeltaSet: 0 }]]);

  // ---- durable state of each site (survives a crash) -------------------------------------

  const sourceDisk = {
    image: Int32Array.from(copyImage),
    journal: new SimJournal(sourceSaveBytes),
    rows: [] as Row[],
    pair: { generation, deltaSetCreated: 0, deltaSetAcked: 0, deltaSetPlayedBack: 0, status: nextPairStatus(initialPairStatus, { type: 'start' }) },
    /** The pair's current copy, done or not (a catch-up's backlog stays until the target has it all). */
    copy: { copyId: 1, done: false, catchUp: false },
    /** What is on the source's disk; `image` is what hosts see (with the page cache over it). */
    durable: Int32Array.from(copyImage),
    /** Blocks whose newest contents are only in the page cache. */
    unflushed: new Set<number>(),
    /** The change log's files: its persisted bitmap, and the activity log's two slots (rule 1). */
    dirtyBitmap: [] as [number, number][],
    alSlots: [undefined, undefined] as [Buffer | undefined, Buffer | undefined],
  };
  const flushSource = (): void => {
    for (const b of sourceDisk.unflushed) sourceDisk.durable[b] = sourceDisk.image[b] as number;
    sourceDisk.unflushed.clear();
  };
  /** The activity log's file, in memory: a slot is durable once written. */
  const alStore: ActivityLogStore = {
    writeSlot: async (slot, bytes) => void (sourceDisk.alSlots[slot] = Buffer.from(bytes)),
    readSlots: async () => [sourceDisk.alSlots[0], sourceDisk.alSlots[1]],
    close: async () => undefined,
  };
  /** The change log's bitmap file, in memory: durable at `sync`. */
  const bitmapFile = (): BitmapFile => {
    const bitmap = new PagedBitmap(blockCount);
    for (const [s0, n0] of sourceDisk.dirtyBitmap) bitmap.setRange(s0, n0);
    const file = { bitmap, sync: async () => void (sourceDisk.dirtyBitmap = [...bitmap.runs()]) };
    return file as unknown as BitmapFile;
  };
  /** What a restart (or a resync's undo list) finds tracked: the persisted bitmap and every block of a hot extent. */
  async function trackedOnDisk(): Promise<Set<number>> {
    const out = new Set<number>();
    for (const [s0, n0] of sourceDisk.dirtyBitmap) for (let b = s0; b < s0 + n0; b++) out.add(b);
    const { recovered } = await ActivityLog.open(alStore, alExtentsMax);
    for (const e of recovered) for (let b = e * extentBlocks; b < Math.min(blockCount, (e + 1) * extentBlocks); b++) out.add(b);
    return out;
  }
  const targetDisk = {
    /** What is on disk. */
    image: new Int32Array(blockCount),
    journal: new SimJournal(targetSaveBytes),
    rows: [] as Row[],
    pair: { deltaSetReceived: 0, deltaSetPlayedBack: 0 },
    copy: { copyId: 1, cursorBlock: 0, done: false, stampedDeltaSet: 0 },
    /** The last copy the target had whole (0: none yet). */
    wholeCopyId: 0,
    /** The consistent image readers get while a catch-up is applied (a snapshot). */
    protectedImage: undefined as Int32Array | undefined,
  };
  /** Target volume writes not flushed yet: in the page cache, lost (some of them) with the power. */
  const targetCache = new Map<number, number>();
  const volWrite = (block: number, value: number): void => void targetCache.set(block, value);
  const volFlush = (): void => {
    for (const [b, v] of targetCache) targetDisk.image[b] = v;
    targetCache.clear();
  };

  // ---- source --------------------------------------------------------------------------

  interface SourceRun {
    up: boolean;
    ring: RingSpace;
    trigger: DeltaSetTrigger;
    /** ferry's change log (E FIG. 8, 10), over the files above. */
    changeLog: ChangeLog;
    building: { n: number; blocks: number[]; values: number[]; old: PagedBitmap } | undefined;
    saveVolumeFull: boolean;
    session: { conn: Connection; window: DeltaSetWindow | undefined; next: number; fromChunk: number; silenceAt: number; progressed: boolean } | undefined;
    opening: Connection | undefined;
    retries: SessionRetries;
    copy: { conn: Connection; plan: SimCopy; window: CopyWindow | undefined; finishing: boolean; progressed: boolean; quietSince: number } | undefined;
    copyRetries: SessionRetries;
  }
  let src!: SourceRun;
  let srcLife = 0;
  /** After a failover the source site is gone for good. */
  let sourceLost = false;

  const srcAlive = (life: number, fn: () => void) => () => {
    if (src.up && srcLife === life) fn();
  };

  function sourceStart(): void {
    srcLife++;
    const life = srcLife;
    sched.track(openSource(life));
  }

  async function openSource(life: number): Promise<void> {
    const { log: al, recovered } = await ActivityLog.open(alStore, alExtentsMax);
    const changeLog = new ChangeLog(blockBytes, bitmapFile(), al, async () => flushSource(), { extentBytes: extentBlocks * blockBytes, now: () => sched.now });
    await changeLog.recover(recovered);
    if (srcLife !== life) return;
    const rows = sourceDisk.rows;
    const head = rows.reduce((h, d) => Math.max(h, d.endLsn), 0);
    const tail = rows.length > 0 ? Math.min(...rows.map((d) => d.startLsn)) : head;
    src = { up: true, changeLog, ring: new RingSpace(sourceSaveBytes, head, tail), trigger: new DeltaSetTrigger({ intervalMs, highWaterBytes }, sched.now), building: undefined, saveVolumeFull: false, session: undefined, opening: undefined, retries: new SessionRetries(), copy: undefined, copyRetries: new SessionRetries() };
    const cutter = (): void => {
      cutTick();
      sched.at(cutterPollMs, srcAlive(life, cutter));
    };
    sched.at(cutterPollMs, srcAlive(life, cutter));
    sched.at(0, srcAlive(life, connect));
    sched.at(0, srcAlive(life, copyConnect));
    const heartbeat = (): void => {
      const s = src.session;
      if (s && !s.window) s.conn.toTarget({ t: 'heartbeat' });
      sched.at(heartbeatMs, srcAlive(life, heartbeat));
    };
    sched.at(heartbeatMs, srcAlive(life, heartbeat));
  }

  function applyState(e: PairEvent): void {
    const next = nextPairStatus(sourceDisk.pair.status, e);
    if (next.state === 'suspended' && next.cause === 'failure' && sourceDisk.pair.status.state !== 'suspended') report.suspendedByFailure++;
    sourceDisk.pair.status = next;
  }

  /** Blocks written and not in a sealed delta set. */
  function dirtyCount(): number {
    return src.changeLog.current.count + (src.changeLog.old?.count ?? 0);
  }

  /** A host write: marked in the change log (durably, rule 1), then its data goes to the page cache. */
  function hostWrite(): void {
    const block = rnd.int(0, blockCount - 1);
    const life = srcLife;
    sched.track(
      src.changeLog.mark(block, 1).then(() => {
        if (srcLife !== life) return;
        sourceDisk.image[block] = (sourceDisk.image[block] as number) + 1;
        sourceDisk.unflushed.add(block);
        report.writes++;
      }),
    );
  }

  function cutTick(): void {
    const { changeLog } = src;
    const modified = changeLog.current.count * blockBytes;
    const reason = src.trigger.due(sched.now, modified);
    if (!reason || src.building || changeLog.current.count === 0) return;
    const blocks: number[] = [];
    for (const [s0, n0] of changeLog.current.runs()) for (let b = s0; b < s0 + n0; b++) blocks.push(b);
    const chunks = Math.ceil(blocks.length / chunkBlocksMax);
    const needBytes = (chunks + 1) * recordBytes;
    if (needBytes > sourceSaveBytes) {
      // Not even an empty save volume holds this backlog: it goes as a copy of its blocks
      // (rule 8), once no other copy runs.
      if (!sourceDisk.copy.done) {
        src.saveVolumeFull = true;
        return;
      }
      return startCatchUp(blocks);
    }
    const { fits, freed } = makeRoom(src.ring, sourceDisk.rows, needBytes);
    for (const d of freed) {
      assert.equal(d.state, 'acked', `freed delta set ${d.n} the target has not acknowledged`);
      sourceDisk.rows.splice(sourceDisk.rows.indexOf(d), 1);
    }
    if (!fits) {
      if (!src.saveVolumeFull) report.sourceSaveVolumeFull++;
      src.saveVolumeFull = true; // rule 8: the bitmap keeps accumulating
      return;
    }
    src.saveVolumeFull = false;
    // The switch: the old table's blocks, with their values at this instant (their
    // before-images are copied on a later write, E FIG. 10).
    const n = sourceDisk.pair.deltaSetCreated + 1;
    const old = changeLog.switchTables();
    src.building = { n, blocks, values: blocks.map((b) => sourceDisk.image[b] as number), old };
    const image = Int32Array.from(sourceDisk.image);
    src.trigger.rearm(sched.now);
    const createdAtMs = sched.now;
    // Written while the copy runs: the target must not play it back before the copy is whole.
    const afterCopy = sourceDisk.copy.done ? undefined : sourceDisk.copy.copyId;
    const life = srcLife;
    sched.at(rnd.int(1, 60), srcAlive(life, () => seal(n, image, createdAtMs, afterCopy)));
  }

  /** The switch, a snapshot of the volume now, and the backlog recorded as the blocks of the next copy. */
  function startCatchUp(backlog: number[]): void {
    const copyId = sourceDisk.copy.copyId + 1;
    copies.set(copyId, { copyId, image: Int32Array.from(sourceDisk.image), blocks: backlog, stampedDeltaSet: sourceDisk.pair.deltaSetCreated });
    sourceDisk.copy = { copyId, done: false, catchUp: true };
    flushSource(); // the catch-up's snapshot is taken after a flush of the volume
    // The copy's record (with its blocks) is durable: the change log may forget them.
    src.changeLog.switchTables();
    sched.track(src.changeLog.handOff());
    src.saveVolumeFull = false;
    src.trigger.rearm(sched.now);
    report.catchUps++;
    trace(`source: catch-up copy ${copyId} of ${backlog.length} blocks, stamped ${sourceDisk.pair.deltaSetCreated}`);
    applyState({ type: 'catch-up' });
    copyConnect();
  }

  function seal(n: number, image: Int32Array, createdAtMs: number, afterCopy: number | undefined): void {
    const b = src.building as NonNullable<SourceRun['building']>;
    let startLsn: number | undefined;
    let dataCrc = 0;
    const chunks = Math.ceil(b.blocks.length / chunkBlocksMax);
    for (let index = 0; index < chunks; index++) {
      const chunk = { blocks: b.blocks.slice(index * chunkBlocksMax, (index + 1) * chunkBlocksMax), values: b.values.slice(index * chunkBlocksMax, (index + 1) * chunkBlocksMax) };
      const lsn = src.ring.allocate(recordBytes);
      assert.ok(lsn !== undefined, 'space peeked for the delta set was there');
      startLsn ??= lsn;
      sourceDisk.journal.write({ lsn, generation, n, index, chunk });
      dataCrc = crc32cCombine(dataCrc, crc32c(chunkData(chunk)), chunk.values.length * blockBytes);
    }
    // The mailbox row makes it visible to the sender; only then may tracking forget it.
    sourceDisk.rows.push({ generation, n, state: 'ready', startLsn: startLsn as number, endLsn: src.ring.head, chunks, blocks: b.blocks.length, dataBytes: b.blocks.length * blockBytes, dataCrc, createdAtMs, ...(afterCopy !== undefined ? { afterCopy } : {}) });
    sourceDisk.pair.deltaSetCreated = n;
    boundaries.set(n, image);
    src.building = undefined;
    report.deltaSetsCreated = n;
    // The mailbox row is written: tracking may forget the old table's blocks.
    b.old.clearAll();
    sched.track(src.changeLog.sealed());
    pump();
  }

  function connect(): void {
    if (!isActive(sourceDisk.pair.status) && !(sourceDisk.pair.status.state === 'suspended' && sourceDisk.pair.status.cause === 'failure')) return;
    const life = srcLife;
    const conn = net.connect();
    src.opening = conn;
    conn.onSourceFrame = (f) => srcAlive(life, () => onSourceFrame(conn, f))();
    conn.onClose.push(srcAlive(life, () => sessionEnded(conn)));
    sched.at(openTimeoutMs, srcAlive(life, () => src.opening === conn && conn.close()));
    if (net.partitioned || !tgt.up) {
      conn.close();
      return;
    }
    tgt.accept(conn, 'deltas');
  }

  function sessionEnded(conn: Connection): void {
    const s = src.session;
    if (src.opening !== conn && s?.conn !== conn) return;
    const progressed = s?.conn === conn && s.progressed;
    src.opening = undefined;
    src.session = undefined;
    if (progressed) src.retries.progressed();
    const { delayMs, suspend } = src.retries.failed();
    if (suspend && sourceDisk.pair.status.state !== 'suspended' && isActive(sourceDisk.pair.status)) applyState({ type: 'failure', reason: 'target unreachable' });
    const life = srcLife;
    sched.at(delayMs, srcAlive(life, connect));
  }

  function onSourceFrame(conn: Connection, f: ToSource): void {
    if (f.t === 'damaged') return; // a damaged answer is silence
    if (f.t === 'copy-ack') return;
    if (f.t === 'open-ok') {
      if (src.opening !== conn) return;
      src.opening = undefined;
      if (!isActive(sourceDisk.pair.status) && sourceDisk.pair.status.cause === 'command') {
        conn.close();
        return;
      }
      if (sourceDisk.pair.status.state === 'suspended') applyState({ type: 'resume' });
      sourceDisk.pair.deltaSetPlayedBack = Math.max(sourceDisk.pair.deltaSetPlayedBack, f.position.deltaSetPlayedBack);
      const resume = resumePoint(f.position, sourceDisk.pair);
      if (resume.received !== undefined) noteReceived(resume.received);
      src.session = { conn, window: undefined, next: resume.next, fromChunk: resume.fromChunk, silenceAt: Number.POSITIVE_INFINITY, progressed: false };
      pump();
      return;
    }
    const s = src.session;
    if (!s || s.conn !== conn) return;
    armSilence(s);
    if (f.t === 'ack') sourceDisk.pair.deltaSetPlayedBack = Math.max(sourceDisk.pair.deltaSetPlayedBack, f.body.deltaSetPlayedBack);
    if (!s.window) return; // idle: answers to heartbeats
    if (f.t === 'ack') {
      if (s.window.onAck(f.body, sched.now)) s.progressed = true;
      if (s.window.sealed) {
        const n = s.window.n;
        // An acknowledgement means durable at the target.
        assert.ok(targetDisk.pair.deltaSetReceived >= n, `delta set ${n} acknowledged before the target holds it durably`);
        const row = sourceDisk.rows.find((d) => d.n === n) as Row;
        row.state = 'acked';
        sourceDisk.pair.deltaSetAcked = Math.max(sourceDisk.pair.deltaSetAcked, n);
        s.window = undefined;
        s.next++;
      }
      pump();
    } else {
      let resend: SendAction[];
      try {
        resend = s.window.onNack(f.body);
      } catch {
        conn.close(); // the target refused the delta set: a new session starts from where it stands
        return;
      }
      if (resend.length > 0) report.retransmits++;
      carryOut(s, resend);
    }
  }

  function noteReceived(n: number): void {
    if (n <= sourceDisk.pair.deltaSetAcked) return;
    assert.ok(targetDisk.pair.deltaSetReceived >= n);
    for (const d of sourceDisk.rows) if (d.n <= n && d.n > sourceDisk.pair.deltaSetAcked) d.state = 'acked';
    sourceDisk.pair.deltaSetAcked = n;
  }

  function armSilence(s: NonNullable<SourceRun['session']>): void {
    s.silenceAt = sched.now + retransmitMs;
    const life = srcLife;
    const at = s.silenceAt;
    sched.at(retransmitMs, srcAlive(life, () => {
      if (src.session !== s || s.silenceAt !== at || !s.window) return;
      const resend = s.window.onSilence(sched.now);
      if (!resend) {
        s.conn.close();
        return;
      }
      report.retransmits++;
      carryOut(s, resend);
      armSilence(s);
    }));
  }

  function pump(): void {
    const s = src.session;
    if (!s) return;
    if (!isActive(sourceDisk.pair.status)) return;
    if (!s.window) {
      const row = rowToSend(sourceDisk.rows, sourceDisk.pair, s.next);
      if (!row) {
        if (sourceDisk.pair.status.state === 'duplex-pending' && dirtyCount() === 0 && !src.building && sourceDisk.copy.done) applyState({ type: 'caught-up' });
        return;
      }
      s.window = new DeltaSetWindow(row.n, row.chunks, s.fromChunk, sched.now);
      s.fromChunk = 0;
      armSilence(s);
    }
    carryOut(s, s.window.fill(sched.now));
  }

  function carryOut(s: NonNullable<SourceRun['session']>, actions: SendAction[]): void {
    const w = s.window as DeltaSetWindow;
    const row = sourceDisk.rows.find((d) => d.n === w.n) as Row;
    for (const a of actions) {
      if (a.kind === 'header') {
        const fields = { deltaSet: row.n, chunkCount: row.chunks, blockCount: row.blocks, dataBytes: row.dataBytes, dataCrc: row.dataCrc, createdAtMs: row.createdAtMs, previousCutMs: 0, ...(row.afterCopy !== undefined ? { afterCopy: row.afterCopy } : {}) };
        s.conn.toTarget({ t: 'header', body: { ...fields, headerCrc: crc32c(headerCrcFields(fields)) } });
        continue;
      }
      // Where chunk `index` is: the save volume must still hold it (nothing needed is freed).
      let lsn = row.startLsn;
      let record = sourceDisk.journal.next(lsn);
      for (let i = 0; i < a.index && record; i++) record = sourceDisk.journal.next(record.lsn + recordBytes);
      assert.ok(record && record.n === row.n && record.index === a.index && record.generation === row.generation, `chunk ${a.index} of delta set ${row.n} was overwritten in the source's save volume`);
      s.conn.toTarget({ t: 'chunk', n: row.n, index: a.index, generation, chunk: record.chunk });
    }
  }

  // ---- source: the copy (E FIG. 11), on its own connection ----------------------------------

  function copyConnect(): void {
    if (sourceDisk.copy.done || src.copy) return;
    if (!isActive(sourceDisk.pair.status) && !(sourceDisk.pair.status.state === 'suspended' && sourceDisk.pair.status.cause === 'failure')) return;
    const life = srcLife;
    const plan = copies.get(sourceDisk.copy.copyId) as SimCopy;
    if (sourceDisk.copy.catchUp && sourceDisk.pair.deltaSetPlayedBack < plan.stampedDeltaSet) {
      // The backlog is newer than every delta set up to the stamp: those play back first.
      sched.at(200, srcAlive(life, copyConnect));
      return;
    }
    const conn = net.connect();
    const copy = { conn, plan, window: undefined, finishing: false, progressed: false, quietSince: sched.now };
    src.copy = copy;
    conn.onSourceFrame = (f) => srcAlive(life, () => onCopyFrame(copy, f))();
    conn.onClose.push(srcAlive(life, () => copyEnded(copy)));
    sched.at(openTimeoutMs, srcAlive(life, () => !copy.window && !copy.finishing && conn.close()));
    if (net.partitioned || !tgt.up) {
      conn.close();
      return;
    }
    tgt.accept(conn, 'copy');
  }

  function copyEnded(copy: NonNullable<SourceRun['copy']>): void {
    if (src.copy !== copy) return;
    src.copy = undefined;
    if (sourceDisk.copy.done) return;
    if (copy.progressed) src.copyRetries.progressed();
    const { delayMs } = src.copyRetries.failed();
    sched.at(delayMs, srcAlive(srcLife, copyConnect));
  }

  function markCopied(copy: NonNullable<SourceRun['copy']>): void {
    sourceDisk.copy.done = true;
    if (sourceDisk.copy.catchUp) report.catchUpsDone++;
    applyState({ type: 'copied' });
    copy.conn.close();
  }

  function onCopyFrame(copy: NonNullable<SourceRun['copy']>, f: ToSource): void {
    if (src.copy !== copy || f.t === 'damaged') return;
    copy.quietSince = sched.now;
    if (f.t === 'open-ok') {
      if (copy.window || copy.finishing) return;
      const start = copyStart(f.position, copy.plan.copyId);
      if (start.done) return markCopied(copy);
      copy.window = new CopyWindow(start.from, blockCount, sched.now);
      armCopySilence(copy);
      return pumpCopy(copy);
    }
    if (f.t !== 'copy-ack' || !copy.window) return;
    if (copy.finishing) {
      if (f.body.done) return markCopied(copy);
      if (f.body.rewind && f.body.cursorBlock < blockCount) copy.conn.close(); // not at its end: a new session resumes from the cursor
      return;
    }
    const rewinds = copy.window.rewinds;
    if (copy.window.onAck(f.body, sched.now) > 0) copy.progressed = true;
    report.copyRewinds += copy.window.rewinds - rewinds;
    pumpCopy(copy);
  }

  function pumpCopy(copy: NonNullable<SourceRun['copy']>): void {
    const w = copy.window as CopyWindow;
    const { plan } = copy;
    while (w.wantsPiece) {
      // Up to `pieceBlocks` blocks of the plan from the cursor; the last piece runs to the end.
      const from = w.cursor;
      const planned = (plan.blocks ?? Array.from({ length: blockCount }, (_, b) => b)).filter((b) => b >= from);
      const blocks = planned.slice(0, pieceBlocks);
      const to = planned.length > pieceBlocks ? (blocks.at(-1) as number) + 1 : blockCount;
      copy.conn.toTarget({ t: 'piece', copyId: plan.copyId, from, to, blocks, values: blocks.map((b) => plan.image[b] as number) });
      w.sent(to, blocks.length);
    }
    if (w.complete && !copy.finishing) {
      // "Start playback" from the stamped delta set (E FIG. 11 steps 355-357).
      copy.finishing = true;
      copy.conn.toTarget(copyDone(plan));
    }
  }

  function copyDone(plan: SimCopy): ToTarget {
    return { t: 'copy-done', copyId: plan.copyId, stampedDeltaSet: plan.stampedDeltaSet, final: true };
  }

  function armCopySilence(copy: NonNullable<SourceRun['copy']>): void {
    sched.at(copyRetransmitMs, srcAlive(srcLife, () => {
      if (src.copy !== copy) return;
      if (sched.now - copy.quietSince >= copyRetransmitMs) {
        if (!(copy.window as CopyWindow).stillAlive(sched.now)) return copy.conn.close();
        // Silence: ask where the target stands (or say again that the copy is done).
        copy.conn.toTarget(copy.finishing ? copyDone(copy.plan) : { t: 'heartbeat' });
      }
      armCopySilence(copy);
    }));
  }

  // ---- target --------------------------------------------------------------------------

  interface TargetRun {
    up: boolean;
    ring: RingSpace;
    ledger: ReceiveLedger;
    session: TargetSession | undefined;
    /** The newest session of each connection, open or not (a closed one may still be storing). */
    lastSession: Partial<Record<Channel, TargetSession>>;
    /** Where the copy is applied to (in memory); the durable cursor is `targetDisk.copy.cursorBlock`. */
    copyApplied: number;
    copyPiecesUnflushed: number;
    copyFlushedAtMs: number;
    saveVolumeFull: boolean;
    /** The delta set under playback: readers see it whole (the overlay). */
    playing: Row | undefined;
    /** Chunk stores in flight: on a crash each may or may not have reached the disk. */
    pendingStores: JournalRecord[];
    accept(conn: Connection, channel: Channel): void;
  }
  /** One session from the source: its frames are handled one after another, as the receiver does. */
  interface TargetSession {
    conn: Connection;
    channel: Channel;
    queue: ToTarget[];
    busy: boolean;
    /** It has answered the open (after the session before it was done). */
    started: boolean;
    /** Run once this session, closed, has finished the frame in hand. */
    whenDone: (() => void)[];
  }
  let tgt!: TargetRun;
  let tgtLife = 0;
  const tgtAlive = (life: number, fn: () => void) => () => {
    if (tgt.up && tgtLife === life) fn();
  };

  function targetStart(): void {
    tgtLife++;
    const life = tgtLife;
    const rows = targetDisk.rows;
    const head = rows.reduce((h, d) => Math.max(h, d.endLsn), 0);
    const live = rows.filter((d) => d.state !== 'played');
    tgt = {
      up: true,
      ring: new RingSpace(targetSaveBytes, head, live[0]?.startLsn ?? head),
      ledger: new ReceiveLedger(targetDisk.pair.deltaSetReceived),
      session: undefined,
      lastSession: {},
      copyApplied: targetDisk.copy.cursorBlock,
      copyPiecesUnflushed: 0,
      copyFlushedAtMs: sched.now,
      saveVolumeFull: false,
      playing: undefined,
      pendingStores: [],
      accept: (conn, channel) => accept(life, conn, channel),
    };
    // Redo an interrupted playback before anyone reads.
    const interrupted = rows.find((d) => d.state === 'playing');
    if (interrupted) {
      applyRow(interrupted);
      finishPlayback(interrupted);
    }
    // Chunks of a partly received delta set.
    let lsn = tgt.ring.head;
    for (let index = 0; ; index++) {
      const r = targetDisk.journal.next(lsn);
      if (!r || r.n !== tgt.ledger.n || r.index !== index || r.generation !== generation || r.lsn - tgt.ring.tail + recordBytes > targetSaveBytes) break;
      tgt.ring.head = r.lsn + recordBytes;
      tgt.ledger.stored({ lsn: r.lsn, blocks: r.chunk.blocks.length, dataBytes: r.chunk.values.length * blockBytes }, crc32c(chunkData(r.chunk)));
      lsn = r.lsn + recordBytes;
    }
    const player = (): void => {
      playTick(life);
      sched.at(50, tgtAlive(life, player));
    };
    sched.at(10, tgtAlive(life, player));
  }

  function position(): TargetPosition {
    return {
      pairId: 'sim',
      generation,
      copyId: targetDisk.copy.copyId,
      copyCursorBlock: tgt.copyApplied,
      copyDone: targetDisk.copy.done,
      deltaSetReceived: targetDisk.pair.deltaSetReceived,
      chunksStored: tgt.ledger.chunksStored,
      deltaSetPlayedBack: targetDisk.pair.deltaSetPlayedBack,
      full: tgt.saveVolumeFull,
    };
  }

  function accept(life: number, conn: Connection, channel: Channel): void {
    // A newer session replaces an older one, once that one has finished the frame in hand.
    const session: TargetSession = { conn, channel, queue: [], busy: false, started: false, whenDone: [] };
    const previous = tgt.lastSession[channel];
    previous?.conn.close();
    tgt.lastSession[channel] = session;
    if (channel === 'deltas') tgt.session = session;
    conn.onTargetFrame = (f) =>
      tgtAlive(life, () => {
        session.queue.push(f);
        processQueue(life, session);
      })();
    conn.onClose.push(tgtAlive(life, () => tgt.session === session && (tgt.session = undefined)));
    const open = (): void => {
      session.started = true;
      if (!conn.open) return settle(session);
      trace(`target: ${channel} session ${conn.id} opens at ${tgt.ledger.n}/${tgt.ledger.chunksStored}; ring ${tgt.ring.tail}..${tgt.ring.head}; copy at ${tgt.copyApplied}`);
      conn.toSource({ t: 'open-ok', position: position() });
    };
    if (previous && (!previous.started || previous.busy)) previous.whenDone.push(open);
    else open();
  }

  function settle(session: TargetSession): void {
    session.busy = false;
    if (!session.conn.open) for (const fn of session.whenDone.splice(0)) fn();
  }

  function ack(conn: Connection, deltaSet: number, chunksStored: number, sealed: boolean): void {
    conn.toSource({ t: 'ack', body: { deltaSet, chunksStored, sealed, deltaSetPlayedBack: targetDisk.pair.deltaSetPlayedBack, full: tgt.saveVolumeFull } });
  }

  function nack(conn: Connection, reason: string): void {
    conn.toSource({ t: 'nack', body: { deltaSet: tgt.ledger.n, index: tgt.ledger.chunksStored, reason } });
  }

  function processQueue(life: number, session: TargetSession): void {
    while (!session.busy && session.queue.length > 0 && session.conn.open) {
      const f = session.queue.shift() as ToTarget;
      if (session.channel === 'copy') handleCopy(life, session, f);
      else handle(life, session, f);
    }
  }

  function handle(life: number, session: TargetSession, f: ToTarget): void {
    const { conn } = session;
    switch (f.t) {
      case 'damaged':
        return nack(conn, 'frame failed its checksum');
      case 'heartbeat':
        return ack(conn, tgt.ledger.n, tgt.ledger.chunksStored, false);
      case 'header': {
        const v = tgt.ledger.onHeader(f.body);
        assert.notEqual(v.kind, 'mismatch', `delta set ${f.body.deltaSet} arrived whole but does not match its header${v.kind === 'mismatch' ? `: ${v.reason}` : ''}`);
        if (v.kind === 'corrupt' || v.kind === 'incomplete') return nack(conn, v.reason);
        if (v.kind === 'already-sealed') return ack(conn, f.body.deltaSet, f.body.chunkCount, true);
        if (v.kind !== 'seal') return;
        targetDisk.rows.push({ generation, n: f.body.deltaSet, state: 'received', startLsn: v.startLsn ?? tgt.ring.head, endLsn: tgt.ring.head, chunks: f.body.chunkCount, blocks: v.blocks, dataBytes: v.dataBytes, dataCrc: f.body.dataCrc, createdAtMs: f.body.createdAtMs, ...(f.body.afterCopy !== undefined ? { afterCopy: f.body.afterCopy } : {}) });
        targetDisk.pair.deltaSetReceived = f.body.deltaSet;
        trace(`target: sealed ${f.body.deltaSet} (${f.body.chunkCount} chunks from ${v.startLsn})`);
        tgt.ledger.sealed(f.body.deltaSet);
        return ack(conn, f.body.deltaSet, f.body.chunkCount, true);
      }
      case 'chunk': {
        const v = tgt.ledger.onChunk(f.n, f.index);
        if (v.kind === 'already-sealed') return ack(conn, f.n, Number.MAX_SAFE_INTEGER, true);
        if (v.kind === 'out-of-order') return nack(conn, v.reason);
        if (v.kind === 'duplicate') return ack(conn, f.n, tgt.ledger.chunksStored, false);
        store(life, session, f);
      }
    }
  }

  function store(life: number, session: TargetSession, f: Extract<ToTarget, { t: 'chunk' }>): void {
    const { conn } = session;
    const previousHead = tgt.ring.head;
    const lsn = tgt.ring.allocate(recordBytes);
    if (lsn === undefined) {
      // Rule 8 at the target: stop acknowledging; tell the source it is alive but full.
      if (!tgt.saveVolumeFull) report.targetSaveVolumeFull++;
      tgt.saveVolumeFull = true;
      ack(conn, f.n, tgt.ledger.chunksStored, false);
      session.busy = true;
      sched.at(fullNoticeMs, tgtAlive(life, () => {
        settle(session);
        if (!conn.open) return;
        store(life, session, f);
        processQueue(life, session);
      }));
      return;
    }
    tgt.saveVolumeFull = false;
    tgt.ledger.writingAt(lsn);
    const record: JournalRecord = { lsn, generation: f.generation, n: f.n, index: f.index, chunk: f.chunk };
    tgt.pendingStores.push(record);
    trace(`target: session ${conn.id} stores ${f.n}/${f.index} at ${lsn}`);
    session.busy = true;
    // Write and fsync take a while (now and then the disk stalls); only then is the chunk acknowledged.
    sched.at(diskMs(), tgtAlive(life, () => {
      tgt.pendingStores.splice(tgt.pendingStores.indexOf(record), 1);
      if (net.faults && rnd.chance(0.005)) {
        // The write or its fsync fails (EIO, ENOSPC): not stored, not acknowledged; the
        // session ends and the source sends the chunk again.
        report.storeErrors++;
        trace(`target: store of ${f.n}/${f.index} at ${lsn} failed`);
        tgt.ledger.abandon(lsn);
        tgt.ring.giveBack(lsn, recordBytes, previousHead);
        settle(session);
        conn.close();
        return;
      }
      targetDisk.journal.write(record);
      trace(`target: stored ${f.n}/${f.index} at ${lsn} (session ${conn.id}${conn.open ? '' : ', closed'})`);
      tgt.ledger.stored({ lsn, blocks: f.chunk.blocks.length, dataBytes: f.chunk.values.length * blockBytes }, crc32c(chunkData(f.chunk)));
      settle(session);
      if (conn.open) ack(conn, f.n, tgt.ledger.chunksStored, false);
      processQueue(life, session);
    }));
  }

  function copyAck(conn: Connection, rewind: boolean, done = false): void {
    conn.toSource({ t: 'copy-ack', body: { cursorBlock: done ? blockCount : tgt.copyApplied, ...(rewind ? { rewind } : {}), ...(done ? { done } : {}) } });
  }

  function handleCopy(life: number, session: TargetSession, f: ToTarget): void {
    const { conn } = session;
    switch (f.t) {
      case 'damaged':
      case 'heartbeat':
        // Rule 4: a damaged piece is refused and sent again from the cursor; silence is answered with it.
        return copyAck(conn, true);
      case 'piece': {
        const judge = () => judgeCopyPiece({ copyId: f.copyId, fromBlock: f.from, toBlock: f.to, extents: f.blocks.map((block) => ({ block, count: 1 })) }, { copyId: targetDisk.copy.copyId, done: targetDisk.copy.done, expectedBlock: tgt.copyApplied, blockCount });
        if (judge().kind === 'new-copy') {
          if (tgt.playing) {
            // A playback still finishing is let finish, so the image kept is whole.
            session.queue.unshift(f);
            session.busy = true;
            sched.at(10, tgtAlive(life, () => {
              settle(session);
              processQueue(life, session);
            }));
            return;
          }
          if (targetDisk.copy.done) {
            // Rule 8: a catch-up is not atomic; the consistent image is kept in a snapshot
            // and served to readers until the copy is whole.
            targetDisk.protectedImage = visibleTargetImage();
          }
          targetDisk.copy = { copyId: f.copyId, cursorBlock: 0, done: false, stampedDeltaSet: 0 };
          tgt.copyApplied = 0;
          tgt.copyPiecesUnflushed = 0;
          trace(`target: copy ${f.copyId} arriving${targetDisk.protectedImage ? ', image protected' : ''}`);
        }
        if (judge().kind !== 'apply') return copyAck(conn, true);
        const copy = targetDisk.copy;
        session.busy = true;
        sched.at(diskMs(), tgtAlive(life, () => {
          f.blocks.forEach((block, i) => volWrite(block, f.values[i] as number));
          tgt.copyApplied = f.to;
          tgt.copyPiecesUnflushed++;
          if (tgt.copyPiecesUnflushed >= copyFlushPieces || sched.now - tgt.copyFlushedAtMs >= copyPersistMs) {
            // The durable cursor moves only past data the volume has flushed.
            const upTo = tgt.copyApplied;
            volFlush();
            tgt.copyPiecesUnflushed = 0;
            tgt.copyFlushedAtMs = sched.now;
            copy.cursorBlock = Math.max(copy.cursorBlock, upTo);
          }
          settle(session);
          if (conn.open) copyAck(conn, false);
          processQueue(life, session);
        }));
        return;
      }
      case 'copy-done': {
        const copy = targetDisk.copy;
        const v = judgeCopyDone(f, { copyId: copy.copyId, done: copy.done, appliedBlock: tgt.copyApplied, blockCount });
        if (v.kind === 'rewind') return copyAck(conn, true);
        if (v.kind === 'complete') {
          volFlush();
          copy.cursorBlock = blockCount;
          copy.done = true;
          copy.stampedDeltaSet = f.stampedDeltaSet;
          targetDisk.wholeCopyId = copy.copyId;
          // The volume holds the source's image at the copy's snapshot: readers go back to it.
          targetDisk.protectedImage = undefined;
          if (copy.copyId === 1) report.copyDoneAtMs = sched.now;
          trace(`target: copy ${copy.copyId} complete`);
        }
        return copyAck(conn, false, true);
      }
      default:
        throw new Error(`frame ${f.t} on a copy connection`);
    }
  }

  function chunksOf(row: Row): SimChunk[] {
    const out: SimChunk[] = [];
    let lsn = row.startLsn;
    for (let index = 0; index < row.chunks; index++) {
      const r = targetDisk.journal.next(lsn);
      assert.ok(r && r.n === row.n && r.index === index, `chunk ${index} of delta set ${row.n} lost from the target's save volume before playback`);
      out.push(r.chunk);
      lsn = r.lsn + recordBytes;
    }
    return out;
  }

  function applyRow(row: Row, upToChunk = row.chunks): void {
    for (const c of chunksOf(row).slice(0, upToChunk)) c.blocks.forEach((b, i) => volWrite(b, c.values[i] as number));
  }

  function playTick(life: number): void {
    if (tgt.playing) return;
    const row = nextToPlay(targetDisk.rows, { deltaSetPlayedBack: targetDisk.pair.deltaSetPlayedBack, copyDone: targetDisk.copy.done, copyId: targetDisk.copy.copyId });
    if (!row) return;
    // Durable intent, then the after-images chunk by chunk (a crash leaves some written).
    row.state = 'playing';
    tgt.playing = row;
    let applied = 0;
    const step = (): void => {
      if (applied < row.chunks) {
        applied++;
        applyRow(row, applied);
        sched.at(diskMs(), tgtAlive(life, step));
        return;
      }
      finishPlayback(row);
    };
    sched.at(rnd.int(1, 10), tgtAlive(life, step));
  }

  function diskMs(): number {
    return net.faults && rnd.chance(0.01) ? rnd.int(100, 3_000) : rnd.int(1, 8);
  }

  function finishPlayback(row: Row): void {
    // The after-images are on disk before the mailbox says played.
    volFlush();
    row.state = 'played';
    trace(`target: played ${row.n}`);
    targetDisk.pair.deltaSetPlayedBack = row.n;
    tgt.playing = undefined;
    report.deltaSetsPlayed = row.n;
    for (const old of targetDisk.rows.filter((d) => d.state === 'played' && d.n <= row.n - playedHistoryMax)) targetDisk.rows.splice(targetDisk.rows.indexOf(old), 1);
    tgt.ring.release(targetReleasePoint(tgt.ring, targetDisk.rows, tgt.ledger.heldFromLsn));
  }

  // ---- crashes -------------------------------------------------------------------------

  function crashSource(): void {
    report.sourceCrashes++;
    trace('source: crash');
    src.up = false;
    src.session?.conn.close();
    src.opening?.close();
    src.copy?.conn.close();
    loseSourceMemory();
    sched.at(rnd.int(20, 800), () => !sourceLost && sourceStart());
  }

  /**
   * The source stops: a process crash keeps the page cache (it reaches the disk), a
   * power loss keeps what the disk had and some of what was on its way. What the
   * change log tracks is what its files hold (rule 1 makes that a superset).
   */
  function loseSourceMemory(): void {
    srcLife++;
    if (rnd.chance(0.5)) {
      report.sourcePowerLosses++;
      for (const b of sourceDisk.unflushed) if (rnd.chance(0.5)) sourceDisk.durable[b] = sourceDisk.image[b] as number;
      sourceDisk.unflushed.clear();
      sourceDisk.image = Int32Array.from(sourceDisk.durable);
    } else {
      flushSource();
    }
  }

  function crashTarget(): void {
    report.targetCrashes++;
    trace('target: crash');
    tgt.up = false;
    for (const session of Object.values(tgt.lastSession)) session.conn.close();
    // A chunk being written may or may not have reached the disk.
    for (const r of tgt.pendingStores) if (rnd.chance(0.5)) targetDisk.journal.write(r);
    if (rnd.chance(0.5)) {
      // Power loss: of the writes not flushed, some reached the disk and some did not.
      report.targetPowerLosses++;
      for (const [b, v] of targetCache) if (rnd.chance(0.5)) targetDisk.image[b] = v;
      targetCache.clear();
    } else {
      volFlush(); // a process crash: the page cache writes it all back
    }
    sched.at(rnd.int(20, 800), () => targetStart());
  }

  // ---- invariants ------------------------------------------------------------------------

  function visibleTargetImage(): Int32Array {
    if (targetDisk.protectedImage) return Int32Array.from(targetDisk.protectedImage);
    const image = Int32Array.from(targetDisk.image);
    for (const [b, v] of targetCache) image[b] = v;
    if (tgt.playing) for (const c of chunksOf(tgt.playing)) c.blocks.forEach((b, i) => (image[b] = c.values[i] as number));
    return image;
  }

  /**
   * What readers of the target must see: the source's image at the boundary of the
   * delta set played back (or under playback); right after a catch-up, before the delta
   * set after its stamp, the source's image at the catch-up's switch.
   */
  function expectedTargetImage(): Int32Array {
    const whole = copies.get(targetDisk.wholeCopyId);
    if (whole && whole.copyId > 1 && !tgt.playing && targetDisk.pair.deltaSetPlayedBack === whole.stampedDeltaSet) return whole.image;
    const n = tgt.playing ? tgt.playing.n : targetDisk.pair.deltaSetPlayedBack;
    const boundary = boundaries.get(n);
    assert.ok(boundary, `no boundary image for delta set ${n}`);
    return boundary;
  }

  function check(): void {
    if (!tgt.up) return;
    const copy = targetDisk.copy;
    if (!copy.done) {
      // What the durable cursor covers is on disk.
      const plan = copies.get(copy.copyId) as SimCopy;
      for (const b of plan.blocks ?? Array.from({ length: blockCount }, (_, i) => i)) {
        if (b < copy.cursorBlock) assert.equal(targetDisk.image[b], plan.image[b], `t=${sched.now}: block ${b} is below the durable cursor ${copy.cursorBlock} of copy ${copy.copyId} but not on disk`);
      }
      assert.ok(!tgt.playing, 'a delta set is played back while a copy is incomplete');
      // The first copy: raw, no host access. A catch-up: readers get the protected image.
      if (copy.copyId === 1) return assert.equal(targetDisk.pair.deltaSetPlayedBack, 0);
      assert.ok(targetDisk.protectedImage, `t=${sched.now}: catch-up copy ${copy.copyId} incomplete and no image protected`);
    }
    const n = tgt.playing ? tgt.playing.n : targetDisk.pair.deltaSetPlayedBack;
    assert.deepEqual(visibleTargetImage(), expectedTargetImage(), `t=${sched.now}: the target's image is not the source's at delta set ${n}${targetDisk.wholeCopyId > 1 ? ` (or at catch-up ${targetDisk.wholeCopyId})` : ''}`);
    assert.ok(targetDisk.pair.deltaSetPlayedBack <= targetDisk.pair.deltaSetReceived);
    assert.ok(sourceDisk.pair.deltaSetAcked <= targetDisk.pair.deltaSetReceived, 'the source counts a delta set acknowledged that the target does not hold');
  }

  // ---- the run ---------------------------------------------------------------------------

  sourceStart();
  targetStart();
  await sched.drain();
  const faultsEnd = options.faultMs;
  const writer = (): void => {
    if (sched.now >= faultsEnd) return;
    const burst = rnd.chance(0.05) ? rnd.int(10, 40) : 1;
    if (src.up) for (let i = 0; i < burst; i++) hostWrite();
    // Now and then the host flushes (its fsync); until then its writes may be lost with the power.
    if (src.up && rnd.chance(0.02)) flushSource();
    sched.at(rnd.int(1, 40), writer);
  };
  sched.at(0, writer);
  const chaos = (): void => {
    if (sched.now >= faultsEnd) return;
    const r = rnd.next();
    if (r < 0.25 && src.up) crashSource();
    else if (r < 0.5 && tgt.up) crashTarget();
    else if (r < 0.65) net.partitionedUntilMs = sched.now + rnd.int(500, 12_000);
    else if (r < 0.75 && src.up && isActive(sourceDisk.pair.status)) {
      // ferry replicate pause, resumed a while later
      applyState({ type: 'suspend' });
      src.session?.conn.close();
      src.copy?.conn.close();
      applyState({ type: 'drained' });
      sched.at(rnd.int(100, 3_000), () => {
        if (sourceDisk.pair.status.state !== 'suspended' || sourceDisk.pair.status.cause !== 'command') return;
        applyState({ type: 'resume' });
        if (src.up && !src.session && !src.opening) connect();
        if (src.up) copyConnect();
      });
    } else if (r < 0.8 && src.up) src.trigger.demand(); // ferry replicate delta
    sched.at(rnd.int(200, 3_000), chaos);
  };
  sched.at(rnd.int(100, 1_000), chaos);

  await sched.run(faultsEnd, check);
  net.faults = false;
  net.partitionedUntilMs = 0;
  if (options.failover) {
    // The source site is lost in the middle of it all; the target comes back if it was down.
    await sched.run(faultsEnd + 1_000, check, () => tgt.up);
    await failover(options.failover);
  } else {
    // Sites that are down come back (their restart is already scheduled); a pause ends.
    await sched.run(faultsEnd + 1_000, check);
    assert.ok(src.up && tgt.up);
    if (sourceDisk.pair.status.state === 'suspended' && sourceDisk.pair.status.cause === 'command') {
      applyState({ type: 'resume' });
      if (!src.session && !src.opening) connect();
      copyConnect();
    }
    // No more faults or writes: the target must catch up to exactly the source's image.
    const caughtUp = (): boolean => targetDisk.copy.done && sourceDisk.copy.done && dirtyCount() === 0 && !src.building && targetDisk.pair.deltaSetPlayedBack === sourceDisk.pair.deltaSetCreated && !tgt.playing;
    await sched.run(faultsEnd + 600_000, check, caughtUp);
    assert.ok(caughtUp(), `not caught up: copy ${targetDisk.copy.done ? 'done' : `at ${tgt.copyApplied}`}, dirty ${dirtyCount()}, created ${sourceDisk.pair.deltaSetCreated}, acked ${sourceDisk.pair.deltaSetAcked}, played ${targetDisk.pair.deltaSetPlayedBack}, state ${sourceDisk.pair.status.state}`);
    assert.deepEqual(visibleTargetImage(), sourceDisk.image, 'after catching up the target differs from the source');
    // The acknowledgement of the last delta set and the return to Duplex follow.
    await sched.run(sched.now + 10_000, check, () => sourceDisk.pair.deltaSetAcked === sourceDisk.pair.deltaSetCreated && sourceDisk.pair.status.state === 'duplex');
    assert.equal(sourceDisk.pair.deltaSetAcked, sourceDisk.pair.deltaSetCreated);
    assert.equal(sourceDisk.pair.status.state, 'duplex', `pair ended ${sourceDisk.pair.status.state} (${sourceDisk.pair.status.reason})`);
  }

  async function failover(mode: 'default' | 'now'): Promise<void> {
    // The source is lost here: what it holds is what it has on disk now.
    sourceLost = true;
    if (src.up) {
      src.up = false;
      src.session?.conn.close();
      src.copy?.conn.close();
      loseSourceMemory();
    }
    for (const session of Object.values(tgt.lastSession)) session.conn.close();
    const copy = targetDisk.copy;
    const initialCopy = copy.done ? { doneAt: 'done', stampedDeltaSet: copy.stampedDeltaSet } : { stampedDeltaSet: 0, ...(targetDisk.protectedImage ? { protectiveSnapshot: 'kept' } : {}) };
    const record = { role: 'target', volume: 'v', initialCopy, deltaSetPlayedBack: targetDisk.pair.deltaSetPlayedBack } as unknown as PairRecord;
    try {
      checkFailover(record, mode);
    } catch (err) {
      assert.ok(copy.copyId === 1 && !copy.done, `failover refused with a consistent image: ${(err as Error).message}`);
      report.failoverRefused = (err as Error).message;
      return;
    }
    assert.ok(copy.done || targetDisk.protectedImage, 'failover allowed without a consistent image');
    if (mode === 'default') {
      // Play back everything received that can be (not what needs a copy this side does not have), then take the restart point.
      const played = (): boolean => !tgt.playing && nextToPlay(targetDisk.rows, { deltaSetPlayedBack: targetDisk.pair.deltaSetPlayedBack, copyDone: targetDisk.copy.done, copyId: targetDisk.copy.copyId }) === undefined;
      await sched.run(sched.now + 600_000, check, played);
      assert.ok(played());
    } else {
      await sched.run(sched.now + 600_000, check, () => !tgt.playing);
    }
    const restartPoint = targetDisk.pair.deltaSetPlayedBack;
    const skipped = targetDisk.pair.deltaSetReceived - restartPoint;
    if (mode === 'default' && skipped > 0) {
      // Only delta sets cut during a copy this side never got whole are left.
      for (const d of targetDisk.rows) if (d.state === 'received') assert.ok(!targetDisk.copy.done || (d.afterCopy ?? 0) > targetDisk.copy.copyId, `delta set ${d.n} could have been played back`);
    }
    // A catch-up in progress is dropped: the volume goes back to the protected image.
    const restartImage = visibleTargetImage();
    assert.deepEqual(restartImage, expectedTargetImage());
    const plan = planUndo(sourceDisk.pair, generation, restartPoint, sourceDisk.rows);
    let changed = 0;
    for (let b = 0; b < blockCount; b++) if (sourceDisk.image[b] !== restartImage[b]) changed++;
    if (plan.kind === 'full-copy') {
      // Only --now may need one: it skips delta sets the source may already have freed.
      assert.ok(mode === 'now' || skipped > 0, `a failover that played back everything received needs a full copy: ${plan.reason}`);
      assert.ok(restartPoint < sourceDisk.pair.deltaSetAcked, `full copy although nothing needed was acknowledged and freed: ${plan.reason}`);
      report.failover = { restartPoint, skippedDeltaSets: skipped, undoBlocks: blockCount, changedBlocks: changed, plan: 'full-copy' };
      return;
    }
    // The undo list: the blocks of delta sets n-x+1…n, what the change log's files
    // track, and the backlog of a catch-up the target may not have whole.
    const undo = await trackedOnDisk();
    if (sourceDisk.copy.catchUp && !sourceDisk.copy.done) for (const b of (copies.get(sourceDisk.copy.copyId) as SimCopy).blocks ?? []) undo.add(b);
    for (const n of plan.deltaSets) {
      const row = sourceDisk.rows.find((d) => d.n === n) as Row;
      let lsn = row.startLsn;
      for (let index = 0; index < row.chunks; index++) {
        const r = sourceDisk.journal.next(lsn);
        assert.ok(r && r.n === n && r.index === index, `delta set ${n} listed for undo is damaged in the save volume`);
        for (const b of r.chunk.blocks) undo.add(b);
        lsn = r.lsn + recordBytes;
      }
    }
    for (let b = 0; b < blockCount; b++) {
      if (sourceDisk.image[b] !== restartImage[b]) assert.ok(undo.has(b), `block ${b} changed after the restart point but is not in the undo list`);
    }
    report.failover = { restartPoint, skippedDeltaSets: skipped, undoBlocks: undo.size, changedBlocks: changed, plan: 'delta-sets' };
  }

  report.events = sched.events;
  report.connectionsCut = net.cut;
  report.framesDamaged = net.damaged;
  return report;
}
