"""The README's results table, from the shipped cards (their "metrics" were written by
`python -m equishift train --name NAME --metrics-only`, i.e. equishift.evaluation.evaluate with
protocol "all" on the full Fashion-MNIST test set).

    python scripts/zoo_table.py            # print the table
    python scripts/zoo_table.py --write    # rewrite it in README.md, between the zoo-table markers
"""
import json
import sys
from pathlib import Path

COLUMNS = [("clean", "clean acc."), ("shifted-accuracy", "shifted acc."), ("consistency-a", "cons. A"),
           ("consistency-b", "cons. B"), ("period-orbit", "period orbit"), ("zero-pad", "zero-pad cons."),
           ("crop", "crop cons.")]
ORDER = ["fmnist-vit-baseline", "fmnist-vit-pos-only", "fmnist-vit-anchored",
         "fmnist-twins-svt-baseline", "fmnist-twins-svt-anchored"]

REPO = Path(__file__).resolve().parent.parent
ZOO = REPO / "assets" / "models"
README = REPO / "README.md"
START, END = "<!-- section:zoo-table -->", "<!-- /section:zoo-table -->"


def table() -> str:
    lines = ["| model | anchoring | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---|---|" + "---:|" * len(COLUMNS)]
    for name in ORDER:
        path = ZOO / f"{name}.json"
        if not path.exists():
            lines.append(f"| `zoo:{name}` | (missing) |" + " |" * len(COLUMNS))
            continue
        card = json.loads(path.read_text())
        m = card.get("metrics") or {}
        cells = []
        for key, _ in COLUMNS:
            v = m.get(key)
            cells.append("n/a" if v is None else f"{100 * v['value']:.2f}%")
        lines.append(f"| `zoo:{name}` | {card['anchoring']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write() -> bool:
    """Replace the text between the markers in README.md with the table; True when it changed."""
    text = README.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if not 0 <= start < end:
        sys.exit(f"{README} lacks the markers {START} … {END}")
    new = text[:start + len(START)] + "\n" + table() + "\n" + text[end:]
    if new == text:
        return False
    README.write_text(new, encoding="utf-8")
    return True


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        print(f"{README}: {'rewritten' if write() else 'already current'}")
    elif sys.argv[1:]:
        sys.exit("usage: python scripts/zoo_table.py [--write]")
    else:
        print(table())
