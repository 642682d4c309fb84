"""The training loop (:func:`fit`): crops, loss, optimiser steps on a cosine schedule, validation, the best state.

Shared by adapter training, pretraining and the few-shot benchmark's other methods (LoRA, decoder-only, full
fine-tuning), so that all of them step through the same crops, augmentation, loss and schedule. Optimiser AdamW
(:func:`adapter_optimizer` for an adapter), learning rate decaying on a cosine to 5 % of the start.

Validation: before the first step (``validate_initial``), every ``validate_every`` steps and at the end; the state
with the best mean foreground Dice is the one kept (the starting state included, so continuing an adapter never
makes it worse on those cases). A time budget (``settings.minutes``) ends the run early, on a validated state (see
:func:`fit`). Reproducibility: the same inputs, seed, device, thread count and library versions
give a bit-identical result inside :func:`reproducible`.

Processes: :func:`fit` runs in one process (:class:`OneProcess`, the default) or as one of several that share each
step (``parallel``: :class:`TCURLoRALib.distributed.DataParallel` under torchrun). That hook decides how the model is
wrapped, which crops of the step's batch this process takes, how the loss of the batch is formed, whether this
process validates and reports, and what it writes; the loop itself is the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .cards import Label
from .cases import PreparedCase
from .crops import CropSampler
from .devices import resolve_device
from .loss import masked_dice_ce
from .outputs import OutputFiles
from .progress import EtaClock, Progress, silent
from .settings import TrainSettings
from .validation import validate

__all__ = ["DECODER_WEIGHT_DECAY", "FitResult", "OneProcess", "adapter_optimizer", "fit", "reproducible"]

DECODER_WEIGHT_DECAY = 1e-5
_FINAL_LR_FRACTION = 0.05


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` found: the validated best state's step and scores, and the starting scores.

    Args:
        validation_cases: number of validation cases (0: none, the last state was kept).
        steps: optimiser steps run (fewer than ``settings.steps`` when the time budget ended the run).
        best_step: the step of the kept state; None without validation (the last state is kept).
        best: its scores ``{"dice": {label: Dice}, "mean": mean}``; None without validation.
        initial: the scores of the starting state (step 0), when it was validated.
        stopped_by: ``"steps"`` (all of ``settings.steps`` ran) or ``"budget"`` (``settings.minutes`` was spent).
    """

    validation_cases: int
    steps: int = 0
    best_step: int | None = None
    best: dict[str, Any] | None = None
    initial: dict[str, Any] | None = None
    stopped_by: str = "steps"

    def metrics_json(self) -> dict[str, Any]:
        """The card's ``metrics``: ``{"validation": {dice, mean_dice, step, cases[, initial]}}`` or ``{}``."""
        if self.best is None:
            return {}
        metrics = {"dice": self.best["dice"], "mean_dice": self.best["mean"], "step": self.best_step,
                   "cases": self.validation_cases}
        if self.initial is not None:
            metrics["initial"] = {"dice": self.initial["dice"], "mean_dice": self.initial["mean"]}
        return {"validation": metrics}


class OneProcess:
    """How a training takes part in a job of several processes: here, the whole job in this one process.

    The default of :func:`fit`, :func:`~TCURLoRALib.train.train_adapter` and :func:`~TCURLoRALib.train.pretrain`;
    :class:`TCURLoRALib.distributed.DataParallel` (torchrun) has the same members, each for a process of several.
    """

    processes = 1
    """Processes that share each step."""
    main = True
    """Whether this process validates, reports progress and writes the result."""

    def device(self, name: str) -> torch.device:
        """The torch device for a ``--device`` value."""
        return resolve_device(name)

    def output_files(self, *, overwrite: bool, inputs: Sequence[Any] = ()) -> OutputFiles:
        """The command's outputs (checked now, written at the end), or, where this process writes nothing, a
        stand-in that checks and writes nothing."""
        return OutputFiles(overwrite=overwrite, inputs=inputs)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training steps call (the model itself here)."""
        return model

    def batch(self, sampler: CropSampler, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's crops of a step whose batch is ``size`` crops a process."""
        return sampler.batch(size)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of the step's batch, to backpropagate from this process's crops (logits ``B x C x D x H x W``,
        targets ``B x D x H x W``)."""
        return masked_dice_ce(logits, targets)

    def stepped(self, step: int, model: nn.Module) -> None:
        """Called after each optimiser step (nothing to do here)."""

    def record(self) -> dict[str, Any]:
        """What the training record adds about the processes (nothing here)."""
        return {}


ONE_PROCESS = OneProcess()


def adapter_optimizer(encoder_side: Sequence[nn.Parameter], decoder_and_head: Sequence[nn.Parameter], lr: float,
                      lr_u: float) -> torch.optim.AdamW:
    """AdamW of an adapter: the encoder side (U; in the few-shot benchmark also LoRA's A and B, or the base
    encoder) at ``lr_u`` without weight decay, decoder and head at ``lr`` with :data:`DECODER_WEIGHT_DECAY`."""
    # No weight decay on U: ΔW = 0 sits at U = U0, and decay pulls U toward 0; for the "pinv" init that is a large,
    # arbitrary update. Without decay both inits train the same adapter.
    groups = [{"params": list(decoder_and_head), "lr": lr, "weight_decay": DECODER_WEIGHT_DECAY}]
    if encoder_side:
        groups.insert(0, {"params": list(encoder_side), "lr": lr_u, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def _validation_steps(steps: int, every: int) -> list[int]:
    return sorted({step for step in range(every, steps + 1, every)} | ({steps} if steps else set()))


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, train_data: Sequence[PreparedCase],
        validation_data: Sequence[PreparedCase], *, labels: Sequence[Label], patch_size: Sequence[int],
        settings: TrainSettings, progress: Progress = silent, task: str = "train",
        validate_initial: bool = False, parallel: OneProcess = ONE_PROCESS,
        clock: Callable[[], float] = time.monotonic) -> FitResult:
    """Runs ``settings.steps`` optimiser steps, or fewer when ``settings.minutes`` is spent, validating on the way;
    leaves the model holding the best validated state (without validation cases, the last one).

    The time budget: after each step, if the time spent plus the duration of the latest validation (the final
    validation still to come) reaches ``settings.minutes``, the step is validated (unless it just was) and the run
    ends there, so the budget ends on a validated state and the best one is kept. At least one step runs. The
    learning rate's cosine follows the larger of the fractions of steps and of the budget spent.

    Args:
        model: the network, on its device (crops go to the device of its parameters).
        optimizer: over the parameters that train.
        train_data, validation_data: prepared cases on the model grid.
        labels: the network's labels, one an output channel (validation Dice is reported by their names).
        patch_size: crop and sliding-window size (D, H, W).
        settings: ``steps``, ``minutes``, ``batch_size``, ``validate_every`` and ``seed`` are used here.
        progress: receives ``start``, a ``step`` per step (loss, ETA) and validation ``metric`` events.
        task: the task name of the ``start`` event.
        validate_initial: validate the starting state (step 0) too, record it as ``initial`` and let it be the
            best state.
        parallel: how this process shares the steps with others (default: it does not). A process that is not
            ``parallel.main`` neither validates (its result holds no scores) nor keeps a best state.
        clock: seconds, monotonic (default ``time.monotonic``: wall time); the time budget reads it (tests and
            benchmarks may pass another, e.g. ``time.process_time``).

    Raises:
        FloatingPointError: the loss became non-finite (the message says to lower ``--lr``).
        ValueError: a time budget in a job of several processes (their clocks would end the run at different
            steps).
    """
    steps = settings.steps
    budget = None if settings.minutes is None else settings.minutes * 60.0
    if budget is not None and parallel.processes > 1:
        raise ValueError(f"--minutes works in one process only ({parallel.processes} processes share this "
                         f"training, and their clocks would stop them at different steps): give --steps instead")
    started = clock()

    def spent() -> float:
        """Fraction of the budget spent (0 without a budget)."""
        return 0.0 if budget is None else (clock() - started) / budget

    sampler = CropSampler(train_data, patch_size, settings.seed)
    network = parallel.wrap(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine(max(step / max(steps, 1),
                                                                                     spent())))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    device = next(model.parameters()).device
    result = FitResult(len(validation_data), steps=steps)
    best_score, best_state = -math.inf, None
    validating = bool(validation_data) and parallel.main
    pending = _validation_steps(steps, settings.validate_every) if validating else []
    validation_seconds = 0.0
    validated_at = None

    def check(step: int) -> None:
        nonlocal best_score, best_state, validation_seconds, validated_at
        before = clock()
        scores = validate(model, validation_data, labels, patch_size)
        validation_seconds, validated_at = clock() - before, step
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
    if validating and (validate_initial or steps == 0):
        check(0)
    eta = EtaClock(steps)
    model.train()
    for step in range(1, steps + 1):
        images, targets = parallel.batch(sampler, settings.batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss = parallel.loss(network(images.to(device)), targets.to(device))
        if not torch.isfinite(loss):
            rates = f"--lr (now {settings.lr:g})" + (f" or --lr-u (now {settings.lr_u:g})"
                                                      if len(optimizer.param_groups) > 1 else "")
            raise FloatingPointError(f"the loss became {loss.item()} at step {step}: lower the learning rate, "
                                     f"{rates}")
        loss.backward()
        optimizer.step()
        schedule.step()
        parallel.stepped(step, model)
        validations_left = sum(1 for at in pending if at > step)
        left = eta.tick(step, extra_s=validations_left * validation_seconds)
        out_of_time = budget is not None and clock() - started + validation_seconds >= budget
        if budget is not None and left["eta_s"] is not None:
            left["eta_s"] = round(min(left["eta_s"], max(budget - (clock() - started), 0.0) + validation_seconds), 1)
        progress("step", step=step, total=steps, loss=round(float(loss.item()), 5), **left)
        if step in pending or (out_of_time and validating and validated_at != step):
            check(step)
            eta.restart()
        if out_of_time and step < steps:
            result.steps, result.stopped_by = step, "budget"
            progress("log", message=f"the time budget of {settings.minutes:g} min is spent: stopping after step "
                                    f"{step} of at most {steps}")
            break
    if best_state is not None:
        with torch.no_grad():
            for name, parameter in trainable:
                parameter.copy_(best_state[name])
    return result


def _cosine(fraction: float) -> float:
    """Learning-rate factor after ``fraction`` (0..1) of the run: a cosine from 1 down to the final fraction."""
    progress_fraction = min(max(fraction, 0.0), 1.0)
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
