"""Adaptive polyphase anchoring (Ding et al. 2023, "Reviving Shift Equivariance in Vision Transformers").

For a map ``x`` of shape (B, C, H, W) and a period ``s`` the s² polyphase components are
``x[:, :, a::s, b::s]``. The *anchor* is the (a, b) whose component has the largest l2 norm over all
channels and positions; ``anchor`` rolls ``x`` by minus that index so that every later operator that is
equivariant to shifts by multiples of ``s`` becomes equivariant to all integer circular shifts.

Ties go to the first index in row-major order (``a * s + b``): ``torch.argmax`` returns the first
maximal entry, and the scores are laid out row-major. A constant image therefore anchors at (0, 0).
"""
from __future__ import annotations

import contextvars
import functools
import threading
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

__all__ = ["polyphase_norms", "select_anchor", "anchor", "roll_batch", "PolyphaseAnchor", "record_anchors"]


def _check(x: torch.Tensor, stride: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    h, w = x.shape[-2:]
    if h % stride or w % stride:
        raise ValueError(
            f"polyphase anchoring needs H and W divisible by the stride: got H={h}, W={w}, stride={stride}"
        )


def _energy(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) per-pixel energy sum_c x[:, c]², in float32 (float64 for float64 input).

    Each pixel's channels are reduced in the same order wherever the pixel sits, so a shifted map has
    exactly the same per-pixel energies, only permuted."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # fp16/bf16 would overflow or tie
    if 0 < x.shape[1] <= 4 and x.is_contiguous():
        # An image (few channels, NCHW): a chain of fused multiply-adds beats a strided reduction.
        # In place: one buffer instead of one per channel (fewer passes over fresh memory).
        e = x[:, 0] * x[:, 0]
        for c in range(1, x.shape[1]):
            e.addcmul_(x[:, c], x[:, c])
        return e
    if x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last):
        # A token grid: each pixel's channels are contiguous, and the fused norm kernel reads x once
        # (x * x would write and re-read a copy of it). Squaring the rounded norm is per-pixel
        # deterministic too, which is all the shift property needs.
        return torch.linalg.vector_norm(x, dim=1).square()
    return (x * x).sum(dim=1)


def _phase_sums(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, stride, stride) squared l2 norms of the polyphase components, as float64 (float32 on MPS)."""
    _check(x, stride)
    b, c, h, w = x.shape
    energy = _energy(x)
    # Phase sums in float64: a shift only reorders these sums, and float64 keeps the reordering error
    # (~1e-16) far below real differences between phases, so near-ties (e.g. right after a LayerNorm) do
    # not flip with the shift as they do with float32 sums. (MPS has no float64: float32 there.)
    # Two reductions, each over a whole dimension (fast kernels): rows of one phase, then columns.
    acc = torch.float32 if energy.device.type == "mps" else torch.float64
    rows = energy.reshape(b, h // stride, stride, w).sum(dim=1, dtype=acc)  # (B, s, W): row phase a
    return rows.reshape(b, stride, w // stride, stride).sum(dim=2)           # (B, s, s): phase (a, b)


def polyphase_norms(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Squared l2 norm of each polyphase component, shape (B, stride, stride), returned in float32
    (float64 for float64 input); half-precision input is scored in float32, so it does not tie or overflow."""
    sums = _phase_sums(x, stride)
    return sums if x.dtype == torch.float64 else sums.float()


def _fake_mode_active() -> bool:
    """Inside a FakeTensorMode (shape/FLOP estimation tools): its tensors must never be cached, and real
    cached ones must not be handed to it."""
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    except (AttributeError, RuntimeError):  # a torch without this hook: no fake mode to worry about
        return False


def constant_cache(maxsize: int):
    """Memoise a function that builds constant index tensors (never written to by their users).

    A plain dict lookup on a hit (these run several times per forward pass). A miss builds the value
    outside inference mode: a table first made inside a sweep (inference mode) must still be usable by
    autograd later (an attribution), which refuses inference tensors. While ``torch.compile`` traces, the
    function runs as it is, so compiled graphs fold the constants in. At most ``maxsize`` entries (the
    oldest go first); safe to call from several threads."""
    def wrap(fn):
        cache: Dict[tuple, object] = {}
        lock = threading.Lock()

        @functools.wraps(fn)
        def call(*args):
            if torch.compiler.is_compiling() or _fake_mode_active():
                return fn(*args)
            hit = cache.get(args)
            if hit is not None:
                return hit
            with torch.inference_mode(False):
                value = fn(*args)
            with lock:
                while len(cache) >= maxsize:
                    cache.pop(next(iter(cache)))
                return cache.setdefault(args, value)

        call.cache_clear = cache.clear
        return call
    return wrap


# Index tables: constants (never written to), cached so that an anchor costs a handful of kernels
# instead of a dozen small index computations (on the tiny token grids of a 32-px model, kernel launches,
# not arithmetic, are what an anchor costs).
_FULL_TABLE_MAX = 2 ** 18  # entries (2 MB of int64): above this, rows and columns are looked up separately
# _roll_rows copies the map once more (the padded rows): worth it while that copy stays in the cache;
# for big maps (a batch of 224-px images) the extra pass over memory costs more than the gather saves.
_ROWS_MAX = 2 ** 20


@constant_cache(maxsize=64)
def _tables(h: int, w: int, stride: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """For maps of size (h, w) and period ``stride``: ``phase`` (s², 2), flat phase -> (row, col);
    ``rows`` (s, h), for anchor row a the flat offset (row * w) of the source row of each output row
    after rolling by -a; ``cols`` (s, w), the same for columns; ``src`` (s², h*w), the flat source pixel
    of every output pixel for each flat phase (None when it would exceed _FULL_TABLE_MAX entries)."""
    a = torch.arange(stride, device=device)
    phase = torch.stack(torch.meshgrid(a, a, indexing="ij"), dim=-1).reshape(stride * stride, 2)
    rows = (torch.arange(h, device=device) + a[:, None]) % h * w
    cols = (torch.arange(w, device=device) + a[:, None]) % w
    src = None
    if stride * stride * h * w <= _FULL_TABLE_MAX:
        src = (rows[:, None, :, None] + cols[None, :, None, :]).reshape(stride * stride, h * w)
    return phase, rows, cols, src


@constant_cache(maxsize=256)
def _window_starts(h: int, w: int, stride: int, device: torch.device) -> torch.Tensor:
    """(s², h): for each flat phase (a, b), where output row i starts in a (h, w + s - 1) map whose
    rows carry their first s - 1 pixels again at the end: row (i + a) % h, column b."""
    a = torch.arange(stride, device=device)
    starts = ((torch.arange(h, device=device) + a[:, None]) % h * (w + stride - 1))[:, None, :] + a[None, :, None]
    return starts.reshape(stride * stride, h)


@constant_cache(maxsize=64)
def _batch_offsets(b: int, hw: int, device: torch.device) -> torch.Tensor:
    """(B, 1): the flat offset of each image's first pixel in a (B*H*W, C) view."""
    return (torch.arange(b, device=device) * hw).unsqueeze(1)


def _select(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Flat anchor index a * stride + b per image (LongTensor[B]); no autograd graph."""
    if not torch.is_grad_enabled():  # a sweep's inference mode: skip the context switch
        return _phase_sums(x, stride).flatten(1).argmax(dim=1)
    with torch.no_grad():
        return _phase_sums(x, stride).flatten(1).argmax(dim=1)


def select_anchor(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(row, col) phase of the largest-norm polyphase component per image: LongTensor[B, 2].

    Ties resolve to the first index in row-major order (a * stride + b)."""
    flat = _select(x, stride)
    return _tables(1, 1, stride, flat.device)[0].index_select(0, flat)


def _gather_pixels(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """out[b, :, p] = x[b, :, src[b, p]] for (B, C, H, W) ``x`` and flat source pixels ``src`` (B, H*W)."""
    b, c, h, w = x.shape
    if c > 1 and x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last):
        # A token grid ((B, N, C) tokens viewed as (B, C, H, W)): move whole C-vectors with index_select,
        # a contiguous copy per pixel and ~10x faster than an element-wise gather on this layout.
        src = src + _batch_offsets(b, h * w, x.device)
        out = x.permute(0, 2, 3, 1).reshape(b * h * w, c).index_select(0, src.reshape(-1))
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2)
    flat = x.reshape(b, c, h * w)
    return flat.gather(2, src.unsqueeze(1).expand(b, c, h * w)).reshape(b, c, h, w)


def roll_batch(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Roll each image of ``x`` (B, C, H, W) circularly by its own (dy, dx) in ``shifts`` (B, 2).

    One indexed copy with per-sample indices: no Python loop over the batch, differentiable in ``x``.
    The output keeps the memory format of ``x``."""
    b, c, h, w = x.shape
    shifts = shifts.to(device=x.device, dtype=torch.long)
    rows = (torch.arange(h, device=x.device).unsqueeze(0) - shifts[:, :1]) % h  # (B, H)
    cols = (torch.arange(w, device=x.device).unsqueeze(0) - shifts[:, 1:]) % w  # (B, W)
    return _gather_pixels(x, (rows[:, :, None] * w + cols[:, None, :]).reshape(b, h * w))


def _roll_rows(x: torch.Tensor, flat: torch.Tensor, stride: int) -> torch.Tensor:
    """The anchor roll of a contiguous NCHW map (an image) without gradients, as whole-row copies.

    Each row gets its first s - 1 pixels appended; every output row is then a window of W consecutive
    values of that buffer, so one index_select of W-long windows (an overlapping ``unfold`` view) does
    the 2-D roll, reading one start per row instead of one index per pixel (1.5x faster than a gather
    on a batch of 32-px images; slower for rows shorter than ~16 values, which go to the gather).
    (Laying each row twice side by side is a faster concatenation on its own, but inside a forward pass,
    where the buffer is fresh memory, writing 2W instead of W + s - 1 values per row costs more.)
    Not used under autograd: the backward of overlapping windows is slow."""
    b, c, h, w = x.shape
    padded = torch.cat((x, x[..., :stride - 1]), dim=-1)  # (B, C, H, W + s - 1), contiguous
    starts = _window_starts(h, w, stride, x.device).index_select(0, flat).unsqueeze(1)  # (B, 1, H)
    starts = starts + _batch_offsets(b * c, h * (w + stride - 1), x.device).view(b, c, 1)
    return padded.reshape(-1).unfold(0, w, 1).index_select(0, starts.reshape(-1)).reshape(b, c, h, w)


def anchor(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll ``x`` by minus its anchor. Returns ``(rolled_x, index)`` with index LongTensor[B, 2].

    The roll is never undone: the network continues in the anchored frame. Gradients flow through
    the roll (the index itself is a discrete choice and carries none). The values never depend on the
    layout, but a contiguous map of more than 4 channels may come back channels-last (the fast layout
    for the roll and for the conv after it)."""
    flat = _select(x, stride)
    idx = _tables(1, 1, stride, flat.device)[0].index_select(0, flat)
    return _roll_to_anchor(x, flat, stride), idx


def _roll_to_anchor(x: torch.Tensor, flat: torch.Tensor, stride: int) -> torch.Tensor:
    """``x`` rolled by minus the phase whose flat index (a * stride + b) is ``flat``, per image."""
    if stride == 1:
        return x
    b, c, h, w = x.shape
    # rolling by -(a, b): output pixel (i, j) reads input pixel ((i + a) % H, (j + b) % W)
    if w >= 16 and 0 < x.numel() <= _ROWS_MAX and x.is_contiguous() and not (x.requires_grad and torch.is_grad_enabled()):
        return _roll_rows(x, flat, stride)
    if c > 4 and x.is_contiguous() and x.numel() > 0:
        # A contiguous NCHW feature map (Twins hands the next stage's patch embed one): an element-wise
        # gather over (B, C, H*W) costs ~7 copies of the map; going channels-last (one transposing copy)
        # and moving whole C-vectors costs ~2, and the strided conv after it then emits its tokens
        # contiguously. The result is channels-last; its values are the same.
        x = x.contiguous(memory_format=torch.channels_last)
    phase, rows, cols, table = _tables(h, w, stride, x.device)
    if table is not None:
        src = table.index_select(0, flat)
    else:
        idx = phase.index_select(0, flat)
        src = rows.index_select(0, idx[:, 0]).unsqueeze(2) + cols.index_select(0, idx[:, 1]).unsqueeze(1)
    return _gather_pixels(x, src.reshape(b, h * w))


# --- recording -------------------------------------------------------------------------------------
# The active recorder lives in a ContextVar: every thread (and asyncio task) sees its own value, so two
# sessions running the same cached model at once never see each other's anchors.
_RECORDER: contextvars.ContextVar[Optional["_Recorder"]] = contextvars.ContextVar(
    "equishift_anchor_recorder", default=None
)


class _Recorder:
    def __init__(self, names: Dict[int, str]):
        self.names = names
        self.records: Dict[str, torch.Tensor] = {}

    def add(self, module: nn.Module, index: torch.Tensor) -> None:
        name = self.names.get(id(module))
        if name is None:  # an anchor of another model run inside the same context
            return
        prev = self.records.get(name)
        index = index.detach().cpu()
        # Several forward passes inside one context (e.g. a chunked sweep) concatenate along the batch.
        self.records[name] = index if prev is None else torch.cat((prev, index))


class PolyphaseAnchor(nn.Module):
    """Anchors a (B, C, H, W) map with period ``stride``; records its choice inside ``record_anchors``."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _select(x, self.stride)
        rec = _RECORDER.get()
        if rec is not None:  # (row, col) only when someone records it
            rec.add(self, _tables(1, 1, self.stride, flat.device)[0].index_select(0, flat))
        return _roll_to_anchor(x, flat, self.stride)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


@contextmanager
def record_anchors(model: nn.Module) -> Iterator[Dict[str, torch.Tensor]]:
    """Record, per anchored module name, the LongTensor[B, 2] each forward pass selects.

    >>> with record_anchors(model) as anchors:
    ...     model(x)
    >>> anchors["patch_embed.anchor"]  # (B, 2) row/col phase

    The dict is filled as the forward pass runs. Thread-safe: the recorder is context-local."""
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, PolyphaseAnchor)}
    rec = _Recorder(names)
    token = _RECORDER.set(rec)
    try:
        yield rec.records
    finally:
        _RECORDER.reset(token)
