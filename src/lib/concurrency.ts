/**
 * Runs `fn` over `items` with at most `limit` calls in flight. After a failure no new
 * call starts; every call already started settles before the first error is raised,
 * so nothing is still running when the caller hears of it.
 */
export async function runLimited<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<unknown>): Promise<void> {
  let next = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    while (next < items.length && !failed) {
      try {
        await fn(items[next++] as T);
      } catch (err) {
        failed = true;
        throw err;
      }
    }
  };
  const settled = await Promise.allSettled(Array.from({ length: Math.min(Math.max(1, limit), items.length) }, worker));
  for (const r of settled) if (r.status === 'rejected') throw r.reason;
}
