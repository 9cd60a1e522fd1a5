"""The shift pad: the model's input drawn with its patch grid; drag it and the shift follows the pointer.

A bidirectional ``st.components.v2`` component built from inline HTML/CSS/JS (no build step, no network).
Python sends the image *already shifted* by the current shift (so at rest the pad shows exactly what the
model sees, for every shift mode) and the JS only previews the extra offset while a drag is in progress:
circularly wrapped for ``circular`` and the fractional modes, translated over black for the others.

The pad reports ``{"dy": …, "dx": …, "seq": int}`` in *model pixels* (multiples of ``quantum``) through
the state value ``shift``: while dragging (throttled, so the figures follow) and once more on release.
``seq`` grows with every report, so that going back to a shift reported earlier still counts as a change,
and Python echoes the last ``seq`` it consumed as ``ack``: until the echo catches up, the pad keeps its
own shift instead of the (older) one the rerun was started with. Arrow keys move the shift by one pixel
(shift+arrow: one patch).
"""
from __future__ import annotations

import base64
import io
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import streamlit as st
from PIL import Image

__all__ = ["shift_pad", "png_data_url", "PAD_PIXELS"]

PAD_PIXELS = 320  # longest side of the pad on screen, in CSS pixels

_HTML = """
<div class="es-pad">
  <canvas class="es-canvas" tabindex="0" aria-label="drag to shift the image"></canvas>
  <div class="es-readout">shift (dy, dx) = <span class="es-shift">0, 0</span> px
    <span class="es-hint">· drag the image, or focus it and use the arrow keys</span></div>
</div>
"""

_CSS = """
.es-pad { display: flex; flex-direction: column; gap: 0.3rem; user-select: none; }
.es-canvas { cursor: grab; touch-action: none; border: 1px solid var(--st-border-color, #ccc);
             border-radius: 4px; image-rendering: pixelated; max-width: 100%; }
.es-canvas:active { cursor: grabbing; }
.es-canvas:focus { outline: 2px solid var(--st-primary-color, #f63); }
.es-readout { font-family: var(--st-font, sans-serif); font-size: 0.9rem; color: var(--st-text-color, #222); }
.es-hint { opacity: 0.6; font-size: 0.8rem; }
"""

# The function runs again on every rerun with fresh ``data``; everything that must survive (drag in
# progress, loaded image, report counter) lives on the root element, and handlers are (re)assigned as
# properties so they never stack up.
_JS = """
export default function(component) {
  const { data, setStateValue, parentElement } = component;
  const root = parentElement.querySelector('.es-pad');
  const canvas = root.querySelector('canvas');
  const readout = root.querySelector('.es-shift');
  const st = root.__es || (root.__es = { dragging: false, shift: [0, 0], img: null, src: null,
                                          seq: data.ack || 0, lastSent: 0, timer: null });
  st.data = data;
  const H = data.height, W = data.width, scale = data.scale;
  const cw = Math.round(W * scale), ch = Math.round(H * scale);
  if (canvas.width !== cw || canvas.height !== ch) { canvas.width = cw; canvas.height = ch; }
  canvas.style.width = cw + 'px';
  canvas.style.height = ch + 'px';
  canvas.dataset.scale = String(scale);
  // Take the server's shift unless we are dragging or it has not yet seen our latest report (a rerun
  // that started before the last key press or drag step would otherwise pull the pad back).
  if (!st.dragging && (data.ack || 0) >= st.seq) st.shift = [data.shift[0], data.shift[1]];

  const clamp = (v, lo, hi) => Math.max(lo, Math.min(hi, v));
  const mod = (a, n) => ((a % n) + n) % n;

  function draw() {
    const d = st.data, ctx = canvas.getContext('2d');
    ctx.imageSmoothingEnabled = false;
    ctx.fillStyle = '#000';
    ctx.fillRect(0, 0, cw, ch);
    if (st.img) {
      // the image shows d.shift; preview only the difference to the pointer's shift
      const oy = st.shift[0] - d.shift[0], ox = st.shift[1] - d.shift[1];
      if (d.wrap) {
        const y0 = mod(oy, H), x0 = mod(ox, W);
        for (const ty of [y0 - H, y0]) for (const tx of [x0 - W, x0])
          ctx.drawImage(st.img, tx * scale, ty * scale, cw, ch);
      } else {
        ctx.drawImage(st.img, ox * scale, oy * scale, cw, ch);
      }
    }
    // the patch grid is fixed to the frame: content moves under it
    ctx.strokeStyle = 'rgba(255, 221, 0, 0.75)';
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let k = d.stride; k < W; k += d.stride) { const x = Math.round(k * scale) + 0.5; ctx.moveTo(x, 0); ctx.lineTo(x, ch); }
    for (let k = d.stride; k < H; k += d.stride) { const y = Math.round(k * scale) + 0.5; ctx.moveTo(0, y); ctx.lineTo(cw, y); }
    ctx.stroke();
    readout.textContent = st.shift[0] + ', ' + st.shift[1];
    canvas.dataset.dy = String(st.shift[0]);
    canvas.dataset.dx = String(st.shift[1]);
  }

  function send() {
    st.seq += 1;
    st.lastSent = Date.now();
    setStateValue('shift', { dy: st.shift[0], dx: st.shift[1], seq: st.seq });
  }
  function sendThrottled() {
    const wait = st.data.throttle_ms - (Date.now() - st.lastSent);
    if (wait <= 0) { clearTimeout(st.timer); st.timer = null; send(); }
    else if (!st.timer) st.timer = setTimeout(() => { st.timer = null; send(); }, wait);
  }
  function moveTo(dy, dx) {
    const r = st.data.range;
    const next = [clamp(dy, r[0][0], r[0][1]), clamp(dx, r[1][0], r[1][1])];
    if (next[0] === st.shift[0] && next[1] === st.shift[1]) return false;
    st.shift = next;
    draw();
    return true;
  }

  if (st.src !== data.image) {
    const src = data.image;
    st.src = src;
    const img = new Image();
    img.onload = () => { if (st.src === src) { st.img = img; draw(); } };
    img.src = src;
  }

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
    const s = st.data.scale, q = st.data.quantum;
    const dy = st.startShift[0] + q * Math.round((e.clientY - st.start[0]) / s / q);
    const dx = st.startShift[1] + q * Math.round((e.clientX - st.start[1]) / s / q);
    if (moveTo(dy, dx) && st.data.live) sendThrottled();
  };
  const release = (e) => {
    if (!st.dragging) return;
    st.dragging = false;
    clearTimeout(st.timer); st.timer = null;
    if (st.shift[0] !== st.data.shift[0] || st.shift[1] !== st.data.shift[1]) send();
  };
  canvas.onpointerup = release;
  canvas.onpointercancel = release;
  canvas.onkeydown = (e) => {
    const step = e.shiftKey ? st.data.stride : st.data.quantum;
    const moves = { ArrowUp: [-step, 0], ArrowDown: [step, 0], ArrowLeft: [0, -step], ArrowRight: [0, step] };
    const m = moves[e.key];
    if (!m) return;
    e.preventDefault();
    if (moveTo(st.shift[0] + m[0], st.shift[1] + m[1])) send();
  };
  draw();
}
"""

_pad = st.components.v2.component("equishift_shift_pad", html=_HTML, css=_CSS, js=_JS)


def png_data_url(image: np.ndarray) -> str:
    """An (H, W, 3) uint8 or float-in-[0, 1] array as a ``data:image/png;base64`` URL (no network, no file)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def shift_pad(image: np.ndarray, shift: Tuple[int, int], stride: int,
              shift_range: Sequence[Tuple[int, int]], *, wrap: bool = True, live: bool = True,
              quantum: float = 1, throttle_ms: int = 250, key: str = "shift_pad",
              on_change: Optional[Callable[[], None]] = None, ack: int = 0):
    """Mount the pad showing ``image`` (H, W, 3), the model input at ``shift``, with a ``stride`` grid.

    ``shift_range`` is ((dy_min, dy_max), (dx_min, dx_max)), inclusive; the pad clamps to it, and moves
    in steps of ``quantum`` model pixels (1, or e.g. 0.25 for fractional shifts).
    ``on_change`` runs (as a Streamlit callback, before the rerun) when the pad reports a new shift; read
    the report from ``st.session_state[key]["shift"]``; pass its ``seq`` back as ``ack``. Returns the
    component result."""
    h, w = int(image.shape[0]), int(image.shape[1])
    data = {
        "image": png_data_url(image), "height": h, "width": w, "scale": PAD_PIXELS / max(h, w),
        "stride": int(stride), "shift": [int(shift[0]), int(shift[1])],
        "range": [[int(shift_range[0][0]), int(shift_range[0][1])], [int(shift_range[1][0]), int(shift_range[1][1])]],
        "wrap": bool(wrap), "live": bool(live), "throttle_ms": int(throttle_ms), "quantum": quantum,
        "ack": int(ack),
    }
    return _pad(key=key, data=data, on_shift_change=on_change or (lambda: None), width="content")
