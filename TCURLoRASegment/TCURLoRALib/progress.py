"""Progress reporting and cancellation shared by every long job (segment, train, pretrain, evaluate).

A job reports through a :class:`Progress` callable, ``progress(event, **fields)``, with these events:

- ``"start"``: ``task`` (what runs), ``total`` (number of steps or windows);
- ``"step"``: ``step`` (1-based), ``total``, optionally ``loss``, ``eta_s`` (seconds left) with ``eta_estimate``
  (true while the time per step is not yet measured, see :class:`EtaClock`), ``message``;
- ``"metric"``: ``name``, ``value``, optionally ``step`` (e.g. validation Dice);
- ``"log"``: ``message``, a line (or a few) for the user: the label mapping and the validation split of a training;
- ``"done"``: optionally ``output`` (a path) and ``seconds``;
- ``"error"``: ``message``, ``kind`` (``"bad_input"``, ``"internal"`` or ``"cancelled"``).

The CLI turns events into one JSON object a line (``--progress json``, read by the Slicer panels), a bar on a
terminal, or plain lines in a log (:class:`PlainProgress`). Jobs never print by themselves.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, TextIO

__all__ = ["CANCEL_FILE_ENV", "WARMUP_STEPS", "CancelOnFile", "Cancelled", "EtaClock", "JsonLinesProgress",
           "PlainProgress", "Progress", "TerminalProgress", "cancellable", "format_duration", "silent"]

Progress = Callable[..., None]
WARMUP_STEPS = 3
"""Steps whose time is left out of the measured step time: the first ones are slower (allocation, warm-up)."""
RECENT_STEPS = 20
"""The measured step time is the mean of the latest this many steps, so that it follows a change of load."""
PLAIN_LINES = 20
"""About how many step lines :class:`PlainProgress` writes for a job (plus the first and the last step)."""

CANCEL_FILE_ENV = "TCURLORA_CANCEL_FILE"
"""Environment variable naming a file whose appearance cancels the job (set by :class:`~TCURLoRALib.jobs.Job`)."""


class Cancelled(Exception):
    """The job was asked to stop (SIGINT, SIGTERM or a cancel file); it stopped cleanly and wrote nothing partial."""


class CancelOnFile:
    """A :class:`Progress` that passes every event on, and raises :class:`Cancelled` once ``path`` exists.

    Windows has no SIGTERM for a child process (``terminate`` is TerminateProcess, which runs no clean-up), so the
    Slicer panels ask a job to stop by creating this file. Every training step, sliding window and validation
    reports progress, so a job stops within one step. ``"done"`` and ``"error"`` pass without a check: the work
    is published, or failing, by then.
    """

    def __init__(self, progress: Progress, path: str | os.PathLike):
        self.progress = progress
        self.path = os.fspath(path)

    def __call__(self, event: str, **fields: Any) -> None:
        if event not in ("done", "error") and os.path.exists(self.path):
            raise Cancelled(f"cancel requested (found {self.path!r})")
        self.progress(event, **fields)


def cancellable(progress: Progress, environ: Mapping[str, str] = os.environ) -> Progress:
    """``progress`` wrapped in :class:`CancelOnFile` when ``$TCURLORA_CANCEL_FILE`` is set, else itself."""
    path = environ.get(CANCEL_FILE_ENV)
    return CancelOnFile(progress, path) if path else progress


def silent(event: str, **fields: Any) -> None:
    """A :class:`Progress` that drops every event (library use, tests)."""


class EtaClock:
    """Time left, from the measured time per step once :data:`WARMUP_STEPS` steps are behind.

    Call :meth:`tick` after each step (or batch of steps). Until ``warmup`` steps are done the estimate is the mean
    time of the steps so far and is marked as an estimate (``eta_estimate``: true); after that it is the mean time of
    the latest ``recent`` steps after the warm-up, which the slow first steps no longer inflate and which follows a
    machine that gets busier or quieter. Time between :meth:`restart` and the previous tick (e.g. a validation) is not
    step time; the caller adds such work ahead as ``extra_s``.

    Args:
        total: number of steps of the job.
        warmup: steps left out of the measured step time.
        recent: steps the measured step time is the mean of.
        now: the clock (seconds; monotonic), replaceable in tests.
    """

    def __init__(self, total: int, warmup: int = WARMUP_STEPS, recent: int = RECENT_STEPS,
                 now: Callable[[], float] = time.monotonic):
        self.total, self.warmup, self.recent, self.now = int(total), int(warmup), int(recent), now
        self.durations: list[float] = []
        self._last, self._done = now(), 0

    def restart(self) -> None:
        """Start timing the next step now (what happened since the last tick is not step time)."""
        self._last = self.now()

    def tick(self, done: int, extra_s: float = 0.0) -> dict[str, Any]:
        """Record the steps done since the last tick; returns ``{"eta_s", "eta_estimate"}`` for a step event."""
        now, count = self.now(), int(done) - self._done
        if count > 0:
            self.durations += [(now - self._last) / count] * count
        self._last, self._done = now, int(done)
        left = max(self.total - int(done), 0)
        if not self.durations:
            return {"eta_s": None, "eta_estimate": True}
        estimate = len(self.durations) <= self.warmup
        measured = self.durations if estimate else self.durations[self.warmup:][-self.recent:]
        seconds = sum(measured) / len(measured) * left + (float(extra_s) if left else 0.0)
        return {"eta_s": round(seconds, 1), "eta_estimate": estimate}


def format_duration(seconds: float | None) -> str:
    """``75`` -> ``"1 min 15 s"``, ``3700`` -> ``"1 h 2 min"``, ``None`` -> ``""``."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _eta_text(fields: dict[str, Any]) -> str:
    if not fields.get("eta_s"):
        return ""
    text = f"about {format_duration(fields['eta_s'])} left"
    return text + " (estimate)" if fields.get("eta_estimate") else text


def _step_text(fields: dict[str, Any]) -> str:
    parts = [f"loss {fields['loss']:.4f}" if fields.get("loss") is not None else "", _eta_text(fields),
             str(fields.get("message") or "")]
    return ", ".join(part for part in parts if part)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metric_lines(metrics: list[dict[str, Any]]) -> list[str]:
    """The metric events of one step as lines: a validation on one line (``validation at step 50: mean Dice 0.3636;
    left 0.7273, right 0.0000``), any other metric on a line of its own (``name value at step N``)."""
    if not metrics:
        return []
    step = metrics[0].get("step")
    at = f" at step {step}" if step is not None else ""
    mean = [m for m in metrics if m["name"] == "validation_mean_dice"]
    per_label = [m for m in metrics if str(m["name"]).startswith("validation_dice/")]
    if len(mean) == 1 and len(mean) + len(per_label) == len(metrics):
        labels = ", ".join(f"{str(m['name']).split('/', 1)[1]} {_number(m['value'])}" for m in per_label)
        return [f"validation{at}: mean Dice {_number(mean[0]['value'])}" + (f"; {labels}" if labels else "")]
    return [f"{m['name']} {_number(m.get('value'))}" + (f" at step {m['step']}" if m.get("step") is not None else "")
            for m in metrics]


class _MetricsOfAStep:
    """Holds back the metric events of one step, so that a human reporter writes them together."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, Any]] = []

    def add(self, fields: dict[str, Any]) -> list[str]:
        """Holds ``fields``; returns the lines of the held metrics of an earlier step, if any."""
        lines = self.take() if self.metrics and self.metrics[-1].get("step") != fields.get("step") else []
        self.metrics.append(fields)
        return lines

    def take(self) -> list[str]:
        metrics, self.metrics = self.metrics, []
        return _metric_lines(metrics)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonLinesProgress:
    """Writes each event as one JSON object a line, flushed at once: ``{"event": "step", "step": 3, ...}``."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def __call__(self, event: str, **fields: Any) -> None:
        record = {"event": event, **{key: _json_safe(value) for key, value in fields.items()}}
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


class TerminalProgress:
    """A one-line progress bar with loss and ETA on a terminal; each validation and log line on a line of its own.

    Errors are left to the caller (the CLI prints each one once); an error only ends the bar's line.
    """

    width = 30

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.task = ""
        self.open_line = False
        self.held = _MetricsOfAStep()

    def _line(self, text: str) -> None:
        self.stream.write(("\n" if self.open_line else "") + text + "\n")
        self.open_line = False

    def __call__(self, event: str, **fields: Any) -> None:
        for line in self.held.add(fields) if event == "metric" else self.held.take():
            self._line(line)
        if event == "start":
            self.task = str(fields.get("task", ""))
        elif event == "step":
            step, total = int(fields["step"]), max(int(fields.get("total") or 1), 1)
            filled = int(self.width * min(step / total, 1.0))
            self.stream.write(f"\r{self.task} [{'#' * filled}{'.' * (self.width - filled)}] {step}/{total} "
                              f"{_step_text(fields)}\033[K")
            self.open_line = step < total
            if not self.open_line:
                self.stream.write("\n")
        elif event == "log":
            self._line(str(fields.get("message", "")))
        elif event == "done":
            self._line(f"done{': ' + str(fields['output']) if fields.get('output') else ''}")
        elif event == "error" and self.open_line:
            self._line("")
        self.stream.flush()


class PlainProgress:
    """Plain lines for a log file or a cluster job (no terminal): the start, about :data:`PLAIN_LINES` step lines
    (task, step, loss, ETA), every log line, each validation on one line, and the end. Errors are left to the
    caller."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.task = ""
        self.every = 1
        self.held = _MetricsOfAStep()

    def __call__(self, event: str, **fields: Any) -> None:
        for line in self.held.add(fields) if event == "metric" else self.held.take():
            self._write(f"{self.task}: {line}")
        if event == "start":
            self.task = str(fields.get("task", ""))
            total = int(fields.get("total") or 0)
            self.every = max(1, math.ceil(total / PLAIN_LINES))
            self._write(f"{self.task}: started, {total} steps")
        elif event == "step":
            step, total = int(fields["step"]), int(fields.get("total") or 0)
            if step == 1 or step == total or step % self.every == 0:
                details = _step_text(fields)
                self._write(f"{self.task}: step {step}/{total}" + (f", {details}" if details else ""))
        elif event == "log":
            self._write(str(fields.get("message", "")))
        elif event == "done":
            took = f" in {format_duration(fields['seconds'])}" if fields.get("seconds") is not None else ""
            self._write(f"{self.task}: done{took}" + (f": {fields['output']}" if fields.get("output") else ""))

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
