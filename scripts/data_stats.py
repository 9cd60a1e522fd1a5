"""Per-image statistics of the Fashion-MNIST training split, as equishift.data.FMNIST_STATS holds them.

    .venv/bin/python scripts/data_stats.py          # prints the dict to paste into equishift/data.py

equishift.caveats compares an input with these ranges to say when it looks nothing like the data the
Fashion-MNIST models were trained on (a light background, a photo); tests/test_caveats.py recomputes
them from the data and checks the constants when the dataset is installed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from equishift.data import fmnist_stats  # noqa: E402

if __name__ == "__main__":
    print(json.dumps(fmnist_stats(), indent=2))
