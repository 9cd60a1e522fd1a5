"""Hostile inputs on the ways to weights other than the weights file itself: specs and the dashboard's
option boxes (``spec``), constructor options (``options``), zoo cards and their weights files (``card``)
and the dashboard's upload store (``upload``). Every case is built here, in a temporary folder, from a few
kilobytes (sparse files for the "huge" ones), and carries its expectation: a named error (type and a
piece of its message) or a correct load (a check of what was loaded).

    from corpus_weights import weights_cases, weights_corpus
    for case in weights_cases(tmp):        # WeightsCase: cls, name, run, error, match, check
        ...
    for cls, name, run in weights_corpus(tmp):   # run() does the case: returns, or raises
        ...

Nothing here runs at import; building the cases writes only under ``tmp``. The ``upload`` cases need
``dashboard.sources`` (streamlit) and point its upload folder at ``tmp``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import torch

from equishift.errors import CheckpointError, EquishiftError, ModelSpecError

__all__ = ["WeightsCase", "weights_cases", "weights_corpus", "run_case", "verdict", "expectation_table", "CLASSES",
           "TINY", "TINY_OPTIONS"]

CLASSES = ("spec", "options", "card", "upload")
TINY = "vit_tiny_patch16_224"
TINY_OPTIONS = "img_size=32&patch_size=4&embed_dim=32&depth=1&num_heads=2&num_classes=3"


@dataclass(frozen=True)
class WeightsCase:
    cls: str                                   # one of CLASSES
    name: str
    run: Callable[[], Any]                     # does the case: returns (a load) or raises
    error: Optional[type] = None               # the EquishiftError subclass expected; None: must load
    match: str = ""                            # a piece of the error message
    check: Optional[Callable[[Any], bool]] = None   # for a load: what run() returned is right
    ok_text: str = "loads; what was loaded is checked"   # the expectation in words, when not an error

    @property
    def ok(self) -> bool:
        return self.error is None


def weights_corpus(tmp: Path) -> List[Tuple[str, str, Callable[[], Any]]]:
    """(class, case, run) for every case: the shape bench/hostile_inputs.py times."""
    return [(c.cls, c.name, c.run) for c in weights_cases(tmp)]


class _Payload:
    """Pickles to a call of os.system that would create ``marker``: proof of execution if it exists."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _load(spec: str, **kw):
    from equishift.zoo import load_model

    return load_model(spec, device="cpu", **kw)


def _tiny_weights(path: Path, num_classes: int = 3, seed: int = 0) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(TINY, img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                              num_classes=num_classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _bytes_card(d: Path, name: str, data: bytes) -> Callable[[], Any]:
    (d / f"{name}.json").write_bytes(data)
    return lambda: _load(f"zoo:{name}", root=d)


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)   # no disk blocks: a "huge" file that costs nothing
    return path


def _same_weights(path: Path):
    from safetensors.torch import load_file

    want = load_file(str(path))
    return lambda loaded: all(torch.equal(v, want[k]) for k, v in loaded.model.state_dict().items() if k in want)


# --- spec: the grammar and the option boxes --------------------------------------------------------
def _spec_cases(tmp: Path) -> List[WeightsCase]:
    d = tmp / "spec"
    d.mkdir(parents=True, exist_ok=True)
    marker = d / "PAYLOAD_RAN"
    payload = d / "payload.pth"
    payload.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    good = _tiny_weights(d / "good.safetensors")
    T = f"timm:{TINY}"

    def box(name: str, options: str, path: Optional[str] = None):
        from dashboard.sources import _timm_spec

        return lambda: _load(_timm_spec(name, options, path=path))

    cases = [WeightsCase("spec", f"option {k}={label}", (lambda k=k, v=v: _load(f"{T}?{k}={v}")), ModelSpecError,
                         "not allowed here")
             for k, v, label in (("checkpoint_path", payload, "a pickle with code"),
                                 ("checkpoint_path", "/etc/shadow", "/etc/shadow"),
                                 ("pretrained_cfg_overlay", f"file={payload}", "file=…"),
                                 ("pretrained_cfg", "x", "x"), ("file", payload, "a pickle"), ("cache_dir", d, "a folder"),
                                 ("hf_hub_id", "timm/x", "timm/x"), ("state_dict", "x", "x"),
                                 ("my_model_path", payload, "a pickle"))]
    cases += [
        WeightsCase("spec", "empty path after @", lambda: _load(f"{T}?num_classes=10@"), ModelSpecError,
                    "'@' must be followed by a weights file path"),
        WeightsCase("spec", "blank path after @", lambda: _load(f"{T}@   "), ModelSpecError, "'@' must be followed"),
        WeightsCase("spec", "1 MB spec", lambda: _load(f"{T}?depth=" + "9" * 2 ** 20), ModelSpecError,
                    "over the limit of 4096"),
        WeightsCase("spec", "name with a path", lambda: _load(f"timm:../../{TINY}?depth=1"), ModelSpecError,
                    "not a timm model name"),
        WeightsCase("spec", "paper spec with checkpoint_path",
                    lambda: _load(f"paper:polyvit:vit_small_patch16_224?checkpoint_path={payload}@{good}"),
                    ModelSpecError, "not allowed here"),
        WeightsCase("spec", "weights path with pickled code (through equishift.checkpoint)",
                    lambda: _load(f"{T}?{TINY_OPTIONS}@{payload}"), CheckpointError, "pickled code"),
        WeightsCase("spec", "options box: checkpoint_path", box(TINY, f"checkpoint_path={payload}"), ModelSpecError,
                    "not allowed here"),
        WeightsCase("spec", "options box: '@' starts a path", box(TINY, "num_classes=3@/etc/shadow"), EquishiftError,
                    "may not contain '@'"),
        WeightsCase("spec", "name box: '@' starts a path", box(f"{TINY}@/etc/shadow", ""), EquishiftError,
                    "may not contain '@'"),
        WeightsCase("spec", "options box: empty options and a file (loads)", box(TINY, TINY_OPTIONS, str(good)),
                    check=_same_weights(good)),
        WeightsCase("spec", "timm:NAME?options@PATH (loads)", lambda: _load(f"{T}?{TINY_OPTIONS}@{good}"),
                    check=_same_weights(good)),
        WeightsCase("spec", "payload never ran", lambda: marker.exists(), check=lambda ran: ran is False,
                    ok_text="its marker file does not exist"),
    ]
    return cases


# --- options: whitelist, ranges and the size of the model --------------------------------------------
def _options_cases(tmp: Path) -> List[WeightsCase]:
    T = f"timm:{TINY}"

    def refused(name: str, query: str, match: str) -> WeightsCase:
        return WeightsCase("options", name, lambda: _load(f"{T}?{query}"), ModelSpecError, match)

    def paper_api(**kw):
        from equishift.paper import paper_model

        return lambda: paper_model("polyvit", "vit_small_patch16_224", num_classes=3, **kw)

    return [
        refused("depth=100000", "depth=100000", "depth=100000 is out of range: integer 1–64"),
        refused("img_size=20000", "img_size=20000", "img_size=20000 is out of range"),
        refused("negative patch", "patch_size=-4", "out of range"),
        refused("num_classes=0", "num_classes=0", "out of range"),
        refused("NaN drop rate", "drop_rate=nan", "drop_rate=nan is out of range"),
        refused("infinite mlp_ratio", "mlp_ratio=inf", "out of range"),
        refused("bool for an int", "in_chans=true", "out of range"),
        refused("string for an int", "embed_dim=wide", "out of range"),
        refused("odd pooling", "global_pool=__import__", "out of range"),
        refused("unknown option", "act_layer=os.system", "unknown constructor option 'act_layer'; allowed: img_size"),
        refused("option twice", "depth=1&depth=2", "more than once"),
        refused("in range, 51 G parameters", "embed_dim=8192&depth=64&num_heads=64",
                "over the limit of 2.00 GiB"),
        refused("in range, default depth: 9.7 G parameters (meta estimate)", "embed_dim=8192&num_heads=64",
                "would hold 9,681 M parameters and buffers"),
        refused("in range, 768 GiB attention map", "img_size=1024&patch_size=2",
                "over the limit of 1.00 GiB"),
        WeightsCase("options", "vit_huge (631 M parameters) by name", lambda: _load("timm:vit_huge_patch14_224"),
                    ModelSpecError, "over the limit of 2.00 GiB"),
        WeightsCase("options", "paper_model(depth=100000) through the API", paper_api(depth=100000), ModelSpecError,
                    "out of range"),
        WeightsCase("options", "paper_model(checkpoint_path=…) through the API", paper_api(checkpoint_path="/etc/shadow"),
                    ModelSpecError, "not allowed here"),
        WeightsCase("options", "tiny ViT in range (loads)", lambda: _load(f"{T}?{TINY_OPTIONS}"),
                    check=lambda m: m.model.num_classes == 3 and m.input_size == (3, 32, 32)),
        WeightsCase("options", "tiny ViT, seed 3 (loads)", lambda: _load(f"{T}?{TINY_OPTIONS}&seed=3"),
                    check=lambda m: m.card["seed"] == 3),
    ]


# --- cards: the file, its JSON, its schema, its weights file -----------------------------------------
def _card_cases(tmp: Path) -> List[WeightsCase]:
    d = tmp / "cards"
    d.mkdir(parents=True, exist_ok=True)
    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    weights = _tiny_weights(d / "base.safetensors", num_classes=3)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    good = {"name": "good", "timm_class": "VisionTransformer",
            "arch_config": dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3),
            "anchoring": "none", "classes": ["a", "b", "c"], "input_size": [3, 32, 32], "mean": [0.5] * 3,
            "std": [0.25] * 3, "pad": 0, "dataset": None, "untrained": True, "weights_sha256": sha}

    def card(name: str, body: Any = None, *, text: Optional[str] = None, weights_from: Optional[Path] = weights,
             **changes) -> Callable[[], Any]:
        """Writes NAME.json (``body``, or ``good`` with ``changes``; None values delete a key) and a copy of
        the weights next to it; returns the loader."""
        if text is None:
            value = body if body is not None else {k: v for k, v in {**good, **changes}.items() if v is not None
                                                   or k == "dataset"}
            text = json.dumps(value)
        (d / f"{name}.json").write_text(text)
        if weights_from is not None:
            (d / f"{name}.safetensors").write_bytes(weights_from.read_bytes())
        return lambda: _load(f"zoo:{name}", root=d)

    def case(name: str, run, error=ModelSpecError, match: str = "", check=None) -> WeightsCase:
        return WeightsCase("card", name, run, error, match, check)

    cases = [case(f"card is {label}", card(f"top-{i}", text=text), match="must be a JSON object")
             for i, (label, text) in enumerate((("5", "5"), ("null", "null"), ("a list", "[1, 2]"),
                                                ("a string", '"zoo"'), ("true", "true")))]
    deep = "[" * 10000 + "]" * 10000
    cases += [
        case("card nested 10000 deep", card("deep", text=deep), match="nested"),
        case("field nested 10000 deep", card("deep-field", text=json.dumps(good)[:-1] + f', "training": {deep}}}'),
             match="nested"),
        case("card of 2 MB", card("big", text=json.dumps({**good, "notes": "x" * 2 * 2 ** 20})),
             match="over the limit of 1048576 bytes"),
        case("card truncated JSON", card("bad-json", text='{"name": '), match="not valid JSON"),
        case("card not UTF-8", _bytes_card(d, "latin", b'{"name": "\xff"}'), match="not valid JSON"),
        case("NaN in mean", card("nan", text=json.dumps(good).replace("0.5, 0.5, 0.5", "NaN, 0.5, 0.5")),
             match="not valid JSON"),
        case("1e999 in std", card("inf", text=json.dumps(good).replace("0.25, 0.25, 0.25", "1e999, 0.25, 0.25")),
             match="not valid JSON"),
        case("5000-digit integer", card("digits", text=json.dumps(good).replace('"pad": 0', '"pad": ' + "9" * 5000)),
             match="not valid JSON"),
        case("input_size 20000²", card("huge-input", input_size=[3, 20000, 20000]),
             match="field input_size/1: 20000 is out of range (must be at most 1024)"),
        case("input_size of strings", card("str-input", input_size=["3", 32, 32]),
             match="field input_size/0: must be integer, got str"),
        case("input_size of 2", card("short-input", input_size=[32, 32]), match="field input_size"),
        case("classes is 5", card("classes5", classes=5), match="field classes: must be array"),
        case("class name of 1 MB", card("longclass", classes=["x" * 900_000]), match="900000 characters"),
        case("mean for 2 channels", card("mean2", mean=[0.5, 0.5]), match="field mean: 2 values for 3"),
        case("std zero", card("std0", std=[0.0, 0.25, 0.25]), match="field std/0"),
        case("pad swallows the image", card("pad", pad=16), match="field pad"),
        case("timm_class create_model", card("cls", timm_class="create_model"), match="field timm_class"),
        case("timm_model with a path", card("tmodel", timm_model="../../etc/passwd"), match="field timm_model"),
        case("arch_config a list", card("ac-list", arch_config=[1, 2]), match="arch_config"),
        case("arch_config checkpoint_path", card("ac-ckpt", arch_config={**good["arch_config"],
                                                                          "checkpoint_path": str(weights)}),
             match="not allowed here"),
        case("arch_config depth=100000", card("ac-depth", arch_config={**good["arch_config"], "depth": 100000}),
             match="depth=100000 is out of range"),
        case("arch_config in range, 51 G parameters",
             card("ac-big", arch_config={**good["arch_config"], "embed_dim": 8192, "depth": 64, "num_heads": 64}),
             match="over the limit of 2.00 GiB"),
        case("arch_config default depth: 9.7 G parameters (meta estimate)",
             card("ac-meta", arch_config={k: v for k, v in good["arch_config"].items() if k != "depth"}
                  | {"embed_dim": 8192, "num_heads": 64}), match="would hold"),
        case("Twins arch_config, 8 stages of 64 blocks", card("ac-twins", timm_class="Twins", arch_config=dict(
            img_size=32, patch_size=4, embed_dims=[8192] * 8, num_heads=[128] * 8, mlp_ratios=[16] * 8, depths=[64] * 8,
            wss=[4] * 8, sr_ratios=[1] * 8, num_classes=3)), match="512 blocks, over the limit of 96"),
        case("input_size 1024² with patch 1", card("act", input_size=[3, 1024, 1024],
                                                   arch_config={**good["arch_config"], "img_size": 1024,
                                                                "patch_size": 1}),
             match="over the limit of 1.00 GiB"),
        case("anchor_options holds an object", card("aopt", anchoring="full", anchor_options={"pos_init": {"a": 1}}),
             match="field anchor_options/pos_init"),
        case("no weights_sha256", card("nosha", weights_sha256=None), match="lacks weights_sha256"),
        case("weights_sha256 not hex", card("badsha", weights_sha256="z" * 64), match="field weights_sha256"),
        case("tampered weights", card("tampered", weights_from=_tiny_weights(d / "other.bin", num_classes=3, seed=1)),
             CheckpointError, "does not match the sha256"),
    ]
    # Files that are not what they seem. Each is planted after card() wrote the regular copy.
    fifo_card = d / "fifo-card.json"
    os.mkfifo(fifo_card)
    (d / "fifo-card.safetensors").write_bytes(weights.read_bytes())
    cases.append(case("card is a FIFO", lambda: _load("zoo:fifo-card", root=d), match="not a regular file"))
    for label, target, error, match in (
            ("weights link to /dev/zero", Path("/dev/zero"), CheckpointError, "outside the zoo folder"),
            ("weights link to a 3 GiB file outside", _sparse(outside / "huge.bin", 3 * 2 ** 30), CheckpointError,
             "outside the zoo folder"),
            ("weights link to a 3 GiB file inside", _sparse(d / "huge-inside.bin", 3 * 2 ** 30), CheckpointError,
             "refused before hashing"),
            ("weights link to nothing", d / "nothing.safetensors", CheckpointError, "is missing"),
            ("weights link loop", d / "loop.safetensors", CheckpointError, "cannot read")):
        name = label.replace(" ", "-").replace("/", "")
        card(name, weights_from=None)
        (d / f"{name}.safetensors").symlink_to(target)
        if label.endswith("loop"):
            target.symlink_to(d / f"{name}.safetensors")
        cases.append(case(label, lambda name=name: _load(f"zoo:{name}", root=d), error, match))
    card("fifo-weights", weights_from=None)
    os.mkfifo(d / "fifo-weights.safetensors")
    cases.append(case("weights file is a FIFO", lambda: _load("zoo:fifo-weights", root=d), CheckpointError,
                      "not a regular file"))
    card("sparse-weights", weights_from=None)
    _sparse(d / "sparse-weights.safetensors", 3 * 2 ** 30)
    cases.append(case("weights file of 3 GiB", lambda: _load("zoo:sparse-weights", root=d), CheckpointError,
                      "refused before hashing"))
    card("linked-inside", weights_from=None)
    (d / "linked-inside.safetensors").symlink_to(weights)
    cases.append(case("weights link to a file inside (loads)", lambda: _load("zoo:linked-inside", root=d), None,
                      check=_same_weights(weights)))
    cases.append(case("valid card (loads)", card("good"), None, check=lambda m: m.classes == ["a", "b", "c"]
                      and _same_weights(weights)(m)))
    return cases


# --- upload store ------------------------------------------------------------------------------------
STORED = "stored and returned: our regular file, holding the upload's bytes"


def _upload_cases(tmp: Path) -> List[WeightsCase]:
    d = tmp / "uploads-root"
    data = b"uploaded weights " * 64
    digest = hashlib.sha256(data).hexdigest()
    secret = tmp / "secret.txt"
    secret.write_text("not for the page")

    def store(folder: Optional[Path]):
        """The upload saved with the store's folder set to ``folder`` (None: the default, a new private
        folder under the temporary directory, here ``tmp``); the module's settings are restored after."""
        import tempfile

        import dashboard.sources as sources

        saved = sources._UPLOAD_DIR, tempfile.tempdir
        sources._UPLOAD_DIR, tempfile.tempdir = folder, str(tmp)
        try:
            return Path(sources._saved_upload(data, "mine.safetensors"))
        finally:
            sources._UPLOAD_DIR, tempfile.tempdir = saved

    def holds_upload(p: Path) -> bool:
        st = os.lstat(p)
        return (p.is_file() and not p.is_symlink() and st.st_uid == os.getuid() and p.read_bytes() == data
                and os.lstat(p.parent.parent).st_mode & 0o077 == 0 and secret.read_text() == "not for the page")

    def planted(name: str, plant: Callable[[Path], None]) -> WeightsCase:
        folder = d / name

        def run():
            entry = folder / digest[:32]
            entry.mkdir(parents=True, exist_ok=True)
            plant(entry)
            return store(folder)

        return WeightsCase("upload", name, run, check=holds_upload, ok_text=STORED)

    def other_bytes(entry: Path):
        (entry / "mine.safetensors").write_bytes(b"planted weights")

    def link_to_secret(entry: Path):
        (entry / "mine.safetensors").symlink_to(secret)

    def folder_in_its_place(entry: Path):
        (entry / "mine.safetensors").mkdir()

    def entry_is_link(entry: Path):
        entry.rmdir()
        other = tmp / "elsewhere"
        other.mkdir(exist_ok=True)
        (other / "mine.safetensors").write_bytes(data)   # the right bytes, in a folder that is not ours to use
        entry.symlink_to(other)

    def same_bytes_other_mode(entry: Path):
        (entry / "mine.safetensors").write_bytes(data)   # an earlier upload of this process: reused as is

    def loose_folder():
        folder = d / "mode-0777"
        folder.mkdir(parents=True)
        os.chmod(folder, 0o777)
        return store(folder)

    def folder_is_link():
        real = tmp / "real-folder"
        real.mkdir(exist_ok=True)
        (d / "linked-folder").parent.mkdir(parents=True, exist_ok=True)
        (d / "linked-folder").symlink_to(real)
        return store(d / "linked-folder")

    def default_folder():
        """The old fixed path <tmp>/equishift-uploads/<sha>/ holds planted bytes: the default folder is a
        fresh one of this process, so they are never looked at."""
        fixed = tmp / "equishift-uploads" / digest[:32]
        fixed.mkdir(parents=True, exist_ok=True)
        (fixed / "mine.safetensors").write_bytes(b"planted weights")
        return store(None), fixed

    def clean():
        import tempfile

        import dashboard.sources as sources

        saved = sources._UPLOAD_DIR, tempfile.tempdir
        sources._UPLOAD_DIR, tempfile.tempdir = None, str(tmp)
        try:
            root = Path(sources._saved_upload(data, "mine.safetensors")).parent.parent
            sources.clean_uploads()
            return root, sources._UPLOAD_DIR
        finally:
            sources._UPLOAD_DIR, tempfile.tempdir = saved

    cases = [
        planted("planted file with other bytes", other_bytes),
        planted("planted link to another file", link_to_secret),
        planted("planted folder under the file name", folder_in_its_place),
        planted("planted link as the entry folder", entry_is_link),
        planted("entry with the same bytes (reused)", same_bytes_other_mode),
        WeightsCase("upload", "upload folder mode 0777 is made private", loose_folder, check=holds_upload,
                    ok_text=STORED),
        WeightsCase("upload", "upload folder is a link", folder_is_link, EquishiftError, "is not a folder"),
        WeightsCase("upload", "old shared path ignored", default_folder,
                    check=lambda r: r[0].read_bytes() == data and r[1] not in r[0].parents
                    and (r[1] / "mine.safetensors").read_bytes() == b"planted weights"
                    and r[0].parent.parent.name.startswith("equishift-uploads-"),
                    ok_text="stored in a new private folder; the planted bytes are not read"),
        WeightsCase("upload", "clean_uploads removes the folder", clean,
                    check=lambda r: not r[0].exists() and r[1] is None, ok_text="the folder is gone"),
    ]
    def foreign():
        """A folder of another user: made by chown as root; otherwise "/" (root's) serves, and nothing is
        written, since the check comes first."""
        if os.getuid() == 0:
            folder = d / "foreign"
            folder.mkdir(parents=True)
            os.chown(folder, 65534, 65534)
        else:
            folder = Path("/")
        return store(folder)

    cases.append(WeightsCase("upload", "upload folder of another user", foreign, EquishiftError,
                             "belongs to another user"))
    return cases


def weights_cases(tmp: Path, classes=CLASSES) -> List[WeightsCase]:
    """Every case of ``classes``, its files written under ``tmp``."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    build = {"spec": _spec_cases, "options": _options_cases, "card": _card_cases, "upload": _upload_cases}
    return [c for cls in classes for c in build[cls](tmp)]


def expectation_table(cases: List[WeightsCase]) -> str:
    """Markdown: class, case, expected behaviour (what tests/test_weights_corpus.py checks for each)."""
    lines = ["| class | input | behaviour |", "|---|---|---|"]
    for c in cases:
        if c.ok:
            want = c.ok_text
        else:
            want = f"`{c.error.__name__}`" + (f": “{c.match}”" if c.match else "")
        lines.append(f"| {c.cls} | {c.name.replace('|', '/')} | {want.replace('|', '/')} |")
    return "\n".join(lines)


# --- running the cases: each in a forked child with a time and an address-space limit ----------------
CASE_SECONDS = 10.0
CASE_BYTES = 2 * 1024 ** 3


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(case: WeightsCase, seconds: float = CASE_SECONDS, max_bytes: int = CASE_BYTES) -> dict:
    """Run one case in a forked child whose address space may grow by at most ``max_bytes`` and which is
    killed after ``seconds``. Returns {"class", "case", "outcome": "ok" | "error" | "raw" | "timeout" |
    "killed", "error_type", "message", "check", "seconds", "peak_bytes"} (``peak_bytes``: the child's peak
    resident memory above its own at the start: a forked child's high-water mark starts at what it has
    mapped, so the difference is what the case itself made resident)."""
    import resource
    import select
    import signal
    import time
    import traceback

    base_vm = _vm_bytes()
    read_fd, write_fd = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: one case, then exit without running the parent's clean-up handlers
        os.close(read_fd)
        result: dict = {}
        start_rss = _status_bytes("VmRSS")
        # One thread: the child of a process whose OpenMP pool has run would otherwise wait forever on
        # pool threads that fork did not copy.
        torch.set_num_threads(1)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (base_vm + max_bytes, base_vm + max_bytes))
            try:
                out = case.run()
                result = {"outcome": "ok", "check": bool(case.check(out)) if case.check else None}
            except EquishiftError as e:
                result = {"outcome": "error", "error_type": type(e).__name__, "message": str(e)[:2000]}
            except BaseException as e:  # noqa: BLE001 - a raw error is a finding, reported as such
                result = {"outcome": "raw", "error_type": type(e).__name__,
                          "message": (str(e) + "\n" + traceback.format_exc(limit=4))[:2000]}
            result["peak_bytes"] = max(0, _status_bytes("VmHWM") - start_rss)
            os.write(write_fd, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks, deadline, timed_out = [], t0 + seconds, False
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([read_fd], [], [], left)
        if ready:
            block = os.read(read_fd, 1 << 16)
            if not block:
                break
            chunks.append(block)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    seconds_taken = time.perf_counter() - t0
    if timed_out:
        result = {"outcome": "timeout"}
    elif chunks:
        result = json.loads(b"".join(chunks))
    else:
        result = {"outcome": "killed", "message": f"child status {status}"}
    return {"class": case.cls, "case": case.name, "error_type": None, "message": "", "check": None,
            "peak_bytes": None, **result, "seconds": round(seconds_taken, 3)}


def verdict(case: WeightsCase, result: dict) -> Optional[str]:
    """None when ``result`` is what ``case`` expects, else why not."""
    if result["outcome"] in ("timeout", "killed", "raw"):
        return f"{result['outcome']}: {result.get('error_type')} {result.get('message', '')[:600]}"
    if result["seconds"] > CASE_SECONDS or (result["peak_bytes"] or 0) > CASE_BYTES:
        return f"over budget: {result['seconds']} s, {result['peak_bytes'] / 2**20:.0f} MiB"
    if case.error is None:
        if result["outcome"] != "ok":
            return f"expected a load, got {result.get('error_type')}: {result.get('message')}"
        return None if result["check"] in (True, None) else "loaded, but the check of what was loaded failed"
    if result["outcome"] != "error":
        return f"expected {case.error.__name__}, but it loaded"
    names = {c.__name__ for c in case.error.__mro__}
    if result["error_type"] not in names and not _subclass_named(result["error_type"], case.error):
        return f"expected {case.error.__name__}, got {result['error_type']}: {result['message']}"
    if case.match not in result["message"]:
        return f"message lacks {case.match!r}: {result['message']}"
    if len(result["message"]) > 1000:
        return f"message of {len(result['message'])} characters (an error names, it does not echo)"
    return None


def _subclass_named(name: str, cls: type) -> bool:
    from equishift import errors

    found = getattr(errors, name, None)
    return isinstance(found, type) and issubclass(found, cls)


def main(argv: Optional[List[str]] = None) -> int:
    """``python tests/corpus_weights.py CLASS TMP``: one JSON line per case of CLASS (cases written in TMP)."""
    import sys

    import importlib

    cls, tmp = (argv or sys.argv[1:])[:2]
    # Imported before the forks: the children share them instead of importing them each time.
    for module in ("timm", "equishift.zoo", "equishift.paper") + (("dashboard.sources",) if cls in ("spec", "upload")
                                                                   else ()):
        importlib.import_module(module)
    for case in weights_cases(Path(tmp), classes=(cls,)):
        result = run_case(case)
        result["verdict"] = verdict(case, result)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
