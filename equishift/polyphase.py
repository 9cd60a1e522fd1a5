"""Adaptive polyphase anchoring (Ding et al. 2023, "Reviving Shift Equivariance in Vision Transformers").

For a map ``x`` of shape (B, C, H, W) and a period ``s`` the s² polyphase components are
``x[:, :, a::s, b::s]``. The *anchor* is the (a, b) whose component has the largest l2 norm over all
channels and positions; ``anchor`` rolls ``x`` by minus that index so that every later operator that is
equivariant to shifts by multiples of ``s`` becomes equivariant to all integer circular shifts.

Near-ties. The choice is an argmax over s² numbers computed from features, and features computed for a
shifted input are not an exact permutation of the unshifted ones on every CPU (matrix kernels round
differently for different row positions, batch sizes and vector widths). Two phases whose norms differ
by less than that rounding can swap places under a shift. So phases within a relative tolerance
``tie_tol`` of the largest norm (``TIE_TOL``, per dtype) count as tied, and among them the largest
fourth-power sum ``sum x⁴`` wins: a second, shift-consistent key that is not flattened by a LayerNorm
(after a default LayerNorm every token has the same l2 norm, so every phase ties on the l2 key). Outside
near-ties this is the paper's rule (largest l2 norm). ``tie_tol=0`` gives the plain argmax. Remaining
exact ties go to the first index in row-major order (``a * s + b``), so a constant image anchors at
(0, 0). docs/anchoring.md ("Near-ties") has the measurements behind the tolerances.
"""
from __future__ import annotations

import contextvars
import functools
import threading
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TIE_TOL", "polyphase_norms", "polyphase_margin", "select_anchor", "anchor", "roll_batch",
           "PolyphaseAnchor", "record_anchors", "AnchorRecord"]

# Relative tie tolerance per dtype of the map being anchored: phases whose squared norm is within
# ``tie_tol * max`` of the largest are decided by the second key. float32: above the margins that
# LayerNorm's eps leaves between phases of an untrained model (1e-7 to 1e-5; 1e-5 still flipped), and
# several hundred times the run-to-run rounding of phase sums across CPU kernels (<= ~2e-7); trained
# models rarely come that close (bench/near_ties.py). Half precision: about the rounding of a LayerNorm
# output summed over a phase (eps / sqrt(C * N)); larger values would overrule the l2 rule on many
# trained choices (bfloat16: 30-50% of them have margins below 1e-2). docs/anchoring.md, "Near-ties".
TIE_TOL: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 1e-3,
    torch.float16: 2e-4,
}


def _checked_tol(tie_tol) -> float:
    tol = float(tie_tol)
    if not 0.0 <= tol < 1.0:
        raise ValueError(f"tie_tol must be in [0, 1), got {tie_tol!r}")
    return tol


def tie_tolerance(dtype: torch.dtype) -> float:
    """The default relative tie tolerance for maps of ``dtype`` (float32's for other dtypes)."""
    return TIE_TOL.get(dtype, TIE_TOL[torch.float32])


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


# Pixels per image (H * W) from which a per-channel chain beats (x * x).sum(1) on NCHW maps. Per image, not
# per batch: the sweep's reference (one image) and its chunks must take the same path, or their energies
# differ in the last bit.
_CHAIN_MIN = 2 ** 11


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
    b, c, h, w = x.shape
    if x.is_contiguous() and h * w >= _CHAIN_MIN and c > 4:
        # A wide NCHW map (a CNN stem): the same chain. x * x would be a fresh map-sized buffer, and on a
        # CPU the page faults of fresh memory cost more than the arithmetic (10x here at 32x64x112x112).
        e = x[:, 0] * x[:, 0]
        for k in range(1, c):
            e.addcmul_(x[:, k], x[:, k])
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


def _quartic_sums(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, stride, stride) sums of x⁴ over each polyphase component, in float64 (float32 on MPS).

    The tie-break key: per pixel, sum_c x⁴ is reduced in the same order wherever the pixel sits (a shift
    only permutes the pixels), and unlike sum_c x² it is not constant after a LayerNorm."""
    b, c, h, w = x.shape
    # In float64 (float32 on MPS): x⁴ of float32 values overflows above ~4e9 and underflows below ~1e-10,
    # and equal (inf or 0) keys would hand the choice to the row-major order, which does not follow a shift.
    acc = torch.float32 if x.device.type == "mps" else torch.float64
    q = x.to(acc).pow(4).sum(dim=1)
    rows = q.reshape(b, h // stride, stride, w).sum(dim=1)
    return rows.reshape(b, stride, w // stride, stride).sum(dim=2)


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


def _tracing() -> bool:
    """Inside torch.compile, make_fx (a proxy mode) or a fake mode: no data-dependent host checks."""
    if torch.compiler.is_compiling() or _fake_mode_active() or torch.jit.is_tracing():
        return True
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None
    except (AttributeError, RuntimeError):
        return False


def constant_cache(maxsize: int):
    """Memoise a function that builds constant index tensors (never written to by their users).

    A plain dict lookup on a hit (these run several times per forward pass). A miss builds the value
    outside inference mode: a table first made inside a sweep (inference mode) must still be usable by
    autograd later (an attribution), which refuses inference tensors. While anything traces
    (torch.compile, make_fx, fake tensors), the function runs as it is, so compiled graphs fold the
    constants in. At most ``maxsize`` entries (the
    oldest go first); safe to call from several threads."""
    def wrap(fn):
        cache: Dict[tuple, object] = {}
        lock = threading.Lock()

        @functools.wraps(fn)
        def call(*args):
            if _tracing():  # compile, make_fx, jit or fake tensors: the same graph whether cached or not
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
# Above this (elements per image of a contiguous NCHW map, on a CPU, no autograd) the roll is block copies
# (_roll_blocks): a layout change plus a gather would be two fresh map-sized buffers.
_BLOCKS_MIN = 2 ** 15


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


def _margin(sums: torch.Tensor) -> torch.Tensor:
    """(B,) relative gap between the largest and second-largest phase sums, (S1 - S2) / S1, in [0, 1]
    (0 for an all-zero map, 1 when only one phase carries energy or there is only one phase)."""
    if sums.shape[1] < 2:
        return torch.ones(sums.shape[0], dtype=sums.dtype, device=sums.device)
    top = sums.topk(2, dim=1).values
    return torch.where(top[:, 0] > 0, (top[:, 0] - top[:, 1]) / top[:, 0], torch.zeros_like(top[:, 0]))


def _decide(x: torch.Tensor, sums: torch.Tensor, stride: int, tie_tol: float) -> torch.Tensor:
    """Flat anchor index per image from the (B, s²) phase sums: the largest, or among the phases within
    ``tie_tol`` (relative) of the largest, the one with the largest sum of x⁴."""
    if tie_tol <= 0 or sums.shape[1] == 1:
        return sums.argmax(dim=1)
    if _tracing():
        # torch.compile / make_fx see one opaque op: no graph break, and no generated code for the
        # data-dependent choice (inductor's vectorised CPU argmax over a masked float64 key produced
        # out-of-range indices, wrong choices or failed to build, depending on the CPU's kernels).
        return near_tie_choice(x, sums, stride, tie_tol)
    return _decide_eagerly(x, sums, stride, tie_tol)


def _decide_eagerly(x: torch.Tensor, sums: torch.Tensor, stride: int, tie_tol: float) -> torch.Tensor:
    if x.device.type != "cpu":  # no host sync on accelerators: the key for every image
        return _by_second_key(x, sums, stride, tie_tol)
    # On the CPU, look first, and compute the second key only for the images that have a near-tie
    # (usually none; one tied image must not cost a pass over the whole batch). (The same check in
    # numpy is faster alone but measured 4-8% slower inside a 32-px Twins forward.)
    top2, order = sums.topk(2, dim=1)
    tied = top2[:, 1] >= top2[:, 0] * (1.0 - tie_tol)
    flat = order[:, 0].contiguous()  # the unique maximum wherever nothing is tied (exact ties count as tied)
    if bool(tied.any()):
        rows = tied.nonzero().flatten()
        flat[rows] = _by_second_key(x.index_select(0, rows), sums.index_select(0, rows), stride, tie_tol)
    return flat


@torch.library.custom_op("equishift::near_tie_choice", mutates_args=())
def near_tie_choice(x: torch.Tensor, sums: torch.Tensor, stride: int, tie_tol: float) -> torch.Tensor:
    """The anchor choice with the near-tie rule, as one operator for compilers (see ``_decide``)."""
    return _decide_eagerly(x, sums, stride, tie_tol)


@near_tie_choice.register_fake
def _(x: torch.Tensor, sums: torch.Tensor, stride: int, tie_tol: float) -> torch.Tensor:
    return sums.new_empty((sums.shape[0],), dtype=torch.long)


def _by_second_key(x: torch.Tensor, sums: torch.Tensor, stride: int, tie_tol: float) -> torch.Tensor:
    """Among the phases within ``tie_tol`` of each image's largest sum, the first with the largest x⁴."""
    near = sums >= sums.amax(dim=1, keepdim=True) * (1.0 - tie_tol)
    key = _quartic_sums(x, stride).flatten(1)
    return key.masked_fill(~near, -1.0).argmax(dim=1)  # every key is >= 0


def _select(x: torch.Tensor, stride: int, tie_tol: Optional[float] = None,
            with_margin: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(flat anchor index a * stride + b per image (LongTensor[B]), relative top-2 margin or None);
    no autograd graph. ``tie_tol`` None: the default for the dtype of ``x``."""
    tol = tie_tolerance(x.dtype) if tie_tol is None else _checked_tol(tie_tol)
    if torch.is_grad_enabled():
        with torch.no_grad():
            return _select(x, stride, tol, with_margin)
    sums = _phase_sums(x, stride).flatten(1)
    return _decide(x, sums, stride, tol), (_margin(sums).to(_score_dtype(x)) if with_margin else None)


def select_anchor(x: torch.Tensor, stride: int, tie_tol: Optional[float] = None) -> torch.Tensor:
    """(row, col) phase of the largest-norm polyphase component per image: LongTensor[B, 2].

    Phases within ``tie_tol`` (relative; default ``TIE_TOL[x.dtype]``) of the largest norm are tied and
    decided by the largest sum of x⁴; ``tie_tol=0`` is the plain argmax. Exact ties resolve to the first
    index in row-major order (a * stride + b)."""
    flat, _ = _select(x, stride, tie_tol)
    return _tables(1, 1, stride, flat.device)[0].index_select(0, flat)


def polyphase_margin(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Relative gap between the two largest polyphase squared norms per image, (S1 - S2) / S1: float
    tensor [B] in [0, 1]. Below ``TIE_TOL[x.dtype]`` the anchor is a near-tie, decided by the x⁴ key."""
    return _margin(_phase_sums(x, stride).flatten(1)).to(_score_dtype(x))


def _score_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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


def wrapped_runs(start: int, length: int, n: int) -> List[Tuple[int, int, int]]:
    """The indices start, ..., start + length - 1 taken modulo n, as contiguous runs (out offset, source
    start, run length): a circular roll or circular padding along one axis as a few slice copies."""
    runs, i = [], 0
    while i < length:
        src = (start + i) % n
        step = min(length - i, n - src)
        runs.append((i, src, step))
        i += step
    return runs


def _roll_blocks(x: torch.Tensor, flat: torch.Tensor, stride: int,
                 pad: Tuple[int, int, int, int] = (0, 0, 0, 0)) -> torch.Tensor:
    """``x`` rolled by minus each image's phase and then padded circularly by ``pad`` (left, right, top,
    bottom), written in one pass as at most 9 block copies per image: for big maps, where a fresh buffer
    per step (a layout change, a gather, a padded copy) costs more in page faults than the copying itself.
    Maps of more than 4 channels come back channels-last. Not used under autograd."""
    b, c, h, w = x.shape
    left, right, top, bottom = pad
    # Channels-last for feature maps (as the gather path): the layout the conv after the anchor is fastest
    # on (measured: ResNet-18 at 224 px, anchored ÷ baseline 1.06 this way, 1.23 keeping NCHW).
    last = c > 4 or x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if last else torch.contiguous_format
    out = torch.empty((b, c, h + top + bottom, w + left + right), dtype=x.dtype, device=x.device,
                      memory_format=fmt)
    for i, f in enumerate(flat.tolist()):
        a, col = divmod(f, stride)
        for (ro, rs, rl) in wrapped_runs(a - top, h + top + bottom, h):
            for (co, cs, cl) in wrapped_runs(col - left, w + left + right, w):
                out[i, :, ro:ro + rl, co:co + cl].copy_(x[i, :, rs:rs + rl, cs:cs + cl])
    return out


def anchor(x: torch.Tensor, stride: int, tie_tol: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll ``x`` by minus its anchor. Returns ``(rolled_x, index)`` with index LongTensor[B, 2].

    The roll is never undone: the network continues in the anchored frame. Gradients flow through
    the roll (the index itself is a discrete choice and carries none). The values never depend on the
    layout, but a contiguous map of more than 4 channels may come back channels-last (the fast layout
    for the roll and for the conv after it). ``tie_tol``: as in ``select_anchor``."""
    flat, _ = _select(x, stride, tie_tol)
    idx = _tables(1, 1, stride, flat.device)[0].index_select(0, flat)
    return _roll_to_anchor(x, flat, stride), idx


def _roll_to_anchor(x: torch.Tensor, flat: torch.Tensor, stride: int) -> torch.Tensor:
    """``x`` rolled by minus the phase whose flat index (a * stride + b) is ``flat``, per image."""
    if stride == 1:
        return x
    b, c, h, w = x.shape
    # rolling by -(a, b): output pixel (i, j) reads input pixel ((i + a) % H, (j + b) % W)
    if c * h * w > _BLOCKS_MIN and x.is_contiguous() and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
        return _roll_blocks(x, flat, stride)  # decided per image: one image and a batch get the same layout
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


class AnchorRecord(Dict[str, torch.Tensor]):
    """What ``record_anchors`` yields: a dict module name -> LongTensor[B, 2] of selected (row, col)
    phases, and ``margins``: module name -> float tensor [B], the relative top-2 margin of each choice
    (see ``polyphase_margin``; a margin below ``tie_tol`` means the x⁴ key decided)."""

    def __init__(self):
        super().__init__()
        self.margins: Dict[str, torch.Tensor] = {}
        self.tie_tol: Dict[str, float] = {}


class _Recorder:
    def __init__(self, names: Dict[int, str]):
        self.names = names
        self.records = AnchorRecord()

    def wants(self, module: nn.Module) -> bool:
        return id(module) in self.names  # not an anchor of another model run inside the same context

    def add(self, module: nn.Module, index: torch.Tensor, margin: torch.Tensor, tie_tol: float) -> None:
        name = self.names[id(module)]
        # Several forward passes inside one context (e.g. a chunked sweep) concatenate along the batch.
        for store, value in ((self.records, index), (self.records.margins, margin)):
            value = value.detach().cpu()
            prev = store.get(name)
            store[name] = value if prev is None else torch.cat((prev, value))
        self.records.tie_tol[name] = tie_tol


class PolyphaseAnchor(nn.Module):
    """Anchors a (B, C, H, W) map with period ``stride``; records its choice inside ``record_anchors``.

    ``tie_tol``: relative near-tie tolerance (None: ``TIE_TOL`` for the map's dtype; 0: plain argmax)."""

    def __init__(self, stride: int, tie_tol: Optional[float] = None):
        super().__init__()
        self.stride = int(stride)
        self.tie_tol = None if tie_tol is None else _checked_tol(tie_tol)

    def forward(self, x: torch.Tensor, pad: Optional[Tuple[int, int, int, int]] = None) -> torch.Tensor:
        """The anchored map; with ``pad`` (left, right, top, bottom), the anchored map circularly padded
        (one copy instead of two, for a circular conv or pooling right after the anchor; forward hooks on
        the anchor then see the padded map)."""
        rec = _RECORDER.get()
        recording = rec is not None and rec.wants(self)
        tol = tie_tolerance(x.dtype) if self.tie_tol is None else self.tie_tol
        flat, margin = _select(x, self.stride, tol, with_margin=recording)
        if recording:  # (row, col) and the margin only when someone records them
            rec.add(self, _tables(1, 1, self.stride, flat.device)[0].index_select(0, flat), margin, tol)
        if pad is not None:
            if x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
                return _roll_blocks(x, flat, self.stride, tuple(pad))
            return F.pad(_roll_to_anchor(x, flat, self.stride), tuple(pad), mode="circular")
        return _roll_to_anchor(x, flat, self.stride)

    def extra_repr(self) -> str:
        return f"stride={self.stride}" + ("" if self.tie_tol is None else f", tie_tol={self.tie_tol:g}")


@contextmanager
def record_anchors(model: nn.Module) -> Iterator[AnchorRecord]:
    """Record, per anchored module name, the LongTensor[B, 2] each forward pass selects, and in
    ``.margins`` the relative top-2 margin of each choice (how close it came to a tie).

    >>> with record_anchors(model) as anchors:
    ...     model(x)
    >>> anchors["patch_embed.anchor"]  # (B, 2) row/col phase
    >>> anchors.margins["patch_embed.anchor"]  # (B,) (S1 - S2) / S1

    The dict is filled as the forward pass runs. Thread-safe: the recorder is context-local."""
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, PolyphaseAnchor)}
    rec = _Recorder(names)
    token = _RECORDER.set(rec)
    try:
        yield rec.records
    finally:
        _RECORDER.reset(token)
