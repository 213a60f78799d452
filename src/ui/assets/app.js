// meterd dashboard. Reads meterd's own JSON routes (relative to /ui/), renders cards, usage charts (uPlot) and
// what is at risk. No inline code (CSP), no other origin, nothing from the internet. Text only via textContent.
(function () {
  'use strict';

  const TOKEN_KEY = 'meterd-token';
  const GROUPS = ['accepted', 'included', 'carried', 'pending', 'not_billed'];
  const GROUP_LABEL = {
    accepted: 'accepted', included: 'included/pooled', carried: 'carried', pending: 'pending',
    not_billed: 'not billed',
  };
  const GROUP_COLOUR = {
    accepted: '#1a7f37', included: '#54aeff', carried: '#bf8700', pending: '#8c959f', not_billed: '#cf222e',
  };
  const RANGES = {
    '24h': { bucket: 'hour', hours: 24, label: 'last 24 hours', unit: 'hour' },
    '7d': { bucket: 'hour', hours: 7 * 24, label: 'last 7 days', unit: 'hour' },
    '30d': { bucket: 'day', days: 30, label: 'last 30 days', unit: 'day' },
    '90d': { bucket: 'day', days: 90, label: 'last 90 days', unit: 'day' },
    '12m': { bucket: 'month', months: 12, label: 'last 12 months', unit: 'month' },
    '24m': { bucket: 'month', months: 24, label: 'last 24 months', unit: 'month' },
  };
  const PAGE = 20;

  const $ = (id) => document.getElementById(id);
  const state = { afters: [''], page: 0, next: null, cards: [], charts: [], now: Date.now() };

  // ---- tiny DOM helper: el('p', {class: 'x'}, 'text', child) --------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'text') e.textContent = v; else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

  // ---- exact decimals: micro-units as BigInt ------------------------------------------------------------------
  function toMicros(s) {
    if (s === 'infinite' || s === null || s === undefined) return null;
    const neg = s.startsWith('-');
    const [i, f = ''] = (neg ? s.slice(1) : s).split('.');
    const v = BigInt(i || '0') * 1000000n + BigInt((f + '000000').slice(0, 6));
    return neg ? -v : v;
  }
  function fromMicros(v) {
    if (v === null) return 'infinite';
    const neg = v < 0n; const a = neg ? -v : v;
    const i = a / 1000000n; let f = (a % 1000000n).toString().padStart(6, '0').replace(/0+$/, '');
    return (neg ? '-' : '') + i.toString() + (f ? '.' + f : '');
  }
  const num = (s) => Number(s);

  // ---- time -----------------------------------------------------------------------------------------------------
  function span(seconds) {
    const s = Math.abs(Math.round(seconds));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d > 0) return d + ' d ' + h + ' h';
    if (h > 0) return h + ' h ' + m + ' min';
    return m + ' min';
  }
  function until(iso) {
    if (!iso) return null;
    const secs = (Date.parse(iso) - state.now) / 1000;
    return secs >= 0 ? 'in ' + span(secs) : span(secs) + ' ago';
  }
  const utc = (iso) => (iso ? iso.replace('T', ' ').replace(/:00Z$/, ' UTC').replace(/Z$/, ' UTC') : '—');

  // ---- API --------------------------------------------------------------------------------------------------------
  class AuthError extends Error {}
  async function api(path) {
    const headers = { Accept: 'application/json' };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = 'Bearer ' + token;
    const r = await fetch('../' + path, { headers, cache: 'no-store', credentials: 'omit' });
    if (r.status === 401) throw new AuthError('unauthorized');
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    if (!r.ok) {
      const msg = body && body.errors ? body.errors.map((e) => e.message).join('; ') : 'HTTP ' + r.status;
      throw new Error(path.split('?')[0] + ': ' + msg);
    }
    return body;
  }

  // ---- token prompt -----------------------------------------------------------------------------------------------
  function askToken(refused) {
    const panel = $('token-panel');
    panel.hidden = false;
    const err = $('token-error');
    if (refused) {
      err.textContent = 'That token was refused (HTTP 401). Use the token in ingest.token_file of this meterd.';
      err.hidden = false;
    } else {
      err.hidden = true;
    }
    $('token-input').value = '';
    $('token-input').focus();
  }
  function tokenSubmitted(ev) {
    ev.preventDefault();
    const t = $('token-input').value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    load();
  }

  // ---- summary and at risk ----------------------------------------------------------------------------------------
  function renderSummary(status) {
    const em = status.emitter || {};
    const parts = ['Now ' + utc(status.now), status.pending_events + ' pending'];
    if (status.last_success) parts.push('last success ' + until(status.last_success));
    $('summary').textContent = parts.join(' · ');
    const facts = clear($('pass-facts'));
    const fact = (k, v) => { facts.append(el('dt', { text: k }), el('dd', { text: v })); };
    fact('Last pass', em.last_completed ? utc(em.last_completed) + ' (' + until(em.last_completed) + ')' : 'none yet');
    fact('Last successful send', status.last_success ? utc(status.last_success) + ' (' + until(status.last_success) + ')' : 'none yet');
    if (em.last_error) fact('Last pass error', em.last_error);
    fact('Nearest expiry', status.nearest_expiry_seconds === null || status.nearest_expiry_seconds === undefined
      ? 'nothing pending' : 'in ' + span(status.nearest_expiry_seconds) + ' (hour ' + utc(status.nearest_expiry_hour) + ')');
    if (status.last_error) fact('Why events wait', status.last_error);
    renderReplicas(status.replicas);
  }

  function renderReplicas(replicas) {
    const box = clear($('replicas'));
    if (!Array.isArray(replicas)) return;
    box.append(el('h3', { text: 'Replicas (fleet)' }));
    const table = el('table', { id: 'replica-table' },
      el('caption', { text: 'Heartbeat and forward lag of each replica' }),
      el('thead', {}, el('tr', {}, ...['Replica', 'Heartbeat', 'Forward lag', 'Unforwarded', 'Holds leases']
        .map((h) => el('th', { scope: 'col', text: h })))));
    const tb = el('tbody');
    for (const r of replicas) {
      const hb = typeof r.heartbeat_at === 'number' ? new Date(r.heartbeat_at * 1000).toISOString() : r.heartbeat_at;
      tb.append(el('tr', {},
        el('th', { scope: 'row', text: r.replica_id }),
        el('td', { text: hb ? utc(hb) + ' (' + until(hb) + ')' : '—' }),
        el('td', { class: 'num', text: r.forward_lag_seconds === null || r.forward_lag_seconds === undefined ? '—' : span(r.forward_lag_seconds) }),
        el('td', { class: 'num', text: r.unforwarded === undefined ? '—' : r.unforwarded }),
        el('td', { text: Array.isArray(r.holds_leases) ? (r.holds_leases.join(', ') || 'none') : (r.holds_leases ? 'yes' : 'no') })));
    }
    table.append(tb);
    box.append(el('div', { class: 'table-wrap' }, table));
  }

  function renderAtRisk(risk) {
    const list = clear($('pending-list'));
    if (risk.pending.length === 0) list.append(el('li', { text: 'Nothing pending.' }));
    for (const p of risk.pending) {
      const left = p.seconds_left >= 0 ? span(p.seconds_left) + ' left' : 'window closed, settles at the next pass';
      list.append(el('li', { class: 'risk', 'data-deadline': p.deadline, 'data-resource': p.resource },
        el('span', { class: 'left' + (p.seconds_left < 3 * 3600 ? ' soon' : ''), text: left }), ' · ',
        p.resource + ' · ' + p.dimension + ' · hour ' + utc(p.hour) + ' · ' + p.quantity,
        ' · expires ' + utc(p.deadline),
        p.held ? ' · held: ' + p.held : '', p.attempts ? ' · ' + p.attempts + ' attempts' : '',
        p.last_error ? ' · ' + p.last_error : ''));
    }
    const more = $('pending-more');
    more.hidden = risk.pending_total <= risk.pending.length;
    more.textContent = 'Showing ' + risk.pending.length + ' of ' + risk.pending_total + ' pending events.';

    const held = clear($('held'));
    if (risk.held_subscriptions.length) {
      held.append(el('h3', { text: 'Held subscriptions (not billable yet)' }));
      const ul = el('ul', { class: 'risk-list' });
      for (const h of risk.held_subscriptions) {
        ul.append(el('li', { text: h.resource + ': ' + h.events + ' events held (' + h.reason + '), first expiry ' + utc(h.nearest_deadline) }));
      }
      held.append(ul);
    }
    const rec = clear($('reconcile'));
    if (risk.reconcile.length) {
      rec.append(el('h3', { text: 'To reconcile' }));
      const ul = el('ul', { class: 'risk-list' });
      for (const r of risk.reconcile) {
        ul.append(el('li', {}, el('strong', { text: r.state }), ' · ' + r.resource + ' · ' + r.dimension + ' · hour ' +
          utc(r.hour) + ' · ' + r.quantity + (r.market_quantity ? ' (marketplace: ' + r.market_quantity + ')' : '') +
          ': ' + r.hint));
      }
      rec.append(ul);
    }
    const al = clear($('alerts'));
    if (risk.undelivered_alerts.length) {
      al.append(el('h3', { text: 'Undelivered alerts (' + risk.undelivered_total + ')' }));
      const ul = el('ul', { class: 'risk-list' });
      for (const a of risk.undelivered_alerts) {
        ul.append(el('li', { text: a.kind + (a.resource ? ' · ' + a.resource : '') + ' · raised ' + utc(a.raised_at) +
          ' · ' + a.attempts + ' attempts, next ' + utc(a.next_attempt_at) + (a.last_error ? ' · ' + a.last_error : '') }));
      }
      al.append(ul);
    }
  }

  // ---- cards ------------------------------------------------------------------------------------------------------
  function badge(t) {
    return el('span', { class: 'badge state-' + t.state, 'data-field': 'threshold-state', text: t.state }, );
  }

  function poolLine(p) {
    const when = [];
    if (p.voided) when.push('voided');
    if (p.refreshes_at) when.push('refreshes ' + until(p.refreshes_at));
    if (p.expires_at) when.push((Date.parse(p.expires_at) > state.now ? 'expires ' : 'expired ') + until(p.expires_at));
    const scope = p.scope ? Object.entries(p.scope).map(([k, v]) => k + ' ' + v).join(', ') : '';
    return el('li', { 'data-pool': p.id },
      el('span', { 'data-field': 'pool-available', text: p.available }), ' of ',
      el('span', { 'data-field': 'pool-total', text: p.total }), ' available · ' + p.id +
      (scope ? ' (' + scope + ')' : '') + ' · used ' + p.used + (when.length ? ' · ' + when.join(', ') : ''));
  }

  function dimensionBlock(d) {
    const pools = Array.isArray(d.pools) ? d.pools : null;
    let available = d.remaining, total = d.included;
    if (pools && pools.length) {
      const live = pools.filter((p) => !p.voided);
      const inf = live.some((p) => p.total === 'infinite');
      available = inf ? 'infinite' : fromMicros(live.reduce((a, p) => a + (toMicros(p.available) || 0n), 0n));
      total = inf ? 'infinite' : fromMicros(live.reduce((a, p) => a + (toMicros(p.total) || 0n), 0n));
    }
    const dl = el('dl');
    const row = (k, v, field) => dl.append(el('dt', { text: k }), el('dd', field ? { 'data-field': field } : {}, v));
    row('Available', el('span', { class: 'available' },
      el('span', { 'data-field': 'available', text: available }), ' of ', el('span', { 'data-field': 'total', text: total })));
    if (total !== 'infinite' && toMicros(total) > 0n) {
      const used = toMicros(total) - toMicros(available);
      dl.append(el('dt', { text: 'Used' }), el('dd', {}, el('meter', {
        class: 'meter', min: 0, max: num(total), value: num(fromMicros(used)),
        'aria-label': d.dimension + ': ' + fromMicros(used) + ' of ' + total + ' used',
      })));
    }
    row('Capacity bought', d.included + (d.plan ? ' (plan ' + d.plan + ')' : ''), 'capacity');
    row('Term ends', utc(d.term_end) + ' (' + until(d.term_end) + ')', 'term-end');
    row('Usage this term', d.consumed, 'consumed');
    row('Billed overage', d.overage_frozen + ' units' + (d.overage_accepted !== d.overage_frozen ? ', ' + d.overage_accepted + ' accepted' : ''), 'overage');
    row('Carried remainder', d.carried_remainder + (d.unit > 1 ? ' (below one unit of ' + d.unit + ')' : ''), 'remainder');
    const t = d.threshold;
    if (t) row('Threshold', el('span', {}, badge(t), ' ', el('span', { 'data-field': 'threshold-text', text: t.text })));
    const block = el('section', { class: 'dim', 'data-dimension': d.dimension, 'aria-label': d.dimension },
      el('h4', { text: d.dimension }), dl);
    if (pools && pools.length) {
      const ul = el('ul', { class: 'pools', 'aria-label': 'Pools of ' + d.dimension + ', in draw order' });
      for (const p of pools) ul.append(poolLine(p));
      block.append(ul);
    }
    return block;
  }

  function renderCards(page) {
    const box = clear($('cards'));
    state.cards = page.subscriptions;
    $('cards-count').textContent = page.total + ' subscriptions; page ' + (state.page + 1) + ' shows ' +
      page.subscriptions.length + '.';
    for (const c of page.subscriptions) {
      const held = c.held_events ? ', ' + c.held_events + ' held' : '';
      const card = el('article', { class: 'card', 'data-resource': c.resource, 'aria-labelledby': 'card-' + cssId(c.resource) },
        el('h3', { id: 'card-' + cssId(c.resource), text: c.resource }),
        el('p', { class: 'status', text: (c.status || 'not in the subscription list') + ' · ' + c.pending_events + ' pending' + held }));
      for (const d of c.dimensions) card.append(dimensionBlock(d));
      const show = el('button', { type: 'button', text: 'Usage over time' });
      show.addEventListener('click', () => { $('usage-resource').value = c.resource; showUsage(); $('usage-title').scrollIntoView(); });
      card.append(show);
      box.append(card);
    }
    renderTeams(page.subscriptions);
    $('prev').disabled = state.page === 0;
    $('next').disabled = !page.next;
    state.next = page.next;
    const sel = $('usage-resource');
    const keep = sel.value;
    clear(sel);
    for (const c of page.subscriptions) sel.append(el('option', { value: c.resource, text: c.resource }));
    if (keep && page.subscriptions.some((c) => c.resource === keep)) sel.value = keep;
  }

  // Pools shared by a customer team or group: one card per team, the pool shown once, its members listed.
  function renderTeams(subs) {
    const teams = new Map();
    for (const c of subs) {
      for (const d of c.dimensions) {
        for (const p of d.pools || []) {
          const scope = p.scope || {};
          const team = scope.customer ? 'customer ' + scope.customer : scope.group ? 'group ' + scope.group : null;
          if (!team) continue;
          if (!teams.has(team)) teams.set(team, { pools: new Map(), members: new Set() });
          const t = teams.get(team);
          t.members.add(c.resource);
          t.pools.set(d.dimension + '/' + p.id, { dimension: d.dimension, pool: p });
        }
      }
    }
    const box = clear($('teams'));
    for (const [name, t] of teams) {
      const ul = el('ul', { class: 'pools' });
      for (const { dimension, pool } of t.pools.values()) {
        const li = poolLine(pool);
        li.prepend(dimension + ': ');
        ul.append(li);
      }
      box.append(el('article', { class: 'card team', 'data-team': name },
        el('h3', { text: 'Team: ' + name }),
        el('p', { class: 'status', text: t.members.size + ' subscriptions: ' + [...t.members].join(', ') }), ul));
    }
  }
  function cssId(s) { return s.replace(/[^A-Za-z0-9_-]/g, '_'); }

  // ---- usage charts -----------------------------------------------------------------------------------------------
  function rangeQuery(key) {
    const r = RANGES[key];
    const now = new Date(state.now);
    let to, from;
    if (r.bucket === 'hour') {
      to = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate(), now.getUTCHours() + 1);
      from = to - r.hours * 3600e3;
    } else if (r.bucket === 'day') {
      to = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() + 1);
      from = to - r.days * 86400e3;
    } else {
      to = Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1);
      from = Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1 - r.months, 1);
    }
    const iso = (t) => new Date(t).toISOString().replace('.000Z', 'Z');
    return { bucket: r.bucket, from: iso(from), to: iso(to), label: r.label, unit: r.unit };
  }

  async function showUsage(ev) {
    if (ev) ev.preventDefault();
    const resource = $('usage-resource').value;
    const box = $('charts');
    for (const c of state.charts) c.destroy();
    state.charts = [];
    clear(box);
    if (!resource) { box.append(el('p', { class: 'hint', text: 'No subscription yet.' })); return; }
    const q = rangeQuery($('usage-range').value);
    let data;
    try {
      data = await api('v1/dashboard/usage?' + new URLSearchParams({ resource, bucket: q.bucket, from: q.from, to: q.to }));
    } catch (e) { return failed(e); }
    if (!data.series.length) box.append(el('p', { class: 'hint', text: 'No usage for ' + resource + ' in the ' + q.label + '.' }));
    for (const s of data.series) box.append(chart(resource, s, q));
  }

  function chart(resource, s, q) {
    const b = s.buckets;
    const bars = b.filter((x) => toMicros(x.total) !== 0n).length;
    const total = fromMicros(b.reduce((a, x) => a + toMicros(x.total), 0n));
    const title = s.dimension + ': usage per ' + q.unit + ', ' + q.label + ' (UTC)';
    const desc = 'Stacked bars by outcome; ' + bars + ' of ' + b.length + ' ' + q.unit + 's have usage, total ' + total + '.';
    const plot = el('div', { class: 'plot', role: 'img', 'aria-label': title + '. ' + desc });
    const legend = el('ul', { class: 'legend', 'aria-hidden': 'true' },
      ...GROUPS.map((g) => el('li', {}, el('span', { class: 'swatch g-' + g }), GROUP_LABEL[g])));
    const table = el('table', {},
      el('caption', { text: title }),
      el('thead', {}, el('tr', {}, el('th', { scope: 'col', text: q.unit + ' starting (UTC)' }),
        ...GROUPS.map((g) => el('th', { scope: 'col', class: 'num', text: GROUP_LABEL[g] })),
        el('th', { scope: 'col', class: 'num', text: 'total' }))));
    const tb = el('tbody');
    for (const x of b) {
      tb.append(el('tr', {}, el('th', { scope: 'row', text: utc(x.start) }),
        ...GROUPS.map((g) => el('td', { class: 'num', text: x.groups[g] })), el('td', { class: 'num', text: x.total })));
    }
    table.append(tb);
    const fig = el('figure', {
      class: 'chart', 'data-dimension': s.dimension, 'data-buckets': b.length, 'data-bars': bars, 'data-bucket': q.bucket,
    }, el('figcaption', { text: title }), el('p', { class: 'hint', text: desc }), legend, plot,
    el('details', {}, el('summary', { text: 'Table of this chart' }), el('div', { class: 'table-wrap' }, table)));
    requestAnimationFrame(() => draw(plot, b, fig, q.bucket));
    return fig;
  }

  // Axis labels in UTC, 24-hour clock: hours as HH:00 (the date at midnight), days as MM-DD, months as YYYY-MM.
  function tick(ts, bucket) {
    const iso = new Date(ts * 1000).toISOString();
    if (bucket === 'month') return iso.slice(0, 7);
    if (bucket === 'day') return iso.slice(5, 10);
    return iso.slice(11, 13) === '00' ? iso.slice(5, 10) : iso.slice(11, 16);
  }

  function draw(plot, b, fig, bucket) {
    if (typeof uPlot === 'undefined') return;
    const xs = b.map((x) => Date.parse(x.start) / 1000);
    // Stacked bars: drawn top group first at the full height, each later series covering the part below it.
    const order = GROUPS.slice().reverse();
    const series = [{}];
    const data = [xs];
    const raw = {};
    for (const g of GROUPS) raw[g] = b.map((x) => num(x.groups[g]));
    for (let i = 0; i < order.length; i++) {
      const below = GROUPS.slice(0, GROUPS.length - i);
      data.push(xs.map((_, j) => below.reduce((a, g) => a + raw[g][j], 0)));
      const g = order[i];
      series.push({
        label: GROUP_LABEL[g], fill: GROUP_COLOUR[g], stroke: GROUP_COLOUR[g], width: 0,
        points: { show: false }, paths: uPlot.paths.bars({ size: [0.8, 40], align: 0 }),
        value: (u, v, si, idx) => (idx === null || idx === undefined ? '' : String(raw[g][idx])),
      });
    }
    const width = Math.max(280, plot.clientWidth || fig.clientWidth || 320);
    const opts = {
      width, height: 220, legend: { show: false },
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), 'Etc/UTC'),
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.08 : 1] } },
      axes: [{ stroke: '#57606a', values: (u, splits) => splits.map((t) => tick(t, bucket)) },
        { stroke: '#57606a', size: 56 }],
      cursor: { points: { show: false } },
      series,
    };
    const u = new uPlot(opts, data, plot);
    state.charts.push(u);
  }

  // ---- loading ----------------------------------------------------------------------------------------------------
  function failed(e) {
    if (e instanceof AuthError) {
      const had = sessionStorage.getItem(TOKEN_KEY) !== null;
      sessionStorage.removeItem(TOKEN_KEY);
      $('forget').hidden = true;
      askToken(had);
      return;
    }
    const box = $('error');
    box.textContent = String(e.message || e) + ' (is meterd running? press Refresh to try again)';
    box.hidden = false;
  }

  async function loadCards() {
    const after = state.afters[state.page];
    const page = await api('v1/dashboard/subscriptions?' + new URLSearchParams({ limit: PAGE, after }));
    renderCards(page);
  }

  // The cards, the at-risk lists and the chart do not wait for /v1/status (asked at the same time); the summary
  // fills in when it arrives. `data-loaded` marks the cards, at-risk and chart; `data-status-loaded` the summary.
  async function load() {
    $('error').hidden = true;
    document.body.removeAttribute('data-loaded');
    const status = api('v1/status').then((st) => {
      state.now = Date.parse(st.now) || Date.now();
      renderSummary(st);
      document.body.setAttribute('data-status-loaded', 'true');
    }).catch((e) => { if (!(e instanceof AuthError)) failed(e); });
    try {
      const [risk] = await Promise.all([api('v1/dashboard/at-risk?limit=50'), loadCards()]);
      $('token-panel').hidden = true;
      $('forget').hidden = sessionStorage.getItem(TOKEN_KEY) === null;
      state.now = Date.parse(risk.at) || Date.now();
      renderAtRisk(risk);
      await showUsage();
      document.body.setAttribute('data-loaded', 'true');
      await status;
    } catch (e) { failed(e); }
  }

  function start() {
    $('token-form').addEventListener('submit', tokenSubmitted);
    $('usage-form').addEventListener('submit', showUsage);
    $('usage-range').addEventListener('change', () => showUsage());
    $('usage-resource').addEventListener('change', () => showUsage());
    $('refresh').addEventListener('click', () => load());
    $('forget').addEventListener('click', () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); });
    $('next').addEventListener('click', () => {
      if (!state.next) return;
      state.afters[state.page + 1] = state.next; state.page += 1; loadCards().then(showUsage).catch(failed);
    });
    $('prev').addEventListener('click', () => {
      if (state.page === 0) return;
      state.page -= 1; loadCards().then(showUsage).catch(failed);
    });
    let t = null;
    window.addEventListener('resize', () => { clearTimeout(t); t = setTimeout(() => showUsage(), 250); });
    load();
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start); else start();
}());
