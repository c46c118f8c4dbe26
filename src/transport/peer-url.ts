import { isIP } from 'node:net';
import { FerryError } from '../lib/errors.js';

/** Parses a peer URL (`http://host:port`) into where its RCP listener is. */
export function peerAddress(url: string): { host: string; port: number } {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new FerryError('INVALID_ADDRESS', `invalid peer URL "${url}": expected http://HOST:PORT`);
  }
  if (u.protocol !== 'http:' || !u.hostname) throw new FerryError('INVALID_ADDRESS', `invalid peer URL "${url}": expected http://HOST:PORT`);
  return { host: u.hostname.replace(/^\[|\]$/g, ''), port: Number(u.port || 80) };
}

const wildcardHosts = new Set(['0.0.0.0', '::', '']);

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\./.test(host) || /^::ffff:127\./i.test(host);
}

/** A URL a site may advertise: a peer URL whose host means the same thing from elsewhere. */
export function checkAdvertisedUrl(url: string): void {
  const { host } = peerAddress(url);
  if (wildcardHosts.has(host)) throw new FerryError('INVALID_ADDRESS', `"${url}" cannot be advertised: ${host} is a wildcard address; give the host name or address other sites reach this one at`);
}

/**
 * The URL a peer that connected from `remoteAddress` is reached at, given the URL it
 * says it has. A site listening on a wildcard address (0.0.0.0, ::) without an
 * advertised URL can only say that, and a loopback URL is wrong when the connection
 * came from another host: then the address the connection came from is used, with the
 * port it gave.
 */
export function reachableUrl(claimed: string, remoteAddress: string | undefined): string {
  const { host, port } = peerAddress(claimed);
  if (remoteAddress === undefined || isIP(remoteAddress) === 0) return claimed;
  const remote = remoteAddress.replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/i, '');
  if (!wildcardHosts.has(host) && !(isLoopback(host) && !isLoopback(remote))) return claimed;
  return `http://${isIP(remote) === 6 ? `[${remote}]` : remote}:${port}`;
}
