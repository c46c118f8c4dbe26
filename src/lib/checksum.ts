import { crc32c as nativeCrc32c } from '@node-rs/crc32';

/** CRC32C (Castagnoli) of the bytes, optionally continuing from a previous value. */
export function crc32c(data: Uint8Array | string, initial = 0): number {
  const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  return nativeCrc32c(buf, initial) >>> 0;
}
