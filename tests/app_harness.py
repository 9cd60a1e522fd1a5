"""The real dashboard under AppTest on two tiny random zoo models, for the hardening tests and benches.

The models live in a temporary zoo ($EQUISHIFT_ZOO_DIR) under names no shipped model has, so they never
collide with the shipped models in the process-wide caches (``st.cache_resource`` is keyed on the spec),
and the tests do not depend on how far the training of the shipped models has got.

    with tiny_zoo() as (baseline, anchored):
        at = open_page(baseline, anchored)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboard" / "app.py")
for p in (str(ROOT), str(Path(__file__).parent)):
    if p not in sys.path:
        sys.path.insert(0, p)



def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a `streamlit run` under test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0, poll: float = 0.3) -> None:
    """Wait until the Streamlit server at ``url`` answers /_stcore/health; RuntimeError if it exits
    first, TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(poll)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")


@contextlib.contextmanager
def served(log: Path, env: dict = None, warm: bool = True, timeout: float = 300.0,
           stop_s: float = 15.0) -> Iterator[Tuple[str, subprocess.Popen]]:
    """A dashboard server on 127.0.0.1 and a free port, started as `bash run.sh dashboard` starts it
    (``python -m dashboard.serve``; ``warm=False``: a bare `streamlit run dashboard/app.py`), its output
    in ``log``; yields (url, process) once /_stcore/health answers, and stops it afterwards. ``env``:
    variables added to this process's environment (HF_HUB_OFFLINE=1 always)."""
    port = free_port()
    launcher = ["-m", "dashboard.serve"] if warm else ["-m", "streamlit", "run", str( ROOT / "dashboard" / "app.py")]
    cmd = [sys.executable, *launcher, "--server.headless", "true", "--server.address", "127.0.0.1",
           "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=timeout)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


BASELINE = "hardening-vit-baseline"
ANCHORED = "hardening-vit-anchored"
TIMEOUT = 300  # seconds per run; a warm run of the page takes ~0.2 s on these models


@contextlib.contextmanager
def tiny_zoo() -> Iterator[Tuple[str, str]]:
    """Write a 32-px random ViT and its anchored twin into a temporary zoo and point the app at it;
    yields their specs. The previous $EQUISHIFT_ZOO_DIR is restored on exit."""
    from zoo_helpers import write_tiny

    root = Path(tempfile.mkdtemp(prefix="equishift-hardening-zoo-"))
    write_tiny(root, BASELINE, seed=0)
    write_tiny(root, ANCHORED, anchoring="full", seed=1)
    old = os.environ.get("EQUISHIFT_ZOO_DIR")
    os.environ["EQUISHIFT_ZOO_DIR"] = str(root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        yield f"zoo:{BASELINE}", f"zoo:{ANCHORED}"
    finally:
        if old is None:
            os.environ.pop("EQUISHIFT_ZOO_DIR", None)
        else:
            os.environ["EQUISHIFT_ZOO_DIR"] = old
        shutil.rmtree(root, ignore_errors=True)


def open_page(baseline: str, anchored: str, grid: str = "r3"):
    """An AppTest of dashboard/app.py showing ``baseline`` | ``anchored`` on a small grid (?grid=)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["grid"] = grid
    at.run()
    at.sidebar.selectbox(key="baseline_zoo").set_value(baseline)
    at.sidebar.selectbox(key="anchored_zoo").set_value(anchored)
    return at.run()


def errors(at) -> List[str]:
    return [e.value for e in at.error]


def model_warnings(at) -> List[str]:
    """st.warning texts about a loaded model (card["warnings"], e.g. NaN/Inf weights)."""
    return [w.value for w in at.warning if w.value.startswith(("The baseline model", "The anchored model"))]


# Counts what the page's websocket sends and receives (messages, bytes) in window.__ws: an init script for
# Playwright (add_init_script), so the counts start with the page. Used to check that a drag sends nothing
# and to report the payload per rerun.
WS_COUNTER_JS = """
(() => {
  const W = window.WebSocket, c = window.__ws = { sent: 0, sentBytes: 0, recv: 0, recvBytes: 0 };
  const size = (d) => d.byteLength ?? d.size ?? d.length ?? 0;
  function Counted(...args) {
    const ws = new W(...args);
    ws.addEventListener('message', (e) => { c.recv += 1; c.recvBytes += size(e.data); });
    const send = ws.send.bind(ws);
    ws.send = (d) => { c.sent += 1; c.sentBytes += size(d); return send(d); };
    return ws;
  }
  Counted.prototype = W.prototype;
  for (const k of ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED']) Counted[k] = W[k];
  window.WebSocket = Counted;
})();
"""

# True when the page has finished a rerun: no element left over from the previous run (Streamlit marks
# them stale while a script runs) and no script-running status.
PAGE_IDLE_JS = """() => document.querySelectorAll('[data-stale="true"]').length === 0
  && !/Running|Stop/.test((document.querySelector('[data-testid="stStatusWidget"]') || {}).innerText || '')"""


def live_data(at) -> dict:
    """The data the live view (dashboard.live) received in the last run: the images at the current
    shift, the grid and the per-sweep table it draws every shift from."""
    def find(node):
        for child in getattr(node, "children", {}).values():
            if type(child).__name__ == "UnknownElement" and child.type == "bidi_component" \
                    and child.proto.component_name == "equishift_live_view":
                return child
            hit = find(child)
            if hit is not None:
                return hit
        return None
    el = find(at._tree[0])
    assert el is not None, "no live view on the page"
    return json.loads(el.proto.json)


def top5_tables(at) -> List[str]:
    """The top-5 table each model's column shows at the current shift, as markdown (dashboard.live draws
    them in the browser from the table it received; this reads the same rows)."""
    from dashboard import live

    data = live_data(at)
    g = data["grid"]
    iy, ix = (round((v - g["lo"]) / g["step"]) for v in data["shift"])
    k = iy * g["n"] + ix
    return [live.top5_markdown(live.top5_at(data["table"], s["role"], k)) for s in data["sides"]]


def image_captions(at) -> List[str]:
    """Captions of the st.image elements (the preprocessing expander: original, then each model input)."""
    out = []
    for el in at.get("image"):
        out.extend(el.captions)
    return out
