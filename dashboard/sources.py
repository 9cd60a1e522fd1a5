"""Sidebar choices turned into what the library takes: model specs, a shift mode, image bytes.

Nothing here loads a model or decodes an image (except, when "Invert the image" is on, to make the
negative); it only builds spec strings (equishift.zoo's grammar) and hands back raw bytes, so every failure
happens later in one place and is shown as an ``st.error``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import streamlit as st

from equishift.errors import EquishiftError
from equishift.images import inverted_png
from equishift.zoo import list_models

__all__ = ["DEFAULT_BASELINE", "DEFAULT_ANCHORED", "SHIFT_MODES", "UPLOAD_TYPES", "ImageChoice",
           "sample_images", "default_sample", "model_picker", "mode_picker", "image_picker", "invert_key", "toggle_invert"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "zoo:fmnist-vit-baseline"
DEFAULT_ANCHORED = "zoo:fmnist-vit-anchored"
# Label shown -> equishift.shifts mode. "fractional" resamples sub-pixel shifts (bilinear, circular boundary).
SHIFT_MODES = {"circular": "circular", "zero-pad": "zero", "reflect": "reflect", "crop": "crop",
               "fractional (bilinear)": "bilinear", "fractional (Fourier)": "fourier"}
UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif"]
ANCHOR_MODES = ("full", "pos-only", "patch-only")
_SOURCES = ("Zoo", "timm name", "Local checkpoint", "Upload safetensors", "Paper checkpoint")
# Widgets whose value lives in the page URL too (?baseline_zoo=…&shift_mode=…): a view can be shared.
LINK = "query-params"
_UPLOAD_DIR = Path(tempfile.gettempdir()) / "equishift-uploads"


@dataclass(frozen=True)
class ImageChoice:
    """The image to analyse: its bytes, a label, its sha256 (the cache key) and whether it is an upload.

    ``inverted``: ``data`` is the negative of the chosen file (lossless PNG), so ``sha256`` differs from the
    file's and every cache keyed on it (inputs, sweeps) keeps the two apart. ``invert_key``: the session
    state key of the "Invert the image" toggle for this file (None when the picker did not draw one)."""

    data: bytes
    label: str
    sha256: str
    uploaded: bool
    inverted: bool = False
    invert_key: Optional[str] = None


def samples_dir() -> Path:
    """assets/images, or $EQUISHIFT_IMAGES_DIR (as $EQUISHIFT_ZOO_DIR overrides assets/models)."""
    env = os.environ.get("EQUISHIFT_IMAGES_DIR")
    return Path(env) if env else REPO / "assets" / "images"


def sample_images() -> List[Path]:
    """The shipped sample images, Fashion-MNIST ones first."""
    d = samples_dir()
    if not d.is_dir():
        return []
    files = [p for p in d.iterdir() if p.suffix.lower().lstrip(".") in UPLOAD_TYPES]
    return sorted(files, key=lambda p: (not p.name.startswith("fmnist"), p.name))


def default_sample() -> Optional[Path]:
    """The image the page opens on: an ankle boot if shipped (a shape with clear edges), else the first."""
    files = sample_images()
    boot = [p for p in files if "boot" in p.name]
    return (boot or files or [None])[0]


def _timm_spec(name: str, options: str, pretrained: bool = False, path: Optional[str] = None) -> str:
    query = "pretrained" if pretrained else options.strip().lstrip("?")
    return f"timm:{name.strip()}" + (f"?{query}" if query else "") + (f"@{path}" if path else "")


def _saved_upload(data: bytes, name: str) -> str:
    """Write an uploaded weights file as <sha256>/<its own name>: the same bytes give the same spec (a
    cache hit), and error messages name the file the user uploaded.

    Each writer uses its own temporary file and an atomic rename, so two sessions uploading the same
    file at once never read (or rename) each other's half-written copy. Folders not used for a day are
    pruned (weights that are still loaded live in memory, not in the file)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).lstrip(".") or "weights.safetensors"
    folder = _UPLOAD_DIR / hashlib.sha256(data).hexdigest()[:32]
    path = folder / safe
    try:
        if path.exists():
            try:
                os.utime(folder)  # in use: keep it through the next prune (best effort)
            except OSError:
                pass
            if path.exists():  # (a prune elsewhere may have just removed it: then write it again)
                return str(path)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise EquishiftError(f"cannot store the uploaded file {name!r} in {_UPLOAD_DIR}: {e.strerror or e}") from e
    _prune_uploads(keep=folder)
    return str(path)


def _prune_uploads(keep: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove upload folders untouched for ``max_age_s`` (best effort: a race with another session
    removing the same folder, or a file in use, is not an error)."""
    now = time.time()
    try:
        folders = list(_UPLOAD_DIR.iterdir())
    except OSError:
        return
    for d in folders:
        try:
            if d != keep and d.is_dir() and now - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            continue


def _source_spec(side: str, source: str, default_zoo: str) -> Optional[str]:
    """Spec for one source widget group; None when the user has not finished choosing."""
    if source == "Zoo":
        zoo = list_models()
        if not zoo:
            st.sidebar.warning("No shipped models found in assets/models.")
            return None
        index = zoo.index(default_zoo) if default_zoo in zoo else 0
        return st.sidebar.selectbox("Zoo model", zoo, index=index, key=f"{side}_zoo", bind=LINK)
    if source == "Paper checkpoint":
        return _paper_spec(side)
    name = st.sidebar.text_input("timm model name", value="vit_tiny_patch16_224", key=f"{side}_timm", bind=LINK,
                                 help="Any name from timm.list_models(), e.g. vit_small_patch16_224, "
                                      "deit_tiny_patch16_224, twins_svt_small.")
    if not name.strip():
        return None
    pretrained = source == "timm name" and st.sidebar.checkbox(
        "pretrained weights (Hugging Face cache; no download offline)", key=f"{side}_pretrained", bind=LINK)
    options = "" if pretrained else st.sidebar.text_input(
        "constructor options", value="", key=f"{side}_options", bind=LINK, placeholder="img_size=32&patch_size=4&num_classes=10",
        help="timm.create_model keyword arguments, key=value joined by &.")
    if source == "timm name":
        return _timm_spec(name, options, pretrained=pretrained)
    if source == "Local checkpoint":
        path = st.sidebar.text_input("weights file (.safetensors or weights-only .pth)", key=f"{side}_path")
        return _timm_spec(name, options, path=path.strip()) if path.strip() else None
    up = st.sidebar.file_uploader("weights (.safetensors)", type=["safetensors"], key=f"{side}_upload")
    if up is None:
        return None
    try:
        return _timm_spec(name, options, path=_saved_upload(up.getvalue(), up.name))
    except EquishiftError as e:
        st.sidebar.error(str(e))
        return None


def _paper_spec(side: str) -> Optional[str]:
    """``paper:ARCH:TIMM_NAME[?options]@PATH`` from a checkpoint of the paper's code (path or upload)."""
    from equishift.paper import ARCHS

    arch = st.sidebar.selectbox("paper architecture", list(ARCHS), key=f"{side}_paper_arch",
                                help="PolyViT, PolyTwins (PCPVT / SVT) or PolySwin as trained by the paper's code; "
                                     "the file is read without running pickled code.")
    default = {"polyvit": "vit_small_patch16_224", "polytwins-pcpvt": "twins_pcpvt_small",
               "polytwins-svt": "twins_svt_small", "polyswin": "swin_tiny_patch4_window7_224"}[arch]
    name = st.sidebar.text_input("timm layout", value=default, key=f"{side}_paper_timm_{arch}",
                                 help="The timm model the checkpoint was trained on (its config's MODEL.CARD).")
    options = st.sidebar.text_input("constructor options", value="", key=f"{side}_paper_options",
                                    placeholder="img_size=384",
                                    help="Only when the layout differs from the name's default.")
    how = st.sidebar.radio("checkpoint", ("path", "upload"), horizontal=True, key=f"{side}_paper_how")
    if how == "path":
        path = st.sidebar.text_input("checkpoint file (ckpt_epoch_N.pth)", key=f"{side}_paper_path").strip()
    else:
        up = st.sidebar.file_uploader("checkpoint (.pth)", type=["pth", "pt", "safetensors"], key=f"{side}_paper_up")
        if up is None:
            return None
        try:
            path = _saved_upload(up.getvalue(), up.name)
        except EquishiftError as e:
            st.sidebar.error(str(e))
            return None
    if not name.strip() or not path:
        return None
    query = f"?{options.strip()}" if options.strip() else ""
    return f"paper:{arch}:{name.strip()}{query}@{path}"


def model_picker() -> Tuple[Optional[str], Optional[str]]:
    """The two model specs (baseline, anchored); None for a side the user is still filling in."""
    st.sidebar.header("Models")
    st.sidebar.subheader("Baseline")
    b_source = st.sidebar.selectbox("source", _SOURCES, key="baseline_source", bind=LINK)
    baseline = _source_spec("baseline", b_source, DEFAULT_BASELINE)
    st.sidebar.subheader("Anchored")
    a_source = st.sidebar.selectbox("source", ("Zoo", "Anchorize the baseline") + _SOURCES[1:],
                                    key="anchored_source", bind=LINK)
    if a_source == "Anchorize the baseline":
        mode = st.sidebar.selectbox("anchoring", ANCHOR_MODES, key="anchored_mode", bind=LINK,
                                    help="full: the paper's model; pos-only: only the circular conv "
                                         "position encoding; patch-only: only the anchor before the patch "
                                         "embedding. New position convs start as the identity (untrained).")
        anchored = f"anchored[{mode}]:{baseline}" if baseline else None
    else:
        anchored = _source_spec("anchored", a_source, DEFAULT_ANCHORED)
        if anchored and a_source not in ("Zoo", "Paper checkpoint"):
            wrap = st.sidebar.selectbox("anchorize it", ANCHOR_MODES + ("no (weights already anchored)",),
                                        key="anchored_wrap", bind=LINK)
            if wrap in ANCHOR_MODES:
                anchored = f"anchored[{wrap}]:{anchored}"
    for label, spec in (("baseline", baseline), ("anchored", anchored)):
        if spec:
            st.sidebar.caption(f"{label} spec: `{spec}`")
    return baseline, anchored


def mode_picker() -> str:
    """The equishift.shifts mode the user picked."""
    label = st.sidebar.selectbox("Shift mode", list(SHIFT_MODES), key="shift_mode", bind=LINK,
                                 help="circular: torch.roll; zero-pad / reflect: content moves, the new "
                                      "border is black / mirrored; crop: the window moves over a larger "
                                      "canvas of the image (the realistic shift); fractional: sub-pixel.")
    return SHIFT_MODES[label]


def image_picker() -> Optional[ImageChoice]:
    """The chosen image's bytes (a sample or an upload); None when there is nothing to show."""
    st.sidebar.header("Image")
    from dashboard.dataset_page import linked_choice  # a gallery link of the Dataset page: ?dataset_image=

    linked = linked_choice()
    if linked is not None:
        return linked
    source = st.sidebar.radio("image source", ("Sample", "Upload"), horizontal=True, key="image_source",
                              label_visibility="collapsed")
    if source == "Upload":
        # No type= filter: Streamlit would refuse other extensions with a bare "file type not allowed";
        # equishift.images decides from the bytes and names the problem (e.g. SVG, HEIC, a text file).
        up = st.sidebar.file_uploader("image (PNG, JPEG, WebP, BMP, TIFF, GIF first frame)", key="image_upload")
        if up is not None:
            data = up.getvalue()
            return _invert_option(ImageChoice(data, up.name, hashlib.sha256(data).hexdigest(), uploaded=True))
        st.sidebar.info("Upload an image; the sample below is shown meanwhile.")
    files = sample_images()
    if not files:
        return None
    default = default_sample()
    path = st.sidebar.selectbox("sample", files, index=files.index(default), key="image_sample", bind=LINK,
                                format_func=lambda p: p.name) if source == "Sample" else default
    data = path.read_bytes()
    return _invert_option(ImageChoice(data, path.name, hashlib.sha256(data).hexdigest(), uploaded=False))


def invert_key(sha256: str) -> str:
    """Session state key of the invert toggle of the file with this sha256: one per file, so the choice
    survives reruns and a newly chosen image starts as it is."""
    return f"image_invert_{sha256[:16]}"


def toggle_invert(key: str) -> None:
    """Flip the invert toggle ``key`` (an on_click callback: it runs before the picker draws the toggle)."""
    st.session_state[key] = not st.session_state.get(key, False)


@st.cache_resource(max_entries=4, show_spinner=False)
def _inverted(sha256: str, _data: bytes) -> bytes:
    """The negative of the file with this sha256 as PNG bytes, once per file (``_data`` is not hashed)."""
    return inverted_png(_data)


def _invert_option(choice: ImageChoice) -> ImageChoice:
    """The "Invert the image" toggle under the image choice, and the choice it makes: the file itself, or
    its negative (a light background made dark, as the Fashion-MNIST models expect)."""
    key = invert_key(choice.sha256)
    on = st.sidebar.toggle("Invert the image", key=key,
                           help="Analyse the negative (255 − each pixel): a garment photographed on a light "
                                "background becomes light on black, as in Fashion-MNIST.")
    choice = dataclasses.replace(choice, invert_key=key)
    if not on:
        return choice
    try:
        data = _inverted(choice.sha256, choice.data)
    except EquishiftError:
        return choice  # unreadable: the page reports it when it decodes the file itself
    return ImageChoice(data, f"{choice.label} (inverted)", hashlib.sha256(data).hexdigest(), choice.uploaded,
                       inverted=True, invert_key=key)
