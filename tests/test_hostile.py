"""Hostile inputs within the limits (tests/hostile.py): each case, run in its own process, is a named
EquishiftError or a correct load, within TIME_LIMIT_S (10 s) and MEMORY_LIMIT (2 GiB of address space
above the child's imports, enforced with RLIMIT_AS), with a short message, and writes nothing outside
its temporary folder. The table in docs/security.md is generated from the same definitions."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hostile import CASES, CLASSES, MEMORY_LIMIT, TIME_LIMIT_S, run_isolated, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECURITY_DOC = ROOT / "docs" / "security.md"
START, END = "<!-- section:hostile-table -->", "<!-- /section:hostile-table -->"


@pytest.mark.parametrize("kind", list(CASES))
def test_hostile_case(kind, tmp_path):
    case = CASES[kind]
    folder = tmp_path / "case"
    o = run_isolated(case, folder)
    assert o.outcome in ("loaded", "refused"), (kind, o.outcome, o.message)
    if case.ok:
        assert o.outcome == "loaded", (kind, o.message)
    else:
        assert o.outcome == "refused" and case.error in o.message, (kind, o.message)
        assert "<_io." not in o.message and "Errno" not in o.message, (kind, o.message)
    assert not o.message.startswith("["), f"{kind}: the message echoes the input ({o.message})"
    assert o.seconds < TIME_LIMIT_S, (kind, o.seconds)
    assert o.peak_bytes < MEMORY_LIMIT, (kind, o.peak_bytes)
    # nothing written: the folder holds the input and the argument file only, its tmp/ stays empty
    assert list((folder / "tmp").iterdir()) == [], kind
    assert not (folder / "zoo").exists(), kind


def test_classes_cover_the_issue():
    for key in CLASSES:
        assert sum(c.cls == key for c in CASES.values()) >= 3, key
    kinds = set(CASES)
    for needed in ("png_exif_orientation6_rational_2MB", "png_exif_orientation6_rational_8MB",
                   "tiff_64x64_with_32768x32768_tile", "png16_gray_39.9MP_zeros", "image_fifo", "image_folder",
                   "image_dev_zero", "image_5000_char_path", "safetensors_header_nested_50000_deep",
                   "safetensors_fp8_tensor", "torch_nested_tensor", "torch_zip_pickle_inflates_to_1GiB",
                   "spec_of_1MB", "upload_pil_cannot_identify"):
        assert needed in kinds, needed


def test_security_doc_hostile_table_is_current():
    text = SECURITY_DOC.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    assert 0 <= start < end, f"{SECURITY_DOC} lacks {START} … {END}"
    assert text[start + len(START):end].strip() == table(), \
        "regenerate with: python tests/test_hostile.py --write"


def write_table() -> bool:
    text = SECURITY_DOC.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    new = text[:start + len(START)] + "\n" + table() + "\n" + text[end:]
    if new == text:
        return False
    SECURITY_DOC.write_text(new, encoding="utf-8")
    return True


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        print(f"{SECURITY_DOC}: {'rewritten' if write_table() else 'already current'}")
    else:
        print(table())


def test_an_upload_is_decoded_once_for_every_view(monkeypatch):
    """Thumbnail, both models' inputs (and the crop canvas) and the caveats all start from one decode:
    an upload that took 3 decodes per rerun now takes 1, and none on the reruns after it."""
    pytest.importorskip("streamlit")
    import io

    import numpy as np
    from PIL import Image

    import dashboard.sources as sources
    from app_harness import errors, open_page, tiny_zoo, top5_tables

    calls = []
    real = sources.load_image

    def counting(data, **kw):
        calls.append(kw.get("name"))
        return real(data, **kw)

    monkeypatch.setattr(sources, "load_image", counting)
    sources._decoded.clear()
    rgb = np.random.default_rng(5).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    with tiny_zoo() as pair:
        at = open_page(*pair)
        at.sidebar.radio(key="image_source").set_value("Upload").run()
        calls.clear()
        at.sidebar.file_uploader(key="image_upload").set_value(("decode-once.png", buf.getvalue(),
                                                                 "image/png")).run()
        assert not at.exception and errors(at) == [] and len(top5_tables(at)) == 2
        assert calls == ["decode-once.png"], calls
        at.sidebar.selectbox(key="shift_mode").set_value("crop").run()   # the canvas: another view
        assert not at.exception and len(top5_tables(at)) == 2
        assert calls == ["decode-once.png"], calls


def test_a_failing_decode_is_not_repeated_on_every_rerun(monkeypatch):
    """A file whose decode fails (after up to ~10 s: the decode time limit) raises the same named error
    again from a cache kept per file for 10 minutes, in every session, instead of decoding again."""
    pytest.importorskip("streamlit")
    import hashlib

    import dashboard.sources as sources
    from equishift.errors import ImageError

    calls = []

    def failing(data, **kw):
        calls.append(kw.get("name"))
        raise ImageError(f"{kw.get('name')}: decoding took longer than the decode time limit of 10 s")

    clock = [1000.0]
    monkeypatch.setattr(sources, "load_image", failing)
    monkeypatch.setattr(sources.time, "monotonic", lambda: clock[0])
    sources._decoded.clear()
    sources.clear_decode_failures()
    data = b"\x89PNG slow file"
    choice = sources.ImageChoice(data, "slow.png", hashlib.sha256(data).hexdigest(), uploaded=True)
    for _ in range(3):
        with pytest.raises(ImageError, match=r"^slow\.png: decoding took longer than the decode time limit"):
            sources.decoded_image(choice)
    assert calls == ["slow.png"]
    clock[0] += sources._FAILURE_TTL_S + 1            # after 10 minutes the file is tried again
    with pytest.raises(ImageError, match=r"^slow\.png: "):
        sources.decoded_image(choice)
    assert calls == ["slow.png"] * 2
    for i in range(sources._FAILURE_MAX + 5):         # bounded: the oldest failures are dropped
        other = sources.ImageChoice(data + bytes([i]), f"f{i}.png", f"{i:064x}", uploaded=True)
        with pytest.raises(ImageError):
            sources.decoded_image(other)
    assert len(sources._failures) == sources._FAILURE_MAX
    sources.clear_decode_failures()
