"""The caveats of the models and the image on the page (equishift.caveats), as warnings above the numbers
they qualify, with a one-click "Invert the image" where inverting is the fix.

    caveats.render(ok_sides, choice)   # after the sweeps ran; sides as session.Side (role, spec, loaded,
                                       # x, result, key), choice a sources.ImageChoice

A caveat that both models share is shown once, naming both. The input and sweep checks are cached per
(model, image) and per sweep, so a rerun that only moves the shift costs a few dict lookups.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import streamlit as st

from equishift import caveats as lib

from dashboard import compute, sources

__all__ = ["side_caveats", "render", "INVERT_BUTTON_KEY"]

INVERT_BUTTON_KEY = "caveat_invert"


def side_caveats(side, choice: Optional[sources.ImageChoice]) -> List[lib.Caveat]:
    """Model, input and sweep caveats of one side (``side.x`` / ``side.result`` may be None)."""
    lm = side.loaded
    out = list(lib.for_model(lm))
    if side.x is not None:
        x = side.x
        if choice is not None:
            def input_caveats():
                return lib.for_input(lm, x=x, image=sources.decoded_image(choice))
            out += compute.cached(("caveats-input", side.spec, choice.sha256), input_caveats)
        else:
            out += lib.for_input(lm, x=x)
    if side.result is not None:
        key = getattr(side, "key", None)
        result = side.result
        out += (compute.cached(("caveats-sweep", key), lambda: lib.for_sweep(result)) if key is not None
                else lib.for_sweep(result))
    return out


def _who(roles: List[str], n_sides: int) -> str:
    if len(roles) > 1 and len(roles) == n_sides:
        return "both models"
    return " and ".join(roles)


def render(sides, choice: Optional[sources.ImageChoice] = None) -> None:
    """One ``st.warning`` per caveat (shared ones once), and under an ``invert`` caveat a button that
    flips the image picker's "Invert the image" toggle (one button, whatever the number of caveats)."""
    merged: Dict[Tuple[str, str], Tuple[lib.Caveat, List[str]]] = {}
    for side in sides:
        for c in side_caveats(side, choice):
            merged.setdefault((c.kind, c.message), (c, []))[1].append(side.role)
    button = False
    for c, roles in merged.values():
        st.warning(f"**Caveat ({_who(roles, len(sides))})**: {c.message}", icon="⚠️")
        if c.fix == "invert" and not button and choice is not None and choice.invert_key:
            button = True
            st.button("Invert the image back" if choice.inverted else "Invert the image", key=INVERT_BUTTON_KEY,
                      on_click=sources.toggle_invert, args=(choice.invert_key,),
                      help="The same as the 'Invert the image' toggle in the sidebar: analyse the negative.")
