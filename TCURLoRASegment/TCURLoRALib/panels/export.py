"""Training cases from the scene as files: label maps of the mapped segments, and the case list ``train`` reads.

numpy, SimpleITK and MRML are imported by the functions that need them, so that this module imports without them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from ..cards import Label
from .nodes import segment_colors

__all__ = ["CaseFiles", "adapter_labels", "annotated_slices", "export_cases", "read_annotated_slices",
           "write_cases_json", "write_labels_json"]

PathLike = Union[str, "os.PathLike[str]"]


def adapter_labels(
    mapping: Mapping[str, str],
    base_labels: Sequence[Label],
    colors: Mapping[str, Sequence[float]] | None = None,
) -> tuple[list[Label], dict[str, Label]]:
    """The new adapter's labels and the segment -> label mapping that :func:`mrml.export_training_case` takes.

    Args:
        mapping: segment name -> adapter label name; an empty label name leaves the segment out (background).
            Several segments may share a label.
        base_labels: the labels of the base (or of the parent adapter), ``base_labels[0]`` the background.
        colors: segment name -> RGB in 0-1 (Slicer's segment colours, see :func:`~.nodes.segment_colors`), used
            for labels the base lacks.

    Returns:
        ``(labels, by_segment)``: background first, then one label per distinct target in the order of ``mapping``;
        a target named like a base label (case-insensitively) keeps that label's value, name and colour; a new one
        gets the next free value (above every base value). Train with these labels: segments the user did not
        annotate are then not taught as background.

    Raises:
        ValueError: no segment is mapped, or a target is the background's name.
    """
    if not base_labels or base_labels[0].value != 0:
        raise ValueError(f"base labels must start with the background (value 0), got {list(base_labels)!r}")
    known = {label.name.casefold(): label for label in base_labels[1:]}
    background = base_labels[0]
    next_value = max(label.value for label in base_labels) + 1
    chosen: dict[str, Label] = {}
    by_segment: dict[str, Label] = {}
    for segment, target in mapping.items():
        target = str(target).strip()
        if not target:
            continue
        folded = target.casefold()
        if folded == background.name.casefold():
            raise ValueError(f"segment {segment!r} is mapped to the background {target!r}: leave its label empty "
                             "to leave it out instead")
        if folded not in chosen:
            if folded in known:
                chosen[folded] = known[folded]
            else:
                color = (colors or {}).get(segment, (0.5, 0.5, 0.5))
                chosen[folded] = Label(next_value, target, tuple(int(round(255 * c)) for c in color))
                next_value += 1
        by_segment[segment] = chosen[folded]
    if not by_segment:
        raise ValueError(f"no segment is mapped to an adapter label (mapping {dict(mapping)!r}): give at least one "
                         "segment a label name")
    return [background, *chosen.values()], by_segment


def annotated_slices(label_zyx: Any) -> list[int]:
    """Indices k of the slices that hold any non-zero voxel.

    Args:
        label_zyx: a label map as a (k, j, i) = (z, y, x) numpy array (SimpleITK's and Slicer's
            ``arrayFromVolume`` order).

    Raises:
        ValueError: not a 3-D array.
    """
    import numpy as np

    if label_zyx.ndim != 3:
        raise ValueError(f"a label map must be a 3-D (z, y, x) array, got shape {label_zyx.shape}")
    return np.flatnonzero(np.any(label_zyx != 0, axis=(1, 2))).tolist()


def read_annotated_slices(label_path: PathLike) -> list[int]:
    """:func:`annotated_slices` of a label-map file (k = the file's third voxel axis)."""
    import SimpleITK as sitk

    path = Path(label_path)
    if not path.is_file():
        raise FileNotFoundError(f"label map {str(path)!r} does not exist")
    # A copy, not GetArrayViewFromImage: the view would point into the image freed as soon as this line ends.
    return annotated_slices(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


@dataclass(frozen=True)
class CaseFiles:
    """One exported training case: image and label-map files, and its name."""

    image: Path
    label: Path
    name: str


def _relative(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` when it lies inside it (the usual job folder), else absolute."""
    path, folder = path.resolve(), folder.resolve()
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def write_cases_json(path: PathLike, cases: Sequence[CaseFiles], annotated_slices_only: bool = False
                     ) -> list[dict[str, Any]]:
    """Writes the case list that ``train --cases`` reads (format in :mod:`TCURLoRALib.cases`).

    Args:
        path: the JSON file to write; image and label paths inside its folder are written relative to it.
        cases: the exported cases.
        annotated_slices_only: give each case ``"annotated_slices": {"axis": "z", "indices": [...]}`` with the
            slices (k axis) that hold a segment voxel, so that the slices the user did not annotate are left out
            of the loss instead of being taught as background.

    Returns:
        The list written.

    Raises:
        ValueError: no case, two cases of one name, or (with ``annotated_slices_only``) a case with no annotated
            voxel.
    """
    if not cases:
        raise ValueError("no training cases: add at least one volume with its segmentation")
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"case names must be unique, these repeat: {duplicates}")
    path = Path(path)
    folder = path.parent
    entries = []
    for case in cases:
        entry: dict[str, Any] = {"image": _relative(Path(case.image), folder),
                                 "label": _relative(Path(case.label), folder), "name": case.name}
        if annotated_slices_only:
            indices = read_annotated_slices(case.label)
            if not indices:
                raise ValueError(f"case {case.name!r} has no annotated voxel in {str(case.label)!r}")
            entry["annotated_slices"] = {"axis": "z", "indices": indices}
        entries.append(entry)
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return entries


def write_labels_json(path: PathLike, labels: Sequence[Label]) -> Path:
    """Writes the adapter's labels as ``train --labels`` reads them (a JSON list of {value, name, color})."""
    path = Path(path)
    path.write_text(json.dumps([label.to_json() for label in labels], indent=2), encoding="utf-8")
    return path


def export_cases(
    pairs: Sequence[tuple[Any, Any]],
    mapping: Mapping[str, Label],
    folder: PathLike,
    annotated_slices_only: bool = False,
) -> Path:
    """Exports (volume node, segmentation node) pairs as training cases and writes ``cases.json`` next to them.

    Args:
        pairs: the cases, each a scalar volume node and its segmentation node.
        mapping: segment name -> adapter label (from :func:`adapter_labels`); other segments are background.
            A case need not hold every mapped segment, but at least one.
        folder: an existing folder (the job's work folder).
        annotated_slices_only: see :func:`write_cases_json`.

    Returns:
        The path of ``cases.json``.

    Raises:
        ValueError: no pair, a case without any mapped segment, or the checks of :func:`mrml.export_training_case`.
    """
    from ..mrml import export_training_case

    if not pairs:
        raise ValueError("no training cases: add at least one volume with its segmentation")
    folder = Path(folder)
    cases = []
    for index, (volume, segmentation) in enumerate(pairs, start=1):
        present = set(segment_colors(segmentation))
        case_mapping = {name: label for name, label in mapping.items() if name in present}
        if not case_mapping:
            raise ValueError(f"segmentation {segmentation.GetName()!r} has none of the mapped segments "
                             f"{sorted(mapping)}")
        name = f"case{index:02d}"
        image, label = export_training_case(volume, segmentation, case_mapping, folder, name)
        cases.append(CaseFiles(image, label, f"{name} {volume.GetName()}"))
    path = folder / "cases.json"
    write_cases_json(path, cases, annotated_slices_only)
    return path
