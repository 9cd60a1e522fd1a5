"""Sidebar choices turned into what the library takes: model specs, a shift mode, image bytes.

Nothing here loads a model; it builds spec strings (equishift.zoo's grammar) and hands back raw bytes, so
every failure happens later in one place and is shown as an ``st.error``. The one decode of an image is
``decoded_image``: the thumbnail, each model's input and the caveats all start from its result.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import streamlit as st

from equishift.errors import EquishiftError
from equishift.images import DEFAULT_MAX_BYTES, invert, load_image
from equishift.options import short
from equishift.zoo import list_models

__all__ = ["DEFAULT_BASELINE", "DEFAULT_ANCHORED", "SHIFT_MODES", "UPLOAD_TYPES", "ImageChoice",
           "sample_images", "default_sample", "model_picker", "mode_picker", "image_picker", "invert_key", "toggle_invert",
           "decoded_image", "upload_dir", "clean_uploads", "clean_stale_uploads"]

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
    """The spec of the timm boxes. The name and options boxes are parts of one spec string: an '@' typed
    there would start a weights path of its own (or an empty one), so it is refused. Options (also written
    after the name, ``NAME?img_size=64``) are checked by equishift.zoo.parse_spec like any spec's."""
    if "@" in name or "@" in options:
        raise EquishiftError("the timm name and constructor options boxes may not contain '@': a weights file "
                             "goes in its own box")
    query = "pretrained" if pretrained else options.strip().lstrip("?")
    return f"timm:{name.strip()}" + (f"?{query}" if query else "") + (f"@{path}" if path else "")


# --- the upload store --------------------------------------------------------------------------------
# Uploaded weights are written to a folder of this server process: made by mkdtemp (mode 0700, a name
# nobody can predict), checked on every use (a real folder, ours, private), and each file is checked
# again before it is handed out (see _verified). A fixed shared path such as <tmp>/equishift-uploads
# could be created, or filled, by another local user before the server starts.
_UPLOAD_DIR: Optional[Path] = None
# Uploaded weights: at most 100 MiB (2^20 bytes). Streamlit's own limit (.streamlit/config.toml,
# maxUploadSize = 105) is counted in decimal MB by the browser and in MiB by the server; 105 lets a file of
# exactly 100 MiB through both, and this limit, named in MiB, is the one a user meets.
UPLOAD_LIMIT_MIB = 100
_UPLOAD_PREFIX = "equishift-uploads-"
_UPLOAD_LOCK = threading.Lock()


def upload_dir() -> Path:
    """The private upload folder of this process (created on first use)."""
    global _UPLOAD_DIR
    with _UPLOAD_LOCK:
        if _UPLOAD_DIR is None:  # the pid in the name lets a later server remove it if this one is killed
            _UPLOAD_DIR = Path(tempfile.mkdtemp(prefix=f"{_UPLOAD_PREFIX}{os.getpid()}-"))
        d = Path(_UPLOAD_DIR)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)  # an OSError is reported by the caller, with the file
        _check_private(d)
        return d


def _check_private(d: Path) -> None:
    st = os.lstat(d)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise EquishiftError(f"the upload folder {d} is not a folder (a link or a file); refused")
    if st.st_uid != os.getuid():
        raise EquishiftError(f"the upload folder {d} belongs to another user (uid {st.st_uid}); refused")
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)  # ours: make it private before anything is written into it


def _verified(path: Path, sha256: str, size: int) -> bool:
    """True when ``path`` is a regular file (not a link) of this process's user holding exactly the bytes
    whose hash is ``sha256``: only then may an existing entry stand in for the upload."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # missing, a link (ELOOP), unreadable
        return False
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size != size:
        os.close(fd)  # (a folder, a FIFO, someone else's file, other bytes)
        return False
    with os.fdopen(fd, "rb") as f:
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() == sha256


def _fresh_folder(folder: Path) -> None:
    """``folder`` as a real folder of ours, whatever stood under its name (a link, a file) removed."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        folder.unlink()
        folder.mkdir(mode=0o700)
    elif st.st_uid != os.getuid():
        raise OSError(errno.EPERM, f"{folder.name} belongs to another user")


def _saved_upload(data: bytes, name: str) -> str:
    """Write an uploaded weights file as <sha256>/<its own name> in the upload folder: the same bytes give
    the same spec (a cache hit), and error messages name the file the user uploaded.

    An entry already there is returned only after _verified (our regular file, these exact bytes);
    anything else under that name is replaced. Each writer uses its own temporary file and an atomic
    rename, so two sessions uploading the same file at once never read (or rename) each other's
    half-written copy. Folders not used for a day are pruned (weights that are still loaded live in
    memory, not in the file)."""
    if len(data) > UPLOAD_LIMIT_MIB * 2 ** 20:
        raise EquishiftError(f"{short(Path(name).name, 80)} is {len(data) / 2 ** 20:.1f} MiB, over the upload limit of "
                             f"{UPLOAD_LIMIT_MIB} MiB; give a larger file by its path ('Local checkpoint')")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).lstrip(".")[:200] or "weights.safetensors"
    digest = hashlib.sha256(data).hexdigest()
    try:
        root = upload_dir()
        folder = root / digest[:32]
        path = folder / safe
        if _verified(path, digest, len(data)):
            try:
                os.utime(folder)  # in use: keep it through the next prune (best effort)
            except OSError:
                pass
            if _verified(path, digest, len(data)):  # (a prune elsewhere may have just removed it)
                return str(path)
        _fresh_folder(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)  # a folder planted under the file's name
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        where = _UPLOAD_DIR if _UPLOAD_DIR is not None else "the upload folder"
        raise EquishiftError(f"cannot store the uploaded file {short(name, 80)} in {where}: {e.strerror or e}"
                             ) from e
    _prune_uploads(keep=folder)
    return str(path)


def _prune_uploads(keep: Optional[Path] = None, max_age_s: float = 24 * 3600) -> None:
    """Remove upload folders untouched for ``max_age_s`` (best effort: a race with another session
    removing the same folder, or a file in use, is not an error)."""
    now = time.time()
    try:
        folders = list(upload_dir().iterdir())
    except (OSError, EquishiftError):
        return
    for d in folders:
        try:
            st = os.lstat(d)
            if d != keep and now - st.st_mtime > max_age_s:
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    d.unlink()
        except OSError:
            continue


def clean_uploads(max_age_s: Optional[float] = None) -> None:
    """Remove uploaded weights: all of them and the folder itself (``max_age_s=None``: when the server
    stops), or the entries untouched for ``max_age_s`` seconds (a periodic clean-up). Models already
    loaded are in memory and unaffected; a later upload makes a new folder."""
    global _UPLOAD_DIR
    if max_age_s is not None:
        if _UPLOAD_DIR is not None:  # (nothing uploaded yet: no folder to make just to look into)
            _prune_uploads(max_age_s=max_age_s)
        return
    with _UPLOAD_LOCK:
        d, _UPLOAD_DIR = _UPLOAD_DIR, None
    if d is not None:
        try:
            st = os.lstat(d)
        except OSError:
            return
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(d, ignore_errors=True)


def clean_stale_uploads() -> List[Path]:
    """Remove the upload folders of this user left in the temp dir by servers that no longer run (a server
    killed outright cannot clean up after itself); returns them. A folder whose process still runs, or
    that belongs to another user, is left alone."""
    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{_UPLOAD_PREFIX}*"):
        m = re.fullmatch(rf"{_UPLOAD_PREFIX}(\d+)-\w+", d.name)
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if m is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _process_exists(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, under another user
        return True
    return True


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
    try:
        if source == "timm name":
            return _timm_spec(name, options, pretrained=pretrained)
        if source == "Local checkpoint":
            path = st.sidebar.text_input("weights file (.safetensors or weights-only .pth)", key=f"{side}_path")
            return _timm_spec(name, options, path=path.strip()) if path.strip() else None
        up = st.sidebar.file_uploader(f"weights (.safetensors, ≤ {UPLOAD_LIMIT_MIB} MiB)", type=["safetensors"],
                                      key=f"{side}_upload")
        if up is None:
            return None
        _timm_spec(name, options)  # the boxes first: no upload is stored for a spec that cannot be
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
        up = st.sidebar.file_uploader(f"checkpoint (.pth, ≤ {UPLOAD_LIMIT_MIB} MiB)", type=["pth", "pt", "safetensors"],
                                      key=f"{side}_paper_up")
        if up is None:
            return None
        try:
            path = _saved_upload(up.getvalue(), up.name)
        except EquishiftError as e:
            st.sidebar.error(str(e))
            return None
    if not name.strip() or not path:
        return None
    if "@" in name or "@" in options:
        st.sidebar.error("the timm layout and constructor options boxes may not contain '@': the checkpoint goes "
                         "in its own box")
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
        up = st.sidebar.file_uploader(f"image (PNG, JPEG, WebP, BMP, TIFF, GIF first frame; ≤ {DEFAULT_MAX_BYTES // 2 ** 20} MiB)",
                                      key="image_upload")
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


@st.cache_resource(max_entries=2, ttl=600, show_spinner=False)
def _decoded(sha256: str, _data: bytes, _label: str):
    """``_data`` decoded to 8-bit RGB once per content hash, shared by every view and session (a failure
    is kept apart, by ``_decode``). Two entries at most, dropped after 10 minutes unused: a 40 MP image is
    160 MB decoded."""
    return load_image(_data, name=_label)


# A failing decode costs as much as a good one (up to the decode time limit, ~10 s) and fails the same way
# each time: its named error is kept per file (content hash and name: the message names the file) for
# every session, for 10 minutes, at most 64 files (a class and a short message each).
_FAILURE_TTL_S = 600.0
_FAILURE_MAX = 64
_failures: "OrderedDict[Tuple[str, str], Tuple[float, type, tuple]]" = OrderedDict()
_failures_lock = threading.Lock()


def clear_decode_failures() -> None:
    with _failures_lock:
        _failures.clear()


def _decode(sha256: str, data: bytes, label: str):
    key = (sha256, label)
    with _failures_lock:
        hit = _failures.get(key)
        if hit is not None and time.monotonic() - hit[0] >= _FAILURE_TTL_S:
            del _failures[key]
            hit = None
    if hit is not None:
        raise hit[1](*hit[2])
    try:
        return _decoded(sha256, data, label)
    except EquishiftError as e:
        with _failures_lock:
            _failures[key] = (time.monotonic(), type(e), e.args)
            _failures.move_to_end(key)
            while len(_failures) > _FAILURE_MAX:
                _failures.popitem(last=False)
        raise


def decoded_image(choice: "ImageChoice"):
    """The chosen image decoded (``equishift.images.load_image``), once per content: treat it as read-only
    (copy before changing it in place). A file that failed raises its error again, without decoding, for
    10 minutes."""
    return _decode(choice.sha256, choice.data, choice.label)


@st.cache_resource(max_entries=4, show_spinner=False)
def _inverted(sha256: str, _data: bytes, _label: str = "the image") -> bytes:
    """The negative of the file with this sha256 as PNG bytes, once per file (``_data`` is not hashed),
    made from the file's one decode."""
    import io

    buf = io.BytesIO()
    invert(_decode(sha256, _data, _label)).save(buf, format="PNG")
    return buf.getvalue()


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
        data = _inverted(choice.sha256, choice.data, choice.label)
    except EquishiftError:
        return choice  # unreadable: the page reports it when it decodes the file itself
    return ImageChoice(data, f"{choice.label} (inverted)", hashlib.sha256(data).hexdigest(), choice.uploaded,
                       inverted=True, invert_key=key)
