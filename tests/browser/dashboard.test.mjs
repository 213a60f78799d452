// The dashboard in a real browser (Debian's chromium through playwright-core; never a browser download).
//
// Starts `meterd emulator` and `meterd run` against it (ephemeral ports, a temp journal, a bearer token), seeds the
// journal through the API (POST /v1/usage, POST /v1/flush), then checks in the browser:
//   - the token prompt appears, a wrong token is refused with a message, nothing is shown without the token;
//   - every card shows exactly the balance GET /v1/subscriptions/{id}/balance returns;
//   - the chart has one bar slot per bucket of the chosen range and bars exactly where usage was seeded;
//   - the at-risk list is ordered by expiry (deadline), nearest first, and lists every pending event;
//   - no console error (a CSP violation would be one).
// Screenshots (desktop and 360 px wide) go to target/browser/ (CI artefacts).
//
// Usage: METERD_BIN=target/debug/meterd node dashboard.test.mjs   (ci/browser.sh sets everything up)
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..', '..');
const BIN = process.env.METERD_BIN || join(repo, 'target', 'debug', 'meterd');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SHOTS = process.env.SCREENSHOT_DIR || join(repo, 'target', 'browser');
const TOKEN = 'dashboard-test-token-7f3a';
const A = '11111111-1111-4111-8111-111111111111';
const B = '22222222-2222-4222-8222-222222222222';
const HELD = '55555555-5555-4555-8555-555555555555';

const work = mkdtempSync(join(tmpdir(), 'meterd-browser-'));
const children = [];
function cleanup() {
  for (const c of children) { try { c.kill('SIGKILL'); } catch (_) { /* gone */ } }
  rmSync(work, { recursive: true, force: true });
}
process.on('exit', cleanup);

// Starts `args` and resolves with the first match of `pattern` in its stderr (the listening address).
function start(name, args, env, pattern) {
  return new Promise((ok, fail) => {
    // Only the overrides given here: meterd reads every METERD_* variable as configuration (METERD_BIN is not).
    const childEnv = Object.fromEntries(Object.entries(process.env)
      .filter(([k]) => !k.startsWith('METERD_') && k !== 'RUST_LOG'));
    Object.assign(childEnv, env);
    const child = spawn(BIN, args, { env: childEnv, stdio: ['ignore', 'ignore', 'pipe'] });
    children.push(child);
    let log = '';
    const timer = setTimeout(() => fail(new Error(name + ' did not start within 60 s:\n' + log)), 60000);
    child.stderr.on('data', (d) => {
      log += d;
      const m = log.match(pattern);
      if (m) { clearTimeout(timer); ok({ url: m[1], log: () => log }); }
    });
    child.on('exit', (code) => { clearTimeout(timer); fail(new Error(name + ' exited (' + code + '):\n' + log)); });
  });
}

async function call(method, url, body, token) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers.Authorization = 'Bearer ' + token;
  const r = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

const hourStart = (hoursAgo) => {
  const t = new Date();
  t.setUTCMinutes(0, 0, 0);
  return new Date(t.getTime() - hoursAgo * 3600e3);
};
const at20 = (d) => new Date(d.getTime() + 20 * 60e3).toISOString().replace('.000Z', 'Z');

async function main() {
  // ---- the marketplace emulator and meterd ----------------------------------------------------------------------
  const emu = await start('meterd emulator', ['emulator', '--listen', '127.0.0.1:0'], {}, /emulator listening on (http:\/\/[0-9.:]+)/);
  const E = emu.url;
  // A subscription not billable yet: its events are held (pending, with their 24-hour window running).
  let r = await call('POST', E + '/emulator/subscriptions',
    { id: HELD, name: 'Held customer', planId: 'gold', status: 'PendingFulfillmentStart' });
  assert.ok(r.status < 300, 'emulator subscription: ' + JSON.stringify(r));

  writeFileSync(join(work, 'token'), TOKEN + '\n');
  writeFileSync(join(work, 'meterd.toml'), `
[journal]
path = "${join(work, 'journal.db')}"
[ingest]
listen = "127.0.0.1:0"
token_file = "${join(work, 'token')}"
[log]
format = "json"
[marketplace]
mode = "azure"
base_url = "${E}/api"
timeout = "3s"
[marketplace.auth]
kind = "static_token"
[emit]
grace = "0s"
schedule = "0 0 0 1 1 *"
[[dimensions]]
id = "api_calls"
thresholds = ["50%", "90%"]
[[dimensions]]
id = "gb_processed"
unit = 10
[[plans]]
id = "gold"
included = { api_calls = 100, gb_processed = 25 }
`);
  const meterd = await start('meterd run', ['run', '--config', join(work, 'meterd.toml')],
    { METERD_MARKETPLACE__AUTH__STATIC_TOKEN: 'emulator-token' }, /"message":"meterd listening\.".*?"addr":"(http:\/\/[0-9.:]+)"/);
  const M = meterd.url;

  // ---- seed through the API -------------------------------------------------------------------------------------
  const aHours = [2, 4, 6, 8, 10, 12, 14, 16, 18]; // hours ago with usage of A's api_calls
  const bHours = [3, 5, 7, 9];                     // B's gb_processed: 4 x 12.5 = 50 (25 included, 25 over)
  const heldHours = [9, 3, 6];                     // held events: expiry order is 9, 6, 3 hours ago
  const records = [];
  for (const h of aHours) records.push({ resource: A, dimension: 'api_calls', quantity: 7.25, time: at20(hourStart(h)), id: 'a-' + h });
  for (const h of bHours) records.push({ resource: B, dimension: 'gb_processed', quantity: 12.5, time: at20(hourStart(h)), id: 'b-' + h });
  for (const h of heldHours) records.push({ resource: HELD, dimension: 'api_calls', quantity: 1.5, time: at20(hourStart(h)), id: 'h-' + h });
  r = await call('POST', M + '/v1/usage', records);
  assert.equal(r.status, 401, 'ingest without the token is refused');
  r = await call('POST', M + '/v1/usage', records, TOKEN);
  assert.equal(r.status, 202, JSON.stringify(r.body));
  assert.equal(r.body.accepted, records.length);
  r = await call('POST', M + '/v1/flush', undefined, TOKEN);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  const risk = (await call('GET', M + '/v1/dashboard/at-risk', undefined, TOKEN)).body;
  assert.equal(risk.pending_total, heldHours.length, 'the held events are pending: ' + JSON.stringify(risk));

  // ---- the browser ----------------------------------------------------------------------------------------------
  mkdirSync(SHOTS, { recursive: true });
  const profile = mkdtempSync(join(tmpdir(), 'meterd-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1400, height: 1000 },
  });
  const errors = [];
  const page = context.pages()[0] || await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error' && !/401 \(Unauthorized\)/.test(m.text())) errors.push(m.text()); });
  page.on('pageerror', (e) => errors.push(String(e)));
  const outside = [];
  page.on('request', (q) => { if (!q.url().startsWith(M) && !q.url().startsWith('data:')) outside.push(q.url()); });

  try {
    // Token prompt; a wrong token is refused; nothing readable without it.
    await page.goto(M + '/ui/');
    await page.locator('#token-panel').waitFor({ state: 'visible' });
    assert.equal(await page.locator('#token-error').isVisible(), false, 'no error before a token was given');
    assert.equal(await page.locator('article.card').count(), 0, 'no card without the token');
    await page.fill('#token-input', 'not-the-token');
    await page.click('#token-form button[type=submit]');
    await page.locator('#token-error').waitFor({ state: 'visible' });
    assert.match(await page.locator('#token-error').innerText(), /refused/);
    assert.equal(await page.locator('article.card').count(), 0, 'no card with a wrong token');
    await page.fill('#token-input', TOKEN);
    await page.click('#token-form button[type=submit]');
    await page.waitForSelector('body[data-loaded=true]');
    await page.waitForSelector('body[data-status-loaded=true]');
    assert.equal(await page.locator('#token-panel').isVisible(), false);
    assert.match(await page.locator('#summary').innerText(), /3 pending/);
    console.log('ok - token prompt, wrong token refused, right token accepted');

    // Cards: exactly what the balance route returns.
    const cards = await page.locator('article.card[data-resource]').count();
    assert.ok(cards >= 3, 'cards for A, B and the held subscription: ' + cards);
    let checked = 0;
    for (const id of [A, B, HELD]) {
      const bal = (await call('GET', M + '/v1/subscriptions/' + id + '/balance', undefined, TOKEN)).body;
      const card = page.locator(`article.card[data-resource="${id}"]`);
      for (const d of bal.dimensions) {
        const dim = card.locator(`section.dim[data-dimension="${d.dimension}"]`);
        const field = async (f) => (await dim.locator(`[data-field="${f}"]`).first().innerText()).trim();
        assert.equal(await field('available'), d.remaining, `${id} ${d.dimension} available`);
        assert.equal(await field('total'), d.included, `${id} ${d.dimension} total`);
        assert.ok((await field('capacity')).startsWith(d.included), `${id} ${d.dimension} capacity`);
        assert.equal(await field('consumed'), d.consumed, `${id} ${d.dimension} consumed`);
        assert.ok((await field('overage')).startsWith(d.overage_frozen + ' units'), `${id} ${d.dimension} overage`);
        assert.ok((await field('remainder')).startsWith(d.carried_remainder), `${id} ${d.dimension} remainder`);
        checked += 1;
      }
    }
    // The seeded figures themselves (so the comparison is not between two empty things).
    const aBal = (await call('GET', M + '/v1/subscriptions/' + A + '/balance', undefined, TOKEN)).body;
    const aCalls = aBal.dimensions.find((d) => d.dimension === 'api_calls');
    // Usage this term: the seeded hours at or after the term start (the emulator's terms start on the 1st, 00:00).
    const inTerm = (hours, d) => hours.filter((h) => hourStart(h) >= new Date(d.term_start)).length;
    const aN = inTerm(aHours, aCalls);
    assert.equal(aCalls.consumed, String(7.25 * aN));
    assert.equal(aCalls.remaining, String(100 - 7.25 * aN));
    const aState = await page.locator(`article.card[data-resource="${A}"] section.dim[data-dimension="api_calls"] [data-field="threshold-state"]`).innerText();
    assert.equal(aState.trim(), 7.25 * aN >= 50 ? 'warning' : 'ok', `${7.25 * aN} of 100 against the 50% threshold`);
    const bGb = (await call('GET', M + '/v1/subscriptions/' + B + '/balance', undefined, TOKEN)).body
      .dimensions.find((d) => d.dimension === 'gb_processed');
    const bN = inTerm(bHours, bGb);
    assert.equal(bGb.consumed, String(12.5 * bN));
    if (12.5 * bN > 35) assert.notEqual(bGb.overage_frozen, '0', 'B billed overage: ' + JSON.stringify(bGb));
    console.log(`ok - ${checked} card dimensions show exactly the balance API's figures`);

    // Usage chart: one slot per bucket of the range, bars where usage was seeded.
    const chartFor = async (range, dimension) => {
      await page.selectOption('#usage-resource', A);
      await page.selectOption('#usage-range', range);
      await page.click('#usage-form button[type=submit]');
      const fig = page.locator(`figure.chart[data-dimension="${dimension}"]`);
      await fig.waitFor();
      await fig.locator('canvas').first().waitFor();
      return {
        buckets: Number(await fig.getAttribute('data-buckets')),
        bars: Number(await fig.getAttribute('data-bars')),
        rows: await fig.locator('tbody tr').count(),
        caption: await fig.locator('figcaption').innerText(),
      };
    };
    let c = await chartFor('24h', 'api_calls');
    assert.deepEqual([c.buckets, c.bars, c.rows], [24, aHours.length, 24], '24 hourly slots, 9 with usage');
    assert.match(c.caption, /UTC/);
    c = await chartFor('7d', 'api_calls');
    assert.deepEqual([c.buckets, c.bars], [168, aHours.length]);
    const days = new Set(aHours.map((h) => hourStart(h).toISOString().slice(0, 10))).size;
    c = await chartFor('30d', 'api_calls');
    assert.deepEqual([c.buckets, c.bars], [30, days], 'daily: one bar per day with usage');
    c = await chartFor('24m', 'api_calls');
    const months = new Set(aHours.map((h) => hourStart(h).toISOString().slice(0, 7))).size;
    assert.deepEqual([c.buckets, c.bars], [24, months], 'monthly: 24 slots');
    console.log('ok - chart bars: 24h 24/9, 7d 168/9, 30d 30/' + days + ', 24m 24/' + months);
    await chartFor('24h', 'api_calls');

    // At risk: every pending event, nearest expiry first.
    const items = page.locator('#pending-list li.risk');
    assert.equal(await items.count(), heldHours.length);
    const deadlines = [];
    for (let i = 0; i < heldHours.length; i++) deadlines.push(await items.nth(i).getAttribute('data-deadline'));
    const sorted = [...deadlines].sort();
    assert.deepEqual(deadlines, sorted, 'ordered by expiry');
    assert.deepEqual(deadlines, risk.pending.map((p) => p.deadline), 'the API order');
    assert.ok(deadlines[0] < deadlines[deadlines.length - 1]);
    assert.match(await page.locator('#held').innerText(), new RegExp(HELD));
    console.log('ok - at-risk list ordered by expiry: ' + deadlines.join(' < '));

    // Screenshots: desktop and 360 px wide.
    await page.screenshot({ path: join(SHOTS, 'dashboard-desktop.png'), fullPage: true });
    await page.setViewportSize({ width: 360, height: 800 });
    await page.click('#refresh');
    await page.waitForSelector('body[data-loaded=true]');
    await page.waitForTimeout(300); // let the charts re-render at the new width (a picture, not an assertion)
    await page.screenshot({ path: join(SHOTS, 'dashboard-360.png'), fullPage: true });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 1, 'no horizontal scrolling at 360 px: ' + overflow + ' px too wide');
    console.log('ok - screenshots in ' + SHOTS + '; 360 px fits');

    assert.deepEqual(outside, [], 'nothing is fetched from another origin');
    assert.deepEqual(errors, [], 'no console error (CSP violations included)');
    console.log('ok - no request elsewhere, no console error');
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

main().then(() => { console.log('browser test: passed'); process.exit(0); },
  (e) => { console.error('browser test: FAILED\n' + (e.stack || e)); process.exit(1); });
