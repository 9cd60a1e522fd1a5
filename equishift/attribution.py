"""Attribution maps at any shift (captum), at image resolution, and the un-shift-and-compare score.

>>> ref = saliency(model, x)                       # unshifted
>>> att = saliency(model, x, shift=(3, 5))         # same target class, shifted input
>>> r, iou = compare(att, ref)                     # roll att back by (3, 5), Pearson r and top-10% IoU

Each map is [H, W] in the frame of the input the model saw (the shifted image):
- ``saliency``: |∂f_target/∂x| summed over channels (captum Saliency).
- ``integrated_gradients``: attributions summed over channels (captum IntegratedGradients, baseline =
  zeros in model-input space, i.e. the mean colour for normalised inputs).
- ``gradcam``: captum LayerGradCam (ReLU'd) on the first conv by default (a ViT's patch conv, a CNN's
  stem), or on any layer its family's adapter lists (``layer='blocks.3'``, ``'layers.1.blocks.0'``,
  ``'layer3'``): the output is seen as a (B, C, h, w) map first (patch tokens reshaped, channels-last
  maps permuted), because GradCAM on token-shaped outputs averages over the wrong axis. The h×w cell map is upsampled to
  H×W by nearest neighbour (each cell covers exactly its patch) and, for anchored models, rolled by the
  anchors selected upstream so it lies in the input frame (the network works in the anchored frame).

The target defaults to the model's top-1 on the UNSHIFTED image, so maps at different shifts explain
the same class. Models are used through a structural working copy (``equishift.sweep.working_copy``):
captum's hooks never land on a shared, cached model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .errors import EquishiftError
from .metrics import attention_equivariance
from .polyphase import PolyphaseAnchor, record_anchors
from .shifts import MODES
from .shifts import shift as shift_image
from .sweep import architecture, working_copy

__all__ = ["Attribution", "saliency", "integrated_gradients", "gradcam", "compare", "METHODS"]


@dataclass
class Attribution:
    """One attribution map [H, W] (float32, CPU) of ``target`` for ``image`` shifted by ``shift``."""

    map: torch.Tensor
    method: str
    target: int
    shift: Tuple[float, float]
    mode: str
    layer: Optional[str] = None

    def aligned(self) -> torch.Tensor:
        """The map rolled back by the shift (circular, nearest pixel): comparable with the unshifted map."""
        from .shifts import shift_batch

        s = torch.tensor([[round(-self.shift[0]), round(-self.shift[1])]])
        return shift_batch(self.map[None, None], s, "circular")[0, 0]


# --- shared steps ----------------------------------------------------------------------------------
def _prepare(model, image: torch.Tensor, shift: Tuple[float, float], mode: str, size) -> Tuple[nn.Module, torch.Tensor, torch.Tensor]:
    if not isinstance(model, nn.Module) and hasattr(model, "model"):
        model = model.model
    if not isinstance(model, nn.Module):
        raise EquishiftError(f"attribution needs a torch model, got {type(model).__name__}")
    if mode not in MODES:
        raise EquishiftError(f"unknown shift mode {mode!r}; choose one of {', '.join(MODES)}")
    if not torch.is_tensor(image) or image.dim() not in (3, 4) or (image.dim() == 4 and image.shape[0] != 1):
        raise EquishiftError("image must be a preprocessed tensor (C, H, W) or (1, C, H, W)")
    if mode == "crop" and size is None:
        raise EquishiftError("mode='crop' needs size=(h, w)")
    image = image[0] if image.dim() == 4 else image
    param = next(iter(model.parameters()), None)
    if param is not None:
        image = image.to(device=param.device, dtype=param.dtype)
    try:
        ref = shift_image(image, 0, 0, mode, size)[None]
        x = shift_image(image, shift[0], shift[1], mode, size)[None]
    except ValueError as e:
        raise EquishiftError(str(e)) from None
    return working_copy(model).eval(), x, ref


def _target(model: nn.Module, ref: torch.Tensor, target: Optional[int]) -> int:
    if target is not None:
        return int(target)
    with torch.no_grad():
        return int(model(ref).argmax(-1)[0])


def _grad_input(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


# --- methods ---------------------------------------------------------------------------------------
def saliency(model, image: torch.Tensor, target: Optional[int] = None, shift: Tuple[float, float] = (0, 0),
             mode: str = "circular", size: Optional[Tuple[int, int]] = None) -> Attribution:
    """|gradient| of the target logit w.r.t. the shifted input, summed over channels → [H, W]."""
    from captum.attr import Saliency

    work, x, ref = _prepare(model, image, shift, mode, size)
    t = _target(work, ref, target)
    with torch.enable_grad():
        a = Saliency(work).attribute(_grad_input(x), target=t, abs=True)
    return Attribution(a[0].sum(0).detach().float().cpu(), "saliency", t, tuple(shift), mode)


def integrated_gradients(model, image: torch.Tensor, target: Optional[int] = None,
                         shift: Tuple[float, float] = (0, 0), mode: str = "circular", steps: int = 32,
                         size: Optional[Tuple[int, int]] = None, internal_batch_size: int = 32) -> Attribution:
    """Integrated gradients from a zero baseline with ``steps`` Gauss-Legendre points, summed over
    channels → [H, W] (signed)."""
    from captum.attr import IntegratedGradients

    if steps < 1:
        raise EquishiftError(f"steps must be at least 1, got {steps}")
    work, x, ref = _prepare(model, image, shift, mode, size)
    t = _target(work, ref, target)
    with torch.enable_grad():
        a = IntegratedGradients(work).attribute(_grad_input(x), baselines=torch.zeros_like(x), target=t,
                                                n_steps=steps, internal_batch_size=internal_batch_size)
    return Attribution(a[0].sum(0).detach().float().cpu(), "integrated gradients", t, tuple(shift), mode)


class _MapTap(nn.Module):
    """Wraps a layer so its output passes through ``tap`` (an identity) as a (B, C, h, w) map: a
    conv-shaped layer for LayerGradCam, whatever the layer's own layout (tokens, channels-last)."""

    def __init__(self, layer, hw: Tuple[int, int]):
        super().__init__()
        self.layer, self.hw = layer, hw
        self.block = layer.module
        self.tap = nn.Identity()

    def __getattr__(self, name: str):  # timm code reads attributes of the block it calls
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        size = self.layer.size(args, out, self.hw)
        return self.layer.from_map(self.tap(self.layer.as_map(out, size)), out)


def _first_conv(model: nn.Module) -> nn.Module:
    """The patch embedding's conv (a hybrid ViT's projection of its backbone's map), else the first conv
    (a CNN's stem)."""
    from .archs import patch_conv

    conv = patch_conv(model) or next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise EquishiftError("this model has no convolution for GradCAM")
    return conv


def _tap_layer(work: nn.Module, layer: Optional[str], hw: Tuple[int, int]) -> Tuple[nn.Module, str]:
    """The module LayerGradCam hooks: the first conv, or a tap inserted after layer ``layer``."""
    from .archs import layers_of

    if layer in (None, "patch"):
        return _first_conv(work), "patch"
    specs = {spec.name: spec for spec in layers_of(work)}
    if layer not in specs:
        raise EquishiftError(f"unknown layer {layer!r} for GradCAM; choose 'patch' or one of {', '.join(specs)}")
    tap = _MapTap(specs[layer], hw)
    work.set_submodule(layer, tap)
    return tap.tap, layer


def _frame_roll(work: nn.Module, target_module: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
    """Pixels by which the network frame at ``target_module``'s output is rolled relative to the input:
    the sum of every upstream anchor's phase times its map stride (the anchored frame is never undone)."""
    total = [0.0, 0.0]
    done = {"hit": False}
    handles = []

    def on_anchor(name):
        def hook(mod, args, out):
            if not done["hit"]:
                g = x.shape[-2] / args[0].shape[-2]
                idx = rec[name][-1]
                total[0] += float(idx[0]) * g
                total[1] += float(idx[1]) * g
        return hook

    def on_target(mod, args, out):
        done["hit"] = True

    for n, m in work.named_modules():
        if isinstance(m, PolyphaseAnchor):
            handles.append(m.register_forward_hook(on_anchor(n)))
    handles.append(target_module.register_forward_hook(on_target))
    try:
        with torch.no_grad(), record_anchors(work) as rec:
            work(x)
    finally:
        for h in handles:
            h.remove()
    return round(total[0]), round(total[1])


def _tensors(out: object):
    """Every tensor in a module's output, through nested tuples, lists and dicts."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)
    elif isinstance(out, dict):
        for item in out.values():
            yield from _tensors(item)


def _gradient_reaches(work: nn.Module, module: nn.Module, x: torch.Tensor, target: int) -> bool:
    """Whether any gradient of the target score reaches ``module``'s output: an all-zero GradCAM is then
    a real answer (every weighted activation negative), not a layer the score never reads."""
    grads = []

    def hook(mod, args, out):
        # A block may return a tuple or a list (tokens, attention, ...): a gradient reaching any of them
        # counts.
        for t in _tensors(out):
            if t.requires_grad:
                t.register_hook(grads.append)

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            work(_grad_input(x))[0, target].backward()
    finally:
        handle.remove()
    return any(bool(g.ne(0).any()) for g in grads)


def gradcam(model, image: torch.Tensor, target: Optional[int] = None, shift: Tuple[float, float] = (0, 0),
            mode: str = "circular", layer: Optional[str] = None,
            size: Optional[Tuple[int, int]] = None) -> Attribution:
    """GradCAM (ReLU'd) on the first conv (``layer=None`` or ``'patch'``) or on the output map of a layer
    its family lists (``equishift.archs.layers_of``: ViT ``'blocks.3'``, Twins ``'blocks.1.0'``, Swin
    ``'layers.2.blocks.1'``, ResNet ``'layer3'``), nearest-upsampled to [H, W] in the input frame
    (module doc)."""
    from captum.attr import LayerAttribution, LayerGradCam

    work, x, ref = _prepare(model, image, shift, mode, size)
    t = _target(work, ref, target)
    if layer not in (None, "patch") and architecture(work) == "other":
        raise EquishiftError(f"GradCAM on a layer needs a model family equishift knows; "
                             f"{type(work).__name__} supports layer='patch' (its first conv)")
    module, name = _tap_layer(work, layer, tuple(x.shape[-2:]))
    with torch.enable_grad():
        cam = LayerGradCam(work, module).attribute(_grad_input(x), target=t, relu_attributions=True)
    if not bool((cam > 0).any()) and not _gradient_reaches(work, module, x, t):
        raise EquishiftError(
            f"GradCAM on {name} is zero everywhere: the class score does not depend on this layer's spatial "
            f"map (a class-token ViT's head reads only the class token after its last block); choose an "
            f"earlier layer or 'patch'")
    cam = LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), interpolate_mode="nearest")[0, 0]
    dy, dx = _frame_roll(work, module, x)
    cam = torch.roll(cam, (dy, dx), dims=(-2, -1))
    return Attribution(cam.float().cpu(), "GradCAM", t, tuple(shift), mode, name)


METHODS: Dict[str, Callable[..., Attribution]] = {
    "saliency": saliency, "integrated_gradients": integrated_gradients, "gradcam": gradcam,
}


def compare(shifted: Attribution, reference: Attribution, frac: float = 0.1) -> Tuple[float, float]:
    """Un-shift ``shifted``'s map (circular roll by minus its shift, rounded to whole pixels) and compare
    with ``reference``'s: (Pearson r, IoU of the top-``frac`` pixels). Exact for circular integer shifts;
    for other modes the border content differs and counts against the score."""
    if shifted.map.shape != reference.map.shape:
        raise EquishiftError(f"maps differ in size: {tuple(shifted.map.shape)} vs {tuple(reference.map.shape)}")
    cell = torch.tensor([[round(shifted.shift[0] - reference.shift[0]), round(shifted.shift[1] - reference.shift[1])]])
    r, iou = attention_equivariance(shifted.map[None], reference.map, cell, frac)
    return float(r[0]), float(iou[0])
