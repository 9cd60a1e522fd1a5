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

import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional, Tuple

import streamlit as st
import torch

from equishift.device import default_device
from equishift.zoo import LoadedModel, load_model

__all__ = ["get_model", "store", "derived_store", "cached", "Store", "device_label", "forward_seconds"]


@st.cache_resource(max_entries=6, show_spinner=False)
def get_model(spec: str) -> LoadedModel:
    """The model a spec names, on the default device (cuda when available). Shared by all sessions."""
    return load_model(spec)


class Store:
    """A thread-safe LRU of computed results shared by all sessions; values are treated as read-only.

    ``get_or_compute`` holds a per-key lock while computing, so two sessions asking for the same sweep at
    once compute it once; different keys compute in parallel."""

    def __init__(self, max_entries: int = 24):
        self.max_entries = max_entries
        self._data: "OrderedDict[Hashable, Any]" = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict = {}

    def get(self, key: Hashable) -> Optional[Any]:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        return None

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        hit = self.get(key)
        if hit is not None:
            return hit
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            hit = self.get(key)
            if hit is not None:
                return hit
            value = compute()
            with self._lock:
                self._data[key] = value
                self._data.move_to_end(key)
                while len(self._data) > self.max_entries:
                    old, _ = self._data.popitem(last=False)
                    self._key_locks.pop(old, None)
            return value


@st.cache_resource(show_spinner=False)
def store() -> Store:
    """The process-wide store of sweeps (one per server, shared by sessions): the big, slow results."""
    return Store(max_entries=12)


@st.cache_resource(show_spinner=False)
def derived_store() -> Store:
    """Small results derived from sweeps and images (inputs, thumbnails, summaries, attribution maps at
    one shift, timing probes), kept apart so that many of them never push a sweep out."""
    return Store(max_entries=512)


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
