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
4. Decode fully (truncated or corrupt files fail here, PNG chunk CRCs are verified first), then apply the
   EXIF orientation (``ImageOps.exif_transpose``), then convert to RGB:
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
import struct
import zlib
from typing import BinaryIO, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from equishift.errors import ImageError

__all__ = ["SUPPORTED_FORMATS", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_BYTES", "BACKGROUND", "load_image",
           "sniff_format", "invert", "inverted_png"]

SUPPORTED_FORMATS: Tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
DEFAULT_MAX_PIXELS = 40_000_000    # a 48 MP phone photo is refused, 12/24 MP accepted; ~160 MB decoded
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
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
        path = os.fspath(source)
        name = os.path.basename(path) or path
        exact = False
        if not os.path.exists(path):
            raise ImageError(f"{name}: file not found ({path})")
        if os.path.isdir(path):
            raise ImageError(f"{name}: is a folder, not an image file")
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ImageError(_too_many_bytes(name, size, max_bytes))
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as e:
            raise ImageError(f"{name}: cannot be read ({e.strerror or e})") from None
    elif hasattr(source, "read"):
        name = os.path.basename(str(getattr(source, "name", "") or "")) or "the upload"
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


def _too_many_bytes(name: str, size: int, limit: int, at_least: bool = False) -> str:
    more = "more than " if at_least else ""
    return (f"{name}: file is {more}{_human(size)}, over the limit of {_human(limit)} "
            f"(max_bytes={limit}); downscale or recompress it")


def _human(n: int) -> str:
    if n < 10 * 1024:
        return f"{n} bytes"
    if n < 10 * 2**20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def _check_png_chunks(data: bytes, name: str) -> None:
    """Walk the PNG chunks: a truncated file or a bad CRC is reported by name (PIL skips some CRCs)."""
    pos = 8
    while pos < len(data):
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
    except Exception as e:  # PIL raises many types for malformed headers
        raise ImageError(f"{name}: corrupt or unreadable {fmt} file ({_short(e)})") from None
    _check_pixels(im.size, fmt, name, max_pixels)
    return im


def _short(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _decode(im: Image.Image, fmt: str, name: str) -> Image.Image:
    """Decode all pixels of the first frame and apply the EXIF orientation."""
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
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        # A malformed EXIF block should not cost the user the image: keep the stored orientation.
        return im


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """8-bit RGB with the rules in the module docstring (alpha over BACKGROUND, 16-bit/float scaling)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im.copy()
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im, dtype=np.float64)
        gray = _round_u8(np.clip(values, 0, 65535) / 257.0)
        key = im.info.get("transparency")
        if isinstance(key, int):
            gray[values == key] = BACKGROUND[0]   # colour-key transparency (16-bit PNG tRNS); white is grey
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_to_u8(np.asarray(im, dtype=np.float64), name), "L").convert("RGB")
    if mode in ("LAB", "HSV"):
        # PIL would reinterpret the channels as RGB bytes: silently wrong colours.
        raise ImageError(f"{name}: colour mode {mode} is not supported (PIL cannot convert it to RGB "
                         "correctly); save the image as RGB")
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


def _float_to_u8(values: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise ImageError(f"{name}: float image contains NaN or Inf values, refused")
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0.0 and hi <= 1.0:
        return _round_u8(values * 255.0)
    if lo >= 0.0 and hi <= 255.0:
        return _round_u8(values)
    raise ImageError(f"{name}: float image with values in [{lo:.4g}, {hi:.4g}]; only [0, 1] or [0, 255] "
                     "can be converted without guessing, save it as an 8-bit PNG")


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    """Read ``source`` (a path, bytes or a binary file object) into a fully decoded 8-bit RGB image.

    Raises ``equishift.errors.ImageError`` with a message naming the problem (and the limit, when one is
    exceeded) for anything that is not a readable PNG, JPEG, WebP, BMP, TIFF or GIF within the limits.
    See the module docstring for the conversion rules."""
    if max_pixels < 1 or max_bytes < 1:
        raise ValueError(f"limits must be positive, got max_pixels={max_pixels}, max_bytes={max_bytes}")
    data, name = _read_source(source, max_bytes)
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
        return _to_rgb(_decode(im, fmt, name), name)
    finally:
        im.close()


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
