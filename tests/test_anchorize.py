"""anchorize on timm ViT/DeiT and Twins: exact invariance under circular shifts (and its absence without
anchoring), where the anchors go, and that the result is an ordinary nn.Module.

Tolerance: max |Δ logits| ≤ 1e-4 in float32 (logits of order 1, see conftest._randomize); the untouched
models must exceed 1e-2, so every invariance test here is able to fail."""
from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from equishift import anchorize, anchoring_mode, record_anchors
from equishift.anchoring import CircularConv2d, ConvPosEmbed
from equishift.polyphase import PolyphaseAnchor, polyphase_norms
from equishift.shifts import period_grid, random_shifts
from equishift.testing import assert_shift_invariant, check_shift_invariant

from conftest import TWINS_IMG

ATOL = 1e-4
BROKEN = 1e-2  # an untouched model must miss invariance by at least 100 x ATOL
PARTIAL = 1e-3  # pos-only / patch-only must miss it by at least 10 x ATOL (patch-only ViT: ~4e-3)
MODES = ("full", "pos-only", "patch-only")


def shift_set(period: int, size: int, seed: int, n_random: int = 20) -> torch.Tensor:
    """Every shift of one period plus ``n_random`` larger ones (up to 3 image sizes, negative too)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat((period_grid(period), random_shifts(n_random, -3 * size, 3 * size, g)))


def first_anchor_moves_with_shift(rec: torch.Tensor, x: torch.Tensor, shifts: torch.Tensor, s: int) -> int:
    """Check a' = (a + δ) mod s for the image-level anchor recorded during check_shift_invariant (which runs
    x first, then every image under every shift, shift-major). Only images with a unique maximum count;
    returns how many were checked."""
    b = x.shape[0]
    assert rec.shape == ((1 + len(shifts)) * b, 2)
    top = polyphase_norms(x, s).flatten(1).topk(2, dim=1).values
    unique = (top[:, 0] - top[:, 1]) / top[:, 0] > 1e-4
    ref, moved = rec[:b], rec[b:].reshape(len(shifts), b, 2)
    want = (ref[None] + shifts[:, None]) % s
    assert torch.equal(moved[:, unique], want[:, unique])
    return int(unique.sum())


def invariance_and_its_absence(base: nn.Module, model: nn.Module, x: torch.Tensor, shifts: torch.Tensor,
                               stride: int, first_anchor: str):
    with record_anchors(model) as rec:
        report = assert_shift_invariant(model, x, shifts, atol=ATOL, batch_size=128)
    assert first_anchor_moves_with_shift(rec[first_anchor], x, shifts, stride) > 0
    broken = check_shift_invariant(base, x, shifts, batch_size=128)
    assert broken.max_error > BROKEN, f"untouched model unexpectedly invariant: {broken}"
    return report, broken


# --- invariance: ViT / DeiT ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [True, False], ids=["cls", "avg"])
@pytest.mark.parametrize("patch, img", [(p, i) for p in (4, 8, 16) for i in (32, 48, 64)])
def test_vit_full_is_invariant_untouched_is_not(make_vit, anchored, patch, img, cls):
    seed = patch * 100 + img + cls
    base = make_vit(patch=patch, img=img, cls=cls, seed=seed)
    model = anchored(base, "full", seed)
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(seed))
    invariance_and_its_absence(base, model, x, shift_set(patch, img, seed), patch, "patch_embed.anchor")


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(patch=st.sampled_from([2, 4, 8]), rows=st.integers(2, 6), cols=st.integers(2, 6), cls=st.booleans(),
       reg=st.integers(0, 2), batch=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_vit_full_invariant_on_non_square_images(make_vit, anchored, patch, rows, cols, cls, reg, batch, seed):
    h, w = rows * patch, cols * patch
    base = make_vit(patch=patch, img=(h, w), cls=cls, seed=seed, reg_tokens=reg)
    model = anchored(base, "full", seed)
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
    shifts = shift_set(patch, max(h, w), seed, n_random=6)
    with record_anchors(model) as rec:
        assert_shift_invariant(model, x, shifts, atol=ATOL)
    first_anchor_moves_with_shift(rec["patch_embed.anchor"], x, shifts, patch)


def test_vit_dynamic_img_size_runs_any_size_invariantly(make_vit, anchored):
    base = make_vit(patch=4, img=32, cls=True, seed=7, dynamic_img_size=True)
    for mode in ("full", "pos-only"):
        model = anchored(base, mode, 7)
        for h, w in [(32, 32), (48, 40), (24, 64)]:
            x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h + w))
            report = check_shift_invariant(model, x, shift_set(4, max(h, w), h, n_random=8))
            assert report.ok if mode == "full" else report.max_error > BROKEN, (mode, h, w, str(report))


def test_distilled_deit_full_is_invariant(randomize, anchored):
    import timm

    base = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=4,
                             depth=2, num_classes=10)
    base = randomize(base.eval(), 11)
    model = anchored(base, "full", 11)
    assert isinstance(model.pos_embed, torch.Tensor) and not isinstance(model.pos_embed, nn.Parameter)
    assert not model.pos_embed.any()  # distilled DeiT always adds pos_embed: it becomes a zero buffer
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    invariance_and_its_absence(base, model, x, shift_set(4, 32, 11), 4, "patch_embed.anchor")


@pytest.mark.slow
def test_vit_tiny_224_full_is_invariant(randomize, anchored):
    import timm

    base = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval(), 3)
    model = anchored(base, "full", 3)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    invariance_and_its_absence(base, model, x, shift_set(16, 224, 3), 16, "patch_embed.anchor")


# --- invariance: Twins ----------------------------------------------------------------------------------
@settings(max_examples=2, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 3))
@pytest.mark.parametrize("kind", ["svt", "pcpvt", "svt-odd", "pcpvt-sr1"])
def test_twins_full_is_invariant_untouched_is_not(make_twins, anchored, kind, seed, batch):
    base = make_twins(kind, seed=seed)
    model = anchored(base, "full", seed)
    img = TWINS_IMG.get(kind, 32)
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed))
    # The period of the whole tiny network (patch 4 x window 4 = 16 px; 4 x 3 x 2 at 48 px), not only the
    # first anchor's.
    shifts = shift_set(24 if img == 48 else 16, img, seed)
    invariance_and_its_absence(base, model, x, shifts, 4, "patch_embeds.0.anchor")


def jitter_anchor_inputs(model: nn.Module, ulps: float = 4.0, seed: int = 0):
    """Add a few ulps of independent noise to every anchor's input on every call: what another CPU (other
    vector widths) or another batch size does to the features reaching an anchor, reproduced on any
    machine. Returns the hook handles."""
    calls = [seed]

    def hook(module, args):
        (x,) = args
        calls[0] += 1
        g = torch.Generator().manual_seed(calls[0])
        noise = (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1).to(x.dtype)
        return (x + x * noise * ulps * torch.finfo(x.dtype).eps,)

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, PolyphaseAnchor)]


@pytest.mark.parametrize("kind", ["svt", "pcpvt"])
def test_untrained_twins_stay_invariant_under_rounding_noise(make_twins, kind):
    """Untrained Twins (LayerNorm γ = 1, β = 0): every token after a patch-embedding norm has norm ≈ sqrt(C),
    so the block anchors' l2 key is decided by rounding: with the plain argmax (tie_tol=0) a few ulps of
    noise — what another CPU does — flip them (on an AVX2 machine 1 of 25 seeds failed at 1.4e-4). The
    default rule breaks such near-ties by sum x⁴ and stays invariant on every seed."""
    worst_plain, worst = 0.0, 0.0
    for seed in range(12):
        base = make_twins(kind, seed=seed, randomized=False)
        with torch.no_grad():
            base.head.weight.mul_(20)  # logits of order 1, so a flipped anchor shows above ATOL
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        shifts = period_grid(16)[::7]
        for tie_tol in (0.0, None):
            model = anchorize(base).eval()
            for m in model.modules():
                if isinstance(m, PolyphaseAnchor):
                    m.tie_tol = tie_tol
            handles = jitter_anchor_inputs(model, seed=seed * 1000)
            err = check_shift_invariant(model, x, shifts, atol=ATOL, batch_size=64).max_error
            for h in handles:
                h.remove()
            if tie_tol is None:
                worst = max(worst, err)
            else:
                worst_plain = max(worst_plain, err)
    if kind == "svt":  # its window anchors sit right after a patch-embedding norm (PCPVT's s = 2 averages more)
        assert worst_plain > ATOL, f"plain argmax unexpectedly stable ({worst_plain:.2g}): no near-tie exercised"
    assert worst <= ATOL, f"default rule moved the logits by {worst:.2g} under rounding noise"


def test_twins_full_at_64px(make_twins, anchored):
    base = make_twins("svt", seed=5, img=64)
    model = anchored(base, "full", 5)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))  # image 0: a near-tie (5e-5)
    invariance_and_its_absence(base, model, x, shift_set(4, 64, 5), 4, "patch_embeds.0.anchor")


# --- partial modes are not enough ------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["vit-cls", "vit-avg", "svt", "pcpvt"])
@pytest.mark.parametrize("mode", ["pos-only", "patch-only"])
def test_partial_modes_are_not_invariant(make_vit, make_twins, anchored, arch, mode):
    base = make_vit(cls=arch == "vit-cls", seed=21) if arch.startswith("vit") else make_twins(arch, seed=21)
    model = anchored(base, mode, 21)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(21))
    report = check_shift_invariant(model, x, shift_set(4, 32, 21))
    assert report.max_error > PARTIAL, str(report)
    if mode == "patch-only":
        # Shifts by multiples of the patch size are token permutations: only the position code (ViT) or the
        # windows and sub-sampling grids (Twins) break them.
        coarse = check_shift_invariant(model, x, period_grid(4)[1:] * 4)
        assert coarse.max_error > PARTIAL, str(coarse)


# --- where the anchors go ------------------------------------------------------------------------------
EXPECTED_ANCHORS = {  # name -> stride, for the tiny configs in conftest
    # The paper's set: the first embedding and the LSA/GSA blocks; stage 0 ends on an anchor of period 2.
    ("svt", "full"): {"patch_embeds.0.anchor": 4, "blocks.0.0.anchor": 4, "blocks.0.1.anchor": 2,
                      "blocks.1.0.anchor": 2},
    ("pcpvt", "full"): {"patch_embeds.0.anchor": 4, "blocks.0.0.anchor": 2, "blocks.0.1.anchor": 2},
    # Stage 0 ends on a window of 3 (odd) or on no anchor (sr = 1): the stride-2 embedding is anchored.
    ("svt-odd", "full"): {"patch_embeds.0.anchor": 4, "patch_embeds.1.anchor": 2, "blocks.0.0.anchor": 3,
                          "blocks.0.1.anchor": 2, "blocks.0.2.anchor": 3, "blocks.1.0.anchor": 3},
    ("pcpvt-sr1", "full"): {"patch_embeds.0.anchor": 4, "patch_embeds.1.anchor": 2},
    ("svt", "patch-only"): {"patch_embeds.0.anchor": 4, "patch_embeds.1.anchor": 2},
    ("svt", "pos-only"): {},
}


@pytest.mark.parametrize("kind, mode", list(EXPECTED_ANCHORS))
def test_twins_anchor_placement_and_circular_pegs(make_twins, kind, mode):
    base = make_twins(kind)
    model = anchorize(base, mode).eval()
    strides = {n: m.stride for n, m in model.named_modules() if isinstance(m, PolyphaseAnchor)}
    assert strides == EXPECTED_ANCHORS[kind, mode]
    img = TWINS_IMG.get(kind, 32)
    x = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(0))
    with record_anchors(model) as rec:
        model(x)
    assert set(rec) == set(strides)
    for name, idx in rec.items():
        assert idx.shape == (3, 2) and idx.dtype == torch.long
        assert ((idx >= 0) & (idx < strides[name])).all()
    pads = {m.padding_mode for peg in model.pos_block for m in peg.modules() if isinstance(m, nn.Conv2d)}
    assert pads == ({"zeros"} if mode == "patch-only" else {"circular"})
    # The PEG weights keep their names: a plain Twins checkpoint's PEGs load into the anchored model.
    peg_keys = {k for k in base.state_dict() if k.startswith("pos_block")}
    assert peg_keys <= set(model.state_dict())
    assert anchoring_mode(model) == mode and anchoring_mode(base) == "none"


@pytest.mark.parametrize("mode", MODES)
def test_vit_structure_per_mode(make_vit, mode):
    base = make_vit(patch=8, img=32)
    model = anchorize(base, mode)
    assert type(model) is type(base)
    has_anchor = model.patch_embed.anchor is not None
    assert has_anchor == (mode != "pos-only")
    if has_anchor:
        assert model.patch_embed.anchor.stride == 8
    assert (model.pos_embed is None) == (mode != "patch-only")
    assert isinstance(model.patch_embed.pos_conv, ConvPosEmbed) == (mode != "patch-only")
    assert model.patch_embed.grid_size == base.patch_embed.grid_size  # timm attributes still resolve


def test_conv_pos_embed_is_the_identity_at_init_and_circular(make_vit):
    base = make_vit(seed=9)
    x = torch.randn(2, 3, 32, 32)
    # Starting from zero, pos-only differs from the original only by the absolute embedding it drops.
    no_pe = copy.deepcopy(base)
    with torch.no_grad():
        no_pe.pos_embed.zero_()
        torch.testing.assert_close(anchorize(base, "pos-only").eval()(x), no_pe(x), rtol=0, atol=1e-6)
        assert (base(x) - no_pe(x)).abs().max() > BROKEN  # the embedding it drops did matter
    conv = ConvPosEmbed(8, init="default")
    grid = torch.randn(2, 8, 6, 5)
    for dy, dx in [(1, 0), (0, 4), (-2, 3)]:
        torch.testing.assert_close(conv(torch.roll(grid, (dy, dx), (-2, -1))),
                                   torch.roll(conv(grid), (dy, dx), (-2, -1)), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="init"):
        ConvPosEmbed(8, init="ones")


@pytest.mark.parametrize("layout", ["contiguous", "token_view"])
@pytest.mark.parametrize("pad", [(1, 1, 1, 1), (0, 2, 1, 0), (3, 1, 2, 2)])
def test_circular_conv_equals_pytorch_circular_padding(layout, pad):
    """CircularConv2d keeps token grids channels-last but computes exactly PyTorch's circular conv."""
    g = torch.Generator().manual_seed(sum(pad))
    x = torch.randn(2, 6, 5, 7, generator=g)
    if layout == "token_view":
        x = torch.randn(2, 35, 6, generator=g).transpose(1, 2).reshape(2, 6, 5, 7)
    ref = nn.Conv2d(6, 6, 3, padding=(pad[2], pad[0]), groups=6, padding_mode="circular")
    fast = CircularConv2d.from_conv(ref)
    assert fast.padding_mode == "circular" and fast.state_dict().keys() == ref.state_dict().keys()
    if pad[0] == pad[1] and pad[2] == pad[3]:
        with torch.no_grad():
            torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=1e-6)
    from equishift.layers.circular import _circular_pad

    assert torch.equal(_circular_pad(x, pad), torch.nn.functional.pad(x.contiguous(), pad, mode="circular"))


# --- an ordinary nn.Module -----------------------------------------------------------------------------
def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, repr(model),
            [(n, type(m)) for n, m in model.named_modules()],
            sorted(m.padding_mode for m in model.modules() if isinstance(m, nn.Conv2d)))


@pytest.mark.parametrize("arch", ["vit", "svt", "pcpvt"])
@pytest.mark.parametrize("mode", MODES)
def test_input_model_is_not_mutated(make_vit, make_twins, arch, mode):
    base = make_vit() if arch == "vit" else make_twins(arch)
    x = torch.randn(2, 3, 32, 32)
    before, out_before = _snapshot(base), base(x)
    anchorize(base, mode)
    after = _snapshot(base)
    assert before[1:] == after[1:]
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert torch.equal(base(x), out_before)


def _fresh(arch: str, make_vit, make_twins, randomize, seed: int) -> nn.Module:
    if arch == "deit":
        import timm

        torch.manual_seed(seed)
        return randomize(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32,
                                           patch_size=4, depth=2, num_classes=10).eval(), seed)
    if arch.startswith("vit"):
        return make_vit(cls=arch == "vit-cls", seed=seed)
    return make_twins(arch, seed=seed)


@pytest.mark.parametrize("arch", ["vit-cls", "vit-avg", "deit", "svt", "pcpvt"])
@pytest.mark.parametrize("mode", MODES)
def test_state_dict_and_safetensors_round_trip(tmp_path, make_vit, make_twins, randomize, anchored, arch, mode):
    from safetensors.torch import load_file, save_file

    model = anchored(_fresh(arch, make_vit, make_twins, randomize, seed=1), mode, seed=1)
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    sd = model.state_dict()
    if arch.startswith("vit") and mode != "patch-only":
        assert "pos_embed" not in sd and "patch_embed.pos_conv.proj.weight" in sd
    path = tmp_path / "anchored.safetensors"
    save_file(sd, str(path))
    for loaded in (sd, load_file(str(path))):
        fresh = anchorize(_fresh(arch, make_vit, make_twins, randomize, seed=2), mode).eval()  # other random weights
        assert not torch.equal(fresh(x), want)
        fresh.load_state_dict(loaded)  # strict: same keys, same shapes
        assert torch.equal(fresh(x), want)
    other = next(m for m in MODES if m != mode)
    # A ViT's full and pos-only modes have the same weights (an anchor has none); all others differ.
    if not (arch in ("vit-cls", "vit-avg", "deit") and {mode, other} == {"full", "pos-only"}):
        with pytest.raises(RuntimeError):  # a checkpoint of another mode does not fit
            anchorize(_fresh(arch, make_vit, make_twins, randomize, seed=2), other).load_state_dict(sd)


def test_to_device_and_dtype(make_vit, anchored):
    from equishift.device import default_device

    model = anchored(make_vit(seed=4), "full", 4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ref = model(x)
    dev = default_device()
    moved = model.to(dev)
    assert all(p.device.type == dev.type for p in moved.parameters())
    torch.testing.assert_close(moved(x.to(dev)).cpu(), ref, rtol=1e-4, atol=1e-4)
    double = model.to("cpu", torch.float64)
    xd = x.double()
    torch.testing.assert_close(double(xd).float(), ref, rtol=1e-4, atol=1e-4)
    # In float64 invariance holds to float64 rounding, far below the float32 tolerance.
    assert assert_shift_invariant(double, xd, shift_set(4, 32, 4), atol=1e-10).max_error <= 1e-10


def test_gradients_reach_all_weights(make_twins, anchored):
    model = anchored(make_twins("svt", seed=6), "full", 6).train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.slow
def test_torch_compile_matches_eager(make_vit, anchored):
    """torch.compile (inductor, CPU) of a tiny anchored ViT: same logits, still invariant, no graph break."""
    import torch._dynamo

    model = anchored(make_vit(patch=4, img=32, seed=8), "full", 8)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    t0 = time.perf_counter()
    compiled = torch.compile(model)
    with torch.no_grad():
        got = compiled(x)
        shifted = compiled(torch.roll(x, (3, -5), (-2, -1)))
    seconds = time.perf_counter() - t0
    torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shifted, got, rtol=0, atol=ATOL)
    torch._dynamo.reset()
    assert seconds < 120, f"compiling took {seconds:.0f} s"


# --- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kw", [("efficientnet_b0", {}), ("swinv2_cr_tiny_ns_224", {})])
def test_other_architectures_raise_type_error_listing_supported(name, kw):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    with pytest.raises(TypeError) as err:
        anchorize(model)
    msg = str(err.value)
    for family in ("VisionTransformer", "Twins", "SwinTransformer", "ResNet", "ConvNeXt",
                   "PyramidVisionTransformerV2"):
        assert family in msg
    assert type(model).__name__ in msg


def test_bad_mode_and_double_anchorize_raise(make_vit):
    base = make_vit()
    with pytest.raises(ValueError, match="full, pos-only, patch-only"):
        anchorize(base, "everything")
    with pytest.raises(ValueError, match="already anchorized"):
        anchorize(anchorize(base, "full"), "full")


def test_image_size_not_divisible_by_patch_raises(make_vit, anchored):
    model = anchored(make_vit(patch=4, img=32, dynamic_img_size=True), "full")
    with pytest.raises(ValueError, match="H=30, W=32, stride=4"):
        model(torch.randn(1, 3, 30, 32))


# --- record_anchors across threads ---------------------------------------------------------------------
def test_record_anchors_is_per_thread(make_twins, anchored):
    """Two threads run one model at the same time (a barrier inside the forward pass holds both mid-way):
    each records exactly its own anchors, equal to a sequential run."""
    model = anchored(make_twins("svt", seed=12), "full", 12)
    xs = [torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)) for b in (2, 3)]
    sequential = []
    for x in xs:
        with record_anchors(model) as rec:
            model(x)
        sequential.append(dict(rec))

    barrier = threading.Barrier(2, timeout=60)
    # After the first two anchors have fired, both threads wait for each other, so the remaining anchors of
    # the two passes are recorded while both passes are in flight.
    def wait(module, args):
        barrier.wait()  # returns None: the block's inputs are left as they are

    hook = model.blocks[0][1].register_forward_pre_hook(wait)
    results, errors = [None, None], []

    def run(i):
        try:
            with record_anchors(model) as rec:
                model(xs[i])
            results[i] = dict(rec)
        except BaseException as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        hook.remove()
    assert not errors, errors
    for got, want in zip(results, sequential):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert sequential[0]["patch_embeds.0.anchor"].shape == (2, 2)
    assert sequential[1]["patch_embeds.0.anchor"].shape == (3, 2)


# --- families refused up front, with the reason ----------------------------------------------------------
@pytest.mark.parametrize("name, module", [
    ("vit_tiny_r_s16_p8_224", "patch_embed"),            # hybrid with a ResNetV2 backbone (ResNet-D ones work)
    ("vit_small_r26_s32_224", "patch_embed"),
    ("vit_relpos_small_patch16_224", "blocks.0.attn.rel_pos"),
    ("vit_srelpos_small_patch16_224", "shared_rel_pos"),
    ("vit_small_patch16_rope_224", "rope"),               # Eva-based: RoPE
    ("vit_small_patch16_dinov3", "rope"),
])
def test_families_that_cannot_be_made_invariant_are_refused_before_any_forward(name, module):
    """Hybrid ViTs with a ResNetV2 backbone were accepted and then crashed in their first forward;
    relative-position and RoPE ViTs were refused without a reason. Each is a TypeError naming the class and the module that prevents it."""
    import timm

    kw = dict(depth=1) if "dinov3" in name or "rope" in name or "relpos" in name else {}
    model = timm.create_model(name, pretrained=False, num_classes=3, **kw)
    with pytest.raises(TypeError) as err:
        anchorize(model)
    msg = str(err.value)
    assert type(model).__name__ in msg and f"'{module}'" in msg, msg
