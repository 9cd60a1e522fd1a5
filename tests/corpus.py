"""Corpora of good and bad inputs for ``equishift.images.load_image`` and ``equishift.checkpoint``.

Every case carries its own expectation, computed here from the source pixels/tensors with NumPy (never by
calling the code under test): either the exact RGB array ``load_image`` must return (within ``atol`` for
lossy codecs), or a substring of the error message. Reusable outside ``tests/test_images.py``, e.g. in
AppTest: ``at.file_uploader[0].upload(case.filename, case.data, case.mime)``.

    from corpus import image_cases, checkpoint_cases
"""
from __future__ import annotations

import io
import os
import pickle
import shlex
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

__all__ = ["ImageCase", "image_cases", "encode_png", "png_chunk", "CheckpointCase", "checkpoint_cases",
           "CodePayload", "tiny_vit", "tiny_twins"]

# ------------------------------------------------------------------------------------------------ images


@dataclass(frozen=True)
class ImageCase:
    kind: str
    filename: str            # the name an upload would carry (never used to pick the decoder)
    mime: str
    data: bytes
    expected: Optional[np.ndarray] = None   # H×W×3 uint8 that load_image must return; None when refused
    atol: int = 0                           # max |difference| per pixel allowed (lossy codecs, see below)
    mean_atol: Optional[float] = None       # max mean |difference| allowed (None: atol)
    error: Optional[str] = None             # substring of the ImageError message when refused
    load_kwargs: Dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def encode_png(width: int, height: int, *, bit_depth: int = 8, color_type: int = 2,
               rows=None, extra_chunks: bytes = b"") -> bytes:
    """A PNG written by hand (filter 0 on every row), so that headers can lie and 16-bit RGB exists.

    ``rows`` yields each row's raw sample bytes; None streams zero rows without holding the image."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row_bytes = width * channels * bit_depth // 8
    comp = zlib.compressobj(1)
    idat = []
    for y in range(height):
        row = rows[y] if rows is not None else bytes(row_bytes)
        idat.append(comp.compress(b"\x00" + row))
    idat.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra_chunks
            + png_chunk(b"IDAT", b"".join(idat)) + png_chunk(b"IEND", b""))


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _blocks(rng: np.random.Generator, h: int, w: int, block: int = 8, channels: int = 3) -> np.ndarray:
    """Flat-colour blocks aligned to the JPEG 8×8 grid: lossy codecs then stay close to the source."""
    small = rng.integers(0, 256, (h // block, w // block, channels), dtype=np.uint8)
    return np.repeat(np.repeat(small, block, 0), block, 1)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.floor(rgb.astype(np.float64) * a + 255.0 * (1 - a) + 0.5).astype(np.uint8)


def _gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=2)


def _jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with a lying SOF0 header: the declared size is all Image.open reads."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[:i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9:]


def image_cases() -> List[ImageCase]:
    """≥ 20 kinds of image input; cheap to build (the largest file is ~150 kB)."""
    rng = np.random.default_rng(1234)
    cases: List[ImageCase] = []
    add = cases.append
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    png = _save(Image.fromarray(rgb), "PNG")

    # --- supported formats, decoded exactly (lossless) or within JPEG tolerance
    add(ImageCase("png_rgb", "photo.png", "image/png", png, expected=rgb))
    add(ImageCase("webp_lossless", "photo.webp", "image/webp",
                  _save(Image.fromarray(rgb), "WEBP", lossless=True, exact=True), expected=rgb))
    add(ImageCase("bmp", "photo.bmp", "image/bmp", _save(Image.fromarray(rgb), "BMP"), expected=rgb))
    add(ImageCase("tiff_lzw", "photo.tiff", "image/tiff",
                  _save(Image.fromarray(rgb), "TIFF", compression="tiff_lzw"), expected=rgb))
    blocks = _blocks(rng, 32, 48)
    # quality 95, no chroma subsampling, 8×8-aligned flat blocks: measured max error a few levels.
    add(ImageCase("jpeg", "photo.jpg", "image/jpeg", _save(Image.fromarray(blocks), "JPEG", quality=95,
                  subsampling=0), expected=blocks, atol=16, mean_atol=2.0))
    add(ImageCase("jpeg_progressive", "photo.jpg", "image/jpeg",
                  _save(Image.fromarray(blocks), "JPEG", quality=95, subsampling=0, progressive=True),
                  expected=blocks, atol=16, mean_atol=2.0))

    palette_colors = rng.integers(0, 256, (4, 3), dtype=np.uint8)
    idx = rng.integers(0, 4, (20, 30), dtype=np.uint8)
    pal = Image.fromarray(idx, "P")
    pal.putpalette(palette_colors.flatten().tolist() + [0] * (768 - 12))
    add(ImageCase("gif", "anim.gif", "image/gif", _save(pal, "GIF"), expected=palette_colors[idx]))

    frames = []
    for k in range(3):
        fi = Image.fromarray(((idx + k) % 4).astype(np.uint8), "P")
        fi.putpalette(palette_colors.flatten().tolist() + [0] * (768 - 12))
        frames.append(fi)
    add(ImageCase("gif_animated_first_frame", "anim.gif", "image/gif",
                  _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
                  expected=palette_colors[idx]))

    # --- sizes at the edges
    one = rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)
    add(ImageCase("one_by_one", "dot.png", "image/png", _save(Image.fromarray(one), "PNG"), expected=one))
    tall = rng.integers(0, 256, (5000, 1, 3), dtype=np.uint8)
    add(ImageCase("aspect_1x5000", "strip.png", "image/png", _save(Image.fromarray(tall), "PNG"),
                  expected=tall))
    wide = rng.integers(0, 256, (1, 5000, 3), dtype=np.uint8)
    add(ImageCase("aspect_5000x1", "strip.png", "image/png", _save(Image.fromarray(wide), "PNG"),
                  expected=wide))

    # --- modes: grayscale, bilevel, 16-bit, alpha, palette transparency, colour key, CMYK, float
    gray = rng.integers(0, 256, (16, 20), dtype=np.uint8)
    add(ImageCase("gray_L", "gray.png", "image/png", _save(Image.fromarray(gray, "L"), "PNG"),
                  expected=_gray3(gray)))
    bits = rng.integers(0, 2, (16, 24)).astype(bool)
    add(ImageCase("bilevel_1", "bw.png", "image/png", _save(Image.fromarray(bits), "PNG"),
                  expected=_gray3(np.where(bits, 255, 0).astype(np.uint8))))

    # 16-bit samples v = 257·k + e with |e| ≤ 100 round to k under v/257; PIL reads 16-bit RGB PNGs by
    # their high byte (floor(v/256)), which is off by at most 1 from k: atol 1 for RGB, exact for gray.
    k16 = rng.integers(0, 256, (12, 10), dtype=np.int64)
    v16 = np.clip(k16 * 257 + rng.integers(-100, 101, k16.shape), 0, 65535).astype(">u2")
    add(ImageCase("png16_gray", "depth16.png", "image/png",
                  encode_png(10, 12, bit_depth=16, color_type=0, rows=[r.tobytes() for r in v16]),
                  expected=_gray3(k16.astype(np.uint8))))
    key16 = int(v16[0, 0])                                # every pixel of that value becomes white
    add(ImageCase("png16_gray_colour_key", "depth16.png", "image/png",
                  encode_png(10, 12, bit_depth=16, color_type=0, rows=[r.tobytes() for r in v16],
                             extra_chunks=png_chunk(b"tRNS", struct.pack(">H", key16))),
                  expected=_gray3(np.where(v16 == key16, 255, k16).astype(np.uint8))))
    k16c = rng.integers(0, 256, (12, 10, 3), dtype=np.int64)
    v16c = np.clip(k16c * 257 + rng.integers(-100, 101, k16c.shape), 0, 65535).astype(">u2")
    add(ImageCase("png16_rgb", "depth16.png", "image/png",
                  encode_png(10, 12, bit_depth=16, color_type=2, rows=[r.tobytes() for r in v16c]),
                  expected=k16c.astype(np.uint8), atol=1))

    alpha = rng.integers(0, 256, (16, 20), dtype=np.uint8)
    alpha[0, :4] = [0, 255, 1, 254]
    rgba = np.dstack([rng.integers(0, 256, (16, 20, 3), dtype=np.uint8), alpha])
    add(ImageCase("rgba_over_white", "alpha.png", "image/png", _save(Image.fromarray(rgba, "RGBA"), "PNG"),
                  expected=_over_white(rgba[..., :3], alpha), atol=1))
    la = np.dstack([gray, alpha])
    add(ImageCase("gray_alpha_LA", "alpha.png", "image/png", _save(Image.fromarray(la, "LA"), "PNG"),
                  expected=_over_white(_gray3(gray), alpha), atol=1))

    tp = pal.copy()
    png_tp = _save(tp, "PNG", transparency=2)          # palette index 2 fully transparent
    add(ImageCase("palette_transparency", "pal.png", "image/png", png_tp,
                  expected=np.where((idx == 2)[..., None], np.uint8(255), palette_colors[idx])))
    key = rgb.copy()
    key[::3, ::4] = (10, 20, 30)                         # the colour key: these pixels become white
    trns = png_chunk(b"tRNS", struct.pack(">HHH", 10, 20, 30))
    keyed = encode_png(40, 24, rows=[r.tobytes() for r in key], extra_chunks=trns)
    add(ImageCase("rgb_colour_key", "key.png", "image/png", keyed,
                  expected=np.where(np.all(key == (10, 20, 30), axis=2)[..., None], np.uint8(255), key)))

    cmyk = _blocks(rng, 32, 32, channels=4)
    c, m, y, kk = (cmyk[..., i].astype(np.float64) for i in range(4))
    cmyk_rgb = np.stack([(255 - ch) * (255 - kk) / 255.0 for ch in (c, m, y)], axis=2)
    add(ImageCase("cmyk_jpeg", "print.jpg", "image/jpeg",
                  _save(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95),
                  expected=np.floor(cmyk_rgb + 0.5).astype(np.uint8), atol=16, mean_atol=2.0))

    f_k = rng.integers(0, 256, (8, 12))
    add(ImageCase("float_tiff_unit_range", "float.tiff", "image/tiff",
                  _save(Image.fromarray((f_k / 255.0).astype(np.float32), "F"), "TIFF"),
                  expected=_gray3(f_k.astype(np.uint8))))
    add(ImageCase("float_tiff_out_of_range", "float.tiff", "image/tiff",
                  _save(Image.fromarray((f_k / 10.0 - 3.0).astype(np.float32), "F"), "TIFF"),
                  error="only [0, 1] or [0, 255]"))
    fnan = (f_k / 255.0).astype(np.float32)
    fnan[0, 0] = np.nan
    add(ImageCase("float_tiff_nan", "float.tiff", "image/tiff", _save(Image.fromarray(fnan, "F"), "TIFF"),
                  error="NaN or Inf"))

    add(ImageCase("tiff_lab_refused", "lab.tiff", "image/tiff", _save(Image.new("LAB", (4, 5), (50, 10, 10)),
                  "TIFF"), error="colour mode LAB is not supported"))

    # --- EXIF orientation: stored landscape, displayed rotated
    quad = _blocks(rng, 32, 48, block=16)
    for orientation, turns in ((3, 2), (6, -1), (8, 1)):     # np.rot90 turns: +1 = 90° counter-clockwise
        exif = Image.Exif()
        exif[0x0112] = orientation
        add(ImageCase(f"exif_orientation_{orientation}", "phone.jpg", "image/jpeg",
                      _save(Image.fromarray(quad), "JPEG", quality=95, subsampling=0, exif=exif),
                      expected=np.rot90(quad, turns), atol=16, mean_atol=2.0))

    # --- broken files
    add(ImageCase("empty", "empty.png", "image/png", b"", error="empty"))
    add(ImageCase("random_bytes", "noise.png", "image/png", b"\x00\x9b" + rng.bytes(2046),
                  error="not a recognised image"))
    add(ImageCase("text_named_png", "notes.png", "image/png", b"shopping list\n- eggs\n- milk\n",
                  error="text file, not an image"))
    big_png = _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    add(ImageCase("truncated_png", "cut.png", "image/png", big_png[:len(big_png) * 6 // 10],
                  error="PNG is truncated"))
    noisy_jpeg = _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    add(ImageCase("truncated_jpeg", "cut.jpg", "image/jpeg", noisy_jpeg[:len(noisy_jpeg) * 6 // 10],
                  error="truncated"))
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF                                   # last byte of the IHDR CRC (8 + 8 + 13 .. 33)
    add(ImageCase("png_bad_crc", "crc.png", "image/png", bytes(bad_crc), error="bad CRC"))
    idat_at = png.index(b"IDAT")
    bad_idat = bytearray(png)
    bad_idat[idat_at + 10] ^= 0x55                        # a flipped bit inside the compressed pixels
    add(ImageCase("png_bad_idat_crc", "crc.png", "image/png", bytes(bad_idat), error="'IDAT' has a bad CRC"))

    # --- decompression bombs and huge images: refused from the header, nothing decoded
    add(ImageCase("png_bomb_100000x100000", "bomb.png", "image/png", _png_bomb(100_000, 100_000),
                  error="100000×100000 = 10,000,000,000 pixels"))
    lossy_webp = _save(Image.fromarray(blocks), "WEBP", quality=80)
    vp8 = lossy_webp.index(b"\x9d\x01\x2a") + 3            # 14-bit width, height of the key frame
    add(ImageCase("webp_bomb_12000x12000", "bomb.webp", "image/webp",
                  lossy_webp[:vp8] + struct.pack("<HH", 12000, 12000) + lossy_webp[vp8 + 4:],
                  error="12000×12000 = 144,000,000 pixels"))
    gif = _save(pal, "GIF")
    add(ImageCase("gif_bomb_60000x60000", "bomb.gif", "image/gif",
                  gif[:6] + struct.pack("<HH", 60000, 60000) + gif[10:], error="3,600,000,000 pixels"))
    bmp = _save(Image.fromarray(rgb), "BMP")
    add(ImageCase("bmp_bomb_7000x7000", "bomb.bmp", "image/bmp",
                  bmp[:18] + struct.pack("<ii", 7000, 7000) + bmp[26:], error="7000×7000 = 49,000,000 pixels"))
    add(ImageCase("jpeg_bomb_9000x9000", "bomb.jpg", "image/jpeg", _jpeg_with_size(noisy_jpeg, 9000, 9000),
                  error="9000×9000 = 81,000,000 pixels"))
    add(ImageCase("huge_valid_png_8000x6000", "huge.png", "image/png", encode_png(8000, 6000),
                  error="8000×6000 = 48,000,000 pixels, over the limit of 40,000,000 pixels"))
    add(ImageCase("over_max_pixels_kwarg", "photo.png", "image/png", png,
                  error="over the limit of 500 pixels", load_kwargs={"max_pixels": 500}))
    add(ImageCase("over_max_bytes", "photo.png", "image/png", png, error="max_bytes=100",
                  load_kwargs={"max_bytes": 100}))

    # --- formats we refuse by name
    svg = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" '
           b'height="8"><rect width="8" height="8" fill="red"/></svg>\n')
    add(ImageCase("svg", "logo.svg", "image/svg+xml", svg, error="SVG is not supported, export it as PNG"))
    add(ImageCase("svg_without_xml_declaration", "logo.png", "image/png", svg[svg.index(b"<svg"):],
                  error="SVG is not supported"))
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + rng.bytes(200)
    add(ImageCase("heic", "IMG_0001.HEIC", "image/heic", heic, error="HEIC/HEIF is not supported"))
    avif = struct.pack(">I", 28) + b"ftypavif" + b"\x00\x00\x00\x00avifmif1miaf" + rng.bytes(200)
    add(ImageCase("avif", "photo.avif", "image/avif", avif, error="AVIF is not supported"))
    add(ImageCase("pdf", "scan.pdf", "application/pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
                  error="PDF is not supported"))
    add(ImageCase("eps_never_reaches_ghostscript", "fig.eps", "application/postscript",
                  b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", error="EPS is not supported"))
    return cases


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width``×``height`` but whose data is one tiny zlib stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(bytes(1024)))
            + png_chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------- checkpoints


class CodePayload:
    """Unpickling this runs ``touch MARKER`` through os.system: proof that a loader executed code."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@dataclass(frozen=True)
class CheckpointCase:
    kind: str
    path: Path
    error: Optional[str] = None         # substring of load_weights' CheckpointError; None: it loads
    warning: Optional[str] = None       # substring of the CheckpointWarning load_weights emits
    apply_error: Optional[str] = None   # loads, but apply_weights(tiny_vit(), state) raises with this
    reference: Optional[Dict[str, "object"]] = None   # the tensors load_weights must return
    marker: Optional[Path] = None       # for code payloads: a file that must never come to exist
    load_kwargs: Dict[str, int] = field(default_factory=dict)


def tiny_vit(num_classes: int = 10, embed_dim: int = 32):
    import timm.models.vision_transformer as vt
    return vt.VisionTransformer(img_size=32, patch_size=4, embed_dim=embed_dim, depth=1, num_heads=2,
                                num_classes=num_classes)


def tiny_twins():
    from timm.models.twins import Twins
    return Twins(img_size=32, patch_size=4, embed_dims=(32, 64), num_heads=(1, 2), mlp_ratios=(2, 2),
                 depths=(1, 1), wss=(4, 2), sr_ratios=(2, 1), num_classes=10)


def checkpoint_cases(directory: Path) -> List[CheckpointCase]:
    """Write every checkpoint case into ``directory`` and describe what loading it must do."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in tiny_vit().state_dict().items()}
    cases: List[CheckpointCase] = []
    add = cases.append

    def path(name: str) -> Path:
        return directory / name

    # --- good files in the usual wrappers: they load to exactly `state`
    save_file(state, path("vit.safetensors"))
    add(CheckpointCase("safetensors", path("vit.safetensors"), reference=state))
    torch.save(state, path("vit_state.pt"))
    add(CheckpointCase("torch_state_dict", path("vit_state.pt"), reference=state))
    torch.save(state, path("vit_legacy.pt"), _use_new_zipfile_serialization=False)
    add(CheckpointCase("torch_legacy_format", path("vit_legacy.pt"), reference=state))
    torch.save({"state_dict": state, "epoch": 7, "arch": "vit"}, path("wrapped_state_dict.pth"))
    add(CheckpointCase("wrapper_state_dict", path("wrapped_state_dict.pth"), reference=state))
    torch.save({"model": state, "optimizer": {"lr": 0.1}}, path("wrapped_model.pth"))
    add(CheckpointCase("wrapper_model", path("wrapped_model.pth"), reference=state))
    torch.save({f"module.{k}": v for k, v in state.items()}, path("ddp.pt"))
    add(CheckpointCase("ddp_module_prefix", path("ddp.pt"), reference=state))
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}}, path("compiled.pt"))
    add(CheckpointCase("torch_compile_prefix", path("compiled.pt"), reference=state))

    # --- code payloads: must be refused without running anything
    for kind, writer in (
        ("code_payload_torch_zip", lambda p, m: torch.save({"w": torch.zeros(2), "x": CodePayload(m)}, p)),
        ("code_payload_torch_legacy",
         lambda p, m: torch.save({"x": CodePayload(m)}, p, _use_new_zipfile_serialization=False)),
        ("code_payload_plain_pickle", lambda p, m: p.write_bytes(pickle.dumps({"x": CodePayload(m)}))),
        ("code_payload_pickle_protocol2", lambda p, m: p.write_bytes(pickle.dumps(CodePayload(m), 2))),
    ):
        marker = path(f"{kind}.MARKER")
        writer(path(f"{kind}.pt"), marker)
        add(CheckpointCase(kind, path(f"{kind}.pt"), error="contains pickled code", marker=marker))
    torch.save(tiny_vit(), path("whole_model.pt"))
    add(CheckpointCase("pickled_whole_model", path("whole_model.pt"), error="whole pickled model"))
    with warnings.catch_warnings():                   # torch.jit is deprecated, its archives still exist
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path("scripted.pt")))
    add(CheckpointCase("torchscript_archive", path("scripted.pt"), error="TorchScript"))

    # --- files that load but do not fit tiny_vit()
    save_file({k: v.contiguous() for k, v in tiny_twins().state_dict().items()}, path("twins.safetensors"))
    add(CheckpointCase("keys_of_another_architecture", path("twins.safetensors"),
                       apply_error="keys of another architecture"))
    torch.save(tiny_vit(num_classes=7).state_dict(), path("seven_classes.pt"))
    add(CheckpointCase("wrong_shapes_head", path("seven_classes.pt"),
                       apply_error="head.weight: checkpoint [7, 32] vs model [10, 32]"))

    # --- NaN / Inf: loads, with a warning naming the tensors
    poisoned = {k: v.clone() for k, v in state.items()}
    poisoned["head.weight"][0, 0] = float("nan")
    poisoned["blocks.0.mlp.fc1.bias"][3] = float("inf")
    save_file(poisoned, path("nan_inf.safetensors"))
    add(CheckpointCase("nan_inf_weights", path("nan_inf.safetensors"), reference=poisoned,
                       warning="head.weight"))

    # --- broken or foreign files
    good = path("vit.safetensors").read_bytes()
    path("truncated.safetensors").write_bytes(good[: len(good) - 100])
    add(CheckpointCase("truncated_safetensors", path("truncated.safetensors"),
                       error="truncated safetensors"))
    path("short_header.safetensors").write_bytes(good[:40])
    add(CheckpointCase("truncated_safetensors_header", path("short_header.safetensors"),
                       error="truncated safetensors"))
    path("garbled.safetensors").write_bytes(struct.pack("<Q", 20) + b'{"a": [1, 2, oops!!]' + bytes(64))
    add(CheckpointCase("corrupt_safetensors_header", path("garbled.safetensors"),
                       error="corrupt safetensors header"))
    torch.save({"w": torch.arange(4.0)}, path("small_legacy.pt"), _use_new_zipfile_serialization=False)
    legacy = path("small_legacy.pt").read_bytes()
    numel = legacy.index(b"K\x04", legacy.index(b"cpu"))   # BININT1 4: the storage's element count
    path("lying_legacy.pt").write_bytes(legacy[:numel] + b"J" + struct.pack("<i", 2**31 - 1) + legacy[numel + 2:])
    add(CheckpointCase("legacy_storage_size_bomb", path("lying_legacy.pt"),
                       error="declares 8192.0 MiB of tensor data but the file holds"))
    zipped = path("vit_state.pt").read_bytes()
    path("truncated.pt").write_bytes(zipped[: len(zipped) // 2])
    add(CheckpointCase("truncated_torch_zip", path("truncated.pt"), error="truncated or corrupt"))
    path("image.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    add(CheckpointCase("not_a_checkpoint_png", path("image.pt"), error="it is a PNG image"))
    path("readme.safetensors").write_bytes(b"these are not weights\n")
    add(CheckpointCase("not_a_checkpoint_text", path("readme.safetensors"), error="text file"))
    path("empty.pt").write_bytes(b"")
    add(CheckpointCase("empty_file", path("empty.pt"), error="empty"))
    add(CheckpointCase("over_size_limit", path("vit.safetensors"), error="over the limit",
                       load_kwargs={"max_bytes": 1000}))
    add(CheckpointCase("not_found", path("missing.safetensors"), error="not found"))
    torch.save([torch.zeros(1), 3], path("a_list.pt"))
    add(CheckpointCase("not_a_state_dict_list", path("a_list.pt"), error="holds a list"))
    torch.save({"lr": 0.1, "epoch": 3}, path("hyperparams.pt"))
    add(CheckpointCase("not_a_state_dict_numbers", path("hyperparams.pt"), error="are not tensors"))
    torch.save({}, path("empty_dict.pt"))
    add(CheckpointCase("empty_state_dict", path("empty_dict.pt"), error="contains no tensors"))
    return cases
