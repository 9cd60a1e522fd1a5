"""load_weights / apply_weights / save_weights on a corpus of good, foreign, broken and malicious files."""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from corpus import CheckpointCase, CodePayload, checkpoint_cases, tiny_vit
from equishift import checkpoint
from equishift.checkpoint import (CheckpointWarning, apply_weights, load_weights, pickle_globals,
                                  save_weights)
from equishift.errors import CheckpointError

_DIR = Path(tempfile.mkdtemp(prefix="equishift-ckpt-corpus-"))
CASES = checkpoint_cases(_DIR)
BY_KIND = {c.kind: c for c in CASES}
SYSTEM = f"{os.system.__module__}.system"          # posix.system here, nt.system on Windows


def teardown_module():
    shutil.rmtree(_DIR, ignore_errors=True)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True)


def test_corpus_covers_the_required_kinds():
    required = {"code_payload_torch_zip", "keys_of_another_architecture", "wrong_shapes_head",
                "truncated_safetensors", "nan_inf_weights", "not_a_checkpoint_png", "over_size_limit",
                "empty_file"}
    assert required <= set(BY_KIND) and len(BY_KIND) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_corpus_case(case: CheckpointCase):
    if case.error is not None:
        with pytest.raises(CheckpointError) as info:
            load_weights(case.path, **case.load_kwargs)
        message = str(info.value)
        assert case.error in message and case.path.name in message
        if case.marker is not None:
            assert not case.marker.exists(), "the payload ran"
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = load_weights(case.path, **case.load_kwargs)
    ours = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    if case.warning is None:
        assert ours == []
    else:
        assert len(ours) == 1 and case.warning in ours[0] and case.path.name in ours[0]
    if case.reference is not None:
        _same(state, case.reference)
    model = tiny_vit()
    if case.apply_error is not None:
        with pytest.raises(CheckpointError) as info:
            apply_weights(model, state)
        assert case.apply_error in str(info.value)
    else:
        apply_weights(model, state)
        _same(model.state_dict(), state)


def test_nan_inf_warning_names_exactly_the_poisoned_tensors():
    case = BY_KIND["nan_inf_weights"]
    poisoned = sorted(k for k, v in case.reference.items() if not torch.isfinite(v).all())
    assert len(poisoned) == 2
    with pytest.warns(CheckpointWarning) as record:
        load_weights(case.path)
    message = str(record[0].message)
    clean = [k for k in case.reference if k not in poisoned]
    assert all(k in message for k in poisoned) and not any(f" {k}," in message or message.endswith(k)
                                                           for k in clean)
    assert "2 tensor(s)" in message


def test_code_payloads_are_live_but_never_run(tmp_path):
    """The payload really runs when unpickled naively (control), and never through load_weights."""
    control = tmp_path / "control.MARKER"
    pickle.loads(pickle.dumps(CodePayload(control)))
    assert control.exists()
    payloads = [c for c in CASES if c.marker is not None]
    assert len(payloads) >= 4
    for case in payloads:
        with pytest.raises(CheckpointError, match=rf"contains pickled code \({SYSTEM}\)"):
            load_weights(case.path)
        assert not case.marker.exists()


def test_torch_own_refusal_is_reported_the_same_way(monkeypatch):
    """With our static scan switched off, torch's weights_only unpickler still refuses, and it is mapped."""
    monkeypatch.setattr(checkpoint, "_refuse_unsafe_globals", lambda found, name, stand_ins=None: None)
    for kind in ("code_payload_torch_zip", "code_payload_torch_legacy"):
        case = BY_KIND[kind]
        with pytest.raises(CheckpointError, match=rf"contains pickled code \({SYSTEM}\)"):
            load_weights(case.path)
        assert not case.marker.exists()
    with pytest.raises(CheckpointError, match=r"contains pickled code \(timm\.models\.vision_transformer\."
                                              r"VisionTransformer\)"):
        load_weights(BY_KIND["pickled_whole_model"].path)


def test_torch_load_is_always_weights_only(monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for case in CASES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CheckpointWarning)
                load_weights(case.path, **case.load_kwargs)
        except CheckpointError:
            pass
    assert len(calls) >= 8 and set(calls) == {True}


def test_pickle_globals_sees_every_import_form(tmp_path):
    payload = CodePayload(tmp_path / "never")
    for protocol in (0, 2, 4, 5):
        assert pickle_globals(pickle.dumps(payload, protocol)) == {SYSTEM}
    # Module and name strings memoized once and fetched again with BINGET for a second STACK_GLOBAL.
    p = pickle
    crafted = (p.PROTO + b"\x04" + p.SHORT_BINUNICODE + b"\x05posix" + p.MEMOIZE + p.SHORT_BINUNICODE
               + b"\x06system" + p.MEMOIZE + p.STACK_GLOBAL + p.POP + p.BINGET + b"\x00" + p.BINGET + b"\x01"
               + p.STACK_GLOBAL + p.STOP)
    assert pickle_globals(crafted) == {"posix.system"}
    # A STACK_GLOBAL whose operands are computed cannot be named statically: flagged, not ignored.
    dynamic = (p.PROTO + b"\x04" + p.SHORT_BINUNICODE + b"\x05posix" + p.SHORT_BINUNICODE + b"\x03sys"
               + p.SHORT_BINUNICODE + b"\x03tem" + p.TUPLE2 + p.STACK_GLOBAL + p.STOP)
    assert "<dynamic STACK_GLOBAL>" in pickle_globals(dynamic)
    with pytest.raises(CheckpointError, match="corrupt pickle"):
        pickle_globals(b"\x80\x04\xff\xff")


def test_size_limit_is_checked_before_reading(tmp_path, monkeypatch):
    big = tmp_path / "huge.safetensors"
    with open(big, "wb") as f:                          # sparse: 3 GiB on paper, nothing written
        f.truncate(3 * 2**30)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    with pytest.raises(CheckpointError, match=r"huge\.safetensors: file is 3072\.0 MiB, over the limit of "
                                              r"2048\.0 MiB \(max_bytes=2147483648\)"):
        load_weights(big)
    assert opened == []


def test_apply_weights_reports_missing_unexpected_and_shapes():
    model = tiny_vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dropped = sorted(state)[:3]
    for k in dropped:
        del state[k]
    state["extra.a"] = torch.zeros(1)
    state["extra.b"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        apply_weights(model, state)
    message = str(info.value)
    assert "3 missing key(s)" in message and all(k in message for k in dropped)
    assert "2 unexpected key(s) (extra.a, extra.b)" in message
    assert "another architecture" not in message

    fresh = tiny_vit()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    apply_weights(fresh, state, strict=False)            # tolerated: copies what fits
    after = fresh.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in dropped)
    assert all(torch.equal(after[k], state[k]) for k in state if k in after)

    state[sorted(state)[-1]] = torch.zeros(99)           # a shape mismatch is never tolerated
    with pytest.raises(CheckpointError, match=r"shape mismatch"):
        apply_weights(tiny_vit(), state, strict=False)


def test_apply_weights_keeps_the_models_dtype():
    model = tiny_vit().double()
    state = tiny_vit().state_dict()
    apply_weights(model, state)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float64 and torch.equal(v.float(), state[k].float())


def test_save_weights_round_trip_with_tied_weights(tmp_path):
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight                  # tied: one storage, two names
    path = tmp_path / "sub" / "tied.safetensors"
    save_weights(model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tied.safetensors"]   # no temp file left
    state = load_weights(path)
    _same(state, {k: v.detach() for k, v in model.state_dict().items()})
    save_weights(state, tmp_path / "again.safetensors")
    _same(load_weights(tmp_path / "again.safetensors"), state)
    with pytest.raises(CheckpointError, match="mapping of str → tensor"):
        save_weights({"a": 1.0}, tmp_path / "bad.safetensors")


def test_loading_in_threads_matches_sequential():
    kinds = ["safetensors", "torch_state_dict", "torch_legacy_format", "wrapper_model",
             "code_payload_torch_zip", "truncated_safetensors"]

    def run(kind):
        try:
            return load_weights(BY_KIND[kind].path)
        except CheckpointError as e:
            return str(e)

    sequential = [run(k) for k in kinds]
    with ThreadPoolExecutor(3) as pool:
        for got, want in zip(pool.map(run, kinds * 2), sequential * 2):
            if isinstance(want, dict):
                _same(got, want)
            else:
                assert got == want


_SEEDS = {k: BY_KIND[k].path.read_bytes() for k in ("safetensors", "torch_state_dict", "torch_legacy_format")}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(_SEEDS)), edits=st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.floats(0.02, 1.0), head=st.booleans())
def test_mutated_checkpoints_give_weights_or_a_checkpoint_error(kind, edits, cut, head):
    """Corrupted bytes (biased to the header, where parsers live) and truncation: only CheckpointError."""
    data = bytearray(_SEEDS[kind][: max(1, int(len(_SEEDS[kind]) * cut))])
    for where, value in edits:
        data[int(where * (min(len(data), 2048) if head else len(data)))] = value
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mutant.bin"
        path.write_bytes(bytes(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = load_weights(path)
        except CheckpointError as e:
            assert path.name in str(e)
        else:
            assert state and all(isinstance(v, torch.Tensor) for v in state.values())


# --- a path swapped between the checks and the load (time of check to time of use) -------------------

def _write_weights(path: Path, fmt: str, state: dict) -> None:
    if fmt == "safetensors":
        save_weights(state, path)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=(fmt == "zip"))


def _swap(path: Path, how: str, tmp_path: Path) -> None:
    """Replace ``path`` (atomically, as an attacker with write access to its folder would) by another
    file: other weights of the same format, a FIFO nobody writes, or a sparse 3 GiB file."""
    new = tmp_path / f"swap-{how}"
    if how == "other weights":
        _write_weights(new, path.suffix.lstrip("."), {"w": -torch.arange(6.0)})
    elif how == "fifo":
        os.mkfifo(new)
    else:
        with open(new, "wb") as f:
            f.truncate(3 * 2**30)
    os.replace(new, path)
    if how == "fifo":
        _unblock_fifo_later(path)


def _unblock_fifo_later(fifo: Path, after_s: float = 3.0) -> None:
    """Should a loader open the FIFO blocking (the defect), open its write end after a while so that the
    test fails instead of hanging."""
    import threading
    import time

    def rescue():
        time.sleep(after_s)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:   # no reader blocked on it: nothing to rescue
            pass

    threading.Thread(target=rescue, daemon=True).start()


def _swap_right_after_the_checks(monkeypatch, path: Path, how: str, tmp_path: Path) -> None:
    # _looks_like_safetensors runs once the file is open and checked, before any loader reads it.
    real = checkpoint._looks_like_safetensors

    def swapping(head):
        _swap(path, how, tmp_path)
        return real(head)

    monkeypatch.setattr(checkpoint, "_looks_like_safetensors", swapping)


@pytest.mark.parametrize("how", ["other weights", "fifo", "huge file"])
@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy"])
def test_a_path_swapped_after_the_checks_loads_the_checked_file(tmp_path, monkeypatch, fmt, how):
    """The checks and the load concern one open file: whatever the path names after the checks (other
    weights, a FIFO that would block a reader forever, a 3 GiB file over the limit), the bytes that were
    checked are the bytes loaded."""
    path = tmp_path / f"weights.{fmt}"
    _write_weights(path, fmt, {"w": torch.arange(6.0)})
    _swap_right_after_the_checks(monkeypatch, path, how, tmp_path)
    state = load_weights(path)
    assert torch.equal(state["w"], torch.arange(6.0))


@pytest.mark.parametrize("how", ["other weights", "fifo", "huge file"])
def test_without_proc_a_swapped_safetensors_path_is_a_named_error(tmp_path, monkeypatch, how):
    """Where /proc/self/fd does not exist, safetensors loads by path: the path must still be the checked
    file (device, inode, size, mtime), or the load is refused, naming the file."""
    monkeypatch.setattr(checkpoint, "_PROC_FD", str(tmp_path / "no-proc"))
    path = tmp_path / "weights.safetensors"
    _write_weights(path, "safetensors", {"w": torch.arange(6.0)})
    assert torch.equal(load_weights(path)["w"], torch.arange(6.0))     # unchanged: loads by path
    _swap_right_after_the_checks(monkeypatch, path, how, tmp_path)
    with pytest.raises(CheckpointError, match=r"^weights\.safetensors: the file was replaced or changed while "
                                              r"being loaded"):
        load_weights(path)


def test_a_file_rewritten_in_place_while_loading_is_a_named_error(tmp_path, monkeypatch):
    path = tmp_path / "weights.pt"
    _write_weights(path, "zip", {"w": torch.arange(6.0)})
    real = checkpoint._torch_load

    def rewriting(f, name, stand_ins):
        out = real(f, name, stand_ins)
        with open(path, "ab") as g:    # the same inode grows after it was checked
            g.write(b"\0" * 64)
        return out

    monkeypatch.setattr(checkpoint, "_torch_load", rewriting)
    with pytest.raises(CheckpointError, match=r"^weights\.pt: the file was replaced or changed"):
        load_weights(path)
