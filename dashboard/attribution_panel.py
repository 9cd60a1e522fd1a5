"""The attribution tab: a captum attribution of each model at the current shift (equishift.attribution),
overlaid on the shifted input, with the un-shift-and-compare score against the unshifted map.

Attributions need gradients, so they are computed here on demand (only while this tab is open) and
cached per (model, image, mode, method, layer, shift) in the shared store."""
from __future__ import annotations

import streamlit as st

from equishift import attribution, plots
from equishift.formatting import fmt

from dashboard import compute
from dashboard.export import show

__all__ = ["render", "METHODS"]

KEEP = "session"  # the choice survives while another tab is open
METHODS = {"saliency": "Saliency |∂f/∂x|", "gradcam": "GradCAM", "integrated_gradients": "Integrated gradients (32 steps)"}


def _source(side, mode):
    """(image tensor the shift is applied to, crop size or None)."""
    if mode == "crop":
        return side.canvas, tuple(side.x.shape[-2:])
    return side.x, None


def _attribute(side, mode, method: str, layer, shift):
    fn = attribution.METHODS[method]
    image, size = _source(side, mode)
    kwargs = {"layer": layer} if method == "gradcam" else {}
    base_key = ("attribution", side.spec, side.key[2], mode, method, layer)
    ref = compute.cached(base_key + ((0, 0),), lambda: fn(side.loaded, image, shift=(0, 0), mode=mode, size=size,
                                                          **kwargs))
    att = compute.cached(base_key + (tuple(shift),),
                         lambda: fn(side.loaded, image, target=ref.target, shift=tuple(shift), mode=mode,
                                    size=size, **kwargs))
    return att, ref


def render(sides, mode, shift, index) -> None:
    c1, c2 = st.columns([2, 2])
    method = c1.radio("method", list(METHODS), format_func=METHODS.get, horizontal=True, key="attr_method", persist_state=KEEP)
    layer = None
    if method == "gradcam":
        layers = ["patch"] + list(sides[0].result.layers)
        layer = c2.selectbox("layer", layers, index=0, key="attr_layer",
                             help="patch: the first conv (a ViT's patch conv, a CNN's stem); a layer: its output as a "
                                  "(C, h, w) map (patch tokens reshaped, channels-last maps permuted).")
        layer = None if layer == "patch" else layer
    maps, scores = {}, {}
    with st.spinner(f"{METHODS[method]} at shift ({fmt(shift[0])}, {fmt(shift[1])}) …"):
        for side in sides:
            try:
                att, ref = _attribute(side, mode, method, layer, shift)
            except Exception as e:  # noqa: BLE001 - e.g. a layer the other model lacks
                st.error(f"{METHODS[method]} failed for the {side.role} model: {e}")
                continue
            maps[side.role] = att.map
            scores[side.role] = attribution.compare(att, ref)
    if not maps:
        return
    ref_side = sides[0]
    image, size = _source(ref_side, mode)
    from equishift.shifts import shift as shift_image

    display = ref_side.loaded.denormalize(shift_image(image[0], shift[0], shift[1], mode, size).cpu())
    fig = plots.attribution_overlay(display, maps, method=METHODS[method], shift=tuple(shift), mode=mode,
                                    scores=scores)
    show(fig, f"attribution-{method}", key="fig_attribution")
    st.caption("Target class: each model's top-1 on the unshifted image. r and IoU@10%: the map at this shift, "
               "rolled back by the shift, against the unshifted map (1 = the explanation moves with the image).")
