"""The paper's models and checkpoints (Ding et al. 2023, "Reviving Shift Equivariance in Vision
Transformers"): PolyViT, PolyTwins (PCPVT, SVT) and PolySwin as anchored timm models.

A checkpoint of the paper's training code is a ``torch.save`` dict: ``model`` (the state dict),
``optimizer``, ``lr_scheduler``, ``scaler``, ``epoch``, ``max_accuracy`` and ``config``, a pickled yacs
``CfgNode``. It is read without running pickled code: torch's weights-only allowlist plus one stand-in,
a plain dict for ``yacs.config.CfgNode``; any other global is refused by name. Keys are renamed to the
anchored timm model (``KEY_MAP``), the config inside the file is checked against the timm model, and the
result is an ordinary anchored timm model with a card (``import_paper`` writes safetensors + card;
``load_paper`` does it in memory for ``paper:ARCH:TIMM_NAME@PATH`` specs).

What each architecture is (docs/paper.md):
- ``polyvit``: anchor (s = patch size) -> patch conv -> LayerNorm (eps 1e-5) -> circular depth-wise 3x3
  conv + residual on the patch-token grid -> CLS token concatenated -> timm blocks (no absolute
  position embedding). = ``anchorize(vit, patch_norm=True, pos_init="default")``.
- ``polytwins-pcpvt`` / ``polytwins-svt``: anchors before the first patch embedding and every LSA
  (s = window) / GSA (s = sr > 1) block, circular PEGs. = ``anchorize(twins, patch_anchors="first")``.
- ``polyswin``: the released PolySwin: anchors before the patch embedding, every block (after its
  norm1, whose output is the residual) and every conv patch merging; the shifted windows and their mask
  are kept, so it is not exactly invariant (``anchorize(swin, block="paper", shifted_windows=True,
  merge="paper")``; equishift's default Swin recipe removes them and is).
"""
from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .errors import CheckpointError, ModelSpecError
from .zoo import _sha256 as _file_sha256

__all__ = ["ARCHS", "PaperCheckpoint", "read_paper_checkpoint", "paper_model", "load_paper", "import_paper",
           "key_map"]


class _CfgNode:
    """Stand-in for ``yacs.config.CfgNode`` while unpickling: each node becomes an ``OrderedDict``, which
    torch's weights-only unpickler fills with the node's items (and its private flags, dropped by
    ``_plain``). Nothing of yacs is imported or run."""

    def __new__(cls, *args, **kwargs):
        return collections.OrderedDict()


STAND_INS = {"yacs.config.CfgNode": _CfgNode}


_MAX_DEPTH = 32  # config nesting; deeper (or cyclic) is not a config


def _plain(obj: Any, depth: int = 0) -> Any:
    """Nested OrderedDicts/lists of a config -> plain dicts/lists (yacs' private '__...__' flags dropped)."""
    if depth > _MAX_DEPTH:
        raise CheckpointError("its config is nested too deeply (or refers to itself); not a training config")
    if isinstance(obj, dict):
        return {str(k): _plain(v, depth + 1) for k, v in obj.items()
                if not (isinstance(k, str) and k.startswith("__") and k.endswith("__"))}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else None
    return obj


@dataclass
class PaperArch:
    family: str                       # equishift.archs adapter name
    timm_class: str                   # the timm class the name must build
    options: Dict[str, Any]           # anchorize options giving the paper's model (tie_tol 0: its plain argmax)
    model_types: Tuple[str, ...]      # MODEL.TYPE values of the paper's configs for this architecture
    timm_hint: str                    # names that fit, for messages
    name_filter: Callable[[str], bool] = lambda name: True


ARCHS: Dict[str, PaperArch] = {
    "polyvit": PaperArch("vit", "VisionTransformer", {"patch_norm": True, "pos_init": "default", "tie_tol": 0.0},
                         ("polyvit",),
                         "vit_small_patch16_224, vit_base_patch16_224, ..."),
    "polytwins-pcpvt": PaperArch("twins", "Twins", {"patch_anchors": "first", "tie_tol": 0.0}, ("polytwins",),
                                 "twins_pcpvt_small, twins_pcpvt_base, twins_pcpvt_large",
                                 lambda n: "pcpvt" in n),
    "polytwins-svt": PaperArch("twins", "Twins", {"patch_anchors": "first", "tie_tol": 0.0}, ("polytwins",),
                               "twins_svt_small, twins_svt_base, twins_svt_large", lambda n: "svt" in n),
    "polyswin": PaperArch("swin", "SwinTransformer", {"block": "paper", "shifted_windows": True, "merge": "paper",
                                                    "tie_tol": 0.0},
                          ("swin_poly",), "swin_tiny_patch4_window7_224, swin_small_..., swin_base_..."),
}
_ALL_TYPES: Dict[str, List[str]] = {}
for _arch, _spec in ARCHS.items():
    for _t in _spec.model_types:
        _ALL_TYPES.setdefault(_t, []).append(_arch)
_FIRST_GENERATION = ("vit_poly", "vit_poly_small", "vit_poly_base", "vit_poly_untrained", "swin_poly_pretrained")
# timm constructor arguments that would make timm read files or the network itself, around our checks.
_REFUSED_KWARGS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                   "num_classes")

# Buffers the paper's files carry that the timm model derives itself (skipped).
_DERIVED = re.compile(r"(^|\.)(attn_mask|relative_position_index|relative_coords_table)$")


# --- reading ---------------------------------------------------------------------------------------
@dataclass
class PaperCheckpoint:
    state: Dict[str, torch.Tensor]
    config: Dict[str, Any] = field(default_factory=dict)
    epoch: Optional[int] = None
    max_accuracy: Optional[float] = None
    file: str = ""
    sha256: str = ""


def read_paper_checkpoint(path: Union[str, Path], *, max_bytes: Optional[int] = None) -> PaperCheckpoint:
    """Weights, config, epoch and best accuracy of a paper checkpoint (or of a bare state dict / safetensors
    file: then the config is empty). Raises CheckpointError for anything else, naming a refused global."""
    from .checkpoint import DEFAULT_MAX_BYTES, load_checkpoint

    path = Path(path)
    obj = load_checkpoint(path, stand_ins=STAND_INS, max_bytes=max_bytes or DEFAULT_MAX_BYTES)
    name = path.name
    if isinstance(obj, Mapping) and "model" in obj:
        state, meta = obj["model"], obj
    else:
        state, meta = obj, {}
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{name}: not a paper checkpoint: expected a dict with 'model' (name -> tensor) "
                              f"or a state dict; found {type(state).__name__}")
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    config = meta.get("config")
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{name}: its 'config' is a {type(config).__name__}, not a config node")
    try:
        config = _plain(config)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    epoch, acc = _plain(meta.get("epoch")), _plain(meta.get("max_accuracy"))
    return PaperCheckpoint(state=state, config=config,
                           epoch=int(epoch) if isinstance(epoch, (int, float)) else None,
                           max_accuracy=float(acc) if isinstance(acc, (int, float)) else None,
                           file=name, sha256=_file_sha256(path))


# --- key mapping -----------------------------------------------------------------------------------
def _unwrapped(model: nn.Module) -> Dict[str, str]:
    """Our state-dict key -> the key without equishift's wrapper modules (the plain timm name)."""
    from .layers import AnchoredPatchEmbed, AnchorWrapper

    wrappers = {name: "embed" if isinstance(m, AnchoredPatchEmbed) else m._inner
                for name, m in model.named_modules() if isinstance(m, (AnchoredPatchEmbed, AnchorWrapper))}
    out = {}
    for key in model.state_dict():
        plain = key
        for prefix in sorted(wrappers, key=len, reverse=True):
            inner = f"{prefix}.{wrappers[prefix]}."
            if plain.startswith(inner):
                plain = f"{prefix}." + plain[len(inner):]
                break
        out[key] = plain
    return out


def _to_paper(arch: str, plain: str) -> str:
    """A plain timm key of the anchored model -> the paper's name for it."""
    if arch == "polyvit":
        return re.sub(r"^patch_embed\.pos_conv\.proj\.", "pos_conv.proj.0.", plain)
    if arch == "polyswin":
        m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", plain)
        if m:  # timm merges at the start of stage i, the paper at the end of stage i - 1
            return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        return re.sub(r"^head\.fc\.", "head.", plain)
    return plain


# Paper spellings that differ only in how a module was wrapped: normalised before matching.
_ALIASES = {"polyvit": [(re.compile(r"^pos_conv\.proj\.(weight|bias)$"), r"pos_conv.proj.0.\1")]}

# Shown in the card and the README: paper module -> equishift module.
KEY_MAP_DOC: Dict[str, List[Tuple[str, str]]] = {
    "polyvit": [("patch_embed.proj.*", "patch_embed.embed.proj.*"),
                ("patch_embed.norm.*", "patch_embed.embed.norm.*"),
                ("pos_conv.proj.0.* (or pos_conv.proj.*)", "patch_embed.pos_conv.proj.*"),
                ("everything else", "same name")],
    "polytwins": [("patch_embeds.0.*", "patch_embeds.0.embed.*"),
                  ("blocks.k.j.* (anchored LSA/GSA blocks)", "blocks.k.j.block.*"),
                  ("everything else", "same name")],
    "polyswin": [("patch_embed.*", "patch_embed.embed.*"),
                 ("layers.i.blocks.j.*", "layers.i.blocks.j.block.*"),
                 ("layers.i.downsample.{proj,norm}.*", "layers.(i+1).downsample.block.{proj,norm}.*"),
                 ("head.*", "head.fc.*"),
                 ("*.attn_mask, *.relative_position_index", "dropped (derived buffers)")],
}


def key_map(arch: str, model: nn.Module) -> Dict[str, str]:
    """The paper's key -> our key, for every key of the anchored ``model``."""
    return {_to_paper(arch, plain): ours for ours, plain in _unwrapped(model).items()}


def _rename(arch: str, model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> Dict[str, torch.Tensor]:
    mapping = key_map(arch, model)
    ours_state = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        for pattern, repl in _ALIASES.get(arch, []):
            key = pattern.sub(repl, key)
        if key in mapping:
            out[mapping[key]] = value
        elif not _DERIVED.search(key):
            unexpected.append(key)
    missing = [p for p, o in mapping.items() if o not in out]
    mismatched = [f"{p}: file {list(out[o].shape)} vs model {list(ours_state[o].shape)}"
                  for p, o in mapping.items() if o in out and out[o].shape != ours_state[o].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:4])}")
        raise CheckpointError(f"{name}: does not fit {arch} on this timm model ({'; '.join(parts)}); key names "
                              f"are the paper's")
    return out


def _few(keys: List[str]) -> str:
    return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")


# --- config check ----------------------------------------------------------------------------------
def _get(config: Mapping, dotted: str):
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _base_name(card: str) -> str:
    """'hf_hub:timm/vit_small_patch16_224.augreg_in1k' -> 'vit_small_patch16_224'."""
    card = card.split(":", 1)[-1] if card.startswith("hf_hub:") else card
    return card.rsplit("/", 1)[-1].split(".")[0]


def _check_config(arch: str, timm_name: str, model: nn.Module, config: Mapping,
                  name: str) -> Tuple[List[str], List[str]]:
    """Compare the file's config with the timm model; raise on a mismatch. Returns (fields checked,
    notes for the card)."""
    checked: List[str] = []
    problems: List[str] = []
    notes: List[str] = []

    def compare(what: str, theirs, ours) -> None:
        if theirs is None:
            return
        checked.append(what)
        norm = (lambda v: [float(x) for x in v] if isinstance(v, (list, tuple)) else
                float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
        if norm(theirs) != norm(ours):
            problems.append(f"{what}: the checkpoint says {theirs!r}, timm:{timm_name} has {ours!r}")

    mtype = _get(config, "MODEL.TYPE")
    if mtype is not None:
        checked.append("MODEL.TYPE")
        if mtype in _FIRST_GENERATION:
            problems.append(f"MODEL.TYPE is {mtype!r}: a first-generation model (an anchor in front of a plain "
                            f"timm model, keys prefixed '1.'), which equishift does not import")
        elif mtype in _ALL_TYPES and mtype not in ARCHS[arch].model_types:
            problems.append(f"MODEL.TYPE is {mtype!r}: a checkpoint of {' or '.join(_ALL_TYPES[mtype])}, not {arch}")
        elif mtype not in _ALL_TYPES:
            notes.append(f"MODEL.TYPE {mtype!r} is not one of the paper's known types; read as {arch}")
    card = _get(config, "MODEL.CARD")
    if isinstance(card, str) and card:
        compare("MODEL.CARD", _base_name(card), _base_name(timm_name))
    embed = model.patch_embed if hasattr(model, "patch_embed") else model.patch_embeds[0]
    embed = getattr(embed, "embed", embed)
    img = tuple(int(v) for v in embed.img_size)
    size = _get(config, "DATA.IMG_SIZE")
    if size is not None:
        compare("DATA.IMG_SIZE", list(size) if isinstance(size, (list, tuple)) else [size, size], list(img))
    if arch == "polyswin":
        swin = {
            "PATCH_SIZE": int(embed.patch_size[0]), "IN_CHANS": int(embed.proj.in_channels),
            "EMBED_DIM": int(model.embed_dim if isinstance(model.embed_dim, int) else model.embed_dim[0]),
            "DEPTHS": [len(stage.blocks) for stage in model.layers],
            "NUM_HEADS": [int(_inner(stage.blocks[0]).attn.num_heads) for stage in model.layers],
            "WINDOW_SIZE": int(_inner(model.layers[0].blocks[0]).target_window_size[0])
            if hasattr(_inner(model.layers[0].blocks[0]), "target_window_size")
            else int(_inner(model.layers[0].blocks[0]).window_size[0]),
            "MLP_RATIO": float(_inner(model.layers[0].blocks[0]).mlp.fc1.out_features
                               / _inner(model.layers[0].blocks[0]).mlp.fc1.in_features),
            "QKV_BIAS": _inner(model.layers[0].blocks[0]).attn.qkv.bias is not None,
            "APE": False, "PATCH_NORM": True,
        }
        for key, ours in swin.items():
            compare(f"MODEL.SWIN.{key}", _get(config, f"MODEL.SWIN.{key}"), ours)
        compare("MODEL.NUM_CLASSES", _get(config, "MODEL.NUM_CLASSES"), int(model.num_classes))
    if problems:
        raise CheckpointError(f"{name}: its config does not match timm:{timm_name}: " + "; ".join(problems))
    return checked, notes


def _inner(block: nn.Module) -> nn.Module:
    return getattr(block, "block", block)


# --- building --------------------------------------------------------------------------------------
def _check_arch(arch: str) -> PaperArch:
    if arch not in ARCHS:
        raise ModelSpecError(f"unknown paper architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def paper_model(arch: str, timm_name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """The paper's ``arch`` on the timm layout ``timm_name``, random weights (PyTorch's init for new
    layers, as the paper trains from), eval mode."""
    import timm

    from .anchoring import anchorize

    spec = _check_arch(arch)
    base = _base_name(timm_name)
    if not timm.is_model(base):
        raise ModelSpecError(f"unknown timm model {timm_name!r} for {arch}; e.g. {spec.timm_hint}")
    if not spec.name_filter(base):
        raise ModelSpecError(f"{arch} needs a timm name like {spec.timm_hint}; got {timm_name!r}")
    from .options import check_model_size, check_options
    from .zoo import _model_input_size

    check_options(dict(kwargs, num_classes=num_classes), f"{arch}:{base}")
    try:
        check_model_size(lambda: timm.create_model(base, pretrained=False, num_classes=num_classes, **kwargs),
                         f"{arch}:{base}", input_size=_model_input_size)
        model = timm.create_model(base, pretrained=False, num_classes=num_classes, **kwargs)
    except ModelSpecError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ModelSpecError(f"timm cannot build {base!r}: {e}") from None
    if type(model).__name__ != spec.timm_class:
        raise ModelSpecError(f"{arch} needs a timm {spec.timm_class} (e.g. {spec.timm_hint}); {base!r} is a "
                             f"{type(model).__name__}")
    return anchorize(model, "full", **spec.options).eval()


def _num_classes(arch: str, state: Mapping[str, torch.Tensor]) -> int:
    head = state.get("head.weight")
    if head is None or head.dim() != 2:
        raise CheckpointError(f"no classifier ('head.weight') in the checkpoint: not a {arch} classifier")
    return int(head.shape[0])


def load_paper(arch: str, timm_name: str, path: Union[str, Path], *, timm_kwargs: Optional[Mapping[str, Any]] = None,
               max_bytes: Optional[int] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """(anchored timm model with the checkpoint's weights, its card). ``timm_kwargs``: constructor
    arguments of the layout the checkpoint was trained with when it is not timm's default for the name
    (img_size=384, a narrower embed_dim, ...); the number of classes is read from the file."""
    from .checkpoint import apply_weights
    from .zoo import Spec, _timm_card

    spec = _check_arch(arch)
    ckpt = read_paper_checkpoint(path, max_bytes=max_bytes)
    kwargs = dict(timm_kwargs or {})
    refused = [k for k in kwargs if k in _REFUSED_KWARGS]
    if refused:
        raise ModelSpecError(f"option(s) {', '.join(refused)} not allowed here: the weights come from the checkpoint "
                             f"(num_classes is read from its classifier)")
    model = paper_model(arch, timm_name, num_classes=_num_classes(arch, ckpt.state), **kwargs)
    checked, notes = _check_config(arch, timm_name, model, ckpt.config, ckpt.file)
    apply_weights(model, _rename(arch, model, ckpt.state, ckpt.file), strict=True)
    card = _timm_card(model, Spec("timm", _base_name(timm_name)), untrained=False)
    mean, std = _get(ckpt.config, "DATA.MEAN"), _get(ckpt.config, "DATA.STD")
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == card["input_size"][0]:
        card["mean"], card["std"] = [float(v) for v in mean], [float(v) for v in std]
    elif arch == "polyvit":
        card["mean"], card["std"] = [0.5] * 3, [0.5] * 3  # what the paper's eval uses for (Poly)ViT
    # The paper's evaluation: resize the short side to 256/224 of the input (bicubic), centre crop.
    card["interpolation"], card["crop_pct"] = "bicubic", 0.875
    from .anchoring import anchor_options, anchor_sites

    card.update({
        "name": f"{arch}:{_base_name(timm_name)}", "arch": spec.family, "anchoring": "full",
        "anchor_options": anchor_options(model), "anchors": anchor_sites(model),
        "timm_model": _base_name(timm_name), "arch_config": {"num_classes": int(model.num_classes), **kwargs},
        "dataset": "imagenet-1k" if model.num_classes == 1000 else None, "weights": ckpt.file,
        "source": "paper checkpoint",
        "paper": {"arch": arch, "file": ckpt.file, "sha256": ckpt.sha256, "epoch": ckpt.epoch,
                  "max_accuracy": ckpt.max_accuracy, "model_type": _get(ckpt.config, "MODEL.TYPE"),
                  "model_card": _get(ckpt.config, "MODEL.CARD"), "config_checked": checked,
                  "key_map": [list(p) for p in KEY_MAP_DOC[arch.split("-")[0]]]},
    })
    if notes:
        card.setdefault("warnings", []).extend(notes)
    if arch == "polyswin":
        card.setdefault("warnings", []).append(
            "PolySwin as released keeps the shifted windows and their mask: not exactly shift-invariant "
            "(equishift's default Swin recipe removes them)")
    return model, card


def import_paper(path: Union[str, Path], arch: str, timm_name: str, out_dir: Union[str, Path],
                 name: Optional[str] = None, *, timm_kwargs: Optional[Mapping[str, Any]] = None,
                 max_bytes: Optional[int] = None) -> Tuple[Path, Path]:
    """Convert a paper checkpoint to ``out_dir/NAME.safetensors`` + ``NAME.json`` (a zoo card: load it
    with ``zoo:out_dir/NAME.json``). Returns (card path, weights path)."""
    from .checkpoint import save_weights

    model, card = load_paper(arch, timm_name, path, timm_kwargs=timm_kwargs, max_bytes=max_bytes)
    name = name or f"{arch}-{_base_name(timm_name)}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise ModelSpecError(f"output name {name!r}: use letters, digits, '.', '_' and '-' only")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, card_path = out / f"{name}.safetensors", out / f"{name}.json"
    save_weights(model, weights)
    card = dict(card, name=name, timm_class=type(model).__name__, weights_sha256=_file_sha256(weights))
    card.pop("spec", None)
    tmp = card_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(card_path)
    return card_path, weights


# --- command line ----------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint of the paper's code (ckpt_epoch_N.pth) or a state dict")
    parser.add_argument("--arch", required=True, choices=list(ARCHS), help="the paper's architecture")
    parser.add_argument("--timm", required=True, metavar="NAME",
                        help="the timm layout it was trained on, e.g. vit_small_patch16_224, twins_svt_small, "
                             "swin_tiny_patch4_window7_224 (the checkpoint's MODEL.CARD, when it has one)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.safetensors + NAME.json")
    parser.add_argument("--name", default=None, help="output name (default: ARCH-TIMM_NAME)")
    parser.add_argument("--timm-kwargs", default="", metavar="K=V,K=V",
                        help="timm constructor arguments of the layout it was trained with, when not the "
                             "name's default (e.g. img_size=384)")


def run(args) -> int:
    import sys

    from .errors import EquishiftError

    from .zoo import _query

    try:
        _, kwargs = _query(f"--timm-kwargs {args.timm_kwargs}", args.timm_kwargs)
        card_path, weights = import_paper(args.checkpoint, args.arch, args.timm, args.out, args.name,
                                          timm_kwargs=dict(kwargs))
    except EquishiftError as e:
        print(f"equishift: {e}", file=sys.stderr)
        return 1
    card = json.loads(card_path.read_text())
    paper = card["paper"]
    anchored = [s for s in card["anchors"] if s["anchored"]]
    print(f"{args.checkpoint} -> {weights} + {card_path.name}")
    print(f"  {args.arch} on timm {card['timm_model']}: {len(anchored)} anchors, epoch {paper['epoch']}, "
          f"max_accuracy {paper['max_accuracy']}; config checked: {', '.join(paper['config_checked']) or 'none in file'}")
    for warning in card.get("warnings", []):
        print(f"  note: {warning}")
    print(f"  load it with: zoo:{card_path}")
    return 0
