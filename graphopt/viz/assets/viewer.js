/* graphopt graph viewer: layered layout of a module-grouped fx graph, SVG rendering.
 *
 * Data comes from the JSON script element with id "graph-data" (see graphopt/viz/data.py).
 * Every string from the model is put on the page with textContent / setAttribute, never as HTML.
 */
(function () {
  'use strict';
  var SVGNS = 'http://www.w3.org/2000/svg';
  var DATA = JSON.parse(document.getElementById('graph-data').textContent);

  var NODE_H = 36, GROUP_H = 44, PAD = 12, HEADER = 24, GAP_X = 18, GAP_Y = 34, CHAR_W = 6.3;
  var AUTO_EXPAND_LIMIT = 48;
  var METRICS = {
    time: {label: 'share of predicted time', field: 'predicted_s', kind: 'share'},
    measured: {label: 'share of measured time', field: 'measured_s', kind: 'share'},
    bytes: {label: 'share of bytes moved', field: 'bytes', kind: 'share'},
    flops: {label: 'share of FLOPs', field: 'flops', kind: 'share'},
    intensity: {label: 'arithmetic intensity (FLOP/byte)', field: 'intensity', kind: 'log'},
    precision: {label: 'precision', field: 'prec', kind: 'category'}
  };
  var HEAT = ['#f4f1f8', '#fde9c9', '#fdcc8a', '#fc8d59', '#e34a33', '#b30000'];
  var COOL_HOT = ['#2c7bb6', '#abd9e9', '#ffffbf', '#fdae61', '#d7191c'];
  var CATEGORY = {float32: '#cfe3ff', float64: '#b3c7f7', bfloat16: '#ffd8a8', float16: '#ffe8a3', int8: '#ffb3c1',
    fp8: '#e599f7', int4: '#f783ac', int64: '#d3f9d8', int32: '#c3fae8', bool: '#e9ecef', mixed: '#dee2e6'};
  var MARKS = {attention: ['ATT', '#7048e8'], ffn: ['FFN', '#0b7285'], hot: ['HOT', '#d9480f'], rw: ['RW', '#2b8a3e']};

  var state = {view: 'after', metric: 'time', showWeights: false, expanded: {}, selected: null, matches: {}, t: {x: 20, y: 20, k: 1}};
  var M = null;            // model of the current view
  var layoutRoot = null;   // last layout
  var abs = {};            // item key -> absolute box
  var els = {};

  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) if (attrs[k] !== undefined && attrs[k] !== null) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    if (attrs) for (var k in attrs) if (attrs[k] !== undefined && attrs[k] !== null) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function clip(s, n) { s = String(s); return s.length > n ? s.slice(0, n - 1) + '\u2026' : s; }
  function fmtNum(v) {
    if (v === undefined || v === null) return '';
    var a = Math.abs(v), units = [[1e15, 'P'], [1e12, 'T'], [1e9, 'G'], [1e6, 'M'], [1e3, 'k']];
    for (var i = 0; i < units.length; i++) if (a >= units[i][0]) return (v / units[i][0]).toFixed(2) + ' ' + units[i][1];
    return (Math.round(v * 100) / 100).toString() + ' ';
  }
  function fmtBytes(v) { return v === undefined ? '' : fmtNum(v) + 'B'; }
  function fmtTime(s) {
    if (s === undefined || s === null) return '';
    if (s >= 1) return s.toFixed(3) + ' s';
    if (s >= 1e-3) return (s * 1e3).toFixed(3) + ' ms';
    return (s * 1e6).toFixed(2) + ' \u00b5s';
  }
  function fmtPct(x) { return (x * 100).toFixed(x >= 0.1 ? 1 : 2) + '%'; }
  function shapeText(shape, dtype) {
    if (!shape) return '';
    if (shape.length && Array.isArray(shape[0])) return shape.map(function (s) { return '[' + s.join('\u00d7') + ']'; }).join(' ');
    return '[' + shape.join('\u00d7') + ']' + (dtype && typeof dtype === 'string' ? ' ' + dtype : '');
  }
  function shortOp(op) { return String(op).replace(/^aten\./, ''); }

  /* ---------- model of one view ---------- */
  function buildModel(view) {
    var m = {view: view, nodes: view.nodes, groups: [], byName: {}, byKey: {}, sitesOf: {}};
    view.groups.forEach(function (g) {
      m.groups.push({id: g.id, parent: g.parent, path: g.path, key: g.key, src: g.src, cls: g.cls, label: g.label, kind: g.kind,
        children: [], nodes: [], depth: 0, chain: null, first: Infinity, all: []});
    });
    m.groups.forEach(function (g) {
      if (g.parent !== null) { m.groups[g.parent].children.push(g.id); g.depth = m.groups[g.parent].depth + 1; }
      m.byKey[g.key] = g.id;
    });
    m.groups.forEach(function (g) { g.chain = g.parent === null ? [g.id] : m.groups[g.parent].chain.concat([g.id]); });
    view.nodes.forEach(function (n) {
      n.users = [];
      m.byName[n.name] = n.id;
      m.groups[n.g].nodes.push(n.id);
    });
    view.nodes.forEach(function (n) { n['in'].forEach(function (i) { view.nodes[i].users.push(n.id); }); });
    view.nodes.forEach(function (n) {
      var ch = m.groups[n.g].chain;
      for (var i = 0; i < ch.length; i++) {
        var g = m.groups[ch[i]];
        g.all.push(n.id);
        if (n.kind !== 'get_attr' && n.id < g.first) g.first = n.id;
      }
      var mod = n.g;
      while (m.groups[mod].kind === 'line') mod = m.groups[mod].parent;
      n.module = m.groups[mod].path;
    });
    // parameters sit at the top of an fx graph: order them (and groups of only parameters) by their first user
    view.nodes.forEach(function (n) { n.order = n.kind === 'get_attr' && n.users.length ? Math.min.apply(null, n.users) - 0.5 : n.id; });
    for (var gi = m.groups.length - 1; gi >= 0; gi--) {
      var gg = m.groups[gi];
      if (gg.first === Infinity) gg.all.forEach(function (id) { if (view.nodes[id].order < gg.first) gg.first = view.nodes[id].order; });
    }
    (view.sites || []).forEach(function (s, i) {
      s.nodes.forEach(function (id) { (m.sitesOf[id] = m.sitesOf[id] || []).push(i); });
    });
    m.totals = computeTotals(m);
    return m;
  }
  function nodeValue(n, field) {
    if (field === 'prec') return n.prec;
    var c = n.cost;
    if (!c) return undefined;
    if (field === 'bytes') return (c.bytes_read || 0) + (c.bytes_written || 0);
    return c[field];
  }
  function computeTotals(m) {
    var t = {};
    ['predicted_s', 'measured_s', 'bytes', 'flops'].forEach(function (f) {
      var s = 0;
      m.nodes.forEach(function (n) { var v = nodeValue(n, f); if (typeof v === 'number') s += v; });
      t[f] = s;
    });
    return t;
  }
  function groupValue(g, field) {
    var key = '_v_' + field;
    if (g[key] !== undefined) return g[key];
    var v;
    if (field === 'intensity') {
      var f = 0, b = 0;
      g.all.forEach(function (id) { var n = M.nodes[id]; if (n.cost) { f += n.cost.flops || 0; b += (n.cost.bytes_read || 0) + (n.cost.bytes_written || 0); } });
      v = b > 0 ? f / b : undefined;
    } else if (field === 'prec') {
      var seen = {};
      g.all.forEach(function (id) { var n = M.nodes[id]; if (n.prec && n.kind === 'call_function') seen[n.prec] = 1; });
      var ks = Object.keys(seen).filter(function (k) { return k !== 'int64' && k !== 'bool'; });
      v = ks.length === 1 ? ks[0] : ks.length ? 'mixed' : undefined;
    } else {
      var s = 0, any = false;
      g.all.forEach(function (id) { var x = nodeValue(M.nodes[id], field); if (typeof x === 'number') { s += x; any = true; } });
      v = any ? s : undefined;
    }
    g[key] = v;
    return v;
  }
  function itemValue(item) {
    var field = METRICS[state.metric].field;
    return item.type === 'node' ? nodeValue(M.nodes[item.id], field) : groupValue(M.groups[item.id], field);
  }
  function share(v) {
    var total = M.totals[METRICS[state.metric].field];
    return total > 0 && typeof v === 'number' ? v / total : undefined;
  }

  /* ---------- visibility ---------- */
  function nodeVisible(n) { return state.showWeights || (n.kind !== 'get_attr' && !n.aux); }
  function isExpanded(gid) { return gid === 0 || !!state.expanded[M.groups[gid].key]; }
  function visibleCount(g) {
    if (g._vis === undefined) {
      var c = 0;
      g.all.forEach(function (id) { if (nodeVisible(M.nodes[id])) c++; });
      g._vis = c;
    }
    return g._vis;
  }
  function resetVisCache() { M.groups.forEach(function (g) { g._vis = undefined; }); }
  /* the visible item standing for node n: itself, or its outermost collapsed group */
  function repOf(n) {
    var ch = M.groups[n.g].chain;
    for (var i = 1; i < ch.length; i++) if (!isExpanded(ch[i])) return 'g' + ch[i];
    return 'n' + n.id;
  }
  function containerChain(key) {
    if (key[0] === 'n') return M.groups[M.nodes[+key.slice(1)].g].chain;
    var g = M.groups[+key.slice(1)];
    return M.groups[g.parent].chain;
  }
  function childAt(key, gid, depth) {
    if (key[0] === 'n') { var n = M.nodes[+key.slice(1)]; if (n.g === gid) return key; }
    else { var g = M.groups[+key.slice(1)]; if (g.parent === gid) return key; }
    var ch = key[0] === 'n' ? M.groups[M.nodes[+key.slice(1)].g].chain : M.groups[+key.slice(1)].chain;
    return 'g' + ch[depth + 1];
  }
  function visibleEdges() {
    var seen = {}, edges = [], perGroup = {};
    M.nodes.forEach(function (n) {
      if (!nodeVisible(n)) return;
      var b = repOf(n);
      n['in'].forEach(function (i) {
        var p = M.nodes[i];
        if (!nodeVisible(p)) return;
        var a = repOf(p);
        if (a === b) return;
        var k = a + '>' + b;
        if (seen[k]) return;
        seen[k] = 1;
        edges.push([a, b]);
        var ca = containerChain(a), cb = containerChain(b), d = 0;
        while (d + 1 < ca.length && d + 1 < cb.length && ca[d + 1] === cb[d + 1]) d++;
        var lca = ca[d];
        var ia = childAt(a, lca, d), ib = childAt(b, lca, d);
        if (ia !== ib) (perGroup[lca] = perGroup[lca] || []).push([ia, ib]);
      });
    });
    return {edges: edges, perGroup: perGroup};
  }

  /* ---------- layout ---------- */
  function textWidth(s) { return s.length * CHAR_W; }
  function nodeLabel(n) { return n.kind === 'call_function' ? shortOp(n.op) : n.kind === 'get_attr' ? n.name : n.kind === 'placeholder' ? 'input: ' + n.name : n.op; }
  function nodeSub(n) { return n.kind === 'call_function' ? clip(n.name, 26) + ' ' + clip(shapeText(n.shape), 24) : clip(shapeText(n.shape, n.dtype), 36); }
  function groupLabel(g) { return g.kind === 'line' ? g.label : g.label + ' \u00b7 ' + g.cls; }
  function groupSub(g) {
    var s = visibleCount(g) + ' ops', v = share(groupValue(g, METRICS[state.metric].field));
    if (visibleCount(g) === 1) {
      var only = g.all.filter(function (id) { return nodeVisible(M.nodes[id]); })[0];
      s = clip(shortOp(M.nodes[only].op) + ' ' + shapeText(M.nodes[only].shape), 34);
    }
    if (METRICS[state.metric].kind === 'share' && v !== undefined) s += ' \u00b7 ' + fmtPct(v);
    return s;
  }
  function itemSize(key) {
    if (key[0] === 'n') {
      var n = M.nodes[+key.slice(1)];
      var w = Math.max(textWidth(clip(nodeLabel(n), 34)), textWidth(nodeSub(n))) + 20;
      return {w: Math.min(Math.max(w, 80), 260), h: NODE_H};
    }
    var g = M.groups[+key.slice(1)];
    var gw = Math.max(textWidth(clip(groupLabel(g), 44)), textWidth(groupSub(g))) + 44;
    return {w: Math.min(Math.max(gw, 110), 320), h: GROUP_H};
  }
  function itemOrder(key) { return key[0] === 'n' ? +key.slice(1) : M.groups[+key.slice(1)].first; }

  function layoutGroup(gid, perGroup) {
    var g = M.groups[gid], items = [];
    g.children.forEach(function (cid) {
      var c = M.groups[cid];
      if (!visibleCount(c)) return;
      var key = 'g' + cid;
      if (isExpanded(cid)) {
        var sub = layoutGroup(cid, perGroup);
        items.push({key: key, w: sub.w, h: sub.h, sub: sub, order: c.first});
      } else {
        var s = itemSize(key);
        items.push({key: key, w: s.w, h: s.h, order: c.first});
      }
    });
    g.nodes.forEach(function (id) {
      if (!nodeVisible(M.nodes[id])) return;
      var key = 'n' + id, s = itemSize(key);
      items.push({key: key, w: s.w, h: s.h, order: M.nodes[id].order});
    });
    var box = layered(items, perGroup[gid] || []);
    var top = gid === 0 ? 0 : HEADER, pad = gid === 0 ? 0 : PAD;
    items.forEach(function (it) { it.x += pad; it.y += top; });
    var title = gid === 0 ? 0 : textWidth(groupLabel(g)) + 40;
    return {gid: gid, items: items, w: Math.max(box.w + 2 * pad, title), h: box.h + top + pad};
  }

  function layered(items, edges) {
    if (!items.length) return {w: 0, h: 0};
    items.sort(function (a, b) { return a.order - b.order; });
    var idx = {};
    items.forEach(function (it, i) { idx[it.key] = i; it.preds = []; it.succs = []; it.layer = 0; });
    edges.forEach(function (e) {
      var a = idx[e[0]], b = idx[e[1]];
      if (a === undefined || b === undefined || a === b) return;
      if (a < b) { items[b].preds.push(a); items[a].succs.push(b); }  // back edges (a group both feeds and follows) are ignored
    });
    items.forEach(function (it) { it.preds.forEach(function (p) { if (items[p].layer + 1 > it.layer) it.layer = items[p].layer + 1; }); });
    // sources (inputs, constants) sit just above their first consumer
    for (var si = items.length - 1; si >= 0; si--) {
      var src = items[si];
      if (src.preds.length || !src.succs.length) continue;
      var lo = Infinity;
      src.succs.forEach(function (j) { if (items[j].layer < lo) lo = items[j].layer; });
      src.layer = Math.max(0, lo - 1);
    }
    var layers = [];
    items.forEach(function (it, i) { (layers[it.layer] = layers[it.layer] || []).push(i); });
    layers = layers.filter(function (l) { return l && l.length; });
    layers.forEach(function (l) { l.forEach(function (i, p) { items[i].pos = p; }); });
    function bary(list, pick) {
      var s = 0; list.forEach(function (j) { s += items[j].pos; });
      return list.length ? s / list.length : pick;
    }
    for (var sweep = 0; sweep < 4; sweep++) {
      var down = sweep % 2 === 0;
      var order = down ? layers.slice(1) : layers.slice(0, -1).reverse();
      order.forEach(function (l) {
        l.forEach(function (i) { items[i].key2 = bary(down ? items[i].preds : items[i].succs, items[i].pos); });
        l.sort(function (a, b) { return items[a].key2 - items[b].key2 || items[a].pos - items[b].pos; });
        l.forEach(function (i, p) { items[i].pos = p; });
      });
    }
    // y
    var y = 0;
    layers.forEach(function (l) {
      var h = 0;
      l.forEach(function (i) { items[i].y = y; if (items[i].h > h) h = items[i].h; });
      l.forEach(function (i) { items[i].y = y + (h - items[i].h) / 2; });
      y += h + GAP_Y;
    });
    // x: pack, then pull each item toward its neighbours' centres, keeping order and gaps
    layers.forEach(function (l) {
      var x = 0;
      l.forEach(function (i) { items[i].x = x; x += items[i].w + GAP_X; });
      var shift = -(x - GAP_X) / 2;
      l.forEach(function (i) { items[i].x += shift; });
    });
    function place(l, neigh) {
      var want = l.map(function (i) {
        var it = items[i], ns = neigh(it);
        if (!ns.length) return it.x;
        var s = 0; ns.forEach(function (j) { s += items[j].x + items[j].w / 2; });
        return s / ns.length - it.w / 2;
      });
      for (var a = 0; a < l.length; a++) {
        var lo = a ? items[l[a - 1]].x + items[l[a - 1]].w + GAP_X : -Infinity;
        items[l[a]].x = Math.max(want[a], lo);
      }
      for (var b = l.length - 2; b >= 0; b--) {
        var hi = items[l[b + 1]].x - GAP_X - items[l[b]].w;
        if (items[l[b]].x > hi) items[l[b]].x = hi;
      }
      for (var c = 1; c < l.length; c++) {
        var lo2 = items[l[c - 1]].x + items[l[c - 1]].w + GAP_X;
        if (items[l[c]].x < lo2) items[l[c]].x = lo2;
      }
    }
    for (var it2 = 0; it2 < 3; it2++) {
      layers.forEach(function (l, li) { if (li) place(l, function (it) { return it.preds; }); });
      for (var li = layers.length - 2; li >= 0; li--) place(layers[li], function (it) { return it.succs; });
    }
    var minX = Infinity, maxX = -Infinity;
    items.forEach(function (it) { if (it.x < minX) minX = it.x; if (it.x + it.w > maxX) maxX = it.x + it.w; });
    items.forEach(function (it) { it.x -= minX; });
    return {w: maxX - minX, h: y - GAP_Y};
  }

  function autoExpand() {
    state.expanded = {};
    var frontier = M.groups[0].children.slice(), visible = countItems(0);
    while (frontier.length) {
      var add = 0, next = [];
      frontier.forEach(function (gid) {
        var g = M.groups[gid];
        if (!visibleCount(g) || countItems(gid) < 2) return;
        add += countItems(gid) - 1;
        next.push(gid);
      });
      if (!next.length || visible + add > AUTO_EXPAND_LIMIT) break;
      visible += add;
      var deeper = [];
      next.forEach(function (gid) { state.expanded[M.groups[gid].key] = true; deeper = deeper.concat(M.groups[gid].children); });
      frontier = deeper;
    }
  }
  function countItems(gid) {
    var g = M.groups[gid], c = 0;
    g.children.forEach(function (cid) { if (visibleCount(M.groups[cid])) c++; });
    g.nodes.forEach(function (id) { if (nodeVisible(M.nodes[id])) c++; });
    return c;
  }

  /* ---------- colour ---------- */
  function lerpColor(stops, t) {
    t = Math.max(0, Math.min(1, t));
    var p = t * (stops.length - 1), i = Math.min(Math.floor(p), stops.length - 2), f = p - i;
    var a = parseInt(stops[i].slice(1), 16), b = parseInt(stops[i + 1].slice(1), 16);
    var r = Math.round(((a >> 16) & 255) * (1 - f) + ((b >> 16) & 255) * f);
    var g = Math.round(((a >> 8) & 255) * (1 - f) + ((b >> 8) & 255) * f);
    var bl = Math.round((a & 255) * (1 - f) + (b & 255) * f);
    return '#' + ((1 << 24) + (r << 16) + (g << 8) + bl).toString(16).slice(1);
  }
  function isDark(hex) {
    var v = parseInt(hex.slice(1), 16);
    return 0.299 * ((v >> 16) & 255) + 0.587 * ((v >> 8) & 255) + 0.114 * (v & 255) < 150;
  }
  var scale = null;
  function computeScale(keys) {
    var m = METRICS[state.metric], vals = [];
    keys.forEach(function (k) { var v = itemValue(itemOf(k)); if (v !== undefined) vals.push(v); });
    if (m.kind === 'share') {
      var mx = 0; vals.forEach(function (v) { var s = share(v); if (s > mx) mx = s; });
      scale = {kind: 'share', max: mx};
    } else if (m.kind === 'log') {
      var pos = vals.filter(function (v) { return v > 0; });
      var lo = pos.length ? Math.min.apply(null, pos) : 1, hi = pos.length ? Math.max.apply(null, pos) : 1;
      scale = {kind: 'log', lo: lo, hi: hi};
    } else {
      var cats = {}; vals.forEach(function (v) { cats[v] = 1; });
      scale = {kind: 'category', cats: Object.keys(cats).sort()};
    }
  }
  function itemOf(key) { return key[0] === 'n' ? {type: 'node', id: +key.slice(1)} : {type: 'group', id: +key.slice(1)}; }
  function fillOf(key) {
    var v = itemValue(itemOf(key));
    if (v === undefined || v === null) return '#eceef2';
    if (scale.kind === 'share') {
      var s = share(v);
      return scale.max > 0 ? lerpColor(HEAT, Math.sqrt(s / scale.max)) : HEAT[0];
    }
    if (scale.kind === 'log') {
      if (!(v > 0)) return '#eceef2';
      var t = scale.hi > scale.lo ? (Math.log(v) - Math.log(scale.lo)) / (Math.log(scale.hi) - Math.log(scale.lo)) : 0.5;
      return lerpColor(COOL_HOT, t);
    }
    return CATEGORY[v] || '#f1f3f5';
  }
  function renderLegend() {
    var L = $('legend'), m = METRICS[state.metric];
    L.textContent = '';
    var head = el('div', null, m.label + (DATA.cost_source === 'estimate' && state.metric !== 'precision' ? ' (estimate)' : ''));
    head.style.fontWeight = '600';
    L.appendChild(head);
    if (scale.kind === 'share' || scale.kind === 'log') {
      var stops = scale.kind === 'share' ? HEAT : COOL_HOT, bar = el('div', {'class': 'bar'});
      bar.style.background = 'linear-gradient(to right,' + stops.join(',') + ')';
      L.appendChild(bar);
      var ends = el('div', {'class': 'ends'});
      if (scale.kind === 'share') { ends.appendChild(el('span', null, '0%')); ends.appendChild(el('span', null, fmtPct(scale.max) + ' (largest shown)')); }
      else { ends.appendChild(el('span', null, fmtNum(scale.lo) + ' memory-bound')); ends.appendChild(el('span', null, 'compute-bound ' + fmtNum(scale.hi))); }
      L.appendChild(ends);
    } else {
      var row = el('div');
      scale.cats.forEach(function (c) {
        var s = el('span', {'class': 'cat'}), sw = el('span', {'class': 'swatch'});
        sw.style.background = CATEGORY[c] || '#f1f3f5';
        s.appendChild(sw); s.appendChild(document.createTextNode(c)); row.appendChild(s);
      });
      L.appendChild(row);
    }
    var marks = el('div', {'class': 'marks'});
    Object.keys(MARKS).forEach(function (k) {
      var s = el('span', {'class': 'cat'}), sw = el('span', {'class': 'swatch'});
      sw.style.background = MARKS[k][1];
      s.appendChild(sw); s.appendChild(document.createTextNode(MARKS[k][0] + ' ' + {attention: 'attention', ffn: 'FFN chain', hot: 'hot matmul', rw: 'rewritten'}[k]));
      marks.appendChild(s);
    });
    if (DATA.views.before) {
      var a = el('span', {'class': 'cat'}, state.view === 'after' ? 'green outline: added by the optimization' : 'red dashed: removed by the optimization');
      marks.appendChild(a);
    }
    L.appendChild(marks);
  }

  /* ---------- marks ---------- */
  function marksOf(key) {
    var out = {}, ids = key[0] === 'n' ? [+key.slice(1)] : M.groups[+key.slice(1)].all;
    var diff = {added: 0, removed: 0}, seen = {};
    ids.forEach(function (id) {
      var n = M.nodes[id];
      (M.sitesOf[id] || []).forEach(function (si) {
        if (seen[si]) return;
        seen[si] = 1;
        out[M.view.sites[si].kind] = (out[M.view.sites[si].kind] || 0) + 1;
      });
      if (n.rw && n.rw.length) out.rw = (out.rw || 0) + 1;
      if (n.diff && nodeVisible(n)) diff[n.diff]++;
    });
    return {marks: out, diff: diff};
  }

  /* ---------- render ---------- */
  function render() {
    var t0 = performance.now();
    resetVisCache();
    var ve = visibleEdges();
    layoutRoot = layoutGroup(0, ve.perGroup);
    abs = {};
    var keys = [];
    (function walk(lay, ox, oy) {
      lay.items.forEach(function (it) {
        abs[it.key] = {x: ox + it.x, y: oy + it.y, w: it.w, h: it.h, sub: it.sub};
        if (it.sub) walk(it.sub, ox + it.x, oy + it.y); else keys.push(it.key);
      });
    })(layoutRoot, 0, 0);
    computeScale(keys);
    var vp = $('viewport');
    vp.textContent = '';
    var frames = svg('g', {'class': 'frames'}), edgeLayer = svg('g', {'class': 'edges'}), itemLayer = svg('g', {'class': 'items'});
    vp.appendChild(frames); vp.appendChild(edgeLayer); vp.appendChild(itemLayer);
    els = {};
    Object.keys(abs).forEach(function (key) {
      var b = abs[key];
      if (b.sub) frames.appendChild(drawFrame(key, b));
      else itemLayer.appendChild(drawItem(key, b));
    });
    ve.edges.forEach(function (e) {
      var a = abs[e[0]], b = abs[e[1]];
      if (!a || !b) return;
      var x1 = a.x + a.w / 2, y1 = a.y + a.h, x2 = b.x + b.w / 2, y2 = b.y, dy = Math.max(20, Math.abs(y2 - y1) / 2);
      var p = svg('path', {'class': 'edge', d: 'M' + x1 + ',' + y1 + ' C' + x1 + ',' + (y1 + dy) + ' ' + x2 + ',' + (y2 - dy) + ' ' + x2 + ',' + y2,
        'marker-end': 'url(#arrow)', 'data-from': e[0], 'data-to': e[1]});
      edgeLayer.appendChild(p);
    });
    renderLegend();
    applyTransform();
    $('status').textContent = keys.length + ' items \u00b7 ' + ve.edges.length + ' edges \u00b7 layout+draw ' + Math.round(performance.now() - t0) + ' ms';
    highlightSelection();
  }
  function addBadges(g, key, b) {
    var mk = marksOf(key), x = b.w - 2;
    Object.keys(MARKS).forEach(function (k) {
      if (!mk.marks[k]) return;
      var txt = MARKS[k][0];
      var w = txt.length * 6 + 6;
      x -= w;
      var bg = svg('g', {'class': 'badge badge-' + k, transform: 'translate(' + x + ',' + (-7) + ')'});
      bg.appendChild(svg('rect', {width: w, height: 12, fill: MARKS[k][1]}));
      bg.appendChild(svg('text', {x: 3, y: 9}, txt));
      g.appendChild(bg);
      x -= 3;
    });
    if (key[0] === 'g') {
      ['added', 'removed'].forEach(function (k) {
        if (!mk.diff[k]) return;
        var txt = (k === 'added' ? '+' : '\u2212') + mk.diff[k], w = txt.length * 6 + 6;
        x -= w;
        var bg = svg('g', {'class': 'badge badge-' + k, transform: 'translate(' + x + ',' + (-7) + ')'});
        bg.appendChild(svg('rect', {width: w, height: 12, fill: k === 'added' ? '#1a7f37' : '#c62828'}));
        bg.appendChild(svg('text', {x: 3, y: 9}, txt));
        g.appendChild(bg);
        x -= 3;
      });
    }
  }
  function drawItem(key, b) {
    var isNode = key[0] === 'n', fill = fillOf(key);
    var cls = 'item ' + (isNode ? 'node' : 'group collapsed');
    var name;
    if (isNode) {
      var n = M.nodes[+key.slice(1)];
      name = n.name;
      if (n.diff) cls += ' ' + n.diff;
    } else {
      var grpd = M.groups[+key.slice(1)], vis = grpd.all.filter(function (id) { return nodeVisible(M.nodes[id]); });
      name = grpd.path;
      ['added', 'removed'].forEach(function (d) {
        if (vis.length && vis.every(function (id) { return M.nodes[id].diff === d; })) cls += ' ' + d;
      });
    }
    var gkey = isNode ? null : M.groups[+key.slice(1)].key;
    var g = svg('g', {'class': cls, transform: 'translate(' + b.x + ',' + b.y + ')', 'data-key': key, 'data-name': name, 'data-group': gkey});
    var light = isDark(fill) ? ' light' : '';
    if (!isNode) g.appendChild(svg('rect', {'class': 'stack', x: 4, y: 4, width: b.w, height: b.h}));
    g.appendChild(svg('rect', {'class': 'box', width: b.w, height: b.h, fill: fill}));
    if (isNode) {
      var node = M.nodes[+key.slice(1)];
      g.appendChild(svg('text', {x: 8, y: 15, 'class': light}, clip(nodeLabel(node), 34)));
      g.appendChild(svg('text', {x: 8, y: 29, 'class': 'sub' + light}, nodeSub(node)));
    } else {
      var grp = M.groups[+key.slice(1)];
      g.appendChild(svg('text', {x: 28, y: 18, 'class': light}, clip(groupLabel(grp), 44)));
      g.appendChild(svg('text', {x: 28, y: 34, 'class': 'sub' + light}, groupSub(grp)));
      g.appendChild(toggleButton(grp, 6, 13, '+'));
    }
    addBadges(g, key, b);
    var title = svg('title', null, isNode ? M.nodes[+key.slice(1)].name + ' (' + M.nodes[+key.slice(1)].op + ')' : M.groups[+key.slice(1)].path + ' \u2014 double-click to expand');
    g.appendChild(title);
    g.addEventListener('click', function (ev) { ev.stopPropagation(); select(key); });
    if (!isNode) g.addEventListener('dblclick', function (ev) { ev.stopPropagation(); toggleGroup(+key.slice(1)); });
    els[key] = g;
    return g;
  }
  function toggleButton(grp, x, y, sign) {
    var t = svg('g', {'class': 'toggle', transform: 'translate(' + x + ',' + y + ')', 'data-group': grp.key, role: 'button'});
    t.appendChild(svg('rect', {width: 16, height: 16}));
    t.appendChild(svg('text', {x: sign === '+' ? 4 : 5, y: 13}, sign === '+' ? '+' : '\u2212'));
    t.addEventListener('click', function (ev) { ev.stopPropagation(); toggleGroup(grp.id); });
    t.addEventListener('dblclick', function (ev) { ev.stopPropagation(); });
    return t;
  }
  function drawFrame(key, b) {
    var grp = M.groups[+key.slice(1)];
    var g = svg('g', {'class': 'group-frame', transform: 'translate(' + b.x + ',' + b.y + ')', 'data-key': key, 'data-name': grp.path, 'data-group': grp.key});
    g.appendChild(svg('rect', {'class': 'frame', width: b.w, height: b.h}));
    g.appendChild(toggleButton(grp, 4, 4, '-'));
    var label = svg('text', {x: 26, y: 16}, clip(grp.label, 60));
    g.appendChild(label);
    if (grp.kind !== 'line') g.appendChild(svg('text', {'class': 'cls', x: 26 + textWidth(clip(grp.label, 60)) + 8, y: 16}, grp.cls));
    g.addEventListener('click', function (ev) { ev.stopPropagation(); select(key); });
    els[key] = g;
    return g;
  }

  /* ---------- interaction ---------- */
  function expandAll() { M.groups.forEach(function (g) { if (g.id) state.expanded[g.key] = true; }); }
  function toggleGroup(gid) {
    state.allExpanded = false;
    var key = M.groups[gid].key;
    if (state.expanded[key]) {
      // collapse descendants too, so re-expanding opens one level
      M.groups.forEach(function (g) { if (g.chain.indexOf(gid) >= 0) delete state.expanded[g.key]; });
    } else state.expanded[key] = true;
    var before = abs['g' + gid];
    render();
    var after = abs['g' + gid];
    if (before && after) { state.t.x += (before.x - after.x) * state.t.k; state.t.y += (before.y - after.y) * state.t.k; applyTransform(); }
    select('g' + gid);
  }
  function reveal(nodeId) {
    var n = M.nodes[nodeId];
    if (!nodeVisible(n)) { state.showWeights = true; $('show-weights').checked = true; }
    M.groups[n.g].chain.forEach(function (gid) { if (gid) state.expanded[M.groups[gid].key] = true; });
    render();
    select('n' + nodeId);
    centerOn('n' + nodeId);
  }
  function centerOn(key) {
    var b = abs[key];
    if (!b) return;
    var r = $('graph').getBoundingClientRect();
    state.t.k = Math.max(state.t.k, 0.8);
    state.t.x = r.width / 2 - (b.x + b.w / 2) * state.t.k;
    state.t.y = r.height / 2 - (b.y + b.h / 2) * state.t.k;
    applyTransform();
  }
  function fit(whole) {
    var r = $('graph').getBoundingClientRect();
    if (!layoutRoot || !r.width) return;
    var k = Math.min((r.width - 40) / Math.max(layoutRoot.w, 1), (r.height - 40) / Math.max(layoutRoot.h, 1), 1.2);
    if (!whole) k = Math.max(k, Math.min(0.7, (r.width - 40) / Math.max(layoutRoot.w, 1)));  // stay readable; pan for the rest
    k = Math.max(k, 0.02);
    state.t = {k: k, x: Math.max(20, (r.width - layoutRoot.w * k) / 2), y: 20};
    applyTransform();
  }
  function applyTransform() {
    $('viewport').setAttribute('transform', 'translate(' + state.t.x + ',' + state.t.y + ') scale(' + state.t.k + ')');
  }
  function highlightSelection() {
    Object.keys(els).forEach(function (k) {
      var e = els[k];
      e.classList.toggle('selected', k === state.selected);
      e.classList.toggle('match', !!state.matches[k] && k !== state.selected);
    });
    var paths = document.querySelectorAll('#viewport path.edge');
    for (var i = 0; i < paths.length; i++) {
      var p = paths[i];
      p.classList.toggle('hl', p.getAttribute('data-from') === state.selected || p.getAttribute('data-to') === state.selected);
    }
  }
  function select(key) {
    state.selected = key;
    highlightSelection();
    showDetails(key);
  }

  /* ---------- details panel ---------- */
  function row(dl, k, v, mono) {
    if (v === undefined || v === null || v === '') return;
    dl.appendChild(el('dt', null, k));
    var dd = el('dd', mono ? {'class': 'mono'} : null);
    if (v instanceof Node) dd.appendChild(v); else dd.textContent = String(v);
    dl.appendChild(dd);
  }
  function nodeLink(name, view, label) {
    var a = el('a', {'data-node': name}, label || name);
    a.addEventListener('click', function () { goTo(name, view || state.view); });
    return a;
  }
  function goTo(name, view) {
    if (view !== state.view) switchView(view);
    var id = M.byName[name];
    if (id !== undefined) reveal(id);
  }
  function linkList(names, view, limit) {
    var ul = el('ul');
    names.slice(0, limit || 40).forEach(function (nm) { var li = el('li'); li.appendChild(nodeLink(nm, view)); ul.appendChild(li); });
    if (names.length > (limit || 40)) ul.appendChild(el('li', {'class': 'muted'}, '\u2026 and ' + (names.length - (limit || 40)) + ' more'));
    return ul;
  }
  function costRows(dl, c, tot) {
    if (!c) return;
    row(dl, 'FLOPs', c.flops !== undefined ? fmtNum(c.flops) + 'FLOP' : undefined);
    row(dl, 'bytes read', fmtBytes(c.bytes_read));
    row(dl, 'bytes written', fmtBytes(c.bytes_written));
    row(dl, 'intensity', c.intensity !== undefined ? c.intensity.toFixed(2) + ' FLOP/B' : undefined);
    row(dl, 'bound', c.bound);
    if (c.predicted_s !== undefined) row(dl, 'predicted time', fmtTime(c.predicted_s) + (tot.predicted_s ? ' (' + fmtPct(c.predicted_s / tot.predicted_s) + ')' : '') + (DATA.cost_source === 'estimate' ? ' estimate' : ''));
    if (c.measured_s !== undefined) row(dl, 'measured time', fmtTime(c.measured_s) + (tot.measured_s ? ' (' + fmtPct(c.measured_s / tot.measured_s) + ')' : ''));
  }
  function showDetails(key) {
    var D = $('details');
    D.textContent = '';
    if (!key) { showSummary(); return; }
    if (key[0] === 'n') showNode(D, M.nodes[+key.slice(1)]); else showGroup(D, M.groups[+key.slice(1)]);
    var back = el('button', {type: 'button', id: 'show-summary'}, 'summary');
    back.addEventListener('click', function () { state.selected = null; highlightSelection(); showDetails(null); });
    D.appendChild(back);
  }
  function showNode(D, n) {
    D.appendChild(el('h2', {id: 'details-title'}, n.name));
    var dl = el('dl', {id: 'node-fields'});
    row(dl, 'op', n.op, true);
    row(dl, 'kind', n.kind);
    if (n.kind === 'get_attr' || n.target !== n.op) row(dl, 'target', n.target, true);
    var g = M.groups[n.g];
    row(dl, 'module', n.module || '(top level)', true);
    var stack = g.chain.filter(function (x) { return M.groups[x].kind !== 'line'; }).map(function (x) { return M.groups[x].cls; }).join(' \u203a ');
    row(dl, 'module classes', stack);
    row(dl, 'source', n.src, true);
    row(dl, 'shape', shapeText(n.shape));
    row(dl, 'dtype', Array.isArray(n.dtype) ? n.dtype.join(', ') : n.dtype);
    row(dl, 'precision', n.prec);
    costRows(dl, n.cost, M.totals);
    if (n.diff) row(dl, 'before/after', n.diff === 'added' ? 'added by the optimization' : 'removed by the optimization');
    if (n.match) row(dl, state.view === 'after' ? 'was' : 'became', nodeLink(n.match, state.view === 'after' ? 'before' : 'after'));
    else if (DATA.views.before && !n.diff) {
      var other = state.view === 'after' ? 'before' : 'after';
      row(dl, 'in ' + (other === 'before' ? 'captured' : 'optimized') + ' graph', nodeLink(n.name, other));
    }
    D.appendChild(dl);
    var weights = n['in'].map(function (i) { return M.nodes[i]; }).filter(function (p) { return p.kind === 'get_attr'; });
    var inputs = n['in'].map(function (i) { return M.nodes[i]; }).filter(function (p) { return p.kind !== 'get_attr'; });
    if (weights.length) {
      D.appendChild(el('h3', null, 'weights'));
      var wl = el('ul');
      weights.forEach(function (w) { var li = el('li'); li.appendChild(nodeLink(w.name, null, w.target)); li.appendChild(document.createTextNode(' ' + shapeText(w.shape, w.dtype))); wl.appendChild(li); });
      D.appendChild(wl);
    }
    if (inputs.length) { D.appendChild(el('h3', null, 'inputs')); D.appendChild(linkList(inputs.map(function (p) { return p.name; }))); }
    if (n.users.length) { D.appendChild(el('h3', null, 'users')); D.appendChild(linkList(n.users.map(function (u) { return M.nodes[u].name; }))); }
    (M.sitesOf[n.id] || []).forEach(function (si) { showSite(D, M.view.sites[si]); });
    (n.rw || []).forEach(function (ri) { showRewrite(D, DATA.rewrites[ri], n); });
  }
  function showSite(D, s) {
    D.appendChild(el('h3', null, {attention: 'attention site', ffn: 'FFN chain', hot: 'hot matmul'}[s.kind] || s.kind));
    var dl = el('dl', {'class': 'site'});
    row(dl, 'site', s.label);
    Object.keys(s.detail || {}).forEach(function (k) {
      var v = s.detail[k];
      if (v === null || v === '' || (Array.isArray(v) && !v.length)) return;
      row(dl, k, Array.isArray(v) ? v.join(', ') : typeof v === 'number' ? String(Math.round(v * 1e6) / 1e6) : v);
    });
    row(dl, 'nodes', String(s.nodes.length));
    D.appendChild(dl);
  }
  function numericsNode(num) {
    if (!num) return el('span', {'class': 'muted'}, 'not checked');
    var s = el('span', {'class': num.ok ? 'ok' : 'bad'}, (num.ok ? 'ok ' : 'FAILED ') + num.summary + (num.inputs_checked ? ' (' + num.inputs_checked + ' input sets)' : ''));
    return s;
  }
  function showRewrite(D, r, n) {
    D.appendChild(el('h3', {'class': 'rewrite'}, 'rewrite: ' + r['pass']));
    var dl = el('dl');
    row(dl, 'status', r.status);
    row(dl, 'numerics', numericsNode(r.numerics));
    row(dl, 'notes', r.notes.join('; '));
    D.appendChild(dl);
    r.sites.forEach(function (site) {
      if (n && site.after.indexOf(n.name) < 0 && site.before.indexOf(n.name) < 0) return;
      var sd = el('dl');
      row(sd, 'site', site.module || '(top level)', true);
      D.appendChild(sd);
      if (site.before.length) { D.appendChild(el('div', {'class': 'muted'}, 'before (' + site.before.length + ')')); D.appendChild(linkList(site.before, 'before', 20)); }
      if (site.after.length) { D.appendChild(el('div', {'class': 'muted'}, 'after (' + site.after.length + ')')); D.appendChild(linkList(site.after, 'after', 20)); }
    });
  }
  function showGroup(D, g) {
    D.appendChild(el('h2', {id: 'details-title'}, g.kind === 'line' ? g.label : (g.path || '(model)')));
    var dl = el('dl', {id: 'group-fields'});
    row(dl, g.kind === 'line' ? 'source' : 'class', g.kind === 'line' ? g.src : g.cls, g.kind === 'line');
    row(dl, 'module', g.kind === 'line' ? M.groups[g.parent].path || '(top level)' : g.path, true);
    row(dl, 'nodes', String(g.all.length));
    var c = {};
    ['flops', 'predicted_s', 'measured_s'].forEach(function (f) { var v = groupValue(g, f); if (v !== undefined) c[f] = v; });
    var br = 0, bw = 0, anyb = false;
    g.all.forEach(function (id) { var x = M.nodes[id].cost; if (x) { anyb = true; br += x.bytes_read || 0; bw += x.bytes_written || 0; } });
    if (anyb) { c.bytes_read = br; c.bytes_written = bw; }
    var ai = groupValue(g, 'intensity'); if (ai !== undefined) c.intensity = ai;
    row(dl, 'precision', groupValue(g, 'prec'));
    costRows(dl, c, M.totals);
    var mk = marksOf('g' + g.id);
    Object.keys(mk.marks).forEach(function (k) { row(dl, {attention: 'attention sites', ffn: 'FFN chains', hot: 'hot matmuls', rw: 'rewritten nodes'}[k], String(mk.marks[k])); });
    if (mk.diff.added) row(dl, 'added', String(mk.diff.added));
    if (mk.diff.removed) row(dl, 'removed', String(mk.diff.removed));
    D.appendChild(dl);
    if (g.id !== 0) {
      var b = el('button', {type: 'button', id: 'toggle-group'}, isExpanded(g.id) ? 'collapse' : 'expand');
      b.addEventListener('click', function () { toggleGroup(g.id); });
      D.appendChild(b);
    }
    // heaviest nodes inside
    var f = METRICS[state.metric].kind === 'share' ? METRICS[state.metric].field : 'predicted_s';
    var top = g.all.filter(function (id) { return typeof nodeValue(M.nodes[id], f) === 'number'; })
      .sort(function (a, b2) { return nodeValue(M.nodes[b2], f) - nodeValue(M.nodes[a], f); }).slice(0, 8);
    if (top.length) {
      D.appendChild(el('h3', null, 'heaviest nodes'));
      var ul = el('ul');
      top.forEach(function (id) {
        var li = el('li'), n = M.nodes[id], s = share(nodeValue(n, f));
        li.appendChild(nodeLink(n.name));
        li.appendChild(document.createTextNode(' ' + shortOp(n.op) + (s !== undefined ? ' ' + fmtPct(s) : '')));
        ul.appendChild(li);
      });
      D.appendChild(ul);
    }
  }
  function showSummary() {
    var D = $('details'), S = DATA.summary || {};
    D.textContent = '';
    D.appendChild(el('h2', {id: 'details-title'}, DATA.title));
    var dl = el('dl', {id: 'summary-fields'});
    row(dl, 'view', state.view === 'after' ? (DATA.views.before ? 'optimized graph' : 'graph') : 'captured graph (before)');
    row(dl, 'nodes', String(M.nodes.length));
    row(dl, 'capture', S.capture_route);
    if (S.nodes_before !== undefined) row(dl, 'optimization', S.nodes_before + ' \u2192 ' + S.nodes_after + ' nodes in ' + (S.total_seconds || 0).toFixed(2) + ' s');
    if (S.final_numerics) row(dl, 'final check', el('span', {'class': S.final_ok ? 'ok' : 'bad'}, (S.final_ok ? 'ok ' : 'FAILED ') + S.final_numerics));
    row(dl, 'costs', DATA.cost_source === 'estimate' ? 'rough estimate (graphopt.analyze did not run)' :
      'graphopt.cost' + (DATA.cost_target ? ', roofline of ' + DATA.cost_target : '') + (DATA.profiled ? ', measured per node' : ''));
    if (M.totals.predicted_s) row(dl, 'predicted time', fmtTime(M.totals.predicted_s));
    if (M.totals.flops) row(dl, 'FLOPs', fmtNum(M.totals.flops) + 'FLOP');
    if (M.totals.bytes) row(dl, 'bytes moved', fmtBytes(M.totals.bytes));
    D.appendChild(dl);
    if (DATA.rewrites.length) {
      D.appendChild(el('h3', null, 'passes'));
      var ul = el('ul', {id: 'pass-list'});
      DATA.rewrites.forEach(function (r) {
        var li = el('li');
        li.appendChild(el('strong', null, r['pass']));
        li.appendChild(document.createTextNode(' ' + r.status + (r.nodes_before !== r.nodes_after ? ' (' + r.nodes_before + '\u2192' + r.nodes_after + ')' : '')));
        if (r.numerics) { li.appendChild(document.createTextNode(' ')); li.appendChild(numericsNode(r.numerics)); }
        if (r.notes.length) li.appendChild(el('div', {'class': 'muted'}, r.notes.slice(0, 4).join('; ')));
        if (r.error) li.appendChild(el('div', {'class': 'bad'}, r.error));
        if (r.declined_total) li.appendChild(el('div', {'class': 'muted'}, r.declined_total + ' declined: ' + r.declined.slice(0, 3).map(function (d) { return d.site + ': ' + d.reason; }).join('; ')));
        ul.appendChild(li);
      });
      D.appendChild(ul);
    }
    var sites = M.view.sites || [];
    if (sites.length) {
      D.appendChild(el('h3', null, 'sites'));
      var sl = el('ul');
      sites.slice(0, 60).forEach(function (s) {
        var li = el('li'), a = el('a', null, s.label);
        a.addEventListener('click', function () { if (s.nodes.length) reveal(s.nodes[0]); });
        li.appendChild(a); sl.appendChild(li);
      });
      D.appendChild(sl);
    }
    if (DATA.views.before) {
      var diffNames = M.nodes.filter(function (n) { return n.diff; }).map(function (n) { return n.name; });
      D.appendChild(el('h3', null, (state.view === 'after' ? 'added' : 'removed') + ' nodes (' + diffNames.length + ')'));
      D.appendChild(linkList(diffNames, state.view, 40));
    }
  }

  /* ---------- search ---------- */
  function search(q) {
    q = q.trim().toLowerCase();
    var out = [];
    if (!q) return out;
    M.nodes.forEach(function (n) {
      if (out.length >= 200) return;
      if (n.name.toLowerCase().indexOf(q) >= 0 || String(n.op).toLowerCase().indexOf(q) >= 0 ||
          String(n.target).toLowerCase().indexOf(q) >= 0 || (n.module || '').toLowerCase().indexOf(q) >= 0) out.push(n);
    });
    return out;
  }
  var searchTimer = null;
  function onSearch() {
    var q = $('search').value, res = search(q), ul = $('search-results');
    ul.textContent = '';
    state.matches = {};
    res.forEach(function (n) { state.matches[repOf(n)] = 1; });
    highlightSelection();
    if (!q.trim()) { ul.hidden = true; return; }
    ul.hidden = false;
    if (!res.length) { ul.appendChild(el('li', {'class': 'muted'}, 'no node matches')); return; }
    res.slice(0, 50).forEach(function (n, i) {
      var li = el('li', {'data-node': n.name, 'class': i === 0 ? 'active' : null});
      li.appendChild(el('span', {'class': 'sr-name'}, n.name));
      li.appendChild(el('span', {'class': 'sr-op'}, shortOp(n.op)));
      li.appendChild(el('span', {'class': 'sr-mod'}, n.module));
      li.addEventListener('mousedown', function (ev) { ev.preventDefault(); ul.hidden = true; reveal(n.id); });
      ul.appendChild(li);
    });
    if (res.length > 50) ul.appendChild(el('li', {'class': 'muted'}, res.length + ' matches; refine the search'));
  }

  /* ---------- pan & zoom ---------- */
  function setupPanZoom() {
    var S = $('graph'), drag = null;
    S.addEventListener('mousedown', function (ev) {
      if (ev.button !== 0) return;
      drag = {x: ev.clientX, y: ev.clientY, tx: state.t.x, ty: state.t.y, moved: false};
      S.classList.add('panning');
    });
    window.addEventListener('mousemove', function (ev) {
      if (!drag) return;
      var dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      state.t.x = drag.tx + dx; state.t.y = drag.ty + dy;
      applyTransform();
    });
    window.addEventListener('mouseup', function () { drag = null; S.classList.remove('panning'); });
    S.addEventListener('click', function () { if (!drag || !drag.moved) { state.selected = null; highlightSelection(); showDetails(null); } });
    S.addEventListener('wheel', function (ev) {
      ev.preventDefault();
      var r = S.getBoundingClientRect(), px = ev.clientX - r.left, py = ev.clientY - r.top;
      var f = Math.exp(-ev.deltaY * (ev.deltaMode === 1 ? 0.05 : 0.0015));
      var k = Math.max(0.02, Math.min(4, state.t.k * f));
      state.t.x = px - (px - state.t.x) * (k / state.t.k);
      state.t.y = py - (py - state.t.y) * (k / state.t.k);
      state.t.k = k;
      applyTransform();
    }, {passive: false});
  }

  /* ---------- views ---------- */
  function switchView(name) {
    if (!DATA.views[name] || name === state.view) return;
    var sel = state.selected, selName = null;
    if (sel && sel[0] === 'n') { var n = M.nodes[+sel.slice(1)]; selName = n.match || n.name; }
    state.view = name;
    $('view-select').value = name;
    M = buildModel(DATA.views[name]);
    if (state.allExpanded) expandAll();
    state.selected = null;
    render();
    if (selName && M.byName[selName] !== undefined) select('n' + M.byName[selName]); else showDetails(null);
  }

  function init() {
    $('title').textContent = DATA.title;
    document.title = 'graphopt: ' + DATA.title;
    var vs = $('view-select');
    if (DATA.views.before) {
      vs.hidden = false;
      vs.appendChild(el('option', {value: 'after'}, 'optimized (after)'));
      vs.appendChild(el('option', {value: 'before'}, 'captured (before)'));
      vs.addEventListener('change', function () { switchView(vs.value); });
    }
    M = buildModel(DATA.views.after);
    var ms = $('metric-select'), hasMeasured = M.totals.measured_s > 0;
    Object.keys(METRICS).forEach(function (k) {
      if (k === 'measured' && !hasMeasured) return;
      ms.appendChild(el('option', {value: k}, k === 'time' ? 'predicted time' : k === 'measured' ? 'measured time' : k));
    });
    state.metric = hasMeasured ? 'measured' : 'time';
    ms.value = state.metric;
    ms.addEventListener('change', function () { state.metric = ms.value; render(); showDetails(state.selected); });
    $('show-weights').addEventListener('change', function (ev) { state.showWeights = ev.target.checked; render(); });
    $('expand-all').addEventListener('click', function () { state.allExpanded = true; expandAll(); render(); fit(); });
    $('collapse-all').addEventListener('click', function () { state.allExpanded = false; state.expanded = {}; render(); fit(); });
    $('fit').addEventListener('click', function () { fit(true); });
    var si = $('search');
    si.addEventListener('input', function () { clearTimeout(searchTimer); searchTimer = setTimeout(onSearch, 80); });
    si.addEventListener('keydown', function (ev) {
      if (ev.key === 'Enter') { clearTimeout(searchTimer); onSearch(); var first = search(si.value)[0]; if (first) { $('search-results').hidden = true; reveal(first.id); } }
      if (ev.key === 'Escape') { si.value = ''; onSearch(); }
    });
    si.addEventListener('blur', function () { setTimeout(function () { $('search-results').hidden = true; }, 150); });
    document.addEventListener('keydown', function (ev) {
      if (ev.target === si) return;
      if (ev.key === '/') { ev.preventDefault(); si.focus(); }
      if (ev.key === 'f') fit(true);
    });
    setupPanZoom();
    autoExpand();
    render();
    fit();
    showDetails(null);
    var firstDraw = performance.now();
    requestAnimationFrame(function () {
      requestAnimationFrame(function () {
        window.graphoptViewer = {ready: true, firstRenderMs: performance.now(), scriptDoneMs: firstDraw,
          items: Object.keys(abs).length, api: {reveal: function (name) { goTo(name, state.view); }, switchView: switchView}};
        document.body.setAttribute('data-ready', '1');
      });
    });
  }
  init();
})();
