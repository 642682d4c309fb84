"""Build a cached cohort of (image, label map) cases for one task; see README.md here.

Usage, from the repository root::

    python -m Testing.cohorts.build --task {tissue,hippocampus,lpba} --out DIR
        [--n-train 12] [--n-val 3] [--n-test 3] [--seed 0] [--spacing 2] [--box-mm 192 224 192] [--cache DIR]

Writes ``DIR/<split>/<name>_image.nii.gz`` (int16, T1-like, about 0-1000, 0 outside the brain) and
``DIR/<split>/<name>_label.nii.gz`` (uint16, the task's labels), ``DIR/cohort.json`` (every case, its source
and label voxel counts; ``"training"`` = the train cases, so ``find_cases`` reads the file directly),
``DIR/{train,val,test}.json`` (plain case lists) and ``DIR/manifest.json`` (a hash of the arguments: a rerun with
the same arguments and all files present returns at once).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from . import augment, sources, splits, synthseg

__all__ = ["FORMAT", "build_cohort", "output_grid", "main"]

FORMAT = 1
"""Bumped whenever the same arguments would give other files (a cache written before is then rebuilt)."""


def output_grid(centre: Sequence[float], spacing: float, box_mm: Sequence[float]) -> sitk.Image:
    """An empty UInt8 image: the box `box_mm` (x, y, z) centred at LPS `centre`, voxel `spacing` mm, axes L, P, S."""
    size = [int(round(b / spacing)) for b in box_mm]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing((spacing,) * 3)
    grid.SetOrigin(tuple(float(c - (n - 1) / 2 * spacing) for c, n in zip(centre, size)))
    return grid


def build_cohort(task: str, out: Path, counts: dict, seed: int = 0, spacing: float = 2.0,
                 box_mm: Sequence[float] = (192.0, 224.0, 192.0), cache: Optional[Path] = None,
                 params: augment.AugmentParams = augment.AugmentParams(),
                 log: Callable[[str], None] = print) -> Path:
    """Build (or reuse) the cohort; returns the path of ``cohort.json``.

    Args:
        task: a key of ``sources.TASK_LABELS``.
        out: output folder (created).
        counts: cases per split, ``{"train": n, "val": n, "test": n}``.
        seed: base seed; case i of split s uses ``SeedSequence([seed, s, i])``.
        spacing: output voxel size in mm (isotropic).
        box_mm: output box size (x, y, z) in mm, centred on each source brain.
        cache: source cache folder (default ``sources.cache_dir()``).
        params: augmentation strengths.
        log: called with one line of text per case.

    Raises:
        ValueError: unknown task, negative counts, bad spacing or box.
    """
    if task not in sources.TASK_LABELS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(sources.TASK_LABELS)}")
    if not spacing > 0 or len(box_mm) != 3 or not all(b >= 4 * spacing for b in box_mm):
        raise ValueError(f"spacing must be > 0 and box_mm 3 sizes of at least 4 voxels, got {spacing!r}, {box_mm!r}")
    table = splits.SPLITS[task]
    splits.check_splits(table, task)
    cache = Path(cache) if cache is not None else sources.cache_dir()
    out = Path(out)
    arguments = {"format": FORMAT, "task": task, "counts": {k: int(counts[k]) for k in splits.SPLIT_NAMES},
                 "seed": int(seed), "spacing": float(spacing), "box_mm": [float(b) for b in box_mm],
                 "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(params).items()},
                 "splits": table, "packages": sources.PACKAGES}
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()
    if _reusable(out, digest):
        log(f"reusing {out} (arguments hash {digest[:12]})")
        return out / "cohort.json"
    started = time.perf_counter()
    loaded: dict = {}
    cases: dict = {name: [] for name in splits.SPLIT_NAMES}
    details = {}
    for split_index, split in enumerate(splits.SPLIT_NAMES):
        for index, source in enumerate(splits.assign_sources(table[split], counts[split])):
            if source not in loaded:
                loaded[source] = sources.load_anatomy(source, task, cache)
            name = f"{split}-{index:03d}-{source}"
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_index, index]))
            image, labels = make_case(loaded[source], rng, spacing, box_mm, params)
            folder = out / split
            folder.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(folder / f"{name}_image.nii.gz"), True)
            sitk.WriteImage(labels, str(folder / f"{name}_label.nii.gz"), True)
            counts_here = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(),
                                      minlength=len(sources.TASK_LABELS[task]) + 1)
            cases[split].append({"image": f"{split}/{name}_image.nii.gz", "label": f"{split}/{name}_label.nii.gz",
                                 "name": name})
            details[name] = {"source": source, "split": split, "label_voxels": [int(c) for c in counts_here]}
            log(f"{name}: label voxels {details[name]['label_voxels']}")
    cohort = {"task": task, "labels": [{"value": 0, "name": "background"}] + [
        {"value": v, "name": n} for v, n in sources.TASK_LABELS[task].items()],
        "spacing_mm": float(spacing), "box_mm": [float(b) for b in box_mm], "seed": int(seed),
        "split_sources": table, "train": cases["train"], "val": cases["val"], "test": cases["test"],
        "training": cases["train"], "cases": details}
    _write_json(out / "cohort.json", cohort)
    for split in splits.SPLIT_NAMES:
        _write_json(out / f"{split}.json", cases[split])
    files = sorted(entry[key] for split in splits.SPLIT_NAMES for entry in cases[split] for key in ("image", "label"))
    _write_json(out / "manifest.json", {"hash": digest, "arguments": arguments, "files": files,
                                        "seconds": round(time.perf_counter() - started, 1)})
    return out / "cohort.json"


def make_case(anatomy: sources.Anatomy, rng: np.random.Generator, spacing: float, box_mm: Sequence[float],
              params: augment.AugmentParams) -> tuple[sitk.Image, sitk.Image]:
    """One augmented case of `anatomy` on the output box: (int16 image, uint16 label map), same grid."""
    grid = output_grid(anatomy.centre, spacing, box_mm)
    transform = augment.random_spatial_transform(grid, rng, params, centre=anatomy.centre)
    labels = augment.warp(anatomy.labels, grid, transform, labels=True)
    mask = augment.warp(anatomy.mask, grid, transform, labels=True)
    if anatomy.image is not None:
        image = sitk.GetArrayFromImage(augment.warp(anatomy.image, grid, transform, labels=False))
    else:
        full = sitk.GetArrayFromImage(augment.warp(anatomy.synth_labels, grid, transform, labels=True))
        image = synthseg.synthesize(full, anatomy.label_class, rng, spacing=(spacing,) * 3, blur_mm=0.5 * spacing)
    # One voxel of margin keeps the blurred brain edge; the rest stays 0, as in the skull-stripped sources.
    head = sitk.GetArrayFromImage(sitk.BinaryDilate(mask, [1, 1, 1])) > 0
    array = augment.augment_intensity(image, head, rng, params)
    out = grid_image(np.clip(np.round(array * 1000.0), 0, 32767).astype(np.int16), grid)
    return out, grid_image(sitk.GetArrayFromImage(labels).astype(np.uint16), grid)


def grid_image(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """`array` (z, y, x) as an image on `grid`."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def _reusable(out: Path, digest: str) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (manifest.get("hash") == digest and (out / "cohort.json").is_file()
            and all((out / name).is_file() for name in manifest.get("files", [])))


def _write_json(path: Path, data) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    temporary.replace(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m Testing.cohorts.build", description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=sorted(sources.TASK_LABELS))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n-train", type=int, default=12)
    parser.add_argument("--n-val", type=int, default=3)
    parser.add_argument("--n-test", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--box-mm", type=float, nargs=3, default=(192.0, 224.0, 192.0))
    parser.add_argument("--cache", type=Path, default=None, help="source cache (default $TCURLORA_CACHE or "
                        "~/.cache/tcurlora/sources)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        path = build_cohort(args.task, args.out, {"train": args.n_train, "val": args.n_val, "test": args.n_test},
                            args.seed, args.spacing, args.box_mm, args.cache,
                            log=lambda line: print(line, file=sys.stderr))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{path} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
