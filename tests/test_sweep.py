"""equishift.sweep: records (shapes and values against independent computations), the anchored-model
property (re-aligned maps and anchors follow the shift exactly), concurrency, chunking/OOM, persistence."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import equishift
from equishift.errors import EquishiftError, LimitError
from equishift.shifts import grid, orbit, period_grid, shift
from equishift.sweep import SweepResult, sweep

from engine_helpers import anchored, image, twins, vit

ATOL_LOGITS = 1e-4   # float32 logits of tiny models, batched vs unbatched


def close16(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Attention maps are stored in fp16: equal up to one fp16 step (2^-10 relative) plus 1e-6."""
    a, b = a.float(), b.float()
    return bool(((a - b).abs() <= 2 ** -10 * torch.maximum(a.abs(), b.abs()) + 1e-6).all())


@pytest.fixture(scope="module")
def models():
    v, t = vit(), twins()
    return {"vit": v, "vit-a": anchored(v), "twins": t, "twins-a": anchored(t)}


# --- independent references --------------------------------------------------------------------
def _vit_manual(model, x):
    """Block outputs and per-layer softmax attention of a timm ViT, computed step by step here."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    feats, attns = [], []
    for blk in model.blocks:
        a = blk.attn
        y = blk.norm1(h)
        b, n, c = y.shape
        qkv = a.qkv(y).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
        attns.append(((q * a.scale) @ k.transpose(-2, -1)).softmax(-1))
        h = blk(h)
        feats.append(h)
    return feats, attns


# --- shapes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit", "vit-a", "twins", "twins-a"])
def test_every_record_has_the_documented_shape(models, name):
    model = models[name]
    s = grid(range(0, 8, 3), range(0, 8, 3))
    res = sweep(model, image(), s)
    k = len(s)
    assert res.logits.shape == (k, 10) and res.logits.dtype == torch.float32
    assert res.probs.sum(-1).sub(1).abs().max() < 1e-5
    assert res.layers == list(res.layer_error)
    for layer in res.layers:
        h, w = res.meta["grid"][layer]
        assert res.layer_error[layer].shape == (k,)
        assert res.offset[layer].shape == (k, 2)
        a = res.attention[layer]
        assert a.dtype == torch.float16 and a.shape[0] == k
        stride = res.meta["attention_stride"][layer]
        assert a.shape[-2:] == (int(32 // stride), int(32 // stride))
        assert res.ref_attention[layer].shape == a.shape[1:]
    if name.startswith("vit"):
        assert res.attention["rollout"].shape == (k, 1, 8, 8)
        assert set(res.meta["attention_kind"].values()) == {"cls"}
    else:
        assert set(res.meta["attention_kind"].values()) == {"window", "query"}
    if name.endswith("-a"):
        assert res.anchors and all(v.shape == (k, 2) and v.dtype == torch.long for v in res.anchors.values())
        assert set(res.anchors) == set(res.meta["anchor_names"])
    else:
        assert res.anchors == {}


def test_record_subset_only_records_what_was_asked(models):
    res = sweep(models["vit-a"], image(), grid(range(2), range(2)), record=("logits",))
    assert res.logits.shape == (4, 10)
    assert res.attention == {} and res.layer_error == {} and res.anchors == {}


# --- values against independent computations --------------------------------------------------
@pytest.mark.parametrize("mode", ["circular", "zero", "reflect", "bilinear"])
@pytest.mark.parametrize("name", ["vit-a", "twins", "twins-a"])
def test_logits_equal_one_forward_per_shift(models, name, mode):
    model, x = models[name], image(3)
    s = torch.tensor([[0, 0], [1, 2], [-3, 5], [4, 4], [7, -1]], dtype=torch.float64 if mode == "bilinear" else torch.long)
    if mode == "bilinear":
        s = s + 0.25
    res = sweep(model, x, s, mode)
    with torch.no_grad():
        want = torch.cat([model(shift(x, float(dy), float(dx), mode)[None]) for dy, dx in s.tolist()])
        ref = model(shift(x, 0.0, 0.0, mode)[None])[0]
    assert (res.logits - want).abs().max() < ATOL_LOGITS
    assert (res.ref_logits - ref).abs().max() < ATOL_LOGITS


def test_crop_mode_cuts_windows_from_a_larger_canvas(models):
    canvas = image(4, size=40)
    s = torch.tensor([[0, 0], [2, -3], [-4, 4]])
    res = sweep(models["vit"], canvas, s, "crop", size=(32, 32))
    with torch.no_grad():
        want = models["vit"](orbit(canvas, s, "crop", size=(32, 32)))
    assert (res.logits - want).abs().max() < ATOL_LOGITS
    assert res.meta["image_size"] == [32, 32] and res.meta["input_size"] == [40, 40]


@pytest.mark.parametrize("name", ["vit", "vit-a", "vit-1-head", "vit-a-4-heads"])
def test_vit_attention_and_rollout_match_a_manual_computation(models, name):
    # 1 and 4 heads: the rollout sums head slices (one slice; more than two) and divides by the count.
    extra = {"vit-1-head": lambda: vit(num_heads=1), "vit-a-4-heads": lambda: anchored(vit(num_heads=4))}
    model, x = (models[name] if name in models else extra[name]()), image(5)
    s = torch.tensor([[0, 0], [3, 1], [4, 8], [13, 6]])
    res = sweep(model, x, s)
    with torch.no_grad():
        _, attns = _vit_manual(model, orbit(x, s))
    for i, a in enumerate(attns):
        want = a[:, :, 0, 1:].reshape(len(s), -1, 8, 8)
        assert close16(res.attention[f"blocks.{i}"], want)
    # Rollout: the full matrix product, then the CLS row over patch tokens.
    roll = torch.eye(attns[0].shape[-1]).expand(len(s), -1, -1)
    for a in attns:
        hat = 0.5 * a.mean(1) + 0.5 * torch.eye(a.shape[-1])
        roll = (hat / hat.sum(-1, keepdim=True)) @ roll
    want = roll[:, 0, 1:].reshape(len(s), 1, 8, 8)
    assert close16(res.attention["rollout"], want)


def test_vit_without_cls_records_mean_attention_received(models):
    model = vit(2, class_token=False, global_pool="avg")
    x, s = image(6), torch.tensor([[0, 0], [2, 3]])
    res = sweep(model, x, s)
    assert set(res.meta["attention_kind"].values()) == {"received"}
    with torch.no_grad():
        _, attns = _vit_manual(model, orbit(x, s))
    want = attns[-1].mean(2).reshape(2, -1, 8, 8)
    assert close16(res.attention[f"blocks.{len(attns) - 1}"], want)


def test_twins_maps_are_distributions_over_their_grids(models):
    res = sweep(models["twins"], image(7), grid(range(3), range(3)))
    for layer, kind in res.meta["attention_kind"].items():
        a = res.attention[layer].float()
        if kind == "query":  # one query row: sums to 1 over the key grid
            assert (a.sum((-2, -1)) - 1).abs().max() < 5e-3
        else:  # LSA: the mean received attention sums to 1 inside each ws×ws window
            ws = models["twins"].blocks[int(layer.split(".")[1])][int(layer.split(".")[2])].attn.ws
            k, heads, h, w = a.shape
            win = a.reshape(k, heads, h // ws, ws, w // ws, ws).sum((3, 5))
            assert (win - 1).abs().max() < 5e-3


def test_layer_error_matches_its_definition(models):
    """||F(R_δ x) − roll(F(x), δ/p)|| / ||F(x)|| at shifts that are multiples of the patch (baseline)."""
    model, x = models["vit"], image(8)
    s = torch.tensor([[0, 4], [8, 12], [4, 4], [0, 0]])
    res = sweep(model, x, s)
    with torch.no_grad():
        f0, _ = _vit_manual(model, x[None])
        fs, _ = _vit_manual(model, orbit(x, s))
    for i in range(len(f0)):
        ref = f0[i][0, 1:].T.reshape(-1, 8, 8)
        for k, (dy, dx) in enumerate(s.tolist()):
            got = fs[i][k, 1:].T.reshape(-1, 8, 8)
            want = (got - torch.roll(ref, (dy // 4, dx // 4), (-2, -1))).norm() / ref.norm()
            assert abs(float(res.layer_error[f"blocks.{i}"][k]) - float(want)) < 1e-4
    assert float(res.layer_error["blocks.0"][3]) < 1e-6  # (0, 0)


def test_without_position_embedding_whole_patch_shifts_are_equivariant():
    model = vit(3, pos_embed="none", class_token=False, global_pool="avg")
    res = sweep(model, image(9), grid(range(0, 8), range(0, 8)))
    on = ((res.shifts % 4) == 0).all(1)
    for layer, err in res.layer_error.items():
        assert err[on].max() < 1e-4, layer
        assert err[~on].min() > 1e-2, layer


# --- the anchored property ---------------------------------------------------------------------
def _check_anchored(res: SweepResult, period: int):
    image_anchor = [n for n in res.meta["anchor_names"] if n.startswith("patch_embed")][0]
    a0 = res.ref_anchors[image_anchor]
    want = (a0 + res.shifts) % period
    assert torch.equal(res.anchors[image_anchor], want)
    assert (res.logits - res.ref_logits).abs().max() < ATOL_LOGITS
    for layer in res.layers:
        assert res.layer_error[layer].max() < 1e-4, layer
        t = res.token_shift(layer)
        assert torch.equal(t.double(), res.offset[layer].double() / res.meta["layer_stride"][layer])
    for layer in res.attention:
        back = res.aligned_attention(layer).float()
        assert close16(back, res.ref_attention[layer].expand_as(back)), layer


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), far=st.lists(st.tuples(st.integers(-40, 40), st.integers(-40, 40)),
                                                 min_size=1, max_size=4))
def test_anchored_vit_maps_and_anchors_follow_the_shift_exactly(models, seed, far):
    s = torch.cat((period_grid(4), torch.tensor(far)))
    _check_anchored(sweep(models["vit-a"], image(seed), s), 4)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000), far=st.lists(st.tuples(st.integers(-40, 40), st.integers(-40, 40)),
                                                 min_size=1, max_size=3))
def test_anchored_twins_maps_and_anchors_follow_the_shift_exactly(models, seed, far):
    # The whole period of the deepest grid (total stride 8 here) plus random far shifts.
    s = torch.cat((period_grid(8), torch.tensor(far)))
    res = sweep(models["twins-a"], image(seed), s)
    _check_anchored(res, 4)
    assert res.meta["query"] == [16, 16]


def test_baseline_maps_do_not_follow_the_shift(models):
    res = sweep(models["vit"], image(10), period_grid(4))
    back = res.aligned_attention("blocks.2").float()
    ref = res.ref_attention["blocks.2"].float()
    rel = ((back - ref).abs() / ref.abs()).amax((1, 2, 3))
    assert rel[1:].min() > 2e-2  # every non-zero shift changes some map cell by > 2% (fp16 noise: 0.1%)


# --- concurrency -------------------------------------------------------------------------------
def test_two_concurrent_sweeps_equal_sequential_runs_and_leave_the_model_untouched(models):
    model = models["twins-a"]
    fused = {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")}
    x1, x2 = image(11), image(12)
    s = grid(range(6), range(6))
    seq = [sweep(model, x1, s), sweep(model, x2, s)]
    out = [None, None]
    errors = []
    plain = []

    def run(i, x):
        try:
            out[i] = sweep(model, x, s, batch_size=5)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def forward_meanwhile():
        with torch.no_grad():
            for _ in range(20):
                plain.append(model(x1[None]))

    threads = [threading.Thread(target=run, args=(0, x1)), threading.Thread(target=run, args=(1, x2)),
               threading.Thread(target=forward_meanwhile)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for a, b in zip(seq, out):
        assert torch.equal(a.pred, b.pred)
        assert (a.logits - b.logits).abs().max() < ATOL_LOGITS
        for n in a.anchors:
            assert torch.equal(a.anchors[n], b.anchors[n])
        for n in a.attention:
            assert close16(a.attention[n], b.attention[n])
        for n in a.layer_error:
            assert (a.layer_error[n] - b.layer_error[n]).abs().max() < 1e-4
    # The shared model: no hooks left, fused-attention flags as before, plain forwards unaffected.
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")} == fused
    assert all((p - plain[0]).abs().max() < ATOL_LOGITS for p in plain)


# --- chunking, memory, OOM, progress ------------------------------------------------------------
class _FakeOOM(torch.nn.Module):
    """Wraps a model; raises a CUDA-style out-of-memory error for batches above ``limit``."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.calls = inner, limit, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return self.inner(x)


def test_out_of_memory_halves_the_chunk_and_retries(models):
    wrapped = _FakeOOM(models["vit-a"], limit=5)
    s = grid(range(5), range(5))
    seen = []
    res = sweep(wrapped, image(13), s, batch_size=20, progress=lambda d, t: seen.append(d))
    assert seen == [0, 5, 10, 15, 20, 25]  # 20 and 10 ran out of memory; 5 fits
    direct = sweep(models["vit-a"], image(13), s, batch_size=25)
    assert (res.logits - direct.logits).abs().max() < ATOL_LOGITS
    assert list(res.anchors) == ["inner.patch_embed.anchor"]  # named inside the wrapper
    assert torch.equal(res.anchors["inner.patch_embed.anchor"], direct.anchors["patch_embed.anchor"])
    with pytest.raises(LimitError, match="out of memory"):
        sweep(_FakeOOM(models["vit"], limit=0), image(13), s, batch_size=4)


def test_memory_budget_bounds_the_chunk_and_progress_reports_every_chunk(models):
    seen = []
    s = grid(range(4), range(4))
    small = sweep(models["vit"], image(14), s, memory_budget_mb=0.5, progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 16) and seen[-1] == (16, 16)
    assert len(seen) > 3  # several chunks under a 0.5 MB budget
    assert all(b[0] > a[0] for a, b in zip(seen, seen[1:]))
    big = sweep(models["vit"], image(14), s)
    assert (small.logits - big.logits).abs().max() < ATOL_LOGITS
    assert close16(small.attention["rollout"], big.attention["rollout"])


def _stored_bytes(res) -> int:
    total = res.logits.numel() * res.logits.element_size()
    for d in (res.attention, res.layer_error, res.offset, res.anchors):
        total += sum(v.numel() * v.element_size() for v in d.values())
    return total


def test_full_orbit_of_the_default_pair_is_stored_compactly():
    """Everything stored is per shift, so 64 shifts measure the 1024-shift (32×32) orbit exactly."""
    from equishift.training import ARCHS

    v = vit(0, **{k: w for k, w in ARCHS["vit"][1].items() if k != "in_chans"})
    pair = (v, anchored(v))
    s16, s64 = grid(range(4), range(4)), grid(range(8), range(8))
    per_shift = []
    for m in pair:
        b16, b64 = _stored_bytes(sweep(m, image(15), s16)), _stored_bytes(sweep(m, image(15), s64))
        assert (b64 - b16) % 48 == 0  # linear in the number of shifts
        per_shift.append((b64 - b16) // 48)
    total = 1024 * sum(per_shift)
    assert total < 10 * 2 ** 20, total  # well under 100 MB: under 10 MB for the pair


# --- persistence and helpers -------------------------------------------------------------------
def test_save_load_roundtrip_without_pickle(models, tmp_path):
    res = sweep(models["twins-a"], image(16), grid(range(3), range(-1, 2)), classes=[f"c{i}" for i in range(10)])
    path = tmp_path / "r.npz"
    res.save(path)
    with np.load(path, allow_pickle=False) as z:
        assert "logits" in z.files and all(z[k].dtype != object for k in z.files)
    back = SweepResult.load(path)
    assert torch.equal(back.shifts, res.shifts) and torch.equal(back.logits, res.logits)
    assert torch.equal(back.ref_logits, res.ref_logits)
    for field in ("anchors", "attention", "layer_error", "offset", "ref_anchors", "ref_attention"):
        a, b = getattr(res, field), getattr(back, field)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert back.meta == res.meta and back.classes[3] == "c3"
    assert torch.equal(back.aligned_attention("blocks.0.1"), res.aligned_attention("blocks.0.1"))


def test_index_of_and_to_grid(models):
    s = grid(range(-1, 2), range(0, 4))
    res = sweep(models["vit"], image(17), s, record=("logits",))
    k = res.index_of(1, 2)
    assert s[k].tolist() == [1, 2]
    with pytest.raises(EquishiftError, match="not part of this sweep"):
        res.index_of(5, 5)
    ys, xs, z = res.to_grid(res.probs[:, 0])
    assert ys == [-1, 0, 1] and xs == [0, 1, 2, 3]
    assert z[2, 2] == pytest.approx(float(res.probs[k, 0]))
    part = sweep(models["vit"], image(17), s[:5], record=("logits",))
    pys, pxs, pz = part.to_grid(part.pred.float())
    assert torch.isnan(pz).sum() == len(pys) * len(pxs) - 5


def test_accepts_a_loaded_model_and_the_package_level_name(models):
    class Loaded:  # duck type of equishift.zoo.LoadedModel
        model = models["vit"]
        classes = [f"k{i}" for i in range(10)]

    res = equishift.sweep(Loaded(), image(18)[None], [(0, 1), (2, 3)], record=("logits",))
    assert res.classes[9] == "k9" and res.logits.shape == (2, 10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="diagonal"), "unknown shift mode"),
    (dict(record=("logits", "gradients")), "unknown record"),
    (dict(mode="crop"), "needs size"),
    (dict(shifts=[]), "shifts"),
    (dict(shifts=[(0.5, 1.0)]), "integer"),
    (dict(image=torch.zeros(2, 3, 32, 32)), "image must be"),
    (dict(memory_budget_mb=0), "memory_budget_mb"),
])
def test_bad_input_raises_a_clear_equishift_error(models, kwargs, match):
    args = dict(model=models["vit"], image=image(), shifts=[(0, 1)])
    args.update(kwargs)
    with pytest.raises(EquishiftError, match=match):
        sweep(**args)


@pytest.mark.parametrize("spec, period", [("zoo:fmnist-vit-anchored", 4), ("zoo:fmnist-twins-svt-anchored", 8)])
def test_shipped_anchored_models_follow_the_shift_exactly(spec, period):
    """The trained zoo models (once shipped in assets/models): same property as for random weights."""
    from PIL import Image

    from equishift.zoo import list_models, load_model

    if spec not in list_models():
        pytest.skip(f"{spec} is not shipped in this checkout")
    lm = load_model(spec, "cpu")
    x = lm.preprocess(Image.open(Path(__file__).resolve().parents[1] / "assets" / "images" / "fmnist-4-coat.png")
                      .convert("RGB"))
    res = sweep(lm, x, torch.cat((period_grid(period), torch.tensor([[13, -21], [-30, 7]]))))
    _check_anchored(res, 4)
    assert res.classes == lm.classes


def test_margins_are_recorded_per_anchor_and_shift_and_survive_save(models, tmp_path):
    """Each anchor's top-2 margin is recorded at every shift; the image-level one is exactly the margin
    of the shifted image's polyphase norms (a shift permutes the phases, so it does not change), and the
    tolerance each anchor used is in the metadata."""
    from equishift.polyphase import TIE_TOL, polyphase_margin

    x = image(3)
    s = torch.cat((period_grid(4), torch.tensor([[9, -13]])))
    res = sweep(models["twins-a"], x, s)
    assert set(res.margins) == set(res.anchors) and set(res.ref_margins) == set(res.anchors)
    for n, m in res.margins.items():
        assert m.shape == (len(s),) and m.dtype == torch.float32 and ((m >= 0) & (m <= 1)).all()
    first = "patch_embeds.0.anchor"
    want = polyphase_margin(x[None], 4)[0]
    torch.testing.assert_close(res.ref_margins[first], want)
    # The shifted images are exact permutations and their per-pixel energies are bit-identical, but the
    # sweep scores them in batches of another size, so the float64 phase sums may be added in another
    # order: ~1e-16 relative, far inside these bounds (a float32 margin has ~1e-7 resolution).
    torch.testing.assert_close(res.margins[first], want.expand(len(s)), rtol=1e-5, atol=1e-7)
    assert res.meta["anchor_tie_tol"] == {n: TIE_TOL[torch.float32] for n in res.anchors}
    res.save(tmp_path / "r.npz")
    back = SweepResult.load(tmp_path / "r.npz")
    assert set(back.margins) == set(res.margins)
    for n in res.margins:
        assert torch.equal(back.margins[n], res.margins[n]) and torch.equal(back.ref_margins[n], res.ref_margins[n])


def test_shift_range_text_never_shows_a_signed_zero():
    from equishift.sweep import describe_shifts

    text = describe_shifts(torch.tensor([[-0.0, -1e-20], [0.5, 1.0]], dtype=torch.float64))
    assert "-0" not in text and "dy∈[0, 0.5]" in text
