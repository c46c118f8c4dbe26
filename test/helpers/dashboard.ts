import { runInNewContext } from 'node:vm';

/** A DOM element as far as the dashboard's script uses one. */
class Element {
  children: Element[] = [];
  textContent = '';
  className = '';
  set innerHTML(html: string) {
    this.children = [];
    this.textContent = html.replace(/<[^>]+>/g, '');
  }
  append(...children: Element[]): void {
    this.children.push(...children);
  }
  replaceChildren(): void {
    this.children = [];
  }
}

export interface RenderedDashboard {
  /** Rows of each table body by id, as the text of their cells. */
  tables: Record<string, string[][]>;
  /** The same cells' classes (how they are highlighted). */
  classes: Record<string, string[][]>;
  error: string;
  /** The lines under the title: the site, and its file system's space (with its class). */
  site: string;
  space: { text: string; className: string };
}

/**
 * Runs the dashboard page's own script against a site's API (real HTTP) with a minimal
 * DOM, once, and returns what it rendered.
 */
export async function renderDashboard(siteUrl: string): Promise<RenderedDashboard> {
  const html = await (await fetch(`${siteUrl}/`)).text();
  const script = html.split('<script>')[1]?.split('</script>')[0];
  if (!script) throw new Error('the dashboard page has no script');
  const byId = new Map<string, Element>();
  const get = (id: string): Element => {
    let e = byId.get(id);
    if (!e) byId.set(id, (e = new Element()));
    return e;
  };
  const requests: Promise<Response>[] = [];
  const document = { getElementById: get, createElement: () => new Element() };
  const context = { document, fetch: (path: string) => requests[requests.push(fetch(new URL(path, siteUrl))) - 1], setInterval: () => 0 };
  runInNewContext(script, context);
  // The first refresh is done once its last request has answered and the script went on.
  for (let settled = -1; settled !== requests.length; ) {
    settled = requests.length;
    await Promise.allSettled(requests);
    await new Promise((r) => setTimeout(r, 20));
  }
  const tables: Record<string, string[][]> = {};
  const classes: Record<string, string[][]> = {};
  for (const [id, e] of byId) {
    if (e.children.length === 0) continue;
    tables[id] = e.children.map((tr) => tr.children.map((td) => td.textContent));
    classes[id] = e.children.map((tr) => tr.children.map((td) => td.className));
  }
  return { tables, classes, error: get('error').textContent, site: get('site').textContent, space: { text: get('space').textContent, className: get('space').className } };
}
