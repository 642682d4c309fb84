"""Make the shipped defaults: the base model and the default adapters, each evaluated on held-out test cases.

Usage, from the repository root (CPU, about an hour on 2 cores)::

    python -m Testing.cohorts.make_defaults --work /tmp/defaults [--cohorts DIR] [--base-steps 600]
        [--adapter-steps 200] [--only base|NAME] [--pretrained FILE] [--install]

1. Builds the cohorts (``tissue``, ``hippocampus``, ``lpba``; see README.md here) into ``WORK/cohorts``.
2. Pretrains the compact base UNETR on ``tissue`` (train + val, CAT12), evaluates it on the test cases (MNI152) and
   stores it in half precision with those metrics in its card.
3. Trains each default adapter few-shot (``ADAPTERS``: at most 5 training cases, validation on the val split),
   and evaluates on the test cases both the adapter and the base without adapter training (the same network with a
   fresh output head for the new labels, which is where an adapter starts), recording both in the adapter's card.
4. With ``--install``, copies the base and the adapters into ``Resources/Models/``.

Every number in the cards comes from this run; rerunning with the same arguments gives the same files (fixed seeds,
one torch thread per job).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "TCURLoRASegment"))

from TCURLoRALib import metrics, tensorfiles  # noqa: E402
from TCURLoRALib.basemodel import load_base, save_base  # noqa: E402
from TCURLoRALib.cards import Label  # noqa: E402
from TCURLoRALib.progress import TerminalProgress  # noqa: E402
from TCURLoRALib.segmentation import segment  # noqa: E402
from TCURLoRALib.train import pretrain, train_adapter  # noqa: E402

from . import build  # noqa: E402

BASE_NAME = "brain-tissue-base"
BASE_CARD: dict[str, Any] = {
    "name": "TCURLoRA brain tissue UNETR (compact, 2 mm)",
    "unetr": {"in_channels": 1, "out_channels": 4, "img_size": [64, 64, 64], "feature_size": 16, "hidden_size": 192,
              "mlp_dim": 768, "num_heads": 6},
    "spacing": [2.0, 2.0, 2.0],
    "orientation": "RAS",
    "patch_size": [64, 64, 64],
    "intensity": {"kind": "zscore_nonzero"},
    "labels": [
        {"value": 0, "name": "background", "color": [0, 0, 0]},
        {"value": 1, "name": "CSF", "color": [85, 150, 235]},
        {"value": 2, "name": "grey matter", "color": [210, 160, 140]},
        {"value": 3, "name": "white matter", "color": [245, 245, 220]},
    ],
    "provenance": {
        "task": "brain tissue: CSF, grey matter, white matter",
        "data": "Testing/cohorts 'tissue': deformed, intensity-augmented copies of the CAT12 T1 template with its "
                "tissue maps (deepmriprep 0.3.0) for training and validation; MNI152 2009a (nilearn) held out for test",
        "command": "python -m Testing.cohorts.make_defaults",
    },
    "metrics": {},
}
COHORTS = {"tissue": (12, 3, 3), "hippocampus": (8, 2, 4), "lpba": (5, 1, 2)}
ADAPTERS = {
    "hippocampus": {"task": "hippocampus", "train_cases": 4, "labels": [
        {"value": 0, "name": "background", "color": [0, 0, 0]},
        {"value": 1, "name": "left hippocampus", "color": [220, 180, 30]},
        {"value": 2, "name": "right hippocampus", "color": [30, 180, 220]}]},
    "deep-grey-structures": {"task": "lpba", "train_cases": 5, "labels": [
        {"value": 0, "name": "background", "color": [0, 0, 0]},
        {"value": 1, "name": "left caudate", "color": [30, 144, 255]},
        {"value": 2, "name": "right caudate", "color": [100, 190, 255]},
        {"value": 3, "name": "left putamen", "color": [236, 13, 176]},
        {"value": 4, "name": "right putamen", "color": [255, 120, 210]},
        {"value": 5, "name": "left hippocampus", "color": [220, 180, 30]},
        {"value": 6, "name": "right hippocampus", "color": [250, 220, 100]}]},
}


def _cases(cohort: Path, split: str) -> list[dict[str, str]]:
    folder = cohort.parent
    return [{"image": str(folder / c["image"]), "label": str(folder / c["label"])}
            for c in json.loads((folder / f"{split}.json").read_text())]


def evaluate_on(model_path: Path, adapter: Path | None, cases: list[dict[str, str]], out: Path,
                labels: list[Label]) -> dict[str, Any]:
    """Segment each case and measure Dice and HD95 against its label map; returns the summary for a card."""
    out.mkdir(parents=True, exist_ok=True)
    predictions = []
    for index, case in enumerate(cases):
        prediction = out / f"case{index}.nii.gz"
        segment(case["image"], model_path, prediction, adapter_path=adapter, device="cpu", overwrite=True)
        predictions.append(prediction)
    results = metrics.evaluate(predictions, [case["label"] for case in cases], labels)
    print(metrics.format_table(results))
    per_label = {row["name"]: {"dice": round(row["dice"], 4),
                               "hd95_mm": None if row["hd95_mm"] is None else round(row["hd95_mm"], 2)}
                 for row in metrics.summarize(results)}
    means = [value["dice"] for value in per_label.values()]
    return {"cases": len(cases), "per_label": per_label, "mean_dice": round(sum(means) / len(means), 4)}


def _rewrite_card(path: Path, kind: str, update: dict[str, Any]) -> None:
    tensors, card = tensorfiles.load(path, kind)
    card["metrics"] = {**card.get("metrics", {}), **update}
    tensorfiles.save_atomic(path, tensors, card, kind=kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/defaults"))
    parser.add_argument("--cohorts", type=Path, help="cohort folder (default WORK/cohorts); built or reused there")
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--adapter-steps", type=int, default=200)
    parser.add_argument("--only", choices=["base", *ADAPTERS], help="make only this one (the others must exist)")
    parser.add_argument("--pretrained", type=Path,
                        help="a base already pretrained with these settings (float32 file): evaluate and store it")
    parser.add_argument("--install", action="store_true", help="copy the results into Resources/Models/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = args.work
    cohort_root = args.cohorts or work / "cohorts"
    cohorts = {task: build.build_cohort(task, cohort_root / task, dict(zip(("train", "val", "test"), counts)))
               for task, counts in COHORTS.items()}
    base_path = work / f"{BASE_NAME}.safetensors"
    labels = [Label.from_json(label) for label in BASE_CARD["labels"]]
    if args.only in (None, "base"):
        started = time.monotonic()
        full = args.pretrained or work / f"{BASE_NAME}-fp32.safetensors"
        if args.pretrained is None:
            pretrain(_cases(cohorts["tissue"], "train"), BASE_CARD, full, steps=args.base_steps,
                     validation=_cases(cohorts["tissue"], "val"), validate_every=max(args.base_steps // 4, 1),
                     seed=0, device="cpu", threads=1, overwrite=True, progress=TerminalProgress())
        base = load_base(full)
        card = base.card.to_json()
        if args.pretrained is None:
            card["provenance"]["training_seconds"] = round(time.monotonic() - started, 1)
        test = evaluate_on(full, None, _cases(cohorts["tissue"], "test"), work / "eval" / "base", labels)
        card["metrics"] = {**card["metrics"], "test": {"source": "MNI152 2009a (held out)", **test}}
        save_base(base_path, base.model, card, dtype=torch.float16)
    for name, spec in ADAPTERS.items():
        if args.only not in (None, name):
            continue
        adapter_labels = [Label.from_json(label) for label in spec["labels"]]
        cohort = cohorts[spec["task"]]
        train_cases = _cases(cohort, "train")[: spec["train_cases"]]
        out = work / f"{name}.safetensors"
        untrained = work / f"{name}-untrained.safetensors"
        for path, steps in ((untrained, 0), (out, args.adapter_steps)):
            train_adapter(base_path, train_cases, adapter_labels, path, name=name, steps=steps,
                          validation=_cases(cohort, "val"), seed=0, device="cpu", threads=1, overwrite=True,
                          one_piece="all", progress=TerminalProgress())
        test_cases = _cases(cohort, "test")
        adapter_test = evaluate_on(base_path, out, test_cases, work / "eval" / name, adapter_labels)
        baseline = evaluate_on(base_path, untrained, test_cases, work / "eval" / f"{name}-untrained", adapter_labels)
        _rewrite_card(out, "adapter", {"test": {**adapter_test, "base_without_adapter_training": baseline}})
    if args.install:
        models = ROOT / "Resources" / "Models"
        models.mkdir(parents=True, exist_ok=True)
        for name in [BASE_NAME, *ADAPTERS]:
            shutil.copyfile(work / f"{name}.safetensors", models / f"{name}.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
