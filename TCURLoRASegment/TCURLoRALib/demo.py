"""``python -m TCURLoRALib demo``: segment the shipped sample with the base and every shipped adapter.

For each model (the base alone, then each shipped adapter) it writes the label map (.nii.gz), a Slicer segmentation
(.seg.nrrd) and axial/coronal/sagittal overlays (.png) into the output folder, and reports each structure's volume
in mL and, where the reference covers the model's labels (the base's tissue classes on the sample), Dice.
The base model is loaded once; adapters are switched on it.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from . import metrics, volumes
from .adapter import AdaptedUNETR
from .basemodel import load_base
from .cards import Label
from .outputs import OutputFiles
from .overlay import VIEWS, overlay_views, write_png
from .progress import Progress, silent
from .segmentation import VolumePrediction, segment_volume
from .store import AdapterEntry

__all__ = ["DemoRun", "format_report", "run_models"]


@dataclass
class DemoRun:
    """What the demo did with one model: its outputs, volumes (mL) and Dice against the reference (if any)."""

    model: str
    label_map: Path
    seg_nrrd: Path
    pictures: list[Path]
    volumes_ml: dict[str, float]
    dice: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


def run_models(
    base_path: str | os.PathLike,
    adapters: Sequence[AdapterEntry],
    image_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    reference_path: str | os.PathLike | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: Progress = silent,
) -> list[DemoRun]:
    """Segment ``image_path`` with the base alone and with each adapter; write outputs into ``output_dir``.

    All files are checked before the first model runs and published together at the end (see
    :class:`TCURLoRALib.outputs.OutputFiles`): a failed or cancelled demo leaves none of them.

    Args:
        base_path: the base-model file.
        adapters: adapters to run after the base (the shipped ones for the demo).
        image_path: the volume to segment.
        output_dir: created if missing; files are named after the model.
        reference_path: a label map on the image's grid labelled like the base; Dice is reported for runs whose
            labels are the base's.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        overwrite: replace files of an earlier demo in ``output_dir`` (default: refuse them before any work).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    image = volumes.read_image(image_path)
    reference = volumes.read_label_map(reference_path) if reference_path else None
    voxels = int(np.prod(image.GetSize()))
    outputs = OutputFiles(overwrite=overwrite,
                          inputs=[base_path, image_path, reference_path, *(adapter.path for adapter in adapters)])
    planned = []
    for adapter in [None, *adapters]:
        stem = _file_name(adapter.name if adapter else "base")
        files = {"label_map": outputs.add(output_dir / f"{stem}.nii.gz", "label map", 2 * voxels),
                 "seg_nrrd": outputs.add(output_dir / f"{stem}.seg.nrrd", "Slicer segmentation", 2 * voxels)}
        for view in VIEWS:
            files[view] = outputs.add(output_dir / f"{stem}_{view}.png", f"{view} overlay")
        planned.append((adapter, files))

    session = AdaptedUNETR(load_base(base_path, device=_device(device)))
    array, geometry = sitk.GetArrayFromImage(image), volumes.Geometry.from_image(image)
    runs, writers = [], {}
    for adapter, files in planned:
        started = time.monotonic()
        session.set_adapter(adapter.path if adapter else None)
        prediction = segment_volume(array, geometry, session, progress=progress)
        labels = list(session.labels)
        writers.update(_writers(files, prediction, labels, image))
        run = DemoRun(adapter.name if adapter else f"base ({session.base.card.name})", files["label_map"],
                      files["seg_nrrd"], [files[view] for view in VIEWS], prediction.volumes_ml(),
                      seconds=time.monotonic() - started)
        if reference is not None and adapter is None:
            scores = metrics.label_metrics(prediction.labels, reference.array(), reference.geometry.spacing, labels)
            run.dice = {score.name: score.dice for score in scores}
        runs.append(run)
    session.set_adapter(None)
    outputs.publish(writers)
    return runs


def _writers(files: dict, prediction: VolumePrediction, labels: Sequence[Label], image: sitk.Image) -> dict:
    """The writers of one model's files: label map, Slicer segmentation, one PNG overlay a view."""
    geometry = prediction.geometry
    segments = [volumes.Segment(label.value, label.name, label.color) for label in labels if label.value != 0]
    colors = {label.value: label.color for label in labels if label.value != 0}
    pictures = overlay_views(image, geometry.image_from_array(prediction.labels), colors)
    writers = {
        files["label_map"]: lambda temporary: volumes.write_label_map(temporary, prediction.labels, geometry),
        files["seg_nrrd"]: lambda temporary: volumes.write_segmentation(temporary, prediction.labels, geometry,
                                                                        segments),
    }
    for view in VIEWS:
        writers[files[view]] = lambda temporary, picture=pictures[view]: write_png(temporary, picture)
    return writers


def _device(device: str) -> str:
    from .devices import resolve_device

    return str(resolve_device(device))


def format_report(runs: Sequence[DemoRun]) -> str:
    """A plain-text report: per model, each structure's volume in mL and, where measured, its Dice."""
    lines = []
    for run in runs:
        lines.append(f"{run.model}  ({run.seconds:.1f} s)  -> {run.label_map.name}, {run.seg_nrrd.name}, "
                     f"{', '.join(p.name for p in run.pictures)}")
        for name, millilitres in run.volumes_ml.items():
            dice = f"  Dice {run.dice[name]:.3f}" if run.dice.get(name) is not None else ""
            lines.append(f"    {name:<28} {millilitres:9.2f} mL{dice}")
    return "\n".join(lines)


