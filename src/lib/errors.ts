/**
 * Typed errors with stable codes. Every failure that reaches an operator carries a
 * code (machine-readable, stable across releases) and a sentence a storage
 * administrator understands. The HTTP status is the one the API answers with.
 */
export type ErrorCode =
  | 'BAD_REQUEST'
  | 'INVALID_NAME'
  | 'INVALID_SIZE'
  | 'INVALID_DURATION'
  | 'INVALID_ADDRESS'
  | 'NOT_FOUND'
  | 'VOLUME_NOT_FOUND'
  | 'VOLUME_EXISTS'
  | 'VOLUME_IN_USE'
  | 'VOLUME_READ_ONLY'
  | 'SHRINK_REFUSED'
  | 'SNAPSHOT_NOT_FOUND'
  | 'SNAPSHOT_EXISTS'
  | 'SNAPSHOT_LIMIT'
  | 'SNAPSHOT_CORRUPT'
  | 'SNAPSHOT_IN_USE'
  | 'OUT_OF_RANGE'
  | 'PAYLOAD_TOO_LARGE'
  | 'SITE_EXISTS'
  | 'SITE_NOT_FOUND'
  | 'SITE_LOCKED'
  | 'NOT_A_SITE_DIRECTORY'
  | 'CORRUPT_RECORD'
  | 'CORRUPT_FILE'
  | 'UNSUPPORTED_FORMAT'
  | 'PROTOCOL_ERROR'
  | 'EXPORT_NOT_FOUND'
  | 'EXPORT_REFUSED'
  | 'CHECKSUM_MISMATCH'
  /** The site's file system is full (or a quota or file size limit was reached). */
  | 'NO_SPACE'
  | 'UNAVAILABLE'
  /** `ferry status -x`: pairs need attention (the CLI's exit status; never an API answer). */
  | 'UNHEALTHY'
  | 'STALE_GENERATION'
  | 'INTERNAL';

const httpStatusByCode: Record<ErrorCode, number> = {
  BAD_REQUEST: 400,
  INVALID_NAME: 400,
  INVALID_SIZE: 400,
  INVALID_DURATION: 400,
  INVALID_ADDRESS: 400,
  NOT_FOUND: 404,
  VOLUME_NOT_FOUND: 404,
  VOLUME_EXISTS: 409,
  VOLUME_IN_USE: 409,
  VOLUME_READ_ONLY: 409,
  SHRINK_REFUSED: 409,
  SNAPSHOT_NOT_FOUND: 404,
  SNAPSHOT_EXISTS: 409,
  SNAPSHOT_LIMIT: 409,
  SNAPSHOT_CORRUPT: 500,
  SNAPSHOT_IN_USE: 409,
  OUT_OF_RANGE: 416,
  PAYLOAD_TOO_LARGE: 413,
  SITE_EXISTS: 409,
  SITE_NOT_FOUND: 404,
  SITE_LOCKED: 409,
  NOT_A_SITE_DIRECTORY: 409,
  CORRUPT_RECORD: 500,
  CORRUPT_FILE: 500,
  UNSUPPORTED_FORMAT: 500,
  PROTOCOL_ERROR: 400,
  EXPORT_NOT_FOUND: 404,
  EXPORT_REFUSED: 409,
  CHECKSUM_MISMATCH: 400,
  NO_SPACE: 507,
  UNAVAILABLE: 503,
  UNHEALTHY: 503,
  STALE_GENERATION: 409,
  INTERNAL: 500,
};

export class FerryError extends Error {
  readonly code: ErrorCode;
  readonly httpStatus: number;
  readonly details: Record<string, unknown> | undefined;

  constructor(code: ErrorCode, message: string, details?: Record<string, unknown>) {
    super(message);
    this.name = 'FerryError';
    this.code = code;
    this.httpStatus = httpStatusByCode[code];
    this.details = details;
  }

  toJSON(): { code: ErrorCode; message: string; details?: Record<string, unknown> } {
    return this.details === undefined
      ? { code: this.code, message: this.message }
      : { code: this.code, message: this.message, details: this.details };
  }
}

export function isFerryError(err: unknown, code?: ErrorCode): err is FerryError {
  return err instanceof FerryError && (code === undefined || err.code === code);
}

/**
 * A write refused for want of space: the file system is full (the catalog says
 * SQLITE_FULL), a quota is reached, or the process's file size limit is. Such a failure
 * ends once space is freed; nothing about the files themselves is wrong.
 */
export function isNoSpace(err: unknown): boolean {
  const code = (err as { code?: unknown } | undefined)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG' || code === 'SQLITE_FULL';
}

/** Invariant violated: the site stops rather than spread bad data. */
export class AssertionFailure extends Error {
  constructor(message: string) {
    super(`assertion failed: ${message}`);
    this.name = 'AssertionFailure';
  }
}

export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new AssertionFailure(message);
}
