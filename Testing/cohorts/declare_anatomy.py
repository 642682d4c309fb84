"""Declare the anatomy of existing adapter files: every label one connected piece, left/right pairs from the names.

``segment --postprocess largest-component`` (the default) cleans only the labels a card declares one piece, so an
adapter trained before ``train --one-piece`` existed gets the declaration here; its tensors are kept bit for bit (the
file's digest is recomputed over the same tensors, the card alone changes). ``make_defaults`` now trains with
``one_piece="all"``, so this is for files made before.

Usage, from the repository root::

    python -m Testing.cohorts.declare_anatomy Resources/Models/deep-grey-structures.safetensors --work /tmp/anatomy \
        --install

The rewritten files go to ``--work``; ``--install`` then copies them over the originals (the engine itself never
writes into the shipped folder).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "TCURLoRASegment"))

from TCURLoRALib import tensorfiles  # noqa: E402
from TCURLoRALib.cards import AdapterCard  # noqa: E402
from TCURLoRALib.mirror import pairs_from_names  # noqa: E402


def declared(card: AdapterCard) -> dict:
    """``anatomy`` with every label one piece and the pairs its names give."""
    names = [label.name for label in card.labels]
    anatomy = {"one_piece": names[1:]}
    pairs = [[names[a], names[b]] for a, b in pairs_from_names(names)]
    if pairs:
        anatomy["left_right_pairs"] = pairs
    return anatomy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("adapters", nargs="+", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="folder for the rewritten files (created)")
    parser.add_argument("--install", action="store_true", help="copy them over the originals")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    for path in args.adapters:
        tensors, data = tensorfiles.load(path, "adapter")
        card = AdapterCard.from_json(data)
        card.anatomy = declared(card)
        rewritten = args.work / path.name
        tensorfiles.save_atomic(rewritten, tensors, AdapterCard.from_json(card.to_json()).to_json(), kind="adapter",
                                overwrite=True)
        if args.install:
            shutil.copyfile(rewritten, path)
        print(f"{path}: anatomy {card.anatomy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
