import { assert } from './errors.js';

/** Bytes per bitmap page: 4 KiB covers 32768 grains (256 MiB of 8 KiB blocks). */
export const bitmapPageBytes = 4096;
export const bitsPerPage = bitmapPageBytes * 8;

/**
 * A bit per grain, stored in pages behind a page table (E FIG. 43): a page that was
 * never set costs nothing, so a 1 TiB sparse volume costs memory only where written.
 * Pages that changed since the last `takeDirtyPages()` are remembered so a persistent
 * owner writes back only those.
 */
export class PagedBitmap {
  private bitCountValue: number;
  private readonly pages = new Map<number, Uint8Array>();
  private readonly pageCounts = new Map<number, number>();
  private readonly dirty = new Set<number>();
  private setCount = 0;

  constructor(bitCount: number) {
    assert(Number.isSafeInteger(bitCount) && bitCount >= 0, `bitmap size ${bitCount} must be a whole number`);
    this.bitCountValue = bitCount;
  }

  get bitCount(): number {
    return this.bitCountValue;
  }

  /** Number of set bits. */
  get count(): number {
    return this.setCount;
  }

  /** Number of pages holding at least one set bit (what the bitmap costs in memory). */
  get residentPages(): number {
    return this.pages.size;
  }

  get(bit: number): boolean {
    this.checkBit(bit);
    const page = this.pages.get(Math.floor(bit / bitsPerPage));
    if (!page) return false;
    const offset = bit % bitsPerPage;
    return ((page[offset >>> 3] as number) & (1 << (offset & 7))) !== 0;
  }

  set(bit: number): boolean {
    return this.setRange(bit, 1) === 1;
  }

  clear(bit: number): boolean {
    return this.clearRange(bit, 1) === 1;
  }

  /** Sets `count` bits from `start`; returns how many were newly set. */
  setRange(start: number, count: number): number {
    return this.updateRange(start, count, true);
  }

  /** Clears `count` bits from `start`; returns how many were previously set. */
  clearRange(start: number, count: number): number {
    return this.updateRange(start, count, false);
  }

  /** True when every bit in the range is set. */
  allSet(start: number, count: number): boolean {
    for (const [runStart, runLength] of this.runs(start, start + count)) {
      return runStart === start && runLength === count;
    }
    return count === 0;
  }

  /** True when any bit in the range is set. */
  anySet(start: number, count: number): boolean {
    for (const _ of this.runs(start, start + count)) return true;
    return false;
  }

  /** Runs of set bits within [start, end) as [firstBit, length], in order. */
  *runs(start = 0, end = this.bitCountValue): Generator<[number, number]> {
    end = Math.min(end, this.bitCountValue);
    let runStart = -1;
    let bit = start;
    while (bit < end) {
      const pageIndex = Math.floor(bit / bitsPerPage);
      const page = this.pages.get(pageIndex);
      const pageEnd = Math.min(end, (pageIndex + 1) * bitsPerPage);
      if (!page) {
        if (runStart >= 0) {
          yield [runStart, bit - runStart];
          runStart = -1;
        }
        bit = pageEnd;
        continue;
      }
      if ((this.pageCounts.get(pageIndex) ?? 0) === bitsPerPage) {
        if (runStart < 0) runStart = bit;
        bit = pageEnd;
        continue;
      }
      while (bit < pageEnd) {
        const offset = bit % bitsPerPage;
        const byte = page[offset >>> 3] as number;
        if ((offset & 7) === 0 && bit + 8 <= pageEnd && (byte === 0 || byte === 0xff)) {
          if (byte === 0xff) {
            if (runStart < 0) runStart = bit;
          } else if (runStart >= 0) {
            yield [runStart, bit - runStart];
            runStart = -1;
          }
          bit += 8;
          continue;
        }
        const isSet = (byte & (1 << (offset & 7))) !== 0;
        if (isSet && runStart < 0) runStart = bit;
        else if (!isSet && runStart >= 0) {
          yield [runStart, bit - runStart];
          runStart = -1;
        }
        bit++;
      }
    }
    if (runStart >= 0) yield [runStart, end - runStart];
  }

  /** Changes the number of bits; bits past a smaller size are dropped. */
  resize(bitCount: number): void {
    assert(Number.isSafeInteger(bitCount) && bitCount >= 0, `bitmap size ${bitCount} must be a whole number`);
    if (bitCount < this.bitCountValue) this.clearRange(bitCount, this.bitCountValue - bitCount);
    this.bitCountValue = bitCount;
  }

  clearAll(): void {
    for (const index of this.pages.keys()) this.dirty.add(index);
    this.pages.clear();
    this.pageCounts.clear();
    this.setCount = 0;
  }

  /** Copies every bit of `other` into this bitmap (union). */
  or(other: PagedBitmap): void {
    for (const [start, length] of other.runs()) this.setRange(start, length);
  }

  clone(): PagedBitmap {
    const copy = new PagedBitmap(this.bitCountValue);
    for (const [index, page] of this.pages) copy.loadPage(index, page);
    return copy;
  }

  /** The page's bytes, or undefined for an all-zero page. The array must not be modified. */
  page(index: number): Uint8Array | undefined {
    return this.pages.get(index);
  }

  get pageCount(): number {
    return Math.ceil(this.bitCountValue / bitsPerPage);
  }

  /** Installs a page read from storage; an all-zero page is dropped. Does not mark it dirty. */
  loadPage(index: number, bytes: Uint8Array): void {
    assert(bytes.length === bitmapPageBytes, `bitmap page is ${bytes.length} bytes, expected ${bitmapPageBytes}`);
    assert(index >= 0 && index < Math.max(1, this.pageCount), `bitmap page ${index} outside the bitmap`);
    const previous = this.pageCounts.get(index) ?? 0;
    let ones = 0;
    for (const byte of bytes) ones += popcount8[byte] as number;
    this.setCount += ones - previous;
    if (ones === 0) {
      this.pages.delete(index);
      this.pageCounts.delete(index);
    } else {
      this.pages.set(index, Uint8Array.from(bytes));
      this.pageCounts.set(index, ones);
    }
  }

  /** Indices of pages changed since the last call, and forgets them. */
  takeDirtyPages(): number[] {
    const out = [...this.dirty].sort((a, b) => a - b);
    this.dirty.clear();
    return out;
  }

  /** Marks a page as needing write-back again (after a failed persist). */
  markDirty(index: number): void {
    this.dirty.add(index);
  }

  private checkBit(bit: number): void {
    assert(Number.isInteger(bit) && bit >= 0 && bit < this.bitCountValue, `bit ${bit} outside bitmap of ${this.bitCountValue}`);
  }

  private updateRange(start: number, count: number, value: boolean): number {
    if (count === 0) return 0;
    assert(
      Number.isInteger(start) && Number.isInteger(count) && start >= 0 && count > 0 && start + count <= this.bitCountValue,
      `bit range ${start}+${count} outside bitmap of ${this.bitCountValue}`,
    );
    let changed = 0;
    let bit = start;
    const end = start + count;
    while (bit < end) {
      const pageIndex = Math.floor(bit / bitsPerPage);
      const pageEnd = Math.min(end, (pageIndex + 1) * bitsPerPage);
      let page = this.pages.get(pageIndex);
      if (!page) {
        if (!value) {
          bit = pageEnd;
          continue;
        }
        page = new Uint8Array(bitmapPageBytes);
        this.pages.set(pageIndex, page);
        this.pageCounts.set(pageIndex, 0);
      }
      let pageChanged = 0;
      while (bit < pageEnd) {
        const offset = bit % bitsPerPage;
        const byteIndex = offset >>> 3;
        if ((offset & 7) === 0 && bit + 8 <= pageEnd) {
          const before = page[byteIndex] as number;
          const after = value ? 0xff : 0;
          pageChanged += value ? 8 - (popcount8[before] as number) : (popcount8[before] as number);
          page[byteIndex] = after;
          bit += 8;
          continue;
        }
        const mask = 1 << (offset & 7);
        const before = page[byteIndex] as number;
        const isSet = (before & mask) !== 0;
        if (isSet !== value) {
          page[byteIndex] = value ? before | mask : before & ~mask;
          pageChanged++;
        }
        bit++;
      }
      if (pageChanged > 0) {
        this.dirty.add(pageIndex);
        const pageCount = (this.pageCounts.get(pageIndex) ?? 0) + (value ? pageChanged : -pageChanged);
        this.setCount += value ? pageChanged : -pageChanged;
        changed += pageChanged;
        if (pageCount === 0) {
          this.pages.delete(pageIndex);
          this.pageCounts.delete(pageIndex);
        } else {
          this.pageCounts.set(pageIndex, pageCount);
        }
      } else if ((this.pageCounts.get(pageIndex) ?? 0) === 0) {
        this.pages.delete(pageIndex);
        this.pageCounts.delete(pageIndex);
      }
    }
    return changed;
  }
}

const popcount8 = new Uint8Array(256);
for (let i = 0; i < 256; i++) popcount8[i] = (i & 1) + (popcount8[i >>> 1] as number);
