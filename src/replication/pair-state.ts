import { FerryError } from '../lib/errors.js';

/**
 * Pair states (HM "pair states", SPEC C12). The same machine serves async and sync
 * modes; it is pure: callers feed events and persist the result.
 *
 *   simplex ──start──▶ initial-copying ──copied──▶ duplex
 *   duplex ──suspend──▶ suspending ──drained──▶ suspended(command)
 *   duplex / initial-copying / duplex-pending ──failure──▶ suspended(failure)
 *   suspended ──resume──▶ duplex-pending ──caught-up──▶ duplex
 *   duplex ──catch-up──▶ duplex-pending ──copied──▶ duplex   (backlog larger than the save volume)
 *   suspended(failure, initial copy unfinished) ──resume──▶ initial-copying
 *   any ──stop──▶ simplex
 */
export const pairStates = ['simplex', 'initial-copying', 'duplex', 'suspending', 'suspended', 'duplex-pending'] as const;
export type PairState = (typeof pairStates)[number];
export type SuspendCause = 'command' | 'failure';

export interface PairStatus {
  state: PairState;
  /** Why it is suspended (or what last went wrong); empty when healthy. */
  reason: string;
  cause?: SuspendCause;
  /** The initial copy has completed at least once (a resume need not copy everything). */
  initialCopyDone: boolean;
}

export type PairEvent =
  | { type: 'start' }
  | { type: 'copied' }
  | { type: 'suspend' }
  | { type: 'drained' }
  | { type: 'failure'; reason: string }
  | { type: 'resume' }
  | { type: 'caught-up' }
  /** The backlog outgrew the save volume: a copy of its blocks catches the target up (rule 8). */
  | { type: 'catch-up' }
  | { type: 'stop' };

export const initialPairStatus: PairStatus = { state: 'simplex', reason: '', initialCopyDone: false };

export function nextPairStatus(s: PairStatus, e: PairEvent): PairStatus {
  const refuse = (): never => {
    throw new FerryError('BAD_REQUEST', `pair is ${describe(s)}; "${e.type}" is not possible now`);
  };
  switch (e.type) {
    case 'start':
      return s.state === 'simplex' ? { state: 'initial-copying', reason: '', initialCopyDone: false } : refuse();
    case 'copied':
      if (s.state === 'initial-copying' || s.state === 'duplex-pending') return { state: 'duplex', reason: '', initialCopyDone: true };
      // A copy can finish on its own connection while the pair is suspended: it stays so.
      return s.state === 'simplex' ? refuse() : { ...s, initialCopyDone: true };
    case 'suspend':
      if (s.state === 'suspended' || s.state === 'suspending') return s;
      return s.state === 'simplex' ? refuse() : { ...s, state: 'suspending', reason: 'suspended by command', cause: 'command' };
    case 'drained':
      return s.state === 'suspending' ? { ...s, state: 'suspended', cause: 'command' } : refuse();
    case 'failure':
      if (s.state === 'simplex') return refuse();
      if (s.state === 'suspended' && s.cause === 'command') return { ...s, reason: e.reason };
      return { ...s, state: 'suspended', reason: e.reason, cause: 'failure' };
    case 'resume':
      if (s.state !== 'suspended') return s.state === 'simplex' ? refuse() : s;
      return { state: s.initialCopyDone ? 'duplex-pending' : 'initial-copying', reason: '', initialCopyDone: s.initialCopyDone };
    case 'catch-up':
      if (s.state === 'duplex' || s.state === 'duplex-pending') return { ...s, state: 'duplex-pending', reason: 'catching up by copy: the backlog outgrew the save volume' };
      return s.state === 'simplex' ? refuse() : s;
    case 'caught-up':
      return s.state === 'duplex-pending' ? { ...s, state: 'duplex', reason: '' } : s;
    case 'stop':
      return { ...initialPairStatus };
  }
}

function describe(s: PairStatus): string {
  return s.state === 'suspended' ? `suspended (${s.cause ?? 'failure'})` : s.state;
}

/** True in states where the sender should be shipping data. */
export function isActive(s: PairStatus): boolean {
  return s.state === 'initial-copying' || s.state === 'duplex' || s.state === 'duplex-pending' || s.state === 'suspending';
}
