"""Background jobs: ``python -m TCURLoRALib ...`` in a child process, its JSON progress lines drained by a thread.

No Slicer and no qt here, so that the runner is tested as it is: a Slicer panel creates a :class:`Job`, polls
:meth:`Job.poll_events` from a timer and shows the events; the GUI never blocks on the child.
"""
from __future__ import annotations

import contextlib
import enum
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import psutil

__all__ = ["Job", "JobState", "engine_folder"]

_EXIT_CANCELLED = 130


def engine_folder() -> Path:
    """The folder that holds the ``TCURLoRALib`` package (put on the child's ``PYTHONPATH``)."""
    return Path(__file__).resolve().parents[1]


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Job:
    """One run of the engine's CLI in a child process.

    Args:
        arguments: the CLI arguments after ``python -m TCURLoRALib`` (``--progress json`` is added).
        python: the interpreter; Slicer passes its ``PythonSlicer``, default the current one.
        work_dir: a temporary folder for inputs and outputs; removed after success, kept (and named in the log)
            after a failure or cancel so that nothing the user may need is lost. Created when not given.
        env: extra environment variables for the child.

    Events (dicts from the child's JSON lines, see :mod:`TCURLoRALib.progress`) and the child's other output, as
    ``{"event": "log", "message": line}``, arrive in :meth:`poll_events`.
    """

    def __init__(
        self,
        arguments: Sequence[str],
        python: str | None = None,
        work_dir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ):
        self.arguments = [str(argument) for argument in arguments]
        self.python = python or sys.executable
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="tcurlora-job-"))
        self.env = env or {}
        self.state = JobState.PENDING
        self.returncode: int | None = None
        self.error: str | None = None
        self.log: list[str] = []
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._cancel_requested = False

    def command(self) -> list[str]:
        return [self.python, "-m", "TCURLoRALib", *self.arguments, "--progress", "json"]

    def start(self) -> None:
        """Start the child; returns at once."""
        if self.state is not JobState.PENDING:
            raise RuntimeError(f"job already {self.state.value}")
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(engine_folder()), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        # glibc's malloc trimming costs a large share of a training step here (see DESIGN.md).
        env.setdefault("MALLOC_MMAP_MAX_", "0")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "1000000000000")
        self._process = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.work_dir, env=env, text=True, bufsize=1,
        )
        self.state = JobState.RUNNING
        self._reader = threading.Thread(target=self._read_output, name="tcurlora-job-reader", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            line = line.rstrip("\n")
            event = _parse_event(line)
            if event is None:
                self.log.append(line)
                event = {"event": "log", "message": line}
            elif event.get("event") == "error":
                self.error = str(event.get("message"))
            self._events.put(event)
        self._finish(self._process.wait())

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        if self._cancel_requested or returncode == _EXIT_CANCELLED:
            self.state = JobState.CANCELLED
        elif returncode == 0:
            self.state = JobState.DONE
        else:
            self.state = JobState.FAILED
            if self.error is None:
                tail = [line for line in self.log if line.strip()][-5:]
                self.error = f"exit code {returncode}" + (": " + " | ".join(tail) if tail else "")
        if self.state is JobState.DONE:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        else:
            self.log.append(f"temporary files kept in {self.work_dir}")
        self._events.put({"event": "finished", "state": self.state.value, "returncode": returncode,
                          "error": self.error})

    def poll_events(self) -> list[dict[str, Any]]:
        """Every event that arrived since the last call, oldest first (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    @property
    def finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

    def wait(self, timeout: float | None = None) -> JobState:
        """Block until the child has ended and its output is read (for scripts and tests, not for the GUI)."""
        if self._reader is not None:
            self._reader.join(timeout)
        return self.state

    def cancel(self, grace_seconds: float = 10.0) -> None:
        """Ask the child and its children to stop (SIGTERM: the engine unwinds and writes nothing partial), then
        kill whatever is still alive after ``grace_seconds``."""
        if self._process is None or self.finished:
            return
        self._cancel_requested = True
        try:
            descendants = psutil.Process(self._process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        for process in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        self._process.terminate()
        # The direct child is waited for through Popen, not psutil: whoever reaps it first gets its exit code.
        try:
            self._process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        _, alive = psutil.wait_procs(descendants, timeout=grace_seconds)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def _parse_event(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None
