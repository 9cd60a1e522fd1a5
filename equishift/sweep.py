"""Orbit sweep: push every shift of one image through a model and record what happens inside.

>>> from equishift import sweep
>>> from equishift.shifts import grid
>>> res = sweep(model, x, grid(range(32), range(32)), mode="circular")
>>> res.probs.shape, res.attention["blocks.3"].shape, res.layer_error["blocks.3"].shape

What is recorded (``record`` picks a subset; K = number of shifts)
- ``logits``  [K, classes] float32 (``.probs``, ``.pred``).
- ``anchors`` {module name: LongTensor[K, 2]}: the (row, col) phase each ``PolyphaseAnchor`` selected
  (via ``equishift.record_anchors``). Empty for unanchored models.
- ``margins`` {module name: float32 [K]}: each choice's relative top-2 margin (S1 - S2) / S1 of the
  polyphase squared norms; below ``meta["anchor_tie_tol"][name]`` it was a near-tie, decided by the
  second key (docs/anchoring.md, "Near-ties"). ``ref_margins``: the same for the unshifted image.
- ``attention`` {layer: float16 [K, heads, h, w]} on the layer's own map grid; the layers, and the kind of
  map each gives, come from the model's family (``equishift.archs.layers_of``):
    * ``kind='cls'`` (ViT with a CLS token): the CLS → patch-token row of every head;
      ``'received'`` (ViT without CLS): the mean attention each patch token *receives*, averaged over
      patch queries; plus ``attention['rollout']`` [K, 1, h, w]: attention rollout (Abnar & Zuidema
      2020) of the head-mean maps with the residual as 0.5·A + 0.5·I, rows renormalised, read out as the
      CLS row (or the mean patch row) over patch tokens.
    * ``'window'`` (Twins LSA, Swin / Swin-V2 W-MSA and SW-MSA): per window the attention each key
      receives, averaged over the window's queries, the windows put back in place on the full token grid
      (shifted windows rolled back by the block's cyclic shift).
    * ``'query'`` (Twins GSA, PVT-v2 spatial-reduction attention): the attention row of ONE query token
      over the (sub-sampled) key grid. The query follows the content: ``query`` is a pixel of the
      unshifted image (default its centre); for each shift the query is that pixel's token moved by the
      layer's token shift (below).
    CNN families have layers but no attention (``meta["not_recorded"]`` says so).
- ``layer_error`` {layer: float32 [K]}: the feature equivariance error of each layer's output
  (metrics.md): ``||F(T x) − roll(F(x), t)|| / ||F(x)||`` over its map (a block's patch tokens, CLS/prefix
  tokens excluded; a CNN stage's feature map), where ``t`` is the layer's *token shift* for that input.
- ``offset`` {layer: float32 [K, 2]}: where the content of the unshifted image sits at that layer, in
  input pixels, relative to the unshifted run. It starts at the shift (dy, dx) and every anchor
  upstream subtracts its selected phase times its map stride (the anchored frame is never undone).
  The token shift is ``t = round(offset / layer_stride)`` (round half to even). For a baseline and a
  shift that is a multiple of the layer's stride this is exactly δ/s (metrics.md); for an anchored layer
  it is the re-alignment "by the recorded anchors"; otherwise (baseline, off-grid shift) it is the
  nearest token shift and the error includes the sub-token misalignment — which is the point.
  ``SweepResult.aligned_attention`` uses the same offsets to undo the shift on the attention maps.

The reference (unshifted: shift (0, 0) in the same mode) is always run too: ``ref_logits``,
``ref_attention``, ``ref_anchors``, ``ref_margins``.

Concurrency: the sweep never touches the model it is given. It runs on a *working copy* that shares
every parameter and buffer with the model (a structural deep copy: module objects are new, weight tensors
are the same objects, so it costs no weight memory). Only the copy gets ``fused_attn = False`` (fused
attention hides the maps from ``timm.utils.AttentionExtract``) and the recording hooks; it is dropped at
the end. Several sessions can therefore sweep one cached model at the same time, and plain forward passes
on it are never slowed or observed.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .errors import EquishiftError, LimitError
from .polyphase import PolyphaseAnchor, record_anchors
from .shifts import MODES, ShiftsLike, as_shifts, orbit, shift_batch

__all__ = ["RECORDS", "SweepResult", "sweep", "working_copy", "unfuse_attention", "architecture", "DEFAULT_MEMORY_MB", "MAX_SHIFTS"]

RECORDS = ("logits", "attention", "anchors", "features")
DEFAULT_MEMORY_MB = 1024
MAX_SHIFTS = 65536
# On a CPU the chunk is also sized for the cache: one layer's full attention maps for the chunk should
# stay near _CPU_MAP_BYTES, within [_CPU_CHUNK_MIN, _CPU_CHUNK_MAX]. Measured on the zoo ViT (1024 shifts,
# every record, 2 threads, 1 MB L2 per core): chunks of 64 (2.2 MB of maps per layer) took 268-281 ms,
# 32 → 298-319, 96 → 287-289, 128 → 299-387 (run to run, as the shared L3 allows); the bare forward is
# the same at 64 and 128.
_CPU_MAP_BYTES = 2 * 2 ** 20
_CPU_CHUNK_MIN, _CPU_CHUNK_MAX = 16, 128


# --- result ------------------------------------------------------------------------------------------
def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


@dataclass
class SweepResult:
    """Everything one sweep recorded. Shapes use K = number of shifts; see the module doc."""

    shifts: torch.Tensor                                   # [K, 2] long (float64 for sub-pixel modes)
    logits: Optional[torch.Tensor]                         # [K, classes] float32
    anchors: Dict[str, torch.Tensor] = field(default_factory=dict)      # name -> long [K, 2]
    margins: Dict[str, torch.Tensor] = field(default_factory=dict)      # name -> float32 [K], top-2 margin
    attention: Dict[str, torch.Tensor] = field(default_factory=dict)    # layer -> fp16 [K, heads, h, w]
    layer_error: Dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [K]
    offset: Dict[str, torch.Tensor] = field(default_factory=dict)       # layer -> float32 [K, 2] pixels
    ref_logits: Optional[torch.Tensor] = None              # [classes]
    ref_anchors: Dict[str, torch.Tensor] = field(default_factory=dict)     # name -> long [2]
    ref_margins: Dict[str, torch.Tensor] = field(default_factory=dict)     # name -> float32 []
    ref_attention: Dict[str, torch.Tensor] = field(default_factory=dict)   # layer -> fp16 [heads, h, w]
    meta: Dict[str, Any] = field(default_factory=dict)

    # convenience views ---------------------------------------------------------------------------
    @property
    def probs(self) -> torch.Tensor:
        return self._need_logits().float().softmax(-1)

    @property
    def pred(self) -> torch.Tensor:
        return self._need_logits().argmax(-1)

    @property
    def ref_probs(self) -> torch.Tensor:
        return self._need_logits(ref=True).float().softmax(-1)

    @property
    def ref_pred(self) -> int:
        return int(self._need_logits(ref=True).argmax())

    @property
    def layers(self) -> List[str]:
        """Block names in execution order (keys of ``attention`` / ``layer_error``)."""
        return list(self.meta.get("layers", []))

    @property
    def classes(self) -> Optional[List[str]]:
        return self.meta.get("classes")

    def _need_logits(self, ref: bool = False) -> torch.Tensor:
        t = self.ref_logits if ref else self.logits
        if t is None:
            raise EquishiftError("this sweep did not record logits; run it with 'logits' in record=")
        return t

    def __len__(self) -> int:
        return int(self.shifts.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by this result's tensors (what a cache of sweeps should count)."""
        return _tensor_bytes([self.shifts, self.logits, self.ref_logits, self.anchors, self.margins, self.attention,
                              self.layer_error, self.offset, self.ref_anchors, self.ref_margins, self.ref_attention])

    def index_of(self, dy: float, dx: float) -> int:
        """Row of shift (dy, dx) in this sweep; EquishiftError if it was not swept."""
        hit = ((self.shifts[:, 0] == dy) & (self.shifts[:, 1] == dx)).nonzero()
        if hit.numel() == 0:
            raise EquishiftError(f"shift (dy={dy}, dx={dx}) is not part of this sweep "
                                 f"({describe_shifts(self.shifts)})")
        return int(hit[0, 0])

    def token_shift(self, layer: str, stride: Optional[float] = None) -> torch.Tensor:
        """Integer shift (rows, cols) that moves the unshifted run's map of ``layer`` onto the shifted
        one: ``round(offset / stride)``; ``stride`` defaults to the layer's token stride in pixels."""
        s = self.meta["layer_stride"][layer] if stride is None else stride
        return torch.round(self.offset[layer].double() / s).long()

    def aligned_attention(self, layer: str, index: Optional[int] = None) -> torch.Tensor:
        """``attention[layer]`` with each shifted map rolled back into the unshifted frame (circular),
        so it can be compared with ``ref_attention[layer]`` cell by cell. Exact for anchored layers
        and for shifts that are multiples of the map stride; nearest-cell otherwise. ``index``: only that
        shift's maps ([1, ...]), not the whole sweep's."""
        maps = self.attention[layer]
        src = self.meta["layers"][-1] if layer == "rollout" else layer
        t = self.token_shift(src, self.meta["attention_stride"][layer])
        if index is not None:
            maps, t = maps[int(index):int(index) + 1], t[int(index):int(index) + 1]
        lead = maps.shape
        flat = maps.reshape(lead[0], -1, *lead[-2:])
        return shift_batch(flat.float(), -t, "circular").reshape(lead).to(maps.dtype)

    def to_grid(self, values: torch.Tensor) -> Tuple[List[float], List[float], torch.Tensor]:
        """Lay per-shift ``values`` [K] on the 2-D shift grid: (dys, dxs, Z[len(dys), len(dxs)]), NaN
        where a (dy, dx) pair was not swept; repeated shifts keep their last value."""
        ys, yi = torch.unique(self.shifts[:, 0], return_inverse=True)
        xs, xi = torch.unique(self.shifts[:, 1], return_inverse=True)
        z = torch.full((len(ys), len(xs)), float("nan"), dtype=torch.float64)
        z[yi, xi] = values.double().cpu()
        return ys.tolist(), xs.tolist(), z

    def describe(self) -> str:
        """One line naming the shift mode and range, for figure titles (metrics.md, last line)."""
        return f"{self.meta.get('mode', '?')} shifts, {describe_shifts(self.shifts)}"

    def anchor_margins(self, k: int) -> List[Dict[str, Any]]:
        """One row per anchored module at shift index ``k``: name, stride, the selected (row, col) phase,
        its relative top-2 margin here, the smallest margin over all swept shifts, the tie tolerance, and
        how many swept shifts were near-ties (margin at most the tolerance: decided by the second key).
        A margin close to the tolerance, on either side, is where another CPU's rounding could flip the
        choice; docs/anchoring.md ("Near-ties") explains the bound."""
        rows = []
        strides = self.meta.get("anchor_stride", {})
        tols = self.meta.get("anchor_tie_tol", {})
        for name, idx in self.anchors.items():
            m = self.margins.get(name)
            tol = tols.get(name)
            rows.append({
                "module": name, "stride": strides.get(name), "phase": tuple(int(v) for v in idx[k]),
                "margin": None if m is None else float(m[k]),
                "min_margin": None if m is None else float(m.min()),
                "tie_tol": tol,
                "near_ties": None if m is None or tol is None else int((m <= tol).sum()),
            })
        return rows

    # persistence ----------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write an ``.npz`` (numpy arrays and a JSON string; loads with ``allow_pickle=False``)."""
        arrays: Dict[str, np.ndarray] = {"shifts": self.shifts.numpy(), "meta": np.array(json.dumps(self.meta))}
        if self.logits is not None:
            arrays["logits"] = self.logits.numpy()
            arrays["ref_logits"] = self.ref_logits.numpy()
        for prefix, d in (("anchors", self.anchors), ("margins", self.margins), ("ref_margins", self.ref_margins),
                          ("attention", self.attention),
                          ("layer_error", self.layer_error), ("offset", self.offset),
                          ("ref_anchors", self.ref_anchors), ("ref_attention", self.ref_attention)):
            for k, v in d.items():
                arrays[f"{prefix}/{k}"] = v.numpy()
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path) -> "SweepResult":
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        out = cls(shifts=torch.from_numpy(data.pop("shifts")), logits=None,
                  meta=json.loads(str(data.pop("meta"))))
        if "logits" in data:
            out.logits = torch.from_numpy(data.pop("logits"))
            out.ref_logits = torch.from_numpy(data.pop("ref_logits"))
        for key, arr in data.items():
            prefix, name = key.split("/", 1)
            getattr(out, prefix)[name] = torch.from_numpy(arr)
        return out


def describe_shifts(shifts: torch.Tensor) -> str:
    """'dy∈[a, b], dx∈[c, d] (K shifts)'."""
    s = shifts
    if s.numel() == 0:
        return "no shifts"
    from .formatting import fmt

    return (f"dy∈[{fmt(s[:, 0].min().item(), 'g')}, {fmt(s[:, 0].max().item(), 'g')}], "
            f"dx∈[{fmt(s[:, 1].min().item(), 'g')}, {fmt(s[:, 1].max().item(), 'g')}] ({s.shape[0]} shifts)")


# --- model introspection -------------------------------------------------------------------------
def architecture(model: nn.Module) -> str:
    """The family name of ``model``'s adapter in ``equishift.archs`` ('vit', 'twins', 'swin', 'pvt_v2',
    'resnet', ...), anchored or not; 'other' for a model no adapter knows (logits and anchors only)."""
    from .archs import adapter_for

    found = adapter_for(model)
    return found.name if found is not None and found.layers is not None else "other"


def working_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` sharing every parameter and buffer (no weight memory).

    Flags and hooks set on the copy never reach ``model``; reads of ``model`` stay untouched, so it is
    safe while other threads use ``model``."""
    memo: Dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def unfuse_attention(model: nn.Module) -> nn.Module:
    """Turn timm's fused attention off in every module of ``model`` (in place; use a ``working_copy``),
    so that the softmax maps exist for ``AttentionExtract``. Returns ``model``."""
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    return model


# --- one forward pass worth of hook state ---------------------------------------------------------
class _Pass:
    """What the hooks of one forward pass write (one chunk, or the reference run)."""

    def __init__(self, offset: torch.Tensor, rec: Dict[str, torch.Tensor], is_ref: bool):
        self.offset = offset            # [B, 2] float64 on CPU: running content offset in pixels
        self.rec = rec                  # the AnchorRecord of this pass (record_anchors)
        self.is_ref = is_ref
        self.layer_offset: Dict[str, torch.Tensor] = {}
        self.layer_error: Dict[str, torch.Tensor] = {}
        self.anchors: Dict[str, torch.Tensor] = {}
        self.margins: Dict[str, torch.Tensor] = {}     # relative top-2 margin of each anchor's choice
        self.tie_tol: Dict[str, float] = {}
        self.sizes: Dict[str, Tuple[int, int]] = {}
        self.features: Dict[str, torch.Tensor] = {}   # reference run only
        self.logits: Optional[torch.Tensor] = None
        self.attention: Dict[str, torch.Tensor] = {}
        self.query: Dict[str, Tuple[int, int]] = {}
        self.head_sums: List[Tuple[torch.Tensor, int]] = []  # cls/received layers: (head sum, heads) for the rollout
        self.raw_attention_bytes = 0    # per sample, as captured (before reduction), all layers
        self.max_map_bytes = 0          # per sample, the largest single layer


class _Probe:
    """Hooks on a working copy that track the content offset through the anchors, reduce layer outputs
    to equivariance errors, and reduce attention maps to compact per-layer maps. What the layers are, and
    how their outputs and maps are laid out, comes from the model's adapter (``equishift.archs``)."""

    def __init__(self, model: nn.Module, record: Sequence[str], image_hw: Tuple[int, int],
                 query: Optional[Tuple[int, int]]):
        from .archs import layers_of

        self.model = model
        self.arch = architecture(model)
        self.record = set(record)
        self.hw = image_hw
        self.query_px = query if query is not None else (image_hw[0] // 2, image_hw[1] // 2)
        self.state: Optional[_Pass] = None
        self.ref: Optional[_Pass] = None
        self.specs = {layer.name: layer for layer in layers_of(model)}
        self.layers = list(self.specs)
        attn = [layer for layer in self.specs.values() if layer.attention is not None]
        self.prefix = max((layer.prefix for layer in self.specs.values()), default=0)
        self.has_cls = any(layer.kind == "cls" for layer in attn)
        self.rollout = bool(attn) and all(layer.kind in ("cls", "received") for layer in attn)
        self.anchor_names = [n for n, m in model.named_modules() if isinstance(m, PolyphaseAnchor)]
        self.anchor_stride = {n: m.stride for n, m in model.named_modules() if isinstance(m, PolyphaseAnchor)}
        self.kind: Dict[str, str] = {layer.name: layer.kind for layer in attn}
        self.layer_stride: Dict[str, float] = {}
        self._handles = []
        self.extract = None
        self._install()

    # hooks ------------------------------------------------------------------------------------
    def _install(self) -> None:
        m = self.model
        self._handles.append(m.register_forward_hook(self._on_output))
        names = {id(mod): n for n, mod in m.named_modules()}
        for n, mod in m.named_modules():
            if isinstance(mod, PolyphaseAnchor):
                self._handles.append(mod.register_forward_hook(self._anchor_hook(n)))
        attn_names, attn_layers = [], []
        for layer in self.specs.values():
            self._handles.append(layer.module.register_forward_pre_hook(self._block_pre_hook(layer.name)))
            self._handles.append(layer.module.register_forward_hook(self._block_hook(layer.name)))
            if layer.attention is not None:
                attn_names.append(names[id(layer.attention)])
                attn_layers.append(layer.name)
        if "attention" in self.record and attn_names:
            from timm.utils import AttentionExtract

            # Fused attention (SDPA) never materialises the maps; this is the working copy, so the flag
            # flip is private to this sweep.
            unfuse_attention(m)
            # timm's extractor captures each softmax map at ``attn_drop``. A second hook on the same
            # module, registered after it (PyTorch runs hooks in registration order), takes the map out
            # of the extractor at once and reduces it, so no full N×N map outlives its layer: holding
            # them all until the pass ends cost ~15% of the forward time on a CPU.
            self.extract = AttentionExtract(m, names=attn_names, method="hook")
            mods = dict(m.named_modules())
            for name, layer in zip(attn_names, attn_layers):
                self._handles.append(mods[name].register_forward_hook(self._attention_hook(layer)))

    def _on_output(self, mod, args, out):
        self.state.logits = out

    def _anchor_hook(self, name: str):
        def hook(mod, args, out):
            st = self.state
            idx = st.rec[name]
            g = self.hw[0] / args[0].shape[-2]
            st.offset = st.offset - idx.double() * g
            st.anchors[name] = idx
            st.margins[name] = st.rec.margins[name].float()
            st.tie_tol[name] = st.rec.tie_tol[name]
        return hook

    def _block_pre_hook(self, layer: str):
        spec = self.specs[layer]

        def hook(mod, args):
            h, w = spec.size(args, None, self.hw)
            self.state.sizes[layer] = (h, w)
            self.layer_stride[layer] = self.hw[0] / h
        return hook

    def _block_hook(self, layer: str):
        spec = self.specs[layer]

        def hook(mod, args, out):
            st = self.state
            if spec.layout != "tokens":  # a map layer's own output grid (a strided stage shrinks it)
                h, w = spec.size(args, out, self.hw)
                st.sizes[layer] = (h, w)
                self.layer_stride[layer] = self.hw[0] / h
            st.layer_offset[layer] = st.offset.clone()
            if "features" not in self.record:
                return
            feat = spec.as_map(out, st.sizes[layer])  # a view: no copy until the error is computed
            if st.is_ref:
                st.features[layer] = feat.float().clone()
            else:
                from .metrics import feature_equivariance_error

                t = self._token_shift(st, layer, st.offset)
                st.layer_error[layer] = feature_equivariance_error(feat, self.ref.features[layer][0], t).cpu()
        return hook

    def _token_shift(self, st: _Pass, layer: str, offset: torch.Tensor) -> torch.Tensor:
        d = offset - self.ref.layer_offset[layer]
        return torch.round(d / self.layer_stride[layer]).long()

    def _attention_hook(self, layer: str):
        def hook(mod, args, out):
            st = self.state
            a = self.extract.hooks.get_output(out.device).popitem()[1]  # this layer's map, now released
            b = st.offset.shape[0]
            per = a.numel() * a.element_size() // b
            st.raw_attention_bytes += per
            st.max_map_bytes = max(st.max_map_bytes, per)
            st.attention[layer] = self._reduce(st, layer, a, b).to(torch.float16).cpu()
        return hook

    def _reduce(self, st: _Pass, layer: str, a: torch.Tensor, b: int) -> torch.Tensor:
        h, w = st.sizes[layer]
        spec = self.specs[layer]
        kind = spec.kind
        if kind in ("cls", "received"):
            p = spec.prefix
            heads = a.shape[1]
            rows = a[:, :, 0, p:] if kind == "cls" else a[:, :, p:, p:].mean(2)
            # Rollout needs the head mean of every layer; kept (B, T, T) until the pass ends, as a float32
            # sum of head slices (3x faster than a.mean(1), a reduction over a short strided dim) and the
            # head count, which _rollout divides by. torch.add makes a new tensor: the map itself is still
            # needed by the attention's own ``attn @ v``.
            if self.rollout:
                total = a[:, 0].float() if heads == 1 else torch.add(a[:, 0].float(), a[:, 1])
                for k in range(2, heads):
                    total.add_(a[:, k])
                st.head_sums.append((total, heads))
            return rows.reshape(b, heads, h, w)
        if kind == "window":
            # Twins LSA maps are (B, windows, heads, N, N); Swin's (B * windows, heads, N, N).
            wh, ww = spec.window
            hp, wp = -(-h // wh), -(-w // ww)
            a = a.reshape(b, hp * wp, -1, wh * ww, wh * ww)
            heads = a.shape[2]
            recv = a.mean(-2).reshape(b, hp, wp, heads, wh, ww)
            grid = recv.permute(0, 3, 1, 4, 2, 5).reshape(b, heads, hp * wh, wp * ww)[:, :, :h, :w]
            if any(spec.shift):  # SW-MSA partitions a map rolled by -shift: put the windows back
                grid = torch.roll(grid, shifts=spec.shift, dims=(-2, -1))
            return grid
        # query: one query row over the (sub-sampled) key grid
        sr = spec.sr
        q = self._query_token(st, layer)
        rows = a[torch.arange(b, device=a.device), :, q.to(a.device)]
        return rows.reshape(b, a.shape[1], h // sr, w // sr)

    # running ------------------------------------------------------------------------------------
    def run(self, x: torch.Tensor, shifts_px: torch.Tensor, is_ref: bool) -> _Pass:
        with record_anchors(self.model) as rec:
            self.state = st = _Pass(shifts_px.double().clone(), rec, is_ref)
            try:
                self.model(x)
                if st.head_sums:
                    h, w = st.sizes[[n for n in self.layers if n in self.kind][-1]]
                    st.attention["rollout"] = self._rollout(st.head_sums).reshape(-1, 1, h, w).to(torch.float16).cpu()
                    st.head_sums = []
            finally:
                if self.extract is not None:
                    self.extract.hooks.get_output(x.device)  # drop anything left by a failed pass
        if is_ref:
            self.ref = st
        self.state = None
        return st

    def _rollout(self, sums: List[Tuple[torch.Tensor, int]]) -> torch.Tensor:
        """Rollout read-out row over patch tokens: v^T Â_L ··· Â_1 with Â = 0.5·mean_heads(A) + 0.5·I,
        from (sum over heads, head count) per layer. Â's rows already sum to 1 (softmax rows), so no
        renormalisation is needed; multiplying a row vector from the last layer down costs B·T² per
        layer instead of B·T³ for the full product."""
        p = self.prefix
        last = sums[-1][0]
        b, t = last.shape[0], last.shape[-1]
        v = torch.zeros(b, 1, t, dtype=torch.float32, device=last.device)
        if self.has_cls:
            v[:, :, 0] = 1
        else:  # mean over patch queries
            v[:, :, p:] = 1.0 / (t - p)
        for m, heads in reversed(sums):
            v = (0.5 / heads) * torch.bmm(v, m.float()) + 0.5 * v
        return v[:, 0, p:]

    def _query_token(self, st: _Pass, layer: str) -> torch.Tensor:
        """Flat index of the GSA query token: the query pixel's token in the unshifted run, moved by the
        layer's token shift (so the query stays on the same content)."""
        h, w = st.sizes[layer]
        g = self.layer_stride[layer]
        if st.is_ref:
            o = st.offset[0]
            r = int(math.floor((self.query_px[0] + o[0].item()) / g)) % h
            c = int(math.floor((self.query_px[1] + o[1].item()) / g)) % w
            st.query[layer] = (r, c)
            return torch.tensor([r * w + c])
        r0, c0 = self.ref.query[layer]
        t = self._token_shift(st, layer, st.offset)
        return ((r0 + t[:, 0]) % h) * w + (c0 + t[:, 1]) % w

    def meta(self) -> Dict[str, Any]:
        att_stride = {}
        for layer in self.kind:
            g = self.layer_stride.get(layer)
            if g is not None:
                att_stride[layer] = g * self.specs[layer].sr
        if self.rollout:
            att_stride["rollout"] = self.layer_stride.get(self.layers[-1])
        return {
            "architecture": self.arch, "layers": self.layers, "attention_kind": self.kind,
            "layer_stride": self.layer_stride, "attention_stride": att_stride,
            "anchor_names": self.anchor_names, "anchor_stride": self.anchor_stride,
            "query": list(self.query_px) if "query" in self.kind.values() else None,
            "prefix_tokens": self.prefix, "cls_token": self.has_cls,
        }


# --- sweep ---------------------------------------------------------------------------------------
def _cpu_chunk(map_bytes: int) -> int:
    """Power-of-two chunk whose largest per-layer attention map stays near _CPU_MAP_BYTES."""
    if map_bytes <= 0:
        return _CPU_CHUNK_MAX
    n = 2 ** round(math.log2(max(1.0, _CPU_MAP_BYTES / map_bytes)))
    return int(min(_CPU_CHUNK_MAX, max(_CPU_CHUNK_MIN, n)))


_OOM_ONE = "out of memory with one shift at a time; free GPU memory or run on device='cpu'"


def _is_oom(err: BaseException) -> bool:
    # CUDA: torch.OutOfMemoryError; CPU: the allocator's RuntimeError ("DefaultCPUAllocator: can't
    # allocate memory: you tried to allocate N bytes"), e.g. an explicit batch_size too large for the RAM.
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _per_sample_bytes(ref: _Pass, x: torch.Tensor) -> int:
    """Rough peak memory of one shifted copy: the full attention maps the extractor holds until the pass
    ends, ~12 block-output-sized buffers of working set (MLP hidden, q/k/v, residual, features) and the
    input copies. Measured on the unshifted run."""
    block = max((f[0].numel() * 4 for f in ref.features.values()), default=0)
    if not block:  # features not recorded: assume a 256-wide token grid
        block = max((256 * 4 * h * w for h, w in ref.sizes.values()), default=0)
    return int(ref.raw_attention_bytes + 12 * block + 4 * x.numel() * x.element_size()) + 1


def sweep(model, image: torch.Tensor, shifts: ShiftsLike, mode: str = "circular",
          record: Sequence[str] = RECORDS, *, memory_budget_mb: float = DEFAULT_MEMORY_MB,
          batch_size: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None,
          size: Optional[Tuple[int, int]] = None, classes: Optional[Sequence[str]] = None,
          query: Optional[Tuple[int, int]] = None) -> SweepResult:
    """Run ``model`` on every shift of ``image`` and record logits, anchors, attention and per-layer
    feature equivariance errors (module doc).

    model: an ``nn.Module`` in eval mode, or a ``LoadedModel`` (its ``.model`` and ``.classes`` are used).
    image: preprocessed (C, H, W) or (1, C, H, W) tensor. shifts: (dy, dx) pairs or [K, 2] tensor.
    mode: one of ``equishift.shifts.MODES``; ``size`` = the (h, w) window for ``mode='crop'``.
    memory_budget_mb: bounds the chunk of shifts run at once (estimated from the unshifted run);
    ``batch_size`` overrides it. A CUDA out-of-memory halves the chunk and retries.
    progress: ``callable(done, total)`` called after each chunk. query: pixel (y, x) of the unshifted
    image whose token is the query of the Twins GSA maps (default: the centre).
    """
    if not isinstance(model, nn.Module) and hasattr(model, "model"):
        classes = classes if classes is not None else getattr(model, "classes", None)
        model = model.model
    if not isinstance(model, nn.Module):
        raise EquishiftError(f"sweep needs a torch model, got {type(model).__name__}")
    if mode not in MODES:
        raise EquishiftError(f"unknown shift mode {mode!r}; choose one of {', '.join(MODES)}")
    bad = set(record) - set(RECORDS)
    if bad:
        raise EquishiftError(f"unknown record type(s) {sorted(bad)}; choose from {', '.join(RECORDS)}")
    if mode == "crop" and size is None:
        raise EquishiftError("mode='crop' needs size=(h, w): the window the model sees, cut from a larger image")
    if not torch.is_tensor(image) or image.dim() not in (3, 4) or (image.dim() == 4 and image.shape[0] != 1):
        shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise EquishiftError(f"image must be a preprocessed tensor (C, H, W) or (1, C, H, W), got {shape}")
    image = image[0] if image.dim() == 4 else image
    fractional = mode in ("bilinear", "fourier")
    try:
        s = as_shifts(shifts, integer=not fractional)
    except ValueError as e:
        raise EquishiftError(str(e)) from None
    k = s.shape[0]
    if k == 0:
        raise EquishiftError("no shifts to sweep: pass at least one (dy, dx)")
    if k > MAX_SHIFTS:
        raise LimitError(f"{k} shifts exceed the sweep limit of {MAX_SHIFTS}; use a coarser grid")
    if memory_budget_mb <= 0:
        raise LimitError(f"memory_budget_mb must be positive, got {memory_budget_mb}")

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    image = image.to(device=device, dtype=dtype)
    hw = tuple(size) if mode == "crop" else tuple(image.shape[-2:])

    work = working_copy(model).eval()
    probe = _Probe(work, record, hw, query)
    zero = torch.zeros(1, 2, dtype=s.dtype)
    try:
        with torch.inference_mode():
            try:
                ref = probe.run(orbit(image, zero, mode, size), zero, is_ref=True)
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _is_oom(err):
                    raise
                raise LimitError(_OOM_ONE) from err
            if batch_size is not None:
                if batch_size < 1:
                    raise LimitError(f"batch_size must be at least 1, got {batch_size}")
                chunk = int(batch_size)
            else:
                per = _per_sample_bytes(ref, image)
                chunk = max(1, int(memory_budget_mb * 2 ** 20 // per))
                if device.type == "cpu":
                    chunk = min(chunk, _cpu_chunk(ref.max_map_bytes))
            chunk = min(chunk, k)
            parts: List[_Pass] = []
            done = 0
            if progress is not None:
                progress(0, k)
            while done < k:
                sl = s[done:done + chunk]
                try:
                    st = probe.run(orbit(image, sl, mode, size), sl, is_ref=False)
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not _is_oom(err):
                        raise
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if chunk == 1:
                        raise LimitError(_OOM_ONE) from err
                    chunk = max(1, chunk // 2)
                    continue
                parts.append(st)
                done += sl.shape[0]
                if progress is not None:
                    progress(done, k)
    finally:
        for h in probe._handles:
            h.remove()
    return _assemble(s, parts, ref, probe, record, mode, hw, tuple(image.shape[-2:]), classes, model)


def _assemble(s, parts: List[_Pass], ref: _Pass, probe: _Probe, record, mode, hw, in_hw, classes,
              model) -> SweepResult:
    from .anchoring import anchoring_mode

    def cat(get):
        return torch.cat([get(p) for p in parts])

    res = SweepResult(shifts=s.clone(), logits=None)
    if "logits" in record:
        res.logits = cat(lambda p: p.logits.float().cpu())
        res.ref_logits = ref.logits.float().cpu()[0]
    if "anchors" in record:
        res.anchors = {n: cat(lambda p: p.anchors[n]) for n in ref.anchors}
        res.ref_anchors = {n: v[0] for n, v in ref.anchors.items()}
        res.margins = {n: cat(lambda p: p.margins[n]) for n in ref.margins}
        res.ref_margins = {n: v[0] for n, v in ref.margins.items()}
    if "attention" in record:
        res.attention = {n: cat(lambda p: p.attention[n]) for n in ref.attention}
        res.ref_attention = {n: v[0] for n, v in ref.attention.items()}
    if "features" in record:
        res.layer_error = {n: cat(lambda p: p.layer_error[n]).float() for n in ref.features}
    res.offset = {n: cat(lambda p: p.layer_offset[n] - ref.layer_offset[n][0]).float() for n in ref.layer_offset}
    meta = probe.meta()
    if probe.arch == "vit":
        from .zoo import model_stride

        meta["patch_size"] = model_stride(model)
    meta.update({
        "mode": mode, "image_size": list(hw), "input_size": list(in_hw), "record": list(record),
        "num_shifts": int(s.shape[0]), "model": type(model).__name__, "anchoring": anchoring_mode(model),
        "classes": list(classes) if classes is not None else None,
        "grid": {n: list(v) for n, v in ref.sizes.items()},
    })
    if ref.tie_tol:
        meta["anchor_tie_tol"] = dict(ref.tie_tol)
    why = _not_recorded(probe, model)
    skipped = {r: why[r] for r in ("attention", "features") if r in record and r in why}
    if skipped:
        meta["not_recorded"] = skipped
    res.meta = meta
    return res


def _not_recorded(probe: _Probe, model: nn.Module) -> Dict[str, str]:
    """Why a record type has nothing to show for this model (what the dashboard says instead of a plot)."""
    if probe.arch == "other":
        from .archs import adapters

        known = ", ".join(sorted(a.name for a in adapters() if a.layers is not None))
        text = (f"equishift does not know the layers of {type(model).__name__} (families it knows: {known}); "
                "logits and anchors are recorded")
        return {"attention": text, "features": text}
    if not probe.kind:
        return {"attention": f"{type(model).__name__} ({probe.arch}) has no attention layers: it is a CNN"}
    return {}


# ``equishift.sweep`` names both this module and the function. Python binds a package attribute to the
# submodule as soon as the submodule is imported, so ``equishift.sweep`` can be either; making the
# module callable means ``equishift.sweep(model, image, shifts)`` works whichever one it is.
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> SweepResult:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
