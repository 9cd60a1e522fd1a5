"""Polyphase anchoring primitives: select_anchor, anchor, roll_batch, PolyphaseAnchor, record_anchors.

References are computed here by brute force (a Python loop over phases and images, in float64)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from equishift.polyphase import (TIE_TOL, PolyphaseAnchor, anchor, polyphase_margin, polyphase_norms,
                                 record_anchors, roll_batch, select_anchor)

BOUNDED = settings(max_examples=40, deadline=None, derandomize=True, database=None)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_norms(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B, s, s) squared norms, one phase at a time, in float64."""
    x = x.double()
    return torch.stack([torch.stack([x[:, :, a::s, b::s].square().sum(dim=(1, 2, 3)) for b in range(s)], 1)
                        for a in range(s)], 1)


def brute_quartics(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B, s, s) sums of x⁴ per phase, in float64."""
    x = x.double()
    return torch.stack([torch.stack([x[:, :, a::s, b::s].pow(4).sum(dim=(1, 2, 3)) for b in range(s)], 1)
                        for a in range(s)], 1)


def brute_anchor_index(x: torch.Tensor, s: int, tie_tol=None) -> torch.Tensor:
    """The documented rule, per image, by a Python loop: phases within ``tie_tol`` (relative; default
    the dtype's) of the largest squared norm are candidates; the first candidate in row-major order with
    the largest sum of x⁴ wins. ``tie_tol=0``: the first maximal norm."""
    tol = TIE_TOL[x.dtype] if tie_tol is None else tie_tol
    out = []
    for n, q in zip(brute_norms(x, s), brute_quartics(x, s)):
        best = n.max()
        key, arg = None, None
        for a in range(s):
            for b in range(s):
                if n[a, b] < best * (1 - tol) or (tol == 0 and n[a, b] < best):
                    continue
                k = q[a, b] if tol > 0 else 0.0
                if key is None or k > key:  # strict: keeps the first of equal keys
                    key, arg = k, (a, b)
        out.append(arg)
    return torch.tensor(out, dtype=torch.long)


def unique_gap(x: torch.Tensor, s: int) -> torch.Tensor:
    """Relative gap between the best and second-best phase per image (0 for a tie; 1 for s = 1)."""
    if s == 1:
        return torch.ones(x.shape[0], dtype=torch.float64)
    top = brute_norms(x, s).flatten(1).topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]) / top[:, 0]


shapes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4),
                   st.integers(1, 4))  # B, C, H/s, W/s, s


@BOUNDED
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_norms_and_index_match_brute_force(shape, seed):
    b, c, hb, wb, s = shape
    x = torch.randn(b, c, hb * s, wb * s, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(polyphase_norms(x, s).double(), brute_norms(x, s), rtol=1e-5, atol=1e-6)
    idx = select_anchor(x, s)
    assert idx.dtype == torch.long and idx.shape == (b, 2)
    assert torch.equal(idx, brute_anchor_index(x, s))
    assert torch.equal(select_anchor(x, s, tie_tol=0), brute_anchor_index(x, s, tie_tol=0))
    torch.testing.assert_close(polyphase_margin(x, s).double(), unique_gap(x, s), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("s", [1, 2, 3, 4, 16])
def test_constant_image_anchors_at_origin(s):
    x = torch.full((3, 2, 2 * s, 3 * s), 0.7)
    assert torch.equal(select_anchor(x, s), torch.zeros(3, 2, dtype=torch.long))
    assert torch.equal(select_anchor(torch.zeros_like(x), s), torch.zeros(3, 2, dtype=torch.long))


def test_exact_tie_goes_to_first_in_row_major_order():
    s = 3
    x = torch.zeros(2, 1, 6, 6)
    # Image 0: equal energy at phases (2, 1) and (1, 2), opposite signs; row-major 1*3+2 = 5 < 2*3+1 = 7.
    x[0, 0, 2, 4] = 2.0  # row 2, col 4 -> phase (2, 1)
    x[0, 0, 4, 2] = -2.0  # row 4, col 2 -> phase (1, 2)
    # Image 1: the same tie, but the later phase (2, 1) is a hair stronger and must win.
    x[1, 0, 2, 4] = 2.0 + 1e-3
    x[1, 0, 4, 2] = -2.0
    assert brute_anchor_index(x, s).tolist() == [[1, 2], [2, 1]]
    assert select_anchor(x, s).tolist() == [[1, 2], [2, 1]]


def test_anchor_rolls_by_minus_index():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, 12)
    rolled, idx = anchor(x, 4)
    assert torch.equal(idx, brute_anchor_index(x, 4))
    for i in range(5):
        a, b = idx[i].tolist()
        assert torch.equal(rolled[i], torch.roll(x[i], (-a, -b), dims=(-2, -1)))
    # The chosen component now sits at phase (0, 0).
    assert (select_anchor(rolled, 4) == 0).all()


@BOUNDED
@given(shape=shapes, seed=st.integers(0, 2**16), shift=st.tuples(st.integers(-50, 50), st.integers(-50, 50)))
def test_anchor_is_equivariant_to_every_circular_shift(shape, seed, shift):
    """A(R_δ x) = R_{δ + a - a'} A(x) with δ + a - a' ≡ 0 (mod s), and a' = (a + δ) mod s (unique max)."""
    b, c, hb, wb, s = shape
    x = torch.randn(b, c, hb * s, wb * s, generator=torch.Generator().manual_seed(seed))
    dy, dx = shift
    xs = torch.roll(x, (dy, dx), dims=(-2, -1))
    ax, ia = anchor(x, s)
    axs, ib = anchor(xs, s)
    unique = unique_gap(x, s) > 1e-4  # float32 sums of the same numbers in another order agree to ~1e-7
    want = torch.stack(((ia[:, 0] + dy) % s, (ia[:, 1] + dx) % s), 1)
    assert torch.equal(ib[unique], want[unique])
    for i in torch.nonzero(unique).flatten().tolist():
        ry, rx = dy + ia[i, 0].item() - ib[i, 0].item(), dx + ia[i, 1].item() - ib[i, 1].item()
        assert ry % s == 0 and rx % s == 0
        assert torch.equal(axs[i], torch.roll(ax[i], (ry, rx), dims=(-2, -1)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores_in_float32_without_overflow(dtype):
    # Squares of 300 (9e4) overflow float16 (max 65504): scored in float16 every phase would be inf and
    # tie at (0, 0). The strongest phase here is (2, 3).
    x = torch.full((1, 3, 8, 8), 100.0)
    x[:, :, 2::4, 3::4] = 300.0
    x = x.to(dtype)
    assert polyphase_norms(x, 4).dtype == torch.float32
    assert torch.isfinite(polyphase_norms(x, 4)).all()
    assert select_anchor(x, 4).tolist() == [[2, 3]]
    rolled, _ = anchor(x, 4)
    assert rolled.dtype == dtype and torch.equal(rolled, torch.roll(x, (-2, -3), (-2, -1)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_does_not_tie_spuriously(dtype):
    # 16 x 16 ones per phase: score 256 + tiny. Phase (1, 1) has one entry 1 + eps (the next representable
    # number above 1). Its score differs by ~2 eps, far below the float16/bfloat16 spacing at 256 (0.25 / 2),
    # so a half-precision accumulator would tie all phases and return (0, 0).
    eps = torch.finfo(dtype).eps
    x = torch.ones(1, 1, 32, 32, dtype=dtype)
    x[0, 0, 5, 7] = 1 + eps  # phase (1, 1)
    assert (x[0, 0, 5, 7].float() > 1).item()
    n = polyphase_norms(x, 2)
    assert n.dtype == torch.float32 and torch.equal(n, brute_norms(x, 2).float())
    assert select_anchor(x, 2).tolist() == [[1, 1]]
    # The same sums rounded to the input dtype do tie: this is what scoring in float32 avoids.
    assert torch.unique(n.to(dtype)).numel() == 1


def test_float64_scores_in_float64():
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 1, 1] += 1e-12  # invisible in float32
    assert polyphase_norms(x, 2).dtype == torch.float64
    assert select_anchor(x, 2).tolist() == [[1, 1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_any_device_and_dtype(device, dtype):
    torch.manual_seed(1)
    x = torch.randn(3, 2, 6, 9).to(device=device, dtype=dtype)
    rolled, idx = anchor(x, 3)
    assert rolled.device == x.device and rolled.dtype == dtype and idx.device == x.device
    assert torch.equal(idx.cpu(), brute_anchor_index(x.cpu(), 3))  # the rule at the dtype's tolerance
    for i in range(3):
        assert torch.equal(rolled[i], torch.roll(x[i], tuple((-idx[i]).tolist()), dims=(-2, -1)))


def test_gradients_flow_through_the_roll():
    torch.manual_seed(2)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    rolled, idx = anchor(x, 4)
    assert rolled.requires_grad and not idx.requires_grad
    g = torch.randn_like(rolled)
    (grad,) = torch.autograd.grad((rolled * g).sum(), x)
    # d/dx <roll(x, -a), g> = roll(g, +a)
    want = torch.stack([torch.roll(g[i], tuple(idx[i].tolist()), dims=(-2, -1)) for i in range(3)])
    assert torch.equal(grad, want)
    # Finite differences agree (the index is locally constant away from ties).
    assert torch.autograd.gradcheck(lambda t: anchor(t, 4)[0], (x,))


@pytest.mark.parametrize("h, w, s", [(10, 12, 4), (12, 10, 4), (7, 7, 2), (16, 15, 16)])
def test_non_divisible_size_raises_value_error_naming_the_sizes(h, w, s):
    x = torch.randn(1, 3, h, w)
    for fn in (select_anchor, anchor, polyphase_norms, lambda t, k: PolyphaseAnchor(k)(t)):
        with pytest.raises(ValueError) as err:
            fn(x, s)
        msg = str(err.value)
        assert f"H={h}" in msg and f"W={w}" in msg and f"stride={s}" in msg


@pytest.mark.parametrize("bad", [torch.randn(3, 8, 8), torch.randn(1, 1, 3, 8, 8)])
def test_wrong_rank_raises(bad):
    with pytest.raises(ValueError, match="B, C, H, W"):
        select_anchor(bad, 2)


@pytest.mark.parametrize("stride", [0, -2, 2.0])
def test_bad_stride_raises(stride):
    with pytest.raises(ValueError, match="stride"):
        select_anchor(torch.randn(1, 1, 4, 4), stride)


def test_no_python_loop_over_images():
    """The traced graph of ``anchor`` has the same number of operations for 2 and for 9 images."""
    sizes = []
    for b in (2, 9):
        gm = make_fx(lambda t: anchor(t, 4))(torch.randn(b, 3, 8, 8))
        sizes.append(len(gm.graph.nodes))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "token_view"])
def test_roll_batch_matches_per_image_roll_and_keeps_layout(layout):
    torch.manual_seed(3)
    x = torch.randn(4, 6, 5, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = torch.randn(4, 6, 7, 5).transpose(-1, -2)
    elif layout == "token_view":  # (B, N, C) tokens viewed as a grid, as anchorize does for Twins
        x = torch.randn(4, 35, 6).transpose(1, 2).reshape(4, 6, 5, 7)
    shifts = torch.tensor([[0, 0], [1, -3], [-7, 12], [5, 7]])
    out = roll_batch(x, shifts)
    for i in range(4):
        assert torch.equal(out[i], torch.roll(x[i], tuple(shifts[i].tolist()), dims=(-2, -1)))
    if x.is_contiguous(memory_format=torch.channels_last):
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_stride_one_is_identity():
    x = torch.randn(2, 3, 5, 7)
    rolled, idx = anchor(x, 1)
    assert torch.equal(rolled, x) and torch.equal(idx, torch.zeros(2, 2, dtype=torch.long))


def test_record_anchors_names_batches_and_scope():
    torch.manual_seed(4)
    model = torch.nn.Sequential(PolyphaseAnchor(2), torch.nn.Conv2d(3, 3, 1), PolyphaseAnchor(4))
    x1, x2 = torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)
    model(x1)  # outside a recorder: nothing to record, nothing breaks
    with record_anchors(model) as rec:
        model(x1)
        model(x2)  # a second pass inside one context appends along the batch
    assert set(rec) == {"0", "2"}
    assert torch.equal(rec["0"], torch.cat((select_anchor(x1, 2), select_anchor(x2, 2))))
    mid = model[1](torch.cat((anchor(x1, 2)[0], anchor(x2, 2)[0])))
    assert torch.equal(rec["2"], select_anchor(mid, 4))
    model(x1)
    assert rec["0"].shape == (5, 2)  # closed: later passes are not recorded

    other = torch.nn.Sequential(PolyphaseAnchor(2))
    with record_anchors(model) as rec:
        other(x1)  # another model's anchors inside the same context are ignored
    assert rec == {}


# --- the fast paths of the roll ------------------------------------------------------------------------
# anchor() picks one of several copies by layout and size: whole-row windows (contiguous NCHW, rows of >= 16
# values, no autograd), whole-pixel index_select (channels-last token grids, and contiguous NCHW maps of
# more than 4 channels after a channels-last copy), and a gather with a full (s², H*W) index table or with
# separable row/column tables (big maps). Each must be the plain per-image torch.roll by minus the
# selected index, exactly.
def _layouts(b, c, h, w, g):
    x = torch.randn(b, c, h, w, generator=g)
    tokens = torch.randn(b, h * w, c, generator=g).transpose(1, 2).reshape(b, c, h, w)  # channels-last view
    strided = torch.randn(b, c, h, 2 * w, generator=g)[..., ::2]                         # neither layout
    return {"nchw": x, "tokens": tokens, "strided": strided}


def _loop_roll(x, idx):
    return torch.stack([torch.roll(x[i], (-int(idx[i, 0]), -int(idx[i, 1])), (-2, -1)) for i in range(len(x))])


@pytest.mark.parametrize("full_table", [True, False, "big-map"])
@pytest.mark.parametrize("b, c, h, w, s", [(3, 3, 32, 32, 4), (2, 5, 16, 48, 8), (4, 32, 8, 8, 2),
                                           (2, 3, 24, 16, 4), (1, 1, 64, 32, 16), (3, 7, 12, 20, 4)])
def test_every_roll_path_equals_a_loop_of_torch_roll(b, c, h, w, s, full_table, monkeypatch):
    from equishift import polyphase

    if full_table is False:  # force the separable tables (what maps above _FULL_TABLE_MAX use)
        monkeypatch.setattr(polyphase, "_FULL_TABLE_MAX", 0)
        polyphase._tables.cache_clear()
    if full_table == "big-map":  # force what maps above _ROWS_MAX / _CHAIN_MIN use: block copies, chained energy
        monkeypatch.setattr(polyphase, "_BLOCKS_MIN", 0)
        monkeypatch.setattr(polyphase, "_CHAIN_MIN", 0)
    g = torch.Generator().manual_seed(b * 1000 + h + w + s)
    try:
        for name, x in _layouts(b, c, h, w, g).items():
            for ctx in (torch.inference_mode, torch.no_grad, torch.enable_grad):
                with ctx():
                    out, idx = anchor(x, s)
                    assert torch.equal(idx, brute_anchor_index(x, s)), (name, ctx)
                    assert torch.equal(out, _loop_roll(x, idx)), (name, ctx)
                    assert torch.equal(PolyphaseAnchor(s)(x), out), (name, ctx)
    finally:
        polyphase._tables.cache_clear()


@pytest.mark.parametrize("b, c, h, w, s", [(2, 3, 32, 32, 4), (2, 4, 8, 8, 2), (2, 8, 8, 8, 2)])
def test_gradient_through_the_roll_is_the_inverse_roll(b, c, h, w, s):
    """With autograd on, the roll is a permutation, so d(sum(g * anchor(x))) / dx = g rolled back."""
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h + s),
                    requires_grad=True)
    gout = torch.randn(b, c, h, w, dtype=torch.float64)
    out, idx = anchor(x, s)
    (out * gout).sum().backward()
    back = torch.stack([torch.roll(gout[i], (int(idx[i, 0]), int(idx[i, 1])), (-2, -1)) for i in range(b)])
    assert torch.equal(x.grad, back)


@pytest.mark.parametrize("pad", [(1, 1, 1, 1), (2, 0, 1, 3), (0, 0, 0, 0), (3, 3, 3, 3)])
@pytest.mark.parametrize("c, h, w", [(8, 6, 5), (32, 8, 8), (4, 3, 3)])
def test_circular_pad_of_token_grids_equals_torch_pad(pad, c, h, w):
    """The PEGs' circular padding (one index_select on channels-last grids) is F.pad(mode="circular")."""
    import torch.nn.functional as F

    from equishift.layers.circular import _circular_pad

    if max(pad[:2]) > w or max(pad[2:]) > h:
        pytest.skip("F.pad's circular mode wraps at most once")
    x = torch.randn(2, h * w, c, generator=torch.Generator().manual_seed(c + h)).transpose(1, 2).reshape(2, c, h, w)
    got = _circular_pad(x, pad)
    assert torch.equal(got, F.pad(x.contiguous(), pad, mode="circular"))
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_tables_first_built_in_inference_mode_still_serve_autograd():
    """The index tables are cached process-wide. A sweep (inference mode) may build them first; a later
    attribution (autograd) on a map of the same size must still work and get the right gradient."""
    from equishift import polyphase

    polyphase._tables.cache_clear()
    polyphase._batch_offsets.cache_clear()
    polyphase._window_starts.cache_clear()
    g = torch.Generator().manual_seed(5)
    grids = {"tokens": torch.randn(2, 64, 8, generator=g).transpose(1, 2).reshape(2, 8, 8, 8),
             "image": torch.randn(2, 3, 32, 32, generator=g)}
    with torch.inference_mode():
        for x in grids.values():
            anchor(x.clone(), 4)
    from equishift.layers.circular import _circular_pad, _pad_index

    _pad_index.cache_clear()
    with torch.inference_mode():
        _circular_pad(grids["tokens"].clone(), (1, 1, 1, 1))
    for name, x in grids.items():
        x = x.clone().requires_grad_()
        out, idx = anchor(x, 4)
        out.sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x)), name
    x = grids["tokens"].clone().requires_grad_()
    _circular_pad(x, (1, 1, 1, 1)).sum().backward()  # each pixel appears (1 + wraps) times in the pad
    per_row = torch.ones(8)
    per_row[[0, -1]] = 2  # the first and last rows (and columns) are copied once more by the wrap
    want = per_row[:, None] * per_row[None, :]
    assert torch.equal(x.grad, want.expand_as(x))


def test_empty_batches_and_fake_tensor_tracing_do_not_break_the_tables():
    """An empty batch rolls to an empty batch on every path; running under FakeTensorMode (shape and FLOP
    estimators) neither caches fake tables nor receives real ones, so real runs afterwards still work."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from equishift import polyphase

    for x in (torch.randn(0, 3, 32, 32), torch.randn(0, 64, 8).transpose(1, 2).reshape(0, 8, 8, 8)):
        out, idx = anchor(x, 4)
        assert out.shape == x.shape and idx.shape == (0, 2)
    polyphase._tables.cache_clear()
    polyphase._window_starts.cache_clear()
    polyphase._batch_offsets.cache_clear()
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(2, 3, 32, 32))
        out, _ = anchor(fake, 4)
        assert out.shape == (2, 3, 32, 32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out, idx = anchor(x, 4)
    assert torch.equal(out, _loop_roll(x, idx))


# --- near-ties ---------------------------------------------------------------------------------------
# Another CPU (or another batch size) computes the features of a shifted input with other roundings: what
# reaches an anchor is the shifted map plus noise of a few ulps, not an exact permutation. ``jitter`` adds
# such noise, independently per call, so these tests reproduce on any machine what another CPU does.
def jitter(x: torch.Tensor, seed: int, ulps: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    eps = torch.finfo(x.dtype).eps
    return x + x * (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1).to(x.dtype) * ulps * eps


def layer_normed(b: int, c: int, h: int, w: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Token grids right after a LayerNorm with γ = 1, β = 0 (an untrained model's): every token has l2
    norm sqrt(C), so every phase ties on the l2 key up to rounding. (eps = 0: with LayerNorm's eps the
    norms differ by ~eps / var, ~1e-7 relative: a tie in float32, a real margin in float64.)"""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(b, h * w, c, generator=g, dtype=torch.float64)
    t = torch.nn.functional.layer_norm(t, (c,), eps=0.0).to(dtype)
    return t.transpose(1, 2).reshape(b, c, h, w)


def consistent(x: torch.Tensor, shift, s: int, tie_tol, seed: int) -> torch.Tensor:
    """Per image: does the anchor of (jittered) R_δ x sit at (a + δ) mod s for the anchor a of (jittered) x?"""
    a = select_anchor(jitter(x, seed), s, tie_tol)
    a2 = select_anchor(jitter(torch.roll(x, shift, (-2, -1)), seed + 1), s, tie_tol)
    return ((a + torch.tensor(shift)) % s == a2).all(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_ties_after_layernorm_survive_rounding_noise(dtype):
    """After a default LayerNorm the l2 key is pure rounding: the plain argmax follows the noise (so this
    test can fail), the default rule decides by sum x⁴ and follows the shift."""
    s, shift = 4, (5, 3)
    x = layer_normed(64, 32, 8, 8, seed=0, dtype=dtype)
    assert (polyphase_margin(x, s) < TIE_TOL[dtype]).float().mean() > 0.9  # the l2 key is (nearly) tied
    plain = consistent(x, shift, s, tie_tol=0, seed=1)
    robust = consistent(x, shift, s, tie_tol=None, seed=1)
    assert plain.float().mean() < 0.5, "plain argmax unexpectedly stable: the jitter is not doing its job"
    assert robust.all(), f"{int((~robust).sum())} of 64 near-tied anchors did not follow the shift"


def clear_of_the_noise(x: torch.Tensor, s: int, tol: float, bound: float) -> torch.Tensor:
    """Per image: do its margins beat the noise? Every phase other than the best has a relative gap
    (S1 - Sp) / S1 farther than ``bound`` from the tolerance, and when several phases are tied the x⁴
    key's own relative margin among them exceeds ``bound``."""
    n = brute_norms(x, s).flatten(1)
    q = brute_quartics(x, s).flatten(1)
    rel = (n.amax(1, keepdim=True) - n) / n.amax(1, keepdim=True)
    best = rel == 0
    clear = (((rel - tol).abs() > bound) | best).all(dim=1)
    tied = rel <= tol
    qt = q.masked_fill(~tied, -1.0).sort(dim=1, descending=True).values
    second = qt[:, 1] if qt.shape[1] > 1 else torch.full_like(qt[:, 0], -1.0)
    key_gap = torch.where(tied.sum(1) == 1, torch.ones_like(qt[:, 0]), (qt[:, 0] - second) / qt[:, 0])
    return clear & (key_gap > bound)


# The noise: 4 ulps per value moves a relative phase sum by <= ~8 ulps (a square doubles a relative
# error) and a relative gap, a ratio of two such sums, by about twice that; 64 ulps leaves a 4x berth.
NOISE_BOUND_ULPS = 64


@BOUNDED
@given(shape=shapes, seed=st.integers(0, 2**16), shift=st.tuples(st.integers(-50, 50), st.integers(-50, 50)),
       dtype=st.sampled_from([torch.float32, torch.float64]), tied=st.booleans())
def test_choice_follows_the_shift_when_margins_beat_the_noise(shape, seed, shift, dtype, tied):
    """The guarantee, as a property: with a few ulps of rounding noise on both runs, the anchor follows
    the shift for every image whose margins clear the noise (``clear_of_the_noise``). Half the draws are
    LayerNorm-tied maps, so the x⁴ key is exercised as much as the l2 key."""
    b, c, hb, wb, s = shape
    if tied and c > 1:
        x = layer_normed(b, c, hb * s, wb * s, seed, dtype)
    else:
        x = torch.randn(b, c, hb * s, wb * s, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    ok = consistent(x, shift, s, tie_tol=None, seed=seed)
    clear = clear_of_the_noise(x, s, TIE_TOL[dtype], NOISE_BOUND_ULPS * torch.finfo(dtype).eps)
    assert ok[clear].all(), (x.shape, shift)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_noise_property_is_not_vacuous(dtype):
    """Most images count as clear, tied ones included, so the property above asserts something; and with
    the plain argmax the tied ones fail it."""
    s = 4
    tol, bound = TIE_TOL[dtype], NOISE_BOUND_ULPS * torch.finfo(dtype).eps
    free = torch.randn(64, 8, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    tied = layer_normed(64, 8, 8, 8, seed=1, dtype=dtype)
    assert clear_of_the_noise(free, s, tol, bound).float().mean() > 0.8
    assert clear_of_the_noise(tied, s, tol, bound).float().mean() > 0.8
    assert (polyphase_margin(tied, s) <= tol).all()
    assert consistent(tied, (5, 3), s, tie_tol=None, seed=2)[clear_of_the_noise(tied, s, tol, bound)].all()
    if dtype == torch.float32:  # float64 LayerNorm maps tie far below float64 noise, and so does the jitter
        assert not consistent(tied, (5, 3), s, tie_tol=0, seed=2).all()


def test_margin_is_recorded_with_the_choice():
    torch.manual_seed(5)
    model = torch.nn.Sequential(PolyphaseAnchor(2))
    x = torch.randn(3, 3, 8, 8)
    x[1] = 0.5  # a constant image: every phase ties, margin 0
    with record_anchors(model) as rec:
        model(x)
    torch.testing.assert_close(rec.margins["0"], polyphase_margin(x, 2))
    assert rec.margins["0"][1] == 0 and rec["0"][1].tolist() == [0, 0]
    assert rec.tie_tol["0"] == TIE_TOL[torch.float32]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2])
def test_tie_tolerance_is_checked(bad):
    with pytest.raises(ValueError, match="tie_tol"):
        PolyphaseAnchor(2, tie_tol=bad)


def test_tie_tolerance_zero_is_the_plain_argmax_and_shows_in_repr():
    x = torch.randn(16, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    plain = PolyphaseAnchor(2, tie_tol=0)
    assert "tie_tol=0" in repr(plain) and "tie_tol" not in repr(PolyphaseAnchor(2))
    with record_anchors(torch.nn.Sequential(plain)) as rec:
        plain(x)
    want = brute_norms(x, 2).flatten(1).argmax(1)
    assert torch.equal(rec["0"][:, 0] * 2 + rec["0"][:, 1], want)


@pytest.mark.slow
def test_compiled_anchor_decides_near_ties_like_eager():
    """Under torch.compile the choice is one opaque operator (equishift::near_tie_choice): on maps where
    every phase ties on the l2 key, the compiled choice must equal eager's. (Generated code for the
    masked float64 argmax once returned out-of-range indices or wrong choices, depending on the CPU's
    kernels; CI runs this under three of them.)"""
    import torch._dynamo

    x = layer_normed(8, 32, 8, 8, seed=7)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: anchor(t, 4))
    with torch.no_grad():
        rolled, idx = compiled(x)
    want_rolled, want_idx = anchor(x, 4)
    torch._dynamo.reset()
    assert torch.equal(idx, want_idx) and torch.equal(rolled, want_rolled)


def test_a_batch_mixing_tied_and_untied_images_is_decided_per_image():
    """On the CPU only the tied images get the second key; each image's choice is its own rule's."""
    tied = layer_normed(3, 16, 8, 8, seed=11)
    free = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(12))
    x = torch.stack([tied[0], free[0], tied[1], free[1], free[2], tied[2]])
    assert torch.equal(select_anchor(x, 4), brute_anchor_index(x, 4))
    for i in range(len(x)):
        assert torch.equal(select_anchor(x[i:i + 1], 4), select_anchor(x, 4)[i:i + 1])


@pytest.mark.parametrize("pad", [(1, 1, 1, 1), (3, 3, 3, 3), (2, 0, 1, 3), (0, 0, 0, 0)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_anchor_with_pad_is_the_roll_then_the_circular_pad(pad, layout):
    """PolyphaseAnchor(x, pad=...) (the fused roll + circular padding a circular conv after an anchor
    uses) equals anchoring, then F.pad(mode='circular'), exactly; it records the same choice."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(sum(pad))
    x = torch.randn(3, 6, 8, 12, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    a = PolyphaseAnchor(4)
    with torch.inference_mode():
        plain, idx = anchor(x, 4)
        fused = a(x, pad=pad)
    assert torch.equal(fused, F.pad(plain, pad, mode="circular"))
    assert fused.is_contiguous(memory_format=torch.channels_last)  # a feature map: the conv's fast layout
    with torch.enable_grad():  # under autograd the same values, through the differentiable path
        xg = x.clone().requires_grad_(True)
        assert torch.equal(a(xg, pad=pad).detach(), fused)
