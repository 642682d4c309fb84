"""Training cases: where they are, how their labels map onto an adapter's labels, and their arrays on the model grid.

Three ways to name cases (:func:`find_cases`):

- pairs ``[(image, label), ...]`` given directly;
- a folder, in either layout (checked in this order):

  - nnU-Net / Medical Segmentation Decathlon: ``<folder>/imagesTr/<case>.<ext>`` or ``<case>_0000.<ext>`` (one
    channel) with ``<folder>/labelsTr/<case>.<ext>``;
  - flat: ``<folder>/<case>_image.<ext>`` with ``<folder>/<case>_label.<ext>``;

  ``<ext>`` is any of ``volumes.IMAGE_EXTENSIONS`` (and ``.seg.nrrd`` for label maps); an image without its label
  map, or the reverse, is an error naming it;
- a JSON file: a list ``[{"image": ..., "label": ..., "name": ..., "annotated_slices": ...}, ...]`` or an MSD
  ``dataset.json``-style object whose ``"training"`` key holds that list. Relative paths are relative to the JSON
  file's folder; ``name`` and ``annotated_slices`` are optional.

Sparse annotation. A case may be annotated on some voxels only; the others are left out of the loss. Two ways:

- voxels of value :data:`IGNORE_VALUE` (65535) in the label map are "not annotated";
- the case declares ``"annotated_slices": {"axis": "z", "indices": [12, 20]}`` (CLI: ``--annotated-slices
  z:12,20`` after its ``--case``): only those slices are annotated (anything drawn elsewhere is ignored too).
  ``axis`` is ``x``, ``y`` or ``z`` = the image file's voxel axes i, j, k (Slicer's IJK), indices are 0-based voxel
  indices along it.
  A label map that is empty is accepted for such a case: its annotated slices are then all background.

The model grid may have another spacing than the image; annotations go there by nearest-neighbour resampling, so a
single annotated slice of a finer image can fall between model-grid slices. A case left with no annotated voxel on
the model grid is refused with an error saying so.

Label mapping (:class:`LabelMapping`). Each structure of a case's label map (a value, and for a Slicer
segmentation also a segment name) is assigned to one adapter label, in this order:

1. an entry of the mapping whose key is the segment's name (exact, else case-insensitive) or its value (``"5"``);
   the entry's value names the adapter label by name (case-insensitive) or by value (``"target"``, ``5``);
2. without an entry: a named segment (a Slicer segmentation's name, not an automatic ``Segment_<value>``) goes to
   the adapter label of the same name; an unnamed one (a plain label volume) to the adapter label of the same value;
3. otherwise the structure is unmapped: an error that lists every unmapped structure (default), or, on request,
   background (``--unmapped background``) or not annotated (``--unmapped ignore``).

Value 0 is always background (``labels[0]``). A mapping key that matches no structure of any case is an error (a
typo would otherwise go unnoticed), and so is an entry keyed by value that sends a named segment to a label of
another name (the values of a segmentation are not its meaning: key such an entry by the segment's name). What each
structure became, and by which rule, is kept (:meth:`LabelMapping.describe`, :meth:`LabelMapping.to_json`): a
training prints it before it starts and keeps it in the adapter's card.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from . import volumes
from .cards import Label, ModelCard
from .settings import UNMAPPED_POLICIES

__all__ = [
    "AXES", "IGNORE_INDEX", "IGNORE_VALUE", "UNMAPPED_POLICIES", "AnnotatedSlices", "LabelMapping", "PreparedCase",
    "TrainingCase", "as_cases", "find_cases", "parse_annotated_slices", "parse_label_mapping", "prepare_case",
    "prepare_cases",
]

PathLike = Union[str, "os.PathLike[str]"]

IGNORE_VALUE = 65535
"""Label-map value of voxels that are not annotated (left out of the loss)."""
IGNORE_INDEX = -1
"""Channel index of not-annotated voxels in :attr:`PreparedCase.target`."""
AXES = ("x", "y", "z")

_AUTO_NAME = re.compile(r"Segment_(\d+)")
_NNUNET_CHANNEL = re.compile(r"_0000$")


@dataclass(frozen=True)
class AnnotatedSlices:
    """The slices of a sparsely annotated case.

    Args:
        axis: ``"x"``, ``"y"`` or ``"z"``: the image's voxel axis i, j or k.
        indices: 0-based voxel indices along ``axis`` (at least one, unique).
    """

    axis: str
    indices: tuple

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ValueError(f"annotated_slices axis must be one of {AXES}, got {self.axis!r}")
        indices = tuple(self.indices) if isinstance(self.indices, (list, tuple)) else None
        if not indices or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0
                                  for i in indices):
            raise ValueError(f"annotated_slices indices must be a non-empty list of integers >= 0, "
                             f"got {self.indices!r}")
        if len(set(indices)) != len(indices):
            raise ValueError(f"annotated_slices indices must be unique, got {list(indices)}")
        object.__setattr__(self, "indices", tuple(int(i) for i in indices))

    @classmethod
    def from_json(cls, data: Any) -> AnnotatedSlices:
        if not isinstance(data, Mapping) or set(data) != {"axis", "indices"}:
            raise ValueError(f"annotated_slices must be an object with exactly 'axis' and 'indices', got {data!r}")
        return cls(data["axis"], data["indices"])

    def to_json(self) -> dict:
        return {"axis": self.axis, "indices": list(self.indices)}


@dataclass(frozen=True)
class TrainingCase:
    """One training case: an image and its label map (plain label volume or Slicer segmentation).

    Args:
        image: image file.
        label: label-map file.
        name: for messages and records (default: the image file name without extension).
        annotated_slices: set for a sparsely annotated case (see the module docstring).
    """

    image: Path
    label: Path
    name: str = ""
    annotated_slices: AnnotatedSlices | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", Path(self.image))
        object.__setattr__(self, "label", Path(self.label))
        if not self.name:
            object.__setattr__(self, "name", _stem(self.image))


@dataclass(frozen=True)
class PreparedCase:
    """A case on the model grid, ready for training.

    Args:
        name: the case's name.
        image: float32 (D, H, W) = (z, y, x) of the model grid, intensity-normalised.
        target: int64 (D, H, W): the adapter's channel index of each voxel (``labels[i]`` -> i), or
            :data:`IGNORE_INDEX` where not annotated.
    """

    name: str
    image: np.ndarray
    target: np.ndarray


@dataclass
class LabelMapping:
    """Assigns a case's structures to the adapter's labels (rules in the module docstring).

    Args:
        labels: the adapter's labels, ``labels[0]`` the background.
        entries: ``{segment name or value: adapter label name or value}``; keys and values may be strings or ints.
        unmapped: what an unmapped structure becomes: ``"error"`` (default), ``"background"`` or ``"ignore"``.
        by_value: whether rule 2 sends an unnamed structure to the label of its value (default); off for labels
            whose values mean nothing in the cases (made from a mapping's names, see :mod:`labelset`).

    Raises:
        ValueError: an entry names no adapter label, or an unknown ``unmapped`` policy.
    """

    labels: Sequence[Label]
    entries: Mapping[Any, Any] = field(default_factory=dict)
    unmapped: str = "error"
    by_value: bool = True
    used_keys: set = field(default_factory=set, init=False)
    decisions: dict = field(default_factory=dict, init=False)
    """``{(value, segment name): (channel index or IGNORE_INDEX, rule)}`` over every case seen."""

    def __post_init__(self) -> None:
        if self.unmapped not in UNMAPPED_POLICIES:
            raise ValueError(f"--unmapped must be one of {', '.join(UNMAPPED_POLICIES)}, got {self.unmapped!r}")
        self.labels = list(self.labels)
        self._targets = {str(key).strip(): self._channel_of(target, key) for key, target in self.entries.items()}

    def _channel_of(self, target: Any, key: Any) -> int:
        text = str(target).strip()
        for index, label in enumerate(self.labels):
            if label.name.casefold() == text.casefold() or str(label.value) == text:
                return index
        raise ValueError(f"label mapping {str(key)!r} -> {target!r}: the adapter has no label {target!r} "
                         f"(its labels: {_listing(self.labels)}): add it to --labels, or leave --labels out to "
                         f"make the names in --label-map new labels")

    def channels(self, segments: Sequence[volumes.Segment], case_name: str) -> dict[int, int]:
        """``{label value in the case: channel index or IGNORE_INDEX}`` for the given structures of one case.

        Raises:
            ValueError: with ``unmapped="error"``, listing every structure that maps to no adapter label.
        """
        result, unmapped, renamed, decided = {}, [], [], {}
        for segment in segments:
            if segment.value == IGNORE_VALUE:
                continue
            channel, rule = self._explicit(segment)
            if channel is not None and rule == "--label-map by value" and _is_named(segment) \
                    and self.labels[channel].name.casefold() != segment.name.casefold() and channel != 0:
                renamed.append(segment)
            if channel is None:
                channel, rule = self._implicit(segment)
            if channel is None:
                unmapped.append(segment)
                channel = {"background": 0, "ignore": IGNORE_INDEX}.get(self.unmapped)
                rule = f"--unmapped {self.unmapped}"
            result[segment.value] = channel
            decided[(segment.value, segment.name)] = (channel, rule)
        if renamed:
            listed = ", ".join(f"{s.value} {s.name!r} -> {self.labels[result[s.value]].name!r}" for s in renamed)
            example = json.dumps({renamed[0].name: self.labels[result[renamed[0].value]].name})
            raise ValueError(
                f"case {case_name!r}: --label-map sends named segments by their value to labels of another name: "
                f"{listed}. The mapping of this case:\n{self._lines(decided)}\nA segmentation's values are not its "
                f"meaning: key such entries by the segment's name (e.g. --label-map '{example}') if that is meant")
        if unmapped and self.unmapped == "error":
            listed = ", ".join(f"{s.value} {s.name!r}" if _is_named(s) else str(s.value) for s in unmapped)
            key = unmapped[0].name if _is_named(unmapped[0]) else str(unmapped[0].value)
            example = json.dumps({key: self.labels[-1].name})
            rule = ("segment names are matched to label names, unnamed values to label values" if self.by_value else
                    "labels made from --label-map names get structures through --label-map only")
            raise ValueError(
                f"case {case_name!r}: label values map to no adapter label: {listed}. Adapter labels: "
                f"{_listing(self.labels)} ({rule}). Map them with --label-map (e.g. --label-map '{example}'; a name "
                f"that is no label yet becomes a new label when --labels is not given), or make them all "
                f"background (--unmapped background) or not annotated (--unmapped ignore)")
        self.decisions.update(decided)
        return result

    def _explicit(self, segment: volumes.Segment) -> tuple[int | None, str]:
        for key, rule in ((segment.name, "--label-map by name"), (str(segment.value), "--label-map by value")):
            if key in self._targets:
                self.used_keys.add(key)
                return self._targets[key], rule
        folded = {key.casefold(): key for key in self._targets}
        key = folded.get(segment.name.casefold())
        if key is not None:
            self.used_keys.add(key)
            return self._targets[key], "--label-map by name"
        return None, ""

    def _implicit(self, segment: volumes.Segment) -> tuple[int | None, str]:
        named = _is_named(segment)
        if not named and not self.by_value:
            return None, ""
        for index, label in enumerate(self.labels):
            if (label.name.casefold() == segment.name.casefold()) if named else (label.value == segment.value):
                return index, "same name" if named else "same value"
        return None, ""

    def _target_name(self, channel: int) -> str:
        if channel == IGNORE_INDEX:
            return "not annotated"
        return f"{self.labels[channel].value} {self.labels[channel].name}"

    def _lines(self, decided: Mapping[tuple, tuple]) -> str:
        rows = [(f"{value}" + (f" {name!r}" if _AUTO_NAME.fullmatch(name) is None else ""),
                 self._target_name(channel), rule) for (value, name), (channel, rule) in sorted(decided.items())]
        width = max(len(row[0]) for row in rows)
        target_width = max(len(row[1]) for row in rows)
        return "\n".join(f"  {source.ljust(width)} -> {target.ljust(target_width)}  ({rule})"
                         for source, target, rule in rows)

    def describe(self) -> str:
        """The mapping of every case seen, one line a structure: ``1 -> 1 left hippocampus  (same value)``."""
        if not self.decisions:
            return "label mapping: no structure seen"
        return "label mapping (case label value [segment name] -> adapter label):\n" + self._lines(self.decisions)

    def to_json(self) -> list[dict[str, Any]]:
        """The mapping for a card: ``[{"value", "segment", "label" (name, or None: not annotated), "rule"}]``."""
        return [{"value": value, "segment": name,
                 "label": None if channel == IGNORE_INDEX else self.labels[channel].name, "rule": rule}
                for (value, name), (channel, rule) in sorted(self.decisions.items())]

    def check_all_used(self) -> None:
        """Raises ValueError naming mapping keys that matched no structure of any case seen so far."""
        unused = sorted(set(self._targets) - self.used_keys)
        if unused:
            raise ValueError(f"label mapping keys {unused} match no label value or segment name of any case: "
                             f"check their spelling")


def _is_named(segment: volumes.Segment) -> bool:
    """A Slicer segment's own name, not the automatic ``Segment_<value>`` of a plain label volume."""
    return _AUTO_NAME.fullmatch(segment.name) is None


def _listing(labels: Sequence[Label]) -> str:
    return ", ".join(f"{label.value} {label.name!r}" for label in labels)


def parse_label_mapping(spec: Mapping[str, Any] | str | PathLike | None) -> dict[str, Any]:
    """A label mapping from a dict, a JSON object text, or the path of a JSON file; ``None`` gives ``{}``.

    Raises:
        ValueError: not a JSON object of strings/ints; FileNotFoundError: a ``.json`` path that does not exist.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        data: Any = dict(spec)
    else:
        text = str(spec)
        if text.strip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"label mapping {text!r} is not valid JSON: {error}") from None
        else:
            path = Path(text)
            if not path.is_file():
                raise FileNotFoundError(f"label mapping file {text!r} does not exist (or give a JSON object text)")
            data = _read_json(path, "label mapping")
    if not isinstance(data, dict) or not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                             for v in data.values()):
        raise ValueError(f"a label mapping must be a JSON object of names or values, like "
                         f"{{\"5\": \"target\"}}; got {data!r:.200}")
    return {str(key): value for key, value in data.items()}


def parse_annotated_slices(text: str) -> AnnotatedSlices:
    """``"z:3,10,17"`` -> AnnotatedSlices("z", (3, 10, 17)) (the CLI's ``--annotated-slices``)."""
    axis, _, indices = str(text).partition(":")
    try:
        values = [int(part) for part in indices.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--annotated-slices must look like 'z:3,10,17', got {text!r}") from None
    return AnnotatedSlices(axis.strip().lower(), tuple(values))


def as_cases(items: Sequence[Any]) -> list[TrainingCase]:
    """TrainingCases from TrainingCases, (image, label) pairs or {"image", "label", ...} dicts.

    Raises:
        ValueError: an item of another kind, or no item at all.
    """
    cases = []
    for item in items:
        if isinstance(item, TrainingCase):
            cases.append(item)
        elif isinstance(item, Mapping):
            cases.append(_case_from_json(item, Path(".")))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            cases.append(TrainingCase(Path(item[0]), Path(item[1])))
        else:
            raise ValueError(f"a case must be an (image, label) pair, a dict or a TrainingCase, got {item!r:.200}")
    if not cases:
        raise ValueError("no training cases given")
    names = [case.name for case in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        # Same names would make records and messages ambiguous; number them instead of refusing.
        cases = [TrainingCase(c.image, c.label, f"{c.name}#{i}" if c.name in duplicates else c.name,
                              c.annotated_slices) for i, c in enumerate(cases)]
    return cases


def find_cases(source: PathLike | Sequence[Any]) -> list[TrainingCase]:
    """Cases from a folder, a JSON file, or a list (see the module docstring for the conventions).

    Raises:
        FileNotFoundError: no such folder or file, or a case's partner file is missing.
        ValueError: a folder without cases, a malformed JSON file.
    """
    if not isinstance(source, (str, os.PathLike)):
        return as_cases(source)
    path = Path(source)
    if path.is_dir():
        return as_cases(_cases_in_folder(path))
    if not path.is_file():
        raise FileNotFoundError(f"no such case folder or JSON file: {str(path)!r}")
    data = _read_json(path, "case list")
    if isinstance(data, Mapping) and "training" in data:
        data = data["training"]
    if not isinstance(data, list):
        raise ValueError(f"case list {str(path)!r} must be a JSON list of {{\"image\", \"label\"}} objects or an "
                         f"object with a 'training' list")
    return as_cases([_case_from_json(item, path.parent) for item in data])


def prepare_case(case: TrainingCase, card: ModelCard, mapping: LabelMapping) -> PreparedCase:
    """Read a case and bring it onto the model grid of ``card``, labels as adapter channel indices.

    Raises:
        FileNotFoundError, ValueError: unreadable files, NaN voxels, a label map off the image grid or empty (from
            :mod:`volumes`), unmapped structures, annotated slices outside the image, nothing annotated left.
    """
    sparse = case.annotated_slices
    image, label_map = volumes.read_case(case.image, case.label, allow_empty=sparse is not None)
    values = label_map.array()
    present = set(np.unique(values).tolist())
    channels = mapping.channels([s for s in label_map.segments if s.value in present], case.name)
    lookup = np.full(IGNORE_VALUE + 1, IGNORE_VALUE, dtype=np.uint16)
    lookup[0] = 0
    for value, channel in channels.items():
        lookup[value] = IGNORE_VALUE if channel == IGNORE_INDEX else channel
    remapped = lookup[values]
    if sparse is not None:
        remapped = _keep_slices(remapped, sparse, case.name)
    prepared = volumes.prepare_for_model(image, card.spacing, card.orientation, card.intensity)
    on_model = prepared.mapping.labels_to_model(remapped).astype(np.int64)
    on_model[on_model == IGNORE_VALUE] = IGNORE_INDEX
    if not np.any(on_model != IGNORE_INDEX):
        raise ValueError(f"case {case.name!r} has no annotated voxel on the model grid (spacing {card.spacing} mm): "
                         f"annotate more slices, or neighbouring ones, so that some survive resampling")
    return PreparedCase(case.name, prepared.array, on_model)


def prepare_cases(cases: Sequence[TrainingCase], card: ModelCard, mapping: LabelMapping) -> list[PreparedCase]:
    """:func:`prepare_case` for every case, then the check that every mapping key was used."""
    prepared = [prepare_case(case, card, mapping) for case in cases]
    mapping.check_all_used()
    return prepared


def _keep_slices(remapped: np.ndarray, sparse: AnnotatedSlices, case_name: str) -> np.ndarray:
    array_axis = 2 - AXES.index(sparse.axis)  # arrays are (z, y, x)
    size = remapped.shape[array_axis]
    outside = [i for i in sparse.indices if i >= size]
    if outside:
        raise ValueError(f"case {case_name!r}: annotated slices {outside} lie outside the image, which has {size} "
                         f"slices along {sparse.axis}")
    keep = np.zeros(size, dtype=bool)
    keep[list(sparse.indices)] = True
    shape = [1, 1, 1]
    shape[array_axis] = size
    return np.where(keep.reshape(shape), remapped, np.uint16(IGNORE_VALUE))


def _case_from_json(item: Any, folder: Path) -> TrainingCase:
    if not isinstance(item, Mapping) or "image" not in item or "label" not in item:
        raise ValueError(f"a case entry must be an object with 'image' and 'label', got {item!r:.200}")
    unknown = sorted(set(item) - {"image", "label", "name", "annotated_slices"})
    if unknown:
        raise ValueError(f"case entry has unknown keys {unknown}; allowed: image, label, name, annotated_slices")
    sparse = item.get("annotated_slices")
    return TrainingCase(folder / str(item["image"]), folder / str(item["label"]), str(item.get("name") or ""),
                        AnnotatedSlices.from_json(sparse) if sparse is not None else None)


def _cases_in_folder(folder: Path) -> list[TrainingCase]:
    if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
        images = {_NNUNET_CHANNEL.sub("", _stem(p)): p for p in _volume_files(folder / "imagesTr")}
        labels = {_stem(p): p for p in _volume_files(folder / "labelsTr")}
        where = f"{str(folder / 'imagesTr')!r} and {str(folder / 'labelsTr')!r}"
    else:
        files = _volume_files(folder)
        images = {_stem(p)[: -len("_image")]: p for p in files if _stem(p).endswith("_image")}
        labels = {_stem(p)[: -len("_label")]: p for p in files if _stem(p).endswith("_label")}
        where = f"{str(folder)!r}"
    lonely = sorted(set(images) ^ set(labels))
    if lonely:
        raise FileNotFoundError(f"in {where}, cases {lonely} have an image without a label map or the reverse")
    if not images:
        raise ValueError(f"no cases in {where}: expected <case>_image.<ext> with <case>_label.<ext>, or imagesTr/ "
                         f"and labelsTr/ folders (nnU-Net/MSD)")
    return [TrainingCase(images[name], labels[name], name) for name in sorted(images)]


def _volume_files(folder: Path) -> list[Path]:
    extensions = volumes.LABEL_MAP_EXTENSIONS
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(extensions))


def _stem(path: Path) -> str:
    name = path.name
    for extension in sorted(volumes.LABEL_MAP_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return path.stem


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {error}") from None
