"""Both hardening corpora (tests/corpus.py) pushed through the real dashboard with AppTest.

Images: every kind is uploaded through the sidebar's image uploader, in ONE page session (a warm rerun
takes ~0.2 s, so all ~47 kinds cost about 15 s). A good image must be analysed (its own size in the
preprocessing panel, both model columns drawn); a bad one must be one ``st.error`` naming the file and
the problem, with the page still working on the fallback sample. Checkpoints: every kind through both
checkpoint paths of the sidebar (a local path, and the safetensors uploader); a bad file is one
``st.error`` naming the problem while the baseline column still renders; a good one loads the file's
exact tensors; no code payload ever runs (its marker file never appears).

Cases with ``load_kwargs`` test a limit argument the page does not expose (it uses the defaults), so they
are left out here. ``python tests/test_app_corpus.py`` prints the input kind → behaviour table of
docs/security.md, ``python tests/test_app_corpus.py --write`` rewrites it there (between the
``input-table`` markers), and ``test_security_doc_table_is_current`` keeps the two in step.
"""
from __future__ import annotations

import functools
import hashlib
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("streamlit")
sys.path.insert(0, str(Path(__file__).parent))

from app_harness import ROOT, errors, image_captions, model_warnings, open_page, tiny_zoo, top5_tables  # noqa: E402
from corpus import checkpoint_cases, image_cases  # noqa: E402

# The sidebar's timm name and constructor options for the corpus' tiny_vit().
TINY_VIT_NAME = "vit_tiny_patch16_224"
TINY_VIT_OPTIONS = "img_size=32&patch_size=4&embed_dim=32&depth=1&num_heads=2"
NO_WRAP = "no (weights already anchored)"  # load the file as it is, without anchorize



@functools.lru_cache(maxsize=1)
def _all_images():
    return image_cases()  # built once per process: the corpus takes seconds to encode


def _app_images():
    return [c for c in _all_images() if not c.load_kwargs]


def _ckpt_kinds():
    import tempfile

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [c.kind for c in checkpoint_cases(Path(d)) if not c.load_kwargs]


def _upload_name(filename: str) -> str:
    """The name to upload under: the file's own. The uploader has no ``type=`` filter, so SVG, HEIC, PDF
    or a text file reach equishift.images, which decides from the bytes and names the problem."""
    return filename


# --- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def specs():
    with tiny_zoo() as pair:
        yield pair


@pytest.fixture(scope="module")
def upload_page(specs):
    at = open_page(*specs)
    assert not at.exception, at.exception
    assert errors(at) == [] and len(top5_tables(at)) == 2
    at.sidebar.radio(key="image_source").set_value("Upload").run()
    return at


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = checkpoint_cases(tmp_path_factory.mktemp("ckpt"))
    return {c.kind: c for c in cases if not c.load_kwargs}


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory):
    """Uploaded weights go to a private folder, not the shared /tmp/equishift-uploads."""
    import dashboard.sources as sources

    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("uploads")
    mp.setattr(sources, "_UPLOAD_DIR", d, raising=True)
    yield d
    mp.undo()


# --- images ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [c.kind for c in _app_images()])
def test_image_kind_through_the_uploader(upload_page, kind):
    case = next(c for c in _app_images() if c.kind == kind)
    at = upload_page
    name = _upload_name(case.filename)
    at.sidebar.file_uploader(key="image_upload").set_value((name, case.data, case.mime)).run()
    assert not at.exception, f"{kind}: the page crashed: {at.exception[0].value}"
    assert len(top5_tables(at)) == 2, f"{kind}: both model columns must still render"
    assert at.sidebar.file_uploader(key="image_upload") is not None  # the uploader is still there
    if case.ok:
        assert errors(at) == [], (kind, errors(at))
        h, w = case.expected.shape[:2]
        assert any(f"**{name}**" in e.label for e in at.expander), kind  # the image the page analyses
        originals = [c for c in image_captions(at) if c.startswith("original · ")]
        assert originals in ([], [f"original · {w}×{h} RGB"]), (kind, originals)  # [] if the box is closed
    else:
        msgs = errors(at)
        assert len(msgs) == 1, (kind, msgs)
        assert name in msgs[0] and case.error in msgs[0], (kind, msgs[0])
        assert any("instead" in i.value for i in at.info), kind  # the fallback sample is analysed


# --- checkpoints -------------------------------------------------------------------------------------
def _anchored_spec(at) -> str:
    text = " ".join(c.value for c in at.sidebar.caption)
    m = re.search(r"anchored spec: `([^`]+)`", text)
    assert m, text
    return m.group(1)


def _expect_checkpoint(at, case, shown_name: str) -> None:
    assert not at.exception, f"{case.kind}: the page crashed: {at.exception[0].value}"
    if case.marker is not None:
        assert not case.marker.exists(), f"{case.kind}: the payload RAN (marker {case.marker} exists)"
    msgs = errors(at)
    refused = case.error or (case.apply_error if "another architecture" in (case.apply_error or "") else None)
    if refused:
        assert len(msgs) == 1, (case.kind, msgs)
        assert "Could not load the anchored model" in msgs[0] and refused in msgs[0], (case.kind, msgs[0])
        assert shown_name in msgs[0], (case.kind, msgs[0])
        assert len(top5_tables(at)) == 1, f"{case.kind}: the baseline column must still render"
        return
    # It loads: both columns render and the app's cached model holds exactly the file's tensors.
    # (wrong_shapes_head loads too: the zoo reads num_classes = 7 from the file's classifier.)
    assert msgs == [], (case.kind, msgs)
    assert len(top5_tables(at)) == 2, case.kind
    shown = model_warnings(at)
    if case.warning:  # loaded but suspicious (NaN/Inf): the page says so, naming the tensor
        assert len(shown) == 1 and "anchored model" in shown[0] and case.warning in shown[0], (case.kind, shown)
    else:
        assert shown == [], (case.kind, shown)
    from dashboard.compute import get_model

    state = get_model(_anchored_spec(at)).model.state_dict()
    if case.reference is not None:
        assert state.keys() == case.reference.keys()
        for k, v in case.reference.items():  # nan_to_num: NaN != NaN, and the NaN case must match too
            assert torch.equal(state[k].cpu().nan_to_num(), v.nan_to_num()), (case.kind, k)


@pytest.fixture(scope="module")
def path_page(specs):
    at = open_page(*specs)
    at.sidebar.selectbox(key="anchored_source").set_value("Local checkpoint").run()
    at.sidebar.text_input(key="anchored_timm").set_value(TINY_VIT_NAME).run()
    at.sidebar.text_input(key="anchored_options").set_value(TINY_VIT_OPTIONS).run()
    at.sidebar.text_input(key="anchored_path").set_value("/nonexistent/warm-up.safetensors").run()
    at.sidebar.selectbox(key="anchored_wrap").set_value(NO_WRAP).run()
    return at


@pytest.fixture(scope="module")
def ckpt_upload_page(specs, upload_dir):
    at = open_page(*specs)
    at.sidebar.selectbox(key="anchored_source").set_value("Upload safetensors").run()
    at.sidebar.text_input(key="anchored_timm").set_value(TINY_VIT_NAME).run()
    at.sidebar.text_input(key="anchored_options").set_value(TINY_VIT_OPTIONS).run()
    return at


@pytest.mark.filterwarnings("ignore::UserWarning")  # the NaN/Inf case warns (CheckpointWarning)
@pytest.mark.parametrize("kind", _ckpt_kinds())
def test_checkpoint_kind_through_a_local_path(path_page, ckpts, kind):
    case = ckpts[kind]
    at = path_page
    at.sidebar.text_input(key="anchored_path").set_value(str(case.path)).run()
    if at.sidebar.selectbox(key="anchored_wrap").value != NO_WRAP:
        at.sidebar.selectbox(key="anchored_wrap").set_value(NO_WRAP).run()
    _expect_checkpoint(at, case, case.path.name)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", [k for k in _ckpt_kinds() if k != "not_found"])
def test_checkpoint_kind_through_the_upload(ckpt_upload_page, ckpts, upload_dir, kind):
    """Uploaded under a .safetensors name whatever it holds: the content decides (a weights-only
    torch.save file loads, pickled code is refused unread), exactly as for a local path."""
    case = ckpts[kind]
    at = ckpt_upload_page
    data = case.path.read_bytes()
    name = case.path.name.rsplit(".", 1)[0] + ".safetensors"
    at.sidebar.file_uploader(key="anchored_upload").set_value((name, data, "application/octet-stream")).run()
    if at.sidebar.selectbox(key="anchored_wrap").value != NO_WRAP:
        at.sidebar.selectbox(key="anchored_wrap").set_value(NO_WRAP).run()
    stored = hashlib.sha256(data).hexdigest()[:32]  # the page stores uploads under a content hash
    _expect_checkpoint(at, case, name if name in " ".join(errors(at)) else stored)
    assert [p for p in upload_dir.rglob("*") if stored in str(p)], "the upload was not stored privately"


def test_no_payload_ever_ran(ckpts):
    """Runs last in this module: after both paths, no marker of any code payload exists."""
    markers = [c.marker for c in ckpts.values() if c.marker is not None]
    assert len(markers) >= 4
    assert not [m for m in markers if m.exists()]


# --- the table in docs/security.md ---------------------------------------------------------------------
SECURITY_DOC = ROOT / "docs" / "security.md"
TABLE_START, TABLE_END = "<!-- section:input-table -->", "<!-- /section:input-table -->"


def behaviour_table() -> str:
    """Markdown table, input kind → behaviour, for both corpora; every row is checked against the real
    loaders while it is generated (an outcome the code does not produce raises AssertionError)."""
    import tempfile

    from equishift.checkpoint import apply_weights, load_weights
    from equishift.errors import EquishiftError
    from equishift.images import load_image
    from corpus import tiny_vit

    lines = ["| input (image upload) | library (`load_image`) | dashboard |", "|---|---|---|"]
    for c in _all_images():
        try:
            img = load_image(c.data, **c.load_kwargs)
            assert c.ok, c.kind
            lib = f"loads, {img.width}×{img.height} RGB"
            app = "analysed" if not c.load_kwargs else "analysed (page uses the default limits)"
        except EquishiftError as e:
            assert c.error and c.error in str(e), (c.kind, str(e))
            lib = f"refused: “{c.error}”"
            app = ("st.error naming the file; sample shown instead" if not c.load_kwargs
                   else "analysed (page uses the default limits)")
        lines.append(f"| `{c.kind}` | {lib} | {app} |")
    lines += ["", "| input (weights file) | library (`load_weights` / `apply_weights`) | dashboard |",
              "|---|---|---|"]
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for c in checkpoint_cases(Path(d)):
            caught.clear()
            try:
                state = load_weights(c.path, **c.load_kwargs)
            except EquishiftError as e:
                assert c.error and c.error in str(e), (c.kind, str(e))
                lib, app = f"refused: “{c.error}”", "st.error naming the problem; baseline still shown"
                if c.marker is not None:
                    assert not c.marker.exists(), c.kind
                    lib += " (payload never runs)"
            else:
                assert c.error is None, c.kind
                lib, app = f"loads ({len(state)} tensors)", "loads"
                if caught:
                    assert c.warning and c.warning in str(caught[0].message), c.kind
                    lib += f"; warns “{c.warning}”"
                    app = "loads; st.warning naming the tensors"
                if c.apply_error:
                    try:
                        apply_weights(tiny_vit(), state)
                        raise AssertionError(c.kind)
                    except EquishiftError as e:
                        assert c.apply_error in str(e), (c.kind, str(e))
                    lib += f"; `apply_weights` refuses: “{c.apply_error}”"
                    app = ("st.error naming the problem; baseline still shown" if "architecture" in c.apply_error
                           else "loads (num_classes read from the file)")
            if c.load_kwargs:
                app = "— (page uses the default limits)"
            lines.append(f"| `{c.kind}` | {lib} | {app} |")
    return "\n".join(lines)


def _table_span(text: str) -> tuple:
    """(start, end) of the text between the input-table markers of docs/security.md."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    assert 0 <= start < end, f"{SECURITY_DOC} lacks the markers {TABLE_START} … {TABLE_END}"
    return start + len(TABLE_START), end


def write_table() -> bool:
    """Rewrite the table between the markers of docs/security.md; True when the file changed."""
    text = SECURITY_DOC.read_text(encoding="utf-8")
    start, end = _table_span(text)
    new = text[:start] + "\n" + behaviour_table() + "\n" + text[end:]
    if new == text:
        return False
    SECURITY_DOC.write_text(new, encoding="utf-8")
    return True


def test_security_doc_table_is_current():
    text = SECURITY_DOC.read_text(encoding="utf-8")
    start, end = _table_span(text)
    assert behaviour_table() in text[start:end], "regenerate with: python tests/test_app_corpus.py --write"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        print(f"{SECURITY_DOC}: {'rewritten' if write_table() else 'already current'}")
    elif sys.argv[1:]:
        sys.exit("usage: python tests/test_app_corpus.py [--write]")
    else:
        print(behaviour_table())
