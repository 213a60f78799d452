// Dashboard load time against a running meterd (bench/dashboard.sh starts it on a seeded journal).
// Usage: node bench/dashboard-load.mjs URL [RUNS]
// Prints the time from navigation to the page's `data-loaded` mark (status, at-risk, one page of 20 cards with
// their balances, the first subscription's usage chart), each run in a fresh page, and the latency of each route.
import { createRequire } from 'node:module';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(join(repo, 'tests', 'browser', 'package.json'));
const { chromium } = require('playwright-core');
const [url, runsArg] = process.argv.slice(2);
const runs = Number(runsArg || 5);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function timed(path) {
  const t = performance.now();
  const r = await fetch(url + path);
  const body = await r.text();
  if (!r.ok) throw new Error(path + ': HTTP ' + r.status + ' ' + body.slice(0, 200));
  return { ms: performance.now() - t, bytes: body.length, body };
}

const page1 = JSON.parse((await timed('/v1/dashboard/subscriptions?limit=20')).body);
const first = page1.subscriptions[0].resource;
const routes = [
  '/v1/dashboard/subscriptions?limit=20',
  '/v1/dashboard/subscriptions?limit=20&after=' + page1.next,
  '/v1/dashboard/at-risk?limit=50',
  `/v1/dashboard/usage?resource=${first}&bucket=hour`,
  `/v1/dashboard/usage?resource=${first}&bucket=day&from=2000-01-01T00:00:00Z`.replace('2000-01-01T00:00:00Z',
    new Date(Date.now() - 730 * 86400e3).toISOString().slice(0, 10)),
  `/v1/dashboard/usage?resource=${first}&bucket=month&from=` +
    new Date(Date.now() - 730 * 86400e3).toISOString().slice(0, 7) + '-01',
  '/v1/status',
];
console.log(`subscriptions: ${page1.total}; dimensions per card: ${page1.subscriptions[0].dimensions.length}; ` +
  `the page charts ${first}`);
for (const path of routes) {
  const ms = [];
  let bytes = 0;
  for (let i = 0; i < runs; i++) { const r = await timed(path); ms.push(r.ms); bytes = r.bytes; }
  console.log(`route ${path.split('?')[0]}?${(path.split('?')[1] || '').replace(/resource=[^&]+/, 'resource=R').replace(/after=[^&]+/, 'after=...')}: median ${median(ms).toFixed(0)} ms, max ${Math.max(...ms).toFixed(0)} ms, ${bytes} bytes`);
}

const profile = mkdtempSync(join(tmpdir(), 'meterd-bench-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: { width: 1400, height: 1000 },
});
// In the page too: the time from the navigation's start to the moment the page sets `data-loaded` (a mutation
// observer notes it), without the polling and the DevTools round trips of `waitForSelector` on a busy machine.
await context.addInitScript(() => {
  new MutationObserver(() => {
    if (document.body && document.body.dataset.loaded === 'true' && window.__loadedAt === undefined) {
      window.__loadedAt = performance.now();
    }
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-loaded'] });
});
const loads = [];
const inPage = [];
const full = [];
for (let i = 0; i < runs; i++) {
  const page = await context.newPage();
  const t = performance.now();
  await page.goto(url + '/ui/');
  await page.waitForSelector('body[data-loaded=true]', { timeout: 120000 });
  loads.push(performance.now() - t);
  inPage.push(await page.evaluate(() => window.__loadedAt));
  await page.waitForSelector('body[data-status-loaded=true]', { timeout: 120000 });
  full.push(performance.now() - t);
  const cards = await page.locator('article.card[data-resource]').count();
  if (cards !== 20) throw new Error('expected 20 cards, got ' + cards);
  await page.close();
}
await context.close();
rmSync(profile, { recursive: true, force: true });
console.log(`page load with the /v1/status summary too: median ${median(full).toFixed(0)} ms, max ${Math.max(...full).toFixed(0)} ms`);
console.log(`page load (navigation to data-loaded: 20 cards, at-risk, chart): median ${median(loads).toFixed(0)} ms, ` +
  `max ${Math.max(...loads).toFixed(0)} ms over ${runs} runs: ${loads.map((x) => x.toFixed(0)).join(', ')}`);
console.log(`the same in the page (navigation start to the data-loaded mark): median ${median(inPage).toFixed(0)} ms, ` +
  `max ${Math.max(...inPage).toFixed(0)} ms: ${inPage.map((x) => x.toFixed(0)).join(', ')}`);
