"""Shift metrics, one function per definition in docs/metrics.md. Pure functions on tensors.

Notation: ŷ = argmax of the logits, p = softmax. Shapes: N images, K shifts, C classes.
Rates (consistency, accuracy, robustness) come back as an ``Estimate`` with a Wilson 95% interval,
because every rate the dashboard and the CLI print must carry its CI and its n.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

from .errors import EquishiftError

__all__ = [
    "Estimate", "wilson_interval", "rate",
    "consistency_a", "consistency_b", "orbit_consistency", "crop_consistency", "linear_consistency",
    "accuracy", "shifted_accuracy", "accuracy_drop", "worst_case_robustness",
    "minimal_flipping_shift", "fragility_ranking",
    "logit_variance", "absolute_change", "mean_absolute_change", "kl_divergence",
    "feature_equivariance_error", "pearson", "topk_iou", "attention_equivariance",
    "central_difference", "lie_derivative",
]


# --- rates and their confidence intervals ----------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A rate with its Wilson score interval: ``value`` = successes / n, ``low``..``high`` at ``z``."""

    value: float
    low: float
    high: float
    n: int
    successes: int

    def __str__(self) -> str:
        return f"{100 * self.value:.2f}% [{100 * self.low:.2f}, {100 * self.high:.2f}] (n={self.n})"


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> Tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for the default z). n = 0 → (0, 1)."""
    if n < 0 or successes < 0 or successes > n:
        raise EquishiftError(f"need 0 ≤ successes ≤ n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(flags: torch.Tensor, z: float = 1.959964) -> Estimate:
    """Mean of boolean ``flags`` with its Wilson interval."""
    flags = torch.as_tensor(flags).bool().flatten()
    n, k = int(flags.numel()), int(flags.sum())
    if n == 0:
        raise EquishiftError("cannot compute a rate over zero items")
    lo, hi = wilson_interval(k, n, z)
    return Estimate(k / n, lo, hi, n, k)


def _pred(x: torch.Tensor) -> torch.Tensor:
    """Accept predictions (integer) or logits/probabilities (float, class last)."""
    x = torch.as_tensor(x)
    return x.argmax(-1) if x.is_floating_point() else x


# --- consistency ------------------------------------------------------------------------------------
def consistency_a(pred_clean: torch.Tensor, pred_shifted: torch.Tensor) -> Estimate:
    """Consistency A: fraction of draws with ŷ(x) = ŷ(R_δ x) (one shift per draw). Inputs: [N] labels or
    [N, C] logits; ``pred_clean`` may also be [N] against ``pred_shifted`` [N, K] (every pair counts)."""
    a, b = _pred(pred_clean), _pred(pred_shifted)
    if b.dim() == a.dim() + 1:
        a = a.unsqueeze(-1)
    return rate(a == b)


def consistency_b(pred_1: torch.Tensor, pred_2: torch.Tensor) -> Estimate:
    """Consistency B (APS/LPS): fraction with ŷ(R_δ1 x) = ŷ(R_δ2 x), δ1, δ2 drawn independently."""
    return rate(_pred(pred_1) == _pred(pred_2))


def crop_consistency(pred_crop_1: torch.Tensor, pred_crop_2: torch.Tensor) -> Estimate:
    """Linear/crop consistency (Zhang 2019): agreement of two random crops of one image."""
    return rate(_pred(pred_crop_1) == _pred(pred_crop_2))


linear_consistency = crop_consistency


def orbit_consistency(preds: torch.Tensor) -> Estimate:
    """Strict: fraction of images whose ŷ is the same for every shift of the grid. preds [N, K] (or
    logits [N, K, C]); a single image [K] counts as N = 1."""
    p = _pred(preds)
    p = p[None] if p.dim() == 1 else p
    return rate((p == p[:, :1]).all(dim=1))


# --- accuracy -------------------------------------------------------------------------------------
def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> Estimate:
    """Clean accuracy: mean 1[ŷ(x) = y]. pred [N] or logits [N, C]."""
    return rate(_pred(pred) == torch.as_tensor(labels))


def shifted_accuracy(pred_shifted: torch.Tensor, labels: torch.Tensor) -> Estimate:
    """Shifted accuracy: mean 1[ŷ(R_δ x) = y] over images and shifts; pred [N] or [N, K] (or logits)."""
    p, y = _pred(pred_shifted), torch.as_tensor(labels)
    if p.dim() == y.dim() + 1:
        y = y.unsqueeze(-1)
    return rate(p == y)


def accuracy_drop(clean: Estimate, shifted: Estimate) -> float:
    """clean − shifted accuracy, as a fraction (× 100 for percentage points)."""
    return clean.value - shifted.value


def _linf(shifts: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(shifts).abs().amax(dim=-1).double()


def worst_case_robustness(preds: torch.Tensor, labels: torch.Tensor, shifts: torch.Tensor,
                          radius: float) -> Estimate:
    """Fraction of images classified correctly under EVERY shift with max(|dy|, |dx|) ≤ radius.
    preds [N, K] (or logits [N, K, C]) for ``shifts`` [K, 2]; the grid must contain the radius' shifts."""
    p, y = _pred(preds), torch.as_tensor(labels)
    inside = _linf(shifts) <= radius
    if not inside.any():
        raise EquishiftError(f"no swept shift lies within radius {radius}")
    return rate((p[:, inside] == y[:, None]).all(dim=1))


def minimal_flipping_shift(preds: torch.Tensor, ref_pred: Union[int, torch.Tensor],
                           shifts: torch.Tensor) -> torch.Tensor:
    """Smallest L∞ norm max(|dy|, |dx|) of a swept shift whose ŷ differs from ``ref_pred`` (the
    unshifted prediction); +inf where none flips. preds [N, K] → [N] (or [K] → 0-dim), float64."""
    p = _pred(preds)
    single = p.dim() == 1
    p = p[None] if single else p
    ref = torch.as_tensor(ref_pred).reshape(-1, 1)
    norms = _linf(shifts).expand(p.shape[0], -1)
    flipped = torch.where(p != ref, norms, torch.full_like(norms, math.inf))
    out = flipped.min(dim=1).values
    return out[0] if single else out


def fragility_ranking(min_flip: torch.Tensor) -> torch.Tensor:
    """Image indices ordered most fragile first (smallest minimal flipping shift; never-flipping images
    last; ties keep index order)."""
    return torch.sort(torch.as_tensor(min_flip).double(), stable=True).indices


# --- continuous measures --------------------------------------------------------------------------
def logit_variance(logits: torch.Tensor, target: Union[int, torch.Tensor]) -> torch.Tensor:
    """Variance over shifts (population, ddof = 0) of the target class' logit. logits [K, C] with an int
    target → 0-dim; logits [N, K, C] with targets [N] → [N]."""
    x = torch.as_tensor(logits).double()
    if x.dim() == 2:
        return x[:, int(target)].var(unbiased=False)
    t = torch.as_tensor(target).long().to(x.device)
    sel = x.gather(2, t.view(-1, 1, 1).expand(-1, x.shape[1], 1))[..., 0]
    return sel.var(dim=1, unbiased=False)


def absolute_change(probs_ref: torch.Tensor, probs_shifted: torch.Tensor,
                    cls: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
    """|p(x)[ŷ(x)] − p(T_δ x)[ŷ(x)]| per shift. probs_ref [C] with probs_shifted [K, C] → [K];
    [N, C] with [N, K, C] → [N, K]. ``cls`` defaults to ŷ(x)."""
    pr, ps = torch.as_tensor(probs_ref).double(), torch.as_tensor(probs_shifted).double()
    c = pr.argmax(-1) if cls is None else torch.as_tensor(cls)
    if pr.dim() == 1:
        return (pr[int(c)] - ps[:, int(c)]).abs()
    c = c.long().view(-1, 1)
    ref = pr.gather(1, c)                                   # [N, 1]
    sh = ps.gather(2, c[:, :, None].expand(-1, ps.shape[1], 1))[..., 0]  # [N, K]
    return (ref - sh).abs()


def mean_absolute_change(probs_ref: torch.Tensor, probs_shifted: torch.Tensor,
                         cls: Optional[Union[int, torch.Tensor]] = None) -> float:
    """MAC = mean over shifts (and images) of ``absolute_change``."""
    return float(absolute_change(probs_ref, probs_shifted, cls).mean())


def kl_divergence(logits_ref: torch.Tensor, logits_shifted: torch.Tensor) -> torch.Tensor:
    """KL(p(x) || p(T_δ x)) in nats per shift, from logits (log-softmax, numerically stable).
    logits_ref [C] (or [N, C]) against logits_shifted [K, C] (or [N, K, C]) → [K] (or [N, K])."""
    lr = torch.as_tensor(logits_ref).double().log_softmax(-1)
    ls = torch.as_tensor(logits_shifted).double().log_softmax(-1)
    lr = lr.unsqueeze(-2)
    return (lr.exp() * (lr - ls)).sum(-1)


def _roll_index(h: int, w: int, token_shift: torch.Tensor) -> torch.Tensor:
    """[K, h*w] flat source index of a circular roll by token_shift [K, 2] (out[i, j] = in[i−t0, j−t1])."""
    dev = token_shift.device
    rows = (torch.arange(h, device=dev) - token_shift[:, :1]) % h      # [K, h]
    cols = (torch.arange(w, device=dev) - token_shift[:, 1:]) % w      # [K, w]
    return (rows[:, :, None] * w + cols[:, None, :]).flatten(1)


def feature_equivariance_error(feat_shifted: torch.Tensor, feat_ref: torch.Tensor,
                               token_shift: torch.Tensor) -> torch.Tensor:
    """||F(T_δ x) − R_t F(x)|| / ||F(x)|| per shift, R_t a circular roll by t = (rows, cols) on the
    token grid. feat_shifted [K, C, h, w], feat_ref [C, h, w], token_shift [K, 2] (long) → [K] float32.
    Frobenius norms over channels and positions, computed in float32."""
    k, c, h, w = feat_shifted.shape
    fs = feat_shifted.flatten(2).transpose(1, 2)                          # [K, N, C] (a view for tokens)
    ref = feat_ref.float().to(fs.device).flatten(1).t()                    # [N, C]
    idx = _roll_index(h, w, token_shift.to(fs.device).long())             # [K, N]
    diff = ref.index_select(0, idx.reshape(-1)).view(k, h * w, c)         # [K, N, C] = R_t F(x), row copies
    diff.sub_(fs)  # in place: one K×N×C buffer in all
    return torch.linalg.vector_norm(diff, dim=(1, 2)) / ref.norm().clamp_min(1e-12)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson r between maps over their last two dims (broadcasting over the leading ones); NaN when
    either map is constant."""
    a, b = torch.broadcast_tensors(torch.as_tensor(a).double(), torch.as_tensor(b).double())
    a, b = a.flatten(-2), b.flatten(-2)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, math.nan))


def _topk_mask(x: torch.Tensor, frac: float) -> torch.Tensor:
    flat = x.flatten(-2)
    k = max(1, int(round(frac * flat.shape[-1])))
    idx = flat.topk(k, dim=-1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True)


def topk_iou(a: torch.Tensor, b: torch.Tensor, frac: float = 0.1) -> torch.Tensor:
    """IoU of the top-``frac`` cells (k = round(frac · h · w), at least 1) of two maps over their last
    two dims. Ties inside a map are broken by torch.topk's order."""
    if not 0 < frac <= 1:
        raise EquishiftError(f"frac must be in (0, 1], got {frac}")
    a, b = torch.broadcast_tensors(torch.as_tensor(a).double(), torch.as_tensor(b).double())
    ma, mb = _topk_mask(a, frac), _topk_mask(b, frac)
    return (ma & mb).sum(-1).double() / (ma | mb).sum(-1).double()


def attention_equivariance(maps_shifted: torch.Tensor, map_ref: torch.Tensor, cell_shift: torch.Tensor,
                           frac: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Un-shift each map of the shifted inputs (circular roll by −``cell_shift`` [K, 2] cells of the map
    grid) and compare with the unshifted map: (Pearson r [K], IoU of the top-``frac`` region [K]).
    maps_shifted [K, h, w] (or [K, ..., h, w]); map_ref [h, w] (or [..., h, w]). Also used for attribution
    maps (cell = pixel)."""
    from .shifts import shift_batch

    m = torch.as_tensor(maps_shifted).double()
    lead = m.shape
    flat = m.reshape(lead[0], -1, *lead[-2:])
    back = shift_batch(flat, -torch.as_tensor(cell_shift).long(), "circular").reshape(lead)
    ref = torch.as_tensor(map_ref).double()
    return pearson(back, ref), topk_iou(back, ref, frac)


# --- Lie derivative -------------------------------------------------------------------------------
def central_difference(f_plus: torch.Tensor, f_minus: torch.Tensor, eps: float) -> torch.Tensor:
    """(f(+ε) − f(−ε)) / (2ε): a central-difference derivative; per pixel when ε is in pixels."""
    if eps <= 0:
        raise EquishiftError(f"eps must be positive, got {eps}")
    return (f_plus - f_minus) / (2 * eps)


def lie_derivative(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float = 0.5,
                   axis: str = "x", mode: str = "fourier") -> torch.Tensor:
    """Lie derivative (Gruver et al. 2023) d/dt softmax(f(T_t x)) at t = 0, for a continuous translation
    T_t along ``axis`` ('x' = columns, 'y' = rows), by a central difference with step ``eps`` pixels
    using a sub-pixel shift (``mode`` 'fourier' or 'bilinear', circular boundary).
    Returns [B, C] in probability per pixel; its norm over classes is the usual scalar summary."""
    from .shifts import shift

    if axis not in ("x", "y"):
        raise EquishiftError(f"axis must be 'x' or 'y', got {axis!r}")
    if mode not in ("fourier", "bilinear"):
        raise EquishiftError(f"lie_derivative needs a sub-pixel shift mode ('fourier' or 'bilinear'), got {mode!r}")
    x = x if x.dim() == 4 else x[None]
    dy, dx = (eps, 0.0) if axis == "y" else (0.0, eps)
    with torch.no_grad():
        both = torch.cat((shift(x, dy, dx, mode), shift(x, -dy, -dx, mode)))
        p = model(both).float().softmax(-1)
    return central_difference(p[: x.shape[0]], p[x.shape[0]:], eps)
