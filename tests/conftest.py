"""Shared fixtures. Tiny timm models with random weights for the core (anchoring) tests; the hypothesis
profiles; the ``chromium`` marker and fixture for tests that need a browser.

The suite runs offline: HF_HUB_OFFLINE is set before anything imports timm or huggingface_hub, so a
stray ``pretrained=True`` fails at once instead of retrying the network for ~47 s.
"""
from __future__ import annotations

import os
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from torch import nn  # noqa: E402

# --- hypothesis ----------------------------------------------------------------------------------
# "ci" (loaded when $CI is set, as CI runs `CI=true bash run.sh test`): the same examples on every run,
# no example database (nothing carries over between CI runs anyway), and a failure prints the blob that
# reproduces it (@reproduce_failure). A red CI run then means a change broke something, never that a new
# random draw found an old bug that nobody can replay. No deadline and no too_slow health check there
# either: CI machines are slower and busier, and a timing failure is not a bug. "dev" (the default, for
# people at their desk) keeps hypothesis's random exploration and its local database, which replays
# past failures first: that is how new counterexamples are found. Both are built on hypothesis's own
# "default" profile, whatever hypothesis loaded at import (it loads its own "ci" when it sees $CI).
# --hypothesis-profile=ci|dev overrides; tests that pin their own settings keep them under both.
settings.register_profile("ci", settings.get_profile("default"), derandomize=True, database=None, print_blob=True,
                          deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", settings.get_profile("default"))
settings.load_profile("ci" if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no") else "dev")

# --- Chromium ------------------------------------------------------------------------------------
CHROMIUM_REASON = "needs Chromium (static figure export with kaleido, Playwright): apt-get install chromium"


def chromium_path() -> Optional[str]:
    """The Chromium that kaleido would start for static (PNG/SVG) export, or None when there is none
    (``equishift.report.find_browser``, which the report and the dashboard check before exporting).

    It is found the way kaleido finds it ($BROWSER_PATH first, then the PATH and the usual install
    locations), so ``BROWSER_PATH=/nonexistent`` hides the browser from the tests, the report and
    kaleido alike: the way to run the suite as on a machine without Chromium."""
    from equishift.report import find_browser

    return find_browser()


def pytest_configure(config):
    config.addinivalue_line("markers", f"chromium: the test {CHROMIUM_REASON}; it is skipped when none is found")


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("chromium") is not None]
    if marked and chromium_path() is None:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=CHROMIUM_REASON))


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the Chromium executable (for Playwright's ``executable_path``); skips the test without one."""
    path = chromium_path()
    if path is None:
        pytest.skip(CHROMIUM_REASON)
    return path


@pytest.fixture(scope="session")
def chromium_or_none() -> Optional[str]:
    """Path of the Chromium executable, or None (for a test that checks more when one is there)."""
    return chromium_path()


# --- tiny models ---------------------------------------------------------------------------------
# Tiny configurations: two stages with widths 32 and 64 and a handful of blocks, so that a forward pass
# takes milliseconds on a CPU while every kind of block is present. Twins: SVT alternates locally-grouped
# (LSA, window ws) and global sub-sampled (GSA, ratio sr) attention; PCPVT is all GSA. In "svt" and
# "pcpvt" the first stage ends on a block anchored with an even period, so (as on the paper's layouts)
# the stride-2 patch embedding needs no anchor of its own. Two layouts where it does: "svt-odd" (odd
# depth and odd window 3, at 48 px: the stage ends on an LSA block of period 3) and "pcpvt-sr1" (sr = 1
# in the first stage: no block anchor at all there).
TWINS_CONFIGS = {
    "svt": dict(embed_dims=(32, 64), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(2, 2), wss=(4, 2),
                sr_ratios=(2, 1)),
    "pcpvt": dict(embed_dims=(32, 64), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(2, 2), sr_ratios=(2, 1)),
    "svt-odd": dict(embed_dims=(32, 64), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(3, 1), wss=(3, 3),
                    sr_ratios=(2, 1)),
    "pcpvt-sr1": dict(embed_dims=(32, 64), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(2, 2), sr_ratios=(1, 1)),
}
TWINS_IMG = {"svt-odd": 48}  # image size per layout (32 otherwise): the windows must tile every stage


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Give the weights that timm initialises trivially random values, as training would.

    - LayerNorm affine: with γ = 1, β = 0 every normalised token has norm ≈ sqrt(C), so the polyphase
      components right after a norm (Twins' first LSA anchor) nearly tie and the anchor is decided by
      rounding noise — the known failure mode, not what these tests are about.
    - pos_embed: timm draws it with std 0.02, so an absolute PE barely moves the logits; std 0.5 makes
      its damage (patch-only mode, untouched models) plainly visible.
    - classifier heads (``head``, DeiT's ``head_dist``): timm draws them with std 0.02, so random logits
      are ~0.05 and every absolute error is tiny; ×20 gives logits of order 1.
    - ConvPosEmbed: anchorize starts it at zero (the identity); random weights exercise its circular
      padding. Twins PEGs already have PyTorch's default (random) init.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    pos = getattr(model, "pos_embed", None)
    if isinstance(pos, nn.Parameter):
        pos.copy_(torch.randn(pos.shape, generator=g) * 0.5)
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            head.weight.mul_(20)
    return _randomize_pos_convs(model, seed)


@torch.no_grad()
def _randomize_pos_convs(model: nn.Module, seed: int) -> nn.Module:
    from equishift.anchoring import ConvPosEmbed

    g = torch.Generator().manual_seed(seed + 1000)
    for m in model.modules():
        if isinstance(m, ConvPosEmbed):
            m.proj.weight.copy_(torch.randn(m.proj.weight.shape, generator=g) * 0.2)
            m.proj.bias.copy_(torch.randn(m.proj.bias.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="session")
def randomize():
    """``randomize(model, seed)``: in-place random LayerNorm affine, pos_embed and ConvPosEmbed weights."""
    return _randomize


@pytest.fixture(scope="session")
def make_vit():
    """``make_vit(patch=4, img=32, cls=True, seed=0, **timm_kwargs)``: a tiny random timm VisionTransformer
    in eval mode. ``img`` may be an int or (H, W); without CLS the model average-pools."""

    def build(patch: int = 4, img=32, cls: bool = True, seed: int = 0, **kw) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(seed)
        cfg = dict(img_size=img, patch_size=patch, embed_dim=32, depth=2, num_heads=2, num_classes=10)
        if not cls:
            cfg.update(class_token=False, global_pool="avg")
        cfg.update(kw)
        return _randomize(VisionTransformer(**cfg), seed).eval()

    return build


@pytest.fixture(scope="session")
def make_twins():
    """``make_twins(kind="svt" | "pcpvt" | "svt-odd" | "pcpvt-sr1", seed=0, img=TWINS_IMG or 32, randomized=True)``: a tiny random timm
    Twins, eval mode; ``randomized=False`` keeps timm's own init (LayerNorm γ = 1, β = 0, small head)."""

    def build(kind: str = "svt", seed: int = 0, img: Optional[int] = None, randomized: bool = True,
              **kw) -> nn.Module:
        from timm.models.twins import Twins

        torch.manual_seed(seed)
        cfg = dict(img_size=img or TWINS_IMG.get(kind, 32), patch_size=4, num_classes=10, **TWINS_CONFIGS[kind])
        cfg.update(kw)
        model = Twins(**cfg).eval()
        return _randomize(model, seed) if randomized else model

    return build


@pytest.fixture(scope="session")
def anchored():
    """``anchored(model, mode="full", seed=0)``: ``anchorize`` + random ConvPosEmbed weights, eval mode."""

    def build(model: nn.Module, mode: str = "full", seed: int = 0) -> nn.Module:
        from equishift import anchorize

        return _randomize_pos_convs(anchorize(model, mode), seed).eval()

    return build


@pytest.fixture(autouse=True)
def _no_leaked_grad_mode():
    """A test (or code it calls) that switches autograd off globally breaks every later test in the
    process with a confusing 'does not require grad': restore the mode and fail the leaking test."""
    before = torch.is_grad_enabled()
    yield
    after = torch.is_grad_enabled()
    torch.set_grad_enabled(before)
    assert after == before, "this test left torch.set_grad_enabled changed"
