"""The attribution tab: a captum attribution of each model at the current shift, and its
un-shift-and-compare score. Placeholder until equishift.attribution lands."""
from __future__ import annotations

import streamlit as st


def render(sides, mode, shift, index) -> None:
    st.info("Attributions are not available in this build.")
