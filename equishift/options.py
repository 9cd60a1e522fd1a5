"""Which timm constructor options a spec, the dashboard's options box or a zoo card may set, and how big the
model they describe is, known before it is built.

A constructor option reaches ``timm.create_model`` unchanged, and timm reads some of them as instructions
to fetch weights itself (``checkpoint_path``, ``pretrained_cfg_overlay={"file": ...}``, a hub id): that
would skip ``equishift.checkpoint`` (size limits, the static pickle scan). Others size the model
(``depth=100000``, ``img_size=20000``) and would allocate until the process is killed. So options are a
whitelist (``OPTIONS``: type and range of each), and the model is built once on PyTorch's ``meta`` device
(shapes only, no memory) to count its parameters and the largest tensor one forward pass makes, before
the real build (``check_model_size``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import ModelSpecError, shorten

__all__ = ["OPTIONS", "MAX_PARAM_BYTES", "MAX_ACTIVATION_BYTES", "OPTIONS_SCHEMA", "check_options",
           "check_model_size", "SizeEstimate", "short"]

# float32 parameters: a ViT-L (304 M parameters, 1.2 GB) fits, a ViT-g (1 B, 4 GB) does not; the same
# figure as the weights-file limit, so any model that can be built can also be loaded.
MAX_PARAM_BYTES = 2 * 1024 ** 3
# The largest single tensor of one forward pass on one image (float32). Measured on the meta device:
# ViT-B/16 and ViT-L/16 at 224 px 2.3 and 3.1 MiB, Swin-T 4.6 MiB; 16 000 tokens of global attention
# (img_size=512, patch_size=4) already make a 1 GiB attention map.
MAX_ACTIVATION_BYTES = 1024 ** 3


@dataclass(frozen=True)
class Option:
    kind: str                      # "int" | "number" | "bool" | "choice"
    lo: float = 0
    hi: float = 0
    pair: bool = False             # also accepts [H, W]
    list_of: bool = False          # also (or only, see ``scalar``) accepts a list, one value per stage
    scalar: bool = True
    nullable: bool = False
    choices: Tuple[str, ...] = ()
    what: str = ""

    def schema(self) -> Dict[str, Any]:
        if self.kind == "bool":
            one: Dict[str, Any] = {"type": "boolean"}
        elif self.kind == "choice":
            one = {"enum": list(self.choices)}
        else:
            one = {"type": "integer" if self.kind == "int" else "number", "minimum": self.lo, "maximum": self.hi}
        alts = [one] if self.scalar else []
        if self.pair:
            alts.append({"type": "array", "items": one, "minItems": 2, "maxItems": 2})
        if self.list_of:
            alts.append({"type": "array", "items": one, "minItems": 1, "maxItems": MAX_STAGES})
        if self.nullable:
            alts.append({"type": "null"})
        return alts[0] if len(alts) == 1 else {"anyOf": alts}

    def describe(self) -> str:
        if self.kind == "bool":
            text = "true/false"
        elif self.kind == "choice":
            text = " / ".join(repr(c) for c in self.choices)
        else:
            text = f"{'integer' if self.kind == 'int' else 'number'} {_num(self.lo)}–{_num(self.hi)}"
        if self.pair:
            text += ", or [H, W]"
        if self.list_of:
            text = (text + ", or a list per stage") if self.scalar else f"list (≤ {MAX_STAGES}) of {text}"
        if self.nullable:
            text += ", or null"
        return text


MAX_STAGES = 8
_DROP = Option("number", 0.0, 1.0, what="a dropout rate (no effect in eval mode)")
OPTIONS: Dict[str, Option] = {
    "img_size": Option("int", 8, 1024, pair=True, what="input size in pixels"),
    "patch_size": Option("int", 1, 64, pair=True, what="patch size in pixels"),
    "in_chans": Option("int", 1, 16, what="input channels"),
    "num_classes": Option("int", 1, 100_000, what="classifier outputs"),
    "embed_dim": Option("int", 1, 8192, what="token width"),
    "depth": Option("int", 1, 64, what="number of blocks"),
    "num_heads": Option("int", 1, 128, list_of=True, what="attention heads (per stage for Twins/Swin)"),
    "mlp_ratio": Option("number", 0.0625, 16, what="MLP width / token width"),
    "embed_dims": Option("int", 1, 8192, list_of=True, scalar=False, what="token width per stage (Twins)"),
    "depths": Option("int", 1, 64, list_of=True, scalar=False, what="blocks per stage (Twins, Swin)"),
    "mlp_ratios": Option("number", 0.0625, 16, list_of=True, scalar=False, what="MLP ratio per stage (Twins)"),
    "wss": Option("int", 1, 64, list_of=True, scalar=False, nullable=True, what="window size per stage (Twins)"),
    "sr_ratios": Option("int", 1, 64, list_of=True, scalar=False, what="key sub-sampling per stage (Twins)"),
    "window_size": Option("int", 1, 64, pair=True, what="attention window (Swin)"),
    "reg_tokens": Option("int", 0, 64, what="register tokens (ViT)"),
    "init_values": Option("number", 0.0, 10.0, nullable=True, what="LayerScale init (ViT)"),
    "drop_rate": _DROP, "pos_drop_rate": _DROP, "patch_drop_rate": _DROP, "proj_drop_rate": _DROP,
    "attn_drop_rate": _DROP, "drop_path_rate": _DROP,
    **{k: Option("bool", what="a ViT layout switch") for k in (
        "qkv_bias", "qk_norm", "class_token", "no_embed_class", "pre_norm", "dynamic_img_size",
        "dynamic_img_pad", "patch_bias")},
    "fc_norm": Option("bool", nullable=True, what="norm after pooling (ViT)"),
    "global_pool": Option("choice", choices=("", "avg", "token", "max", "avgmax", "map"), what="pooling"),
    "pos_embed": Option("choice", choices=("learn", "none", ""), what="position embedding (ViT)"),
}

# Options timm reads as "fetch weights from here"; named apart so the message says why, not just "unknown".
READS_WEIGHTS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                 "cache_dir", "file", "url", "hf_hub_id", "hf_hub_filename", "state_dict")

OPTIONS_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "properties": {k: o.schema() for k, o in OPTIONS.items()},
    "additionalProperties": False,
}


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (``errors.shorten``): an error names a value, it never
    echoes a huge one."""
    return shorten(repr(value), limit)


def allowed_text() -> str:
    return ", ".join(OPTIONS)


def check_options(options: Mapping[str, Any], where: str) -> None:
    """Refuse any option outside ``OPTIONS`` or its range, naming ``where`` (a spec or card), the option,
    the problem and the limit. Options that make timm read weights get their own reason."""
    from jsonschema import Draft202012Validator

    if not isinstance(options, Mapping):
        raise ModelSpecError(f"{where}: constructor options must be key=value pairs (a JSON object), got "
                             f"{type(options).__name__}")
    for key in options:
        if not isinstance(key, str):
            raise ModelSpecError(f"{where}: option names are strings, got {short(key)}")
        if key in READS_WEIGHTS or key not in OPTIONS and any(w in key for w in ("path", "file", "url", "hub", "cfg")):
            raise ModelSpecError(f"{where}: option {short(key, 40)} is not allowed here: it makes timm read weights "
                                 f"itself, outside equishift's checked loader; give a weights file as @PATH "
                                 f"(timm:NAME@PATH) or use ?pretrained")
        if key not in OPTIONS:
            raise ModelSpecError(f"{where}: unknown constructor option {short(key, 40)}; allowed: {allowed_text()}")
    # The Python API passes tuples where JSON has lists (embed_dims=(64, 128)): the same values here.
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    # NaN passes every "minimum"/"maximum" comparison of a schema: refused here first.
    bad = [k for k, v in plain.items() if not _finite(v if isinstance(v, list) else [v])]
    errors = sorted(Draft202012Validator(OPTIONS_SCHEMA).iter_errors(plain), key=lambda e: list(e.path))
    if bad or errors:
        key = bad[0] if bad else str(errors[0].path[0])
        raise ModelSpecError(f"{where}: option {key}={short(options.get(key), 40)} is out of range: "
                             f"{OPTIONS[key].describe()} allowed")
    depths = plain.get("depths")
    if isinstance(depths, list) and sum(depths) > MAX_TOTAL_DEPTH:
        raise ModelSpecError(f"{where}: depths={short(depths, 60)} make {sum(depths)} blocks, over the limit of "
                             f"{MAX_TOTAL_DEPTH}")
    # Even the meta build takes seconds for thousands of wide blocks: what the options alone prove too big
    # is refused before it.
    floor = _params_lower_bound(plain)
    if floor * 4 > MAX_PARAM_BYTES:
        raise ModelSpecError(f"{where}: these options make at least {floor / 1e6:,.0f} M parameters "
                             f"({_gib(floor * 4)} in float32), over the limit of {_gib(MAX_PARAM_BYTES)}; use a "
                             "smaller model (depth, embed_dim)")


MAX_TOTAL_DEPTH = 96  # blocks over all stages; the largest Swin and Twins of timm have 24


def _params_lower_bound(kw: Mapping[str, Any]) -> int:
    """Parameters the given options imply at least: each transformer block holds its attention projections
    (4·d²) and its MLP (2·ratio·d²). Options not given count as zero, so the bound never over-counts."""
    if isinstance(kw.get("depths"), list):
        depths = kw["depths"]
        dims = kw.get("embed_dims") if isinstance(kw.get("embed_dims"), list) else [kw.get("embed_dim", 0)] * len(depths)
        ratios = kw.get("mlp_ratios") if isinstance(kw.get("mlp_ratios"), list) else [kw.get("mlp_ratio", 0)] * len(depths)
    elif isinstance(kw.get("depth"), int):
        depths, dims, ratios = [kw["depth"]], [kw.get("embed_dim", 0)], [kw.get("mlp_ratio", 0)]
    else:
        return 0
    return int(sum(n * (4 + 2 * r) * d * d for n, d, r in zip(depths, dims, ratios)))


# --- the size of a model, before it exists -----------------------------------------------------------
@dataclass(frozen=True)
class SizeEstimate:
    params: int
    param_bytes: int
    largest_activation_bytes: Optional[int]   # None when the model cannot run on the meta device
    largest_op: str = ""


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any operator returns (meta tensors: shapes only, nothing allocated)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.op = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False):  # a view (a weight's transpose, a reshape) allocates nothing
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                if n > self.bytes:
                    self.bytes, self.op = n, str(getattr(func, "__name__", func))
        return out


def estimate_size(build: Callable[[], nn.Module], input_size: Optional[Callable[[nn.Module], Sequence[int]]] = None,
                  max_param_bytes: Optional[int] = None) -> Tuple[nn.Module, SizeEstimate]:
    """Build with ``build()`` on the meta device and measure: parameters and buffers (× 4 bytes, float32)
    and, when ``input_size(model)`` gives (C, H, W), the largest tensor of a forward pass on one image. A
    model that cannot run on meta tensors gets an upper bound instead (``_activation_bound``: global
    attention over its tokens); one over ``max_param_bytes`` gets ``largest_activation_bytes=None`` (no
    forward pass is tried: it is refused anyway)."""
    with torch.device("meta"):
        model = build()
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    largest, op = None, ""
    if input_size is not None and (max_param_bytes is None or params * 4 <= max_param_bytes):
        c, h, w = (int(v) for v in input_size(model))
        try:
            probe = _LargestTensor()
            with torch.no_grad(), probe:
                model.eval()(torch.empty(1, c, h, w, device="meta"))
            largest, op = probe.bytes, probe.op
        except Exception:  # a model using data-dependent ops (.item(), nonzero) on its input: shapes unknown
            largest, op = _activation_bound(model, c, h, w)
    return model, SizeEstimate(params, params * 4, largest, op)


def _activation_bound(model: nn.Module, c: int, h: int, w: int) -> Tuple[int, str]:
    """An upper bound of the largest float32 tensor of one forward pass, from the model's structure
    alone: its tokens are the input cut by the smallest patch (or conv stride) it has (one per pixel
    when it has none), plus its prefix tokens; the bound is the largest of a global attention map over
    them with its most heads, its widest linear layer over them, and the input. A windowed model is
    over-counted, never under-counted by its attention."""
    patch = 0
    heads, width, prefix = 1, c, 1
    for m in model.modules():
        size = getattr(m, "patch_size", None)
        if isinstance(m, nn.Conv2d):
            size = size if size is not None else m.stride
            width = max(width, m.out_channels)
        if isinstance(size, int) or (isinstance(size, (tuple, list)) and size and all(isinstance(v, int) for v in size)):
            p = min(size) if isinstance(size, (tuple, list)) else size
            patch = p if patch == 0 else min(patch, p)
        if isinstance(m, nn.Linear):
            width = max(width, m.out_features)
        n = getattr(m, "num_heads", None)
        if isinstance(n, int) and not isinstance(n, bool):
            heads = max(heads, n)
        n = getattr(m, "num_prefix_tokens", None)
        if isinstance(n, int) and not isinstance(n, bool):
            prefix = max(prefix, n)
    patch = max(patch, 1)
    tokens = -(-h // patch) * -(-w // patch) + prefix
    bound = 4 * max(heads * tokens * tokens, tokens * width, c * h * w)
    return bound, (f"an upper bound: {heads} head(s) of attention over {tokens:,} tokens; the forward pass "
                   "could not run on the meta device")


def check_model_size(build: Callable[[], nn.Module], where: str,
                     input_size: Optional[Callable[[nn.Module], Sequence[int]]] = None,
                     max_param_bytes: int = MAX_PARAM_BYTES,
                     max_activation_bytes: int = MAX_ACTIVATION_BYTES) -> SizeEstimate:
    """``estimate_size``, then ModelSpecError naming ``where`` when over either limit."""
    _, est = estimate_size(build, input_size, max_param_bytes)
    if est.param_bytes > max_param_bytes:
        raise ModelSpecError(f"{where}: the model would hold {est.params / 1e6:,.0f} M parameters and buffers "
                             f"({_gib(est.param_bytes)} in float32), over the limit of {_gib(max_param_bytes)}; "
                             "use a smaller model (depth, embed_dim)")
    if est.largest_activation_bytes is not None and est.largest_activation_bytes > max_activation_bytes:
        raise ModelSpecError(f"{where}: one forward pass on one image would make a {_gib(est.largest_activation_bytes)}"
                             f" tensor ({est.largest_op}), over the limit of {_gib(max_activation_bytes)}; use a "
                             "smaller img_size or a larger patch_size")
    return est


def _gib(n: int) -> str:
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 1024 ** 3 / 10 else f"{n / 1024 ** 2:.1f} MiB"


def option_rows() -> List[Tuple[str, str, str]]:
    """(option, allowed values, what it is) for the docs table."""
    return [(k, o.describe(), o.what) for k, o in OPTIONS.items()]


def _finite(values: Iterable[Any]) -> bool:
    return all(not isinstance(v, float) or math.isfinite(v) for v in values)


def options_table() -> str:
    """The Markdown table of ``OPTIONS`` that docs/security.md shows."""
    lines = ["| option | allowed | what |", "|---|---|---|"]
    lines += [f"| `{k}` | {allowed} | {what} |" for k, allowed, what in option_rows()]
    return "\n".join(lines)
