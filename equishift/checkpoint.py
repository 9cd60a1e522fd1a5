"""Safe loading of model weights: safetensors, or PyTorch files that hold only tensors.

A weights file is data from a stranger: nothing in it may run. ``load_weights``
- checks the size on disk before reading anything (``max_bytes``);
- recognises the format from the first bytes: safetensors (header validated against the file size, so a
  truncated file is named as such), a ``torch.save`` zip or a legacy ``torch.save``/pickle stream;
  anything else (an image, text, an empty file) is "not a checkpoint";
- for PyTorch files, lists every pickle GLOBAL statically (``pickletools``, nothing is executed) and
  refuses the file if one is outside torch's ``weights_only`` allowlist, then loads it with
  ``torch.load(weights_only=True)`` (the unrestricted unpickler is never used), whose own refusal is reported the same
  way; TorchScript archives are refused (loading them runs TorchScript code);
- unwraps ``{"state_dict": ...}``, ``{"model": ...}`` (and a few other common keys) and strips the
  ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix when every key carries it;
- warns (``CheckpointWarning``) when floating-point tensors hold NaN or Inf, naming them.

``apply_weights`` loads a state dict into a model and, when it does not fit, says how (missing and
unexpected keys, shape mismatches); ``save_weights`` writes safetensors atomically.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
import stat
import struct
import tempfile
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, Iterator, List, Mapping, Set, Tuple, Union

import torch
from torch import nn

from equishift.errors import CheckpointError, shorten
from equishift.files import human_bytes as _human, not_regular as _not_regular, os_problem as _os_problem

__all__ = ["CheckpointWarning", "DEFAULT_MAX_BYTES", "load_weights", "load_checkpoint", "apply_weights",
           "save_weights", "pickle_globals"]

DEFAULT_MAX_BYTES = 2 * 1024**3   # 2 GiB: a ViT-L in float32 (1.2 GB) fits, a stray dataset does not
PathLike = Union[str, os.PathLike]

# Wrapper keys seen in the wild (timm, torchvision references, Lightning, plain training loops), in the
# order they are tried. "state_dict" before "state_dict_ema": the raw weights are the default, as in timm.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights",
                 "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")
_MAX_SAFETENSORS_HEADER = 100 * 2**20   # safetensors' own cap on the JSON header
# A state dict's pickle holds names and storage ids only (the tensors are separate records): ~100 bytes per
# tensor, ~1 MiB for 10,000 tensors. Scanning costs 0.5-2 s per MiB, so a bigger pickle is refused.
MAX_PICKLE_BYTES = 2 * 2**20
# ... and ~20 opcodes per tensor (a training checkpoint's optimizer state ~50 per parameter): 200,000
# opcodes is ten times a ViT-L training checkpoint, and scans in 1-3 s however small each opcode is.
MAX_PICKLE_OPS = 200_000
_MAX_ZIP_RATIO = 100     # torch.save stores records uncompressed; a member inflating 100× is a zip bomb
_SAFE_HINT = "save the model's state_dict with safetensors (equishift.checkpoint.save_weights)"


class CheckpointWarning(UserWarning):
    """A checkpoint loaded, but something in it is suspicious (e.g. NaN/Inf weights)."""


# ---------------------------------------------------------------------------------------------- loading

def load_weights(path: PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Dict[str, torch.Tensor]:
    """Read a state dict (name → tensor, on the CPU) from a safetensors or weights-only PyTorch file.

    Raises ``CheckpointError`` naming the file and the problem: not found, over ``max_bytes`` (checked
    before reading), empty, truncated or corrupt, not a checkpoint, or pickled code (refused unread)."""
    state = _unwrap(_load_object(path, max_bytes, {}), _name(path))
    _warn_non_finite(state, _name(path))
    return state


def load_checkpoint(path: PathLike, *, stand_ins: Mapping[str, type],
                    max_bytes: int = DEFAULT_MAX_BYTES) -> object:
    """The whole object a ``torch.save`` file holds (a training checkpoint: weights, epoch, config, ...).

    Same checks as ``load_weights``, and the same loader (``torch.load(weights_only=True)``), except that
    each pickled class named in ``stand_ins`` (``"module.Class"`` -> a class of ours) is allowed and built
    as that stand-in: a config object of a training framework, read as data. A stand-in's ``__new__``
    must return a plain container torch's weights-only unpickler may fill (an ``OrderedDict``): that
    unpickler fills nothing else, and it calls nothing outside its allowlist and the stand-ins."""
    for key, cls in stand_ins.items():
        if not isinstance(key, str) or not isinstance(cls, type):
            raise TypeError("stand_ins maps 'module.Class' names to classes")
    return _load_object(path, max_bytes, dict(stand_ins))


def _name(path: PathLike) -> str:
    p = os.fspath(path)
    p = os.fsdecode(p) if isinstance(p, bytes) else p
    return shorten(os.path.basename(p.rstrip("/")) or p or "(empty path)", 80)


def _load_object(path: PathLike, max_bytes: int, stand_ins: Dict[str, type]) -> object:
    raw = os.fspath(path)
    raw = os.fsdecode(raw) if isinstance(raw, bytes) else raw
    name, shown = _name(raw), shorten(raw, 120)
    if not raw:
        raise CheckpointError("an empty path was given; pass the path of a weights file")
    try:
        _check_stat(os.stat(raw), name, shown, max_bytes)   # named before opening: a FIFO is never opened
    except FileNotFoundError:
        raise CheckpointError(f"{name}: checkpoint file not found ({shown})") from None
    except OSError as e:
        raise CheckpointError(f"{name}: cannot be read: {_os_problem(e)} ({shown})") from None
    # The path is opened once, non-blocking (a path swapped for a FIFO in between must not hang us), the
    # checks are repeated on what was opened, and every reader below reads that open file: a path
    # swapped after the checks (for a FIFO, a huge file, other weights) is never read. Links are followed,
    # as by ``os.stat`` above: a zoo confines its own links (equishift.zoo) before calling this.
    try:
        fd = os.open(raw, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise CheckpointError(f"{name}: cannot be read: {_os_problem(e)} ({shown})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        _check_stat(st, name, shown, max_bytes, opened=True)
        head = f.read(16)
        f.seek(0)
        if _looks_like_safetensors(head):
            obj: object = _load_safetensors(f, raw, st, name)
        elif head.startswith(b"PK\x03\x04"):
            obj = _load_torch_zip(f, name, max_bytes, stand_ins)
        elif head[:1] == b"\x80" and 2 <= head[1] <= 5:
            obj = _load_torch_legacy(f, name, st.st_size, stand_ins)
        else:
            raise CheckpointError(f"{name}: not a checkpoint ({_describe(head)}); expected a .safetensors "
                                  "file or a torch.save state dict (.pt/.pth/.bin)")
        if _identity(os.fstat(fd)) != _identity(st):   # rewritten in place while it was being read
            raise CheckpointError(_changed(name))
    return obj


def _check_stat(st: os.stat_result, name: str, shown: str, max_bytes: int, opened: bool = False) -> None:
    if not stat.S_ISREG(st.st_mode):
        changed = " (the path changed while being opened)" if opened else ""
        raise CheckpointError(f"{name}: {_not_regular(st.st_mode)}, not a regular file{changed} ({shown})")
    if st.st_size == 0:
        raise CheckpointError(f"{name}: the file is empty (0 bytes), not a checkpoint")
    if st.st_size > max_bytes:
        raise CheckpointError(f"{name}: file is {_human(st.st_size)}, over the limit of {_human(max_bytes)} "
                              f"(max_bytes={max_bytes}); refused before reading")


def _identity(st: os.stat_result) -> Tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _changed(name: str) -> str:
    return (f"{name}: the file was replaced or changed while being loaded (it is not the file that was "
            "checked); refused, load it again once it is complete")


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object.
    return len(head) >= 9 and head[8:9] == b"{"


def _describe(head: bytes) -> str:
    """A few words on what the bytes are instead, for the "not a checkpoint" message."""
    known = ((b"\x89PNG", "it is a PNG image"), (b"\xff\xd8\xff", "it is a JPEG image"),
             (b"GIF8", "it is a GIF image"), (b"%PDF", "it is a PDF"), (b"\x1f\x8b", "it is gzip-compressed"),
             (b"\x93NUMPY", "it is a NumPy .npy array"), (b"\x89HDF", "it is an HDF5 (Keras) file"))
    for magic, text in known:
        if head.startswith(magic):
            return text
    try:
        head.decode("utf-8")
        return "it looks like a text file"
    except UnicodeDecodeError:
        return "unrecognised bytes"


# Linux names each open file here; opening that name opens the same file, whatever its path names now.
_PROC_FD = "/proc/self/fd"


def _load_safetensors(f: BinaryIO, raw: str, st: os.stat_result, name: str) -> Dict[str, torch.Tensor]:
    """Validate the header against the file size (to name truncation), then safetensors' own loader, on
    the open file ``f`` (through /proc/self/fd), or where that does not exist on ``raw`` when it is still
    the checked file (device, inode, size, mtime) before and after loading."""
    from safetensors.torch import load_file

    size = st.st_size
    (n,) = struct.unpack("<Q", f.read(8))
    if n > _MAX_SAFETENSORS_HEADER:
        raise CheckpointError(f"{name}: corrupt safetensors header (declares {n} bytes of JSON)")
    if n > size - 8:
        raise CheckpointError(f"{name}: truncated safetensors file (header of {n} bytes, file has "
                              f"{size} bytes)")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: corrupt safetensors header ({_short(e)})") from None
    except RecursionError:
        raise CheckpointError(f"{name}: corrupt safetensors header (its JSON is nested too deeply; a "
                              "valid header is 3 levels deep)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header (not a JSON object)")
    _check_safetensors_entries(header, name)
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2 and isinstance(v["data_offsets"][1], int)]
    needed = 8 + n + max(ends, default=0)
    if size < needed:
        raise CheckpointError(f"{name}: truncated safetensors file ({size} bytes, the header needs "
                              f"{needed}); download or copy it again")
    proc = os.path.join(_PROC_FD, str(f.fileno()))
    same_fd = os.path.exists(proc)
    if not same_fd:
        _still_the_checked_file(raw, st, name)
    try:
        state = load_file(proc if same_fd else raw, device="cpu")
    except Exception as e:  # SafetensorError and friends: the header was plausible, the body is not
        raise CheckpointError(f"{name}: corrupt safetensors file ({_short(e)})") from None
    if not same_fd:
        _still_the_checked_file(raw, st, name)
    return state


def _still_the_checked_file(raw: str, st: os.stat_result, name: str) -> None:
    try:
        now = os.stat(raw)
    except OSError:
        raise CheckpointError(_changed(name)) from None
    if _identity(now) != _identity(st):
        raise CheckpointError(_changed(name))


_SAFETENSORS_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64",
                       "F64", "C64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}


def _check_safetensors_entries(header: dict, name: str) -> None:
    """Each entry is {dtype: str, shape: [int ...], data_offsets: [int, int]} and __metadata__ maps str to
    str: safetensors' own format, checked here so that odd JSON (nested lists, floats, strings) is named."""
    for key, entry in header.items():
        shown = shorten(key, 60)
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{name}: corrupt safetensors header (__metadata__ must map names to "
                                      "strings)")
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(type(o) is int and o >= 0 for o in entry["data_offsets"])):
            raise CheckpointError(f"{name}: corrupt safetensors header (entry {shown!r} is not "
                                  "{dtype, shape: [int…], data_offsets: [begin, end]})")
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: tensor {shown!r} has the unknown dtype "
                                  f"{shorten(entry['dtype'], 20)!r}")


def _load_torch_zip(f: BinaryIO, name: str, max_bytes: int, stand_ins: Dict[str, type]) -> object:
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
            total = sum(i.file_size for i in infos)
            if total > max_bytes:
                raise CheckpointError(f"{name}: unpacks to {_human(total)}, over the limit of "
                                      f"{_human(max_bytes)} (max_bytes={max_bytes})")
            names = [i.filename for i in infos]
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                raise CheckpointError(f"{name}: is a TorchScript archive (running it executes code), "
                                      f"refused; {_SAFE_HINT}")
            pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise CheckpointError(f"{name}: a zip file but not a torch.save checkpoint (no data.pkl)")
            _check_zip_members(infos, pkl[0], name)
            payload = z.read(pkl[0])
    except CheckpointError:
        raise
    except Exception as e:  # BadZipFile, EOFError, NotImplementedError (odd compression), ...
        raise CheckpointError(f"{name}: truncated or corrupt PyTorch checkpoint ({_short(e)})") from None
    _refuse_unsafe_globals(pickle_globals(payload, name), name, stand_ins)
    return _torch_load(f, name, stand_ins)


def _check_zip_members(infos: List[zipfile.ZipInfo], pkl: str, name: str) -> None:
    """Refuse from the declared sizes, before anything is inflated: a member whose declared size is far
    above its compressed size (a zip bomb), and a pickle larger than a state dict's ever is. zipfile
    never inflates a member past its declared size, so the declared sizes bound what reading costs."""
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > 2**20 \
                and info.file_size > _MAX_ZIP_RATIO * max(info.compress_size, 1):
            raise CheckpointError(
                f"{name}: member {shorten(info.filename, 60)!r} inflates from {_human(info.compress_size)} to "
                f"{_human(info.file_size)} (over {_MAX_ZIP_RATIO}× compression, a zip bomb); refused unread")
    size = next(i.file_size for i in infos if i.filename == pkl)
    if size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{name}: its pickle ({shorten(pkl, 60)}) is {_human(size)}, over the limit of "
                              f"{_human(MAX_PICKLE_BYTES)} for a state dict's pickle (MAX_PICKLE_BYTES); "
                              f"refused unread; {_SAFE_HINT}")


def _load_torch_legacy(f: BinaryIO, name: str, size: int, stand_ins: Dict[str, type]) -> object:
    # Legacy torch.save: 5 consecutive pickles (magic, protocol, sys info, object, storage keys), then raw
    # storage bytes; a plain pickle is one. Scan all pickles that precede the raw bytes.
    # Streamed: the raw storage bytes after the pickles are never read.
    _refuse_unsafe_globals(pickle_globals(f, name, max_pickles=5), name, stand_ins)
    f.seek(0)
    try:
        declared = _legacy_storage_bytes(f)
    except Exception as e:  # pickletools raises ValueError, UnicodeDecodeError, MemoryError, ...
        raise CheckpointError(f"{name}: truncated or corrupt PyTorch checkpoint ({_short(e)})") from None
    # The legacy loader allocates each storage at its pickled size before reading it (the zip loader
    # checks the record size first): a lying size would be a memory bomb.
    if declared > size:
        raise CheckpointError(f"{name}: declares {_human(declared)} of tensor data but the file holds "
                              f"{_human(size)}; truncated or corrupt PyTorch checkpoint")
    return _torch_load(f, name, stand_ins)


def _legacy_storage_bytes(stream: BinaryIO) -> int:
    """Bytes of tensor data the object pickle of a legacy torch.save file declares, found statically.

    Each storage is a persistent id ('storage', <dtype>Storage, key, location, numel, ...): the numel is
    the first integer after the two strings that follow the storage class."""
    for _ in range(3):                                 # skip magic number, protocol, sys info
        for _op in pickletools.genops(stream):
            pass
    total, storage_class, strings = 0, None, 0
    for kind, arg in _bounded_ops(stream):
        if kind in _STRING_OPS and arg == "storage":
            storage_class, strings = "", 0
        elif storage_class == "" and kind == "GLOBAL":
            storage_class = str(arg).split(" ")[-1]
        elif storage_class and kind in _STRING_OPS:
            strings += 1
        elif storage_class and strings >= 2 and kind in ("BININT", "BININT1", "BININT2", "LONG1", "INT"):
            total += int(arg) * _STORAGE_ELEMENT_BYTES.get(storage_class, 1)
            storage_class = None
    return total


# torch's legacy typed storages; an unknown name counts 1 byte per element (never refuses a valid file).
_STORAGE_ELEMENT_BYTES = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
                          "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
                          "ByteStorage": 1, "BoolStorage": 1, "ComplexDoubleStorage": 16,
                          "ComplexFloatStorage": 8, "UntypedStorage": 1}


def _torch_load(f: BinaryIO, name: str, stand_ins: Dict[str, type]) -> object:
    try:
        # The checked open file, not the path: the path may name another file by now, and torch.load
        # hands any path ending in .safetensors to safetensors (content decides here, not names).
        f.seek(0)
        if stand_ins:
            # Still torch's weights-only unpickler (every pickle of the file, every opcode vetted);
            # the stand-ins are only registered as allowed names for this call.
            with torch.serialization.safe_globals([(cls, key) for key, cls in stand_ins.items()]):
                return torch.load(f, map_location="cpu", weights_only=True)
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(_code_message(name, found)) from None
        # torch's refusal of an opcode rather than a name (e.g. BUILD on a class): its own one-line reason
        why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise CheckpointError(f"{name}: refused by torch's weights-only unpickler "
                              f"({_short_text(why.group(1) if why else str(e))}); {_SAFE_HINT}") from None
    except MemoryError:
        raise CheckpointError(f"{name}: declares more tensor data than there is memory; corrupt?") from None
    except Exception as e:  # the globals were vetted: anything else is a damaged file, in torch's words
        raise CheckpointError(f"{name}: truncated or corrupt PyTorch checkpoint ({_short(e)})") from None


def _short_text(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ------------------------------------------------------------------------------------ pickle inspection

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}


def pickle_globals(data: Union[bytes, BinaryIO], name: str = "checkpoint", *, max_pickles: int = 1) -> Set[str]:
    """Every ``module.name`` a pickle stream imports (GLOBAL, INST, STACK_GLOBAL), found without running it.

    A STACK_GLOBAL whose operands are not literal strings is reported as ``<dynamic STACK_GLOBAL>``.
    Reads up to ``max_pickles`` consecutive pickles; raises CheckpointError if the first is malformed."""
    found: Set[str] = set()
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    for index in range(max_pickles):
        if not stream.read(1):
            break
        stream.seek(-1, io.SEEK_CUR)
        try:
            found |= _globals_of_one_pickle(stream)
        except _PickleTooLarge:
            raise CheckpointError(f"{name}: a pickle of more than {_human(MAX_PICKLE_BYTES)} or "
                                  f"{MAX_PICKLE_OPS:,} opcodes, over the limit for a state dict's pickle "
                                  f"(MAX_PICKLE_BYTES, MAX_PICKLE_OPS); refused unread; {_SAFE_HINT}") from None
        except Exception as e:  # pickletools raises ValueError and others on garbage
            if index == 0:
                raise CheckpointError(f"{name}: truncated or corrupt pickle stream ({_short(e)})") from None
            break  # raw storage bytes after the last pickle of a legacy file
    return found


def _resolved_ops(stream: BinaryIO) -> Iterator[Tuple[str, object]]:
    """(opcode name, argument) for each opcode of one pickle, with memo fetches (GET, BINGET, ...) replaced
    by the item that was memoized: a string or GLOBAL pickled once and fetched again is seen again."""
    memo: Dict[int, Tuple[str, object]] = {}
    last: Tuple[str, object] = ("NONE", None)
    for op, arg, _ in pickletools.genops(stream):
        kind = op.name
        if kind == "MEMOIZE":
            memo[len(memo)] = last
        elif kind in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = last
        else:
            if kind in ("GET", "BINGET", "LONG_BINGET"):
                last = memo.get(int(arg), ("GET", None))
            elif kind in _STRING_OPS and isinstance(arg, bytes):
                last = (kind, arg.decode("latin-1"))
            else:
                last = (kind, arg)
            yield last


class _PickleTooLarge(Exception):
    pass


def _bounded_ops(stream: BinaryIO) -> Iterator[Tuple[str, object]]:
    """``_resolved_ops`` that stops with _PickleTooLarge past MAX_PICKLE_BYTES of the stream: the scan
    costs ~0.5 s per MiB, and a state dict's pickle is far smaller."""
    start = stream.tell()
    for i, item in enumerate(_resolved_ops(stream)):
        if i % 4096 == 0 and (i > MAX_PICKLE_OPS or stream.tell() - start > MAX_PICKLE_BYTES):
            raise _PickleTooLarge()
        yield item


def _globals_of_one_pickle(stream: BinaryIO) -> Set[str]:
    found: Set[str] = set()
    recent: List[Tuple[str, object]] = []
    for kind, arg in _bounded_ops(stream):
        if kind in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.add(_python3_name(module, attr))
        elif kind == "STACK_GLOBAL":
            operands = recent[-2:]
            if len(operands) == 2 and all(k in _STRING_OPS for k, _ in operands):
                found.add(_python3_name(str(operands[0][1]), str(operands[1][1])))
            else:
                found.add("<dynamic STACK_GLOBAL>")
        recent.append((kind, arg))
        del recent[:-2]   # STACK_GLOBAL needs the two values before it; keep memory bounded
    return found


def _python3_name(module: str, attr: str) -> str:
    # Protocol-2 pickles (torch.save's default) spell builtins "__builtin__"; map them as pickle and torch do.
    if (module, attr) in NAME_MAPPING:
        module, attr = NAME_MAPPING[(module, attr)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{attr}"


def _allowed_globals() -> Set[str]:
    """torch's weights_only allowlist (built-in plus user-registered), as ``module.name`` strings."""
    allowed: Set[str] = set()
    try:
        from torch import _weights_only_unpickler as wou
        allowed |= set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())
    except (ImportError, AttributeError):   # a torch without these helpers: let torch.load decide alone
        return set()
    return allowed


def _refuse_unsafe_globals(found: Set[str], name: str, stand_ins: Mapping[str, type] = {}) -> None:
    allowed = _allowed_globals()
    if not allowed:
        if stand_ins:  # without torch's list nothing can vouch for the other globals
            raise CheckpointError(f"{name}: this torch has no weights-only allowlist; cannot read it safely")
        return
    allowed |= set(stand_ins)
    # torch.* names outside the list are left to torch.load, which knows its own special cases.
    unsafe = sorted(g for g in found if g not in allowed and not g.startswith("torch."))
    if unsafe:
        raise CheckpointError(_code_message(name, unsafe, whole_model=_is_module_pickle(found)))


def _is_module_pickle(found: Iterable[str]) -> bool:
    return any(g.startswith("torch.nn.modules.") for g in found)


def _code_message(name: str, globals_: List[str], whole_model: bool = False) -> str:
    shown = ", ".join(globals_[:3]) + (f" and {len(globals_) - 3} more" if len(globals_) > 3 else "")
    if whole_model or _is_module_pickle(globals_):
        # torch.save(model) instead of torch.save(model.state_dict()): common, and harmless-looking.
        return (f"{name}: contains pickled code (a whole pickled model object: {shown}), refused; "
                f"{_SAFE_HINT}")
    return f"{name}: contains pickled code ({shown}), refused; {_SAFE_HINT}"


# ------------------------------------------------------------------------------------ state-dict shape

def _unwrap(obj: object, name: str) -> Dict[str, torch.Tensor]:
    """The flat name → tensor dict inside common wrappers, without DDP/compile prefixes."""
    if isinstance(obj, nn.Module):  # cannot happen with weights_only, but say it clearly if it does
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and _all_tensors(inner):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: holds a {type(obj).__name__}, not a state dict (name → tensor)")
    if not obj:
        raise CheckpointError(f"{name}: contains no tensors (an empty state dict)")
    if not _all_tensors(obj):
        bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        raise CheckpointError(f"{name}: not a state dict: {len(bad)} entries are not tensors, e.g. "
                              f"{', '.join(bad[:3])}; expected name → tensor (or a 'state_dict'/'model' "
                              "entry holding one)")
    state = {str(k): v for k, v in obj.items()}
    odd = [k for k, v in state.items() if v.is_nested or v.layout != torch.strided]
    if odd:
        shown = ", ".join(shorten(k, 60) for k in odd[:3]) + (", ..." if len(odd) > 3 else "")
        raise CheckpointError(f"{name}: {len(odd)} tensor(s) are nested or sparse ({shown}); a model's state "
                              "dict holds plain dense tensors only")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _all_tensors(mapping: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def _finite(v: torch.Tensor) -> bool:
    try:
        return bool(torch.isfinite(v).all())
    except (NotImplementedError, RuntimeError):   # float8 and other narrow dtypes: check a float32 copy
        return bool(torch.isfinite(v.float()).all())


def _warn_non_finite(state: Mapping[str, torch.Tensor], name: str) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() or v.is_complex() if not _finite(v)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"{name}: NaN or Inf values in {len(bad)} tensor(s): {shown}; the model's outputs "
                      "will be meaningless", CheckpointWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------- applying

def apply_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy ``state_dict`` into ``model`` (in place, keeping its device and dtype).

    Raises CheckpointError listing missing keys, unexpected keys (with counts and a few names) and shape
    mismatches (checkpoint shape vs model shape). With ``strict=False`` missing and unexpected keys are
    tolerated; shape mismatches never are."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointError(_mismatch_message(model, expected, missing, unexpected, mismatched, strict))
    try:
        model.load_state_dict(dict(state_dict), strict=strict)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise CheckpointError(f"weights do not fit {type(model).__name__}: {_short(e)}") from None


def _mismatch_message(model: nn.Module, expected: Mapping, missing: List[str], unexpected: List[str],
                      mismatched: list, strict: bool) -> str:
    def few(keys: List[str]) -> str:
        return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")

    parts = []
    if missing and strict:
        parts.append(f"{len(missing)} missing key(s) ({few(missing)})")
    if unexpected and strict:
        parts.append(f"{len(unexpected)} unexpected key(s) ({few(unexpected)})")
    if mismatched:
        shown = "; ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched[:4])
        parts.append(f"{len(mismatched)} shape mismatch(es) ({shown}{'; ...' if len(mismatched) > 4 else ''})")
    text = f"weights do not fit {type(model).__name__}: " + ", ".join(parts)
    shared = len(expected) - len(missing)
    if expected and shared < len(expected) / 2:
        text += (f". Only {shared} of the model's {len(expected)} keys are in the checkpoint: these look "
                 "like the keys of another architecture")
    elif mismatched:
        text += ". Same architecture, other sizes (e.g. number of classes, width or patch size)"
    return text


# --------------------------------------------------------------------------------------------- saving

def save_weights(model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]], path: PathLike) -> None:
    """Write the weights as safetensors, atomically (a reader never sees a half-written file)."""
    from safetensors.torch import save_file

    state = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module)
             else model_or_state_dict)
    if not isinstance(state, Mapping) or not _all_tensors(state):
        raise CheckpointError("save_weights needs a model or a mapping of str → tensor")
    # Clones break storage sharing (tied weights), which safetensors refuses to write.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
