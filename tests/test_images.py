"""load_image on a corpus of good and bad inputs (tests/corpus.py): pixels or a clear ImageError."""
from __future__ import annotations

import io
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image, ImageFile

from corpus import ImageCase, image_cases
from equishift.errors import ImageError
from equishift.images import DEFAULT_MAX_BYTES, SUPPORTED_FORMATS, load_image, sniff_format

CASES = image_cases()
BY_KIND = {c.kind: c for c in CASES}


def _check(case: ImageCase, image: Image.Image) -> None:
    assert image.mode == "RGB"
    out = np.asarray(image)
    assert out.shape == case.expected.shape, case.kind
    diff = np.abs(out.astype(np.int16) - case.expected.astype(np.int16))
    assert diff.max() <= case.atol, f"{case.kind}: max |diff| {diff.max()} > {case.atol}"
    mean_atol = case.atol if case.mean_atol is None else case.mean_atol
    assert diff.mean() <= mean_atol, f"{case.kind}: mean |diff| {diff.mean():.3f} > {mean_atol}"


def test_corpus_covers_the_required_kinds():
    required = {"empty", "random_bytes", "truncated_png", "truncated_jpeg", "png_bad_crc",
                "png_bomb_100000x100000", "one_by_one", "aspect_1x5000", "png16_gray", "gray_L",
                "gray_alpha_LA", "rgba_over_white", "palette_transparency", "cmyk_jpeg",
                "gif_animated_first_frame", "exif_orientation_6", "float_tiff_unit_range", "svg", "heic",
                "text_named_png", "huge_valid_png_8000x6000", "webp_lossless", "bmp", "tiff_lzw", "gif"}
    assert required <= set(BY_KIND), required - set(BY_KIND)
    assert len(BY_KIND) == len(CASES) >= 20
    assert sum(c.ok for c in CASES) >= 10 and sum(not c.ok for c in CASES) >= 10


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_corpus_case(case: ImageCase):
    if case.ok:
        _check(case, load_image(case.data, **case.load_kwargs))
    else:
        with pytest.raises(ImageError) as info:
            load_image(case.data, **case.load_kwargs)
        assert case.error in str(info.value)


def test_refused_formats_say_what_is_accepted():
    for kind in ("empty", "random_bytes", "text_named_png", "svg", "heic", "avif", "pdf"):
        with pytest.raises(ImageError, match=r"accepted: PNG, JPEG, WebP, BMP, TIFF, GIF \(first frame\)"):
            load_image(BY_KIND[kind].data)


def test_limits_are_named_with_their_values():
    with pytest.raises(ImageError, match=r"over the limit of 40,000,000 pixels \(max_pixels\)"):
        load_image(BY_KIND["huge_valid_png_8000x6000"].data)
    with pytest.raises(ImageError, match=r"max_bytes=100\b"):
        load_image(BY_KIND["png_rgb"].data, max_bytes=100)


def test_bombs_are_refused_before_any_decode_or_allocation(monkeypatch):
    """Every pixel decode goes through ImageFile.load, every image buffer through Image.core.new."""
    real_new = Image.core.new
    big_allocations, decodes = [], []

    def guarded_new(mode, size, *args):
        if size[0] * size[1] > 1_000_000:
            big_allocations.append(size)
        return real_new(mode, size, *args)

    def recorded_load(self):
        decodes.append(self.size)
        raise OSError("decoding is not allowed in this test")

    monkeypatch.setattr(Image.core, "new", guarded_new)
    monkeypatch.setattr(ImageFile.ImageFile, "load", recorded_load)
    Image.new("RGB", (2000, 1000), None)      # the guards are live: this allocation is seen
    with pytest.raises(ImageError):
        load_image(BY_KIND["png_rgb"].data)   # and so is this decode
    assert big_allocations == [(2000, 1000)] and decodes == [(40, 24)]
    big_allocations.clear(), decodes.clear()
    bombs = [c for c in CASES if "bomb" in c.kind or c.kind.startswith("huge_")]
    assert len(bombs) >= 6
    for case in bombs:
        start = time.perf_counter()
        with pytest.raises(ImageError, match="max_pixels"):
            load_image(case.data)
        assert time.perf_counter() - start < 1.0, case.kind
    assert big_allocations == [] and decodes == []


def test_huge_image_is_a_valid_png():
    """The 8000×6000 case is refused for its size, not for being broken: its pixel stream is complete."""
    data = BY_KIND["huge_valid_png_8000x6000"].data
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        if data[pos + 4:pos + 8] == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    d, total = zlib.decompressobj(), 0
    while idat:                               # in 1 MiB pieces: the raw rows are 144 MB
        total += len(d.decompress(idat, 1 << 20))
        idat = d.unconsumed_tail
    total += len(d.flush())
    assert d.eof and total == 6000 * (1 + 8000 * 3)


def test_pil_global_state_is_untouched():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for case in CASES:
        try:
            load_image(case.data, **case.load_kwargs)
        except ImageError:
            pass
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_sources_path_bytes_and_file_objects(tmp_path):
    case = BY_KIND["png_rgb"]
    path = tmp_path / "renamed.jpg"          # the name is irrelevant: the bytes say PNG
    path.write_bytes(case.data)
    _check(case, load_image(path))
    _check(case, load_image(str(path)))
    _check(case, load_image(bytearray(case.data)))
    _check(case, load_image(memoryview(case.data)))
    stream = io.BytesIO(case.data)
    stream.read()                             # an upload read once already is read again from the start
    _check(case, load_image(stream))
    with open(path, "rb") as f:
        _check(case, load_image(f))


class _Pipe(io.RawIOBase):
    """A non-seekable binary stream (a socket or pipe)."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        chunk = self._data.read(min(len(b), 1000))
        b[:len(chunk)] = chunk
        return len(chunk)


def test_non_seekable_stream_and_its_byte_limit():
    case = BY_KIND["png_rgb"]
    _check(case, load_image(io.BufferedReader(_Pipe(case.data))))
    with pytest.raises(ImageError, match="max_bytes=200"):
        load_image(io.BufferedReader(_Pipe(case.data)), max_bytes=200)


def test_bad_sources(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)
    (tmp_path / "a.png").write_bytes(BY_KIND["png_rgb"].data)
    with open(tmp_path / "a.png", "r", encoding="latin-1") as f:
        with pytest.raises(ImageError, match="text mode"):
            load_image(f)
    with pytest.raises(ImageError, match="pass a path, bytes or a binary file"):
        load_image(12345)


def test_file_over_the_byte_limit_is_refused_without_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    with open(path, "wb") as f:               # sparse: 100 MiB on paper, nothing written
        f.truncate(100 * 2**20)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    with pytest.raises(ImageError, match=r"100\.0 MiB, over the limit of 64\.0 MiB"):
        load_image(path)
    assert DEFAULT_MAX_BYTES == 64 * 2**20 and opened == []


def test_sniff_format_matches_the_encoder():
    for kind, fmt in (("png_rgb", "PNG"), ("jpeg", "JPEG"), ("webp_lossless", "WEBP"), ("bmp", "BMP"),
                      ("tiff_lzw", "TIFF"), ("gif", "GIF")):
        assert sniff_format(BY_KIND[kind].data[:64]) == fmt
    assert set(SUPPORTED_FORMATS) == {"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"}
    assert sniff_format(BY_KIND["heic"].data) is None


def test_threads_share_nothing():
    """Dashboard sessions load images concurrently: results must match the sequential ones."""
    picked = [c for c in CASES if c.kind in ("png_rgb", "rgba_over_white", "png16_gray", "cmyk_jpeg",
                                             "exif_orientation_6", "truncated_jpeg", "svg", "jpeg_bomb_9000x9000")]

    def run(case):
        try:
            return np.asarray(load_image(case.data)).copy()
        except ImageError as e:
            return str(e)

    sequential = [run(c) for c in picked]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(run, picked), sequential):
                assert type(got) is type(want)
                assert np.array_equal(got, want) if isinstance(want, np.ndarray) else got == want


_SEEDS = [BY_KIND[k].data for k in ("png_rgb", "jpeg", "webp_lossless", "bmp", "tiff_lzw",
                                     "gif_animated_first_frame", "png16_rgb", "cmyk_jpeg", "exif_orientation_6")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(_SEEDS), edits=st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.sampled_from("xdi")),
    min_size=1, max_size=6), cut=st.floats(0.05, 1.0))
def test_mutated_files_give_an_image_or_an_image_error(seed, edits, cut):
    """Flipped, deleted and inserted bytes plus truncation: never any exception but ImageError."""
    data = bytearray(seed[: max(1, int(len(seed) * cut))])
    for where, value, op in edits:
        i = int(where * len(data))
        if op == "x" and data:
            data[i] = value
        elif op == "d" and len(data) > 1:
            del data[i]
        else:
            data.insert(i, value)
    try:
        image = load_image(bytes(data))
    except ImageError as e:
        assert str(e)
    else:
        assert image.mode == "RGB" and image.width * image.height >= 1


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_own_exif_orientation_matches_pil(orientation, fmt):
    """The orientation read from the raw EXIF bytes turns the pixels exactly as PIL's exif_transpose
    (which parses and rewrites the whole EXIF block) for every orientation and format that carries it."""
    from PIL import ImageOps

    rgb = np.random.default_rng(orientation).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    kw = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else ({"lossless": True} if fmt == "WEBP" else {})
    Image.fromarray(rgb).save(buf, fmt, exif=exif, **kw)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    for isolate in (False, True):
        got = np.asarray(load_image(buf.getvalue(), isolate=isolate))
        assert got.shape == expected.shape and np.array_equal(got, expected), (fmt, orientation, isolate)


def test_worker_and_in_process_decodes_are_identical():
    """The worker process returns the same pixels as an in-process decode, for each conversion path."""
    for case in CASES:
        if case.ok and not case.load_kwargs:
            a = np.asarray(load_image(case.data, isolate=False))
            b = np.asarray(load_image(case.data, isolate=True))
            assert np.array_equal(a, b), case.kind
            if case.kind == "png_rgb":   # the one case checked for the time a worker costs
                t0 = time.perf_counter()
                load_image(case.data, isolate=False)
                t1 = time.perf_counter()
                load_image(case.data, isolate=True)
                t2 = time.perf_counter()
                assert t1 - t0 < t2 - t1 < 5.0


def test_peak_estimate_bounds_the_decode():
    """peak_bytes from the header: the decoded frame in its own storage plus the 4-byte RGB result
    (16-bit: 2 + 4 bytes per pixel), or twice the result (the EXIF turn), whichever is larger."""
    from equishift.images import peak_bytes

    with Image.open(io.BytesIO(BY_KIND["png16_gray"].data)) as im:
        assert peak_bytes(im) == 10 * 12 * max(2 + 4, 2 * 4)
    with Image.open(io.BytesIO(BY_KIND["png_rgb"].data)) as im:
        assert peak_bytes(im) == 40 * 24 * 8
    with pytest.raises(ImageError, match="max_decode_bytes"):
        load_image(BY_KIND["png_rgb"].data, max_decode_bytes=40 * 24 * 8 - 1)


def test_non_regular_paths_are_refused_before_opening(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.png")
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=r"pipe\.png: is a named pipe"):
        load_image(tmp_path / "pipe.png")
    with pytest.raises(ImageError, match="is a device"):
        load_image("/dev/zero")
    with pytest.raises(ImageError, match="path is too long") as e:
        load_image(tmp_path / ("x" * 5000 + ".png"))
    assert len(str(e.value)) < 400 and time.perf_counter() - t0 < 2.0


def _tiff_with(tags_extra) -> bytes:
    """A 16×16 8-bit grey uncompressed TIFF in one strip, plus ``tags_extra`` ((tag, type, count, 4 inline
    bytes), ...), which replace any tag of the same number."""
    pixels = bytes(range(256))
    tags = {256: (3, 1, struct.pack("<HH", 16, 0)), 257: (3, 1, struct.pack("<HH", 16, 0)),
            258: (3, 1, struct.pack("<HH", 8, 0)), 259: (3, 1, struct.pack("<HH", 1, 0)),
            262: (3, 1, struct.pack("<HH", 1, 0)), 273: (4, 1, None), 277: (3, 1, struct.pack("<HH", 1, 0)),
            278: (4, 1, struct.pack("<I", 16)), 279: (4, 1, struct.pack("<I", len(pixels)))}
    for tag, kind, count, raw in tags_extra:
        tags[tag] = (kind, count, raw)
    data_at = 8 + 2 + 12 * len(tags) + 4
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags))
    for tag in sorted(tags):
        kind, count, raw = tags[tag]
        out += struct.pack("<HHI", tag, kind, count) + (struct.pack("<I", data_at) if raw is None else raw)
    return out + struct.pack("<I", 0) + pixels


@pytest.mark.parametrize("label, extra", [
    ("TileWidth as text", [(322, 2, 2, b"x\x00\x00\x00"), (323, 3, 1, struct.pack("<HH", 16, 0))]),
    ("TileWidth 0", [(322, 3, 1, struct.pack("<HH", 0, 0)), (323, 3, 1, struct.pack("<HH", 16, 0))]),
    ("RowsPerStrip 0", [(278, 4, 1, struct.pack("<I", 0))]),
])
def test_tiff_tags_that_bound_nothing_are_refused(label, extra):
    """The tile/strip bound is computed from the tags before decoding; tags it cannot read as positive
    integers must refuse the file (naming it), not count as a bound of 0 bytes."""
    plain = np.asarray(load_image(_tiff_with([]), name="plain.tiff"))      # the builder is sound
    assert plain.shape == (16, 16, 3) and np.array_equal(plain[..., 0], np.arange(256).reshape(16, 16))
    with pytest.raises(ImageError, match=r"^odd\.tiff: the TIFF's tile, strip or sample tags .* cannot be "
                                         r"bounded; refused without decoding"):
        load_image(_tiff_with(extra), name="odd.tiff")
