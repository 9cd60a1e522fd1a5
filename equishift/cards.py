"""Reading a zoo card (NAME.json next to NAME.safetensors) as untrusted input.

A card comes with downloaded weights, so it is checked like them: the file is a regular file of at most
``MAX_CARD_BYTES`` (checked on the open file, before reading), JSON without NaN/Infinity, nested at most
``MAX_DEPTH`` deep, and valid against ``CARD_SCHEMA`` (jsonschema): every field the loader reads has a
type and a range, strings and lists are bounded, ``arch_config`` is held to the constructor-option
whitelist of ``equishift.options`` and ``weights_sha256`` is required. Any failure is a ModelSpecError that
names the card file and the field.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Dict, List

from .errors import ModelSpecError
from .options import OPTIONS_SCHEMA, check_options, short

__all__ = ["CARD_SCHEMA", "MAX_CARD_BYTES", "MAX_DEPTH", "MAX_INPUT_SIDE", "read_card", "validate_card"]

MAX_CARD_BYTES = 1024 ** 2   # the shipped cards are ~5 KB; an imported paper card with its anchor list ~40 KB
MAX_DEPTH = 32               # deepest shipped card: 4 (metrics → name → ci95 → value)
MAX_INPUT_SIDE = 1024        # pixels per side; the canvas of a 1024² RGB input is 12 MiB in float32
TIMM_CLASSES = ("VisionTransformer", "Twins", "SwinTransformer")
ANCHORINGS = ("none", "full", "pos-only", "patch-only")

_NAME = {"type": "string", "maxLength": 200}
_TEXT = {"type": "string", "maxLength": 4096}
_NUMS = {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 16}
_FREE = {"type": "object", "maxProperties": 256}   # free-form records: bounded by MAX_DEPTH and the byte cap
CARD_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "equishift zoo card",
    "type": "object",
    "required": ["timm_class", "arch_config", "classes", "input_size", "mean", "std", "weights_sha256"],
    "properties": {
        "name": _NAME,
        "arch": {"type": "string", "maxLength": 32},
        "timm_class": {"enum": list(TIMM_CLASSES)},
        "timm_model": {"type": "string", "pattern": r"^[A-Za-z0-9_.\-]{1,200}$"},
        "arch_config": OPTIONS_SCHEMA,
        "anchoring": {"enum": list(ANCHORINGS)},
        "anchor_options": {"type": "object", "maxProperties": 16, "additionalProperties": {
            "type": ["boolean", "number", "string", "null"], "maxLength": 64}},
        "classes": {"type": "array", "items": _NAME, "minItems": 1, "maxItems": 100_000},
        "input_size": {"type": "array", "prefixItems": [
            {"type": "integer", "minimum": 1, "maximum": 16},
            {"type": "integer", "minimum": 1, "maximum": MAX_INPUT_SIDE},
            {"type": "integer", "minimum": 1, "maximum": MAX_INPUT_SIDE}], "minItems": 3, "maxItems": 3},
        "mean": _NUMS,
        "std": {**_NUMS, "items": {"type": "number", "exclusiveMinimum": 0}},
        "pad": {"type": "integer", "minimum": 0, "maximum": MAX_INPUT_SIDE // 2},
        "dataset": {"type": ["string", "null"], "maxLength": 4096},
        "untrained": {"type": "boolean"},
        "weights_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "interpolation": {"enum": ["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"]},
        "crop_pct": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "crop_mode": {"enum": ["center", "squash", "border"]},
        "metrics": _FREE, "training": _FREE, "paper": _FREE, "base_metrics": _FREE,
        "anchors": {"type": "array", "maxItems": 4096},
        "warnings": {"type": "array", "items": _TEXT, "maxItems": 64},
    },
    "additionalProperties": True,   # other records (notes, provenance) are kept, within the byte and depth caps
}


def read_card(path: Path) -> Dict[str, Any]:
    """The validated card at ``path``; ModelSpecError naming the file (and the field) otherwise."""
    name = path.name
    try:
        # O_NONBLOCK: a FIFO planted under the card's name opens at once instead of waiting for a writer;
        # fstat on the open descriptor then decides, so a swap between the check and the read changes nothing.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ModelSpecError(f"model card {name}: cannot open it ({e.strerror or type(e).__name__})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ModelSpecError(f"model card {name}: not a regular file")
        if st.st_size > MAX_CARD_BYTES:
            raise ModelSpecError(f"model card {name}: {st.st_size} bytes, over the limit of {MAX_CARD_BYTES} "
                                 "bytes for a card; refused before reading")
        data = f.read(MAX_CARD_BYTES + 1)
    if len(data) > MAX_CARD_BYTES:  # grew since fstat
        raise ModelSpecError(f"model card {name}: over the limit of {MAX_CARD_BYTES} bytes for a card")
    try:
        card = json.loads(data.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise ModelSpecError(f"model card {name}: JSON nested too deeply (limit {MAX_DEPTH} levels)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSpecError(f"model card {name}: not valid JSON ({short(str(e), 120)})") from None
    except ValueError as e:  # NaN/Infinity (below), an integer of more than 4300 digits
        raise ModelSpecError(f"model card {name}: not valid JSON ({short(str(e), 120)})") from None
    validate_card(card, name)
    return card


def _no_constant(token: str):
    raise ValueError(f"{token} is not a number JSON allows")


def _finite_float(token: str) -> float:
    value = float(token)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{short(token, 30)} overflows a float")
    return value


def _depth(obj: Any) -> int:
    """Nesting depth, iteratively: a card nested 10 000 deep must not be walked by recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, d)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((v, d + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def validate_card(card: Any, name: str) -> None:
    """Schema, depth and cross-field checks of a parsed card; ModelSpecError naming ``name`` and the field."""
    from jsonschema import Draft202012Validator

    if _depth(card) > MAX_DEPTH:
        raise ModelSpecError(f"model card {name}: JSON nested more than {MAX_DEPTH} levels deep")
    if isinstance(card, dict) and isinstance(card.get("arch_config"), dict):
        # First, for its reasons (an option that reads weights, the allowed list); the schema repeats it.
        check_options(card["arch_config"], f"model card {name}: arch_config")
    errors = list(Draft202012Validator(CARD_SCHEMA).iter_errors(card))
    if errors:
        e = min(errors, key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ModelSpecError(f"model card {name}: {_where(e)}: {_problem(e)}{more}")
    c, h, w = card["input_size"]
    for key in ("mean", "std"):
        if len(card[key]) != c:
            raise ModelSpecError(f"model card {name}: field {key}: {len(card[key])} values for {c} input channels")
    if 2 * card.get("pad", 0) >= min(h, w):
        raise ModelSpecError(f"model card {name}: field pad: {card['pad']} leaves no image inside {h}×{w}")
    in_chans = card["arch_config"].get("in_chans")
    if in_chans is not None and in_chans != c:
        raise ModelSpecError(f"model card {name}: field arch_config/in_chans: {in_chans}, but input_size has {c} "
                             "channels")


def _where(e) -> str:
    path: List[str] = [str(p) for p in e.absolute_path]
    return "field " + "/".join(path) if path else "the card"


def _problem(e) -> str:
    """jsonschema's reason in a few words, never echoing a long value (its own message quotes it whole)."""
    v, inst = e.validator, e.instance
    kind = type(inst).__name__.replace("dict", "object").replace("list", "array").replace("NoneType", "null")
    if v == "type":
        want = e.validator_value if isinstance(e.validator_value, str) else " or ".join(e.validator_value)
        return f"must be {'a JSON object' if want == 'object' else want}, got {kind}"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        words = {"minimum": "at least", "maximum": "at most", "exclusiveMinimum": "over", "exclusiveMaximum": "under"}
        return f"{short(inst, 40)} is out of range (must be {words[v]} {e.validator_value})"
    if v in ("maxLength", "minLength"):
        return f"{len(inst)} characters, limit {'≤' if v == 'maxLength' else '≥'} {e.validator_value}"
    if v in ("maxItems", "minItems", "maxProperties"):
        n = len(inst)
        return f"{n} entries, limit {'≥' if v == 'minItems' else '≤'} {e.validator_value}"
    if v == "enum":
        return f"must be one of {', '.join(map(repr, e.validator_value))}, got {short(inst, 40)}"
    if v == "required":
        missing = [k for k in e.validator_value if k not in inst]
        return f"lacks {', '.join(missing)}" + (" (the sha256 of the weights file: a card without it would load "
                                                "any file under the weights' name)" if "weights_sha256" in missing
                                                else "")
    if v == "pattern":
        return f"{short(inst, 40)} does not match {e.validator_value}"
    if v == "additionalProperties":
        extra = [k for k in inst if k not in e.schema.get("properties", {})]
        return f"unknown key(s) {', '.join(short(k, 40) for k in extra[:5])}"
    if v == "anyOf":
        return f"{short(inst, 40)} is not an allowed value"
    return short(e.message, 120)
