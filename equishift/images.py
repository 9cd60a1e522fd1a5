"""One safe path from an untrusted image (a path, bytes or an upload) to an 8-bit RGB ``PIL.Image``.

Used by the dashboard (uploads) and the CLI alike, so that both accept and refuse the same files with the
same messages. The rules, in order:

1. Size in bytes: refused above ``max_bytes`` before decoding (a file object is read at most one byte past
   the limit).
2. Format, sniffed from the first bytes (never from the file name): PNG, JPEG, WebP, BMP, TIFF and GIF are
   accepted (``SUPPORTED_FORMATS``); SVG, HEIC/HEIF, AVIF, PDF, ... are refused with a hint to export a PNG;
   text and unknown bytes are refused. Only the sniffed format's decoder is ever run, so PIL's riskier
   plugins (e.g. EPS, which calls Ghostscript) are unreachable.
3. Size in pixels: read from the header and refused above ``max_pixels`` BEFORE any pixel is decoded or
   any image buffer allocated — a decompression bomb costs a header read. PNG and WebP headers are read
   here, before ``Image.open`` (PIL's WebP plugin creates its decoder inside ``open``); the other formats
   through ``Image.open``, which is lazy. Huge valid images are refused the same way (not downscaled): the
   message names the size and the limit. ``PIL.Image.MAX_IMAGE_PIXELS`` is global and is never changed
   here; PIL's own refusal (``DecompressionBombError``, above 2 × that value) is reported as the same
   ``ImageError``. For a JPEG/GIF/TIFF/BMP header between 1× and 2× PIL's limit PIL may emit its
   ``DecompressionBombWarning`` before we refuse the file: silencing it would need ``warnings``' global
   filters, which other threads share.
4. Cost of the decode, from the header: only regular files are read (a FIFO, device or folder is refused
   from ``stat``); the peak memory (``peak_bytes``: decoded frame + RGB result, or the largest TIFF tile
   or strip buffer) is refused above ``max_decode_bytes``; large images (``ISOLATE_PIXELS``,
   ``ISOLATE_BYTES``) are decoded in a worker process with a time limit and an address-space limit.
5. Decode fully (truncated or corrupt files fail here, PNG chunk CRCs are verified first), convert to RGB
   one band of rows at a time, then apply the EXIF orientation, read from the first IFD of the raw EXIF
   bytes (PIL's ``exif_transpose`` parses and rewrites the whole block: quadratic in its size):
   - GIF (and animated PNG/WebP): the first frame;
   - transparency (RGBA, LA, PA, palette or colour-key transparency) is composited over ``BACKGROUND``
     (white);
   - 16-bit (``I;16*``) and 32-bit integer (``I``, treated as 16-bit as PNG/TIFF decode them) samples are
     scaled to 8 bits by ``round(v / 257)`` (values outside 0..65535 are clipped);
   - float (``F``, e.g. float TIFF): values in [0, 1] are scaled by 255, values in [0, 255] are rounded;
     NaN/Inf or values outside [0, 255] are refused, since any rescaling would be a guess;
   - CMYK is converted with PIL's formula, grayscale and bilevel are replicated to three channels; LAB and
     HSV (TIFF) are refused;
   - embedded ICC profiles are ignored, as timm/torchvision data loaders ignore them: the model sees the
     pixel values it would have seen in training.
"""
from __future__ import annotations

import io
import os
import re
import stat
import struct
import subprocess
import sys
import threading
import zlib
from typing import BinaryIO, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from equishift.errors import ImageError, shorten
from equishift.files import human_bytes as _human, not_regular as _not_regular, os_problem as _os_problem

__all__ = ["SUPPORTED_FORMATS", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_DECODE_BYTES",
           "DEFAULT_TIME_LIMIT_S", "BACKGROUND", "load_image", "peak_bytes", "exif_orientation", "sniff_format",
           "invert", "inverted_png"]

SUPPORTED_FORMATS: Tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# A 48 MP phone photo is refused, 12/24 MP accepted. The 8-bit RGB result of a 40 MP image is 160 MB (PIL
# keeps RGB at 4 bytes per pixel); decoding it peaks at ~200-330 MB (measured: bench/hostile_inputs.py).
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Peak memory of one decode, estimated from the header before anything is allocated (``peak_bytes``):
# a 40 MP RGB image with an EXIF rotation needs 2 × 160 MB, a 40 MP 16-bit grey one 80 + 160 MB.
DEFAULT_MAX_DECODE_BYTES = 512 * 1024 * 1024
DEFAULT_TIME_LIMIT_S = 10.0        # wall clock of an isolated decode (a 40 MP PNG takes ~1-2 s)
ISOLATE_PIXELS = 4_000_000         # load_image(isolate=None) decodes images this large in a worker process
ISOLATE_BYTES = 8 * 1024 * 1024    # ... and files this large, whatever their header says
# A progressive JPEG decodes every pixel once per scan, and nothing bounds the number of scans: beyond
# this size (pixels or bytes) it is decoded in the worker too.
ISOLATE_PROGRESSIVE = 256 * 1024
MAX_PNG_CHUNKS = 100_000
WORKER_BASE_BYTES = 1024 * 1024 * 1024   # the worker's address space beyond the decode: Python, NumPy, PIL
BACKGROUND = (255, 255, 255)       # transparency is composited over white

_ACCEPTED = "accepted: PNG, JPEG, WebP, BMP, TIFF, GIF (first frame)"

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

# (magic prefix, format name) for files we recognise but do not decode; the hint says what to do.
_UNSUPPORTED_MAGIC = (
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"8BPS", "Photoshop (PSD)"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"qoif", "QOI"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"II\xbc", "JPEG XR"),
    (b"\x1f\x8b", "gzip (e.g. SVGZ)"),
    (b"PK\x03\x04", "ZIP archive"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"heif"}
_AVIF_BRANDS = {b"avif", b"avis"}


def sniff_format(head: bytes) -> Optional[str]:
    """The supported format the first bytes belong to (a ``SUPPORTED_FORMATS`` name), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def _unsupported_reason(head: bytes) -> str:
    """Why bytes that are not a supported format are refused: a named format with a hint, text, or unknown."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AVIF_BRANDS:
            return "AVIF is not supported, export it as PNG or JPEG"
        if brand in _HEIF_BRANDS:
            return "HEIC/HEIF is not supported, export it as PNG or JPEG (e.g. 'Most Compatible' on iOS)"
        return "an ISO media file (video or HEIF-like) is not an image we can read, export it as PNG"
    for magic, name in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return f"{name} is not supported, export it as PNG"
    text = _as_text(head)
    if text is not None:
        lowered = text.lower()
        if "<svg" in lowered or lowered.lstrip().startswith("<?xml"):
            return "SVG is not supported, export it as PNG"
        return "this is a text file, not an image"
    return "not a recognised image (the first bytes match no supported format)"


def _as_text(head: bytes) -> Optional[str]:
    """The head decoded as text when it looks like text (UTF-8/16 without control bytes), else None."""
    for bom, codec in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if head.startswith(bom):
            return head[len(bom):].decode(codec, errors="ignore")
    # The head may end inside a multi-byte character: allow up to 3 bytes cut off at the very end.
    for cut in range(4):
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    if any(ord(ch) < 32 and ch not in "\t\n\r\f" for ch in text):
        return None
    return text


def _read_source(source: ImageSource, max_bytes: int) -> Tuple[bytes, str]:
    """The raw bytes and a display name; the byte limit is enforced before (path) or while (stream) reading."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = "the image"
        exact = True
    elif isinstance(source, (str, os.PathLike)):
        data, name = _read_path(os.fspath(source), max_bytes)
        exact = False
    elif hasattr(source, "read"):
        name = shorten(os.path.basename(str(getattr(source, "name", "") or "")) or "the upload", 80)
        exact = False
        # PIL reads file objects from the start; do the same so a re-read upload is not "empty".
        if getattr(source, "seekable", lambda: False)():
            source.seek(0)
        data = source.read(max_bytes + 1)
        if isinstance(data, str):
            raise ImageError(f"{name}: opened in text mode; pass a binary file (open(path, 'rb')) or bytes")
        data = bytes(data)
    else:
        raise ImageError(f"cannot read an image from a {type(source).__name__}; pass a path, bytes or a "
                         "binary file object")
    if len(data) > max_bytes:
        raise ImageError(_too_many_bytes(name, len(data), max_bytes, at_least=not exact))
    return data, name


def _read_path(path: Union[str, bytes], max_bytes: int) -> Tuple[bytes, str]:
    """A regular file's bytes. A FIFO, a device, a socket or a folder is refused from ``stat`` before it
    is opened (reading a FIFO waits forever, /dev/zero never ends); the open is non-blocking and the
    opened file is checked again, in case the path was swapped in between."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    shown = shorten(path, 120)
    name = shorten(os.path.basename(path) or path, 80)
    if not path:
        raise ImageError("an empty path was given; pass the path of an image file")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found ({shown})") from None
    except OSError as e:
        raise ImageError(f"{name}: {_os_problem(e)} ({shown})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{name}: {_not_regular(st.st_mode)}, not an image file ({shown})")
    if st.st_size > max_bytes:
        raise ImageError(_too_many_bytes(name, st.st_size, max_bytes))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise ImageError(f"{name}: cannot be read ({_os_problem(e)})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(f"{name}: is not a regular file (it changed while being opened)")
        try:
            return f.read(max_bytes + 1), name
        except OSError as e:
            raise ImageError(f"{name}: cannot be read ({_os_problem(e)})") from None


def _too_many_bytes(name: str, size: int, limit: int, at_least: bool = False) -> str:
    more = "more than " if at_least else ""
    return (f"{name}: file is {more}{_human(size)}, over the limit of {_human(limit)} "
            f"(max_bytes={limit}); downscale or recompress it")


def _check_png_chunks(data: bytes, name: str) -> None:
    """Walk the PNG chunks: a truncated file or a bad CRC is reported by name (PIL skips some CRCs)."""
    pos, chunks = 8, 0
    while pos < len(data):
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:   # each chunk costs Python work here and in PIL: a count bounds it
            raise ImageError(f"{name}: PNG has more than {MAX_PNG_CHUNKS:,} chunks (MAX_PNG_CHUNKS); an encoder "
                             "writes a few hundred at most, re-save it")
        if pos + 8 > len(data):
            raise ImageError(f"{name}: PNG is truncated (cut inside a chunk header); the file is incomplete")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length + 4
        label = ctype.decode("latin-1")
        if end > len(data):
            raise ImageError(f"{name}: PNG is truncated (chunk {label!r} is cut off); the file is incomplete")
        body = data[pos + 4:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(body) != crc:
            raise ImageError(f"{name}: PNG chunk {label!r} has a bad CRC checksum; the file is corrupt")
        if ctype == b"IEND":
            return
        pos = end
    raise ImageError(f"{name}: PNG is truncated (no IEND chunk); the file is incomplete")


def _declared_size(data: bytes, fmt: str) -> Optional[Tuple[int, int]]:
    """Width and height from the header, for the formats where Image.open would do more than parse it:
    PIL's WebP plugin creates its decoder (and canvas) inside open(); PNG is read here to name the size of
    a bomb that PIL would refuse with a bare pixel count. None when the header is not where expected."""
    if fmt == "PNG" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if fmt == "WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":                                  # canvas size - 1, 24-bit little endian
            return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
        if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame: 14-bit sizes
            w, h = struct.unpack("<HH", data[26:30])
            return w & 0x3FFF, h & 0x3FFF
        if chunk == b"VP8L" and data[20] == 0x2F:             # lossless: 14-bit (size - 1) fields
            bits = int.from_bytes(data[21:25], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def _check_pixels(size: Tuple[int, int], fmt: str, name: str, max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{name}: the {fmt} header declares an empty image ({w}×{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: image is {w}×{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                         f"pixels (max_pixels); downscale it first")


def _open_lazily(data: bytes, fmt: str, name: str, max_pixels: int) -> Image.Image:
    """Image.open restricted to ``fmt``, with the pixel limit checked on the header, before decoding."""
    declared = _declared_size(data, fmt)
    if declared is not None:
        _check_pixels(declared, fmt, name, max_pixels)
    try:
        im = Image.open(io.BytesIO(data), formats=(fmt,))
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "an enormous size"
        raise ImageError(f"{name}: the {fmt} header declares {size} (a decompression bomb?), over the limit "
                         f"of {max_pixels:,} pixels (max_pixels); refused without decoding") from None
    except Image.UnidentifiedImageError:
        # PIL's own text names its in-memory stream ("<_io.BytesIO object at 0x…>"), not the user's file.
        raise ImageError(f"{name}: starts like a {fmt} file but PIL cannot parse its header; the file is "
                         "corrupt") from None
    except Exception as e:  # PIL raises many types for malformed headers
        raise ImageError(f"{name}: corrupt or unreadable {fmt} file ({_short(e)})") from None
    _check_pixels(im.size, fmt, name, max_pixels)
    return im


def _short(e: BaseException) -> str:
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the file", str(e)).strip() or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# -------------------------------------------------------------------------------- decode cost, bounded

# Bytes per pixel of PIL's storage for each mode (PIL keeps RGB, LA and PA as 4 bytes per pixel).
_STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_BAND_PIXELS = 1 << 20        # modes are converted to RGB one band of rows (~1 MP) at a time
_MAX_IFD_ENTRIES = 512


def peak_bytes(im: Image.Image) -> int:
    """The memory a decode of ``im`` (opened, not loaded) needs at its peak, from its header: the decoded
    frame in its own mode plus the 8-bit RGB result, twice the result when an EXIF orientation must be
    applied, or the largest tile or strip buffer the decoder allocates, whichever is larger."""
    w, h = im.size
    source = w * h * _STORAGE_BYTES.get(im.mode, 4)
    result = w * h * 4
    return max(source + result, 2 * result, source + _largest_block(im))


def _largest_block(im: Image.Image, name: str = "the image") -> int:
    """Bytes of the largest tile or strip a TIFF decoder reads at once, from the tags (0 for others).
    libtiff sizes its buffer from the tile tags alone: a 64×64 image may declare one 32768² tile. Tags it
    cannot read as positive integers are refused (ImageError naming ``name``): a bound that cannot be
    computed must not pass as no bound."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return 0
    w, h = im.size
    try:
        bits = tags.get(258, (8,))
        bits = max(_positive(b) for b in bits) if isinstance(bits, tuple) else _positive(bits)
        samples = _positive(tags.get(277, 1))
        if 322 in tags or 323 in tags:
            block_w, block_h = _positive(tags.get(322, w)), _positive(tags.get(323, h))
        else:
            block_w, block_h = w, min(_positive(tags.get(278, h)), h)
    except (TypeError, ValueError, OverflowError):
        raise ImageError(f"{name}: the TIFF's tile, strip or sample tags (BitsPerSample, SamplesPerPixel, "
                         "TileWidth/TileLength, RowsPerStrip) are not positive integers, so its decode memory "
                         "cannot be bounded; refused without decoding") from None
    return block_w * block_h * samples * bits // 8


def _positive(value: object) -> int:
    # bool and float are not tag integers; a rational or string tag is as unreadable as a negative one.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(value)
    return value


def _check_cost(im: Image.Image, fmt: str, name: str, max_decode_bytes: int) -> int:
    block = _largest_block(im, name)   # first: its refusal of odd tags names the file
    need = peak_bytes(im)
    w, h = im.size
    if block > max_decode_bytes:
        raise ImageError(f"{name}: the {fmt} declares a tile or strip of {_human(block)} for a {w}×{h} image, "
                         f"over the decode memory limit of {_human(max_decode_bytes)} (max_decode_bytes); "
                         "refused without decoding")
    if need > max_decode_bytes:
        raise ImageError(f"{name}: decoding this {w}×{h} {im.mode} {fmt} needs about {_human(need)}, over the "
                         f"decode memory limit of {_human(max_decode_bytes)} (max_decode_bytes); downscale it")
    return need


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8; 1 when absent or unreadable), read from the raw bytes without PIL's EXIF
    parser: parsing and rewriting a large EXIF block (``ImageOps.exif_transpose``) is quadratic in it."""
    tags = getattr(im, "tag_v2", None)
    if tags is not None:                    # TIFF: the tag of the first IFD, already parsed by open()
        value = tags.get(0x0112, 1)
        return value if isinstance(value, int) and 1 <= value <= 8 else 1
    raw = im.info.get("exif")      # only IFD0's entries are read: the cost does not grow with the size
    if not isinstance(raw, (bytes, bytearray)):
        return 1
    return exif_orientation(bytes(raw))


def exif_orientation(raw: bytes) -> int:
    """Orientation tag (0x0112) of IFD0 in EXIF bytes (optionally prefixed ``Exif\\0\\0``); 1 if none."""
    if raw.startswith(b"Exif\x00\x00"):
        raw = raw[6:]
    if len(raw) < 8 or raw[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if raw[:2] == b"II" else ">"
    magic, offset = struct.unpack(order + "HI", raw[2:8])
    if magic != 42 or offset + 2 > len(raw):
        return 1
    (count,) = struct.unpack(order + "H", raw[offset:offset + 2])
    count = min(count, (len(raw) - offset - 2) // 12, _MAX_IFD_ENTRIES)
    for i in range(count):
        at = offset + 2 + 12 * i
        tag, kind, n = struct.unpack(order + "HHI", raw[at:at + 8])
        if tag == 0x0112 and kind == 3 and n >= 1:
            (value,) = struct.unpack(order + "H", raw[at + 8:at + 10])
            return value if 1 <= value <= 8 else 1
    return 1


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _decode(im: Image.Image, fmt: str, name: str) -> Image.Image:
    """Decode all pixels of the first frame."""
    try:
        im.seek(0)
        im.load()
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: a frame or tile of this {fmt} is enormous (decompression bomb), refused") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode this {im.size[0]}×{im.size[1]} image; "
                         "downscale it") from None
    except Exception as e:
        raise ImageError(f"{name}: corrupt or truncated {fmt} file ({_short(e)})") from None
    return im


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """8-bit RGB with the rules in the module docstring (alpha over BACKGROUND, 16-bit/float scaling).

    Converted one band of rows at a time into the result, so no full-size intermediate (float64 copies,
    an RGBA canvas) is ever allocated: the peak is the decoded frame plus the result (``peak_bytes``)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im._new(im.im)   # the decoded pixels themselves, in a plain Image (no copy)
    if mode in ("LAB", "HSV"):
        # PIL would reinterpret the channels as RGB bytes: silently wrong colours.
        raise ImageError(f"{name}: colour mode {mode} is not supported (PIL cannot convert it to RGB "
                         "correctly); save the image as RGB")
    w, h = im.size
    rows = max(1, _BAND_PIXELS // max(w, 1))
    float_scale = _float_scale(im, rows, name) if mode == "F" else None
    out = Image.new("RGB", im.size)
    for y in range(0, h, rows):
        band = im.crop((0, y, w, min(h, y + rows)))
        out.paste(_band_to_rgb(band, name, float_scale), (0, y))
        band.close()
    return out


def _band_to_rgb(im: Image.Image, name: str, float_scale: Optional[float]) -> Image.Image:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im)
        clipped = np.clip(values, 0, 65535).astype(np.uint32)
        gray = ((2 * clipped + 257) // 514).astype(np.uint8)     # round(v / 257), halves up, in integers
        key = im.info.get("transparency")
        if isinstance(key, int):
            gray[values == key] = BACKGROUND[0]   # colour-key transparency (16-bit PNG tRNS); white is grey
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_round_u8(np.asarray(im, dtype=np.float64) * float_scale), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    try:
        if has_alpha:
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{name}: colour mode {mode} cannot be converted to RGB ({_short(e)})") from None


def _round_u8(values: np.ndarray) -> np.ndarray:
    return np.floor(values + 0.5).astype(np.uint8)


def _float_scale(im: Image.Image, rows: int, name: str) -> float:
    """255 for values in [0, 1], 1 for values in [0, 255]; anything else is refused (see the docstring)."""
    w, h = im.size
    lo, hi = np.inf, -np.inf
    for y in range(0, h, rows):
        values = np.asarray(im.crop((0, y, w, min(h, y + rows))))
        if not np.isfinite(values).all():
            raise ImageError(f"{name}: float image contains NaN or Inf values, refused")
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    if lo >= 0.0 and hi <= 1.0:
        return 255.0
    if lo >= 0.0 and hi <= 255.0:
        return 1.0
    raise ImageError(f"{name}: float image with values in [{lo:.4g}, {hi:.4g}]; only [0, 1] or [0, 255] "
                     "can be converted without guessing, save it as an 8-bit PNG")


def _prepare(source: ImageSource, max_pixels: int, max_bytes: int, max_decode_bytes: int,
             name: Optional[str] = None) -> Tuple[bytes, str, str, Image.Image, int]:
    """Everything before the pixels are decoded: bytes, name, format, the lazily opened image and the
    decode's peak memory, each limit checked from the header."""
    if max_pixels < 1 or max_bytes < 1 or max_decode_bytes < 1:
        raise ValueError(f"limits must be positive, got max_pixels={max_pixels}, max_bytes={max_bytes}, "
                         f"max_decode_bytes={max_decode_bytes}")
    data, found = _read_source(source, max_bytes)
    name = shorten(name, 80) if name else found
    if not data:
        raise ImageError(f"{name}: the file is empty (0 bytes); {_ACCEPTED}")
    head = data[:4096]
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageError(f"{name}: {_unsupported_reason(head)}; {_ACCEPTED}")
    if fmt == "PNG":
        _check_png_chunks(data, name)
    im = _open_lazily(data, fmt, name, max_pixels)
    try:
        need = _check_cost(im, fmt, name, max_decode_bytes)
    except BaseException:
        im.close()
        raise
    return data, name, fmt, im, need


def _decode_to_rgb(im: Image.Image, fmt: str, name: str) -> Image.Image:
    """The opened image decoded, converted to 8-bit RGB and turned upright; ``im`` is closed."""
    try:
        orientation = _orientation(_decode(im, fmt, name))
        rgb = _to_rgb(im, name)
    finally:
        im.close()                          # the source frame is released before the transpose
    if orientation in _TRANSPOSE:
        upright = rgb.transpose(_TRANSPOSE[orientation])
        rgb.close()
        return upright
    return rgb


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
               isolate: Optional[bool] = None, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
               name: Optional[str] = None) -> Image.Image:
    """Read ``source`` (a path, bytes or a binary file object) into a fully decoded 8-bit RGB image.

    Raises ``equishift.errors.ImageError`` with a message naming the problem (and the limit, when one is
    exceeded) for anything that is not a readable PNG, JPEG, WebP, BMP, TIFF or GIF within the limits.
    See the module docstring for the conversion rules.

    ``isolate``: decode in a worker process limited to ``time_limit_s`` seconds and an address space of
    ``max_decode_bytes`` plus the interpreter's own (``WORKER_BASE_BYTES``). None (the default) isolates
    images whose header declares ``ISOLATE_PIXELS`` or more pixels or whose file has ``ISOLATE_BYTES`` or
    more, where a process start (~0.1–0.4 s) is small next to the decode, and progressive JPEGs of
    ``ISOLATE_PROGRESSIVE`` pixels or bytes (their scan count is unbounded); smaller images decode here.

    ``name``: what messages call the image (e.g. an upload's file name when ``source`` is its bytes)."""
    data, name, fmt, im, _ = _prepare(source, max_pixels, max_bytes, max_decode_bytes, name)
    if isolate is None:
        pixels = im.size[0] * im.size[1]
        isolate = (pixels >= ISOLATE_PIXELS or len(data) >= ISOLATE_BYTES
                   or (fmt == "JPEG" and bool(im.info.get("progressive"))
                       and max(pixels, len(data)) >= ISOLATE_PROGRESSIVE))
    if isolate and _can_isolate():
        im.close()
        return _decode_in_worker(data, name, max_pixels, max_bytes, max_decode_bytes, time_limit_s)
    return _decode_to_rgb(im, fmt, name)


# ------------------------------------------------------------------------------------ the worker process

def _can_isolate() -> bool:
    return sys.platform.startswith("linux") and bool(sys.executable)


_WORKER = ("import sys; sys.path.insert(0, {root!r}); "
           "from equishift.images import _worker_main; _worker_main()")


def _decode_in_worker(data: bytes, name: str, max_pixels: int, max_bytes: int, max_decode_bytes: int,
                      time_limit_s: float) -> Image.Image:
    """Decode ``data`` in a child process with a time limit and an address-space limit; the result comes
    back as raw RGB rows, pasted band by band so the parent never holds two full copies."""
    import json
    import resource

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _WORKER.format(root=root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    limit = WORKER_BASE_BYTES + max_decode_bytes
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(time_limit_s, kill)
    timer.daemon = True
    try:
        try:   # the child waits on stdin: the limit is in place before it sees a byte of the image
            resource.prlimit(proc.pid, resource.RLIMIT_AS, (limit, limit))
        except (OSError, ValueError):
            pass
        timer.start()
        header = json.dumps({"name": name, "max_pixels": max_pixels, "max_bytes": max_bytes,
                             "max_decode_bytes": max_decode_bytes, "size": len(data)}).encode()
        try:
            proc.stdin.write(struct.pack(">I", len(header)) + header)
            proc.stdin.write(data)
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        out = _read_worker_reply(proc.stdout, name)
        proc.wait()
        if out is not None:
            return out
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if timed_out.is_set():
        raise ImageError(f"{name}: decoding took longer than {time_limit_s:g} s (the decode time limit); "
                         "the file is built to be slow to decode, or too large for this machine")
    raise ImageError(f"{name}: the decoder stopped without a result (exit status {proc.returncode}); over "
                     f"the decode memory limit of {_human(limit)} or a corrupt file")


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = stream.read(min(left, 1 << 22))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_worker_reply(stream: BinaryIO, name: str) -> Optional[Image.Image]:
    """The worker's reply: ``OK`` + width, height + RGB rows, or ``ER`` + an ImageError message. None
    when the reply is cut short (the worker was killed)."""
    status = _read_exact(stream, 2)
    if status == b"ER":
        raise ImageError(stream.read(64 * 1024).decode("utf-8", errors="replace"))
    if status != b"OK":
        return None
    size = _read_exact(stream, 8)
    if len(size) != 8:
        return None
    w, h = struct.unpack(">II", size)
    out = Image.new("RGB", (w, h))
    rows = max(1, _BAND_PIXELS // max(w, 1))
    for y in range(0, h, rows):
        n = min(rows, h - y)
        raw = _read_exact(stream, w * n * 3)
        if len(raw) != w * n * 3:
            out.close()
            return None
        out.paste(Image.frombytes("RGB", (w, n), raw), (0, y))
    return out


def _worker_main() -> None:
    """The child's side of ``_decode_in_worker``: read a header and the image bytes from stdin, write the
    reply to stdout. Nothing but the image decode runs here."""
    import json

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    (n,) = struct.unpack(">I", _read_exact(stdin, 4))
    job = json.loads(_read_exact(stdin, n))
    data = _read_exact(stdin, job["size"])
    try:
        _, name, fmt, im, _ = _prepare(data, job["max_pixels"], job["max_bytes"], job["max_decode_bytes"],
                                       job["name"])
        rgb = _decode_to_rgb(im, fmt, name)
    except ImageError as e:
        stdout.write(b"ER" + str(e).encode("utf-8"))
        stdout.flush()
        return
    except MemoryError:
        stdout.write(b"ER" + (f"{job['name']}: not enough memory to decode it within the decode memory "
                              f"limit ({_human(job['max_decode_bytes'])} plus the decoder's own)").encode())
        stdout.flush()
        return
    w, h = rgb.size
    stdout.write(b"OK" + struct.pack(">II", w, h))
    rows = max(1, _BAND_PIXELS // max(w, 1))
    for y in range(0, h, rows):
        stdout.write(rgb.crop((0, y, w, min(h, y + rows))).tobytes())
    stdout.flush()


def invert(image: Image.Image) -> Image.Image:
    """The negative of a decoded image (8-bit RGB, 255 - v per channel): a light background becomes dark,
    as the Fashion-MNIST models expect. Inverting twice gives the image back exactly."""
    return ImageOps.invert(image.convert("RGB"))


def inverted_png(source: ImageSource, **limits) -> bytes:
    """``source`` decoded by ``load_image`` (same rules and ``limits``), inverted, as lossless PNG bytes:
    what a caller that passes images around as bytes (the dashboard) analyses instead of the original."""
    buf = io.BytesIO()
    invert(load_image(source, **limits)).save(buf, format="PNG")
    return buf.getvalue()
