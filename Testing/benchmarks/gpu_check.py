"""One command that checks the engine on a GPU: the device-dependent tests, training-step times and memory of
tCURLoRA against LoRA, decoder-only and full fine-tuning, and the shipped models' segmentations against the CPU's.

Run from the repository root (no internet needed)::

    python Testing/benchmarks/gpu_check.py --out DIR [--device cuda|cuda:N|cpu] [--quick] [--parts tests,steps,segment]

Parts, each in a child process with its own time budget (:data:`BUDGET_S`, 7 minutes together, so that the whole
check stays under 8 minutes on one GPU):

- ``tests``: ``pytest Testing -m gpu --device DEVICE`` (the tests marked ``gpu`` run on the device; see
  ``Testing/conftest.py``); pass, fail, error and skip counts from its JUnit XML.
- ``steps``: one training step (forward, DiceCE, backward, AdamW) of UNETR-B at 96^3, batch 1 (``--quick``: the
  compact UNETR at 64^3), with tCURLoRA r = 8 (routes by count), LoRA through ``peft`` r = 1 and r = 32, the frozen
  ViT with the decoder only, and full fine-tuning, in float32 and under bfloat16 autocast: median step time over the
  timed steps and, on CUDA, the allocator's peak (``torch.cuda.max_memory_allocated`` after a reset), on the CPU the
  peak resident set of the steps (``ru_maxrss`` after resetting the kernel's mark; ``n/a`` where it cannot be
  reset). Models come from ``bench_core.training_step``. Methods run one after another (a GPU has no other load);
  a method that would start past the part's budget is reported as skipped.
- ``segment``: the shipped sample (``Resources/Samples``) segmented by the shipped base and by each shipped adapter
  on the device and on the CPU; Dice of the two label maps per label (1.0 where neither has the label).

Writes ``DIR/summary.md`` (Markdown tables), ``DIR/results.json`` and the children's logs. Exit status 0 when every
asked part ran to its end, no test failed and every Dice is at least :data:`DICE_FLOOR`; 1 otherwise; 2 for bad
arguments (a device this machine lacks, a summary already in ``DIR`` without ``--overwrite``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(REPO_ROOT / "TCURLoRASegment"))
sys.path.insert(0, str(HERE))

import bench_core  # noqa: E402  (beside this file)

PARTS = ("tests", "steps", "segment")
BUDGET_S = {"tests": 200, "steps": 150, "segment": 70}
"""Seconds each part may take, child start-up included; a part past its budget is stopped (``steps`` stops
starting methods before that)."""
DICE_FLOOR = 0.99
METHODS = ("tcur:8:auto", "lora:1", "lora:32", "frozen:0", "full:0")
AUTOCASTS = (None, "bfloat16")
STEPS = {False: {"model": "UNETR-B", "size": 96, "warmup": 3, "steps": 10},
         True: {"model": "compact", "size": 64, "warmup": 1, "steps": 2}}
"""The training-step setting, by ``--quick``."""


# ------------------------------------------------------------------------------------------------- part: steps


def measure_steps(spec: dict, results: Path) -> None:
    """Time every method of :data:`METHODS` in each autocast of :data:`AUTOCASTS`; one JSON line a row in
    ``results`` as it is done. ``spec``: ``model``, ``size``, ``warmup``, ``steps``, ``device``, ``deadline_s``
    (seconds from now after which no method starts)."""
    import torch

    deadline = time.monotonic() + spec["deadline_s"]
    device = torch.device(spec["device"])
    longest = 0.0
    for autocast in AUTOCASTS:
        for name in METHODS:
            row: dict[str, Any] = {"method": name, "autocast": autocast}
            started = time.monotonic()
            if started + 1.5 * longest > deadline:
                row["skipped"] = "time budget"
            else:
                try:
                    row.update(_one_method(spec, name, autocast, device))
                except ImportError as error:  # LoRA needs peft, which the test requirements leave out
                    row["skipped"] = f"{error.name or error} not installed"
                except Exception as error:  # a failed row is reported; the others still run
                    row["error"] = f"{type(error).__name__}: {error}"
                finally:  # what a failed method held (an out-of-memory one above all) goes before the next
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                longest = max(longest, time.monotonic() - started)
            with results.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(row) + "\n")


def _one_method(spec: dict, name: str, autocast: str | None, device) -> dict:
    """Build one method, run its warm-up and timed steps; seconds a step, peak memory (MiB), counts."""
    import torch

    cuda = device.type == "cuda"
    step, counts = bench_core.training_step({**spec, "batch": 1, "autocast": autocast}, name)
    if cuda:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        built_mib = torch.cuda.memory_allocated(device) / 2**20
    else:
        built_mib, peak_reset = bench_core.start_peak_rss()
    for _ in range(spec["warmup"]):
        step()
    seconds = []
    for _ in range(spec["steps"]):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    if cuda:
        peak_mib: float | None = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mib = bench_core.peak_rss() if peak_reset else None
    return {"seconds": seconds, "built_mib": built_mib, "peak_mib": peak_mib,
            "memory": "cuda max_memory_allocated" if cuda else "peak RSS", **counts}


# ----------------------------------------------------------------------------------------------- part: segment


def label_agreement(device_labels, cpu_labels, labels: Sequence) -> list[dict]:
    """Dice of two label maps per label, background excepted.

    Args:
        device_labels, cpu_labels: integer arrays of one shape (the maps to compare).
        labels: the model's :class:`TCURLoRALib.cards.Label` list (``value`` 0 is background and skipped).

    Returns:
        one dict a label: ``name``, ``value``, ``dice`` = ``2 |A ∩ B| / (|A| + |B|)`` (1.0 where neither map has
        the label), voxel counts ``device_voxels`` and ``cpu_voxels``, and ``ok`` (``dice >= DICE_FLOOR``).

    Raises:
        ValueError: the maps' shapes differ (both are named).
    """
    import numpy as np

    if device_labels.shape != cpu_labels.shape:
        raise ValueError(f"label maps of different shapes: device {device_labels.shape}, cpu {cpu_labels.shape}")
    rows = []
    for label in labels:
        if label.value == 0:
            continue
        on_device, on_cpu = device_labels == label.value, cpu_labels == label.value
        size = int(np.count_nonzero(on_device)) + int(np.count_nonzero(on_cpu))
        both = int(np.count_nonzero(on_device & on_cpu))
        dice = 1.0 if size == 0 else 2.0 * both / size
        rows.append({"name": label.name, "value": int(label.value), "dice": dice,
                     "device_voxels": int(np.count_nonzero(on_device)), "cpu_voxels": int(np.count_nonzero(on_cpu)),
                     "ok": dice >= DICE_FLOOR})
    return rows


def measure_segmentation(spec: dict, results: Path) -> None:
    """Segment the shipped sample with the shipped base and each shipped adapter on ``spec["device"]`` and on the
    CPU; one JSON line a model in ``results``."""
    import SimpleITK as sitk

    from TCURLoRALib import volumes
    from TCURLoRALib.adapter import AdaptedUNETR
    from TCURLoRALib.api import adapter_store, load_base
    from TCURLoRALib.paths import SAMPLE_IMAGE, shipped_samples_dir
    from TCURLoRALib.segmentation import segment_volume

    image = volumes.read_image(shipped_samples_dir() / SAMPLE_IMAGE)
    array, geometry = sitk.GetArrayFromImage(image), volumes.Geometry.from_image(image)
    sessions = {"device": AdaptedUNETR(load_base(None, spec["device"])), "cpu": AdaptedUNETR(load_base(None, "cpu"))}
    shipped = [entry for entry in adapter_store().list() if entry.source == "shipped"]
    for adapter in [None, *shipped]:
        row: dict[str, Any] = {"model": adapter.name if adapter else "base"}
        maps = {}
        for where, session in sessions.items():
            session.set_adapter(adapter.path if adapter else None)
            started = time.monotonic()
            maps[where] = segment_volume(array, geometry, session).labels
            row[f"{where}_seconds"] = time.monotonic() - started
        row["labels"] = label_agreement(maps["device"], maps["cpu"], sessions["cpu"].labels)
        with results.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(row) + "\n")


# -------------------------------------------------------------------------------------------------- part: tests


def tests_command(device: str, junit: Path, select: str | None) -> list[str]:
    command = [sys.executable, "-m", "pytest", "Testing", "-m", "gpu", "--device", device, "-q", "-p",
               "no:cacheprovider", f"--junitxml={junit}"]
    return command + (["-k", select] if select else [])


def junit_counts(path: Path) -> dict:
    """Counts of a pytest JUnit XML file: ``tests``, ``passed``, ``failed``, ``errors``, ``skipped`` and the names
    of the tests that failed or erred (``failed_names``)."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for suite in suites for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"tests": counts["tests"], "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"],
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed_names": failed}


def run_tests(args: argparse.Namespace, env: dict) -> dict:
    junit, log = args.out / "tests.xml", args.out / "tests.log"
    junit.unlink(missing_ok=True)
    command = tests_command(args.device, junit, args.tests_k)
    outcome = _run(command, env, BUDGET_S["tests"], log)
    shown = " ".join(command[1:]).replace(str(junit), "DIR/tests.xml")
    result: dict[str, Any] = {"command": f"python {shown}", **outcome}
    if junit.exists():
        result.update(junit_counts(junit))
    return result


# -------------------------------------------------------------------------------------------------- the parent


def _run(command: list[str], env: dict, budget: float, log: Path) -> dict:
    """Run a child with a time limit, its output into ``log``; ``returncode`` (None: timed out) and ``seconds``."""
    started = time.monotonic()
    with log.open("w", encoding="utf-8") as stream:
        try:
            returncode = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT,
                                        timeout=budget).returncode
        except subprocess.TimeoutExpired:
            returncode = None
    return {"returncode": returncode, "seconds": time.monotonic() - started}


def run_child_part(part: str, spec: dict, args: argparse.Namespace, env: dict) -> dict:
    """Run ``part`` (``steps`` or ``segment``) in a child; its rows (those done if it was stopped) and outcome."""
    rows_path, log = args.out / f"{part}.jsonl", args.out / f"{part}.log"
    rows_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", part, "--spec", json.dumps(spec),
               "--rows", str(rows_path)]
    outcome = _run(command, env, BUDGET_S[part], log)
    rows = []
    if rows_path.exists():
        rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if outcome["returncode"] not in (0, None):
        lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        outcome["error"] = lines[-1] if lines else "no output"
    return {**outcome, "rows": rows}


def problems(results: dict) -> list[str]:
    """Why the check fails (an empty list: it passed): parts stopped or crashed, failed tests, erring training
    steps, Dice below :data:`DICE_FLOOR`."""
    found = []
    for part, result in results["parts"].items():
        if result["returncode"] is None:
            found.append(f"{part}: stopped at its time budget of {BUDGET_S[part]} s")
        elif result["returncode"] != 0 and part != "tests":
            found.append(f"{part}: exit {result['returncode']}: {result.get('error', '')}")
    tests = results["parts"].get("tests")
    if tests is not None:
        if "tests" not in tests:
            found.append(f"tests: pytest exit {tests['returncode']} and no JUnit report (see tests.log)")
        elif tests["failed"] or tests["errors"]:
            found.append(f"tests: {tests['failed']} failed, {tests['errors']} errors: "
                         + ", ".join(tests["failed_names"]))
        elif tests["tests"] == 0:
            found.append("tests: no test ran")
        elif tests["returncode"] not in (0, None):
            found.append(f"tests: pytest exit {tests['returncode']}")
    for row in results["parts"].get("steps", {}).get("rows", []):
        if "error" in row:
            found.append(f"steps: {bench_core.method_name(row['method'])}, {row['autocast'] or 'float32'}: "
                         f"{row['error']}")
    for row in results["parts"].get("segment", {}).get("rows", []):
        for label in row["labels"]:
            if not label["ok"]:
                found.append(f"segment: {row['model']}, {label['name']}: Dice {label['dice']:.4f} < {DICE_FLOOR}")
    return found


def machine(device: str) -> dict:
    import monai
    import torch

    info = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "monai": monai.__version__, "cpus": os.cpu_count(), "cpu": platform.machine()}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = "not installed"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in stream if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.device(device).type == "cuda":
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


# ------------------------------------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:,.1f}"


def steps_table(rows: list[dict]) -> list[str]:
    lines = ["| method | autocast | trainable params | step (ms), median [min, max] | time / tCURLoRA "
             "| peak memory (MiB) | peak - built (MiB) | peak / tCURLoRA | memory measured |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    reference = {row["autocast"]: row for row in rows if row["method"] == METHODS[0] and "seconds" in row}
    for row in rows:
        name, autocast = bench_core.method_name(row["method"]), row["autocast"] or "float32"
        if "seconds" not in row:
            lines.append(f"| {name} | {autocast} | {row.get('skipped') or 'failed: ' + row.get('error', '')} "
                         "| | | | | | |")
            continue
        tcur = reference.get(row["autocast"])
        median = statistics.median(row["seconds"])
        time_ratio = f"{median / statistics.median(tcur['seconds']):.2f}" if tcur else "n/a"
        peak = row["peak_mib"]
        peak_cells = "n/a | n/a" if peak is None else f"{peak:,.0f} | {peak - row['built_mib']:,.0f}"
        peak_ratio = (f"{peak / tcur['peak_mib']:.2f}" if tcur and peak is not None and tcur["peak_mib"]
                      else "n/a")
        lines.append(f"| {name} | {autocast} | {row['trainable']:,} | {_ms(median)} [{_ms(min(row['seconds']))}, "
                     f"{_ms(max(row['seconds']))}] | {time_ratio} | {peak_cells} | {peak_ratio} | {row['memory']} |")
    return lines


def segment_table(rows: list[dict], device: str) -> list[str]:
    lines = [f"| model | label | Dice {device} vs cpu | voxels on {device} | voxels on cpu | >= {DICE_FLOOR} "
             f"| seconds on {device} | seconds on cpu |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        for label in row["labels"]:
            lines.append(f"| {row['model']} | {label['name']} | {label['dice']:.4f} | {label['device_voxels']:,} "
                         f"| {label['cpu_voxels']:,} | {'yes' if label['ok'] else 'NO'} "
                         f"| {row['device_seconds']:.1f} | {row['cpu_seconds']:.1f} |")
    return lines


def summary(results: dict) -> str:
    """The Markdown report of a check."""
    info, parts, found = results["machine"], results["parts"], results["problems"]
    where = info.get("gpu", "no GPU")
    if "gpu" in info:
        where += f" ({info['gpu_memory_gib']} GiB), CUDA {info['cuda']}, cuDNN {info['cudnn']}"
    lines = [
        f"## GPU check on `{info['device']}`{' (--quick)' if results['quick'] else ''}: "
        f"{'passed' if not found else 'FAILED'}",
        "",
        f"- Command: `{results['command']}`",
        f"- Device: {where}; CPU {info['cpu']}, {info['cpus']} logical CPUs, torch threads "
        f"{results['steps_setting']['threads'] or 'torch default'} in the children.",
        f"- Python {info['python']}, torch {info['torch']}, monai {info['monai']}, peft {info['peft']}.",
        f"- Wall time: {results['seconds']:.0f} s in all; "
        + ", ".join(f"{part} {result['seconds']:.0f} s (budget {BUDGET_S[part]} s)" for part, result in parts.items())
        + ".",
    ]
    if found:
        lines += ["", "### Problems", ""] + [f"- {problem}" for problem in found]
    skipped = [row for row in parts.get("steps", {}).get("rows", []) if "skipped" in row]
    if skipped:  # not a failure of the code, but the table is incomplete: say so above it
        reasons = sorted({row["skipped"] for row in skipped})
        lines += ["", f"Note: {len(skipped)} of {len(METHODS) * len(AUTOCASTS)} training-step rows skipped "
                      f"({'; '.join(reasons)})."]
    if "tests" in parts:
        tests = parts["tests"]
        lines += ["", "### Tests on the device", "", f"`{tests['command']}`", "",
                  "| tests | passed | failed | errors | skipped | pytest exit | seconds |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        exit_cell = "timed out" if tests["returncode"] is None else str(tests["returncode"])
        if "tests" in tests:
            lines.append(f"| {tests['tests']} | {tests['passed']} | {tests['failed']} | {tests['errors']} "
                         f"| {tests['skipped']} | {exit_cell} | {tests['seconds']:.0f} |")
        else:
            lines.append(f"| no report | | | | | {exit_cell} | {tests['seconds']:.0f} |")
    if "steps" in parts:
        setting = results["steps_setting"]
        lines += ["", "### Training steps side by side", "",
                  f"{setting['model']} at {setting['size']}^3, batch 1: forward, DiceCE, backward, AdamW; "
                  f"{setting['steps']} timed steps after {setting['warmup']} warm-up, one method at a time. "
                  "tCURLoRA r = 8 (U of all three groups, routes by count); LoRA via peft on every qkv, out_proj, "
                  "linear1, linear2; every row but full fine-tuning trains decoder5..2 and nothing else. bfloat16: "
                  "forward and loss under `torch.autocast`, weights and AdamW in float32. torch's default settings "
                  "(on CUDA: TensorFloat-32 for cuDNN's convolutions, not for matmuls; no cuDNN autotuning). Ratios: over tCURLoRA in "
                  "the same autocast (< 1: cheaper than tCURLoRA). Memory: on CUDA the allocator's peak during the "
                  "steps (`max_memory_allocated` after a reset; model, optimiser state and batch included), on the "
                  "CPU the peak resident set of the process during the steps (torch and the libraries included); "
                  "peak - built: over what was held once model and batch were built (activations, gradients, "
                  "AdamW state).",
                  ""] + steps_table(parts["steps"]["rows"])
    if "segment" in parts:
        lines += ["", "### Shipped models: the device's label map against the CPU's", "",
                  f"The shipped sample, segmented by the shipped base and each shipped adapter (sliding window, "
                  f"overlap 0.25) on `{info['device']}` and on the CPU; Dice per label, at least {DICE_FLOOR} "
                  "required (1.0 where neither map has the label).", ""]
        lines += segment_table(parts["segment"]["rows"], info["device"])
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for summary.md, results.json and logs (created if missing)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="compact UNETR at 64^3, 1 warm-up and 2 timed steps (for a CPU; about 2-3 min)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)} (default all)")
    parser.add_argument("--tests-k", metavar="EXPR", help="only the device tests matching this pytest -k expression")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads in every child (default: 1 with --device cpu, else torch's own)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier check in --out")
    parser.add_argument("--child", choices=("steps", "segment"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    from TCURLoRALib.devices import resolve_device

    if args.out is None:
        parser.error("--out DIR is required")
    try:
        args.device = str(resolve_device(args.device))
    except ValueError as error:
        parser.error(str(error))
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown or not args.parts:
        parser.error(f"--parts must be a comma-separated list of {', '.join(PARTS)}, got {unknown or args.parts}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.threads is None and args.device == "cpu":
        # On a CPU shared with other jobs, torch's own thread count (one a core) spin-waits: the quick check took
        # 253 s and overran the segment budget on 2 loaded cores, against 99 s with one thread (measured).
        args.threads = 1
    if (args.out / "summary.md").exists() and not args.overwrite:
        parser.error(f"{args.out / 'summary.md'} already exists: give --overwrite to replace it, or another --out")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    args.out = args.out.resolve()  # the children run in the repository root
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.child:
        spec = json.loads(args.spec)
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        {"steps": measure_steps, "segment": measure_segmentation}[args.child](spec, args.rows)
        return 0

    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    # Deterministic cuBLAS needs this before its first handle; training sets it, but in one pytest process other
    # tests have made the handle by then.
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    setting = {**STEPS[args.quick], "device": args.device, "threads": args.threads}
    results: dict[str, Any] = {"quick": args.quick, "machine": machine(args.device), "steps_setting": setting,
                               "command": "python Testing/benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
                               "parts": {}}
    for part in args.parts:
        print(f"gpu_check: {part} (budget {BUDGET_S[part]} s)", file=sys.stderr, flush=True)
        if part == "tests":
            results["parts"][part] = run_tests(args, env)
        elif part == "steps":  # with the background process's malloc settings, as bench_core measures
            spec = {**setting, "deadline_s": BUDGET_S[part] - 30}
            results["parts"][part] = run_child_part(part, spec, args, {**env, **bench_core.MALLOC_ENV})
        else:
            results["parts"][part] = run_child_part(part, {"device": args.device, "threads": args.threads}, args, env)
    results["seconds"] = time.monotonic() - started
    results["problems"] = problems(results)
    write_atomically(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    text = summary(results)
    write_atomically(args.out / "summary.md", text)
    print(text)
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
