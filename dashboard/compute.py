"""Everything the dashboard computes, cached so that moving the shift only re-draws.

- Models: ``st.cache_resource`` keyed on the spec string and shared by every session. They are only ever
  run (the sweep works on its own structural copy), never mutated.
- Sweeps: one per (model spec, image sha256, shift mode, grid), computed once with a progress bar and
  kept in a small process-wide LRU (``store()``, itself a cache_resource). Not ``st.cache_data``: that
  would unpickle tens of MB of attention maps on every rerun, and a progress bar cannot be driven from
  inside a cached function (Streamlit replays elements of cached functions).
- Derived results (model inputs, thumbnails, summaries, attention scores, attributions at one shift):
  small, cached per key in a second LRU, so browsing many shifts never evicts a sweep.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import numpy as np
import streamlit as st
import torch

from equishift.device import default_device
from equishift.zoo import LoadedModel, load_model

__all__ = ["get_model", "store", "derived_store", "cached", "Store", "nbytes", "sweep_slots", "sweep_slot",
           "device_label", "forward_seconds", "Background", "background", "session_alive", "session_id"]


@st.cache_resource(max_entries=6, show_spinner=False)
def get_model(spec: str) -> LoadedModel:
    """The model a spec names, on the default device (cuda when available). Shared by all sessions."""
    return load_model(spec)


def nbytes(value: Any) -> int:
    """Approximate bytes a cached value holds: its ``nbytes`` (SweepResult, numpy), tensors, PIL images,
    and containers of them. Anything else counts as small (1 KiB)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    n = getattr(value, "nbytes", None)
    if isinstance(n, int):
        return n
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], (int, float, str)):  # plain numbers or names: ~8 bytes each
            return 8 * len(value) + sum(len(v) for v in value[:1000] if isinstance(v, str)) * max(1, len(value) // 1000)
        return sum(nbytes(v) for v in value)
    if hasattr(value, "to_plotly_json"):  # a plotly figure: ~8 bytes per value, ~32 per hover text
        def count(v) -> int:
            return 0 if v is None or isinstance(v, str) else int(np.size(np.asarray(v, dtype=object)))
        return sum(8 * count(getattr(t, "z", None)) + 32 * count(getattr(t, "text", None)) for t in value.data) + 1024
    size, bands = getattr(value, "size", None), getattr(value, "getbands", None)
    if isinstance(size, tuple) and len(size) == 2 and callable(bands):  # a PIL image
        return size[0] * size[1] * len(bands())
    return 1024


class Store:
    """A thread-safe LRU of computed results shared by all sessions; values are treated as read-only.

    Bounded twice: at most ``max_entries`` values that no session shows (``pin``) and ``max_bytes`` in total
    (by ``nbytes``, pinned values included); the least recently used go first, but the newest value always
    stays (a sweep larger than the budget is still drawn, and only evicted by the next one). ``get_or_compute`` holds a per-key lock while computing, so
    two sessions asking for the same sweep at once compute it once; different keys compute in parallel.
    A failed computation stores nothing and leaves no lock behind (the next request tries again)."""

    def __init__(self, max_entries: int = 24, max_bytes: Optional[int] = None,
                 is_alive: Optional[Callable[[Hashable], bool]] = None):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: "OrderedDict[Hashable, Tuple[Any, int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pending: Dict[Hashable, list] = {}  # key -> [lock, number of callers using it]
        # owner (a session) -> (the keys it shows now, when it last said so); ``is_alive(owner)`` tells
        # whether an owner still exists (a closed browser tab's pins are dropped)
        self._pins: Dict[Hashable, Tuple[frozenset, float]] = {}
        self._is_alive = is_alive

    def pin(self, owner: Hashable, keys) -> None:
        """``owner`` shows ``keys`` now (replacing what it pinned before). Eviction takes values nobody
        shows first; only when those are gone, the values of the owner that pinned least recently. So one
        session's new work never pushes out what another live session is looking at while unpinned values
        remain — and the byte budget still holds."""
        with self._lock:
            self._pins[owner] = (frozenset(keys), time.monotonic())
            if self._is_alive is not None:
                for other in [o for o in self._pins if o != owner]:
                    if not self._is_alive(other):
                        del self._pins[other]

    def release(self, owner: Hashable) -> None:
        with self._lock:
            self._pins.pop(owner, None)

    def pinned(self) -> Dict[Hashable, frozenset]:
        with self._lock:
            return {o: keys for o, (keys, _) in self._pins.items()}

    def _pinned_keys(self) -> set:
        return set().union(*(keys for keys, _ in self._pins.values())) if self._pins else set()

    def _unpinned_count(self) -> int:
        pinned = self._pinned_keys()
        return sum(1 for k in self._data if k not in pinned)

    def _victim(self, newest: Hashable) -> Hashable:
        """The key to evict (lock held): the least recently used one nobody pins, else the one pinned
        longest ago (a pinned key's time is that of its most recent pin)."""
        pinned: Dict[Hashable, float] = {}
        for keys, t in self._pins.values():
            for k in keys:
                pinned[k] = max(t, pinned.get(k, t))
        candidates = [k for k in self._data if k != newest]
        free = [k for k in candidates if k not in pinned]
        if free:
            return free[0]
        return min(candidates, key=lambda k: pinned[k])

    def get(self, key: Hashable) -> Optional[Any]:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key][0]
        return None

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    @property
    def bytes(self) -> int:
        """Bytes currently held (sum of ``nbytes`` of the stored values)."""
        with self._lock:
            return self._bytes

    @property
    def pending(self) -> int:
        """Keys being computed (or waited for) right now."""
        with self._lock:
            return len(self._pending)

    def _put(self, key: Hashable, value: Any) -> None:
        size = nbytes(value)
        with self._lock:
            if key in self._data:
                self._bytes -= self._data.pop(key)[1]
            self._data[key] = (value, size)
            self._bytes += size
            while len(self._data) > 1:
                over_bytes = self.max_bytes is not None and self._bytes > self.max_bytes
                if not over_bytes and self._unpinned_count() <= self.max_entries:
                    break
                _, old_size = self._data.pop(self._victim(key))
                self._bytes -= old_size

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        hit = self.get(key)
        if hit is not None:
            return hit
        with self._lock:
            entry = self._pending.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                hit = self.get(key)
                if hit is not None:
                    return hit
                value = compute()
                self._put(key, value)
                return value
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    self._pending.pop(key, None)


class Background:
    """Sweeps computed off the script thread, so that a page can be drawn on a coarse grid at once while
    the grid the user chose is swept (the first render of a big grid). One job per key at a time, stored
    in ``store`` when done (so every session then finds it there); progress and failures are kept here."""

    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()
        self._jobs: Dict[Hashable, Dict[str, Any]] = {}

    def start(self, key: Hashable, compute: Callable[[Callable[[int, int], None]], Any]) -> None:
        """Run ``compute(progress)`` in a thread unless ``key`` is stored or already being computed."""
        with self._lock:
            job = self._jobs.get(key)
            if key in self.store or (job is not None and job["thread"].is_alive()):
                return
            job = self._jobs[key] = {"done": 0, "total": 0, "error": None}

            def progress(done: int, total: int) -> None:
                job["done"], job["total"] = done, total

            def run() -> None:
                try:
                    # kept here too until the page takes it (deliver): the store may evict it meanwhile
                    job["result"] = self.store.get_or_compute(key, lambda: compute(progress))
                except Exception as e:  # noqa: BLE001 - reported to the page that waits for it
                    job["error"] = f"{type(e).__name__}: {e}"

            job["thread"] = threading.Thread(target=run, name="equishift-background-sweep", daemon=True)
            job["thread"].start()

    def status(self, key: Hashable) -> Dict[str, Any]:
        """{"done", "total", "error", "ready"} of the job for ``key`` (ready: its result exists)."""
        with self._lock:
            job = dict(self._jobs.get(key) or {"done": 0, "total": 0, "error": None})
        job.pop("thread", None)
        job["ready"] = job.pop("result", None) is not None or key in self.store
        return job

    def deliver(self, key: Hashable) -> None:
        """Put a finished job's result (back) into the store and forget the job."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.get("result") is None:
                return
            self._jobs.pop(key)
        self.store.get_or_compute(key, lambda: job["result"])


@st.cache_resource(show_spinner=False)
def background() -> Background:
    """The process-wide background sweeps (shared by sessions: two pages asking for the same grid wait
    for one job)."""
    return Background(store())


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


@st.cache_resource(show_spinner=False)
def store() -> Store:
    """The process-wide store of sweeps (one per server, shared by sessions): the big, slow results.
    At most 12 sweeps besides those live sessions show, and $EQUISHIFT_CACHE_MIB (default 1024) MiB."""
    return Store(max_entries=12, max_bytes=cache_mib() * 2 ** 20, is_alive=session_alive)


def cache_mib() -> int:
    """$EQUISHIFT_CACHE_MIB; the older name $EQUISHIFT_CACHE_MB (which always counted MiB) still works."""
    if "EQUISHIFT_CACHE_MIB" not in os.environ and "EQUISHIFT_CACHE_MB" in os.environ:
        logging.getLogger("equishift.dashboard").warning(
            "EQUISHIFT_CACHE_MB is deprecated: it counts MiB, set EQUISHIFT_CACHE_MIB instead")
        return _env_int("EQUISHIFT_CACHE_MB", 1024)
    return _env_int("EQUISHIFT_CACHE_MIB", 1024)


def session_alive(session_id: Hashable) -> bool:
    """Whether a browser session still exists on this server (its pins in the store then still count)."""
    from streamlit.runtime import Runtime

    return Runtime.exists() and Runtime.instance().is_active_session(session_id)


def session_id() -> Optional[str]:
    """This script run's session id (None outside a page, e.g. the warm-up before the server starts)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx(suppress_warning=True)
    return ctx.session_id if ctx is not None else None


@st.cache_resource(show_spinner=False)
def derived_store() -> Store:
    """Small results derived from sweeps and images (inputs, thumbnails, summaries, attribution maps at
    one shift, timing probes), kept apart so that many of them never push a sweep out. At most 512 of
    them and 256 MB."""
    return Store(max_entries=512, max_bytes=256 * 2 ** 20)


@st.cache_resource(show_spinner=False)
def sweep_slots() -> threading.BoundedSemaphore:
    """How many sweeps may run at once across all sessions ($EQUISHIFT_MAX_SWEEPS, default 2): each sweep
    already uses every core (or the whole GPU), so more at once only multiplies peak memory."""
    return threading.BoundedSemaphore(_env_int("EQUISHIFT_MAX_SWEEPS", 2))


@contextmanager
def sweep_slot(on_wait: Optional[Callable[[], None]] = None, slots: Optional[threading.BoundedSemaphore] = None):
    """Hold one of the sweep slots while the block runs; ``on_wait`` is called once if none is free."""
    slots = slots if slots is not None else sweep_slots()
    if not slots.acquire(blocking=False):
        if on_wait is not None:
            on_wait()
        slots.acquire()
    try:
        yield
    finally:
        slots.release()


def device_label() -> str:
    """'cuda (NVIDIA …)' or 'cpu (N threads)': where the models run."""
    dev = default_device()
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def forward_seconds(loaded: LoadedModel, x: torch.Tensor, batch: int = 32) -> float:
    """Seconds per image of a plain batched forward pass (a timing probe, cached per model and input
    size), used to offer a coarser shift grid when a full one would take long."""
    def measure() -> float:
        xb = x.expand(batch, *x.shape[1:])
        with torch.inference_mode():
            loaded.model(xb)  # warm-up (allocations, lazy init); batched, as the sweep runs
            t0 = time.perf_counter()
            loaded.model(xb)
            if xb.is_cuda:
                torch.cuda.synchronize()
        return (time.perf_counter() - t0) / batch

    return derived_store().get_or_compute(("forward_seconds", loaded.spec, tuple(x.shape)), measure)


def cached(key: Tuple, compute: Callable[[], Any]) -> Any:
    """A small derived result, computed once per key (``derived_store().get_or_compute``)."""
    return derived_store().get_or_compute(key, compute)
