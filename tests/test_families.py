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


# --- what the sweep and attributions see inside each family (equishift.archs Layer specs) ----------------
LAYER_CASES = {  # name -> (size, kwargs, attention kinds the baseline records; empty for a CNN)
    **{n: (*FAMILIES[n], set()) for n in ("resnet26d", "convnext_atto")},
    "pvt_v2_b0": (*FAMILIES["pvt_v2_b0"], {"query"}),
    "swinv2_tiny_window8_256": (*FAMILIES["swinv2_tiny_window8_256"], {"window"}),
    "vit_small_resnet26d_224": (*FAMILIES["vit_small_resnet26d_224"], {"cls"}),
    "swin_tiny_patch4_window7_224": (64, dict(img_size=64, window_size=4, embed_dim=16, depths=(2, 2),
                                              num_heads=(1, 2)), {"window"}),
}


def _layer_model(name: str) -> nn.Module:
    size, kw, _ = LAYER_CASES[name]
    torch.manual_seed(0)  # timm's init draws from the global generator
    return trained_like(timm.create_model(name, pretrained=False, num_classes=10, **kw), 0).eval()


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_sweep_records_every_layer_of_the_family(name):
    """Per-layer equivariance error for every stage/block (zero once anchored), attention where the family
    has it (normalised per kind), and a reason instead of an empty record for a CNN."""
    from equishift.archs import layers_of
    from equishift.sweep import sweep

    size, _, kinds = LAYER_CASES[name]
    base = _layer_model(name)
    model = anchorize(base)
    x = torch.randn(3, size, size, generator=torch.Generator().manual_seed(3))
    shifts = SHIFTS % size
    names = [layer.name for layer in layers_of(base)]
    assert names and names == [layer.name for layer in layers_of(model)]  # anchored: same layer names
    res = sweep(model, x, shifts)
    assert res.layers == names and set(res.layer_error) == set(names)
    worst = max(float(e.max()) for e in res.layer_error.values())
    assert worst <= 1e-4, f"anchored {name}: a layer is not equivariant ({worst:.2e})"
    ref = sweep(base, x, shifts)
    assert max(float(e.max()) for e in ref.layer_error.values()) > 1e-3  # the baseline is not
    assert set(ref.meta["attention_kind"].values()) == kinds
    if not kinds:
        assert ref.attention == {} and "has no attention layers" in ref.meta["not_recorded"]["attention"]
        return
    for layer, kind in ref.meta["attention_kind"].items():
        a = ref.attention[layer].float()
        h, w = ref.meta["grid"][layer]
        stride = ref.meta["attention_stride"][layer]
        assert a.shape[-2:] == (round(size / stride), round(size / stride))
        if kind == "query":  # one row of a softmax: a distribution over the key grid
            assert (a.sum((-2, -1)) - 1).abs().max() < 5e-3
        elif kind == "cls":  # the CLS row without the CLS itself: most, not all, of a distribution
            assert ((a.sum((-2, -1)) > 0) & (a.sum((-2, -1)) < 1 + 5e-3)).all()


def test_swin_window_maps_undo_the_cyclic_shift_of_shifted_windows():
    """SW-MSA attends inside windows of the map rolled by -shift; the recorded map rolls them back, so each
    window's received attention (which sums to 1) sits at offset +shift on the block's grid."""
    from equishift.archs import layers_of
    from equishift.sweep import sweep

    model = _layer_model("swin_tiny_patch4_window7_224")
    with torch.no_grad():  # peaked attention: a misplaced window would not sum to 1
        for m in model.modules():
            if hasattr(m, "qkv"):
                m.qkv.weight.mul_(8.0)
    specs = {layer.name: layer for layer in layers_of(model)}
    shifted = [n for n, layer in specs.items() if any(layer.shift)]
    assert shifted, "the test model has no shifted-window block"
    res = sweep(model, torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(4)), [(0, 0)])
    for layer, spec in specs.items():
        a = res.ref_attention[layer].float()                                    # [heads, h, w]
        wh, ww = spec.window
        back = torch.roll(a, shifts=tuple(-v for v in spec.shift), dims=(-2, -1))  # the attention's own frame
        heads, h, w = back.shape
        win = back.reshape(heads, h // wh, wh, w // ww, ww).sum((2, 4))
        assert (win - 1).abs().max() < 5e-3, layer
        if layer in shifted:  # without the roll the windows would not line up
            plain = a.reshape(heads, h // wh, wh, w // ww, ww).sum((2, 4))
            assert (plain - 1).abs().max() > 0.02, layer


@pytest.mark.parametrize("name", ["resnet26d", "swin_tiny_patch4_window7_224", "pvt_v2_b0"])
def test_gradcam_on_a_layer_is_equivariant_once_anchored(name):
    from equishift.archs import layers_of
    from equishift.attribution import compare, gradcam

    size = LAYER_CASES[name][0]
    model = anchorize(_layer_model(name))
    layer = layers_of(model)[-1].name
    x = torch.randn(3, size, size, generator=torch.Generator().manual_seed(5))
    ref = gradcam(model, x, layer=layer)
    moved = gradcam(model, x, layer=layer, shift=(5, 11))
    assert ref.map.shape == (size, size) and ref.map.abs().sum() > 0
    r, iou = compare(moved, ref)
    assert r > 0.999 and iou > 0.99


def test_only_the_adapters_know_timm_classes():
    """The registry is the one place that knows architectures: no isinstance test on a timm model class
    (or on a class named like one) anywhere else in the library or the dashboard."""
    import ast
    from pathlib import Path

    from equishift.archs import adapters

    classes = {c.rsplit(".", 1)[1] for a in adapters() for c in a.classes}
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*(root / "equishift").rglob("*.py"), *(root / "dashboard").rglob("*.py")]:
        if "archs" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} | \
                        {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if names & classes:
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("timm.models"):
                if {a.name for a in node.names} & classes:
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} imports a timm model class")
    assert classes >= {"VisionTransformer", "Twins", "SwinTransformer", "ResNet", "ConvNeXt"}
    assert not offenders, offenders


def test_sweeps_of_layouts_the_adapters_do_not_anchor():
    """Layer specs must not refuse what anchorize refuses: a Swin whose window timm shrank to a non-square
    one on a small stage, and a linear PVT-v2 (keys pooled to a fixed grid), sweep with every record."""
    from timm.models.swin_transformer import SwinTransformer

    from equishift.archs import layers_of
    from equishift.sweep import sweep

    torch.manual_seed(0)
    swin = SwinTransformer(img_size=(16, 64), patch_size=4, window_size=8, embed_dim=16, depths=(2,),
                           num_heads=(2,), num_classes=3).eval()
    res = sweep(swin, torch.randn(3, 16, 64), [(0, 0), (1, 5)])
    a = res.ref_attention["layers.0.blocks.0"].float()  # a (4, 8) window on a 4 x 16 grid: rows sum to 1
    assert a.shape[-2:] == (4, 16) and (a.reshape(2, 1, 4, 2, 8).sum((2, 4)) - 1).abs().max() < 5e-3
    li = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=3, linear=True).eval()
    res = sweep(li, torch.randn(3, 64, 64), [(0, 0), (4, 8)])
    assert set(res.layer_error) == {layer.name for layer in layers_of(li)}
    assert set(res.attention) == set(res.meta["attention_kind"])  # only the blocks with a key grid
