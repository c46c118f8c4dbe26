import { readFileSync } from 'node:fs';

/**
 * This build's version, from the package's package.json (three levels up from the
 * compiled `dist/src/lib/`): what `ferry --version` and `ferry site show` report, so
 * an operator can tell which release each site runs.
 */
export const ferryVersion: string = (JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
