"""The ways around the weights checks, tried through the real dashboard page (AppTest): the constructor
options box (options that read files, out-of-range and oversized models, an '@' that would start a path)
and the upload store (weights planted beforehand under the upload's own folder name)."""
from __future__ import annotations

import hashlib
import io
import pickle
import re
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("streamlit")
sys.path.insert(0, str(Path(__file__).parent))

from app_harness import errors, open_page, tiny_zoo, top5_tables  # noqa: E402
from corpus_weights import TINY, _Payload  # noqa: E402

TINY_OPTIONS = "img_size=32&patch_size=4&embed_dim=32&depth=1&num_heads=2&num_classes=10"
PAGE_SECONDS = 10.0   # a refusal is decided before any model is built (or on the meta device)


@pytest.fixture(scope="module")
def specs():
    with tiny_zoo() as pair:
        yield pair


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    d = tmp_path_factory.mktemp("payload")
    marker = d / "PAYLOAD_RAN"
    path = d / "payload.pth"
    path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    yield path
    assert not marker.exists(), "the payload ran"


@pytest.fixture(scope="module")
def options_page(specs):
    at = open_page(*specs)
    at.sidebar.selectbox(key="anchored_source").set_value("timm name").run()
    at.sidebar.text_input(key="anchored_timm").set_value(TINY).run()
    at.sidebar.selectbox(key="anchored_wrap").set_value("no (weights already anchored)").run()
    return at


@pytest.mark.parametrize("options, words", [
    ("checkpoint_path={payload}", "not allowed here"),
    ("img_size=32&pretrained_cfg_overlay=file={payload}", "not allowed here"),
    ("cache_dir=/tmp", "not allowed here"),
    ("depth=100000", "depth=100000 is out of range"),
    ("embed_dim=8192&num_heads=64", "over the limit of 2.00 GiB"),
    ("img_size=1024&patch_size=2", "over the limit of 1.00 GiB"),
    ("act_layer=os.system", "unknown constructor option 'act_layer'"),
    ("num_classes=3@/etc/shadow", "may not contain '@'"),
    ("num_classes=3@", "may not contain '@'"),
])
def test_options_box_refusals(options_page, payload, options, words):
    at = options_page
    t0 = time.perf_counter()
    at.sidebar.text_input(key="anchored_options").set_value(options.format(payload=payload)).run()
    seconds = time.perf_counter() - t0
    assert not at.exception, at.exception
    msgs = errors(at)
    # One error names the problem; the sidebar refusals also leave the column's "choose a model" prompt.
    named = [m for m in msgs if words in m]
    assert len(named) == 1 and all(m in named or "Choose the anchored model" in m for m in msgs), msgs
    assert len(named[0]) < 1000, len(named[0])
    assert len(top5_tables(at)) == 1, "the baseline column still renders"
    assert seconds < PAGE_SECONDS, seconds


def test_options_box_in_range_loads(options_page):
    """In-range options load; a 3-class head beside the 10-class baseline draws every panel of the open
    tab (the logit curves: each model's own top-1)."""
    at = options_page
    at.sidebar.text_input(key="anchored_options").set_value(TINY_OPTIONS.replace("num_classes=10",
                                                                                 "num_classes=3")).run()
    assert not at.exception and errors(at) == [], errors(at)
    assert len(top5_tables(at)) == 2


def _safetensors(model) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def test_planted_upload_entry_is_not_returned(specs, tmp_path, monkeypatch):
    """Other weights of the same shape planted under <upload folder>/<sha of the upload>/<its name>: the
    page must load the uploaded tensors, not the planted ones."""
    import timm

    import dashboard.sources as sources
    from dashboard.compute import get_model

    folder = tmp_path / "uploads"
    monkeypatch.setattr(sources, "_UPLOAD_DIR", folder)
    kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    torch.manual_seed(0)
    mine = timm.create_model(TINY, **kw)
    torch.manual_seed(1)
    planted = timm.create_model(TINY, **kw)
    data = _safetensors(mine)
    entry = folder / hashlib.sha256(data).hexdigest()[:32]
    entry.mkdir(parents=True)
    (entry / "mine.safetensors").write_bytes(_safetensors(planted))

    at = open_page(*specs)
    at.sidebar.selectbox(key="anchored_source").set_value("Upload safetensors").run()
    at.sidebar.text_input(key="anchored_timm").set_value(TINY).run()
    at.sidebar.text_input(key="anchored_options").set_value(TINY_OPTIONS).run()
    at.sidebar.file_uploader(key="anchored_upload").upload("mine.safetensors", data, "application/octet-stream").run()
    at.sidebar.selectbox(key="anchored_wrap").set_value("no (weights already anchored)").run()
    assert not at.exception and errors(at) == [], errors(at)
    text = " ".join(c.value for c in at.sidebar.caption)
    spec = re.search(r"anchored spec: `([^`]+)`", text).group(1)
    state = get_model(spec).model.state_dict()
    for k, v in mine.state_dict().items():
        assert torch.equal(state[k].cpu(), v), k
    stored = entry / "mine.safetensors"
    assert stored.read_bytes() == data and not stored.is_symlink()
    assert (folder.stat().st_mode & 0o077) == 0


def test_the_payload_is_pickled_code():
    """The payload fixture's file really is pickled code (so the refusals above are meaningful)."""
    from equishift.checkpoint import pickle_globals

    buf = io.BytesIO(pickle.dumps({"state_dict": _Payload(Path("/nonexistent/x"))}))
    assert any("system" in g for g in pickle_globals(buf.getvalue()))
