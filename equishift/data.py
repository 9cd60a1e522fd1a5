"""Datasets: Fashion-MNIST from the Debian IDX files, and an ``ImageFolder``-style dataset for users' data.

Every sample is a normalised float tensor (3, 32, 32): Fashion-MNIST's 28x28 grayscale images are padded
by 2 black pixels on each side (so a 4-pixel patch grid tiles them and circular shifts bring in the same
black background the garments already sit on) and replicated to 3 channels, so that ImageNet-style timm
models and the dashboard (which shows RGB images) need no special case.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError

__all__ = ["FMNIST_CLASSES", "FMNIST_MEAN", "FMNIST_STD", "FMNIST_PAD", "FMNIST_STATS", "DEFAULT_FMNIST_DIR",
           "fashion_mnist_root", "fmnist_stats", "image_stats", "read_idx", "load_fashion_mnist", "FashionMNIST", "ImageFolder",
           "IMAGE_EXTENSIONS"]

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean/std of the 60k training pixels (28x28, scaled to [0, 1]); the same value for each of the 3
# replicated channels. The zero padding maps to (0 - mean) / std, exactly the value of the background.
FMNIST_MEAN = (0.2860, 0.2860, 0.2860)
FMNIST_STD = (0.3530, 0.3530, 0.3530)
FMNIST_PAD = 2
# What the training images look like, per image (28x28 in [0, 1], before padding): the mean of the outer
# ring of STATS_BORDER pixels, the fraction of pixels at most STATS_DARK (background), and the mean pixel,
# each as {min, q001, median, q999, max} over the 60k training images. Computed by fmnist_stats()
# (scripts/data_stats.py); equishift.caveats flags inputs outside [min, max]. The ring is 2 px wide: a
# garment touches one edge often, all four rarely.
STATS_BORDER = 2
STATS_DARK = 0.1  # ~25/255: the background of Fashion-MNIST is exactly 0, anti-aliased edges rise above
FMNIST_STATS = {
    "border_mean": {"min": 0.0034, "q001": 0.0075, "median": 0.0846, "q999": 0.3358, "max": 0.4888},
    "dark_fraction": {"min": 0.0906, "q001": 0.162, "median": 0.5395, "q999": 0.9018, "max": 0.9617},
    "mean": {"min": 0.0194, "q001": 0.0446, "median": 0.2719, "q999": 0.6557, "max": 0.7522},
}
DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_INSTALL = "install it with `apt-get install dataset-fashion-mnist`, or set EQUISHIFT_FMNIST_DIR / pass root="
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def fashion_mnist_root(root: Optional[Union[str, os.PathLike]] = None) -> Path:
    """``root`` if given, else $EQUISHIFT_FMNIST_DIR, else the Debian package's directory."""
    return Path(root or os.environ.get("EQUISHIFT_FMNIST_DIR") or DEFAULT_FMNIST_DIR)


def image_stats(images: np.ndarray) -> dict:
    """Per-image statistics of grey images [..., H, W] in [0, 1] (see FMNIST_STATS): each an array [...]."""
    images = np.asarray(images, dtype=np.float32)
    b = STATS_BORDER
    ring = np.ones(images.shape[-2:], dtype=bool)
    ring[b:-b, b:-b] = False
    return {"border_mean": images[..., ring].mean(-1), "dark_fraction": (images <= STATS_DARK).mean((-2, -1)),
            "mean": images.mean((-2, -1))}


def fmnist_stats(root=None) -> dict:
    """FMNIST_STATS recomputed from the training split (rounded to 4 decimals)."""
    images = load_fashion_mnist("train", root)[0].numpy().astype(np.float32) / 255.0
    qs = {"min": 0.0, "q001": 0.001, "median": 0.5, "q999": 0.999, "max": 1.0}
    return {name: {k: round(float(np.quantile(v, q)), 4) for k, q in qs.items()}
            for name, v in image_stats(images).items()}


def read_idx(path: Union[str, os.PathLike], ndim: int) -> np.ndarray:
    """Read one gzip'd IDX file of unsigned bytes with ``ndim`` dimensions; DataError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Fashion-MNIST file {path} is missing; {_INSTALL}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # not gzip, or a truncated gzip stream
        raise DataError(f"{path} is not a readable gzip file ({e}); it may be corrupt — reinstall: {_INSTALL}")
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimensions (expected the "
                        f"magic bytes 00 00 08 {ndim:02x}, got {raw[:4].hex(' ') or 'nothing'}); reinstall: {_INSTALL}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path}: header says shape {shape} ({expected} bytes of data) but the file holds "
                        f"{len(raw) - header}; it is truncated or corrupt — reinstall: {_INSTALL}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: str = "train", root=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train" or "test") as (uint8 tensor [N, 28, 28], long tensor [N])."""
    if split not in _FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    d = fashion_mnist_root(root)
    if not d.is_dir():
        raise DataError(f"Fashion-MNIST directory {d} does not exist; {_INSTALL}")
    img_name, lbl_name = _FILES[split]
    images = read_idx(d / img_name, 3)
    labels = read_idx(d / lbl_name, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{d}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split; "
                        f"the files do not belong together — reinstall: {_INSTALL}")
    if labels.size and int(labels.max()) >= len(FMNIST_CLASSES):
        raise DataError(f"{d / lbl_name}: label {int(labels.max())} is out of range 0..9; reinstall: {_INSTALL}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


class FashionMNIST(Dataset):
    """Fashion-MNIST as normalised float (3, 32, 32) tensors and long labels.

    Only the padded uint8 images are kept in memory (61 MB for the training split; as float32 with 3
    channels it would be 740 MB); each item is converted and normalised on access.
    ``indices`` selects a subset (e.g. for quick runs), in the given order."""

    classes = FMNIST_CLASSES
    mean = FMNIST_MEAN
    std = FMNIST_STD

    def __init__(self, split: str = "train", root=None, indices: Optional[Sequence[int]] = None):
        images, labels = load_fashion_mnist(split, root)
        if indices is not None:
            idx = torch.as_tensor(list(indices), dtype=torch.long)
            images, labels = images[idx], labels[idx]
        p = FMNIST_PAD
        self.images = torch.nn.functional.pad(images, (p, p, p, p))  # uint8 [N, 32, 32], black border
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255).unsqueeze(0).expand(3, -1, -1)
        return _normalise(x, self.mean, self.std), int(self.labels[i])

    def batch(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Many items at once (B, 3, 32, 32), without per-item Python overhead (used by training)."""
        x = self.images[idx].float().div_(255).unsqueeze(1).expand(-1, 3, -1, -1)
        return _normalise(x, self.mean, self.std), self.labels[idx]


class ImageFolder(Dataset):
    """Images in ``root/<class name>/*.png|jpg|...``: one class per sub-folder, sorted by name.

    Each image is converted to RGB, resized to ``size`` x ``size`` (bilinear) and normalised with
    ``mean``/``std`` (ImageNet's by default). Files that cannot be decoded raise DataError naming them."""

    def __init__(self, root, size: int = 32, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist; expected ROOT/<class>/<image files>")
        self.classes: List[str] = sorted(p.name for p in self.root.iterdir()
                                         if p.is_dir() and not p.name.startswith("."))
        self.samples: List[Tuple[Path, int]] = [
            (f, k) for k, c in enumerate(self.classes) for f in sorted((self.root / c).rglob("*"))
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if len(self.classes) < 2 or not self.samples:
            raise DataError(f"{self.root} needs at least two class sub-folders holding images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); found {len(self.classes)} folders and "
                            f"{len(self.samples)} images")
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"cannot read image {path}: {e}")
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1).div_(255)
        return _normalise(x, self.mean, self.std), label

    def batch(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        items = [self[int(i)] for i in idx]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)
