// stockd's dashboard: reads GET /metrics every 2 s and the change feed (GET /v1/events,
// Server-Sent Events) live, with the API key the person enters (if the server asks for
// one). The feed is read with fetch() and a stream parser of our own, not EventSource:
// EventSource cannot send an Authorization header, and keys never go in URLs.
'use strict';
(() => {
  const KEY_STORE = 'stockd.apiKey';
  const POLL_MS = 2000;
  const HISTORY = 150; // rate samples kept: 5 minutes at one per 2 s
  const RECENT_EVENTS = 500; // the window "hottest" is counted over
  const SEED_RECORDS = 500; // log records replayed from the feed when the page opens
  const HOT_SHOWN = 8;
  const LATEST_SHOWN = 25;
  const STALL_MS = 45000; // the server sends a heartbeat after 15 s without events
  const RETRY_MAX_MS = 15000;

  const $ = (id) => document.getElementById(id);
  let apiKey = sessionStorage.getItem(KEY_STORE) || '';
  let blocked = false; // waiting for a key: nothing is read until one is given
  let metricsGen = 0;
  let feedGen = 0;
  let feedController = null;
  let feedIsOff = false;
  let lastEventId = null;
  let retryMs = 1000;
  let reconnectNow = null;
  let lastMetrics = null;
  let connections = 0; // streams opened so far

  const products = new Map(); // sku -> its figures after the newest event about it
  const recent = []; // the SKUs each of the last RECENT_EVENTS events touched
  const latest = []; // the newest events, newest first
  let seen = 0;
  const raws = []; // the last few raw samples of the counters
  const rates = []; // per-second rates between samples, oldest first

  function withKey(extra) {
    const h = Object.assign({}, extra);
    if (apiKey) h.Authorization = 'Bearer ' + apiKey;
    return h;
  }

  async function problemOf(res) {
    try {
      return await res.json();
    } catch (_) {
      return {};
    }
  }

  function setConn(state, text) {
    const el = $('conn');
    el.dataset.state = state;
    el.textContent = text;
  }

  // A 401 or 403: stop reading and ask for a key.
  function needKey(status) {
    blocked = true;
    metricsGen++;
    stopFeed();
    setConn('auth', 'API key needed');
    $('key-reason').textContent = status === 403
      ? 'This API key lacks the read scope: enter a key with read (or admin).'
      : apiKey
        ? 'The server refused this API key (unknown or revoked): enter another with the read scope.'
        : 'This server needs an API key with the read scope.';
    $('key-form').hidden = false;
    $('key-input').focus();
  }

  // ---- /metrics ----

  function parseMetrics(text) {
    const m = new Map();
    for (const line of text.split('\n')) {
      if (!line || line[0] === '#') continue;
      const sp = line.lastIndexOf(' ');
      if (sp < 0) continue;
      const v = Number(line.slice(sp + 1));
      if (!Number.isNaN(v)) m.set(line.slice(0, sp), v);
    }
    return m;
  }

  async function pollOnce() {
    let res;
    try {
      res = await fetch('/metrics', { headers: withKey(), cache: 'no-store' });
    } catch (_) {
      setLog(null, 'server unreachable');
      return;
    }
    if (res.status === 401 || res.status === 403) {
      needKey(res.status);
      return;
    }
    if (!res.ok) {
      setLog(null, '/metrics answered ' + res.status);
      return;
    }
    const m = parseMetrics(await res.text());
    lastMetrics = m;
    sample(m);
    renderMetrics(m);
  }

  async function pollLoop(gen) {
    await pollOnce();
    if (gen === metricsGen && !blocked) setTimeout(() => pollLoop(gen), POLL_MS);
  }

  function sample(m) {
    const g = (k) => m.get(k) || 0;
    const s = {
      t: performance.now() / 1000,
      holds: g('stockd_reservations_created_total'),
      confirms: g('stockd_reservations_ended_total{outcome="confirmed"}'),
      conflicts: g('stockd_http_responses_total{code="409"}'),
      expiries: g('stockd_reservations_ended_total{outcome="expired"}'),
      write: g('stockd_log_write_seconds_total'),
      batches: g('stockd_log_batches_total'),
      records: g('stockd_log_records_total'),
    };
    const prev = raws[raws.length - 1];
    if (prev && s.t > prev.t) {
      const dt = s.t - prev.t;
      const r = (k) => Math.max(0, (s[k] - prev[k]) / dt);
      rates.push({ holds: r('holds'), confirms: r('confirms'), conflicts: r('conflicts'), expiries: r('expiries') });
      if (rates.length > HISTORY) rates.shift();
    }
    raws.push(s);
    if (raws.length > 6) raws.shift();
  }

  function fmtRate(x) {
    if (x === undefined || x === null) return '–';
    return x < 10 ? x.toFixed(1) : String(Math.round(x));
  }

  function setValue(id, value, text) {
    const el = $(id);
    el.dataset.value = value === null ? '' : String(value);
    el.textContent = text;
  }

  function setLog(healthy, text) {
    const el = $('log-health');
    el.dataset.value = healthy === null ? '' : healthy ? '1' : '0';
    el.textContent = text;
  }

  function renderMetrics(m) {
    const pending = m.get('stockd_reservations_pending');
    setValue('pending-holds', pending === undefined ? null : pending, pending === undefined ? '–' : String(pending));
    // The tiles show the last 10 s (five samples); the chart each 2 s step.
    const last = rates.slice(-5);
    const avg = (k) => (last.length ? last.reduce((a, r) => a + r[k], 0) / last.length : undefined);
    for (const [id, k] of [['rate-holds', 'holds'], ['rate-confirms', 'confirms'], ['rate-conflicts', 'conflicts'], ['rate-expiries', 'expiries']]) {
      const v = avg(k);
      setValue(id, v === undefined ? null : v, fmtRate(v));
    }
    const healthy = m.get('stockd_log_healthy');
    setLog(healthy === undefined ? null : healthy === 1, healthy === 1 ? 'log healthy' : healthy === 0 ? 'log FAILED: changes refused' : 'log …');
    // Commit time: the mean of the group commits of the last 10 s, or since start.
    const first = raws[0];
    const now = raws[raws.length - 1];
    let commit = null;
    let since = 'mean of the last 10 s';
    if (first && now.batches > first.batches) {
      commit = ((now.write - first.write) / (now.batches - first.batches)) * 1000;
    } else if (now.batches > 0) {
      commit = (now.write / now.batches) * 1000;
      since = 'mean since start';
    }
    setValue('commit-ms', commit, commit === null ? '–' : (commit < 1 ? commit.toFixed(2) : commit.toFixed(1)) + ' ms');
    const parts = [];
    if (commit !== null) parts.push('commit time: ' + since);
    parts.push('durable record ' + (m.get('stockd_log_durable_sequence') || 0));
    if (now.batches > 0) parts.push((now.records / now.batches).toFixed(1) + ' records per commit');
    parts.push((m.get('stockd_products') || 0) + ' products');
    const readers = m.get('stockd_events_sse_clients');
    if (readers !== undefined) parts.push('live feed readers: ' + readers);
    $('log-detail').textContent = parts.join(' · ');
    renderChart();
  }

  const SVG = $('rates-chart').namespaceURI; // the SVG namespace, from the page itself
  function svgEl(name, attrs, text) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function niceCeil(x) {
    if (x <= 1) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    for (const f of [1, 2, 5, 10]) if (f * p >= x) return f * p;
    return 10 * p;
  }

  function renderChart() {
    const svg = $('rates-chart');
    const w = Math.max(200, Math.round(svg.clientWidth || 600));
    const h = 180;
    svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
    svg.replaceChildren();
    const left = 40;
    const right = 8;
    const top = 8;
    const bottom = 22;
    const series = ['holds', 'confirms', 'conflicts', 'expiries'];
    let max = 0;
    for (const r of rates) for (const k of series) max = Math.max(max, r[k]);
    const ymax = niceCeil(max);
    const y = (v) => top + (h - top - bottom) * (1 - v / ymax);
    const x = (i) => left + ((w - left - right) * i) / (HISTORY - 1);
    for (const v of [0, ymax / 2, ymax]) {
      svg.append(svgEl('line', { class: 'grid', x1: left, x2: w - right, y1: y(v), y2: y(v) }));
      const label = ymax >= 2 ? String(v) : v.toFixed(1);
      svg.append(svgEl('text', { class: 'axis', x: left - 6, y: y(v) + 4, 'text-anchor': 'end' }, label));
    }
    svg.append(svgEl('text', { class: 'axis', x: left, y: h - 4 }, '−5 min'));
    svg.append(svgEl('text', { class: 'axis', x: w - right, y: h - 4, 'text-anchor': 'end' }, 'now'));
    const offset = HISTORY - rates.length;
    for (const k of series) {
      if (rates.length < 2) break;
      const points = rates.map((r, i) => `${x(offset + i).toFixed(1)},${y(r[k]).toFixed(1)}`).join(' ');
      svg.append(svgEl('polyline', { class: 's-' + k, points }));
    }
  }

  // ---- the change feed ----

  function stopFeed() {
    feedGen++;
    if (feedController) feedController.abort();
    feedController = null;
  }

  function startFeed() {
    stopFeed();
    runFeed(feedGen);
  }

  // Where a fresh stream starts: the last SEED_RECORDS records the feed holds.
  function seedAfter() {
    const m = lastMetrics;
    const through = m && m.get('stockd_events_through_seq');
    if (through === undefined || through === null) return 0;
    const oldest = m.get('stockd_events_oldest_seq') || 0;
    return Math.max(0, through - SEED_RECORDS, oldest - 1);
  }

  function wait(ms) {
    return new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      reconnectNow = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }

  async function backoff(gen) {
    if (gen !== feedGen) return;
    setConn('reconnecting', 'reconnecting…');
    await wait(retryMs);
    retryMs = Math.min(RETRY_MAX_MS, retryMs * 2);
  }

  function feedOff() {
    feedIsOff = true;
    setConn('off', 'feed off');
    const n = $('feed-notice');
    n.textContent = 'The change feed is off on this server (GET /v1/events answers 404 events_disabled): ' +
      'start it with --events on (or STOCKD_EVENTS=on) to see the hottest products and the latest events. ' +
      'The figures, the chart and the log\u2019s health come from /metrics and stay live.';
    n.hidden = false;
    $('hot-empty').textContent = 'Needs the change feed (off on this server).';
  }

  async function runFeed(gen) {
    while (gen === feedGen && !blocked) {
      const controller = new AbortController();
      feedController = controller;
      const headers = withKey({ Accept: 'text/event-stream' });
      let url = '/v1/events';
      // After a drop, resume right after the last event seen: no gap, no duplicate.
      if (lastEventId !== null) headers['Last-Event-ID'] = lastEventId;
      else url += '?after=' + seedAfter();
      let res;
      try {
        res = await fetch(url, { headers, signal: controller.signal, cache: 'no-store' });
      } catch (_) {
        await backoff(gen);
        continue;
      }
      if (gen !== feedGen) return;
      if (res.status === 401 || res.status === 403) {
        needKey(res.status);
        return;
      }
      if (!res.ok) {
        const p = await problemOf(res);
        if (p.code === 'events_disabled') {
          feedOff();
          return;
        }
        // Events no longer kept (retention passed them): start again from what is kept.
        if (p.code === 'events_gone') lastEventId = null;
        await backoff(gen);
        continue;
      }
      if (feedIsOff) {
        feedIsOff = false;
        $('feed-notice').hidden = true;
        $('hot-empty').textContent = 'No product events yet.';
      }
      connections++;
      $('conn').dataset.connections = String(connections);
      setConn('live', 'live');
      retryMs = 1000;
      try {
        await readStream(res.body, controller, gen);
      } catch (_) {
        // dropped: reconnect below
      }
      if (gen !== feedGen) return;
      await backoff(gen);
    }
  }

  // A Server-Sent Events parser, by the WHATWG rules: lines end in CRLF, LF or CR (a CRLF
  // may be cut between two chunks); a blank line dispatches the event (if it has data);
  // `:` starts a comment; one space after the field's colon is dropped; the last `id`
  // stays for the events after it. Returns a function that takes the stream's text chunk
  // by chunk and calls onEvent(id, type, data) and onRetry(ms).
  function sseParser(onEvent, onRetry, initialId) {
    let buf = '';
    let data = [];
    let type = '';
    let id = initialId;
    return (text) => {
      buf += text;
      let start = 0;
      for (;;) {
        let i = start;
        while (i < buf.length && buf[i] !== '\n' && buf[i] !== '\r') i++;
        if (i >= buf.length) break;
        if (buf[i] === '\r' && i + 1 >= buf.length) break; // CR, maybe of a CRLF cut in two
        const line = buf.slice(start, i);
        start = i + (buf[i] === '\r' && buf[i + 1] === '\n' ? 2 : 1);
        if (line === '') {
          if (data.length) onEvent(id, type, data.join('\n'));
          data = [];
          type = '';
          continue;
        }
        if (line[0] === ':') continue; // a comment: the heartbeat
        const c = line.indexOf(':');
        const field = c < 0 ? line : line.slice(0, c);
        let val = c < 0 ? '' : line.slice(c + 1);
        if (val[0] === ' ') val = val.slice(1);
        if (field === 'data') data.push(val);
        else if (field === 'event') type = val;
        else if (field === 'id' && !val.includes('\0')) id = val;
        else if (field === 'retry' && /^[0-9]+$/.test(val)) onRetry(Number(val));
      }
      buf = buf.slice(start);
    };
  }

  // Reads one stream until it ends, drops or goes silent for STALL_MS.
  async function readStream(body, controller, gen) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    const parse = sseParser(dispatch, (ms) => { retryMs = ms; }, lastEventId);
    let dog = setTimeout(() => controller.abort(), STALL_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || gen !== feedGen) return;
        clearTimeout(dog);
        dog = setTimeout(() => controller.abort(), STALL_MS);
        parse(value);
      }
    } finally {
      clearTimeout(dog);
    }
  }

  function dispatch(id, type, data) {
    let ev;
    try {
      ev = JSON.parse(data);
    } catch (_) {
      return;
    }
    lastEventId = id;
    seen++;
    const skus = [];
    const figures = (ev.data && Array.isArray(ev.data.products)) ? ev.data.products : [];
    for (const p of figures) {
      products.set(p.sku, { on_hand: p.on_hand, reserved: p.reserved, available: p.available, sold: p.sold });
      skus.push(p.sku);
    }
    if ((ev.type || type) === 'product.deleted') products.delete(ev.subject);
    recent.push(skus);
    if (recent.length > RECENT_EVENTS) recent.shift();
    latest.unshift(ev);
    if (latest.length > LATEST_SHOWN) latest.pop();
    scheduleRender();
  }

  let renderPending = false;
  function scheduleRender() {
    if (renderPending) return;
    renderPending = true;
    // A timer, not requestAnimationFrame: a hidden tab still keeps its figures current.
    setTimeout(() => {
      renderPending = false;
      renderFeed();
    }, 50);
  }

  function el(name, cls, text) {
    const e = document.createElement(name);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function renderFeed() {
    // Hottest: the most events among the last RECENT_EVENTS, the most recent first on a tie.
    const score = new Map();
    recent.forEach((skus, i) => {
      for (const sku of skus) {
        const s = score.get(sku) || { n: 0, last: 0 };
        s.n++;
        s.last = i;
        score.set(sku, s);
      }
    });
    const hot = [...score.entries()]
      .filter(([sku]) => products.has(sku))
      .sort((a, b) => b[1].n - a[1].n || b[1].last - a[1].last)
      .slice(0, HOT_SHOWN);
    const list = $('hot-products');
    list.replaceChildren(...hot.map(([sku, s]) => {
      const p = products.get(sku);
      const li = el('li');
      li.dataset.sku = sku;
      li.dataset.onHand = p.on_hand;
      li.dataset.reserved = p.reserved;
      li.dataset.available = p.available;
      li.dataset.sold = p.sold;
      li.dataset.events = s.n;
      const head = el('div', 'row-head');
      head.append(el('span', 'sku', sku));
      const nums = el('span', 'nums');
      for (const [k, label] of [['on_hand', 'on hand'], ['reserved', 'reserved'], ['available', 'available'], ['sold', 'sold']]) {
        if (nums.childNodes.length) nums.append(' · ');
        const b = el('b', 'v-' + k.replace('_', '-'), String(p[k]));
        nums.append(b, ' ' + label);
      }
      head.append(nums);
      // Each bar is the product's whole stock (on hand and sold): how much is left shows
      // at a glance, whatever its size.
      const scale = Math.max(1, p.on_hand + p.sold);
      const bar = el('div', 'bar');
      bar.title = `${p.available} available, ${p.reserved} reserved, ${p.sold} sold`;
      for (const k of ['available', 'reserved', 'sold']) {
        const seg = el('span', k);
        seg.style.width = ((100 * p[k]) / scale).toFixed(2) + '%';
        bar.append(seg);
      }
      li.append(head, bar);
      return li;
    }));
    $('hot-empty').hidden = hot.length > 0;

    const events = $('events-list');
    events.dataset.seen = String(seen);
    events.replaceChildren(...latest.map((ev) => {
      const li = el('li');
      li.dataset.id = ev.id;
      li.dataset.type = ev.type;
      const t = ev.time ? new Date(ev.time) : null;
      li.append(
        el('time', '', t && !Number.isNaN(t.getTime()) ? t.toLocaleTimeString() : ''),
        el('span', 'type t-' + String(ev.type).split('.').pop(), ev.type),
        el('span', 'subject', ev.subject || ''),
      );
      const figs = (ev.data && Array.isArray(ev.data.products)) ? ev.data.products : [];
      if (figs.length) {
        li.append(el('span', 'figs', figs.map((p) => `${p.sku}: ${p.available} available, ${p.reserved} reserved, ${p.sold} sold`).join('; ')));
      }
      return li;
    }));
  }

  // ---- start ----

  function start() {
    blocked = false;
    $('key-form').hidden = true;
    $('forget-key').hidden = !apiKey;
    setConn('connecting', 'connecting…');
    const gen = ++metricsGen;
    // The first scrape tells whether a key is needed and where the feed starts.
    pollOnce().then(() => {
      if (gen !== metricsGen || blocked) return;
      setTimeout(() => pollLoop(gen), POLL_MS);
      startFeed();
    });
  }

  function init() {
    $('key-form').addEventListener('submit', (e) => {
      e.preventDefault();
      apiKey = $('key-input').value.trim();
      $('key-input').value = '';
      if (!apiKey) return;
      sessionStorage.setItem(KEY_STORE, apiKey);
      start();
    });
    $('forget-key').addEventListener('click', () => {
      sessionStorage.removeItem(KEY_STORE);
      apiKey = '';
      start();
    });
    // Reconnect the feed now (after a drop, or to check the connection).
    $('conn').addEventListener('click', () => {
      if (blocked || feedIsOff) return;
      if (reconnectNow) reconnectNow();
      if (feedController) feedController.abort();
    });
    window.addEventListener('resize', renderChart);
    renderChart();
    start();
  }

  // The parser, for a test to feed streams cut in awkward places (tests/dashboard.rs).
  window.stockd = Object.freeze({ sseParser });

  init();
})();
