"""Benchmark of the tCURLoRA core on a CPU: the routes of a group's update, and one training step against LoRA (peft).

Run from the repository root::

    python Testing/benchmarks/bench_core.py [--quick] [--threads 1] [--out results.md]

Every measurement runs in a fresh child process (``--one SPEC``) started with the malloc settings of the background
training process (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=10^12``, see DESIGN.md): glibc then neither returns
freed memory to the system nor serves large blocks by ``mmap``, so the resident set only grows and its peak
(``ru_maxrss``) is the high-water mark of the whole run. The parent prints and writes Markdown tables of ratios
measured side by side in one run.

Table 1, routes (``tcur/routes.py``): all Linear layers ("sites") of one weight group (``n1 x n2 x n3``, rank 8) on
``N`` random input rows each, forward and backward (to U and to the inputs) with a fixed upstream gradient: the
frozen base layers alone (``F.linear`` with no weight gradient, what every method pays), and each route on top of
them: dense ΔW by FFT, dense ΔW by block-circulant products, the factored form, and the factored form without the
input gradient of its own (its x-side backward: what all sites but the first block's qkv must pay). Times over the base, with the route the count of
``routes.route_costs`` chooses and the fastest measured, and, per route pair, the token count where the measured
lines (time = a + b N, through the two extreme N) cross.

Table 2: one training step (forward, DiceCE loss, backward, AdamW step) of a MONAI UNETR with (a) tCURLoRA
(U of all three groups + decoder5..2) with routes chosen by the count, (b) the same with the dense FFT route for
every group (the code before routes), (c) LoRA injected by peft into every qkv, out_proj, linear1, linear2 of the
ViT (+ decoder5..2), (d) the frozen ViT with decoder5..2 only. Time: the methods of one setting are built side by
side in one child and stepped in rounds, so that load from other processes on a shared machine hits them alike;
median wall clock over the timed rounds. Memory: a separate child per method; peak resident set (``ru_maxrss``)
minus the resident set once model, optimiser and batch are built, i.e. what the training steps add (activations,
gradients, AdamW state).

Not part of the pytest suite (the file name does not match ``test_*.py``) and imported by no test.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "TCURLoRASegment"))

# Read by glibc at process start, so they can only be set for the children.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1000000000000"}

# UNETR ViT sizes (feature_size 16, 1 input channel, 2 output channels, patch 16).
MODELS = {
    "UNETR-B": {"hidden_size": 768, "mlp_dim": 3072, "num_heads": 12},
    "compact": {"hidden_size": 192, "mlp_dim": 768, "num_heads": 6},
}
TCUR_RANK = 8
PAPER_LORA_RANK = 32


# ---------------------------------------------------------------------------------------------------- measurements


def interleaved(runs: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of each run, measured in rounds so that load from other processes hits all of them alike.

    Each round calls every run once, in an order rotated by one per round (no run always follows the same one).

    Args:
        runs: name -> callable to time.
        warmup: untimed rounds first.
        repeats: timed rounds.

    Returns:
        name -> ``{"wall": [...], "cpu": [...]}``: ``repeats`` durations by the wall clock and by this process's CPU
        time (all threads; other processes inflate it far less than the wall clock, unless threads spin-wait).
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    durations: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            durations[name]["wall"].append(time.perf_counter() - start_wall)
            durations[name]["cpu"].append(time.process_time() - start_cpu)
    return durations


ROUTE_RUNS = ("base", "fft", "bcirc", "factored", "factored, no input grad")
"""What the routes table times: the frozen base layers alone, then each route on top of them."""


def group_geometry(model: str, group: str) -> tuple[tuple[int, int, int], list[int]]:
    """``(n1, n2, n3)`` and the slices each site holds, for ``group`` of ``model``'s 12-layer ViT."""
    hidden, mlp = MODELS[model]["hidden_size"], MODELS[model]["mlp_dim"]
    shapes = {"attention": (hidden, hidden, 48), "mlp_up": (mlp, hidden, 12), "mlp_down": (hidden, mlp, 12)}
    return shapes[group], ([3, 1] * 12 if group == "attention" else [1] * 12)


def measure_routes(spec: dict) -> dict:
    """Forward + backward of every site of one group at each token count of ``spec["tokens"]``: the base layers
    alone and each route on top of them, timed in rotated rounds; seconds, with the count's choice."""
    import torch
    import torch.nn.functional as F

    from TCURLoRALib.tcur import TCURGroup
    from TCURLoRALib.tcur.routes import route_costs

    (n1, n2, n3), counts = group_geometry(spec["model"], spec["group"])
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n1, n2, n3, generator=generator) / n2**0.5
    group = TCURGroup.from_weight(weight, spec["rank"])
    with torch.no_grad():
        group.u.add_(0.01 * torch.randn(group.u.shape, generator=generator))  # ΔW != 0, as after some training
    sites, start = [], 0
    for count in counts:
        sites.append((start, start + count, torch.cat(weight[:, :, start : start + count].unbind(-1)).contiguous()))
        start += count
    results = []
    for tokens in spec["tokens"]:
        inputs = [torch.randn(tokens, n2, generator=generator) for _ in sites]
        upstream = [torch.randn(tokens, (stop - begin) * n1, generator=generator) for begin, stop, _ in sites]

        def run(route: str) -> Callable[[], None]:
            def step() -> None:
                group.u.grad = None
                xs = [x.detach().requires_grad_() for x in inputs]
                if route in ("fft", "bcirc"):
                    slices = group.delta_slices(route)
                    outputs = [F.linear(x, w + slices[a:b].reshape(-1, n2)) for x, (a, b, w) in zip(xs, sites)]
                elif route == "base":
                    outputs = [F.linear(x, w) for x, (_, _, w) in zip(xs, sites)]
                else:
                    core = group.mixing()
                    # "no input grad": the base layers still pass the input gradient, the update does not.
                    cut = route != "factored"
                    outputs = [group.update(x.detach() if cut else x, a, b, core, base=F.linear(x, w))
                               for x, (a, b, w) in zip(xs, sites)]
                torch.autograd.backward(outputs, upstream)

            return step

        durations = interleaved({route: run(route) for route in ROUTE_RUNS}, spec["warmup"], spec["repeats"])
        results.append({
            "tokens": tokens,
            "wall_s": {route: times["wall"] for route, times in durations.items()},
            "count": route_costs((n1, n2, n3), spec["rank"], counts, tokens),
        })
    return {"results": results}


def build_unetr(model: str, size: int):
    import torch
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    return UNETR(1, 2, (size, size, size), feature_size=16, **MODELS[model])


def numel(parameters) -> int:
    return sum(p.numel() for p in parameters)


def parse_method(name: str) -> tuple[str, int, str]:
    """``"tcur:8:auto"`` -> ``("tcur", 8, "auto")``; ``"lora:1"`` -> ``("lora", 1, "")``; ``"frozen:0"``."""
    method, rank, *route = name.split(":")
    return method, int(rank), (route[0] if route else "")


def prepare(method: str, rank: int, unetr, route: str = "auto"):
    """Wrap ``unetr`` for ``method`` (tCURLoRA on ``route``) and set what trains; return ``(model, counts)``."""
    from torch import nn

    from TCURLoRALib.tcur import DECODER_BLOCKS

    decoder = [getattr(unetr, name) for name in DECODER_BLOCKS]
    decoder_count = numel(p for block in decoder for p in block.parameters())
    if method == "tcur":
        from TCURLoRALib.tcur import TCURLoRAConfig, TCURLoRAModel

        model: nn.Module = TCURLoRAModel(unetr, TCURLoRAConfig(rank=rank))
        model.set_route(route)
        counts = model.mark_trainable(train_head=False)
        adapter = counts.u
    elif method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = [name for name, _ in lora_targets(unetr)]
        model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), unetr)
        model.requires_grad_(False)
        adapter = 0
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(True)
                adapter += parameter.numel()
        for block in decoder:
            block.requires_grad_(True)
    elif method == "frozen":
        model = unetr
        model.requires_grad_(False)
        for block in decoder:
            block.requires_grad_(True)
        adapter = 0
    else:
        raise ValueError(f"unknown method {method!r}; expected 'tcur', 'lora' or 'frozen'.")
    trainable = numel(p for p in model.parameters() if p.requires_grad)
    if trainable != adapter + decoder_count:
        raise ValueError(f"{method}: {trainable} trainable parameters, expected adapter {adapter} + decoder {decoder_count}.")
    return model, {"adapter": adapter, "decoder": decoder_count, "trainable": trainable}


def training_step(spec: dict, name: str) -> tuple[Callable[[], None], dict]:
    """A fresh UNETR of ``spec``'s model and size, prepared for method ``name`` (see :func:`parse_method`); its
    step function (batch ``spec["batch"]``) and counts."""
    import torch
    from monai.losses import DiceCELoss

    size, batch = spec["size"], spec["batch"]
    method, rank, route = parse_method(name)
    model, counts = prepare(method, rank, build_unetr(spec["model"], size), route or "auto")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    image = torch.randn(batch, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * 3, indexing="ij"))
    label = (grid.square().sum(0) < 0.4).float()[None, None].expand(batch, -1, -1, -1, -1)  # a ball: both classes

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_function(model(image), label).backward()
        optimizer.step()

    return step, counts


def measure_time(spec: dict) -> dict:
    """Step times of every method of one setting, built side by side in this process and timed in rounds."""
    steps, counts = {}, {}
    for name in spec["methods"]:
        steps[name], counts[name] = training_step(spec, name)
    durations = interleaved(steps, spec["warmup"], spec["steps"])
    return {
        "wall_s": {name: times["wall"] for name, times in durations.items()},
        "cpu_s": {name: times["cpu"] for name, times in durations.items()},
        "counts": counts,
    }


def release_free_heap() -> None:
    """Hand glibc's free heap back to the system (the malloc settings stop it doing so by itself)."""
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); ``False`` where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def measure_memory(spec: dict) -> dict:
    """Peak memory of one method's training steps, alone in this process; MiB.

    Building the model (the tCURLoRA decomposition above all) leaves freed heap behind that, with the malloc
    settings, would stay resident and be reused by the steps unseen. So: build, trim the heap, take the RSS, reset
    the peak mark, run the steps, read the peak.
    """
    import psutil

    step, counts = training_step(spec, spec["method"])
    gc.collect()
    release_free_heap()
    rss_built = psutil.Process().memory_info().rss / 2**20
    peak_reset = reset_peak_rss()
    for _ in range(spec["steps"]):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    return {"rss_built_mib": rss_built, "peak_mib": peak, "step_peak_mib": peak - rss_built, "peak_reset": peak_reset, **counts}


def run_child(spec: dict, timeout: float) -> dict:
    """Run one measurement in a fresh process with the malloc settings; its result, or ``{"error": ...}``."""
    env = {**os.environ, **MALLOC_ENV}
    command = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------ plan


def lora_targets(unetr) -> list:
    """The ViT Linear layers LoRA adapts, ``(path, module)``: the ones tCURLoRA's weight groups stack."""
    from TCURLoRALib.tcur import GROUP_NAMES
    from TCURLoRALib.tcur.groups import group_sites

    return [(site.path, unetr.get_submodule(site.path)) for group in GROUP_NAMES for site in group_sites(unetr, group)]


def lora_matched_rank(unetr, tcur_rank: int) -> int:
    """The LoRA rank whose A and B count is nearest tCURLoRA's U at ``tcur_rank`` (at least 1).

    A LoRA of rank R on a Linear ``in -> out`` trains ``R (in + out)``; tCURLoRA's U is ``r^2 n3`` a group.
    """
    from TCURLoRALib.tcur import TCURLoRAConfig, TCURLoRAModel

    per_rank = sum(linear.in_features + linear.out_features for _, linear in lora_targets(unetr))
    u_count = TCURLoRAModel(copy.deepcopy(unetr), TCURLoRAConfig(rank=tcur_rank)).mark_trainable().u
    return max(1, round(u_count / per_rank))


GROUPS = ("attention", "mlp_up", "mlp_down")


def plan(quick: bool, warmup: int, steps: int, threads: int | None) -> list[dict]:
    """The child runs, in order: routes per group and model, then per setting one timing run and one memory run per
    method."""
    if quick:
        route_models = [("compact", [64, 216], 3)]
        settings = [("compact", 64, 1)]
    else:
        route_models = [("UNETR-B", [216, 432, 864], 3), ("compact", [64, 216, 432], 5)]
        settings = [("UNETR-B", 96, 1), ("UNETR-B", 96, 2), ("compact", 96, 1), ("compact", 64, 1)]
    specs = [
        {"kind": "routes", "model": model, "group": group, "rank": TCUR_RANK, "tokens": tokens, "warmup": 1,
         "repeats": repeats}
        for model, tokens, repeats in route_models for group in GROUPS
    ]
    for model, size, batch in settings:
        matched = f"lora:{lora_matched_rank(build_unetr(model, 64), TCUR_RANK)}"
        methods = [f"tcur:{TCUR_RANK}:auto", f"tcur:{TCUR_RANK}:fft", matched, f"lora:{PAPER_LORA_RANK}", "frozen:0"]
        if quick:
            methods.remove(f"lora:{PAPER_LORA_RANK}")  # to stay near two minutes
        if batch > 1:  # the goal's comparison only: the other rows change with the batch as at batch 1
            methods = [methods[0], matched, "frozen:0"]
        setting = {"model": model, "size": size, "batch": batch}
        specs.append({"kind": "time", **setting, "methods": methods, "warmup": warmup, "steps": steps})
        # Two steps: the first allocates AdamW's state, the second shows that nothing else accumulates.
        specs += [{"kind": "memory", **setting, "method": method, "steps": 2} for method in methods]
    for spec in specs:
        spec["threads"] = threads
    return specs


# ---------------------------------------------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}"


def crossing(first: tuple[float, float], second: tuple[float, float]) -> float | None:
    """Where two lines ``a + b N`` given as ``(a, b)`` cross, for ``N > 0``; ``None`` where they do not."""
    (a1, b1), (a2, b2) = first, second
    if b1 == b2:
        return None
    tokens = (a2 - a1) / (b1 - b2)
    return tokens if tokens > 0 else None


def line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """``(a, b)`` of the line through the first and last ``(N, value)`` points."""
    (n_first, first), (n_last, last) = points[0], points[-1]
    slope = (last - first) / (n_last - n_first)
    return first - slope * n_first, slope


def route_table(results: list[tuple[dict, dict]]) -> list[str]:
    """Per group and token count: time over the base layers of each route, the count's choice, the fastest."""
    routes = ROUTE_RUNS[1:4]
    lines = [
        "| model, group (n1 x n2 x n3) | N | base layers (ms) | fft | bcirc | factored | factored, no input grad "
        "| count chooses | fastest measured |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    crossings = [
        "| model, group | measured: factored = fft at N | factored = bcirc at N | fft = bcirc at N "
        "| count: factored = fft at N | factored = bcirc at N | fft = bcirc at N |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for spec, outcome in results:
        (n1, n2, n3), _ = group_geometry(spec["model"], spec["group"])
        label = f"{spec['model']}, {spec['group']} ({n1} x {n2} x {n3})"
        if "error" in outcome:
            lines.append(f"| {label} | | failed: {outcome['error']} | | | | | | |")
            continue
        measured: dict[str, list[tuple[int, float]]] = {route: [] for route in routes}
        counted: dict[str, list[tuple[int, float]]] = {route: [] for route in routes}
        for result in outcome["results"]:
            wall = {route: 1000 * median(times) for route, times in result["wall_s"].items()}
            over = {route: wall[route] - wall["base"] for route in ROUTE_RUNS[1:]}
            chosen = min(routes, key=result["count"].__getitem__)
            fastest = min(routes, key=over.__getitem__)
            for route in routes:
                measured[route].append((result["tokens"], over[route]))
                counted[route].append((result["tokens"], result["count"][route]))
            cells = [f"{over[route]:,.0f}" for route in ROUTE_RUNS[1:]]
            lines.append(
                f"| {label} | {result['tokens']} | {wall['base']:,.0f} | " + " | ".join(cells) + f" | {chosen} | {fastest} |"
            )
        pairs = [("factored", "fft"), ("factored", "bcirc"), ("fft", "bcirc")]
        cells = []
        for source in (measured, counted):
            for first, second in pairs:
                tokens = crossing(line(source[first]), line(source[second]))
                cells.append("none" if tokens is None else f"{tokens:,.0f}")
        crossings.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + ["", "Crossovers (lines through the smallest and largest N of each group; \"none\": one route "
                    "is cheaper at every N > 0):", ""] + crossings


def method_name(name: str) -> str:
    method, rank, route = parse_method(name)
    if method == "tcur":
        return f"tCURLoRA r={rank}" + (", routes by count" if route == "auto" else f", {route} route")
    if method == "lora":
        return f"LoRA (peft) r={rank}"
    return "frozen ViT, decoder only"


def setting_rows(results: list[tuple[dict, dict]]) -> dict[tuple[str, int, int], list[dict]]:
    """Per (model, size, batch): one row per method joining its step times and its memory, with any errors."""
    settings: dict[tuple[str, int, int], list[dict]] = {}
    for spec, result in results:
        if spec["kind"] != "time":
            continue
        rows = settings.setdefault((spec["model"], spec["size"], spec["batch"]), [])
        for name in spec["methods"]:
            row = {"name": name, "method": parse_method(name)[0], "errors": [], "steps": spec["steps"],
                   "warmup": spec["warmup"]}
            if "error" in result:
                row["errors"].append(f"time: {result['error']}")
            else:
                row.update(result["counts"][name], wall_s=result["wall_s"][name], cpu_s=result["cpu_s"][name])
            rows.append(row)
    for spec, result in results:
        if spec["kind"] != "memory":
            continue
        for row in settings.get((spec["model"], spec["size"], spec["batch"]), []):
            if row["name"] == spec["method"]:
                if "error" in result:
                    row["errors"].append(f"memory: {result['error']}")
                else:
                    row.update(result)
    return settings


def complete(row: dict | None) -> bool:
    return row is not None and "wall_s" in row and "step_peak_mib" in row


def headline_table(settings: dict[tuple[str, int, int], list[dict]]) -> list[str]:
    """tCURLoRA (routes by count) over each other adapter row of the same setting: step time and step peak memory."""
    lines = [
        "| setting | tCURLoRA r=8 vs | trainable params (other / tCURLoRA) | step time ratio (medians) "
        "| step time ratio (fastest rounds) | step time ratio (median of rounds) | step CPU-time ratio "
        "| step peak memory ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, size, batch), rows in settings.items():
        tcur = next((row for row in rows if row["name"].endswith(":auto")), None)
        for other in rows:
            if other is tcur or other["method"] == "frozen":
                continue
            setting = f"{model} {size}^3, batch {batch}"
            if not (complete(tcur) and complete(other)):
                lines.append(f"| {setting} | {method_name(other['name'])} | failed, see below | | | | | |")
                continue
            lines.append(
                f"| {setting} | {method_name(other['name'])} | {other['trainable']:,} / {tcur['trainable']:,} "
                f"| {ratio(median(tcur['wall_s']), median(other['wall_s']))} "
                f"| {ratio(min(tcur['wall_s']), min(other['wall_s']))} "
                f"| {median([a / b for a, b in zip(tcur['wall_s'], other['wall_s'])]):.2f} "
                f"| {ratio(median(tcur['cpu_s']), median(other['cpu_s']))} "
                f"| {ratio(tcur['step_peak_mib'], other['step_peak_mib'])} |"
            )
    return lines


def step_table(settings: dict[tuple[str, int, int], list[dict]]) -> list[str]:
    """One table per setting, every method, with ratios against the count-matched LoRA (the first LoRA row)."""
    lines: list[str] = []
    for (model, size, batch), rows in settings.items():
        matched = next((row for row in rows if row["method"] == "lora" and complete(row)), None)
        against = method_name(matched["name"]).replace(" (peft)", "") if matched else "LoRA"
        sizes = MODELS[model]
        lines += [
            "",
            f"**{model}** (hidden {sizes['hidden_size']}, mlp {sizes['mlp_dim']}, {sizes['num_heads']} heads, "
            f"feature_size 16) at {size}^3, batch {batch}: {rows[0]['steps']} timed rounds after {rows[0]['warmup']} "
            "warm-up",
            "",
            "| method | adapter params | trainable params | step (ms), median [min, max] | step CPU time (ms) "
            f"| time / {against} | step peak (MiB) | peak RSS in steps (MiB) | peak / {against} |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            if row["errors"] or not complete(row):
                lines.append(f"| {method_name(row['name'])} | failed: {'; '.join(row['errors'])} | | | | | | | |")
                continue
            wall = row["wall_s"]
            cells = [
                method_name(row["name"]), f"{row['adapter']:,}", f"{row['trainable']:,}",
                f"{1000 * median(wall):,.0f} [{1000 * min(wall):,.0f}, {1000 * max(wall):,.0f}]",
                f"{1000 * median(row['cpu_s']):,.0f}",
                ratio(median(wall), median(matched["wall_s"])) if matched else "n/a",
                f"{row['step_peak_mib']:,.0f}", f"{row['peak_mib']:,.0f}",
                ratio(row["step_peak_mib"], matched["step_peak_mib"]) if matched else "n/a",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def header(quick: bool, threads: int | None, peak_reset: bool, load_before: tuple[float, ...], load_after: tuple[float, ...], elapsed: float) -> list[str]:
    import monai
    import peft
    import torch

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    malloc = " ".join(f"{key}={value}" for key, value in MALLOC_ENV.items())
    return [
        f"## tCURLoRA core benchmark{' (--quick)' if quick else ''}",
        "",
        f"- Machine: {cpu}, {os.cpu_count()} logical CPUs, torch threads {threads or torch.get_num_threads()}{'' if threads else ' (default)'}, no GPU; "
        f"Python {platform.python_version()}, torch {torch.__version__}, monai {monai.__version__}, peft {peft.__version__}.",
        f"- Every measurement runs in a fresh child process started with `{malloc}` (glibc then neither trims nor "
        "mmaps, as in the background training process; see DESIGN.md), one child at a time.",
        f"- Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; total {elapsed / 60:.1f} min. "
        "Other processes on the machine slow some rounds: timings are taken in interleaved rounds so that such load "
        "hits every compared row alike.",
        "- Routes: every site of one group (rank 8; attention: 12 fused qkv of 3 slices and 12 out_proj; MLP: 12 "
        "Linear layers of 1 slice) on N random input rows each, forward and backward to U and the inputs with a "
        "fixed upstream gradient; the frozen base layers alone, and each route's time over them; median of the "
        "timed rounds after 1 warm-up, all runs of one N in rotated rounds. The count: `tcur.routes.route_costs`.",
        "- Training step: forward + DiceCE + backward + AdamW on a random image and a ball label. "
        "tCURLoRA on all three groups (attention 4L, mlp_up L, mlp_down L slices), init pinv, routes chosen by the "
        "count (and, as the code before routes, the dense FFT route for every group); LoRA by "
        "`peft.inject_adapter_in_model` on every qkv, out_proj, linear1, linear2 of the ViT (lora_alpha = r). "
        "Every row also trains decoder5..decoder2 (not the output head); ViT and encoder stay frozen. "
        "Time: all methods of a setting are built in one child and stepped in rounds (order rotated each round); "
        "median wall clock over the timed rounds; the fastest round is the least disturbed by other load; the "
        "median of rounds is the median over rounds of the two methods' ratio within a round (neighbours in time, so "
        "load that comes and goes over minutes cancels). "
        "CPU time: the child's user + system time over all its threads, which other load inflates far less "
        "(with more than one torch thread, spin-waiting threads still inflate it).",
        "- LoRA ranks: the rank whose adapter count is closest to tCURLoRA's U (r = 1, the smallest possible, still "
        "trains more adapter parameters than U; the totals are close because the decoder dominates), and the "
        "paper's r = 32 (left out by --quick).",
        "- Memory: a separate fresh child per method builds model, optimiser and batch, trims the heap "
        "(`malloc_trim(0)`: the decomposition's freed scratch would otherwise stay resident and hide the steps' own "
        "use), takes its RSS, "
        + ("resets the kernel's peak mark (`/proc/self/clear_refs` 5), "
           if peak_reset else "(the peak mark could NOT be reset here, so the peak may include model building), ")
        + "runs 2 steps and reads the peak (`ru_maxrss`). Step peak = peak - RSS after building: activations, "
        "gradients, AdamW state. Peak RSS in steps = the peak itself (torch, monai and the model included). "
        "Ratios < 1 favour tCURLoRA.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="compact UNETR at 64^3 only, no LoRA r=32 (about 3 min)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training rounds per setting (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed training rounds (default 3, 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every child (default: torch's)")
    parser.add_argument("--one", metavar="SPEC", help=argparse.SUPPRESS)  # child mode: one JSON spec
    args = parser.parse_args(argv)

    if args.one:
        spec = json.loads(args.one)
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        measure = {"routes": measure_routes, "time": measure_time, "memory": measure_memory}[spec["kind"]]
        print(json.dumps(measure(spec)))
        return 0

    steps = args.steps if args.steps is not None else (2 if args.quick else 3)
    if steps < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error(
            f"--steps and --threads must be >= 1 and --warmup >= 0, got --steps {steps} --threads {args.threads} "
            f"--warmup {args.warmup}."
        )
    specs = plan(args.quick, args.warmup, steps, args.threads)
    start, load_before = time.perf_counter(), os.getloadavg()
    results = []
    for index, spec in enumerate(specs, 1):
        shown = {key: value for key, value in spec.items() if key not in ("kind", "warmup", "repeats", "steps", "threads")}
        print(f"[{index}/{len(specs)}] {spec['kind']} {json.dumps(shown)}", file=sys.stderr, flush=True)
        results.append((spec, run_child(spec, timeout=1200)))
        if "error" in results[-1][1]:
            print(f"    failed: {results[-1][1]['error']}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    settings = setting_rows(results)
    peak_reset = all(r.get("peak_reset", True) for s, r in results if s["kind"] == "memory")
    report = header(args.quick, args.threads, peak_reset, load_before, os.getloadavg(), elapsed)
    report += ["", "### Routes of one group: time over the frozen base layers (ms), forward + backward", ""]
    report += route_table([(spec, result) for spec, result in results if spec["kind"] == "routes"])
    report += ["", "### Headline: one training step of tCURLoRA (routes by count) over the others (ratios < 1 favour tCURLoRA)", ""]
    report += headline_table(settings)
    report += ["", "### One training step, all rows"] + step_table(settings)
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0 if all("error" not in result for _, result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
