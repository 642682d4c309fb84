"""``python -m TCURLoRALib demo``: segment the shipped sample with the base and every shipped adapter.

For each model (the base alone, then each shipped adapter) it writes the label map (.nii.gz), a Slicer segmentation
(.seg.nrrd) and axial/coronal/sagittal overlays (.png) into the output folder, and reports each structure's volume
in mL and, where the reference covers the model's labels (the base's tissue classes on the sample), Dice.
The base model is loaded once; adapters are switched on it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk

from . import metrics, volumes
from .adapter import AdaptedUNETR
from .basemodel import load_base
from .overlay import overlay_views, write_png
from .progress import Progress, silent
from .segment import segment
from .store import AdapterEntry

__all__ = ["DemoRun", "run_demo"]


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


def run_demo(
    base_path: str | os.PathLike,
    adapters: Sequence[AdapterEntry],
    image_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    reference_path: str | os.PathLike | None = None,
    device: str = "auto",
    progress: Progress = silent,
) -> list[DemoRun]:
    """Segment ``image_path`` with the base alone and with each adapter; write outputs into ``output_dir``.

    Args:
        base_path: the base-model file.
        adapters: adapters to run after the base (the shipped ones for the demo).
        image_path: the volume to segment.
        output_dir: created if missing; files are named after the model.
        reference_path: a label map on the image's grid labelled like the base; Dice is reported for runs whose
            labels are the base's.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    session = AdaptedUNETR(load_base(base_path, device=_device(device)))
    image = volumes.read_image(image_path)
    reference = volumes.read_label_map(reference_path) if reference_path else None
    runs = []
    for adapter in [None, *adapters]:
        session.set_adapter(adapter.path if adapter else None)
        model_name = adapter.name if adapter else f"base ({session.base.card.name})"
        stem = _file_name(adapter.name if adapter else "base")
        result = segment(image_path, session, output_dir / f"{stem}.nii.gz",
                         seg_nrrd_path=output_dir / f"{stem}.seg.nrrd", progress=progress)
        labels = volumes.read_label_map(result.output_path, allow_empty=True)
        colors = {label.value: label.color for label in session.labels if label.value != 0}
        pictures = [write_png(output_dir / f"{stem}_{view}.png", picture)
                    for view, picture in overlay_views(image, labels.image, colors).items()]
        run = DemoRun(model_name, result.output_path, result.seg_nrrd_path, pictures, result.volumes_ml,
                      seconds=result.seconds)
        if reference is not None and adapter is None:
            scores = metrics.label_metrics(labels.array(), reference.array(), reference.geometry.spacing,
                                           session.labels)
            run.dice = {score.name: score.dice for score in scores}
        runs.append(run)
    session.set_adapter(None)
    return runs


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


