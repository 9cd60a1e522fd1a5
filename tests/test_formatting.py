"""equishift.formatting: zero is never shown with a sign; every other number formats as ``format`` does."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from equishift.formatting import clean, fmt


@pytest.mark.parametrize("value,spec,want", [
    (-0.0, ".1f", "0.0"),
    (-0.0, "g", "0"),
    (-0.0, "+.1f", "0.0"),
    (0.0, "+.1f", "0.0"),            # '+' asks for a sign, but zero has none
    (-1e-9, ".4f", "0.0000"),
    (1e-9, "+.4f", "0.0000"),
    (-1e-9, "+.1f", "0.0"),
    (-0.04, ".1f", "0.0"),           # rounds to zero at this precision
    (-1e-9, ".1%", "0.0%"),
    (-0.0, ".2e", "0.00e+00"),
    (-0.0, ">8.2f", "    0.00"),    # width and alignment are kept
    (-0.0, "+08.2f", "00000.00"),
    (0, "+d", "0"),
    # everything else is exactly format()
    (-1e-9, "g", "-1e-09"),          # nonzero at this precision: the sign is real
    (-1e-9, ".2e", "-1.00e-09"),
    (-0.06, ".1f", "-0.1"),
    (0.05001, "+.1f", "+0.1"),
    (12.345, ".1f", "12.3"),
    (-12.3456, "+.2f", "-12.35"),
    (0.25, "+.2f", "+0.25"),
    (-3, "d", "-3"),
    (3, "g", "3"),
    (float("inf"), ".1f", "inf"),
    (float("-inf"), ".1f", "-inf"),
    (float("inf"), "+.1f", "+inf"),
    (float("nan"), ".1f", "nan"),
    (float("nan"), "+.1f", "nan"),  # NaN has no meaningful sign
    (-float("nan"), ".3f", "nan"),
])
def test_fmt(value, spec, want):
    assert fmt(value, spec) == want


def test_fmt_takes_numpy_and_torch_scalars():
    assert fmt(np.float32(-0.0), ".1f") == "0.0"
    assert fmt(np.float64(-1e-12), "+.3f") == "0.000"
    assert fmt(torch.tensor(-1e-9), ".3f") == "0.000"
    assert fmt(torch.tensor(0.5, dtype=torch.float16), "+.2f") == "+0.50"
    assert fmt(np.int64(-2), "d") == "-2"
    assert fmt(np.float32(1.5)) == "1.5"  # default spec: "g"


def test_fmt_agrees_with_format_away_from_zero():
    rng = np.random.default_rng(0)
    for v in np.concatenate([rng.normal(0, 10, 200), rng.normal(0, 1e-6, 50)]).tolist():
        for spec in (".1f", "+.3f", ".4g", ".2e", ".1%"):
            got, plain = fmt(v, spec), format(v, spec)
            digits = [c for c in plain.split("e")[0] if c.isdigit()]
            if any(c != "0" for c in digits):
                assert got == plain, (v, spec)
            else:  # the value rounds to zero at this precision
                assert got == format(0.0, spec.lstrip("+")), (v, spec)


def _unsigned_zero(x) -> bool:
    return x == 0 and math.copysign(1.0, x) == 1.0


def test_clean_scalars_and_containers():
    assert _unsigned_zero(clean(-0.0))
    assert clean(-1e-9) == -1e-9                      # without decimals: values unchanged
    assert _unsigned_zero(clean(-1e-9, decimals=4))    # rounded, then no sign
    assert clean(0.123456, decimals=3) == 0.123
    assert math.isnan(clean(float("nan"), 2)) and clean(float("-inf"), 2) == float("-inf")
    assert clean(-3) == -3 and clean(True) is True and clean(None) is None and clean("-0.0") == "-0.0"
    out = clean({"a": -0.0, "b": [-1e-12, 2, (-0.0, "x")], "c": None}, decimals=6)
    assert out == {"a": 0.0, "b": [0.0, 2, (0.0, "x")], "c": None}
    assert _unsigned_zero(out["a"]) and _unsigned_zero(out["b"][0]) and _unsigned_zero(out["b"][2][0])
    assert isinstance(out["b"][2], tuple)


def test_clean_arrays_and_tensors():
    a = np.array([-0.0, -1e-12, 1.25, np.nan, -np.inf], dtype=np.float32)
    got = clean(a)
    assert got.dtype == np.float32 and not np.signbit(got[0]) and got[1] < 0  # -1e-12 kept without decimals
    got = clean(a, decimals=4)
    assert not np.signbit(got[:2]).any() and got[2] == 1.25 and np.isnan(got[3]) and got[4] == -np.inf
    assert np.signbit(a[0])  # the input is not modified
    assert not np.signbit(clean(np.float32(-0.0)))
    ints = np.array([-1, 0, 2])
    assert clean(ints) is ints
    t = torch.tensor([-0.0, -1e-9, 0.5])
    got = clean(t, decimals=3)
    assert got.dtype == torch.float32 and not torch.signbit(got[:2]).any() and got[2] == 0.5
    assert torch.signbit(t[0])
    assert not torch.signbit(clean(torch.tensor([-0.0], dtype=torch.float64))).any()


def test_printed_clean_values_show_no_signed_zero():
    values = clean([-0.0, -1e-12, -4e-5], decimals=4)
    assert [f"{v:.4f}" for v in values] == ["0.0000", "0.0000", "0.0000"]
    assert str(clean(np.array([-0.0, -1e-12]), decimals=3)) == "[0. 0.]"
