"""Decisions of the Slicer panels that need neither qt nor torch, so that they are tested outside Slicer.

The Segment and Train modules call these to turn panel settings into CLI arguments, adapter cards into combo-box
entries and tooltips, progress events into a percentage, a status line and log lines, training events into the rows
of the loss and Dice chart, and exported training cases into the JSON case list that ``train --cases`` reads (with
the annotated slices of each case when the user annotated only some).

Only the standard library, numpy, :mod:`TCURLoRALib.cards` and :mod:`TCURLoRALib.progress` are imported at load
(SimpleITK when a label map is read), so the panels can import this module before PyTorch is installed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from .cards import Label
from .progress import format_duration

__all__ = [
    "BASE_ONLY", "DEVICES", "AdapterChoice", "CaseFiles", "ProgressTracker", "ProgressUpdate", "TrainingCurves",
    "adapter_choices", "adapter_labels", "annotated_slices", "default_label_mapping", "describe_adapter",
    "export_cases", "format_duration", "missing_modules", "python_for_jobs", "read_annotated_slices",
    "read_requirements", "requirements_file", "segment_arguments", "segment_colors", "train_arguments",
    "write_cases_json",
]

PathLike = Union[str, "os.PathLike[str]"]

DEVICES = ("auto", "cpu", "cuda")
"""Device choices of both panels, as the CLI spells them."""
BASE_ONLY = "none"
"""The CLI's ``--adapter`` value for the base model without an adapter."""
BASE_ONLY_TEXT = "Base model only"
IMPORT_NAMES = {"pynrrd": "nrrd"}
"""Requirements whose import name is not their distribution name."""
_MAX_TOOLTIP_DICE = 12


# ---------------------------------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class AdapterChoice:
    """One entry of an adapter combo box.

    Args:
        name: the store name, or None for the base model alone.
        text: what the combo box shows.
        tooltip: the card, described (see :func:`describe_adapter`).
    """

    name: str | None
    text: str
    tooltip: str


def _card_json(card: Any) -> Mapping[str, Any]:
    return card.to_json() if hasattr(card, "to_json") else card


def _format_number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def describe_adapter(card: Any, source: str = "user") -> str:
    """A plain-text tooltip for an adapter: labels, base, rank, training record and validation Dice.

    Args:
        card: an :class:`~TCURLoRALib.cards.AdapterCard` or its JSON dict.
        source: ``"shipped"`` or ``"user"`` (from the store entry).

    Returns:
        Several lines, e.g. ``"hippocampus (user adapter)\\nLabels: left, right\\nBase: tiny\\n..."``; fields the
        card lacks are left out.
    """
    data = _card_json(card)
    lines = [f"{data.get('name', '?')} ({source} adapter)"]
    labels = [label["name"] if isinstance(label, Mapping) else label.name for label in data.get("labels", [])[1:]]
    lines.append("Labels: " + (", ".join(labels) if labels else "none"))
    lines.append(f"Base: {data.get('base_name', '?')}")
    lines.append(f"Rank: {data.get('rank', '?')}, groups: {', '.join(data.get('groups') or []) or 'none'}")
    if data.get("parent"):
        lines.append(f"Improved from: {data['parent']}")
    training = data.get("training") or {}
    if training:
        seconds = training.get("seconds")
        took = f", {format_duration(seconds)}" if isinstance(seconds, (int, float)) else ""
        lines.append(f"Trained on {training.get('cases', '?')} cases, {training.get('steps', '?')} steps"
                     f" ({training.get('device', '?')}{took})")
    validation = (data.get("metrics") or {}).get("validation") or {}
    if validation.get("mean_dice") is not None:
        lines.append(f"Validation mean Dice: {_format_number(validation['mean_dice'])}"
                     f" on {validation.get('cases', '?')} cases")
        per_label = validation.get("dice") or {}
        shown = list(per_label.items())[:_MAX_TOOLTIP_DICE]
        if shown:
            lines.append("  " + ", ".join(f"{name} {_format_number(value)}" for name, value in shown))
    else:
        lines.append("Validation: none recorded")
    if data.get("created"):
        lines.append(f"Created: {data['created']}")
    return "\n".join(lines)


def adapter_choices(entries: Iterable[Any], base_tooltip: str = "") -> list[AdapterChoice]:
    """The entries of the adapter combo box: "Base model only" first, then every store entry.

    Args:
        entries: :class:`~TCURLoRALib.store.AdapterEntry` objects (``name``, ``card``, ``source``), as listed.
        base_tooltip: tooltip of the base-only entry.

    Returns:
        The choices in the given order after the base-only one; shipped adapters are marked in their text.
    """
    choices = [AdapterChoice(None, BASE_ONLY_TEXT, base_tooltip or "The frozen base model without an adapter")]
    for entry in entries:
        text = f"{entry.name} (shipped)" if entry.source == "shipped" else entry.name
        choices.append(AdapterChoice(entry.name, text, describe_adapter(entry.card, entry.source)))
    return choices


# ---------------------------------------------------------------------------------------------------- CLI arguments


def _check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return device


def segment_arguments(
    image: PathLike,
    output: PathLike,
    *,
    adapter: str | None = None,
    device: str = "auto",
    overlap: float = 0.25,
    base: PathLike | None = None,
) -> list[str]:
    """Arguments of ``python -m TCURLoRALib segment`` (``--progress`` is added by :class:`~TCURLoRALib.jobs.Job`).

    Args:
        image: the exported input volume.
        output: the label map to write.
        adapter: store name or file of the adapter; None or :data:`BASE_ONLY` for the base alone.
        device: one of :data:`DEVICES`.
        overlap: sliding-window overlap in [0, 1).
        base: base-model file; None for the shipped base.

    Raises:
        ValueError: an unknown device, or an overlap outside [0, 1).
    """
    _check_device(device)
    if not (isinstance(overlap, (int, float)) and 0.0 <= overlap < 1.0):
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    arguments = ["segment", str(image), "--output", str(output), "--adapter", adapter or BASE_ONLY,
                 "--device", device, "--overlap", repr(float(overlap))]
    if base:
        arguments += ["--base", str(base)]
    return arguments


def train_arguments(
    cases_json: PathLike,
    *,
    name: str,
    base: PathLike | None = None,
    parent: str | None = None,
    labels_json: PathLike | None = None,
    rank: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    device: str = "auto",
    seed: int | None = None,
) -> list[str]:
    """Arguments of ``python -m TCURLoRALib train``; options left None keep the engine's defaults.

    Args:
        cases_json: the case list written by :func:`write_cases_json`.
        name: the new adapter's name (saved in the user's adapter folder).
        base: base-model file; None for the shipped base.
        parent: store name or file of the adapter to improve.
        labels_json: the adapter's labels (a JSON file), None to keep the parent's or the base's.
        rank, steps, lr: tCURLoRA rank, optimiser steps, learning rate (each > 0).
        device: one of :data:`DEVICES` (``"cuda"`` is the CLI's spelling of GPU).
        seed: random seed.

    Raises:
        ValueError: an empty name, a setting <= 0, an unknown device; a rank given together with a parent (an
            improved adapter keeps its parent's rank).
    """
    if not str(name).strip():
        raise ValueError(f"give the new adapter a name, got {name!r}")
    _check_device(device)
    for option, value in (("rank", rank), ("steps", steps), ("learning rate", lr)):
        if value is not None and not value > 0:
            raise ValueError(f"{option} must be > 0, got {value!r}")
    if parent and rank is not None:
        raise ValueError(f"an improved adapter keeps the rank of its parent {parent!r}: do not give a rank "
                         f"(got {rank!r})")
    arguments = ["train", "--cases", str(cases_json), "--name", str(name).strip(), "--device", device]
    optional = (("--base", base), ("--parent", parent), ("--labels", labels_json), ("--rank", rank),
                ("--steps", steps), ("--lr", lr), ("--seed", seed))
    for option, value in optional:
        if value is not None and value != "":
            arguments += [option, repr(value) if isinstance(value, float) else str(value)]
    return arguments


# ---------------------------------------------------------------------------------------------------- progress


@dataclass
class ProgressUpdate:
    """What the panel shows after one event; a None field leaves that widget as it is.

    Args:
        percent: progress bar value 0-100.
        status: the status line.
        log: a line for the log.
        finished: the job ended (``state`` then says how: ``"done"``, ``"failed"`` or ``"cancelled"``).
        error: the error message of a failed job.
    """

    percent: int | None = None
    status: str | None = None
    log: str | None = None
    finished: bool = False
    state: str | None = None
    error: str | None = None


class ProgressTracker:
    """Turns the job's events (see :mod:`TCURLoRALib.progress` and :class:`~TCURLoRALib.jobs.Job`) into updates.

    It remembers the task and total of the latest ``start`` event, which the ``step`` events do not repeat.
    """

    def __init__(self) -> None:
        self.task = ""
        self.total: int | None = None

    def update(self, event: Mapping[str, Any]) -> ProgressUpdate:
        kind = event.get("event")
        if kind == "start":
            self.task = str(event.get("task") or "")
            self.total = event.get("total")
            return ProgressUpdate(percent=0, status=f"{self.task}: started", log=f"{self.task}: started "
                                  f"({self.total} steps)")
        if kind == "step":
            return self._step(event)
        if kind == "metric":
            value = event.get("value")
            at = f" at step {event['step']}" if event.get("step") is not None else ""
            return ProgressUpdate(log=f"{event.get('name')} = {_format_number(value)}{at}")
        if kind == "done":
            seconds = event.get("seconds")
            took = f" in {format_duration(seconds)}" if isinstance(seconds, (int, float)) else ""
            return ProgressUpdate(percent=100, status=f"{self.task or 'job'}: done{took}", log=f"done{took}")
        if kind == "error":
            return ProgressUpdate(log=f"error ({event.get('kind', 'internal')}): {event.get('message')}")
        if kind == "log":
            return ProgressUpdate(log=str(event.get("message", "")))
        if kind == "finished":
            return self._finished(event)
        return ProgressUpdate(log=json.dumps(dict(event)))

    def _step(self, event: Mapping[str, Any]) -> ProgressUpdate:
        step = int(event.get("step") or 0)
        total = event.get("total") or self.total
        percent = min(100, int(100 * step / total)) if total else None
        parts = [f"{self.task or 'job'}: step {step}" + (f"/{total}" if total else "")]
        if event.get("loss") is not None:
            parts.append(f"loss {event['loss']:.4f}")
        eta = format_duration(event.get("eta_s"))
        if eta:
            parts.append(f"about {eta} left")
        return ProgressUpdate(percent=percent, status=", ".join(parts))

    def _finished(self, event: Mapping[str, Any]) -> ProgressUpdate:
        state = str(event.get("state"))
        error = event.get("error")
        if state == "done":
            return ProgressUpdate(percent=100, finished=True, state=state)
        if state == "cancelled":
            return ProgressUpdate(status="Cancelled", log="cancelled", finished=True, state=state)
        message = str(error or f"exit code {event.get('returncode')}")
        return ProgressUpdate(status=f"Failed: {message}", log=f"failed: {message}", finished=True, state=state,
                              error=message)


@dataclass
class TrainingCurves:
    """The rows of the training chart: loss at every step, validation mean Dice when measured.

    Attributes:
        loss_steps, losses: one row per ``step`` event that carried a loss.
        dice_steps, dices: one row per ``metric`` event named ``validation_mean_dice``.
        eta_s: the latest estimate of the seconds left.
    """

    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    dice_steps: list[int] = field(default_factory=list)
    dices: list[float] = field(default_factory=list)
    eta_s: float | None = None

    DICE_METRIC = "validation_mean_dice"

    def add(self, event: Mapping[str, Any]) -> bool:
        """Records one event; returns whether a chart row was added (other events are ignored)."""
        kind = event.get("event")
        if kind == "step":
            if event.get("eta_s") is not None:
                self.eta_s = float(event["eta_s"])
            if event.get("loss") is None or event.get("step") is None:
                return False
            self.loss_steps.append(int(event["step"]))
            self.losses.append(float(event["loss"]))
            return True
        if kind == "metric" and event.get("name") == self.DICE_METRIC and event.get("value") is not None:
            # The initial validation of an improved adapter comes at step 0.
            self.dice_steps.append(int(event.get("step") or 0))
            self.dices.append(float(event["value"]))
            return True
        return False

    def loss_table(self) -> np.ndarray:
        """(n, 2) float array: step, loss."""
        return np.array([self.loss_steps, self.losses], dtype=float).T.reshape(-1, 2)

    def dice_table(self) -> np.ndarray:
        """(m, 2) float array: step, validation mean Dice."""
        return np.array([self.dice_steps, self.dices], dtype=float).T.reshape(-1, 2)


# ---------------------------------------------------------------------------------------------------- training cases


def default_label_mapping(segment_names: Sequence[str], label_names: Sequence[str]) -> dict[str, str]:
    """The initial segment -> adapter label table: each segment to the label of the same name.

    The name is matched case-insensitively and written as the label spells it; a segment without such a label
    keeps its own name (it becomes a new label of the adapter, see :func:`adapter_labels`).
    """
    by_folded = {name.casefold(): name for name in label_names}
    return {segment: by_folded.get(segment.casefold(), segment) for segment in segment_names}


def adapter_labels(
    mapping: Mapping[str, str],
    base_labels: Sequence[Label],
    segment_colors: Mapping[str, Sequence[float]] | None = None,
) -> tuple[list[Label], dict[str, Label]]:
    """The new adapter's labels and the segment -> label mapping that :func:`mrml.export_training_case` takes.

    Args:
        mapping: segment name -> adapter label name; an empty label name leaves the segment out (background).
            Several segments may share a label.
        base_labels: the labels of the base (or of the parent adapter), ``base_labels[0]`` the background.
        segment_colors: segment name -> RGB in 0-1 (Slicer's segment colours), used for labels the base lacks.

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
                color = (segment_colors or {}).get(segment, (0.5, 0.5, 0.5))
                chosen[folded] = Label(next_value, target, tuple(int(round(255 * c)) for c in color))
                next_value += 1
        by_segment[segment] = chosen[folded]
    if not by_segment:
        raise ValueError(f"no segment is mapped to an adapter label (mapping {dict(mapping)!r}): give at least one "
                         "segment a label name")
    return [background, *chosen.values()], by_segment


def annotated_slices(label_zyx: np.ndarray) -> list[int]:
    """Indices k of the slices that hold any non-zero voxel.

    Args:
        label_zyx: a label map as (k, j, i) = (z, y, x) array (SimpleITK's and Slicer's ``arrayFromVolume`` order).

    Raises:
        ValueError: not a 3-D array.
    """
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


def export_cases(
    pairs: Sequence[tuple[Any, Any]],
    mapping: Mapping[str, Label],
    folder: PathLike,
    annotated_slices_only: bool = False,
) -> Path:
    """Exports (volume node, segmentation node) pairs as training cases and writes ``cases.json`` next to them.

    Needs MRML (Slicer's or the ``slicer-core`` wheel's), imported here so the rest of this module does not.

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
    from .mrml import export_training_case

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


def segment_colors(segmentation_node: Any) -> dict[str, tuple[float, float, float]]:
    """Segment name -> RGB colour in 0-1 of a segmentation node, in the segmentation's order."""
    segmentation = segmentation_node.GetSegmentation()
    result = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        result[segment.GetName()] = tuple(float(c) for c in segment.GetColor())
    return result


# ---------------------------------------------------------------------------------------------------- installation


def requirements_file(module_dir: PathLike) -> Path:
    """The extension's ``requirements.txt`` as seen from a module folder.

    Installed, the Segment module's CMakeLists puts it in ``<qt-scripted-modules>/Resources/``; in a checkout it is
    the top-level ``Resources/requirements.txt``.

    Raises:
        FileNotFoundError: neither exists (the message names both places).
    """
    module_dir = Path(module_dir)
    candidates = [module_dir / "Resources" / "requirements.txt", module_dir.parent / "Resources" / "requirements.txt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"requirements.txt not found in {[str(c) for c in candidates]}")


def read_requirements(path: PathLike) -> list[str]:
    """The requirement lines of a requirements file, comments and blank lines dropped.

    Raises:
        ValueError: the file names torch (it must come from the PyTorch extension, never from pip here).
    """
    requirements = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split(";")[0]
        for separator in "<>=!~[ ":
            name = name.split(separator)[0]
        if name.lower() == "torch":
            raise ValueError(f"{str(path)!r} lists torch ({line!r}); install torch with the PyTorch extension")
        requirements.append(line)
    return requirements


def missing_modules(requirements: Sequence[str], find_spec: Any = None) -> list[str]:
    """The requirements whose import name cannot be found (``SimpleITK>=2.3`` -> ``SimpleITK``).

    A distribution name with ``-`` is looked up with ``_``; :data:`IMPORT_NAMES` lists the others that differ.
    """
    if find_spec is None:
        from importlib.util import find_spec
    missing = []
    for requirement in requirements:
        name = requirement
        for separator in "<>=!~[;@ ":
            name = name.split(separator)[0]
        if find_spec(IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))) is None:
            missing.append(requirement)
    return missing


def python_for_jobs(executable: str, which: Any = None) -> str:
    """The interpreter for background jobs: ``PythonSlicer`` on PATH, else next to ``executable``, else
    ``executable`` itself (in Slicer, ``sys.executable`` may be the Slicer application, which cannot run ``-m``).
    """
    if which is None:
        from shutil import which
    found = which("PythonSlicer")
    if found:
        return found
    folder = Path(executable).parent
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        if (folder / name).is_file():
            return str(folder / name)
    return executable
