"""Dataset sweeps: many images × a set of shifts × several models, and the aggregates the dataset view shows.

>>> from equishift.dataset_sweep import fashion_mnist_set, shift_set, sweep_dataset
>>> data = fashion_mnist_set(500)
>>> sw = sweep_dataset(load_model("zoo:fmnist-vit-baseline"), data, "period", mode="circular")
>>> consistency_by(sw, "linf")

What is kept per model (N images, K shifts; docs/dataset.md): the top-1 class at every shift ``pred``
[N, K], the probability of the unshifted top-1 ``p_ref`` and of the true class ``p_true`` [N, K], the
unshifted top-1 and its probability, and for anchored models a histogram of the selected phase and of
the top-1/top-2 polyphase norm margin per anchored module. Nothing per pixel, no attention maps: memory is
O(N·K) per model (500 images × the full 32×32 orbit is 5 MB).

Speed: the images of a chunk and all their shifts go through one ``shift_batch`` call and forward passes of
``batch_size`` rows; there is no Python loop over shifts.

Intervals: a proportion over the N images (clean accuracy, orbit consistency, a per-shift consistency) gets
a 95% Wilson interval with n = N. An average over several shifts of the same images (e.g. every shift with
‖δ‖∞ = 2) also uses n = N, the number of independent units: the pairs of one image are correlated, and
counting N·K of them as independent would make the interval too narrow.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
import time
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import DataError, EquishiftError, LimitError
from .evaluation import _prepare, match_classes, wilson_interval
from .shifts import grid, shift_batch

__all__ = ["ImageSet", "fashion_mnist_set", "zip_set", "files_set", "folder_set", "shift_set", "describe_shift_set",
           "ModelSweep", "Cancelled", "sweep_dataset", "sweep_models", "model_key", "DiskCache",
           "consistency_by", "orbit_maps", "per_class", "fragility", "leaderboard_row", "polyphase_stats",
           "per_image_table", "SHIFT_SETS", "DATASET_MODES", "ZIP_LIMITS", "MARGIN_BINS", "ENGINE_VERSION",
           "default_cache_dir", "DatasetResult", "analyse", "leaderboard_protocols", "match_classes",
           "bare_forward_seconds", "sweep_key", "wrap_shift", "wrapped_shifts", "DATASET_PIXEL_LIMITS"]

ENGINE_VERSION = 2
SHIFT_SETS = ("period", "orbit", "radius")
DATASET_MODES = ("circular", "zero", "crop")
# Uploaded archives: more members, more bytes once inflated, or a higher inflation ratio than these is
# refused before anything is decompressed (a zip bomb is a few KB that inflates to GBs).
ZIP_LIMITS = {"max_files": 5000, "max_total_bytes": 512 * 2 ** 20, "max_member_bytes": 32 * 2 ** 20,
              "max_ratio": 200}
# log10 of the relative top-2 margin (S1 - S2) / S1; margins below 1e-8 (and exact ties) go in the first bin.
MARGIN_BINS = np.linspace(-8.0, 0.0, 33)
# More shifts than this per image is refused (a 256-px full orbit is 65,536): each is a forward pass.
_TOTAL_SHIFTS_MAX = 65536
# The shifted copies of one block of rows (plus the shift's own temporary) are kept under this many bytes:
# ``batch_size`` is lowered for large inputs (a 224-px RGB row is 588 KiB; 384 px, 1.7 MiB).
_BLOCK_BYTES_MAX = 256 * 2 ** 20
# Dataset images: more pixels than this in one image, or in the whole set (read from the file headers,
# before anything is decoded), is refused; decoding is the cost of an upload (a 40 MP PNG is ~1 s).
DATASET_PIXEL_LIMITS = {"max_image_pixels": 4_000_000, "max_total_pixels": 1_000_000_000}
# Decoded images are kept (process-wide, LRU) up to this many bytes so sweeps and protocols decode once.
_DECODED_BYTES_MAX = 512 * 2 ** 20


class Cancelled(Exception):
    """Raised inside ``sweep_dataset`` when ``should_stop()`` says so (between chunks)."""


# --- data --------------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """N images with optional class-folder labels, addressed by index; ``key`` is a content hash.

    ``fmnist``: the Fashion-MNIST test split (prepared tensors); otherwise ``blobs`` holds each file's
    bytes (decoded on use with ``equishift.images.load_image``: compressed bytes are what memory holds).
    ``folders[i]``: the class folder of image i, or None for an unlabelled set."""

    name: str
    key: str
    names: List[str]
    folders: Optional[List[str]] = None
    blobs: Optional[List[bytes]] = None
    fmnist: Any = None
    source: str = ""   # what the CLI's --dataset takes to rebuild it ("fashion-mnist", a path)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def labelled(self) -> bool:
        return self.fmnist is not None or self.folders is not None

    @property
    def nbytes(self) -> int:
        if self.fmnist is not None:
            return int(self.fmnist.images.numel() + 8 * len(self))
        return sum(len(b) for b in self.blobs or [])

    @property
    def class_folders(self) -> List[str]:
        if self.fmnist is not None:
            return list(self.fmnist.classes)
        return sorted(set(self.folders or []))

    def labels_for(self, classes: Sequence[str]) -> np.ndarray:
        """Each image's label as an index into a model's ``classes`` (-1 for every image when unlabelled)."""
        n = len(self)
        if self.fmnist is not None:
            names = list(self.fmnist.classes)
            mapping = match_classes(names, classes, self.name) if list(classes) != names else None
            lab = self.fmnist.labels.numpy()
            return lab.astype(np.int64) if mapping is None else np.array([mapping[names[k]] for k in lab])
        if self.folders is None:
            return np.full(n, -1, dtype=np.int64)
        mapping = match_classes(sorted(set(self.folders)), classes, self.name)
        return np.array([mapping[f] for f in self.folders], dtype=np.int64)

    def image(self, i: int):
        """Image i: a PIL RGB image (files; decoded once while the shared decoded-image cache holds it;
        treat it as read-only) or the prepared tensor (Fashion-MNIST)."""
        if self.fmnist is not None:
            return self.fmnist[i][0]
        from .errors import ImageError
        from .images import load_image

        ck = (self.key, int(i))
        hit = _DECODED.get(ck)
        if hit is not None:
            return hit
        try:
            im = load_image(self.blobs[i])
        except ImageError as e:
            raise DataError(f"{self.name}: {self.names[i]}: {e}") from None
        _DECODED.put(ck, im, im.size[0] * im.size[1] * len(im.getbands()))
        return im

    def thumbnail(self, i: int, size: int = 96) -> np.ndarray:
        """uint8 [h, w, 3] for display."""
        if self.fmnist is not None:
            from .data import FMNIST_PAD

            p = FMNIST_PAD
            g = self.fmnist.images[i].numpy()[p:-p, p:-p]
            return np.repeat(g[:, :, None], 3, axis=2)
        from PIL import Image

        im = self.image(i).copy()
        im.thumbnail((size, size), Image.BILINEAR)
        return np.asarray(im.convert("RGB"))

    def for_model(self, loaded) -> "_ModelView":
        return _ModelView(self, self.labels_for(loaded.classes))


class _DecodedCache:
    """A thread-safe LRU of decoded images bounded in bytes (sweeps run on worker threads)."""

    def __init__(self, max_bytes: int):
        import threading
        from collections import OrderedDict

        self.max_bytes, self.bytes = max_bytes, 0
        self._data: "OrderedDict[Any, Tuple[Any, int]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            self._data.move_to_end(key)
            return hit[0]

    def put(self, key, value, size: int) -> None:
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._data[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                self.bytes -= self._data.popitem(last=False)[1][1]

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0


_DECODED = _DecodedCache(_DECODED_BYTES_MAX)


def _labels_key(folders: Optional[List[str]]) -> str:
    # the labels are part of what a sweep computes (p_true, the accuracy protocols): the same files read
    # with and without their folders are two sets
    if folders is None:
        return "-unlabelled"
    return "-labels-" + hashlib.sha256("\0".join(folders).encode()).hexdigest()[:12]


class _ModelView:
    """The set as ``evaluation._prepare`` / ``evaluate`` take it: items (image, label in the model's
    classes; 0 stands in for unknown labels, which only accuracy protocols read)."""

    def __init__(self, data: ImageSet, labels: np.ndarray):
        self.data, self.labels = data, labels
        self.name = data.name
        if data.fmnist is not None:
            self.mean, self.std = data.fmnist.mean, data.fmnist.std

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data.image(int(i)), int(max(self.labels[int(i)], 0))

    def batch(self, idx: torch.Tensor):
        if self.data.fmnist is None:
            items = [self[int(i)] for i in idx]
            return [x for x, _ in items], torch.tensor([y for _, y in items])
        x, _ = self.data.fmnist.batch(idx)
        return x, torch.from_numpy(np.maximum(self.labels[idx.numpy()], 0))


def fashion_mnist_set(n: int = 500, root=None) -> ImageSet:
    """The first ``n`` images of the Fashion-MNIST test split."""
    from .data import FashionMNIST

    if n < 1:
        raise DataError(f"the number of images must be at least 1, got {n}")
    full = FashionMNIST("test", root=root)
    n = min(int(n), len(full))
    sub = FashionMNIST("test", root=root, indices=range(n))
    h = hashlib.sha256(sub.images.numpy().tobytes())
    h.update(sub.labels.numpy().astype(np.int64).tobytes())
    return ImageSet(name=f"Fashion-MNIST test[:{n}]", key=f"fmnist-test-{n}-{h.hexdigest()[:24]}",
                    names=[f"fmnist:{i}" for i in range(n)], fmnist=sub, source="fashion-mnist")


def _image_ext(name: str) -> bool:
    from .data import IMAGE_EXTENSIONS

    return name.lower().endswith(IMAGE_EXTENSIONS)


def _layout(paths: Sequence[str], where: str) -> Optional[List[str]]:
    """Class folder of each path (``class/xxx.png``, optionally under one common top folder), or None
    when the images carry no labels (all in one folder, or at the top)."""
    parts = [p.split("/") for p in paths]
    while parts and all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]  # one wrapping folder (a zipped folder): look inside it
    depth = {len(p) for p in parts}
    if depth == {1}:
        return None
    if depth == {2}:
        folders = [p[0] for p in parts]
        return None if len(set(folders)) == 1 else folders
    deep = next(p for p in parts if len(p) != 2)
    raise DataError(f"{where}: expected class/xxx.png (one folder per class) or images without folders "
                    f"(unlabelled); found {'/'.join(deep)[:80]!r}")


def zip_set(data: bytes, name: str = "upload.zip", *, max_files: int = ZIP_LIMITS["max_files"],
            max_total_bytes: int = ZIP_LIMITS["max_total_bytes"],
            max_member_bytes: int = ZIP_LIMITS["max_member_bytes"],
            max_ratio: float = ZIP_LIMITS["max_ratio"], labels: bool = True) -> ImageSet:
    """An uploaded zip of ``class/xxx.png`` (labelled) or of images without folders (unlabelled).

    Refused with DataError/LimitError before inflating anything: not a zip, an absolute path or ``..``
    in a member name, more than ``max_files`` images, more than ``max_total_bytes`` inflated, a member over
    ``max_member_bytes`` or inflating more than ``max_ratio`` times. Every image is decoded once here (so a
    bad file is named now, not mid-sweep). ``labels=False`` ignores the folders."""
    short = Path(name).name[:80] or "upload.zip"
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DataError(f"{short} is not a readable zip archive ({str(e)[:100]}); upload a .zip of "
                        f"class/xxx.png files") from None
    with zf:
        infos = []
        for info in zf.infolist():
            n = info.filename
            if n.startswith("/") or "\\" in n or re.match(r"^[A-Za-z]:", n) or ".." in n.split("/"):
                raise DataError(f"{short}: member {n[:80]!r} has an absolute or parent ('..') path; refused")
            if info.is_dir() or n.startswith("__MACOSX/") or any(p.startswith(".") for p in n.split("/")):
                continue
            if _image_ext(n):
                infos.append(info)
        if not infos:
            raise DataError(f"{short} holds no images (.png, .jpg, …); expected class/xxx.png")
        if len(infos) > max_files:
            raise LimitError(f"{short} holds {len(infos)} images; the limit is {max_files}")
        total = sum(i.file_size for i in infos)
        if total > max_total_bytes:
            raise LimitError(f"{short} inflates to {total / 2 ** 20:.0f} MB; the limit is "
                             f"{max_total_bytes / 2 ** 20:.0f} MB")
        for i in infos:
            if i.file_size > max_member_bytes:
                raise LimitError(f"{short}: {i.filename[:80]} inflates to {i.file_size / 2 ** 20:.1f} MB; "
                                 f"the limit per image is {max_member_bytes / 2 ** 20:.0f} MB")
            if i.file_size > 1024 and i.file_size > max_ratio * max(i.compress_size, 1):
                raise LimitError(f"{short}: {i.filename[:80]} inflates {i.file_size / max(i.compress_size, 1):.0f}"
                                 f"× (a zip bomb?); the limit is {max_ratio:g}×")
        infos.sort(key=lambda i: i.filename)
        paths = [i.filename for i in infos]
        folders = _layout(paths, short) if labels else None
        blobs = []
        for i in infos:
            with zf.open(i) as f:
                raw = f.read(i.file_size + 1)  # a header that lies about the size cannot inflate more
            if len(raw) > i.file_size:
                raise DataError(f"{short}: {i.filename[:80]} is larger than its header says; refused")
            blobs.append(raw)
    out = ImageSet(name=short, key="zip-" + hashlib.sha256(data).hexdigest()[:32] + _labels_key(folders),
                   names=paths, folders=folders,
                   blobs=blobs, source=name)
    _check_decodes(out)
    return out


def files_set(items: Sequence[Tuple[str, bytes]], name: str = "upload", *, labels: bool = True,
              max_files: int = ZIP_LIMITS["max_files"], max_total_bytes: int = ZIP_LIMITS["max_total_bytes"],
              max_member_bytes: int = ZIP_LIMITS["max_member_bytes"]) -> ImageSet:
    """Uploaded files named by their path in a folder (a browser's folder upload: ``folder/class/xxx.png``):
    the same layout rules, path checks and limits as ``zip_set``; files that are not images are skipped."""
    short = Path(name).name[:80] or "upload"
    kept = []
    for n, data in items:
        n = str(n).replace("\\", "/")
        if n.startswith("/") or re.match(r"^[A-Za-z]:", n) or ".." in n.split("/"):
            raise DataError(f"{short}: file {n[:80]!r} has an absolute or parent ('..') path; refused")
        if any(p.startswith(".") for p in n.split("/")) or not _image_ext(n):
            continue
        if len(data) > max_member_bytes:
            raise LimitError(f"{short}: {n[:80]} is {len(data) / 2 ** 20:.1f} MB; the limit per image is "
                             f"{max_member_bytes / 2 ** 20:.0f} MB")
        kept.append((n, data))
    if not kept:
        raise DataError(f"{short} holds no images (.png, .jpg, …); expected class/xxx.png")
    if len(kept) > max_files:
        raise LimitError(f"{short} holds {len(kept)} images; the limit is {max_files}")
    total = sum(len(d) for _, d in kept)
    if total > max_total_bytes:
        raise LimitError(f"{short} holds {total / 2 ** 20:.0f} MB of images; the limit is "
                         f"{max_total_bytes / 2 ** 20:.0f} MB")
    kept.sort(key=lambda t: t[0])
    paths = [n for n, _ in kept]
    h = hashlib.sha256()
    for n, d in kept:
        h.update(n.encode() + b"\0" + hashlib.sha256(d).digest())
    folders = _layout(paths, short) if labels else None
    out = ImageSet(name=short, key="files-" + h.hexdigest()[:32] + _labels_key(folders), names=paths,
                   folders=folders, blobs=[d for _, d in kept], source=short)
    _check_decodes(out)
    return out


def folder_set(root, labels: bool = True, max_files: int = ZIP_LIMITS["max_files"],
               max_total_bytes: int = ZIP_LIMITS["max_total_bytes"],
               max_member_bytes: int = ZIP_LIMITS["max_member_bytes"]) -> ImageSet:
    """A directory of ``class/xxx.png`` or of images without folders (the CLI's ``--dataset DIR``); the
    same limits as an upload (files, bytes per image and in all, checked on the sizes before reading)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and _image_ext(p.name)
                   and not any(s.startswith(".") for s in p.relative_to(root).parts))
    if not files:
        raise DataError(f"{root} holds no images (.png, .jpg, …)")
    if len(files) > max_files:
        raise LimitError(f"{root} holds {len(files)} images; the limit is {max_files}")
    rel = [p.relative_to(root).as_posix() for p in files]
    total = 0
    for p, r in zip(files, rel):
        size = p.stat().st_size
        if size > max_member_bytes:
            raise LimitError(f"{str(root)[-80:]}: {r[:80]} is {size / 2 ** 20:.1f} MB; the limit per image is "
                             f"{max_member_bytes / 2 ** 20:.0f} MB")
        total += size
    if total > max_total_bytes:
        raise LimitError(f"{str(root)[-80:]} holds {total / 2 ** 20:.0f} MB of images; the limit is "
                         f"{max_total_bytes / 2 ** 20:.0f} MB")
    blobs = []
    for p, r in zip(files, rel):
        with open(p, "rb") as f:
            b = f.read(max_member_bytes + 1)  # a file grown since the check is not read whole
        if len(b) > max_member_bytes:
            raise LimitError(f"{str(root)[-80:]}: {r[:80]} is over {max_member_bytes / 2 ** 20:.0f} MB")
        blobs.append(b)
    h = hashlib.sha256()
    for r, b in zip(rel, blobs):
        h.update(r.encode() + b"\0" + hashlib.sha256(b).digest())
    folders = _layout(rel, str(root)) if labels else None
    out = ImageSet(name=str(root), key="dir-" + h.hexdigest()[:32] + _labels_key(folders), names=rel,
                   folders=folders, blobs=blobs, source=str(root))
    _check_decodes(out)
    return out


def _check_decodes(data: ImageSet, max_image_pixels: int = DATASET_PIXEL_LIMITS["max_image_pixels"],
                   max_total_pixels: int = DATASET_PIXEL_LIMITS["max_total_pixels"]) -> None:
    """Refuse oversized images from their headers (nothing decoded yet), then decode each once, so a bad
    file is named at upload and the sweep finds it decoded (while the decoded-image cache holds it)."""
    from PIL import Image

    total = 0
    for i, blob in enumerate(data.blobs or []):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                w, hgt = im.size
        except Exception as e:  # noqa: BLE001 - any unreadable header is the file's problem
            raise DataError(f"{data.name}: {data.names[i][:80]} is not a readable image "
                            f"({type(e).__name__}: {str(e)[:80]})") from None
        if w * hgt > max_image_pixels:
            raise LimitError(f"{data.name}: {data.names[i][:80]} is {w}×{hgt} ({w * hgt / 1e6:.1f} MP); the "
                             f"limit per dataset image is {max_image_pixels / 1e6:g} MP")
        total += w * hgt
        if total > max_total_pixels:
            raise LimitError(f"{data.name}: the images hold over {max_total_pixels / 1e6:.0f} MP in all "
                             f"(reached at {data.names[i][:80]}); the limit per set is "
                             f"{max_total_pixels / 1e6:.0f} MP")
    for i in range(len(data)):
        data.image(i)


# --- shifts ------------------------------------------------------------------------------------------
def shift_set(kind: str, stride: int, size: Tuple[int, int], mode: str = "circular",
              radius: Optional[int] = None) -> torch.Tensor:
    """The shifts a dataset sweep visits, LongTensor [K, 2], always holding (0, 0).

    ``period``: {0..s-1}² (s = patch size); ``orbit``: every circular shift {0..H-1}×{0..W-1} (circular
    mode only: other modes have no orbit); ``radius``: {-r..r}² (‖δ‖∞ ≤ r)."""
    if kind not in SHIFT_SETS:
        raise EquishiftError(f"unknown shift set {kind!r}; choose one of {', '.join(SHIFT_SETS)}")
    if mode not in DATASET_MODES:
        raise EquishiftError(f"unknown shift mode {mode!r} for a dataset sweep; choose one of "
                             f"{', '.join(DATASET_MODES)}")
    h, w = size
    if kind == "period":
        return grid(range(stride), range(stride))
    if kind == "orbit":
        if mode != "circular":
            raise EquishiftError(f"the full orbit exists for circular shifts only, not {mode!r}; use the "
                                 f"period or a radius")
        if h * w > _TOTAL_SHIFTS_MAX:
            raise LimitError(f"the full orbit of a {h}×{w} input is {h * w:,} shifts per image; the limit is "
                             f"{_TOTAL_SHIFTS_MAX:,}: use one patch period or a radius")
        return grid(range(h), range(w))
    if radius is None or int(radius) < 0:
        raise EquishiftError(f"a radius shift set needs a radius r >= 0, got {radius}")
    r = int(radius)
    if r >= min(h, w):
        raise LimitError(f"radius {r} is not smaller than the image ({h}×{w})")
    return grid(range(-r, r + 1), range(-r, r + 1))


def describe_shift_set(kind: str, mode: str, shifts: torch.Tensor, radius: Optional[int] = None) -> str:
    what = {"period": "one patch period", "orbit": "the full orbit",
            "radius": f"‖δ‖∞ ≤ {radius}"}[kind]
    return (f"{mode} shifts, {what}: dy∈[{int(shifts[:, 0].min())}, {int(shifts[:, 0].max())}], "
            f"dx∈[{int(shifts[:, 1].min())}, {int(shifts[:, 1].max())}] ({len(shifts)} shifts)")


# --- one model's sweep --------------------------------------------------------------------------------
@dataclass
class ModelSweep:
    """One model on one image set and shift set (see the module doc for the arrays)."""

    spec: str
    name: str
    classes: List[str]
    shifts: np.ndarray                  # int64 [K, 2]
    mode: str
    labels: np.ndarray                  # int64 [N], -1 unknown
    ref_pred: np.ndarray                # int64 [N]
    ref_prob: np.ndarray                # float32 [N]
    pred: np.ndarray                    # int16 [N, K]
    p_ref: np.ndarray                   # float32 [N, K]
    p_true: Optional[np.ndarray]        # float32 [N, K] (None when unlabelled)
    phase_counts: Dict[str, np.ndarray] = field(default_factory=dict)   # module -> int64 [s, s], all shifts
    ref_phase_counts: Dict[str, np.ndarray] = field(default_factory=dict)  # the same, unshifted images only
    margin_hist: Dict[str, np.ndarray] = field(default_factory=dict)    # module -> int64 [len(MARGIN_BINS)-1]
    margin_min: Dict[str, float] = field(default_factory=dict)
    tie_tol: Dict[str, float] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.pred.shape[0])

    @property
    def labelled(self) -> bool:
        return self.p_true is not None

    @property
    def consistent(self) -> np.ndarray:
        return self.pred == self.ref_pred[:, None]

    @property
    def nbytes(self) -> int:
        arrays = [self.shifts, self.labels, self.ref_pred, self.ref_prob, self.pred, self.p_ref, self.p_true,
                  *self.phase_counts.values(), *self.margin_hist.values()]
        return sum(a.nbytes for a in arrays if a is not None)

    def ref_index(self) -> int:
        hit = np.flatnonzero((self.shifts[:, 0] == 0) & (self.shifts[:, 1] == 0))
        return int(hit[0])

    # persistence: arrays in an .npz, everything else in its JSON sidecar ------------------------------
    def arrays(self) -> Dict[str, np.ndarray]:
        out = {"shifts": self.shifts, "labels": self.labels, "ref_pred": self.ref_pred, "ref_prob": self.ref_prob,
               "pred": self.pred, "p_ref": self.p_ref}
        if self.p_true is not None:
            out["p_true"] = self.p_true
        for k, v in self.phase_counts.items():
            out[f"phase/{k}"] = v
        for k, v in self.margin_hist.items():
            out[f"margin/{k}"] = v
        for k, v in self.ref_phase_counts.items():
            out[f"refphase/{k}"] = v
        return out

    def header(self) -> Dict[str, Any]:
        return {"spec": self.spec, "name": self.name, "classes": self.classes, "mode": self.mode,
                "margin_min": self.margin_min, "tie_tol": self.tie_tol, "meta": self.meta}

    @classmethod
    def from_parts(cls, header: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> "ModelSweep":
        phase = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("phase/")}
        margin = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("margin/")}
        refphase = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("refphase/")}
        return cls(spec=header["spec"], name=header["name"], classes=list(header["classes"]),
                   shifts=arrays["shifts"], mode=header["mode"], labels=arrays["labels"],
                   ref_pred=arrays["ref_pred"], ref_prob=arrays["ref_prob"], pred=arrays["pred"],
                   p_ref=arrays["p_ref"], p_true=arrays.get("p_true"), phase_counts=phase, margin_hist=margin, ref_phase_counts=refphase,
                   margin_min={k: float(v) for k, v in header["margin_min"].items()},
                   tie_tol={k: float(v) for k, v in header["tie_tol"].items()}, meta=dict(header["meta"]))


def _n_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _weights_sha256(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# by the model object itself, weakly: a model dropped from the model cache takes its hash with it
_WEIGHT_HASHES: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
# card fields that describe results, not how the model reads an image
_CARD_NOT_KEYED = ("metrics", "warnings")


def model_key(loaded) -> str:
    """The spec, a hash of the weights and of how the model reads an image (the card's preprocessing and
    classes, the input size, the stride): a changed file or card under the same spec is another model."""
    try:
        wh = _WEIGHT_HASHES.get(loaded.model)
    except TypeError:  # not weak-referenceable: hash every time
        wh = None
    if wh is None:
        wh = _weights_sha256(loaded.model)
        try:
            _WEIGHT_HASHES[loaded.model] = wh
        except TypeError:
            pass
    card = {k: v for k, v in dict(getattr(loaded, "card", None) or {}).items() if k not in _CARD_NOT_KEYED}
    how = json.dumps({"card": card, "input_size": list(loaded.input_size), "stride": int(loaded.stride),
                      "classes": list(loaded.classes)}, sort_keys=True, default=str)
    return f"{loaded.spec}#{wh[:24]}#{hashlib.sha256(how.encode()).hexdigest()[:16]}"


def sweep_key(loaded, data: ImageSet, kind: str, mode: str, radius: Optional[int]) -> Dict[str, Any]:
    return {"engine": ENGINE_VERSION, "model": model_key(loaded), "data": data.key, "n": len(data),
            "shift_set": kind, "radius": radius if kind == "radius" else None, "mode": mode}


def _row_batch(batch_size: int, chw: Tuple[int, int, int]) -> int:
    """``batch_size`` lowered so one block's shifted copies stay under ``_BLOCK_BYTES_MAX`` (float32, the
    copy and shift_batch's temporary)."""
    row = 2 * 4 * chw[0] * chw[1] * chw[2]
    return max(1, min(int(batch_size), _BLOCK_BYTES_MAX // row))


def _margin_of(shifts: torch.Tensor, mode: str) -> int:
    # crop mode cuts windows out of a canvas with this many pixels of context on each side
    return max(1, int(shifts.abs().max())) if mode == "crop" else 0


def sweep_dataset(loaded, data: ImageSet, kind: str = "period", *, mode: str = "circular",
                  radius: Optional[int] = None, batch_size: int = 256,
                  progress: Optional[Callable[[int, int], None]] = None,
                  should_stop: Optional[Callable[[], bool]] = None) -> ModelSweep:
    """Every image of ``data`` at every shift of the shift set, through one model (``LoadedModel``).

    ``batch_size``: rows (image × shift) per forward pass. ``progress(done, N)`` after each chunk of
    images; ``should_stop()`` is asked before each chunk and raises ``Cancelled`` when true."""
    from .polyphase import PolyphaseAnchor, record_anchors

    if batch_size < 1:
        raise EquishiftError(f"batch size must be >= 1, got {batch_size}")
    c, h, w = loaded.input_size
    shifts = shift_set(kind, loaded.stride, (h, w), mode, radius)
    k = len(shifts)
    n = len(data)
    if n == 0:
        raise DataError(f"{data.name} has no images")
    view = data.for_model(loaded)
    labels = view.labels
    labelled = bool((labels >= 0).all()) and data.labelled
    margin = _margin_of(shifts, mode)
    batch_size = _row_batch(batch_size, (c, h, w))
    # rows are (image, shift) pairs, image-major, the unshifted view first for each image (its top-1 is what
    # the other shifts are compared with); forward passes and shifted copies are blocks of at most
    # ``batch_size`` rows, so memory does not grow with K (a 224-px full orbit is 50,176 shifts per image)
    zero = int(np.flatnonzero((shifts[:, 0] == 0) & (shifts[:, 1] == 0))[0])
    order = torch.tensor([zero] + [j for j in range(k) if j != zero])
    ordered = shifts[order]
    chunk = max(1, batch_size // k)
    model = loaded.model
    anchors = {name: m.stride for name, m in model.named_modules() if isinstance(m, PolyphaseAnchor)}
    phase = {a: np.zeros((s, s), dtype=np.int64) for a, s in anchors.items()}
    ref_phase = {a: np.zeros((s, s), dtype=np.int64) for a, s in anchors.items()}
    mhist = {a: np.zeros(len(MARGIN_BINS) - 1, dtype=np.int64) for a in anchors}
    mmin = {a: math.inf for a in anchors}
    tols: Dict[str, float] = {}
    pred = np.empty((n, k), dtype=np.int16)
    p_ref = np.empty((n, k), dtype=np.float32)
    p_true = np.empty((n, k), dtype=np.float32) if labelled else None
    ref_pred = np.empty(n, dtype=np.int64)
    ref_prob = np.empty(n, dtype=np.float32)
    cols = order.numpy()
    forward_s = 0.0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, n, chunk):
            if should_stop is not None and should_stop():
                raise Cancelled(f"cancelled after {start} of {n} images")
            idx = torch.arange(start, min(n, start + chunk))
            b = len(idx)
            canvas, _ = _prepare(view, loaded, idx, margin)
            black = loaded.black(canvas)
            rp = torch.empty(b, dtype=torch.long, device=canvas.device)
            for r0 in range(0, b * k, batch_size):
                if r0 and should_stop is not None and should_stop():
                    raise Cancelled(f"cancelled after {start} of {n} images")
                r = torch.arange(r0, min(b * k, r0 + batch_size))
                img, pos = r // k, r % k
                rows = canvas[img.to(canvas.device)]
                sb = ordered[pos].to(canvas.device)
                if mode == "crop":
                    views = shift_batch(rows, sb, "crop", size=(h, w))
                elif mode == "zero":  # black comes in, not the value 0 of the normalised input
                    views = shift_batch(rows - black, sb, "zero") + black
                else:
                    views = shift_batch(rows, sb, "circular")
                del rows
                t1 = time.perf_counter()
                if anchors:
                    with record_anchors(model) as rec:
                        logits = model(views)
                else:
                    logits = model(views)
                forward_s += time.perf_counter() - t1
                del views
                probs = logits.float().softmax(-1)
                top = probs.argmax(-1)
                first = (pos == 0).to(probs.device)
                img_d = img.to(probs.device)
                rp[img_d[first]] = top[first]  # the unshifted row precedes the image's other rows
                pr = probs.gather(1, rp[img_d][:, None])[:, 0]
                gi, gc = (img + start).numpy(), cols[pos.numpy()]
                pred[gi, gc] = top.cpu().numpy()
                p_ref[gi, gc] = pr.cpu().numpy()
                if first.any():
                    ref_pred[gi[first.cpu().numpy()]] = top[first].cpu().numpy()
                    ref_prob[gi[first.cpu().numpy()]] = pr[first].cpu().numpy()
                if p_true is not None:
                    y = torch.from_numpy(labels[gi]).to(probs.device)
                    p_true[gi, gc] = probs.gather(1, y[:, None])[:, 0].cpu().numpy()
                for a, st in anchors.items():
                    if a not in rec:
                        continue
                    ix = rec[a].numpy()
                    np.add.at(phase[a], (ix[:, 0] % st, ix[:, 1] % st), 1)
                    f = ix[first.cpu().numpy()]
                    np.add.at(ref_phase[a], (f[:, 0] % st, f[:, 1] % st), 1)
                    m = rec.margins[a].double().numpy()
                    mmin[a] = min(mmin[a], float(m.min()))
                    lg = np.log10(np.clip(m, 10 ** MARGIN_BINS[0], 1.0))
                    mhist[a] += np.histogram(lg, bins=MARGIN_BINS)[0]
                    tols[a] = float(rec.tie_tol[a])
            if progress is not None:
                progress(start + b, n)
    seconds = time.perf_counter() - t0
    return ModelSweep(
        spec=loaded.spec, name=loaded.name, classes=list(loaded.classes), shifts=shifts.numpy().astype(np.int64),
        mode=mode, labels=labels, ref_pred=ref_pred, ref_prob=ref_prob, pred=pred, p_ref=p_ref, p_true=p_true,
        phase_counts=phase, ref_phase_counts=ref_phase, margin_hist=mhist, margin_min={a: v for a, v in mmin.items() if v != math.inf},
        tie_tol=tols,
        meta={"data": data.name, "data_key": data.key, "shift_set": kind, "radius": radius, "stride": loaded.stride,
              "input_size": [c, h, w], "n_params": _n_params(model), "seconds": seconds, "forward_seconds": forward_s,
              "rows": n * k, "device": str(loaded.device), "batch_size": batch_size,
              "describe": describe_shift_set(kind, mode, shifts, radius),
              "anchoring": loaded.card.get("anchoring")})


def bare_forward_seconds(loaded, rows: int, batch_size: int = 256, repeat: int = 1) -> float:
    """Seconds of plain forward passes over ``rows`` inputs of the model's size in ``batch_size`` batches
    (the speed a dataset sweep is measured against); the fastest of ``repeat`` runs."""
    c, h, w = loaded.input_size
    x = torch.randn(min(rows, batch_size), c, h, w, device=loaded.device)
    best = math.inf
    with torch.inference_mode():
        loaded.model(x[: min(len(x), 8)])
        for _ in range(repeat):
            t0 = time.perf_counter()
            done = 0
            while done < rows:
                b = min(batch_size, rows - done)
                loaded.model(x[:b])
                done += b
            if x.is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return best


# --- disk cache ----------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """$EQUISHIFT_CACHE_DIR/dataset, else ~/.cache/equishift/dataset."""
    env = os.environ.get("EQUISHIFT_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "equishift") / "dataset"


def _key_name(key: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]


class DiskCache:
    """Sweeps saved as ``<hash of key>.npz`` (arrays) + ``.json`` (the key, the npz's sha256, the rest).
    ``get`` returns None unless the JSON's key equals the one asked for and the npz's hash matches, so a
    stale, truncated or foreign file is recomputed, never trusted."""

    def __init__(self, root=None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def paths(self, key: Dict[str, Any]) -> Tuple[Path, Path]:
        name = _key_name(key)
        return self.root / f"{name}.npz", self.root / f"{name}.json"

    def get(self, key: Dict[str, Any]) -> Optional[ModelSweep]:
        npz, js = self.paths(key)
        try:
            header = json.loads(js.read_text())
            if header.get("key") != json.loads(json.dumps(key)):
                return None
            raw = npz.read_bytes()
            if hashlib.sha256(raw).hexdigest() != header.get("npz_sha256"):
                return None
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            return ModelSweep.from_parts(header["sweep"], arrays)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
            return None

    def put(self, key: Dict[str, Any], sw: ModelSweep) -> Optional[Path]:
        """Write atomically; an unwritable cache directory is not an error (returns None)."""
        npz, js = self.paths(key)
        buf = io.BytesIO()
        np.savez_compressed(buf, **sw.arrays())
        raw = buf.getvalue()
        header = {"key": key, "npz_sha256": hashlib.sha256(raw).hexdigest(), "sweep": sw.header()}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for path, content in ((npz, raw), (js, json.dumps(header, indent=1).encode())):
                fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".part-")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(content)
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        except OSError:
            return None
        self.prune()
        return npz

    def get_json(self, key: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """A JSON result saved with ``put_json`` under exactly this key, else None."""
        try:
            stored = json.loads(self.paths(key)[1].read_text())
            return stored["value"] if stored.get("key") == json.loads(json.dumps(key)) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put_json(self, key: Dict[str, Any], value: Dict[str, Any]) -> bool:
        """Write atomically; False (and no file left behind) when the directory is unwritable or the value
        is not JSON (a cache that cannot hold a result is not an error)."""
        try:
            text = json.dumps({"key": key, "value": value})  # before any file: a TypeError leaves nothing
        except (TypeError, ValueError):
            return False
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".part-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.paths(key)[1])
            tmp = None
        except OSError:
            return False
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        self.prune()
        return True

    def prune(self, max_bytes: Optional[int] = None) -> int:
        """Delete the least recently written entries until the directory holds at most ``max_bytes``
        ($EQUISHIFT_DATASET_CACHE_MB, default 2048 MB); returns the bytes removed."""
        if max_bytes is None:
            try:
                max_bytes = int(float(os.environ.get("EQUISHIFT_DATASET_CACHE_MB", 2048)) * 2 ** 20)
            except ValueError:
                max_bytes = 2048 * 2 ** 20
        try:
            files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.root.iterdir()
                     if p.suffix in (".npz", ".json") and not p.name.startswith(".")]
        except OSError:
            return 0
        total = sum(f[1] for f in files)
        removed = 0
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= max_bytes:
                break
            try:
                p.unlink()
            except OSError:
                continue
            total -= size
            removed += size
        return removed


def sweep_models(models: Sequence[Any], data: ImageSet, kind: str = "period", *, mode: str = "circular",
                 radius: Optional[int] = None, batch_size: int = 256, cache: Optional[DiskCache] = None,
                 memory: Optional[Dict[str, ModelSweep]] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None) -> List[ModelSweep]:
    """``sweep_dataset`` for each model, reusing ``memory`` (a dict keyed by the key's hash) and ``cache``
    (disk). ``progress(images done, N × models)`` over all models."""
    out = []
    n = len(data)
    for j, lm in enumerate(models):
        key = sweep_key(lm, data, kind, mode, radius)
        name = _key_name(key)
        sw = memory.get(name) if memory is not None else None
        if sw is None and cache is not None:
            sw = cache.get(key)
        if sw is None:
            def each(done: int, total: int, j=j) -> None:
                if progress is not None:
                    progress(j * n + done, n * len(models))
            sw = sweep_dataset(lm, data, kind, mode=mode, radius=radius, batch_size=batch_size, progress=each,
                               should_stop=should_stop)
            if cache is not None:
                cache.put(key, sw)
        if memory is not None:
            memory[name] = sw
        if progress is not None:
            progress((j + 1) * n, n * len(models))
        out.append(sw)
    return out


# --- aggregates ----------------------------------------------------------------------------------------
def _wilson_rows(means: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    lo, hi = zip(*(wilson_interval(int(round(m * n)), n) if np.isfinite(m) else (np.nan, np.nan)
                   for m in means)) if len(means) else ((), ())
    return np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)


def wrap_shift(v, size: int):
    """A circular shift's representative in [-size/2, size/2): δ and δ ± size are the same shift."""
    return ((np.asarray(v) + size // 2) % size) - size // 2


def wrapped_shifts(sw: ModelSweep) -> np.ndarray:
    """The sweep's shifts, circular ones wrapped per axis (dy by H, dx by W); other modes as they are."""
    s = sw.shifts
    size = sw.meta.get("input_size") or [0, 0, 0]
    h, w = int(size[1] or 0), int(size[2] or 0)
    if sw.mode != "circular" or not h or not w:
        return s
    return np.stack([wrap_shift(s[:, 0], h), wrap_shift(s[:, 1], w)], 1)


def consistency_by(sw: ModelSweep, by: str = "linf") -> Dict[str, np.ndarray]:
    """Fraction of images whose top-1 is unchanged, by ‖δ‖∞ (``linf``), by ``dy`` or by ``dx``: for each
    value v, the mean over images of the fraction of shifts with that value where the top-1 held; 95%
    Wilson interval with n = N images. Returns {"value", "consistency", "lo", "hi", "shifts"}."""
    s = sw.shifts
    key = {"linf": np.abs(s).max(1), "dy": s[:, 0], "dx": s[:, 1]}.get(by)
    if key is None:
        raise EquishiftError(f"unknown grouping {by!r}; use linf, dy or dx")
    if by == "linf":
        key = np.abs(wrapped_shifts(sw)).max(1)
    cons = sw.consistent.astype(np.float64)
    values = np.unique(key)
    mean = np.array([cons[:, key == v].mean() for v in values])
    lo, hi = _wilson_rows(mean, sw.n)
    return {"value": values, "consistency": mean, "lo": lo, "hi": hi,
            "shifts": np.array([(key == v).sum() for v in values])}


def orbit_maps(sw: ModelSweep) -> Dict[str, Any]:
    """Per (dy, dx), over the images: mean probability of the unshifted top-1, of the true class (None when
    unlabelled), and the flip rate 1 - consistency with its Wilson interval. Grids [len(dys), len(dxs)]."""
    dys, iy = np.unique(sw.shifts[:, 0], return_inverse=True)
    dxs, ix = np.unique(sw.shifts[:, 1], return_inverse=True)

    def lay(v: np.ndarray) -> np.ndarray:
        z = np.full((len(dys), len(dxs)), np.nan)
        z[iy, ix] = v
        return z

    flips = (~sw.consistent).sum(0)
    lo_hi = np.array([wilson_interval(int(f), sw.n) for f in flips])
    return {"dy": dys, "dx": dxs, "p_ref": lay(sw.p_ref.mean(0)),
            "p_true": None if sw.p_true is None else lay(sw.p_true.mean(0)),
            "flip": lay(flips / sw.n), "flip_lo": lay(lo_hi[:, 0]), "flip_hi": lay(lo_hi[:, 1])}


def _prop(count: float, n: int) -> Dict[str, Any]:
    """A proportion: ``count`` successes of ``n`` images. ``count`` may be a sum of per-image fractions (a
    mean over shifts): the value stays exact and the Wilson interval uses it rounded to whole images."""
    lo, hi = wilson_interval(int(round(count)), int(n))
    c = int(count) if float(count).is_integer() else round(float(count), 6)
    return {"value": (count / n) if n else float("nan"), "count": c, "n": int(n), "ci95": [lo, hi]}


def per_class(sw: ModelSweep) -> List[Dict[str, Any]]:
    """One row per class with images (by true label; by unshifted prediction when unlabelled): clean
    accuracy, shifted accuracy (mean over the shift set), consistency (mean over the shift set) and orbit
    consistency (the top-1 held at every shift), each with a 95% Wilson interval (n = the class's images)."""
    labelled = sw.labelled
    group = sw.labels if labelled else sw.ref_pred
    cons = sw.consistent
    rows = []
    for c in np.unique(group):
        m = group == c
        nc = int(m.sum())
        row = {"class": sw.classes[int(c)] if 0 <= c < len(sw.classes) else str(c), "class_index": int(c),
               "n": nc, "grouped_by": "label" if labelled else "unshifted prediction"}
        if labelled:
            row["clean_accuracy"] = _prop(int((sw.ref_pred[m] == c).sum()), nc)
            row["shifted_accuracy"] = _prop(float((sw.pred[m] == c).mean(1).sum()), nc)
        row["consistency"] = _prop(float(cons[m].mean(1).sum()), nc)
        row["orbit_consistency"] = _prop(int(cons[m].all(1).sum()), nc)
        rows.append(row)
    return rows


def fragility(sweeps: Sequence[ModelSweep], by: str = "flip", model: int = 0) -> List[Dict[str, Any]]:
    """Images ranked by fragility under model ``model``: ``flip`` sorts by the smallest ‖δ‖∞ that flips the
    top-1 (images that never flip last), ties by the larger probability drop; ``drop`` by the largest drop
    of the unshifted top-1's probability. Each row: index, the worst shift (the flipping shift with the
    lowest p_ref, else the shift of the lowest p_ref), the drop, and every model's prediction unshifted and
    at that shift."""
    if by not in ("flip", "drop"):
        raise EquishiftError(f"unknown ranking {by!r}; use flip or drop")
    sw = sweeps[model]
    s = sw.shifts
    size = np.abs(wrapped_shifts(sw)).max(1).astype(float)
    flips = ~sw.consistent
    flip_size = np.where(flips, size[None, :], np.inf).min(1)
    drop = sw.ref_prob[:, None] - sw.p_ref
    # worst shift: among the smallest flipping shifts the one with the lowest p_ref; no flip: lowest p_ref
    masked = np.where(flips & (size[None, :] == flip_size[:, None]), sw.p_ref, np.inf)
    worst = np.where(np.isfinite(flip_size), masked.argmin(1), sw.p_ref.argmin(1))
    max_drop = drop.max(1)
    order = (np.lexsort((-max_drop, flip_size)) if by == "flip" else np.argsort(-max_drop, kind="stable"))
    # each model has its own shift set (its stride, its input size): find the ranked model's worst shift
    # in each of them; a model that did not visit it says "n/a"
    where = [{(int(a), int(b)): j for j, (a, b) in enumerate(o.shifts)} for o in sweeps]
    rows = []
    for i in order:
        k = int(worst[i])
        shift = (int(s[k, 0]), int(s[k, 1]))
        preds = []
        for o, at in zip(sweeps, where):
            ko = at.get(shift)
            preds.append({"model": o.name, "unshifted": o.classes[int(o.ref_pred[i])],
                          "at_worst": "n/a" if ko is None else o.classes[int(o.pred[i, ko])],
                          "p_ref_at_worst": None if ko is None else float(o.p_ref[i, ko])})
        rows.append({
            "index": int(i), "worst_shift": list(shift),
            "smallest_flip": None if not np.isfinite(flip_size[i]) else int(flip_size[i]),
            "max_drop": float(max_drop[i]), "label": int(sw.labels[i]), "predictions": preds,
        })
    return rows


def polyphase_stats(sw: ModelSweep) -> List[Dict[str, Any]]:
    """Per anchored module: phase selection frequencies [s, s] (sum 1) over all images × shifts
    (``frequency``; over a whole circular period every phase comes up equally often by construction) and
    over the unshifted images (``ref_frequency``: where the data's polyphase energy sits), the margin histogram (counts over
    log10 bins ``MARGIN_BINS``), the smallest margin, the tie tolerance and how many choices were near-ties
    (margin within 10× the tolerance)."""
    out = []
    for a, counts in sw.phase_counts.items():
        total = int(counts.sum())
        hist = sw.margin_hist.get(a, np.zeros(len(MARGIN_BINS) - 1, dtype=np.int64))
        tol = sw.tie_tol.get(a)
        near = None
        if tol is not None and tol > 0:
            near = int(hist[MARGIN_BINS[1:] <= math.log10(10 * tol)].sum())
        ref = sw.ref_phase_counts.get(a, np.zeros_like(counts))
        out.append({"module": a, "stride": int(counts.shape[0]), "choices": total,
                    "frequency": counts / max(total, 1), "ref_frequency": ref / max(int(ref.sum()), 1), "margin_hist": hist, "margin_min": sw.margin_min.get(a),
                    "tie_tol": tol, "near_ties": near})
    return out


def leaderboard_row(sw: ModelSweep, protocols: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One model's row: params, clean and shifted accuracy, consistency A/B (``evaluate``'s protocols, when
    given), orbit consistency over the shift set, mean consistency, forward time per image·shift."""
    cons = sw.consistent
    row: Dict[str, Any] = {"model": sw.name, "spec": sw.spec, "params": int(sw.meta.get("n_params", 0)),
                           "n_images": sw.n, "shifts": int(len(sw.shifts))}
    if sw.labelled:
        row["clean_accuracy"] = _prop(int((sw.ref_pred == sw.labels).sum()), sw.n)
        row["shifted_accuracy"] = _prop(float((sw.pred == sw.labels[:, None]).mean(1).sum()), sw.n)
    row["consistency"] = _prop(float(cons.mean(1).sum()), sw.n)
    row["orbit_consistency"] = _prop(int(cons.all(1).sum()), sw.n)
    rows = max(1, int(sw.meta.get("rows", 1)))
    row["forward_ms_per_image_shift"] = 1000 * float(sw.meta.get("forward_seconds", 0.0)) / rows
    row["sweep_seconds"] = float(sw.meta.get("seconds", 0.0))
    for name in ("consistency-a", "consistency-b", "period-orbit", "shifted-accuracy", "clean"):
        r = (protocols or {}).get(name)
        if r is not None:
            row[name] = {"value": r["value"], "count": r["count"], "n": r["n_images"], "ci95": list(r["ci95"])}
    return row


def per_image_table(sweeps: Sequence[ModelSweep], data: Optional[ImageSet] = None) -> List[Dict[str, Any]]:
    """One row per image and model: name, label, unshifted prediction and probability, consistency over
    the shift set, whether the top-1 held at every shift, the smallest flipping ‖δ‖∞, the worst shift and
    the largest probability drop (the table the CSV/Parquet export writes)."""
    out = []
    for j, sw in enumerate(sweeps):
        frag = {r["index"]: r for r in fragility(sweeps, "drop", model=j)}
        cons = sw.consistent
        for i in range(sw.n):
            f = frag[i]
            label = int(sw.labels[i])
            out.append({
                "image": data.names[i] if data is not None else str(i), "index": i, "model": sw.name, "spec": sw.spec,
                "label": sw.classes[label] if label >= 0 else "",
                "pred": sw.classes[int(sw.ref_pred[i])], "prob": float(sw.ref_prob[i]),
                "correct": (bool(sw.ref_pred[i] == label) if label >= 0 else None),
                "shifted_accuracy": float((sw.pred[i] == label).mean()) if label >= 0 else None,
                "consistency": float(cons[i].mean()), "orbit_consistent": bool(cons[i].all()),
                "smallest_flip": f["smallest_flip"], "worst_dy": f["worst_shift"][0], "worst_dx": f["worst_shift"][1],
                "max_drop": f["max_drop"],
            })
    return out


# --- the whole dataset view's numbers -------------------------------------------------------------------
@dataclass
class DatasetResult:
    """What the dataset view shows: one ``ModelSweep`` per model, ``evaluate``'s protocol results per
    model (consistency A/B, clean and shifted accuracy; period-orbit when the sweep does not give it) and
    the leaderboard rows built from both."""

    data_name: str
    sweeps: List[ModelSweep]
    protocols: List[Dict[str, Any]]
    leaderboard: List[Dict[str, Any]]
    settings: Dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sweeps)


def leaderboard_protocols(labelled: bool, kind: str, mode: str) -> List[str]:
    """The ``evaluate`` protocols the leaderboard runs: accuracy ones only with labels, and period-orbit
    only when the sweep itself is not the circular period (then it already has it, exactly)."""
    names = ["consistency-a", "consistency-b"]
    if labelled:
        names = ["clean", "shifted-accuracy"] + names
    if not (kind == "period" and mode == "circular"):
        names.append("period-orbit")
    return names


def analyse(models: Sequence[Any], data: ImageSet, kind: str = "period", *, mode: str = "circular",
            radius: Optional[int] = None, batch_size: int = 256, seed: int = 0, cache: Optional[DiskCache] = None,
            memory: Optional[Dict[str, Any]] = None, protocols: bool = True, extra_protocols: Sequence[str] = (),
            progress: Optional[Callable[[int, int, str], None]] = None,
            should_stop: Optional[Callable[[], bool]] = None) -> DatasetResult:
    """Sweeps of every model (cached in ``memory`` / ``cache``), then ``evaluate``'s protocols per model
    (also cached, in the same places, under the sweep's key plus the protocol list and seed) and the
    leaderboard. ``progress(done, total, stage)`` counts images over models; stage "sweep" then
    "protocols"."""
    from .evaluation import evaluate

    if not 1 <= len(models) <= 6:
        raise EquishiftError(f"compare 1 to 6 models at once, got {len(models)}")
    sweeps = sweep_models(models, data, kind, mode=mode, radius=radius, batch_size=batch_size, cache=cache,
                          memory=memory, should_stop=should_stop,
                          progress=None if progress is None else (lambda d, t: progress(d, t, "sweep")))
    results = []
    if protocols:
        names = list(dict.fromkeys(leaderboard_protocols(data.labelled, kind, mode) + list(extra_protocols)))
        n = len(data)
        for j, lm in enumerate(models):
            key = dict(sweep_key(lm, data, kind, mode, radius), protocols=names, seed=seed)
            name = "protocols-" + _key_name(key)
            res = memory.get(name) if memory is not None else None
            if res is None and cache is not None:
                res = cache.get_json(key)
            if res is None:
                if should_stop is not None and should_stop():
                    raise Cancelled(f"cancelled before the protocols of {lm.name}")
                res = evaluate(lm, data.for_model(lm), names, batch_size=batch_size, seed=seed)
                res["dataset"] = data.name
                if cache is not None:
                    cache.put_json(key, res)
            if memory is not None:
                memory[name] = res
            results.append(res)
            if progress is not None:
                progress((j + 1) * n, n * len(models), "protocols")
    board = [leaderboard_row(sw, (r or {}).get("protocols")) for sw, r in
             zip(sweeps, results or [None] * len(sweeps))]
    settings = {"data": data.name, "data_key": data.key, "data_source": data.source, "n_images": len(data),
                "labelled": data.labelled, "shift_set": kind, "radius": radius, "mode": mode, "seed": seed,
                "batch_size": batch_size, "models": [lm.spec for lm in models],
                "describe": sweeps[0].meta.get("describe")}
    return DatasetResult(data.name, sweeps, results, board, settings)
