"""The live view: both models' inputs, predictions and top-5 tables, following the shift in the browser.

A bidirectional ``st.components.v2`` component (inline HTML/CSS/JS: no build step, no network). Everything
it shows at a shift is already known once the sweep ran, so it receives, once per sweep, a table of every
swept shift (each model's top-5 classes with p and Δ, and the anchored grid's phase) and draws any shift
from it without asking the server. While the pointer drags, the readout, both input views (with the patch
grid and the anchored model's grid), both predictions and top-5 tables, and the current-shift markers of the
page's plotly figures (traces whose ``meta`` carries ``es_current``, moved with ``Plotly.restyle``) follow
at once; the shift is reported to Python only on release (or on a key press), and Python then re-draws
what needs the model (attention, attribution, …).

Python sends the input images *at the current shift* (so at rest every view is exactly what the model
sees, in every shift mode); during a drag the views preview the extra offset (wrapped for the periodic
modes, translated over black for the others).

The report is ``{"dy", "dx", "seq"}`` in model pixels under the state value ``shift``; ``seq`` grows with
every report and Python echoes the last one it consumed as ``ack``, so a rerun started before the latest
report cannot pull the view back. The per-sweep table is sent until the component confirms it holds it
(state value ``have``), then only its id: reruns stay small.
"""
from __future__ import annotations

import base64
import hashlib
import io
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import streamlit as st
from PIL import Image

__all__ = ["live_view", "side_table", "table_id", "top5_at", "top5_markdown", "png_data_url", "VIEW_PIXELS"]

VIEW_PIXELS = 192  # longest side of each input view on screen, in CSS pixels

_HTML = """
<div class="es-live">
  <div class="es-head">shift (dy, dx) = <span class="es-shift">0, 0</span> px
    <span class="es-hint">· drag an image, or focus it and use the arrow keys (shift+arrow: one patch)</span></div>
  <div class="es-sides"></div>
</div>
"""

_CSS = """
.es-live { display: flex; flex-direction: column; gap: 0.4rem; user-select: none;
           font-family: var(--st-font, sans-serif); color: var(--st-text-color, #222); }
.es-head { font-size: 0.95rem; }
.es-shift { font-weight: 600; font-variant-numeric: tabular-nums; }
.es-hint { opacity: 0.6; font-size: 0.8rem; }
.es-sides { display: flex; flex-wrap: wrap; gap: 1rem 2rem; }
.es-side { display: flex; flex-direction: column; gap: 0.3rem; min-width: 0; }
.es-title { font-size: 1.05rem; font-weight: 600; }
.es-pred { font-size: 0.95rem; }
.es-flip { color: #c0392b; font-weight: 600; }
.es-row { display: flex; gap: 0.8rem; align-items: flex-start; }
.es-canvas { cursor: grab; touch-action: none; border: 1px solid var(--st-border-color, #ccc);
             border-radius: 4px; image-rendering: pixelated; }
.es-canvas:active { cursor: grabbing; }
.es-canvas:focus { outline: 2px solid var(--st-primary-color, #f63); }
.es-legend { font-size: 0.72rem; opacity: 0.75; max-width: 192px; }
table.es-top5 { border-collapse: collapse; font-size: 0.8rem; font-variant-numeric: tabular-nums; }
table.es-top5 th, table.es-top5 td { padding: 0.1rem 0.4rem; border-bottom: 1px solid var(--st-border-color, #ddd); }
table.es-top5 th { text-align: left; font-weight: 600; }
table.es-top5 td.num, table.es-top5 th.num { text-align: right; }
.es-note { font-size: 0.7rem; opacity: 0.65; max-width: 14rem; }
"""

# Runs again on every rerun with fresh ``data``. What must survive (drag in progress, images, the report
# counter) lives on the root element; the per-sweep tables live in a page-wide map keyed by their id, so
# a remount keeps them. Handlers are assigned as properties so they never stack up.
_JS = """
export default function(component) {
  const { data, setStateValue, parentElement } = component;
  const root = parentElement.querySelector('.es-live');
  const tables = window.__esTables || (window.__esTables = new Map());
  const st = root.__es || (root.__es = { dragging: false, shift: [0, 0], seq: data.ack || 0, imgs: {},
                                          srcs: {}, built: null, frameMs: [] });
  st.data = data;
  window.__esLive = root;  // for tests and benchmarks: the view lives in a shadow root
  if (data.table) {
    tables.set(data.table_id, data.table);
    while (tables.size > 4) tables.delete(tables.keys().next().value);  // oldest first
  }
  const table = tables.get(data.table_id);
  if (table && data.have !== data.table_id) setStateValue('have', data.table_id);
  if (!table && data.have === data.table_id) setStateValue('have', null);  // lost (e.g. new tab): resend
  if (!st.dragging && (data.ack || 0) >= st.seq) st.shift = [data.shift[0], data.shift[1]];

  const clamp = (v, lo, hi) => Math.max(lo, Math.min(hi, v));
  const mod = (a, n) => ((a % n) + n) % n;
  const tenths = (v, sign) => (sign && v > 0 ? '+' : '') + (v / 10).toFixed(1);
  const num = (v) => Number.isInteger(v) ? String(v) : String(+v.toFixed(4));

  // one block per model, built once per layout (number of sides, sizes)
  const layout = JSON.stringify(data.sides.map(s => [s.role, s.height, s.width]));
  const sidesEl = root.querySelector('.es-sides');
  if (st.built !== layout) {
    sidesEl.innerHTML = '';
    for (const s of data.sides) {
      const el = document.createElement('div');
      el.className = 'es-side'; el.dataset.role = s.role;
      el.innerHTML = '<div class="es-pred"></div><div class="es-row">' +
        '<div><canvas class="es-canvas" tabindex="0"></canvas><div class="es-legend"></div></div>' +
        '<div><table class="es-top5"><thead><tr><th>top-5 at this shift</th><th class="num">p</th>' +
        '<th class="num">Δ</th></tr></thead><tbody></tbody></table>' +
        '<div class="es-note">★ the unshifted top-1 · Δ: change from the unshifted image, in percentage points</div>' +
        '</div></div>';
      sidesEl.appendChild(el);
    }
    st.built = layout;
  }
  const blocks = Array.from(sidesEl.querySelectorAll('.es-side'));

  function index(shift) {
    const g = st.data.grid;
    const iy = Math.round((shift[0] - g.lo) / g.step), ix = Math.round((shift[1] - g.lo) / g.step);
    if (iy < 0 || ix < 0 || iy >= g.n || ix >= g.n) return -1;
    return iy * g.n + ix;
  }

  function drawSide(s, el, k) {
    const d = st.data, canvas = el.querySelector('canvas'), H = s.height, W = s.width, sc = s.scale;
    const cw = Math.round(W * sc), ch = Math.round(H * sc);
    if (canvas.width !== cw || canvas.height !== ch) { canvas.width = cw; canvas.height = ch;
      canvas.style.width = cw + 'px'; canvas.style.height = ch + 'px'; }
    canvas.dataset.role = s.role;
    canvas.setAttribute('aria-label', s.role + ' input: drag to shift the image');
    const ctx = canvas.getContext('2d');
    ctx.imageSmoothingEnabled = false;
    ctx.fillStyle = '#000'; ctx.fillRect(0, 0, cw, ch);
    const img = st.imgs[s.role];
    if (img) {  // the image shows d.shift; preview only the difference to the pointer's shift
      const oy = st.shift[0] - d.shift[0], ox = st.shift[1] - d.shift[1];
      if (d.wrap) {
        const y0 = mod(oy, H), x0 = mod(ox, W);
        for (const ty of [y0 - H, y0]) for (const tx of [x0 - W, x0]) ctx.drawImage(img, tx * sc, ty * sc, cw, ch);
      } else { ctx.drawImage(img, ox * sc, oy * sc, cw, ch); }
    }
    const lines = (color, width, x0, y0, step) => {
      ctx.strokeStyle = color; ctx.lineWidth = width; ctx.beginPath();
      for (let v = x0; v < W; v += step) if (v > 0) { const x = Math.round(v * sc) + 0.5; ctx.moveTo(x, 0); ctx.lineTo(x, ch); }
      for (let v = y0; v < H; v += step) if (v > 0) { const y = Math.round(v * sc) + 0.5; ctx.moveTo(0, y); ctx.lineTo(cw, y); }
      ctx.stroke();
    };
    lines('rgba(200, 200, 200, 0.7)', 1, 0, 0, s.stride);  // the fixed patch grid: content moves under it
    const t = table && table.sides[s.role];
    let legend = 'grey: ' + s.stride + '-px patch grid';
    if (t && t.anchors && k >= 0) {
      const a = t.anchors[2 * k], b = t.anchors[2 * k + 1];
      lines('rgba(31, 119, 180, 0.95)', 1.5, b, a, s.stride);
      ctx.strokeStyle = 'yellow'; ctx.lineWidth = 2; ctx.strokeRect(b * sc, a * sc, sc, sc);
      legend += ' · blue: anchored grid, phase (' + a + ', ' + b + ')';
      canvas.dataset.phase = a + ',' + b;
    }
    el.querySelector('.es-legend').textContent = legend;
    const pred = el.querySelector('.es-pred'), body = el.querySelector('tbody');
    if (!t || k < 0) { pred.textContent = s.role + ' · not swept at this shift'; body.innerHTML = ''; return; }
    const n = t.n;  // min(5, classes)
    const top = t.top.slice(n * k, n * k + n), p = t.p.slice(n * k, n * k + n), dl = t.d.slice(n * k, n * k + n);
    const flipped = top[0] !== t.ref_pred;
    pred.innerHTML = '<span class="es-title"></span> · prediction at this shift: <b></b> (' + tenths(p[0]) + '%)' + (flipped ? ' <span class="es-flip">— flipped</span>' : '');
    pred.querySelector('b').textContent = t.classes[top[0]];
    pred.querySelector('.es-title').textContent = s.role;
    pred.dataset.flipped = String(flipped);
    let rows = '';
    for (let i = 0; i < top.length; i++) rows += '<tr><td></td><td class="num">' + tenths(p[i]) + '%</td><td class="num">' + tenths(dl[i], true) + '</td></tr>';
    body.innerHTML = rows;
    Array.from(body.rows).forEach((r, i) => { r.cells[0].textContent = t.classes[top[i]] + (top[i] === t.ref_pred ? ' ★' : ''); });
  }

  // The current-shift markers of the page's figures follow without redrawing them: each figure built by
  // equishift.plots says where a marker goes (a trace's meta.es_current {x: 'dx', y: 'dy'}: a cross at
  // (dx, dy); layout.meta.es_lines: a vertical line at the path coordinate while the shift stays on the
  // path). While the view's shift differs from the one the figures were drawn at, the figures' own
  // markers are hidden and an overlay drawn with the axes' own data→pixel maps; at rest they are restored.
  function markers(live) {
    const [dy, dx] = st.shift, val = { dy, dx };
    for (const gd of document.querySelectorAll('.js-plotly-plot')) {
      const L = gd._fullLayout, data = gd._fullData;
      if (!L || !data) continue;
      if (!gd.__esHooked && gd.on) {  // plotly redraws (resize, zoom) drop nothing of ours, but move axes
        gd.__esHooked = true;
        gd.on('plotly_afterplot', () => window.__esMarkers && window.__esMarkers());
      }
      let layer = gd.querySelector(':scope > .es-overlay');
      const items = [], meta = L.meta || {};
      for (const m of (meta.es_maps || [])) items.push({ kind: 'cross', xa: L[m.xaxis], ya: L[m.yaxis], x: dx, y: dy });
      data.forEach((tr, i) => {
        if (tr.name === 'current shift') {
          const n = gd.calcdata && gd.calcdata[i] && gd.calcdata[i][0] && gd.calcdata[i][0].node3;
          if (n && n.style) n.style('opacity', live ? 0 : null);
        }
        const m = tr.meta && tr.meta.es_current;
        if (m && live) items.push({ kind: 'cross', xa: L[tr.xaxis.replace('x', 'xaxis')], ya: L[tr.yaxis.replace('y', 'yaxis')],
                                    x: val[m.x], y: val[m.y] });
      });
      (L.shapes || []).forEach((sh, i) => {  // the figure's own dotted line at the drawn shift
        if (sh.name !== 'current shift') return;
        for (const path of gd.querySelectorAll('.shapelayer path[data-index="' + i + '"]')) path.style.opacity = live ? 0 : '';
      });
      for (const l of (live ? (meta.es_lines || []) : [])) {
        const on = l.on === 'diagonal' ? dy === dx : Object.keys(l.on).every(c => val[c] === l.on[c]);
        if (on) items.push({ kind: 'line', xa: L[l.xaxis], ya: L[l.yaxis], x: val[l.coord], color: l.color });
      }
      if (!items.length) { if (layer) layer.remove(); continue; }
      if (!items.length) continue;
      if (!layer) {
        layer = document.createElement('div');
        layer.className = 'es-overlay';
        layer.style.cssText = 'position:absolute;left:0;top:0;width:0;height:0;pointer-events:none;z-index:5';
        if (getComputedStyle(gd).position === 'static') gd.style.position = 'relative';
        gd.appendChild(layer);
      }
      let html = '';
      for (const it of items) {
        if (!it.xa || !it.ya || !it.xa.d2p) continue;
        const px = it.xa._offset + it.xa.d2p(it.x);
        if (!isFinite(px) || px < it.xa._offset - 1 || px > it.xa._offset + it.xa._length + 1) continue;
        if (it.kind === 'line') {
          html += '<div style="position:absolute;left:' + (px - 0.75) + 'px;top:' + it.ya._offset + 'px;width:0;height:' +
                  it.ya._length + 'px;border-left:1.5px dotted ' + (it.color || 'black') + '"></div>';
        } else {
          const py = it.ya._offset + it.ya.d2p(it.y);
          if (!isFinite(py) || py < it.ya._offset - 1 || py > it.ya._offset + it.ya._length + 1) continue;
          html += '<div style="position:absolute;left:' + (px - 7) + 'px;top:' + (py - 9) + 'px;font:bold 16px/16px sans-serif;' +
                  'color:white;text-shadow:0 0 2px black,0 0 2px black">×</div>';
        }
      }
      if (layer.__html !== html) { layer.innerHTML = html; layer.__html = html; }  // no change, no mutation
    }
  }

  window.__esMarkers = () => markers(st.shift[0] !== st.data.shift[0] || st.shift[1] !== st.data.shift[1]);
  // figures drawn after this view (another tab opened, a figure replaced) get their markers too
  if (!window.__esObserver) {
    let queued = false;
    window.__esObserver = new MutationObserver(() => {
      if (queued) return;
      queued = true;
      requestAnimationFrame(() => { queued = false; window.__esMarkers && window.__esMarkers(); });
    });
    window.__esObserver.observe(document.body, { childList: true, subtree: true });
  }

  function draw() {
    const t0 = performance.now();
    const k = index(st.shift);
    st.data.sides.forEach((s, i) => drawSide(s, blocks[i], k));
    root.querySelector('.es-shift').textContent = num(st.shift[0]) + ', ' + num(st.shift[1]);
    root.dataset.dy = String(st.shift[0]); root.dataset.dx = String(st.shift[1]);
    markers(st.shift[0] !== st.data.shift[0] || st.shift[1] !== st.data.shift[1]);
    st.frameMs.push(performance.now() - t0);
    if (st.frameMs.length > 500) st.frameMs.shift();
    window.__esFrameMs = st.frameMs;
  }

  st.draw = draw;  // the latest run's draw (an image that loads later must not use an older one)

  function send() {
    st.seq += 1;
    st.reported = st.shift.slice();
    setStateValue('shift', { dy: st.shift[0], dx: st.shift[1], seq: st.seq });
  }
  function moveTo(dy, dx) {
    const r = st.data.range, g = st.data.grid;
    const snap = (v) => g.lo + g.step * Math.round((v - g.lo) / g.step);  // only swept shifts
    const next = [clamp(snap(dy), r[0][0], r[0][1]), clamp(snap(dx), r[1][0], r[1][1])];
    if (next[0] === st.shift[0] && next[1] === st.shift[1]) return false;
    st.shift = next;
    draw();
    return true;
  }

  for (const s of data.sides) {
    if (st.srcs[s.role] !== s.image) {
      const src = s.image, role = s.role;
      st.srcs[role] = src;
      const img = new Image();
      img.onload = () => { if (st.srcs[role] === src) { st.imgs[role] = img; st.draw(); } };
      img.src = src;
    }
  }

  for (const el of blocks) {
    const canvas = el.querySelector('canvas');
    canvas.onpointerdown = (e) => {
      canvas.setPointerCapture(e.pointerId);
      canvas.focus();
      st.dragging = true;
      st.start = [e.clientY, e.clientX];
      st.startShift = st.shift.slice();
      e.preventDefault();
    };
    canvas.onpointermove = (e) => {
      if (!st.dragging) return;
      const s = st.data.sides[blocks.indexOf(el)].scale, q = st.data.quantum;
      moveTo(st.startShift[0] + q * Math.round((e.clientY - st.start[0]) / s / q),
             st.startShift[1] + q * Math.round((e.clientX - st.start[1]) / s / q));
    };
    const release = () => {
      if (!st.dragging) return;
      st.dragging = false;
      // the last shift the server heard of: the page's, or a report still in flight
      const known = (st.data.ack || 0) < st.seq && st.reported ? st.reported : st.data.shift;
      if (st.shift[0] !== known[0] || st.shift[1] !== known[1]) send();
    };
    canvas.onpointerup = release;
    canvas.onpointercancel = release;
    canvas.onkeydown = (e) => {
      const q = st.data.quantum, step = e.shiftKey ? Math.max(q, q * Math.round(st.data.stride / q)) : q;
      const moves = { ArrowUp: [-step, 0], ArrowDown: [step, 0], ArrowLeft: [0, -step], ArrowRight: [0, step] };
      const m = moves[e.key];
      if (!m) return;
      e.preventDefault();
      if (moveTo(st.shift[0] + m[0], st.shift[1] + m[1])) send();
    };
  }
  draw();
}
"""

_live = st.components.v2.component("equishift_live_view", html=_HTML, css=_CSS, js=_JS)


def png_data_url(image: np.ndarray) -> str:
    """An (H, W, 3) uint8 or float-in-[0, 1] array as a ``data:image/png;base64`` URL (no network, no file)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _tenths(v: np.ndarray) -> np.ndarray:
    """Percent values rounded to 0.1 as integer tenths (an exact decimal on screen; -0 cannot occur)."""
    return np.rint(np.asarray(v, dtype=np.float64) * 1000.0).astype(np.int64)


def side_table(probs: np.ndarray, ref_probs: np.ndarray, ref_pred: int,
               anchors: Optional[np.ndarray] = None, classes: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """One model's per-shift table: for every swept shift (row of ``probs`` [K, C]) the five most probable
    classes (stable order), their p and their change Δ from ``ref_probs``, both in tenths of a percent,
    flattened row-major ([K*5]); ``anchors`` [K, 2] the anchored grid's phase (a, b) at each shift;
    ``classes`` the model's class names (default: the class indices)."""
    probs = np.asarray(probs, dtype=np.float64)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    p = np.take_along_axis(probs, top, axis=1)
    d = p - np.asarray(ref_probs, dtype=np.float64)[top]
    out = {"top": top.reshape(-1).tolist(), "p": _tenths(p).reshape(-1).tolist(),
           "d": _tenths(d).reshape(-1).tolist(), "ref_pred": int(ref_pred), "n": int(top.shape[1]),
           "classes": [str(c) for c in classes] if classes is not None else [str(i) for i in range(probs.shape[1])]}
    out["anchors"] = None if anchors is None else np.asarray(anchors, dtype=np.int64).reshape(-1).tolist()
    return out


def table_id(keys: Sequence) -> str:
    """A short id of the sweeps a table was built from (their cache keys)."""
    return hashlib.sha256(repr(tuple(keys)).encode()).hexdigest()[:16]


def top5_at(table: Dict[str, object], role: str, k: int) -> List[Tuple[str, bool, float, float]]:
    """What the view shows for ``role`` at shift row ``k``: (class, ★ unshifted top-1, p %, Δ pp) rows."""
    t = table["sides"][role]
    n = t["n"]
    rows = []
    for i in range(n * k, n * k + n):
        c = t["top"][i]
        rows.append((t["classes"][c], c == t["ref_pred"], t["p"][i] / 10, t["d"][i] / 10))
    return rows


def top5_markdown(rows: Sequence[Tuple[str, bool, float, float]]) -> str:
    """``top5_at`` rows as the markdown table the report and the tests read (same numbers as the view)."""
    lines = ["| top-5 at this shift | p | Δ |", "|---|---:|---:|"]
    for name, star, p, d in rows:
        lines.append(f"| {name}{' ★' if star else ''} | {p:.1f}% | {'+' if d > 0 else ''}{d:.1f} |")
    return "\n".join(lines)


def live_view(sides: Sequence[Dict[str, object]], table: Dict[str, object], shift: Tuple[float, float], *,
              grid: Tuple[float, float, int], shift_range: Sequence[Tuple[float, float]], stride: int,
              wrap: bool = True, quantum: float = 1, key: str = "live_view",
              on_change: Optional[Callable[[], None]] = None, ack: int = 0):
    """Mount the live view. ``sides``: per model ``{"role", "image": (H, W, 3) array at ``shift``,
    "stride"}``; ``table``: ``{"classes": [...], "sides": {role: side_table(...)}}`` for the sweep grid
    ``grid`` = (lo, step, n) (row k = iy*n + ix). ``shift_range`` ((dy_min, dy_max), (dx_min, dx_max)) is
    inclusive; the views move in steps of ``quantum`` model pixels (shift+arrow: ``stride``).
    ``on_change`` runs (as a Streamlit callback) when a new shift is reported; read it from
    ``st.session_state[key]["shift"]`` and pass its ``seq`` back as ``ack``."""
    tid = table_id([table.get("key")])
    have = (st.session_state.get(key) or {}).get("have")
    views = []
    for s in sides:
        img = np.asarray(s["image"])
        h, w = int(img.shape[0]), int(img.shape[1])
        views.append({"role": s["role"], "image": png_data_url(img), "height": h, "width": w,
                      "scale": VIEW_PIXELS / max(h, w), "stride": int(s["stride"])})
    payload = {k: v for k, v in table.items() if k != "key"}
    data = {
        "sides": views, "shift": [_num(shift[0]), _num(shift[1])],
        "range": [[_num(shift_range[0][0]), _num(shift_range[0][1])], [_num(shift_range[1][0]), _num(shift_range[1][1])]],
        "grid": {"lo": _num(grid[0]), "step": _num(grid[1]), "n": int(grid[2])},
        "wrap": bool(wrap), "quantum": _num(quantum), "stride": int(stride), "ack": int(ack),
        "table_id": tid, "have": have, "table": None if have == tid else payload,
    }
    return _live(key=key, data=data, on_shift_change=on_change or (lambda: None),
                 on_have_change=lambda: None, width="stretch")


def _num(v):
    v = float(v)
    return int(v) if v.is_integer() else v

