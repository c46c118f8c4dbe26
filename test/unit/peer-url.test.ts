import { test } from 'node:test';
import assert from 'node:assert/strict';
import { checkAdvertisedUrl, peerAddress, reachableUrl } from '../../src/transport/peer-url.js';

test('a peer is reached at the URL it gives, unless that is a wildcard, or loopback seen from another host', () => {
  // A real address or name is trusted as given.
  assert.equal(reachableUrl('http://10.0.0.5:7370', '10.0.0.9'), 'http://10.0.0.5:7370');
  assert.equal(reachableUrl('http://site-a.example:7370', '10.0.0.9'), 'http://site-a.example:7370');
  assert.equal(reachableUrl('http://127.0.0.1:7370', '127.0.0.1'), 'http://127.0.0.1:7370');
  // A wildcard listener: where the connection came from, with the port given.
  assert.equal(reachableUrl('http://0.0.0.0:7370', '10.0.0.9'), 'http://10.0.0.9:7370');
  assert.equal(reachableUrl('http://0.0.0.0:7370', '::ffff:10.0.0.9'), 'http://10.0.0.9:7370');
  assert.equal(reachableUrl('http://[::]:7370', 'fd00::9'), 'http://[fd00::9]:7370');
  // Loopback claimed, but the connection came from elsewhere: the claim is wrong here.
  assert.equal(reachableUrl('http://127.0.0.1:7370', '10.0.0.9'), 'http://10.0.0.9:7370');
  assert.equal(reachableUrl('http://[::1]:7370', '10.0.0.9'), 'http://10.0.0.9:7370');
  // Nothing better known: as given.
  assert.equal(reachableUrl('http://0.0.0.0:7370', undefined), 'http://0.0.0.0:7370');
  assert.throws(() => reachableUrl('ftp://x', '10.0.0.9'), /INVALID_ADDRESS|invalid peer URL/);
});

test('a wildcard address cannot be advertised; a peer URL parses to host and port', () => {
  assert.throws(() => checkAdvertisedUrl('http://0.0.0.0:7370'), /wildcard/);
  assert.throws(() => checkAdvertisedUrl('http://[::]:7370'), /wildcard/);
  assert.throws(() => checkAdvertisedUrl('site-a:7370'), /invalid peer URL/);
  checkAdvertisedUrl('http://site-a.example:7370');
  assert.deepEqual(peerAddress('http://[fd00::1]:7370'), { host: 'fd00::1', port: 7370 });
  assert.deepEqual(peerAddress('http://site-a'), { host: 'site-a', port: 80 });
});
