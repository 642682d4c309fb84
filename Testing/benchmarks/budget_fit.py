"""Prototype of training under a time budget, for the quality benchmark (issue #15): what ``train.fit`` should do
when given ``--minutes`` instead of ``--steps``. Not engine code; the engine keeps its step-count loop until then.

Differences from ``train.fit``:

- The run ends when the budget is spent (a clock: process CPU time or wall time), not after a step count.
- The learning rate follows the same cosine decay to 5 %, over the *fraction of the budget spent* rather than the
  fraction of steps done, so the run reaches the small final rate whatever speed the machine has.
- Validation runs every ``validate_fraction`` of the budget (and at the end, and at the start), inside the budget;
  the best validated state is kept, as in ``fit``.

Everything else is ``train``'s own: ``CropSampler`` (crops, foreground oversampling, augmentation),
``masked_dice_ce``, ``validate``. A clock reading CPU time makes runs comparable on a shared machine: the budget is
the work one core does in that time.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import torch

from TCURLoRALib.train import CropSampler, masked_dice_ce, validate

__all__ = ["CLOCKS", "BudgetResult", "budget_fit", "cosine_fraction"]

CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.monotonic}
FINAL_LR_FRACTION = 0.05


def cosine_fraction(spent: float) -> float:
    """Learning-rate factor after `spent` (0..1) of the budget: cosine from 1 to :data:`FINAL_LR_FRACTION`."""
    spent = min(max(spent, 0.0), 1.0)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * spent))


@dataclasses.dataclass
class BudgetResult:
    """What :func:`budget_fit` did: steps run, the best state's step and scores, validation history, clock times."""

    steps: int = 0
    best_step: int | None = None
    best: dict[str, Any] | None = None
    history: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    validation_seconds: float = 0.0


def budget_fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_data: Sequence, validation_data:
               Sequence, labels: Sequence, patch_size: Sequence[int], seconds: float, batch_size: int, seed: int,
               device: torch.device, clock: str = "cpu", validate_fraction: float = 0.1,
               max_steps: int | None = None) -> BudgetResult:
    """Train until `seconds` of `clock` are spent; leave the model holding the best validated state.

    Args:
        model, optimizer: as for ``train.fit`` (the optimiser's learning rates are the starting ones).
        train_data, validation_data: prepared cases (``cases.PreparedCase``) on the model grid.
        labels: the adapter's labels (background first).
        patch_size: crop size (D, H, W).
        seconds: the budget, validation included.
        batch_size: crops a step.
        seed: seeds the crops and augmentation.
        device: where the model is.
        clock: ``"cpu"`` (this process's CPU time) or ``"wall"``.
        validate_fraction: validate after each such fraction of the budget (default 0.1: ten times).
        max_steps: stop after this many steps at the latest (tests).

    Returns:
        BudgetResult. Without validation cases the last state is kept.
    """
    now = CLOCKS[clock]
    started = now()
    sampler = CropSampler(train_data, patch_size, seed)
    base_rates = [group["lr"] for group in optimizer.param_groups]
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    result = BudgetResult()
    best_score, best_state = -math.inf, None

    def check(step: int) -> None:
        nonlocal best_score, best_state
        before = now()
        scores = validate(model, validation_data, labels, patch_size, device)
        result.validation_seconds += now() - before
        result.history.append({"step": step, "spent_s": round(now() - started, 1), "dice": scores["dice"],
                               "mean": scores["mean"]})
        score = scores["mean"] if scores["mean"] is not None else -1.0
        if score > best_score:
            best_score, result.best_step, result.best = score, step, scores
            best_state = {name: p.detach().clone() for name, p in trainable}

    if validation_data:
        check(0)
    next_check = validate_fraction
    model.train()
    step = 0
    while now() - started < seconds and (max_steps is None or step < max_steps):
        factor = cosine_fraction((now() - started) / seconds)
        for group, rate in zip(optimizer.param_groups, base_rates):
            group["lr"] = rate * factor
        images, targets = sampler.batch(batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss = masked_dice_ce(model(images.to(device)), targets.to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {step + 1}: lower the learning rate")
        loss.backward()
        optimizer.step()
        step += 1
        if validation_data and (now() - started) / seconds >= next_check:
            check(step)
            model.train()
            next_check = (math.floor((now() - started) / seconds / validate_fraction) + 1) * validate_fraction
    if validation_data and (not result.history or result.history[-1]["step"] != step):
        check(step)
    result.steps = step
    result.seconds = now() - started
    if best_state is not None:
        with torch.no_grad():
            for name, parameter in trainable:
                parameter.copy_(best_state[name])
    for group, rate in zip(optimizer.param_groups, base_rates):
        group["lr"] = rate
    return result
