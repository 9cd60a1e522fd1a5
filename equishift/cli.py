"""``python -m equishift <command>``. Each command lives in its own module, imported only when used,
and exposes ``add_arguments(parser)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "train": ("equishift.training", "train a baseline or anchored model (Fashion-MNIST or an image folder)"),
    "evaluate": ("equishift.evaluation", "accuracy and shift-consistency protocols on a dataset"),
    "sweep": ("equishift.report", "orbit sweep of a baseline/anchored pair on one image -> report bundle"),
    "models": ("equishift.zoo", "list the shipped models"),
    "import-paper": ("equishift.paper", "convert a checkpoint of the paper's code (PolyViT/PolyTwins/PolySwin) "
                                        "to safetensors + card"),
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m equishift", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"equishift: command {args.command!r} is not available in this build", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
