"""Accuracy and shift-consistency protocols on a dataset: ``evaluate`` and ``python -m equishift evaluate``.

Definitions follow docs/metrics.md; each protocol below is one exact recipe (docs/training.md, section
"Evaluating shift robustness"). Notation: x a prepared image of size H×W, ŷ the argmax class, y the
label, s the model's patch size (``LoadedModel.stride``), m = H // 8 the crop margin (4 for 32-pixel
inputs).

- ``clean``            accuracy 1[ŷ(x) = y].
- ``consistency-a``    circular; 1[ŷ(x) = ŷ(R_δ x)], one δ per image uniform in {0..14}² (the paper's default).
- ``consistency-b``    circular; 1[ŷ(R_δ1 x) = ŷ(R_δ2 x)], δ1, δ2 independent, uniform in {-32..31}²
                       (APS). Circular shifts act mod H: for 32-pixel images every residue comes up twice,
                       so this is uniform over the whole 32×32 orbit.
- ``period-orbit``     circular; 1[ŷ is the same for all s² shifts in {0..s-1}²] (strict orbit consistency).
- ``shifted-accuracy`` circular; 1[ŷ(R_δ x) = y] with the same δ as ``consistency-a``; also the drop
                       clean − shifted on the same images, with a paired (Wald) 95% interval.
- ``zero-pad``         linear shift, black pixels come in; 1[ŷ(x) = ŷ(Z_δ x)], the same δ as consistency-a.
- ``crop``             Zhang (2019)-style: the image with m pixels of context on each side (real context for
                       PIL inputs where the source has some, black beyond; black for prepared tensors, so for
                       Fashion-MNIST this is the 28×28 garment padded to 40×40), two H×W windows at offsets
                       uniform in {0..2m}²: 1[ŷ(crop1) = ŷ(crop2)]. Offset (m, m) is the clean image.
- ``crop-accuracy``    1[ŷ(crop1) = y] (the first window of ``crop``).
- ``flip-accuracy``    1[ŷ(horizontal flip of x) = y].
- ``affine-accuracy``  1[ŷ(A x) = y], A a random affine per image: rotation uniform in [-10°, 10°],
                       translation uniform in [-0.1, 0.1]·(W, H), scale uniform in [0.9, 1.1], bilinear,
                       black outside.

Every random draw is a hash of (seed, draw name, image index, draw number) — not a stream — so results
do not depend on batch size, order or the number of torchrun processes.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import math
import re
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as dist_util
from .errors import DataError, EquishiftError
from .shifts import grid, shift_batch

__all__ = ["PROTOCOLS", "evaluate", "card_metrics", "wilson_interval", "resolve_dataset", "draw_shifts",
           "match_classes", "add_arguments", "run"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile
A_RANGE = (0, 14)        # consistency-a / shifted-accuracy / zero-pad
B_RANGE = (-32, 31)      # consistency-b


# --- random draws: a pure function of (seed, name, image index, draw) --------------------------------
def _mix(seed: int, name: str, index: torch.Tensor, draw: int) -> np.ndarray:
    """splitmix64 of the four inputs: uniform uint64 per image, identical on every process."""
    idx = np.asarray(index, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (np.uint64(seed & (2 ** 64 - 1)) * np.uint64(0x9E3779B97F4A7C15)
             + np.uint64(zlib.crc32(name.encode())) * np.uint64(0xD1B54A32D192ED03)
             + idx * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(draw) * np.uint64(0x94D049BB133111EB))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _randint(seed: int, name: str, index, draw: int, low: int, high: int) -> torch.Tensor:
    """Integers uniform in [low, high] (inclusive); the modulo bias is below 1e-17."""
    z = _mix(seed, name, index, draw) % np.uint64(high - low + 1)
    return torch.from_numpy(z.astype(np.int64)) + low


def _uniform(seed: int, name: str, index, draw: int, low: float, high: float) -> torch.Tensor:
    u = (_mix(seed, name, index, draw) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return torch.from_numpy(low + (high - low) * u)


def draw_shifts(seed: int, name: str, index, low: int, high: int, draw: int = 0) -> torch.Tensor:
    """The (dy, dx) each image ``index`` gets for draw ``name``: LongTensor[len(index), 2] in [low, high]²."""
    return torch.stack((_randint(seed, name, index, 2 * draw, low, high),
                        _randint(seed, name, index, 2 * draw + 1, low, high)), dim=1)


# --- views: the transformed copies of each image the protocols need ---------------------------------
@dataclass
class _Batch:
    canvas: torch.Tensor  # (b, C, H+2m, W+2m) prepared images with m pixels of context
    index: torch.Tensor   # (b,) global image indices
    label: torch.Tensor   # (b,)
    margin: int
    black: torch.Tensor   # (C, 1, 1) the prepared value of a black pixel
    seed: int
    stride: int

    @property
    def x(self) -> torch.Tensor:
        m = self.margin
        h, w = self.canvas.shape[-2] - 2 * m, self.canvas.shape[-1] - 2 * m
        return self.canvas[:, :, m:m + h, m:m + w]


def _circ_a(bt: _Batch) -> List[torch.Tensor]:
    return [shift_batch(bt.x, draw_shifts(bt.seed, "a", bt.index, *A_RANGE), "circular")]


def _circ_b(bt: _Batch) -> List[torch.Tensor]:
    return [shift_batch(bt.x, draw_shifts(bt.seed, "b", bt.index, *B_RANGE, draw=k), "circular") for k in (0, 1)]


def _period(bt: _Batch) -> List[torch.Tensor]:
    s = bt.stride
    return [shift_batch(bt.x, torch.tensor([[dy, dx]]).expand(len(bt.index), 2), "circular")
            for dy, dx in grid(range(s), range(s)).tolist() if (dy, dx) != (0, 0)]


def _zero_a(bt: _Batch) -> List[torch.Tensor]:
    # Shift x - black so that the zeros coming in are black pixels, not the dataset mean.
    d = draw_shifts(bt.seed, "a", bt.index, *A_RANGE)
    return [shift_batch(bt.x - bt.black, d, "zero") + bt.black]


def _crops(bt: _Batch) -> List[torch.Tensor]:
    h, w = bt.x.shape[-2:]
    m = bt.margin
    # shift_batch's crop mode moves the window by -δ from the centred one: offset o = m - δ.
    return [shift_batch(bt.canvas, m - draw_shifts(bt.seed, "crop", bt.index, 0, 2 * m, draw=k), "crop",
                        size=(h, w)) for k in (0, 1)]


def _flip(bt: _Batch) -> List[torch.Tensor]:
    return [bt.x.flip(-1)]


def _affine(bt: _Batch) -> List[torch.Tensor]:
    i, s = bt.index, bt.seed
    # The minus sign makes the view equal torchvision's affine(x, angle=θ, translate=(tx·W, ty·H), scale).
    angle = -_uniform(s, "affine", i, 0, -10.0, 10.0) * (math.pi / 180)
    tx, ty = _uniform(s, "affine", i, 1, -0.1, 0.1), _uniform(s, "affine", i, 2, -0.1, 0.1)
    scale = _uniform(s, "affine", i, 3, 0.9, 1.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps output to input coordinates in [-1, 1]: the inverse of (rotate, scale, translate);
    # a translation by t·W pixels is 2t in these units.
    theta = torch.stack((torch.stack((cos, -sin, -(cos * 2 * tx - sin * 2 * ty)), 1),
                         torch.stack((sin, cos, -(sin * 2 * tx + cos * 2 * ty)), 1)), 1)
    x = bt.x - bt.black
    g = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return [F.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=False) + bt.black]


VIEWS: Dict[str, Tuple[Callable[[int], int], Callable[[_Batch], List[torch.Tensor]]]] = {
    # name: (number of views given the stride, builder)
    "circ-a": (lambda s: 1, _circ_a), "circ-b": (lambda s: 2, _circ_b), "period": (lambda s: s * s - 1, _period),
    "zero-a": (lambda s: 1, _zero_a), "crops": (lambda s: 2, _crops), "flip": (lambda s: 1, _flip),
    "affine": (lambda s: 1, _affine),
}


# --- protocols ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    name: str
    metric: str
    shift_mode: str
    range: str             # may contain {s} (stride), {m}, {H}, {W}, {C}
    views: Tuple[str, ...]
    # (clean prediction (b,), {view: predictions (b, k)}, labels (b,)) -> success (b,) bool
    score: Callable[[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


# Ranges are str.format templates: {H}, {s}, … are filled in; literal braces are doubled.
_A = "δ uniform in {{0..14}}², one per image"
PROTOCOLS: Dict[str, Protocol] = {p.name: p for p in (
    Protocol("clean", "accuracy: mean 1[ŷ(x) = y]", "none", "no shift", (), lambda c, v, y: c == y),
    Protocol("consistency-a", "consistency A: mean 1[ŷ(x) = ŷ(R_δ x)]", "circular", _A, ("circ-a",),
             lambda c, v, y: v["circ-a"][:, 0] == c),
    Protocol("consistency-b", "consistency B: mean 1[ŷ(R_δ1 x) = ŷ(R_δ2 x)]", "circular",
             "δ1, δ2 independent, uniform in {{-32..31}}² (mod {H}×{W})", ("circ-b",),
             lambda c, v, y: v["circ-b"][:, 0] == v["circ-b"][:, 1]),
    Protocol("period-orbit", "orbit consistency: fraction of images with one ŷ for every δ in {{0..s-1}}²",
             "circular", "all {s}×{s} shifts in {{0..{s1}}}² (s = patch size {s})", ("period",),
             lambda c, v, y: (v["period"] == c[:, None]).all(1)),
    Protocol("shifted-accuracy", "shifted accuracy: mean 1[ŷ(R_δ x) = y]", "circular",
             _A + " (the same δ as consistency-a)", ("circ-a",), lambda c, v, y: v["circ-a"][:, 0] == y),
    Protocol("zero-pad", "consistency A: mean 1[ŷ(x) = ŷ(Z_δ x)], Z = linear shift with black fill", "zero",
             _A + " (the same δ as consistency-a)", ("zero-a",), lambda c, v, y: v["zero-a"][:, 0] == c),
    Protocol("crop", "crop consistency: mean 1[ŷ(crop1) = ŷ(crop2)]", "crop",
             "two {H}×{W} windows of the image with {m} pixels of context per side, offsets uniform in "
             "{{0..{m2}}}² (offset ({m}, {m}) = clean)", ("crops",),
             lambda c, v, y: v["crops"][:, 0] == v["crops"][:, 1]),
    Protocol("crop-accuracy", "accuracy under a random crop: mean 1[ŷ(crop1) = y]", "crop",
             "one {H}×{W} window, offset uniform in {{0..{m2}}}² of the image with {m} pixels of context",
             ("crops",), lambda c, v, y: v["crops"][:, 0] == y),
    Protocol("flip-accuracy", "accuracy under a horizontal flip: mean 1[ŷ(flip x) = y]", "flip",
             "horizontal flip", ("flip",), lambda c, v, y: v["flip"][:, 0] == y),
    Protocol("affine-accuracy", "accuracy under a random affine: mean 1[ŷ(A x) = y]", "affine",
             "rotation U[-10°, 10°], translation U[-0.1, 0.1]·size, scale U[0.9, 1.1], bilinear, black fill",
             ("affine",), lambda c, v, y: v["affine"][:, 0] == y),
)}


def _protocol_names(protocols: Union[str, Sequence[str]]) -> List[str]:
    items = [protocols] if isinstance(protocols, str) else list(protocols)
    names: List[str] = []
    for item in items:
        for name in filter(None, (p.strip() for p in str(item).split(","))):
            if name == "all":
                names.extend(PROTOCOLS)
            elif name in PROTOCOLS:
                names.append(name)
            else:
                raise EquishiftError(f"unknown protocol {name!r}; choose from all, {', '.join(PROTOCOLS)}")
    if not names:
        raise EquishiftError(f"no protocol given; choose from all, {', '.join(PROTOCOLS)}")
    return list(dict.fromkeys(names))


# --- intervals ---------------------------------------------------------------------------------------
def wilson_interval(count: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson score interval for a proportion count/n (95% by default); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = count / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p̂ = 0 or 1 the bound is exactly 0 or 1; floating point would leave it 1 ulp inside.
    lo = 0.0 if count == 0 else max(0.0, centre - half)
    hi = 1.0 if count == n else min(1.0, centre + half)
    return lo, hi


def _paired_drop(n10: int, n01: int, n: int) -> Tuple[float, Tuple[float, float]]:
    """clean − shifted accuracy from the discordant pairs, with a Wald 95% interval of the paired mean."""
    if n <= 0:
        return 0.0, (-1.0, 1.0)
    d = (n10 - n01) / n
    half = Z95 * math.sqrt(max((n10 + n01) / n - d * d, 0.0) / n)
    return d, (d - half, d + half)


# --- datasets ----------------------------------------------------------------------------------------
def match_classes(folders: Sequence[str], classes: Sequence[str], where: str) -> Dict[str, int]:
    """Folder name -> index into a model's ``classes``: names compared ignoring case and punctuation, or
    folders named 0..len(classes)-1. DataError naming the first folder that matches nothing."""
    key = {re.sub(r"[^0-9a-z]", "", c.lower()): k for k, c in enumerate(classes)}
    mapping = {}
    for folder in folders:
        norm = re.sub(r"[^0-9a-z]", "", folder.lower())
        if norm in key:
            mapping[folder] = key[norm]
        elif folder.isdigit() and int(folder) < len(classes):
            mapping[folder] = int(folder)
        else:
            shown = ", ".join(list(classes)[:12]) + (", …" if len(classes) > 12 else "")
            raise DataError(f"{where}: folder {folder[:60]!r} is not one of the model's classes ({shown}); "
                            f"name the folders after them or 0..{len(classes) - 1}")
    return mapping


class _FolderImages:
    """An image folder (ROOT/<class>/<files>) as (PIL RGB image, label) pairs; labels follow the model's
    classes, matched to folder names ignoring case and punctuation (or folders named 0, 1, ...)."""

    def __init__(self, root: Path, classes: Sequence[str]):
        from .data import ImageFolder

        listing = ImageFolder(root)  # lists the files and checks the layout; decodes nothing
        mapping = match_classes(listing.classes, classes, str(root))
        self.samples = [(p, mapping[listing.classes[k]]) for p, k in listing.samples]
        self.name = str(root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from .errors import ImageError
        from .images import load_image

        path, label = self.samples[i]
        try:
            return load_image(path), label
        except ImageError as e:
            raise DataError(f"{path}: {e}") from None


def resolve_dataset(dataset: Any, loaded) -> Tuple[Any, str]:
    """A dataset object (returned as is), "fashion-mnist" (the test split) or a directory: a folder holding
    Fashion-MNIST IDX files (t10k-*) or an image folder. Returns (dataset, description)."""
    from .data import FashionMNIST

    if not isinstance(dataset, (str, Path)):
        return dataset, str(getattr(dataset, "name", type(dataset).__name__))
    if str(dataset).lower() in ("fashion-mnist", "fmnist", "fashion_mnist"):
        return FashionMNIST("test"), "fashion-mnist (test split)"
    root = Path(dataset)
    if not root.is_dir():
        raise DataError(f"dataset {str(dataset)!r} is neither 'fashion-mnist' nor an existing directory")
    if any(root.glob("t10k-images-idx3-ubyte*")):
        return FashionMNIST("test", root=root), f"fashion-mnist (test split) from {root}"
    return _FolderImages(root, loaded.classes), f"image folder {root}"


def _label_map(dataset, classes: Sequence[str]) -> Optional[torch.Tensor]:
    """Dataset label -> model class index, when the dataset names its classes in another order."""
    ds_classes = getattr(dataset, "classes", None)
    if ds_classes is None or list(ds_classes) == list(classes):
        return None
    if list(classes) == [f"class {k}" for k in range(len(classes))] and len(ds_classes) <= len(classes):
        return None  # a model without class names (timm random init / local file): labels are indices
    pos = {c: k for k, c in enumerate(classes)}
    missing = [c for c in ds_classes if c not in pos]
    if missing:
        raise DataError(f"the dataset's classes {', '.join(missing)} are not among the model's "
                        f"({', '.join(classes)})")
    return torch.tensor([pos[c] for c in ds_classes])


def _to_pil(x: torch.Tensor, mean, std):
    from PIL import Image

    raw = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    arr = (raw.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def _prepare(dataset, loaded, idx: torch.Tensor, margin: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Canvases (b, C, H+2m, W+2m) on the model's device and labels for the images ``idx``."""
    size = loaded.input_size
    if hasattr(dataset, "batch"):
        xs, ys = dataset.batch(idx)
        images, labels = list(xs), ys.tolist()
    else:
        images, labels = zip(*[dataset[int(i)] for i in idx])
    labels = torch.tensor([int(y) for y in labels], dtype=torch.long)
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    tensors = all(isinstance(im, torch.Tensor) for im in images)
    if tensors and all(tuple(im.shape) == size for im in images) and (
            mean is None or (list(mean) == list(loaded.card["mean"]) and list(std) == list(loaded.card["std"]))):
        x = torch.stack(images).float().to(loaded.device)
        black = loaded.black(x)
        return F.pad(x - black, [margin] * 4) + black, labels
    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            if mean is None:
                raise DataError(f"dataset images are {tuple(im.shape)} but {loaded.name} takes {size}; give "
                                f"PIL images, or a dataset with mean/std attributes that can be converted")
            # Prepared for another model: back to pixels, then this model's own preprocessing.
            im = _to_pil(im.float().cpu(), mean, std)
        out.append(loaded.preprocess(im, margin=margin)[0])
    return torch.stack(out), labels


# --- the engine --------------------------------------------------------------------------------------
def _predict(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(-1) for i in range(0, x.shape[0], batch_size)])


def evaluate(loaded, dataset, protocols: Union[str, Sequence[str]] = "all", *, batch_size: int = 256,
             limit: Optional[int] = None, seed: int = 0, device=None, progress: bool = False,
             distributed: bool = False) -> Dict[str, Any]:
    """Run shift protocols on ``dataset`` with a model from ``equishift.zoo.load_model``.

    ``loaded``: a ``LoadedModel`` (its ``.preprocess`` and card say how to prepare images).
    ``dataset``: a sequence / torch Dataset of ``(image, label)`` — ``image`` a PIL image (prepared with
    the model's preprocessing) or a float tensor (C, H, W) already prepared for the model (normalised,
    at the model's input size; a dataset with ``mean``/``std`` attributes prepared for another model is
    converted); ``label`` an int index into ``loaded.classes`` (or into ``dataset.classes``, mapped by
    name). The strings ``"fashion-mnist"`` (the 10 000-image test split) or a directory path are also
    accepted (``resolve_dataset``).
    ``protocols``: ``"all"``, one name or a list of names from ``PROTOCOLS``.
    ``batch_size``: rows per forward pass (images × their shifted copies). ``limit``: only the first
    ``limit`` images. ``seed``: every random shift is a function of (seed, protocol, image index), so
    results do not depend on batch size or on the number of processes. ``device``: moves the model there
    (default: where it is). ``distributed``: inside an initialised torch.distributed group, shard the
    images over the ranks and sum the counts (every rank returns the same result).

    Returns a JSON-able dict::

        {"model": spec, "dataset": str, "n_images": N, "seed": S, "device": str, ...,
         "protocols": {name: {"protocol", "metric", "shift_mode", "range", "n_images", "count",
                              "value", "ci95": [lo, hi], "ci_method", "seed", ...}}}

    ``value`` is a proportion in [0, 1] (``count / n_images``); ``ci95`` its 95% Wilson interval.
    ``shifted-accuracy`` also carries ``clean_accuracy``, ``drop`` and ``drop_ci95``.
    For a model card: ``card["metrics"] = card_metrics(result)``.
    """
    names = _protocol_names(protocols)
    if batch_size < 1:
        raise EquishiftError(f"batch size must be >= 1, got {batch_size}")
    if device is not None and torch.device(device) != loaded.device:
        # A copy: the caller's model may be shared (the dashboard caches one per spec).
        dev = torch.device(device)
        loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to(dev), device=dev)
    ds, ds_name = resolve_dataset(dataset, loaded)
    n = len(ds) if limit is None else min(len(ds), max(0, int(limit)))
    if n == 0:
        raise DataError(f"dataset {ds_name} has no images to evaluate")
    label_map = _label_map(ds, loaded.classes)
    rank, world = dist_util.rank_and_world() if distributed else (0, 1)
    mine = dist_util.shard(n, rank, world)

    stride, (_, h, w) = loaded.stride, loaded.input_size
    margin = max(1, h // 8)
    views = list(dict.fromkeys(v for p in names for v in PROTOCOLS[p].views))
    per_image = 1 + sum(VIEWS[v][0](stride) for v in views)
    chunk = max(1, batch_size // per_image)
    # counts: success per protocol, then the two discordant-pair counts of clean vs shifted accuracy
    counts = torch.zeros(len(names) + 2, dtype=torch.long)
    model = loaded.model
    if any(m.training for m in model.modules()):
        # Never flip the caller's flags (the dashboard shares one model between sessions): evaluate a
        # structural copy in eval mode that shares the weights.
        from .sweep import working_copy

        model = working_copy(model).eval()
    t0 = time.perf_counter()
    bar = _progress(len(mine), progress and rank == 0, loaded.name)
    with torch.inference_mode():
        for start in range(0, len(mine), chunk):
            idx = mine[start:start + chunk]
            canvas, y = _prepare(ds, loaded, idx, margin)
            if label_map is not None:
                y = label_map[y]
            bt = _Batch(canvas, idx, y.to(canvas.device), margin, loaded.black(canvas), seed, stride)
            built = {v: VIEWS[v][1](bt) for v in views}
            flat = torch.cat([bt.x] + [t for v in views for t in built[v]])
            pred = _predict(model, flat, batch_size).view(1 + sum(len(built[v]) for v in views), len(idx))
            clean, pv, k = pred[0], {}, 1
            for v in views:
                pv[v] = pred[k:k + len(built[v])].T
                k += len(built[v])
            for j, p in enumerate(names):
                counts[j] += int(PROTOCOLS[p].score(clean, pv, bt.label).sum())
            if "shifted-accuracy" in names:
                ok_clean, ok_shift = clean == bt.label, pv["circ-a"][:, 0] == bt.label
                counts[-2] += int((ok_clean & ~ok_shift).sum())
                counts[-1] += int((~ok_clean & ok_shift).sum())
            bar.update(len(idx))
    bar.close()
    if distributed:
        counts = dist_util.all_reduce_sum(counts, loaded.device)
    fmt = dict(s=stride, s1=stride - 1, m=margin, m2=2 * margin, H=h, W=w)
    out = {p: _record(PROTOCOLS[p], int(counts[j]), n, seed, fmt) for j, p in enumerate(names)}
    if "shifted-accuracy" in names:
        clean_ok = int(counts[names.index("clean")]) if "clean" in names else None
        drop, ci = _paired_drop(int(counts[-2]), int(counts[-1]), n)
        shifted = out["shifted-accuracy"]
        shifted.update(clean_accuracy=(clean_ok / n if clean_ok is not None else
                                       (shifted["count"] + int(counts[-2]) - int(counts[-1])) / n),
                       drop=drop, drop_ci95=list(ci), drop_ci_method="wald, paired")
    return {
        "model": loaded.spec, "model_name": loaded.name, "dataset": ds_name, "n_images": n, "seed": seed,
        "limit": limit, "protocols": out, "stride": stride, "input_size": list(loaded.input_size),
        "crop_margin": margin, "batch_size": batch_size, "world_size": world, "device": str(loaded.device),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _record(p: Protocol, count: int, n: int, seed: int, fmt: Dict[str, int]) -> Dict[str, Any]:
    lo, hi = wilson_interval(count, n)
    return {"protocol": p.name, "metric": p.metric.format(**fmt), "shift_mode": p.shift_mode,
            "range": p.range.format(**fmt), "n_images": n, "count": count, "value": count / n,
            "ci95": [lo, hi], "ci_method": "wilson", "seed": seed}


class _NoBar:
    def update(self, k: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool, name: str):
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=f"evaluate {name}", unit="img", file=sys.stderr)


def card_metrics(result: Dict[str, Any]) -> Dict[str, Any]:
    """The compact form stored in a model card's ``"metrics"``: {protocol: {"value", "ci95", "n_images",
    "seed", "shift_mode", "range"}} (plus ``drop``/``drop_ci95`` for shifted-accuracy)."""
    keep = ("value", "ci95", "n_images", "seed", "shift_mode", "range", "drop", "drop_ci95")
    return {name: {k: r[k] for k in keep if k in r} for name, r in result["protocols"].items()}


# --- CLI -----------------------------------------------------------------------------------------------
CSV_FIELDS = ("model", "dataset", "protocol", "metric", "shift_mode", "range", "n_images", "count", "value",
              "ci95_low", "ci95_high", "ci_method", "seed", "drop", "drop_ci95_low", "drop_ci95_high")


def to_csv(result: Dict[str, Any]) -> str:
    """One row per protocol."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in result["protocols"].values():
        row = dict(r, model=result["model"], dataset=result["dataset"], ci95_low=r["ci95"][0],
                   ci95_high=r["ci95"][1])
        if "drop" in r:
            row.update(drop_ci95_low=r["drop_ci95"][0], drop_ci95_high=r["drop_ci95"][1])
        writer.writerow(row)
    return buf.getvalue()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, action="append",
                        help="model spec: zoo:NAME, timm:NAME[?pretrained|@PATH], anchored[MODE]:SPEC; repeat "
                             "to compare up to 6 models")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="'fashion-mnist' (test split), a folder of Fashion-MNIST IDX files, or an image "
                             "folder ROOT/<class>/<images> (default: fashion-mnist)")
    parser.add_argument("--protocol", action="append", default=None,
                        help=f"'all' or one of {', '.join(PROTOCOLS)}; repeat or comma-separate "
                             f"(default: all)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the full result as JSON")
    parser.add_argument("--csv", default=None, metavar="FILE", help="write one row per protocol as CSV")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows (images × shifts) per forward pass")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random shift (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    view = parser.add_argument_group("dataset view (the dashboard's Dataset page, docs/dataset.md)")
    view.add_argument("--per-image", default=None, metavar="CSV",
                      help="sweep every image over the shift set and write one row per image and model "
                           "(a .parquet name writes Parquet)")
    view.add_argument("--figures", default=None, metavar="DIR",
                      help="write the dataset view's figures (HTML; PNG/SVG with a Chromium) and metrics.json")
    view.add_argument("--report", default=None, metavar="HTML", help="write the dataset view's report page")
    view.add_argument("--shifts", default="period", metavar="SET",
                      help="shift set of the dataset view: period (default), orbit, or rN (|δ|∞ <= N)")
    view.add_argument("--shift-mode", default="circular", choices=("circular", "zero", "crop"),
                      help="shift mode of the dataset view (default circular)")
    view.add_argument("--unlabelled", action="store_true",
                      help="ignore class folders: consistency metrics only")


def _view_set(args: argparse.Namespace):
    """The image set of the dataset view from --dataset / --limit / --unlabelled."""
    from . import dataset_sweep as dsw

    src, limit = str(args.dataset), args.limit
    unlabelled = bool(getattr(args, "unlabelled", False))
    if src.lower() in ("fashion-mnist", "fmnist", "fashion_mnist"):
        return dsw.fashion_mnist_set(limit or 10000)
    path = Path(src)
    if path.is_file() and path.suffix.lower() == ".zip":
        data = dsw.zip_set(path.read_bytes(), src, labels=not unlabelled)
    elif path.is_dir() and any(path.glob("t10k-images-idx3-ubyte*")):
        data = dsw.fashion_mnist_set(limit or 10000, root=path)
        data.source = src
        return data
    elif path.is_dir():
        data = dsw.folder_set(path, labels=not unlabelled)
    else:
        raise DataError(f"dataset {src[:200]!r} is neither 'fashion-mnist', a directory nor a .zip file")
    if limit is not None and limit < len(data):
        raise EquishiftError("--limit applies to Fashion-MNIST only in the dataset view; give a folder or zip "
                             "holding the images to use")
    return data


def _parse_shift_set(text: str):
    text = str(text).strip().lower()
    if text in ("period", "orbit"):
        return text, None
    m = re.fullmatch(r"r(\d+)", text)
    if not m:
        raise EquishiftError(f"--shifts {text[:40]!r}: use period, orbit or rN (e.g. r3)")
    return "radius", int(m.group(1))


def _dataset_view(args: argparse.Namespace, models, protocols) -> Dict[str, Any]:
    """--per-image / --figures / --report: the dashboard's dataset view, written to files."""
    from . import dataset_report as dr
    from . import dataset_sweep as dsw

    data = _view_set(args)
    kind, radius = _parse_shift_set(getattr(args, "shifts", "period"))
    wanted = [] if protocols is None else [p for p in _protocol_names(protocols)
                                           if data.labelled or p not in _ACCURACY]
    show = not args.no_progress
    bar = _progress(len(data) * len(models), show, "dataset view")

    def step(done: int, total: int, stage: str, seen=[0]) -> None:
        if stage == "sweep":
            bar.update(done - seen[0])
            seen[0] = done

    result = dsw.analyse(models, data, kind, mode=getattr(args, "shift_mode", "circular"), radius=radius,
                         batch_size=args.batch_size, seed=args.seed, extra_protocols=wanted, progress=step,
                         cache=dsw.DiskCache())
    bar.close()
    if args.per_image:
        out = Path(args.per_image)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".parquet":
            out.write_bytes(dr.per_image_parquet(result, data))
        else:
            out.write_text(dr.per_image_csv(result, data))
    if args.figures or args.report:
        from . import dataset_plots as dp

        figs = dp.all_figures(result.sweeps, result.leaderboard)
        if args.figures:
            err = dr.write_figures(figs, args.figures)
            (Path(args.figures) / "metrics.json").write_text(dr.metrics_json(result))
            if err:
                print(f"equishift evaluate: figures written as HTML only (no PNG/SVG: {err})", file=sys.stderr)
        if args.report:
            gallery = dsw.fragility(result.sweeps, "flip")[:12]
            for g in gallery:
                g["name"] = data.names[g["index"]]
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text(dr.report_html(result, figs, dr.cli_command(result.settings), gallery))
    return {"result": result, "data": data}


_ACCURACY = ("clean", "shifted-accuracy", "crop-accuracy", "flip-accuracy", "affine-accuracy")


def _print_result(result: Dict[str, Any]) -> None:
    print(f"{result['model']} on {result['dataset']}: {result['n_images']} images, seed {result['seed']}")
    for r in result["protocols"].values():
        extra = f"  drop {100 * r['drop']:+.2f} pts" if "drop" in r else ""
        print(f"  {r['protocol']:<17} {100 * r['value']:6.2f}%  95% CI [{100 * r['ci95'][0]:.2f}, "
              f"{100 * r['ci95'][1]:.2f}]  {r['shift_mode']}: {r['range']}{extra}")


def run(args: argparse.Namespace) -> int:
    from .device import default_device
    from .zoo import load_model

    specs = [args.model] if isinstance(args.model, str) else list(args.model)
    view = any(getattr(args, k, None) for k in ("per_image", "figures", "report"))
    ok = False
    try:
        if len(specs) > 6:
            raise EquishiftError(f"{len(specs)} models given; compare at most 6")
        device = dist_util.init_from_env(default_device(args.device))
        rank = dist_util.rank_and_world()[0]
        if view and dist_util.is_active():
            raise EquishiftError("the dataset view (--per-image, --figures, --report) runs in one process; "
                                 "start it without torchrun")
        models = [load_model(spec, device=device) for spec in specs]
        if view:
            done = _dataset_view(args, models, args.protocol)
            results = done["result"].protocols
        else:
            results = [evaluate(loaded, args.dataset, args.protocol or "all", batch_size=args.batch_size,
                                limit=args.limit, seed=args.seed, progress=not args.no_progress,
                                distributed=dist_util.is_active()) for loaded in models]
        ok = True
    except EquishiftError as e:
        print(f"equishift evaluate: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist_util.shutdown(sync=ok)
    if rank != 0:
        return 0
    if args.json:
        out = results[0] if len(results) == 1 else {"results": results}
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    if args.csv:
        Path(args.csv).write_text("".join(to_csv(r) if i == 0 else to_csv(r).split("\n", 1)[1]
                                          for i, r in enumerate(results)))
    for result in results:
        _print_result(result)
    if view:
        res = done["result"]
        print(f"dataset view: {res.settings['n_images']} images, {res.settings['describe']}")
        for row in res.leaderboard:
            print(f"  {row['model']:<28} consistency over the shift set {100 * row['consistency']['value']:6.2f}%  "
                  f"orbit consistency {100 * row['orbit_consistency']['value']:6.2f}%")
    return 0
