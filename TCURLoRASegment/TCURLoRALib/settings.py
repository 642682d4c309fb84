"""Training settings: the one home of every training default, checked on construction (no torch needed).

:class:`TrainSettings` holds what ``train`` (a tCURLoRA adapter) and ``pretrain`` (a whole base) may be told;
:meth:`TrainSettings.for_pretraining` gives pretraining's own defaults. The command line builds its options, help
and printed defaults from the fields' metadata (``flag``, ``help``), so every error here names the flag
(``--steps must be ...``) and quotes the value.

Where the defaults come from (measurements in ``Testing/benchmarks/README.md``): rank 16 and init ``"zero"`` from the
few-shot benchmark (the highest Dice of ranks 4/8/16 with 5 cases; both inits train the same adapter, ``"zero"``
needs no t-pseudo-inverse); decoder/head learning rate 1e-2, because 1e-3 never learnt the right hippocampus in
200 steps of a real few-shot task; U's rate 1e-3 (1e-2 made no difference on synthetic data, the smaller one keeps
a pretrained ViT's ΔW moderate). The paper's own rank is 8 (``tcur.TCURLoRAConfig``'s default).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

from .devices import DEVICE_CHOICES, check_device
from .tcur.names import GROUP_NAMES, INITS

__all__ = ["ADAPTER_ONLY", "POSTPROCESS_CHOICES", "UNMAPPED_POLICIES", "VALIDATION_KEYWORDS", "TrainSettings", "flag"]

UNMAPPED_POLICIES = ("error", "background", "ignore")
"""What a case structure that maps to no adapter label becomes (see :mod:`TCURLoRALib.cases`)."""
VALIDATION_KEYWORDS = ("auto", "none")
POSTPROCESS_CHOICES = ("largest-component", "none")
"""``segment --postprocess`` rules, the default first (:mod:`TCURLoRALib.segmentation`); here, torch-free, for the
command line and the panels."""
ADAPTER_ONLY = ("rank", "init", "groups", "lr_u", "mirror")
"""Settings of an adapter that pretraining (every weight trains, at ``lr``) has no use for."""


def _option(flag: str, help: str, **argparse: Any) -> dict[str, Any]:
    """Field metadata read by the CLI: the flag, its help (the default is appended there) and argparse extras."""
    return {"flag": flag, "help": help, "argparse": argparse}


@dataclass(frozen=True)
class TrainSettings:
    """How to train; every field has its default here and nowhere else.

    Args:
        rank: tensor CUR rank r of a new adapter (U is ``r x r x n3``); ``None``: :attr:`NEW_RANK`, or the parent's
            when continuing an adapter (which must keep it).
        init: U's initialisation, ``"pinv"`` or ``"zero"``; ``None``: :attr:`NEW_INIT`, or the parent's.
        groups: ViT weight groups to adapt (``"attention"``, ``"mlp_up"``, ``"mlp_down"``); ``None``: all three, or
            the parent's.
        steps: optimiser steps (0 writes the untrained adapter: ``ΔW = 0``, a fresh head if the labels are new);
            with ``minutes``, the most steps the budget may run.
        minutes: wall-time budget of the training loop in minutes, validations included; ``None``: no budget,
            ``steps`` alone ends the run. With a budget the run ends at the budget or after ``steps``, whichever
            comes first, with a validation of the last state; the learning rate decays over the larger of the two
            fractions spent, so it reaches its final value whichever ends the run.
        mirror: also train on every training case mirrored across the left-right axis, with the labels of each
            left/right pair swapped (:mod:`TCURLoRALib.mirror`; the pairs from label names, e.g. ``left X`` /
            ``right X``); an adapter setting only. Off by default: the few-shot benchmark measured it neutral for
            Dice on its own (``Testing/benchmarks/README.md``, quality benchmark).
        lr: learning rate of the decoder blocks and the head (pretraining: of every weight).
        lr_u: learning rate of U.
        batch_size: crops a step.
        validate_every: steps between validations (the last step is always validated).
        validation: ``"auto"`` (hold out cases by the rule of :func:`TCURLoRALib.validation.split_cases`),
            ``"none"``, or the validation cases (a folder, a JSON case list, or a list of cases).
        seed: seeds crops, augmentation, a new head and the automatic validation split.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: torch CPU threads while training; ``None`` leaves torch's own setting.
        unmapped: what a case structure that maps to no adapter label becomes: ``"error"``, ``"background"`` or
            ``"ignore"`` (not annotated).

    Raises:
        ValueError: a bad value; the message names the command-line flag and quotes the value.
    """

    NEW_RANK: ClassVar[int] = 16
    NEW_INIT: ClassVar[str] = "zero"
    PRETRAINING: ClassVar[Mapping[str, Any]] = {"steps": 1000, "lr": 1e-3, "validate_every": 200,
                                                "validation": "none"}
    """Pretraining's defaults where they differ (a whole network from scratch: more steps, a smaller rate)."""

    rank: Optional[int] = field(default=None, metadata=_option(
        "--rank", "tensor CUR rank r of a new adapter", metavar="R", type=int))
    init: Optional[str] = field(default=None, metadata=_option(
        "--init", "initialisation of U (both start at ΔW = 0)", choices=INITS))
    groups: Optional[tuple] = field(default=None, metadata=_option(
        "--groups", "ViT weight groups to adapt", nargs="+", choices=GROUP_NAMES))
    steps: int = field(default=200, metadata=_option(
        "--steps", "optimiser steps (with --minutes: the most steps)", metavar="N", type=int))
    minutes: Optional[float] = field(default=None, metadata=_option(
        "--minutes", "wall-time budget of training in minutes, validations included: the run ends at the budget or "
        "after --steps, whichever comes first, keeping the best validated state", metavar="M", type=float))
    mirror: bool = field(default=False, metadata=_option(
        "--mirror", "also train on each case mirrored left/right, with the labels of each left/right pair swapped "
        "(pairs from label names such as 'left X' / 'right X')", action="store_true"))
    lr: float = field(default=1e-2, metadata=_option(
        "--lr", "learning rate of the decoder and the head", metavar="RATE", type=float))
    lr_u: float = field(default=1e-3, metadata=_option("--lr-u", "learning rate of U", metavar="RATE", type=float))
    batch_size: int = field(default=2, metadata=_option("--batch-size", "crops a step", metavar="N", type=int))
    validate_every: int = field(default=50, metadata=_option(
        "--validate-every", "steps between validations (the last step is always validated)", metavar="N", type=int))
    validation: Union[str, Sequence[Any]] = field(default="auto", metadata=_option(
        "--validation", "validation cases: 'auto' holds out 1 of 2-3 cases and 1 in 5 of 4 or more (none of 1), "
        "'none', or a folder / JSON case list", metavar="auto|none|CASES"))
    seed: int = field(default=0, metadata=_option(
        "--seed", "seeds crops, augmentation, a new head and the automatic validation split", metavar="N", type=int))
    device: str = field(default="auto", metadata=_option(
        "--device", "where to run: 'auto' is a GPU when torch sees one, else the CPU",
        metavar="{" + ",".join(DEVICE_CHOICES) + "}"))
    threads: Optional[int] = field(default=None, metadata=_option(
        "--threads", "torch CPU threads", metavar="N", type=int))
    unmapped: str = field(default="error", metadata=_option(
        "--unmapped", "what a case structure that maps to no adapter label becomes (ignore: not annotated)",
        choices=UNMAPPED_POLICIES))

    def __post_init__(self) -> None:
        if self.rank is not None:
            _integer(self, "rank", 1)
        if self.init is not None and self.init not in INITS:
            raise ValueError(f"{flag('init')} must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.groups is not None:
            object.__setattr__(self, "groups", _groups(self.groups))
        _integer(self, "steps", 0)
        _integer(self, "batch_size", 1)
        _integer(self, "validate_every", 1)
        _integer(self, "seed", 0)
        if self.threads is not None:
            _integer(self, "threads", 1)
        if not isinstance(self.mirror, bool):
            raise ValueError(f"{flag('mirror')} must be true or false, got {self.mirror!r}")
        names = ("lr", "lr_u") if self.minutes is None else ("lr", "lr_u", "minutes")
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{flag(name)} must be a positive number, got {value!r}")
        object.__setattr__(self, "device", check_device(self.device))
        if self.unmapped not in UNMAPPED_POLICIES:
            raise ValueError(f"{flag('unmapped')} must be one of {', '.join(UNMAPPED_POLICIES)}, "
                             f"got {self.unmapped!r}")
        if isinstance(self.validation, str):
            if not self.validation.strip():
                raise ValueError(f"{flag('validation')} must be 'auto', 'none' or validation cases, got ''")
            if self.validation.strip().lower() in VALIDATION_KEYWORDS:
                object.__setattr__(self, "validation", self.validation.strip().lower())

    @classmethod
    def for_pretraining(cls, **changes: Any) -> TrainSettings:
        """Settings for ``pretrain``: :attr:`PRETRAINING`'s defaults, then ``changes`` (any field but
        :data:`ADAPTER_ONLY`).

        Raises:
            ValueError: an adapter-only setting, or a bad value.
        """
        given = [name for name in ADAPTER_ONLY if changes.get(name) is not None]
        if given:
            raise ValueError(f"{', '.join(flag(name) for name in given)}: not a pretraining setting (pretraining "
                             f"trains every weight at {flag('lr')})")
        return cls.of(cls.PRETRAINING, **changes)

    @classmethod
    def of(cls, defaults: Mapping[str, Any] | TrainSettings | None = None, **changes: Any) -> TrainSettings:
        """``defaults`` (settings or a dict of fields; default: the plain defaults) with ``changes`` applied.

        Raises:
            TypeError: a name that is not a field (the message lists the fields).
        """
        base = dataclasses.asdict(defaults) if isinstance(defaults, TrainSettings) else dict(defaults or {})
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown training setting(s) {unknown}; the settings are "
                            f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**{**base, **changes})

    def resolved(self, parent: Mapping[str, Any] | None = None) -> tuple[int, str, tuple]:
        """``(rank, init, groups)`` of the adapter: the given ones, else the parent's (a dict with ``rank``,
        ``init``, ``groups``), else :attr:`NEW_RANK`, :attr:`NEW_INIT` and every group.

        Raises:
            ValueError: a setting given that differs from the parent's (a continued adapter keeps them).
        """
        if parent is None:
            return (self.NEW_RANK if self.rank is None else self.rank, self.init or self.NEW_INIT,
                    self.groups or GROUP_NAMES)
        held = {"rank": parent["rank"], "init": parent["init"], "groups": tuple(parent["groups"])}
        clashes = [f"{flag(key)} {getattr(self, key)!r} (parent: {held[key]!r})" for key in held
                   if getattr(self, key) is not None and getattr(self, key) != held[key]]
        if clashes:
            raise ValueError(f"continuing adapter {parent.get('name')!r} keeps its settings; got "
                             f"{', '.join(clashes)}: leave them out")
        return held["rank"], held["init"], held["groups"]

    def default_text(self, name: str) -> str:
        """How ``--help`` states the default of field ``name`` when these are the defaults: ``"200"``,
        ``"16; with --parent the parent's"``."""
        value = getattr(self, name)
        parents = "; with --parent the parent's"
        if name == "rank" and value is None:
            return f"{self.NEW_RANK}{parents}"
        if name == "init" and value is None:
            return f"{self.NEW_INIT}{parents}"
        if name == "groups" and value is None:
            return f"all ({' '.join(GROUP_NAMES)}){parents}"
        if name == "threads" and value is None:
            return "torch's own choice"
        if name == "minutes" and value is None:
            return "no budget, --steps decides"
        if name == "mirror":
            return "off"
        if isinstance(value, float):
            return f"{value:g}"
        return " ".join(value) if isinstance(value, tuple) else str(value)

    def to_arguments(self, defaults: TrainSettings | None = None) -> list[str]:
        """The command-line options that give these settings, for fields that differ from ``defaults`` (default:
        the plain defaults; pass ``TrainSettings.for_pretraining()`` for ``pretrain``). Validation cases given as a
        list cannot be spelt as an option and are refused."""
        defaults = defaults or TrainSettings()
        arguments: list[str] = []
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is None or value == getattr(defaults, item.name):
                continue
            if item.name == "validation" and not isinstance(value, str):
                raise ValueError(f"{flag('validation')}: cases given as a list have no command-line spelling; "
                                 f"write them to a JSON case list")
            if isinstance(value, bool):  # a switch: the flag alone says True, absent says False
                arguments += [item.metadata["flag"]] if value else []
                continue
            values = list(value) if isinstance(value, tuple) else [value]
            arguments += [item.metadata["flag"], *(repr(v) if isinstance(v, float) else str(v) for v in values)]
        return arguments


def flag(name: str) -> str:
    """The command-line flag of a setting: ``"batch_size"`` -> ``"--batch-size"``."""
    return TrainSettings.__dataclass_fields__[name].metadata["flag"]


def _integer(settings: TrainSettings, name: str, minimum: int) -> None:
    value = getattr(settings, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{flag(name)} must be an integer >= {minimum}, got {value!r}")


def _groups(groups: Any) -> tuple:
    if isinstance(groups, str) or not isinstance(groups, (list, tuple)):
        raise ValueError(f"{flag('groups')} must be a list of group names, got {groups!r}")
    unknown = [name for name in groups if name not in GROUP_NAMES]
    if not groups or unknown or len(set(groups)) != len(groups):
        raise ValueError(f"{flag('groups')} must name each of {', '.join(GROUP_NAMES)} at most once (at least "
                         f"one), got {list(groups)!r}")
    return tuple(groups)
