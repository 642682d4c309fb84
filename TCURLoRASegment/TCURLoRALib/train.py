"""Training: a tCURLoRA adapter on a frozen base (:func:`train_adapter`), a whole base from scratch (:func:`pretrain`).

What trains in an adapter (the paper's recipe, see DESIGN.md): the core U of every adapted ViT weight group, the
UNETR decoder blocks decoder5..decoder2, and the output head only when the adapter's labels differ from the base's
(a fresh head, one channel a label, started at the label prior: weights 0, bias log of each label's frequency in
the training cases; see :func:`start_head_at_prior`). Everything else stays frozen.

One training step: ``batch_size`` random crops of the card's patch size (UNETR's position embeddings fix its input
size) from the training cases on the model grid. Each crop is centred, with probability ``1 - BACKGROUND_FRACTION``,
on a voxel of a foreground label chosen uniformly among those the case holds (small structures get as many crops as
large ones), else on any annotated voxel. Augmentation: a small random affine (rotation, scaling) and intensity
scale/shift; no flips, because a flip swaps left and right structures (``hippocampus_left``) and the model grid
always has the card's orientation. Loss: Dice + cross-entropy over the annotated voxels only (see
:func:`masked_dice_ce`). Optimiser AdamW, cosine learning-rate decay to 5 % of the start.

Validation: before the first step, every ``validate_every`` steps and at the end, Dice per label of full-volume
sliding-window inference on the model grid of each validation case; the state with the best mean foreground Dice is
the one written (the starting state included, so continuing an adapter never makes it worse on those cases). The
card records the best Dice and the starting one (``metrics["validation"]["initial"]``).

Validation cases (``validation``): a list of cases; ``"none"``; or ``"auto"`` (default), which holds out cases by
this rule, with N training cases given:

- N = 1: no validation, the last state is written;
- N = 2 or 3: case number ``seed % N`` (0-based, in the given order) is held out, the others train, so runs with
  seeds 0, 1, 2 rotate through the cases;
- N >= 4: ``ceil(N / 5)`` cases, drawn by a permutation seeded with ``seed``, are held out.

Reproducibility: the same inputs, seed, device, thread count and library versions give a bit-identical adapter
(deterministic algorithms are switched on while training; ``threads`` fixes torch's thread count).

Nothing is written until training ends: the adapter (or base) file is written once, atomically, so a job that is
cancelled (:class:`progress.Cancelled` raised by the CLI's signal handler) or fails leaves no file behind.

Defaults: 200 steps, batch 2, learning rate 1e-2 for decoder and head and 1e-3 for U, validation every 50 steps.
The decoder/head rate was 1e-3 until a real few-shot task showed it too slow: hippocampus left/right on the shipped
base (4 cases, validation on a held-out individual) learnt the left side only, right-hippocampus Dice 0.0 after 200
steps and still 0.0 at step 200 of a 400-step run, while lr 1e-2 gave left 0.49 / right 0.41 at step 50
(``python -m Testing.cohorts.make_defaults``; the runs are in README "Shipped models"). Earlier measurements
with the synthetic cases of ``Testing/synthetic.py`` on the tiny test base (new label "target",
2 training cases, Dice on a third, seed 0, one torch thread on a shared 2-core CPU, 0.54 s a step of 2 crops of
32^3): lr 1e-3 gives Dice 0 / 0.62 / 0.90 / 0.96 / 0.96 after 20 / 40 / 60 / 80 / 100 steps (of a 100-step run);
lr 1e-2 with 1 crop a step gives 0.76-0.91 after 12 steps over seeds 0-4; lr 2e-2 diverged (Dice 0 from step 8,
measured with a randomly initialised head). U's learning rate made no difference there (1e-3 vs 1e-2: Dice 0.70
vs 0.70 after 20 steps at lr 5e-3): the decoder dominates on a random tiny ViT. With DESIGN.md's 0.75 s a step for
a compact base (hidden 192, 64^3 crops), 200 steps take about 3 minutes on such a CPU. On a machine whose cores are
shared with other jobs, ``threads=1`` was 3-4 times faster than 2 threads.

Rank 16 and init ``"zero"`` come from the few-shot benchmark (``Testing/benchmarks/bench_fewshot.py``, README
"Benchmarks"), the shipped base learning hippocampus from 1, 3 or 5 cases. The inits ``"pinv"`` and ``"zero"`` gave
the same Dice to 0.001 in every paired run (ΔW's gradient and Adam's steps do not depend on ``U0``): the default is
the one without a t-pseudo-inverse. Rank 16 gave the highest Dice of ranks 4, 8, 16 with 5 cases, in each seed
(after 80 steps 0.41 / 0.28 against 0.30 / 0.26 for rank 8; after 25 steps by 0.005-0.02), and the lowest with 3
cases after 25 steps: weak evidence, but at almost no cost (U of 18 k parameters, +0.1 MiB, the same step time,
+1-13 % step memory), and real training runs longer than those 80 steps. The paper's rank is 8.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.transforms import Compose, RandAffined, RandScaleIntensityd, RandShiftIntensityd
from torch import nn

from .adapter import adapter_file_bytes, attach_head, group_state_of, read_adapter, save_adapter
from .basemodel import build_unetr, load_base, save_base
from .cards import AdapterCard, Label, ModelCard
from .cases import IGNORE_INDEX, LabelMapping, PreparedCase, TrainingCase, find_cases, parse_label_mapping, \
    prepare_cases
from .outputs import OutputFiles
from .progress import EtaClock, Progress, silent
from .tcur import DECODER_BLOCKS, GROUP_NAMES, HEAD, TCURLoRAConfig, TCURLoRAModel

__all__ = [
    "BACKGROUND_FRACTION", "DEFAULT_BATCH_SIZE", "DEFAULT_INIT", "DEFAULT_LR", "DEFAULT_LR_U", "DEFAULT_PRETRAIN_LR",
    "DEFAULT_PRETRAIN_STEPS", "DEFAULT_RANK", "DEFAULT_STEPS", "DEFAULT_VALIDATE_EVERY", "CropSampler", "FitResult",
    "adapter_optimizer", "dice_per_label", "fit", "masked_dice_ce", "predict_labels", "pretrain", "reproducible",
    "resolve_device", "split_cases", "start_head_at_prior", "train_adapter", "validate",
]

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_STEPS = 200
DEFAULT_RANK = 16
DEFAULT_INIT = "zero"
"""Rank and init of a new adapter, from the few-shot benchmark (see the module docstring)."""
DEFAULT_LR = 1e-2
"""Learning rate of the decoder blocks and the head."""
DEFAULT_LR_U = 1e-3
"""Learning rate of U. On the synthetic data 1e-3 and 1e-2 gave the same Dice (the decoder dominates there); the
smaller one keeps ΔW of a pretrained ViT moderate until a real base says otherwise."""
DEFAULT_BATCH_SIZE = 2
DEFAULT_VALIDATE_EVERY = 50
DEFAULT_PRETRAIN_STEPS = 1000
DEFAULT_PRETRAIN_LR = 1e-3
BACKGROUND_FRACTION = 0.33
DECODER_WEIGHT_DECAY = 1e-5
SLIDING_WINDOW_OVERLAP = 0.25
_FINAL_LR_FRACTION = 0.05


# ---------------------------------------------------------------- public entry points


def train_adapter(
    base_path: PathLike,
    cases: PathLike | Sequence[Any],
    labels: Sequence[Label | Mapping[str, Any]] | None,
    out_path: PathLike,
    *,
    name: str | None = None,
    label_map: Mapping[str, Any] | str | None = None,
    unmapped: str = "error",
    rank: int | None = None,
    init: str | None = None,
    groups: Sequence[str] | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    lr_u: float = DEFAULT_LR_U,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    device: str = "auto",
    validation: str | Sequence[Any] = "auto",
    validate_every: int = DEFAULT_VALIDATE_EVERY,
    parent_adapter: PathLike | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Progress = silent,
) -> AdapterCard:
    """Train a tCURLoRA adapter on a base model and write it (atomically) with its card.

    Args:
        base_path: the base-model file.
        cases: training cases: a folder, a JSON case list, or a list of (image, label) pairs / dicts / TrainingCases
            (see :mod:`TCURLoRALib.cases`).
        labels: the adapter's labels (``labels[0]`` background, value 0); ``None``: the parent adapter's, else the
            base's. Labels other than the base's get a new output head, which then trains.
        out_path: the adapter file to write: its folder must exist and take the file (checked before the work, with
            the free space); an existing file only with ``overwrite``, never the base or the parent.
        name: adapter name in the card; default: the file name without ``.safetensors``.
        label_map: case structure -> adapter label (dict, JSON text or JSON file; rules in :mod:`cases`).
        unmapped: ``"error"`` (default), ``"background"`` or ``"ignore"`` for structures the mapping misses.
        rank, init, groups: tCURLoRA settings; default :data:`DEFAULT_RANK`, :data:`DEFAULT_INIT`, all groups; with
            a parent they default to the parent's and must equal them.
        steps: optimiser steps (0 gives the untrained adapter: ``ΔW = 0``, fresh head if any).
        lr: learning rate of decoder and head; lr_u: that of U.
        batch_size: crops per step.
        seed: seeds crops, augmentation, a new head's initial weights and the automatic validation split.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        validation: validation cases (same forms as ``cases``), ``"auto"`` or ``"none"`` (see the module docstring).
        validate_every: steps between validations (the last step is always validated).
        parent_adapter: an adapter file of the same base to continue from (its U, decoder and head).
        threads: torch CPU threads while training (``None``: leave torch's setting).
        overwrite: replace an existing ``out_path``; without it the file is also written exclusively, so that an
            adapter another run wrote there meanwhile is never replaced.
        progress: receives start / step / metric / done events.

    Returns:
        The card written. ``training`` holds cases, validation_cases, steps, seconds, device, seed, lr, lr_u,
        batch_size, patch_size, best_step and trainable parameter counts; ``metrics["validation"]`` the best
        validation Dice per label (by label name), their mean, the step of that state and the starting Dice
        (``initial``), when there were validation cases.

    Raises:
        FileNotFoundError, ValueError, CardError, TCURLoRAFileError: bad input (files, labels, settings, mapping).
        FileExistsError: ``out_path`` exists and ``overwrite`` is False.
        OutputError: ``out_path`` cannot be written (before the work), or writing it failed (after the work: the
            adapter was kept where the message says).
        Cancelled: raised by the caller's signal handler; nothing is written then.
    """
    _check_settings(steps, lr, lr_u, batch_size, validate_every)
    outputs = OutputFiles(overwrite=overwrite, inputs=[base_path, parent_adapter])
    out_path = outputs.add(out_path, "adapter")
    started = time.monotonic()
    torch_device = resolve_device(device)
    base = load_base(base_path, torch_device)
    parent = read_adapter(parent_adapter, base) if parent_adapter is not None else None
    parent_card = parent[1] if parent else None
    config = _adapter_config(rank, init, groups, parent_card)
    adapter_labels = _labels(labels, parent_card.labels if parent_card else base.card.labels)
    new_head = _label_json(adapter_labels) != _label_json(base.card.labels)
    card = AdapterCard(  # built now, so that a bad name or label list fails before any training
        name=name or _default_name(out_path), base_fingerprint=base.card.fingerprint, base_name=base.card.name,
        rank=config.rank, groups=list(config.groups), init=config.init, labels=adapter_labels,
        training={"cases": 0, "steps": 0, "seconds": 0.0, "device": str(torch_device), "seed": seed},
        parent=parent_card.name if parent_card else None)
    mapping = LabelMapping(adapter_labels, parse_label_mapping(label_map), unmapped)
    train_cases, validation_cases = split_cases(find_cases(cases), validation, seed)
    prepared = prepare_cases(train_cases + validation_cases, base.card, mapping)
    train_data, validation_data = prepared[:len(train_cases)], prepared[len(train_cases):]

    with reproducible(seed, threads):
        unetr = base.model
        base_head = unetr.out
        if parent is not None:
            tensors = {key: value.to(torch_device) for key, value in parent[0].items()}
            if any(key.split(".", 1)[0] == HEAD for key in tensors):
                attach_head(unetr, parent_card.labels)
            unetr.load_state_dict({k: v for k, v in tensors.items() if k.split(".", 1)[0] in DECODER_BLOCKS + (HEAD,)},
                                  strict=False)
            if not new_head:
                unetr.out = base_head  # back to the base's labels: its own head, frozen, as the file will not hold one
            elif _label_json(adapter_labels) != _label_json(parent_card.labels):
                attach_head(unetr, adapter_labels)
                start_head_at_prior(unetr, train_data)
            model = TCURLoRAModel(unetr, config, group_state=group_state_of(tensors))
        else:
            if new_head:
                attach_head(unetr, adapter_labels)
                start_head_at_prior(unetr, train_data)
            model = TCURLoRAModel(unetr, config)
        model.to(torch_device)
        outputs.expect(out_path, adapter_file_bytes(model, include_head=new_head))
        counts = model.mark_trainable(train_head=new_head)
        u_parameters = [group.u for group in model.groups.values()]
        u_ids = {id(p) for p in u_parameters}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in u_ids]
        result = fit(model, adapter_optimizer(u_parameters, others, lr, lr_u), train_data, validation_data,
                     adapter_labels, base.card.patch_size, steps, batch_size, validate_every, seed, torch_device,
                     progress, "train adapter", validate_initial=True)
    model.eval()
    training = {
        "cases": len(train_data), "validation_cases": len(validation_data), "steps": steps,
        "seconds": round(time.monotonic() - started, 2), "device": str(torch_device), "seed": seed, "lr": lr,
        "lr_u": lr_u, "batch_size": batch_size, "patch_size": list(base.card.patch_size),
        "best_step": result.best_step, "validate_every": validate_every, "unmapped": unmapped,
        "trainable": {"u": counts.u, "decoder": counts.decoder, "head": counts.head, "total": counts.total},
        "torch": torch.__version__,
    }
    card = dataclasses.replace(card, training=training, metrics=result.metrics_json())
    outputs.publish({out_path: lambda temporary: save_adapter(temporary, model, card, include_head=new_head)})
    progress("done", output=str(out_path), seconds=training["seconds"])
    return card


def pretrain(
    cases: PathLike | Sequence[Any],
    card_fields: Mapping[str, Any],
    out_path: PathLike,
    *,
    steps: int = DEFAULT_PRETRAIN_STEPS,
    lr: float = DEFAULT_PRETRAIN_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    device: str = "auto",
    validation: str | Sequence[Any] | None = None,
    validate_every: int = 200,
    label_map: Mapping[str, Any] | str | None = None,
    unmapped: str = "error",
    threads: int | None = None,
    overwrite: bool = False,
    progress: Progress = silent,
) -> ModelCard:
    """Train a whole UNETR from scratch and write it as a base-model file (atomically).

    Args:
        cases: training cases (as for :func:`train_adapter`).
        card_fields: every :class:`ModelCard` field but the fingerprint; its labels are the network's outputs.
        out_path: the base-model file to write (checked before the work, as for :func:`train_adapter`).
        steps, lr, batch_size, seed, device, validate_every, label_map, unmapped, threads, overwrite, progress: as
            for :func:`train_adapter` (all weights train at ``lr``).
        validation: validation cases, ``"auto"``, or ``None``/``"none"`` (default: none, the last state is kept).

    Returns:
        The card written; ``metrics["validation"]`` holds the best validation Dice when there were validation cases,
        ``provenance["training"]`` the training record.
    """
    _check_settings(steps, lr, lr, batch_size, validate_every)
    outputs = OutputFiles(overwrite=overwrite)
    out_path = outputs.add(out_path, "base model")
    started = time.monotonic()
    fields = dict(card_fields)
    fields.pop("fingerprint", None)
    card = ModelCard.from_json({**fields, "fingerprint": "0" * 64})  # checks the fields before any work
    torch_device = resolve_device(device)
    mapping = LabelMapping(card.labels, parse_label_mapping(label_map), unmapped)
    train_cases, validation_cases = split_cases(find_cases(cases), validation or "none", seed)
    prepared = prepare_cases(train_cases + validation_cases, card, mapping)
    train_data, validation_data = prepared[:len(train_cases)], prepared[len(train_cases):]
    with reproducible(seed, threads):
        model = build_unetr(card).to(torch_device)
        outputs.expect(out_path, sum(value.numel() * value.element_size() for value in model.state_dict().values()))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=DECODER_WEIGHT_DECAY)
        result = fit(model, optimizer, train_data, validation_data, card.labels, card.patch_size, steps, batch_size,
                     validate_every, seed, torch_device, progress, "pretrain", validate_initial=False)
    model.eval()
    record = {"cases": len(train_data), "validation_cases": len(validation_data), "steps": steps,
              "seconds": round(time.monotonic() - started, 2), "device": str(torch_device), "seed": seed, "lr": lr,
              "batch_size": batch_size, "best_step": result.best_step, "torch": torch.__version__}
    fields["metrics"] = {**dict(fields.get("metrics") or {}), **result.metrics_json()}
    fields["provenance"] = {**dict(fields.get("provenance") or {}), "training": record}
    written: list[ModelCard] = []
    outputs.publish({out_path: lambda temporary: written.append(save_base(temporary, model, fields))})
    progress("done", output=str(out_path), seconds=record["seconds"])
    return written[-1]


# ---------------------------------------------------------------- pieces


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names are checked.

    Raises:
        ValueError: an unknown device name, or CUDA asked for where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no usable CUDA GPU: use 'cpu' or 'auto'")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use 'auto', 'cpu' or 'cuda'")
    return resolved


def split_cases(cases: Sequence[TrainingCase], validation: str | Sequence[Any], seed: int
                ) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """(training cases, validation cases) by the rule in the module docstring.

    Args:
        cases: all given training cases.
        validation: ``"auto"``, ``"none"``, or the validation cases (a folder, JSON file or list).
    """
    cases = list(cases)
    if isinstance(validation, str) and validation in ("auto", "none"):
        if validation == "none" or len(cases) == 1:
            return cases, []
        if len(cases) <= 3:
            held = seed % len(cases)
            return [c for i, c in enumerate(cases) if i != held], [cases[held]]
        held_out = set(np.random.default_rng(seed).permutation(len(cases))[: math.ceil(len(cases) / 5)].tolist())
        return ([c for i, c in enumerate(cases) if i not in held_out],
                [c for i, c in enumerate(cases) if i in held_out])
    return cases, find_cases(validation)


def adapter_optimizer(encoder_side: Sequence[nn.Parameter], decoder_and_head: Sequence[nn.Parameter], lr: float,
                      lr_u: float) -> torch.optim.AdamW:
    """AdamW of an adapter: the encoder side (U; in the few-shot benchmark also LoRA's A and B, or the base
    encoder) at ``lr_u`` without weight decay, decoder and head at ``lr`` with :data:`DECODER_WEIGHT_DECAY`."""
    # No weight decay on U: ΔW = 0 sits at U = U0, and decay pulls U toward 0; for the "pinv" init that is a large,
    # arbitrary update. Without decay both inits train the same adapter (see the module docstring).
    groups = [{"params": list(decoder_and_head), "lr": lr, "weight_decay": DECODER_WEIGHT_DECAY}]
    if encoder_side:
        groups.insert(0, {"params": list(encoder_side), "lr": lr_u, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def masked_dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy over annotated voxels only.

    Cross-entropy ignores voxels with target :data:`cases.IGNORE_INDEX` (mean over the others); Dice (MONAI
    ``DiceLoss``, softmax probabilities, one-hot target, all channels, summed over the batch) is computed after
    zeroing both probabilities and one-hot target at those voxels, so they add nothing to any term.

    Args:
        logits: ``B x C x D x H x W``.
        target: int64 ``B x D x H x W``, channel index or IGNORE_INDEX.

    Returns:
        scalar loss (0 with a gradient of 0 where no voxel is annotated).
    """
    annotated = target != IGNORE_INDEX
    if not bool(annotated.any()):
        return logits.sum() * 0.0
    cross_entropy = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    mask = annotated.unsqueeze(1).to(logits.dtype)
    probabilities = torch.softmax(logits, dim=1) * mask
    one_hot = F.one_hot(target.clamp(min=0), logits.shape[1]).movedim(-1, 1).to(logits.dtype) * mask
    dice = DiceLoss(include_background=True, batch=True)(probabilities, one_hot)
    return dice + cross_entropy


class CropSampler:
    """Random training crops with foreground oversampling and augmentation (rules in the module docstring).

    Args:
        cases: the prepared training cases (model grid).
        patch_size: crop size (D, H, W).
        seed: seeds case choice, crop centres and augmentation.
    """

    def __init__(self, cases: Sequence[PreparedCase], patch_size: Sequence[int], seed: int):
        self.patch = tuple(int(p) for p in patch_size)
        self.rng = np.random.default_rng(seed)
        self.cases = [self._index(case) for case in cases]
        self.augment = Compose([
            RandAffined(keys=("image", "label"), prob=0.5, rotate_range=(0.15, 0.15, 0.15),
                        scale_range=(0.1, 0.1, 0.1), mode=("bilinear", "nearest"),
                        padding_mode=("zeros", "border")),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ])
        self.augment.set_random_state(seed=seed)

    def _index(self, case: PreparedCase) -> dict[str, Any]:
        # Pad to at least the patch size; padding is not annotated, so it never enters the loss.
        pad = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for p, s in zip(self.patch, case.image.shape)]
        image = np.pad(case.image, pad, constant_values=0.0)
        target = np.pad(case.target, pad, constant_values=IGNORE_INDEX)
        flat = target.reshape(-1)
        by_class = {int(c): np.flatnonzero(flat == c) for c in np.unique(flat) if c > 0}
        return {"image": image, "target": target, "by_class": by_class,
                "annotated": np.flatnonzero(flat != IGNORE_INDEX)}

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` crops: images float32 ``B x 1 x D x H x W`` and targets int64 ``B x D x H x W``."""
        images, targets = [], []
        for _ in range(size):
            case = self.cases[int(self.rng.integers(len(self.cases)))]
            image, target = self._crop(case)
            out = self.augment({"image": torch.from_numpy(image)[None], "label": torch.from_numpy(target)[None]
                                .to(torch.float32)})
            images.append(_plain(out["image"]))
            targets.append(_plain(out["label"])[0].round().to(torch.int64))
        return torch.stack(images), torch.stack(targets)

    def _crop(self, case: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        classes = sorted(case["by_class"])
        if classes and self.rng.random() >= BACKGROUND_FRACTION:
            pool = case["by_class"][classes[int(self.rng.integers(len(classes)))]]
        else:
            pool = case["annotated"]
        centre = np.unravel_index(int(pool[int(self.rng.integers(len(pool)))]), case["target"].shape)
        start = [int(min(max(c - p // 2, 0), s - p)) for c, p, s in zip(centre, self.patch, case["target"].shape)]
        box = tuple(slice(b, b + p) for b, p in zip(start, self.patch))
        return np.ascontiguousarray(case["image"][box]), np.ascontiguousarray(case["target"][box])


@torch.no_grad()
def predict_labels(model: nn.Module, image: np.ndarray, patch_size: Sequence[int], device: torch.device) -> np.ndarray:
    """Channel index of every voxel by sliding-window inference (Gaussian blending, overlap 0.25).

    Args:
        image: float32 (D, H, W) on the model grid.

    Returns:
        int64 (D, H, W).
    """
    inputs = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(device)
    logits = sliding_window_inference(inputs, tuple(patch_size), 1, model, overlap=SLIDING_WINDOW_OVERLAP,
                                      mode="gaussian")
    return _plain(logits)[0].argmax(0).cpu().numpy()


def dice_per_label(prediction: np.ndarray, target: np.ndarray, n_channels: int) -> list[float | None]:
    """Dice of channels 1..n_channels-1 over annotated voxels; ``None`` where a label is in neither."""
    annotated = target != IGNORE_INDEX
    scores: list[float | None] = []
    for channel in range(1, n_channels):
        predicted, truth = (prediction == channel) & annotated, target == channel
        total = int(predicted.sum()) + int(truth.sum())
        scores.append(None if total == 0 else 2.0 * int((predicted & truth).sum()) / total)
    return scores


def validate(model: nn.Module, cases: Sequence[PreparedCase], labels: Sequence[Label], patch_size: Sequence[int],
             device: torch.device) -> dict[str, Any]:
    """Dice per foreground label (by name; mean over the cases where it is defined) and their mean ``"mean"``."""
    was_training = model.training
    model.eval()
    per_case = [dice_per_label(predict_labels(model, case.image, patch_size, device), case.target, len(labels))
                for case in cases]
    model.train(was_training)
    dice: dict[str, float | None] = {}
    for index, label in enumerate(labels[1:]):
        values = [scores[index] for scores in per_case if scores[index] is not None]
        dice[label.name] = round(float(np.mean(values)), 4) if values else None
    defined = [value for value in dice.values() if value is not None]
    return {"dice": dice, "mean": round(float(np.mean(defined)), 4) if defined else None}


# ---------------------------------------------------------------- the loop


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` found: the validated best state's step and scores, and the starting scores."""

    validation_cases: int
    best_step: int | None = None
    best: dict[str, Any] | None = None
    initial: dict[str, Any] | None = None

    def metrics_json(self) -> dict[str, Any]:
        if self.best is None:
            return {}
        metrics = {"dice": self.best["dice"], "mean_dice": self.best["mean"], "step": self.best_step,
                   "cases": self.validation_cases}
        if self.initial is not None:
            metrics["initial"] = {"dice": self.initial["dice"], "mean_dice": self.initial["mean"]}
        return {"validation": metrics}


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, train_data: Sequence[PreparedCase],
         validation_data: Sequence[PreparedCase], labels: Sequence[Label], patch_size: Sequence[int], steps: int,
         batch_size: int, validate_every: int, seed: int, device: torch.device, progress: Progress,
         task: str, validate_initial: bool) -> FitResult:
    """Runs ``steps`` optimiser steps, validating on the way; leaves the model holding the best validated state.

    The loop of :func:`train_adapter` and :func:`pretrain`, public so that other ways of choosing what trains (the
    few-shot benchmark's LoRA, decoder-only and full fine-tuning) step through the same crops, augmentation, loss
    and schedule. Without validation cases the last state is kept.

    With ``validate_initial`` the starting state (step 0) is validated too, recorded as ``initial`` and is a
    candidate for the best state: continuing an adapter never writes one worse than its parent on the same cases.
    """
    sampler = CropSampler(train_data, patch_size, seed)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine(step, steps))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    result = FitResult(len(validation_data))
    best_score, best_state = -math.inf, None

    def check(step: int) -> None:
        nonlocal best_score, best_state
        scores = validate(model, validation_data, labels, patch_size, device)
        progress("metric", name="validation_mean_dice", value=scores["mean"], step=step)
        for label_name, value in scores["dice"].items():
            progress("metric", name=f"validation_dice/{label_name}", value=value, step=step)
        if step == 0:
            result.initial = scores
        score = scores["mean"] if scores["mean"] is not None else -1.0
        if score > best_score:
            best_score, result.best_step, result.best = score, step, scores
            best_state = {n: p.detach().clone() for n, p in trainable}

    progress("start", task=task, total=steps)
    if validation_data and (validate_initial or steps == 0):
        check(0)
    clock = EtaClock(steps)
    model.train()
    for step in range(1, steps + 1):
        images, targets = sampler.batch(batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss = masked_dice_ce(model(images.to(device)), targets.to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {step}: lower the learning rate")
        loss.backward()
        optimizer.step()
        schedule.step()
        progress("step", step=step, total=steps, loss=round(float(loss.item()), 5), eta_s=clock.eta(step))
        if validation_data and (step % validate_every == 0 or step == steps):
            check(step)
    if best_state is not None:
        with torch.no_grad():
            for name, parameter in trainable:
                parameter.copy_(best_state[name])
    return result


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


def _cosine(step: int, steps: int) -> float:
    progress_fraction = min(step / max(steps, 1), 1.0)
    return _FINAL_LR_FRACTION + (1 - _FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress_fraction))


@contextlib.contextmanager
def reproducible(seed: int, threads: int | None) -> Iterator[None]:
    """Seeds torch and switches on deterministic algorithms (and a fixed thread count) while training."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.get_num_threads(), torch.backends.cudnn.benchmark)
    # cuBLAS needs a fixed workspace for deterministic matmuls; set only where the caller did not choose one.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    if threads is not None:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.set_num_threads(previous[2])
        torch.backends.cudnn.benchmark = previous[3]


# ---------------------------------------------------------------- argument checks


def _check_settings(steps: Any, lr: Any, lr_u: Any, batch_size: Any, validate_every: Any) -> None:
    for what, value, minimum in (("steps", steps, 0), ("batch_size", batch_size, 1),
                                 ("validate_every", validate_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    for what, value in (("lr", lr), ("lr_u", lr_u)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{what} must be a positive number, got {value!r}")


def _default_name(out_path: Path) -> str:
    name = out_path.name
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else out_path.stem


def _labels(labels: Sequence[Label | Mapping[str, Any]] | None, default: Sequence[Label]) -> list[Label]:
    if labels is None:
        return list(default)
    return [label if isinstance(label, Label) else Label.from_json(label) for label in labels]


def _label_json(labels: Sequence[Label]) -> list[dict[str, Any]]:
    return [label.to_json() for label in labels]


def _adapter_config(rank: int | None, init: str | None, groups: Sequence[str] | None,
                    parent: AdapterCard | None) -> TCURLoRAConfig:
    if parent is None:
        return TCURLoRAConfig(rank=DEFAULT_RANK if rank is None else rank, groups=tuple(groups or GROUP_NAMES),
                              init=init or DEFAULT_INIT)
    given = {"rank": rank, "init": init, "groups": list(groups) if groups is not None else None}
    held = {"rank": parent.rank, "init": parent.init, "groups": list(parent.groups)}
    clashes = [f"{key} {value!r} (parent: {held[key]!r})" for key, value in given.items()
               if value is not None and value != held[key]]
    if clashes:
        raise ValueError(f"continuing adapter {parent.name!r} keeps its settings; got {', '.join(clashes)}")
    if not parent.groups:
        raise ValueError(f"parent adapter {parent.name!r} adapts no weight group; it cannot be continued here")
    return TCURLoRAConfig(rank=parent.rank, groups=tuple(parent.groups), init=parent.init)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (the loop needs no metadata)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
