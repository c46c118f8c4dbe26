#!/usr/bin/env node
/**
 * The `ferry` command's entry. CommonJS so that it runs before Node's ES module loader,
 * whose first file read starts libuv's thread pool: the pool's size is read from
 * UV_THREADPOOL_SIZE once, then. An operator's own setting is kept.
 */
import { availableParallelism } from 'node:os';
import { threadPoolSize } from './thread-pool.cjs';

process.env.UV_THREADPOOL_SIZE ??= String(threadPoolSize(availableParallelism()));
void import('./main.js');
