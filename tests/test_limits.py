"""Resource limits: the shift-grid cap, the sweep memory budget, the out-of-memory fallback, the server's
settings, and the size/pickle checks on weights that come from the Hugging Face cache."""
from __future__ import annotations

import copy
import json
import os
import pickle
import socket
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from app_harness import free_port, served, wait_healthy  # noqa: E402
from engine_helpers import anchored, image, twins, vit  # noqa: E402
from equishift.errors import CheckpointError, LimitError  # noqa: E402
from equishift.shifts import grid  # noqa: E402
from equishift.sweep import MAX_SHIFTS, sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --- the shift-grid cap ------------------------------------------------------------------------------
class _Sentinel(Exception):
    pass


class _Exploding(nn.Module):
    """Any forward pass raises _Sentinel: tells whether a sweep got as far as running the model."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        raise _Sentinel


def test_oversized_grid_is_refused_with_the_limit_named_before_any_forward_pass():
    s = torch.zeros(MAX_SHIFTS + 1, 2, dtype=torch.long)
    with pytest.raises(LimitError, match=f"{MAX_SHIFTS + 1} shifts exceed the sweep limit of {MAX_SHIFTS}"):
        sweep(_Exploding(), image(), s)          # refused before the model runs (else: _Sentinel)
    with pytest.raises(_Sentinel):               # exactly at the limit it is accepted and runs
        sweep(_Exploding(), image(), s[:MAX_SHIFTS])


def test_oversized_grid_in_the_app_is_an_error_naming_the_limit():
    """A link asking for ±200 px (401² = 160,801 shifts), or for an absurd ±20,000 px, gets one st.error
    naming the limit, refused before any grid of that size exists; the page goes on with its default
    grid (both columns drawn), and a normal link works again in the same session."""
    pytest.importorskip("streamlit")
    from app_harness import errors, open_page, tiny_zoo, top5_tables

    with tiny_zoo() as specs:
        for asked, count in (("r200", 160801), ("r20000", 40001 ** 2)):
            at = open_page(*specs)
            at.query_params["grid"] = asked  # a link opened in this session (the page rewrites the URL to
            at.run()                         # the grid it draws, so the refusal is said when it is asked)
            assert not at.exception, at.exception
            msgs = errors(at)
            assert len(msgs) == 1, msgs
            assert f"asks for {count} shifts; the sweep limit is {MAX_SHIFTS}" in msgs[0], msgs
            assert len(top5_tables(at)) == 2
        at.query_params["grid"] = "r3"
        at.run()
        assert not at.exception and errors(at) == [] and len(top5_tables(at)) == 2


# --- the memory budget -------------------------------------------------------------------------------
TOKEN_HEAVY_VIT = "vit_tiny_patch16_224?img_size=96&patch_size=4&embed_dim=48&depth=3"


@pytest.mark.slow
def test_memory_budget_bounds_the_peak_memory_of_a_sweep():
    """Measured in fresh processes (bench/sweep_memory.py): a small ViT with many tokens (96 px, patch 4:
    577 tokens, so attention maps dominate the memory as in a 224-px ViT, at a fraction of the compute)
    swept over 16 shifts.
    Under a 32 MB budget the peak resident memory grows by at most the budget over the loaded model;
    all 16 shifts in one chunk grow it by more (so the measurement can see a budget being exceeded),
    and both give the same logits (float32, batch-size dependent rounding: 1e-4). glibc's mmap
    threshold is fixed in the children so that RSS shows live memory, not heap retention (the bench
    prints both; with the default threshold RSS also grows with the number of chunks)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from sweep_memory import measure

    small = measure(TOKEN_HEAVY_VIT, 16, "32", fixed_mmap=True, threads=1)
    whole = measure(TOKEN_HEAVY_VIT, 16, "unbounded", fixed_mmap=True, threads=1)
    assert small["max_chunk"] < 16 and whole["max_chunk"] == 16
    assert small["growth_mb"] <= 32, small
    assert whole["growth_mb"] > small["growth_mb"], (whole, small)
    diff = (torch.tensor(small["logits"]) - torch.tensor(whole["logits"])).abs().max().item()
    assert diff < 1e-4, diff


# --- out of memory -------------------------------------------------------------------------------------
class _OOMAbove(nn.Module):
    """Wraps a layer deep inside a block; raises a CUDA-style out-of-memory error for batches larger
    than ``limit``, after earlier layers (and their attention hooks) have already run."""

    def __init__(self, inner: nn.Module, limit: int, message: str = "CUDA out of memory. Tried to "
                 "allocate 2.00 GiB (fake)", exc=torch.OutOfMemoryError):
        super().__init__()
        self.inner, self.limit, self.message, self.exc = inner, limit, message, exc

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise self.exc(self.message)
        return self.inner(x)


def _with_oom(model: nn.Module, block: nn.Module, limit: int, **kw) -> nn.Module:
    """A deep copy of ``model`` whose ``block``'s MLP output layer fails above ``limit`` rows."""
    m = copy.deepcopy(model)
    path = next(n for n, mod in model.named_modules() if mod is block)
    blk = m.get_submodule(path)
    blk.mlp.fc2 = _OOMAbove(blk.mlp.fc2, limit, **kw)
    return m


def _assert_identical(a, b):
    assert torch.equal(a.logits, b.logits) and torch.equal(a.ref_logits, b.ref_logits)
    for field in ("anchors", "attention", "layer_error", "offset", "ref_anchors", "ref_attention"):
        da, db = getattr(a, field), getattr(b, field)
        assert da.keys() == db.keys(), field
        for k in da:
            assert torch.equal(da[k], db[k]), (field, k)


@pytest.mark.parametrize("arch", ["vit", "twins"])
def test_out_of_memory_mid_forward_falls_back_to_smaller_chunks_with_identical_results(arch):
    """The fake OOM fires inside block 1 for chunks above 6 rows: 25 shifts asked in chunks of 20 run
    as 20 → 10 → 5 (both fail), then chunks of 5. Every record equals, bit for bit, a clean run of the
    unwrapped model in chunks of 5 (the same batches), and matches a one-chunk run to float tolerance."""
    base = anchored(vit() if arch == "vit" else twins())
    block = base.blocks[1] if arch == "vit" else base.blocks[0][1]
    failing = _with_oom(base, block, limit=6)
    s = grid(range(-2, 3), range(-2, 3))
    x = image(21)
    seen = []
    res = sweep(failing, x, s, batch_size=20, progress=lambda d, k: seen.append(d))
    assert seen == [0, 5, 10, 15, 20, 25]
    _assert_identical(res, sweep(base, x, s, batch_size=5))
    one = sweep(base, x, s, batch_size=25)
    assert torch.equal(res.pred, one.pred) and (res.logits - one.logits).abs().max() < 1e-4


def test_out_of_memory_with_one_shift_is_a_limit_error_and_other_errors_are_not_retried():
    base = vit()
    s = grid(range(3), range(3))
    with pytest.raises(LimitError, match="out of memory with one shift at a time"):
        sweep(_with_oom(base, base.blocks[0], limit=0), image(), s, batch_size=4)
    # a bug is not an out-of-memory: it surfaces at once, unchanged, with no retry
    with pytest.raises(RuntimeError, match="shape mismatch"):
        sweep(_with_oom(base, base.blocks[0], limit=2, message="shape mismatch", exc=RuntimeError),
              image(), s, batch_size=4)
    # the message form of a CUDA OOM raised as a plain RuntimeError, and the CPU allocator's refusal
    # (its text as torch 2.14 words it), are recognised too
    for message in ("CUDA error: out of memory", "[enforce fail at alloc_cpu.cpp:127] err == 0. "
                    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 10000000000000 bytes."):
        res = sweep(_with_oom(base, base.blocks[0], limit=2, message=message, exc=RuntimeError),
                    image(), s, batch_size=8)
        assert torch.equal(res.pred, sweep(base, image(), s, batch_size=2).pred)


# --- the server ----------------------------------------------------------------------------------------
CONFIG = ROOT / ".streamlit" / "config.toml"
OPTIONS = ("server.address", "server.enableXsrfProtection", "server.maxUploadSize", "server.headless",
           "browser.gatherUsageStats", "client.toolbarMode")


def _streamlit_options() -> dict:
    """The options as Streamlit itself resolves them when started from the repository (no overrides)."""
    code = ("import json; from streamlit import config; config.get_config_options(force_reparse=True); "
            f"print(json.dumps({{k: config.get_option(k) for k in {list(OPTIONS)!r}}}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_server_config_is_private_by_default():
    cfg = tomllib.loads(CONFIG.read_text())
    server = cfg["server"]
    assert server["address"] == "127.0.0.1"
    assert server["enableXsrfProtection"] is True
    assert isinstance(server["maxUploadSize"], int) and 1 <= server["maxUploadSize"] <= 200
    # the browser counts maxUploadSize in decimal MB: a file at the dashboard's own limit (MiB) gets through
    from dashboard.sources import UPLOAD_LIMIT_MIB

    assert server["maxUploadSize"] * 10 ** 6 >= UPLOAD_LIMIT_MIB * 2 ** 20
    assert cfg["browser"]["gatherUsageStats"] is False
    # ... and Streamlit reads the file that way (a typo in a key would leave its default in place)
    opts = _streamlit_options()
    assert opts["server.address"] == "127.0.0.1"
    assert opts["server.enableXsrfProtection"] is True
    assert opts["server.maxUploadSize"] == server["maxUploadSize"]
    assert opts["browser.gatherUsageStats"] is False and opts["client.toolbarMode"] == "viewer"


def _outside_address() -> str:
    """This machine's address on its network (not loopback), or '' when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))           # no packet is sent: this only picks the route
            ip = s.getsockname()[0]
        except OSError:
            return ""
    return "" if ip.startswith("127.") else ip


def _put(url: str, headers: dict) -> int:
    req = urllib.request.Request(url, data=b"--x--\r\n", method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_real_server_listens_on_loopback_only_and_checks_xsrf(tmp_path):
    """`streamlit run dashboard/app.py` with the repository's config and no flags: reachable on
    127.0.0.1, refused on the machine's network address; an upload without the session's XSRF cookie
    is refused (403), one with a matching cookie and header gets past that check."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(HF_HUB_OFFLINE="1")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py",
                             "--server.port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, timeout=90)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n{(tmp_path / 'server.log').read_text()}") from None
        outside = _outside_address()
        if outside:
            with pytest.raises(OSError):
                socket.create_connection((outside, port), timeout=3).close()
        upload = f"{url}/_stcore/upload_file/no-session/no-file"
        assert _put(upload, {"Content-Type": "application/octet-stream"}) == 403
        token = {"Cookie": "_streamlit_xsrf=deadbeef", "X-Xsrftoken": "deadbeef",
                 "Content-Type": "application/octet-stream"}
        assert _put(upload, token) not in (403, 200)  # past the XSRF check; the fake session is refused
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_uploaded_weights_do_not_outlive_the_server(tmp_path):
    """`python -m dashboard.serve` (what run.sh starts): a folder left by a server that was killed is
    removed at start, its own upload folder is private (0700) while it runs, and gone once it stops."""
    import stat as stat_

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"equishift-uploads-{dead.pid}-abc123"
    (stale / "ab").mkdir(parents=True)
    (stale / "ab" / "w.safetensors").write_bytes(b"x" * 100)
    with served(tmp_path / "server.log", env={"TMPDIR": str(tmp_path), "EQUISHIFT_WARM_UP": "0"}, timeout=90,
                stop_s=20) as (url, proc):
        assert not stale.exists()
        own = list(tmp_path.glob(f"equishift-uploads-{proc.pid}-*"))
        assert len(own) == 1 and stat_.S_IMODE(own[0].stat().st_mode) == 0o700
        (own[0] / "cd").mkdir()
        (own[0] / "cd" / "w.safetensors").write_bytes(b"y" * 100)
    assert not own[0].exists(), (tmp_path / "server.log").read_text()[-2000:]


def test_weights_over_the_upload_limit_are_refused_in_mib(tmp_path, monkeypatch):
    import tempfile

    from dashboard import sources

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sources, "_UPLOAD_DIR", None)
    monkeypatch.setattr(sources, "UPLOAD_LIMIT_MIB", 1)
    sources._saved_upload(b"w" * 2 ** 20, "exactly-1-MiB.safetensors")  # at the limit: stored
    with pytest.raises(sources.EquishiftError, match=r"'big\.safetensors' is 1\.5 MiB, over the upload limit of 1 MiB"):
        sources._saved_upload(b"w" * (3 * 2 ** 19), "big.safetensors")
    sources.clean_uploads()


def test_the_periodic_clean_up_removes_only_old_uploads(tmp_path, monkeypatch):
    import tempfile

    from dashboard import sources

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sources, "_UPLOAD_DIR", None)
    sources.clean_uploads(max_age_s=0)
    assert list(tmp_path.iterdir()) == []  # nothing uploaded yet: no folder made just to look into
    root = sources.upload_dir()
    old, new = root / "old", root / "new"
    for d in (old, new):
        d.mkdir()
        (d / "w.safetensors").write_bytes(b"z")
    os.utime(old, (1, 1))
    sources.clean_uploads(max_age_s=3600)
    assert not old.exists() and new.exists()
    sources.clean_uploads()
    assert not root.exists()


# --- weights from the Hugging Face cache -------------------------------------------------------------
PRETRAINED = "vit_tiny_patch16_224"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache; ``put(filename, writer)`` stores a file where timm's pretrained
    config for PRETRAINED looks (repo from ``hf_hub_id``, revision main), as a download would."""
    import huggingface_hub.constants as hc
    import timm.models

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    cfg = timm.models.get_pretrained_cfg(PRETRAINED)
    repo = cfg.hf_hub_id.partition("@")[0]
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = tmp_path / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)

    def put(filename: str, writer) -> Path:
        path = snap / filename
        writer(path)
        return path

    return put


def _tiny_state():
    import timm

    torch.manual_seed(3)
    return {k: v.clone() for k, v in timm.create_model(PRETRAINED, pretrained=False).state_dict().items()}


def test_pretrained_weights_from_the_cache_go_through_load_weights(hub_cache):
    from safetensors.torch import save_file

    from equishift.zoo import load_model

    state = _tiny_state()
    hub_cache("model.safetensors", lambda p: save_file(state, p))
    lm = load_model(f"timm:{PRETRAINED}?pretrained", device="cpu")
    got = lm.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert "warnings" not in lm.card


def test_pretrained_cache_file_with_pickled_code_is_refused_unread(hub_cache, tmp_path):
    from corpus import CodePayload

    from equishift.zoo import load_model

    marker = tmp_path / "RAN"
    hub_cache("pytorch_model.bin", lambda p: p.write_bytes(pickle.dumps({"x": CodePayload(marker)})))
    with pytest.raises(CheckpointError, match="contains pickled code"):
        load_model(f"timm:{PRETRAINED}?pretrained", device="cpu")
    assert not marker.exists()


def test_pretrained_cache_file_over_the_size_limit_is_refused(hub_cache, monkeypatch):
    from safetensors.torch import save_file

    import equishift.zoo as zoo

    hub_cache("model.safetensors", lambda p: save_file(_tiny_state(), p))
    monkeypatch.setattr(zoo, "MAX_WEIGHT_BYTES", 10_000)
    with pytest.raises(CheckpointError, match="over the limit"):
        zoo.load_model(f"timm:{PRETRAINED}?pretrained", device="cpu")


@pytest.mark.filterwarnings("ignore::UserWarning")  # load_weights' CheckpointWarning, expected here
def test_pretrained_nan_weights_are_named_in_the_card(hub_cache):
    from safetensors.torch import save_file

    from equishift.zoo import load_model

    state = _tiny_state()
    state["head.weight"][0, 0] = float("nan")
    hub_cache("model.safetensors", lambda p: save_file(state, p))
    lm = load_model(f"timm:{PRETRAINED}?pretrained", device="cpu")
    assert len(lm.card["warnings"]) == 1 and "head.weight" in lm.card["warnings"][0]
