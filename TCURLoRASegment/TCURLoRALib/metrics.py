"""Segmentation quality: Dice and HD95 (mm) per label and case, with JSON, CSV and table writers.

Dice is :func:`dice`, the engine's one Dice (validation during training uses it too); HD95 comes from MONAI's
``compute_hausdorff_distance(percentile=95, spacing=...)``. HD95 is the larger of the two directed 95th percentiles
of the distances (mm, voxel spacing applied) from each surface voxel of one mask to the nearest surface voxel of the
other; it is not the maximum (Hausdorff) distance, so a few stray voxels do not dominate it.

Empty masks are decided here, before MONAI is asked, and every such case carries a ``note``:

- label absent from both prediction and reference: Dice 1.0 (nothing to find, nothing found: :func:`dice`'s rule),
  HD95 None;
- label absent from one of them only: Dice 0.0, HD95 None (no surface to measure a distance to).

Means leave out None values; ``hd95_count`` says how many values a mean HD95 is made of.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from . import volumes
from .cards import Label
from .outputs import atomic_write
from .progress import Progress, silent

__all__ = ["CaseMetrics", "LabelMetrics", "dice", "evaluate", "format_table", "label_metrics", "summarize", "write_csv",
           "write_json"]

PathLike = Union[str, "os.PathLike[str]"]
HD_PERCENTILE = 95
TASK = "evaluate"
MEAN_CASE = "mean"
CSV_COLUMNS = ("case", "label_value", "label_name", "dice", "hd95_mm", "prediction_voxels", "reference_voxels",
               "note")


@dataclass(frozen=True)
class LabelMetrics:
    """Agreement of one label between a prediction and its reference.

    Args:
        value: label value in both label maps.
        name: label name.
        dice: Dice coefficient in [0, 1].
        hd95_mm: symmetric 95th-percentile Hausdorff distance in mm, or None where a mask is empty.
        prediction_voxels, reference_voxels: voxels of the label in each.
        note: why a value is conventional (an empty mask), else "".
    """

    value: int
    name: str
    dice: float
    hd95_mm: Union[float, None]
    prediction_voxels: int
    reference_voxels: int
    note: str = ""

    def to_json(self) -> dict:
        return {"value": self.value, "name": self.name, "dice": self.dice, "hd95_mm": self.hd95_mm,
                "prediction_voxels": self.prediction_voxels, "reference_voxels": self.reference_voxels,
                "note": self.note}


@dataclass(frozen=True)
class CaseMetrics:
    """The metrics of one case, one entry per evaluated label.

    Args:
        case: case name (default: the prediction file's name without extension).
        prediction_path, reference_path: the two label maps compared.
        labels: one LabelMetrics per label, in the order of the evaluated labels.
    """

    case: str
    prediction_path: str
    reference_path: str
    labels: tuple

    @property
    def mean_dice(self) -> float:
        """Mean Dice over the labels."""
        return float(np.mean([item.dice for item in self.labels]))

    @property
    def mean_hd95_mm(self) -> Union[float, None]:
        """Mean HD95 over the labels that have one, or None."""
        return _mean([item.hd95_mm for item in self.labels])

    def to_json(self) -> dict:
        return {"case": self.case, "prediction": self.prediction_path, "reference": self.reference_path,
                "mean_dice": self.mean_dice, "mean_hd95_mm": self.mean_hd95_mm,
                "labels": [item.to_json() for item in self.labels]}


# ---------------------------------------------------------------------------------------------------- computing


def dice(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two masks of one shape: ``2 |P ∩ R| / (|P| + |R|)``, counted exactly.

    The rule for a label absent from both masks: Dice 1.0 (nothing to find and nothing found; MONAI's
    ``ignore_empty=False``). Absent from one of them only: 0.0. ``evaluate`` and the validation of a training both
    use this function, so the two agree on every case.

    Args:
        predicted, reference: boolean (or 0/1) arrays of one shape.
    """
    predicted, reference = np.asarray(predicted, dtype=bool), np.asarray(reference, dtype=bool)
    if predicted.shape != reference.shape:
        raise ValueError(f"masks of different shapes: {predicted.shape} and {reference.shape}")
    total = int(np.count_nonzero(predicted)) + int(np.count_nonzero(reference))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(predicted & reference)) / total


def label_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                  labels: Sequence[Label]) -> tuple:
    """Dice and HD95 of each label between two label maps on one grid.

    Args:
        prediction, reference: integer arrays (z, y, x) of one shape.
        spacing: voxel size in mm along x, y, z (ITK order, ``Geometry.spacing``; reversed here for the arrays).
        labels: labels to evaluate; a background label (value 0) is left out.

    Returns:
        tuple of LabelMetrics, one per non-background label, in the given order.

    Raises:
        ValueError: arrays of different shapes or not 3-D, bad spacing, or no non-background label.
    """
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if prediction.shape != reference.shape or prediction.ndim != 3:
        raise ValueError(f"prediction and reference must be 3-D arrays of one shape, got {prediction.shape} and "
                         f"{reference.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers (mm, x y z), got {spacing!r}")
    labels = _foreground(labels)
    array_spacing = spacing[::-1]  # arrays are (z, y, x)
    return tuple(_one_label(prediction == label.value, reference == label.value, array_spacing, label)
                 for label in labels)


def evaluate(prediction_paths: Sequence[PathLike], reference_paths: Sequence[PathLike],
             labels: Union[Sequence[Label], None] = None, *, case_names: Union[Sequence[str], None] = None,
             progress: Progress = silent) -> list:
    """Compare predicted label maps with reference label maps, case by case.

    Args:
        prediction_paths: label maps (any format ``volumes.read_label_map`` reads, .seg.nrrd included).
        reference_paths: the reference of each prediction, same order and count.
        labels: labels to evaluate (background left out); default: every label value present in any reference,
            named after the references' segments (the first name seen for a value).
        case_names: a name per case; default: the prediction file names without extension.
        progress: receives ``start`` (task "evaluate", total cases), one ``step`` per case, ``done``.

    Returns:
        list of CaseMetrics in input order (``summarize`` gives the means over cases).

    Raises:
        FileNotFoundError: a missing file.
        ValueError: different numbers of predictions, references or names; no case; no label to evaluate; a
            prediction and its reference on different grids (both files and both grids are named); unreadable
            label maps (see ``volumes.read_label_map``).
    """
    started = time.monotonic()
    predictions, references = [Path(p) for p in prediction_paths], [Path(p) for p in reference_paths]
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no case to evaluate: prediction_paths is empty")
    names = [_case_name(path) for path in predictions] if case_names is None else list(case_names)
    if len(names) != len(predictions):
        raise ValueError(f"got {len(names)} case names for {len(predictions)} cases")
    for path in predictions + references:
        if not path.is_file():
            raise FileNotFoundError(f"no such label map: {str(path)!r}")
    chosen = _foreground(labels) if labels is not None else _labels_in(references)
    progress("start", task=TASK, total=len(predictions))
    results = []
    for index, (name, prediction_path, reference_path) in enumerate(zip(names, predictions, references), 1):
        prediction, reference, geometry = _on_one_grid(prediction_path, reference_path)
        per_label = label_metrics(prediction, reference, geometry.spacing, chosen)
        case = CaseMetrics(name, str(prediction_path), str(reference_path), per_label)
        results.append(case)
        progress("step", step=index, total=len(predictions), message=f"{name}: mean Dice {case.mean_dice:.4f}")
    progress("done", seconds=round(time.monotonic() - started, 3))
    return results


def summarize(cases: Sequence[CaseMetrics]) -> list:
    """Mean over cases of each label's metrics.

    Returns:
        list of dicts ``{"value", "name", "dice", "hd95_mm", "hd95_count", "cases"}``, one per label in the order
        of the first case; ``hd95_mm`` is the mean of the defined values (None if there are none), ``hd95_count``
        their number.
    """
    if not cases:
        return []
    summary = []
    for position, first in enumerate(cases[0].labels):
        items = [case.labels[position] for case in cases]
        defined = [item.hd95_mm for item in items if item.hd95_mm is not None]
        summary.append({"value": first.value, "name": first.name,
                        "dice": float(np.mean([item.dice for item in items])), "hd95_mm": _mean(defined),
                        "hd95_count": len(defined), "cases": len(items)})
    return summary


# ---------------------------------------------------------------------------------------------------- writing


def write_json(path: PathLike, cases: Sequence[CaseMetrics]) -> Path:
    """Write ``{"cases": [...], "mean": summarize(cases)}`` as JSON (None as null), atomically."""
    text = json.dumps({"cases": [case.to_json() for case in cases], "mean": summarize(cases)}, indent=2,
                      allow_nan=False)
    return _write_text(Path(path), text + "\n")


def write_csv(path: PathLike, cases: Sequence[CaseMetrics]) -> Path:
    """Write one row per case and label (columns CSV_COLUMNS), then one ``mean`` row per label, atomically.

    An undefined HD95 is an empty cell.
    """
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for case in cases:
        for item in case.labels:
            writer.writerow([case.case, item.value, item.name, _number(item.dice), _number(item.hd95_mm),
                             item.prediction_voxels, item.reference_voxels, item.note])
    for mean in summarize(cases):
        writer.writerow([MEAN_CASE, mean["value"], mean["name"], _number(mean["dice"]), _number(mean["hd95_mm"]),
                         "", "", f"mean of {mean['cases']} cases, HD95 of {mean['hd95_count']}"])
    return _write_text(Path(path), stream.getvalue())


def format_table(cases: Sequence[CaseMetrics]) -> str:
    """A plain-text table: one row per case and label, then the means over cases; "-" for an undefined HD95."""
    header = ("case", "label", "Dice", "HD95 mm", "note")
    rows = [(case.case, item.name, f"{item.dice:.4f}", _fixed(item.hd95_mm), item.note)
            for case in cases for item in case.labels]
    rows += [(MEAN_CASE, mean["name"], f"{mean['dice']:.4f}", _fixed(mean["hd95_mm"]),
              f"{mean['cases']} cases" + (f", HD95 of {mean['hd95_count']}" if mean["hd95_count"] != mean["cases"]
                                          else ""))
             for mean in summarize(cases)]
    widths = [max(len(str(row[column])) for row in [header] + rows) for column in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- helpers


def _one_label(predicted: np.ndarray, expected: np.ndarray, array_spacing: tuple, label: Label) -> LabelMetrics:
    n_predicted, n_expected = int(np.count_nonzero(predicted)), int(np.count_nonzero(expected))
    score, hd95, note = dice(predicted, expected), None, ""
    if n_predicted == 0 and n_expected == 0:
        note = "absent from prediction and reference"
    elif n_predicted == 0 or n_expected == 0:
        note = "absent from prediction" if n_predicted == 0 else "absent from reference"
    else:
        y_pred = torch.from_numpy(predicted)[None, None].float()
        y = torch.from_numpy(expected)[None, None].float()
        with warnings.catch_warnings():
            # MONAI 1.5+ warns about its own internal use of a deprecated argument on every call.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
            hd95 = float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=HD_PERCENTILE,
                                                    spacing=list(array_spacing))[0, 0])
    return LabelMetrics(label.value, label.name, score, hd95, n_predicted, n_expected, note)


def _foreground(labels: Iterable) -> list:
    chosen = []
    for label in labels:
        if not isinstance(label, Label):
            raise ValueError(f"labels must be cards.Label objects, got {label!r}")
        if label.value != 0:
            chosen.append(label)
    values = [label.value for label in chosen]
    if len(set(values)) != len(values):
        raise ValueError(f"label values must be unique, got {values}")
    if not chosen:
        raise ValueError("no label to evaluate: only the background (value 0) was given")
    return chosen


def _labels_in(references: Sequence[Path]) -> list:
    """The references' segments (every value present, and a .seg.nrrd's empty segments too), by value."""
    names: dict = {}
    for path in references:
        for segment in volumes.read_label_map(path, allow_empty=True).segments:
            names.setdefault(segment.value, Label(segment.value, segment.name, segment.color))
    if not names:
        raise ValueError(f"no label to evaluate: the references {[str(p) for p in references]} hold no labelled "
                         f"voxel; give the labels")
    return [names[value] for value in sorted(names)]


def _on_one_grid(prediction_path: Path, reference_path: Path) -> tuple:
    """Both label maps as arrays (z, y, x) on one grid.

    Slicer saves a segmentation cropped to its segments' extent: a .seg.nrrd that lies on the other's voxel lattice
    is padded onto its grid (``volumes.align_label_map``). Any other difference of grids is refused.
    """
    prediction = volumes.read_label_map(prediction_path, allow_empty=True)
    reference = volumes.read_label_map(reference_path, allow_empty=True)
    if prediction.geometry.matches(reference.geometry):
        return prediction.array(), reference.array(), prediction.geometry
    for moving, fixed, moving_path in ((reference, prediction, reference_path),
                                       (prediction, reference, prediction_path)):
        if moving_path.name.lower().endswith(volumes.SEGMENTATION_EXTENSION):
            try:
                aligned = volumes.align_label_map(moving, fixed.image, allow_cropped=True)
            except ValueError:
                continue
            arrays = (prediction.array(), aligned.array()) if moving is reference else (aligned.array(),
                                                                                        reference.array())
            return arrays[0], arrays[1], fixed.geometry
    raise ValueError(f"prediction {str(prediction_path)!r} and reference {str(reference_path)!r} are not on the same "
                     f"grid: the prediction has {prediction.geometry.describe()}; the reference has "
                     f"{reference.geometry.describe()}")


def _case_name(path: Path) -> str:
    name = path.name
    for extension in sorted(volumes.LABEL_MAP_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(extension):
            return name[: len(name) - len(extension)]
    return name


def _mean(values: Iterable) -> Union[float, None]:
    defined = [float(v) for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _number(value: Union[float, None]) -> str:
    return "" if value is None else repr(float(value))


def _fixed(value: Union[float, None]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _write_text(path: Path, text: str) -> Path:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)

    atomic_write(path, write, what="metrics")
    return path
