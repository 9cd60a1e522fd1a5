"""Hostile inputs within the limits: inputs whose decode cost was unbounded, paths that are not files, and
failures that used to escape as raw Python errors. Shared by ``tests/test_hostile.py`` (each case must be
a named ``EquishiftError`` or a correct load within ``TIME_LIMIT_S`` and ``MEMORY_LIMIT``), by
``bench/hostile_inputs.py`` (worst time and peak memory per class) and by the table in docs/security.md.

Each case writes its input under a folder it is given (seeded, small files: the largest is ~1 MB, the
39.9 MP PNG ~80 KB) and is run in a child process by ``run_isolated``: an address-space limit of
``MEMORY_LIMIT`` above what the child's imports take, a wall-clock timeout, the folder as its working and
temporary directory. ``CLASSES`` keys the cases by class, so more classes can be added as tables rows.

    python tests/hostile.py KIND ARGUMENT_FILE    # the child: run one case on an input already written
"""
from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import time
import zlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 10.0
MEMORY_LIMIT = 2 * 1024**3      # address space a case may add to what its imports take

# class key -> what it covers (the table's section headings)
CLASSES = {
    "decode-cost": "images within the limits whose decode used to be unbounded",
    "not-a-file": "paths that are not regular files, or cannot be one",
    "unnamed-errors": "inputs whose failure used to escape as a raw Python error, or echo the input",
}


@dataclass(frozen=True)
class HostileCase:
    cls: str                                # a key of CLASSES
    kind: str
    target: str                             # "image", "weights" or "spec"
    make: Callable[[Path], str]             # writes the input under the folder; returns the argument
    error: Optional[str] = None             # substring of the EquishiftError message; None: it must load
    check: Optional[str] = None             # for a load: what the result must be (see _check)
    kwargs: Dict[str, object] = field(default_factory=dict)
    upload: bool = False                    # image: passed as bytes with the file name, as the dashboard does
    max_message: int = 600                  # a message never echoes the input: at most this long

    @property
    def ok(self) -> bool:
        return self.error is None


# ------------------------------------------------------------------------------------------- builders

def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png(width: int, height: int, rows: List[bytes], *, bit_depth: int = 8, color_type: int = 2,
         before_idat: bytes = b"") -> bytes:
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(b"\x00" + r) for r in rows) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + before_idat + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _zero_png(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    """A PNG of zeros, compressed row by row without holding the image (a 39.9 MP one is ~80 KB)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\x00" * (1 + width * channels * bit_depth // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _exif(orientation: int, rational_bytes: int) -> bytes:
    """Little-endian EXIF: IFD0 with the orientation and one RATIONAL tag (XResolution) whose count makes
    it ``rational_bytes`` long: valid structure, the slow path of PIL's EXIF rewrite."""
    count = rational_bytes // 8
    entries = [struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0),
               struct.pack("<HHII", 0x011A, 5, count, 8 + 2 + 12 * 2 + 4)]
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    values = struct.pack("<II", 72, 1) * count
    return b"II*\x00" + struct.pack("<I", 8) + ifd + values


def _seeded_rgb(h: int, w: int, seed: int) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes()


def _write(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def _exif_png(mb: int) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        rgb = _seeded_rgb(32, 64, seed=mb)
        rows = [rgb[y * 64 * 3:(y + 1) * 64 * 3] for y in range(32)]
        return _write(folder, f"exif{mb}.png", _png(64, 32, rows, before_idat=_chunk(b"eXIf", _exif(6, mb << 20))))
    return make


def _exif_webp(folder: Path) -> str:
    from PIL import Image

    import io
    im = Image.frombytes("RGB", (64, 32), _seeded_rgb(32, 64, seed=7))
    buf = io.BytesIO()
    im.save(buf, "WEBP", lossless=True, exact=True, exif=b"Exif\x00\x00" + _exif(8, 2 << 20))
    return _write(folder, "exif.webp", buf.getvalue())


def _tiff_big_tile(folder: Path) -> str:
    """A 64×64 grey TIFF whose one deflate-compressed tile is declared 32768×32768 (1 GiB to inflate)."""
    tile = zlib.compress(b"\x00" * (1 << 20), 9)
    tags = [(256, 3, 1, 64), (257, 3, 1, 64), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
            (277, 3, 1, 1), (322, 4, 1, 32768), (323, 4, 1, 32768), (324, 4, 1, 0), (325, 4, 1, len(tile))]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(tags) + 4
    out = b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        value = data_at if tag == 324 else value
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    return _write(folder, "tile.tiff", out + struct.pack("<I", 0) + tile)


def _png16_zeros(folder: Path) -> str:
    return _write(folder, "gray16.png", _zero_png(7980, 5000, 16, 0))


def _png_rgba_zeros(folder: Path) -> str:
    return _write(folder, "rgba.png", _zero_png(6000, 6000, 8, 6))


def _many_chunks(folder: Path) -> str:
    """A valid 8×8 PNG with a million empty ancillary chunks before its pixels (12 MB)."""
    rows = [bytes(24)] * 8
    return _write(folder, "chunks.png", _png(8, 8, rows, before_idat=_chunk(b"abCd", b"") * 1_000_000))


def _blocks16(seed: int):
    """640×480 RGB of flat 16×16 blocks: JPEG keeps it within a few levels."""
    import numpy as np

    small = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 16, 0), 16, 1)


def _progressive_jpeg(folder: Path) -> str:
    import io

    from PIL import Image

    im = Image.fromarray(_blocks16(11))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, subsampling=0, progressive=True)
    return _write(folder, "progressive.jpg", buf.getvalue())


def _fifo(folder: Path) -> str:
    path = folder / "pipe.png"
    os.mkfifo(path)
    return str(path)


def _folder(folder: Path) -> str:
    (folder / "photos.png").mkdir()
    return str(folder / "photos.png")


def _long_path(folder: Path) -> str:
    return str(folder / ("a" * 5000 + ".png"))


def _symlink_to_zero(folder: Path) -> str:
    (folder / "zero.pt").symlink_to("/dev/zero")
    return str(folder / "zero.pt")


def _fixed(text: str) -> Callable[[Path], str]:
    return lambda folder: text


def _unparseable_gif(folder: Path) -> str:
    # A GIF signature and nothing PIL can parse: PIL's message names its BytesIO, not the file.
    return _write(folder, "holiday.gif", b"GIF89a" + bytes(5))


def _deep_safetensors(depth: int) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        header = b'{"w":' * depth + b"1" + b"}" * depth
        return _write(folder, f"deep{depth}.safetensors", struct.pack("<Q", len(header)) + header)
    return make


def _odd_header(folder: Path) -> str:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}).encode()
    return _write(folder, "odd.safetensors", struct.pack("<Q", len(header)) + header + bytes(8))


def _fp8(folder: Path) -> str:
    import torch
    from safetensors.torch import save_file

    path = folder / "fp8.safetensors"
    values = torch.linspace(-2, 2, 16).reshape(4, 4)
    save_file({"w": values.to(torch.float8_e4m3fn), "b": torch.zeros(4)}, str(path))
    return str(path)


def _nested(folder: Path) -> str:
    import warnings

    import torch

    path = folder / "nested.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's "nested tensors are a prototype" warning
        torch.save({"w": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])}, str(path))
    return str(path)


def _torch_zip_with_pickle(folder: Path, name: str, pickle_body: bytes, compress: int,
                           declared: Optional[int] = None) -> str:
    """A torch.save zip of {"w": zeros(2)} whose data.pkl is replaced: streamed through zipfile so a 1 GiB
    member is compressed without being held in memory."""
    import torch

    plain = folder / f"{name}.plain.pt"
    torch.save({"w": torch.zeros(2)}, str(plain))
    path = folder / name
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("data.pkl"):
                dst.writestr(info, src.read(info.filename))
                continue
            member = zipfile.ZipInfo(info.filename)
            member.compress_type = compress
            with dst.open(member, "w", force_zip64=True) as out:
                out.write(src.read(info.filename)[:-1])
                left = (declared or 0)
                while left > 0:
                    out.write(pickle_body[:min(left, len(pickle_body))])
                    left -= min(left, len(pickle_body))
                out.write(b".")
    plain.unlink()
    return str(path)


def _zip_bomb(folder: Path) -> str:
    # POP of the dict, then 1 GiB of NONE/POP pairs: a valid-looking pickle that inflates to 1 GiB.
    return _torch_zip_with_pickle(folder, "bomb.pt", b"N0" * (1 << 19), zipfile.ZIP_DEFLATED, declared=1 << 30)


def _big_stored_pickle(folder: Path) -> str:
    return _torch_zip_with_pickle(folder, "bigpickle.pt", b"N0" * (1 << 19), zipfile.ZIP_STORED,
                                  declared=8 << 20)


def _big_legacy_pickle(folder: Path) -> str:
    return _write(folder, "legacy.pt", b"\x80\x02" + b"N0" * (4 << 20) + b"N.")


def hostile_cases() -> List[HostileCase]:
    big_spec = "timm:vit_tiny_patch16_224?" + "&".join(f"k{i}=1" for i in range(120_000))
    return [
        # --- decode cost
        HostileCase("decode-cost", "png_exif_orientation6_rational_2MB", "image", _exif_png(2),
                    check="64x32 rotated 6"),
        HostileCase("decode-cost", "png_exif_orientation6_rational_8MB", "image", _exif_png(8),
                    check="64x32 rotated 6"),
        HostileCase("decode-cost", "webp_exif_orientation8_rational_2MB", "image", _exif_webp,
                    check="64x32 rotated 8"),
        HostileCase("decode-cost", "tiff_64x64_with_32768x32768_tile", "image", _tiff_big_tile,
                    error="tile or strip of 1024.0 MiB"),
        HostileCase("decode-cost", "png16_gray_39.9MP_zeros", "image", _png16_zeros, check="7980x5000 zeros"),
        HostileCase("decode-cost", "png16_gray_39.9MP_zeros_in_process", "image", _png16_zeros,
                    check="7980x5000 zeros", kwargs={"isolate": False}),
        HostileCase("decode-cost", "png_rgba_36MP_zeros", "image", _png_rgba_zeros, check="6000x6000 white"),
        HostileCase("decode-cost", "png_with_a_million_empty_chunks", "image", _many_chunks,
                    error="more than 100,000 chunks"),
        HostileCase("decode-cost", "progressive_jpeg_decoded_in_the_worker", "image", _progressive_jpeg,
                    check="640x480 jpeg"),
        HostileCase("decode-cost", "decode_over_time_limit", "image", _png16_zeros,
                    error="decode time limit", kwargs={"isolate": True, "time_limit_s": 0.05}),
        HostileCase("decode-cost", "decode_over_memory_limit", "image", _png16_zeros,
                    error="max_decode_bytes", kwargs={"max_decode_bytes": 64 << 20}),
        # --- not a regular file
        HostileCase("not-a-file", "image_fifo", "image", _fifo, error="named pipe (FIFO)"),
        HostileCase("not-a-file", "image_folder", "image", _folder, error="is a folder"),
        HostileCase("not-a-file", "image_dev_zero", "image", _fixed("/dev/zero"), error="is a device"),
        HostileCase("not-a-file", "image_5000_char_path", "image", _long_path, error="path is too long"),
        HostileCase("not-a-file", "image_empty_path", "image", _fixed(""), error="empty path"),
        HostileCase("not-a-file", "weights_fifo", "weights", _fifo, error="named pipe (FIFO)"),
        HostileCase("not-a-file", "weights_folder", "weights", _folder, error="is a folder"),
        HostileCase("not-a-file", "weights_symlink_to_dev_zero", "weights", _symlink_to_zero, error="is a device"),
        HostileCase("not-a-file", "weights_5000_char_path", "weights", _long_path, error="path is too long"),
        HostileCase("not-a-file", "weights_empty_path", "weights", _fixed(""), error="empty path"),
        # --- errors that were not named
        HostileCase("unnamed-errors", "upload_pil_cannot_identify", "image", _unparseable_gif,
                    error="holiday.gif: starts like a GIF file", upload=True),
        HostileCase("unnamed-errors", "safetensors_header_nested_50000_deep", "weights", _deep_safetensors(50_000),
                    error="nested too deeply"),
        HostileCase("unnamed-errors", "safetensors_header_nested_500_deep", "weights", _deep_safetensors(500),
                    error="is not {dtype, shape"),
        HostileCase("unnamed-errors", "safetensors_header_float_shape", "weights", _odd_header,
                    error="is not {dtype, shape"),
        HostileCase("unnamed-errors", "safetensors_fp8_tensor", "weights", _fp8, check="fp8 upcast"),
        HostileCase("unnamed-errors", "torch_nested_tensor", "weights", _nested, error="nested or sparse"),
        HostileCase("unnamed-errors", "torch_zip_pickle_inflates_to_1GiB", "weights", _zip_bomb,
                    error="zip bomb"),
        HostileCase("unnamed-errors", "torch_zip_8MiB_stored_pickle", "weights", _big_stored_pickle,
                    error="MAX_PICKLE_BYTES"),
        HostileCase("unnamed-errors", "legacy_8MiB_pickle", "weights", _big_legacy_pickle,
                    error="MAX_PICKLE_BYTES"),
        HostileCase("unnamed-errors", "spec_of_1MB", "spec", _fixed(big_spec), error="MAX_SPEC_CHARS"),
        HostileCase("unnamed-errors", "zoo_name_of_3000_chars", "spec", _fixed("zoo:" + "z" * 3000),
                    error="too long for a file name"),
    ]


CASES = {c.kind: c for c in hostile_cases()}


# ------------------------------------------------------------------------------------------- the child

def _check(case: HostileCase, result) -> str:
    """Asserts the loaded result is the right one; returns a short description for the table."""
    import numpy as np

    if case.target == "image":
        w, h = result.size
        assert result.mode == "RGB", result.mode
        if case.check.startswith("64x32 rotated"):
            src = np.random.default_rng(2 if "2MB" in case.kind else 8).integers(0, 256, (32, 64, 3),
                                                                                  dtype=np.uint8)
            if "webp" in case.kind:
                src = np.random.default_rng(7).integers(0, 256, (32, 64, 3), dtype=np.uint8)
            turns = -1 if case.check.endswith("6") else 1      # 6: 90° clockwise, 8: counter-clockwise
            assert np.array_equal(np.asarray(result), np.rot90(src, turns)), "wrong pixels or rotation"
        elif case.check.endswith("zeros"):
            assert f"{w}x{h}" == case.check.split()[0] and result.getextrema() == ((0, 0),) * 3
        elif case.check.endswith("jpeg"):    # lossy: within JPEG's error of the source, decoded by a worker
            src = _blocks16(11).astype(np.int16)
            assert (w, h) == (640, 480) and np.abs(np.asarray(result, dtype=np.int16) - src).mean() < 2.0
            assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime > 0, "no worker ran"
        elif case.check.endswith("white"):   # transparent black over the white background
            assert f"{w}x{h}" == case.check.split()[0] and result.getextrema() == ((255, 255),) * 3
        return f"loads, {w}×{h} RGB"
    if case.check == "fp8 upcast":
        import torch

        expected = torch.linspace(-2, 2, 16).reshape(4, 4).to(torch.float8_e4m3fn)
        assert result["w"].dtype == torch.float8_e4m3fn and torch.equal(result["w"].float(), expected.float())
        return f"loads ({len(result)} tensors, float8 kept)"
    raise AssertionError(case.check)


def _status(field: str) -> int:
    """A /proc/self/status field in bytes. VmHWM, not ru_maxrss: after a fork and exec, ru_maxrss also
    counts the parent's RSS at the fork (a child of a 1 GB pytest reads >= 1 GB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child_main(kind: str, arg_file: str) -> None:
    """Run one case; print one JSON line: outcome, message, seconds, memory (bytes)."""
    case = CASES[kind]
    arg = Path(arg_file).read_text(encoding="utf-8")
    if case.target == "image":
        from equishift.images import load_image as call
    elif case.target == "weights":
        from equishift.checkpoint import load_weights as call
    else:
        from equishift.zoo import load_model as call
    from equishift.errors import EquishiftError

    if case.upload:
        arg_value: object = Path(arg).read_bytes()
        kwargs = dict(case.kwargs, name=Path(arg).name)
    else:
        arg_value, kwargs = arg, dict(case.kwargs)
    base_rss = _status("VmHWM")
    base_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    limit = _status("VmSize") + MEMORY_LIMIT
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    t0 = time.perf_counter()
    try:
        result = call(arg_value, **kwargs)
        outcome, message = "loaded", _check(case, result)
    except EquishiftError as e:
        outcome, message = "refused", str(e)
    except BaseException as e:  # noqa: BLE001 - the point: anything else is reported as unnamed
        outcome, message = "unnamed", f"{type(e).__name__}: {str(e)[:300]}"
    seconds = time.perf_counter() - t0
    own = _status("VmHWM")
    # A decode worker's peak: its ru_maxrss (an upper bound: it may include this process's RSS at the fork).
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    workers = workers if workers != base_workers else 0   # a process forked by an import is not a worker
    print(json.dumps({"outcome": outcome, "message": message[:2000], "message_chars": len(message),
                      "seconds": seconds, "base_rss": base_rss, "peak_rss": own, "worker_rss": workers}))


@dataclass
class Outcome:
    case: HostileCase
    outcome: str             # "loaded", "refused", "unnamed", or "timeout"/"crashed" from run_isolated
    message: str
    seconds: float           # wall clock of the call alone
    added_bytes: int         # peak RSS of the call above the child's RSS after its imports
    worker_bytes: int        # peak RSS of a decode worker process (0 when none ran)
    wall_s: float            # the whole child, imports included

    @property
    def peak_bytes(self) -> int:
        return max(self.added_bytes, self.worker_bytes)


def build(case: HostileCase, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return case.make(folder)


def run_isolated(case: HostileCase, folder: Path, timeout_s: float = 3 * TIME_LIMIT_S) -> Outcome:
    """Build the input under ``folder`` and run the case in a child process (see the module docstring)."""
    arg_file = folder / "argument.txt"      # a file: a 1 MB spec is over the command line's limit
    arg_file.write_text(build(case, folder), encoding="utf-8")
    tmp = folder / "tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp), HF_HUB_OFFLINE="1",
               EQUISHIFT_ZOO_DIR=str(folder / "zoo"))
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), case.kind, str(arg_file)],
                              cwd=folder,
                              env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Outcome(case, "timeout", f"no answer within {timeout_s:g} s", timeout_s, 0, 0, timeout_s)
    wall = time.perf_counter() - t0
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return Outcome(case, "crashed", f"exit {done.returncode}: {done.stderr[-500:]}", wall, 0, 0, wall)
    r = json.loads(lines[-1])
    message = r["message"] if r["message_chars"] <= case.max_message else f"[{r['message_chars']} chars]"
    return Outcome(case, r["outcome"], message, r["seconds"], max(0, r["peak_rss"] - r["base_rss"]),
                   r["worker_rss"], wall)


# ------------------------------------------------------------------------------- the docs/security.md table

_RESULTS = {"64x32 rotated 6": "loads, 32×64 RGB, turned upright (EXIF orientation 6)",
            "64x32 rotated 8": "loads, 32×64 RGB, turned upright (EXIF orientation 8)",
            "7980x5000 zeros": "loads, 7980×5000 RGB (black)",
            "6000x6000 white": "loads, 6000×6000 RGB (transparent → white)",
            "640x480 jpeg": "loads, 640×480 RGB (in the worker process)",
            "fp8 upcast": "loads (float8 tensors kept; `apply_weights` upcasts them)"}
_TARGETS = {"image": "`load_image`", "weights": "`load_weights`", "spec": "`load_model`"}


def table() -> str:
    """Markdown rows, class → kind → behaviour, from the case definitions; ``tests/test_hostile.py`` runs
    every case and checks it behaves as its row says."""
    lines = ["| class | input | called | behaviour |", "|---|---|---|---|"]
    for key in CLASSES:
        for c in (c for c in hostile_cases() if c.cls == key):
            called = _TARGETS[c.target] + (" (bytes + name)" if c.upload else "")
            if c.kwargs:
                called += " with " + ", ".join(f"`{k}={v}`" for k, v in c.kwargs.items())
            what = _RESULTS[c.check] if c.ok else f"refused: “{c.error}”"
            lines.append(f"| {key} | `{c.kind}` | {called} | {what} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        print(table())
    elif len(sys.argv) == 3:
        child_main(sys.argv[1], sys.argv[2])
    else:
        sys.exit("usage: python tests/hostile.py KIND ARGUMENT_FILE | --table")
