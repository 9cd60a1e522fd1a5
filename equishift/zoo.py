"""Load a model by spec: the shipped zoo, any timm model (random, pretrained or from a local file), and
anchored variants of each, with the preprocessing that goes with it.

Specs
- ``zoo:NAME``                 assets/models/NAME.json (the card) + NAME.safetensors;
                               ``zoo:DIR/NAME.json`` or ``DIR/NAME.json``: a card anywhere
- ``timm:NAME``                a timm model with random weights; ``timm:NAME?num_classes=10&img_size=32``
                               passes constructor arguments
- ``timm:NAME?pretrained``     timm's pretrained weights (Hugging Face hub cache first; fails at once,
                               with a ModelSpecError, when offline and not cached)
- ``timm:NAME@PATH``           weights from a local .safetensors or weights-only .pth
                               (``num_classes`` is read from the file's classifier when not given)
- ``paper:ARCH:TIMM_NAME@PATH``  a checkpoint of the paper's code (ARCH: polyvit, polytwins-pcpvt,
                               polytwins-svt, polyswin) on the timm layout TIMM_NAME (equishift.paper)
- ``anchored:SPEC``, ``anchored[MODE]:SPEC``   ``anchorize(model, MODE)`` (default ``full``) on the fly;
                               new position-encoding convs start as the identity, so the card says
                               ``"untrained": true`` for the anchoring part.

Every call builds a fresh model (the dashboard caches it); nothing global is read-modified-written.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import os
import re
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from .device import default_device
from .errors import CheckpointError, ModelSpecError, shorten
from .options import check_model_size, check_options, short

__all__ = ["LoadedModel", "load_model", "list_models", "parse_spec", "zoo_dir", "add_arguments", "run"]

# Architectures a zoo card may name: a whitelist, so a card can never make us call an arbitrary attribute.
TIMM_CLASSES = {"VisionTransformer": "vit", "Twins": "twins", "SwinTransformer": "swin"}
ANCHOR_MODES = ("full", "pos-only", "patch-only")
# Zoo weight files are small; this cap only stops a wrong file from filling memory.
MAX_WEIGHT_BYTES = 2 * 1024 ** 3


def zoo_dir(root: Optional[Union[str, Path]] = None) -> Path:
    """The zoo folder: ``root`` if given, else $EQUISHIFT_ZOO_DIR, else the repository's assets/models."""
    if root is not None:
        return Path(root)
    env = os.environ.get("EQUISHIFT_ZOO_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "assets" / "models"


def list_models(root: Optional[Union[str, Path]] = None) -> List[str]:
    """Specs of the shipped models, e.g. ``["zoo:fmnist-vit-baseline", ...]`` (a card with its weights)."""
    d = zoo_dir(root)
    if not d.is_dir():
        return []
    return sorted(f"zoo:{p.stem}" for p in d.glob("*.json") if p.with_suffix(".safetensors").is_file())


# --- the loaded model ------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model in eval mode on ``device`` with its card and the matching preprocessing.

    ``card`` keys: name, arch, anchoring, classes, input_size [C, H, W], mean, std, dataset, metrics,
    untrained, plus ``preprocess`` ("padded" for zoo cards, "timm") and, for timm, interpolation and crop_pct."""

    model: nn.Module
    card: Dict[str, Any]
    spec: str
    device: torch.device
    _mean: torch.Tensor = field(init=False, repr=False)
    _std: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self._mean = torch.tensor(self.card["mean"], dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.card["std"], dtype=torch.float32).view(-1, 1, 1)

    @property
    def name(self) -> str:
        return str(self.card.get("name") or self.spec)

    @property
    def classes(self) -> List[str]:
        return list(self.card["classes"])

    @property
    def input_size(self) -> Tuple[int, int, int]:
        c, h, w = self.card["input_size"]
        return int(c), int(h), int(w)

    @property
    def stride(self) -> int:
        """The patch size of the first patch embedding (the period of the first anchor)."""
        return model_stride(self.model)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (…, C, H, W) -> model input."""
        return (x - self._mean.to(x)) / self._std.to(x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input (…, C, H, W) -> pixels in [0, 1], for display."""
        return (x * self._std.to(x) + self._mean.to(x)).clamp(0, 1)

    def black(self, like: torch.Tensor) -> torch.Tensor:
        """The model-input value of a black pixel, shaped (C, 1, 1) like ``like``: what padding means."""
        return ((0 - self._mean) / self._std).to(like)

    def preprocess(self, image, margin: int = 0) -> torch.Tensor:
        """PIL image -> tensor [1, C, H, W] on the model's device, prepared as the card says.

        ``margin`` > 0 returns a larger canvas [1, C, H+2m, W+2m] whose centre H×W crop is exactly the
        ``margin=0`` result, with real image context around it where the image has some (black beyond):
        what the ``crop`` protocols cut their windows from."""
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if self.card.get("preprocess") == "timm":
            x = _timm_canvas(image, self.card, margin)
        else:
            x = _padded_canvas(image, self.card, margin)
        return self.normalize(x)[None].to(self.device)


def _pil_to_tensor(img) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _convert(image, mode: str):
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess takes a PIL image, got {type(image).__name__}")
    return image.convert(mode)


def _padded_canvas(image, card: Dict[str, Any], margin: int) -> torch.Tensor:
    """Zoo models: fit to the un-padded size, pad with black (``pad`` pixels per side, plus ``margin``).

    Fashion-MNIST models: grayscale (replicated to C channels, as data.FashionMNIST does), centre-cropped
    to a square and resized to 28×28 when needed. Image-folder models: RGB resized to size×size
    (bilinear), as data.ImageFolder does for training."""
    from PIL import Image, ImageOps

    c, h, w = (int(v) for v in card["input_size"])
    pad = int(card.get("pad", 0))
    inner = (w - 2 * pad, h - 2 * pad)
    if card.get("dataset") == "fashion-mnist":
        img = _convert(image, "L")
        if img.size != inner:
            img = ImageOps.fit(img, inner, method=Image.BICUBIC)  # no distortion of non-square uploads
        x = _pil_to_tensor(img).expand(c, -1, -1)
    else:
        img = _convert(image, "L" if c == 1 else "RGB")
        if img.size != inner:
            img = img.resize(inner, Image.BILINEAR)
        x = _pil_to_tensor(img)
    return torch.nn.functional.pad(x, [pad + margin] * 4, value=0.0)


def _timm_canvas(image, card: Dict[str, Any], margin: int) -> torch.Tensor:
    """timm's eval transform (resize shortest side to H / crop_pct, centre crop H×W), with the crop box
    grown by ``margin`` on each side when asked; outside the resized image the canvas is black."""
    from timm.data import create_transform
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    c, h, w = (int(v) for v in card["input_size"])
    img = _convert(image, "L" if c == 1 else "RGB")
    if margin == 0:
        t = create_transform(input_size=(c, h, w), interpolation=card["interpolation"],
                             crop_pct=card["crop_pct"], crop_mode=card.get("crop_mode", "center"),
                             mean=(0.0,) * c, std=(1.0,) * c)
        return t(img)
    scale = int(np.floor(min(h, w) / card["crop_pct"]))
    img = TF.resize(img, scale, interpolation=InterpolationMode(card["interpolation"]))
    iw, ih = img.size
    top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))  # torchvision's centre crop
    img = TF.crop(img, top - margin, left - margin, h + 2 * margin, w + 2 * margin)
    return _pil_to_tensor(img)


def model_stride(model: nn.Module) -> int:
    """The stride of the first patch embedding (ViT, Twins, Swin, PVT-v2; a hybrid's includes its backbone's
    reduction); the total reduction for other timm models (a CNN: its last stage's)."""
    from .archs import patch_conv, patch_embedding

    embed = patch_embedding(model)
    if embed is not None:
        # The patch conv's stride (PVT-v2's overlapping embedding has patch_size 7 but stride 4), else the
        # patch size; a hybrid's patches are cut from its backbone's map (feature_ratio).
        conv = patch_conv(model)
        p = conv.stride if conv is not None else embed.patch_size
        ratio = getattr(embed, "feature_ratio", 1)
        return int(p if isinstance(p, int) else p[0]) * int(ratio if isinstance(ratio, int) else ratio[0])
    info = getattr(model, "feature_info", None)
    if info:
        return int(info[-1]["reduction"])
    return 1


# --- specs -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """A parsed model spec."""

    source: str  # "zoo" | "timm" | "paper" (name "ARCH:TIMM_NAME", path the checkpoint)
    name: str
    anchoring: str = "none"
    pretrained: bool = False
    path: Optional[str] = None
    kwargs: Tuple[Tuple[str, Any], ...] = ()
    seed: int = 0  # random-weight timm models: the weights are drawn from this seed (``?seed=N``)


def _literal(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


MAX_SPEC_CHARS = 4096   # PATH_MAX on Linux: any real path fits, with its options
_TIMM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")


def _show(spec: Any) -> str:
    """The spec as an error message quotes it: cut to 120 characters (a 1 MB spec is never echoed)."""
    return short(spec, 120)


def _check_path_length(spec: str, path: str) -> None:
    """A zoo name or card path the file system cannot hold is named here: ``Path.is_file`` raises a raw
    OSError (ENAMETOOLONG) for it rather than returning False."""
    if any(len(os.fsencode(part)) > 255 for part in path.split("/")) or len(os.fsencode(path)) > 4000:
        raise ModelSpecError(f"{shorten(spec, 80)!r}: the zoo name or card path is too long for a file "
                             "name (255 bytes per name, 4000 in all)")


def parse_spec(spec: str) -> Spec:
    """``[anchored[MODE]:](zoo:NAME | timm:NAME[?pretrained|?seed=N|?k=v&k=v][@PATH])`` -> Spec. Random
    timm weights (no ``?pretrained``, no ``@PATH``) are drawn from ``seed`` (default 0).

    Constructor options are checked against ``equishift.options.OPTIONS`` here (names, types, ranges);
    the size of the model they make is checked when it is built."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"a model spec must be a non-empty string, got {_show(spec)}; {_spec_help()}")
    if len(spec) > MAX_SPEC_CHARS:
        raise ModelSpecError(f"model spec {_show(spec)} is {len(spec)} characters, over the limit of "
                             f"{MAX_SPEC_CHARS} (MAX_SPEC_CHARS)")
    rest = spec.strip()
    anchoring = "none"
    if rest.startswith("anchored"):
        head, sep, rest = rest.partition(":")
        if not sep:
            raise ModelSpecError(f"{_show(spec)}: 'anchored' must be followed by ':' and a spec; {_spec_help()}")
        if head == "anchored":
            anchoring = "full"
        elif head.startswith("anchored[") and head.endswith("]"):
            anchoring = head[len("anchored["):-1]
            if anchoring not in ANCHOR_MODES:
                raise ModelSpecError(f"{_show(spec)}: unknown anchoring mode {short(anchoring, 40)}; choose one of "
                                     f"{', '.join(ANCHOR_MODES)}")
        else:
            raise ModelSpecError(f"{_show(spec)}: write 'anchored:' or 'anchored[MODE]:'; {_spec_help()}")
        if rest.startswith("anchored"):
            raise ModelSpecError(f"{_show(spec)}: a model can be anchored only once")
    if rest.endswith(".json") and not rest.startswith(("zoo:", "timm:", "paper:")):
        _check_path_length(spec, rest)
        return Spec("zoo", rest, anchoring)  # a card file anywhere: NAME.json next to NAME.safetensors
    source, sep, body = rest.partition(":")
    if not sep or source not in ("zoo", "timm", "paper") or not body:
        raise ModelSpecError(f"unknown model spec {_show(spec)}; {_spec_help()}")
    if source == "zoo":
        _check_path_length(spec, body)
        return Spec("zoo", body, anchoring)
    if source == "paper":
        return _parse_paper(spec, body, anchoring)
    name, at, path = body.partition("@")
    name, _, query = name.partition("?")
    if at and not path.strip():
        # "timm:NAME?…@" reads as "weights from a file": loading random weights instead would pass
        # unnoticed (the page shows predictions either way).
        raise ModelSpecError(f"{_show(spec)}: '@' must be followed by a weights file path; drop the '@' for "
                             f"random weights")
    pretrained, kwargs = _query(spec, query)
    if pretrained and path:
        raise ModelSpecError(f"{_show(spec)}: choose either '?pretrained' or '@PATH', not both")
    if not name:
        raise ModelSpecError(f"{_show(spec)}: missing the timm model name; {_spec_help()}")
    if not _TIMM_NAME.fullmatch(name):
        raise ModelSpecError(f"{_show(spec)}: {short(name, 60)} is not a timm model name (letters, digits, "
                             f"'_', '.', '-'; at most 200)")
    seeds = [v for k, v in kwargs if k == "seed"]
    kwargs = [(k, v) for k, v in kwargs if k != "seed"]
    check_options(_unique(spec, kwargs), _show(spec))
    if len(seeds) > 1 or seeds and (not isinstance(seeds[0], int) or isinstance(seeds[0], bool) or seeds[0] < 0):
        raise ModelSpecError(f"{_show(spec)}: seed must be one non-negative integer, got {', '.join(map(str, seeds))}")
    if seeds and (pretrained or path):
        raise ModelSpecError(f"{_show(spec)}: ?seed= chooses random weights; it cannot go with '?pretrained' or '@PATH'")
    return Spec("timm", name, anchoring, pretrained, path or None, tuple(kwargs), seeds[0] if seeds else 0)


def _unique(spec: str, kwargs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    keys = [k for k, _ in kwargs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ModelSpecError(f"{_show(spec)}: option(s) {', '.join(twice)} given more than once")
    return dict(kwargs)


def _query(spec: str, query: str) -> Tuple[bool, List[Tuple[str, Any]]]:
    """'pretrained&k=v&k=v' -> (pretrained, [(k, v), ...])."""
    pretrained, kwargs = False, []
    for item in filter(None, query.replace(",", "&").split("&")):
        key, eq, value = item.partition("=")
        if key == "pretrained":
            pretrained = not eq or _literal(value) is True
        elif eq and key.isidentifier():
            kwargs.append((key, _literal(value)))
        else:
            raise ModelSpecError(f"{_show(spec)}: cannot read {short(item, 60)}; write '?pretrained' or "
                                 "'?key=value&…'")
    return pretrained, kwargs


def _parse_paper(spec: str, body: str, anchoring: str) -> Spec:
    """``paper:ARCH:TIMM_NAME[?k=v&…]@PATH`` (a checkpoint of the paper's code; ``k=v`` are timm
    constructor arguments of the layout it was trained with, e.g. img_size=384)."""
    from .paper import ARCHS

    head, at, path = body.partition("@")
    head, _, query = head.partition("?")
    pretrained, kwargs = _query(spec, query)
    if pretrained:
        raise ModelSpecError(f"{_show(spec)}: '?pretrained' does not apply to a paper checkpoint (its weights are @PATH)")
    arch, colon, name = head.partition(":")
    if anchoring != "none":
        raise ModelSpecError(f"{_show(spec)}: a paper checkpoint is anchored already; drop the anchored: prefix")
    if not colon or not name or not at or not path:
        raise ModelSpecError(f"{_show(spec)}: write paper:ARCH:TIMM_NAME@PATH, e.g. "
                             f"paper:polyvit:vit_small_patch16_224@ckpt_epoch_299.pth")
    if arch not in ARCHS:
        raise ModelSpecError(f"{_show(spec)}: unknown paper architecture {short(arch, 40)}; choose one of "
                             f"{', '.join(ARCHS)}")
    if not _TIMM_NAME.fullmatch(name):
        raise ModelSpecError(f"{_show(spec)}: {short(name, 60)} is not a timm model name")
    check_options(_unique(spec, kwargs), _show(spec))
    return Spec("paper", f"{arch}:{name}", "none", False, path, tuple(kwargs))


def _spec_help() -> str:
    zoo = list_models()
    return ("use zoo:NAME, timm:NAME[?seed=N], timm:NAME?pretrained, timm:NAME@PATH, paper:ARCH:TIMM_NAME@PATH, "
            "optionally prefixed by "
            "anchored: or anchored[full|pos-only|patch-only]:; shipped models: " + (", ".join(zoo) or "none"))


# --- loading ---------------------------------------------------------------------------------------
def load_model(spec: str, device: Optional[Union[str, torch.device]] = None,
               root: Optional[Union[str, Path]] = None) -> LoadedModel:
    """Build the model a spec names, in eval mode, on ``device`` (default: cuda when available).

    ``root`` overrides the zoo folder (default $EQUISHIFT_ZOO_DIR or assets/models). Returns a fresh
    ``LoadedModel`` each call. Raises ModelSpecError (bad/unknown spec, offline pretrained) or
    CheckpointError (unreadable, unsafe or mismatched weights)."""
    s = parse_spec(spec)
    dev = default_device(device)
    if s.source == "zoo" and s.name.endswith(".json"):
        card_file = Path(s.name)
        model, card = _load_zoo(card_file.stem, card_file.parent)
    elif s.source == "zoo":
        model, card = _load_zoo(s.name, zoo_dir(root))
    elif s.source == "paper":
        from .paper import load_paper

        arch, _, name = s.name.partition(":")
        model, card = load_paper(arch, name, s.path, timm_kwargs=dict(s.kwargs), max_bytes=MAX_WEIGHT_BYTES)
    else:
        model, card = _load_timm(s)
    if s.anchoring != "none":
        model, card = _anchor(model, card, s.anchoring, spec)
    card["spec"] = spec
    bad = _non_finite(model)
    if bad:
        # load_weights also warns, but a Python warning reaches only the server log; the card carries
        # it to whoever shows the model (the dashboard prints card["warnings"]).
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        card["warnings"] = [f"NaN or Inf values in {len(bad)} weight tensor(s) ({shown}); the model's "
                            f"outputs will be meaningless"]
    model = model.to(dev).eval()
    return LoadedModel(model=model, card=card, spec=spec, device=dev)


def _non_finite(model: nn.Module) -> List[str]:
    """Names of floating-point parameters and buffers holding NaN or Inf."""
    return [n for n, t in model.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _anchor(model: nn.Module, card: Dict[str, Any], mode: str, spec: str):
    from .anchoring import anchorize, anchoring_mode

    if anchoring_mode(model) != "none":
        raise ModelSpecError(f"{_show(spec)}: the model is already anchored ({anchoring_mode(model)}); "
                             f"drop the anchored: prefix")
    try:
        model = anchorize(model, mode, pos_init="zeros")
    except (TypeError, ValueError) as e:
        raise ModelSpecError(f"{_show(spec)}: {e}") from None
    from .anchoring import anchor_options, anchor_sites

    card = dict(card, anchoring=mode, untrained=True, anchoring_untrained=True,
                base_untrained=bool(card.get("untrained", False)),
                anchor_options=anchor_options(model), anchors=anchor_sites(model),
                name=f"anchored[{mode}]:{card.get('name', '')}",
                # Metrics of the base model do not describe the anchored one.
                metrics={}, base_metrics=card.get("metrics", {}))
    return model, card


def _read_card(name: str, root: Path) -> Dict[str, Any]:
    """The card ``root/NAME.json``, validated (``equishift.cards``: size, depth, schema)."""
    from .cards import read_card

    card_path = root / f"{name}.json"
    try:
        # exists, not is_file: a FIFO or a device under a card's name is named as such by read_card
        exists = card_path.exists()
    except OSError:  # a name over the file system's limit (ENAMETOOLONG), a loop of links
        exists = False
    if "/" in name or "\\" in name or name.startswith(".") or not exists:
        found = list_models(root)
        shown = ", ".join(found[:20]) + (f" and {len(found) - 20} more" if len(found) > 20 else "")
        raise ModelSpecError(f"unknown zoo model {short(name, 80)} (looked in {short(str(root), 200)}); available: "
                             + (shown or "none — the zoo folder is empty"))
    return read_card(card_path)


def _weights_file(name: str, root: Path, max_bytes: int = MAX_WEIGHT_BYTES) -> Path:
    """``root/NAME.safetensors`` when it is a regular file of at most ``max_bytes``, reached without leaving
    the zoo folder (a link is followed only to a regular file inside it): a link to /dev/zero or to a
    huge file elsewhere is refused before anything is read."""
    weights = root / f"{name}.safetensors"
    try:
        if weights.is_symlink():
            target = weights.resolve(strict=True)
            if not target.is_relative_to(root.resolve(strict=True)):
                raise CheckpointError(f"zoo model {name!r}: {weights.name} is a link to a file outside the zoo "
                                      f"folder {short(str(root), 200)}; refused")
        st = weights.stat()
    except FileNotFoundError:
        raise CheckpointError(f"zoo model {name!r}: weights file {short(str(weights), 200)} is missing") from None
    except (OSError, RuntimeError) as e:  # RuntimeError: a loop of links (resolve)
        raise CheckpointError(f"zoo model {name!r}: cannot read {weights.name} ({getattr(e, 'strerror', None) or e})"
                              ) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"zoo model {name!r}: {weights.name} is not a regular file")
    if st.st_size > max_bytes:
        raise CheckpointError(f"zoo model {name!r}: {weights.name} is {st.st_size / 2**20:.1f} MiB, over the limit "
                              f"of {max_bytes / 2**20:.0f} MiB; refused before hashing")
    return weights


def _sha256(path: Path, max_bytes: Optional[int] = None) -> str:
    """sha256 of a regular file, reading at most ``max_bytes`` (checked on the open file, before hashing)."""
    h = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{Path(path).name}: cannot open it ({e.strerror or type(e).__name__})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (max_bytes is not None and st.st_size > max_bytes):
        os.close(fd)
        why = "not a regular file" if not stat.S_ISREG(st.st_mode) else (
            f"{st.st_size} bytes, over the limit of {max_bytes}")
        raise CheckpointError(f"{Path(path).name}: {why}; refused before hashing")
    with os.fdopen(fd, "rb") as f:
        read = 0
        for block in iter(lambda: f.read(1 << 20), b""):
            read += len(block)
            if max_bytes is not None and read > max_bytes:  # grew while being read
                raise CheckpointError(f"{Path(path).name}: grew past {max_bytes} bytes while being hashed")
            h.update(block)
    return h.hexdigest()


def _identity(path: Path) -> Tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _load_zoo(name: str, root: Path):
    from .anchoring import anchor_sites, anchorize
    from .checkpoint import apply_weights, load_weights

    card = _read_card(name, root)
    weights = _weights_file(name, root)
    before = _identity(weights)
    # The card's schema requires weights_sha256: the hash is what ties the card to these exact weights
    # (see docs/security.md, "Zoo cards").
    if _sha256(weights, MAX_WEIGHT_BYTES) != card["weights_sha256"]:
        raise CheckpointError(f"zoo model {name!r}: {weights.name} does not match the sha256 in its card "
                              f"(the file was modified or is corrupt)")
    model = _build_card_model(card, name)
    mode = card.get("anchoring", "none")
    if mode != "none":
        try:
            model = anchorize(model, mode, **card.get("anchor_options", {}))
        except (TypeError, ValueError) as e:
            raise ModelSpecError(f"zoo model {name!r}: its card's anchoring cannot be rebuilt: {short(str(e), 200)}"
                                 ) from None
        card["anchors"] = anchor_sites(model)
    state = load_weights(weights, max_bytes=MAX_WEIGHT_BYTES)
    if _identity(weights) != before:
        # Replaced or rewritten between the hash and the load: what was loaded is not what was checked.
        raise CheckpointError(f"zoo model {name!r}: {weights.name} changed while it was being loaded; try again")
    apply_weights(model, state, strict=True)
    card = copy.deepcopy(card)
    card.setdefault("name", name)
    card.setdefault("arch", TIMM_CLASSES[card["timm_class"]])
    card.setdefault("anchoring", "none")
    card.setdefault("metrics", {})
    card.setdefault("untrained", False)
    card.setdefault("pad", 0)
    card["preprocess"] = "padded"
    card["source"] = "zoo"
    return model, card


def _build_card_model(card: Dict[str, Any], name: str) -> nn.Module:
    """The card's architecture with fresh weights: a timm registry name (``timm_model``, e.g. an
    imported paper checkpoint) or a whitelisted class built from ``arch_config``. The card's schema has
    held ``arch_config`` to the option whitelist; the size is estimated on the meta device first."""
    import timm
    import timm.models

    kwargs = dict(card["arch_config"])
    check_options(kwargs, f"zoo model {name!r}: arch_config")
    timm_model = card.get("timm_model")
    if timm_model and not timm.is_model(timm_model):
        raise ModelSpecError(f"zoo model {name!r}: unknown timm model {short(timm_model, 60)}")

    def build() -> nn.Module:
        if timm_model:
            return timm.create_model(timm_model, pretrained=False, **kwargs)
        return getattr(timm.models, card["timm_class"])(**kwargs)

    try:
        check_model_size(build, f"zoo model {name!r}", input_size=lambda m: card["input_size"])
        model = build()
    except (TypeError, AssertionError, RuntimeError, ValueError) as e:
        if isinstance(e, ModelSpecError):
            raise
        raise ModelSpecError(f"zoo model {name!r}: timm cannot build it from its card: {short(str(e), 200)}") from None
    if timm_model and type(model).__name__ != card["timm_class"]:
        raise ModelSpecError(f"zoo model {name!r}: {timm_model} is a {type(model).__name__}, "
                             f"the card says {card['timm_class']}")
    return model


def _timm_names_like(name: str) -> List[str]:
    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    stem = name.split(".")[0].split("_")[0]
    wild = timm.list_models(f"*{stem}*")[:8] if stem else []
    return list(dict.fromkeys(close + wild))[:10]


def _check_timm_name(s: Spec) -> None:
    import timm

    base = s.name.split(".")[0]
    if not timm.is_model(base):
        like = _timm_names_like(base)
        raise ModelSpecError(f"unknown timm model {s.name!r}" + (f"; did you mean: {', '.join(like)}" if like
                                                                 else "; see timm.list_models()"))


def _model_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) the model is fed: timm's data config, with the patch embedding's own size when set
    (``?img_size=`` changes the model, not its pretrained config)."""
    from timm.data import resolve_data_config

    from .archs import patch_embedding

    size = list(resolve_data_config({}, model=model)["input_size"])
    img_size = getattr(patch_embedding(model), "img_size", None)
    if img_size is not None:
        size = [size[0], *(int(v) for v in img_size)]
    return int(size[0]), int(size[1]), int(size[2])


def _create_timm(s: Spec, **extra):
    import timm

    _check_timm_name(s)
    check_options(dict(s.kwargs), f"timm:{s.name}")
    kwargs = dict(s.kwargs, **extra)
    try:
        check_model_size(lambda: timm.create_model(s.name, pretrained=False, **kwargs), f"timm:{s.name}",
                         input_size=_model_input_size)
        return timm.create_model(s.name, pretrained=False, **kwargs)
    except ModelSpecError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ModelSpecError(f"timm cannot build {s.name!r} with {short(kwargs, 200)}: {short(str(e), 200)}") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub, so that no network fails in seconds instead of ~47 s of retries."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in ("1", "true", "yes", "on")


def _hub_file(s: Spec, local_only: bool = True) -> Optional[str]:
    """Path of the pretrained weights file: from the local Hugging Face cache (``local_only``, never
    touches the network), else downloaded into that cache. None when the model has no hub weights or
    (local_only) they are not cached."""
    import timm.models
    from huggingface_hub import hf_hub_download

    cfg = timm.models.get_pretrained_cfg(s.name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    error = None
    for fname in names:
        try:
            return hf_hub_download(repo, fname, revision=revision or None, local_files_only=local_only)
        except Exception as e:  # not cached / not on the hub (the hub raises several types for that)
            error = e
    if not local_only and error is not None:
        raise ModelSpecError(f"could not fetch pretrained weights for {s.name!r}: {type(error).__name__}: "
                             f"{error}") from None
    return None


def _load_pretrained(s: Spec):
    import timm

    from .checkpoint import load_weights

    _check_timm_name(s)
    check_options(dict(s.kwargs), f"timm:{s.name}?pretrained")
    try:
        check_model_size(lambda: timm.create_model(s.name, pretrained=False, **dict(s.kwargs)),
                         f"timm:{s.name}?pretrained", input_size=_model_input_size)
    except ModelSpecError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ModelSpecError(f"timm cannot build {s.name!r}: {short(str(e), 200)}") from None
    path = _hub_file(s)
    if path is None:
        if _offline() or not _hub_reachable():
            why = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face hub cannot be reached"
            raise ModelSpecError(f"timm:{s.name}?pretrained needs weights from the hub, but {why} and they "
                                 f"are not in the local cache; use timm:{s.name}@PATH with a local weights "
                                 f"file, or timm:{s.name} for random weights")
        path = _hub_file(s, local_only=False)
        if path is None:
            raise ModelSpecError(f"timm:{s.name} has no pretrained weights on the Hugging Face hub; use "
                                 f"timm:{s.name}@PATH with a local weights file")
    # A hub file is a download like any other: the same size limit, static pickle scan and NaN/Inf
    # warning as timm:NAME@PATH. timm then applies the state dict with its own filter (pos-embed
    # resampling for another img_size, classifier handling for another num_classes).
    state = load_weights(path, max_bytes=MAX_WEIGHT_BYTES)
    try:
        return timm.create_model(s.name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state),
                                 **dict(s.kwargs))
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as e:
        raise CheckpointError(f"{Path(path).name}: pretrained weights do not fit timm:{s.name}: "
                              f"{type(e).__name__}: {e}") from None


def _load_timm(s: Spec):
    import timm.models

    from .checkpoint import apply_weights, load_weights

    untrained = not (s.pretrained or s.path)
    if s.pretrained:
        model = _load_pretrained(s)
    elif s.path:
        state = load_weights(s.path, max_bytes=MAX_WEIGHT_BYTES)
        _check_timm_name(s)
        cfg = timm.models.get_pretrained_cfg(s.name)
        head = f"{(cfg.classifier if cfg else None) or 'head'}.weight"
        extra = {}
        # A fine-tuned file has its own number of classes: read it from the classifier instead of
        # failing on a shape mismatch the user did not ask for.
        if "num_classes" not in dict(s.kwargs) and head in state and state[head].dim() == 2:
            extra["num_classes"] = int(state[head].shape[0])
        model = _create_timm(s, **extra)
        try:
            apply_weights(model, state, strict=True)
        except CheckpointError as e:
            if any("pos_conv." in k or "patch_embed.embed." in k for k in state):
                raise CheckpointError(f"{e}. These look like the weights of an anchorized model: load them "
                                      f"with their card (zoo:DIR/NAME.json), which rebuilds the anchors "
                                      f"before loading") from None
            raise
    else:
        # Random weights drawn from the spec's seed, on a forked generator: the same spec gives the same
        # network in every process (so an anchorized copy has the baseline's weights), and the caller's
        # random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            model = _create_timm(s)
    if getattr(model, "num_classes", 1) == 0:
        raise ModelSpecError(f"timm:{s.name} has no classifier head; add ?num_classes=N")
    return model, _timm_card(model, s, untrained)


def _class_names(model: nn.Module) -> List[str]:
    n = int(getattr(model, "num_classes", 0))
    if n == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(n)]
    return [f"class {i}" for i in range(n)]


def _timm_card(model: nn.Module, s: Spec, untrained: bool) -> Dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = _model_input_size(model)
    from .sweep import architecture

    arch = architecture(model)
    return {
        "name": s.name, "arch": arch, "timm_class": type(model).__name__, "timm_name": s.name,
        "anchoring": "none", "classes": _class_names(model), "input_size": list(cfg["input_size"]),
        "mean": list(cfg["mean"]), "std": list(cfg["std"]), "interpolation": cfg["interpolation"],
        "crop_pct": cfg["crop_pct"], "crop_mode": cfg.get("crop_mode", "center"), "preprocess": "timm",
        "dataset": "imagenet-1k" if s.pretrained and model.num_classes == 1000 else None,
        "untrained": untrained, "weights": "pretrained" if s.pretrained else (s.path or "random"),
        **({"seed": s.seed} if untrained else {}), "metrics": {}, "source": "timm",
    }


# --- CLI: python -m equishift models ---------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the cards as JSON instead of a table")
    parser.add_argument("--zoo-dir", default=None, help="zoo folder (default: assets/models)")


def _metric_value(m: Any) -> Optional[float]:
    if isinstance(m, dict):
        m = m.get("value")
    return float(m) if isinstance(m, (int, float)) else None


def run(args: argparse.Namespace) -> int:
    root = zoo_dir(args.zoo_dir)
    cards = {}
    for spec in list_models(root):
        try:
            cards[spec] = _read_card(spec[4:], root)
        except ModelSpecError as e:
            print(f"equishift: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(cards, indent=2))
        return 0
    if not cards:
        print(f"no models in {root}")
        return 0
    names = sorted({k for c in cards.values() for k in (c.get("metrics") or {}) if _metric_value(
        c["metrics"][k]) is not None})
    header = ["spec", "arch", "anchoring", "dataset"] + names
    rows = [[spec, str(c.get("arch", "")), str(c.get("anchoring", "none")), str(c.get("dataset", ""))]
            + [_fmt(_metric_value((c.get("metrics") or {}).get(k))) for k in names] for spec, c in cards.items()]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"
