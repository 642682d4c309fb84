"""Progress reporting and cancellation shared by every long job (segment, train, pretrain, evaluate).

A job reports through a :class:`Progress` callable, ``progress(event, **fields)``, with these events:

- ``"start"``: ``task`` (what runs), ``total`` (number of steps or windows);
- ``"step"``: ``step`` (1-based), ``total``, optionally ``loss``, ``eta_s`` (seconds left), ``message``;
- ``"metric"``: ``name``, ``value``, optionally ``step`` (e.g. validation Dice);
- ``"done"``: optionally ``output`` (a path) and ``seconds``;
- ``"error"``: ``message``, ``kind`` (``"bad_input"``, ``"internal"`` or ``"cancelled"``).

The CLI turns events into one JSON object a line (``--progress json``, read by the Slicer panels) or a bar in a
terminal. Jobs never print by themselves.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, TextIO

__all__ = ["CANCEL_FILE_ENV", "CancelOnFile", "Cancelled", "EtaClock", "JsonLinesProgress", "Progress",
           "TerminalProgress", "cancellable", "silent"]

Progress = Callable[..., None]

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
    """Estimates the time left from the mean duration of the steps done so far."""

    def __init__(self, total: int):
        self.total = total
        self.started = time.monotonic()

    def eta(self, done: int) -> float | None:
        if done <= 0:
            return None
        elapsed = time.monotonic() - self.started
        return round(elapsed / done * max(self.total - done, 0), 1)


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
    """A one-line progress bar with loss and ETA on a terminal; metrics and errors on lines of their own."""

    width = 30

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.task = ""

    def __call__(self, event: str, **fields: Any) -> None:
        if event == "start":
            self.task = str(fields.get("task", ""))
        elif event == "step":
            step, total = int(fields["step"]), max(int(fields.get("total") or 1), 1)
            filled = int(self.width * min(step / total, 1.0))
            extras = [f"loss {fields['loss']:.4f}" if fields.get("loss") is not None else "",
                      f"eta {fields['eta_s']:.0f}s" if fields.get("eta_s") is not None else ""]
            text = " ".join(part for part in extras if part)
            self.stream.write(f"\r{self.task} [{'#' * filled}{'.' * (self.width - filled)}] {step}/{total} {text}")
            if step >= total:
                self.stream.write("\n")
        elif event == "metric":
            self.stream.write(f"\n{fields['name']}: {fields['value']}\n")
        elif event == "done":
            self.stream.write(f"done{': ' + str(fields['output']) if fields.get('output') else ''}\n")
        elif event == "error":
            self.stream.write(f"\nerror ({fields.get('kind', 'internal')}): {fields['message']}\n")
        self.stream.flush()
