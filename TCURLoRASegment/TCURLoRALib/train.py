"""Training entry points: a tCURLoRA adapter on a frozen base (:func:`train_adapter`), a base from scratch
(:func:`pretrain`).

What trains in an adapter (the paper's recipe, see DESIGN.md): the core U of every adapted ViT weight group, the
UNETR decoder blocks decoder5..decoder2, and the output head only when the adapter's labels differ from the base's
(a fresh head, one channel a label, started at the label prior: :func:`start_head_at_prior`). Everything else stays
frozen. Settings and their defaults: :class:`~TCURLoRALib.settings.TrainSettings`; the adapter's labels:
:mod:`~TCURLoRALib.labelset`; the loop: :mod:`~TCURLoRALib.loop` (crops :mod:`~TCURLoRALib.crops`, loss
:mod:`~TCURLoRALib.loss`, validation :mod:`~TCURLoRALib.validation`).

Before the first step a training reports (``log`` events) the adapter's labels and where they came from, how each
structure of the cases maps onto them, and which cases train and which validate, and why; the card keeps the mapping
and the split (``training["label_mapping"]``, ``training["validation_split"]``).

Nothing is written until training ends: the adapter (or base) file is written once, atomically, so a job that is
cancelled (:class:`progress.Cancelled` raised by the CLI's signal handler) or fails leaves no file behind.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

from .adapter import adapter_file_bytes, attach_head, group_state_of, read_adapter, save_adapter
from .basemodel import build_unetr, load_base, save_base
from .cards import AdapterCard, Label, ModelCard
from .cases import IGNORE_INDEX, LabelMapping, PreparedCase, find_cases, parse_label_mapping, prepare_cases
from .labelset import adapter_labels, describe_labels
from .loop import DECODER_WEIGHT_DECAY, ONE_PROCESS, FitResult, OneProcess, adapter_optimizer, fit, reproducible
from .mirror import mirrored_cases, pairs_from_names, required_pairs
from .progress import Progress, silent
from .settings import TrainSettings
from .tcur import DECODER_BLOCKS, HEAD, TCURLoRAConfig, TCURLoRAModel
from .validation import Split, split_cases

__all__ = ["pretrain", "start_head_at_prior", "train_adapter"]

PathLike = Union[str, "os.PathLike[str]"]


def train_adapter(
    base_path: PathLike,
    cases: PathLike | Sequence[Any],
    labels: Sequence[Label | Mapping[str, Any] | str] | None,
    output_path: PathLike,
    *,
    name: str | None = None,
    label_map: Mapping[str, Any] | str | None = None,
    parent_adapter: PathLike | None = None,
    one_piece: Sequence[str] | str | None = None,
    settings: TrainSettings | None = None,
    overwrite: bool = False,
    progress: Progress = silent,
    parallel: OneProcess = ONE_PROCESS,
    **changes: Any,
) -> AdapterCard | None:
    """Train a tCURLoRA adapter on a base model and write it (atomically) with its card.

    Args:
        base_path: the base-model file.
        cases: training cases: a folder, a JSON case list, or a list of (image, label) pairs / dicts / TrainingCases
            (see :mod:`TCURLoRALib.cases`).
        labels: the adapter's labels: a full list (``labels[0]`` background, value 0), label names (background
            implicit, values 1, 2, ... in order), or ``None``: new names in ``label_map``, else the parent adapter's
            labels, else the base's (rules in :mod:`TCURLoRALib.labelset`). Labels other than the base's get a new
            output head, which then trains.
        output_path: the adapter file to write: its folder must exist and take the file (checked before the work,
            with the free space); an existing file only with ``overwrite``, never the base or the parent.
        name: adapter name in the card; default: the file name without ``.safetensors``.
        label_map: case structure -> adapter label (dict, JSON text or JSON file; rules in :mod:`cases`).
        parent_adapter: an adapter file of the same base to continue from (its U, decoder and head).
        one_piece: the labels that are one connected piece (names, or ``"all"``: every label but the background),
            recorded in the card's ``anatomy`` so that ``segment`` keeps only their largest component; None: the
            parent's declaration (for the labels it still has), else none.
        settings: :class:`TrainSettings` (default: its defaults).
        overwrite: replace an existing ``output_path``; without it the file is also written exclusively, so that an
            adapter another run wrote there meanwhile is never replaced.
        progress: receives ``log`` (labels, mapping, split), ``start``, ``step``, ``metric`` and ``done`` events.
        parallel: the processes that share the training (default: this one alone); under torchrun
            :class:`TCURLoRALib.distributed.DataParallel`, whose ``settings.batch_size`` is each process's share
            and whose first process (rank 0) alone checks and writes the output and validates.
        **changes: settings fields that replace those of ``settings`` (``steps=20``, ``lr=5e-3``, ...).

    Returns:
        The card written (None in a process of a torchrun job that writes nothing). ``training`` holds cases,
        validation_cases, steps (those run), max_steps, minutes (the budget, or None), stopped_by (``"steps"`` or
        ``"budget"``), mirror, seconds, device, seed, lr, lr_u, batch_size, patch_size, best_step, trainable
        parameter counts, the label mapping and the validation split; ``anatomy`` the one-piece labels and the
        left/right pairs (found from the names unless the parent declared them);
        ``metrics["validation"]`` the best validation Dice per label (by label name), their mean, the step of that
        state and the starting Dice (``initial``), when there were validation cases. ``batch_size`` is the crops of
        a step in all processes together; a torchrun job adds ``distributed`` (processes, backend).

    Raises:
        FileNotFoundError, ValueError, CardError, TCURLoRAFileError: bad input (files, labels, settings, mapping).
        FileExistsError: ``output_path`` exists and ``overwrite`` is False.
        OutputError: ``output_path`` cannot be written (before the work), or writing it failed (after the work: the
            adapter was kept where the message says).
        FloatingPointError: the loss diverged (a learning rate too high).
        Cancelled: raised by the caller's signal handler; nothing is written then.
    """
    settings = TrainSettings.of(settings, **changes)
    outputs = parallel.output_files(overwrite=overwrite, inputs=[base_path, parent_adapter])
    output_path = outputs.add(output_path, "adapter")
    started = time.monotonic()
    torch_device = parallel.device(settings.device)
    base = load_base(base_path, torch_device)
    parent = read_adapter(parent_adapter, base) if parent_adapter is not None else None
    parent_card = parent[1] if parent else None
    config = _adapter_config(settings, parent_card)
    entries = parse_label_mapping(label_map)
    choice = adapter_labels(labels, entries, parent_card.labels if parent_card else base.card.labels,
                            "the parent adapter's" if parent_card else "the base's")
    new_head = _label_json(choice.labels) != _label_json(base.card.labels)
    card = AdapterCard(  # built now, so that a bad name or label list fails before any training
        name=name or _default_name(output_path), base_fingerprint=base.card.fingerprint, base_name=base.card.name,
        rank=config.rank, groups=list(config.groups), init=config.init, labels=choice.labels,
        training={"cases": 0, "steps": 0, "seconds": 0.0, "device": str(torch_device), "seed": settings.seed},
        parent=parent_card.name if parent_card else None, anatomy=_anatomy(choice.labels, one_piece, parent_card))
    pairs = required_pairs([label.name for label in choice.labels], card.declared_pairs(),
                           "--mirror") if settings.mirror else []
    mapping = LabelMapping(choice.labels, entries, settings.unmapped, by_value=choice.by_value)
    split = split_cases(find_cases(cases), settings.validation, settings.seed)
    progress("log", message=describe_labels(choice))
    progress("log", message=split.describe())
    train_data, validation_data = _prepare(split, base.card, mapping, progress)
    training_cases = len(train_data)  # the cases given: mirrored copies are not cases of their own
    if settings.mirror:
        train_data = train_data + mirrored_cases(train_data, base.card.orientation, pairs, len(choice.labels))
        swapped = ", ".join(f"{choice.labels[a].name} <-> {choice.labels[b].name}" for a, b in pairs)
        progress("log", message=f"mirroring: {len(train_data) // 2} training case(s) also train mirrored left/right "
                                f"({swapped})")

    with reproducible(settings.seed, settings.threads):
        model = _adapted_model(base.model, config, choice.labels, new_head, parent, train_data, torch_device)
        outputs.expect(output_path, adapter_file_bytes(model, include_head=new_head))
        counts = model.mark_trainable(train_head=new_head)
        u_parameters = [group.u for group in model.groups.values()]
        u_ids = {id(p) for p in u_parameters}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in u_ids]
        result = fit(model, adapter_optimizer(u_parameters, others, settings.lr, settings.lr_u), train_data,
                     validation_data, labels=choice.labels, patch_size=base.card.patch_size, settings=settings,
                     progress=progress, task="train adapter", validate_initial=True, parallel=parallel)
    model.eval()
    training = {
        **_record(settings, result, torch_device, started, training_cases, parallel), "lr_u": settings.lr_u,
        "patch_size": list(base.card.patch_size), "validate_every": settings.validate_every,
        "unmapped": settings.unmapped,
        "trainable": {"u": counts.u, "decoder": counts.decoder, "head": counts.head, "total": counts.total},
        "label_mapping": mapping.to_json(), "validation_split": _split_json(split),
    }
    card = dataclasses.replace(card, training=training, metrics=result.metrics_json())
    if not parallel.main:
        return None
    outputs.publish({output_path: lambda temporary: save_adapter(temporary, model, card, include_head=new_head)})
    progress("done", output=str(output_path), seconds=training["seconds"])
    return card


def pretrain(
    cases: PathLike | Sequence[Any],
    card_fields: Mapping[str, Any],
    output_path: PathLike,
    *,
    label_map: Mapping[str, Any] | str | None = None,
    settings: TrainSettings | None = None,
    overwrite: bool = False,
    progress: Progress = silent,
    parallel: OneProcess = ONE_PROCESS,
    **changes: Any,
) -> ModelCard | None:
    """Train a whole UNETR from scratch and write it as a base-model file (atomically).

    Args:
        cases: training cases (as for :func:`train_adapter`).
        card_fields: every :class:`ModelCard` field but the fingerprint; its labels are the network's outputs.
        output_path: the base-model file to write (checked before the work, as for :func:`train_adapter`).
        label_map: as for :func:`train_adapter`.
        settings: default :meth:`TrainSettings.for_pretraining` (no validation; all weights train at ``lr``).
        overwrite, progress, parallel: as for :func:`train_adapter`.
        **changes: settings fields that replace those of ``settings``.

    Returns:
        The card written (None in a process of a torchrun job that writes nothing); ``metrics["validation"]``
        holds the best validation Dice when there were validation cases, ``provenance["training"]`` the training
        record.
    """
    settings = TrainSettings.for_pretraining(**changes) if settings is None else TrainSettings.of(settings, **changes)
    outputs = parallel.output_files(overwrite=overwrite)
    output_path = outputs.add(output_path, "base model")
    started = time.monotonic()
    fields = dict(card_fields)
    fields.pop("fingerprint", None)
    card = ModelCard.from_json({**fields, "fingerprint": "0" * 64})  # checks the fields before any work
    torch_device = parallel.device(settings.device)
    mapping = LabelMapping(card.labels, parse_label_mapping(label_map), settings.unmapped)
    split = split_cases(find_cases(cases), settings.validation, settings.seed)
    progress("log", message=split.describe())
    train_data, validation_data = _prepare(split, card, mapping, progress)
    with reproducible(settings.seed, settings.threads):
        model = build_unetr(card).to(torch_device)
        outputs.expect(output_path, sum(value.numel() * value.element_size() for value in model.state_dict().values()))
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=DECODER_WEIGHT_DECAY)
        result = fit(model, optimizer, train_data, validation_data, labels=card.labels, patch_size=card.patch_size,
                     settings=settings, progress=progress, task="pretrain", parallel=parallel)
    model.eval()
    record = {**_record(settings, result, torch_device, started, len(train_data), parallel),
              "label_mapping": mapping.to_json(), "validation_split": _split_json(split)}
    fields["metrics"] = {**dict(fields.get("metrics") or {}), **result.metrics_json()}
    fields["provenance"] = {**dict(fields.get("provenance") or {}), "training": record}
    if not parallel.main:
        return None
    written: list[ModelCard] = []
    outputs.publish({output_path: lambda temporary: written.append(save_base(temporary, model, fields))})
    progress("done", output=str(output_path), seconds=record["seconds"])
    return written[-1]


@torch.no_grad()
def start_head_at_prior(unetr: nn.Module, cases: Sequence[PreparedCase]) -> None:
    """Start a new output head at the label frequencies: weights 0, bias log(frequency of each label).

    A randomly initialised head starts with an arbitrary bias per label; measured on the synthetic cases, one seed
    in five started by predicting the new label over most of the volume and was still far off after 16 steps.
    From the prior, every run starts predicting background and the decoder's features pick up the structures.
    """
    conv = unetr.out.conv.conv
    counts = np.zeros(conv.out_channels, dtype=np.float64)
    for case in cases:
        annotated = case.target[case.target != IGNORE_INDEX]
        counts += np.bincount(annotated, minlength=conv.out_channels)[: conv.out_channels]
    frequency = (counts + 1.0) / (counts.sum() + conv.out_channels)  # +1: a label absent from the crops stays finite
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.copy_(torch.from_numpy(np.log(frequency)).to(conv.bias))


# ---------------------------------------------------------------- pieces


def _prepare(split: Split, card: ModelCard, mapping: LabelMapping, progress: Progress) -> tuple[list, list]:
    """The split's cases on the model grid; then the mapping they got, reported before any step."""
    prepared = prepare_cases(split.train + split.validation, card, mapping)
    progress("log", message=mapping.describe())
    return prepared[:len(split.train)], prepared[len(split.train):]


def _adapted_model(unetr: nn.Module, config: TCURLoRAConfig, labels: Sequence[Label], new_head: bool,
                   parent: tuple | None, train_data: Sequence[PreparedCase], device: torch.device) -> TCURLoRAModel:
    """The base's network with the adapter on it: a parent's U, decoder and head when continuing one, a head for
    new labels at the label prior."""
    base_head = unetr.out
    if parent is None:
        if new_head:
            attach_head(unetr, labels)
            start_head_at_prior(unetr, train_data)
        return TCURLoRAModel(unetr, config).to(device)
    tensors, parent_card = {key: value.to(device) for key, value in parent[0].items()}, parent[1]
    if any(key.split(".", 1)[0] == HEAD for key in tensors):
        attach_head(unetr, parent_card.labels)
    unetr.load_state_dict({k: v for k, v in tensors.items() if k.split(".", 1)[0] in DECODER_BLOCKS + (HEAD,)},
                          strict=False)
    if not new_head:
        unetr.out = base_head  # back to the base's labels: its own head, frozen, as the file will not hold one
    elif _label_json(labels) != _label_json(parent_card.labels):
        attach_head(unetr, labels)
        start_head_at_prior(unetr, train_data)
    return TCURLoRAModel(unetr, config, group_state=group_state_of(tensors)).to(device)


def _record(settings: TrainSettings, result: FitResult, device: torch.device, started: float, cases: int,
            parallel: OneProcess) -> dict[str, Any]:
    return {"cases": cases, "validation_cases": result.validation_cases, "steps": result.steps,
            "max_steps": settings.steps, "minutes": settings.minutes, "stopped_by": result.stopped_by,
            "mirror": settings.mirror,
            "seconds": round(time.monotonic() - started, 2), "device": str(device), "seed": settings.seed,
            "lr": settings.lr, "batch_size": settings.batch_size * parallel.processes, "best_step": result.best_step,
            "torch": torch.__version__, **parallel.record()}


def _split_json(split: Split) -> dict[str, Any]:
    return {"train": [case.name for case in split.train], "validation": [case.name for case in split.validation],
            "rule": split.reason}


def _default_name(output_path: Path) -> str:
    name = output_path.name
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else output_path.stem


def _anatomy(labels: Sequence[Label], one_piece: Sequence[str] | str | None,
             parent: AdapterCard | None) -> dict[str, Any]:
    """The new card's ``anatomy``: the one-piece labels asked for (or the parent's), and the left/right pairs (the
    parent's declared ones where it has the labels, else found from the names)."""
    names = [label.name for label in labels[1:]]
    inherited = parent.anatomy if parent is not None else {}
    if one_piece is None:
        chosen = [name for name in inherited.get("one_piece", ()) if name in names]
    elif isinstance(one_piece, str) and one_piece.strip().lower() == "all":
        chosen = list(names)
    else:
        chosen = [one_piece] if isinstance(one_piece, str) else list(one_piece)
        unknown = [name for name in chosen if name not in names]
        if unknown:
            raise ValueError(f"--one-piece names {unknown}, which are not labels of the adapter (its labels: "
                             f"{names}; or 'all')")
    anatomy: dict[str, Any] = {"one_piece": chosen} if chosen else {}
    held = [pair for pair in inherited.get("left_right_pairs", ()) if all(name in names for name in pair)]
    pairs = held if "left_right_pairs" in inherited else [
        [labels[a].name, labels[b].name] for a, b in pairs_from_names([label.name for label in labels])]
    if pairs:
        anatomy["left_right_pairs"] = pairs
    return anatomy


def _label_json(labels: Sequence[Label]) -> list[dict[str, Any]]:
    return [label.to_json() for label in labels]


def _adapter_config(settings: TrainSettings, parent: AdapterCard | None) -> TCURLoRAConfig:
    if parent is not None and not parent.groups:
        raise ValueError(f"parent adapter {parent.name!r} adapts no weight group; it cannot be continued here")
    held = None if parent is None else {"name": parent.name, "rank": parent.rank, "init": parent.init,
                                        "groups": parent.groups}
    rank, init, groups = settings.resolved(held)
    return TCURLoRAConfig(rank=rank, groups=tuple(groups), init=init)
