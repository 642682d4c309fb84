"""The command lines the panels start: ``python -m TCURLoRALib segment|train ...`` (``--progress`` is added by
:class:`~TCURLoRALib.jobs.Job`)."""
from __future__ import annotations

import os
from typing import Union

from .settings import BASE_ONLY, DEVICES

__all__ = ["segment_arguments", "train_arguments"]

PathLike = Union[str, "os.PathLike[str]"]


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
    postprocess: str | None = None,
    tta: bool = False,
) -> list[str]:
    """Arguments of ``python -m TCURLoRALib segment``.

    Args:
        image: the exported input volume.
        output: the label map to write.
        adapter: store name or file of the adapter; None, ``""`` or :data:`~.settings.BASE_ONLY` for the base alone.
        device: one of :data:`~.settings.DEVICES`.
        overlap: sliding-window overlap in [0, 1).
        base: base-model file; None for the shipped base.
        postprocess: one of :data:`~TCURLoRALib.settings.POSTPROCESS_CHOICES`; None keeps the engine's default.
        tta: test-time left/right mirroring.

    Raises:
        ValueError: an unknown device or post-processing rule, or an overlap outside [0, 1).
    """
    _check_device(device)
    if not (isinstance(overlap, (int, float)) and 0.0 <= overlap < 1.0):
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    from ..settings import POSTPROCESS_CHOICES  # torch-free, as settings.train_defaults reads it

    if postprocess is not None and postprocess not in POSTPROCESS_CHOICES:
        raise ValueError(f"postprocess must be one of {POSTPROCESS_CHOICES}, got {postprocess!r}")
    arguments = ["segment", str(image), "--output", str(output), "--adapter", adapter or BASE_ONLY,
                 "--device", device, "--overlap", repr(float(overlap))]
    if base:
        arguments += ["--base", str(base)]
    if postprocess is not None:
        arguments += ["--postprocess", postprocess]
    if tta:
        arguments.append("--tta")
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
    minutes: float | None = None,
    mirror: bool = False,
) -> list[str]:
    """Arguments of ``python -m TCURLoRALib train``; options left None keep the engine's defaults.

    Args:
        cases_json: the case list written by :func:`~.export.write_cases_json`.
        name: the new adapter's name (saved in the user's adapter folder).
        base: base-model file; None for the shipped base.
        parent: store name or file of the adapter to improve.
        labels_json: the adapter's labels (a JSON file), None to keep the parent's or the base's.
        rank, steps, lr: tCURLoRA rank, optimiser steps, learning rate (each > 0).
        device: one of :data:`~.settings.DEVICES` (``"cuda"`` is the CLI's spelling of GPU).
        seed: random seed.
        minutes: wall-time budget of training (> 0); None: ``steps`` alone decides.
        mirror: also train on the cases mirrored left/right (the labels need left/right pairs).

    Raises:
        ValueError: an empty name, a setting <= 0, an unknown device; a rank given together with a parent (an
            improved adapter keeps its parent's rank).
    """
    if not str(name).strip():
        raise ValueError(f"give the new adapter a name, got {name!r}")
    _check_device(device)
    for option, value in (("rank", rank), ("steps", steps), ("learning rate", lr), ("minutes", minutes)):
        if value is not None and not value > 0:
            raise ValueError(f"{option} must be > 0, got {value!r}")
    if parent and rank is not None:
        raise ValueError(f"an improved adapter keeps the rank of its parent {parent!r}: do not give a rank "
                         f"(got {rank!r})")
    arguments = ["train", "--cases", str(cases_json), "--name", str(name).strip(), "--device", device]
    optional = (("--base", base), ("--parent", parent), ("--labels", labels_json), ("--rank", rank),
                ("--steps", steps), ("--minutes", minutes), ("--lr", lr), ("--seed", seed))
    for option, value in optional:
        if value is not None and value != "":
            arguments += [option, repr(value) if isinstance(value, float) else str(value)]
    if mirror:
        arguments.append("--mirror")
    return arguments
