"""Worst time and peak memory per class of hostile input: the corpus of tests/hostile.py (image decode
cost, paths that are not files, errors that must be named) and that of tests/corpus_weights.py (ways
around the weights checks: specs, constructor options, zoo cards, the upload store).

    nice -n 15 .venv/bin/python bench/hostile_inputs.py [--cases]

Every case runs in its own process (as in tests/test_hostile.py): "time" is the call alone (load_image,
load_weights or load_model), "memory" the peak RSS it added above the process after its imports, or the
decode worker's peak when that is larger (an upper bound: it may include the caller's RSS at the fork).
``--cases`` also prints every case. The classes are the keys of ``hostile.CLASSES``: a class added there
gets its row here.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dashboard.sources, for the upload-store cases

from hostile import CLASSES, TIME_LIMIT_S, hostile_cases, run_isolated  # noqa: E402
import corpus_weights  # noqa: E402


def main(show_cases: bool) -> int:
    results = {key: [] for key in CLASSES}
    with tempfile.TemporaryDirectory(prefix="equishift-hostile-") as d:
        for i, case in enumerate(hostile_cases()):
            o = run_isolated(case, Path(d) / f"{i:02d}")
            results[case.cls].append(o)
            if show_cases:
                print(f"  {case.kind:42s} {o.outcome:8s} {o.seconds:7.3f} s {o.peak_bytes / 2**20:8.1f} MiB  "
                      f"{o.message[:70]}", flush=True)
    bad = 0
    print(f"{'class':16s} {'cases':>5s} {'worst time':>11s} {'(case)':42s} {'peak memory':>12s} (case)")
    for key, outs in results.items():
        if not outs:
            continue
        slow = max(outs, key=lambda o: o.seconds)
        big = max(outs, key=lambda o: o.peak_bytes)
        print(f"{key:16s} {len(outs):5d} {slow.seconds:9.3f} s {slow.case.kind:42s} "
              f"{big.peak_bytes / 2**20:8.1f} MiB {big.case.kind}")
        for o in outs:
            named = o.outcome == "loaded" if o.case.ok else (o.outcome == "refused" and o.case.error in o.message)
            if not named or o.seconds >= TIME_LIMIT_S:
                bad += 1
                print(f"  NOT AS EXPECTED: {o.case.kind}: {o.outcome} after {o.seconds:.2f} s: {o.message[:200]}")
    return (1 if bad else 0) | _weights(show_cases)


def _weights(show_cases: bool) -> int:
    """The weights-path corpus, each case in a forked child with the same time and memory caps."""
    bad = 0
    with tempfile.TemporaryDirectory(prefix="equishift-weights-") as d:
        cases = corpus_weights.weights_cases(Path(d))
        results = {key: [] for key in corpus_weights.CLASSES}
        for case in cases:
            r = corpus_weights.run_case(case)
            results[case.cls].append((case, r))
            problem = corpus_weights.verdict(case, r)
            if show_cases:
                print(f"  {case.name:42s} {r['outcome']:8s} {r['seconds']:7.3f} s {r['peak_bytes'] / 2**20:8.1f} MiB  "
                      f"{r['message'][:70]}", flush=True)
            if problem is not None:
                bad += 1
                print(f"  NOT AS EXPECTED: {case.name}: {problem}")
    for key, rs in results.items():
        if not rs:
            continue
        slow = max(rs, key=lambda cr: cr[1]["seconds"])
        big = max(rs, key=lambda cr: cr[1]["peak_bytes"])
        print(f"{'weights/' + key:16s} {len(rs):5d} {slow[1]['seconds']:9.3f} s {slow[0].name:42s} "
              f"{big[1]['peak_bytes'] / 2**20:8.1f} MiB {big[0].name}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main("--cases" in sys.argv[1:]))
