"""The hostile-input corpus of tests/corpus_weights.py (specs, constructor options, zoo cards, the upload
store): each case is a named error or a correct load, within 10 s and 2 GB, no code run, nothing written
outside the case folder. Each class runs in its own process (TMPDIR pointed at the case folder), each case
in a forked child with an address-space limit and a kill timer; the options table of docs/security.md is
generated from equishift.options, the corpus table from the cases' expectations
(``python tests/test_weights_corpus.py --write`` rewrites both)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corpus_weights import CASE_BYTES, CASE_SECONDS, CLASSES, expectation_table, weights_cases

ROOT = Path(__file__).resolve().parents[1]
# Fewest cases each class must have run: a silently empty corpus must not pass.
MIN_CASES = {"spec": 20, "options": 15, "card": 35, "upload": 9}


@pytest.mark.parametrize("cls", CLASSES)
def test_hostile_weights_corpus(cls, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "corpus_weights.py"), cls, str(tmp_path / "cases")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) >= MIN_CASES[cls], (len(results), proc.stderr[-2000:])
    failed = [f"{r['case']}: {r['verdict']}" for r in results if r["verdict"]]
    assert not failed, "\n".join(failed)
    assert all(r["seconds"] <= CASE_SECONDS and (r["peak_bytes"] or 0) <= CASE_BYTES for r in results)
    assert not list(tmp_path.rglob("PAYLOAD_RAN"))
    # The one folder outside the case folder a case could reach, the old shared upload path, was not used.
    assert not [p for p in tmp_path.iterdir() if p.name not in ("cases", "home") and not p.name.startswith(
        ("equishift-uploads-", "tmp"))], sorted(p.name for p in tmp_path.iterdir())


def test_shipped_cards_pass_the_schema_and_their_hashes():
    from equishift.cards import read_card

    cards = sorted((ROOT / "assets" / "models").glob("*.json"))
    assert len(cards) >= 5
    for path in cards:
        card = read_card(path)
        weights = path.with_suffix(".safetensors")
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == card["weights_sha256"], path.name


def test_cards_written_by_training_and_import_pass_the_schema(tmp_path):
    """The card writers' output is what the reader accepts (write_tiny follows equishift.training's card)."""
    from equishift.cards import read_card
    from zoo_helpers import write_tiny

    for timm_class in ("VisionTransformer", "Twins"):
        read_card(write_tiny(tmp_path, f"t-{timm_class}", timm_class=timm_class, anchoring="full"))


SECURITY_DOC = ROOT / "docs" / "security.md"


def doc_tables(tmp: Path) -> dict:
    """marker name → the Markdown table docs/security.md must hold between its markers."""
    from equishift.options import options_table

    return {"options-table": options_table(), "weights-corpus-table": expectation_table(weights_cases(tmp))}


def _between(text: str, name: str) -> str:
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    assert start in text and end in text, name
    return text.split(start)[1].split(end)[0].strip()


def test_security_doc_tables_are_current(tmp_path):
    text = SECURITY_DOC.read_text()
    for name, table in doc_tables(tmp_path).items():
        assert _between(text, name) == table.strip(), f"run python tests/test_weights_corpus.py --write ({name})"


def test_spec_parts_are_checked_without_building():
    """parse_spec refuses options by name, type and range; only the size needs a (meta) build."""
    from equishift.errors import ModelSpecError
    from equishift.zoo import parse_spec

    s = parse_spec("timm:vit_tiny_patch16_224?img_size=32&patch_size=4&depth=2&seed=3")
    assert dict(s.kwargs) == {"img_size": 32, "patch_size": 4, "depth": 2} and s.seed == 3
    for bad in ("timm:x?depth=65", "timm:x?checkpoint_path=/etc/shadow", "timm:x?mlp_ratio=nan", "timm:x@",
                "paper:polyvit:vit_small_patch16_224?pretrained_cfg=x@w.pth"):
        with pytest.raises(ModelSpecError):
            parse_spec(bad)
    # A .json path inside a paper spec is the checkpoint, not a card.
    assert parse_spec("paper:polyvit:vit_small_patch16_224@/x/ckpt.json").source == "paper"


if __name__ == "__main__":
    import tempfile

    if "--write" in sys.argv:
        text = SECURITY_DOC.read_text()
        with tempfile.TemporaryDirectory() as tmp:
            for name, table in doc_tables(Path(tmp)).items():
                start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
                head, rest = text.split(start)
                text = head + start + "\n" + table.strip() + "\n" + end + rest.split(end, 1)[1]
        SECURITY_DOC.write_text(text)
        print(f"wrote the tables of {SECURITY_DOC}")
