"""equishift.attribution: maps at image resolution, the target convention, the input frame of GradCAM
for anchored models, and the un-shift-and-compare score."""
from __future__ import annotations

import pytest
import torch

from equishift.attribution import Attribution, compare, gradcam, integrated_gradients, saliency
from equishift.errors import EquishiftError
from equishift.shifts import shift

from engine_helpers import anchored, image, twins, vit


@pytest.fixture(scope="module")
def models():
    v, t = vit(), twins()
    return {"vit": v, "vit-a": anchored(v), "twins": t, "twins-a": anchored(t)}


def test_saliency_is_the_summed_absolute_input_gradient(models):
    model, x = models["vit"], image(1)
    att = saliency(model, x, shift=(2, 3))
    assert all(p.grad is None for p in model.parameters())  # captum left no gradients on the model
    xs = shift(x, 2, 3)[None].requires_grad_(True)
    target = int(model(x[None]).argmax())
    model(xs)[0, target].backward()
    model.zero_grad(set_to_none=True)
    assert att.target == target and att.map.shape == (32, 32)
    assert torch.allclose(att.map, xs.grad[0].abs().sum(0), atol=1e-6)


def test_integrated_gradients_satisfy_completeness(models):
    """Sum of IG attributions ≈ f(x) − f(0) for the target (captum's Gauss-Legendre rule; 5% tolerance)."""
    model, x = models["vit"], image(2)
    att = integrated_gradients(model, x, steps=64)
    with torch.no_grad():
        gap = float(model(x[None])[0, att.target] - model(torch.zeros_like(x)[None])[0, att.target])
    assert att.map.shape == (32, 32)
    assert abs(float(att.map.sum()) - gap) < 0.05 * abs(gap) + 1e-3


@pytest.mark.parametrize("name", ["vit-a", "twins-a"])
@pytest.mark.parametrize("method", [saliency, gradcam])
def test_anchored_models_give_maps_that_follow_the_shift(models, name, method):
    model, x = models[name], image(3)
    ref = method(model, x)
    for s in [(1, 2), (5, -7), (17, 9)]:  # sub-patch, negative, beyond the deepest stride
        att = method(model, x, shift=s)
        assert att.target == ref.target
        assert torch.allclose(att.aligned(), ref.map, atol=1e-5 * float(ref.map.abs().max()) + 1e-7), s
        r, iou = compare(att, ref)
        assert r > 0.9999 and iou == 1.0


@pytest.mark.parametrize("name, layer", [("vit-a", "blocks.1"), ("twins-a", "blocks.1.0"), ("twins-a", "blocks.0.1")])
def test_token_layer_gradcam_is_in_the_input_frame_for_anchored_models(models, name, layer):
    model, x = models[name], image(4)
    ref = gradcam(model, x, layer=layer)
    assert ref.map.shape == (32, 32) and ref.layer == layer and ref.map.min() >= 0 and ref.map.max() > 0
    for s in [(9, 3)]:
        att = gradcam(model, x, shift=s, layer=layer)
        assert torch.allclose(att.aligned(), ref.map, atol=1e-4 * float(ref.map.max()) + 1e-7), s


def test_token_layer_gradcam_is_cell_constant_and_differs_from_patch_gradcam(models):
    model, x = models["vit"], image(5)
    cam = gradcam(model, x, layer="blocks.1").map
    # nearest upsampling: constant on each 4×4 patch of the (unanchored) grid
    cells = cam.reshape(8, 4, 8, 4)
    assert (cells - cells[:, :1, :, :1]).abs().max() == 0
    assert not torch.allclose(cam, gradcam(model, x).map)


def test_baseline_maps_do_not_follow_a_sub_patch_shift(models):
    model, x = models["vit"], image(6)
    ref = saliency(model, x)
    r, iou = compare(saliency(model, x, shift=(1, 2)), ref)
    assert r < 0.99


def test_compare_against_hand_made_maps():
    m = torch.zeros(10, 10)
    m[2, 3], m[5, 5] = 1.0, 0.5
    ref = Attribution(m, "x", 0, (0, 0), "circular")
    moved = Attribution(torch.roll(m, (3, -4), (0, 1)), "x", 0, (3, -4), "circular")
    r, iou = compare(moved, ref)
    assert r == pytest.approx(1.0) and iou == 1.0
    off = Attribution(torch.roll(m, (3, -3), (0, 1)), "x", 0, (3, -4), "circular")
    r, iou = compare(off, ref, frac=0.02)  # top-2 pixels, both displaced by one column
    assert iou == 0.0 and r < 0


def test_explicit_target_and_bad_input(models):
    att = saliency(models["vit"], image(7), target=4)
    assert att.target == 4
    with pytest.raises(EquishiftError, match="unknown layer"):
        gradcam(models["vit"], image(7), layer="blocks.99")
    with pytest.raises(EquishiftError, match="shift mode"):
        saliency(models["vit"], image(7), mode="nope")
    with pytest.raises(EquishiftError, match="image must be"):
        saliency(models["vit"], torch.zeros(2, 3, 32, 32))


def test_gradcam_on_a_layer_the_score_never_reads_is_a_named_error(models):
    """A class-token ViT's head reads only the class token after the last block, so no gradient reaches
    the last block's patch tokens: GradCAM there would be an all-zero map that looks like an answer."""
    model, x = models["vit"], image(6)
    if getattr(model, "global_pool", None) != "token":
        pytest.skip("the helper ViT pools tokens; the case needs a class-token head")
    last = f"blocks.{len(model.blocks) - 1}"
    with pytest.raises(EquishiftError, match=f"GradCAM on {last} is zero everywhere"):
        gradcam(model, x, layer=last)
    assert gradcam(model, x, layer=f"blocks.{len(model.blocks) - 2}").map.max() > 0  # an earlier block is read


class _TupleBlock(torch.nn.Module):
    """A layer returning (tokens, attention-like map), as many transformer blocks do."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.a(x), [self.b(x)]


class _TupleNet(torch.nn.Module):
    def __init__(self, reads: str):
        super().__init__()
        torch.manual_seed(0)
        self.block, self.head, self.reads = _TupleBlock(), torch.nn.Linear(4, 5), reads

    def forward(self, x):
        first, (second,) = self.block(x)
        feats = {"first": first, "second": second, "none": x[:, :1].expand(-1, 4, -1, -1)}[self.reads]
        return self.head(feats.mean(dim=(2, 3)))


@pytest.mark.parametrize("reads, reached", [("first", True), ("second", True), ("none", False)])
def test_gradient_reaches_a_layer_that_returns_a_tuple(reads, reached):
    """A layer's output may be a tuple or a list of tensors: a gradient reaching any of them counts, so a
    GradCAM of zero there is not mistaken for a layer the score never reads (and one truly unread is)."""
    from equishift.attribution import _gradient_reaches

    net = _TupleNet(reads).eval()
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert _gradient_reaches(net, net.block, x, 2) is reached
