"""equishift dashboard: where and why a vision transformer breaks under a shift, baseline | anchored.

Run:  streamlit run dashboard/app.py   (or: bash run.sh dashboard)

Layout only. Models come from equishift.zoo, images from equishift.images, sweeps from equishift.sweep,
numbers from equishift.metrics, figures from equishift.plots, the report zip from equishift.report.
The sweep runs once per (model, image, shift mode, grid) and is cached; moving the shift only re-draws.
Two pages (st.navigation): "Single image" (dashboard.session) and "Dataset" (dashboard.dataset_page).
"""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `streamlit run` puts dashboard/ on the path, not the repository
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="equishift — shift diagnostics", layout="wide")
# Less empty space above the title: the live view and the open tab's figure then fit one 1200-px screen.
st.html("<style>[data-testid='stMainBlockContainer'] { padding-top: 2.5rem; }</style>")

from dashboard import dataset_page, session  # noqa: E402

# The sidebar's model choices are widgets of each page; a widget's state is dropped on a page that does not
# draw it, so it is handed over here (file uploaders and buttons cannot be set, and keep their own state).
for _key in [k for k in st.session_state if str(k).startswith(("baseline_", "anchored_"))]:
    if not str(_key).endswith(("_upload", "_paper_up")):
        st.session_state[_key] = st.session_state[_key]

st.navigation([st.Page(session.main, title="Single image", url_path="single", default=True),
               st.Page(dataset_page.main, title="Dataset", url_path="dataset")]).run()
