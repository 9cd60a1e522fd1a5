"""Print the README's results table from the shipped cards (their "metrics" were written by
`python -m equishift train --name NAME --metrics-only`, i.e. equishift.evaluation.evaluate with
protocol "all" on the full Fashion-MNIST test set)."""
import json
from pathlib import Path

COLUMNS = [("clean", "clean acc."), ("shifted-accuracy", "shifted acc."), ("consistency-a", "cons. A"),
           ("consistency-b", "cons. B"), ("period-orbit", "period orbit"), ("zero-pad", "zero-pad cons."),
           ("crop", "crop cons.")]
ORDER = ["fmnist-vit-baseline", "fmnist-vit-pos-only", "fmnist-vit-anchored",
         "fmnist-twins-svt-baseline", "fmnist-twins-svt-anchored"]

root = Path(__file__).resolve().parent.parent / "assets" / "models"
print("| model | anchoring | " + " | ".join(h for _, h in COLUMNS) + " |")
print("|---|---|" + "---:|" * len(COLUMNS))
for name in ORDER:
    path = root / f"{name}.json"
    if not path.exists():
        print(f"| `zoo:{name}` | (missing) |" + " |" * len(COLUMNS))
        continue
    card = json.loads(path.read_text())
    m = card.get("metrics") or {}
    cells = []
    for key, _ in COLUMNS:
        v = m.get(key)
        cells.append("n/a" if v is None else f"{100 * v['value']:.2f}%")
    print(f"| `zoo:{name}` | {card['anchoring']} | " + " | ".join(cells) + " |")
