"""equishift.layers on big maps: the circular conv computed as a zero-padded conv whose border is
recomputed from wrapped strips, and the anchor + circular padding fused into one copy. Both must give the
values of the plain definitions (pad circularly, then convolve / pool), and a model using them must stay
exactly invariant. The size thresholds are lowered here so that small tensors take the big-map paths."""
from __future__ import annotations

import itertools

import pytest
import timm
import torch
import torch.nn.functional as F

from equishift import anchorize
from equishift.layers import AnchoredModule, CircularConv2d, CircularMaxPool2d, circular
from equishift.layers import anchored as anchored_layers
from equishift.testing import check_shift_invariant, trained_like

CONV_CASES = [c for c in itertools.product([7, 8, 13], [9, 16], [1, 3, 5], [1, 2, 4], [0, 1, 2, 3], [1, 2], [1, 4])
              if (c[2] - 1) * c[5] + 1 <= min(c[0], c[1]) + 2 * c[4] and c[4] <= min(c[0], c[1])]


@pytest.mark.parametrize("h, w, k, s, p, d, g", CONV_CASES[::3])
def test_border_strip_conv_equals_padding_first(h, w, k, s, p, d, g):
    gen = torch.Generator().manual_seed(h * 100 + w + k + s + p)
    x = torch.randn(2, 8, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(8, 8 // g, k, k, generator=gen, dtype=torch.float64)
    bias = torch.randn(8, generator=gen, dtype=torch.float64)
    want = F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), weight, bias, s, 0, d, g)
    got = circular.circular_conv2d(x, weight, bias, (s, s), (p, p), (d, d), g)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-12


@pytest.fixture
def big_map_paths(monkeypatch):
    """Every big-map path on, whatever the size."""
    from equishift import polyphase

    monkeypatch.setattr(circular, "_BORDER_FIX_MIN", 0)
    monkeypatch.setattr(circular, "_BORDER_FIX_SIDE", 0)
    monkeypatch.setattr(anchored_layers, "_FUSE_MIN", 0)
    monkeypatch.setattr(polyphase, "_BLOCKS_MIN", 0)
    monkeypatch.setattr(polyphase, "_CHAIN_MIN", 0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_circular_conv_module_takes_the_strip_path_with_the_same_values(big_map_paths, dtype, tol):
    conv = CircularConv2d(6, 10, 3, stride=2, padding=1, dtype=dtype)
    x = torch.randn(2, 6, 12, 10, generator=torch.Generator().manual_seed(0), dtype=dtype)
    want = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), conv.weight, conv.bias, 2)
    with torch.inference_mode():
        got = conv(x)
    assert (got - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("inner", ["pool", "conv"])
def test_fused_anchor_and_padding_equals_the_two_steps(big_map_paths, inner):
    module = CircularMaxPool2d(torch.nn.MaxPool2d(3, 2, 1)) if inner == "pool" else CircularConv2d(4, 4, 3, 2, 1)
    wrapped = AnchoredModule(module, 2)
    x = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fused = wrapped(x)
    rolled = wrapped.anchor(x)  # autograd on: the plain roll, then the module's own padding
    with torch.no_grad():
        plain = F.pad(rolled, module.pad, mode="circular")
        want = F.max_pool2d(plain, 3, 2) if inner == "pool" else F.conv2d(plain, module.weight, module.bias, 2)
    assert torch.allclose(fused, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("pvt_v2_b0", 64)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_families_stay_exactly_invariant_on_the_big_map_paths(big_map_paths, monkeypatch, name, size, dtype, tol):
    from equishift import polyphase

    calls = {"strips": 0, "blocks": 0}

    def counted(fn, key):
        def run(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(circular, "circular_conv2d", counted(circular.circular_conv2d, "strips"))
    monkeypatch.setattr(polyphase, "_roll_blocks", counted(polyphase._roll_blocks, "blocks"))
    torch.manual_seed(0)
    model = anchorize(trained_like(timm.create_model(name, pretrained=False, num_classes=10), 0)).to(dtype).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    shifts = torch.tensor([[3, 5], [17, 30], [0, 41], [63, 1]]) % size
    with torch.inference_mode():
        assert check_shift_invariant(model, x, shifts, atol=tol).max_error <= tol
    assert calls["strips"] > 0 and calls["blocks"] > 0  # the paths under test ran
