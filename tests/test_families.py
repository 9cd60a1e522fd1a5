"""Every family of equishift.archs beyond ViT/Twins/Swin (tests/test_anchorize.py, tests/test_paper.py):
exactly invariant to circular shifts in ``full`` mode (float32 <= 1e-4 relative to the logits, float64 <=
1e-9), not in the partial modes, random weights with trained-like BatchNorm/LayerNorm statistics."""
from __future__ import annotations

import re

import pytest
import timm
import torch
from torch import nn

from equishift import anchorize
from equishift.anchoring import anchor_sites
from equishift.testing import check_shift_invariant, trained_like

# name, input size, constructor arguments (narrow where the default is slow)
FAMILIES = {
    "resnet18": (64, {}),
    "resnet26d": (64, {}),                                   # ResNet-D: deep stem, average-pool shortcut
    "convnext_atto": (64, {}),
    "pvt_v2_b0": (64, {}),
    "swinv2_tiny_window8_256": (128, dict(img_size=128, embed_dim=16, num_heads=(1, 1, 2, 2))),
    # hybrid ViT: APS in its ResNet-D backbone, then the ViT part (circular position conv on its 2x2 grid)
    "vit_small_resnet26d_224": (64, dict(img_size=64, depth=1, embed_dim=64, num_heads=2)),
}
SHIFTS = torch.tensor([[3, 5], [17, 30], [0, 41], [63, 1]])


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    size, kw = FAMILIES[name]
    model = trained_like(timm.create_model(name, pretrained=False, num_classes=10, **kw), seed).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        scale = model(x).abs().max().item()
        head = model.get_classifier()
        head.weight.mul_(3.0 / scale)  # logits of order one
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_is_exactly_invariant(name, dtype):
    size = FAMILIES[name][0]
    base = _model(name).to(dtype)
    model = anchorize(base).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    shifts = SHIFTS % size
    assert check_shift_invariant(model, x, shifts, atol=tol).max_error <= tol
    assert check_shift_invariant(base, x, shifts[:2]).max_error > 1e-3  # the baseline is not
    sites = anchor_sites(model)
    assert sites and all(s["anchored"] and s["why"] for s in sites)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "pvt_v2_b0"])
@pytest.mark.parametrize("mode", ["pos-only", "patch-only"])
def test_partial_modes_are_not_invariant(name, mode):
    size = FAMILIES[name][0]
    model = anchorize(_model(name), mode).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    assert check_shift_invariant(model, x, SHIFTS % size).max_error > 1e-3
    assert all(s["anchored"] == (mode == "patch-only") for s in anchor_sites(model))


def test_resnet_anchors_sit_where_aps_puts_them():
    model = anchorize(timm.create_model("resnet18", pretrained=False, num_classes=3))
    assert [(s["module"], s["stride"]) for s in anchor_sites(model)] == [
        ("conv1", 2), ("maxpool", 2), ("layer2.0", 2), ("layer3.0", 2), ("layer4.0", 2)]
    deep = anchorize(timm.create_model("resnet26d", pretrained=False, num_classes=3))
    assert [s["module"] for s in anchor_sites(deep)][:2] == ["conv1.0", "maxpool"]


def test_unsupported_variants_are_refused_with_the_module():
    li = timm.create_model("pvt_v2_b2_li", pretrained=False, num_classes=3)
    with pytest.raises(TypeError, match=r"'stages\.0\.blocks\.0\.attn' pools keys and values"):
        anchorize(li)
    for name in ("swinv2_cr_tiny_ns_224",):
        with pytest.raises(TypeError, match="anchorize supports"):
            anchorize(timm.create_model(name, pretrained=False, num_classes=3))


def test_compat_table_script_measures_a_family(capsys):
    """scripts/compat_table.py (the generator of docs/compatibility.md) on one model per status."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "compat_table.py"
    spec = importlib.util.spec_from_file_location("compat_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--families", "pvt_v2", "--match", "b0$|b2_li$", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| `pvt_v2_b0` \| 3\.7 \| 224 \| [\d.e-]+ \| [\d.e-]+ \| [\d.]+ \| exact \|", out), out
    assert "| `pvt_v2_b2_li` |" in out and "refused: module 'stages.0.blocks.0.attn'" in out
