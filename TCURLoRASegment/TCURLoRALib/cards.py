"""Model and adapter cards: the JSON that a base model file and an adapter file carry in their metadata.

Each card is a dataclass that validates itself on construction (errors quote the bad value) and round-trips through
``to_json()`` (a JSON-compatible dict) and ``from_json()`` (a dict or a JSON string).

Policy for ``from_json``: a missing required field is an error naming the fields, and an **unknown key is an error**
too (naming the keys), never silently dropped. Cards evolve through ``AdapterCard.format_version`` / the file's
``format_version``, not through extra keys; free-form information belongs in the ``provenance``, ``metrics`` or
``training`` dicts, which accept any JSON object (strict JSON: NaN and infinity are refused, write ``null``).

Labels: ``labels[i]`` describes output channel ``i`` of the network; ``labels[0]`` must be the background, value 0.
``Label.value`` is the voxel value written into label maps, so values need not be consecutive.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from .tcur.names import GROUP_NAMES, INITS

ADAPTER_CARD_VERSION = 1
"""Adapter card schema version written here; cards with a higher version are refused."""

TRAINING_KEYS = ("cases", "steps", "seconds", "device", "seed")
UNETR_REQUIRED = ("in_channels", "out_channels", "img_size", "feature_size", "hidden_size", "mlp_dim", "num_heads")
UNETR_OPTIONAL = ("proj_type", "norm_name", "conv_block", "res_block", "dropout_rate", "spatial_dims", "qkv_bias",
                  "save_attn")
VIT_PATCH = 16
"""MONAI's UNETR cuts its input into fixed 16^3 patches, so every img_size extent must be a multiple of 16."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_AXES = ({"R", "L"}, {"A", "P"}, {"S", "I"})


class CardError(ValueError):
    """A card field is missing, unknown or invalid."""


class AdapterMismatchError(CardError):
    """An adapter was trained on a different base model than the one it is applied to."""


@dataclass(frozen=True)
class Label:
    """One segment: ``value`` is its voxel value in label maps (0 = background), ``color`` is RGB in 0-255."""

    value: int
    name: str
    color: tuple[int, int, int]

    def __post_init__(self) -> None:
        if not _is_int(self.value) or self.value < 0:
            raise CardError(f"label value must be an integer >= 0, got {self.value!r}")
        _check_text(self.name, "label name")
        color = self.color
        if (not isinstance(color, (tuple, list)) or len(color) != 3
                or not all(_is_int(c) and 0 <= c <= 255 for c in color)):
            raise CardError(f"label {self.name!r}: color must be 3 integers in 0-255, got {color!r}")
        object.__setattr__(self, "color", tuple(int(c) for c in color))

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "name": self.name, "color": list(self.color)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> Label:
        return cls(**_fields_from_json(cls, data, "label"))


@dataclass
class ModelCard:
    """Card of a frozen base model (a MONAI UNETR).

    Attributes:
        name: model name shown to users.
        unetr: ``monai.networks.nets.UNETR`` keyword arguments. Required: in_channels, out_channels, img_size
            (3 ints, D x H x W voxels, each a multiple of 16), feature_size, hidden_size, mlp_dim, num_heads.
            Optional: proj_type, norm_name, conv_block, res_block, dropout_rate, spatial_dims (must be 3), qkv_bias,
            save_attn. out_channels must equal len(labels).
        spacing: voxel spacing the model expects, 3 positive floats in mm, in the axis order of img_size.
        orientation: axis orientation code such as ``"RAS"`` (one letter of each of R/L, A/P, S/I).
        patch_size: sliding-window patch, 3 ints; must equal ``unetr["img_size"]`` because UNETR's position
            embeddings fix its input size.
        intensity: intensity normalisation settings (non-empty; interpreted by the volume code).
        labels: one per output channel, ``labels[0]`` background with value 0.
        fingerprint: sha256 of the weights (``tensorfiles.fingerprint``), 64 lowercase hex digits.
        provenance: where the weights and training data came from (free-form JSON object).
        metrics: measured quality (free-form JSON object).
    """

    name: str
    unetr: dict[str, Any]
    spacing: tuple[float, float, float]
    orientation: str
    patch_size: tuple[int, int, int]
    intensity: dict[str, Any]
    labels: list[Label]
    fingerprint: str
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_text(self.name, "model name")
        self.labels = _check_labels(self.labels)
        self.unetr = _check_unetr(self.unetr, len(self.labels))
        self.spacing = _check_spacing(self.spacing)
        self.orientation = _check_orientation(self.orientation)
        self.patch_size = _check_int_triple(self.patch_size, "patch_size")
        if list(self.patch_size) != self.unetr["img_size"]:
            raise CardError(f"patch_size {list(self.patch_size)} must equal unetr img_size {self.unetr['img_size']}: "
                            "UNETR's position embeddings fix its input size")
        self.intensity = _check_json_object(self.intensity, "intensity")
        if not self.intensity:
            raise CardError("intensity must describe the intensity normalisation, got an empty dict")
        self.fingerprint = _check_hex64(self.fingerprint, "fingerprint")
        self.provenance = _check_json_object(self.provenance, "provenance")
        self.metrics = _check_json_object(self.metrics, "metrics")

    def unetr_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``UNETR(**kwargs)`` (a copy; img_size as a tuple)."""
        kwargs = json.loads(json.dumps(self.unetr))
        kwargs["img_size"] = tuple(kwargs["img_size"])
        return kwargs

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> ModelCard:
        return cls(**_fields_from_json(cls, data, "model card"))


@dataclass
class AdapterCard:
    """Card of one tCURLoRA adapter.

    Attributes:
        name: adapter name (the adapter store also requires it to be a safe file name).
        base_fingerprint: ``ModelCard.fingerprint`` of the base it was trained on.
        base_name: ``ModelCard.name`` of that base (for messages; the fingerprint decides).
        rank: tensor CUR rank r >= 1.
        groups: adapted weight groups (unique non-empty names); empty for a decoder/head-only adapter.
        init: U initialisation, one of :data:`INITS`.
        labels: the adapter's output labels, same rules as ``ModelCard.labels`` (may differ from the base's when
            the head was retrained).
        training: training record; must hold cases (int >= 0, number of training cases), steps (int >= 0), seconds
            (float >= 0), device (str), seed (int); further JSON keys (learning rate, ...) are kept.
        metrics: validation metrics (free-form JSON object).
        parent: name of the adapter this one was fine-tuned from, or None.
        anatomy: what the labels are, by label name (``{}``: nothing declared, the default; written to the JSON only
            when non-empty): ``"one_piece"``, the labels that are one connected piece (``segment`` keeps only their
            largest component, :mod:`TCURLoRALib.postprocess`), and ``"left_right_pairs"``, ``[left, right]`` name
            pairs that a left/right mirror exchanges (``train --mirror``, ``segment --tta``; when absent, pairs are
            found from the names, :func:`TCURLoRALib.mirror.pairs_from_names`). Example:
            ``{"one_piece": ["left hippocampus", "right hippocampus"],
            "left_right_pairs": [["left hippocampus", "right hippocampus"]]}``.
        created: creation time, ISO 8601 with a UTC offset (default: now, UTC).
        format_version: card schema version (default :data:`ADAPTER_CARD_VERSION`; higher ones are refused).
    """

    name: str
    base_fingerprint: str
    base_name: str
    rank: int
    groups: list[str]
    init: str
    labels: list[Label]
    training: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format_version: int = ADAPTER_CARD_VERSION
    anatomy: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _is_int(self.format_version) or self.format_version < 1:
            raise CardError(f"adapter card format_version must be an integer >= 1, got {self.format_version!r}")
        if self.format_version > ADAPTER_CARD_VERSION:
            raise CardError(f"adapter card format_version {self.format_version} is newer than the "
                            f"{ADAPTER_CARD_VERSION} this version of TCURLoRA reads: update the extension")
        _check_text(self.name, "adapter name")
        self.base_fingerprint = _check_hex64(self.base_fingerprint, "base_fingerprint")
        _check_text(self.base_name, "base_name")
        if not _is_int(self.rank) or self.rank < 1:
            raise CardError(f"rank must be an integer >= 1, got {self.rank!r}")
        self.groups = _check_groups(self.groups)
        if self.init not in INITS:
            raise CardError(f"init must be one of {INITS}, got {self.init!r}")
        self.labels = _check_labels(self.labels)
        self.training = _check_training(self.training)
        self.metrics = _check_json_object(self.metrics, "metrics")
        if self.parent is not None:
            _check_text(self.parent, "parent adapter name")
        _check_created(self.created)
        self.anatomy = _check_anatomy(self.anatomy, self.labels)

    def one_piece_channels(self) -> list[int]:
        """Output channels (indices into ``labels``) of the labels declared one connected piece."""
        names = set(self.anatomy.get("one_piece", ()))
        return [index for index, label in enumerate(self.labels) if label.name in names]

    def declared_pairs(self) -> list[tuple[int, int]] | None:
        """The declared left/right pairs as (left, right) channel indices; None when the card declares none (then
        the names decide, :func:`TCURLoRALib.mirror.pairs_from_names`)."""
        if "left_right_pairs" not in self.anatomy:
            return None
        channel = {label.name: index for index, label in enumerate(self.labels)}
        return [(channel[left], channel[right]) for left, right in self.anatomy["left_right_pairs"]]

    def to_json(self) -> dict[str, Any]:
        data = _to_json(self)
        if not data["anatomy"]:  # so that a card declaring nothing reads as before anatomy existed
            del data["anatomy"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> AdapterCard:
        return cls(**_fields_from_json(cls, data, "adapter card", also_required=("format_version",)))


def check_adapter_matches_base(adapter_card: AdapterCard, model_card: ModelCard) -> None:
    """Refuses an adapter trained on another base model.

    Raises:
        AdapterMismatchError: the fingerprints differ; the message names both models and both fingerprints.
    """
    if adapter_card.base_fingerprint != model_card.fingerprint:
        raise AdapterMismatchError(
            f"adapter {adapter_card.name!r} was trained on base model {adapter_card.base_name!r} "
            f"(fingerprint {adapter_card.base_fingerprint}), but the loaded base model is {model_card.name!r} "
            f"(fingerprint {model_card.fingerprint}): choose an adapter trained on this base model")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(ord(c) < 32 for c in value) or len(value) > 200:
        raise CardError(f"{what} must be a non-empty single-line string of at most 200 characters, got {value!r}")
    return value


def _check_hex64(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise CardError(f"{what} must be 64 lowercase hex digits (a sha256), got {value!r}")
    return value


def _check_json_object(value: Any, what: str) -> dict[str, Any]:
    """Returns a deep copy, so a card never shares mutable state with its caller."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise CardError(f"{what} must be a dict with string keys, got {value!r:.200}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise CardError(f"{what} must be strict JSON (NaN and infinity not allowed, use null): {error}; "
                        f"got {value!r:.200}") from error


def _check_int_triple(value: Any, what: str) -> tuple[int, int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 3
            or not all(_is_int(v) and v > 0 for v in value)):
        raise CardError(f"{what} must be 3 positive integers, got {value!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _check_spacing(value: Any) -> tuple[float, float, float]:
    if (not isinstance(value, (tuple, list)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                       for v in value)):
        raise CardError(f"spacing must be 3 positive finite numbers (mm), got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _check_orientation(value: Any) -> str:
    if (not isinstance(value, str) or len(value) != 3
            or sorted(_axis_of(c) for c in value) != [0, 1, 2]):
        raise CardError(f"orientation must be 3 letters, one of each of R/L, A/P, S/I (like 'RAS'), got {value!r}")
    return value


def _axis_of(letter: str) -> int:
    for axis, letters in enumerate(_AXES):
        if letter in letters:
            return axis
    return -1


def _check_labels(labels: Any) -> list[Label]:
    if not isinstance(labels, (list, tuple)) or len(labels) < 2:
        raise CardError(f"labels must be a list of at least 2 Labels (background and one structure), got {labels!r}")
    for label in labels:
        if not isinstance(label, Label):
            raise CardError(f"labels must hold Label objects, got {label!r}")
    if labels[0].value != 0:
        raise CardError(f"labels[0] must be the background with value 0, got {labels[0]!r}")
    for attribute, key in (("value", lambda v: v), ("name", str.casefold)):
        seen: dict[Any, Any] = {}
        for label in labels:
            item = key(getattr(label, attribute))
            if item in seen:
                raise CardError(f"label {attribute}s must be unique: {getattr(label, attribute)!r} appears twice "
                                f"({seen[item]!r} and {label!r})")
            seen[item] = label
    return list(labels)


def _check_unetr(unetr: Any, n_labels: int) -> dict[str, Any]:
    kwargs = _check_json_object(unetr, "unetr")
    missing = [k for k in UNETR_REQUIRED if k not in kwargs]
    if missing:
        raise CardError(f"unetr is missing {missing}; got keys {sorted(kwargs)}")
    unknown = sorted(set(kwargs) - set(UNETR_REQUIRED) - set(UNETR_OPTIONAL))
    if unknown:
        raise CardError(f"unetr has unknown keys {unknown}; allowed: {list(UNETR_REQUIRED + UNETR_OPTIONAL)}")
    for key in ("in_channels", "out_channels", "feature_size", "hidden_size", "mlp_dim", "num_heads"):
        if not _is_int(kwargs[key]) or kwargs[key] < 1:
            raise CardError(f"unetr {key} must be an integer >= 1, got {kwargs[key]!r}")
    img_size = list(_check_int_triple(kwargs["img_size"], "unetr img_size"))
    if any(v % VIT_PATCH for v in img_size):
        raise CardError(f"unetr img_size {img_size} must be multiples of {VIT_PATCH} (UNETR's ViT patch size)")
    kwargs["img_size"] = img_size
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise CardError(f"unetr hidden_size {kwargs['hidden_size']} must be divisible by num_heads "
                        f"{kwargs['num_heads']}")
    if kwargs.get("spatial_dims", 3) != 3:
        raise CardError(f"unetr spatial_dims must be 3, got {kwargs['spatial_dims']!r}")
    if kwargs["out_channels"] != n_labels:
        raise CardError(f"unetr out_channels {kwargs['out_channels']} must equal the number of labels {n_labels}")
    return kwargs


def _check_groups(groups: Any) -> list[str]:
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, str) and g.strip() for g in groups):
        raise CardError(f"groups must be a list of non-empty strings, got {groups!r}")
    unknown = [g for g in groups if g not in GROUP_NAMES]
    if unknown:
        raise CardError(f"unknown weight group(s) {unknown} in groups; expected names from {GROUP_NAMES}")
    duplicates = sorted({g for g in groups if list(groups).count(g) > 1})
    if duplicates:
        raise CardError(f"groups must be unique, {duplicates} repeated in {list(groups)!r}")
    return list(groups)


def _check_training(training: Any) -> dict[str, Any]:
    record = _check_json_object(training, "training")
    missing = [k for k in TRAINING_KEYS if k not in record]
    if missing:
        raise CardError(f"training record is missing {missing}; got keys {sorted(record)}")
    for key in ("cases", "steps"):
        if not _is_int(record[key]) or record[key] < 0:
            raise CardError(f"training {key} must be an integer >= 0, got {record[key]!r}")
    seconds = record["seconds"]
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
        raise CardError(f"training seconds must be a number >= 0, got {seconds!r}")
    _check_text(record["device"], "training device")
    if not _is_int(record["seed"]):
        raise CardError(f"training seed must be an integer, got {record['seed']!r}")
    return record


ANATOMY_KEYS = ("one_piece", "left_right_pairs")


def _check_anatomy(anatomy: Any, labels: list[Label]) -> dict[str, Any]:
    """The adapter card's ``anatomy`` (see :class:`AdapterCard`), checked against the label names."""
    record = _check_json_object(anatomy, "anatomy")
    unknown = sorted(set(record) - set(ANATOMY_KEYS))
    if unknown:
        raise CardError(f"anatomy has unknown keys {unknown}; known keys: {list(ANATOMY_KEYS)}")
    names = [label.name for label in labels[1:]]

    def label_names(items: Any, what: str) -> list[str]:
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise CardError(f"anatomy {what} must be a list of label names, got {items!r:.200}")
        unknown_names = [item for item in items if item not in names]
        if unknown_names:
            raise CardError(f"anatomy {what} names {unknown_names}, which are not labels of the adapter (its "
                            f"labels: {names})")
        repeated = sorted({item for item in items if items.count(item) > 1})
        if repeated:
            raise CardError(f"anatomy {what} names {repeated} more than once")
        return items

    if "one_piece" in record:
        label_names(record["one_piece"], "one_piece")
    if "left_right_pairs" in record:
        pairs = record["left_right_pairs"]
        if not isinstance(pairs, list) or not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
            raise CardError(f"anatomy left_right_pairs must be a list of [left, right] label-name pairs, got "
                            f"{pairs!r:.200}")
        label_names([name for pair in pairs for name in pair], "left_right_pairs")
    return record


def _check_created(value: Any) -> None:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.utcoffset() is None:
        raise CardError(f"created must be an ISO 8601 time with a UTC offset (like '2025-01-31T12:00:00+00:00'), "
                        f"got {value!r}")


def _to_json(card: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for item in dataclasses.fields(card):
        value = getattr(card, item.name)
        if item.name == "labels":
            value = [label.to_json() for label in value]
        elif isinstance(value, tuple):
            value = list(value)
        data[item.name] = value
    return json.loads(json.dumps(data))


def _fields_from_json(cls: type, data: Mapping[str, Any] | str, what: str,
                      also_required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Checks keys against the dataclass fields and converts nested labels; returns constructor kwargs."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as error:
            raise CardError(f"{what} is not valid JSON: {error}") from error
    if not isinstance(data, Mapping):
        raise CardError(f"{what} must be a JSON object, got {data!r:.200}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CardError(f"{what} has unknown keys {unknown}; known keys: {list(fields)}")
    required = [name for name, f in fields.items()
                if (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                or name in also_required]
    missing = [name for name in required if name not in data]
    if missing:
        raise CardError(f"{what} is missing required fields {missing}")
    kwargs = dict(data)
    if "labels" in kwargs:
        if not isinstance(kwargs["labels"], list):
            raise CardError(f"{what} labels must be a list, got {kwargs['labels']!r:.200}")
        kwargs["labels"] = [Label.from_json(item) for item in kwargs["labels"]]
    return kwargs
