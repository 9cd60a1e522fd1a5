"""Several dashboard sessions on one server: shared cached models, concurrent sweeps, long sessions.

The dashboard caches one model object per spec (``st.cache_resource``) and one process-wide result
store, and runs each session's script in its own thread. These tests do what several sessions do: 8
threads sweep 8 different images through the SAME model objects (the ones the dashboard's cache hands
out) at once, through the dashboard's own result store, and must get exactly what sequential runs get;
the shared models must come out untouched; a long session must not accumulate state.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from equishift.shifts import grid  # noqa: E402
from equishift.sweep import sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THREADS = 8
SHIFTS = grid(range(-2, 2), range(-2, 2))   # 16 shifts: one 4-px patch period, both signs


def _pairs():
    """(baseline, anchored) spec pairs: the shipped zoo models when present, else tiny random ones."""
    from equishift.zoo import list_models

    shipped = set(list_models())
    pairs = [(f"zoo:fmnist-{a}-baseline", f"zoo:fmnist-{a}-anchored") for a in ("vit", "twins-svt")]
    return [p for p in pairs if set(p) <= shipped] or [None]


def _load(spec_pair, tmp_path_factory):
    """The model objects the dashboard would share, and 8 different preprocessed images."""
    from equishift.images import load_image
    from equishift.zoo import load_model

    if spec_pair is None:  # no shipped zoo: tiny random models written to a temporary zoo
        from zoo_helpers import write_tiny

        root = tmp_path_factory.mktemp("zoo")
        spec_pair = (f"zoo:{write_tiny(root, 'b')}", f"zoo:{write_tiny(root, 'a', anchoring='full', seed=1)}")
    try:
        from dashboard.compute import get_model  # the dashboard's cache_resource: one object per spec
        models = [get_model(s) for s in spec_pair]
    except ImportError:
        models = [load_model(s) for s in spec_pair]
    files = sorted((ROOT / "assets" / "images").glob("*.*"))[:THREADS]
    assert len(files) == THREADS, files
    images = [models[0].preprocess(load_image(f.read_bytes()))[0] for f in files]
    return models, images


def _snapshot(model: torch.nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: (m.training, getattr(m, "fused_attn", None)) for n, m in model.named_modules()})


def _assert_untouched(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items()), "weights changed"
    assert {n: (m.training, getattr(m, "fused_attn", None)) for n, m in model.named_modules()} == flags
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks left behind"


@pytest.fixture
def one_intra_op_thread():
    """Nine busy threads on a 2-core machine: with torch's default 2 intra-op threads each, OpenMP
    spin-waits make the test ~10x slower under load without changing what it checks (Python-level
    sharing of modules, hooks and flags); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("pair", _pairs(), ids=lambda p: p[0].split(":")[-1] if p else "tiny")
def test_eight_concurrent_sweeps_on_shared_models_equal_sequential_runs(pair, tmp_path_factory,
                                                                        one_intra_op_thread):
    """8 threads, each sweeping its own image through the shared baseline and anchored models via the
    dashboard's result store, all released together by a barrier, while a 9th thread runs plain forward
    passes on the same objects. Every result equals the sequential one bit for bit (same batches, same
    kernels: concurrency must not change a single float), nothing raises, the models are untouched."""
    from dashboard.compute import Store

    models, images = _load(pair, tmp_path_factory)
    snaps = [_snapshot(m.model) for m in models]
    seq = [[sweep(m, x, SHIFTS) for m in models] for x in images]
    with torch.inference_mode():
        plain_ref = [m.model(images[0][None]) for m in models]

    store = Store(max_entries=2 * THREADS)
    calls = []
    out = [None] * THREADS
    failures = []
    start = threading.Barrier(THREADS + 1)

    def session(i):
        try:
            start.wait()
            res = []
            for m in models:
                def compute(m=m):
                    calls.append((m.spec, i))
                    return sweep(m, images[i], SHIFTS)
                res.append(store.get_or_compute(("sweep", m.spec, i), compute))
            out[i] = res
        except BaseException as e:  # reported below, with the thread's index
            failures.append((i, e))

    plain = []

    def forwards():
        try:
            start.wait()
            with torch.inference_mode():
                for _ in range(10):
                    plain.append([m.model(images[0][None]) for m in models])
        except BaseException as e:
            failures.append(("forward", e))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(THREADS)]
    threads.append(threading.Thread(target=forwards))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a session hung"
    assert not failures, failures
    assert len(calls) == 2 * THREADS  # each (model, image) computed once
    for i in range(THREADS):
        for a, b in zip(seq[i], out[i]):
            assert torch.equal(a.logits, b.logits) and torch.equal(a.ref_logits, b.ref_logits)
            for field in ("anchors", "attention", "layer_error", "offset"):
                da, db = getattr(a, field), getattr(b, field)
                assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da), (i, field)
    for row in plain:
        assert all(torch.equal(p, r) for p, r in zip(row, plain_ref))
    for m, snap in zip(models, snaps):
        _assert_untouched(m.model, snap)


def test_the_same_sweep_asked_by_eight_sessions_at_once_is_computed_once():
    """Eight sessions opening the same image at the same moment wait for one computation and share
    its result (the store's per-key lock), instead of running eight identical sweeps."""
    from dashboard.compute import Store

    store, calls, got = Store(), [], [None] * THREADS
    start = threading.Barrier(THREADS)
    gate = threading.Event()

    def compute():
        calls.append(1)
        gate.wait(timeout=30)  # hold the computation until every session is waiting for it
        return object()

    def session(i):
        start.wait()
        got[i] = store.get_or_compute("k", compute)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    while not calls:
        threading.Event().wait(0.01)
    threading.Event().wait(0.2)
    gate.set()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1 and all(g is got[0] for g in got)


def test_evaluate_never_flips_the_mode_of_a_shared_model(tmp_path):
    """evaluation.evaluate on a model in training mode (dropout on) gives the eval-mode numbers and
    leaves every module's flag as it was: another session may be using that object."""
    from zoo_helpers import TINY_VIT, write_tiny

    from equishift.evaluation import evaluate
    from equishift.zoo import load_model

    card = write_tiny(tmp_path, "drop", arch_config=dict(TINY_VIT, drop_rate=0.5, proj_drop_rate=0.5))
    lm = load_model(str(card), device="cpu")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 32, 32, generator=g), i % 10) for i in range(12)]
    want = evaluate(lm, data, ["clean", "consistency-a"], batch_size=64)
    lm.model.train()
    got = evaluate(lm, data, ["clean", "consistency-a"], batch_size=64)
    assert all(m.training for m in lm.model.modules()), "evaluate switched the shared model to eval()"
    for p in ("clean", "consistency-a"):
        assert got["protocols"][p]["count"] == want["protocols"][p]["count"]
    lm.model.eval()


def test_a_long_session_does_not_accumulate_state():
    """25 shift changes in one AppTest session: after the first few, the number of session-state keys
    and of entries in the process-wide store stay constant (moving the shift only re-draws).
    bench/session_memory.py measures the resident memory of 200 changes."""
    pytest.importorskip("streamlit")
    from app_harness import errors, open_page, tiny_zoo

    sys.path.insert(0, str(ROOT / "bench"))
    from session_memory import move, session_sizes, walk

    with tiny_zoo() as specs:
        at = open_page(*specs)
        steps = list(walk(25))
        for dy, dx in steps[:5]:
            move(at, dy, dx)
        before = session_sizes(at)
        for dy, dx in steps[5:]:
            move(at, dy, dx)
        assert not at.exception and errors(at) == []
        assert session_sizes(at) == before
        assert at.session_state["shift"] == tuple(steps[-1])


# --- the shared stores, the sweep gate and uploaded weights -----------------------------------------
def test_store_keeps_its_byte_budget_and_always_the_newest_value():
    """LRU by bytes as well as by count: 1 KiB tensors in a 3 KiB store keep the 3 most recently used;
    a value larger than the whole budget is still kept (it is the one being drawn) until the next."""
    from dashboard.compute import Store

    store = Store(max_entries=100, max_bytes=3 * 1024)
    for k in range(5):
        store.get_or_compute(k, lambda: torch.zeros(256))  # 256 float32 = 1 KiB
        if k == 2:
            store.get(0)  # touch 0: now 1, then 2, are the least recently used
    assert [k for k in range(5) if k in store] == [0, 3, 4] and store.bytes == 3 * 1024
    big = store.get_or_compute("big", lambda: torch.zeros(4096))
    assert "big" in store and len(store) == 1 and store.bytes == big.numel() * 4
    store.get_or_compute("small", lambda: torch.zeros(256))
    assert "big" not in store and "small" in store and store.bytes == 1024


def test_what_a_live_session_shows_is_evicted_last():
    """Session A shows sweeps a1, a2 (pinned). Session B then computes many new values: the byte budget
    holds and B's own older values go first, A's stay. Only when every value left is pinned does the
    least recently pinned go; a closed session's pins no longer count."""
    from dashboard.compute import Store

    alive = {"A", "B"}
    store = Store(max_entries=100, max_bytes=4 * 1024, is_alive=alive.__contains__)
    for k in ("a1", "a2"):
        store.get_or_compute(k, lambda: torch.zeros(256))  # 1 KiB each
    store.pin("A", ["a1", "a2"])
    for k in range(6):
        store.get_or_compute(f"b{k}", lambda: torch.zeros(256))
        store.pin("B", [f"b{k}"])
        assert "a1" in store and "a2" in store and store.bytes <= 4 * 1024
    assert [k for k in ("b3", "b4", "b5") if k in store] == ["b4", "b5"]
    # every value pinned: B pinned most recently, so A's go first (one at a time, as needed)
    store.pin("B", ["b4", "b5"])
    store.pin("C", [])
    store.get_or_compute("c", lambda: torch.zeros(256))
    assert store.bytes <= 4 * 1024 and "a2" in store and "a1" not in store and {"b4", "b5", "c"} <= set(
        k for k in ("b4", "b5", "c") if k in store)
    # B closes its tab: its pins are dropped at the next pin, and its values are evicted before A's
    alive.discard("B")
    store.pin("A", ["a2"])
    assert "B" not in store.pinned()
    store.get_or_compute("a3", lambda: torch.zeros(256))
    assert "a2" in store and "a3" in store and store.bytes <= 4 * 1024


def test_cache_size_is_read_in_mib_under_either_name(monkeypatch):
    from dashboard.compute import cache_mib

    monkeypatch.delenv("EQUISHIFT_CACHE_MIB", raising=False)
    monkeypatch.setenv("EQUISHIFT_CACHE_MB", "300")  # the older name, which always counted MiB
    assert cache_mib() == 300
    monkeypatch.setenv("EQUISHIFT_CACHE_MIB", "200")  # the documented name wins
    assert cache_mib() == 200
    monkeypatch.delenv("EQUISHIFT_CACHE_MB")
    monkeypatch.delenv("EQUISHIFT_CACHE_MIB")
    assert cache_mib() == 1024


def test_store_counts_sweep_results_by_their_tensors():
    from dashboard.compute import nbytes

    res = sweep(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)), torch.randn(3, 8, 8),
                SHIFTS, record=("logits",))
    assert res.nbytes == SHIFTS.numel() * 8 + 16 * 4 * 4 + 4 * 4  # shifts (long), logits, ref logits
    assert nbytes(res) == res.nbytes and nbytes({"a": [res, torch.zeros(3)]}) == res.nbytes + 12


def test_a_failed_computation_is_not_stored_and_leaves_no_lock_behind():
    """A sweep that raises (e.g. out of memory) is retried by the next request, and the store holds no
    per-key lock for it afterwards (the old store kept one per failed key for ever)."""
    from dashboard.compute import Store

    store, calls = Store(), []

    def boom():
        calls.append(1)
        raise RuntimeError("out of memory")

    for _ in range(3):
        with pytest.raises(RuntimeError):
            store.get_or_compute("k", boom)
    assert len(calls) == 3 and "k" not in store and store.pending == 0
    assert store.get_or_compute("k", lambda: 7) == 7 and store.pending == 0


def test_sweep_slots_bound_concurrent_sweeps_across_sessions():
    """8 sessions starting different sweeps at once: at most 2 run at a time; the others are told they
    wait (on_wait, which the page shows in its progress bar) and then run."""
    from dashboard.compute import sweep_slot

    slots = threading.BoundedSemaphore(2)
    lock, running, peak, waited = threading.Lock(), [0], [0], []
    start = threading.Barrier(THREADS)

    def session(i):
        start.wait()
        with sweep_slot(on_wait=lambda: waited.append(i), slots=slots):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            threading.Event().wait(0.05)
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=session, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert peak[0] == 2 and len(waited) >= THREADS - 2 and running[0] == 0
    assert slots.acquire(blocking=False) and slots.acquire(blocking=False)  # every slot was given back


def test_concurrent_identical_weight_uploads_never_see_a_partial_file(tmp_path, monkeypatch):
    """8 sessions upload the same 4 MB weights file at once: each gets the same path holding exactly
    those bytes, and no temporary file is left behind (they used to share one '.part' name)."""
    pytest.importorskip("streamlit")
    from dashboard import sources

    monkeypatch.setattr(sources, "_UPLOAD_DIR", tmp_path / "uploads")
    data = torch.randint(0, 256, (4 * 2 ** 20,), dtype=torch.uint8).numpy().tobytes()
    start = threading.Barrier(THREADS)
    paths, failures = [None] * THREADS, []

    def session(i):
        try:
            start.wait()
            paths[i] = sources._saved_upload(data, "my model.safetensors")
            assert Path(paths[i]).read_bytes() == data
        except BaseException as e:
            failures.append((i, e))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures
    assert len(set(paths)) == 1 and Path(paths[0]).name == "my_model.safetensors"
    assert sorted(p.name for p in Path(paths[0]).parent.iterdir()) == ["my_model.safetensors"]


def test_old_uploads_are_pruned_and_a_failed_write_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    import os

    from dashboard import sources
    from equishift.errors import EquishiftError

    up = tmp_path / "uploads"
    monkeypatch.setattr(sources, "_UPLOAD_DIR", up)
    old = Path(sources._saved_upload(b"old weights", "a.safetensors")).parent
    recent = Path(sources._saved_upload(b"recent weights", "b.safetensors")).parent
    day = 24 * 3600
    os.utime(old, (old.stat().st_atime - 2 * day, old.stat().st_mtime - 2 * day))
    sources._saved_upload(b"new weights", "c.safetensors")
    assert not old.exists() and recent.exists() and len(list(up.iterdir())) == 2
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setattr(sources, "_UPLOAD_DIR", blocker)
    with pytest.raises(EquishiftError, match="cannot store the uploaded file 'd.safetensors'"):
        sources._saved_upload(b"more", "d.safetensors")
