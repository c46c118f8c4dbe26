import { crc32c as nativeCrc32c } from '@node-rs/crc32';

/** CRC32C (Castagnoli) of the bytes, optionally continuing from a previous value. */
export function crc32c(data: Uint8Array | string, initial = 0): number {
  const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  return nativeCrc32c(buf, initial) >>> 0;
}

/** CRC32C of `parts` one after the other, as of the bytes joined. */
export function crc32cParts(parts: readonly Uint8Array[], initial = 0): number {
  let crc = initial;
  for (const p of parts) crc = crc32c(p, crc);
  return crc;
}

// CRC32C of a concatenation from the CRCs of its parts (zlib's crc32_combine, for the
// Castagnoli polynomial): data that already has a checksum is not read again to
// checksum a record or frame holding it. Polynomials are bit-reversed, x^0 at bit 31.
const castagnoliReversed = 0x82f63b78;
const xPower0 = 0x80000000;

/** a(x) * b(x) modulo the CRC polynomial. */
function multiplyModP(a: number, b: number): number {
  let product = 0;
  for (let m = xPower0; m !== 0; m >>>= 1) {
    if (a & m) product ^= b;
    b = b & 1 ? (b >>> 1) ^ castagnoliReversed : b >>> 1;
  }
  return product >>> 0;
}

/** x^(2^k) modulo the polynomial, k = 0..63 (by squaring: lengths up to 2^53 bytes). */
const xToTwoPowers = (() => {
  const table = new Uint32Array(64);
  let p = xPower0 >>> 1; // x^1
  for (let k = 0; k < 64; k++) {
    table[k] = p;
    p = multiplyModP(p, p);
  }
  return table;
})();

/** x^(8 * bytes) modulo the polynomial: the shift that appending `bytes` bytes applies. */
function shiftFor(bytes: number): number {
  let p = xPower0;
  // 8 * bytes = 2^3 * bytes: walk the bits of `bytes` from x^(2^3).
  for (let k = 3, n = bytes; n > 0; k++, n = Math.floor(n / 2)) if (n % 2 === 1) p = multiplyModP(xToTwoPowers[k] as number, p);
  return p;
}

/** CRC32C of A‖B from crc32c(A), crc32c(B) and B's length in bytes. */
export function crc32cCombine(crcA: number, crcB: number, lengthB: number): number {
  return (multiplyModP(shiftFor(lengthB), crcA) ^ crcB) >>> 0;
}

/** CRC32C of B from crc32c(A‖B), crc32c(A) and B's length in bytes. */
export function crc32cSuffix(crcAB: number, crcA: number, lengthB: number): number {
  return (multiplyModP(shiftFor(lengthB), crcA) ^ crcAB) >>> 0;
}
