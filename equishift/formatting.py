"""Numbers for people: the one place the dashboard, the figures and the report format a number.

Floating-point results differ in their last bits from one CPU to the next (PyTorch picks its vector
kernels at run time: AVX-512, AVX2 or none), so a quantity that is zero in exact arithmetic comes out as
``-3e-9`` on one machine and ``+2e-9`` on another. Formatted naively these read ``-0.0`` and ``+0.0``: a
sign that means nothing, and text that differs between machines. Here zero is always printed unsigned.

- ``fmt(value, spec)``: ``format(value, spec)``, except that anything printing as a signed zero at that
  precision (``-0.0``, ``-0.000``, ``+0.0``, ``-0``, ``-0.0%``) prints as the unsigned zero
  (``0.0``, ``0.000``, ``0.0``, ``0``, ``0.0%``), and NaN never carries a sign. Everything else is
  exactly what ``format`` gives (``fmt(-1e-9, "g") == "-1e-09"``: a nonzero value keeps its sign).
- ``clean(data, decimals=None)``: the same for numbers that travel as data to a table or a figure
  (floats, numpy arrays, tensors, and dicts / lists / tuples of them): ``-0.0`` becomes ``0.0``, and with
  ``decimals`` values are rounded first, so that a tiny negative becomes ``0.0`` rather than ``-0.0``.
  Values are otherwise unchanged (``-0.0 == 0.0``); ints, bools, strings and None pass through.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Optional

__all__ = ["fmt", "clean"]

# [[fill]align][sign][z]...: the sign (and Python 3.11's "z") of a format spec, to drop them
_SPEC = re.compile(r"(?P<head>(?:.?[<>=^])?)(?P<sign>[-+ ]?)(?P<z>z?)(?P<tail>.*)", re.S)
_EXPONENT = re.compile(r"[eE][-+]?\d+")


def _unsigned(spec: str) -> str:
    m = _SPEC.fullmatch(spec)
    return m["head"] + m["tail"] if m else spec


def _scalar(value: Any) -> Any:
    """numpy / torch scalars (and 1-element arrays) as Python numbers; anything else as it is."""
    if isinstance(value, (bool, int, float)):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError):  # not a single element: let format() complain
            return value
    return value


def fmt(value: Any, spec: str = "g") -> str:
    """``format(value, spec)`` that never shows a signed zero (see the module doc).

    >>> fmt(-1e-9, ".4f"), fmt(1e-9, "+.1f"), fmt(-0.0, "g"), fmt(0.25, "+.2f"), fmt(float("nan"), "+.1f")
    ('0.0000', '0.0', '0', '+0.25', 'nan')
    """
    v = _scalar(value)
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and math.isnan(v):
        return format(math.nan, _unsigned(spec))
    text = format(v, spec)
    if not isinstance(v, numbers.Real):
        return text
    mantissa = _EXPONENT.sub("", text)
    digits = [c for c in mantissa if c.isdigit()]
    if digits and all(c == "0" for c in digits) and ("-" in mantissa or "+" in mantissa):
        zero = 0 if isinstance(v, numbers.Integral) else 0.0
        return format(zero, _unsigned(spec))
    return text


def _round(x: float, decimals: Optional[int]) -> float:
    if decimals is not None and math.isfinite(x):
        x = round(x, decimals)
    return x + 0.0


def clean(data: Any, decimals: Optional[int] = None) -> Any:
    """``data`` with every ``-0.0`` turned into ``0.0`` (after rounding to ``decimals`` when given), so
    that neither a table nor a figure shows a signed zero (see the module doc). A new object is returned;
    the input is not modified."""
    if data is None or isinstance(data, (bool, str, bytes)):
        return data
    if isinstance(data, numbers.Integral):
        return data
    if isinstance(data, float):
        return _round(data, decimals)
    if isinstance(data, dict):
        return {k: clean(v, decimals) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        out = [clean(v, decimals) for v in data]
        if isinstance(data, list):
            return out
        return type(data)(*out) if hasattr(data, "_fields") else tuple(out)  # namedtuple or tuple
    module = type(data).__module__.split(".")[0]
    if module == "torch":
        if data.is_floating_point():
            return (data.round(decimals=decimals) if decimals is not None else data) + 0.0
        return data
    if module == "numpy":
        import numpy as np

        arr = np.asarray(data)
        if np.issubdtype(arr.dtype, np.floating):
            out = (np.round(arr, decimals) if decimals is not None else arr) + arr.dtype.type(0.0)
            return out if isinstance(data, np.ndarray) else out[()]
        return data
    if isinstance(data, numbers.Real):  # other float-like scalars
        return _round(float(data), decimals)
    return data
