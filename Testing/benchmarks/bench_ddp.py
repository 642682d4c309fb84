"""Benchmark of training under torchrun: N processes x B crops against one process x N B crops, same seed.

Run from the repository root::

    python Testing/benchmarks/bench_ddp.py [--nproc 2] [--batch-size 1] [--steps 2 3 6] [--device cpu]
                                           [--out results.md]

Setup (in a temporary folder): the tiny UNETR base of the test suite (``Testing/synthetic.py``) and three synthetic
cases; an adapter (rank 4, all groups, a new two-label head, lr 1e-2, ``--validation none``) is trained by ``train``
for each number of steps, three ways: (a) ``torchrun --standalone --nproc_per_node N`` with ``--batch-size B`` (gloo
on the CPU, NCCL on GPUs), (b) one process with ``--batch-size N B`` and ``--threads 1``, (c) the same as (b) with
``--threads 2``. (c) differs from (b) only in the order of floating-point sums, so (b) against (c) is the size of a
float-rounding difference after that many AdamW steps, against which (a) against (b) is judged.

Table: per number of steps, the largest difference of any adapter tensor element between (a) and (b), and between
(b) and (c); the largest relative difference of the step losses between (a) and (b); the wall time of each command
(start-up included).

Not part of the pytest suite (the file name does not match ``test_*.py``) and imported by no test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "TCURLoRASegment"))
sys.path.insert(0, str(REPO_ROOT / "Testing"))

import torch  # noqa: E402

from synthetic import BASE_LABELS, TARGET, make_tiny_base, write_case  # noqa: E402
from TCURLoRALib import tensorfiles  # noqa: E402


def run(command: list[str], env: dict[str, str]) -> tuple[list[float], float]:
    """Runs a ``train`` command with ``--progress json``; its step losses and wall time."""
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return [e["loss"] for e in events if e["event"] == "step"], seconds


def largest_difference(first: Path, second: Path) -> float:
    a, b = (tensorfiles.load(path, kind="adapter")[0] for path in (first, second))
    return max(float((a[key].double() - b[key].double()).abs().max()) for key in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1, help="crops a process")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 3, 6])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "TCURLoRASegment"), "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        base = make_tiny_base(folder / "base.safetensors")
        for seed in range(3):
            write_case(folder, seed, (1.6, 1.6, 1.6))
        labels = json.dumps([label.to_json() for label in (BASE_LABELS[0], TARGET)])
        for steps in options.steps:
            common = ["train", "--base", str(base), "--cases", str(folder), "--labels", labels, "--unmapped",
                      "background", "--rank", "4", "--steps", str(steps), "--validation", "none", "--device",
                      options.device, "--progress", "json", "--overwrite"]
            losses, seconds = {}, {}
            losses["a"], seconds["a"] = run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                 str(options.nproc), "-m", "TCURLoRALib", *common, "-o", str(folder / "a.safetensors"),
                 "--batch-size", str(options.batch_size), "--threads", "1"], env)
            for name, threads in (("b", "1"), ("c", "2")):
                losses[name], seconds[name] = run(
                    [sys.executable, "-m", "TCURLoRALib", *common, "-o", str(folder / f"{name}.safetensors"),
                     "--batch-size", str(options.nproc * options.batch_size), "--threads", threads], env)
            loss_difference = max(abs(x - y) / abs(y) for x, y in zip(losses["a"], losses["b"]))
            rows.append(f"| {steps} | {largest_difference(folder / 'a.safetensors', folder / 'b.safetensors'):.2g} "
                        f"| {largest_difference(folder / 'b.safetensors', folder / 'c.safetensors'):.2g} "
                        f"| {loss_difference:.2g} | {seconds['a']:.1f} | {seconds['b']:.1f} | {seconds['c']:.1f} |")
    text = "\n".join([
        f"torchrun {options.nproc} processes x {options.batch_size} crops (a) against one process x "
        f"{options.nproc * options.batch_size} crops, threads 1 (b) and 2 (c); tiny UNETR, {options.device}, torch "
        f"{torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs",
        "",
        "| steps | max abs diff (a) vs (b) | max abs diff (b) vs (c) | max rel loss diff (a) vs (b) | (a) s | (b) s "
        "| (c) s |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(text)
    if options.out:
        options.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
