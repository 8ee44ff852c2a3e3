// The dashboard (SPEC §5): renders the snapshot the page carries, then follows
// /api/events (server-sent events: `snapshot`, `status`, `tick`, `calls`). Plain DOM, no
// framework, no build step; every text goes in through textContent.
'use strict';

(() => {
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const CALLS_SHOWN = 200;
  const STALE_AFTER_MS = 3000;
  const WINDOWS = ['10s', '1m', '5m'];

  const state = {
    window: '10s',
    frame: null,
    calls: [], // newest last
    held: [], // arrived while paused
    lastSeq: 0,
    paused: false,
    filter: '',
    sort: { key: 'service', dir: 1 },
    selected: null,
    detailBusy: false,
    lastEvent: 0,
    source: null,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.setAttribute('class', v);
      else if (k === 'text') node.textContent = v;
      else node.setAttribute(k, v === true ? 'true' : String(v));
    }
  }

  // Set or remove attributes of an element that is kept across updates.
  function update(node, attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) node.removeAttribute(k);
      else node.setAttribute(k, v === true ? 'true' : String(v));
    }
  }

  // Put `content` (text or an element) in `node`, keeping `node` itself.
  function fill(node, content) {
    if (content instanceof Node) node.replaceChildren(content);
    else if (node.textContent !== String(content)) node.textContent = String(content);
  }

  // Put `children` in `parent` in this order, moving only when the order changed.
  function arrange(parent, children) {
    const same = parent.children.length === children.length
      && children.every((c, i) => parent.children[i] === c);
    if (!same) parent.replaceChildren(...children);
  }

  // === formatting ===

  function fmtDuration(s) {
    if (s === null || s === undefined) return '–';
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function fmtRps(x) {
    if (!x) return '0';
    if (x >= 100) return x.toFixed(0);
    if (x >= 10) return x.toFixed(1);
    return x.toFixed(2);
  }

  function fmtPct(sr) {
    if (sr === null || sr === undefined) return '–';
    if (sr >= 1) return '100%';
    return `${(Math.floor(sr * 1000) / 10).toFixed(1)}%`;
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return '–';
    if (ms < 1) return `${Math.round(ms * 1000)} µs`;
    if (ms < 10) return `${ms.toFixed(2)} ms`;
    if (ms < 1000) return `${ms.toFixed(0)} ms`;
    return `${(ms / 1000).toFixed(2)} s`;
  }

  function fmtTime(ms) {
    const d = new Date(ms);
    const p = (n, w = 2) => String(n).padStart(w, '0');
    return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
  }

  // Success-rate thresholds: ≥ 99.5 % green, ≥ 95 % amber, below red; no traffic grey.
  function srClass(sr) {
    if (sr === null || sr === undefined) return 'idle';
    if (sr >= 0.995) return 'ok';
    if (sr >= 0.95) return 'warn';
    return 'bad';
  }

  function textClass(sr) {
    return { ok: 'ok', warn: 'warnc', bad: 'bad', idle: 'muted' }[srClass(sr)];
  }

  // === header ===

  function renderHeader(frame) {
    const m = frame.mesh;
    $('mesh-name').textContent = m.name;
    document.title = `mesh ${m.name}`;
    $('mesh-version').textContent = `v${m.version}`;
    $('uptime').textContent = fmtDuration(m.uptime_s);
    const summary = $('summary');
    summary.textContent = frame.summary.line;
    summary.dataset.ready = frame.summary.ready;
    summary.dataset.replicas = frame.summary.replicas;
    summary.dataset.restarting = frame.summary.restarting;
    summary.classList.toggle('bad', frame.summary.ready < frame.summary.replicas);
    $('tls-banner').hidden = m.tls !== 'off';
    const warning = $('warning');
    warning.hidden = !m.warning;
    warning.textContent = m.warning ? `warning: ${m.warning}` : '';
    const dropped = $('access-log-dropped');
    dropped.hidden = !m.access_log_dropped;
    dropped.textContent = m.access_log_dropped
      ? `${m.access_log_dropped} access-log lines dropped (the writer fell behind)`
      : '';
    $('graph-window').textContent = `last ${frame.window}`;
  }

  // === services table ===

  function sortValue(row, key) {
    switch (key) {
      case 'ready': return row.replicas ? row.ready / row.replicas : -1;
      case 'ports': return row.ports.length ? row.ports[0] : -1;
      case 'service': return row.service;
      default: {
        const v = row[key];
        return v === null || v === undefined ? -Infinity : v;
      }
    }
  }

  const SERVICE_COLS = ['service', 'ready', 'restarts', 'uptime', 'exit_code', 'ports', 'ingress',
    'rps', 'success_rate', 'p50_ms', 'p99_ms', 'series'];
  const serviceRows = new Map();

  function renderServices(rows) {
    const { key, dir } = state.sort;
    const sorted = rows.slice().sort((a, b) => {
      const x = sortValue(a, key);
      const y = sortValue(b, key);
      if (x < y) return -dir;
      if (x > y) return dir;
      return a.service < b.service ? -1 : 1;
    });
    for (const th of document.querySelectorAll('#services th[data-sort]')) {
      if (th.dataset.sort === key) th.setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
      else th.removeAttribute('aria-sort');
    }
    // Rows are kept from one update to the next (keyed by service), so that a click
    // never lands on a row that a tick has just replaced.
    const trs = sorted.map((r) => {
      let tr = serviceRows.get(r.service);
      if (!tr) {
        tr = el('tr', { 'data-service': r.service }, ...SERVICE_COLS.map((col) => el('td', { 'data-col': col })));
        tr.addEventListener('click', (e) => {
          if (e.target.closest('a')) return;
          select(r.service);
        });
        serviceRows.set(r.service, tr);
      }
      update(tr, {
        'data-state': r.state,
        'data-restarts': r.restarts,
        'data-rps': r.rps,
        class: state.selected === r.service ? 'selected' : null,
      });
      const ingress = r.ingress
        ? (r.ingress.startsWith('http') ? el('a', { href: r.ingress, target: '_blank', rel: 'noopener' }, r.ingress) : el('span', { class: 'mono' }, r.ingress))
        : '–';
      const cell = (col, content, cls) => {
        const td = tr.cells[SERVICE_COLS.indexOf(col)];
        fill(td, content);
        update(td, { class: cls || null });
      };
      cell('service', el('span', {}, el('span', { class: `state-dot ${r.state}`, title: r.state }), r.service));
      cell('ready', `${r.ready}/${r.replicas}`);
      cell('restarts', r.restarts, r.restarts > 0 ? 'warnc' : null);
      cell('uptime', fmtDuration(r.uptime_s));
      cell('exit_code', r.exit_code === null ? '–' : r.exit_code, r.exit_code ? 'bad' : null);
      cell('ports', r.ports.length ? r.ports.join(', ') : '–');
      cell('ingress', ingress);
      cell('rps', fmtRps(r.rps), 'num');
      cell('success_rate', fmtPct(r.success_rate), `num ${textClass(r.success_rate)}`);
      cell('p50_ms', fmtMs(r.p50_ms), 'num');
      cell('p99_ms', fmtMs(r.p99_ms), 'num');
      cell('series', sparkline(r.series));
      return tr;
    });
    const shown = new Set(rows.map((r) => r.service));
    for (const name of [...serviceRows.keys()]) {
      if (!shown.has(name)) serviceRows.delete(name);
    }
    arrange($('services-body'), trs);
  }

  function sparkline(series) {
    const w = 120;
    const h = 22;
    const s = svg('svg', { class: 'spark', viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: 'none' });
    s.append(svg('line', { x1: 0, y1: h - 1, x2: w, y2: h - 1 }));
    if (!series || series.length < 2) return s;
    const max = Math.max(...series, 0.001);
    const step = w / (series.length - 1);
    const points = series.map((v, i) => `${(i * step).toFixed(1)},${(h - 2 - (v / max) * (h - 4)).toFixed(1)}`);
    s.append(svg('polyline', { points: points.join(' ') }));
    return s;
  }

  // === call graph ===

  const COL_W = 320;
  const ROW_H = 96;
  const NODE_W = 150;
  const NODE_H = 46;
  const PAD = 36;

  let graphLayers = null;
  const edgeEls = new Map();
  const nodeEls = new Map();

  function renderGraph(graph) {
    const root = $('graph');
    const layers = new Map();
    for (const n of graph.nodes) {
      if (!layers.has(n.layer)) layers.set(n.layer, []);
      layers.get(n.layer).push(n);
    }
    const layerIds = [...layers.keys()].sort((a, b) => a - b);
    const maxRows = Math.max(1, ...[...layers.values()].map((l) => l.length));
    // Columns are consecutive even when a layer is empty.
    const column = new Map(layerIds.map((l, i) => [l, i]));
    const pos = new Map();
    for (const [layer, nodes] of layers) {
      nodes.sort((a, b) => a.order - b.order);
      const top = PAD + ((maxRows - nodes.length) * ROW_H) / 2;
      nodes.forEach((n, i) => {
        pos.set(n.id, { x: PAD + column.get(layer) * COL_W, y: top + i * ROW_H, node: n });
      });
    }
    const width = PAD * 2 + Math.max(0, layerIds.length - 1) * COL_W + NODE_W;
    const height = PAD * 2 + (maxRows - 1) * ROW_H + NODE_H + 50;
    root.setAttribute('viewBox', `0 0 ${width} ${height}`);
    root.setAttribute('width', width);
    root.setAttribute('height', height);

    if (!graphLayers) {
      const defs = svg('defs', {});
      for (const cls of ['ok', 'warn', 'bad', 'idle']) {
        defs.append(svg('marker', {
          id: `arrow-${cls}`, viewBox: '0 0 10 10', refX: 9, refY: 5,
          markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse',
        }, svg('path', { d: 'M0,0 L10,5 L0,10 z', class: `arrow-${cls}` })));
      }
      graphLayers = { edges: svg('g', { id: 'graph-edges' }), nodes: svg('g', { id: 'graph-nodes' }) };
      root.replaceChildren(defs, graphLayers.edges, graphLayers.nodes);
    }
    const edgeGs = [];
    const nodeGs = [];

    for (const e of graph.edges) {
      const a = pos.get(e.caller);
      const b = pos.get(e.service);
      if (!a || !b) continue;
      const cls = e.idle ? 'idle' : srClass(e.success_rate);
      let p0; let p1; let p2; let p3;
      if (b.x > a.x) {
        p0 = [a.x + NODE_W, a.y + NODE_H / 2];
        p3 = [b.x - 2, b.y + NODE_H / 2];
        const dx = (p3[0] - p0[0]) / 2;
        p1 = [p0[0] + dx, p0[1]];
        p2 = [p3[0] - dx, p3[1]];
      } else {
        // Same column or leftwards: an arc under the two nodes.
        p0 = [a.x + NODE_W / 2 + 10, a.y + NODE_H];
        p3 = [b.x + NODE_W / 2 - 10, b.y + NODE_H + 2];
        const dip = Math.max(p0[1], p3[1]) + 48;
        p1 = [p0[0], dip];
        p2 = [p3[0], dip];
      }
      const d = `M${p0[0]},${p0[1]} C${p1[0]},${p1[1]} ${p2[0]},${p2[1]} ${p3[0]},${p3[1]}`;
      const mid = [0, 1].map((k) => (p0[k] + 3 * p1[k] + 3 * p2[k] + p3[k]) / 8);
      const label = e.idle ? 'idle' : `${fmtRps(e.rps)} rps · ${fmtPct(e.success_rate)}`;
      // How the calls travel, under the figures: mutual TLS has its padlock on the edge.
      const via = { 'in-process': '⇄ in-process', plain: 'plain (tls off)' }[e.via] || null;
      const key = `${e.caller}\u0000${e.service}`;
      let g = edgeEls.get(key);
      if (!g) {
        g = svg('g', {});
        edgeEls.set(key, g);
      }
      update(g, {
        class: `edge ${cls}`,
        'data-caller': e.caller,
        'data-service': e.service,
        'data-rps': e.rps,
        'data-success': e.success_rate === null ? '' : e.success_rate,
        'data-via': e.via || '',
        'data-idle': e.idle,
        'data-declared': e.declared,
        'data-refused': e.refused,
        'data-refused-count': e.refused_count,
      });
      // An edge is not clicked: its drawing is simply made anew.
      g.replaceChildren();
      g.append(svg('title', { text: edgeTitle(e) }));
      g.append(svg('path', { d, 'marker-end': `url(#arrow-${cls})` }));
      g.append(svg('text', { x: mid[0], y: mid[1] - 6, 'text-anchor': 'middle', class: 'label' }, label));
      if (e.via === 'mtls') {
        // The padlock sits on the edge, a fifth of the way from the caller.
        const at = [0, 1].map((k) => bezier(p0[k], p1[k], p2[k], p3[k], 0.2));
        g.append(padlock(at[0], at[1]));
      }
      let below = mid[1] + 9;
      if (via && !e.idle) {
        g.append(svg('text', { x: mid[0], y: below, 'text-anchor': 'middle', class: 'via' }, via));
        below += 13;
      }
      if (e.refused) {
        g.append(svg('text', {
          x: mid[0], y: below, 'text-anchor': 'middle', class: 'refused', 'data-refused-mark': true,
        }, `✕ ${e.refused_count} refused`));
      }
      edgeGs.push(g);
    }

    // Nodes are kept from one update to the next (keyed by id), so that a click never
    // lands on a node that a tick has just replaced.
    for (const { x, y, node } of pos.values()) {
      const entry = node.kind !== 'service';
      let g = nodeEls.get(node.id);
      if (!g) {
        g = svg('g', { 'data-node': node.id },
          svg('rect', { width: NODE_W, height: NODE_H, rx: 8, ry: 8 }),
          svg('text', { x: 12, y: 19 }, node.id),
          svg('text', { x: 12, y: 36, class: 'sub' }));
        if (!entry) g.addEventListener('click', () => select(node.id));
        nodeEls.set(node.id, g);
      }
      update(g, {
        class: `node ${entry ? 'entry' : node.state}${state.selected === node.id ? ' selected' : ''}`,
        'data-kind': node.kind,
        'data-state': node.state,
        transform: `translate(${x},${y})`,
      });
      const sub = entry
        ? (node.kind === 'ingress' ? 'exposed traffic' : 'test ingresses')
        : `${node.ready}/${node.replicas} ready · ${node.protocol}`;
      fill(g.querySelector('text.sub'), sub);
      nodeGs.push(g);
    }
    forget(edgeEls, new Set(edgeGs));
    forget(nodeEls, new Set(nodeGs));
    arrange(graphLayers.edges, edgeGs);
    arrange(graphLayers.nodes, nodeGs);
  }

  // Drop the kept elements that are not shown any more.
  function forget(kept, shown) {
    for (const [key, node] of [...kept]) {
      if (!shown.has(node)) kept.delete(key);
    }
  }

  function bezier(a, b, c, d, t) {
    const u = 1 - t;
    return u * u * u * a + 3 * u * u * t * b + 3 * u * t * t * c + t * t * t * d;
  }

  // A padlock 12 px wide centred on (x, y): mutual TLS.
  function padlock(x, y) {
    return svg('g', { class: 'lock', 'data-lock': true, transform: `translate(${x - 6},${y - 8})` },
      svg('title', { text: 'mutual TLS' }),
      svg('path', { d: 'M3,7 V4.5 a3,3 0 0 1 6,0 V7', class: 'shackle' }),
      svg('rect', { x: 1, y: 7, width: 10, height: 8, rx: 1.5 }));
  }

  function edgeTitle(e) {
    const lines = [`${e.caller} → ${e.service}`];
    if (e.idle) lines.push('declared, no calls in the window');
    else {
      lines.push(`${e.requests} requests, ${fmtRps(e.rps)} rps, success ${fmtPct(e.success_rate)}, p99 ${fmtMs(e.p99_ms)}`);
      if (e.via) lines.push(`via ${e.via}`);
    }
    for (const [kind, n] of Object.entries(e.errors || {})) lines.push(`${kind}: ${n}`);
    return lines.join('\n');
  }

  // === live calls ===

  function addCalls(list) {
    const fresh = (list || []).filter((c) => c.seq > state.lastSeq);
    if (!fresh.length) return;
    state.lastSeq = fresh[fresh.length - 1].seq;
    if (state.paused) {
      state.held.push(...fresh);
      if (state.held.length > CALLS_SHOWN) state.held.splice(0, state.held.length - CALLS_SHOWN);
      $('calls-held').textContent = `${state.held.length} new held`;
      return;
    }
    state.calls.push(...fresh);
    if (state.calls.length > CALLS_SHOWN) state.calls.splice(0, state.calls.length - CALLS_SHOWN);
    renderCalls();
  }

  function callText(c) {
    return [c.caller, c.service, c.replica || '', c.method, c.path, String(c.status), c.error || '', c.trace_id, c.route].join(' ').toLowerCase();
  }

  function renderCalls() {
    const filter = state.filter.trim().toLowerCase();
    const shown = state.calls.filter((c) => !filter || callText(c).includes(filter)).reverse();
    const trs = shown.map((c) => {
      const failed = c.error || c.status >= 500;
      const status = c.error ? `${c.status} ${c.error}` : String(c.status);
      return el('tr', {
        'data-seq': c.seq,
        'data-trace': c.trace_id,
        'data-caller': c.caller,
        'data-service': c.service,
        'data-status': c.status,
        'data-error': c.error || '',
      },
      el('td', { class: 'mono' }, fmtTime(c.ts_ms)),
      el('td', {}, `${c.caller} → ${c.service}${c.replica ? ` (${c.replica})` : ''}`),
      el('td', {}, c.method),
      el('td', { class: 'mono' }, c.path),
      el('td', { class: failed ? 'bad' : (c.status >= 400 ? 'warnc' : 'ok') }, status),
      el('td', { class: 'num' }, fmtMs(c.duration_us / 1000)),
      el('td', { class: 'num' }, c.attempts),
      el('td', { class: 'trace' }, c.trace_id));
    });
    $('calls-body').replaceChildren(...trs);
  }

  function setPaused(paused) {
    state.paused = paused;
    const button = $('calls-pause');
    button.setAttribute('aria-pressed', paused ? 'true' : 'false');
    button.textContent = paused ? 'resume' : 'pause';
    if (!paused) {
      const held = state.held;
      state.held = [];
      $('calls-held').textContent = '';
      state.calls.push(...held);
      if (state.calls.length > CALLS_SHOWN) state.calls.splice(0, state.calls.length - CALLS_SHOWN);
      renderCalls();
    }
  }

  // === a service's details ===

  function select(name) {
    state.selected = name;
    $('detail').hidden = false;
    $('detail-name').textContent = name;
    $('detail').dataset.service = name;
    if (state.frame) {
      renderServices(state.frame.services);
      renderGraph(state.frame.graph);
    }
    refreshDetail();
  }

  function unselect() {
    state.selected = null;
    $('detail').hidden = true;
    delete $('detail').dataset.service;
    if (state.frame) {
      renderServices(state.frame.services);
      renderGraph(state.frame.graph);
    }
  }

  async function refreshDetail() {
    const name = state.selected;
    if (!name || state.detailBusy) return;
    state.detailBusy = true;
    try {
      const url = `/api/service?name=${encodeURIComponent(name)}&window=${state.window}`;
      const response = await fetch(url, { cache: 'no-store' });
      if (response.ok && state.selected === name) renderDetail(await response.json());
    } catch (_) {
      // The stream's indicator says when the mesh is gone.
    } finally {
      state.detailBusy = false;
    }
  }

  function renderDetail(d) {
    $('detail-name').textContent = d.upstreams.length ? `${d.service} · calls ${d.upstreams.join(', ')}` : d.service;
    const head = el('tr', {}, ...['replica', 'state', 'health', 'pid', 'restarts', 'exit', 'port', 'uptime', 'note'].map((h) => el('th', {}, h)));
    const rows = d.replicas.map((r) => el('tr', { 'data-replica': r.replica, 'data-state': r.state },
      el('td', {}, `${r.service}.${r.replica}`),
      el('td', {}, r.state),
      el('td', { class: r.health === 'ready' ? 'ok' : (r.health === 'unready' ? 'bad' : 'muted') }, r.health),
      el('td', {}, r.pid ?? '–'),
      el('td', {}, r.restarts),
      el('td', {}, r.exit_code ?? '–'),
      el('td', {}, r.port ?? '–'),
      el('td', {}, fmtDuration(r.uptime_s)),
      el('td', { class: 'bad' }, r.reason || r.last_rollout || '')));
    $('detail-replicas').replaceChildren(el('thead', {}, head), el('tbody', {}, ...rows));

    const endpoints = $('detail-endpoints');
    if (d.endpoints === null || d.endpoints === undefined) {
      endpoints.replaceChildren(el('span', { class: 'muted' }, 'not reported by the sidecars yet'));
    } else if (!d.endpoints.length) {
      endpoints.replaceChildren(el('span', { class: 'muted' }, 'no caller has a balancer towards it'));
    } else {
      endpoints.replaceChildren(...d.endpoints.map((b) => el('div', { 'data-balancer': `${b.caller}→${b.service}` },
        el('span', { class: 'muted' }, `${b.caller} → ${b.service}: `),
        ...b.endpoints.map((ep) => el('span', { class: `pill ${ep.state}`, 'data-endpoint': ep.id, 'data-state': ep.state, title: `${ep.in_flight} in flight` }, `${ep.id} ${ep.state}`)))));
    }

    const errors = Object.entries(d.errors || {});
    $('detail-errors').replaceChildren(errors.length
      ? el('div', {}, ...errors.map(([k, n]) => el('div', { 'data-error': k }, el('span', { class: 'bad' }, k), `: ${n}`)))
      : el('span', { class: 'muted' }, `no mesh errors in the last ${d.window}`));

    const routes = $('detail-routes');
    if (!d.routes.length) {
      routes.replaceChildren(el('span', { class: 'muted' }, 'no routes'));
    } else {
      routes.replaceChildren(...d.routes.map((r) => {
        const match = [r.path_prefix ? `path ${r.path_prefix}` : null, ...r.headers.map(([k, v]) => `${k}: ${v}`)].filter(Boolean).join(', ') || 'everything';
        return el('div', { 'data-route': r.route },
          el('div', {}, `route ${r.route} (${match}) · ${r.calls} recent calls`),
          ...r.backends.map((b) => el('div', { class: 'small', 'data-backend': b.service },
            el('span', { class: 'mono' }, `${b.service} `),
            el('span', { class: 'bar', title: `configured ${fmtPct(b.configured)}`, 'data-configured': b.configured }),
            ` configured ${fmtPct(b.configured)} · observed ${b.observed === null ? '–' : fmtPct(b.observed)} `,
            el('span', { class: 'bar observed', 'data-observed': b.observed ?? '' }))));
      }));
      // Bar widths through the CSSOM (the page's CSP allows no inline style attribute).
      for (const bar of routes.querySelectorAll('.bar')) {
        const share = Number(bar.dataset.configured ?? bar.dataset.observed ?? 0) || 0;
        bar.style.width = `${Math.round(share * 80)}px`;
      }
    }

    const logs = $('detail-logs');
    const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
    logs.textContent = d.logs.length
      ? d.logs.map((l) => `${l.ts.slice(11, 23)} ${d.service}.${l.replica} ${l.stream === 'stderr' ? '! ' : '| '}${l.line}`).join('\n')
      : 'no lines';
    if (atBottom) logs.scrollTop = logs.scrollHeight;
  }

  // === the stream ===

  function applyFrame(frame) {
    state.frame = frame;
    renderHeader(frame);
    renderServices(frame.services);
    renderGraph(frame.graph);
  }

  function onSnapshot(snapshot) {
    applyFrame(snapshot);
    state.calls = [];
    state.held = [];
    state.lastSeq = 0;
    addCalls(snapshot.calls);
    renderCalls();
  }

  function heard() {
    state.lastEvent = Date.now();
    updateLive();
  }

  function updateLive() {
    const live = $('live');
    const fresh = state.lastEvent && Date.now() - state.lastEvent <= STALE_AFTER_MS;
    const s = fresh ? 'live' : (state.lastEvent ? 'stale' : 'connecting');
    if (live.dataset.state !== s) {
      live.dataset.state = s;
      $('live-text').textContent = s;
    }
  }

  function connect() {
    if (state.source) state.source.close();
    const source = new EventSource(`/api/events?window=${state.window}`);
    state.source = source;
    const on = (name, f) => source.addEventListener(name, (ev) => {
      if (state.source !== source) return;
      heard();
      f(JSON.parse(ev.data));
    });
    on('snapshot', onSnapshot);
    on('status', applyFrame);
    on('tick', (frame) => {
      applyFrame(frame);
      refreshDetail();
    });
    on('calls', (c) => addCalls(c.calls));
    source.addEventListener('error', () => {
      // EventSource retries by itself unless the answer was not a stream (503 when too
      // many pages are open): then try again a little later.
      if (source.readyState === EventSource.CLOSED && state.source === source) {
        setTimeout(() => { if (state.source === source) connect(); }, 2000);
      }
    });
  }

  function setWindow(w) {
    if (!WINDOWS.includes(w)) return;
    state.window = w;
    for (const b of document.querySelectorAll('#window-picker button')) {
      b.setAttribute('aria-pressed', b.dataset.window === w ? 'true' : 'false');
    }
    try { localStorage.setItem('mesh-window', w); } catch (_) { /* private mode */ }
  }

  function start() {
    let saved = null;
    try { saved = localStorage.getItem('mesh-window'); } catch (_) { /* private mode */ }
    setWindow(WINDOWS.includes(saved) ? saved : '10s');
    for (const b of document.querySelectorAll('#window-picker button')) {
      b.addEventListener('click', () => {
        if (b.dataset.window === state.window) return;
        setWindow(b.dataset.window);
        connect();
        refreshDetail();
      });
    }
    for (const th of document.querySelectorAll('#services th[data-sort]')) {
      th.addEventListener('click', () => {
        const key = th.dataset.sort;
        state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
        if (state.frame) renderServices(state.frame.services);
      });
    }
    $('calls-pause').addEventListener('click', () => setPaused(!state.paused));
    $('calls-filter').addEventListener('input', (e) => {
      state.filter = e.target.value;
      renderCalls();
    });
    $('detail-close').addEventListener('click', unselect);

    // The snapshot the page came with (for the default window) shows the mesh at once.
    try {
      const first = JSON.parse($('snapshot').textContent);
      if (first) onSnapshot(first);
    } catch (_) { /* the stream's snapshot follows */ }
    setInterval(updateLive, 500);
    connect();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
